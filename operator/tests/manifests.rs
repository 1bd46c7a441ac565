//! The chart ships the same operator RBAC as `config/rbac/operator.yaml` (the one the e2e tests
//! run the operator under), and the kustomize Deployment runs what the binary accepts.

use std::path::Path;

use serde_yaml::Value;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn documents(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn rules(docs: &[Value], kind: &str) -> Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))["rules"]
        .clone()
}

#[test]
fn the_chart_grants_the_operator_exactly_the_tested_rbac() {
    let config =
        documents(&std::fs::read_to_string(root().join("config/rbac/operator.yaml")).unwrap());
    // Render the few template expressions of the RBAC part by hand; helm is not needed for that.
    let template =
        std::fs::read_to_string(root().join("charts/tollgate/templates/operator.yaml")).unwrap();
    let rendered: String = template
        .lines()
        .filter(|l| !l.trim_start().starts_with("{{-"))
        .take_while(|l| !l.starts_with("kind: Deployment"))
        .map(|l| {
            l.replace("{{ $name }}", "tollgate-operator")
                .replace("{{ $ns }}", "tollgate-system")
                + "\n"
        })
        .collect();
    let rendered = rendered.trim_end().trim_end_matches("apiVersion: apps/v1");
    let chart = documents(rendered);
    for kind in ["ClusterRole", "Role"] {
        assert_eq!(
            rules(&chart, kind),
            rules(&config, kind),
            "{kind} rules differ"
        );
    }
    let kinds = |docs: &[Value]| {
        docs.iter()
            .map(|d| d["kind"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(kinds(&chart), kinds(&config));
}

#[test]
fn the_shipped_deployment_runs_as_the_operator_with_flags_it_knows() {
    let docs =
        documents(&std::fs::read_to_string(root().join("config/manager/manager.yaml")).unwrap());
    let spec = &docs[0]["spec"]["template"]["spec"];
    assert_eq!(spec["serviceAccountName"], Value::from("tollgate-operator"));
    let main = std::fs::read_to_string(root().join("operator/src/main.rs")).unwrap();
    for arg in spec["containers"][0]["args"].as_sequence().unwrap() {
        let flag = arg.as_str().unwrap().split('=').next().unwrap();
        let field = flag.trim_start_matches("--").replace('-', "_");
        assert!(
            main.contains(&format!("    {field}:")),
            "{flag} is not an operator flag"
        );
    }
}

#[test]
fn the_chart_grants_the_gateway_exactly_the_tested_rbac() {
    let config =
        documents(&std::fs::read_to_string(root().join("config/gateway/rbac.yaml")).unwrap());
    let template =
        std::fs::read_to_string(root().join("charts/tollgate/templates/gateway.yaml")).unwrap();
    let rbac = template
        .split("# Runtime objects")
        .next()
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with("{{"))
        .map(|l| l.replace("{{ $ns }}", "tollgate-system") + "\n")
        .collect::<String>();
    let chart = documents(rbac.trim_end().trim_end_matches("---"));
    assert_eq!(
        chart, config,
        "charts/tollgate/templates/gateway.yaml RBAC differs from config/gateway/rbac.yaml"
    );
}
