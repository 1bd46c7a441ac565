//! `kubectl tollgate audit …`: replay, verify, export and what-if, reading the audit store
//! directly (standalone mode).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use jiff::Timestamp;
use tollgate_audit::replay::{self, Step};
use tollgate_audit::{Head, PostgresStore, Query, SqliteStore, Store, verify};

/// Where the audit store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL connection string.
    Postgres(String),
}

impl std::str::FromStr for Location {
    type Err = String;

    /// `postgres://…`, `postgresql://…` or `host=… dbname=…` is PostgreSQL; `sqlite:PATH` or a
    /// plain path is SQLite.
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("the audit store location is empty".to_owned());
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") || s.contains("host=") {
            return Ok(Self::Postgres(s.to_owned()));
        }
        let path = s.strip_prefix("sqlite:").unwrap_or(s);
        let path = path.strip_prefix("//").unwrap_or(path);
        Ok(Self::Sqlite(path.into()))
    }
}

/// What to do with the store.
#[derive(Debug, Clone)]
pub enum Action {
    /// A run as a timeline (or JSON).
    Replay {
        /// The run id.
        run: String,
        /// JSON lines instead of text.
        json: bool,
    },
    /// Verify every chain.
    Verify {
        /// Also check index columns against bodies.
        deep: bool,
        /// Heads kept elsewhere, as `CHAIN:SEQ:HASH`.
        heads: Vec<String>,
    },
    /// Records since a time, as JSON lines.
    Export {
        /// Start of the window.
        since: Timestamp,
        /// Only this agent.
        agent: Option<String>,
    },
    /// Re-evaluate recorded calls against a candidate policy.
    WhatIf {
        /// A file holding one AgentPolicy.
        policy: std::path::PathBuf,
        /// Start of the window.
        since: Timestamp,
        /// JSON instead of text.
        json: bool,
    },
}

/// The command's output and whether it succeeded.
#[derive(Debug)]
pub struct Outcome {
    /// What to print.
    pub text: String,
    /// False when verification found a break.
    pub ok: bool,
}

/// `now - duration`, for `--since 720h`.
pub fn since(duration: &str, now: Timestamp) -> Result<Timestamp> {
    let span = tollgate_engine::duration::parse(duration)
        .map_err(|e| anyhow::anyhow!("--since {duration:?}: {e}"))?;
    let span = jiff::SignedDuration::try_from(span).context("--since is too long")?;
    now.checked_sub(span)
        .context("--since reaches before the epoch")
}

/// Runs `action` against the store at `location`.
pub async fn run(location: &Location, action: Action) -> Result<Outcome> {
    match location {
        Location::Sqlite(path) => {
            if !path.exists() {
                bail!(
                    "audit store {} does not exist (give --store or TOLLGATE_AUDIT_STORE)",
                    path.display()
                );
            }
            let store = SqliteStore::open(path)
                .with_context(|| format!("open audit store {}", path.display()))?;
            act(&store, action).await
        }
        Location::Postgres(url) => {
            let store = PostgresStore::connect(url)
                .await
                .context("connect to the PostgreSQL audit store")?;
            act(&store, action).await
        }
    }
}

fn parse_head(text: &str) -> Result<(String, Head)> {
    let mut parts = text.rsplitn(3, ':');
    let (Some(hash), Some(seq), Some(chain)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("--head {text:?}: expected CHAIN:SEQ:HASH");
    };
    let seq = seq
        .parse()
        .with_context(|| format!("--head {text:?}: {seq:?} is not a sequence number"))?;
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("--head {text:?}: the hash must be 64 hex digits");
    }
    Ok((
        chain.to_owned(),
        Head {
            seq,
            hash: hash.to_ascii_lowercase(),
        },
    ))
}

async fn read<S: Store>(store: &S, query: Query) -> Result<Vec<Step>> {
    let records = store.query(&query).await?;
    Ok(replay::steps(&records)?)
}

async fn act<S: Store>(store: &S, action: Action) -> Result<Outcome> {
    let mut text = String::new();
    match action {
        Action::Replay { run, json } => {
            let steps = read(
                store,
                Query {
                    run: Some(run.clone()),
                    ..Query::default()
                },
            )
            .await?;
            if steps.is_empty() {
                bail!("the audit store holds no record of run {run:?}");
            }
            if json {
                for step in &steps {
                    writeln!(text, "{}", serde_json::to_string(step)?)?;
                }
            } else {
                text = replay::timeline(&steps);
            }
        }
        Action::Verify { deep, heads } => {
            let heads: BTreeMap<String, Head> =
                heads.iter().map(|h| parse_head(h)).collect::<Result<_>>()?;
            match verify(store, deep, &heads).await {
                Ok(reports) => {
                    if reports.is_empty() {
                        writeln!(text, "the audit store holds no records")?;
                    }
                    for report in reports {
                        let from = report.anchor.as_ref().map_or(1, |a| a.seq + 1);
                        match &report.head {
                            Some(head) => writeln!(
                                text,
                                "ok   chain {}: records {from}..{} verified ({} record(s){}); head {}:{}:{}",
                                report.chain,
                                head.seq,
                                report.records,
                                report
                                    .anchor
                                    .as_ref()
                                    .map(|a| format!(", after checkpoint at {}", a.seq))
                                    .unwrap_or_default(),
                                report.chain,
                                head.seq,
                                head.hash
                            )?,
                            None => writeln!(text, "ok   chain {}: empty", report.chain)?,
                        }
                    }
                }
                Err(tollgate_audit::VerifyError::Broken(broken)) => {
                    writeln!(text, "FAIL {broken}")?;
                    return Ok(Outcome { text, ok: false });
                }
                Err(e) => return Err(e.into()),
            }
        }
        Action::Export { since, agent } => {
            let steps = read(
                store,
                Query {
                    agent,
                    since_us: Some(since.as_microsecond()),
                    ..Query::default()
                },
            )
            .await?;
            for step in &steps {
                writeln!(text, "{}", serde_json::to_string(step)?)?;
            }
        }
        Action::WhatIf {
            policy,
            since,
            json,
        } => {
            let candidate = crate::offline::load_policy(Path::new(&policy))?;
            let steps = read(
                store,
                Query {
                    since_us: Some(since.as_microsecond()),
                    ..Query::default()
                },
            )
            .await?;
            let result = replay::what_if(&candidate, &steps);
            if json {
                text = serde_json::to_string_pretty(&result)?;
                text.push('\n');
            } else {
                writeln!(
                    text,
                    "{} recorded call(s) of agent {} re-evaluated against {} ({}); {} would change",
                    result.evaluated,
                    candidate.identity(),
                    candidate.id(),
                    candidate.hash(),
                    result.changes.len()
                )?;
                for change in &result.changes {
                    writeln!(
                        text,
                        "  {}  run {} step {}  {}: {} -> {}{}",
                        change.time,
                        change.run,
                        change.step.map(|s| s.to_string()).unwrap_or("-".into()),
                        change.tool,
                        describe(&change.recorded),
                        describe(&change.candidate),
                        if change.redacted_arguments {
                            "  (arguments were partly redacted)"
                        } else {
                            ""
                        }
                    )?;
                }
            }
        }
    }
    Ok(Outcome { text, ok: true })
}

fn describe(decision: &tollgate_engine::Decision) -> String {
    use tollgate_engine::Decision;
    match decision {
        Decision::Allow { .. } => "allowed".to_owned(),
        Decision::Deny { code, message, .. } => format!("denied {} ({message})", code.as_str()),
        Decision::RequireApproval { .. } => "needs approval".to_owned(),
        Decision::Halt { message, .. } => format!("halted ({message})"),
    }
}
