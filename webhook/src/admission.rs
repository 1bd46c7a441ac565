//! The admission face: the endpoints the kube-apiserver calls. Each parses the AdmissionReview,
//! asks tollgate-engine, and answers; nothing here decides on its own.
//!
//! | path | what |
//! |---|---|
//! | `/admission/validate-tollgate` | AgentIdentity and AgentPolicy compile and escalation checks; ApprovalRequest integrity |
//! | `/admission/mutate-approvals` | stamps appended decisions with the authenticated user and time |
//! | `/admission/validate-agents` | guards agents' own API writes (kill switch, self-escalation, freezes, protected objects) |
//! | `/admission/validate-pods` | refuses agent pods that do not match their identity or whose kill switch is engaged |
//! | `/admission/mutate-pods` | gives agent pods their gateway token and TOLLGATE_URL |
//!
//! With an audit trail, every verdict on an agent's own write or an agent pod is recorded before
//! the answer, and an agent's request the trail cannot take is refused.
//!
//! A body that is not an AdmissionReview gets HTTP 400 with a JSON error naming what is wrong;
//! a body over [`MAX_BODY`] gets 413. Neither can panic or hang the server.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use jiff::Timestamp;
use kube::core::DynamicObject;
use kube::core::admission::{
    AdmissionRequest, AdmissionResponse, AdmissionReview, Operation as AdmissionOperation,
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tollgate_audit::{AuditLog, Entry, Event, Identity};
use tollgate_crds::common::{GLOBAL_KILL_SWITCH, GLOBAL_KILL_SWITCH_KEY};
use tollgate_crds::policy::Operation;
use tollgate_crds::{AgentIdentity, AgentPolicy, ApprovalRequest};
use tollgate_engine::admission::{self, ApiWrite, Judged, Verdict};
use tollgate_engine::approval::{self, Author};
use tollgate_engine::status::KILL_SWITCH_BY_ANNOTATION;
use tollgate_engine::{CompiledPolicy, Decision, children};

use tollgate_runtime::cluster::ClusterView;
use tollgate_runtime::metrics::Metrics;

/// The largest AdmissionReview accepted (the apiserver's own request limit is 3 MiB).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// Settings of the admission face.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The username of the gateway's ServiceAccount, the only creator of ApprovalRequests.
    pub gateway_username: String,
    /// The gateway URL injected into agent pods as TOLLGATE_URL.
    pub gateway_url: String,
}

/// Everything a handler needs.
pub struct AdmissionState {
    /// The cluster as the webhook sees it.
    pub view: Arc<dyn ClusterView>,
    /// Settings.
    pub settings: Settings,
    /// Metrics.
    pub metrics: Metrics,
    /// The clock (a function, so tests can fix time).
    pub now: fn() -> Timestamp,
    /// Where agents' writes and agent pods are recorded, each before it is answered; when the
    /// trail cannot take a record the agent's request is refused. Without one, refusals are
    /// logged (target `tollgate::audit`) and nothing else.
    pub audit: Option<AuditLog>,
}

impl std::fmt::Debug for AdmissionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmissionState")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The admission router.
pub fn router(state: Arc<AdmissionState>) -> Router {
    Router::new()
        .route("/admission/validate-tollgate", post(validate_tollgate))
        .route("/admission/mutate-approvals", post(mutate_approvals))
        .route(
            "/admission/mutate-kill-switches",
            post(mutate_kill_switches),
        )
        .route("/admission/validate-agents", post(validate_agents))
        .route("/admission/validate-pods", post(validate_pods))
        .route("/admission/mutate-pods", post(mutate_pods))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// A handler's answer, and the audit record of an agent's request.
type Handler =
    fn(&AdmissionState, &AdmissionRequest<DynamicObject>) -> (AdmissionResponse, Option<Entry>);

/// Parses, decides with `handler`, records an agent's request, answers, and counts.
async fn answer(
    state: &AdmissionState,
    endpoint: &'static str,
    body: &[u8],
    handler: Handler,
) -> Response {
    let started = Instant::now();
    let request = serde_json::from_slice::<AdmissionReview<DynamicObject>>(body)
        .map_err(|e| format!("malformed AdmissionReview: {e}"))
        .and_then(|review| {
            let request: Result<AdmissionRequest<DynamicObject>, _> = review.try_into();
            request.map_err(|e| format!("malformed AdmissionReview: {e}"))
        });
    let response = match request {
        Ok(request) => {
            let (mut response, record) = handler(state, &request);
            if let Some(entry) = record {
                response = record_agent_request(state, &request, response, entry).await;
            }
            let outcome = if response.allowed {
                "allowed"
            } else {
                "denied"
            };
            state
                .metrics
                .reviews
                .with_label_values(&[endpoint, outcome])
                .inc();
            axum::Json(response.into_review()).into_response()
        }
        Err(error) => {
            state
                .metrics
                .reviews
                .with_label_values(&[endpoint, "malformed"])
                .inc();
            tracing::warn!(endpoint, %error, "refused a malformed AdmissionReview");
            (StatusCode::BAD_REQUEST, axum::Json(json!({"error": error}))).into_response()
        }
    };
    state
        .metrics
        .duration
        .with_label_values(&[endpoint])
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn validate_tollgate(State(state): State<Arc<AdmissionState>>, body: Bytes) -> Response {
    answer(&state, "validate-tollgate", &body, |s, r| {
        (decide_tollgate(s, r), None)
    })
    .await
}
async fn mutate_approvals(State(state): State<Arc<AdmissionState>>, body: Bytes) -> Response {
    answer(&state, "mutate-approvals", &body, |s, r| {
        (stamp_approvals(s, r), None)
    })
    .await
}
async fn mutate_kill_switches(State(state): State<Arc<AdmissionState>>, body: Bytes) -> Response {
    answer(&state, "mutate-kill-switches", &body, |s, r| {
        (stamp_kill_switch(s, r), None)
    })
    .await
}
async fn validate_agents(State(state): State<Arc<AdmissionState>>, body: Bytes) -> Response {
    answer(&state, "validate-agents", &body, decide_agent_write).await
}
async fn validate_pods(State(state): State<Arc<AdmissionState>>, body: Bytes) -> Response {
    answer(&state, "validate-pods", &body, decide_pod).await
}
async fn mutate_pods(State(state): State<Arc<AdmissionState>>, body: Bytes) -> Response {
    answer(&state, "mutate-pods", &body, |s, r| {
        (inject_pod(s, r), None)
    })
    .await
}

fn typed<T: DeserializeOwned>(object: &DynamicObject) -> Result<T, String> {
    serde_json::to_value(object)
        .and_then(serde_json::from_value)
        .map_err(|e| format!("cannot read the object: {e}"))
}

/// A refusal, as HTTP 403 Forbidden: the apiserver turns a code below 400 into 400 Bad Request,
/// which tells clients their request was malformed rather than not allowed.
fn deny(request: &AdmissionRequest<DynamicObject>, message: String) -> AdmissionResponse {
    let mut response = AdmissionResponse::from(request).deny(message);
    response.result.code = 403;
    response.result.reason = "Forbidden".to_owned();
    response
}

fn decide_tollgate(
    state: &AdmissionState,
    request: &AdmissionRequest<DynamicObject>,
) -> AdmissionResponse {
    let allow = AdmissionResponse::from(request);
    let Some(object) = &request.object else {
        return allow;
    };
    let name = request.name.as_str();
    match request.kind.kind.as_str() {
        "AgentPolicy" => match typed::<AgentPolicy>(object).map(|p| CompiledPolicy::compile(&p)) {
            Ok(Ok(_)) => allow,
            Ok(Err(errors)) => deny(request, format!("AgentPolicy {name} is invalid: {errors}")),
            Err(e) => deny(request, e),
        },
        "AgentIdentity" => {
            match typed::<AgentIdentity>(object) {
                Ok(identity)
                    if request.user_info.username.as_deref()
                        == Some(state.settings.gateway_username.as_str()) =>
                {
                    let verdict = match (&request.operation, &request.old_object) {
                    (AdmissionOperation::Update, Some(old)) => typed::<AgentIdentity>(old)
                        .and_then(|old| {
                            tollgate_engine::admission::gateway_identity_update(&old, &identity)
                        }),
                    _ => Err("the gateway may only engage the kill switch of an existing AgentIdentity".to_owned()),
                };
                    match verdict {
                        Ok(()) => allow,
                        Err(e) => deny(request, format!("AgentIdentity {name}: {e}")),
                    }
                }
                Ok(identity) => {
                    let errors = children::escalation_errors(&identity.spec.kubernetes.rules);
                    if errors.is_empty() {
                        allow
                    } else {
                        let list: Vec<String> = errors.iter().map(|e| format!("\n- {e}")).collect();
                        deny(
                            request,
                            format!(
                                "AgentIdentity {name} would let the agent raise its own rights:{}",
                                list.concat()
                            ),
                        )
                    }
                }
                Err(e) => deny(request, e),
            }
        }
        "ApprovalRequest" => {
            let author = Author {
                username: &request.user_info.username.clone().unwrap_or_default(),
                groups: &request.user_info.groups.clone().unwrap_or_default(),
            };
            let verdict = typed::<ApprovalRequest>(object).and_then(|new| {
                match (&request.operation, &request.old_object) {
                    (AdmissionOperation::Create, _) => {
                        approval::validate_create(&new, &author, &state.settings.gateway_username)
                    }
                    (AdmissionOperation::Update, Some(old)) => {
                        let old: ApprovalRequest = typed(old)?;
                        let namespace = request.namespace.as_deref().unwrap_or_default();
                        let identity = state.view.identity(namespace, &old.spec.identity_ref.name);
                        let agent_username = identity.as_ref().map_or_else(
                            || {
                                format!(
                                    "system:serviceaccount:{namespace}:agent-{}",
                                    old.spec.identity_ref.name
                                )
                            },
                            |i| {
                                format!(
                                    "system:serviceaccount:{namespace}:{}",
                                    i.service_account_name()
                                )
                            },
                        );
                        let killed = identity
                            .as_deref()
                            .map_or_else(|| state.view.global_kill(), |i| state.view.is_killed(i));
                        approval::validate_update(
                            &old,
                            &new,
                            &author,
                            &agent_username,
                            killed,
                            (state.now)(),
                        )
                    }
                    _ => Ok(()),
                }
            });
            match verdict {
                Ok(()) => allow,
                Err(e) => deny(request, format!("ApprovalRequest {name}: {e}")),
            }
        }
        _ => allow,
    }
}

fn stamp_approvals(
    state: &AdmissionState,
    request: &AdmissionRequest<DynamicObject>,
) -> AdmissionResponse {
    let allow = AdmissionResponse::from(request);
    let Some(object) = &request.object else {
        return allow;
    };
    let parsed = typed::<ApprovalRequest>(object).and_then(|new| {
        Ok((
            new,
            request
                .old_object
                .as_ref()
                .map(typed::<ApprovalRequest>)
                .transpose()?,
        ))
    });
    let (new, old) = match parsed {
        Ok(pair) => pair,
        Err(e) => return deny(request, e),
    };
    let user = request.user_info.username.clone().unwrap_or_default();
    let at = (state.now)().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let mut operations = Vec::new();
    for i in approval::appended(old.as_ref(), &new) {
        operations
            .push(json!({"op": "add", "path": format!("/spec/decisions/{i}/user"), "value": user}));
        operations
            .push(json!({"op": "add", "path": format!("/spec/decisions/{i}/at"), "value": at}));
    }
    with_patch(request, allow, operations)
}

/// Stamps who engaged a kill switch (an AgentIdentity's, or the global ConfigMap) with the
/// authenticated user, replacing whatever the writer put there.
fn stamp_kill_switch(
    _state: &AdmissionState,
    request: &AdmissionRequest<DynamicObject>,
) -> AdmissionResponse {
    let allow = AdmissionResponse::from(request);
    let Some(object) = &request.object else {
        return allow;
    };
    let engaged_of = |o: &DynamicObject| -> Result<bool, String> {
        match request.kind.kind.as_str() {
            "AgentIdentity" => Ok(typed::<AgentIdentity>(o)?.spec.kill_switch.engaged),
            _ => Ok(o.data["data"][GLOBAL_KILL_SWITCH_KEY] == "true"),
        }
    };
    if request.kind.kind == "ConfigMap" && request.name != GLOBAL_KILL_SWITCH {
        return allow;
    }
    let by_of = |o: &DynamicObject| -> Option<String> {
        o.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(KILL_SWITCH_BY_ANNOTATION))
            .cloned()
    };
    let old = match request
        .old_object
        .as_ref()
        .map(|o| Ok::<_, String>((engaged_of(o)?, by_of(o))))
    {
        None => None,
        Some(Ok(old)) => Some(old),
        Some(Err(e)) => return deny(request, e),
    };
    let engaged = match engaged_of(object) {
        Ok(engaged) => engaged,
        Err(e) => return deny(request, e),
    };
    let user = request.user_info.username.clone().unwrap_or_default();
    let desired = tollgate_engine::admission::kill_switch_engaged_by(
        old.as_ref().map(|(e, by)| (*e, by.as_deref())),
        engaged,
        &user,
    );
    let current = by_of(object);
    if current == desired {
        return allow;
    }
    let key = format!(
        "/metadata/annotations/{}",
        KILL_SWITCH_BY_ANNOTATION
            .replace('~', "~0")
            .replace('/', "~1")
    );
    let operation = match (&desired, object.metadata.annotations.is_some()) {
        (Some(by), true) => json!({"op": "add", "path": key, "value": by}),
        (Some(by), false) => json!({"op": "add", "path": "/metadata/annotations",
                                    "value": {KILL_SWITCH_BY_ANNOTATION: by}}),
        (None, _) => json!({"op": "remove", "path": key}),
    };
    with_patch(request, allow, vec![operation])
}

fn with_patch(
    request: &AdmissionRequest<DynamicObject>,
    allow: AdmissionResponse,
    operations: Vec<Value>,
) -> AdmissionResponse {
    if operations.is_empty() {
        return allow;
    }
    match serde_json::from_value::<json_patch::Patch>(Value::Array(operations)) {
        Ok(patch) => allow
            .with_patch(patch)
            .unwrap_or_else(|e| deny(request, format!("cannot encode the patch: {e}"))),
        Err(e) => deny(request, format!("cannot build the patch: {e}")),
    }
}

fn labels_of(object: Option<&DynamicObject>) -> Option<&BTreeMap<String, String>> {
    object.and_then(|o| o.metadata.labels.as_ref())
}

fn decide_agent_write(
    state: &AdmissionState,
    request: &AdmissionRequest<DynamicObject>,
) -> (AdmissionResponse, Option<Entry>) {
    let allow = AdmissionResponse::from(request);
    let username = request.user_info.username.as_deref().unwrap_or_default();
    let Some(identity) = state.view.identity_by_username(username) else {
        return (allow, None);
    };
    let agent = identity.metadata.name.clone().unwrap_or_default();
    let namespace = identity.metadata.namespace.clone().unwrap_or_default();
    let killed = state.view.is_killed(&identity);
    let policies = state.view.policies_for(&namespace, &agent);
    let compiled = match policies.as_slice() {
        [policy] => state.view.compiled(policy).ok(),
        _ => None,
    };
    let operation = match request.operation {
        AdmissionOperation::Create => Operation::Create,
        AdmissionOperation::Update => Operation::Update,
        AdmissionOperation::Delete => Operation::Delete,
        AdmissionOperation::Connect => Operation::Connect,
    };
    let write = ApiWrite {
        operation,
        group: &request.resource.group,
        resource: &request.resource.resource,
        subresource: request.sub_resource.as_deref().unwrap_or_default(),
        name: &request.name,
        labels: labels_of(request.object.as_ref()),
        old_labels: labels_of(request.old_object.as_ref()),
    };
    let now = (state.now)();
    let verdict = admission::admit(&agent, killed, compiled.as_deref(), &write, now);
    let record = admission_record(
        request,
        &identity,
        compiled.as_deref(),
        &verdict,
        Judged::Write,
        now,
    );
    let response = match verdict {
        Verdict::Allowed => allow,
        Verdict::Denied { rule, message, .. } => {
            deny(request, format!("Tollgate: {message} [rule: {rule}]"))
        }
    };
    (response, Some(record))
}

/// The audit record of admission's verdict on an agent's request: who asked (for a pod, usually
/// a controller), which agent, the write (never the object: it may hold secrets), and the verdict
/// as a decision with the rule behind it.
fn admission_record(
    request: &AdmissionRequest<DynamicObject>,
    identity: &AgentIdentity,
    policy: Option<&CompiledPolicy>,
    verdict: &Verdict,
    judged: Judged,
    now: Timestamp,
) -> Entry {
    let extra = request.user_info.extra.as_ref();
    let claim = |key: &str| {
        extra
            .and_then(|e| e.get(key))
            .and_then(|v| v.first())
            .cloned()
    };
    let mut entry = Entry::new(
        now,
        Event::Admission,
        Identity {
            username: request.user_info.username.clone().unwrap_or_default(),
            pod: claim("authentication.kubernetes.io/pod-name"),
            token_id: claim("authentication.kubernetes.io/credential-id"),
        },
    );
    let agent = format!(
        "{}/{}",
        identity.metadata.namespace.as_deref().unwrap_or_default(),
        identity.metadata.name.as_deref().unwrap_or_default()
    );
    let operation = match request.operation {
        AdmissionOperation::Create => "CREATE",
        AdmissionOperation::Update => "UPDATE",
        AdmissionOperation::Delete => "DELETE",
        AdmissionOperation::Connect => "CONNECT",
    };
    entry.arguments = Some(json!({
        "operation": operation,
        "group": request.resource.group,
        "version": request.resource.version,
        "resource": request.resource.resource,
        "subresource": request.sub_resource.as_deref().unwrap_or_default(),
        "namespace": request.namespace.as_deref().unwrap_or_default(),
        "name": request.name,
        "uid": request.uid,
    }));
    if request.dry_run {
        // Decided all the same, and nothing changed.
        entry.arguments.as_mut().expect("just set")["dryRun"] = json!(true);
    }
    entry.decision = Some(verdict.decision(judged, &agent, policy));
    entry.agent = Some(agent);
    entry.policy = policy.map(tollgate_audit::PolicyRef::of);
    entry
}

/// Records `entry` before `response` goes back. An agent's request the trail cannot record is
/// refused (fail closed for agents); without a trail, refusals are logged.
async fn record_agent_request(
    state: &AdmissionState,
    request: &AdmissionRequest<DynamicObject>,
    response: AdmissionResponse,
    entry: Entry,
) -> AdmissionResponse {
    let Some(audit) = &state.audit else {
        if let Some(Decision::Deny { rule, message, .. }) = &entry.decision {
            tracing::info!(target: "tollgate::audit", agent = entry.agent.as_deref().unwrap_or_default(),
                username = %entry.identity.username, rule = %rule, message, operation = ?request.operation,
                resource = %request.resource.resource, name = %request.name, "agent request refused");
        }
        return response;
    };
    match audit.append(entry).await {
        Ok(_) => response,
        Err(e) => {
            tracing::error!(error = %e, "audit trail refused an admission record; the agent's request is refused");
            let why = format!(
                "Tollgate: the audit trail cannot record this request of an agent, so it is refused; retry later ({e})"
            );
            if response.allowed {
                deny(request, why)
            } else {
                let refused = response.result.message.clone();
                deny(
                    request,
                    format!("{why}. It is refused in any case: {refused}"),
                )
            }
        }
    }
}

/// The agent identity a pod being created would run as, if any. Only creation matters: a pod's
/// ServiceAccount and labels the selector judges cannot change afterwards without a new pod.
fn created_agent_pod(
    state: &AdmissionState,
    request: &AdmissionRequest<DynamicObject>,
) -> Option<Arc<AgentIdentity>> {
    if request.operation != AdmissionOperation::Create {
        return None;
    }
    let object = request.object.as_ref()?;
    let namespace = request.namespace.as_deref()?;
    let service_account = object
        .data
        .pointer("/spec/serviceAccountName")
        .and_then(Value::as_str)
        .unwrap_or("default");
    state.view.identity_by_username(&format!(
        "system:serviceaccount:{namespace}:{service_account}"
    ))
}

fn decide_pod(
    state: &AdmissionState,
    request: &AdmissionRequest<DynamicObject>,
) -> (AdmissionResponse, Option<Entry>) {
    let allow = AdmissionResponse::from(request);
    let Some(identity) = created_agent_pod(state, request) else {
        return (allow, None);
    };
    let killed = state.view.is_killed(&identity);
    let empty = BTreeMap::new();
    let labels = labels_of(request.object.as_ref()).unwrap_or(&empty);
    let verdict = admission::admit_pod(&identity, killed, labels);
    let record = admission_record(
        request,
        &identity,
        None,
        &verdict,
        Judged::Pod,
        (state.now)(),
    );
    let response = match verdict {
        Verdict::Allowed => allow,
        Verdict::Denied { rule, message, .. } => {
            deny(request, format!("Tollgate: {message} [rule: {rule}]"))
        }
    };
    (response, Some(record))
}

fn inject_pod(
    state: &AdmissionState,
    request: &AdmissionRequest<DynamicObject>,
) -> AdmissionResponse {
    let allow = AdmissionResponse::from(request);
    let Some(identity) = created_agent_pod(state, request) else {
        return allow;
    };
    let Some(object) = &request.object else {
        return allow;
    };
    let pod = json!({
        "metadata": {"labels": object.metadata.labels},
        "spec": object.data.get("spec").cloned().unwrap_or(Value::Null),
    });
    let operations = admission::pod_injection(&identity, &state.settings.gateway_url, &pod);
    with_patch(request, allow, operations)
}
