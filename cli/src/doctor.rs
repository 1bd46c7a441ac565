//! `kubectl tollgate doctor`: reads what Tollgate needs from the cluster (its CRDs, admission
//! webhooks, the operator's Lease, the global kill switch, and every AgentIdentity and
//! AgentPolicy) and prints the engine's findings ([`tollgate_engine::doctor`]). What it cannot
//! read is a finding too, never a crash.

use std::fmt::Write as _;

use jiff::Timestamp;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
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

    let mut registered = Vec::new();
    let mut readable = true;
    match Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => {
            for configuration in list.items {
                let name = configuration.metadata.name.clone().unwrap_or_default();
                for w in configuration.webhooks.into_iter().flatten() {
                    registered.push(Webhook {
                        name: w.name,
                        configuration: format!("ValidatingWebhookConfiguration {name}"),
                        failure_policy: w.failure_policy,
                        ca_bundle: w.client_config.ca_bundle.is_some_and(|b| !b.0.is_empty()),
                    });
                }
            }
        }
        Err(e) => {
            readable = false;
            findings.push(unreadable("webhooks", "ValidatingWebhookConfigurations", e));
        }
    }
    match Api::<MutatingWebhookConfiguration>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => {
            for configuration in list.items {
                let name = configuration.metadata.name.clone().unwrap_or_default();
                for w in configuration.webhooks.into_iter().flatten() {
                    registered.push(Webhook {
                        name: w.name,
                        configuration: format!("MutatingWebhookConfiguration {name}"),
                        failure_policy: w.failure_policy,
                        ca_bundle: w.client_config.ca_bundle.is_some_and(|b| !b.0.is_empty()),
                    });
                }
            }
        }
        Err(e) => {
            readable = false;
            findings.push(unreadable("webhooks", "MutatingWebhookConfigurations", e));
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
    let mut in_force = (0, 0);
    match identities.list(&ListParams::default()).await {
        Ok(list) => {
            for identity in &list.items {
                match doctor::identity(identity) {
                    Some(f) => findings.push(f),
                    None => in_force.0 += 1,
                }
            }
        }
        Err(e) => findings.push(unreadable("agents", "AgentIdentities", e)),
    }
    match policies.list(&ListParams::default()).await {
        Ok(list) => {
            for policy in &list.items {
                match doctor::policy(policy) {
                    Some(f) => findings.push(f),
                    None => in_force.1 += 1,
                }
            }
        }
        Err(e) => findings.push(unreadable("agents", "AgentPolicies", e)),
    }
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
