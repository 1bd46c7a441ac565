//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`, so a committed
//! transaction survives a crash of the process and of the machine.
//!
//! Checkpoints (copying the WAL back into the database file) run on a thread of their own, not
//! in the commit that happens to cross SQLite's automatic threshold: at group-commit batch sizes
//! that threshold is crossed every few commits, and each such commit waited for the copy and an
//! fsync of the database file. The writer counts the WAL's frames after each commit (SQLite's
//! WAL hook) and wakes the thread once [`CHECKPOINT_BYTES`] have piled up since its last pass,
//! as SQLite's own automatic checkpoint would. A WAL can only start over when a checkpoint has copied all of it;
//! under sustained load the thread may never catch the writer between two commits, so once the
//! WAL holds [`WAL_LIMIT_BYTES`] every commit wakes the thread, and once its passes have left
//! little to copy the writer copies that rest itself after a commit, and the next transaction
//! starts the WAL over (`restart_due`).
//!
//! Runs and agents are indexed in batches, in levels ([`levels`]): an index on either put a
//! page in every commit for nearly every record once many runs or agents were in flight.

mod levels;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params_from_iter};

use super::{
    Census, Head, Query, Store, StoreError, ToolOutcome, ToolTally, ToolUse, dense_prefix, to_i64,
    to_u64,
};
use crate::record::{Index, Record};
use crate::sql::{Filter, Param};
use crate::verify::Sealed;
use levels::{AGENTS, Indexed, RUNS};

/// An audit store in one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    /// Further read connections, opened when verification reads on several cores.
    spare: Mutex<Vec<Connection>>,
    claims: Mutex<std::collections::BTreeMap<String, File>>,
    /// Wakes the checkpoint thread; dropping it ends the thread.
    checkpoints: Mutex<mpsc::Sender<()>>,
    /// Bytes of pages in the WAL after the last commit, from SQLite's WAL hook.
    wal_bytes: Arc<AtomicI64>,
    /// How far into the WAL the checkpoint thread's last pass reached, in bytes.
    covered: Arc<AtomicI64>,
    /// The levels of the run and agent indexes ([`levels`]); changed only with `writer` held,
    /// after the transaction that moved entries has committed.
    indexed: Mutex<Indexed>,
    /// Held by the checkpoint thread during a pass. SQLite runs one checkpoint at a time and
    /// answers any other at once as busy, whatever its mode or busy handler, so the writer
    /// takes this to wait for a pass rather than find its own checkpoint skipped.
    passes: Arc<Mutex<()>>,
}

/// WAL size after which the checkpoint thread is woken: SQLite's default threshold (1,000
/// pages) at its default page size.
pub const CHECKPOINT_BYTES: i64 = 1000 * 4096;

/// WAL size after which the writer starts the WAL over once the checkpoint thread has nearly
/// caught up (see [`restart_due`]).
pub const WAL_LIMIT_BYTES: i64 = 32 << 20;

/// What may be left for the writer to copy when it starts the WAL over (see [`restart_due`]).
pub const RESTART_SLACK_BYTES: i64 = 256 << 10;

/// The records a query for the run in `$1` reads (before its other conditions): those in every
/// level of the run index. Joined in this order (`CROSS JOIN` fixes it): given an agent too,
/// SQLite would otherwise walk all of the agent's records.
fn from_run() -> String {
    from_rows(&RUNS.rows("run = $1"))
}

/// The first part of a query for `query`'s records (its conditions follow), selecting
/// `columns`: through the run index or the agent index when the query names one.
fn selecting(query: &Query, filter: &Filter, columns: &str) -> String {
    let rows = match query.run {
        Some(_) => Some(RUNS.rows("run = $1")),
        None => agent_rows(filter),
    };
    match rows {
        Some(rows) => from_rows_selecting(&rows, columns),
        None => format!("SELECT {columns} FROM tollgate_audit_records"),
    }
}

/// The records a query for an agent reads (before its other conditions): those in every level
/// of the agent index whose key matches the query's agent and time bounds.
fn from_agent(filter: &Filter) -> Option<String> {
    Some(from_rows(&agent_rows(filter)?))
}

/// The rowids of the agent index levels whose key matches the query's agent and time bounds.
fn agent_rows(filter: &Filter) -> Option<String> {
    let agent = filter.agent?;
    let mut condition = format!("agent = ${agent}");
    if let Some(since) = filter.since {
        condition.push_str(&format!(" AND time_us >= ${since}"));
    }
    if let Some(until) = filter.until {
        condition.push_str(&format!(" AND time_us < ${until}"));
    }
    Some(AGENTS.rows(&condition))
}

/// [`crate::sql::OUTCOMES`], reading the agent index.
static OUTCOMES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH selected(rec) AS ({}) \
         SELECT tool, outcome, COUNT(*) FROM selected CROSS JOIN tollgate_audit_records \
         ON tollgate_audit_records.rowid = selected.rec \
         WHERE tool IS NOT NULL AND outcome IS NOT NULL \
         GROUP BY tool, outcome ORDER BY tool, outcome",
        AGENTS.rows("agent = $1 AND time_us >= $2")
    )
});

/// The records whose rowids `rows` selects, each row of them joined to its record.
fn from_rows(rows: &str) -> String {
    from_rows_selecting(rows, COLUMNS)
}

/// [`from_rows`], selecting `columns`.
fn from_rows_selecting(rows: &str, columns: &str) -> String {
    format!(
        "WITH selected(rec) AS ({rows}) \
         SELECT {columns} FROM selected CROSS JOIN tollgate_audit_records \
         ON tollgate_audit_records.rowid = selected.rec"
    )
}

/// How much of the database file a verification connection maps into memory (SQLite's
/// `mmap_size`; `.cargo/config.toml` raises SQLite's own cap of 2 GiB). Verification reads every
/// page once, and mapped pages skip the copy from the OS page cache that `read()` makes:
/// about 8% more records per second (bench/README.md). Only connections that verify map the
/// file; an I/O error on a mapped page stops the process (SIGBUS), so the gateway's own
/// connections do not.
const VERIFY_MMAP_BYTES: i64 = 1 << 40;

/// How often the checkpoint thread runs when no commit wakes it.
const CHECKPOINT_IDLE: Duration = Duration::from_secs(1);

/// Copies committed WAL frames into the database file after each wake-up, without blocking the
/// writer (PASSIVE), until the store is dropped.
fn checkpointer(
    path: PathBuf,
    wake: mpsc::Receiver<()>,
    covered: Arc<AtomicI64>,
    passes: Arc<Mutex<()>>,
) {
    // A checkpoint copies frames without the page cache; a small cache keeps the invalidation
    // that follows every commit by the writer cheap.
    let conn = match open(&path).and_then(|c| {
        c.pragma_update(None, "cache_size", -256)?;
        Ok(c)
    }) {
        Ok(conn) => conn,
        Err(e) => {
            tracing::error!(error = %e, path = %path.display(), "audit store checkpoint thread cannot open the database; commits will checkpoint at the WAL limit");
            return;
        }
    };
    let page_size: i64 = conn
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .unwrap_or(4096);
    loop {
        match wake.recv_timeout(CHECKPOINT_IDLE) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        while wake.try_recv().is_ok() {}
        let _pass = passes.lock().unwrap_or_else(|e| e.into_inner());
        // Returns (busy, frames in the WAL, frames copied so far); frames a reader still needs
        // are not copied.
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(2)) {
            Ok(frames) => covered.store(frames.max(0) * page_size, Ordering::Relaxed),
            Err(e) => tracing::warn!(error = %e, "audit store checkpoint failed; retrying"),
        }
    }
}

/// Whether the checkpoint thread is to be woken, given the WAL's size and how far its last pass
/// reached: once [`CHECKPOINT_BYTES`] were written since, as SQLite's automatic checkpoint would.
/// Counting from the start of the WAL instead woke it after every commit under sustained load:
/// the WAL only starts over once a checkpoint has copied all of it, which a busy writer rarely
/// allows, so it stayed above the threshold and the thread copied and synced the database file
/// after each commit (a fifth of the gateway's CPU in a profile).
fn checkpoint_due(wal: i64, covered: i64) -> bool {
    // A WAL smaller than the last pass reached has started over.
    let since = if wal < covered { wal } else { wal - covered };
    since >= CHECKPOINT_BYTES
}

/// When the writer copies the rest of the WAL itself after a commit, so that the next
/// transaction starts the WAL over, given its size, how far the checkpoint thread has copied and
/// how much the commit just added.
///
/// Only past [`WAL_LIMIT_BYTES`], and only once the thread has nearly caught up: what is left
/// is copied and synced while the appenders wait. When the writer did it as soon as the WAL
/// crossed the limit, up to a whole pass of the thread was left: 3 to 5 ms of copying and
/// syncing on this machine's disk, a few times a second under sustained load (bench/README.md).
/// Past the limit every commit wakes the thread, whose passes then follow each other and
/// shrink, each copying what the writer added during the one before; the writer copies the rest
/// once it is at most [`RESTART_SLACK_BYTES`] or two of its own commits and no pass is running.
/// At twice the limit it waits for a running pass and copies whatever is left, so the WAL stays
/// bounded even if the thread cannot keep up.
fn restart_due(wal: i64, covered: i64, commit: i64) -> Option<Restart> {
    if wal >= 2 * WAL_LIMIT_BYTES {
        return Some(Restart::Wait);
    }
    // A WAL smaller than the last pass reached has started over since.
    let rest = if wal < covered { wal } else { wal - covered };
    (wal >= WAL_LIMIT_BYTES && rest <= RESTART_SLACK_BYTES.max(2 * commit))
        .then_some(Restart::IfIdle)
}

/// How the writer starts the WAL over (see [`restart_due`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    /// Unless the checkpoint thread is running a pass.
    IfIdle,
    /// After the pass the checkpoint thread may be running.
    Wait,
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // Plans never depend on the values bound to them (the query planner stability guarantee).
    // Without it, SQLite marks a statement such as the query for a run as one to plan again
    // whenever its bindings are cleared, which the statement cache does each time it takes a
    // statement back: every lookup of a new run parsed and planned its query anew, about a tenth
    // of the gateway's CPU when runs are short (bench/README.md).
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // 8 MiB of page cache per connection. More is slower here: a commit truncates the cache,
    // and SQLite's truncation walks every hash bucket when the cache is large (64 MiB cost
    // about 10% of append throughput in the bench); index pages that fall out come back from
    // the OS page cache.
    conn.pragma_update(None, "cache_size", -8192)?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_owned();
        let mut writer = open(&path)?;
        for statement in super::schema() {
            writer.execute(statement, [])?;
        }
        // A file of an earlier layout, or whose last records were never batched, is brought up
        // to date here rather than in the first commit a caller waits for.
        let indexed = {
            // IMMEDIATE: the write lock first, waiting for it under the busy timeout. A deferred
            // transaction reads the levels' state first and, should a writer of the same file
            // (a running gateway, when the CLI or a test opens it) commit meanwhile, fails at
            // once with "database is locked" instead of waiting.
            let tx = writer.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let indexed = levels::open(&tx)?;
            tx.commit()?;
            indexed
        };
        // Checkpoints are the checkpoint thread's job (see the module documentation): the WAL
        // hook only counts frames (and replaces SQLite's automatic checkpoint).
        writer.pragma_update(None, "wal_autocheckpoint", 0)?;
        let page_size: i64 = writer.pragma_query_value(None, "page_size", |r| r.get(0))?;
        let wal_bytes = Arc::new(AtomicI64::new(0));
        {
            let bytes = wal_bytes.clone();
            writer.wal_hook(Some(
                move |_: &mut rusqlite::hooks::Wal, pages: std::ffi::c_int| {
                    bytes.store(i64::from(pages) * page_size, Ordering::Relaxed);
                    Ok(())
                },
            ))?;
        }
        let reader = open(&path)?;
        let (wake, woken) = mpsc::channel();
        let covered = Arc::new(AtomicI64::new(0));
        let passes = Arc::new(Mutex::new(()));
        {
            let path = path.clone();
            let covered = covered.clone();
            let passes = passes.clone();
            std::thread::Builder::new()
                .name("audit-checkpoint".into())
                .spawn(move || checkpointer(path, woken, covered, passes))
                .map_err(|e| StoreError::Task(format!("start the checkpoint thread: {e}")))?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                writer: Mutex::new(writer),
                reader: Mutex::new(reader),
                spare: Mutex::new(Vec::new()),
                claims: Mutex::new(Default::default()),
                checkpoints: Mutex::new(wake),
                wal_bytes,
                covered,
                indexed: Mutex::new(indexed),
                passes,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on a blocking thread: SQLite calls wait for the disk.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.blocking(move |inner| f(&inner.reader.lock().unwrap_or_else(|e| e.into_inner())))
            .await
    }
}

impl Inner {
    /// Commits `batch` in one transaction on the writer connection (the calling thread waits
    /// for the fsync), and wakes the checkpoint thread when enough WAL has piled up.
    fn commit(&self, batch: Vec<Record>) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut conn = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let wal_before = self.wal_bytes.load(Ordering::Relaxed);
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO tollgate_audit_records (chain, seq, prev, hash, time_us, event, agent, run, tool, outcome, body)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )?;
            let mut tail = tx.prepare_cached(levels::TAIL_INSERT)?;
            for r in &batch {
                let seq = to_i64(r.seq)?;
                let result = insert.execute(rusqlite::params![
                    r.chain,
                    seq,
                    r.prev,
                    r.hash,
                    r.index.time_us,
                    r.index.event,
                    r.index.agent,
                    r.index.run,
                    r.index.tool,
                    r.index.outcome,
                    r.body,
                ]);
                match result {
                    Ok(_) => {
                        if r.index.run.is_some() || r.index.agent.is_some() {
                            tail.execute(rusqlite::params![
                                tx.last_insert_rowid(),
                                r.index.run,
                                r.index.agent,
                                r.index.time_us
                            ])?;
                        }
                    }
                    Err(rusqlite::Error::SqliteFailure(e, _))
                        if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        return Err(StoreError::Conflict {
                            chain: r.chain.clone(),
                            seq: r.seq,
                        });
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let mut indexed = self.indexed.lock().unwrap_or_else(|e| e.into_inner());
        let last = tx.last_insert_rowid();
        let next = levels::index(&tx, last, batch.len(), &indexed)?;
        tx.commit()?;
        *indexed = next;
        drop(indexed);
        let mut full = false;
        let wal = self.wal_bytes.load(Ordering::Relaxed);
        if let Some(restart) =
            restart_due(wal, self.covered.load(Ordering::Relaxed), wal - wal_before)
        {
            // Below twice the limit a pass the thread is running is left to copy the rest, and
            // the writer tries again after its next commit; at twice the limit it waits.
            let pass = match restart {
                Restart::Wait => Some(self.passes.lock().unwrap_or_else(|e| e.into_inner())),
                Restart::IfIdle => match self.passes.try_lock() {
                    Ok(pass) => Some(pass),
                    Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
                    Err(std::sync::TryLockError::WouldBlock) => None,
                },
            };
            if pass.is_some() {
                full = true;
                // Copies the rest and syncs the database file; the next transaction starts
                // the WAL over.
                conn.query_row("PRAGMA wal_checkpoint(FULL)", [], |_| Ok(()))?;
            }
        }
        drop(conn);
        // Past the limit every commit wakes the thread, until the WAL starts over.
        if !full
            && (wal >= WAL_LIMIT_BYTES || checkpoint_due(wal, self.covered.load(Ordering::Relaxed)))
        {
            let _ = self
                .checkpoints
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(());
        }
        Ok(())
    }
}

fn params(filter: &Filter) -> impl Iterator<Item = rusqlite::types::Value> + '_ {
    filter.params.iter().map(|p| match p {
        Param::Text(s) => rusqlite::types::Value::Text(s.clone()),
        Param::Int(i) => rusqlite::types::Value::Integer(*i),
    })
}

const COLUMNS: &str = "chain, seq, prev, hash, time_us, event, agent, run, tool, outcome, body";

fn record(row: &rusqlite::Row<'_>) -> rusqlite::Result<(Record, i64)> {
    let seq: i64 = row.get(1)?;
    Ok((
        Record {
            chain: row.get(0)?,
            seq: 0,
            prev: row.get(2)?,
            hash: row.get(3)?,
            index: Index {
                time_us: row.get(4)?,
                event: row.get(5)?,
                agent: row.get(6)?,
                run: row.get(7)?,
                tool: row.get(8)?,
                outcome: row.get(9)?,
            },
            body: row.get(10)?,
        },
        seq,
    ))
}

fn records(
    conn: &Connection,
    sql: &str,
    params: impl Iterator<Item = rusqlite::types::Value>,
) -> Result<Vec<Record>, StoreError> {
    let mut statement = conn.prepare_cached(sql)?;
    let rows = statement.query_map(params_from_iter(params), record)?;
    let mut out = Vec::new();
    for row in rows {
        let (mut record, seq) = row?;
        record.seq = to_u64(seq)?;
        out.push(record);
    }
    Ok(out)
}

/// What [`Sealed`] is made of, in its order.
const SEALED_COLUMNS: &str = "seq, prev, hash, event, body";

/// A text column's bytes as stored, borrowed from the row.
fn stored<'a>(row: &'a rusqlite::Row<'_>, column: usize) -> rusqlite::Result<&'a [u8]> {
    match row.get_ref(column)? {
        rusqlite::types::ValueRef::Text(bytes) | rusqlite::types::ValueRef::Blob(bytes) => {
            Ok(bytes)
        }
        rusqlite::types::ValueRef::Null => Ok(b""),
        other => Err(rusqlite::Error::InvalidColumnType(
            column,
            "text".into(),
            other.data_type(),
        )),
    }
}

/// The records `sql` selects with `(chain, from, to)`, sealed as they are read: no body is
/// copied out of SQLite's page unless it is a checkpoint's. `expected` sizes the result.
fn sealed_rows(
    conn: &Connection,
    sql: &str,
    (chain, from, to): (&str, i64, i64),
    expected: usize,
) -> Result<Vec<Sealed>, StoreError> {
    let mut statement = conn.prepare_cached(sql)?;
    let mut rows = statement.query(rusqlite::params![chain, from, to])?;
    let mut out = Vec::with_capacity(expected);
    while let Some(row) = rows.next()? {
        let seq = to_u64(row.get(0)?)?;
        out.push(Sealed::of_stored(
            chain,
            seq,
            stored(row, 1)?,
            stored(row, 2)?,
            stored(row, 3)?,
            stored(row, 4)?,
        ));
    }
    Ok(out)
}

impl Inner {
    fn spare(&self) -> Result<Connection, StoreError> {
        let pooled = self.spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
        pooled.map_or_else(
            || {
                let conn = open(&self.path)?;
                conn.pragma_update(None, "mmap_size", VERIFY_MMAP_BYTES)?;
                Ok(conn)
            },
            Ok,
        )
    }

    fn give_back(&self, conn: Connection) {
        self.spare
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
    }

    /// [`Store::sealed`]: the page is read as closed ranges of sequence numbers, one per core,
    /// each on a connection of its own, sealing rows as they are read (reading and hashing
    /// both take about a microsecond per record, so one core would stop near 500,000 records
    /// per second). Sequence numbers are dense, so a range comes back short only at the
    /// chain's end or at a gap: the ranges after it are dropped (another connection may have
    /// seen a later snapshot) and the page goes on in order from the last record read, on one
    /// connection, so a gap of any size still reaches the verifier.
    fn sealed(&self, chain: &str, after: i64, limit: usize) -> Result<Vec<Sealed>, StoreError> {
        let ranges = super::ranges(after, limit);
        let range_sql = format!(
            "SELECT {SEALED_COLUMNS} FROM tollgate_audit_records WHERE chain = $1 AND seq > $2 AND seq <= $3 ORDER BY seq"
        );
        let read = |(from, to): (i64, i64)| -> Result<Vec<Sealed>, StoreError> {
            let conn = self.spare()?;
            let expected = usize::try_from(to - from).unwrap_or(0);
            let part = sealed_rows(&conn, &range_sql, (chain, from, to), expected);
            self.give_back(conn);
            part
        };
        let pieces: Vec<Result<Vec<Sealed>, StoreError>> = std::thread::scope(|scope| {
            let others: Vec<_> = ranges[1..]
                .iter()
                .map(|&range| scope.spawn(move || read(range)))
                .collect();
            let first = read(ranges[0]);
            std::iter::once(first)
                .chain(others.into_iter().map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(StoreError::Task("a reading thread panicked".into()))
                    })
                }))
                .collect()
        });
        let pieces = pieces.into_iter().collect::<Result<Vec<_>, _>>()?;
        let (mut page, last) = dense_prefix(pieces, &ranges, after, limit)?;
        if page.len() < limit {
            let conn = self.reader.lock().unwrap_or_else(|e| e.into_inner());
            page.extend(sealed_rows(
                &conn,
                &format!(
                    "SELECT {SEALED_COLUMNS} FROM tollgate_audit_records WHERE chain = $1 AND seq > $2 ORDER BY seq LIMIT $3"
                ),
                (
                    chain,
                    last,
                    i64::try_from(limit - page.len()).unwrap_or(i64::MAX),
                ),
                0,
            )?);
        }
        Ok(page)
    }
}

fn head_row(row: Option<(i64, String)>) -> Result<Option<Head>, StoreError> {
    row.map(|(seq, hash)| {
        Ok(Head {
            seq: to_u64(seq)?,
            hash,
        })
    })
    .transpose()
}

impl Store for SqliteStore {
    async fn claim(&self, chain: &str) -> Result<(), StoreError> {
        let mut claims = self.inner.claims.lock().unwrap_or_else(|e| e.into_inner());
        if claims.contains_key(chain) {
            return Ok(());
        }
        let lock = self.inner.path.with_extension(format!(
            "writer-{}.lock",
            hex::encode(&sha2::Sha256::digest(chain.as_bytes())[..8])
        ));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .map_err(|e| StoreError::Corrupt(format!("open {}: {e}", lock.display())))?;
        match file.try_lock() {
            Ok(()) => {
                claims.insert(chain.to_owned(), file);
                Ok(())
            }
            Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Held(chain.to_owned())),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(StoreError::Corrupt(format!("lock {}: {e}", lock.display())))
            }
        }
    }

    async fn head(&self, chain: &str) -> Result<Option<Head>, StoreError> {
        let chain = chain.to_owned();
        self.read(move |conn| {
            let last = conn
                .prepare_cached(
                    "SELECT seq, hash FROM tollgate_audit_records WHERE chain = $1 ORDER BY seq DESC LIMIT 1",
                )?
                .query_row([&chain], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            match last {
                Some(row) => head_row(Some(row)),
                None => head_row(
                    conn.prepare_cached(
                        "SELECT seq, hash FROM tollgate_audit_anchors WHERE chain = $1",
                    )?
                    .query_row([&chain], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?,
                ),
            }
        })
        .await
    }

    const BLOCKING: bool = true;

    async fn append(&self, batch: Vec<Record>) -> Result<(), StoreError> {
        self.blocking(move |inner| inner.commit(batch)).await
    }

    fn append_blocking(&self, batch: Vec<Record>) -> Result<(), StoreError> {
        self.inner.commit(batch)
    }

    async fn chains(&self) -> Result<Vec<String>, StoreError> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(
                "SELECT DISTINCT chain FROM tollgate_audit_records
                 UNION SELECT chain FROM tollgate_audit_anchors ORDER BY 1",
            )?;
            let rows = statement.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn anchor(&self, chain: &str) -> Result<Option<Head>, StoreError> {
        let chain = chain.to_owned();
        self.read(move |conn| {
            head_row(
                conn.prepare_cached(
                    "SELECT seq, hash FROM tollgate_audit_anchors WHERE chain = $1",
                )?
                .query_row([&chain], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?,
            )
        })
        .await
    }

    async fn scan(&self, chain: &str, after: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
        let chain = chain.to_owned();
        let after = to_i64(after)?;
        self.read(move |conn| {
            records(
                conn,
                &format!(
                    "SELECT {COLUMNS} FROM tollgate_audit_records WHERE chain = $1 AND seq > $2 ORDER BY seq LIMIT $3"
                ),
                [
                    rusqlite::types::Value::Text(chain),
                    rusqlite::types::Value::Integer(after),
                    rusqlite::types::Value::Integer(limit as i64),
                ]
                .into_iter(),
            )
        })
        .await
    }

    async fn sealed(
        &self,
        chain: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Sealed>, StoreError> {
        let chain = chain.to_owned();
        let after = to_i64(after)?;
        self.blocking(move |inner| inner.sealed(&chain, after, limit))
            .await
    }

    async fn query(&self, query: &Query) -> Result<Vec<Record>, StoreError> {
        let filter = Filter::of(query);
        let select = match query.run {
            Some(_) => from_run(),
            None => from_agent(&filter)
                .unwrap_or_else(|| format!("SELECT {COLUMNS} FROM tollgate_audit_records")),
        };
        self.read(move |conn| records(conn, &format!("{select} {}", filter.sql), params(&filter)))
            .await
    }

    async fn census(&self, query: &Query) -> Result<Vec<Census>, StoreError> {
        let query = Query {
            limit: None,
            after: None,
            ..query.clone()
        };
        let filter = Filter::of(&query);
        let sql = format!(
            "{} {} GROUP BY agent ORDER BY agent",
            selecting(&query, &filter, "agent, COUNT(*)"),
            filter.conditions
        );
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(&sql)?;
            let rows = statement.query_map(params_from_iter(params(&filter)), |r| {
                Ok((r.get::<_, Option<String>>(0)?, r.get::<_, i64>(1)?))
            })?;
            rows.map(|row| {
                let (agent, records) = row?;
                Ok(Census {
                    agent,
                    records: to_u64(records)?,
                })
            })
            .collect()
        })
        .await
    }

    async fn tool_use(&self, since_us: i64, until_us: i64) -> Result<Vec<ToolUse>, StoreError> {
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(crate::sql::TOOL_USE)?;
            let rows = statement.query_map([since_us, until_us], |r| {
                Ok(ToolUse {
                    agent: r.get(0)?,
                    tool: r.get(1)?,
                    calls: r.get::<_, i64>(2)? as u64,
                    allowed: r.get::<_, i64>(3)? as u64,
                    last_us: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn tallies(&self, since_us: i64, until_us: i64) -> Result<Vec<ToolTally>, StoreError> {
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(crate::sql::TALLIES)?;
            let rows = statement.query_map([since_us, until_us], |r| {
                Ok(ToolTally {
                    agent: r.get(0)?,
                    tool: r.get(1)?,
                    event: r.get(2)?,
                    outcome: r.get(3)?,
                    count: r.get::<_, i64>(4)? as u64,
                    last_us: r.get(5)?,
                })
            })?;
            let mut tallies: Vec<ToolTally> = rows.collect::<Result<_, _>>()?;
            tallies.sort_unstable();
            Ok(tallies)
        })
        .await
    }

    async fn outcomes(&self, agent: &str, since_us: i64) -> Result<Vec<ToolOutcome>, StoreError> {
        let agent = agent.to_owned();
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(&OUTCOMES)?;
            let rows = statement.query_map(rusqlite::params![agent, since_us], |r| {
                Ok(ToolOutcome {
                    tool: r.get(0)?,
                    outcome: r.get(1)?,
                    count: r.get::<_, i64>(2)? as u64,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn last_before(&self, chain: &str, before_us: i64) -> Result<Option<Head>, StoreError> {
        let chain = chain.to_owned();
        self.read(move |conn| {
            head_row(
                conn.prepare_cached(crate::sql::LAST_BEFORE)?
                    .query_row(rusqlite::params![chain, before_us], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .optional()?,
            )
        })
        .await
    }

    async fn prune(&self, chain: &str, through: &Head) -> Result<u64, StoreError> {
        let chain = chain.to_owned();
        let through = through.clone();
        self.blocking(move |inner| {
            let mut conn = inner.writer.lock().unwrap_or_else(|e| e.into_inner());
            let seq = to_i64(through.seq)?;
            // IMMEDIATE, as when opening: prune reads before it writes.
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            levels::prune(&tx, &chain, seq)?;
            let deleted = tx.execute(
                "DELETE FROM tollgate_audit_records WHERE chain = $1 AND seq <= $2",
                rusqlite::params![chain, seq],
            )?;
            levels::lower_mark(&tx)?;
            tx.execute(
                "INSERT INTO tollgate_audit_anchors (chain, seq, hash) VALUES ($1, $2, $3)
                 ON CONFLICT (chain) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                rusqlite::params![chain, seq, through.hash],
            )?;
            let levels = Indexed::read(&tx)?;
            tx.commit()?;
            *inner.indexed.lock().unwrap_or_else(|e| e.into_inner()) = levels;
            Ok(deleted as u64)
        })
        .await
    }
}

use sha2::Digest as _;

#[cfg(test)]
mod tests;
