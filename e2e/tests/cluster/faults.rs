//! Faults and lifecycle on the node: the Kiro case from a pod, the webhook gone, the leading
//! operator gone, the gateway gone mid-run, `helm upgrade`, the kustomize path, `helm uninstall`.
//! `helm uninstall` runs last of all.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tollgate_e2e::User;

use crate::agents::{AGENT, AGENT_POD, NS, call, support};
use crate::support::{self, SYSTEM, Test, apply, eventually, kubectl, kubectl_out};

pub fn tests() -> Vec<Test> {
    vec![
        Test {
            name: "an_agent_pod_that_may_delete_deployments_cannot_delete_a_protected_production_one",
            run: an_agent_pod_that_may_delete_deployments_cannot_delete_a_protected_production_one,
        },
        Test {
            name: "without_the_webhook_agents_writes_fail_closed_and_peoples_writes_go",
            run: without_the_webhook_agents_writes_fail_closed_and_peoples_writes_go,
        },
        Test {
            name: "when_the_leading_operator_pod_goes_the_standby_leads_and_reconciles_what_changed",
            run: when_the_leading_operator_pod_goes_the_standby_leads_and_reconciles_what_changed,
        },
        Test {
            name: "a_runs_budget_survives_the_gateway_pod_being_deleted_mid_run",
            run: a_runs_budget_survives_the_gateway_pod_being_deleted_mid_run,
        },
        Test {
            name: "helm_upgrade_rolls_without_refusing_a_write",
            run: helm_upgrade_rolls_without_refusing_a_write,
        },
        Test {
            name: "the_kustomize_path_renders_and_the_apiserver_accepts_it",
            run: the_kustomize_path_renders_and_the_apiserver_accepts_it,
        },
        Test {
            name: "helm_uninstall_keeps_the_crds_and_every_object_of_them",
            run: helm_uninstall_keeps_the_crds_and_every_object_of_them,
        },
    ]
}

const DEPLOY_NS: &str = "deploy";

/// A Deployment of the agent image that idles, labelled `env`.
fn deployment(name: &str, env: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {DEPLOY_NS}, labels: {{env: {env}}}}}
spec:
  replicas: 0
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec: {{containers: [{{name: app, image: {}, args: [sleep]}}]}}
",
        support::AGENT_IMAGE
    )
}

fn an_agent_pod_that_may_delete_deployments_cannot_delete_a_protected_production_one() {
    support::installed();
    kubectl(&["create", "namespace", DEPLOY_NS]);
    // An agent that calls the apiserver declares egress to it (its endpoint, as NetworkPolicy
    // sees traffic after the Service's address is translated): the node's IP, port 6443.
    let sample = std::fs::read_to_string(tollgate_e2e::repo_root().join("config/samples/deploy-agent.yaml"))
        .unwrap()
        .replace(
            "  network:\n    egress:\n",
            &format!(
                "  network:\n    egress:\n      - to: [{{ipBlock: {{cidr: {}/32}}}}]\n        ports: [{{protocol: TCP, port: 6443}}]\n",
                tollgate_e2e::cluster::NODE_IP
            ),
        );
    assert!(
        sample.contains("port: 6443"),
        "the sample's network section moved"
    );
    let output = tollgate_e2e::with_input(
        support::node()
            .control_plane()
            .kubectl(User::Admin)
            .args(["apply", "-n", DEPLOY_NS, "-f", "-"]),
        &sample,
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    apply(&deployment("checkout", "production"));
    apply(&deployment("checkout-preview", "staging"));
    eventually(
        "the deploy agent's ServiceAccount",
        Duration::from_secs(60),
        || {
            kubectl(&["-n", DEPLOY_NS, "get", "serviceaccounts", "-o", "name"])
                .contains("agent-deploy-agent")
                .then_some(())
        },
        String::new,
    );
    // The agent's pod, with a token for the apiserver (the agent's own Kubernetes calls).
    apply(&format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: deploy-agent, namespace: {DEPLOY_NS}, labels: {{app: deploy-agent, tollgate.dev/agent: deploy-agent}}}}
spec:
  serviceAccountName: agent-deploy-agent
  terminationGracePeriodSeconds: 1
  containers:
  - name: agent
    image: {}
    imagePullPolicy: Never
    args: [sleep]
    volumeMounts: [{{name: kube, mountPath: /var/run/secrets/kube, readOnly: true}}]
  volumes:
  - name: kube
    projected:
      sources:
      - serviceAccountToken: {{path: token, expirationSeconds: 3600}}
      - configMap: {{name: kube-root-ca.crt, items: [{{key: ca.crt, path: ca.crt}}]}}
",
        support::AGENT_IMAGE
    ));
    support::wait_ready(DEPLOY_NS, "app=deploy-agent");
    let delete = |name: &str| -> Value {
        let output = support::node()
            .control_plane()
            .kubectl(User::Admin)
            .args(["exec", "-n", DEPLOY_NS, "deploy-agent", "--", "/usr/local/bin/e2e-agent", "http"])
            .arg(format!("https://kubernetes.default.svc/apis/apps/v1/namespaces/{DEPLOY_NS}/deployments/{name}"))
            .args(["--method", "DELETE", "--token-file", "/var/run/secrets/kube/token", "--ca", "/var/run/secrets/kube/ca.crt"])
            .output()
            .unwrap();
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&output.stderr)))
    };
    let refused = delete("checkout");
    assert_eq!(refused["status"], 403, "refused as Forbidden: {refused}");
    let message = refused["body"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("admission webhook"),
        "refused by admission, not RBAC: {refused}"
    );
    assert!(
        message.contains("production") || message.contains("protected"),
        "{refused}"
    );
    assert!(kubectl_out(&["-n", DEPLOY_NS, "get", "deployment", "checkout"]).contains("checkout"));
    let deleted = delete("checkout-preview");
    assert_eq!(deleted["status"], 200, "{deleted}");
    assert!(
        kubectl_out(&["-n", DEPLOY_NS, "get", "deployment", "checkout-preview"])
            .contains("NotFound")
    );
}

/// A call the agent makes, retried while the gateway's Service routes nowhere (its pod was just
/// replaced); the first answer.
fn decide_once_served(run: &str) -> Value {
    let body = json!({"runId": run, "tool": "read_customer_record", "arguments": {"customer_id": "C000042"}}).to_string();
    eventually(
        "the gateway's new pod to answer",
        Duration::from_secs(60),
        || {
            let (answer, _) = crate::agents::in_agent(
                AGENT_POD,
                &[
                    "http",
                    "$TOLLGATE_URL/v1/decide",
                    "--token-file",
                    crate::agents::TOKEN,
                    "--ca",
                    crate::agents::CA,
                    "--body",
                    &body,
                ],
            );
            (answer["status"] == 200).then_some(answer)
        },
        String::new,
    )
}

fn scale(deployment: &str, replicas: u32) {
    kubectl(&[
        "-n",
        SYSTEM,
        "scale",
        "deployment",
        deployment,
        &format!("--replicas={replicas}"),
    ]);
}

fn without_the_webhook_agents_writes_fail_closed_and_peoples_writes_go() {
    support::installed();
    support();
    let token = kubectl(&["create", "token", "-n", NS, &format!("agent-{AGENT}")])
        .trim()
        .to_owned();
    crate::agents::platform_writer();
    // A kubeconfig holding only the agent's token (beside the admin's client certificate the
    // apiserver would take the certificate).
    let cp = support::node().control_plane();
    let kubeconfig = cp.dir().join("support-agent-token.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: node\n  cluster: {{server: {}, certificate-authority: {}}}\nusers:\n- name: agent\n  user: {{token: {token}}}\ncontexts:\n- name: agent\n  context: {{cluster: node, user: agent}}\ncurrent-context: agent\n",
            cp.server(),
            cp.dir().join("ca.crt").display()
        ),
    )
    .unwrap();
    let agent_write = |name: &str| {
        std::process::Command::new("kubectl")
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(["-n", NS, "create", "configmap", name, "--dry-run=server"])
            .output()
            .unwrap()
    };
    let before = agent_write("before");
    assert!(
        before.status.success(),
        "{}",
        String::from_utf8_lossy(&before.stderr)
    );
    let _restored = Scaled("tollgate-webhook", 2);
    scale("tollgate-webhook", 0);
    eventually(
        "the webhook's pods to be gone",
        Duration::from_secs(60),
        || {
            kubectl(&[
                "-n",
                SYSTEM,
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/name=tollgate-webhook",
                "-o",
                "name",
            ])
            .trim()
            .is_empty()
            .then_some(())
        },
        String::new,
    );
    let refused = agent_write("during");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "an agent's write went through without admission"
    );
    assert!(
        stderr.contains("failed calling webhook") || stderr.contains("tollgate"),
        "{stderr}"
    );
    // A person's write in another namespace does not depend on Tollgate.
    let person = kubectl_out(&[
        "-n",
        "default",
        "create",
        "configmap",
        "person-during-outage",
        "--dry-run=server",
    ]);
    assert!(person.contains("created"), "{person}");
    drop(_restored);
    eventually(
        "agents' writes admitted again",
        Duration::from_secs(30),
        || agent_write("after").status.success().then_some(()),
        String::new,
    );
}

/// Scales a deployment back (and waits for its pods) when dropped, also when the test fails.
struct Scaled(&'static str, u32);

impl Drop for Scaled {
    fn drop(&mut self) {
        scale(self.0, self.1);
        let _ = support::node()
            .control_plane()
            .kubectl(User::Admin)
            .args([
                "-n",
                SYSTEM,
                "rollout",
                "status",
                "deployment",
                self.0,
                "--timeout=90s",
            ])
            .output();
    }
}

fn lease_holder() -> String {
    kubectl(&[
        "-n",
        SYSTEM,
        "get",
        "lease",
        "tollgate-operator",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])
    .trim()
    .to_owned()
}

fn when_the_leading_operator_pod_goes_the_standby_leads_and_reconciles_what_changed() {
    support::installed();
    support();
    let leader = lease_holder();
    let duration: u64 = kubectl(&[
        "-n",
        SYSTEM,
        "get",
        "lease",
        "tollgate-operator",
        "-o",
        "jsonpath={.spec.leaseDurationSeconds}",
    ])
    .trim()
    .parse()
    .unwrap();
    let start = Instant::now();
    kubectl(&["-n", SYSTEM, "delete", "pod", &leader, "--wait=false"]);
    // A change made while nobody leads: a new agent identity.
    apply(&format!(
        "apiVersion: tollgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{name: failover-agent, namespace: {NS}}}
spec:
  description: made while the operator fails over
  owner: {{team: platform, contacts: [oncall@example.com]}}
  podSelector: {{matchLabels: {{app: failover-agent}}}}
"
    ));
    let new_leader = eventually(
        "a new operator leader",
        Duration::from_secs(duration + 30),
        || {
            let holder = lease_holder();
            (!holder.is_empty() && holder != leader).then_some(holder)
        },
        || kubectl_out(&["-n", SYSTEM, "get", "lease,pods", "-o", "wide"]),
    );
    let took = start.elapsed();
    assert!(
        took <= Duration::from_secs(duration + 5),
        "{new_leader} led {took:?} after the leader went; the lease lasts {duration}s"
    );
    eventually(
        "the new identity reconciled (its ServiceAccount)",
        Duration::from_secs(30),
        || {
            kubectl(&["-n", NS, "get", "serviceaccounts", "-o", "name"])
                .contains("agent-failover-agent")
                .then_some(())
        },
        || {
            kubectl_out(&[
                "-n",
                NS,
                "get",
                "agentidentity",
                "failover-agent",
                "-o",
                "yaml",
            ])
        },
    );
    eprintln!(
        "[e2e node] operator failover: {new_leader} led {:.1}s after {leader} was deleted",
        took.as_secs_f64()
    );
}

fn a_runs_budget_survives_the_gateway_pod_being_deleted_mid_run() {
    support();
    let run = "pod-run-restart";
    let decide = || {
        call(
            AGENT_POD,
            "/v1/decide",
            &json!({"runId": run, "tool": "read_customer_record", "arguments": {"customer_id": "C000042"}}),
        )
    };
    let first = decide();
    assert_eq!(first["body"]["decision"], "allow", "{first}");
    let report = call(
        AGENT_POD,
        "/v1/report",
        &json!({"runId": run, "step": first["body"]["step"], "tool": "read_customer_record",
                "result": {"customer_id": "C000042"}, "usage": {"tokens": 10, "cost": "1.50"}}),
    );
    assert_eq!(report["status"], 200, "{report}");
    let pod = kubectl(&[
        "-n",
        SYSTEM,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=tollgate-gateway",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    kubectl(&["-n", SYSTEM, "delete", "pod", pod.trim()]);
    support::wait_ready(SYSTEM, "app.kubernetes.io/name=tollgate-gateway");
    let second = decide_once_served(run);
    assert_eq!(second["body"]["decision"], "allow", "{second}");
    let report = call(
        AGENT_POD,
        "/v1/report",
        &json!({"runId": run, "step": second["body"]["step"], "tool": "read_customer_record",
                "result": {"customer_id": "C000042"}, "usage": {"tokens": 10, "cost": "1.00"}}),
    );
    assert_eq!(report["status"], 200, "{report}");
    // $1.50 before the restart and $1.00 after: over the $2.00 ceiling only if the first survived.
    let third = decide();
    assert_eq!(
        third["body"]["decision"], "halt",
        "the run's spend was lost with the pod: {third}"
    );
}

fn helm_upgrade_rolls_without_refusing_a_write() {
    support::installed();
    support();
    // Writes that go through Tollgate's admission (AgentPolicy updates) and writes of the agent,
    // every 100 ms while the upgrade rolls the webhook's and the operator's pods.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut refused) = (0u32, Vec::new());
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                let output = support::node()
                    .control_plane()
                    .kubectl(User::Admin)
                    .args([
                        "-n",
                        NS,
                        "annotate",
                        "--overwrite",
                        "agentpolicy",
                        AGENT,
                        &format!("e2e/upgrade={n}"),
                    ])
                    .output()
                    .unwrap();
                if output.status.success() {
                    ok += 1;
                } else {
                    refused.push(String::from_utf8_lossy(&output.stderr).into_owned());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (ok, refused)
        })
    };
    let ca_before = support::gateway_ca();
    let output = support::node()
        .helm()
        .args(["upgrade", "tollgate"])
        .arg(tollgate_e2e::repo_root().join("charts/tollgate"))
        .args([
            "--namespace",
            SYSTEM,
            "--reuse-values",
            "--wait",
            "--timeout",
            "180s",
        ])
        // Changes that roll every part: the webhook's and the operator's pods (rolling), the
        // gateway's (recreated on its volume); and the webhook configuration itself.
        .args([
            "--set",
            "webhook.timeoutSeconds=7",
            "--set",
            "webhook.resources.limits.memory=160Mi",
        ])
        .args([
            "--set",
            "operator.resources.limits.memory=160Mi",
            "--set",
            "gateway.standingInterval=4m",
        ])
        .output()
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, refused) = writer.join().unwrap();
    assert!(
        output.status.success(),
        "helm upgrade: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let timeout = kubectl(&[
        "get",
        "validatingwebhookconfiguration",
        "tollgate",
        "-o",
        "jsonpath={.webhooks[0].timeoutSeconds}",
    ]);
    assert_eq!(timeout.trim(), "7");
    // The serving certificates were kept: agents that trust the gateway's CA still do.
    let ca_after = support::gateway_ca();
    assert_eq!(
        ca_before, ca_after,
        "helm upgrade replaced the gateway's CA"
    );
    // The gateway's single SQLite writer is recreated, not rolled: the agent retries until the
    // Service routes to the new pod.
    let decided = decide_once_served("after-upgrade");
    assert_eq!(decided["body"]["decision"], "allow", "{decided}");
    assert!(
        ok > 5,
        "too few writes during the upgrade to say anything: {ok}"
    );
    // The webhook's pods rolled (the old ones go once their preStop pause ends).
    eventually(
        "the webhook's old pods to go",
        Duration::from_secs(60),
        || {
            let limits = kubectl(&[
                "-n",
                SYSTEM,
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/name=tollgate-webhook",
                "-o",
                "jsonpath={.items[*].spec.containers[0].resources.limits.memory}",
            ]);
            (limits.trim() == "160Mi 160Mi").then_some(())
        },
        || kubectl_out(&["-n", SYSTEM, "get", "pods", "-o", "wide"]),
    );
    assert!(
        refused.is_empty(),
        "{} of {} writes refused during the upgrade: {:?}",
        refused.len(),
        ok as usize + refused.len(),
        refused.first()
    );
}

fn the_kustomize_path_renders_and_the_apiserver_accepts_it() {
    support::installed();
    let rendered = kubectl(&[
        "kustomize",
        &tollgate_e2e::repo_root()
            .join("config/default")
            .display()
            .to_string(),
    ]);
    // cert-manager is not installed on this node: its Certificates and Issuers are left out of
    // the dry run (they are checked to be there).
    let mut kept = Vec::new();
    let mut cert_manager = 0;
    for document in rendered.split("\n---\n") {
        if document.contains("apiVersion: cert-manager.io/") {
            cert_manager += 1;
        } else if !document.trim().is_empty() {
            kept.push(document);
        }
    }
    assert!(
        cert_manager > 0,
        "the kustomize path asks cert-manager for the certificates"
    );
    let output = tollgate_e2e::with_input(
        support::node().control_plane().kubectl(User::Admin).args([
            "apply",
            "--server-side",
            "--force-conflicts",
            "--dry-run=server",
            "-f",
            "-",
        ]),
        &kept.join("\n---\n"),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // It names the images this repository builds (and the node holds).
    let images = support::node()
        .ctr()
        .args(["images", "list", "--quiet"])
        .output()
        .unwrap();
    let images = String::from_utf8_lossy(&images.stdout);
    for line in rendered
        .lines()
        .filter(|l| l.trim_start().starts_with("image: "))
    {
        let image = line
            .trim_start()
            .trim_start_matches("image: ")
            .trim_matches('"');
        assert!(
            images.lines().any(|i| i == image),
            "{image} is not an image this repository builds: {images}"
        );
    }
}

fn helm_uninstall_keeps_the_crds_and_every_object_of_them() {
    support::installed();
    support();
    let before = kubectl(&[
        "get",
        "agentidentities,agentpolicies,approvalrequests",
        "-A",
        "-o",
        "name",
    ]);
    support::helm(&["uninstall", "tollgate", "--namespace", SYSTEM, "--wait"]);
    let after = kubectl(&[
        "get",
        "agentidentities,agentpolicies,approvalrequests",
        "-A",
        "-o",
        "name",
    ]);
    assert_eq!(before, after);
    assert!(
        after.contains("agentpolicy.tollgate.dev/support-agent-v2"),
        "{after}"
    );
    assert!(kubectl_out(&["-n", SYSTEM, "get", "deployments"]).contains("No resources"));
}
