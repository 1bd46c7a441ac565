//! tollgate-webhook: the admission webhook the kube-apiserver calls (axum over rustls): it
//! validates Tollgate's own kinds with the engine, stamps approvers onto ApprovalRequests,
//! admits agent pods against their identity and injects their token and gateway address, and
//! decides agents' own Kubernetes writes. The gateway agents call is `tollgate-gateway`.
//!
//! Contract: only I/O and wiring; every decision comes from tollgate-engine and every record goes
//! through tollgate-audit.
#![forbid(unsafe_code)]

pub mod admission;

use std::net::SocketAddr;
use std::sync::Arc;

pub use admission::{AdmissionState, Settings};
use tollgate_runtime::{CERT_RELOAD_INTERVAL, cluster, metrics, server};

/// Runs admission in a cluster: watches, TLS with reload, probes. Agents' writes and agent pods
/// are recorded to `audit` when it is given. Counts into `metrics`, served on the probe port.
/// Returns when a server stops or `handle` shuts it down.
#[allow(clippy::too_many_arguments)]
pub async fn run_in_cluster(
    client: kube::Client,
    settings: Settings,
    tollgate_namespace: &str,
    tls: server::TlsFiles,
    listen: SocketAddr,
    probe_listen: SocketAddr,
    handle: axum_server::Handle<SocketAddr>,
    metrics: metrics::Metrics,
    audit: Option<tollgate_audit::AuditLog>,
) -> anyhow::Result<()> {
    let view = cluster::WatchedView::start(client.clone(), tollgate_namespace);
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
        audit,
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
