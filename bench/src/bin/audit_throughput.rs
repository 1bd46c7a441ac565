//! Audit trail throughput: durable appends per second through the group-commit writer on SQLite
//! and on a real PostgreSQL server, beside a plain batched INSERT of the same rows with no chain
//! (the floor each store sets), and verification throughput.
//!
//! `cargo run --release --manifest-path bench/Cargo.toml --bin audit-throughput [RECORDS] [sqlite|postgres|memory|sequential|verify]`
//!
//! The records come from 1,000 runs of one agent; `AGENTS=N` spreads them over N agents.
//! `SQLITE_ONLY=1` leaves PostgreSQL out; `KEEP=PATH` keeps the store `verify` fills.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde_json::json;
use tollgate_audit::record::GENESIS;
use tollgate_audit::verify::ChainVerifier;
use tollgate_audit::{
    AuditLog, Counters, Entry, Event, Identity, PolicyRef, PostgresStore, Record, Redactor,
    SqliteStore, Store, WriterConfig, verify,
};
use tollgate_engine::{Decision, RuleRef};

/// The allocator `tollgate-webhook` uses (verification, which the CLI runs on the system
/// allocator, measured the same with either).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How many agents the records are spread over, round robin (`AGENTS`, 1 unless set); runs are
/// spread over 1,000 whatever it is.
fn agents() -> u64 {
    static AGENTS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *AGENTS.get_or_init(|| {
        std::env::var("AGENTS").map_or(1, |n| n.parse().expect("AGENTS is a number"))
    })
}

/// A realistic decide record: identity, redacted arguments and digest, decision, counters.
fn entry(i: u64, redactor: &Redactor) -> Entry {
    let mut entry = Entry::new(
        Timestamp::now(),
        Event::Decide,
        Identity {
            username: "system:serviceaccount:support:agent-support-agent-v2".into(),
            pod: Some("support-agent-5d8f9c7b6-x2k4q".into()),
            token_id: Some("0b7e3a4c-6f1d-4c1e-9a55-2f4e8d7c1b90".into()),
        },
    );
    entry.agent = Some(match agents() {
        1 => "support/support-agent-v2".into(),
        n => format!("support/support-agent-{}", i % n),
    });
    entry.run = Some(format!("run-{}", i % 1000));
    entry.step = Some(i / 1000 + 1);
    entry.tool = Some("update_order_status".into());
    entry.set_arguments(
        redactor,
        &json!({"status": "refunded", "order_ids": ["O-1001", "O-1002"], "apiKey": "sk-live-1"}),
    );
    entry.decision = Some(Decision::Allow {
        rule: RuleRef {
            policy: "support/support-agent-v2".into(),
            generation: Some(3),
            policy_hash: "sha256:adaf035b0418a710f50ce0999330b201f0a28561d884ec923382756699f6dbed"
                .into(),
            tool: Some("update_order_status".into()),
            clause: "spec.tools.allowed[update_order_status]".into(),
        },
        review: false,
    });
    entry.policy = Some(PolicyRef {
        name: "support/support-agent-v2".into(),
        hash: "sha256:adaf035b0418a710f50ce0999330b201f0a28561d884ec923382756699f6dbed".into(),
        generation: Some(3),
    });
    entry.counters = Some(Counters {
        steps: i / 1000 + 1,
        tokens: 1200,
        cost_usd: "0.0180".into(),
    });
    entry.latency_us = Some(41);
    entry
}

struct Appends {
    per_second: f64,
    p50: Duration,
    p99: Duration,
    /// Bytes handed to write calls per record (`wchar` of /proc/PID/io) by the processes that
    /// write the store: for SQLite this one (the WAL frames and the checkpoints' pages), for
    /// PostgreSQL the server's (its WAL, tables and indexes; what this process sends it over a
    /// socket is not counted there).
    written_per_record: f64,
    /// Of those, what the SQLite checkpoint thread wrote (its passes' copies into the database
    /// file), per record.
    checkpoint_per_record: Option<f64>,
    /// Records per commit, from the writer's observer.
    records_per_commit: f64,
}

/// Bytes passed to write calls so far by each of this process's threads named `name` (as the
/// kernel keeps it, cut to 15 bytes), by thread id (`wchar` in /proc/self/task/TID/io).
fn thread_written(name: &str) -> BTreeMap<String, u64> {
    let name = &name[..name.len().min(15)];
    std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|tid| {
            std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                .is_ok_and(|comm| comm.trim() == name)
        })
        .filter_map(|tid| {
            let io = std::fs::read_to_string(format!("/proc/self/task/{tid}/io")).ok()?;
            let wchar = io
                .lines()
                .find_map(|line| line.strip_prefix("wchar:"))?
                .trim()
                .parse()
                .ok()?;
            Some((tid, wchar))
        })
        .collect()
}

/// What the threads in `after` wrote since `before` (threads that ended in between are left out).
fn written_since(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> u64 {
    after
        .iter()
        .map(|(tid, n)| n.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

/// Counts the writer's commits and the records in them.
#[derive(Default)]
struct Commits(std::sync::atomic::AtomicU64);

impl tollgate_audit::Observer for Commits {
    fn batch(&self, _: &tollgate_audit::Batch) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The processes that do a store's work: whose writes its appends cause and whose CPU its
/// reads take.
#[derive(Debug, Clone, Copy)]
enum Processes {
    /// This process (an embedded store).
    Own,
    /// A PostgreSQL server: its postmaster and the processes it started (backends, WAL writer,
    /// checkpointer), which stay up through a run.
    Server(u32),
}

impl Processes {
    /// The PostgreSQL server of the e2e harness, from `postmaster.pid` in its data directory.
    fn postgres(server: &tollgate_e2e::postgres::Postgres) -> Self {
        let pid = std::fs::read_to_string(server.dir().join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse().ok())
            .expect("read the PostgreSQL server's pid from postmaster.pid");
        Processes::Server(pid)
    }

    /// The /proc entries of the processes.
    fn pids(self) -> Vec<String> {
        match self {
            Processes::Own => vec!["self".to_owned()],
            Processes::Server(postmaster) => {
                let children = std::fs::read_dir("/proc")
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|pid| {
                        stat_fields(pid)
                            .get(1)
                            .and_then(|ppid| ppid.parse::<u32>().ok())
                            == Some(postmaster)
                    });
                std::iter::once(postmaster.to_string())
                    .chain(children)
                    .collect()
            }
        }
    }

    /// Bytes the processes have passed to write calls so far (`wchar` in /proc/PID/io).
    fn written(self) -> u64 {
        self.pids()
            .iter()
            .map(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/io"))
                    .unwrap_or_default()
                    .lines()
                    .find_map(|line| line.strip_prefix("wchar:"))
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// CPU time the processes used so far (user and system), in seconds.
    fn cpu_seconds(self) -> f64 {
        let ticks: f64 = self
            .pids()
            .iter()
            .map(|pid| {
                // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name.
                stat_fields(pid).get(11..13).map_or(0.0, |t| {
                    t.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
                })
            })
            .sum();
        ticks / 100.0
    }
}

/// The fields of /proc/PID/stat after the command name (the state first, then the parent's pid).
fn stat_fields(pid: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            Some(rest.split_whitespace().map(str::to_owned).collect())
        })
        .unwrap_or_default()
}

/// `records` appends from `writers` concurrent tasks; each append returns once durable.
async fn appends<S: Store>(
    store: Arc<S>,
    chain: &str,
    records: u64,
    window: Duration,
    writers: u64,
    io: Processes,
) -> Appends {
    let commits = Arc::new(Commits::default());
    let mut config = WriterConfig::new(chain).with_observer(commits.clone());
    config.window = window;
    let (log, _task) = AuditLog::open(store, config)
        .await
        .expect("open the writer");
    let redactor = Arc::new(Redactor::default());
    let written = io.written();
    let checkpoints = thread_written(CHECKPOINT_THREAD);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let log = log.clone();
        let redactor = redactor.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = w;
            while i < records {
                let entry = entry(i, &redactor);
                let t = Instant::now();
                log.append(entry).await.expect("append");
                latencies.push(t.elapsed());
                i += writers;
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    Appends {
        per_second: records as f64 / elapsed.as_secs_f64(),
        p50: latencies[latencies.len() / 2],
        p99: latencies[latencies.len() * 99 / 100],
        written_per_record: io.written().saturating_sub(written) as f64 / records as f64,
        checkpoint_per_record: matches!(io, Processes::Own).then(|| {
            written_since(&checkpoints, &thread_written(CHECKPOINT_THREAD)) as f64 / records as f64
        }),
        records_per_commit: records as f64
            / commits.0.load(std::sync::atomic::Ordering::Relaxed).max(1) as f64,
    }
}

/// The name of the SQLite store's checkpoint thread.
const CHECKPOINT_THREAD: &str = "audit-checkpoint";

/// The same rows, sealed up front, committed in batches of 4096 straight through the store.
async fn floor<S: Store>(store: &S, chain: &str, records: u64) -> f64 {
    let redactor = Redactor::default();
    let mut prev = GENESIS.to_owned();
    let rows: Vec<Record> = (0..records)
        .map(|i| {
            let record = Record::seal(chain, i + 1, &prev, &entry(i, &redactor));
            prev.clone_from(&record.hash);
            record
        })
        .collect();
    // Copies are made before the clock starts.
    let batches: Vec<Vec<Record>> = rows.chunks(4096).map(<[Record]>::to_vec).collect();
    let start = Instant::now();
    for batch in batches {
        store.append(batch).await.expect("append");
    }
    records as f64 / start.elapsed().as_secs_f64()
}

async fn verify_rate<S: Store>(store: &S) -> (u64, f64) {
    let start = Instant::now();
    let reports = verify(store, false, &BTreeMap::new())
        .await
        .expect("verifies");
    let records: u64 = reports.iter().map(|r| r.records).sum();
    (records, records as f64 / start.elapsed().as_secs_f64())
}

fn in_memory_verify(records: u64) -> f64 {
    let redactor = Redactor::default();
    let mut prev = GENESIS.to_owned();
    let t = Instant::now();
    let entries: Vec<Entry> = (0..records).map(|i| entry(i, &redactor)).collect();
    println!(
        "build entries: {:.2} µs each",
        t.elapsed().as_secs_f64() * 1e6 / records as f64
    );
    let t = Instant::now();
    let rows: Vec<Record> = entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let i = i as u64;
            let record = Record::seal("mem", i + 1, &prev, entry);
            prev.clone_from(&record.hash);
            record
        })
        .collect();
    println!(
        "seal: {:.2} µs each",
        t.elapsed().as_secs_f64() * 1e6 / records as f64
    );
    let bytes: usize = rows.iter().map(|r| r.body.len()).sum();
    println!(
        "record body: {} bytes on average",
        bytes / rows.len().max(1)
    );
    let start = Instant::now();
    let mut verifier = ChainVerifier::new("mem", None, false, None);
    for page in rows.chunks(tollgate_audit::verify::PAGE) {
        verifier.push_all(page).expect("verifies");
    }
    verifier.finish().expect("verifies");
    records as f64 / start.elapsed().as_secs_f64()
}

fn report(name: &str, a: &Appends, floor: f64, writers: u64, window: Duration) {
    println!(
        "{name:<40} {:>9.0} appends/s  p50 {:>7.2} ms  p99 {:>7.2} ms  {:>6.1} records/commit  written {:>5.1} KB/record{}  (plain batched INSERT: {:>9.0} rows/s, ratio {:.2})",
        a.per_second,
        a.p50.as_secs_f64() * 1e3,
        a.p99.as_secs_f64() * 1e3,
        a.records_per_commit,
        a.written_per_record / 1e3,
        a.checkpoint_per_record.map_or(String::new(), |c| format!(
            " (checkpoint thread {:.1})",
            c / 1e3
        )),
        floor,
        a.per_second / floor
    );
    if window.is_zero() {
        let store = name.split(',').next().unwrap_or(name);
        let store = if store == "sqlite" { "SQLite" } else { "PostgreSQL" };
        tollgate_bench::report(
            "audit-throughput",
            &format!("Audit appends, {store}, {writers} tasks: appends/s"),
            a.per_second,
            "the same rows by batched INSERT",
            floor,
            "/s",
            tollgate_bench::Better::Higher,
        );
    }
}

/// (commit window, concurrent appending tasks) measured on each store.
const CASES: [(Duration, u64); 4] = [
    (Duration::ZERO, 256),
    (Duration::ZERO, 1024),
    (Duration::ZERO, 2048),
    (Duration::from_millis(2), 2048),
];

/// [`CASES`], or, given `TASKS=N,M,…`, those numbers of tasks with no commit window (fewer
/// tasks make smaller commits, as a gateway's are).
fn cases() -> Vec<(Duration, u64)> {
    match std::env::var("TASKS") {
        Ok(list) => list
            .split(',')
            .map(|n| {
                (
                    Duration::ZERO,
                    n.trim().parse().expect("TASKS is a list of numbers"),
                )
            })
            .collect(),
        Err(_) => CASES.to_vec(),
    }
}

/// `n` times: 4 KiB written over a block of a file already on disk (as a WAL that starts over
/// is), then `fdatasync`. The p50 and p99 of one round.
fn disk_sync(path: &std::path::Path, n: usize) -> (Duration, Duration) {
    use std::io::{Seek, SeekFrom, Write};
    let mut file = std::fs::File::create(path).unwrap();
    let block = [0x5au8; 4096];
    for _ in 0..64 {
        file.write_all(&block).unwrap();
    }
    file.sync_all().unwrap();
    let mut times: Vec<Duration> = (0..n)
        .map(|i| {
            let t = Instant::now();
            file.seek(SeekFrom::Start((i % 64) as u64 * 4096)).unwrap();
            file.write_all(&block).unwrap();
            file.sync_data().unwrap();
            t.elapsed()
        })
        .collect();
    times.sort_unstable();
    (times[n / 2], times[n * 99 / 100])
}

#[tokio::main]
async fn main() {
    let records: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("RECORDS is a number"))
        .unwrap_or(200_000);
    let only = std::env::args().nth(2).unwrap_or_else(|| "all".to_owned());
    let run = |part: &str| only == "all" || only == part;
    println!("{}", tollgate_bench::machine_reference());
    println!("{records} records per run; every append is acknowledged only once durable\n");

    let dir = tempfile::tempdir().unwrap();
    // Verification rates, reported beside the chain check in memory once that ran.
    let mut verified: Vec<(&str, f64)> = Vec::new();
    if run("sqlite") {
        let floor_store = SqliteStore::open(dir.path().join("floor.db")).unwrap();
        let sqlite_floor = floor(&floor_store, "gw-0", records).await;
        for (i, (window, writers)) in cases().into_iter().enumerate() {
            let store =
                Arc::new(SqliteStore::open(dir.path().join(format!("audit-{i}.db"))).unwrap());
            let a = appends(
                store.clone(),
                "gw-0",
                records,
                window,
                writers,
                Processes::Own,
            )
            .await;
            report(
                &format!("sqlite, {writers} tasks, window {window:?}"),
                &a,
                sqlite_floor,
                writers,
                window,
            );
            if i == 0 {
                let (n, rate) = verify_rate(store.as_ref()).await;
                println!(
                    "{:<40} {rate:>9.0} records/s ({n} records)",
                    "sqlite verify"
                );
                verified.push(("SQLite", rate));
            }
        }
    }

    if run("sqlite") || run("sequential") {
        // One append at a time: each waits for its own commit (the latency floor of a call that
        // must be recorded before it is answered).
        // Then on tmpfs, where fsync returns at once: the writer's own share of that latency.
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let mut one_at_a_time = None;
        for (name, dir) in [
            ("sqlite, one append at a time", dir.path()),
            ("the same on tmpfs (fsync returns at once)", shm.path()),
        ] {
            let store = Arc::new(SqliteStore::open(dir.join("sequential.db")).unwrap());
            let a = appends(store, "gw-0", 2000, Duration::ZERO, 1, Processes::Own).await;
            one_at_a_time.get_or_insert(a.p50);
            println!(
                "{name:<40} p50 {:>7.3} ms  p99 {:>7.3} ms",
                a.p50.as_secs_f64() * 1e3,
                a.p99.as_secs_f64() * 1e3
            );
        }
        // The disk alone: what any durable commit on it waits for at least.
        let (p50, p99) = disk_sync(&dir.path().join("sync.probe"), 2000);
        if let Some(one) = &one_at_a_time {
            tollgate_bench::report(
                "audit-throughput",
                "One durable append at a time, SQLite: p50",
                one.as_secs_f64() * 1e3,
                "4 KiB written + fdatasync on the same disk",
                p50.as_secs_f64() * 1e3,
                "ms",
                tollgate_bench::Better::Lower,
            );
        }
        println!(
            "{:<40} p50 {:>7.3} ms  p99 {:>7.3} ms",
            "the disk: 4 KiB written + fdatasync",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }

    if run("postgres") {
        let postgres = tollgate_e2e::postgres::postgres();
        let floor_store = PostgresStore::connect(&postgres.database("floor").unwrap())
            .await
            .unwrap();
        let postgres_floor = floor(&floor_store, "gw-0", records).await;
        let server = Processes::postgres(postgres);
        for (i, (window, writers)) in cases().into_iter().enumerate() {
            let url = postgres.database("bench").unwrap();
            let store = Arc::new(PostgresStore::connect(&url).await.unwrap());
            let a = appends(store.clone(), "gw-0", records, window, writers, server).await;
            report(
                &format!("postgres, {writers} tasks, window {window:?}"),
                &a,
                postgres_floor,
                writers,
                window,
            );
            if i == 0 {
                let (n, rate) = verify_rate(store.as_ref()).await;
                println!(
                    "{:<40} {rate:>9.0} records/s ({n} records)",
                    "postgres verify"
                );
                verified.push(("PostgreSQL", rate));
            }
        }
    }

    if only == "verify" {
        // Verification alone, on a store filled through the plain batched INSERT.
        // KEEP=PATH keeps the filled store at PATH and reuses it on the next run.
        let path =
            std::env::var_os("KEEP").map_or_else(|| dir.path().join("verify.db"), Into::into);
        let filled = path.exists();
        let store = SqliteStore::open(&path).unwrap();
        if !filled {
            floor(&store, "gw-0", records).await;
        }
        for _ in 0..3 {
            let (cpu, wall) = (Processes::Own.cpu_seconds(), Instant::now());
            let (n, rate) = verify_rate(&store).await;
            println!(
                "{:<40} {rate:>9.0} records/s ({n} records; {:.2} cores busy)",
                "sqlite verify",
                (Processes::Own.cpu_seconds() - cpu) / wall.elapsed().as_secs_f64()
            );
        }
        // SQLITE_ONLY=1 stops here (for profiling SQLite's verification alone).
        if std::env::var_os("SQLITE_ONLY").is_some() {
            return;
        }
        let postgres = tollgate_e2e::postgres::postgres();
        let store = PostgresStore::connect(&postgres.database("verify").unwrap())
            .await
            .unwrap();
        floor(&store, "gw-0", records).await;
        let server = Processes::postgres(postgres);
        for _ in 0..3 {
            let (cpu, server_cpu, wall) = (
                Processes::Own.cpu_seconds(),
                server.cpu_seconds(),
                Instant::now(),
            );
            let (n, rate) = verify_rate(&store).await;
            let wall = wall.elapsed().as_secs_f64();
            println!(
                "{:<40} {rate:>9.0} records/s ({n} records; cores busy: {:.2} here, {:.2} in the server)",
                "postgres verify",
                (Processes::Own.cpu_seconds() - cpu) / wall,
                (server.cpu_seconds() - server_cpu) / wall,
            );
        }
    }

    if run("memory") {
        let rate = in_memory_verify(records.max(1_000_000));
        println!(
            "{:<40} {rate:>9.0} records/s",
            "verify, chain check in memory"
        );
        for (store, verified) in verified {
            tollgate_bench::report(
                "audit-throughput",
                &format!("Audit verification, {store}: records/s"),
                verified,
                "the chain check in memory",
                rate,
                "/s",
                tollgate_bench::Better::Higher,
            );
        }
    }
}
