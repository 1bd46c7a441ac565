//! A real single-node Kubernetes cluster for the end-to-end tests that run Tollgate as it is
//! deployed: its own images as pods, installed from its Helm chart.
//!
//! Parts: etcd, kube-apiserver and kube-controller-manager from the control plane's build
//! (`e2e/controlplane`), and kubelet, kube-scheduler, kube-proxy, kube-router (NetworkPolicy,
//! firewall only), a minimal CoreDNS and helm from `e2e/node/build.sh` (pinned Go modules, cached
//! under `~/.cache/tollgate/node/`); containerd, runc and the CNI plugins from Debian. Images are
//! built locally (see [`crate::image`]) and imported into containerd; nothing is pulled.
//!
//! Isolation: the whole cluster, and the test process that talks to it, runs in a network
//! namespace and a mount namespace of its own ([`isolate`] runs the program again inside them).
//! The network namespace has loopback and a port-less bridge for the node IP and no uplink, so
//! nothing in the cluster can reach anything outside it; the mount namespace lays private tmpfs
//! mounts over the host paths the kubelet and containerd insist on writing
//! (`/var/lib/kubelet`, `/run/containerd`, `/run/netns`, ...). What is global stays global and is
//! undone by a teardown that runs outside the namespaces when the program ends, however it ends
//! (a watcher process runs it too if the program is killed): the processes started (by pid), the
//! containers' shims and every process left in the pods' cgroup tree (a cgroup root of this run's
//! own), that tree, and the kernel sysctls the kubelet changes.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::process::{Process, Supervisor};
use crate::{ControlPlane, User, image, pki};

/// The node's name.
pub const NODE_NAME: &str = "tollgate-node";
/// The node's IP: the apiserver and the kubelet listen here (pods cannot reach loopback).
pub const NODE_IP: &str = "10.10.0.1";
const NODE_NET: &str = "10.10.0.0/24";
/// A bridge with no ports carries the node IP (the kernel here has no dummy interface driver).
const BRIDGE: &str = "tgnode0";
const POD_CIDR: &str = "10.244.0.0/16";
const POD_SUBNET: &str = "10.244.0.0/24";
const POD_GATEWAY: &str = "10.244.0.1";
const SERVICE_CIDR: &str = "10.0.0.0/24";
/// The cluster DNS Service's IP.
pub const DNS_IP: &str = "10.0.0.10";
/// The images of the node itself (the pods' sandbox, the cluster DNS).
pub const PAUSE_IMAGE: &str = "localhost/tollgate-e2e/pause:1";
const COREDNS_IMAGE: &str = "localhost/tollgate-e2e/coredns:1";

/// Set in the program [`isolate`] runs again: the run's directory.
const DIR_VAR: &str = "TOLLGATE_E2E_NODE_DIR";

/// Host paths the kubelet, containerd and the CNI plugins write to whatever their configuration
/// says; inside the mount namespace each is a private tmpfs.
const PRIVATE_PATHS: [&str; 7] = [
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/run/containerd",
    "/var/lib/cni",
    "/run/netns",
    "/etc/cni",
];

/// Global (not per network namespace) sysctls the kubelet sets; restored by the teardown.
const GLOBAL_SYSCTLS: [&str; 6] = [
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
];

/// Undoes what the run changed outside its namespaces. Idempotent; serialised by a lock beside
/// the run directories, so the watcher and the program never run it at once.
const TEARDOWN: &str = r#"
dir=$1
exec 9>"$(dirname "$dir")/.node-teardown.lock"
flock 9
[ -d "$dir" ] && [ ! -e "$dir/torn-down" ] || exit 0
# 1. The components, by pid: TERM, then KILL after ten seconds.
pids=$(cat "$dir/pids" 2>/dev/null)
if [ -n "$pids" ]; then
  kill $pids 2>/dev/null
  for _ in $(seq 1 40); do
    alive=0
    for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.25
  done
  kill -9 $pids 2>/dev/null
fi
# 2. The containers' shims (they outlive containerd), then every process left in the pods' cgroups.
pkill -KILL -f -- "-address $dir/containerd/containerd.sock" 2>/dev/null
cg=$(cat "$dir/cgroup-root" 2>/dev/null)
if [ -n "$cg" ]; then
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    procs=$(find /sys/fs/cgroup/*/"$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u)
    [ -z "$procs" ] && break
    kill -9 $procs 2>/dev/null
    sleep 0.3
  done
  for h in /sys/fs/cgroup/*/"$cg"; do
    [ -d "$h" ] && find "$h" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
fi
# 3. The global sysctls, as they were before the kubelet started.
if [ -f "$dir/sysctl.orig" ]; then
  while IFS='=' read -r key value; do sysctl -qw "$key=$value" 2>/dev/null; done <"$dir/sysctl.orig"
fi
# 4. The mount points this run made on the host (empty: their tmpfs lived in the namespace).
[ -f "$dir/created" ] && tac "$dir/created" | while read -r path; do rmdir "$path" 2>/dev/null; done
if [ -n "${TOLLGATE_E2E_KEEP:-}" ]; then touch "$dir/torn-down"; else rm -rf "$dir"; fi
"#;

/// Waits for the program's pid to end, then tears down.
const WATCHER: &str = r#"
pid=$1 dir=$2
while kill -0 "$pid" 2>/dev/null; do sleep 0.5; done
bash -c "$3" teardown "$dir"
"#;

/// Runs this program again inside network and mount namespaces of its own (with `unshare`, as
/// root) and returns its exit code once it ended and the teardown ran; returns `None` when this
/// already is that program, which then starts the cluster with [`cluster`].
///
/// Only one node runs on a machine at a time (the sysctls and cgroups it touches are global): a
/// second waits for the first.
pub fn isolate() -> Result<Option<i32>> {
    if std::env::var_os(DIR_VAR).is_some() {
        return Ok(None);
    }
    let uid = Command::new("id").arg("-u").output().context("run id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!(
            "the e2e node needs root (network and mount namespaces, cgroups, iptables); run as root"
        );
    }
    // Installed, built (or found in the caches) here, where the package registries and the Go
    // module proxy are reachable: the namespaces have no route out.
    check_packages()?;
    crate::build()?;
    build_node()?;
    let runs = crate::repo_root().join("target/e2e-runs");
    std::fs::create_dir_all(&runs)?;
    let lock = std::fs::File::create(runs.join(".node.lock"))?;
    if lock.try_lock().is_err() {
        eprintln!("another e2e node runs on this machine; waiting for it to stop");
        lock.lock()?;
    }
    let dir = tempfile::Builder::new()
        .prefix("node-")
        .tempdir_in(&runs)?
        .keep();
    let exe = std::env::current_exe()?;
    let mut program = Command::new("unshare")
        .args(["--net", "--mount", "--propagation", "private", "--"])
        .arg(&exe)
        .args(std::env::args_os().skip(1))
        .env(DIR_VAR, &dir)
        .spawn()
        .context("run unshare (util-linux) to enter new network and mount namespaces")?;
    {
        use std::os::unix::process::CommandExt as _;
        Command::new("bash")
            .args(["-c", WATCHER, "tollgate-e2e-node-watcher"])
            .arg(program.id().to_string())
            .arg(&dir)
            .arg(TEARDOWN)
            // Its own process group: ^C on the terminal must not stop the teardown.
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .context("start the e2e node's watcher")?;
    }
    let status = program.wait()?;
    teardown(&dir)?;
    drop(lock);
    Ok(Some(status.code().unwrap_or(101)))
}

/// What the node needs from Debian, and how to tell it is there.
const PACKAGES: [(&str, &str); 6] = [
    ("containerd", "command -v containerd"),
    ("runc", "command -v runc"),
    ("containernetworking-plugins", "test -x /usr/lib/cni/bridge"),
    ("iptables", "command -v iptables"),
    ("ipset", "command -v ipset"),
    ("conntrack", "command -v conntrack"),
];

/// Fails naming the Debian packages the node needs that are missing (`e2e/prepare.sh` installs
/// them; a test installs nothing).
fn check_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, check)| run("sh", &["-c", check]).is_err())
        .map(|(package, _)| *package)
        .collect();
    if !missing.is_empty() {
        bail!(
            "the e2e node needs the Debian packages {}: run `bash e2e/prepare.sh`, which installs \
             what the tests need, or `apt-get install -y {}` as root",
            missing.join(" "),
            missing.join(" ")
        );
    }
    Ok(())
}

fn teardown(dir: &Path) -> Result<()> {
    let status = Command::new("bash")
        .args(["-c", TEARDOWN, "teardown"])
        .arg(dir)
        .status()?;
    if !status.success() {
        bail!("the e2e node's teardown failed ({status})");
    }
    Ok(())
}

/// A running single-node cluster.
#[derive(Debug)]
pub struct Cluster {
    control_plane: ControlPlane,
    node_bin: PathBuf,
    _node: Vec<Process>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// The cluster of this program, started on first use with `images` imported (besides the node's
/// own and Tollgate's shipped images). Panics when it cannot start, with the failing part's log
/// tail; call [`isolate`] first.
pub fn cluster(images: &[image::Spec]) -> &'static Cluster {
    CLUSTER.get_or_init(|| match Cluster::start(images) {
        Ok(cluster) => cluster,
        Err(e) => panic!("the e2e node did not start: {e:#}"),
    })
}

/// `program args...`, failing with its stderr.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn build_node() -> Result<PathBuf> {
    let script = crate::repo_root().join("e2e/node/build.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
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
    Ok(PathBuf::from(
        stdout
            .lines()
            .last()
            .context("build.sh printed no directory")?,
    ))
}

impl Cluster {
    fn start(images: &[image::Spec]) -> Result<Self> {
        let dir = PathBuf::from(
            std::env::var_os(DIR_VAR).context("the e2e node runs only inside isolate()")?,
        );
        let started = Instant::now();
        // isolate() built them; here they come from the caches.
        let control_bin = crate::build()?;
        let node_bin = build_node()?;
        check_packages()?;
        let supervisor = Supervisor::attach(&dir);
        prepare_host(&dir)?;
        let stamp =
            |what: &str| eprintln!("[e2e node {:5.1}s] {what}", started.elapsed().as_secs_f64());
        stamp("network, mounts, cgroups ready");

        // Certificates and kubeconfigs.
        let pki = pki::Pki::generate_for(&[NODE_IP.parse()?])?;
        pki.write(&dir)?;
        let server = format!("https://{NODE_IP}:6443");
        for user in User::ALL {
            std::fs::write(
                dir.join(crate::kubeconfig_name(user)),
                pki.kubeconfig(&server, user)?,
            )?;
        }
        let components = [
            (
                "controller-manager",
                "system:kube-controller-manager",
                &[][..],
            ),
            ("scheduler", "system:kube-scheduler", &[][..]),
            ("proxy", "system:kube-proxy", &[][..]),
            ("node", "system:node:tollgate-node", &["system:nodes"][..]),
        ];
        for (name, user, groups) in components {
            std::fs::write(
                dir.join(format!("{name}.kubeconfig")),
                pki.kubeconfig_for(&server, user, groups)?,
            )?;
        }
        let write_pair = |name: &str, (cert, key): (String, String)| -> Result<()> {
            std::fs::write(dir.join(format!("{name}.crt")), cert)?;
            std::fs::write(dir.join(format!("{name}.key")), key)?;
            Ok(())
        };
        write_pair(
            "apiserver-kubelet-client",
            pki.client("kube-apiserver-kubelet-client", &["system:masters"])?,
        )?;
        write_pair(
            "kubelet-serving",
            pki.serving(NODE_NAME, &[NODE_NAME, NODE_IP])?,
        )?;
        let file = |name: &str| dir.join(name).display().to_string();
        let admin = dir.join(crate::kubeconfig_name(User::Admin));
        let kubectl = |args: &[&str]| crate::kubectl_with(&admin, args);

        let mut processes = Vec::new();
        let etcd = supervisor.start(
            "etcd",
            Command::new(control_bin.join("etcd")).args([
                "--name=node".to_owned(),
                format!("--data-dir={}", file("etcd")),
                "--listen-client-urls=http://127.0.0.1:2379".to_owned(),
                "--advertise-client-urls=http://127.0.0.1:2379".to_owned(),
                "--listen-peer-urls=http://127.0.0.1:2380".to_owned(),
                "--initial-advertise-peer-urls=http://127.0.0.1:2380".to_owned(),
                "--initial-cluster=node=http://127.0.0.1:2380".to_owned(),
                "--unsafe-no-fsync".to_owned(),
                "--log-level=warn".to_owned(),
            ]),
        )?;
        crate::wait_until(&etcd, crate::ready_timeout(), || {
            crate::http_get_ok(2379, "/health")
        })?;
        processes.push(etcd);

        let apiserver = supervisor.start(
            "kube-apiserver",
            Command::new(control_bin.join("kube-apiserver")).args([
                "--etcd-servers=http://127.0.0.1:2379".to_owned(),
                format!("--bind-address={NODE_IP}"),
                "--secure-port=6443".to_owned(),
                format!("--advertise-address={NODE_IP}"),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--authorization-mode=Node,RBAC".to_owned(),
                "--enable-admission-plugins=NodeRestriction".to_owned(),
                format!("--client-ca-file={}", file(pki::CA_CERT)),
                format!("--tls-cert-file={}", file(pki::SERVER_CERT)),
                format!("--tls-private-key-file={}", file(pki::SERVER_KEY)),
                format!(
                    "--kubelet-client-certificate={}",
                    file("apiserver-kubelet-client.crt")
                ),
                format!(
                    "--kubelet-client-key={}",
                    file("apiserver-kubelet-client.key")
                ),
                format!("--kubelet-certificate-authority={}", file(pki::CA_CERT)),
                "--kubelet-preferred-address-types=InternalIP".to_owned(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_owned(),
                format!("--service-account-key-file={}", file(pki::SA_PUB)),
                format!("--service-account-signing-key-file={}", file(pki::SA_KEY)),
                format!("--cert-dir={}", file("apiserver-certs")),
                "--allow-privileged=true".to_owned(),
                "--profiling=false".to_owned(),
                "--v=1".to_owned(),
            ]),
        )?;
        crate::wait_until(&apiserver, crate::ready_timeout(), || {
            kubectl(&["get", "--raw", "/readyz"]).is_ok_and(|out| out.trim() == "ok")
        })?;
        processes.push(apiserver);
        stamp("apiserver ready");

        let kcm_kubeconfig = file("controller-manager.kubeconfig");
        processes.push(supervisor.start(
            "kube-controller-manager",
            Command::new(control_bin.join("kube-controller-manager")).args([
                format!("--kubeconfig={kcm_kubeconfig}"),
                format!("--authentication-kubeconfig={kcm_kubeconfig}"),
                format!("--authorization-kubeconfig={kcm_kubeconfig}"),
                "--leader-elect=false".to_owned(),
                "--use-service-account-credentials=true".to_owned(),
                "--allocate-node-cidrs=true".to_owned(),
                format!("--cluster-cidr={POD_CIDR}"),
                "--node-cidr-mask-size=24".to_owned(),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                format!("--service-account-private-key-file={}", file(pki::SA_KEY)),
                format!("--root-ca-file={}", file(pki::CA_CERT)),
                // Nothing here asks for certificates through CSRs.
                "--controllers=*,-certificatesigningrequest-signing-controller".to_owned(),
                "--bind-address=127.0.0.1".to_owned(),
                "--secure-port=10257".to_owned(),
                format!("--cert-dir={}", file("kcm-certs")),
                "--profiling=false".to_owned(),
                "--v=1".to_owned(),
            ]),
        )?);
        let scheduler_kubeconfig = file("scheduler.kubeconfig");
        processes.push(supervisor.start(
            "kube-scheduler",
            Command::new(node_bin.join("kube-scheduler")).args([
                format!("--kubeconfig={scheduler_kubeconfig}"),
                format!("--authentication-kubeconfig={scheduler_kubeconfig}"),
                format!("--authorization-kubeconfig={scheduler_kubeconfig}"),
                "--leader-elect=false".to_owned(),
                "--bind-address=127.0.0.1".to_owned(),
                "--secure-port=10259".to_owned(),
                "--profiling=false".to_owned(),
                "--v=1".to_owned(),
            ]),
        )?);

        // containerd, with the CNI bridge and the images.
        std::fs::create_dir_all(dir.join("cni/net.d"))?;
        std::fs::write(dir.join("containerd.toml"), containerd_config(&dir))?;
        std::fs::write(
            dir.join("cni/net.d/10-tollgate-e2e.conflist"),
            cni_config(&dir),
        )?;
        let containerd = supervisor.start(
            "containerd",
            Command::new("containerd").args(["--config", &file("containerd.toml")]),
        )?;
        let socket = dir.join("containerd/containerd.sock");
        crate::wait_until(&containerd, crate::ready_timeout(), || {
            ctr_on(&socket)
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        })?;
        processes.push(containerd);
        let mut archives = vec![
            node_image(
                &node_bin,
                "pause",
                PAUSE_IMAGE,
                &["/usr/local/bin/pause"],
                &dir,
            )?,
            node_image(
                &node_bin,
                "coredns",
                COREDNS_IMAGE,
                &["/usr/local/bin/coredns", "-conf", "/etc/coredns/Corefile"],
                &dir,
            )?,
        ];
        for (_, binary) in image::SHIPPED {
            let archive = image::archive(binary);
            if !archive.exists() {
                bail!(
                    "{} is missing: build the images first with `cargo run -p tollgate-e2e --bin images`",
                    archive.display()
                );
            }
            archives.push(archive);
        }
        for spec in images {
            let name = spec.reference.replace(['/', ':'], "_");
            archives.push(image::write(spec, &dir.join(format!("images/{name}.tar")))?.path);
        }
        for archive in &archives {
            let output = ctr_on(&socket)
                .args(["images", "import"])
                .arg(archive)
                .output()?;
            if !output.status.success() {
                bail!(
                    "ctr images import {}: {}",
                    archive.display(),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
        stamp(&format!("{} images imported", archives.len()));

        // The kubelet and kube-proxy.
        std::fs::write(dir.join("resolv.conf"), format!("nameserver {DNS_IP}\n"))?;
        std::fs::write(dir.join("kubelet.yaml"), kubelet_config(&dir)?)?;
        let kubelet = supervisor.start(
            "kubelet",
            Command::new(node_bin.join("kubelet")).args([
                format!("--config={}", file("kubelet.yaml")),
                format!("--kubeconfig={}", file("node.kubeconfig")),
                format!("--hostname-override={NODE_NAME}"),
                format!("--node-ip={NODE_IP}"),
                format!("--root-dir={}", file("kubelet")),
                "--v=1".to_owned(),
            ]),
        )?;
        std::fs::write(
            dir.join("kube-proxy.yaml"),
            format!(
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: {proxy}}}
mode: iptables
hostnameOverride: {NODE_NAME}
clusterCIDR: {POD_CIDR}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [\"{NODE_IP}/32\"]
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
iptables: {{localhostNodePorts: false}}
",
                proxy = file("proxy.kubeconfig")
            ),
        )?;
        let proxy = supervisor.start(
            "kube-proxy",
            Command::new(node_bin.join("kube-proxy")).args([
                format!("--config={}", file("kube-proxy.yaml")),
                "--v=1".to_owned(),
            ]),
        )?;
        crate::wait_until(&kubelet, crate::ready_timeout(), || {
            kubectl(&[
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])
            .is_ok_and(|s| s.trim() == "True")
        })?;
        stamp("node Ready");
        crate::wait_until(&proxy, crate::ready_timeout(), || {
            crate::http_get_ok(10256, "/healthz")
        })?;
        processes.push(kubelet);
        processes.push(proxy);

        // NetworkPolicy enforcement and the cluster DNS.
        let router = supervisor.start(
            "kube-router",
            Command::new(node_bin.join("kube-router")).args([
                format!("--kubeconfig={}", admin.display()),
                format!("--hostname-override={NODE_NAME}"),
                "--run-firewall=true".to_owned(),
                "--run-router=false".to_owned(),
                "--run-service-proxy=false".to_owned(),
                "--enable-cni=false".to_owned(),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--enable-ipv4=true".to_owned(),
                "--enable-ipv6=false".to_owned(),
                "--metrics-port=0".to_owned(),
                "--health-port=20244".to_owned(),
                "--v=1".to_owned(),
            ]),
        )?;
        crate::with_input(
            Command::new("kubectl")
                .arg(format!("--kubeconfig={}", admin.display()))
                .args(["apply", "-f", "-"]),
            COREDNS,
        )
        .status
        .success()
        .then_some(())
        .context("kubectl apply of the cluster DNS failed")?;
        crate::wait_until(&router, crate::ready_timeout(), || {
            crate::http_get_ok(20244, "/healthz")
        })?;
        processes.push(router);
        let dns_ready = Instant::now();
        while kubectl(&[
            "-n",
            "kube-system",
            "get",
            "deployment",
            "coredns",
            "-o",
            "jsonpath={.status.readyReplicas}",
        ])
        .map_or(true, |s| s.trim() != "1")
        {
            if dns_ready.elapsed() > crate::ready_timeout() {
                let state = kubectl(&[
                    "-n",
                    "kube-system",
                    "get",
                    "deployments,pods,events",
                    "-o",
                    "wide",
                ])
                .unwrap_or_else(|e| e.to_string());
                bail!(
                    "the cluster DNS was not ready in time:\n{state}\nlast lines of the kubelet's log:\n{}",
                    std::fs::read_to_string(dir.join("kubelet.log"))
                        .unwrap_or_default()
                        .lines()
                        .rev()
                        .take(30)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        stamp("cluster DNS and NetworkPolicy enforcement ready");

        Ok(Cluster {
            control_plane: ControlPlane {
                dir,
                server,
                ca_pem: pki.ca_pem(),
                _processes: Vec::new(),
            },
            node_bin,
            _node: processes,
        })
    }

    /// The apiserver, its users and kubectl, as for the host-process control plane.
    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }

    /// The run's directory (certificates, kubeconfigs, logs, containerd and kubelet state).
    pub fn dir(&self) -> &Path {
        self.control_plane.dir()
    }

    /// The `helm` built with the node, pointed at this cluster as the admin.
    pub fn helm(&self) -> Command {
        let mut helm = Command::new(self.node_bin.join("helm"));
        helm.env("KUBECONFIG", self.control_plane.kubeconfig(User::Admin))
            .env("HELM_CACHE_HOME", self.dir().join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir().join("helm/config"))
            .env("HELM_DATA_HOME", self.dir().join("helm/data"));
        helm
    }

    /// Installs Tollgate from `charts/tollgate` with helm into `namespace`, as a platform team
    /// would on a cluster without a storage provisioner: a PersistentVolume for the gateway's
    /// audit trail first, then `helm install --wait`. On failure the error holds the pods'
    /// state and the components' last log lines.
    pub fn install_tollgate(&self, namespace: &str, extra: &[&str]) -> Result<()> {
        let volume = self.dir().join("volumes/tollgate-audit");
        std::fs::create_dir_all(&volume)?;
        run(
            "chown",
            &[
                &format!("{}:{}", image::USER, image::USER),
                &volume.display().to_string(),
            ],
        )?;
        let kubectl = |args: &[&str]| self.control_plane.kubectl(User::Admin).args(args).output();
        let pv = format!(
            "apiVersion: v1
kind: PersistentVolume
metadata: {{name: tollgate-audit}}
spec:
  capacity: {{storage: 10Gi}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  hostPath: {{path: {}, type: Directory}}
",
            volume.display()
        );
        let output = crate::with_input(
            self.control_plane
                .kubectl(User::Admin)
                .args(["apply", "-f", "-"]),
            &pv,
        );
        if !output.status.success() {
            bail!(
                "create the audit volume: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let output = self
            .helm()
            .args(["install", "tollgate"])
            .arg(crate::repo_root().join("charts/tollgate"))
            .args([
                "--namespace",
                namespace,
                "--create-namespace",
                "--wait",
                "--timeout",
                "120s",
            ])
            .args(extra)
            .output()?;
        if !output.status.success() {
            let text = |o: std::io::Result<std::process::Output>| {
                o.map(|o| {
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )
                })
                .unwrap_or_else(|e| e.to_string())
            };
            let mut state = text(kubectl(&["-n", namespace, "get", "pods,pvc", "-o", "wide"]));
            for part in ["tollgate-operator", "tollgate-webhook", "tollgate-gateway"] {
                let deployment = format!("deployment/{part}");
                state.push_str(&format!(
                    "--- {part}:\n{}\n",
                    text(kubectl(&[
                        "-n",
                        namespace,
                        "logs",
                        &deployment,
                        "--tail=30"
                    ]))
                ));
            }
            bail!(
                "helm install failed: {}\n{state}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// `ctr` on this node's containerd, in the kubelet's namespace.
    pub fn ctr(&self) -> Command {
        ctr_on(&self.dir().join("containerd/containerd.sock"))
    }

    /// The last lines of a component's log (`kubelet`, `kube-apiserver`, ...).
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir().join(format!("{component}.log")))
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

fn ctr_on(socket: &Path) -> Command {
    let mut ctr = Command::new("ctr");
    ctr.arg("--address").arg(socket).args(["-n", "k8s.io"]);
    ctr
}

/// The node's network, private mounts, cgroup root and the record of the global sysctls.
fn prepare_host(dir: &Path) -> Result<()> {
    run("ip", &["link", "set", "lo", "up"])?;
    run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
    run(
        "ip",
        &["addr", "add", &format!("{NODE_IP}/24"), "dev", BRIDGE],
    )?;
    run("ip", &["link", "set", BRIDGE, "up"])?;
    // ClusterIPs without endpoints go nowhere (there is no default route at all).
    run(
        "ip",
        &["route", "add", SERVICE_CIDR, "dev", BRIDGE, "src", NODE_IP],
    )?;
    // Per network namespace: these change only the node's own.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .context("enable forwarding in the node's network namespace")?;
    if let Err(e) = std::fs::write("/proc/sys/net/bridge/bridge-nf-call-iptables", "1") {
        bail!("net.bridge.bridge-nf-call-iptables (the br_netfilter module must be loaded): {e}");
    }

    let mut created = std::fs::File::create(dir.join("created"))?;
    for path in PRIVATE_PATHS {
        let mut missing = Vec::new();
        let mut p = Path::new(path);
        while !p.exists() {
            missing.push(p.to_owned());
            p = p.parent().context("a path under /")?;
        }
        for m in missing.iter().rev() {
            std::fs::create_dir(m)?;
            writeln!(created, "{}", m.display())?;
        }
        run("mount", &["-t", "tmpfs", "-o", "mode=0755", "tmpfs", path])?;
    }

    let mut orig = String::new();
    for key in GLOBAL_SYSCTLS {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        if let Ok(value) = std::fs::read_to_string(&path) {
            orig.push_str(&format!("{key}={}\n", value.trim()));
        }
    }
    std::fs::write(dir.join("sysctl.orig"), orig)?;

    // A cgroup root of this run's own in every v1 hierarchy, so that the teardown finds every
    // process the pods left and removes exactly the cgroups this run made.
    let root = format!(
        "tollgate-e2e-{}",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("node")
    );
    std::fs::write(dir.join("cgroup-root"), &root)?;
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")? {
        let hierarchy = hierarchy?.path();
        if hierarchy.join("cgroup.procs").exists() && !hierarchy.ends_with("unified") {
            let cgroup = hierarchy.join(&root);
            std::fs::create_dir_all(&cgroup)
                .with_context(|| format!("create {}", cgroup.display()))?;
            if hierarchy.ends_with("cpuset") {
                for knob in ["cpuset.cpus", "cpuset.mems"] {
                    std::fs::write(cgroup.join(knob), std::fs::read(hierarchy.join(knob))?)?;
                }
            }
        }
    }
    Ok(())
}

/// The image of a node binary (static Go: no libraries), written under the run directory.
fn node_image(
    bin: &Path,
    name: &str,
    reference: &str,
    entrypoint: &[&str],
    dir: &Path,
) -> Result<PathBuf> {
    let mut spec = image::spec_of(&bin.join(name), name)?;
    spec.reference = reference.to_owned();
    spec.entrypoint = entrypoint.iter().map(|s| (*s).to_owned()).collect();
    Ok(image::write(&spec, &dir.join(format!("images/{name}.tar")))?.path)
}

fn containerd_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{d}/containerd/containerd.sock"
[ttrpc]
  address = "{d}/containerd/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{d}/containerd/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{PAUSE_IMAGE}"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    # The VM lacks CAP_SYS_RESOURCE: runc cannot lower an OOM score.
    restrict_oom_score_adj = true
    disable_apparmor = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "{d}/cni/net.d"
      max_conf_num = 1
"#
    )
}

fn cni_config(dir: &Path) -> String {
    format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "tollgate-e2e",
  "plugins": [{{
    "type": "bridge",
    "bridge": "cni0",
    "isGateway": true,
    "ipMasq": false,
    "hairpinMode": true,
    "ipam": {{
      "type": "host-local",
      "dataDir": "{d}/cni/ipam",
      "ranges": [[{{"subnet": "{POD_SUBNET}", "gateway": "{POD_GATEWAY}"}}]],
      "routes": [{{"dst": "{SERVICE_CIDR}"}}, {{"dst": "{NODE_NET}"}}]
    }}
  }}]
}}
"#,
        d = dir.display()
    )
}

fn kubelet_config(dir: &Path) -> Result<String> {
    let d = dir.display();
    let cgroup_root = std::fs::read_to_string(dir.join("cgroup-root"))?;
    Ok(format!(
        "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {d}/ca.crt}}
authorization: {{mode: Webhook}}
tlsCertFile: {d}/kubelet-serving.crt
tlsPrivateKeyFile: {d}/kubelet-serving.key
containerRuntimeEndpoint: unix://{d}/containerd/containerd.sock
imageServiceEndpoint: unix://{d}/containerd/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup_root}
failCgroupV1: false
failSwapOn: false
clusterDomain: cluster.local
clusterDNS: [{DNS_IP}]
resolvConf: {d}/resolv.conf
podLogsDirectory: {d}/pod-logs
serializeImagePulls: false
evictionHard: {{memory.available: 100Mi, nodefs.available: 2%, imagefs.available: 2%}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
maxPods: 110
"
    ))
}

/// The cluster DNS: the minimal CoreDNS at 10.0.0.10. It runs as non-root and listens on port 53
/// (agents' NetworkPolicies allow DNS to port 53 of the kube-dns pods), which the pod's
/// `ip_unprivileged_port_start` sysctl permits.
const COREDNS: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects:
- {kind: ServiceAccount, name: coredns, namespace: kube-system}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:53 {
        errors
        health :8080 {
            lameduck 2s
        }
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
            ttl 30
        }
        cache 30
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      securityContext:
        runAsNonRoot: true
        sysctls: [{name: net.ipv4.ip_unprivileged_port_start, value: "53"}]
      priorityClassName: system-cluster-critical
      containers:
      - name: coredns
        image: localhost/tollgate-e2e/coredns:1
        imagePullPolicy: Never
        ports:
        - {containerPort: 53, name: dns, protocol: UDP}
        - {containerPort: 53, name: dns-tcp, protocol: TCP}
        readinessProbe:
          httpGet: {path: /ready, port: 8181}
          periodSeconds: 1
        livenessProbe:
          httpGet: {path: /health, port: 8080}
          initialDelaySeconds: 10
        securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true}
        volumeMounts:
        - {name: config, mountPath: /etc/coredns, readOnly: true}
      volumes:
      - name: config
        configMap: {name: coredns}
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: 10.0.0.10
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
"#;
