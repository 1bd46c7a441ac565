//! The pre-production checklist, per agent: ten items, each pass, fail or unknown, with the
//! reason. `kubectl tollgate doctor --checklist` gathers what a cluster says ([`Observed`]); from
//! manifests alone, what only a cluster can say is unknown, never assumed.
//!
//! The items: a dedicated ServiceAccount; scope documented and limited (a description, rules
//! and tools without wildcards, drift empty or explained); a blocked list; the enforcement point
//! in the path (agent pods admitted with the gateway URL, egress confined); execution bounds;
//! approval on every irreversible tool; audit on; the kill switch drilled within 30 days; drift
//! audited; escalation naming people.

use jiff::{SignedDuration, Timestamp};
use tollgate_crds::{AgentIdentity, AgentPolicy};

/// An item's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Holds.
    Pass,
    /// Does not hold; the reason says what to do.
    Fail,
    /// Cannot be told from what was read.
    Unknown,
}

impl Mark {
    /// The word printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Mark::Pass => "pass",
            Mark::Fail => "FAIL",
            Mark::Unknown => "unknown",
        }
    }
}

/// One item of the checklist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// 1 to 10.
    pub number: u8,
    /// What the item asks.
    pub title: &'static str,
    /// The verdict.
    pub mark: Mark,
    /// Why, in words.
    pub why: String,
}

/// An agent pod as a cluster has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// Its name.
    pub name: String,
    /// The ServiceAccount it runs as.
    pub service_account: String,
    /// Whether its containers were given TOLLGATE_URL (admission's injection).
    pub gateway_url: bool,
}

/// What a cluster says about one agent, beyond its two objects.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Whether the ServiceAccount the identity's status names exists.
    pub service_account_exists: bool,
    /// Other identities whose ServiceAccount is the same one.
    pub sharing_service_account: Vec<String>,
    /// The pods its podSelector selects.
    pub pods: Vec<Pod>,
    /// Whether its NetworkPolicy (egress isolation) exists.
    pub egress_policy: bool,
    /// Whether a gateway replica is available (`None`: not readable).
    pub gateway_available: Option<bool>,
}

/// How recent a kill-switch drill must be.
pub const DRILL_WITHIN: SignedDuration = SignedDuration::from_hours(30 * 24);
/// How recent a drift evaluation must be.
pub const DRIFT_WITHIN: SignedDuration = SignedDuration::from_hours(48);
/// The annotation that explains a drift people accept, such as `tools kept for the Q1 rollout`.
pub const DRIFT_EXPLAINED: &str = "tollgate.dev/drift-explained";

fn item(number: u8, title: &'static str, mark: Mark, why: impl Into<String>) -> Item {
    Item {
        number,
        title,
        mark,
        why: why.into(),
    }
}

/// The ten items for `identity` and its `policy` (None: it has none), with what a cluster says
/// (`observed`; None from manifests alone), at `now`.
pub fn checklist(
    identity: &AgentIdentity,
    policy: Option<&AgentPolicy>,
    observed: Option<&Observed>,
    now: Timestamp,
) -> Vec<Item> {
    let no_policy = || "no AgentPolicy names this identity".to_owned();
    vec![
        service_account(identity, observed),
        scope(identity, policy, observed, now),
        match policy {
            Some(p) if !p.spec.tools.blocked.is_empty() => item(
                3,
                "blocked list present",
                Mark::Pass,
                format!("{} tool(s) blocked", p.spec.tools.blocked.len()),
            ),
            Some(_) => item(
                3,
                "blocked list present",
                Mark::Fail,
                "spec.tools.blocked is empty: name the tools this agent must never call, even if an upstream offers them",
            ),
            None => item(3, "blocked list present", Mark::Fail, no_policy()),
        },
        enforcement(identity, observed),
        bounds(policy),
        approvals(policy),
        audit(observed),
        drill(identity, observed, now),
        drift(policy, observed, now),
        escalation(policy),
    ]
}

fn service_account(identity: &AgentIdentity, observed: Option<&Observed>) -> Item {
    const TITLE: &str = "dedicated ServiceAccount";
    let expected = identity.service_account_name();
    let Some(observed) = observed else {
        return item(
            1,
            TITLE,
            Mark::Unknown,
            format!("not applied: the operator creates {expected} for this identity alone"),
        );
    };
    let status = identity
        .status
        .as_ref()
        .and_then(|s| s.service_account_name.clone());
    match status {
        None => item(
            1,
            TITLE,
            Mark::Fail,
            "the operator has not reported a ServiceAccount (is it running? see kubectl tollgate doctor)",
        ),
        Some(_) if !observed.service_account_exists => item(
            1,
            TITLE,
            Mark::Fail,
            format!("ServiceAccount {expected} does not exist"),
        ),
        Some(_) if !observed.sharing_service_account.is_empty() => item(
            1,
            TITLE,
            Mark::Fail,
            format!(
                "ServiceAccount {expected} is shared with {}",
                observed.sharing_service_account.join(", ")
            ),
        ),
        Some(name) => item(
            1,
            TITLE,
            Mark::Pass,
            format!("{name}, used by no other agent"),
        ),
    }
}

fn scope(
    identity: &AgentIdentity,
    policy: Option<&AgentPolicy>,
    observed: Option<&Observed>,
    now: Timestamp,
) -> Item {
    const TITLE: &str = "scope documented and limited";
    let mut wrong = Vec::new();
    if identity.spec.description.trim().is_empty() {
        wrong.push("the identity has no description".to_owned());
    }
    for (i, rule) in identity.spec.kubernetes.rules.iter().enumerate() {
        let wild = |values: &[String]| values.iter().any(|v| v == "*");
        if wild(&rule.verbs) || wild(&rule.resources) || wild(&rule.api_groups) {
            wrong.push(format!("spec.kubernetes.rules[{i}] uses a wildcard"));
        }
    }
    let Some(policy) = policy else {
        return item(2, TITLE, Mark::Fail, "no AgentPolicy names this identity");
    };
    if policy.spec.tools.allowed.is_empty() {
        wrong.push("the policy allows no tools".to_owned());
    }
    if !wrong.is_empty() {
        return item(2, TITLE, Mark::Fail, wrong.join("; "));
    }
    let stated = format!(
        "{} Kubernetes rule(s), {} allowed tool(s)",
        identity.spec.kubernetes.rules.len(),
        policy.spec.tools.allowed.len()
    );
    if observed.is_none() {
        return item(
            2,
            TITLE,
            Mark::Unknown,
            format!("{stated}; drift is known once the gateway has audited calls in a cluster"),
        );
    }
    let explained = policy
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DRIFT_EXPLAINED))
        .filter(|why| !why.trim().is_empty());
    match fresh_drift(policy, now) {
        Some(unused) if unused.is_empty() => {
            item(2, TITLE, Mark::Pass, format!("{stated}; no drift"))
        }
        Some(unused) => match explained {
            Some(why) => item(
                2,
                TITLE,
                Mark::Pass,
                format!("{stated}; unused {} explained: {why}", unused.join(", ")),
            ),
            None => item(
                2,
                TITLE,
                Mark::Fail,
                format!(
                    "{stated}; unused tool(s) {}: remove them, or say why in the annotation {DRIFT_EXPLAINED}",
                    unused.join(", ")
                ),
            ),
        },
        None => item(
            2,
            TITLE,
            Mark::Unknown,
            format!("{stated}; no recent drift evaluation (item 9)"),
        ),
    }
}

/// The unused tools of a drift evaluation within [`DRIFT_WITHIN`], if there is one.
fn fresh_drift(policy: &AgentPolicy, now: Timestamp) -> Option<Vec<String>> {
    let drift = policy.status.as_ref()?.drift.as_ref()?;
    let at = drift.evaluated_at.as_ref()?.0;
    (now.duration_since(at) <= DRIFT_WITHIN).then(|| drift.unused_tools.clone())
}

fn enforcement(identity: &AgentIdentity, observed: Option<&Observed>) -> Item {
    const TITLE: &str = "enforcement point in the path";
    let Some(observed) = observed else {
        return item(
            4,
            TITLE,
            Mark::Unknown,
            "not applied: admission gives agent pods the gateway URL and the operator confines egress",
        );
    };
    let expected = identity.service_account_name();
    let mut wrong = Vec::new();
    if !observed.egress_policy {
        wrong.push("its egress NetworkPolicy does not exist".to_owned());
    }
    for pod in &observed.pods {
        if !pod.gateway_url {
            wrong.push(format!(
                "pod {} was not given TOLLGATE_URL (admitted before the webhook?)",
                pod.name
            ));
        }
        if pod.service_account != expected {
            wrong.push(format!(
                "pod {} runs as {}, not {expected}",
                pod.name, pod.service_account
            ));
        }
    }
    if !wrong.is_empty() {
        return item(4, TITLE, Mark::Fail, wrong.join("; "));
    }
    if observed.pods.is_empty() {
        return item(
            4,
            TITLE,
            Mark::Unknown,
            "egress confined; no pod of the agent runs yet to check",
        );
    }
    item(
        4,
        TITLE,
        Mark::Pass,
        format!(
            "{} pod(s) admitted with the gateway URL as {expected}; egress confined",
            observed.pods.len()
        ),
    )
}

fn bounds(policy: Option<&AgentPolicy>) -> Item {
    const TITLE: &str = "execution bounds set";
    let Some(policy) = policy else {
        return item(5, TITLE, Mark::Fail, "no AgentPolicy names this identity");
    };
    let Some(e) = &policy.spec.execution else {
        return item(
            5,
            TITLE,
            Mark::Fail,
            "no spec.execution: cap steps, tokens, wall clock and cost per run",
        );
    };
    let missing: Vec<&str> = [
        ("maxSteps", e.max_steps.is_none()),
        ("maxTokensPerRun", e.max_tokens_per_run.is_none()),
        ("maxWallClockSeconds", e.max_wall_clock_seconds.is_none()),
        ("maxCostUSD", e.max_cost_usd.is_none()),
    ]
    .into_iter()
    .filter_map(|(name, absent)| absent.then_some(name))
    .collect();
    if missing.is_empty() {
        item(
            5,
            TITLE,
            Mark::Pass,
            "steps, tokens, wall clock and cost per run are capped",
        )
    } else {
        item(
            5,
            TITLE,
            Mark::Fail,
            format!("spec.execution lacks {}", missing.join(", ")),
        )
    }
}

fn approvals(policy: Option<&AgentPolicy>) -> Item {
    const TITLE: &str = "approval on every irreversible tool";
    let Some(policy) = policy else {
        return item(6, TITLE, Mark::Fail, "no AgentPolicy names this identity");
    };
    let irreversible: Vec<_> = policy
        .spec
        .tools
        .allowed
        .iter()
        .filter(|t| t.irreversible)
        .collect();
    let unguarded: Vec<&str> = irreversible
        .iter()
        .filter(|t| t.approval.is_none())
        .map(|t| t.name.as_str())
        .collect();
    if !unguarded.is_empty() {
        return item(
            6,
            TITLE,
            Mark::Fail,
            format!("irreversible without approval: {}", unguarded.join(", ")),
        );
    }
    if irreversible.is_empty() {
        return item(
            6,
            TITLE,
            Mark::Pass,
            "no tool is marked irreversible (mark every tool whose effect cannot be undone)",
        );
    }
    item(
        6,
        TITLE,
        Mark::Pass,
        format!(
            "{} irreversible tool(s), each waits for people",
            irreversible.len()
        ),
    )
}

fn audit(observed: Option<&Observed>) -> Item {
    const TITLE: &str = "audit on";
    match observed.and_then(|o| o.gateway_available) {
        Some(true) => item(
            7,
            TITLE,
            Mark::Pass,
            "a gateway replica is available; it records every call before it answers",
        ),
        Some(false) => item(
            7,
            TITLE,
            Mark::Fail,
            "no gateway replica is available: calls are neither decided nor recorded",
        ),
        None => item(
            7,
            TITLE,
            Mark::Unknown,
            "the gateway's Deployment was not read",
        ),
    }
}

fn drill(identity: &AgentIdentity, observed: Option<&Observed>, now: Timestamp) -> Item {
    const TITLE: &str = "kill switch drilled within 30 days";
    let last = identity
        .status
        .as_ref()
        .and_then(|s| s.last_kill_switch_drill.as_ref())
        .map(|t| t.0);
    let name = identity.metadata.name.as_deref().unwrap_or_default();
    match (last, observed) {
        (Some(at), _) if now.duration_since(at) <= DRILL_WITHIN => {
            item(8, TITLE, Mark::Pass, format!("last drilled {at}"))
        }
        (Some(at), _) => item(
            8,
            TITLE,
            Mark::Fail,
            format!("last drilled {at}, more than 30 days ago: kubectl tollgate drill {name}"),
        ),
        (None, Some(_)) => item(
            8,
            TITLE,
            Mark::Fail,
            format!("never drilled: kubectl tollgate drill {name}"),
        ),
        (None, None) => item(8, TITLE, Mark::Unknown, "drills are recorded in a cluster"),
    }
}

fn drift(policy: Option<&AgentPolicy>, observed: Option<&Observed>, now: Timestamp) -> Item {
    const TITLE: &str = "drift audited";
    let Some(policy) = policy else {
        return item(9, TITLE, Mark::Fail, "no AgentPolicy names this identity");
    };
    if observed.is_none() {
        return item(
            9,
            TITLE,
            Mark::Unknown,
            "the gateway evaluates drift from the audit trail in a cluster",
        );
    }
    let evaluated = policy
        .status
        .as_ref()
        .and_then(|s| s.drift.as_ref())
        .and_then(|d| d.evaluated_at.as_ref())
        .map(|t| t.0);
    match evaluated {
        Some(at) if now.duration_since(at) <= DRIFT_WITHIN => {
            item(9, TITLE, Mark::Pass, format!("evaluated {at}"))
        }
        Some(at) => item(
            9,
            TITLE,
            Mark::Fail,
            format!("last evaluated {at}: is the gateway's standing writer running?"),
        ),
        None => item(
            9,
            TITLE,
            Mark::Fail,
            "never evaluated: the gateway writes status.drift on its standing schedule",
        ),
    }
}

fn escalation(policy: Option<&AgentPolicy>) -> Item {
    const TITLE: &str = "escalation names people";
    let Some(policy) = policy else {
        return item(10, TITLE, Mark::Fail, "no AgentPolicy names this identity");
    };
    let mut wrong = Vec::new();
    let default = tollgate_crds::policy::BudgetBreach::default();
    let breach = policy
        .spec
        .execution
        .as_ref()
        .map_or(&default, |e| &e.on_budget_exceeded);
    if breach.contacts.is_empty() {
        wrong.push(if breach.notify.is_empty() {
            "onBudgetExceeded names nobody".to_owned()
        } else {
            format!(
                "onBudgetExceeded names only channels ({}); add contacts: people with how to reach them",
                breach.notify.join(", ")
            )
        });
    }
    for tool in &policy.spec.tools.allowed {
        if let Some(approval) = &tool.approval
            && approval.contacts.is_empty()
            && approval.approvers.users.is_empty()
        {
            wrong.push(format!(
                "the approval of {} names only groups; add contacts (or approvers.users)",
                tool.name
            ));
        }
    }
    if !wrong.is_empty() {
        return item(10, TITLE, Mark::Fail, wrong.join("; "));
    }
    let people: Vec<&str> = breach.contacts.iter().map(|c| c.name.as_str()).collect();
    item(
        10,
        TITLE,
        Mark::Pass,
        format!("breaches reach {}", people.join(", ")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> (AgentIdentity, AgentPolicy) {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/samples/support-agent.yaml"
        ))
        .unwrap();
        let mut identity = None;
        let mut policy = None;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document).unwrap();
            match value["kind"].as_str() {
                Some("AgentIdentity") => identity = Some(serde_yaml::from_value(value).unwrap()),
                Some("AgentPolicy") => policy = Some(serde_yaml::from_value(value).unwrap()),
                _ => {}
            }
        }
        (identity.unwrap(), policy.unwrap())
    }

    use serde::Deserialize as _;

    fn marks(items: &[Item]) -> Vec<(u8, Mark)> {
        items.iter().map(|i| (i.number, i.mark)).collect()
    }

    fn now() -> Timestamp {
        "2026-12-07T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn from_manifests_alone_what_a_cluster_would_say_is_unknown() {
        let (identity, policy) = samples();
        let items = checklist(&identity, Some(&policy), None, now());
        assert_eq!(items.len(), 10);
        use Mark::*;
        assert_eq!(
            marks(&items),
            [
                (1, Unknown),
                (2, Unknown),
                (3, Pass),
                (4, Unknown),
                (5, Pass),
                (6, Pass),
                (7, Unknown),
                (8, Unknown),
                (9, Unknown),
                (10, Pass),
            ],
            "{items:#?}"
        );
    }

    #[test]
    fn each_item_fails_with_what_to_do() {
        let (mut identity, mut policy) = samples();
        policy.spec.tools.blocked.clear();
        let execution = policy.spec.execution.as_mut().unwrap();
        execution.max_cost_usd = None;
        execution.on_budget_exceeded.contacts.clear();
        policy.spec.tools.allowed[2].approval = None;
        identity.spec.kubernetes.rules[0].verbs = vec!["*".into()];
        let observed = Observed {
            service_account_exists: true,
            sharing_service_account: vec!["support/other".into()],
            pods: vec![Pod {
                name: "support-1".into(),
                service_account: "default".into(),
                gateway_url: false,
            }],
            egress_policy: false,
            gateway_available: Some(false),
        };
        identity.status = Some(tollgate_crds::identity::AgentIdentityStatus {
            service_account_name: Some("agent-support-agent-v2".into()),
            last_kill_switch_drill: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-10-01T00:00:00Z".parse().unwrap(),
            )),
            ..Default::default()
        });
        let items = checklist(&identity, Some(&policy), Some(&observed), now());
        let why = |n: usize| items[n - 1].why.clone();
        assert!(items.iter().all(|i| i.mark == Mark::Fail), "{items:#?}");
        assert!(why(1).contains("shared with support/other"), "{}", why(1));
        assert!(why(2).contains("rules[0] uses a wildcard"), "{}", why(2));
        assert!(why(3).contains("spec.tools.blocked is empty"), "{}", why(3));
        assert!(
            why(4).contains("egress NetworkPolicy does not exist"),
            "{}",
            why(4)
        );
        assert!(
            why(4).contains("pod support-1 runs as default"),
            "{}",
            why(4)
        );
        assert!(why(5).contains("lacks maxCostUSD"), "{}", why(5));
        assert!(
            why(6).contains("irreversible without approval: send_customer_email"),
            "{}",
            why(6)
        );
        assert!(why(7).contains("no gateway replica"), "{}", why(7));
        assert!(
            why(8).contains("more than 30 days ago: kubectl tollgate drill support-agent-v2"),
            "{}",
            why(8)
        );
        assert!(why(9).contains("never evaluated"), "{}", why(9));
        assert!(
            why(10).contains("names only channels (oncall-agents)"),
            "{}",
            why(10)
        );
    }

    #[test]
    fn a_cluster_in_order_passes_every_item() {
        let (mut identity, mut policy) = samples();
        identity.status = Some(tollgate_crds::identity::AgentIdentityStatus {
            service_account_name: Some("agent-support-agent-v2".into()),
            last_kill_switch_drill: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-12-01T00:00:00Z".parse().unwrap(),
            )),
            ..Default::default()
        });
        policy.status = Some(tollgate_crds::policy::AgentPolicyStatus {
            drift: Some(tollgate_crds::policy::DriftStatus {
                window: "720h".into(),
                evaluated_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    "2026-12-07T11:00:00Z".parse().unwrap(),
                )),
                unused_tools: vec!["update_order_status".into()],
            }),
            ..Default::default()
        });
        policy.metadata.annotations = Some(
            [(
                DRIFT_EXPLAINED.to_owned(),
                "refunds start in January".to_owned(),
            )]
            .into(),
        );
        let observed = Observed {
            service_account_exists: true,
            sharing_service_account: vec![],
            pods: vec![Pod {
                name: "support-1".into(),
                service_account: "agent-support-agent-v2".into(),
                gateway_url: true,
            }],
            egress_policy: true,
            gateway_available: Some(true),
        };
        let items = checklist(&identity, Some(&policy), Some(&observed), now());
        assert!(items.iter().all(|i| i.mark == Mark::Pass), "{items:#?}");
        assert!(items[1].why.contains("explained: refunds start in January"));
        // The same drift unexplained fails item 2.
        policy.metadata.annotations = None;
        let items = checklist(&identity, Some(&policy), Some(&observed), now());
        assert_eq!(items[1].mark, Mark::Fail, "{:?}", items[1]);
    }
}
