//! The objects the operator makes for an identity: exactly the declared rules, never an escalation.

use super::*;
use crate::children::{AGENT_LABEL, GatewayPeer, desired_children, escalation_errors};
use tollgate_crds::AgentIdentity;
use tollgate_crds::identity::AccessRule;

fn identity(rules: Value) -> AgentIdentity {
    serde_json::from_value(json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": {"name": "support", "namespace": "ns", "uid": "1234"},
        "spec": {
            "description": "d", "owner": {"team": "t", "contacts": ["a"]},
            "podSelector": {"matchLabels": {"app": "support"}},
            "kubernetes": {"rules": rules},
            "network": {"egress": [{"ports": [{"port": 443, "protocol": "TCP"}]}]}
        }
    }))
    .unwrap()
}

fn gateway() -> GatewayPeer {
    GatewayPeer {
        namespace: "tollgate-system".into(),
        pod_labels: labels(&[("app.kubernetes.io/name", "tollgate-gateway")]),
        port: 8443,
    }
}

#[test]
fn children_hold_exactly_the_declared_rules() {
    let identity = identity(
        json!([{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]),
    );
    let children = desired_children(&identity, &gateway(), false).unwrap();
    assert_eq!(
        children.service_account.metadata.name.as_deref(),
        Some("agent-support")
    );
    assert_eq!(
        children.service_account.automount_service_account_token,
        Some(false)
    );
    let rules = children.role.rules.as_ref().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].verbs, vec!["get", "list"]);
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["configmaps".to_owned()][..])
    );
    let binding = children.role_binding.as_ref().unwrap();
    assert_eq!(binding.role_ref.name, "tollgate-agent-support");
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", "agent-support", Some("ns"))
    );
    for meta in [
        &children.service_account.metadata,
        &children.role.metadata,
        &binding.metadata,
        &children.network_policy.metadata,
    ] {
        assert_eq!(meta.labels.as_ref().unwrap()[AGENT_LABEL], "support");
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("AgentIdentity", "1234", Some(true))
        );
    }
    let spec = children.network_policy.spec.as_ref().unwrap();
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Egress".to_owned()][..])
    );
    let egress = spec.egress.as_ref().unwrap();
    assert_eq!(egress.len(), 3, "DNS, the gateway, and the declared rule");
    assert_eq!(
        egress[1].ports.as_ref().unwrap()[0].port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8443))
    );
    assert_eq!(
        spec.pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["app"],
        "support"
    );
    // Deterministic: the same identity gives the same objects.
    assert_eq!(
        desired_children(&identity, &gateway(), false).unwrap(),
        children
    );
}

#[test]
fn a_kill_switch_removes_the_binding_and_all_egress() {
    let identity =
        identity(json!([{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]));
    let children = desired_children(&identity, &gateway(), true).unwrap();
    assert!(children.role_binding.is_none());
    let spec = children.network_policy.spec.unwrap();
    assert_eq!(spec.egress, Some(vec![]), "deny-all egress, DNS included");
    assert_eq!(spec.policy_types, Some(vec!["Egress".to_owned()]));
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> AccessRule {
    let strings = |items: &[&str]| items.iter().map(|s| s.to_string()).collect();
    AccessRule {
        api_groups: strings(groups),
        resources: strings(resources),
        resource_names: vec![],
        verbs: strings(verbs),
    }
}

#[test]
fn escalation_is_refused_in_every_spelling() {
    let refused = [
        rule(
            &["rbac.authorization.k8s.io"],
            &["rolebindings"],
            &["create"],
        ),
        rule(&["*"], &["*"], &["get"]),
        rule(&["*"], &["roles"], &["get"]),
        rule(&["tollgate.dev"], &["agentpolicies"], &["update"]),
        rule(&["*"], &["agentidentities"], &["patch"]),
        rule(&["networking.k8s.io"], &["networkpolicies"], &["delete"]),
        rule(&["networking.k8s.io"], &["*"], &["delete"]),
        rule(&[""], &["serviceaccounts/token"], &["create"]),
        rule(&[""], &["serviceaccounts/*"], &["create"]),
        rule(&[""], &["*/token"], &["create"]),
        rule(&[""], &["*"], &["create"]),
        rule(&[""], &["serviceaccounts"], &["*"]),
        rule(&[""], &["configmaps"], &["get", "escalate"]),
        rule(&[""], &["users"], &["impersonate"]),
        rule(&["apps"], &["deployments"], &["bind"]),
        rule(
            &["admissionregistration.k8s.io"],
            &["validatingwebhookconfigurations"],
            &["delete"],
        ),
    ];
    for r in refused {
        assert!(
            !escalation_errors(std::slice::from_ref(&r)).is_empty(),
            "{r:?} was accepted"
        );
    }
    let accepted = [
        rule(&[""], &["configmaps"], &["get", "list"]),
        rule(&[""], &["configmaps"], &["*"]),
        rule(
            &["apps"],
            &["deployments", "deployments/scale"],
            &["get", "patch", "delete"],
        ),
        rule(&[""], &["serviceaccounts"], &["get"]),
        rule(&[""], &["pods/log"], &["get"]),
    ];
    for r in accepted {
        assert_eq!(
            escalation_errors(std::slice::from_ref(&r)),
            vec![],
            "{r:?} was refused"
        );
    }
    let errors = desired_children(
        &identity(json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}])),
        &gateway(),
        false,
    )
    .unwrap_err();
    assert!(
        errors
            .iter()
            .all(|e| e.path.starts_with("spec.kubernetes.rules[0]")),
        "{errors:?}"
    );
}
