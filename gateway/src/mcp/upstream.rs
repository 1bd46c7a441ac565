//! Sending a decided message upstream, over streamable HTTP or in a session the gateway holds
//! (stdio, HTTP+SSE), and reading what comes back: the answer, and what the server says besides.

use super::*;

use std::time::Duration;

/// Why a message sent upstream brought back no answer to pass on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SendError {
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
    pub(super) fn ran(&self) -> bool {
        matches!(self, SendError::Unusable(_))
    }

    /// The answer to the client: its HTTP status, and a JSON-RPC error with the request's id.
    pub(super) fn answer(&self, id: Value) -> Response {
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

/// Sends `message` upstream and returns the upstream's JSON-RPC answer (`Ok(None)` for an
/// accepted notification), with the session header to pass back. An answer longer than the
/// gateway's upstream limit is not read on (`Gateway::with_upstream_limit`).
pub(super) async fn send(
    gateway: &Gateway,
    holder: &Caller,
    url: &McpUpstream,
    upstream: &str,
    headers: &HeaderMap,
    message: &Value,
    relay: Option<&Relay>,
) -> Result<(Option<Value>, Option<HeaderValue>), SendError> {
    let asked = policy_of(gateway, holder);
    let asked = asked
        .as_ref()
        .map_or(&[][..], |p| p.server_requests(upstream));
    let message = &asks::without_client_capabilities(message, asked);
    let (timeout, whose) = call_timeout(gateway, url);
    let url = match (&url.url, &url.stdio) {
        (Some(_), _) if url.transport == Some(McpTransport::Sse) => {
            return send_held(gateway, holder, url, upstream, headers, message, relay).await;
        }
        (Some(url), _) => url,
        (None, Some(_)) => {
            return send_held(gateway, holder, url, upstream, headers, message, relay).await;
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
        .timeout(timeout)
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
    let late = |e: &reqwest::Error| {
        e.is_timeout()
            .then(|| format!("upstream {upstream:?} did not answer within {timeout:?} ({whose})"))
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
/// one the client names, which must be this agent's at this upstream. The upstream's call timeout
/// bounds it.
pub(super) async fn send_held(
    gateway: &Gateway,
    holder: &Caller,
    url: &McpUpstream,
    upstream: &str,
    headers: &HeaderMap,
    message: &Value,
    relay: Option<&Relay>,
) -> Result<(Option<Value>, Option<HeaderValue>), SendError> {
    let (timeout, _) = call_timeout(gateway, url);
    let Some(session) = headers.get(SESSION_HEADER).cloned() else {
        return Err(SendError::SessionGone(format!(
            "upstream {upstream:?} needs a session the gateway holds for it: initialize first"
        )));
    };
    let id = session.to_str().unwrap_or_default();
    let answer = if url.transport == Some(McpTransport::Sse) {
        gateway
            .streams
            .request(id, &holder.agent, upstream, message, timeout, relay)
            .await
    } else {
        gateway
            .stdio
            .request(id, &holder.agent, upstream, message, timeout, relay)
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

/// How long one request to `url` may take, and what set it: the upstream's own
/// `mcp.timeoutSeconds`, else the gateway's `--mcp-call-timeout`.
pub(super) fn call_timeout(gateway: &Gateway, url: &McpUpstream) -> (Duration, &'static str) {
    match url
        .timeout_seconds
        .and_then(|s| u64::try_from(s).ok())
        .filter(|s| *s > 0)
    {
        Some(seconds) => (
            Duration::from_secs(seconds),
            "the upstream's mcp.timeoutSeconds",
        ),
        None => (gateway.upstream_timeout, "the gateway's --mcp-call-timeout"),
    }
}

/// Where a call's stream sends what its upstream says before the answer.
pub(crate) type Relay = tokio::sync::mpsc::Sender<Value>;

/// The server-to-client notifications relayed to the client while its call runs: progress (a
/// client's request timeout restarts on it) and log messages. Anything else the server sends
/// inside a call's answer (requests for sampling or elicitation, other notifications) is not.
pub(crate) const RELAYED: [&str; 2] = ["notifications/progress", "notifications/message"];

/// The JSON-RPC messages of the complete events of an SSE `body` after byte `from`, and how far
/// it read.
pub(super) fn complete_events(body: &[u8], from: usize) -> (usize, Vec<Value>) {
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
/// to the client's stream (a client too slow to take them loses some, never the answer), and so
/// do its requests of the client (sampling, elicitation, roots), which the stream lets through
/// or refuses by policy ([`asks::pass`]); without a stream to take it, a request is answered
/// with an error at once, so the call never hangs waiting for it, and recorded.
pub(super) async fn server_message(
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
        (Some(_), Some(_))
            if relay.is_some_and(|relay| relay.try_send(message.clone()).is_ok()) =>
        {
            // The call's stream decides whether the client may be asked (asks::pass).
        }
        (Some(id), Some(method)) => {
            let why = format!(
                "the server's request {method} was answered with an error: Tollgate relays \
                 requests of servers only in the stream of a call whose client takes one"
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
pub(super) fn answer_in_events(body: &[u8], id: Option<&Value>) -> Option<Value> {
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
