//! Admission decisions for an agent identity's own Kubernetes API writes. RBAC says what the
//! agent's ServiceAccount may do; these rules say what its policy forbids even so: nothing at
//! all while a kill switch is engaged, nothing that would raise its own rights, nothing during a
//! freeze window, and nothing to protected objects.

use std::collections::BTreeMap;

use jiff::Timestamp;
use tollgate_crds::policy::Operation;

use crate::compile::CompiledPolicy;
use crate::decision::{Decision, DenyCode, RuleRef};

/// One write by an agent, as the AdmissionReview describes it.
#[derive(Debug, Clone, Copy)]
pub struct ApiWrite<'a> {
    /// CREATE, UPDATE, DELETE or CONNECT.
    pub operation: Operation,
    /// The API group ("" for core).
    pub group: &'a str,
    /// The resource (plural).
    pub resource: &'a str,
    /// The subresource, or "".
    pub subresource: &'a str,
    /// The object's name, if known.
    pub name: &'a str,
    /// The labels of the object as it will be (CREATE, UPDATE).
    pub labels: Option<&'a BTreeMap<String, String>>,
    /// The labels of the object as it is (UPDATE, DELETE).
    pub old_labels: Option<&'a BTreeMap<String, String>>,
}

/// The verdict on one write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The write may proceed (RBAC still applies).
    Allowed,
    /// The write is refused.
    Denied {
        /// Why, as the audit trail's code: `KillSwitch`, `NoPolicy` or `WriteRefused`.
        code: DenyCode,
        /// The rule, as `<policy> <clause>` or `AgentIdentity <name>[ <clause>]`.
        rule: String,
        /// What is refused and why, for the agent and the audit trail.
        message: String,
    },
}

/// What admission judged of an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judged {
    /// Its own API write, under its AgentPolicy's `spec.kubernetes`.
    Write,
    /// A pod that runs as it, under its AgentIdentity's `spec.podSelector`.
    Pod,
}

impl Verdict {
    /// Whether the write may proceed.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Verdict::Allowed)
    }

    /// The verdict as the audit trail records it: a decision whose rule names `policy` (the
    /// agent's compiled policy, if it has one) or else the AgentIdentity `agent`
    /// (`namespace/name`), and the clause that decided. An allowed write names the section no
    /// rule of which refused it.
    pub fn decision(
        &self,
        judged: Judged,
        agent: &str,
        policy: Option<&CompiledPolicy>,
    ) -> Decision {
        let rule = |clause: &str| RuleRef {
            policy: policy
                .map_or_else(|| format!("AgentIdentity {agent}"), |p| p.id().to_owned())
                .into(),
            generation: policy.and_then(CompiledPolicy::generation),
            policy_hash: policy.map(CompiledPolicy::hash).unwrap_or_default().into(),
            tool: None,
            clause: clause.to_owned().into(),
        };
        match self {
            Verdict::Allowed => Decision::Allow {
                rule: rule(match judged {
                    Judged::Write => "spec.kubernetes",
                    Judged::Pod => "spec.podSelector",
                }),
                review: false,
            },
            Verdict::Denied {
                code,
                rule: named,
                message,
            } => {
                let clause = match named.strip_prefix("AgentIdentity ") {
                    Some(rest) => rest.split_once(' ').map_or("", |(_, c)| c),
                    None => named.split_once(' ').map_or(named.as_str(), |(_, c)| c),
                };
                Decision::Deny {
                    code: *code,
                    rule: rule(clause),
                    message: message.clone(),
                }
            }
        }
    }
}

/// Decides one write by an agent. `policy` is None when the agent has no usable policy, which
/// denies every write (fail closed).
pub fn admit(
    agent: &str,
    killed: bool,
    policy: Option<&CompiledPolicy>,
    write: &ApiWrite<'_>,
    now: Timestamp,
) -> Verdict {
    let denied = |code: DenyCode, rule: String, message: String| Verdict::Denied {
        code,
        rule,
        message,
    };
    let what = describe(write);
    if killed {
        return denied(
            DenyCode::KillSwitch,
            format!("AgentIdentity {agent} spec.killSwitch"),
            format!("the kill switch of agent {agent} is engaged; {what} is refused"),
        );
    }
    let Some(policy) = policy else {
        return denied(
            DenyCode::NoPolicy,
            format!("AgentIdentity {agent}"),
            format!(
                "agent {agent} has no usable AgentPolicy; {what} is refused until one is in force"
            ),
        );
    };
    let id = policy.id();
    let target = if write.subresource.is_empty() {
        write.resource.to_owned()
    } else {
        format!("{}/{}", write.resource, write.subresource)
    };
    if let Some((_, _, label)) =
        crate::children::SELF_ESCALATION
            .iter()
            .find(|(group, resource, _)| {
                write.group == *group && (*resource == "*" || target == *resource)
            })
    {
        return denied(
            DenyCode::WriteRefused,
            format!("{id} tollgate:self-escalation"),
            format!("agents may not write {label}; {what} is refused"),
        );
    }
    for freeze in &policy.freezes {
        if freeze.start <= now && now < freeze.end {
            let reason = if freeze.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", freeze.reason)
            };
            return denied(
                DenyCode::WriteRefused,
                format!("{id} spec.kubernetes.freezeWindows[{}]", freeze.index),
                format!(
                    "writes are frozen from {} to {}{reason}; {what} is refused",
                    freeze.start, freeze.end
                ),
            );
        }
    }
    for rule in &policy.protected {
        if !rule.operations.contains(&write.operation) {
            continue;
        }
        if !rule.api_groups.is_empty()
            && !rule.api_groups.iter().any(|g| g == "*" || g == write.group)
        {
            continue;
        }
        if !rule.resources.is_empty()
            && !rule
                .resources
                .iter()
                .any(|r| r == "*" || r == write.resource)
        {
            continue;
        }
        // On DELETE the object as it is decides; on UPDATE either side does, so removing the
        // label in one write and deleting in the next cannot slip through.
        let judged: &[Option<&BTreeMap<String, String>>] = match write.operation {
            Operation::Delete | Operation::Connect => &[write.old_labels],
            Operation::Create => &[write.labels],
            Operation::Update => &[write.old_labels, write.labels],
        };
        let empty = BTreeMap::new();
        if judged
            .iter()
            .any(|labels| rule.selector.matches(labels.unwrap_or(&empty)))
        {
            return denied(
                DenyCode::WriteRefused,
                format!("{id} spec.kubernetes.protectedResources[{}]", rule.index),
                format!("{what} is refused: the object is protected by policy {id}"),
            );
        }
    }
    Verdict::Allowed
}

fn describe(write: &ApiWrite<'_>) -> String {
    let operation = match write.operation {
        Operation::Create => "CREATE",
        Operation::Update => "UPDATE",
        Operation::Delete => "DELETE",
        Operation::Connect => "CONNECT",
    };
    let group = if write.group.is_empty() {
        "core".to_owned()
    } else {
        write.group.to_owned()
    };
    let sub = if write.subresource.is_empty() {
        String::new()
    } else {
        format!("/{}", write.subresource)
    };
    let name = if write.name.is_empty() {
        String::new()
    } else {
        format!(" {}", write.name)
    };
    format!("{operation} of {group} {}{sub}{name}", write.resource)
}

/// Where injected agent pods find their token and the gateway.
pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/tollgate.dev";
/// The injected volume's name.
pub const TOKEN_VOLUME: &str = "tollgate-token";

/// The one change the gateway may make to an AgentIdentity: engaging its kill switch after a
/// budget breach (`onBudgetExceeded.engageKillSwitch`), with a reason. Anything else it writes,
/// including releasing a switch, is refused, so a compromised gateway cannot widen an agent.
pub fn gateway_identity_update(
    old: &tollgate_crds::AgentIdentity,
    new: &tollgate_crds::AgentIdentity,
) -> Result<(), String> {
    if !new.spec.kill_switch.engaged {
        return Err("the gateway may only engage a kill switch, never release one".to_owned());
    }
    let mut unchanged = new.spec.clone();
    unchanged.kill_switch = old.spec.kill_switch.clone();
    if unchanged != old.spec {
        return Err(
            "the gateway may change nothing in an AgentIdentity but spec.killSwitch".to_owned(),
        );
    }
    if new.metadata.labels != old.metadata.labels {
        return Err("the gateway may not change an AgentIdentity's labels".to_owned());
    }
    Ok(())
}

/// Who engaged a kill switch, as admission stamps it in
/// [`crate::status::KILL_SWITCH_BY_ANNOTATION`]: the authenticated `user` of the write that
/// engages it, what was recorded before while it stays engaged, nobody once it is released.
/// Whatever the writer put in the annotation itself never counts. `old` is the switch and its
/// recorded engager before the write (None on create).
pub fn kill_switch_engaged_by(
    old: Option<(bool, Option<&str>)>,
    engaged: bool,
    user: &str,
) -> Option<String> {
    match old {
        _ if !engaged => None,
        Some((true, recorded)) => recorded.map(str::to_owned),
        _ => Some(user.to_owned()),
    }
}

/// Decides whether a pod may run as an agent's ServiceAccount: its labels must match the
/// identity's podSelector and no kill switch may be engaged.
pub fn admit_pod(
    identity: &tollgate_crds::AgentIdentity,
    killed: bool,
    pod_labels: &BTreeMap<String, String>,
) -> Verdict {
    let name = identity.metadata.name.as_deref().unwrap_or_default();
    let rule = format!("AgentIdentity {name}");
    if killed {
        return Verdict::Denied {
            code: DenyCode::KillSwitch,
            rule: format!("{rule} spec.killSwitch"),
            message: format!(
                "the kill switch of agent {name} is engaged; no new pods run as {}",
                identity.service_account_name()
            ),
        };
    }
    match crate::selector::Selector::compile(&identity.spec.pod_selector) {
        Ok(selector) if selector.matches(pod_labels) => Verdict::Allowed,
        Ok(_) => Verdict::Denied {
            code: DenyCode::WriteRefused,
            rule: format!("{rule} spec.podSelector"),
            message: format!(
                "pods running as {} must match the podSelector of AgentIdentity {name}; this pod's labels do not",
                identity.service_account_name()
            ),
        },
        Err(e) => Verdict::Denied {
            code: DenyCode::WriteRefused,
            rule: format!("{rule} spec.podSelector"),
            message: format!("AgentIdentity {name} has an invalid podSelector: {e}"),
        },
    }
}

/// The JSON patch that gives an agent pod its gateway token (a projected ServiceAccount token
/// with the identity's audience and lifetime, mounted read-only in every container), sets
/// TOLLGATE_URL and labels it [`crate::children::AGENT_LABEL`] with its identity's name (the label the
/// gateway's ingress NetworkPolicy admits, and the one on every object the operator makes for
/// the agent). `pod` is the pod as submitted (its `metadata` and `spec`).
pub fn pod_injection(
    identity: &tollgate_crds::AgentIdentity,
    gateway_url: &str,
    pod: &serde_json::Value,
) -> Vec<serde_json::Value> {
    use crate::children::AGENT_LABEL;
    use serde_json::json;
    let settings = &identity.spec.service_account;
    let volume = json!({
        "name": TOKEN_VOLUME,
        "projected": {"sources": [{"serviceAccountToken": {
            "audience": settings.token_audience, "expirationSeconds": settings.token_expiration_seconds, "path": "token"
        }}]}
    });
    let mut patch = Vec::new();
    // The label the gateway's ingress NetworkPolicy admits: only agent pods reach its API.
    let name = identity.metadata.name.clone().unwrap_or_default();
    match pod.pointer("/metadata/labels") {
        Some(serde_json::Value::Object(_)) => patch.push(json!({"op": "add",
            "path": format!("/metadata/labels/{}", AGENT_LABEL.replace('~', "~0").replace('/', "~1")),
            "value": name})),
        _ => patch.push(json!({"op": "add", "path": "/metadata/labels", "value": {AGENT_LABEL: name}})),
    }
    let volumes = pod.pointer("/spec/volumes").and_then(|v| v.as_array());
    if volumes.is_some_and(|v| v.iter().any(|v| v["name"] == TOKEN_VOLUME)) {
        return patch;
    }
    match volumes {
        Some(_) => patch.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume})),
        None => patch.push(json!({"op": "add", "path": "/spec/volumes", "value": [volume]})),
    }
    let mount = json!({"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT_PATH, "readOnly": true});
    let env = json!({"name": "TOLLGATE_URL", "value": gateway_url});
    for kind in ["containers", "initContainers"] {
        let Some(containers) = pod
            .pointer(&format!("/spec/{kind}"))
            .and_then(|c| c.as_array())
        else {
            continue;
        };
        for (i, container) in containers.iter().enumerate() {
            for (field, value) in [("volumeMounts", &mount), ("env", &env)] {
                if container.get(field).is_some_and(|v| v.is_array()) {
                    patch.push(json!({"op": "add", "path": format!("/spec/{kind}/{i}/{field}/-"), "value": value}));
                } else {
                    patch.push(json!({"op": "add", "path": format!("/spec/{kind}/{i}/{field}"), "value": [value]}));
                }
            }
        }
    }
    patch
}

#[cfg(test)]
mod kill_switch_tests {
    use super::{gateway_identity_update, kill_switch_engaged_by};
    use serde_json::json;
    use tollgate_crds::AgentIdentity;

    fn identity(kill: serde_json::Value, verbs: &[&str]) -> AgentIdentity {
        serde_json::from_value(json!({
            "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentIdentity",
            "metadata": {"name": "a", "namespace": "ns", "labels": {"team": "x"}},
            "spec": {"description": "d", "owner": {"team": "t", "contacts": ["c"]},
                     "podSelector": {"matchLabels": {"app": "a"}},
                     "kubernetes": {"rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": verbs}]},
                     "killSwitch": kill}
        }))
        .unwrap()
    }

    #[test]
    fn the_gateway_may_engage_a_kill_switch_and_do_nothing_else() {
        let old = identity(json!({}), &["get"]);
        let engaged = identity(
            json!({"engaged": true, "reason": "budget breach"}),
            &["get"],
        );
        assert!(gateway_identity_update(&old, &engaged).is_ok());
        let widened = identity(json!({"engaged": true}), &["get", "delete"]);
        assert!(
            gateway_identity_update(&old, &widened)
                .unwrap_err()
                .contains("nothing")
        );
        let released = identity(json!({"engaged": false}), &["get"]);
        assert!(
            gateway_identity_update(&engaged, &released)
                .unwrap_err()
                .contains("never release")
        );
        let mut relabelled = engaged.clone();
        relabelled.metadata.labels = None;
        assert!(
            gateway_identity_update(&old, &relabelled)
                .unwrap_err()
                .contains("labels")
        );
    }

    #[test]
    fn the_engager_is_whoever_engaged_it_never_what_the_writer_claims() {
        // Created engaged, engaged by a write, kept while engaged, cleared when released.
        assert_eq!(
            kill_switch_engaged_by(None, true, "alice").as_deref(),
            Some("alice")
        );
        assert_eq!(kill_switch_engaged_by(None, false, "alice"), None);
        assert_eq!(
            kill_switch_engaged_by(Some((false, None)), true, "bob").as_deref(),
            Some("bob")
        );
        assert_eq!(
            kill_switch_engaged_by(Some((true, Some("alice"))), true, "mallory").as_deref(),
            Some("alice"),
            "a later write while engaged does not take the credit"
        );
        assert_eq!(
            kill_switch_engaged_by(Some((true, Some("alice"))), false, "bob"),
            None
        );
        // A forged value left over from before is replaced by the real engager.
        assert_eq!(
            kill_switch_engaged_by(Some((false, Some("forged"))), true, "carol").as_deref(),
            Some("carol")
        );
    }
}
