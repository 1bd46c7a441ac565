//! What the webhook knows of the cluster: agent identities, their policies, and the global kill
//! switch. In a cluster it is kept by watches (never polling); tests give a fixed view.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tollgate_crds::common::{GLOBAL_KILL_SWITCH, GLOBAL_KILL_SWITCH_KEY};
use tollgate_crds::{AgentIdentity, AgentPolicy};
use tollgate_engine::CompiledPolicy;

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

    /// `policy` compiled, or why it does not compile. Views of a real cluster compile each
    /// version of a policy (uid and resourceVersion) once, for every caller; this default
    /// compiles every time.
    fn compiled(&self, policy: &AgentPolicy) -> Result<Arc<CompiledPolicy>, Arc<str>> {
        compile(policy)
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

/// `policy` compiled, or the message saying why not.
fn compile(policy: &AgentPolicy) -> Result<Arc<CompiledPolicy>, Arc<str>> {
    CompiledPolicy::compile(policy).map(Arc::new).map_err(|e| {
        format!(
            "AgentPolicy {}/{} does not compile: {e}",
            policy.metadata.namespace.as_deref().unwrap_or_default(),
            policy.metadata.name.as_deref().unwrap_or_default()
        )
        .into()
    })
}

/// Compiled policies by (uid, resourceVersion): each version of a policy compiled once.
#[derive(Clone, Default)]
pub struct CompiledCache {
    entries: Arc<std::sync::Mutex<CompiledEntries>>,
}

type CompiledEntries =
    std::collections::HashMap<(String, String), Result<Arc<CompiledPolicy>, Arc<str>>>;

/// The most versions kept; past it the cache starts over (the next lookups compile again).
const MAX_COMPILED: usize = 10_000;

impl std::fmt::Debug for CompiledCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledCache")
            .field("versions", &self.len())
            .finish()
    }
}

impl CompiledCache {
    /// `policy` compiled, from the cache when this version was compiled before.
    pub fn get(&self, policy: &AgentPolicy) -> Result<Arc<CompiledPolicy>, Arc<str>> {
        let key = (
            policy.metadata.uid.clone().unwrap_or_default(),
            policy.metadata.resource_version.clone().unwrap_or_default(),
        );
        if key.1.is_empty() {
            return compile(policy); // not from the apiserver: nothing names its version
        }
        if let Some(found) = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return found.clone();
        }
        let compiled = compile(policy);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_COMPILED {
            entries.clear();
        }
        entries.insert(key, compiled.clone());
        compiled
    }

    /// How many versions are held.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

/// A view kept current by watches on the apiserver, indexed for lookups by name and by
/// ServiceAccount.
///
/// Objects are read through [`DeserializeGuard`]: an AgentIdentity or AgentPolicy the apiserver
/// holds but Tollgate cannot read (stored under an older schema, or a value its types refuse)
/// is left out of the view, logged with its error, instead of failing the whole list, which
/// would keep every watch of its kind, and so readiness, from ever completing. An agent whose
/// identity or policy is left out is unknown or has no policy: refused, never allowed.
///
/// Lookups read an index rebuilt when any watch has seen a change since it was built (an event
/// counter), not a scan of every object per request.
#[derive(Clone)]
pub struct WatchedView {
    identities: Store<DeserializeGuard<AgentIdentity>>,
    policies: Store<DeserializeGuard<AgentPolicy>>,
    switches: Store<ConfigMap>,
    tollgate_namespace: Arc<str>,
    /// Events the identity and policy watches have seen.
    events: Arc<std::sync::atomic::AtomicU64>,
    index: Arc<std::sync::RwLock<Arc<Index>>>,
    /// Each version of each policy compiled once, for admission, the gateway and the standing
    /// writer alike.
    compiled: CompiledCache,
}

/// What the view's lookups read, as of `events` events.
#[derive(Default)]
struct Index {
    events: u64,
    identities: Vec<Arc<AgentIdentity>>,
    policies: Vec<Arc<AgentPolicy>>,
    by_name: std::collections::HashMap<(String, String), Arc<AgentIdentity>>,
    by_account: std::collections::HashMap<(String, String), Arc<AgentIdentity>>,
    /// Per (namespace, identity name), the policies naming it, sorted by name.
    policies_of: std::collections::HashMap<(String, String), Vec<Arc<AgentPolicy>>>,
}

impl Index {
    fn build(
        events: u64,
        identities: &Store<DeserializeGuard<AgentIdentity>>,
        policies: &Store<DeserializeGuard<AgentPolicy>>,
    ) -> Self {
        let identities = readable(identities.state());
        let policies = readable(policies.state());
        let key = |meta: &kube::api::ObjectMeta| {
            (
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            )
        };
        let by_name = identities
            .iter()
            .map(|i| (key(&i.metadata), i.clone()))
            .collect();
        let by_account = identities
            .iter()
            .map(|i| {
                (
                    (
                        i.metadata.namespace.clone().unwrap_or_default(),
                        i.service_account_name(),
                    ),
                    i.clone(),
                )
            })
            .collect();
        let mut policies_of: std::collections::HashMap<_, Vec<Arc<AgentPolicy>>> =
            std::collections::HashMap::new();
        for policy in &policies {
            policies_of
                .entry((
                    policy.metadata.namespace.clone().unwrap_or_default(),
                    policy.spec.identity_ref.name.clone(),
                ))
                .or_default()
                .push(policy.clone());
        }
        for list in policies_of.values_mut() {
            list.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        }
        Self {
            events,
            identities,
            policies,
            by_name,
            by_account,
            policies_of,
        }
    }
}

/// The objects of `state` Tollgate can read; the others logged, named, with why.
fn readable<K>(state: Vec<Arc<DeserializeGuard<K>>>) -> Vec<Arc<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone,
{
    state
        .iter()
        .filter_map(|guarded| match &guarded.0 {
            Ok(object) => Some(Arc::new(object.clone())),
            Err(invalid) => {
                tracing::warn!(
                    kind = %K::kind(&()),
                    namespace = invalid.metadata.namespace.as_deref().unwrap_or_default(),
                    name = invalid.metadata.name.as_deref().unwrap_or_default(),
                    error = %invalid.error,
                    "object left out of the view: Tollgate cannot read it"
                );
                None
            }
        })
        .collect()
}

impl std::fmt::Debug for WatchedView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchedView").finish_non_exhaustive()
    }
}

impl WatchedView {
    /// Starts the watches; `tollgate_namespace` holds the global kill switch.
    pub fn start(client: Client, tollgate_namespace: &str) -> Self {
        fn spawn<K>(
            api: Api<K>,
            config: watcher::Config,
            events: Option<Arc<std::sync::atomic::AtomicU64>>,
        ) -> Store<K>
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
            let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
            tokio::spawn(stream.for_each(move |event| {
                let events = events.clone();
                async move {
                    match event {
                        Ok(_) => {
                            if let Some(events) = events {
                                events.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "watch error; retrying with backoff"),
                    }
                }
            }));
            reader
        }
        let switch =
            watcher::Config::default().fields(&format!("metadata.name={GLOBAL_KILL_SWITCH}"));
        let events = Arc::new(std::sync::atomic::AtomicU64::new(1));
        WatchedView {
            identities: spawn(
                Api::all(client.clone()),
                watcher::Config::default(),
                Some(events.clone()),
            ),
            policies: spawn(
                Api::all(client.clone()),
                watcher::Config::default(),
                Some(events.clone()),
            ),
            switches: spawn(Api::namespaced(client, tollgate_namespace), switch, None),
            tollgate_namespace: tollgate_namespace.into(),
            events,
            index: Arc::default(),
            compiled: CompiledCache::default(),
        }
    }

    /// Waits until every watch has listed once. Any number of tasks may wait at once.
    pub async fn ready(&self) {
        synced(&self.identities).await;
        synced(&self.policies).await;
        synced(&self.switches).await;
    }

    /// The index as of the latest event, rebuilt first if a watch saw one since.
    fn index(&self) -> Arc<Index> {
        // Read before the stores: an event counted after this is caught by the next lookup.
        let events = self.events.load(std::sync::atomic::Ordering::SeqCst);
        {
            let index = self.index.read().unwrap_or_else(|e| e.into_inner());
            if index.events == events {
                return index.clone();
            }
        }
        let fresh = Arc::new(Index::build(events, &self.identities, &self.policies));
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        if index.events < events {
            *index = fresh.clone();
        }
        fresh
    }
}

impl ClusterView for WatchedView {
    fn identities(&self) -> Vec<Arc<AgentIdentity>> {
        self.index().identities.clone()
    }
    fn tollgate_namespace(&self) -> Option<&str> {
        Some(&self.tollgate_namespace)
    }
    fn policies(&self) -> Vec<Arc<AgentPolicy>> {
        self.index().policies.clone()
    }
    fn global_kill(&self) -> bool {
        self.switches
            .state()
            .iter()
            .any(|cm| global_switch_engaged(cm))
    }
    fn identity(&self, namespace: &str, name: &str) -> Option<Arc<AgentIdentity>> {
        self.index()
            .by_name
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }
    fn identity_by_username(&self, username: &str) -> Option<Arc<AgentIdentity>> {
        let (namespace, account) = service_account_of(username)?;
        self.index()
            .by_account
            .get(&(namespace.to_owned(), account.to_owned()))
            .cloned()
    }
    fn compiled(&self, policy: &AgentPolicy) -> Result<Arc<CompiledPolicy>, Arc<str>> {
        self.compiled.get(policy)
    }
    fn policies_for(&self, namespace: &str, name: &str) -> Vec<Arc<AgentPolicy>> {
        self.index()
            .policies_of
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
            .unwrap_or_default()
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
mod compiled_tests {
    use super::*;

    fn policy(version: &str, tool: &str) -> AgentPolicy {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentPolicy",
            "metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "resourceVersion": version},
            "spec": {"identityRef": {"name": "a"}, "tools": {"allowed": [{"name": tool}]}},
        }))
        .unwrap()
    }

    #[test]
    fn each_version_of_a_policy_is_compiled_once_and_a_new_version_again() {
        let cache = CompiledCache::default();
        let first = cache.get(&policy("1", "lookup")).unwrap();
        let again = cache.get(&policy("1", "lookup")).unwrap();
        assert!(
            Arc::ptr_eq(&first, &again),
            "the same version: the same compiled policy"
        );
        let next = cache.get(&policy("2", "refund")).unwrap();
        assert!(!Arc::ptr_eq(&first, &next));
        assert_eq!(cache.len(), 2);
        // One that does not compile is remembered with its reason, too.
        let broken = cache.get(&policy("3", "bad name!")).unwrap_err();
        assert!(
            broken.contains("AgentPolicy ns/p does not compile"),
            "{broken}"
        );
        assert!(Arc::ptr_eq(
            &broken,
            &cache.get(&policy("3", "bad name!")).unwrap_err()
        ));
    }
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
