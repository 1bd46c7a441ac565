//! Table tests for every clause of the engine, written with small builders, and the attacks of
//! SECURITY.md points 2 and 3 as named tests.

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

#[test]
fn compiled_policies_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CompiledPolicy>();
}

#[test]
fn the_samples_compile() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/samples");
    for file in ["support-agent.yaml", "deploy-agent.yaml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document).unwrap();
            if value["kind"] == "AgentPolicy" {
                let policy: AgentPolicy = serde_yaml::from_value(value).unwrap();
                CompiledPolicy::compile(&policy).unwrap_or_else(|e| panic!("{file}: {e}"));
            }
        }
    }
    use serde::Deserialize;
}

#[test]
fn compile_reports_every_problem_with_its_path() {
    let errors = policy_with(json!({
        "upstreams": [{"name": "crm"}, {"name": "crm"}],
        "tools": {
            "allowed": [
                {"name": "a", "upstream": "billing"},
                {"name": "b", "irreversible": true},
                {"name": "c", "arguments": {"fields": {"x": {"type": "integer", "pattern": "("}}}},
                {"name": "d", "when": "args.x ==", "autonomy": "Gated"},
                {"name": "e", "limits": {"maxItemsPerRun": {"field": "ids", "max": 0}}},
                {"name": "bad name"},
                {"name": "blocked_too"}
            ],
            "blocked": ["blocked_too"]
        },
        "execution": {"maxSteps": 0, "maxCostUSD": "-1", "perIdentity": {"window": "1d"}},
        "kubernetes": {"freezeWindows": [{"start": "2026-12-02T00:00:00Z", "end": "2026-12-01T00:00:00Z"}]}
    }))
    .unwrap_err();
    let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
    for expected in [
        "spec.upstreams[1].name",
        "spec.tools.allowed[0].upstream",
        "spec.tools.allowed[1].approval",
        "spec.tools.allowed[2].arguments.fields.x.pattern",
        "spec.tools.allowed[3].when",
        "spec.tools.allowed[3].autonomy",
        "spec.tools.allowed[4].limits.maxItemsPerRun.field",
        "spec.tools.allowed[4].limits.maxItemsPerRun.max",
        "spec.tools.allowed[5].name",
        "spec.tools.allowed[6].name",
        "spec.execution.maxSteps",
        "spec.execution.maxCostUSD",
        "spec.execution.perIdentity.window",
        "spec.kubernetes.freezeWindows[0].end",
    ] {
        assert!(
            paths.contains(&expected),
            "no error at {expected}; got:\n{errors}"
        );
    }
    assert!(
        errors
            .0
            .iter()
            .all(|e| !e.message.is_empty() && !e.hint.is_empty())
    );
    assert!(
        errors.to_string().contains("invalid regular expression"),
        "{errors}"
    );
}

#[test]
fn the_policy_hash_follows_the_spec_and_nothing_else() {
    let a = tools(json!([{"name": "read"}]));
    let b = tools(json!([{"name": "read"}]));
    let c = tools(json!([{"name": "read2"}]));
    assert_eq!(a.hash(), b.hash());
    assert_ne!(a.hash(), c.hash());
    assert!(a.hash().starts_with("sha256:"));
}

#[test]
fn tool_rules() {
    let p = tools(json!([{"name": "read_customer_record"}]));
    let cases: &[(&str, Option<DenyCode>)] = &[
        ("read_customer_record", None),
        ("delete_customer_record", Some(DenyCode::ToolBlocked)),
        ("drop_database", Some(DenyCode::ToolNotAllowed)),
        ("", Some(DenyCode::ToolNotAllowed)),
    ];
    for (tool, expected) in cases {
        let decision = decide(&p, tool, json!({}));
        assert_eq!(code(&decision), *expected, "{tool}: {decision:?}");
    }
    let Decision::Deny { rule, message, .. } = decide(&p, "delete_customer_record", json!({}))
    else {
        panic!()
    };
    assert_eq!(rule.clause, "spec.tools.blocked");
    assert_eq!(&*rule.policy, "ns/support");
    assert_eq!(rule.generation, Some(4));
    assert!(message.contains("blocked by policy"));
    let p = tools(json!([{"name": "t", "arguments": {"fields": {"n": {"type": "integer"}}}}]));
    let Decision::Deny { rule, .. } = decide(&p, "t", json!({"n": "x"})) else {
        panic!()
    };
    assert_eq!(rule.clause, "spec.tools.allowed[t].arguments.fields");
    assert_eq!(rule.tool.as_deref(), Some("t"));
}

#[test]
fn argument_rules() {
    let p = tools(json!([
        {"name": "t", "arguments": {"fields": {
            "id": {"type": "string", "required": true, "pattern": "C[0-9]{6}"},
            "status": {"type": "string", "enum": ["cancelled", "refunded"]},
            "n": {"type": "integer", "minimum": 1, "maximum": 10},
            "ratio": {"type": "number", "maximum": 0.5},
            "note": {"type": "string", "maxLength": 5},
            "ids": {"type": "array", "maxItems": 2},
            "flag": {"type": "boolean"},
            "meta": {"type": "object"}
        }}},
        {"name": "open", "arguments": {"additionalFields": "Allow", "fields": {"id": {"type": "string"}}}}
    ]));
    let cases: Vec<(&str, Value, Option<DenyCode>)> = vec![
        (
            "all valid",
            json!({"id": "C123456", "status": "refunded", "n": 10, "ratio": 0.5, "note": "héllo", "ids": [1, 2], "flag": true, "meta": {}}),
            None,
        ),
        ("only required", json!({"id": "C123456"}), None),
        (
            "missing required",
            json!({"status": "refunded"}),
            Some(DenyCode::MissingArgument),
        ),
        (
            "unknown field",
            json!({"id": "C123456", "extra": 1}),
            Some(DenyCode::UnknownArgument),
        ),
        (
            "pattern is anchored",
            json!({"id": "xC123456"}),
            Some(DenyCode::ArgumentConstraint),
        ),
        (
            "pattern suffix",
            json!({"id": "C1234567"}),
            Some(DenyCode::ArgumentConstraint),
        ),
        (
            "pattern on a number",
            json!({"id": 123456}),
            Some(DenyCode::ArgumentConstraint),
        ),
        (
            "enum",
            json!({"id": "C123456", "status": "deleted"}),
            Some(DenyCode::ArgumentConstraint),
        ),
        (
            "enum case",
            json!({"id": "C123456", "status": "Refunded"}),
            Some(DenyCode::ArgumentConstraint),
        ),
        (
            "below minimum",
            json!({"id": "C123456", "n": 0}),
            Some(DenyCode::ArgumentConstraint),
        ),
        (
            "above maximum",
            json!({"id": "C123456", "n": 11}),
            Some(DenyCode::ArgumentConstraint),
        ),
        (
            "integer with fraction",
            json!({"id": "C123456", "n": 2.5}),
            Some(DenyCode::ArgumentConstraint),
        ),
        (
            "integer as string",
            json!({"id": "C123456", "n": "5"}),
            Some(DenyCode::ArgumentConstraint),
        ),
        (
            "number above maximum",
            json!({"id": "C123456", "ratio": 0.51}),
            Some(DenyCode::ArgumentConstraint),
        ),
        (
            "too long",
            json!({"id": "C123456", "note": "toolong"}),
            Some(DenyCode::ArgumentConstraint),
        ),
        (
            "too many items",
            json!({"id": "C123456", "ids": [1, 2, 3]}),
            Some(DenyCode::ArgumentConstraint),
        ),
        (
            "bool as string",
            json!({"id": "C123456", "flag": "true"}),
            Some(DenyCode::ArgumentConstraint),
        ),
        (
            "object as array",
            json!({"id": "C123456", "meta": []}),
            Some(DenyCode::ArgumentConstraint),
        ),
        (
            "null for a typed field",
            json!({"id": "C123456", "n": null}),
            Some(DenyCode::ArgumentConstraint),
        ),
        (
            "not an object",
            json!(["C123456"]),
            Some(DenyCode::MalformedArguments),
        ),
        (
            "string arguments",
            json!("{\"id\":\"C123456\"}"),
            Some(DenyCode::MalformedArguments),
        ),
    ];
    for (what, arguments, expected) in cases {
        let decision = decide(&p, "t", arguments);
        assert_eq!(code(&decision), expected, "{what}: {decision:?}");
    }
    assert!(
        decide(&p, "open", json!({"id": "x", "anything": [1]})).is_allowed(),
        "additionalFields Allow"
    );
    assert_eq!(
        code(&decide(&p, "open", json!({"id": 1}))),
        Some(DenyCode::ArgumentConstraint),
        "declared fields are still checked"
    );
    let Decision::Deny { message, .. } =
        decide(&p, "t", json!({"id": "C123456", "status": "deleted"}))
    else {
        panic!()
    };
    assert_eq!(
        message,
        "argument \"status\" must be one of cancelled, refunded"
    );
}

#[test]
fn per_run_limits_count_across_calls() {
    let p = tools(
        json!([{"name": "update", "arguments": {"fields": {"ids": {"type": "array"}}},
        "limits": {"maxCallsPerRun": 3, "maxItemsPerRun": {"field": "ids", "max": 5}}}]),
    );
    let (mut run, mut window) = (RunState::default(), WindowState::default());
    let mut outcomes = Vec::new();
    for ids in [
        json!(["a", "b"]),
        json!(["c", "d"]),
        json!(["e", "f"]),
        json!(["e"]),
        json!([]),
    ] {
        outcomes.push(code(&step(
            &p,
            "run-1",
            "update",
            json!({"ids": ids}),
            &mut run,
            &mut window,
            now(),
        )));
    }
    // 2 + 2 items pass; 2 more would make 6 > 5; 1 more makes 5; then the 4th call hits maxCallsPerRun.
    assert_eq!(
        outcomes,
        vec![
            None,
            None,
            Some(DenyCode::ItemLimit),
            None,
            Some(DenyCode::CallLimit)
        ]
    );
    assert_eq!(run.calls["update"], 3);
    assert_eq!(run.items["update"], 5);
    assert_eq!(run.steps, 5, "denied calls are steps too");
}

#[test]
fn when_conditions_gate_calls_and_fail_closed() {
    let p = tools(
        json!([{"name": "update", "arguments": {"additionalFields": "Allow"},
        "when": "args.order_ids.all(id, id.startsWith('O-')) && agent.name == 'support' && run.step <= 2"}]),
    );
    assert!(decide(&p, "update", json!({"order_ids": ["O-1", "O-2"]})).is_allowed());
    assert_eq!(
        code(&decide(&p, "update", json!({"order_ids": ["O-1", "X-2"]}))),
        Some(DenyCode::ConditionFailed)
    );
    assert_eq!(
        code(&decide(&p, "update", json!({}))),
        Some(DenyCode::ConditionError),
        "a condition that cannot be evaluated denies"
    );
    let mut run = RunState {
        steps: 2,
        ..RunState::default()
    };
    let arguments = json!({"order_ids": ["O-1"]});
    let decision = p.evaluate(
        &AGENT,
        &call("update", &arguments),
        &run,
        &WindowState::default(),
        now(),
    );
    assert_eq!(
        code(&decision),
        Some(DenyCode::ConditionFailed),
        "run.step is the step being evaluated"
    );
    run.steps = 0;
    assert!(
        p.evaluate(
            &AGENT,
            &call("update", &arguments),
            &run,
            &WindowState::default(),
            now()
        )
        .is_allowed()
    );
}

#[test]
fn autonomy_modes_and_irreversible_tools() {
    let approval =
        json!({"approvers": {"groups": ["leads"]}, "minApprovals": 2, "timeoutSeconds": 60});
    let p = tools(json!([
        {"name": "gated", "approval": approval},
        {"name": "exception", "approval": approval, "autonomy": "ExceptionBased",
         "arguments": {"fields": {"env": {"type": "string"}, "ids": {"type": "array"}}},
         "escalateWhen": "args.env == 'production'", "limits": {"maxItemsPerRun": {"field": "ids", "max": 2}}},
        {"name": "audited", "approval": approval, "autonomy": "AuditBased"},
        {"name": "irreversible", "approval": approval, "autonomy": "AuditBased", "irreversible": true},
        {"name": "plain"}
    ]));
    let approval_reason = |d: &Decision| match d {
        Decision::RequireApproval { approval, .. } => Some(approval.reason.clone()),
        _ => None,
    };
    let gated = decide(&p, "gated", json!({}));
    let Decision::RequireApproval {
        approval: requirement,
        ..
    } = &gated
    else {
        panic!("{gated:?}")
    };
    assert_eq!(
        (requirement.min_approvals, requirement.timeout),
        (2, Duration::from_secs(60))
    );
    assert_eq!(requirement.approvers.groups, vec!["leads"]);
    assert!(requirement.reason.contains("Gated"));

    assert!(decide(&p, "exception", json!({"env": "staging"})).is_allowed());
    assert!(
        approval_reason(&decide(&p, "exception", json!({"env": "production"})))
            .unwrap()
            .contains("escalateWhen holds")
    );
    assert!(
        approval_reason(&decide(
            &p,
            "exception",
            json!({"env": "staging", "ids": [1, 2, 3]})
        ))
        .unwrap()
        .contains("approval is needed to go past it"),
        "a boundary asks instead of denying"
    );

    assert_eq!(
        decide(&p, "audited", json!({})),
        Decision::Allow {
            rule: decide(&p, "audited", json!({})).rule().clone(),
            review: true
        }
    );
    assert!(
        approval_reason(&decide(&p, "irreversible", json!({})))
            .unwrap()
            .contains("irreversible"),
        "irreversible always waits, whatever the autonomy"
    );
    assert!(decide(&p, "plain", json!({})).is_allowed());
}

#[test]
fn approvals_bind_to_the_exact_arguments() {
    let p = tools(
        json!([{"name": "send", "irreversible": true, "approval": {"approvers": {"users": ["alice"]}},
        "arguments": {"additionalFields": "Allow"}}]),
    );
    let digest = |arguments: Value| match decide(&p, "send", arguments) {
        Decision::RequireApproval { approval, .. } => approval.arguments_digest,
        other => panic!("{other:?}"),
    };
    let a = digest(json!({"to": "C000001", "body": "hi", "cc": ["x", "y"]}));
    assert_eq!(
        a,
        digest(json!({"cc": ["x", "y"], "body": "hi", "to": "C000001"})),
        "key order does not matter"
    );
    assert_eq!(
        a,
        crate::canonical::digest(&json!({"to": "C000001", "body": "hi", "cc": ["x", "y"]}))
    );
    for changed in [
        json!({"to": "C000002", "body": "hi", "cc": ["x", "y"]}),
        json!({"to": "C000001", "body": "hi ", "cc": ["x", "y"]}),
        json!({"to": "C000001", "body": "hi", "cc": ["y", "x"]}),
        json!({"to": "C000001", "body": "hi", "cc": ["x", "y"], "bcc": "z"}),
    ] {
        assert_ne!(a, digest(changed.clone()), "{changed}");
    }
}

#[test]
fn run_ceilings_halt_and_stay_halted() {
    let p = policy(json!({"tools": {"allowed": [{"name": "t"}]},
        "execution": {"maxSteps": 3, "maxTokensPerRun": 100, "maxWallClockSeconds": 60, "maxCostUSD": "1.00"}}));
    let (mut run, mut window) = (RunState::default(), WindowState::default());
    for _ in 0..3 {
        assert!(step(&p, "r", "t", json!({}), &mut run, &mut window, now()).is_allowed());
    }
    let halted = step(&p, "r", "t", json!({}), &mut run, &mut window, now());
    assert!(
        matches!(
            halted,
            Decision::Halt {
                ceiling: Ceiling::MaxSteps { limit: 3 },
                ..
            }
        ),
        "{halted:?}"
    );
    assert_eq!(halted.rule().clause, "spec.execution.maxSteps");
    // Halted means halted: an allowed tool, a retry, or a reset of the step counter does not help.
    run.steps = 0;
    assert!(matches!(
        step(&p, "r", "t", json!({}), &mut run, &mut window, now()),
        Decision::Halt {
            ceiling: Ceiling::MaxSteps { .. },
            ..
        }
    ));

    let cases: Vec<(&str, RunState, Timestamp, Ceiling)> = vec![
        (
            "tokens",
            RunState {
                tokens: 100,
                ..RunState::default()
            },
            now(),
            Ceiling::MaxTokensPerRun { limit: 100 },
        ),
        (
            "cost",
            RunState {
                cost: Decimal::new(100, 2),
                ..RunState::default()
            },
            now(),
            Ceiling::MaxCostUsd {
                limit: Decimal::new(100, 2),
            },
        ),
        (
            "wall clock",
            RunState {
                started_at: Some(now()),
                ..RunState::default()
            },
            now() + jiff::SignedDuration::from_secs(60),
            Ceiling::MaxWallClockSeconds { limit: 60 },
        ),
    ];
    for (what, run, at, expected) in cases {
        let decision = p.evaluate(
            &AGENT,
            &call("t", &json!({})),
            &run,
            &WindowState::default(),
            at,
        );
        assert!(
            matches!(&decision, Decision::Halt { ceiling, .. } if *ceiling == expected),
            "{what}: {decision:?}"
        );
    }
}

#[test]
fn reported_usage_halts_the_run_on_breach() {
    let p = policy(
        json!({"tools": {"allowed": [{"name": "t"}]}, "execution": {"maxTokensPerRun": 100, "maxCostUSD": "0.10"}}),
    );
    let (mut run, mut window) = (RunState::default(), WindowState::default());
    assert_eq!(
        p.report(
            &Usage {
                tokens: 60,
                cost: Decimal::new(5, 2)
            },
            &mut run,
            &mut window,
            now()
        ),
        None
    );
    assert!(step(&p, "r", "t", json!({}), &mut run, &mut window, now()).is_allowed());
    let breach = p.report(
        &Usage {
            tokens: 0,
            cost: Decimal::new(6, 2),
        },
        &mut run,
        &mut window,
        now(),
    );
    assert_eq!(
        breach,
        Some(Ceiling::MaxCostUsd {
            limit: Decimal::new(10, 2)
        })
    );
    assert!(matches!(
        step(&p, "r", "t", json!({}), &mut run, &mut window, now()),
        Decision::Halt {
            ceiling: Ceiling::MaxCostUsd { .. },
            ..
        }
    ));
    assert_eq!(
        run.cost.to_string(),
        "0.11",
        "costs are decimals, never floats"
    );
}

#[test]
fn attack_rotating_run_ids_resets_nothing() {
    let p = policy(json!({"tools": {"allowed": [{"name": "t"}]},
        "execution": {"maxSteps": 1, "perIdentity": {"window": "1h", "maxRuns": 3, "maxCostUSD": "1.00"}}}));
    let mut window = WindowState::default();
    let mut allowed = 0;
    for i in 0..10 {
        let mut run = RunState::default();
        if step(
            &p,
            &format!("run-{i}"),
            "t",
            json!({}),
            &mut run,
            &mut window,
            now(),
        )
        .is_allowed()
        {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 3, "only maxRuns new runs per window");
    let later = now() + jiff::SignedDuration::from_secs(3601);
    assert!(
        step(
            &p,
            "run-late",
            "t",
            json!({}),
            &mut RunState::default(),
            &mut window,
            later
        )
        .is_allowed(),
        "the window slides"
    );

    let mut window = WindowState::default();
    let mut run = RunState::default();
    assert!(step(&p, "a", "t", json!({}), &mut run, &mut window, now()).is_allowed());
    p.report(
        &Usage {
            tokens: 0,
            cost: Decimal::ONE,
        },
        &mut run,
        &mut window,
        now(),
    );
    let fresh = step(
        &p,
        "b",
        "t",
        json!({}),
        &mut RunState::default(),
        &mut window,
        now(),
    );
    assert!(
        matches!(
            fresh,
            Decision::Halt {
                ceiling: Ceiling::WindowMaxCostUsd { .. },
                ..
            }
        ),
        "{fresh:?}"
    );
}

#[test]
fn attack_splitting_a_large_call_into_small_ones() {
    let p = tools(
        json!([{"name": "update", "arguments": {"fields": {"ids": {"type": "array", "maxItems": 10}}},
        "limits": {"maxItemsPerRun": {"field": "ids", "max": 10}}}]),
    );
    let (mut run, mut window) = (RunState::default(), WindowState::default());
    let mut touched = 0;
    for i in 0..50 {
        let ids = json!([format!("O-{i}")]);
        if step(
            &p,
            "r",
            "update",
            json!({"ids": ids}),
            &mut run,
            &mut window,
            now(),
        )
        .is_allowed()
        {
            touched += 1;
        }
    }
    assert_eq!(touched, 10);
}

#[test]
fn attack_retrying_after_a_halt() {
    let p = policy(
        json!({"tools": {"allowed": [{"name": "t"}, {"name": "u"}]}, "execution": {"maxTokensPerRun": 10}}),
    );
    let (mut run, mut window) = (RunState::default(), WindowState::default());
    p.report(
        &Usage {
            tokens: 11,
            cost: Decimal::ZERO,
        },
        &mut run,
        &mut window,
        now(),
    );
    for tool in ["t", "u", "t", "unknown"] {
        let decision = step(&p, "r", tool, json!({}), &mut run, &mut window, now());
        assert!(
            matches!(
                decision,
                Decision::Halt {
                    ceiling: Ceiling::MaxTokensPerRun { limit: 10 },
                    ..
                }
            ),
            "{tool}: {decision:?}"
        );
    }
}

#[test]
fn attack_blocked_names_in_disguise() {
    let p = tools(json!([{"name": "read_customer_record"}]));
    let disguises = [
        "DELETE_CUSTOMER_RECORD",
        "Delete_Customer_Record",
        "delete_customer_record ",
        " delete_customer_record",
        "delete_customer_record\n",
        "delete_customer_record\u{0000}",
        "delete_customer_record\u{200b}",
        "delete\u{00ad}_customer_record",
        "d\u{0435}lete_customer_record",
        "ｄｅｌｅｔｅ_customer_record",
        "delete_customer_recor\u{0064}\u{0307}",
        "delete_customer_record_v2",
        "x_delete_customer_record",
        "delete_customer",
        "delete_customer_record/../read_customer_record",
        "read_customer_record\u{0000}",
        "read_customer_record ",
        "READ_CUSTOMER_RECORD",
        "r\u{0435}ad_customer_record",
        "\\u0064elete_customer_record",
    ];
    for name in disguises {
        let decision = decide(&p, name, json!({}));
        assert!(!decision.is_allowed(), "{name:?} was allowed: {decision:?}");
        assert!(
            matches!(
                code(&decision),
                Some(DenyCode::ToolNotAllowed | DenyCode::ToolBlocked)
            ),
            "{name:?}: {decision:?}"
        );
    }
}

#[test]
fn attack_json_tricks_in_arguments() {
    let p = tools(json!([{"name": "update", "arguments": {"fields": {
        "status": {"type": "string", "enum": ["cancelled"]},
        "count": {"type": "integer", "maximum": 10}
    }}}]));
    let strict = |text: &str| crate::canonical::parse_strict(text.as_bytes());
    // Duplicate keys never reach evaluation: the strict parser refuses them.
    assert!(strict(r#"{"status":"cancelled","status":"deleted"}"#).is_err());
    assert!(strict(r#"{"status":"deleted","\u0073tatus":"cancelled"}"#).is_err());
    let cases = [
        r#"{"status":"cancelled","count":1e20}"#,
        r#"{"status":"cancelled","count":18446744073709551616}"#,
        r#"{"status":"cancelled","count":-99999999999999999999}"#,
        r#"{"status":"cancelled","count":10.0000001}"#,
        r#"{"status":["cancelled"]}"#,
        r#"{"status":{"status":"cancelled"}}"#,
        r#"{"status":"cancelled\u0000"}"#,
        r#"{"status":"Cancelled"}"#,
        r#"{"status":"cancelled","Status":"deleted"}"#,
        r#"{"status":"cancelled","nested":{"tool":"delete_customer_record"}}"#,
    ];
    for text in cases {
        let arguments = strict(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let decision = decide(&p, "update", arguments);
        assert!(!decision.is_allowed(), "{text} was allowed");
    }
    let deep = format!(
        "{{\"status\":\"cancelled\",\"x\":{}1{}}}",
        "[".repeat(200),
        "]".repeat(200)
    );
    assert!(
        strict(&deep).is_err(),
        "deep nesting is refused before evaluation"
    );
}

#[test]
fn kill_switch_denies_everything() {
    let p = tools(json!([{"name": "t"}]));
    let killed = Agent {
        killed: true,
        ..AGENT
    };
    let decision = p.evaluate(
        &killed,
        &call("t", &json!({})),
        &RunState::default(),
        &WindowState::default(),
        now(),
    );
    assert_eq!(code(&decision), Some(DenyCode::KillSwitch));
    let none = crate::deny_without_policy("policy support failed to compile");
    assert_eq!(code(&none), Some(DenyCode::NoPolicy));
    let invalid = crate::deny_invalid_policy("policy support failed to compile");
    assert_eq!(code(&invalid), Some(DenyCode::PolicyInvalid));
    assert!(
        matches!(&invalid, Decision::Deny { message, .. } if message.contains("failed to compile")),
        "{invalid:?}"
    );
}

#[test]
fn results_are_redacted_to_result_fields() {
    let fields = vec!["customer_id".to_owned(), "orders".to_owned()];
    let cases = [
        (
            json!({"customer_id": "C1", "orders": [1], "ssn": "x", "card": "y"}),
            json!({"customer_id": "C1", "orders": [1]}),
            vec!["card", "ssn"],
        ),
        (
            json!([{"customer_id": "C1", "ssn": "x"}, {"orders": []}]),
            json!([{"customer_id": "C1"}, {"orders": []}]),
            vec!["ssn"],
        ),
        (
            json!("raw text with secrets"),
            Value::Null,
            vec!["(result)"],
        ),
        (json!({}), json!({}), vec![]),
    ];
    for (result, want, removed) in cases {
        assert_eq!(
            redact(&result, &fields),
            (
                want,
                removed.into_iter().map(String::from).collect::<Vec<_>>()
            )
        );
    }
    let p = tools(json!([{"name": "read", "resultFields": ["customer_id"]}, {"name": "open"}]));
    assert_eq!(
        p.result_fields("read"),
        Some(&["customer_id".to_owned()][..])
    );
    assert_eq!(p.result_fields("open"), None);
}

#[test]
fn graduation_reports_eligibility_only() {
    let approval = json!({"approvers": {"groups": ["leads"]}});
    let p = policy(json!({"tools": {"allowed": [
        {"name": "gated", "approval": approval},
        {"name": "exception", "approval": approval, "autonomy": "ExceptionBased"},
        {"name": "audited", "approval": approval, "autonomy": "AuditBased"},
        {"name": "irreversible", "approval": approval, "irreversible": true},
        {"name": "plain"}
    ]}, "graduation": {"cleanCompletions": 200, "maxIncidents": 1, "window": "720h"}}));
    let record = |clean, incidents| TrackRecord {
        clean_completions: clean,
        incidents,
        not_run: 0,
    };
    let cases = [
        ("gated", record(200, 1), Some(Autonomy::ExceptionBased)),
        ("gated", record(199, 0), None),
        ("gated", record(500, 2), None),
        ("exception", record(200, 0), Some(Autonomy::AuditBased)),
        ("audited", record(1000, 0), None),
        ("irreversible", record(1000, 0), None),
        ("plain", record(1000, 0), None),
        ("unknown", record(1000, 0), None),
    ];
    for (tool, record, expected) in cases {
        assert_eq!(p.eligible_for(tool, record), expected, "{tool} {record:?}");
    }
    assert_eq!(p.graduation_window(), Some(Duration::from_secs(720 * 3600)));
    assert_eq!(
        tools(json!([{"name": "gated", "approval": approval}]))
            .eligible_for("gated", record(1000, 0)),
        None,
        "no graduation block, no eligibility"
    );
}

#[test]
fn track_records_count_what_went_through_and_what_overstepped() {
    use crate::graduation::Outcome;
    let rows = [
        ("refund", Outcome::Allowed, 40),
        ("refund", Outcome::Approved, 2),
        ("refund", Outcome::Pending, 5),
        ("refund", Outcome::Expired, 3),
        ("refund", Outcome::DeniedByApprover, 1),
        ("refund", Outcome::Halted, 1),
        ("refund", Outcome::Denied(DenyCode::ArgumentConstraint), 2),
        ("refund", Outcome::Denied(DenyCode::CallLimit), 1),
        ("refund", Outcome::Denied(DenyCode::ConditionFailed), 1),
        ("refund", Outcome::Denied(DenyCode::ApprovalDenied), 1),
        ("refund", Outcome::Denied(DenyCode::KillSwitch), 9),
        ("refund", Outcome::Denied(DenyCode::NoPolicy), 9),
        ("lookup", Outcome::Allowed, 7),
        ("wipe", Outcome::Denied(DenyCode::ToolBlocked), 4),
    ];
    let records = TrackRecord::per_tool(rows);
    assert_eq!(
        records["refund"],
        TrackRecord {
            clean_completions: 42,
            incidents: 6,
            not_run: 0,
        },
        "allowed and approved are clean; an approver's denial, a halt and the tool's own rules \
         are incidents; waiting, expiry, kill switches and missing policies are neither"
    );
    assert_eq!(records["lookup"].clean_completions, 7);
    assert_eq!(records["wipe"], TrackRecord::default());
}

#[test]
fn a_released_call_that_did_not_run_is_no_clean_completion_whatever_the_order() {
    use crate::graduation::Outcome;
    let rows = [
        ("lookup", Outcome::NotRun, 2),
        ("lookup", Outcome::Allowed, 5),
        ("lookup", Outcome::NotRun, 1),
    ];
    let record = TrackRecord::per_tool(rows)["lookup"];
    assert_eq!(record.clean(), 2);
    assert_eq!(
        record.incidents, 0,
        "an upstream's failure is not the agent's incident"
    );
    let p = policy(json!({"tools": {"allowed": [
        {"name": "lookup", "approval": {"approvers": {"groups": ["leads"]}}}
    ]}, "graduation": {"cleanCompletions": 5, "maxIncidents": 0, "window": "48h"}}));
    assert_eq!(p.eligible_for("lookup", record), None);
    let statuses = p.tool_statuses(
        &BTreeMap::from([("lookup".to_owned(), record)]),
        &BTreeMap::new(),
    );
    assert_eq!(statuses[0].clean_completions, 2);
}

#[test]
fn tool_statuses_and_drift_say_what_each_allowed_tool_earned_and_what_went_unused() {
    let approval = json!({"approvers": {"groups": ["leads"]}});
    let p = policy(json!({"tools": {"allowed": [
        {"name": "refund", "approval": approval},
        {"name": "lookup"},
        {"name": "export_all", "approval": approval, "autonomy": "ExceptionBased"}
    ], "blocked": ["wipe"]}, "graduation": {"cleanCompletions": 3, "maxIncidents": 0, "window": "48h"}}));
    assert_eq!(p.track_record_window(), Duration::from_secs(48 * 3600));
    let records = BTreeMap::from([
        (
            "refund".to_owned(),
            TrackRecord {
                clean_completions: 3,
                incidents: 0,
                not_run: 0,
            },
        ),
        (
            "export_all".to_owned(),
            TrackRecord {
                clean_completions: 9,
                incidents: 1,
                not_run: 0,
            },
        ),
        // A tool the policy does not allow has no status, whatever its record.
        (
            "wipe".to_owned(),
            TrackRecord {
                clean_completions: 100,
                incidents: 0,
                not_run: 0,
            },
        ),
    ]);
    // Status times are whole seconds, as Kubernetes keeps them.
    let yesterday: Timestamp = "2026-11-24T12:00:00.75Z".parse().unwrap();
    let whole: Timestamp = "2026-11-24T12:00:00Z".parse().unwrap();
    let used = BTreeMap::from([
        ("refund".to_owned(), yesterday),
        ("wipe".to_owned(), yesterday),
    ]);
    let statuses = p.tool_statuses(&records, &used);
    let summary: Vec<_> = statuses
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.autonomy,
                s.clean_completions,
                s.incidents,
                s.last_used.as_ref().map(|t| t.0),
                s.eligible_for,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "export_all",
                Some(Autonomy::ExceptionBased),
                9,
                1,
                None,
                None
            ),
            ("lookup", None, 0, 0, None, None),
            (
                "refund",
                Some(Autonomy::Gated),
                3,
                0,
                Some(whole),
                Some(Autonomy::ExceptionBased)
            ),
        ]
    );
    let drift = p.drift("720h", &used, now());
    assert_eq!(drift.window, "720h");
    assert_eq!(drift.evaluated_at.map(|t| t.0), Some(now()));
    assert_eq!(drift.unused_tools, ["export_all", "lookup"]);
    let no_graduation = tools(json!([{"name": "lookup"}]));
    assert_eq!(
        no_graduation.track_record_window(),
        crate::graduation::DEFAULT_WINDOW
    );
}

#[test]
fn a_policy_governs_its_identity_in_its_namespace_only() {
    let p = policy(json!({}));
    assert!(p.governs("ns/support"));
    assert!(!p.governs("other/support"));
    assert!(!p.governs("ns/support2"));
    assert!(!p.governs("support"));
    assert!(!p.governs("ns/support/x"));
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// An agent's update of its own policy's status: a forged track record.
fn policy_status_write() -> ApiWrite<'static> {
    ApiWrite {
        operation: Operation::Update,
        group: "tollgate.dev",
        resource: "agentpolicies",
        subresource: "status",
        name: "support",
        labels: None,
        old_labels: None,
    }
}

/// Admission's verdicts as the audit trail records them: the code decided where the refusal
/// was, the policy (or the identity, without one) and the clause that decided.
#[test]
fn admission_verdicts_become_decisions_with_their_code_and_clause() {
    use admission::Judged;
    let p = policy(json!({"kubernetes": {}}));
    let protected = ApiWrite {
        operation: Operation::Delete,
        group: "apps",
        resource: "deployments",
        subresource: "",
        name: "web",
        labels: None,
        old_labels: None,
    };
    let cases = [
        (
            admission::admit("support", true, Some(&p), &protected, now()),
            Judged::Write,
            Some(&p),
            "deny:KillSwitch",
            p.id(),
            "spec.killSwitch",
        ),
        (
            admission::admit("support", false, None, &protected, now()),
            Judged::Write,
            None,
            "deny:NoPolicy",
            "AgentIdentity ns/support",
            "",
        ),
        (
            admission::Verdict::Allowed,
            Judged::Write,
            Some(&p),
            "allow",
            p.id(),
            "spec.kubernetes",
        ),
        (
            admission::Verdict::Allowed,
            Judged::Pod,
            None,
            "allow",
            "AgentIdentity ns/support",
            "spec.podSelector",
        ),
    ];
    for (verdict, judged, policy, outcome, named, clause) in cases {
        let decision = verdict.decision(judged, "ns/support", policy);
        let got = match &decision {
            Decision::Allow { .. } => "allow".to_owned(),
            Decision::Deny { code, .. } => format!("deny:{}", code.as_str()),
            other => panic!("{other:?}"),
        };
        assert_eq!(got, outcome, "{verdict:?}");
        let rule = decision.rule();
        assert_eq!(
            (&*rule.policy, &*rule.clause),
            (named, clause),
            "{verdict:?}"
        );
        assert_eq!(rule.policy_hash.is_empty(), policy.is_none(), "{verdict:?}");
    }
    // A refusal by the policy names it, its hash and the clause, and keeps the message.
    let forged = policy_status_write();
    let verdict = admission::admit("support", false, Some(&p), &forged, now());
    let Decision::Deny {
        code,
        rule,
        message,
    } = verdict.decision(Judged::Write, "ns/support", Some(&p))
    else {
        panic!("{verdict:?}")
    };
    assert_eq!(code, DenyCode::WriteRefused);
    assert_eq!(
        (&*rule.policy, &*rule.clause, &*rule.policy_hash),
        (p.id(), "tollgate:self-escalation", p.hash())
    );
    assert!(message.contains("agentpolicies/status"), "{message}");
}

#[test]
fn admission_of_agents_own_writes() {
    let p = policy(json!({"kubernetes": {
        "protectedResources": [
            {"operations": ["DELETE", "UPDATE"], "selector": {"matchLabels": {"env": "production"}}},
            {"operations": ["DELETE"], "apiGroups": ["apps"], "resources": ["deployments"], "selector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["db"]}]}}
        ],
        "freezeWindows": [{"start": "2026-12-20T00:00:00Z", "end": "2027-01-04T00:00:00Z", "reason": "holiday freeze"}]
    }}));
    let production = labels(&[("env", "production")]);
    let staging = labels(&[("env", "staging")]);
    let db = labels(&[("tier", "db")]);
    let write =
        |operation, group: &'static str, resource: &'static str, labels, old_labels| ApiWrite {
            operation,
            group,
            resource,
            subresource: "",
            name: "x",
            labels,
            old_labels,
        };
    let frozen: Timestamp = "2026-12-24T12:00:00Z".parse().unwrap();
    let cases: Vec<(&str, bool, ApiWrite<'_>, Timestamp, Option<&str>)> = vec![
        (
            "delete production",
            false,
            write(
                Operation::Delete,
                "apps",
                "deployments",
                None,
                Some(&production),
            ),
            now(),
            Some("protectedResources[0]"),
        ),
        (
            "delete staging",
            false,
            write(
                Operation::Delete,
                "apps",
                "deployments",
                None,
                Some(&staging),
            ),
            now(),
            None,
        ),
        (
            "delete judges the old labels",
            false,
            write(
                Operation::Delete,
                "apps",
                "deployments",
                Some(&staging),
                Some(&production),
            ),
            now(),
            Some("protectedResources[0]"),
        ),
        (
            "update that strips the label",
            false,
            write(
                Operation::Update,
                "apps",
                "deployments",
                Some(&staging),
                Some(&production),
            ),
            now(),
            Some("protectedResources[0]"),
        ),
        (
            "update that adds the label",
            false,
            write(
                Operation::Update,
                "",
                "configmaps",
                Some(&production),
                Some(&staging),
            ),
            now(),
            Some("protectedResources[0]"),
        ),
        (
            "create production",
            false,
            write(Operation::Create, "", "configmaps", Some(&production), None),
            now(),
            None,
        ),
        (
            "delete db deployment",
            false,
            write(Operation::Delete, "apps", "deployments", None, Some(&db)),
            now(),
            Some("protectedResources[1]"),
        ),
        (
            "delete db configmap",
            false,
            write(Operation::Delete, "", "configmaps", None, Some(&db)),
            now(),
            None,
        ),
        (
            "frozen",
            false,
            write(Operation::Create, "", "configmaps", Some(&staging), None),
            frozen,
            Some("freezeWindows[0]"),
        ),
        (
            "freeze end is exclusive",
            false,
            write(Operation::Create, "", "configmaps", None, None),
            "2027-01-04T00:00:00Z".parse().unwrap(),
            None,
        ),
        (
            "killed",
            true,
            write(Operation::Create, "", "configmaps", None, None),
            now(),
            Some("killSwitch"),
        ),
        (
            "rbac",
            false,
            write(
                Operation::Create,
                "rbac.authorization.k8s.io",
                "rolebindings",
                None,
                None,
            ),
            now(),
            Some("self-escalation"),
        ),
        (
            "tollgate kinds",
            false,
            write(
                Operation::Update,
                "tollgate.dev",
                "agentpolicies",
                None,
                None,
            ),
            now(),
            Some("self-escalation"),
        ),
        (
            "network policies",
            false,
            write(
                Operation::Delete,
                "networking.k8s.io",
                "networkpolicies",
                None,
                None,
            ),
            now(),
            Some("self-escalation"),
        ),
        (
            "webhooks",
            false,
            write(
                Operation::Delete,
                "admissionregistration.k8s.io",
                "validatingwebhookconfigurations",
                None,
                None,
            ),
            now(),
            Some("self-escalation"),
        ),
    ];
    for (what, killed, write, at, denied_by) in cases {
        let verdict = admission::admit("support", killed, Some(&p), &write, at);
        match (denied_by, verdict) {
            (None, admission::Verdict::Allowed) => {}
            (
                Some(rule),
                admission::Verdict::Denied {
                    code,
                    rule: got,
                    message,
                },
            ) => {
                assert!(
                    got.contains(rule),
                    "{what}: denied by {got}, expected {rule}"
                );
                let expected = if killed {
                    DenyCode::KillSwitch
                } else {
                    DenyCode::WriteRefused
                };
                assert_eq!(code, expected, "{what}");
                assert!(message.contains("refused"), "{what}: {message}");
            }
            (expected, verdict) => panic!("{what}: expected {expected:?}, got {verdict:?}"),
        }
    }
    let token = ApiWrite {
        operation: Operation::Create,
        group: "",
        resource: "serviceaccounts",
        subresource: "token",
        name: "agent-support",
        labels: None,
        old_labels: None,
    };
    assert!(!admission::admit("support", false, Some(&p), &token, now()).is_allowed());
    // An agent forging its own track record (status.tools.eligibleFor) or hiding its unused
    // rights: the status subresource is one of Tollgate's kinds too.
    let forged = policy_status_write();
    match admission::admit("support", false, Some(&p), &forged, now()) {
        admission::Verdict::Denied { rule, message, .. } => {
            assert!(rule.ends_with("tollgate:self-escalation"), "{rule}");
            assert!(message.contains("agentpolicies/status"), "{message}");
        }
        verdict => panic!("an agent wrote its policy's status: {verdict:?}"),
    }
    assert!(
        !admission::admit(
            "support",
            false,
            None,
            &write(Operation::Create, "", "configmaps", None, None),
            now()
        )
        .is_allowed(),
        "no policy, no writes"
    );
}

mod children {
    use super::*;
    use crate::children::{AGENT_LABEL, GatewayPeer, desired_children, escalation_errors};
    use tollgate_crds::AgentIdentity;
    use tollgate_crds::identity::AccessRule;

    fn identity(rules: Value) -> AgentIdentity {
        serde_json::from_value(json!({
            "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentIdentity",
            "metadata": {"name": "support", "namespace": "ns", "uid": "1234"},
            "spec": {
                "description": "d", "owner": {"team": "t", "contacts": ["a"]},
                "podSelector": {"matchLabels": {"app": "support"}},
                "kubernetes": {"rules": rules},
                "network": {"egress": [{"ports": [{"port": 443, "protocol": "TCP"}]}]}
            }
        }))
        .unwrap()
    }

    fn gateway() -> GatewayPeer {
        GatewayPeer {
            namespace: "tollgate-system".into(),
            pod_labels: labels(&[("app.kubernetes.io/name", "tollgate-gateway")]),
            port: 8443,
        }
    }

    #[test]
    fn children_hold_exactly_the_declared_rules() {
        let identity = identity(
            json!([{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]),
        );
        let children = desired_children(&identity, &gateway(), false).unwrap();
        assert_eq!(
            children.service_account.metadata.name.as_deref(),
            Some("agent-support")
        );
        assert_eq!(
            children.service_account.automount_service_account_token,
            Some(false)
        );
        let rules = children.role.rules.as_ref().unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].verbs, vec!["get", "list"]);
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["configmaps".to_owned()][..])
        );
        let binding = children.role_binding.as_ref().unwrap();
        assert_eq!(binding.role_ref.name, "tollgate-agent-support");
        let subject = &binding.subjects.as_ref().unwrap()[0];
        assert_eq!(
            (
                subject.kind.as_str(),
                subject.name.as_str(),
                subject.namespace.as_deref()
            ),
            ("ServiceAccount", "agent-support", Some("ns"))
        );
        for meta in [
            &children.service_account.metadata,
            &children.role.metadata,
            &binding.metadata,
            &children.network_policy.metadata,
        ] {
            assert_eq!(meta.labels.as_ref().unwrap()[AGENT_LABEL], "support");
            let owner = &meta.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
                ("AgentIdentity", "1234", Some(true))
            );
        }
        let spec = children.network_policy.spec.as_ref().unwrap();
        assert_eq!(
            spec.policy_types.as_deref(),
            Some(&["Egress".to_owned()][..])
        );
        let egress = spec.egress.as_ref().unwrap();
        assert_eq!(egress.len(), 3, "DNS, the gateway, and the declared rule");
        assert_eq!(
            egress[1].ports.as_ref().unwrap()[0].port,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8443))
        );
        assert_eq!(
            spec.pod_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["app"],
            "support"
        );
        // Deterministic: the same identity gives the same objects.
        assert_eq!(
            desired_children(&identity, &gateway(), false).unwrap(),
            children
        );
    }

    #[test]
    fn a_kill_switch_removes_the_binding_and_all_egress() {
        let identity =
            identity(json!([{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]));
        let children = desired_children(&identity, &gateway(), true).unwrap();
        assert!(children.role_binding.is_none());
        let spec = children.network_policy.spec.unwrap();
        assert_eq!(spec.egress, Some(vec![]), "deny-all egress, DNS included");
        assert_eq!(spec.policy_types, Some(vec!["Egress".to_owned()]));
    }

    fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> AccessRule {
        let strings = |items: &[&str]| items.iter().map(|s| s.to_string()).collect();
        AccessRule {
            api_groups: strings(groups),
            resources: strings(resources),
            resource_names: vec![],
            verbs: strings(verbs),
        }
    }

    #[test]
    fn escalation_is_refused_in_every_spelling() {
        let refused = [
            rule(
                &["rbac.authorization.k8s.io"],
                &["rolebindings"],
                &["create"],
            ),
            rule(&["*"], &["*"], &["get"]),
            rule(&["*"], &["roles"], &["get"]),
            rule(&["tollgate.dev"], &["agentpolicies"], &["update"]),
            rule(&["*"], &["agentidentities"], &["patch"]),
            rule(&["networking.k8s.io"], &["networkpolicies"], &["delete"]),
            rule(&["networking.k8s.io"], &["*"], &["delete"]),
            rule(&[""], &["serviceaccounts/token"], &["create"]),
            rule(&[""], &["serviceaccounts/*"], &["create"]),
            rule(&[""], &["*/token"], &["create"]),
            rule(&[""], &["*"], &["create"]),
            rule(&[""], &["serviceaccounts"], &["*"]),
            rule(&[""], &["configmaps"], &["get", "escalate"]),
            rule(&[""], &["users"], &["impersonate"]),
            rule(&["apps"], &["deployments"], &["bind"]),
            rule(
                &["admissionregistration.k8s.io"],
                &["validatingwebhookconfigurations"],
                &["delete"],
            ),
        ];
        for r in refused {
            assert!(
                !escalation_errors(std::slice::from_ref(&r)).is_empty(),
                "{r:?} was accepted"
            );
        }
        let accepted = [
            rule(&[""], &["configmaps"], &["get", "list"]),
            rule(&[""], &["configmaps"], &["*"]),
            rule(
                &["apps"],
                &["deployments", "deployments/scale"],
                &["get", "patch", "delete"],
            ),
            rule(&[""], &["serviceaccounts"], &["get"]),
            rule(&[""], &["pods/log"], &["get"]),
        ];
        for r in accepted {
            assert_eq!(
                escalation_errors(std::slice::from_ref(&r)),
                vec![],
                "{r:?} was refused"
            );
        }
        let errors = desired_children(
            &identity(json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}])),
            &gateway(),
            false,
        )
        .unwrap_err();
        assert!(
            errors
                .iter()
                .all(|e| e.path.starts_with("spec.kubernetes.rules[0]")),
            "{errors:?}"
        );
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn json_leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            "[a-zA-Z0-9_ -]{0,12}".prop_map(Value::String),
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        json_leaf().prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn sample() -> CompiledPolicy {
        tools(json!([
            {"name": "update", "arguments": {"fields": {
                "status": {"type": "string", "required": true, "enum": ["cancelled", "refunded"]},
                "order_ids": {"type": "array", "maxItems": 10}
            }}, "limits": {"maxItemsPerRun": {"field": "order_ids", "max": 10}}},
            {"name": "open", "arguments": {"additionalFields": "Allow", "fields": {"n": {"type": "integer", "maximum": 5}}}}
        ]))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn a_blocked_tool_is_never_allowed(arguments in json_value()) {
            let p = sample();
            prop_assert!(!decide(&p, "delete_customer_record", arguments).is_allowed());
        }

        #[test]
        fn an_unlisted_tool_is_never_allowed(name in "\\PC{0,20}", arguments in json_value()) {
            prop_assume!(name != "update" && name != "open");
            prop_assert!(!decide(&sample(), &name, arguments).is_allowed());
        }

        #[test]
        fn a_violated_constraint_is_never_allowed_whatever_surrounds_it(
            extra in prop::collection::btree_map("[a-z_]{1,8}", json_value(), 0..5),
            bad in prop_oneof![Just(json!("deleted")), Just(json!(1)), Just(json!(["cancelled"])), Just(json!(null))],
            n in 6i64..i64::MAX,
        ) {
            let p = sample();
            let mut arguments: serde_json::Map<String, Value> = extra.clone().into_iter().collect();
            arguments.insert("status".into(), bad);
            prop_assert!(!decide(&p, "update", Value::Object(arguments)).is_allowed());
            // Extra fields are allowed on "open", but the declared one still binds.
            let mut open: serde_json::Map<String, Value> = extra.into_iter().collect();
            open.insert("n".into(), json!(n));
            prop_assert!(!decide(&p, "open", Value::Object(open)).is_allowed());
        }

        #[test]
        fn splitting_items_across_calls_never_exceeds_the_run_limit(sizes in prop::collection::vec(0usize..12, 1..30)) {
            let p = sample();
            let (mut run, mut window) = (RunState::default(), WindowState::default());
            let mut touched = 0;
            for size in sizes {
                let ids: Vec<Value> = (0..size).map(|i| json!(format!("O-{i}"))).collect();
                let decision = step(&p, "r", "update", json!({"status": "cancelled", "order_ids": ids}), &mut run, &mut window, now());
                if decision.is_allowed() {
                    touched += size;
                }
            }
            prop_assert!(touched <= 10);
        }

        #[test]
        fn evaluation_is_deterministic(tool in prop_oneof![Just("update"), Just("open"), Just("x")], arguments in json_value()) {
            let p = sample();
            prop_assert_eq!(decide(&p, tool, arguments.clone()), decide(&p, tool, arguments));
        }

        #[test]
        fn key_order_does_not_change_the_digest(map in prop::collection::btree_map("[a-z]{1,6}", json_value(), 0..6)) {
            let forward: serde_json::Map<String, Value> = map.clone().into_iter().collect();
            let reversed: serde_json::Map<String, Value> = map.into_iter().rev().collect();
            prop_assert_eq!(crate::canonical::digest(&Value::Object(forward)), crate::canonical::digest(&Value::Object(reversed)));
        }
    }
}

#[test]
fn an_mcp_upstream_serves_only_allowed_tools_it_hosts() {
    let policy = policy_with(json!({
        "upstreams": [{"name": "crm"}, {"name": "billing"}],
        "tools": {"allowed": [
            {"name": "lookup", "upstream": "crm"},
            {"name": "charge", "upstream": "billing"},
            {"name": "anywhere"}
        ], "blocked": ["drop"]}
    }))
    .unwrap();
    assert!(policy.serves_through("lookup", "crm"));
    assert!(!policy.serves_through("lookup", "billing"));
    assert!(!policy.serves_through("charge", "crm"));
    assert!(policy.serves_through("anywhere", "crm"));
    assert!(!policy.serves_through("drop", "crm"));
    assert!(!policy.serves_through("unknown", "crm"));
}

// Issue 24: what an agent reports can never buy it budget, and nesting cannot hide items.

fn usage(tokens: u64, cost: &str) -> Usage {
    Usage {
        tokens,
        cost: cost.parse().unwrap(),
    }
}

#[test]
fn a_negative_cost_is_refused_at_the_boundary_and_never_refunds_a_run() {
    assert!(matches!(
        usage(0, "-100.00").check(),
        Err(crate::budget::UsageError::NegativeCost(_))
    ));
    // Whatever reaches the engine anyway (an old trail replayed) credits nothing.
    let p = policy(
        json!({"tools": {"allowed": [{"name": "t"}]}, "execution": {"maxCostUSD": "3.00",
               "perIdentity": {"window": "24h", "maxCostUSD": "10.00"}}}),
    );
    let (mut run, mut window) = (RunState::default(), WindowState::default());
    assert!(step(&p, "r", "t", json!({}), &mut run, &mut window, now()).is_allowed());
    assert_eq!(
        p.report(&usage(0, "-100.00"), &mut run, &mut window, now()),
        None
    );
    assert_eq!(run.cost, Decimal::ZERO);
    assert_eq!(
        p.report(&usage(0, "50.00"), &mut run, &mut window, now()),
        Some(Ceiling::MaxCostUsd {
            limit: "3.00".parse().unwrap()
        })
    );
    assert!(matches!(
        step(&p, "r", "t", json!({}), &mut run, &mut window, now()),
        Decision::Halt { .. }
    ));
    // A halted run stays halted, and a credit after the halt resets nothing.
    p.report(&usage(0, "-3.50"), &mut run, &mut window, now());
    assert_eq!(run.cost, "50.00".parse::<Decimal>().unwrap());
    assert!(run.halted.is_some());
    assert_eq!(
        window.cost_within(Duration::from_secs(86_400), now()),
        "50.00".parse::<Decimal>().unwrap()
    );
}

#[test]
fn a_huge_cost_is_refused_and_sums_that_would_overflow_saturate_instead_of_panicking() {
    let huge = "79228162514264337593543950335";
    assert!(matches!(
        usage(0, huge).check(),
        Err(crate::budget::UsageError::CostTooHigh(_))
    ));
    assert!(matches!(
        usage(crate::budget::MAX_TOKENS_PER_REPORT + 1, "0").check(),
        Err(crate::budget::UsageError::TooManyTokens(_))
    ));
    assert_eq!(
        usage(crate::budget::MAX_TOKENS_PER_REPORT, "1000000").check(),
        Ok(())
    );
    // Past the boundary (records written before the check): no panic, and the run halts.
    let p = policy(
        json!({"tools": {"allowed": [{"name": "t"}]}, "execution": {"maxCostUSD": "3.00",
               "perIdentity": {"window": "24h", "maxCostUSD": "10.00"}}}),
    );
    let (mut run, mut window) = (RunState::default(), WindowState::default());
    assert!(step(&p, "r", "t", json!({}), &mut run, &mut window, now()).is_allowed());
    for _ in 0..3 {
        p.report(&usage(u64::MAX, huge), &mut run, &mut window, now());
    }
    assert_eq!(run.cost, Decimal::MAX);
    assert_eq!(run.tokens, u64::MAX);
    assert_eq!(
        window.cost_within(Duration::from_secs(86_400), now()),
        Decimal::MAX
    );
    assert!(matches!(
        step(&p, "r2", "t", json!({}), &mut run, &mut window, now()),
        Decision::Halt { .. }
    ));
}

#[test]
fn unknown_usage_fields_are_refused() {
    let err = serde_json::from_value::<Usage>(json!({"tokens": 10, "costUSD": "2.50"}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("costUSD"), "{err}");
    assert!(serde_json::from_value::<Usage>(json!({"tokens": -1})).is_err());
}

#[test]
fn only_released_steps_wait_for_a_report_and_each_once() {
    let p = tools(json!([{"name": "read"}]));
    let (mut run, mut window) = (RunState::default(), WindowState::default());
    assert!(step(&p, "r", "read", json!({}), &mut run, &mut window, now()).is_allowed());
    assert!(matches!(
        step(
            &p,
            "r",
            "delete_customer_record",
            json!({}),
            &mut run,
            &mut window,
            now()
        ),
        Decision::Deny { .. }
    ));
    assert_eq!(
        run.take_report(2),
        None,
        "a denied step has nothing to report"
    );
    assert_eq!(run.take_report(1).as_deref(), Some("read"));
    assert_eq!(run.take_report(1), None, "a step is reported once");
    for i in 0..(crate::budget::MAX_AWAITING_REPORT as u64 + 10) {
        run.await_report(i, "read");
    }
    assert_eq!(
        run.awaiting_report.len(),
        crate::budget::MAX_AWAITING_REPORT
    );
    assert_eq!(run.take_report(0), None, "the oldest went first");
}

#[test]
fn an_array_of_arrays_counts_its_items_one_by_one() {
    let p = tools(json!([{"name": "update", "arguments": {"fields": {
        "order_ids": {"type": "array", "maxItems": 10}}},
        "limits": {"maxItemsPerRun": {"field": "order_ids", "max": 10}}}]));
    let eleven: Vec<String> = (0..11).map(|i| format!("O-{i}")).collect();
    let d = decide(&p, "update", json!({"order_ids": [eleven]}));
    assert_eq!(code(&d), Some(DenyCode::ArgumentConstraint), "{d:?}");
    // Under maxItems, the per-run limit counts leaves too.
    let p = tools(
        json!([{"name": "update", "arguments": {"fields": {"order_ids": {"type": "array"}}},
        "limits": {"maxItemsPerRun": {"field": "order_ids", "max": 10}}}]),
    );
    let d = decide(&p, "update", json!({"order_ids": [eleven]}));
    assert_eq!(code(&d), Some(DenyCode::ItemLimit), "{d:?}");
    let d = decide(&p, "update", json!({"order_ids": [["O-1", "O-2"], "O-3"]}));
    assert!(d.is_allowed(), "{d:?}");
}

#[test]
fn items_constrain_each_element_of_an_array() {
    let p = tools(json!([{"name": "update", "arguments": {"fields": {
        "order_ids": {"type": "array", "maxItems": 10,
                      "items": {"type": "string", "pattern": "O-[0-9]+", "maxLength": 8}},
        "amounts": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 100}},
        "status": {"type": "array", "items": {"enum": ["open", "closed"]}}}}}]));
    let cases = [
        (json!({"order_ids": ["O-1", "O-22"]}), None),
        (json!({"order_ids": [["O-1"]]}), Some("order_ids[0]")),
        (json!({"order_ids": ["O-1", "X-2"]}), Some("order_ids[1]")),
        (json!({"order_ids": ["O-123456789"]}), Some("order_ids[0]")),
        (json!({"order_ids": [7]}), Some("order_ids[0]")),
        (json!({"amounts": [1, 99.5]}), None),
        (json!({"amounts": [101]}), Some("amounts[0]")),
        (json!({"amounts": [-1]}), Some("amounts[0]")),
        (json!({"status": ["open"]}), None),
        (json!({"status": ["Open"]}), Some("status[0]")),
    ];
    for (arguments, refused_at) in cases {
        let d = decide(&p, "update", arguments.clone());
        match refused_at {
            None => assert!(d.is_allowed(), "{arguments}: {d:?}"),
            Some(at) => {
                assert_eq!(code(&d), Some(DenyCode::ArgumentConstraint), "{arguments}");
                let Decision::Deny { message, .. } = &d else {
                    unreachable!()
                };
                assert!(message.contains(at), "{arguments}: {message}");
            }
        }
    }
    let errors = policy_with(
        json!({"tools": {"allowed": [{"name": "u", "arguments": {"fields": {
        "ids": {"type": "string", "items": {"type": "string"}},
        "more": {"type": "array", "items": {"type": "integer", "pattern": "x"}}}}}]}}),
    )
    .unwrap_err()
    .to_string();
    assert!(errors.contains("fields.ids.items"), "{errors}");
    assert!(errors.contains("fields.more.items.pattern"), "{errors}");
}

#[test]
fn cel_conditions_compare_types() {
    let p = tools(
        json!([{"name": "update", "arguments": {"additionalFields": "Allow"},
        // JSON numbers reach CEL as uint (whole, not negative), int (negative) or double.
        "when": "args.ids.all(id, type(id) == string) && type(args.n) == uint"}]),
    );
    let d = decide(&p, "update", json!({"ids": ["a", "b"], "n": 3}));
    assert!(d.is_allowed(), "{d:?}");
    let d = decide(&p, "update", json!({"ids": ["a", ["b"]], "n": 3}));
    assert_eq!(code(&d), Some(DenyCode::ConditionFailed), "{d:?}");
    let d = decide(&p, "update", json!({"ids": ["a"], "n": "3"}));
    assert_eq!(code(&d), Some(DenyCode::ConditionFailed), "{d:?}");
    // A name that is neither a variable nor a type is still refused.
    assert!(
        policy_with(
            json!({"tools": {"allowed": [{"name": "u", "when": "type(args.x) == strng"}]}})
        )
        .is_err()
    );
}
