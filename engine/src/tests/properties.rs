//! Property tests: what holds for every input.

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
