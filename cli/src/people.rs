//! What people do to a running Tollgate: decide approval requests and engage or release kill
//! switches. Each is one write to the apiserver as the caller's kubeconfig user; admission
//! stamps who did it and refuses what they may not do (self-approval, approvers outside the
//! set, changes after a final decision), and its refusal is printed as it came.

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
    let what = match verdict {
        Verdict::Approve => "approved",
        Verdict::Deny => "denied",
    };
    // The phase the decisions give, as the gateway will compute it when it sees them.
    let phase = tollgate_engine::approval::phase(&updated, jiff::Timestamp::now());
    let standing = match phase {
        Phase::Approved => "the call is released unless a kill switch is engaged".to_owned(),
        Phase::Pending => format!(
            "more approvals needed (minApprovals {})",
            updated.spec.min_approvals
        ),
        _ => "the call will not be released".to_owned(),
    };
    Ok(format!(
        "approvalrequest {namespace}/{name} {what}: phase {phase:?}, {standing}\n"
    ))
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
