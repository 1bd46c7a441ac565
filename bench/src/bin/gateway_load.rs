//! The gateway on loopback: decisions per second and latency of `POST /v1/decide` beside OPA's
//! REST API evaluating the same rules, and the latency the MCP proxy adds over calling an MCP
//! server directly.
//!
//! `cargo run --release --bin gateway-load [SECONDS] [CONNECTIONS] [replicas|inproc|own|mcp|rate [RATES]]`
//! (`own`: only the gateway on a runtime of its own, threads named `gateway`; `mcp`: only MCP
//! calls through a gateway with its trail on tmpfs; both for profiling; `rate`: open loop at
//! each of RATES, comma-separated requests/s, gateway and OPA); OPA is taken from `$OPA`
//! (default `../target/opa-bin/opa`, built with
//! `GOBIN=$PWD/target/opa-bin go install github.com/open-policy-agent/opa@v1.22.3`).
//!
//! The decision load comes from a minimal HTTP/1.1 client (one keep-alive connection per client,
//! answers read by `content-length` and parsed as JSON), so that the load generator takes as
//! little as it can of the cores it shares with the servers; every row prints the CPU each side
//! spent per request. `PIN=SERVER:LOAD` puts them on separate CPUs; `GATEWAY_WORKERS=N` gives
//! the gateway's runtime N worker threads (2 unless set); `AGENTS=N` gives the gateway N agents
//! with the same policy, client `w` calling as agent `w % N` (1 unless set).

use tollgate_bench::{Better, report};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{Value, json};
use tollgate_audit::{AuditLog, Batch, Observer, Redactor, SqliteStore, WriterConfig};
use tollgate_gateway::keys::Keys;
use tollgate_gateway::policies::{PolicySet, WatchedDir};
use tollgate_gateway::{self as gateway, Gateway};

/// The allocator the `tollgate-webhook` binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEY: &str = "bench-key";

/// How many agents the decision load calls as (`AGENTS`, 1 unless set).
fn agents() -> usize {
    static AGENTS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *AGENTS.get_or_init(|| {
        std::env::var("AGENTS").map_or(1, |n| n.parse().expect("AGENTS is a number"))
    })
}

/// Agent `i`'s name and API key (agent 0: "bench-agent" and [`KEY`]).
fn agent(i: usize) -> (String, String) {
    match i {
        0 => ("bench-agent".into(), KEY.into()),
        i => (format!("bench-agent-{i}"), format!("{KEY}-{i}")),
    }
}

/// The authorization header of each agent, for the load's clients to take in turn.
fn bearers() -> Vec<String> {
    (0..agents())
        .map(|i| format!("Bearer {}", agent(i).1))
        .collect()
}

/// Every agent's identity and policy (see [`rules`]).
fn policy(upstream: &str) -> String {
    (0..agents())
        .map(|i| rules(&agent(i).0, upstream))
        .collect()
}

/// The same rules as the Rego below: one tool with a pattern-checked argument, one with an enum,
/// a size limit and a condition over every item; three blocked tools.
fn rules(name: &str, upstream: &str) -> String {
    format!(
        r#"
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{name: {name}, namespace: bench}}
spec:
  description: load
  owner: {{team: bench, contacts: [bench@example.com]}}
  podSelector: {{matchLabels: {{app: bench}}}}
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentPolicy
metadata: {{name: {name}, namespace: bench}}
spec:
  identityRef: {{name: {name}}}
  upstreams:
    - name: crm
      mcp: {{url: "{upstream}"}}
  tools:
    allowed:
      - name: read_customer_record
        upstream: crm
        arguments:
          additionalFields: Deny
          fields:
            customer_id: {{type: string, required: true, pattern: "^C[0-9]{{6}}$"}}
      - name: update_order_status
        upstream: crm
        arguments:
          fields:
            status: {{type: string, required: true, enum: [cancelled, refunded, processing]}}
            order_ids: {{type: array, required: true, maxItems: 10}}
        when: "args.order_ids.all(id, id.startsWith('O-'))"
    blocked: [delete_customer_record, access_payment_raw, bulk_send_email]
"#
    )
}

/// The bench agents' API keys, stored as their hashes.
fn keys() -> Keys {
    use sha2::Digest;
    let mut file = String::from("keys:\n");
    for i in 0..agents() {
        let (name, key) = agent(i);
        file += &format!(
            "  - {{name: {name}, agent: bench/{name}, sha256: {}}}\n",
            hex::encode(sha2::Sha256::digest(key.as_bytes()))
        );
    }
    Keys::parse(&file).unwrap()
}

const REGO: &str = include_str!("../../rules/sample.rego");

#[derive(Clone)]
struct Upstream;

impl ServerHandler for Upstream {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn call_tool(
        &self,
        _request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        Ok(CallToolResult::structured(json!({"customer_id": "C000042", "status": "open"})).into())
    }
}

async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

struct Load {
    rate: f64,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    max: Duration,
    count: usize,
    /// The server's CPU time during the run, where measured.
    cpu: Option<Duration>,
    /// The load generator's CPU time during the run (this process's runtime workers), where
    /// measured: what it leaves of the machine's cores to the server.
    load_cpu: Option<Duration>,
}

/// What the load's clients send: `body(worker, i)` to `url`, each answer checked.
#[derive(Clone)]
struct Target {
    /// `host:port` to connect to.
    address: Arc<str>,
    /// The request's head up to its `content-length` value: request line, host, authorization;
    /// one per authorization header, client `w` taking head `w % heads`.
    heads: Arc<[String]>,
    body: fn(usize, usize) -> Value,
    check: fn(&Value) -> bool,
}

impl Target {
    fn new(
        url: &str,
        auth: &[String],
        body: fn(usize, usize) -> Value,
        check: fn(&Value) -> bool,
    ) -> Self {
        let rest = url
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("the load generator speaks plain HTTP, not {url}"));
        let (address, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = if path.is_empty() { "/" } else { path };
        let head = |auth: Option<&String>| {
            let auth = auth.map_or(String::new(), |auth| format!("authorization: {auth}\r\n"));
            format!(
                "POST {path} HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\n\
                 {auth}content-length: "
            )
        };
        let heads = match auth {
            [] => vec![head(None)],
            auth => auth.iter().map(|a| head(Some(a))).collect(),
        };
        Self {
            address: address.into(),
            heads: heads.into(),
            body,
            check,
        }
    }

    /// A keep-alive connection to the target.
    async fn connect(&self) -> Connection {
        let stream = tokio::net::TcpStream::connect(&*self.address)
            .await
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Connection {
            stream: tokio::io::BufReader::new(stream),
            request: Vec::with_capacity(1024),
            line: String::new(),
            answer: Vec::new(),
        }
    }

    /// Request `i` of client `worker` on `connection`, its answer checked.
    async fn call(&self, connection: &mut Connection, worker: usize, i: usize) {
        let body = serde_json::to_vec(&(self.body)(worker, i)).unwrap();
        let head = &self.heads[worker % self.heads.len()];
        let answer: Value = serde_json::from_slice(connection.post(head, &body).await)
            .unwrap_or_else(|e| panic!("an answer that is not JSON ({e})"));
        assert!((self.check)(&answer), "unexpected answer: {answer}");
    }

    /// `client(target, worker)` for each of `connections` clients at once; every latency they
    /// measured.
    async fn clients<F, Fut>(&self, connections: usize, client: F) -> Vec<Duration>
    where
        F: Fn(Target, usize) -> Fut,
        Fut: std::future::Future<Output = Vec<Duration>> + Send + 'static,
    {
        let tasks: Vec<_> = (0..connections)
            .map(|worker| tokio::spawn(client(self.clone(), worker)))
            .collect();
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await.unwrap());
        }
        latencies
    }
}

/// One HTTP/1.1 keep-alive connection of the load generator: it writes a POST and reads one
/// answer with a `content-length`, nothing else. A general client (reqwest) spent 30-45 µs of
/// CPU per request here, a third of what the server it measured spent; this one leaves the
/// shared cores to the servers.
struct Connection {
    stream: tokio::io::BufReader<tokio::net::TcpStream>,
    request: Vec<u8>,
    line: String,
    answer: Vec<u8>,
}

impl Connection {
    /// POSTs `body` after `head` and returns the answer's body; any status but 200 panics.
    async fn post(&mut self, head: &str, body: &[u8]) -> &[u8] {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        self.request.clear();
        self.request.extend_from_slice(head.as_bytes());
        self.request
            .extend_from_slice(format!("{}\r\n\r\n", body.len()).as_bytes());
        self.request.extend_from_slice(body);
        self.stream
            .get_mut()
            .write_all(&self.request)
            .await
            .unwrap();
        let mut length = None;
        let mut status = true;
        loop {
            self.line.clear();
            let n = self.stream.read_line(&mut self.line).await.unwrap();
            assert!(n > 0, "the server closed the connection");
            let line = self.line.trim_end();
            if status {
                assert!(line.starts_with("HTTP/1.1 200 "), "answered {line}");
                status = false;
            } else if line.is_empty() {
                break;
            } else if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = Some(value.trim().parse::<usize>().unwrap());
                }
                assert!(
                    !(name.eq_ignore_ascii_case("transfer-encoding")),
                    "a {line} answer: the load generator reads only content-length"
                );
            }
        }
        let length = length.expect("an answer without content-length");
        self.answer.resize(length, 0);
        self.stream.read_exact(&mut self.answer).await.unwrap();
        &self.answer
    }
}

/// `connections` closed-loop clients POST `body(i)` to `url` for `seconds`.
async fn load(
    url: &str,
    auth: &[String],
    seconds: u64,
    connections: usize,
    body: fn(usize, usize) -> Value,
    check: fn(&Value) -> bool,
) -> Load {
    let target = Target::new(url, auth, body, check);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let latencies = target
        .clients(connections, |target, worker| async move {
            let mut connection = target.connect().await;
            let mut latencies = Vec::new();
            let mut i = 0;
            while Instant::now() < deadline {
                let t = Instant::now();
                target.call(&mut connection, worker, i).await;
                latencies.push(t.elapsed());
                i += 1;
            }
            latencies
        })
        .await;
    Load::of(latencies, start.elapsed())
}

/// Open loop: `connections` clients together offer `rate` requests per second for `seconds`.
/// Request k of client w is due at `(k * connections + w) / rate`. Its latency counts from when
/// it left, or, if the client was still waiting for an earlier answer when it was due, from when
/// it was due: the delay a closed loop would hide (coordinated omission) is charged. Tokio's timer
/// has millisecond ticks, so requests leave in bursts of about `rate / 1000`.
async fn paced(
    url: &str,
    auth: &[String],
    seconds: u64,
    connections: usize,
    rate: f64,
    body: fn(usize, usize) -> Value,
    check: fn(&Value) -> bool,
) -> Load {
    let target = Target::new(url, auth, body, check);
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let span = Duration::from_secs(seconds);
    let latencies = target
        .clients(connections, |target, worker| async move {
            let mut connection = target.connect().await;
            let mut latencies = Vec::new();
            for i in 0.. {
                let at = Duration::from_secs_f64((i * connections + worker) as f64 / rate);
                if at >= span {
                    break;
                }
                let due = start + at;
                // Behind schedule (the answer before came after this request was due): charged
                // from when it was due. On time: from when the timer let it leave, since the
                // timer's millisecond ticks are the load generator's lateness, not the server's.
                let behind = tokio::time::Instant::now() >= due;
                tokio::time::sleep_until(due).await;
                let origin = if behind {
                    due
                } else {
                    tokio::time::Instant::now()
                };
                target.call(&mut connection, worker, i).await;
                latencies.push(origin.elapsed());
            }
            latencies
        })
        .await;
    Load::of(latencies, start.elapsed())
}

impl Load {
    /// Rate and percentiles of `latencies` measured over `elapsed`.
    fn of(mut latencies: Vec<Duration>, elapsed: Duration) -> Self {
        latencies.sort_unstable();
        Self {
            rate: latencies.len() as f64 / elapsed.as_secs_f64(),
            p50: latencies[latencies.len() / 2],
            p99: latencies[latencies.len() * 99 / 100],
            p999: latencies[latencies.len() * 999 / 1000],
            max: latencies[latencies.len() - 1],
            count: latencies.len(),
            cpu: None,
            load_cpu: None,
        }
    }
}

/// `PIN=SERVER:LOAD` (CPU lists as `taskset` takes them, such as `PIN=0:1`): the servers (the
/// gateway's threads, OPA's process) run on the SERVER CPUs and the load generator on the LOAD
/// ones, so that neither queues for a core behind the other. Unset, all share every core.
fn pinning() -> Option<(String, String)> {
    let pin = std::env::var("PIN").ok()?;
    let (server, load) = pin
        .split_once(':')
        .expect("PIN is SERVER_CPUS:LOAD_CPUS, such as 0:1");
    Some((server.to_owned(), load.to_owned()))
}

/// Moves the calling thread (and the threads it starts later) to `cpus`.
fn pin_this_thread(cpus: &str) {
    let me = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
    let tid = me.file_name().unwrap().to_string_lossy().into_owned();
    let status = std::process::Command::new("taskset")
        .args(["-p", "-c", cpus, &tid])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run taskset");
    assert!(status.success(), "taskset -p -c {cpus} {tid} failed");
}

/// Whose CPU time a run is charged: the threads of this process with one of the names (as the
/// kernel keeps them, cut to 15 bytes), or every thread of another process.
#[derive(Clone, Copy)]
enum Server {
    Threads(&'static [&'static str]),
    Process(u32),
}

/// The gateway on its own runtime: its listener's thread, its workers and blocking threads
/// (`gateway`) and its SQLite store's checkpoint thread. Not the bench's main thread, whose name
/// (`gateway-load`) only starts like them.
const GATEWAY_THREADS: Server = Server::Threads(&["gateway-listen", "gateway", "audit-checkpoint"]);

/// The floor: an HTTP server answering `allow` at once, on a runtime like the gateway's.
const FLOOR_THREADS: Server = Server::Threads(&["floor-listen", "floor"]);

/// What any HTTP server costs here, the machine's floor for the decision rows: axum on a runtime
/// of its own like the gateway's, reading each body as JSON and answering `allow` without
/// deciding or recording anything.
fn floor() -> String {
    on_runtime_named("floor", async {
        axum::Router::new().route(
            "/v1/decide",
            axum::routing::post(|axum::Json(_): axum::Json<Value>| async {
                axum::Json(json!({"decision": "allow"}))
            }),
        )
    })
}

/// The load generator: the workers and blocking threads of the bench's own runtime (Tokio's
/// default thread name).
const LOAD_GENERATOR: Server = Server::Threads(&["tokio-rt-worker"]);

impl Server {
    /// CPU time its threads have run so far (`/proc/…/task/*/schedstat`, nanoseconds). A thread
    /// that ends during a run takes its time with it; the gateway's threads live through one.
    fn cpu(self) -> Duration {
        let (tasks, names) = match self {
            Server::Threads(names) => ("/proc/self/task".to_owned(), names),
            Server::Process(pid) => (format!("/proc/{pid}/task"), &[][..]),
        };
        let mut ns = 0u64;
        for task in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
            let read = |f: &str| std::fs::read_to_string(task.path().join(f)).unwrap_or_default();
            let comm = read("comm");
            let comm = comm.trim_end();
            if !names.is_empty() && !names.iter().any(|n| comm == &n[..n.len().min(15)]) {
                continue;
            }
            ns += read("schedstat")
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
        Duration::from_nanos(ns)
    }

    /// `run`'s result with the CPU time this server spent during it.
    async fn charged(self, run: impl std::future::Future<Output = Load>) -> Load {
        let (before, generator) = (self.cpu(), LOAD_GENERATOR.cpu());
        let mut load = run.await;
        load.cpu = Some(self.cpu().saturating_sub(before));
        load.load_cpu = Some(LOAD_GENERATOR.cpu().saturating_sub(generator));
        load
    }
}

fn call(worker: usize, i: usize) -> (&'static str, Value) {
    if i.is_multiple_of(2) {
        (
            "read_customer_record",
            json!({"customer_id": format!("C{:06}", (worker * 7919 + i) % 1_000_000)}),
        )
    } else {
        (
            "update_order_status",
            json!({"status": "refunded", "order_ids": ["O-1", format!("O-{i}")]}),
        )
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn print(name: &str, l: &Load) {
    println!(
        "{name:<44} {:>9.0}/s  p50 {:>10}  p99 {:>10}  max {:>10}  ({} requests){}",
        l.rate,
        ms(l.p50),
        ms(l.p99),
        ms(l.max),
        l.count,
        l.cpu_per_request()
    );
}

impl Load {
    /// The server's CPU time per request and the cores it kept busy, when measured.
    fn cpu_per_request(&self) -> String {
        let Some(cpu) = self.cpu else {
            return String::new();
        };
        let per_request = |cpu: Duration| cpu.as_secs_f64() * 1e6 / self.count as f64;
        let cores = |cpu: Duration| cpu.as_secs_f64() * self.rate / self.count as f64;
        let mut figures = format!(
            "  CPU {:>5.1} µs/request ({:.2} cores)",
            per_request(cpu),
            cores(cpu)
        );
        if let Some(load) = self.load_cpu {
            figures += &format!(
                ", load generator {:>5.1} µs ({:.2} cores)",
                per_request(load),
                cores(load)
            );
        }
        figures
    }
}

/// Sequential JSON-RPC calls over one session; per-call latencies sorted.
async fn mcp_calls(url: &str, auth: Option<&str>, calls: usize) -> Vec<Duration> {
    let client = reqwest::Client::new();
    let post = |body: Value, session: Option<String>| {
        let mut request = client
            .post(url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body.to_string());
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        if let Some(session) = session {
            request = request.header("mcp-session-id", session);
        }
        request.header("tollgate-run-id", "mcp-bench").send()
    };
    let init = post(
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "bench", "version": "1"}}}),
        None,
    )
    .await
    .unwrap();
    let session = init
        .headers()
        .get("mcp-session-id")
        .map(|v| v.to_str().unwrap().to_owned());
    init.bytes().await.unwrap();
    post(
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        session.clone(),
    )
    .await
    .unwrap();
    let mut latencies = Vec::new();
    for i in 0..calls {
        let body = json!({"jsonrpc": "2.0", "id": i + 1, "method": "tools/call",
                          "params": {"name": "read_customer_record", "arguments": {"customer_id": "C000042"}}});
        let t = Instant::now();
        let text = post(body, session.clone())
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        latencies.push(t.elapsed());
        assert!(text.contains("C000042"), "{text}");
    }
    latencies.sort_unstable();
    latencies
}

fn main() {
    if let Some((_, load)) = pinning() {
        // Before the runtime exists: its threads inherit the load generator's CPUs.
        pin_this_thread(&load);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench());
}

async fn bench() {
    println!("{}", tollgate_bench::machine_reference());
    let seconds: u64 = std::env::args().nth(1).map_or(10, |s| s.parse().unwrap());
    let connections: usize = std::env::args().nth(2).map_or(32, |s| s.parse().unwrap());
    if std::env::args().nth(3).as_deref() == Some("replicas") {
        return replicas(seconds, connections).await;
    }
    if std::env::args().nth(3).as_deref() == Some("inproc") {
        return in_process(seconds, connections).await;
    }
    if std::env::args().nth(3).as_deref() == Some("rate") {
        let rates = std::env::args()
            .nth(4)
            .unwrap_or_else(|| "5000,10000,15000,20000".to_owned());
        return at_rates(seconds, connections, &rates).await;
    }
    if std::env::args().nth(3).as_deref() == Some("own") {
        // Only the gateway on its own runtime: for profiling (its threads are named `gateway`).
        let dir = policy_dir();
        let path = dir.path().to_owned();
        let own = on_own_runtime(async move { sqlite_gateway(&path, "own.db").await });
        commits().reset();
        let l = GATEWAY_THREADS
            .charged(decide(&own, seconds, connections))
            .await;
        print("tollgate /v1/decide, own runtime", &l);
        return println!("{}", commits().summary());
    }
    let dir = tempfile::tempdir().unwrap();

    let upstream = serve(
        axum::Router::new().nest_service(
            "/mcp",
            StreamableHttpService::<Upstream, LocalSessionManager>::new(
                || Ok(Upstream),
                Default::default(),
                // Stateless, plain JSON answers: an SSE answer in two writes meets delayed ACKs on
                // loopback (about 40 ms per call) and would hide what the proxy adds.
                StreamableHttpServerConfig::default()
                    .with_legacy_session_mode(false)
                    .with_json_response(true),
            ),
        ),
    )
    .await;
    if std::env::args().nth(3).as_deref() == Some("mcp") {
        // Only MCP calls through the gateway with its trail on tmpfs: for profiling the proxy.
        let (_shm, gw) = tmpfs_gateway(&upstream).await;
        let calls = 20_000;
        let v = mcp_calls(
            &format!("{gw}/mcp/crm"),
            Some(&format!("Bearer {KEY}")),
            calls,
        )
        .await;
        let direct = mcp_calls(&format!("{upstream}/mcp"), None, calls).await;
        let bare = serve(bare_proxy(format!("{upstream}/mcp"))).await;
        let bare = mcp_calls(&bare, None, calls).await;
        let p50 = |v: &[Duration]| v[v.len() / 2];
        return println!(
            "{calls} MCP calls: through the gateway (trail on tmpfs) p50 {}, direct p50 {}, through a bare proxy p50 {}",
            ms(p50(&v)),
            ms(p50(&direct)),
            ms(p50(&bare))
        );
    }
    std::fs::write(
        dir.path().join("bench.yaml"),
        policy(&format!("{upstream}/mcp")),
    )
    .unwrap();
    let gw = serve(sqlite_gateway(dir.path(), "shared.db").await).await;
    // The same gateway on a runtime of its own (two workers), as in its own process; OPA runs in
    // its own process too. On the bench's runtime the gateway's tasks and the load's share two
    // workers.
    let own = {
        let dir = dir.path().to_owned();
        on_own_runtime(async move { sqlite_gateway(&dir, "own.db").await })
    };
    let auth = format!("Bearer {KEY}");

    println!(
        "{seconds}s per run, {connections} connections, client and servers on the same 2 cores\n"
    );
    let shared = decide(&gw, seconds, connections).await;
    print("tollgate /v1/decide, on the load's runtime", &shared);
    let tollgate = GATEWAY_THREADS
        .charged(decide(&own, seconds, connections))
        .await;
    print("tollgate /v1/decide, own runtime", &tollgate);

    if let Some(opa) = Opa::start(dir.path()).await {
        let opa_load = opa
            .server()
            .charged(load(
                &opa.url,
                &[],
                seconds,
                connections,
                opa_body,
                |answer| answer["result"] == true,
            ))
            .await;
        drop(opa);
        print("OPA REST /v1/data (no decision log)", &opa_load);
        println!(
            "{:<44} {:>9.2}x throughput, p50 {:.2}x, p99 {:.2}x",
            "tollgate / OPA",
            tollgate.rate / opa_load.rate,
            tollgate.p50.as_secs_f64() / opa_load.p50.as_secs_f64(),
            tollgate.p99.as_secs_f64() / opa_load.p99.as_secs_f64()
        );
        let what = format!("`/v1/decide`, {connections} connections, every decision durable");
        let beside = "OPA 1.22.3 REST, no decision log";
        report("gateway-load", &format!("{what}: decisions/s"), tollgate.rate, beside, opa_load.rate, "/s", Better::Higher);
        report("gateway-load", &format!("{what}: p99"), tollgate.p99.as_secs_f64() * 1e3, beside, opa_load.p99.as_secs_f64() * 1e3, "ms", Better::Lower);
        if let (Some(t), Some(o)) = (tollgate.cpu, opa_load.cpu) {
            let per = |cpu: Duration, l: &Load| cpu.as_secs_f64() * 1e6 / l.count as f64;
            report("gateway-load", &format!("{what}: CPU per decision"), per(t, &tollgate), beside, per(o, &opa_load), "µs", Better::Lower);
        }
    }

    let calls = 2000;
    let direct = mcp_calls(&format!("{upstream}/mcp"), None, calls).await;
    let proxied = mcp_calls(&format!("{gw}/mcp/crm"), Some(&auth), calls).await;
    let (_shm, on_tmpfs) = tmpfs_gateway(&upstream).await;
    let undurable = mcp_calls(&format!("{on_tmpfs}/mcp/crm"), Some(&auth), calls).await;
    let p = |v: &[Duration], q: usize| v[v.len() * q / 100];
    println!("\nMCP tools/call, {calls} sequential calls:");
    let row = |name: &str, v: &[Duration]| {
        println!(
            "{name:<44} p50 {:>10}  p99 {:>10}  added at p50 {:>10}",
            ms(p(v, 50)),
            ms(p(v, 99)),
            ms(p(v, 50).saturating_sub(p(&direct, 50)))
        )
    };
    row("direct to the MCP server", &direct);
    row("through the gateway (decide, audit x2, forward)", &proxied);
    row(
        "the same, trail on tmpfs (fsync returns at once)",
        &undurable,
    );
    let bare = serve(bare_proxy(format!("{upstream}/mcp"))).await;
    let bare = mcp_calls(&bare, None, calls).await;
    row("through a bare proxy (no decision, no audit)", &bare);
    let added = |v: &[Duration]| p(v, 50).saturating_sub(p(&direct, 50)).as_secs_f64() * 1e3;
    report(
        "gateway-load",
        "MCP `tools/call` added at p50 (two durable records)",
        added(&proxied),
        "a bare proxy",
        added(&bare),
        "ms",
        Better::Lower,
    );
}

/// The least any HTTP proxy in front of the upstream costs here: axum in, the same reqwest
/// client set-up out, body and MCP headers passed through, nothing checked or recorded.
fn bare_proxy(upstream: String) -> axum::Router {
    let client = reqwest::Client::new();
    axum::Router::new().route(
        "/",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let client = client.clone();
                let upstream = upstream.clone();
                async move {
                    const PASSED: [&str; 3] = ["content-type", "accept", "mcp-session-id"];
                    let mut request = client.post(&upstream).body(body);
                    for name in PASSED {
                        if let Some(value) = headers.get(name) {
                            request = request.header(name, value.as_bytes());
                        }
                    }
                    let answer = request.send().await.unwrap();
                    let mut response =
                        axum::http::Response::builder().status(answer.status().as_u16());
                    for name in PASSED {
                        if let Some(value) = answer.headers().get(name) {
                            response = response.header(name, value.as_bytes());
                        }
                    }
                    response
                        .body(axum::body::Body::from(answer.bytes().await.unwrap()))
                        .unwrap()
                }
            },
        ),
    )
}

/// OPA's REST server evaluating [`REGO`], stopped when dropped.
struct Opa {
    child: std::process::Child,
    url: String,
}

impl Opa {
    /// Starts `$OPA` (default `../target/opa-bin/opa`) with the rules written into `dir`; None,
    /// saying so, when there is no OPA binary.
    async fn start(dir: &std::path::Path) -> Option<Self> {
        let opa = PathBuf::from(std::env::var("OPA").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../target/opa-bin/opa").to_owned()
        }));
        if !opa.exists() {
            println!("OPA not found at {} (set OPA=…)", opa.display());
            return None;
        }
        let rego = dir.join("tollgate.rego");
        std::fs::write(&rego, REGO).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = match pinning() {
            Some((server, _)) => {
                let mut taskset = std::process::Command::new("taskset");
                taskset.args(["-c", &server]).arg(&opa);
                taskset
            }
            None => std::process::Command::new(&opa),
        };
        let child = command
            .args(["run", "--server", "--log-level", "error", "--addr"])
            .arg(format!("127.0.0.1:{port}"))
            .arg(&rego)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start OPA");
        let client = reqwest::Client::new();
        let health = format!("http://127.0.0.1:{port}/health");
        while client.get(&health).send().await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some(Self {
            child,
            url: format!("http://127.0.0.1:{port}/v1/data/tollgate/allow"),
        })
    }

    /// Its process, for CPU accounting.
    fn server(&self) -> Server {
        Server::Process(self.child.id())
    }
}

impl Drop for Opa {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// OPA's input for the call `call(worker, i)`.
fn opa_body(worker: usize, i: usize) -> Value {
    let (tool, args) = call(worker, i);
    json!({"input": {"tool": tool, "args": args}})
}

/// Open loop at each of `rates` (comma-separated, requests/s): the gateway on its own runtime,
/// then OPA, then the floor (an HTTP server that only answers), each offered the rate over
/// `connections` connections.
async fn at_rates(seconds: u64, connections: usize, rates: &str) {
    let dir = policy_dir();
    // TRAIL=/dev/shm puts the gateway's trail on tmpfs: whether a tail comes from the disk.
    let trail = std::env::var_os("TRAIL").map(|d| tempfile::tempdir_in(d).unwrap());
    let path = trail.as_ref().map_or(dir.path(), |t| t.path()).to_owned();
    if trail.is_some() {
        std::fs::copy(dir.path().join("bench.yaml"), path.join("bench.yaml")).unwrap();
    }
    let own = on_own_runtime(async move { sqlite_gateway(&path, "own.db").await });
    let floor = floor();
    let opa = Opa::start(dir.path()).await;
    println!(
        "open loop, {seconds}s per rate after 2s at the first, {connections} connections, latency from when each request left or was due\n"
    );
    let rates: Vec<f64> = rates
        .split(',')
        .map(|r| r.trim().parse::<f64>().unwrap())
        .collect();
    // Warm-up, not reported: connections, the store's first pages, the runs' first lookups.
    let first = rates[0];
    let warm = |url: String, body: fn(usize, usize) -> Value, check: fn(&Value) -> bool| async move {
        paced(&url, &bearers(), 2, connections, first, body, check).await
    };
    warm(format!("{own}/v1/decide"), decide_body, |a| {
        a["decision"] == "allow"
    })
    .await;
    if let Some(opa) = &opa {
        warm(opa.url.clone(), opa_body, |a| a["result"] == true).await;
    }
    warm(format!("{floor}/v1/decide"), decide_body, |a| {
        a["decision"] == "allow"
    })
    .await;
    for &rate in &rates {
        let row = |name: &str, l: &Load| {
            println!(
                "{name:<24} offered {rate:>6.0}/s  served {:>7.0}/s  p50 {:>9}  p99 {:>9}  p99.9 {:>9}  max {:>9}{}",
                l.rate,
                ms(l.p50),
                ms(l.p99),
                ms(l.p999),
                ms(l.max),
                l.cpu_per_request()
            )
        };
        // One row: `server` charged for `rate` requests/s of `body` at `url`, answers checked.
        let measure = async |server: Server,
                             url: &str,
                             auth: &[String],
                             body: fn(usize, usize) -> Value,
                             check: fn(&Value) -> bool| {
            server
                .charged(paced(url, auth, seconds, connections, rate, body, check))
                .await
        };
        let allowed: fn(&Value) -> bool = |answer| answer["decision"] == "allow";
        let bearers = bearers();
        let gateway = format!("{own}/v1/decide");
        commits().reset();
        let l = measure(GATEWAY_THREADS, &gateway, &bearers, decide_body, allowed).await;
        row("tollgate /v1/decide", &l);
        println!("{}", commits().summary());
        if let Some(opa) = &opa {
            let l = measure(opa.server(), &opa.url, &[], opa_body, |answer| {
                answer["result"] == true
            })
            .await;
            row("OPA REST /v1/data", &l);
        }
        let floor = format!("{floor}/v1/decide");
        let l = measure(FLOOR_THREADS, &floor, &[], decide_body, allowed).await;
        row("floor: axum answers", &l);
    }
}

/// The bench gateway with its SQLite trail on tmpfs, where fsync returns at once: what the
/// proxy adds besides waiting for the disk (not a configuration Tollgate offers). The directory
/// lives as long as the returned guard.
async fn tmpfs_gateway(upstream: &str) -> (tempfile::TempDir, String) {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    std::fs::write(
        shm.path().join("bench.yaml"),
        policy(&format!("{upstream}/mcp")),
    )
    .unwrap();
    let url = serve(sqlite_gateway(shm.path(), "tmpfs.db").await).await;
    (shm, url)
}

/// `connections` clients deciding allowed calls at the gateway at `gw` for `seconds`.
async fn decide(gw: &str, seconds: u64, connections: usize) -> Load {
    load(
        &format!("{gw}/v1/decide"),
        &bearers(),
        seconds,
        connections,
        decide_body,
        |answer| answer["decision"] == "allow",
    )
    .await
}

/// The decision API's input for the call `call(worker, i)`: a run per client and `RUN_CALLS`
/// calls (1,000 unless set; each new run makes the gateway look for its history in the trail).
fn decide_body(worker: usize, i: usize) -> Value {
    static RUN_CALLS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let calls = *RUN_CALLS.get_or_init(|| {
        std::env::var("RUN_CALLS").map_or(1000, |n| n.parse().expect("RUN_CALLS is a number"))
    });
    let (tool, args) = call(worker, i);
    json!({"runId": format!("w{worker}-{}", i / calls), "tool": tool, "arguments": args})
}

/// A directory holding the bench policy, its MCP upstream unused (nothing listens on port 9).
fn policy_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bench.yaml"),
        policy("http://127.0.0.1:9/mcp"),
    )
    .unwrap();
    dir
}

/// The batches the bench gateways' audit writers reported (what `tollgate_audit_*` metrics
/// count), so that a latency row can say how much of it was the trail's commits.
#[derive(Default)]
struct Commits(Mutex<(Vec<Batch>, Option<Instant>)>);

impl Observer for Commits {
    fn batch(&self, batch: &Batch) {
        self.0.lock().unwrap().0.push(*batch);
    }
}

/// Every bench gateway reports here.
fn commits() -> Arc<Commits> {
    static COMMITS: std::sync::OnceLock<Arc<Commits>> = std::sync::OnceLock::new();
    COMMITS.get_or_init(Default::default).clone()
}

impl Commits {
    /// Forgets what was reported so far (warm-up, other rows).
    fn reset(&self) {
        *self.0.lock().unwrap() = (Vec::new(), Some(Instant::now()));
    }

    /// The commits since the last reset, as two lines: how many, records per commit, the share
    /// of the time the writer was committing, commit latency and how long a batch's oldest record
    /// waited before its commit began, per batch; then the same wait plus commit counted once per
    /// record of the batch (what a record saw at most, the figure to hold against a request's p99).
    fn summary(&self) -> String {
        let (batches, since) = std::mem::take(&mut *self.0.lock().unwrap());
        if batches.is_empty() {
            return "  audit: no commits".to_owned();
        }
        let records: usize = batches.iter().map(|b| b.records).sum();
        let committing: Duration = batches.iter().map(|b| b.commit).sum();
        let quantiles = |mut v: Vec<Duration>| {
            v.sort_unstable();
            let at = |q: usize| ms(v[(v.len() * q / 1000).min(v.len() - 1)]);
            format!("p50 {}  p99 {}  max {}", at(500), at(990), at(1000))
        };
        let per_record = batches
            .iter()
            .flat_map(|b| std::iter::repeat_n(b.waited + b.commit, b.records))
            .collect();
        format!(
            "  audit: {} commits, {:.1} records each, writer committing {:.0}% of the time; per commit: commit {}, oldest record's wait {}{}\n  audit per record (its batch's oldest wait + commit): {}",
            batches.len(),
            records as f64 / batches.len() as f64,
            since.map_or(0.0, |t| committing.as_secs_f64() * 100.0
                / t.elapsed().as_secs_f64()),
            quantiles(batches.iter().map(|b| b.commit).collect()),
            quantiles(batches.iter().map(|b| b.waited).collect()),
            match batches.iter().filter(|b| !b.committed).count() {
                0 => String::new(),
                failed => format!(", {failed} FAILED"),
            },
            quantiles(per_record),
        )
    }
}

/// The gateway's router on the sample policy in `dir`, with a SQLite trail in `dir/file` that
/// also serves as its history (a run it has not seen is looked up there), as in standalone mode.
/// Its writer reports to [`commits`].
async fn sqlite_gateway(dir: &std::path::Path, file: &str) -> axum::Router {
    let store = Arc::new(SqliteStore::open(dir.join(file)).unwrap());
    let (log, _) = AuditLog::open(
        store.clone(),
        WriterConfig::new("bench").with_observer(commits()),
    )
    .await
    .unwrap();
    let gateway = Gateway::new(
        WatchedDir::fixed(PolicySet::load(dir)),
        keys(),
        log,
        Redactor::default(),
    )
    .with_history(store);
    gateway::router(Arc::new(gateway))
}

/// Builds and serves a router on a Tokio runtime of its own (two workers, on a thread of its
/// own), as a separate process would; returns its URL.
fn on_own_runtime(
    router: impl std::future::Future<Output = axum::Router> + Send + 'static,
) -> String {
    on_runtime_named("gateway", router)
}

/// [`on_own_runtime`] with threads named `name` and `{name}-listen`.
fn on_runtime_named(
    name: &'static str,
    router: impl std::future::Future<Output = axum::Router> + Send + 'static,
) -> String {
    let (url, at) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new().name(format!("{name}-listen"));
    thread
        .spawn(move || {
            let server_cpus = pinning().map(|(server, _)| server);
            if let Some(cpus) = &server_cpus {
                // This thread serves the listener; the runtime's threads and the store's start here.
                pin_this_thread(cpus);
            }
            // GATEWAY_WORKERS: the runtime's worker threads (two, one per core, unless set).
            let workers = std::env::var("GATEWAY_WORKERS").map_or(2, |w| w.parse().unwrap());
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name(name)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let router = router.await;
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                url.send(format!("http://{}", listener.local_addr().unwrap()))
                    .unwrap();
                axum::serve(listener, router).await.unwrap();
            });
        })
        .unwrap();
    at.recv().unwrap()
}

/// A gateway writing `chain` of the PostgreSQL trail at `url`, budgets shared or not.
async fn pg_gateway(dir: &std::path::Path, url: &str, chain: &str, shared: bool) -> String {
    let store = Arc::new(tollgate_audit::PostgresStore::connect(url).await.unwrap());
    let (log, _) = AuditLog::open(store.clone(), WriterConfig::new(chain))
        .await
        .unwrap();
    let mut gateway = Gateway::new(
        WatchedDir::fixed(PolicySet::load(dir)),
        keys(),
        log,
        Redactor::default(),
    )
    .with_history(store.clone());
    if shared {
        gateway = gateway.with_shared(store);
    }
    serve(gateway::router(Arc::new(gateway))).await
}

/// `/v1/decide` on a PostgreSQL trail: one gateway alone, then two replicas sharing budgets
/// (one agent, so every decision takes the agent's cluster-wide lock), half the connections on
/// each.
async fn replicas(seconds: u64, connections: usize) {
    let dir = policy_dir();
    let postgres = tollgate_e2e::postgres::postgres();
    let auth = bearers();
    let body = |worker: usize, i: usize| {
        let (tool, args) = call(worker, i);
        json!({"runId": format!("w{worker}-{}", i / 1000), "tool": tool, "arguments": args})
    };
    let allowed = |answer: &Value| answer["decision"] == "allow";
    println!("{seconds}s per run, {connections} connections, PostgreSQL trail\n");

    let url = postgres.database("alone").unwrap();
    let alone = pg_gateway(dir.path(), &url, "gw-0", false).await;
    let l = load(
        &format!("{alone}/v1/decide"),
        &auth,
        seconds,
        connections,
        body,
        allowed,
    )
    .await;
    print("one gateway, budgets in memory", &l);

    let url = postgres.database("shared").unwrap();
    let a = pg_gateway(dir.path(), &url, "gw-a", true).await;
    let b = pg_gateway(dir.path(), &url, "gw-b", true).await;
    let half = connections.div_ceil(2);
    let (url_a, url_b) = (format!("{a}/v1/decide"), format!("{b}/v1/decide"));
    let (la, lb) = tokio::join!(
        load(&url_a, &auth, seconds, half, body, allowed),
        load(&url_b, &auth, seconds, half, body, allowed),
    );
    print("two replicas, budgets shared: replica a", &la);
    print("two replicas, budgets shared: replica b", &lb);
    println!(
        "{:<44} {:>9.0}/s",
        "two replicas together (one agent)",
        la.rate + lb.rate
    );
}

/// `/v1/decide` through the router in this process, no HTTP and no sockets: what a decision
/// costs the gateway itself (authentication, JSON, policy, audit record, durable commit).
async fn in_process(seconds: u64, tasks: usize) {
    use tower::ServiceExt as _;
    let dir = policy_dir();
    let router = sqlite_gateway(dir.path(), "audit.db").await;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let mut handles = Vec::new();
    for worker in 0..tasks {
        let router = router.clone();
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0;
            while Instant::now() < deadline {
                let (tool, args) = call(worker, i);
                let body = json!({"runId": format!("w{worker}-{}", i / 1000), "tool": tool, "arguments": args});
                let request = axum::http::Request::post("/v1/decide")
                    .header("authorization", format!("Bearer {KEY}"))
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from(body.to_string()))
                    .unwrap();
                let t = Instant::now();
                let response = router.clone().oneshot(request).await.unwrap();
                let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
                latencies.push(t.elapsed());
                let answer: Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(answer["decision"], "allow", "{answer}");
                i += 1;
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for handle in handles {
        latencies.extend(handle.await.unwrap());
    }
    print(
        "tollgate /v1/decide in process (no HTTP)",
        &Load::of(latencies, start.elapsed()),
    );
}
