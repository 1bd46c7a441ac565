//! `tools/call`: decided, forwarded exactly as decided, its result cut to what the agent may
//! see, recorded with its outcome; streamed to clients that accept events.

use super::*;

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

/// Aborts the call when the client goes away, as a dropped handler would.
pub(super) struct AbortOnDrop(tokio::task::JoinHandle<Response>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The report of a forwarded call, written when its handler is dropped before the upstream
/// answered (the client went away): the outcome is "aborted by client", and the call may have
/// run, so it is not marked as not run.
pub(super) struct Unfinished {
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
pub(super) async fn call_tool_streaming(
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
    // What the server says meanwhile passes through asks::pass, with the call's route.
    let asker = Arc::new((
        gateway.clone(),
        holder.clone(),
        url.clone(),
        upstream.clone(),
        headers.clone(),
    ));
    let passed = async |asker: &Asker, event: Value| {
        let (gateway, holder, url, upstream, headers) = asker;
        let route = Route {
            gateway,
            holder,
            url,
            upstream,
            headers,
        };
        match asks::pass(route, event).await {
            Some(message) => event_data(&message),
            // A refused request of the server: the client sees nothing of it.
            None => ": \n\n".to_owned(),
        }
    };
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
    let first = match first {
        Some(event) => Some(passed(&asker, event).await),
        None => None,
    };
    let stream = futures::stream::unfold(Some((call, ticks, relayed, first)), move |state| {
        let id = id.clone();
        let asker = asker.clone();
        async move {
            let (mut call, mut ticks, mut relayed, first) = state?;
            if let Some(first) = first {
                return Some((first, Some((call, ticks, relayed, None))));
            }
            tokio::select! {
                biased;
                Some(event) = relayed.recv() => {
                    Some((passed(&asker, event).await, Some((call, ticks, relayed, None))))
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

/// A streamed call's route, owned by its stream.
type Asker = (Arc<Gateway>, Caller, McpUpstream, String, HeaderMap);

pub(super) fn event_data(message: &Value) -> String {
    format!("event: message\ndata: {message}\n\n")
}

/// The JSON-RPC answer a finished call gave, as an SSE event; a refusal that is not JSON-RPC
/// (the audit trail unavailable) becomes a JSON-RPC error that carries it. The answer is read
/// up to `limit` bytes: what the gateway itself built from an upstream answer it read up to
/// [`Gateway::with_upstream_limit`], so a large result is passed on whole (it was cut at the
/// request body limit, 1 MiB, before).
pub(super) async fn event_of(response: Response, id: Value, limit: usize) -> String {
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
pub(super) struct Route<'a> {
    pub(super) gateway: &'a Gateway,
    pub(super) holder: &'a Caller,
    pub(super) url: &'a McpUpstream,
    pub(super) upstream: &'a str,
    pub(super) headers: &'a HeaderMap,
}

pub(super) async fn call_tool(
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
        let retry = asks::retry_of(&params, policy_of(gateway, holder).as_deref(), upstream)?;
        Ok((tool.clone(), arguments, run_of(headers)?, retry))
    })();
    let (tool, arguments, run, retry) = match checked {
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
    // A 2026-07-28 retry: the client's answers to the server's input requests go back with the
    // server's state, each recorded first.
    if let Some(responses) = &retry.responses {
        if let Err(e) = asks::record_answers(gateway, holder, Some(&run), responses).await {
            return rpc_refusal(id, &audit_unavailable(e));
        }
        forwarded["params"]["inputResponses"] = Value::Object(responses.clone());
    }
    if let Some(state) = retry.state {
        forwarded["params"]["requestState"] = state;
    }
    // The proxy reports this step itself: an agent cannot report another result for it.
    if let Some(step) = decided.step {
        gateway.take_report(&holder.agent, &run, step);
    }
    let mut report = Entry::new((gateway.now)(), Event::Report, identity_of(Some(holder)));
    report.agent = Some(holder.agent.clone());
    report.run = Some(run.clone());
    report.step = decided.step;
    report.tool = Some(tool.clone());
    // If the client goes away while the upstream works, this handler is dropped here: the guard
    // records the call's outcome as aborted, so no allowed call is left without one.
    let mut unfinished = Unfinished {
        audit: gateway.audit.clone(),
        entry: Some(report),
        started,
    };
    let outcome = if gateway.traced {
        // The MCP semantic conventions' client span: `tools/call {tool}`.
        let span = tracing::info_span!(
            target: "tollgate::mcp",
            "upstream call",
            otel.name = %format!("tools/call {tool}"),
            otel.kind = "client",
            otel.status = tracing::field::Empty,
            mcp.method.name = "tools/call",
            gen_ai.operation.name = "execute_tool",
            gen_ai.tool.name = %tool,
            jsonrpc.request.id = %id,
            mcp.session.id = tracing::field::Empty,
            tollgate.upstream = %upstream,
            error.type = tracing::field::Empty,
        );
        if let Some(session) = headers
            .get(super::SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            span.record("mcp.session.id", session);
        }
        let outcome = tracing::Instrument::instrument(
            send(gateway, holder, url, upstream, headers, &forwarded, relay),
            span.clone(),
        )
        .await;
        if let Err(e) = &outcome {
            span.record("error.type", tracing::field::display(e));
            span.record("otel.status", "error");
        }
        outcome
    } else {
        send(gateway, holder, url, upstream, headers, &forwarded, relay).await
    };
    let mut entry = unfinished.entry.take().expect("taken only here");
    entry.time = (gateway.now)();
    entry.latency_us = Some(started.elapsed().as_micros() as u64);
    let response = match outcome {
        Ok((Some(mut body), session)) => {
            if let Some(result) = body.get("result") {
                entry.set_result(&gateway.redactor, result);
            }
            // 2026-07-28: the server needs the client's input before it can finish. Such a
            // result holds the server's questions, none of the tool's fields.
            let asks_input = body.pointer("/result/resultType").and_then(Value::as_str)
                == Some("input_required");
            if asks_input
                && let Some(result) = body.get_mut("result")
                && let Err(why) = asks::input_required(route, Some(&run), result).await
            {
                let why = format!("Tollgate withheld the server's request for input: {why}");
                entry.error = Some(why.clone());
                *result = json!({"isError": true, "content": [{"type": "text", "text": why}]});
                if modern {
                    result["resultType"] = json!("complete");
                }
            }
            if let Some(error) = body.get("error") {
                // The server refused the call (a JSON-RPC error, not a tool's own error result).
                entry.error = Some(error.to_string());
                entry.not_run = true;
            }
            if let Some(fields) = policy.as_ref().and_then(|p| p.result_fields(tool))
                && !asks_input
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
