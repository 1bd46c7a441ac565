//! Budgets across calls: run ceilings, reported usage, and the attacks of SECURITY.md point 3 (rotating run ids, splitting calls, retrying after a halt, negative and huge costs).

use super::*;

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
