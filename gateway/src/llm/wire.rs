//! The providers' wire formats, as far as metering needs them: which endpoints exist, where a
//! request names its output cap, where an answer reports its usage, what a streamed event adds to
//! the output, and how an error looks to each provider's SDK. Everything read here comes from an
//! agent or a provider: hostile, so nothing panics and every number is bounded.

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tollgate_crds::policy::LlmApi;
use tollgate_engine::llm::ModelUsage;

/// An endpoint the proxy serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// OpenAI `POST chat/completions`.
    Chat,
    /// OpenAI `POST responses`.
    Responses,
    /// OpenAI `POST embeddings`.
    Embeddings,
    /// Anthropic `POST v1/messages`.
    Messages,
    /// Anthropic `POST v1/messages/count_tokens` (free: not metered).
    CountTokens,
    /// `GET models` (OpenAI) or `GET v1/models` (Anthropic), and one model by id.
    Models,
}

impl Endpoint {
    /// The endpoint at `path` (after `/llm/<upstream>/`) for `api`, if the proxy serves it.
    pub fn of(api: LlmApi, get: bool, path: &str) -> Option<Self> {
        let path = path.trim_matches('/');
        let models = |prefix: &str| {
            path == prefix
                || path
                    .strip_prefix(prefix)
                    .and_then(|rest| rest.strip_prefix('/'))
                    .is_some_and(|id| {
                        // A model id, nothing a URL would read as a path or an escape.
                        !id.starts_with('.')
                            && id.bytes().all(|b| {
                                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':')
                            })
                    })
        };
        match (api, get, path) {
            (LlmApi::OpenAI, false, "chat/completions") => Some(Self::Chat),
            (LlmApi::OpenAI, false, "responses") => Some(Self::Responses),
            (LlmApi::OpenAI, false, "embeddings") => Some(Self::Embeddings),
            (LlmApi::OpenAI, true, _) if models("models") => Some(Self::Models),
            (LlmApi::Anthropic, false, "v1/messages") => Some(Self::Messages),
            (LlmApi::Anthropic, false, "v1/messages/count_tokens") => Some(Self::CountTokens),
            (LlmApi::Anthropic, true, _) if models("v1/models") => Some(Self::Models),
            _ => None,
        }
    }

    /// The endpoints of `api`, for the message that names what is served.
    pub fn served(api: LlmApi) -> &'static str {
        match api {
            LlmApi::OpenAI => {
                "POST chat/completions, POST responses, POST embeddings, GET models[/ID]"
            }
            LlmApi::Anthropic => {
                "POST v1/messages, POST v1/messages/count_tokens, GET v1/models[/ID]"
            }
        }
    }

    /// The path as recorded.
    pub fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat/completions",
            Self::Responses => "responses",
            Self::Embeddings => "embeddings",
            Self::Messages => "v1/messages",
            Self::CountTokens => "v1/messages/count_tokens",
            Self::Models => "models",
        }
    }

    /// Whether the model writes output tokens here.
    pub fn generates(self) -> bool {
        matches!(self, Self::Chat | Self::Responses | Self::Messages)
    }

    /// Whether a call here costs anything, and so belongs to a run.
    pub fn metered(self) -> bool {
        matches!(
            self,
            Self::Chat | Self::Responses | Self::Embeddings | Self::Messages
        )
    }

    /// The request fields that carry the output cap, the one the gateway writes first.
    fn cap_fields(self) -> &'static [&'static str] {
        match self {
            // max_tokens is the older name; both are read, the newer one written.
            Self::Chat => &["max_completion_tokens", "max_tokens"],
            Self::Responses => &["max_output_tokens"],
            Self::Messages => &["max_tokens"],
            _ => &[],
        }
    }
}

/// The output cap the request asks for: the smallest of its cap fields. A cap that is not a
/// positive integer is an error naming the field.
pub(crate) fn requested_output(
    endpoint: Endpoint,
    body: &Map<String, Value>,
) -> Result<Option<u64>, String> {
    let mut cap: Option<u64> = None;
    for field in endpoint.cap_fields() {
        match body.get(*field) {
            None | Some(Value::Null) => {}
            Some(value) => {
                let n = value
                    .as_u64()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("{field} must be a positive integer, not {value}"))?;
                cap = Some(cap.map_or(n, |c| c.min(n)));
            }
        }
    }
    Ok(cap)
}

/// Refuses what would make one call produce several answers' worth of output under one cap.
pub(crate) fn check_single_answer(
    endpoint: Endpoint,
    body: &Map<String, Value>,
) -> Result<(), String> {
    if endpoint == Endpoint::Chat {
        match body.get("n") {
            None | Some(Value::Null) => {}
            Some(n) if n.as_u64() == Some(1) => {}
            Some(n) => {
                return Err(format!(
                    "n is {n}: Tollgate meters one choice per call; send n: 1 (or none) and call again for more"
                ));
            }
        }
    }
    Ok(())
}

/// Writes `cap` into the request's cap fields (every one it used, so no older field can ask for
/// more), adding the endpoint's own field when it had none.
pub(crate) fn set_output_cap(endpoint: Endpoint, body: &mut Map<String, Value>, cap: u64) {
    let fields = endpoint.cap_fields();
    let mut written = false;
    for field in fields {
        if body.get(*field).is_some_and(|v| !v.is_null()) {
            body.insert((*field).to_owned(), cap.into());
            written = true;
        }
    }
    if !written && let Some(field) = fields.first() {
        body.insert((*field).to_owned(), cap.into());
    }
}

/// Whether the request asks for a stream.
pub(crate) fn is_stream(body: &Map<String, Value>) -> bool {
    body.get("stream") == Some(&Value::Bool(true))
}

/// Asks an OpenAI-style stream to end with its usage, so it can be charged as reported.
pub(crate) fn ask_usage(endpoint: Endpoint, body: &mut Map<String, Value>) {
    if endpoint == Endpoint::Chat && is_stream(body) {
        let options = body
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        if !options.is_object() {
            *options = Value::Object(Map::new());
        }
        if let Value::Object(options) = options {
            options.insert("include_usage".to_owned(), Value::Bool(true));
        }
    }
}

/// Tokens an image, audio or file part may take beyond its bytes (a URL's bytes say nothing of
/// the picture it names): above what the providers charge for their largest image.
const MEDIA_TOKENS: u64 = 6_000;

/// A bound on the request's input tokens that is never below the real count: every byte of text
/// is at most one token for the byte-level tokenizers these providers use, plus a little per
/// structure (roles, message framing) and a generous allowance per media part.
pub(crate) fn input_bound(body: &Value) -> u64 {
    input_tokens(body, &|s: &str| s.len() as u64)
}

/// The request's input tokens, counting each string with `tokens` and adding the framing and
/// media allowances of [`input_bound`].
fn input_tokens(body: &Value, tokens: &dyn Fn(&str) -> u64) -> u64 {
    fn walk(value: &Value, sum: &mut u64, tokens: &dyn Fn(&str) -> u64) {
        match value {
            Value::String(s) => *sum = sum.saturating_add(tokens(s)),
            Value::Array(items) => {
                for item in items {
                    walk(item, sum, tokens);
                }
            }
            Value::Object(map) => {
                *sum = sum.saturating_add(8);
                if let Some(Value::String(kind)) = map.get("type")
                    && [
                        "image",
                        "audio",
                        "file",
                        "document",
                        "input_image",
                        "input_audio",
                        "input_file",
                        "image_url",
                    ]
                    .contains(&kind.as_str())
                {
                    *sum = sum.saturating_add(MEDIA_TOKENS);
                }
                for (key, value) in map {
                    if key != "model" {
                        walk(value, sum, tokens);
                    }
                }
            }
            Value::Number(_) | Value::Bool(_) | Value::Null => *sum = sum.saturating_add(1),
        }
    }
    let mut sum = 0;
    walk(body, &mut sum, tokens);
    sum
}

/// The most text a request may hold to be counted with the model's tokenizer; a larger one is
/// bounded by its bytes (counting costs CPU the agent would choose).
const MAX_TOKENIZED: u64 = 1024 * 1024;

/// The tokenizers the gateway knows: OpenAI's, for the model families tiktoken names.
#[derive(Debug, Clone, Copy)]
enum Bpe {
    O200k,
    Cl100k,
}

impl Bpe {
    fn of(api: LlmApi, model: &str) -> Option<Self> {
        use tiktoken_rs::tokenizer::{Tokenizer, get_tokenizer};
        if api != LlmApi::OpenAI {
            return None;
        }
        match get_tokenizer(model)? {
            Tokenizer::O200kBase | Tokenizer::O200kHarmony => Some(Self::O200k),
            Tokenizer::Cl100kBase => Some(Self::Cl100k),
            _ => None,
        }
    }

    /// The tokenizer, once built (building one takes a few hundred milliseconds).
    fn ready(self) -> Option<&'static tiktoken_rs::CoreBPE> {
        self.cell().get().copied()
    }

    fn cell(self) -> &'static std::sync::OnceLock<&'static tiktoken_rs::CoreBPE> {
        static O200K: std::sync::OnceLock<&'static tiktoken_rs::CoreBPE> =
            std::sync::OnceLock::new();
        static CL100K: std::sync::OnceLock<&'static tiktoken_rs::CoreBPE> =
            std::sync::OnceLock::new();
        match self {
            Self::O200k => &O200K,
            Self::Cl100k => &CL100K,
        }
    }

    fn build(self) -> &'static tiktoken_rs::CoreBPE {
        self.cell().get_or_init(|| match self {
            Self::O200k => tiktoken_rs::o200k_base_singleton(),
            Self::Cl100k => tiktoken_rs::cl100k_base_singleton(),
        })
    }
}

fn text_bytes(body: &Value) -> u64 {
    input_tokens(body, &|s: &str| s.len() as u64)
}

/// The request's input tokens as the gateway estimates them before forwarding: with the model's
/// own tokenizer where one is public (OpenAI's families, counted string by string, one token
/// more per string than the tokenizer says, with the framing and media allowances of
/// [`input_bound`]), else [`input_bound`]. Large texts and a tokenizer's first build are counted
/// off the async workers.
pub(crate) async fn input_estimate(api: LlmApi, model: &str, body: &Value) -> u64 {
    let Some(bpe) = Bpe::of(api, model) else {
        return input_bound(body);
    };
    let bytes = text_bytes(body);
    if bytes > MAX_TOKENIZED {
        return input_bound(body);
    }
    let count = |bpe: &tiktoken_rs::CoreBPE, body: &Value| {
        input_tokens(body, &|s: &str| bpe.encode_ordinary(s).len() as u64 + 1)
    };
    if let Some(ready) = bpe.ready()
        && bytes <= 16 * 1024
    {
        return count(ready, body);
    }
    let owned = body.clone();
    match tokio::task::spawn_blocking(move || count(bpe.build(), &owned)).await {
        Ok(tokens) => tokens,
        Err(_) => input_bound(body),
    }
}

fn count(value: Option<&Value>) -> Option<u64> {
    value.and_then(Value::as_u64)
}

/// The usage an answer (or a usage object) reports, in either provider's shape.
pub(crate) fn usage_of(usage: &Value) -> Option<ModelUsage> {
    let usage = usage.as_object()?;
    // OpenAI: prompt/completion (chat, embeddings) or input/output (responses). Anthropic:
    // input/output, where input leaves out what was read from or written to the cache.
    let anthropic_cache = count(usage.get("cache_read_input_tokens")).unwrap_or(0);
    let anthropic_written = count(usage.get("cache_creation_input_tokens")).unwrap_or(0);
    let input = count(usage.get("prompt_tokens")).or(count(usage.get("input_tokens")));
    let output = count(usage.get("completion_tokens")).or(count(usage.get("output_tokens")));
    if input.is_none() && output.is_none() {
        return None;
    }
    let cached = usage
        .get("prompt_tokens_details")
        .or(usage.get("input_tokens_details"))
        .and_then(|d| count(d.get("cached_tokens")))
        .unwrap_or(0);
    Some(ModelUsage {
        input_tokens: input
            .unwrap_or(0)
            .saturating_add(anthropic_cache)
            .saturating_add(anthropic_written),
        cached_input_tokens: cached.saturating_add(anthropic_cache),
        output_tokens: output.unwrap_or(0),
    })
}

/// Why the model stopped, from a whole answer.
pub(crate) fn finish_of(answer: &Value) -> Option<String> {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    answer
        .get("choices")
        .and_then(|c| c.get(0))
        .and_then(|c| text(c.get("finish_reason")))
        .or_else(|| text(answer.get("stop_reason")))
        .or_else(|| {
            answer
                .get("incomplete_details")
                .and_then(|d| text(d.get("reason")))
        })
        .or_else(|| text(answer.get("status")).filter(|_| answer.get("output").is_some()))
}

/// The text of a whole answer, as the agent reads it.
pub(crate) fn text_of(answer: &Value) -> String {
    let mut out = String::new();
    if let Some(choices) = answer.get("choices").and_then(Value::as_array) {
        for choice in choices {
            strings(choice.get("message"), &mut out);
        }
    }
    if let Some(content) = answer.get("content") {
        strings(Some(content), &mut out);
    }
    if let Some(output) = answer.get("output") {
        strings(Some(output), &mut out);
    }
    out
}

fn strings(value: Option<&Value>, out: &mut String) {
    match value {
        Some(Value::String(s)) => out.push_str(s),
        Some(Value::Array(items)) => items.iter().for_each(|i| strings(Some(i), out)),
        Some(Value::Object(map)) => {
            for (key, value) in map {
                // Identifiers and roles are not output.
                if !matches!(
                    key.as_str(),
                    "id" | "type" | "role" | "status" | "index" | "call_id"
                ) {
                    strings(Some(value), out);
                }
            }
        }
        _ => {}
    }
}

/// What a stream has produced so far.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Events that carried output.
    pub output_events: u64,
    /// Bytes of output text.
    pub output_bytes: u64,
    /// The usage the stream reported, merged field by field (Anthropic reports input at the
    /// start and output at the end; both are cumulative).
    pub usage: Option<ModelUsage>,
    /// Why the model stopped.
    pub finish: Option<String>,
    /// The provider sent an error event.
    pub error: Option<String>,
    /// The output text (kept for the digest, and for Full capture).
    pub text: String,
}

impl Tally {
    /// The output so far in tokens, at least: one per output event, one per eight bytes (longer
    /// tokens are rare), or what the provider counted. A provider that honours the cap never
    /// passes it by this count, and one that does not is caught within an event.
    pub fn output_floor(&self) -> u64 {
        let reported = self.usage.map_or(0, |u| u.output_tokens);
        self.output_events
            .max(self.output_bytes.div_ceil(8))
            .max(reported)
    }

    /// The output so far in tokens, at most: every byte a token (the byte-level tokenizers never
    /// do worse). What an answer without usage is charged.
    pub fn output_bound(&self) -> u64 {
        self.output_bytes.max(self.output_floor())
    }

    fn merge(&mut self, usage: ModelUsage) {
        let merged = match self.usage {
            None => usage,
            Some(seen) => ModelUsage {
                input_tokens: seen.input_tokens.max(usage.input_tokens),
                cached_input_tokens: seen.cached_input_tokens.max(usage.cached_input_tokens),
                output_tokens: seen.output_tokens.max(usage.output_tokens),
            },
        };
        self.usage = Some(merged);
    }

    /// Reads one event of the stream.
    pub fn add(&mut self, name: Option<&str>, data: &str) {
        if data == "[DONE]" {
            return;
        }
        let Ok(value) = serde_json::from_str::<Value>(data) else {
            return;
        };
        if name == Some("error") || value.get("error").is_some_and(|e| !e.is_null()) {
            let error = value.get("error").unwrap_or(&value);
            self.error = Some(
                error
                    .get("message")
                    .and_then(Value::as_str)
                    .map_or_else(|| error.to_string(), str::to_owned),
            );
            return;
        }
        let mut text = String::new();
        // OpenAI chat: choices[].delta, usage at the end.
        if let Some(choices) = value.get("choices").and_then(Value::as_array) {
            for choice in choices {
                strings(choice.get("delta"), &mut text);
                if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                    self.finish = Some(reason.to_owned());
                }
            }
        }
        let kind = value
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        match kind {
            // Anthropic.
            "message_start" => {
                if let Some(usage) = value.get("message").and_then(|m| m.get("usage")) {
                    self.merge_usage(usage);
                }
            }
            "content_block_delta" => strings(value.get("delta"), &mut text),
            "message_delta" => {
                if let Some(reason) = value
                    .get("delta")
                    .and_then(|d| d.get("stop_reason"))
                    .and_then(Value::as_str)
                {
                    self.finish = Some(reason.to_owned());
                }
            }
            // OpenAI responses.
            "response.completed" | "response.incomplete" | "response.failed" => {
                if let Some(response) = value.get("response") {
                    if let Some(usage) = response.get("usage") {
                        self.merge_usage(usage);
                    }
                    self.finish = finish_of(response).or(Some(kind.to_owned()));
                }
            }
            kind if kind.starts_with("response.") && kind.ends_with(".delta") => {
                strings(value.get("delta"), &mut text);
            }
            _ => {}
        }
        // OpenAI chat's last chunk, and Anthropic's message_delta.
        if kind != "message_start"
            && let Some(usage) = value.get("usage").filter(|u| !u.is_null())
        {
            self.merge_usage(usage);
        }
        if !text.is_empty() {
            self.output_events += 1;
            self.output_bytes = self.output_bytes.saturating_add(text.len() as u64);
            if self.text.len() < crate::llm::MAX_CAPTURE {
                self.text.push_str(&text);
            }
        }
    }

    fn merge_usage(&mut self, usage: &Value) {
        if let Some(usage) = usage_of(usage) {
            self.merge(usage);
        }
    }
}

/// How each provider's SDK reads an error: the body of an error answer.
pub(crate) fn error_body(
    api: LlmApi,
    kind: &str,
    code: &str,
    message: &str,
    tollgate: Value,
) -> Value {
    match api {
        LlmApi::OpenAI => json!({
            "error": {"message": message, "type": kind, "code": code, "param": null},
            "tollgate": tollgate,
        }),
        LlmApi::Anthropic => json!({
            "type": "error",
            "error": {"type": kind, "message": message},
            "tollgate": tollgate,
        }),
    }
}

/// The event that ends a stream with an error, as each provider's SDK raises it.
pub(crate) fn error_event(
    api: LlmApi,
    kind: &str,
    code: &str,
    message: &str,
    tollgate: Value,
) -> Bytes {
    let body = error_body(api, kind, code, message, tollgate);
    let text = match api {
        LlmApi::OpenAI => format!("data: {body}\n\n"),
        LlmApi::Anthropic => format!("event: error\ndata: {body}\n\n"),
    };
    Bytes::from(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_the_providers_own_paths_and_nothing_else() {
        use Endpoint::*;
        let cases = [
            (LlmApi::OpenAI, false, "chat/completions", Some(Chat)),
            (LlmApi::OpenAI, false, "/responses", Some(Responses)),
            (LlmApi::OpenAI, true, "models/gpt-4o", Some(Models)),
            (LlmApi::OpenAI, true, "models/a/../../admin", None),
            (LlmApi::OpenAI, true, "models/..", None),
            (LlmApi::OpenAI, true, "models/%2e%2e", None),
            (LlmApi::OpenAI, true, "models/", Some(Models)),
            (
                LlmApi::Anthropic,
                true,
                "v1/models/claude-haiku-4-5",
                Some(Models),
            ),
            (LlmApi::OpenAI, false, "v1/messages", None),
            (LlmApi::OpenAI, true, "chat/completions", None),
            (LlmApi::OpenAI, false, "files", None),
            (LlmApi::Anthropic, false, "v1/messages", Some(Messages)),
            (
                LlmApi::Anthropic,
                false,
                "v1/messages/count_tokens",
                Some(CountTokens),
            ),
            (LlmApi::Anthropic, false, "v1/messages/batches", None),
            (LlmApi::Anthropic, false, "chat/completions", None),
        ];
        for (api, get, path, want) in cases {
            assert_eq!(Endpoint::of(api, get, path), want, "{api:?} {path}");
        }
    }

    #[test]
    fn caps_are_read_strictly_and_written_to_every_field_used() {
        let body = json!({"max_tokens": 500, "max_completion_tokens": 900});
        let body = body.as_object().unwrap();
        assert_eq!(requested_output(Endpoint::Chat, body), Ok(Some(500)));
        let mut written = body.clone();
        set_output_cap(Endpoint::Chat, &mut written, 40);
        assert_eq!(written["max_tokens"], 40);
        assert_eq!(written["max_completion_tokens"], 40);
        let mut bare = Map::new();
        set_output_cap(Endpoint::Chat, &mut bare, 7);
        assert_eq!(Value::Object(bare), json!({"max_completion_tokens": 7}));
        for bad in [
            json!(-1),
            json!(0),
            json!(1.5),
            json!("9"),
            json!(u64::MAX as f64),
        ] {
            let body = json!({"max_tokens": bad});
            let error =
                requested_output(Endpoint::Messages, body.as_object().unwrap()).unwrap_err();
            assert!(
                error.starts_with("max_tokens must be a positive integer"),
                "{error}"
            );
        }
    }

    #[test]
    fn usage_is_read_in_both_shapes_with_the_cache_counted_as_input() {
        let openai = json!({"prompt_tokens": 100, "completion_tokens": 20,
            "prompt_tokens_details": {"cached_tokens": 60}});
        assert_eq!(
            usage_of(&openai),
            Some(ModelUsage {
                input_tokens: 100,
                cached_input_tokens: 60,
                output_tokens: 20
            })
        );
        let anthropic = json!({"input_tokens": 10, "cache_read_input_tokens": 90,
            "cache_creation_input_tokens": 5, "output_tokens": 7});
        assert_eq!(
            usage_of(&anthropic),
            Some(ModelUsage {
                input_tokens: 105,
                cached_input_tokens: 90,
                output_tokens: 7
            })
        );
        assert_eq!(usage_of(&json!({"prompt_tokens": -3})), None);
        assert_eq!(usage_of(&json!("many")), None);
    }

    #[tokio::test]
    async fn openai_prompts_are_counted_with_their_tokenizer_and_others_by_bytes() {
        let text = "The gate holds every call to its rule. ".repeat(50);
        let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]});
        let tokens = input_estimate(LlmApi::OpenAI, "gpt-4o-mini", &body).await;
        // o200k: 9 tokens per sentence, 450 for the text; plus framing.
        assert!((450..520).contains(&tokens), "{tokens}");
        assert!(tokens < input_bound(&body) / 3, "far below the byte bound");
        let bytes = input_estimate(LlmApi::Anthropic, "claude-haiku-4-5", &body).await;
        assert_eq!(bytes, input_bound(&body));
        let unknown = input_estimate(LlmApi::OpenAI, "llama-3-70b", &body).await;
        assert_eq!(unknown, input_bound(&body), "an unknown family: bytes");
    }

    #[test]
    fn the_input_bound_is_never_below_the_text() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "héllo wörld"}]});
        assert!(input_bound(&body) >= "héllo wörld".len() as u64);
        let image = json!({"messages": [{"role": "user", "content": [{"type": "image_url",
            "image_url": {"url": "https://x/y.png"}}]}]});
        assert!(input_bound(&image) > MEDIA_TOKENS);
    }

    #[test]
    fn a_stream_tally_counts_output_and_merges_usage() {
        let mut tally = Tally::default();
        tally.add(
            None,
            r#"{"choices":[{"delta":{"role":"assistant","content":"Hel"}}]}"#,
        );
        tally.add(None, r#"{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{\"a\":1}"}}]},"finish_reason":"tool_calls"}]}"#);
        tally.add(
            None,
            r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4}}"#,
        );
        tally.add(None, "[DONE]");
        assert_eq!(tally.output_events, 2);
        assert_eq!(tally.text, "Hel{\"a\":1}");
        assert_eq!(tally.finish.as_deref(), Some("tool_calls"));
        assert_eq!(tally.usage.unwrap().total(), 13);

        let mut tally = Tally::default();
        tally.add(
            Some("message_start"),
            r#"{"type":"message_start","message":{"usage":{"input_tokens":30,"output_tokens":1}}}"#,
        );
        tally.add(
            Some("content_block_delta"),
            r#"{"type":"content_block_delta","delta":{"type":"text_delta","text":"abcdefghij"}}"#,
        );
        assert_eq!(tally.output_floor(), 2, "ten bytes are at least two tokens");
        assert_eq!(tally.output_bound(), 10, "and at most ten");
        tally.add(Some("message_delta"), r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":12}}"#);
        assert_eq!(
            tally.usage,
            Some(ModelUsage {
                input_tokens: 30,
                cached_input_tokens: 0,
                output_tokens: 12
            })
        );
        assert_eq!(tally.finish.as_deref(), Some("end_turn"));
        tally.add(
            Some("error"),
            r#"{"type":"error","error":{"type":"overloaded_error","message":"busy"}}"#,
        );
        assert_eq!(tally.error.as_deref(), Some("busy"));
    }
}
