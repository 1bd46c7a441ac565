//! tollgate-gateway: the egress face, the decision API agents and orchestrators call before
//! every tool call, and the MCP proxy in front of their tool servers. Its own binary and
//! Deployment (`tollgate-gateway`; `tollgate-gateway standalone` runs it with no cluster).
//!
//! - `POST /v1/decide`: a tool call in, the engine's decision out (code, rule, message, and the
//!   approval requirement when people must decide).
//! - `POST /v1/report`: the outcome of a call (result, tokens, cost, error). The result comes back
//!   redacted to the tool's `resultFields`; usage that breaches a ceiling halts the run.
//!
//! Every request is authenticated first (standalone: an API key, see [`keys`]); the agent is the
//! key's and nothing in the request can name another. Every decision, and every refused request
//! (unauthenticated, malformed, oversized), is written to the audit trail before the answer
//! leaves; if the audit trail cannot take the record, the call is refused (fail closed).
//!
//! The contract is in `gateway/openapi/gateway.yaml`.
#![forbid(unsafe_code)]

mod anonymous;
mod api;
pub mod approvals;
mod approvers;
pub mod bridge;
pub mod cluster;
pub mod combined;
pub mod desk;
pub mod escalate;
pub mod keys;
mod legacy;
pub mod llm;
pub mod mcp;
mod notify;
pub mod policies;
pub mod read;
mod refusal;
pub mod run;
mod runs;
pub mod shared;
pub mod standing;
pub mod stdio;
pub mod trace;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use jiff::Timestamp;
use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_audit::{AuditLog, Counters, Entry, Event, Identity, PolicyRef, Redactor};
use tollgate_engine::{
    Agent, CompiledPolicy, Decision, RunState, ToolCall, Usage, WindowState, canonical,
    deny_without_policy,
};

pub(crate) use api::{authenticate, authenticate_with, counters, identity_of, policy_ref, run_id};
pub use cluster::{ClusterPolicies, TokenReviewer};
pub use escalate::Escalation;
use keys::Keys;
use policies::WatchedDir;
pub use refusal::RefusalCode;
pub(crate) use refusal::{Refusal, audit_unavailable, audit_unavailable_refusing};

/// The largest request body the gateway reads.
pub const MAX_BODY: usize = 1024 * 1024;

/// The header that may carry the run id instead of the body.
pub const RUN_HEADER: &str = "tollgate-run-id";

/// Run ids are 1 to 128 characters of `[A-Za-z0-9._:-]`.
fn valid_run_id(run: &str) -> bool {
    (1..=128).contains(&run.len())
        && run
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Who is calling, as authenticated: never taken from the request's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The authenticated username (`system:serviceaccount:NS:SA`, or `apikey:NAME`).
    pub username: String,
    /// `namespace/name` of the AgentIdentity the caller acts as.
    pub agent: String,
    /// The pod named in the token's claims.
    pub pod: Option<String>,
    /// Names the credential in the audit trail without revealing it.
    pub token_id: String,
}

/// How callers authenticate.
#[derive(Debug)]
pub enum Auth {
    /// Standalone: static API keys.
    Keys(Keys),
    /// In a cluster: ServiceAccount tokens (audience `tollgate`) through TokenReview.
    TokenReview(TokenReviewer),
}

/// Where policies come from.
#[derive(Debug, Clone)]
pub enum Policies {
    /// Standalone: a directory of YAML, reloaded on change.
    Dir(WatchedDir),
    /// In a cluster: the watched AgentIdentities, AgentPolicies and global kill switch.
    Cluster(ClusterPolicies),
}

impl From<WatchedDir> for Policies {
    fn from(dir: WatchedDir) -> Self {
        Self::Dir(dir)
    }
}

impl Policies {
    /// Standalone: the policy files that do not load, with their errors, if any.
    pub fn load_problems(&self) -> Option<String> {
        match self {
            Policies::Dir(dir) => {
                let set = dir.current();
                (!set.problems.is_empty()).then(|| set.problems.join("; "))
            }
            Policies::Cluster(_) => None,
        }
    }

    /// The agent `namespace/name` as it stands now.
    pub fn agent(&self, id: &str) -> Option<Arc<policies::AgentEntry>> {
        match self {
            Policies::Dir(dir) => dir.current().agents.get(id).cloned().map(Arc::new),
            Policies::Cluster(cluster) => cluster.agent(id),
        }
    }
}

/// Budget state of one agent: its identity window and its runs. One lock per agent, held while a
/// call is evaluated and recorded, so parallel calls cannot race past a ceiling.
#[derive(Debug)]
struct AgentState {
    window: WindowState,
    runs: runs::Runs,
    /// Whether the window has been rebuilt from the trail since the gateway started.
    window_loaded: bool,
    /// With budgets shared between replicas: the position in the shared trail up to which
    /// other replicas' records of this agent are applied, and what those records left pending.
    position: Option<i64>,
    follower: tollgate_audit::replay::Follower,
    /// Per run, what its model calls in flight have reserved of its ceilings.
    reserved: HashMap<String, tollgate_engine::llm::Reserved>,
    /// The hash of the policy whose ceilings the metrics show.
    ceilings_of: Option<String>,
}

impl AgentState {
    fn new(run_limit: usize) -> Self {
        Self {
            window: WindowState::default(),
            runs: runs::Runs::new(run_limit),
            window_loaded: false,
            position: None,
            follower: Default::default(),
            reserved: HashMap::new(),
            ceilings_of: None,
        }
    }
}

/// Reads an agent's recorded entries back, so that a restarted gateway continues every run's
/// budget and the identity's window from the audit trail instead of from zero.
pub trait History: Send + Sync + 'static {
    /// The agent's entries, oldest first: of one run, or since a time.
    fn entries<'a>(
        &'a self,
        agent: &'a str,
        run: Option<&'a str>,
        since_us: Option<i64>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Entry>, String>> + Send + 'a>>;
}

impl<S: tollgate_audit::Store> History for S {
    fn entries<'a>(
        &'a self,
        agent: &'a str,
        run: Option<&'a str>,
        since_us: Option<i64>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Entry>, String>> + Send + 'a>>
    {
        Box::pin(async move {
            let records = self
                .query(&tollgate_audit::Query {
                    agent: Some(agent.to_owned()),
                    run: run.map(str::to_owned),
                    since_us,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            records
                .iter()
                .map(|r| r.entry().map_err(|e| e.to_string()))
                .collect()
        })
    }
}

pub use shared::Shared;
use shared::{Following, Gates};

/// The gateway's shared state.
pub struct Gateway {
    policies: Policies,
    auth: Auth,
    audit: AuditLog,
    redactor: Redactor,
    state: Mutex<HashMap<String, Arc<Mutex<AgentState>>>>,
    now: fn() -> Timestamp,
    http: reqwest::Client,
    secrets: Option<std::path::PathBuf>,
    history: Option<Arc<dyn History>>,
    escalation: Arc<Escalation>,
    pub(crate) metrics: tollgate_runtime::metrics::Metrics,
    /// ApprovalRequests whose call was released through `approval` (exactly once).
    redeemed: Mutex<approvals::Released>,
    /// How often a streamed MCP answer sends a keep-alive while the call waits.
    pub(crate) keep_alive: std::time::Duration,
    /// Budgets shared with other replicas, when the trail is shared.
    shared: Option<Arc<dyn Shared>>,
    /// With budgets shared: per agent, this process's hold on the agent's cluster-wide lock.
    gates: Gates,
    /// Runs held in memory per agent when a trail can rebuild the others.
    run_limit: usize,
    /// The most bytes of an upstream's answer the MCP proxy reads.
    pub(crate) upstream_limit: usize,
    /// How long the MCP proxy waits for an upstream's answer.
    pub(crate) upstream_timeout: std::time::Duration,
    /// Between an upstream's name and its tool's at `/mcp`.
    pub(crate) tool_separator: String,
    /// The stdio MCP servers this gateway started, by session.
    pub(crate) stdio: stdio::StdioSessions,
    /// The streams of HTTP+SSE MCP servers this gateway holds, by session.
    pub(crate) streams: legacy::SseSessions,
    /// The sessions of `/mcp`, each a session at every upstream.
    pub(crate) combined: combined::CombinedSessions,
    /// Requests MCP servers made of agents' clients, waiting for their answers.
    pub(crate) asks: mcp::Asks,
    /// What models cost, for the LLM proxy's metering.
    pub(crate) prices: tollgate_engine::llm::Prices,
    /// Refusals of requests that proved no identity, summarized per interval.
    anonymous: Arc<anonymous::Anonymous>,
    /// In a cluster: the one watch of every ApprovalRequest that waiting calls follow.
    approval_watch: std::sync::OnceLock<approvals::ApprovalWatch>,
    /// Standalone: the ApprovalRequests of this gateway, which approvers decide through
    /// `/v1/approvals`.
    pub(crate) desk: Arc<desk::LocalDesk>,
    /// Standalone: the URL approvers reach this gateway at, for the commands notifications carry.
    approval_url: Option<String>,
    /// Whether spans are exported (OTLP).
    pub(crate) traced: bool,
}

/// The price table built in: what the models most agents use cost, as of its date. Override or
/// extend it with `--prices FILE` (in a cluster, the chart's `gateway.prices`).
pub const DEFAULT_PRICES: &str = include_str!("../prices.yaml");

/// The built-in price table, parsed.
pub fn default_prices() -> tollgate_engine::llm::Prices {
    tollgate_engine::llm::Prices::parse(DEFAULT_PRICES).expect("the built-in price table parses")
}

/// The most bytes of an upstream MCP answer the gateway reads by default: 16 MiB.
pub const DEFAULT_UPSTREAM_LIMIT: usize = 16 * 1024 * 1024;

/// How long the MCP proxy waits for an upstream's answer unless told otherwise.
pub const DEFAULT_UPSTREAM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// The MCP proxy's limits on what an upstream may take and send (`--mcp-call-timeout`,
/// `--mcp-answer-limit`).
#[derive(Debug, Clone)]
pub struct McpLimits {
    /// How long one upstream request may take, from sending it to the end of its answer.
    pub call_timeout: std::time::Duration,
    /// The most bytes of an answer read.
    pub answer_limit: usize,
    /// Between an upstream's name and its tool's at `/mcp` (checked by
    /// [`combined::check_separator`]; default [`combined::SEPARATOR`]).
    pub tool_separator: String,
}

impl Default for McpLimits {
    fn default() -> Self {
        Self {
            call_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            answer_limit: DEFAULT_UPSTREAM_LIMIT,
            tool_separator: combined::SEPARATOR.to_owned(),
        }
    }
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("audit", &self.audit.chain())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway over `policies`, authenticating with `keys` and recording to `audit`.
    pub fn new(
        policies: impl Into<Policies>,
        auth: impl Into<Auth>,
        audit: AuditLog,
        redactor: Redactor,
    ) -> Self {
        Self {
            policies: policies.into(),
            auth: auth.into(),
            audit,
            redactor,
            state: Mutex::new(HashMap::new()),
            now: Timestamp::now,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("an HTTP client with default settings builds"),
            secrets: None,
            history: None,
            escalation: Arc::new(Escalation::default()),
            metrics: tollgate_runtime::metrics::Metrics::default(),
            redeemed: Mutex::default(),
            keep_alive: std::time::Duration::from_secs(15),
            shared: None,
            gates: Gates::default(),
            run_limit: runs::DEFAULT_LIMIT,
            upstream_limit: DEFAULT_UPSTREAM_LIMIT,
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            tool_separator: combined::SEPARATOR.to_owned(),
            stdio: stdio::StdioSessions::default(),
            streams: legacy::SseSessions::default(),
            combined: combined::CombinedSessions::default(),
            asks: mcp::Asks::default(),
            prices: default_prices(),
            anonymous: Arc::new(anonymous::Anonymous::new(anonymous::DEFAULT_INTERVAL)),
            approval_watch: std::sync::OnceLock::new(),
            desk: Arc::default(),
            approval_url: None,
            traced: false,
        }
    }

    /// Appends `entry` to the trail and waits until it is durable; traced, the record carries the
    /// trace id and the wait is a span of its own.
    pub(crate) async fn record(
        &self,
        mut entry: Entry,
    ) -> Result<tollgate_audit::Appended, tollgate_audit::AppendError> {
        if !self.traced {
            return self.audit.append(entry).await;
        }
        use tracing::Instrument as _;
        entry.trace_id = trace::current_trace_id();
        let span = tracing::info_span!(
            target: "tollgate::audit",
            "audit",
            otel.name = "audit commit",
            otel.kind = "internal",
            otel.status = tracing::field::Empty,
            tollgate.audit.event = entry.event.as_str(),
            tollgate.audit.seq = tracing::field::Empty,
        );
        let appended = self.audit.append(entry).instrument(span.clone()).await;
        match &appended {
            Ok(appended) => {
                span.record("tollgate.audit.seq", appended.seq);
            }
            Err(_) => {
                span.record("otel.status", "error");
            }
        }
        appended
    }

    /// Sets the ceiling gauges of `agent` to what `policy` sets (and removes those it no longer
    /// sets).
    fn show_ceilings(&self, agent: &str, policy: &CompiledPolicy) {
        let (namespace, name) = agent.split_once('/').unwrap_or(("", agent));
        let set = policy.ceilings();
        for ceiling in [
            "maxSteps",
            "maxTokensPerRun",
            "maxCostUSDPerRun",
            "maxRunsPerWindow",
            "maxCostUSDPerWindow",
        ] {
            match set.iter().find(|(n, _)| *n == ceiling) {
                Some((_, value)) => self
                    .metrics
                    .agent_ceiling
                    .with_label_values(&[namespace, name, ceiling])
                    .set(*value),
                None => {
                    let _ = self
                        .metrics
                        .agent_ceiling
                        .remove_label_values(&[namespace, name, ceiling]);
                }
            }
        }
    }

    /// Counts what was charged to `agent`'s runs, `source` `reported` or `metered`.
    pub(crate) fn count_charged(
        &self,
        agent: &str,
        source: &str,
        tokens: u64,
        cost: rust_decimal::Decimal,
    ) {
        let (namespace, name) = agent.split_once('/').unwrap_or(("", agent));
        self.metrics
            .charged_tokens
            .with_label_values(&[namespace, name, source])
            .inc_by(tokens);
        let micro = (cost * rust_decimal::Decimal::from(1_000_000u32)).trunc();
        self.metrics
            .charged_cost_microusd
            .with_label_values(&[namespace, name, source])
            .inc_by(u64::try_from(micro).unwrap_or(0));
    }

    /// Exports spans of every request, decision, audit commit, upstream and model call (the
    /// tracing subscriber must hold a [`trace::OtlpLayer`]).
    pub fn with_tracing(mut self) -> Self {
        self.traced = true;
        self
    }

    /// Summarizes refusals of requests that proved no identity every `interval` (default 10 s):
    /// the first of each route and code in an interval is recorded in full, the others as one
    /// summary record when the interval ends.
    pub fn with_anonymous_interval(mut self, interval: std::time::Duration) -> Self {
        self.anonymous = Arc::new(anonymous::Anonymous::new(interval));
        self
    }

    /// Whether `refusal`, of a request to `route` that proved no identity, goes into the
    /// interval's summary instead of a record of its own (then the caller answers it without
    /// recording it). Refusals that name who presented the credential are never summarized.
    pub(crate) fn summarized(&self, route: &'static str, refusal: &Refusal) -> bool {
        let anonymous = refusal.who.is_none()
            && matches!(
                refusal.code,
                RefusalCode::Unauthenticated | RefusalCode::AuthenticationUnavailable
            );
        if !anonymous {
            return false;
        }
        if self.anonymous.start_flusher() {
            let (summaries, audit) = (self.anonymous.clone(), self.audit.clone());
            tokio::spawn(async move { summaries.flush_every_interval(audit).await });
        }
        let note = self
            .anonymous
            .note(route, refusal.code, &refusal.message, (self.now)());
        match note {
            anonymous::Note::Record => false,
            anonymous::Note::Counted => {
                let face = if route == "/mcp" { "mcp" } else { "api" };
                self.metrics
                    .refusals
                    .with_label_values(&[face, refusal.code.as_str()])
                    .inc();
                true
            }
        }
    }

    /// Meters model calls with `prices` (the built-in table, overlaid with the operator's).
    pub fn with_prices(mut self, prices: tollgate_engine::llm::Prices) -> Self {
        self.prices = prices;
        self
    }

    /// Reads at most `bytes` of an upstream MCP server's answer (default 16 MiB); a longer one is
    /// not passed on, and the call is answered with an upstream error saying so.
    pub fn with_upstream_limit(mut self, bytes: usize) -> Self {
        self.upstream_limit = bytes;
        self
    }

    /// Ends a stdio MCP server's session after `idle` without a request (default 10 minutes),
    /// and lets one agent hold at most `per_agent` of them (default 8).
    pub fn with_stdio_limits(mut self, idle: std::time::Duration, per_agent: usize) -> Self {
        self.stdio = stdio::StdioSessions::new(idle, per_agent);
        self
    }

    /// Ends every stdio MCP server this gateway started (it is stopping).
    pub fn end_stdio_sessions(&self) {
        self.stdio.end_all();
        self.streams.end_all();
    }

    /// How many HTTP+SSE server streams this gateway holds (for tests and diagnostics).
    pub fn held_streams(&self) -> usize {
        self.streams.count()
    }

    /// The pids of the stdio MCP servers this gateway runs (for tests and diagnostics).
    pub fn stdio_pids(&self) -> Vec<u32> {
        self.stdio.pids()
    }

    /// The MCP proxy's upstream timeout (default 10 minutes), answer limit and `/mcp` tool
    /// separator (one that [`combined::check_separator`] refuses keeps the default).
    pub fn with_mcp_limits(mut self, limits: McpLimits) -> Self {
        self.upstream_timeout = limits.call_timeout;
        self.upstream_limit = limits.answer_limit;
        if combined::check_separator(&limits.tool_separator).is_ok() {
            self.tool_separator = limits.tool_separator;
        }
        self
    }

    /// Holds at most `limit` runs of each agent in memory (default 10,000); the others are
    /// rebuilt from the trail when their next call comes. Only with a history
    /// ([`Gateway::with_history`]): without one, memory is the only record and nothing is dropped.
    pub fn with_run_limit(mut self, limit: usize) -> Self {
        self.run_limit = limit.max(1);
        self
    }

    fn run_limit(&self) -> usize {
        if self.history.is_some() {
            self.run_limit
        } else {
            usize::MAX
        }
    }

    /// How many runs, of every agent, the gateway holds in memory now.
    pub fn runs_in_memory(&self) -> usize {
        let agents: Vec<_> = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        agents
            .iter()
            .map(|a| a.lock().unwrap_or_else(|e| e.into_inner()).runs.len())
            .sum()
    }

    /// Shares budgets live with the other replicas writing the same PostgreSQL trail: every
    /// change of an agent's budget state happens under the agent's cluster-wide lock, after
    /// applying what the other replicas recorded since this one last looked.
    pub fn with_shared(mut self, shared: Arc<dyn Shared>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// With budgets shared, takes the agent's locks (this process's, then the cluster's) and
    /// brings its state up to date with other replicas' records. Hold the guard until the
    /// record of what is decided is durable. A shared trail that cannot be read refuses the
    /// call (fail closed).
    pub(crate) async fn follow(
        &self,
        agent: &str,
        policy: &CompiledPolicy,
    ) -> Result<Following, Refusal> {
        let Some(shared) = &self.shared else {
            // One replica: the state in memory is the truth, changed under the agent's
            // state lock; parallel calls share a group commit.
            return Ok(Following::none());
        };
        self.gates
            .enter(agent, shared.as_ref(), || async {
                self.catch_up(shared.as_ref(), agent, policy).await
            })
            .await
    }

    /// Applies the agent's records that other replicas wrote since this one last looked; run
    /// under the agent's cluster-wide lock, just after taking it.
    async fn catch_up(
        &self,
        shared: &dyn Shared,
        agent: &str,
        policy: &CompiledPolicy,
    ) -> Result<(), Refusal> {
        let state = self.agent_state(agent);
        let position = state.lock().unwrap_or_else(|e| e.into_inner()).position;
        let Some(position) = position else {
            // First sight of the agent: hydration reads the whole trail; follow from its end.
            let position = shared.position(agent).await.map_err(audit_unavailable)?;
            state.lock().unwrap_or_else(|e| e.into_inner()).position = Some(position);
            return Ok(());
        };
        let entries = shared
            .after(agent, self.audit.chain(), position)
            .await
            .map_err(audit_unavailable)?;
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        let AgentState {
            window,
            runs,
            window_loaded,
            position,
            follower,
            ..
        } = &mut *state;
        for (at, entry) in &entries {
            // A run this replica has not seen is read whole when it first comes; only the
            // window counts its calls now.
            let mut scratch_run = RunState::default();
            let mut scratch_window = WindowState::default();
            let run = match entry.run.as_ref().and_then(|r| runs.get_mut_untouched(r)) {
                Some(run) => run,
                None => &mut scratch_run,
            };
            let window = if *window_loaded {
                &mut *window
            } else {
                &mut scratch_window
            };
            follower.apply(policy, entry, run, window);
            *position = Some(*at);
        }
        Ok(())
    }

    /// Standalone: holds at most `limit` approval requests at once (default
    /// [`desk::LocalDesk::LIMIT`]); a call that needs one past that is refused (`NoApprovals`).
    pub fn with_approval_limit(mut self, limit: usize) -> Self {
        self.desk = Arc::new(desk::LocalDesk::with_limit(limit));
        self
    }

    /// Standalone: the URL approvers reach this gateway at (`http://127.0.0.1:8480`), named in
    /// the commands approval notifications carry.
    pub fn with_approval_url(mut self, url: impl Into<String>) -> Self {
        self.approval_url = Some(url.into());
        self
    }

    /// How often a streamed MCP `tools/call` answer sends a keep-alive (default 15 s).
    pub fn with_keep_alive(mut self, every: std::time::Duration) -> Self {
        self.keep_alive = every.max(std::time::Duration::from_millis(10));
        self
    }

    /// Counts into `metrics` (in a cluster, the probe port's: the gateway's own router serves
    /// none).
    pub fn with_metrics(mut self, metrics: tollgate_runtime::metrics::Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Escalates budget breaches with `escalation` (notification targets, Events, kill switch).
    pub fn with_escalation(mut self, escalation: Escalation) -> Self {
        self.escalation = Arc::new(escalation);
        self
    }

    /// Sets off what a breach of `policy`'s ceilings asks for, and records the kill switch the
    /// gateway engaged in the audit trail.
    async fn escalate(
        &self,
        holder: &Caller,
        run: &str,
        policy: &CompiledPolicy,
        clause: &str,
    ) -> Result<(), Refusal> {
        let (namespace, name) = holder.agent.split_once('/').unwrap_or(("", &holder.agent));
        let breach = escalate::Breach {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            run: run.to_owned(),
            clause: clause.to_owned(),
            policy: format!("{} {}", policy.id(), policy.hash()),
            notify: policy.breach_notify().to_vec(),
            engage_kill_switch: policy.breach_engages_kill_switch(),
        };
        self.metrics.breaches.inc();
        if self.escalation.escalate(breach).await {
            let mut kill = Entry::new((self.now)(), Event::Kill, identity_of(Some(holder)));
            kill.agent = Some(holder.agent.clone());
            kill.run = Some(run.to_owned());
            kill.policy = Some(policy_ref(policy));
            kill.error = Some(format!(
                "the kill switch of agent {} was engaged by the gateway: {clause} breached (onBudgetExceeded.engageKillSwitch)",
                holder.agent
            ));
            self.audit.append(kill).await.map_err(audit_unavailable)?;
        }
        Ok(())
    }

    /// Continues budgets from `history` (the audit store) after a restart.
    pub fn with_history(mut self, history: Arc<dyn History>) -> Self {
        self.history = Some(history);
        self
    }

    /// Rebuilds, once per gateway lifetime, the agent's window and the state of `run` from the
    /// audit trail. A trail that cannot be read refuses the call (fail closed).
    async fn hydrate(
        &self,
        agent: &str,
        run: &str,
        policy: &CompiledPolicy,
        now: Timestamp,
    ) -> Result<(), Refusal> {
        let state = self.agent_state(agent);
        let Some(history) = &self.history else {
            return Ok(());
        };
        let (need_window, need_run) = {
            let state = state.lock().unwrap_or_else(|e| e.into_inner());
            (!state.window_loaded, !state.runs.contains(run))
        };
        let window = match (need_window, policy.budget_window()) {
            (true, Some(span)) => {
                let since = now
                    .checked_sub(
                        jiff::SignedDuration::try_from(span).unwrap_or(jiff::SignedDuration::MAX),
                    )
                    .unwrap_or(Timestamp::MIN);
                let entries = history
                    .entries(agent, None, Some(since.as_microsecond()))
                    .await
                    .map_err(audit_unavailable)?;
                Some(tollgate_audit::replay::rebuild(policy, &entries).window)
            }
            (true, None) => Some(WindowState::default()),
            (false, _) => None,
        };
        let run_state = if need_run {
            let entries = history
                .entries(agent, Some(run), None)
                .await
                .map_err(audit_unavailable)?;
            // A run the trail has no record of starts from nothing; either way it is held now.
            Some(
                tollgate_audit::replay::rebuild(policy, &entries)
                    .runs
                    .remove(run)
                    .unwrap_or_default(),
            )
        } else {
            None
        };
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(window) = window
            && !state.window_loaded
        {
            state.window = window;
            state.window_loaded = true;
        }
        if let Some(run_state) = run_state {
            let before = state.runs.len();
            state.runs.hold(run, run_state);
            self.metrics
                .runs_in_memory
                .add(state.runs.len() as i64 - before as i64);
        }
        Ok(())
    }

    /// Reads per-upstream credentials from `dir`, laid out as a mounted Secret:
    /// `dir/<namespace>/<secret name>/<key>`.
    pub fn with_secrets(mut self, dir: std::path::PathBuf) -> Self {
        self.secrets = Some(dir);
        self
    }

    /// The header and value the gateway adds when it forwards a call of `agent` to `upstream`,
    /// from the AgentIdentity's credentials. An error when one is declared but cannot be read:
    /// the call is then not forwarded without it.
    async fn credential(
        &self,
        agent: &str,
        upstream: &str,
    ) -> Result<Option<(String, String)>, String> {
        let Some(entry) = self.policies.agent(agent) else {
            return Ok(None);
        };
        let Some(credential) = entry.credentials.iter().find(|c| c.upstream == upstream) else {
            return Ok(None);
        };
        if let Policies::Cluster(cluster) = &self.policies {
            let value = cluster
                .secret(
                    &entry.namespace,
                    &credential.secret_ref.name,
                    &credential.secret_ref.key,
                )
                .await?;
            return Ok(Some((
                credential.header.clone(),
                credential
                    .format
                    .replace("{}", value.trim_end_matches(['\n', '\r'])),
            )));
        }
        let Some(dir) = &self.secrets else {
            return Err(format!(
                "agent {agent} declares a credential for upstream {upstream:?}, but the gateway has no secrets directory"
            ));
        };
        let path = dir
            .join(&entry.namespace)
            .join(&credential.secret_ref.name)
            .join(&credential.secret_ref.key);
        let value = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "credential for upstream {upstream:?}: read {}: {e}",
                path.display()
            )
        })?;
        Ok(Some((
            credential.header.clone(),
            credential
                .format
                .replace("{}", value.trim_end_matches(['\n', '\r'])),
        )))
    }

    /// Takes the released call at `step` of `run` out of those waiting for a report.
    pub(crate) fn take_report(&self, agent: &str, run: &str, step: u64) {
        let state = self.agent_state(agent);
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(run) = state.runs.get_mut(run) {
            run.take_report(step);
        }
    }

    fn agent_state(&self, agent: &str) -> Arc<Mutex<AgentState>> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(agent.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(AgentState::new(self.run_limit()))))
            .clone()
    }
}

/// A decided and recorded call.
pub(crate) struct Decided {
    pub decision: Decision,
    pub step: Option<u64>,
    pub audit: tollgate_audit::Appended,
    pub policy: Option<Arc<CompiledPolicy>>,
}

impl Gateway {
    /// Evaluates one call of `holder`'s agent in `run` and records the decision; the answer is
    /// only returned once the record is durable.
    pub(crate) async fn decide_call(
        &self,
        holder: &Caller,
        run: &str,
        tool: &str,
        arguments: &Value,
        started: Instant,
    ) -> Result<Decided, Refusal> {
        if !self.traced {
            return self
                .decide_untraced(holder, run, tool, arguments, started)
                .await;
        }
        use tracing::Instrument as _;
        let span = tracing::info_span!(
            target: "tollgate::decide",
            "decide",
            otel.name = %format!("decide {tool}"),
            otel.kind = "internal",
            otel.status = tracing::field::Empty,
            gen_ai.tool.name = tool,
            tollgate.agent = %holder.agent,
            tollgate.run = run,
            tollgate.decision = tracing::field::Empty,
            tollgate.code = tracing::field::Empty,
            tollgate.audit.seq = tracing::field::Empty,
        );
        let decided = self
            .decide_untraced(holder, run, tool, arguments, started)
            .instrument(span.clone())
            .await;
        match &decided {
            Ok(decided) => {
                span.record("tollgate.decision", decision_kind(&decided.decision));
                if let Some(code) = decided.decision.deny_code() {
                    span.record("tollgate.code", code.as_str());
                }
                span.record("tollgate.audit.seq", decided.audit.seq);
            }
            Err(refusal) => {
                span.record("tollgate.code", refusal.code.as_str());
                span.record("otel.status", "error");
            }
        }
        decided
    }

    async fn decide_untraced(
        &self,
        holder: &Caller,
        run: &str,
        tool: &str,
        arguments: &Value,
        started: Instant,
    ) -> Result<Decided, Refusal> {
        let identity = identity_of(Some(holder));
        let now = (self.now)();
        let run = run.to_owned();
        let agent = self.policies.agent(&holder.agent);
        let agent = agent.as_deref();
        let mut _following = None;
        if let Some(agent) = agent
            && let Ok(policy) = &agent.policy
        {
            _following = Some(self.follow(&agent.id, policy).await?);
            self.hydrate(&agent.id, &run, policy, now).await?;
        }
        let mut was_halted = false;
        let mut evicted = false;
        let (decision, policy, run_counters) = match agent.map(|a| (a, &a.policy)) {
            Some((agent, Ok(policy))) => 'decided: {
                let state = self.agent_state(&agent.id);
                let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                if state.ceilings_of.as_deref() != Some(policy.hash()) {
                    self.show_ceilings(&agent.id, policy);
                    state.ceilings_of = Some(policy.hash().to_owned());
                }
                let AgentState { window, runs, .. } = &mut *state;
                let run_state = if self.history.is_some() {
                    // Held by `hydrate` just now; gone only if, in between, thousands of other
                    // runs of this agent pushed it out of memory: never start it from nothing.
                    match runs.get_mut(&run) {
                        Some(run_state) => run_state,
                        None => {
                            evicted = true;
                            break 'decided (deny_without_policy(""), None, None);
                        }
                    }
                } else {
                    if !runs.contains(&run) {
                        self.metrics.runs_in_memory.inc();
                    }
                    runs.get_or_default(&run)
                };
                was_halted = run_state.halted.is_some();
                // Always asked (not short-circuited): seeing the switch engaged at its source
                // is what hands it back to that source.
                let held = self.escalation.holds(&agent.id, agent.killed);
                let who = Agent {
                    name: &agent.name,
                    namespace: &agent.namespace,
                    username: &identity.username,
                    killed: agent.killed || held,
                };
                let call = ToolCall {
                    run_id: &run,
                    tool,
                    arguments,
                };
                let decision = policy.evaluate(&who, &call, run_state, window, now);
                policy.record(&call, &decision, run_state, window, now);
                (decision, Some(policy.clone()), Some(counters(run_state)))
            }
            Some((agent, Err(problem))) if agent.killed => (
                problem.deny(&format!(
                    "the kill switch of agent {} is engaged; and {problem}",
                    agent.id
                )),
                None,
                None,
            ),
            Some((_, Err(problem))) => (problem.deny(problem.message()), None, None),
            None => {
                let reason = format!(
                    "the key's agent {} has no AgentIdentity in the policy directory",
                    holder.agent
                );
                // A file that does not load may have held it: say so, with the file's error.
                let decision = match self.policies.load_problems() {
                    Some(problems) => tollgate_engine::deny_invalid_policy(&format!(
                        "{reason}, and the policy directory has files that do not load: {problems}"
                    )),
                    None => deny_without_policy(&reason),
                };
                (decision, None, None)
            }
        };

        if evicted {
            let refusal = Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                RefusalCode::AuditUnavailable,
                format!(
                    "run {run:?} left the gateway's memory while its call waited (thousands of \
                     other runs of agent {} came meanwhile); nothing was decided; retry",
                    holder.agent
                ),
            );
            return Err(self
                .refuse_recorded(Some(holder), Some(tool), "/v1/decide", refusal)
                .await);
        }
        let step = run_counters.as_ref().map(|c| c.steps);
        let mut entry = Entry::new(now, Event::Decide, identity);
        entry.agent = Some(holder.agent.clone());
        entry.run = Some(run.clone());
        entry.step = step;
        entry.tool = Some(tool.to_owned());
        entry.set_arguments(&self.redactor, arguments);
        entry.decision = Some(decision.clone());
        entry.policy = policy.as_deref().map(policy_ref);
        entry.counters = run_counters;
        entry.latency_us = Some(started.elapsed().as_micros() as u64);
        if let Decision::Halt { ceiling, .. } = &decision {
            entry.ceiling = Some(ceiling.clone());
        }
        let appended = match self.record(entry).await {
            Ok(appended) => appended,
            Err(e) => return Err(audit_unavailable(e)),
        };
        let (namespace, name) = holder
            .agent
            .split_once('/')
            .unwrap_or(("", holder.agent.as_str()));
        self.metrics
            .decisions
            .with_label_values(&[
                namespace,
                name,
                decision_kind(&decision),
                decision.deny_code().map_or("", |c| c.as_str()),
            ])
            .inc();
        self.metrics
            .decision_duration
            .observe(started.elapsed().as_secs_f64());
        if let (Decision::Halt { ceiling, .. }, Some(policy), false) =
            (&decision, &policy, was_halted)
        {
            self.escalate(holder, &run, policy, ceiling.clause())
                .await?;
        }
        Ok(Decided {
            decision,
            step,
            audit: appended,
            policy,
        })
    }
}

impl Gateway {
    /// Records that a request (of `caller`, once authenticated) was refused before any decision,
    /// and returns the refusal to answer; if the trail cannot record it, the refusal becomes
    /// one as unrecordable, naming why it was refused as well.
    async fn refuse_recorded(
        &self,
        caller: Option<&Caller>,
        tool: Option<&str>,
        path: &str,
        refusal: Refusal,
    ) -> Refusal {
        let mut entry = Entry::new((self.now)(), Event::Rejected, refusal.identity(caller));
        entry.agent = caller.map(|c| c.agent.clone());
        entry.tool = tool.map(str::to_owned);
        entry.error = Some(format!("{path}: {}: {}", refusal.code, refusal.message));
        self.metrics
            .refusals
            .with_label_values(&["api", refusal.code.as_str()])
            .inc();
        match self.audit.append(entry).await {
            Ok(_) => refusal,
            Err(e) => {
                audit_unavailable_refusing(e, &format!("{}: {}", refusal.code, refusal.message))
            }
        }
    }
}

/// The gateway's router: the decision API, the MCP proxy and /healthz. What agents reach, so
/// no metrics: in a cluster those are on the probe port (share them with
/// [`Gateway::with_metrics`]).
pub fn router(gateway: Arc<Gateway>) -> Router {
    let traced = gateway.traced;
    let router = routes(gateway);
    if traced {
        router.layer(axum::middleware::from_fn(trace_request))
    } else {
        router
    }
}

/// A server span per request, joined to the caller's trace when it sends a W3C `traceparent`.
async fn trace_request(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use tracing::Instrument as _;
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let parent = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let span = tracing::info_span!(
        target: "tollgate::http",
        "request",
        otel.name = %format!("{method} {path}"),
        otel.kind = "server",
        otel.status = tracing::field::Empty,
        http.request.method = %method,
        url.path = %path,
        http.response.status_code = tracing::field::Empty,
        traceparent = %parent,
    );
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    if response.status().is_server_error() {
        span.record("otel.status", "error");
    }
    response
}

fn routes(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/decide", post(api::decide))
        .route("/v1/report", post(api::report))
        .route(
            "/mcp",
            post(combined::proxy)
                .delete(combined::end)
                .get(|| async { StatusCode::METHOD_NOT_ALLOWED }),
        )
        .route(
            "/mcp/{upstream}",
            post(mcp::proxy).delete(mcp::end_session).get(mcp::listen),
        )
        .route("/llm/{upstream}/{*path}", axum::routing::any(llm::proxy))
        .route(
            "/.well-known/oauth-protected-resource",
            axum::routing::get(mcp::resource_metadata),
        )
        .route(
            "/.well-known/oauth-protected-resource/mcp/{upstream}",
            axum::routing::get(mcp::resource_metadata),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .with_state(gateway)
}

/// The standalone gateway's router: [`router`], /readyz and /metrics on the same loopback
/// listener, since standalone mode has no probe port. /readyz answers 503 naming every policy
/// file that does not load and every agent without a policy in force.
pub fn standalone_router(gateway: Arc<Gateway>) -> Router {
    let metrics = gateway.metrics.clone();
    let policies = gateway.policies.clone();
    router(gateway.clone())
        .route(
            "/v1/approvals",
            axum::routing::get(approvers::list).with_state(gateway.clone()),
        )
        .route(
            "/v1/approvals/{namespace}/{name}",
            axum::routing::get(approvers::show)
                .post(approvers::decide)
                .with_state(gateway),
        )
        .route(
            "/metrics",
            axum::routing::get(move || async move { metrics.render() }),
        )
        .route(
            "/readyz",
            axum::routing::get(move || {
                let policies = policies.clone();
                async move { readiness(&policies) }
            }),
        )
}

fn readiness(policies: &Policies) -> Response {
    let Policies::Dir(dir) = policies else {
        return "ok".into_response();
    };
    match dir.current().readiness() {
        Ok(()) => "ok".into_response(),
        Err(problems) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", problems.join("\n")),
        )
            .into_response(),
    }
}

fn decision_kind(decision: &Decision) -> &'static str {
    match decision {
        Decision::Allow { .. } => "allow",
        Decision::Deny { .. } => "deny",
        Decision::RequireApproval { .. } => "requireApproval",
        Decision::Halt { .. } => "halt",
    }
}

impl stdio::Keeper for Gateway {
    fn keeps(
        &self,
        agent: &str,
        upstream: &str,
        server: &tollgate_crds::policy::StdioServer,
    ) -> bool {
        let Some(entry) = self.policies.agent(agent) else {
            return false;
        };
        let killed = entry.killed || self.escalation.holds(&entry.id, entry.killed);
        !killed
            && matches!(&self.policies, Policies::Dir(_))
            && entry
                .upstreams
                .get(upstream)
                .and_then(|mcp| mcp.stdio.as_ref())
                == Some(server)
    }

    fn sessions(&self) -> &stdio::StdioSessions {
        &self.stdio
    }
}

impl legacy::Keeper for Gateway {
    fn keeps_stream(&self, agent: &str, upstream: &str, url: &str) -> bool {
        let Some(entry) = self.policies.agent(agent) else {
            return false;
        };
        let killed = entry.killed || self.escalation.holds(&entry.id, entry.killed);
        !killed
            && entry.upstreams.get(upstream).is_some_and(|mcp| {
                mcp.url.as_deref() == Some(url)
                    && mcp.transport == Some(tollgate_crds::policy::McpTransport::Sse)
            })
    }

    fn streams(&self) -> &legacy::SseSessions {
        &self.streams
    }
}
