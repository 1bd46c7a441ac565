//! The gateway in a cluster: an agent calls with a TokenRequest token for its ServiceAccount,
//! reviewed by the real apiserver; policies come from watches; engaging the kill switch with
//! kubectl denies the next call.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tollgate_audit::{AuditLog, Redactor, SqliteStore, WriterConfig};
use tollgate_e2e::{User, control_plane, eventually, install_crds, repo_root};
use tollgate_webhook::cluster::WatchedView;
use tollgate_webhook::gateway::{self, ClusterPolicies, Gateway, TokenReviewer};

fn run(command: &mut Command) -> String {
    let output = command.output().expect("run kubectl");
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

async fn decide(client: &reqwest::Client, url: &str, token: &str, run: &str) -> (u16, Value) {
    let response = client
        .post(format!("{url}/v1/decide"))
        .bearer_auth(token)
        .json(&json!({"runId": run, "tool": "read_customer_record",
                      "arguments": {"customer_id": "C000042"}}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn an_agent_token_calls_through_the_gateway_and_the_kill_switch_stops_the_next_call() {
    let cp = control_plane();
    install_crds();
    let ns = cp.namespace("gateway").await;
    let sample =
        std::fs::read_to_string(repo_root().join("config/samples/support-agent.yaml")).unwrap();
    let manifest = repo_root().join(format!("target/e2e-runs/gateway-{ns}.yaml"));
    std::fs::write(&manifest, &sample).unwrap();
    run(cp
        .kubectl(User::Admin)
        .args(["apply", "-n", &ns, "-f"])
        .arg(&manifest));
    // The operator creates the ServiceAccount; it is not part of this test.
    run(cp.kubectl(User::Admin).args([
        "create",
        "serviceaccount",
        "agent-support-agent-v2",
        "-n",
        &ns,
    ]));
    let token = run(cp.kubectl(User::Admin).args([
        "create",
        "token",
        "agent-support-agent-v2",
        "-n",
        &ns,
        "--audience",
        "tollgate",
    ]));
    let token = token.trim();
    let wrong_audience =
        run(cp
            .kubectl(User::Admin)
            .args(["create", "token", "agent-support-agent-v2", "-n", &ns]));

    let client = cp.client(User::Admin).await;
    let view = WatchedView::start(client.clone(), "tollgate-system");
    view.ready().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("audit.db")).unwrap());
    let (log, _) = AuditLog::open(store.clone(), WriterConfig::new("gw-e2e"))
        .await
        .unwrap();
    let gateway = Gateway::new(
        gateway::Policies::Cluster(ClusterPolicies::new(Arc::new(view), client.clone())),
        TokenReviewer::new(client),
        log,
        Redactor::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, gateway::router(Arc::new(gateway)))
            .await
            .unwrap();
    });
    let http = reqwest::Client::new();

    // The watch may still be delivering the policy: wait for the first allow.
    let allowed = eventually(
        "the gateway allows the agent's call",
        Duration::from_secs(30),
        || async {
            let (status, body) = decide(&http, &url, token, "run-1").await;
            (status == 200 && body["decision"] == "allow").then_some(body)
        },
    )
    .await;
    assert_eq!(allowed["rule"]["policy"], format!("{ns}/support-agent-v2"));

    // A token for another audience is refused.
    let (status, body) = decide(&http, &url, wrong_audience.trim(), "run-1").await;
    assert_eq!(status, 401, "{body}");

    // Engage the kill switch with kubectl; the next call is denied.
    let engaged = Instant::now();
    run(cp.kubectl(User::Admin).args([
        "patch",
        "agentidentity",
        "support-agent-v2",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"killSwitch":{"engaged":true,"reason":"e2e"}}}"#,
    ]));
    let denied = eventually(
        "the next call is denied",
        Duration::from_secs(30),
        || async {
            let (_, body) = decide(&http, &url, token, "run-1").await;
            (body["code"] == "KillSwitch").then_some(body)
        },
    )
    .await;
    eprintln!(
        "kill switch: patch to first denied call in {:?}",
        engaged.elapsed()
    );
    assert_eq!(denied["decision"], "deny");

    // Every decision is in the trail under the ServiceAccount's username.
    let records = tollgate_audit::Store::query(store.as_ref(), &tollgate_audit::Query::default())
        .await
        .unwrap();
    let first = records
        .iter()
        .map(|r| r.entry().unwrap())
        .find(|e| e.event == tollgate_audit::Event::Decide)
        .unwrap();
    assert_eq!(
        first.identity.username,
        format!("system:serviceaccount:{ns}:agent-support-agent-v2")
    );
}
