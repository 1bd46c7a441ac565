//! `kubectl tollgate drill AGENT`: a kill switch tested, not just implemented. Engages the
//! agent's switch, checks that each plane holds and how long it took (the gateway refuses its
//! calls, its RoleBinding is gone, its egress is denied, its writes are refused), releases the
//! switch, checks that each plane is restored, and records the drill in the AgentIdentity's
//! `status.lastKillSwitchDrill` (which `doctor --checklist` reads) when every plane held. The
//! gateway records the drill's probe calls (run `tollgate-drill-…`) in the audit trail.
//!
//! It acts as the agent only to probe: a short-lived token of the agent's ServiceAccount
//! (TokenRequest, audience `tollgate`) for one call to the gateway with a tool no policy can
//! allow, and SelfSubjectAccessReviews of the writes its rules declare. The switch is always
//! released, also when a plane fails to hold; a switch somebody else engaged is never touched.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use tollgate_crds::AgentIdentity;

/// Where and how to drill.
#[derive(Debug, Clone)]
pub struct Drill {
    /// The agent's namespace.
    pub namespace: String,
    /// The AgentIdentity's name.
    pub name: String,
    /// The gateway's URL as this machine reaches it (None: that plane is not checked).
    pub gateway: Option<String>,
    /// A PEM bundle to trust for the gateway's TLS.
    pub ca: Option<std::path::PathBuf>,
    /// How long each plane may take to hold, or to be restored.
    pub timeout: Duration,
}

/// One plane's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plane {
    /// What was checked.
    pub name: &'static str,
    /// Time from engaging the switch until the plane held; None when it did not (or was not
    /// checked: see `note`).
    pub held: Option<Duration>,
    /// Time from releasing the switch until the plane was restored.
    pub restored: Option<Duration>,
    /// Why a plane was not checked, or what it showed.
    pub note: String,
}

/// What a drill found.
#[derive(Debug, Clone)]
pub struct Report {
    /// The agent.
    pub agent: String,
    /// Each plane.
    pub planes: Vec<Plane>,
    /// Whether `status.lastKillSwitchDrill` was written.
    pub recorded: Option<String>,
}

impl Report {
    /// Every checked plane held and was restored.
    pub fn ok(&self) -> bool {
        self.planes
            .iter()
            .filter(|p| p.note != SKIPPED)
            .all(|p| p.held.is_some() && p.restored.is_some())
    }

    /// A table: plane, held after, restored after, note.
    pub fn text(&self) -> String {
        let mut text = format!("kill-switch drill of agent {}\n", self.agent);
        let time =
            |d: Option<Duration>| d.map_or("NO".to_owned(), |d| format!("{} ms", d.as_millis()));
        let _ = writeln!(
            text,
            "  {:<28}  {:>10}  {:>10}  note",
            "plane", "held", "restored"
        );
        for plane in &self.planes {
            let (held, restored) = if plane.note == SKIPPED {
                ("-".to_owned(), "-".to_owned())
            } else {
                (time(plane.held), time(plane.restored))
            };
            let _ = writeln!(
                text,
                "  {:<28}  {:>10}  {:>10}  {}",
                plane.name, held, restored, plane.note
            );
        }
        let _ = match &self.recorded {
            Some(at) => writeln!(
                text,
                "every plane held; recorded as status.lastKillSwitchDrill {at}"
            ),
            None => writeln!(
                text,
                "the drill FAILED: a plane did not hold or was not restored (not recorded)"
            ),
        };
        text
    }
}

const SKIPPED: &str = "not checked: give --gateway URL";
const GATEWAY_PLANE: &str = "gateway refuses its calls";

/// What a plane looks like now: held (the switch is in force there) or not, and what was seen.
type Probe = std::pin::Pin<Box<dyn Future<Output = anyhow::Result<(bool, String)>> + Send>>;
/// Makes a fresh probe of one plane.
type Prober<'a> = Box<dyn Fn() -> Probe + 'a>;

/// Runs a drill of `drill.namespace/drill.name`, as the user `config` authenticates.
pub async fn run(config: kube::Config, drill: &Drill) -> anyhow::Result<Report> {
    let client = kube::Client::try_from(config.clone()).context("a client for the kubeconfig")?;
    let identities: Api<AgentIdentity> = Api::namespaced(client.clone(), &drill.namespace);
    let agent = format!("{}/{}", drill.namespace, drill.name);
    let identity = identities
        .get_opt(&drill.name)
        .await
        .with_context(|| format!("read agentidentity {agent}"))?
        .with_context(|| format!("agentidentity {agent} not found"))?;
    if identity.spec.kill_switch.engaged {
        bail!(
            "the kill switch of agent {agent} is engaged already ({}); a drill engages and releases it, so it leaves a switch someone engaged alone",
            identity
                .spec
                .kill_switch
                .reason
                .as_deref()
                .unwrap_or("no reason given")
        );
    }
    let child = tollgate_engine::children::child_name(&identity);
    let service_account = identity.service_account_name();
    // Two short-lived tokens of the agent's ServiceAccount: one for the gateway (its
    // audience), one for the apiserver (the default audience).
    let token_for = |audiences: Vec<String>| {
        let api = Api::<ServiceAccount>::namespaced(client.clone(), &drill.namespace);
        let (service_account, namespace) = (service_account.clone(), drill.namespace.clone());
        async move {
            api.create_token_request(
                &service_account,
                &PostParams::default(),
                &TokenRequest {
                    spec: TokenRequestSpec {
                        audiences,
                        expiration_seconds: Some(600),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await
            .with_context(|| {
                format!(
                    "a token of ServiceAccount {namespace}/{service_account}, to probe as the agent (may you create serviceaccounts/token?)"
                )
            })?
            .status
            .map(|s| s.token)
            .context("the TokenRequest returned no token")
        }
    };
    let token = token_for(vec![identity.spec.service_account.token_audience.clone()]).await?;
    let api_token = token_for(Vec::new()).await?;
    let as_agent = {
        let mut config = config.clone();
        config.auth_info = kube::config::AuthInfo {
            token: Some(api_token.into()),
            ..Default::default()
        };
        kube::Client::try_from(config).context("a client as the agent")?
    };
    let http = {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10));
        if let Some(ca) = &drill.ca {
            let pem = std::fs::read(ca).with_context(|| format!("read {}", ca.display()))?;
            for certificate in reqwest::Certificate::from_pem_bundle(&pem)? {
                builder = builder.add_root_certificate(certificate);
            }
        }
        builder.build()?
    };
    let run_id = format!("tollgate-drill-{}", jiff::Timestamp::now().as_second());
    let writes: Vec<(String, String, String)> = identity
        .spec
        .kubernetes
        .rules
        .iter()
        .flat_map(|rule| {
            let groups = rule.api_groups.clone();
            let resources = rule.resources.clone();
            rule.verbs
                .iter()
                .filter(|v| matches!(v.as_str(), "create" | "update" | "patch" | "delete"))
                .flat_map(move |verb| {
                    let resources = resources.clone();
                    groups.clone().into_iter().flat_map(move |group| {
                        let verb = verb.clone();
                        resources
                            .clone()
                            .into_iter()
                            .map(move |resource| (verb.clone(), group.clone(), resource))
                    })
                })
        })
        .collect();

    // The planes, each a probe that says whether the switch is in force there.
    let gateway_probe = |url: String| -> Probe {
        let (http, token, run_id) = (http.clone(), token.clone(), run_id.clone());
        Box::pin(async move {
            let answer = http
                .post(format!("{}/v1/decide", url.trim_end_matches('/')))
                .bearer_auth(&token)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(
                    json!({"runId": run_id, "tool": "tollgate-drill-probe", "arguments": {}})
                        .to_string(),
                )
                .send()
                .await
                .context("the gateway did not answer")?;
            let body: serde_json::Value =
                serde_json::from_slice(&answer.bytes().await.unwrap_or_default())
                    .unwrap_or_default();
            let code = body["code"]
                .as_str()
                .or(body["error"]["code"].as_str())
                .unwrap_or("?")
                .to_owned();
            Ok((code == "KillSwitch", format!("answered {code}")))
        })
    };
    let binding_probe = || -> Probe {
        let api: Api<RoleBinding> = Api::namespaced(client.clone(), &drill.namespace);
        let child = child.clone();
        Box::pin(async move {
            let found = api.get_opt(&child).await?;
            Ok((found.is_none(), format!("RoleBinding {child}")))
        })
    };
    let egress_probe = || -> Probe {
        let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), &drill.namespace);
        let child = child.clone();
        Box::pin(async move {
            let policy = api.get_opt(&child).await?;
            let deny_all = policy.as_ref().is_some_and(|p| {
                p.spec.as_ref().is_some_and(|s| {
                    s.policy_types.iter().flatten().any(|t| t == "Egress")
                        && s.egress.as_ref().is_none_or(Vec::is_empty)
                })
            });
            Ok((deny_all, format!("NetworkPolicy {child}")))
        })
    };
    let writes_probe = || -> Probe {
        let api: Api<SelfSubjectAccessReview> = Api::all(as_agent.clone());
        let (writes, namespace) = (writes.clone(), drill.namespace.clone());
        Box::pin(async move {
            let mut allowed = Vec::new();
            for (verb, group, resource) in &writes {
                let review = SelfSubjectAccessReview {
                    spec: SelfSubjectAccessReviewSpec {
                        resource_attributes: Some(ResourceAttributes {
                            namespace: Some(namespace.clone()),
                            verb: Some(verb.clone()),
                            group: Some(group.clone()),
                            resource: Some(resource.clone()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let answer = match api.create(&PostParams::default(), &review).await {
                    Ok(answer) => answer,
                    // Admission refuses every write of a stopped agent, even this review.
                    Err(kube::Error::Api(status))
                        if status.code == 403 && status.message.contains("kill switch") =>
                    {
                        return Ok((
                            true,
                            "admission refuses its writes (its access review too)".to_owned(),
                        ));
                    }
                    Err(e) => return Err(e.into()),
                };
                if answer.status.is_some_and(|s| s.allowed) {
                    allowed.push(format!("{verb} {resource}"));
                }
            }
            Ok((
                allowed.is_empty(),
                if allowed.is_empty() {
                    format!("{} declared write(s) refused", writes.len())
                } else {
                    format!("allowed: {}", allowed.join(", "))
                },
            ))
        })
    };

    let mut planes: Vec<(&'static str, Option<Prober<'_>>)> = vec![
        (
            GATEWAY_PLANE,
            drill
                .gateway
                .clone()
                .map(|url| Box::new(move || gateway_probe(url.clone())) as Prober<'_>),
        ),
        ("its RoleBinding is removed", Some(Box::new(binding_probe))),
        ("its egress is denied", Some(Box::new(egress_probe))),
    ];
    if writes.is_empty() {
        planes.push(("its writes are refused", None));
    } else {
        planes.push(("its writes are refused", Some(Box::new(writes_probe))));
    }

    // Before: every checked plane must be open, or the drill would prove nothing.
    for (name, probe) in &planes {
        if let Some(probe) = probe {
            let (held, seen) = probe()
                .await
                .with_context(|| format!("{name}: before the drill"))?;
            if held {
                bail!("{name}: already in force before the drill ({seen}); fix that first");
            }
        }
    }

    let switch = |engaged: bool| {
        let reason = format!(
            "kill-switch drill (kubectl tollgate drill) at {}",
            jiff::Timestamp::now()
        );
        let patch = json!({"spec": {"killSwitch": if engaged {
            json!({"engaged": true, "reason": reason})
        } else {
            json!({"engaged": false, "reason": null})
        }}});
        let identities = identities.clone();
        let name = drill.name.clone();
        async move {
            identities
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
        }
    };
    let engaged_at = jiff::Timestamp::now();
    let started = Instant::now();
    switch(true)
        .await
        .with_context(|| format!("engage the kill switch of {agent}"))?;
    // Every plane at once, each timed from the moment the switch was engaged.
    let results: Vec<Plane> =
        futures::future::join_all(planes.iter().map(|(name, probe)| async move {
            let Some(probe) = probe else {
                return Plane {
                    name,
                    held: Some(Duration::ZERO),
                    restored: Some(Duration::ZERO),
                    note: if *name == GATEWAY_PLANE {
                        SKIPPED.to_owned()
                    } else {
                        "nothing to refuse: its rules declare no writes".to_owned()
                    },
                };
            };
            let (held, note) = until(probe.as_ref(), true, started, drill.timeout).await;
            Plane {
                name,
                held,
                restored: None,
                note,
            }
        }))
        .await;
    // Released whatever happened above.
    let released = Instant::now();
    switch(false)
        .await
        .with_context(|| format!("RELEASE the kill switch of {agent} (it is still engaged)"))?;
    let restored = futures::future::join_all(planes.iter().map(|(_, probe)| async move {
        match probe {
            Some(probe) => Some(until(probe.as_ref(), false, released, drill.timeout).await),
            None => None,
        }
    }))
    .await;
    let mut results = results;
    for (plane, restored) in results.iter_mut().zip(restored) {
        if let Some((restored, note)) = restored {
            plane.restored = restored;
            plane.note = format!("{}; after release: {note}", plane.note);
        }
    }
    let mut report = Report {
        agent: agent.clone(),
        planes: results,
        recorded: None,
    };
    if report.ok() {
        let patch = json!({"status": {"lastKillSwitchDrill": engaged_at.to_string()}});
        identities
            .patch_status(&drill.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| {
                format!("record the drill in agentidentity {agent} status (may you patch agentidentities/status?)")
            })?;
        report.recorded = Some(engaged_at.to_string());
    }
    Ok(report)
}

/// Probes until the plane is `held` (in force) or not, from `since`, for at most `timeout`:
/// the time it took, and the last thing seen.
async fn until(
    probe: &dyn Fn() -> Probe,
    held: bool,
    since: Instant,
    timeout: Duration,
) -> (Option<Duration>, String) {
    loop {
        let seen = match probe().await {
            Ok((now, what)) if now == held => return (Some(since.elapsed()), what),
            Ok((_, what)) => what,
            Err(e) => format!("probe failed: {e:#}"),
        };
        if since.elapsed() > timeout {
            return (None, format!("{seen} (gave up after {timeout:?})"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
