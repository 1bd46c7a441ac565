//! Leader election on a coordination.k8s.io Lease: one replica runs the controllers, the others
//! wait. Every write is a replace at the resourceVersion just read, so two replicas can never
//! both believe they hold the lease; a holder that cannot renew before the lease runs out stops.

use std::time::Duration;
use tollgate_runtime::cluster::{CALL_DEADLINE, bounded, bounded_by};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};

/// Lease timing.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a lease holds without renewal.
    pub duration: Duration,
    /// How often the holder renews, and how often a candidate retries.
    pub renew_every: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }
}

/// Why leadership ended.
#[derive(Debug, thiserror::Error)]
pub enum Lost {
    /// Another replica holds the lease now.
    #[error("lease {lease} is now held by {holder}")]
    TakenOver {
        /// The lease.
        lease: String,
        /// Its holder.
        holder: String,
    },
    /// Renewal failed for longer than the lease lasts.
    #[error("lease {lease} could not be renewed before it ran out: {error}")]
    Expired {
        /// The lease.
        lease: String,
        /// The last error.
        error: kube::Error,
    },
}

/// One candidate for the lease `name` in `namespace`.
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    holder: String,
    timing: Timing,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("name", &self.name)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

enum Attempt {
    Held,
    HeldBy(String),
}

impl Elector {
    /// A candidate named `holder` (its pod name).
    pub fn new(client: Client, namespace: &str, name: &str, holder: &str, timing: Timing) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            holder: holder.to_owned(),
            timing,
        }
    }

    /// Waits until this candidate holds the lease.
    pub async fn acquire(&self) {
        let mut logged = None;
        loop {
            match bounded(self.try_acquire()).await {
                Ok(Attempt::Held) => {
                    tracing::info!(lease = %self.name, holder = %self.holder, "leading");
                    return;
                }
                Ok(Attempt::HeldBy(holder)) => {
                    if logged.as_ref() != Some(&holder) {
                        tracing::info!(lease = %self.name, %holder, "standing by");
                        logged = Some(holder);
                    }
                }
                Err(e) => tracing::warn!(lease = %self.name, error = %e, "lease not acquired"),
            }
            tokio::time::sleep(self.timing.renew_every).await;
        }
    }

    /// Renews the lease until it is lost; never returns while leading. Each renewal must end
    /// before the lease could run out, whatever the apiserver does: one that hangs is given up
    /// at that point, and leadership with it (a lease renewed with no deadline could leave two
    /// replicas leading, the one stuck in its call and the one that took the lease over).
    pub async fn hold(&self) -> Lost {
        // Stop a little before the lease runs out, so no other replica can lead while this one
        // still acts.
        let margin = self.timing.duration.saturating_sub(self.timing.renew_every);
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.timing.renew_every).await;
            let left = margin.saturating_sub(last_renewal.elapsed());
            let attempt = bounded_by(left.min(CALL_DEADLINE), self.try_acquire()).await;
            match attempt {
                Ok(Attempt::Held) => last_renewal = tokio::time::Instant::now(),
                Ok(Attempt::HeldBy(holder)) => {
                    return Lost::TakenOver {
                        lease: self.name.clone(),
                        holder,
                    };
                }
                Err(error) => {
                    if last_renewal.elapsed() >= margin {
                        return Lost::Expired {
                            lease: self.name.clone(),
                            error,
                        };
                    }
                    tracing::warn!(lease = %self.name, %error, "lease renewal failed; retrying");
                }
            }
        }
    }

    /// Gives the lease up so a standby takes over at once (on graceful shutdown).
    pub async fn release(&self) {
        let Ok(mut lease) = bounded(self.api.get(&self.name)).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        match bounded(self.api.replace(&self.name, &PostParams::default(), &lease)).await {
            Ok(_) => tracing::info!(lease = %self.name, "lease released"),
            Err(e) => tracing::warn!(lease = %self.name, error = %e, "lease not released"),
        }
    }

    async fn try_acquire(&self) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        let seconds = i32::try_from(self.timing.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.holder.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Held),
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    Ok(Attempt::HeldBy("another replica".into()))
                }
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.holder.as_str());
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(renewed), Some(duration)) => {
                renewed.0 + SignedDuration::from_secs(i64::from(duration)) <= now
            }
            _ => true,
        };
        if !ours && holder.is_some() && !expired {
            return Ok(Attempt::HeldBy(holder.unwrap_or_default()));
        }
        if !ours {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.holder.clone());
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(seconds);
        let name = lease.name_any();
        match self
            .api
            .replace(&name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Held),
            // Someone wrote the lease since we read it: whoever it was, it is not ours now.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                Ok(Attempt::HeldBy("another replica".into()))
            }
            Err(e) => Err(e),
        }
    }
}
