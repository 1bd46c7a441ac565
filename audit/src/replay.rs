//! Reading the trail back: a run as a timeline, and what-if re-evaluation of recorded calls
//! against a candidate policy.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;
use tollgate_engine::{Agent, CompiledPolicy, Decision, RunState, ToolCall, WindowState};

use crate::record::{BodyError, Entry, Event, Record, outcome_of};

/// A record read back: its place in the chain and its entry.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// The chain.
    pub chain: String,
    /// Its sequence number.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
    /// The entry.
    #[serde(flatten)]
    pub entry: Entry,
}

/// Reads records back into steps; the error names the record whose body cannot be read.
pub fn steps(records: &[Record]) -> Result<Vec<Step>, ReadError> {
    records
        .iter()
        .map(|r| {
            Ok(Step {
                chain: r.chain.clone(),
                seq: r.seq,
                hash: r.hash.clone(),
                entry: r.entry().map_err(|source| ReadError {
                    chain: r.chain.clone(),
                    seq: r.seq,
                    source,
                })?,
            })
        })
        .collect()
}

/// A record whose body cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("chain {chain:?}, record {seq}: {source}")]
pub struct ReadError {
    /// The chain.
    pub chain: String,
    /// The record.
    pub seq: u64,
    /// Why.
    #[source]
    pub source: BodyError,
}

fn short(hash: &str) -> &str {
    let hex = hash.strip_prefix("sha256:").unwrap_or(hash);
    &hex[..hex.len().min(12)]
}

fn decision_line(decision: &Decision) -> String {
    match decision {
        Decision::Allow { review, .. } => {
            if *review {
                "ALLOWED (queued for review)".to_owned()
            } else {
                "ALLOWED".to_owned()
            }
        }
        Decision::Deny { code, message, .. } => format!("DENIED {}: {message}", code.as_str()),
        Decision::RequireApproval { approval, .. } => {
            let who: Vec<String> = approval
                .approvers
                .groups
                .iter()
                .map(|g| format!("group {g}"))
                .chain(approval.approvers.users.iter().map(|u| format!("user {u}")))
                .collect();
            format!(
                "WAITS FOR APPROVAL: {} of [{}] within {}s ({})",
                approval.min_approvals,
                who.join(", "),
                approval.timeout.as_secs(),
                approval.reason
            )
        }
        Decision::Halt { message, .. } => format!("HALTED: {message}"),
    }
}

/// An admission record's write as people read it: `DELETE deployments.apps prod/web`.
fn write_of(write: Option<&serde_json::Value>) -> String {
    let field = |name: &str| {
        write
            .and_then(|w| w.get(name))
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
    };
    let mut resource = field("resource").to_owned();
    if !field("group").is_empty() {
        resource = format!("{resource}.{}", field("group"));
    }
    if !field("subresource").is_empty() {
        resource = format!("{resource}/{}", field("subresource"));
    }
    let object = match (field("namespace"), field("name")) {
        ("", name) => name.to_owned(),
        (namespace, name) => format!("{namespace}/{name}"),
    };
    format!("{} {resource} {object}", field("operation"))
        .trim_end()
        .to_owned()
}

/// The steps as a timeline for people: one block per record, in order.
pub fn timeline(steps: &[Step]) -> String {
    let mut out = String::new();
    let runs: std::collections::BTreeSet<&str> = steps
        .iter()
        .filter_map(|s| s.entry.run.as_deref())
        .collect();
    let agents: std::collections::BTreeSet<&str> = steps
        .iter()
        .filter_map(|s| s.entry.agent.as_deref())
        .collect();
    let _ = writeln!(
        out,
        "run {} · agent {} · {} record(s)",
        runs.into_iter().collect::<Vec<_>>().join(", "),
        agents.into_iter().collect::<Vec<_>>().join(", "),
        steps.len()
    );
    for step in steps {
        let e = &step.entry;
        let what = match (e.event, &e.tool) {
            (Event::Decide, Some(tool)) => format!("call {tool}"),
            (Event::Report, Some(tool)) => format!("result of {tool}"),
            (Event::ServerRequest, Some(method)) => format!("server asked {method}"),
            (Event::ClientAnswer, Some(method)) => format!("client answered {method}"),
            (Event::Admission, _) => format!("kubernetes {}", write_of(e.arguments.as_ref())),
            (Event::Model, _) => match &e.model {
                Some(m) => format!("model {} via {} {}", m.model, m.upstream, m.endpoint),
                None => "model call".to_owned(),
            },
            (event, Some(tool)) => format!("{} {tool}", event.as_str()),
            (event, None) => event.as_str().to_owned(),
        };
        let step_no = e.step.map(|s| format!("step {s} · ")).unwrap_or_default();
        let _ = writeln!(
            out,
            "\n{}  {step_no}{what}  [{}#{}]",
            e.time, step.chain, step.seq
        );
        let mut who = e.identity.username.clone();
        if let Some(pod) = &e.identity.pod {
            let _ = write!(who, " (pod {pod})");
        }
        let _ = writeln!(out, "    who       {who}");
        if let Some(decision) = &e.decision {
            let _ = writeln!(out, "    decision  {}", decision_line(decision));
            let rule = decision.rule();
            let _ = writeln!(
                out,
                "    rule      {} {} @ {}",
                rule.policy,
                rule.clause,
                short(&rule.policy_hash)
            );
        } else if let Some(policy) = &e.policy {
            let _ = writeln!(
                out,
                "    policy    {} @ {}",
                policy.name,
                short(&policy.hash)
            );
        }
        if let Some(approval) = &e.approval {
            let by = if approval.approvers.is_empty() {
                String::new()
            } else {
                format!(" by {}", approval.approvers.join(", "))
            };
            let _ = writeln!(
                out,
                "    approval  {} {}{by}",
                approval.name, approval.phase
            );
        }
        if let Some(arguments) = &e.arguments {
            let _ = writeln!(
                out,
                "    args      {}  ({})",
                arguments,
                e.arguments_digest.as_deref().unwrap_or("no digest")
            );
        }
        if let Some(result) = &e.result {
            let _ = writeln!(out, "    result    {result}");
        }
        if let Some(m) = &e.model {
            let t = &m.tokens;
            let metered = match m.metered {
                crate::Metered::Reported => "reported by the provider",
                crate::Metered::Estimated => "estimated by the gateway",
                crate::Metered::NotSent => "not sent",
            };
            let mut line = format!(
                "    tokens    {} in ({} cached) + {} out, {metered}",
                t.input_tokens, t.cached_input_tokens, t.output_tokens
            );
            if let Some(cap) = m.output_cap {
                let _ = write!(line, "; output capped at {cap}");
            }
            let _ = writeln!(out, "{line}");
            let mut how = format!("    answer    {} ms", m.duration_us / 1000);
            if let Some(status) = m.status {
                let _ = write!(how, ", HTTP {status}");
            }
            if let Some(first) = m.first_token_us {
                let _ = write!(how, ", first token after {} ms", first / 1000);
            }
            if let Some(reason) = &m.finish_reason {
                let _ = write!(how, ", finished: {reason}");
            }
            if let Some(cut) = m.cut {
                let _ = write!(how, ", CUT by Tollgate ({cut:?})");
            }
            let _ = writeln!(out, "{how}");
        }
        if let Some(usage) = &e.usage {
            let kind = match (e.event, e.usage_claimed) {
                (Event::Model, _) => "charged ",
                (_, true) => "claimed ",
                (_, false) => "usage   ",
            };
            let mut line = format!("    {kind}  {} token(s), ${}", usage.tokens, usage.cost);
            if e.usage_claimed {
                line.push_str(
                    " (the agent's report; not charged, the gateway meters its model calls)",
                );
            }
            let _ = writeln!(out, "{line}");
        }
        if let Some(error) = &e.error {
            let _ = writeln!(out, "    error     {error}");
        }
        if let Some(c) = &e.counters {
            let _ = writeln!(
                out,
                "    budget    steps {}, tokens {}, cost ${}",
                c.steps, c.tokens, c.cost_usd
            );
        }
        if let Some(ceiling) = &e.ceiling {
            let _ = writeln!(out, "    ceiling   {}", ceiling.clause());
        }
        if !e.redacted.is_empty() {
            let _ = writeln!(out, "    redacted  {}", e.redacted.join(", "));
        }
        if let Some(latency) = e.latency_us {
            let _ = writeln!(out, "    latency   {latency} µs");
        }
    }
    out
}

/// A recorded decision the candidate policy would make differently.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    /// When the call was made.
    pub time: jiff::Timestamp,
    /// The agent.
    pub agent: String,
    /// The run.
    pub run: String,
    /// The step.
    pub step: Option<u64>,
    /// The tool.
    pub tool: String,
    /// What was decided then.
    pub recorded: Decision,
    /// What the candidate decides.
    pub candidate: Decision,
    /// The recorded arguments were partly redacted, so the candidate saw `[REDACTED]` where the
    /// agent sent a secret; a rule on those fields may decide differently on the real values.
    pub redacted_arguments: bool,
}

/// The outcome of a what-if run.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WhatIf {
    /// Recorded calls of the policy's agent that were re-evaluated.
    pub evaluated: u64,
    /// The ones that would be decided differently.
    pub changes: Vec<Change>,
}

/// Re-evaluates the recorded calls of `policy`'s agent (steps in time order) with the candidate
/// `policy`, replaying each run's budget state as the candidate would have kept it, and lists
/// every call whose decision would change (kind or deny code).
pub fn what_if(policy: &CompiledPolicy, steps: &[Step]) -> WhatIf {
    let mut runs: BTreeMap<String, RunState> = BTreeMap::new();
    let mut window = WindowState::default();
    let mut pending = Pending::new();
    let mut out = WhatIf::default();
    for step in steps {
        let e = &step.entry;
        let (Some(agent), Some(run_id)) = (&e.agent, &e.run) else {
            continue;
        };
        if !policy.governs(agent) {
            continue;
        }
        let (namespace, name) = agent.split_once('/').unwrap_or(("", agent));
        let run = runs.entry(run_id.clone()).or_default();
        let arguments = e.arguments.clone().unwrap_or(Value::Null);
        match (e.event, &e.tool, &e.decision) {
            (Event::Decide, Some(tool), Some(recorded)) => {
                let killed = matches!(
                    recorded.deny_code(),
                    Some(tollgate_engine::DenyCode::KillSwitch)
                );
                let who = Agent {
                    name,
                    namespace,
                    username: &e.identity.username,
                    killed,
                };
                let call = ToolCall {
                    run_id,
                    tool,
                    arguments: &arguments,
                };
                let candidate = policy.evaluate(&who, &call, run, &window, e.time);
                policy.record(&call, &candidate, run, &mut window, e.time);
                if matches!(candidate, Decision::RequireApproval { .. }) {
                    pending.insert((run_id.clone(), tool.clone()), arguments.clone());
                }
                out.evaluated += 1;
                if outcome_of(recorded) != outcome_of(&candidate) {
                    out.changes.push(Change {
                        time: e.time,
                        agent: agent.clone(),
                        run: run_id.clone(),
                        step: e.step,
                        tool: tool.clone(),
                        recorded: recorded.clone(),
                        candidate,
                        redacted_arguments: e.redacted.iter().any(|p| p.starts_with("/arguments")),
                    });
                }
            }
            _ => apply_outcome(policy, e, run, &mut window, &mut pending),
        }
    }
    out
}

/// Calls waiting for approval in a replay, by (run, tool), with their recorded arguments.
type Pending = BTreeMap<(String, String), Value>;

/// Applies what happened after a decision: an approved call is charged to its run when it is
/// released, and reported usage is counted (which may halt the run).
fn apply_outcome(
    policy: &CompiledPolicy,
    e: &Entry,
    run: &mut RunState,
    window: &mut WindowState,
    pending: &mut Pending,
) {
    let Some(run_id) = &e.run else {
        return;
    };
    match (e.event, &e.tool) {
        (Event::Approval, Some(tool))
            if e.approval
                .as_ref()
                .is_some_and(|a| a.phase == crate::ApprovalPhase::Approved) =>
        {
            if let Some(arguments) = pending.remove(&(run_id.clone(), tool.clone())) {
                let call = ToolCall {
                    run_id,
                    tool,
                    arguments: &arguments,
                };
                policy.release(&call, e.step, run);
            }
        }
        (Event::Report, _) => {
            // The reported step no longer waits for its report (records from before reports
            // named their step have none).
            if let Some(step) = e.step {
                run.take_report(step);
            }
            // A claim the gateway did not charge (it meters the agent's model calls) is not
            // charged on replay either.
            if let Some(usage) = e.usage.as_ref().filter(|_| !e.usage_claimed) {
                policy.report(usage, run, window, e.time);
            }
        }
        (Event::Model, _) => {
            if e.decision.as_ref().is_some_and(Decision::is_allowed) {
                policy.start_model_call(run_id, run, window, e.time);
            }
            if let Some(usage) = &e.usage {
                policy.charge_model_call(usage, run, window, e.time);
            }
        }
        _ => {}
    }
}

/// Budget state rebuilt from the trail: what a restarted gateway continues from.
#[derive(Debug, Default)]
pub struct Rebuilt {
    /// Each run's state, by run id.
    pub runs: BTreeMap<String, RunState>,
    /// The agent's identity window.
    pub window: WindowState,
}

/// Rebuilds run and window state from recorded entries of one agent, in order, under `policy`:
/// each decision is recorded as it was made (not re-decided), each released approval charged,
/// each reported usage counted. Feeding every entry of the agent since the start of its window
/// and of the runs it will continue gives the state the gateway had when it stopped.
pub fn rebuild(policy: &CompiledPolicy, entries: &[Entry]) -> Rebuilt {
    let mut out = Rebuilt::default();
    let mut follower = Follower::default();
    for e in entries {
        let Some(run_id) = &e.run else {
            continue;
        };
        let run = out.runs.entry(run_id.clone()).or_default();
        follower.apply(policy, e, run, &mut out.window);
    }
    out
}

/// Applies recorded entries, one at a time and in order, to budget state kept elsewhere: how a
/// gateway replica follows what other replicas recorded for an agent it also serves.
#[derive(Debug, Default)]
pub struct Follower {
    pending: Pending,
}

impl Follower {
    /// Applies `e` (an entry of `run`) to `run` and the agent's `window`: a decision is recorded
    /// as it was made, a released approval charged, reported usage counted, a halt kept.
    pub fn apply(
        &mut self,
        policy: &CompiledPolicy,
        e: &Entry,
        run: &mut RunState,
        window: &mut WindowState,
    ) {
        let Some(run_id) = &e.run else {
            return;
        };
        let arguments = e.arguments.clone().unwrap_or(Value::Null);
        match (e.event, &e.tool, &e.decision) {
            (Event::Decide, Some(tool), Some(decision)) => {
                let call = ToolCall {
                    run_id,
                    tool,
                    arguments: &arguments,
                };
                policy.record(&call, decision, run, window, e.time);
                if matches!(decision, Decision::RequireApproval { .. }) {
                    self.pending
                        .insert((run_id.clone(), tool.clone()), arguments.clone());
                }
            }
            (Event::Halt, _, _) => {
                if let Some(ceiling) = &e.ceiling {
                    run.halted.get_or_insert_with(|| ceiling.clone());
                }
            }
            _ => apply_outcome(policy, e, run, window, &mut self.pending),
        }
    }
}
