//! The gateway in a cluster: callers authenticate with their ServiceAccount token (audience
//! `tollgate`) through TokenReview, and policies come from the watched AgentIdentities,
//! AgentPolicies and global kill switch, never from polling.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tollgate_runtime::cluster::bounded;

use axum::http::StatusCode;
use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use tollgate_crds::AgentIdentity;
use tollgate_crds::common::GLOBAL_KILL_SWITCH;

use super::policies::{AgentEntry, PolicyProblem};
use super::{Caller, Refusal, RefusalCode};
use tollgate_runtime::cluster::{ClusterView, global_switch_engaged};

/// The audience agents' tokens must be issued for.
pub const AUDIENCE: &str = "tollgate";

/// How long a reviewed token is trusted at most, whatever its own expiry.
const MAX_CACHE: Duration = Duration::from_secs(300);
const MAX_ENTRIES: usize = 100_000;

/// Policies from the cluster view, compiled once per object version (by the view, for every
/// part of Tollgate that reads it).
#[derive(Clone)]
pub struct ClusterPolicies {
    view: Arc<dyn ClusterView>,
    client: kube::Client,
}

impl std::fmt::Debug for ClusterPolicies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterPolicies").finish_non_exhaustive()
    }
}

impl ClusterPolicies {
    /// Policies from `view`; `client` reads credential Secrets.
    pub fn new(view: Arc<dyn ClusterView>, client: kube::Client) -> Self {
        Self { view, client }
    }

    /// The agent `namespace/name`: its identity, kill switch (its own or the global one) and
    /// compiled policy.
    pub fn agent(&self, id: &str) -> Option<Arc<AgentEntry>> {
        let (namespace, name) = id.split_once('/')?;
        let identity = self.view.identity(namespace, name)?;
        let policies = self.view.policies_for(namespace, name);
        let mut upstreams = Default::default();
        let policy = match policies.as_slice() {
            [] => Err(PolicyProblem::Missing(format!(
                "no AgentPolicy names AgentIdentity {id}"
            ))),
            [policy] => {
                upstreams = policy
                    .spec
                    .upstreams
                    .iter()
                    .filter_map(|u| Some((u.name.clone(), u.mcp.clone()?)))
                    .collect();
                self.view
                    .compiled(policy)
                    .map_err(|e| PolicyProblem::Invalid(e.to_string()))
            }
            more => Err(PolicyProblem::Invalid(format!(
                "{} AgentPolicies name AgentIdentity {id}; exactly one must",
                more.len()
            ))),
        };
        Some(Arc::new(AgentEntry {
            id: id.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            killed: self.view.is_killed(&identity),
            policy,
            upstreams,
            credentials: identity.spec.credentials.clone(),
        }))
    }

    /// Whether agent `namespace/name` is stopped now, read from the apiserver itself rather than
    /// the watched view: `Some(reason)` when its own or the global kill switch is engaged. A read
    /// without a resourceVersion is served from etcd, so a switch whose patch was acknowledged
    /// before this read is seen even while the watches still carry the older state. Errors name
    /// what could not be read; an identity that no longer exists is one.
    pub(crate) async fn stopped_now(&self, id: &str) -> Result<Option<String>, String> {
        let (namespace, name) = id
            .split_once('/')
            .ok_or_else(|| format!("agent {id:?} is not namespace/name"))?;
        let identity =
            bounded(Api::<AgentIdentity>::namespaced(self.client.clone(), namespace).get_opt(name))
                .await
                .map_err(|e| format!("read AgentIdentity {id}: {e}"))?
                .ok_or_else(|| format!("AgentIdentity {id} no longer exists"))?;
        if identity.spec.kill_switch.engaged {
            return Ok(Some(format!("the kill switch of agent {id} is engaged")));
        }
        if let Some(tollgate) = self.view.tollgate_namespace() {
            let switch = bounded(
                Api::<ConfigMap>::namespaced(self.client.clone(), tollgate)
                    .get_opt(GLOBAL_KILL_SWITCH),
            )
            .await
            .map_err(|e| format!("read ConfigMap {tollgate}/{GLOBAL_KILL_SWITCH}: {e}"))?;
            if switch.as_ref().is_some_and(global_switch_engaged) {
                return Ok(Some("the global kill switch is engaged".to_owned()));
            }
        }
        Ok(None)
    }

    /// The client the gateway acts with.
    pub(crate) fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// A key of a Secret in the agent's namespace.
    pub(crate) async fn secret(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<String, String> {
        let secret = Api::<Secret>::namespaced(self.client.clone(), namespace)
            .get(name)
            .await
            .map_err(|e| format!("credential Secret {namespace}/{name}: {e}"))?;
        let bytes = secret
            .data
            .and_then(|mut d| d.remove(key))
            .ok_or_else(|| format!("credential Secret {namespace}/{name} has no key {key:?}"))?;
        String::from_utf8(bytes.0)
            .map_err(|_| format!("credential Secret {namespace}/{name} key {key:?} is not UTF-8"))
    }
}

/// Reviews ServiceAccount tokens with the apiserver and caches the answer by the token's digest
/// until the token expires (at most five minutes). A refused token (not valid for the audience,
/// or of no agent) is remembered for [`REFUSED_TTL`], so a caller repeating a bad token costs the
/// apiserver one review per interval, not one per request.
pub struct TokenReviewer {
    client: kube::Client,
    cache: Mutex<HashMap<[u8; 32], (Caller, Instant)>>,
    refused: Mutex<HashMap<[u8; 32], (Refusal, Instant)>>,
    refused_ttl: Duration,
}

/// How long a refused token's answer is remembered by default.
pub const REFUSED_TTL: Duration = Duration::from_secs(10);

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer").finish_non_exhaustive()
    }
}

impl From<TokenReviewer> for super::Auth {
    fn from(reviewer: TokenReviewer) -> Self {
        super::Auth::TokenReview(reviewer)
    }
}

fn unauthenticated(message: impl Into<String>) -> Refusal {
    Refusal::new(
        StatusCode::UNAUTHORIZED,
        RefusalCode::Unauthenticated,
        message,
    )
}

/// The `exp` claim of a JWT, read without verifying it (the apiserver has verified the token).
fn expiry(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()?
        .get("exp")?
        .as_u64()
}

impl TokenReviewer {
    /// A reviewer using `client` (which needs `create` on `tokenreviews`).
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            cache: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            refused_ttl: REFUSED_TTL,
        }
    }

    /// Remembers a refused token's answer for `ttl` (default [`REFUSED_TTL`]; zero: never).
    pub fn with_refused_ttl(mut self, ttl: Duration) -> Self {
        self.refused_ttl = ttl;
        self
    }

    /// Reviews `token`; a refusal the apiserver gave (never an outage) is remembered for a while.
    pub(crate) async fn review(
        &self,
        token: &str,
        policies: &ClusterPolicies,
    ) -> Result<Caller, Refusal> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((refusal, until)) = self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&digest)
            && *until > Instant::now()
        {
            return Err(refusal.clone());
        }
        let answer = self.review_uncached(token, digest, policies).await;
        if let Err(refusal) = &answer
            && refusal.code != RefusalCode::AuthenticationUnavailable
            && !self.refused_ttl.is_zero()
        {
            let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
            if refused.len() >= MAX_ENTRIES {
                let now = Instant::now();
                refused.retain(|_, (_, until)| *until > now);
                if refused.len() >= MAX_ENTRIES {
                    refused.clear();
                }
            }
            refused.insert(digest, (refusal.clone(), Instant::now() + self.refused_ttl));
        }
        answer
    }

    /// The caller `token` authenticates, acting as the AgentIdentity whose ServiceAccount it
    /// belongs to.
    async fn review_uncached(
        &self,
        token: &str,
        digest: [u8; 32],
        policies: &ClusterPolicies,
    ) -> Result<Caller, Refusal> {
        if let Some((caller, until)) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&digest)
            && *until > Instant::now()
        {
            return Ok(caller.clone());
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let answer = bounded(
            Api::<TokenReview>::all(self.client.clone()).create(&PostParams::default(), &review),
        )
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "TokenReview failed");
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                RefusalCode::AuthenticationUnavailable,
                "the token cannot be reviewed now; retry later",
            )
        })?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(unauthenticated(format!(
                "the token is not valid for audience {AUDIENCE}{}",
                status.error.map(|e| format!(": {e}")).unwrap_or_default()
            )));
        }
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.iter().any(|a| a == AUDIENCE))
        {
            return Err(unauthenticated(format!(
                "the token was not issued for audience {AUDIENCE}"
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let identity = policies
            .view
            .identity_by_username(&username)
            .ok_or_else(|| {
                Refusal::new(
                    StatusCode::FORBIDDEN,
                    RefusalCode::NotAnAgent,
                    format!("{username} is not the ServiceAccount of any AgentIdentity"),
                )
                .by(&username)
            })?;
        let extra = user.extra.unwrap_or_default();
        let claim = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let caller = Caller {
            agent: format!(
                "{}/{}",
                identity.metadata.namespace.as_deref().unwrap_or_default(),
                identity.metadata.name.as_deref().unwrap_or_default()
            ),
            pod: claim("authentication.kubernetes.io/pod-name"),
            token_id: claim("authentication.kubernetes.io/credential-id")
                .unwrap_or_else(|| hex::encode(&digest[..8])),
            username,
        };
        let now_unix = jiff::Timestamp::now().as_second().max(0) as u64;
        let ttl = expiry(token)
            .map(|exp| Duration::from_secs(exp.saturating_sub(now_unix)))
            .unwrap_or(MAX_CACHE)
            .min(MAX_CACHE);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_ENTRIES {
            let now = Instant::now();
            cache.retain(|_, (_, until)| *until > now);
        }
        cache.insert(digest, (caller.clone(), Instant::now() + ttl));
        Ok(caller)
    }
}
