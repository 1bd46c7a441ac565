//! Reading Tollgate objects from YAML text, as standalone mode and offline checks do: strictly,
//! so that a misspelt field is an error that names it instead of a rule silently not applied.

use serde::Deserialize;
use tollgate_crds::{AgentIdentity, AgentPolicy};

/// One Tollgate object read from a manifest.
#[derive(Debug, Clone)]
pub enum Object {
    /// An AgentIdentity.
    Identity(Box<AgentIdentity>),
    /// An AgentPolicy.
    Policy(Box<AgentPolicy>),
    /// Any other kind, which Tollgate ignores here.
    Other {
        /// `apiVersion/kind` of the document.
        kind: String,
    },
}

/// Why a document could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("document {document}: {message}")]
pub struct ManifestError {
    /// The document's position in the text, from 1.
    pub document: usize,
    /// What is wrong, with the field path where there is one.
    pub message: String,
}

/// Reads every YAML document in `text`. Unknown fields, wrong types and unknown enum values are
/// errors naming their path; empty documents are skipped.
pub fn parse(text: &str) -> Vec<Result<Object, ManifestError>> {
    let mut objects = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let number = i + 1;
        let error = |message: String| ManifestError {
            document: number,
            message,
        };
        let value = match serde_yaml::Value::deserialize(document) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(value) => value,
            Err(e) => {
                // After a syntax error the rest of the stream cannot be split into documents.
                objects.push(Err(error(format!("invalid YAML: {e}"))));
                break;
            }
        };
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        let kind = value
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        let expected = format!("{}/{}", tollgate_crds::GROUP, tollgate_crds::VERSION);
        let object = match (api_version.as_str(), kind.as_str()) {
            (v, "AgentIdentity") if v == expected => {
                strict::<AgentIdentity>(value).map(|o| Object::Identity(Box::new(o)))
            }
            (v, "AgentPolicy") if v == expected => {
                strict::<AgentPolicy>(value).map(|o| Object::Policy(Box::new(o)))
            }
            (v, "AgentIdentity" | "AgentPolicy" | "ApprovalRequest")
                if v.starts_with("tollgate.dev/") =>
            {
                Err(format!("apiVersion {v} is not served; use {expected}"))
            }
            _ => Ok(Object::Other {
                kind: format!("{api_version}/{kind}"),
            }),
        };
        objects.push(object.map_err(error));
    }
    objects
}

fn strict<T: serde::de::DeserializeOwned>(value: serde_yaml::Value) -> Result<T, String> {
    let mut unknown = Vec::new();
    let parsed: Result<T, _> = serde_ignored::deserialize(value, |path| {
        let path = field_path(&path.to_string());
        // The derived resource types read apiVersion and kind themselves, checked above.
        if path != "apiVersion" && path != "kind" {
            unknown.push(path);
        }
    });
    match parsed {
        Err(e) => Err(e.to_string()),
        Ok(_) if !unknown.is_empty() => Err(format!("unknown field(s): {}", unknown.join(", "))),
        Ok(object) => Ok(object),
    }
}

/// `spec.tools.allowed.1.limits.?.x` as Kubernetes writes it: `spec.tools.allowed[1].limits.x`.
fn field_path(raw: &str) -> String {
    let mut out = String::new();
    for segment in raw.split('.').filter(|s| *s != "?") {
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_samples_and_refuses_misspelt_fields() {
        let text = include_str!("../../config/samples/support-agent.yaml");
        let objects: Vec<Object> = parse(text).into_iter().map(Result::unwrap).collect();
        assert!(matches!(objects[0], Object::Identity(_)));
        assert!(matches!(objects[1], Object::Policy(_)));

        let misspelt = text.replace("maxCallsPerRun", "maxCallPerRun");
        let errors: Vec<ManifestError> = parse(&misspelt)
            .into_iter()
            .filter_map(Result::err)
            .collect();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].document, 2);
        assert!(
            errors[0]
                .message
                .contains("unknown field(s): spec.tools.allowed[1].limits.maxCallPerRun"),
            "{}",
            errors[0]
        );

        let bad_enum = text.replace("autonomy: Gated", "autonomy: Yolo");
        let error = parse(&bad_enum).into_iter().find_map(Result::err).unwrap();
        assert!(error.message.contains("unknown variant `Yolo`"), "{error}");

        let old = "apiVersion: tollgate.dev/v1\nkind: AgentPolicy\nmetadata: {name: x}\n";
        assert!(
            parse(old)[0]
                .as_ref()
                .unwrap_err()
                .message
                .contains("is not served")
        );
        assert!(matches!(
            parse("apiVersion: v1\nkind: ConfigMap\n")[0],
            Ok(Object::Other { .. })
        ));
        assert!(
            parse("a: [")
                .into_iter()
                .next()
                .unwrap()
                .unwrap_err()
                .message
                .contains("invalid YAML")
        );
    }
}
