//! Refusals of requests that proved no identity (no credential, or one nobody issued), summarized.
//!
//! Anyone who can reach the gateway can send those, as fast as they like, and each would cost a
//! durable record (an fsync, or a share of one) and room in the trail: a way to fill the audit
//! disk without a credential. So per route and code, the first such refusal of an interval is
//! recorded in full at once, as every refusal was before, and the others of that interval are
//! counted and recorded as one summary when it ends: how many, between which times, and the last
//! one's reason. Every refusal is still in the trail; an attacker costs it one record per route
//! and code per interval, not one per request. Refusals of anyone whose identity is known (an
//! agent, or a person whose token names them) are recorded one by one as always.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use jiff::Timestamp;
use tollgate_audit::{AuditLog, Entry, Event, Identity};

use crate::RefusalCode;

/// How long a summary interval lasts by default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// The refusals of one route and code in the current interval.
#[derive(Debug, Default)]
struct Pending {
    /// Refusals counted since the one recorded in full.
    counted: u64,
    first_us: i64,
    last_us: i64,
    last: String,
}

/// Per route (`/v1/decide`, `/mcp`, …) and code, what the interval has seen.
#[derive(Debug, Default)]
struct Interval {
    seen: BTreeMap<(&'static str, &'static str), Pending>,
    flusher: bool,
}

/// The summarizer. One per gateway.
#[derive(Debug)]
pub(crate) struct Anonymous {
    interval: Duration,
    current: Mutex<Interval>,
}

/// What to do with one refusal.
pub(crate) enum Note {
    /// Record it now, in full: the first of its route and code in this interval.
    Record,
    /// Counted: it goes into the interval's summary.
    Counted,
}

impl Anonymous {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval: interval.max(Duration::from_millis(1)),
            current: Mutex::default(),
        }
    }

    /// Whether the task that writes the summaries must be started (once: the first call says
    /// yes, every later one no).
    pub(crate) fn start_flusher(&self) -> bool {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        !std::mem::replace(&mut current.flusher, true)
    }

    /// Whether a refusal of `code` at `route` must be recorded now, or is counted for the
    /// interval's summary.
    pub(crate) fn note(
        &self,
        route: &'static str,
        code: RefusalCode,
        reason: &str,
        now: Timestamp,
    ) -> Note {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let now_us = now.as_microsecond();
        match current.seen.entry((route, code.as_str())) {
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(Pending {
                    first_us: now_us,
                    last_us: now_us,
                    ..Pending::default()
                });
                Note::Record
            }
            std::collections::btree_map::Entry::Occupied(mut slot) => {
                let pending = slot.get_mut();
                if pending.counted == 0 {
                    pending.first_us = now_us;
                }
                pending.counted += 1;
                pending.last_us = now_us;
                reason.clone_into(&mut pending.last);
                Note::Counted
            }
        }
    }

    /// Writes each interval's summaries to `audit`, for ever.
    pub(crate) async fn flush_every_interval(&self, audit: AuditLog) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            for entry in self.take(Timestamp::now()) {
                if let Err(e) = audit.append(entry).await {
                    tracing::error!(error = %e, "a summary of refused anonymous requests was not recorded");
                }
            }
        }
    }

    /// The summaries of the interval that ends now, and a fresh interval.
    fn take(&self, now: Timestamp) -> Vec<Entry> {
        let seen = std::mem::take(&mut self.current.lock().unwrap_or_else(|e| e.into_inner()).seen);
        seen.into_iter()
            .filter(|(_, pending)| pending.counted > 0)
            .map(|((route, code), pending)| {
                let mut entry = Entry::new(
                    now,
                    Event::Rejected,
                    Identity {
                        username: "anonymous".to_owned(),
                        ..Identity::default()
                    },
                );
                let from = Timestamp::from_microsecond(pending.first_us).unwrap_or(now);
                let to = Timestamp::from_microsecond(pending.last_us).unwrap_or(now);
                entry.error = Some(format!(
                    "{route}: {code}: {} more refused from {from} to {to} (summarized; the first of the interval is recorded in full); the last: {}",
                    pending.counted, pending.last
                ));
                entry
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_an_interval_is_recorded_and_the_rest_summarized_per_route_and_code() {
        let anonymous = Anonymous::new(Duration::from_secs(3600));
        assert!(anonymous.start_flusher());
        assert!(!anonymous.start_flusher(), "one flusher");
        let t = |s: i64| Timestamp::from_second(1_800_000_000 + s).unwrap();
        let note = |route, code, at| {
            matches!(
                anonymous.note(route, code, "no credential", t(at)),
                Note::Record
            )
        };
        assert!(note("/v1/decide", RefusalCode::Unauthenticated, 0));
        for at in 1..=999 {
            assert!(!note("/v1/decide", RefusalCode::Unauthenticated, at));
        }
        assert!(note("/mcp", RefusalCode::Unauthenticated, 5));
        assert!(note(
            "/v1/decide",
            RefusalCode::AuthenticationUnavailable,
            6
        ));
        let summaries = anonymous.take(t(1000));
        assert_eq!(summaries.len(), 1, "only what was counted is summarized");
        let text = summaries[0].error.as_deref().unwrap();
        assert!(
            text.starts_with("/v1/decide: Unauthenticated: 999 more refused from ")
                && text.ends_with("the last: no credential"),
            "{text}"
        );
        assert_eq!(summaries[0].identity.username, "anonymous");
        // A new interval: the first is recorded in full again.
        assert!(note("/v1/decide", RefusalCode::Unauthenticated, 1001));
        assert!(anonymous.take(t(1002)).is_empty());
    }
}
