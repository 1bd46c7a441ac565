//! `kubectl tollgate audit …` as a user runs it: the built binary on a real SQLite store.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use serde_json::json;
use tollgate_audit::{
    ApprovalRef, AuditLog, Counters, Entry, Event, Identity, Redactor, SqliteStore, WriterConfig,
};
use tollgate_engine::{Decision, DenyCode, RuleRef};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tollgate(store: &Path, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_kubectl-tollgate"))
        .arg("audit")
        .arg("--store")
        .arg(store)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn rule(tool: &str) -> RuleRef {
    RuleRef {
        policy: "support/support-agent-v2".into(),
        generation: Some(3),
        policy_hash: "sha256:5e1f00d2a4b3c6e7f8091a2b3c4d5e6f".into(),
        tool: Some(tool.into()),
        clause: format!("spec.tools.allowed[{tool}]").into(),
    }
}

/// A run of three calls: one allowed, one denied, one approved by alice.
fn store() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = Arc::new(SqliteStore::open(&path).unwrap());
        let (log, _) = AuditLog::open(store, WriterConfig::new("gw-0"))
            .await
            .unwrap();
        let who = Identity {
            username: "system:serviceaccount:support:agent-support-agent-v2".into(),
            pod: Some("support-agent-5d8f".into()),
            token_id: None,
        };
        let now = jiff::Timestamp::now();
        let calls = [
            (
                "read_customer_record",
                json!({"customer_id": "C000042"}),
                Decision::Allow {
                    rule: rule("read_customer_record"),
                    review: false,
                },
            ),
            (
                "delete_customer",
                json!({"customer_id": "C000042", "password": "hunter2"}),
                Decision::Deny {
                    code: DenyCode::ToolNotAllowed,
                    rule: rule("delete_customer"),
                    message: "tool \"delete_customer\" is not allowed by policy".into(),
                },
            ),
        ];
        for (step, (tool, args, decision)) in calls.into_iter().enumerate() {
            let mut entry = Entry::new(now, Event::Decide, who.clone());
            entry.agent = Some("support/support-agent-v2".into());
            entry.run = Some("run-7".into());
            entry.step = Some(step as u64 + 1);
            entry.tool = Some(tool.into());
            entry.set_arguments(&Redactor::default(), &args);
            entry.decision = Some(decision);
            entry.counters = Some(Counters {
                steps: step as u64 + 1,
                tokens: 120,
                cost_usd: "0.02".into(),
            });
            log.append(entry).await.unwrap();
        }
        let mut approval = Entry::new(now, Event::Approval, who.clone());
        approval.agent = Some("support/support-agent-v2".into());
        approval.run = Some("run-7".into());
        approval.tool = Some("send_customer_email".into());
        approval.approval = Some(ApprovalRef {
            name: "support/send-customer-email-7f3a".into(),
            phase: tollgate_audit::ApprovalPhase::Approved,
            approvers: vec!["alice".into()],
        });
        log.append(approval).await.unwrap();
    });
    (dir, path)
}

#[test]
fn drift_lists_track_records_unused_tools_and_eligibility() {
    let (_dir, path) = store();
    let (code, out, err) = tollgate(
        &path,
        &[
            "drift",
            "--policy",
            "config/samples/support-agent.yaml",
            "--since",
            "1h",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("support-agent-v2 (sha256:")
            && lines[0].ends_with(
                "calls of support/support-agent-v2: track records over 720h, drift over 1h"
            ),
        "{out}"
    );
    let row = |tool: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("{tool} ")))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_else(|| panic!("no row for {tool} in:\n{out}"))
    };
    // The allowed call counts as clean; delete_customer is not an allowed tool and has no row.
    assert_eq!(
        row("read_customer_record")[..4],
        ["read_customer_record", "-", "1", "0"]
    );
    assert_eq!(
        row("send_customer_email"),
        ["send_customer_email", "Gated", "1", "0", "never", "-"]
    );
    assert!(!out.contains("delete_customer"), "{out}");
    assert!(
        out.contains(
            "allowed but not called in the last 1h: send_customer_email, update_order_status"
        ),
        "{out}"
    );
    assert!(!out.contains("eligible for"), "{out}");

    // A policy that asks one clean completion for graduation: the approved e-mail earns it,
    // unless the tool is irreversible (those always wait for people).
    let sample = std::fs::read_to_string(repo().join("config/samples/support-agent.yaml")).unwrap();
    let one = sample.replacen("cleanCompletions: 200", "cleanCompletions: 1", 1);
    let reversible = one.replacen("irreversible: true", "irreversible: false", 1);
    assert!(one != sample && reversible != one);
    let eligibility = |policy: &str| {
        let file = path.with_file_name("candidate.yaml");
        std::fs::write(&file, policy).unwrap();
        let (code, out, err) = tollgate(
            &path,
            &["drift", "--policy", file.to_str().unwrap(), "--json"],
        );
        assert_eq!(code, 0, "{out}{err}");
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        let email = status["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "send_customer_email")
            .unwrap()
            .clone();
        (email["eligibleFor"].clone(), status)
    };
    assert_eq!(eligibility(&one).0, serde_json::Value::Null);
    let (eligible, status) = eligibility(&reversible);
    assert_eq!(eligible, "ExceptionBased", "{status}");
    assert_eq!(status["drift"]["window"], "720h");
    assert_eq!(
        status["drift"]["unusedTools"],
        json!(["send_customer_email", "update_order_status"])
    );

    let (code, _, err) = tollgate(
        &path,
        &[
            "drift",
            "--policy",
            "config/samples/support-agent.yaml",
            "--since",
            "soon",
        ],
    );
    assert_eq!(code, 2);
    assert!(err.contains("--since \"soon\""), "{err}");
    let (code, _, err) = tollgate(&path, &["drift", "--policy", "missing.yaml"]);
    assert_eq!(code, 2);
    assert!(err.contains("missing.yaml"), "{err}");
}

#[test]
fn replay_prints_the_run_as_a_timeline() {
    let (_dir, path) = store();
    let (code, out, err) = tollgate(&path, &["replay", "--run", "run-7"]);
    assert_eq!(code, 0, "{out}{err}");
    for line in [
        "run run-7 · agent support/support-agent-v2 · 3 record(s)",
        "step 1 · call read_customer_record  [gw-0#1]",
        "who       system:serviceaccount:support:agent-support-agent-v2 (pod support-agent-5d8f)",
        "decision  ALLOWED",
        "rule      support/support-agent-v2 spec.tools.allowed[read_customer_record] @ 5e1f00d2a4b3",
        "decision  DENIED ToolNotAllowed: tool \"delete_customer\" is not allowed by policy",
        "redacted  /arguments/password",
        "approval  support/send-customer-email-7f3a Approved by alice",
        "budget    steps 2, tokens 120, cost $0.02",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    assert!(
        !out.contains("hunter2"),
        "a secret reached the replay:\n{out}"
    );

    let (code, _, err) = tollgate(&path, &["replay", "--run", "run-8"]);
    assert_eq!(code, 2);
    assert!(err.contains("no record of run \"run-8\""), "{err}");
}

#[test]
fn replay_by_agent_shows_its_calls_and_its_kubernetes_writes_in_order() {
    let (_dir, path) = store();
    // Admission's verdict on the agent's own delete, after the run (a chain of its own).
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = Arc::new(SqliteStore::open(&path).unwrap());
        let (log, _) = AuditLog::open(store, WriterConfig::new("webhook-0"))
            .await
            .unwrap();
        let mut entry = Entry::new(
            jiff::Timestamp::now(),
            Event::Admission,
            Identity {
                username: "system:serviceaccount:support:agent-support-agent-v2".into(),
                pod: None,
                token_id: None,
            },
        );
        entry.agent = Some("support/support-agent-v2".into());
        entry.arguments = Some(
            json!({"operation": "DELETE", "group": "apps", "version": "v1",
            "resource": "deployments", "subresource": "", "namespace": "prod", "name": "web"}),
        );
        entry.decision = Some(Decision::Deny {
            code: DenyCode::WriteRefused,
            rule: RuleRef {
                policy: "support/support-agent-v2".into(),
                generation: Some(3),
                policy_hash: "sha256:5e1f00d2a4b3c6e7f8091a2b3c4d5e6f".into(),
                tool: None,
                clause: "spec.kubernetes.protectedResources[0]".into(),
            },
            message: "DELETE of apps deployments web is refused: the object is protected".into(),
        });
        log.append(entry).await.unwrap();
    });
    let (code, out, err) = tollgate(
        &path,
        &[
            "replay",
            "--agent",
            "support/support-agent-v2",
            "--since",
            "1h",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("run run-7 · agent support/support-agent-v2 · 4 record(s)"),
        "{out}"
    );
    let call = out
        .find("call read_customer_record")
        .expect("the run's calls");
    let write = out
        .find("kubernetes DELETE deployments.apps prod/web  [webhook-0#1]")
        .unwrap_or_else(|| panic!("the agent's delete:\n{out}"));
    assert!(call < write, "in order:\n{out}");
    assert!(
        out.contains("decision  DENIED WriteRefused: DELETE of apps deployments web is refused"),
        "{out}"
    );
    assert!(
        out.contains("rule      support/support-agent-v2 spec.kubernetes.protectedResources[0]"),
        "{out}"
    );

    let (code, _, err) = tollgate(&path, &["replay", "--agent", "support/other"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("no record of agent \"support/other\" since"),
        "{err}"
    );
    let (code, _, err) = tollgate(&path, &["replay"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--run"), "{err}");
}

#[test]
fn verify_names_the_first_broken_record_and_checks_a_kept_head() {
    let (_dir, path) = store();
    let (code, out, err) = tollgate(&path, &["verify", "--deep"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("ok   chain gw-0: records 1..3 verified (3 record(s)); head gw-0:3:"),
        "{out}"
    );
    let head = out.trim().rsplit(' ').next().unwrap().to_owned();

    let (code, out, _) = tollgate(&path, &["verify", "--head", &head]);
    assert_eq!(code, 0, "{out}");

    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            r#"UPDATE tollgate_audit_records SET body = replace(body, '"deny"', '"allow"') WHERE seq = 2"#,
            [],
        )
        .unwrap();
    let (code, out, _) = tollgate(&path, &["verify"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("FAIL chain \"gw-0\", record 2: record was altered"),
        "{out}"
    );

    let (code, _, err) = tollgate(&path, &["verify", "--head", "gw-0:x:abc"]);
    assert_eq!(code, 2);
    assert!(err.contains("\"x\" is not a sequence number"), "{err}");
}

#[test]
fn export_writes_json_lines_and_what_if_lists_changed_decisions() {
    let (_dir, path) = store();
    let (code, out, err) = tollgate(&path, &["export", "--since", "1h"]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["tool"], "delete_customer");
    assert_eq!(lines[1]["arguments"]["password"], "[REDACTED]");
    assert_eq!(lines[1]["decision"]["decision"], "deny");

    // The sample policy allows read_customer_record with this argument and does not allow
    // delete_customer: nothing changes. A candidate that drops read_customer_record changes
    // the first call.
    let (code, out, err) = tollgate(
        &path,
        &[
            "what-if",
            "--policy",
            "config/samples/support-agent.yaml",
            "--since",
            "1h",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("2 recorded call(s) of agent support-agent-v2 re-evaluated"),
        "{out}"
    );
    assert!(out.contains("; 0 would change"), "{out}");

    let sample = std::fs::read_to_string(repo().join("config/samples/support-agent.yaml")).unwrap();
    let candidate = sample.replacen(
        "- name: read_customer_record",
        "- name: read_customer_record_v2",
        1,
    );
    let file = path.with_file_name("candidate.yaml");
    std::fs::write(&file, candidate).unwrap();
    let (code, out, err) = tollgate(
        &path,
        &[
            "what-if",
            "--policy",
            file.to_str().unwrap(),
            "--since",
            "1h",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("; 1 would change"), "{out}");
    assert!(
        out.contains("read_customer_record: allowed -> denied ToolNotAllowed"),
        "{out}"
    );

    let (code, _, err) = tollgate(&path, &["export", "--since", "forever"]);
    assert_eq!(code, 2);
    assert!(err.contains("--since \"forever\""), "{err}");
}

#[test]
fn a_missing_store_is_named() {
    let (code, _, err) = tollgate(Path::new("/nonexistent/audit.db"), &["verify"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("audit store /nonexistent/audit.db does not exist"),
        "{err}"
    );
}
