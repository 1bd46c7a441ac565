//! `tollgate-webhook`: the admission face of Tollgate in a cluster, and the gateway in standalone
//! mode (`tollgate-webhook standalone`).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use tollgate_webhook::{Settings, server::TlsFiles};

/// mimalloc rather than the system allocator: a decision allocates and frees many small
/// buffers on two threads, and glibc's malloc was about a tenth of the gateway's CPU
/// (`gateway-load`: 12.1k -> 13.5k decisions/s over HTTP, bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "tollgate-webhook",
    version,
    about = "Tollgate's admission webhook; `standalone` runs the gateway with no cluster"
)]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Address of the TLS listener the kube-apiserver calls.
    #[arg(long, env = "TOLLGATE_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Address of the plain listener for /healthz, /readyz and /metrics.
    #[arg(long, env = "TOLLGATE_PROBE_LISTEN", default_value = "0.0.0.0:8080")]
    probe_listen: SocketAddr,
    /// PEM certificate chain; reloaded when the file changes.
    #[arg(
        long,
        env = "TOLLGATE_TLS_CERT",
        default_value = "/etc/tollgate/tls/tls.crt"
    )]
    tls_cert: PathBuf,
    /// PEM private key; reloaded when the file changes.
    #[arg(
        long,
        env = "TOLLGATE_TLS_KEY",
        default_value = "/etc/tollgate/tls/tls.key"
    )]
    tls_key: PathBuf,
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
    /// Serve the gateway (decision API and MCP proxy) on this address too, with the same
    /// certificate. Needs --audit.
    #[arg(long, env = "TOLLGATE_GATEWAY_LISTEN", requires = "audit")]
    gateway_listen: Option<SocketAddr>,
    /// The audit store: a SQLite file or a PostgreSQL URL. The gateway records every decision
    /// there, and admission its verdicts on agents' own writes and agent pods (without it,
    /// admission only logs its refusals).
    #[arg(long, env = "TOLLGATE_AUDIT_STORE")]
    audit: Option<String>,
    /// This replica's audit chain (its pod name).
    #[arg(long, env = "POD_NAME", default_value = "tollgate-gateway")]
    chain: String,
    /// How often the gateway writes each AgentPolicy's track record and drift
    /// (`status.tools`, `status.drift`) from its audit trail, such as 5m; 0 never writes them.
    #[arg(long, env = "TOLLGATE_STANDING_INTERVAL", default_value = "5m", value_parser = interval)]
    standing_interval: std::time::Duration,
    /// The drift window: allowed tools not called in it are listed in `status.drift`.
    #[arg(long, env = "TOLLGATE_DRIFT_WINDOW", default_value = "720h", value_parser = window)]
    drift_window: String,
}

fn interval(text: &str) -> Result<std::time::Duration, String> {
    if text == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    duration(text)
}

fn duration(text: &str) -> Result<std::time::Duration, String> {
    let duration = tollgate_engine::duration::parse(text)?;
    if duration.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    Ok(duration)
}

fn window(text: &str) -> Result<String, String> {
    duration(text).map(|_| text.to_owned())
}

#[derive(Debug, clap::Subcommand)]
enum Mode {
    /// The gateway's decision API with no cluster: policies from a directory (reloaded on
    /// change), API keys from a file, an embedded SQLite audit store.
    Standalone {
        /// Directory of AgentIdentity and AgentPolicy YAML.
        #[arg(long, default_value = "config/samples")]
        policies: PathBuf,
        /// API key file (see the README).
        #[arg(long, default_value = "config/standalone/keys.yaml")]
        keys: PathBuf,
        /// The audit store: a SQLite file or a PostgreSQL URL.
        #[arg(
            long,
            env = "TOLLGATE_AUDIT_STORE",
            default_value = "tollgate-audit.db"
        )]
        audit: String,
        /// This writer's audit chain.
        #[arg(long, default_value = "standalone")]
        chain: String,
        /// Address to listen on. Plain HTTP, so only a loopback address is accepted.
        #[arg(long, default_value = "127.0.0.1:8480")]
        listen: SocketAddr,
        /// Per-upstream credentials, laid out as mounted Secrets: DIR/<namespace>/<secret>/<key>.
        #[arg(long)]
        secrets: Option<PathBuf>,
        /// Notification targets for budget breaches: a YAML map of target name (as named in
        /// onBudgetExceeded.notify) to a Slack-compatible incoming-webhook URL.
        #[arg(long)]
        notify: Option<PathBuf>,
    },
}

async fn standalone(
    policies: PathBuf,
    keys: PathBuf,
    audit: String,
    chain: String,
    listen: SocketAddr,
    secrets: Option<PathBuf>,
    notify: Option<PathBuf>,
) -> anyhow::Result<()> {
    use std::sync::Arc;
    use tollgate_audit::Redactor;
    use tollgate_webhook::gateway::{self, keys::Keys, policies::WatchedDir};

    if !listen.ip().is_loopback() {
        anyhow::bail!(
            "--listen {listen}: standalone mode serves plain HTTP, so it listens on loopback only"
        );
    }
    if !policies.is_dir() {
        anyhow::bail!("--policies {}: not a directory", policies.display());
    }
    let keys = Keys::load(&keys).map_err(anyhow::Error::msg)?;
    let targets = match &notify {
        Some(path) => gateway::Escalation::load_targets(path)?,
        None => Default::default(),
    };
    let metrics = tollgate_webhook::metrics::Metrics::default();
    let opened = tollgate_webhook::GatewayConfig::open(listen, &audit, chain, &metrics).await?;
    let policies = WatchedDir::start(policies, std::time::Duration::from_secs(1));
    let mut gateway = gateway::Gateway::new(policies, keys, opened.audit, Redactor::default())
        .with_metrics(metrics)
        .with_history(opened.history)
        .with_escalation(gateway::Escalation::standalone(targets));
    if let Some(shared) = opened.shared {
        gateway = gateway.with_shared(shared);
    }
    if let Some(secrets) = secrets {
        gateway = gateway.with_secrets(secrets);
    }
    let gateway = Arc::new(gateway);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, audit = %audit, "tollgate gateway (standalone) listening");
    axum::serve(listener, gateway::standalone_router(gateway))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
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
    if let Some(Mode::Standalone {
        policies,
        keys,
        audit,
        chain,
        listen,
        secrets,
        notify,
    }) = args.mode
    {
        return standalone(policies, keys, audit, chain, listen, secrets, notify).await;
    }
    tollgate_webhook::server::install_crypto_provider();
    let client = kube::Client::try_default().await?;
    let settings = Settings {
        gateway_username: format!(
            "system:serviceaccount:{}:{}",
            args.namespace, args.gateway_service_account
        ),
        gateway_url: args.gateway_url,
    };
    let handle = axum_server::Handle::new();
    let shutdown = handle.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        shutdown.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
    });
    let tls = TlsFiles {
        cert: args.tls_cert,
        key: args.tls_key,
    };
    let metrics = tollgate_webhook::metrics::Metrics::default();
    let gateway = match (args.gateway_listen, &args.audit) {
        (Some(listen), Some(audit)) => {
            let mut config =
                tollgate_webhook::GatewayConfig::open(listen, audit, args.chain.clone(), &metrics)
                    .await?;
            config.standing = (!args.standing_interval.is_zero()).then(|| {
                tollgate_webhook::gateway::standing::Schedule {
                    interval: args.standing_interval,
                    window: args.drift_window.clone(),
                }
            });
            Some(config)
        }
        _ => None,
    };
    // Admission records agents' writes and agent pods: in the gateway's trail when this process
    // serves the gateway too, else in a chain of its own.
    let admission_audit = match (&gateway, &args.audit) {
        (Some(config), _) => Some(config.audit.clone()),
        (None, Some(audit)) => {
            Some(tollgate_webhook::open_audit_log(audit, args.chain.clone(), &metrics).await?)
        }
        (None, None) => None,
    };
    tollgate_webhook::run_in_cluster(
        client,
        settings,
        &args.namespace,
        tls,
        args.listen,
        args.probe_listen,
        handle,
        metrics,
        gateway,
        admission_audit,
    )
    .await
}
