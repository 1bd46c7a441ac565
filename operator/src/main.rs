//! `tollgate-operator`: reconciles AgentIdentity, AgentPolicy and ApprovalRequest. One replica
//! leads through a Lease; the others stand by.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tollgate_engine::children::GatewayPeer;
use tollgate_operator::{Settings, leader};

#[derive(Debug, Parser)]
#[command(name = "tollgate-operator", version, about = "Tollgate's operator")]
struct Args {
    /// Tollgate's own namespace: the leader Lease and the global kill switch ConfigMap.
    #[arg(long, env = "TOLLGATE_NAMESPACE", default_value = "tollgate-system")]
    namespace: String,
    /// Reconcile only this namespace (default: every namespace).
    #[arg(long, env = "TOLLGATE_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// This replica's name in the Lease.
    #[arg(long, env = "POD_NAME", default_value = "tollgate-operator")]
    pod_name: String,
    /// Address of the plain listener for /healthz, /readyz and /metrics.
    #[arg(long, env = "TOLLGATE_PROBE_LISTEN", default_value = "0.0.0.0:8080")]
    probe_listen: SocketAddr,
    /// Namespace of the gateway pods agents may reach (default: --namespace).
    #[arg(long, env = "TOLLGATE_GATEWAY_NAMESPACE")]
    gateway_namespace: Option<String>,
    /// Labels of the gateway pods, as key=value[,key=value].
    #[arg(
        long,
        env = "TOLLGATE_GATEWAY_LABELS",
        default_value = "app.kubernetes.io/name=tollgate-gateway"
    )]
    gateway_labels: String,
    /// The gateway pods' (container) port agents may reach.
    #[arg(long, env = "TOLLGATE_GATEWAY_PORT", default_value_t = 8444)]
    gateway_port: i32,
    /// How long decided ApprovalRequests are kept, as a duration such as 2160h.
    #[arg(long, env = "TOLLGATE_APPROVAL_RETENTION", default_value = "2160h")]
    approval_retention: String,
    /// Seconds a Lease holds without renewal.
    #[arg(long, env = "TOLLGATE_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
}

fn labels(text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    text.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--gateway-labels: {pair:?} is not key=value"))?;
            Ok((key.trim().to_owned(), value.trim().to_owned()))
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .json()
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    // First: a SIGTERM that comes while the operator starts must not be lost (a container's
    // first process ignores a signal it has no handler for).
    let shutdown = tollgate_runtime::server::shutdown_signal();
    let retention = tollgate_engine::duration::parse(&args.approval_retention)
        .map_err(|e| anyhow::anyhow!("--approval-retention: {e}"))?;
    let lease_seconds = args.lease_seconds.max(3);
    let settings = Settings {
        gateway: GatewayPeer {
            namespace: args
                .gateway_namespace
                .unwrap_or_else(|| args.namespace.clone()),
            pod_labels: labels(&args.gateway_labels)?,
            port: args.gateway_port,
        },
        namespace: args.namespace,
        watch_namespace: args.watch_namespace,
        approval_retention: retention,
        holder: args.pod_name,
        lease: leader::Timing {
            duration: Duration::from_secs(lease_seconds),
            renew_every: Duration::from_secs(lease_seconds / 3),
        },
        probe_listen: args.probe_listen,
    };
    let client = kube::Client::try_default().await?;
    tollgate_operator::run(client, settings, shutdown).await
}
