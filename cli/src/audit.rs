//! `kubectl tollgate audit …`: replay, verify, export and what-if, reading the audit store
//! directly (standalone mode) or, in a cluster, through the gateway's authenticated read API
//! (`--store https://…`, a bearer token the apiserver accepts). Records read through the gateway
//! are sealed; every seal is checked here before anything is printed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use jiff::Timestamp;
use serde_json::json;
use tollgate_audit::replay::{self, Step};
use tollgate_audit::standing;
use tollgate_audit::{Head, PostgresStore, Query, Record, SqliteStore, Store, verify};

/// Where the audit store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL connection string.
    Postgres(String),
    /// The gateway's read API (`https://…`; `http://` only on loopback).
    Gateway(Remote),
}

/// The gateway's read API and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// Its base URL.
    pub url: String,
    /// The bearer token (a person's or ServiceAccount's token the apiserver accepts).
    pub token: Option<String>,
    /// A PEM CA bundle that signs the gateway's certificate.
    pub ca: Option<std::path::PathBuf>,
}

impl std::str::FromStr for Location {
    type Err = String;

    /// `postgres://…`, `postgresql://…` or `host=… dbname=…` is PostgreSQL; `sqlite:PATH` or a
    /// plain path is SQLite.
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("the audit store location is empty".to_owned());
        }
        if let tollgate_audit::StoreLocation::Postgres(url) =
            tollgate_audit::StoreLocation::parse(s)
        {
            return Ok(Self::Postgres(url));
        }
        if let Some(rest) = s.strip_prefix("http://") {
            let host = rest.split(['/', ':']).next().unwrap_or_default();
            if !matches!(host, "127.0.0.1" | "localhost" | "[") && !rest.starts_with("[::1]") {
                return Err(format!(
                    "{s}: plain http would send the token in the clear; use https (http is accepted on loopback only)"
                ));
            }
        }
        if s.starts_with("https://") || s.starts_with("http://") {
            return Ok(Self::Gateway(Remote {
                url: s.trim_end_matches('/').to_owned(),
                token: None,
                ca: None,
            }));
        }
        match tollgate_audit::StoreLocation::parse(s) {
            tollgate_audit::StoreLocation::Sqlite(path) => Ok(Self::Sqlite(path)),
            tollgate_audit::StoreLocation::Postgres(url) => Ok(Self::Postgres(url)),
        }
    }
}

/// What [`Action::Replay`] replays.
#[derive(Debug, Clone)]
pub enum Replayed {
    /// One run, whole.
    Run(String),
    /// Everything one agent (`namespace/name`) did since a time: calls, outcomes, approvals,
    /// and admission's verdicts on its own Kubernetes writes.
    Agent {
        /// The agent.
        agent: String,
        /// Start of the window.
        since: Timestamp,
    },
}

/// What to do with the store.
#[derive(Debug, Clone)]
pub enum Action {
    /// A run, or an agent over a window, as a timeline (or JSON).
    Replay {
        /// What to replay.
        of: Replayed,
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
    /// A policy's standing: each allowed tool's track record and eligibility, and the allowed
    /// tools its agent did not call.
    Drift {
        /// A file holding the AgentPolicy.
        policy: std::path::PathBuf,
        /// The drift window, such as 720h.
        window: String,
        /// The time the windows end.
        now: Timestamp,
        /// JSON (as the AgentPolicy's `status.tools` and `status.drift`) instead of text.
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
        Location::Gateway(remote) => act(&remote.client()?, action).await,
    }
}

/// What the commands read: a store, or the gateway.
trait Source {
    fn records(&self, query: Query) -> impl std::future::Future<Output = Result<Vec<Record>>>;
    /// The store itself, for `verify`, which walks whole chains.
    fn store(&self) -> Option<&impl Store>;
}

impl<S: Store> Source for S {
    async fn records(&self, query: Query) -> Result<Vec<Record>> {
        Ok(self.query(&query).await?)
    }
    fn store(&self) -> Option<&impl Store> {
        Some(self)
    }
}

/// A client of the gateway's read API.
struct GatewayClient {
    url: String,
    token: String,
    http: reqwest::Client,
}

impl Remote {
    fn client(&self) -> Result<GatewayClient> {
        let token = self.token.clone().filter(|t| !t.is_empty()).context(
            "reading through the gateway needs a bearer token: give --token or TOLLGATE_TOKEN",
        )?;
        let mut builder = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = &self.ca {
            let pem = std::fs::read(ca).with_context(|| format!("read --ca {}", ca.display()))?;
            for certificate in reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("--ca {}: not a PEM bundle", ca.display()))?
            {
                builder = builder.add_root_certificate(certificate);
            }
        }
        Ok(GatewayClient {
            url: self.url.clone(),
            token,
            http: builder.build()?,
        })
    }
}

impl Source for GatewayClient {
    async fn records(&self, query: Query) -> Result<Vec<Record>> {
        let mut params = Vec::new();
        if let Some(run) = &query.run {
            params.push(("run", run.clone()));
        }
        if let Some(agent) = &query.agent {
            params.push(("agent", agent.clone()));
        }
        if let Some(since) = query.since_us {
            let since = Timestamp::from_microsecond(since).context("--since")?;
            params.push(("since", since.to_string()));
        }
        let url = format!("{}/v1/audit/records", self.url);
        let answer = self
            .http
            .get(&url)
            .query(&params)
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = answer.status();
        let text = answer.text().await.context("read the gateway's answer")?;
        if !status.is_success() {
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or(text);
            bail!("the gateway refused the read ({status}): {message}");
        }
        let mut records = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
            let wire: Wire = serde_json::from_str(line)
                .with_context(|| format!("record {} of the answer is malformed", i + 1))?;
            if tollgate_audit::record::seal(&wire.chain, wire.seq, &wire.prev, &wire.body)
                != wire.hash
            {
                bail!(
                    "record {}:{} from the gateway does not match its seal: refusing to show it",
                    wire.chain,
                    wire.seq
                );
            }
            let entry = tollgate_audit::record::parse_body(&wire.body).with_context(|| {
                format!("record {}:{} has an unreadable body", wire.chain, wire.seq)
            })?;
            records.push(Record {
                index: tollgate_audit::record::Index::of(&entry),
                chain: wire.chain,
                seq: wire.seq,
                prev: wire.prev,
                hash: wire.hash,
                body: wire.body,
            });
        }
        Ok(records)
    }
    fn store(&self) -> Option<&impl Store> {
        None::<&SqliteStore>
    }
}

#[derive(serde::Deserialize)]
struct Wire {
    chain: String,
    seq: u64,
    prev: String,
    hash: String,
    body: String,
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

/// Every record since `since` at `location`, as entries, oldest first (for `top`).
pub async fn entries_since(
    location: &Location,
    since: Timestamp,
) -> Result<Vec<tollgate_audit::Entry>> {
    let query = Query {
        since_us: Some(since.as_microsecond()),
        ..Query::default()
    };
    let records = match location {
        Location::Sqlite(path) => {
            if !path.exists() {
                bail!(
                    "audit store {} does not exist (give --store or TOLLGATE_AUDIT_STORE)",
                    path.display()
                );
            }
            SqliteStore::open(path)
                .with_context(|| format!("open audit store {}", path.display()))?
                .records(query)
                .await?
        }
        Location::Postgres(url) => {
            PostgresStore::connect(url)
                .await
                .context("connect to the PostgreSQL audit store")?
                .records(query)
                .await?
        }
        Location::Gateway(remote) => remote.client()?.records(query).await?,
    };
    records
        .iter()
        .map(|r| r.entry().map_err(anyhow::Error::from))
        .collect()
}

async fn read(source: &impl Source, query: Query) -> Result<Vec<Step>> {
    let records = source.records(query).await?;
    Ok(replay::steps(&records)?)
}

async fn act(store: &impl Source, action: Action) -> Result<Outcome> {
    let mut text = String::new();
    match action {
        Action::Replay { of, json } => {
            let query = match &of {
                Replayed::Run(run) => Query {
                    run: Some(run.clone()),
                    ..Query::default()
                },
                Replayed::Agent { agent, since } => Query {
                    agent: Some(agent.clone()),
                    since_us: Some(since.as_microsecond()),
                    ..Query::default()
                },
            };
            let steps = read(store, query).await?;
            if steps.is_empty() {
                match of {
                    Replayed::Run(run) => bail!("the audit store holds no record of run {run:?}"),
                    Replayed::Agent { agent, since } => {
                        bail!("the audit store holds no record of agent {agent:?} since {since}")
                    }
                }
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
            let Some(store) = store.store() else {
                bail!(
                    "verify walks whole chains, so it reads the store itself: run it where the store is (the gateway's volume or its PostgreSQL); replay, export and what-if read through the gateway"
                );
            };
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
        Action::Drift {
            policy,
            window,
            now,
            json,
        } => {
            let policy = crate::offline::load_policy(Path::new(&policy))?;
            let standing = match store.store() {
                Some(store) => standing::of_store(store, &policy, &window, now).await?,
                None => {
                    let windows = standing::Windows::new(
                        &policy,
                        tollgate_engine::duration::parse(&window)
                            .map_err(|e| anyhow::anyhow!("--since {window:?}: {e}"))?,
                        now,
                    );
                    let records = store
                        .records(Query {
                            agent: policy.agent(),
                            since_us: Some(windows.since_us()),
                            ..Query::default()
                        })
                        .await
                        .map_err(|e| {
                            if e.to_string().contains("records match") {
                                e.context(
                                    "through the gateway, drift reads every record of the agent \
                                     in its windows: read the same figures in the AgentPolicy's \
                                     status.tools and status.drift, which the gateway keeps \
                                     (kubectl get agentpolicy -o yaml), or run drift where the \
                                     store is",
                                )
                            } else {
                                e
                            }
                        })?;
                    standing::of_records(&records, &policy, &window, now)
                }
            };
            if json {
                text = serde_json::to_string_pretty(&json!({
                    "tools": standing.tools,
                    "drift": standing.drift,
                }))?;
                text.push('\n');
            } else {
                text = drift_table(&policy, &standing);
            }
        }
    }
    Ok(Outcome { text, ok: true })
}

/// The standing as a table, then what went unused.
fn drift_table(policy: &tollgate_engine::CompiledPolicy, standing: &standing::Standing) -> String {
    let record_window = jiff::SignedDuration::try_from(policy.track_record_window())
        .map(|d| format!("{:#}", d))
        .unwrap_or_default();
    let agents = if standing.agents.is_empty() {
        "no recorded calls".to_owned()
    } else {
        format!("calls of {}", standing.agents.join(", "))
    };
    let mut text = format!(
        "{} ({}), {agents}: track records over {record_window}, drift over {}\n",
        policy.id(),
        policy.hash(),
        standing.drift.window
    );
    let rows: Vec<[String; 6]> = standing
        .tools
        .iter()
        .map(|t| {
            [
                t.name.clone(),
                t.autonomy.map_or("-".to_owned(), |a| format!("{a:?}")),
                t.clean_completions.to_string(),
                t.incidents.to_string(),
                t.last_used.as_ref().map_or("never".to_owned(), |t| {
                    t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
                }),
                t.eligible_for.map_or("-".to_owned(), |a| format!("{a:?}")),
            ]
        })
        .collect();
    let header = [
        "TOOL",
        "AUTONOMY",
        "CLEAN",
        "INCIDENTS",
        "LAST USED",
        "ELIGIBLE FOR",
    ];
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in std::iter::once(header.map(str::to_owned)).chain(rows) {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(text, "{}", line.join("  ").trim_end());
    }
    if standing.drift.unused_tools.is_empty() {
        let _ = writeln!(
            text,
            "every allowed tool was called in the last {}",
            standing.drift.window
        );
    } else {
        let _ = writeln!(
            text,
            "allowed but not called in the last {}: {} (granted rights the agent does not use: consider removing them from spec.tools.allowed)",
            standing.drift.window,
            standing.drift.unused_tools.join(", ")
        );
    }
    for tool in standing.tools.iter().filter(|t| t.eligible_for.is_some()) {
        let _ = writeln!(
            text,
            "{} is eligible for {:?}: graduation is never automatic; a person grants it by changing the policy",
            tool.name,
            tool.eligible_for.unwrap_or_default()
        );
    }
    text
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
