//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`, so a committed
//! transaction survives a crash of the process and of the machine.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params_from_iter};

use super::{Head, Query, Store, StoreError, ToolOutcome, ToolUse, to_i64, to_u64};
use crate::record::{Index, Record};
use crate::sql::{Filter, Param};

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
    claims: Mutex<std::collections::BTreeMap<String, File>>,
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // 64 MiB of page cache: index pages of busy runs and agents stay in memory.
    conn.pragma_update(None, "cache_size", -65536)?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_owned();
        let writer = open(&path)?;
        for statement in super::schema("") {
            writer.execute(&statement, [])?;
        }
        let reader = open(&path)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                writer: Mutex::new(writer),
                reader: Mutex::new(reader),
                claims: Mutex::new(Default::default()),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = inner.reader.lock().unwrap_or_else(|e| e.into_inner());
            f(&conn)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.writer.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
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

    async fn append(&self, batch: Vec<Record>) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.write(move |conn| {
            let tx = conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO tollgate_audit_records (chain, seq, prev, hash, time_us, event, agent, run, tool, outcome, body)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                )?;
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
                        Ok(_) => {}
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
            tx.commit()?;
            Ok(())
        })
        .await
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

    async fn query(&self, query: &Query) -> Result<Vec<Record>, StoreError> {
        let filter = Filter::of(query);
        self.read(move |conn| {
            records(
                conn,
                &format!(
                    "SELECT {COLUMNS} FROM tollgate_audit_records {}",
                    filter.sql
                ),
                params(&filter),
            )
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

    async fn outcomes(&self, agent: &str, since_us: i64) -> Result<Vec<ToolOutcome>, StoreError> {
        let agent = agent.to_owned();
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(crate::sql::OUTCOMES)?;
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
        self.write(move |conn| {
            let seq = to_i64(through.seq)?;
            let tx = conn.transaction()?;
            let deleted = tx.execute(
                "DELETE FROM tollgate_audit_records WHERE chain = $1 AND seq <= $2",
                rusqlite::params![chain, seq],
            )?;
            tx.execute(
                "INSERT INTO tollgate_audit_anchors (chain, seq, hash) VALUES ($1, $2, $3)
                 ON CONFLICT (chain) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                rusqlite::params![chain, seq, through.hash],
            )?;
            tx.commit()?;
            Ok(deleted as u64)
        })
        .await
    }
}

use sha2::Digest as _;
