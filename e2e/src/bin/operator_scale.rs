//! How the operator copes with a burst: N AgentIdentities created at once on the local control
//! plane; the time until every one is Ready, and the operator's peak RSS. A benchmark, not a
//! test: it prints a Markdown table.
//!
//! `cargo build --release -p tollgate-operator -p tollgate-e2e --bins &&
//!  target/release/operator-scale [identities]`
//!
//! The operator runs as its own process (the release `tollgate-operator` binary beside this one)
//! so its RSS is its own; it authenticates as the control plane's admin.
#![forbid(unsafe_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use tollgate_crds::AgentIdentity;
use tollgate_e2e::{User, control_plane, install_crds};

/// VmHWM (peak) and VmRSS of a process, in KiB.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn identity(name: &str) -> AgentIdentity {
    serde_json::from_value(json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": {"name": name},
        "spec": {
            "description": "scale bench agent", "owner": {"team": "bench", "contacts": ["bench@example.com"]},
            "podSelector": {"matchLabels": {"app": name}},
            "kubernetes": {"rules": [
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]},
                {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"]}
            ]},
            "network": {"egress": [{"ports": [{"port": 443, "protocol": "TCP"}]}]}
        }
    }))
    .unwrap()
}

fn ready(identity: &AgentIdentity) -> bool {
    identity.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() {
    let count: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let binary = std::env::current_exe()
        .unwrap()
        .with_file_name("tollgate-operator");
    assert!(
        binary.exists(),
        "{} is missing: cargo build --release -p tollgate-operator",
        binary.display()
    );
    let cp = control_plane();
    install_crds();
    let admin = cp.client(User::Admin).await;
    let ns = cp.namespace("scale").await;
    let probe = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log_path = tollgate_e2e::repo_root().join("target/operator-scale.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let operator = Operator(
        Command::new(&binary)
            .args([
                "--namespace",
                &ns,
                "--watch-namespace",
                &ns,
                "--probe-listen",
                &format!("127.0.0.1:{probe}"),
            ])
            .env("KUBECONFIG", cp.kubeconfig(User::Admin))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the operator starts"),
    );
    let pid = operator.0.id();
    let readyz = || {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", probe)) else {
            return false;
        };
        let _ = write!(stream, "GET /readyz HTTP/1.0\r\n\r\n");
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer.split_whitespace().nth(1) == Some("200")
    };
    // Ready (not standby) once it leads and its watches synced.
    let lease: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(admin.clone(), &ns);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(readyz() && lease.get_opt("tollgate-operator").await.unwrap().is_some()) {
        assert!(Instant::now() < deadline, "the operator did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (idle_peak, _) = memory(pid);

    let identities: Api<AgentIdentity> = Api::namespaced(admin.clone(), &ns);
    let start = Instant::now();
    futures::stream::iter(0..count)
        .map(|i| {
            let identities = identities.clone();
            async move {
                identities
                    .create(&PostParams::default(), &identity(&format!("agent-{i:04}")))
                    .await
                    .unwrap_or_else(|e| panic!("create agent-{i:04}: {e}"))
            }
        })
        .buffer_unordered(64)
        .for_each(|_| async {})
        .await;
    let created = start.elapsed();
    let mut all_ready = None;
    while start.elapsed() < Duration::from_secs(300) {
        let list = identities.list(&ListParams::default()).await.unwrap();
        let done = list.items.iter().filter(|i| ready(i)).count();
        if done == count {
            all_ready = Some(start.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (peak, rss) = memory(pid);
    let all_ready = all_ready.unwrap_or_else(|| {
        panic!(
            "not every identity was Ready after 300 s; see {}",
            log_path.display()
        )
    });
    println!(
        "| identities | created in | all Ready after | operator peak RSS | RSS after | idle peak RSS |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {count} | {:.1} s | {:.1} s | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
        created.as_secs_f64(),
        all_ready.as_secs_f64(),
        peak as f64 / 1024.0,
        rss as f64 / 1024.0,
        idle_peak as f64 / 1024.0
    );
    drop(operator);
}
