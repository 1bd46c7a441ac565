//! Agents as pods: admitted with their identity, calling tools through the gateway's Service,
//! confined to it by the NetworkPolicy the operator writes.
//!
//! The setting: namespace `support` with the sample `support-agent-v2` (AgentIdentity and
//! AgentPolicy from `config/samples`, its approvers the `tollgate-approvers` group), its CRM tool
//! server `crm-mcp` (the `e2e-agent upstream` program, rmcp, answering only calls that carry the
//! credential in Secret `crm-token`), and the agent's pod running `e2e-agent sleep`, into which
//! the tests exec the calls an agent makes.

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tollgate_e2e::User;

use crate::support::{
    self, AGENT_IMAGE, SYSTEM, Test, apply, eventually, kubectl, kubectl_out, tollgate,
};

pub fn tests() -> Vec<Test> {
    vec![
        Test {
            name: "an_agent_pod_is_admitted_with_its_token_and_gateway_url_and_no_other_workload_may_use_its_account",
            run: an_agent_pod_is_admitted_with_its_token_and_gateway_url_and_no_other_workload_may_use_its_account,
        },
        Test {
            name: "an_agent_pod_calls_through_the_gateway_service_and_is_held_to_its_policy",
            run: an_agent_pod_calls_through_the_gateway_service_and_is_held_to_its_policy,
        },
        Test {
            name: "an_irreversible_call_from_a_pod_waits_until_alice_approves_it_with_kubectl_tollgate",
            run: an_irreversible_call_from_a_pod_waits_until_alice_approves_it_with_kubectl_tollgate,
        },
        Test {
            name: "an_agent_pod_reaches_its_tool_server_only_through_the_gateway_which_adds_the_credential",
            run: an_agent_pod_reaches_its_tool_server_only_through_the_gateway_which_adds_the_credential,
        },
        Test {
            name: "a_stdio_server_runs_as_a_pod_behind_the_bridge_for_the_gateway_alone",
            run: a_stdio_server_runs_as_a_pod_behind_the_bridge_for_the_gateway_alone,
        },
        Test {
            name: "only_agent_pods_reach_the_gateways_api",
            run: only_agent_pods_reach_the_gateways_api,
        },
    ]
}

/// A pod of no agent, `name` in `namespace` (labelled `app: NAME`), running the test agent's
/// image idle, Ready; applying it again is harmless.
fn bystander(namespace: &str, name: &str) {
    apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {namespace}, labels: {{app: {name}}}}}
spec:
  terminationGracePeriodSeconds: 1
  containers: [{{name: probe, image: {AGENT_IMAGE}, imagePullPolicy: Never, args: [sleep]}}]
"#
    ));
    support::wait_ready(namespace, &format!("app={name}"));
}

/// A pod that is no agent's, in the agent's namespace, and one in Tollgate's own: the gateway's
/// ingress NetworkPolicy (the chart's) lets neither reach its API, by Service or pod IP, while
/// the agent's pod, labelled by admission, does; its probe port stays open to all.
fn only_agent_pods_reach_the_gateways_api() {
    support();
    for (namespace, name) in [(NS, "bystander"), (SYSTEM, "tollgate-bystander")] {
        bystander(namespace, name);
    }
    let labels = kubectl(&[
        "-n",
        NS,
        "get",
        "pod",
        AGENT_POD,
        "-o",
        "jsonpath={.metadata.labels.tollgate\\.dev/agent}",
    ]);
    assert_eq!(labels, AGENT, "admission labelled the agent's pod");
    let gateway_ip = kubectl(&[
        "-n",
        SYSTEM,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=tollgate-gateway",
        "-o",
        "jsonpath={.items[0].status.podIP}",
    ]);
    let service = format!("tollgate-gateway.{SYSTEM}.svc:8443");
    let api = format!("{gateway_ip}:8444");
    let probes = format!("{gateway_ip}:8080");
    let connect = |namespace: &str, pod: &str, address: &str| -> i32 {
        let output = support::node()
            .control_plane()
            .kubectl(tollgate_e2e::User::Admin)
            .args([
                "exec",
                "-n",
                namespace,
                pod,
                "--",
                "/usr/local/bin/e2e-agent",
            ])
            .args(["connect", address, "--timeout-ms=2000"])
            .output()
            .unwrap();
        output.status.code().unwrap_or(-1)
    };
    assert_eq!(
        connect(NS, AGENT_POD, &service),
        0,
        "the agent reaches the gateway"
    );
    assert_eq!(
        connect(NS, AGENT_POD, &api),
        0,
        "the agent reaches the gateway's pod"
    );
    for (namespace, pod) in [(NS, "bystander"), (SYSTEM, "tollgate-bystander")] {
        assert_eq!(
            connect(namespace, pod, &service),
            1,
            "{pod} reached the gateway's Service"
        );
        assert_eq!(
            connect(namespace, pod, &api),
            1,
            "{pod} reached the gateway's API"
        );
        assert_eq!(
            connect(namespace, pod, &probes),
            0,
            "{pod} reaches the probe port"
        );
    }
    kubectl(&[
        "-n",
        SYSTEM,
        "delete",
        "pod",
        "tollgate-bystander",
        "--wait=false",
    ]);
}

pub const NS: &str = "support";
pub const AGENT: &str = "support-agent-v2";
pub const AGENT_POD: &str = "support-agent";
pub const TOKEN: &str = "/var/run/secrets/tollgate.dev/token";
pub const CA: &str = "/etc/tollgate-gateway/ca.crt";
pub const CREDENTIAL: &str = "crm-secret-123";

/// The support namespace with its agent, policy, tool server and the agent's pod, once.
pub fn support() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        support::installed();
        let started = Instant::now();
        kubectl(&["create", "namespace", NS]);
        let ca = support::gateway_ca();
        apply(&format!(
            r#"apiVersion: v1
kind: Secret
metadata: {{name: crm-token, namespace: {NS}}}
stringData: {{token: {CREDENTIAL}}}
---
# The gateway reads the agent's tool credentials in this namespace (the chart's README step).
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: tollgate-gateway-credentials, namespace: {NS}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: tollgate-gateway-credentials}}
subjects: [{{kind: ServiceAccount, name: tollgate-gateway, namespace: {SYSTEM}}}]
---
# Approvers decide the agent's ApprovalRequests.
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: approvers, namespace: {NS}}}
rules:
- {{apiGroups: [tollgate.dev], resources: [approvalrequests], verbs: [get, list, watch, patch]}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: approvers, namespace: {NS}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: approvers}}
subjects: [{{kind: Group, name: tollgate-approvers, apiGroup: rbac.authorization.k8s.io}}]
---
# How the agent trusts the gateway's serving certificate.
apiVersion: v1
kind: Secret
metadata: {{name: tollgate-gateway-ca, namespace: {NS}}}
data: {{ca.crt: {ca}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: crm-mcp, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: crm-mcp}}}}
  template:
    metadata: {{labels: {{app: crm-mcp}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: crm
        image: {AGENT_IMAGE}
        imagePullPolicy: Never
        args: [upstream, --listen=0.0.0.0:8080, "--credential=Bearer {CREDENTIAL}",
          --allowed-host=crm-mcp.{NS}.svc:8080, --allowed-host=crm-mcp.{NS}.svc.cluster.local:8080]
        ports: [{{containerPort: 8080}}]
        readinessProbe: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: crm-mcp, namespace: {NS}}}
spec:
  selector: {{app: crm-mcp}}
  ports: [{{port: 8080}}]
"#
        ));
        let sample = std::fs::read_to_string(
            tollgate_e2e::repo_root().join("config/samples/support-agent.yaml"),
        )
        .unwrap()
        .replace(
            "approvers: {groups: [support-leads], users: []}",
            "approvers: {groups: [tollgate-approvers], users: []}",
        );
        let output = tollgate_e2e::with_input(
            support_kubectl().args(["apply", "-n", NS, "-f", "-"]),
            &sample,
        );
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        // The operator gives the identity its ServiceAccount before any pod may use it.
        eventually(
            "the agent's ServiceAccount",
            Duration::from_secs(60),
            || kubectl(&["-n", NS, "get", "serviceaccounts", "-o", "name"])
                .contains(&format!("agent-{AGENT}"))
                .then_some(()),
            || kubectl_out(&["-n", NS, "get", "agentidentity", AGENT, "-o", "yaml"]),
        );
        apply(&agent_pod(AGENT_POD, "support-agent"));
        support::wait_ready(NS, "app in (support-agent, crm-mcp)");
        eprintln!(
            "[e2e node] the support agent's pod and tool server Ready in {:.1}s",
            started.elapsed().as_secs_f64()
        );
    });
}

/// A binding Tollgate does not manage (a platform team's): the agent may create ConfigMaps
/// whatever its switch says, so that only admission stands between the agent and that write.
pub fn platform_writer() {
    apply(&format!(
        "apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: platform-configmap-writer, namespace: {NS}}}
rules: [{{apiGroups: [\"\"], resources: [configmaps], verbs: [create]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: platform-configmap-writer, namespace: {NS}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: platform-configmap-writer}}
subjects: [{{kind: ServiceAccount, name: agent-{AGENT}, namespace: {NS}}}]
"
    ));
}

fn support_kubectl() -> Command {
    support::node().control_plane().kubectl(User::Admin)
}

/// A pod of the agent's ServiceAccount labelled `app: <app>`, idling in `e2e-agent sleep`.
fn agent_pod(name: &str, app: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {NS}, labels: {{app: {app}}}}}
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
    )
}

/// Runs `e2e-agent ARGS` in the agent's pod; returns its JSON line and exit code.
pub fn in_agent(pod: &str, args: &[&str]) -> (Value, i32) {
    let output = support_kubectl()
        .args(["exec", "-n", NS, pod, "--", "/usr/local/bin/e2e-agent"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let value = serde_json::from_str(stdout.trim()).unwrap_or(Value::String(stdout.trim().into()));
    (value, output.status.code().unwrap_or(-1))
}

/// POSTs `body` to `$TOLLGATE_URL<path>` from the agent's pod with its projected token.
pub fn call(pod: &str, path: &str, body: &Value) -> Value {
    let url = format!("$TOLLGATE_URL{path}");
    let body = body.to_string();
    let (answer, code) = in_agent(
        pod,
        &[
            "http",
            &url,
            "--token-file",
            TOKEN,
            "--ca",
            CA,
            "--body",
            &body,
        ],
    );
    assert_eq!(code, 0, "no answer from the gateway: {answer}");
    answer
}

fn decide(run: &str, tool: &str, arguments: Value) -> Value {
    call(
        AGENT_POD,
        "/v1/decide",
        &json!({"runId": run, "tool": tool, "arguments": arguments}),
    )
}

fn an_agent_pod_is_admitted_with_its_token_and_gateway_url_and_no_other_workload_may_use_its_account()
 {
    support();
    let pod: Value =
        serde_json::from_str(&kubectl(&["-n", NS, "get", "pod", AGENT_POD, "-o", "json"])).unwrap();
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    let token = volumes
        .iter()
        .find(|v| v["name"] == "tollgate-token")
        .unwrap_or_else(|| panic!("no projected token volume: {volumes:?}"));
    let projected = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(projected["audience"], "tollgate", "{token}");
    assert_eq!(projected["expirationSeconds"], 3600, "{token}");
    let env = pod["spec"]["containers"][0]["env"].as_array().unwrap();
    assert!(
        env.contains(&json!({"name": "TOLLGATE_URL", "value": format!("https://tollgate-gateway.{SYSTEM}.svc:8443")})),
        "{env:?}"
    );
    // The token in the pod is the agent's, for the gateway's audience.
    let (whoami, code) = in_agent(
        AGENT_POD,
        &[
            "http",
            "$TOLLGATE_URL/v1/decide",
            "--ca",
            CA,
            "--body",
            "{}",
        ],
    );
    assert_eq!(code, 0, "{whoami}");
    assert_eq!(whoami["status"], 401, "no token, no entry: {whoami}");

    // A pod of another workload (its labels do not match the identity's podSelector) that names
    // the agent's ServiceAccount is refused: it would act with the agent's rights.
    let output = tollgate_e2e::with_input(
        support_kubectl().args(["apply", "-f", "-"]),
        &agent_pod("impostor", "other-workload"),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the impostor pod was admitted");
    assert!(stderr.contains("denied the request"), "{stderr}");
    assert!(
        stderr.contains(AGENT) || stderr.contains("podSelector"),
        "{stderr}"
    );
    assert!(kubectl_out(&["-n", NS, "get", "pod", "impostor"]).contains("NotFound"));
}

fn an_agent_pod_calls_through_the_gateway_service_and_is_held_to_its_policy() {
    support();
    let allowed = decide(
        "pod-run-1",
        "read_customer_record",
        json!({"customer_id": "C000042"}),
    );
    assert_eq!(allowed["status"], 200, "{allowed}");
    assert_eq!(allowed["body"]["decision"], "allow", "{allowed}");

    let blocked = decide(
        "pod-run-1",
        "delete_customer_record",
        json!({"customer_id": "C000042"}),
    );
    assert_eq!(blocked["body"]["decision"], "deny", "{blocked}");
    assert_eq!(blocked["body"]["code"], "ToolBlocked", "{blocked}");

    let constrained = decide(
        "pod-run-1",
        "read_customer_record",
        json!({"customer_id": "42; DROP"}),
    );
    assert_eq!(constrained["body"]["decision"], "deny", "{constrained}");
    assert_eq!(
        constrained["body"]["code"], "ArgumentConstraint",
        "{constrained}"
    );

    // A budget halt: the run's cost ceiling is $2.00; one reported call costs $2.50.
    let step = allowed["body"]["step"].clone();
    let report = call(
        AGENT_POD,
        "/v1/report",
        &json!({"runId": "pod-run-1", "step": step, "tool": "read_customer_record",
                "result": {"customer_id": "C000042"}, "usage": {"tokens": 100, "cost": "2.50"}}),
    );
    assert_eq!(report["status"], 200, "{report}");
    let halted = decide(
        "pod-run-1",
        "read_customer_record",
        json!({"customer_id": "C000042"}),
    );
    assert_eq!(halted["body"]["decision"], "halt", "{halted}");
    // Halted for good: the run never resumes, whatever comes next.
    let again = decide(
        "pod-run-1",
        "read_customer_record",
        json!({"customer_id": "C000043"}),
    );
    assert_eq!(again["body"]["decision"], "halt", "{again}");
}

fn an_irreversible_call_from_a_pod_waits_until_alice_approves_it_with_kubectl_tollgate() {
    support();
    let body = json!({"runId": "pod-run-approval", "tool": "send_customer_email",
        "arguments": {"customer_id": "C000042", "subject": "Your refund", "body": "Done."}})
    .to_string();
    // The agent's call waits, in the pod, while people decide.
    let waiting = support_kubectl()
        .args([
            "exec",
            "-n",
            NS,
            AGENT_POD,
            "--",
            "/usr/local/bin/e2e-agent",
            "http",
        ])
        .args([
            "$TOLLGATE_URL/v1/decide",
            "--token-file",
            TOKEN,
            "--ca",
            CA,
            "--timeout-ms",
            "120000",
        ])
        .args(["--body", &body])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let name = eventually(
        "the ApprovalRequest of the waiting call",
        Duration::from_secs(30),
        || {
            let names = kubectl(&[
                "-n",
                NS,
                "get",
                "approvalrequests",
                "-o",
                "jsonpath={.items[*].metadata.name}",
            ]);
            names.split_whitespace().next().map(str::to_owned)
        },
        || kubectl_out(&["-n", NS, "get", "approvalrequests", "-o", "yaml"]),
    );
    // carol may not decide; alice may.
    let refused = tollgate(User::Carol, &["approve", &name, "-n", NS]);
    assert!(!refused.status.success(), "carol approved");
    let approved = tollgate(User::Alice, &["approve", &name, "-n", NS]);
    assert!(
        approved.status.success(),
        "alice could not approve: {}{}",
        String::from_utf8_lossy(&approved.stdout),
        String::from_utf8_lossy(&approved.stderr)
    );
    let output = waiting.wait_with_output().unwrap();
    let answer: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&output.stderr)));
    assert_eq!(answer["body"]["decision"], "allow", "{answer}");
}

fn an_agent_pod_reaches_its_tool_server_only_through_the_gateway_which_adds_the_credential() {
    support();
    // The tool server answers from a pod the identity does not select (no NetworkPolicy).
    bystander(NS, "bystander");
    let (reached, code) = in_agent("bystander", &["connect", "crm-mcp.support.svc:8080"]);
    assert_eq!(
        code, 0,
        "the tool server is up and reachable from other pods: {reached}"
    );

    // From the agent's pod: no direct connection, neither by Service nor to the pod's own IP.
    let (direct, code) = in_agent(AGENT_POD, &["connect", "crm-mcp.support.svc:8080"]);
    assert_eq!(
        code, 1,
        "the agent reached its tool server directly: {direct}"
    );
    let pod_ip = kubectl(&[
        "-n",
        NS,
        "get",
        "pods",
        "-l",
        "app=crm-mcp",
        "-o",
        "jsonpath={.items[0].status.podIP}",
    ]);
    let (direct, code) = in_agent(AGENT_POD, &["connect", &format!("{pod_ip}:8080")]);
    assert_eq!(
        code, 1,
        "the agent reached its tool server's pod directly: {direct}"
    );

    // Through the gateway's MCP proxy: the call goes, with the credential the gateway adds.
    let mcp = |body: Value, session: Option<&str>| mcp_from_agent("crm", &body, session);
    let init = mcp(
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "e2e-agent", "version": "1"}}}),
        None,
    );
    assert_eq!(init["status"], 200, "{init}");
    let session = init["headers"]["mcp-session-id"]
        .as_str()
        .unwrap_or_else(|| panic!("no session: {init}"))
        .to_owned();
    mcp(
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        Some(&session),
    );
    let called = mcp(
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "read_customer_record", "arguments": {"customer_id": "C000042"}}}),
        Some(&session),
    );
    let text = called.to_string();
    assert!(text.contains("C000042"), "{called}");
    assert!(
        !text.contains("123-45-6789"),
        "a field outside resultFields leaked: {called}"
    );
    let logs = kubectl(&["-n", NS, "logs", "deployment/crm-mcp"]);
    assert!(
        logs.contains("tools/call read_customer_record authorization=expected"),
        "the tool server did not see the gateway's credential:\n{logs}"
    );
    assert!(!logs.contains("missing-or-wrong"), "{logs}");
}

/// POSTs the MCP message `body` to `$TOLLGATE_URL/mcp/<upstream>` from the agent's pod with its
/// projected token, in `session` when given; the answer as `e2e-agent http` prints it.
fn mcp_from_agent(upstream: &str, body: &Value, session: Option<&str>) -> Value {
    let url = format!("$TOLLGATE_URL/mcp/{upstream}");
    let body = body.to_string();
    let session = session.map(|s| format!("mcp-session-id: {s}"));
    let mut args = vec![
        "http",
        &url,
        "--token-file",
        TOKEN,
        "--ca",
        CA,
        "--header",
        "accept: application/json, text/event-stream",
        "--body",
        &body,
    ];
    if let Some(session) = &session {
        args.extend(["--header", session]);
    }
    let (answer, code) = in_agent(AGENT_POD, &args);
    assert_eq!(code, 0, "{answer}");
    answer
}

/// The stdio pattern of docs/gateway.md on the node: the shipped gateway image runs
/// `tollgate-gateway stdio-bridge` in a pod of its own, starting the tool server (`e2e-agent
/// stdio-upstream`, put there by an init container) per session; a NetworkPolicy admits only
/// the gateway's pods. The policy names the bridge's Service as an ordinary MCP upstream, and the
/// identity's credential for it travels as a header the bridge hands the process as a variable.
fn a_stdio_server_runs_as_a_pod_behind_the_bridge_for_the_gateway_alone() {
    support();
    let gateway_image = tollgate_e2e::image::reference("tollgate-gateway");
    apply(&format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: crm-stdio, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: crm-stdio}}}}
  template:
    metadata: {{labels: {{app: crm-stdio}}}}
    spec:
      terminationGracePeriodSeconds: 1
      volumes: [{{name: tools, emptyDir: {{}}}}]
      initContainers:
      - name: tool
        image: {AGENT_IMAGE}
        imagePullPolicy: Never
        args: [install, /tools/e2e-agent]
        volumeMounts: [{{name: tools, mountPath: /tools}}]
      containers:
      - name: bridge
        image: {gateway_image}
        imagePullPolicy: Never
        args: [stdio-bridge, --listen=0.0.0.0:8080, --credential-header=X-Tool-Token,
          --credential-env=TOOL_TOKEN, --, /tools/e2e-agent, stdio-upstream, --credential={CREDENTIAL}]
        securityContext: {{readOnlyRootFilesystem: true, allowPrivilegeEscalation: false}}
        volumeMounts: [{{name: tools, mountPath: /tools, readOnly: true}}]
        ports: [{{containerPort: 8080}}]
        readinessProbe: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: crm-stdio, namespace: {NS}}}
spec:
  selector: {{app: crm-stdio}}
  ports: [{{port: 8080}}]
---
# The bridge decides nothing: only the gateway may reach it (kube-router lets the node's own
# kubelet probe it).
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: crm-stdio, namespace: {NS}}}
spec:
  podSelector: {{matchLabels: {{app: crm-stdio}}}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {SYSTEM}}}}}
      podSelector: {{matchLabels: {{app.kubernetes.io/name: tollgate-gateway}}}}
    ports: [{{protocol: TCP, port: 8080}}]
"#
    ));
    support::wait_ready(NS, "app=crm-stdio");
    // The sample, with the bridge as a second MCP upstream serving one more tool, and the
    // identity's credential for it sent as the header the bridge reads.
    let sample = std::fs::read_to_string(
        tollgate_e2e::repo_root().join("config/samples/support-agent.yaml"),
    )
    .unwrap()
    .replace(
        "approvers: {groups: [support-leads], users: []}",
        "approvers: {groups: [tollgate-approvers], users: []}",
    )
    .replace(
        "      format: \"Bearer {}\"\n",
        "      format: \"Bearer {}\"\n    - upstream: crm-stdio\n      secretRef: {name: crm-token, key: token}\n      header: X-Tool-Token\n      format: \"{}\"\n",
    )
    .replace(
        "      mcp: {url: \"http://crm-mcp.support.svc:8080/mcp\"}\n",
        &format!(
            "      mcp: {{url: \"http://crm-mcp.support.svc:8080/mcp\"}}\n    - name: crm-stdio\n      mcp: {{url: \"http://crm-stdio.{NS}.svc:8080/mcp\"}}\n"
        ),
    )
    .replace(
        "  tools:\n    allowed:\n",
        "  tools:\n    allowed:\n      - {name: lookup_order, upstream: crm-stdio, arguments: {fields: {customer_id: {type: string, required: true}}}}\n",
    );
    assert!(sample.contains("crm-stdio.support.svc"), "{sample}");
    let output = tollgate_e2e::with_input(
        support_kubectl().args(["apply", "-n", NS, "-f", "-"]),
        &sample,
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let mcp = |body: Value, session: Option<&str>| mcp_from_agent("crm-stdio", &body, session);
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "e2e-agent", "version": "1"}}});
    // Once the gateway has read the new policy, the bridge starts a process for the session.
    let session = eventually(
        "the gateway serves crm-stdio",
        Duration::from_secs(60),
        || {
            let init = mcp(initialize.clone(), None);
            (init["status"] == 200)
                .then(|| {
                    init["headers"]["mcp-session-id"]
                        .as_str()
                        .map(str::to_owned)
                })
                .flatten()
        },
        || kubectl_out(&["-n", NS, "get", "agentpolicy", AGENT, "-o", "yaml"]),
    );
    mcp(
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        Some(&session),
    );
    let listed = mcp(
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        Some(&session),
    );
    let names: Vec<&str> = listed["body"]["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("{listed}"))
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["lookup_order"], "{listed}");
    let called = mcp(
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
            "name": "lookup_order", "arguments": {"customer_id": "C000042"}}}),
        Some(&session),
    );
    assert!(called.to_string().contains("C000042"), "{called}");
    assert_ne!(called["body"]["result"]["isError"], true, "{called}");
    let logs = kubectl(&["-n", NS, "logs", "deployment/crm-stdio"]);
    assert!(
        logs.contains("tools/call lookup_order authorization=expected"),
        "the process did not get the gateway's credential:\n{logs}"
    );
    // The bridge is the gateway's alone: neither the agent nor another pod reaches it.
    bystander(NS, "bystander");
    for pod in [AGENT_POD, "bystander"] {
        let (direct, code) = in_agent(pod, &["connect", &format!("crm-stdio.{NS}.svc:8080")]);
        assert_eq!(code, 1, "{pod} reached the bridge directly: {direct}");
    }
    // Ending the session ends the process.
    let ended = in_agent(
        AGENT_POD,
        &[
            "http",
            "$TOLLGATE_URL/mcp/crm-stdio",
            "--method",
            "DELETE",
            "--token-file",
            TOKEN,
            "--ca",
            CA,
            "--header",
            &format!("mcp-session-id: {session}"),
        ],
    );
    assert_eq!(ended.0["status"], 204, "{ended:?}");
}
