//! Tollgate's operator in this process, as the ServiceAccount `tollgate-system/tollgate-operator`
//! holding exactly the RBAC shipped in `config/rbac/operator.yaml`: a missing right fails the
//! tests, a needless one shows in the manifest review.
//!
//! Each test runs its own operator scoped to its own namespace, which also holds the operator's
//! Lease and its cluster-wide kill switch ConfigMap, so tests never see each other's switches.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use tollgate_engine::children::GatewayPeer;
use tollgate_operator::{Settings, leader};

use crate::{User, control_plane, install_crds};

/// The operator's ServiceAccount username.
pub const OPERATOR: &str = "system:serviceaccount:tollgate-system:tollgate-operator";

/// A running operator; stopped (gracefully, releasing its Lease) when dropped.
#[derive(Debug)]
pub struct Operator {
    /// Its probe port: /healthz, /readyz, /metrics.
    pub probe: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

/// How a test wants its operator.
#[derive(Debug, Clone)]
pub struct Options {
    /// Its name in the Lease.
    pub holder: String,
    /// Retention of decided ApprovalRequests.
    pub approval_retention: Duration,
    /// Lease timing.
    pub lease: leader::Timing,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            holder: "operator-0".to_owned(),
            approval_retention: tollgate_operator::DEFAULT_APPROVAL_RETENTION,
            lease: leader::Timing::default(),
        }
    }
}

fn manifests() -> Vec<Value> {
    let text = std::fs::read_to_string(crate::repo_root().join("config/rbac/operator.yaml"))
        .expect("config/rbac/operator.yaml is readable");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize;

fn kubectl_apply(objects: &[Value]) {
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects});
    let output = crate::with_input(
        control_plane().kubectl(User::Admin).args([
            "apply",
            "--server-side",
            "--field-manager=tollgate-e2e",
            "-f",
            "-",
        ]),
        &list.to_string(),
    );
    assert!(
        output.status.success(),
        "applying the operator's RBAC failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The cluster-wide part of the shipped RBAC (ServiceAccount, ClusterRole, ClusterRoleBinding),
/// applied once per test binary.
fn install_cluster_rbac() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        install_crds();
        let _ = control_plane()
            .kubectl(User::Admin)
            .args(["create", "namespace", "tollgate-system"])
            .output();
        let objects: Vec<Value> = manifests()
            .into_iter()
            .filter(|o| o["kind"] != "Role" && o["kind"] != "RoleBinding")
            .collect();
        kubectl_apply(&objects);
    });
}

/// The shipped namespaced Role and RoleBinding (Lease, kill switch), placed in `namespace`.
fn install_namespace_rbac(namespace: &str) {
    let objects: Vec<Value> = manifests()
        .into_iter()
        .filter(|o| o["kind"] == "Role" || o["kind"] == "RoleBinding")
        .map(|mut o| {
            o["metadata"]["namespace"] = Value::from(namespace);
            o
        })
        .collect();
    kubectl_apply(&objects);
}

/// A token for the operator's ServiceAccount.
fn operator_token() -> String {
    let output = control_plane()
        .kubectl(User::Admin)
        .args([
            "create",
            "token",
            "tollgate-operator",
            "-n",
            "tollgate-system",
            "--duration=2h",
        ])
        .output()
        .expect("kubectl runs");
    assert!(
        output.status.success(),
        "a token for the operator: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

impl Operator {
    /// Starts an operator for `namespace` and waits until it answers /healthz.
    pub fn start(namespace: &str, options: Options) -> Operator {
        install_cluster_rbac();
        install_namespace_rbac(namespace);
        let token = operator_token();
        let probe = crate::free_port().unwrap();
        let settings = Settings {
            namespace: namespace.to_owned(),
            watch_namespace: Some(namespace.to_owned()),
            gateway: GatewayPeer {
                namespace: "tollgate-system".to_owned(),
                pod_labels: BTreeMap::from([(
                    "app.kubernetes.io/name".to_owned(),
                    "tollgate-gateway".to_owned(),
                )]),
                port: 8444,
            },
            approval_retention: options.approval_retention,
            holder: options.holder,
            lease: options.lease,
            probe_listen: format!("127.0.0.1:{probe}").parse().unwrap(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let client = control_plane().client_with_token(&token).await;
                tollgate_operator::run(client, settings, async {
                    let _ = stopped.await;
                })
                .await
                .map_err(|e| format!("{e:#}"))
            })
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !crate::http_get_ok(probe, "/healthz") {
            assert!(
                std::time::Instant::now() < deadline,
                "the operator did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Operator {
            probe,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The probe port: /healthz, /readyz, /metrics.
    pub fn probe(&self) -> u16 {
        self.probe
    }

    /// The text of GET `path` on the probe port.
    pub fn get(&self, path: &str) -> String {
        crate::http_get(self.probe, path)
    }

    /// Stops it gracefully and returns what `run` returned.
    pub fn stop(mut self) -> Result<(), String> {
        self.halt()
    }

    fn halt(&mut self) -> Result<(), String> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err("the operator panicked".into())),
            None => Ok(()),
        }
    }

    /// Whether `run` has returned (for example after losing its Lease).
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}
