//! `cargo run -p tollgate-e2e --bin images`: builds Tollgate's shipped binaries in release mode and
//! writes one image per binary under `target/images/`, daemonless (see `tollgate_e2e::image`).
//! Prints each image's name, archive and sizes, and how to load them.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    let written = tollgate_e2e::image::build_shipped()?;
    println!(
        "{:<46} {:>10} {:>10}  archive",
        "image", "rootfs", "archive"
    );
    for image in &written {
        let archive = std::fs::metadata(&image.path)?.len();
        println!(
            "{:<46} {:>8.1}MB {:>8.1}MB  {}",
            image.reference,
            image.layer_bytes as f64 / 1e6,
            archive as f64 / 1e6,
            image.path.display()
        );
    }
    println!(
        "\nLoad them with `docker load -i ARCHIVE`, `podman load -i ARCHIVE` or, on a node, \
         `ctr -n k8s.io images import ARCHIVE`; the chart and config/ name exactly these images."
    );
    Ok(())
}
