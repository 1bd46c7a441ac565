//! How fast the gateway reacts to people on the local control plane: from the patch engaging an
//! agent's kill switch to the first call the gateway denies, and from an approver's patch to the
//! release of the call that waited for it. A benchmark, not a test: it prints a Markdown table
//! with p50, p99 and max over N rounds of each.
//!
//! `cargo run -p tollgate-e2e --release --bin gateway-reaction [rounds]`
//!
//! The gateway runs in this process (TokenReview and watches against the real apiserver, admission
//! registered so approvals are stamped); the agent calls it over loopback HTTP with a TokenRequest
//! token, polling as fast as it answers. Patches are API calls (no kubectl process in the timing).
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use tollgate_audit::{AuditLog, Redactor, SqliteStore, WriterConfig};
use tollgate_crds::{AgentIdentity, ApprovalRequest};
use tollgate_e2e::admission::{GATEWAY, webhook};
use tollgate_e2e::{User, control_plane, repo_root};
use tollgate_gateway::{self as gateway, ClusterPolicies, Gateway, TokenReviewer};
use tollgate_runtime::cluster::WatchedView;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn call(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    tool: &str,
    arguments: Value,
) -> Value {
    http.post(format!("{url}/v1/decide"))
        .bearer_auth(token)
        .json(&json!({"runId": "bench", "tool": tool, "arguments": arguments}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn row(what: &str, mut samples: Vec<Duration>) -> String {
    samples.sort();
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    format!(
        "| {what} | {} | {} | {} | {} |",
        samples.len(),
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99)),
        ms(*samples.last().unwrap())
    )
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50);
    let cp = control_plane();
    webhook();
    let admin = cp.client(User::Admin).await;
    let ns = tollgate_e2e::admission::namespace("reaction").await;
    // A generous per-run budget: the bench makes many calls in one run.
    let sample = std::fs::read_to_string(repo_root().join("config/samples/support-agent.yaml"))
        .unwrap()
        .replace("groups: [support-leads]", "groups: [tollgate-approvers]")
        .replace("maxSteps: 25", "maxSteps: 100000")
        .replace("maxWallClockSeconds: 120", "maxWallClockSeconds: 86400");
    let manifest = repo_root().join(format!("target/e2e-runs/reaction-{ns}.yaml"));
    std::fs::write(&manifest, sample).unwrap();
    cp.kubectl_ok(&["apply", "-n", &ns, "-f", manifest.to_str().unwrap()]);
    cp.kubectl_ok(&[
        "create",
        "serviceaccount",
        "agent-support-agent-v2",
        "-n",
        &ns,
    ]);
    let token = cp
        .kubectl_ok(&[
            "create",
            "token",
            "agent-support-agent-v2",
            "-n",
            &ns,
            "--audience",
            "tollgate",
            "--duration=2h",
        ])
        .trim()
        .to_owned();

    let view = WatchedView::start(admin.clone(), "tollgate-system");
    view.ready().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("audit.db")).unwrap());
    let (log, _) = AuditLog::open(store, WriterConfig::new("reaction"))
        .await
        .unwrap();
    let gateway = Gateway::new(
        gateway::Policies::Cluster(ClusterPolicies::new(
            Arc::new(view),
            cp.client_as(GATEWAY).await,
        )),
        TokenReviewer::new(admin.clone()),
        log,
        Redactor::default(),
    );
    let url = tollgate_e2e::serve_gateway(gateway).await;
    let http = reqwest::Client::new();
    let read = json!({"customer_id": "C000042"});
    let deadline = Instant::now() + Duration::from_secs(60);
    while call(&http, &url, &token, "read_customer_record", read.clone()).await["decision"]
        != "allow"
    {
        assert!(
            Instant::now() < deadline,
            "the gateway never allowed the first call"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let identities: Api<AgentIdentity> = Api::namespaced(admin.clone(), &ns);
    let switch =
        |engaged: bool| Patch::Merge(json!({"spec": {"killSwitch": {"engaged": engaged}}}));
    let mut kill = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        identities
            .patch("support-agent-v2", &PatchParams::default(), &switch(true))
            .await
            .unwrap();
        loop {
            let answer = call(&http, &url, &token, "read_customer_record", read.clone()).await;
            if answer["code"] == "KillSwitch" {
                break;
            }
        }
        kill.push(started.elapsed());
        identities
            .patch("support-agent-v2", &PatchParams::default(), &switch(false))
            .await
            .unwrap();
        while call(&http, &url, &token, "read_customer_record", read.clone()).await["decision"]
            != "allow"
        {}
    }

    let approvals: Api<ApprovalRequest> = Api::namespaced(cp.client(User::Alice).await, &ns);
    let approve = Patch::Json::<Value>(
        serde_json::from_value(json!([{"op": "add", "path": "/spec/decisions/-",
                                       "value": {"verdict": "Approve"}}]))
        .unwrap(),
    );
    let mut release = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let subject = format!("bench-{round}");
        let waiting = tokio::spawn({
            let (http, url, token) = (http.clone(), url.clone(), token.clone());
            let arguments = json!({"customer_id": "C000042", "subject": subject, "body": "b"});
            async move {
                let answer = call(&http, &url, &token, "send_customer_email", arguments).await;
                (answer, Instant::now())
            }
        });
        let name = loop {
            let found = approvals
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .find(|r| r.spec.arguments["subject"] == subject.as_str())
                .and_then(|r| r.metadata.name);
            if let Some(name) = found {
                break name;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let started = Instant::now();
        approvals
            .patch(&name, &PatchParams::default(), &approve)
            .await
            .unwrap();
        let (answer, answered) = waiting.await.unwrap();
        assert_eq!(answer["decision"], "allow", "{answer}");
        release.push(answered - started);
    }

    println!("| from | rounds | p50 | p99 | max |");
    println!("|---|---:|---:|---:|---:|");
    println!("{}", row("kill switch patch to first denied call", kill));
    println!("{}", row("approval patch to released call", release));
}
