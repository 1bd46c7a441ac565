//! A session's other verbs: `DELETE` ends it (at the upstream too), `GET` opens the server's
//! stream of messages outside any call.

use super::*;

/// The caller, its upstream and the session it names, for the verbs that act on a session; or
/// the answer refusing the request (recorded), `what` saying why a session is needed.
async fn session_of(
    gateway: &Gateway,
    headers: &HeaderMap,
    upstream: &str,
    what: &str,
) -> Result<(Caller, McpUpstream, HeaderValue), Response> {
    let holder = authenticated(gateway, headers, upstream).await?;
    let url = match upstream_url(gateway, &holder, upstream) {
        Ok(url) => url,
        Err(refusal) => {
            return Err(refuse_with(gateway, &holder, upstream, Value::Null, refusal).await);
        }
    };
    let Some(session) = headers.get(SESSION_HEADER).cloned() else {
        let refusal = Refusal::new(
            StatusCode::BAD_REQUEST,
            RefusalCode::MalformedRequest,
            format!("{what}: the {SESSION_HEADER} header names it"),
        );
        return Err(refuse_with(gateway, &holder, upstream, Value::Null, refusal).await);
    };
    Ok((holder, url, session))
}

/// `DELETE /mcp/{upstream}`: the client ends its session, and the upstream its own (behind a
/// stdio bridge, that ends a process). The upstream's status is passed back as it is: 200 or
/// 204 ended, 404 unknown, 405 the server does not let clients end sessions.
pub(crate) async fn end_session(
    State(gateway): State<Arc<Gateway>>,
    Path(upstream): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (holder, url, session) =
        match session_of(&gateway, &headers, &upstream, "DELETE ends a session").await {
            Ok(found) => found,
            Err(response) => return response,
        };
    let session = &session;
    let sse = url.transport == Some(McpTransport::Sse);
    let (timeout, _) = call_timeout(&gateway, &url);
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
        .timeout(timeout)
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

/// `GET /mcp/{upstream}`: the server's stream of messages outside any call, for the session the
/// client names. What passes is what [`content::notification_passes`] lets through (progress,
/// log messages, list changes, updates of resources the agent may read); a request the server
/// makes of the client passes or is answered with an error at once as the policy says, recorded
/// either way, as inside a call ([`asks::pass`]). Each event keeps its `id`, so
/// a client that reconnects with `Last-Event-ID` resumes where the server lets it. Servers
/// without a stream answer 405, passed on; a session the gateway holds itself (stdio, HTTP+SSE)
/// has none (405).
pub(crate) async fn listen(
    State(gateway): State<Arc<Gateway>>,
    Path(upstream): Path<String>,
    headers: HeaderMap,
) -> Response {
    use futures::StreamExt;
    let (holder, url, session) = match session_of(
        &gateway,
        &headers,
        &upstream,
        "the GET stream belongs to a session",
    )
    .await
    {
        Ok(found) => found,
        Err(response) => return response,
    };
    let session = &session;
    let (Some(stream_url), None) = (url.url.as_deref(), url.transport) else {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    };
    let mut request = gateway
        .http
        .get(stream_url)
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
            url,
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
                    let policy = policy_of(&gateway, &holder);
                    let passes = message.as_ref().is_some_and(|m| {
                        content::notification_passes(policy.as_deref(), &upstream, m)
                    });
                    if passes && let Some(message) = &message {
                        out.push_str(&format!("event: message\ndata: {message}\n\n"));
                        let state = (response, buffer, gateway, holder, url, upstream, headers);
                        return Some((out, state));
                    }
                    if let Some(message) = message.filter(|m| m.get("id").is_some()) {
                        // A request of the client: let through under the gateway's id as the
                        // policy says, or answered with an error (both recorded).
                        let route = Route {
                            gateway: &gateway,
                            holder: &holder,
                            url: &url,
                            upstream: &upstream,
                            headers: &headers,
                        };
                        if let Some(asked) = asks::pass(route, message).await {
                            out.push_str(&format!("event: message\ndata: {asked}\n\n"));
                            let state = (response, buffer, gateway, holder, url, upstream, headers);
                            return Some((out, state));
                        }
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
