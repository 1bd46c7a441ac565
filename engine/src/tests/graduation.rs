//! Graduated autonomy: eligibility, track records, tool standings and drift.

use super::*;

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
