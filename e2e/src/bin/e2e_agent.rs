//! `e2e-agent`: the program of the e2e node's test images. In an agent's pod it is the agent:
//! the tests run it with `kubectl exec` to call the gateway (`http`) or to try a connection it
//! should not be able to open (`connect`); in a tool server's pod it is the upstream MCP server
//! (`upstream`, the official Rust SDK, rmcp) that answers only calls carrying the credential the
//! gateway adds.
//!
//! ```text
//! e2e-agent sleep
//! e2e-agent http URL [--method M] [--body JSON] [--token-file FILE] [--ca FILE] [--header NAME:VALUE]...
//! e2e-agent connect HOST:PORT [--timeout-ms N]
//! e2e-agent until HOST:PORT --connected|--refused [--timeout-ms N]
//! e2e-agent upstream --listen ADDR --credential VALUE [--allowed-host HOST]...
//! e2e-agent stdio-upstream --credential VALUE [--credential-env NAME]
//! e2e-agent install PATH
//! e2e-agent fake-llm [--listen ADDR]
//! ```
//!
//! `stdio-upstream` is the same tool server over stdio (behind `tollgate-gateway stdio-bridge`),
//! taking its credential from the environment variable the bridge sets; `install` copies this
//! program to PATH (an init container puts it where the bridge's container runs it).
//!
//! `fake-llm` serves the FAKE model provider of `gateway/examples/fake_llm.rs` (OpenAI and
//! Anthropic wire formats, key `sk-fake-provider`), for the LLM proxy's tests on the node.
//!
//! `$TOLLGATE_URL` in `http`'s URL is replaced by that environment variable (which admission
//! injects into agent pods). `http` prints one JSON line, `{"status": N, "headers": {...}, "body": ...}`, for any answer,
//! and `{"error": "..."}` with exit code 3 when no answer came. `connect` prints `connected` (exit
//! 0) or `failed: REASON` (exit 1).
#![forbid(unsafe_code)]

#[path = "../../../gateway/examples/fake_llm.rs"]
mod fake_llm;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(
    name = "e2e-agent",
    about = "The test agent and tool server of the e2e node's pods"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the fake model provider (for the LLM proxy's tests; it makes words up).
    FakeLlm {
        #[arg(long, default_value = "0.0.0.0:8490")]
        listen: String,
    },
    /// Wait for SIGTERM (the agent's pod idles; the tests exec into it).
    Sleep,
    /// POST (with --body) or GET a URL and print the answer as JSON.
    Http {
        url: String,
        /// The method (default: POST with --body, GET without).
        #[arg(long)]
        method: Option<String>,
        #[arg(long)]
        body: Option<String>,
        /// A file holding a bearer token (the projected ServiceAccount token).
        #[arg(long)]
        token_file: Option<String>,
        /// PEM of the CA to trust for https (only this CA).
        #[arg(long)]
        ca: Option<String>,
        #[arg(long = "header")]
        headers: Vec<String>,
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
    /// Try to open a TCP connection.
    Connect {
        address: String,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Wait until a TCP connection opens (--connected) or no longer does (--refused), trying
    /// every 20 ms; print the unix time in milliseconds when it first did.
    Until {
        address: String,
        #[arg(long, conflicts_with = "refused")]
        connected: bool,
        #[arg(long)]
        refused: bool,
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
    /// Serve the CRM tools over stdio, answering only calls whose process got the credential in
    /// `credential_env`.
    StdioUpstream {
        #[arg(long)]
        credential: String,
        #[arg(long, default_value = "TOOL_TOKEN")]
        credential_env: String,
    },
    /// Copy this program to a path (mode 0755).
    Install { to: String },
    /// Serve an MCP server (streamable HTTP at /mcp) with CRM tools.
    Upstream {
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: String,
        /// The Authorization header value every tools/call must carry.
        #[arg(long)]
        credential: String,
        /// A Host (`name` or `name:port`) the server answers besides loopback: its Service's
        /// names (the SDK refuses other hosts, against DNS rebinding).
        #[arg(long = "allowed-host")]
        allowed_hosts: Vec<String>,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    match Args::parse().command {
        Cmd::FakeLlm { listen } => {
            let listener = tokio::net::TcpListener::bind(&listen).await?;
            fake_llm::serve(listener).await;
            Ok(())
        }
        Cmd::Sleep => {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            term.recv().await;
            Ok(())
        }
        Cmd::Http {
            url,
            method,
            body,
            token_file,
            ca,
            headers,
            timeout_ms,
        } => {
            // The URL the webhook injected, so that the tests call what the pod was given.
            let url = url.replace(
                "$TOLLGATE_URL",
                &std::env::var("TOLLGATE_URL").unwrap_or_default(),
            );
            match http(&url, method, body, token_file, ca, &headers, timeout_ms).await {
                Ok(answer) => println!("{answer}"),
                Err(e) => {
                    println!("{}", json!({"error": format!("{e:#}")}));
                    std::process::exit(3);
                }
            }
            Ok(())
        }
        Cmd::Connect {
            address,
            timeout_ms,
        } => {
            let attempt = tokio::time::timeout(
                Duration::from_millis(timeout_ms),
                tokio::net::TcpStream::connect(&address),
            )
            .await;
            match attempt {
                Ok(Ok(_)) => {
                    println!("connected");
                    Ok(())
                }
                Ok(Err(e)) => {
                    println!("failed: {e}");
                    std::process::exit(1)
                }
                Err(_) => {
                    println!("failed: no answer in {timeout_ms} ms");
                    std::process::exit(1)
                }
            }
        }
        Cmd::Until {
            address,
            connected,
            refused,
            timeout_ms,
        } => {
            if connected == refused {
                bail!("say --connected or --refused");
            }
            let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
            loop {
                let opened = tokio::time::timeout(
                    Duration::from_millis(200),
                    tokio::net::TcpStream::connect(&address),
                )
                .await
                .is_ok_and(|c| c.is_ok());
                if opened == connected {
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
                    println!("{}", now.as_millis());
                    return Ok(());
                }
                if tokio::time::Instant::now() > deadline {
                    println!(
                        "still {} after {timeout_ms} ms",
                        if opened { "connected" } else { "refused" }
                    );
                    std::process::exit(1);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Cmd::Upstream {
            listen,
            credential,
            allowed_hosts,
        } => upstream(&listen, credential, allowed_hosts).await,
        Cmd::StdioUpstream {
            credential,
            credential_env,
        } => {
            use rmcp::ServiceExt as _;
            let handler = Crm {
                credential: credential.into(),
                presented: std::env::var(&credential_env).ok().map(Into::into),
            };
            handler
                .serve(rmcp::transport::stdio())
                .await?
                .waiting()
                .await?;
            Ok(())
        }
        Cmd::Install { to } => {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::copy(std::env::current_exe()?, &to)
                .with_context(|| format!("copy to {to}"))?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))?;
            Ok(())
        }
    }
}

async fn http(
    url: &str,
    method: Option<String>,
    body: Option<String>,
    token_file: Option<String>,
    ca: Option<String>,
    headers: &[String],
    timeout_ms: u64,
) -> Result<Value> {
    let mut client = reqwest::Client::builder().timeout(Duration::from_millis(timeout_ms));
    if let Some(ca) = ca {
        let pem = std::fs::read(&ca).with_context(|| format!("read {ca}"))?;
        client = client
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    let client = client.build()?;
    let method = match method {
        Some(method) => reqwest::Method::from_bytes(method.to_uppercase().as_bytes())?,
        None if body.is_some() => reqwest::Method::POST,
        None => reqwest::Method::GET,
    };
    let mut request = client.request(method, url);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    if let Some(file) = token_file {
        let token = std::fs::read_to_string(&file).with_context(|| format!("read {file}"))?;
        request = request.bearer_auth(token.trim());
    }
    for header in headers {
        let Some((name, value)) = header.split_once(':') else {
            bail!("--header {header}: expected NAME:VALUE");
        };
        request = request.header(name.trim(), value.trim());
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let headers: serde_json::Map<String, Value> = response
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or_default())))
        .collect();
    let text = response.text().await?;
    let body = serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text));
    Ok(json!({"status": status, "headers": headers, "body": body}))
}

/// The tool server behind the gateway: the sample CRM's tools.
#[derive(Clone)]
struct Crm {
    credential: Arc<str>,
    /// Over stdio, the credential the process was given (over HTTP, each call's header).
    presented: Option<Arc<str>>,
}

impl ServerHandler for Crm {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let schema = Arc::new(serde_json::Map::from_iter([(
            "type".to_owned(),
            json!("object"),
        )]));
        Ok(ListToolsResult::with_all_items(
            [
                "read_customer_record",
                "update_order_status",
                "send_customer_email",
                "delete_customer_record",
                "lookup_order",
            ]
            .into_iter()
            .map(|name| Tool::new(name, "a CRM tool", schema.clone()))
            .collect(),
        ))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let auth = self.presented.as_deref().map(str::to_owned).or_else(|| {
            context
                .extensions
                .get::<axum::http::request::Parts>()
                .and_then(|parts| parts.headers.get("authorization"))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
        eprintln!(
            "tools/call {} authorization={}",
            request.name,
            if auth.as_deref() == Some(&*self.credential) {
                "expected"
            } else {
                "missing-or-wrong"
            }
        );
        if auth.as_deref() != Some(&*self.credential) {
            return Err(ErrorData::invalid_request(
                "this server answers only calls with its credential",
                None,
            ));
        }
        let arguments = Value::Object(request.arguments.clone().unwrap_or_default());
        Ok(CallToolResult::structured(json!({
            "customer_id": arguments["customer_id"],
            "order_history": ["O-1"],
            "contact_info": "ada@example.com",
            "ssn": "123-45-6789",
        }))
        .into())
    }
}

async fn upstream(listen: &str, credential: String, allowed_hosts: Vec<String>) -> Result<()> {
    let handler = Crm {
        credential: credential.into(),
        presented: None,
    };
    let service: StreamableHttpService<Crm, LocalSessionManager> = StreamableHttpService::new(
        move || Ok(handler.clone()),
        Default::default(),
        StreamableHttpServerConfig::default().with_allowed_hosts(
            ["localhost", "127.0.0.1"]
                .into_iter()
                .map(str::to_owned)
                .chain(allowed_hosts),
        ),
    );
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("serving MCP at http://{listen}/mcp");
    let app = axum::Router::new()
        .nest_service("/mcp", service)
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            term.recv().await;
        })
        .await?;
    Ok(())
}
