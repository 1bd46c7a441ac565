//! Traces over OTLP: the gateway's spans (each request, each decision, each audit commit a
//! request waits for, each upstream MCP call and each model call) sent to an OpenTelemetry
//! collector as OTLP/HTTP with the protocol's JSON encoding (`POST {endpoint}/v1/traces`). Off
//! unless an endpoint is given (`--otlp-endpoint` or the standard `OTEL_EXPORTER_OTLP_ENDPOINT`).
//!
//! A `tracing` layer: Tollgate's spans (target `tollgate*`) become OTLP spans, with their parent
//! links, their fields as attributes (the OpenTelemetry GenAI and MCP semantic conventions where
//! they apply: `gen_ai.operation.name`, `gen_ai.request.model`, `gen_ai.usage.input_tokens`,
//! `mcp.method.name`, `gen_ai.tool.name`, …), and a few fields with a meaning of their own:
//! `otel.name` (the span's name), `otel.kind` (`server`, `client`, `internal`), `otel.status`
//! (`error` marks the span failed) and `traceparent` (a W3C trace context the caller sent: the
//! request's span joins the caller's trace). The trace id is also written into the audit record
//! ([`current_trace_id`]), so an incident moves from a trace to a replay and back.
//!
//! Spans are batched and sent from a task of their own; when the collector is slow or down,
//! spans beyond a bounded queue are dropped (counted in the log), never a request held up.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tracing::field::{Field, Visit};
use tracing::span;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// The ids of one span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanIds {
    /// The trace's id.
    pub trace: [u8; 16],
    /// The span's id.
    pub span: [u8; 8],
    /// The parent span's id, if any.
    pub parent: Option<[u8; 8]>,
}

/// A span being recorded, kept in the span's extensions until it closes.
struct Open {
    ids: SpanIds,
    name: String,
    kind: u8,
    start: u128,
    attributes: Vec<(String, Value)>,
    error: bool,
}

/// What a span's fields say.
#[derive(Default)]
struct Fields {
    name: Option<String>,
    kind: Option<u8>,
    traceparent: Option<String>,
    error: bool,
    attributes: Vec<(String, Value)>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        match (field.name(), &value) {
            ("otel.name", Value::String(name)) => self.name = Some(name.clone()),
            ("otel.kind", Value::String(kind)) => {
                self.kind = Some(match kind.as_str() {
                    "server" => 2,
                    "client" => 3,
                    _ => 1,
                })
            }
            ("otel.status", Value::String(status)) => self.error = status == "error",
            ("traceparent", Value::String(header)) => self.traceparent = Some(header.clone()),
            ("message", _) => {}
            (name, _) => {
                let attribute = match value {
                    Value::Bool(b) => json!({"boolValue": b}),
                    Value::Number(n) if n.is_f64() => json!({"doubleValue": n}),
                    // OTLP/JSON writes 64-bit integers as strings.
                    Value::Number(n) => json!({"intValue": n.to_string()}),
                    Value::String(s) => json!({"stringValue": s}),
                    other => json!({"stringValue": other.to_string()}),
                };
                self.attributes.retain(|(k, _)| k != name);
                self.attributes.push((name.to_owned(), attribute));
            }
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, json!(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, json!(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, json!(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
}

/// Parses a W3C `traceparent` (`00-<32 hex trace id>-<16 hex parent id>-<flags>`); None for
/// anything else (an invalid or all-zero id starts a new trace).
pub fn parse_traceparent(header: &str) -> Option<([u8; 16], [u8; 8])> {
    let mut parts = header.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || flags.len() != 2 || parts.next().is_some() {
        return None;
    }
    let mut trace_id = [0u8; 16];
    let mut parent_id = [0u8; 8];
    hex::decode_to_slice(trace, &mut trace_id).ok()?;
    hex::decode_to_slice(parent, &mut parent_id).ok()?;
    if trace_id == [0; 16] || parent_id == [0; 8] || trace != trace.to_ascii_lowercase() {
        return None;
    }
    Some((trace_id, parent_id))
}

fn random<const N: usize>() -> [u8; N] {
    crate::stdio::random_bytes::<N>().unwrap_or_else(|_| {
        // Without the kernel's randomness, ids from the clock: unique enough to link spans.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos());
        let mut bytes = [0u8; N];
        for (i, b) in nanos.to_le_bytes().iter().cycle().take(N).enumerate() {
            bytes[i] = *b ^ (i as u8);
        }
        bytes
    })
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The layer that turns Tollgate's spans into OTLP spans.
#[derive(Debug)]
pub struct OtlpLayer {
    spans: tokio::sync::mpsc::Sender<Value>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<S> tracing_subscriber::Layer<S> for OtlpLayer
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        if !attrs.metadata().target().starts_with("tollgate") {
            return;
        }
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let parent = span
            .scope()
            .skip(1)
            .find_map(|ancestor| ancestor.extensions().get::<Open>().map(|o| o.ids));
        let (trace, parent) = match parent {
            Some(parent) => (parent.trace, Some(parent.span)),
            None => match fields.traceparent.as_deref().and_then(parse_traceparent) {
                Some((trace, parent)) => (trace, Some(parent)),
                None => (random::<16>(), None),
            },
        };
        let open = Open {
            ids: SpanIds {
                trace,
                span: random::<8>(),
                parent,
            },
            name: fields
                .name
                .take()
                .unwrap_or_else(|| attrs.metadata().name().to_owned()),
            kind: fields.kind.unwrap_or(1),
            start: now_nanos(),
            attributes: std::mem::take(&mut fields.attributes),
            error: fields.error,
        };
        span.extensions_mut().insert(open);
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        let Some(open) = extensions.get_mut::<Open>() else {
            return;
        };
        let mut fields = Fields {
            attributes: std::mem::take(&mut open.attributes),
            error: open.error,
            ..Fields::default()
        };
        values.record(&mut fields);
        open.attributes = fields.attributes;
        open.error = fields.error;
        if let Some(name) = fields.name {
            open.name = name;
        }
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let Some(open) = span.extensions_mut().remove::<Open>() else {
            return;
        };
        let mut exported = json!({
            "traceId": hex::encode(open.ids.trace),
            "spanId": hex::encode(open.ids.span),
            "name": open.name,
            "kind": open.kind,
            "startTimeUnixNano": open.start.to_string(),
            "endTimeUnixNano": now_nanos().to_string(),
            "attributes": open.attributes.into_iter()
                .map(|(key, value)| json!({"key": key, "value": value}))
                .collect::<Vec<_>>(),
            "status": {"code": if open.error { 2 } else { 0 }},
        });
        if let Some(parent) = open.ids.parent {
            exported["parentSpanId"] = json!(hex::encode(parent));
        }
        if self.spans.try_send(exported).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The most spans waiting to be sent; more are dropped.
const QUEUE: usize = 8192;
/// The most spans in one export.
const BATCH: usize = 512;
/// How long spans wait for a batch to fill.
const LINGER: Duration = Duration::from_millis(200);

/// A layer exporting to the collector at `endpoint` (such as `http://otel-collector:4318`) as
/// service `service`, and the task that sends its batches (spawn it on the runtime).
pub fn exporter(
    endpoint: &str,
    service: &str,
) -> anyhow::Result<(OtlpLayer, impl Future<Output = ()> + Send + 'static)> {
    let url = reqwest::Url::parse(&format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .map_err(|e| anyhow::anyhow!("OTLP endpoint {endpoint:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        anyhow::bail!("OTLP endpoint {endpoint:?}: not an http(s) URL (OTLP/HTTP)");
    }
    let (spans, mut queue) = tokio::sync::mpsc::channel::<Value>(QUEUE);
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let layer = OtlpLayer {
        spans,
        dropped: dropped.clone(),
    };
    let resource = json!({"attributes": [
        {"key": "service.name", "value": {"stringValue": service}},
        {"key": "service.version", "value": {"stringValue": env!("CARGO_PKG_VERSION")}},
    ]});
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let send = async move {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let Some(first) = queue.recv().await else {
                return;
            };
            batch.push(first);
            let deadline = tokio::time::Instant::now() + LINGER;
            while batch.len() < BATCH {
                match tokio::time::timeout_at(deadline, queue.recv()).await {
                    Ok(Some(span)) => batch.push(span),
                    _ => break,
                }
            }
            let body = json!({"resourceSpans": [{
                "resource": resource,
                "scopeSpans": [{"scope": {"name": "tollgate", "version": env!("CARGO_PKG_VERSION")},
                                "spans": std::mem::take(&mut batch)}],
            }]});
            let sent = http
                .post(url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string())
                .send()
                .await;
            let lost = dropped.swap(0, std::sync::atomic::Ordering::Relaxed);
            match sent {
                Ok(answer) if answer.status().is_success() => {}
                // Never through `tracing` at a level the exporter's own spans would loop on: a
                // plain log line, without the URL's credentials.
                Ok(answer) => tracing::warn!(status = %answer.status(), "OTLP export refused"),
                Err(e) => tracing::warn!(
                    timeout = e.is_timeout(),
                    connect = e.is_connect(),
                    "OTLP export failed"
                ),
            }
            if lost > 0 {
                tracing::warn!(spans = lost, "OTLP queue full: spans dropped");
            }
        }
    };
    Ok((layer, send))
}

/// The trace id of the span the caller runs in, as 32 hex digits, when traces are exported.
pub fn current_trace_id() -> Option<String> {
    tracing::Span::current()
        .with_subscriber(|(id, dispatch)| {
            let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
            let span = registry.span(id)?;
            let extensions = span.extensions();
            extensions.get::<Open>().map(|o| hex::encode(o.ids.trace))
        })
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_read_strictly() {
        let (trace, parent) =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(hex::encode(trace), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(parent), "00f067aa0ba902b7");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }
}
