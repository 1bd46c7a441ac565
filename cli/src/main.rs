//! `kubectl tollgate`: see the crate documentation.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kubectl_tollgate::{audit, offline, people};
use tollgate_crds::approval::Verdict;

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-tollgate",
    version,
    about = "Tollgate for people: approve or deny held tool calls, engage kill switches, replay and verify the audit trail, see graduation and drift, check policies and the installation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Approve a held tool call: appends your Approve to the ApprovalRequest's decisions
    /// (admission stamps you as its author).
    Approve {
        #[command(flatten)]
        request: Request,
    },
    /// Deny a held tool call: one Deny is final.
    Deny {
        #[command(flatten)]
        request: Request,
    },
    /// List the approval requests waiting for a decision (with --gateway: those listing you).
    Approvals {
        /// Only this namespace (default: every namespace).
        #[arg(short, long)]
        namespace: Option<String>,
        /// Decided and expired ones too.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        gateway: GatewayDesk,
    },
    /// Engage an agent's kill switch (or with --all every agent's): its next call is denied and
    /// its waiting calls are released as denied.
    Kill {
        #[command(flatten)]
        switch: Switch,
    },
    /// Drill an agent's kill switch: engage it, check each plane holds (the gateway refuses,
    /// the RoleBinding is gone, egress is denied, writes are refused) and how fast, release it,
    /// check each is restored, and record the drill in status.lastKillSwitchDrill. Exits 1 when
    /// a plane did not hold or was not restored (the switch is released either way).
    Drill {
        /// The agent's AgentIdentity.
        name: String,
        /// Its namespace (default: the kubeconfig context's).
        #[arg(short, long)]
        namespace: Option<String>,
        /// The gateway as this machine reaches it (say through `kubectl port-forward`), to check
        /// that it refuses the agent's calls.
        #[arg(long, env = "TOLLGATE_GATEWAY")]
        gateway: Option<String>,
        /// A PEM bundle to trust for the gateway's TLS.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// How long each plane may take to hold, and to be restored.
        #[arg(long, default_value = "60s", value_parser = seconds)]
        timeout: std::time::Duration,
    },
    /// Release an agent's kill switch (or with --all the global one).
    Unkill {
        #[command(flatten)]
        switch: Switch,
    },
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
    /// Check the installation: CRDs, admission webhooks, the operator's lease, the global kill
    /// switch, and every agent's identity and policy. Exits 1 on any failure.
    Doctor {
        /// Only the agents of this namespace (default: every namespace).
        #[arg(short, long)]
        namespace: Option<String>,
        /// The namespace Tollgate runs in.
        #[arg(long, env = "TOLLGATE_NAMESPACE", default_value = "tollgate-system")]
        tollgate_namespace: String,
        /// Print the ten pre-production items per agent (pass, FAIL or unknown, and why)
        /// instead; exits 1 when an item fails.
        #[arg(long)]
        checklist: bool,
        /// With --checklist: read the agents from these manifests (files or directories)
        /// instead of a cluster; what only a cluster can say is unknown.
        #[arg(long = "from", requires = "checklist")]
        from: Vec<PathBuf>,
    },
    /// What every agent is doing now, from the audit trail, refreshing in place: calls per
    /// minute, calls and refusals this hour, tokens and cost against its ceilings, halted runs,
    /// approvals waiting, kill switch.
    Top {
        /// The audit store: a SQLite file, a PostgreSQL URL, or the gateway's read API.
        #[arg(
            long,
            env = "TOLLGATE_AUDIT_STORE",
            default_value = "tollgate-audit.db"
        )]
        store: audit::Location,
        /// Bearer token for the gateway's read API.
        #[arg(long, env = "TOLLGATE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A PEM bundle that signs the gateway's certificate.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// AgentPolicy manifests (files or directories) whose ceilings to show.
        #[arg(long)]
        policies: Vec<PathBuf>,
        /// How often to refresh.
        #[arg(long, default_value = "2s", value_parser = seconds)]
        interval: std::time::Duration,
        /// Print one table and exit (for scripts).
        #[arg(long)]
        once: bool,
    },
    /// Read the audit trail: replay a run, verify the hash chain, export, what-if, drift.
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

#[derive(Debug, clap::Args)]
struct Request {
    /// The ApprovalRequest (`NAME`, or `NAMESPACE/NAME` with --gateway).
    name: String,
    /// Its namespace (default: the kubeconfig context's; with --gateway, `default`).
    #[arg(short, long)]
    namespace: Option<String>,
    /// What you want on the record.
    #[arg(short = 'm', long = "message")]
    comment: Option<String>,
    #[command(flatten)]
    gateway: GatewayDesk,
}

/// A standalone gateway's approvals, instead of a cluster's.
#[derive(Debug, clap::Args)]
struct GatewayDesk {
    /// Decide at a standalone gateway (`http://127.0.0.1:8480`) instead of in a cluster, with
    /// the approver's key from TOLLGATE_APPROVER_KEY (never a flag: it would show in `ps`).
    #[arg(long, env = "TOLLGATE_GATEWAY")]
    gateway: Option<String>,
}

#[derive(Debug, clap::Args)]
struct Switch {
    /// The agent's AgentIdentity.
    name: Option<String>,
    /// Its namespace (default: the kubeconfig context's).
    #[arg(short, long)]
    namespace: Option<String>,
    /// The global switch, for every agent: the ConfigMap tollgate-kill-switch.
    #[arg(long)]
    all: bool,
    /// Why, for the people who will read the audit trail.
    #[arg(long)]
    reason: Option<String>,
    /// The namespace Tollgate runs in (where the global switch lives).
    #[arg(long, env = "TOLLGATE_NAMESPACE", default_value = "tollgate-system")]
    tollgate_namespace: String,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Print a run as a timeline: who, what, which rule, approved by whom, budgets at each step.
    /// With --agent instead, everything that agent did in a window: its tool calls and, where
    /// admission records them, its own Kubernetes writes.
    Replay {
        /// The run id.
        #[arg(long, required_unless_present = "agent", conflicts_with = "agent")]
        run: Option<String>,
        /// The agent (namespace/name), over --since.
        #[arg(long)]
        agent: Option<String>,
        /// How far back with --agent, such as 24h.
        #[arg(long, default_value = "24h", requires = "agent")]
        since: String,
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
    /// Permission drift and graduation for a policy's agent: each allowed tool's clean
    /// completions and incidents in the policy's graduation window, when it was last called, the
    /// autonomy its record makes it eligible for, and the allowed tools it did not call.
    Drift {
        /// A file holding the AgentPolicy.
        #[arg(long)]
        policy: PathBuf,
        /// The drift window: allowed tools not called in it are reported, such as 720h.
        #[arg(long, default_value = "720h")]
        since: String,
        /// Print JSON (as the AgentPolicy's status.tools and status.drift) instead.
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

/// Runs `action` to completion on a runtime of one thread.
fn block_on<T>(action: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(action)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Approve { request } | Command::Deny { request }
            if request.name.trim().is_empty() =>
        {
            anyhow::bail!("name the ApprovalRequest")
        }
        Command::Approve { request } => {
            print!("{}", block_on(decide(request, Verdict::Approve))?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Deny { request } => {
            print!("{}", block_on(decide(request, Verdict::Deny))?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Approvals {
            namespace,
            all,
            gateway,
        } => {
            let listed = match gateway.gateway {
                Some(url) => block_on(people::list_at_gateway(
                    &url,
                    &approver_key()?,
                    namespace.as_deref(),
                ))?,
                None => block_on(people::list(namespace.as_deref()))?,
            };
            print!("{}", people::table(&listed, all, jiff::Timestamp::now()));
            Ok(ExitCode::SUCCESS)
        }
        Command::Drill {
            name,
            namespace,
            gateway,
            ca,
            timeout,
        } => block_on(async {
            let config = kube::Config::infer().await.map_err(|e| {
                anyhow::anyhow!("no usable kubeconfig (set KUBECONFIG, or run in a pod): {e}")
            })?;
            let namespace = namespace.unwrap_or_else(|| config.default_namespace.clone());
            let drill = kubectl_tollgate::drill::Drill {
                namespace,
                name,
                gateway,
                ca,
                timeout,
            };
            let report = kubectl_tollgate::drill::run(config, &drill).await?;
            print!("{}", report.text());
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }),
        Command::Kill { switch } => {
            print!("{}", block_on(kill(switch, true))?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Unkill { switch } => {
            print!("{}", block_on(kill(switch, false))?);
            Ok(ExitCode::SUCCESS)
        }
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
        Command::Doctor {
            checklist: true,
            namespace,
            tollgate_namespace,
            from,
        } => {
            let now = jiff::Timestamp::now();
            let lists = if from.is_empty() {
                block_on(async {
                    let (client, _) = people::client(None).await?;
                    kubectl_tollgate::checklist::in_cluster(
                        client,
                        &tollgate_namespace,
                        namespace.as_deref(),
                        now,
                    )
                    .await
                })?
            } else {
                kubectl_tollgate::checklist::offline(&from, now)?
            };
            print!("{}", lists.text());
            Ok(if lists.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Doctor {
            namespace,
            tollgate_namespace,
            ..
        } => block_on(async {
            let (client, _) = people::client(None).await?;
            let report = kubectl_tollgate::doctor::run(
                client,
                &tollgate_namespace,
                namespace.as_deref(),
                jiff::Timestamp::now(),
            )
            .await;
            print!("{}", report.text());
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }),
        Command::Top {
            mut store,
            token,
            ca,
            policies,
            interval,
            once,
        } => {
            if let audit::Location::Gateway(remote) = &mut store {
                remote.token = token;
                remote.ca = ca;
            }
            let policies = kubectl_tollgate::offline::policies(&policies)?;
            let shown = match &store {
                audit::Location::Sqlite(path) => path.display().to_string(),
                audit::Location::Postgres(_) => "PostgreSQL".to_owned(),
                audit::Location::Gateway(remote) => remote.url.clone(),
            };
            block_on(async {
                loop {
                    let now = jiff::Timestamp::now();
                    let entries =
                        audit::entries_since(&store, now - kubectl_tollgate::top::WINDOW).await?;
                    let rows = kubectl_tollgate::top::rows(&entries, now);
                    let heading = format!(
                        "tollgate top · {shown} · {} · the last hour{}",
                        now.round(jiff::Unit::Second).unwrap_or(now),
                        if once { "" } else { " · ^C to quit" }
                    );
                    let table = kubectl_tollgate::top::table(&rows, &policies, &heading);
                    if once {
                        print!("{table}");
                        return Ok(ExitCode::SUCCESS);
                    }
                    // Home and clear, then the table: it refreshes in place.
                    print!("\x1b[H\x1b[2J{table}");
                    use std::io::Write as _;
                    std::io::stdout().flush()?;
                    tokio::select! {
                        _ = tokio::time::sleep(interval) => {}
                        _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
                    }
                }
            })
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
                AuditCommand::Replay {
                    run,
                    agent,
                    since,
                    json,
                } => audit::Action::Replay {
                    of: match (run, agent) {
                        (Some(run), _) => audit::Replayed::Run(run),
                        (None, agent) => audit::Replayed::Agent {
                            agent: agent.unwrap_or_default(),
                            since: audit::since(&since, now)?,
                        },
                    },
                    json,
                },
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
                AuditCommand::Drift {
                    policy,
                    since,
                    json,
                } => {
                    audit::since(&since, now)?;
                    audit::Action::Drift {
                        policy,
                        window: since,
                        now,
                        json,
                    }
                }
            };
            let outcome = block_on(audit::run(&store, action))?;
            print!("{}", outcome.text);
            Ok(if outcome.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// The approver's key a standalone gateway authenticates.
fn approver_key() -> anyhow::Result<String> {
    match std::env::var("TOLLGATE_APPROVER_KEY") {
        Ok(key) if !key.trim().is_empty() => Ok(key.trim().to_owned()),
        _ => anyhow::bail!(
            "--gateway needs your approver's key in TOLLGATE_APPROVER_KEY (a key with \
             role: approver in the gateway's key file)"
        ),
    }
}

async fn decide(request: Request, verdict: Verdict) -> anyhow::Result<String> {
    if let Some(url) = &request.gateway.gateway {
        let (namespace, name) = match request.name.split_once('/') {
            Some((namespace, name)) => (namespace.to_owned(), name.to_owned()),
            None => (
                request
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".to_owned()),
                request.name.clone(),
            ),
        };
        return people::decide_at_gateway(
            url,
            &approver_key()?,
            &namespace,
            &name,
            verdict,
            request.comment.as_deref(),
        )
        .await;
    }
    let (client, namespace) = people::client(request.namespace.as_deref()).await?;
    people::decide(
        client,
        &namespace,
        &request.name,
        verdict,
        request.comment.as_deref(),
    )
    .await
}

async fn kill(switch: Switch, engaged: bool) -> anyhow::Result<String> {
    let name = people::target(switch.name.as_deref(), switch.all)?;
    let (client, namespace) = people::client(switch.namespace.as_deref()).await?;
    people::kill(
        client,
        name,
        &namespace,
        &switch.tollgate_namespace,
        engaged,
        switch.reason.as_deref(),
    )
    .await
}

/// A duration such as `60s`, `2m` or `1h`.
fn seconds(text: &str) -> Result<std::time::Duration, String> {
    let duration = tollgate_engine::duration::parse(text)?;
    if duration.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    Ok(duration)
}
