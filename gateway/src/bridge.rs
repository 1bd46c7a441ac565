//! `tollgate-gateway stdio-bridge`: one stdio MCP server served over streamable HTTP, one process
//! per MCP session, for clusters.
//!
//! A gateway in a cluster never starts programs a policy names (whoever may write an AgentPolicy
//! would run code next to every agent's credentials). A stdio server runs instead in a pod of its
//! own: an image that holds the server and this binary, `tollgate-gateway stdio-bridge -- COMMAND
//! ARGS…` as its entrypoint, a Service, and a NetworkPolicy that lets only the gateway in. The
//! policy names the Service's URL as an ordinary MCP upstream; the gateway decides every call as
//! for any other and adds the agent's credential as a header, which the bridge hands to the
//! process it starts for that session as an environment variable (`--credential-header`,
//! `--credential-env`). The bridge decides nothing: it must be reachable from the gateway only.
//!
//! The processes are managed as the standalone gateway manages its own ([`crate::stdio`]): a
//! clean environment, stderr to the log, ended on `DELETE`, when idle, when they exit, and with
//! the bridge; at most `--max-sessions` at a time. A request whose client takes a stream (the
//! gateway's do) is answered as one when the server says something first: its progress and log
//! messages, and its requests of the client, which the gateway lets through or refuses by the
//! agent's policy; the client's answer to such a request comes back as a POST like any message.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tollgate_crds::policy::StdioServer;

use crate::mcp::SESSION_HEADER;
use crate::stdio::{Keeper, StdioError, StdioSessions};

/// The one "agent" and "upstream" a bridge's sessions belong to.
const HOLDER: &str = "bridge";

/// How the bridge runs.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// Where it listens (plain HTTP, inside the cluster network).
    pub listen: SocketAddr,
    /// The server it starts for each session.
    pub server: StdioServer,
    /// The request header whose value, at a session's `initialize`, becomes the process's
    /// `server.credential_env` (the gateway adds it from the agent's AgentIdentity).
    pub credential_header: Option<HeaderName>,
    /// A session without a request for this long is ended.
    pub idle: Duration,
    /// The most processes at a time.
    pub max_sessions: usize,
    /// How long one request may wait for the process's answer.
    pub timeout: Duration,
    /// The most bytes of one answer read.
    pub answer_limit: usize,
}

#[derive(Debug)]
struct Bridge {
    sessions: StdioSessions,
    config: BridgeConfig,
}

impl Keeper for Bridge {
    fn keeps(&self, _: &str, _: &str, _: &StdioServer) -> bool {
        true
    }

    fn sessions(&self) -> &StdioSessions {
        &self.sessions
    }
}

fn rpc_error(status: StatusCode, id: Value, code: i64, message: String) -> Response {
    (
        status,
        axum::Json(
            json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}),
        ),
    )
        .into_response()
}

async fn message(State(bridge): State<Arc<Bridge>>, headers: HeaderMap, body: Body) -> Response {
    let Ok(bytes) = axum::body::to_bytes(body, crate::MAX_BODY).await else {
        return rpc_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            Value::Null,
            crate::mcp::codes::INVALID_REQUEST,
            format!("the request body exceeds {} bytes", crate::MAX_BODY),
        );
    };
    let message: Value = match serde_json::from_slice(&bytes) {
        Ok(Value::Object(message)) => Value::Object(message),
        Ok(_) => {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                Value::Null,
                crate::mcp::codes::INVALID_REQUEST,
                "one JSON-RPC message, an object, per request".to_owned(),
            );
        }
        Err(e) => {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                Value::Null,
                crate::mcp::codes::PARSE_ERROR,
                format!("the body is not JSON: {e}"),
            );
        }
    };
    let id = message.get("id").cloned().unwrap_or(Value::Null);
    let config = &bridge.config;
    let session = match headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) {
        Some(session) => session.to_owned(),
        None if message.get("method").and_then(Value::as_str) == Some("initialize") => {
            let credential = config
                .credential_header
                .as_ref()
                .and_then(|name| headers.get(name))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            match bridge.sessions.start(
                HOLDER,
                HOLDER,
                &config.server,
                credential,
                config.answer_limit,
            ) {
                Ok(session) => session,
                Err(StdioError::Limit(n)) => {
                    return rpc_error(
                        StatusCode::TOO_MANY_REQUESTS,
                        id,
                        crate::mcp::codes::UPSTREAM,
                        format!("the bridge runs {n} sessions already, the most it may"),
                    );
                }
                Err(e) => {
                    return rpc_error(
                        StatusCode::BAD_GATEWAY,
                        id,
                        crate::mcp::codes::UPSTREAM,
                        format!("{e:?}"),
                    );
                }
            }
        }
        None => {
            return rpc_error(
                StatusCode::NOT_FOUND,
                id,
                crate::mcp::codes::INVALID_REQUEST,
                "no session: open one with initialize".to_owned(),
            );
        }
    };
    // A request whose client takes a stream gets what the server says while it works
    // (progress, log messages, its own requests of the client) before the answer.
    let streams = message.get("method").is_some()
        && message.get("id").is_some()
        && headers
            .get_all(axum::http::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("text/event-stream"));
    let answer = if streams {
        match streamed(bridge.clone(), session.clone(), message.clone()).await {
            Ok(answer) => answer,
            Err(mut stream) => {
                if let Ok(value) = HeaderValue::from_str(&session) {
                    stream.headers_mut().insert(SESSION_HEADER, value);
                }
                return stream;
            }
        }
    } else {
        bridge
            .sessions
            .request(&session, HOLDER, HOLDER, &message, config.timeout, None)
            .await
    };
    let mut response = match answer {
        Ok(Some(answer)) => (StatusCode::OK, axum::Json(answer)).into_response(),
        Ok(None) => StatusCode::ACCEPTED.into_response(),
        Err(StdioError::UnknownSession) => {
            return rpc_error(
                StatusCode::NOT_FOUND,
                id,
                crate::mcp::codes::INVALID_REQUEST,
                format!("no session {session:?}: it ended, or never began"),
            );
        }
        Err(StdioError::NotSent(why) | StdioError::Unanswered(why)) => {
            if message.get("method").and_then(Value::as_str) == Some("initialize") {
                bridge.sessions.end(&session, HOLDER, HOLDER);
            }
            return rpc_error(
                StatusCode::BAD_GATEWAY,
                id,
                crate::mcp::codes::UPSTREAM,
                why,
            );
        }
        Err(StdioError::Limit(_)) => StatusCode::TOO_MANY_REQUESTS.into_response(),
    };
    if let Ok(value) = HeaderValue::from_str(&session) {
        response.headers_mut().insert(SESSION_HEADER, value);
    }
    response
}

/// `message` (a request) in `session`: its answer, when it comes before the server says anything
/// else; otherwise (`Err`) an SSE stream of what the server says, its answer last.
async fn streamed(
    bridge: Arc<Bridge>,
    session: String,
    message: Value,
) -> Result<Result<Option<Value>, StdioError>, Response> {
    use futures::StreamExt;
    let id = message.get("id").cloned().unwrap_or(Value::Null);
    let (relay, mut relayed) = tokio::sync::mpsc::channel(64);
    let timeout = bridge.config.timeout;
    let mut call = Box::pin(async move {
        bridge
            .sessions
            .request(&session, HOLDER, HOLDER, &message, timeout, Some(&relay))
            .await
    });
    let first = tokio::select! {
        biased;
        answer = &mut call => return Ok(answer),
        Some(said) = relayed.recv() => said,
    };
    let call = tokio::spawn(call);
    let event = |message: &Value| format!("event: message\ndata: {message}\n\n");
    let stream = futures::stream::unfold(
        (Some(call), relayed, Some(first)),
        move |(call, mut relayed, first)| {
            let id = id.clone();
            async move {
                if let Some(first) = first {
                    return Some((event(&first), (call, relayed, None)));
                }
                let mut call = call?;
                tokio::select! {
                    biased;
                    Some(said) = relayed.recv() => Some((event(&said), (Some(call), relayed, None))),
                    answer = &mut call => {
                        let last = match answer {
                            Ok(Ok(Some(answer))) => answer,
                            Ok(Err(StdioError::NotSent(why) | StdioError::Unanswered(why))) => {
                                json!({"jsonrpc": "2.0", "id": id, "error": {
                                    "code": crate::mcp::codes::UPSTREAM, "message": why}})
                            }
                            _ => json!({"jsonrpc": "2.0", "id": id, "error": {
                                "code": crate::mcp::codes::UPSTREAM,
                                "message": "the session ended before the server answered"}}),
                        };
                        Some((event(&last), (None, relayed, None)))
                    }
                }
            }
        },
    );
    let mut response =
        Body::from_stream(stream.map(Ok::<_, std::convert::Infallible>)).into_response();
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    Err(response)
}

async fn end(State(bridge): State<Arc<Bridge>>, headers: HeaderMap) -> StatusCode {
    match headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) {
        Some(session) if bridge.sessions.end(session, HOLDER, HOLDER) => StatusCode::NO_CONTENT,
        Some(_) => StatusCode::NOT_FOUND,
        None => StatusCode::BAD_REQUEST,
    }
}

/// The bridge's routes: `POST /mcp`, `DELETE /mcp`, `GET /healthz`.
fn router(bridge: Arc<Bridge>) -> Router {
    Router::new()
        .route("/mcp", post(message).delete(end))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .with_state(bridge)
}

/// Serves until `shutdown` completes, then ends every process.
pub async fn run(
    config: BridgeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %config.listen, command = %config.server.command, "tollgate stdio bridge listening");
    let bridge = Arc::new(Bridge {
        sessions: StdioSessions::new(config.idle, config.max_sessions),
        config,
    });
    bridge.sessions.reap_for(Arc::downgrade(&bridge));
    let served = axum::serve(listener, router(bridge.clone()))
        .with_graceful_shutdown(shutdown)
        .await;
    bridge.sessions.end_all();
    served?;
    Ok(())
}
