//! Kubernetes label selectors, compiled once and matched against an object's labels.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// A compiled label selector. An empty selector matches every object, as in Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    /// Compiles a selector; the error says which expression is invalid and why.
    pub fn compile(selector: &LabelSelector) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            requirements.push(Requirement::In(key.clone(), vec![value.clone()]));
        }
        for (i, expression) in selector.match_expressions.iter().flatten().enumerate() {
            let values = expression.values.clone().unwrap_or_default();
            let key = expression.key.clone();
            let requirement = match expression.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!(
                        "matchExpressions[{i}]: operator {} needs at least one value",
                        expression.operator
                    ));
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(format!(
                        "matchExpressions[{i}]: operator {} takes no values",
                        expression.operator
                    ));
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => {
                    return Err(format!(
                        "matchExpressions[{i}]: unknown operator {other:?}; use In, NotIn, Exists or DoesNotExist"
                    ));
                }
            };
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements
            .iter()
            .all(|requirement| match requirement {
                Requirement::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
                Requirement::NotIn(key, values) => {
                    labels.get(key).is_none_or(|v| !values.contains(v))
                }
                Requirement::Exists(key) => labels.contains_key(key),
                Requirement::DoesNotExist(key) => !labels.contains_key(key),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expression(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn matches_like_kubernetes() {
        let selector = Selector::compile(&LabelSelector {
            match_labels: Some(labels(&[("env", "production")])),
            match_expressions: Some(vec![
                expression("tier", "NotIn", &["test"]),
                expression("team", "Exists", &[]),
            ]),
        })
        .unwrap();
        let cases = [
            (labels(&[("env", "production"), ("team", "a")]), true),
            (
                labels(&[("env", "production"), ("team", "a"), ("tier", "web")]),
                true,
            ),
            (
                labels(&[("env", "production"), ("team", "a"), ("tier", "test")]),
                false,
            ),
            (labels(&[("env", "Production"), ("team", "a")]), false),
            (labels(&[("env", "production")]), false),
            (labels(&[]), false),
        ];
        for (object, expected) in cases {
            assert_eq!(selector.matches(&object), expected, "{object:?}");
        }
        assert!(
            Selector::compile(&LabelSelector::default())
                .unwrap()
                .matches(&labels(&[]))
        );
    }

    #[test]
    fn refuses_invalid_expressions() {
        for (e, message) in [
            (expression("a", "In", &[]), "needs at least one value"),
            (expression("a", "Exists", &["x"]), "takes no values"),
            (expression("a", "Matches", &["x"]), "unknown operator"),
        ] {
            let error = Selector::compile(&LabelSelector {
                match_expressions: Some(vec![e]),
                ..Default::default()
            })
            .unwrap_err();
            assert!(error.contains(message), "{error}");
        }
    }
}
