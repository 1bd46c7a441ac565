//! The status Tollgate writes on its kinds: conditions whose reasons and messages tell a person
//! what is in force and what to fix, and the lifecycle of an ApprovalRequest. Pure: the operator
//! passes what it observed and the time, and writes back what these functions return.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use tollgate_crds::approval::{ApprovalRequestStatus, Phase, Verdict};
use tollgate_crds::common::condition;
use tollgate_crds::identity::{AgentIdentityStatus, KillSwitchStatus};
use tollgate_crds::policy::AgentPolicyStatus;
use tollgate_crds::{AgentIdentity, AgentPolicy, ApprovalRequest};

use crate::children::{Children, child_name};
use crate::compile::{CompileError, CompileErrors, CompiledPolicy};

/// Annotation on an AgentIdentity naming the authenticated user who engaged its kill switch;
/// stamped by admission, never trusted from the writer.
pub const KILL_SWITCH_BY_ANNOTATION: &str = "tollgate.dev/kill-switch-engaged-by";

/// Why an agent is stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// Its own `spec.killSwitch`.
    Agent {
        /// `spec.killSwitch.reason`.
        reason: Option<String>,
        /// Who engaged it, as stamped by admission.
        by: Option<String>,
    },
    /// The cluster-wide switch.
    Global {
        /// The ConfigMap holding it, `namespace/name`.
        source: String,
        /// The reason written beside it.
        reason: Option<String>,
        /// Who engaged it, when known.
        by: Option<String>,
    },
}

impl Stop {
    /// The agent's own switch, read from the identity.
    pub fn of_agent(identity: &AgentIdentity) -> Option<Stop> {
        identity.spec.kill_switch.engaged.then(|| Stop::Agent {
            reason: identity.spec.kill_switch.reason.clone(),
            by: identity
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(KILL_SWITCH_BY_ANNOTATION))
                .cloned(),
        })
    }

    fn reason(&self) -> Option<&str> {
        match self {
            Stop::Agent { reason, .. } | Stop::Global { reason, .. } => reason.as_deref(),
        }
    }

    fn by(&self) -> Option<&str> {
        match self {
            Stop::Agent { by, .. } | Stop::Global { by, .. } => by.as_deref(),
        }
    }
}

/// Sets a condition, keeping its lastTransitionTime when its status did not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if status { "True" } else { "False" }.to_owned();
    let previous = conditions.iter().position(|c| c.type_ == type_);
    let last_transition_time = match previous.map(|i| &conditions[i]) {
        Some(old) if old.status == status => old.last_transition_time.clone(),
        _ => Time(now),
    };
    let new = Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    };
    match previous {
        Some(i) => conditions[i] = new,
        None => conditions.push(new),
    }
}

/// Whether the condition `type_` is True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

fn bullet_list(errors: &[CompileError]) -> String {
    errors
        .iter()
        .map(|e| format!("{e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The status of an AgentIdentity after the operator applied `outcome` (the desired children,
/// or why there are none) while `stop` holds.
pub fn identity_status(
    identity: &AgentIdentity,
    stop: Option<&Stop>,
    outcome: Result<&Children, &[CompileError]>,
    now: Timestamp,
) -> AgentIdentityStatus {
    let old = identity.status.clone().unwrap_or_default();
    let generation = identity.metadata.generation;
    let mut conditions = old.conditions.clone();
    let set = |conditions: &mut Vec<Condition>, t: &str, s: bool, r: &str, m: String| {
        set_condition(conditions, t, s, r, m, generation, now)
    };
    let service_account = identity.service_account_name();
    let namespace = identity.metadata.namespace.as_deref().unwrap_or_default();
    let child = child_name(identity);

    match stop {
        Some(stop) => {
            let (reason, message) = match stop {
                Stop::Agent { reason, .. } => (
                    "AgentSwitch",
                    format!(
                        "spec.killSwitch.engaged is true{}; set it to false to restore the agent",
                        reason
                            .as_deref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    ),
                ),
                Stop::Global { source, reason, .. } => (
                    "GlobalSwitch",
                    format!(
                        "the cluster-wide kill switch in ConfigMap {source} is engaged{}; set its engaged key to \"false\" to restore every agent",
                        reason
                            .as_deref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    ),
                ),
            };
            set(
                &mut conditions,
                condition::KILL_SWITCH_ENGAGED,
                true,
                reason,
                message,
            );
        }
        None => set(
            &mut conditions,
            condition::KILL_SWITCH_ENGAGED,
            false,
            "Disengaged",
            "neither the agent's nor the cluster-wide kill switch is engaged".to_owned(),
        ),
    }

    match outcome {
        Err(errors) => {
            let message = format!(
                "spec.kubernetes.rules would let the agent raise its own rights, so it holds no RoleBinding: {}",
                bullet_list(errors)
            );
            set(
                &mut conditions,
                condition::RBAC_APPLIED,
                false,
                "RulesRefused",
                message.clone(),
            );
            set(
                &mut conditions,
                condition::NETWORK_ISOLATED,
                false,
                "NotApplied",
                "nothing is applied until spec.kubernetes.rules are fixed".to_owned(),
            );
            set(
                &mut conditions,
                condition::READY,
                false,
                "RulesRefused",
                message,
            );
        }
        Ok(children) => {
            let rules = children.role.rules.as_ref().map_or(0, Vec::len);
            match (&children.role_binding, stop) {
                (Some(_), _) => set(
                    &mut conditions,
                    condition::RBAC_APPLIED,
                    true,
                    "Applied",
                    format!(
                        "Role {child} grants {rules} rule(s) to ServiceAccount {namespace}/{service_account} through RoleBinding {child}"
                    ),
                ),
                (None, _) => set(
                    &mut conditions,
                    condition::RBAC_APPLIED,
                    false,
                    "KillSwitchEngaged",
                    format!(
                        "RoleBinding {child} is removed while the kill switch is engaged; ServiceAccount {namespace}/{service_account} holds no rights"
                    ),
                ),
            }
            let egress = children
                .network_policy
                .spec
                .as_ref()
                .and_then(|s| s.egress.as_ref())
                .map_or(0, Vec::len);
            if stop.is_some() {
                set(
                    &mut conditions,
                    condition::NETWORK_ISOLATED,
                    true,
                    "DenyAllEgress",
                    format!(
                        "NetworkPolicy {child} denies all egress of the agent's pods while the kill switch is engaged"
                    ),
                );
            } else {
                set(
                    &mut conditions,
                    condition::NETWORK_ISOLATED,
                    true,
                    "EgressRestricted",
                    format!(
                        "NetworkPolicy {child} allows egress only to DNS, the Tollgate gateway and {} declared rule(s)",
                        egress.saturating_sub(2)
                    ),
                );
            }
            match stop {
                None => set(
                    &mut conditions,
                    condition::READY,
                    true,
                    "Reconciled",
                    format!(
                        "ServiceAccount {service_account}, Role, RoleBinding and NetworkPolicy {child} are in force"
                    ),
                ),
                Some(_) => set(
                    &mut conditions,
                    condition::READY,
                    false,
                    "KillSwitchEngaged",
                    "the agent is stopped: see the KillSwitchEngaged condition".to_owned(),
                ),
            }
        }
    }

    let kill_switch = stop.map(|stop| {
        let previous = old.kill_switch.as_ref();
        KillSwitchStatus {
            engaged_at: previous
                .and_then(|k| k.engaged_at.clone())
                .or(Some(Time(now))),
            engaged_by: stop
                .by()
                .map(str::to_owned)
                .or_else(|| previous.and_then(|k| k.engaged_by.clone())),
            reason: stop.reason().map(str::to_owned),
        }
    });
    AgentIdentityStatus {
        service_account_name: Some(service_account.clone()),
        username: Some(format!(
            "system:serviceaccount:{namespace}:{service_account}"
        )),
        observed_generation: generation,
        kill_switch,
        last_kill_switch_drill: old.last_kill_switch_drill,
        conditions,
    }
}

/// The status of an AgentPolicy: compiled (or why not) and bound to an existing identity (or
/// which one is missing): the fields the operator owns. `tools` and `drift` are left out: the
/// gateway writes them from the audit trail under a field manager of its own
/// ([`operator_fields`] takes them out of a status read back, for comparison).
pub fn policy_status(
    policy: &AgentPolicy,
    compiled: Result<&CompiledPolicy, &CompileErrors>,
    identity: Option<&AgentIdentity>,
    now: Timestamp,
) -> AgentPolicyStatus {
    let old = policy.status.clone().unwrap_or_default();
    let generation = policy.metadata.generation;
    let mut conditions = old.conditions.clone();
    let namespace = policy.metadata.namespace.as_deref().unwrap_or_default();
    let identity_name = &policy.spec.identity_ref.name;
    let bound = identity.is_some();
    match identity {
        Some(identity) => set_condition(
            &mut conditions,
            condition::IDENTITY_BOUND,
            true,
            "Bound",
            format!(
                "governs AgentIdentity {namespace}/{identity_name} (ServiceAccount {})",
                identity.service_account_name()
            ),
            generation,
            now,
        ),
        None => set_condition(
            &mut conditions,
            condition::IDENTITY_BOUND,
            false,
            "IdentityNotFound",
            format!(
                "AgentIdentity {namespace}/{identity_name} does not exist: create it or fix spec.identityRef.name; until then every call is denied"
            ),
            generation,
            now,
        ),
    }
    let policy_hash = match compiled {
        Ok(compiled) => {
            if bound {
                set_condition(
                    &mut conditions,
                    condition::READY,
                    true,
                    "Compiled",
                    format!(
                        "in force as {} for AgentIdentity {namespace}/{identity_name}",
                        compiled.hash()
                    ),
                    generation,
                    now,
                );
            } else {
                set_condition(
                    &mut conditions,
                    condition::READY,
                    false,
                    "IdentityNotFound",
                    "the policy compiles but governs no identity: see IdentityBound".to_owned(),
                    generation,
                    now,
                );
            }
            Some(compiled.hash().to_owned())
        }
        Err(errors) => {
            set_condition(
                &mut conditions,
                condition::READY,
                false,
                "CompileFailed",
                format!("{errors}; every call of the agent is denied until it compiles"),
                generation,
                now,
            );
            None
        }
    };
    AgentPolicyStatus {
        observed_generation: generation,
        policy_hash,
        conditions,
        tools: Vec::new(),
        drift: None,
    }
}

/// The fields of `status` that [`policy_status`] writes.
pub fn operator_fields(status: &AgentPolicyStatus) -> AgentPolicyStatus {
    AgentPolicyStatus {
        tools: Vec::new(),
        drift: None,
        ..status.clone()
    }
}

/// What the operator does next with an ApprovalRequest.
#[derive(Debug, Clone, PartialEq)]
pub enum ApprovalStep {
    /// Write this status (the request reached a final phase), then look again.
    Write(ApprovalRequestStatus),
    /// Nothing to write; look again at this time (its expiry, or the end of its retention).
    WaitUntil(Timestamp),
    /// The retention period after the final phase has passed: delete it.
    Prune,
}

/// The next step for `request` at `now`: its phase from the decisions and expiry
/// ([`crate::approval::phase`]), denied with reason `KillSwitch` while `killed`, and pruned once
/// `retention` has passed after the final phase.
pub fn approval_step(
    request: &ApprovalRequest,
    killed: bool,
    retention: Duration,
    now: Timestamp,
) -> ApprovalStep {
    let status = request.status.clone().unwrap_or_default();
    if status.phase.is_final() {
        let decided = status
            .decided_at
            .as_ref()
            .map_or(request.spec.expires_at.0, |t| t.0);
        let prune_at = decided
            .checked_add(
                jiff::SignedDuration::try_from(retention).unwrap_or(jiff::SignedDuration::MAX),
            )
            .unwrap_or(Timestamp::MAX);
        return if now >= prune_at {
            ApprovalStep::Prune
        } else {
            ApprovalStep::WaitUntil(prune_at)
        };
    }
    let phase = crate::approval::phase(request, now);
    let generation = request.metadata.generation;
    let (phase, reason, message) = match phase {
        Phase::Pending if killed => (
            Phase::Denied,
            "KillSwitch",
            "denied because the agent's or the cluster-wide kill switch was engaged".to_owned(),
        ),
        Phase::Pending => return ApprovalStep::WaitUntil(request.spec.expires_at.0),
        Phase::Approved => {
            let users: Vec<&str> = request
                .spec
                .decisions
                .iter()
                .filter(|d| d.verdict == Verdict::Approve)
                .filter_map(|d| d.user.as_deref())
                .collect();
            (
                Phase::Approved,
                "ApprovedBy",
                format!("approved by {}", users.join(", ")),
            )
        }
        Phase::Denied => {
            let denial = request
                .spec
                .decisions
                .iter()
                .find(|d| d.verdict == Verdict::Deny);
            (
                Phase::Denied,
                "DeniedBy",
                format!(
                    "denied by {}{}",
                    denial
                        .and_then(|d| d.user.as_deref())
                        .unwrap_or("an approver"),
                    denial
                        .and_then(|d| d.comment.as_deref())
                        .map(|c| format!(": {c}"))
                        .unwrap_or_default()
                ),
            )
        }
        Phase::Expired => (
            Phase::Expired,
            "Timeout",
            format!(
                "no decision by {}; onTimeout Deny: the call is denied",
                request.spec.expires_at.0
            ),
        ),
        Phase::Cancelled => (
            Phase::Cancelled,
            "Cancelled",
            "the waiting call went away".to_owned(),
        ),
    };
    let mut conditions = status.conditions;
    set_condition(
        &mut conditions,
        "Decided",
        true,
        reason,
        message,
        generation,
        now,
    );
    ApprovalStep::Write(ApprovalRequestStatus {
        phase,
        decided_at: Some(Time(now)),
        reason: Some(reason.to_owned()),
        conditions,
    })
}

#[cfg(test)]
mod tests {
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

    fn reconcile(
        identity: &AgentIdentity,
        stop: Option<&Stop>,
        at: Timestamp,
    ) -> AgentIdentityStatus {
        let children = desired_children(identity, &gateway(), stop.is_some());
        identity_status(identity, stop, children.as_ref().map_err(Vec::as_slice), at)
    }

    fn cond<'a>(status: &'a AgentIdentityStatus, t: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    const CONFIGMAPS: &str =
        r#"[{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]"#;

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
}
