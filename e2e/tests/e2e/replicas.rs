//! Two gateway replicas, each writing its own chain of one PostgreSQL trail, served over HTTP
//! on loopback: budgets hold across them as if one gateway decided every call.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};
use tollgate_audit::{AuditLog, PostgresStore, Redactor, WriterConfig, verify};
use tollgate_e2e::postgres::postgres;
use tollgate_e2e::repo_root;
use tollgate_gateway::Gateway;
use tollgate_gateway::keys::Keys;
use tollgate_gateway::policies::{PolicySet, WatchedDir};

pub(crate) const KEY: &str = "support-key-replicas";

fn keys() -> Keys {
    use sha2::Digest as _;
    Keys::parse(&format!(
        "keys:\n  - {{name: support, agent: default/support-agent-v2, sha256: {}}}\n",
        hex::encode(sha2::Sha256::digest(KEY.as_bytes()))
    ))
    .unwrap()
}

/// A replica writing chain `chain` of the trail at `url`, with budgets shared or not; returns
/// its base URL.
pub(crate) async fn replica(url: &str, chain: &str, shared: bool) -> String {
    let store = Arc::new(PostgresStore::connect(url).await.unwrap());
    let (log, _) = AuditLog::open(store.clone(), WriterConfig::new(chain))
        .await
        .unwrap();
    let mut gateway = Gateway::new(
        WatchedDir::fixed(PolicySet::load(&repo_root().join("config/samples"))),
        keys(),
        log,
        Redactor::default(),
    )
    .with_history(store.clone());
    if shared {
        gateway = gateway.with_shared(store);
    }
    tollgate_e2e::serve_gateway(gateway).await
}

async fn post(http: &reqwest::Client, base: &str, path: &str, body: Value) -> Value {
    let (status, body) = post_answer(http, base, path, body).await;
    assert!(status.is_success(), "{status}: {body}");
    body
}

pub(crate) async fn post_answer(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    body: Value,
) -> (reqwest::StatusCode, Value) {
    let response = http
        .post(format!("{base}{path}"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status(), response.json().await.unwrap())
}

async fn decide(http: &reqwest::Client, base: &str, run: &str) -> String {
    let body = post(
        http,
        base,
        "/v1/decide",
        json!({"runId": run, "tool": "read_customer_record", "arguments": {"customer_id": "C000042"}}),
    )
    .await;
    body["decision"].as_str().unwrap().to_owned()
}

/// One call of a run on B, then one on A (so both replicas know the run), then 98 more at once,
/// alternating between them: how many of the 100 were allowed.
async fn race(a: &str, b: &str) -> usize {
    let http = reqwest::Client::new();
    assert_eq!(decide(&http, b, "race").await, "allow");
    assert_eq!(decide(&http, a, "race").await, "allow");
    let mut calls = Vec::new();
    for i in 0..98 {
        let (http, base) = (http.clone(), if i % 2 == 0 { a } else { b }.to_owned());
        calls.push(tokio::spawn(
            async move { decide(&http, &base, "race").await },
        ));
    }
    let mut allowed = 2;
    for call in calls {
        if call.await.unwrap() == "allow" {
            allowed += 1;
        }
    }
    allowed
}

#[tokio::test]
async fn parallel_calls_through_two_replicas_cannot_race_past_a_ceiling() {
    // maxSteps 25 on the support sample.
    let url = postgres().database("replicas_race").unwrap();
    let (a, b) = (
        replica(&url, "gw-a", true).await,
        replica(&url, "gw-b", true).await,
    );
    assert_eq!(race(&a, &b).await, 25);
    // Both chains verify, and hold the 100 decisions between them.
    let store = PostgresStore::connect(&url).await.unwrap();
    let reports = verify(&store, true, &BTreeMap::new()).await.unwrap();
    assert_eq!(reports.iter().map(|r| r.records).sum::<u64>(), 100);

    // The same race without shared budgets: each replica read the run from the trail once
    // (B found nothing, A found B's call) and then counts alone, so B lets 24 more through and
    // A 23: 49 steps of 25. This is what the shared lock prevents.
    let url = postgres().database("replicas_unshared").unwrap();
    let (a, b) = (
        replica(&url, "gw-a", false).await,
        replica(&url, "gw-b", false).await,
    );
    assert_eq!(race(&a, &b).await, 49);
}

#[tokio::test]
async fn usage_and_runs_counted_by_one_replica_bind_the_other() {
    let url = postgres().database("replicas_window").unwrap();
    let (a, b) = (
        replica(&url, "gw-a", true).await,
        replica(&url, "gw-b", true).await,
    );
    let http = reqwest::Client::new();
    // Both replicas know the run before the other reports on it.
    assert_eq!(decide(&http, &a, "long").await, "allow");
    assert_eq!(decide(&http, &b, "long").await, "allow");
    // 40,000 tokens reported through A, 20,000 through B: B halts the run at 60,000 of 50,000.
    let body = post(
        &http,
        &a,
        "/v1/report",
        json!({"runId": "long", "step": 1, "tool": "read_customer_record", "usage": {"tokens": 40000}}),
    )
    .await;
    assert!(body.get("halted").is_none(), "{body}");
    // B follows A's report: the step A reported cannot be reported again through B.
    let (status, body) = post_answer(
        &http,
        &b,
        "/v1/report",
        json!({"runId": "long", "step": 1, "tool": "read_customer_record", "usage": {"tokens": 1}}),
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "UnknownStep", "{body}");
    let body = post(
        &http,
        &b,
        "/v1/report",
        json!({"runId": "long", "step": 2, "tool": "read_customer_record", "usage": {"tokens": 20000}}),
    )
    .await;
    assert_eq!(body["counters"]["tokens"], 60000, "{body}");
    assert_eq!(
        body["halted"]["clause"], "spec.execution.maxTokensPerRun",
        "{body}"
    );
    // A learns of the halt B recorded.
    assert_eq!(decide(&http, &a, "long").await, "halt");

    // perIdentity maxRuns 100 per hour: 99 more runs, alternating replicas, then a new one is
    // refused on either.
    for run in 0..99 {
        let base = if run % 2 == 0 { &a } else { &b };
        assert_eq!(
            decide(&http, base, &format!("r{run}")).await,
            "allow",
            "run {run}"
        );
    }
    for base in [&a, &b] {
        let body = post(
            &http,
            base,
            "/v1/decide",
            json!({"runId": "one-too-many", "tool": "read_customer_record", "arguments": {"customer_id": "C000042"}}),
        )
        .await;
        assert_eq!(body["decision"], "halt", "{body}");
        assert_eq!(
            body["rule"]["clause"], "spec.execution.perIdentity.maxRuns",
            "{body}"
        );
    }
}

#[tokio::test]
async fn a_replica_that_dies_holding_an_agents_lock_does_not_stall_the_others() {
    let url = postgres().database("replicas_dead").unwrap();
    let a = replica(&url, "gw-a", true).await;
    let http = reqwest::Client::new();
    assert_eq!(decide(&http, &a, "before").await, "allow");
    // Another replica takes the agent's lock and then dies: its session is cut server-side.
    let other = PostgresStore::connect(&url).await.unwrap();
    let held = other.lock_agent("default/support-agent-v2").await.unwrap();
    let waiting = {
        let (http, a) = (http.clone(), a.clone());
        tokio::spawn(async move { decide(&http, &a, "after").await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "the call waits while the lock is held"
    );
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let cut: i64 = client
        .query_one(
            // The budget lock (class 7419003) granted in this test's database.
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_locks \
             WHERE locktype = 'advisory' AND classid = 7419003 AND objsubid = 2 AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())) t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(cut, 1, "the holder's session was found and cut");
    let decision = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
        .await
        .expect("the waiting call went on once the holder's session ended")
        .unwrap();
    assert_eq!(decision, "allow");
    drop(held);
}
