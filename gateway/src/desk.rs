//! Standalone approvals: the ApprovalRequests of a gateway with no cluster, held in its memory,
//! and the rules that decide who may add a decision to one.
//!
//! The objects are the same `ApprovalRequest`s a cluster holds and the rules are the engine's
//! ([`tollgate_engine::approval`]) that admission applies there: one decision at a time, each
//! stamped with the approver the key names (whatever the body says), approvers listed by the
//! policy, distinct approvers, no decision after a final one or after expiry, no approval while
//! the agent's kill switch is engaged. What a cluster's operator writes into `status` (the phase)
//! is written here after every decision.
//!
//! Requests live as long as the gateway: a restart forgets them, and a call that was waiting is
//! gone with its connection anyway; an agent that redeems a forgotten request is told there is
//! none. Decided and expired requests are forgotten an hour after their end; at most
//! [`LocalDesk::LIMIT`] are held, and a request past that is refused, not queued.

use std::collections::HashMap;
use std::sync::Mutex;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tollgate_crds::ApprovalRequest;
use tollgate_crds::approval::{ApprovalDecision, ApprovalRequestStatus, Phase, Verdict};
use tollgate_engine::approval::{Author, phase, validate_update};

/// Why a decision was not added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeskError {
    /// No such request (never created, or forgotten).
    NotFound(String),
    /// The rules refuse it; the message says which.
    Refused(String),
    /// The desk is full.
    Full(usize),
}

impl std::fmt::Display for DeskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeskError::NotFound(name) => write!(f, "there is no ApprovalRequest {name}"),
            DeskError::Refused(why) => f.write_str(why),
            DeskError::Full(limit) => write!(
                f,
                "{limit} approval requests are open already; decide or let some expire first"
            ),
        }
    }
}

/// The approval requests of a standalone gateway, by `namespace/name`.
#[derive(Debug)]
pub struct LocalDesk {
    requests: Mutex<HashMap<String, ApprovalRequest>>,
    changed: tokio::sync::Notify,
    deciding: tokio::sync::Mutex<()>,
    limit: usize,
}

impl Default for LocalDesk {
    fn default() -> Self {
        Self::with_limit(Self::LIMIT)
    }
}

impl LocalDesk {
    /// The most requests held at once unless told otherwise.
    pub const LIMIT: usize = 10_000;
    /// How long a decided or expired request stays readable.
    const KEPT: jiff::SignedDuration = jiff::SignedDuration::from_hours(1);

    /// A desk that holds at most `limit` requests.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            requests: Mutex::default(),
            changed: tokio::sync::Notify::new(),
            deciding: tokio::sync::Mutex::new(()),
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ApprovalRequest>> {
        self.requests.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `request` under a fresh name (its `generateName` and five random characters, as
    /// the apiserver names them) and returns it as stored.
    pub fn create(
        &self,
        mut request: ApprovalRequest,
        now: Timestamp,
    ) -> Result<ApprovalRequest, DeskError> {
        let namespace = request.metadata.namespace.clone().unwrap_or_default();
        let prefix = request.metadata.generate_name.take().unwrap_or_default();
        let mut requests = self.lock();
        requests.retain(|_, r| !forgotten(r, now));
        if requests.len() >= self.limit {
            return Err(DeskError::Full(self.limit));
        }
        let name = loop {
            let name = format!("{prefix}{}", suffix().map_err(DeskError::Refused)?);
            if !requests.contains_key(&format!("{namespace}/{name}")) {
                break name;
            }
        };
        request.metadata.name = Some(name.clone());
        request.metadata.creation_timestamp = Some(Time(now));
        request.metadata.resource_version = Some("1".to_owned());
        request.status = Some(ApprovalRequestStatus::default());
        requests.insert(format!("{namespace}/{name}"), request.clone());
        drop(requests);
        self.changed.notify_waiters();
        Ok(request)
    }

    /// The request `namespace/name` as it stands at `now` (an undecided one past its expiry
    /// reads as Expired).
    pub fn get(&self, full_name: &str, now: Timestamp) -> Option<ApprovalRequest> {
        let mut requests = self.lock();
        let request = requests.get_mut(full_name)?;
        settle(request, now);
        Some(request.clone())
    }

    /// Every request held, oldest first, as they stand at `now`.
    pub fn list(&self, now: Timestamp) -> Vec<ApprovalRequest> {
        let mut requests = self.lock();
        let mut all: Vec<ApprovalRequest> = requests
            .values_mut()
            .map(|r| {
                settle(r, now);
                r.clone()
            })
            .collect();
        all.sort_by_key(|r| r.metadata.creation_timestamp.as_ref().map(|t| t.0));
        all
    }

    /// Request `full_name` with `author`'s `verdict` (and `comment`) added, stamped with the
    /// author and `now`, if the rules allow it; nothing changes until [`LocalDesk::commit`].
    /// `agent_username` is who the requesting agent authenticates as; `killed` whether its kill
    /// switch is engaged.
    #[allow(clippy::too_many_arguments)]
    pub fn propose(
        &self,
        full_name: &str,
        author: &Author<'_>,
        verdict: Verdict,
        comment: Option<String>,
        agent_username: &str,
        killed: bool,
        now: Timestamp,
    ) -> Result<ApprovalRequest, DeskError> {
        let mut requests = self.lock();
        let old = requests
            .get_mut(full_name)
            .ok_or_else(|| DeskError::NotFound(full_name.to_owned()))?;
        settle(old, now);
        let mut new = old.clone();
        new.spec.decisions.push(ApprovalDecision {
            verdict,
            comment,
            user: Some(author.username.to_owned()),
            at: Some(Time(now)),
        });
        validate_update(old, &new, author, agent_username, killed, now)
            .map_err(DeskError::Refused)?;
        new.metadata.resource_version = Some((version(old) + 1).to_string());
        settle(&mut new, now);
        Ok(new)
    }

    /// Stores a proposed request, unless the one it was proposed from changed meanwhile.
    pub fn commit(&self, new: ApprovalRequest) -> Result<(), DeskError> {
        let full_name = format!(
            "{}/{}",
            new.metadata.namespace.as_deref().unwrap_or_default(),
            new.metadata.name.as_deref().unwrap_or_default()
        );
        let mut requests = self.lock();
        let old = requests
            .get_mut(&full_name)
            .ok_or_else(|| DeskError::NotFound(full_name.clone()))?;
        if version(old) + 1 != version(&new) {
            return Err(DeskError::Refused(format!(
                "ApprovalRequest {full_name} changed while the decision was recorded; decide again"
            )));
        }
        *old = new;
        drop(requests);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Serializes decisions: hold it from [`LocalDesk::propose`] to [`LocalDesk::commit`], across
    /// the record of the decision, so that what is recorded is what takes effect.
    pub async fn deciding(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.deciding.lock().await
    }

    /// Denies every undecided request of `agent` (`namespace/name`) with reason `KillSwitch`,
    /// as the operator does in a cluster when a switch is engaged. Returns how many.
    pub fn cancel_agent(&self, agent: &str, now: Timestamp) -> usize {
        let (namespace, name) = agent.split_once('/').unwrap_or(("", agent));
        let mut cancelled = 0;
        for request in self.lock().values_mut() {
            settle(request, now);
            let pending = request
                .status
                .as_ref()
                .is_none_or(|s| s.phase == Phase::Pending);
            if pending
                && request.metadata.namespace.as_deref() == Some(namespace)
                && request.spec.identity_ref.name == name
            {
                request.status = Some(ApprovalRequestStatus {
                    phase: Phase::Denied,
                    decided_at: Some(Time(now)),
                    reason: Some("KillSwitch".to_owned()),
                    conditions: Vec::new(),
                });
                request.metadata.resource_version = Some((version(request) + 1).to_string());
                cancelled += 1;
            }
        }
        if cancelled > 0 {
            self.changed.notify_waiters();
        }
        cancelled
    }

    /// Raised at every change of any request. Take its `notified()` before reading the state it
    /// guards, and `enable` it, so a change in between still wakes the reader.
    pub fn signal(&self) -> &tokio::sync::Notify {
        &self.changed
    }
}

/// Writes the phase the decisions and the clock give into `request.status`, as the operator does
/// in a cluster. A final phase never changes.
fn settle(request: &mut ApprovalRequest, now: Timestamp) {
    let current = request.status.as_ref().map(|s| s.phase).unwrap_or_default();
    if current.is_final() {
        return;
    }
    let next = phase(request, now);
    if next != current {
        let reason = match next {
            Phase::Approved => "Approved",
            Phase::Denied => "Denied",
            Phase::Expired => "Expired",
            _ => "Pending",
        };
        request.status = Some(ApprovalRequestStatus {
            phase: next,
            decided_at: next.is_final().then_some(Time(now)),
            reason: Some(reason.to_owned()),
            conditions: Vec::new(),
        });
    }
}

fn version(request: &ApprovalRequest) -> u64 {
    request
        .metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Whether a request ended more than [`LocalDesk::KEPT`] ago.
fn forgotten(request: &ApprovalRequest, now: Timestamp) -> bool {
    let ended = match request.status.as_ref() {
        Some(status) if status.phase.is_final() => status
            .decided_at
            .as_ref()
            .map_or(request.spec.expires_at.0, |t| t.0),
        _ => request.spec.expires_at.0,
    };
    ended
        .checked_add(LocalDesk::KEPT)
        .is_ok_and(|until| now >= until)
}

/// Five random characters, from the alphabet the apiserver's generated names end in.
fn suffix() -> Result<String, String> {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = crate::stdio::random_bytes::<5>()
        .map_err(|e| format!("no randomness for a request name: {e}"))?;
    Ok(bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(expires: &str) -> ApprovalRequest {
        serde_json::from_value(json!({
            "apiVersion": "tollgate.dev/v1alpha1", "kind": "ApprovalRequest",
            "metadata": {"generateName": "send-", "namespace": "ns"},
            "spec": {
                "identityRef": {"name": "agent"},
                "policyRef": {"name": "agent", "policyHash": "sha256:x"},
                "runId": "run-1", "step": 1, "tool": "send", "arguments": {"to": "x"},
                "argumentsDigest": "sha256:y", "reason": "irreversible",
                "approvers": {"groups": ["leads"], "users": ["dana"]},
                "minApprovals": 2, "expiresAt": expires,
            }
        }))
        .unwrap()
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    impl LocalDesk {
        #[allow(clippy::too_many_arguments)]
        fn decide(
            &self,
            full_name: &str,
            author: &Author<'_>,
            verdict: Verdict,
            comment: Option<String>,
            agent_username: &str,
            killed: bool,
            now: Timestamp,
        ) -> Result<ApprovalRequest, DeskError> {
            let new = self.propose(
                full_name,
                author,
                verdict,
                comment,
                agent_username,
                killed,
                now,
            )?;
            self.commit(new.clone())?;
            Ok(new)
        }
    }

    #[test]
    fn decisions_are_stamped_checked_and_settle_the_phase() {
        let desk = LocalDesk::default();
        let now = at("2026-12-01T12:00:00Z");
        let created = desk.create(request("2026-12-01T12:05:00Z"), now).unwrap();
        let name = format!("ns/{}", created.metadata.name.clone().unwrap());
        assert!(name.starts_with("ns/send-") && name.len() == "ns/send-".len() + 5);
        let leads = vec!["leads".to_owned()];
        let bob = Author {
            username: "bob",
            groups: &leads,
        };
        let carol = Author {
            username: "carol",
            groups: &[],
        };
        let refused = desk
            .decide(
                &name,
                &carol,
                Verdict::Approve,
                None,
                "apikey:agent",
                false,
                now,
            )
            .unwrap_err();
        assert!(refused.to_string().contains("not an approver"), "{refused}");
        let one = desk
            .decide(
                &name,
                &bob,
                Verdict::Approve,
                Some("ok".into()),
                "apikey:agent",
                false,
                now,
            )
            .unwrap();
        assert_eq!(one.spec.decisions[0].user.as_deref(), Some("bob"));
        assert_eq!(one.status.as_ref().unwrap().phase, Phase::Pending);
        let again = desk
            .decide(
                &name,
                &bob,
                Verdict::Approve,
                None,
                "apikey:agent",
                false,
                now,
            )
            .unwrap_err();
        assert!(again.to_string().contains("already decided"), "{again}");
        let dana = Author {
            username: "dana",
            groups: &[],
        };
        let two = desk
            .decide(
                &name,
                &dana,
                Verdict::Approve,
                None,
                "apikey:agent",
                false,
                now,
            )
            .unwrap();
        assert_eq!(two.status.as_ref().unwrap().phase, Phase::Approved);
        let late = desk
            .decide(
                &name,
                &Author {
                    username: "erin",
                    groups: &leads,
                },
                Verdict::Deny,
                None,
                "x",
                false,
                now,
            )
            .unwrap_err();
        assert!(late.to_string().contains("final"), "{late}");
        assert_eq!(
            desk.decide("ns/none", &bob, Verdict::Deny, None, "x", false, now),
            Err(DeskError::NotFound("ns/none".into()))
        );
    }

    #[test]
    fn a_decision_proposed_from_a_stale_request_is_not_committed() {
        let desk = LocalDesk::default();
        let now = at("2026-12-01T12:00:00Z");
        let name = desk
            .create(request("2026-12-01T12:05:00Z"), now)
            .unwrap()
            .metadata
            .name
            .unwrap();
        let full = format!("ns/{name}");
        let leads = vec!["leads".to_owned()];
        let (bob, erin) = (
            Author {
                username: "bob",
                groups: &leads,
            },
            Author {
                username: "erin",
                groups: &leads,
            },
        );
        let first = desk
            .propose(&full, &bob, Verdict::Approve, None, "x", false, now)
            .unwrap();
        let second = desk
            .propose(&full, &erin, Verdict::Approve, None, "x", false, now)
            .unwrap();
        desk.commit(first).unwrap();
        let stale = desk.commit(second).unwrap_err();
        assert!(stale.to_string().contains("changed while"), "{stale}");
        assert_eq!(desk.get(&full, now).unwrap().spec.decisions.len(), 1);
    }

    #[test]
    fn undecided_requests_expire_and_are_forgotten_an_hour_later() {
        let desk = LocalDesk::default();
        let now = at("2026-12-01T12:00:00Z");
        let created = desk.create(request("2026-12-01T12:05:00Z"), now).unwrap();
        let name = format!("ns/{}", created.metadata.name.unwrap());
        let later = at("2026-12-01T12:05:00Z");
        assert_eq!(
            desk.get(&name, later).unwrap().status.unwrap().phase,
            Phase::Expired
        );
        let leads = vec!["leads".to_owned()];
        let bob = Author {
            username: "bob",
            groups: &leads,
        };
        assert!(
            desk.decide(&name, &bob, Verdict::Approve, None, "x", false, later)
                .is_err()
        );
        // Forgotten when the next request is created an hour after the end.
        desk.create(request("2026-12-01T14:00:00Z"), at("2026-12-01T13:06:00Z"))
            .unwrap();
        assert!(desk.get(&name, at("2026-12-01T13:06:00Z")).is_none());
    }

    #[test]
    fn a_kill_switch_denies_the_agents_open_requests() {
        let desk = LocalDesk::default();
        let now = at("2026-12-01T12:00:00Z");
        let name = desk
            .create(request("2026-12-01T12:05:00Z"), now)
            .unwrap()
            .metadata
            .name
            .unwrap();
        assert_eq!(desk.cancel_agent("other/agent", now), 0);
        assert_eq!(desk.cancel_agent("ns/agent", now), 1);
        let status = desk
            .get(&format!("ns/{name}"), now)
            .unwrap()
            .status
            .unwrap();
        assert_eq!(
            (status.phase, status.reason.as_deref()),
            (Phase::Denied, Some("KillSwitch"))
        );
    }
}
