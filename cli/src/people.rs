//! What people do to a running Tollgate: decide approval requests and engage or release kill
//! switches. Each is one write to the apiserver as the caller's kubeconfig user; admission
//! stamps who did it and refuses what they may not do (self-approval, approvers outside the
//! set, changes after a final decision), and its refusal is printed as it came. With
//! `--gateway`, approvals are decided at a standalone gateway instead, with an approver's key;
//! the gateway stamps and checks them under the same rules.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tollgate_crds::approval::{ApprovalRequest, Phase, Verdict};
use tollgate_crds::common::{
    GLOBAL_KILL_SWITCH, GLOBAL_KILL_SWITCH_KEY, GLOBAL_KILL_SWITCH_REASON_KEY,
};
use tollgate_crds::identity::AgentIdentity;

/// The field manager of the writes below.
const MANAGER: &str = "kubectl-tollgate";

/// A client for the kubeconfig's current context (`KUBECONFIG`, as kubectl passes it to a
/// plugin), and the namespace to use: `namespace`, else the context's.
pub async fn client(namespace: Option<&str>) -> anyhow::Result<(kube::Client, String)> {
    let client = kube::Client::try_default()
        .await
        .context("no usable kubeconfig (set KUBECONFIG, or run in a pod)")?;
    let namespace = namespace.map_or_else(|| client.default_namespace().to_owned(), str::to_owned);
    Ok((client, namespace))
}

/// Appends `verdict` (and `comment`) to the decisions of approval request `name`. Returns what
/// to print: the request's phase afterwards.
pub async fn decide(
    client: kube::Client,
    namespace: &str,
    name: &str,
    verdict: Verdict,
    comment: Option<&str>,
) -> anyhow::Result<String> {
    let requests: Api<ApprovalRequest> = Api::namespaced(client, namespace);
    let mut decision = json!({ "verdict": verdict });
    if let Some(comment) = comment {
        decision["comment"] = json!(comment);
    }
    // A JSON patch that appends: two approvers deciding at once both land, neither overwrites
    // the other.
    let patch: json_patch::Patch = serde_json::from_value(
        json!([{ "op": "add", "path": "/spec/decisions/-", "value": decision }]),
    )
    .expect("a well-formed JSON patch");
    let updated = requests
        .patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .map_err(|e| refused(e, &format!("approvalrequest {namespace}/{name}")))?;
    Ok(outcome(&updated, &format!("{namespace}/{name}"), verdict))
}

/// What an approver reads after deciding: the request's phase and what follows from it.
fn outcome(request: &ApprovalRequest, full_name: &str, verdict: Verdict) -> String {
    let what = match verdict {
        Verdict::Approve => "approved",
        Verdict::Deny => "denied",
    };
    // The phase the decisions give, as the gateway will compute it when it sees them.
    let phase = tollgate_engine::approval::phase(request, jiff::Timestamp::now());
    let standing = match phase {
        Phase::Approved => "the call is released unless a kill switch is engaged".to_owned(),
        Phase::Pending => format!(
            "more approvals needed (minApprovals {})",
            request.spec.min_approvals
        ),
        _ => "the call will not be released".to_owned(),
    };
    format!("approvalrequest {full_name} {what}: phase {phase:?}, {standing}\n")
}

/// Adds `verdict` to request `namespace/name` at a standalone gateway (`url`), with an
/// approver's `key`. The gateway stamps the key's holder and applies the same rules as
/// admission; its refusal is printed as it came.
pub async fn decide_at_gateway(
    url: &str,
    key: &str,
    namespace: &str,
    name: &str,
    verdict: Verdict,
    comment: Option<&str>,
) -> anyhow::Result<String> {
    let mut decision = json!({ "verdict": verdict });
    if let Some(comment) = comment {
        decision["comment"] = json!(comment);
    }
    let full_name = format!("{namespace}/{name}");
    let endpoint = format!("{}/v1/approvals/{full_name}", url.trim_end_matches('/'));
    let request: ApprovalRequest = gateway_call(
        http()?
            .post(&endpoint)
            .bearer_auth(key)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(decision.to_string()),
        &format!("approvalrequest {full_name}"),
    )
    .await?;
    Ok(outcome(&request, &full_name, verdict))
}

/// The ApprovalRequests a standalone gateway (`url`) holds for the approver whose `key` this is.
pub async fn list_at_gateway(
    url: &str,
    key: &str,
    namespace: Option<&str>,
) -> anyhow::Result<Vec<ApprovalRequest>> {
    #[derive(serde::Deserialize)]
    struct Items {
        items: Vec<ApprovalRequest>,
    }
    let endpoint = format!("{}/v1/approvals", url.trim_end_matches('/'));
    let items: Items = gateway_call(http()?.get(&endpoint).bearer_auth(key), "approvals").await?;
    Ok(items
        .items
        .into_iter()
        .filter(|r| namespace.is_none_or(|ns| r.metadata.namespace.as_deref() == Some(ns)))
        .collect())
}

/// The ApprovalRequests of `namespace` (else of every namespace) in the kubeconfig's cluster.
pub async fn list(namespace: Option<&str>) -> anyhow::Result<Vec<ApprovalRequest>> {
    let (client, _) = client(None).await?;
    let api: Api<ApprovalRequest> = match namespace {
        Some(namespace) => Api::namespaced(client, namespace),
        None => Api::all(client),
    };
    let listed = api
        .list(&Default::default())
        .await
        .map_err(|e| refused(e, "approvalrequests"))?;
    Ok(listed.items)
}

/// A table of `requests` as they stand at `now`: the undecided ones, or with `all` every one.
pub fn table(requests: &[ApprovalRequest], all: bool, now: jiff::Timestamp) -> String {
    let mut rows = vec![[
        "NAMESPACE/NAME".to_owned(),
        "AGENT".to_owned(),
        "TOOL".to_owned(),
        "RUN".to_owned(),
        "PHASE".to_owned(),
        "APPROVALS".to_owned(),
        "EXPIRES IN".to_owned(),
    ]];
    for request in requests {
        let phase = tollgate_engine::approval::phase(request, now);
        if !all && phase != Phase::Pending {
            continue;
        }
        let spec = &request.spec;
        let approvals = spec
            .decisions
            .iter()
            .filter(|d| d.verdict == Verdict::Approve)
            .count();
        let left = spec.expires_at.0.duration_since(now);
        rows.push([
            format!(
                "{}/{}",
                request.metadata.namespace.as_deref().unwrap_or_default(),
                request.metadata.name.as_deref().unwrap_or_default()
            ),
            spec.identity_ref.name.clone(),
            spec.tool.clone(),
            spec.run_id.clone(),
            format!("{phase:?}"),
            format!("{approvals}/{}", spec.min_approvals),
            if left.is_positive() {
                format!("{}s", left.as_secs())
            } else {
                "-".to_owned()
            },
        ]);
    }
    if rows.len() == 1 {
        return if all {
            "no approval requests\n".to_owned()
        } else {
            "no approval requests waiting\n".to_owned()
        };
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn http() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .context("an HTTP client")
}

/// Sends a request to the gateway and reads its JSON answer; a refusal is returned with the
/// gateway's code and words.
async fn gateway_call<T: serde::de::DeserializeOwned>(
    request: reqwest::RequestBuilder,
    what: &str,
) -> anyhow::Result<T> {
    let answer = request
        .send()
        .await
        .with_context(|| format!("{what}: the gateway did not answer"))?;
    let status = answer.status();
    let body = answer
        .bytes()
        .await
        .with_context(|| format!("{what}: the gateway's answer broke off"))?;
    if !status.is_success() {
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let code = error["error"]["code"].as_str().unwrap_or("?");
        let message = error["error"]["message"].as_str().map_or_else(
            || String::from_utf8_lossy(&body).into_owned(),
            str::to_owned,
        );
        bail!("{what}: refused ({} {code}): {message}", status.as_u16());
    }
    serde_json::from_slice(&body)
        .with_context(|| format!("{what}: the gateway's answer is not what it should be"))
}

/// Engages (or, with `engaged` false, releases) the kill switch of agent `name` in `namespace`,
/// or with `name` None the global switch in `tollgate_namespace`.
pub async fn kill(
    client: kube::Client,
    name: Option<&str>,
    namespace: &str,
    tollgate_namespace: &str,
    engaged: bool,
    reason: Option<&str>,
) -> anyhow::Result<String> {
    let verb = if engaged { "engaged" } else { "released" };
    match name {
        Some(name) => {
            let identities: Api<AgentIdentity> = Api::namespaced(client, namespace);
            let mut switch = json!({ "engaged": engaged });
            if let Some(reason) = reason {
                switch["reason"] = json!(reason);
            }
            identities
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "spec": { "killSwitch": switch } })),
                )
                .await
                .map_err(|e| refused(e, &format!("agentidentity {namespace}/{name}")))?;
            Ok(format!("kill switch of agent {namespace}/{name} {verb}\n"))
        }
        None => {
            let maps: Api<ConfigMap> = Api::namespaced(client, tollgate_namespace);
            let mut data =
                BTreeMap::from([(GLOBAL_KILL_SWITCH_KEY.to_owned(), engaged.to_string())]);
            if let Some(reason) = reason {
                data.insert(GLOBAL_KILL_SWITCH_REASON_KEY.to_owned(), reason.to_owned());
            }
            let map = json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": { "name": GLOBAL_KILL_SWITCH, "namespace": tollgate_namespace },
                "data": data,
            });
            maps.patch(
                GLOBAL_KILL_SWITCH,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(map),
            )
            .await
            .map_err(|e| {
                refused(
                    e,
                    &format!("configmap {tollgate_namespace}/{GLOBAL_KILL_SWITCH}"),
                )
            })?;
            Ok(format!(
                "global kill switch {verb} (configmap {tollgate_namespace}/{GLOBAL_KILL_SWITCH})\n"
            ))
        }
    }
}

/// The apiserver's (or admission's) refusal of a write to `what`, with its reason as given.
fn refused(error: kube::Error, what: &str) -> anyhow::Error {
    match error {
        kube::Error::Api(status) if status.code == 404 => {
            anyhow::anyhow!("{what} not found")
        }
        kube::Error::Api(status) => {
            anyhow::anyhow!("{what}: refused ({}): {}", status.code, status.message)
        }
        other => anyhow::Error::new(other)
            .context(format!("{what}: the write did not reach the apiserver")),
    }
}

/// Refuses a kill switch command that names both an agent and `--all`, or neither.
pub fn target(name: Option<&str>, all: bool) -> anyhow::Result<Option<&str>> {
    match (name, all) {
        (Some(_), true) => bail!("name an agent or pass --all, not both"),
        (None, false) => bail!("name an agent (AgentIdentity), or pass --all for every agent"),
        (name, _) => Ok(name),
    }
}
