//! The audit trail across processes and the cluster: a writer process killed with SIGKILL under
//! load loses nothing it acknowledged, and the CLI reads through the gateway only what RBAC lets
//! it. The store contract itself (one suite on SQLite and PostgreSQL, tampering) is
//! `audit/tests/store.rs`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

use jiff::Timestamp;
use serde_json::json;
use tollgate_audit::store::Query;
use tollgate_audit::{
    AuditLog, Entry, Event, Identity, PostgresStore, Redactor, SqliteStore, Store, WriterConfig,
    verify,
};
use tollgate_e2e::postgres::postgres;
use tollgate_engine::{Decision, DenyCode, RuleRef};

fn rule(tool: &str) -> RuleRef {
    RuleRef {
        policy: "shop/support".into(),
        generation: Some(1),
        policy_hash: "sha256:0123456789abcdef".into(),
        tool: Some(tool.into()),
        clause: format!("spec.tools.allowed[{tool}]").into(),
    }
}

fn identity(agent: &str) -> Identity {
    Identity {
        username: format!("system:serviceaccount:shop:agent-{agent}"),
        pod: Some(format!("{agent}-7f9c")),
        token_id: Some("jti-1".into()),
    }
}

/// A decide entry for `agent`'s call of `tool` in `run`.
fn decide(time: Timestamp, agent: &str, run: &str, step: u64, tool: &str, allow: bool) -> Entry {
    let mut entry = Entry::new(time, Event::Decide, identity(agent));
    entry.agent = Some(format!("shop/{agent}"));
    entry.run = Some(run.to_owned());
    entry.step = Some(step);
    entry.tool = Some(tool.to_owned());
    entry.set_arguments(
        &Redactor::default(),
        &json!({"order": step, "apiKey": "sk-live-secret"}),
    );
    entry.decision = Some(if allow {
        Decision::Allow {
            rule: rule(tool),
            review: false,
        }
    } else {
        Decision::Deny {
            code: DenyCode::ToolNotAllowed,
            rule: rule(tool),
            message: format!("{tool} is not an allowed tool"),
        }
    });
    entry.latency_us = Some(12);
    entry
}

async fn open<S: Store>(store: &Arc<S>, chain: &str) -> AuditLog {
    let (log, _task) = AuditLog::open(store.clone(), WriterConfig::new(chain))
        .await
        .expect("open the writer");
    log
}

/// Every batch a writer reported.
fn kill_writer_under_load(store_args: &[&str], min: usize) -> Vec<(u64, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_audit-writer"))
        .args(store_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the writer");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut acked = Vec::new();
    while acked.len() < min {
        let line = lines
            .next()
            .expect("the writer stopped early")
            .expect("read the writer's output");
        acked.push(line);
    }
    child.kill().expect("SIGKILL the writer");
    child.wait().unwrap();
    // Acknowledgements printed before the kill are still in the pipe.
    acked.extend(lines.map_while(Result::ok));
    acked
        .iter()
        .map(|line| {
            let (seq, hash) = line.split_once(' ').expect("SEQ HASH");
            (seq.parse().unwrap(), hash.to_owned())
        })
        .collect()
}

async fn every_acknowledged_record_is_there<S: Store>(store: S, acked: &[(u64, String)]) {
    let reports = verify(&store, true, &BTreeMap::new())
        .await
        .expect("the chain verifies after the crash");
    let stored = store
        .scan("crash-writer", 0, usize::MAX >> 1)
        .await
        .unwrap();
    assert!(stored.len() >= acked.len());
    let by_seq: BTreeMap<u64, &str> = stored.iter().map(|r| (r.seq, r.hash.as_str())).collect();
    for (seq, hash) in acked {
        assert_eq!(
            by_seq.get(seq).copied(),
            Some(hash.as_str()),
            "acknowledged record {seq} is missing or differs"
        );
    }
    assert_eq!(reports[0].records as usize, stored.len());
}

#[tokio::test]
async fn sqlite_writer_killed_under_load_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let acked = kill_writer_under_load(&["--sqlite", path.to_str().unwrap()], 3000);
    assert!(acked.len() >= 3000);
    every_acknowledged_record_is_there(SqliteStore::open(&path).unwrap(), &acked).await;
}

#[tokio::test]
async fn postgres_writer_killed_under_load_loses_no_acknowledged_record() {
    let url = postgres().database("crash").unwrap();
    let acked = kill_writer_under_load(&["--postgres", &url], 3000);
    every_acknowledged_record_is_there(PostgresStore::connect(&url).await.unwrap(), &acked).await;
}

/// The read API's store, counting the pages of records it reads (censuses are not counted).
struct CountedReads {
    store: Arc<SqliteStore>,
    pages: std::sync::atomic::AtomicUsize,
}

impl CountedReads {
    fn pages(&self) -> usize {
        self.pages.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl tollgate_gateway::read::Records for CountedReads {
    fn records<'a>(
        &'a self,
        query: Query,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Vec<tollgate_audit::Record>, String>>
                + Send
                + 'a,
        >,
    > {
        self.pages.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.store.records(query)
    }

    fn census<'a>(
        &'a self,
        query: Query,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Vec<tollgate_audit::Census>, String>>
                + Send
                + 'a,
        >,
    > {
        tollgate_gateway::read::Records::census(self.store.as_ref(), query)
    }

    fn tallies<'a>(
        &'a self,
        since_us: i64,
        until_us: i64,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Vec<tollgate_audit::store::ToolTally>, String>>
                + Send
                + 'a,
        >,
    > {
        tollgate_gateway::read::Records::tallies(self.store.as_ref(), since_us, until_us)
    }
}

/// In a cluster the CLI reads through the gateway: a bearer token reviewed by the apiserver, and
/// a SubjectAccessReview per namespace the answer touches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reads_through_the_gateway_only_what_rbac_lets_it() {
    use kubectl_tollgate::audit::{Action, Location};
    use tollgate_e2e::control_plane;
    use tollgate_gateway::read::{Reader, router};

    let cp = control_plane();
    tollgate_e2e::admission::webhook();
    let allowed_ns = cp.namespace("audit-read").await;
    let other_ns = cp.namespace("audit-other").await;

    // Records of an agent in each namespace.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("audit.db")).unwrap());
    let log = open(&store, "gw-read").await;
    let t0: Timestamp = "2026-11-25T10:00:00Z".parse().unwrap();
    for (ns, run) in [(&allowed_ns, "run-mine"), (&other_ns, "run-theirs")] {
        for step in 1..=3 {
            let mut entry = decide(t0, "support", run, step, "read_customer_record", step != 2);
            entry.agent = Some(format!("{ns}/support"));
            log.append(entry).await.unwrap();
        }
    }

    // More than two pages of one agent's records, all at the same instant: the answer is read
    // and sent a page at a time, in order across pages.
    let bulk = (1..=2_500).map(|step| {
        let mut entry = decide(
            t0,
            "support",
            "run-bulk",
            step,
            "read_customer_record",
            true,
        );
        entry.agent = Some(format!("{allowed_ns}/bulk"));
        log.append(entry)
    });
    for appended in futures::future::join_all(bulk).await {
        appended.unwrap();
    }

    // The read API as the gateway's ServiceAccount (impersonated; the harness grants it the
    // shipped rights), on loopback, over a store that counts the pages of records read.
    let counted = Arc::new(CountedReads {
        store: store.clone(),
        pages: std::sync::atomic::AtomicUsize::new(0),
    });
    let as_gateway = cp.client_as(tollgate_e2e::admission::GATEWAY).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = router(Reader::new(counted.clone(), as_gateway));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // An auditor ServiceAccount allowed to read one namespace: the shipped
    // tollgate-audit-reader, bound there.
    let kubectl = |args: &[&str]| cp.kubectl_ok(args);
    kubectl(&["create", "serviceaccount", "auditor", "-n", &allowed_ns]);
    // The shipped reader role, exactly as config/gateway/rbac.yaml has it.
    let rbac = std::fs::read_to_string(tollgate_e2e::repo_root().join("config/gateway/rbac.yaml"))
        .unwrap();
    let reader_role = rbac
        .split("\n---")
        .find(|doc| doc.contains("name: tollgate-audit-reader}"))
        .expect("config/gateway/rbac.yaml ships tollgate-audit-reader");
    let file = dir.path().join("reader.yaml");
    std::fs::write(&file, reader_role).unwrap();
    kubectl(&["apply", "-f", file.to_str().unwrap()]);
    kubectl(&[
        "create",
        "rolebinding",
        "auditor",
        "-n",
        &allowed_ns,
        "--clusterrole=tollgate-audit-reader",
        &format!("--serviceaccount={allowed_ns}:auditor"),
    ]);
    let token = kubectl(&["create", "token", "auditor", "-n", &allowed_ns])
        .trim()
        .to_owned();
    let remote = |token: Option<&str>| {
        let mut location: Location = url.parse().unwrap();
        if let Location::Gateway(remote) = &mut location {
            remote.token = token.map(str::to_owned);
        }
        location
    };
    let replay = |run: &str| Action::Replay {
        of: kubectl_tollgate::audit::Replayed::Run(run.into()),
        json: false,
    };

    // Its own namespace: the timeline, every seal checked on the way.
    let mine = kubectl_tollgate::audit::run(&remote(Some(&token)), replay("run-mine"))
        .await
        .unwrap();
    assert!(mine.text.contains("read_customer_record"), "{}", mine.text);
    assert!(
        mine.text.contains("3 record(s)") && mine.text.contains("step 3"),
        "{}",
        mine.text
    );
    let export = kubectl_tollgate::audit::run(
        &remote(Some(&token)),
        Action::Export {
            since: t0 - jiff::SignedDuration::from_hours(1),
            agent: Some(format!("{allowed_ns}/support")),
        },
    )
    .await
    .unwrap();
    assert_eq!(export.text.lines().count(), 3);
    let pages_before = counted.pages();
    let export_bulk = || Action::Export {
        since: t0 - jiff::SignedDuration::from_hours(1),
        agent: Some(format!("{allowed_ns}/bulk")),
    };
    let bulk = kubectl_tollgate::audit::run(&remote(Some(&token)), export_bulk())
        .await
        .unwrap();
    let direct = kubectl_tollgate::audit::run(
        &Location::Sqlite(dir.path().join("audit.db")),
        export_bulk(),
    )
    .await
    .unwrap();
    assert_eq!(bulk.text.lines().count(), 2_500);
    assert!(
        bulk.text == direct.text,
        "every record once, in the store's order, across pages"
    );
    assert_eq!(
        counted.pages() - pages_before,
        3,
        "read a page of 1,000 at a time"
    );
    // Drift and track records for a policy of that namespace: folded from the sealed records
    // the gateway answers, exactly as from the store itself.
    let policy_file = dir.path().join("policy.yaml");
    std::fs::write(
        &policy_file,
        format!(
            "apiVersion: tollgate.dev/v1alpha1
kind: AgentPolicy
metadata: {{name: support, namespace: {allowed_ns}}}
spec:
  identityRef: {{name: support}}
  upstreams: [{{name: crm}}]
  tools:
    allowed: [{{name: read_customer_record}}, {{name: update_order}}]
"
        ),
    )
    .unwrap();
    let drift = || Action::Drift {
        policy: policy_file.clone(),
        window: "720h".into(),
        now: t0 + jiff::SignedDuration::from_hours(1),
        json: false,
    };
    let through_gateway = kubectl_tollgate::audit::run(&remote(Some(&token)), drift())
        .await
        .unwrap();
    let direct =
        kubectl_tollgate::audit::run(&Location::Sqlite(dir.path().join("audit.db")), drift())
            .await
            .unwrap();
    assert_eq!(through_gateway.text, direct.text);
    assert!(
        through_gateway
            .text
            .contains("allowed but not called in the last 720h: update_order"),
        "{}",
        through_gateway.text
    );
    let row: Vec<&str> = through_gateway
        .text
        .lines()
        .find(|l| l.starts_with("read_customer_record"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(row[..4], ["read_customer_record", "-", "2", "0"]);

    // Another namespace, or everything at once, is refused, naming the namespace, and before
    // a single record is read.
    let pages_before = counted.pages();
    let theirs = kubectl_tollgate::audit::run(&remote(Some(&token)), replay("run-theirs"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        theirs.contains("403") && theirs.contains(&format!("namespace {other_ns}")),
        "{theirs}"
    );
    let all = kubectl_tollgate::audit::run(
        &remote(Some(&token)),
        Action::Export {
            since: t0 - jiff::SignedDuration::from_hours(1),
            agent: None,
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        all.contains(&format!("namespace {other_ns}"))
            && !all.contains(&format!("namespace {allowed_ns},")),
        "{all}"
    );
    assert_eq!(
        counted.pages(),
        pages_before,
        "refused reads read no record"
    );
    // Asking for an agent it may not read says so even when there is nothing to read.
    let empty = kubectl_tollgate::audit::run(
        &remote(Some(&token)),
        Action::Export {
            since: t0,
            agent: Some(format!("{other_ns}/nobody")),
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(empty.contains("403"), "{empty}");

    // No token, a forged token: refused before anything is read.
    let none = kubectl_tollgate::audit::run(&remote(None), replay("run-mine"))
        .await
        .unwrap_err();
    assert!(none.to_string().contains("bearer token"), "{none}");
    let forged = kubectl_tollgate::audit::run(
        &remote(Some("eyJhbGciOiJub25lIn0.e30.")),
        replay("run-mine"),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(forged.contains("401"), "{forged}");
    // verify walks whole chains and says where to run it.
    let verify = kubectl_tollgate::audit::run(
        &remote(Some(&token)),
        Action::Verify {
            deep: false,
            heads: vec![],
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(verify.contains("reads the store itself"), "{verify}");
    // Plain http to anything but loopback is refused before a token is sent.
    let err = "http://gateway.example:8443"
        .parse::<Location>()
        .unwrap_err();
    assert!(err.contains("in the clear"), "{err}");

    // A reader in the middle that changes a body is caught by the seal check.
    let record = store
        .query(&tollgate_audit::Query {
            run: Some("run-mine".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .remove(0);
    let forged = json!({"chain": record.chain, "seq": record.seq, "prev": record.prev,
        "hash": record.hash, "body": record.body.replace("read_customer_record", "send_customer_email")})
    .to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forger = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/v1/audit/records",
        axum::routing::get(move || {
            let forged = forged.clone();
            async move { forged }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut location: Location = forger.parse().unwrap();
    if let Location::Gateway(remote) = &mut location {
        remote.token = Some(token.clone());
    }
    let caught = kubectl_tollgate::audit::run(&location, replay("run-mine"))
        .await
        .unwrap_err()
        .to_string();
    assert!(caught.contains("does not match its seal"), "{caught}");

    // A gateway that refuses a read as too large (as it does past its cap): drift says where the
    // same figures are, and keeps the gateway's reason.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let busy = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/v1/audit/records",
        axum::routing::get(|| async {
            (
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                axum::Json(json!({"error": "TooManyRecords",
                    "message": "more than 200000 records match; narrow with agent= or a later since="})),
            )
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut location: Location = busy.parse().unwrap();
    if let Location::Gateway(remote) = &mut location {
        remote.token = Some(token.clone());
    }
    let refused = kubectl_tollgate::audit::run(&location, drift())
        .await
        .unwrap_err();
    let refused = format!("{refused:#}");
    assert!(
        refused.contains("status.tools and status.drift") && refused.contains("more than 200000"),
        "{refused}"
    );
}
