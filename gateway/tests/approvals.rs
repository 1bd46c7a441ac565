//! Approvals on a gateway with no cluster: an irreversible call waits for people who hold an
//! approver's key, and is released exactly as in a cluster (the same engine rules: listed and
//! distinct approvers, no self-approval, bound to the digest of its arguments, once, never past
//! expiry or a kill switch). Every decision and every refusal is in the audit trail, and the
//! chain verifies at the end of each test.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::collections::HashMap;
use tollgate_audit::{
    ApprovalPhase, AuditLog, Entry, Event, Query, Redactor, SqliteStore, Store, WriterConfig,
    verify,
};
use tollgate_gateway::escalate::Target;
use tollgate_gateway::keys::Keys;
use tollgate_gateway::policies::WatchedDir;
use tollgate_gateway::{self as gateway, Gateway};
use tower::ServiceExt;

const AGENT: &str = "support-key-1";
const DANA: &str = "dana-key-1";
const LEE: &str = "lee-key-1";
const OLIVE: &str = "olive-key-1";

fn sha(key: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

fn keys() -> Keys {
    Keys::parse(&format!(
        "keys:
  - {{name: support, agent: default/support-agent-v2, sha256: {}}}
  - {{name: dana, role: approver, groups: [support-leads], sha256: {}}}
  - {{name: lee, role: approver, groups: [support-leads], sha256: {}}}
  - {{name: olive, role: approver, groups: [finance], sha256: {}}}
",
        sha(AGENT),
        sha(DANA),
        sha(LEE),
        sha(OLIVE)
    ))
    .unwrap()
}

struct Harness {
    app: axum::Router,
    store: Arc<SqliteStore>,
    policy: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// The sample support agent, its policy edited by `edit`, in a watched directory.
async fn harness_with(edit: impl Fn(String) -> String, limit: Option<usize>) -> Harness {
    harness_notifying(edit, limit, HashMap::new()).await
}

/// [`harness_with`], telling `targets` of approvals.
async fn harness_notifying(
    edit: impl Fn(String) -> String,
    limit: Option<usize>,
    targets: HashMap<String, Target>,
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let sample = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/samples/support-agent.yaml"),
    )
    .unwrap();
    let policy = policies.join("support.yaml");
    std::fs::write(&policy, edit(sample)).unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("audit.db")).unwrap());
    let (log, _) = AuditLog::open(store.clone(), WriterConfig::new("approvals"))
        .await
        .unwrap();
    let mut gateway = Gateway::new(
        WatchedDir::start(policies, Duration::from_millis(100)),
        keys(),
        log,
        Redactor::default(),
    )
    .with_history(store.clone())
    .with_escalation(gateway::Escalation::standalone(targets))
    .with_approval_url("http://127.0.0.1:8480");
    if let Some(limit) = limit {
        gateway = gateway.with_approval_limit(limit);
    }
    Harness {
        app: gateway::standalone_router(Arc::new(gateway)),
        store,
        policy,
        _dir: dir,
    }
}

async fn harness() -> Harness {
    harness_with(|s| s, None).await
}

fn email(subject: &str) -> Value {
    json!({"customer_id": "C000042", "subject": subject, "body": "Done."})
}

impl Harness {
    async fn send(&self, request: Request<Body>) -> (StatusCode, Value) {
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into())),
        )
    }

    async fn post(&self, path: &str, key: &str, body: impl Into<Body>) -> (StatusCode, Value) {
        self.send(
            Request::post(path)
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {key}"))
                .body(body.into())
                .unwrap(),
        )
        .await
    }

    async fn get(&self, path: &str, key: &str) -> (StatusCode, Value) {
        self.send(
            Request::get(path)
                .header("authorization", format!("Bearer {key}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
    }

    /// The agent's call, as `/v1/decide` takes it.
    async fn call(&self, body: Value) -> (StatusCode, Value) {
        self.post("/v1/decide", AGENT, body.to_string()).await
    }

    /// An approver's verdict on `name` (in namespace default).
    async fn verdict(&self, key: &str, name: &str, verdict: &str) -> (StatusCode, Value) {
        self.post(
            &format!("/v1/approvals/default/{name}"),
            key,
            json!({"verdict": verdict, "comment": "checked"}).to_string(),
        )
        .await
    }

    /// The name of the one request waiting for `key`'s holder, once there is one.
    async fn waiting(&self, key: &str) -> String {
        for _ in 0..250 {
            let (status, listed) = self.get("/v1/approvals", key).await;
            assert_eq!(status, StatusCode::OK, "{listed}");
            let pending: Vec<&Value> = listed["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["status"]["phase"] == "Pending")
                .collect();
            if let [one] = pending.as_slice() {
                return one["metadata"]["name"].as_str().unwrap().to_owned();
            }
            assert!(pending.is_empty(), "{listed}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no request waits");
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

/// The approval records of `entries`: (who, phase, approvers).
fn approvals(entries: &[Entry]) -> Vec<(String, ApprovalPhase, Vec<String>)> {
    entries
        .iter()
        .filter(|e| e.event == Event::Approval)
        .map(|e| {
            let approval = e.approval.as_ref().unwrap();
            (
                e.identity.username.clone(),
                approval.phase,
                approval.approvers.clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_waiting_call_is_released_when_a_listed_approver_approves() {
    let h = harness().await;
    let waiting = h.call(json!({"runId": "r1", "tool": "send_customer_email",
                                "arguments": email("refund")}));
    let deciding = async {
        let name = h.waiting(DANA).await;
        // Any approver reads it: the redacted arguments, their digest, who may decide, expiry.
        let (status, request) = h.get(&format!("/v1/approvals/default/{name}"), OLIVE).await;
        assert_eq!(status, StatusCode::OK, "{request}");
        assert_eq!(request["spec"]["tool"], "send_customer_email");
        assert_eq!(request["spec"]["arguments"]["subject"], "refund");
        assert_eq!(
            request["spec"]["approvers"]["groups"],
            json!(["support-leads"])
        );
        // Olive is not in support-leads: she does not see it waiting and may not decide it.
        let (_, hers) = h.get("/v1/approvals", OLIVE).await;
        assert_eq!(hers["items"], json!([]), "{hers}");
        let (status, refused) = h.verdict(OLIVE, &name, "Approve").await;
        assert_eq!(status, StatusCode::CONFLICT, "{refused}");
        assert_eq!(refused["error"]["code"], "DecisionRefused");
        h.verdict(DANA, &name, "Approve").await
    };
    let ((status, released), (decided_status, decided)) = tokio::join!(waiting, deciding);
    assert_eq!(decided_status, StatusCode::OK, "{decided}");
    assert_eq!(decided["status"]["phase"], "Approved", "{decided}");
    let decision = &decided["spec"]["decisions"][0];
    assert_eq!(
        (&decision["user"], &decision["comment"]),
        (&json!("dana"), &json!("checked"))
    );
    assert!(decision["at"].is_string(), "{decided}");
    assert_eq!(status, StatusCode::OK, "{released}");
    assert_eq!(released["decision"], "allow", "{released}");

    let entries = h.audit().await;
    assert_eq!(
        approvals(&entries),
        [
            (
                "dana".to_owned(),
                ApprovalPhase::Decided,
                vec!["dana".to_owned()]
            ),
            (
                "apikey:support".to_owned(),
                ApprovalPhase::Approved,
                vec!["dana".to_owned()]
            ),
        ]
    );
    let given = entries
        .iter()
        .find(|e| {
            e.approval
                .as_ref()
                .is_some_and(|a| a.phase == ApprovalPhase::Decided)
        })
        .unwrap();
    assert_eq!(
        given.arguments,
        Some(json!({"verdict": "Approve", "comment": "checked"}))
    );
    let olive = entries
        .iter()
        .find(|e| e.identity.username == "olive")
        .expect("olive's refused decision is recorded");
    assert_eq!(olive.event, Event::Rejected);
    assert!(
        olive
            .error
            .as_deref()
            .unwrap()
            .contains("olive is not an approver"),
        "{:?}",
        olive.error
    );
}

#[tokio::test]
async fn without_waiting_an_approval_is_redeemed_once_for_exactly_its_call() {
    let h = harness().await;
    let ask = json!({"runId": "r2", "tool": "send_customer_email", "arguments": email("later"),
                     "wait": false});
    let (status, asked) = h.call(ask).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{asked}");
    let name = asked["approvalRequest"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let redeem = |arguments: Value| {
        json!({"runId": "r2", "tool": "send_customer_email", "arguments": arguments,
               "approval": name})
    };
    // Undecided: still waiting.
    let (status, pending) = h.call(redeem(email("later"))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pending}");
    assert_eq!(pending["decision"], "requireApproval");

    let (status, _) = h.verdict(LEE, &name, "Approve").await;
    assert_eq!(status, StatusCode::OK);
    // Other arguments are another call: the approval does not release it.
    let (_, other) = h.call(redeem(email("something else"))).await;
    assert_eq!(
        (&other["decision"], &other["code"]),
        (&json!("deny"), &json!("ApprovalDenied"))
    );
    assert!(
        other["message"]
            .as_str()
            .unwrap()
            .contains("releases that call only"),
        "{other}"
    );
    // Its own call is released, once.
    let (_, released) = h.call(redeem(email("later"))).await;
    assert_eq!(released["decision"], "allow", "{released}");
    let (_, again) = h.call(redeem(email("later"))).await;
    assert_eq!(again["code"], "ApprovalDenied", "{again}");
    assert!(
        again["message"]
            .as_str()
            .unwrap()
            .contains("already released"),
        "{again}"
    );
    // Another agent cannot redeem it, and a name that was never asked for releases nothing.
    let (_, never) = h
        .call(
            redeem(email("later"))
                .as_object()
                .cloned()
                .map(|mut m| {
                    m.insert("approval".into(), json!("send-customer-email-zzzzz"));
                    Value::Object(m)
                })
                .unwrap(),
        )
        .await;
    assert_eq!(never["code"], "ApprovalDenied", "{never}");
    h.audit().await;
}

#[tokio::test]
async fn approvals_need_distinct_listed_people_and_any_denial_is_final() {
    let h = harness_with(|s| s.replace("minApprovals: 1", "minApprovals: 2"), None).await;
    let (_, asked) = h
        .call(
            json!({"runId": "r3", "tool": "send_customer_email", "arguments": email("two"),
                     "wait": false}),
        )
        .await;
    let name = asked["approvalRequest"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, first) = h.verdict(DANA, &name, "Approve").await;
    assert_eq!(
        (status, &first["status"]["phase"]),
        (StatusCode::OK, &json!("Pending"))
    );
    // The same person twice is one approval.
    let (status, twice) = h.verdict(DANA, &name, "Approve").await;
    assert_eq!(status, StatusCode::CONFLICT, "{twice}");
    assert!(
        twice["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already decided"),
        "{twice}"
    );
    // The agent's own key decides nothing; a body cannot name another approver.
    let (status, own) = h.verdict(AGENT, &name, "Approve").await;
    assert_eq!(
        (status, &own["error"]["code"]),
        (StatusCode::FORBIDDEN, &json!("NotAnApprover"))
    );
    let (status, forged) = h
        .post(
            &format!("/v1/approvals/default/{name}"),
            DANA,
            r#"{"verdict":"Approve","user":"lee"}"#,
        )
        .await;
    assert_eq!(
        (status, &forged["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!("MalformedRequest"))
    );
    assert!(
        forged["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `user`"),
        "{forged}"
    );
    let (_, still) = h
        .call(json!({"runId": "r3", "tool": "send_customer_email",
                                   "arguments": email("two"), "approval": name}))
        .await;
    assert_eq!(
        still["decision"], "requireApproval",
        "one approval of two: {still}"
    );
    // Lee denies: one denial denies, and nothing decides it after.
    let (_, denied) = h.verdict(LEE, &name, "Deny").await;
    assert_eq!(denied["status"]["phase"], "Denied", "{denied}");
    let (status, late) = h.verdict(OLIVE, &name, "Approve").await;
    assert_eq!(status, StatusCode::CONFLICT, "{late}");
    let (_, refused) = h
        .call(json!({"runId": "r3", "tool": "send_customer_email",
                                     "arguments": email("two"), "approval": name}))
        .await;
    assert_eq!(refused["code"], "ApprovalDenied", "{refused}");
    let entries = h.audit().await;
    let phases: Vec<(String, ApprovalPhase)> = approvals(&entries)
        .into_iter()
        .map(|(who, phase, _)| (who, phase))
        .collect();
    assert_eq!(
        phases,
        [
            ("apikey:support".to_owned(), ApprovalPhase::Pending),
            ("dana".to_owned(), ApprovalPhase::Decided),
            ("lee".to_owned(), ApprovalPhase::Decided),
            ("apikey:support".to_owned(), ApprovalPhase::Denied),
        ]
    );
    // Every refusal above is on the record, with who tried.
    let refused_by: Vec<&str> = entries
        .iter()
        .filter(|e| e.event == Event::Rejected)
        .map(|e| e.identity.username.as_str())
        .collect();
    assert_eq!(refused_by, ["dana", "apikey:support", "dana", "olive"]);
}

#[tokio::test]
async fn the_kill_switch_ends_a_waiting_call_and_no_one_can_approve_it() {
    let h = harness().await;
    let waiting = h.call(json!({"runId": "r4", "tool": "send_customer_email",
                                "arguments": email("stop")}));
    let killing = async {
        let name = h.waiting(DANA).await;
        let text = std::fs::read_to_string(&h.policy).unwrap();
        std::fs::write(
            &h.policy,
            text.replacen(
                "\n  credentials:",
                "\n  killSwitch: {engaged: true}\n  credentials:",
                1,
            ),
        )
        .unwrap();
        name
    };
    let ((status, stopped), name) = tokio::join!(waiting, killing);
    assert_eq!(status, StatusCode::OK, "{stopped}");
    assert_eq!(
        (&stopped["decision"], &stopped["code"]),
        (&json!("deny"), &json!("KillSwitch"))
    );
    let (status, refused) = h.verdict(DANA, &name, "Approve").await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    let (_, request) = h.get(&format!("/v1/approvals/default/{name}"), DANA).await;
    assert_eq!(
        (&request["status"]["phase"], &request["status"]["reason"]),
        (&json!("Denied"), &json!("KillSwitch"))
    );
    h.audit().await;
}

#[tokio::test]
async fn an_undecided_request_expires_and_the_call_is_denied() {
    let h = harness_with(
        |s| s.replace("timeoutSeconds: 300", "timeoutSeconds: 10"),
        None,
    )
    .await;
    let started = std::time::Instant::now();
    let (status, expired) = h
        .call(json!({"runId": "r5", "tool": "send_customer_email", "arguments": email("slow")}))
        .await;
    assert_eq!(status, StatusCode::OK, "{expired}");
    assert_eq!(expired["code"], "ApprovalExpired", "{expired}");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    let (_, listed) = h.get("/v1/approvals", DANA).await;
    let name = listed["items"][0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(listed["items"][0]["status"]["phase"], "Expired", "{listed}");
    let (status, late) = h.verdict(DANA, &name, "Approve").await;
    assert_eq!(status, StatusCode::CONFLICT, "{late}");
    assert!(
        late["error"]["message"].as_str().unwrap().contains("final"),
        "{late}"
    );
    h.audit().await;
}

#[tokio::test]
async fn bad_decisions_get_clear_errors_and_records() {
    let h = harness().await;
    let (_, asked) = h
        .call(
            json!({"runId": "r6", "tool": "send_customer_email", "arguments": email("x"),
                     "wait": false}),
        )
        .await;
    let name = asked["approvalRequest"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v1/approvals/default/{name}");
    let long = "x".repeat(1025);
    let cases: Vec<(Body, StatusCode, &str, &str)> = vec![
        (
            Body::from("not json"),
            StatusCode::BAD_REQUEST,
            "MalformedRequest",
            "not a decision",
        ),
        (
            Body::from("[]"),
            StatusCode::BAD_REQUEST,
            "MalformedRequest",
            "must be a JSON object",
        ),
        (
            Body::from(r#"{"verdict":"Maybe"}"#),
            StatusCode::BAD_REQUEST,
            "MalformedRequest",
            "unknown variant `Maybe`",
        ),
        (
            Body::from(r#"{"verdict":"Approve","verdict":"Deny"}"#),
            StatusCode::BAD_REQUEST,
            "MalformedRequest",
            "verdict",
        ),
        (
            Body::from(json!({"verdict": "Approve", "comment": long}).to_string()),
            StatusCode::BAD_REQUEST,
            "MalformedRequest",
            "longer than 1024",
        ),
        (
            Body::from(vec![b' '; 64 * 1024 + 1]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "PayloadTooLarge",
            "exceeds",
        ),
    ];
    for (body, status, code, words) in cases {
        let before = h.audit().await.len();
        let (got, answer) = h.post(&path, DANA, body).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{answer}"
        );
        assert!(
            answer["error"]["message"].as_str().unwrap().contains(words),
            "{answer}"
        );
        assert_eq!(h.audit().await.len(), before + 1, "{code}: recorded");
    }
    // Unknown keys and missing credentials are refused before anything is read.
    let (status, _) = h.verdict("nobody", &name, "Approve").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, unknown) = h.verdict(DANA, "never-asked", "Approve").await;
    assert_eq!(
        (status, &unknown["error"]["code"]),
        (StatusCode::NOT_FOUND, &json!("UnknownApproval"))
    );
    // None of it decided anything.
    let (_, request) = h.get(&path, DANA).await;
    assert_eq!(request["spec"]["decisions"], json!([]), "{request}");
    // An approver's key makes no agent's calls.
    let (status, refused) = h
        .post("/v1/decide", DANA, r#"{"runId":"r","tool":"t"}"#)
        .await;
    assert_eq!(
        (status, &refused["error"]["code"]),
        (StatusCode::FORBIDDEN, &json!("NotAnAgent"))
    );
}

#[tokio::test]
async fn a_full_desk_refuses_new_requests_and_records_it() {
    let h = harness_with(|s| s, Some(1)).await;
    let ask = |subject: &str| {
        json!({"runId": "r7", "tool": "send_customer_email", "arguments": email(subject),
               "wait": false})
    };
    let (status, first) = h.call(ask("one")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let (status, second) = h.call(ask("two")).await;
    assert_eq!(
        (status, &second["error"]["code"]),
        (StatusCode::TOO_MANY_REQUESTS, &json!("NoApprovals"))
    );
    assert!(
        second["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1 approval requests are open already"),
        "{second}"
    );
    let entries = h.audit().await;
    assert!(
        entries
            .last()
            .unwrap()
            .error
            .as_deref()
            .unwrap()
            .contains("NoApprovals"),
        "{:?}",
        entries.last()
    );
}

/// What a notification target received: (path, event header, delivery id, signature, body as
/// sent).
type Received = Arc<std::sync::Mutex<Vec<(String, String, String, String, String)>>>;

/// A receiver of our own for two targets, `/chat` (Slack-compatible) and `/hook` (signed
/// webhook), which refuses the first delivery to `/hook` with 503 (a retry must follow).
async fn receiver() -> (String, Received) {
    use axum::http::HeaderMap;
    let received: Received = Arc::default();
    let refused_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let log = received.clone();
    let app = axum::Router::new().route(
        "/{target}",
        axum::routing::post(
            move |axum::extract::Path(target): axum::extract::Path<String>,
                  headers: HeaderMap,
                  body: String| {
                let (log, refused_once) = (log.clone(), refused_once.clone());
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .map(|v| v.to_str().unwrap().to_owned())
                            .unwrap_or_default()
                    };
                    let refuse = target == "hook"
                        && !refused_once.swap(true, std::sync::atomic::Ordering::SeqCst);
                    let event = header("tollgate-event");
                    log.lock().unwrap().push((
                        target,
                        if refuse {
                            format!("refused {event}")
                        } else {
                            event
                        },
                        header("tollgate-delivery"),
                        header("tollgate-signature"),
                        body,
                    ));
                    if refuse {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    }
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

const HOOK_SECRET: &str = "0123456789abcdef-hook-secret";

fn targets(url: &str) -> HashMap<String, Target> {
    let parse = |yaml: String| Target::parse(&serde_yaml::from_str(&yaml).unwrap()).unwrap();
    HashMap::from([
        ("leads-chat".to_owned(), parse(format!("{url}/chat"))),
        (
            "audit-hook".to_owned(),
            parse(format!(
                "{{url: '{url}/hook', format: webhook, secret: '{HOOK_SECRET}'}}"
            )),
        ),
    ])
}

/// Waits until `received` holds `count` notices of `event` per target; returns them.
async fn notices(
    received: &Received,
    event: &str,
    count: usize,
) -> Vec<(String, String, String, Value, String)> {
    for _ in 0..1000 {
        let got: Vec<_> = received
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, kind, ..)| kind == event)
            .map(|(target, _, delivery, signature, body)| {
                (
                    target.clone(),
                    delivery.clone(),
                    signature.clone(),
                    serde_json::from_str(body).unwrap(),
                    body.clone(),
                )
            })
            .collect();
        if got.len() >= count {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "no {count} notice(s) of {event}: {:?}",
        received.lock().unwrap()
    );
}

fn notifying(policy: String) -> String {
    policy.replacen(
        "          onTimeout: Deny",
        "          onTimeout: Deny\n          notify: [leads-chat, audit-hook, not-configured]",
        1,
    )
}

#[tokio::test]
async fn people_hear_of_a_waiting_call_and_of_its_outcome() {
    let (url, received) = receiver().await;
    let h = harness_notifying(notifying, None, targets(&url)).await;
    let (_, asked) = h
        .call(
            json!({"runId": "n1", "tool": "send_customer_email", "arguments": email("hello"),
                     "wait": false}),
        )
        .await;
    let name = asked["approvalRequest"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let created = notices(&received, "approval.created", 2).await;
    let chat = created.iter().find(|(t, ..)| t == "chat").unwrap();
    let text = chat.3["text"].as_str().unwrap();
    for words in [
        "agent default/support-agent-v2 waits for approval to call send_customer_email (run n1",
        r#""subject":"hello""#,
        asked["approval"]["argumentsDigest"].as_str().unwrap(),
        "Who may decide: groups support-leads; 1 distinct approval(s) needed",
        asked["approvalRequest"]["expiresAt"].as_str().unwrap(),
        &format!("kubectl tollgate approve default/{name} --gateway http://127.0.0.1:8480"),
        &format!("kubectl tollgate deny default/{name} --gateway http://127.0.0.1:8480"),
    ] {
        assert!(text.contains(words), "{words:?} not in {text}");
    }
    assert_eq!(
        chat.3.as_object().unwrap().len(),
        1,
        "Slack gets text only: {}",
        chat.3
    );
    // The webhook got the event, signed, after one retry with the same delivery id.
    let hook = created.iter().find(|(t, ..)| t == "hook").unwrap();
    let (_, delivery, signature, event, body) = hook;
    assert_eq!(delivery.len(), 32, "{delivery}");
    let refused = notices(&received, "refused approval.created", 1).await;
    assert_eq!(
        &refused[0].1, delivery,
        "a retry carries the same delivery id"
    );
    assert_eq!(event["type"], "approval.created");
    assert_eq!(event["request"]["name"], name.as_str());
    assert_eq!(event["request"]["tool"], "send_customer_email");
    assert_eq!(event["request"]["arguments"]["subject"], "hello");
    assert_eq!(event["phase"], "Pending");
    let at: i64 = signature
        .strip_prefix("t=")
        .and_then(|s| s.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    // Signed over the exact bytes sent.
    assert_eq!(
        signature,
        &tollgate_gateway::escalate::signature(HOOK_SECRET.as_bytes(), at, body)
    );
    assert_ne!(
        signature,
        &tollgate_gateway::escalate::signature(b"another secret of 16+", at, body)
    );

    let (status, _) = h.verdict(DANA, &name, "Approve").await;
    assert_eq!(status, StatusCode::OK);
    let decided = notices(&received, "approval.decided", 2).await;
    let chat = decided.iter().find(|(t, ..)| t == "chat").unwrap();
    let text = chat.3["text"].as_str().unwrap();
    assert!(
        text.contains(&format!("default/{name}")) && text.contains("approved by dana"),
        "{text}"
    );
    let hook = decided.iter().find(|(t, ..)| t == "hook").unwrap();
    assert_eq!(hook.3["phase"], "Approved");
    assert_eq!(hook.3["decisions"][0]["user"], "dana");
    h.audit().await;
}

#[tokio::test]
async fn an_undecided_request_is_reminded_before_it_expires_and_its_expiry_told() {
    let (url, received) = receiver().await;
    let h = harness_notifying(
        |s| notifying(s).replace("timeoutSeconds: 300", "timeoutSeconds: 10"),
        None,
        targets(&url),
    )
    .await;
    let started = std::time::Instant::now();
    let (_, asked) = h
        .call(
            json!({"runId": "n2", "tool": "send_customer_email", "arguments": email("late"),
                     "wait": false}),
        )
        .await;
    let name = asked["approvalRequest"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let reminded = notices(&received, "approval.reminder", 2).await;
    let elapsed = started.elapsed();
    assert!(
        (Duration::from_secs(7)..Duration::from_secs(10)).contains(&elapsed),
        "a reminder when a fifth of the 10 s is left: {elapsed:?}"
    );
    let chat = reminded.iter().find(|(t, ..)| t == "chat").unwrap();
    let text = chat.3["text"].as_str().unwrap();
    assert!(
        text.contains("still undecided (0 of 1 approval(s))") && text.contains(&name),
        "{text}"
    );
    let expired = notices(&received, "approval.decided", 2).await;
    assert!(started.elapsed() >= Duration::from_secs(10));
    let chat = expired.iter().find(|(t, ..)| t == "chat").unwrap();
    assert!(
        chat.3["text"]
            .as_str()
            .unwrap()
            .contains("expired undecided"),
        "{}",
        chat.3
    );
    // Created, reminded, decided: once each per target (the hook's refused first try aside).
    let kinds: Vec<String> = received
        .lock()
        .unwrap()
        .iter()
        .filter(|(target, ..)| target == "chat")
        .map(|(_, kind, ..)| kind.clone())
        .collect();
    assert_eq!(
        kinds,
        ["approval.created", "approval.reminder", "approval.decided"]
    );
}
