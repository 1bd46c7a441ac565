//! Traces: the gateway's spans exported over OTLP/HTTP to a receiver of this test's own, which
//! checks what an operator's collector would get: a server span per request joined to the
//! caller's W3C trace, the decision under it and the audit commit under that, the upstream MCP
//! call and the model call as client spans with the MCP and GenAI semantic conventions' names and
//! attributes, and the trace id in the audit record of each.

#[path = "../examples/fake_llm.rs"]
mod fake_llm;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
use tollgate_audit::{AuditLog, Event, Query, Redactor, SqliteStore, Store, WriterConfig};
use tollgate_gateway::keys::Keys;
use tollgate_gateway::policies::WatchedDir;
use tollgate_gateway::{Gateway, mcp, standalone_router};

const KEY: &str = "traced-agent-key";
/// The caller's trace, as an agent framework that traces would send it.
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[derive(Clone)]
struct Tools;

impl ServerHandler for Tools {
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
        Ok(ListToolsResult::with_all_items(vec![Tool::new(
            "lookup", "looks up", schema,
        )]))
    }

    async fn call_tool(
        &self,
        _request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        Ok(CallToolResult::structured(json!({"found": true})).into())
    }
}

/// The spans the receiver got, by name.
type Received = Arc<Mutex<Vec<Value>>>;

/// An OTLP/HTTP receiver of our own: keeps every span of every export.
async fn receiver() -> (String, Received) {
    let received: Received = Arc::default();
    let spans = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, axum::Json(body): axum::Json<Value>| {
                let spans = spans.clone();
                async move {
                    assert_eq!(headers["content-type"], "application/json");
                    let resource = &body["resourceSpans"][0];
                    assert_eq!(
                        resource["resource"]["attributes"][0],
                        json!({"key": "service.name", "value": {"stringValue": "tollgate-gateway"}})
                    );
                    for span in resource["scopeSpans"][0]["spans"].as_array().unwrap() {
                        spans.lock().unwrap().push(span.clone());
                    }
                    "{}"
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

fn attribute<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
}

fn string<'a>(span: &'a Value, key: &str) -> &'a str {
    attribute(span, key)
        .and_then(|v| v["stringValue"].as_str())
        .unwrap_or_else(|| panic!("{key} missing from {span}"))
}

#[tokio::test]
async fn spans_reach_the_collector_with_their_parents_and_the_record_names_the_trace() {
    use tracing_subscriber::layer::SubscriberExt as _;
    let (collector, received) = receiver().await;
    let (layer, send) = tollgate_gateway::trace::exporter(&collector, "tollgate-gateway").unwrap();
    tokio::spawn(send);
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer)).unwrap();

    // An MCP upstream and a model provider.
    let service: StreamableHttpService<Tools, LocalSessionManager> = StreamableHttpService::new(
        || Ok(Tools),
        Default::default(),
        StreamableHttpServerConfig::default(),
    );
    let tools = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tools_url = format!("http://{}/mcp", tools.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(tools, axum::Router::new().nest_service("/mcp", service))
            .await
            .unwrap()
    });
    let provider = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let provider_url = format!("http://{}", provider.local_addr().unwrap());
    tokio::spawn(fake_llm::serve(provider));

    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("agent.yaml"),
        format!(
            r#"apiVersion: tollgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{name: traced-agent}}
spec:
  description: An agent whose calls are traced
  owner: {{team: platform, contacts: [dana@example.com]}}
  podSelector: {{matchLabels: {{app: traced-agent}}}}
  credentials:
    - {{upstream: openai, secretRef: {{name: provider, key: openai}}, header: Authorization, format: "Bearer {{}}"}}
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentPolicy
metadata: {{name: traced-agent}}
spec:
  identityRef: {{name: traced-agent}}
  upstreams:
    - name: tools
      mcp: {{url: "{tools_url}"}}
    - name: openai
      llm: {{api: OpenAI, url: "{provider_url}/v1", models: [gpt-4o-mini], maxOutputTokens: 30}}
  tools:
    allowed:
      - {{name: lookup, upstream: tools}}
  execution: {{maxSteps: 20}}
"#
        ),
    )
    .unwrap();
    let secrets = dir.path().join("secrets/default/provider");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("openai"), fake_llm::PROVIDER_KEY).unwrap();
    let keys = Keys::parse(&format!(
        "keys:\n  - {{name: traced, agent: default/traced-agent, sha256: {}}}\n",
        {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(KEY.as_bytes()))
        }
    ))
    .unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("audit.db")).unwrap());
    let (log, _) = AuditLog::open(store.clone(), WriterConfig::new("traced"))
        .await
        .unwrap();
    let gateway = Gateway::new(
        WatchedDir::start(policies, Duration::from_millis(50)),
        keys,
        log,
        Redactor::default(),
    )
    .with_secrets(dir.path().join("secrets"))
    .with_tracing();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = standalone_router(Arc::new(gateway));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let http = reqwest::Client::new();

    // A decision, in the caller's trace.
    let decided: Value = http
        .post(format!("{url}/v1/decide"))
        .bearer_auth(KEY)
        .header("traceparent", TRACEPARENT)
        .json(&json!({"runId": "t-1", "tool": "lookup", "arguments": {}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(decided["decision"], "allow", "{decided}");
    // An MCP call through the proxy (a session, then the tool).
    let mcp_post = |session: Option<String>, body: Value| {
        let mut request = http
            .post(format!("{url}/mcp/tools"))
            .bearer_auth(KEY)
            .header("accept", "application/json, text/event-stream")
            .header("Tollgate-Run-Id", "t-2")
            .json(&body);
        if let Some(session) = session {
            request = request.header(mcp::SESSION_HEADER, session);
        }
        request.send()
    };
    let init = mcp_post(
        None,
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "traced", "version": "1"}}}),
    )
    .await
    .unwrap();
    let session = init.headers()[mcp::SESSION_HEADER]
        .to_str()
        .unwrap()
        .to_owned();
    mcp_post(
        Some(session.clone()),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await
    .unwrap();
    let called = mcp_post(
        Some(session.clone()),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
               "params": {"name": "lookup", "arguments": {}}}),
    )
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert!(called.contains("found"), "{called}");
    // A model call through the LLM proxy.
    let answer: Value = http
        .post(format!("{url}/llm/openai/chat/completions"))
        .bearer_auth(KEY)
        .header("Tollgate-Run-Id", "t-3")
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(answer["choices"].is_array(), "{answer}");

    // Everything exported within a few batches.
    let spans = {
        let mut spans = Vec::new();
        for _ in 0..100 {
            spans = received.lock().unwrap().clone();
            let names: Vec<&str> = spans.iter().map(|s| s["name"].as_str().unwrap()).collect();
            if names.contains(&"chat gpt-4o-mini") && names.contains(&"tools/call lookup") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        spans
    };
    let by_id: HashMap<&str, &Value> = spans
        .iter()
        .map(|s| (s["spanId"].as_str().unwrap(), s))
        .collect();
    let named = |name: &str| -> &Value {
        spans
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no span {name} in {spans:#?}"))
    };
    let parent = |span: &Value| -> Option<&Value> {
        span["parentSpanId"].as_str().map(|id| {
            *by_id
                .get(id)
                .unwrap_or_else(|| panic!("parent {id} of {span} not exported"))
        })
    };

    // The decision: server span in the caller's trace, decide under it, audit commit under that.
    let decide = named("decide lookup");
    let server = parent(decide).expect("decide has a parent");
    assert_eq!(server["name"], "POST /v1/decide");
    assert_eq!(server["kind"], 2, "server");
    assert_eq!(server["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        server["parentSpanId"], "00f067aa0ba902b7",
        "the caller's span"
    );
    assert_eq!(string(server, "http.request.method"), "POST");
    assert_eq!(
        attribute(server, "http.response.status_code").unwrap()["intValue"],
        "200"
    );
    assert!(
        attribute(server, "traceparent").is_none(),
        "not repeated as an attribute"
    );
    assert_eq!(decide["traceId"], server["traceId"]);
    assert_eq!(string(decide, "gen_ai.tool.name"), "lookup");
    assert_eq!(string(decide, "tollgate.decision"), "allow");
    assert_eq!(string(decide, "tollgate.agent"), "default/traced-agent");
    let commit = spans
        .iter()
        .find(|s| s["name"] == "audit commit" && s["parentSpanId"] == decide["spanId"])
        .expect("the decision's audit commit");
    assert_eq!(commit["traceId"], server["traceId"]);
    assert_eq!(string(commit, "tollgate.audit.event"), "decide");
    for span in [server, decide, commit] {
        let (start, end) = (
            span["startTimeUnixNano"]
                .as_str()
                .unwrap()
                .parse::<u128>()
                .unwrap(),
            span["endTimeUnixNano"]
                .as_str()
                .unwrap()
                .parse::<u128>()
                .unwrap(),
        );
        assert!(start > 0 && end >= start, "{span}");
        assert_eq!(span["status"]["code"], 0, "{span}");
    }

    // The MCP call: a client span under the decision's server span of its request.
    let tool = named("tools/call lookup");
    assert_eq!(tool["kind"], 3, "client");
    assert_eq!(string(tool, "mcp.method.name"), "tools/call");
    assert_eq!(string(tool, "gen_ai.operation.name"), "execute_tool");
    assert_eq!(string(tool, "gen_ai.tool.name"), "lookup");
    assert_eq!(string(tool, "mcp.session.id"), session);
    let request = parent(tool).unwrap();
    assert_eq!(request["name"], "POST /mcp/tools");
    assert_ne!(
        request["traceId"], server["traceId"],
        "a request of its own"
    );

    // The model call: GenAI's client span with the usage the provider reported.
    let chat = named("chat gpt-4o-mini");
    assert_eq!(chat["kind"], 3);
    assert_eq!(string(chat, "gen_ai.operation.name"), "chat");
    assert_eq!(string(chat, "gen_ai.provider.name"), "openai");
    assert_eq!(string(chat, "gen_ai.request.model"), "gpt-4o-mini");
    let input: u64 = attribute(chat, "gen_ai.usage.input_tokens").unwrap()["intValue"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(input > 0, "{chat}");
    assert_eq!(
        parent(chat).unwrap()["name"],
        "POST /llm/openai/chat/completions"
    );

    // The records name their traces: from a trace to the replay.
    let records = store.query(&Query::default()).await.unwrap();
    let entries: Vec<_> = records.iter().map(|r| r.entry().unwrap()).collect();
    let decision = entries
        .iter()
        .find(|e| e.event == Event::Decide && e.run.as_deref() == Some("t-1"))
        .unwrap();
    assert_eq!(
        decision.trace_id.as_deref(),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    let model = entries.iter().find(|e| e.event == Event::Model).unwrap();
    assert_eq!(model.trace_id.as_deref(), chat["traceId"].as_str());
}
