//! In-process router tests: an AdmissionReview fixture for every rule of the admission face.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tollgate_runtime::cluster::StaticView;
use tollgate_webhook::{AdmissionState, Settings, admission};
use tower::ServiceExt;

const GATEWAY: &str = "system:serviceaccount:tollgate-system:tollgate-gateway";
const AGENT: &str = "system:serviceaccount:ns:agent-deployer";

fn now() -> jiff::Timestamp {
    "2026-11-25T12:00:00Z".parse().unwrap()
}

fn frozen() -> jiff::Timestamp {
    "2026-12-24T12:00:00Z".parse().unwrap()
}

fn identity(killed: bool) -> Value {
    json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": {"name": "deployer", "namespace": "ns", "uid": "u-1"},
        "spec": {"description": "d", "owner": {"team": "t", "contacts": ["a"]},
                 "podSelector": {"matchLabels": {"app": "deployer"}},
                 "kubernetes": {"rules": [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["delete"]}]},
                 "killSwitch": {"engaged": killed}}
    })
}

fn policy() -> Value {
    json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentPolicy",
        "metadata": {"name": "deployer", "namespace": "ns"},
        "spec": {"identityRef": {"name": "deployer"},
                 "kubernetes": {
                    "protectedResources": [{"operations": ["DELETE"], "selector": {"matchLabels": {"env": "production"}}}],
                    "freezeWindows": [{"start": "2026-12-20T00:00:00Z", "end": "2027-01-04T00:00:00Z", "reason": "holiday freeze"}]}}
    })
}

fn app(killed: bool, global_kill: bool, now: fn() -> jiff::Timestamp) -> axum::Router {
    recording(killed, global_kill, now, None)
}

/// [`app`] whose agents' requests are recorded in `audit`.
fn recording(
    killed: bool,
    global_kill: bool,
    now: fn() -> jiff::Timestamp,
    audit: Option<tollgate_audit::AuditLog>,
) -> axum::Router {
    let view = StaticView {
        identities: vec![Arc::new(serde_json::from_value(identity(killed)).unwrap())],
        policies: vec![Arc::new(serde_json::from_value(policy()).unwrap())],
        global_kill,
    };
    let settings = Settings {
        gateway_username: GATEWAY.into(),
        gateway_url: "https://gw:8443".into(),
    };
    admission::router(Arc::new(AdmissionState {
        view: Arc::new(view),
        settings,
        metrics: Default::default(),
        now,
        audit,
    }))
}

struct Review {
    group: &'static str,
    resource: &'static str,
    kind: &'static str,
    operation: &'static str,
    user: &'static str,
    groups: Vec<&'static str>,
    object: Option<Value>,
    old: Option<Value>,
    sub_resource: Option<&'static str>,
}

impl Review {
    fn new(
        group: &'static str,
        resource: &'static str,
        kind: &'static str,
        operation: &'static str,
        user: &'static str,
    ) -> Self {
        Review {
            group,
            resource,
            kind,
            operation,
            user,
            groups: vec![],
            object: None,
            old: None,
            sub_resource: None,
        }
    }
    fn object(mut self, object: Value) -> Self {
        self.object = Some(object);
        self
    }
    fn old(mut self, old: Value) -> Self {
        self.old = Some(old);
        self
    }
    fn groups(mut self, groups: &[&'static str]) -> Self {
        self.groups = groups.to_vec();
        self
    }
    fn json(&self) -> Value {
        let version = if self.group == "tollgate.dev" {
            "v1alpha1"
        } else {
            "v1"
        };
        json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "3f1c", "kind": {"group": self.group, "version": version, "kind": self.kind},
                "resource": {"group": self.group, "version": version, "resource": self.resource},
                "subResource": self.sub_resource,
                "name": "x", "namespace": "ns", "operation": self.operation,
                "userInfo": {"username": self.user, "groups": self.groups},
                "object": self.object, "oldObject": self.old, "dryRun": false
            }
        })
    }
}

async fn post(app: axum::Router, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
    let response = app
        .oneshot(
            Request::post(path)
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned())),
    )
}

/// Sends a review and returns (allowed, message, patch operations).
async fn send(app: axum::Router, path: &str, review: &Review) -> (bool, String, Vec<Value>) {
    let (status, body) = post(app, path, serde_json::to_vec(&review.json()).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let response = &body["response"];
    assert_eq!(
        response["uid"], "3f1c",
        "the response answers the request's uid"
    );
    // kube serialises the patch bytes as a JSON array of numbers, which the apiserver reads as
    // []byte like a base64 string.
    let patch = response["patch"].as_array().map(|bytes| {
        let bytes: Vec<u8> = bytes.iter().map(|b| b.as_u64().unwrap() as u8).collect();
        serde_json::from_slice::<Vec<Value>>(&bytes).unwrap()
    });
    (
        response["allowed"].as_bool().unwrap(),
        response["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        patch.unwrap_or_default(),
    )
}

fn deployment(labels: Value) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x", "namespace": "ns", "labels": labels}})
}

#[tokio::test]
async fn agents_own_writes() {
    let path = "/admission/validate-agents";
    let production = deployment(json!({"env": "production"}));
    let staging = deployment(json!({"env": "staging"}));
    let delete = |old: Value, user: &'static str| {
        Review::new("apps", "deployments", "Deployment", "DELETE", user).old(old)
    };
    let cases: Vec<(&str, axum::Router, Review, Option<&str>)> = vec![
        (
            "production delete",
            app(false, false, now),
            delete(production.clone(), AGENT),
            Some("spec.kubernetes.protectedResources[0]"),
        ),
        (
            "staging delete",
            app(false, false, now),
            delete(staging.clone(), AGENT),
            None,
        ),
        (
            "not an agent",
            app(false, false, now),
            delete(production.clone(), "system:serviceaccount:ns:ci"),
            None,
        ),
        (
            "a person",
            app(false, false, now),
            delete(production.clone(), "alice"),
            None,
        ),
        (
            "killed",
            app(true, false, now),
            delete(staging.clone(), AGENT),
            Some("spec.killSwitch"),
        ),
        (
            "globally killed",
            app(false, true, now),
            delete(staging.clone(), AGENT),
            Some("spec.killSwitch"),
        ),
        (
            "frozen",
            app(false, false, frozen),
            Review::new("", "configmaps", "ConfigMap", "CREATE", AGENT)
                .object(json!({"metadata": {"name": "c"}})),
            Some("freezeWindows[0]"),
        ),
        (
            "rbac",
            app(false, false, now),
            Review::new(
                "rbac.authorization.k8s.io",
                "rolebindings",
                "RoleBinding",
                "CREATE",
                AGENT,
            )
            .object(json!({"metadata": {"name": "r"}})),
            Some("self-escalation"),
        ),
        (
            "own policy",
            app(false, false, now),
            Review::new(
                "tollgate.dev",
                "agentpolicies",
                "AgentPolicy",
                "UPDATE",
                AGENT,
            )
            .object(policy())
            .old(policy()),
            Some("self-escalation"),
        ),
    ];
    for (what, app, review, denied_by) in cases {
        let (allowed, message, _) = send(app, path, &review).await;
        match denied_by {
            None => assert!(allowed, "{what}: {message}"),
            Some(rule) => {
                assert!(!allowed, "{what} was allowed");
                assert!(
                    message.contains(rule) && message.starts_with("Tollgate: "),
                    "{what}: {message}"
                );
            }
        }
    }
    let mut token = Review::new("", "serviceaccounts", "TokenRequest", "CREATE", AGENT)
        .object(json!({"metadata": {"name": "agent-deployer"}}));
    token.sub_resource = Some("token");
    let (allowed, message, _) = send(app(false, false, now), path, &token).await;
    assert!(
        !allowed && message.contains("ServiceAccount tokens"),
        "{message}"
    );
}

#[tokio::test]
async fn tollgate_objects_are_validated_with_the_engine() {
    let path = "/admission/validate-tollgate";
    let mut bad = policy();
    bad["spec"]["tools"] = json!({"allowed": [{"name": "a", "arguments": {"fields": {"id": {"type": "string", "pattern": "("}}}},
                                             {"name": "b", "when": "args.x =="}]});
    let review = Review::new(
        "tollgate.dev",
        "agentpolicies",
        "AgentPolicy",
        "CREATE",
        "alice",
    )
    .object(bad);
    let (allowed, message, _) = send(app(false, false, now), path, &review).await;
    assert!(!allowed);
    for expected in [
        "spec.tools.allowed[0].arguments.fields.id.pattern",
        "spec.tools.allowed[1].when",
        "2 problem(s)",
    ] {
        assert!(message.contains(expected), "{message}");
    }
    let review = Review::new(
        "tollgate.dev",
        "agentpolicies",
        "AgentPolicy",
        "CREATE",
        "alice",
    )
    .object(policy());
    assert!(send(app(false, false, now), path, &review).await.0);

    let mut escalating = identity(false);
    escalating["spec"]["kubernetes"]["rules"] =
        json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]);
    let review = Review::new(
        "tollgate.dev",
        "agentidentities",
        "AgentIdentity",
        "CREATE",
        "alice",
    )
    .object(escalating);
    let (allowed, message, _) = send(app(false, false, now), path, &review).await;
    assert!(
        !allowed
            && message.contains("raise its own rights")
            && message.contains("spec.kubernetes.rules[0]"),
        "{message}"
    );
}

fn approval_request(decisions: Value) -> Value {
    json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "ApprovalRequest",
        "metadata": {"name": "x", "namespace": "ns"},
        "spec": {"identityRef": {"name": "deployer"}, "policyRef": {"name": "deployer", "policyHash": "sha256:x"},
                 "runId": "r", "step": 1, "tool": "rollback", "arguments": {}, "argumentsDigest": "sha256:y",
                 "reason": "irreversible", "approvers": {"groups": ["tollgate-approvers"], "users": []},
                 "minApprovals": 1, "expiresAt": "2026-11-25T12:05:00Z", "decisions": decisions}
    })
}

#[tokio::test]
async fn approvals_are_stamped_and_guarded() {
    let review = |user: &'static str, groups: &[&'static str], new: Value| {
        Review::new(
            "tollgate.dev",
            "approvalrequests",
            "ApprovalRequest",
            "UPDATE",
            user,
        )
        .groups(groups)
        .object(new)
        .old(approval_request(json!([])))
    };
    let forged = approval_request(
        json!([{"verdict": "Approve", "user": "bob", "at": "2020-01-01T00:00:00Z"}]),
    );
    let (allowed, _, patch) = send(
        app(false, false, now),
        "/admission/mutate-approvals",
        &review("alice", &["tollgate-approvers"], forged),
    )
    .await;
    assert!(allowed);
    assert_eq!(
        patch,
        vec![
            json!({"op": "add", "path": "/spec/decisions/0/user", "value": "alice"}),
            json!({"op": "add", "path": "/spec/decisions/0/at", "value": "2026-11-25T12:00:00Z"}),
        ]
    );

    let path = "/admission/validate-tollgate";
    let approve =
        |user: &'static str| approval_request(json!([{"verdict": "Approve", "user": user}]));
    let cases: Vec<(&str, axum::Router, Review, Option<&str>)> = vec![
        (
            "an approver",
            app(false, false, now),
            review("alice", &["tollgate-approvers"], approve("alice")),
            None,
        ),
        (
            "a non-approver",
            app(false, false, now),
            review("carol", &[], approve("carol")),
            Some("not an approver"),
        ),
        (
            "the agent itself",
            app(false, false, now),
            review(AGENT, &["tollgate-approvers"], approve(AGENT)),
            Some("its own call"),
        ),
        (
            "after expiry",
            app(false, false, || "2026-11-25T12:05:00Z".parse().unwrap()),
            review("alice", &["tollgate-approvers"], approve("alice")),
            Some("expired"),
        ),
        (
            "a killed agent",
            app(true, false, now),
            review("alice", &["tollgate-approvers"], approve("alice")),
            Some("kill switch"),
        ),
        (
            "creation by a person",
            app(false, false, now),
            Review::new(
                "tollgate.dev",
                "approvalrequests",
                "ApprovalRequest",
                "CREATE",
                "alice",
            )
            .object(approval_request(json!([]))),
            Some("only the Tollgate gateway"),
        ),
        (
            "creation by the gateway",
            app(false, false, now),
            Review::new(
                "tollgate.dev",
                "approvalrequests",
                "ApprovalRequest",
                "CREATE",
                GATEWAY,
            )
            .object(approval_request(json!([]))),
            None,
        ),
    ];
    for (what, app, review, refused) in cases {
        let (allowed, message, _) = send(app, path, &review).await;
        match refused {
            None => assert!(allowed, "{what}: {message}"),
            Some(reason) => assert!(
                !allowed && message.contains(reason),
                "{what}: allowed={allowed} {message}"
            ),
        }
    }
}

fn pod(labels: Value, service_account: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ns", "labels": labels},
           "spec": {"serviceAccountName": service_account, "containers": [{"name": "agent", "image": "agent:1", "env": [{"name": "A", "value": "1"}]}]}})
}

#[tokio::test]
async fn agent_pods() {
    let create = |pod: Value| {
        Review::new(
            "",
            "pods",
            "Pod",
            "CREATE",
            "system:serviceaccount:kube-system:replicaset-controller",
        )
        .object(pod)
    };
    let cases: Vec<(&str, axum::Router, Value, Option<&str>)> = vec![
        (
            "matching labels",
            app(false, false, now),
            pod(json!({"app": "deployer"}), "agent-deployer"),
            None,
        ),
        (
            "wrong labels",
            app(false, false, now),
            pod(json!({"app": "other"}), "agent-deployer"),
            Some("podSelector"),
        ),
        (
            "killed",
            app(true, false, now),
            pod(json!({"app": "deployer"}), "agent-deployer"),
            Some("kill switch"),
        ),
        (
            "not an agent",
            app(false, false, now),
            pod(json!({}), "default"),
            None,
        ),
    ];
    for (what, app, object, refused) in cases {
        let (allowed, message, _) = send(app, "/admission/validate-pods", &create(object)).await;
        match refused {
            None => assert!(allowed, "{what}: {message}"),
            Some(reason) => assert!(!allowed && message.contains(reason), "{what}: {message}"),
        }
    }
    let (allowed, _, patch) = send(
        app(false, false, now),
        "/admission/mutate-pods",
        &create(pod(json!({"app": "deployer"}), "agent-deployer")),
    )
    .await;
    assert!(allowed);
    let paths: Vec<&str> = patch
        .iter()
        .map(|op| op["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        vec![
            "/metadata/labels/tollgate.dev~1agent",
            "/spec/volumes",
            "/spec/containers/0/volumeMounts",
            "/spec/containers/0/env/-"
        ]
    );
    // Labelled as its identity's pod: the gateway's ingress NetworkPolicy admits only these.
    assert_eq!(patch[0]["value"], "deployer");
    assert_eq!(
        patch[1]["value"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "tollgate"
    );
    assert_eq!(
        patch[3]["value"],
        json!({"name": "TOLLGATE_URL", "value": "https://gw:8443"})
    );
    // A pod that claims to be another agent's is labelled with its own identity's name, and a
    // pod with no labels at all gets the label too.
    for (labels, expected) in [
        (
            json!({"app": "deployer", "tollgate.dev/agent": "someone-else"}),
            json!({"op": "add", "path": "/metadata/labels/tollgate.dev~1agent", "value": "deployer"}),
        ),
        (
            json!(null),
            json!({"op": "add", "path": "/metadata/labels", "value": {"tollgate.dev/agent": "deployer"}}),
        ),
    ] {
        let (allowed, _, patch) = send(
            app(false, false, now),
            "/admission/mutate-pods",
            &create(pod(labels, "agent-deployer")),
        )
        .await;
        assert!(allowed);
        assert_eq!(patch[0], expected);
    }
    // Not an agent's pod: left alone.
    let (allowed, _, patch) = send(
        app(false, false, now),
        "/admission/mutate-pods",
        &create(pod(json!({"tollgate.dev/agent": "deployer"}), "default")),
    )
    .await;
    assert!(allowed && patch.is_empty(), "{patch:?}");
}

#[tokio::test]
async fn malformed_and_oversized_reviews_get_clear_errors() {
    let path = "/admission/validate-tollgate";
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "not JSON",
            b"{not json".to_vec(),
            "malformed AdmissionReview",
        ),
        (
            "no request",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
            "malformed AdmissionReview",
        ),
        (
            "wrong shape",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":1}}"#
                .to_vec(),
            "malformed AdmissionReview",
        ),
        ("empty", Vec::new(), "malformed AdmissionReview"),
    ];
    for (what, body, expected) in cases {
        let (status, body) = post(app(false, false, now), path, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}");
        assert!(
            body["error"].as_str().unwrap().contains(expected),
            "{what}: {body}"
        );
    }
    let huge = vec![b' '; admission::MAX_BODY + 1];
    let (status, _) = post(app(false, false, now), path, huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

/// SECURITY.md 6 and 9 for admission: every verdict on an agent's own write or an agent pod is
/// in the audit trail before the apiserver hears it (allowed ones too, the write named but never
/// its object); nobody else's requests are recorded; and when the trail cannot take the record,
/// the agent's request is refused, while everyone else's is not.
#[tokio::test]
async fn agents_requests_are_recorded_before_they_are_answered_and_refused_when_they_cannot_be() {
    use tollgate_audit::{AuditLog, Event, Query, SqliteStore, Store, WriterConfig};
    use tollgate_engine::{Decision, DenyCode};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let store = Arc::new(SqliteStore::open(&db).unwrap());
    let (log, _) = AuditLog::open(store.clone(), WriterConfig::new("admission-0"))
        .await
        .unwrap();
    let app = recording(false, false, now, Some(log));
    let delete = |labels: Value, user: &'static str| {
        Review::new("apps", "deployments", "Deployment", "DELETE", user).old(deployment(labels))
    };
    let writes = "/admission/validate-agents";
    // An agent's (or alice's) delete of a Deployment labelled `labels`: allowed, message.
    let write = async |labels: Value, user: &'static str| {
        let (allowed, message, _) = send(app.clone(), writes, &delete(labels, user)).await;
        (allowed, message)
    };
    let (allowed, _) = write(json!({"env": "production"}), AGENT).await;
    assert!(!allowed);
    let (allowed, _) = write(json!({"env": "staging"}), AGENT).await;
    assert!(allowed);
    let (allowed, _) = write(json!({"env": "production"}), "alice").await;
    assert!(allowed, "a person's write is not the agent's business");
    let pod = |labels: Value| {
        Review::new(
            "",
            "pods",
            "Pod",
            "CREATE",
            "system:serviceaccount:kube-system:replicaset-controller",
        )
        .object(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "x", "namespace": "ns", "labels": labels},
            "spec": {"serviceAccountName": "agent-deployer",
                     "containers": [{"name": "a", "image": "a", "env": [{"name": "API_KEY", "value": "s3cr3t"}]}]}}))
    };
    let (allowed, _, _) = send(
        app.clone(),
        "/admission/validate-pods",
        &pod(json!({"app": "other"})),
    )
    .await;
    assert!(!allowed);

    let records = store.query(&Query::default()).await.unwrap();
    let entries: Vec<_> = records.iter().map(|r| r.entry().unwrap()).collect();
    assert_eq!(
        entries.len(),
        3,
        "alice's write is not recorded: {entries:?}"
    );
    assert!(
        entries
            .iter()
            .all(|e| e.event == Event::Admission && e.agent.as_deref() == Some("ns/deployer"))
    );
    let (refused, allowed, pod) = (&entries[0], &entries[1], &entries[2]);
    assert_eq!(refused.identity.username, AGENT);
    assert_eq!(
        refused.arguments.as_ref().unwrap(),
        &json!({"operation": "DELETE", "group": "apps", "version": "v1", "resource": "deployments",
                "subresource": "", "namespace": "ns", "name": "x", "uid": "3f1c"})
    );
    match refused.decision.as_ref().unwrap() {
        Decision::Deny {
            code,
            rule,
            message,
        } => {
            assert_eq!(*code, DenyCode::WriteRefused);
            assert_eq!(&*rule.policy, "ns/deployer");
            assert_eq!(rule.clause, "spec.kubernetes.protectedResources[0]");
            assert!(rule.policy_hash.starts_with("sha256:"), "{rule:?}");
            assert!(
                message.contains("DELETE of apps deployments x"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(refused.policy.as_ref().unwrap().name, "ns/deployer");
    assert!(
        matches!(allowed.decision, Some(Decision::Allow { .. })),
        "{allowed:?}"
    );
    // The pod's creator is recorded, not the agent; the pod's secrets are not.
    assert_eq!(
        pod.identity.username,
        "system:serviceaccount:kube-system:replicaset-controller"
    );
    assert_eq!(
        pod.decision.as_ref().unwrap().deny_code(),
        Some(DenyCode::WriteRefused)
    );
    assert_eq!(
        pod.decision.as_ref().unwrap().rule().clause,
        "spec.podSelector"
    );
    let text = serde_json::to_string(&entries).unwrap();
    assert!(!text.contains("s3cr3t"), "{text}");
    tollgate_audit::verify(store.as_ref(), true, &Default::default())
        .await
        .unwrap();

    // The trail refuses writes from here on.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    conn.execute_batch(
        "CREATE TRIGGER tollgate_test_refuse BEFORE INSERT ON tollgate_audit_records
         BEGIN SELECT RAISE(ABORT, 'injected: the trail cannot be written'); END;",
    )
    .unwrap();
    let (allowed, message) = write(json!({"env": "staging"}), AGENT).await;
    assert!(
        !allowed,
        "an agent's write that cannot be recorded is refused"
    );
    assert!(
        message.contains("the audit trail cannot record this request of an agent"),
        "{message}"
    );
    let (allowed, message) = write(json!({"env": "production"}), AGENT).await;
    assert!(!allowed);
    assert!(
        message.contains("It is refused in any case") && message.contains("protectedResources[0]"),
        "the reason is kept: {message}"
    );
    let (allowed, message) = write(json!({"env": "production"}), "alice").await;
    assert!(allowed, "everyone else's writes go on: {message}");
    assert_eq!(store.query(&Query::default()).await.unwrap().len(), 3);
}
