//! Decision latency of tollgate-engine beside cedar-policy and regorus on the same rules, in one
//! run. Before measuring, every scenario asserts that all engines reach the same decision.
//!
//! Peers get the same already-parsed JSON the gateway holds; each builds its request from it
//! inside the measured loop (cedar: Context and Request; regorus: its input value), as a gateway
//! would per call. Tollgate's CEL path has no cedar counterpart (cedar has no quantifier over a
//! set), so that row compares with regorus only.

use std::hint::black_box;
use std::str::FromStr;
use std::time::Duration;

use cedar_policy::{Authorizer, Context, Entities, EntityUid, PolicySet, Request};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};
use tollgate_bench::{sample_policy, wide_policy};
use tollgate_engine::{Agent, CompiledPolicy, RunState, ToolCall, WindowState};

const AGENT: Agent<'static> = Agent {
    name: "support-agent-v2",
    namespace: "support",
    username: "system:serviceaccount:support:agent-support-agent-v2",
    killed: false,
};

const SAMPLE_CEDAR: &str = r#"
forbid (principal, action in [Action::"delete_customer_record", Action::"access_payment_raw", Action::"bulk_send_email"], resource);
permit (principal == Agent::"support-agent-v2", action == Action::"read_customer_record", resource)
when { context has customer_id && context.customer_id like "C*" };
permit (principal == Agent::"support-agent-v2", action == Action::"update_order_status", resource)
when { context has status && ["cancelled", "refunded", "processing"].contains(context.status) };
"#;

/// The support sample's tool rules in Rego (shared with the gateway load bench).
const SAMPLE_REGO: &str = include_str!("../rules/sample.rego");

fn wide_cedar(n: usize) -> String {
    let mut text = String::new();
    for i in 0..50 {
        text.push_str(&format!(
            "forbid (principal, action == Action::\"blocked_{i:02}\", resource);\n"
        ));
    }
    for i in 0..n {
        text.push_str(&format!(
            "permit (principal, action == Action::\"tool_{i:04}\", resource) when {{ context has id && context.id like \"C*\" && (!(context has mode) || [\"a\", \"b\", \"c\"].contains(context.mode)) }};\n"
        ));
    }
    text
}

fn wide_rego(n: usize) -> String {
    let mut text = String::from("package tollgate\nimport rego.v1\n\ndefault allow := false\n\n");
    for i in 0..n {
        text.push_str(&format!(
            "allow if {{\n    input.tool == \"tool_{i:04}\"\n    regex.match(`^C[0-9]{{6}}$`, input.args.id)\n    input.args.mode in {{\"a\", \"b\", \"c\"}}\n}}\n\n"
        ));
    }
    text
}

struct Peers {
    cedar: Option<(PolicySet, Authorizer, Entities)>,
    rego: regorus::Engine,
}

impl Peers {
    fn new(cedar: Option<&str>, rego: &str) -> Self {
        let cedar = cedar.map(|text| {
            (
                PolicySet::from_str(text).expect("valid cedar"),
                Authorizer::new(),
                Entities::empty(),
            )
        });
        let mut engine = regorus::Engine::new();
        engine
            .add_policy("tollgate.rego".into(), rego.into())
            .expect("valid rego");
        Peers {
            cedar,
            rego: engine,
        }
    }
}

fn tollgate_allows(policy: &CompiledPolicy, tool: &str, args: &Value) -> bool {
    let (run, window) = (RunState::default(), WindowState::default());
    policy
        .evaluate(
            &AGENT,
            &ToolCall {
                run_id: "run-1",
                tool,
                arguments: args,
            },
            &run,
            &window,
            now(),
        )
        .is_allowed()
}

fn cedar_allows(
    cedar: &(PolicySet, Authorizer, Entities),
    principal: &EntityUid,
    action: &EntityUid,
    resource: &EntityUid,
    args: &Value,
) -> bool {
    let (policies, authorizer, entities) = cedar;
    let context = Context::from_json_value(args.clone(), None).expect("a cedar context");
    let request = Request::new(
        principal.clone(),
        action.clone(),
        resource.clone(),
        context,
        None,
    )
    .expect("a cedar request");
    authorizer
        .is_authorized(&request, policies, entities)
        .decision()
        == cedar_policy::Decision::Allow
}

fn rego_allows(engine: &mut regorus::Engine, tool: &str, args: &Value) -> bool {
    engine.set_input(regorus::Value::from(json!({"tool": tool, "args": args})));
    engine
        .eval_rule("data.tollgate.allow".to_owned())
        .expect("rego evaluates")
        == regorus::Value::from(true)
}

fn now() -> jiff::Timestamp {
    jiff::Timestamp::from_second(1_790_000_000).expect("a valid timestamp")
}

fn scenario(
    c: &mut Criterion,
    name: &str,
    policy: &CompiledPolicy,
    peers: &mut Peers,
    tool: &str,
    args: Value,
    expected: bool,
) {
    let principal = EntityUid::from_str(r#"Agent::"support-agent-v2""#).unwrap();
    let action = EntityUid::from_str(&format!("Action::{tool:?}")).unwrap();
    let resource = EntityUid::from_str(r#"Upstream::"crm""#).unwrap();
    assert_eq!(
        tollgate_allows(policy, tool, &args),
        expected,
        "{name}: tollgate"
    );
    if let Some(cedar) = &peers.cedar {
        assert_eq!(
            cedar_allows(cedar, &principal, &action, &resource, &args),
            expected,
            "{name}: cedar"
        );
    }
    assert_eq!(
        rego_allows(&mut peers.rego, tool, &args),
        expected,
        "{name}: regorus"
    );

    let mut group = c.benchmark_group(name);
    group.bench_function("tollgate", |b| {
        b.iter(|| black_box(tollgate_allows(policy, black_box(tool), black_box(&args))))
    });
    if let Some(cedar) = &peers.cedar {
        group.bench_function("cedar", |b| {
            b.iter(|| {
                black_box(cedar_allows(
                    cedar,
                    &principal,
                    &action,
                    &resource,
                    black_box(&args),
                ))
            })
        });
    }
    group.bench_function("regorus", |b| {
        b.iter(|| {
            black_box(rego_allows(
                &mut peers.rego,
                black_box(tool),
                black_box(&args),
            ))
        })
    });
    group.finish();
}

fn decisions(c: &mut Criterion) {
    let sample = sample_policy();
    let mut peers = Peers::new(Some(SAMPLE_CEDAR), SAMPLE_REGO);
    scenario(
        c,
        "sample/allow",
        &sample,
        &mut peers,
        "read_customer_record",
        json!({"customer_id": "C123456"}),
        true,
    );
    scenario(
        c,
        "sample/deny-blocked",
        &sample,
        &mut peers,
        "delete_customer_record",
        json!({"customer_id": "C123456"}),
        false,
    );
    scenario(
        c,
        "sample/deny-constraint",
        &sample,
        &mut peers,
        "update_order_status",
        json!({"status": "deleted", "order_ids": ["O-1"]}),
        false,
    );
    let mut rego_only = Peers::new(None, SAMPLE_REGO);
    scenario(
        c,
        "sample/allow-cel",
        &sample,
        &mut rego_only,
        "update_order_status",
        json!({"status": "refunded", "order_ids": ["O-1", "O-2"]}),
        true,
    );

    let wide = wide_policy(500);
    let mut peers = Peers::new(Some(&wide_cedar(500)), &wide_rego(500));
    scenario(
        c,
        "500-tools/allow",
        &wide,
        &mut peers,
        "tool_0250",
        json!({"id": "C123456", "mode": "b"}),
        true,
    );
    scenario(
        c,
        "500-tools/deny-unknown",
        &wide,
        &mut peers,
        "tool_9999",
        json!({"id": "C123456"}),
        false,
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = decisions
}
criterion_main!(benches);
