//! The checked-in CRD manifests must be exactly what the types generate.

use std::path::Path;

const REGENERATE: &str = "cargo run -p tollgate-crds --bin crdgen";

#[test]
fn checked_in_crds_match_the_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut stale = Vec::new();
    for manifest in tollgate_crds::render() {
        for (dir, want) in [
            ("config/crd/bases", &manifest.yaml),
            ("charts/tollgate/templates/crds", &manifest.chart_template),
        ] {
            let path = root.join(dir).join(&manifest.file_name);
            match std::fs::read_to_string(&path) {
                Ok(have) if &have == want => {}
                Ok(_) => stale.push(format!(
                    "{dir}/{} differs from the types",
                    manifest.file_name
                )),
                Err(e) => stale.push(format!("{dir}/{} cannot be read: {e}", manifest.file_name)),
            }
        }
    }
    assert!(
        stale.is_empty(),
        "CRD manifests are out of date:\n  {}\nregenerate them with `{REGENERATE}`",
        stale.join("\n  ")
    );
}

/// Every field a user can write or read carries a description, so `kubectl explain` documents
/// the whole API.
#[test]
fn every_field_has_a_description() {
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, child) in properties {
                let child_path = format!("{path}.{name}");
                let described = child
                    .get("description")
                    .and_then(|d| d.as_str())
                    .is_some_and(|d| !d.trim().is_empty());
                // apiVersion, kind and metadata are Kubernetes' own, documented by the apiserver.
                let standard =
                    path.is_empty() && matches!(name.as_str(), "apiVersion" | "kind" | "metadata");
                if !described && !standard {
                    missing.push(child_path.clone());
                }
                walk(&child_path, child, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
        if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
            walk(&format!("{path}{{}}"), values, missing);
        }
    }
    let mut missing = Vec::new();
    for crd in tollgate_crds::crds() {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        walk(
            &crd.spec.names.kind,
            &schema["openAPIV3Schema"],
            &mut missing,
        );
    }
    assert!(
        missing.is_empty(),
        "fields without a description:\n  {}",
        missing.join("\n  ")
    );
}
