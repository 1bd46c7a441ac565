//! Evaluating a tool call against a compiled policy and the run's state.
//!
//! The order is part of the contract: the kill switch first, then a halted run, then the run's
//! and the identity's ceilings (every evaluated call is a step, denied or not), then the tool
//! (blocked, then default deny), its arguments, its per-run limits, its `when` condition, and
//! last whether people must approve it. The first rule that refuses decides.

use std::borrow::Cow;

use jiff::Timestamp;
use serde_json::{Map, Value, json};
use tollgate_crds::policy::{AdditionalFields, Autonomy, JsonType};

use crate::budget::{Ceiling, RunState, Usage, WindowState, add_cost};
use crate::canonical;
use crate::cel::Condition;
use crate::compile::{CompiledPolicy, CompiledTool, FieldCheck, is_valid_tool_name};
use crate::decision::{ApprovalRequirement, Decision, DenyCode, RuleRef};

/// Who is calling, as proved by its token (never as claimed by the request).
#[derive(Debug, Clone, Copy)]
pub struct Agent<'a> {
    /// The AgentIdentity's name.
    pub name: &'a str,
    /// Its namespace.
    pub namespace: &'a str,
    /// The authenticated username, such as `system:serviceaccount:support:agent-support-agent-v2`.
    pub username: &'a str,
    /// Whether the agent's own or the global kill switch is engaged.
    pub killed: bool,
}

/// One tool call, as the agent made it.
#[derive(Debug, Clone, Copy)]
pub struct ToolCall<'a> {
    /// The run it belongs to.
    pub run_id: &'a str,
    /// The tool's name, exactly as sent.
    pub tool: &'a str,
    /// The arguments, parsed with [`crate::canonical::parse_strict`].
    pub arguments: &'a Value,
}

/// The decision for an agent that has no policy: denied, with the reason.
pub fn deny_without_policy(reason: &str) -> Decision {
    deny_unusable(DenyCode::NoPolicy, reason)
}

/// The decision for an agent whose policy cannot be used (it does not parse or compile, or more
/// than one names the agent): denied with code PolicyInvalid and the error.
pub fn deny_invalid_policy(reason: &str) -> Decision {
    deny_unusable(DenyCode::PolicyInvalid, reason)
}

fn deny_unusable(code: DenyCode, reason: &str) -> Decision {
    Decision::Deny {
        code,
        rule: RuleRef {
            policy: "".into(),
            generation: None,
            policy_hash: "".into(),
            tool: None,
            clause: Cow::Borrowed("spec"),
        },
        message: format!(
            "no usable AgentPolicy: {reason}; every call is denied until one is in force"
        ),
    }
}

pub(crate) type Refusal = (DenyCode, Cow<'static, str>, String);

impl CompiledPolicy {
    /// The rule behind a decision. Clauses about one tool are written relative to its entry and
    /// made absolute here, such as `spec.tools.allowed[update_order_status].when`.
    pub(crate) fn rule(
        &self,
        tool: Option<&CompiledTool>,
        clause: impl Into<Cow<'static, str>>,
    ) -> RuleRef {
        let clause = clause.into();
        let clause = match tool {
            Some(tool) if !clause.starts_with("spec.") => {
                // Concatenated, not format!ted: every refusal of a tool's own rules passes here.
                let mut path = String::with_capacity(21 + tool.name.len() + clause.len());
                path.push_str("spec.tools.allowed[");
                path.push_str(&tool.name);
                path.push_str("].");
                path.push_str(&clause);
                Cow::Owned(path)
            }
            _ => clause,
        };
        RuleRef {
            policy: self.id.clone(),
            generation: self.generation,
            policy_hash: self.hash.clone(),
            tool: tool.map(|t| t.name.clone()),
            clause,
        }
    }

    pub(crate) fn deny(
        &self,
        tool: Option<&CompiledTool>,
        (code, clause, message): Refusal,
    ) -> Decision {
        Decision::Deny {
            code,
            rule: self.rule(tool, clause),
            message,
        }
    }

    pub(crate) fn halt(&self, ceiling: Ceiling) -> Decision {
        let message =
            format!("{ceiling}; the run is halted and every further call of it is refused");
        Decision::Halt {
            rule: self.rule(None, ceiling.clause()),
            ceiling,
            message,
        }
    }

    /// What stops every call of the run before its own rules are read: the agent's kill switch,
    /// the run's halt, a ceiling it has reached (`steps`: whether the step ceiling counts; model
    /// calls are not steps).
    pub(crate) fn stopped(
        &self,
        agent: &Agent<'_>,
        run_id: &str,
        run: &RunState,
        window: &WindowState,
        now: Timestamp,
        steps: bool,
    ) -> Option<Decision> {
        if agent.killed {
            return Some(self.deny(
                None,
                (
                    DenyCode::KillSwitch,
                    "spec.killSwitch".into(),
                    format!(
                        "the kill switch of agent {} is engaged; every call is denied",
                        agent.name
                    ),
                ),
            ));
        }
        if let Some(ceiling) = &run.halted {
            return Some(self.halt(ceiling.clone()));
        }
        self.ceiling_reached(run_id, run, window, now, steps)
            .map(|ceiling| self.halt(ceiling))
    }

    /// Evaluates one call. Pure: the same inputs always give the same decision.
    pub fn evaluate(
        &self,
        agent: &Agent<'_>,
        call: &ToolCall<'_>,
        run: &RunState,
        window: &WindowState,
        now: Timestamp,
    ) -> Decision {
        if let Some(stopped) = self.stopped(agent, call.run_id, run, window, now, true) {
            return stopped;
        }

        if self.blocked.contains(call.tool) {
            return self.deny(
                None,
                (
                    DenyCode::ToolBlocked,
                    "spec.tools.blocked".into(),
                    format!("tool {:?} is blocked by policy", call.tool),
                ),
            );
        }
        let Some(tool) = self.tools.get(call.tool) else {
            let message = if is_valid_tool_name(call.tool) {
                format!("tool {:?} is not allowed by policy", call.tool)
            } else {
                format!(
                    "tool name {:?} is not allowed: tool names use only ASCII letters, digits, '_', '-' and '.'",
                    call.tool
                )
            };
            return self.deny(
                None,
                (
                    DenyCode::ToolNotAllowed,
                    "spec.tools.allowed".into(),
                    message,
                ),
            );
        };

        let Value::Object(args) = call.arguments else {
            return self.deny(
                Some(tool),
                (
                    DenyCode::MalformedArguments,
                    "arguments".into(),
                    "the arguments must be a JSON object".to_owned(),
                ),
            );
        };
        if let Err(refusal) = check_arguments(tool, args) {
            return self.deny(Some(tool), refusal);
        }

        let boundary = match self.check_limits(tool, args, run) {
            Ok(()) => None,
            Err(refusal) if tool.autonomy == Some(Autonomy::ExceptionBased) => Some(refusal),
            Err(refusal) => return self.deny(Some(tool), refusal),
        };

        if let Some(condition) = &tool.when {
            match check_condition(condition, call, run, agent) {
                Ok(true) => {}
                Ok(false) => {
                    return self.deny(
                        Some(tool),
                        (
                            DenyCode::ConditionFailed,
                            "when".into(),
                            format!(
                                "the condition of tool {:?} does not hold: {}",
                                call.tool,
                                condition.source()
                            ),
                        ),
                    );
                }
                Err(e) => {
                    return self.deny(
                        Some(tool),
                        (
                            DenyCode::ConditionError,
                            "when".into(),
                            format!("tool {:?}: {e}", call.tool),
                        ),
                    );
                }
            }
        }

        let Some(approval) = &tool.approval else {
            return Decision::Allow {
                rule: self.rule(Some(tool), "spec.tools.allowed"),
                review: false,
            };
        };
        let reason = if tool.irreversible {
            // Irreversible calls always wait for people, whatever autonomy the tool has earned.
            Some(format!("tool {} is irreversible", tool.name))
        } else {
            match tool.autonomy.unwrap_or_default() {
                Autonomy::Gated => Some(format!(
                    "tool {} is Gated: every call needs approval",
                    tool.name
                )),
                Autonomy::ExceptionBased => match (&boundary, &tool.escalate_when) {
                    (Some((_, _, message)), _) => {
                        Some(format!("{message}; approval is needed to go past it"))
                    }
                    (None, Some(condition)) => match check_condition(condition, call, run, agent) {
                        Ok(true) => Some(format!(
                            "escalateWhen holds for tool {}: {}",
                            tool.name,
                            condition.source()
                        )),
                        Ok(false) => None,
                        Err(e) => {
                            return self.deny(
                                Some(tool),
                                (
                                    DenyCode::ConditionError,
                                    "escalateWhen".into(),
                                    format!("tool {:?}: {e}", call.tool),
                                ),
                            );
                        }
                    },
                    (None, None) => None,
                },
                Autonomy::AuditBased => {
                    return Decision::Allow {
                        rule: self.rule(Some(tool), "autonomy"),
                        review: true,
                    };
                }
            }
        };
        match reason {
            None => Decision::Allow {
                rule: self.rule(Some(tool), "autonomy"),
                review: false,
            },
            Some(reason) => Decision::RequireApproval {
                rule: self.rule(Some(tool), "approval"),
                approval: ApprovalRequirement {
                    approvers: approval.approvers.clone(),
                    min_approvals: approval.min_approvals,
                    timeout: approval.timeout,
                    arguments_digest: canonical::digest(call.arguments),
                    reason,
                    notify: approval.notify.clone(),
                },
            },
        }
    }

    /// The ceiling the run has reached, if any; `steps`: whether its step ceiling counts (tool
    /// calls are steps, model calls are not).
    pub(crate) fn ceiling_reached(
        &self,
        run_id: &str,
        run: &RunState,
        window: &WindowState,
        now: Timestamp,
        steps: bool,
    ) -> Option<Ceiling> {
        let budget = &self.budget;
        if let Some(limit) = budget.max_steps
            && steps
            && run.steps >= limit
        {
            return Some(Ceiling::MaxSteps { limit });
        }
        if let Some(limit) = budget.max_tokens
            && run.tokens >= limit
        {
            return Some(Ceiling::MaxTokensPerRun { limit });
        }
        if let Some(limit) = budget.max_cost
            && run.cost >= limit
        {
            return Some(Ceiling::MaxCostUsd { limit });
        }
        if let (Some(limit), Some(started)) = (budget.max_wall_clock, run.started_at)
            && now.duration_since(started).unsigned_abs() >= limit
        {
            return Some(Ceiling::MaxWallClockSeconds {
                limit: limit.as_secs(),
            });
        }
        if let Some(span) = budget.window {
            if let Some(limit) = budget.window_max_runs
                && !window.has_run(run_id, span, now)
                && window.runs_within(span, now) >= limit
            {
                return Some(Ceiling::WindowMaxRuns { limit });
            }
            if let Some(limit) = budget.window_max_cost
                && window.cost_within(span, now) >= limit
            {
                return Some(Ceiling::WindowMaxCostUsd { limit });
            }
        }
        None
    }

    fn check_limits(
        &self,
        tool: &CompiledTool,
        args: &Map<String, Value>,
        run: &RunState,
    ) -> Result<(), Refusal> {
        if let Some(limit) = tool.max_calls {
            let used = run.calls.get(&*tool.name).copied().unwrap_or(0);
            if used >= limit {
                return Err((
                    DenyCode::CallLimit,
                    "limits.maxCallsPerRun".into(),
                    format!(
                        "tool {} reached its limit of {limit} calls per run",
                        tool.name
                    ),
                ));
            }
        }
        if let Some((field, limit)) = &tool.max_items {
            let used = run.items.get(&*tool.name).copied().unwrap_or(0);
            let requested = item_count(args, field)?;
            if used.saturating_add(requested) > *limit {
                return Err((
                    DenyCode::ItemLimit,
                    "limits.maxItemsPerRun".into(),
                    format!(
                        "tool {} may touch {limit} {field} per run; {used} used, {requested} requested",
                        tool.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Records an evaluated call in the run's and the identity's state. Call it once per
    /// evaluation, with the decision `evaluate` returned, under the same lock.
    pub fn record(
        &self,
        call: &ToolCall<'_>,
        decision: &Decision,
        run: &mut RunState,
        window: &mut WindowState,
        now: Timestamp,
    ) {
        run.steps = run.steps.saturating_add(1);
        run.started_at.get_or_insert(now);
        if let Some(span) = self.budget.window {
            let refused_run = matches!(
                decision,
                Decision::Halt {
                    ceiling: Ceiling::WindowMaxRuns { .. },
                    ..
                }
            );
            if !refused_run && !window.has_run(call.run_id, span, now) {
                window.runs.push((now, call.run_id.to_owned()));
            }
            window.prune(span, now);
        }
        match decision {
            Decision::Allow { .. } => self.release(call, Some(run.steps), run),
            Decision::Halt { ceiling, .. } => run.halted = Some(ceiling.clone()),
            Decision::Deny { .. } | Decision::RequireApproval { .. } => {}
        }
    }

    /// Charges a released call to the run's per-tool counters: on Allow (through [`record`]) and
    /// when an approved call is released. The call's `step`, when known, may then be reported
    /// once ([`RunState::take_report`]).
    ///
    /// [`record`]: CompiledPolicy::record
    pub fn release(&self, call: &ToolCall<'_>, step: Option<u64>, run: &mut RunState) {
        let Some(tool) = self.tools.get(call.tool) else {
            return;
        };
        if let Some(step) = step {
            run.await_report(step, call.tool);
        }
        let calls = run.calls.entry(call.tool.to_owned()).or_default();
        *calls = calls.saturating_add(1);
        if let Some((field, _)) = &tool.max_items
            && let Value::Object(args) = call.arguments
        {
            let items = item_count(args, field).unwrap_or(0);
            let used = run.items.entry(call.tool.to_owned()).or_default();
            *used = used.saturating_add(items);
        }
    }

    /// Records usage reported after a call; returns the ceiling it breached, if any. A breach
    /// halts the run. Check what an agent sends with [`Usage::check`] first; whatever gets here,
    /// the sums saturate instead of overflowing and a negative cost counts as nothing, so no
    /// report can panic or buy budget back.
    pub fn report(
        &self,
        usage: &Usage,
        run: &mut RunState,
        window: &mut WindowState,
        now: Timestamp,
    ) -> Option<Ceiling> {
        run.tokens = run.tokens.saturating_add(usage.tokens);
        run.cost = add_cost(run.cost, usage.cost);
        if self.budget.window.is_some() && usage.cost > rust_decimal::Decimal::ZERO {
            window.costs.push((now, usage.cost));
        }
        let breach = match (&self.budget.max_tokens, &self.budget.max_cost) {
            (Some(limit), _) if run.tokens > *limit => {
                Some(Ceiling::MaxTokensPerRun { limit: *limit })
            }
            (_, Some(limit)) if run.cost > *limit => Some(Ceiling::MaxCostUsd { limit: *limit }),
            _ => None,
        };
        if let Some(ceiling) = &breach
            && run.halted.is_none()
        {
            run.halted = Some(ceiling.clone());
        }
        breach
    }

    /// Whether a breach of this policy's ceilings should also engage the agent's kill switch.
    pub fn breach_engages_kill_switch(&self) -> bool {
        self.budget.engage_kill_switch
    }

    /// Notification targets for a breach.
    pub fn breach_notify(&self) -> &[String] {
        &self.budget.notify
    }
}

/// The items an array holds, counting the items of nested arrays one by one: `[[a, b], c]` is
/// three, so nesting cannot make many items look like one.
pub(crate) fn leaf_count(items: &[Value]) -> u64 {
    items.iter().fold(0u64, |n, item| match item {
        Value::Array(inner) => n.saturating_add(leaf_count(inner)),
        _ => n.saturating_add(1),
    })
}

fn item_count(args: &Map<String, Value>, field: &str) -> Result<u64, Refusal> {
    match args.get(field) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Array(items)) => Ok(leaf_count(items)),
        Some(_) => Err((
            DenyCode::ArgumentConstraint,
            "limits.maxItemsPerRun".into(),
            format!("argument {field:?} must be an array"),
        )),
    }
}

fn check_arguments(tool: &CompiledTool, args: &Map<String, Value>) -> Result<(), Refusal> {
    for field in &tool.required {
        if !args.contains_key(field) {
            return Err((
                DenyCode::MissingArgument,
                "arguments.fields".into(),
                format!("argument {field:?} is required"),
            ));
        }
    }
    for (field, value) in args {
        match tool.fields.get(field) {
            Some(check) => check_field(FieldPath::Field(field), check, value)?,
            None if tool.additional == AdditionalFields::Deny => {
                return Err((
                    DenyCode::UnknownArgument,
                    "arguments.additionalFields".into(),
                    format!("argument {field:?} is not allowed for tool {}", tool.name),
                ));
            }
            None => {}
        }
    }
    Ok(())
}

/// Where a checked value sits in the arguments: a field, or an item of an array of one, as in
/// `order_ids[3]`. Only written out when a value is refused, so an allowed call allocates nothing
/// for it.
#[derive(Clone, Copy)]
enum FieldPath<'a> {
    Field(&'a str),
    Item(&'a FieldPath<'a>, usize),
}

impl std::fmt::Display for FieldPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FieldPath::Field(name) => write!(f, "{}", name.escape_debug()),
            FieldPath::Item(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

/// The refusal of the value at `path`, its message formatted once.
fn refuse(path: FieldPath<'_>, message: std::fmt::Arguments<'_>) -> Result<(), Refusal> {
    use std::fmt::Write as _;
    // One buffer big enough for most messages, instead of format!'s growth from a guess.
    let mut text = String::with_capacity(96);
    let _ = write!(text, "argument \"{path}\" {message}");
    Err((
        DenyCode::ArgumentConstraint,
        Cow::Borrowed("arguments.fields"),
        text,
    ))
}

/// The allowed values of an enum, comma-separated, written without a joined copy.
struct OneOf<'a>(&'a [String]);

impl std::fmt::Display for OneOf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, value) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(value)?;
        }
        Ok(())
    }
}

fn check_field(path: FieldPath<'_>, check: &FieldCheck, value: &Value) -> Result<(), Refusal> {
    if let Some(expected) = check.type_ {
        let matches = match expected {
            JsonType::String => value.is_string(),
            JsonType::Integer => {
                value.is_i64()
                    || value.is_u64()
                    || value
                        .as_f64()
                        .is_some_and(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
            }
            JsonType::Number => value.is_number(),
            JsonType::Boolean => value.is_boolean(),
            JsonType::Array => value.is_array(),
            JsonType::Object => value.is_object(),
        };
        if !matches {
            return refuse(
                path,
                format_args!("must be of type {}", json_type_name(expected)),
            );
        }
    }
    if let Some(allowed) = &check.enum_ {
        match value.as_str() {
            Some(s) if allowed.iter().any(|a| a == s) => {}
            _ => return refuse(path, format_args!("must be one of {}", OneOf(allowed))),
        }
    }
    if let Some((regex, source)) = &check.pattern {
        match value.as_str() {
            Some(s) if regex.is_match(s) => {}
            _ => return refuse(path, format_args!("must match {source}")),
        }
    }
    if check.minimum.is_some() || check.maximum.is_some() {
        let Some(number) = value.as_f64() else {
            return refuse(path, format_args!("must be a number"));
        };
        if let Some(min) = check.minimum
            && number < min
        {
            return refuse(path, format_args!("must be at least {min}"));
        }
        if let Some(max) = check.maximum
            && number > max
        {
            return refuse(path, format_args!("must be at most {max}"));
        }
    }
    if let Some(max) = check.max_length {
        match value.as_str() {
            Some(s) if s.chars().count() as u64 <= max => {}
            _ => {
                return refuse(
                    path,
                    format_args!("must be a string of at most {max} characters"),
                );
            }
        }
    }
    if let Some(max) = check.max_items {
        match value.as_array() {
            Some(items) if leaf_count(items) <= max => {}
            _ => {
                return refuse(
                    path,
                    format_args!(
                        "must be an array of at most {max} items (items of nested arrays count one by one)"
                    ),
                );
            }
        }
    }
    if let Some(item_check) = &check.items
        && let Some(items) = value.as_array()
    {
        for (i, item) in items.iter().enumerate() {
            check_field(FieldPath::Item(&path, i), item_check, item)?;
        }
    }
    Ok(())
}

fn json_type_name(t: JsonType) -> &'static str {
    match t {
        JsonType::String => "string",
        JsonType::Integer => "integer",
        JsonType::Number => "number",
        JsonType::Boolean => "boolean",
        JsonType::Array => "array",
        JsonType::Object => "object",
    }
}

fn check_condition(
    condition: &Condition,
    call: &ToolCall<'_>,
    run: &RunState,
    agent: &Agent<'_>,
) -> Result<bool, String> {
    let run = if condition.uses_run() {
        run_variable(call.run_id, run)
    } else {
        Value::Null
    };
    let agent = if condition.uses_agent() {
        agent_variable(agent)
    } else {
        Value::Null
    };
    condition.evaluate(call.arguments, &run, &agent)
}

fn run_variable(run_id: &str, run: &RunState) -> Value {
    json!({
        "id": run_id,
        "step": run.steps + 1,
        "tokens": run.tokens,
        "cost": run.cost.to_string(),
        "calls": run.calls,
        "items": run.items,
    })
}

fn agent_variable(agent: &Agent<'_>) -> Value {
    json!({"name": agent.name, "namespace": agent.namespace, "username": agent.username})
}

/// Redacts a tool result to the fields a policy lets the agent see. Objects keep only the listed
/// top-level fields; arrays are redacted item by item; any other result is withheld whole.
/// Returns the redacted result and the removed field names, sorted.
pub fn redact(result: &Value, fields: &[String]) -> (Value, Vec<String>) {
    let mut removed = std::collections::BTreeSet::new();
    let redacted = redact_into(result, fields, &mut removed);
    (redacted, removed.into_iter().collect())
}

fn redact_into(
    result: &Value,
    fields: &[String],
    removed: &mut std::collections::BTreeSet<String>,
) -> Value {
    match result {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(key, _)| {
                    let keep = fields.iter().any(|f| f == *key);
                    if !keep {
                        removed.insert((*key).clone());
                    }
                    keep
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| redact_into(item, fields, removed))
                .collect(),
        ),
        _ => {
            removed.insert("(result)".to_owned());
            Value::Null
        }
    }
}
