//! Graduated autonomy: whether a tool's track record earns the next autonomy level. Eligibility
//! is reported, never applied: a person changes the policy.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tollgate_crds::policy::{Autonomy, DriftStatus, ToolStatus};

use crate::DenyCode;
use crate::compile::CompiledPolicy;

/// One tool's track record in the graduation window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrackRecord {
    /// Calls completed without incident.
    pub clean_completions: u64,
    /// Incidents ([`Outcome::counts`]).
    pub incidents: u64,
    /// Released calls that did not run (the upstream failed them): each takes one clean
    /// completion back, whatever order the counts are added in ([`TrackRecord::clean`]).
    pub not_run: u64,
}

/// The window drift is evaluated over, and track records when a policy sets no graduation: 30
/// days.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(720 * 3600);

/// What became of one recorded call of a tool, as graduation counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The policy let the call through.
    Allowed,
    /// The call waited for people (its approval's own outcome says how that ended).
    Pending,
    /// People approved the call and it was released.
    Approved,
    /// An approver denied the call.
    DeniedByApprover,
    /// Nobody decided before the approval expired.
    Expired,
    /// A ceiling was breached at this call and the run halted.
    Halted,
    /// A released call that did not run (its upstream could not be reached or refused it): it
    /// takes back the clean completion its release counted.
    NotRun,
    /// The policy denied the call.
    Denied(DenyCode),
}

impl Outcome {
    /// Whether the outcome counts toward the tool's track record, and how: `Some(true)` for a
    /// clean completion, `Some(false)` for an incident, `None` for neither.
    ///
    /// Clean: calls that went through, by the policy or by people. Incidents: an approver's
    /// denial, a halt, and a call the tool's own rules refused (arguments outside their
    /// constraints, a per-run limit, a `when` condition): the agent tried to go past the bounds
    /// the tool has now, so it has not earned wider ones. Neither: calls still waiting, expired
    /// approvals (nobody looked), kill switches, a missing or broken policy, and tools the policy
    /// does not allow (they have no autonomy to graduate). A reported error is not an incident by
    /// itself: whether it did harm is for people to judge.
    pub fn counts(self) -> Option<bool> {
        match self {
            Outcome::Allowed | Outcome::Approved => Some(true),
            Outcome::DeniedByApprover | Outcome::Halted => Some(false),
            Outcome::Denied(code) => match code {
                DenyCode::MalformedArguments
                | DenyCode::UnknownArgument
                | DenyCode::MissingArgument
                | DenyCode::ArgumentConstraint
                | DenyCode::CallLimit
                | DenyCode::ItemLimit
                | DenyCode::ConditionFailed => Some(false),
                // The approval's own outcome is the one counted.
                DenyCode::ApprovalDenied
                | DenyCode::ApprovalExpired
                | DenyCode::KillSwitch
                | DenyCode::NoPolicy
                | DenyCode::PolicyInvalid
                | DenyCode::ToolBlocked
                | DenyCode::ToolNotAllowed
                | DenyCode::ConditionError
                // Not a tool call: admission's records of Kubernetes writes, model calls.
                | DenyCode::WriteRefused
                | DenyCode::ModelNotAllowed
                | DenyCode::InsufficientBudget
                | DenyCode::ContentNotAllowed => None,
            },
            Outcome::Pending | Outcome::Expired | Outcome::NotRun => None,
        }
    }
}

impl TrackRecord {
    /// Adds `count` calls with `outcome`.
    pub fn add(&mut self, outcome: Outcome, count: u64) {
        if outcome == Outcome::NotRun {
            self.not_run = self.not_run.saturating_add(count);
        }
        match outcome.counts() {
            Some(true) => self.clean_completions = self.clean_completions.saturating_add(count),
            Some(false) => self.incidents = self.incidents.saturating_add(count),
            None => {}
        }
    }

    /// Clean completions that ran: calls let through, less those whose upstream failed them.
    pub fn clean(&self) -> u64 {
        self.clean_completions.saturating_sub(self.not_run)
    }

    /// Track records per tool from `(tool, outcome, count)` rows.
    pub fn per_tool<'a>(
        rows: impl IntoIterator<Item = (&'a str, Outcome, u64)>,
    ) -> BTreeMap<String, TrackRecord> {
        let mut records: BTreeMap<String, TrackRecord> = BTreeMap::new();
        for (tool, outcome, count) in rows {
            records
                .entry(tool.to_owned())
                .or_default()
                .add(outcome, count);
        }
        records
    }
}

/// The level after `current`, if there is one.
pub fn next_level(current: Autonomy) -> Option<Autonomy> {
    match current {
        Autonomy::Gated => Some(Autonomy::ExceptionBased),
        Autonomy::ExceptionBased => Some(Autonomy::AuditBased),
        Autonomy::AuditBased => None,
    }
}

impl CompiledPolicy {
    /// The autonomy a tool's record makes it eligible for, if more than it has. None when the
    /// policy sets no graduation, the tool has no approval block, is irreversible (it always
    /// waits for people), or the record falls short.
    pub fn eligible_for(&self, tool: &str, record: TrackRecord) -> Option<Autonomy> {
        let rule = self.graduation.as_ref()?;
        let tool = self.tools.get(tool)?;
        if tool.irreversible {
            return None;
        }
        let current = tool.autonomy?;
        (record.clean() >= rule.clean_completions && record.incidents <= rule.max_incidents)
            .then(|| next_level(current))
            .flatten()
    }

    /// The graduation window, if the policy sets one.
    pub fn graduation_window(&self) -> Option<std::time::Duration> {
        self.graduation.as_ref().map(|g| g.window)
    }

    /// The window track records are counted over: the graduation window, or
    /// [`DEFAULT_WINDOW`] when the policy sets none.
    pub fn track_record_window(&self) -> Duration {
        self.graduation_window().unwrap_or(DEFAULT_WINDOW)
    }

    /// `status.tools`: every allowed tool with the autonomy in force, its track record in
    /// [`Self::track_record_window`] (`records`), when it was last called (`last_used`) and the
    /// autonomy the record makes it eligible for. Sorted by name.
    pub fn tool_statuses(
        &self,
        records: &BTreeMap<String, TrackRecord>,
        last_used: &BTreeMap<String, Timestamp>,
    ) -> Vec<ToolStatus> {
        self.allowed_tools()
            .into_iter()
            .map(|name| {
                let record = records.get(name).copied().unwrap_or_default();
                ToolStatus {
                    name: name.to_owned(),
                    autonomy: self.tools.get(name).and_then(|t| t.autonomy),
                    clean_completions: saturating_i64(record.clean()),
                    incidents: saturating_i64(record.incidents),
                    last_used: last_used.get(name).map(|t| seconds(*t)),
                    eligible_for: self.eligible_for(name, record),
                }
            })
            .collect()
    }

    /// `status.drift`: the allowed tools the agent did not call in `window` (a duration such as
    /// `720h`) before `now`, given the tools it did call (`used`, whatever the decision).
    pub fn drift(
        &self,
        window: &str,
        used: &BTreeMap<String, Timestamp>,
        now: Timestamp,
    ) -> DriftStatus {
        DriftStatus {
            window: window.to_owned(),
            evaluated_at: Some(seconds(now)),
            unused_tools: self
                .allowed_tools()
                .into_iter()
                .filter(|tool| !used.contains_key(*tool))
                .map(str::to_owned)
                .collect(),
        }
    }
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A status time: Kubernetes keeps whole seconds, so a status written with more would never
/// compare equal to itself read back.
fn seconds(t: Timestamp) -> Time {
    Time(Timestamp::from_second(t.as_second()).unwrap_or(t))
}
