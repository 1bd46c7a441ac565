//! Fixtures shared by the benches: the sample policy of `config/samples/support-agent.yaml`, a
//! policy of 500 tools, and the calls each path is measured with.
#![forbid(unsafe_code)]

use serde_json::{Value, json};
use tollgate_crds::AgentPolicy;
use tollgate_engine::CompiledPolicy;

/// The support agent's policy from config/samples.
pub fn sample_policy() -> CompiledPolicy {
    let text = include_str!("../../config/samples/support-agent.yaml");
    for document in serde_yaml::Deserializer::from_str(text) {
        let value: serde_yaml::Value =
            serde::Deserialize::deserialize(document).expect("valid YAML");
        if value["kind"] == "AgentPolicy" {
            let mut policy: AgentPolicy =
                serde_yaml::from_value(value).expect("a valid AgentPolicy");
            policy.metadata.namespace = Some("support".into());
            return CompiledPolicy::compile(&policy).expect("the sample compiles");
        }
    }
    panic!("no AgentPolicy in the sample")
}

/// A policy with `n` allowed tools `tool_0000`..., each with a string field constrained by
/// pattern and an enum, and 50 blocked tools.
pub fn wide_policy(n: usize) -> CompiledPolicy {
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

/// How fast this machine is right now, on one core, measured before a bench runs: the cloud
/// machines the figures come from swing by about 2x within hours, so figures from different runs
/// compare only through this line (or as ratios to a peer measured in the same run).
///
/// Three figures, each the best of five rounds of about 40 ms: SHA-256 over 1 KiB buffers (what
/// sealing and verifying audit records do), a JSON round trip of a 0.7 KB decision record (parse
/// and serialise, allocating: what the gateway does per call) and copying 64 MiB (memory bandwidth,
/// which neighbours on the same host share).
pub fn machine_reference() -> String {
    use sha2::{Digest, Sha256};
    use std::time::{Duration, Instant};

    fn best(mut round: impl FnMut() -> u64) -> f64 {
        (0..5)
            .map(|_| {
                let start = Instant::now();
                let mut units = 0;
                while start.elapsed() < Duration::from_millis(40) {
                    units += round();
                }
                units as f64 / start.elapsed().as_secs_f64()
            })
            .fold(0.0, f64::max)
    }
    let block = [0x5au8; 1024];
    let sha_bytes_per_s = best(|| {
        for _ in 0..64 {
            std::hint::black_box(Sha256::digest(std::hint::black_box(&block)));
        }
        64 * 1024
    });
    let object = json!({
        "schema": 1, "event": "decide", "time": "2026-11-26T19:39:35.824467088Z",
        "identity": {"username": "system:serviceaccount:support:agent-support-agent-v2",
                     "pod": "support-agent-5d8f9c7b6-x2k4q",
                     "tokenId": "0b7e3a4c-6f1d-4c1e-9a55-2f4e8d7c1b90"},
        "agent": "support/support-agent-v2", "run": "run-5", "step": 1,
        "tool": "update_order_status",
        "arguments": {"apiKey": "[REDACTED]", "order_ids": ["O-1001", "O-1002"], "status": "refunded"},
        "decision": {"decision": "allow", "rule": {"policy": "support/support-agent-v2",
            "generation": 3, "clause": "spec.tools.allowed[update_order_status]",
            "policyHash": "sha256:adaf035b0418a710f50ce0999330b201f0a28561d884ec923382756699f6dbed"}},
        "counters": {"steps": 1, "tokens": 1200, "costUsd": "0.0180"}, "latencyUs": 41
    })
    .to_string();
    let json_per_s = best(|| {
        for _ in 0..16 {
            let value: Value = serde_json::from_str(std::hint::black_box(&object)).unwrap();
            std::hint::black_box(serde_json::to_string(&value).unwrap());
        }
        16
    });
    let from = vec![1u8; 64 << 20];
    let mut to = vec![0u8; 64 << 20];
    let copy_bytes_per_s = best(|| {
        to.copy_from_slice(std::hint::black_box(&from));
        std::hint::black_box(&to);
        64 << 20
    });
    format!(
        "machine now (one core): SHA-256 {:.0} MB/s, JSON round trip of a 0.7 KB record {:.2} µs, memory copy {:.1} GB/s",
        sha_bytes_per_s / 1e6,
        1e6 / json_per_s,
        copy_bytes_per_s / 1e9
    )
}

/// Which way a figure is better, for the summary table.
#[derive(Debug, Clone, Copy)]
pub enum Better {
    Lower,
    Higher,
}

/// One row of bench/README.md's summary: Tollgate's figure beside its peer's or floor's from the
/// same run. `bench/run` sets `TOLLGATE_BENCH_REPORT` to a file and each benchmark appends its
/// rows there as JSON lines; without it, nothing is written.
pub fn report(
    benchmark: &str,
    what: &str,
    tollgate: f64,
    beside: &str,
    peer: f64,
    unit: &str,
    better: Better,
) {
    let Ok(path) = std::env::var("TOLLGATE_BENCH_REPORT") else {
        return;
    };
    let row = json!({
        "benchmark": benchmark, "what": what, "tollgate": tollgate, "beside": beside,
        "peer": peer, "unit": unit,
        "better": match better { Better::Lower => "lower", Better::Higher => "higher" },
    });
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {path}: {e}"));
    writeln!(file, "{row}").unwrap_or_else(|e| panic!("write {path}: {e}"));
}
