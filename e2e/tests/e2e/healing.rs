//! The gateway heals: a PostgreSQL trail that restarts under load, or an agent's lock held by
//! a replica that hangs, costs refusals while it lasts and never a restart, a hung call or an
//! allowed call without its record.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tollgate_audit::{PostgresStore, Query, Store, verify};
use tollgate_e2e::postgres::{Postgres, postgres};

use super::replicas::{post_answer, replica};

/// A client that gives up after 30 s, so a call held for ever fails the test instead of
/// hanging it.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A decision on `run`: the answer's status and body.
async fn decide(http: &reqwest::Client, base: &str, run: &str) -> (reqwest::StatusCode, Value) {
    post_answer(
        http,
        base,
        "/v1/decide",
        json!({"runId": run, "tool": "read_customer_record", "arguments": {"customer_id": "C000042"}}),
    )
    .await
}

/// Whether an answer is a refusal because the trail could not take the call's record.
fn refused_for_the_trail(status: reqwest::StatusCode, body: &Value) -> bool {
    status == reqwest::StatusCode::SERVICE_UNAVAILABLE
        && body["error"]["code"] == "AuditUnavailable"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_on_postgres_heals_when_the_database_restarts_mid_load() {
    let pg = Arc::new(
        tokio::task::spawn_blocking(Postgres::own)
            .await
            .unwrap()
            .expect("a PostgreSQL server of this test's own"),
    );
    let url = pg.database("healing").unwrap();
    let base = replica(&url, "gw-heal", true).await;
    let http = http();
    let stop = Arc::new(AtomicBool::new(false));
    // Six callers, one call each every 50 ms, a new run every 20 calls (the sample's ceilings:
    // 25 steps a run, 100 runs an hour).
    let callers: Vec<_> = (0..6)
        .map(|caller| {
            let (http, base, stop) = (http.clone(), base.clone(), stop.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                let mut call = 0;
                while !stop.load(Ordering::Relaxed) {
                    let run = format!("heal-{caller}-{}", call / 20);
                    let started = Instant::now();
                    // Every call is answered: `post_answer` panics on a connection error or
                    // an answer that is not JSON.
                    let (status, body) = decide(&http, &base, &run).await;
                    answers.push((status, body, started.elapsed()));
                    call += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                answers
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.restart(Duration::from_secs(2)))
            .await
            .unwrap()
            .expect("PostgreSQL restarted");
    }
    // The same gateway process, never restarted, allows calls again.
    let healed = Instant::now();
    loop {
        let (status, body) = decide(&http, &base, "after-the-restart").await;
        if status.is_success() {
            assert_eq!(body["decision"], "allow", "{body}");
            break;
        }
        assert!(refused_for_the_trail(status, &body), "{status}: {body}");
        assert!(
            healed.elapsed() < Duration::from_secs(20),
            "the gateway did not heal within 20 s of the database's return: {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let healed_after = healed.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);

    let mut allowed = 1; // the call that saw it heal
    let mut refused = 0;
    let mut slowest = Duration::ZERO;
    for caller in callers {
        let answers = caller.await.unwrap();
        // Each caller's last answers come after the healing: all allowed.
        let tail = &answers[answers.len().saturating_sub(3)..];
        for (status, body, _) in tail {
            assert!(status.is_success(), "{status}: {body}");
        }
        for (status, body, took) in &answers {
            slowest = slowest.max(*took);
            if status.is_success() {
                assert_eq!(body["decision"], "allow", "{body}");
                allowed += 1;
            } else {
                assert!(refused_for_the_trail(*status, body), "{status}: {body}");
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0,
        "the restart happened under load: some calls were refused"
    );
    // No call waited for ever while the database was away.
    assert!(slowest < Duration::from_secs(15), "a call took {slowest:?}");
    eprintln!(
        "allowed {allowed}, refused {refused} while the database was away; healed {healed_after:?} after its return; slowest call {slowest:?}"
    );

    // Every allowed call has its record, and the chain verifies across the restart.
    let store = PostgresStore::connect(&url).await.unwrap();
    let decisions = store
        .query(&Query {
            agent: Some("default/support-agent-v2".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .iter()
        .filter(|r| r.index.event == "decide" && r.index.outcome.as_deref() == Some("allow"))
        .count();
    assert_eq!(decisions, allowed, "allowed calls and their records");
    let reports = verify(&store, true, &BTreeMap::new())
        .await
        .expect("the chain verifies across the restart");
    assert_eq!(reports.len(), 1, "{reports:?}");
}

#[tokio::test]
async fn a_lock_held_by_a_hung_replica_refuses_in_bounded_time_and_then_heals() {
    let url = postgres().database("healing_lock").unwrap();
    let base = replica(&url, "gw-a", true).await;
    let http = http();
    assert!(decide(&http, &base, "before").await.0.is_success());
    // Another replica takes the agent's lock and hangs: its session stays open, holding it.
    let other = PostgresStore::connect(&url).await.unwrap();
    let held = other.lock_agent("default/support-agent-v2").await.unwrap();
    let started = Instant::now();
    let (status, body) = decide(&http, &base, "while-held").await;
    let waited = started.elapsed();
    assert!(refused_for_the_trail(status, &body), "{status}: {body}");
    // The session's lock_timeout (5 s) answers it, not a wait for ever.
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(12),
        "refused after {waited:?}"
    );
    // The lock is taken by whoever asks next: another replica's wait is bounded the same way.
    let err = PostgresStore::connect(&url)
        .await
        .unwrap()
        .lock_agent("default/support-agent-v2")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("lock timeout"), "{err}");
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = decide(&http, &base, "after").await;
    assert!(status.is_success(), "{status}: {body}");
    assert_eq!(body["decision"], "allow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_apiserver_hangs_stops_before_its_lease_runs_out() {
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::Api;
    use tollgate_e2e::{User, control_plane};
    use tollgate_operator::leader::{Elector, Lost, Timing};

    let cp = control_plane();
    let ns = cp.namespace("leader-hang").await;
    let proxy = tollgate_e2e::freeze::Freezable::start(cp.server_addr())
        .await
        .unwrap();
    let client = cp.client_through(User::Admin, proxy.addr()).await;
    let timing = Timing {
        duration: Duration::from_secs(6),
        renew_every: Duration::from_secs(1),
    };
    let elector = Elector::new(client, &ns, "tollgate-hang", "hung", timing);
    tokio::time::timeout(Duration::from_secs(30), elector.acquire())
        .await
        .expect("the lease is acquired while the apiserver answers");
    let holding = tokio::spawn(async move { elector.hold().await });
    // A renewal or two go through, then the apiserver stops answering mid-lease.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    proxy.freeze();
    let lost = tokio::time::timeout(Duration::from_secs(20), holding)
        .await
        .expect("a leader whose renewals hang gives leadership up")
        .unwrap();
    let stopped_at = jiff::Timestamp::now();
    assert!(matches!(lost, Lost::Expired { .. }), "{lost}");
    // It stopped while the lease, as the apiserver holds it, was still its own: no other
    // replica could have led before it stopped.
    let lease = Api::<Lease>::namespaced(cp.client(User::Admin).await, &ns)
        .get("tollgate-hang")
        .await
        .unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("hung"));
    let runs_out = spec.renew_time.unwrap().0 + jiff::SignedDuration::from_secs(6);
    let left = runs_out.duration_since(stopped_at);
    assert!(
        left > jiff::SignedDuration::ZERO,
        "it stopped {left:?} after its lease ran out"
    );
    eprintln!("stopped leading {left:?} before the lease ran out");
    proxy.thaw();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_apiserver_restarts_resumes_its_watches_and_reviews_without_a_restart() {
    use kube::api::{Api, Patch, PatchParams};
    use tollgate_crds::AgentIdentity;
    use tollgate_e2e::{User, control_plane, eventually};
    use tollgate_gateway::{ClusterPolicies, Gateway, Policies, TokenReviewer};
    use tollgate_runtime::cluster::WatchedView;

    let cp = control_plane();
    let (ns, token) = super::gateway::sample_agent("heal-api").await;
    // Everything the gateway asks of the apiserver goes through a proxy that can go down as an
    // apiserver restarting does: every connection cut, new ones refused.
    let proxy = tollgate_e2e::freeze::Freezable::start(cp.server_addr())
        .await
        .unwrap();
    let through = cp.client_through(User::Admin, proxy.addr()).await;
    let view = WatchedView::start(through.clone(), "tollgate-system");
    view.ready().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(tollgate_audit::SqliteStore::open(dir.path().join("audit.db")).unwrap());
    let (log, _) = tollgate_audit::AuditLog::open(store, tollgate_audit::WriterConfig::new("gw"))
        .await
        .unwrap();
    let gateway = Gateway::new(
        Policies::Cluster(ClusterPolicies::new(Arc::new(view), through.clone())),
        TokenReviewer::new(through),
        log,
        tollgate_audit::Redactor::default(),
    );
    let url = tollgate_e2e::serve_gateway(gateway).await;
    let http = http();
    super::gateway::first_allow(&http, &url, &token, &ns).await;

    // The apiserver goes away for 3 s; meanwhile someone engages the agent's kill switch.
    proxy.cut();
    let identities: Api<AgentIdentity> = Api::namespaced(cp.client(User::Admin).await, &ns);
    identities
        .patch(
            "support-agent-v2",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"killSwitch": {"engaged": true, "reason": "drill"}}})),
        )
        .await
        .unwrap();
    let fresh = cp
        .kubectl_ok(&[
            "create",
            "token",
            "agent-support-agent-v2",
            "-n",
            &ns,
            "--audience",
            "tollgate",
        ])
        .trim()
        .to_owned();
    // A token never seen cannot be reviewed while it is away: refused, and within the deadline.
    let started = Instant::now();
    let (status, body) = super::gateway::decide(&http, &url, &fresh, "run-2").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "AuthenticationUnavailable", "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.restore();

    // Back: the same gateway reviews the new token and its watch has caught up with the kill
    // switch engaged while it was away.
    let body = eventually(
        "the gateway to see the kill switch engaged while the apiserver was away",
        Duration::from_secs(60),
        || async {
            let (status, body) = super::gateway::decide(&http, &url, &fresh, "run-2").await;
            (status == 200 && body["decision"] == "deny").then_some(body)
        },
    )
    .await;
    assert_eq!(body["code"], "KillSwitch", "{body}");
}
