//! The MCP proxy with software others wrote: the official MCP SDKs as clients (Python 1.x and
//! 2.x, TypeScript) and the reference "everything" server (`@modelcontextprotocol/server-everything`,
//! streamable HTTP) as the upstream, each scenario run directly against the server and through
//! Tollgate. The same outcome is expected except where the policy says otherwise, and a refusal
//! must reach the client as a tool result the model reads, never as an exception.
//!
//! The SDKs and the server come from PyPI and npm (`bash e2e/sdk/install.sh`, part of
//! `e2e/prepare.sh`): target/sdk-venv (MCP 2.x), target/sdk-venv-mcp1 (MCP 1.x), target/sdk-node.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tollgate_audit::{AuditLog, Query, Redactor, SqliteStore, Store, WriterConfig};
use tollgate_gateway::keys::Keys;
use tollgate_gateway::policies::{PolicySet, WatchedDir};
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
    let mut command = match server {
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
    let child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start the {server:?} server: {e}"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the {server:?} server did not listen on {port} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Upstream {
        url: format!("http://127.0.0.1:{port}/mcp"),
        _child: child,
    }
}

/// Tollgate (standalone, on loopback) in front of `upstream` for the agent `default/everything`.
struct Tollgate {
    url: String,
    store: Arc<SqliteStore>,
    _dir: tempfile::TempDir,
}

async fn tollgate(upstream: &str) -> Tollgate {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("everything.yaml"),
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
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentPolicy
metadata: {{name: everything}}
spec:
  identityRef: {{name: everything}}
  upstreams:
    - name: everything
      mcp: {{url: "{upstream}"}}
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
    blocked: [get-env]
"#
        ),
    )
    .unwrap();
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
        WatchedDir::fixed(PolicySet::load(&policies)),
        keys,
        log,
        Redactor::default(),
    );
    let app = gateway::router(Arc::new(gateway));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp/everything", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Tollgate {
        url,
        store,
        _dir: dir,
    }
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
    assert_eq!(
        through["tools"],
        json!(["echo", "get-structured-content", "get-sum"]),
        "{sdk:?} {sdk_version}"
    );

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
        assert_eq!(
            through["capabilities"],
            json!(["tools"]),
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
    assert_eq!(text(&t[0]), "Echo: hello", "{sdk:?} {sdk_version}: {t}");
    assert!(text(&t[1]).contains("42"), "{sdk:?} {sdk_version}: {t}");
    assert!(t[2]["structuredContent"]["temperature"].is_number(), "{t}");

    // Directly, the server runs them; through Tollgate they are refused before the server sees
    // them, as tool results the SDK hands back (no exception, even for the tool whose output
    // schema the TypeScript SDK checks), with the reason in text and the decision in _meta.
    assert!(
        d[3].get("exception").is_none() && d[3]["isError"] != true,
        "{sdk:?}: get-env runs directly: {d}"
    );
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
