//! What a policy's standing (graduation and drift, `status.tools` and `status.drift`) costs to
//! read from the audit trail: the whole 30-day window at once, as `kubectl tollgate audit drift`
//! and the gateway's first pass after a start read it, and one settled hour, as each later pass
//! of the gateway reads it.
//!
//! `cargo run --release --manifest-path bench/Cargo.toml --bin standing [RECORDS]`
//!
//! RECORDS (1,000,000 unless given) decide records of ten agents and five tools, spread evenly
//! over the last 30 days, go into a fresh SQLite store and into PostgreSQL (the e2e harness
//! starts a throwaway server; `SQLITE_ONLY=1` leaves it out).

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use serde_json::json;
use tollgate_audit::record::GENESIS;
use tollgate_audit::standing::of_store;
use tollgate_audit::{
    Counters, Entry, Event, Identity, PostgresStore, Record, Redactor, SqliteStore, Store,
};
use tollgate_engine::{CompiledPolicy, Decision, DenyCode, RuleRef};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const AGENTS: u64 = 10;
const TOOLS: u64 = 5;
const HOUR_US: i64 = 3_600_000_000;

fn entry(i: u64, time: Timestamp, redactor: &Redactor) -> Entry {
    let agent = i % AGENTS;
    let tool = format!("tool_{}", (i / AGENTS) % TOOLS);
    let mut entry = Entry::new(
        time,
        Event::Decide,
        Identity {
            username: format!("system:serviceaccount:support:agent-{agent}"),
            pod: Some(format!("agent-{agent}-5d8f9c7b6-x2k4q")),
            token_id: Some("0b7e3a4c-6f1d-4c1e-9a55-2f4e8d7c1b90".into()),
        },
    );
    entry.agent = Some(format!("support/agent-{agent}"));
    entry.run = Some(format!("run-{}", i / 20));
    entry.step = Some(i % 20 + 1);
    entry.tool = Some(tool.clone());
    entry.set_arguments(
        redactor,
        &json!({"status": "refunded", "order_ids": ["O-1001", "O-1002"], "apiKey": "sk-live-1"}),
    );
    let rule = RuleRef {
        policy: format!("support/agent-{agent}").into(),
        generation: Some(3),
        policy_hash: "sha256:adaf035b0418a710f50ce0999330b201f0a28561d884ec923382756699f6dbed"
            .into(),
        tool: Some(tool.as_str().into()),
        clause: format!("spec.tools.allowed[{tool}]").into(),
    };
    entry.decision = Some(if i % 20 == 7 {
        Decision::Deny {
            code: DenyCode::ArgumentConstraint,
            rule,
            message: "order_ids: more than 10 items".into(),
        }
    } else {
        Decision::Allow {
            rule,
            review: false,
        }
    });
    entry.counters = Some(Counters {
        steps: i % 20 + 1,
        tokens: 1200,
        cost_usd: "0.0180".into(),
    });
    entry.latency_us = Some(41);
    entry
}

async fn fill<S: Store>(store: &S, records: u64, now: Timestamp) {
    let redactor = Redactor::default();
    let span_us = 30 * 24 * HOUR_US;
    let mut prev = GENESIS.to_owned();
    let mut batch = Vec::with_capacity(4096);
    for i in 0..records {
        let offset = span_us - (i as i64 * span_us / records as i64);
        let time = Timestamp::from_microsecond(now.as_microsecond() - offset).unwrap();
        let record = Record::seal("gw-0", i + 1, &prev, &entry(i, time, &redactor));
        prev.clone_from(&record.hash);
        batch.push(record);
        if batch.len() == 4096 {
            store
                .append(std::mem::take(&mut batch))
                .await
                .expect("append");
        }
    }
    if !batch.is_empty() {
        store.append(batch).await.expect("append");
    }
}

fn policy() -> CompiledPolicy {
    let allowed: Vec<_> = (0..=TOOLS)
        .map(|t| json!({"name": format!("tool_{t}")}))
        .collect();
    let policy = serde_json::from_value(json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentPolicy",
        "metadata": {"name": "agent-0", "namespace": "support"},
        "spec": {"identityRef": {"name": "agent-0"}, "upstreams": [{"name": "crm"}],
                 "tools": {"allowed": allowed},
                 "graduation": {"cleanCompletions": 100, "window": "720h"}}
    }))
    .unwrap();
    CompiledPolicy::compile(&policy).unwrap()
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort_unstable();
    times[times.len() / 2]
}

async fn measure<S: Store>(name: &str, store: &S, records: u64, now: Timestamp) {
    let policy = policy();
    let mut whole = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let standing = of_store(store, &policy, "720h", now).await.unwrap();
        whole.push(start.elapsed());
        assert_eq!(standing.drift.unused_tools, [format!("tool_{TOOLS}")]);
    }
    let whole = median(whole);
    // A settled hour in the middle of the window, as the gateway reads one per pass.
    let hour = (now - SignedDuration::from_hours(24 * 15)).as_microsecond() / HOUR_US * HOUR_US;
    let mut hourly = Vec::new();
    let mut rows = 0;
    for _ in 0..5 {
        let start = Instant::now();
        rows = store.tallies(hour, hour + HOUR_US).await.unwrap().len();
        hourly.push(start.elapsed());
    }
    let hourly = median(hourly);
    let per_hour = records as f64 / 720.0;
    println!(
        "| {name} | {records} | {:.0} ms ({:.2} M records/s) | {:.2} ms for {per_hour:.0} records ({rows} rows) |",
        whole.as_secs_f64() * 1e3,
        records as f64 / whole.as_secs_f64() / 1e6,
        hourly.as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() {
    let records: u64 = std::env::args()
        .nth(1)
        .map_or(1_000_000, |n| n.parse().expect("RECORDS is a number"));
    let now = Timestamp::now();
    println!(
        "| store | records in 30 days | whole window (both windows, median of 3) | one settled hour (median of 5) |"
    );
    println!("|---|---|---|---|");
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(dir.path().join("standing.db")).unwrap();
    let start = Instant::now();
    fill(&sqlite, records, now).await;
    eprintln!("SQLite filled in {:.1} s", start.elapsed().as_secs_f64());
    measure("SQLite", &sqlite, records, now).await;
    if std::env::var_os("SQLITE_ONLY").is_some() {
        return;
    }
    let postgres = tollgate_e2e::postgres::postgres();
    let store = Arc::new(
        PostgresStore::connect(&postgres.database("standing").unwrap())
            .await
            .unwrap(),
    );
    let start = Instant::now();
    fill(store.as_ref(), records, now).await;
    eprintln!(
        "PostgreSQL filled in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    measure("PostgreSQL", store.as_ref(), records, now).await;
}
