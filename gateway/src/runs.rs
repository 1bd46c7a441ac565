//! The runs of one agent that the gateway holds in memory, bounded.
//!
//! Every run id an agent sends is a run, and an agent may send as many as it likes, so the
//! gateway cannot keep them all. It does not need to: the audit trail holds every run's budget, and
//! a run that is not in memory is rebuilt from it when its next call comes (one indexed read).
//! So past [`Runs::limit`] runs, the least recently used ones are dropped, a tenth at a time;
//! a dropped run loses nothing. Without a trail to rebuild from, nothing is ever dropped.

use std::collections::HashMap;

use tollgate_engine::RunState;

/// The runs of one agent kept in memory by default.
pub const DEFAULT_LIMIT: usize = 10_000;

#[derive(Debug)]
struct Held {
    state: RunState,
    used: u64,
}

/// One agent's runs in memory, least recently used dropped first past the limit.
#[derive(Debug)]
pub(crate) struct Runs {
    held: HashMap<String, Held>,
    tick: u64,
    limit: usize,
}

impl Runs {
    /// At most `limit` runs (at least 1); `usize::MAX` keeps every run.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            held: HashMap::new(),
            tick: 0,
            limit: limit.max(1),
        }
    }

    fn touch(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// How many runs are held.
    pub(crate) fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether `run` is held.
    pub(crate) fn contains(&self, run: &str) -> bool {
        self.held.contains_key(run)
    }

    /// `run`'s state, marked as used now.
    pub(crate) fn get_mut(&mut self, run: &str) -> Option<&mut RunState> {
        let now = self.touch();
        self.held.get_mut(run).map(|held| {
            held.used = now;
            &mut held.state
        })
    }

    /// `run`'s state, a fresh one when it is not held (only where nothing can rebuild it).
    pub(crate) fn get_or_default(&mut self, run: &str) -> &mut RunState {
        let used = self.touch();
        let held = self.held.entry(run.to_owned()).or_insert_with(|| Held {
            state: RunState::default(),
            used,
        });
        held.used = used;
        &mut held.state
    }

    /// Holds `state` for `run` unless it is held already, then drops the least recently used
    /// runs (never `run`) if past the limit. Returns how many were dropped.
    pub(crate) fn hold(&mut self, run: &str, state: RunState) -> usize {
        let used = self.touch();
        self.held
            .entry(run.to_owned())
            .or_insert(Held { state, used })
            .used = used;
        if self.held.len() <= self.limit {
            return 0;
        }
        // Down to nine tenths of the limit, so that a sort is paid once per tenth of the limit
        // new runs, not per run.
        let keep = self.limit - self.limit / 10;
        let mut by_use: Vec<(u64, String)> = self
            .held
            .iter()
            .filter(|(id, _)| id.as_str() != run)
            .map(|(id, held)| (held.used, id.clone()))
            .collect();
        by_use.sort_unstable();
        let drop = self.held.len().saturating_sub(keep.max(1));
        for (_, id) in by_use.into_iter().take(drop) {
            self.held.remove(&id);
        }
        drop
    }

    /// Every held run, for applying what other replicas recorded.
    pub(crate) fn get_mut_untouched(&mut self, run: &str) -> Option<&mut RunState> {
        self.held.get_mut(run).map(|held| &mut held.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_limit_the_least_recently_used_go_first_never_the_one_just_held() {
        let mut runs = Runs::new(10);
        for i in 0..10 {
            assert_eq!(runs.hold(&format!("r{i}"), RunState::default()), 0);
        }
        // r0 used again: r1 is now the least recently used.
        runs.get_mut("r0").unwrap().steps = 7;
        assert_eq!(runs.hold("r10", RunState::default()), 2);
        assert_eq!(runs.len(), 9);
        assert!(runs.contains("r0") && runs.contains("r10"));
        assert!(!runs.contains("r1") && !runs.contains("r2"));
        assert_eq!(runs.get_mut("r0").unwrap().steps, 7);
        // Holding a run that is held keeps its state.
        runs.hold("r0", RunState::default());
        assert_eq!(runs.get_mut("r0").unwrap().steps, 7);
    }

    #[test]
    fn a_million_run_ids_hold_at_most_the_limit() {
        let mut runs = Runs::new(1_000);
        for i in 0..1_000_000u32 {
            runs.hold(&i.to_string(), RunState::default());
            assert!(runs.len() <= 1_000);
        }
        assert!(runs.contains("999999"));
    }
}
