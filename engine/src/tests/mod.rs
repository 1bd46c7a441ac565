//! Table tests for every clause of the engine, written with small builders (here), one file per
//! part of the engine, and the attacks of SECURITY.md points 2 and 3 as named tests.

mod budget;
mod children;
mod compile;
mod evaluate;
mod graduation;
mod properties;
mod writes;

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tollgate_crds::AgentPolicy;
use tollgate_crds::policy::{Autonomy, Operation};

use crate::admission::{self, ApiWrite};
use crate::budget::{Ceiling, RunState, Usage, WindowState};
use crate::compile::CompiledPolicy;
use crate::decision::{Decision, DenyCode};
use crate::evaluate::{Agent, ToolCall, redact};
use crate::graduation::TrackRecord;

const AGENT: Agent<'static> = Agent {
    name: "support",
    namespace: "ns",
    username: "system:serviceaccount:ns:agent-support",
    killed: false,
};

pub(crate) fn now() -> Timestamp {
    "2026-11-25T12:00:00Z".parse().unwrap()
}

/// A policy from a spec fragment merged over a minimal valid spec.
pub(crate) fn policy_with(spec: Value) -> Result<CompiledPolicy, crate::CompileErrors> {
    let mut base = json!({"identityRef": {"name": "support"}, "upstreams": [{"name": "crm"}], "tools": {"allowed": [], "blocked": []}});
    merge(&mut base, spec);
    let policy: AgentPolicy = serde_json::from_value(json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentPolicy",
        "metadata": {"name": "support", "namespace": "ns", "generation": 4},
        "spec": base,
    }))
    .expect("the test spec deserialises");
    CompiledPolicy::compile(&policy)
}

fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                merge(target.entry(key).or_insert(Value::Null), value);
            }
        }
        (target, patch) => *target = patch,
    }
}

pub(crate) fn policy(spec: Value) -> CompiledPolicy {
    policy_with(spec).unwrap_or_else(|e| panic!("{e}"))
}

/// A policy allowing the given tools.
pub(crate) fn tools(allowed: Value) -> CompiledPolicy {
    policy(json!({"tools": {"allowed": allowed, "blocked": ["delete_customer_record"]}}))
}

pub(crate) fn call<'a>(tool: &'a str, arguments: &'a Value) -> ToolCall<'a> {
    ToolCall {
        run_id: "run-1",
        tool,
        arguments,
    }
}

pub(crate) fn decide(policy: &CompiledPolicy, tool: &str, arguments: Value) -> Decision {
    policy.evaluate(
        &AGENT,
        &call(tool, &arguments),
        &RunState::default(),
        &WindowState::default(),
        now(),
    )
}

/// Evaluates and records, as the gateway does.
fn step(
    policy: &CompiledPolicy,
    run_id: &str,
    tool: &str,
    arguments: Value,
    run: &mut RunState,
    window: &mut WindowState,
    at: Timestamp,
) -> Decision {
    let call = ToolCall {
        run_id,
        tool,
        arguments: &arguments,
    };
    let decision = policy.evaluate(&AGENT, &call, run, window, at);
    policy.record(&call, &decision, run, window, at);
    decision
}

fn code(decision: &Decision) -> Option<DenyCode> {
    decision.deny_code()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
