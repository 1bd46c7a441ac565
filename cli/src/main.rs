//! `kubectl tollgate`: see the crate documentation.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kubectl_tollgate::offline;

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-tollgate",
    version,
    about = "Tollgate for people: check policies, and (soon) approve, deny, kill and audit"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate AgentIdentity and AgentPolicy manifests offline, as admission will.
    Check {
        /// Files or directories (searched for *.yaml and *.yml).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print what a policy decides for one tool call on a fresh run.
    Decide {
        /// A file holding one AgentPolicy.
        #[arg(long)]
        policy: PathBuf,
        /// The tool's name, exactly as the agent would send it.
        #[arg(long)]
        tool: String,
        /// The call's arguments, as a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
        /// The run id.
        #[arg(long, default_value = "offline")]
        run_id: String,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check { paths } => {
            let report = offline::check(&paths)?;
            print!("{}", report.text);
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Decide {
            policy,
            tool,
            args,
            run_id,
        } => {
            let decision = offline::decide(&policy, &tool, &args, &run_id, jiff::Timestamp::now())?;
            println!("{}", serde_json::to_string_pretty(&decision)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
