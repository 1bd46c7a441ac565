//! Admission decisions for an agent identity's own Kubernetes API writes. RBAC says what the
//! agent's ServiceAccount may do; these rules say what its policy forbids even so: nothing at
//! all while a kill switch is engaged, nothing that would raise its own rights, nothing during a
//! freeze window, and nothing to protected objects.

use std::collections::BTreeMap;

use jiff::Timestamp;
use tollgate_crds::policy::Operation;

use crate::compile::CompiledPolicy;

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
        /// The rule, as `<policy> <clause>`.
        rule: String,
        /// What is refused and why, for the agent and the audit trail.
        message: String,
    },
}

impl Verdict {
    /// Whether the write may proceed.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Verdict::Allowed)
    }
}

/// Groups and resources an agent may never write, whatever its RBAC: they would let it raise its
/// own rights, loosen its isolation or disable Tollgate.
const SELF_ESCALATION: &[(&str, &str, &str)] = &[
    ("tollgate.dev", "*", "Tollgate's own kinds"),
    ("rbac.authorization.k8s.io", "*", "RBAC"),
    ("networking.k8s.io", "networkpolicies", "NetworkPolicies"),
    (
        "admissionregistration.k8s.io",
        "*",
        "admission webhooks and policies",
    ),
    ("apiextensions.k8s.io", "*", "CustomResourceDefinitions"),
    ("certificates.k8s.io", "*", "certificate signing"),
];

/// Decides one write by an agent. `policy` is None when the agent has no usable policy, which
/// denies every write (fail closed).
pub fn admit(
    agent: &str,
    killed: bool,
    policy: Option<&CompiledPolicy>,
    write: &ApiWrite<'_>,
    now: Timestamp,
) -> Verdict {
    let denied = |rule: String, message: String| Verdict::Denied { rule, message };
    let what = describe(write);
    if killed {
        return denied(
            format!("AgentIdentity {agent} spec.killSwitch"),
            format!("the kill switch of agent {agent} is engaged; {what} is refused"),
        );
    }
    let Some(policy) = policy else {
        return denied(
            format!("AgentIdentity {agent}"),
            format!(
                "agent {agent} has no usable AgentPolicy; {what} is refused until one is in force"
            ),
        );
    };
    let id = policy.id();
    for (group, resource, label) in SELF_ESCALATION {
        if write.group == *group && (*resource == "*" || write.resource == *resource) {
            return denied(
                format!("{id} tollgate:self-escalation"),
                format!("agents may not write {label}; {what} is refused"),
            );
        }
    }
    if write.group.is_empty() && write.resource == "serviceaccounts" && write.subresource == "token"
    {
        return denied(
            format!("{id} tollgate:self-escalation"),
            format!("agents may not mint ServiceAccount tokens; {what} is refused"),
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
