//! The MCP proxy in front of a real MCP server (rmcp, streamable HTTP, stateful sessions with
//! SSE answers): what passes, what is cut, what never reaches the upstream.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
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
use tollgate_audit::{AuditLog, Query, Redactor, SqliteStore, Store, WriterConfig, verify};
use tollgate_gateway::keys::Keys;
use tollgate_gateway::policies::WatchedDir;
use tollgate_gateway::{self as gateway, Gateway, mcp};
use tower::ServiceExt;

const KEY: &str = "support-key-1";
/// A support lead's approver key.
const LEAD: &str = "lead-key-1";
const CREDENTIAL: &str = "crm-secret-123";

/// What the upstream received: tool, arguments, Authorization header.
type Calls = Arc<Mutex<Vec<(String, Value, Option<String>)>>>;

#[derive(Clone)]
struct Crm {
    calls: Calls,
    /// How long each tools/call takes, in milliseconds.
    delay: Arc<std::sync::atomic::AtomicU64>,
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
                "export_all_customers",
            ]
            .into_iter()
            .map(|name| {
                let tool = Tool::new(name, "a CRM tool", schema.clone());
                if name != "read_customer_record" {
                    return tool;
                }
                // Its output schema names (and requires) a field the policy hides.
                let output = json!({"type": "object",
                    "properties": {"customer_id": {"type": "string"}, "ssn": {"type": "string"}},
                    "required": ["customer_id", "ssn"]});
                tool.with_raw_output_schema(Arc::new(output.as_object().unwrap().clone()))
            })
            .collect(),
        ))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let auth = context
            .extensions
            .get::<axum::http::request::Parts>()
            .and_then(|parts| parts.headers.get("authorization"))
            .map(|v| v.to_str().unwrap().to_owned());
        let arguments = Value::Object(request.arguments.clone().unwrap_or_default());
        let delay = self.delay.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        let customer = arguments["customer_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        self.calls
            .lock()
            .unwrap()
            .push((request.name.to_string(), arguments, auth));
        if customer == "C000097" {
            return Err(ErrorData::invalid_params("no such customer", None));
        }
        // Most servers answer text only: C000099 gets its record as one JSON text block,
        // C000098 as prose.
        let text = match customer.as_str() {
            "C000099" => Some(
                json!({"customer_id": "C000099", "ssn": "987-65-4321", "order_history": []})
                    .to_string(),
            ),
            "C000098" => Some("Customer C000098, SSN 987-65-4321, no orders.".to_owned()),
            // A record of about 2 MiB.
            "C000094" => Some(
                json!({"customer_id": "C000094", "order_history": vec!["O-1"; 300_000]})
                    .to_string(),
            ),
            // A record of 100 kB.
            "C000095" => Some(
                json!({"customer_id": "C000095", "ssn": "987-65-4321",
                       "order_history": vec!["O-1"; 10_000]})
                .to_string(),
            ),
            _ => None,
        };
        if let Some(text) = text {
            return Ok(CallToolResult::success(vec![rmcp::model::ContentBlock::text(text)]).into());
        }
        Ok(CallToolResult::structured(json!({
            "customer_id": "C000042",
            "order_history": ["O-1"],
            "contact_info": "ada@example.com",
            "ssn": "123-45-6789"
        }))
        .into())
    }
}

/// Starts the upstream; returns its URL and what it received.
async fn upstream() -> (String, Calls, Arc<std::sync::atomic::AtomicU64>) {
    let calls: Calls = Arc::default();
    let delay: Arc<std::sync::atomic::AtomicU64> = Arc::default();
    let handler = Crm {
        calls: calls.clone(),
        delay: delay.clone(),
    };
    let service: StreamableHttpService<Crm, LocalSessionManager> = StreamableHttpService::new(
        move || Ok(handler.clone()),
        Default::default(),
        StreamableHttpServerConfig::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, axum::Router::new().nest_service("/mcp", service))
            .await
            .unwrap();
    });
    (format!("http://{addr}/mcp"), calls, delay)
}

struct Harness {
    app: axum::Router,
    store: Arc<SqliteStore>,
    calls: Calls,
    delay: Arc<std::sync::atomic::AtomicU64>,
    _dir: tempfile::TempDir,
}

async fn harness() -> Harness {
    harness_with(|gateway| gateway).await
}

/// [`harness`] with the gateway configured by `configure` too.
async fn harness_with(configure: impl FnOnce(Gateway) -> Gateway) -> Harness {
    let (url, calls, delay) = upstream().await;
    harness_on(url, calls, delay, configure).await
}

/// The gateway in front of the upstream at `url`.
async fn harness_on(
    url: String,
    calls: Calls,
    delay: Arc<std::sync::atomic::AtomicU64>,
    configure: impl FnOnce(Gateway) -> Gateway,
) -> Harness {
    harness_of(&url, "", "", calls, delay, configure).await
}

/// [`harness_on`] with `more` YAML in the upstreams' `mcp:` besides the url, and `spec` lines
/// in the policy's spec.
async fn harness_of(
    url: &str,
    more: &str,
    spec: &str,
    calls: Calls,
    delay: Arc<std::sync::atomic::AtomicU64>,
    configure: impl FnOnce(Gateway) -> Gateway,
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/samples");
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let sample = std::fs::read_to_string(samples.join("support-agent.yaml")).unwrap();
    std::fs::write(
        policies.join("support.yaml"),
        // A second upstream (the same server) that serves none of the CRM tools.
        sample
            .replace(
                "    - name: crm\n      mcp: {url: \"http://crm-mcp.support.svc:8080/mcp\"}",
                "    - name: crm\n      mcp: {url: \"http://crm-mcp.support.svc:8080/mcp\"}\n    - name: payments\n      mcp: {url: \"http://crm-mcp.support.svc:8080/mcp\"}",
            )
            .replace(
                "{url: \"http://crm-mcp.support.svc:8080/mcp\"}",
                &format!("{{url: \"{url}\"{more}}}"),
            )
            .replace("  tools:\n    allowed:\n", &format!("{spec}  tools:\n    allowed:\n")),
    )
    .unwrap();
    let secrets = dir.path().join("secrets/default/crm-token");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("token"), format!("{CREDENTIAL}\n")).unwrap();

    let store = Arc::new(SqliteStore::open(dir.path().join("audit.db")).unwrap());
    let (log, _) = AuditLog::open(store.clone(), WriterConfig::new("gw-test"))
        .await
        .unwrap();
    let sha = |key: &str| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(key.as_bytes()))
    };
    let keys = Keys::parse(&format!(
        "keys:\n  - {{name: support, agent: default/support-agent-v2, sha256: {}}}\n  - {{name: lead, role: approver, groups: [support-leads], sha256: {}}}\n",
        sha(KEY),
        sha(LEAD),
    ))
    .unwrap();
    let gateway = Gateway::new(
        // Reloaded on change, as a standalone gateway does (a test may engage the kill switch).
        WatchedDir::start(policies.clone(), std::time::Duration::from_millis(50)),
        keys,
        log,
        Redactor::default(),
    )
    .with_secrets(dir.path().join("secrets"))
    .with_keep_alive(std::time::Duration::from_millis(50));
    let gateway = configure(gateway);
    Harness {
        app: gateway::standalone_router(Arc::new(gateway)),
        store,
        calls,
        delay,
        _dir: dir,
    }
}

struct Reply {
    status: StatusCode,
    session: Option<String>,
    body: Value,
}

impl Harness {
    async fn send(&self, session: Option<&str>, body: Vec<u8>) -> Reply {
        self.send_with(session, &[], body).await
    }

    /// [`Harness::send`] with `extra` headers too.
    async fn send_with(
        &self,
        session: Option<&str>,
        extra: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Reply {
        let mut request = Request::post("/mcp/crm")
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("authorization", format!("Bearer {KEY}"));
        if let Some(session) = session {
            request = request.header(mcp::SESSION_HEADER, session);
        }
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        let response = self
            .app
            .clone()
            .oneshot(request.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let session = response
            .headers()
            .get(mcp::SESSION_HEADER)
            .map(|v| v.to_str().unwrap().to_owned());
        let events = response
            .headers()
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap().starts_with("text/event-stream"));
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else if events {
            // A streamed tools/call: keep-alive comments, then one message event.
            let text = String::from_utf8(bytes.to_vec()).unwrap();
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            assert_eq!(data.len(), 1, "one message event: {text}");
            serde_json::from_str(data[0]).unwrap()
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        Reply {
            status,
            session,
            body,
        }
    }

    async fn rpc(&self, session: Option<&str>, message: Value) -> Reply {
        self.send(session, message.to_string().into_bytes()).await
    }

    /// initialize + notifications/initialized through the gateway; returns the session.
    async fn session(&self) -> String {
        let init = self
            .rpc(
                None,
                json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                    "protocolVersion": "2025-06-18", "capabilities": {},
                    "clientInfo": {"name": "tollgate-test", "version": "1"}}}),
            )
            .await;
        assert_eq!(init.status, StatusCode::OK, "{}", init.body);
        assert!(
            init.body["result"]["serverInfo"].is_object(),
            "{}",
            init.body
        );
        let session = init.session.expect("the upstream's session comes back");
        let initialized = self
            .rpc(
                Some(&session),
                json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
            )
            .await;
        assert_eq!(initialized.status, StatusCode::ACCEPTED);
        session
    }

    /// The support lead decides the one approval request waiting (polling until there is one).
    async fn lead_decides(&self, verdict: &str) -> Value {
        let send = |request: axum::http::request::Builder, body: Body| async move {
            let response = self
                .app
                .clone()
                .oneshot(
                    request
                        .header("authorization", format!("Bearer {LEAD}"))
                        .body(body)
                        .unwrap(),
                )
                .await
                .unwrap();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            serde_json::from_slice::<Value>(&bytes).unwrap()
        };
        for _ in 0..200 {
            let listed = send(Request::get("/v1/approvals"), Body::empty()).await;
            let waiting = listed["items"]
                .as_array()
                .and_then(|items| items.iter().find(|r| r["status"]["phase"] == "Pending"));
            if let Some(request) = waiting {
                let name = format!(
                    "{}/{}",
                    request["metadata"]["namespace"].as_str().unwrap(),
                    request["metadata"]["name"].as_str().unwrap()
                );
                return send(
                    Request::post(format!("/v1/approvals/{name}"))
                        .header("content-type", "application/json"),
                    Body::from(json!({"verdict": verdict}).to_string()),
                )
                .await;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("no approval request was created");
    }

    async fn call(&self, session: &str, id: u64, tool: &str, arguments: Value) -> Reply {
        self.rpc(
            Some(session),
            json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                   "params": {"name": tool, "arguments": arguments}}),
        )
        .await
    }
}

#[tokio::test]
async fn tools_list_shows_only_what_the_policy_allows() {
    let h = harness().await;
    let session = h.session().await;
    let list = h
        .rpc(
            Some(&session),
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        )
        .await;
    let names: Vec<&str> = list.body["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "read_customer_record",
            "update_order_status",
            "send_customer_email"
        ]
    );
}

/// SECURITY.md 1: MCP metadata and headers that name another agent change nothing; the key
/// decides whose policy applies, whose credential goes upstream and whose trail it is.
#[tokio::test]
async fn mcp_metadata_and_headers_naming_another_agent_are_ignored() {
    let h = harness().await;
    let session = h.session().await;
    let claims = [
        ("x-tollgate-agent", "default/deploy-agent"),
        (
            "impersonate-user",
            "system:serviceaccount:default:agent-deploy-agent",
        ),
        ("x-forwarded-user", "deploy-agent"),
    ];
    let meta = json!({"tollgate.dev/agent": "default/deploy-agent", "agent": "deploy-agent",
                      "identity": {"serviceAccount": "agent-deploy-agent"}});
    let call = |id: u64, tool: &str, arguments: Value| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
               "params": {"name": tool, "arguments": arguments, "_meta": meta}})
        .to_string()
        .into_bytes()
    };
    // A tool the support agent may call goes through as the support agent, with its credential.
    let read = h
        .send_with(
            Some(&session),
            &claims,
            call(2, "read_customer_record", json!({"customer_id": "C000042"})),
        )
        .await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.body);
    assert!(read.body["result"].is_object(), "{}", read.body);
    // One the support agent's policy blocks stays blocked, whoever the metadata names.
    let blocked = h
        .send_with(
            Some(&session),
            &claims,
            call(
                3,
                "delete_customer_record",
                json!({"customer_id": "C000042"}),
            ),
        )
        .await;
    assert_refused(&blocked, "ToolBlocked");
    assert_eq!(
        blocked.body["result"]["_meta"][mcp::DECISION_META]["rule"]["policy"],
        "support-agent-v2",
        "{}",
        blocked.body
    );
    let calls = h.calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        [(
            "read_customer_record".to_owned(),
            json!({"customer_id": "C000042"}),
            Some(format!("Bearer {CREDENTIAL}"))
        )]
    );
    let records = h.store.query(&Query::default()).await.unwrap();
    let entries: Vec<_> = records.iter().map(|r| r.entry().unwrap()).collect();
    assert!(entries.len() >= 3, "{entries:?}");
    for entry in &entries {
        assert_eq!(entry.identity.username, "apikey:support", "{entry:?}");
        assert_eq!(
            entry.agent.as_deref(),
            Some("default/support-agent-v2"),
            "{entry:?}"
        );
    }
}

#[tokio::test]
async fn an_allowed_call_is_forwarded_once_with_the_credential_and_its_result_cut() {
    let h = harness().await;
    let session = h.session().await;
    let reply = h
        .call(
            &session,
            3,
            "read_customer_record",
            json!({"customer_id": "C000042"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(
        reply.body["result"]["structuredContent"],
        json!({"customer_id": "C000042", "order_history": ["O-1"], "contact_info": "ada@example.com"})
    );
    let text = reply.body["result"]["content"][0]["text"].as_str().unwrap();
    assert!(!text.contains("123-45-6789"), "{text}");
    let calls = h.calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        [(
            "read_customer_record".to_owned(),
            json!({"customer_id": "C000042"}),
            Some(format!("Bearer {CREDENTIAL}"))
        )]
    );

    // The decision and the result are in the trail; the session is the run.
    verify(h.store.as_ref(), true, &BTreeMap::new())
        .await
        .unwrap();
    let run = h
        .store
        .query(&Query {
            run: Some(session.clone()),
            ..Query::default()
        })
        .await
        .unwrap();
    let events: Vec<String> = run.iter().map(|r| r.index.event.clone()).collect();
    assert_eq!(events, ["decide", "report"]);
}

/// A refusal is a tool result the model reads (`isError`, the reason in text), never a
/// JSON-RPC error an SDK raises; the decision rides in `_meta` for the client's code.
fn assert_refused(reply: &Reply, code: &str) {
    let result = &reply.body["result"];
    assert_eq!(result["isError"], true, "{}", reply.body);
    assert!(reply.body.get("error").is_none(), "{}", reply.body);
    let text = result["content"][0]["text"].as_str().unwrap_or_default();
    assert!(
        text.starts_with(&format!("Tollgate refused the call ({code}): ")) && text.len() > 40,
        "{}",
        reply.body
    );
    let decision = &result["_meta"][mcp::DECISION_META];
    assert!(
        decision["code"] == code || decision["decision"] == code,
        "{}",
        reply.body
    );
    assert!(
        result.get("structuredContent").is_none(),
        "a refusal must not be checked against the tool's outputSchema: {}",
        reply.body
    );
}

#[tokio::test]
async fn refused_calls_are_tool_results_the_model_reads_and_never_reach_the_upstream() {
    let h = harness().await;
    let session = h.session().await;
    for (id, tool, arguments, code) in [
        (10, "delete_customer_record", json!({}), "ToolBlocked"),
        (11, "export_all_customers", json!({}), "ToolNotAllowed"),
        (
            12,
            "read_customer_record",
            json!({"customer_id": "42"}),
            "ArgumentConstraint",
        ),
        (
            13,
            "Read_Customer_Record",
            json!({"customer_id": "C000042"}),
            "ToolNotAllowed",
        ),
    ] {
        let reply = h.call(&session, id, tool, arguments).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body["id"], id, "{}", reply.body);
        assert_refused(&reply, code);
        let decision = &reply.body["result"]["_meta"][mcp::DECISION_META];
        assert!(decision["rule"]["clause"].is_string(), "{}", reply.body);
        assert!(decision["audit"]["seq"].is_u64(), "{}", reply.body);
    }
    // The model is told what to change: the constraint names the argument and the pattern.
    let constrained = h
        .call(
            &session,
            15,
            "read_customer_record",
            json!({"customer_id": "42"}),
        )
        .await;
    let text = constrained.body["result"]["content"][0]["text"]
        .as_str()
        .unwrap();
    assert!(text.contains("customer_id"), "{text}");
    // An irreversible call waits for a person, here a support lead who denies it.
    let (approval, decided) = tokio::join!(
        h.call(
            &session,
            14,
            "send_customer_email",
            json!({"customer_id": "C000042", "subject": "Hi", "body": "Done."}),
        ),
        h.lead_decides("Deny")
    );
    assert_eq!(decided["status"]["phase"], "Denied", "{decided}");
    assert_eq!(decided["spec"]["decisions"][0]["user"], "lead", "{decided}");
    assert_refused(&approval, "ApprovalDenied");
    assert!(h.calls.lock().unwrap().is_empty(), "nothing was forwarded");
    // Approved, the same call goes through to the upstream, once.
    let (approved, decided) = tokio::join!(
        h.call(
            &session,
            16,
            "send_customer_email",
            json!({"customer_id": "C000042", "subject": "Hi", "body": "Done."}),
        ),
        h.lead_decides("Approve")
    );
    assert_eq!(decided["status"]["phase"], "Approved", "{decided}");
    assert_eq!(
        approved.body["result"]["isError"], false,
        "{}",
        approved.body
    );
    assert_eq!(
        h.calls.lock().unwrap().len(),
        1,
        "the approved call was forwarded"
    );
}

#[tokio::test]
async fn batches_responses_and_other_methods_cannot_smuggle_a_call() {
    let h = harness().await;
    let session = h.session().await;
    let call = json!({"jsonrpc": "2.0", "id": 20, "method": "tools/call",
                      "params": {"name": "read_customer_record", "arguments": {"customer_id": "C000042"}}});

    // A batch, even of allowed calls.
    let batch = h
        .send(
            Some(&session),
            json!([call.clone(), call.clone()]).to_string().into_bytes(),
        )
        .await;
    assert_eq!(batch.status, StatusCode::BAD_REQUEST);
    assert_eq!(batch.body["error"]["code"], mcp::codes::INVALID_REQUEST);

    // Methods other than the ones the gateway knows, including near-misses of tools/call.
    for method in [
        "Tools/Call",
        "tools/call ",
        "tools/call/",
        "Resources/Read",
        "sampling/createMessage",
    ] {
        let reply = h
            .rpc(
                Some(&session),
                json!({"jsonrpc": "2.0", "id": 21, "method": method,
                       "params": {"name": "delete_customer_record", "arguments": {}}}),
            )
            .await;
        assert_eq!(
            reply.body["error"]["code"],
            mcp::codes::METHOD_NOT_FOUND,
            "{method}: {}",
            reply.body
        );
    }
    // A resource read or prompt the policy lists none of (the sample lists none): refused
    // before the upstream sees it, with the decision; without its uri or name, malformed.
    for (method, params) in [
        ("resources/read", json!({"uri": "crm://customers/C000042"})),
        ("prompts/get", json!({"name": "draft_reply"})),
    ] {
        let reply = h
            .rpc(
                Some(&session),
                json!({"jsonrpc": "2.0", "id": 23, "method": method, "params": params}),
            )
            .await;
        assert_eq!(
            reply.body["error"]["code"],
            mcp::codes::CONTENT_REFUSED,
            "{}",
            reply.body
        );
        assert_eq!(
            reply.body["error"]["data"]["code"], "ContentNotAllowed",
            "{}",
            reply.body
        );
        let reply = h
            .rpc(
                Some(&session),
                json!({"jsonrpc": "2.0", "id": 24, "method": method, "params": {}}),
            )
            .await;
        assert_eq!(
            reply.body["error"]["code"],
            mcp::codes::INVALID_PARAMS,
            "{}",
            reply.body
        );
    }
    // A tools/call sent as a notification (no id) is dropped, not forwarded.
    let notification = h
        .rpc(
            Some(&session),
            json!({"jsonrpc": "2.0", "method": "tools/call",
                   "params": {"name": "delete_customer_record", "arguments": {}}}),
        )
        .await;
    assert_eq!(notification.status, StatusCode::ACCEPTED);

    // Duplicate keys: which "name" would the upstream read? Neither: refused.
    let duplicate = h
        .send(
            Some(&session),
            br#"{"jsonrpc":"2.0","id":22,"method":"tools/call","params":{"name":"read_customer_record","name":"delete_customer_record","arguments":{}}}"#.to_vec(),
        )
        .await;
    assert_eq!(
        duplicate.body["error"]["code"],
        mcp::codes::PARSE_ERROR,
        "{}",
        duplicate.body
    );

    // Extra members, a response, a wrong version, params that are not an object.
    for message in [
        json!({"jsonrpc": "2.0", "id": 23, "method": "tools/list", "extra": {"method": "tools/call"}}),
        json!({"jsonrpc": "2.0", "id": 24, "result": {}}),
        json!({"jsonrpc": "1.0", "id": 25, "method": "tools/list"}),
        json!({"jsonrpc": "2.0", "id": 26, "method": "tools/call", "params": ["delete_customer_record"]}),
        json!({"jsonrpc": "2.0", "id": {"x": 1}, "method": "tools/list"}),
    ] {
        let reply = h.rpc(Some(&session), message.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{message}: {}",
            reply.body
        );
        assert_eq!(reply.body["error"]["code"], mcp::codes::INVALID_REQUEST);
    }
    assert!(h.calls.lock().unwrap().is_empty(), "nothing was forwarded");
    verify(h.store.as_ref(), true, &BTreeMap::new())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_call_without_a_session_or_run_is_refused_and_an_unknown_upstream_is_named() {
    let h = harness().await;
    let reply = h
        .rpc(
            None,
            json!({"jsonrpc": "2.0", "id": 30, "method": "tools/call",
                   "params": {"name": "read_customer_record", "arguments": {"customer_id": "C000042"}}}),
        )
        .await;
    assert_eq!(
        reply.body["error"]["code"],
        mcp::codes::INVALID_PARAMS,
        "{}",
        reply.body
    );

    let response = h
        .app
        .clone()
        .oneshot(
            Request::post("/mcp/billing")
                .header("authorization", format!("Bearer {KEY}"))
                .body(Body::from(
                    json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).to_string(),
                ))
                .unwrap(),
        )
        .await
        .unwrap();
    // Not 404: clients read that as "session terminated".
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"billing\" is not an MCP upstream"),
        "{body}"
    );
    assert_eq!(body["id"], 1, "{body}");
    assert_eq!(body["error"]["code"], mcp::codes::REFUSED, "{body}");
    assert_eq!(body["error"]["data"]["code"], "NotServed", "{body}");
    let response = h
        .app
        .clone()
        .oneshot(Request::post("/mcp/crm").body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_call_that_waits_is_streamed_with_keep_alives_then_its_answer() {
    let h = harness().await;
    let session = h.session().await;
    h.delay.store(400, std::sync::atomic::Ordering::SeqCst);
    let call = |accept: &'static str, id: u64| {
        Request::post("/mcp/crm")
            .header("content-type", "application/json")
            .header("accept", accept)
            .header("authorization", format!("Bearer {KEY}"))
            .header(mcp::SESSION_HEADER, session.clone())
            .body(Body::from(
                json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                       "params": {"name": "read_customer_record",
                                  "arguments": {"customer_id": "C000042"}}})
                .to_string(),
            ))
            .unwrap()
    };
    let response = h
        .app
        .clone()
        .oneshot(call("application/json, text/event-stream", 30))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    // Keep-alives every 50 ms while the upstream takes 400 ms, then the one answer.
    let keep_alives = text.matches(": keep-alive").count();
    assert!(keep_alives >= 3, "{keep_alives} keep-alives in {text:?}");
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.len(), 1, "{text}");
    assert!(text.ends_with("\n\n") && text.rfind(": keep-alive") < text.find("data: "));
    let answer: Value = serde_json::from_str(data[0]).unwrap();
    assert_eq!(answer["id"], 30);
    assert_eq!(
        answer["result"]["structuredContent"],
        json!({"customer_id": "C000042", "order_history": ["O-1"], "contact_info": "ada@example.com"})
    );

    // A client that takes JSON only gets JSON, without keep-alives.
    let response = h
        .app
        .clone()
        .oneshot(call("application/json", 31))
        .await
        .unwrap();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let answer: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(answer["id"], 31);
    assert_eq!(h.calls.lock().unwrap().len(), 2, "each call forwarded once");
}

#[tokio::test]
async fn a_large_answer_that_comes_after_the_keep_alives_reaches_the_client_whole() {
    let h = harness().await;
    let session = h.session().await;
    h.delay.store(200, std::sync::atomic::Ordering::SeqCst);
    let response = h
        .app
        .clone()
        .oneshot(
            Request::post("/mcp/crm")
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("authorization", format!("Bearer {KEY}"))
                .header(mcp::SESSION_HEADER, session)
                .body(Body::from(
                    json!({"jsonrpc": "2.0", "id": 40, "method": "tools/call",
                           "params": {"name": "read_customer_record",
                                      "arguments": {"customer_id": "C000094"}}})
                    .to_string(),
                ))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(text.len() > 1 << 20, "{} bytes", text.len());
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.len(), 1);
    let answer: Value = serde_json::from_str(data[0]).unwrap();
    assert_eq!(answer["id"], 40);
    assert!(answer.get("error").is_none(), "{}", &data[0][..200]);
    let record: Value =
        serde_json::from_str(answer["result"]["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(record["order_history"].as_array().unwrap().len(), 300_000);
}

#[tokio::test]
async fn when_the_trail_cannot_record_a_call_it_never_reaches_the_upstream() {
    // SECURITY.md 9: a call whose decision cannot be recorded is not decided, so not forwarded.
    let h = harness().await;
    let session = h.session().await;
    let db = h._dir.path().join("audit.db");
    let trail = rusqlite::Connection::open(&db).unwrap();
    trail
        .execute_batch(
            "CREATE TRIGGER tollgate_test_refuse BEFORE INSERT ON tollgate_audit_records
             BEGIN SELECT RAISE(ABORT, 'injected: the trail cannot be written'); END;",
        )
        .unwrap();
    let reply = h
        .call(
            &session,
            20,
            "read_customer_record",
            json!({"customer_id": "C000042"}),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.body
    );
    // A protocol-level error (nothing was decided, the model can do nothing about it), in
    // JSON-RPC, with Tollgate's code that no SDK uses for a timeout.
    assert_eq!(reply.body["id"], 20, "{}", reply.body);
    assert_eq!(
        reply.body["error"]["code"],
        mcp::codes::REFUSED,
        "{}",
        reply.body
    );
    assert_eq!(
        reply.body["error"]["data"]["code"], "AuditUnavailable",
        "{}",
        reply.body
    );
    // A message refused as malformed still says why, though its refusal is not recorded.
    let malformed = h
        .send(Some(&session), b"[{\"jsonrpc\": \"2.0\"}]".to_vec())
        .await;
    assert_eq!(
        malformed.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        malformed.body
    );
    let message = malformed.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("refused in any case: "), "{message}");
    assert!(message.contains("batch"), "{message}");
    assert!(h.calls.lock().unwrap().is_empty(), "nothing was forwarded");

    // Recorded again: the same call goes through, exactly once.
    trail
        .execute_batch("DROP TRIGGER tollgate_test_refuse;")
        .unwrap();
    let reply = h
        .call(
            &session,
            21,
            "read_customer_record",
            json!({"customer_id": "C000042"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert!(reply.body["result"].is_object(), "{}", reply.body);
    assert_eq!(h.calls.lock().unwrap().len(), 1);
    verify(h.store.as_ref(), true, &BTreeMap::new())
        .await
        .unwrap();
}

#[tokio::test]
async fn result_fields_hide_fields_of_text_results_too_or_the_result_is_withheld() {
    let h = harness().await;
    let session = h.session().await;
    // One JSON text block: cut like structured content.
    let reply = h
        .call(
            &session,
            3,
            "read_customer_record",
            json!({"customer_id": "C000099"}),
        )
        .await;
    let text = reply.body["result"]["content"][0]["text"].as_str().unwrap();
    assert!(!text.contains("987-65-4321"), "{}", reply.body);
    assert_eq!(
        serde_json::from_str::<Value>(text).unwrap(),
        json!({"customer_id": "C000099", "order_history": []})
    );
    // Prose cannot be cut field by field: withheld, with the reason, as a tool error.
    let reply = h
        .call(
            &session,
            4,
            "read_customer_record",
            json!({"customer_id": "C000098"}),
        )
        .await;
    assert_eq!(reply.body["result"]["isError"], true, "{}", reply.body);
    let text = reply.body["result"]["content"][0]["text"].as_str().unwrap();
    assert!(!text.contains("987-65-4321"), "{text}");
    assert!(text.contains("withheld"), "{text}");
    // The trail keeps what the upstream answered, and says it was withheld.
    let records = h.store.query(&Query::default()).await.unwrap();
    let last = records.last().unwrap().entry().unwrap();
    assert!(
        last.error.as_deref().unwrap().contains("withheld"),
        "{:?}",
        last.error
    );
}

#[tokio::test]
async fn tools_list_cuts_output_schemas_to_the_visible_fields() {
    let h = harness().await;
    let session = h.session().await;
    let reply = h
        .send(
            Some(&session),
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
                .to_string()
                .into_bytes(),
        )
        .await;
    let tools = reply.body["result"]["tools"].as_array().unwrap();
    let read = tools
        .iter()
        .find(|t| t["name"] == "read_customer_record")
        .unwrap();
    assert_eq!(
        read["outputSchema"],
        json!({"type": "object", "properties": {"customer_id": {"type": "string"}},
               "required": ["customer_id"]}),
        "{read}"
    );
}

#[test]
fn cutting_a_result_handles_every_shape() {
    let fields = vec!["id".to_owned()];
    let mut structured = json!({"structuredContent": {"id": 1, "secret": 2},
                                "content": [{"type": "text", "text": "{\"id\":1,\"secret\":2}"}]});
    assert_eq!(
        mcp::cut_result(&mut structured, &fields),
        Ok(vec!["secret".to_owned()])
    );
    assert_eq!(structured["content"][0]["text"], "{\"id\":1}");
    let mut array = json!({"content": [{"type": "text", "text": "[{\"id\":1,\"secret\":2}]"}]});
    assert!(mcp::cut_result(&mut array, &fields).is_ok());
    assert_eq!(array["content"][0]["text"], "[{\"id\":1}]");
    for withheld in [
        json!({"content": [{"type": "text", "text": "id 1, secret 2"}]}),
        json!({"content": [{"type": "text", "text": "\"secret\""}]}),
        json!({"content": [{"type": "text", "text": "{}"}, {"type": "text", "text": "{}"}]}),
        json!({"content": [{"type": "image", "data": "AAAA", "mimeType": "image/png"}]}),
        json!("not an object"),
    ] {
        let mut result = withheld.clone();
        assert!(mcp::cut_result(&mut result, &fields).is_err(), "{withheld}");
    }
}

#[tokio::test]
async fn a_call_sent_to_another_upstream_is_refused_before_any_decision() {
    let h = harness().await;
    let request = Request::post("/mcp/payments")
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("authorization", format!("Bearer {KEY}"))
        .header("tollgate-run-id", "wrong-upstream")
        .body(Body::from(
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                   "params": {"name": "read_customer_record",
                              "arguments": {"customer_id": "C000042"}}})
            .to_string(),
        ))
        .unwrap();
    let response = h.app.clone().oneshot(request).await.unwrap();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["result"]["isError"], true, "{body}");
    assert_eq!(
        body["result"]["_meta"][mcp::DECISION_META]["code"],
        "ToolNotAllowed",
        "{body}"
    );
    assert!(
        body["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("call it at /mcp/crm"),
        "{body}"
    );
    assert!(
        h.calls.lock().unwrap().is_empty(),
        "nothing reached an upstream"
    );
    // Recorded as a refusal, never as an allowed (charged, counted) call.
    let records = h.store.query(&Query::default()).await.unwrap();
    let events: Vec<(String, Option<String>)> = records
        .iter()
        .map(|r| (r.index.event.clone(), r.entry().unwrap().outcome()))
        .collect();
    assert_eq!(events, [("rejected".to_owned(), None)], "{events:?}");
}

#[tokio::test]
async fn a_call_its_upstream_refused_is_recorded_as_not_run() {
    // Released by the policy, refused by the server: it never ran, so graduation must not count
    // it as a clean completion.
    let h = harness().await;
    let session = h.session().await;
    let reply = h
        .call(
            &session,
            3,
            "read_customer_record",
            json!({"customer_id": "C000097"}),
        )
        .await;
    assert!(reply.body.get("error").is_some(), "{}", reply.body);
    let records = h
        .store
        .query(&Query {
            run: Some(session.clone()),
            ..Query::default()
        })
        .await
        .unwrap();
    let outcomes: Vec<(String, Option<String>)> = records
        .iter()
        .map(|r| (r.index.event.clone(), r.index.outcome.clone()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("decide".to_owned(), Some("allow".to_owned())),
            ("report".to_owned(), Some("notRun".to_owned()))
        ]
    );
}

#[tokio::test]
async fn an_upstream_answer_past_the_limit_is_not_read_on_nor_passed() {
    // C000095's record is about 100 kB; the proxy reads at most 64 KiB.
    let h = harness_with(|gateway| gateway.with_upstream_limit(64 * 1024)).await;
    let session = h.session().await;
    let reply = h
        .call(
            &session,
            3,
            "read_customer_record",
            json!({"customer_id": "C000095"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.body);
    assert_eq!(
        reply.body["error"]["code"],
        mcp::codes::UPSTREAM,
        "{}",
        reply.body
    );
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("more than 65536 bytes"),
        "{}",
        reply.body
    );
    assert!(!reply.body.to_string().contains("987-65-4321"));
    // The call reached the upstream (it may have run), so it is recorded with the error and is
    // not taken for a call that never ran.
    let records = h
        .store
        .query(&Query {
            run: Some(session.clone()),
            ..Query::default()
        })
        .await
        .unwrap();
    let report = records.last().unwrap().entry().unwrap();
    assert!(
        report
            .error
            .as_deref()
            .unwrap()
            .contains("more than 65536 bytes")
    );
    assert!(!report.not_run);
}

/// What a bare upstream received: method, path, headers and body of each request.
type Seen = Arc<Mutex<Vec<(String, axum::http::HeaderMap, Value)>>>;

/// A bare HTTP upstream that records every request and answers as `answer` says: a JSON-RPC
/// result echoing the id, after `delay`; HTTP 404; or 204 to a DELETE.
async fn bare_upstream(status: StatusCode, delay: std::time::Duration) -> (String, Seen) {
    use axum::routing::post;
    let seen: Seen = Arc::default();
    let recorded = seen.clone();
    let handler =
        move |method: axum::http::Method, headers: axum::http::HeaderMap, body: String| {
            let recorded = recorded.clone();
            async move {
                let message: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                recorded
                    .lock()
                    .unwrap()
                    .push((method.to_string(), headers, message.clone()));
                tokio::time::sleep(delay).await;
                if method == axum::http::Method::DELETE {
                    return StatusCode::NO_CONTENT.into_response();
                }
                if status != StatusCode::OK {
                    return status.into_response();
                }
                axum::Json(json!({"jsonrpc": "2.0", "id": message["id"],
                "result": {"content": [{"type": "text", "text": "{\"customer_id\":\"C000042\"}"}],
                           "structuredContent": {"customer_id": "C000042"}}}))
                .into_response()
            }
        };
    use axum::response::IntoResponse;
    let app = axum::Router::new().route("/mcp", post(handler.clone()).delete(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/mcp"), seen)
}

async fn bare_harness(
    status: StatusCode,
    delay: std::time::Duration,
    configure: impl FnOnce(Gateway) -> Gateway,
) -> (Harness, Seen) {
    let (url, seen) = bare_upstream(status, delay).await;
    let h = harness_on(url, Calls::default(), Arc::default(), configure).await;
    (h, seen)
}

fn call(id: u64, tool: &str, arguments: Value) -> Vec<u8> {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": tool, "arguments": arguments}})
    .to_string()
    .into_bytes()
}

/// The `error` records of the trail, in order.
async fn rejections(store: &SqliteStore) -> Vec<String> {
    store
        .query(&Query::default())
        .await
        .unwrap()
        .iter()
        .filter(|r| r.index.event == "rejected")
        .filter_map(|r| r.entry().unwrap().error)
        .collect()
}

#[tokio::test]
async fn routing_headers_of_2026_must_say_what_the_body_says_and_go_on_as_decided() {
    let (h, seen) = bare_harness(StatusCode::OK, std::time::Duration::ZERO, |g| g).await;
    let read = json!({"customer_id": "C000042"});
    let run = [("tollgate-run-id", "run-2026")];
    for (headers, problem) in [
        (
            vec![
                ("mcp-method", "tools/call"),
                ("mcp-name", "delete_customer_record"),
            ],
            "mcp-name header",
        ),
        (vec![("mcp-method", "tools/list")], "mcp-method header"),
        (
            // The base64 form, decoded before comparing.
            vec![
                ("mcp-method", "tools/call"),
                ("mcp-name", "=?base64?ZXhwb3J0X2FsbF9jdXN0b21lcnM=?="),
            ],
            "mcp-name header",
        ),
    ] {
        let headers: Vec<(&str, &str)> = headers.into_iter().chain(run).collect();
        let reply = h
            .send_with(
                None,
                &headers,
                call(7, "read_customer_record", read.clone()),
            )
            .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
        assert_eq!(reply.body["id"], 7, "{}", reply.body);
        assert_eq!(
            reply.body["error"]["code"],
            mcp::codes::HEADER_MISMATCH,
            "{}",
            reply.body
        );
        let message = reply.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(problem), "{message}");
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "nothing reached the upstream"
    );
    assert_eq!(
        rejections(&h.store).await.len(),
        3,
        "every refusal is recorded"
    );

    // Headers that agree: decided, forwarded, and the upstream sees the headers written from
    // what was decided (base64 from the client arrives as plain text).
    let headers = [
        ("mcp-method", "tools/call"),
        ("mcp-name", "=?base64?cmVhZF9jdXN0b21lcl9yZWNvcmQ=?="),
        ("mcp-protocol-version", "2026-07-28"),
        ("tollgate-run-id", "run-2026"),
    ];
    let reply = h
        .send_with(
            None,
            &headers,
            call(8, "read_customer_record", read.clone()),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(
        reply.body["result"]["structuredContent"]["customer_id"], "C000042",
        "{}",
        reply.body
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let (_, upstream_headers, body) = &seen[0];
    assert_eq!(upstream_headers["mcp-method"], "tools/call");
    assert_eq!(upstream_headers["mcp-name"], "read_customer_record");
    assert_eq!(upstream_headers["mcp-protocol-version"], "2026-07-28");
    assert_eq!(body["params"]["name"], "read_customer_record");
    assert_eq!(
        upstream_headers["authorization"],
        format!("Bearer {CREDENTIAL}").as_str()
    );
}

#[tokio::test]
async fn delete_ends_the_upstream_session_and_a_session_the_upstream_lost_is_a_404() {
    let (h, seen) = bare_harness(StatusCode::OK, std::time::Duration::ZERO, |g| g).await;
    let delete = |session: Option<&str>| {
        let mut request =
            Request::delete("/mcp/crm").header("authorization", format!("Bearer {KEY}"));
        if let Some(session) = session {
            request = request.header(mcp::SESSION_HEADER, session);
        }
        h.app.clone().oneshot(request.body(Body::empty()).unwrap())
    };
    let ended = delete(Some("session-1")).await.unwrap();
    assert_eq!(ended.status(), StatusCode::NO_CONTENT);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        let (method, headers, _) = &seen[0];
        assert_eq!(method, "DELETE");
        assert_eq!(headers[mcp::SESSION_HEADER], "session-1");
        assert_eq!(
            headers["authorization"],
            format!("Bearer {CREDENTIAL}").as_str()
        );
    }
    let unnamed = delete(None).await.unwrap();
    assert_eq!(unnamed.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "nothing more reached the upstream"
    );
    let records = rejections(&h.store).await;
    assert!(
        records.iter().any(|e| e.contains("DELETE ends a session")),
        "{records:?}"
    );

    // An upstream that lost the session: 404 with the request's id, so the client starts a new
    // one instead of waiting.
    let (lost, _) = bare_harness(StatusCode::NOT_FOUND, std::time::Duration::ZERO, |g| g).await;
    let reply = lost
        .rpc(
            Some("gone"),
            json!({"jsonrpc": "2.0", "id": 41, "method": "tools/list"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.body);
    assert_eq!(reply.body["id"], 41, "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], mcp::codes::UPSTREAM);
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not know this session"),
        "{}",
        reply.body
    );
    // A call to it: recorded as not run.
    let reply = lost
        .send_with(
            Some("gone"),
            &[],
            call(
                42,
                "read_customer_record",
                json!({"customer_id": "C000042"}),
            ),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.body);
    let records = lost.store.query(&Query::default()).await.unwrap();
    let report = records.last().unwrap().entry().unwrap();
    assert!(report.not_run, "{report:?}");
}

#[tokio::test]
async fn an_upstream_slower_than_the_call_timeout_is_named_and_the_call_recorded() {
    let limits = gateway::McpLimits {
        call_timeout: std::time::Duration::from_millis(300),
        ..gateway::McpLimits::default()
    };
    let (h, seen) = bare_harness(
        StatusCode::OK,
        std::time::Duration::from_secs(3),
        move |g| g.with_mcp_limits(limits),
    )
    .await;
    let started = std::time::Instant::now();
    let reply = h
        .send_with(
            None,
            &[("tollgate-run-id", "run-slow")],
            call(9, "read_customer_record", json!({"customer_id": "C000042"})),
        )
        .await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Past the keep-alive interval, so the answer is an SSE stream (200) ending in the error.
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["id"], 9, "{}", reply.body);
    assert_eq!(
        reply.body["error"]["code"],
        mcp::codes::UPSTREAM,
        "{}",
        reply.body
    );
    let message = reply.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("did not answer within 300ms"), "{message}");
    assert!(message.contains("--mcp-call-timeout"), "{message}");
    assert_eq!(seen.lock().unwrap().len(), 1);
    let records = h.store.query(&Query::default()).await.unwrap();
    let report = records.last().unwrap().entry().unwrap();
    assert!(!report.not_run, "sent, so it may have run: {report:?}");
    assert!(report.error.unwrap().contains("--mcp-call-timeout"));
}

#[tokio::test]
async fn a_call_whose_client_goes_away_is_recorded_as_aborted() {
    let (h, seen) = bare_harness(StatusCode::OK, std::time::Duration::from_secs(2), |g| g).await;
    for accept in ["application/json", "application/json, text/event-stream"] {
        let request = Request::post("/mcp/crm")
            .header("content-type", "application/json")
            .header("accept", accept)
            .header("authorization", format!("Bearer {KEY}"))
            .header("tollgate-run-id", "run-gone")
            .body(Body::from(call(
                5,
                "read_customer_record",
                json!({"customer_id": "C000042"}),
            )))
            .unwrap();
        // The client waits 300 ms for the whole answer, then goes away.
        let app = h.app.clone();
        let gone = tokio::time::timeout(std::time::Duration::from_millis(300), async move {
            let response = app.oneshot(request).await.unwrap();
            response.into_body().collect().await.map(|b| b.to_bytes())
        })
        .await;
        assert!(gone.is_err(), "the upstream answers after 2 s");
    }
    // The reports are written as the handlers are dropped.
    let mut reports = Vec::new();
    for _ in 0..50 {
        let records = h.store.query(&Query::default()).await.unwrap();
        reports = records
            .iter()
            .filter(|r| r.index.event == "report")
            .map(|r| r.entry().unwrap())
            .collect::<Vec<_>>();
        if reports.len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(reports.len(), 2, "{reports:?}");
    let mut steps: Vec<Option<u64>> = reports.iter().map(|r| r.step).collect();
    steps.sort();
    assert_eq!(
        steps,
        [Some(1), Some(2)],
        "each allowed call has its outcome"
    );
    for report in &reports {
        let error = report.error.as_deref().unwrap_or_default();
        assert!(error.starts_with("aborted by client"), "{report:?}");
        assert!(
            !report.not_run,
            "it was sent, so it may have run: {report:?}"
        );
    }
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_401_names_the_resource_metadata_that_says_how_to_get_a_credential() {
    let h = harness().await;
    let unauthenticated = |host: &'static str| {
        h.app.clone().oneshot(
            Request::post("/mcp/crm")
                .header("host", host)
                .header("content-type", "application/json")
                .body(Body::from(
                    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize"}).to_string(),
                ))
                .unwrap(),
        )
    };
    let response = unauthenticated("127.0.0.1:8480").await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let challenge = response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        challenge,
        "Bearer realm=\"tollgate\", resource_metadata=\"http://127.0.0.1:8480/.well-known/oauth-protected-resource/mcp/crm\""
    );
    let body: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["error"]["data"]["code"], "Unauthenticated", "{body}");

    // The metadata (RFC 9728): the resource, Bearer in a header, no authorization server, and
    // in words what the credential is.
    let metadata = h
        .app
        .clone()
        .oneshot(
            Request::get("/.well-known/oauth-protected-resource/mcp/crm")
                .header("host", "127.0.0.1:8480")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(metadata.status(), StatusCode::OK);
    let metadata: Value =
        serde_json::from_slice(&metadata.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(metadata["resource"], "http://127.0.0.1:8480/mcp/crm");
    assert_eq!(metadata["bearer_methods_supported"], json!(["header"]));
    assert_eq!(metadata["authorization_servers"], json!([]));
    assert!(
        metadata["tollgate_credentials"]
            .as_str()
            .unwrap()
            .contains("API key"),
        "{metadata}"
    );

    // A Host that is not a plain host:port is never written into the challenge.
    let response = unauthenticated("evil.example\", x=\"y").await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().get("www-authenticate").is_none());
}

/// An upstream whose GET stream sends a progress notification, a sampling request, a resource
/// notification and a tools/list_changed, each with an event id: its URL, what was POSTed to it,
/// and the Last-Event-ID its stream was opened with.
async fn streaming_upstream() -> (String, Seen, Arc<Mutex<Option<String>>>) {
    use axum::response::IntoResponse;
    let posted: Seen = Arc::default();
    let last_event: Arc<Mutex<Option<String>>> = Arc::default();
    let (seen, last) = (posted.clone(), last_event.clone());
    let stream = move |headers: axum::http::HeaderMap| {
        let last = last.clone();
        async move {
            *last.lock().unwrap() = headers
                .get("last-event-id")
                .map(|v| v.to_str().unwrap().to_owned());
            let body = [
                (
                    1,
                    json!({"jsonrpc": "2.0", "method": "notifications/progress",
                           "params": {"progressToken": "t", "progress": 1}}),
                ),
                (
                    2,
                    json!({"jsonrpc": "2.0", "id": 77, "method": "sampling/createMessage",
                           "params": {"messages": [], "maxTokens": 10}}),
                ),
                (
                    3,
                    json!({"jsonrpc": "2.0", "method": "notifications/resources/updated",
                           "params": {"uri": "file:///secret"}}),
                ),
                (
                    4,
                    json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}),
                ),
            ]
            .iter()
            .map(|(id, m)| format!("id: {id}\nevent: message\ndata: {m}\n\n"))
            .collect::<String>();
            ([("content-type", "text/event-stream")], body).into_response()
        }
    };
    let post = move |headers: axum::http::HeaderMap, body: String| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push((
                "POST".into(),
                headers,
                serde_json::from_str(&body).unwrap(),
            ));
            StatusCode::ACCEPTED
        }
    };
    let app = axum::Router::new().route("/mcp", axum::routing::get(stream).post(post));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, posted, last_event)
}

#[tokio::test]
async fn the_get_stream_passes_the_servers_notifications_and_answers_its_requests() {
    let (url, posted, last_event) = streaming_upstream().await;
    let h = harness_on(url, Calls::default(), Arc::default(), |g| g).await;
    let response = h
        .app
        .clone()
        .oneshot(
            Request::get("/mcp/crm")
                .header("authorization", format!("Bearer {KEY}"))
                .header("accept", "text/event-stream")
                .header(mcp::SESSION_HEADER, "s-1")
                .header("last-event-id", "0")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    // Progress and list_changed pass with their ids; the resource notification does not (its id
    // does, so a reconnect resumes after it); the request never reaches the client.
    assert!(text.contains("id: 1\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\""), "{text}");
    assert!(text.contains("id: 4\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/tools/list_changed\""), "{text}");
    assert!(text.contains("id: 3\n"), "{text}");
    assert!(!text.contains("file:///secret"), "{text}");
    assert!(!text.contains("sampling/createMessage"), "{text}");
    assert_eq!(last_event.lock().unwrap().as_deref(), Some("0"));
    // The server's request was answered with an error, in its session, with the credential.
    let posted = posted.lock().unwrap().clone();
    assert_eq!(posted.len(), 1, "{posted:?}");
    let (_, headers, answer) = &posted[0];
    assert_eq!(answer["id"], 77);
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not let upstream \"crm\" make it of the client")
    );
    assert_eq!(headers[mcp::SESSION_HEADER], "s-1");
    assert_eq!(
        headers["authorization"],
        format!("Bearer {CREDENTIAL}").as_str()
    );
    let records = rejections(&h.store).await;
    assert!(
        records.iter().any(|e| e.contains("sampling/createMessage")),
        "{records:?}"
    );

    // Without a session there is no stream to name.
    let response = h
        .app
        .clone()
        .oneshot(
            Request::get("/mcp/crm")
                .header("authorization", format!("Bearer {KEY}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

/// An upstream that asks its client during calls: in the stream of a call (to 2025-11-25, a
/// sampling request and then an elicitation, whose answer it waits for and returns), or in an
/// input-required result (2026-07-28: C000001 asks for an elicitation, C000002 for a sample,
/// and a retry gets back the answers it carries). It records every message it receives.
async fn asking_upstream() -> (String, Seen) {
    use axum::response::IntoResponse;
    let seen: Seen = Arc::default();
    let answered = Arc::new(tokio::sync::Notify::new());
    let (recorded, notify) = (seen.clone(), answered.clone());
    let handler = move |headers: axum::http::HeaderMap, body: String| {
        let (recorded, answered) = (recorded.clone(), notify.clone());
        async move {
            let message: Value = serde_json::from_str(&body).unwrap();
            recorded
                .lock()
                .unwrap()
                .push(("POST".into(), headers, message.clone()));
            let id = message["id"].clone();
            let reply = |result: Value| {
                axum::Json(json!({"jsonrpc": "2.0", "id": id, "result": result})).into_response()
            };
            match message["method"].as_str() {
                None => {
                    if message["id"] == "srv-e" {
                        answered.notify_one();
                    }
                    StatusCode::ACCEPTED.into_response()
                }
                Some("initialize") => {
                    let mut response = reply(json!({"protocolVersion": "2025-06-18",
                        "capabilities": {"tools": {}}, "serverInfo": {"name": "asking", "version": "1"}}));
                    response
                        .headers_mut()
                        .insert(mcp::SESSION_HEADER, "asking-1".parse().unwrap());
                    response
                }
                Some("tools/call") => {
                    let params = &message["params"];
                    if let Some(answers) = params.get("inputResponses") {
                        // In the one field the policy lets the agent see of this tool.
                        let echo = json!({"answers": answers, "state": params["requestState"]});
                        return reply(json!({"content": [{"type": "text",
                            "text": json!({"customer_id": echo.to_string()}).to_string()}]}));
                    }
                    let asked = match params["arguments"]["customer_id"].as_str() {
                        Some("C000001") => json!({"method": "elicitation/create",
                            "params": {"message": "Export every customer?", "requestedSchema": {"type": "object"}}}),
                        Some("C000002") => json!({"method": "sampling/createMessage",
                            "params": {"messages": [], "maxTokens": 5}}),
                        _ => Value::Null,
                    };
                    if !asked.is_null() {
                        // With a field the tool's resultFields hide, riding along.
                        return reply(json!({"resultType": "input_required",
                            "inputRequests": {"q": asked}, "requestState": "state-1",
                            "structuredContent": {"ssn": "123-45-6789"},
                            "content": [{"type": "text", "text": "{\"ssn\":\"123-45-6789\"}"}]}));
                    }
                    let (events, rx) = tokio::sync::mpsc::channel::<String>(4);
                    tokio::spawn(async move {
                        let event = |m: Value| format!("event: message\ndata: {m}\n\n");
                        for asked in [
                            json!({"jsonrpc": "2.0", "id": "srv-s", "method": "sampling/createMessage",
                                   "params": {"messages": [], "maxTokens": 5}}),
                            json!({"jsonrpc": "2.0", "id": "srv-e", "method": "elicitation/create",
                                   "params": {"message": "Delete the record?", "requestedSchema": {"type": "object"}}}),
                        ] {
                            events.send(event(asked)).await.unwrap();
                        }
                        answered.notified().await;
                        let done = json!({"jsonrpc": "2.0", "id": id, "result": {
                            "content": [{"type": "text", "text": "{\"customer_id\":\"C000042\"}"}]}});
                        let _ = events.send(event(done)).await;
                    });
                    let body = futures::stream::unfold(rx, |mut rx| async move {
                        rx.recv()
                            .await
                            .map(|e| (Ok::<_, std::convert::Infallible>(e), rx))
                    });
                    (
                        [("content-type", "text/event-stream")],
                        Body::from_stream(body),
                    )
                        .into_response()
                }
                Some("resources/read") => {
                    let params = &message["params"];
                    if let Some(answers) = params.get("inputResponses") {
                        return reply(json!({"contents": [{"uri": params["uri"], "text":
                            json!({"answers": answers, "state": params["requestState"]}).to_string()}]}));
                    }
                    let asked = if params["uri"] == "crm://sample" {
                        json!({"method": "sampling/createMessage", "params": {"messages": [], "maxTokens": 5}})
                    } else {
                        json!({"method": "elicitation/create", "params": {"message": "Read it?",
                            "requestedSchema": {"type": "object"}}})
                    };
                    reply(
                        json!({"resultType": "input_required", "inputRequests": {"r": asked},
                        "requestState": "state-r", "contents": [{"uri": "crm://secret", "text": "ssn"}]}),
                    )
                }
                Some(_) => StatusCode::ACCEPTED.into_response(),
            }
        }
    };
    let app = axum::Router::new().route("/mcp", axum::routing::post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

/// The trail's records of what servers asked and clients answered: (event, method, record).
async fn asks_in(store: &SqliteStore) -> Vec<(String, String, tollgate_audit::Entry)> {
    store
        .query(&Query::default())
        .await
        .unwrap()
        .iter()
        .filter(|r| matches!(r.index.event.as_str(), "serverRequest" | "clientAnswer"))
        .map(|r| {
            let entry = r.entry().unwrap();
            (
                r.index.event.clone(),
                entry.tool.clone().unwrap_or_default(),
                entry,
            )
        })
        .collect()
}

#[tokio::test]
async fn a_servers_request_reaches_only_the_session_it_was_made_in_and_is_answered_once() {
    let (url, seen) = asking_upstream().await;
    let h = harness_of(
        &url,
        ", serverRequests: [Elicitation]",
        "",
        Calls::default(),
        Arc::default(),
        |g| g,
    )
    .await;
    // The server learns of the one capability the policy names, not of the client's others.
    let init = h
        .rpc(
            None,
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {"elicitation": {}, "sampling": {}, "roots": {"listChanged": true}},
                "clientInfo": {"name": "tollgate-test", "version": "1"}}}),
        )
        .await;
    let session = init.session.expect("a session");
    assert_eq!(
        seen.lock().unwrap()[0].2["params"]["capabilities"],
        json!({"elicitation": {}})
    );
    // An answer nobody asked for: refused before the server sees it, and recorded.
    let forged = json!({"jsonrpc": "2.0", "id": "tollgate-ask-000000000000000000000000",
                        "result": {"action": "accept", "content": {}}});
    let reply = h.rpc(Some(&session), forged.clone()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], mcp::codes::INVALID_REQUEST);
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("answers no request a server made in this session"),
        "{}",
        reply.body
    );

    // The call streams: the sampling request (not in the policy) never reaches the client, the
    // elicitation does, under the gateway's id.
    let (mut text, body) = h.asked_in_call(&session, 7).await;
    assert!(!text.contains("sampling/createMessage"), "{text}");
    let asked: Value = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .find(|m| m["method"] == "elicitation/create")
        .unwrap();
    let ask_id = asked["id"].as_str().unwrap().to_owned();
    assert!(ask_id.starts_with("tollgate-ask-"), "{asked}");
    assert_eq!(asked["params"]["message"], "Delete the record?");

    // Answered from another session, or by another agent's key: refused, and it still waits.
    let answer = json!({"jsonrpc": "2.0", "id": ask_id,
                        "result": {"action": "accept", "content": {"confirm": true}}});
    let elsewhere = h.rpc(Some("another-session"), answer.clone()).await;
    assert_eq!(
        elsewhere.status,
        StatusCode::BAD_REQUEST,
        "{}",
        elsewhere.body
    );
    // Answered in its session: passed to the server under its own id; the call finishes.
    let passed = h.rpc(Some(&session), answer.clone()).await;
    assert_eq!(passed.status, StatusCode::ACCEPTED, "{}", passed.body);
    let rest = body.collect().await.unwrap().to_bytes();
    text.push_str(std::str::from_utf8(&rest).unwrap());
    let last: Value = serde_json::from_str(
        text.lines()
            .rev()
            .find_map(|l| l.strip_prefix("data: "))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (&last["id"], &last["result"]["content"][0]["text"]),
        (&json!(7), &json!("{\"customer_id\":\"C000042\"}")),
        "{text}"
    );
    // Once only.
    let again = h.rpc(Some(&session), answer).await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST, "{}", again.body);

    let seen = seen.lock().unwrap().clone();
    let answers: Vec<&Value> = seen
        .iter()
        .map(|(_, _, m)| m)
        .filter(|m| m.get("method").is_none())
        .collect();
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(answers[0]["id"], "srv-s");
    assert!(
        answers[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not let upstream \"crm\" make it"),
        "{}",
        answers[0]
    );
    assert_eq!(
        answers[1],
        &json!({"jsonrpc": "2.0", "id": "srv-e", "result": {"action": "accept", "content": {"confirm": true}}})
    );
    let trail = asks_in(&h.store).await;
    let kinds: Vec<(&str, &str)> = trail
        .iter()
        .map(|(e, m, _)| (e.as_str(), m.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("serverRequest", "elicitation/create"),
            ("clientAnswer", "elicitation/create")
        ]
    );
    assert_eq!(
        trail[1].2.result,
        Some(json!({"action": "accept", "content": {"confirm": true}}))
    );
    let refused = rejections(&h.store).await;
    assert!(
        refused
            .iter()
            .any(|e| e.contains("answers no request a server made")),
        "{refused:?}"
    );
    assert!(
        refused.iter().any(|e| e.contains("sampling/createMessage")),
        "{refused:?}"
    );
    verify(h.store.as_ref(), true, &BTreeMap::new())
        .await
        .unwrap();
}

#[tokio::test]
async fn an_input_required_round_of_2026_passes_only_what_the_policy_lets_the_server_ask() {
    let (url, seen) = asking_upstream().await;
    let h = harness_of(
        &url,
        ", serverRequests: [Elicitation]",
        "",
        Calls::default(),
        Arc::default(),
        |g| g,
    )
    .await;
    let run = [("tollgate-run-id", "run-mrtr")];
    let ask = |customer: &str| call(1, "read_customer_record", json!({"customer_id": customer}));
    // The elicitation the policy names passes in the result, and is recorded.
    let asked = h.send_with(None, &run, ask("C000001")).await;
    assert_eq!(
        asked.body["result"]["resultType"], "input_required",
        "{}",
        asked.body
    );
    assert_eq!(
        asked.body["result"]["inputRequests"]["q"]["method"],
        "elicitation/create"
    );
    assert!(!asked.body.to_string().contains("ssn"), "{}", asked.body);
    // The retry carries the answer and the server's state back, exactly.
    let retry = |answers: Value| {
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "read_customer_record", "arguments": {"customer_id": "C000001"},
            "inputResponses": answers, "requestState": "state-1"}})
        .to_string()
        .into_bytes()
    };
    let accepted = json!({"q": {"action": "accept", "content": {"confirm": true}}});
    let done = h.send_with(None, &run, retry(accepted.clone())).await;
    let said: Value =
        serde_json::from_str(done.body["result"]["content"][0]["text"].as_str().unwrap()).unwrap();
    let said: Value = serde_json::from_str(said["customer_id"].as_str().unwrap()).unwrap();
    assert_eq!(
        said,
        json!({"answers": accepted, "state": "state-1"}),
        "{}",
        done.body
    );
    // Answers to requests the policy does not let the server make, or that answer nothing:
    // refused before the server sees them.
    for (answers, problem) in [
        (
            json!({"q": {"role": "assistant", "model": "m", "content": {"type": "text", "text": "x"}}}),
            "Sampling, which the policy does not let upstream \"crm\" make",
        ),
        (json!({"q": {"roots": []}}), "Roots, which the policy"),
        (json!({"q": {"anything": 1}}), "is no answer to"),
        (json!(["q"]), "must be an object"),
    ] {
        let before = seen.lock().unwrap().len();
        let reply = h.send_with(None, &run, retry(answers.clone())).await;
        assert_eq!(
            reply.body["error"]["code"],
            mcp::codes::INVALID_PARAMS,
            "{answers}: {}",
            reply.body
        );
        assert!(
            reply.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(problem),
            "{answers}: {}",
            reply.body
        );
        assert_eq!(seen.lock().unwrap().len(), before, "{answers}");
    }
    // A round that asks for a sample the policy does not name is withheld from the client.
    let withheld = h.send_with(None, &run, ask("C000002")).await;
    let result = &withheld.body["result"];
    assert_eq!(result["isError"], true, "{}", withheld.body);
    assert!(result.get("inputRequests").is_none(), "{result}");
    assert!(
        result["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("(sampling/createMessage) is not one the policy lets upstream \"crm\" make"),
        "{result}"
    );
    let trail = asks_in(&h.store).await;
    let kinds: Vec<(&str, &str)> = trail
        .iter()
        .map(|(e, m, _)| (e.as_str(), m.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("serverRequest", "elicitation/create"),
            ("clientAnswer", "elicitation/create")
        ]
    );
    assert_eq!(trail[0].2.arguments.as_ref().unwrap()["inputRequest"], "q");
    assert_eq!(
        trail[1].2.result,
        Some(json!({"action": "accept", "content": {"confirm": true}}))
    );
    assert_eq!(trail[1].2.run.as_deref(), Some("run-mrtr"));
}

#[tokio::test]
async fn an_answer_to_a_server_is_not_passed_once_the_kill_switch_is_engaged() {
    let (url, seen) = asking_upstream().await;
    let h = harness_of(
        &url,
        ", serverRequests: [Elicitation]",
        "",
        Calls::default(),
        Arc::default(),
        |g| g,
    )
    .await;
    let session = h.session().await;
    let (text, _stream) = h.asked_in_call(&session, 8).await;
    let ask_id = text
        .split("\"id\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    // Someone engages the agent's kill switch while the person is being asked.
    let file = h._dir.path().join("policies/support.yaml");
    let policy = std::fs::read_to_string(&file).unwrap().replace(
        "  # No killSwitch here",
        "  killSwitch: {engaged: true}\n  # No killSwitch here",
    );
    std::fs::write(&file, policy).unwrap();
    let answer =
        json!({"jsonrpc": "2.0", "id": ask_id, "result": {"action": "accept", "content": {}}});
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let refused = loop {
        // Before the change is read the answer would pass; it is sent only once it is refused.
        if h.gateway_killed().await {
            break h.rpc(Some(&session), answer.clone()).await;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the edit was not read"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("kill switch is engaged"),
        "{}",
        refused.body
    );
    // The server was told no, under its own id: nothing of the person's answer reached it.
    let seen = seen.lock().unwrap().clone();
    let told = seen
        .iter()
        .map(|(_, _, m)| m)
        .find(|m| m["id"] == "srv-e")
        .expect("the server's request was answered");
    assert!(told.get("result").is_none(), "{told}");
    assert!(
        told["error"]["message"]
            .as_str()
            .unwrap()
            .contains("kill switch is engaged"),
        "{told}"
    );
    let trail = asks_in(&h.store).await;
    assert!(
        trail.iter().all(|(event, _, _)| event == "serverRequest"),
        "no answer was recorded as passed: {trail:?}"
    );
}

impl Harness {
    /// Starts a streamed call (id `id`) of read_customer_record in `session` at the asking
    /// upstream and reads its stream until the server's elicitation arrives: what was read, and
    /// the rest of the stream.
    async fn asked_in_call(&self, session: &str, id: u64) -> (String, Body) {
        let response = self
            .app
            .clone()
            .oneshot(
                Request::post("/mcp/crm")
                    .header("content-type", "application/json")
                    .header("accept", "application/json, text/event-stream")
                    .header("authorization", format!("Bearer {KEY}"))
                    .header(mcp::SESSION_HEADER, session)
                    .body(Body::from(call(
                        id,
                        "read_customer_record",
                        json!({"customer_id": "C000042"}),
                    )))
                    .unwrap(),
            )
            .await
            .unwrap();
        let mut body = response.into_body();
        let mut text = String::new();
        while !text.contains("elicitation/create") {
            let frame = body.frame().await.expect("the stream goes on").unwrap();
            if let Ok(data) = frame.into_data() {
                text.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
        (text, body)
    }

    /// Whether the gateway reads the agent's kill switch as engaged (a call is refused with it).
    async fn gateway_killed(&self) -> bool {
        let reply = self
            .send_with(
                None,
                &[("tollgate-run-id", "probe")],
                call(
                    99,
                    "read_customer_record",
                    json!({"customer_id": "C000001"}),
                ),
            )
            .await;
        reply.body["result"]["_meta"][mcp::DECISION_META]["code"] == "KillSwitch"
    }
}

#[tokio::test]
async fn a_request_on_the_get_stream_passes_where_the_policy_names_it_and_is_answered_back() {
    let (url, posted, _) = streaming_upstream().await;
    let h = harness_of(
        &url,
        ", serverRequests: [Sampling]",
        "",
        Calls::default(),
        Arc::default(),
        |g| g,
    )
    .await;
    let response = h
        .app
        .clone()
        .oneshot(
            Request::get("/mcp/crm")
                .header("authorization", format!("Bearer {KEY}"))
                .header("accept", "text/event-stream")
                .header(mcp::SESSION_HEADER, "s-1")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let text = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let asked: Value = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .find(|m| m["method"] == "sampling/createMessage")
        .unwrap_or_else(|| panic!("the request passes: {text}"));
    let ask_id = asked["id"].as_str().unwrap();
    assert!(ask_id.starts_with("tollgate-ask-"), "{asked}");
    assert!(posted.lock().unwrap().is_empty(), "nothing answered yet");
    let answer = json!({"jsonrpc": "2.0", "id": ask_id, "result": {
        "role": "assistant", "model": "m", "content": {"type": "text", "text": "hi"}}});
    let passed = h.rpc(Some("s-1"), answer).await;
    assert_eq!(passed.status, StatusCode::ACCEPTED, "{}", passed.body);
    let posted = posted.lock().unwrap().clone();
    assert_eq!(posted.len(), 1, "{posted:?}");
    assert_eq!(posted[0].2["id"], 77);
    assert_eq!(posted[0].2["result"]["model"], "m");
    let trail = asks_in(&h.store).await;
    let kinds: Vec<&str> = trail.iter().map(|(e, _, _)| e.as_str()).collect();
    assert_eq!(kinds, ["serverRequest", "clientAnswer"]);
}

#[tokio::test]
async fn a_read_of_2026_that_asks_for_input_passes_as_a_call_does() {
    let (url, seen) = asking_upstream().await;
    let h = harness_of(
        &url,
        ", serverRequests: [Elicitation]",
        "  resources:\n    allowed:\n      - {upstream: crm, uris: [\"crm://*\"]}\n",
        Calls::default(),
        Arc::default(),
        |g| g,
    )
    .await;
    let run = [("tollgate-run-id", "run-read")];
    let read = |uri: &str, retry: Option<Value>| {
        let mut params = json!({"uri": uri});
        if let Some(answers) = retry {
            params["inputResponses"] = answers;
            params["requestState"] = json!("state-r");
        }
        json!({"jsonrpc": "2.0", "id": 5, "method": "resources/read", "params": params})
            .to_string()
            .into_bytes()
    };
    // The question passes, with nothing else of the round.
    let asked = h.send_with(None, &run, read("crm://notes", None)).await;
    let result = &asked.body["result"];
    assert_eq!(result["resultType"], "input_required", "{}", asked.body);
    assert_eq!(result["inputRequests"]["r"]["method"], "elicitation/create");
    assert!(result.get("contents").is_none(), "{result}");
    // The retry carries the answer and the state back, recorded.
    let answers = json!({"r": {"action": "accept", "content": {}}});
    let done = h
        .send_with(None, &run, read("crm://notes", Some(answers.clone())))
        .await;
    let said: Value =
        serde_json::from_str(done.body["result"]["contents"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(said, json!({"answers": answers, "state": "state-r"}));
    // A question the policy does not let the server ask: the read is refused, and an answer of
    // that kind never reaches the server.
    let withheld = h.send_with(None, &run, read("crm://sample", None)).await;
    assert_eq!(
        withheld.body["error"]["code"],
        mcp::codes::CONTENT_REFUSED,
        "{}",
        withheld.body
    );
    let before = seen.lock().unwrap().len();
    let sampled = json!({"r": {"role": "assistant", "model": "m", "content": {}}});
    let refused = h
        .send_with(None, &run, read("crm://sample", Some(sampled)))
        .await;
    assert_eq!(
        refused.body["error"]["code"],
        mcp::codes::INVALID_PARAMS,
        "{}",
        refused.body
    );
    assert_eq!(seen.lock().unwrap().len(), before);
    let trail = asks_in(&h.store).await;
    let kinds: Vec<(&str, &str)> = trail
        .iter()
        .map(|(e, m, _)| (e.as_str(), m.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("serverRequest", "elicitation/create"),
            ("clientAnswer", "elicitation/create")
        ]
    );
    assert_eq!(trail[1].2.run.as_deref(), Some("run-read"));
}
