use super::*;
use crate::record::{Entry, Event, GENESIS, Identity};

/// A new store in a temporary directory (kept as long as the guard), and its file.
fn fresh_store() -> (tempfile::TempDir, PathBuf, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let store = SqliteStore::open(&path).unwrap();
    (dir, path, store)
}

#[test]
fn verification_connections_map_the_whole_file() {
    // SQLite caps `mmap_size` at its compile-time SQLITE_MAX_MMAP_SIZE (2 GiB unless
    // `.cargo/config.toml` raises it) and answers with the capped value.
    let (_dir, _path, store) = fresh_store();
    let conn = store.inner.spare().unwrap();
    let mapped: i64 = conn
        .pragma_query_value(None, "mmap_size", |r| r.get(0))
        .unwrap();
    assert_eq!(mapped, VERIFY_MMAP_BYTES);
    // The gateway's own connections do not map the file.
    let writer = store.inner.writer.lock().unwrap();
    let mapped: i64 = writer
        .pragma_query_value(None, "mmap_size", |r| r.get(0))
        .unwrap();
    assert_eq!(mapped, 0);
}

/// Records `from..from + n` of chain "gw-0" after `prev`, each with `tool(seq)`.
fn decide_records(
    from: u64,
    n: u64,
    prev: &mut String,
    tool: impl Fn(u64) -> String,
) -> Vec<Record> {
    (from..from + n)
        .map(|seq| {
            let mut entry = Entry::new(jiff::Timestamp::now(), Event::Decide, Identity::default());
            entry.run = Some(format!("run-{}", seq % 50));
            entry.tool = Some(tool(seq));
            let record = Record::seal("gw-0", seq, prev, &entry);
            prev.clone_from(&record.hash);
            record
        })
        .collect()
}

/// Records of about 2 KB.
fn batch(from: u64, n: u64, prev: &mut String) -> Vec<Record> {
    decide_records(from, n, prev, |_| "x".repeat(2000))
}

/// `n` small records in chain "gw-0", appended in batches as the writer would.
async fn chain_of(store: &SqliteStore, n: u64) -> String {
    let mut prev = GENESIS.to_owned();
    let mut seq = 1;
    while seq <= n {
        let records = decide_records(seq, 1000.min(n + 1 - seq), &mut prev, |seq| {
            format!("tool-{seq}")
        });
        seq += records.len() as u64;
        store.append(records).await.unwrap();
    }
    prev
}

/// The sequence numbers of a page as runs: "1-999,1001-2999".
fn seqs(page: &[Sealed]) -> String {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for r in page {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == r.seq => *last = r.seq,
            _ => runs.push((r.seq, r.seq)),
        }
    }
    let runs: Vec<String> = runs.iter().map(|(a, b)| format!("{a}-{b}")).collect();
    runs.join(",")
}

#[tokio::test]
async fn pages_read_on_several_connections_still_reach_past_gaps_in_order() {
    let (_dir, path, store) = fresh_store();
    chain_of(&store, 10_000).await;
    let page = store.sealed("gw-0", 0, 4096).await.unwrap();
    assert_eq!(seqs(&page), "1-4096");
    assert!(
        page.iter()
            .all(|r| r.computed == r.hash.as_str().as_bytes())
    );

    Connection::open(&path)
        .unwrap()
        .execute_batch(
            "DELETE FROM tollgate_audit_records WHERE seq = 1000 OR seq BETWEEN 3000 AND 7999",
        )
        .unwrap();
    // The first range (1..=2048) is short by one; the page goes on in order past the gap.
    let page = store.sealed("gw-0", 0, 4096).await.unwrap();
    assert_eq!(seqs(&page), "1-999,1001-2999,8000-9097");
    // A page that starts inside the gap finds what follows it.
    let page = store.sealed("gw-0", 3500, 4096).await.unwrap();
    assert_eq!(seqs(&page), "8000-10000");
    assert!(store.sealed("gw-0", 10_000, 4096).await.unwrap().is_empty());
    let err = crate::verify(&store, false, &Default::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("record 1000: record is missing"),
        "{err}"
    );
}

/// Appends records `from..from + n` of chain "gw-0" (runs "run-0" to "run-49"), 100 per
/// commit.
async fn append_runs(store: &SqliteStore, from: u64, n: u64, prev: &mut String) {
    let mut seq = from;
    while seq < from + n {
        let records = decide_records(seq, 100.min(from + n - seq), prev, |_| "t".into());
        seq += records.len() as u64;
        store.append(records).await.unwrap();
    }
}

/// The sequence numbers of `run`, as a query for it returns them.
async fn run_seqs(store: &SqliteStore, run: &str) -> Vec<u64> {
    let query = Query {
        run: Some(run.to_owned()),
        ..Default::default()
    };
    let records = store.query(&query).await.unwrap();
    assert!(records.iter().all(|r| r.index.run.as_deref() == Some(run)));
    records.iter().map(|r| r.seq).collect()
}

/// Changes a file to the layout before agents were indexed in levels: the run index's mark
/// and its own tail under their former names, and SQLite's index on (agent, time).
const BEFORE_AGENT_LEVELS: &str = "
    DROP TABLE tollgate_audit_agent_index;
    CREATE INDEX tollgate_audit_agent ON tollgate_audit_records (agent, time_us);
    ALTER TABLE tollgate_audit_indexed RENAME TO tollgate_audit_run_indexed;
    CREATE TABLE tollgate_audit_run_tail (rec INTEGER PRIMARY KEY, run TEXT NOT NULL);
    INSERT INTO tollgate_audit_run_tail SELECT rec, run FROM tollgate_audit_tail
        WHERE run IS NOT NULL;
    DROP TABLE tollgate_audit_tail;";

/// A file of `n` records of 50 runs in the layout before agents were indexed in levels,
/// then changed by `sql` (to make it a file from an earlier layout still); its directory,
/// path and last hash.
async fn file_of(n: u64, sql: &str) -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let mut prev = GENESIS.to_owned();
    {
        let store = SqliteStore::open(&path).unwrap();
        append_runs(&store, 1, n, &mut prev).await;
    }
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch(BEFORE_AGENT_LEVELS).unwrap();
    conn.execute_batch(sql).unwrap();
    (dir, path, prev)
}

/// The run index's mark and its number of entries in both levels.
fn run_index(path: &Path) -> (i64, i64) {
    let (mark, recent, index) = run_levels(path);
    (mark, recent + index)
}

/// The run index's mark, entries in its recent level and entries in the index itself.
fn run_levels(path: &Path) -> (i64, i64, i64) {
    Connection::open(path)
        .unwrap()
        .query_row(
            &format!(
                "SELECT {}, (SELECT COUNT(*) FROM {}), (SELECT COUNT(*) FROM {})",
                levels::MARK,
                RUNS.recent.as_ref().unwrap().table,
                RUNS.index
            ),
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
}

#[tokio::test]
async fn the_recent_level_is_swept_into_the_run_index_and_every_run_stays_whole() {
    let (_dir, path, store) = fresh_store();
    let mut prev = GENESIS.to_owned();
    let whole = |run: u64, through: u64| -> Vec<u64> {
        (1..=through).filter(|seq| seq % 50 == run).collect()
    };
    // Commits of 100 records of 50 runs: the tail goes to the recent level every 600, and
    // from 8,400 entries there sweeps move 1,024 per commit into the index, in run order,
    // while more come in. A run is whole after every commit, whichever levels hold it.
    let mut swept = false;
    for from in (1..=12_000).step_by(100) {
        append_runs(&store, from, 100, &mut prev).await;
        let through = from + 99;
        for run in [0, 7, 49] {
            assert_eq!(
                run_seqs(&store, &format!("run-{run}")).await,
                whole(run, through),
                "run-{run} after {through} records, levels {:?}",
                run_levels(&path)
            );
        }
        let (mark, recent, index) = run_levels(&path);
        assert_eq!(recent + index, mark, "after {through}");
        assert_eq!(mark as u64, through / 600 * 600);
        swept |= index > 0;
        if through == 8_400 {
            // The move that reached the limit started a sweep in the same commit.
            assert_eq!((recent, index), (8_400 - 1_024, 1_024));
        }
    }
    assert!(swept);
    // The sweep has ended: what is left came in behind it.
    assert_eq!(
        store.inner.indexed.lock().unwrap().runs,
        RUNS.read(&Connection::open(&path).unwrap()).unwrap()
    );
    let (_, recent, index) = run_levels(&path);
    assert!(
        recent < levels::RECENT_LIMIT && index >= 8_400,
        "{recent} {index}"
    );
    // The levels survive a reopening.
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(run_seqs(&store, "run-7").await, whole(7, 12_000));
}

#[tokio::test]
async fn a_file_whose_records_fill_the_recent_level_is_swept_whole_when_opened() {
    // A file from before the batched index: every record's entry is moved in on opening,
    // and sweeping 9,000 entries a chunk per commit would leave the level over its limit
    // (and every move into it touching many pages) for the first few thousand commits.
    let (_dir, path, _) = file_of(
        9_000,
        "DROP TABLE tollgate_audit_run_index; DROP TABLE tollgate_audit_run_indexed;
             DROP TABLE tollgate_audit_run_tail; DROP TABLE tollgate_audit_run_recent;",
    )
    .await;
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(run_levels(&path), (9_000, 0, 9_000));
    assert_eq!(
        store.inner.indexed.lock().unwrap().runs,
        levels::Levels::default()
    );
    let expected: Vec<u64> = (1..=9_000).filter(|seq| seq % 50 == 7).collect();
    assert_eq!(run_seqs(&store, "run-7").await, expected);
}

#[tokio::test]
async fn a_database_from_before_the_recent_level_keeps_its_run_index() {
    // As the former layout held them: the tail moved straight into the index.
    let (_dir, path, mut prev) = file_of(
        1234,
        "INSERT INTO tollgate_audit_run_index SELECT run, rec FROM tollgate_audit_run_recent;
         DROP TABLE tollgate_audit_run_recent;",
    )
    .await;
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(run_levels(&path), (1200, 0, 1200));
    // 34 records were left in the tail; the commit that takes it to 534 moves it.
    append_runs(&store, 1235, 600, &mut prev).await;
    assert_eq!(run_levels(&path), (1734, 534, 1200));
    let expected: Vec<u64> = (1..=1834).filter(|seq| seq % 50 == 7).collect();
    assert_eq!(run_seqs(&store, "run-7").await, expected);
}

#[tokio::test]
async fn a_run_is_found_whole_in_the_run_index_and_after_its_mark() {
    let (_dir, path, store) = fresh_store();
    let mut prev = GENESIS.to_owned();
    append_runs(&store, 1, 1234, &mut prev).await;
    // Commits of 100: the sixth took 600 records past the batch, the twelfth 600 more.
    assert_eq!(run_index(&path), (1200, 1200));
    for run in [0, 7, 34, 49] {
        let expected: Vec<u64> = (1..=1234).filter(|seq| seq % 50 == run).collect();
        assert_eq!(run_seqs(&store, &format!("run-{run}")).await, expected);
    }
    assert!(run_seqs(&store, "run-50").await.is_empty());
}

#[tokio::test]
async fn a_query_for_a_run_is_planned_once_not_at_every_call() {
    let (_dir, _, store) = fresh_store();
    let mut prev = GENESIS.to_owned();
    append_runs(&store, 1, 100, &mut prev).await;
    let query = |run: usize| Query {
        run: Some(format!("run-{run}")),
        agent: Some("ns/agent".into()),
        ..Default::default()
    };
    for run in 0..10 {
        store.query(&query(run)).await.unwrap();
    }
    // The statement the queries used, from the connection's cache: how often SQLite had to
    // parse and plan it again (each time the cache cleared its bindings, before the fix).
    let filter = Filter::of(&query(0));
    let reprepared = store
        .read(move |conn| {
            let statement = conn.prepare_cached(&format!("{} {}", from_run(), filter.sql))?;
            Ok(statement.get_status(rusqlite::StatementStatus::RePrepare))
        })
        .await
        .unwrap();
    assert_eq!(reprepared, 0);
}

#[tokio::test]
async fn a_query_for_a_run_starts_from_the_run_index_even_given_an_agent() {
    let (_dir, _, store) = fresh_store();
    let filter = Filter::of(&Query {
        run: Some("run-1".into()),
        agent: Some("ns/agent".into()),
        since_us: Some(0),
        ..Default::default()
    });
    let plan: Vec<String> = store
        .read(move |conn| {
            let mut statement =
                conn.prepare(&format!("EXPLAIN QUERY PLAN {} {}", from_run(), filter.sql))?;
            let rows = statement
                .query_map(params_from_iter(params(&filter)), |r| r.get::<_, String>(3))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
        .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("SEARCH tollgate_audit_run_index USING PRIMARY KEY (run=?)")
            && plan.contains("SEARCH tollgate_audit_run_recent USING PRIMARY KEY (run=?)")
            && plan.contains("SEARCH tollgate_audit_records USING INTEGER PRIMARY KEY (rowid=?)")
            && !plan.contains("tollgate_audit_agent"),
        "{plan}"
    );
}

#[test]
fn a_sweep_reads_the_recent_level_from_where_it_stopped() {
    // A chunk is a range of the primary key, not a scan of the level from its start.
    let (_dir, _, store) = fresh_store();
    let conn = store.inner.writer.lock().unwrap();
    let plan: String = conn
        .prepare(
            "EXPLAIN QUERY PLAN SELECT run, rec FROM tollgate_audit_run_recent
             WHERE (run, rec) > ('run-1', 5) AND (run, rec) <= ('run-9', 7) ORDER BY run, rec",
        )
        .unwrap()
        .query_map([], |r| r.get::<_, String>(3))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
        .join("\n");
    assert!(
        plan.contains("SEARCH tollgate_audit_run_recent USING PRIMARY KEY ((run,rec)>(?,?)")
            && !plan.contains("TEMP B-TREE"),
        "{plan}"
    );
}

/// The head at each sequence number of chain "gw-0" as the store holds it now (records
/// numbered from 1), for pruning through it.
async fn heads_of(store: &SqliteStore) -> impl Fn(u64) -> Head {
    let records = store.query(&Query::default()).await.unwrap();
    move |seq| Head {
        seq,
        hash: records[seq as usize - 1].hash.clone(),
    }
}

#[tokio::test]
async fn pruning_takes_its_records_out_of_the_run_index_and_lowers_the_mark() {
    let (_dir, path, store) = fresh_store();
    let mut prev = GENESIS.to_owned();
    append_runs(&store, 1, 1200, &mut prev).await;
    assert_eq!(run_index(&path), (1200, 1200));
    let head = heads_of(&store).await;
    store.prune("gw-0", &head(1000)).await.unwrap();
    assert_eq!(run_index(&path), (1200, 200));
    assert_eq!(run_seqs(&store, "run-7").await, [1007, 1057, 1107, 1157]);
    // Everything pruned: SQLite numbers the next rows from 1 again, below the old mark.
    store.prune("gw-0", &head(1200)).await.unwrap();
    assert_eq!(run_index(&path), (0, 0));
    append_runs(&store, 1201, 100, &mut prev).await;
    assert_eq!(run_seqs(&store, "run-7").await, [1207, 1257]);
}

#[tokio::test]
async fn a_database_with_the_former_run_index_is_indexed_when_opened() {
    let (_dir, path, mut prev) = file_of(
        600,
        "DROP TABLE tollgate_audit_run_index; DROP TABLE tollgate_audit_run_indexed;
         DROP TABLE tollgate_audit_run_tail; DROP TABLE tollgate_audit_run_recent;
         CREATE INDEX tollgate_audit_run ON tollgate_audit_records (run) WHERE run IS NOT NULL;",
    )
    .await;
    let store = SqliteStore::open(&path).unwrap();
    let former: i64 = Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'tollgate_audit_run'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(former, 0);
    assert_eq!(run_index(&path), (600, 600));
    let expected: Vec<u64> = (0..12).map(|i| 3 + 50 * i).collect();
    assert_eq!(run_seqs(&store, "run-3").await, expected);
    // Fewer than a batch after the mark stay out of the index until the next batch.
    append_runs(&store, 601, 300, &mut prev).await;
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(run_index(&path), (600, 600));
    assert_eq!(run_seqs(&store, "run-3").await.len(), 18);
    // A file without a tail (from before the run tail): the records after the mark are put
    // in it on opening.
    drop(store);
    Connection::open(&path)
        .unwrap()
        .execute_batch("DROP TABLE tollgate_audit_tail")
        .unwrap();
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(run_index(&path), (600, 600));
    let expected: Vec<u64> = (0..18).map(|i| 3 + 50 * i).collect();
    assert_eq!(run_seqs(&store, "run-3").await, expected);
}

/// Records `from..from + n` of chain "gw-0" for seven agents ("ns/agent-{seq % 7}"), at
/// `seq` milliseconds after the epoch, each a decision on "tool-{seq % 3}": allowed unless
/// `seq % 4 == 0`. Every third has no agent (as a malformed request's record has none);
/// all but every fifth have a run ("run-{seq % 11}").
fn agent_records(from: u64, n: u64, prev: &mut String) -> Vec<Record> {
    use tollgate_engine::{Decision, DenyCode, RuleRef};
    (from..from + n)
        .map(|seq| {
            let time = jiff::Timestamp::from_millisecond(seq as i64).unwrap();
            let mut entry = Entry::new(time, Event::Decide, Identity::default());
            entry.agent = (seq % 3 != 2).then(|| format!("ns/agent-{}", seq % 7));
            entry.run = (seq % 5 != 0).then(|| format!("run-{}", seq % 11));
            entry.tool = Some(format!("tool-{}", seq % 3));
            let rule = RuleRef {
                policy: "ns/policy".into(),
                generation: Some(1),
                policy_hash: "sha256:00".into(),
                tool: None,
                clause: "spec.tools".into(),
            };
            entry.decision = Some(if seq % 4 == 0 {
                Decision::Deny {
                    code: DenyCode::ToolNotAllowed,
                    rule,
                    message: "no".into(),
                }
            } else {
                Decision::Allow {
                    rule,
                    review: false,
                }
            });
            let record = Record::seal("gw-0", seq, prev, &entry);
            prev.clone_from(&record.hash);
            record
        })
        .collect()
}

/// Appends [`agent_records`] `from..from + n`, 100 per commit.
async fn append_agents(store: &SqliteStore, from: u64, n: u64, prev: &mut String) {
    let mut seq = from;
    while seq < from + n {
        let records = agent_records(seq, 100.min(from + n - seq), prev);
        seq += records.len() as u64;
        store.append(records).await.unwrap();
    }
}

/// A query for an agent's records, and what it should answer: the same conditions read
/// from the records table itself, which has no index on agents.
async fn agent_query(store: &SqliteStore, path: &Path, agent: u64, since: u64, until: Option<u64>) {
    let query = Query {
        agent: Some(format!("ns/agent-{agent}")),
        since_us: Some(since as i64 * 1000),
        until_us: until.map(|until| until as i64 * 1000),
        ..Default::default()
    };
    let found = found_seqs(store, &query).await;
    let filter = Filter::of(&query);
    let conn = Connection::open(path).unwrap();
    let scanned: Vec<u64> = records(
        &conn,
        &format!(
            "SELECT {COLUMNS} FROM tollgate_audit_records {}",
            filter.sql
        ),
        params(&filter),
    )
    .unwrap()
    .iter()
    .map(|r| r.seq)
    .collect();
    assert!(!scanned.is_empty(), "{query:?}");
    assert_eq!(found, scanned, "{query:?}, levels {:?}", agent_index(path));
    let mut outcomes = store
        .outcomes(&format!("ns/agent-{agent}"), since as i64 * 1000)
        .await
        .unwrap();
    outcomes.sort_by(|a, b| (&a.tool, &a.outcome).cmp(&(&b.tool, &b.outcome)));
    let expected: Vec<(String, String, u64)> = conn
        .prepare(crate::sql::OUTCOMES)
        .unwrap()
        .query_map(
            rusqlite::params![format!("ns/agent-{agent}"), since as i64 * 1000],
            |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)),
        )
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let outcomes: Vec<(String, String, u64)> = outcomes
        .into_iter()
        .map(|o| (o.tool, o.outcome, o.count))
        .collect();
    assert_eq!(outcomes, expected);
}

/// The sequence numbers of what `query` finds in `store`.
async fn found_seqs(store: &SqliteStore, query: &Query) -> Vec<u64> {
    store
        .query(query)
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect()
}

/// The mark and the agent index's entries (it has no recent level).
fn agent_index(path: &Path) -> (i64, i64) {
    assert!(AGENTS.recent.is_none());
    Connection::open(path)
        .unwrap()
        .query_row(
            &format!(
                "SELECT {}, (SELECT COUNT(*) FROM {})",
                levels::MARK,
                AGENTS.index
            ),
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
}

/// Records with an agent among the first `n` of [`agent_records`].
fn with_agent(n: i64) -> i64 {
    n - (n + 1) / 3
}

#[tokio::test]
async fn an_agent_is_found_whole_in_the_agent_index_and_the_tail_its_runs_share() {
    let (_dir, path, store) = fresh_store();
    let mut prev = GENESIS.to_owned();
    // Commits of 100: the tail goes into the agent index and the run index's recent level
    // every 600 records, and at 12,600 (10,080 entries, four in five records have a run) a
    // sweep of the runs' recent level starts. Queries for a window of an agent answer what
    // the records table holds, before, during and after it.
    let mut swept = false;
    for from in (1..=15_000).step_by(100) {
        append_agents(&store, from, 100, &mut prev).await;
        let through = from + 99;
        if through % 700 == 0 || (12_500..=13_500).contains(&through) {
            for (agent, since, until) in [
                (0, 1, None),
                (3, through / 2, None),
                (6, through / 3, Some(through - 50)),
            ] {
                agent_query(&store, &path, agent, since, until).await;
            }
        }
        let (mark, index) = agent_index(&path);
        assert_eq!(index, with_agent(mark), "after {through}");
        // The same records' runs, from the same tail.
        let (_, recent, index) = run_levels(&path);
        assert_eq!(recent + index, mark - mark / 5, "after {through}");
        if through % 1_500 == 0 {
            let run: Vec<u64> = (1..=through)
                .filter(|seq| seq % 5 != 0 && seq % 11 == 4)
                .collect();
            assert_eq!(run_seqs(&store, "run-4").await, run);
        }
        assert_eq!(mark as u64, through / 600 * 600);
        swept |= index > 0 && recent < mark - mark / 5;
    }
    assert!(swept);
    assert_eq!(
        *store.inner.indexed.lock().unwrap(),
        Indexed::read(&Connection::open(&path).unwrap()).unwrap()
    );
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    agent_query(&store, &path, 4, 0, None).await;
}

#[tokio::test]
async fn a_database_with_the_former_agent_index_is_indexed_when_opened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let mut prev = GENESIS.to_owned();
    {
        let store = SqliteStore::open(&path).unwrap();
        append_agents(&store, 1, 13_000, &mut prev).await;
    }
    Connection::open(&path)
        .unwrap()
        .execute_batch(BEFORE_AGENT_LEVELS)
        .unwrap();
    let store = SqliteStore::open(&path).unwrap();
    let conn = Connection::open(&path).unwrap();
    let former: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE name IN \
             ('tollgate_audit_agent', 'tollgate_audit_run_indexed', 'tollgate_audit_run_tail')",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(former.is_empty(), "{former:?}");
    // The records the run index's mark covered went straight into the agent index; the 400
    // after it are in the tail, as their runs are.
    assert_eq!(agent_index(&path), (12_600, with_agent(12_600)));
    assert_eq!(run_levels(&path).0, 12_600);
    assert_eq!(
        *store.inner.indexed.lock().unwrap(),
        Indexed::read(&conn).unwrap()
    );
    agent_query(&store, &path, 5, 0, None).await;
    agent_query(&store, &path, 2, 4_000, Some(12_900)).await;
    append_agents(&store, 13_001, 700, &mut prev).await;
    // The commit that took the records after the mark to 600 moved them.
    assert_eq!(agent_index(&path), (13_200, with_agent(13_200)));
    agent_query(&store, &path, 5, 12_000, None).await;
}

#[tokio::test]
async fn agent_levels_with_a_mark_of_their_own_are_built_again() {
    // As two development commits left them: entries in a recent level and a tail of the
    // agent index's own, which this layout does not read.
    let (_dir, path, _) = file_of(
        1_000,
        "CREATE TABLE tollgate_audit_agent_indexed (one INTEGER PRIMARY KEY, through INTEGER);
         CREATE TABLE tollgate_audit_agent_recent (agent TEXT, time_us INTEGER, rec INTEGER);
         CREATE TABLE tollgate_audit_agent_index (agent TEXT, time_us INTEGER, rec INTEGER);
         UPDATE tollgate_audit_records SET agent = 'ns/agent-' || (seq % 7);",
    )
    .await;
    let store = SqliteStore::open(&path).unwrap();
    let tables: i64 = Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name IN \
             ('tollgate_audit_agent_indexed', 'tollgate_audit_agent_recent')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 0);
    // The records the mark covers are in the index, those after it in the tail.
    assert_eq!(agent_index(&path), (600, 600));
    let query = Query {
        agent: Some("ns/agent-3".into()),
        ..Default::default()
    };
    let found = found_seqs(&store, &query).await;
    let expected: Vec<u64> = (1..=1_000).filter(|seq| seq % 7 == 3).collect();
    assert_eq!(found, expected);
}

#[tokio::test]
async fn a_query_for_an_agent_reads_its_index_by_key_and_no_other_records() {
    let (_dir, _, store) = fresh_store();
    let filter = Filter::of(&Query {
        agent: Some("ns/agent".into()),
        tool: Some("t".into()),
        since_us: Some(0),
        until_us: Some(10),
        ..Default::default()
    });
    let select = from_agent(&filter).unwrap();
    let plans: Vec<String> = store
        .read(move |conn| {
            let mut plans = Vec::new();
            for (sql, params) in [
                (
                    format!("{select} {}", filter.sql),
                    params(&filter).collect::<Vec<_>>(),
                ),
                (
                    OUTCOMES.clone(),
                    vec!["ns/agent".to_owned().into(), 0.into()],
                ),
            ] {
                let mut statement = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                let rows =
                    statement.query_map(params_from_iter(params), |r| r.get::<_, String>(3))?;
                plans.push(rows.collect::<Result<Vec<_>, _>>()?.join("\n"));
            }
            Ok(plans)
        })
        .await
        .unwrap();
    for (plan, bounds) in plans.iter().zip([
        "(agent=? AND time_us>? AND time_us<?)",
        "(agent=? AND time_us>?)",
    ]) {
        assert!(
            plan.contains(&format!(
                "SEARCH tollgate_audit_agent_index USING PRIMARY KEY {bounds}"
            )) && plan.contains("SEARCH tollgate_audit_tail USING INTEGER PRIMARY KEY (rowid>?)")
                && plan
                    .contains("SEARCH tollgate_audit_records USING INTEGER PRIMARY KEY (rowid=?)")
                && !plan.contains("SCAN tollgate_audit_records")
                && !plan.contains("tollgate_audit_time"),
            "{plan}"
        );
    }
}

#[tokio::test]
async fn pruning_takes_its_records_out_of_the_agent_index_and_lowers_the_mark() {
    let (_dir, path, store) = fresh_store();
    let mut prev = GENESIS.to_owned();
    append_agents(&store, 1, 1_300, &mut prev).await;
    assert_eq!(agent_index(&path), (1_200, with_agent(1_200)));
    let head = heads_of(&store).await;
    store.prune("gw-0", &head(1_000)).await.unwrap();
    assert_eq!(
        agent_index(&path),
        (1_200, with_agent(1_200) - with_agent(1_000))
    );
    agent_query(&store, &path, 1, 0, None).await;
    // Everything pruned: SQLite numbers the next rows from 1 again, below the old mark.
    store.prune("gw-0", &head(1_300)).await.unwrap();
    assert_eq!(agent_index(&path), (0, 0));
    append_agents(&store, 1_301, 100, &mut prev).await;
    agent_query(&store, &path, 1, 0, None).await;
}

#[tokio::test]
async fn a_body_that_is_not_text_fails_as_altered() {
    let (_dir, path, store) = fresh_store();
    chain_of(&store, 5000).await;
    Connection::open(&path)
        .unwrap()
        .execute_batch(
            "UPDATE tollgate_audit_records SET body = CAST(x'ff' || CAST(body AS BLOB) AS TEXT) WHERE seq = 4321",
        )
        .unwrap();
    let err = crate::verify(&store, false, &Default::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("record 4321: record was altered"),
        "{err}"
    );
}

#[test]
fn the_checkpoint_thread_is_woken_per_threshold_written_not_per_commit() {
    let mib = 1 << 20;
    // A fresh WAL: woken once the threshold is reached.
    assert!(!checkpoint_due(CHECKPOINT_BYTES - 1, 0));
    assert!(checkpoint_due(CHECKPOINT_BYTES, 0));
    // The last pass reached 20 MiB and the WAL could not start over (the writer kept
    // committing): the next commits do not wake it again until another threshold is written.
    assert!(!checkpoint_due(20 * mib + mib, 20 * mib));
    assert!(checkpoint_due(20 * mib + CHECKPOINT_BYTES, 20 * mib));
    // The WAL started over after a complete checkpoint: counted from its start again.
    assert!(!checkpoint_due(mib, 20 * mib));
    assert!(checkpoint_due(CHECKPOINT_BYTES, 20 * mib));
}

#[test]
fn the_writer_starts_the_wal_over_once_the_checkpoint_thread_has_nearly_caught_up() {
    let limit = WAL_LIMIT_BYTES;
    let commit = 64 << 10;
    // Under the limit: never, however little is left.
    assert_eq!(restart_due(limit - 1, limit - 1, commit), None);
    // Past it with a whole pass left: the thread copies first (it used to be the writer,
    // with the appenders waiting).
    assert_eq!(
        restart_due(limit + commit, limit - CHECKPOINT_BYTES, commit),
        None
    );
    // Past it with at most the slack left, or two commits when commits are larger.
    assert_eq!(
        restart_due(limit + commit, limit + commit - RESTART_SLACK_BYTES, commit),
        Some(Restart::IfIdle)
    );
    let big = 4 << 20;
    assert_eq!(
        restart_due(limit + big, limit - big, big),
        Some(Restart::IfIdle)
    );
    assert_eq!(restart_due(limit + big, limit - 2 * big, big), None);
    // A WAL that started over since the thread's last pass counts from its start.
    assert_eq!(restart_due(limit + commit, 2 * limit, commit), None);
    // At twice the limit the writer copies whatever is left, waiting for a pass.
    assert_eq!(restart_due(2 * limit, 0, commit), Some(Restart::Wait));
}

#[test]
fn a_range_read_after_a_short_one_is_dropped() {
    let sealed = |seqs: std::ops::RangeInclusive<u64>| -> Vec<Sealed> {
        seqs.map(|seq| Sealed::of_stored("gw-0", seq, b"", b"", b"decide", b"{}"))
            .collect()
    };
    let ranges = [(0, 4), (4, 8), (8, 12)];
    // The first connection saw the chain end at 3; the second, a moment later, saw 5 to 8
    // appended. Keeping both would look like a record 4 was deleted.
    let (page, last) =
        dense_prefix(vec![sealed(1..=3), sealed(5..=8), vec![]], &ranges, 0, 12).unwrap();
    assert_eq!(seqs(&page), "1-3");
    assert_eq!(last, 3);
    let (page, last) = dense_prefix(
        vec![sealed(1..=4), sealed(5..=8), sealed(9..=12)],
        &ranges,
        0,
        12,
    )
    .unwrap();
    assert_eq!((seqs(&page).as_str(), last), ("1-12", 12));
    let (page, last) = dense_prefix(vec![vec![], sealed(5..=8), vec![]], &ranges, 0, 12).unwrap();
    assert_eq!((page.len(), last), (0, 0));
}

#[tokio::test] // one thread runs every task of this runtime
async fn the_writer_commits_off_the_runtime_and_goes_on_from_the_store_after_a_conflict() {
    let (_dir, path, store) = fresh_store();
    let (log, _) = crate::AuditLog::open(Arc::new(store), crate::WriterConfig::new("gw-0"))
        .await
        .unwrap();
    let entry = || Entry::new(jiff::Timestamp::now(), Event::Decide, Identity::default());
    let first = log.append(entry()).await.unwrap();
    assert_eq!(first.seq, 1);

    // Another connection takes the write lock and writes record 2 itself.
    let other = open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut prev = first.hash;
    let foreign = decide_records(2, 1, &mut prev, |_| "foreign".to_owned()).remove(0);
    other
        .execute(
            &format!("INSERT INTO tollgate_audit_records ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"),
            rusqlite::params![
                foreign.chain,
                2,
                foreign.prev,
                foreign.hash,
                foreign.index.time_us,
                foreign.index.event,
                foreign.index.agent,
                foreign.index.run,
                foreign.index.tool,
                foreign.index.outcome,
                foreign.body,
            ],
        )
        .unwrap();
    // The writer's commit of what it numbers 2 waits for the lock; the runtime's only thread
    // still runs timers and tasks meanwhile: the commit blocks the writer's thread only.
    let waiting = tokio::spawn({
        let log = log.clone();
        async move { log.append(entry()).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "the commit did not wait for the lock"
    );
    other.execute_batch("COMMIT").unwrap();

    let refused = waiting.await.unwrap().unwrap_err().to_string();
    assert!(
        refused.contains("already has a record 2"),
        "unexpected error: {refused}"
    );
    // The writer read its head back from the store: the next record follows the one it
    // found there.
    let next = log.append(entry()).await.unwrap();
    assert_eq!(next.seq, 3);
    let records = SqliteStore::open(&path)
        .unwrap()
        .scan("gw-0", 0, 10)
        .await
        .unwrap();
    assert_eq!(records[2].prev, foreign.hash);
}

#[tokio::test]
async fn a_chain_verifies_while_its_writer_appends() {
    // Ranges read on several connections may see different snapshots while the writer
    // appends; no page may look as if records were missing.
    let (_dir, _, store) = fresh_store();
    let mut prev = chain_of(&store, 3000).await;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for from in (3001..23_000).step_by(10) {
                let batch = decide_records(from, 10, &mut prev, |seq| format!("tool-{seq}"));
                store.append(batch).await.unwrap();
            }
        })
    };
    let mut runs = 0;
    while !writer.is_finished() {
        crate::verify(&store, false, &Default::default())
            .await
            .unwrap();
        runs += 1;
    }
    writer.await.unwrap();
    assert!(runs > 1, "verification ran {runs} time(s) while appending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_opens_beside_a_writer_appending_to_the_same_file() {
    // The CLI, a test or a second process opens a file a gateway is writing. Opening brings
    // the levels up to date in a transaction that reads first: deferred, it failed at once
    // with "database is locked" when the writer committed between its read and its write.
    let (_dir, path, store) = fresh_store();
    let mut prev = chain_of(&store, 100).await;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for from in (101..40_000).step_by(5) {
                let batch = decide_records(from, 5, &mut prev, |seq| format!("tool-{seq}"));
                store.append(batch).await.unwrap();
            }
        })
    };
    let mut opened = 0;
    while !writer.is_finished() {
        let path = path.clone();
        tokio::task::spawn_blocking(move || SqliteStore::open(path))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("open #{opened} beside the writer: {e}"));
        opened += 1;
    }
    writer.await.unwrap();
    assert!(opened > 1, "opened {opened} time(s) while appending");
}

#[tokio::test]
async fn the_checkpoint_thread_copies_the_wal_back_without_a_commit_waiting() {
    let (_dir, path, store) = fresh_store();
    let mut prev = GENESIS.to_owned();
    for i in 0..8 {
        store
            .append(batch(1 + i * 500, 500, &mut prev))
            .await
            .unwrap();
    }
    // About 10 MB went into the WAL; no commit checkpointed (the writer's automatic
    // checkpoint is off), so the database file grows only through the thread.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let size = std::fs::metadata(&path).unwrap().len();
        if size > 8_000_000 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "database file still {size} bytes: the WAL was not checkpointed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let records = store.scan("gw-0", 0, 10_000).await.unwrap();
    assert_eq!(records.len(), 4000);
    assert_eq!(records.last().unwrap().hash, prev);
}

#[tokio::test]
async fn the_wal_starts_over_under_sustained_appends() {
    let (_dir, path, store) = fresh_store();
    let mut prev = GENESIS.to_owned();
    // About 150 MB in commits back to back of about 4 MB each: four times the WAL limit.
    // Without the writer's own checkpoint at the limit the WAL reached 90 MB after 100 MB.
    // The largest growth of the WAL by one commit, from the writer's own count.
    let mut commit = 0;
    let mut before = 0;
    for i in 0..60 {
        store
            .append(batch(1 + i * 1000, 1000, &mut prev))
            .await
            .unwrap();
        let now = store.inner.wal_bytes.load(Ordering::Relaxed);
        commit = commit.max(now - before);
        before = now;
    }
    let wal = std::fs::metadata(path.with_extension("db-wal"))
        .unwrap()
        .len();
    // What `restart_due` guarantees whatever the scheduling: at twice the limit the writer
    // waits for a running pass and starts the WAL over, so it never holds more than twice the
    // limit plus the commit that crosses it and the one after (each frame is a page and a
    // 24-byte header). Usually it starts over just past the limit, when the checkpoint thread
    // keeps up; how often is the thread's speed, which a benchmark measures, not this test
    // (it failed twice in a day here at 44.3 and 54 MB against a tighter bound of the limit
    // plus two commits). Without any restart the WAL would hold all 150 MB.
    let page: i64 = Connection::open(&path)
        .unwrap()
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .unwrap();
    let frames = (2 * WAL_LIMIT_BYTES + 2 * commit) / page;
    let bound = (frames * (page + 24) + 32) as u64;
    assert!(
        wal <= bound,
        "WAL file {wal} bytes, bound {bound} (commits of up to {commit} bytes)"
    );
    assert_eq!(store.scan("gw-0", 59_990, 100).await.unwrap().len(), 10);
}
