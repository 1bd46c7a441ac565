//! `kubectl tollgate doctor`: reads what Tollgate needs from the cluster (its CRDs, admission
//! webhooks, the operator's Lease, the global kill switch, and every AgentIdentity and
//! AgentPolicy) and prints the engine's findings ([`tollgate_engine::doctor`]). What it cannot
//! read is a finding too, never a crash.

use std::fmt::Write as _;

use jiff::Timestamp;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::ListParams;
use tollgate_crds::common::{GLOBAL_KILL_SWITCH, OPERATOR_LEASE};
use tollgate_crds::{AgentIdentity, AgentPolicy};
use tollgate_engine::doctor::{self, Finding, Level, Webhook};

/// What doctor found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Every finding, in the order checked.
    pub findings: Vec<Finding>,
}

impl Report {
    /// No failures (warnings allowed).
    pub fn ok(&self) -> bool {
        self.findings.iter().all(|f| f.level != Level::Fail)
    }

    /// One line per finding, then a count.
    pub fn text(&self) -> String {
        let mut text = String::new();
        for f in &self.findings {
            let level = match f.level {
                Level::Ok => "ok",
                Level::Warn => "WARN",
                Level::Fail => "FAIL",
            };
            let _ = writeln!(text, "{level:<4}  {}: {}", f.check, f.detail);
        }
        let count = |level| self.findings.iter().filter(|f| f.level == level).count();
        let _ = writeln!(
            text,
            "{} failure(s), {} warning(s)",
            count(Level::Fail),
            count(Level::Warn)
        );
        text
    }
}

/// The webhooks of every configuration of kind `K`: name, failure policy and client config
/// of each, as `webhooks` takes them out of one configuration.
async fn registered<K>(
    client: &kube::Client,
    webhooks: impl Fn(K) -> Vec<(String, Option<String>, WebhookClientConfig)>,
) -> Result<Vec<Webhook>, kube::Error>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let mut found = Vec::new();
    for configuration in Api::<K>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
    {
        let name = format!(
            "{} {}",
            K::kind(&()),
            configuration.meta().name.clone().unwrap_or_default()
        );
        for (webhook, failure_policy, client_config) in webhooks(configuration) {
            found.push(Webhook {
                name: webhook,
                configuration: name.clone(),
                failure_policy,
                ca_bundle: client_config.ca_bundle.is_some_and(|b| !b.0.is_empty()),
            });
        }
    }
    Ok(found)
}

/// Adds a finding for every object of `api` that `check` says needs a look; returns how many
/// are in force.
async fn judge<K>(
    api: &Api<K>,
    check: fn(&K) -> Option<Finding>,
    what: &str,
    findings: &mut Vec<Finding>,
) -> usize
where
    K: Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    match api.list(&ListParams::default()).await {
        Ok(list) => {
            let before = findings.len();
            findings.extend(list.items.iter().filter_map(check));
            list.items.len() - (findings.len() - before)
        }
        Err(e) => {
            findings.push(unreadable("agents", what, e));
            0
        }
    }
}

fn unreadable(check: &str, what: &str, e: kube::Error) -> Finding {
    Finding {
        level: Level::Fail,
        check: check.to_owned(),
        detail: format!("cannot read {what}: {e} (may your kubeconfig's user get and list it?)"),
    }
}

/// Checks the installation whose own namespace is `tollgate_namespace`, and the agents of
/// `namespace` (every namespace when None), at `now`.
pub async fn run(
    client: kube::Client,
    tollgate_namespace: &str,
    namespace: Option<&str>,
    now: Timestamp,
) -> Report {
    let mut findings = Vec::new();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in doctor::CRDS {
        findings.push(match crds.get_opt(name).await {
            Ok(found) => doctor::crd(name, found.as_ref()),
            Err(e) => unreadable(&format!("crd {name}"), "CustomResourceDefinitions", e),
        });
    }

    let validating = registered::<ValidatingWebhookConfiguration>(&client, |c| {
        c.webhooks
            .unwrap_or_default()
            .into_iter()
            .map(|w| (w.name, w.failure_policy, w.client_config))
            .collect()
    })
    .await;
    let mutating = registered::<MutatingWebhookConfiguration>(&client, |c| {
        c.webhooks
            .unwrap_or_default()
            .into_iter()
            .map(|w| (w.name, w.failure_policy, w.client_config))
            .collect()
    })
    .await;
    let mut registered = Vec::new();
    let mut readable = true;
    for (kind, found) in [
        ("ValidatingWebhookConfigurations", validating),
        ("MutatingWebhookConfigurations", mutating),
    ] {
        match found {
            Ok(found) => registered.extend(found),
            Err(e) => {
                readable = false;
                findings.push(unreadable("webhooks", kind, e));
            }
        }
    }
    if readable {
        findings.extend(doctor::webhooks(&registered));
    }

    findings.push(
        match Api::<Lease>::namespaced(client.clone(), tollgate_namespace)
            .get_opt(OPERATOR_LEASE)
            .await
        {
            Ok(lease) => {
                doctor::operator_lease(tollgate_namespace, OPERATOR_LEASE, lease.as_ref(), now)
            }
            Err(e) => unreadable("operator", "Leases", e),
        },
    );
    findings.push(
        match Api::<ConfigMap>::namespaced(client.clone(), tollgate_namespace)
            .get_opt(GLOBAL_KILL_SWITCH)
            .await
        {
            Ok(switch) => doctor::global_switch(tollgate_namespace, switch.as_ref()),
            Err(e) => unreadable("global kill switch", "ConfigMaps", e),
        },
    );

    let scope = namespace.map_or_else(
        || "every namespace".to_owned(),
        |ns| format!("namespace {ns}"),
    );
    let (identities, policies): (Api<AgentIdentity>, Api<AgentPolicy>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let in_force = (
        judge(
            &identities,
            doctor::identity,
            "AgentIdentities",
            &mut findings,
        )
        .await,
        judge(&policies, doctor::policy, "AgentPolicies", &mut findings).await,
    );
    findings.push(Finding {
        level: Level::Ok,
        check: "agents".to_owned(),
        detail: format!(
            "{} AgentIdentities and {} AgentPolicies in force in {scope}",
            in_force.0, in_force.1
        ),
    });
    Report { findings }
}
