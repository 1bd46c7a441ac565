//! The CRDs on a real kube-apiserver: they install and become Established, the samples apply,
//! every CEL rule refuses what it should with its message, and `kubectl explain` documents them.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tollgate_crds::{AgentIdentity, AgentPolicy, ApprovalRequest};
use tollgate_e2e::{User, control_plane, eventually, install_crds, repo_root};

#[tokio::test]
async fn crds_install_and_become_established() {
    install_crds();
    let api: Api<CustomResourceDefinition> = Api::all(control_plane().client(User::Admin).await);
    for crd in tollgate_crds::crds() {
        let name = crd.metadata.name.unwrap();
        let live = api
            .get(&name)
            .await
            .unwrap_or_else(|e| panic!("get crd {name}: {e}"));
        let conditions = live.status.and_then(|s| s.conditions).unwrap_or_default();
        for wanted in ["Established", "NamesAccepted"] {
            let condition = conditions.iter().find(|c| c.type_ == wanted);
            assert_eq!(
                condition.map(|c| c.status.as_str()),
                Some("True"),
                "{name}: condition {wanted} is {condition:?}"
            );
        }
        assert!(
            !conditions.iter().any(|c| c.type_ == "NonStructuralSchema"),
            "{name} has a non-structural schema: {conditions:?}"
        );
    }
}

#[tokio::test]
async fn samples_apply_cleanly() {
    install_crds();
    let cp = control_plane();
    let ns = cp.namespace("samples").await;
    let output = cp
        .kubectl(User::Admin)
        .args([
            "apply",
            "--server-side",
            "--validate=strict",
            "-n",
            &ns,
            "-k",
        ])
        .arg(repo_root().join("config/samples"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kubectl apply -k config/samples failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let client = cp.client(User::Admin).await;
    let policies: Api<AgentPolicy> = Api::namespaced(client.clone(), &ns);
    let support = policies.get("support-agent-v2").await.unwrap();
    assert_eq!(support.spec.tools.allowed.len(), 3);
    assert!(
        support
            .spec
            .tools
            .allowed
            .iter()
            .any(|t| t.name == "send_customer_email" && t.irreversible)
    );
    assert_eq!(
        support
            .spec
            .execution
            .as_ref()
            .unwrap()
            .max_cost_usd
            .as_deref(),
        Some("2.00")
    );
    // The standalone demo's model-calling agent (not in the kustomization) is a valid object
    // too: its llm upstream passes the schema and the CEL rules, and reads back whole.
    let output = cp
        .kubectl(User::Admin)
        .args([
            "apply",
            "--server-side",
            "--validate=strict",
            "-n",
            &ns,
            "-f",
        ])
        .arg(repo_root().join("config/samples/summarizer-agent.yaml"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kubectl apply summarizer-agent.yaml failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summarizer = policies.get("summarizer-agent").await.unwrap();
    let llm = summarizer.spec.upstreams[0].llm.as_ref().unwrap();
    assert_eq!(llm.models, ["gpt-4o-mini", "greedy"]);
    assert_eq!(
        llm.capture,
        tollgate_crds::policy::Capture::Digest,
        "the default"
    );
    let identities: Api<AgentIdentity> = Api::namespaced(client, &ns);
    let deploy = identities.get("deploy-agent").await.unwrap();
    assert_eq!(deploy.spec.kubernetes.rules.len(), 3);
    // Defaults from the schema were applied by the apiserver.
    assert_eq!(deploy.spec.service_account.token_audience, "tollgate");
    assert_eq!(deploy.service_account_name(), "agent-deploy-agent");
}

fn identity() -> Value {
    json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": {"name": "agent"},
        "spec": {
            "description": "test agent",
            "owner": {"team": "t", "contacts": ["a@example.com"]},
            "podSelector": {"matchLabels": {"app": "agent"}},
            "kubernetes": {"rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]},
            "credentials": [{"upstream": "crm", "secretRef": {"name": "s", "key": "k"}}]
        }
    })
}

fn policy() -> Value {
    json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentPolicy",
        "metadata": {"name": "agent"},
        "spec": {
            "identityRef": {"name": "agent"},
            "upstreams": [{"name": "crm", "mcp": {"url": "http://crm:8080/mcp"}}],
            "tools": {
                "allowed": [
                    {"name": "read", "upstream": "crm",
                     "arguments": {"fields": {"n": {"type": "integer", "minimum": 1, "maximum": 10}}}},
                    {"name": "send", "upstream": "crm", "irreversible": true,
                     "approval": {"approvers": {"groups": ["leads"]}}, "autonomy": "ExceptionBased",
                     "escalateWhen": "true"}
                ],
                "blocked": ["delete"]
            },
            "execution": {"maxSteps": 5, "maxCostUSD": "1.50", "perIdentity": {"window": "1h", "maxRuns": 3}},
            "kubernetes": {"freezeWindows": [{"start": "2026-12-20T00:00:00Z", "end": "2027-01-04T00:00:00Z"}]},
            "graduation": {"cleanCompletions": 10, "window": "720h"}
        }
    })
}

fn approval() -> Value {
    json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "ApprovalRequest",
        "metadata": {"name": "agent-1"},
        "spec": {
            "identityRef": {"name": "agent"},
            "policyRef": {"name": "agent", "policyHash": format!("sha256:{}", "a".repeat(64))},
            "runId": "run-1", "step": 3, "tool": "send",
            "arguments": {"to": "C000001", "nested": {"x": [1, 2]}},
            "argumentsDigest": format!("sha256:{}", "b".repeat(64)),
            "reason": "tool send is irreversible",
            "approvers": {"groups": ["leads"]},
            "minApprovals": 1,
            "expiresAt": "2030-01-01T00:00:00Z",
            "decisions": [{"verdict": "Approve", "user": "alice"}]
        }
    })
}

/// Sets `value` at a JSON pointer; the last segment may be a new object key.
fn with(mut object: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("a JSON pointer");
    let slot = match object
        .pointer_mut(parent)
        .unwrap_or_else(|| panic!("{parent} exists in the fixture"))
    {
        Value::Object(map) => map.entry(key.to_owned()).or_insert(Value::Null),
        Value::Array(items) => {
            // One past the end appends.
            let index = key.parse::<usize>().expect("an array index");
            if index == items.len() {
                items.push(Value::Null);
            }
            &mut items[index]
        }
        other => panic!("{parent} is {other}, not a container"),
    };
    *slot = value;
    object
}

async fn dynamic_api<K>(ns: &str) -> Api<DynamicObject>
where
    K: kube::Resource<DynamicType = ()>,
{
    let client = control_plane().client(User::Admin).await;
    Api::namespaced_with(client, ns, &ApiResource::erase::<K>(&()))
}

async fn create(api: &Api<DynamicObject>, object: &Value) -> Result<DynamicObject, kube::Error> {
    let object: DynamicObject = serde_json::from_value(object.clone()).unwrap();
    api.create(&PostParams::default(), &object).await
}

fn rejection(result: Result<DynamicObject, kube::Error>) -> String {
    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "expected 422 Invalid, got {status:?}");
            status.message
        }
        Err(other) => panic!("expected the apiserver to refuse the object, got {other}"),
        Ok(_) => panic!("the apiserver accepted an invalid object"),
    }
}

#[tokio::test]
async fn valid_fixtures_are_accepted() {
    install_crds();
    let ns = control_plane().namespace("crd-valid").await;
    create(&dynamic_api::<AgentIdentity>(&ns).await, &identity())
        .await
        .expect("the identity fixture is valid");
    create(&dynamic_api::<AgentPolicy>(&ns).await, &policy())
        .await
        .expect("the policy fixture is valid");
    create(&dynamic_api::<ApprovalRequest>(&ns).await, &approval())
        .await
        .expect("the approval fixture is valid");
}

#[tokio::test]
async fn cel_rules_refuse_invalid_identities() {
    install_crds();
    let ns = control_plane().namespace("crd-identity").await;
    let api = dynamic_api::<AgentIdentity>(&ns).await;
    let cases = [
        (
            "rules over rbac",
            with(
                identity(),
                "/spec/kubernetes/rules/0/apiGroups",
                json!(["rbac.authorization.k8s.io"]),
            ),
            "rules may not cover tollgate.dev or rbac.authorization.k8s.io",
        ),
        (
            "rules over tollgate.dev",
            with(
                identity(),
                "/spec/kubernetes/rules/0/apiGroups",
                json!(["", "tollgate.dev"]),
            ),
            "an agent cannot grant itself rights",
        ),
        (
            "escalate verb",
            with(
                identity(),
                "/spec/kubernetes/rules/0/verbs",
                json!(["get", "escalate"]),
            ),
            "the escalate, bind and impersonate verbs are not allowed",
        ),
        (
            "impersonate verb",
            with(
                identity(),
                "/spec/kubernetes/rules/0/verbs",
                json!(["impersonate"]),
            ),
            "the escalate, bind and impersonate verbs are not allowed",
        ),
        (
            "name too long",
            with(identity(), "/metadata/name", json!("a".repeat(58))),
            "at most 57 characters",
        ),
        (
            "credential format without placeholder",
            with(
                identity(),
                "/spec/credentials/0/format",
                json!("Bearer token"),
            ),
            "format must contain {} where the secret goes",
        ),
        (
            "no contacts",
            with(identity(), "/spec/owner/contacts", json!([])),
            "spec.owner.contacts",
        ),
        (
            "token lifetime too short",
            with(identity(), "/spec/kubernetes", json!({})),
            "",
        ),
    ];
    // The last case is valid (an empty kubernetes block); it guards against a fixture that
    // fails for a reason other than the one under test.
    for (what, object, message) in cases {
        if message.is_empty() {
            let object = with(object, "/metadata/name", json!("valid-empty-rights"));
            create(&api, &object)
                .await
                .unwrap_or_else(|e| panic!("{what}: a valid object was refused: {e}"));
            continue;
        }
        let refused = rejection(create(&api, &object).await);
        assert!(
            refused.contains(message),
            "{what}: expected the message to contain {message:?}, got: {refused}"
        );
    }
    let refused = rejection(
        create(
            &api,
            &with(
                identity(),
                "/spec/serviceAccount",
                json!({"tokenExpirationSeconds": 60}),
            ),
        )
        .await,
    );
    assert!(
        refused.contains("spec.serviceAccount.tokenExpirationSeconds"),
        "{refused}"
    );
}

#[tokio::test]
async fn cel_rules_refuse_invalid_policies() {
    install_crds();
    let ns = control_plane().namespace("crd-policy").await;
    let api = dynamic_api::<AgentPolicy>(&ns).await;
    let cases = [
        (
            "tool both allowed and blocked",
            with(policy(), "/spec/tools/blocked", json!(["delete", "read"])),
            "a tool cannot be both allowed and blocked",
        ),
        (
            "irreversible without approval",
            with(policy(), "/spec/tools/allowed/0/irreversible", json!(true)),
            "an irreversible tool needs an approval block",
        ),
        (
            "autonomy without approval",
            with(
                policy(),
                "/spec/tools/allowed/0/autonomy",
                json!("AuditBased"),
            ),
            "autonomy applies to tools with an approval block",
        ),
        (
            "escalateWhen without ExceptionBased",
            with(policy(), "/spec/tools/allowed/1/autonomy", json!("Gated")),
            "escalateWhen is only meaningful with autonomy ExceptionBased",
        ),
        (
            "unknown autonomy",
            with(policy(), "/spec/tools/allowed/1/autonomy", json!("Yolo")),
            "Unsupported value: \"Yolo\"",
        ),
        (
            "undeclared upstream",
            with(policy(), "/spec/tools/allowed/0/upstream", json!("billing")),
            "every tools.allowed[].upstream must name an entry of spec.upstreams",
        ),
        (
            "an upstream both MCP server and model provider",
            with(
                policy(),
                "/spec/upstreams/0/llm",
                json!({"api": "OpenAI", "url": "https://api.openai.com/v1", "models": ["m"]}),
            ),
            "an upstream is either an MCP server (mcp) or a model provider (llm), not both",
        ),
        (
            "a model provider without models",
            with(
                policy(),
                "/spec/upstreams/1",
                json!({"name": "models", "llm": {"api": "Anthropic", "url": "https://x", "models": []}}),
            ),
            "spec.upstreams[1].llm.models",
        ),
        (
            "a model provider of an unknown API",
            with(
                policy(),
                "/spec/upstreams/1",
                json!({"name": "models", "llm": {"api": "Gemini", "url": "https://x", "models": ["m"]}}),
            ),
            "Unsupported value: \"Gemini\"",
        ),
        (
            "a model provider URL that is not http",
            with(
                policy(),
                "/spec/upstreams/1",
                json!({"name": "models", "llm": {"api": "OpenAI", "url": "file:///etc/passwd", "models": ["m"]}}),
            ),
            "must be an absolute http or https URL",
        ),
        (
            "an MCP upstream with both a url and a stdio command",
            with(
                policy(),
                "/spec/upstreams/0/mcp/stdio",
                json!({"command": "npx", "args": ["some-server"]}),
            ),
            "an MCP upstream has either a url or a stdio command, exactly one",
        ),
        (
            "an MCP upstream with neither",
            with(policy(), "/spec/upstreams/0/mcp", json!({})),
            "an MCP upstream has either a url or a stdio command, exactly one",
        ),
        (
            "a transport for a stdio server",
            with(
                policy(),
                "/spec/upstreams/1",
                json!({"name": "local", "mcp": {"stdio": {"command": "srv"}, "transport": "Sse"}}),
            ),
            "transport is how the server at url speaks",
        ),
        (
            "an unknown MCP transport",
            with(
                policy(),
                "/spec/upstreams/0/mcp/transport",
                json!("WebSocket"),
            ),
            "Unsupported value: \"WebSocket\"",
        ),
        (
            "a stdio credential variable that is no variable name",
            with(
                policy(),
                "/spec/upstreams/1",
                json!({"name": "local", "mcp": {"stdio": {"command": "srv", "credentialEnv": "A=B"}}}),
            ),
            "spec.upstreams[1].mcp.stdio.credentialEnv",
        ),
        (
            "duplicate allowed tool",
            with(policy(), "/spec/tools/allowed/1/name", json!("read")),
            "Duplicate value",
        ),
        (
            "look-alike tool name",
            with(policy(), "/spec/tools/allowed/0/name", json!("re\u{0430}d")),
            "spec.tools.allowed[0].name",
        ),
        (
            "zero maxSteps",
            with(policy(), "/spec/execution/maxSteps", json!(0)),
            "spec.execution.maxSteps",
        ),
        (
            "zero cost ceiling",
            with(policy(), "/spec/execution/maxCostUSD", json!("0.00")),
            "maxCostUSD must be greater than zero",
        ),
        (
            "cost ceiling that is not a decimal",
            with(policy(), "/spec/execution/maxCostUSD", json!("1e3")),
            "spec.execution.maxCostUSD",
        ),
        (
            "zero window",
            with(policy(), "/spec/execution/perIdentity/window", json!("0s")),
            "window must be at least 1s",
        ),
        (
            "minimum above maximum",
            with(
                policy(),
                "/spec/tools/allowed/0/arguments/fields/n/minimum",
                json!(11),
            ),
            "minimum must not exceed maximum",
        ),
        (
            "non-http upstream",
            with(
                policy(),
                "/spec/upstreams/0/mcp/url",
                json!("ftp://crm/mcp"),
            ),
            "must be an absolute http or https URL",
        ),
        (
            "freeze window ending before it starts",
            with(
                policy(),
                "/spec/kubernetes/freezeWindows/0/end",
                json!("2026-12-01T00:00:00Z"),
            ),
            "end must be after start",
        ),
        (
            "empty approver set",
            with(
                policy(),
                "/spec/tools/allowed/1/approval/approvers",
                json!({"groups": [], "users": []}),
            ),
            "name at least one approver group or user",
        ),
        (
            "unknown onTimeout",
            with(
                policy(),
                "/spec/tools/allowed/1/approval/onTimeout",
                json!("Approve"),
            ),
            "Unsupported value: \"Approve\"",
        ),
        (
            "minApprovals above ten",
            with(
                policy(),
                "/spec/tools/allowed/1/approval/minApprovals",
                json!(11),
            ),
            "spec.tools.allowed[1].approval.minApprovals",
        ),
    ];
    for (what, object, message) in cases {
        let refused = rejection(create(&api, &object).await);
        assert!(
            refused.contains(message),
            "{what}: expected the message to contain {message:?}, got: {refused}"
        );
    }
}

#[tokio::test]
async fn approval_requests_are_immutable_except_for_appended_decisions() {
    install_crds();
    let ns = control_plane().namespace("crd-approval").await;
    let api = dynamic_api::<ApprovalRequest>(&ns).await;

    let refused = rejection(
        create(
            &api,
            &with(approval(), "/spec/argumentsDigest", json!("md5:abc")),
        )
        .await,
    );
    assert!(refused.contains("spec.argumentsDigest"), "{refused}");
    let refused = rejection(
        create(
            &api,
            &with(approval(), "/spec/decisions/0/verdict", json!("Maybe")),
        )
        .await,
    );
    assert!(
        refused.contains("Unsupported value: \"Maybe\""),
        "{refused}"
    );

    create(&api, &approval())
        .await
        .expect("the approval fixture is valid");
    let patch = |ops: Value| {
        let api = api.clone();
        async move {
            api.patch(
                "agent-1",
                &PatchParams::default(),
                &Patch::<()>::Json(serde_json::from_value(ops).unwrap()),
            )
            .await
        }
    };
    let immutable = "the spec of an ApprovalRequest is immutable";
    let append_only = "decisions can only be appended";
    let cases = [
        (
            "change the tool",
            json!([{"op": "replace", "path": "/spec/tool", "value": "other"}]),
            immutable,
        ),
        (
            "change the arguments",
            json!([{"op": "replace", "path": "/spec/arguments/to", "value": "C999999"}]),
            immutable,
        ),
        (
            "extend the expiry",
            json!([{"op": "replace", "path": "/spec/expiresAt", "value": "2031-01-01T00:00:00Z"}]),
            immutable,
        ),
        (
            "widen the approvers",
            json!([{"op": "add", "path": "/spec/approvers/users", "value": ["mallory"]}]),
            immutable,
        ),
        (
            "flip a decision",
            json!([{"op": "replace", "path": "/spec/decisions/0/verdict", "value": "Deny"}]),
            append_only,
        ),
        (
            "remove a decision",
            json!([{"op": "remove", "path": "/spec/decisions/0"}]),
            append_only,
        ),
        (
            "insert before an existing decision and drop it",
            json!([{"op": "replace", "path": "/spec/decisions", "value": [{"verdict": "Deny"}]}]),
            append_only,
        ),
    ];
    for (what, ops, message) in cases {
        let refused = match patch(ops).await {
            Err(kube::Error::Api(status)) => status.message,
            other => panic!("{what}: expected a refusal, got {other:?}"),
        };
        assert!(
            refused.contains(message),
            "{what}: expected {message:?}, got: {refused}"
        );
    }
    let appended = patch(json!([{"op": "add", "path": "/spec/decisions/-", "value": {"verdict": "Deny", "comment": "no"}}]))
        .await
        .expect("appending a decision is allowed");
    assert_eq!(
        appended.data["spec"]["decisions"].as_array().map(Vec::len),
        Some(2)
    );
}

#[tokio::test]
async fn kubectl_explain_documents_the_fields() {
    install_crds();
    let cp = control_plane();
    // The apiserver publishes a new CRD's OpenAPI a moment after it is Established.
    let text = eventually(
        "kubectl explain agentpolicy.spec.tools",
        Duration::from_secs(60),
        || async {
            let output = cp
                .kubectl(User::Admin)
                .args(["explain", "agentpolicy.spec.tools"])
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&output.stdout).into_owned();
            (output.status.success() && text.contains("allowed")).then_some(text)
        },
    )
    .await;
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    for expected in [
        "Which tools the agent may call, under which constraints. Anything not allowed is",
        "The tools the agent may call, each with its constraints.",
        "Tools that are always denied.",
    ] {
        assert!(
            text.contains(expected),
            "kubectl explain lacks {expected:?}:\n{text}"
        );
    }
    let output = cp
        .kubectl(User::Admin)
        .args(["explain", "approvalrequest.spec.argumentsDigest"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        text.contains("An approval releases only a call with exactly these arguments."),
        "{text}"
    );
}

#[tokio::test]
async fn printer_columns_answer_is_it_in_force() {
    install_crds();
    let cp = control_plane();
    let ns = cp.namespace("crd-columns").await;
    create(&dynamic_api::<AgentIdentity>(&ns).await, &identity())
        .await
        .unwrap();
    let output = cp
        .kubectl(User::Admin)
        .args(["get", "agid", "-n", &ns])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let header = text.lines().next().unwrap_or_default();
    for column in ["NAME", "SERVICEACCOUNT", "READY", "KILLED", "AGE"] {
        assert!(
            header.contains(column),
            "kubectl get agid lacks {column}: {text}"
        );
    }
    assert!(
        text.contains("false"),
        "the kill switch column shows the spec value: {text}"
    );
    let output = cp
        .kubectl(User::Admin)
        .args(["get", "tollgate", "-n", &ns, "-o", "name"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("agentidentity.tollgate.dev/agent"),
        "the tollgate category lists the identity: {text}"
    );
}
