//! The admission face on the real apiserver: the webhook runs in this process over TLS on
//! 127.0.0.1, is registered by URL with its caBundle, and the kube-apiserver calls it.
//!
//! The webhook configurations only match namespaces labelled `tollgate-e2e/admission=enabled`,
//! so the other e2e tests in this binary are untouched.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tollgate_crds::{AgentIdentity, AgentPolicy, ApprovalRequest};
use tollgate_e2e::admission::{GATEWAY, namespace, webhook};
use tollgate_e2e::{User, control_plane, eventually, install_crds};

fn identity(name: &str, rules: Value, killed: bool) -> AgentIdentity {
    serde_json::from_value(json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": {"name": name},
        "spec": {"description": "e2e agent", "owner": {"team": "e2e", "contacts": ["alice"]},
                 "podSelector": {"matchLabels": {"app": name}}, "kubernetes": {"rules": rules},
                 "killSwitch": {"engaged": killed}}
    }))
    .unwrap()
}

fn policy(name: &str, kubernetes: Value) -> AgentPolicy {
    serde_json::from_value(json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentPolicy",
        "metadata": {"name": name},
        "spec": {"identityRef": {"name": name}, "kubernetes": kubernetes}
    }))
    .unwrap()
}

/// Creates the policy and the identity, and what the operator will create for it (its
/// ServiceAccount, Role and RoleBinding, built by the engine); returns a client holding a
/// TokenRequest token of the agent's ServiceAccount, once the webhook knows the agent.
async fn agent(ns: &str, name: &str, rules: Value, kubernetes: Value) -> Client {
    let cp = control_plane();
    let admin = cp.client(User::Admin).await;
    Api::<AgentPolicy>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &policy(name, kubernetes))
        .await
        .unwrap();
    let identity = Api::<AgentIdentity>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &identity(name, rules, false))
        .await
        .unwrap();
    let gateway = tollgate_engine::children::GatewayPeer {
        namespace: "tollgate-system".into(),
        pod_labels: BTreeMap::new(),
        port: 8443,
    };
    let children = tollgate_engine::children::desired_children(&identity, &gateway, false).unwrap();
    let pp = PostParams::default();
    Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create(&pp, &children.service_account)
        .await
        .unwrap();
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&pp, &children.role)
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(&pp, children.role_binding.as_ref().unwrap())
        .await
        .unwrap();
    let sa = identity.service_account_name();
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["https://kubernetes.default.svc.cluster.local".into()],
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create_token_request(&sa, &pp, &request)
        .await
        .unwrap();
    let token = token.status.unwrap().token;
    // The webhook learns of the identity by watch: wait until it refuses a pod with the wrong
    // labels for this ServiceAccount (a server-side dry run changes nothing).
    let pods: Api<Pod> = Api::namespaced(admin, ns);
    let probe = pod(&sa, "someone-else");
    eventually(
        "the webhook to know the agent",
        Duration::from_secs(30),
        || {
            let (pods, probe) = (pods.clone(), probe.clone());
            async move {
                pods.create(
                    &PostParams {
                        dry_run: true,
                        ..Default::default()
                    },
                    &probe,
                )
                .await
                .is_err()
                .then_some(())
            }
        },
    )
    .await;
    cp.client_with_token(&token).await
}

fn pod(service_account: &str, app: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "agent-", "labels": {"app": app}},
        "spec": {"serviceAccountName": service_account, "containers": [{"name": "agent", "image": "registry.example.com/agent:1"}]}
    }))
    .unwrap()
}

fn refusal<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> String {
    match result {
        Err(kube::Error::Api(status)) => status.message,
        other => panic!("expected the apiserver to refuse, got {other:?}"),
    }
}

fn deployment(name: &str, labels: Value) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
        "spec": {"selector": {"matchLabels": {"app": name}}, "template": {"metadata": {"labels": {"app": name}},
                 "spec": {"containers": [{"name": "c", "image": "registry.example.com/web:1"}]}}}
    }))
    .unwrap()
}

#[tokio::test]
async fn an_agent_cannot_delete_production_even_with_rbac() {
    webhook();
    let ns = namespace("adm-prod").await;
    let admin = control_plane().client(User::Admin).await;
    let deployments: Api<Deployment> = Api::namespaced(admin, &ns);
    deployments
        .create(
            &PostParams::default(),
            &deployment("web-prod", json!({"env": "production"})),
        )
        .await
        .unwrap();
    deployments
        .create(&PostParams::default(), &deployment("web-test", json!({})))
        .await
        .unwrap();
    let rules = json!([{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "delete"]}]);
    let guards = json!({"protectedResources": [{"operations": ["DELETE"], "selector": {"matchLabels": {"env": "production"}}}]});
    let agent = agent(&ns, "deployer", rules, guards).await;
    let as_agent: Api<Deployment> = Api::namespaced(agent, &ns);

    let message = refusal(as_agent.delete("web-prod", &DeleteParams::default()).await);
    assert!(
        message.contains("spec.kubernetes.protectedResources[0]")
            && message.contains("DELETE of apps deployments web-prod"),
        "{message}"
    );
    assert!(
        deployments.get("web-prod").await.is_ok(),
        "the production Deployment is still there"
    );
    as_agent
        .delete("web-test", &DeleteParams::default())
        .await
        .expect("an unprotected Deployment can be deleted");

    // Both verdicts are in admission's audit trail, under the agent's ServiceAccount, with the
    // rule behind the refusal; the admin's own writes are not.
    use tollgate_audit::{Event, Query, SqliteStore, Store};
    let trail = SqliteStore::open(tollgate_e2e::admission::admission_trail()).unwrap();
    let records = trail
        .query(&Query {
            agent: Some(format!("{ns}/deployer")),
            ..Query::default()
        })
        .await
        .unwrap();
    let probes = records
        .iter()
        .map(|r| r.entry().unwrap())
        .filter(|e| {
            let write = e.arguments.clone().unwrap_or_default();
            write["resource"] == "pods" && write["dryRun"] == true
        })
        .count();
    assert!(probes >= 1, "the dry-run probes are recorded as dry runs");
    let deletes: Vec<_> = records
        .iter()
        .map(|r| r.entry().unwrap())
        .filter(|e| e.event == Event::Admission)
        // The pods the helper probed the webhook with (server-side dry runs) are recorded too.
        .filter(|e| e.arguments.as_ref().unwrap()["resource"] == "deployments")
        .map(|e| {
            let write = e.arguments.clone().unwrap();
            assert_eq!(
                e.identity.username,
                format!("system:serviceaccount:{ns}:agent-deployer")
            );
            (
                write["operation"].as_str().unwrap().to_owned(),
                write["name"].as_str().unwrap().to_owned(),
                tollgate_audit::record::outcome_of(e.decision.as_ref().unwrap()),
                e.decision.as_ref().unwrap().rule().clause.to_string(),
            )
        })
        .collect();
    assert_eq!(
        deletes,
        [
            (
                "DELETE".to_owned(),
                "web-prod".to_owned(),
                "deny:WriteRefused".to_owned(),
                "spec.kubernetes.protectedResources[0]".to_owned()
            ),
            (
                "DELETE".to_owned(),
                "web-test".to_owned(),
                "allow".to_owned(),
                "spec.kubernetes".to_owned()
            ),
        ]
    );
}

#[tokio::test]
async fn freeze_windows_and_the_kill_switch_block_writes_rbac_allows() {
    webhook();
    let ns = namespace("adm-freeze").await;
    let rules = json!([{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "update"]}]);
    let now = jiff::Timestamp::now();
    let window = json!({"freezeWindows": [{"start": (now - jiff::SignedDuration::from_hours(1)).to_string(), "end": (now + jiff::SignedDuration::from_hours(1)).to_string(), "reason": "e2e freeze"}]});
    let frozen = agent(&ns, "frozen", rules.clone(), window).await;
    let message = refusal(
        Api::<ConfigMap>::namespaced(frozen, &ns)
            .create(&PostParams::default(), &config_map("a"))
            .await,
    );
    assert!(
        message.contains("freezeWindows[0]") && message.contains("e2e freeze"),
        "{message}"
    );

    let free = agent(&ns, "free", rules, json!({})).await;
    let as_free: Api<ConfigMap> = Api::namespaced(free, &ns);
    as_free
        .create(&PostParams::default(), &config_map("before"))
        .await
        .expect("RBAC allows it and nothing forbids it");
    let admin = control_plane().client(User::Admin).await;
    let kill = json!({"spec": {"killSwitch": {"engaged": true, "reason": "e2e"}}});
    Api::<AgentIdentity>::namespaced(admin, &ns)
        .patch("free", &PatchParams::default(), &Patch::Merge(&kill))
        .await
        .unwrap();
    let message = eventually(
        "the kill switch to block writes",
        Duration::from_secs(30),
        || {
            let api = as_free.clone();
            async move {
                api.create(&PostParams::default(), &config_map("after"))
                    .await
                    .err()
                    .map(|e| e.to_string())
            }
        },
    )
    .await;
    assert!(
        message.contains("kill switch of agent free is engaged"),
        "{message}"
    );
}

fn config_map(name: &str) -> ConfigMap {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": "v"}})).unwrap()
}

fn approval_request(name: &str, expires_in: jiff::SignedDuration) -> Value {
    json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "ApprovalRequest",
        "metadata": {"name": name},
        "spec": {"identityRef": {"name": "mailer"}, "policyRef": {"name": "mailer", "policyHash": format!("sha256:{}", "a".repeat(64))},
                 "runId": "run-1", "step": 1, "tool": "send_customer_email", "arguments": {"to": "C000001"},
                 "argumentsDigest": format!("sha256:{}", "b".repeat(64)), "reason": "tool send_customer_email is irreversible",
                 "approvers": {"groups": ["tollgate-approvers"]}, "minApprovals": 1,
                 "expiresAt": (jiff::Timestamp::now() + expires_in).strftime("%Y-%m-%dT%H:%M:%SZ").to_string()}
    })
}

/// Creates `request` in `ns` as the gateway would (only the gateway may).
fn create_as_gateway(ns: &str, name: &str, request: Value) {
    let output = tollgate_e2e::with_input(
        control_plane()
            .kubectl(User::Admin)
            .args(["create", "-n", ns, "--as", GATEWAY, "-f", "-"]),
        &request.to_string(),
    );
    assert!(
        output.status.success(),
        "the gateway creates {name}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn append(verdict: &str, user: &str) -> Patch<Value> {
    Patch::Json(serde_json::from_value(json!([{"op": "add", "path": "/spec/decisions/-", "value": {"verdict": verdict, "user": user}}])).unwrap())
}

#[tokio::test]
async fn approvals_are_stamped_and_cannot_be_forged() {
    webhook();
    let cp = control_plane();
    let ns = namespace("adm-approve").await;
    let mailer = agent(&ns, "mailer", json!([]), json!({})).await;
    let as_gateway = |name: &str, request: Value| create_as_gateway(&ns, name, request);
    as_gateway(
        "req-1",
        approval_request("req-1", jiff::SignedDuration::from_mins(5)),
    );

    let alice: Api<ApprovalRequest> = Api::namespaced(cp.client(User::Alice).await, &ns);
    let carol: Api<ApprovalRequest> = Api::namespaced(cp.client(User::Carol).await, &ns);
    let agent: Api<ApprovalRequest> = Api::namespaced(mailer, &ns);
    let pp = PatchParams::default();

    let message = refusal(carol.patch("req-1", &pp, &append("Approve", "carol")).await);
    assert!(message.contains("carol is not an approver"), "{message}");
    let message = refusal(agent.patch("req-1", &pp, &append("Approve", "alice")).await);
    assert!(
        message.contains("self-escalation")
            || message.contains("its own call")
            || message.contains("forbidden"),
        "{message}"
    );

    let approved = alice
        .patch("req-1", &pp, &append("Approve", "bob"))
        .await
        .expect("alice may approve");
    let decision = &approved.spec.decisions[0];
    assert_eq!(
        decision.user.as_deref(),
        Some("alice"),
        "the decision is stamped with the authenticated user, not the written one"
    );
    assert!(decision.at.is_some());
    let message = refusal(alice.patch("req-1", &pp, &append("Deny", "alice")).await);
    assert!(message.contains("alice has already decided"), "{message}");
    let message = refusal(
        Api::<ApprovalRequest>::namespaced(cp.client(User::Alice).await, &ns)
            .create(
                &PostParams::default(),
                &serde_json::from_value(approval_request(
                    "forged",
                    jiff::SignedDuration::from_mins(5),
                ))
                .unwrap(),
            )
            .await,
    );
    assert!(message.contains("only the Tollgate gateway"), "{message}");

    as_gateway(
        "req-2",
        approval_request("req-2", jiff::SignedDuration::from_secs(3)),
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let message = refusal(alice.patch("req-2", &pp, &append("Approve", "alice")).await);
    assert!(message.contains("expired"), "{message}");
}

/// `kubectl tollgate approve|deny|kill|unkill`, as people run them: each is one write as the
/// caller, stamped and checked by admission, and a refusal comes back with admission's reason.
#[tokio::test]
async fn people_decide_and_kill_with_kubectl_tollgate() {
    use kubectl_tollgate::people;
    use tollgate_crds::approval::Verdict;
    webhook();
    let cp = control_plane();
    let ns = namespace("adm-cli").await;
    let decide =
        |user: User, name: &'static str, verdict: Verdict, comment: Option<&'static str>| {
            let ns = ns.clone();
            async move {
                let client = control_plane().client(user).await;
                people::decide(client, &ns, name, verdict, comment).await
            }
        };
    agent(&ns, "mailer", json!([]), json!({})).await;
    create_as_gateway(
        &ns,
        "req-cli",
        approval_request("req-cli", jiff::SignedDuration::from_mins(5)),
    );

    let refused = decide(User::Carol, "req-cli", Verdict::Approve, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains(&format!("approvalrequest {ns}/req-cli: refused"))
            && refused.contains("carol is not an approver"),
        "{refused}"
    );
    let missing = decide(User::Bob, "no-such-request", Verdict::Approve, None)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        missing,
        format!("approvalrequest {ns}/no-such-request not found")
    );

    let printed = decide(
        User::Bob,
        "req-cli",
        Verdict::Deny,
        Some("not this customer"),
    )
    .await
    .unwrap();
    assert!(
        printed.starts_with(&format!(
            "approvalrequest {ns}/req-cli denied: phase Denied, the call will not be released"
        )),
        "{printed}"
    );
    let requests: Api<ApprovalRequest> = Api::namespaced(cp.client(User::Admin).await, &ns);
    let decided = requests.get("req-cli").await.unwrap();
    let decision = &decided.spec.decisions[0];
    assert_eq!(
        (
            decision.verdict,
            decision.user.as_deref(),
            decision.comment.as_deref()
        ),
        (Verdict::Deny, Some("bob"), Some("not this customer"))
    );
    // Deciding twice is refused, with admission's reason.
    let refused = decide(User::Bob, "req-cli", Verdict::Approve, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("bob has already decided"), "{refused}");
    assert_eq!(
        requests.get("req-cli").await.unwrap().spec.decisions.len(),
        1
    );

    // An agent's switch: engaged with the reason, then released.
    let identities: Api<AgentIdentity> = Api::namespaced(cp.client(User::Admin).await, &ns);
    let switch = |identity: AgentIdentity| {
        let switch = identity.spec.kill_switch;
        (switch.engaged, switch.reason)
    };
    people::kill(
        cp.client(User::Admin).await,
        Some("mailer"),
        &ns,
        "unused",
        true,
        Some("cli drill"),
    )
    .await
    .unwrap();
    assert_eq!(
        switch(identities.get("mailer").await.unwrap()),
        (true, Some("cli drill".to_owned()))
    );
    people::kill(
        cp.client(User::Admin).await,
        Some("mailer"),
        &ns,
        "unused",
        false,
        None,
    )
    .await
    .unwrap();
    assert!(!switch(identities.get("mailer").await.unwrap()).0);
    // carol may not touch it.
    let refused = people::kill(
        cp.client(User::Carol).await,
        Some("mailer"),
        &ns,
        "unused",
        true,
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains(&format!("agentidentity {ns}/mailer: refused (403)")),
        "{refused}"
    );

    // The global switch, in a namespace of this test's own (the cluster's real one would stop
    // the other tests' agents): created engaged with its reason, then released.
    let maps: Api<ConfigMap> = Api::namespaced(cp.client(User::Admin).await, &ns);
    let global = || async {
        maps.get("tollgate-kill-switch")
            .await
            .unwrap()
            .data
            .unwrap()
    };
    people::kill(
        cp.client(User::Admin).await,
        None,
        "",
        &ns,
        true,
        Some("incident 7"),
    )
    .await
    .unwrap();
    let data = global().await;
    assert_eq!(
        (data["engaged"].as_str(), data["reason"].as_str()),
        ("true", "incident 7")
    );
    people::kill(cp.client(User::Admin).await, None, "", &ns, false, None)
        .await
        .unwrap();
    let data = global().await;
    assert_eq!(data["engaged"], "false");
}

#[tokio::test]
async fn agent_pods_must_match_their_identity() {
    webhook();
    let ns = namespace("adm-pods").await;
    let _ = agent(&ns, "runner", json!([]), json!({})).await;
    let pods: Api<Pod> = Api::namespaced(control_plane().client(User::Admin).await, &ns);
    let message = refusal(
        pods.create(&PostParams::default(), &pod("agent-runner", "impostor"))
            .await,
    );
    assert!(
        message.contains("must match the podSelector of AgentIdentity runner"),
        "{message}"
    );
    let created = pods
        .create(&PostParams::default(), &pod("agent-runner", "runner"))
        .await
        .expect("a matching pod is admitted");
    let spec = created.spec.unwrap();
    let volume = spec
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "tollgate-token")
        .expect("the token volume is injected");
    let token = &volume.projected.unwrap().sources.unwrap()[0]
        .service_account_token
        .clone()
        .unwrap();
    assert_eq!(token.audience.as_deref(), Some("tollgate"));
    let env = spec.containers[0].env.clone().unwrap();
    assert!(env.iter().any(|e| e.name == "TOLLGATE_URL"), "{env:?}");
}

#[tokio::test]
async fn an_invalid_policy_is_refused_at_apply_with_every_message() {
    webhook();
    let cp = control_plane();
    let ns = namespace("adm-policy").await;
    let dir = cp.dir().join("adm-policy");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policy.yaml");
    std::fs::write(
        &file,
        r#"apiVersion: tollgate.dev/v1alpha1
kind: AgentPolicy
metadata: {name: broken}
spec:
  identityRef: {name: broken}
  tools:
    allowed:
      - name: lookup
        arguments:
          fields:
            id: {type: string, pattern: "C[0-9"}
      - name: update
        when: "args.ids.all(id, "
"#,
    )
    .unwrap();
    let output = cp
        .kubectl(User::Admin)
        .args(["apply", "-n", &ns, "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "spec.tools.allowed[0].arguments.fields.id.pattern: invalid regular expression",
        "spec.tools.allowed[1].when: invalid CEL",
        "2 problem(s)",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in: {stderr}"
        );
    }
}

#[tokio::test]
async fn the_shipped_webhook_configuration_is_valid() {
    install_crds();
    let cp = control_plane();
    let file = tollgate_e2e::repo_root().join("config/webhook/manifests.yaml");
    let output = cp
        .kubectl(User::Admin)
        .args(["apply", "--dry-run=server", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "config/webhook/manifests.yaml is refused: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
