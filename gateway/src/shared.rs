//! Budgets shared live between gateway replicas that write one PostgreSQL trail.
//!
//! Every change of an agent's budget state happens while this process holds the agent's
//! cluster-wide lock, taken just before the state is read (and brought up to date with what
//! other replicas recorded) and released once the records of what was decided are durable. One
//! hold admits every call of the agent that arrives in this process while it lasts (their
//! records share a group commit), up to [`MAX_HOLD`] or [`MAX_ADMITTED`] calls; then new calls
//! wait for the release, so a busy replica cannot keep the others from the agent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tollgate_audit::Entry;

use super::{Refusal, audit_unavailable};

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// How long one hold of an agent's cluster lock admits new calls.
pub const MAX_HOLD: Duration = Duration::from_millis(10);

/// How many calls one hold admits.
pub const MAX_ADMITTED: u32 = 512;

/// Budgets shared live between gateway replicas that write one PostgreSQL trail: a
/// cluster-wide lock per agent, held from before its state is read until the record of what was
/// decided is durable, and the agent's records that other replicas wrote since a position.
pub trait Shared: Send + Sync + 'static {
    /// Waits for the agent's lock; dropping the guard releases it.
    fn lock<'a>(&'a self, agent: &'a str) -> BoxFuture<'a, Result<Box<dyn Send>, String>>;
    /// The position of the agent's latest record.
    fn position<'a>(&'a self, agent: &'a str) -> BoxFuture<'a, Result<i64, String>>;
    /// The agent's entries after `after` written by other chains than `chain`, in order.
    fn after<'a>(
        &'a self,
        agent: &'a str,
        chain: &'a str,
        after: i64,
    ) -> BoxFuture<'a, Result<Vec<(i64, Entry)>, String>>;
}

impl Shared for tollgate_audit::PostgresStore {
    fn lock<'a>(&'a self, agent: &'a str) -> BoxFuture<'a, Result<Box<dyn Send>, String>> {
        Box::pin(async move {
            let lock = self.lock_agent(agent).await.map_err(|e| e.to_string())?;
            Ok(Box::new(lock) as Box<dyn Send>)
        })
    }

    fn position<'a>(&'a self, agent: &'a str) -> BoxFuture<'a, Result<i64, String>> {
        Box::pin(async move { self.agent_position(agent).await.map_err(|e| e.to_string()) })
    }

    fn after<'a>(
        &'a self,
        agent: &'a str,
        chain: &'a str,
        after: i64,
    ) -> BoxFuture<'a, Result<Vec<(i64, Entry)>, String>> {
        Box::pin(async move {
            let records = self
                .agent_records_after(agent, chain, after)
                .await
                .map_err(|e| e.to_string())?;
            records
                .into_iter()
                .map(|(pos, r)| Ok((pos, r.entry().map_err(|e| e.to_string())?)))
                .collect()
        })
    }
}

/// A call's part in its process's hold on the agent's cluster lock: keep it until the call's
/// records are durable. The hold ends when its last call drops its part.
pub(crate) struct Following {
    gate: Option<Arc<Gate>>,
}

impl Following {
    /// No lock: budgets are not shared.
    pub(crate) fn none() -> Self {
        Self { gate: None }
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        if let Some(gate) = self.gate.take() {
            gate.leave();
        }
    }
}

/// Per agent, this process's hold on the agent's cluster lock.
#[derive(Default)]
pub(crate) struct Gates {
    gates: Mutex<HashMap<String, Arc<Gate>>>,
}

impl std::fmt::Debug for Gates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gates").finish_non_exhaustive()
    }
}

#[derive(Default)]
pub(crate) struct Gate {
    hold: Mutex<Hold>,
    /// One process-wide taker of the cluster lock per agent.
    taking: tokio::sync::Mutex<()>,
    /// Signalled when a hold ends.
    released: tokio::sync::Notify,
}

#[derive(Default)]
struct Hold {
    cluster: Option<Box<dyn Send>>,
    calls: usize,
    admitted: u32,
    /// When the hold began admitting calls: set once the catch-up is done.
    since: Option<Instant>,
    closed: bool,
}

impl Gate {
    /// Joins the current hold if it still admits calls.
    fn join(&self) -> Admission {
        let mut hold = self.hold.lock().unwrap_or_else(|e| e.into_inner());
        if hold.cluster.is_none() {
            return Admission::NoHold;
        }
        if hold.since.is_none() {
            return Admission::CatchingUp;
        }
        let expired = hold.since.is_some_and(|t| t.elapsed() >= MAX_HOLD);
        if hold.closed || expired || hold.admitted >= MAX_ADMITTED {
            hold.closed = true;
            return Admission::Closed;
        }
        hold.calls += 1;
        hold.admitted += 1;
        Admission::Admitted
    }

    fn leave(&self) {
        let released = {
            let mut hold = self.hold.lock().unwrap_or_else(|e| e.into_inner());
            hold.calls = hold.calls.saturating_sub(1);
            if hold.calls > 0 {
                return;
            }
            let cluster = hold.cluster.take();
            *hold = Hold::default();
            cluster
        };
        // Dropping the lock releases it (outside the mutex: the release spawns its unlock).
        drop(released);
        self.released.notify_waiters();
    }
}

enum Admission {
    Admitted,
    /// The hold is catching up; its taker holds `taking` until it admits calls.
    CatchingUp,
    Closed,
    NoHold,
}

impl Gates {
    /// Enters a hold of `agent`'s cluster lock: joins the current one, or waits for it to end
    /// and takes the lock, running `fresh` (the catch-up) first when this call starts the hold.
    pub(crate) async fn enter<F, Fut>(
        &self,
        agent: &str,
        shared: &dyn Shared,
        fresh: F,
    ) -> Result<Following, Refusal>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), Refusal>>,
    {
        let gate = self
            .gates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(agent.to_owned())
            .or_default()
            .clone();
        loop {
            let released = gate.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match gate.join() {
                Admission::Admitted => {
                    return Ok(Following {
                        gate: Some(gate.clone()),
                    });
                }
                Admission::CatchingUp => {
                    drop(gate.taking.lock().await);
                    continue;
                }
                Admission::Closed => {
                    released.await;
                    continue;
                }
                Admission::NoHold => {}
            }
            let _taking = gate.taking.lock().await;
            if gate
                .hold
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .cluster
                .is_some()
            {
                continue; // another call of this process took it meanwhile
            }
            let cluster = shared.lock(agent).await.map_err(audit_unavailable)?;
            {
                let mut hold = gate.hold.lock().unwrap_or_else(|e| e.into_inner());
                *hold = Hold {
                    cluster: Some(cluster),
                    calls: 1,
                    admitted: 1,
                    since: None,
                    closed: false,
                };
            }
            let following = Following {
                gate: Some(gate.clone()),
            };
            // Only after catching up may others join; until then the hold admits nobody
            // (a failure drops `following`, which ends the hold).
            fresh().await?;
            gate.hold.lock().unwrap_or_else(|e| e.into_inner()).since = Some(Instant::now());
            return Ok(following);
        }
    }
}
