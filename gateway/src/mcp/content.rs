//! Resources and prompts: listed as the policy lets the agent see them (`spec.resources`,
//! `spec.prompts`; none without them, and then not even asked of the server), and each read or
//! get decided first, recorded, and forwarded only when allowed, as a tool call is; so is a
//! subscription, and a resource's update reaches the client only when it may read the resource
//! ([`notification_passes`]).

use super::*;

/// `resources/list`, `resources/templates/list`, `prompts/list`: the upstream's answer cut to
/// what the policy lists; an upstream whose content the policy lists none of is not asked.
pub(super) async fn list(
    gateway: &Gateway,
    holder: &Caller,
    url: &McpUpstream,
    upstream: &str,
    headers: &HeaderMap,
    message: Map<String, Value>,
) -> Response {
    let method = message
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let (key, field) = match method.as_str() {
        "resources/list" => ("resources", "uri"),
        "resources/templates/list" => ("resourceTemplates", "uriTemplate"),
        _ => ("prompts", "name"),
    };
    let policy = policy_of(gateway, holder);
    let offers = policy.as_ref().is_some_and(|p| match key {
        "prompts" => p.offers_prompts(upstream),
        _ => p.offers_resources(upstream),
    });
    let message = Value::Object(message);
    if !offers {
        return answer(
            StatusCode::OK,
            Some(json!({"jsonrpc": "2.0", "id": message["id"], "result": {key: []}})),
            None,
        );
    }
    let (body, session) = match send(gateway, holder, url, upstream, headers, &message, None).await
    {
        Ok(ok) => ok,
        Err(e) => return e.answer(message["id"].clone()),
    };
    let mut body = body.unwrap_or(Value::Null);
    if let (Some(items), Some(policy)) = (
        body.pointer_mut(&format!("/result/{key}"))
            .and_then(Value::as_array_mut),
        &policy,
    ) {
        items.retain(|item| {
            let Some(value) = item.get(field).and_then(Value::as_str) else {
                return false;
            };
            match key {
                "resources" => policy.reads_resource(upstream, value).is_some(),
                "resourceTemplates" => policy.serves_template(upstream, value),
                _ => policy.gets_prompt(upstream, value),
            }
        });
    }
    answer(StatusCode::OK, Some(body), session)
}

/// `resources/read`, `resources/subscribe`, `resources/unsubscribe` and `prompts/get`: decided
/// (the kill switch, then the policy's lists: a subscription to what the agent may read),
/// recorded durably, and only then forwarded with exactly what was decided; what came back is
/// recorded too. A refusal is a JSON-RPC error ([`codes::CONTENT_REFUSED`]) whose `data` is the
/// decision: there is no result shape for a refused read.
pub(super) async fn get(
    gateway: &Gateway,
    holder: &Caller,
    url: &McpUpstream,
    upstream: &str,
    headers: &HeaderMap,
    message: Map<String, Value>,
    started: Instant,
) -> Response {
    let id = message["id"].clone();
    let method = message
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let params = message.get("params").cloned().unwrap_or_else(|| json!({}));
    let key = if method.starts_with("resources/") {
        "uri"
    } else {
        "name"
    };
    let Some(named) = params.get(key).and_then(Value::as_str).map(str::to_owned) else {
        return refuse(
            gateway,
            Some(holder),
            upstream,
            StatusCode::OK,
            id,
            codes::INVALID_PARAMS,
            format!("{method} needs params.{key}, a string"),
        )
        .await;
    };
    let Some(agent) = gateway.policies.agent(&holder.agent) else {
        return rpc_refusal(id, &Refusal::unknown_agent(&holder.agent));
    };
    let policy = match &agent.policy {
        Ok(policy) => policy.clone(),
        Err(problem) => {
            let refusal = Refusal::unusable_policy(&holder.agent, problem);
            return refuse_with(gateway, holder, upstream, id, refusal).await;
        }
    };
    let killed = agent.killed || gateway.escalation.holds(&agent.id, agent.killed);
    let decision = if key == "uri" {
        policy.decide_resource(killed, upstream, &named)
    } else {
        policy.decide_prompt(killed, upstream, &named)
    };
    // Exactly what is decided is what goes: the name, the prompt's arguments, the _meta.
    let mut decided = json!({key: named});
    if key == "name"
        && let Some(arguments) = params.get("arguments")
    {
        decided["arguments"] = arguments.clone();
    }
    let run = run_of(headers).ok();
    // A 2026-07-28 retry carries the answers to the server's input requests back (checked as
    // for a tool call).
    let retry = match asks::retry_of(&params, Some(&*policy), upstream) {
        Ok(retry) => retry,
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
    let record = |event: Event| {
        let mut entry = Entry::new((gateway.now)(), event, identity_of(Some(holder)));
        entry.agent = Some(holder.agent.clone());
        entry.run = run.clone();
        entry.tool = Some(method.clone());
        entry
    };
    let mut entry = record(Event::Resource);
    entry.set_arguments(&gateway.redactor, &decided);
    entry.decision = Some(decision.clone());
    entry.policy = Some(crate::policy_ref(&policy));
    entry.latency_us = Some(started.elapsed().as_micros() as u64);
    if let Err(e) = gateway.audit.append(entry).await {
        return rpc_refusal(id, &audit_unavailable(e));
    }
    if let Decision::Deny { message, .. } = &decision {
        let data = serde_json::to_value(&decision).unwrap_or(Value::Null);
        return rpc_error(
            StatusCode::OK,
            id,
            codes::CONTENT_REFUSED,
            format!("Tollgate refused {method}: {message}"),
            Some(data),
        );
    }
    if let Some(meta) = params.get("_meta") {
        decided["_meta"] = meta.clone();
    }
    if let Some(responses) = &retry.responses {
        if let Err(e) = asks::record_answers(gateway, holder, run.as_deref(), responses).await {
            return rpc_refusal(id, &audit_unavailable(e));
        }
        decided["inputResponses"] = Value::Object(responses.clone());
    }
    if let Some(state) = retry.state {
        decided["requestState"] = state;
    }
    let forwarded = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": decided});
    let outcome = send(gateway, holder, url, upstream, headers, &forwarded, None).await;
    let mut report = record(Event::Report);
    report.latency_us = Some(started.elapsed().as_micros() as u64);
    let response = match outcome {
        Ok((Some(mut body), session)) => {
            if let Some(result) = body.get("result") {
                report.set_result(&gateway.redactor, result);
            }
            // 2026-07-28: the server needs the client's input first; its questions pass only
            // as the policy says (asks::input_required), else the read is refused.
            let route = Route {
                gateway,
                holder,
                url,
                upstream,
                headers,
            };
            if body.pointer("/result/resultType").and_then(Value::as_str) == Some("input_required")
                && let Some(result) = body.get_mut("result")
                && let Err(why) = asks::input_required(route, run.as_deref(), result).await
            {
                let why = format!("Tollgate withheld the server's request for input: {why}");
                report.error = Some(why.clone());
                body = json!({"jsonrpc": "2.0", "id": id, "error": {
                    "code": codes::CONTENT_REFUSED, "message": why}});
            }
            if let Some(error) = body.get("error") {
                report.error = Some(error.to_string());
                report.not_run = true;
            }
            answer(StatusCode::OK, Some(body), session)
        }
        Ok((None, session)) => answer(StatusCode::ACCEPTED, None, session),
        Err(e) => {
            report.error = Some(e.to_string());
            report.not_run = !e.ran();
            e.answer(forwarded["id"].clone())
        }
    };
    if let Err(e) = gateway.audit.append(report).await {
        return rpc_refusal(forwarded["id"].clone(), &audit_unavailable(e));
    }
    response
}

/// `completion/complete`: suggestions for a prompt's or a resource template's arguments, asked
/// of the server only for a prompt the agent may get or a template within what it may read;
/// otherwise refused (recorded) before the server sees it.
pub(super) async fn complete(
    gateway: &Gateway,
    holder: &Caller,
    url: &McpUpstream,
    upstream: &str,
    headers: &HeaderMap,
    message: Map<String, Value>,
) -> Response {
    let id = message["id"].clone();
    let reference = message.get("params").and_then(|p| p.get("ref"));
    let kind = reference
        .and_then(|r| r.get("type"))
        .and_then(Value::as_str);
    let policy = policy_of(gateway, holder);
    let allowed = match (kind, policy) {
        (Some("ref/prompt"), Some(policy)) => reference
            .and_then(|r| r.get("name"))
            .and_then(Value::as_str)
            .is_some_and(|name| policy.gets_prompt(upstream, name)),
        (Some("ref/resource"), Some(policy)) => reference
            .and_then(|r| r.get("uri"))
            .and_then(Value::as_str)
            .is_some_and(|uri| {
                policy.serves_template(upstream, uri)
                    || policy.reads_resource(upstream, uri).is_some()
            }),
        _ => false,
    };
    if !allowed {
        return refuse(
            gateway,
            Some(holder),
            upstream,
            StatusCode::OK,
            id,
            codes::CONTENT_REFUSED,
            format!(
                "completion/complete names no prompt or resource the policy lists: {}",
                reference.map_or_else(|| "no ref".to_owned(), Value::to_string)
            ),
        )
        .await;
    }
    forward(
        gateway,
        holder,
        url,
        upstream,
        headers,
        &Value::Object(message),
    )
    .await
    .unwrap_or_else(|e| e)
}

/// Whether the server's notification `message` (no id) may reach the agent's client on the
/// session's stream: progress, log messages and that the tool list changed always; that a
/// resource changed only when the policy lets the agent read it (its URI names it), and that
/// the resource or prompt list changed only when the policy lists some of this upstream's.
pub(crate) fn notification_passes(
    policy: Option<&tollgate_engine::CompiledPolicy>,
    upstream: &str,
    message: &Value,
) -> bool {
    let Some(method) = message.get("method").and_then(Value::as_str) else {
        return false;
    };
    if message.get("id").is_some() {
        return false;
    }
    match method {
        "notifications/progress" | "notifications/message" | "notifications/tools/list_changed" => {
            true
        }
        "notifications/resources/updated" => message
            .pointer("/params/uri")
            .and_then(Value::as_str)
            .zip(policy)
            .is_some_and(|(uri, policy)| policy.reads_resource(upstream, uri).is_some()),
        "notifications/resources/list_changed" => {
            policy.is_some_and(|policy| policy.offers_resources(upstream))
        }
        "notifications/prompts/list_changed" => {
            policy.is_some_and(|policy| policy.offers_prompts(upstream))
        }
        _ => false,
    }
}
