//! `tollgate-perf`: how many instructions each of Tollgate's hot paths costs per call, counted by
//! valgrind (callgrind), which does not care how busy or noisy the machine is. Each path runs
//! [`CALLS`] times after its setup, inside `measured_calls`, the only function valgrind counts
//! (setup costs vary from run to run); the count over the calls is its cost per call.
//!
//! - `tollgate-perf check`: counts every path and compares it with `perf/baseline.json`; exits 1
//!   naming every path that grew past the baseline's margin.
//! - `tollgate-perf update`: counts every path and writes the baseline (commit it with the
//!   reason it changed).
//! - `tollgate-perf run PATH CALLS`: what valgrind measures (not for people).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tollgate_crds::AgentPolicy;
use tollgate_engine::{Agent, CompiledPolicy, RunState, ToolCall, WindowState};

/// Calls per measurement.
const CALLS: u64 = 2000;

/// The paths, in the order they are reported.
const PATHS: [&str; 7] = [
    "engine/allow",
    "engine/deny-blocked",
    "engine/deny-constraint",
    "engine/allow-cel",
    "engine/allow-500-tools",
    "canonical/digest",
    "audit/seal",
];

const AGENT: Agent<'static> = Agent {
    name: "support-agent-v2",
    namespace: "support",
    username: "system:serviceaccount:support:agent-support-agent-v2",
    killed: false,
};

fn sample_policy() -> CompiledPolicy {
    let text = include_str!("../../config/samples/support-agent.yaml");
    for document in serde_yaml::Deserializer::from_str(text) {
        let value: serde_yaml::Value =
            serde::Deserialize::deserialize(document).expect("valid YAML");
        if value["kind"] == "AgentPolicy" {
            let mut policy: AgentPolicy = serde_yaml::from_value(value).expect("an AgentPolicy");
            policy.metadata.namespace = Some("support".into());
            return CompiledPolicy::compile(&policy).expect("the sample compiles");
        }
    }
    panic!("no AgentPolicy in the sample")
}

fn wide_policy(n: usize) -> CompiledPolicy {
    let allowed: Vec<Value> = (0..n)
        .map(|i| {
            json!({"name": format!("tool_{i:04}"), "arguments": {"fields": {
                "id": {"type": "string", "required": true, "pattern": "C[0-9]{6}"},
                "mode": {"type": "string", "enum": ["a", "b", "c"]}
            }}})
        })
        .collect();
    let blocked: Vec<String> = (0..50).map(|i| format!("blocked_{i:02}")).collect();
    let policy: AgentPolicy = serde_json::from_value(json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentPolicy",
        "metadata": {"name": "wide", "namespace": "bench"},
        "spec": {"identityRef": {"name": "wide"}, "tools": {"allowed": allowed, "blocked": blocked}}
    }))
    .expect("a valid AgentPolicy");
    CompiledPolicy::compile(&policy).expect("the wide policy compiles")
}

/// Where every measured call runs: valgrind counts only what runs inside it (see [`count`]),
/// so setup, whose cost varies from run to run (hash seeds of the maps it builds), is never
/// part of the figure.
#[inline(never)]
fn measured_calls(calls: u64, mut call: impl FnMut(u64)) {
    for i in 0..calls {
        call(i);
    }
}

/// Runs `path` `calls` times after its setup, checking that it decides what it should.
fn run(path: &str, calls: u64) -> anyhow::Result<()> {
    let now = jiff::Timestamp::from_second(1_790_000_000)?;
    let decide = |policy: &CompiledPolicy, tool: &str, arguments: Value, allowed: bool| {
        let (run, window) = (RunState::default(), WindowState::default());
        let call = ToolCall {
            run_id: "run-1",
            tool,
            arguments: &arguments,
        };
        assert_eq!(
            policy
                .evaluate(&AGENT, &call, &run, &window, now)
                .is_allowed(),
            allowed,
            "{path}"
        );
        measured_calls(calls, |_| {
            black_box(policy.evaluate(&AGENT, black_box(&call), &run, &window, now));
        });
    };
    match path {
        "engine/allow" => decide(
            &sample_policy(),
            "read_customer_record",
            json!({"customer_id": "C123456"}),
            true,
        ),
        "engine/deny-blocked" => decide(
            &sample_policy(),
            "delete_customer_record",
            json!({"customer_id": "C123456"}),
            false,
        ),
        "engine/deny-constraint" => decide(
            &sample_policy(),
            "update_order_status",
            json!({"status": "deleted", "order_ids": ["O-1"]}),
            false,
        ),
        "engine/allow-cel" => decide(
            &sample_policy(),
            "update_order_status",
            json!({"status": "refunded", "order_ids": ["O-1", "O-2"]}),
            true,
        ),
        "engine/allow-500-tools" => {
            // Every tool in turn: what a lookup costs depends on where its key falls in the table,
            // and the average over all of them is what a busy agent pays.
            let policy = wide_policy(500);
            let names: Vec<String> = (0..500).map(|i| format!("tool_{i:04}")).collect();
            let arguments = json!({"id": "C123456", "mode": "b"});
            let (run, window) = (RunState::default(), WindowState::default());
            let call = |tool| ToolCall {
                run_id: "run-1",
                tool,
                arguments: &arguments,
            };
            for name in &names {
                assert!(
                    policy
                        .evaluate(&AGENT, &call(name), &run, &window, now)
                        .is_allowed(),
                    "{path}"
                );
            }
            measured_calls(calls, |i| {
                let name = &names[i as usize % names.len()];
                black_box(policy.evaluate(&AGENT, black_box(&call(name)), &run, &window, now));
            });
        }
        "canonical/digest" => {
            let arguments = json!({"customer_id": "C000042", "subject": "Your refund",
                "body": "Hello Ada, your refund of 42.00 EUR was sent today. ".repeat(12),
                "cc": ["support@example.com"], "priority": 2, "tags": {"b": true, "a": null}});
            measured_calls(calls, |_| {
                black_box(tollgate_engine::canonical::digest(black_box(&arguments)));
            });
        }
        "audit/seal" => {
            let body = json!({"time": "2026-12-07T12:00:00Z", "event": "decide",
                "identity": {"username": "apikey:support-demo"}, "agent": "default/support-agent-v2",
                "run": "run-1", "step": 4, "tool": "read_customer_record",
                "arguments": {"customer_id": "C000042"}, "decision": {"decision": "allow"}})
            .to_string();
            let prev = "ab".repeat(32);
            measured_calls(calls, |seq| {
                black_box(tollgate_audit::record::seal(
                    "gateway-0",
                    black_box(seq),
                    &prev,
                    black_box(&body),
                ));
            });
        }
        other => bail!("unknown path {other:?}; the paths are {PATHS:?}"),
    }
    Ok(())
}

/// The instructions valgrind counts for `run PATH CALLS` of this binary.
fn count(path: &str, calls: u64) -> anyhow::Result<u64> {
    let this = std::env::current_exe()?;
    let output = Command::new("valgrind")
        .args([
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            "--toggle-collect=tollgate_perf::measured_calls*",
        ])
        .arg(&this)
        .args(["run", path, &calls.to_string()])
        .output()
        .context("run valgrind (Debian: apt-get install valgrind; e2e/prepare.sh installs it)")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("valgrind on {path}: {}\n{stderr}", output.status);
    }
    // `==PID== Collected : 123456789`
    stderr
        .lines()
        .find_map(|line| {
            line.split_once("Collected :")
                .map(|(_, n)| n.trim().to_owned())
        })
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("valgrind printed no instruction count for {path}:\n{stderr}"))
}

/// Instructions per call of `path`.
fn per_call(path: &str) -> anyhow::Result<u64> {
    Ok(count(path, CALLS)? / CALLS)
}

fn baseline_file() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/baseline.json"))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Baseline {
    /// How much a path may grow before the check fails, as a fraction (0.10 is 10%).
    margin: f64,
    /// The build the counts are for.
    profile: String,
    /// Instructions per call, by path.
    paths: BTreeMap<String, u64>,
}

fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tollgate-perf: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["run", path, calls] => {
            run(path, calls.parse().context("CALLS must be a number")?)?;
            Ok(ExitCode::SUCCESS)
        }
        ["update"] => {
            let mut paths = BTreeMap::new();
            for path in PATHS {
                let n = per_call(path)?;
                println!("{path:<24} {n:>10} instructions per call");
                paths.insert(path.to_owned(), n);
            }
            let baseline = Baseline {
                margin: 0.10,
                profile: profile().to_owned(),
                paths,
            };
            std::fs::write(
                baseline_file(),
                serde_json::to_string_pretty(&baseline)? + "\n",
            )?;
            println!(
                "wrote {}: commit it with the reason",
                baseline_file().display()
            );
            Ok(ExitCode::SUCCESS)
        }
        ["check"] => {
            let text = std::fs::read_to_string(baseline_file())
                .with_context(|| format!("read {}", baseline_file().display()))?;
            let baseline: Baseline = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a baseline", baseline_file().display()))?;
            if baseline.profile != profile() {
                bail!(
                    "the baseline counts a {} build and this is a {} build: run the {} binary",
                    baseline.profile,
                    profile(),
                    baseline.profile
                );
            }
            let mut grown = Vec::new();
            println!(
                "{:<24} {:>10} {:>10} {:>8}",
                "path", "baseline", "now", "change"
            );
            for path in PATHS {
                let now = per_call(path)?;
                let Some(&was) = baseline.paths.get(path) else {
                    bail!("{path} has no baseline: run tollgate-perf update and commit it");
                };
                let change = now as f64 / was.max(1) as f64 - 1.0;
                println!("{path:<24} {was:>10} {now:>10} {:>+7.1}%", change * 100.0);
                if change > baseline.margin {
                    grown.push(format!(
                        "{path}: {was} -> {now} instructions per call ({:+.1}%, margin {:.0}%)",
                        change * 100.0,
                        baseline.margin * 100.0
                    ));
                }
            }
            if grown.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "grew past the baseline:\n{}\n(a deliberate change: tollgate-perf update, and commit the baseline with the reason)",
                    grown.join("\n")
                );
                Ok(ExitCode::FAILURE)
            }
        }
        _ => bail!("usage: tollgate-perf check | update | run PATH CALLS"),
    }
}
