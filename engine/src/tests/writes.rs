//! Admission's verdicts on agents' own writes, as decisions with their code and clause.

use super::*;

/// An agent's update of its own policy's status: a forged track record.
fn policy_status_write() -> ApiWrite<'static> {
    ApiWrite {
        operation: Operation::Update,
        group: "tollgate.dev",
        resource: "agentpolicies",
        subresource: "status",
        name: "support",
        labels: None,
        old_labels: None,
    }
}

/// Admission's verdicts as the audit trail records them: the code decided where the refusal
/// was, the policy (or the identity, without one) and the clause that decided.
#[test]
fn admission_verdicts_become_decisions_with_their_code_and_clause() {
    use admission::Judged;
    let p = policy(json!({"kubernetes": {}}));
    let protected = ApiWrite {
        operation: Operation::Delete,
        group: "apps",
        resource: "deployments",
        subresource: "",
        name: "web",
        labels: None,
        old_labels: None,
    };
    let cases = [
        (
            admission::admit("support", true, Some(&p), &protected, now()),
            Judged::Write,
            Some(&p),
            "deny:KillSwitch",
            p.id(),
            "spec.killSwitch",
        ),
        (
            admission::admit("support", false, None, &protected, now()),
            Judged::Write,
            None,
            "deny:NoPolicy",
            "AgentIdentity ns/support",
            "",
        ),
        (
            admission::Verdict::Allowed,
            Judged::Write,
            Some(&p),
            "allow",
            p.id(),
            "spec.kubernetes",
        ),
        (
            admission::Verdict::Allowed,
            Judged::Pod,
            None,
            "allow",
            "AgentIdentity ns/support",
            "spec.podSelector",
        ),
    ];
    for (verdict, judged, policy, outcome, named, clause) in cases {
        let decision = verdict.decision(judged, "ns/support", policy);
        let got = match &decision {
            Decision::Allow { .. } => "allow".to_owned(),
            Decision::Deny { code, .. } => format!("deny:{}", code.as_str()),
            other => panic!("{other:?}"),
        };
        assert_eq!(got, outcome, "{verdict:?}");
        let rule = decision.rule();
        assert_eq!(
            (&*rule.policy, &*rule.clause),
            (named, clause),
            "{verdict:?}"
        );
        assert_eq!(rule.policy_hash.is_empty(), policy.is_none(), "{verdict:?}");
    }
    // A refusal by the policy names it, its hash and the clause, and keeps the message.
    let forged = policy_status_write();
    let verdict = admission::admit("support", false, Some(&p), &forged, now());
    let Decision::Deny {
        code,
        rule,
        message,
    } = verdict.decision(Judged::Write, "ns/support", Some(&p))
    else {
        panic!("{verdict:?}")
    };
    assert_eq!(code, DenyCode::WriteRefused);
    assert_eq!(
        (&*rule.policy, &*rule.clause, &*rule.policy_hash),
        (p.id(), "tollgate:self-escalation", p.hash())
    );
    assert!(message.contains("agentpolicies/status"), "{message}");
}

#[test]
fn admission_of_agents_own_writes() {
    let p = policy(json!({"kubernetes": {
        "protectedResources": [
            {"operations": ["DELETE", "UPDATE"], "selector": {"matchLabels": {"env": "production"}}},
            {"operations": ["DELETE"], "apiGroups": ["apps"], "resources": ["deployments"], "selector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["db"]}]}}
        ],
        "freezeWindows": [{"start": "2026-12-20T00:00:00Z", "end": "2027-01-04T00:00:00Z", "reason": "holiday freeze"}]
    }}));
    let production = labels(&[("env", "production")]);
    let staging = labels(&[("env", "staging")]);
    let db = labels(&[("tier", "db")]);
    let write =
        |operation, group: &'static str, resource: &'static str, labels, old_labels| ApiWrite {
            operation,
            group,
            resource,
            subresource: "",
            name: "x",
            labels,
            old_labels,
        };
    let frozen: Timestamp = "2026-12-24T12:00:00Z".parse().unwrap();
    let cases: Vec<(&str, bool, ApiWrite<'_>, Timestamp, Option<&str>)> = vec![
        (
            "delete production",
            false,
            write(
                Operation::Delete,
                "apps",
                "deployments",
                None,
                Some(&production),
            ),
            now(),
            Some("protectedResources[0]"),
        ),
        (
            "delete staging",
            false,
            write(
                Operation::Delete,
                "apps",
                "deployments",
                None,
                Some(&staging),
            ),
            now(),
            None,
        ),
        (
            "delete judges the old labels",
            false,
            write(
                Operation::Delete,
                "apps",
                "deployments",
                Some(&staging),
                Some(&production),
            ),
            now(),
            Some("protectedResources[0]"),
        ),
        (
            "update that strips the label",
            false,
            write(
                Operation::Update,
                "apps",
                "deployments",
                Some(&staging),
                Some(&production),
            ),
            now(),
            Some("protectedResources[0]"),
        ),
        (
            "update that adds the label",
            false,
            write(
                Operation::Update,
                "",
                "configmaps",
                Some(&production),
                Some(&staging),
            ),
            now(),
            Some("protectedResources[0]"),
        ),
        (
            "create production",
            false,
            write(Operation::Create, "", "configmaps", Some(&production), None),
            now(),
            None,
        ),
        (
            "delete db deployment",
            false,
            write(Operation::Delete, "apps", "deployments", None, Some(&db)),
            now(),
            Some("protectedResources[1]"),
        ),
        (
            "delete db configmap",
            false,
            write(Operation::Delete, "", "configmaps", None, Some(&db)),
            now(),
            None,
        ),
        (
            "frozen",
            false,
            write(Operation::Create, "", "configmaps", Some(&staging), None),
            frozen,
            Some("freezeWindows[0]"),
        ),
        (
            "freeze end is exclusive",
            false,
            write(Operation::Create, "", "configmaps", None, None),
            "2027-01-04T00:00:00Z".parse().unwrap(),
            None,
        ),
        (
            "killed",
            true,
            write(Operation::Create, "", "configmaps", None, None),
            now(),
            Some("killSwitch"),
        ),
        (
            "rbac",
            false,
            write(
                Operation::Create,
                "rbac.authorization.k8s.io",
                "rolebindings",
                None,
                None,
            ),
            now(),
            Some("self-escalation"),
        ),
        (
            "tollgate kinds",
            false,
            write(
                Operation::Update,
                "tollgate.dev",
                "agentpolicies",
                None,
                None,
            ),
            now(),
            Some("self-escalation"),
        ),
        (
            "network policies",
            false,
            write(
                Operation::Delete,
                "networking.k8s.io",
                "networkpolicies",
                None,
                None,
            ),
            now(),
            Some("self-escalation"),
        ),
        (
            "webhooks",
            false,
            write(
                Operation::Delete,
                "admissionregistration.k8s.io",
                "validatingwebhookconfigurations",
                None,
                None,
            ),
            now(),
            Some("self-escalation"),
        ),
    ];
    for (what, killed, write, at, denied_by) in cases {
        let verdict = admission::admit("support", killed, Some(&p), &write, at);
        match (denied_by, verdict) {
            (None, admission::Verdict::Allowed) => {}
            (
                Some(rule),
                admission::Verdict::Denied {
                    code,
                    rule: got,
                    message,
                },
            ) => {
                assert!(
                    got.contains(rule),
                    "{what}: denied by {got}, expected {rule}"
                );
                let expected = if killed {
                    DenyCode::KillSwitch
                } else {
                    DenyCode::WriteRefused
                };
                assert_eq!(code, expected, "{what}");
                assert!(message.contains("refused"), "{what}: {message}");
            }
            (expected, verdict) => panic!("{what}: expected {expected:?}, got {verdict:?}"),
        }
    }
    let token = ApiWrite {
        operation: Operation::Create,
        group: "",
        resource: "serviceaccounts",
        subresource: "token",
        name: "agent-support",
        labels: None,
        old_labels: None,
    };
    assert!(!admission::admit("support", false, Some(&p), &token, now()).is_allowed());
    // An agent forging its own track record (status.tools.eligibleFor) or hiding its unused
    // rights: the status subresource is one of Tollgate's kinds too.
    let forged = policy_status_write();
    match admission::admit("support", false, Some(&p), &forged, now()) {
        admission::Verdict::Denied { rule, message, .. } => {
            assert!(rule.ends_with("tollgate:self-escalation"), "{rule}");
            assert!(message.contains("agentpolicies/status"), "{message}");
        }
        verdict => panic!("an agent wrote its policy's status: {verdict:?}"),
    }
    assert!(
        !admission::admit(
            "support",
            false,
            None,
            &write(Operation::Create, "", "configmaps", None, None),
            now()
        )
        .is_allowed(),
        "no policy, no writes"
    );
}
