//! The HTTP headers of MCP 2026-07-28 that say what the body says (`Mcp-Method`, `Mcp-Name`),
//! and which protocol a request speaks.

use super::*;

/// The value of an `Mcp-Name` header: as it is when it is visible ASCII without leading or
/// trailing spaces, else MCP's base64 form (`=?base64?…?=`).
pub(super) fn header_text(value: &str) -> Option<HeaderValue> {
    use base64::Engine as _;
    let plain = !value.is_empty()
        && value.bytes().all(|b| (0x20..0x7f).contains(&b))
        && value.trim() == value
        && !value.starts_with("=?base64?");
    let text = if plain {
        value.to_owned()
    } else {
        format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode(value)
        )
    };
    HeaderValue::from_str(&text).ok()
}

/// A header value as MCP means it: base64 decoded when in the `=?base64?…?=` form.
pub(super) fn header_meaning(value: &HeaderValue) -> Option<String> {
    use base64::Engine as _;
    let text = value.to_str().ok()?;
    match text
        .strip_prefix("=?base64?")
        .and_then(|rest| rest.strip_suffix("?="))
    {
        Some(encoded) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok()),
        None => Some(text.to_owned()),
    }
}

/// The first protocol version whose requests carry their own version and whose results say
/// their kind (`resultType`).
pub(super) const MODERN_PROTOCOL: &str = "2026-07-28";

/// Whether a request speaks protocol 2026-07-28 or later: its `MCP-Protocol-Version` header, or
/// the version in its `_meta` envelope. Versions are dates, so they compare as strings.
pub(crate) fn modern_protocol(headers: &HeaderMap, params: &Value) -> bool {
    let header = headers
        .get(PROTOCOL_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let envelope = params
        .pointer("/_meta/io.modelcontextprotocol~1protocolVersion")
        .and_then(Value::as_str)
        .map(str::to_owned);
    header
        .or(envelope)
        .is_some_and(|version| version.as_str() >= MODERN_PROTOCOL)
}

/// The body parameter a method's `Mcp-Name` header mirrors (protocol 2026-07-28).
pub(super) fn name_param(method: &str) -> Option<&'static str> {
    match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        _ => None,
    }
}

/// Protocol 2026-07-28 routes by `Mcp-Method` and `Mcp-Name`; when a client sends them they must
/// say what the body says, or an intermediary could route (or a server log) one call while the
/// gateway decides another.
pub(crate) fn check_routing(
    headers: &HeaderMap,
    message: &Map<String, Value>,
    method: &str,
) -> Result<(), String> {
    if let Some(value) = headers.get(METHOD_HEADER)
        && header_meaning(value).as_deref() != Some(method)
    {
        return Err(format!(
            "the {METHOD_HEADER} header {value:?} does not match the body's method {method:?}"
        ));
    }
    if let Some(value) = headers.get(NAME_HEADER) {
        let named = name_param(method)
            .and_then(|key| message.get("params")?.get(key)?.as_str().map(str::to_owned));
        if header_meaning(value) != named {
            return Err(format!(
                "the {NAME_HEADER} header {value:?} does not match the body's {}",
                name_param(method).map_or_else(
                    || format!("method {method:?}, which names nothing"),
                    |key| format!("params.{key}")
                )
            ));
        }
    }
    Ok(())
}
