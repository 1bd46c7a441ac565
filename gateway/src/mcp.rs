//! The MCP proxy: `/mcp/{upstream}`, streamable HTTP transport, JSON-RPC 2.0.
//!
//! One JSON-RPC message per POST. What passes:
//! - `initialize`, `ping` and the `notifications/initialized` and `notifications/cancelled`
//!   notifications are forwarded as they are;
//! - `tools/list` is forwarded and its answer cut to the tools the policy allows from this
//!   upstream;
//! - `tools/call` is decided first (as `/v1/decide` decides) and forwarded only when allowed,
//!   with the agent's credential for this upstream added by the gateway; the result's
//!   `structuredContent` is cut to the tool's `resultFields`. A refusal is a tool result with
//!   `isError: true`, its reason in text for the model and the decision under `_meta`
//!   ([`DECISION_META`]); JSON-RPC errors are for protocol faults ([`codes`]).
//! - `DELETE` ends the session upstream too.
//!
//! A `tools/call` from a client that accepts `text/event-stream` is answered as an SSE stream: `: keep-alive` comments while the call waits (for approval, or for the upstream),
//! then one `message` event with the JSON-RPC response, so proxies with idle timeouts do not cut
//! a call that waits for people.
//!
//! Everything else is refused without reaching the upstream: batches (removed from MCP in
//! 2025-06-18, and a way to slip a second call behind a first), other methods (resources,
//! prompts, sampling replies), JSON-RPC responses, routing headers (2026-07-28) that disagree
//! with the body, and anything malformed. Method names match exactly, so `Tools/Call` or
//! `tools/call ` is an unknown method, not a call.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tollgate_audit::{Entry, Event};
use tollgate_crds::policy::{McpTransport, McpUpstream};
use tollgate_engine::{Decision, canonical};

use super::{
    Caller, Gateway, MAX_BODY, RUN_HEADER, Refusal, RefusalCode, audit_unavailable,
    audit_unavailable_refusing, authenticate, identity_of, valid_run_id,
};
use crate::stdio::StdioError;

/// JSON-RPC error codes the proxy answers with: the four standard ones for protocol faults, and
/// two of Tollgate's own outside JSON-RPC's reserved range (-32768 to -32000), where MCP and its
/// SDKs put theirs (-32001 is the SDKs' request timeout, -32002 MCP's resource not found), so no
/// client mistakes a refusal for a timeout it may retry. A tool call the policy refuses is not
/// an error at all: it is a tool result with `isError: true` (see [`refused_call`]).
pub mod codes {
    /// The body is not JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a valid JSON-RPC request, or a batch.
    pub const INVALID_REQUEST: i64 = -32600;
    /// A method the gateway does not let through.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Bad parameters (a tools/call without a name, a run id that is missing or malformed).
    pub const INVALID_PARAMS: i64 = -32602;
    /// The 2026-07-28 headers (`Mcp-Method`, `Mcp-Name`) disagree with the body; MCP's own code.
    pub const HEADER_MISMATCH: i64 = -32020;
    /// Tollgate refused the request before any decision (no credential, no usable policy, an
    /// upstream the policy does not serve, the audit trail unavailable); `data.code` names why,
    /// as the decision API's `error.code` does.
    pub const REFUSED: i64 = -31001;
    /// The upstream could not be reached, or answered with something that is not MCP.
    pub const UPSTREAM: i64 = -31002;
}

/// The `_meta` key of a refused tool call's result that carries Tollgate's decision.
pub const DECISION_META: &str = "dev.tollgate/decision";

/// The header the streamable HTTP transport carries the session in.
pub const SESSION_HEADER: &str = "mcp-session-id";
const PROTOCOL_HEADER: &str = "mcp-protocol-version";
/// Protocol 2026-07-28: the request's method, and the name it acts on, in headers that
/// intermediaries route by; both must say what the body says.
pub(crate) const METHOD_HEADER: &str = "mcp-method";
pub(crate) const NAME_HEADER: &str = "mcp-name";

pub(crate) fn rpc_error(
    status: StatusCode,
    id: Value,
    code: i64,
    message: String,
    data: Option<Value>,
) -> Response {
    let mut error = json!({"code": code, "message": message});
    if let Some(data) = data {
        error["data"] = data;
    }
    (
        status,
        axum::Json(json!({"jsonrpc": "2.0", "id": id, "error": error})),
    )
        .into_response()
}

impl Gateway {
    /// Records a refusal at `/mcp/<upstream>` (at `/mcp` when `upstream` is empty).
    pub(crate) async fn reject(
        &self,
        holder: Option<&Caller>,
        upstream: &str,
        error: String,
    ) -> Result<(), Refusal> {
        self.reject_as(identity_of(holder), holder, upstream, error)
            .await
    }

    async fn reject_as(
        &self,
        identity: tollgate_audit::Identity,
        holder: Option<&Caller>,
        upstream: &str,
        error: String,
    ) -> Result<(), Refusal> {
        let mut entry = Entry::new((self.now)(), Event::Rejected, identity);
        entry.agent = holder.map(|h| h.agent.clone());
        entry.error = Some(if upstream.is_empty() {
            format!("/mcp: {error}")
        } else {
            format!("/mcp/{upstream}: {error}")
        });
        self.metrics.refusals.with_label_values(&["mcp"]).inc();
        self.audit
            .append(entry)
            .await
            .map(|_| ())
            .map_err(|e| audit_unavailable_refusing(e, &error))
    }
}

/// A refusal before any decision, as a JSON-RPC error with the refusal's HTTP status.
pub(crate) fn rpc_refusal(id: Value, refusal: &Refusal) -> Response {
    rpc_error(
        refusal.status,
        id,
        codes::REFUSED,
        refusal.message.clone(),
        Some(json!({"code": refusal.code.as_str()})),
    )
}

/// A tool call the policy refused, as the tool result MCP gives to failures the model can act
/// on (2025-11-25: input validation errors are tool results): `isError`, the reason in a text
/// block the model reads, and the decision under `_meta` ([`DECISION_META`]) for the client's
/// code. Not in `structuredContent`: clients validate that against the tool's `outputSchema`
/// even when `isError` is set (the TypeScript SDK does), so a refusal there would become an
/// exception again.
///
/// At protocol 2026-07-28 and later a result says what kind it is (`resultType`); earlier clients
/// get none, as their schemas do not know it.
pub(crate) fn refused_call(id: Value, modern: bool, message: &str, decision: Value) -> Response {
    let code = decision
        .get("code")
        .and_then(Value::as_str)
        .or_else(|| decision.get("decision").and_then(Value::as_str))
        .unwrap_or("refused")
        .to_owned();
    let mut result = json!({
        "content": [{"type": "text", "text": format!("Tollgate refused the call ({code}): {message}")}],
        "isError": true,
        "_meta": {DECISION_META: decision},
    });
    if modern {
        result["resultType"] = json!("complete");
    }
    (
        StatusCode::OK,
        axum::Json(json!({"jsonrpc": "2.0", "id": id, "result": result})),
    )
        .into_response()
}

/// The URL of `upstream` for the caller's agent. An upstream its policy does not name is
/// refused with 400, not 404: MCP clients read a 404 as "your session is gone", and a mistyped
/// path must not look like that.
fn upstream_url(
    gateway: &Gateway,
    holder: &Caller,
    upstream: &str,
) -> Result<McpUpstream, Refusal> {
    let found = gateway
        .policies
        .agent(&holder.agent)
        .and_then(|agent| agent.upstreams.get(upstream).cloned());
    if let Some(mcp) = &found
        && mcp.stdio.is_some()
        && !matches!(gateway.policies, crate::Policies::Dir(_))
    {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            RefusalCode::NotServed,
            format!(
                "upstream {upstream:?} is a stdio command, which only a standalone gateway starts: \
                 in a cluster a policy must not run commands inside the gateway; run the server \
                 behind `tollgate-gateway stdio-bridge` as a Deployment and name its url"
            ),
        ));
    }
    found.ok_or_else(|| {
        let mut message = format!(
            "upstream {upstream:?} is not an MCP upstream of agent {}'s policy",
            holder.agent
        );
        // A file that does not load may have held it: say so, with the file's error.
        if let Some(problems) = gateway.policies.load_problems() {
            message.push_str(&format!(
                ", and the policy directory has files that do not load: {problems}"
            ));
        }
        Refusal::new(StatusCode::BAD_REQUEST, RefusalCode::NotServed, message)
    })
}

/// Records a refusal before any decision and answers it as a JSON-RPC error.
async fn refuse_with(
    gateway: &Gateway,
    holder: &Caller,
    upstream: &str,
    id: Value,
    refusal: Refusal,
) -> Response {
    let recorded = match gateway
        .reject(
            Some(holder),
            upstream,
            format!("{}: {}", refusal.code, refusal.message),
        )
        .await
    {
        Ok(()) => refusal,
        Err(unrecorded) => unrecorded,
    };
    rpc_refusal(id, &recorded)
}

/// Refuses before anything reaches the upstream: the refusal is audited, then answered.
async fn refuse(
    gateway: &Gateway,
    holder: Option<&Caller>,
    upstream: &str,
    status: StatusCode,
    id: Value,
    code: i64,
    message: String,
) -> Response {
    if let Err(refusal) = gateway.reject(holder, upstream, message.clone()).await {
        return rpc_refusal(id, &refusal);
    }
    rpc_error(status, id, code, message, None)
}

/// The caller, or the answer refusing it (recorded, or counted in the interval's summary).
pub(crate) async fn authenticated(
    gateway: &Gateway,
    headers: &HeaderMap,
    upstream: &str,
) -> Result<Caller, Response> {
    let refusal = match authenticate(gateway, headers).await {
        Ok(holder) => return Ok(holder),
        Err(refusal) => refusal,
    };
    let mut response = if gateway.summarized("/mcp", &refusal) {
        rpc_refusal(Value::Null, &refusal)
    } else {
        let recorded = gateway
            .reject_as(
                refusal.identity(None),
                None,
                upstream,
                format!("{}: {}", refusal.code, refusal.message),
            )
            .await;
        match recorded {
            Ok(()) => rpc_refusal(Value::Null, &refusal),
            Err(unrecorded) => rpc_refusal(Value::Null, &unrecorded),
        }
    };
    if response.status() == StatusCode::UNAUTHORIZED
        && let Some(challenge) = challenge(gateway, headers, upstream)
    {
        response
            .headers_mut()
            .insert(axum::http::header::WWW_AUTHENTICATE, challenge);
    }
    Err(response)
}

/// This gateway's base URL as the client reached it (`Host`), or None when the header is not a
/// plain host\[:port\].
fn base_url(gateway: &Gateway, headers: &HeaderMap) -> Option<String> {
    let host = headers.get(axum::http::header::HOST)?.to_str().ok()?;
    let plain = !host.is_empty()
        && host.len() <= 255
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    // A cluster gateway serves TLS; a standalone one plain HTTP on loopback.
    let scheme = match gateway.policies {
        crate::Policies::Cluster(_) => "https",
        crate::Policies::Dir(_) => "http",
    };
    plain.then(|| format!("{scheme}://{host}"))
}

/// `WWW-Authenticate` for a request without a usable credential: a Bearer challenge naming the
/// protected resource metadata (RFC 9728), where an OAuth-aware client reads how to get one.
fn challenge(gateway: &Gateway, headers: &HeaderMap, upstream: &str) -> Option<HeaderValue> {
    let base = base_url(gateway, headers)?;
    let named = !upstream.is_empty()
        && upstream.len() <= 63
        && upstream
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let path = if named {
        format!("/.well-known/oauth-protected-resource/mcp/{upstream}")
    } else {
        "/.well-known/oauth-protected-resource".to_owned()
    };
    HeaderValue::from_str(&format!(
        "Bearer realm=\"tollgate\", resource_metadata=\"{base}{path}\""
    ))
    .ok()
}

/// `GET /.well-known/oauth-protected-resource[/mcp/{upstream}]`: the protected resource metadata
/// (RFC 9728) of the MCP proxy. Tollgate is no authorization server and names none: its
/// credentials are the agent's own (in a cluster a projected ServiceAccount token for the
/// audience `tollgate`; standalone an API key from the gateway's keys file), said in words for
/// the person reading a client's error.
pub(super) async fn resource_metadata(
    State(gateway): State<Arc<Gateway>>,
    upstream: Option<Path<String>>,
    headers: HeaderMap,
) -> Response {
    let base = base_url(&gateway, &headers).unwrap_or_default();
    let resource = match &upstream {
        Some(Path(upstream)) => format!("{base}/mcp/{upstream}"),
        None => format!("{base}/mcp"),
    };
    let how = match gateway.policies {
        crate::Policies::Cluster(_) => {
            "a projected ServiceAccount token of the agent's pod for the audience `tollgate` \
             (the AgentIdentity's serviceAccount.tokenAudience), as a Bearer token"
        }
        crate::Policies::Dir(_) => "an API key from the gateway's keys file, as a Bearer token",
    };
    axum::Json(json!({
        "resource": resource,
        "authorization_servers": [],
        "bearer_methods_supported": ["header"],
        "resource_name": "Tollgate MCP gateway",
        "resource_documentation": "https://github.com/tollgate-dev/tollgate/blob/main/docs/gateway.md#mcp-proxy",
        "tollgate_credentials": how,
    }))
    .into_response()
}

/// `DELETE /mcp/{upstream}`: the client ends its session, and the upstream its own (behind a
/// stdio bridge, that ends a process). The upstream's status is passed back as it is: 200 or
/// 204 ended, 404 unknown, 405 the server does not let clients end sessions.
pub(crate) async fn end_session(
    State(gateway): State<Arc<Gateway>>,
    Path(upstream): Path<String>,
    headers: HeaderMap,
) -> Response {
    let holder = match authenticated(&gateway, &headers, &upstream).await {
        Ok(holder) => holder,
        Err(response) => return response,
    };
    let url = match upstream_url(&gateway, &holder, &upstream) {
        Ok(url) => url,
        Err(refusal) => {
            return refuse_with(&gateway, &holder, &upstream, Value::Null, refusal).await;
        }
    };
    let Some(session) = headers.get(SESSION_HEADER) else {
        let refusal = Refusal::new(
            StatusCode::BAD_REQUEST,
            RefusalCode::MalformedRequest,
            format!("DELETE ends a session: the {SESSION_HEADER} header names it"),
        );
        return refuse_with(&gateway, &holder, &upstream, Value::Null, refusal).await;
    };
    let sse = url.transport == Some(McpTransport::Sse);
    let url = match (&url.url, &url.stdio) {
        (Some(_), _) if sse => {
            // An HTTP+SSE server's session ends with its stream.
            let id = session.to_str().unwrap_or_default();
            return if gateway.streams.end(id, &holder.agent, &upstream) {
                StatusCode::NO_CONTENT.into_response()
            } else {
                StatusCode::NOT_FOUND.into_response()
            };
        }
        (Some(url), _) => url.clone(),
        (None, _) => {
            // A stdio server's session ends with its process.
            let id = session.to_str().unwrap_or_default();
            return if gateway.stdio.end(id, &holder.agent, &upstream) {
                StatusCode::NO_CONTENT.into_response()
            } else {
                StatusCode::NOT_FOUND.into_response()
            };
        }
    };
    let mut request = gateway
        .http
        .delete(&url)
        .timeout(gateway.upstream_timeout)
        .header(SESSION_HEADER, session);
    if let Some(version) = headers.get(PROTOCOL_HEADER) {
        request = request.header(PROTOCOL_HEADER, version);
    }
    match gateway.credential(&holder.agent, &upstream).await {
        Ok(Some((header, value))) => request = request.header(header, value),
        Ok(None) => {}
        Err(e) => return SendError::NotSent(e).answer(Value::Null),
    }
    match request.send().await {
        Ok(answer) => StatusCode::from_u16(answer.status().as_u16())
            .unwrap_or(StatusCode::BAD_GATEWAY)
            .into_response(),
        Err(e) => SendError::NotSent(format!("upstream {upstream:?} unreachable: {e}"))
            .answer(Value::Null),
    }
}

/// The server-to-client notifications the GET stream passes on: those of a call (progress, log
/// messages) and that the tool list changed (the client lists again, and sees it cut again).
const STREAMED: [&str; 3] = [
    "notifications/progress",
    "notifications/message",
    "notifications/tools/list_changed",
];

/// `GET /mcp/{upstream}`: the server's stream of messages outside any call, for the session the
/// client names. What passes is [`STREAMED`]; a request the server makes of the client is
/// answered with an error at once and recorded, as inside a call. Each event keeps its `id`, so
/// a client that reconnects with `Last-Event-ID` resumes where the server lets it. Servers
/// without a stream answer 405, passed on; a session the gateway holds itself (stdio, HTTP+SSE)
/// has none (405).
pub(super) async fn listen(
    State(gateway): State<Arc<Gateway>>,
    Path(upstream): Path<String>,
    headers: HeaderMap,
) -> Response {
    use futures::StreamExt;
    let holder = match authenticated(&gateway, &headers, &upstream).await {
        Ok(holder) => holder,
        Err(response) => return response,
    };
    let url = match upstream_url(&gateway, &holder, &upstream) {
        Ok(url) => url,
        Err(refusal) => {
            return refuse_with(&gateway, &holder, &upstream, Value::Null, refusal).await;
        }
    };
    let (Some(stream_url), None) = (url.url.clone(), url.transport) else {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    };
    let Some(session) = headers.get(SESSION_HEADER) else {
        let refusal = Refusal::new(
            StatusCode::BAD_REQUEST,
            RefusalCode::MalformedRequest,
            format!("the GET stream belongs to a session: the {SESSION_HEADER} header names it"),
        );
        return refuse_with(&gateway, &holder, &upstream, Value::Null, refusal).await;
    };
    let mut request = gateway
        .http
        .get(&stream_url)
        .header("accept", "text/event-stream")
        .header(SESSION_HEADER, session);
    for name in [PROTOCOL_HEADER, "last-event-id"] {
        if let Some(value) = headers.get(name) {
            request = request.header(name, value);
        }
    }
    match gateway.credential(&holder.agent, &upstream).await {
        Ok(Some((header, value))) => request = request.header(header, value),
        Ok(None) => {}
        Err(e) => return SendError::NotSent(e).answer(Value::Null),
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) => {
            return SendError::NotSent(format!("upstream {upstream:?} unreachable: {e}"))
                .answer(Value::Null);
        }
    };
    let sse = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !response.status().is_success() || !sse {
        let status =
            StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        return if status.is_success() {
            StatusCode::BAD_GATEWAY.into_response()
        } else {
            status.into_response()
        };
    }
    let limit = gateway.upstream_limit;
    let events = futures::stream::unfold(
        (
            response,
            Vec::<u8>::new(),
            gateway,
            holder,
            stream_url,
            upstream,
            headers,
        ),
        move |(mut response, mut buffer, gateway, holder, url, upstream, headers)| async move {
            loop {
                if let Some(end) = event_end(&buffer, 0) {
                    let event: Vec<u8> = buffer.drain(..end).collect();
                    let text = String::from_utf8_lossy(&event).into_owned();
                    let mut out = String::new();
                    let mut data = Vec::new();
                    for line in text.lines() {
                        if line.starts_with("id:") || line.starts_with("retry:") {
                            out.push_str(line);
                            out.push('\n');
                        } else if let Some(rest) = line.strip_prefix("data:") {
                            data.push(rest.strip_prefix(' ').unwrap_or(rest).to_owned());
                        }
                    }
                    let message = serde_json::from_str::<Value>(&data.join("\n")).ok();
                    let method = message
                        .as_ref()
                        .and_then(|m| m.get("method"))
                        .and_then(Value::as_str);
                    let passes = message.as_ref().is_some_and(|m| m.get("id").is_none())
                        && method.is_some_and(|m| STREAMED.contains(&m));
                    if passes && let Some(message) = &message {
                        out.push_str(&format!("event: message\ndata: {message}\n\n"));
                        let state = (response, buffer, gateway, holder, url, upstream, headers);
                        return Some((out, state));
                    }
                    if let Some(message) = &message {
                        // A request of the client, or a notification that does not pass.
                        server_message(&gateway, &holder, &url, &upstream, &headers, message, None)
                            .await;
                    }
                    if !out.is_empty() {
                        // Keep the event id, so a reconnect resumes after it.
                        out.push_str(": \n\n");
                        let state = (response, buffer, gateway, holder, url, upstream, headers);
                        return Some((out, state));
                    }
                    continue;
                }
                if buffer.len() > limit {
                    return None;
                }
                match response.chunk().await {
                    Ok(Some(chunk)) => buffer.extend_from_slice(&chunk),
                    Ok(None) | Err(_) => return None,
                }
            }
        },
    );
    let mut response =
        Body::from_stream(events.map(Ok::<_, std::convert::Infallible>)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    response
}

pub(crate) async fn proxy(
    State(gateway): State<Arc<Gateway>>,
    Path(upstream): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let holder = match authenticated(&gateway, &headers, &upstream).await {
        Ok(holder) => holder,
        Err(response) => return response,
    };
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
        return refuse(
            &gateway,
            Some(&holder),
            &upstream,
            StatusCode::PAYLOAD_TOO_LARGE,
            Value::Null,
            codes::INVALID_REQUEST,
            format!("the request body exceeds {MAX_BODY} bytes"),
        )
        .await;
    };
    let parsed = match canonical::parse_strict(&bytes) {
        Ok(Value::Object(message)) => Ok(message),
        Ok(Value::Array(_)) => Err((
            codes::INVALID_REQUEST,
            "JSON-RPC batches are not accepted: send one message per request".to_owned(),
        )),
        Ok(_) => Err((
            codes::INVALID_REQUEST,
            "a JSON-RPC message must be a JSON object".to_owned(),
        )),
        Err(e) => Err((
            codes::PARSE_ERROR,
            format!("the body is not valid JSON: {e}"),
        )),
    };
    let message = match parsed {
        Ok(message) => message,
        Err((code, problem)) => {
            return refuse(
                &gateway,
                Some(&holder),
                &upstream,
                StatusCode::BAD_REQUEST,
                Value::Null,
                code,
                problem,
            )
            .await;
        }
    };
    let id = message.get("id").cloned();
    let reply_id = id.clone().unwrap_or(Value::Null);
    let shape = check_shape(&message);
    let method = match shape {
        Ok(method) => method,
        Err(problem) => {
            return refuse(
                &gateway,
                Some(&holder),
                &upstream,
                StatusCode::BAD_REQUEST,
                reply_id,
                codes::INVALID_REQUEST,
                problem,
            )
            .await;
        }
    };

    if let Err(problem) = check_routing(&headers, &message, &method) {
        return refuse(
            &gateway,
            Some(&holder),
            &upstream,
            StatusCode::BAD_REQUEST,
            reply_id,
            codes::HEADER_MISMATCH,
            problem,
        )
        .await;
    }

    let url = match upstream_url(&gateway, &holder, &upstream) {
        Ok(url) => url,
        Err(refusal) => return refuse_with(&gateway, &holder, &upstream, reply_id, refusal).await,
    };
    if url.stdio.is_some() {
        // The task that ends idle, killed and changed stdio servers (started once).
        gateway.stdio.reap_for(Arc::downgrade(&gateway));
    }
    if url.transport == Some(McpTransport::Sse) {
        gateway.streams.reap_for(Arc::downgrade(&gateway));
    }

    match (method.as_str(), id.is_some()) {
        // The handshake (to 2025-11-25) and its stateless successor (2026-07-28) both tell
        // the client what the server offers.
        ("initialize" | "server/discover", true) => {
            initialize(&gateway, &holder, &url, &upstream, &headers, message).await
        }
        ("ping", true) | ("notifications/initialized" | "notifications/cancelled", false) => {
            forward(
                &gateway,
                &holder,
                &url,
                &upstream,
                &headers,
                &Value::Object(message),
            )
            .await
            .unwrap_or_else(|e| e)
        }
        ("tools/list", true) => {
            list_tools(&gateway, &holder, &url, &upstream, &headers, message).await
        }
        ("tools/call", true) if accepts_events(&headers) => {
            call_tool_streaming(gateway, holder, url, upstream, headers, message, started).await
        }
        ("tools/call", true) => {
            let route = Route {
                gateway: &gateway,
                holder: &holder,
                url: &url,
                upstream: &upstream,
                headers: &headers,
            };
            call_tool(route, message, started, None).await
        }
        (method, true) => {
            refuse(
                &gateway,
                Some(&holder),
                &upstream,
                StatusCode::OK,
                reply_id,
                codes::METHOD_NOT_FOUND,
                format!("method {method:?} is not allowed through Tollgate's gateway"),
            )
            .await
        }
        (method, false) => {
            // Per the transport, notifications are acknowledged with 202; unknown ones are
            // recorded and dropped, never forwarded.
            if let Err(refusal) = gateway
                .reject(
                    Some(&holder),
                    &upstream,
                    format!("notification {method:?} dropped"),
                )
                .await
            {
                return rpc_refusal(Value::Null, &refusal);
            }
            StatusCode::ACCEPTED.into_response()
        }
    }
}

/// The JSON-RPC method of a request or notification; anything else is refused with the reason.
pub(crate) fn check_shape(message: &Map<String, Value>) -> Result<String, String> {
    if message.get("jsonrpc") != Some(&Value::String("2.0".to_owned())) {
        return Err("a JSON-RPC message must carry \"jsonrpc\": \"2.0\"".to_owned());
    }
    for key in message.keys() {
        if !matches!(key.as_str(), "jsonrpc" | "id" | "method" | "params") {
            return Err(format!(
                "unexpected member {key:?}: the gateway accepts requests and notifications only"
            ));
        }
    }
    let Some(method) = message.get("method") else {
        return Err(
            "JSON-RPC responses are not accepted: the gateway sends no requests to clients"
                .to_owned(),
        );
    };
    let Value::String(method) = method else {
        return Err("\"method\" must be a string".to_owned());
    };
    match message.get("id") {
        None | Some(Value::String(_)) => {}
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => {}
        Some(other) => {
            return Err(format!(
                "\"id\" must be a string or an integer, not {other}"
            ));
        }
    }
    if let Some(params) = message.get("params")
        && !params.is_object()
    {
        return Err("\"params\" must be an object".to_owned());
    }
    Ok(method.clone())
}

fn run_of(headers: &HeaderMap) -> Result<String, String> {
    let header = |name: &str| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("\u{0}").to_owned())
    };
    let run = header(RUN_HEADER)
        .or_else(|| header(SESSION_HEADER))
        .ok_or_else(|| {
            format!(
                "a run id is required: the {RUN_HEADER} header, or an MCP session ({SESSION_HEADER})"
            )
        })?;
    if valid_run_id(&run) {
        Ok(run)
    } else {
        Err(format!(
            "run id {run:?} must be 1 to 128 characters of A-Z a-z 0-9 . _ : -"
        ))
    }
}

/// Why a message sent upstream brought back no answer to pass on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SendError {
    /// The upstream never took the message (unreachable, no credential): nothing ran.
    NotSent(String),
    /// The upstream does not know the session (HTTP 404): nothing ran, and the client must
    /// start a new session, which it learns from a 404 of its own.
    SessionGone(String),
    /// The upstream took it and answered something the gateway does not pass on (too large, not
    /// MCP, broken off, too late): the call may have run.
    Unusable(String),
}

impl SendError {
    fn ran(&self) -> bool {
        matches!(self, SendError::Unusable(_))
    }

    /// The answer to the client: its HTTP status, and a JSON-RPC error with the request's id.
    fn answer(&self, id: Value) -> Response {
        let status = match self {
            SendError::SessionGone(_) => StatusCode::NOT_FOUND,
            SendError::NotSent(_) | SendError::Unusable(_) => StatusCode::BAD_GATEWAY,
        };
        rpc_error(status, id, codes::UPSTREAM, self.to_string(), None)
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::NotSent(m) | SendError::SessionGone(m) | SendError::Unusable(m) => {
                f.write_str(m)
            }
        }
    }
}

/// The value of an `Mcp-Name` header: as it is when it is visible ASCII without leading or
/// trailing spaces, else MCP's base64 form (`=?base64?…?=`).
fn header_text(value: &str) -> Option<HeaderValue> {
    use base64::Engine as _;
    let plain = !value.is_empty()
        && value.bytes().all(|b| (0x20..0x7f).contains(&b))
        && value.trim() == value
        && !value.starts_with("=?base64?");
    let text = if plain {
        value.to_owned()
    } else {
        format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode(value)
        )
    };
    HeaderValue::from_str(&text).ok()
}

/// A header value as MCP means it: base64 decoded when in the `=?base64?…?=` form.
fn header_meaning(value: &HeaderValue) -> Option<String> {
    use base64::Engine as _;
    let text = value.to_str().ok()?;
    match text
        .strip_prefix("=?base64?")
        .and_then(|rest| rest.strip_suffix("?="))
    {
        Some(encoded) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok()),
        None => Some(text.to_owned()),
    }
}

/// The first protocol version whose requests carry their own version and whose results say
/// their kind (`resultType`).
const MODERN_PROTOCOL: &str = "2026-07-28";

/// Whether a request speaks protocol 2026-07-28 or later: its `MCP-Protocol-Version` header, or
/// the version in its `_meta` envelope. Versions are dates, so they compare as strings.
pub(crate) fn modern_protocol(headers: &HeaderMap, params: &Value) -> bool {
    let header = headers
        .get(PROTOCOL_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let envelope = params
        .pointer("/_meta/io.modelcontextprotocol~1protocolVersion")
        .and_then(Value::as_str)
        .map(str::to_owned);
    header
        .or(envelope)
        .is_some_and(|version| version.as_str() >= MODERN_PROTOCOL)
}

/// The body parameter a method's `Mcp-Name` header mirrors (protocol 2026-07-28).
fn name_param(method: &str) -> Option<&'static str> {
    match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        _ => None,
    }
}

/// Protocol 2026-07-28 routes by `Mcp-Method` and `Mcp-Name`; when a client sends them they must
/// say what the body says, or an intermediary could route (or a server log) one call while the
/// gateway decides another.
pub(crate) fn check_routing(
    headers: &HeaderMap,
    message: &Map<String, Value>,
    method: &str,
) -> Result<(), String> {
    if let Some(value) = headers.get(METHOD_HEADER)
        && header_meaning(value).as_deref() != Some(method)
    {
        return Err(format!(
            "the {METHOD_HEADER} header {value:?} does not match the body's method {method:?}"
        ));
    }
    if let Some(value) = headers.get(NAME_HEADER) {
        let named = name_param(method)
            .and_then(|key| message.get("params")?.get(key)?.as_str().map(str::to_owned));
        if header_meaning(value) != named {
            return Err(format!(
                "the {NAME_HEADER} header {value:?} does not match the body's {}",
                name_param(method).map_or_else(
                    || format!("method {method:?}, which names nothing"),
                    |key| format!("params.{key}")
                )
            ));
        }
    }
    Ok(())
}

/// Sends `message` upstream and returns the upstream's JSON-RPC answer (`Ok(None)` for an
/// accepted notification), with the session header to pass back. An answer longer than the
/// gateway's upstream limit is not read on (`Gateway::with_upstream_limit`).
async fn send(
    gateway: &Gateway,
    holder: &Caller,
    url: &McpUpstream,
    upstream: &str,
    headers: &HeaderMap,
    message: &Value,
    relay: Option<&Relay>,
) -> Result<(Option<Value>, Option<HeaderValue>), SendError> {
    let message = &without_client_capabilities(message);
    let url = match (&url.url, &url.stdio) {
        (Some(_), _) if url.transport == Some(McpTransport::Sse) => {
            return send_held(gateway, holder, upstream, headers, message, true).await;
        }
        (Some(url), _) => url,
        (None, Some(_)) => {
            return send_held(gateway, holder, upstream, headers, message, false).await;
        }
        (None, None) => {
            return Err(SendError::NotSent(format!(
                "upstream {upstream:?} has neither a url nor a stdio command"
            )));
        }
    };
    let mut request = gateway
        .http
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .timeout(gateway.upstream_timeout)
        .body(message.to_string());
    for name in [SESSION_HEADER, PROTOCOL_HEADER] {
        if let Some(value) = headers.get(name) {
            request = request.header(name, value);
        }
    }
    // A client of protocol 2026-07-28 routes by these headers: they go on, written from the
    // message that was decided and is sent (checked against the client's on the way in).
    if headers.contains_key(METHOD_HEADER)
        && let Some(method) = message.get("method").and_then(Value::as_str)
    {
        request = request.header(METHOD_HEADER, method);
        if let Some(value) = name_param(method)
            .and_then(|key| message.get("params")?.get(key)?.as_str())
            .and_then(header_text)
        {
            request = request.header(NAME_HEADER, value);
        }
    }
    let timeout = gateway.upstream_timeout;
    let late = |e: &reqwest::Error| {
        e.is_timeout().then(|| {
            format!(
                "upstream {upstream:?} did not answer within {timeout:?} (the gateway's --mcp-call-timeout)"
            )
        })
    };
    if let Some((header, value)) = gateway
        .credential(&holder.agent, upstream)
        .await
        .map_err(SendError::NotSent)?
    {
        request = request.header(header, value);
    }
    let mut response = request.send().await.map_err(|e| match late(&e) {
        // Sent, and no answer in time: it may have run.
        Some(late) => SendError::Unusable(late),
        None => SendError::NotSent(format!("upstream {upstream:?} unreachable: {e}")),
    })?;
    let status = response.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(SendError::SessionGone(match headers.get(SESSION_HEADER) {
            Some(_) => format!(
                "upstream {upstream:?} does not know this session (HTTP 404): start a new one"
            ),
            None => format!("upstream {upstream:?} answered HTTP 404: its URL serves no MCP"),
        }));
    }
    let session = response.headers().get(SESSION_HEADER).cloned();
    let sse = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let limit = gateway.upstream_limit;
    let too_large = || {
        SendError::Unusable(format!(
            "upstream {upstream:?} answered more than {limit} bytes, the most the gateway reads; \
             nothing of it was passed on"
        ))
    };
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    // How far the events of an SSE answer were relayed.
    let mut relayed = 0;
    while let Some(chunk) = response.chunk().await.map_err(|e| {
        SendError::Unusable(
            late(&e).unwrap_or_else(|| format!("upstream {upstream:?} broke off its answer: {e}")),
        )
    })? {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
        if sse {
            let (read, messages) = complete_events(&body, relayed);
            relayed = read;
            for message in messages {
                server_message(gateway, holder, url, upstream, headers, &message, relay).await;
            }
        }
    }
    if status == reqwest::StatusCode::ACCEPTED && body.is_empty() {
        return Ok((None, session));
    }
    if !status.is_success() && body.is_empty() {
        return Err(SendError::Unusable(format!(
            "upstream {upstream:?} answered HTTP {status}"
        )));
    }
    let answer = if sse {
        answer_in_events(&body, message.get("id"))
    } else {
        serde_json::from_slice(&body).ok()
    };
    match answer {
        Some(answer) => Ok((Some(answer), session)),
        None => Err(SendError::Unusable(format!(
            "upstream {upstream:?} answered HTTP {status} without a JSON-RPC answer"
        ))),
    }
}

/// [`send`] in a session the gateway holds itself (a stdio process, or an HTTP+SSE stream): the
/// one the client names, which must be this agent's at this upstream.
async fn send_held(
    gateway: &Gateway,
    holder: &Caller,
    upstream: &str,
    headers: &HeaderMap,
    message: &Value,
    stream: bool,
) -> Result<(Option<Value>, Option<HeaderValue>), SendError> {
    let Some(session) = headers.get(SESSION_HEADER).cloned() else {
        return Err(SendError::SessionGone(format!(
            "upstream {upstream:?} needs a session the gateway holds for it: initialize first"
        )));
    };
    let id = session.to_str().unwrap_or_default();
    let timeout = gateway.upstream_timeout;
    let answer = if stream {
        gateway
            .streams
            .request(&gateway.http, id, &holder.agent, upstream, message, timeout)
            .await
    } else {
        gateway
            .stdio
            .request(id, &holder.agent, upstream, message, timeout)
            .await
    };
    match answer {
        Ok(answer) => Ok((answer, Some(session))),
        Err(StdioError::UnknownSession) => Err(SendError::SessionGone(format!(
            "upstream {upstream:?} has no session {id:?} of this agent (it ended, or never \
             began): start a new one"
        ))),
        Err(StdioError::NotSent(why)) => Err(SendError::NotSent(why)),
        Err(StdioError::Unanswered(why)) => Err(SendError::Unusable(why)),
        Err(StdioError::Limit(n)) => Err(SendError::NotSent(format!(
            "upstream {upstream:?}: the agent holds {n} sessions already"
        ))),
    }
}

/// `message` as the upstream may see it: the client's capabilities (in `initialize`, and in the
/// `_meta` of a 2026-07-28 request) emptied, since Tollgate relays no server requests to the
/// client (sampling, elicitation, roots): a server told the client can answer them would ask,
/// and wait.
fn without_client_capabilities(message: &Value) -> Value {
    let mut message = message.clone();
    if message.get("method").and_then(Value::as_str) == Some("initialize")
        && let Some(capabilities) = message.pointer_mut("/params/capabilities")
    {
        *capabilities = json!({});
    }
    if let Some(capabilities) =
        message.pointer_mut("/params/_meta/io.modelcontextprotocol~1clientCapabilities")
    {
        *capabilities = json!({});
    }
    message
}

/// Where a call's stream sends what its upstream says before the answer.
pub(crate) type Relay = tokio::sync::mpsc::Sender<Value>;

/// The server-to-client notifications relayed to the client while its call runs: progress (a
/// client's request timeout restarts on it) and log messages. Anything else the server sends
/// inside a call's answer (requests for sampling or elicitation, other notifications) is not.
const RELAYED: [&str; 2] = ["notifications/progress", "notifications/message"];

/// The JSON-RPC messages of the complete events of an SSE `body` after byte `from`, and how far
/// it read.
fn complete_events(body: &[u8], from: usize) -> (usize, Vec<Value>) {
    let mut start = from;
    let mut messages = Vec::new();
    while let Some(end) = event_end(body, start) {
        let event = &body[start..end];
        let data: String = String::from_utf8_lossy(event)
            .lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .map(|rest| rest.strip_prefix(' ').unwrap_or(rest))
            .collect::<Vec<_>>()
            .join("\n");
        if let Ok(message) = serde_json::from_str::<Value>(&data) {
            messages.push(message);
        }
        start = end;
    }
    (start, messages)
}

/// What the server says inside its answer besides the answer: notifications of [`RELAYED`] go
/// to the client's stream (a client too slow to take them loses some, never the answer); a
/// request to the client (sampling, elicitation, roots), which Tollgate does not relay, is
/// answered with an error at once, so the call never hangs waiting for it, and recorded.
async fn server_message(
    gateway: &Gateway,
    holder: &Caller,
    url: &str,
    upstream: &str,
    headers: &HeaderMap,
    message: &Value,
    relay: Option<&Relay>,
) {
    let method = message.get("method").and_then(Value::as_str);
    match (message.get("id"), method) {
        (None, Some(method)) if RELAYED.contains(&method) => {
            if let Some(relay) = relay {
                let _ = relay.try_send(message.clone());
            }
        }
        (Some(id), Some(method)) => {
            let why = format!(
                "the server's request {method} was answered with an error: Tollgate does not \
                 relay sampling, elicitation or roots requests to the client"
            );
            let refusal = json!({"jsonrpc": "2.0", "id": id, "error": {
                "code": codes::METHOD_NOT_FOUND, "message": why}});
            let mut answer = gateway
                .http
                .post(url)
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .timeout(gateway.upstream_timeout)
                .body(refusal.to_string());
            for name in [SESSION_HEADER, PROTOCOL_HEADER] {
                if let Some(value) = headers.get(name) {
                    answer = answer.header(name, value);
                }
            }
            if let Ok(Some((header, value))) = gateway.credential(&holder.agent, upstream).await {
                answer = answer.header(header, value);
            }
            if let Err(e) = answer.send().await {
                tracing::warn!(%upstream, error = %e, "could not answer the server's request");
            }
            if let Err(refusal) = gateway.reject(Some(holder), upstream, why).await {
                tracing::error!(message = %refusal.message, "a refused server request could not be recorded");
            }
        }
        _ => {}
    }
}

/// The end (past its blank line) of the SSE event that starts at `from`, once it is complete.
pub(crate) fn event_end(body: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < body.len() {
        if body[i] == b'\n' {
            match body.get(i + 1) {
                Some(b'\n') => return Some(i + 2),
                Some(b'\r') if body.get(i + 2) == Some(&b'\n') => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// The JSON-RPC answer to `id` among the `data:` events of an SSE body.
fn answer_in_events(body: &[u8], id: Option<&Value>) -> Option<Value> {
    let text = std::str::from_utf8(body).ok()?;
    let mut data = String::new();
    let mut found = None;
    for line in text.lines().chain(std::iter::once("")) {
        if let Some(rest) = line.strip_prefix("data:") {
            data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
            data.push('\n');
        } else if line.is_empty() && !data.is_empty() {
            if let Ok(message) = serde_json::from_str::<Value>(&data)
                && message.get("id") == id
                && (message.get("result").is_some() || message.get("error").is_some())
            {
                found = Some(message);
            }
            data.clear();
        }
    }
    found
}

fn answer(status: StatusCode, body: Option<Value>, session: Option<HeaderValue>) -> Response {
    let mut response = match body {
        Some(body) => (status, axum::Json(body)).into_response(),
        None => StatusCode::ACCEPTED.into_response(),
    };
    if let Some(session) = session {
        response.headers_mut().insert(SESSION_HEADER, session);
    }
    response
}

async fn forward(
    gateway: &Gateway,
    holder: &Caller,
    url: &McpUpstream,
    upstream: &str,
    headers: &HeaderMap,
    message: &Value,
) -> Result<Response, Response> {
    match send(gateway, holder, url, upstream, headers, message, None).await {
        Ok((body, session)) => Ok(answer(StatusCode::OK, body, session)),
        Err(e) => Err(e.answer(message.get("id").cloned().unwrap_or(Value::Null))),
    }
}

/// `initialize` or `server/discover`, forwarded; the upstream's capabilities in the answer are
/// cut to what the proxy serves: tools (without `listChanged`: no notification reaches the
/// client). A client told the server offers logging, prompts, resources or completions would ask
/// for them and be refused.
async fn initialize(
    gateway: &Gateway,
    holder: &Caller,
    url: &McpUpstream,
    upstream: &str,
    headers: &HeaderMap,
    message: Map<String, Value>,
) -> Response {
    let message = Value::Object(message);
    // A stdio server starts here, one process for the session this initialize opens.
    let mut headers = headers.clone();
    let held = url.stdio.is_some() || url.transport == Some(McpTransport::Sse);
    if held && message.get("method").and_then(Value::as_str) != Some("initialize") {
        // server/discover (2026-07-28) needs no session, and these servers live in one: the
        // client falls back to initialize.
        return rpc_error(
            StatusCode::OK,
            message["id"].clone(),
            codes::METHOD_NOT_FOUND,
            format!("upstream {upstream:?} needs a session: open one with initialize"),
            None,
        );
    }
    if let (Some(stream), Some(McpTransport::Sse)) = (&url.url, url.transport) {
        let credential = match gateway.credential(&holder.agent, upstream).await {
            Ok(credential) => credential,
            Err(e) => return SendError::NotSent(e).answer(message["id"].clone()),
        };
        let opened = gateway
            .streams
            .open(
                &gateway.http,
                &holder.agent,
                upstream,
                stream,
                credential,
                gateway.upstream_limit,
            )
            .await;
        match opened {
            Ok(session) => {
                if let Ok(value) = HeaderValue::from_str(&session) {
                    headers.insert(SESSION_HEADER, value);
                }
            }
            Err(StdioError::Limit(n)) => {
                let refusal = Refusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    RefusalCode::SessionLimit,
                    format!(
                        "agent {} holds {n} sessions of HTTP+SSE servers already, the most it \
                         may: end one (DELETE) or let one go idle",
                        holder.agent
                    ),
                );
                return refuse_with(gateway, holder, upstream, message["id"].clone(), refusal)
                    .await;
            }
            Err(StdioError::NotSent(why) | StdioError::Unanswered(why)) => {
                return SendError::NotSent(why).answer(message["id"].clone());
            }
            Err(StdioError::UnknownSession) => {
                return SendError::NotSent(format!("upstream {upstream:?}: no session"))
                    .answer(message["id"].clone());
            }
        }
    }
    if let Some(server) = &url.stdio {
        let credential = match gateway.credential(&holder.agent, upstream).await {
            Ok(credential) => credential.map(|(_, value)| value),
            Err(e) => return SendError::NotSent(e).answer(message["id"].clone()),
        };
        let started = gateway.stdio.start(
            &holder.agent,
            upstream,
            server,
            credential,
            gateway.upstream_limit,
        );
        let session = match started {
            Ok(session) => session,
            Err(StdioError::Limit(n)) => {
                let refusal = Refusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    RefusalCode::SessionLimit,
                    format!(
                        "agent {} holds {n} stdio server sessions already, the most it may: end \
                         one (DELETE) or let one go idle",
                        holder.agent
                    ),
                );
                return refuse_with(gateway, holder, upstream, message["id"].clone(), refusal)
                    .await;
            }
            Err(e) => return SendError::NotSent(format!("{e:?}")).answer(message["id"].clone()),
        };
        // Hex: always a valid header value.
        if let Ok(value) = HeaderValue::from_str(&session) {
            headers.insert(SESSION_HEADER, value);
        }
    }
    let (body, session) = match send(gateway, holder, url, upstream, &headers, &message, None).await
    {
        Ok(ok) => ok,
        Err(e) => {
            if held && let Some(session) = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok())
            {
                gateway.stdio.end(session, &holder.agent, upstream);
                gateway.streams.end(session, &holder.agent, upstream);
            }
            return e.answer(message["id"].clone());
        }
    };
    let mut body = body.unwrap_or(Value::Null);
    if let Some(capabilities) = body
        .pointer_mut("/result/capabilities")
        .and_then(Value::as_object_mut)
    {
        let tools = capabilities.contains_key("tools");
        capabilities.clear();
        if tools {
            capabilities.insert("tools".to_owned(), json!({}));
        }
    }
    answer(StatusCode::OK, Some(body), session)
}

async fn list_tools(
    gateway: &Gateway,
    holder: &Caller,
    url: &McpUpstream,
    upstream: &str,
    headers: &HeaderMap,
    message: Map<String, Value>,
) -> Response {
    let message = Value::Object(message);
    let (body, session) = match send(gateway, holder, url, upstream, headers, &message, None).await
    {
        Ok(ok) => ok,
        Err(e) => return e.answer(message["id"].clone()),
    };
    let policy = gateway
        .policies
        .agent(&holder.agent)
        .and_then(|a| a.policy.as_ref().ok().cloned());
    let mut body = body.unwrap_or(Value::Null);
    if let Some(tools) = body
        .pointer_mut("/result/tools")
        .and_then(Value::as_array_mut)
    {
        tools.retain(|tool| {
            let Some(name) = tool.get("name").and_then(Value::as_str) else {
                return false;
            };
            policy
                .as_ref()
                .is_some_and(|p| p.serves_through(name, upstream))
        });
        for tool in tools.iter_mut() {
            let fields = tool
                .get("name")
                .and_then(Value::as_str)
                .and_then(|name| policy.as_ref()?.result_fields(name));
            if let (Some(fields), Some(schema)) = (fields, tool.get_mut("outputSchema")) {
                cut_output_schema(schema, fields);
            }
        }
    }
    answer(StatusCode::OK, Some(body), session)
}

/// Cuts an MCP `tools/call` result to `fields`, whatever its shape, in place; returns the
/// removed field names. With `structuredContent` that is cut, and the text content becomes the
/// cut JSON; without it, the content must be one text block holding one JSON value, which is cut
/// the same way. Anything else (prose, several blocks, images, resources) cannot be cut field by
/// field, so it is an error and the caller withholds the result: a field the policy hides never
/// reaches the agent because its server answered in another shape.
pub fn cut_result(result: &mut Value, fields: &[String]) -> Result<Vec<String>, String> {
    let restriction = || {
        format!(
            "the tool's policy lets the agent see only {}",
            fields.join(", ")
        )
    };
    let Value::Object(result) = result else {
        return Err(format!(
            "{}, and the result is not an object",
            restriction()
        ));
    };
    let visible = match result.get("structuredContent") {
        Some(structured) => {
            let (visible, removed) = tollgate_engine::redact(structured, fields);
            result.insert("structuredContent".into(), visible.clone());
            (visible, removed)
        }
        None => {
            let text = match result
                .get("content")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
            {
                Some([block]) if block.get("type").and_then(Value::as_str) == Some("text") => {
                    block.get("text").and_then(Value::as_str)
                }
                Some([]) | None => {
                    return Ok(Vec::new());
                }
                Some(_) => None,
            };
            let Some(parsed) = text.and_then(|t| serde_json::from_str::<Value>(t).ok()) else {
                return Err(format!(
                    "{}, and its server answered without structuredContent and not with one JSON \
                     text block, so the result cannot be cut field by field",
                    restriction()
                ));
            };
            if !(parsed.is_object() || parsed.is_array()) {
                return Err(format!(
                    "{}, and its server answered a JSON {} rather than an object",
                    restriction(),
                    if parsed.is_string() {
                        "string"
                    } else {
                        "scalar"
                    }
                ));
            }
            tollgate_engine::redact(&parsed, fields)
        }
    };
    let (visible, removed) = visible;
    result.insert(
        "content".into(),
        json!([{"type": "text", "text": visible.to_string()}]),
    );
    Ok(removed)
}

/// A tool's `outputSchema` as the agent may see it: only the properties of `fields`, and only
/// they required, so a client that checks results against the schema accepts the cut ones.
pub fn cut_output_schema(schema: &mut Value, fields: &[String]) {
    let keep = |name: &str| fields.iter().any(|f| f == name);
    if let Some(Value::Object(properties)) = schema.get_mut("properties") {
        properties.retain(|name, _| keep(name));
    }
    if let Some(Value::Array(required)) = schema.get_mut("required") {
        required.retain(|name| name.as_str().is_some_and(keep));
    }
}

fn accepts_events(headers: &HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

/// Aborts the call when the client goes away, as a dropped handler would.
struct AbortOnDrop(tokio::task::JoinHandle<Response>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The report of a forwarded call, written when its handler is dropped before the upstream
/// answered (the client went away): the outcome is "aborted by client", and the call may have
/// run, so it is not marked as not run.
struct Unfinished {
    audit: tollgate_audit::AuditLog,
    entry: Option<Entry>,
    started: Instant,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        let Some(mut entry) = self.entry.take() else {
            return;
        };
        entry.latency_us = Some(self.started.elapsed().as_micros() as u64);
        entry.error = Some(
            "aborted by client: the client went away before the upstream answered; the call may \
             have run"
                .to_owned(),
        );
        let audit = self.audit.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(e) = audit.append(entry).await {
                        tracing::error!(error = %e, "could not record an MCP call its client abandoned");
                    }
                });
            }
            Err(_) => tracing::error!(
                "an MCP call its client abandoned could not be recorded: no runtime"
            ),
        }
    }
}

/// `tools/call` for a client that accepts SSE: a call answered within [`Gateway::keep_alive`]
/// gets its plain JSON answer (one write, no stream); a longer one (waiting for approval, or a
/// slow upstream) becomes an SSE stream of keep-alive comments, then its JSON-RPC response as
/// one `message` event.
async fn call_tool_streaming(
    gateway: Arc<Gateway>,
    holder: Caller,
    url: McpUpstream,
    upstream: String,
    headers: HeaderMap,
    message: Map<String, Value>,
    started: Instant,
) -> Response {
    use futures::StreamExt;
    let id = message.get("id").cloned().unwrap_or(Value::Null);
    let every = gateway.keep_alive;
    // The answer holds at most the upstream's (cut) and its framing.
    let limit = gateway.upstream_limit.saturating_mul(2).max(MAX_BODY);
    let (relay, mut relayed) = tokio::sync::mpsc::channel(64);
    let mut pending = Box::pin(async move {
        let route = Route {
            gateway: &gateway,
            holder: &holder,
            url: &url,
            upstream: &upstream,
            headers: &headers,
        };
        call_tool(route, message, started, Some(&relay)).await
    });
    // The quick path polls the call here (no task, one write); only a call still running after
    // the first interval, or whose server reports progress first, moves, as it is, into a task
    // that the stream waits on.
    let first = tokio::select! {
        finished = &mut pending => return finished,
        () = tokio::time::sleep(every) => None,
        Some(event) = relayed.recv() => Some(event),
    };
    let call = AbortOnDrop(tokio::spawn(pending));
    // Still waiting: stream, starting with what the server said or a keep-alive now.
    let mut ticks = tokio::time::interval(every);
    if first.is_some() {
        ticks.reset();
    }
    let first = first.map(|event| event_data(&event));
    let stream = futures::stream::unfold(Some((call, ticks, relayed, first)), move |state| {
        let id = id.clone();
        async move {
            let (mut call, mut ticks, mut relayed, first) = state?;
            if let Some(first) = first {
                return Some((first, Some((call, ticks, relayed, None))));
            }
            tokio::select! {
                biased;
                Some(event) = relayed.recv() => {
                    Some((event_data(&event), Some((call, ticks, relayed, None))))
                }
                finished = &mut call.0 => {
                    let event = match finished {
                        Ok(response) => event_of(response, id, limit).await,
                        Err(_) => event_data(&json!({"jsonrpc": "2.0", "id": id,
                            "error": {"code": codes::UPSTREAM, "message": "the call was cut short"}})),
                    };
                    Some((event, None))
                }
                _ = ticks.tick() => Some((": keep-alive\n\n".to_owned(), Some((call, ticks, relayed, None)))),
            }
        }
    });
    let mut response =
        Body::from_stream(stream.map(Ok::<_, std::convert::Infallible>)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    response
}

fn event_data(message: &Value) -> String {
    format!("event: message\ndata: {message}\n\n")
}

/// The JSON-RPC answer a finished call gave, as an SSE event; a refusal that is not JSON-RPC
/// (the audit trail unavailable) becomes a JSON-RPC error that carries it. The answer is read
/// up to `limit` bytes: what the gateway itself built from an upstream answer it read up to
/// [`Gateway::with_upstream_limit`], so a large result is passed on whole (it was cut at the
/// request body limit, 1 MiB, before).
async fn event_of(response: Response, id: Value, limit: usize) -> String {
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), limit)
        .await
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if body.get("jsonrpc").is_some() {
        return event_data(&body);
    }
    event_data(&json!({"jsonrpc": "2.0", "id": id, "error": {
        "code": codes::UPSTREAM,
        "message": format!("Tollgate could not complete the call ({status})"),
        "data": body,
    }}))
}

/// Where one agent's request goes, and how it came.
#[derive(Clone, Copy)]
struct Route<'a> {
    gateway: &'a Gateway,
    holder: &'a Caller,
    url: &'a McpUpstream,
    upstream: &'a str,
    headers: &'a HeaderMap,
}

async fn call_tool(
    route: Route<'_>,
    message: Map<String, Value>,
    started: Instant,
    relay: Option<&Relay>,
) -> Response {
    let Route {
        gateway,
        holder,
        url,
        upstream,
        headers,
    } = route;
    let id = message["id"].clone();
    let params = message.get("params").cloned().unwrap_or_else(|| json!({}));
    let modern = modern_protocol(headers, &params);
    let checked = (|| {
        let Some(Value::String(tool)) = params.get("name") else {
            return Err("tools/call needs params.name, a string".to_owned());
        };
        let arguments = match params.get("arguments") {
            None => json!({}),
            Some(Value::Object(a)) => Value::Object(a.clone()),
            Some(_) => return Err("params.arguments must be an object".to_owned()),
        };
        Ok((tool.clone(), arguments, run_of(headers)?))
    })();
    let (tool, arguments, run) = match checked {
        Ok(checked) => checked,
        Err(problem) => {
            return refuse(
                gateway,
                Some(holder),
                upstream,
                StatusCode::OK,
                id,
                codes::INVALID_PARAMS,
                problem,
            )
            .await;
        }
    };
    let tool = &tool;
    // A tool of the policy that another upstream serves is refused before any decision: the
    // call never runs, so nothing is charged or counted toward the tool's track record.
    if let Some(agent) = gateway.policies.agent(&holder.agent)
        && let Ok(policy) = &agent.policy
        && let Some(served_by) = policy.upstream_of(tool)
        && served_by != upstream
    {
        let message = format!(
            "tool {tool:?} is served by upstream {served_by:?}, not {upstream:?}: call it at /mcp/{served_by}"
        );
        if let Err(refusal) = gateway
            .reject(Some(holder), upstream, message.clone())
            .await
        {
            return rpc_refusal(id, &refusal);
        }
        return refused_call(
            id,
            modern,
            &message,
            json!({"decision": "deny", "code": "ToolNotAllowed", "message": message}),
        );
    }
    let decided = match gateway
        .decide_call(holder, &run, tool, &arguments, started)
        .await
    {
        Ok(decided) => decided,
        Err(refusal) => return rpc_refusal(id, &refusal),
    };
    let decided = match gateway
        .await_approval(holder, &run, tool, &arguments, decided)
        .await
    {
        Ok(decided) => decided,
        Err(refusal) => return rpc_refusal(id, &refusal),
    };
    let policy = decided.policy.clone();
    if !decided.decision.is_allowed() {
        let mut data = serde_json::to_value(&decided.decision).expect("a decision serialises");
        data["audit"] = json!({"chain": decided.audit.chain.as_ref(), "seq": decided.audit.seq});
        let message = match &decided.decision {
            Decision::Deny { message, .. } | Decision::Halt { message, .. } => message.clone(),
            Decision::RequireApproval { approval, .. } => {
                format!("the call waits for approval: {}", approval.reason)
            }
            Decision::Allow { .. } => String::new(),
        };
        return refused_call(id, modern, &message, data);
    }

    // Forward exactly what was decided: the checked name and arguments, nothing else from the
    // client's params except the request's _meta.
    let mut forwarded = json!({
        "jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": tool, "arguments": arguments}
    });
    if let Some(meta) = params.get("_meta") {
        forwarded["params"]["_meta"] = meta.clone();
    }
    // The proxy reports this step itself: an agent cannot report another result for it.
    if let Some(step) = decided.step {
        gateway.take_report(&holder.agent, &run, step);
    }
    let mut report = Entry::new((gateway.now)(), Event::Report, identity_of(Some(holder)));
    report.agent = Some(holder.agent.clone());
    report.run = Some(run);
    report.step = decided.step;
    report.tool = Some(tool.clone());
    // If the client goes away while the upstream works, this handler is dropped here: the guard
    // records the call's outcome as aborted, so no allowed call is left without one.
    let mut unfinished = Unfinished {
        audit: gateway.audit.clone(),
        entry: Some(report),
        started,
    };
    let outcome = send(gateway, holder, url, upstream, headers, &forwarded, relay).await;
    let mut entry = unfinished.entry.take().expect("taken only here");
    entry.time = (gateway.now)();
    entry.latency_us = Some(started.elapsed().as_micros() as u64);
    let response = match outcome {
        Ok((Some(mut body), session)) => {
            if let Some(result) = body.get("result") {
                entry.set_result(&gateway.redactor, result);
            }
            if let Some(error) = body.get("error") {
                // The server refused the call (a JSON-RPC error, not a tool's own error result).
                entry.error = Some(error.to_string());
                entry.not_run = true;
            }
            if let Some(fields) = policy.as_ref().and_then(|p| p.result_fields(tool))
                && let Some(result) = body.get_mut("result")
            {
                match cut_result(result, fields) {
                    Ok(_) => {}
                    Err(why) => {
                        entry.error = Some(format!("result withheld from the agent: {why}"));
                        *result = json!({"isError": true, "content": [{"type": "text", "text":
                            format!("Tollgate withheld the result of {tool}: {why}")}]});
                    }
                }
            }
            answer(StatusCode::OK, Some(body), session)
        }
        Ok((None, session)) => answer(StatusCode::ACCEPTED, None, session),
        Err(e) => {
            entry.error = Some(e.to_string());
            // What never reached the upstream did not run; an answer that could not be used may
            // come from a call that did.
            entry.not_run = !e.ran();
            e.answer(forwarded["id"].clone())
        }
    };
    if let Err(e) = gateway.audit.append(entry).await {
        return rpc_refusal(forwarded["id"].clone(), &audit_unavailable(e));
    }
    response
}
