//! Argo CD's health checks for Tollgate's kinds (config/argocd/argocd-cm.yaml), run in Lua 5.4
//! as Argo CD runs them (the object as the global `obj`, a table with `status` and `message`
//! returned), against objects in each state, their status written by the operator's own status
//! functions.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde_json::{Value, json};
use tollgate_crds::{AgentIdentity, AgentPolicy, ApprovalRequest};
use tollgate_engine::children::{GatewayPeer, desired_children};
use tollgate_engine::status::{ApprovalStep, Stop, approval_step, identity_status, policy_status};
use tollgate_engine::{CompiledPolicy, manifest};

/// The Lua of each kind, as the ConfigMap holds it.
fn checks() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/argocd/argocd-cm.yaml"
    ))
    .unwrap();
    let map: Value = serde_yaml::from_str(&text).unwrap();
    map["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(key, lua)| {
            let kind = key
                .strip_prefix("resource.customizations.health.tollgate.dev_")
                .unwrap_or_else(|| panic!("unexpected key {key}"));
            (kind.to_owned(), lua.as_str().unwrap().to_owned())
        })
        .collect()
}

/// What Argo CD would show for `object`: (status, message).
fn health(object: &impl serde::Serialize, kind: &str) -> (String, String) {
    use mlua::LuaSerdeExt as _;
    let lua = mlua::Lua::new();
    let value = serde_json::to_value(object).unwrap();
    lua.globals()
        .set("obj", lua.to_value(&value).unwrap())
        .unwrap();
    let result: mlua::Table = lua
        .load(checks()[kind].as_str())
        .eval()
        .unwrap_or_else(|e| panic!("the {kind} check fails on {value}: {e}"));
    (
        result.get("status").unwrap(),
        result.get("message").unwrap(),
    )
}

fn now() -> Timestamp {
    "2026-12-07T12:00:00Z".parse().unwrap()
}

fn sample() -> (AgentIdentity, AgentPolicy) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/samples/support-agent.yaml"
    ))
    .unwrap();
    let (mut identity, mut policy) = (None, None);
    for object in manifest::parse(&text) {
        match object.unwrap() {
            manifest::Object::Identity(i) => identity = Some(*i),
            manifest::Object::Policy(p) => policy = Some(*p),
            _ => {}
        }
    }
    let (mut identity, mut policy) = (identity.unwrap(), policy.unwrap());
    for meta in [&mut identity.metadata, &mut policy.metadata] {
        meta.namespace = Some("support".into());
        meta.generation = Some(3);
        meta.uid = Some("uid-1".into());
    }
    (identity, policy)
}

fn reconciled(identity: &AgentIdentity, stop: Option<&Stop>) -> AgentIdentity {
    let peer = GatewayPeer {
        namespace: "tollgate-system".into(),
        pod_labels: BTreeMap::from([("app".into(), "gateway".into())]),
        port: 8443,
    };
    let children = desired_children(identity, &peer, stop.is_some());
    let mut done = identity.clone();
    done.status = Some(identity_status(
        identity,
        stop,
        children.as_ref().map_err(Vec::as_slice),
        now(),
    ));
    done
}

#[test]
fn every_kind_has_a_check() {
    assert_eq!(
        checks().keys().collect::<Vec<_>>(),
        ["AgentIdentity", "AgentPolicy", "ApprovalRequest"]
    );
}

#[test]
fn an_identity_is_healthy_suspended_degraded_or_progressing_as_its_status_says() {
    let (identity, _) = sample();
    let (status, message) = health(&identity, "AgentIdentity");
    assert_eq!(
        (status.as_str(), message.as_str()),
        ("Progressing", "waiting for the Tollgate operator")
    );

    let ready = reconciled(&identity, None);
    let (status, message) = health(&ready, "AgentIdentity");
    assert_eq!(status, "Healthy", "{message}");
    assert!(message.contains("are in force"), "{message}");

    // Edited: the new generation is not reconciled yet.
    let mut edited = ready.clone();
    edited.metadata.generation = Some(4);
    let (status, message) = health(&edited, "AgentIdentity");
    assert_eq!(status, "Progressing");
    assert!(message.contains("generation 4"), "{message}");

    let mut killed = identity.clone();
    killed.spec.kill_switch.engaged = true;
    killed.spec.kill_switch.reason = Some("incident 42".into());
    let stop = Stop::of_agent(&killed);
    let (status, message) = health(&reconciled(&killed, stop.as_ref()), "AgentIdentity");
    assert_eq!(status, "Suspended", "{message}");
    assert!(message.contains("incident 42"), "{message}");

    let mut escalating = identity.clone();
    escalating.spec.kubernetes.rules[0] = serde_json::from_value(json!({
        "apiGroups": ["rbac.authorization.k8s.io"], "resources": ["rolebindings"], "verbs": ["create"]
    }))
    .unwrap();
    let (status, message) = health(&reconciled(&escalating, None), "AgentIdentity");
    assert_eq!(status, "Degraded", "{message}");
    assert!(message.contains("spec.kubernetes.rules[0]"), "{message}");
}

#[test]
fn a_policy_is_healthy_when_compiled_and_bound_and_degraded_when_it_cannot_be() {
    let (identity, policy) = sample();
    let (status, _) = health(&policy, "AgentPolicy");
    assert_eq!(status, "Progressing");

    let mut good = policy.clone();
    good.status = Some(policy_status(
        &policy,
        CompiledPolicy::compile(&policy).as_ref(),
        Some(&identity),
        now(),
    ));
    let (status, message) = health(&good, "AgentPolicy");
    assert_eq!(status, "Healthy", "{message}");

    let mut broken = policy.clone();
    broken.spec.tools.allowed[1].when = Some("args.order_ids.all(id, ".into());
    let compiled = CompiledPolicy::compile(&broken);
    broken.status = Some(policy_status(
        &broken,
        compiled.as_ref(),
        Some(&identity),
        now(),
    ));
    let (status, message) = health(&broken, "AgentPolicy");
    assert_eq!(status, "Degraded", "{message}");
    assert!(message.contains("when"), "{message}");

    let mut orphan = policy.clone();
    orphan.status = Some(policy_status(
        &policy,
        CompiledPolicy::compile(&policy).as_ref(),
        None,
        now(),
    ));
    let (status, message) = health(&orphan, "AgentPolicy");
    assert_eq!(status, "Degraded", "{message}");
}

#[test]
fn an_approval_request_is_suspended_while_it_waits_and_degraded_when_nobody_decided() {
    let request: ApprovalRequest = serde_json::from_value(json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "ApprovalRequest",
        "metadata": {"name": "send-customer-email-x7k2q", "namespace": "support"},
        "spec": {
            "identityRef": {"name": "support-agent-v2"},
            "policyRef": {"name": "support-agent-v2", "policyHash": format!("sha256:{}", "0".repeat(64))},
            "runId": "run-7", "step": 4, "tool": "send_customer_email", "arguments": {},
            "argumentsDigest": format!("sha256:{}", "1".repeat(64)), "reason": "irreversible",
            "approvers": {"groups": ["support-leads"]}, "minApprovals": 1,
            "expiresAt": "2026-12-07T12:05:00Z"
        }
    }))
    .unwrap();
    let (status, message) = health(&request, "ApprovalRequest");
    assert_eq!(status, "Suspended");
    assert!(
        message.contains(
            "waits for 1 approval(s) to call send_customer_email until 2026-12-07T12:05:00Z"
        ),
        "{message}"
    );
    let settled = |request: &ApprovalRequest, at: Timestamp| {
        let mut done = request.clone();
        match approval_step(request, false, std::time::Duration::from_secs(3600), at) {
            ApprovalStep::Write(status) => done.status = Some(status),
            other => panic!("{other:?}"),
        }
        done
    };
    let mut approved = request.clone();
    approved.spec.decisions =
        serde_json::from_value(json!([{"verdict": "Approve", "user": "dana"}])).unwrap();
    let (status, message) = health(&settled(&approved, now()), "ApprovalRequest");
    assert_eq!(status, "Healthy");
    assert!(
        message.starts_with("Approved: ") && message.contains("dana"),
        "{message}"
    );
    let mut denied = request.clone();
    denied.spec.decisions =
        serde_json::from_value(json!([{"verdict": "Deny", "user": "lee"}])).unwrap();
    let (status, message) = health(&settled(&denied, now()), "ApprovalRequest");
    assert_eq!(status, "Healthy");
    assert!(message.starts_with("Denied: "), "{message}");
    let expired = settled(&request, "2026-12-07T12:06:00Z".parse().unwrap());
    let (status, message) = health(&expired, "ApprovalRequest");
    assert_eq!(status, "Degraded", "{message}");
    assert!(message.starts_with("expired undecided"), "{message}");
}
