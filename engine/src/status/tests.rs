use super::*;
use crate::children::{GatewayPeer, desired_children};
use serde_json::{Value, json};
use std::collections::BTreeMap;

fn now() -> Timestamp {
    "2026-11-25T12:00:00Z".parse().unwrap()
}

fn later(seconds: i64) -> Timestamp {
    now() + jiff::SignedDuration::from_secs(seconds)
}

fn identity(rules: Value, kill: Value, by: Option<&str>) -> AgentIdentity {
    let annotations: BTreeMap<&str, &str> = by
        .map(|u| (KILL_SWITCH_BY_ANNOTATION, u))
        .into_iter()
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": {"name": "support", "namespace": "ns", "uid": "1234", "generation": 3,
                     "annotations": annotations},
        "spec": {
            "description": "d", "owner": {"team": "t", "contacts": ["a"]},
            "podSelector": {"matchLabels": {"app": "support"}},
            "kubernetes": {"rules": rules},
            "network": {"egress": [{"ports": [{"port": 443, "protocol": "TCP"}]}]},
            "killSwitch": kill
        }
    }))
    .unwrap()
}

fn gateway() -> GatewayPeer {
    GatewayPeer {
        namespace: "tollgate-system".into(),
        pod_labels: BTreeMap::from([("app".into(), "gw".into())]),
        port: 8444,
    }
}

fn reconcile(identity: &AgentIdentity, stop: Option<&Stop>, at: Timestamp) -> AgentIdentityStatus {
    let children = desired_children(identity, &gateway(), stop.is_some());
    identity_status(identity, stop, children.as_ref().map_err(Vec::as_slice), at)
}

fn cond<'a>(status: &'a AgentIdentityStatus, t: &str) -> &'a Condition {
    status.conditions.iter().find(|c| c.type_ == t).unwrap()
}

const CONFIGMAPS: &str = r#"[{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]"#;

#[test]
fn a_reconciled_identity_is_ready_and_says_what_is_in_force() {
    let identity = identity(serde_json::from_str(CONFIGMAPS).unwrap(), json!({}), None);
    let status = reconcile(&identity, None, now());
    assert_eq!(
        status.service_account_name.as_deref(),
        Some("agent-support")
    );
    assert_eq!(
        status.username.as_deref(),
        Some("system:serviceaccount:ns:agent-support")
    );
    assert_eq!(status.observed_generation, Some(3));
    assert!(status.kill_switch.is_none());
    for t in [
        condition::READY,
        condition::RBAC_APPLIED,
        condition::NETWORK_ISOLATED,
    ] {
        assert_eq!(cond(&status, t).status, "True", "{t}");
        assert_eq!(cond(&status, t).observed_generation, Some(3));
    }
    assert_eq!(
        cond(&status, condition::KILL_SWITCH_ENGAGED).status,
        "False"
    );
    assert!(
        cond(&status, condition::RBAC_APPLIED)
            .message
            .contains("grants 1 rule(s)")
    );
    assert!(
        cond(&status, condition::NETWORK_ISOLATED)
            .message
            .contains("1 declared rule(s)")
    );
}

#[test]
fn the_agent_switch_stops_it_records_who_and_when_and_releasing_restores_it() {
    let engaged = identity(
        serde_json::from_str(CONFIGMAPS).unwrap(),
        json!({"engaged": true, "reason": "incident 7"}),
        Some("alice"),
    );
    let stop = Stop::of_agent(&engaged).unwrap();
    let status = reconcile(&engaged, Some(&stop), now());
    let kill = cond(&status, condition::KILL_SWITCH_ENGAGED);
    assert_eq!(
        (kill.status.as_str(), kill.reason.as_str()),
        ("True", "AgentSwitch")
    );
    assert!(kill.message.contains("incident 7") && kill.message.contains("set it to false"));
    assert_eq!(cond(&status, condition::READY).status, "False");
    assert_eq!(
        cond(&status, condition::RBAC_APPLIED).reason,
        "KillSwitchEngaged"
    );
    assert_eq!(
        cond(&status, condition::NETWORK_ISOLATED).reason,
        "DenyAllEgress"
    );
    let record = status.kill_switch.clone().unwrap();
    assert_eq!(record.engaged_at, Some(Time(now())));
    assert_eq!(record.engaged_by.as_deref(), Some("alice"));
    assert_eq!(record.reason.as_deref(), Some("incident 7"));

    // Reconciled again later: when it was engaged and when conditions changed stay put.
    let mut again = engaged.clone();
    again.status = Some(status.clone());
    let second = reconcile(&again, Some(&stop), later(60));
    assert_eq!(second.kill_switch.unwrap().engaged_at, Some(Time(now())));
    assert_eq!(
        second.conditions, status.conditions,
        "nothing changed, nothing moves"
    );

    // Released: the record goes, Ready comes back with a new transition time.
    let mut released = again.clone();
    released.spec.kill_switch.engaged = false;
    let third = reconcile(&released, None, later(120));
    assert!(third.kill_switch.is_none());
    let ready = cond(&third, condition::READY);
    assert_eq!(ready.status, "True");
    assert_eq!(ready.last_transition_time, Time(later(120)));
}

#[test]
fn the_global_switch_names_its_configmap_and_reason() {
    let identity = identity(serde_json::from_str(CONFIGMAPS).unwrap(), json!({}), None);
    let stop = Stop::Global {
        source: "tollgate-system/tollgate-kill-switch".into(),
        reason: Some("incident 9".into()),
        by: None,
    };
    let status = reconcile(&identity, Some(&stop), now());
    let kill = cond(&status, condition::KILL_SWITCH_ENGAGED);
    assert_eq!(kill.reason, "GlobalSwitch");
    assert!(
        kill.message
            .contains("ConfigMap tollgate-system/tollgate-kill-switch")
    );
    assert!(kill.message.contains("incident 9"));
    assert_eq!(
        status.kill_switch.unwrap().reason.as_deref(),
        Some("incident 9")
    );
}

#[test]
fn rules_that_would_escalate_leave_the_agent_unbound_and_say_which() {
    let identity = identity(
        json!([{"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["rolebindings"], "verbs": ["create"]}]),
        json!({}),
        None,
    );
    let status = reconcile(&identity, None, now());
    let ready = cond(&status, condition::READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "RulesRefused")
    );
    assert!(
        ready.message.contains("spec.kubernetes.rules[0]"),
        "{}",
        ready.message
    );
    assert_eq!(cond(&status, condition::RBAC_APPLIED).status, "False");
    assert_eq!(cond(&status, condition::STALLED).reason, "RulesRefused");
    // A kill switch is a deliberate stop, not a stall.
    let killed = self::identity(
        serde_json::from_str(CONFIGMAPS).unwrap(),
        json!({"engaged": true, "reason": "incident"}),
        Some("alice"),
    );
    let stop = Stop::of_agent(&killed);
    let status = reconcile(&killed, stop.as_ref(), now());
    assert_eq!(cond(&status, condition::READY).status, "False");
    assert!(
        status
            .conditions
            .iter()
            .all(|c| c.type_ != condition::STALLED)
    );
}

#[test]
fn a_condition_keeps_its_transition_time_until_its_status_changes() {
    let mut conditions = Vec::new();
    set_condition(
        &mut conditions,
        "Ready",
        true,
        "A",
        "a".into(),
        Some(1),
        now(),
    );
    set_condition(
        &mut conditions,
        "Ready",
        true,
        "B",
        "b".into(),
        Some(2),
        later(5),
    );
    assert_eq!(conditions.len(), 1);
    assert_eq!(conditions[0].last_transition_time, Time(now()));
    assert_eq!(
        (
            conditions[0].reason.as_str(),
            conditions[0].observed_generation
        ),
        ("B", Some(2))
    );
    set_condition(
        &mut conditions,
        "Ready",
        false,
        "C",
        "c".into(),
        Some(2),
        later(9),
    );
    assert_eq!(conditions[0].last_transition_time, Time(later(9)));
}

fn agent_policy(identity: &str, when: &str) -> AgentPolicy {
    serde_json::from_value(json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentPolicy",
        "metadata": {"name": "support", "namespace": "ns", "generation": 4},
        "spec": {"identityRef": {"name": identity}, "upstreams": [{"name": "crm"}],
                 "tools": {"allowed": [{"name": "read", "upstream": "crm", "when": when}]}},
        "status": {"tools": [{"name": "read", "cleanCompletions": 3}]}
    }))
    .unwrap()
}

#[test]
fn policy_status_says_compiled_bound_or_exactly_why_not() {
    let identity = identity(serde_json::from_str(CONFIGMAPS).unwrap(), json!({}), None);
    let good = agent_policy("support", "true");
    let compiled = CompiledPolicy::compile(&good);
    let status = policy_status(&good, compiled.as_ref(), Some(&identity), now());
    assert_eq!(
        status.policy_hash.as_deref(),
        compiled.as_ref().ok().map(|c| c.hash())
    );
    assert!(status.conditions.iter().all(|c| c.status == "True"));
    assert!(
        status.tools.is_empty() && status.drift.is_none(),
        "the track record is the gateway's to write"
    );
    let mut read_back = status.clone();
    read_back.tools = good.status.clone().unwrap().tools;
    assert_eq!(read_back.tools.len(), 1);
    assert_eq!(
        operator_fields(&read_back),
        status,
        "a status read back with the gateway's fields compares equal to what the operator writes"
    );
    assert_eq!(status.observed_generation, Some(4));

    let orphan = agent_policy("ghost", "true");
    let status = policy_status(
        &orphan,
        CompiledPolicy::compile(&orphan).as_ref(),
        None,
        now(),
    );
    let bound = status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::IDENTITY_BOUND)
        .unwrap();
    assert_eq!(
        (bound.status.as_str(), bound.reason.as_str()),
        ("False", "IdentityNotFound")
    );
    assert!(
        bound
            .message
            .contains("AgentIdentity ns/ghost does not exist")
    );
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::READY)
        .unwrap();
    assert_eq!(ready.status, "False");

    let broken = agent_policy("support", "args.(");
    let compiled = CompiledPolicy::compile(&broken);
    assert!(compiled.is_err());
    let status = policy_status(&broken, compiled.as_ref(), Some(&identity), now());
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::READY)
        .unwrap();
    assert_eq!(ready.reason, "CompileFailed");
    assert!(
        ready.message.contains("spec.tools.allowed[0].when"),
        "{}",
        ready.message
    );
    assert!(status.policy_hash.is_none());
    // kstatus: Stalled while only a spec change helps, gone once it compiles again.
    let stalled = status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::STALLED)
        .unwrap();
    assert_eq!(
        (stalled.status.as_str(), stalled.reason.as_str()),
        ("True", "CompileFailed")
    );
    let mut fixed = good.clone();
    fixed.status = Some(status);
    let status = policy_status(
        &fixed,
        CompiledPolicy::compile(&good).as_ref(),
        Some(&identity),
        now(),
    );
    assert!(
        status
            .conditions
            .iter()
            .all(|c| c.type_ != condition::STALLED),
        "{:?}",
        status.conditions
    );
}

fn request(min: i32, decisions: Value, status: Value) -> ApprovalRequest {
    serde_json::from_value(json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "ApprovalRequest",
        "metadata": {"name": "r", "namespace": "ns", "generation": 1},
        "spec": {
            "identityRef": {"name": "support"},
            "policyRef": {"name": "support", "policyHash": "sha256:x"},
            "runId": "run-1", "step": 1, "tool": "send", "arguments": {},
            "argumentsDigest": "sha256:y", "reason": "irreversible",
            "approvers": {"groups": ["leads"]}, "minApprovals": min,
            "expiresAt": "2026-11-25T12:05:00Z", "decisions": decisions
        },
        "status": status
    }))
    .unwrap()
}

const DAY: Duration = Duration::from_secs(86_400);

fn written(step: ApprovalStep) -> ApprovalRequestStatus {
    match step {
        ApprovalStep::Write(status) => status,
        other => panic!("expected a status to write, got {other:?}"),
    }
}

#[test]
fn approvals_settle_from_distinct_approvers_denials_expiry_and_the_kill_switch() {
    let expires: Timestamp = "2026-11-25T12:05:00Z".parse().unwrap();
    let pending = request(
        2,
        json!([{"verdict": "Approve", "user": "alice"}]),
        json!({}),
    );
    assert_eq!(
        approval_step(&pending, false, DAY, now()),
        ApprovalStep::WaitUntil(expires)
    );

    let twice = request(
        2,
        json!([{"verdict": "Approve", "user": "alice"}, {"verdict": "Approve", "user": "alice"}]),
        json!({}),
    );
    assert_eq!(
        approval_step(&twice, false, DAY, now()),
        ApprovalStep::WaitUntil(expires)
    );

    let two = request(
        2,
        json!([{"verdict": "Approve", "user": "alice"}, {"verdict": "Approve", "user": "bob"}]),
        json!({}),
    );
    let status = written(approval_step(&two, false, DAY, now()));
    assert_eq!(
        (status.phase, status.reason.as_deref()),
        (Phase::Approved, Some("ApprovedBy"))
    );
    assert_eq!(status.decided_at, Some(Time(now())));
    assert!(status.conditions[0].message.contains("alice, bob"));

    let denied = request(
        2,
        json!([{"verdict": "Approve", "user": "alice"}, {"verdict": "Deny", "user": "bob", "comment": "wrong customer"}]),
        json!({}),
    );
    let status = written(approval_step(&denied, false, DAY, now()));
    assert_eq!(
        (status.phase, status.reason.as_deref()),
        (Phase::Denied, Some("DeniedBy"))
    );
    assert!(status.conditions[0].message.contains("bob: wrong customer"));

    let status = written(approval_step(&pending, false, DAY, expires));
    assert_eq!(
        (status.phase, status.reason.as_deref()),
        (Phase::Expired, Some("Timeout"))
    );

    let status = written(approval_step(&pending, true, DAY, now()));
    assert_eq!(
        (status.phase, status.reason.as_deref()),
        (Phase::Denied, Some("KillSwitch"))
    );
}

#[test]
fn decided_requests_are_kept_through_retention_then_pruned() {
    let decided = request(
        1,
        json!([{"verdict": "Approve", "user": "alice"}]),
        json!({"phase": "Approved", "decidedAt": "2026-11-25T12:00:00Z"}),
    );
    // Decisions cannot move a final phase, and neither can the kill switch.
    assert_eq!(
        approval_step(&decided, true, DAY, later(60)),
        ApprovalStep::WaitUntil(later(86_400))
    );
    assert_eq!(
        approval_step(&decided, false, DAY, later(86_400)),
        ApprovalStep::Prune
    );
}
