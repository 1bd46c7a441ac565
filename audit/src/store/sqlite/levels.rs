//! Indexes written in batches, in three levels: [`RUNS`] (run, rowid) and [`AGENTS`] (agent,
//! time, rowid).
//!
//! A commit writes every page it touched to the WAL in full, and an index on a column that many
//! records in flight spread over (runs, agents) puts each one's newest entry on a page of its
//! own: with 32 runs in flight a 13-record commit wrote about 13 such pages, with 1,000 runs or
//! 100 agents nearly a page per record, more than the record itself (bench/README.md). So the
//! records table has no index on `run` or `agent`.
//!
//! The records after an index's mark (`tollgate_audit_{name}_indexed`) are its tail. The run
//! index keeps (rowid, run) of each of them in a table (`tollgate_audit_run_tail`, in rowid
//! order, whose newest page all commits share), because the gateway looks up every run it has
//! not seen; the agent index reads the records themselves by rowid ([`Tail`]). The commit that
//! takes the tail past [`BATCH`] records moves its entries to the recent level
//! (`tollgate_audit_{name}_recent`), a small index of (key, rowid), in the same transaction and
//! moves the mark up to its last row; once the recent level holds [`RECENT_LIMIT`] entries, a
//! sweep moves it into the index itself (`tollgate_audit_{name}_index`) in key order, a chunk
//! per commit ([`Levelled::index`]). The recent level is small (a few dozen pages), so moving
//! the tail into it touches few pages, and a sweep moves several entries of each key into the
//! index at once. Each entry is in exactly one level at every commit. A query reads both levels
//! and the tail ([`Levelled::rows`]), so it is always complete, and a lookup reads a few pages
//! of each level.

use std::sync::LazyLock;

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Transaction, params_from_iter};

/// Records a commit may leave in a tail; the commit that passes this many moves them all into
/// the recent level. A query scans at most about this many tail entries.
pub const BATCH: i64 = 512;

/// Entries a recent level holds before a sweep moves them into the index, in chunks, one per
/// commit (see [`Levelled::index`]).
pub const RECENT_LIMIT: i64 = 8192;

/// The fewest entries one commit's share of a sweep moves (at least twice the commit's records,
/// so that a sweep moves entries faster than commits bring them).
pub const SWEEP_CHUNK: i64 = 1024;

/// The run index: the records of a run, by rowid.
pub static RUNS: LazyLock<Levelled> =
    LazyLock::new(|| Levelled::new("run", &[("run", Kind::Text)], Tail::Table));

/// The agent index: an agent's records by time, then rowid.
pub static AGENTS: LazyLock<Levelled> = LazyLock::new(|| {
    Levelled::new(
        "agent",
        &[("agent", Kind::Text), ("time_us", Kind::Integer)],
        Tail::Records,
    )
});

/// Where the entries of records after the mark are read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// A table of their own, which each commit appends to: a query reads a few pages of it.
    /// For runs, which the gateway looks up at every run it has not seen.
    Table,
    /// The records after the mark themselves (up to [`BATCH`] and a commit's, about 170
    /// pages): a commit writes nothing more. For agents, which are looked up rarely (a
    /// restarted gateway's first call of an agent, graduation, the read API).
    Records,
}

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
    /// Where a sweep starts: below every entry.
    start: Vec<Value>,
    /// `COALESCE(the mark, 0)`, for queries.
    pub mark: String,
    /// Its tables.
    pub schema: Vec<String>,
    /// Its levels' tables: the recent level, the index.
    pub recent: String,
    pub index: String,
    /// The entries after the mark: `rec` and the key's columns (a table, or a select from the
    /// records).
    tail: String,
    /// With a tail table: puts a record (`$1` its rowid, then the key) in it, puts every
    /// record after the mark that has a key in it (opening a file), and empties it.
    pub insert: Option<String>,
    catch_up: Option<String>,
    clear_tail: Option<String>,
    move_tail: String,
    set_mark: String,
    count_recent: String,
    chunk_end: String,
    move_range: String,
    delete_range: String,
    move_rest: String,
    delete_rest: String,
    /// Take the records of chain `$1` through sequence `$2` out of each level.
    prune: Vec<String>,
    lower_mark: String,
}

/// `($from, …, $to)`.
fn placeholders(from: usize, n: usize) -> String {
    let list: Vec<String> = (from..from + n).map(|i| format!("${i}")).collect();
    format!("({})", list.join(", "))
}

impl Levelled {
    /// The index `tollgate_audit_{name}_…` on `key` (columns of the records, the first one
    /// the column whose value gives a record its entry), then the rowid.
    fn new(name: &'static str, key: &[(&'static str, Kind)], kept: Tail) -> Self {
        let columns: Vec<&str> = key.iter().map(|(column, _)| *column).collect();
        let cols = columns.join(", ");
        let n = key.len() + 1;
        let defs: Vec<String> = key
            .iter()
            .map(|(column, kind)| format!("{column} {} NOT NULL", kind.sql()))
            .collect();
        let defs = defs.join(", ");
        let table = |level: &str| format!("tollgate_audit_{name}_{level}");
        let (recent, index, indexed) = (table("recent"), table("index"), table("indexed"));
        let mark = format!("COALESCE((SELECT through FROM {indexed}), 0)");
        let keyed = |t: &str| {
            format!(
                "CREATE TABLE IF NOT EXISTS {t} ({defs}, rec INTEGER NOT NULL, \
                 PRIMARY KEY ({cols}, rec)) WITHOUT ROWID"
            )
        };
        let entry = format!("({cols}, rec)");
        let after = placeholders(1, n);
        let until = placeholders(n + 1, n);
        let pruned = |selected: &str| {
            format!(
                "SELECT {selected} FROM tollgate_audit_records \
                 WHERE chain = $1 AND seq <= $2 AND {} IS NOT NULL",
                columns[0]
            )
        };
        let mut start: Vec<Value> = key.iter().map(|(_, kind)| kind.least()).collect();
        start.push(Value::Integer(0));
        let table_of_tail = table("tail");
        let mut schema = vec![
            keyed(&index),
            format!(
                "CREATE TABLE IF NOT EXISTS {indexed} (\
                 one INTEGER PRIMARY KEY CHECK (one = 1), through INTEGER NOT NULL)"
            ),
            keyed(&recent),
        ];
        let mut prune = vec![
            format!(
                "DELETE FROM {index} WHERE {entry} IN ({})",
                pruned(&format!("{cols}, rowid"))
            ),
            format!(
                "DELETE FROM {recent} WHERE {entry} IN ({})",
                pruned(&format!("{cols}, rowid"))
            ),
        ];
        let (tail, insert, catch_up, clear_tail) = match kept {
            Tail::Table => {
                schema.push(format!(
                    "CREATE TABLE IF NOT EXISTS {table_of_tail} (rec INTEGER PRIMARY KEY, {defs})"
                ));
                prune.push(format!(
                    "DELETE FROM {table_of_tail} WHERE rec IN ({})",
                    pruned("rowid")
                ));
                (
                    table_of_tail.clone(),
                    Some(format!(
                        "INSERT INTO {table_of_tail} (rec, {cols}) VALUES {}",
                        placeholders(1, n)
                    )),
                    Some(format!(
                        "INSERT OR IGNORE INTO {table_of_tail} (rec, {cols}) SELECT rowid, {cols} \
                         FROM tollgate_audit_records WHERE rowid > {mark} AND {} IS NOT NULL",
                        columns[0]
                    )),
                    Some(format!("DELETE FROM {table_of_tail}")),
                )
            }
            // NOT INDEXED: read by rowid from the mark on, whatever the other conditions (the
            // index on time would otherwise tempt SQLite for a query with a since time).
            Tail::Records => (
                format!(
                    "(SELECT rowid AS rec, {cols} FROM tollgate_audit_records NOT INDEXED \
                     WHERE {} IS NOT NULL)",
                    columns[0]
                ),
                None,
                None,
                None,
            ),
        };
        Self {
            start,
            schema,
            move_tail: format!(
                "INSERT INTO {recent} ({cols}, rec) SELECT {cols}, rec FROM {tail} \
                 WHERE rec > $1 ORDER BY {cols}, rec"
            ),
            insert,
            catch_up,
            clear_tail,
            set_mark: format!(
                "INSERT INTO {indexed} (one, through) VALUES (1, $1) \
                 ON CONFLICT (one) DO UPDATE SET through = excluded.through"
            ),
            count_recent: format!("SELECT COUNT(*) FROM {recent}"),
            chunk_end: format!(
                "SELECT {cols}, rec FROM {recent} WHERE {entry} > {after} \
                 ORDER BY {cols}, rec LIMIT 1 OFFSET ${}",
                n + 1
            ),
            move_range: format!(
                "INSERT INTO {index} ({cols}, rec) SELECT {cols}, rec FROM {recent} \
                 WHERE {entry} > {after} AND {entry} <= {until} ORDER BY {cols}, rec"
            ),
            delete_range: format!(
                "DELETE FROM {recent} WHERE {entry} > {after} AND {entry} <= {until}"
            ),
            move_rest: format!(
                "INSERT INTO {index} ({cols}, rec) SELECT {cols}, rec FROM {recent} \
                 WHERE {entry} > {after} ORDER BY {cols}, rec"
            ),
            delete_rest: format!("DELETE FROM {recent} WHERE {entry} > {after}"),
            prune,
            // New records take the rowid after the largest left: if the newest went, the mark
            // comes down to it, or they would count as indexed.
            lower_mark: format!(
                "UPDATE {indexed} SET through = MIN(through, \
                 COALESCE((SELECT MAX(rowid) FROM tollgate_audit_records), 0))"
            ),
            mark,
            tail,
            recent,
            index,
        }
    }

    /// The rowids of the records whose key matches `condition` (on the key's columns), from
    /// every level: a `SELECT rec …` for a common table expression.
    pub fn rows(&self, condition: &str) -> String {
        format!(
            "SELECT rec FROM {index} WHERE {condition} \
             UNION ALL SELECT rec FROM {recent} WHERE {condition} \
             UNION ALL SELECT rec FROM {tail} WHERE rec > {mark} AND {condition}",
            index = self.index,
            recent = self.recent,
            tail = self.tail,
            mark = self.mark,
        )
    }

    /// The levels of the database `conn` opened; a sweep that was under way starts over.
    pub fn read(&self, conn: &Connection) -> rusqlite::Result<Levels> {
        Ok(Levels {
            recent: self.recent_entries(conn)?,
            sweep: None,
        })
    }

    fn recent_entries(&self, conn: &Connection) -> rusqlite::Result<i64> {
        conn.query_row(&self.count_recent, [], |r| r.get(0))
    }

    /// Opening a file: puts every record after the mark in the tail (a file from before this
    /// index, or from before its tail, or whose last records were never batched), then applies
    /// the batch rule as a commit would. Opening is no caller's wait: a recent level left over
    /// its limit (a file from before the index moves every record's entry in here) is swept
    /// whole.
    pub fn catch_up(&self, tx: &Transaction<'_>, last: i64) -> rusqlite::Result<()> {
        if let Some(catch_up) = &self.catch_up {
            tx.execute(catch_up, [])?;
        }
        let levels = self.read(tx)?;
        let tail: i64 = tx.query_row(
            &format!(
                "SELECT COUNT(*) FROM {} WHERE rec > {}",
                self.tail, self.mark
            ),
            [],
            |r| r.get(0),
        )?;
        self.index(tx, last, (levels.recent + tail) as usize, &levels)?;
        Ok(())
    }

    /// In the transaction that just inserted `records` records up to rowid `last`, given the
    /// levels before it: moves the tail into the recent level once the records after the mark
    /// are [`BATCH`] or more, and, from when the recent level holds [`RECENT_LIMIT`] entries,
    /// sweeps it into the index, one chunk in key order per commit (at least twice `records`).
    /// Returns the levels after it, for once it has committed.
    pub fn index(
        &self,
        tx: &Transaction<'_>,
        last: i64,
        records: usize,
        levels: &Levels,
    ) -> rusqlite::Result<Levels> {
        let mut next = levels.clone();
        let through: i64 = tx
            .prepare_cached(&format!("SELECT {}", self.mark))?
            .query_row([], |r| r.get(0))?;
        if last - through >= BATCH {
            let moved = tx.prepare_cached(&self.move_tail)?.execute([through])?;
            if let Some(clear) = &self.clear_tail {
                tx.prepare_cached(clear)?.execute([])?;
            }
            tx.prepare_cached(&self.set_mark)?.execute([last])?;
            next.recent += moved as i64;
        }
        if next.sweep.is_none() && next.recent >= RECENT_LIMIT {
            next.sweep = Some(self.start.clone());
        }
        let Some(from) = next.sweep.take() else {
            return Ok(next);
        };
        let chunk = SWEEP_CHUNK.max(2 * records as i64);
        // The chunk's last entry, unless the rest of the level is no larger than a chunk.
        let arity = self.start.len();
        let until: Option<Vec<Value>> = tx
            .prepare_cached(&self.chunk_end)?
            .query_row(
                params_from_iter(from.iter().cloned().chain([Value::Integer(chunk - 1)])),
                |r| (0..arity).map(|i| r.get::<_, Value>(i)).collect(),
            )
            .optional()?;
        let moved = match &until {
            Some(to) => {
                let range = || params_from_iter(from.iter().chain(to));
                let moved = tx.prepare_cached(&self.move_range)?.execute(range())?;
                tx.prepare_cached(&self.delete_range)?.execute(range())?;
                moved
            }
            None => {
                let moved = tx
                    .prepare_cached(&self.move_rest)?
                    .execute(params_from_iter(&from))?;
                tx.prepare_cached(&self.delete_rest)?
                    .execute(params_from_iter(&from))?;
                moved
            }
        };
        next.recent -= moved as i64;
        if until.is_none() {
            // The sweep has ended: count what came in behind it, in case another process that
            // opened the file moved a tail meanwhile (the count only decides when to sweep).
            next.recent = self.recent_entries(tx)?;
        }
        next.sweep = until;
        Ok(next)
    }

    /// Takes the records of `chain` through `seq` out of every level (before they are
    /// deleted).
    pub fn prune(&self, tx: &Transaction<'_>, chain: &str, seq: i64) -> rusqlite::Result<()> {
        for statement in &self.prune {
            tx.execute(statement, rusqlite::params![chain, seq])?;
        }
        Ok(())
    }

    /// After records were deleted: lowers the mark to the largest rowid left.
    pub fn lower_mark(&self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        tx.execute(&self.lower_mark, [])?;
        Ok(())
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
