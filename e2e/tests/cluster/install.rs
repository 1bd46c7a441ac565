//! Installing Tollgate on the node: the Helm chart with the locally built images, and the
//! kustomize path.

use tollgate_e2e::User;

use crate::support::{self, SYSTEM, Test, kubectl, tollgate};

pub fn tests() -> Vec<Test> {
    vec![Test {
        name: "the_chart_installs_every_part_as_pods_and_doctor_passes",
        run: the_chart_installs_every_part_as_pods_and_doctor_passes,
    }]
}

fn the_chart_installs_every_part_as_pods_and_doctor_passes() {
    support::installed();
    for (deployment, replicas) in [
        ("tollgate-operator", "2"),
        ("tollgate-webhook", "2"),
        ("tollgate-gateway", "1"),
    ] {
        let ready = kubectl(&[
            "-n",
            SYSTEM,
            "get",
            "deployment",
            deployment,
            "-o",
            "jsonpath={.status.readyReplicas}",
        ]);
        assert_eq!(ready, replicas, "{deployment}");
    }
    // Every pod runs Tollgate's own image, as uid 65532.
    let images = kubectl(&[
        "-n",
        SYSTEM,
        "get",
        "pods",
        "-o",
        "jsonpath={range .items[*]}{.spec.containers[0].image} {.status.containerStatuses[0].ready}{\"\\n\"}{end}",
    ]);
    for line in images.lines() {
        assert!(line.starts_with("ghcr.io/tollgate-dev/tollgate-"), "{line}");
        assert!(line.ends_with(" true"), "{line}");
    }
    let output = tollgate(User::Admin, &["doctor"]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "doctor failed:\n{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
