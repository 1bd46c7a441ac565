//! AgentIdentity: who an agent is (layer 1). The operator turns one into a ServiceAccount, a Role
//! and RoleBinding holding exactly `spec.kubernetes.rules`, and a NetworkPolicy that denies all
//! egress except DNS, the Tollgate gateway and `spec.network.egress`.

use k8s_openapi::api::networking::v1::NetworkPolicyEgressRule;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The identity of one AI agent: its accountable owners, the pods that are this agent, its own
/// Kubernetes API rights, its network reach, the per-tool credentials the gateway adds on its
/// behalf, and its kill switch.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tollgate.dev",
    version = "v1alpha1",
    kind = "AgentIdentity",
    plural = "agentidentities",
    singular = "agentidentity",
    namespaced,
    status = "AgentIdentityStatus",
    shortname = "agid",
    category = "tollgate",
    derive = "PartialEq",
    validation = kube::core::Rule::new("size(self.metadata.name) <= 57")
        .message("the name must be at most 57 characters, so agent-<name> is a valid ServiceAccount and label value"),
    printcolumn(name = "ServiceAccount", type_ = "string", json_path = ".status.serviceAccountName",
        description = "The ServiceAccount the agent runs as"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the identity's ServiceAccount, RBAC and network isolation are in force"),
    printcolumn(name = "Killed", type_ = "boolean", json_path = ".spec.killSwitch.engaged",
        description = "Whether the agent's kill switch is engaged"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct AgentIdentitySpec {
    /// The agent's function, in words: what it is for, so a reviewer can judge its rights.
    #[schemars(length(min = 1, max = 1024))]
    pub description: String,
    /// The people accountable for this agent.
    pub owner: Owner,
    /// Selects the pods that are this agent. Admission refuses pods that run as the agent's
    /// ServiceAccount without matching this selector.
    pub pod_selector: LabelSelector,
    /// The agent's ServiceAccount and the tokens it presents to the gateway.
    #[serde(default)]
    pub service_account: ServiceAccountSettings,
    /// The agent's own Kubernetes API rights. They become one Role and RoleBinding, nothing more.
    #[serde(default)]
    pub kubernetes: KubernetesAccess,
    /// Network egress allowed beyond DNS and the Tollgate gateway.
    #[serde(default)]
    pub network: NetworkAccess,
    /// Per-upstream credentials. The gateway reads them and adds them to forwarded calls; they
    /// are never mounted into the agent's pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::credentials")]
    pub credentials: Vec<ToolCredential>,
    /// Stops the agent everywhere at once: the gateway denies its calls, its RoleBinding is
    /// removed, its egress is cut, pending approvals are denied and admission refuses its writes.
    #[serde(default)]
    pub kill_switch: KillSwitch,
}

/// Accountable people: names, not a channel.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Owner {
    /// The owning team.
    #[schemars(length(min = 1, max = 253))]
    pub team: String,
    /// People to reach about this agent (e-mail addresses or usernames). At least one.
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 253)))]
    pub contacts: Vec<String>,
}

/// The agent's ServiceAccount and the tokens it presents to the gateway.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountSettings {
    /// Name of the ServiceAccount; it must start with `agent-`, which is how admission tells
    /// agents' requests from everyone else's. Defaults to `agent-<metadata.name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 7, max = 253),
        regex(pattern = r"^agent-[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: Option<String>,
    /// Audience of the projected token the agent presents to the gateway.
    #[serde(default = "default_audience")]
    #[schemars(length(min = 1, max = 253))]
    pub token_audience: String,
    /// Lifetime of that token, in seconds (600 to 86400).
    #[serde(default = "default_token_expiration")]
    #[schemars(range(min = 600, max = 86400))]
    pub token_expiration_seconds: i64,
}

fn default_audience() -> String {
    "tollgate".to_owned()
}

fn default_token_expiration() -> i64 {
    3600
}

impl Default for ServiceAccountSettings {
    fn default() -> Self {
        Self {
            name: None,
            token_audience: default_audience(),
            token_expiration_seconds: default_token_expiration(),
        }
    }
}

/// The agent's own Kubernetes API rights.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesAccess {
    /// RBAC rules for a namespaced Role bound to the agent's ServiceAccount. Rules over
    /// tollgate.dev or rbac.authorization.k8s.io and the escalate, bind and impersonate verbs are
    /// refused: an agent never raises its own rights.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub rules: Vec<AccessRule>,
}

/// One RBAC rule of the agent's Role: the shape of rbac/v1 PolicyRule without nonResourceURLs,
/// which a namespaced Role cannot grant, and with bounded lists.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new("!self.apiGroups.exists(g, g == 'tollgate.dev' || g == 'rbac.authorization.k8s.io')")
        .message("rules may not cover tollgate.dev or rbac.authorization.k8s.io: an agent cannot grant itself rights"),
    validation = kube::core::Rule::new("!self.verbs.exists(v, v == 'escalate' || v == 'bind' || v == 'impersonate')")
        .message("the escalate, bind and impersonate verbs are not allowed for agents"),
)]
pub struct AccessRule {
    /// API groups of the resources; "" is the core group.
    #[serde(default)]
    #[schemars(length(max = 32), inner(length(max = 253)))]
    pub api_groups: Vec<String>,
    /// Resources (plural names, optionally with a subresource such as pods/log).
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 253)))]
    pub resources: Vec<String>,
    /// Restricts the rule to objects with these names; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub resource_names: Vec<String>,
    /// Verbs allowed, such as get, list, watch, create, update, patch, delete.
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 64)))]
    pub verbs: Vec<String>,
}

/// Network egress allowed beyond DNS and the Tollgate gateway.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkAccess {
    /// Extra egress rules, in NetworkPolicy form. Empty means DNS and the gateway only.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub egress: Vec<NetworkPolicyEgressRule>,
}

/// A credential the gateway adds when it forwards a call to one upstream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolCredential {
    /// The upstream (as named in the AgentPolicy) this credential is for.
    #[schemars(length(min = 1, max = 63))]
    pub upstream: String,
    /// The Secret key, in the identity's namespace, holding the credential.
    pub secret_ref: SecretKeyRef,
    /// The HTTP header the gateway sets.
    #[serde(default = "default_header")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub header: String,
    /// The header value, with `{}` replaced by the secret.
    #[serde(default = "default_format")]
    #[schemars(length(min = 2, max = 256))]
    #[x_kube(validation = kube::core::Rule::new("self.contains('{}')").message("format must contain {} where the secret goes"))]
    pub format: String,
}

fn default_header() -> String {
    "Authorization".to_owned()
}

fn default_format() -> String {
    "Bearer {}".to_owned()
}

/// A key of a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// The agent's kill switch.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KillSwitch {
    /// While true, the agent can do nothing: no tool call, no approval release, no API write and
    /// no new pod.
    #[serde(default)]
    pub engaged: bool,
    /// Why it was engaged, for the people who will read the audit trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
}

/// What is in force for this identity, as observed by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentIdentityStatus {
    /// The ServiceAccount the agent runs as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// The username the apiserver authenticates the agent as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Who engaged the kill switch and when, stamped by Tollgate (not user-written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_switch: Option<KillSwitchStatus>,
    /// When the kill switch was last exercised in a drill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_kill_switch_drill: Option<Time>,
    /// Ready, RBACApplied, NetworkIsolated and KillSwitchEngaged, each with a reason and a message
    /// that says what to fix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,
}

/// Who engaged a kill switch and when.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KillSwitchStatus {
    /// When the switch was engaged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engaged_at: Option<Time>,
    /// The authenticated user who engaged it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engaged_by: Option<String>,
    /// The reason given, or the global switch's reason when that is what engaged it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl AgentIdentity {
    /// The ServiceAccount name this identity runs as: `spec.serviceAccount.name`, or
    /// `agent-<metadata.name>`.
    pub fn service_account_name(&self) -> String {
        match &self.spec.service_account.name {
            Some(name) => name.clone(),
            None => format!(
                "agent-{}",
                self.metadata.name.as_deref().unwrap_or_default()
            ),
        }
    }
}
