//! The standalone gateway's approval endpoint, for people with an approver's key
//! (`role: approver` in the key file), as `kubectl tollgate approve|deny --gateway` calls it:
//!
//! - `GET /v1/approvals`: the ApprovalRequests the key's holder may decide (listed by user or
//!   group), oldest first, as `{"items": [...]}`;
//! - `GET /v1/approvals/{namespace}/{name}`: one request (any approver may read it);
//! - `POST /v1/approvals/{namespace}/{name}` with `{"verdict": "Approve" | "Deny", "comment"?}`:
//!   adds the holder's decision, stamped with the key's name and the time (whatever the body
//!   says), under the same rules admission applies in a cluster; answers the request afterwards.
//!
//! Every decision is recorded in the audit trail before it takes effect, and every refusal is
//! recorded too. In a cluster approvers write to ApprovalRequests instead, and these routes are
//! not served.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tollgate_audit::{ApprovalPhase, ApprovalRef, Entry, Event, Identity};
use tollgate_crds::ApprovalRequest;
use tollgate_crds::approval::Verdict;
use tollgate_engine::approval::Author;

use crate::desk::DeskError;
use crate::keys::{KeyHolder, Role};
use crate::{Auth, Gateway, Policies, Refusal, RefusalCode, api, audit_unavailable};

/// The route, as refusals name it.
const ROUTE: &str = "/v1/approvals";
/// The most bytes of a decision's body.
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DecisionBody {
    verdict: Verdict,
    #[serde(default)]
    comment: Option<String>,
}

/// `GET /v1/approvals`.
pub(crate) async fn list(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let holder = match approver(&gateway, &headers).await {
        Ok(holder) => holder,
        Err(refusal) => return refusal.into_response(),
    };
    let items: Vec<ApprovalRequest> = gateway
        .desk
        .list((gateway.now)())
        .into_iter()
        .filter(|r| listed(r, &holder))
        .collect();
    axum::Json(json!({"items": items})).into_response()
}

/// `GET /v1/approvals/{namespace}/{name}`.
pub(crate) async fn show(
    State(gateway): State<Arc<Gateway>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = approver(&gateway, &headers).await {
        return refusal.into_response();
    }
    let full_name = format!("{namespace}/{name}");
    match gateway.desk.get(&full_name, (gateway.now)()) {
        Some(request) => axum::Json(request).into_response(),
        None => unknown(&full_name).into_response(),
    }
}

/// `POST /v1/approvals/{namespace}/{name}`.
pub(crate) async fn decide(
    State(gateway): State<Arc<Gateway>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let holder = match approver(&gateway, &headers).await {
        Ok(holder) => holder,
        Err(refusal) => return refusal.into_response(),
    };
    let full_name = format!("{namespace}/{name}");
    let now = (gateway.now)();
    let seen = gateway.desk.get(&full_name, now);
    let agent = seen
        .as_ref()
        .map(|r| format!("{namespace}/{}", r.spec.identity_ref.name));
    let refuse = async |refusal: Refusal| {
        record_refusal(&gateway, &holder, agent.as_deref(), &full_name, refusal).await
    };
    let Some(seen) = seen else {
        return refuse(unknown(&full_name)).await.into_response();
    };
    let decision = match read_body(body).await {
        Ok(decision) => decision,
        Err(refusal) => return refuse(refusal).await.into_response(),
    };
    let agent = agent.clone().unwrap_or_default();
    let entry = gateway.policies.agent(&agent);
    let killed = entry.as_ref().is_none_or(|a| a.killed);
    let killed = killed || gateway.escalation.holds(&agent, killed);
    let author = Author {
        username: &holder.name,
        groups: &holder.groups,
    };
    let _deciding = gateway.desk.deciding().await;
    let proposed = gateway.desk.propose(
        &full_name,
        &author,
        decision.verdict,
        decision.comment.clone(),
        // Agents authenticate as `apikey:NAME`, a name no approver's key may have.
        &format!("apikey:{agent}"),
        killed,
        (gateway.now)(),
    );
    let proposed = match proposed {
        Ok(proposed) => proposed,
        Err(e) => return refuse(refused(e)).await.into_response(),
    };
    let phase = proposed
        .status
        .as_ref()
        .map(|s| s.phase)
        .unwrap_or_default();
    let mut record = Entry::new((gateway.now)(), Event::Approval, identity(&holder));
    record.agent = Some(agent.clone());
    record.run = Some(seen.spec.run_id.clone());
    record.step = u64::try_from(seen.spec.step).ok();
    record.tool = Some(seen.spec.tool.clone());
    let mut given = json!({"verdict": decision.verdict});
    if let Some(comment) = &decision.comment {
        given["comment"] = json!(comment);
    }
    record.arguments = Some(given);
    record.approval = Some(ApprovalRef {
        name: full_name.clone(),
        phase: ApprovalPhase::Decided,
        approvers: vec![holder.name.clone()],
    });
    if let Err(e) = gateway.audit.append(record).await {
        return audit_unavailable(e).into_response();
    }
    if let Err(e) = gateway.desk.commit(proposed.clone()) {
        return refuse(refused(e)).await.into_response();
    }
    tracing::info!(request = %full_name, approver = %holder.name, verdict = ?decision.verdict,
        phase = ?phase, "approval decided");
    axum::Json(proposed).into_response()
}

/// The approver a request's key names; refused (and recorded) otherwise.
async fn approver(gateway: &Gateway, headers: &HeaderMap) -> Result<KeyHolder, Refusal> {
    let found = match (&gateway.auth, &gateway.policies) {
        (Auth::Keys(keys), Policies::Dir(_)) => {
            api::bearer(headers, false).and_then(|token| match keys.holder(token) {
                Some(holder) if holder.role == Role::Approver => Ok(holder.clone()),
                Some(holder) => Err(Refusal::new(
                    StatusCode::FORBIDDEN,
                    RefusalCode::NotAnApprover,
                    format!(
                        "key {:?} is an agent's; only a key with role: approver decides approvals",
                        holder.name
                    ),
                )
                .by(format!("apikey:{}", holder.name))),
                None => Err(Refusal::new(
                    StatusCode::UNAUTHORIZED,
                    RefusalCode::Unauthenticated,
                    "the key is not known",
                )),
            })
        }
        _ => Err(Refusal::new(
            StatusCode::NOT_FOUND,
            RefusalCode::NotServed,
            "in a cluster, approvers decide by writing to the ApprovalRequest \
             (kubectl tollgate approve|deny NAME)",
        )),
    };
    match found {
        Ok(holder) => Ok(holder),
        Err(refusal) if gateway.summarized(ROUTE, &refusal) => Err(refusal),
        Err(refusal) => Err(gateway.refuse_recorded(None, None, ROUTE, refusal).await),
    }
}

/// Whether `holder` is among the approvers `request` lists.
fn listed(request: &ApprovalRequest, holder: &KeyHolder) -> bool {
    let approvers = &request.spec.approvers;
    approvers.users.contains(&holder.name)
        || holder.groups.iter().any(|g| approvers.groups.contains(g))
}

fn identity(holder: &KeyHolder) -> Identity {
    Identity {
        username: holder.name.clone(),
        pod: None,
        token_id: Some(holder.key_id.clone()),
    }
}

fn unknown(full_name: &str) -> Refusal {
    Refusal::new(
        StatusCode::NOT_FOUND,
        RefusalCode::UnknownApproval,
        format!(
            "there is no ApprovalRequest {full_name} (never asked for, or forgotten an hour after \
             it ended or when the gateway restarted)"
        ),
    )
}

fn refused(e: DeskError) -> Refusal {
    match e {
        DeskError::NotFound(name) => unknown(&name),
        DeskError::Refused(why) => Refusal::new(
            StatusCode::CONFLICT,
            RefusalCode::DecisionRefused,
            format!("the decision is refused: {why}"),
        ),
        DeskError::Full(_) => Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            RefusalCode::NoApprovals,
            e.to_string(),
        ),
    }
}

/// Reads a decision strictly: one JSON object, known fields, a comment of at most 1024
/// characters.
async fn read_body(body: Body) -> Result<DecisionBody, Refusal> {
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            RefusalCode::PayloadTooLarge,
            format!("the request body exceeds {MAX_BODY} bytes"),
        )
    })?;
    let malformed = |e: String| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            RefusalCode::MalformedRequest,
            format!(
                "the request body is not a decision ({{\"verdict\": \"Approve\" | \"Deny\", \
                 \"comment\"?: string}}): {e}"
            ),
        )
    };
    let value =
        tollgate_engine::canonical::parse_strict(&bytes).map_err(|e| malformed(e.to_string()))?;
    if !value.is_object() {
        return Err(malformed("it must be a JSON object".to_owned()));
    }
    let decision: DecisionBody =
        serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?;
    if decision
        .comment
        .as_ref()
        .is_some_and(|c| c.chars().count() > 1024)
    {
        return Err(malformed(
            "comment is longer than 1024 characters".to_owned(),
        ));
    }
    Ok(decision)
}

/// Records a refused decision, with who tried and on what, and returns the refusal (or, when the
/// trail cannot take the record, the refusal saying so).
async fn record_refusal(
    gateway: &Gateway,
    holder: &KeyHolder,
    agent: Option<&str>,
    full_name: &str,
    refusal: Refusal,
) -> Refusal {
    let mut entry = Entry::new((gateway.now)(), Event::Rejected, identity(holder));
    entry.agent = agent.map(str::to_owned);
    entry.error = Some(format!(
        "{ROUTE}/{full_name}: {}: {}",
        refusal.code, refusal.message
    ));
    gateway
        .metrics
        .refusals
        .with_label_values(&["api", refusal.code.as_str()])
        .inc();
    match gateway.audit.append(entry).await {
        Ok(_) => refusal,
        Err(e) => {
            crate::audit_unavailable_refusing(e, &format!("{}: {}", refusal.code, refusal.message))
        }
    }
}
