//! A policy's standing, read from the trail: each allowed tool's track record (graduation) and
//! the allowed tools its agent did not call (permission drift). The gateway writes it to the
//! AgentPolicy's `status.tools` and `status.drift`; `kubectl tollgate audit drift` prints it.
//!
//! Two readers give the same answer: [`of_store`] asks a store's aggregate queries (the gateway,
//! and the CLI reading a store directly), [`of_records`] folds records already read (the CLI
//! reading through the gateway's read API, which answers records and not aggregates).

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use tollgate_crds::policy::{DriftStatus, ToolStatus};
use tollgate_engine::CompiledPolicy;
use tollgate_engine::graduation::{DEFAULT_WINDOW, TrackRecord};

use crate::record::outcome_kind;
use crate::store::{Store, StoreError};
use crate::{Event, Record};

/// What the trail says of a policy's agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Standing {
    /// The agents the policy governs that appear in the windows (`namespace/name`): one in a
    /// cluster; a policy file without a namespace governs its identity's name in any namespace.
    pub agents: Vec<String>,
    /// `status.tools`: every allowed tool, its track record and eligibility.
    pub tools: Vec<ToolStatus>,
    /// `status.drift`.
    pub drift: DriftStatus,
}

/// The windows of a standing at `now`: since when calls count as used (drift) and since when
/// outcomes count toward track records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// Start of the drift window, microseconds since the epoch.
    pub drift_since_us: i64,
    /// Start of the track-record window.
    pub record_since_us: i64,
    /// The end of both (exclusive): `now`.
    pub until_us: i64,
}

impl Windows {
    /// The windows for `policy` at `now`, drift over `drift` (such as 720h).
    pub fn new(policy: &CompiledPolicy, drift: std::time::Duration, now: Timestamp) -> Self {
        let before = |d: std::time::Duration| {
            now.as_microsecond()
                .saturating_sub(i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        };
        Windows {
            drift_since_us: before(drift),
            record_since_us: before(policy.track_record_window()),
            until_us: now.as_microsecond(),
        }
    }

    /// The earliest record either window reads.
    pub fn since_us(&self) -> i64 {
        self.drift_since_us.min(self.record_since_us)
    }
}

/// The standing of `policy` at `now` from `store`, drift over `drift_window` (a duration such as
/// `720h`; [`DEFAULT_WINDOW`] if it does not parse).
pub async fn of_store<S: Store>(
    store: &S,
    policy: &CompiledPolicy,
    drift_window: &str,
    now: Timestamp,
) -> Result<Standing, StoreError> {
    let windows = Windows::new(policy, parse_window(drift_window), now);
    let mut tally = Tally::default();
    for usage in store
        .tool_use(windows.since_us(), windows.until_us)
        .await?
        .into_iter()
        .filter(|u| policy.governs(&u.agent))
    {
        tally.agents.insert(usage.agent.clone());
        tally.called(&usage.tool, usage.last_us, &windows);
    }
    for agent in tally.agents.clone() {
        for row in store.outcomes(&agent, windows.record_since_us).await? {
            if let Some(outcome) = outcome_kind(&row.outcome) {
                tally
                    .records
                    .entry(row.tool)
                    .or_default()
                    .add(outcome, row.count);
            }
        }
    }
    Ok(tally.standing(policy, drift_window, now))
}

/// The same standing from `records` (any order; records outside the windows or of other agents
/// are skipped).
pub fn of_records(
    records: &[Record],
    policy: &CompiledPolicy,
    drift_window: &str,
    now: Timestamp,
) -> Standing {
    let windows = Windows::new(policy, parse_window(drift_window), now);
    let mut tally = Tally::default();
    let governed = |index: &'_ crate::record::Index| match (&index.agent, &index.tool) {
        (Some(agent), Some(tool)) if policy.governs(agent) && index.time_us < windows.until_us => {
            Some((agent.clone(), tool.clone()))
        }
        _ => None,
    };
    for index in records.iter().map(|r| &r.index) {
        if let Some((agent, tool)) = governed(index)
            && index.event == Event::Decide.as_str()
            && index.time_us >= windows.since_us()
        {
            tally.agents.insert(agent);
            tally.called(&tool, index.time_us, &windows);
        }
    }
    // As the store's queries do: outcomes of the agents that called in the windows.
    for index in records.iter().map(|r| &r.index) {
        if let Some((agent, tool)) = governed(index)
            && tally.agents.contains(&agent)
            && index.time_us >= windows.record_since_us
            && let Some(outcome) = index.outcome.as_deref().and_then(outcome_kind)
        {
            tally.records.entry(tool).or_default().add(outcome, 1);
        }
    }
    tally.standing(policy, drift_window, now)
}

fn parse_window(window: &str) -> std::time::Duration {
    tollgate_engine::duration::parse(window).unwrap_or(DEFAULT_WINDOW)
}

#[derive(Default)]
struct Tally {
    agents: BTreeSet<String>,
    /// The last call of each tool in either window.
    last_used: BTreeMap<String, Timestamp>,
    /// The tools called in the drift window.
    used: BTreeMap<String, Timestamp>,
    records: BTreeMap<String, TrackRecord>,
}

impl Tally {
    fn called(&mut self, tool: &str, at_us: i64, windows: &Windows) {
        let Ok(at) = Timestamp::from_microsecond(at_us) else {
            return;
        };
        let last = self.last_used.entry(tool.to_owned()).or_insert(at);
        *last = (*last).max(at);
        if at_us >= windows.drift_since_us {
            let used = self.used.entry(tool.to_owned()).or_insert(at);
            *used = (*used).max(at);
        }
    }

    fn standing(self, policy: &CompiledPolicy, drift_window: &str, now: Timestamp) -> Standing {
        Standing {
            agents: self.agents.into_iter().collect(),
            tools: policy.tool_statuses(&self.records, &self.last_used),
            drift: policy.drift(drift_window, &self.used, now),
        }
    }
}
