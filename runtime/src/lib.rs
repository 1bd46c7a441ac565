//! tollgate-runtime: what the admission webhook (`tollgate-webhook`) and the gateway
//! (`tollgate-gateway`) share at the edge, so neither depends on the other:
//!
//! - [`cluster`]: the read-only view of Tollgate's objects (identities, policies, the global kill
//!   switch), kept by watches in a cluster and fixed in tests;
//! - [`server`]: rustls serving with the certificate reloaded when its files change, and the plain
//!   probe port (/healthz, /readyz, /metrics);
//! - [`metrics`]: one registry with every `tollgate_*` metric either binary counts;
//! - [`open_audit_log`]: an audit writer over the store a command line names.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod metrics;
pub mod server;

use std::sync::Arc;
use std::time::Duration;

use tollgate_audit::{AuditLog, StoreLocation, WriterConfig};

/// How often the certificate files are checked for a change.
pub const CERT_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// A writer's configuration for chain `chain`, reporting each batch to `metrics`.
pub fn writer_config(chain: String, metrics: &metrics::Metrics) -> WriterConfig {
    WriterConfig::new(chain).with_observer(Arc::new(metrics.clone()))
}

/// A writer of chain `chain` in the audit store `audit` (a PostgreSQL URL, else a SQLite file,
/// optionally prefixed `sqlite:`), reporting each batch to `metrics`.
pub async fn open_audit_log(
    audit: &str,
    chain: String,
    metrics: &metrics::Metrics,
) -> anyhow::Result<AuditLog> {
    let config = writer_config(chain, metrics);
    Ok(match StoreLocation::parse(audit) {
        StoreLocation::Postgres(url) => {
            let store = Arc::new(tollgate_audit::PostgresStore::connect(&url).await?);
            AuditLog::open(store, config).await?.0
        }
        StoreLocation::Sqlite(path) => {
            let store = Arc::new(tollgate_audit::SqliteStore::open(path)?);
            AuditLog::open(store, config).await?.0
        }
    })
}
