//! The chain's writer: numbers, links and seals entries and commits them in groups.
//!
//! Callers [`AuditLog::append`] from any task; one writer task owns the chain's head. It takes the
//! first waiting entry, gathers every entry queued behind it (up to `max_batch`, waiting at most
//! `window` for more), seals them in order and commits them in one transaction. Each caller is
//! answered only after that commit returned: an acknowledged record is durable. If a commit
//! fails, every caller in the batch gets the error and the head does not move. A store that
//! takes several batches at once ([`Store::PIPELINE`]: PostgreSQL) is handed the next batch while
//! the one before commits; it commits them in order and fails every batch sent after one that
//! failed, and the writer answers callers in order. A store whose commits block a thread
//! ([`Store::BLOCKING`]: SQLite) gets a writer on a thread of its own that commits there.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::record::{Checkpoint, Entry, Event, GENESIS, Identity, Prepared, Record};
use crate::store::{Head, Store, StoreError};

/// How a writer batches.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// The chain this writer extends: unique per writer process (the pod name for replicas).
    pub chain: String,
    /// How long the writer waits for more entries after the first one of a batch. Zero (the
    /// default) commits at once; entries that arrive during a commit form the next batch.
    pub window: Duration,
    /// The most entries in one transaction.
    pub max_batch: usize,
    /// How many entries may wait before `append` waits for room.
    pub queue: usize,
    /// Told of every batch the writer hands to the store (metrics). Called on the writer's own
    /// task or thread, between commits: it must not block.
    pub observer: Option<Arc<dyn Observer>>,
}

/// A batch the writer handed to its store, as reported to [`WriterConfig::observer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// The records in it.
    pub records: usize,
    /// How long its oldest entry waited, from `append` until the batch was handed to the store:
    /// the previous commit, the window, sealing.
    pub waited: Duration,
    /// From the hand-off until the store answered: the commit (with a store that takes several
    /// batches at once, also the batches ahead of it).
    pub commit: Duration,
    /// Whether the store committed it; if not, every caller in it got the error.
    pub committed: bool,
}

/// What a writer tells of its batches: commit latency, batch sizes, queueing.
pub trait Observer: Send + Sync + 'static {
    /// One batch has ended, committed or not.
    fn batch(&self, batch: &Batch);
}

impl std::fmt::Debug for dyn Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

/// The longest window a writer accepts.
pub const MAX_WINDOW: Duration = Duration::from_millis(10);

impl WriterConfig {
    /// Defaults for `chain`.
    pub fn new(chain: impl Into<String>) -> Self {
        Self {
            chain: chain.into(),
            window: Duration::ZERO,
            max_batch: 4096,
            queue: 65_536,
            observer: None,
        }
    }

    /// Reports every batch to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }
}

/// Where an appended record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The chain.
    pub chain: Arc<str>,
    /// Its sequence number.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
}

/// Why an append was not acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// The store refused the batch; nothing of it was written.
    #[error("audit record not written: {0}")]
    Store(Arc<str>),
    /// The writer task has stopped.
    #[error("audit writer has stopped")]
    Closed,
}

/// A writer that cannot start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A configuration value is out of range.
    #[error("audit writer configuration: {0}")]
    Config(String),
}

struct Job {
    entry: Prepared,
    /// When `append` queued it.
    queued: Instant,
    done: oneshot::Sender<Result<Appended, AppendError>>,
}

/// A handle to a chain's writer. Cheap to clone; the writer stops when every handle is dropped.
#[derive(Debug, Clone)]
pub struct AuditLog {
    jobs: mpsc::Sender<Job>,
    chain: Arc<str>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("event", &self.entry.index.event)
            .finish()
    }
}

impl AuditLog {
    /// Claims `config.chain` in `store`, reads its head and starts the writer: a task, or for a
    /// [`Store::BLOCKING`] store a blocking thread (which `abort` cannot stop). Either ends once
    /// every handle is dropped; must be called within a Tokio runtime.
    pub async fn open<S: Store>(
        store: Arc<S>,
        config: WriterConfig,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), OpenError> {
        if config.window > MAX_WINDOW {
            return Err(OpenError::Config(format!(
                "window {:?} exceeds the maximum {MAX_WINDOW:?}",
                config.window
            )));
        }
        if config.chain.is_empty() || config.chain.len() > 253 {
            return Err(OpenError::Config(
                "chain must be 1 to 253 characters".to_owned(),
            ));
        }
        if config.max_batch == 0 || config.queue == 0 {
            return Err(OpenError::Config(
                "max_batch and queue must be positive".to_owned(),
            ));
        }
        store.claim(&config.chain).await?;
        let head = store.head(&config.chain).await?;
        let chain: Arc<str> = config.chain.as_str().into();
        let (jobs, rx) = mpsc::channel(config.queue);
        let head = head.unwrap_or(Head {
            seq: 0,
            hash: GENESIS.to_owned(),
        });
        let writer = Writer {
            store,
            chain: chain.clone(),
            committed: head.clone(),
            tip: head,
            window: config.window,
            max_batch: config.max_batch,
            observer: config.observer,
        };
        let task = if S::BLOCKING {
            // The writer's loop on a thread of its own, driven by this runtime's timers: its
            // commits block that thread, not a worker, and a caller's send wakes it directly.
            let runtime = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || runtime.block_on(writer.run(rx)))
        } else {
            tokio::spawn(writer.run(rx))
        };
        Ok((Self { jobs, chain }, task))
    }

    /// The chain this log writes.
    pub fn chain(&self) -> &str {
        &self.chain
    }

    /// Appends `entry`; returns once it is durable. The entry is serialised here, on the
    /// caller's task, so the chain's writer only numbers, links and hashes.
    pub async fn append(&self, entry: Entry) -> Result<Appended, AppendError> {
        let entry = Prepared::new(&entry);
        let (done, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                entry,
                queued: Instant::now(),
                done,
            })
            .await
            .map_err(|_| AppendError::Closed)?;
        answer.await.map_err(|_| AppendError::Closed)?
    }

    /// Retention: prunes this chain's records older than `before`. First appends a checkpoint
    /// naming the last pruned record and its hash, then deletes the records and stores that
    /// record as the chain's anchor. Returns how many records were pruned.
    pub async fn prune<S: Store>(
        &self,
        store: &S,
        before: Timestamp,
        writer: Identity,
    ) -> Result<u64, AppendError> {
        let err = |e: StoreError| AppendError::Store(e.to_string().into());
        let Some(through) = store
            .last_before(&self.chain, before.as_microsecond())
            .await
            .map_err(err)?
        else {
            return Ok(0);
        };
        let mut entry = Entry::new(Timestamp::now(), Event::Checkpoint, writer);
        entry.checkpoint = Some(Checkpoint {
            through_seq: through.seq,
            through_hash: through.hash.clone(),
            pruned_before: before,
        });
        self.append(entry).await?;
        store.prune(&self.chain, &through).await.map_err(err)
    }
}

struct Writer<S> {
    store: Arc<S>,
    chain: Arc<str>,
    /// The last record known durable.
    committed: Head,
    /// The last record sealed: the head the next batch links to. Ahead of `committed` while
    /// batches are in flight.
    tip: Head,
    window: Duration,
    max_batch: usize,
    observer: Option<Arc<dyn Observer>>,
}

/// A batch handed to the store: its callers and where their records landed.
struct Sealed {
    jobs: Vec<Job>,
    acks: Vec<(u64, String)>,
    /// When it was handed to the store.
    handed: Instant,
}

impl<S: Store> Writer<S> {
    async fn run(self, rx: mpsc::Receiver<Job>) {
        if S::PIPELINE > 1 {
            self.run_pipelined(rx).await;
        } else {
            self.run_serial(rx).await;
        }
    }

    /// One batch at a time: take entries, commit them, answer, repeat.
    async fn run_serial(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(first) = rx.recv().await {
            let mut jobs = self.gather(first, &mut rx).await;
            let (records, sealed) = self.seal(&mut jobs);
            let result = if S::BLOCKING {
                self.store.append_blocking(records)
            } else {
                self.store.append(records).await
            };
            if !self.settle(sealed, result) {
                self.resync().await;
            }
        }
    }

    /// Up to [`Store::PIPELINE`] batches in flight: the next batch is gathered, sealed and
    /// handed to the store while the ones before commit, and callers are answered in order.
    /// After a failure nothing new starts until every batch in flight has ended (the store fails
    /// those too) and the head is read back from the store.
    async fn run_pipelined(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut in_flight: VecDeque<(JoinHandle<Result<(), StoreError>>, Sealed)> = VecDeque::new();
        let mut failed = false;
        loop {
            let open = in_flight.len() < S::PIPELINE && !failed;
            tokio::select! {
                biased;
                result = async { (&mut in_flight.front_mut().expect("a batch in flight").0).await },
                    if !in_flight.is_empty() =>
                {
                    let (_, sealed) = in_flight.pop_front().expect("a batch in flight");
                    let result = result.unwrap_or_else(|e| Err(StoreError::Task(e.to_string())));
                    failed |= !self.settle(sealed, result);
                    if failed && in_flight.is_empty() {
                        self.resync().await;
                        failed = false;
                    }
                }
                first = rx.recv(), if open => {
                    let Some(first) = first else { break };
                    let mut jobs = self.gather(first, &mut rx).await;
                    let (records, sealed) = self.seal(&mut jobs);
                    let store = self.store.clone();
                    let mut append = Box::pin(async move { store.append(records).await });
                    // The store orders batches by their first poll: take this one's turn now,
                    // before the next batch exists.
                    let task = match futures::poll!(append.as_mut()) {
                        std::task::Poll::Ready(result) => tokio::spawn(async move { result }),
                        std::task::Poll::Pending => tokio::spawn(append),
                    };
                    in_flight.push_back((task, sealed));
                }
                else => break,
            }
        }
        while let Some((task, sealed)) = in_flight.pop_front() {
            let result = task
                .await
                .unwrap_or_else(|e| Err(StoreError::Task(e.to_string())));
            self.settle(sealed, result);
        }
    }

    /// `first` and every entry queued behind it, up to `max_batch`, waiting at most `window`
    /// for more.
    async fn gather(&self, first: Job, rx: &mut mpsc::Receiver<Job>) -> Vec<Job> {
        let mut jobs = Vec::with_capacity(self.max_batch.min(1024));
        jobs.push(first);
        if !self.window.is_zero() {
            let deadline = tokio::time::Instant::now() + self.window;
            while jobs.len() < self.max_batch {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(job)) => jobs.push(job),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        while jobs.len() < self.max_batch {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        jobs
    }

    /// Numbers, links and seals `jobs` after the tip, and moves the tip past them.
    fn seal(&mut self, jobs: &mut Vec<Job>) -> (Vec<Record>, Sealed) {
        let mut records = Vec::with_capacity(jobs.len());
        let mut prev = self.tip.hash.clone();
        for (i, job) in jobs.iter_mut().enumerate() {
            let prepared = Prepared {
                body: std::mem::take(&mut job.entry.body),
                index: std::mem::take(&mut job.entry.index),
            };
            let record =
                Record::seal_prepared(&self.chain, self.tip.seq + 1 + i as u64, &prev, prepared);
            prev.clone_from(&record.hash);
            records.push(record);
        }
        let acks: Vec<(u64, String)> = records.iter().map(|r| (r.seq, r.hash.clone())).collect();
        if let Some((seq, hash)) = acks.last() {
            self.tip = Head {
                seq: *seq,
                hash: hash.clone(),
            };
        }
        let jobs = std::mem::take(jobs);
        let sealed = Sealed {
            jobs,
            acks,
            handed: Instant::now(),
        };
        (records, sealed)
    }

    /// Answers a batch's callers. Returns whether it was committed.
    fn settle(&mut self, sealed: Sealed, result: Result<(), StoreError>) -> bool {
        let Sealed { jobs, acks, handed } = sealed;
        if let Some(observer) = &self.observer {
            // Jobs are in queue order: the first waited longest.
            let oldest = jobs.first().map_or(handed, |job| job.queued);
            observer.batch(&Batch {
                records: jobs.len(),
                waited: handed.saturating_duration_since(oldest),
                commit: handed.elapsed(),
                committed: result.is_ok(),
            });
        }
        match result {
            Ok(()) => {
                if let Some((seq, hash)) = acks.last() {
                    self.committed = Head {
                        seq: *seq,
                        hash: hash.clone(),
                    };
                }
                for (job, (seq, hash)) in jobs.into_iter().zip(acks) {
                    let _ = job.done.send(Ok(Appended {
                        chain: self.chain.clone(),
                        seq,
                        hash,
                    }));
                }
                true
            }
            Err(e) => {
                tracing::error!(chain = %self.chain, error = %e, "audit batch not written");
                let message: Arc<str> = e.to_string().into();
                for job in jobs {
                    let _ = job.done.send(Err(AppendError::Store(message.clone())));
                }
                false
            }
        }
    }

    /// After a failed batch: continue from what the store holds, never from a guess (a commit
    /// can fail after the database applied it, when the connection is lost during COMMIT).
    async fn resync(&mut self) {
        self.tip = self.committed.clone();
        match self.store.head(&self.chain).await {
            Ok(Some(head)) => {
                self.committed = head.clone();
                self.tip = head;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(chain = %self.chain, error = %e, "audit head not re-read")
            }
        }
    }
}
