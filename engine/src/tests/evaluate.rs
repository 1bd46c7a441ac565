//! Deciding one call: tool and argument rules, per-run limits, conditions, autonomy, approvals bound to arguments, disguised names and JSON tricks (SECURITY.md point 2), the kill switch, redaction, nested arrays, CEL.

use super::*;

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
