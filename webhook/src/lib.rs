//! tollgate-webhook: one axum + rustls server with two faces, admission (called by the
//! kube-apiserver) and egress (called by agents: decision API, MCP proxy).
//!
//! Contract: only I/O and wiring; every decision comes from tollgate-engine and every record goes
//! through tollgate-audit. The admission face is [`admission`]; the egress face is [`gateway`]
//! (today its decision API in standalone mode: API keys, a policy directory, an embedded audit
//! store).
#![forbid(unsafe_code)]

pub mod admission;
pub mod cluster;
pub mod gateway;
pub mod metrics;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use admission::{AdmissionState, Settings};

/// How often the certificate files are checked for a change.
pub const CERT_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Runs the admission face in a cluster: watches, TLS with reload, probes. Returns when either
/// server stops.
pub async fn run_in_cluster(
    client: kube::Client,
    settings: Settings,
    tollgate_namespace: &str,
    tls: server::TlsFiles,
    listen: SocketAddr,
    probe_listen: SocketAddr,
    handle: axum_server::Handle<SocketAddr>,
) -> anyhow::Result<()> {
    let view = cluster::WatchedView::start(client, tollgate_namespace);
    let metrics = metrics::Metrics::default();
    let readiness = server::Readiness::default();
    {
        let (view, readiness) = (view.clone(), readiness.clone());
        tokio::spawn(async move {
            view.ready().await;
            readiness.set_ready();
            tracing::info!("watches synced; ready");
        });
    }
    let state = Arc::new(AdmissionState {
        view: Arc::new(view),
        settings,
        metrics: metrics.clone(),
        now: jiff::Timestamp::now,
    });
    let config = server::tls_config(&tls, CERT_RELOAD_INTERVAL).await?;
    let probes = tokio::net::TcpListener::bind(probe_listen).await?;
    let probe_server = axum::serve(probes, server::probes(readiness, metrics));
    tokio::select! {
        result = server::serve_tls(admission::router(state), listen, config, handle) => result?,
        result = probe_server => result?,
    }
    Ok(())
}
