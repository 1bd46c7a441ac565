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

    /// Cost reported within `window` before `now`.
    pub fn cost_within(&self, window: Duration, now: Timestamp) -> Decimal {
        self.costs
            .iter()
            .filter(|(at, _)| within(*at, window, now))
            .map(|(_, c)| *c)
            .sum()
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

/// Usage reported after a call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Model tokens used.
    #[serde(default)]
    pub tokens: u64,
    /// Cost, in US dollars.
    #[serde(default)]
    pub cost: Decimal,
}
