//! `tollgate-gateway`: the egress face agents call (decision API, MCP proxy, audit read API) in a
//! cluster, or with no cluster at all (`tollgate-gateway standalone`).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tollgate_gateway::run::{self, InCluster, Standalone, Trail};
use tollgate_gateway::standing::Schedule;
use tollgate_runtime::metrics::Metrics;
use tollgate_runtime::server::{self, Serving};

/// mimalloc rather than the system allocator: a decision allocates and frees many small
/// buffers on two threads, and glibc's malloc was about a tenth of the gateway's CPU
/// (`gateway-load`: 12.1k -> 13.5k decisions/s over HTTP, bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "tollgate-gateway",
    version,
    about = "Tollgate's gateway: every tool call of an agent is decided, recorded and only then forwarded; `standalone` runs it with no cluster"
)]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
    #[command(flatten)]
    serving: Serving,
    /// Tollgate's own namespace (the global kill switch, the notification Secret).
    #[arg(long, env = "TOLLGATE_NAMESPACE", default_value = "tollgate-system")]
    namespace: String,
    /// Export traces (a span per request, decision, audit commit, upstream MCP call and model
    /// call) over OTLP/HTTP to this collector, such as http://otel-collector:4318. Off when
    /// unset.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// The service name traces carry.
    #[arg(
        long,
        global = true,
        env = "OTEL_SERVICE_NAME",
        default_value = "tollgate-gateway"
    )]
    otel_service_name: String,
    /// The audit store: a SQLite file or a PostgreSQL URL (several replicas need PostgreSQL).
    #[arg(
        long,
        env = "TOLLGATE_AUDIT_STORE",
        default_value = "/var/lib/tollgate/audit.db"
    )]
    audit: String,
    /// This replica's audit chain (its pod name).
    #[arg(long, env = "POD_NAME", default_value = "tollgate-gateway")]
    chain: String,
    /// How often each AgentPolicy's track record and drift (`status.tools`, `status.drift`) are
    /// written from the audit trail, such as 5m; 0 never writes them.
    #[arg(long, env = "TOLLGATE_STANDING_INTERVAL", default_value = "5m", value_parser = interval)]
    standing_interval: Duration,
    /// The drift window: allowed tools not called in it are listed in `status.drift`.
    #[arg(long, env = "TOLLGATE_DRIFT_WINDOW", default_value = "720h", value_parser = window)]
    drift_window: String,
    /// A model price table (YAML: asOf, models: {NAME: {input, cachedInput, output}} in US
    /// dollars per million tokens) laid over the built-in one, for the LLM proxy's metering.
    #[arg(long, env = "TOLLGATE_PRICES")]
    prices: Option<PathBuf>,
    /// How long the MCP proxy waits for an upstream's answer to one request, such as 10m (a
    /// call waiting for approval waits for people first, and that is not counted here).
    #[arg(long, global = true, env = "TOLLGATE_MCP_CALL_TIMEOUT", default_value = "10m", value_parser = duration)]
    mcp_call_timeout: Duration,
    /// The most bytes of an MCP upstream's answer the proxy reads; a longer answer is not passed
    /// on, and the call is answered with an upstream error saying so. Requests are limited
    /// apart (1 MiB).
    #[arg(long, global = true, env = "TOLLGATE_MCP_ANSWER_LIMIT", default_value_t = tollgate_gateway::DEFAULT_UPSTREAM_LIMIT)]
    mcp_answer_limit: usize,
    /// What stands between an upstream's name and its tool's in tool names at `/mcp`: one to
    /// eight of `_`, `-`, `.` and `:` (`<upstream>__<tool>` by default).
    #[arg(long, global = true, env = "TOLLGATE_MCP_TOOL_SEPARATOR", default_value = tollgate_gateway::combined::SEPARATOR, value_parser = tool_separator)]
    mcp_tool_separator: String,
}

fn tool_separator(text: &str) -> Result<String, String> {
    tollgate_gateway::combined::check_separator(text).map(|()| text.to_owned())
}

/// The standalone demo's price table, used when it exists and no --prices is given.
const DEMO_PRICES: &str = "config/standalone/prices.yaml";

/// The built-in price table, overlaid with `file`'s.
fn prices(file: Option<&std::path::Path>) -> anyhow::Result<tollgate_engine::llm::Prices> {
    let builtin = tollgate_gateway::default_prices();
    let Some(file) = file else {
        return Ok(builtin);
    };
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("--prices {}: {e}", file.display()))?;
    let overlay = tollgate_engine::llm::Prices::parse(&text)
        .map_err(|e| anyhow::anyhow!("--prices {}: {e}", file.display()))?;
    Ok(builtin.overlay(overlay))
}

fn interval(text: &str) -> Result<Duration, String> {
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    duration(text)
}

fn duration(text: &str) -> Result<Duration, String> {
    let duration = tollgate_engine::duration::parse(text)?;
    if duration.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    Ok(duration)
}

fn window(text: &str) -> Result<String, String> {
    duration(text).map(|_| text.to_owned())
}

#[derive(Debug, clap::Subcommand)]
enum Mode {
    /// The gateway with no cluster: policies from a directory (an edit is in force for the next
    /// call), API keys from a file, an embedded SQLite audit store, plain HTTP on loopback.
    Standalone {
        /// Directory of AgentIdentity and AgentPolicy YAML.
        #[arg(long, default_value = "config/samples")]
        policies: PathBuf,
        /// API key file (see docs/gateway.md).
        #[arg(long, default_value = "config/standalone/keys.yaml")]
        keys: PathBuf,
        /// The audit store: a SQLite file or a PostgreSQL URL.
        #[arg(
            long,
            env = "TOLLGATE_AUDIT_STORE",
            default_value = "tollgate-audit.db"
        )]
        audit: String,
        /// This writer's audit chain.
        #[arg(long, default_value = "standalone")]
        chain: String,
        /// Address to listen on. Plain HTTP, so only a loopback address is accepted.
        #[arg(long, default_value = "127.0.0.1:8480")]
        listen: SocketAddr,
        /// Per-upstream credentials, laid out as mounted Secrets: DIR/<namespace>/<secret>/<key>.
        /// The default holds only the fake model provider's demo key.
        #[arg(long, default_value = "config/standalone/secrets")]
        secrets: Option<PathBuf>,
        /// Notification targets for budget breaches and approvals: a YAML map of target name
        /// (as onBudgetExceeded.notify and approval.notify name it) to a Slack-compatible
        /// incoming-webhook URL, or to {url, format: webhook, secret} for the event as JSON
        /// signed with HMAC-SHA256 (docs/gateway.md).
        #[arg(long)]
        notify: Option<PathBuf>,
        /// A model price table laid over the built-in one (as the gateway's --prices).
        /// Without it, config/standalone/prices.yaml if it exists (the demo's: it prices the
        /// fake provider's models), else the built-in table alone.
        #[arg(long)]
        prices: Option<PathBuf>,
    },
    /// One stdio MCP server served over streamable HTTP at /mcp, a process per session, for a
    /// cluster (where the gateway starts no programs): run it in the server's own pod, reachable
    /// from the gateway only, and name its URL in the policy. It decides nothing.
    StdioBridge {
        /// Address to listen on (plain HTTP, inside the cluster network).
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// The request header the gateway puts the agent's credential in (the AgentIdentity's
        /// credentials[].header); its value at initialize goes to --credential-env.
        #[arg(long, requires = "credential_env")]
        credential_header: Option<String>,
        /// The server process's variable that receives that credential.
        #[arg(long, requires = "credential_header")]
        credential_env: Option<String>,
        /// A variable for the server process, NAME=VALUE (repeatable); besides these it gets
        /// only PATH, HOME and LANG.
        #[arg(long = "env", value_parser = variable)]
        env: Vec<(String, String)>,
        /// A session without a request for this long is ended, with its process.
        #[arg(long, default_value = "10m", value_parser = duration)]
        idle: Duration,
        /// The most processes at a time.
        #[arg(long, default_value_t = 16)]
        max_sessions: usize,
        /// The server: its program and arguments, after `--`.
        #[arg(last = true, required = true, num_args = 1..)]
        command: Vec<String>,
    },
}

fn variable(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))?;
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("{name:?} is not a variable name"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    {
        use tracing_subscriber::Layer as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let logs = tracing_subscriber::fmt::layer().json().with_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        );
        let traces = match &args.otlp_endpoint {
            Some(endpoint) if !endpoint.trim().is_empty() => {
                let (layer, send) =
                    tollgate_gateway::trace::exporter(endpoint, &args.otel_service_name)?;
                tokio::spawn(send);
                Some(layer)
            }
            _ => None,
        };
        tracing_subscriber::registry()
            .with(logs)
            .with(traces)
            .init();
    }
    let traced = args
        .otlp_endpoint
        .as_deref()
        .is_some_and(|e| !e.trim().is_empty());
    let mcp = tollgate_gateway::McpLimits {
        call_timeout: args.mcp_call_timeout,
        answer_limit: args.mcp_answer_limit,
        tool_separator: args.mcp_tool_separator.clone(),
    };
    // First: a SIGTERM while the stores open must not be lost (see shutdown_signal).
    let shutdown = server::shutdown_signal();
    let metrics = Metrics::default();
    if let Some(Mode::StdioBridge {
        listen,
        credential_header,
        credential_env,
        env,
        idle,
        max_sessions,
        command,
    }) = args.mode
    {
        let credential_header = credential_header
            .map(|name| axum::http::HeaderName::try_from(name.as_str()))
            .transpose()
            .map_err(|e| anyhow::anyhow!("--credential-header: {e}"))?;
        let (program, arguments) = command
            .split_first()
            .ok_or_else(|| anyhow::anyhow!("name the server's command after --"))?;
        let config = tollgate_gateway::bridge::BridgeConfig {
            listen,
            server: tollgate_crds::policy::StdioServer {
                command: program.clone(),
                args: arguments.to_vec(),
                env: env.into_iter().collect(),
                credential_env,
            },
            credential_header,
            idle,
            max_sessions: max_sessions.max(1),
            timeout: mcp.call_timeout,
            answer_limit: mcp.answer_limit,
        };
        return tollgate_gateway::bridge::run(config, shutdown).await;
    }
    if let Some(Mode::Standalone {
        policies,
        keys,
        audit,
        chain,
        listen,
        secrets,
        notify,
        prices: price_file,
    }) = args.mode
    {
        let demo = std::path::Path::new(DEMO_PRICES);
        let price_file = price_file.or_else(|| demo.exists().then(|| demo.to_path_buf()));
        let prices = prices(price_file.as_deref())?;
        let trail = Trail::open(&audit, chain, &metrics).await?;
        let config = Standalone {
            policies,
            keys,
            listen,
            secrets,
            notify,
            prices,
            mcp,
            traced,
        };
        return run::standalone(config, trail, metrics, shutdown).await;
    }
    let handle = axum_server::Handle::new();
    {
        let handle = handle.clone();
        tokio::spawn(async move {
            shutdown.await;
            handle.graceful_shutdown(Some(Duration::from_secs(10)));
        });
    }
    server::install_crypto_provider();
    let prices = prices(args.prices.as_deref())?;
    let client = kube::Client::try_default().await?;
    let trail = Trail::open(&args.audit, args.chain.clone(), &metrics).await?;
    let config = InCluster {
        namespace: args.namespace,
        listen: args.serving.listen,
        probe_listen: args.serving.probe_listen,
        tls: args.serving.tls(),
        standing: (!args.standing_interval.is_zero()).then_some(Schedule {
            interval: args.standing_interval,
            window: args.drift_window,
        }),
        prices,
        mcp,
        traced,
    };
    run::in_cluster(client, config, trail, metrics, handle).await
}
