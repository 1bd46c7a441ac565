//! What the webhook knows of the cluster: agent identities, their policies, and the global kill
//! switch. In a cluster it is kept by watches (never polling); tests give a fixed view.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tollgate_crds::common::{GLOBAL_KILL_SWITCH, GLOBAL_KILL_SWITCH_KEY};
use tollgate_crds::{AgentIdentity, AgentPolicy};

/// A read-only view of the Tollgate objects in the cluster.
pub trait ClusterView: Send + Sync {
    /// Every AgentIdentity.
    fn identities(&self) -> Vec<Arc<AgentIdentity>>;
    /// Every AgentPolicy.
    fn policies(&self) -> Vec<Arc<AgentPolicy>>;
    /// Whether the global kill switch is engaged.
    fn global_kill(&self) -> bool;

    /// The namespace of the global kill switch's ConfigMap, for a view of a real cluster: the
    /// gateway reads it there once more, bypassing the view, before it releases an approved call.
    fn tollgate_namespace(&self) -> Option<&str> {
        None
    }

    /// Whether `identity` is stopped: its own kill switch or the global one is engaged.
    fn is_killed(&self, identity: &AgentIdentity) -> bool {
        identity.spec.kill_switch.engaged || self.global_kill()
    }

    /// The identity whose ServiceAccount authenticates as `username`.
    fn identity_by_username(&self, username: &str) -> Option<Arc<AgentIdentity>> {
        let (namespace, service_account) = service_account_of(username)?;
        self.identities().into_iter().find(|i| {
            i.metadata.namespace.as_deref() == Some(namespace)
                && i.service_account_name() == service_account
        })
    }

    /// The identity `name` in `namespace`.
    fn identity(&self, namespace: &str, name: &str) -> Option<Arc<AgentIdentity>> {
        self.identities().into_iter().find(|i| {
            i.metadata.namespace.as_deref() == Some(namespace)
                && i.metadata.name.as_deref() == Some(name)
        })
    }

    /// The policies governing identity `name` in `namespace`, sorted by name.
    fn policies_for(&self, namespace: &str, name: &str) -> Vec<Arc<AgentPolicy>> {
        let mut policies: Vec<_> = self
            .policies()
            .into_iter()
            .filter(|p| {
                p.metadata.namespace.as_deref() == Some(namespace)
                    && p.spec.identity_ref.name == name
            })
            .collect();
        policies.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        policies
    }
}

/// Whether `cm` is the global kill switch, engaged.
pub fn global_switch_engaged(cm: &ConfigMap) -> bool {
    cm.metadata.name.as_deref() == Some(GLOBAL_KILL_SWITCH)
        && cm
            .data
            .as_ref()
            .and_then(|d| d.get(GLOBAL_KILL_SWITCH_KEY))
            .is_some_and(|v| v == "true")
}

/// `(namespace, name)` of a ServiceAccount username, `system:serviceaccount:NS:NAME`.
pub fn service_account_of(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (namespace, name) = rest.split_once(':')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains(':')).then_some((namespace, name))
}

/// A fixed view, for tests and standalone use.
#[derive(Debug, Clone, Default)]
pub struct StaticView {
    /// The identities.
    pub identities: Vec<Arc<AgentIdentity>>,
    /// The policies.
    pub policies: Vec<Arc<AgentPolicy>>,
    /// The global kill switch.
    pub global_kill: bool,
}

impl ClusterView for StaticView {
    fn identities(&self) -> Vec<Arc<AgentIdentity>> {
        self.identities.clone()
    }
    fn policies(&self) -> Vec<Arc<AgentPolicy>> {
        self.policies.clone()
    }
    fn global_kill(&self) -> bool {
        self.global_kill
    }
}

/// Waits until `store` has listed once, however many tasks wait on it.
///
/// `Store::wait_until_ready` alone is not enough: its future keeps a single waker, so of several
/// tasks waiting on the same store before its first list completes, only one is woken (kube-runtime
/// 5.0). The gateway's readiness probe and its standing writer both waited; on a real node the
/// probe then stayed 503 for good in about half of the starts. Re-polling on a short tick
/// registers each waiter again.
pub async fn synced<K>(store: &Store<K>)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    while tokio::time::timeout(
        std::time::Duration::from_millis(100),
        store.wait_until_ready(),
    )
    .await
    .is_err()
    {}
}

/// A view kept current by watches on the apiserver.
#[derive(Clone)]
pub struct WatchedView {
    identities: Store<AgentIdentity>,
    policies: Store<AgentPolicy>,
    switches: Store<ConfigMap>,
    tollgate_namespace: Arc<str>,
}

impl std::fmt::Debug for WatchedView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchedView").finish_non_exhaustive()
    }
}

impl WatchedView {
    /// Starts the watches; `tollgate_namespace` holds the global kill switch.
    pub fn start(client: Client, tollgate_namespace: &str) -> Self {
        fn spawn<K>(api: Api<K>, config: watcher::Config) -> Store<K>
        where
            K: kube::Resource<DynamicType = ()>
                + Clone
                + std::fmt::Debug
                + serde::de::DeserializeOwned
                + Send
                + Sync
                + 'static,
        {
            use futures::StreamExt;
            let (reader, writer) = reflector::store();
            let stream = reflector::reflector(writer, watcher(api, config))
                .default_backoff()
                .touched_objects();
            tokio::spawn(stream.for_each(|event| async move {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "watch error; retrying with backoff");
                }
            }));
            reader
        }
        let switch =
            watcher::Config::default().fields(&format!("metadata.name={GLOBAL_KILL_SWITCH}"));
        WatchedView {
            identities: spawn(Api::all(client.clone()), watcher::Config::default()),
            policies: spawn(Api::all(client.clone()), watcher::Config::default()),
            switches: spawn(Api::namespaced(client, tollgate_namespace), switch),
            tollgate_namespace: tollgate_namespace.into(),
        }
    }

    /// Waits until every watch has listed once. Any number of tasks may wait at once.
    pub async fn ready(&self) {
        synced(&self.identities).await;
        synced(&self.policies).await;
        synced(&self.switches).await;
    }
}

impl ClusterView for WatchedView {
    fn identities(&self) -> Vec<Arc<AgentIdentity>> {
        self.identities.state()
    }
    fn tollgate_namespace(&self) -> Option<&str> {
        Some(&self.tollgate_namespace)
    }
    fn policies(&self) -> Vec<Arc<AgentPolicy>> {
        self.policies.state()
    }
    fn global_kill(&self) -> bool {
        self.switches
            .state()
            .iter()
            .any(|cm| global_switch_engaged(cm))
    }
}

/// How long one Kubernetes API call on a request's path (a TokenReview, a Secret or kill-switch
/// read, an approval's read or write) may take before it is given up: kube's client waits for
/// ever for an answer by default, so an apiserver that hangs would hold the call, and the agent,
/// as long as it hangs.
pub const CALL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// `call` within [`CALL_DEADLINE`]; past it, an error naming the deadline.
pub async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    bounded_by(CALL_DEADLINE, call).await
}

/// `call` within `deadline`; past it, an error naming the deadline.
pub async fn bounded_by<T>(
    deadline: std::time::Duration,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    match tokio::time::timeout(deadline, call).await {
        Ok(answer) => answer,
        Err(_) => Err(timed_out(deadline)),
    }
}

/// The error of a call the apiserver did not answer within `deadline`.
pub fn timed_out(deadline: std::time::Duration) -> kube::Error {
    kube::Error::Service(Box::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "the Kubernetes API did not answer within {} ms",
            deadline.as_millis()
        ),
    )))
}

#[cfg(test)]
mod deadline_tests {
    use super::*;

    #[tokio::test]
    async fn a_call_past_its_deadline_is_an_error_naming_it() {
        let never = std::future::pending::<Result<(), kube::Error>>();
        let deadline = std::time::Duration::from_millis(20);
        let err = bounded_by(deadline, never).await.unwrap_err();
        assert!(
            err.to_string().contains("did not answer within 20 ms"),
            "{err}"
        );
        let answered = bounded(async { Ok::<_, kube::Error>(7) }).await.unwrap();
        assert_eq!(answered, 7);
    }
}
