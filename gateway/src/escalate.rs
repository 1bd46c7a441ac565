//! What a budget breach sets off besides the halted run (which the engine keeps halted): a
//! message to each notification target the policy's `onBudgetExceeded.notify` names, a
//! Kubernetes Event on the AgentIdentity (in a cluster), and the agent's kill switch when
//! `engageKillSwitch` says so. Approval requests are announced through the same targets
//! ([`crate::notify`]).
//!
//! Targets are named: in a cluster the keys of the Secret `tollgate-notify` in Tollgate's
//! namespace, in standalone mode a YAML map given with `--notify`. A target is a URL, which gets
//! Slack-compatible incoming-webhook messages (`POST {"text": ...}`), or a mapping
//! `{url, format: webhook, secret}`, which gets the event as JSON signed with HMAC-SHA256 (the
//! `Tollgate-Signature` header: `t=<unix seconds>,v1=<hex of HMAC(secret, "<t>.<body>")>`). In
//! the Secret, a value is the URL or that mapping as JSON or YAML. URLs and secrets are secrets
//! (a webhook's URL carries its token) and never appear in logs or the audit trail.

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

/// One notification target.
#[derive(Clone)]
pub struct Target {
    url: reqwest::Url,
    format: Format,
    secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL and the secret are secrets.
        f.debug_struct("Target")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// What a target receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `{"text": ...}`, as Slack's (and Mattermost's, Rocket.Chat's) incoming webhooks take it.
    Slack,
    /// The event as JSON, signed with HMAC-SHA256.
    Webhook,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetSpec {
    url: String,
    #[serde(default = "slack")]
    format: Format,
    #[serde(default)]
    secret: Option<String>,
}

fn slack() -> Format {
    Format::Slack
}

impl Target {
    /// A target from its written form: a URL (Slack-compatible) or a mapping `{url, format,
    /// secret}`. The error names what is wrong without repeating the URL or the secret.
    pub fn parse(value: &serde_yaml::Value) -> Result<Self, String> {
        let spec = match value {
            serde_yaml::Value::String(text) if !text.trim_start().starts_with('{') => TargetSpec {
                url: text.trim().to_owned(),
                format: Format::Slack,
                secret: None,
            },
            serde_yaml::Value::String(text) => serde_yaml::from_str(text)
                .map_err(|e| format!("expected a URL or {{url, format, secret}}: {e}"))?,
            other => serde_yaml::from_value(other.clone())
                .map_err(|e| format!("expected a URL or {{url, format, secret}}: {e}"))?,
        };
        let url = reqwest::Url::parse(&spec.url).map_err(|e| format!("url: {e}"))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err("url: not an http(s) URL".to_owned());
        }
        let secret = match (spec.format, spec.secret) {
            (Format::Webhook, Some(secret)) if secret.len() >= 16 => Some(secret.into_bytes()),
            (Format::Webhook, _) => {
                return Err(
                    "format webhook needs a secret of at least 16 characters to sign with"
                        .to_owned(),
                );
            }
            (Format::Slack, Some(_)) => {
                return Err("secret: only format webhook is signed".to_owned());
            }
            (Format::Slack, None) => None,
        };
        Ok(Target {
            url,
            format: spec.format,
            secret,
        })
    }

    /// Parses a Secret's value (a URL, or the mapping as JSON or YAML).
    fn from_text(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.starts_with('{') || text.contains('\n') {
            let value: serde_yaml::Value = serde_yaml::from_str(text)
                .map_err(|e| format!("expected a URL or {{url, format, secret}}: {e}"))?;
            Self::parse(&value)
        } else {
            Self::parse(&serde_yaml::Value::String(text.to_owned()))
        }
    }
}

impl From<String> for Target {
    /// A Slack-compatible target; panics on a URL that does not parse (for tests and code that
    /// built the URL itself).
    fn from(url: String) -> Self {
        Target::parse(&serde_yaml::Value::String(url)).expect("a well-formed http(s) URL")
    }
}

/// A message for people: the text every target shows, and the event a signed webhook receives.
#[derive(Debug, Clone)]
pub struct Notice {
    /// The event type, such as `approval.created` or `budget.breach`.
    pub kind: &'static str,
    /// The words.
    pub text: String,
    /// The event for machines; `type` and `text` are added.
    pub event: serde_json::Value,
}

enum Targets {
    Static(HashMap<String, Target>),
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
        Escalation::standalone(HashMap::<String, Target>::new())
    }
}

impl Escalation {
    /// Standalone: targets by name; the kill switch is held by this gateway.
    pub fn standalone<T: Into<Target>>(targets: HashMap<String, T>) -> Self {
        Escalation {
            targets: Targets::Static(targets.into_iter().map(|(k, v)| (k, v.into())).collect()),
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

    /// Reads a standalone target file: a YAML map of target name to a URL or `{url, format,
    /// secret}`.
    pub fn load_targets(path: &std::path::Path) -> anyhow::Result<HashMap<String, Target>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let written: HashMap<String, serde_yaml::Value> =
            serde_yaml::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{}: expected a map of target name to a URL or {{url, format, secret}}: {e}",
                    path.display()
                )
            })?;
        written
            .into_iter()
            .map(|(name, value)| {
                Target::parse(&value)
                    .map(|target| (name.clone(), target))
                    .map_err(|e| anyhow::anyhow!("{}: target {name}: {e}", path.display()))
            })
            .collect()
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

    async fn targets(&self) -> HashMap<String, Target> {
        match &self.targets {
            Targets::Static(targets) => targets.clone(),
            Targets::Secret(api) => match bounded(api.get_opt(NOTIFY_SECRET)).await {
                Ok(Some(secret)) => secret
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(name, value)| {
                        let parsed = String::from_utf8(value.0)
                            .map_err(|_| "not UTF-8".to_owned())
                            .and_then(|text| Target::from_text(&text));
                        match parsed {
                            Ok(target) => Some((name, target)),
                            Err(e) => {
                                tracing::warn!(target_name = %name, error = %e,
                                    "notification target in {NOTIFY_SECRET} is unusable");
                                None
                            }
                        }
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
        let notice = Notice {
            kind: "budget.breach",
            text: breach.message(),
            event: json!({
                "agent": breach.agent(), "run": breach.run, "clause": breach.clause,
                "policy": breach.policy, "killSwitchEngaged": breach.engage_kill_switch,
            }),
        };
        self.deliver(&breach.notify, &notice).await;
    }

    /// Sends `notice` to each target `names` names, each on its own: a target that is not
    /// configured or does not take it is logged (by name, never by URL) and the others still get
    /// it. A failed delivery is tried three times in all (connection errors, timeouts and 5xx),
    /// with the same `Tollgate-Delivery` id, so a receiver can drop repeats. Returns how many
    /// targets took it.
    pub async fn deliver(&self, names: &[String], notice: &Notice) -> usize {
        if names.is_empty() {
            return 0;
        }
        let targets = self.targets().await;
        let delivery = crate::stdio::random_bytes::<16>()
            .map(hex::encode)
            .unwrap_or_default();
        let mut delivered = 0;
        for name in names {
            let Some(target) = targets.get(name) else {
                tracing::warn!(target_name = %name, kind = notice.kind, "notification target is not configured");
                continue;
            };
            if self.send(target, name, notice, &delivery).await {
                delivered += 1;
            }
        }
        delivered
    }

    async fn send(&self, target: &Target, name: &str, notice: &Notice, delivery: &str) -> bool {
        let body = match target.format {
            Format::Slack => json!({"text": notice.text}).to_string(),
            Format::Webhook => {
                let mut event = notice.event.clone();
                if let serde_json::Value::Object(map) = &mut event {
                    map.insert("type".into(), json!(notice.kind));
                    map.insert("text".into(), json!(notice.text));
                }
                event.to_string()
            }
        };
        for attempt in 0..3u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(u64::from(attempt) * 2 - 1)).await;
            }
            let mut request = self
                .http
                .post(target.url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("Tollgate-Event", notice.kind)
                .header("Tollgate-Delivery", delivery)
                .timeout(Duration::from_secs(5));
            if let Some(secret) = &target.secret {
                let at = jiff::Timestamp::now().as_second();
                request = request.header("Tollgate-Signature", signature(secret, at, &body));
            }
            match request.body(body.clone()).send().await {
                Ok(answer) if answer.status().is_success() => {
                    tracing::info!(target_name = %name, kind = notice.kind, "notified");
                    return true;
                }
                Ok(answer) if answer.status().is_server_error() => {
                    tracing::warn!(target_name = %name, status = %answer.status(), attempt, "notification failed; trying again");
                }
                Ok(answer) => {
                    tracing::warn!(target_name = %name, status = %answer.status(), "notification refused");
                    return false;
                }
                // The error may contain the URL; only its kind is logged.
                Err(e) => tracing::warn!(
                    target_name = %name,
                    timeout = e.is_timeout(),
                    connect = e.is_connect(),
                    attempt,
                    "notification failed"
                ),
            }
        }
        false
    }
}

/// `Tollgate-Signature` for `body` sent at `at` (unix seconds): `t=<at>,v1=<hex HMAC-SHA256 of
/// "<at>.<body>" under the target's secret>`. A receiver recomputes it and refuses a mismatch
/// and an old `t` (a replay).
pub fn signature(secret: &[u8], at: i64, body: &str) -> String {
    use hmac::Mac as _;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(format!("{at}.").as_bytes());
    mac.update(body.as_bytes());
    format!("t={at},v1={}", hex::encode(mac.finalize().into_bytes()))
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("an HTTP client with default settings builds")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Target, String> {
        Target::parse(&serde_yaml::from_str(yaml).unwrap())
    }

    #[test]
    fn targets_name_what_is_wrong_without_repeating_secrets() {
        let slack = parse("https://hooks.example.com/T0/B0/token").unwrap();
        assert_eq!(
            (slack.format, slack.secret.is_none()),
            (Format::Slack, true)
        );
        let hook =
            parse("{url: 'https://h.example.com/x', format: webhook, secret: 'sixteen-chars-ok'}")
                .unwrap();
        assert_eq!(hook.format, Format::Webhook);
        for (yaml, wrong) in [
            ("ftp://h.example.com/x", "not an http(s) URL"),
            ("not a url", "url:"),
            (
                "{url: 'https://h.example.com/x', format: webhook}",
                "needs a secret",
            ),
            (
                "{url: 'https://h.example.com/x', format: webhook, secret: short}",
                "at least 16",
            ),
            (
                "{url: 'https://h.example.com/x', secret: 'sixteen-chars-ok'}",
                "only format webhook is signed",
            ),
            (
                "{url: 'https://h.example.com/x', format: email}",
                "unknown variant `email`",
            ),
            (
                "{url: 'https://h.example.com/x', header: x}",
                "unknown field `header`",
            ),
        ] {
            let error = parse(yaml).unwrap_err();
            assert!(error.contains(wrong), "{yaml}: {error}");
            assert!(!error.contains("sixteen-chars-ok"), "{error}");
        }
        // In the Secret: the URL, or the mapping as JSON or YAML text.
        assert_eq!(
            Target::from_text(" https://h.example.com/x\n")
                .unwrap()
                .format,
            Format::Slack
        );
        let json = r#"{"url": "https://h.example.com/x", "format": "webhook", "secret": "sixteen-chars-ok"}"#;
        assert_eq!(Target::from_text(json).unwrap().format, Format::Webhook);
        let yaml = "url: https://h.example.com/x\nformat: webhook\nsecret: sixteen-chars-ok\n";
        assert_eq!(Target::from_text(yaml).unwrap().format, Format::Webhook);
        assert!(!format!("{hook:?}").contains("h.example.com"), "{hook:?}");
    }

    #[test]
    fn signatures_cover_the_time_and_the_body() {
        // Computed apart: python3 -c 'import hmac, hashlib; print(hmac.new(b"sixteen-chars-ok",
        // b"1800000000.{\"type\":\"approval.created\"}", hashlib.sha256).hexdigest())'
        let body = r#"{"type":"approval.created"}"#;
        assert_eq!(
            signature(b"sixteen-chars-ok", 1_800_000_000, body),
            "t=1800000000,v1=836351db74bbc2538520e89434f5fc28f18c679f09a7e8a9cc41be1acf6634de"
        );
        let base = signature(b"sixteen-chars-ok", 1_800_000_000, "{}");
        assert_ne!(base, signature(b"sixteen-chars-ok", 1_800_000_001, "{}"));
        assert_ne!(base, signature(b"sixteen-chars-ok", 1_800_000_000, "{ }"));
        assert_ne!(base, signature(b"sixteen-chars-no", 1_800_000_000, "{}"));
    }
}
