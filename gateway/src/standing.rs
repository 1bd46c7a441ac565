//! The gateway writes what its audit trail says of each agent onto the agent's AgentPolicy:
//! `status.tools` (each allowed tool's autonomy, clean completions and incidents in the policy's
//! graduation window, last use, and the autonomy that record makes it eligible for) and
//! `status.drift` (the allowed tools not called in the drift window). Graduation is never
//! applied: people read `eligibleFor` (and an `EligibleForAutonomy` Event on the policy when a
//! tool becomes eligible) and change the policy.
//!
//! It writes with server-side apply as [`MANAGER`], owning only those two fields (the operator
//! owns the conditions and the hash). Every replica evaluates on its own schedule and leaves a
//! policy that another replica evaluated within half the interval for the same tools, so N
//! replicas do not write N times as often.
//!
//! A pass reads only what is new. The trail's counts per agent, tool, event and outcome are kept
//! by the hour: an hour that ended more than [`SETTLED`] ago never changes, so it is read once
//! and kept while a window reaches it; each pass reads the unsettled rest (about an hour). The
//! windows therefore count to the hour: an hour that overlaps a window counts whole. A record
//! committed more than [`SETTLED`] after its own time (a writer frozen for that long between
//! deciding and committing) would be missing from an hour already read, so the kept hours are
//! read again once they are [`REREAD`] old: such a record counts within a day.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tollgate_runtime::cluster::bounded;

use jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use serde_json::json;
use tollgate_audit::standing::{Span, Standing, Windows, of_tallies};
use tollgate_audit::store::ToolTally;
use tollgate_crds::AgentPolicy;
use tollgate_crds::policy::AgentPolicyStatus;
use tollgate_engine::CompiledPolicy;

use super::read::Records;
use tollgate_runtime::cluster::ClusterView;

/// The field manager of the gateway's status writes.
pub const MANAGER: &str = "tollgate-gateway";

/// How long after an hour ends its records are taken to be all committed: a record is
/// timestamped when its call is decided and committed moments later.
pub const SETTLED: Duration = Duration::from_secs(600);

/// How long settled hours are kept before they are read again (see the module's documentation).
pub const REREAD: Duration = Duration::from_secs(24 * 3600);

const HOUR_US: i64 = 3_600_000_000;

/// Settled hours of the trail, counted: by hour start (microseconds), by agent; and when the
/// oldest of those kept was read.
#[derive(Default)]
struct Hours {
    counted: BTreeMap<i64, HashMap<String, Vec<ToolTally>>>,
    read_at: Option<Timestamp>,
}

/// When and over what the gateway evaluates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// How often each policy is evaluated.
    pub interval: Duration,
    /// The drift window, such as `720h`.
    pub window: String,
}

impl Default for Schedule {
    /// Every five minutes, drift over 30 days.
    fn default() -> Self {
        Schedule {
            interval: Duration::from_secs(300),
            window: "720h".to_owned(),
        }
    }
}

/// Writes policies' standing from the trail.
pub struct StatusWriter {
    view: Arc<dyn ClusterView>,
    trail: Arc<dyn Records>,
    client: kube::Client,
    schedule: Schedule,
    now: fn() -> Timestamp,
    hours: tokio::sync::Mutex<Hours>,
    metrics: Option<tollgate_runtime::metrics::Metrics>,
}

impl std::fmt::Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWriter")
            .field("schedule", &self.schedule)
            .finish_non_exhaustive()
    }
}

impl StatusWriter {
    /// A writer for the policies in `view`, reading `trail`, writing with `client` (which may
    /// patch `agentpolicies/status`).
    pub fn new(
        view: Arc<dyn ClusterView>,
        trail: Arc<dyn Records>,
        client: kube::Client,
        schedule: Schedule,
    ) -> Self {
        StatusWriter {
            view,
            trail,
            client,
            schedule,
            now: Timestamp::now,
            hours: Default::default(),
            metrics: None,
        }
    }

    /// Counts each evaluation in `metrics` (`tollgate_gateway_policy_status_total`).
    pub fn with_metrics(mut self, metrics: tollgate_runtime::metrics::Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn count(&self, outcome: &str) {
        if let Some(metrics) = &self.metrics {
            metrics.policy_status.with_label_values(&[outcome]).inc();
        }
    }

    /// Evaluates every policy each interval, forever. A failure is logged and the policy is
    /// tried again at the next interval.
    pub async fn run(self) {
        let mut ticks = tokio::time::interval(self.schedule.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let written = self.once().await;
            tracing::debug!(written = written.len(), "policy standing evaluated");
        }
    }

    /// Evaluates every policy once; returns the policies (`namespace/name`) whose status it
    /// wrote.
    pub async fn once(&self) -> Vec<String> {
        let now = (self.now)();
        let mut written = Vec::new();
        for (policy, standing) in self.standings(now).await {
            let name = format!(
                "{}/{}",
                policy.metadata.namespace.as_deref().unwrap_or_default(),
                policy.metadata.name.as_deref().unwrap_or_default()
            );
            match self.write(&policy, &standing, now).await {
                Ok(true) => {
                    self.count("written");
                    written.push(name);
                }
                Ok(false) => self.count("fresh"),
                Err(e) => {
                    self.count("failed");
                    tracing::warn!(policy = %name, error = %e, "policy standing not written");
                }
            }
        }
        written
    }

    /// The standing of every policy that compiles, at `now`.
    pub async fn standings(&self, now: Timestamp) -> Vec<(Arc<AgentPolicy>, Standing)> {
        let policies: Vec<(Arc<AgentPolicy>, Arc<CompiledPolicy>)> = self
            .view
            .policies()
            .into_iter()
            // A policy that does not compile is left alone: its Ready condition says why, and
            // it has no allowed tools to report.
            .filter_map(|p| self.view.compiled(&p).ok().map(|c| (p, c)))
            .collect();
        let Ok(drift) = tollgate_engine::duration::parse(&self.schedule.window) else {
            tracing::warn!(window = %self.schedule.window, "the drift window does not parse");
            return Vec::new();
        };
        let Some(since) = policies
            .iter()
            .map(|(_, c)| Windows::new(c, drift, now).since_us())
            .min()
        else {
            return Vec::new();
        };
        let mut hours = self.hours.lock().await;
        let live = match self.read(&mut hours, since, now).await {
            Ok(live) => live,
            Err(e) => {
                self.count("unreadable");
                tracing::warn!(error = %e, "the audit trail could not be read for policy standing");
                return Vec::new();
            }
        };
        let mut standings = Vec::new();
        for (policy, compiled) in policies {
            let Some(agent) = compiled.agent() else {
                continue;
            };
            let windows = Windows::new(&compiled, drift, now);
            let overlaps = |start: i64| Span {
                drift: start + HOUR_US > windows.drift_since_us,
                record: start + HOUR_US > windows.record_since_us,
            };
            let everywhere = Span {
                drift: true,
                record: true,
            };
            let rows = hours
                .counted
                .iter()
                .filter_map(|(start, agents)| Some((agents.get(&agent)?, overlaps(*start))))
                .flat_map(|(rows, span)| rows.iter().map(move |r| (r, span)))
                .chain(
                    live.iter()
                        .filter(|r| r.agent == agent)
                        .map(|r| (r, everywhere)),
                );
            let standing = of_tallies(rows, &compiled, &self.schedule.window, now);
            standings.push((policy, standing));
        }
        standings
    }

    /// Brings `hours` up to date for windows reaching back to `since_us`: reads the settled hours
    /// not read yet, drops those no window reaches, and returns the unsettled rest up to `now`.
    async fn read(
        &self,
        hours: &mut Hours,
        since_us: i64,
        now: Timestamp,
    ) -> Result<Vec<ToolTally>, String> {
        let first = since_us.div_euclid(HOUR_US) * HOUR_US;
        let settled_us = i64::try_from(SETTLED.as_micros()).unwrap_or(i64::MAX);
        let end = now
            .as_microsecond()
            .saturating_sub(settled_us)
            .div_euclid(HOUR_US)
            * HOUR_US;
        let reread = i64::try_from(REREAD.as_micros()).unwrap_or(i64::MAX);
        if hours
            .read_at
            .is_none_or(|at| now.as_microsecond().saturating_sub(at.as_microsecond()) >= reread)
        {
            hours.counted.clear();
            hours.read_at = Some(now);
        }
        let counted = &mut hours.counted;
        counted.retain(|start, _| *start >= first && *start < end);
        let mut start = first;
        while start < end {
            if let std::collections::btree_map::Entry::Vacant(hour) = counted.entry(start) {
                let mut by_agent: HashMap<String, Vec<ToolTally>> = HashMap::new();
                for row in self.trail.tallies(start, start + HOUR_US).await? {
                    by_agent.entry(row.agent.clone()).or_default().push(row);
                }
                hour.insert(by_agent);
            }
            start += HOUR_US;
        }
        self.trail
            .tallies(end.max(first), now.as_microsecond().saturating_add(1))
            .await
    }

    /// Writes `standing` onto `policy` unless its status already says it and is fresh.
    async fn write(
        &self,
        policy: &AgentPolicy,
        standing: &Standing,
        now: Timestamp,
    ) -> Result<bool, String> {
        let old = policy.status.clone().unwrap_or_default();
        if fresh(&old, standing, &self.schedule, now) {
            return Ok(false);
        }
        let (Some(namespace), Some(name)) = (&policy.metadata.namespace, &policy.metadata.name)
        else {
            return Ok(false);
        };
        let body = json!({
            "apiVersion": "tollgate.dev/v1alpha1",
            "kind": "AgentPolicy",
            "status": {"tools": standing.tools, "drift": standing.drift},
        });
        bounded(
            Api::<AgentPolicy>::namespaced(self.client.clone(), namespace).patch_status(
                name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(body),
            ),
        )
        .await
        .map_err(|e| format!("writing the status of AgentPolicy {namespace}/{name}: {e}"))?;
        let notes = newly_eligible(&old, standing);
        if !notes.is_empty() {
            let recorder = Recorder::new(
                self.client.clone(),
                Reporter {
                    controller: MANAGER.into(),
                    instance: std::env::var("POD_NAME").ok(),
                },
            );
            let reference = kube::Resource::object_ref(policy, &());
            for note in notes {
                let event = KubeEvent {
                    type_: EventType::Normal,
                    reason: "EligibleForAutonomy".into(),
                    note: Some(note),
                    action: "ReportTrackRecord".into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&event, &reference).await {
                    tracing::warn!(policy = %format!("{namespace}/{name}"), error = %e, "the eligibility Event was not recorded");
                }
            }
        }
        Ok(true)
    }
}

/// What to tell people of tools whose track record makes them eligible for an autonomy they
/// were not eligible for in `old`: one note per tool.
fn newly_eligible(old: &AgentPolicyStatus, standing: &Standing) -> Vec<String> {
    standing
        .tools
        .iter()
        .filter_map(|tool| {
            let eligible = tool.eligible_for?;
            let before = old.tools.iter().find(|t| t.name == tool.name);
            if before.and_then(|t| t.eligible_for) == Some(eligible) {
                return None;
            }
            Some(format!(
                "{}: {} clean completions and {} incidents make it eligible for {eligible:?} (now {}); graduation is never automatic: set spec.tools.allowed[{}].autonomy to grant it",
                tool.name,
                tool.clean_completions,
                tool.incidents,
                tool.autonomy.map_or("-".to_owned(), |a| format!("{a:?}")),
                tool.name,
            ))
        })
        .collect()
}

/// Whether `old` was evaluated within half the interval (by this replica or another) for the
/// same tools and drift window: then its counts are at most half an interval behind and this
/// pass leaves it. Across any number of replicas a policy is written about twice per interval at
/// most, while a change to its tools is written at the next pass.
fn fresh(
    old: &AgentPolicyStatus,
    standing: &Standing,
    schedule: &Schedule,
    now: Timestamp,
) -> bool {
    let Some(drift) = &old.drift else {
        return false;
    };
    let recent = drift
        .evaluated_at
        .as_ref()
        .is_some_and(|at| now.duration_since(at.0).unsigned_abs() < schedule.interval / 2);
    let names = |tools: &[tollgate_crds::policy::ToolStatus]| {
        tools.iter().map(|t| t.name.clone()).collect::<Vec<_>>()
    };
    recent && names(&old.tools) == names(&standing.tools) && drift.window == standing.drift.window
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use jiff::SignedDuration;
    use tollgate_audit::{AuditLog, Entry, Event, Identity, SqliteStore, WriterConfig};
    use tollgate_engine::{Decision, DenyCode, RuleRef};

    use super::*;
    use crate::read::Answer;
    use tollgate_runtime::cluster::StaticView;

    /// The trail, counting the tally queries it answers.
    struct Counted(SqliteStore, AtomicUsize);

    impl Records for Counted {
        fn records<'a>(
            &'a self,
            query: tollgate_audit::Query,
        ) -> Answer<'a, Vec<tollgate_audit::Record>> {
            self.0.records(query)
        }
        fn census<'a>(
            &'a self,
            query: tollgate_audit::Query,
        ) -> Answer<'a, Vec<tollgate_audit::Census>> {
            Records::census(&self.0, query)
        }
        fn tallies<'a>(&'a self, since_us: i64, until_us: i64) -> Answer<'a, Vec<ToolTally>> {
            self.1.fetch_add(1, Ordering::Relaxed);
            Records::tallies(&self.0, since_us, until_us)
        }
    }

    fn decide(time: Timestamp, tool: &str, allow: bool) -> Entry {
        let mut entry = Entry::new(time, Event::Decide, Identity::default());
        entry.agent = Some("shop/support".into());
        entry.run = Some("run-1".into());
        entry.tool = Some(tool.into());
        let rule = RuleRef {
            policy: "shop/support".into(),
            generation: Some(1),
            policy_hash: "sha256:00".into(),
            tool: Some(tool.into()),
            clause: "spec.tools.allowed".into(),
        };
        entry.decision = Some(if allow {
            Decision::Allow {
                rule,
                review: false,
            }
        } else {
            Decision::Deny {
                code: DenyCode::ArgumentConstraint,
                rule,
                message: "refused".into(),
            }
        });
        entry
    }

    #[tokio::test]
    async fn settled_hours_are_read_once_and_windows_count_to_the_hour() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("audit.db")).unwrap();
        let now: Timestamp = "2026-11-27T12:05:00Z".parse().unwrap();
        let (log, _) = AuditLog::open(Arc::new(store.clone()), WriterConfig::new("gw-0"))
            .await
            .unwrap();
        let ago = |minutes: i64| now - SignedDuration::from_mins(minutes);
        // The graduation window is 48h: it starts at 2026-11-25T12:05, inside the hour from
        // 12:00, which overlaps it and counts whole; the hour before does not.
        for (time, tool, allow) in [
            (ago(48 * 60 + 70), "refund", true), // 11:55 on the 25th: not counted
            (ago(48 * 60 + 2), "refund", true),  // 12:03 on the 25th: counted (its hour overlaps)
            (ago(30 * 60), "refund", false),     // an incident, settled
            (ago(3), "refund", true),            // unsettled: read at every pass
            (ago(24 * 60 * 20), "lookup", true), // 20 days ago: in the drift window only
        ] {
            log.append(decide(time, tool, allow)).await.unwrap();
        }
        let policy: AgentPolicy = serde_json::from_value(json!({
            "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentPolicy",
            "metadata": {"name": "support", "namespace": "shop"},
            "spec": {"identityRef": {"name": "support"}, "upstreams": [{"name": "crm"}],
                     "tools": {"allowed": [{"name": "refund"}, {"name": "lookup"}, {"name": "close"}]},
                     "graduation": {"cleanCompletions": 1, "window": "48h"}}
        }))
        .unwrap();
        let view = StaticView {
            policies: vec![Arc::new(policy)],
            ..StaticView::default()
        };
        let trail = Arc::new(Counted(store, AtomicUsize::new(0)));
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap()))
                .unwrap();
        let writer = StatusWriter::new(Arc::new(view), trail.clone(), client, Schedule::default());

        let standing = |s: &Standing, tool: &str| {
            let t = s.tools.iter().find(|t| t.name == tool).unwrap();
            (t.clean_completions, t.incidents)
        };
        let first = writer.standings(now).await;
        let (_, s) = &first[0];
        assert_eq!(standing(s, "refund"), (2, 1));
        assert_eq!(standing(s, "lookup"), (0, 0), "outside the 48h window");
        assert!(
            s.tools
                .iter()
                .find(|t| t.name == "lookup")
                .unwrap()
                .last_used
                .is_some()
        );
        assert_eq!(s.drift.unused_tools, ["close"]);
        // The first pass reads every settled hour of the 30-day drift window once (from 12:00 on
        // 2026-10-28 to 11:00 today: 11:00 to 12:00 ends less than SETTLED before now), then the
        // rest.
        let settled = 719;
        assert_eq!(trail.1.load(Ordering::Relaxed), settled + 1);

        // The next pass reads only the unsettled rest, and says the same.
        let again = writer.standings(now).await;
        assert_eq!(trail.1.load(Ordering::Relaxed), settled + 2);
        assert_eq!(again[0].1, *s);

        // An hour later one more hour has settled and the oldest left the window.
        let later = now + SignedDuration::from_hours(1);
        let third = writer.standings(later).await;
        assert_eq!(trail.1.load(Ordering::Relaxed), settled + 4);
        assert_eq!(
            standing(&third[0].1, "refund"),
            (1, 1),
            "12:03 on the 25th has left"
        );

        // A record committed long after its own time (its writer frozen between deciding and
        // committing) lands in an hour already read: counted once the kept hours are a day old,
        // when every settled hour is read again.
        log.append(decide(ago(5 * 60), "refund", true))
            .await
            .unwrap();
        let stale = writer.standings(later).await;
        assert_eq!(trail.1.load(Ordering::Relaxed), settled + 5);
        assert_eq!(standing(&stale[0].1, "refund"), (1, 1), "not read yet");
        let next_day = now + SignedDuration::from_hours(24);
        let reread = writer.standings(next_day).await;
        assert_eq!(trail.1.load(Ordering::Relaxed), settled + 5 + settled + 1);
        // The 48h window now starts 24h ago: the late record and the unsettled one count, the
        // incident 30h ago no longer does.
        assert_eq!(standing(&reread[0].1, "refund"), (2, 0), "the late record");
        let after = writer.standings(next_day).await;
        assert_eq!(trail.1.load(Ordering::Relaxed), 2 * settled + 7);
        assert_eq!(after[0].1, reread[0].1);
    }

    #[test]
    fn people_hear_once_of_each_tool_that_becomes_eligible() {
        use tollgate_crds::policy::{Autonomy, DriftStatus, ToolStatus};
        let tool = |name: &str, eligible: Option<Autonomy>| ToolStatus {
            name: name.into(),
            autonomy: Some(Autonomy::Gated),
            clean_completions: 200,
            incidents: 0,
            last_used: None,
            eligible_for: eligible,
        };
        let standing = Standing {
            agents: vec![],
            tools: vec![
                tool("refund", Some(Autonomy::ExceptionBased)),
                tool("lookup", Some(Autonomy::ExceptionBased)),
                tool("email", None),
            ],
            drift: DriftStatus::default(),
        };
        let old = AgentPolicyStatus {
            tools: vec![
                tool("lookup", Some(Autonomy::ExceptionBased)),
                tool("refund", None),
            ],
            ..Default::default()
        };
        assert_eq!(
            newly_eligible(&old, &standing),
            [
                "refund: 200 clean completions and 0 incidents make it eligible for ExceptionBased \
              (now Gated); graduation is never automatic: set \
              spec.tools.allowed[refund].autonomy to grant it"
            ]
        );
        let told = AgentPolicyStatus {
            tools: standing.tools.clone(),
            ..Default::default()
        };
        assert!(newly_eligible(&told, &standing).is_empty());
    }

    #[test]
    fn a_status_evaluated_within_half_the_interval_for_the_same_tools_is_left() {
        use tollgate_crds::policy::{DriftStatus, ToolStatus};
        let now: Timestamp = "2026-11-27T12:00:00Z".parse().unwrap();
        let schedule = Schedule::default();
        let tool = |name: &str, clean| ToolStatus {
            name: name.into(),
            clean_completions: clean,
            ..Default::default()
        };
        let status = |minutes_ago: i64, tools: Vec<ToolStatus>| AgentPolicyStatus {
            tools,
            drift: Some(DriftStatus {
                window: "720h".into(),
                evaluated_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    now - SignedDuration::from_mins(minutes_ago),
                )),
                unused_tools: vec![],
            }),
            ..Default::default()
        };
        let standing = Standing {
            agents: vec![],
            tools: vec![tool("lookup", 12), tool("refund", 3)],
            drift: DriftStatus {
                window: "720h".into(),
                ..Default::default()
            },
        };
        // Two minutes ago, counts a little behind: left.
        let behind = vec![tool("lookup", 10), tool("refund", 3)];
        assert!(fresh(&status(2, behind.clone()), &standing, &schedule, now));
        // Three minutes ago is more than half of five: written.
        assert!(!fresh(&status(3, behind), &standing, &schedule, now));
        // A tool added to the policy: written at once.
        assert!(!fresh(
            &status(1, vec![tool("lookup", 12)]),
            &standing,
            &schedule,
            now
        ));
        // Never evaluated: written.
        let never = AgentPolicyStatus {
            tools: standing.tools.clone(),
            ..Default::default()
        };
        assert!(!fresh(&never, &standing, &schedule, now));
    }
}
