//! An object the apiserver holds but Tollgate cannot read must not blind Tollgate to every other
//! one. A test binary of its own, so its own control plane: the unreadable identity it writes
//! would be seen by every other test's watches.

use std::time::Duration;

use tollgate_e2e::{User, control_plane, install_crds, with_input};
use tollgate_runtime::cluster::{ClusterView, WatchedView};

fn identity(name: &str, end_port: u64) -> String {
    format!(
        r#"apiVersion: tollgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{name: {name}}}
spec:
  description: A test agent
  owner: {{team: t, contacts: [a@example.com]}}
  podSelector: {{matchLabels: {{app: {name}}}}}
  network:
    egress:
      - ports: [{{protocol: TCP, port: 443, endPort: {end_port}}}]
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentPolicy
metadata: {{name: {name}}}
spec:
  identityRef: {{name: {name}}}
  tools:
    allowed: [{{name: lookup}}]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_tollgate_cannot_read_is_left_out_and_the_others_are_served() {
    let cp = control_plane();
    install_crds();
    let ns = cp.namespace("unreadable").await;
    // An endPort the apiserver stores (the schema says int32 but bounds nothing) and Tollgate's
    // types cannot hold: as an object written under an older, looser schema would be.
    for manifest in [identity("good", 8443), identity("bad", 3_000_000_000)] {
        let output = with_input(
            cp.kubectl(User::Admin)
                .args(["apply", "-n", &ns, "-f", "-"]),
            &manifest,
        );
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stored = cp.kubectl_ok(&[
        "get",
        "agentidentity",
        "bad",
        "-n",
        &ns,
        "-o",
        "jsonpath={.spec.network.egress[0].ports[0].endPort}",
    ]);
    assert_eq!(stored, "3000000000", "the apiserver holds it as written");

    let view = WatchedView::start(cp.client(User::Admin).await, "tollgate-system");
    tokio::time::timeout(Duration::from_secs(30), view.ready())
        .await
        .expect("the watches sync though one object cannot be read");
    assert!(
        view.identity(&ns, "good").is_some(),
        "the others are served"
    );
    assert_eq!(view.policies_for(&ns, "good").len(), 1);
    assert!(
        view.identity(&ns, "bad").is_none(),
        "the unreadable one is left out: its agent is unknown, so refused"
    );
    let username = format!("system:serviceaccount:{ns}:agent-good");
    assert!(view.identity_by_username(&username).is_some());
}
