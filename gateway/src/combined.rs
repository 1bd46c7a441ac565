//! `/mcp`: one MCP endpoint for every MCP upstream of the agent's policy, for clients that take
//! one server. Resources keep their URIs (a read goes to the upstream the policy lets the agent
//! read it from); tool and prompt names carry their upstream, `<upstream>__<tool>` (a name an OpenAI-style
//! function may have; the separator is the gateway's `--mcp-tool-separator`), and each request
//! goes, renamed, through the upstream's own path (`/mcp/<upstream>`): decided, recorded and cut
//! exactly as there. A name is split at the upstream it starts with, never at the first
//! separator, so upstream names may hold the separator's characters.
//!
//! A session here is the gateway's own: `initialize` opens one session at each upstream and
//! answers with an id that names them all; every later request finds its upstream's session
//! through it. A call's run is the client's `Tollgate-Run-Id`, else this session, so one run
//! spans every upstream it calls. At most [`PER_AGENT`] sessions per agent; one without a
//! request for [`IDLE`] is forgotten (its upstream sessions end as theirs do).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::mcp::{self, SESSION_HEADER, codes};
use crate::{Gateway, MAX_BODY, RUN_HEADER, Refusal, RefusalCode};

/// Between an upstream's name and its tool's in a tool name at `/mcp`, unless the gateway is
/// given another ([`check_separator`]).
pub const SEPARATOR: &str = "__";

/// Whether `separator` may stand between an upstream's name and a tool's at `/mcp`: one to eight
/// of `_`, `-`, `.` and `:` (so a prefixed name stays a valid MCP tool name; clients whose
/// function names allow only `[A-Za-z0-9_-]`, as OpenAI's, need `_` or `-`).
pub fn check_separator(separator: &str) -> Result<(), String> {
    if separator.is_empty() || separator.len() > 8 {
        return Err(format!(
            "the tool separator {separator:?} must be 1 to 8 characters long"
        ));
    }
    if let Some(c) = separator
        .chars()
        .find(|c| !matches!(c, '_' | '-' | '.' | ':'))
    {
        return Err(format!(
            "the tool separator {separator:?} may hold only '_', '-', '.' and ':', not {c:?}"
        ));
    }
    Ok(())
}

/// The upstream of `sessions` a tool name at `/mcp` starts with (the longest, when one upstream's
/// name begins another's), and the tool's own name after the separator.
fn split_name<'a, V>(
    name: &'a str,
    separator: &str,
    sessions: &'a BTreeMap<String, V>,
) -> Option<(&'a str, &'a str)> {
    sessions
        .keys()
        .filter_map(|upstream| {
            let tool = name
                .strip_prefix(upstream.as_str())?
                .strip_prefix(separator)?;
            (!tool.is_empty()).then_some((upstream.as_str(), tool))
        })
        .max_by_key(|(upstream, _)| upstream.len())
}
/// How many sessions at `/mcp` one agent may hold.
pub const PER_AGENT: usize = 8;
/// How long a session at `/mcp` lives without a request.
pub const IDLE: Duration = Duration::from_secs(600);

/// One client's session at `/mcp`: its session at each upstream.
#[derive(Debug)]
struct Combined {
    agent: String,
    upstreams: BTreeMap<String, Option<HeaderValue>>,
    last_used: Instant,
}

/// The sessions at `/mcp`, by id.
#[derive(Debug, Default)]
pub(crate) struct CombinedSessions(Mutex<HashMap<String, Combined>>);

impl CombinedSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Combined>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The upstream sessions of `agent`'s session `id`, if it has it.
fn sessions_of(
    gateway: &Gateway,
    agent: &str,
    id: &str,
) -> Option<BTreeMap<String, Option<HeaderValue>>> {
    let mut sessions = gateway.combined.lock();
    let combined = sessions.get_mut(id).filter(|c| c.agent == agent)?;
    combined.last_used = Instant::now();
    Some(combined.upstreams.clone())
}

/// A request to `/mcp/<upstream>` as this gateway would take it, with `headers` for that
/// upstream's session; its answer as JSON (a JSON answer is asked for).
async fn through(
    gateway: &Arc<Gateway>,
    upstream: &str,
    headers: &HeaderMap,
    message: &Value,
) -> (StatusCode, Option<HeaderValue>, Value) {
    let mut headers = headers.clone();
    headers.insert(
        axum::http::header::ACCEPT,
        HeaderValue::from_static("application/json"),
    );
    let response = mcp::proxy(
        State(gateway.clone()),
        Path(upstream.to_owned()),
        headers,
        Body::from(message.to_string()),
    )
    .await;
    let status = response.status();
    let session = response.headers().get(SESSION_HEADER).cloned();
    let limit = gateway.upstream_limit.saturating_mul(2).max(MAX_BODY);
    let bytes = axum::body::to_bytes(response.into_body(), limit)
        .await
        .unwrap_or_default();
    (
        status,
        session,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// `headers` for `upstream`'s session `session`, the run named by the client or else `id`.
fn for_upstream(headers: &HeaderMap, session: Option<&HeaderValue>, id: &str) -> HeaderMap {
    let mut headers = headers.clone();
    headers.remove(SESSION_HEADER);
    if let Some(session) = session {
        headers.insert(SESSION_HEADER, session.clone());
    }
    if !headers.contains_key(RUN_HEADER)
        && let Ok(run) = HeaderValue::from_str(id)
    {
        headers.insert(RUN_HEADER, run);
    }
    headers
}

fn with_session(mut response: Response, id: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(id) {
        response.headers_mut().insert(SESSION_HEADER, value);
    } else {
        response.headers_mut().remove(SESSION_HEADER);
    }
    response
}

fn ok(id: Value, result: Value) -> Response {
    (
        StatusCode::OK,
        axum::Json(json!({"jsonrpc": "2.0", "id": id, "result": result})),
    )
        .into_response()
}

/// `POST /mcp`.
pub(crate) async fn proxy(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let holder = match mcp::authenticated(&gateway, &headers, "").await {
        Ok(holder) => holder,
        Err(response) => return response,
    };
    let refuse = async |id: Value, status: StatusCode, code: i64, problem: String| {
        if let Err(refusal) = gateway.reject(Some(&holder), "", problem.clone()).await {
            return mcp::rpc_refusal(id, &refusal);
        }
        mcp::rpc_error(status, id, code, problem, None)
    };
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
        return refuse(
            Value::Null,
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::INVALID_REQUEST,
            format!("the request body exceeds {MAX_BODY} bytes"),
        )
        .await;
    };
    let message: Map<String, Value> = match tollgate_engine::canonical::parse_strict(&bytes) {
        Ok(Value::Object(message)) => message,
        Ok(_) => {
            return refuse(
                Value::Null,
                StatusCode::BAD_REQUEST,
                codes::INVALID_REQUEST,
                "one JSON-RPC message, an object, per request".to_owned(),
            )
            .await;
        }
        Err(e) => {
            return refuse(
                Value::Null,
                StatusCode::BAD_REQUEST,
                codes::PARSE_ERROR,
                format!("the body is not valid JSON: {e}"),
            )
            .await;
        }
    };
    if mcp::is_answer(&message) {
        // The client answers a request one of the session's servers made during a call.
        let sessions = headers
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|session| sessions_of(&gateway, &holder.agent, session))
            .unwrap_or_default();
        return mcp::answer_server(&gateway, &holder, "", &headers, message, |at, asked| {
            sessions.get(at).is_some_and(|held| held.as_ref() == asked)
        })
        .await;
    }
    let id = message.get("id").cloned().unwrap_or(Value::Null);
    let method = match mcp::check_shape(&message) {
        Ok(method) => method,
        Err(problem) => {
            return refuse(id, StatusCode::BAD_REQUEST, codes::INVALID_REQUEST, problem).await;
        }
    };
    if let Err(problem) = mcp::check_routing(&headers, &message, &method) {
        return refuse(id, StatusCode::BAD_REQUEST, codes::HEADER_MISMATCH, problem).await;
    }
    let message = Value::Object(message);
    let upstreams: Vec<String> = gateway
        .policies
        .agent(&holder.agent)
        .map(|agent| agent.upstreams.keys().cloned().collect())
        .unwrap_or_default();

    if method == "initialize" {
        return initialize(&gateway, &holder, &headers, &message, &upstreams).await;
    }
    if method == "server/discover" {
        return refuse(
            id,
            StatusCode::OK,
            codes::METHOD_NOT_FOUND,
            "/mcp holds a session at each upstream: open one with initialize".to_owned(),
        )
        .await;
    }
    let Some(session) = headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        return mcp::rpc_error(
            StatusCode::NOT_FOUND,
            id,
            codes::INVALID_REQUEST,
            "/mcp needs a session: open one with initialize".to_owned(),
            None,
        );
    };
    let Some(sessions) = sessions_of(&gateway, &holder.agent, &session) else {
        return mcp::rpc_error(
            StatusCode::NOT_FOUND,
            id,
            codes::INVALID_REQUEST,
            format!("no session {session:?} of this agent at /mcp: start a new one"),
            None,
        );
    };
    match method.as_str() {
        "ping" => ok(id, json!({})),
        "notifications/initialized" | "notifications/cancelled" => {
            for (upstream, upstream_session) in &sessions {
                let headers = for_upstream(&headers, upstream_session.as_ref(), &session);
                through(&gateway, upstream, &headers, &message).await;
            }
            StatusCode::ACCEPTED.into_response()
        }
        "tools/call" => {
            let name = message
                .pointer("/params/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let target = split_name(&name, &gateway.tool_separator, &sessions);
            let Some((upstream, tool)) = target else {
                let problem = no_upstream("tool", &name, &gateway.tool_separator, &upstreams);
                if let Err(refusal) = gateway.reject(Some(&holder), "", problem.clone()).await {
                    return mcp::rpc_refusal(id, &refusal);
                }
                let modern =
                    mcp::modern_protocol(&headers, message.get("params").unwrap_or(&Value::Null));
                return mcp::refused_call(
                    id,
                    modern,
                    &problem,
                    json!({"decision": "deny", "code": "ToolNotAllowed", "message": problem}),
                );
            };
            let mut forwarded = message.clone();
            forwarded["params"]["name"] = json!(tool);
            let headers = for_upstream(&headers, sessions[upstream].as_ref(), &session);
            renamed(
                &gateway,
                upstream,
                headers,
                &forwarded,
                Some(tool),
                &session,
            )
            .await
        }
        "tools/list" | "resources/list" | "resources/templates/list" | "prompts/list" => {
            // Every upstream's list as its own path cuts it: tools and prompts renamed
            // <upstream><separator><name>, resources under their own URIs (a URI names its
            // server already).
            let key = match method.as_str() {
                "tools/list" => "tools",
                "resources/list" => "resources",
                "resources/templates/list" => "resourceTemplates",
                _ => "prompts",
            };
            let mut items = Vec::new();
            for (upstream, upstream_session) in &sessions {
                let headers = for_upstream(&headers, upstream_session.as_ref(), &session);
                let (status, _, body) = through(&gateway, upstream, &headers, &message).await;
                if !status.is_success() || body.get("error").is_some() {
                    return with_session(
                        (status, axum::Json(name_upstream(body, upstream))).into_response(),
                        &session,
                    );
                }
                let listed = body.pointer(&format!("/result/{key}"));
                for mut item in listed
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
                {
                    if key == "tools" || key == "prompts" {
                        let Some(name) = item.get("name").and_then(Value::as_str) else {
                            continue;
                        };
                        item["name"] = json!(format!("{upstream}{}{name}", gateway.tool_separator));
                    }
                    items.push(item);
                }
            }
            with_session(ok(id, json!({key: items})), &session)
        }
        "prompts/get" | "completion/complete" => {
            // A prompt (to get, or to complete an argument of) names its upstream as a tool
            // does; a resource template to complete goes where a read of it would.
            let field = if method == "prompts/get" {
                "/params/name"
            } else {
                "/params/ref/name"
            };
            let by_uri = method == "completion/complete"
                && message.pointer("/params/ref/type").and_then(Value::as_str)
                    == Some("ref/resource");
            let (upstream, forwarded, name) = if by_uri {
                let uri = message
                    .pointer("/params/ref/uri")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                (
                    reader_of(&gateway, &holder, &sessions, uri),
                    message.clone(),
                    None,
                )
            } else {
                let name = message
                    .pointer(field)
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let Some((upstream, prompt)) = split_name(name, &gateway.tool_separator, &sessions)
                else {
                    let problem = no_upstream("prompt", name, &gateway.tool_separator, &upstreams);
                    if let Err(refusal) = gateway.reject(Some(&holder), "", problem.clone()).await {
                        return mcp::rpc_refusal(id, &refusal);
                    }
                    let decision = json!({"decision": "deny", "code": "ContentNotAllowed",
                        "message": problem});
                    return mcp::rpc_error(
                        StatusCode::OK,
                        id,
                        codes::CONTENT_REFUSED,
                        problem,
                        Some(decision),
                    );
                };
                let mut forwarded = message.clone();
                if let Some(slot) = forwarded.pointer_mut(field) {
                    *slot = json!(prompt);
                }
                (upstream.to_owned(), forwarded, Some(prompt.to_owned()))
            };
            let headers = for_upstream(&headers, sessions[&upstream].as_ref(), &session);
            renamed(
                &gateway,
                &upstream,
                headers,
                &forwarded,
                name.as_deref(),
                &session,
            )
            .await
        }
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
            let uri = message
                .pointer("/params/uri")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let upstream = reader_of(&gateway, &holder, &sessions, uri);
            let headers = for_upstream(&headers, sessions[&upstream].as_ref(), &session);
            renamed(&gateway, &upstream, headers, &message, None, &session).await
        }
        other => {
            refuse(
                id,
                StatusCode::OK,
                codes::METHOD_NOT_FOUND,
                format!("method {other:?} is not allowed through Tollgate's gateway"),
            )
            .await
        }
    }
}

/// `forwarded` through `upstream`'s own path, `name` (a tool's or prompt's own name, its upstream
/// taken off) in the 2026 `Mcp-Name` header where the client sent one; streamed or not, as the
/// client asked, the answer passes as it is.
async fn renamed(
    gateway: &Arc<Gateway>,
    upstream: &str,
    mut headers: HeaderMap,
    forwarded: &Value,
    name: Option<&str>,
    session: &str,
) -> Response {
    if let Some(name) = name
        && headers.contains_key(mcp::NAME_HEADER)
        && let Ok(value) = HeaderValue::from_str(name)
    {
        headers.insert(mcp::NAME_HEADER, value);
    }
    let response = mcp::proxy(
        State(gateway.clone()),
        Path(upstream.to_owned()),
        headers,
        Body::from(forwarded.to_string()),
    )
    .await;
    with_session(response, session)
}

/// Why a tool or prompt name at `/mcp` is refused when it starts with no upstream of the session.
fn no_upstream(what: &str, name: &str, separator: &str, upstreams: &[String]) -> String {
    format!(
        "{what} {name:?} names no upstream of this session: {what}s at /mcp are \
         <upstream>{separator}<{what}>, of {}",
        upstreams.join(", ")
    )
}

/// The upstream a read of `uri` goes to: the first the policy lets the agent read it (or complete
/// its template) from; when none does, the first, whose own path refuses it and records why.
fn reader_of<V>(
    gateway: &Gateway,
    holder: &crate::Caller,
    sessions: &BTreeMap<String, V>,
    uri: &str,
) -> String {
    let policy = gateway
        .policies
        .agent(&holder.agent)
        .and_then(|agent| agent.policy.as_ref().ok().cloned());
    sessions
        .keys()
        .find(|u| {
            policy
                .as_ref()
                .is_some_and(|p| p.reads_resource(u, uri).is_some() || p.serves_template(u, uri))
        })
        .or_else(|| sessions.keys().next())
        .cloned()
        .unwrap_or_default()
}

/// An upstream's error answer, its message naming the upstream.
fn name_upstream(mut body: Value, upstream: &str) -> Value {
    if let Some(message) = body.pointer_mut("/error/message")
        && let Some(text) = message.as_str()
    {
        *message = json!(format!("upstream {upstream:?}: {text}"));
    }
    body
}

async fn initialize(
    gateway: &Arc<Gateway>,
    holder: &crate::Caller,
    headers: &HeaderMap,
    message: &Value,
    upstreams: &[String],
) -> Response {
    let id = message.get("id").cloned().unwrap_or(Value::Null);
    let full = {
        let mut sessions = gateway.combined.lock();
        sessions.retain(|_, c| c.last_used.elapsed() <= IDLE);
        sessions
            .values()
            .filter(|c| c.agent == holder.agent)
            .count()
            >= PER_AGENT
    };
    if full {
        return session_limit(gateway, holder, id).await;
    }
    let mut opened = BTreeMap::new();
    let mut version = None;
    let mut clean = headers.clone();
    clean.remove(SESSION_HEADER);
    for upstream in upstreams {
        let (status, session, body) = through(gateway, upstream, &clean, message).await;
        if !status.is_success() || body.get("result").is_none() {
            // One upstream failed: end the others' sessions, and say which.
            end_all(gateway, headers, &opened).await;
            return (status, axum::Json(name_upstream(body, upstream))).into_response();
        }
        version = version.or_else(|| body.pointer("/result/protocolVersion").cloned());
        opened.insert(upstream.clone(), session);
    }
    let Ok(session) = crate::stdio::session_id() else {
        end_all(gateway, headers, &opened).await;
        return mcp::rpc_error(
            StatusCode::SERVICE_UNAVAILABLE,
            id,
            codes::UPSTREAM,
            "no randomness for a session id".to_owned(),
            None,
        );
    };
    // Counted again under the lock: concurrent initializes cannot pass the bound together.
    let refused = {
        let mut sessions = gateway.combined.lock();
        let full = sessions
            .values()
            .filter(|c| c.agent == holder.agent)
            .count()
            >= PER_AGENT;
        if !full {
            sessions.insert(
                session.clone(),
                Combined {
                    agent: holder.agent.clone(),
                    upstreams: opened.clone(),
                    last_used: Instant::now(),
                },
            );
        }
        full
    };
    if refused {
        end_all(gateway, headers, &opened).await;
        return session_limit(gateway, holder, id).await;
    }
    let requested = message.pointer("/params/protocolVersion").cloned();
    // Resources, prompts and their completion only when the policy lists some from an upstream.
    let policy = gateway
        .policies
        .agent(&holder.agent)
        .and_then(|agent| agent.policy.as_ref().ok().cloned());
    let mut capabilities = json!({"tools": {}});
    if let Some(policy) = &policy {
        if upstreams.iter().any(|u| policy.offers_resources(u)) {
            capabilities["resources"] = json!({});
        }
        if upstreams.iter().any(|u| policy.offers_prompts(u)) {
            capabilities["prompts"] = json!({});
        }
        if capabilities.get("resources").is_some() || capabilities.get("prompts").is_some() {
            capabilities["completions"] = json!({});
        }
    }
    let result = json!({
        "protocolVersion": version.or(requested).unwrap_or(json!("2025-11-25")),
        "capabilities": capabilities,
        "serverInfo": {"name": "tollgate", "version": env!("CARGO_PKG_VERSION")},
        "instructions": format!(
            "The tools and prompts of {} through Tollgate, each named <upstream>{}<name>.",
            upstreams.join(", "),
            gateway.tool_separator
        ),
    });
    with_session(ok(id, result), &session)
}

/// The agent holds as many sessions at `/mcp` as it may: refused (429 `SessionLimit`) and
/// recorded.
async fn session_limit(gateway: &Gateway, holder: &crate::Caller, id: Value) -> Response {
    let refusal = Refusal::new(
        StatusCode::TOO_MANY_REQUESTS,
        RefusalCode::SessionLimit,
        format!(
            "agent {} holds {PER_AGENT} sessions at /mcp already, the most it may: end one \
             (DELETE) or let one go idle",
            holder.agent
        ),
    );
    let recorded = match gateway
        .reject(
            Some(holder),
            "",
            format!("{}: {}", refusal.code, refusal.message),
        )
        .await
    {
        Ok(()) => refusal,
        Err(unrecorded) => unrecorded,
    };
    mcp::rpc_refusal(id, &recorded)
}

/// Ends the upstream sessions `sessions` (DELETE at each).
async fn end_all(
    gateway: &Arc<Gateway>,
    headers: &HeaderMap,
    sessions: &BTreeMap<String, Option<HeaderValue>>,
) {
    for (upstream, session) in sessions {
        let Some(session) = session else { continue };
        let mut headers = headers.clone();
        headers.insert(SESSION_HEADER, session.clone());
        mcp::end_session(State(gateway.clone()), Path(upstream.clone()), headers).await;
    }
}

/// `DELETE /mcp`: ends the session at every upstream.
pub(crate) async fn end(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let holder = match mcp::authenticated(&gateway, &headers, "").await {
        Ok(holder) => holder,
        Err(response) => return response,
    };
    let Some(session) = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let removed = {
        let mut sessions = gateway.combined.lock();
        match sessions.get(session) {
            Some(c) if c.agent == holder.agent => sessions.remove(session),
            _ => None,
        }
    };
    match removed {
        Some(combined) => {
            end_all(&gateway, &headers, &combined.upstreams).await;
            StatusCode::NO_CONTENT.into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_split_at_the_upstream_it_starts_with() {
        let sessions: BTreeMap<String, ()> = ["crm", "crm__eu", "db-prod"]
            .into_iter()
            .map(|u| (u.to_owned(), ()))
            .collect();
        assert_eq!(
            split_name("crm__eu__lookup", "__", &sessions),
            Some(("crm__eu", "lookup"))
        );
        assert_eq!(
            split_name("crm__lookup", "__", &sessions),
            Some(("crm", "lookup"))
        );
        assert_eq!(
            split_name("db-prod-query", "-", &sessions),
            Some(("db-prod", "query"))
        );
        assert_eq!(split_name("crm__", "__", &sessions), None);
        assert_eq!(split_name("other__lookup", "__", &sessions), None);
        assert_eq!(split_name("crmlookup", "__", &sessions), None);
    }

    #[test]
    fn separators_are_short_runs_of_punctuation() {
        for good in ["__", "_", "-", ".", "::", "--"] {
            assert_eq!(check_separator(good), Ok(()), "{good}");
        }
        assert!(check_separator("").unwrap_err().contains("1 to 8"));
        assert!(check_separator("_________").unwrap_err().contains("1 to 8"));
        assert!(check_separator("/").unwrap_err().contains("not '/'"));
        assert!(check_separator("a").unwrap_err().contains("not 'a'"));
    }
}
