//! The decision API in process, on a real SQLite audit store: every path, and the attacks
//! SECURITY.md names, each as its own test. Every test ends by verifying the audit chain and
//! checking what it recorded.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tollgate_audit::{AuditLog, Entry, Query, Redactor, SqliteStore, Store, WriterConfig, verify};
use tollgate_gateway::keys::Keys;
use tollgate_gateway::policies::{PolicySet, WatchedDir};
use tollgate_gateway::{self as gateway, Gateway};
use tollgate_runtime::metrics::Metrics;
use tower::ServiceExt;

const SUPPORT_KEY: &str = "support-key-1";
const DEPLOY_KEY: &str = "deploy-key-1";

fn sha(key: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

fn keys() -> Keys {
    Keys::parse(&format!(
        "keys:\n  - {{name: support, agent: default/support-agent-v2, sha256: {}}}\n  - {{name: deploy, agent: default/deploy-agent, sha256: {}}}\n",
        sha(SUPPORT_KEY),
        sha(DEPLOY_KEY)
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

async fn harness_with(policies: WatchedDir) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("audit.db")).unwrap());
    // Wired as `tollgate-gateway standalone` wires them: the audit writer reports its batches
    // to the gateway's metrics.
    let metrics = Metrics::default();
    let (log, _) = AuditLog::open(
        store.clone(),
        WriterConfig::new("gw-test").with_observer(Arc::new(metrics.clone())),
    )
    .await
    .unwrap();
    let gateway = Arc::new(
        Gateway::new(policies, keys(), log, Redactor::default())
            .with_metrics(metrics)
            .with_anonymous_interval(ANONYMOUS_INTERVAL),
    );
    Harness {
        app: gateway::standalone_router(gateway),
        store,
        _dir: dir,
    }
}

/// How often these gateways summarize refusals of requests that proved no identity.
const ANONYMOUS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

async fn harness() -> Harness {
    harness_with(WatchedDir::fixed(PolicySet::load(&samples()))).await
}

impl Harness {
    async fn post_raw(
        &self,
        path: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let mut request = Request::post(path).header("content-type", "application/json");
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = self
            .app
            .clone()
            .oneshot(request.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    async fn post(&self, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        self.post_raw(path, Some(key), &[], body.to_string().into_bytes())
            .await
    }

    async fn decide(&self, run: &str, tool: &str, arguments: Value) -> Value {
        let (status, body) = self
            .post(
                "/v1/decide",
                SUPPORT_KEY,
                json!({"runId": run, "tool": tool, "arguments": arguments}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// GET /metrics, as text.
    async fn metrics(&self) -> String {
        let response = self
            .app
            .clone()
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// Verifies the chain and returns every recorded entry.
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

#[tokio::test]
async fn every_decision_path_answers_and_is_recorded() {
    let h = harness().await;
    let allowed = h
        .decide(
            "r1",
            "read_customer_record",
            json!({"customer_id": "C000042"}),
        )
        .await;
    assert_eq!(allowed["decision"], "allow");
    assert_eq!(allowed["step"], 1);
    assert_eq!(allowed["audit"]["seq"], 1);

    let blocked = h
        .decide(
            "r1",
            "delete_customer_record",
            json!({"customer_id": "C000042"}),
        )
        .await;
    assert_eq!(
        (blocked["decision"].as_str(), blocked["code"].as_str()),
        (Some("deny"), Some("ToolBlocked"))
    );
    assert_eq!(blocked["rule"]["clause"], "spec.tools.blocked");

    let breach = h
        .decide("r1", "read_customer_record", json!({"customer_id": "42"}))
        .await;
    assert_eq!(breach["code"], "ArgumentConstraint", "{breach}");

    // Asked without waiting: 202 at once, naming the ApprovalRequest people decide.
    let (status, approval) = h
        .post(
            "/v1/decide",
            SUPPORT_KEY,
            json!({"runId": "r1", "tool": "send_customer_email", "wait": false,
                   "arguments": {"customer_id": "C000042", "subject": "Refund", "body": "Done."}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{approval}");
    assert_eq!(approval["decision"], "requireApproval");
    assert_eq!(
        approval["approvalRequest"]["namespace"], "default",
        "{approval}"
    );
    assert!(
        approval["approvalRequest"]["name"]
            .as_str()
            .unwrap()
            .starts_with("send-customer-email-"),
        "{approval}"
    );
    assert!(
        approval["approval"]["argumentsDigest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );

    // The result comes back cut to resultFields; the usage counts.
    let (status, reported) = h
        .post(
            "/v1/report",
            SUPPORT_KEY,
            json!({"runId": "r1", "step": 1, "tool": "read_customer_record",
                   "result": {"customer_id": "C000042", "ssn": "123-45-6789", "apiToken": "t-1"},
                   "usage": {"tokens": 100, "cost": "0.01"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{reported}");
    assert_eq!(reported["result"], json!({"customer_id": "C000042"}));
    assert_eq!(reported["withheldFields"], json!(["apiToken", "ssn"]));

    // A breach halts the run; it is never retried.
    let again = h
        .decide(
            "r1",
            "read_customer_record",
            json!({"customer_id": "C000042"}),
        )
        .await;
    assert_eq!(again["step"], 5, "{again}");
    let (_, halted) = h
        .post(
            "/v1/report",
            SUPPORT_KEY,
            json!({"runId": "r1", "step": 5, "tool": "read_customer_record", "usage": {"tokens": 60000}}),
        )
        .await;
    assert_eq!(halted["halted"]["clause"], "spec.execution.maxTokensPerRun");
    let after = h
        .decide(
            "r1",
            "read_customer_record",
            json!({"customer_id": "C000042"}),
        )
        .await;
    assert_eq!(after["decision"], "halt");

    let entries = h.audit().await;
    let kinds: Vec<(&str, Option<String>)> = entries
        .iter()
        .map(|e| (e.event.as_str(), e.outcome()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("decide", Some("allow".into())),
            ("decide", Some("deny:ToolBlocked".into())),
            ("decide", Some("deny:ArgumentConstraint".into())),
            ("decide", Some("requireApproval".into())),
            ("approval", Some("pending".into())),
            ("report", None),
            ("decide", Some("allow".into())),
            ("report", None),
            ("halt", None),
            ("decide", Some("halt".into())),
        ]
    );
    let first = &entries[0];
    assert_eq!(first.identity.username, "apikey:support");
    assert_eq!(first.agent.as_deref(), Some("default/support-agent-v2"));
    assert!(first.policy.as_ref().unwrap().hash.starts_with("sha256:"));
    assert_eq!(first.counters.as_ref().unwrap().steps, 1);
    // The secret in the reported result is redacted in the trail; the digest covers it whole.
    let report = &entries[5];
    assert_eq!(report.result.as_ref().unwrap()["apiToken"], "[REDACTED]");
    assert!(report.result_digest.is_some());
}

#[tokio::test]
async fn a_key_for_one_agent_cannot_act_as_another() {
    let h = harness().await;
    // A body field naming another agent is refused outright, and recorded.
    let (status, body) = h
        .post(
            "/v1/decide",
            SUPPORT_KEY,
            json!({"runId": "r1", "tool": "read_customer_record", "agent": "default/deploy-agent",
                   "arguments": {"customer_id": "C000042"}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `agent`"),
        "{body}"
    );
    // Headers claiming another identity are ignored: the decision is the key's agent's.
    let (status, body) = h
        .post_raw(
            "/v1/decide",
            Some(SUPPORT_KEY),
            &[
                ("x-tollgate-agent", "default/deploy-agent"),
                ("impersonate-user", "system:serviceaccount:default:agent-deploy-agent"),
            ],
            json!({"runId": "r2", "tool": "read_customer_record", "arguments": {"customer_id": "C000042"}})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["rule"]["policy"], "support-agent-v2");
    let entries = h.audit().await;
    assert_eq!(entries[0].event.as_str(), "rejected");
    assert_eq!(
        entries[0].agent.as_deref(),
        Some("default/support-agent-v2")
    );
    assert!(
        entries
            .iter()
            .all(|e| e.agent.as_deref() == Some("default/support-agent-v2"))
    );
}

#[tokio::test]
async fn unauthenticated_malformed_and_oversized_requests_are_refused_and_recorded() {
    let h = harness().await;
    let call = json!({"runId": "r1", "tool": "read_customer_record"})
        .to_string()
        .into_bytes();
    let (status, body) = h.post_raw("/v1/decide", None, &[], call.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "Unauthenticated");
    let (status, _) = h
        .post_raw("/v1/decide", Some("guessed-key"), &[], call.clone())
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    for (bytes, needle) in [
        (
            b"{\"runId\":\"r1\",\"tool\":\"a\",\"tool\":\"b\"}".to_vec(),
            "duplicate key",
        ),
        (b"{\"runId\":\"r1\"".to_vec(), "EOF"),
        (b"[]".to_vec(), "must be a JSON object"),
        (b"{\"runId\":\"r1\",\"tool\":\"a\"} {}".to_vec(), "trailing"),
    ] {
        let (status, body) = h
            .post_raw("/v1/decide", Some(SUPPORT_KEY), &[], bytes)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(needle),
            "{needle}: {body}"
        );
    }
    let (status, body) = h
        .post_raw(
            "/v1/decide",
            Some(SUPPORT_KEY),
            &[],
            vec![b' '; gateway::MAX_BODY + 1],
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");

    // Run ids: required, well-formed, and the header and body must agree.
    let (status, body) = h
        .post(
            "/v1/decide",
            SUPPORT_KEY,
            json!({"tool": "read_customer_record"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("run id is required")
    );
    let (status, _) = h
        .post(
            "/v1/decide",
            SUPPORT_KEY,
            json!({"runId": "r 1\n", "tool": "read_customer_record"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = h
        .post_raw(
            "/v1/decide",
            Some(SUPPORT_KEY),
            &[("tollgate-run-id", "r2")],
            json!({"runId": "r1", "tool": "read_customer_record"})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("disagree")
    );

    // The first anonymous refusal is recorded at once; the second, of the same interval, is
    // counted and recorded in the interval's summary once it ends.
    tokio::time::sleep(ANONYMOUS_INTERVAL * 3).await;
    let entries = h.audit().await;
    assert_eq!(entries.len(), 10, "every refusal is recorded");
    assert!(entries.iter().all(|e| e.event.as_str() == "rejected"));
    assert_eq!(entries[0].identity.username, "anonymous");
    let errors: Vec<&str> = entries.iter().filter_map(|e| e.error.as_deref()).collect();
    assert!(
        errors.iter().any(|e| e.contains("duplicate key")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("/v1/decide: Unauthenticated: 1 more refused")),
        "{errors:?}"
    );
}

#[tokio::test]
async fn a_flood_without_a_credential_is_all_refused_and_costs_the_trail_a_record_per_interval() {
    let h = harness().await;
    let call = json!({"runId": "r1", "tool": "read_customer_record"})
        .to_string()
        .into_bytes();
    let started = std::time::Instant::now();
    for i in 0..1_000 {
        let key = format!("guessed-key-{i}");
        let (status, body) = h
            .post_raw("/v1/decide", Some(&key), &[], call.clone())
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["error"]["code"], "Unauthenticated");
    }
    let intervals = (started.elapsed().as_millis() / ANONYMOUS_INTERVAL.as_millis()) as usize + 2;
    // An agent's refusals are still recorded one by one, at once.
    let (status, _) = h
        .post_raw("/v1/decide", Some(SUPPORT_KEY), &[], b"[]".to_vec())
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let agents = |entries: &[tollgate_audit::Entry]| {
        entries
            .iter()
            .filter(|e| e.identity.username != "anonymous")
            .count()
    };
    assert_eq!(
        agents(&h.audit().await),
        1,
        "the agent's refusal, recorded at once"
    );
    tokio::time::sleep(ANONYMOUS_INTERVAL * 3).await;
    let entries = h.audit().await;
    let anonymous: Vec<&str> = entries
        .iter()
        .filter(|e| e.identity.username == "anonymous")
        .filter_map(|e| e.error.as_deref())
        .collect();
    // Each refusal is in the trail: in full (the first of an interval) or counted in a summary.
    let in_full = anonymous
        .iter()
        .filter(|e| !e.contains(" more refused from "))
        .count();
    let summarized: u64 = anonymous
        .iter()
        .filter_map(|e| e.strip_prefix("/v1/decide: Unauthenticated: "))
        .filter(|e| e.contains(" more refused from "))
        .filter_map(|e| e.split(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(in_full as u64 + summarized, 1_000, "{anonymous:?}");
    // ... at the cost of two records an interval at most, not one a request.
    assert!(
        anonymous.len() <= 2 * intervals,
        "{} records for 1,000 refusals over {intervals} intervals",
        anonymous.len()
    );
}

#[tokio::test]
async fn tool_name_tricks_are_denied() {
    let h = harness().await;
    for tool in [
        "read_customer_record ",
        "READ_CUSTOMER_RECORD",
        "read_customer_record\u{0}",
        "read_customer_rec\u{043e}rd", // Cyrillic o
        "crm/read_customer_record",
        "*",
        "",
    ] {
        let decision = h
            .decide("r1", tool, json!({"customer_id": "C000042"}))
            .await;
        assert_eq!(decision["decision"], "deny", "{tool:?}: {decision}");
    }
    // A blocked tool stays blocked under any spelling that reaches the engine.
    let decision = h.decide("r1", "delete_customer_record", json!({})).await;
    assert_eq!(decision["code"], "ToolBlocked");
}

#[tokio::test]
async fn parallel_calls_cannot_race_past_a_ceiling() {
    // maxSteps 25 on the support sample: 100 calls at once in one run, exactly 25 evaluated
    // before the ceiling.
    let h = Arc::new(harness().await);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            h.decide(
                "race",
                "read_customer_record",
                json!({"customer_id": "C000042"}),
            )
            .await["decision"]
                .as_str()
                .unwrap()
                .to_owned()
        }));
    }
    let mut allowed = 0;
    for task in tasks {
        if task.await.unwrap() == "allow" {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 25);
}

#[tokio::test]
async fn rotating_run_ids_does_not_escape_the_identity_window() {
    // perIdentity maxRuns 100 per hour on the support sample: the 101st run is refused.
    let h = harness().await;
    for run in 0..100 {
        let d = h
            .decide(
                &format!("run-{run}"),
                "read_customer_record",
                json!({"customer_id": "C000042"}),
            )
            .await;
        assert_eq!(d["decision"], "allow", "{d}");
    }
    let d = h
        .decide(
            "run-100",
            "read_customer_record",
            json!({"customer_id": "C000042"}),
        )
        .await;
    assert_eq!(d["decision"], "halt", "{d}");
    assert_eq!(d["rule"]["clause"], "spec.execution.perIdentity.maxRuns");
}

#[tokio::test]
async fn a_broken_policy_denies_with_its_reason_and_edits_take_effect_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let sample = std::fs::read_to_string(samples().join("support-agent.yaml")).unwrap();
    std::fs::write(dir.path().join("support.yaml"), &sample).unwrap();
    let h = harness_with(WatchedDir::start(
        dir.path().to_owned(),
        Duration::from_millis(50),
    ))
    .await;
    let args = json!({"customer_id": "C000042"});
    assert_eq!(
        h.decide("r1", "read_customer_record", args.clone()).await["decision"],
        "allow"
    );

    // A policy that no longer compiles: the agent is denied with the reason, not left on the
    // previous version.
    std::fs::write(
        dir.path().join("support.yaml"),
        sample.replace("maxSteps: 25", "maxSteps: -1"),
    )
    .unwrap();
    let d = wait_for(&h, "r1", |d| d["code"] == "PolicyInvalid").await;
    assert!(
        d["message"].as_str().unwrap().contains("does not compile"),
        "{d}"
    );

    // The kill switch engaged in the file: the next call is denied.
    std::fs::write(
        dir.path().join("support.yaml"),
        sample.replacen(
            "\n  credentials:",
            "\n  killSwitch: {engaged: true}\n  credentials:",
            1,
        ),
    )
    .unwrap();
    wait_for(&h, "r2", |d| d["code"] == "KillSwitch").await;
    h.audit().await;
}

async fn wait_for(h: &Harness, run: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..100 {
        let d = h
            .decide(
                run,
                "read_customer_record",
                json!({"customer_id": "C000042"}),
            )
            .await;
        if done(&d) {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway did not pick up the change");
}

#[test]
fn key_files_name_what_is_wrong() {
    let err = Keys::parse("keys:\n  - {name: a, agent: default/x, sha256: nothex}\n").unwrap_err();
    assert!(err.contains("keys[0].sha256"), "{err}");
    let err = Keys::parse(&format!(
        "keys:\n  - {{name: a, agent: x, sha256: {}}}\n",
        sha("k")
    ))
    .unwrap_err();
    assert!(err.contains("keys[0].agent"), "{err}");
    let err = Keys::parse("keys:\n  - {name: a, agent: default/x, sha256: 00, rights: all}\n")
        .unwrap_err();
    assert!(err.contains("unknown field `rights`"), "{err}");
    let err = Keys::parse("keys:\n  - {name: a, agent: default/x, sha256: 00, role: admin}\n")
        .unwrap_err();
    assert!(
        err.contains("unknown variant `admin`, expected `agent` or `approver`"),
        "{err}"
    );
    // An approver's key acts as no agent; an agent's key has no groups; a person is named.
    let key = sha("k");
    for (entry, wrong) in [
        (
            format!("{{name: dana, role: approver, agent: default/x, sha256: {key}}}"),
            "keys[0].agent: an approver's key acts as no agent",
        ),
        (
            format!("{{name: a, agent: default/x, groups: [leads], sha256: {key}}}"),
            "keys[0].groups: only an approver's key",
        ),
        (
            format!("{{name: a, sha256: {key}}}"),
            "keys[0].agent: an agent's key names the AgentIdentity",
        ),
        (
            format!("{{name: 'apikey:support', role: approver, sha256: {key}}}"),
            "keys[0].name: \"apikey:support\" is reserved",
        ),
        (
            format!("{{name: ' ', role: approver, sha256: {key}}}"),
            "keys[0].name: must not be empty",
        ),
    ] {
        let err = Keys::parse(&format!("keys:\n  - {entry}\n")).unwrap_err();
        assert!(err.contains(wrong), "{entry}: {err}");
    }
    let approver = Keys::parse(&format!(
        "keys:\n  - {{name: dana, role: approver, groups: [leads], sha256: {key}}}\n"
    ))
    .unwrap();
    let dana = approver.holder("k").unwrap();
    assert_eq!(
        (dana.role, dana.agent.as_str(), dana.groups.as_slice()),
        (
            gateway::keys::Role::Approver,
            "",
            ["leads".to_owned()].as_slice()
        )
    );
    assert!(keys().holder(SUPPORT_KEY).is_some());
    assert!(keys().holder("support-key-2").is_none());
}

#[tokio::test]
async fn the_openapi_document_matches_what_the_gateway_accepts() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/gateway.yaml"))
            .unwrap();
    let doc: Value = serde_yaml::from_str(&text).unwrap();
    let fields = |schema: &str| -> Vec<String> {
        let mut names: Vec<String> = doc["components"]["schemas"][schema]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        fields("DecideRequest"),
        ["approval", "arguments", "runId", "tool", "wait"]
    );
    // Every code a refusal can carry is documented, and nothing else.
    let documented: Vec<&str> = doc["components"]["responses"]["Refused"]["content"]
        ["application/json"]["schema"]["properties"]["error"]["properties"]["code"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let codes: Vec<&str> = tollgate_gateway::RefusalCode::ALL
        .iter()
        .map(|c| c.as_str())
        .collect();
    assert_eq!(documented, codes);
    // Both optional fields are accepted; an approval that was never asked for releases nothing
    // (recorded as a refused redemption).
    let h = harness().await;
    let (status, body) = h
        .post(
            "/v1/decide",
            SUPPORT_KEY,
            json!({"runId": "o1", "tool": "read_customer_record",
                   "arguments": {"customer_id": "C000042"}, "wait": false}),
        )
        .await;
    assert_eq!(
        (status, &body["decision"]),
        (StatusCode::OK, &json!("allow"))
    );
    let (status, body) = h
        .post(
            "/v1/decide",
            SUPPORT_KEY,
            json!({"runId": "o1", "tool": "send_customer_email", "arguments": {}, "approval": "x"}),
        )
        .await;
    assert_eq!(
        (status, &body["decision"], &body["code"]),
        (StatusCode::OK, &json!("deny"), &json!("ApprovalDenied")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("there is no ApprovalRequest default/x"),
        "{body}"
    );
    assert_eq!(
        fields("ReportRequest"),
        ["error", "result", "runId", "step", "tool", "usage"]
    );
    assert_eq!(fields("ApprovalDecision"), ["comment", "verdict"]);
    // The documented example is accepted as it stands.
    let example = doc["paths"]["/v1/decide"]["post"]["requestBody"]["content"]["application/json"]
        ["example"]
        .clone();
    let h = harness().await;
    let (status, body) = h.post("/v1/decide", SUPPORT_KEY, example).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["decision"], "allow");
    // Every deny code the document lists is one the engine can give.
    for code in doc["components"]["schemas"]["Decision"]["properties"]["code"]["enum"]
        .as_array()
        .unwrap()
    {
        serde_json::from_value::<tollgate_engine::DenyCode>(code.clone()).unwrap_or_else(|e| {
            panic!("the document lists {code}, which the engine never gives: {e}")
        });
    }
}

/// Every object schema of a request body, with its path in the document.
fn request_objects(doc: &Value) -> Vec<(String, Value)> {
    fn walk(doc: &Value, at: String, schema: &Value, out: &mut Vec<(String, Value)>) {
        if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            let name = reference.trim_start_matches("#/components/schemas/");
            return walk(doc, at, &doc["components"]["schemas"][name], out);
        }
        if schema.get("type") == Some(&json!("object")) {
            out.push((at.clone(), schema.clone()));
        }
        if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
            for (name, property) in properties {
                walk(doc, format!("{at}.{name}"), property, out);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(doc, format!("{at}[]"), items, out);
        }
    }
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            if let Some(schema) = operation.pointer("/requestBody/content/application~1json/schema")
            {
                walk(doc, format!("{method} {path}"), schema, &mut out);
            }
        }
    }
    out
}

#[test]
fn every_request_object_in_the_openapi_document_is_closed() {
    // Unknown fields are refused everywhere (a misspelt `costUSD` must not count as nothing);
    // the document says so for every object a request carries. The tool's own arguments are the
    // one object open by design: the policy's constraints decide which of their fields pass.
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/gateway.yaml"))
            .unwrap();
    let doc: Value = serde_yaml::from_str(&text).unwrap();
    let objects = request_objects(&doc);
    assert!(objects.len() >= 3, "{objects:?}");
    let open_by_design = ["post /v1/decide.arguments"];
    for (at, schema) in objects {
        let expected = json!(open_by_design.contains(&at.as_str()));
        assert_eq!(
            schema.get("additionalProperties"),
            Some(&expected),
            "{at}: every request object must say additionalProperties: {expected}"
        );
    }
}

#[tokio::test]
async fn unknown_fields_are_refused_at_every_depth_of_a_request() {
    let h = harness().await;
    h.decide(
        "u1",
        "read_customer_record",
        json!({"customer_id": "C000042"}),
    )
    .await;
    let head = h.audit().await.len();
    for (path, body) in [
        (
            "/v1/report",
            json!({"runId": "u1", "step": 1, "tool": "read_customer_record",
                              "usage": {"tokens": 10, "costUSD": "2.50"}}),
        ),
        (
            "/v1/report",
            json!({"runId": "u1", "step": 1, "tool": "read_customer_record",
                              "usage": {"tokens": 10}, "extra": 1}),
        ),
        (
            "/v1/decide",
            json!({"runId": "u1", "tool": "read_customer_record", "agent": "x"}),
        ),
    ] {
        let (status, body) = h.post(path, SUPPORT_KEY, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"]["code"], "MalformedRequest", "{body}");
    }
    let entries = h.audit().await;
    assert_eq!(entries.len(), head + 3, "every refusal is recorded");
    assert!(
        entries[head].error.as_deref().unwrap().contains("costUSD"),
        "{:?}",
        entries[head].error
    );
    // The step stays reportable: a refused report took nothing.
    let (status, body) = h
        .post(
            "/v1/report",
            SUPPORT_KEY,
            json!({"runId": "u1", "step": 1, "tool": "read_customer_record", "usage": {"tokens": 10}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_restarted_gateway_continues_budgets_from_the_audit_trail() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("audit.db")).unwrap());
    let start = |store: Arc<SqliteStore>| async move {
        let (log, _) = AuditLog::open(store.clone(), WriterConfig::new("gw-test"))
            .await
            .unwrap();
        let gateway = Gateway::new(
            WatchedDir::fixed(PolicySet::load(&samples())),
            keys(),
            log,
            Redactor::default(),
        )
        .with_history(store.clone());
        Harness {
            app: gateway::router(Arc::new(gateway)),
            store,
            _dir: tempfile::tempdir().unwrap(),
        }
    };
    let args = json!({"customer_id": "C000042"});
    let first = start(store.clone()).await;
    // 24 of the run's 25 steps, 40,000 of its 50,000 tokens, and 99 more runs in the window.
    for _ in 0..24 {
        assert_eq!(
            first
                .decide("long", "read_customer_record", args.clone())
                .await["decision"],
            "allow"
        );
    }
    let (_, body) = first
        .post(
            "/v1/report",
            SUPPORT_KEY,
            json!({"runId": "long", "step": 24, "tool": "read_customer_record", "usage": {"tokens": 40000}}),
        )
        .await;
    assert!(body.get("halted").is_none(), "{body}");
    for run in 0..99 {
        first
            .decide(&format!("r{run}"), "read_customer_record", args.clone())
            .await;
    }
    drop(first);

    // The second gateway knows nothing in memory; it continues from the trail, which also says
    // which steps were reported already.
    let second = start(store.clone()).await;
    let (status, body) = second
        .post(
            "/v1/report",
            SUPPORT_KEY,
            json!({"runId": "long", "step": 24, "tool": "read_customer_record", "usage": {"tokens": 20000}}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "UnknownStep", "{body}");
    let (_, body) = second
        .post(
            "/v1/report",
            SUPPORT_KEY,
            json!({"runId": "long", "step": 23, "tool": "read_customer_record", "usage": {"tokens": 20000}}),
        )
        .await;
    assert_eq!(body["counters"]["tokens"], 60000, "{body}");
    assert_eq!(
        body["halted"]["clause"], "spec.execution.maxTokensPerRun",
        "{body}"
    );
    let halted = second
        .decide("long", "read_customer_record", args.clone())
        .await;
    assert_eq!(halted["decision"], "halt");
    // The window held 100 runs before the restart: a new run id is refused.
    let rotated = second
        .decide("fresh-run", "read_customer_record", args.clone())
        .await;
    assert_eq!(
        rotated["rule"]["clause"], "spec.execution.perIdentity.maxRuns",
        "{rotated}"
    );
    second.audit().await;
}

#[tokio::test]
async fn refused_reports_are_recorded_too() {
    let h = harness().await;
    let (status, body) = h
        .post(
            "/v1/report",
            SUPPORT_KEY,
            json!({"runId": "never-decided", "step": 1, "tool": "read_customer_record", "usage": {"tokens": 5}}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "UnknownRun");
    let (status, _) = h
        .post(
            "/v1/report",
            SUPPORT_KEY,
            json!({"step": 1, "tool": "read_customer_record"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let entries = h.audit().await;
    let errors: Vec<&str> = entries
        .iter()
        .filter(|e| e.event.as_str() == "rejected")
        .map(|e| e.error.as_deref().unwrap())
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].starts_with("/v1/report: UnknownRun"),
        "{errors:?}"
    );
    assert!(errors[1].contains("run id is required"), "{errors:?}");
}

/// A Slack-compatible incoming webhook on loopback that keeps every message it receives.
async fn notification_sink() -> (String, Arc<std::sync::Mutex<Vec<Value>>>) {
    let received: Arc<std::sync::Mutex<Vec<Value>>> = Arc::default();
    let app = axum::Router::new()
        .route(
            "/hooks/T000/B000",
            axum::routing::post(
                |axum::extract::State(received): axum::extract::State<
                    Arc<std::sync::Mutex<Vec<Value>>>,
                >,
                 axum::Json(body): axum::Json<Value>| async move {
                    received.lock().unwrap().push(body);
                    "ok"
                },
            ),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/T000/B000", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

#[tokio::test]
async fn a_breach_halts_notifies_once_and_engages_the_kill_switch_when_the_policy_says_so() {
    let (url, received) = notification_sink().await;
    let policies = tempfile::tempdir().unwrap();
    let sample = std::fs::read_to_string(samples().join("support-agent.yaml"))
        .unwrap()
        .replace("engageKillSwitch: false", "engageKillSwitch: true")
        .replace(
            "notify: [oncall-agents]",
            "notify: [oncall-agents, unconfigured]",
        );
    std::fs::write(policies.path().join("support.yaml"), &sample).unwrap();
    std::fs::copy(
        samples().join("deploy-agent.yaml"),
        policies.path().join("deploy.yaml"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("audit.db")).unwrap());
    let (log, _) = AuditLog::open(store.clone(), WriterConfig::new("gw-test"))
        .await
        .unwrap();
    let targets = std::collections::HashMap::from([("oncall-agents".to_owned(), url)]);
    let gateway = Gateway::new(
        WatchedDir::start(policies.path().to_owned(), Duration::from_millis(50)),
        keys(),
        log,
        Redactor::default(),
    )
    .with_escalation(gateway::Escalation::standalone(targets));
    let h = Harness {
        app: gateway::router(Arc::new(gateway)),
        store,
        _dir: dir,
    };
    let args = json!({"customer_id": "C000042"});
    assert_eq!(
        h.decide("r1", "read_customer_record", args.clone()).await["decision"],
        "allow"
    );
    let (_, halted) = h
        .post(
            "/v1/report",
            SUPPORT_KEY,
            json!({"runId": "r1", "step": 1, "tool": "read_customer_record", "usage": {"tokens": 60000}}),
        )
        .await;
    assert_eq!(halted["halted"]["clause"], "spec.execution.maxTokensPerRun");
    // Reporting more usage on the halted run escalates nothing new.
    let _ = h
        .post(
            "/v1/report",
            SUPPORT_KEY,
            json!({"runId": "r1", "step": 1, "tool": "read_customer_record", "usage": {"tokens": 10}}),
        )
        .await;

    // The kill switch holds for every run of the agent, not only the halted one.
    let other_run = h.decide("r2", "read_customer_record", args.clone()).await;
    assert_eq!(other_run["decision"], "deny", "{other_run}");
    assert_eq!(other_run["code"], "KillSwitch");
    // Another agent is untouched.
    let (status, deploy) = h
        .post(
            "/v1/decide",
            DEPLOY_KEY,
            json!({"runId": "d1", "tool": "get_build_status", "arguments": {"build_id": 7}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(deploy["decision"], "allow", "{deploy}");

    // One message to the configured target, naming the agent, run and clause.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while received.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let messages = received.lock().unwrap().clone();
    assert_eq!(messages.len(), 1, "{messages:?}");
    let text = messages[0]["text"].as_str().unwrap();
    for part in [
        "run r1",
        "default/support-agent-v2",
        "spec.execution.maxTokensPerRun",
        "kill switch is engaged",
    ] {
        assert!(text.contains(part), "{part} missing from {text}");
    }

    // The trail says the gateway engaged the switch.
    let entries = h.audit().await;
    let kills: Vec<_> = entries
        .iter()
        .filter(|e| e.event == tollgate_audit::Event::Kill)
        .collect();
    assert_eq!(kills.len(), 1);
    assert!(
        kills[0]
            .error
            .as_deref()
            .unwrap()
            .contains("engageKillSwitch")
    );

    // Once the policy directory itself engages and then releases the switch, the agent is free
    // again: the gateway held it only until the source of truth caught up.
    std::fs::write(
        policies.path().join("support.yaml"),
        sample.replacen(
            "\n  credentials:",
            "\n  killSwitch: {engaged: true}\n  credentials:",
            1,
        ),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.decide("r3", "read_customer_record", args.clone()).await["code"],
        "KillSwitch"
    );
    std::fs::write(policies.path().join("support.yaml"), &sample).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let freed = h.decide("r4", "read_customer_record", args).await;
    assert_eq!(freed["decision"], "allow", "{freed}");
}

#[tokio::test]
async fn metrics_count_decisions_by_kind_and_refusals() {
    let h = harness().await;
    let args = json!({"customer_id": "C000042"});
    h.decide("m1", "read_customer_record", args.clone()).await;
    h.decide("m1", "read_customer_record", args).await;
    let blocked = h.decide("m1", "delete_customer_record", json!({})).await;
    let code = blocked["code"].as_str().unwrap().to_owned();
    let (status, _) = h
        .post_raw("/v1/decide", Some("not-a-key"), &[], b"{}".to_vec())
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let text = h.metrics().await;
    // Every record in the trail went through a batch the writer reported, all committed.
    let recorded = h.audit().await.len();
    assert!(recorded >= 3, "{recorded}");
    for line in [
        "tollgate_gateway_decisions_total{agent=\"support-agent-v2\",code=\"\",decision=\"allow\",namespace=\"default\"} 2".to_owned(),
        format!("tollgate_gateway_decisions_total{{agent=\"support-agent-v2\",code=\"{code}\",decision=\"deny\",namespace=\"default\"}} 1"),
        "tollgate_gateway_refusals_total{code=\"Unauthenticated\",surface=\"api\"} 1".to_owned(),
        "tollgate_gateway_decision_duration_seconds_count 3".to_owned(),
        "tollgate_gateway_approvals_waiting 0".to_owned(),
        format!("tollgate_audit_batch_records_sum {recorded}"),
        "tollgate_audit_batches_total{outcome=\"failed\"} 0".to_owned(),
    ] {
        assert!(text.contains(&line), "{line} missing from\n{text}");
    }
    let batches = metric(&text, "tollgate_audit_batches_total{outcome=\"committed\"}");
    assert!(
        (1.0..=recorded as f64).contains(&batches),
        "{batches} batches for {recorded} records"
    );
    assert_eq!(
        metric(&text, "tollgate_audit_commit_duration_seconds_count"),
        batches
    );
    assert_eq!(
        metric(&text, "tollgate_audit_queue_wait_seconds_count"),
        batches
    );
}

/// The value of the sample named exactly `name` in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn the_gateway_port_serves_no_metrics_to_agents() {
    // In a cluster agents reach the gateway's router; its metrics are on the probe port.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("audit.db")).unwrap());
    let (log, _) = AuditLog::open(store, WriterConfig::new("gw-test"))
        .await
        .unwrap();
    let gateway = Gateway::new(
        WatchedDir::fixed(PolicySet::load(&samples())),
        keys(),
        log,
        Redactor::default(),
    );
    let response = gateway::router(Arc::new(gateway))
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

/// Makes every insert into the SQLite trail at `db` fail (as a full disk or a lost volume would
/// make its commits fail), or lets them through again.
fn trail_refuses(db: &Path, refuse: bool) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute_batch(if refuse {
        "CREATE TRIGGER tollgate_test_refuse BEFORE INSERT ON tollgate_audit_records
         BEGIN SELECT RAISE(ABORT, 'injected: the trail cannot be written'); END;"
    } else {
        "DROP TRIGGER tollgate_test_refuse;"
    })
    .unwrap();
}

#[tokio::test]
async fn when_the_trail_cannot_record_a_call_it_is_refused_never_allowed() {
    // SECURITY.md 9: when Tollgate cannot decide (an unrecorded decision is no decision), the
    // agent's call is refused.
    let h = harness().await;
    let args = json!({"customer_id": "C000042"});
    assert_eq!(
        h.decide("f1", "read_customer_record", args.clone()).await["decision"],
        "allow"
    );
    let db = h._dir.path().join("audit.db");
    trail_refuses(&db, true);
    let call = json!({"runId": "f1", "tool": "read_customer_record", "arguments": args});
    let (status, refused) = h.post("/v1/decide", SUPPORT_KEY, call.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{refused}");
    assert_eq!(refused["error"]["code"], "AuditUnavailable", "{refused}");
    assert!(refused.get("decision").is_none(), "{refused}");
    // A reported result is not taken either.
    let (status, report) = h
        .post(
            "/v1/report",
            SUPPORT_KEY,
            json!({"runId": "f1", "step": 1, "tool": "read_customer_record",
                   "result": {"customer_id": "C000042"}}),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{report}");
    // Malformed input is refused as before, with its own reason, though it cannot be recorded.
    let (status, malformed) = h
        .post_raw(
            "/v1/decide",
            Some(SUPPORT_KEY),
            &[],
            b"{\"runId\": ".to_vec(),
        )
        .await;
    // Its refusal cannot be recorded either: refused as unrecordable, still naming the problem.
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{malformed}");
    assert_eq!(
        malformed["error"]["code"], "AuditUnavailable",
        "{malformed}"
    );
    let message = malformed["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("refused in any case: MalformedRequest"),
        "{message}"
    );

    // Once the trail takes records again, calls are decided again, and the chain has no gap.
    trail_refuses(&db, false);
    let (status, allowed) = h.post("/v1/decide", SUPPORT_KEY, call).await;
    assert_eq!(status, StatusCode::OK, "{allowed}");
    assert_eq!(allowed["decision"], "allow", "{allowed}");
    let entries = h.audit().await;
    let events: Vec<&str> = entries.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(events, ["decide", "decide"], "only what was recorded");

    let text = h.metrics().await;
    assert!(
        metric(&text, "tollgate_audit_batches_total{outcome=\"failed\"}") >= 2.0,
        "{text}"
    );
}
