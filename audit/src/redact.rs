//! Redaction of secret-like values before they reach the audit trail.
//!
//! A value is redacted when its object key matches one of the key rules (case-insensitive) or
//! when it is a string that matches one of the value rules. Redacted values become
//! [`REDACTED`]; the record keeps their JSON pointers and a digest of the unredacted bytes, so
//! an investigator can prove what was sent without the trail holding the secret.

use regex::{Regex, RegexSet};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a redacted value is replaced with.
pub const REDACTED: &str = "[REDACTED]";

/// Redaction rules, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedactionRules {
    /// Regular expressions matched against object keys, case-insensitively.
    pub keys: Vec<String>,
    /// Regular expressions matched against string values.
    pub values: Vec<String>,
}

impl Default for RedactionRules {
    fn default() -> Self {
        Self {
            keys: [
                r"passw(or)?d",
                r"secret",
                r"token",
                r"api[_-]?key",
                r"authori[sz]ation",
                r"credential",
                r"private[_-]?key",
                r"cookie",
                r"session[_-]?id",
            ]
            .map(str::to_owned)
            .to_vec(),
            values: [
                // PEM private keys.
                r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
                // HTTP bearer and basic credentials.
                r"(?i)^(bearer|basic)\s+\S+",
                // JSON Web Tokens.
                r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*",
                // AWS access key ids.
                r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
                // GitHub tokens.
                r"\bgh[pousr]_[A-Za-z0-9]{36,}\b",
                // Slack tokens.
                r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
            ]
            .map(str::to_owned)
            .to_vec(),
        }
    }
}

/// A rule that does not compile.
#[derive(Debug, thiserror::Error)]
#[error("redaction rule {field}[{index}] {pattern:?} is not a valid regular expression: {source}")]
pub struct RuleError {
    /// `keys` or `values`.
    pub field: &'static str,
    /// Position in the list.
    pub index: usize,
    /// The pattern.
    pub pattern: String,
    /// Why.
    #[source]
    pub source: regex::Error,
}

/// Compiled rules.
#[derive(Debug, Clone)]
pub struct Redactor {
    keys: RegexSet,
    values: RegexSet,
}

impl Default for Redactor {
    fn default() -> Self {
        Self::new(&RedactionRules::default()).expect("the default rules compile")
    }
}

impl Redactor {
    /// Compiles `rules`; the error names the first rule that does not compile.
    pub fn new(rules: &RedactionRules) -> Result<Self, RuleError> {
        let compile = |field: &'static str, patterns: &[String], insensitive: bool| {
            for (index, pattern) in patterns.iter().enumerate() {
                let source = if insensitive {
                    format!("(?i){pattern}")
                } else {
                    pattern.clone()
                };
                Regex::new(&source).map_err(|source| RuleError {
                    field,
                    index,
                    pattern: pattern.clone(),
                    source,
                })?;
            }
            let all = patterns.iter().map(|p| {
                if insensitive {
                    format!("(?i){p}")
                } else {
                    p.clone()
                }
            });
            Ok(RegexSet::new(all).expect("each pattern compiled alone"))
        };
        Ok(Self {
            keys: compile("keys", &rules.keys, true)?,
            values: compile("values", &rules.values, false)?,
        })
    }

    /// Redacts `value` in place; appends the JSON pointer (under `base`) of every value it
    /// replaced to `paths`.
    pub fn redact(&self, value: &mut Value, base: &str, paths: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, item) in map.iter_mut() {
                    let path = format!("{base}/{}", escape(key));
                    if self.keys.is_match(key) {
                        if *item != Value::Null {
                            *item = Value::String(REDACTED.to_owned());
                            paths.push(path);
                        }
                    } else {
                        self.redact(item, &path, paths);
                    }
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    self.redact(item, &format!("{base}/{i}"), paths);
                }
            }
            Value::String(s) if self.values.is_match(s) => {
                *s = REDACTED.to_owned();
                paths.push(base.to_owned());
            }
            _ => {}
        }
    }
}

/// JSON pointer escaping (RFC 6901).
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn default_rules_redact_secret_keys_and_values_and_keep_the_rest() {
        let mut value = json!({
            "query": "status of order 42",
            "apiKey": "k-123",
            "headers": {"Authorization": "Bearer abc.def", "X-Trace": "t1"},
            "nested": [{"db_password": "hunter2"}, "AKIAABCDEFGHIJKLMNOP", "plain"],
            "a/b": {"refresh_token": null},
            "note": "token is mentioned but this is not a secret value"
        });
        let mut paths = Vec::new();
        Redactor::default().redact(&mut value, "/arguments", &mut paths);
        assert_eq!(
            value,
            json!({
                "query": "status of order 42",
                "apiKey": REDACTED,
                "headers": {"Authorization": REDACTED, "X-Trace": "t1"},
                "nested": [{"db_password": REDACTED}, REDACTED, "plain"],
                "a/b": {"refresh_token": null},
                "note": "token is mentioned but this is not a secret value"
            })
        );
        paths.sort();
        assert_eq!(
            paths,
            [
                "/arguments/apiKey",
                "/arguments/headers/Authorization",
                "/arguments/nested/0/db_password",
                "/arguments/nested/1",
            ]
        );
    }

    #[test]
    fn pem_keys_and_jwts_are_redacted_wherever_they_appear() {
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2ln";
        let mut value = json!({"body": "-----BEGIN RSA PRIVATE KEY-----\nMII...", "t": jwt});
        let mut paths = Vec::new();
        Redactor::default().redact(&mut value, "", &mut paths);
        assert_eq!(value, json!({"body": REDACTED, "t": REDACTED}));
    }

    #[test]
    fn a_bad_rule_is_named() {
        let rules = RedactionRules {
            keys: vec!["ok".into(), "(unclosed".into()],
            values: vec![],
        };
        let err = Redactor::new(&rules).unwrap_err().to_string();
        assert!(
            err.starts_with("redaction rule keys[1] \"(unclosed\""),
            "{err}"
        );
    }
}
