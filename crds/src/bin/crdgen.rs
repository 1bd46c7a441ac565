//! Writes Tollgate's CRDs to `config/crd/bases/` and `charts/tollgate/templates/crds/`.
//! Run from anywhere in the repository: `cargo run -p tollgate-crds --bin crdgen`.
#![forbid(unsafe_code)]

use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bases = root.join("config/crd/bases");
    let chart = root.join("charts/tollgate/templates/crds");
    std::fs::create_dir_all(&bases)?;
    std::fs::create_dir_all(&chart)?;
    for manifest in tollgate_crds::render() {
        std::fs::write(bases.join(&manifest.file_name), &manifest.yaml)?;
        std::fs::write(chart.join(&manifest.file_name), &manifest.chart_template)?;
        println!("wrote {}", manifest.file_name);
    }
    Ok(())
}
