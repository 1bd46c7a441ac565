//! Approval integrity: who may append a decision to an ApprovalRequest, and how decisions are
//! stamped with the authenticated user. The admission webhook applies these; the operator
//! computes phases with [`phase`].

use std::collections::BTreeSet;

use jiff::Timestamp;
use tollgate_crds::ApprovalRequest;
use tollgate_crds::approval::{Phase, Verdict};

/// The authenticated author of an admission request.
#[derive(Debug, Clone, Copy)]
pub struct Author<'a> {
    /// request.userInfo.username.
    pub username: &'a str,
    /// request.userInfo.groups.
    pub groups: &'a [String],
}

/// Indices of the decisions `new` appends to `old` (all of them on create): the ones admission
/// stamps with the author and the time, overwriting whatever was written there.
pub fn appended(old: Option<&ApprovalRequest>, new: &ApprovalRequest) -> std::ops::Range<usize> {
    let start = old
        .map_or(0, |o| o.spec.decisions.len())
        .min(new.spec.decisions.len());
    start..new.spec.decisions.len()
}

/// Checks the creation of a request: only the gateway creates them, with no decisions yet.
pub fn validate_create(
    new: &ApprovalRequest,
    author: &Author<'_>,
    gateway_username: &str,
) -> Result<(), String> {
    if author.username != gateway_username {
        return Err(format!(
            "only the Tollgate gateway ({gateway_username}) creates ApprovalRequests; {} may not",
            author.username
        ));
    }
    if !new.spec.decisions.is_empty() {
        return Err("a new ApprovalRequest cannot carry decisions".to_owned());
    }
    Ok(())
}

/// Checks an update that appends decisions. `agent_username` is the requesting agent's
/// ServiceAccount username; `killed` whether its or the global kill switch is engaged.
pub fn validate_update(
    old: &ApprovalRequest,
    new: &ApprovalRequest,
    author: &Author<'_>,
    agent_username: &str,
    killed: bool,
    now: Timestamp,
) -> Result<(), String> {
    let (old_spec, new_spec) = (&old.spec, &new.spec);
    let mut unchanged = old_spec.clone();
    unchanged.decisions = new_spec.decisions.clone();
    if &unchanged != new_spec {
        return Err("the spec of an ApprovalRequest is immutable; only appending to spec.decisions is allowed".to_owned());
    }
    if new_spec.decisions.len() < old_spec.decisions.len()
        || new_spec.decisions[..old_spec.decisions.len()] != old_spec.decisions[..]
    {
        return Err(
            "decisions can only be appended: existing decisions cannot be changed or removed"
                .to_owned(),
        );
    }
    let added = appended(Some(old), new);
    if added.is_empty() {
        return Ok(());
    }
    if added.len() > 1 {
        return Err("append one decision at a time".to_owned());
    }
    let phase = old.status.as_ref().map(|s| s.phase).unwrap_or_default();
    if phase.is_final() {
        return Err(format!(
            "the request is already {phase:?}; its decision is final"
        ));
    }
    if now >= old_spec.expires_at.0 {
        return Err(format!(
            "the request expired at {}; decisions are no longer accepted",
            old_spec.expires_at.0
        ));
    }
    if author.username == agent_username {
        return Err("an agent cannot approve its own call".to_owned());
    }
    let approvers = &old_spec.approvers;
    let listed = approvers.users.iter().any(|u| u == author.username)
        || author.groups.iter().any(|g| approvers.groups.contains(g));
    if !listed {
        return Err(format!(
            "{} is not an approver of this request (users {:?}, groups {:?})",
            author.username, approvers.users, approvers.groups
        ));
    }
    if old_spec
        .decisions
        .iter()
        .any(|d| d.user.as_deref() == Some(author.username))
    {
        return Err(format!(
            "{} has already decided this request",
            author.username
        ));
    }
    if killed && new_spec.decisions[added.start].verdict == Verdict::Approve {
        return Err("the agent's kill switch is engaged; its calls cannot be approved".to_owned());
    }
    Ok(())
}

/// Whether `request` may release the call `agent` makes now in `run`: an ApprovalRequest
/// releases exactly the call it was asked for (same identity, run, tool and arguments digest)
/// and no other. The error says what it was asked for.
pub fn releases(
    request: &ApprovalRequest,
    agent: &str,
    run: &str,
    tool: &str,
    arguments: &serde_json::Value,
) -> Result<(), String> {
    let spec = &request.spec;
    if spec.identity_ref.name == agent
        && spec.run_id == run
        && spec.tool == tool
        && spec.arguments_digest == crate::canonical::digest(arguments)
    {
        Ok(())
    } else {
        Err(format!(
            "it was asked for agent {}, run {}, tool {} and arguments {}; it releases that call only",
            spec.identity_ref.name, spec.run_id, spec.tool, spec.arguments_digest
        ))
    }
}

/// The phase the decisions give: any Deny denies; `minApprovals` distinct approving users
/// approve; past `expiresAt` an undecided request expires. A final phase never changes.
pub fn phase(request: &ApprovalRequest, now: Timestamp) -> Phase {
    let current = request.status.as_ref().map(|s| s.phase).unwrap_or_default();
    if current.is_final() {
        return current;
    }
    let decisions = &request.spec.decisions;
    if decisions.iter().any(|d| d.verdict == Verdict::Deny) {
        return Phase::Denied;
    }
    let approvers: BTreeSet<&str> = decisions
        .iter()
        .filter(|d| d.verdict == Verdict::Approve)
        .filter_map(|d| d.user.as_deref())
        .collect();
    if approvers.len() >= request.spec.min_approvals.max(1) as usize {
        return Phase::Approved;
    }
    if now >= request.spec.expires_at.0 {
        Phase::Expired
    } else {
        Phase::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tollgate_crds::approval::ApprovalRequestStatus;

    fn request(decisions: serde_json::Value) -> ApprovalRequest {
        serde_json::from_value(json!({
            "apiVersion": "tollgate.dev/v1alpha1", "kind": "ApprovalRequest",
            "metadata": {"name": "r", "namespace": "ns"},
            "spec": {
                "identityRef": {"name": "agent"},
                "policyRef": {"name": "agent", "policyHash": "sha256:x"},
                "runId": "run-1", "step": 1, "tool": "send", "arguments": {"to": "x"},
                "argumentsDigest": "sha256:y", "reason": "irreversible",
                "approvers": {"groups": ["leads"], "users": ["dana"]},
                "minApprovals": 2, "expiresAt": "2026-11-25T13:00:00Z",
                "decisions": decisions
            }
        }))
        .unwrap()
    }

    fn now() -> Timestamp {
        "2026-11-25T12:00:00Z".parse().unwrap()
    }

    const AGENT: &str = "system:serviceaccount:ns:agent-agent";

    #[test]
    fn a_request_releases_exactly_the_call_it_was_asked_for() {
        let mut asked = request(json!([]));
        let arguments = json!({"to": "x"});
        asked.spec.arguments_digest = crate::canonical::digest(&arguments);
        assert!(releases(&asked, "agent", "run-1", "send", &arguments).is_ok());
        // Key order does not change the call; any other difference does.
        let same: serde_json::Value = serde_json::from_str(r#"{"to":"x"}"#).unwrap();
        assert!(releases(&asked, "agent", "run-1", "send", &same).is_ok());
        for (agent, run, tool, args) in [
            ("other", "run-1", "send", json!({"to": "x"})),
            ("agent", "run-2", "send", json!({"to": "x"})),
            ("agent", "run-1", "send2", json!({"to": "x"})),
            ("agent", "run-1", "send", json!({"to": "y"})),
            ("agent", "run-1", "send", json!({"to": "x", "cc": "z"})),
        ] {
            let refused = releases(&asked, agent, run, tool, &args).unwrap_err();
            assert!(refused.contains("releases that call only"), "{refused}");
        }
    }

    #[test]
    fn who_may_decide() {
        let leads = vec!["leads".to_owned()];
        let none: Vec<String> = vec![];
        let old = request(json!([{"verdict": "Approve", "user": "alice"}]));
        let append = |verdict: &str| {
            request(json!([{"verdict": "Approve", "user": "alice"}, {"verdict": verdict}]))
        };
        type Case<'a> = (
            &'a str,
            ApprovalRequest,
            Author<'a>,
            bool,
            Timestamp,
            Option<&'a str>,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "a lead",
                append("Approve"),
                Author {
                    username: "bob",
                    groups: &leads,
                },
                false,
                now(),
                None,
            ),
            (
                "a listed user",
                append("Deny"),
                Author {
                    username: "dana",
                    groups: &none,
                },
                false,
                now(),
                None,
            ),
            (
                "an outsider",
                append("Approve"),
                Author {
                    username: "carol",
                    groups: &none,
                },
                false,
                now(),
                Some("not an approver"),
            ),
            (
                "the agent itself",
                append("Approve"),
                Author {
                    username: AGENT,
                    groups: &leads,
                },
                false,
                now(),
                Some("its own call"),
            ),
            (
                "a second decision",
                append("Approve"),
                Author {
                    username: "alice",
                    groups: &leads,
                },
                false,
                now(),
                Some("already decided"),
            ),
            (
                "after expiry",
                append("Approve"),
                Author {
                    username: "bob",
                    groups: &leads,
                },
                false,
                "2026-11-25T13:00:00Z".parse().unwrap(),
                Some("expired"),
            ),
            (
                "approval while killed",
                append("Approve"),
                Author {
                    username: "bob",
                    groups: &leads,
                },
                true,
                now(),
                Some("kill switch"),
            ),
            (
                "denial while killed",
                append("Deny"),
                Author {
                    username: "bob",
                    groups: &leads,
                },
                true,
                now(),
                None,
            ),
            (
                "a changed spec",
                {
                    let mut r = append("Approve");
                    r.spec.tool = "other".into();
                    r
                },
                Author {
                    username: "bob",
                    groups: &leads,
                },
                false,
                now(),
                Some("immutable"),
            ),
            (
                "a flipped decision",
                request(json!([{"verdict": "Deny", "user": "alice"}, {"verdict": "Approve"}])),
                Author {
                    username: "bob",
                    groups: &leads,
                },
                false,
                now(),
                Some("only be appended"),
            ),
            (
                "two at once",
                request(
                    json!([{"verdict": "Approve", "user": "alice"}, {"verdict": "Approve"}, {"verdict": "Approve"}]),
                ),
                Author {
                    username: "bob",
                    groups: &leads,
                },
                false,
                now(),
                Some("one decision at a time"),
            ),
        ];
        for (what, new, author, killed, at, refused) in cases {
            let result = validate_update(&old, &new, &author, AGENT, killed, at);
            match (refused, result) {
                (None, Ok(())) => {}
                (Some(reason), Err(e)) => assert!(e.contains(reason), "{what}: {e}"),
                (expected, got) => panic!("{what}: expected {expected:?}, got {got:?}"),
            }
        }
        let mut decided = old.clone();
        decided.status = Some(ApprovalRequestStatus {
            phase: Phase::Denied,
            ..Default::default()
        });
        let error = validate_update(
            &decided,
            &append("Approve"),
            &Author {
                username: "bob",
                groups: &leads,
            },
            AGENT,
            false,
            now(),
        )
        .unwrap_err();
        assert!(error.contains("final"), "{error}");
    }

    #[test]
    fn only_the_gateway_creates() {
        let gateway = "system:serviceaccount:tollgate-system:tollgate-gateway";
        assert!(
            validate_create(
                &request(json!([])),
                &Author {
                    username: gateway,
                    groups: &[]
                },
                gateway
            )
            .is_ok()
        );
        assert!(
            validate_create(
                &request(json!([])),
                &Author {
                    username: "alice",
                    groups: &[]
                },
                gateway
            )
            .unwrap_err()
            .contains("only the Tollgate gateway")
        );
        assert!(
            validate_create(
                &request(json!([{"verdict": "Approve"}])),
                &Author {
                    username: gateway,
                    groups: &[]
                },
                gateway
            )
            .is_err()
        );
        assert_eq!(
            appended(None, &request(json!([{"verdict": "Approve"}]))),
            0..1
        );
    }

    #[test]
    fn phases_follow_the_decisions() {
        let at = |s: &str| -> Timestamp { s.parse().unwrap() };
        let cases = [
            (json!([]), now(), Phase::Pending),
            (
                json!([{"verdict": "Approve", "user": "alice"}]),
                now(),
                Phase::Pending,
            ),
            (
                json!([{"verdict": "Approve", "user": "alice"}, {"verdict": "Approve", "user": "alice"}]),
                now(),
                Phase::Pending,
            ),
            (
                json!([{"verdict": "Approve", "user": "alice"}, {"verdict": "Approve", "user": "bob"}]),
                now(),
                Phase::Approved,
            ),
            (
                json!([{"verdict": "Approve", "user": "alice"}, {"verdict": "Deny", "user": "bob"}]),
                now(),
                Phase::Denied,
            ),
            (
                json!([{"verdict": "Approve", "user": "alice"}]),
                at("2026-11-25T13:00:00Z"),
                Phase::Expired,
            ),
        ];
        for (decisions, now, expected) in cases {
            assert_eq!(
                phase(&request(decisions.clone()), now),
                expected,
                "{decisions}"
            );
        }
    }
}
