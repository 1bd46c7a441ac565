//! What the engine answers about a tool call, and the rule behind every answer.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tollgate_crds::common::Approvers;

use crate::budget::Ceiling;

/// The rule that made a decision: the policy and its version, the tool, and the clause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleRef {
    /// `namespace/name` of the AgentPolicy, or empty when there is none.
    pub policy: Arc<str>,
    /// The policy's metadata.generation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// The policy hash.
    pub policy_hash: Arc<str>,
    /// The tool the rule is about, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<Arc<str>>,
    /// The clause, as a field path such as `spec.tools.blocked`.
    pub clause: Cow<'static, str>,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.policy)?;
        if let Some(generation) = self.generation {
            write!(f, " (generation {generation})")?;
        }
        write!(f, " {}", self.clause)
    }
}

/// Why a call was denied. Stable names: agents and dashboards match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DenyCode {
    /// The agent's or the global kill switch is engaged.
    KillSwitch,
    /// No policy names the agent.
    NoPolicy,
    /// A policy names the agent but cannot be used: it does not parse or compile, or more than
    /// one names the agent. The message carries the error.
    PolicyInvalid,
    /// The tool is on the blocked list.
    ToolBlocked,
    /// The tool is not allowed (default deny).
    ToolNotAllowed,
    /// The arguments are not a JSON object.
    MalformedArguments,
    /// An argument field is not allowed.
    UnknownArgument,
    /// A required argument is missing.
    MissingArgument,
    /// An argument breaks its constraint (type, enum, pattern, range, length, items).
    ArgumentConstraint,
    /// The tool's per-run call limit is reached.
    CallLimit,
    /// The tool's per-run item limit would be exceeded.
    ItemLimit,
    /// The tool's `when` condition does not hold.
    ConditionFailed,
    /// The tool's `when` or `escalateWhen` condition could not be evaluated.
    ConditionError,
    /// The call needed approval and an approver denied it.
    ApprovalDenied,
    /// The call needed approval and nobody approved it before the request expired.
    ApprovalExpired,
    /// An agent's own Kubernetes API write (or a pod of the agent) is refused by admission:
    /// self-escalation, a protected object, a freeze window, a pod that does not match its
    /// identity. Only in the audit trail's admission records; the decision API never answers it.
    WriteRefused,
    /// A model call names a model (or provider) the policy does not list, or one without a price
    /// while the run has a cost ceiling.
    ModelNotAllowed,
    /// A model call cannot be paid for by what the run's token or cost ceilings leave (after the
    /// calls in flight): its prompt alone may take more. The run is not halted.
    InsufficientBudget,
    /// An MCP resource or prompt the policy does not list (`spec.resources`, `spec.prompts`).
    ContentNotAllowed,
}

impl DenyCode {
    /// The code's stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyCode::KillSwitch => "KillSwitch",
            DenyCode::NoPolicy => "NoPolicy",
            DenyCode::PolicyInvalid => "PolicyInvalid",
            DenyCode::ToolBlocked => "ToolBlocked",
            DenyCode::ToolNotAllowed => "ToolNotAllowed",
            DenyCode::MalformedArguments => "MalformedArguments",
            DenyCode::UnknownArgument => "UnknownArgument",
            DenyCode::MissingArgument => "MissingArgument",
            DenyCode::ArgumentConstraint => "ArgumentConstraint",
            DenyCode::CallLimit => "CallLimit",
            DenyCode::ItemLimit => "ItemLimit",
            DenyCode::ConditionFailed => "ConditionFailed",
            DenyCode::ConditionError => "ConditionError",
            DenyCode::ApprovalDenied => "ApprovalDenied",
            DenyCode::ApprovalExpired => "ApprovalExpired",
            DenyCode::WriteRefused => "WriteRefused",
            DenyCode::ModelNotAllowed => "ModelNotAllowed",
            DenyCode::InsufficientBudget => "InsufficientBudget",
            DenyCode::ContentNotAllowed => "ContentNotAllowed",
        }
    }
}

/// What must happen before a call may proceed: people must approve it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRequirement {
    /// Who may decide.
    pub approvers: Approvers,
    /// Distinct approvals needed.
    pub min_approvals: u32,
    /// How long the call may wait.
    #[serde(with = "seconds")]
    pub timeout: Duration,
    /// `sha256:<hex>` over the canonical arguments; the approval binds exactly these.
    pub arguments_digest: String,
    /// Why approval is needed, for the approver.
    pub reason: String,
    /// The notification targets the policy names for this tool's requests: delivery
    /// configuration, not part of the decision (never sent to the agent nor recorded).
    #[serde(skip)]
    pub notify: Vec<String>,
}

mod seconds {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

/// The engine's answer about one tool call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "camelCase")]
pub enum Decision {
    /// The call may proceed.
    Allow {
        /// The rule that allowed it.
        rule: RuleRef,
        /// AuditBased autonomy: the call proceeds and is queued for scheduled review.
        review: bool,
    },
    /// The call is refused.
    Deny {
        /// Why, as a stable code.
        code: DenyCode,
        /// The rule that refused it.
        rule: RuleRef,
        /// What is wrong and what the agent can do, in words.
        message: String,
    },
    /// The call waits for people.
    RequireApproval {
        /// The rule that asked.
        rule: RuleRef,
        /// Who, how many, how long, and for which exact arguments.
        approval: ApprovalRequirement,
    },
    /// A ceiling is reached: the run is halted and every further call of it is refused.
    Halt {
        /// The ceiling that halted the run.
        ceiling: Ceiling,
        /// The rule that set the ceiling.
        rule: RuleRef,
        /// What happened, in words.
        message: String,
    },
}

impl Decision {
    /// Whether the call may proceed now.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// The rule behind the decision.
    pub fn rule(&self) -> &RuleRef {
        match self {
            Decision::Allow { rule, .. }
            | Decision::Deny { rule, .. }
            | Decision::RequireApproval { rule, .. }
            | Decision::Halt { rule, .. } => rule,
        }
    }

    /// The deny code, if the call was denied.
    pub fn deny_code(&self) -> Option<DenyCode> {
        match self {
            Decision::Deny { code, .. } => Some(*code),
            _ => None,
        }
    }
}
