//! `tollgate-webhook`: the admission face of Tollgate.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use tollgate_webhook::{Settings, server::TlsFiles};

#[derive(Debug, Parser)]
#[command(
    name = "tollgate-webhook",
    version,
    about = "Tollgate's admission webhook"
)]
struct Args {
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
    tollgate_webhook::run_in_cluster(
        client,
        settings,
        &args.namespace,
        tls,
        args.listen,
        args.probe_listen,
        handle,
    )
    .await
}
