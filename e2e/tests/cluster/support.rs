//! What the cluster tests share: the node with Tollgate installed from its chart, kubectl, and
//! the test agent's image.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tollgate_e2e::cluster::{self, Cluster};
use tollgate_e2e::{User, image};

/// One test: a name and a body that panics when it fails.
pub struct Test {
    pub name: &'static str,
    pub run: fn(),
}

/// The namespace Tollgate is installed into.
pub const SYSTEM: &str = "tollgate-system";
/// The image of the test agent and tool server (`e2e-agent`).
pub const AGENT_IMAGE: &str = "localhost/tollgate-e2e/agent:1";

fn agent_image() -> image::Spec {
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_e2e-agent"));
    let mut spec = image::spec_of(&binary, "e2e-agent").expect("the e2e-agent image");
    spec.reference = AGENT_IMAGE.to_owned();
    spec.entrypoint = vec!["/usr/local/bin/e2e-agent".to_owned()];
    spec
}

/// The node, started once.
pub fn node() -> &'static Cluster {
    cluster::cluster(&[agent_image()])
}

/// The node with Tollgate installed from `charts/tollgate` (once per run; a failed install fails
/// every test that needs it, with the same reason).
pub fn installed() -> &'static Cluster {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let node = node();
    let result = INSTALLED.get_or_init(|| {
        let started = Instant::now();
        node.install_tollgate(SYSTEM, &[])
            .map_err(|e| format!("{e:#}"))?;
        eprintln!(
            "[e2e node] Tollgate installed with helm in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    node
}

/// The gateway's CA certificate (PEM, base64) from the chart's Secret: what agents trust.
pub fn gateway_ca() -> String {
    kubectl(&[
        "-n",
        SYSTEM,
        "get",
        "secret",
        "tollgate-gateway-tls",
        "-o",
        "jsonpath={.data.ca\\.crt}",
    ])
}

/// The node's `helm ARGS` (as the admin); panics with stderr unless it succeeds.
pub fn helm(args: &[&str]) {
    let output = node().helm().args(args).output().unwrap();
    assert!(
        output.status.success(),
        "helm {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `kubectl ARGS` as the admin; panics with stderr on failure.
pub fn kubectl(args: &[&str]) -> String {
    node().control_plane().kubectl_ok(args)
}

/// `kubectl ARGS` as the admin, whatever its outcome: stdout and stderr together.
pub fn kubectl_out(args: &[&str]) -> String {
    let output = node()
        .control_plane()
        .kubectl(User::Admin)
        .args(args)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `kubectl apply -f -` of `yaml` as the admin; panics on failure.
pub fn apply(yaml: &str) {
    let output = tollgate_e2e::with_input(
        node()
            .control_plane()
            .kubectl(User::Admin)
            .args(["apply", "-f", "-"]),
        yaml,
    );
    assert!(
        output.status.success(),
        "kubectl apply failed: {}\n{yaml}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `command`; panics with its output unless it succeeds.
pub fn ok(command: &mut Command) -> String {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Polls `check` every 200 ms until it returns `Some`, or panics with `what` and `context()`.
pub fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        if start.elapsed() > timeout {
            panic!(
                "timed out after {}s waiting for {what}\n{}",
                timeout.as_secs(),
                context()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until every pod matching `selector` in `namespace` is Ready.
pub fn wait_ready(namespace: &str, selector: &str) {
    let output = node()
        .control_plane()
        .kubectl(User::Admin)
        .args([
            "wait",
            "--for=condition=Ready",
            "pod",
            "-n",
            namespace,
            "-l",
            selector,
        ])
        .arg("--timeout=120s")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "pods {selector} in {namespace} not Ready: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        kubectl_out(&["-n", namespace, "describe", "pods", "-l", selector])
    );
}

/// The `kubectl-tollgate` plugin binary of this build.
pub fn plugin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/cluster-HASH -> target/debug/kubectl-tollgate
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("kubectl-tollgate");
    if !path.exists() {
        ok(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(tollgate_e2e::repo_root())
                .args(["build", "-p", "kubectl-tollgate"]),
        );
    }
    path
}

/// `kubectl tollgate ARGS` as `user`, as kubectl runs a plugin (KUBECONFIG set).
pub fn tollgate(user: User, args: &[&str]) -> Output {
    Command::new(plugin())
        .env("KUBECONFIG", node().control_plane().kubeconfig(user))
        .args(args)
        .output()
        .unwrap()
}

/// A tokio runtime for a test's async work.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
