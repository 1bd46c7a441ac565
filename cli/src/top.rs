//! `kubectl tollgate top`: what every agent is doing now, from the audit trail (the store, or the
//! gateway's read API): calls per minute, calls and refusals this hour, tokens and cost this hour
//! against the policy's ceilings, halted runs, approvals waiting, and whether its kill switch
//! stops it. Refreshes in place; `--once` prints one table for scripts.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use jiff::{SignedDuration, Timestamp};
use rust_decimal::Decimal;
use tollgate_audit::{ApprovalPhase, Entry, Event};
use tollgate_crds::AgentPolicy;
use tollgate_engine::DenyCode;
use tollgate_engine::decision::Decision;

/// The window `top` counts over.
pub const WINDOW: SignedDuration = SignedDuration::from_hours(1);

/// One agent's row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    /// Tool and model calls in the last minute.
    pub calls_last_minute: u64,
    /// Tool and model calls in the window.
    pub calls: u64,
    /// Calls denied or halted, and requests refused, in the window.
    pub refused: u64,
    /// Tokens reported or metered in the window.
    pub tokens: u64,
    /// Cost reported or metered in the window.
    pub cost: Decimal,
    /// The most tokens one run of the window reached.
    pub top_run_tokens: u64,
    /// Runs halted in the window.
    pub halted: u64,
    /// Approvals asked in the window and not settled.
    pub waiting: u64,
    /// Whether its latest call was refused by a kill switch.
    pub killed: bool,
}

/// Per agent (`namespace/name`), its row, from `entries` of the window ending at `now`.
pub fn rows(entries: &[Entry], now: Timestamp) -> BTreeMap<String, Row> {
    let since = now - WINDOW;
    let minute = now - SignedDuration::from_mins(1);
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut pending: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut last_call: BTreeMap<String, (Timestamp, bool)> = BTreeMap::new();
    for entry in entries.iter().filter(|e| e.time >= since && e.time <= now) {
        let Some(agent) = entry.agent.clone() else {
            continue;
        };
        let row = rows.entry(agent.clone()).or_default();
        let refused = |d: &Decision| matches!(d, Decision::Deny { .. } | Decision::Halt { .. });
        match entry.event {
            Event::Decide | Event::Model => {
                row.calls += 1;
                if entry.time >= minute {
                    row.calls_last_minute += 1;
                }
                if entry.decision.as_ref().is_some_and(refused) {
                    row.refused += 1;
                }
                let killed = entry
                    .decision
                    .as_ref()
                    .and_then(Decision::deny_code)
                    .is_some_and(|c| c == DenyCode::KillSwitch);
                let latest = last_call
                    .entry(agent.clone())
                    .or_insert((entry.time, killed));
                if entry.time >= latest.0 {
                    *latest = (entry.time, killed);
                }
            }
            Event::Rejected => row.refused += 1,
            Event::Halt => row.halted += 1,
            Event::Approval => {
                if let Some(approval) = &entry.approval {
                    let names = pending.entry(agent.clone()).or_default();
                    match approval.phase {
                        ApprovalPhase::Pending => {
                            names.insert(approval.name.clone());
                        }
                        ApprovalPhase::Decided => {}
                        _ => {
                            names.remove(&approval.name);
                        }
                    }
                }
            }
            _ => {}
        }
        if matches!(entry.event, Event::Report | Event::Model)
            && let Some(usage) = &entry.usage
        {
            row.tokens += usage.tokens;
            row.cost += usage.cost;
        }
        if let Some(counters) = &entry.counters {
            row.top_run_tokens = row.top_run_tokens.max(counters.tokens);
        }
    }
    for (agent, names) in pending {
        if let Some(row) = rows.get_mut(&agent) {
            row.waiting = names.len() as u64;
        }
    }
    for (agent, (_, killed)) in last_call {
        if let Some(row) = rows.get_mut(&agent) {
            row.killed = killed;
        }
    }
    rows
}

/// The table: a heading, then a line per agent, with the ceilings of `policies` where the
/// agent's policy is among them.
pub fn table(rows: &BTreeMap<String, Row>, policies: &[AgentPolicy], heading: &str) -> String {
    let ceilings = |agent: &str| {
        let (namespace, name) = agent.split_once('/').unwrap_or(("default", agent));
        let execution = policies
            .iter()
            .find(|p| {
                p.metadata.namespace.as_deref().unwrap_or("default") == namespace
                    && p.spec.identity_ref.name == name
            })
            .and_then(|p| p.spec.execution.as_ref());
        let cost = execution
            .and_then(|e| e.per_identity.as_ref())
            .and_then(|w| {
                w.max_cost_usd
                    .as_ref()
                    .map(|c| format!("${c}/{}", w.window))
            });
        let tokens = execution.and_then(|e| e.max_tokens_per_run);
        (cost, tokens)
    };
    let mut lines = vec![
        [
            "AGENT",
            "CALLS/MIN",
            "CALLS",
            "REFUSED",
            "TOKENS",
            "COST",
            "CEILING",
            "TOP RUN",
            "HALTED",
            "WAITING",
            "KILL SWITCH",
        ]
        .map(str::to_owned),
    ];
    for (agent, row) in rows {
        let (cost_ceiling, token_ceiling) = ceilings(agent);
        lines.push([
            agent.clone(),
            row.calls_last_minute.to_string(),
            row.calls.to_string(),
            row.refused.to_string(),
            row.tokens.to_string(),
            format!("${}", row.cost.round_dp(4).normalize()),
            cost_ceiling.unwrap_or_else(|| "-".to_owned()),
            match token_ceiling {
                Some(limit) => format!("{}/{limit}", row.top_run_tokens),
                None => row.top_run_tokens.to_string(),
            },
            row.halted.to_string(),
            row.waiting.to_string(),
            if row.killed { "ENGAGED" } else { "-" }.to_owned(),
        ]);
    }
    let widths: Vec<usize> = (0..lines[0].len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = format!("{heading}\n");
    for line in &lines {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(text, "{}", cells.join("  ").trim_end());
    }
    if rows.is_empty() {
        text.push_str("no agent made a call in the last hour\n");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(value: serde_json::Value) -> Entry {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn rows_count_calls_refusals_usage_halts_waiting_approvals_and_switches() {
        let now: Timestamp = "2026-12-07T12:00:00Z".parse().unwrap();
        let rule = json!({"policy": "p", "generation": 1, "policyHash": "sha256:0", "clause": "c"});
        let id = json!({"username": "apikey:a"});
        let entries = vec![
            // Older than the hour: not counted.
            entry(
                json!({"time": "2026-12-07T10:00:00Z", "event": "decide", "identity": id, "agent": "ns/a",
                         "decision": {"decision": "allow", "rule": rule, "review": false}}),
            ),
            entry(
                json!({"time": "2026-12-07T11:30:00Z", "event": "decide", "identity": id, "agent": "ns/a",
                         "decision": {"decision": "allow", "rule": rule, "review": false},
                         "counters": {"steps": 1, "tokens": 0, "costUsd": "0"}}),
            ),
            entry(
                json!({"time": "2026-12-07T11:31:00Z", "event": "report", "identity": id, "agent": "ns/a",
                         "usage": {"tokens": 1200, "cost": "0.02"},
                         "counters": {"steps": 1, "tokens": 1200, "costUsd": "0.02"}}),
            ),
            entry(
                json!({"time": "2026-12-07T11:59:30Z", "event": "decide", "identity": id, "agent": "ns/a",
                         "decision": {"decision": "deny", "code": "ToolBlocked", "rule": rule, "message": "m"}}),
            ),
            entry(
                json!({"time": "2026-12-07T11:59:40Z", "event": "approval", "identity": id, "agent": "ns/a",
                         "approval": {"name": "ns/r1", "phase": "Pending", "approvers": []}}),
            ),
            entry(
                json!({"time": "2026-12-07T11:59:41Z", "event": "approval", "identity": id, "agent": "ns/a",
                         "approval": {"name": "ns/r2", "phase": "Pending", "approvers": []}}),
            ),
            entry(
                json!({"time": "2026-12-07T11:59:42Z", "event": "approval", "identity": {"username": "dana"},
                         "agent": "ns/a", "approval": {"name": "ns/r2", "phase": "Decided", "approvers": ["dana"]}}),
            ),
            entry(
                json!({"time": "2026-12-07T11:59:43Z", "event": "approval", "identity": id, "agent": "ns/a",
                         "approval": {"name": "ns/r2", "phase": "Approved", "approvers": ["dana"]}}),
            ),
            entry(
                json!({"time": "2026-12-07T11:59:50Z", "event": "halt", "identity": id, "agent": "ns/a"}),
            ),
            entry(
                json!({"time": "2026-12-07T11:59:55Z", "event": "rejected", "identity": id, "agent": "ns/a",
                         "error": "x"}),
            ),
            entry(
                json!({"time": "2026-12-07T11:59:59Z", "event": "decide", "identity": id, "agent": "ns/b",
                         "decision": {"decision": "deny", "code": "KillSwitch", "rule": rule, "message": "m"}}),
            ),
        ];
        let rows = rows(&entries, now);
        assert_eq!(
            rows["ns/a"],
            Row {
                calls_last_minute: 1,
                calls: 2,
                refused: 2,
                tokens: 1200,
                cost: "0.02".parse().unwrap(),
                top_run_tokens: 1200,
                halted: 1,
                waiting: 1,
                killed: false,
            }
        );
        assert!(rows["ns/b"].killed);
        let text = table(&rows, &[], "heading");
        assert!(text.starts_with("heading\nAGENT"), "{text}");
        assert!(text.contains("ns/b") && text.contains("ENGAGED"), "{text}");
    }
}
