//! The audit record: what happened, to whom, under which rule; and its seal in the hash chain.
//!
//! An [`Entry`] is what a writer hands in. The chain's writer numbers it, links it to its
//! predecessor and seals it into a [`Record`]. The seal is
//!
//! ```text
//! hash = sha256("tollgate-audit/v1" LF chain LF seq LF prev LF body)
//! ```
//!
//! where `body` is the entry's JSON exactly as stored. The seal binds the body, its position
//! (chain and sequence) and its predecessor, so verification needs no JSON parsing: changing,
//! deleting, inserting or reordering a record breaks either a seal or a link.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tollgate_engine::graduation::Outcome;
use tollgate_engine::llm::ModelUsage;
use tollgate_engine::{Ceiling, Decision, Usage, canonical};

use crate::redact::Redactor;

/// The version of the record body written by this build. Readers refuse bodies of a newer one.
pub const SCHEMA: u32 = 1;

/// The `prev` of a chain's first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const DOMAIN: &[u8] = b"tollgate-audit/v1\n";

/// What kind of event a record describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Event {
    /// A tool call was evaluated; `decision` says how.
    Decide,
    /// The outcome of a call: result, tokens, cost, error.
    Report,
    /// An approval was decided (approved, denied by an approver, expired) and the waiting call
    /// released or refused.
    Approval,
    /// A ceiling was breached and the run halted.
    Halt,
    /// A kill switch was engaged or disengaged.
    Kill,
    /// Input was refused before it could be evaluated (malformed JSON-RPC, oversized body,
    /// unknown identity). `error` says why.
    Rejected,
    /// The writer recorded that the records up to `checkpoint.throughSeq` were pruned by
    /// retention; it anchors what remains.
    Checkpoint,
    /// Admission judged an agent's own Kubernetes API write, or the creation of a pod that runs
    /// as an agent: `arguments` names the write (operation, resource, namespace, name), `decision`
    /// says allowed or refused and by which rule. The identity is whoever made the request (for a
    /// pod, usually a controller).
    Admission,
    /// A model call through the gateway's LLM proxy: `model` says which and what it used,
    /// `usage` what was charged to the run, `decision` whether it was let through.
    Model,
    /// An MCP resource read or prompt got through the gateway: `tool` is the method
    /// (`resources/read`, `prompts/get`), `arguments` what it named, `decision` whether it was
    /// let through and by which rule, `result` (redacted) what came back.
    Resource,
    /// An MCP server asked the agent's client something (`tool` is the method:
    /// `elicitation/create`, `sampling/createMessage`, `roots/list`) in the stream of a call,
    /// and the gateway relayed it: `arguments` (redacted) is what it asked.
    ServerRequest,
    /// The client's answer to a [`Event::ServerRequest`], passed back to the server: `result`
    /// (redacted) is what the person or model answered (an elicitation's `action` and content
    /// is the person's confirmation), `error` the client's refusal.
    ClientAnswer,
}

impl Event {
    /// The name stored in the index column.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Decide => "decide",
            Event::Report => "report",
            Event::Approval => "approval",
            Event::Halt => "halt",
            Event::Kill => "kill",
            Event::Rejected => "rejected",
            Event::Checkpoint => "checkpoint",
            Event::Admission => "admission",
            Event::Model => "model",
            Event::Resource => "resource",
            Event::ServerRequest => "serverRequest",
            Event::ClientAnswer => "clientAnswer",
        }
    }
}

/// Who acted: the authenticated identity, never what a request claimed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Identity {
    /// The authenticated username (`system:serviceaccount:NS:SA`, or the API key's identity in
    /// standalone mode).
    pub username: String,
    /// The pod named in the token's claims, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The token's id (its `jti` claim or the digest of the token), never the token itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
}

/// The policy a decision was made under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRef {
    /// `namespace/name` of the AgentPolicy.
    pub name: String,
    /// Its content hash (`sha256:…`).
    pub hash: String,
    /// Its metadata.generation, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

impl PolicyRef {
    /// The reference to a compiled policy: its name, hash and generation.
    pub fn of(policy: &tollgate_engine::CompiledPolicy) -> Self {
        Self {
            name: policy.id().to_owned(),
            hash: policy.hash().to_owned(),
            generation: policy.generation(),
        }
    }
}

/// The approval behind a released or refused call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApprovalRef {
    /// `namespace/name` of the ApprovalRequest.
    pub name: String,
    /// Its phase when recorded.
    pub phase: ApprovalPhase,
    /// The authenticated people who decided, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvers: Vec<String>,
}

/// An approval's phase as the trail records it. The names are the trail's contract (old records
/// hold them, and the hash chain covers them): renaming a variant is a format change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApprovalPhase {
    /// The call waits: its ApprovalRequest was created.
    Pending,
    /// Enough approvers approved; the call was released.
    Approved,
    /// An approver denied it, or a kill switch did.
    Denied,
    /// Nobody decided in time.
    Expired,
    /// The waiting call went away before a decision.
    Cancelled,
    /// A redemption the gateway refused before reading any request (not this run's, tool's or
    /// arguments', or already redeemed).
    Refused,
    /// A person's verdict on the request, as given (standalone approvals): `identity` is who,
    /// `arguments` holds `verdict` and `comment`, `approvers` names the person. Not the call's
    /// outcome, which the gateway records apart when the call is released or refused.
    Decided,
}

impl ApprovalPhase {
    /// The name as recorded, such as `Approved`.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalPhase::Pending => "Pending",
            ApprovalPhase::Approved => "Approved",
            ApprovalPhase::Denied => "Denied",
            ApprovalPhase::Expired => "Expired",
            ApprovalPhase::Cancelled => "Cancelled",
            ApprovalPhase::Refused => "Refused",
            ApprovalPhase::Decided => "Decided",
        }
    }
}

impl std::fmt::Display for ApprovalPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The run's counters after the event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Counters {
    /// Steps (evaluated calls) so far.
    pub steps: u64,
    /// Tokens reported so far.
    pub tokens: u64,
    /// Cost reported so far, in US dollars, as a decimal string.
    pub cost_usd: String,
}

/// A model call through the gateway's LLM proxy: which provider and model, what it used and
/// cost as the gateway metered it, and how it ended. The entry's `argumentsDigest` and
/// `resultDigest` are those of the request body and of the answer the agent received (for a
/// stream, the text of its deltas); `arguments` and `result` hold them, redacted, only when the
/// upstream's capture is Full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelCallRecord {
    /// `spec.upstreams[].name`.
    pub upstream: String,
    /// The endpoint, such as `chat/completions` or `v1/messages`.
    pub endpoint: String,
    /// The model the request named.
    pub model: String,
    /// Whether the answer was streamed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    /// The output cap the gateway sent (the request's, lowered to what the run can pay for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_cap: Option<u64>,
    /// Tokens used.
    pub tokens: ModelUsage,
    /// How the tokens are known.
    pub metered: Metered,
    /// The cost charged, in US dollars, from the gateway's price table (empty without a price).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cost_usd: String,
    /// The provider's HTTP status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why the model stopped, as the provider said (`stop`, `length`, `end_turn`, `tool_calls`…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// Why the gateway ended the answer before the provider did, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<Cut>,
    /// Time from the request to the first output, in microseconds (streams).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_token_us: Option<u64>,
    /// Time from the request to the end of the answer, in microseconds.
    pub duration_us: u64,
}

/// How a model call's tokens are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Metered {
    /// The provider reported them, and the gateway charged that.
    Reported,
    /// The provider reported nothing (a stream cut or broken off, an answer without usage): the
    /// gateway charged its own bound, never zero.
    Estimated,
    /// Nothing was sent to the provider.
    NotSent,
}

/// Why the gateway ended a model's answer early.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cut {
    /// The run's token or cost ceiling was reached while the answer streamed.
    Ceiling,
    /// The agent's or the global kill switch was engaged.
    KillSwitch,
    /// The agent went away before the answer ended.
    ClientGone,
    /// The provider's answer broke off or could not be read.
    Upstream,
}

/// The writer's note that old records were pruned: the last pruned record and its hash, which
/// the first remaining record must link to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Checkpoint {
    /// The last pruned sequence number.
    pub through_seq: u64,
    /// The hash of that record.
    pub through_hash: String,
    /// The retention cut-off that selected the records.
    pub pruned_before: Timestamp,
}

/// What a writer hands in; the chain's writer seals it into a [`Record`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Entry {
    /// When the event happened.
    pub time: Timestamp,
    /// What kind of event.
    pub event: Event,
    /// Who acted.
    pub identity: Identity,
    /// `namespace/name` of the AgentIdentity acted for, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// The step in the run (1-based), for decisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// The tool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// The call's arguments, redacted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Value>,
    /// `sha256:…` of the canonical text of the unredacted arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments_digest: Option<String>,
    /// The call's result, redacted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// `sha256:…` of the canonical text of the unredacted result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_digest: Option<String>,
    /// JSON pointers of the values redaction replaced (`/arguments/…`, `/result/…`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redacted: Vec<String>,
    /// The engine's decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// The policy in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyRef>,
    /// The approval involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalRef>,
    /// The run's counters after the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<Counters>,
    /// Usage reported after the call, for reports; for model calls, what was charged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// For reports: `usage` is the agent's claim, recorded and not charged, because the gateway
    /// meters this agent's model calls itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub usage_claimed: bool,
    /// For model calls: what was called, used and charged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelCallRecord>,
    /// The ceiling breached, for halts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<Ceiling>,
    /// What went wrong: the reason input was rejected, or the upstream's error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For reports: the released call did not run as far as Tollgate knows (the upstream could
    /// not be reached, refused it, or answered no result), so it is no clean completion.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_run: bool,
    /// Time spent deciding or calling, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// The OpenTelemetry trace the request ran in (32 hex digits), when the gateway exports
    /// traces: from a trace to the record and back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// For checkpoints: what was pruned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
}

impl Entry {
    /// An entry with only the required fields set.
    pub fn new(time: Timestamp, event: Event, identity: Identity) -> Self {
        Self {
            time,
            event,
            identity,
            agent: None,
            run: None,
            step: None,
            tool: None,
            arguments: None,
            arguments_digest: None,
            result: None,
            result_digest: None,
            redacted: Vec::new(),
            decision: None,
            policy: None,
            approval: None,
            counters: None,
            usage: None,
            usage_claimed: false,
            model: None,
            ceiling: None,
            error: None,
            not_run: false,
            latency_us: None,
            trace_id: None,
            checkpoint: None,
        }
    }

    /// Records the call's arguments: redacted by `redactor`, with the digest of the whole.
    pub fn set_arguments(&mut self, redactor: &Redactor, arguments: &Value) {
        self.arguments_digest = Some(canonical::digest(arguments));
        let mut redacted = arguments.clone();
        redactor.redact(&mut redacted, "/arguments", &mut self.redacted);
        self.arguments = Some(redacted);
    }

    /// Records the call's result: redacted by `redactor`, with the digest of the whole.
    pub fn set_result(&mut self, redactor: &Redactor, result: &Value) {
        self.result_digest = Some(canonical::digest(result));
        let mut redacted = result.clone();
        redactor.redact(&mut redacted, "/result", &mut self.redacted);
        self.result = Some(redacted);
    }

    /// The outcome stored in the index column: the decision's kind, with the deny code.
    pub fn outcome(&self) -> Option<String> {
        if let Some(approval) = &self.approval
            && self.event == Event::Approval
        {
            return Some(approval.phase.as_str().to_ascii_lowercase());
        }
        if self.event == Event::Report && self.not_run {
            return Some(NOT_RUN.to_owned());
        }
        self.decision.as_ref().map(outcome_of)
    }
}

/// The outcome of a report whose released call did not run.
pub const NOT_RUN: &str = "notRun";

/// `allow`, `deny:<Code>`, `requireApproval` or `halt`.
pub fn outcome_of(decision: &Decision) -> String {
    match decision {
        Decision::Allow { .. } => "allow".to_owned(),
        Decision::Deny { code, .. } => format!("deny:{}", code.as_str()),
        Decision::RequireApproval { .. } => "requireApproval".to_owned(),
        Decision::Halt { .. } => "halt".to_owned(),
    }
}

/// What graduation reads in an outcome column: the inverse of [`Entry::outcome`] for the
/// outcomes of tool calls. None for anything else (an approval still pending is
/// [`Outcome::Pending`], as a decision that asks for approval is).
pub fn outcome_kind(outcome: &str) -> Option<Outcome> {
    Some(match outcome {
        "allow" => Outcome::Allowed,
        "requireApproval" | "pending" => Outcome::Pending,
        "halt" => Outcome::Halted,
        "approved" => Outcome::Approved,
        "denied" => Outcome::DeniedByApprover,
        "expired" => Outcome::Expired,
        NOT_RUN => Outcome::NotRun,
        _ => Outcome::Denied(
            serde_json::from_value(Value::String(outcome.strip_prefix("deny:")?.to_owned()))
                .ok()?,
        ),
    })
}

#[derive(Deserialize)]
struct BodyIn {
    schema: u32,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

/// An entry's stored body and index, ready to be sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// `{"schema":N,…the entry's fields…}`.
    pub body: String,
    /// The index columns.
    pub index: Index,
}

impl Prepared {
    /// Serialises `entry` with the schema version as its first field.
    pub fn new(entry: &Entry) -> Self {
        let json = serde_json::to_string(entry).expect("an entry always serialises");
        // The entry always has fields (time, event, identity), so its object is never empty.
        let body = format!("{{\"schema\":{SCHEMA},{}", &json[1..]);
        Self {
            body,
            index: Index::of(entry),
        }
    }
}

/// A sealed record, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The chain (one per writer).
    pub chain: String,
    /// Position in the chain, from 1.
    pub seq: u64,
    /// The predecessor's hash, [`GENESIS`] for the first record.
    pub prev: String,
    /// This record's seal, lowercase hex.
    pub hash: String,
    /// The entry's JSON, exactly as sealed.
    pub body: String,
    /// Index columns derived from the body, for queries. Verification does not trust them.
    pub index: Index,
}

/// The columns stores index. Derived from the body when the record is sealed; `verify --deep`
/// derives them again and compares.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Index {
    /// Event time, microseconds since the Unix epoch.
    pub time_us: i64,
    /// [`Event::as_str`].
    pub event: String,
    /// The agent.
    pub agent: Option<String>,
    /// The run.
    pub run: Option<String>,
    /// The tool.
    pub tool: Option<String>,
    /// [`Entry::outcome`].
    pub outcome: Option<String>,
}

impl Index {
    /// The index of an entry.
    pub fn of(entry: &Entry) -> Self {
        Self {
            time_us: entry.time.as_microsecond(),
            event: entry.event.as_str().to_owned(),
            agent: entry.agent.clone(),
            run: entry.run.clone(),
            tool: entry.tool.clone(),
            outcome: entry.outcome(),
        }
    }
}

/// A body that cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Not JSON, or not an entry.
    #[error("record body is not a valid entry: {0}")]
    Invalid(#[from] serde_json::Error),
    /// Written by a newer Tollgate.
    #[error("record body has schema {found}; this build reads schema {SCHEMA} and older")]
    Schema {
        /// The body's schema.
        found: u32,
    },
}

impl Record {
    /// Seals `entry` as record `seq` of `chain`, after a record whose hash is `prev`.
    pub fn seal(chain: &str, seq: u64, prev: &str, entry: &Entry) -> Self {
        Self::seal_prepared(chain, seq, prev, Prepared::new(entry))
    }

    /// Seals an entry prepared earlier (by the appending task, so that the chain's writer only
    /// hashes).
    pub fn seal_prepared(chain: &str, seq: u64, prev: &str, prepared: Prepared) -> Self {
        let hash = seal(chain, seq, prev, &prepared.body);
        Self {
            chain: chain.to_owned(),
            seq,
            prev: prev.to_owned(),
            hash,
            body: prepared.body,
            index: prepared.index,
        }
    }

    /// The entry in the body.
    pub fn entry(&self) -> Result<Entry, BodyError> {
        parse_body(&self.body)
    }
}

/// Reads a stored body back into an entry.
pub fn parse_body(body: &str) -> Result<Entry, BodyError> {
    let BodyIn { schema, rest } = serde_json::from_str(body)?;
    if schema > SCHEMA {
        return Err(BodyError::Schema { found: schema });
    }
    Ok(serde_json::from_value(Value::Object(rest))?)
}

/// The seal of a record, lowercase hex.
pub fn seal(chain: &str, seq: u64, prev: &str, body: &str) -> String {
    hex::encode(seal_bytes(chain, seq, prev, body))
}

/// The seal of a record, raw.
pub fn seal_bytes(chain: &str, seq: u64, prev: &str, body: &str) -> [u8; 32] {
    seal_raw(chain, seq, prev.as_bytes(), body.as_bytes())
}

/// The seal over stored bytes as they are, valid UTF-8 or not (a body an attacker made
/// unreadable as text must still fail as altered, not stop verification).
pub fn seal_raw(chain: &str, seq: u64, prev: &[u8], body: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(DOMAIN);
    hasher.update(chain.as_bytes());
    hasher.update(b"\n");
    let mut digits = [0u8; 20];
    hasher.update(decimal(seq, &mut digits));
    hasher.update(b"\n");
    hasher.update(prev);
    hasher.update(b"\n");
    hasher.update(body);
    hasher.finalize().into()
}

/// `n` in decimal, written into `buf` without allocating.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The phase names are in every approval record ever written, and under the hash chain:
    /// they are spelled out here, not derived from the code, so a rename fails this test.
    #[test]
    fn approval_phases_keep_the_names_the_trail_holds() {
        use super::ApprovalPhase::*;
        for (phase, name) in [
            (Pending, "Pending"),
            (Approved, "Approved"),
            (Denied, "Denied"),
            (Expired, "Expired"),
            (Cancelled, "Cancelled"),
            (Refused, "Refused"),
        ] {
            assert_eq!(
                serde_json::to_value(phase).unwrap(),
                serde_json::json!(name)
            );
            assert_eq!(phase.as_str(), name);
            let read: super::ApprovalRef = serde_json::from_value(
                serde_json::json!({"name": "shop/refund-1", "phase": name, "approvers": ["alice"]}),
            )
            .unwrap();
            assert_eq!(read.phase, phase);
        }
        let unknown = serde_json::from_value::<super::ApprovalRef>(
            serde_json::json!({"name": "shop/refund-1", "phase": "approved"}),
        );
        assert!(unknown.is_err(), "phases are case-sensitive names");
    }

    #[test]
    fn every_outcome_of_a_call_reads_back_for_graduation() {
        use tollgate_crds::approval::Phase;
        use tollgate_engine::DenyCode;
        let codes = [
            DenyCode::KillSwitch,
            DenyCode::NoPolicy,
            DenyCode::PolicyInvalid,
            DenyCode::ToolBlocked,
            DenyCode::ToolNotAllowed,
            DenyCode::MalformedArguments,
            DenyCode::UnknownArgument,
            DenyCode::MissingArgument,
            DenyCode::ArgumentConstraint,
            DenyCode::CallLimit,
            DenyCode::ItemLimit,
            DenyCode::ConditionFailed,
            DenyCode::ConditionError,
            DenyCode::ApprovalDenied,
            DenyCode::ApprovalExpired,
        ];
        for code in codes {
            assert_eq!(
                outcome_kind(&format!("deny:{}", code.as_str())),
                Some(Outcome::Denied(code))
            );
        }
        // Approval records store the phase as the gateway writes it, lower-cased.
        let phase = |p: Phase| outcome_kind(&format!("{p:?}").to_ascii_lowercase());
        assert_eq!(phase(Phase::Pending), Some(Outcome::Pending));
        assert_eq!(phase(Phase::Approved), Some(Outcome::Approved));
        assert_eq!(phase(Phase::Denied), Some(Outcome::DeniedByApprover));
        assert_eq!(phase(Phase::Expired), Some(Outcome::Expired));
        assert_eq!(phase(Phase::Cancelled), None);
        assert_eq!(outcome_kind("allow"), Some(Outcome::Allowed));
        assert_eq!(outcome_kind("requireApproval"), Some(Outcome::Pending));
        assert_eq!(outcome_kind("halt"), Some(Outcome::Halted));
        for unknown in ["deny:", "deny:Nope", "Allow", "deny:killswitch", ""] {
            assert_eq!(outcome_kind(unknown), None, "{unknown:?}");
        }
    }

    #[test]
    fn sequence_numbers_are_sealed_in_plain_decimal() {
        let mut buf = [0u8; 20];
        for n in [0, 7, 10, 99, 1_000_001, u64::MAX] {
            assert_eq!(decimal(n, &mut buf), n.to_string().as_bytes());
        }
        let body = r#"{"schema":1}"#;
        let mut hasher = Sha256::new();
        hasher.update(format!("tollgate-audit/v1\ngw-0\n12345\n{GENESIS}\n{body}"));
        let expected: [u8; 32] = hasher.finalize().into();
        assert_eq!(seal_bytes("gw-0", 12345, GENESIS, body), expected);
    }
}
