//! The LLM proxy: `/llm/<upstream>/<the provider's own path>`. An agent points its provider SDK's
//! base URL at it and uses its own credential (ServiceAccount token or standalone key) as the
//! SDK's API key (`Authorization: Bearer` or `x-api-key`); the run is the `Tollgate-Run-Id`
//! header. The provider's key is the gateway's (the AgentIdentity's credential for the
//! upstream): the agent never holds it.
//!
//! Every call is metered by the gateway, not by what the agent says:
//! - before it leaves: the model is one the policy lists, the run is not halted or killed, and
//!   the request's output cap is lowered to what the run's token and cost ceilings still pay for
//!   after the calls in flight (which reserve theirs); when nothing is left the run halts;
//! - while it streams: events are relayed one by one as they arrive, the output is counted as
//!   they pass, and the stream is ended with an error event in the provider's shape the moment
//!   the call's share is spent, or the agent's kill switch is engaged;
//! - at the end: the provider's reported usage is charged (OpenAI streams are asked for it), or,
//!   when none came, the gateway's own bound; never zero. One `model` record per call.

mod sse;
mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::SinkExt;
use serde_json::{Value, json};
use tollgate_audit::{Cut, Entry, Event, Metered, ModelCallRecord};
use tollgate_crds::policy::{Capture, LlmApi};
use tollgate_engine::llm::{Grant, LlmRoute, ModelCall, ModelUsage, Price};
use tollgate_engine::{Agent, Ceiling, CompiledPolicy, Decision, Usage, canonical};

use crate::{
    AgentState, Caller, Gateway, Refusal, RefusalCode, audit_unavailable, counters, identity_of,
    policy_ref,
};
use wire::{Endpoint, Tally};

/// The largest request body the LLM proxy reads: prompts are larger than tool calls.
pub const MAX_LLM_BODY: usize = 8 * 1024 * 1024;

/// The most output text a record keeps for Full capture.
pub(crate) const MAX_CAPTURE: usize = 256 * 1024;

/// How often a waiting stream looks at the agent's kill switch.
const KILL_CHECK: Duration = Duration::from_millis(100);

/// The request headers passed to the provider; everything else (the agent's credential above
/// all) stays at the gateway.
const FORWARDED: [&str; 5] = [
    "content-type",
    "accept",
    "anthropic-version",
    "anthropic-beta",
    "openai-beta",
];

/// The answer headers passed back to the agent.
const RETURNED: [&str; 4] = ["content-type", "retry-after", "x-request-id", "request-id"];

/// A refusal in the provider's error shape, which its SDK raises with the message; never retried
/// by the SDKs (`x-should-retry: false`).
fn answer(api: LlmApi, status: StatusCode, code: &str, message: &str, tollgate: Value) -> Response {
    let kind = match status {
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::FORBIDDEN => "permission_error",
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
        s if s.is_server_error() => "api_error",
        _ => "invalid_request_error",
    };
    let body = wire::error_body(api, kind, code, message, tollgate);
    let mut response = (status, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert("x-should-retry", HeaderValue::from_static("false"));
    response
}

/// The API style a refusal speaks before the upstream is known: Anthropic's SDK sends its
/// version header and its key as `x-api-key`.
fn guess_api(headers: &HeaderMap) -> LlmApi {
    if headers.contains_key("anthropic-version") || headers.contains_key("x-api-key") {
        LlmApi::Anthropic
    } else {
        LlmApi::OpenAI
    }
}

/// Records a refusal before any decision, and answers it in the provider's shape.
async fn refuse(
    gateway: &Gateway,
    holder: Option<&Caller>,
    upstream: &str,
    api: LlmApi,
    refusal: Refusal,
) -> Response {
    // If the trail could not record it, the refusal that comes back says so and names this one.
    let recorded = gateway
        .refuse_recorded(holder, None, &format!("/llm/{upstream}"), refusal)
        .await;
    refused(api, &recorded)
}

/// A refusal in the provider's error shape, so the provider's SDK reads it as one of its own.
fn refused(api: LlmApi, refusal: &Refusal) -> Response {
    answer(
        api,
        refusal.status,
        refusal.code.as_str(),
        &refusal.message,
        json!({"code": refusal.code.as_str()}),
    )
}

/// What one model call carries from its decision to its charge.
struct Call {
    holder: Caller,
    agent: String,
    run: String,
    upstream: String,
    endpoint: Endpoint,
    model: String,
    api: LlmApi,
    capture: Capture,
    policy: Arc<CompiledPolicy>,
    price: Option<Price>,
    grant: Grant,
    input_bound: u64,
    stream: bool,
    started: Instant,
    arguments: Value,
    /// The call's span (disabled unless traces are exported).
    span: tracing::Span,
}

/// How a model call ended, for its charge and record.
#[derive(Default)]
struct Ending {
    status: Option<u16>,
    usage: Option<ModelUsage>,
    output_tokens: u64,
    finish: Option<String>,
    cut: Option<Cut>,
    first_token: Option<Duration>,
    error: Option<String>,
    /// The run ceiling the call reached while its answer came (the wall clock), if one did.
    reached: Option<Ceiling>,
    /// Input tokens the provider reported before the answer was cut.
    partial_input: Option<u64>,
    /// What the agent received: the answer's JSON, or the stream's text.
    result: Option<Value>,
    /// Charge nothing: the provider refused the call (an error answer).
    free: bool,
}

/// `/llm/{upstream}/{*path}`.
pub(crate) async fn proxy(
    State(gateway): State<Arc<Gateway>>,
    Path((upstream, path)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let guessed = guess_api(&headers);
    let holder = match crate::authenticate_with(&gateway, &headers, true).await {
        Ok(holder) => holder,
        Err(refusal) => {
            if gateway.summarized("/llm", &refusal) {
                return answer(
                    guessed,
                    refusal.status,
                    refusal.code.as_str(),
                    &refusal.message,
                    json!({"code": refusal.code.as_str()}),
                );
            }
            return refuse(&gateway, None, &upstream, guessed, refusal).await;
        }
    };
    let entry = gateway.policies.agent(&holder.agent);
    let policy = match entry.as_deref().map(|a| &a.policy) {
        Some(Ok(policy)) => policy.clone(),
        Some(Err(problem)) => {
            let refusal = Refusal::unusable_policy(&holder.agent, problem);
            return refuse(&gateway, Some(&holder), &upstream, guessed, refusal).await;
        }
        None => {
            let refusal = Refusal::unknown_agent(&holder.agent);
            return refuse(&gateway, Some(&holder), &upstream, guessed, refusal).await;
        }
    };
    let Some(route) = policy.llm_route(&upstream).cloned() else {
        let refusal = Refusal::new(
            StatusCode::NOT_FOUND,
            RefusalCode::NotServed,
            format!(
                "upstream {upstream:?} is not a model provider (spec.upstreams[].llm) of agent {}'s policy",
                holder.agent
            ),
        );
        return refuse(&gateway, Some(&holder), &upstream, guessed, refusal).await;
    };
    let api = route.api;
    let get = method == Method::GET;
    let endpoint = match Endpoint::of(api, get, &path) {
        Some(endpoint) if get || method == Method::POST => endpoint,
        _ => {
            let refusal = Refusal::new(
                StatusCode::NOT_FOUND,
                RefusalCode::NotServed,
                format!(
                    "{method} {path} is not served for {api:?} upstream {upstream:?}; served: {}",
                    Endpoint::served(api)
                ),
            );
            return refuse(&gateway, Some(&holder), &upstream, api, refusal).await;
        }
    };
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let url = format!("{}/{}{query}", route.url, path.trim_matches('/'));
    if endpoint == Endpoint::Models {
        return models(&gateway, &holder, &upstream, &route, &url, &headers).await;
    }

    let bytes = match axum::body::to_bytes(body, MAX_LLM_BODY).await {
        Ok(bytes) => bytes,
        Err(_) => {
            let refusal = Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                RefusalCode::PayloadTooLarge,
                format!("the request body exceeds {MAX_LLM_BODY} bytes"),
            );
            return refuse(&gateway, Some(&holder), &upstream, api, refusal).await;
        }
    };
    let parsed = canonical::parse_strict(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|value| match value {
            Value::Object(map) => Ok(map),
            _ => Err("it must be a JSON object".to_owned()),
        })
        .and_then(|map| {
            let model = match map.get("model") {
                Some(Value::String(model)) if !model.is_empty() => model.clone(),
                _ => return Err("\"model\" must name the model, as a string".to_owned()),
            };
            wire::check_single_answer(endpoint, &map)?;
            let requested = wire::requested_output(endpoint, &map)?;
            Ok((map, model, requested))
        });
    let (mut body, model, requested) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            let refusal = Refusal::new(
                StatusCode::BAD_REQUEST,
                RefusalCode::MalformedRequest,
                format!(
                    "the request body is not a valid {} request: {e}",
                    endpoint.name()
                ),
            );
            return refuse(&gateway, Some(&holder), &upstream, api, refusal).await;
        }
    };
    if !endpoint.metered() {
        // Counting tokens costs nothing: only the model list applies.
        if !route.models.contains(&model) {
            let refusal = Refusal::new(
                StatusCode::FORBIDDEN,
                RefusalCode::NotServed,
                format!("model {model:?} is not allowed through upstream {upstream:?}"),
            );
            return refuse(&gateway, Some(&holder), &upstream, api, refusal).await;
        }
        return match send(&gateway, &holder, &upstream, &url, &headers, bytes.to_vec()).await {
            Ok(response) => relay_whole(response, &gateway).await.0,
            Err(e) => answer(
                api,
                StatusCode::BAD_GATEWAY,
                "UpstreamUnavailable",
                &e,
                json!({}),
            ),
        };
    }
    let run = match crate::run_id(None, &headers) {
        Ok(run) => run,
        Err(refusal) => return refuse(&gateway, Some(&holder), &upstream, api, refusal).await,
    };

    let arguments = Value::Object(body.clone());
    let input_bound = wire::input_estimate(api, &model, &arguments).await;
    let stream = wire::is_stream(&body);
    let price = gateway.prices.get(&model).cloned();
    let call = ModelCall {
        run_id: &run,
        upstream: &upstream,
        model: &model,
        input_tokens: input_bound,
        requested_output: requested,
        generates: endpoint.generates(),
        price: price.as_ref(),
    };
    let granted = match gateway.grant(&holder, &policy, &call).await {
        Ok(granted) => granted,
        Err(refusal) => return refused(api, &refusal),
    };
    let grant = match granted {
        Ok(grant) => grant,
        Err((decision, was_halted)) => {
            return refuse_call(
                &gateway, &holder, &policy, &run, &upstream, endpoint, &model, api, &route,
                &arguments, decision, was_halted, started,
            )
            .await;
        }
    };
    if let Some(cap) = grant.output_cap {
        wire::set_output_cap(endpoint, &mut body, cap);
    }
    wire::ask_usage(endpoint, &mut body);
    let outgoing = serde_json::to_vec(&body).unwrap_or_default();
    // The GenAI semantic conventions' client span: `{operation} {model}`.
    let span = if gateway.traced {
        let operation = match endpoint {
            wire::Endpoint::Embeddings => "embeddings",
            _ => "chat",
        };
        tracing::info_span!(
            target: "tollgate::llm",
            "model call",
            otel.name = %format!("{operation} {model}"),
            otel.kind = "client",
            otel.status = tracing::field::Empty,
            gen_ai.operation.name = operation,
            gen_ai.provider.name = match api {
                LlmApi::OpenAI => "openai",
                LlmApi::Anthropic => "anthropic",
            },
            gen_ai.request.model = %model,
            gen_ai.request.max_tokens = grant.output_cap,
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            gen_ai.response.finish_reasons = tracing::field::Empty,
            tollgate.agent = %holder.agent,
            tollgate.run = %run,
            tollgate.upstream = %upstream,
            tollgate.cut = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
        )
    } else {
        tracing::Span::none()
    };
    let call = Call {
        span: span.clone(),
        agent: holder.agent.clone(),
        holder,
        run,
        upstream,
        endpoint,
        model,
        api,
        capture: route.capture,
        policy,
        price,
        grant,
        input_bound,
        stream,
        started,
        arguments,
    };

    // From here the call holds a reservation: it is forwarded, charged and recorded in a task
    // of its own, so an agent that goes away (or a handler dropped with it) leaks nothing and
    // leaves no call without its record.
    let forwarding = tokio::spawn(tracing::Instrument::instrument(
        forward(gateway, call, url, headers, outgoing),
        span,
    ));
    forwarding.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "a model call's forwarding task failed");
        answer(
            api,
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal",
            "the gateway failed while forwarding the call",
            json!({}),
        )
    })
}

/// Waits until `agent`'s kill switch is engaged.
async fn kill_switch(gateway: &Gateway, agent: &str) {
    let mut tick = tokio::time::interval(KILL_CHECK);
    loop {
        tick.tick().await;
        if gateway.killed(agent) {
            return;
        }
    }
}

/// Forwards a granted call, relays the answer and settles the call.
async fn forward(
    gateway: Arc<Gateway>,
    call: Call,
    url: String,
    headers: HeaderMap,
    outgoing: Vec<u8>,
) -> Response {
    let api = call.api;
    let sent = tokio::select! {
        sent = send(&gateway, &call.holder, &call.upstream, &url, &headers, outgoing) => sent,
        _ = kill_switch(&gateway, &call.agent) => return killed_waiting(&gateway, &call).await,
        _ = wall_clock(&gateway, &call) => return out_of_time(&gateway, &call).await,
    };
    let response = match sent {
        Ok(response) => response,
        Err(e) => {
            let ending = Ending {
                error: Some(e.clone()),
                free: true,
                ..Default::default()
            };
            if let Err(refusal) = gateway.settle_model_call(&call, ending).await {
                return refused(call.api, &refusal);
            }
            return answer(
                api,
                StatusCode::BAD_GATEWAY,
                "UpstreamUnavailable",
                &e,
                json!({}),
            );
        }
    };
    let status = response.status();
    let is_events = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if status.is_success() && is_events {
        return relay_stream(gateway, call, response);
    }
    let (relayed, bytes) = tokio::select! {
        relayed = relay_whole(response, &gateway) => relayed,
        _ = kill_switch(&gateway, &call.agent) => return killed_waiting(&gateway, &call).await,
        _ = wall_clock(&gateway, &call) => return out_of_time(&gateway, &call).await,
    };
    let mut ending = Ending {
        status: Some(status.as_u16()),
        ..Default::default()
    };
    match bytes {
        Err(e) => {
            ending.error = Some(e);
            ending.cut = Some(Cut::Upstream);
        }
        Ok(bytes) if status.is_success() => {
            let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            ending.usage = answer.get("usage").and_then(wire::usage_of);
            ending.finish = wire::finish_of(&answer);
            let text = wire::text_of(&answer);
            ending.output_tokens = match call.grant.output_cap {
                Some(cap) => (text.len() as u64).min(cap),
                None => text.len() as u64,
            };
            ending.result = Some(answer);
        }
        Ok(bytes) => {
            // The provider refused or failed: passed on as it shaped it, charged nothing.
            ending.free = true;
            ending.error = Some(format!(
                "the provider answered HTTP {status}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(512)])
            ));
        }
    }
    if let Err(refusal) = gateway.settle_model_call(&call, ending).await {
        return refused(call.api, &refusal);
    }
    relayed
}

/// A call whose answer had not come when the agent's kill switch was engaged: ended, charged
/// all it reserved (the provider may bill what it wrote), recorded, and answered KillSwitch.
/// Waits until the run's wall clock runs out (never, without a wall-clock ceiling).
async fn wall_clock(gateway: &Gateway, call: &Call) {
    match &call.grant.deadline {
        Some((end, _)) => {
            let left = end.duration_since((gateway.now)());
            let left = if left.is_negative() {
                Duration::ZERO
            } else {
                left.unsigned_abs()
            };
            tokio::time::sleep(left).await;
        }
        None => std::future::pending().await,
    }
}

/// A call whose answer had not come when the run's wall clock ran out: ended, charged all it
/// reserved, the run halted and escalated, answered with the halt.
async fn out_of_time(gateway: &Gateway, call: &Call) -> Response {
    let ceiling = call.grant.deadline.as_ref().map(|(_, c)| c.clone());
    let ending = Ending {
        cut: Some(Cut::Ceiling),
        reached: ceiling.clone(),
        output_tokens: call.grant.output_cap.unwrap_or(0),
        error: Some("the run's wall clock ran out while the call waited for its answer".into()),
        ..Default::default()
    };
    if let Err(refusal) = gateway.settle_model_call(call, ending).await {
        return refused(call.api, &refusal);
    }
    let clause = ceiling.as_ref().map_or("", Ceiling::clause);
    let message = match &ceiling {
        Some(c) => format!(
            "{c}; the call was ended before its answer came and the run is halted ({clause})"
        ),
        None => "the run's wall clock ran out".to_owned(),
    };
    answer(
        call.api,
        StatusCode::FORBIDDEN,
        clause,
        &message,
        json!({"cut": Cut::Ceiling}),
    )
}

async fn killed_waiting(gateway: &Gateway, call: &Call) -> Response {
    let ending = Ending {
        cut: Some(Cut::KillSwitch),
        output_tokens: call.grant.output_cap.unwrap_or(0),
        error: Some(
            "the agent's kill switch was engaged while the call waited for its answer".into(),
        ),
        ..Default::default()
    };
    if let Err(refusal) = gateway.settle_model_call(call, ending).await {
        return refused(call.api, &refusal);
    }
    let message = format!(
        "the kill switch of agent {} is engaged; the call was ended before its answer came",
        call.agent
    );
    answer(
        call.api,
        StatusCode::FORBIDDEN,
        "KillSwitch",
        &message,
        json!({"cut": Cut::KillSwitch}),
    )
}

/// Sends the request to the provider with the gateway's credential for it.
async fn send(
    gateway: &Gateway,
    holder: &Caller,
    upstream: &str,
    url: &str,
    headers: &HeaderMap,
    body: Vec<u8>,
) -> Result<reqwest::Response, String> {
    let credential = gateway.credential(&holder.agent, upstream).await?;
    let mut request = if body.is_empty() {
        gateway.http.get(url)
    } else {
        gateway.http.post(url).body(body)
    };
    for name in FORWARDED {
        if let Some(value) = headers.get(name) {
            request = request.header(name, value.as_bytes());
        }
    }
    if let Some((name, value)) = credential {
        request = request.header(name, value);
    }
    request
        .send()
        .await
        .map_err(|e| format!("provider upstream {upstream:?} unreachable: {e}"))
}

/// Passes a whole (not streamed) answer on as the provider shaped it; the bytes too, for the
/// record, or why they could not be read.
async fn relay_whole(
    mut response: reqwest::Response,
    gateway: &Gateway,
) -> (Response, Result<Bytes, String>) {
    let status =
        StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = HeaderMap::new();
    for name in RETURNED {
        if let Some(value) = response.headers().get(name)
            && let Ok(value) = HeaderValue::from_bytes(value.as_bytes())
        {
            headers.insert(name, value);
        }
    }
    let limit = gateway.upstream_limit;
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) if body.len() + chunk.len() <= limit => body.extend_from_slice(&chunk),
            Ok(Some(_)) => {
                let e = format!(
                    "the provider answered more than {limit} bytes, the most the gateway reads"
                );
                return ((StatusCode::BAD_GATEWAY, e.clone()).into_response(), Err(e));
            }
            Ok(None) => break,
            Err(e) => {
                let e = format!("the provider broke off its answer: {e}");
                return ((StatusCode::BAD_GATEWAY, e.clone()).into_response(), Err(e));
            }
        }
    }
    let body = Bytes::from(body);
    ((status, headers, body.clone()).into_response(), Ok(body))
}

/// `GET models`: the provider's list, cut to the models the policy lets the agent use.
async fn models(
    gateway: &Gateway,
    holder: &Caller,
    upstream: &str,
    route: &LlmRoute,
    url: &str,
    headers: &HeaderMap,
) -> Response {
    let response = match send(gateway, holder, upstream, url, headers, Vec::new()).await {
        Ok(response) => response,
        Err(e) => {
            return answer(
                route.api,
                StatusCode::BAD_GATEWAY,
                "UpstreamUnavailable",
                &e,
                json!({}),
            );
        }
    };
    let status = response.status();
    let (relayed, bytes) = relay_whole(response, gateway).await;
    let Ok(bytes) = bytes else { return relayed };
    let Ok(mut list) = serde_json::from_slice::<Value>(&bytes) else {
        return relayed;
    };
    if !status.is_success() {
        return relayed;
    }
    if let Some(data) = list.get_mut("data").and_then(Value::as_array_mut) {
        data.retain(|m| {
            m.get("id")
                .and_then(Value::as_str)
                .is_some_and(|id| route.models.contains(id))
        });
    } else if let Some(id) = list.get("id").and_then(Value::as_str)
        && !route.models.contains(id)
    {
        let message = format!("model {id:?} is not allowed through upstream {upstream:?}");
        return answer(
            route.api,
            StatusCode::NOT_FOUND,
            "ModelNotAllowed",
            &message,
            json!({}),
        );
    }
    (status, axum::Json(list)).into_response()
}

/// Records a model call the engine refused, escalates a new halt, and answers in the provider's
/// shape with the decision.
#[allow(clippy::too_many_arguments)]
async fn refuse_call(
    gateway: &Gateway,
    holder: &Caller,
    policy: &Arc<CompiledPolicy>,
    run: &str,
    upstream: &str,
    endpoint: Endpoint,
    model: &str,
    api: LlmApi,
    route: &LlmRoute,
    arguments: &Value,
    decision: Decision,
    was_halted: bool,
    started: Instant,
) -> Response {
    let mut entry = Entry::new((gateway.now)(), Event::Model, identity_of(Some(holder)));
    entry.agent = Some(holder.agent.clone());
    entry.run = Some(run.to_owned());
    capture_arguments(&mut entry, gateway, route.capture, arguments);
    entry.decision = Some(decision.clone());
    entry.policy = Some(policy_ref(policy));
    entry.model = Some(ModelCallRecord {
        upstream: upstream.to_owned(),
        endpoint: endpoint.name().to_owned(),
        model: model.to_owned(),
        stream: false,
        output_cap: None,
        tokens: ModelUsage::default(),
        metered: Metered::NotSent,
        cost_usd: String::new(),
        status: None,
        finish_reason: None,
        cut: None,
        first_token_us: None,
        duration_us: started.elapsed().as_micros() as u64,
    });
    if let Decision::Halt { ceiling, .. } = &decision {
        entry.ceiling = Some(ceiling.clone());
    }
    if let Err(e) = gateway.audit.append(entry).await {
        return refused(api, &audit_unavailable(e));
    }
    gateway
        .metrics
        .model_calls
        // The model is the agent's string: only one the policy lists may name a series, or an
        // agent could grow the metrics without bound.
        .with_label_values(&[
            holder.agent.as_str(),
            if route.models.contains(model) {
                model
            } else {
                "(not allowed)"
            },
            "refused",
        ])
        .inc();
    let (code, message) = match &decision {
        Decision::Deny { code, message, .. } => (code.as_str(), message.clone()),
        Decision::Halt {
            ceiling, message, ..
        } => (ceiling.clause(), message.clone()),
        other => ("Refused", format!("{other:?}")),
    };
    if let (Decision::Halt { ceiling, .. }, false) = (&decision, was_halted)
        && let Err(refusal) = gateway
            .escalate(holder, run, policy, ceiling.clause())
            .await
    {
        return refused(api, &refusal);
    }
    let tollgate = serde_json::to_value(&decision).unwrap_or_default();
    answer(api, StatusCode::FORBIDDEN, code, &message, tollgate)
}

fn capture_arguments(entry: &mut Entry, gateway: &Gateway, capture: Capture, arguments: &Value) {
    entry.set_arguments(&gateway.redactor, arguments);
    if capture == Capture::Digest {
        entry.arguments = None;
        entry.redacted.clear();
    }
}

/// The wall-clock ceiling, if the run's clock has run out now.
fn out_of_clock(gateway: &Gateway, call: &Call) -> Option<Ceiling> {
    let (end, ceiling) = call.grant.deadline.as_ref()?;
    ((gateway.now)() >= *end).then(|| ceiling.clone())
}

/// Relays a streamed answer event by event, counting its output, and ends it early at the call's
/// share of the run's ceilings or at the kill switch; charges and records it when it ends, even
/// if the agent went away.
fn relay_stream(gateway: Arc<Gateway>, call: Call, mut response: reqwest::Response) -> Response {
    let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let status = response.status().as_u16();
    tokio::spawn(async move {
        let mut reader = sse::Reader::new(gateway.upstream_limit.min(MAX_LLM_BODY));
        let mut tally = Tally::default();
        let mut ending = Ending {
            status: Some(status),
            ..Default::default()
        };
        let cap = call.grant.output_cap;
        let mut tick = tokio::time::interval(KILL_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'stream: loop {
            let chunk = tokio::select! {
                chunk = response.chunk() => chunk,
                _ = tick.tick() => {
                    if gateway.killed(&call.agent) {
                        ending.cut = Some(Cut::KillSwitch);
                        break 'stream;
                    }
                    if let Some(ceiling) = out_of_clock(&gateway, &call) {
                        ending.cut = Some(Cut::Ceiling);
                        ending.reached = Some(ceiling);
                        break 'stream;
                    }
                    continue;
                }
            };
            let done = matches!(chunk, Ok(None));
            let events = match chunk {
                Ok(Some(chunk)) => reader.push(&chunk),
                Ok(None) => {
                    let rest = reader.finish();
                    Ok(rest.into_iter().collect())
                }
                Err(e) => {
                    ending.cut = Some(Cut::Upstream);
                    ending.error = Some(format!("the provider broke off its stream: {e}"));
                    break;
                }
            };
            let events = match events {
                Ok(events) => events,
                Err(e) => {
                    ending.cut = Some(Cut::Upstream);
                    ending.error = Some(e);
                    break;
                }
            };
            for event in events {
                let before = tally.output_events;
                tally.add(event.name.as_deref(), &event.data);
                if tally.output_events > before && ending.first_token.is_none() {
                    ending.first_token = Some(call.started.elapsed());
                }
                if cap.is_some_and(|cap| tally.output_floor() > cap) {
                    // This event would carry the output past what the run can pay for: it is
                    // not relayed.
                    ending.cut = Some(Cut::Ceiling);
                    break 'stream;
                }
                if gateway.killed(&call.agent) {
                    ending.cut = Some(Cut::KillSwitch);
                    break 'stream;
                }
                if let Some(ceiling) = out_of_clock(&gateway, &call) {
                    ending.cut = Some(Cut::Ceiling);
                    ending.reached = Some(ceiling);
                    break 'stream;
                }
                if tx.send(Ok(event.raw)).await.is_err() {
                    ending.cut = Some(Cut::ClientGone);
                    break 'stream;
                }
            }
            if done {
                break;
            }
        }
        drop(response);
        // Charged without usage: what passed, at most the cap (a provider that honours it cannot
        // have written more), unless it was cut for going past it.
        ending.output_tokens = match (cap, ending.cut) {
            (Some(cap), None) => tally.output_bound().min(cap).max(tally.output_floor()),
            _ => tally.output_bound(),
        };
        ending.usage = tally.usage.filter(|_| ending.cut.is_none());
        ending.partial_input = tally.usage.map(|u| u.input_tokens).filter(|n| *n > 0);
        ending.finish = tally.finish.take();
        if let Some(error) = tally.error.take() {
            ending.error = Some(format!("the provider's stream carried an error: {error}"));
        }
        ending.result = Some(json!({"text": std::mem::take(&mut tally.text)}));
        let cut = ending.cut;
        let settled = gateway.settle_model_call(&call, ending).await;
        if let Some(cut) = cut.filter(|c| *c != Cut::ClientGone) {
            let (code, message) = match (cut, &settled) {
                (Cut::KillSwitch, _) => (
                    "KillSwitch".to_owned(),
                    format!(
                        "the kill switch of agent {} is engaged; the answer was ended",
                        call.agent
                    ),
                ),
                (Cut::Ceiling, Ok(Some(ceiling))) => (
                    ceiling.clause().to_owned(),
                    format!(
                        "{ceiling}; the answer was ended and the run is halted ({})",
                        ceiling.clause()
                    ),
                ),
                (Cut::Ceiling, _) => (
                    "OutputCap".to_owned(),
                    format!(
                        "the answer reached the {} output token(s) this call could spend; it was ended",
                        cap.unwrap_or(0)
                    ),
                ),
                _ => (
                    "UpstreamBroken".to_owned(),
                    "the provider's stream broke off".to_owned(),
                ),
            };
            let kind = if cut == Cut::Upstream {
                "api_error"
            } else {
                "permission_error"
            };
            let event = wire::error_event(call.api, kind, &code, &message, json!({"cut": cut}));
            let _ = tx.send(Ok(event)).await;
        }
    });
    let mut response = Response::new(Body::from_stream(rx));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

impl Gateway {
    /// Whether `agent`'s kill switch (or the global one) is engaged now.
    fn killed(&self, agent: &str) -> bool {
        let observed = self.policies.agent(agent).is_none_or(|a| a.killed);
        observed || self.escalation.holds(agent, false)
    }

    /// Decides a model call under the agent's lock: the grant (with its reservation taken), or
    /// the decision that refuses it and whether the run was halted before.
    async fn grant(
        &self,
        holder: &Caller,
        policy: &Arc<CompiledPolicy>,
        call: &ModelCall<'_>,
    ) -> Result<Result<Grant, (Decision, bool)>, Refusal> {
        let now = (self.now)();
        let _following = self.follow(&holder.agent, policy).await?;
        self.hydrate(&holder.agent, call.run_id, policy, now)
            .await?;
        let entry = self.policies.agent(&holder.agent);
        let killed_at_source = entry.as_ref().is_none_or(|a| a.killed);
        let held = self.escalation.holds(&holder.agent, killed_at_source);
        let (namespace, name) = holder.agent.split_once('/').unwrap_or(("", &holder.agent));
        let who = Agent {
            name,
            namespace,
            username: &holder.username,
            killed: killed_at_source || held,
        };
        let state = self.agent_state(&holder.agent);
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        let AgentState {
            window,
            runs,
            reserved,
            ..
        } = &mut *state;
        if self.history.is_none() && !runs.contains(call.run_id) {
            self.metrics.runs_in_memory.inc();
        }
        let run = if self.history.is_some() {
            match runs.get_mut(call.run_id) {
                Some(run) => run,
                None => {
                    return Err(audit_unavailable(format!(
                        "run {:?} left the gateway's memory while its model call waited",
                        call.run_id
                    )));
                }
            }
        } else {
            runs.get_or_default(call.run_id)
        };
        let was_halted = run.halted.is_some();
        let in_flight = reserved.get(call.run_id).copied().unwrap_or_default();
        match policy.grant_model_call(&who, call, run, window, &in_flight, now) {
            Ok(grant) => {
                policy.start_model_call(call.run_id, run, window, now);
                reserved
                    .entry(call.run_id.to_owned())
                    .or_default()
                    .add(&grant);
                Ok(Ok(grant))
            }
            Err(decision) => {
                if let Decision::Halt { ceiling, .. } = &*decision {
                    run.halted.get_or_insert_with(|| ceiling.clone());
                }
                Ok(Err((*decision, was_halted)))
            }
        }
    }

    /// Charges a model call that was let through, releases its reservation, records it (and the
    /// halt its charge causes, escalated). Returns the ceiling it breached, if any.
    async fn settle_model_call(
        &self,
        call: &Call,
        ending: Ending,
    ) -> Result<Option<Ceiling>, Refusal> {
        let now = (self.now)();
        // What the provider reported; else the gateway's bound, never zero: the whole input and
        // the output counted (an answer that broke off is charged what passed).
        let (tokens, metered) = match (ending.free, ending.usage) {
            (true, _) => (ModelUsage::default(), Metered::Reported),
            (false, Some(usage)) => (usage, Metered::Reported),
            (false, None) => (
                ModelUsage {
                    input_tokens: ending.partial_input.unwrap_or(call.input_bound),
                    cached_input_tokens: 0,
                    output_tokens: ending
                        .output_tokens
                        .max(u64::from(call.endpoint.generates())),
                },
                Metered::Estimated,
            ),
        };
        let cost = call.price.as_ref().map(|p| tokens.cost(p));
        let mut usage = Usage {
            tokens: tokens.total(),
            cost: cost.unwrap_or_default(),
        };
        // An answer cut for going past a cap a run ceiling set has reached that ceiling: it is
        // charged at least all it reserved (the provider bills what it wrote, relayed or not),
        // and the run halts.
        let reached = ending.reached.clone().or_else(|| {
            call.grant
                .binding
                .clone()
                .filter(|_| ending.cut == Some(Cut::Ceiling))
        });
        if reached.is_some() {
            usage.tokens = usage.tokens.max(call.grant.reserve.tokens);
            usage.cost = usage.cost.max(call.grant.reserve.cost);
        }
        let (breach, run_counters) = {
            let state = self.agent_state(&call.agent);
            let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
            let AgentState {
                window,
                runs,
                reserved,
                ..
            } = &mut *state;
            if let Some(in_flight) = reserved.get_mut(&call.run) {
                in_flight.release(&call.grant);
                if in_flight.calls == 0 {
                    reserved.remove(&call.run);
                }
            }
            match runs.get_mut(&call.run) {
                Some(run) => {
                    let was_halted = run.halted.is_some();
                    let charged = call.policy.charge_model_call(&usage, run, window, now);
                    if let Some(ceiling) = &reached {
                        run.halted.get_or_insert_with(|| ceiling.clone());
                    }
                    let breach = charged.or(reached.clone()).filter(|_| !was_halted);
                    (breach, Some(counters(run)))
                }
                // Pushed out of memory meanwhile: the record below is what rebuilds it.
                None => (None, None),
            }
        };
        let mut entry = Entry::new(now, Event::Model, identity_of(Some(&call.holder)));
        entry.agent = Some(call.agent.clone());
        entry.run = Some(call.run.clone());
        capture_arguments(&mut entry, self, call.capture, &call.arguments);
        if let Some(result) = &ending.result {
            entry.set_result(&self.redactor, result);
            if call.capture == Capture::Digest {
                entry.result = None;
                entry.redacted.clear();
            }
        }
        entry.decision = Some(call.grant.decision.clone());
        entry.policy = Some(policy_ref(&call.policy));
        entry.usage = Some(usage.clone());
        entry.counters = run_counters.clone();
        entry.error = ending.error.clone();
        entry.latency_us = Some(call.started.elapsed().as_micros() as u64);
        entry.model = Some(ModelCallRecord {
            upstream: call.upstream.clone(),
            endpoint: call.endpoint.name().to_owned(),
            model: call.model.clone(),
            stream: call.stream,
            output_cap: call.grant.output_cap,
            tokens,
            metered,
            cost_usd: call
                .price
                .as_ref()
                .map(|_| usage.cost.to_string())
                .unwrap_or_default(),
            status: ending.status,
            finish_reason: ending.finish.clone(),
            cut: ending.cut,
            first_token_us: ending.first_token.map(|d| d.as_micros() as u64),
            duration_us: call.started.elapsed().as_micros() as u64,
        });
        if self.traced {
            entry.trace_id = call.span.in_scope(crate::trace::current_trace_id);
            call.span
                .record("gen_ai.usage.input_tokens", tokens.input_tokens)
                .record("gen_ai.usage.output_tokens", tokens.output_tokens);
            if let Some(finish) = &ending.finish {
                call.span
                    .record("gen_ai.response.finish_reasons", finish.as_str());
            }
            if let Some(status) = ending.status {
                call.span.record("http.response.status_code", status);
            }
            if let Some(cut) = ending.cut {
                call.span.record("tollgate.cut", tracing::field::debug(cut));
            }
        }
        self.audit.append(entry).await.map_err(audit_unavailable)?;

        self.count_charged(&call.agent, "metered", usage.tokens, usage.cost);
        let labels = [call.agent.as_str(), call.model.as_str()];
        let m = &self.metrics;
        m.model_tokens
            .with_label_values(&[labels[0], labels[1], "input"])
            .inc_by(tokens.input_tokens);
        m.model_tokens
            .with_label_values(&[labels[0], labels[1], "cachedInput"])
            .inc_by(tokens.cached_input_tokens);
        m.model_tokens
            .with_label_values(&[labels[0], labels[1], "output"])
            .inc_by(tokens.output_tokens);
        if let Some(cost) = cost {
            let micro = (cost * rust_decimal::Decimal::from(1_000_000u32)).trunc();
            m.model_cost_microusd
                .with_label_values(&labels)
                .inc_by(u64::try_from(micro).unwrap_or(u64::MAX));
        }
        let outcome = match (ending.cut, ending.free) {
            (Some(_), _) => "cut",
            (None, true) => "providerError",
            (None, false) => "ok",
        };
        m.model_calls
            .with_label_values(&[labels[0], labels[1], outcome])
            .inc();

        if let Some(ceiling) = &breach {
            let mut halt = Entry::new(now, Event::Halt, identity_of(Some(&call.holder)));
            halt.agent = Some(call.agent.clone());
            halt.run = Some(call.run.clone());
            halt.policy = Some(policy_ref(&call.policy));
            halt.counters = run_counters;
            halt.ceiling = Some(ceiling.clone());
            halt.error = Some(format!(
                "{} breached by a model call of {}; the run is halted and every further call of it is refused",
                ceiling.clause(),
                call.model
            ));
            self.audit.append(halt).await.map_err(audit_unavailable)?;
            tracing::warn!(agent = %call.agent, clause = ceiling.clause(), "run halted by a model call");
            self.escalate(&call.holder, &call.run, &call.policy, ceiling.clause())
                .await?;
        }
        Ok(breach)
    }
}
