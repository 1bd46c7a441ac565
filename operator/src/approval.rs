//! ApprovalRequest lifecycle: the final phase from the decisions (the engine's
//! [`tollgate_engine::approval::phase`]), expiry at `expiresAt` (requeued for that moment, never
//! polled), denial with reason KillSwitch while the agent's or the global switch is engaged, and
//! pruning once the retention period after the final phase has passed.

use std::sync::Arc;
use std::time::Duration;

use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tollgate_crds::approval::Phase;
use tollgate_crds::{AgentIdentity, ApprovalRequest};
use tollgate_engine::status::{self, ApprovalStep};

use crate::{Context, Error, apply_status, delete_if_present, instrumented, until};

/// The controller name in metrics.
pub const CONTROLLER: &str = "approvalrequest";

/// The ApprovalRequest controller: requests, and the identities whose kill switch decides them.
pub fn controller(context: &Context) -> Controller<DeserializeGuard<ApprovalRequest>> {
    let controller = Controller::<DeserializeGuard<ApprovalRequest>>::new(
        context.api(),
        watcher::Config::default().any_semantic(),
    );
    let requests = controller.store();
    controller.watches(
        context.api::<DeserializeGuard<AgentIdentity>>(),
        watcher::Config::default(),
        move |identity| {
            let killed = identity
                .0
                .as_ref()
                .is_ok_and(|i| i.spec.kill_switch.engaged);
            let namespace = identity.meta().namespace.clone();
            let name = identity.meta().name.clone();
            requests
                .state()
                .into_iter()
                .filter(|r| {
                    killed
                        && r.meta().namespace == namespace
                        && r.0.as_ref().is_ok_and(|r| {
                            Some(&r.spec.identity_ref.name) == name.as_ref()
                                && !r.status.as_ref().is_some_and(|s| s.phase.is_final())
                        })
                })
                .map(|r| ObjectRef::from_obj(&*r))
                .collect::<Vec<_>>()
        },
    )
}

/// Reconciles one request.
pub async fn reconcile(
    guard: Arc<DeserializeGuard<ApprovalRequest>>,
    context: Arc<Context>,
) -> Result<Action, Error> {
    instrumented(&context.metrics, CONTROLLER, async {
        match &guard.0 {
            Ok(request) => reconcile_request(request, &context).await,
            Err(invalid) => {
                context.invalid("ApprovalRequest", invalid).await;
                Ok(Action::await_change())
            }
        }
    })
    .await
}

/// Retries a failed reconciliation after a pause.
pub fn error_policy(
    _: Arc<DeserializeGuard<ApprovalRequest>>,
    _: &Error,
    _: Arc<Context>,
) -> Action {
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile_request(request: &ApprovalRequest, context: &Context) -> Result<Action, Error> {
    if request.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = request
        .namespace()
        .ok_or_else(|| Error::Incomplete("an ApprovalRequest without a namespace".into()))?;
    let name = request.name_any();
    let killed = context.global_stop().is_some()
        || context
            .identity(&namespace, &request.spec.identity_ref.name)
            .is_some_and(|g| g.0.as_ref().is_ok_and(|i| i.spec.kill_switch.engaged));
    let now = (context.now)();
    let api: Api<ApprovalRequest> = Api::namespaced(context.client.clone(), &namespace);
    match status::approval_step(request, killed, context.settings.approval_retention, now) {
        ApprovalStep::WaitUntil(at) => Ok(Action::requeue(until(at, now))),
        ApprovalStep::Prune => {
            delete_if_present(&api, &name).await?;
            tracing::info!(%namespace, %name, "decided ApprovalRequest pruned after retention");
            Ok(Action::await_change())
        }
        ApprovalStep::Write(new) => {
            apply_status(&api, &name, &new).await?;
            if let (Some(created), Some(decided)) = (
                request.metadata.creation_timestamp.as_ref(),
                new.decided_at.as_ref(),
            ) {
                let seconds = decided.0.duration_since(created.0).as_secs_f64().max(0.0);
                context
                    .metrics
                    .approval_decision
                    .with_label_values(&[&format!("{:?}", new.phase)])
                    .observe(seconds);
            }
            let message = new
                .conditions
                .iter()
                .find(|c| c.type_ == "Decided")
                .map(|c| c.message.clone())
                .unwrap_or_default();
            context
                .event(
                    request.object_ref(&()),
                    new.phase != Phase::Approved,
                    &format!("{:?}", new.phase),
                    message,
                )
                .await;
            Ok(Action::requeue(until(
                now + jiff::SignedDuration::try_from(context.settings.approval_retention)
                    .unwrap_or(jiff::SignedDuration::from_hours(24 * 90)),
                now,
            )))
        }
    }
}

/// Counts requests by phase for the `tollgate_operator_approvals` gauge, and notes when the
/// first pending one expires.
pub fn gauge(requests: &Store<DeserializeGuard<ApprovalRequest>>, metrics: &crate::Metrics) {
    let mut counts = [0i64; 5];
    let phases = [
        Phase::Pending,
        Phase::Approved,
        Phase::Denied,
        Phase::Expired,
        Phase::Cancelled,
    ];
    let mut soonest: Option<i64> = None;
    for guard in requests.state() {
        if let Ok(request) = &guard.0 {
            let phase = request.status.as_ref().map(|s| s.phase).unwrap_or_default();
            if let Some(i) = phases.iter().position(|p| *p == phase) {
                counts[i] += 1;
            }
            if phase == Phase::Pending {
                let expires = request.spec.expires_at.0.as_second();
                soonest = Some(soonest.map_or(expires, |s| s.min(expires)));
            }
        }
    }
    metrics.approval_soonest_expiry.set(soonest.unwrap_or(0));
    for (phase, count) in phases.iter().zip(counts) {
        metrics
            .approvals
            .with_label_values(&[&format!("{phase:?}")])
            .set(count);
    }
}
