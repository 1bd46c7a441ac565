//! The gateway in a cluster: an agent calls with a TokenRequest token for its ServiceAccount,
//! reviewed by the real apiserver; policies come from watches; a call that needs approval waits
//! until alice approves it with a patch (admission stamps her); engaging the kill switch with
//! kubectl releases a waiting call as denied and denies the next one.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use tollgate_audit::{AuditLog, Redactor, SqliteStore, WriterConfig};
use tollgate_crds::ApprovalRequest;
use tollgate_e2e::admission::{GATEWAY, webhook};
use tollgate_e2e::{User, control_plane, eventually, install_crds, repo_root};
use tollgate_gateway::{self as gateway, ClusterPolicies, Gateway, TokenReviewer};
use tollgate_runtime::cluster::WatchedView;

fn run(command: &mut Command) -> String {
    let output = command.output().expect("run kubectl");
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

async fn call(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    run: &str,
    tool: &str,
    arguments: Value,
) -> (u16, Value) {
    post_decide(
        client,
        url,
        token,
        json!({"runId": run, "tool": tool, "arguments": arguments}),
    )
    .await
}

/// `body` to the decision API as the holder of `token`: the status and the answer.
pub(crate) async fn post_decide(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: Value,
) -> (u16, Value) {
    let response = client
        .post(format!("{url}/v1/decide"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

pub(crate) async fn decide(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    run: &str,
) -> (u16, Value) {
    call(
        client,
        url,
        token,
        run,
        "read_customer_record",
        json!({"customer_id": "C000042"}),
    )
    .await
}

/// Waits for the gateway at `url` to allow the support agent's call in run-1 (its watch may
/// still be delivering the policy), by the policy of `ns`.
pub(crate) async fn first_allow(http: &reqwest::Client, url: &str, token: &str, ns: &str) {
    let allowed = eventually(
        "the gateway allows the agent's call",
        Duration::from_secs(30),
        || async {
            let (status, body) = decide(http, url, token, "run-1").await;
            (status == 200 && body["decision"] == "allow").then_some(body)
        },
    )
    .await;
    assert_eq!(allowed["rule"]["policy"], format!("{ns}/support-agent-v2"));
}

/// Creates the support agent's ServiceAccount in `ns` (the operator's job, not part of these
/// tests) and returns a TokenRequest token for it with audience `tollgate`.
pub(crate) fn support_agent_token(ns: &str) -> String {
    let cp = control_plane();
    run(cp.kubectl(User::Admin).args([
        "create",
        "serviceaccount",
        "agent-support-agent-v2",
        "-n",
        ns,
    ]));
    run(cp.kubectl(User::Admin).args([
        "create",
        "token",
        "agent-support-agent-v2",
        "-n",
        ns,
        "--audience",
        "tollgate",
    ]))
    .trim()
    .to_owned()
}

/// The sample support agent in a fresh namespace `prefix-…` whose agents admission watches, its
/// e-mails approved by the group tollgate-approvers (alice and bob); returns the namespace and a
/// TokenRequest token for the agent's ServiceAccount (audience `tollgate`).
pub(crate) async fn sample_agent(prefix: &str) -> (String, String) {
    let cp = control_plane();
    install_crds();
    webhook();
    let ns = tollgate_e2e::admission::namespace(prefix).await;
    let sample = std::fs::read_to_string(repo_root().join("config/samples/support-agent.yaml"))
        .unwrap()
        .replace("groups: [support-leads]", "groups: [tollgate-approvers]");
    let manifest = repo_root().join(format!("target/e2e-runs/{prefix}-{ns}.yaml"));
    std::fs::write(&manifest, &sample).unwrap();
    run(cp
        .kubectl(User::Admin)
        .args(["apply", "-n", &ns, "-f"])
        .arg(&manifest));
    let token = support_agent_token(&ns);
    (ns, token)
}

/// A gateway in this process over `view`, acting as the gateway's ServiceAccount (admission
/// accepts ApprovalRequests from nobody else), reviewing tokens as the admin, its trail `chain`
/// in a fresh SQLite store; returns its URL, the store, and the directory that holds it.
pub(crate) async fn gateway_over(
    view: Arc<dyn tollgate_runtime::cluster::ClusterView>,
    chain: &str,
) -> (String, Arc<SqliteStore>, tempfile::TempDir) {
    let cp = control_plane();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("audit.db")).unwrap());
    let (log, _) = AuditLog::open(store.clone(), WriterConfig::new(chain))
        .await
        .unwrap();
    let gateway = Gateway::new(
        gateway::Policies::Cluster(ClusterPolicies::new(view, cp.client_as(GATEWAY).await)),
        TokenReviewer::new(cp.client(User::Admin).await),
        log,
        Redactor::default(),
    );
    (tollgate_e2e::serve_gateway(gateway).await, store, dir)
}

/// Alice approves ApprovalRequest `ticket` with `kubectl tollgate approve`; what it printed.
pub(crate) async fn alice_approves(ns: &str, ticket: &str, comment: &str) -> String {
    kubectl_tollgate::people::decide(
        control_plane().client(User::Alice).await,
        ns,
        ticket,
        tollgate_crds::approval::Verdict::Approve,
        Some(comment),
    )
    .await
    .expect("alice may approve")
}

/// Engages the support agent's kill switch in `ns` with `kubectl patch`, as a person would.
fn engage_kill_switch(ns: &str, reason: &str) {
    let patch = json!({"spec": {"killSwitch": {"engaged": true, "reason": reason}}}).to_string();
    run(control_plane().kubectl(User::Admin).args([
        "patch",
        "agentidentity",
        "support-agent-v2",
        "-n",
        ns,
        "--type=merge",
        "-p",
        &patch,
    ]));
}

pub(crate) fn email(subject: &str) -> Value {
    json!({"customer_id": "C000042", "subject": subject, "body": "Your refund is on its way."})
}

/// The one ApprovalRequest of `ns` whose arguments carry `subject`, once the gateway made it.
async fn request_for(api: &Api<ApprovalRequest>, subject: &str) -> String {
    eventually(
        "the gateway creates the ApprovalRequest",
        Duration::from_secs(30),
        || async {
            api.list(&ListParams::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .find(|r| r.spec.arguments["subject"] == subject)
                .and_then(|r| r.metadata.name)
        },
    )
    .await
}

#[tokio::test]
async fn an_agent_token_calls_through_the_gateway_and_the_kill_switch_stops_the_next_call() {
    let cp = control_plane();
    let (ns, token) = sample_agent("gateway").await;
    let token = token.as_str();
    let wrong_audience =
        run(cp
            .kubectl(User::Admin)
            .args(["create", "token", "agent-support-agent-v2", "-n", &ns]));
    let view = WatchedView::start(cp.client(User::Admin).await, "tollgate-system");
    view.ready().await;
    let (url, store, _trail) = gateway_over(Arc::new(view), "gw-e2e").await;
    let http = reqwest::Client::new();

    first_allow(&http, &url, token, &ns).await;

    // A token for another audience is refused.
    let (status, body) = decide(&http, &url, wrong_audience.trim(), "run-1").await;
    assert_eq!(status, 401, "{body}");

    // An e-mail waits for approval; alice approves with a patch and the call is released.
    let requests: Api<ApprovalRequest> = Api::namespaced(cp.client(User::Alice).await, &ns);
    let waiting = tokio::spawn({
        let (http, url, token) = (http.clone(), url.clone(), token.to_owned());
        async move {
            call(
                &http,
                &url,
                &token,
                "run-1",
                "send_customer_email",
                email("refund"),
            )
            .await
        }
    });
    let name = request_for(&requests, "refund").await;
    let approve = Patch::Json::<Value>(
        serde_json::from_value(json!([{"op": "add", "path": "/spec/decisions/-",
                                       "value": {"verdict": "Approve"}}]))
        .unwrap(),
    );
    let approved_at = Instant::now();
    requests
        .patch(&name, &PatchParams::default(), &approve)
        .await
        .expect("alice may approve");
    let (status, released) = waiting.await.unwrap();
    eprintln!(
        "approval: patch to released call in {:?}",
        approved_at.elapsed()
    );
    assert_eq!(status, 200, "{released}");
    assert_eq!(released["decision"], "allow", "{released}");

    // The same without waiting: 202 with the request at once, redeemed after alice approves,
    // exactly once, and only for exactly those arguments.
    let post = |body: Value| post_decide(&http, &url, token, body);
    let later = email("later");
    let (status, pending) = post(json!({"runId": "run-1", "tool": "send_customer_email",
        "arguments": later, "wait": false}))
    .await;
    assert_eq!(status, 202, "{pending}");
    assert_eq!(pending["decision"], "requireApproval", "{pending}");
    let ticket = pending["approvalRequest"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(pending["approvalRequest"]["namespace"], ns.as_str());
    let redeem = |arguments: Value| {
        json!({"runId": "run-1", "tool": "send_customer_email", "arguments": arguments,
               "approval": ticket})
    };
    let (status, undecided) = post(redeem(later.clone())).await;
    assert_eq!(status, 202, "{undecided}");
    // This time alice approves with `kubectl tollgate approve`.
    let printed = alice_approves(&ns, &ticket, "one customer").await;
    assert!(
        printed.contains(
            "approved: phase Approved, the call is released unless a kill switch is engaged"
        ),
        "{printed}"
    );
    let (status, changed) = post(redeem(email("something else"))).await;
    assert_eq!(
        (status, &changed["code"]),
        (200, &json!("ApprovalDenied")),
        "{changed}"
    );
    let (status, once) = post(redeem(later.clone())).await;
    assert_eq!(
        (status, &once["decision"]),
        (200, &json!("allow")),
        "{once}"
    );
    let (_, twice) = post(redeem(later.clone())).await;
    assert_eq!(twice["code"], "ApprovalDenied", "{twice}");
    assert!(
        twice["message"]
            .as_str()
            .unwrap()
            .contains("already released"),
        "{twice}"
    );

    // A second e-mail waits; engaging the kill switch releases it as denied.
    let waiting = tokio::spawn({
        let (http, url, token) = (http.clone(), url.clone(), token.to_owned());
        async move {
            call(
                &http,
                &url,
                &token,
                "run-1",
                "send_customer_email",
                email("second"),
            )
            .await
        }
    });
    request_for(&requests, "second").await;

    // Engage the kill switch with kubectl; the waiting call and the next call are denied.
    let engaged = Instant::now();
    engage_kill_switch(&ns, "e2e");
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
    let (_, released) = waiting.await.unwrap();
    assert_eq!(released["code"], "KillSwitch", "{released}");

    // Every decision is in the trail under the ServiceAccount's username.
    let records = tollgate_audit::Store::query(store.as_ref(), &tollgate_audit::Query::default())
        .await
        .unwrap();
    let entries: Vec<_> = records.iter().map(|r| r.entry().unwrap()).collect();
    let first = entries
        .iter()
        .find(|e| e.event == tollgate_audit::Event::Decide)
        .unwrap();
    let approval = entries
        .iter()
        .find(|e| e.event == tollgate_audit::Event::Approval)
        .and_then(|e| e.approval.clone())
        .unwrap();
    assert_eq!(
        (approval.phase.as_str(), approval.approvers),
        ("Approved", vec!["alice".to_owned()])
    );
    assert_eq!(
        first.identity.username,
        format!("system:serviceaccount:{ns}:agent-support-agent-v2")
    );
}

/// The watched view until [`Lagging::freeze`], then what it held at that moment: a gateway whose
/// watches have not yet delivered the latest changes, as every watch lags for a moment.
struct Lagging {
    live: WatchedView,
    frozen: std::sync::Mutex<Option<Frozen>>,
}

type Frozen = (
    Vec<Arc<tollgate_crds::AgentIdentity>>,
    Vec<Arc<tollgate_crds::AgentPolicy>>,
    bool,
);

impl Lagging {
    fn freeze(&self) {
        use tollgate_runtime::cluster::ClusterView;
        let now = (
            self.live.identities(),
            self.live.policies(),
            self.live.global_kill(),
        );
        *self.frozen.lock().unwrap() = Some(now);
    }
}

impl tollgate_runtime::cluster::ClusterView for Lagging {
    fn identities(&self) -> Vec<Arc<tollgate_crds::AgentIdentity>> {
        match &*self.frozen.lock().unwrap() {
            Some((identities, _, _)) => identities.clone(),
            None => self.live.identities(),
        }
    }
    fn policies(&self) -> Vec<Arc<tollgate_crds::AgentPolicy>> {
        match &*self.frozen.lock().unwrap() {
            Some((_, policies, _)) => policies.clone(),
            None => self.live.policies(),
        }
    }
    fn global_kill(&self) -> bool {
        match &*self.frozen.lock().unwrap() {
            Some((_, _, global)) => *global,
            None => self.live.global_kill(),
        }
    }
    fn tollgate_namespace(&self) -> Option<&str> {
        self.live.tollgate_namespace()
    }
}

/// SECURITY.md 5, the kill switch wins every race: a call approved before the switch was engaged
/// is not released after it, even by a gateway whose watches have not delivered the switch yet
/// (here they never do). The gateway reads the switches from the apiserver itself before it
/// releases an approved call; when it cannot, the call is not released either.
#[tokio::test]
async fn two_replicas_racing_to_redeem_one_approval_release_it_once() {
    // A wait:false call approved by alice, then redeemed 100 times at once through two
    // replicas sharing one PostgreSQL trail: exactly one redemption releases the call.
    let cp = control_plane();
    let (ns, token) = sample_agent("once").await;
    let view = WatchedView::start(cp.client(User::Admin).await, "tollgate-system");
    view.ready().await;
    let view: Arc<dyn tollgate_runtime::cluster::ClusterView> = Arc::new(view);
    let trail = tollgate_e2e::postgres::postgres()
        .database("approval_once")
        .unwrap();
    let mut replicas = Vec::new();
    for chain in ["gw-once-a", "gw-once-b"] {
        let store = Arc::new(
            tollgate_audit::PostgresStore::connect(&trail)
                .await
                .unwrap(),
        );
        let (log, _) = AuditLog::open(store.clone(), WriterConfig::new(chain))
            .await
            .unwrap();
        let gateway = Gateway::new(
            gateway::Policies::Cluster(ClusterPolicies::new(
                view.clone(),
                cp.client_as(GATEWAY).await,
            )),
            TokenReviewer::new(cp.client(User::Admin).await),
            log,
            Redactor::default(),
        )
        .with_history(store.clone())
        .with_shared(store);
        replicas.push(tollgate_e2e::serve_gateway(gateway).await);
    }
    let http = reqwest::Client::new();
    let later = email("once");
    let (status, pending) = post_decide(
        &http,
        &replicas[0],
        &token,
        json!({"runId": "run-1", "tool": "send_customer_email", "arguments": later,
               "wait": false}),
    )
    .await;
    assert_eq!(status, 202, "{pending}");
    let ticket = pending["approvalRequest"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    alice_approves(&ns, &ticket, "once").await;
    let redemptions: Vec<_> = (0..100)
        .map(|i| {
            let (http, url, token) = (http.clone(), replicas[i % 2].clone(), token.clone());
            let body = json!({"runId": "run-1", "tool": "send_customer_email",
                              "arguments": later, "approval": ticket});
            tokio::spawn(async move { post_decide(&http, &url, &token, body).await })
        })
        .collect();
    let mut released = 0;
    for redemption in redemptions {
        let (status, answer) = redemption.await.unwrap();
        assert_eq!(status, 200, "{answer}");
        match answer["decision"].as_str() {
            Some("allow") => released += 1,
            _ => assert_eq!(answer["code"], "ApprovalDenied", "{answer}"),
        }
    }
    assert_eq!(released, 1, "one approval releases one call");
    // The trail agrees: one release of it, whichever replica made it.
    let store = tollgate_audit::PostgresStore::connect(&trail)
        .await
        .unwrap();
    let records = tollgate_audit::Store::query(&store, &Default::default())
        .await
        .unwrap();
    let releases = records
        .iter()
        .filter_map(|r| r.entry().ok())
        .filter(|e| {
            e.approval.as_ref().is_some_and(|a| {
                a.name.ends_with(&ticket) && a.phase == tollgate_audit::ApprovalPhase::Approved
            })
        })
        .count();
    assert_eq!(releases, 1);
}

#[tokio::test]
async fn a_gateway_in_a_cluster_never_starts_a_policys_stdio_command() {
    // Whoever may write an AgentPolicy must not run programs inside the gateway, which holds
    // every agent's credentials: in a cluster a stdio upstream is refused (SECURITY.md 10).
    let cp = control_plane();
    let (ns, token) = sample_agent("stdio-refused").await;
    let marker = std::env::temp_dir().join(format!("tollgate-stdio-{ns}"));
    let patch = json!([{"op": "replace", "path": "/spec/upstreams/0/mcp",
        "value": {"stdio": {"command": "/bin/sh",
                            "args": ["-c", format!("touch {}", marker.display())]}}}]);
    run(cp.kubectl(User::Admin).args([
        "patch",
        "agentpolicy",
        "support-agent-v2",
        "-n",
        &ns,
        "--type=json",
        "-p",
        &patch.to_string(),
    ]));
    let view = WatchedView::start(cp.client(User::Admin).await, "tollgate-system");
    view.ready().await;
    let (url, store, _trail) = gateway_over(Arc::new(view), "gw-e2e-stdio").await;
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "agent", "version": "1"}}});
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (status, body) = loop {
        let response = http
            .post(format!("{url}/mcp/crm"))
            .bearer_auth(&token)
            .json(&initialize)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status == 400 || std::time::Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["data"]["code"], "NotServed", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("only a standalone gateway starts"),
        "{body}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!marker.exists(), "the command ran");
    let records = tollgate_audit::Store::query(store.as_ref(), &Default::default())
        .await
        .unwrap();
    assert!(
        records
            .iter()
            .filter_map(|r| r.entry().unwrap().error)
            .any(|e| e.contains("NotServed")),
        "the refusal is recorded"
    );
}

#[tokio::test]
async fn a_token_of_no_agent_is_refused_and_recorded() {
    // A valid token for the right audience, of a ServiceAccount no AgentIdentity names: 403
    // NotAnAgent, recorded like every refusal (SECURITY.md 1 and 6).
    let cp = control_plane();
    let (ns, _) = sample_agent("not-an-agent").await;
    run(cp
        .kubectl(User::Admin)
        .args(["create", "serviceaccount", "build-bot", "-n", &ns]));
    let token = run(cp.kubectl(User::Admin).args([
        "create",
        "token",
        "build-bot",
        "-n",
        &ns,
        "--audience",
        "tollgate",
    ]));
    let view = WatchedView::start(cp.client(User::Admin).await, "tollgate-system");
    view.ready().await;
    let (url, store, _trail) = gateway_over(Arc::new(view), "gw-e2e-nobody").await;
    let (status, body) = decide(&reqwest::Client::new(), &url, token.trim(), "run-1").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "NotAnAgent", "{body}");
    let records = tollgate_audit::Store::query(store.as_ref(), &Default::default())
        .await
        .unwrap();
    assert_eq!(records.len(), 1);
    let entry = records[0].entry().unwrap();
    assert_eq!(entry.event, tollgate_audit::Event::Rejected);
    assert!(
        entry.error.as_deref().unwrap().contains("NotAnAgent"),
        "{:?}",
        entry.error
    );
    assert_eq!(
        entry.identity.username,
        format!("system:serviceaccount:{ns}:build-bot"),
        "who was refused is recorded"
    );
}

#[tokio::test]
async fn an_approved_call_is_not_released_once_the_kill_switch_is_engaged_whatever_the_watches_say()
{
    let cp = control_plane();
    let (ns, token) = sample_agent("race").await;
    let token = token.as_str();
    let live = WatchedView::start(cp.client(User::Admin).await, "tollgate-system");
    live.ready().await;
    let view = Arc::new(Lagging {
        live,
        frozen: Default::default(),
    });
    let (url, store, _trail) = gateway_over(view.clone(), "gw-race").await;
    let http = reqwest::Client::new();
    first_allow(&http, &url, token, &ns).await;

    let post = |body: Value| post_decide(&http, &url, token, body);
    // Two e-mails wait for people; alice approves both while the agent may still act.
    let mut tickets = Vec::new();
    for subject in ["first", "second"] {
        let (status, pending) = post(json!({"runId": "run-1", "tool": "send_customer_email",
            "arguments": email(subject), "wait": false}))
        .await;
        assert_eq!(status, 202, "{pending}");
        let ticket = pending["approvalRequest"]["name"]
            .as_str()
            .unwrap()
            .to_owned();
        alice_approves(&ns, &ticket, "before the kill switch").await;
        tickets.push((subject, ticket));
    }
    let redeem = |(subject, ticket): &(&str, String)| {
        post(json!({"runId": "run-1", "tool": "send_customer_email",
                    "arguments": email(subject), "approval": ticket}))
    };

    // From here on the gateway's watches deliver nothing; the kill switch is engaged.
    view.freeze();
    engage_kill_switch(&ns, "race");
    // The gateway's view still lets the agent act (new calls follow the watches, within the
    // reaction time bench/README.md reports)...
    let (status, read) = decide(&http, &url, token, "run-2").await;
    assert_eq!(
        (status, &read["decision"]),
        (200, &json!("allow")),
        "{read}"
    );
    // ...but the approved call is not released.
    let (status, refused) = redeem(&tickets[0]).await;
    assert_eq!(
        (status, &refused["decision"], &refused["code"]),
        (200, &json!("deny"), &json!("KillSwitch")),
        "{refused}"
    );
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "the kill switch of agent {ns}/support-agent-v2 is engaged"
        )) && message.contains("is not released"),
        "{refused}"
    );
    // It stays refused: the approval was settled as cancelled, once.
    let (_, again) = redeem(&tickets[0]).await;
    assert_eq!(again["code"], "KillSwitch", "{again}");

    // When the switches cannot be read, an approved call is not released either: here the
    // identity is gone (the frozen view still holds it).
    run(cp
        .kubectl(User::Admin)
        .args(["delete", "agentidentity", "support-agent-v2", "-n", &ns]));
    let (status, unconfirmed) = redeem(&tickets[1]).await;
    assert_eq!(status, 503, "{unconfirmed}");
    assert_eq!(
        unconfirmed["error"]["code"], "ClusterUnavailable",
        "{unconfirmed}"
    );
    assert!(
        unconfirmed["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!(
                "AgentIdentity {ns}/support-agent-v2 no longer exists"
            )),
        "{unconfirmed}"
    );

    // The trail says what became of the first approval, twice: refused for the kill switch,
    // never released; the second, unconfirmed, was neither released nor settled.
    let records = tollgate_audit::Store::query(store.as_ref(), &tollgate_audit::Query::default())
        .await
        .unwrap();
    let settled: Vec<_> = records
        .iter()
        .map(|r| r.entry().unwrap())
        .filter(|e| e.event == tollgate_audit::Event::Approval)
        .filter(|e| {
            e.approval
                .as_ref()
                .is_some_and(|a| a.phase != tollgate_audit::ApprovalPhase::Pending)
        })
        .collect();
    assert_eq!(settled.len(), 2, "{settled:?}");
    for entry in &settled {
        let approval = entry.approval.as_ref().unwrap();
        assert_eq!(
            (approval.name.as_str(), approval.phase.as_str()),
            (format!("{ns}/{}", tickets[0].1).as_str(), "Refused")
        );
        assert_eq!(
            entry.decision.as_ref().unwrap().deny_code(),
            Some(tollgate_engine::DenyCode::KillSwitch)
        );
    }
}

/// Graduation and drift on the policy itself: the gateway reads its trail and writes
/// `status.tools` and `status.drift` with server-side apply as tollgate-gateway, beside the
/// operator's conditions; neither removes the other's fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_writes_each_policys_track_record_and_drift_beside_the_operators_status() {
    use tollgate_crds::AgentPolicy;
    use tollgate_crds::policy::Autonomy;
    use tollgate_e2e::operator::{Operator, Options};
    use tollgate_gateway::standing::{Schedule, StatusWriter};

    let cp = control_plane();
    install_crds();
    webhook();
    let ns = cp.namespace("standing").await;
    let _operator = Operator::start(&ns, Options::default());
    // Reads go through on exception-based autonomy, and graduation asks two clean completions,
    // so the reads below earn the next level.
    let sample = std::fs::read_to_string(repo_root().join("config/samples/support-agent.yaml"))
        .unwrap()
        .replace("cleanCompletions: 200", "cleanCompletions: 2")
        .replacen(
            "      - name: read_customer_record\n        upstream: crm\n",
            "      - name: read_customer_record\n        upstream: crm\n        \
             approval: {approvers: {groups: [support-leads]}}\n        autonomy: ExceptionBased\n",
            1,
        );
    assert!(sample.contains("autonomy: ExceptionBased"));
    let manifest = repo_root().join(format!("target/e2e-runs/standing-{ns}.yaml"));
    std::fs::write(&manifest, &sample).unwrap();
    run(cp
        .kubectl(User::Admin)
        .args(["apply", "-n", &ns, "-f"])
        .arg(&manifest));
    let admin = cp.client(User::Admin).await;
    let policies: Api<AgentPolicy> = Api::namespaced(admin.clone(), &ns);
    eventually(
        "the operator's Ready condition",
        Duration::from_secs(60),
        || async {
            let status = policies.get("support-agent-v2").await.ok()?.status?;
            status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready")
                .then_some(())
        },
    )
    .await;
    // The operator made the agent's ServiceAccount.
    let token = eventually("a token for the agent", Duration::from_secs(60), || async {
        let output = cp
            .kubectl(User::Admin)
            .args(["create", "token", "agent-support-agent-v2", "-n", &ns])
            .args(["--audience", "tollgate"])
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    })
    .await;

    // Calls through the gateway: three allowed reads, one order update its condition refuses.
    let view = Arc::new(WatchedView::start(admin.clone(), "tollgate-system"));
    view.ready().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("audit.db")).unwrap());
    let (log, _) = AuditLog::open(store.clone(), WriterConfig::new("gw-standing"))
        .await
        .unwrap();
    let as_gateway = cp.client_as(GATEWAY).await;
    let gateway = Gateway::new(
        gateway::Policies::Cluster(ClusterPolicies::new(view.clone(), as_gateway.clone())),
        TokenReviewer::new(admin.clone()),
        log,
        Redactor::default(),
    );
    let url = tollgate_e2e::serve_gateway(gateway).await;
    let http = reqwest::Client::new();
    first_allow(&http, &url, &token, &ns).await;
    for run_id in ["run-2", "run-3"] {
        let (status, body) = decide(&http, &url, &token, run_id).await;
        assert_eq!((status, body["decision"].as_str()), (200, Some("allow")));
    }
    let (_, body) = call(
        &http,
        &url,
        &token,
        "run-4",
        "update_order_status",
        json!({"status": "refunded", "order_ids": ["X-1"]}),
    )
    .await;
    assert_eq!(body["decision"], "deny", "{body}");

    // The writer, as the gateway's ServiceAccount with the shipped rights.
    let metrics = tollgate_runtime::metrics::Metrics::default();
    let writer = StatusWriter::new(
        view.clone(),
        store.clone(),
        as_gateway,
        Schedule {
            interval: Duration::from_secs(3600),
            window: "720h".into(),
        },
    )
    .with_metrics(metrics.clone());
    let counted = |outcome: &str| metrics.policy_status.with_label_values(&[outcome]).get();
    // Other tests' policies share the control plane; this one is written.
    let ours = format!("{ns}/support-agent-v2");
    let written = writer.once().await;
    assert!(written.contains(&ours));
    assert_eq!(counted("written"), written.len() as u64);
    let policy = policies.get("support-agent-v2").await.unwrap();
    let status = policy.status.clone().unwrap();
    let tool = |name: &str| {
        status
            .tools
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", status.tools))
            .clone()
    };
    let read = tool("read_customer_record");
    assert_eq!((read.clean_completions, read.incidents), (3, 0));
    assert!(read.last_used.is_some());
    assert_eq!(
        (read.autonomy, read.eligible_for),
        (Some(Autonomy::ExceptionBased), Some(Autonomy::AuditBased))
    );
    // People hear of it on the policy; the policy itself is unchanged.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), &ns);
    let event = eventually(
        "the EligibleForAutonomy Event",
        Duration::from_secs(30),
        || async {
            events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("EligibleForAutonomy"))
        },
    )
    .await;
    assert_eq!(
        event.regarding.as_ref().and_then(|r| r.name.as_deref()),
        Some("support-agent-v2")
    );
    let note = event.note.unwrap_or_default();
    assert!(
        note.starts_with("read_customer_record: 3 clean completions and 0 incidents make it eligible for AuditBased (now ExceptionBased)"),
        "{note}"
    );
    assert_eq!(
        policy.metadata.generation,
        Some(1),
        "graduation is never automatic"
    );
    let update = tool("update_order_status");
    assert_eq!((update.clean_completions, update.incidents), (0, 1));
    let email = tool("send_customer_email");
    assert_eq!(
        (email.autonomy, email.eligible_for),
        (Some(Autonomy::Gated), None),
        "irreversible: never eligible"
    );
    let drift = status.drift.clone().unwrap();
    assert_eq!(drift.window, "720h");
    assert_eq!(drift.unused_tools, ["send_customer_email"]);
    assert!(
        status.conditions.iter().any(|c| c.type_ == "Ready"),
        "the operator's conditions stay: {status:?}"
    );
    // Ownership: the gateway's manager holds tools and drift and nothing else of the status.
    let fields = |manager: &str| {
        policy
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter(|f| f.manager.as_deref() == Some(manager))
            .map(|f| serde_json::to_string(&f.fields_v1).unwrap())
            .collect::<String>()
    };
    let gateway_fields = fields("tollgate-gateway");
    assert!(
        gateway_fields.contains("f:tools") && gateway_fields.contains("f:drift"),
        "{gateway_fields}"
    );
    assert!(!gateway_fields.contains("f:conditions"), "{gateway_fields}");
    assert!(!fields("tollgate-operator").contains("f:tools"));

    // Another replica (or the next tick) finds the status fresh and writes nothing.
    eventually(
        "the watch sees the written drift",
        Duration::from_secs(30),
        || {
            let (view, ns) = (view.clone(), ns.clone());
            async move {
                use tollgate_runtime::cluster::ClusterView;
                view.policies()
                    .iter()
                    .any(|p| {
                        p.metadata.namespace.as_deref() == Some(ns.as_str())
                            && p.status.as_ref().is_some_and(|s| s.drift.is_some())
                    })
                    .then_some(())
            }
        },
    )
    .await;
    let fresh = counted("fresh");
    assert!(!writer.once().await.contains(&ours));
    assert!(counted("fresh") > fresh, "left as fresh, and counted so");

    // A change to the spec: the operator writes its status for the new generation and the
    // track record stays; the gateway's next pass reports the tool the change adds as unused.
    let added = sample.replacen(
        "      - name: send_customer_email",
        "      - name: close_ticket\n        upstream: crm\n      - name: send_customer_email",
        1,
    );
    assert_ne!(added, sample);
    std::fs::write(&manifest, &added).unwrap();
    run(cp
        .kubectl(User::Admin)
        .args(["apply", "-n", &ns, "-f"])
        .arg(&manifest));
    let status = eventually(
        "the operator's status for generation 2",
        Duration::from_secs(60),
        || async {
            let status = policies.get("support-agent-v2").await.ok()?.status?;
            (status.observed_generation == Some(2)).then_some(status)
        },
    )
    .await;
    assert_eq!(
        status.tools.len(),
        3,
        "the operator kept the gateway's fields: {status:?}"
    );
    let drift = eventually(
        "the gateway reports the new tool",
        Duration::from_secs(30),
        || async {
            writer.once().await;
            let drift = policies.get("support-agent-v2").await.ok()?.status?.drift?;
            (drift.unused_tools.len() == 2).then_some(drift)
        },
    )
    .await;
    assert_eq!(drift.unused_tools, ["close_ticket", "send_customer_email"]);
}

#[tokio::test]
async fn the_shipped_gateway_manifests_apply_and_grant_only_what_the_gateway_needs() {
    let cp = control_plane();
    install_crds();
    let _ = cp
        .kubectl(User::Admin)
        .args(["create", "namespace", "tollgate-system"])
        .output();
    run(cp
        .kubectl(User::Admin)
        .args(["apply", "-k"])
        .arg(repo_root().join("config/gateway")));
    let sa = "system:serviceaccount:tollgate-system:tollgate-gateway";
    let can = |args: &[&str]| {
        let output = cp
            .kubectl(User::Admin)
            .args(["auth", "can-i", "--as", sa])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).trim() == "yes"
    };
    for allowed in [
        &["create", "tokenreviews.authentication.k8s.io"][..],
        &["create", "subjectaccessreviews.authorization.k8s.io"],
        &["watch", "agentidentities.tollgate.dev", "-A"],
        // Read again before an approved call is released.
        &["get", "agentidentities.tollgate.dev", "-n", "team-a"],
        &["create", "approvalrequests.tollgate.dev", "-n", "team-a"],
        &["patch", "agentidentities.tollgate.dev", "-n", "team-a"],
        &["create", "events.events.k8s.io", "-n", "team-a"],
        &[
            "patch",
            "agentpolicies.tollgate.dev",
            "--subresource=status",
            "-n",
            "team-a",
        ],
        &["get", "secrets/tollgate-notify", "-n", "tollgate-system"],
        &[
            "get",
            "configmaps/tollgate-kill-switch",
            "-n",
            "tollgate-system",
        ],
    ] {
        assert!(can(allowed), "the gateway must be able to {allowed:?}");
    }
    for refused in [
        &["update", "agentidentities.tollgate.dev", "-n", "team-a"][..],
        &["patch", "agentpolicies.tollgate.dev", "-n", "team-a"],
        &["update", "agentpolicies.tollgate.dev", "-n", "team-a"],
        &["get", "secrets", "-n", "team-a"],
        &["get", "configmaps", "-n", "tollgate-system"],
        &[
            "create",
            "rolebindings.rbac.authorization.k8s.io",
            "-n",
            "team-a",
        ],
    ] {
        assert!(!can(refused), "the gateway must not be able to {refused:?}");
    }
    // The e2e admission harness itself lets the gateway's name patch ApprovalRequests (to test
    // admission), so that one is checked on the shipped role: the gateway never decides them.
    let rbac = std::fs::read_to_string(repo_root().join("config/gateway/rbac.yaml")).unwrap();
    for document in serde_yaml::Deserializer::from_str(&rbac) {
        let role = <Value as serde::Deserialize>::deserialize(document).unwrap();
        for rule in role["rules"].as_array().into_iter().flatten() {
            let verbs: Vec<&str> = rule["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            let resources = rule["resources"].to_string();
            if resources.contains("agentidentities") && verbs == ["patch"] {
                // Engaging a kill switch after a breach; admission refuses any other change.
                continue;
            }
            if resources.contains("approvalrequests") || resources.contains("agentidentities") {
                assert!(
                    verbs
                        .iter()
                        .all(|v| ["create", "get", "list", "watch"].contains(v)),
                    "{resources}: {verbs:?}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_breach_engages_the_kill_switch_as_the_gateway_records_an_event_and_notifies() {
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::api::events::v1::Event;
    use kube::api::PostParams;
    use tollgate_crds::AgentIdentity;
    use tollgate_gateway::escalate::{Breach, Escalation, NOTIFY_SECRET};

    let cp = control_plane();
    install_crds();
    webhook();
    let admin = cp.client(User::Admin).await;
    let ns = tollgate_e2e::admission::namespace("breach").await;
    let manifest = repo_root().join(format!("target/e2e-runs/breach-{ns}.yaml"));
    std::fs::copy(
        repo_root().join("config/samples/support-agent.yaml"),
        &manifest,
    )
    .unwrap();
    run(cp
        .kubectl(User::Admin)
        .args(["apply", "-n", &ns, "-f"])
        .arg(&manifest));

    // A Slack-compatible sink, named by a target in the notification Secret.
    let received: Arc<std::sync::Mutex<Vec<Value>>> = Arc::default();
    let sink = {
        let received = received.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                let received = received.clone();
                async move {
                    received.lock().unwrap().push(body);
                    "ok"
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, sink).await.unwrap() });
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": NOTIFY_SECRET},
        "stringData": {"oncall-agents": url}
    }))
    .unwrap();
    Api::<Secret>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();

    let as_gateway = cp.client_as(GATEWAY).await;
    let escalation = Arc::new(Escalation::cluster(as_gateway.clone(), &ns));
    let engaged = escalation
        .escalate(Breach {
            namespace: ns.clone(),
            name: "support-agent-v2".into(),
            run: "run-9".into(),
            clause: "spec.execution.maxTokensPerRun".into(),
            policy: format!("{ns}/support-agent-v2 sha256:0"),
            notify: vec!["oncall-agents".into()],
            engage_kill_switch: true,
        })
        .await;
    assert!(engaged);
    let identities: Api<AgentIdentity> = Api::namespaced(admin.clone(), &ns);
    let identity = identities.get("support-agent-v2").await.unwrap();
    assert!(
        identity.spec.kill_switch.engaged,
        "the breach engaged the switch"
    );
    assert!(
        identity
            .spec
            .kill_switch
            .reason
            .as_deref()
            .unwrap()
            .contains("run-9")
    );
    assert_eq!(
        identity
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("tollgate.dev/kill-switch-engaged-by"))
            .map(String::as_str),
        Some(GATEWAY),
        "admission stamps the gateway as the engager"
    );
    eventually(
        "the BudgetExceeded Event",
        Duration::from_secs(20),
        || async {
            Api::<Event>::namespaced(admin.clone(), &ns)
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("BudgetExceeded")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some("support-agent-v2")
                })
        },
    )
    .await;
    eventually("the notification", Duration::from_secs(20), || async {
        received.lock().unwrap().first().cloned()
    })
    .await;
    let text = received.lock().unwrap()[0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        text.contains("run-9") && text.contains("maxTokensPerRun"),
        "{text}"
    );

    // The gateway can engage a switch and nothing else: releasing it or widening the agent is
    // refused by admission even though RBAC lets it patch.
    let as_gateway_identities: Api<AgentIdentity> = Api::namespaced(as_gateway, &ns);
    let release = as_gateway_identities
        .patch(
            "support-agent-v2",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"killSwitch": {"engaged": false}}})),
        )
        .await
        .unwrap_err();
    assert!(release.to_string().contains("never release"), "{release}");
    let widen = as_gateway_identities
        .patch(
            "support-agent-v2",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"kubernetes": {"rules": [
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]}}})),
        )
        .await
        .unwrap_err();
    assert!(
        widen.to_string().contains("nothing in an AgentIdentity"),
        "{widen}"
    );
}

/// The value of the sample named exactly `name` in a Prometheus text exposition, if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map(|value| value.parse().unwrap())
}

#[tokio::test]
async fn the_shipped_cluster_gateway_answers_agents_over_tls_and_counts_on_the_probe_port() {
    // The gateway as `tollgate-gateway --audit …` runs it (`run::in_cluster`): the other tests
    // here build their gateway in-process.
    let cp = control_plane();
    install_crds();
    let ns = cp.namespace("gateway-cluster").await;
    run(cp
        .kubectl(User::Admin)
        .args(["apply", "-n", &ns, "-f"])
        .arg(repo_root().join("config/samples/support-agent.yaml")));
    let token = support_agent_token(&ns);
    let token = token.as_str();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.db");
    let running = tollgate_e2e::admission::start(
        "cluster-gateway",
        tollgate_e2e::admission::Trail::Gateway(format!("sqlite:{}", audit.display())),
    );
    let url = format!("https://127.0.0.1:{}", running.gateway.unwrap());
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(running.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();

    first_allow(&http, &url, token, &ns).await;
    let (status, blocked) = call(
        &http,
        &url,
        token,
        "run-1",
        "delete_customer_record",
        json!({}),
    )
    .await;
    assert_eq!((status, &blocked["decision"]), (200, &json!("deny")));
    let code = blocked["code"].as_str().unwrap();

    // Agents reach the gateway's port: it serves them no metrics.
    let response = http.get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 404);

    // The probe port has the gateway's and the audit writer's, beside admission's.
    let metrics = tollgate_e2e::http_get(running.probe, "/metrics");
    let allows = sample(
        &metrics,
        &format!(
            "tollgate_gateway_decisions_total{{agent=\"support-agent-v2\",code=\"\",decision=\"allow\",namespace=\"{ns}\"}}"
        ),
    );
    assert!(allows >= Some(1.0), "{metrics}");
    let denials = format!(
        "tollgate_gateway_decisions_total{{agent=\"support-agent-v2\",code=\"{code}\",decision=\"deny\",namespace=\"{ns}\"}}"
    );
    assert_eq!(sample(&metrics, &denials), Some(1.0), "{metrics}");
    // Every record in the trail was counted in a committed batch.
    let recorded: i64 = rusqlite::Connection::open(&audit)
        .unwrap()
        .query_row("SELECT count(*) FROM tollgate_audit_records", [], |row| {
            row.get(0)
        })
        .unwrap();
    assert!(recorded >= 2, "{recorded}");
    assert_eq!(
        sample(&metrics, "tollgate_audit_batch_records_sum"),
        Some(recorded as f64),
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "tollgate_audit_batches_total{outcome=\"committed\"}"
        ) >= Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "tollgate_audit_batches_total{outcome=\"failed\"}"),
        Some(0.0),
        "{metrics}"
    );
}

/// The gateway's readiness probe and its standing writer both wait for the watches to sync; on
/// a real node the probe stayed 503 for good in about half of the starts, because the store's
/// readiness future woke only one of its waiters. Every waiter returns now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_waiting_for_the_watches_to_sync_is_woken() {
    let cp = control_plane();
    install_crds();
    for _ in 0..3 {
        let view = WatchedView::start(cp.client(User::Admin).await, "tollgate-system");
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let view = view.clone();
                tokio::spawn(async move { view.ready().await })
            })
            .collect();
        for waiter in waiters {
            tokio::time::timeout(Duration::from_secs(20), waiter)
                .await
                .expect("a task waiting for the watches to sync was never woken")
                .unwrap();
        }
    }
}

#[tokio::test]
async fn approvers_in_a_cluster_hear_of_a_request_and_of_who_approved_it() {
    let cp = control_plane();
    install_crds();
    webhook();
    let admin = cp.client(User::Admin).await;
    let ns = tollgate_e2e::admission::namespace("notify").await;
    let sample = std::fs::read_to_string(repo_root().join("config/samples/support-agent.yaml"))
        .unwrap()
        .replace("groups: [support-leads]", "groups: [tollgate-approvers]")
        .replacen(
            "          onTimeout: Deny",
            "          onTimeout: Deny\n          notify: [leads-chat]",
            1,
        );
    let manifest = repo_root().join(format!("target/e2e-runs/notify-{ns}.yaml"));
    std::fs::write(&manifest, &sample).unwrap();
    run(cp
        .kubectl(User::Admin)
        .args(["apply", "-n", &ns, "-f"])
        .arg(&manifest));
    let token = support_agent_token(&ns);

    // A Slack-compatible receiver, named in the notification Secret of the gateway's namespace.
    let received: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let sink = {
        let received = received.clone();
        axum::Router::new().route(
            "/chat",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                let received = received.clone();
                async move {
                    received
                        .lock()
                        .unwrap()
                        .push(body["text"].as_str().unwrap_or_default().to_owned());
                    "ok"
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/chat", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, sink).await.unwrap() });
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": gateway::escalate::NOTIFY_SECRET},
        "stringData": {"leads-chat": url}
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin.clone(), &ns)
        .create(&kube::api::PostParams::default(), &secret)
        .await
        .unwrap();

    let view = WatchedView::start(admin.clone(), "tollgate-system");
    view.ready().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("audit.db")).unwrap());
    let (log, _) = AuditLog::open(store, WriterConfig::new("gw-notify"))
        .await
        .unwrap();
    let as_gateway = cp.client_as(GATEWAY).await;
    let gateway = Gateway::new(
        gateway::Policies::Cluster(ClusterPolicies::new(Arc::new(view), as_gateway.clone())),
        TokenReviewer::new(admin.clone()),
        log,
        Redactor::default(),
    )
    .with_escalation(gateway::Escalation::cluster(as_gateway, &ns));
    let gateway_url = tollgate_e2e::serve_gateway(gateway).await;

    let http = reqwest::Client::new();
    let (status, asked) = post_decide(
        &http,
        &gateway_url,
        &token,
        json!({"runId": "run-n", "tool": "send_customer_email", "arguments": email("notified"),
               "wait": false}),
    )
    .await;
    assert_eq!(status, 202, "{asked}");
    let name = asked["approvalRequest"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let texts = || received.lock().unwrap().clone();
    let created = eventually(
        "the request is announced",
        Duration::from_secs(20),
        || async {
            texts()
                .into_iter()
                .find(|t| t.contains("waits for approval"))
        },
    )
    .await;
    for words in [
        format!("agent {ns}/support-agent-v2 waits for approval to call send_customer_email"),
        format!("kubectl tollgate approve {name} -n {ns}"),
        format!("kubectl tollgate deny {name} -n {ns}"),
        "groups tollgate-approvers".to_owned(),
    ] {
        assert!(created.contains(&words), "{words:?} not in {created}");
    }
    // Alice decides with the command the message names; admission stamps her, and the outcome
    // names her.
    alice_approves(&ns, &name, "ok").await;
    let decided = eventually(
        "the outcome is announced",
        Duration::from_secs(20),
        || async { texts().into_iter().find(|t| t.contains("approved by")) },
    )
    .await;
    assert!(
        decided.contains(&format!("{ns}/{name}")) && decided.contains("approved by alice"),
        "{decided}"
    );
}
