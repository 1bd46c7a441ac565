//! Graduated autonomy: whether a tool's track record earns the next autonomy level. Eligibility
//! is reported, never applied: a person changes the policy.

use tollgate_crds::policy::Autonomy;

use crate::compile::CompiledPolicy;

/// One tool's track record in the graduation window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrackRecord {
    /// Calls completed without incident.
    pub clean_completions: u64,
    /// Incidents: denied by an approver, reported errors that caused harm, halts.
    pub incidents: u64,
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
        (record.clean_completions >= rule.clean_completions
            && record.incidents <= rule.max_incidents)
            .then(|| next_level(current))
            .flatten()
    }

    /// The graduation window, if the policy sets one.
    pub fn graduation_window(&self) -> Option<std::time::Duration> {
        self.graduation.as_ref().map(|g| g.window)
    }
}
