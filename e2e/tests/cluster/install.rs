//! Installing Tollgate on the node: the Helm chart with the locally built images, and the
//! kustomize path.

use tollgate_e2e::User;

use crate::support::{self, SYSTEM, Test, kubectl, tollgate};

pub fn tests() -> Vec<Test> {
    vec![
        Test {
            name: "the_chart_installs_every_part_as_pods_and_doctor_passes",
            run: the_chart_installs_every_part_as_pods_and_doctor_passes,
        },
        Test {
            name: "the_chart_takes_the_store_url_from_a_secret_and_writes_it_nowhere",
            run: the_chart_takes_the_store_url_from_a_secret_and_writes_it_nowhere,
        },
        Test {
            name: "the_chart_installs_alerts_and_the_dashboard_when_asked",
            run: the_chart_installs_alerts_and_the_dashboard_when_asked,
        },
    ]
}

fn the_chart_installs_alerts_and_the_dashboard_when_asked() {
    // Off by default: a cluster without the Prometheus Operator's CRDs installs as before.
    let plain = render(&[]).unwrap();
    assert!(!plain.contains("kind: PrometheusRule") && !plain.contains("tollgate-dashboard"));
    let manifests = render(&[
        "monitoring.prometheusRule.enabled=true",
        "monitoring.prometheusRule.labels.release=kube-prometheus-stack",
        "monitoring.grafanaDashboard.enabled=true",
    ])
    .unwrap();
    let documents: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&manifests)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let rule = documents
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("a PrometheusRule");
    assert_eq!(
        rule["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    // The rules are the ones promtool tests, untouched by the template.
    let shipped: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(
            tollgate_e2e::repo_root().join("charts/tollgate/files/alerts.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(rule["spec"]["groups"], shipped["groups"]);
    let dashboard = documents
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "tollgate-dashboard")
        .expect("the dashboard ConfigMap");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: serde_json::Value =
        serde_json::from_str(dashboard["data"]["tollgate.json"].as_str().unwrap()).unwrap();
    assert_eq!(json["uid"], "tollgate");
    // A misspelt key is named.
    let refused = render(&["monitoring.prometheusRule.enbled=true"]).unwrap_err();
    assert!(refused.contains("enbled"), "{refused}");
}

/// `helm template` of the chart with `sets`: the manifests, or helm's error.
fn render(sets: &[&str]) -> Result<String, String> {
    let chart = tollgate_e2e::repo_root().join("charts/tollgate");
    let mut helm = support::node().helm();
    helm.args(["template", "tollgate", "-n", SYSTEM])
        .arg(&chart);
    for set in sets {
        helm.args(["--set", set]);
    }
    let output = helm.output().unwrap();
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn the_chart_takes_the_store_url_from_a_secret_and_writes_it_nowhere() {
    let secret_ref = "valueFrom: {secretKeyRef: {name: \"tollgate-audit-store\", key: \"url\"}}";
    let manifests = render(&[
        "gateway.auditStoreSecret.name=tollgate-audit-store",
        "webhook.auditStoreSecret.name=tollgate-audit-store",
        "gateway.replicas=2",
    ])
    .expect("a store URL in a Secret is a PostgreSQL trail: two gateway replicas render");
    // Both the gateway and the webhook read it from the Secret; no manifest holds a URL.
    assert_eq!(manifests.matches(secret_ref).count(), 2, "{manifests}");
    assert!(!manifests.contains("postgres://") && !manifests.contains("host="));
    // A PostgreSQL trail: rolled, not recreated, and no SQLite volume.
    assert!(manifests.contains("strategy: {type: RollingUpdate}"));
    // Without it, the plain value as before, and a SQLite trail still refuses two replicas.
    let plain = render(&[]).unwrap();
    assert!(plain.contains("{name: TOLLGATE_AUDIT_STORE, value: \"/var/lib/tollgate/audit.db\"}"));
    assert!(!plain.contains("secretKeyRef: {name: \"tollgate-audit-store\""));
    let refused = render(&["gateway.replicas=2"]).unwrap_err();
    assert!(refused.contains("gateway.auditStoreSecret"), "{refused}");
    // The schema names a key it does not know.
    let refused = render(&["gateway.auditStoreSecret.nmae=x"]).unwrap_err();
    assert!(refused.contains("nmae"), "{refused}");
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
