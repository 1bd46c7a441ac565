//! Types shared by the three kinds: references, approver sets and condition names.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition types Tollgate sets, and the reasons it uses. Constants, so a typo is a compile error.
pub mod condition {
    /// Everything the object asks for is in force.
    pub const READY: &str = "Ready";
    /// The agent's Role and RoleBinding hold exactly its declared rules.
    pub const RBAC_APPLIED: &str = "RBACApplied";
    /// The agent's NetworkPolicy denies all egress except what is declared.
    pub const NETWORK_ISOLATED: &str = "NetworkIsolated";
    /// The agent's or the global kill switch is engaged.
    pub const KILL_SWITCH_ENGAGED: &str = "KillSwitchEngaged";
    /// The policy's identityRef names an AgentIdentity that exists.
    pub const IDENTITY_BOUND: &str = "IdentityBound";
    /// kstatus' abnormal-true condition: present (True) only while the object cannot be put in
    /// force until a person fixes its spec, so GitOps health checks (Flux, kstatus) fail it
    /// instead of waiting; absent otherwise.
    pub const STALLED: &str = "Stalled";
}

/// A reference to an object of a known kind in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectReference {
    /// Name of the referenced object, in this object's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// People allowed to decide an approval. A decision counts when its authenticated user is listed
/// in `users` or belongs to one of `groups`; the agent's own identity never counts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, kube::KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("size(self.groups) + size(self.users) > 0")
    .message("name at least one approver group or user"))]
pub struct Approvers {
    /// Kubernetes groups whose members may approve (as authenticated by the apiserver).
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::label_set")]
    pub groups: Vec<String>,
    /// Kubernetes usernames that may approve.
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::label_set")]
    pub users: Vec<String>,
}

/// What happens to a pending approval when its time runs out. Tollgate never approves by
/// timeout, so `Deny` is the only choice; the field exists so the outcome is written down.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum OnTimeout {
    /// The call is denied and the request becomes `Expired`.
    #[default]
    Deny,
}

/// The Lease in Tollgate's namespace that the leading operator replica holds.
pub const OPERATOR_LEASE: &str = "tollgate-operator";

/// The cluster-wide kill switch: a ConfigMap of this name in Tollgate's namespace. While its
/// `engaged` key is `"true"`, every agent is stopped as if its own switch were engaged.
pub const GLOBAL_KILL_SWITCH: &str = "tollgate-kill-switch";
/// The ConfigMap key that engages the global switch.
pub const GLOBAL_KILL_SWITCH_KEY: &str = "engaged";
/// The ConfigMap key holding why the global switch was engaged.
pub const GLOBAL_KILL_SWITCH_REASON_KEY: &str = "reason";

/// A person to reach, and how: escalation names people, not only channels.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Contact {
    /// Who: a person, such as `Alice Ng (support lead)`.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// How to reach them now: an e-mail address, a phone number, a pager handle.
    #[schemars(length(min = 1, max = 253))]
    pub reach: String,
}
