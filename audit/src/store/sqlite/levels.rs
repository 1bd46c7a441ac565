//! The run index, (run, rowid), and the agent index, (agent, time, rowid), written in batches
//! through a tail, and for runs a recent level.
//!
//! A commit writes every page it touched to the WAL in full, and an index on a column that many
//! records in flight spread over (runs, agents) puts each one's newest entry on a page of its
//! own: with 32 runs in flight a 13-record commit wrote about 13 such pages, with 1,000 runs or
//! 100 agents nearly a page per record, more than the record itself (bench/README.md). So the
//! records table has no index on `run` or `agent`.
//!
//! Each commit appends (rowid, run, agent, time) of its records to the tail
//! (`tollgate_audit_tail`), a small table in rowid order whose newest page all commits share.
//! The commit that takes the records after the mark (`tollgate_audit_indexed`) past [`BATCH`]
//! moves the tail's entries on in the same transaction, and moves the mark up to its last row:
//! agents' straight into the agent index (`tollgate_audit_agent_index`), runs' into the run
//! index's recent level (`tollgate_audit_run_recent`), a small index of (run, rowid). Once that
//! holds [`RECENT_LIMIT`] entries, a sweep moves it into the run index itself
//! (`tollgate_audit_run_index`) in run order, a chunk per commit ([`index`]). ([`Depth`] says
//! why runs need the level and agents do not.) Each entry is in exactly one level at every
//! commit. A query reads every level and the tail ([`Levelled::rows`]), so it is always
//! complete, and a lookup reads a few pages of each.
//!
//! One tail for both indexes: each commit inserts one tail row per record, not one per index,
//! and a move reads a few pages of it (the records themselves are about 170 pages per batch:
//! reading them in the commit that moves put milliseconds into the gateway's p99).

use std::sync::LazyLock;

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Transaction, params_from_iter};

/// Records a commit may leave after the mark; the commit that passes this many moves the tail
/// into the recent levels. A query scans at most about this many tail entries.
pub const BATCH: i64 = 512;

/// Entries a recent level holds before a sweep moves them into its index, in chunks, one per
/// commit (see [`index`]).
pub const RECENT_LIMIT: i64 = 8192;

/// The fewest entries one commit's share of a sweep moves (at least twice the commit's records,
/// so that a sweep moves entries faster than commits bring them).
pub const SWEEP_CHUNK: i64 = 1024;

/// The run index: the records of a run, by rowid.
pub static RUNS: LazyLock<Levelled> =
    LazyLock::new(|| Levelled::new("run", &[("run", Kind::Text)], Depth::WithRecent));

/// The agent index: an agent's records by time, then rowid.
pub static AGENTS: LazyLock<Levelled> = LazyLock::new(|| {
    Levelled::new(
        "agent",
        &[("agent", Kind::Text), ("time_us", Kind::Integer)],
        Depth::TailAndIndex,
    )
});

/// Whether an index has a recent level between the tail and itself.
///
/// A move writes each page of the level it goes into that its entries land on. Into the index
/// itself, that is a page per key in the tail: fine for agents (a gateway serves tens, and a
/// plain index cost a page per commit for each agent in it), a page per entry for runs (a
/// thousand in flight is ordinary). So runs go through a recent level of a few dozen pages,
/// which costs every entry two more writes and a delete, and agents straight into their index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Depth {
    WithRecent,
    TailAndIndex,
}

/// The tail: records after the mark that have a run or an agent.
pub const TAIL: &str = "tollgate_audit_tail";

/// The mark (no row yet: nothing indexed).
pub const MARK: &str = "COALESCE((SELECT through FROM tollgate_audit_indexed), 0)";

/// Puts a record (rowid, run, agent, time) in the tail.
pub const TAIL_INSERT: &str =
    "INSERT INTO tollgate_audit_tail (rec, run, agent, time_us) VALUES ($1, $2, $3, $4)";

/// The tables of the tail and the mark (the indexes' own are [`Levelled::schema`]).
const SCHEMA: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS tollgate_audit_tail (
        rec INTEGER PRIMARY KEY,
        run TEXT,
        agent TEXT,
        time_us INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS tollgate_audit_indexed (
        one INTEGER PRIMARY KEY CHECK (one = 1),
        through INTEGER NOT NULL
    )",
];

/// The type of a key column.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Text,
    Integer,
}

impl Kind {
    fn sql(self) -> &'static str {
        match self {
            Kind::Text => "TEXT",
            Kind::Integer => "INTEGER",
        }
    }

    /// A value no stored one is below (`''` or the least integer): with a rowid of 0, an entry
    /// below every entry, where a sweep starts.
    fn least(self) -> Value {
        match self {
            Kind::Text => Value::Text(String::new()),
            Kind::Integer => Value::Integer(i64::MIN),
        }
    }
}

/// One index kept in levels, and the SQL that keeps and reads it.
#[derive(Debug)]
pub struct Levelled {
    /// The index's table.
    pub index: String,
    /// Its recent level, if it has one.
    pub recent: Option<Recent>,
    schema: Vec<String>,
    move_tail: String,
    /// Take the records of chain `$1` through sequence `$2` out of each level.
    prune: Vec<String>,
}

/// A recent level between the tail and the index, and the SQL that sweeps it.
#[derive(Debug)]
pub struct Recent {
    /// Its table.
    pub table: String,
    /// Where a sweep starts: below every entry.
    start: Vec<Value>,
    count: String,
    chunk_end: String,
    move_range: String,
    delete_range: String,
    move_rest: String,
    delete_rest: String,
}

/// `($from, …, $to)`.
fn placeholders(from: usize, n: usize) -> String {
    let list: Vec<String> = (from..from + n).map(|i| format!("${i}")).collect();
    format!("({})", list.join(", "))
}

impl Levelled {
    /// The index `tollgate_audit_{name}_…` on `key` (columns of the records and of the tail,
    /// the first one the column whose value gives a record its entry), then the rowid; with a
    /// recent level or without.
    fn new(name: &'static str, key: &[(&'static str, Kind)], levels: Depth) -> Self {
        let columns: Vec<&str> = key.iter().map(|(column, _)| *column).collect();
        let cols = columns.join(", ");
        let n = key.len() + 1;
        let defs: Vec<String> = key
            .iter()
            .map(|(column, kind)| format!("{column} {} NOT NULL", kind.sql()))
            .collect();
        let defs = defs.join(", ");
        let index = format!("tollgate_audit_{name}_index");
        let keyed = |t: &str| {
            format!(
                "CREATE TABLE IF NOT EXISTS {t} ({defs}, rec INTEGER NOT NULL, \
                 PRIMARY KEY ({cols}, rec)) WITHOUT ROWID"
            )
        };
        let entry = format!("({cols}, rec)");
        let after = placeholders(1, n);
        let until = placeholders(n + 1, n);
        let pruned = format!(
            "SELECT {cols}, rowid FROM tollgate_audit_records \
             WHERE chain = $1 AND seq <= $2 AND {} IS NOT NULL",
            columns[0]
        );
        let recent = (levels == Depth::WithRecent).then(|| {
            let table = format!("tollgate_audit_{name}_recent");
            let mut start: Vec<Value> = key.iter().map(|(_, kind)| kind.least()).collect();
            start.push(Value::Integer(0));
            Recent {
                start,
                count: format!("SELECT COUNT(*) FROM {table}"),
                chunk_end: format!(
                    "SELECT {cols}, rec FROM {table} WHERE {entry} > {after} \
                     ORDER BY {cols}, rec LIMIT 1 OFFSET ${}",
                    n + 1
                ),
                move_range: format!(
                    "INSERT INTO {index} ({cols}, rec) SELECT {cols}, rec FROM {table} \
                     WHERE {entry} > {after} AND {entry} <= {until} ORDER BY {cols}, rec"
                ),
                delete_range: format!(
                    "DELETE FROM {table} WHERE {entry} > {after} AND {entry} <= {until}"
                ),
                move_rest: format!(
                    "INSERT INTO {index} ({cols}, rec) SELECT {cols}, rec FROM {table} \
                     WHERE {entry} > {after} ORDER BY {cols}, rec"
                ),
                delete_rest: format!("DELETE FROM {table} WHERE {entry} > {after}"),
                table,
            }
        });
        let mut schema = vec![keyed(&index)];
        let mut prune = vec![format!("DELETE FROM {index} WHERE {entry} IN ({pruned})")];
        let mut first = &index;
        if let Some(recent) = &recent {
            schema.push(keyed(&recent.table));
            prune.push(format!(
                "DELETE FROM {} WHERE {entry} IN ({pruned})",
                recent.table
            ));
            first = &recent.table;
        }
        Self {
            move_tail: format!(
                "INSERT INTO {first} ({cols}, rec) SELECT {cols}, rec FROM {TAIL} \
                 WHERE rec > $1 AND {} IS NOT NULL ORDER BY {cols}, rec",
                columns[0]
            ),
            schema,
            prune,
            recent,
            index,
        }
    }

    /// The rowids of the records whose key matches `condition` (on the key's columns), from
    /// every level: a `SELECT rec …` for a common table expression.
    pub fn rows(&self, condition: &str) -> String {
        let recent = match &self.recent {
            Some(recent) => format!(
                "UNION ALL SELECT rec FROM {} WHERE {condition} ",
                recent.table
            ),
            None => String::new(),
        };
        format!(
            "SELECT rec FROM {index} WHERE {condition} {recent}\
             UNION ALL SELECT rec FROM {TAIL} WHERE rec > {MARK} AND {condition}",
            index = self.index,
        )
    }

    /// The levels of the database `conn` opened; a sweep that was under way starts over.
    pub fn read(&self, conn: &Connection) -> rusqlite::Result<Levels> {
        Ok(Levels {
            recent: match &self.recent {
                Some(recent) => conn.query_row(&recent.count, [], |r| r.get(0))?,
                None => 0,
            },
            sweep: None,
        })
    }

    /// Moves the tail's entries after `through` into the recent level, or straight into the
    /// index without one; how many went into a recent level.
    fn move_tail(&self, tx: &Transaction<'_>, through: i64) -> rusqlite::Result<i64> {
        let moved = tx.prepare_cached(&self.move_tail)?.execute([through])? as i64;
        Ok(if self.recent.is_some() { moved } else { 0 })
    }

    /// From when the recent level holds [`RECENT_LIMIT`] entries, sweeps a chunk of it (at
    /// least twice `records`) into the index in key order; the levels after it.
    fn sweep(
        &self,
        tx: &Transaction<'_>,
        records: usize,
        mut next: Levels,
    ) -> rusqlite::Result<Levels> {
        let Some(recent) = &self.recent else {
            return Ok(next);
        };
        if next.sweep.is_none() && next.recent >= RECENT_LIMIT {
            next.sweep = Some(recent.start.clone());
        }
        let Some(from) = next.sweep.take() else {
            return Ok(next);
        };
        let chunk = SWEEP_CHUNK.max(2 * records as i64);
        // The chunk's last entry, unless the rest of the level is no larger than a chunk.
        let arity = recent.start.len();
        let until: Option<Vec<Value>> = tx
            .prepare_cached(&recent.chunk_end)?
            .query_row(
                params_from_iter(from.iter().cloned().chain([Value::Integer(chunk - 1)])),
                |r| (0..arity).map(|i| r.get::<_, Value>(i)).collect(),
            )
            .optional()?;
        let moved = match &until {
            Some(to) => {
                let range = || params_from_iter(from.iter().chain(to));
                let moved = tx.prepare_cached(&recent.move_range)?.execute(range())?;
                tx.prepare_cached(&recent.delete_range)?.execute(range())?;
                moved
            }
            None => {
                let moved = tx
                    .prepare_cached(&recent.move_rest)?
                    .execute(params_from_iter(&from))?;
                tx.prepare_cached(&recent.delete_rest)?
                    .execute(params_from_iter(&from))?;
                moved
            }
        };
        next.recent -= moved as i64;
        if until.is_none() {
            // The sweep has ended: count what came in behind it, in case another process that
            // opened the file moved a tail meanwhile (the count only decides when to sweep).
            next.recent = self.read(tx)?.recent;
        }
        next.sweep = until;
        Ok(next)
    }
}

/// The levels of one index as the writer tracks them between its transactions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Levels {
    /// Entries in the recent level.
    pub recent: i64,
    /// While a sweep moves the recent level into the index: the last entry it moved (below
    /// every entry when it starts).
    pub sweep: Option<Vec<Value>>,
}

/// The levels of both indexes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Indexed {
    pub runs: Levels,
    pub agents: Levels,
}

impl Indexed {
    /// The levels of the database `conn` opened.
    pub fn read(conn: &Connection) -> rusqlite::Result<Self> {
        Ok(Self {
            runs: RUNS.read(conn)?,
            agents: AGENTS.read(conn)?,
        })
    }
}

/// Whether `conn`'s database has a table named `name`.
fn has_table(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = $1",
        [name],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

/// Opening a file: creates the tables, brings a file of an earlier layout to this one, and
/// catches up as a commit would (the records after the mark go in the tail, then the batch
/// rule applies); returns the levels.
///
/// Earlier layouts: SQLite's own indexes on `run` and on (agent, time), dropped (every record
/// is indexed anew); the run index's mark in `tollgate_audit_run_indexed`, renamed, and its
/// tail in `tollgate_audit_run_tail`, dropped (the records after the mark fill the tail again);
/// a run index and no agent index, whose mark covers records the tail will not bring: their
/// agent entries go straight into the agent index; agent levels with a mark of their own
/// (`tollgate_audit_agent_indexed`), dropped and built again.
pub fn open(tx: &Transaction<'_>) -> rusqlite::Result<Indexed> {
    tx.execute("DROP INDEX IF EXISTS tollgate_audit_run", [])?;
    tx.execute("DROP INDEX IF EXISTS tollgate_audit_agent", [])?;
    if has_table(tx, "tollgate_audit_agent_indexed")? {
        // Agent levels with a mark of their own (two development commits): indexed anew.
        for table in ["indexed", "index", "recent", "tail"] {
            tx.execute(
                &format!("DROP TABLE IF EXISTS tollgate_audit_agent_{table}"),
                [],
            )?;
        }
    }
    let agents_before = has_table(tx, &AGENTS.index)?;
    if has_table(tx, "tollgate_audit_run_indexed")? && !has_table(tx, "tollgate_audit_indexed")? {
        tx.execute(
            "ALTER TABLE tollgate_audit_run_indexed RENAME TO tollgate_audit_indexed",
            [],
        )?;
    }
    tx.execute("DROP TABLE IF EXISTS tollgate_audit_run_tail", [])?;
    let tables = RUNS.schema.iter().chain(&AGENTS.schema).map(String::as_str);
    for statement in SCHEMA.into_iter().chain(tables) {
        tx.execute(statement, [])?;
    }
    if !agents_before {
        tx.execute(
            &format!(
                "INSERT INTO {} (agent, time_us, rec) SELECT agent, time_us, rowid \
                 FROM tollgate_audit_records WHERE rowid <= {MARK} AND agent IS NOT NULL \
                 ORDER BY agent, time_us, rowid",
                AGENTS.index
            ),
            [],
        )?;
    }
    tx.execute(
        &format!(
            "INSERT OR IGNORE INTO {TAIL} (rec, run, agent, time_us) \
             SELECT rowid, run, agent, time_us FROM tollgate_audit_records \
             WHERE rowid > {MARK} AND (run IS NOT NULL OR agent IS NOT NULL)"
        ),
        [],
    )?;
    let last: i64 = tx.query_row(
        "SELECT COALESCE(MAX(rowid), 0) FROM tollgate_audit_records",
        [],
        |r| r.get(0),
    )?;
    let levels = Indexed::read(tx)?;
    let tail: i64 = tx.query_row(&format!("SELECT COUNT(*) FROM {TAIL}"), [], |r| r.get(0))?;
    // Opening is no caller's wait: a recent level left over its limit (a file from before the
    // batched indexes moves every record's run in here) is swept whole.
    let whole = levels.runs.recent.max(levels.agents.recent) + tail;
    index(tx, last, whole as usize, &levels)
}

/// In the transaction that just inserted `records` records up to rowid `last`, given the
/// levels before it: moves the tail into the recent levels once the records after the mark are
/// [`BATCH`] or more, and sweeps each recent level that has reached [`RECENT_LIMIT`] into its
/// index, a chunk per commit. Returns the levels after it, for once it has committed.
pub fn index(
    tx: &Transaction<'_>,
    last: i64,
    records: usize,
    before: &Indexed,
) -> rusqlite::Result<Indexed> {
    let mut next = before.clone();
    let through: i64 = tx
        .prepare_cached(&format!("SELECT {MARK}"))?
        .query_row([], |r| r.get(0))?;
    if last - through >= BATCH {
        next.runs.recent += RUNS.move_tail(tx, through)?;
        next.agents.recent += AGENTS.move_tail(tx, through)?;
        tx.prepare_cached(&format!("DELETE FROM {TAIL}"))?
            .execute([])?;
        tx.prepare_cached(
            "INSERT INTO tollgate_audit_indexed (one, through) VALUES (1, $1)
             ON CONFLICT (one) DO UPDATE SET through = excluded.through",
        )?
        .execute([last])?;
    }
    Ok(Indexed {
        runs: RUNS.sweep(tx, records, next.runs)?,
        agents: AGENTS.sweep(tx, records, next.agents)?,
    })
}

/// Takes the records of `chain` through `seq` out of every level and the tail, before they are
/// deleted.
pub fn prune(tx: &Transaction<'_>, chain: &str, seq: i64) -> rusqlite::Result<()> {
    for statement in RUNS.prune.iter().chain(&AGENTS.prune) {
        tx.execute(statement, rusqlite::params![chain, seq])?;
    }
    tx.execute(
        &format!(
            "DELETE FROM {TAIL} WHERE rec IN (SELECT rowid FROM tollgate_audit_records \
             WHERE chain = $1 AND seq <= $2)"
        ),
        rusqlite::params![chain, seq],
    )?;
    Ok(())
}

/// After records were deleted: new records take the rowid after the largest left, so if the
/// newest went, the mark comes down to it, or they would count as indexed.
pub fn lower_mark(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE tollgate_audit_indexed SET through = MIN(through, \
         COALESCE((SELECT MAX(rowid) FROM tollgate_audit_records), 0))",
        [],
    )?;
    Ok(())
}
