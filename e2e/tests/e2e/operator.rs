//! The operator on the real control plane, as its own ServiceAccount with the shipped RBAC:
//! identities become exactly-scoped objects that follow the spec, the kill switches (the
//! agent's and the cluster-wide one) take rights and egress away and give them back, approvals
//! settle, expire on time and are pruned after retention, and one replica leads.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tollgate_crds::approval::Phase;
use tollgate_crds::{AgentIdentity, AgentPolicy, ApprovalRequest};
use tollgate_e2e::admission::{GATEWAY, webhook};
use tollgate_e2e::operator::{Operator, Options};
use tollgate_e2e::{User, control_plane, eventually, repo_root};
use tollgate_operator::leader::Timing;

const WAIT: Duration = Duration::from_secs(30);
const AGENT: &str = "support-agent-v2";

/// The sample support agent (identity and policy) applied with kubectl into `ns`.
fn apply_sample(ns: &str) {
    let sample = std::fs::read_to_string(repo_root().join("config/samples/support-agent.yaml"))
        .unwrap()
        .replace("groups: [support-leads]", "groups: [tollgate-approvers]");
    apply_text(ns, &sample);
}

fn apply_text(ns: &str, text: &str) {
    let file = repo_root().join(format!(
        "target/e2e-runs/operator-{ns}-{}.yaml",
        Timestamp::now().as_nanosecond()
    ));
    std::fs::write(&file, text).unwrap();
    let output = control_plane()
        .kubectl(User::Admin)
        .args(["apply", "-n", ns, "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What the apiserver's authorizer answers for `subject` doing `verb` on `resource`
/// (`plural` or `plural.group`) in `ns`: a SubjectAccessReview, asked by the admin, so no
/// admission of the agent's own requests is involved.
fn can_i(ns: &str, subject: &str, verb: &str, resource: &str) -> bool {
    let (resource, group) = resource.split_once('.').unwrap_or((resource, ""));
    let review = json!({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {
            "user": subject,
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
            "resourceAttributes": {"namespace": ns, "verb": verb, "group": group, "resource": resource}
        }
    });
    let output = tollgate_e2e::with_input(
        control_plane()
            .kubectl(User::Admin)
            .args(["create", "-o", "json", "-f", "-"]),
        &review.to_string(),
    );
    assert!(
        output.status.success(),
        "SubjectAccessReview: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    answer["status"]["allowed"] == true
}

fn condition(identity: &AgentIdentity, type_: &str) -> Option<(String, String, String)> {
    identity
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn identity_where(
    api: &Api<AgentIdentity>,
    name: &str,
    what: &str,
    check: impl Fn(&AgentIdentity) -> bool,
) -> AgentIdentity {
    eventually(what, WAIT, || async {
        api.get(name).await.ok().filter(|i| check(i))
    })
    .await
}

fn ready(identity: &AgentIdentity) -> bool {
    condition(identity, "Ready").is_some_and(|c| c.0 == "True")
        && identity.status.as_ref().and_then(|s| s.observed_generation)
            == identity.metadata.generation
}

/// An ApprovalRequest as the gateway creates it.
async fn request_approval(ns: &str, name: &str, min_approvals: i32, expires_in: Duration) {
    let arguments = json!({"to": "c@example.com", "subject": name});
    let request: ApprovalRequest = serde_json::from_value(json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "ApprovalRequest",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "identityRef": {"name": AGENT},
            "policyRef": {"name": AGENT, "policyHash": format!("sha256:{}", "0".repeat(64))},
            "runId": "run-1", "step": 1, "tool": "send_customer_email",
            "argumentsDigest": tollgate_engine::canonical::digest(&arguments),
            "arguments": arguments,
            "reason": "tool send_customer_email is irreversible",
            "approvers": {"groups": ["tollgate-approvers"]},
            "minApprovals": min_approvals,
            "expiresAt": (Timestamp::now() + jiff::SignedDuration::try_from(expires_in).unwrap()).to_string(),
            "onTimeout": "Deny"
        }
    }))
    .unwrap();
    Api::<ApprovalRequest>::namespaced(control_plane().client_as(GATEWAY).await, ns)
        .create(&PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("the gateway creates {name}: {e}"));
}

fn decide(ns: &str, user: User, name: &str, verdict: &str) -> Result<(), String> {
    let patch = json!([{"op": "add", "path": "/spec/decisions/-", "value": {"verdict": verdict}}]);
    let output = control_plane()
        .kubectl(user)
        .args([
            "patch",
            "approvalrequest",
            name,
            "-n",
            ns,
            "--type",
            "json",
            "-p",
        ])
        .arg(patch.to_string())
        .output()
        .unwrap();
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

async fn phase_of(api: &Api<ApprovalRequest>, name: &str) -> Option<(Phase, Option<String>)> {
    let request = api.get(name).await.ok()?;
    let status = request.status?;
    Some((status.phase, status.reason))
}

async fn events_for(client: &Client, ns: &str, name: &str) -> Vec<(String, String)> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

/// Waits for an Event with `reason` about the object `name`. The operator publishes an Event
/// after writing the status it explains, so a test that saw the status waits for the Event too.
async fn event_for(client: &Client, ns: &str, name: &str, reason: &str) {
    eventually(&format!("a {reason} Event on {name}"), WAIT, || async {
        events_for(client, ns, name)
            .await
            .iter()
            .any(|(r, _)| r == reason)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_becomes_scoped_objects_that_follow_its_spec_and_its_kill_switch() {
    let cp = control_plane();
    webhook();
    let admin = cp.client(User::Admin).await;
    let ns = tollgate_e2e::admission::namespace("operator").await;
    let operator = Operator::start(&ns, Options::default());
    apply_sample(&ns);

    let identities: Api<AgentIdentity> = Api::namespaced(admin.clone(), &ns);
    let identity = identity_where(&identities, AGENT, "the identity to be Ready", ready).await;
    let uid = identity.metadata.uid.clone().unwrap();
    let status = identity.status.clone().unwrap();
    assert_eq!(
        status.service_account_name.as_deref(),
        Some("agent-support-agent-v2")
    );
    let sa = format!("system:serviceaccount:{ns}:agent-support-agent-v2");
    assert_eq!(status.username.as_deref(), Some(sa.as_str()));
    for type_ in ["RBACApplied", "NetworkIsolated"] {
        assert_eq!(condition(&identity, type_).unwrap().0, "True", "{type_}");
    }
    assert_eq!(
        condition(&identity, "KillSwitchEngaged").unwrap().0,
        "False"
    );

    // The children, owned by the identity, hold exactly what it declares.
    let owned_by_identity =
        |refs: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>| {
            refs.is_some_and(|r| {
                r.len() == 1
                    && r[0].uid == uid
                    && r[0].kind == "AgentIdentity"
                    && r[0].controller == Some(true)
            })
        };
    let account = Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .get("agent-support-agent-v2")
        .await
        .unwrap();
    assert_eq!(account.automount_service_account_token, Some(false));
    assert!(owned_by_identity(
        account.metadata.owner_references.as_ref()
    ));
    let child = "tollgate-agent-support-agent-v2";
    let role = Api::<Role>::namespaced(admin.clone(), &ns)
        .get(child)
        .await
        .unwrap();
    assert!(owned_by_identity(role.metadata.owner_references.as_ref()));
    let rules = role.rules.unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["configmaps".to_owned()][..])
    );
    assert_eq!(rules[0].verbs, vec!["get".to_owned(), "list".to_owned()]);
    let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), &ns);
    let binding = bindings.get(child).await.unwrap();
    assert!(owned_by_identity(
        binding.metadata.owner_references.as_ref()
    ));
    let policies: Api<NetworkPolicy> = Api::namespaced(admin.clone(), &ns);
    let egress_rules = |np: &NetworkPolicy| {
        np.spec
            .as_ref()
            .and_then(|s| s.egress.as_ref())
            .map_or(0, Vec::len)
    };
    let np = policies.get(child).await.unwrap();
    assert_eq!(egress_rules(&np), 2, "DNS and the gateway only: {np:?}");
    assert_eq!(
        np.spec.as_ref().unwrap().policy_types.as_deref(),
        Some(&["Egress".to_owned()][..])
    );

    // The apiserver grants each declared rule and nothing else.
    assert!(can_i(&ns, &sa, "get", "configmaps"));
    assert!(can_i(&ns, &sa, "list", "configmaps"));
    for (verb, resource) in [
        ("delete", "configmaps"),
        ("create", "configmaps"),
        ("get", "secrets"),
        ("create", "pods"),
        ("create", "rolebindings.rbac.authorization.k8s.io"),
        ("patch", "agentidentities.tollgate.dev"),
    ] {
        assert!(
            !can_i(&ns, &sa, verb, resource),
            "{verb} {resource} must be denied"
        );
    }
    assert!(
        !can_i("default", &sa, "get", "configmaps"),
        "only its own namespace"
    );

    // The policy is compiled and bound.
    let policy = eventually("the policy to be Ready", WAIT, || async {
        Api::<AgentPolicy>::namespaced(admin.clone(), &ns)
            .get(AGENT)
            .await
            .ok()
            .filter(|p| {
                p.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                        && s.conditions
                            .iter()
                            .any(|c| c.type_ == "IdentityBound" && c.status == "True")
                })
            })
    })
    .await;
    assert!(
        policy
            .status
            .unwrap()
            .policy_hash
            .unwrap()
            .starts_with("sha256:")
    );

    // Editing the spec: the Role follows.
    identities
        .patch(
            AGENT,
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(json!([{"op": "add", "path": "/spec/kubernetes/rules/-",
                "value": {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}}]))
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    eventually("the new rule to be granted", WAIT, || async {
        can_i(&ns, &sa, "get", "pods").then_some(())
    })
    .await;
    assert!(!can_i(&ns, &sa, "delete", "pods"));

    // A pending approval, then the kill switch.
    request_approval(&ns, "email-1", 1, Duration::from_secs(600)).await;
    let engaged_at = Timestamp::now();
    let output = cp
        .kubectl(User::Admin)
        .args([
            "patch",
            "agentidentity",
            AGENT,
            "-n",
            &ns,
            "--type",
            "merge",
            "-p",
        ])
        // The writer's claim of who engaged it is replaced by admission with who did.
        .arg(r#"{"metadata":{"annotations":{"tollgate.dev/kill-switch-engaged-by":"mallory"}},"spec":{"killSwitch":{"engaged":true,"reason":"incident 7"}}}"#)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    eventually(
        "the kill switch to take the agent's rights",
        WAIT,
        || async { (!can_i(&ns, &sa, "get", "configmaps")).then_some(()) },
    )
    .await;
    assert!(bindings.get_opt(child).await.unwrap().is_none());
    let killed = identity_where(&identities, AGENT, "KillSwitchEngaged", |i| {
        condition(i, "KillSwitchEngaged").is_some_and(|c| c.0 == "True") && !ready(i)
    })
    .await;
    let (_, reason, message) = condition(&killed, "KillSwitchEngaged").unwrap();
    assert_eq!(reason, "AgentSwitch");
    assert!(message.contains("incident 7"), "{message}");
    let kill = killed.status.as_ref().unwrap().kill_switch.clone().unwrap();
    assert_eq!(kill.reason.as_deref(), Some("incident 7"));
    assert_eq!(kill.engaged_by.as_deref(), Some("tollgate-admin"));
    let at = kill.engaged_at.unwrap().0;
    assert!(
        at >= engaged_at - jiff::SignedDuration::from_secs(1),
        "engagedAt {at} is when it was engaged ({engaged_at})"
    );
    assert_eq!(condition(&killed, "RBACApplied").unwrap().0, "False");
    let np = eventually("deny-all egress", WAIT, || async {
        policies
            .get(child)
            .await
            .ok()
            .filter(|np| egress_rules(np) == 0)
    })
    .await;
    assert_eq!(
        np.spec.unwrap().policy_types.unwrap(),
        vec!["Egress".to_owned()]
    );
    let approvals: Api<ApprovalRequest> = Api::namespaced(admin.clone(), &ns);
    let (phase, reason) = eventually("the pending approval to be denied", WAIT, || async {
        phase_of(&approvals, "email-1")
            .await
            .filter(|(p, _)| *p != Phase::Pending)
    })
    .await;
    assert_eq!(
        (phase, reason.as_deref()),
        (Phase::Denied, Some("KillSwitch"))
    );
    event_for(&admin, &ns, AGENT, "KillSwitchEngaged").await;

    // Disengaged: everything comes back.
    identities
        .patch(
            AGENT,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"killSwitch": {"engaged": false}}})),
        )
        .await
        .unwrap();
    eventually("rights to come back", WAIT, || async {
        can_i(&ns, &sa, "get", "configmaps").then_some(())
    })
    .await;
    let restored = identity_where(&identities, AGENT, "Ready again", ready).await;
    assert!(restored.status.unwrap().kill_switch.is_none());
    eventually("egress to come back", WAIT, || async {
        policies
            .get(child)
            .await
            .ok()
            .filter(|np| egress_rules(np) == 2)
    })
    .await;
    event_for(&admin, &ns, AGENT, "KillSwitchReleased").await;

    // A new ServiceAccount name: the new one is made and bound, the old one removed.
    identities
        .patch(
            AGENT,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"serviceAccount": {"name": "agent-support-bot"}}})),
        )
        .await
        .unwrap();
    let renamed = format!("system:serviceaccount:{ns}:agent-support-bot");
    eventually(
        "the renamed ServiceAccount to hold the rights",
        WAIT,
        || async { can_i(&ns, &renamed, "get", "configmaps").then_some(()) },
    )
    .await;
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), &ns);
    eventually("the old ServiceAccount to go", WAIT, || async {
        accounts
            .get_opt("agent-support-agent-v2")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(!can_i(&ns, &sa, "get", "configmaps"));

    // Metrics and probes.
    let metrics = operator.get("/metrics");
    assert!(
        metrics.contains("tollgate_operator_reconciliations_total{controller=\"agentidentity\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_operator_agents{state=\"ready\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_operator_approvals{phase=\"Denied\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("tollgate_operator_reconcile_duration_seconds_bucket"));
    assert_eq!(operator.get("/readyz"), "ok");

    // Deleting the identity: garbage collection removes every child; the policy says so.
    identities
        .delete(AGENT, &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the children to be collected",
        Duration::from_secs(60),
        || async {
            let gone = accounts
                .get_opt("agent-support-bot")
                .await
                .unwrap()
                .is_none()
                && Api::<Role>::namespaced(admin.clone(), &ns)
                    .get_opt(child)
                    .await
                    .unwrap()
                    .is_none()
                && bindings.get_opt(child).await.unwrap().is_none()
                && policies.get_opt(child).await.unwrap().is_none();
            gone.then_some(())
        },
    )
    .await;
    eventually(
        "the policy to report its missing identity",
        WAIT,
        || async {
            let policy = Api::<AgentPolicy>::namespaced(admin.clone(), &ns)
                .get(AGENT)
                .await
                .ok()?;
            policy.status?.conditions.into_iter().find(|c| {
                c.type_ == "IdentityBound"
                    && c.status == "False"
                    && c.reason == "IdentityNotFound"
                    && c.message
                        .contains(&format!("AgentIdentity {ns}/{AGENT} does not exist"))
            })
        },
    )
    .await;
    operator.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_need_distinct_approvers_expire_on_time_and_are_pruned_after_retention() {
    let cp = control_plane();
    webhook();
    let admin = cp.client(User::Admin).await;
    let ns = tollgate_e2e::admission::namespace("approvals").await;
    let _operator = Operator::start(
        &ns,
        Options {
            approval_retention: Duration::from_secs(8),
            ..Options::default()
        },
    );
    apply_sample(&ns);
    let approvals: Api<ApprovalRequest> = Api::namespaced(admin.clone(), &ns);

    // Two distinct approvers are needed; one approving twice does not count twice.
    request_approval(&ns, "two-keys", 2, Duration::from_secs(120)).await;
    request_approval(&ns, "soon", 1, Duration::from_secs(4)).await;
    request_approval(&ns, "refused", 1, Duration::from_secs(120)).await;
    decide(&ns, User::Alice, "two-keys", "Approve").unwrap();
    let again = decide(&ns, User::Alice, "two-keys", "Approve").unwrap_err();
    assert!(again.contains("already decided"), "{again}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        phase_of(&approvals, "two-keys")
            .await
            .is_none_or(|(p, _)| p == Phase::Pending),
        "one approver of two must not settle it"
    );
    decide(&ns, User::Bob, "two-keys", "Approve").unwrap();
    let (phase, reason) = eventually("two approvals to approve", WAIT, || async {
        phase_of(&approvals, "two-keys")
            .await
            .filter(|(p, _)| *p != Phase::Pending)
    })
    .await;
    assert_eq!(
        (phase, reason.as_deref()),
        (Phase::Approved, Some("ApprovedBy"))
    );
    let message = approvals
        .get("two-keys")
        .await
        .unwrap()
        .status
        .unwrap()
        .conditions[0]
        .message
        .clone();
    assert!(
        message.contains("alice") && message.contains("bob"),
        "{message}"
    );

    decide(&ns, User::Bob, "refused", "Deny").unwrap();
    let (phase, reason) = eventually("a denial to deny", WAIT, || async {
        phase_of(&approvals, "refused")
            .await
            .filter(|(p, _)| *p != Phase::Pending)
    })
    .await;
    assert_eq!(
        (phase, reason.as_deref()),
        (Phase::Denied, Some("DeniedBy"))
    );

    // Nobody decides: expired and denied at expiresAt, not at the next poll.
    let (phase, reason) = eventually("the undecided request to expire", WAIT, || async {
        phase_of(&approvals, "soon")
            .await
            .filter(|(p, _)| *p != Phase::Pending)
    })
    .await;
    assert_eq!(
        (phase, reason.as_deref()),
        (Phase::Expired, Some("Timeout"))
    );
    let soon = approvals.get("soon").await.unwrap();
    let late = soon
        .status
        .unwrap()
        .decided_at
        .unwrap()
        .0
        .duration_since(soon.spec.expires_at.0);
    assert!(
        late >= jiff::SignedDuration::ZERO && late < jiff::SignedDuration::from_secs(3),
        "expired {late} after expiresAt"
    );
    // A decision after expiry is refused by admission.
    assert!(decide(&ns, User::Alice, "soon", "Approve").is_err());

    // History is kept through the retention period, then pruned.
    assert!(approvals.get_opt("two-keys").await.unwrap().is_some());
    eventually(
        "decided requests to be pruned after retention",
        WAIT,
        || async {
            let left = approvals
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .len();
            (left == 0).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_kill_switch_stops_every_agent_and_releasing_it_restores_them() {
    let cp = control_plane();
    let admin = cp.client(User::Admin).await;
    webhook();
    let ns = tollgate_e2e::admission::namespace("global-kill").await;
    let _operator = Operator::start(&ns, Options::default());
    let sample =
        std::fs::read_to_string(repo_root().join("config/samples/support-agent.yaml")).unwrap();
    let identity_only = sample.split("\n---").next().unwrap().to_owned();
    apply_text(&ns, &identity_only);
    apply_text(
        &ns,
        &identity_only.replace("name: support-agent-v2", "name: second-agent"),
    );
    let identities: Api<AgentIdentity> = Api::namespaced(admin.clone(), &ns);
    let agents = [
        ("support-agent-v2", "agent-support-agent-v2"),
        ("second-agent", "agent-second-agent"),
    ];
    for (name, account) in agents {
        identity_where(&identities, name, "Ready", ready).await;
        let sa = format!("system:serviceaccount:{ns}:{account}");
        eventually("the agent's rights", WAIT, || async {
            can_i(&ns, &sa, "get", "configmaps").then_some(())
        })
        .await;
    }

    let switches: Api<ConfigMap> = Api::namespaced(admin.clone(), &ns);
    let switch: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": tollgate_crds::common::GLOBAL_KILL_SWITCH,
                     "annotations": {"tollgate.dev/kill-switch-engaged-by": "mallory"}},
        "data": {"engaged": "true", "reason": "incident 9: runaway agents"}
    }))
    .unwrap();
    switches
        .create(&PostParams::default(), &switch)
        .await
        .unwrap();
    for (name, account) in agents {
        let sa = format!("system:serviceaccount:{ns}:{account}");
        eventually("every agent to lose its rights", WAIT, || async {
            (!can_i(&ns, &sa, "get", "configmaps")).then_some(())
        })
        .await;
        let killed = identity_where(&identities, name, "GlobalSwitch", |i| {
            condition(i, "KillSwitchEngaged").is_some_and(|c| c.1 == "GlobalSwitch")
        })
        .await;
        let message = condition(&killed, "KillSwitchEngaged").unwrap().2;
        assert!(
            message.contains(&format!("ConfigMap {ns}/tollgate-kill-switch"))
                && message.contains("incident 9"),
            "{message}"
        );
        let record = killed.status.unwrap().kill_switch.unwrap();
        assert_eq!(record.reason.as_deref(), Some("incident 9: runaway agents"));
        assert_eq!(record.engaged_by.as_deref(), Some("tollgate-admin"));
    }
    switches
        .patch(
            tollgate_crds::common::GLOBAL_KILL_SWITCH,
            &PatchParams::default(),
            &Patch::Merge(&json!({"data": {"engaged": "false"}})),
        )
        .await
        .unwrap();
    for (name, account) in agents {
        let sa = format!("system:serviceaccount:{ns}:{account}");
        eventually("rights to come back", WAIT, || async {
            can_i(&ns, &sa, "get", "configmaps").then_some(())
        })
        .await;
        identity_where(&identities, name, "Ready again", ready).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_a_standby_takes_over_and_a_lost_lease_stops_the_leader() {
    let cp = control_plane();
    let admin = cp.client(User::Admin).await;
    let ns = cp.namespace("leader").await;
    let quick = Timing {
        duration: Duration::from_secs(4),
        renew_every: Duration::from_secs(1),
    };
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &ns);
    let holder = || async {
        leases
            .get_opt(tollgate_operator::LEASE)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    };
    let first = Operator::start(
        &ns,
        Options {
            holder: "first".into(),
            lease: quick,
            ..Options::default()
        },
    );
    eventually("the first replica to lead", WAIT, || async {
        (holder().await.as_deref() == Some("first")).then_some(())
    })
    .await;
    let second = Operator::start(
        &ns,
        Options {
            holder: "second".into(),
            lease: quick,
            ..Options::default()
        },
    );
    assert_eq!(
        second.get("/readyz"),
        "ok",
        "a standby is ready (healthy, waiting)"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        holder().await.as_deref(),
        Some("first"),
        "one leader at a time"
    );

    apply_sample(&ns);
    let identities: Api<AgentIdentity> = Api::namespaced(admin.clone(), &ns);
    identity_where(&identities, AGENT, "Ready under the first leader", ready).await;
    assert!(
        !second
            .get("/metrics")
            .contains("tollgate_operator_reconciliations_total{"),
        "the standby reconciles nothing"
    );

    // A graceful stop releases the lease; the standby takes over at once.
    first.stop().unwrap();
    eventually("the standby to lead", Duration::from_secs(10), || async {
        (holder().await.as_deref() == Some("second")).then_some(())
    })
    .await;
    identities
        .patch(
            AGENT,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"killSwitch": {"engaged": true}}})),
        )
        .await
        .unwrap();
    identity_where(&identities, AGENT, "the new leader to reconcile", |i| {
        condition(i, "KillSwitchEngaged").is_some_and(|c| c.0 == "True")
    })
    .await;

    // Someone else takes the lease: the leader stops instead of acting beside it.
    leases
        .patch(
            tollgate_operator::LEASE,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"holderIdentity": "intruder",
                "renewTime": Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()}})),
        )
        .await
        .unwrap();
    eventually("the leader to stop", Duration::from_secs(10), || async {
        second.finished().then_some(())
    })
    .await;
    let error = second.stop().unwrap_err();
    assert!(
        error.contains("leadership lost") && error.contains("intruder"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_does_not_compile_or_names_no_identity_says_why() {
    let cp = control_plane();
    let admin = cp.client(User::Admin).await;
    // No admission here, so the apiserver stores what only the engine can refuse.
    let ns = cp.namespace("policy-status").await;
    let _operator = Operator::start(&ns, Options::default());
    let sample =
        std::fs::read_to_string(repo_root().join("config/samples/support-agent.yaml")).unwrap();
    let policy = sample.split("\n---").nth(1).unwrap().to_owned();
    apply_text(
        &ns,
        &policy
            .replace(
                "identityRef: {name: support-agent-v2}",
                "identityRef: {name: ghost}",
            )
            .replace(
                "when: \"args.order_ids.all(id, id.startsWith('O-'))\"",
                "when: \"args.order_ids.all(id, \"",
            ),
    );
    let policies: Api<AgentPolicy> = Api::namespaced(admin.clone(), &ns);
    let status = eventually("the policy status", WAIT, || async {
        let status = policies.get(AGENT).await.ok()?.status?;
        (status.conditions.len() == 3).then_some(status)
    })
    .await;
    let find = |t: &str| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == t)
            .unwrap()
            .clone()
    };
    let bound = find("IdentityBound");
    assert_eq!(
        (bound.status.as_str(), bound.reason.as_str()),
        ("False", "IdentityNotFound")
    );
    assert!(
        bound
            .message
            .contains(&format!("AgentIdentity {ns}/ghost does not exist")),
        "{}",
        bound.message
    );
    let ready = find("Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "CompileFailed")
    );
    assert!(
        ready.message.contains("update_order_status") || ready.message.contains("when"),
        "{}",
        ready.message
    );
    // kstatus' abnormal-true condition, so GitOps health checks fail it instead of waiting.
    let stalled = find("Stalled");
    assert_eq!(
        (stalled.status.as_str(), stalled.reason.as_str()),
        ("True", "CompileFailed")
    );
    assert!(status.policy_hash.is_none());
    event_for(&admin, &ns, AGENT, "CompileFailed").await;
}

/// `kubectl tollgate doctor` on the control plane: what holds is ok, and what does not is named
/// with what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_what_does_not_hold() {
    let cp = control_plane();
    webhook();
    let admin = cp.client(User::Admin).await;
    let ns = cp.namespace("doctor").await;
    let doctor = || {
        let (admin, ns) = (admin.clone(), ns.clone());
        async move { kubectl_tollgate::doctor::run(admin, &ns, Some(&ns), Timestamp::now()).await }
    };

    // No operator has run for this namespace: its Lease is a failure; the CRDs and the
    // admission webhooks (the harness registers the shipped set) hold.
    let report = doctor().await;
    assert!(!report.ok());
    let text = report.text();
    for line in [
        "ok    crd agentidentities.tollgate.dev: established, serves v1alpha1".to_owned(),
        "ok    webhook agents.validate.tollgate.dev: registered in ValidatingWebhookConfiguration tollgate-e2e, failurePolicy Fail".to_owned(),
        "ok    webhook killswitch.mutate.tollgate.dev: registered in MutatingWebhookConfiguration tollgate-e2e, failurePolicy Ignore".to_owned(),
        format!("FAIL  operator: no operator has held Lease {ns}/tollgate-operator"),
        format!("ok    global kill switch: disengaged (ConfigMap {ns}/tollgate-kill-switch)"),
        format!("ok    agents: 0 AgentIdentities and 0 AgentPolicies in force in namespace {ns}"),
        "1 failure(s), 0 warning(s)".to_owned(),
    ] {
        assert!(text.contains(&line), "missing {line:?} in:\n{text}");
    }

    // The operator and the sample agent: everything holds.
    let _operator = Operator::start(&ns, Options::default());
    apply_sample(&ns);
    let in_force = format!("1 AgentIdentities and 1 AgentPolicies in force in namespace {ns}");
    let report = eventually("doctor finds everything in force", WAIT, || {
        let (doctor, in_force) = (doctor(), in_force.clone());
        async move {
            let report = doctor.await;
            (report.ok() && report.text().contains(&in_force)).then_some(report)
        }
    })
    .await;
    let text = report.text();
    assert!(
        text.contains(&format!(
            "ok    agents: 1 AgentIdentities and 1 AgentPolicies in force in namespace {ns}"
        )) && text.contains("ok    operator: operator-0 leads"),
        "{text}"
    );

    // A policy for an identity that does not exist, and the global switch engaged: a failure
    // naming the policy and why, and a warning naming who engaged the switch and why.
    let sample =
        std::fs::read_to_string(repo_root().join("config/samples/support-agent.yaml")).unwrap();
    let policy = sample.split("\n---").nth(1).unwrap().to_owned();
    apply_text(
        &ns,
        &policy
            .replacen("name: support-agent-v2", "name: ghost-policy", 1)
            .replace(
                "identityRef: {name: support-agent-v2}",
                "identityRef: {name: ghost}",
            ),
    );
    let switch: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": tollgate_crds::common::GLOBAL_KILL_SWITCH,
                     "annotations": {"tollgate.dev/kill-switch-engaged-by": "mallory"}},
        "data": {"engaged": "true", "reason": "drill"}
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &switch)
        .await
        .unwrap();
    let text = eventually("doctor names the ghost policy", WAIT, || {
        let doctor = doctor();
        async move {
            let text = doctor.await.text();
            text.contains("IdentityNotFound").then_some(text)
        }
    })
    .await;
    for line in [
        format!(
            "FAIL  agentpolicy {ns}/ghost-policy: not Ready, IdentityNotFound: the policy compiles but governs no identity: see IdentityBound; IdentityBound IdentityNotFound: AgentIdentity {ns}/ghost does not exist"
        ),
        "WARN  global kill switch: ENGAGED by mallory (drill): every agent is stopped".to_owned(),
    ] {
        assert!(text.contains(&line), "missing {line:?} in:\n{text}");
    }
}

#[tokio::test]
async fn a_kill_switch_drill_checks_every_plane_releases_the_switch_and_is_recorded() {
    let cp = control_plane();
    webhook();
    let admin = cp.client(User::Admin).await;
    let ns = tollgate_e2e::admission::namespace("drill").await;
    let operator = Operator::start(&ns, Options::default());
    // The sample agent, which may also create ConfigMaps: a write for the drill to see refused.
    let sample = std::fs::read_to_string(repo_root().join("config/samples/support-agent.yaml"))
        .unwrap()
        .replace("verbs: [get, list]", "verbs: [get, list, create]");
    apply_text(&ns, &sample);
    let identities: Api<AgentIdentity> = Api::namespaced(admin.clone(), &ns);
    identity_where(&identities, AGENT, "the identity to be Ready", ready).await;
    let checklist = |now| {
        let (admin, ns) = (admin.clone(), ns.clone());
        async move {
            kubectl_tollgate::checklist::in_cluster(admin, "tollgate-system", Some(&ns), now)
                .await
                .unwrap()
        }
    };
    let before = checklist(Timestamp::now()).await;
    let item8 = |lists: &kubectl_tollgate::checklist::Checklists| lists.agents[0].1[7].clone();
    assert_eq!(
        item8(&before).mark,
        tollgate_engine::checklist::Mark::Fail,
        "{}",
        before.text()
    );
    assert!(
        item8(&before).why.contains("never drilled"),
        "{}",
        before.text()
    );

    // A gateway over the cluster, for the drill to call as the agent.
    let view = tollgate_runtime::cluster::WatchedView::start(admin.clone(), "tollgate-system");
    view.ready().await;
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(
        tollgate_audit::SqliteStore::open(dir.path().join("audit.db")).unwrap(),
    );
    let (log, _) = tollgate_audit::AuditLog::open(
        store.clone(),
        tollgate_audit::WriterConfig::new("gw-drill"),
    )
    .await
    .unwrap();
    let gateway = tollgate_gateway::Gateway::new(
        tollgate_gateway::Policies::Cluster(tollgate_gateway::ClusterPolicies::new(
            std::sync::Arc::new(view),
            cp.client_as(GATEWAY).await,
        )),
        tollgate_gateway::TokenReviewer::new(admin.clone()),
        log,
        tollgate_audit::Redactor::default(),
    );
    let url = tollgate_e2e::serve_gateway(gateway).await;

    let drill = kubectl_tollgate::drill::Drill {
        namespace: ns.clone(),
        name: AGENT.to_owned(),
        gateway: Some(url),
        ca: None,
        timeout: WAIT,
    };
    let report = kubectl_tollgate::drill::run(cp.config(User::Admin).await, &drill)
        .await
        .unwrap();
    eprintln!("{}", report.text());
    assert!(report.ok(), "{}", report.text());
    let names: Vec<&str> = report.planes.iter().map(|p| p.name).collect();
    assert_eq!(
        names,
        [
            "gateway refuses its calls",
            "its RoleBinding is removed",
            "its egress is denied",
            "its writes are refused"
        ]
    );
    for plane in &report.planes {
        assert!(
            plane.held.is_some() && plane.restored.is_some(),
            "{plane:?}"
        );
    }
    assert!(
        report.planes[0].note.contains("answered KillSwitch"),
        "{:?}",
        report.planes[0]
    );
    assert!(
        report.planes[0]
            .note
            .contains("after release: answered ToolNotAllowed"),
        "{:?}",
        report.planes[0]
    );
    // Released, and recorded where the checklist reads it.
    let identity = identities.get(AGENT).await.unwrap();
    assert!(
        !identity.spec.kill_switch.engaged,
        "the drill released the switch"
    );
    assert!(
        identity
            .status
            .as_ref()
            .and_then(|s| s.last_kill_switch_drill.as_ref())
            .is_some(),
        "{:?}",
        identity.status
    );
    let after = checklist(Timestamp::now()).await;
    assert_eq!(
        item8(&after).mark,
        tollgate_engine::checklist::Mark::Pass,
        "{}",
        after.text()
    );
    // The operator's next status write keeps the record.
    identities
        .patch(
            AGENT,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"description": "Answers tickets (drilled)"}})),
        )
        .await
        .unwrap();
    let kept = identity_where(&identities, AGENT, "the identity Ready again", ready).await;
    assert!(
        kept.status.unwrap().last_kill_switch_drill.is_some(),
        "the operator keeps lastKillSwitchDrill"
    );
    // The gateway recorded the drill's probe calls.
    let records = tollgate_audit::Store::query(store.as_ref(), &tollgate_audit::Query::default())
        .await
        .unwrap();
    let probes: Vec<String> = records
        .iter()
        .map(|r| r.entry().unwrap())
        .filter(|e| {
            e.run
                .as_deref()
                .is_some_and(|r| r.starts_with("tollgate-drill-"))
        })
        .filter_map(|e| {
            e.decision
                .as_ref()
                .and_then(|d| d.deny_code())
                .map(|c| format!("{c:?}"))
        })
        .collect();
    assert!(probes.iter().any(|c| c == "KillSwitch"), "{probes:?}");
    operator.stop().unwrap();
}

/// Flux's health checks (kstatus, the real library) read Tollgate's conditions: Current when in
/// force, Failed while only a spec change helps (a policy that does not compile: never waiting
/// for ever on a broken object), InProgress with the reason while a kill switch stops the agent.
#[tokio::test]
async fn flux_health_checks_read_tollgates_conditions_through_kstatus() {
    let cp = control_plane();
    let admin = cp.client(User::Admin).await;
    // No admission here, so the apiserver stores a policy only the engine can refuse (as it
    // would with admission off, or with a policy applied before the webhook was).
    let ns = cp.namespace("kstatus").await;
    let operator = Operator::start(&ns, Options::default());
    apply_sample(&ns);
    let identities: Api<AgentIdentity> = Api::namespaced(admin.clone(), &ns);
    let policies: Api<AgentPolicy> = Api::namespaced(admin.clone(), &ns);
    identity_where(&identities, AGENT, "the identity to be Ready", ready).await;
    let policy_ready = |p: &AgentPolicy| {
        p.status.as_ref().is_some_and(|s| {
            s.observed_generation == p.metadata.generation
                && s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    };
    eventually("the policy to be Ready", WAIT, || async {
        policies.get(AGENT).await.ok().filter(policy_ready)
    })
    .await;
    let health = || async {
        let identity = serde_json::to_value(identities.get(AGENT).await.unwrap()).unwrap();
        let policy = serde_json::to_value(policies.get(AGENT).await.unwrap()).unwrap();
        tollgate_e2e::kstatus(&[identity, policy])
    };
    let statuses = |found: Vec<(String, String, String)>| -> Vec<(String, String)> {
        found
            .into_iter()
            .map(|(what, status, _)| (what, status))
            .collect()
    };
    let current = vec![
        (format!("AgentIdentity/{AGENT}"), "Current".to_owned()),
        (format!("AgentPolicy/{AGENT}"), "Current".to_owned()),
    ];
    assert_eq!(statuses(health().await), current);

    // A policy that no longer compiles: Failed, with the compiler's words.
    let broken = json!({"spec": {"tools": {"allowed": [{"name": "read_customer_record",
        "upstream": "crm", "when": "args.("}]}}});
    policies
        .patch(AGENT, &PatchParams::default(), &Patch::Merge(&broken))
        .await
        .unwrap();
    let found = eventually("kstatus to fail the policy", WAIT, || async {
        let found = health().await;
        (found[1].1 == "Failed").then_some(found)
    })
    .await;
    assert!(found[1].2.contains("when"), "{found:?}");

    // Fixed again: Current.
    apply_sample(&ns);
    eventually("the policy to be Ready again", WAIT, || async {
        policies.get(AGENT).await.ok().filter(policy_ready)
    })
    .await;
    identities
        .patch(
            AGENT,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"killSwitch": {"engaged": true, "reason": "drill"}}})),
        )
        .await
        .unwrap();
    identity_where(&identities, AGENT, "the switch to be reconciled", |i| {
        condition(i, "KillSwitchEngaged").is_some_and(|c| c.0 == "True")
            && i.status.as_ref().and_then(|s| s.observed_generation) == i.metadata.generation
    })
    .await;
    // A stopped agent is not Ready, and not failed: Flux holds its health check with the reason
    // (and Argo CD shows it Suspended), so nobody takes a kill switch for a healthy agent.
    let found = health().await;
    assert_eq!(
        (found[0].1.as_str(), found[1].1.as_str()),
        ("InProgress", "Current"),
        "{found:?}"
    );
    assert!(found[0].2.contains("the agent is stopped"), "{found:?}");
    operator.stop().unwrap();
}
