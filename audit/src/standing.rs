//! A policy's standing, read from the trail: each allowed tool's track record (graduation) and
//! the allowed tools its agent did not call (permission drift). The gateway writes it to the
//! AgentPolicy's `status.tools` and `status.drift`; `kubectl tollgate audit drift` prints it.
//!
//! Everything is folded from counted rows ([`of_tallies`]: records per agent, tool, event and
//! outcome, each marked with the windows it counts in). [`of_store`] gets them from a store's
//! [`Store::tallies`] query, one per window (the CLI reading a store directly); [`of_records`]
//! counts records already read (the CLI reading through the gateway's read API, which answers
//! records and not aggregates); both give the same answer. The gateway keeps settled hours of
//! counts and reads only what is new (`tollgate_gateway::standing`).

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use tollgate_crds::policy::{DriftStatus, ToolStatus};
use tollgate_engine::CompiledPolicy;
use tollgate_engine::graduation::{DEFAULT_WINDOW, TrackRecord};

use crate::record::outcome_kind;
use crate::store::{Store, StoreError, ToolTally};
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

/// Which windows a row counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    /// The drift window: its decide records make a tool used.
    pub drift: bool,
    /// The track-record window: its outcomes count toward graduation.
    pub record: bool,
}

/// The standing of `policy` at `now` from `store`, drift over `drift_window` (a duration such as
/// `720h`; [`DEFAULT_WINDOW`] if it does not parse): one [`Store::tallies`] query per window, or
/// one for both when they start together (the default: both 30 days).
pub async fn of_store<S: Store>(
    store: &S,
    policy: &CompiledPolicy,
    drift_window: &str,
    now: Timestamp,
) -> Result<Standing, StoreError> {
    let windows = Windows::new(policy, parse_window(drift_window), now);
    let both = Span {
        drift: true,
        record: true,
    };
    if windows.drift_since_us == windows.record_since_us {
        let rows = store.tallies(windows.since_us(), windows.until_us).await?;
        return Ok(of_tallies(
            rows.iter().map(|t| (t, both)),
            policy,
            drift_window,
            now,
        ));
    }
    let record = store
        .tallies(windows.record_since_us, windows.until_us)
        .await?;
    let drift = store
        .tallies(windows.drift_since_us, windows.until_us)
        .await?;
    let only = |drift| Span {
        drift,
        record: !drift,
    };
    let rows = record
        .iter()
        .map(|t| (t, only(false)))
        .chain(drift.iter().map(|t| (t, only(true))));
    Ok(of_tallies(rows, policy, drift_window, now))
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
    let rows: Vec<(ToolTally, Span)> = records
        .iter()
        .map(|r| &r.index)
        .filter(|i| i.time_us < windows.until_us)
        .filter_map(|i| {
            Some((
                ToolTally {
                    agent: i.agent.clone()?,
                    tool: i.tool.clone()?,
                    event: i.event.clone(),
                    outcome: i.outcome.clone(),
                    count: 1,
                    last_us: i.time_us,
                },
                Span {
                    drift: i.time_us >= windows.drift_since_us,
                    record: i.time_us >= windows.record_since_us,
                },
            ))
        })
        .collect();
    of_tallies(rows.iter().map(|(t, s)| (t, *s)), policy, drift_window, now)
}

/// The standing from counted rows, each with the windows it counts in; rows of agents the
/// policy does not govern, or in neither window, are skipped.
pub fn of_tallies<'a>(
    rows: impl IntoIterator<Item = (&'a ToolTally, Span)>,
    policy: &CompiledPolicy,
    drift_window: &str,
    now: Timestamp,
) -> Standing {
    let mut agents = BTreeSet::new();
    let mut last_used: BTreeMap<String, Timestamp> = BTreeMap::new();
    let mut used: BTreeMap<String, Timestamp> = BTreeMap::new();
    let mut records: BTreeMap<String, TrackRecord> = BTreeMap::new();
    let latest = |map: &mut BTreeMap<String, Timestamp>, tool: &str, at: Timestamp| {
        let last = map.entry(tool.to_owned()).or_insert(at);
        *last = (*last).max(at);
    };
    for (row, span) in rows {
        if !(span.drift || span.record) || !policy.governs(&row.agent) {
            continue;
        }
        agents.insert(row.agent.clone());
        if row.event == Event::Decide.as_str()
            && let Ok(at) = Timestamp::from_microsecond(row.last_us)
        {
            latest(&mut last_used, &row.tool, at);
            if span.drift {
                latest(&mut used, &row.tool, at);
            }
        }
        if span.record
            && let Some(outcome) = row.outcome.as_deref().and_then(outcome_kind)
        {
            records
                .entry(row.tool.clone())
                .or_default()
                .add(outcome, row.count);
        }
    }
    Standing {
        agents: agents.into_iter().collect(),
        tools: policy.tool_statuses(&records, &last_used),
        drift: policy.drift(drift_window, &used, now),
    }
}

fn parse_window(window: &str) -> std::time::Duration {
    tollgate_engine::duration::parse(window).unwrap_or(DEFAULT_WINDOW)
}
