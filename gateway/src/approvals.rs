//! Waiting for people: a call that needs approval becomes an ApprovalRequest, bound to the
//! digest of its exact arguments, and the caller waits on a watch of that one object until it is
//! approved, denied, expired, or the agent's kill switch is engaged.
//!
//! Each waiting call has its own request, so an approval can release that call once and never
//! another: a changed argument is a different call, with a different digest and request.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_runtime::cluster::bounded;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use serde_json::Value;
use tollgate_audit::{ApprovalPhase, ApprovalRef, Entry, Event};
use tollgate_crds::ApprovalRequest;
use tollgate_crds::approval::{ApprovalRequestSpec, Phase, PolicyRef as RequestPolicyRef, Verdict};
use tollgate_crds::common::{LocalObjectReference, OnTimeout};
use tollgate_engine::{Decision, DenyCode, ToolCall};

use super::{
    Caller, Decided, Gateway, Policies, Refusal, RefusalCode, audit_unavailable, identity_of,
};

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

/// An ApprovalRequest the gateway created for a pending call.
struct Created {
    name: String,
    namespace: String,
    latest: ApprovalRequest,
    expires: Timestamp,
}

impl Gateway {
    /// Creates the ApprovalRequest of a pending call, as the gateway's ServiceAccount. None when
    /// the decision is not pending or there is no cluster.
    async fn create_request(
        &self,
        caller: &Caller,
        run: &str,
        tool: &str,
        arguments: &Value,
        decided: &Decided,
    ) -> Result<Option<Created>, Refusal> {
        let Decision::RequireApproval { approval, .. } = &decided.decision else {
            return Ok(None);
        };
        let rule = decided.decision.rule();
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
        let created = match &self.policies {
            Policies::Cluster(cluster) => {
                let api: Api<ApprovalRequest> = Api::namespaced(cluster.client(), namespace);
                bounded(api.create(&PostParams::default(), &request))
                    .await
                    .map_err(|e| {
                        super::Refusal::new(
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            RefusalCode::ClusterUnavailable,
                            format!(
                                "the call needs approval, but its ApprovalRequest could not be \
                                 created ({e}); nothing was released; retry later"
                            ),
                        )
                    })
            }
            Policies::Dir(_) => self.desk.create(request, (self.now)()).map_err(|e| {
                super::Refusal::new(
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    RefusalCode::NoApprovals,
                    format!("the call needs approval, but it cannot be asked for: {e}"),
                )
            }),
        };
        let created = match created {
            Ok(created) => created,
            Err(refusal) => {
                return Err(self
                    .refuse_recorded(Some(caller), Some(tool), "/v1/decide", refusal)
                    .await);
            }
        };
        if !approval.notify.is_empty() {
            let follow = super::notify::follow(
                self.approval_source(),
                self.escalation.clone(),
                created.clone(),
                approval.notify.clone(),
                self.now,
                self.approval_url.clone(),
            );
            tokio::spawn(follow);
        }
        let object = created.metadata.name.clone().unwrap_or_default();
        Ok(Some(Created {
            name: object,
            namespace: namespace.to_owned(),
            latest: created,
            expires,
        }))
    }

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
    ) -> Result<Decided, Refusal> {
        let Some(Created {
            name: object,
            namespace,
            latest: created,
            expires,
        }) = self
            .create_request(caller, run, tool, arguments, &decided)
            .await?
        else {
            return Ok(decided);
        };
        let rule = decided.decision.rule().clone();
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
        let (mut phase, approvers) = self.wait(&object, &caller.agent, created, expires).await;
        drop(waiting);
        let full_name = format!("{namespace}/{object}");
        if phase == Phase::Approved
            && self
                .confirm_release(caller, &full_name, tool)
                .await?
                .is_some()
        {
            phase = Phase::Cancelled;
        }
        self.settle(
            caller,
            run,
            tool,
            arguments,
            rule,
            decided.step,
            decided.policy,
            phase,
            approvers,
            full_name,
        )
        .await
    }

    /// Records how a pending call ended and charges an approved one to its run.
    #[allow(clippy::too_many_arguments)]
    async fn settle(
        &self,
        caller: &Caller,
        run: &str,
        tool: &str,
        arguments: &Value,
        rule: tollgate_engine::RuleRef,
        step: Option<u64>,
        policy: Option<std::sync::Arc<tollgate_engine::CompiledPolicy>>,
        phase: Phase,
        approvers: Vec<String>,
        full_name: String,
    ) -> Result<Decided, Refusal> {
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
        let mut _following = None;
        if decision.is_allowed() {
            let policy = self
                .policies
                .agent(&caller.agent)
                .and_then(|a| a.policy.clone().ok());
            if let Some(policy) = &policy {
                _following = Some(self.follow(&caller.agent, policy).await?);
            }
            // Once only, across replicas too: the claim is checked under the agent's lock (the
            // cluster-wide one when replicas share the trail), after catching up with what the
            // others recorded, and the release is recorded before the lock is let go.
            match self.claim_release(caller, run, &full_name).await? {
                Claim::Won => {}
                Claim::Released => {
                    return self
                        .record_redemption(
                            caller,
                            run,
                            tool,
                            Decision::Deny {
                                code: DenyCode::ApprovalDenied,
                                rule,
                                message: format!(
                                    "ApprovalRequest {full_name} already released its call once"
                                ),
                            },
                            &full_name,
                        )
                        .await;
                }
            }
            let state = self.agent_state(&caller.agent);
            let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(policy) = &policy
                && let Some(run_state) = state.runs.get_mut(run)
            {
                policy.release(
                    &ToolCall {
                        run_id: run,
                        tool,
                        arguments,
                    },
                    step,
                    run_state,
                );
            }
        }
        let mut entry = Entry::new((self.now)(), Event::Approval, identity_of(Some(caller)));
        entry.agent = Some(caller.agent.clone());
        entry.run = Some(run.to_owned());
        entry.step = step;
        entry.tool = Some(tool.to_owned());
        entry.decision = Some(decision.clone());
        entry.approval = Some(ApprovalRef {
            name: full_name.clone(),
            phase: recorded(phase),
            approvers,
        });
        let audit = match self.audit.append(entry).await {
            Ok(audit) => audit,
            Err(e) => {
                if decision.is_allowed() {
                    // Not released after all: the approval stays for a retry.
                    self.redeemed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&full_name);
                }
                return Err(audit_unavailable(e));
            }
        };
        Ok(Decided {
            decision,
            step,
            audit,
            policy,
        })
    }

    /// Before an approved call is released: whether `caller`'s agent is stopped now, as the
    /// apiserver itself holds its own and the global kill switch (not as the watches last said),
    /// or by a switch this gateway holds after a breach. The kill switch wins every race
    /// (SECURITY.md 5): the watches may not yet carry a switch engaged a moment ago. When the
    /// switches cannot be read the call is not released either (a 503 naming why; the approval
    /// stays unused).
    async fn confirm_release(
        &self,
        caller: &Caller,
        full_name: &str,
        tool: &str,
    ) -> Result<Option<String>, Refusal> {
        let Policies::Cluster(cluster) = &self.policies else {
            // Standalone: the switch in the policy directory as it reads now, or one this
            // gateway holds after a breach.
            let engaged = self.policies.agent(&caller.agent).is_none_or(|a| a.killed);
            if engaged || self.escalation.holds(&caller.agent, engaged) {
                return Ok(Some(format!(
                    "the kill switch of agent {} is engaged",
                    caller.agent
                )));
            }
            return Ok(None);
        };
        let stopped = match cluster.stopped_now(&caller.agent).await {
            Ok(stopped) => stopped,
            Err(e) => {
                tracing::error!(agent = %caller.agent, request = %full_name, error = %e,
                    "kill switches unreadable; the approved call is not released");
                let refusal = super::Refusal::new(
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    RefusalCode::ClusterUnavailable,
                    format!(
                        "ApprovalRequest {full_name} is approved, but Tollgate could not confirm \
                         that no kill switch stops agent {} ({e}), so the call is not released; \
                         retry later",
                        caller.agent
                    ),
                );
                return Err(self
                    .refuse_recorded(Some(caller), Some(tool), "/v1/decide", refusal)
                    .await);
            }
        };
        if stopped.is_none() && self.escalation.holds(&caller.agent, false) {
            return Ok(Some(format!(
                "the kill switch of agent {} is engaged after a budget breach",
                caller.agent
            )));
        }
        Ok(stopped)
    }

    /// Follows one ApprovalRequest until its decisions settle it, it expires, or the agent is
    /// killed (checked every second), through the gateway's one watch of every ApprovalRequest
    /// ([`ApprovalWatch`]): however many calls wait, the apiserver serves this replica one
    /// watch. Returns the phase (`Cancelled` for the kill switch) and the approving users.
    async fn wait(
        &self,
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
        let namespace = latest.metadata.namespace.clone().unwrap_or_default();
        let signal = self.approval_signal();
        let started = Instant::now();
        loop {
            // Registered before the state is read, so a change in between still wakes it.
            let changed = signal.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(seen) = self.approval_latest(&namespace, object) {
                latest = seen;
            }
            if self.policies.agent(agent).is_none_or(|entry| entry.killed) {
                if matches!(self.policies, Policies::Dir(_)) {
                    // As the operator does in a cluster: the agent's open requests end.
                    self.desk.cancel_agent(agent, (self.now)());
                }
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
            if (self.now)() >= expires || started.elapsed() > Duration::from_secs(24 * 3600) {
                return (Phase::Expired, approvers(&latest));
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
        }
    }

    /// What wakes a call waiting for people: the gateway's one watch of every ApprovalRequest
    /// in a cluster (started on first use), the desk standalone.
    pub(crate) fn approval_signal(&self) -> &tokio::sync::Notify {
        match &self.policies {
            Policies::Cluster(cluster) => {
                &self
                    .approval_watch
                    .get_or_init(|| ApprovalWatch::start(cluster.client()))
                    .changed
            }
            Policies::Dir(_) => self.desk.signal(),
        }
    }

    /// Where a request is followed after its creation: the watch, or the desk.
    fn approval_source(&self) -> super::notify::Source {
        match &self.policies {
            Policies::Cluster(cluster) => {
                let watch = self
                    .approval_watch
                    .get_or_init(|| ApprovalWatch::start(cluster.client()));
                super::notify::Source::Watch {
                    store: watch.store.clone(),
                    changed: watch.changed.clone(),
                }
            }
            Policies::Dir(_) => super::notify::Source::Desk(self.desk.clone()),
        }
    }

    /// ApprovalRequest `namespace/name` as last seen: the watch's copy in a cluster, the desk's
    /// standalone.
    pub(crate) fn approval_latest(&self, namespace: &str, name: &str) -> Option<ApprovalRequest> {
        match &self.policies {
            Policies::Cluster(_) => {
                let watch = self.approval_watch.get()?;
                let reference = kube::runtime::reflector::ObjectRef::new(name).within(namespace);
                watch.store.get(&reference).map(|seen| (*seen).clone())
            }
            Policies::Dir(_) => self.desk.get(&format!("{namespace}/{name}"), (self.now)()),
        }
    }
}

/// One watch of every ApprovalRequest for the whole gateway: a reflector store the waiting
/// calls read, and a signal each change of it raises.
pub(crate) struct ApprovalWatch {
    store: kube::runtime::reflector::Store<ApprovalRequest>,
    changed: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for ApprovalWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApprovalWatch").finish_non_exhaustive()
    }
}

impl ApprovalWatch {
    fn start(client: kube::Client) -> Self {
        let (store, writer) = kube::runtime::reflector::store();
        let changed = Arc::new(tokio::sync::Notify::new());
        let signal = changed.clone();
        let events = kube::runtime::reflector::reflector(
            writer,
            watcher::watcher(
                Api::<ApprovalRequest>::all(client),
                watcher::Config::default(),
            ),
        );
        tokio::spawn(async move {
            use kube::runtime::WatchStreamExt as _;
            let mut events = std::pin::pin!(events.default_backoff());
            while let Some(event) = events.next().await {
                match event {
                    Ok(_) => signal.notify_waiters(),
                    Err(e) => tracing::warn!(error = %e, "approval watch error; retrying"),
                }
            }
        });
        Self { store, changed }
    }
}

/// The ApprovalRequest of a pending call, returned at once when the caller does not wait.
#[derive(Debug, Clone)]
pub(crate) struct Ticket {
    pub namespace: String,
    pub name: String,
    pub expires: Timestamp,
}

impl Ticket {
    pub(crate) fn json(&self) -> Value {
        serde_json::json!({"namespace": self.namespace, "name": self.name,
                           "expiresAt": self.expires.to_string()})
    }
}

/// What redeeming an approval gave.
pub(crate) enum Redeemed {
    /// Released (allowed once) or refused, and recorded.
    Settled(Box<Decided>),
    /// Nobody has decided yet; ask again.
    Pending(Ticket),
}

impl Gateway {
    /// `wait: false`: creates the call's ApprovalRequest, records it as pending and returns at
    /// once; the caller redeems it later with [`Gateway::redeem`].
    pub(crate) async fn request_approval(
        &self,
        caller: &Caller,
        run: &str,
        tool: &str,
        arguments: &Value,
        decided: Decided,
    ) -> Result<(Decided, Option<Ticket>), Refusal> {
        let Some(created) = self
            .create_request(caller, run, tool, arguments, &decided)
            .await?
        else {
            return Ok((decided, None));
        };
        let ticket = Ticket {
            namespace: created.namespace,
            name: created.name,
            expires: created.expires,
        };
        let mut entry = Entry::new((self.now)(), Event::Approval, identity_of(Some(caller)));
        entry.agent = Some(caller.agent.clone());
        entry.run = Some(run.to_owned());
        entry.step = decided.step;
        entry.tool = Some(tool.to_owned());
        entry.decision = Some(decided.decision.clone());
        entry.approval = Some(ApprovalRef {
            name: format!("{}/{}", ticket.namespace, ticket.name),
            phase: ApprovalPhase::Pending,
            approvers: Vec::new(),
        });
        let audit = self.audit.append(entry).await.map_err(audit_unavailable)?;
        Ok((Decided { audit, ..decided }, Some(ticket)))
    }

    /// Redeems the ApprovalRequest `name` for exactly this call: the agent's own request, for
    /// this run, this tool and arguments with the same digest, approved, and not released
    /// before (in this process or, after a restart, in the run's audit trail). A pending request
    /// is reported as pending; anything else is a recorded denial.
    pub(crate) async fn redeem(
        &self,
        caller: &Caller,
        run: &str,
        tool: &str,
        arguments: &Value,
        name: &str,
    ) -> Result<Redeemed, Refusal> {
        use super::Refusal;
        use axum::http::StatusCode;
        // Every refusal here is recorded before it is answered, as every other one is.
        let refuse = async |refusal: Refusal| {
            self.refuse_recorded(Some(caller), Some(tool), "/v1/decide", refusal)
                .await
        };
        let (namespace, agent_name) = caller
            .agent
            .split_once('/')
            .unwrap_or(("default", caller.agent.as_str()));
        let full_name = format!("{namespace}/{name}");
        let Some(agent) = self.policies.agent(&caller.agent) else {
            return Err(refuse(Refusal::unknown_agent(&caller.agent)).await);
        };
        let policy = match &agent.policy {
            Ok(policy) => policy.clone(),
            Err(problem) => {
                return Err(refuse(Refusal::unusable_policy(&caller.agent, problem)).await);
            }
        };
        self.hydrate(&agent.id, run, &policy, (self.now)()).await?;
        let rule = tollgate_engine::RuleRef {
            policy: policy.id().into(),
            generation: policy.generation(),
            policy_hash: policy.hash().into(),
            tool: Some(tool.into()),
            clause: format!("spec.tools.allowed[{tool}].approval").into(),
        };
        let deny = |code: DenyCode, message: String| {
            let (rule, full_name) = (rule.clone(), full_name.clone());
            async move {
                self.record_redemption(
                    caller,
                    run,
                    tool,
                    Decision::Deny {
                        code,
                        rule,
                        message,
                    },
                    &full_name,
                )
                .await
                .map(|d| Redeemed::Settled(Box::new(d)))
            }
        };
        let read = match &self.policies {
            Policies::Cluster(cluster) => {
                let api: Api<ApprovalRequest> = Api::namespaced(cluster.client(), namespace);
                bounded(api.get_opt(name)).await.map_err(|e| e.to_string())
            }
            Policies::Dir(_) => Ok(self.desk.get(&full_name, (self.now)())),
        };
        let request = match read {
            Ok(Some(request)) => request,
            Ok(None) => {
                return deny(
                    DenyCode::ApprovalDenied,
                    format!("there is no ApprovalRequest {full_name}"),
                )
                .await;
            }
            Err(e) => {
                return Err(refuse(Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    RefusalCode::ClusterUnavailable,
                    format!("ApprovalRequest {full_name} could not be read ({e}); retry later"),
                ))
                .await);
            }
        };
        if let Err(why) =
            tollgate_engine::approval::releases(&request, agent_name, run, tool, arguments)
        {
            return deny(
                DenyCode::ApprovalDenied,
                format!("ApprovalRequest {full_name}: {why}"),
            )
            .await;
        }
        let held = self.escalation.holds(&agent.id, agent.killed);
        if agent.killed || held {
            return deny(
                DenyCode::KillSwitch,
                format!("the kill switch of agent {} is engaged", caller.agent),
            )
            .await;
        }
        let mut phase = tollgate_engine::approval::phase(&request, (self.now)());
        if phase.is_final()
            && request.status.as_ref().and_then(|s| s.reason.as_deref()) == Some("KillSwitch")
        {
            phase = Phase::Cancelled;
        }
        let approvers: Vec<String> = request
            .spec
            .decisions
            .iter()
            .filter(|d| d.verdict == Verdict::Approve)
            .filter_map(|d| d.user.clone())
            .collect();
        if phase == Phase::Pending {
            return Ok(Redeemed::Pending(Ticket {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                expires: request.spec.expires_at.0,
            }));
        }
        if phase == Phase::Approved
            && let Some(reason) = self.confirm_release(caller, &full_name, tool).await?
        {
            return deny(
                DenyCode::KillSwitch,
                format!("{reason}: approved {full_name} is not released"),
            )
            .await;
        }
        // Approved (released now, once: `settle` claims it under the agent's lock), or denied,
        // expired or cancelled: recorded either way.
        let step = Some(request.spec.step.max(0) as u64);
        self.settle(
            caller,
            run,
            tool,
            arguments,
            rule.clone(),
            step,
            Some(policy),
            phase,
            approvers,
            full_name.clone(),
        )
        .await
        .map(|d| Redeemed::Settled(Box::new(d)))
    }

    /// Claims the one release `full_name` gives: lost when this process released it already or
    /// the trail records a release of it (by any replica). Hold the agent's lock around it and
    /// the record of the release. A trail that cannot be read claims nothing (the approval stays
    /// unused for a retry).
    async fn claim_release(
        &self,
        caller: &Caller,
        run: &str,
        full_name: &str,
    ) -> Result<Claim, Refusal> {
        let fresh = self
            .redeemed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(full_name);
        if !fresh {
            return Ok(Claim::Released);
        }
        let released_before = match &self.history {
            Some(history) => match history.entries(&caller.agent, Some(run), None).await {
                Ok(entries) => entries.iter().any(|e| {
                    e.event == Event::Approval
                        && e.approval.as_ref().is_some_and(|a| {
                            a.name == full_name && a.phase == ApprovalPhase::Approved
                        })
                }),
                Err(e) => {
                    self.redeemed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(full_name);
                    return Err(audit_unavailable(e));
                }
            },
            None => false,
        };
        Ok(if released_before {
            Claim::Released
        } else {
            Claim::Won
        })
    }

    async fn record_redemption(
        &self,
        caller: &Caller,
        run: &str,
        tool: &str,
        decision: Decision,
        full_name: &str,
    ) -> Result<Decided, Refusal> {
        let mut entry = Entry::new((self.now)(), Event::Approval, identity_of(Some(caller)));
        entry.agent = Some(caller.agent.clone());
        entry.run = Some(run.to_owned());
        entry.tool = Some(tool.to_owned());
        entry.decision = Some(decision.clone());
        entry.approval = Some(ApprovalRef {
            name: full_name.to_owned(),
            phase: ApprovalPhase::Refused,
            approvers: Vec::new(),
        });
        let audit = self.audit.append(entry).await.map_err(audit_unavailable)?;
        Ok(Decided {
            decision,
            step: None,
            audit,
            policy: None,
        })
    }
}

/// Whether this release of an approval is the one it gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// This one: release the call.
    Won,
    /// Released before, here or by another replica.
    Released,
}

/// ApprovalRequests whose call was released, by `namespace/name`: at most [`Released::LIMIT`]
/// in memory, the oldest forgotten first (the trail still holds every release).
#[derive(Debug, Default)]
pub(crate) struct Released {
    names: std::collections::HashSet<String>,
    order: std::collections::VecDeque<String>,
}

impl Released {
    const LIMIT: usize = 65_536;

    /// Notes `name`; false when it was noted already.
    pub(crate) fn insert(&mut self, name: &str) -> bool {
        if !self.names.insert(name.to_owned()) {
            return false;
        }
        self.order.push_back(name.to_owned());
        while self.order.len() > Self::LIMIT {
            if let Some(oldest) = self.order.pop_front() {
                self.names.remove(&oldest);
            }
        }
        true
    }

    /// Forgets `name` (its release did not happen).
    pub(crate) fn remove(&mut self, name: &str) {
        if self.names.remove(name) {
            self.order.retain(|n| n != name);
        }
    }
}

/// The trail's name of an ApprovalRequest's phase. A phase added to the CRD does not compile
/// until the trail has a name for it.
fn recorded(phase: Phase) -> ApprovalPhase {
    match phase {
        Phase::Pending => ApprovalPhase::Pending,
        Phase::Approved => ApprovalPhase::Approved,
        Phase::Denied => ApprovalPhase::Denied,
        Phase::Expired => ApprovalPhase::Expired,
        Phase::Cancelled => ApprovalPhase::Cancelled,
    }
}
