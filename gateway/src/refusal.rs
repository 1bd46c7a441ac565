//! Refusals before any decision: a stable code, a status, words, and the shape every transport
//! answers them in.

use super::*;

/// A refusal before any decision: what is wrong, as a stable code and words.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    pub(crate) status: StatusCode,
    pub(crate) code: RefusalCode,
    pub(crate) message: String,
    /// Who presented a valid credential that is refused all the same (a token of no agent),
    /// for the record when there is no caller.
    pub(crate) who: Option<String>,
}

/// Why the gateway refused a request without a decision: `error.code` of the answer. The OpenAPI
/// document (openapi/gateway.yaml) lists exactly these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalCode {
    /// No credential, or one the gateway does not accept.
    Unauthenticated,
    /// The token could not be reviewed now (the apiserver did not answer).
    AuthenticationUnavailable,
    /// The token is valid but belongs to no AgentIdentity's ServiceAccount.
    NotAnAgent,
    /// The gateway is configured so that it cannot authenticate this kind of credential.
    Misconfigured,
    /// The body is not a request the API accepts (JSON, fields, types).
    MalformedRequest,
    /// The body exceeds the gateway's limit.
    PayloadTooLarge,
    /// The agent has no usable policy for this request.
    NoPolicy,
    /// The credential's agent has no AgentIdentity.
    UnknownAgent,
    /// A report names a run the agent never started.
    UnknownRun,
    /// A report names a step that is not a released call of that tool waiting for its report
    /// (refused, unknown, or reported already).
    UnknownStep,
    /// The agent's policy failed to load (standalone: its file); the message says why.
    PolicyInvalid,
    /// No approval can be asked for now: the standalone gateway holds as many open
    /// ApprovalRequests as it may.
    NoApprovals,
    /// The audit trail cannot record the request, so it must not proceed.
    AuditUnavailable,
    /// The Kubernetes API could not be read for what the decision needs.
    ClusterUnavailable,
    /// The path names an upstream, endpoint or model the agent's policy does not serve.
    NotServed,
    /// The agent holds as many stdio MCP server sessions as it may.
    SessionLimit,
    /// Standalone approvals: the key is not an approver's (an agent's key decides nothing).
    NotAnApprover,
    /// Standalone approvals: there is no such ApprovalRequest (never asked for, or forgotten
    /// an hour after it ended or when the gateway restarted).
    UnknownApproval,
    /// Standalone approvals: the rules refuse this decision (not a listed approver, decided
    /// already, final, expired, the agent's kill switch); the message says which.
    DecisionRefused,
}

impl RefusalCode {
    /// Every code.
    pub const ALL: [Self; 19] = [
        Self::Unauthenticated,
        Self::AuthenticationUnavailable,
        Self::NotAnAgent,
        Self::Misconfigured,
        Self::MalformedRequest,
        Self::PayloadTooLarge,
        Self::NoPolicy,
        Self::UnknownAgent,
        Self::UnknownRun,
        Self::UnknownStep,
        Self::PolicyInvalid,
        Self::NoApprovals,
        Self::AuditUnavailable,
        Self::ClusterUnavailable,
        Self::NotServed,
        Self::SessionLimit,
        Self::NotAnApprover,
        Self::UnknownApproval,
        Self::DecisionRefused,
    ];

    /// The code as it is sent.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthenticated => "Unauthenticated",
            Self::AuthenticationUnavailable => "AuthenticationUnavailable",
            Self::NotAnAgent => "NotAnAgent",
            Self::Misconfigured => "Misconfigured",
            Self::MalformedRequest => "MalformedRequest",
            Self::PayloadTooLarge => "PayloadTooLarge",
            Self::NoPolicy => "NoPolicy",
            Self::UnknownAgent => "UnknownAgent",
            Self::UnknownRun => "UnknownRun",
            Self::UnknownStep => "UnknownStep",
            Self::PolicyInvalid => "PolicyInvalid",
            Self::NoApprovals => "NoApprovals",
            Self::AuditUnavailable => "AuditUnavailable",
            Self::ClusterUnavailable => "ClusterUnavailable",
            Self::NotServed => "NotServed",
            Self::SessionLimit => "SessionLimit",
            Self::NotAnApprover => "NotAnApprover",
            Self::UnknownApproval => "UnknownApproval",
            Self::DecisionRefused => "DecisionRefused",
        }
    }
}

impl std::fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Refusal {
    pub(crate) fn new(status: StatusCode, code: RefusalCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            who: None,
        }
    }

    /// Names who presented the refused credential.
    pub(crate) fn by(mut self, username: impl Into<String>) -> Self {
        self.who = Some(username.into());
        self
    }

    /// The identity a record of this refusal names: the caller's, else whoever the credential
    /// proved to be, else `anonymous`.
    pub(crate) fn identity(&self, caller: Option<&Caller>) -> Identity {
        let mut identity = identity_of(caller);
        if caller.is_none()
            && let Some(who) = &self.who
        {
            identity.username = who.clone();
        }
        identity
    }

    /// The agent's policy cannot be used: NoPolicy or PolicyInvalid, with the reason.
    pub(crate) fn unusable_policy(agent: &str, problem: &policies::PolicyProblem) -> Self {
        let code = match problem {
            policies::PolicyProblem::Missing(_) => RefusalCode::NoPolicy,
            policies::PolicyProblem::Invalid(_) => RefusalCode::PolicyInvalid,
        };
        Self::new(
            StatusCode::CONFLICT,
            code,
            format!("agent {agent} has no usable policy: {problem}"),
        )
    }

    /// The credential's agent has no AgentIdentity.
    pub(crate) fn unknown_agent(agent: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            RefusalCode::UnknownAgent,
            format!("agent {agent} has no AgentIdentity"),
        )
    }

    pub(crate) fn response(&self) -> Response {
        (
            self.status,
            axum::Json(json!({"error": {"code": self.code.as_str(), "message": self.message}})),
        )
            .into_response()
    }
}

/// The decision API's and the LLM proxy's answer; the MCP proxy answers in JSON-RPC instead
/// (`mcp::rpc_refusal`).
impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        self.response()
    }
}

pub(crate) fn audit_unavailable(e: impl std::fmt::Display) -> Refusal {
    tracing::error!(error = %e, "audit trail refused a record; the call is refused");
    Refusal::new(
        StatusCode::SERVICE_UNAVAILABLE,
        RefusalCode::AuditUnavailable,
        "the audit trail cannot record this call, so it must not proceed; retry later",
    )
}

/// The trail could not record the refusal of a request: refused as unrecordable, naming what
/// was wrong with it too, so that the caller loses nothing by the outage.
pub(crate) fn audit_unavailable_refusing(e: impl std::fmt::Display, refused: &str) -> Refusal {
    tracing::error!(error = %e, refused, "audit trail refused a record; the request is refused");
    Refusal::new(
        StatusCode::SERVICE_UNAVAILABLE,
        RefusalCode::AuditUnavailable,
        format!(
            "the audit trail cannot record this request, so it must not proceed; retry later. \
             It is refused in any case: {refused}"
        ),
    )
}
