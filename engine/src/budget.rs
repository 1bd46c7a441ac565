//! Run and identity-window state: what a run has used so far, and what an identity has used in
//! its window. Both are plain serialisable data, so the gateway persists them and a restart
//! resets nothing.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use jiff::Timestamp;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// A ceiling that halts a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Ceiling {
    /// spec.execution.maxSteps.
    MaxSteps {
        /// The ceiling.
        limit: u64,
    },
    /// spec.execution.maxTokensPerRun.
    MaxTokensPerRun {
        /// The ceiling.
        limit: u64,
    },
    /// spec.execution.maxWallClockSeconds.
    MaxWallClockSeconds {
        /// The ceiling.
        limit: u64,
    },
    /// spec.execution.maxCostUSD.
    MaxCostUsd {
        /// The ceiling.
        limit: Decimal,
    },
    /// spec.execution.perIdentity.maxRuns.
    WindowMaxRuns {
        /// The ceiling.
        limit: u64,
    },
    /// spec.execution.perIdentity.maxCostUSD.
    WindowMaxCostUsd {
        /// The ceiling.
        limit: Decimal,
    },
}

impl Ceiling {
    /// The policy field that sets this ceiling.
    pub fn clause(&self) -> &'static str {
        match self {
            Ceiling::MaxSteps { .. } => "spec.execution.maxSteps",
            Ceiling::MaxTokensPerRun { .. } => "spec.execution.maxTokensPerRun",
            Ceiling::MaxWallClockSeconds { .. } => "spec.execution.maxWallClockSeconds",
            Ceiling::MaxCostUsd { .. } => "spec.execution.maxCostUSD",
            Ceiling::WindowMaxRuns { .. } => "spec.execution.perIdentity.maxRuns",
            Ceiling::WindowMaxCostUsd { .. } => "spec.execution.perIdentity.maxCostUSD",
        }
    }
}

impl fmt::Display for Ceiling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ceiling::MaxSteps { limit } => {
                write!(f, "the run reached its ceiling of {limit} steps")
            }
            Ceiling::MaxTokensPerRun { limit } => {
                write!(f, "the run reached its ceiling of {limit} tokens")
            }
            Ceiling::MaxWallClockSeconds { limit } => {
                write!(f, "the run reached its wall-clock ceiling of {limit}s")
            }
            Ceiling::MaxCostUsd { limit } => {
                write!(f, "the run reached its cost ceiling of ${limit}")
            }
            Ceiling::WindowMaxRuns { limit } => write!(
                f,
                "the agent reached its ceiling of {limit} runs per window"
            ),
            Ceiling::WindowMaxCostUsd { limit } => write!(
                f,
                "the agent reached its cost ceiling of ${limit} per window"
            ),
        }
    }
}

/// What one run has used. Persist it between calls.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunState {
    /// When the run's first call was evaluated.
    pub started_at: Option<Timestamp>,
    /// Calls evaluated in the run, whatever their outcome.
    pub steps: u64,
    /// Model tokens reported.
    pub tokens: u64,
    /// Cost reported, in US dollars.
    pub cost: Decimal,
    /// Calls released, per tool.
    pub calls: BTreeMap<String, u64>,
    /// Items released, per tool (see maxItemsPerRun).
    pub items: BTreeMap<String, u64>,
    /// The ceiling that halted the run, if one did. A halted run stays halted.
    pub halted: Option<Ceiling>,
    /// Calls released and not reported yet: step -> tool. A report names one of these steps and
    /// takes it out, so a result or usage can be reported only for a call that was let through,
    /// and once. Holds at most [`MAX_AWAITING_REPORT`] steps; the oldest go first.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub awaiting_report: BTreeMap<u64, String>,
}

/// The most released calls of one run that wait for their report at once; past it the oldest
/// step can no longer be reported.
pub const MAX_AWAITING_REPORT: usize = 1024;

impl RunState {
    /// Notes that the call at `step` of `tool` was released, so its outcome may be reported.
    pub fn await_report(&mut self, step: u64, tool: &str) {
        self.awaiting_report.insert(step, tool.to_owned());
        while self.awaiting_report.len() > MAX_AWAITING_REPORT {
            self.awaiting_report.pop_first();
        }
    }

    /// Takes the released call at `step` for its report: the tool it was released for, or None
    /// when no call of this run at that step waits for a report (refused, unknown, or reported).
    pub fn take_report(&mut self, step: u64) -> Option<String> {
        self.awaiting_report.remove(&step)
    }
}

/// What one identity has used in its window. Persist it between runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowState {
    /// Runs started, with when they started.
    pub runs: Vec<(Timestamp, String)>,
    /// Costs reported, with when.
    pub costs: Vec<(Timestamp, Decimal)>,
}

impl WindowState {
    /// Runs started within `window` before `now`.
    pub fn runs_within(&self, window: Duration, now: Timestamp) -> u64 {
        self.runs
            .iter()
            .filter(|(at, _)| within(*at, window, now))
            .count() as u64
    }

    /// Whether `run_id` already started within the window.
    pub fn has_run(&self, run_id: &str, window: Duration, now: Timestamp) -> bool {
        self.runs
            .iter()
            .any(|(at, id)| id == run_id && within(*at, window, now))
    }

    /// Cost reported within `window` before `now`. Saturates at [`Decimal::MAX`] instead of
    /// overflowing (a saturated sum is past every ceiling); a negative entry (written by a
    /// gateway before reports were checked) counts as nothing.
    pub fn cost_within(&self, window: Duration, now: Timestamp) -> Decimal {
        self.costs
            .iter()
            .filter(|(at, _)| within(*at, window, now))
            .fold(Decimal::ZERO, |sum, (_, cost)| add_cost(sum, *cost))
    }

    /// Drops entries older than the window.
    pub fn prune(&mut self, window: Duration, now: Timestamp) {
        self.runs.retain(|(at, _)| within(*at, window, now));
        self.costs.retain(|(at, _)| within(*at, window, now));
    }
}

fn within(at: Timestamp, window: Duration, now: Timestamp) -> bool {
    let age = now.duration_since(at);
    age.is_negative() || age.unsigned_abs() < window
}

/// Adds a reported cost to a sum: never panics, never lowers the sum. A negative cost (which no
/// check lets in any more, but an old trail may hold) adds nothing; a sum past [`Decimal::MAX`]
/// stays there.
pub fn add_cost(sum: Decimal, cost: Decimal) -> Decimal {
    if cost.is_sign_negative() {
        return sum;
    }
    sum.checked_add(cost).unwrap_or(Decimal::MAX)
}

/// The most tokens one report may carry: far above any model call, far below an overflow.
pub const MAX_TOKENS_PER_REPORT: u64 = 1_000_000_000;

/// The most US dollars one report may carry: far above any model or tool call, far below an
/// overflow (summing it needs more than 10^22 reports to reach [`Decimal::MAX`]).
pub const MAX_COST_PER_REPORT: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

/// Why a report's usage is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    /// `usage.tokens` over [`MAX_TOKENS_PER_REPORT`].
    #[error("usage.tokens {0} is more than one report may carry ({MAX_TOKENS_PER_REPORT})")]
    TooManyTokens(u64),
    /// `usage.cost` below zero.
    #[error("usage.cost {0} is negative: a cost is what was spent, never a credit")]
    NegativeCost(Decimal),
    /// `usage.cost` over [`MAX_COST_PER_REPORT`].
    #[error("usage.cost {0} is more than one report may carry ({MAX_COST_PER_REPORT} USD)")]
    CostTooHigh(Decimal),
}

/// Usage reported after a call. Unknown fields are refused (a misspelt `costUSD` would
/// otherwise count as nothing); [`Usage::check`] bounds the numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Usage {
    /// Model tokens used.
    #[serde(default)]
    pub tokens: u64,
    /// Cost, in US dollars.
    #[serde(default)]
    pub cost: Decimal,
}

impl Usage {
    /// Whether an agent may report this: tokens and cost within one report's bounds, the cost
    /// not negative. Everything an agent reports passes here before it is counted.
    pub fn check(&self) -> Result<(), UsageError> {
        if self.tokens > MAX_TOKENS_PER_REPORT {
            return Err(UsageError::TooManyTokens(self.tokens));
        }
        if self.cost.is_sign_negative() && !self.cost.is_zero() {
            return Err(UsageError::NegativeCost(self.cost));
        }
        if self.cost > MAX_COST_PER_REPORT {
            return Err(UsageError::CostTooHigh(self.cost));
        }
        Ok(())
    }
}
