//! The store contract: one suite, run unchanged on SQLite and on a real PostgreSQL server
//! (`tollgate_testkit::postgres`); paging, standing counts, pipelined commits, TLS and replicas;
//! and tampering through SQL, the way an attacker with database access would. A writer killed
//! with SIGKILL under load is in the e2e crate (it needs a writer process of its own).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde_json::json;
use tollgate_audit::record::seal;
use tollgate_audit::store::{Query, ToolOutcome};
use tollgate_audit::{
    ApprovalPhase, AuditLog, Batch, Entry, Event, Fault, Head, Identity, Observer, PostgresStore,
    Redactor, SqliteStore, Store, VerifyError, WriterConfig, verify,
};
use tollgate_engine::{CompiledPolicy, Decision, DenyCode, RuleRef};
use tollgate_testkit::postgres::postgres;

/// Raw SQL access to a store's database, as an attacker would have it.
trait Raw {
    async fn exec(&self, sql: &str);
}

struct RawSqlite(std::path::PathBuf);

impl Raw for RawSqlite {
    async fn exec(&self, sql: &str) {
        let conn = rusqlite::Connection::open(&self.0).unwrap();
        conn.execute_batch(sql).unwrap();
    }
}

struct RawPostgres(String);

impl Raw for RawPostgres {
    async fn exec(&self, sql: &str) {
        let (client, connection) = tokio_postgres::connect(&self.0, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client.batch_execute(sql).await.unwrap();
    }
}

fn rule(tool: &str) -> RuleRef {
    RuleRef {
        policy: "shop/support".into(),
        generation: Some(1),
        policy_hash: "sha256:0123456789abcdef".into(),
        tool: Some(tool.into()),
        clause: format!("spec.tools.allowed[{tool}]").into(),
    }
}

fn identity(agent: &str) -> Identity {
    Identity {
        username: format!("system:serviceaccount:shop:agent-{agent}"),
        pod: Some(format!("{agent}-7f9c")),
        token_id: Some("jti-1".into()),
    }
}

/// A decide entry for `agent`'s call of `tool` in `run`.
fn decide(time: Timestamp, agent: &str, run: &str, step: u64, tool: &str, allow: bool) -> Entry {
    let mut entry = Entry::new(time, Event::Decide, identity(agent));
    entry.agent = Some(format!("shop/{agent}"));
    entry.run = Some(run.to_owned());
    entry.step = Some(step);
    entry.tool = Some(tool.to_owned());
    entry.set_arguments(
        &Redactor::default(),
        &json!({"order": step, "apiKey": "sk-live-secret"}),
    );
    entry.decision = Some(if allow {
        Decision::Allow {
            rule: rule(tool),
            review: false,
        }
    } else {
        Decision::Deny {
            code: DenyCode::ToolNotAllowed,
            rule: rule(tool),
            message: format!("{tool} is not an allowed tool"),
        }
    });
    entry.latency_us = Some(12);
    entry
}

async fn open<S: Store>(store: &Arc<S>, chain: &str) -> AuditLog {
    let (log, _task) = AuditLog::open(store.clone(), WriterConfig::new(chain))
        .await
        .expect("open the writer");
    log
}

/// Every batch a writer reported.
#[derive(Default)]
struct Batches(Mutex<Vec<Batch>>);

impl Observer for Batches {
    fn batch(&self, batch: &Batch) {
        self.0.lock().unwrap().push(*batch);
    }
}

impl Batches {
    fn taken(&self) -> Vec<Batch> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

/// A writer for `chain` that reports its batches to the returned observer.
async fn open_observed<S: Store>(store: &Arc<S>, chain: &str) -> (AuditLog, Arc<Batches>) {
    let batches = Arc::new(Batches::default());
    let (log, _task) = AuditLog::open(
        store.clone(),
        WriterConfig::new(chain).with_observer(batches.clone()),
    )
    .await
    .expect("open the writer");
    (log, batches)
}

async fn broken<S: Store>(store: &S, heads: &BTreeMap<String, Head>, deep: bool) -> (u64, Fault) {
    match verify(store, deep, heads).await {
        Err(VerifyError::Broken(b)) => (b.seq, b.fault),
        other => panic!("expected a broken chain, got {other:?}"),
    }
}

/// The suite every store passes.
async fn suite<S: Store>(store: S, second: S) {
    let store = Arc::new(store);
    let (log, batches) = open_observed(&store, "gw-0").await;
    let t0 = Timestamp::now() - SignedDuration::from_hours(24 * 100);

    // Concurrent appends: every one acknowledged, numbered 1..=N without gaps, in one chain.
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let time = t0 + SignedDuration::from_secs(i as i64);
            let agent = if i % 2 == 0 { "support" } else { "deploy" };
            let tool = if i % 3 == 0 { "refund" } else { "lookup_order" };
            log.append(decide(
                time,
                agent,
                &format!("run-{}", i % 4),
                i,
                tool,
                i % 5 != 0,
            ))
            .await
            .expect("append")
        }));
    }
    let mut seqs = Vec::new();
    for task in tasks {
        seqs.push(task.await.unwrap().seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    // The writer told its observer of every batch, each committed, and of nothing else.
    let reported = batches.taken();
    assert_eq!(reported.iter().map(|b| b.records).sum::<usize>(), 200);
    assert!(
        reported
            .iter()
            .all(|b| b.committed && b.records > 0 && b.commit > Duration::ZERO),
        "{reported:?}"
    );

    let reports = verify(store.as_ref(), true, &BTreeMap::new())
        .await
        .expect("verifies");
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].records, 200);
    assert_eq!(reports[0].head.as_ref().unwrap().seq, 200);

    // A run in order, with what was recorded: redacted arguments and their digest.
    let run = store
        .query(&Query {
            run: Some("run-1".into()),
            ..Query::default()
        })
        .await
        .unwrap();
    assert_eq!(run.len(), 50);
    let entries: Vec<Entry> = run.iter().map(|r| r.entry().unwrap()).collect();
    assert!(entries.windows(2).all(|w| w[0].time <= w[1].time));
    assert!(entries.iter().all(|e| e.run.as_deref() == Some("run-1")));
    assert_eq!(
        entries[0].arguments,
        Some(json!({"order": 1, "apiKey": "[REDACTED]"}))
    );
    assert_eq!(entries[0].redacted, ["/arguments/apiKey"]);
    assert!(
        entries[0]
            .arguments_digest
            .as_deref()
            .unwrap()
            .starts_with("sha256:")
    );

    // An agent over a time window.
    let window = store
        .query(&Query {
            agent: Some("shop/support".into()),
            since_us: Some((t0 + SignedDuration::from_secs(10)).as_microsecond()),
            until_us: Some((t0 + SignedDuration::from_secs(20)).as_microsecond()),
            ..Query::default()
        })
        .await
        .unwrap();
    let steps: Vec<u64> = window
        .iter()
        .map(|r| r.entry().unwrap().step.unwrap())
        .collect();
    assert_eq!(steps, [10, 12, 14, 16, 18]);

    // Tools each agent used (drift), and decisions per tool (graduation).
    let used = store
        .tool_use(t0.as_microsecond(), Timestamp::now().as_microsecond())
        .await
        .unwrap();
    let summary: Vec<(String, String, u64)> = used
        .iter()
        .map(|u| (u.agent.clone(), u.tool.clone(), u.calls))
        .collect();
    assert_eq!(
        summary,
        [
            ("shop/deploy".to_owned(), "lookup_order".to_owned(), 67),
            ("shop/deploy".to_owned(), "refund".to_owned(), 33),
            ("shop/support".to_owned(), "lookup_order".to_owned(), 66),
            ("shop/support".to_owned(), "refund".to_owned(), 34),
        ]
    );
    let outcomes = store
        .outcomes("shop/support", t0.as_microsecond())
        .await
        .unwrap();
    let refund: Vec<&ToolOutcome> = outcomes.iter().filter(|o| o.tool == "refund").collect();
    // Support's refunds are the even multiples of 3 below 200: i = 0, 6, …, 198 (34 calls);
    // the multiples of 5 among them (0, 30, …, 180: 7 calls) were denied.
    assert_eq!(
        refund
            .iter()
            .map(|o| (o.outcome.as_str(), o.count))
            .collect::<Vec<_>>(),
        [("allow", 27), ("deny:ToolNotAllowed", 7)]
    );

    // A second writer on the same chain is refused while this one lives.
    let err = AuditLog::open(Arc::new(second), WriterConfig::new("gw-0"))
        .await
        .expect_err("a second writer of gw-0");
    assert!(
        err.to_string().contains("held by another live writer"),
        "{err}"
    );

    // Retention: records older than 90 days go behind a checkpoint; the rest still verifies,
    // and the writer continues after it.
    let recent = Timestamp::now();
    for step in 0..10 {
        log.append(decide(
            recent,
            "support",
            "run-new",
            step,
            "lookup_order",
            true,
        ))
        .await
        .unwrap();
    }
    let pruned = log
        .prune(
            store.as_ref(),
            Timestamp::now() - SignedDuration::from_hours(24 * 90),
            identity("gateway"),
        )
        .await
        .unwrap();
    assert_eq!(pruned, 200);
    let after = log
        .append(decide(
            recent,
            "support",
            "run-new",
            11,
            "lookup_order",
            true,
        ))
        .await
        .unwrap();
    assert_eq!(
        after.seq, 212,
        "10 new records, a checkpoint, then this one"
    );
    let reports = verify(store.as_ref(), true, &BTreeMap::new())
        .await
        .expect("verifies after pruning");
    assert_eq!(
        reports[0].anchor.as_ref().map(|a| a.seq),
        Some(200),
        "{reports:?}"
    );
    assert_eq!(reports[0].records, 12);

    // A restarted writer continues the chain.
    drop(log);
    let log = open(&store, "gw-0").await;
    let next = log
        .append(decide(
            recent,
            "support",
            "run-new",
            12,
            "lookup_order",
            true,
        ))
        .await
        .unwrap();
    assert_eq!(next.seq, 213);
    verify(store.as_ref(), false, &BTreeMap::new())
        .await
        .expect("verifies after a restart");
}

#[tokio::test]
async fn sqlite_store_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    suite(
        SqliteStore::open(&path).unwrap(),
        SqliteStore::open(&path).unwrap(),
    )
    .await;
}

#[tokio::test]
async fn postgres_store_passes_the_suite() {
    let url = postgres().database("suite").unwrap();
    suite(
        PostgresStore::connect(&url).await.unwrap(),
        PostgresStore::connect(&url).await.unwrap(),
    )
    .await;
}

/// Pages and censuses: a query read a page at a time after a cursor returns exactly what one
/// query returns, ties in time broken by chain and sequence; a census counts per agent what the
/// query selects, without its limit or cursor.
async fn paging_suite<S: Store>(store: S) {
    use tollgate_audit::{Census, Cursor};
    let store = Arc::new(store);
    let t0: Timestamp = "2026-11-25T10:00:00Z".parse().unwrap();
    for chain in ["gw-b", "gw-a"] {
        let log = open(&store, chain).await;
        for step in 1..=40u64 {
            // Four records share each instant, across both chains.
            let time = t0 + SignedDuration::from_secs((step / 4) as i64);
            let agent = if step % 3 == 0 { "refunds" } else { "support" };
            log.append(decide(
                time,
                agent,
                &format!("run-{}", step % 2),
                step,
                "t",
                true,
            ))
            .await
            .unwrap();
        }
    }
    let everything = Query {
        since_us: Some(t0.as_microsecond()),
        ..Query::default()
    };
    let whole = store.query(&everything).await.unwrap();
    assert_eq!(whole.len(), 80);
    for page_size in [1, 7, 80] {
        let mut paged = Vec::new();
        let mut after = None;
        loop {
            let page = store
                .query(&Query {
                    limit: Some(page_size),
                    after: after.clone(),
                    ..everything.clone()
                })
                .await
                .unwrap();
            after = page.last().map(Cursor::after);
            let done = (page.len() as u64) < page_size;
            paged.extend(page);
            if done {
                break;
            }
        }
        assert!(
            paged == whole,
            "pages of {page_size} read what one query reads"
        );
    }
    let census = |query: Query| {
        let store = store.clone();
        async move { store.census(&query).await.unwrap() }
    };
    let count = |agent: &str, records: u64| Census {
        agent: Some(format!("shop/{agent}")),
        records,
    };
    assert_eq!(
        census(everything.clone()).await,
        vec![count("refunds", 26), count("support", 54)]
    );
    assert_eq!(
        census(Query {
            run: Some("run-1".into()),
            limit: Some(1),
            after: whole.first().map(Cursor::after),
            ..Query::default()
        })
        .await,
        vec![count("refunds", 14), count("support", 26)],
        "a run's census ignores the limit and the cursor"
    );
    assert_eq!(
        census(Query {
            agent: Some("shop/refunds".into()),
            since_us: Some((t0 + SignedDuration::from_secs(5)).as_microsecond()),
            ..Query::default()
        })
        .await,
        // Steps 21, 24, …, 39 of each chain: seven each.
        vec![count("refunds", 14)]
    );
    assert_eq!(
        census(Query {
            agent: Some("shop/nobody".into()),
            ..Query::default()
        })
        .await,
        vec![]
    );
}

#[tokio::test]
async fn sqlite_pages_and_counts_what_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    paging_suite(SqliteStore::open(dir.path().join("audit.db")).unwrap()).await;
}

#[tokio::test]
async fn postgres_pages_and_counts_what_it_holds() {
    let url = postgres().database("paging").unwrap();
    paging_suite(PostgresStore::connect(&url).await.unwrap()).await;
}

/// Graduation and drift from a trail: each allowed tool's clean completions and incidents in the
/// policy's graduation window, its last call, and the allowed tools never called, the same from
/// the store's aggregate queries as from folding the records themselves.
async fn standing_suite<S: Store>(store: S) {
    use tollgate_audit::ApprovalRef;
    use tollgate_audit::standing::{of_records, of_store};
    use tollgate_crds::policy::Autonomy;

    let store = Arc::new(store);
    let log = open(&store, "gw-0").await;
    // Status times are whole seconds.
    let now = Timestamp::from_second(Timestamp::now().as_second()).unwrap()
        - SignedDuration::from_hours(24);
    let recent = now - SignedDuration::from_hours(1);
    let mut entries = Vec::new();
    for i in 0..25 {
        entries.push(decide(recent, "support", "run-1", i, "refund", true));
        // Another agent's calls never count for this one.
        entries.push(decide(recent, "deploy", "run-2", i, "close_account", true));
    }
    let approval = |phase: ApprovalPhase| {
        let mut entry = decide(recent, "support", "run-1", 30, "refund", true);
        entry.event = Event::Approval;
        entry.approval = Some(ApprovalRef {
            name: "shop/refund-1".into(),
            phase,
            approvers: vec!["alice".into()],
        });
        entry
    };
    use ApprovalPhase::{Approved, Denied, Expired, Pending};
    for phase in [
        Approved, Approved, Approved, Denied, Expired, Expired, Pending,
    ] {
        entries.push(approval(phase));
    }
    let denied = |tool: &str, code: DenyCode| {
        let mut entry = decide(recent, "support", "run-1", 40, tool, false);
        entry.decision = Some(Decision::Deny {
            code,
            rule: rule(tool),
            message: "refused".into(),
        });
        entry
    };
    for code in [
        DenyCode::ArgumentConstraint,
        DenyCode::CallLimit,
        DenyCode::KillSwitch,
        DenyCode::KillSwitch,
    ] {
        entries.push(denied("refund", code));
    }
    entries.push(denied("wipe", DenyCode::ToolBlocked));
    // Older than the graduation window (48h) but inside drift's (720h): used, not counted.
    let old = now - SignedDuration::from_hours(24 * 10);
    for i in 0..10 {
        entries.push(decide(
            old + SignedDuration::from_secs(i),
            "support",
            "run-0",
            i as u64,
            "lookup_order",
            true,
        ));
    }
    for entry in entries {
        log.append(entry).await.unwrap();
    }
    let policy: tollgate_crds::AgentPolicy = serde_yaml::from_str(
        r#"
apiVersion: tollgate.dev/v1alpha1
kind: AgentPolicy
metadata: {name: support, namespace: shop}
spec:
  identityRef: {name: support}
  upstreams: [{name: crm}]
  tools:
    allowed:
      - name: refund
        approval: {approvers: {groups: [leads]}}
      - name: lookup_order
      - name: close_account
        approval: {approvers: {groups: [leads]}}
        autonomy: ExceptionBased
    blocked: [wipe]
  graduation: {cleanCompletions: 28, maxIncidents: 3, window: 48h}
"#,
    )
    .unwrap();
    let policy = CompiledPolicy::compile(&policy).unwrap();

    let standing = of_store(store.as_ref(), &policy, "720h", now)
        .await
        .unwrap();
    assert_eq!(standing.agents, ["shop/support"]);
    let tools: Vec<_> = standing
        .tools
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                t.clean_completions,
                t.incidents,
                t.last_used.as_ref().map(|t| t.0),
                t.eligible_for,
            )
        })
        .collect();
    assert_eq!(
        tools,
        [
            ("close_account", 0, 0, None, None),
            (
                "lookup_order",
                0,
                0,
                Some(old + SignedDuration::from_secs(9)),
                None
            ),
            // 25 allowed and 3 approved; one approver's denial, a constraint and a call limit.
            (
                "refund",
                28,
                3,
                Some(recent),
                Some(Autonomy::ExceptionBased)
            ),
        ]
    );
    assert_eq!(standing.drift.unused_tools, ["close_account"]);
    assert_eq!(standing.drift.window, "720h");

    // One incident more and refund is no longer eligible.
    log.append(denied("refund", DenyCode::ItemLimit))
        .await
        .unwrap();
    let standing = of_store(store.as_ref(), &policy, "720h", now)
        .await
        .unwrap();
    let refund = standing.tools.iter().find(|t| t.name == "refund").unwrap();
    assert_eq!((refund.incidents, refund.eligible_for), (4, None));

    // A narrower drift window leaves lookup_order unused, and the fold of the records agrees
    // with the store's queries in both.
    for window in ["720h", "48h"] {
        let from_store = of_store(store.as_ref(), &policy, window, now)
            .await
            .unwrap();
        let records = store.query(&Query::default()).await.unwrap();
        assert_eq!(
            of_records(&records, &policy, window, now),
            from_store,
            "{window}"
        );
    }
    let narrow = of_store(store.as_ref(), &policy, "48h", now).await.unwrap();
    assert_eq!(narrow.drift.unused_tools, ["close_account", "lookup_order"]);
}

#[tokio::test]
async fn sqlite_standing_counts_track_records_and_drift() {
    let dir = tempfile::tempdir().unwrap();
    standing_suite(SqliteStore::open(dir.path().join("audit.db")).unwrap()).await;
}

#[tokio::test]
async fn postgres_standing_counts_track_records_and_drift() {
    let url = postgres().database("standing").unwrap();
    standing_suite(PostgresStore::connect(&url).await.unwrap()).await;
}

#[tokio::test]
async fn postgres_seals_a_verification_page_over_several_scans_in_order() {
    use tollgate_audit::Record;
    use tollgate_audit::verify::PAGE;
    let url = postgres().database("sealed_pages").unwrap();
    let store = PostgresStore::connect(&url).await.unwrap();
    let total = PAGE as u64 + 1000;
    let mut prev = tollgate_audit::record::GENESIS.to_owned();
    let entry = decide(Timestamp::now(), "a", "r", 1, "t", true);
    let mut seq = 1;
    while seq <= total {
        let batch: Vec<Record> = (seq..(seq + 2000).min(total + 1))
            .map(|n| {
                let record = Record::seal("gw-0", n, &prev, &entry);
                prev.clone_from(&record.hash);
                record
            })
            .collect();
        seq += batch.len() as u64;
        store.append(batch).await.unwrap();
    }
    // More than one scan's worth in one call: all of it, in order, each seal recomputed.
    let page = store.sealed("gw-0", 0, 2 * PAGE).await.unwrap();
    assert_eq!(page.len() as u64, total);
    assert!(page.iter().zip(1..).all(|(r, n)| r.seq == n));
    assert!(
        page.iter()
            .all(|r| r.computed == r.hash.as_str().as_bytes())
    );
    // The limit holds across scans, and a page may start anywhere.
    let page = store.sealed("gw-0", 100, PAGE + 5).await.unwrap();
    assert_eq!(page.len(), PAGE + 5);
    assert_eq!((page[0].seq, page[PAGE + 4].seq), (101, PAGE as u64 + 105));
    // A record altered in the second scan of a page is found there.
    RawPostgres(url)
        .exec(&format!(
            "UPDATE tollgate_audit_records SET body = body || ' ' WHERE seq = {}",
            PAGE + 500
        ))
        .await;
    let (at, fault) = broken(&store, &BTreeMap::new(), false).await;
    assert_eq!(at, PAGE as u64 + 500);
    assert!(matches!(fault, Fault::Altered { .. }), "{fault:?}");
}

/// A real commit failure: a deferred constraint trigger that, at COMMIT, waits `delay` and
/// then fails the transaction of any record for the tool `fail-at-commit`.
async fn fail_commits_of_tool_fail_at_commit(url: &str, delay: &str) {
    RawPostgres(url.to_owned())
        .exec(&format!(
            "CREATE FUNCTION tollgate_test_fail() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF NEW.tool = 'fail-at-commit' THEN
                 PERFORM pg_sleep({delay});
                 RAISE EXCEPTION 'injected commit failure';
               END IF;
               RETURN NULL;
             END $$;
             CREATE CONSTRAINT TRIGGER tollgate_test_fail AFTER INSERT ON tollgate_audit_records
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION tollgate_test_fail();"
        ))
        .await;
}

/// `n` records of `tool` sealed after `prev`, from `seq`.
fn sealed_batch(seq: u64, n: u64, prev: &mut String, tool: &str) -> Vec<tollgate_audit::Record> {
    let entry = decide(Timestamp::now(), "a", "r", 1, tool, true);
    (seq..seq + n)
        .map(|n| {
            let record = tollgate_audit::Record::seal("gw-0", n, prev, &entry);
            prev.clone_from(&record.hash);
            record
        })
        .collect()
}

#[tokio::test]
async fn postgres_commits_pipelined_batches_in_order_and_never_after_a_failed_one() {
    let url = postgres().database("pipeline_store").unwrap();
    let store = PostgresStore::connect(&url).await.unwrap();
    fail_commits_of_tool_fail_at_commit(&url, "0.3").await;
    // Two batches in flight, the first failing at COMMIT after the second was copied in: the
    // second must not commit (it would be a chain from 4 without 1 to 3).
    let mut prev = tollgate_audit::record::GENESIS.to_owned();
    let first = sealed_batch(1, 3, &mut prev, "fail-at-commit");
    let second = sealed_batch(4, 3, &mut prev, "get_order");
    let (first, second) = tokio::join!(store.append(first), store.append(second));
    let first = first.unwrap_err().to_string();
    assert!(first.contains("injected commit failure"), "{first}");
    assert!(
        matches!(second, Err(tollgate_audit::store::StoreError::Aborted)),
        "{second:?}"
    );
    assert_eq!(store.head("gw-0").await.unwrap(), None);
    // Both in flight and both fine: both commit, in order, and the chain verifies.
    let mut prev = tollgate_audit::record::GENESIS.to_owned();
    let first = sealed_batch(1, 3, &mut prev, "get_order");
    let second = sealed_batch(4, 3, &mut prev, "get_order");
    let (a, b) = tokio::join!(store.append(first), store.append(second));
    a.unwrap();
    b.unwrap();
    let reports = verify(&store, true, &BTreeMap::new()).await.unwrap();
    assert_eq!(reports[0].records, 6);
}

#[tokio::test]
async fn postgres_writer_fails_the_batch_behind_a_failed_commit_and_goes_on_from_the_store() {
    let url = postgres().database("pipeline_writer").unwrap();
    let store = Arc::new(PostgresStore::connect(&url).await.unwrap());
    fail_commits_of_tool_fail_at_commit(&url, "0.5").await;
    let (log, batches) = open_observed(&store, "gw-0").await;
    let failing = tokio::spawn({
        let log = log.clone();
        async move {
            log.append(decide(
                Timestamp::now(),
                "a",
                "r",
                1,
                "fail-at-commit",
                true,
            ))
            .await
        }
    });
    // The second call arrives while the first batch waits for its COMMIT: it goes out as the
    // next batch, and fails with it.
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let behind = log
        .append(decide(Timestamp::now(), "a", "r", 2, "get_order", true))
        .await
        .unwrap_err()
        .to_string();
    let failing = failing.await.unwrap().unwrap_err().to_string();
    assert!(failing.contains("injected commit failure"), "{failing}");
    assert!(behind.contains("the batch before it"), "{behind}");
    // The writer re-read its head: the next record is the chain's first, and it verifies.
    let next = log
        .append(decide(Timestamp::now(), "a", "r", 3, "get_order", true))
        .await
        .unwrap();
    assert_eq!(next.seq, 1);
    let reports = verify(store.as_ref(), true, &BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(reports[0].records, 1);
    // The observer saw the three batches as the callers did: the failed COMMIT took the
    // trigger's half second, the batch behind it failed with it, the next one committed.
    let reported = batches.taken();
    let outcomes: Vec<(usize, bool)> = reported.iter().map(|b| (b.records, b.committed)).collect();
    assert_eq!(
        outcomes,
        [(1, false), (1, false), (1, true)],
        "{reported:?}"
    );
    assert!(
        reported[0].commit >= Duration::from_millis(500),
        "{reported:?}"
    );
    assert!(reported[1].commit < reported[0].commit, "{reported:?}");
}

/// How many of `database`'s sessions the server sees encrypted, asked over a plain connection.
async fn encrypted_sessions(database: &str) -> i64 {
    let (client, connection) =
        tokio_postgres::connect(&postgres().url("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE datname = $1 AND ssl",
            &[&database],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn postgres_over_tls_checks_the_server_and_presents_a_client_certificate() {
    let pg = postgres();
    let plain = pg.database("tls").unwrap();
    let database = plain.rsplit("dbname=").next().unwrap().to_owned();
    let ca = pg.ca_file();
    let url = |host: &str, user: &str, tls: &str| {
        format!(
            "host={host} port={} user={user} dbname={database} {tls}",
            pg.port()
        )
    };
    let verify_full = format!("sslmode=verify-full sslrootcert='{}'", ca.display());

    // The server's certificate chains to the CA and names localhost: the store connects,
    // writes and reads over TLS, and the server counts both of its sessions as encrypted.
    let store = Arc::new(
        PostgresStore::connect(&url("localhost", "tollgate", &verify_full))
            .await
            .unwrap(),
    );
    let log = open(&store, "gw-tls").await;
    for step in 1..=5 {
        log.append(decide(
            Timestamp::now(),
            "support",
            "run-tls",
            step,
            "lookup_order",
            true,
        ))
        .await
        .unwrap();
    }
    let reports = verify(store.as_ref(), true, NONE).await.unwrap();
    assert_eq!(reports[0].records, 5);
    // The two appending connections, the session holding the chain's claim and a reader.
    assert_eq!(encrypted_sessions(&database).await, 4);

    // Someone else answering on the address: a CA with the same name but another key (what a
    // forger would make) does not vouch for the server's certificate.
    let other = format!(
        "sslmode=verify-full sslrootcert='{}'",
        pg.other_ca_file().display()
    );
    let err = PostgresStore::connect(&url("localhost", "tollgate", &other))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("TLS handshake") && text.contains("BadSignature"),
        "{text}"
    );

    // The certificate is for localhost, not 127.0.0.1: verify-full refuses it, verify-ca
    // (chain only) accepts it.
    let err = PostgresStore::connect(&url("127.0.0.1", "tollgate", &verify_full))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("not valid for name \"127.0.0.1\""), "{text}");
    let verify_ca = format!("sslmode=verify-ca sslrootcert='{}'", ca.display());
    PostgresStore::connect(&url("127.0.0.1", "tollgate", &verify_ca))
        .await
        .unwrap();

    // A mode that would take any server is refused before anything is sent.
    let err = PostgresStore::connect(&url("localhost", "tollgate", "sslmode=require"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sslmode=require would accept any server"),
        "{err}"
    );

    // The certificate role logs in only with its client certificate.
    let (cert, key) = pg.client_cert();
    let with_cert = format!(
        "{verify_full} sslcert='{}' sslkey='{}'",
        cert.display(),
        key.display()
    );
    PostgresStore::connect(&url("localhost", postgres_cert_user(), &with_cert))
        .await
        .unwrap();
    let err = PostgresStore::connect(&url("localhost", postgres_cert_user(), &verify_full))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("certificate"), "{text}");
    let err = PostgresStore::connect(&url("localhost", postgres_cert_user(), ""))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("pg_hba.conf rejects"), "{text}");
}

fn postgres_cert_user() -> &'static str {
    tollgate_testkit::postgres::CERT_USER
}

#[tokio::test]
async fn postgres_replicas_write_concurrently_each_to_its_own_chain() {
    let url = postgres().database("replicas").unwrap();
    let mut replicas = Vec::new();
    for replica in 0..3 {
        let store = Arc::new(PostgresStore::connect(&url).await.unwrap());
        replicas.push(open(&store, &format!("gw-{replica}")).await);
    }
    let mut tasks = Vec::new();
    for (r, log) in replicas.iter().enumerate() {
        for i in 0..100u64 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                log.append(decide(
                    Timestamp::now(),
                    "support",
                    &format!("run-{r}"),
                    i,
                    "lookup_order",
                    true,
                ))
                .await
                .unwrap()
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    let reader = PostgresStore::connect(&url).await.unwrap();
    let reports = verify(&reader, false, &BTreeMap::new()).await.unwrap();
    let chains: Vec<(String, u64)> = reports
        .iter()
        .map(|r| (r.chain.clone(), r.records))
        .collect();
    assert_eq!(
        chains,
        [
            ("gw-0".to_owned(), 100),
            ("gw-1".to_owned(), 100),
            ("gw-2".to_owned(), 100)
        ]
    );
}

/// Ten records in chain "gw-0"; returns their hashes by seq (index 0 is seq 1).
async fn ten<S: Store>(store: S) -> (Arc<S>, Vec<String>) {
    let store = Arc::new(store);
    let log = open(&store, "gw-0").await;
    let mut hashes = Vec::new();
    for step in 1..=10 {
        let tool = if step == 4 { "refund" } else { "lookup_order" };
        hashes.push(
            log.append(decide(
                Timestamp::now(),
                "support",
                "run-1",
                step,
                tool,
                true,
            ))
            .await
            .unwrap()
            .hash,
        );
    }
    (store, hashes)
}

fn head(seq: u64, hashes: &[String]) -> BTreeMap<String, Head> {
    BTreeMap::from([(
        "gw-0".to_owned(),
        Head {
            seq,
            hash: hashes[seq as usize - 1].clone(),
        },
    )])
}

const NONE: &BTreeMap<String, Head> = &BTreeMap::new();

/// Every tampering an attacker with write access to the database can do, each on a fresh chain.
async fn tampering<S: Store, R: Raw>(fresh: impl AsyncFn() -> (S, R)) {
    // Changing one field of a record's body.
    let (store, raw) = fresh().await;
    let (store, _) = ten(store).await;
    raw.exec("UPDATE tollgate_audit_records SET body = replace(body, '\"lookup_order\"', '\"delete_everything\"') WHERE seq = 6").await;
    let (seq, fault) = broken(store.as_ref(), NONE, false).await;
    assert_eq!(seq, 6);
    assert!(matches!(fault, Fault::Altered { .. }), "{fault}");

    // Deleting a record.
    let (store, raw) = fresh().await;
    let (store, _) = ten(store).await;
    raw.exec("DELETE FROM tollgate_audit_records WHERE seq = 5")
        .await;
    let (seq, fault) = broken(store.as_ref(), NONE, false).await;
    assert_eq!(seq, 5);
    assert_eq!(
        fault,
        Fault::Missing {
            before: 4,
            found: 6
        }
    );

    // Deleting a run of records wider than the page a reader asks for: the page still reaches
    // past the gap (the stores read pages as sequence ranges first), so verification sees it.
    let (store, raw) = fresh().await;
    let (store, _) = ten(store).await;
    raw.exec("DELETE FROM tollgate_audit_records WHERE seq BETWEEN 3 AND 8")
        .await;
    let seqs = |page: Vec<tollgate_audit::Record>| page.iter().map(|r| r.seq).collect::<Vec<_>>();
    assert_eq!(seqs(store.scan("gw-0", 0, 3).await.unwrap()), [1, 2, 9]);
    assert_eq!(seqs(store.scan("gw-0", 2, 3).await.unwrap()), [9, 10]);
    assert_eq!(
        seqs(store.scan("gw-0", 10, 3).await.unwrap()),
        Vec::<u64>::new()
    );
    let (seq, fault) = broken(store.as_ref(), NONE, false).await;
    assert_eq!(seq, 3);
    assert_eq!(
        fault,
        Fault::Missing {
            before: 2,
            found: 9
        }
    );

    // Inserting a forged record at 5, renumbering the rest and sealing the forgery correctly:
    // the forgery links, but the record it displaced no longer does.
    let (store, raw) = fresh().await;
    let (store, hashes) = ten(store).await;
    let forged_body = store.scan("gw-0", 3, 1).await.unwrap()[0].body.clone();
    let forged_hash = seal("gw-0", 5, &hashes[3], &forged_body);
    raw.exec("UPDATE tollgate_audit_records SET seq = -seq WHERE seq >= 5")
        .await;
    raw.exec("UPDATE tollgate_audit_records SET seq = 1 - seq WHERE seq < 0")
        .await;
    raw.exec(&format!(
        "INSERT INTO tollgate_audit_records (chain, seq, prev, hash, time_us, event, body) \
         VALUES ('gw-0', 5, '{}', '{forged_hash}', 0, 'decide', '{}')",
        hashes[3],
        forged_body.replace('\'', "''")
    ))
    .await;
    let (seq, fault) = broken(store.as_ref(), NONE, false).await;
    assert_eq!(seq, 6, "the first record that no longer holds");
    assert!(matches!(fault, Fault::Altered { .. }), "{fault}");

    // Swapping two records (their contents change places; the positions stay).
    let (store, raw) = fresh().await;
    let (store, _) = ten(store).await;
    raw.exec(
        "UPDATE tollgate_audit_records SET seq = CASE seq WHEN 3 THEN 7 ELSE 3 END + 100 WHERE seq IN (3, 7); \
         UPDATE tollgate_audit_records SET seq = seq - 100 WHERE seq > 100",
    )
    .await;
    let (seq, fault) = broken(store.as_ref(), NONE, false).await;
    assert_eq!(seq, 3);
    assert!(matches!(fault, Fault::Altered { .. }), "{fault}");

    // Rewriting the tail with fresh seals passes the chain alone, but not a head kept elsewhere.
    let (store, raw) = fresh().await;
    let (store, hashes) = ten(store).await;
    let records = store.scan("gw-0", 0, 100).await.unwrap();
    let mut prev = hashes[7].clone();
    for record in &records[8..] {
        let body = record.body.replace("lookup_order", "drop_database");
        let hash = seal("gw-0", record.seq, &prev, &body);
        raw.exec(&format!(
            "UPDATE tollgate_audit_records SET body = '{}', prev = '{prev}', hash = '{hash}' WHERE seq = {}",
            body.replace('\'', "''"),
            record.seq
        ))
        .await;
        prev = hash;
    }
    verify(store.as_ref(), false, NONE)
        .await
        .expect("a full rewrite re-seals the chain");
    let (seq, fault) = broken(store.as_ref(), &head(10, &hashes), false).await;
    assert_eq!(seq, 10);
    assert!(matches!(fault, Fault::HeadMismatch { .. }), "{fault}");

    // Truncating the tail, against a head kept elsewhere.
    let (store, raw) = fresh().await;
    let (store, hashes) = ten(store).await;
    raw.exec("DELETE FROM tollgate_audit_records WHERE seq > 7")
        .await;
    let (seq, fault) = broken(store.as_ref(), &head(10, &hashes), false).await;
    assert_eq!(seq, 10);
    assert_eq!(fault, Fault::Truncated { last: 7 });

    // Deleting old records and forging the anchor pruning leaves: no checkpoint confirms it.
    let (store, raw) = fresh().await;
    let (store, hashes) = ten(store).await;
    raw.exec(&format!(
        "DELETE FROM tollgate_audit_records WHERE seq <= 4; \
         INSERT INTO tollgate_audit_anchors (chain, seq, hash) VALUES ('gw-0', 4, '{}')",
        hashes[3]
    ))
    .await;
    let (seq, fault) = broken(store.as_ref(), NONE, false).await;
    assert_eq!(seq, 4);
    assert_eq!(fault, Fault::UnrecordedPrune { through: 4 });

    // Deleting old records without an anchor.
    let (store, raw) = fresh().await;
    let (store, _) = ten(store).await;
    raw.exec("DELETE FROM tollgate_audit_records WHERE seq <= 2")
        .await;
    let (seq, fault) = broken(store.as_ref(), NONE, false).await;
    assert_eq!(seq, 1);
    assert_eq!(
        fault,
        Fault::Missing {
            before: 0,
            found: 3
        }
    );

    // Changing an index column hides a record from queries; the deep check names it.
    let (store, raw) = fresh().await;
    let (store, _) = ten(store).await;
    raw.exec("UPDATE tollgate_audit_records SET tool = 'lookup_order' WHERE seq = 4")
        .await;
    verify(store.as_ref(), false, NONE)
        .await
        .expect("the seals hold");
    let (seq, fault) = broken(store.as_ref(), NONE, true).await;
    assert_eq!(seq, 4);
    assert!(matches!(fault, Fault::Index(_)), "{fault}");
}

#[tokio::test]
async fn tampering_with_sqlite_fails_verification_naming_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let counter = std::sync::atomic::AtomicU32::new(0);
    tampering(async || {
        let path = dir.path().join(format!(
            "audit-{}.db",
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        (SqliteStore::open(&path).unwrap(), RawSqlite(path))
    })
    .await;
}

#[tokio::test]
async fn tampering_with_postgres_fails_verification_naming_the_record() {
    tampering(async || {
        let url = postgres().database("tamper").unwrap();
        (
            PostgresStore::connect(&url).await.unwrap(),
            RawPostgres(url),
        )
    })
    .await;
}

/// Starts the writer process, lets it acknowledge at least `min` records, kills it with
/// SIGKILL, and returns every acknowledgement it printed.
#[tokio::test]
async fn what_if_lists_the_decisions_a_candidate_policy_would_change() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("audit.db")).unwrap());
    let log = open(&store, "gw-0").await;
    let t = Timestamp::now();
    // Recorded under a policy that allowed both tools.
    for (step, tool) in [(1, "lookup_order"), (2, "refund"), (3, "lookup_order")] {
        log.append(decide(t, "support", "run-1", step, tool, true))
            .await
            .unwrap();
    }
    let candidate: tollgate_crds::policy::AgentPolicy = serde_yaml::from_str(
        r#"
apiVersion: tollgate.dev/v1alpha1
kind: AgentPolicy
metadata: {name: support, namespace: shop}
spec:
  identityRef: {name: support}
  tools:
    allowed:
      - name: lookup_order
        arguments:
          additionalFields: Allow
          fields:
            order: {type: integer, required: true}
"#,
    )
    .unwrap();
    let candidate = CompiledPolicy::compile(&candidate).unwrap();
    let records = store.query(&Query::default()).await.unwrap();
    let steps = tollgate_audit::replay::steps(&records).unwrap();
    let result = tollgate_audit::replay::what_if(&candidate, &steps);
    assert_eq!(result.evaluated, 3);
    assert_eq!(result.changes.len(), 1, "{result:?}");
    let change = &result.changes[0];
    assert_eq!((change.tool.as_str(), change.step), ("refund", Some(2)));
    assert!(change.recorded.is_allowed());
    assert_eq!(change.candidate.deny_code(), Some(DenyCode::ToolNotAllowed));
    assert!(change.redacted_arguments);
}
