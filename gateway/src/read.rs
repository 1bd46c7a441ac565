//! The audit trail's read API in a cluster, for `kubectl tollgate audit --store https://…`:
//! `GET /v1/audit/records?run=ID | agent=NS/NAME | since=RFC3339` answers the sealed records as
//! JSON lines (`chain`, `seq`, `prev`, `hash`, `body`), oldest first, so the reader checks every
//! seal itself.
//!
//! Callers authenticate with a bearer token the apiserver accepts (TokenReview, any audience a
//! person's kubectl token carries), and may read the records of an agent's namespace only when a
//! SubjectAccessReview says they may `get auditrecords.tollgate.dev` there (records with no agent,
//! such as refused unauthenticated requests, need it in every namespace). A request that touches
//! a namespace the caller may not read is refused, naming it; nothing is dropped silently.
//!
//! Nothing is read before it is allowed: a census of the query (records per agent, from the
//! index columns alone) says which namespaces the answer touches and how big it is; only after
//! every one is reviewed, and the size is within [`MAX_RECORDS`], are the records read, a
//! [`PAGE`] at a time after a cursor, and streamed as they are read. An answer holds one page in
//! memory, whatever its size; a store that fails half-way breaks the answer (the chunked body
//! ends without its terminator), so a reader never takes a short answer for a whole one.

use std::collections::BTreeSet;
use std::sync::Arc;
use tollgate_runtime::cluster::bounded;

use axum::Router;
use axum::extract::{Query as QueryParams, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use serde::Deserialize;
use serde_json::json;
use tollgate_audit::store::ToolTally;
use tollgate_audit::{Census, Cursor, Query, Record, Store};

/// The API group and resource a SubjectAccessReview asks about.
pub const RESOURCE: (&str, &str) = ("tollgate.dev", "auditrecords");
/// The most records one answer holds; narrower queries read the rest.
pub const MAX_RECORDS: u64 = 200_000;
/// The most namespaces one answer may span: each costs a SubjectAccessReview.
pub const MAX_NAMESPACES: usize = 64;
/// Records read, and sent, at a time: an answer holds at most one page in memory.
pub const PAGE: u64 = 1_000;

pub(crate) type Answer<'a, T> =
    std::pin::Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// The trail as the read API and the policy status writer read it.
pub trait Records: Send + Sync + 'static {
    /// The records `query` selects, oldest first.
    fn records<'a>(&'a self, query: Query) -> Answer<'a, Vec<Record>>;

    /// How many records `query` selects, per agent, without reading them ([`Store::census`]).
    fn census<'a>(&'a self, query: Query) -> Answer<'a, Vec<Census>>;

    /// The records with an agent and a tool in `[since_us, until_us)`, counted
    /// ([`Store::tallies`]).
    fn tallies<'a>(&'a self, since_us: i64, until_us: i64) -> Answer<'a, Vec<ToolTally>>;
}

impl<S: Store> Records for S {
    fn records<'a>(&'a self, query: Query) -> Answer<'a, Vec<Record>> {
        Box::pin(async move { self.query(&query).await.map_err(|e| e.to_string()) })
    }

    fn census<'a>(&'a self, query: Query) -> Answer<'a, Vec<Census>> {
        Box::pin(async move { Store::census(self, &query).await.map_err(|e| e.to_string()) })
    }

    fn tallies<'a>(&'a self, since_us: i64, until_us: i64) -> Answer<'a, Vec<ToolTally>> {
        Box::pin(async move {
            Store::tallies(self, since_us, until_us)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// The read API's state.
#[derive(Clone)]
pub struct Reader {
    records: Arc<dyn Records>,
    client: kube::Client,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}

impl Reader {
    /// Reads `records`, authenticating and authorising through `client` (the gateway's
    /// ServiceAccount: it may create TokenReviews and SubjectAccessReviews).
    pub fn new(records: Arc<dyn Records>, client: kube::Client) -> Self {
        Reader { records, client }
    }
}

/// The routes.
pub fn router(reader: Reader) -> Router {
    Router::new()
        .route("/v1/audit/records", get(records))
        .with_state(reader)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    run: Option<String>,
    agent: Option<String>,
    since: Option<String>,
}

fn refuse(status: StatusCode, reason: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"error": reason, "message": message.into()})),
    )
        .into_response()
}

async fn authenticate(reader: &Reader, headers: &HeaderMap) -> Result<UserInfo, Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            refuse(
                StatusCode::UNAUTHORIZED,
                "Unauthenticated",
                "send a bearer token the apiserver accepts",
            )
        })?;
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: None,
        },
        ..TokenReview::default()
    };
    let reviewed = bounded(
        Api::<TokenReview>::all(reader.client.clone()).create(&PostParams::default(), &review),
    )
    .await
    .map_err(|e| {
        tracing::warn!(error = %e, "TokenReview failed");
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "ReviewUnavailable",
            "the token could not be reviewed; try again",
        )
    })?;
    let status = reviewed.status.unwrap_or_default();
    match (status.authenticated, status.user) {
        (Some(true), Some(user)) if user.username.is_some() => Ok(user),
        _ => Err(refuse(
            StatusCode::UNAUTHORIZED,
            "Unauthenticated",
            format!(
                "the apiserver does not accept the token{}",
                status.error.map(|e| format!(": {e}")).unwrap_or_default()
            ),
        )),
    }
}

/// Whether `user` may read audit records of `namespace` ("" = every namespace).
async fn may_read(reader: &Reader, user: &UserInfo, namespace: &str) -> Result<bool, Response> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username.clone(),
            groups: user.groups.clone(),
            uid: user.uid.clone(),
            extra: user.extra.clone(),
            resource_attributes: Some(ResourceAttributes {
                group: Some(RESOURCE.0.to_owned()),
                resource: Some(RESOURCE.1.to_owned()),
                verb: Some("get".to_owned()),
                namespace: (!namespace.is_empty()).then(|| namespace.to_owned()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let answer = bounded(
        Api::<SubjectAccessReview>::all(reader.client.clone())
            .create(&PostParams::default(), &review),
    )
    .await
    .map_err(|e| {
        tracing::warn!(error = %e, "SubjectAccessReview failed");
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "ReviewUnavailable",
            "access could not be reviewed; try again",
        )
    })?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

async fn records(
    State(reader): State<Reader>,
    headers: HeaderMap,
    params: Result<QueryParams<Params>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let user = match authenticate(&reader, &headers).await {
        Ok(user) => user,
        Err(response) => return response,
    };
    let username = user.username.clone().unwrap_or_default();
    let QueryParams(params) = match params {
        Ok(params) => params,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "BadQuery",
                format!("{e}; accepted: run, agent, since"),
            );
        }
    };
    let since_us = match params.since.as_deref().map(str::parse::<jiff::Timestamp>) {
        None => None,
        Some(Ok(t)) => Some(t.as_microsecond()),
        Some(Err(e)) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "BadQuery",
                format!("since: {e}; give an RFC 3339 time"),
            );
        }
    };
    if let Some(agent) = &params.agent
        && agent
            .split_once('/')
            .is_none_or(|(ns, n)| ns.is_empty() || n.is_empty())
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            "BadQuery",
            format!("agent {agent:?}: expected NAMESPACE/NAME"),
        );
    }
    if params.run.is_none() && params.agent.is_none() && since_us.is_none() {
        return refuse(
            StatusCode::BAD_REQUEST,
            "BadQuery",
            "name a run, an agent or a since time",
        );
    }
    let query = Query {
        run: params.run.clone(),
        agent: params.agent.clone(),
        since_us,
        ..Query::default()
    };
    // Who may read what is settled before any record is read: first how many records the query
    // selects in which namespaces (index columns only), then a review per namespace.
    let census = match reader.records.census(query.clone()).await {
        Ok(census) => census,
        Err(e) => {
            tracing::error!(error = %e, "audit store unreadable");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "AuditUnavailable",
                "the audit store cannot be read",
            );
        }
    };
    // The namespaces the answer touches, each reviewed once; the agent asked about counts even
    // when it has no records, so an empty answer says nothing to someone who may not read it.
    let mut namespaces: BTreeSet<String> = census
        .iter()
        .map(|c| namespace_of(c.agent.as_deref()).to_owned())
        .collect();
    if let Some((ns, _)) = params.agent.as_deref().and_then(|a| a.split_once('/')) {
        namespaces.insert(ns.to_owned());
    }
    if namespaces.len() > MAX_NAMESPACES {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "TooManyNamespaces",
            format!(
                "the records span {} namespaces, more than {MAX_NAMESPACES}; narrow with agent=",
                namespaces.len()
            ),
        );
    }
    let mut refused = Vec::new();
    for namespace in &namespaces {
        match may_read(&reader, &user, namespace).await {
            Ok(true) => {}
            Ok(false) => refused.push(if namespace.is_empty() {
                "records with no agent (all namespaces)".to_owned()
            } else {
                format!("namespace {namespace}")
            }),
            Err(response) => return response,
        }
    }
    if !refused.is_empty() {
        tracing::info!(user = %username, refused = ?refused, "audit read refused");
        return refuse(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "{username} may not read audit records of {} (needs get on {}.{} there); narrow the query with agent=",
                refused.join(", "),
                RESOURCE.1,
                RESOURCE.0
            ),
        );
    }
    let total: u64 = census.iter().map(|c| c.records).sum();
    if total > MAX_RECORDS {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "TooManyRecords",
            format!("more than {MAX_RECORDS} records match; narrow with agent= or a later since="),
        );
    }
    let body =
        axum::body::Body::from_stream(pages(reader.records.clone(), query, namespaces, username));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response()
}

/// The namespace of an agent's records ("" for records with no agent).
fn namespace_of(agent: Option<&str>) -> &str {
    agent
        .and_then(|a| a.split_once('/'))
        .map_or("", |(ns, _)| ns)
}

/// The answer as JSON lines, read and sent [`PAGE`] records at a time, at most [`MAX_RECORDS`].
/// Only records of the namespaces the reader was allowed are sent: one written after the
/// census into another namespace was not part of the answer reviewed. A store that fails
/// mid-answer ends it with an error, so the reader sees a broken answer, never a short one.
fn pages(
    records: Arc<dyn Records>,
    query: Query,
    allowed: BTreeSet<String>,
    username: String,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send {
    struct State {
        records: Arc<dyn Records>,
        query: Query,
        allowed: BTreeSet<String>,
        username: String,
        sent: u64,
        done: bool,
    }
    let state = State {
        records,
        query,
        allowed,
        username,
        sent: 0,
        done: false,
    };
    futures::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        let page = Query {
            limit: Some(PAGE.min(MAX_RECORDS - state.sent)),
            ..state.query.clone()
        };
        let found = match state.records.records(page).await {
            Ok(found) => found,
            Err(e) => {
                tracing::error!(error = %e, "audit store unreadable mid-answer");
                state.done = true;
                let error = std::io::Error::other("the audit store could not be read to the end");
                return Some((Err(error), state));
            }
        };
        state.done = (found.len() as u64) < PAGE || state.sent + found.len() as u64 >= MAX_RECORDS;
        state.query.after = found.last().map(Cursor::after);
        state.sent += found.len() as u64;
        let mut chunk = String::new();
        for record in found.iter().filter(|r| {
            state
                .allowed
                .contains(namespace_of(r.index.agent.as_deref()))
        }) {
            chunk.push_str(
                &json!({"chain": record.chain, "seq": record.seq, "prev": record.prev,
                        "hash": record.hash, "body": record.body})
                .to_string(),
            );
            chunk.push('\n');
        }
        if state.done {
            tracing::info!(user = %state.username, records = state.sent, "audit records read");
        }
        Some((Ok(bytes::Bytes::from(chunk)), state))
    })
}
