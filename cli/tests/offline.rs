//! The offline commands, run as a user runs them: the built binary on real files.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tollgate(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_kubectl-tollgate"))
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

#[test]
fn check_accepts_the_samples() {
    let (code, out, err) = tollgate(&["check", "config/samples"]);
    assert_eq!(code, 0, "{out}{err}");
    for line in [
        "ok   AgentIdentity support-agent-v2",
        "ok   AgentPolicy support-agent-v2: 3 allowed tool(s), sha256:",
        "ok   AgentIdentity deploy-agent",
        "ok   AgentPolicy deploy-agent",
        // A warning, not a failure: read_customer_record keeps only some fields of what its MCP
        // server answers.
        "warn AgentPolicy support-agent-v2: tool read_customer_record keeps only its resultFields",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    assert_eq!(out.matches("warn ").count(), 1, "{out}");
}

#[test]
fn check_lists_every_problem_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let sample = std::fs::read_to_string(repo().join("config/samples/support-agent.yaml")).unwrap();
    let broken = sample
        .replace(
            "blocked: [delete_customer_record",
            "blocked: [send_customer_email, delete_customer_record",
        )
        .replace(
            "pattern: \"^C[0-9]{6}$\"}\n        resultFields",
            "pattern: \"^C[0-9{6}$\"}\n        resultFields",
        )
        .replace("verbs: [get, list]", "verbs: [get, list, escalate]");
    std::fs::write(dir.path().join("broken.yaml"), broken).unwrap();
    let (code, out, _) = tollgate(&["check", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    for expected in [
        "spec.kubernetes.rules[0].verbs: the escalate verb lets the agent act beyond its own rules",
        "spec.tools.allowed[0].arguments.fields.customer_id.pattern: invalid regular expression",
        "spec.tools.allowed[2].name: tool \"send_customer_email\" is both allowed and blocked",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    std::fs::write(
        dir.path().join("broken.yaml"),
        sample.replace("maxStep", "maxStepz"),
    )
    .unwrap();
    let (code, out, _) = tollgate(&["check", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        out.contains("unknown field(s): spec.execution.maxStepzs"),
        "{out}"
    );
}

#[test]
fn decide_answers_as_the_gateway_will() {
    let policy = "--policy=config/samples/support-agent.yaml";
    let (code, out, err) = tollgate(&[
        "decide",
        policy,
        "--tool=read_customer_record",
        r#"--args={"customer_id":"C123456"}"#,
    ]);
    assert_eq!(code, 0, "{err}");
    let decision: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(decision["decision"], "allow");

    let (_, out, _) = tollgate(&["decide", policy, "--tool=delete_customer_record"]);
    let decision: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (decision["decision"].as_str(), decision["code"].as_str()),
        (Some("deny"), Some("ToolBlocked"))
    );
    assert_eq!(decision["rule"]["clause"], "spec.tools.blocked");

    let (_, out, _) = tollgate(&[
        "decide",
        policy,
        "--tool=send_customer_email",
        r#"--args={"customer_id":"C123456","subject":"s","body":"b"}"#,
    ]);
    let decision: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(decision["decision"], "requireApproval");
    assert!(
        decision["approval"]["argumentsDigest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );

    let (code, _, err) = tollgate(&[
        "decide",
        policy,
        "--tool=read_customer_record",
        r#"--args={"customer_id":"C1","customer_id":"C123456"}"#,
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("duplicate key \"customer_id\""), "{err}");
}
