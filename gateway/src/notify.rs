//! Approvals people see without polling: when the gateway creates an ApprovalRequest whose
//! policy names notification targets (`approval.notify`), it tells them at once (the agent, run
//! and tool, the redacted arguments and their digest, who may decide, the expiry, and the exact
//! commands to approve or deny), again when a fifth of the time is left, and once more with the
//! outcome (approved by whom, denied by whom or by a kill switch, expired).
//!
//! The replica that created the request follows it, through the same watch (or, standalone, the
//! same desk) its waiting calls read, so each request is announced once however many replicas
//! run; a replica that stops takes its reminders and outcomes with it (the request itself, and
//! its decisions, are unaffected). Decisions stay writes to the ApprovalRequest, so admission
//! stamps the real approver: the messages carry commands, never a link that decides.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use serde_json::{Value, json};
use tollgate_crds::ApprovalRequest;
use tollgate_crds::approval::{Phase, Verdict};

use crate::escalate::{Escalation, Notice};

/// Where a followed request is read: the gateway's watch in a cluster, its desk standalone.
#[derive(Clone)]
pub(crate) enum Source {
    Watch {
        store: kube::runtime::reflector::Store<ApprovalRequest>,
        changed: Arc<tokio::sync::Notify>,
    },
    Desk(Arc<crate::desk::LocalDesk>),
}

impl Source {
    fn signal(&self) -> &tokio::sync::Notify {
        match self {
            Source::Watch { changed, .. } => changed,
            Source::Desk(desk) => desk.signal(),
        }
    }

    fn latest(&self, namespace: &str, name: &str, now: Timestamp) -> Option<ApprovalRequest> {
        match self {
            Source::Watch { store, .. } => {
                let reference = kube::runtime::reflector::ObjectRef::new(name).within(namespace);
                store.get(&reference).map(|seen| (*seen).clone())
            }
            Source::Desk(desk) => desk.get(&format!("{namespace}/{name}"), now),
        }
    }
}

/// How people decide a request: the commands the messages carry.
struct Commands {
    approve: String,
    deny: String,
}

impl Commands {
    /// In a cluster, the plugin with the request's namespace; standalone (`gateway` is the
    /// gateway's URL), the plugin against the gateway with the approver's key.
    fn of(request: &ApprovalRequest, gateway: Option<&str>) -> Self {
        let namespace = request.metadata.namespace.as_deref().unwrap_or_default();
        let name = request.metadata.name.as_deref().unwrap_or_default();
        let command = |verb: &str| match gateway {
            Some(url) => format!(
                "TOLLGATE_APPROVER_KEY=<your key> kubectl tollgate {verb} {namespace}/{name} \
                 --gateway {url} -m \"why\""
            ),
            None => format!("kubectl tollgate {verb} {name} -n {namespace} -m \"why\""),
        };
        Commands {
            approve: command("approve"),
            deny: command("deny"),
        }
    }
}

/// The most characters of the arguments a message shows (the event carries them whole).
const SHOWN: usize = 2000;

fn identify(request: &ApprovalRequest) -> (String, String) {
    let namespace = request.metadata.namespace.as_deref().unwrap_or_default();
    (
        format!(
            "{namespace}/{}",
            request.metadata.name.as_deref().unwrap_or_default()
        ),
        format!("{namespace}/{}", request.spec.identity_ref.name),
    )
}

fn approvers(request: &ApprovalRequest) -> String {
    let who = &request.spec.approvers;
    let mut parts = Vec::new();
    if !who.groups.is_empty() {
        parts.push(format!("groups {}", who.groups.join(", ")));
    }
    if !who.users.is_empty() {
        parts.push(format!("users {}", who.users.join(", ")));
    }
    format!(
        "{}; {} distinct approval(s) needed",
        parts.join(" and "),
        request.spec.min_approvals
    )
}

/// The event every notice of `request` carries.
fn event(request: &ApprovalRequest, commands: &Commands, phase: Phase) -> Value {
    let spec = &request.spec;
    json!({
        "request": {
            "namespace": request.metadata.namespace,
            "name": request.metadata.name,
            "agent": spec.identity_ref.name,
            "run": spec.run_id,
            "step": spec.step,
            "tool": spec.tool,
            "arguments": spec.arguments,
            "argumentsDigest": spec.arguments_digest,
            "reason": spec.reason,
            "approvers": spec.approvers,
            "minApprovals": spec.min_approvals,
            "expiresAt": spec.expires_at.0.to_string(),
        },
        "phase": phase,
        "decisions": spec.decisions,
        "commands": {"approve": commands.approve, "deny": commands.deny},
    })
}

fn created(request: &ApprovalRequest, commands: &Commands, now: Timestamp) -> Notice {
    let (name, agent) = identify(request);
    let spec = &request.spec;
    let mut arguments = spec.arguments.to_string();
    if arguments.chars().count() > SHOWN {
        arguments = arguments.chars().take(SHOWN).collect::<String>() + "…";
    }
    let left = spec.expires_at.0.duration_since(now).as_secs().max(0);
    Notice {
        kind: "approval.created",
        text: format!(
            "Tollgate: agent {agent} waits for approval to call {tool} (run {run}, step {step}): \
             {reason}.\nArguments (secrets redacted): {arguments}\nDigest: {digest} (an approval \
             releases exactly these arguments, once)\nWho may decide: {who}\nExpires: {expires} \
             (in {left}s); undecided, the call is denied.\nApprove: {approve}\nDeny:    {deny}\n\
             Request: {name}",
            tool = spec.tool,
            run = spec.run_id,
            step = spec.step,
            reason = spec.reason,
            digest = spec.arguments_digest,
            who = approvers(request),
            expires = spec.expires_at.0,
            approve = commands.approve,
            deny = commands.deny,
        ),
        event: event(request, commands, Phase::Pending),
    }
}

fn reminder(request: &ApprovalRequest, commands: &Commands, now: Timestamp) -> Notice {
    let (name, agent) = identify(request);
    let spec = &request.spec;
    let approvals = spec
        .decisions
        .iter()
        .filter(|d| d.verdict == Verdict::Approve)
        .count();
    let left = spec.expires_at.0.duration_since(now).as_secs().max(0);
    Notice {
        kind: "approval.reminder",
        text: format!(
            "Tollgate reminder: {name} (agent {agent}, tool {tool}, run {run}) is still undecided \
             ({approvals} of {min} approval(s)) and expires at {expires}, in {left}s; then the \
             call is denied.\nApprove: {approve}\nDeny:    {deny}",
            tool = spec.tool,
            run = spec.run_id,
            min = spec.min_approvals,
            expires = spec.expires_at.0,
            approve = commands.approve,
            deny = commands.deny,
        ),
        event: event(request, commands, Phase::Pending),
    }
}

fn outcome(request: &ApprovalRequest, commands: &Commands, phase: Phase) -> Notice {
    let (name, agent) = identify(request);
    let spec = &request.spec;
    let by = |verdict: Verdict| -> String {
        let users: Vec<&str> = spec
            .decisions
            .iter()
            .filter(|d| d.verdict == verdict)
            .filter_map(|d| d.user.as_deref())
            .collect();
        if users.is_empty() {
            "nobody named".to_owned()
        } else {
            users.join(", ")
        }
    };
    let killed = request.status.as_ref().and_then(|s| s.reason.as_deref()) == Some("KillSwitch");
    let what = match phase {
        Phase::Approved => format!(
            "approved by {}: the call is released once, unless a kill switch is engaged",
            by(Verdict::Approve)
        ),
        Phase::Denied if killed => {
            "denied: the agent's kill switch is engaged, so the call is not released".to_owned()
        }
        Phase::Denied => format!("denied by {}: the call is not released", by(Verdict::Deny)),
        Phase::Expired => "expired undecided: the call is denied".to_owned(),
        Phase::Cancelled => "cancelled: the call is not released".to_owned(),
        Phase::Pending => "pending".to_owned(),
    };
    Notice {
        kind: "approval.decided",
        text: format!(
            "Tollgate: {name} (agent {agent}, tool {tool}, run {run}) {what}.",
            tool = spec.tool,
            run = spec.run_id,
        ),
        event: event(request, commands, phase),
    }
}

/// Announces `request` to `targets` and follows it to its end: a reminder when a fifth of its
/// time is left, then its outcome. Runs until the request ends (at most its timeout, a week).
pub(crate) async fn follow(
    source: Source,
    escalation: Arc<Escalation>,
    request: ApprovalRequest,
    targets: Vec<String>,
    now: fn() -> Timestamp,
    gateway: Option<String>,
) {
    let commands = Commands::of(&request, gateway.as_deref());
    escalation
        .deliver(&targets, &created(&request, &commands, now()))
        .await;
    let namespace = request.metadata.namespace.clone().unwrap_or_default();
    let name = request.metadata.name.clone().unwrap_or_default();
    let expires = request.spec.expires_at.0;
    let opened = request
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or_else(now, |t| t.0);
    let remind_at = expires
        .checked_sub(expires.duration_since(opened) / 5)
        .unwrap_or(expires);
    let mut reminded = false;
    let mut latest = request;
    loop {
        let changed = source.signal().notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let at = now();
        if let Some(seen) = source.latest(&namespace, &name, at) {
            latest = seen;
        }
        let phase = tollgate_engine::approval::phase(&latest, at);
        if phase.is_final() {
            escalation
                .deliver(&targets, &outcome(&latest, &commands, phase))
                .await;
            return;
        }
        if !reminded && at >= remind_at {
            reminded = true;
            escalation
                .deliver(&targets, &reminder(&latest, &commands, at))
                .await;
            continue;
        }
        let next = if reminded { expires } else { remind_at };
        let wait = Duration::try_from(next.duration_since(at))
            .unwrap_or_default()
            .clamp(Duration::from_millis(20), Duration::from_secs(1));
        let _ = tokio::time::timeout(wait, changed).await;
    }
}
