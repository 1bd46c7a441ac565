//! Wiring the gateway: in a cluster (watched policies, TokenReview, TLS, the probe port, the
//! standing writer, the audit read API) and standalone (a policy directory, API keys, plain HTTP
//! on loopback).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tollgate_audit::{AuditLog, Redactor, StoreLocation};
use tollgate_runtime::metrics::Metrics;
use tollgate_runtime::{CERT_RELOAD_INTERVAL, cluster, server, writer_config};

use crate::{Gateway, History, Policies, Shared, keys::Keys, policies::WatchedDir, read, standing};

/// Where the gateway records, and what it reads back.
pub struct Trail {
    /// This replica's audit writer.
    pub audit: AuditLog,
    /// The audit store read back after a restart.
    pub history: Arc<dyn History>,
    /// The same store, for the authenticated read API and the standing writer.
    pub records: Arc<dyn read::Records>,
    /// With a PostgreSQL trail: budgets shared live with the other replicas.
    pub shared: Option<Arc<dyn Shared>>,
}

impl std::fmt::Debug for Trail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trail")
            .field("chain", &self.audit.chain())
            .finish_non_exhaustive()
    }
}

impl Trail {
    /// The trail in `audit` (a PostgreSQL URL, else a SQLite file, optionally prefixed
    /// `sqlite:`) as chain `chain`, its writer reporting each batch to `metrics`. PostgreSQL also
    /// shares budgets with the other replicas.
    pub async fn open(audit: &str, chain: String, metrics: &Metrics) -> anyhow::Result<Self> {
        let config = writer_config(chain, metrics);
        Ok(match StoreLocation::parse(audit) {
            StoreLocation::Postgres(url) => {
                let store = Arc::new(tollgate_audit::PostgresStore::connect(&url).await?);
                Self {
                    audit: AuditLog::open(store.clone(), config).await?.0,
                    history: store.clone(),
                    // Exports and standings read on connections of their own: a long read
                    // never holds up a decision's.
                    records: Arc::new(store.apart()),
                    shared: Some(store),
                }
            }
            StoreLocation::Sqlite(path) => {
                let store = Arc::new(tollgate_audit::SqliteStore::open(path)?);
                Self {
                    audit: AuditLog::open(store.clone(), config).await?.0,
                    history: store.clone(),
                    records: store,
                    shared: None,
                }
            }
        })
    }
}

/// The gateway in a cluster: where it listens and how often it writes standings.
#[derive(Debug)]
pub struct InCluster {
    /// Tollgate's own namespace (the global kill switch, the notification Secret).
    pub namespace: String,
    /// The TLS listener agents call.
    pub listen: SocketAddr,
    /// The plain listener for /healthz, /readyz and /metrics.
    pub probe_listen: SocketAddr,
    /// The serving certificate.
    pub tls: server::TlsFiles,
    /// How often AgentPolicy `status.tools` and `status.drift` are written from the trail; never
    /// when None.
    pub standing: Option<standing::Schedule>,
    /// Model prices for the LLM proxy.
    pub prices: tollgate_engine::llm::Prices,
    /// The MCP proxy's upstream timeout and answer limit.
    pub mcp: crate::McpLimits,
    /// Export spans (the process's subscriber holds a [`crate::trace::OtlpLayer`]).
    pub traced: bool,
}

/// Runs the gateway in a cluster until a server stops or `handle` shuts it down (draining
/// in-flight calls): watches, TLS with reload, the read API, probes and metrics.
pub async fn in_cluster(
    client: kube::Client,
    config: InCluster,
    trail: Trail,
    metrics: Metrics,
    handle: axum_server::Handle<SocketAddr>,
) -> anyhow::Result<()> {
    let view = cluster::WatchedView::start(client.clone(), &config.namespace);
    let readiness = server::Readiness::default();
    {
        let (view, readiness) = (view.clone(), readiness.clone());
        tokio::spawn(async move {
            view.ready().await;
            readiness.set_ready();
            tracing::info!("watches synced; ready");
        });
    }
    let view = Arc::new(view);
    let mut gateway = Gateway::new(
        Policies::Cluster(crate::ClusterPolicies::new(view.clone(), client.clone())),
        crate::TokenReviewer::new(client.clone()),
        trail.audit,
        Redactor::default(),
    )
    .with_metrics(metrics.clone())
    .with_prices(config.prices.clone())
    .with_mcp_limits(config.mcp)
    .with_history(trail.history)
    .with_escalation(crate::Escalation::cluster(
        client.clone(),
        &config.namespace,
    ));
    if let Some(shared) = trail.shared {
        gateway = gateway.with_shared(shared);
    }
    if config.traced {
        gateway = gateway.with_tracing();
    }
    if let Some(schedule) = config.standing {
        let writer = standing::StatusWriter::new(
            view.clone(),
            trail.records.clone(),
            client.clone(),
            schedule,
        )
        .with_metrics(metrics.clone());
        let synced = view.clone();
        tokio::spawn(async move {
            synced.ready().await;
            writer.run().await;
        });
    }
    let reader = read::Reader::new(trail.records, client.clone());
    let router = crate::router(Arc::new(gateway)).merge(read::router(reader));
    let tls = server::tls_config(&config.tls, CERT_RELOAD_INTERVAL).await?;
    let probes = tokio::net::TcpListener::bind(config.probe_listen).await?;
    let probe_server = axum::serve(probes, server::probes(readiness, metrics));
    tracing::info!(listen = %config.listen, "gateway listening");
    tokio::select! {
        result = server::serve_tls(router, config.listen, tls, handle) => result?,
        result = probe_server => result?,
    }
    Ok(())
}

/// The gateway with no cluster.
#[derive(Debug)]
pub struct Standalone {
    /// Directory of AgentIdentity and AgentPolicy YAML.
    pub policies: PathBuf,
    /// API key file.
    pub keys: PathBuf,
    /// Address to listen on (loopback only: plain HTTP).
    pub listen: SocketAddr,
    /// Per-upstream credentials, laid out as mounted Secrets.
    pub secrets: Option<PathBuf>,
    /// Notification targets for budget breaches.
    pub notify: Option<PathBuf>,
    /// Model prices for the LLM proxy.
    pub prices: tollgate_engine::llm::Prices,
    /// The MCP proxy's upstream timeout and answer limit.
    pub mcp: crate::McpLimits,
    /// Export spans (the process's subscriber holds a [`crate::trace::OtlpLayer`]).
    pub traced: bool,
}

/// Runs the gateway standalone until `shutdown` completes: policies from a directory (in force
/// for the next call after an edit), API keys, the audit store `trail`, plain HTTP on loopback.
pub async fn standalone(
    config: Standalone,
    trail: Trail,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listen = config.listen;
    if !listen.ip().is_loopback() {
        anyhow::bail!(
            "--listen {listen}: standalone mode serves plain HTTP, so it listens on loopback only"
        );
    }
    if !config.policies.is_dir() {
        anyhow::bail!("--policies {}: not a directory", config.policies.display());
    }
    let keys = Keys::load(&config.keys).map_err(anyhow::Error::msg)?;
    let targets = match &config.notify {
        Some(path) => crate::Escalation::load_targets(path)?,
        None => Default::default(),
    };
    let policies = WatchedDir::start(config.policies, std::time::Duration::from_secs(1));
    let mut gateway = Gateway::new(policies, keys, trail.audit, Redactor::default())
        .with_metrics(metrics)
        .with_prices(config.prices)
        .with_mcp_limits(config.mcp)
        .with_history(trail.history)
        .with_escalation(crate::Escalation::standalone(targets))
        .with_approval_url(format!("http://{listen}"));
    if let Some(shared) = trail.shared {
        gateway = gateway.with_shared(shared);
    }
    if let Some(secrets) = config.secrets {
        gateway = gateway.with_secrets(secrets);
    }
    if config.traced {
        gateway = gateway.with_tracing();
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "tollgate gateway (standalone) listening");
    // TCP_NODELAY, as in a cluster: streamed events leave as they are written.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let gateway = Arc::new(gateway);
    let served = axum::serve(listener, crate::standalone_router(gateway.clone()))
        .with_graceful_shutdown(shutdown)
        .await;
    gateway.end_stdio_sessions();
    served?;
    Ok(())
}
