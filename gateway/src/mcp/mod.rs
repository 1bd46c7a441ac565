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
//! - A request the server makes of the client during a call (elicitation, sampling, roots)
//!   reaches a client that takes the call's stream when the upstream's policy names it
//!   (`mcp.serverRequests`), and the client's answer goes back; both are recorded ([`asks`]).
//!
//! A `tools/call` from a client that accepts `text/event-stream` is answered as an SSE stream: `: keep-alive` comments while the call waits (for approval, or for the upstream),
//! then one `message` event with the JSON-RPC response, so proxies with idle timeouts do not cut
//! a call that waits for people.
//!
//! Everything else is refused without reaching the upstream: batches (removed from MCP in
//! 2025-06-18, and a way to slip a second call behind a first), methods the gateway does not
//! serve, responses that answer no request a server made, routing headers (2026-07-28) that
//! disagree with the body, and anything malformed. Method names match exactly, so `Tools/Call` or
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

mod asks;
mod call;
mod content;
mod headers;
mod oauth;
mod session;
mod upstream;

pub(crate) use asks::{Asks, answer as answer_server, is_answer};
use call::*;
pub use call::{cut_output_schema, cut_result};
use headers::*;
pub(crate) use headers::{check_routing, modern_protocol};
pub(crate) use oauth::resource_metadata;
use oauth::*;
pub(crate) use session::{end_session, listen};
use upstream::*;
pub(crate) use upstream::{RELAYED, Relay, event_end};

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
    /// The policy refused a resource read or a prompt (`data` is the decision: its code, rule
    /// and message). Tool calls are refused as tool results instead.
    pub const CONTENT_REFUSED: i64 = -31003;
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
        // The code is not kept apart here: the reason is in words.
        self.metrics
            .refusals
            .with_label_values(&["mcp", "Rejected"])
            .inc();
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
    if is_answer(&message) {
        // The client answers a request its server made during a call (elicitation, sampling).
        let session = headers.get(SESSION_HEADER);
        return answer_server(
            &gateway,
            &holder,
            &upstream,
            &headers,
            message,
            |at, asked| at == upstream && asked == session,
        )
        .await;
    }
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
        ("resources/list" | "resources/templates/list" | "prompts/list", true) => {
            content::list(&gateway, &holder, &url, &upstream, &headers, message).await
        }
        ("completion/complete", true) => {
            content::complete(&gateway, &holder, &url, &upstream, &headers, message).await
        }
        // The server's log level for this session: harmless, and its messages still pass only
        // as notifications the proxy relays.
        ("logging/setLevel", true) => forward(
            &gateway,
            &holder,
            &url,
            &upstream,
            &headers,
            &Value::Object(message),
        )
        .await
        .unwrap_or_else(|e| e),
        (
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" | "prompts/get",
            true,
        ) => {
            content::get(
                &gateway, &holder, &url, &upstream, &headers, message, started,
            )
            .await
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
            "a JSON-RPC message without a method must be a response, with a result or an error"
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

/// The caller's compiled policy, or None without a usable one.
fn policy_of(gateway: &Gateway, holder: &Caller) -> Option<Arc<tollgate_engine::CompiledPolicy>> {
    gateway
        .policies
        .agent(&holder.agent)
        .and_then(|agent| agent.policy.as_ref().ok().cloned())
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
        let policy = policy_of(gateway, holder);
        let offers = |kind: &str| {
            capabilities.contains_key(kind)
                && policy.as_ref().is_some_and(|p| match kind {
                    "resources" => p.offers_resources(upstream),
                    "prompts" => p.offers_prompts(upstream),
                    "completions" => p.offers_prompts(upstream) || p.offers_resources(upstream),
                    _ => true,
                })
        };
        let served: Vec<&str> = ["tools", "resources", "prompts", "completions", "logging"]
            .into_iter()
            .filter(|kind| offers(kind))
            .collect();
        // Subscriptions are served where the server takes them (decided as reads).
        let subscribe = capabilities
            .get("resources")
            .and_then(|r| r.get("subscribe"))
            .and_then(Value::as_bool)
            == Some(true);
        capabilities.clear();
        for kind in served {
            let offered = if kind == "resources" && subscribe {
                json!({"subscribe": true})
            } else {
                json!({})
            };
            capabilities.insert(kind.to_owned(), offered);
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
    let policy = policy_of(gateway, holder);
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

fn accepts_events(headers: &HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}
