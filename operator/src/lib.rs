//! tollgate-operator: controllers that reconcile Tollgate's kinds into cluster objects.
//!
//! Contract: only I/O and wiring. Each reconciler fetches what it needs, asks tollgate-engine for
//! the desired objects and the status ([`tollgate_engine::children`],
//! [`tollgate_engine::status`]), applies them with server-side apply under one field manager
//! ([`MANAGER`]) and writes status, Events and metrics.
//!
//! - [`identity`]: AgentIdentity -> ServiceAccount, Role, RoleBinding, NetworkPolicy; kill
//!   switches (the agent's and the cluster-wide one).
//! - [`policy`]: AgentPolicy -> compiled (Ready) and bound to its identity (IdentityBound).
//! - [`approval`]: ApprovalRequest lifecycle: final phase from decisions, expiry, kill switch,
//!   pruning after the retention period.
//! - [`leader`]: one active replica through a Lease.
#![forbid(unsafe_code)]

pub mod approval;
pub mod identity;
pub mod leader;
pub mod metrics;
pub mod policy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tollgate_runtime::cluster::bounded;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use kube::api::{Api, Patch, PatchParams};
use kube::core::{DeserializeGuard, error_boundary::InvalidObject};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tollgate_crds::AgentIdentity;
use tollgate_crds::common::{
    GLOBAL_KILL_SWITCH, GLOBAL_KILL_SWITCH_KEY, GLOBAL_KILL_SWITCH_REASON_KEY,
};
use tollgate_engine::children::GatewayPeer;
use tollgate_engine::status::{KILL_SWITCH_BY_ANNOTATION, Stop};

pub use metrics::Metrics;

/// The field manager of every object and status the operator writes.
pub const MANAGER: &str = "tollgate-operator";
/// The Lease the replicas compete for, in Tollgate's namespace.
pub const LEASE: &str = tollgate_crds::common::OPERATOR_LEASE;
/// Reconciliations of one controller in flight at once: enough to keep the apiserver busy,
/// few enough that a burst of a thousand identities never trips its in-flight limits.
pub const CONCURRENCY: u16 = 32;
/// Default retention of decided ApprovalRequests: the audit retention, 90 days.
pub const DEFAULT_APPROVAL_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);

/// What the operator is told at start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Tollgate's namespace: the Lease and the global kill switch ConfigMap live here.
    pub namespace: String,
    /// Reconcile only this namespace (every namespace when None).
    pub watch_namespace: Option<String>,
    /// Where the gateway runs, so agents' NetworkPolicies let them reach it.
    pub gateway: GatewayPeer,
    /// How long decided ApprovalRequests are kept.
    pub approval_retention: Duration,
    /// This replica's name in the Lease (its pod name).
    pub holder: String,
    /// Lease timing.
    pub lease: leader::Timing,
    /// Address of the plain listener for /healthz, /readyz and /metrics.
    pub probe_listen: SocketAddr,
}

/// Everything a reconciler needs.
pub struct Context {
    /// The client, as the operator's ServiceAccount.
    pub client: Client,
    /// Settings.
    pub settings: Settings,
    /// Metrics.
    pub metrics: Metrics,
    recorder: Recorder,
    switch: Store<ConfigMap>,
    identities: Store<DeserializeGuard<AgentIdentity>>,
    now: fn() -> jiff::Timestamp,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Why a reconciliation failed; it is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request to the apiserver failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// The apiserver's answer.
        #[source]
        source: kube::Error,
    },
    /// The object lacks something the apiserver always sets.
    #[error("{0}")]
    Incomplete(String),
}

impl Error {
    fn kind(&self) -> &'static str {
        match self {
            Error::Kube { source, .. } => match source {
                kube::Error::Api(e) if e.code == 409 => "conflict",
                kube::Error::Api(e) if e.code == 403 => "forbidden",
                kube::Error::Api(_) => "api",
                _ => "transport",
            },
            Error::Incomplete(_) => "incomplete",
        }
    }
}

/// Adds what was being done to a kube error.
pub(crate) trait Doing<T> {
    fn doing(self, action: impl FnOnce() -> String) -> Result<T, Error>;
}

impl<T> Doing<T> for Result<T, kube::Error> {
    fn doing(self, action: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(|source| Error::Kube {
            action: action(),
            source,
        })
    }
}

/// `Api<K>` over the watched namespace, or every namespace.
pub(crate) fn scoped_api<K>(client: &Client, watch_namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match watch_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

impl Context {
    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        scoped_api(&self.client, self.settings.watch_namespace.as_deref())
    }

    /// The cluster-wide kill switch, when engaged.
    pub fn global_stop(&self) -> Option<Stop> {
        self.switch.state().iter().find_map(|cm| {
            let data = cm.data.as_ref()?;
            (cm.metadata.name.as_deref() == Some(GLOBAL_KILL_SWITCH)
                && data
                    .get(GLOBAL_KILL_SWITCH_KEY)
                    .is_some_and(|v| v == "true"))
            .then(|| Stop::Global {
                source: format!("{}/{GLOBAL_KILL_SWITCH}", self.settings.namespace),
                reason: data.get(GLOBAL_KILL_SWITCH_REASON_KEY).cloned(),
                by: cm
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(KILL_SWITCH_BY_ANNOTATION))
                    .cloned(),
            })
        })
    }

    /// The identity `name` in `namespace` from the watch cache, if it exists and parses.
    pub fn identity(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<Arc<DeserializeGuard<AgentIdentity>>> {
        self.identities
            .get(&reflector::ObjectRef::new(name).within(namespace))
    }

    /// Publishes an Event about `object`; a failure is logged, never fatal.
    pub(crate) async fn event(
        &self,
        object: ObjectReference,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &object).await {
            tracing::warn!(error = %e, reason, "event not recorded");
        }
    }

    /// Reports an object that does not parse: an Event on it and a log line; its watch goes on.
    pub(crate) async fn invalid(&self, kind: &str, invalid: &InvalidObject) {
        let meta = &invalid.metadata;
        tracing::warn!(
            kind,
            namespace = meta.namespace.as_deref().unwrap_or_default(),
            name = meta.name.as_deref().unwrap_or_default(),
            error = %invalid.error,
            "object does not parse; skipped"
        );
        let reference = ObjectReference {
            api_version: Some(format!(
                "{}/{}",
                tollgate_crds::GROUP,
                tollgate_crds::VERSION
            )),
            kind: Some(kind.to_owned()),
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            ..ObjectReference::default()
        };
        self.event(
            reference,
            true,
            "InvalidObject",
            format!(
                "Tollgate cannot read this object, so nothing of it is in force: {}",
                invalid.error
            ),
        )
        .await;
    }
}

/// Applies `object` with server-side apply as [`MANAGER`], taking ownership of every field it sets.
pub(crate) async fn apply<K>(api: &Api<K>, object: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
{
    let name = object
        .meta()
        .name
        .clone()
        .ok_or_else(|| Error::Incomplete("a desired object has no name".into()))?;
    bounded(api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    ))
    .await
    .doing(|| format!("applying {} {name}", K::kind(&())))
}

/// Deletes `name` if it exists.
pub(crate) async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<bool, Error>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + std::fmt::Debug,
{
    match bounded(api.delete(name, &Default::default())).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(source) => Err(Error::Kube {
            action: format!("deleting {} {name}", K::kind(&())),
            source,
        }),
    }
}

/// Writes `status` with server-side apply on the status subresource: fields the operator set
/// before and leaves out now are removed.
pub(crate) async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    status: &impl Serialize,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + std::fmt::Debug,
{
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    bounded(api.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(body),
    ))
    .await
    .map(|_| ())
    .doing(|| format!("writing the status of {} {name}", K::kind(&())))
}

/// Runs one reconciliation with its metrics.
pub(crate) async fn instrumented<F>(
    metrics: &Metrics,
    controller: &str,
    reconcile: F,
) -> Result<kube::runtime::controller::Action, Error>
where
    F: Future<Output = Result<kube::runtime::controller::Action, Error>>,
{
    let started = Instant::now();
    let result = reconcile.await;
    metrics
        .duration
        .with_label_values(&[controller])
        .observe(started.elapsed().as_secs_f64());
    metrics
        .reconciliations
        .with_label_values(&[controller])
        .inc();
    if let Err(e) = &result {
        metrics
            .errors
            .with_label_values(&[controller, e.kind()])
            .inc();
        tracing::warn!(controller, error = %e, "reconciliation failed; retrying");
    }
    result
}

/// Readiness: set once this replica leads and its watches have listed.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    standby: Arc<AtomicBool>,
    synced: Arc<AtomicBool>,
}

impl Readiness {
    fn is_ready(&self) -> bool {
        self.synced.load(Ordering::SeqCst) || self.standby.load(Ordering::SeqCst)
    }
}

/// /healthz, /readyz and /metrics. A standby replica is ready (it is healthy and waiting; a
/// rollout must not wait for it to lead), the leader once its watches have synced.
pub fn probes(readiness: Readiness, metrics: Metrics, gauges: Hook) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State((readiness, _, _)): State<Probes>| async move {
                if readiness.is_ready() {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "watches not synced")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State((_, metrics, gauges)): State<Probes>| async move {
                gauges();
                metrics.render()
            }),
        )
        .with_state((readiness, metrics, gauges))
}

/// Refreshes the gauges before a scrape.
pub type Hook = Arc<dyn Fn() + Send + Sync>;

type Probes = (Readiness, Metrics, Hook);

/// A stream that yields once now and then whenever the watch of `switch` changes anything.
fn switch_changes(
    client: Client,
    namespace: &str,
) -> (Store<ConfigMap>, impl Stream<Item = ()> + Send + 'static) {
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default().fields(&format!("metadata.name={GLOBAL_KILL_SWITCH}"));
    let stream = reflector::reflector(
        writer,
        watcher(Api::<ConfigMap>::namespaced(client, namespace), config),
    )
    .default_backoff()
    .filter_map(|event| async move {
        match event {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => {
                Some(())
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "kill switch watch error; retrying with backoff");
                None
            }
        }
    });
    (reader, stream)
}

/// Runs the operator until `shutdown` resolves or leadership is lost: probes at once, then the
/// Lease, then the three controllers. Returns an error when leadership is lost, so the process
/// exits and a standby takes over.
pub async fn run(
    client: Client,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = Metrics::default();
    let readiness = Readiness::default();
    readiness.standby.store(true, Ordering::SeqCst);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let gauges: Arc<std::sync::Mutex<Option<Hook>>> = Arc::default();
    let gauge_hook: Hook = {
        let gauges = gauges.clone();
        Arc::new(move || {
            if let Some(refresh) = gauges.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                refresh();
            }
        })
    };
    let listener = tokio::net::TcpListener::bind(settings.probe_listen).await?;
    let probe_server = {
        let server = axum::serve(
            listener,
            probes(readiness.clone(), metrics.clone(), gauge_hook),
        )
        .with_graceful_shutdown(stopped());
        tokio::spawn(async move { server.await })
    };

    let elector = leader::Elector::new(
        client.clone(),
        &settings.namespace,
        LEASE,
        &settings.holder,
        settings.lease,
    );
    tokio::select! {
        () = elector.acquire() => {}
        () = stopped() => {
            let _ = probe_server.await;
            return Ok(());
        }
    }
    readiness.standby.store(false, Ordering::SeqCst);
    metrics.leader.set(1);

    let (switch, switch_changed) = switch_changes(client.clone(), &settings.namespace);
    let switch_changed = switch_changed.boxed().fuse();
    let (to_identities, identity_trigger) = fan_out();
    let (to_approvals, approval_trigger) = fan_out();
    tokio::spawn(switch_changed.for_each(move |()| {
        let _ = to_identities.send(());
        let _ = to_approvals.send(());
        async {}
    }));

    let identity_controller = identity::controller(&client, &settings);
    let identities = identity_controller.store();
    let context = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.to_owned(),
                instance: Some(settings.holder.clone()),
            },
        ),
        client: client.clone(),
        settings: settings.clone(),
        metrics: metrics.clone(),
        switch: switch.clone(),
        identities: identities.clone(),
        now: jiff::Timestamp::now,
    });
    let policy_controller = policy::controller(&context);
    let approval_controller = approval::controller(&context);
    {
        let policies = policy_controller.store();
        let approvals = approval_controller.store();
        *gauges.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new({
            let (identities, metrics) = (identities.clone(), metrics.clone());
            move || {
                identity::gauge(&identities, &metrics);
                approval::gauge(&approvals, &metrics);
            }
        }));
        let (identities, switch, readiness) =
            (identities.clone(), switch.clone(), readiness.clone());
        tokio::spawn(async move {
            tollgate_runtime::cluster::synced(&identities).await;
            tollgate_runtime::cluster::synced(&policies).await;
            tollgate_runtime::cluster::synced(&switch).await;
            readiness.synced.store(true, Ordering::SeqCst);
            tracing::info!("watches synced; ready");
        });
    }

    let config = || kube::runtime::controller::Config::default().concurrency(CONCURRENCY);
    let run_identity = identity_controller
        .with_config(config())
        .reconcile_all_on(identity_trigger)
        .graceful_shutdown_on(stopped())
        .run(identity::reconcile, identity::error_policy, context.clone())
        .for_each(|_| async {});
    let run_policy = policy_controller
        .with_config(config())
        .graceful_shutdown_on(stopped())
        .run(policy::reconcile, policy::error_policy, context.clone())
        .for_each(|_| async {});
    let run_approval = approval_controller
        .with_config(config())
        .reconcile_all_on(approval_trigger)
        .graceful_shutdown_on(stopped())
        .run(approval::reconcile, approval::error_policy, context.clone())
        .for_each(|_| async {});
    let controllers = async {
        tokio::join!(run_identity, run_policy, run_approval);
    };
    let result = tokio::select! {
        lost = elector.hold() => Err(anyhow::anyhow!("leadership lost: {lost}")),
        () = controllers => Ok(()),
    };
    match &result {
        Ok(()) => {
            elector.release().await;
            let _ = probe_server.await;
        }
        // The process is about to exit; nothing waits for a graceful stop.
        Err(_) => probe_server.abort(),
    }
    result
}

/// A sender and a stream of its signals, for `reconcile_all_on`.
fn fan_out() -> (
    tokio::sync::mpsc::UnboundedSender<()>,
    impl Stream<Item = ()> + Send + 'static,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|()| ((), rx)) },
    );
    (tx, stream)
}

/// The label selector of every object the operator manages.
pub(crate) fn managed_selector() -> String {
    format!(
        "{}={}",
        tollgate_engine::children::MANAGED_BY_LABEL,
        tollgate_engine::children::MANAGED_BY
    )
}

/// Requeue delay until `at`, at least a second and at most a day (watches catch up meanwhile).
pub(crate) fn until(at: jiff::Timestamp, now: jiff::Timestamp) -> Duration {
    let seconds = (at - now).total(jiff::Unit::Second).unwrap_or(0.0);
    Duration::from_secs_f64(seconds.clamp(1.0, 86_400.0))
}
