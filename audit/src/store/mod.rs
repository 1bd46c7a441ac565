//! Where records live: one trait, two stores.
//!
//! - [`SqliteStore`]: an embedded database file (WAL, `synchronous=FULL`), the default. One
//!   writer process.
//! - [`PostgresStore`]: several gateway replicas write concurrently, each to its own chain.
//!
//! Both keep the same two tables: `tollgate_audit_records` (one row per record: chain, seq,
//! prev, hash, body and index columns) and `tollgate_audit_anchors` (per chain, the last record
//! pruned by retention). [`Store::append`] commits a batch in one transaction and returns only
//! once the transaction is durable.

use std::future::Future;

use crate::record::Record;
use crate::verify::Sealed;

mod connect;
mod postgres;
mod sqlite;

pub use postgres::{AgentLock, PostgresStore};
pub use sqlite::SqliteStore;

/// Where an audit store is, as a command line or an environment variable names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// `postgres://…`, `postgresql://…` or a `host=… dbname=…` connection string.
    Postgres(String),
    /// A SQLite file: a plain path, or `sqlite:PATH` (`sqlite://PATH` too).
    Sqlite(std::path::PathBuf),
}

impl StoreLocation {
    /// Reads a location: PostgreSQL by its URL schemes or a `host=` key, else a SQLite path.
    pub fn parse(location: &str) -> Self {
        if location.starts_with("postgres://")
            || location.starts_with("postgresql://")
            || location.contains("host=")
        {
            return Self::Postgres(location.to_owned());
        }
        let path = location.strip_prefix("sqlite:").unwrap_or(location);
        let path = path.strip_prefix("//").unwrap_or(path);
        Self::Sqlite(path.into())
    }
}

#[cfg(test)]
mod location_tests {
    use super::StoreLocation;

    #[test]
    fn locations_name_their_store() {
        for (text, expected) in [
            (
                "postgres://u@h/db",
                StoreLocation::Postgres("postgres://u@h/db".into()),
            ),
            (
                "postgresql://h/db",
                StoreLocation::Postgres("postgresql://h/db".into()),
            ),
            (
                "host=/run dbname=x",
                StoreLocation::Postgres("host=/run dbname=x".into()),
            ),
            ("audit.db", StoreLocation::Sqlite("audit.db".into())),
            (
                "sqlite:/var/a.db",
                StoreLocation::Sqlite("/var/a.db".into()),
            ),
            (
                "sqlite:///var/a.db",
                StoreLocation::Sqlite("/var/a.db".into()),
            ),
        ] {
            assert_eq!(StoreLocation::parse(text), expected, "{text}");
        }
    }
}

/// The last record of a chain, or the anchor left by pruning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Sequence number.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
}

/// Which records a query selects. Every set field must match; results are in order: by time,
/// then by chain and sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Only this run.
    pub run: Option<String>,
    /// Only this agent (`namespace/name`).
    pub agent: Option<String>,
    /// Only this tool.
    pub tool: Option<String>,
    /// Only this event kind ([`crate::Event::as_str`]).
    pub event: Option<String>,
    /// At or after, microseconds since the epoch.
    pub since_us: Option<i64>,
    /// Before, microseconds since the epoch.
    pub until_us: Option<i64>,
    /// At most this many records (the earliest ones).
    pub limit: Option<u64>,
    /// Only records after this one in the query's order: the next page.
    pub after: Option<Cursor>,
}

/// A place in a query's order (time, then chain and sequence): where the next page starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The record's time, microseconds since the epoch.
    pub time_us: i64,
    /// Its chain.
    pub chain: String,
    /// Its sequence number.
    pub seq: u64,
}

impl Cursor {
    /// Just after `record`.
    pub fn after(record: &Record) -> Self {
        Self {
            time_us: record.index.time_us,
            chain: record.chain.clone(),
            seq: record.seq,
        }
    }
}

/// How many records a query selects, per agent (`None`: records with no agent), without
/// reading them: what a reader must be allowed to see before any is read.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Census {
    /// `namespace/name` of the agent, if the records have one.
    pub agent: Option<String>,
    /// How many.
    pub records: u64,
}

/// How often an agent called a tool in a window: the "used" half of the permission-drift audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolUse {
    /// `namespace/name` of the agent.
    pub agent: String,
    /// The tool.
    pub tool: String,
    /// Decide records for it (whatever the decision).
    pub calls: u64,
    /// Of those, allowed.
    pub allowed: u64,
    /// The last call, microseconds since the epoch.
    pub last_us: i64,
}

/// Records of one agent and tool in a window with the same event and outcome, counted: what
/// graduation and drift read ([`crate::standing`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ToolTally {
    /// `namespace/name` of the agent.
    pub agent: String,
    /// The tool.
    pub tool: String,
    /// [`crate::Event::as_str`].
    pub event: String,
    /// [`crate::Entry::outcome`], if the records have one.
    pub outcome: Option<String>,
    /// How many records.
    pub count: u64,
    /// The last of them, microseconds since the epoch.
    pub last_us: i64,
}

/// One tool's decisions for one agent in a window: the input of graduation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutcome {
    /// The tool.
    pub tool: String,
    /// The outcome column: `allow`, `deny:<Code>`, `requireApproval`, `halt`, or an approval's
    /// phase (`approved`, `denied`, `expired`).
    pub outcome: String,
    /// How many records.
    pub count: u64,
}

/// A store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused.
    #[error("sqlite audit store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL refused (the message includes the cause: a TLS failure says which check).
    #[error("postgres audit store: {}", with_causes(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// The PostgreSQL connection string or its TLS files are unusable.
    #[error("postgres audit store: {0}")]
    Connection(String),
    /// Another writer extended this chain: two processes use the same writer name.
    #[error(
        "chain {chain:?} already has a record {seq}: another writer uses the same chain name; give every writer its own"
    )]
    Conflict {
        /// The chain.
        chain: String,
        /// The sequence number that was taken.
        seq: u64,
    },
    /// Another live writer holds the chain.
    #[error("chain {0:?} is held by another live writer; give every replica its own writer name")]
    Held(String),
    /// A stored value is out of range (a negative sequence, a bad timestamp).
    #[error("audit store holds an invalid value: {0}")]
    Corrupt(String),
    /// The batch was not written because the batch before it, still committing when this one
    /// was sent, failed (see [`Store::PIPELINE`]).
    #[error(
        "audit batch not written: the batch before it on this chain failed to commit, and a batch never commits after one that failed"
    )]
    Aborted,
    /// The blocking task running the query was lost.
    #[error("audit store task failed: {0}")]
    Task(String),
    /// The database did not answer in time: the connection is dropped and the next use dials
    /// again.
    #[error("audit store did not answer {what} within {}s", after.as_secs())]
    Timeout {
        /// What was asked for.
        what: &'static str,
        /// How long this side waited.
        after: std::time::Duration,
    },
}

/// A place to keep records. Implemented by [`SqliteStore`] and [`PostgresStore`]; the test suite
/// in `tests/store.rs` runs unchanged against both.
pub trait Store: Send + Sync + 'static {
    /// How many batches a chain's writer may have in flight at once. With more than one, the
    /// store keeps them in order: batches commit in the order their [`Store::append`] futures
    /// were first polled, each only after the one before it committed; a batch whose
    /// predecessor failed is rolled back and fails with [`StoreError::Aborted`]. So a durable
    /// record is never durable without every record before it in its chain.
    const PIPELINE: usize = 1;

    /// Whether a commit blocks a thread until it is durable ([`Store::append_blocking`]), as
    /// SQLite's does. The writer of such a store runs on a thread of its own and commits there:
    /// callers hand their records to that thread and it answers them, with no task between
    /// (each hand-off between threads is a wake-up in every append's latency).
    const BLOCKING: bool = false;

    /// [`Store::append`] on the calling thread, which waits until the batch is durable. Only
    /// called on a store that says [`Store::BLOCKING`]; the default refuses.
    fn append_blocking(&self, batch: Vec<Record>) -> Result<(), StoreError> {
        drop(batch);
        Err(StoreError::Task(
            "this store commits asynchronously only".to_owned(),
        ))
    }

    /// Takes `chain` for this process's writer: refuses when another live writer holds it.
    fn claim(&self, chain: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The last record of `chain`, else its anchor, else None for a new chain.
    fn head(&self, chain: &str) -> impl Future<Output = Result<Option<Head>, StoreError>> + Send;

    /// Commits `batch` (consecutive records of one chain) in one transaction. Returns once it is
    /// durable. A sequence number that is already taken fails the whole batch with
    /// [`StoreError::Conflict`]. With [`Store::PIPELINE`] above one, the order of batches is
    /// taken when the returned future is first polled.
    fn append(&self, batch: Vec<Record>) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every chain with records or an anchor, sorted.
    fn chains(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// The anchor of `chain`: the last record pruned, if any.
    fn anchor(&self, chain: &str) -> impl Future<Output = Result<Option<Head>, StoreError>> + Send;

    /// Up to `limit` records of `chain` with seq greater than `after`, in sequence order.
    fn scan(
        &self,
        chain: &str,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Record>, StoreError>> + Send;

    /// Like [`Store::scan`], as verification without `--deep` reads records: each record's seal
    /// is computed from what is stored. A store may compute it while it reads, without keeping
    /// the bodies; this default scans at most [`crate::verify::PAGE`] records at a time (so no
    /// more bodies than that are held) and seals each scan on every core.
    fn sealed(
        &self,
        chain: &str,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Sealed>, StoreError>> + Send {
        async move {
            let mut sealed: Vec<Sealed> = Vec::new();
            let mut from = after;
            while sealed.len() < limit {
                let want = (limit - sealed.len()).min(crate::verify::PAGE);
                let records = self.scan(chain, from, want).await?;
                let Some(last) = records.last().map(|r| r.seq) else {
                    break;
                };
                let chain = chain.to_owned();
                let more = records.len() == want;
                sealed.extend(
                    tokio::task::spawn_blocking(move || crate::verify::seal_all(&chain, &records))
                        .await
                        .map_err(|e| StoreError::Task(e.to_string()))?,
                );
                if !more {
                    break;
                }
                from = last;
            }
            Ok(sealed)
        }
    }

    /// The records `query` selects.
    fn query(&self, query: &Query) -> impl Future<Output = Result<Vec<Record>, StoreError>> + Send;

    /// How many records `query` selects per agent (its `limit` and `after` ignored), in agent
    /// order, reading only the index columns.
    fn census(&self, query: &Query)
    -> impl Future<Output = Result<Vec<Census>, StoreError>> + Send;

    /// Per agent and tool, the decide records in `[since_us, until_us)`.
    fn tool_use(
        &self,
        since_us: i64,
        until_us: i64,
    ) -> impl Future<Output = Result<Vec<ToolUse>, StoreError>> + Send;

    /// Per agent, tool, event and outcome, the records with an agent and a tool in
    /// `[since_us, until_us)`, sorted.
    fn tallies(
        &self,
        since_us: i64,
        until_us: i64,
    ) -> impl Future<Output = Result<Vec<ToolTally>, StoreError>> + Send;

    /// Per tool and outcome, the records of `agent` since `since_us`.
    fn outcomes(
        &self,
        agent: &str,
        since_us: i64,
    ) -> impl Future<Output = Result<Vec<ToolOutcome>, StoreError>> + Send;

    /// The last record of `chain` whose time is before `before_us`.
    fn last_before(
        &self,
        chain: &str,
        before_us: i64,
    ) -> impl Future<Output = Result<Option<Head>, StoreError>> + Send;

    /// Deletes the records of `chain` up to and including `through.seq` and makes `through` the
    /// chain's anchor, in one transaction. Returns how many records were deleted.
    fn prune(
        &self,
        chain: &str,
        through: &Head,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// The DDL both stores run (PostgreSQL and SQLite accept the same text). In SQLite the records
/// table keeps its rowid: a `WITHOUT ROWID` table keeps at most about a quarter of a page of
/// each row in the page itself, so a typical 1.3 KB record would spill into an overflow page of
/// its own (4.7 KB per record on disk at 4 KiB pages, against 1.5 KB with the rowid).
pub(crate) fn schema() -> impl Iterator<Item = &'static str> {
    std::iter::once(RECORDS_TABLE).chain(SCHEMA_REST.iter().copied())
}

const RECORDS_TABLE: &str = "CREATE TABLE IF NOT EXISTS tollgate_audit_records (
        chain TEXT NOT NULL,
        seq BIGINT NOT NULL,
        prev TEXT NOT NULL,
        hash TEXT NOT NULL,
        time_us BIGINT NOT NULL,
        event TEXT NOT NULL,
        agent TEXT,
        run TEXT,
        tool TEXT,
        outcome TEXT,
        body TEXT NOT NULL,
        PRIMARY KEY (chain, seq)
    )";

/// The indexes on runs and agents PostgreSQL keeps. SQLite keeps its own, written in batches
/// (see the `sqlite` module).
pub(crate) const RUN_AND_AGENT_INDEXES: [&str; 2] = [
    "CREATE INDEX IF NOT EXISTS tollgate_audit_run ON tollgate_audit_records (run) WHERE run IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS tollgate_audit_agent ON tollgate_audit_records (agent, time_us)",
];

const SCHEMA_REST: &[&str] = &[
    "CREATE INDEX IF NOT EXISTS tollgate_audit_time ON tollgate_audit_records (time_us)",
    "CREATE TABLE IF NOT EXISTS tollgate_audit_anchors (
        chain TEXT PRIMARY KEY,
        seq BIGINT NOT NULL,
        hash TEXT NOT NULL
    )",
];

/// An error and its causes, joined with ": ".
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

pub(crate) fn to_i64(seq: u64) -> Result<i64, StoreError> {
    i64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("sequence {seq} is out of range")))
}

pub(crate) fn to_u64(seq: i64) -> Result<u64, StoreError> {
    u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("negative sequence {seq}")))
}

/// How many ranges [`ranges`] makes of a page of `limit` records.
pub(crate) fn parts(limit: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if limit >= 2048 { cores.clamp(1, 8) } else { 1 }
}

/// A page of `limit` records after `after` as closed ranges of sequence numbers, one per core
/// (at most eight; one for a short page), for stores that read them on several connections.
pub(crate) fn ranges(after: i64, limit: usize) -> Vec<(i64, i64)> {
    let parts = parts(limit);
    let span = i64::try_from(limit.div_ceil(parts)).unwrap_or(i64::MAX);
    let end = after.saturating_add(i64::try_from(limit).unwrap_or(i64::MAX));
    (0..parts as i64)
        .map(|i| {
            let from = after.saturating_add(span.saturating_mul(i));
            (from, from.saturating_add(span).min(end))
        })
        .collect()
}

/// The records of consecutive ranges up to and including the first that came back short:
/// a later range may have been read from a later snapshot, so what it holds cannot be trusted to
/// follow on. Returns them and the last sequence number they reach (`after` if none).
pub(crate) fn dense_prefix(
    pieces: Vec<Vec<Sealed>>,
    ranges: &[(i64, i64)],
    after: i64,
    limit: usize,
) -> Result<(Vec<Sealed>, i64), StoreError> {
    let mut page: Vec<Sealed> = Vec::new();
    let mut last = after;
    for (piece, &(from, to)) in pieces.into_iter().zip(ranges) {
        let full = i64::try_from(piece.len()).is_ok_and(|n| n == to - from);
        if page.is_empty() {
            // The first range's records, without copying them.
            page = piece;
            page.reserve(limit.saturating_sub(page.len()));
        } else {
            page.extend(piece);
        }
        if let Some(r) = page.last() {
            last = to_i64(r.seq)?;
        }
        if !full {
            break;
        }
    }
    Ok((page, last))
}

#[cfg(test)]
mod tests {
    use super::{parts, ranges};

    #[test]
    fn a_page_of_ranges_covers_exactly_the_records_asked_for() {
        for (after, limit) in [(0, 1), (100, 2047), (100, 8197), (7, 32768), (5, 32771)] {
            let ranges = ranges(after, limit);
            assert_eq!(ranges.len(), parts(limit));
            assert_eq!(ranges[0].0, after, "{after} {limit}: {ranges:?}");
            // An odd limit used to end the last range one record beyond it.
            assert_eq!(
                ranges.last().unwrap().1,
                after + limit as i64,
                "{after} {limit}: {ranges:?}"
            );
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].1, pair[1].0, "{after} {limit}: {ranges:?}");
            }
            assert!(ranges.iter().all(|(from, to)| from < to), "{ranges:?}");
        }
    }
}
