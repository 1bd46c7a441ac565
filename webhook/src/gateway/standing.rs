//! The gateway writes what its audit trail says of each agent onto the agent's AgentPolicy:
//! `status.tools` (each allowed tool's autonomy, clean completions and incidents in the policy's
//! graduation window, last use, and the autonomy that record makes it eligible for) and
//! `status.drift` (the allowed tools not called in the drift window). Graduation is never
//! applied: people read `eligibleFor` and change the policy.
//!
//! It writes with server-side apply as [`MANAGER`], owning only those two fields (the operator
//! owns the conditions and the hash). Every replica evaluates on its own schedule and skips a
//! policy whose status another replica refreshed within the interval, so N replicas do not
//! write N times as often.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tollgate_crds::AgentPolicy;
use tollgate_crds::policy::AgentPolicyStatus;
use tollgate_engine::CompiledPolicy;

use super::read::Records;
use crate::cluster::ClusterView;

/// The field manager of the gateway's status writes.
pub const MANAGER: &str = "tollgate-gateway";

/// When and over what the gateway evaluates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// How often each policy is evaluated.
    pub interval: Duration,
    /// The drift window, such as `720h`.
    pub window: String,
}

impl Default for Schedule {
    /// Every five minutes, drift over 30 days.
    fn default() -> Self {
        Schedule {
            interval: Duration::from_secs(300),
            window: "720h".to_owned(),
        }
    }
}

/// Writes policies' standing from the trail.
pub struct StatusWriter {
    view: Arc<dyn ClusterView>,
    trail: Arc<dyn Records>,
    client: kube::Client,
    schedule: Schedule,
    now: fn() -> Timestamp,
}

impl std::fmt::Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWriter")
            .field("schedule", &self.schedule)
            .finish_non_exhaustive()
    }
}

impl StatusWriter {
    /// A writer for the policies in `view`, reading `trail`, writing with `client` (which may
    /// patch `agentpolicies/status`).
    pub fn new(
        view: Arc<dyn ClusterView>,
        trail: Arc<dyn Records>,
        client: kube::Client,
        schedule: Schedule,
    ) -> Self {
        StatusWriter {
            view,
            trail,
            client,
            schedule,
            now: Timestamp::now,
        }
    }

    /// Evaluates every policy each interval, forever. A failure is logged and the policy is
    /// tried again at the next interval.
    pub async fn run(self) {
        let mut ticks = tokio::time::interval(self.schedule.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let written = self.once().await;
            tracing::debug!(written = written.len(), "policy standing evaluated");
        }
    }

    /// Evaluates every policy once; returns the policies (`namespace/name`) whose status it
    /// wrote.
    pub async fn once(&self) -> Vec<String> {
        let mut written = Vec::new();
        for policy in self.view.policies() {
            let name = format!(
                "{}/{}",
                policy.metadata.namespace.as_deref().unwrap_or_default(),
                policy.metadata.name.as_deref().unwrap_or_default()
            );
            match self.evaluate(&policy).await {
                Ok(true) => written.push(name),
                Ok(false) => {}
                Err(e) => tracing::warn!(policy = %name, error = %e, "policy standing not written"),
            }
        }
        written
    }

    /// Writes `policy`'s standing unless it is fresh. A policy that does not compile is left
    /// alone: its Ready condition says why, and it has no allowed tools to report.
    async fn evaluate(&self, policy: &AgentPolicy) -> Result<bool, String> {
        let Ok(compiled) = CompiledPolicy::compile(policy) else {
            return Ok(false);
        };
        let now = (self.now)();
        let old = policy.status.clone().unwrap_or_default();
        let standing = self
            .trail
            .standing(&compiled, &self.schedule.window, now)
            .await?;
        if fresh(&old, &standing, &self.schedule, now) {
            return Ok(false);
        }
        let (Some(namespace), Some(name)) = (&policy.metadata.namespace, &policy.metadata.name)
        else {
            return Ok(false);
        };
        let body = json!({
            "apiVersion": "tollgate.dev/v1alpha1",
            "kind": "AgentPolicy",
            "status": {"tools": standing.tools, "drift": standing.drift},
        });
        Api::<AgentPolicy>::namespaced(self.client.clone(), namespace)
            .patch_status(
                name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(body),
            )
            .await
            .map_err(|e| format!("writing the status of AgentPolicy {namespace}/{name}: {e}"))?;
        Ok(true)
    }
}

/// Whether `old` already says what `standing` says and was evaluated within the interval (by
/// this replica or another).
fn fresh(
    old: &AgentPolicyStatus,
    standing: &tollgate_audit::standing::Standing,
    schedule: &Schedule,
    now: Timestamp,
) -> bool {
    let Some(drift) = &old.drift else {
        return false;
    };
    let recent = drift.evaluated_at.as_ref().is_some_and(|at| {
        now.duration_since(at.0)
            .unsigned_abs()
            .lt(&schedule.interval)
    });
    recent
        && old.tools == standing.tools
        && drift.window == standing.drift.window
        && drift.unused_tools == standing.drift.unused_tools
}
