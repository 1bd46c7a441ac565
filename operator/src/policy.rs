//! AgentPolicy status: compiled with the engine (Ready, policyHash) and bound to an existing
//! AgentIdentity (IdentityBound). Identities appearing or going away re-evaluate the policies
//! that name them.

use std::sync::Arc;
use std::time::Duration;

use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tollgate_crds::common::condition;
use tollgate_crds::{AgentIdentity, AgentPolicy};
use tollgate_engine::CompiledPolicy;
use tollgate_engine::status;

use crate::{Context, Doing, Error, apply_status, instrumented};

/// The controller name in metrics.
pub const CONTROLLER: &str = "agentpolicy";

/// The AgentPolicy controller: policies, and the identities they name.
pub fn controller(context: &Context) -> Controller<DeserializeGuard<AgentPolicy>> {
    let controller = Controller::<DeserializeGuard<AgentPolicy>>::new(
        context.api(),
        watcher::Config::default().any_semantic(),
    );
    let policies = controller.store();
    controller.watches(
        context.api::<DeserializeGuard<AgentIdentity>>(),
        watcher::Config::default(),
        move |identity| {
            let namespace = identity.meta().namespace.clone();
            let name = identity.meta().name.clone();
            policies
                .state()
                .into_iter()
                .filter(|p| {
                    p.meta().namespace == namespace
                        && p.0
                            .as_ref()
                            .is_ok_and(|p| Some(&p.spec.identity_ref.name) == name.as_ref())
                })
                .map(|p| ObjectRef::from_obj(&*p))
                .collect::<Vec<_>>()
        },
    )
}

/// Reconciles one policy.
pub async fn reconcile(
    guard: Arc<DeserializeGuard<AgentPolicy>>,
    context: Arc<Context>,
) -> Result<Action, Error> {
    instrumented(&context.metrics, CONTROLLER, async {
        match &guard.0 {
            Ok(policy) => reconcile_policy(policy, &context).await,
            Err(invalid) => {
                context.invalid("AgentPolicy", invalid).await;
                Ok(Action::await_change())
            }
        }
    })
    .await
}

/// Retries a failed reconciliation after a pause.
pub fn error_policy(_: Arc<DeserializeGuard<AgentPolicy>>, _: &Error, _: Arc<Context>) -> Action {
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile_policy(policy: &AgentPolicy, context: &Context) -> Result<Action, Error> {
    if policy.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = policy
        .namespace()
        .ok_or_else(|| Error::Incomplete("an AgentPolicy without a namespace".into()))?;
    let name = policy.name_any();
    let compiled = CompiledPolicy::compile(policy);
    let identity_name = &policy.spec.identity_ref.name;
    // The identity watch of this controller may see an identity before the cache read here
    // does; a miss is confirmed with the apiserver.
    let identity = match context.identity(&namespace, identity_name) {
        Some(guard) => guard.0.as_ref().ok().cloned(),
        None => Api::<AgentIdentity>::namespaced(context.client.clone(), &namespace)
            .get_opt(identity_name)
            .await
            .doing(|| format!("reading AgentIdentity {namespace}/{identity_name}"))?,
    };
    let new = status::policy_status(
        policy,
        compiled.as_ref(),
        identity.as_ref(),
        (context.now)(),
    );
    if policy.status.as_ref().map(status::operator_fields) != Some(new.clone()) {
        let api: Api<AgentPolicy> = Api::namespaced(context.client.clone(), &namespace);
        apply_status(&api, &name, &new).await?;
        let old = policy.status.clone().unwrap_or_default();
        let key = |conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]| {
            conditions
                .iter()
                .find(|c| c.type_ == condition::READY)
                .map(|c| (c.status.clone(), c.reason.clone()))
        };
        if key(&old.conditions) != key(&new.conditions)
            && let Some(ready) = new.conditions.iter().find(|c| c.type_ == condition::READY)
        {
            context
                .event(
                    policy.object_ref(&()),
                    ready.status != "True",
                    &ready.reason,
                    ready.message.clone(),
                )
                .await;
        }
    }
    Ok(Action::requeue(Duration::from_secs(600)))
}
