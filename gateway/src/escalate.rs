//! What a budget breach sets off besides the halted run (which the engine keeps halted): a
//! message to each notification target the policy's `onBudgetExceeded.notify` names
//! (Slack-compatible incoming webhooks: `POST {"text": ...}`), a Kubernetes Event on the
//! AgentIdentity (in a cluster), and the agent's kill switch when `engageKillSwitch` says so.
//!
//! Targets are URLs by name: in a cluster the keys of the Secret `tollgate-notify` in Tollgate's
//! namespace, in standalone mode a YAML map given with `--notify`. The URLs are secrets (they
//! carry the webhook's token) and never appear in logs or the audit trail.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;
use tollgate_runtime::cluster::{bounded, bounded_by};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use serde_json::json;
use tollgate_crds::AgentIdentity;

/// The Secret holding notification targets in a cluster: key = target name, value = URL.
pub const NOTIFY_SECRET: &str = "tollgate-notify";

/// One breach, as the gateway saw it.
#[derive(Debug, Clone)]
pub struct Breach {
    /// The agent's namespace.
    pub namespace: String,
    /// The AgentIdentity's name.
    pub name: String,
    /// The halted run.
    pub run: String,
    /// The ceiling clause breached, such as `spec.execution.budgets.perRun.maxTokens`.
    pub clause: String,
    /// The policy and its hash.
    pub policy: String,
    /// Notification targets named by the policy.
    pub notify: Vec<String>,
    /// Whether the policy asks for the agent's kill switch.
    pub engage_kill_switch: bool,
}

impl Breach {
    fn agent(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The text every target receives.
    pub fn message(&self) -> String {
        format!(
            "Tollgate halted run {} of agent {}: {} was breached (policy {}). The run stays halted; nothing retries.{}",
            self.run,
            self.agent(),
            self.clause,
            self.policy,
            if self.engage_kill_switch {
                " The agent's kill switch is engaged."
            } else {
                ""
            }
        )
    }
}

enum Targets {
    Static(HashMap<String, String>),
    Secret(Box<Api<Secret>>),
}

/// Escalates breaches; shared by every request of a gateway.
pub struct Escalation {
    targets: Targets,
    cluster: Option<kube::Client>,
    http: reqwest::Client,
    tripped: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Escalation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Escalation")
            .field("cluster", &self.cluster.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for Escalation {
    fn default() -> Self {
        Escalation::standalone(HashMap::new())
    }
}

impl Escalation {
    /// Standalone: targets from a map of name to URL; the kill switch is held by this gateway.
    pub fn standalone(targets: HashMap<String, String>) -> Self {
        Escalation {
            targets: Targets::Static(targets),
            cluster: None,
            http: http_client(),
            tripped: Mutex::default(),
        }
    }

    /// In a cluster: targets from the Secret [`NOTIFY_SECRET`] in `namespace`, Events on the
    /// AgentIdentity, and the kill switch engaged on it (as the gateway's ServiceAccount).
    pub fn cluster(client: kube::Client, namespace: &str) -> Self {
        Escalation {
            targets: Targets::Secret(Box::new(Api::namespaced(client.clone(), namespace))),
            cluster: Some(client),
            http: http_client(),
            tripped: Mutex::default(),
        }
    }

    /// Reads a standalone target file: a YAML map of target name to URL.
    pub fn load_targets(path: &std::path::Path) -> anyhow::Result<HashMap<String, String>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let targets: HashMap<String, String> = serde_yaml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: expected a map of target name to webhook URL: {e}",
                path.display()
            )
        })?;
        for (name, url) in &targets {
            let parsed = reqwest::Url::parse(url)
                .map_err(|e| anyhow::anyhow!("{}: target {name}: {e}", path.display()))?;
            if !matches!(parsed.scheme(), "https" | "http") {
                anyhow::bail!("{}: target {name} is not an http(s) URL", path.display());
            }
        }
        Ok(targets)
    }

    /// Whether this gateway engaged `agent`'s kill switch and has not yet seen the switch in
    /// force where it is kept (the cluster, or the policy directory). `observed` is whether it is
    /// engaged there now: once it is, the switch is the source's business again, so releasing it
    /// there releases the agent.
    pub fn holds(&self, agent: &str, observed: bool) -> bool {
        let mut tripped = self.tripped.lock().unwrap_or_else(|e| e.into_inner());
        if observed {
            tripped.remove(agent);
            return false;
        }
        tripped.contains(agent)
    }

    /// Escalates `breach`: the kill switch first (so the next call is refused), then the Event and
    /// the notifications, which do not hold up the answer. Returns whether the kill switch is
    /// engaged by this breach.
    pub async fn escalate(self: &std::sync::Arc<Self>, breach: Breach) -> bool {
        let agent = breach.agent();
        if breach.engage_kill_switch {
            self.tripped
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(agent.clone());
            if let Some(client) = &self.cluster {
                let api: Api<AgentIdentity> = Api::namespaced(client.clone(), &breach.namespace);
                let patch = json!({"spec": {"killSwitch": {"engaged": true,
                    "reason": format!("budget breach: {} in run {}", breach.clause, breach.run)}}});
                let engaged = bounded_by(
                    Duration::from_secs(5),
                    api.patch(&breach.name, &PatchParams::default(), &Patch::Merge(&patch)),
                )
                .await;
                match engaged {
                    Ok(_) => {
                        tracing::warn!(%agent, "kill switch engaged after a budget breach")
                    }
                    Err(e) => {
                        tracing::error!(%agent, error = %e, "kill switch NOT engaged in the cluster; this gateway holds the agent stopped")
                    }
                }
            }
        }
        let engaged = breach.engage_kill_switch;
        let this = self.clone();
        tokio::spawn(async move {
            this.announce(&breach).await;
            this.notify(&breach).await;
        });
        engaged
    }

    async fn announce(&self, breach: &Breach) {
        let Some(client) = &self.cluster else {
            return;
        };
        let api: Api<AgentIdentity> = Api::namespaced(client.clone(), &breach.namespace);
        let reference = match bounded(api.get(&breach.name)).await {
            Ok(identity) => kube::Resource::object_ref(&identity, &()),
            Err(e) => {
                tracing::warn!(agent = %breach.agent(), error = %e, "no Event: the AgentIdentity cannot be read");
                return;
            }
        };
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "tollgate-gateway".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "BudgetExceeded".into(),
            note: Some(breach.message()),
            action: "HaltRun".into(),
            secondary: None,
        };
        if let Err(e) = bounded(recorder.publish(&event, &reference)).await {
            tracing::warn!(agent = %breach.agent(), error = %e, "the breach Event was not recorded");
        }
    }

    async fn targets(&self) -> HashMap<String, String> {
        match &self.targets {
            Targets::Static(targets) => targets.clone(),
            Targets::Secret(api) => match bounded(api.get_opt(NOTIFY_SECRET)).await {
                Ok(Some(secret)) => secret
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(k, v)| {
                        String::from_utf8(v.0)
                            .ok()
                            .map(|v| (k, v.trim().to_owned()))
                    })
                    .collect(),
                Ok(None) => HashMap::new(),
                Err(e) => {
                    tracing::warn!(error = %e, "notification targets cannot be read");
                    HashMap::new()
                }
            },
        }
    }

    async fn notify(&self, breach: &Breach) {
        if breach.notify.is_empty() {
            return;
        }
        let targets = self.targets().await;
        let text = breach.message();
        for name in &breach.notify {
            let Some(url) = targets.get(name) else {
                tracing::warn!(target_name = %name, agent = %breach.agent(), "notification target is not configured");
                continue;
            };
            let sent = self
                .http
                .post(url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(json!({"text": text}).to_string())
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            match sent {
                Ok(answer) if answer.status().is_success() => {
                    tracing::info!(target_name = %name, agent = %breach.agent(), "breach notified");
                }
                Ok(answer) => {
                    tracing::warn!(target_name = %name, status = %answer.status(), "notification refused")
                }
                // The error may contain the URL; only its kind is logged.
                Err(e) => tracing::warn!(
                    target_name = %name,
                    timeout = e.is_timeout(),
                    connect = e.is_connect(),
                    "notification failed"
                ),
            }
        }
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("an HTTP client with default settings builds")
}
