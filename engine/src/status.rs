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

/// Sets `Stalled` (True, with Ready's reason and message) when Ready is False for one of
/// `stalling` reasons, which only a change of the spec ends; removes it otherwise, as kstatus
/// reads an absent abnormal-true condition as False.
fn stall(
    conditions: &mut Vec<Condition>,
    stalling: &[&str],
    generation: Option<i64>,
    now: Timestamp,
) {
    let stalled = conditions
        .iter()
        .find(|c| c.type_ == condition::READY && c.status == "False")
        .filter(|ready| stalling.contains(&ready.reason.as_str()))
        .map(|ready| (ready.reason.clone(), ready.message.clone()));
    match stalled {
        Some((reason, message)) => set_condition(
            conditions,
            condition::STALLED,
            true,
            &reason,
            message,
            generation,
            now,
        ),
        None => conditions.retain(|c| c.type_ != condition::STALLED),
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
    stall(&mut conditions, &["RulesRefused"], generation, now);
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
    stall(
        &mut conditions,
        &["CompileFailed", "IdentityNotFound"],
        generation,
        now,
    );
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
mod tests;
