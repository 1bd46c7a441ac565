//! ApprovalRequest: one tool call waiting for people. The gateway writes the spec; approvers
//! append decisions (`kubectl tollgate approve|deny`, or a JSON patch); admission stamps each
//! decision with its authenticated user and time; the operator sets the phase and expires it.
//!
//! Everything in the spec but `decisions` is immutable, and decisions can only be appended: an
//! approval is bound to the exact arguments it was asked for (`argumentsDigest`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Approvers, LocalObjectReference, OnTimeout};

/// The most decisions one request can hold.
pub const MAX_DECISIONS: u64 = 32;

/// A tool call waiting for human approval.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tollgate.dev",
    version = "v1alpha1",
    kind = "ApprovalRequest",
    plural = "approvalrequests",
    singular = "approvalrequest",
    namespaced,
    status = "ApprovalRequestStatus",
    shortname = "apr",
    shortname = "approval",
    category = "tollgate",
    derive = "PartialEq",
    printcolumn(
        name = "Agent",
        type_ = "string",
        json_path = ".spec.identityRef.name",
        description = "The agent whose call waits"
    ),
    printcolumn(
        name = "Tool",
        type_ = "string",
        json_path = ".spec.tool",
        description = "The tool called"
    ),
    printcolumn(
        name = "Run",
        type_ = "string",
        json_path = ".spec.runId",
        priority = 1,
        description = "The run id"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Approved, Denied, Expired or Cancelled"
    ),
    printcolumn(
        name = "Expires",
        type_ = "date",
        json_path = ".spec.expiresAt",
        description = "When the request is denied if undecided"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new(
        "self.identityRef == oldSelf.identityRef && self.policyRef == oldSelf.policyRef && self.runId == oldSelf.runId && self.step == oldSelf.step && self.tool == oldSelf.tool && self.arguments == oldSelf.arguments && self.argumentsDigest == oldSelf.argumentsDigest && self.reason == oldSelf.reason && self.approvers == oldSelf.approvers && self.minApprovals == oldSelf.minApprovals && self.expiresAt == oldSelf.expiresAt && self.onTimeout == oldSelf.onTimeout"
    ).message("the spec of an ApprovalRequest is immutable; only appending to spec.decisions is allowed"),
    validation = Rule::new(
        "size(self.decisions) >= size(oldSelf.decisions) && oldSelf.decisions.all(d, d in self.decisions)"
    ).message("decisions can only be appended: existing decisions cannot be changed or removed"),
)]
pub struct ApprovalRequestSpec {
    /// The agent whose call waits.
    pub identity_ref: LocalObjectReference,
    /// The policy, and its exact version, that asked for approval.
    pub policy_ref: PolicyRef,
    /// The run the call belongs to.
    #[schemars(length(min = 1, max = 253))]
    pub run_id: String,
    /// The call's step within the run.
    #[schemars(range(min = 0))]
    pub step: i64,
    /// The tool called.
    #[schemars(length(min = 1, max = 128))]
    pub tool: String,
    /// The arguments as evaluated, with secret-like fields redacted.
    #[schemars(schema_with = "crate::schema::free_form_object")]
    pub arguments: serde_json::Value,
    /// sha256 over the canonical form of the unredacted arguments. An approval releases only a
    /// call with exactly these arguments.
    #[schemars(regex(pattern = r"^sha256:[0-9a-f]{64}$"))]
    pub arguments_digest: String,
    /// Why approval is needed, such as "tool send_customer_email is irreversible".
    #[schemars(length(min = 1, max = 1024))]
    pub reason: String,
    /// Who may decide.
    pub approvers: Approvers,
    /// Distinct approvals needed. Any single Deny denies.
    #[schemars(range(min = 1, max = 10))]
    pub min_approvals: i32,
    /// When the request expires if undecided.
    pub expires_at: Time,
    /// What happens at expiry: the call is denied.
    #[serde(default)]
    pub on_timeout: OnTimeout,
    /// Decisions, appended by approvers. User and time are stamped by admission from the
    /// authenticated request; whatever is written there is overwritten.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub decisions: Vec<ApprovalDecision>,
}

/// The policy version that asked for approval.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRef {
    /// The AgentPolicy's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The policy hash in force when the call was evaluated.
    #[schemars(regex(pattern = r"^sha256:[0-9a-f]{64}$"))]
    pub policy_hash: String,
}

/// One approver's decision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalDecision {
    /// Approve or Deny.
    pub verdict: Verdict,
    /// What the approver wants on the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub comment: Option<String>,
    /// The authenticated user who decided, stamped by admission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub user: Option<String>,
    /// When the decision was made, stamped by admission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Time>,
}

/// An approver's verdict.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Verdict {
    /// Release the call.
    Approve,
    /// Refuse the call. One Deny is final.
    Deny,
}

/// The lifecycle of a request.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Waiting for decisions.
    #[default]
    Pending,
    /// Enough distinct approvers approved; the call is released once.
    Approved,
    /// An approver denied, or the kill switch denied it.
    Denied,
    /// Nobody decided in time; the call is denied.
    Expired,
    /// The waiting call went away (its run ended) before a decision.
    Cancelled,
}

impl Phase {
    /// A final phase never changes again.
    pub fn is_final(self) -> bool {
        !matches!(self, Phase::Pending)
    }
}

/// Where the request stands.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRequestStatus {
    /// Pending, Approved, Denied, Expired or Cancelled.
    #[serde(default)]
    pub phase: Phase,
    /// When the request reached its final phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<Time>,
    /// Why it reached its phase, such as ApprovedBy, DeniedBy, Timeout or KillSwitch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Details for people.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,
}
