//! A FAKE model provider, for Tollgate's tests and the README's example only: it speaks the
//! OpenAI (chat completions, responses, embeddings, models) and Anthropic (messages,
//! count_tokens, models) wire formats, streamed and not, with usage, tool-call deltas and errors,
//! and answers with words it makes up. It is not a model and proxies nothing.
//!
//! `cargo run -p tollgate-gateway --example fake-llm -- 127.0.0.1:8490` (key: `sk-fake-provider`).
//!
//! What it answers depends on the model named:
//! - any name: one word per output token, as many as the request's cap allows (at most 40);
//! - `greedy`: ignores the cap and streams 5,000 words (a provider that does not honour it);
//! - `no-usage`: never reports usage;
//! - `busy`: HTTP 429 in the provider's error shape;
//! - `slow`: one word every 100 ms, as many as the cap allows, at most 600 (for the kill switch);
//! - `tools`: a tool call (streamed as argument deltas);
//! - `bench`: as any name, without pauses between words (for benchmarks).
//!
//! `GET /_seen` answers the last request it received (headers and body), so tests can check what
//! left the gateway.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// The provider key the fake accepts (`Authorization: Bearer` or `x-api-key`).
pub const PROVIDER_KEY: &str = "sk-fake-provider";

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Value>>);

/// The fake provider's routes.
pub fn router() -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai_chat))
        .route("/v1/responses", post(openai_responses))
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/v1/models", get(models))
        .route("/v1/messages", post(anthropic_messages))
        .route("/v1/messages/count_tokens", post(anthropic_count))
        .route("/_seen", get(seen))
        .with_state(Seen::default())
}

/// Serves the fake provider on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener) {
    axum::serve(listener, router())
        .await
        .expect("the fake provider serves");
}

async fn seen(State(seen): State<Seen>) -> axum::Json<Value> {
    axum::Json(seen.0.lock().unwrap().clone())
}

fn remember(seen: &Seen, headers: &HeaderMap, body: &Value) {
    let headers: serde_json::Map<String, Value> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                Value::String(v.to_str().unwrap_or("").to_owned()),
            )
        })
        .collect();
    *seen.0.lock().unwrap() = json!({"headers": headers, "body": body});
}

fn authorized(headers: &HeaderMap) -> bool {
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok());
    let key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    bearer == Some(&format!("Bearer {PROVIDER_KEY}")) || key == Some(PROVIDER_KEY)
}

fn openai_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        axum::Json(
            json!({"error": {"message": message, "type": kind, "code": kind, "param": null}}),
        ),
    )
        .into_response()
}

fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"type": "error", "error": {"type": kind, "message": message}})),
    )
        .into_response()
}

/// Input tokens, as the fake counts them: a token per four bytes of the messages' text.
fn prompt_tokens(body: &Value) -> u64 {
    fn text(v: &Value) -> u64 {
        match v {
            Value::String(s) => s.len() as u64,
            Value::Array(a) => a.iter().map(text).sum(),
            Value::Object(o) => o
                .iter()
                .filter(|(k, _)| *k != "role")
                .map(|(_, v)| text(v))
                .sum(),
            _ => 0,
        }
    }
    let n = text(
        body.get("messages")
            .or(body.get("input"))
            .unwrap_or(&Value::Null),
    );
    n.div_ceil(4).max(1)
}

/// How many words (tokens) to answer with, and how fast.
fn plan(model: &str, cap: Option<u64>) -> (u64, Duration) {
    match model {
        "greedy" => (5_000, Duration::ZERO),
        "bench" => (cap.unwrap_or(16).min(40), Duration::ZERO),
        "slow" => (cap.unwrap_or(600).min(600), Duration::from_millis(100)),
        _ => (cap.unwrap_or(40).min(40), Duration::from_millis(2)),
    }
}

fn word(i: u64) -> String {
    const WORDS: [&str; 8] = ["the", "gate", "holds", "every", "call", "to", "its", "rule"];
    format!("{} ", WORDS[(i % 8) as usize])
}

fn sse(events: impl futures::Stream<Item = String> + Send + 'static) -> Response {
    use futures::StreamExt;
    let body = Body::from_stream(events.map(Ok::<_, std::convert::Infallible>));
    ([("content-type", "text/event-stream")], body).into_response()
}

/// A stream of `n` items, `every` apart.
fn paced(n: u64, every: Duration) -> impl futures::Stream<Item = u64> {
    futures::stream::unfold(0u64, move |i| async move {
        if i >= n {
            return None;
        }
        if !every.is_zero() {
            tokio::time::sleep(every).await;
        }
        Some((i, i + 1))
    })
}

async fn openai_chat(
    State(seen): State<Seen>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    remember(&seen, &headers, &body);
    if !authorized(&headers) {
        return openai_error(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "Incorrect API key provided",
        );
    }
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    if model == "busy" {
        return openai_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "Rate limit reached for requests",
        );
    }
    let cap = body["max_completion_tokens"]
        .as_u64()
        .or(body["max_tokens"].as_u64());
    let (n, every) = plan(&model, cap);
    let input = prompt_tokens(&body);
    let usage = json!({"prompt_tokens": input, "completion_tokens": n, "total_tokens": input + n,
        "prompt_tokens_details": {"cached_tokens": 0}});
    let finish = if model == "tools" {
        "tool_calls"
    } else if cap.is_some_and(|c| n >= c) {
        "length"
    } else {
        "stop"
    };
    if body["stream"] != json!(true) {
        // A whole answer takes as long as its stream would.
        if !every.is_zero() {
            tokio::time::sleep(every * n as u32).await;
        }
        let text: String = (0..n).map(word).collect();
        let message = if model == "tools" {
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "lookup", "arguments": "{\"id\":\"C1\"}"}}]})
        } else {
            json!({"role": "assistant", "content": text})
        };
        let mut answer = json!({"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}]});
        if model != "no-usage" {
            answer["usage"] = usage;
        }
        return axum::Json(answer).into_response();
    }
    let include_usage =
        body["stream_options"]["include_usage"] == json!(true) && model != "no-usage";
    let chunk = move |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let first = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
    let tools = first["model"] == "tools";
    let body_chunks = {
        let chunk = chunk.clone();
        futures::StreamExt::map(paced(n, every), move |i| {
            let delta = if tools {
                json!({"tool_calls": [{"index": 0, "function": {"arguments": word(i)}}]})
            } else {
                json!({"content": word(i)})
            };
            format!("data: {}\n\n", chunk(delta, Value::Null))
        })
    };
    let last = chunk(json!({}), json!(finish));
    let mut tail = vec![format!("data: {last}\n\n")];
    if include_usage {
        let usage_chunk = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
            "model": first["model"], "choices": [], "usage": usage});
        tail.push(format!("data: {usage_chunk}\n\n"));
    }
    tail.push("data: [DONE]\n\n".to_owned());
    use futures::StreamExt;
    let stream = futures::stream::iter([format!("data: {first}\n\n")])
        .chain(body_chunks)
        .chain(futures::stream::iter(tail));
    sse(stream)
}

async fn openai_responses(
    State(seen): State<Seen>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    remember(&seen, &headers, &body);
    if !authorized(&headers) {
        return openai_error(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "Incorrect API key provided",
        );
    }
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let (n, _) = plan(&model, body["max_output_tokens"].as_u64());
    let input = prompt_tokens(&body);
    let text: String = (0..n).map(word).collect();
    axum::Json(json!({"id": "resp_fake", "object": "response", "created_at": 0, "model": model, "status": "completed",
        "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "usage": {"input_tokens": input, "output_tokens": n, "total_tokens": input + n,
            "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}}))
    .into_response()
}

async fn openai_embeddings(
    State(seen): State<Seen>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    remember(&seen, &headers, &body);
    if !authorized(&headers) {
        return openai_error(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "Incorrect API key provided",
        );
    }
    let input = prompt_tokens(&body);
    axum::Json(json!({"object": "list", "model": body["model"],
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
        "usage": {"prompt_tokens": input, "total_tokens": input}}))
    .into_response()
}

async fn models(State(seen): State<Seen>, headers: HeaderMap) -> Response {
    remember(&seen, &headers, &Value::Null);
    let ids = [
        "gpt-4o-mini",
        "gpt-4o",
        "claude-haiku-4-5",
        "greedy",
        "slow",
    ];
    let data: Vec<Value> = ids
        .iter()
        .map(|id| {
            json!({"id": id, "object": "model", "created": 0, "owned_by": "fake",
            "type": "model", "display_name": id, "created_at": "2026-01-01T00:00:00Z"})
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data, "has_more": false, "first_id": null, "last_id": null})).into_response()
}

async fn anthropic_count(
    State(seen): State<Seen>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    remember(&seen, &headers, &body);
    if !authorized(&headers) {
        return anthropic_error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid x-api-key",
        );
    }
    axum::Json(json!({"input_tokens": prompt_tokens(&body)})).into_response()
}

async fn anthropic_messages(
    State(seen): State<Seen>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    remember(&seen, &headers, &body);
    if !authorized(&headers) {
        return anthropic_error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid x-api-key",
        );
    }
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    if model == "busy" {
        return anthropic_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "Number of requests has exceeded your rate limit",
        );
    }
    let Some(cap) = body["max_tokens"].as_u64() else {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "max_tokens: Field required",
        );
    };
    let (n, every) = plan(&model, Some(cap));
    let input = prompt_tokens(&body);
    let stop = if n >= cap { "max_tokens" } else { "end_turn" };
    let usage_out = if model == "no-usage" {
        Value::Null
    } else {
        json!({"output_tokens": n})
    };
    if body["stream"] != json!(true) {
        let text: String = (0..n).map(word).collect();
        let mut answer = json!({"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": stop, "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": n, "cache_read_input_tokens": 0,
                "cache_creation_input_tokens": 0}});
        if model == "no-usage" {
            answer.as_object_mut().unwrap().remove("usage");
        }
        return axum::Json(answer).into_response();
    }
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let start_usage = if model == "no-usage" {
        Value::Null
    } else {
        json!({"input_tokens": input, "output_tokens": 1})
    };
    let head = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message",
            "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": start_usage}}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    let deltas = futures::StreamExt::map(paced(n, every), move |i| {
        event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": word(i)}}),
        )
    });
    let mut delta =
        json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}});
    if !usage_out.is_null() {
        delta["usage"] = usage_out;
    }
    let tail = vec![
        event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        event("message_delta", delta),
        event("message_stop", json!({"type": "message_stop"})),
    ];
    use futures::StreamExt;
    sse(futures::stream::iter(head)
        .chain(deltas)
        .chain(futures::stream::iter(tail)))
}

#[tokio::main]
async fn main() {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8490".to_owned());
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .expect("the address is free");
    eprintln!(
        "FAKE model provider (for tests and examples; not a model) on http://{address}/v1, key {PROVIDER_KEY}"
    );
    serve(listener).await;
}
