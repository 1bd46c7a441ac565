//! The LLM proxy on the node: an agent pod calls its model provider through the gateway's
//! Service with its projected ServiceAccount token as the API key; the provider key is a Secret
//! only the gateway reads, and the provider (the fake one, `e2e-agent fake-llm`) is out of the
//! agent's reach except through the gateway. A stream that goes past the run's ceiling is cut
//! and the run halted, though the agent reports nothing.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tollgate_e2e::User;

use crate::support::{self, AGENT_IMAGE, SYSTEM, Test, eventually, kubectl, kubectl_out};

/// `kubectl apply` of `yaml`, retried while the webhook's Service has no endpoint yet (this test
/// may be the first to write after the chart's install).
fn apply(yaml: &str) {
    let mut last = String::new();
    eventually(
        "kubectl apply",
        Duration::from_secs(60),
        || {
            let output = tollgate_e2e::with_input(
                support::node()
                    .control_plane()
                    .kubectl(User::Admin)
                    .args(["apply", "-f", "-"]),
                yaml,
            );
            last = String::from_utf8_lossy(&output.stderr).into_owned();
            assert!(
                output.status.success() || last.contains("failed calling webhook"),
                "kubectl apply failed: {last}\n{yaml}"
            );
            output.status.success().then_some(())
        },
        String::new,
    );
}

pub fn tests() -> Vec<Test> {
    vec![Test {
        name: "an_agent_pod_calls_its_model_through_the_gateway_which_meters_it_and_cuts_it_at_the_ceiling",
        run: an_agent_pod_calls_its_model_through_the_gateway_which_meters_it_and_cuts_it_at_the_ceiling,
    }]
}

const NS: &str = "writers";
const AGENT: &str = "summarizer";
const POD: &str = "summarizer";
const TOKEN: &str = "/var/run/secrets/tollgate.dev/token";
const CA: &str = "/etc/tollgate-gateway/ca.crt";
pub const PROVIDER_KEY: &str = "sk-fake-provider";

fn setting() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        support::installed();
        let started = Instant::now();
        kubectl(&["create", "namespace", NS]);
        let ca = support::gateway_ca();
        apply(&format!(
            r#"apiVersion: v1
kind: Secret
metadata: {{name: model-provider, namespace: {NS}}}
stringData: {{api-key: {PROVIDER_KEY}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: tollgate-gateway-credentials, namespace: {NS}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: tollgate-gateway-credentials}}
subjects: [{{kind: ServiceAccount, name: tollgate-gateway, namespace: {SYSTEM}}}]
---
apiVersion: v1
kind: Secret
metadata: {{name: tollgate-gateway-ca, namespace: {NS}}}
data: {{ca.crt: {ca}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: fake-llm, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: fake-llm}}}}
  template:
    metadata: {{labels: {{app: fake-llm}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: provider
        image: {AGENT_IMAGE}
        imagePullPolicy: Never
        args: [fake-llm, --listen=0.0.0.0:8490]
        ports: [{{containerPort: 8490}}]
        readinessProbe: {{httpGet: {{path: /v1/models, port: 8490}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: fake-llm, namespace: {NS}}}
spec:
  selector: {{app: fake-llm}}
  ports: [{{port: 8490}}]
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{name: {AGENT}, namespace: {NS}}}
spec:
  description: Summarizes tickets with a model
  owner: {{team: support, contacts: [alice@example.com]}}
  podSelector: {{matchLabels: {{app: {AGENT}}}}}
  credentials:
    - {{upstream: models, secretRef: {{name: model-provider, key: api-key}}, header: Authorization, format: "Bearer {{}}"}}
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentPolicy
metadata: {{name: {AGENT}, namespace: {NS}}}
spec:
  identityRef: {{name: {AGENT}}}
  upstreams:
    - name: models
      llm: {{api: OpenAI, url: "http://fake-llm.{NS}.svc:8490/v1", models: [gpt-4o-mini, greedy]}}
  execution: {{maxTokensPerRun: 300}}
"#
        ));
        eventually(
            "the summarizer's ServiceAccount",
            Duration::from_secs(60),
            || {
                kubectl(&["-n", NS, "get", "serviceaccounts", "-o", "name"])
                    .contains(&format!("agent-{AGENT}"))
                    .then_some(())
            },
            || kubectl_out(&["-n", NS, "get", "agentidentity", AGENT, "-o", "yaml"]),
        );
        apply(&format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: {POD}, namespace: {NS}, labels: {{app: {AGENT}}}}}
spec:
  serviceAccountName: agent-{AGENT}
  terminationGracePeriodSeconds: 1
  securityContext: {{runAsNonRoot: true}}
  containers:
  - name: agent
    image: {AGENT_IMAGE}
    imagePullPolicy: Never
    args: [sleep]
    securityContext: {{allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {{drop: [ALL]}}}}
    volumeMounts: [{{name: gateway-ca, mountPath: /etc/tollgate-gateway, readOnly: true}}]
  volumes: [{{name: gateway-ca, secret: {{secretName: tollgate-gateway-ca}}}}]
"#
        ));
        support::wait_ready(NS, &format!("app in ({AGENT}, fake-llm)"));
        eprintln!(
            "[e2e node] the summarizer's pod and the fake provider Ready in {:.1}s",
            started.elapsed().as_secs_f64()
        );
    });
}

/// Runs `e2e-agent ARGS` in the agent's pod: its JSON line and exit code.
fn in_agent(args: &[&str]) -> (Value, i32) {
    let output = support::node()
        .control_plane()
        .kubectl(User::Admin)
        .args(["exec", "-n", NS, POD, "--", "/usr/local/bin/e2e-agent"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let value = serde_json::from_str(stdout.trim()).unwrap_or(Value::String(stdout.trim().into()));
    (value, output.status.code().unwrap_or(-1))
}

/// A chat completion from the agent's pod through the gateway, in `run`.
fn chat(run: &str, body: &Value) -> Value {
    let body = body.to_string();
    let run = format!("tollgate-run-id:{run}");
    // The gateway's pod may just have been replaced by another test: retry until it answers.
    eventually(
        "an answer from the gateway",
        Duration::from_secs(30),
        || {
            let (answer, code) = in_agent(&[
                "http",
                "$TOLLGATE_URL/llm/models/chat/completions",
                "--token-file",
                TOKEN,
                "--ca",
                CA,
                "--header",
                &run,
                "--body",
                &body,
            ]);
            // No answer, or none from the provider yet (its Service's endpoints, the gateway's
            // read of the credential: both converge within seconds of the pods being Ready).
            let settling = matches!(answer["status"].as_u64(), Some(502 | 503));
            (code == 0 && !settling).then_some(answer)
        },
        || kubectl_out(&["-n", SYSTEM, "get", "pods", "-o", "wide"]),
    )
}

fn an_agent_pod_calls_its_model_through_the_gateway_which_meters_it_and_cuts_it_at_the_ceiling() {
    setting();
    let answer = chat(
        "llm-run-1",
        &json!({"model": "gpt-4o-mini", "max_tokens": 5000,
            "messages": [{"role": "user", "content": "Summarize ticket T000042."}]}),
    );
    assert_eq!(answer["status"], 200, "{answer}");
    let body = &answer["body"];
    assert_eq!(body["usage"]["completion_tokens"], 40, "{answer}");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("the gate")
    );

    // A model the policy does not list: refused at the gateway, in OpenAI's error shape.
    let refused = chat(
        "llm-run-1",
        &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(refused["status"], 403, "{refused}");
    assert_eq!(
        refused["body"]["error"]["code"], "ModelNotAllowed",
        "{refused}"
    );

    // The provider itself is out of the agent's reach: only the gateway holds its key, and the
    // agent's NetworkPolicy lets it reach nothing but the gateway and DNS.
    let (direct, code) = in_agent(&[
        "connect",
        &format!("fake-llm.{NS}.svc:8490"),
        "--timeout-ms",
        "2000",
    ]);
    assert_ne!(code, 0, "the agent reached its provider directly: {direct}");

    // A provider that ignores the cap: the stream is cut where the run's 300 tokens end, and the
    // run halts with no report from the agent.
    let cut = chat(
        "llm-run-1",
        &json!({"model": "greedy", "stream": true,
            "messages": [{"role": "user", "content": "Summarize every ticket."}]}),
    );
    assert_eq!(cut["status"], 200, "{cut}");
    let events = cut["body"].as_str().unwrap_or_default();
    assert!(
        events.trim_end().ends_with('}') && events.contains("maxTokensPerRun"),
        "the stream did not end with Tollgate's error event: {}",
        &events[events.len().saturating_sub(600)..]
    );
    let deltas = events.matches("\"content\":\"").count();
    assert!(deltas < 300, "{deltas} deltas got through a 300-token run");
    let halted = chat(
        "llm-run-1",
        &json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one more"}]}),
    );
    assert_eq!(halted["status"], 403, "{halted}");
    assert_eq!(halted["body"]["tollgate"]["decision"], "halt", "{halted}");
    // Another run of the agent goes on.
    let other = chat(
        "llm-run-2",
        &json!({"model": "gpt-4o-mini", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(other["status"], 200, "{other}");
}
