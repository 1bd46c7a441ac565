//! tollgate-e2e: a real Kubernetes control plane on loopback for Tollgate's end-to-end tests.
//!
//! Contract: [`control_plane`] builds etcd, kube-apiserver and kube-controller-manager from the
//! upstream Go modules pinned in `e2e/controlplane/{kube,etcd}/go.mod` (cached under
//! `~/.cache/tollgate/controlplane/`), starts them once per test binary with client-certificate users,
//! RBAC, a service-account issuer (so TokenRequest and TokenReview work) and the garbage
//! collector, namespace and service-account controllers, and stops them when the test binary
//! exits, however it exits. Nothing here is a fake: tests talk to the real apiserver.
//!
//! Each test creates its own namespace with [`ControlPlane::namespace`].
#![forbid(unsafe_code)]

pub mod admission;
pub mod cluster;
pub mod freeze;
pub mod image;
pub mod operator;
mod pki;
pub use tollgate_testkit::{postgres, process};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

pub use process::Process;

/// The people and agents the control plane knows by client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum User {
    /// `tollgate-admin`, in `system:masters`.
    Admin,
    /// `alice`, in `tollgate-approvers`.
    Alice,
    /// `bob`, in `tollgate-approvers`.
    Bob,
    /// `carol`, in no group and with no rights.
    Carol,
}

impl User {
    /// Every user, in a fixed order.
    pub const ALL: [User; 4] = [User::Admin, User::Alice, User::Bob, User::Carol];

    /// The username the apiserver authenticates.
    pub fn name(self) -> &'static str {
        match self {
            User::Admin => "tollgate-admin",
            User::Alice => "alice",
            User::Bob => "bob",
            User::Carol => "carol",
        }
    }

    /// The groups the apiserver authenticates.
    pub fn groups(self) -> &'static [&'static str] {
        match self {
            User::Admin => &["system:masters"],
            User::Alice | User::Bob => &["tollgate-approvers"],
            User::Carol => &[],
        }
    }
}

/// A running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    server: String,
    ca_pem: String,
    _processes: Vec<Process>,
}

static CONTROL_PLANE: OnceLock<ControlPlane> = OnceLock::new();

/// The control plane of this test binary, started on first use.
///
/// Panics with the reason and the failing component's log tail when it cannot start: a test
/// that needs a real apiserver must not pass without one.
pub fn control_plane() -> &'static ControlPlane {
    CONTROL_PLANE.get_or_init(|| match ControlPlane::start() {
        Ok(control_plane) => control_plane,
        Err(e) => panic!("the e2e control plane did not start: {e:#}"),
    })
}

/// Serves `gateway`'s router (decision API and MCP proxy, plain HTTP) on a loopback port of its
/// own until the test ends; returns its base URL.
pub async fn serve_gateway(gateway: tollgate_gateway::Gateway) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = tollgate_gateway::router(std::sync::Arc::new(gateway));
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the repository root exists")
}

fn ready_timeout() -> Duration {
    let seconds = std::env::var("TOLLGATE_E2E_READY_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(90);
    Duration::from_secs(seconds)
}

impl ControlPlane {
    fn start() -> Result<Self> {
        let bin = build()?;
        let root = repo_root();
        let runs = root.join("target/e2e-runs");
        std::fs::create_dir_all(&runs)?;
        let dir = tempfile::Builder::new()
            .prefix("cp-")
            .tempdir_in(&runs)?
            .keep();
        // Whatever happens to this process from here on, the supervisor stops what we start and
        // removes the directory once we are gone.
        let supervisor = process::Supervisor::spawn(&dir)?;

        let pki = pki::Pki::generate()?;
        pki.write(&dir)?;

        let etcd_client = free_port()?;
        let etcd_peer = free_port()?;
        let apiserver_port = free_port()?;
        let kcm_port = free_port()?;
        let server = format!("https://127.0.0.1:{apiserver_port}");
        for user in User::ALL {
            std::fs::write(
                dir.join(kubeconfig_name(user)),
                pki.kubeconfig(&server, user)?,
            )?;
        }

        let etcd = supervisor.start(
            "etcd",
            Command::new(bin.join("etcd")).args([
                "--name=default".to_owned(),
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"),
                "--unsafe-no-fsync".to_owned(),
                "--log-level=warn".to_owned(),
            ]),
        )?;
        wait_until(&etcd, ready_timeout(), || {
            http_get_ok(etcd_client, "/health")
        })?;

        let file = |name: &str| dir.join(name).display().to_string();
        let apiserver = supervisor.start(
            "kube-apiserver",
            Command::new(bin.join("kube-apiserver")).args([
                format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
                format!("--secure-port={apiserver_port}"),
                "--bind-address=127.0.0.1".to_owned(),
                "--advertise-address=127.0.0.1".to_owned(),
                "--endpoint-reconciler-type=none".to_owned(),
                "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
                "--authorization-mode=RBAC".to_owned(),
                format!("--client-ca-file={}", file(pki::CA_CERT)),
                format!("--tls-cert-file={}", file(pki::SERVER_CERT)),
                format!("--tls-private-key-file={}", file(pki::SERVER_KEY)),
                format!("--cert-dir={}", file("apiserver-certs")),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_owned(),
                format!("--service-account-key-file={}", file(pki::SA_PUB)),
                format!("--service-account-signing-key-file={}", file(pki::SA_KEY)),
                "--allow-privileged=true".to_owned(),
                "--enable-priority-and-fairness=false".to_owned(),
                "--profiling=false".to_owned(),
                "--v=1".to_owned(),
            ]),
        )?;
        let admin_kubeconfig = dir.join(kubeconfig_name(User::Admin));
        wait_until(&apiserver, ready_timeout(), || {
            kubectl_with(&admin_kubeconfig, &["get", "--raw", "/readyz"])
                .is_ok_and(|out| out.trim() == "ok")
        })?;

        let kcm = supervisor.start(
            "kube-controller-manager",
            Command::new(bin.join("kube-controller-manager")).args([
                format!("--kubeconfig={}", admin_kubeconfig.display()),
                "--leader-elect=false".to_owned(),
                "--controllers=garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller,root-ca-certificate-publisher-controller".to_owned(),
                format!("--service-account-private-key-file={}", file(pki::SA_KEY)),
                format!("--root-ca-file={}", file(pki::CA_CERT)),
                "--use-service-account-credentials=false".to_owned(),
                format!("--secure-port={kcm_port}"),
                "--bind-address=127.0.0.1".to_owned(),
                format!("--cert-dir={}", file("kcm-certs")),
                "--v=1".to_owned(),
            ]),
        )?;
        // The controller manager is ready once the service-account controller has created the
        // default ServiceAccount of the default namespace.
        wait_until(&kcm, ready_timeout(), || {
            kubectl_with(
                &admin_kubeconfig,
                &[
                    "get",
                    "serviceaccount",
                    "default",
                    "-n",
                    "default",
                    "-o",
                    "name",
                ],
            )
            .is_ok()
        })?;

        Ok(ControlPlane {
            dir,
            server,
            ca_pem: pki.ca_pem(),
            _processes: vec![etcd, apiserver, kcm],
        })
    }

    /// The apiserver's URL, `https://127.0.0.1:<port>`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The PEM of the CA that signs the apiserver's serving certificate and the users' client
    /// certificates.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The control plane's working directory (certificates, kubeconfigs, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The kubeconfig file of one user.
    pub fn kubeconfig(&self, user: User) -> PathBuf {
        self.dir.join(kubeconfig_name(user))
    }

    /// A kube client authenticated as `user`. Create it inside the test's own runtime.
    pub async fn client(&self, user: User) -> kube::Client {
        kube::Client::try_from(self.config(user).await)
            .expect("a client can be built from the kubeconfig")
    }

    /// The client configuration of `user`, as a kubeconfig gives it.
    pub async fn config(&self, user: User) -> kube::Config {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig(user))
            .expect("the harness wrote a valid kubeconfig");
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("the kubeconfig loads")
    }

    /// A kube client authenticated as `user` that reaches the apiserver through `addr` (a
    /// proxy on 127.0.0.1, such as a [`freeze::Freezable`] one).
    pub async fn client_through(&self, user: User, addr: std::net::SocketAddr) -> kube::Client {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig(user))
            .expect("the harness wrote a valid kubeconfig");
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("the kubeconfig loads");
        config.cluster_url = format!("https://{addr}")
            .parse()
            .expect("a proxy address is a URL");
        kube::Client::try_from(config).expect("a client can be built from the kubeconfig")
    }

    /// The apiserver's address.
    pub fn server_addr(&self) -> std::net::SocketAddr {
        self.server
            .trim_start_matches("https://")
            .parse()
            .expect("the apiserver listens on 127.0.0.1:<port>")
    }

    /// Runs `kubectl ARGS` as the admin and returns its stdout; panics with its stderr when it
    /// fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        kubectl_with(&self.kubeconfig(User::Admin), args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A `kubectl` command authenticated as `user`.
    pub fn kubectl(&self, user: User) -> Command {
        let mut command = Command::new("kubectl");
        command.arg(format!("--kubeconfig={}", self.kubeconfig(user).display()));
        command
    }

    /// Creates a fresh namespace named after the test, such as `crd-cel-4f2a`.
    pub async fn namespace(&self, test: &str) -> String {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{test}-{}-{n}", std::process::id() % 100_000);
        let api: Api<Namespace> = Api::all(self.client(User::Admin).await);
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        api.create(&PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        name
    }
}

/// Runs kubectl with a kubeconfig and returns its stdout, or an error holding its stderr.
/// Runs `command` with `input` on its standard input; its output, stdout and stderr captured.
pub fn with_input(command: &mut Command, input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the command starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn kubectl_with(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new("kubectl")
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .output()?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )
    }
}

fn kubeconfig_name(user: User) -> String {
    format!("{}.kubeconfig", user.name())
}

/// Builds (or finds in the cache) the control-plane binaries and returns their directory.
fn build() -> Result<PathBuf> {
    let script = repo_root().join("e2e/controlplane/build.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}); its output is above",
            script.display(),
            output.status
        );
    }
    let stdout = String::from_utf8(output.stdout)?;
    let dir = stdout
        .lines()
        .last()
        .context("build.sh printed no directory")?;
    Ok(PathBuf::from(dir))
}

/// What kstatus (the health computation Flux uses; `e2e/kstatus`, built by `e2e/prepare.sh`)
/// says of each of `objects`: (kind/name, status, message), such as `Current` or `Failed`.
pub fn kstatus(objects: &[serde_json::Value]) -> Vec<(String, String, String)> {
    let script = repo_root().join("e2e/kstatus/build.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run e2e/kstatus/build.sh");
    assert!(output.status.success(), "{} failed", script.display());
    let dir = String::from_utf8(output.stdout).unwrap();
    let dir = dir.lines().last().expect("build.sh printed no directory");
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects});
    let output = with_input(
        &mut Command::new(Path::new(dir).join("kstatus")),
        &list.to_string(),
    );
    assert!(
        output.status.success(),
        "kstatus: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            (
                format!("{}/{}", s("kind"), s("name")),
                s("status"),
                s("message"),
            )
        })
        .collect()
}

pub(crate) use tollgate_testkit::free_port;

pub(crate) fn http_get_ok(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
}

/// The body of GET `path` on 127.0.0.1:`port` over plain HTTP (empty if it cannot connect).
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return String::new();
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// Polls `ready` until it holds, failing with the process's log tail when the process exits or
/// the timeout passes.
fn wait_until(process: &Process, timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(status) = process.exited() {
            bail!(
                "{} exited with {status} before it was ready; last lines of {}:\n{}",
                process.name(),
                process.log().display(),
                process.log_tail(40)
            );
        }
        if start.elapsed() > timeout {
            bail!(
                "{} was not ready after {}s (set TOLLGATE_E2E_READY_TIMEOUT to wait longer); last lines of {}:\n{}",
                process.name(),
                timeout.as_secs(),
                process.log().display(),
                process.log_tail(40)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Installs Tollgate's CRDs from `config/crd/bases/` with `kubectl apply --server-side`, as a
/// platform team would, and waits until they are Established. Runs once per test binary.
pub fn install_crds() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let cp = control_plane();
        let bases = repo_root().join("config/crd/bases");
        let output = cp
            .kubectl(User::Admin)
            .args([
                "apply",
                "--server-side",
                "--field-manager=tollgate-e2e",
                "-f",
            ])
            .arg(&bases)
            .output()
            .expect("kubectl runs");
        assert!(
            output.status.success(),
            "kubectl apply of the CRDs failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let output = cp
            .kubectl(User::Admin)
            .args(["wait", "--for=condition=Established", "--timeout=60s", "-f"])
            .arg(&bases)
            .output()
            .expect("kubectl runs");
        assert!(
            output.status.success(),
            "the CRDs did not become Established:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    });
}

/// Retries `check` every 250 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {}s waiting for {what}",
            timeout.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

impl ControlPlane {
    /// A client of the admin impersonating `username` (a ServiceAccount or user name): the
    /// apiserver authorises it, and admission sees it, as that subject.
    pub async fn client_as(&self, username: &str) -> kube::Client {
        let mut config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(self.kubeconfig(User::Admin))
                .expect("the harness wrote a valid kubeconfig"),
            &KubeConfigOptions::default(),
        )
        .await
        .expect("the kubeconfig loads");
        config.auth_info.impersonate = Some(username.to_owned());
        kube::Client::try_from(config).expect("a client can be built")
    }

    /// A kube client that authenticates with a bearer token, as an agent's pod would.
    pub async fn client_with_token(&self, token: &str) -> kube::Client {
        use base64::Engine;
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: token\n  user:\n    token: {token}\ncontexts:\n- name: token\n  context: {{cluster: e2e, user: token}}\ncurrent-context: token\n",
            self.server,
            base64::engine::general_purpose::STANDARD.encode(&self.ca_pem),
        );
        let kubeconfig = Kubeconfig::from_yaml(&kubeconfig).expect("a valid token kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("the kubeconfig loads");
        kube::Client::try_from(config).expect("a client can be built")
    }
}
