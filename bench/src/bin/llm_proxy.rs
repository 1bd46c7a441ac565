//! The LLM proxy beside LiteLLM's proxy and a bare reverse proxy (the floor), each its own
//! process in front of the same fake provider (gateway/examples/fake_llm.rs, model `bench`: no
//! pauses), in one run: the latency each adds to a non-streamed call (p50, p99), the time to the
//! first token it adds to a streamed one, requests per second at saturation, and its peak RSS.
//! Then how far past its cap a stream from a provider that ignores the cap gets through Tollgate.
//!
//! ```sh
//! cargo build --release -p tollgate-gateway                      # at the repository root
//! python3 -m venv target/litellm-venv && target/litellm-venv/bin/pip install 'litellm[proxy]==1.108.7'
//! cd bench && cargo run --release --bin llm-proxy [CALLS] [SECONDS] [CONNECTIONS]
//! ```
//!
//! Tollgate runs as `tollgate-gateway standalone` (`$TOLLGATE_GATEWAY`, default
//! `../target/release/tollgate-gateway`) with its SQLite trail on disk: every call is metered,
//! checked against ceilings and durably recorded before its answer ends. LiteLLM (`$LITELLM`,
//! default `../target/litellm-venv/bin/litellm`) runs with a master key and no database, so it
//! records nothing durable.

#[path = "../../../gateway/examples/fake_llm.rs"]
mod fake_llm;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const AGENT_KEY: &str = "bench-llm-key";
const LITELLM_KEY: &str = "sk-bench-master-key-0123456789abcdef";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("floor") {
        let (port, upstream) = (args[2].clone(), args[3].clone());
        return tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(floor(port, upstream));
    }
    let number = |i: usize, default: u64| {
        args.get(i)
            .map_or(default, |a| a.parse().expect("a number"))
    };
    let (calls, seconds, connections) = (number(1, 300), number(2, 10), number(3, 16));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench(calls as usize, seconds, connections as usize));
}

/// The floor: a reverse proxy that passes the request and streams the answer back, nothing else.
async fn floor(port: String, upstream: String) {
    let client = reqwest::Client::new();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let client = client.clone();
            let url = format!("{upstream}{}", uri.path());
            async move {
                let mut request = client.post(url).body(body);
                for name in ["content-type", "authorization"] {
                    if let Some(value) = headers.get(name) {
                        request = request.header(name, value.as_bytes());
                    }
                }
                let mut answer = request.send().await.unwrap();
                let status = answer.status().as_u16();
                let kind = answer
                    .headers()
                    .get("content-type")
                    .map(|v| v.as_bytes().to_vec())
                    .unwrap_or_default();
                let (mut tx, rx) =
                    futures::channel::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(8);
                tokio::spawn(async move {
                    use futures::SinkExt;
                    while let Ok(Some(chunk)) = answer.chunk().await {
                        if tx.send(Ok(chunk)).await.is_err() {
                            break;
                        }
                    }
                });
                axum::http::Response::builder()
                    .status(status)
                    .header("content-type", kind)
                    .body(axum::body::Body::from_stream(rx))
                    .unwrap()
            }
        },
    );
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await.unwrap();
}

/// A proxy under test: where its chat completions are, how to authenticate, its process.
struct Target {
    name: &'static str,
    url: String,
    auth: String,
    tollgate: bool,
    child: Option<Child>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Target {
    fn request(&self, client: &reqwest::Client, body: &Value) -> reqwest::RequestBuilder {
        static RUN: AtomicU64 = AtomicU64::new(0);
        let mut request = client
            .post(format!("{}/chat/completions", self.url))
            .bearer_auth(&self.auth)
            .json(body);
        if self.tollgate {
            let run = RUN.fetch_add(1, Ordering::Relaxed);
            request = request.header("tollgate-run-id", format!("bench-{run}"));
        }
        request
    }

    /// Peak resident memory of the proxy's process (and its children), in MiB.
    fn peak_rss(&self) -> Option<f64> {
        let pid = self.child.as_ref()?.id();
        let mut pids = vec![pid];
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            pids.extend(
                children
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        let kib: u64 = pids
            .iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .filter_map(|status| {
                status
                    .lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .sum();
        Some(kib as f64 / 1024.0)
    }
}

fn body(stream: bool) -> Value {
    json!({"model": "bench", "max_tokens": 16, "stream": stream,
        "messages": [{"role": "user", "content": "Summarize ticket T000042 in one line."}]})
}

/// Waits until `url` answers anything at all.
async fn wait_for(url: &str, name: &str) {
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if client.get(url).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name} did not come up at {url}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tollgate(dir: &Path, provider: &str) -> Target {
    let binary = std::env::var_os("TOLLGATE_GATEWAY")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/release/tollgate-gateway"));
    assert!(
        binary.exists(),
        "{} is missing: cargo build --release -p tollgate-gateway",
        binary.display()
    );
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let agent = |name: &str, ceiling: u64| {
        format!(
            r#"apiVersion: tollgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{name: {name}}}
spec:
  description: benchmark agent
  owner: {{team: bench, contacts: [bench@example.com]}}
  podSelector: {{matchLabels: {{app: {name}}}}}
  credentials:
    - {{upstream: models, secretRef: {{name: provider, key: key}}, header: Authorization, format: "Bearer {{}}"}}
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentPolicy
metadata: {{name: {name}}}
spec:
  identityRef: {{name: {name}}}
  upstreams:
    - name: models
      llm: {{api: OpenAI, url: "{provider}/v1", models: [bench, greedy]}}
  execution: {{maxTokensPerRun: {ceiling}, maxCostUSD: "10"}}
---
"#
        )
    };
    std::fs::write(
        policies.join("agents.yaml"),
        agent("bench-agent", 100_000) + &agent("cut-agent", 200),
    )
    .unwrap();
    let sha = |key: &str| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(key.as_bytes()))
    };
    std::fs::write(
        dir.join("keys.yaml"),
        format!(
            "keys:\n  - {{name: bench, agent: default/bench-agent, sha256: {}}}\n  - {{name: cut, agent: default/cut-agent, sha256: {}}}\n",
            sha(AGENT_KEY),
            sha("cut-key")
        ),
    )
    .unwrap();
    let secrets = dir.join("secrets/default/provider");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("key"), fake_llm::PROVIDER_KEY).unwrap();
    std::fs::write(
        dir.join("prices.yaml"),
        "models:\n  bench: {input: \"1\", output: \"10\"}\n  greedy: {input: \"1\", output: \"10\"}\n",
    )
    .unwrap();
    let port = free_port();
    let child = Command::new(binary)
        .arg("standalone")
        .args(["--policies".as_ref(), policies.as_os_str()])
        .args(["--keys".as_ref(), dir.join("keys.yaml").as_os_str()])
        .args(["--audit".as_ref(), dir.join("audit.db").as_os_str()])
        .args(["--secrets".as_ref(), dir.join("secrets").as_os_str()])
        .args(["--prices".as_ref(), dir.join("prices.yaml").as_os_str()])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Target {
        name: "Tollgate",
        url: format!("http://127.0.0.1:{port}/llm/models"),
        auth: AGENT_KEY.to_owned(),
        tollgate: true,
        child: Some(child),
    }
}

fn litellm(dir: &Path, provider: &str) -> Option<Target> {
    let binary = std::env::var_os("LITELLM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/litellm-venv/bin/litellm"));
    if !binary.exists() {
        eprintln!(
            "no LiteLLM at {} (see the header of this file); its rows are left out",
            binary.display()
        );
        return None;
    }
    let config = dir.join("litellm.yaml");
    std::fs::write(
        &config,
        format!(
            "model_list:\n  - model_name: bench\n    litellm_params: {{model: openai/bench, api_base: \"{provider}/v1\", api_key: {}}}\n",
            fake_llm::PROVIDER_KEY
        ),
    )
    .unwrap();
    let port = free_port();
    let child = Command::new(binary)
        .args(["--config".as_ref(), config.as_os_str()])
        .args(["--port", &port.to_string(), "--host", "127.0.0.1"])
        .env("LITELLM_MASTER_KEY", LITELLM_KEY)
        .env("LITELLM_LOG", "ERROR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Some(Target {
        name: "LiteLLM",
        url: format!("http://127.0.0.1:{port}/v1"),
        auth: LITELLM_KEY.to_owned(),
        tollgate: false,
        child: Some(child),
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Whether `bytes` hold the first output of a streamed answer (a content delta with text).
fn has_output(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    text.match_indices("\"content\"").any(|(i, m)| {
        let rest = text[i + m.len()..].trim_start_matches([':', ' ']);
        rest.strip_prefix('"')
            .and_then(|r| r.chars().next())
            .is_some_and(|c| c.is_ascii_alphabetic())
    })
}

struct Row {
    p50: Duration,
    p99: Duration,
    ttft: Duration,
    rps: f64,
    rss: Option<f64>,
}

async fn measure(target: &Target, calls: usize, seconds: u64, connections: usize) -> Row {
    let client = reqwest::Client::new();
    let whole = body(false);
    let streamed = body(true);
    for _ in 0..30 {
        let r = target.request(&client, &whole).send().await.unwrap();
        assert!(
            r.status().is_success(),
            "{}: {}",
            target.name,
            r.text().await.unwrap()
        );
        r.bytes().await.unwrap();
    }
    let mut latencies = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        let r = target.request(&client, &whole).send().await.unwrap();
        let answer: Value = r.json().await.unwrap();
        assert!(
            answer["usage"]["completion_tokens"].as_u64().is_some(),
            "{}: {answer}",
            target.name
        );
        latencies.push(start.elapsed());
    }
    latencies.sort();
    let mut firsts = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        let mut r = target.request(&client, &streamed).send().await.unwrap();
        let mut seen = Vec::new();
        let mut first = None;
        while let Some(chunk) = r.chunk().await.unwrap() {
            seen.extend_from_slice(&chunk);
            if first.is_none() && has_output(&seen) {
                first = Some(start.elapsed());
            }
        }
        firsts.push(first.unwrap_or_else(|| {
            panic!(
                "{}: no output in {}",
                target.name,
                String::from_utf8_lossy(&seen)
            )
        }));
    }
    firsts.sort();
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..connections)
        .map(|worker| {
            let (client, done, whole) = (client.clone(), done.clone(), whole.clone());
            let tollgate = target.tollgate;
            let (url, auth) = (target.url.clone(), target.auth.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while Instant::now() < until {
                    let mut request = client
                        .post(format!("{url}/chat/completions"))
                        .bearer_auth(&auth)
                        .json(&whole);
                    if tollgate {
                        i += 1;
                        request = request.header("tollgate-run-id", format!("load-{worker}-{i}"));
                    }
                    let r = request.send().await.unwrap();
                    assert!(
                        r.status().is_success(),
                        "{}",
                        r.text().await.unwrap_or_default()
                    );
                    r.bytes().await.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let started = Instant::now();
    for worker in workers {
        worker.await.unwrap();
    }
    let rps = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    Row {
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        ttft: percentile(&firsts, 0.5),
        rss: target.peak_rss(),
        rps,
    }
}

/// Streams from a provider that ignores the cap, through a run with little left: how many output
/// events got through, against the cap the gateway sent.
async fn cut(tollgate: &Target, provider: &str) -> (u64, u64) {
    let client = reqwest::Client::new();
    let mut r = client
        .post(format!("{}/chat/completions", tollgate.url))
        .bearer_auth("cut-key")
        .header("tollgate-run-id", "cut-run")
        .json(&json!({"model": "greedy", "stream": true, "messages": [{"role": "user", "content": "all of it"}]}))
        .send()
        .await
        .unwrap();
    let mut text = Vec::new();
    while let Ok(Some(chunk)) = r.chunk().await {
        text.extend_from_slice(&chunk);
    }
    let text = String::from_utf8_lossy(&text);
    let events = text
        .split("\n\n")
        .filter(|e| has_output(e.as_bytes()))
        .count() as u64;
    assert!(
        text.contains("maxTokensPerRun"),
        "the stream was not cut: {text}"
    );
    let seen: Value = client
        .get(format!("{provider}/_seen"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cap = seen["body"]["max_completion_tokens"].as_u64().unwrap();
    (events, cap)
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

async fn bench(calls: usize, seconds: u64, connections: usize) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let provider = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(fake_llm::serve(listener));
    let dir = tempfile::tempdir_in(repo().join("target")).unwrap();

    let floor_port = free_port();
    let floor_child = Command::new(std::env::current_exe().unwrap())
        .args(["floor", &floor_port.to_string(), &provider])
        .spawn()
        .unwrap();
    let mut targets = vec![
        Target {
            name: "direct",
            url: format!("{provider}/v1"),
            auth: fake_llm::PROVIDER_KEY.to_owned(),
            tollgate: false,
            child: None,
        },
        Target {
            name: "bare proxy (floor)",
            url: format!("http://127.0.0.1:{floor_port}/v1"),
            auth: fake_llm::PROVIDER_KEY.to_owned(),
            tollgate: false,
            child: Some(floor_child),
        },
        tollgate(dir.path(), &provider),
    ];
    targets.extend(litellm(dir.path(), &provider));
    for target in &targets {
        let health = match target.name {
            "LiteLLM" => target.url.replace("/v1", "/health/liveliness"),
            "Tollgate" => target.url.replace("/llm/models", "/healthz"),
            _ => format!("{}/models", target.url),
        };
        wait_for(&health, target.name).await;
    }
    let mut rows = Vec::new();
    for target in &targets {
        eprintln!("measuring {}", target.name);
        rows.push(measure(target, calls, seconds, connections).await);
    }
    let (events, cap) = cut(&targets[2], &provider).await;

    let direct = &rows[0];
    println!("{}", tollgate_bench::machine_reference());
    println!(
        "\n{calls} sequential calls each (16 output tokens, non-streamed and streamed), then {connections} connections for {seconds} s\n"
    );
    println!(
        "| proxy | p50 | p99 | added p50 | added p99 | added time to first token | calls/s at saturation | peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (target, row) in targets.iter().zip(&rows) {
        let added = |a: Duration, b: Duration| ms(a.saturating_sub(b));
        println!(
            "| {} | {} ms | {} ms | {} ms | {} ms | {} ms | {:.0} | {} |",
            target.name,
            ms(row.p50),
            ms(row.p99),
            added(row.p50, direct.p50),
            added(row.p99, direct.p99),
            added(row.ttft, direct.ttft),
            row.rps,
            row.rss.map_or("-".to_owned(), |r| format!("{r:.0} MiB")),
        );
    }
    let added = |row: &Row| row.p50.saturating_sub(direct.p50).as_secs_f64();
    if let Some(litellm) = rows.get(3) {
        println!(
            "\nTollgate adds {:.2}x what LiteLLM adds at p50 (target: at most 0.1x); {:.2}x at p99; {:.1}x the floor's p50",
            added(&rows[2]) / added(litellm).max(1e-9),
            rows[2].p99.saturating_sub(direct.p99).as_secs_f64()
                / litellm
                    .p99
                    .saturating_sub(direct.p99)
                    .as_secs_f64()
                    .max(1e-9),
            added(&rows[2]) / added(&rows[1]).max(1e-9),
        );
    }
    use tollgate_bench::{Better, report};
    let ms_added = |row: &Row| added(row) * 1e3;
    report("llm-proxy", "LLM proxy, added p50", ms_added(&rows[2]), "a bare streaming proxy", ms_added(&rows[1]), "ms", Better::Lower);
    if let Some(litellm) = rows.get(3) {
        report("llm-proxy", "LLM proxy, added p50", ms_added(&rows[2]), "LiteLLM 1.108.7", ms_added(litellm), "ms", Better::Lower);
        let p99 = |row: &Row| row.p99.saturating_sub(direct.p99).as_secs_f64() * 1e3;
        report("llm-proxy", "LLM proxy, added p99", p99(&rows[2]), "LiteLLM 1.108.7", p99(litellm), "ms", Better::Lower);
        if let (Some(t), Some(l)) = (rows[2].rss, litellm.rss) {
            report("llm-proxy", "LLM proxy, peak RSS", t, "LiteLLM 1.108.7", l, "MiB", Better::Lower);
        }
    }
    println!(
        "A stream from a provider that ignores the cap: {events} output event(s) relayed against a cap of {cap} ({} past it; target: at most 1)",
        events.saturating_sub(cap)
    );
}
