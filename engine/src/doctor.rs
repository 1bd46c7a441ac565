//! What `kubectl tollgate doctor` says of an installation, as findings: each one ok, a warning
//! (Tollgate works, but something needs a person), or a failure (something Tollgate promises
//! does not hold now), with what to do. Pure: the CLI reads the objects and prints these.

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use tollgate_crds::common::{
    GLOBAL_KILL_SWITCH, GLOBAL_KILL_SWITCH_KEY, GLOBAL_KILL_SWITCH_REASON_KEY, condition,
};
use tollgate_crds::{AgentIdentity, AgentPolicy};

/// How a finding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// As it should be.
    Ok,
    /// Working, but a person should look.
    Warn,
    /// Something Tollgate promises does not hold.
    Fail,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// How it stands.
    pub level: Level,
    /// What was checked, such as `crd agentpolicies.tollgate.dev`.
    pub check: String,
    /// What was found, and what to do when it is not ok.
    pub detail: String,
}

fn finding(level: Level, check: impl Into<String>, detail: impl Into<String>) -> Finding {
    Finding {
        level,
        check: check.into(),
        detail: detail.into(),
    }
}

/// The CustomResourceDefinitions Tollgate installs.
pub const CRDS: [&str; 3] = [
    "agentidentities.tollgate.dev",
    "agentpolicies.tollgate.dev",
    "approvalrequests.tollgate.dev",
];

/// The API version these types are.
pub const VERSION: &str = "v1alpha1";

/// The CRD `name`, as found (None: not installed).
pub fn crd(name: &str, found: Option<&CustomResourceDefinition>) -> Finding {
    let check = format!("crd {name}");
    let Some(crd) = found else {
        return finding(
            Level::Fail,
            check,
            "not installed: kubectl apply --server-side -k config/crd (or helm install tollgate charts/tollgate)",
        );
    };
    let established = crd
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Established" && c.status == "True");
    if !established {
        return finding(
            Level::Fail,
            check,
            "not Established: the apiserver does not serve it yet (kubectl describe crd for why)",
        );
    }
    let served: Vec<&str> = crd
        .spec
        .versions
        .iter()
        .filter(|v| v.served)
        .map(|v| v.name.as_str())
        .collect();
    if !served.contains(&VERSION) {
        return finding(
            Level::Fail,
            check,
            format!(
                "serves {} but not {VERSION}, which this kubectl-tollgate speaks: install the CRDs of the same release",
                served.join(", ")
            ),
        );
    }
    finding(Level::Ok, check, format!("established, serves {VERSION}"))
}

/// The admission webhooks Tollgate registers: name, the failure policy it must have, and what it
/// guards.
pub const WEBHOOKS: [(&str, &str, &str); 7] = [
    (
        "objects.validate.tollgate.dev",
        "Fail",
        "policies and identities are compiled and checked at apply",
    ),
    (
        "agents.validate.tollgate.dev",
        "Fail",
        "agents' own Kubernetes API writes",
    ),
    (
        "pods.validate.tollgate.dev",
        "Fail",
        "agent pods must match their identity",
    ),
    (
        "pods.mutate.tollgate.dev",
        "Fail",
        "agent pods get the gateway token and address",
    ),
    (
        "approvals.mutate.tollgate.dev",
        "Fail",
        "approval decisions are stamped and guarded",
    ),
    (
        "identities.mutate.tollgate.dev",
        "Fail",
        "who engaged an agent's kill switch",
    ),
    (
        "killswitch.mutate.tollgate.dev",
        "Ignore",
        "who engaged the global kill switch (fails open so the switch engages while Tollgate is down)",
    ),
];

/// One admission webhook as registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    /// Its name.
    pub name: String,
    /// The Validating- or MutatingWebhookConfiguration holding it.
    pub configuration: String,
    /// Its failurePolicy (the apiserver's default is Fail).
    pub failure_policy: Option<String>,
    /// Whether it names a CA bundle for the apiserver to check the webhook's certificate with.
    pub ca_bundle: bool,
}

/// The shipped webhooks, each found among `registered` or not. A webhook registered more than
/// once (an old install beside a new one) is judged by its worst registration, and is at least a
/// warning: the apiserver calls every one.
pub fn webhooks(registered: &[Webhook]) -> Vec<Finding> {
    WEBHOOKS
        .iter()
        .map(|(name, policy, guards)| {
            let check = format!("webhook {name}");
            let found: Vec<&Webhook> = registered.iter().filter(|w| w.name == *name).collect();
            let Some(worst) = found
                .iter()
                .map(|w| registration(&check, w, policy))
                .max_by_key(|f| f.level)
            else {
                return finding(
                    Level::Fail,
                    check,
                    format!("not registered, so nothing checks that {guards}: kubectl apply --server-side -k config/default (or the chart)"),
                );
            };
            if found.len() > 1 {
                let places: Vec<&str> = found.iter().map(|w| w.configuration.as_str()).collect();
                return finding(
                    worst.level.max(Level::Warn),
                    check,
                    format!(
                        "registered {} times ({}): the apiserver calls every one; {}",
                        found.len(),
                        places.join(", "),
                        worst.detail
                    ),
                );
            }
            worst
        })
        .collect()
}

/// One registration of a shipped webhook that must have failure policy `policy`.
fn registration(check: &str, found: &Webhook, policy: &str) -> Finding {
    let actual = found.failure_policy.as_deref().unwrap_or("Fail");
    if actual != policy {
        let (level, why) = if policy == "Fail" {
            (
                Level::Fail,
                "fails open: while Tollgate is down, agents pass unchecked",
            )
        } else {
            (
                Level::Warn,
                "fails closed: while Tollgate is down, the global kill switch cannot be engaged",
            )
        };
        return finding(
            level,
            check,
            format!(
                "failurePolicy {actual} in {} ({why}); the shipped value is {policy}",
                found.configuration
            ),
        );
    }
    if !found.ca_bundle {
        return finding(
            Level::Fail,
            check,
            format!(
                "{} gives no caBundle, so the apiserver cannot call it (is cert-manager injecting the CA?)",
                found.configuration
            ),
        );
    }
    finding(
        Level::Ok,
        check,
        format!(
            "registered in {}, failurePolicy {actual}",
            found.configuration
        ),
    )
}

/// The operator's leader Lease `namespace/name` at `now`.
pub fn operator_lease(
    namespace: &str,
    name: &str,
    lease: Option<&Lease>,
    now: Timestamp,
) -> Finding {
    let check = "operator".to_owned();
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return finding(
            Level::Fail,
            check,
            format!(
                "no operator has held Lease {namespace}/{name}: is tollgate-operator running (kubectl -n {namespace} get pods)?"
            ),
        );
    };
    let holder = spec.holder_identity.as_deref().unwrap_or("nobody");
    let Some(renewed) = spec.renew_time.as_ref().map(|t| t.0) else {
        return finding(
            Level::Fail,
            check,
            format!("Lease {namespace}/{name} was never renewed"),
        );
    };
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    let ago = now.duration_since(renewed).as_secs();
    if ago > duration {
        return finding(
            Level::Fail,
            check,
            format!(
                "Lease {namespace}/{name} was last renewed by {holder} {ago}s ago, longer than its {duration}s: no operator is reconciling (kill switches, approvals' expiry and agents' RBAC wait)"
            ),
        );
    }
    finding(
        Level::Ok,
        check,
        format!("{holder} leads (Lease {namespace}/{name} renewed {ago}s ago)"),
    )
}

/// The global kill switch, the ConfigMap in Tollgate's `namespace` (None: never created).
pub fn global_switch(namespace: &str, switch: Option<&ConfigMap>) -> Finding {
    let check = "global kill switch".to_owned();
    let data = switch.and_then(|c| c.data.as_ref());
    let engaged = data
        .and_then(|d| d.get(GLOBAL_KILL_SWITCH_KEY))
        .is_some_and(|v| v == "true");
    if engaged {
        let reason = data
            .and_then(|d| d.get(GLOBAL_KILL_SWITCH_REASON_KEY))
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        let by = switch
            .and_then(|c| c.metadata.annotations.as_ref())
            .and_then(|a| a.get(crate::status::KILL_SWITCH_BY_ANNOTATION))
            .map(|by| format!(" by {by}"))
            .unwrap_or_default();
        return finding(
            Level::Warn,
            check,
            format!(
                "ENGAGED{by}{reason}: every agent is stopped; kubectl tollgate unkill --all to restore them"
            ),
        );
    }
    finding(
        Level::Ok,
        check,
        format!("disengaged (ConfigMap {namespace}/{GLOBAL_KILL_SWITCH})"),
    )
}

fn ready(conditions: &[Condition]) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == condition::READY)
}

/// Ready's reason and message, then every other condition that is False with its own.
fn not_ready(conditions: &[Condition]) -> String {
    let mut detail = ready(conditions)
        .map(|c| format!("not Ready, {}: {}", c.reason, c.message))
        .unwrap_or_default();
    for c in conditions
        .iter()
        .filter(|c| c.type_ != condition::READY && c.status == "False")
    {
        detail.push_str(&format!("; {} {}: {}", c.type_, c.reason, c.message));
    }
    detail
}

fn id(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// An AgentIdentity that needs a look: stopped, not reconciled, or not Ready. None when it is
/// in force.
pub fn identity(identity: &AgentIdentity) -> Option<Finding> {
    let check = format!("agentidentity {}", id(&identity.metadata));
    if identity.spec.kill_switch.engaged {
        return Some(finding(
            Level::Warn,
            check,
            "its kill switch is engaged: the agent is stopped (kubectl tollgate unkill to restore it)",
        ));
    }
    let status = identity.status.as_ref();
    in_force(
        check,
        status.map(|s| s.conditions.as_slice()),
        status.and_then(|s| s.observed_generation),
        identity.metadata.generation,
    )
}

/// An AgentPolicy that needs a look: not reconciled, not Ready (its agent is denied every call),
/// or a status for an older spec. None when it is in force.
pub fn policy(policy: &AgentPolicy) -> Option<Finding> {
    let status = policy.status.as_ref();
    in_force(
        format!("agentpolicy {}", id(&policy.metadata)),
        status.map(|s| s.conditions.as_slice()),
        status.and_then(|s| s.observed_generation),
        policy.metadata.generation,
    )
}

/// What an object's status says: not reconciled (no Ready condition), not Ready, or describing
/// an older generation; None when it is in force.
fn in_force(
    check: String,
    conditions: Option<&[Condition]>,
    observed: Option<i64>,
    generation: Option<i64>,
) -> Option<Finding> {
    let conditions = conditions.unwrap_or_default();
    match ready(conditions) {
        None => Some(finding(
            Level::Warn,
            check,
            "not reconciled yet: is the operator running?",
        )),
        Some(c) if c.status != "True" => Some(finding(Level::Fail, check, not_ready(conditions))),
        Some(_) => stale(check, observed, generation),
    }
}

fn stale(check: String, observed: Option<i64>, generation: Option<i64>) -> Option<Finding> {
    match (observed, generation) {
        (Some(observed), Some(generation)) if observed < generation => Some(finding(
            Level::Warn,
            check,
            format!(
                "its status describes generation {observed}, the spec is at {generation}: the operator has not caught up"
            ),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn crd_with(established: &str, versions: &[(&str, bool)]) -> CustomResourceDefinition {
        serde_json::from_value(json!({
            "metadata": {"name": "agentpolicies.tollgate.dev"},
            "spec": {"group": "tollgate.dev", "scope": "Namespaced",
                     "names": {"plural": "agentpolicies", "kind": "AgentPolicy"},
                     "versions": versions.iter().map(|(n, served)| json!({"name": n, "served": served, "storage": true})).collect::<Vec<_>>()},
            "status": {"conditions": [{"type": "Established", "status": established}]}
        }))
        .unwrap()
    }

    #[test]
    fn crds_must_be_installed_established_and_serve_this_version() {
        let name = "agentpolicies.tollgate.dev";
        assert_eq!(crd(name, None).level, Level::Fail);
        assert!(crd(name, None).detail.contains("config/crd"));
        assert_eq!(
            crd(name, Some(&crd_with("True", &[("v1alpha1", true)]))).level,
            Level::Ok
        );
        assert_eq!(
            crd(name, Some(&crd_with("False", &[("v1alpha1", true)]))).level,
            Level::Fail
        );
        let other = crd(
            name,
            Some(&crd_with("True", &[("v1alpha1", false), ("v1beta1", true)])),
        );
        assert_eq!(other.level, Level::Fail);
        assert!(
            other.detail.contains("serves v1beta1 but not v1alpha1"),
            "{}",
            other.detail
        );
    }

    #[test]
    fn every_shipped_webhook_must_be_registered_with_its_failure_policy_and_a_ca() {
        let all: Vec<Webhook> = WEBHOOKS
            .iter()
            .map(|(name, policy, _)| Webhook {
                name: (*name).into(),
                configuration: "tollgate".into(),
                failure_policy: Some((*policy).into()),
                ca_bundle: true,
            })
            .collect();
        assert!(webhooks(&all).iter().all(|f| f.level == Level::Ok));

        let mut broken = all.clone();
        broken.retain(|w| w.name != "agents.validate.tollgate.dev");
        broken[0].failure_policy = Some("Ignore".into()); // objects.validate: fails open
        broken[1].ca_bundle = false; // pods.validate
        let switch = broken
            .iter_mut()
            .find(|w| w.name.starts_with("killswitch"))
            .unwrap();
        switch.failure_policy = None; // the apiserver's default, Fail
        let findings = webhooks(&broken);
        let level = |name: &str| {
            findings
                .iter()
                .find(|f| f.check == format!("webhook {name}"))
                .unwrap()
        };
        assert_eq!(level("agents.validate.tollgate.dev").level, Level::Fail);
        assert!(
            level("agents.validate.tollgate.dev")
                .detail
                .contains("agents' own Kubernetes API writes")
        );
        assert_eq!(level("objects.validate.tollgate.dev").level, Level::Fail);
        assert!(
            level("objects.validate.tollgate.dev")
                .detail
                .contains("fails open")
        );
        assert_eq!(level("pods.validate.tollgate.dev").level, Level::Fail);
        assert!(
            level("pods.validate.tollgate.dev")
                .detail
                .contains("caBundle")
        );
        assert_eq!(level("killswitch.mutate.tollgate.dev").level, Level::Warn);
        assert_eq!(level("pods.mutate.tollgate.dev").level, Level::Ok);

        // An old install beside a new one: the worst registration decides, at least a warning.
        let mut twice = all.clone();
        twice.push(Webhook {
            configuration: "tollgate-old".into(),
            ..all[0].clone()
        });
        let findings = webhooks(&twice);
        assert_eq!(findings[0].level, Level::Warn);
        assert!(
            findings[0]
                .detail
                .starts_with("registered 2 times (tollgate, tollgate-old)"),
            "{}",
            findings[0].detail
        );
        twice.last_mut().unwrap().failure_policy = Some("Ignore".into());
        assert_eq!(webhooks(&twice)[0].level, Level::Fail);
    }

    #[test]
    fn the_list_is_what_the_shipped_configuration_and_chart_register() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let shipped = std::fs::read_to_string(root.join("config/webhook/manifests.yaml")).unwrap();
        let mut registered: Vec<(String, String)> = Vec::new();
        for document in serde_yaml::Deserializer::from_str(&shipped) {
            let value = <serde_json::Value as serde::Deserialize>::deserialize(document).unwrap();
            for webhook in value["webhooks"].as_array().into_iter().flatten() {
                registered.push((
                    webhook["name"].as_str().unwrap().to_owned(),
                    webhook["failurePolicy"]
                        .as_str()
                        .unwrap_or("Fail")
                        .to_owned(),
                ));
            }
        }
        let mut expected: Vec<(String, String)> = WEBHOOKS
            .iter()
            .map(|(name, policy, _)| ((*name).to_owned(), (*policy).to_owned()))
            .collect();
        registered.sort();
        expected.sort();
        assert_eq!(registered, expected, "config/webhook/manifests.yaml");
        let chart =
            std::fs::read_to_string(root.join("charts/tollgate/templates/webhook.yaml")).unwrap();
        for (name, _, _) in WEBHOOKS {
            assert!(
                chart.contains(&format!("name: {name}")),
                "the chart registers {name}"
            );
        }
    }

    #[test]
    fn the_operator_must_hold_a_fresh_lease() {
        let now: Timestamp = "2026-11-27T12:00:00Z".parse().unwrap();
        let lease = |seconds_ago: i64| -> Lease {
            serde_json::from_value(json!({"metadata": {"name": "tollgate-operator"}, "spec": {
                "holderIdentity": "operator-0", "leaseDurationSeconds": 15,
                "renewTime": (now - jiff::SignedDuration::from_secs(seconds_ago)).to_string()}}))
            .unwrap()
        };
        assert_eq!(
            operator_lease("tollgate-system", "tollgate-operator", None, now).level,
            Level::Fail
        );
        let fresh = operator_lease("tollgate-system", "tollgate-operator", Some(&lease(3)), now);
        assert_eq!(fresh.level, Level::Ok);
        assert!(
            fresh.detail.starts_with("operator-0 leads"),
            "{}",
            fresh.detail
        );
        let gone = operator_lease(
            "tollgate-system",
            "tollgate-operator",
            Some(&lease(60)),
            now,
        );
        assert_eq!(gone.level, Level::Fail);
        assert!(
            gone.detail.contains("60s ago, longer than its 15s"),
            "{}",
            gone.detail
        );
    }

    #[test]
    fn an_engaged_global_switch_is_a_warning_naming_who_and_why() {
        assert_eq!(global_switch("tollgate-system", None).level, Level::Ok);
        let switch: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": GLOBAL_KILL_SWITCH,
                         "annotations": {crate::status::KILL_SWITCH_BY_ANNOTATION: "alice"}},
            "data": {"engaged": "true", "reason": "incident 42"}
        }))
        .unwrap();
        let found = global_switch("tollgate-system", Some(&switch));
        assert_eq!(found.level, Level::Warn);
        assert!(
            found.detail.starts_with("ENGAGED by alice (incident 42)"),
            "{}",
            found.detail
        );
    }

    #[test]
    fn policies_and_identities_not_in_force_are_named_with_their_reason() {
        let policy_with = |status: serde_json::Value| -> AgentPolicy {
            serde_json::from_value(json!({
                "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentPolicy",
                "metadata": {"name": "support", "namespace": "shop", "generation": 3},
                "spec": {"identityRef": {"name": "support"}, "tools": {"allowed": [], "blocked": []}},
                "status": status
            }))
            .unwrap()
        };
        let condition = |status: &str, reason: &str| {
            json!({"type": "Ready", "status": status,
            "reason": reason, "message": "why", "lastTransitionTime": "2026-11-27T12:00:00Z"})
        };
        assert_eq!(
            policy(&policy_with(
                json!({"observedGeneration": 3, "conditions": [condition("True", "Compiled")]})
            )),
            None
        );
        let broken = policy(&policy_with(
            json!({"observedGeneration": 3, "conditions": [condition("False", "CompileFailed")]}),
        ))
        .unwrap();
        assert_eq!(
            (broken.level, broken.check.as_str()),
            (Level::Fail, "agentpolicy shop/support")
        );
        assert_eq!(broken.detail, "not Ready, CompileFailed: why");
        let unbound = policy(&policy_with(
            json!({"observedGeneration": 3, "conditions": [
                condition("False", "IdentityNotFound"),
                {"type": "IdentityBound", "status": "False", "reason": "IdentityNotFound",
                 "message": "AgentIdentity shop/ghost does not exist",
                 "lastTransitionTime": "2026-11-27T12:00:00Z"}
            ]}),
        ))
        .unwrap();
        assert_eq!(
            unbound.detail,
            "not Ready, IdentityNotFound: why; IdentityBound IdentityNotFound: AgentIdentity shop/ghost does not exist"
        );
        let behind = policy(&policy_with(
            json!({"observedGeneration": 2, "conditions": [condition("True", "Compiled")]}),
        ))
        .unwrap();
        assert_eq!(behind.level, Level::Warn);
        assert_eq!(policy(&policy_with(json!({}))).unwrap().level, Level::Warn);
    }
}
