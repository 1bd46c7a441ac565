//! Tollgate's own pods never write a secret the run used into their logs: not the agents'
//! ServiceAccount tokens (every one a JWT, so "eyJ"), not the tool credential the gateway adds
//! to upstream calls, not the model provider's key. Runs after the agent and LLM tests, which
//! sent all of them through the gateway, and reads the container log files on the node (so a
//! container that restarted is read too).

use std::path::{Path, PathBuf};

use crate::support::{self, SYSTEM, Test};

pub fn tests() -> Vec<Test> {
    vec![Test {
        name: "no_tollgate_pod_logs_a_token_a_credential_or_a_key",
        run: no_tollgate_pod_logs_a_token_a_credential_or_a_key,
    }]
}

/// What must never be logged, and what it is.
const SECRETS: &[(&str, &str)] = &[
    ("the CRM tool credential", crate::agents::CREDENTIAL),
    ("the model provider's key", crate::llm::PROVIDER_KEY),
    ("a ServiceAccount token (a JWT)", "eyJ"),
];

/// Every container log file of the pods of `namespace` on the node.
fn log_files(namespace: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "log") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir("/var/log/pods")
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("{namespace}_"))
        {
            walk(&entry.path(), &mut files);
        }
    }
    files
}

/// The lines of `files` holding a secret: (file, what, line).
fn leaks(files: &[PathBuf]) -> Vec<(String, &'static str, String)> {
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines() {
            for (what, secret) in SECRETS {
                if line.contains(secret) {
                    found.push((file.display().to_string(), *what, line.to_owned()));
                }
            }
        }
    }
    found
}

fn no_tollgate_pod_logs_a_token_a_credential_or_a_key() {
    support::installed();
    let files = log_files(SYSTEM);
    let lines: usize = files
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .count()
        })
        .sum();
    assert!(
        files.len() >= 3 && lines > 0,
        "the operator, webhook and gateway pods have logs: {files:?}"
    );
    let found = leaks(&files);
    assert!(found.is_empty(), "secrets in Tollgate's logs: {found:#?}");
    for part in ["operator", "webhook", "gateway"] {
        assert!(
            files.iter().any(|f| f
                .display()
                .to_string()
                .contains(&format!("tollgate-{part}"))),
            "the {part}'s log is read: {files:?}"
        );
    }
    // The check finds what it looks for: a log line holding each secret is reported.
    let dir = tempfile::tempdir().unwrap();
    let planted = dir.path().join("0.log");
    let text: String = SECRETS
        .iter()
        .map(|(_, secret)| format!("2026-12-07T12:00:00Z stderr F header={secret}xyz\n"))
        .collect();
    std::fs::write(&planted, text).unwrap();
    assert_eq!(leaks(&[planted]).len(), SECRETS.len());
    eprintln!(
        "{} log lines of {} Tollgate containers read: no token, credential or key",
        lines,
        files.len()
    );
}
