//! The cluster commands' own refusals, before anything reaches an apiserver (the writes
//! themselves are tested against the real apiserver in `e2e/tests/e2e/admission.rs`).

use std::process::Command;

/// Runs `kubectl-tollgate ARGS` with `KUBECONFIG` set to `kubeconfig`; (exit code, stderr).
fn run(args: &[&str], kubeconfig: &str) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_kubectl-tollgate"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_kill_switch_command_names_one_agent_or_all() {
    let (code, stderr) = run(&["kill"], "/nonexistent");
    assert_eq!(code, 2);
    assert!(
        stderr.contains("name an agent (AgentIdentity), or pass --all"),
        "{stderr}"
    );
    let (code, stderr) = run(&["unkill", "mailer", "--all"], "/nonexistent");
    assert_eq!(code, 2);
    assert!(stderr.contains("not both"), "{stderr}");
}

#[test]
fn without_a_kubeconfig_the_error_says_what_to_set() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.kubeconfig");
    let (code, stderr) = run(&["approve", "req-1"], missing.to_str().unwrap());
    assert_eq!(code, 2);
    assert!(
        stderr.contains("no usable kubeconfig (set KUBECONFIG"),
        "{stderr}"
    );
}
