//! The objects an AgentIdentity stands for: its ServiceAccount (no automounted token), a Role and
//! RoleBinding holding exactly its declared rules, and a NetworkPolicy that denies all egress but
//! DNS, the Tollgate gateway and what it declares. Plus the check that refuses any rule that
//! would let the agent raise its own rights.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tollgate_crds::AgentIdentity;
use tollgate_crds::identity::AccessRule;

use crate::compile::CompileError;

/// Label on every object Tollgate manages.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGED_BY: &str = "tollgate";
/// Label naming the agent an object belongs to.
pub const AGENT_LABEL: &str = "tollgate.dev/agent";

/// Where the Tollgate gateway runs, so agents may reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayPeer {
    /// The gateway's namespace.
    pub namespace: String,
    /// Labels of the gateway's pods.
    pub pod_labels: BTreeMap<String, String>,
    /// The gateway's port.
    pub port: i32,
}

/// The desired child objects of one AgentIdentity.
#[derive(Debug, Clone, PartialEq)]
pub struct Children {
    /// The agent's ServiceAccount.
    pub service_account: ServiceAccount,
    /// The agent's Role.
    pub role: Role,
    /// The binding of that Role to the ServiceAccount; None while a kill switch is engaged.
    pub role_binding: Option<RoleBinding>,
    /// The agent's egress isolation; deny-all while a kill switch is engaged.
    pub network_policy: NetworkPolicy,
}

/// The name of the Role, RoleBinding and NetworkPolicy of an agent.
pub fn child_name(identity: &AgentIdentity) -> String {
    format!(
        "tollgate-agent-{}",
        identity.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Builds the desired children. `killed` is the agent's or the global kill switch. Refuses an
/// identity whose rules would let the agent raise its own rights.
pub fn desired_children(
    identity: &AgentIdentity,
    gateway: &GatewayPeer,
    killed: bool,
) -> Result<Children, Vec<CompileError>> {
    let errors = escalation_errors(&identity.spec.kubernetes.rules);
    if !errors.is_empty() {
        return Err(errors);
    }
    let name = identity.metadata.name.clone().unwrap_or_default();
    let namespace = identity.metadata.namespace.clone();
    let labels = BTreeMap::from([
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
        (AGENT_LABEL.to_owned(), name.clone()),
    ]);
    let owner = identity.metadata.uid.as_ref().map(|uid| OwnerReference {
        api_version: format!("{}/{}", tollgate_crds::GROUP, tollgate_crds::VERSION),
        kind: "AgentIdentity".to_owned(),
        name: name.clone(),
        uid: uid.clone(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    });
    let meta = |object_name: String| ObjectMeta {
        name: Some(object_name),
        namespace: namespace.clone(),
        labels: Some(labels.clone()),
        owner_references: owner.clone().map(|o| vec![o]),
        ..ObjectMeta::default()
    };
    let service_account_name = identity.service_account_name();
    let child = child_name(identity);

    let service_account = ServiceAccount {
        metadata: meta(service_account_name.clone()),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    };
    let role = Role {
        metadata: meta(child.clone()),
        rules: Some(
            identity
                .spec
                .kubernetes
                .rules
                .iter()
                .map(|rule| PolicyRule {
                    api_groups: Some(rule.api_groups.clone()),
                    resources: Some(rule.resources.clone()),
                    resource_names: (!rule.resource_names.is_empty())
                        .then(|| rule.resource_names.clone()),
                    verbs: rule.verbs.clone(),
                    non_resource_urls: None,
                })
                .collect(),
        ),
    };
    let role_binding = (!killed).then(|| RoleBinding {
        metadata: meta(child.clone()),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: child.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: service_account_name,
            namespace: namespace.clone(),
            api_group: None,
        }]),
    });

    let egress = if killed {
        Vec::new()
    } else {
        let dns = NetworkPolicyEgressRule {
            to: Some(vec![NetworkPolicyPeer {
                namespace_selector: Some(by_labels([(
                    "kubernetes.io/metadata.name",
                    "kube-system",
                )])),
                pod_selector: Some(by_labels([("k8s-app", "kube-dns")])),
                ip_block: None,
            }]),
            ports: Some(
                ["UDP", "TCP"]
                    .into_iter()
                    .map(|protocol| port(protocol, 53))
                    .collect(),
            ),
        };
        let gateway_rule = NetworkPolicyEgressRule {
            to: Some(vec![NetworkPolicyPeer {
                namespace_selector: Some(by_labels([(
                    "kubernetes.io/metadata.name",
                    gateway.namespace.as_str(),
                )])),
                pod_selector: Some(LabelSelector {
                    match_labels: Some(gateway.pod_labels.clone()),
                    match_expressions: None,
                }),
                ip_block: None,
            }]),
            ports: Some(vec![port("TCP", gateway.port)]),
        };
        let mut egress = vec![dns, gateway_rule];
        egress.extend(identity.spec.network.egress.iter().cloned());
        egress
    };
    let network_policy = NetworkPolicy {
        metadata: meta(child),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(identity.spec.pod_selector.clone()),
            policy_types: Some(vec!["Egress".to_owned()]),
            egress: Some(egress),
            ingress: None,
        }),
    };
    Ok(Children {
        service_account,
        role,
        role_binding,
        network_policy,
    })
}

fn by_labels<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        ),
        match_expressions: None,
    }
}

fn port(protocol: &str, number: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Some(protocol.to_owned()),
        port: Some(IntOrString::Int(number)),
        end_port: None,
    }
}

/// What an agent may never write, whatever its RBAC, and what its rules may never cover:
/// (group, resource, what it is). These would let it raise its own rights, loosen its isolation
/// or disable Tollgate. One list serves both the escalation check here and admission: a rule
/// covers an entry when its groups include the group or `*` and its resources include the
/// resource, `*`, or a matching `res/*` or `*/sub` wildcard.
pub(crate) const SELF_ESCALATION: &[(&str, &str, &str)] = &[
    ("tollgate.dev", "*", "Tollgate's own kinds"),
    ("rbac.authorization.k8s.io", "*", "RBAC"),
    (
        "networking.k8s.io",
        "networkpolicies",
        "NetworkPolicies, which isolate the agent",
    ),
    ("", "serviceaccounts/token", "ServiceAccount tokens"),
    (
        "admissionregistration.k8s.io",
        "*",
        "admission webhooks and policies, which enforce Tollgate",
    ),
    ("apiextensions.k8s.io", "*", "CustomResourceDefinitions"),
    ("certificates.k8s.io", "*", "certificate signing"),
];
/// Verbs that let a subject act beyond its own rules.
const ESCALATING_VERBS: &[&str] = &["escalate", "bind", "impersonate"];

/// Every way the rules would let the agent raise its own rights, as errors with field paths.
pub fn escalation_errors(rules: &[AccessRule]) -> Vec<CompileError> {
    let mut errors = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let path = format!("spec.kubernetes.rules[{i}]");
        for verb in &rule.verbs {
            if ESCALATING_VERBS.contains(&verb.as_str()) {
                errors.push(CompileError {
                    path: format!("{path}.verbs"),
                    message: format!("the {verb} verb lets the agent act beyond its own rules"),
                    hint: "remove it; agents never escalate, bind or impersonate".to_owned(),
                });
            }
        }
        let wildcard_verb = rule.verbs.iter().any(|v| v == "*");
        if wildcard_verb
            && rule.api_groups.iter().any(|g| g.is_empty() || g == "*")
            && rule
                .resources
                .iter()
                .any(|r| covers(r, "serviceaccounts") || covers(r, "users") || covers(r, "groups"))
        {
            errors.push(CompileError {
                path: format!("{path}.verbs"),
                message: "the * verb on serviceaccounts, users or groups includes impersonate"
                    .to_owned(),
                hint: "list the verbs the agent needs".to_owned(),
            });
        }
        for (group, resource, why) in SELF_ESCALATION {
            let group_covered = rule.api_groups.iter().any(|g| g == "*" || g == group);
            let resource_covered = if *resource == "*" {
                !rule.resources.is_empty()
            } else {
                rule.resources.iter().any(|r| covers(r, resource))
            };
            if group_covered && resource_covered {
                errors.push(CompileError {
                    path: path.clone(),
                    message: format!(
                        "the rule covers {why}: an agent cannot be granted rights over them"
                    ),
                    hint: "name the API groups and resources the agent needs instead of wildcards"
                        .to_owned(),
                });
            }
        }
    }
    errors
}

/// Whether the RBAC resource pattern `pattern` covers `resource` (which may be `res/sub`).
fn covers(pattern: &str, resource: &str) -> bool {
    if pattern == "*" || pattern == resource {
        return true;
    }
    let (res, sub) = resource.split_once('/').unwrap_or((resource, ""));
    match pattern.split_once('/') {
        Some((p_res, "*")) => p_res == res && !sub.is_empty(),
        Some(("*", p_sub)) => !sub.is_empty() && p_sub == sub,
        _ => false,
    }
}
