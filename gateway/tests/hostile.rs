//! What an agent sends can never buy it budget, hide a call or make a refusal go unrecorded:
//! the attacks of issue 24 against the standalone gateway, each as a named test, and a property
//! test that no request body, however crafted, goes unanswered or unrecorded.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use proptest::prelude::*;
use serde_json::{Value, json};
use tollgate_audit::{AuditLog, Entry, Query, Redactor, SqliteStore, Store, WriterConfig, verify};
use tollgate_gateway::keys::Keys;
use tollgate_gateway::policies::{PolicySet, WatchedDir};
use tollgate_gateway::{self as gateway, Gateway, RefusalCode};
use tower::ServiceExt;

const KEY: &str = "support-key-1";
/// An approver's key, of a group no sample policy lists.
const OUTSIDER: &str = "outsider-key-1";

fn keys() -> Keys {
    use sha2::Digest;
    Keys::parse(&format!(
        "keys:\n  - {{name: support, agent: default/support-agent-v2, sha256: {}}}\n  - {{name: ghost, agent: default/nobody, sha256: {}}}\n  - {{name: olive, role: approver, groups: [finance], sha256: {}}}\n",
        hex::encode(sha2::Sha256::digest(KEY.as_bytes())),
        hex::encode(sha2::Sha256::digest(b"ghost-key")),
        hex::encode(sha2::Sha256::digest(OUTSIDER.as_bytes())),
    ))
    .unwrap()
}

fn samples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/samples")
}

struct Harness {
    app: axum::Router,
    store: Arc<SqliteStore>,
    _dir: tempfile::TempDir,
}

async fn harness_over(policies: WatchedDir) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("audit.db")).unwrap());
    let (log, _) = AuditLog::open(store.clone(), WriterConfig::new("hostile"))
        .await
        .unwrap();
    let gateway =
        Gateway::new(policies, keys(), log, Redactor::default()).with_history(store.clone());
    Harness {
        app: gateway::standalone_router(Arc::new(gateway)),
        store,
        _dir: dir,
    }
}

async fn harness() -> Harness {
    harness_over(WatchedDir::fixed(PolicySet::load(&samples()))).await
}

impl Harness {
    async fn send(&self, request: Request<Body>) -> (StatusCode, String) {
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    async fn post_bytes(&self, path: &str, key: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let request = Request::post(path)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"))
            .body(Body::from(body))
            .unwrap();
        let (status, text) = self.send(request).await;
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path} answered {status} with no JSON ({e}): {text}"));
        (status, body)
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.post_bytes(path, KEY, body.to_string().into_bytes())
            .await
    }

    async fn decide(&self, run: &str, tool: &str, arguments: Value) -> Value {
        let (status, body) = self
            .post(
                "/v1/decide",
                json!({"runId": run, "tool": tool, "arguments": arguments}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn report(&self, body: Value) -> (StatusCode, Value) {
        self.post("/v1/report", body).await
    }

    async fn records(&self) -> usize {
        self.store.query(&Query::default()).await.unwrap().len()
    }

    async fn audit(&self) -> Vec<Entry> {
        verify(self.store.as_ref(), true, &BTreeMap::new())
            .await
            .expect("the audit chain verifies");
        self.store
            .query(&Query::default())
            .await
            .unwrap()
            .iter()
            .map(|r| r.entry().unwrap())
            .collect()
    }
}

fn read() -> Value {
    json!({"customer_id": "C000042"})
}

#[tokio::test]
async fn a_negative_cost_cannot_refund_a_run() {
    let h = harness().await;
    let step = h.decide("neg", "read_customer_record", read()).await["step"].clone();
    let before = h.records().await;
    let (status, body) = h
        .report(
            json!({"runId": "neg", "step": step, "tool": "read_customer_record",
                       "usage": {"cost": "-100.00"}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "MalformedRequest");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("negative"),
        "{body}"
    );
    assert_eq!(h.records().await, before + 1, "the refusal is recorded");
    // The sample's run ceiling is $5.00: $50 reported halts the run; nothing was credited.
    let (status, body) = h
        .report(
            json!({"runId": "neg", "step": step, "tool": "read_customer_record",
                       "usage": {"cost": "50.00"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["counters"]["costUSD"], "50.00", "{body}");
    assert!(body.get("halted").is_some(), "{body}");
    assert_eq!(
        h.decide("neg", "read_customer_record", read()).await["decision"],
        "halt"
    );
    h.audit().await;
}

#[tokio::test]
async fn a_huge_cost_is_refused_with_an_answer_and_a_record_and_the_agent_still_works() {
    let h = harness().await;
    let step = h.decide("huge", "read_customer_record", read()).await["step"].clone();
    for cost in ["79228162514264337593543950335", "1000000.01", "1e30"] {
        let before = h.records().await;
        let (status, body) = h
            .report(
                json!({"runId": "huge", "step": step, "tool": "read_customer_record",
                           "usage": {"cost": cost}}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{cost}: {body}");
        assert_eq!(h.records().await, before + 1, "{cost}: recorded");
    }
    let (status, body) = h
        .report(
            json!({"runId": "huge", "step": step, "tool": "read_customer_record",
                       "usage": {"tokens": 1_000_000_001u64}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // The agent's other calls are decided as before.
    assert_eq!(
        h.decide("huge-2", "read_customer_record", read()).await["decision"],
        "allow"
    );
    h.audit().await;
}

#[tokio::test]
async fn a_result_for_a_refused_or_unknown_call_is_refused_and_recorded() {
    let h = harness().await;
    let denied = h.decide("rr", "delete_customer_record", read()).await;
    assert_eq!(denied["decision"], "deny");
    let allowed = h.decide("rr", "read_customer_record", read()).await;
    let cases = [
        // The denied call's step, with its tool.
        json!({"runId": "rr", "step": denied["step"], "tool": "delete_customer_record",
               "result": {"deleted": true}}),
        // The allowed step, named with another tool.
        json!({"runId": "rr", "step": allowed["step"], "tool": "delete_customer_record",
               "result": {"deleted": true}}),
        // A step the run never reached.
        json!({"runId": "rr", "step": 99, "tool": "read_customer_record", "result": {}}),
    ];
    for case in cases {
        let before = h.records().await;
        let (status, body) = h.report(case.clone()).await;
        assert_eq!(status, StatusCode::CONFLICT, "{case}: {body}");
        assert_eq!(body["error"]["code"], "UnknownStep", "{case}: {body}");
        assert_eq!(h.records().await, before + 1, "{case}: recorded");
    }
    // The allowed step is still reportable, once.
    let ok = json!({"runId": "rr", "step": allowed["step"], "tool": "read_customer_record",
                    "result": {"customer_id": "C000042"}});
    assert_eq!(h.report(ok.clone()).await.0, StatusCode::OK);
    assert_eq!(h.report(ok).await.1["error"]["code"], "UnknownStep");
    // Nothing of the refused reports reads as a result in the trail.
    let entries = h.audit().await;
    let results: Vec<_> = entries
        .iter()
        .filter(|e| e.event == tollgate_audit::Event::Report)
        .map(|e| (e.tool.clone().unwrap(), e.step))
        .collect();
    assert_eq!(
        results,
        [("read_customer_record".to_owned(), allowed["step"].as_u64())]
    );
}

#[tokio::test]
async fn every_refusal_code_leaves_a_record() {
    // Each code, made to happen; a new code fails to compile here until it has a case.
    let h = harness().await;
    h.decide("codes", "read_customer_record", read()).await;
    let (status, asked) = h
        .post(
            "/v1/decide",
            json!({"runId": "codes", "tool": "send_customer_email", "wait": false,
                   "arguments": {"customer_id": "C000042", "subject": "s", "body": "b"}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{asked}");
    let pending = asked["approvalRequest"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    for code in RefusalCode::ALL {
        let before = h.records().await;
        let (status, body) = match code {
            RefusalCode::Unauthenticated => {
                h.post_bytes("/v1/decide", "not-a-key", b"{}".to_vec())
                    .await
            }
            RefusalCode::MalformedRequest => h.post("/v1/decide", json!({"tool": 7})).await,
            RefusalCode::PayloadTooLarge => {
                h.post_bytes("/v1/decide", KEY, vec![b' '; gateway::MAX_BODY + 1])
                    .await
            }
            RefusalCode::UnknownRun => {
                h.report(json!({"runId": "never", "step": 1, "tool": "read_customer_record"}))
                    .await
            }
            RefusalCode::UnknownStep => {
                h.report(json!({"runId": "codes", "step": 42, "tool": "read_customer_record"}))
                    .await
            }
            // Needs a full desk: approvals.rs `a_full_desk_refuses_new_requests_and_records_it`.
            RefusalCode::NoApprovals => continue,
            // An approver's key is nobody's agent.
            RefusalCode::NotAnAgent => h.post_bytes("/v1/decide", OUTSIDER, b"{}".to_vec()).await,
            // An agent's key decides nothing.
            RefusalCode::NotAnApprover => {
                h.post_bytes(
                    "/v1/approvals/default/x",
                    KEY,
                    br#"{"verdict":"Approve"}"#.to_vec(),
                )
                .await
            }
            RefusalCode::UnknownApproval => {
                h.post_bytes(
                    "/v1/approvals/default/never-asked",
                    OUTSIDER,
                    br#"{"verdict":"Approve"}"#.to_vec(),
                )
                .await
            }
            // A request whose approvers are support-leads, approved by someone of finance.
            RefusalCode::DecisionRefused => {
                let (status, body) = h
                    .post_bytes(
                        &format!("/v1/approvals/default/{pending}"),
                        OUTSIDER,
                        br#"{"verdict":"Approve"}"#.to_vec(),
                    )
                    .await;
                assert!(
                    body["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("olive is not an approver of this request"),
                    "{body}"
                );
                (status, body)
            }
            RefusalCode::UnknownAgent => {
                h.post_bytes(
                    "/v1/report",
                    "ghost-key",
                    json!({"runId": "g", "step": 1, "tool": "t"})
                        .to_string()
                        .into_bytes(),
                )
                .await
            }
            // The LLM proxy, for an upstream that is not a model provider of the policy.
            RefusalCode::NotServed => {
                h.post("/llm/crm/chat/completions", json!({"model": "m"}))
                    .await
            }
            RefusalCode::NoPolicy | RefusalCode::PolicyInvalid => {
                // In their own directories, below.
                continue;
            }
            // Against an apiserver that does not answer, below.
            RefusalCode::AuthenticationUnavailable
            | RefusalCode::Misconfigured
            | RefusalCode::ClusterUnavailable => continue,
            // The one refusal that cannot be recorded: it says the trail takes no records
            // (when_the_trail_cannot_record_a_call_it_is_refused_never_allowed).
            RefusalCode::AuditUnavailable => continue,
            // Needs stdio servers to hold: mcp_stdio
            // `an_agent_holds_a_bounded_number_of_stdio_servers_and_the_refusal_is_recorded`.
            RefusalCode::SessionLimit => continue,
        };
        assert_eq!(
            body["error"]["code"],
            code.as_str(),
            "{code}: {status} {body}"
        );
        assert_eq!(h.records().await, before + 1, "{code}: recorded");
    }
    // NoPolicy and PolicyInvalid: an identity without a policy, and one whose policy is broken.
    for (code, policy) in [("NoPolicy", None), ("PolicyInvalid", Some("maxSteps: -1"))] {
        let dir = tempfile::tempdir().unwrap();
        let sample = std::fs::read_to_string(samples().join("support-agent.yaml")).unwrap();
        let text = match policy {
            Some(broken) => sample.replace("maxSteps: 25", broken),
            None => sample
                .split("\n---")
                .find(|doc| doc.contains("kind: AgentIdentity"))
                .unwrap()
                .to_owned(),
        };
        std::fs::write(dir.path().join("support.yaml"), text).unwrap();
        let h = harness_over(WatchedDir::fixed(PolicySet::load(dir.path()))).await;
        let before = h.records().await;
        let (status, body) = h
            .report(json!({"runId": "p", "step": 1, "tool": "read_customer_record"}))
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert_eq!(h.records().await, before + 1, "{code}: recorded");
        // A decision says the same, as a deny with the reason.
        let d = h.decide("p", "read_customer_record", read()).await;
        assert_eq!(d["code"], code, "{d}");
    }
}

/// A client of an apiserver that is not there: every call fails at once.
fn unreachable_apiserver() -> kube::Client {
    kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap()
}

/// The sample agents as a cluster would hold them, in namespace `default`.
fn sample_view() -> Arc<tollgate_runtime::cluster::StaticView> {
    let mut view = tollgate_runtime::cluster::StaticView::default();
    for file in ["support-agent.yaml", "deploy-agent.yaml"] {
        let text = std::fs::read_to_string(samples().join(file)).unwrap();
        for object in tollgate_engine::manifest::parse(&text) {
            match object.unwrap() {
                tollgate_engine::manifest::Object::Identity(mut identity) => {
                    identity.metadata.namespace = Some("default".into());
                    view.identities.push(Arc::new(*identity));
                }
                tollgate_engine::manifest::Object::Policy(mut policy) => {
                    policy.metadata.namespace = Some("default".into());
                    view.policies.push(Arc::new(*policy));
                }
                _ => {}
            }
        }
    }
    Arc::new(view)
}

async fn harness_of(gateway: Gateway, store: Arc<SqliteStore>, dir: tempfile::TempDir) -> Harness {
    Harness {
        app: gateway::router(Arc::new(gateway)),
        store,
        _dir: dir,
    }
}

async fn trail() -> (AuditLog, Arc<SqliteStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("audit.db")).unwrap());
    let (log, _) = AuditLog::open(store.clone(), WriterConfig::new("hostile"))
        .await
        .unwrap();
    (log, store, dir)
}

#[tokio::test]
async fn refusals_for_a_cluster_that_cannot_be_reached_are_recorded_too() {
    tollgate_runtime::server::install_crypto_provider();
    // Misconfigured: token authentication over a policy directory.
    let (log, store, dir) = trail().await;
    let reviewer = gateway::TokenReviewer::new(unreachable_apiserver());
    let policies = WatchedDir::fixed(PolicySet::load(&samples()));
    let h = harness_of(
        Gateway::new(policies, reviewer, log, Redactor::default()),
        store,
        dir,
    )
    .await;
    let (status, body) = h
        .post("/v1/decide", json!({"runId": "c", "tool": "t"}))
        .await;
    assert_eq!(body["error"]["code"], "Misconfigured", "{status} {body}");
    assert_eq!(h.records().await, 1);

    // AuthenticationUnavailable: the token cannot be reviewed.
    let (log, store, dir) = trail().await;
    let cluster = gateway::ClusterPolicies::new(sample_view(), unreachable_apiserver());
    let reviewer = gateway::TokenReviewer::new(unreachable_apiserver());
    let h = harness_of(
        Gateway::new(
            gateway::Policies::Cluster(cluster),
            reviewer,
            log,
            Redactor::default(),
        ),
        store,
        dir,
    )
    .await;
    let (status, body) = h
        .post("/v1/decide", json!({"runId": "c", "tool": "t"}))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "AuthenticationUnavailable", "{body}");
    assert_eq!(h.records().await, 1);

    // ClusterUnavailable: an approval to redeem that cannot be read.
    let (log, store, dir) = trail().await;
    let cluster = gateway::ClusterPolicies::new(sample_view(), unreachable_apiserver());
    let h = harness_of(
        Gateway::new(
            gateway::Policies::Cluster(cluster),
            keys(),
            log,
            Redactor::default(),
        ),
        store,
        dir,
    )
    .await;
    let (status, body) = h
        .post(
            "/v1/decide",
            json!({"runId": "c", "tool": "send_customer_email", "approval": "ar-1",
                   "arguments": {"customer_id": "C000042", "subject": "s", "body": "b"}}),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "ClusterUnavailable", "{body}");
    let entries = h.audit().await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(
        entries[0]
            .error
            .as_deref()
            .unwrap()
            .contains("ClusterUnavailable"),
        "{:?}",
        entries[0].error
    );
}

/// An apiserver that takes connections and never answers: a narrow stand-in for a hung one.
async fn hung_apiserver() -> kube::Client {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap()
}

/// A gateway over the sample agents whose apiserver never answers, authenticating with `auth`.
async fn over_a_hung_apiserver(auth: impl Into<gateway::Auth>) -> Harness {
    let (log, store, dir) = trail().await;
    let cluster = gateway::ClusterPolicies::new(sample_view(), hung_apiserver().await);
    let gateway = Gateway::new(
        gateway::Policies::Cluster(cluster),
        auth,
        log,
        Redactor::default(),
    );
    harness_of(gateway, store, dir).await
}

#[tokio::test]
async fn calls_to_an_apiserver_that_never_answers_are_refused_within_the_deadline() {
    tollgate_runtime::server::install_crypto_provider();
    let deadline = tollgate_runtime::cluster::CALL_DEADLINE + Duration::from_secs(3);
    // A token to review, and (with a key) an approval to redeem: each needs the apiserver.
    let reviewing = async {
        let h = over_a_hung_apiserver(gateway::TokenReviewer::new(hung_apiserver().await)).await;
        let answer = tokio::time::timeout(
            deadline,
            h.post("/v1/decide", json!({"runId": "c", "tool": "t"})),
        )
        .await
        .expect("a TokenReview the apiserver never answers is given up");
        (answer, h.records().await)
    };
    let redeeming = async {
        let h = over_a_hung_apiserver(keys()).await;
        let answer = tokio::time::timeout(
            deadline,
            h.post(
                "/v1/decide",
                json!({"runId": "c", "tool": "send_customer_email", "approval": "ar-1",
                       "arguments": {"customer_id": "C000042", "subject": "s", "body": "b"}}),
            ),
        )
        .await
        .expect("an ApprovalRequest read the apiserver never answers is given up");
        (answer, h.records().await)
    };
    let (((status, body), records), ((status2, body2), records2)) =
        tokio::join!(reviewing, redeeming);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "AuthenticationUnavailable", "{body}");
    assert_eq!(records, 1, "the refusal is recorded");
    assert_eq!(status2, StatusCode::SERVICE_UNAVAILABLE, "{body2}");
    assert_eq!(body2["error"]["code"], "ClusterUnavailable", "{body2}");
    assert_eq!(records2, 1, "the refusal is recorded");
}

#[tokio::test]
async fn a_policy_change_is_in_force_for_the_very_next_call() {
    let dir = tempfile::tempdir().unwrap();
    let sample = std::fs::read_to_string(samples().join("support-agent.yaml")).unwrap();
    let file = dir.path().join("support.yaml");
    std::fs::write(&file, &sample).unwrap();
    // A poll interval of an hour: only file-system events can make the change visible in time.
    let h = harness_over(WatchedDir::start(
        dir.path().to_owned(),
        Duration::from_secs(3600),
    ))
    .await;
    let probe = |h: &Harness| {
        let request = Request::get("/readyz").body(Body::empty()).unwrap();
        let app = h.app.clone();
        async move {
            let response = app.oneshot(request).await.unwrap();
            let status = response.status();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&bytes).into_owned())
        }
    };
    assert_eq!(probe(&h).await.0, StatusCode::OK);
    for round in 0..20 {
        let run = format!("edit-{round}");
        assert_eq!(
            h.decide(&run, "read_customer_record", read()).await["decision"],
            "allow"
        );
        std::fs::remove_file(&file).unwrap();
        let d = h.decide(&run, "read_customer_record", read()).await;
        assert_eq!(
            d["code"], "NoPolicy",
            "round {round}: right after the delete: {d}"
        );
        std::fs::write(&file, &sample).unwrap();
        assert_eq!(
            h.decide(&run, "read_customer_record", read()).await["decision"],
            "allow",
            "round {round}: right after the write"
        );
    }
    // A misspelt field: the caller and /readyz get the parse error, not "no AgentPolicy".
    std::fs::write(&file, sample.replace("maxSteps: 25", "maxStepz: 25")).unwrap();
    let d = h.decide("bad", "read_customer_record", read()).await;
    assert_eq!(d["code"], "PolicyInvalid", "{d}");
    assert!(d["message"].as_str().unwrap().contains("maxStepz"), "{d}");
    let (status, text) = probe(&h).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.contains("maxStepz"), "{text}");
    // Bad YAML too.
    std::fs::write(&file, "apiVersion: [unclosed").unwrap();
    let d = h.decide("bad", "read_customer_record", read()).await;
    assert_eq!(d["code"], "PolicyInvalid", "{d}");
    assert!(
        d["message"].as_str().unwrap().contains("support.yaml"),
        "{d}"
    );
    h.audit().await;
}

fn hostile_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("JSON has no NaN", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "[-0-9.eE]{0,40}".prop_map(Value::String),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn hostile_body() -> impl Strategy<Value = (bool, Vec<u8>)> {
    let field = |name: &'static str| {
        prop_oneof![
            Just(None),
            hostile_value().prop_map(move |v| Some((name, v))),
        ]
    };
    let structured = (
        any::<bool>(),
        field("runId"),
        field("step"),
        field("tool"),
        field("arguments"),
        field("result"),
        prop_oneof![
            Just(None),
            ("[-0-9.eE]{0,32}", any::<u64>(), hostile_value()).prop_map(|(cost, tokens, extra)| {
                Some(("usage", json!({"cost": cost, "tokens": tokens, "x": extra})))
            }),
            ("[-0-9.]{0,32}").prop_map(|cost| Some(("usage", json!({"cost": cost})))),
        ],
    )
        .prop_map(|(report, a, b, c, d, e, f)| {
            let mut body = serde_json::Map::new();
            for (name, value) in [a, b, c, d, e, f].into_iter().flatten() {
                body.insert(name.to_owned(), value);
            }
            (report, Value::Object(body).to_string().into_bytes())
        });
    prop_oneof![
        4 => structured,
        1 => (any::<bool>(), prop::collection::vec(any::<u8>(), 0..64)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    /// No request body, however crafted, makes the gateway drop the connection: every request
    /// gets a JSON answer and leaves at least one record, and the chain verifies.
    #[test]
    fn every_hostile_body_gets_an_answer_and_a_record(bodies in prop::collection::vec(hostile_body(), 1..6)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let h = harness().await;
            // A released call, so reports reach the budget code.
            h.decide("1", "read_customer_record", read()).await;
            for (report, body) in bodies {
                let path = if report { "/v1/report" } else { "/v1/decide" };
                let before = h.records().await;
                let request = Request::post(path)
                    .header("authorization", format!("Bearer {KEY}"))
                    .header("tollgate-run-id", "1")
                    .body(Body::from(body.clone()))
                    .unwrap();
                let (status, text) = h.send(request).await;
                let answer: Result<Value, _> = serde_json::from_str(&text);
                assert!(answer.is_ok(), "{path} {status}: {text}");
                assert!(
                    [200, 202, 400, 409].contains(&status.as_u16()),
                    "{path} {status}: {text}"
                );
                assert!(h.records().await > before, "{path}: {}", String::from_utf8_lossy(&body));
            }
            h.audit().await;
        });
    }
}

#[tokio::test]
async fn rotating_run_ids_keeps_memory_bounded_and_a_dropped_run_keeps_its_budget() {
    // An agent may send any number of run ids: past the limit the least recently used runs leave
    // memory, and one that comes back is rebuilt from the trail with everything it had used.
    let (log, store, dir) = trail().await;
    let gateway = Arc::new(
        Gateway::new(
            WatchedDir::fixed(PolicySet::load(&samples())),
            keys(),
            log,
            Redactor::default(),
        )
        .with_history(store.clone())
        .with_run_limit(50),
    );
    let h = Harness {
        app: gateway::router(gateway.clone()),
        store,
        _dir: dir,
    };
    for _ in 0..24 {
        assert_eq!(
            h.decide("long", "read_customer_record", read()).await["decision"],
            "allow"
        );
    }
    let (status, _) = h
        .report(
            json!({"runId": "long", "step": 24, "tool": "read_customer_record",
                       "usage": {"tokens": 40000}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    for i in 0..1_000 {
        // Past the sample's 100 runs per hour these are halted, and still runs to hold.
        h.decide(&format!("rotated-{i}"), "read_customer_record", read())
            .await;
        assert!(
            gateway.runs_in_memory() <= 50,
            "{}",
            gateway.runs_in_memory()
        );
    }
    // "long" left memory long ago; its 24 steps and 40,000 tokens come back from the trail.
    let step = h.decide("long", "read_customer_record", read()).await;
    assert_eq!(step["decision"], "allow", "{step}");
    assert_eq!(step["step"], 25, "{step}");
    let (_, body) = h
        .report(
            json!({"runId": "long", "step": 25, "tool": "read_customer_record",
                       "usage": {"tokens": 20000}}),
        )
        .await;
    assert_eq!(body["counters"]["tokens"], 60000, "{body}");
    assert_eq!(
        body["halted"]["clause"], "spec.execution.maxTokensPerRun",
        "{body}"
    );
    // A run never started is still no run to report on.
    let (status, body) = h
        .report(json!({"runId": "never", "step": 1, "tool": "read_customer_record"}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("UnknownRun"))
    );
}

/// An apiserver that answers every TokenReview "not authenticated", counting them.
async fn refusing_apiserver() -> (kube::Client, Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let reviews = Arc::new(AtomicU64::new(0));
    let counted = reviews.clone();
    let app = axum::Router::new().route(
        "/apis/authentication.k8s.io/v1/tokenreviews",
        axum::routing::post(move || {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                axum::Json(json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                    "spec": {}, "status": {"authenticated": false, "error": "invalid bearer token"}}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    (client, reviews)
}

#[tokio::test]
async fn a_refused_token_repeated_costs_the_apiserver_one_review_per_interval() {
    use std::sync::atomic::Ordering;
    tollgate_runtime::server::install_crypto_provider();
    for (ttl, expected) in [(Duration::from_secs(60), 2), (Duration::ZERO, 6)] {
        let (client, reviews) = refusing_apiserver().await;
        let (log, store, dir) = trail().await;
        let cluster = gateway::ClusterPolicies::new(sample_view(), unreachable_apiserver());
        let reviewer = gateway::TokenReviewer::new(client).with_refused_ttl(ttl);
        let h = harness_of(
            Gateway::new(
                gateway::Policies::Cluster(cluster),
                reviewer,
                log,
                Redactor::default(),
            )
            .with_anonymous_interval(Duration::from_millis(200)),
            store,
            dir,
        )
        .await;
        for token in [
            "bad-token-1",
            "bad-token-1",
            "bad-token-1",
            "bad-token-1",
            "bad-token-2",
            "bad-token-2",
        ] {
            let (status, body) = h
                .post_bytes("/v1/decide", token, b"{\"tool\": \"t\"}".to_vec())
                .await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("invalid bearer token"),
                "{body}"
            );
        }
        assert_eq!(reviews.load(Ordering::SeqCst), expected, "ttl {ttl:?}");
        // Every refusal is still recorded: the first in full, the other five in the interval's
        // summary (a token nobody issued proves no identity).
        tokio::time::sleep(Duration::from_millis(600)).await;
        let entries = h.audit().await;
        assert_eq!(entries.len(), 2, "{entries:?}");
        assert!(
            entries[1]
                .error
                .as_deref()
                .is_some_and(|e| e.starts_with("/v1/decide: Unauthenticated: 5 more refused")),
            "{entries:?}"
        );
    }
}
