//! `tollgate-webhook`: Tollgate's admission webhook in a cluster.
#![forbid(unsafe_code)]

use clap::Parser;
use tollgate_runtime::server::Serving;
use tollgate_webhook::Settings;

/// mimalloc rather than the system allocator, as the gateway: reviews allocate and free many
/// small buffers.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "tollgate-webhook",
    version,
    about = "Tollgate's admission webhook: Tollgate's own kinds, agent pods and agents' own writes"
)]
struct Args {
    #[command(flatten)]
    serving: Serving,
    /// Tollgate's own namespace (holds the global kill switch).
    #[arg(long, env = "TOLLGATE_NAMESPACE", default_value = "tollgate-system")]
    namespace: String,
    /// The gateway's ServiceAccount in that namespace; only it creates ApprovalRequests.
    #[arg(
        long,
        env = "TOLLGATE_GATEWAY_SERVICE_ACCOUNT",
        default_value = "tollgate-gateway"
    )]
    gateway_service_account: String,
    /// The gateway URL injected into agent pods as TOLLGATE_URL.
    #[arg(
        long,
        env = "TOLLGATE_GATEWAY_URL",
        default_value = "https://tollgate-gateway.tollgate-system.svc:8443"
    )]
    gateway_url: String,
    /// The audit store (a SQLite file or a PostgreSQL URL; two replicas need PostgreSQL):
    /// admission records its verdicts on agents' own writes and agent pods there. Without it,
    /// admission only logs its refusals.
    #[arg(long, env = "TOLLGATE_AUDIT_STORE")]
    audit: Option<String>,
    /// This replica's audit chain (its pod name).
    #[arg(long, env = "POD_NAME", default_value = "tollgate-webhook")]
    chain: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let handle = axum_server::Handle::new();
    tollgate_runtime::server::drain_on_signal(handle.clone(), std::time::Duration::from_secs(10));
    tollgate_runtime::server::install_crypto_provider();
    let client = kube::Client::try_default().await?;
    let settings = Settings {
        gateway_username: format!(
            "system:serviceaccount:{}:{}",
            args.namespace, args.gateway_service_account
        ),
        gateway_url: args.gateway_url,
    };
    let tls = args.serving.tls();
    let metrics = tollgate_runtime::metrics::Metrics::default();
    let audit = match &args.audit {
        Some(audit) => Some(tollgate_runtime::open_audit_log(audit, args.chain, &metrics).await?),
        None => None,
    };
    tollgate_webhook::run_in_cluster(
        client,
        settings,
        &args.namespace,
        tls,
        args.serving.listen,
        args.serving.probe_listen,
        handle,
        metrics,
        audit,
    )
    .await
}
