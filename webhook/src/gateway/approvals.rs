//! Waiting for people: a call that needs approval becomes an ApprovalRequest, bound to the
//! digest of its exact arguments, and the caller waits on a watch of that one object until it is
//! approved, denied, expired, or the agent's kill switch is engaged.
//!
//! Each waiting call has its own request, so an approval can release that call once and never
//! another: a changed argument is a different call, with a different digest and request.

use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use serde_json::Value;
use tollgate_audit::{ApprovalRef, Entry, Event};
use tollgate_crds::ApprovalRequest;
use tollgate_crds::approval::{ApprovalRequestSpec, Phase, PolicyRef as RequestPolicyRef, Verdict};
use tollgate_crds::common::{LocalObjectReference, OnTimeout};
use tollgate_engine::{Decision, DenyCode, ToolCall};

use super::{Caller, Decided, Gateway, Policies, audit_unavailable, identity_of};

/// The object name's prefix for a tool: lowercase, `_` and `.` as `-`, at most 40 characters.
fn name_prefix(tool: &str) -> String {
    let mut prefix: String = tool
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .take(40)
        .collect();
    prefix = prefix.trim_matches('-').to_owned();
    if prefix.is_empty() {
        prefix.push_str("call");
    }
    prefix.push('-');
    prefix
}

impl Gateway {
    /// For a call the engine sent to people: creates its ApprovalRequest, waits for the outcome
    /// and records it. Returns the final decision: allowed (the call is charged to the run now),
    /// or denied with `ApprovalDenied`, `ApprovalExpired` or `KillSwitch`. Outside a cluster the
    /// pending decision is returned as it is.
    pub(crate) async fn await_approval(
        &self,
        caller: &Caller,
        run: &str,
        tool: &str,
        arguments: &Value,
        decided: Decided,
    ) -> Result<Decided, axum::response::Response> {
        let Decision::RequireApproval { rule, approval } = &decided.decision else {
            return Ok(decided);
        };
        let Policies::Cluster(cluster) = &self.policies else {
            return Ok(decided);
        };
        let (namespace, name) = caller
            .agent
            .split_once('/')
            .unwrap_or(("default", caller.agent.as_str()));
        let mut shown = arguments.clone();
        self.redactor.redact(&mut shown, "", &mut Vec::new());
        let expires = (self.now)()
            .checked_add(jiff::SignedDuration::try_from(approval.timeout).unwrap_or_default())
            .unwrap_or(Timestamp::MAX);
        let request = ApprovalRequest {
            metadata: ObjectMeta {
                generate_name: Some(name_prefix(tool)),
                namespace: Some(namespace.to_owned()),
                labels: Some(
                    [
                        (
                            "app.kubernetes.io/managed-by".to_owned(),
                            "tollgate".to_owned(),
                        ),
                        ("tollgate.dev/agent".to_owned(), name.to_owned()),
                    ]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            spec: ApprovalRequestSpec {
                identity_ref: LocalObjectReference {
                    name: name.to_owned(),
                },
                policy_ref: RequestPolicyRef {
                    name: rule
                        .policy
                        .rsplit('/')
                        .next()
                        .unwrap_or(&rule.policy)
                        .to_owned(),
                    policy_hash: rule.policy_hash.to_string(),
                },
                run_id: run.to_owned(),
                step: decided.step.unwrap_or_default() as i64,
                tool: tool.to_owned(),
                arguments: shown,
                arguments_digest: approval.arguments_digest.clone(),
                reason: approval.reason.clone(),
                approvers: approval.approvers.clone(),
                min_approvals: approval.min_approvals as i32,
                expires_at: Time(expires),
                on_timeout: OnTimeout::Deny,
                decisions: Vec::new(),
            },
            status: None,
        };
        let api: Api<ApprovalRequest> = Api::namespaced(cluster.client(), namespace);
        let created = api
            .create(&PostParams::default(), &request)
            .await
            .map_err(|e| audit_unavailable(format!("create ApprovalRequest: {e}")))?;
        let object = created.metadata.name.clone().unwrap_or_default();
        tracing::info!(agent = %caller.agent, %tool, request = %object, "call waits for approval");

        // Counted while waiting, also when the caller goes away mid-wait.
        struct Waiting(prometheus::IntGauge);
        impl Drop for Waiting {
            fn drop(&mut self) {
                self.0.dec();
            }
        }
        self.metrics.waiting.inc();
        let waiting = Waiting(self.metrics.waiting.clone());
        let (phase, approvers) = self
            .wait(&api, &object, &caller.agent, created, expires)
            .await;
        drop(waiting);
        let full_name = format!("{namespace}/{object}");
        let decision = match phase {
            Phase::Approved => Decision::Allow {
                rule: rule.clone(),
                review: false,
            },
            Phase::Denied => Decision::Deny {
                code: DenyCode::ApprovalDenied,
                rule: rule.clone(),
                message: format!("ApprovalRequest {full_name} was denied"),
            },
            Phase::Cancelled => Decision::Deny {
                code: DenyCode::KillSwitch,
                rule: rule.clone(),
                message: format!(
                    "the kill switch of agent {} was engaged while {full_name} waited",
                    caller.agent
                ),
            },
            _ => Decision::Deny {
                code: DenyCode::ApprovalExpired,
                rule: rule.clone(),
                message: format!("ApprovalRequest {full_name} expired undecided"),
            },
        };
        if decision.is_allowed()
            && let Some(Ok(policy)) = self.policies.agent(&caller.agent).map(|a| a.policy.clone())
        {
            let state = self.agent_state(&caller.agent);
            let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(run_state) = state.runs.get_mut(run) {
                policy.release(
                    &ToolCall {
                        run_id: run,
                        tool,
                        arguments,
                    },
                    run_state,
                );
            }
        }
        let mut entry = Entry::new((self.now)(), Event::Approval, identity_of(Some(caller)));
        entry.agent = Some(caller.agent.clone());
        entry.run = Some(run.to_owned());
        entry.step = decided.step;
        entry.tool = Some(tool.to_owned());
        entry.decision = Some(decision.clone());
        entry.approval = Some(ApprovalRef {
            name: full_name,
            phase: format!("{phase:?}"),
            approvers,
        });
        let audit = self.audit.append(entry).await.map_err(audit_unavailable)?;
        Ok(Decided {
            decision,
            step: decided.step,
            audit,
            policy: decided.policy,
        })
    }

    /// Watches one ApprovalRequest until its decisions settle it, it expires, or the agent is
    /// killed (checked every second). Returns the phase (`Cancelled` for the kill switch) and
    /// the approving users.
    async fn wait(
        &self,
        api: &Api<ApprovalRequest>,
        object: &str,
        agent: &str,
        mut latest: ApprovalRequest,
        expires: Timestamp,
    ) -> (Phase, Vec<String>) {
        let approvers = |r: &ApprovalRequest| -> Vec<String> {
            r.spec
                .decisions
                .iter()
                .filter(|d| d.verdict == Verdict::Approve)
                .filter_map(|d| d.user.clone())
                .collect()
        };
        let config = watcher::Config::default().fields(&format!("metadata.name={object}"));
        let mut events = watcher::watcher(api.clone(), config).boxed();
        let started = Instant::now();
        loop {
            if self.policies.agent(agent).is_none_or(|entry| entry.killed) {
                return (Phase::Cancelled, approvers(&latest));
            }
            let phase = tollgate_engine::approval::phase(&latest, (self.now)());
            if phase.is_final() {
                // The operator denies pending requests with reason KillSwitch when a switch is
                // engaged; the waiting call is then a kill-switch denial, not an approver's.
                let killed =
                    latest.status.as_ref().and_then(|s| s.reason.as_deref()) == Some("KillSwitch");
                return (
                    if killed { Phase::Cancelled } else { phase },
                    approvers(&latest),
                );
            }
            if (self.now)() >= expires {
                return (Phase::Expired, approvers(&latest));
            }
            match tokio::time::timeout(Duration::from_secs(1), events.next()).await {
                Ok(Some(Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)))) => {
                    latest = object;
                }
                Ok(Some(Ok(_))) | Err(_) => {}
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "approval watch error; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(None) => {
                    events = watcher::watcher(
                        api.clone(),
                        watcher::Config::default().fields(&format!("metadata.name={object}")),
                    )
                    .boxed();
                }
            }
            if started.elapsed() > Duration::from_secs(24 * 3600) {
                return (Phase::Expired, approvers(&latest));
            }
        }
    }
}
