//! AgentIdentity -> ServiceAccount, Role, RoleBinding and NetworkPolicy, owned by the identity
//! (garbage collection removes them with it), and the kill switches: engaged, the RoleBinding
//! goes and the NetworkPolicy denies all egress; disengaged, both come back.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tollgate_crds::AgentIdentity;
use tollgate_crds::common::condition;
use tollgate_engine::children::{self, Children, child_name};
use tollgate_engine::status::{self, Stop, is_true};

use crate::{
    Context, Doing, Error, Settings, apply, apply_status, delete_if_present, instrumented,
    scoped_api,
};

/// The controller name in metrics.
pub const CONTROLLER: &str = "agentidentity";

/// The AgentIdentity controller: watches identities (a malformed one is reported, never wedges
/// the watch) and the children the operator manages.
pub fn controller(
    client: &Client,
    settings: &Settings,
) -> Controller<DeserializeGuard<AgentIdentity>> {
    let ns = settings.watch_namespace.as_deref();
    let managed = watcher::Config::default().labels(&crate::managed_selector());
    Controller::new(
        scoped_api(client, ns),
        watcher::Config::default().any_semantic(),
    )
    .owns::<ServiceAccount>(scoped_api(client, ns), managed.clone())
    .owns::<Role>(scoped_api(client, ns), managed.clone())
    .owns::<RoleBinding>(scoped_api(client, ns), managed.clone())
    .owns::<NetworkPolicy>(scoped_api(client, ns), managed)
}

/// Reconciles one identity.
pub async fn reconcile(
    guard: Arc<DeserializeGuard<AgentIdentity>>,
    context: Arc<Context>,
) -> Result<Action, Error> {
    instrumented(&context.metrics, CONTROLLER, async {
        match &guard.0 {
            Ok(identity) => reconcile_identity(identity, &context).await,
            Err(invalid) => {
                context.invalid("AgentIdentity", invalid).await;
                Ok(Action::await_change())
            }
        }
    })
    .await
}

/// Retries a failed reconciliation after a pause.
pub fn error_policy(_: Arc<DeserializeGuard<AgentIdentity>>, _: &Error, _: Arc<Context>) -> Action {
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile_identity(identity: &AgentIdentity, context: &Context) -> Result<Action, Error> {
    if identity.metadata.deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove the children.
        return Ok(Action::await_change());
    }
    let namespace = identity
        .namespace()
        .ok_or_else(|| Error::Incomplete("an AgentIdentity without a namespace".into()))?;
    let name = identity.name_any();
    let client = &context.client;
    let stop = Stop::of_agent(identity).or_else(|| context.global_stop());
    let desired = children::desired_children(identity, &context.settings.gateway, stop.is_some());

    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &namespace);
    match &desired {
        Ok(desired) => apply_children(client, &namespace, desired).await?,
        Err(_) => {
            // Rules that would let the agent raise its rights: admission refuses them, and if
            // one gets here anyway the agent keeps nothing.
            delete_if_present(&bindings, &child_name(identity)).await?;
        }
    }
    remove_stale_service_account(identity, client, &namespace).await?;

    let new = status::identity_status(
        identity,
        stop.as_ref(),
        desired.as_ref().map_err(Vec::as_slice),
        (context.now)(),
    );
    if identity.status.as_ref() != Some(&new) {
        let api: Api<AgentIdentity> = Api::namespaced(client.clone(), &namespace);
        apply_status(&api, &name, &new).await?;
        announce(identity, &new, context).await;
    }
    Ok(Action::requeue(Duration::from_secs(600)))
}

/// Applies the children in the order that never widens rights: when the RoleBinding goes it goes
/// first; when it comes back it comes last.
async fn apply_children(client: &Client, namespace: &str, desired: &Children) -> Result<(), Error> {
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), namespace);
    let binding_name = desired
        .role
        .metadata
        .name
        .clone()
        .ok_or_else(|| Error::Incomplete("a desired Role has no name".into()))?;
    if desired.role_binding.is_none() {
        delete_if_present(&bindings, &binding_name).await?;
    }
    apply(
        &Api::namespaced(client.clone(), namespace),
        &desired.network_policy,
    )
    .await?;
    apply(
        &Api::namespaced(client.clone(), namespace),
        &desired.service_account,
    )
    .await?;
    apply(&Api::namespaced(client.clone(), namespace), &desired.role).await?;
    if let Some(binding) = &desired.role_binding {
        apply(&bindings, binding).await?;
    }
    Ok(())
}

/// When `spec.serviceAccount.name` changed, the ServiceAccount named in the status is deleted if
/// this identity owns it.
async fn remove_stale_service_account(
    identity: &AgentIdentity,
    client: &Client,
    namespace: &str,
) -> Result<(), Error> {
    let Some(previous) = identity
        .status
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
    else {
        return Ok(());
    };
    if previous == identity.service_account_name() {
        return Ok(());
    }
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let Some(account) = api
        .get_opt(&previous)
        .await
        .doing(|| format!("reading ServiceAccount {previous}"))?
    else {
        return Ok(());
    };
    let uid = identity.metadata.uid.as_deref();
    if account
        .owner_references()
        .iter()
        .any(|o| Some(o.uid.as_str()) == uid)
    {
        delete_if_present(&api, &previous).await?;
    }
    Ok(())
}

/// One Event for each change of consequence: Ready or the kill switch changed.
async fn announce(
    identity: &AgentIdentity,
    new: &tollgate_crds::identity::AgentIdentityStatus,
    context: &Context,
) {
    let old = identity.status.clone().unwrap_or_default();
    let changed = |type_: &str| {
        let find = |conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]| {
            conditions
                .iter()
                .find(|c| c.type_ == type_)
                .map(|c| (c.status.clone(), c.reason.clone()))
        };
        let now = find(&new.conditions);
        (find(&old.conditions) != now)
            .then(|| new.conditions.iter().find(|c| c.type_ == type_).cloned())
            .flatten()
    };
    let reference = identity.object_ref(&());
    if let Some(kill) = changed(condition::KILL_SWITCH_ENGAGED) {
        let engaged = kill.status == "True";
        // The first status of a new identity that is not killed is no news.
        if engaged || !old.conditions.is_empty() {
            let reason = if engaged {
                "KillSwitchEngaged"
            } else {
                "KillSwitchReleased"
            };
            context
                .event(reference.clone(), engaged, reason, kill.message)
                .await;
        }
    }
    if let Some(ready) = changed(condition::READY) {
        let warning = ready.status != "True" && ready.reason != "KillSwitchEngaged";
        if ready.reason != "KillSwitchEngaged" {
            context
                .event(reference, warning, &ready.reason, ready.message)
                .await;
        }
    }
}

/// Counts identities by state for the `tollgate_operator_agents` gauge.
pub fn gauge(identities: &Store<DeserializeGuard<AgentIdentity>>, metrics: &crate::Metrics) {
    let (mut ready, mut killed, mut failed, mut pending) = (0, 0, 0, 0);
    for guard in identities.state() {
        match &guard.0 {
            Err(_) => failed += 1,
            Ok(identity) => {
                let conditions = identity
                    .status
                    .as_ref()
                    .map(|s| s.conditions.as_slice())
                    .unwrap_or_default();
                if is_true(conditions, condition::KILL_SWITCH_ENGAGED) {
                    killed += 1;
                } else if is_true(conditions, condition::READY) {
                    ready += 1;
                } else if conditions.is_empty() {
                    pending += 1;
                } else {
                    failed += 1;
                }
            }
        }
    }
    for (state, count) in [
        ("ready", ready),
        ("killed", killed),
        ("failed", failed),
        ("pending", pending),
    ] {
        metrics.agents.with_label_values(&[state]).set(count);
    }
}
