//! Canonical JSON, digests, and the strict JSON parser every untrusted body goes through.
//!
//! Two parsers that disagree about one message are a way past any check: if Tollgate read the
//! last of two duplicate keys and the tool the first, a checked call would not be the executed
//! one. So untrusted JSON is parsed by [`parse_strict`], which refuses duplicate keys and deep
//! nesting, and what is forwarded and digested is the parsed value, never the raw bytes.

use std::fmt::Write as _;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use sha2::{Digest, Sha256};

/// How deeply untrusted JSON may nest.
pub const MAX_DEPTH: usize = 64;

/// Why untrusted JSON was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid JSON: {0}")]
pub struct JsonError(pub String);

/// Parses untrusted JSON, refusing duplicate object keys, nesting deeper than [`MAX_DEPTH`],
/// non-finite numbers and trailing data.
pub fn parse_strict(bytes: &[u8]) -> Result<Value, JsonError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = Strict { depth: 0 }
        .deserialize(&mut deserializer)
        .map_err(|e| JsonError(e.to_string()))?;
    deserializer.end().map_err(|e| JsonError(e.to_string()))?;
    Ok(value)
}

#[derive(Clone, Copy)]
struct Strict {
    depth: usize,
}

impl Strict {
    fn deeper<E: de::Error>(self) -> Result<Strict, E> {
        if self.depth >= MAX_DEPTH {
            Err(E::custom(format_args!(
                "nesting deeper than {MAX_DEPTH} levels"
            )))
        } else {
            Ok(Strict {
                depth: self.depth + 1,
            })
        }
    }
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number that is not finite"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.deeper()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(inner)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.deeper()?;
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate key {key:?}")));
            }
            let value = map.next_value_seed(inner)?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// The canonical text of a JSON value: object keys sorted by their UTF-8 bytes, no whitespace,
/// strings escaped as serde_json escapes them. Equal values have equal text whatever the key order
/// they arrived in.
pub fn canonical(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => {
            let _ = write!(out, "{other}");
        }
    }
}

/// `sha256:<hex>` over the canonical text of a value.
pub fn digest(value: &Value) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(canonical(value).as_bytes()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strict_parsing_refuses_what_parsers_disagree_on() {
        let cases: &[(&str, &str)] = &[
            (r#"{"a":1,"a":2}"#, "duplicate key \"a\""),
            (r#"{"a":{"b":1,"b":1}}"#, "duplicate key \"b\""),
            (r#"{"a":1} {"b":2}"#, "trailing characters"),
            (r#"{"a":1e400}"#, "number out of range"),
            (r#"{"a":"#, "EOF"),
        ];
        for (input, expected) in cases {
            let error = parse_strict(input.as_bytes()).expect_err(input).0;
            assert!(error.contains(expected), "{input}: {error}");
        }
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(
            parse_strict(deep.as_bytes())
                .unwrap_err()
                .0
                .contains("nesting deeper than 64")
        );
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse_strict(ok.as_bytes()).is_ok());
        // Escaped keys are decoded before the duplicate check: "\u0061" is "a".
        assert!(
            parse_strict(br#"{"a":1,"\u0061":2}"#)
                .unwrap_err()
                .0
                .contains("duplicate key")
        );
    }

    #[test]
    fn canonical_text_ignores_key_order_and_whitespace() {
        let a = parse_strict(br#"{ "b": [1, {"y": 2, "x": 1}], "a": "\u00e9" }"#).unwrap();
        let b = json!({"a": "é", "b": [1, {"x": 1, "y": 2}]});
        assert_eq!(canonical(&a), r#"{"a":"é","b":[1,{"x":1,"y":2}]}"#);
        assert_eq!(digest(&a), digest(&b));
        assert_ne!(
            digest(&a),
            digest(&json!({"a": "é", "b": [1, {"x": 1, "y": 3}]}))
        );
        assert!(digest(&a).starts_with("sha256:") && digest(&a).len() == 71);
    }
}
