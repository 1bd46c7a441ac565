//! `kubectl tollgate`: see the crate documentation.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kubectl_tollgate::{audit, offline};

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-tollgate",
    version,
    about = "Tollgate for people: check policies, replay and verify the audit trail, and (soon) approve, deny and kill"
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
    /// Read the audit trail: replay a run, verify the hash chain, export, what-if.
    Audit {
        /// The audit store: a SQLite file (`sqlite:PATH` or a path), a PostgreSQL URL, or the
        /// gateway's read API in a cluster (`https://…`).
        #[arg(
            long,
            env = "TOLLGATE_AUDIT_STORE",
            default_value = "tollgate-audit.db"
        )]
        store: audit::Location,
        /// Bearer token for the gateway's read API (for example `kubectl create token`).
        #[arg(long, env = "TOLLGATE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// PEM CA bundle that signs the gateway's certificate.
        #[arg(long, env = "TOLLGATE_CA_FILE")]
        ca: Option<PathBuf>,
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Print a run as a timeline: who, what, which rule, approved by whom, budgets at each step.
    Replay {
        /// The run id.
        #[arg(long)]
        run: String,
        /// Print the records as JSON lines instead.
        #[arg(long)]
        json: bool,
    },
    /// Check every chain; name the first record that breaks one. Exits 1 on a break.
    Verify {
        /// Also check each record's index columns against its body.
        #[arg(long)]
        deep: bool,
        /// A head kept outside the database (as printed by an earlier verify), CHAIN:SEQ:HASH;
        /// catches a rewritten or truncated tail. Repeatable.
        #[arg(long = "head")]
        heads: Vec<String>,
    },
    /// Write the records of a window as JSON lines.
    Export {
        /// How far back, such as 720h.
        #[arg(long, default_value = "720h")]
        since: String,
        /// Only this agent (namespace/name).
        #[arg(long)]
        agent: Option<String>,
    },
    /// Re-evaluate the recorded calls of a policy's agent against a candidate policy and list
    /// every decision that would change.
    WhatIf {
        /// A file holding the candidate AgentPolicy.
        #[arg(long)]
        policy: PathBuf,
        /// How far back, such as 720h.
        #[arg(long, default_value = "720h")]
        since: String,
        /// Print JSON instead.
        #[arg(long)]
        json: bool,
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
        Command::Audit {
            mut store,
            token,
            ca,
            command,
        } => {
            if let audit::Location::Gateway(remote) = &mut store {
                remote.token = token;
                remote.ca = ca;
            }
            let now = jiff::Timestamp::now();
            let action = match command {
                AuditCommand::Replay { run, json } => audit::Action::Replay { run, json },
                AuditCommand::Verify { deep, heads } => audit::Action::Verify { deep, heads },
                AuditCommand::Export { since, agent } => audit::Action::Export {
                    since: audit::since(&since, now)?,
                    agent,
                },
                AuditCommand::WhatIf {
                    policy,
                    since,
                    json,
                } => audit::Action::WhatIf {
                    policy,
                    since: audit::since(&since, now)?,
                    json,
                },
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let outcome = runtime.block_on(audit::run(&store, action))?;
            print!("{}", outcome.text);
            Ok(if outcome.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
