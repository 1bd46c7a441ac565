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
                Ok(_) => stale.push(format!("{dir}/{} differs from the types", manifest.file_name)),
                Err(e) => stale.push(format!("{dir}/{} cannot be read: {e}", manifest.file_name)),
            }
        }
    }
    assert!(stale.is_empty(), "CRD manifests are out of date:\n  {}\nregenerate them with `{REGENERATE}`", stale.join("\n  "));
}
