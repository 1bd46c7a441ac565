//! Tollgate's admission webhook in this process, over real TLS on 127.0.0.1, registered with
//! the control plane by URL and caBundle so the kube-apiserver calls it.
//!
//! The registration only matches namespaces labelled `tollgate-e2e/admission=enabled`, so tests
//! that do not opt in are untouched.

use std::sync::OnceLock;
use std::time::Duration;

use kube::Client;

use crate::{User, control_plane, install_crds};

/// The namespace label the e2e webhook registration selects.
pub const LABEL: &str = "tollgate-e2e/admission";
/// The gateway's username, the only creator of ApprovalRequests.
pub const GATEWAY: &str = "system:serviceaccount:tollgate-system:tollgate-gateway";

/// Labels namespace `ns` with [`LABEL`], so that the webhooks [`webhook`] registers apply to it.
pub async fn admit(ns: &str) {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, Patch, PatchParams};
    let patch = serde_json::json!({"metadata": {"labels": {LABEL: "enabled"}}});
    Api::<Namespace>::all(control_plane().client(User::Admin).await)
        .patch(ns, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("label the namespace for admission");
}

/// A fresh namespace `prefix-…` that the webhooks [`webhook`] registers apply to.
pub async fn namespace(prefix: &str) -> String {
    let ns = control_plane().namespace(prefix).await;
    admit(&ns).await;
    ns
}

/// Tollgate's webhook running in this process as `tollgate-webhook` runs in a cluster.
#[derive(Debug)]
pub struct Running {
    /// The admission face's TLS port.
    pub port: u16,
    /// The probe port: /healthz, /readyz, /metrics.
    pub probe: u16,
    /// The gateway's TLS port, when started with one.
    pub gateway: Option<u16>,
    /// The CA that signed the serving certificate (for 127.0.0.1 and localhost).
    pub ca_pem: String,
}

/// How the webhook started by [`start`] records.
#[derive(Debug, Clone)]
pub enum Trail {
    /// Nowhere: admission only logs its refusals.
    None,
    /// Admission records to this store (`tollgate-webhook --audit AUDIT`).
    Admission(String),
    /// A gateway serves too (`tollgate-gateway --audit AUDIT`) and admission records into its
    /// trail.
    Gateway(String),
}

/// Starts `run_in_cluster` on a thread and runtime of its own, with fresh ports and certificate
/// under the control plane's directory `name`, as the admin user, recording as `trail` says (as
/// `tollgate-webhook` opens its stores). Returns once ready.
pub fn start(name: &str, trail: Trail) -> Running {
    let cp = control_plane();
    let dir = cp.dir().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let (ca_pem, cert_pem, key_pem) = serving_certificate();
    std::fs::write(dir.join("tls.crt"), cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), key_pem).unwrap();
    let port = crate::free_port().unwrap();
    let probe = crate::free_port().unwrap();
    let gateway = matches!(trail, Trail::Gateway(_)).then(|| crate::free_port().unwrap());
    let gateway_probe = crate::free_port().unwrap();
    let kubeconfig = cp.kubeconfig(User::Admin);
    let tls = tollgate_runtime::server::TlsFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
    };
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let config = kube::Config::from_custom_kubeconfig(
                kube::config::Kubeconfig::read_from(kubeconfig).unwrap(),
                &Default::default(),
            )
            .await
            .unwrap();
            let client = Client::try_from(config).unwrap();
            let settings = tollgate_webhook::Settings {
                gateway_username: GATEWAY.into(),
                gateway_url: "https://tollgate-gateway.tollgate-system.svc:8443".into(),
            };
            let handle = axum_server::Handle::new();
            let address = |port: u16| format!("127.0.0.1:{port}").parse().unwrap();
            let metrics = tollgate_runtime::metrics::Metrics::default();
            // With a gateway, admission records into the gateway's trail (one chain, as the
            // shared PostgreSQL trail of a cluster holds both).
            let admission_audit = match (gateway, &trail) {
                (Some(port), Trail::Gateway(audit)) => {
                    let opened = tollgate_gateway::run::Trail::open(
                        audit,
                        "gw-e2e-cluster".into(),
                        &metrics,
                    )
                    .await
                    .unwrap();
                    let admission = opened.audit.clone();
                    let config = tollgate_gateway::run::InCluster {
                        namespace: "tollgate-system".into(),
                        listen: address(port),
                        probe_listen: address(gateway_probe),
                        tls: tls.clone(),
                        // Its empty trail would rewrite the standing of other tests' policies,
                        // which share the control plane (the writer has a test of its own).
                        standing: None,
                        prices: tollgate_gateway::default_prices(),
                        mcp: Default::default(),
                        traced: false,
                    };
                    let (client, metrics, handle) =
                        (client.clone(), metrics.clone(), handle.clone());
                    tokio::spawn(async move {
                        if let Err(e) = tollgate_gateway::run::in_cluster(
                            client, config, opened, metrics, handle,
                        )
                        .await
                        {
                            panic!("the gateway stopped: {e:#}");
                        }
                    });
                    Some(admission)
                }
                (None, Trail::Admission(audit)) => Some(
                    tollgate_runtime::open_audit_log(audit, "admission-e2e".into(), &metrics)
                        .await
                        .unwrap(),
                ),
                _ => None,
            };
            if let Err(e) = tollgate_webhook::run_in_cluster(
                client,
                settings,
                "tollgate-system",
                tls,
                address(port),
                address(probe),
                handle,
                metrics,
                admission_audit,
            )
            .await
            {
                panic!("the webhook stopped: {e:#}");
            }
        });
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !crate::http_get_ok(probe, "/readyz")
        || (gateway.is_some() && !crate::http_get_ok(gateway_probe, "/readyz"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the webhook did not become ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Running {
        port,
        probe,
        gateway,
        ca_pem,
    }
}

/// The SQLite trail the webhook [`webhook`] starts records its admission verdicts in (chain
/// `admission-e2e`): agents' own writes and agent pods, of every test of this process.
pub fn admission_trail() -> std::path::PathBuf {
    control_plane().dir().join("webhook/admission-audit.db")
}

/// Starts the webhook once for this process and registers it with the apiserver; returns its
/// probe port (/metrics).
pub fn webhook() -> u16 {
    static STARTED: OnceLock<u16> = OnceLock::new();
    *STARTED.get_or_init(|| {
        install_crds();
        let cp = control_plane();
        let Running {
            port,
            probe,
            ca_pem,
            ..
        } = start(
            "webhook",
            Trail::Admission(format!("sqlite:{}", admission_trail().display())),
        );
        let dir = cp.dir().join("webhook");
        let registration = registration(port, &ca_pem);
        let file = dir.join("webhooks.yaml");
        std::fs::write(&file, registration).unwrap();
        let output = cp
            .kubectl(User::Admin)
            .args(["apply", "--server-side", "-f"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "registering the webhooks failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let output = cp
            .kubectl(User::Admin)
            .args(["apply", "--server-side", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(RBAC.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        assert!(
            output.status.success(),
            "granting approvers RBAC failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        probe
    })
}

/// Approvers (and carol, who is not one) may patch ApprovalRequests as far as RBAC goes; the
/// gateway may create them. Whether a decision counts is the webhook's business.
const RBAC: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: tollgate-e2e-approver}
rules:
- apiGroups: [tollgate.dev]
  resources: [approvalrequests]
  verbs: [get, list, watch, patch, update, create]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: tollgate-e2e-approver}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: tollgate-e2e-approver}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: tollgate-approvers}
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: carol}
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:serviceaccount:tollgate-system:tollgate-gateway"}
---
# What the gateway does after a budget breach and for the audit read API (config/gateway/rbac.yaml
# grants the same).
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: tollgate-e2e-gateway-breach}
rules:
- {apiGroups: [tollgate.dev], resources: [agentidentities], verbs: [get, patch]}
# Each policy's track record and drift (status.tools, status.drift).
- {apiGroups: [tollgate.dev], resources: [agentpolicies/status], verbs: [patch]}
- {apiGroups: [events.k8s.io], resources: [events], verbs: [create, patch]}
- {apiGroups: [""], resources: [secrets], resourceNames: [tollgate-notify], verbs: [get]}
# The audit read API: who is asking, and may they read that namespace.
- {apiGroups: [authentication.k8s.io], resources: [tokenreviews], verbs: [create]}
- {apiGroups: [authorization.k8s.io], resources: [subjectaccessreviews], verbs: [create]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: tollgate-e2e-gateway-breach}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: tollgate-e2e-gateway-breach}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:serviceaccount:tollgate-system:tollgate-gateway"}
---
# The global kill switch, read again before an approved call is released (config/gateway/rbac.yaml
# grants the same in Tollgate's namespace).
apiVersion: v1
kind: Namespace
metadata: {name: tollgate-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: tollgate-e2e-gateway-kill-switch, namespace: tollgate-system}
rules:
- {apiGroups: [""], resources: [configmaps], resourceNames: [tollgate-kill-switch], verbs: [get]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: tollgate-e2e-gateway-kill-switch, namespace: tollgate-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: tollgate-e2e-gateway-kill-switch}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:serviceaccount:tollgate-system:tollgate-gateway"}
"#;

fn registration(port: u16, ca_pem: &str) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let url = |path: &str| format!("https://127.0.0.1:{port}/admission/{path}");
    let selector = format!("namespaceSelector: {{matchLabels: {{{LABEL}: enabled}}}}");
    format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {{name: tollgate-e2e}}
webhooks:
- name: approvals.mutate.tollgate.dev
  clientConfig: {{url: "{mutate_approvals}", caBundle: {ca}}}
  rules: [{{apiGroups: [tollgate.dev], apiVersions: [v1alpha1], operations: [CREATE, UPDATE], resources: [approvalrequests]}}]
  {selector}
  admissionReviewVersions: [v1]
  sideEffects: None
  failurePolicy: Fail
  timeoutSeconds: 5
- name: pods.mutate.tollgate.dev
  clientConfig: {{url: "{mutate_pods}", caBundle: {ca}}}
  rules: [{{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods]}}]
  matchConditions:
  - {{name: agent-service-account, expression: "has(object.spec.serviceAccountName) && object.spec.serviceAccountName.startsWith('agent-')"}}
  {selector}
  admissionReviewVersions: [v1]
  sideEffects: None
  failurePolicy: Fail
  reinvocationPolicy: IfNeeded
  timeoutSeconds: 5
- name: identities.mutate.tollgate.dev
  clientConfig: {{url: "{mutate_kill_switches}", caBundle: {ca}}}
  rules: [{{apiGroups: [tollgate.dev], apiVersions: [v1alpha1], operations: [CREATE, UPDATE], resources: [agentidentities]}}]
  {selector}
  admissionReviewVersions: [v1]
  sideEffects: None
  failurePolicy: Fail
  timeoutSeconds: 5
- name: killswitch.mutate.tollgate.dev
  clientConfig: {{url: "{mutate_kill_switches}", caBundle: {ca}}}
  rules: [{{apiGroups: [""], apiVersions: [v1], operations: [CREATE, UPDATE], resources: [configmaps]}}]
  matchConditions:
  - {{name: global-kill-switch, expression: "object.metadata.name == 'tollgate-kill-switch'"}}
  {selector}
  admissionReviewVersions: [v1]
  sideEffects: None
  failurePolicy: Ignore
  timeoutSeconds: 5
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {{name: tollgate-e2e}}
webhooks:
- name: objects.validate.tollgate.dev
  clientConfig: {{url: "{validate_tollgate}", caBundle: {ca}}}
  rules: [{{apiGroups: [tollgate.dev], apiVersions: [v1alpha1], operations: [CREATE, UPDATE], resources: [agentidentities, agentpolicies, approvalrequests]}}]
  {selector}
  admissionReviewVersions: [v1]
  sideEffects: None
  failurePolicy: Fail
  timeoutSeconds: 5
- name: agents.validate.tollgate.dev
  clientConfig: {{url: "{validate_agents}", caBundle: {ca}}}
  rules: [{{apiGroups: ["*"], apiVersions: ["*"], operations: [CREATE, UPDATE, DELETE, CONNECT], resources: ["*/*"]}}]
  matchConditions:
  - {{name: agent-service-account, expression: "request.userInfo.username.matches('^system:serviceaccount:[^:]+:agent-')"}}
  {selector}
  admissionReviewVersions: [v1]
  sideEffects: None
  failurePolicy: Fail
  timeoutSeconds: 5
- name: pods.validate.tollgate.dev
  clientConfig: {{url: "{validate_pods}", caBundle: {ca}}}
  rules: [{{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods]}}]
  matchConditions:
  - {{name: agent-service-account, expression: "has(object.spec.serviceAccountName) && object.spec.serviceAccountName.startsWith('agent-')"}}
  {selector}
  admissionReviewVersions: [v1]
  sideEffects: None
  failurePolicy: Fail
  timeoutSeconds: 5
"#,
        mutate_approvals = url("mutate-approvals"),
        mutate_pods = url("mutate-pods"),
        mutate_kill_switches = url("mutate-kill-switches"),
        validate_tollgate = url("validate-tollgate"),
        validate_agents = url("validate-agents"),
        validate_pods = url("validate-pods"),
    )
}

fn serving_certificate() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let cert = leaf.signed_by(&key, &issuer).unwrap().pem();
    (ca_pem, cert, key.serialize_pem())
}

/// Removes the webhook registration (for measuring the apiserver without it); [`register`]
/// puts it back.
pub fn unregister() {
    let cp = control_plane();
    for kind in [
        "mutatingwebhookconfiguration",
        "validatingwebhookconfiguration",
    ] {
        let output = cp
            .kubectl(User::Admin)
            .args(["delete", kind, "tollgate-e2e", "--ignore-not-found"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Registers the running webhook again after [`unregister`].
pub fn register() {
    let cp = control_plane();
    let output = cp
        .kubectl(User::Admin)
        .args(["apply", "--server-side", "-f"])
        .arg(cp.dir().join("webhook/webhooks.yaml"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
