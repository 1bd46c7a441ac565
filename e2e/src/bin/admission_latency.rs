//! The latency the kube-apiserver's clients see with and without Tollgate's admission webhook,
//! on the local control plane. A benchmark, not a test: it prints a Markdown table.
//! `cargo run -p tollgate-e2e --release --bin admission-latency [iterations]`
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use tollgate_crds::{AgentIdentity, AgentPolicy};
use tollgate_e2e::admission::{register, unregister, webhook};
use tollgate_e2e::{User, control_plane};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn measure<F, Fut>(iterations: usize, mut operation: F) -> (Duration, Duration)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let start = Instant::now();
        operation(i).await;
        samples.push(start.elapsed());
    }
    samples.sort();
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

fn cm(name: String) -> ConfigMap {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": "v"}})).unwrap()
}

#[tokio::main]
async fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    webhook();
    let cp = control_plane();
    let admin = cp.client(User::Admin).await;
    let ns = tollgate_e2e::admission::namespace("latency").await;

    // An agent with rights on ConfigMaps, reached by impersonating its ServiceAccount.
    let username = format!("system:serviceaccount:{ns}:agent-bench");
    let identity: AgentIdentity = serde_json::from_value(json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentIdentity", "metadata": {"name": "bench"},
        "spec": {"description": "bench", "owner": {"team": "t", "contacts": ["a"]}, "podSelector": {"matchLabels": {"app": "bench"}}}})).unwrap();
    let policy: AgentPolicy = serde_json::from_value(json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentPolicy", "metadata": {"name": "bench"},
        "spec": {"identityRef": {"name": "bench"}, "kubernetes": {"protectedResources": [{"operations": ["DELETE"], "selector": {"matchLabels": {"env": "production"}}}]}}})).unwrap();
    let pp = PostParams::default();
    Api::<AgentIdentity>::namespaced(admin.clone(), &ns)
        .create(&pp, &identity)
        .await
        .unwrap();
    Api::<AgentPolicy>::namespaced(admin.clone(), &ns)
        .create(&pp, &policy)
        .await
        .unwrap();
    let role: Role = serde_json::from_value(json!({"metadata": {"name": "bench"}, "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "delete"]}]})).unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({"metadata": {"name": "bench"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "bench"},
        "subjects": [{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": username}]})).unwrap();
    Api::<Role>::namespaced(admin.clone(), &ns)
        .create(&pp, &role)
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), &ns)
        .create(&pp, &binding)
        .await
        .unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(cp.kubeconfig(User::Admin)).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    config.auth_info.impersonate = Some(username);
    let agent = Client::try_from(config).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await; // let the webhook's watches see the agent

    let mut rows = Vec::new();
    for (label, registered) in [("with the webhook", true), ("without the webhook", false)] {
        if registered {
            register()
        } else {
            unregister()
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let people: Api<ConfigMap> = Api::namespaced(admin.clone(), &ns);
        let agents: Api<ConfigMap> = Api::namespaced(agent.clone(), &ns);
        let policies: Api<AgentPolicy> = Api::namespaced(admin.clone(), &ns);
        let tag = if registered { "w" } else { "n" };
        let person = measure(iterations, |i| {
            let api = people.clone();
            async move {
                api.create(&PostParams::default(), &cm(format!("p-{tag}-{i}")))
                    .await
                    .unwrap();
            }
        })
        .await;
        let agent_write = measure(iterations, |i| {
            let api = agents.clone();
            async move {
                api.create(&PostParams::default(), &cm(format!("a-{tag}-{i}")))
                    .await
                    .unwrap();
            }
        })
        .await;
        let agent_delete = measure(iterations, |i| {
            let api = agents.clone();
            async move {
                api.delete(&format!("a-{tag}-{i}"), &DeleteParams::default())
                    .await
                    .unwrap();
            }
        })
        .await;
        let policy_apply = measure(iterations.min(100), |i| {
            let api = policies.clone();
            let mut p = policy.clone();
            p.metadata.name = Some(format!("p-{tag}-{i}"));
            async move {
                api.create(&PostParams::default(), &p).await.unwrap();
            }
        })
        .await;
        rows.push((label, person, agent_write, agent_delete, policy_apply));
    }
    register();
    let fmt = |(p50, p99): (Duration, Duration)| {
        format!(
            "{:.1} / {:.1} ms",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        )
    };
    println!(
        "p50 / p99 over {iterations} sequential requests (AgentPolicy: up to 100), on the local control plane:\n"
    );
    println!(
        "| webhook | person creates ConfigMap | agent creates ConfigMap | agent deletes ConfigMap | AgentPolicy create |"
    );
    println!("|---|---|---|---|---|");
    for (label, a, b, c, d) in rows {
        println!(
            "| {label} | {} | {} | {} | {} |",
            fmt(a),
            fmt(b),
            fmt(c),
            fmt(d)
        );
    }
}
