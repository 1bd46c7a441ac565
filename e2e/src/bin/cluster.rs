//! `cargo run -p tollgate-e2e --bin cluster -- up`: a real single-node Kubernetes cluster on this
//! machine with Tollgate installed from its Helm chart and the samples applied, for trying every
//! kubectl flow of the README (see `tollgate_e2e::cluster`). It runs in network and mount
//! namespaces of its own until ^C (or SIGTERM), then stops everything and restores the host.
//!
//! `cargo run -p tollgate-e2e --bin cluster -- shell` opens a shell inside those namespaces with
//! KUBECONFIG set (the apiserver is reachable only there).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use tollgate_e2e::{User, cluster, image};

#[derive(Parser)]
#[command(
    name = "cluster",
    about = "A local single-node cluster with Tollgate installed"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the node, install Tollgate and the samples; stop everything on ^C.
    Up,
    /// A shell inside the running node's namespaces, KUBECONFIG set to the admin's.
    Shell,
}

/// Where `up` says which process holds the namespaces and which kubeconfig to use.
fn state_file() -> PathBuf {
    tollgate_e2e::repo_root().join("target/e2e-runs/cluster-up")
}

fn main() -> Result<()> {
    match Args::parse().command {
        Cmd::Up => up(),
        Cmd::Shell => shell(),
    }
}

fn up() -> Result<()> {
    if let Some(code) = cluster::isolate()? {
        let _ = std::fs::remove_file(state_file());
        std::process::exit(code);
    }
    // The test agent image, when it was built beside this binary (`cargo build -p tollgate-e2e`).
    let mut images = Vec::new();
    let agent = std::env::current_exe()?.with_file_name("e2e-agent");
    if agent.exists() {
        let mut spec = image::spec_of(&agent, "e2e-agent")?;
        spec.reference = "localhost/tollgate-e2e/agent:1".to_owned();
        spec.entrypoint = vec!["/usr/local/bin/e2e-agent".to_owned()];
        images.push(spec);
    }
    let node = cluster::cluster(&images);
    node.install_tollgate("tollgate-system", &[])?;
    let cp = node.control_plane();
    let samples = tollgate_e2e::repo_root().join("config/samples");
    for namespace in ["support", "deploy"] {
        cp.kubectl_ok(&["create", "namespace", namespace]);
    }
    cp.kubectl_ok(&[
        "apply",
        "-n",
        "support",
        "-f",
        &samples.join("support-agent.yaml").display().to_string(),
    ]);
    cp.kubectl_ok(&[
        "apply",
        "-n",
        "deploy",
        "-f",
        &samples.join("deploy-agent.yaml").display().to_string(),
    ]);
    let kubeconfig = cp.kubeconfig(User::Admin);
    std::fs::write(
        state_file(),
        format!("{}\n{}\n", std::process::id(), kubeconfig.display()),
    )?;
    println!(
        "\nTollgate runs on a single-node cluster (Kubernetes v1.34.4), the samples applied in \
         namespaces support and deploy.\n\
         The apiserver is reachable only inside the cluster's network namespace:\n\n  \
         cargo run -p tollgate-e2e --bin cluster -- shell\n\n\
         opens a shell there with KUBECONFIG={} (alice's: {}).\n\
         ^C here stops the cluster and removes everything it made.",
        kubeconfig.display(),
        cp.kubeconfig(User::Alice).display()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async { tollgate_runtime::server::shutdown_signal().await });
    println!("stopping the cluster");
    Ok(())
}

fn shell() -> Result<()> {
    let state = std::fs::read_to_string(state_file())
        .context("no cluster is up: run `cargo run -p tollgate-e2e --bin cluster -- up` first")?;
    let mut lines = state.lines();
    let (Some(pid), Some(kubeconfig)) = (lines.next(), lines.next()) else {
        bail!("{} is not what `up` writes", state_file().display());
    };
    let shell = std::env::var("SHELL").unwrap_or_else(|_| "bash".to_owned());
    let status = Command::new("nsenter")
        .args(["-t", pid, "-n", "-m", "--"])
        .arg(&shell)
        .env("KUBECONFIG", kubeconfig)
        .status()
        .context("run nsenter (util-linux)")?;
    std::process::exit(status.code().unwrap_or(1));
}
