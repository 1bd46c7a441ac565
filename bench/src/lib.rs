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
