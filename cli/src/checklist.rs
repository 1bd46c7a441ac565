//! `kubectl tollgate doctor --checklist`: the ten pre-production items per agent
//! ([`tollgate_engine::checklist`]), from a cluster (what it runs, as it runs it) or from
//! manifests (`--from`: what only a cluster can say is unknown).

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Api;
use kube::api::ListParams;
use tollgate_crds::{AgentIdentity, AgentPolicy};
use tollgate_engine::checklist::{self, Item, Mark, Observed};
use tollgate_engine::manifest::{self, Object};

/// The checklist of every agent read, by `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checklists {
    /// Per agent, its ten items.
    pub agents: Vec<(String, Vec<Item>)>,
}

impl Checklists {
    /// No item failed (unknown ones aside).
    pub fn ok(&self) -> bool {
        self.agents
            .iter()
            .all(|(_, items)| items.iter().all(|i| i.mark != Mark::Fail))
    }

    /// Each agent, then its items, then a count.
    pub fn text(&self) -> String {
        let mut text = String::new();
        for (agent, items) in &self.agents {
            let _ = writeln!(text, "agent {agent}");
            for item in items {
                let _ = writeln!(
                    text,
                    "  {:<7}  {:>2}. {}: {}",
                    item.mark.as_str(),
                    item.number,
                    item.title,
                    item.why
                );
            }
        }
        let count = |mark| {
            self.agents
                .iter()
                .flat_map(|(_, items)| items)
                .filter(|i| i.mark == mark)
                .count()
        };
        let _ = writeln!(
            text,
            "{} agent(s): {} passed, {} failed, {} unknown",
            self.agents.len(),
            count(Mark::Pass),
            count(Mark::Fail),
            count(Mark::Unknown)
        );
        text
    }
}

fn key(namespace: Option<&str>, name: Option<&str>) -> String {
    format!(
        "{}/{}",
        namespace.unwrap_or("default"),
        name.unwrap_or_default()
    )
}

/// The policy of `identity` among `policies` (same namespace, `identityRef` naming it).
fn policy_of<'a>(identity: &AgentIdentity, policies: &'a [AgentPolicy]) -> Option<&'a AgentPolicy> {
    policies.iter().find(|p| {
        p.metadata.namespace == identity.metadata.namespace
            && Some(p.spec.identity_ref.name.as_str()) == identity.metadata.name.as_deref()
    })
}

/// The checklists of the agents in the manifests under `paths`, at `now`.
pub fn offline(paths: &[PathBuf], now: Timestamp) -> anyhow::Result<Checklists> {
    let (mut identities, mut policies) = (Vec::new(), Vec::new());
    for file in crate::offline::yaml_files(paths)? {
        let text =
            std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
        for object in manifest::parse(&text) {
            match object.with_context(|| file.display().to_string())? {
                Object::Identity(identity) => identities.push(*identity),
                Object::Policy(policy) => policies.push(*policy),
                Object::Other { .. } => {}
            }
        }
    }
    if identities.is_empty() {
        anyhow::bail!("no AgentIdentity in {paths:?}");
    }
    let agents = identities
        .iter()
        .map(|identity| {
            let policy = policy_of(identity, &policies);
            (
                key(
                    identity.metadata.namespace.as_deref(),
                    identity.metadata.name.as_deref(),
                ),
                checklist::checklist(identity, policy, None, now),
            )
        })
        .collect();
    Ok(Checklists { agents })
}

/// The checklists of the agents of `namespace` (every namespace when None) in the cluster, with
/// Tollgate in `tollgate_namespace`, at `now`.
pub async fn in_cluster(
    client: kube::Client,
    tollgate_namespace: &str,
    namespace: Option<&str>,
    now: Timestamp,
) -> anyhow::Result<Checklists> {
    let list = ListParams::default();
    let (identities, policies): (Api<AgentIdentity>, Api<AgentPolicy>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let identities = identities
        .list(&list)
        .await
        .context("list AgentIdentities (may your kubeconfig's user list them?)")?
        .items;
    let policies = policies
        .list(&list)
        .await
        .context("list AgentPolicies")?
        .items;
    let gateway_available = match Api::<Deployment>::namespaced(client.clone(), tollgate_namespace)
        .get_opt("tollgate-gateway")
        .await
    {
        Ok(found) => Some(found.is_some_and(|d| {
            d.status
                .and_then(|s| s.available_replicas)
                .is_some_and(|n| n > 0)
        })),
        Err(_) => None,
    };
    let mut agents = Vec::new();
    for identity in &identities {
        let ns = identity.metadata.namespace.clone().unwrap_or_default();
        let name = identity.metadata.name.clone().unwrap_or_default();
        let service_account = identity
            .status
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| identity.service_account_name());
        let service_account_exists = Api::<ServiceAccount>::namespaced(client.clone(), &ns)
            .get_opt(&service_account)
            .await
            .context("read ServiceAccounts")?
            .is_some();
        let sharing_service_account = identities
            .iter()
            .filter(|other| {
                other.metadata.namespace.as_deref() == Some(ns.as_str())
                    && other.metadata.name.as_deref() != Some(name.as_str())
                    && other
                        .status
                        .as_ref()
                        .and_then(|s| s.service_account_name.as_deref())
                        == Some(service_account.as_str())
            })
            .map(|other| key(Some(&ns), other.metadata.name.as_deref()))
            .collect();
        let selector = tollgate_engine::selector::Selector::compile(&identity.spec.pod_selector)
            .map_err(anyhow::Error::msg)?;
        let pods = Api::<Pod>::namespaced(client.clone(), &ns)
            .list(&list)
            .await
            .context("list Pods")?
            .items
            .into_iter()
            .filter(|pod| {
                selector.matches(pod.metadata.labels.as_ref().unwrap_or(&Default::default()))
            })
            .map(|pod| {
                let spec = pod.spec.unwrap_or_default();
                checklist::Pod {
                    name: pod.metadata.name.unwrap_or_default(),
                    service_account: spec
                        .service_account_name
                        .unwrap_or_else(|| "default".into()),
                    gateway_url: !spec.containers.is_empty()
                        && spec
                            .containers
                            .iter()
                            .all(|c| c.env.iter().flatten().any(|e| e.name == "TOLLGATE_URL")),
                }
            })
            .collect();
        let egress_policy = Api::<NetworkPolicy>::namespaced(client.clone(), &ns)
            .get_opt(&tollgate_engine::children::child_name(identity))
            .await
            .context("read NetworkPolicies")?
            .is_some();
        let observed = Observed {
            service_account_exists,
            sharing_service_account,
            pods,
            egress_policy,
            gateway_available,
        };
        agents.push((
            key(Some(&ns), Some(&name)),
            checklist::checklist(
                identity,
                policy_of(identity, &policies),
                Some(&observed),
                now,
            ),
        ));
    }
    if agents.is_empty() {
        anyhow::bail!(
            "no AgentIdentity in {}",
            namespace.map_or("any namespace".to_owned(), |ns| format!("namespace {ns}"))
        );
    }
    Ok(Checklists { agents })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_samples_print_all_ten_items_per_agent() {
        let samples = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/samples"));
        let now: Timestamp = "2026-12-07T12:00:00Z".parse().unwrap();
        let lists = offline(&[samples], now).unwrap();
        assert_eq!(lists.agents.len(), 3, "{lists:?}");
        for (agent, items) in &lists.agents {
            let numbers: Vec<u8> = items.iter().map(|i| i.number).collect();
            assert_eq!(numbers, (1..=10).collect::<Vec<u8>>(), "{agent}");
        }
        assert!(lists.ok(), "{}", lists.text());
        let text = lists.text();
        assert!(text.contains("agent default/support-agent-v2"), "{text}");
        assert!(
            text.contains(
                "  pass     10. escalation names people: breaches reach Alice Ng (agent owner)"
            ),
            "{text}"
        );
        assert!(
            text.contains("  unknown   8. kill switch drilled within 30 days"),
            "{text}"
        );
    }
}
