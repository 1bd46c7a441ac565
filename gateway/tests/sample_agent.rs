//! The README's main command as a user runs it: `tollgate-gateway standalone` (this build's
//! binary, the samples, the demo keys) and `examples/sample-agent.sh` against it, with the fake
//! model provider the script starts and `kubectl-tollgate` for the approvals and the replay.
//! Checks what the script shows: each refusal, the approval dana grants and the e-mail released,
//! the one lee denies, the model calls metered and cut, and a trail that verifies.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_readme_main_command_shows_every_gate_including_an_approval_granted_and_one_denied() {
    let dir = tempfile::tempdir().unwrap();
    // The samples, with the fake provider on a port of this test's own.
    let (gateway_port, llm_port) = (free_port(), free_port());
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    for entry in std::fs::read_dir(repo().join("config/samples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace("127.0.0.1:8490", &format!("127.0.0.1:{llm_port}"));
            std::fs::write(policies.join(path.file_name().unwrap()), text).unwrap();
        }
    }
    let audit = dir.path().join("audit.db");
    let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
    let _gateway = Killed(
        Command::new(env!("CARGO_BIN_EXE_tollgate-gateway"))
            .current_dir(repo())
            .args(["standalone", "--policies"])
            .arg(&policies)
            .args(["--listen", &format!("127.0.0.1:{gateway_port}")])
            .env("TOLLGATE_AUDIT_STORE", &audit)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // kubectl-tollgate of this build when it is built (as `cargo test --workspace` does), else
    // the script builds it with `cargo run`.
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_tollgate-gateway"))
        .parent()
        .unwrap()
        .to_owned();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // The fake provider of this build (examples are built for the tests), else the script starts
    // it with `cargo run`.
    let fake = bin.join("examples/fake-llm");
    let _fake = fake.exists().then(|| {
        Killed(
            Command::new(&fake)
                .arg(format!("127.0.0.1:{llm_port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    });
    let started = Instant::now();
    let output = Command::new("bash")
        .arg("examples/sample-agent.sh")
        .current_dir(repo())
        .env("PATH", path)
        .env("TOLLGATE_URL", format!("http://127.0.0.1:{gateway_port}"))
        .env("TOLLGATE_FAKE_LLM", format!("127.0.0.1:{llm_port}"))
        .env("TOLLGATE_AUDIT_STORE", &audit)
        .env("RUN_ID", "readme")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    let err = String::from_utf8_lossy(&output.stderr);
    let gateway_log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap();
    assert!(
        output.status.success(),
        "the script failed ({:?}):\n{out}\n{err}\ngateway:\n{gateway_log}",
        output.status
    );
    eprintln!("the script ran in {:?}", started.elapsed());

    // What each numbered step shows: the text of the step's section, up to the next one.
    let section = |step: &str| -> String {
        let start = out
            .find(&format!("== {step}"))
            .unwrap_or_else(|| panic!("no step {step}:\n{out}"));
        let rest = &out[start + 3..];
        // Up to the next numbered step, or the replays at the end.
        let end = rest
            .match_indices("\n== ")
            .map(|(at, _)| at)
            .find(|at| {
                rest[at + 4..].starts_with(|c: char| c.is_ascii_digit())
                    || rest[at + 4..].starts_with("replay")
                    || rest[at + 4..].starts_with("every agent")
            })
            .map_or(rest.len(), |at| at + 1);
        rest[..end].to_owned()
    };
    let expect = |step: &str, words: &[&str]| {
        let text = section(step);
        for word in words {
            assert!(text.contains(word), "step {step} lacks {word:?}:\n{text}");
        }
    };
    expect("1. ", &[r#""decision":"allow""#]);
    expect("2. ", &[r#""code":"ToolBlocked""#]);
    expect("3. ", &[r#""code":"ConditionFailed""#]);
    expect(
        "4. ",
        &[r#""decision":"requireApproval""#, r#""approvalRequest":{"#],
    );
    expect(
        "4a. ",
        &[
            "send_customer_email  readme",
            "Pending  0/1",
            "approved: phase Approved",
        ],
    );
    expect(
        "4b. ",
        &[
            r#""decision":"allow""#,
            r#""clause":"spec.tools.allowed[send_customer_email].approval""#,
        ],
    );
    expect(
        "4c. ",
        &[
            "denied: phase Denied",
            r#""code":"ApprovalDenied""#,
            "was denied",
        ],
    );
    expect("5. ", &[r#""halted":{"#, r#""decision":"halt""#]);
    expect("6. ", &[r#""code":"UnknownStep""#]);
    expect("7. ", &["unknown field `agent`"]);
    expect("8. ", &[r#""usage""#]);
    expect("9. ", &[r#""code":"ModelNotAllowed""#]);
    expect("10. ", &[r#""cut":"Ceiling""#, "maxTokensPerRun"]);
    expect(
        "11. ",
        &[r#""decision":"halt""#, "spec.execution.maxTokensPerRun"],
    );
    // `top` shows the support agent's hour: its refusals, the run over its token ceiling, the
    // halt, against the sample policy's ceilings.
    let top = section("every agent now");
    let support = top
        .lines()
        .find(|l| l.starts_with("default/support-agent-v2"))
        .unwrap_or_else(|| panic!("{top}"));
    let cells: Vec<&str> = support.split_whitespace().collect();
    assert_eq!(cells[7], "61200/50000", "{top}");
    assert_eq!((cells[6], cells[8]), ("$50.00/1h", "1"), "{top}");
    // The replay shows who decided, and the trail verifies.
    assert!(out.contains("Decided by dana"), "{out}");
    assert!(out.contains("Decided by lee"), "{out}");
    let verified = Command::new(bin.join("kubectl-tollgate"))
        .args(["audit", "verify"])
        .env("TOLLGATE_AUDIT_STORE", &audit)
        .output();
    if let Ok(verified) = verified {
        assert!(
            verified.status.success(),
            "{}",
            String::from_utf8_lossy(&verified.stdout)
        );
    }
}
