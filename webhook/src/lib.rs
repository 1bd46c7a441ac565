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

/// The egress face: where it listens and where it records.
pub struct GatewayConfig {
    /// The TLS listener agents call (same certificate as the admission face).
    pub listen: SocketAddr,
    /// This replica's audit writer.
    pub audit: tollgate_audit::AuditLog,
    /// The audit store read back after a restart.
    pub history: Arc<dyn gateway::History>,
    /// The same store, for the authenticated read API.
    pub records: Arc<dyn gateway::read::Records>,
    /// With a PostgreSQL trail: budgets shared live with the other replicas.
    pub shared: Option<Arc<dyn gateway::Shared>>,
    /// How often AgentPolicy `status.tools` and `status.drift` are written from the trail; never
    /// when None.
    pub standing: Option<gateway::standing::Schedule>,
}

/// An audit store named on the command line: a PostgreSQL URL, else a SQLite file (optionally
/// prefixed `sqlite:`).
enum TrailStore {
    Postgres(Arc<tollgate_audit::PostgresStore>),
    Sqlite(Arc<tollgate_audit::SqliteStore>),
}

impl TrailStore {
    async fn open(audit: &str) -> anyhow::Result<Self> {
        if audit.starts_with("postgres://")
            || audit.starts_with("postgresql://")
            || audit.contains("host=")
        {
            Ok(Self::Postgres(Arc::new(
                tollgate_audit::PostgresStore::connect(audit).await?,
            )))
        } else {
            let path = audit.strip_prefix("sqlite:").unwrap_or(audit);
            Ok(Self::Sqlite(Arc::new(tollgate_audit::SqliteStore::open(
                path,
            )?)))
        }
    }
}

fn writer_config(chain: String, metrics: &metrics::Metrics) -> tollgate_audit::WriterConfig {
    tollgate_audit::WriterConfig::new(chain).with_observer(Arc::new(metrics.clone()))
}

/// A writer of chain `chain` in the audit store `audit` (as [`GatewayConfig::open`] names it),
/// reporting each batch to `metrics`: the admission face's trail when it runs without the gateway.
pub async fn open_audit_log(
    audit: &str,
    chain: String,
    metrics: &metrics::Metrics,
) -> anyhow::Result<tollgate_audit::AuditLog> {
    use tollgate_audit::AuditLog;
    let config = writer_config(chain, metrics);
    Ok(match TrailStore::open(audit).await? {
        TrailStore::Postgres(store) => AuditLog::open(store, config).await?.0,
        TrailStore::Sqlite(store) => AuditLog::open(store, config).await?.0,
    })
}

impl GatewayConfig {
    /// The gateway on `listen`, recording to `audit` (a PostgreSQL URL, else a SQLite file,
    /// optionally prefixed `sqlite:`) as chain `chain`, its writer reporting each batch to
    /// `metrics`. PostgreSQL also shares budgets with the other replicas.
    pub async fn open(
        listen: SocketAddr,
        audit: &str,
        chain: String,
        metrics: &metrics::Metrics,
    ) -> anyhow::Result<Self> {
        use tollgate_audit::AuditLog;
        let config = writer_config(chain, metrics);
        Ok(match TrailStore::open(audit).await? {
            TrailStore::Postgres(store) => Self {
                listen,
                audit: AuditLog::open(store.clone(), config).await?.0,
                history: store.clone(),
                records: store.clone(),
                shared: Some(store),
                standing: Some(Default::default()),
            },
            TrailStore::Sqlite(store) => Self {
                listen,
                audit: AuditLog::open(store.clone(), config).await?.0,
                history: store.clone(),
                records: store,
                shared: None,
                standing: Some(Default::default()),
            },
        })
    }
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// Runs the admission face in a cluster, and the gateway when `gateway` is set: watches, TLS
/// with reload, probes. Admission records agents' writes and agent pods to `admission_audit`. Admission and gateway count into `metrics`, served on the probe port
/// (give the same to the audit writer's `WriterConfig::with_observer`). Returns when any server
/// stops.
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
    gateway: Option<GatewayConfig>,
    admission_audit: Option<tollgate_audit::AuditLog>,
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
    let view = Arc::new(view);
    let gateway_server = gateway.map(|config| {
        let gateway = gateway::Gateway::new(
            gateway::Policies::Cluster(gateway::ClusterPolicies::new(view.clone(), client.clone())),
            gateway::TokenReviewer::new(client.clone()),
            config.audit,
            tollgate_audit::Redactor::default(),
        )
        .with_metrics(metrics.clone())
        .with_history(config.history)
        .with_escalation(gateway::Escalation::cluster(
            client.clone(),
            tollgate_namespace,
        ));
        let gateway = match config.shared {
            Some(shared) => gateway.with_shared(shared),
            None => gateway,
        };
        if let Some(schedule) = config.standing {
            let writer = gateway::standing::StatusWriter::new(
                view.clone(),
                config.records.clone(),
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
        let reader = gateway::read::Reader::new(config.records, client.clone());
        (
            config.listen,
            gateway::router(Arc::new(gateway)).merge(gateway::read::router(reader)),
        )
    });
    let state = Arc::new(AdmissionState {
        view,
        settings,
        metrics: metrics.clone(),
        now: jiff::Timestamp::now,
        audit: admission_audit,
    });
    let config = server::tls_config(&tls, CERT_RELOAD_INTERVAL).await?;
    let probes = tokio::net::TcpListener::bind(probe_listen).await?;
    let probe_server = axum::serve(probes, server::probes(readiness, metrics));
    let gateway_task = async {
        match gateway_server {
            Some((listen, router)) => {
                tracing::info!(%listen, "gateway listening");
                server::serve_tls(router, listen, config.clone(), handle.clone()).await
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = server::serve_tls(admission::router(state), listen, config.clone(), handle.clone()) => result?,
        result = gateway_task => result?,
        result = probe_server => result?,
    }
    Ok(())
}
