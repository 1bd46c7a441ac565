//! The shared store: PostgreSQL, for several gateway replicas. Each replica writes its own chain
//! and holds a session advisory lock on it, so two processes can never extend one chain.
//! A batch is one binary COPY inside a transaction (half again as many rows per second as a
//! multi-row INSERT of the same rows); with PostgreSQL's default `synchronous_commit = on`,
//! COMMIT returns once the WAL is flushed. Two batches may be in flight: the next one is copied
//! in on a second connection while the one before waits for its COMMIT, and it commits only
//! after that one did ([`Store::PIPELINE`]).
//!
//! # Healing
//!
//! No connection is trusted to live: every one is checked before use and dialled again when it
//! has died (a server restart, a failover behind the URL, a cut TCP session), so a replica goes
//! on without a restart once its database answers again. Each session runs under limits Tollgate
//! sets ([`SESSION_LIMITS`]: statement, lock and idle-in-transaction timeouts, server-side TCP
//! keepalives) and every call also has a deadline on this side ([`DEADLINE_MARGIN`] past the
//! server's limit), so neither a hung server nor a lock held by a hung replica can hold a call
//! for ever; a connection that missed its deadline is closed, never reused. The chain claim is a
//! session lock, so it dies with its session: the connection that holds it is checked before
//! every batch, and a new one claims again every chain this store claimed before anything more
//! is appended (another writer holding one meanwhile fails the batch with
//! [`StoreError::Held`]). Reads take pooled connections of their own, bounded per pool: the
//! audit read API gets a pool apart from budget hydration ([`PostgresStore::apart`]), so an
//! auditor's export never stalls a decision.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Semaphore, SemaphorePermit, oneshot};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls, Row};

use super::{
    Census, Head, Query, Store, StoreError, ToolOutcome, ToolTally, ToolUse, dense_prefix, to_i64,
    to_u64,
};
use crate::record::{Index, Record};
use crate::sql::{Filter, Param};
use crate::verify::Sealed;

/// An audit store in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
    /// The connections this handle reads on.
    reads: Arc<Pool>,
}

#[derive(Debug)]
struct Inner {
    url: String,
    /// The connections batches are appended on, in turn: while one waits for its COMMIT to be
    /// flushed, the next batch is copied in on the next. The first also prunes. `None` once a
    /// connection died or missed a deadline: the next batch dials again.
    appenders: Vec<Mutex<Option<Client>>>,
    /// The order of batches ([`Store::PIPELINE`]).
    turns: std::sync::Mutex<Turns>,
    /// The session that holds this store's chain claims, and the chains it must hold.
    claims: Mutex<Claims>,
    /// Idle connections for [`AgentLock`]s.
    lockers: std::sync::Mutex<Vec<Client>>,
}

/// The session holding the chains claimed through this store (a session advisory lock each).
#[derive(Debug, Default)]
struct Claims {
    session: Option<Client>,
    chains: Vec<String>,
}

/// Connections of one use, dialled when needed and again when one has died: at most `size` in
/// use at once (a caller past that waits, within the deadline), `size` kept idle.
#[derive(Debug)]
struct Pool {
    idle: std::sync::Mutex<Vec<Client>>,
    permits: Semaphore,
    size: usize,
}

/// A connection taken from a [`Pool`]: back to it when dropped, unless it died or missed a
/// deadline.
struct Pooled<'a> {
    client: Option<Client>,
    pool: &'a Pool,
    _permit: SemaphorePermit<'a>,
}

impl Pool {
    fn new(size: usize) -> Self {
        Self {
            idle: std::sync::Mutex::new(Vec::new()),
            permits: Semaphore::new(size),
            size,
        }
    }

    async fn get(&self, url: &str) -> Result<Pooled<'_>, StoreError> {
        let permit = tokio::time::timeout(statement_deadline(), self.permits.acquire())
            .await
            .map_err(|_| StoreError::Timeout {
                what: "a free connection",
                after: statement_deadline(),
            })?
            .map_err(|e| StoreError::Task(e.to_string()))?;
        let idle = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.retain(|c| !c.is_closed());
            idle.pop()
        };
        let client = match idle {
            Some(client) => client,
            None => connect(url).await?,
        };
        Ok(Pooled {
            client: Some(client),
            pool: self,
            _permit: permit,
        })
    }
}

impl Pooled<'_> {
    fn client(&self) -> &Client {
        self.client
            .as_ref()
            .expect("a pooled connection until dropped")
    }

    /// `result` of a use of this connection: one that leaves it in an unknown state (a missed
    /// deadline, a lost connection) closes it instead of returning it to the pool.
    fn settle<T>(&mut self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if result.as_ref().is_err_and(|e| !connection_survives(e)) {
            self.client = None;
        }
        result
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take()
            && !client.is_closed()
        {
            let mut idle = self.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < self.pool.size {
                idle.push(client);
            }
        }
    }
}

/// The limits every Tollgate session runs under, as server settings sent when it connects (a
/// URL's own `options` come after them and win on the server; the deadlines here stay).
pub const SESSION_LIMITS: &[(&str, &str)] = &[
    ("statement_timeout", "30s"),
    ("lock_timeout", "5s"),
    ("idle_in_transaction_session_timeout", "60s"),
    // The server notices a vanished replica within about a minute, and drops its claims.
    ("tcp_keepalives_idle", "30"),
    ("tcp_keepalives_interval", "10"),
    ("tcp_keepalives_count", "3"),
];

/// `statement_timeout` and `lock_timeout` of [`SESSION_LIMITS`].
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection may take to be made (TCP, TLS and the server's start-up), when the URL
/// names no `connect_timeout`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How much longer than the server's own limit this side waits for an answer before it gives
/// up on the connection: the server's limit is the one that normally fires; this one holds when
/// the server (or the network) no longer answers at all.
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(5);

fn statement_deadline() -> Duration {
    STATEMENT_TIMEOUT + DEADLINE_MARGIN
}

fn lock_deadline() -> Duration {
    LOCK_TIMEOUT + DEADLINE_MARGIN
}

/// `query`, or [`StoreError::Timeout`] after `after`.
async fn within<T, E: Into<StoreError>>(
    what: &'static str,
    after: Duration,
    query: impl Future<Output = Result<T, E>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(after, query).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(StoreError::Timeout { what, after }),
    }
}

/// Which connection the next batch uses, and how the batch before it ended.
#[derive(Debug, Default)]
struct Turns {
    next: u64,
    before: Option<oneshot::Receiver<bool>>,
}

/// How a batch ended, for the batch after it: failed unless told otherwise, so a batch whose
/// future is dropped, or that returns early with an error, fails its successor too.
struct Outcome(Option<oneshot::Sender<bool>>);

impl Outcome {
    fn committed(mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(true);
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(false);
        }
    }
}

/// How many connections append batches, and so how many batches may be in flight.
const APPENDERS: usize = 2;

/// Idle lock connections kept for reuse; more are closed when their lock is released.
const IDLE_LOCKERS: usize = 8;

/// Columns only PostgreSQL has, for replicas that share budgets: `pos` numbers records in the
/// order they were inserted across all chains, so a replica can ask for an agent's records
/// written since it last looked.
const SHARED_COLUMNS: &[&str] = &[
    "ALTER TABLE tollgate_audit_records ADD COLUMN IF NOT EXISTS pos BIGSERIAL",
    "CREATE INDEX IF NOT EXISTS tollgate_audit_agent_pos ON tollgate_audit_records (agent, pos)",
];

/// A cluster-wide lock on one agent's budget state (a PostgreSQL session advisory lock), held
/// on a connection of its own. Released when dropped: the connection unlocks and goes back to
/// the pool. A replica that dies releases its locks with its sessions.
pub struct AgentLock {
    client: Option<Client>,
    key: String,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AgentLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLock")
            .field("agent", &self.key)
            .finish()
    }
}

impl Drop for AgentLock {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let key = std::mem::take(&mut self.key);
        let inner = self.inner.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // dropping the connection ends the session and its lock
        };
        runtime.spawn(async move {
            let unlocked = client
                .query_one("SELECT pg_advisory_unlock(7419003, hashtext($1))", &[&key])
                .await
                .is_ok_and(|r| r.try_get::<_, bool>(0).unwrap_or(false));
            let mut idle = inner.lockers.lock().unwrap_or_else(|e| e.into_inner());
            if unlocked && idle.len() < IDLE_LOCKERS {
                idle.push(client);
            }
        });
    }
}

/// Opens a connection under [`SESSION_LIMITS`], giving up after [`CONNECT_TIMEOUT`] (or the
/// URL's `connect_timeout`) plus [`DEADLINE_MARGIN`].
async fn connect(url: &str) -> Result<Client, StoreError> {
    let mut target = super::connect::target(url)?;
    let connect_timeout = *target
        .config
        .get_connect_timeout()
        .unwrap_or(&CONNECT_TIMEOUT);
    limit(&mut target.config);
    let dial = async {
        Ok::<_, tokio_postgres::Error>(match target.tls {
            None => {
                let (client, connection) = target.config.connect(NoTls).await?;
                tokio::spawn(watch(connection));
                client
            }
            Some(tls) => {
                let (client, connection) = target.config.connect(tls).await?;
                tokio::spawn(watch(connection));
                client
            }
        })
    };
    within("a connection", connect_timeout + DEADLINE_MARGIN, dial).await
}

/// Puts [`SESSION_LIMITS`] before the URL's own `options`, and bounds connecting and TCP.
fn limit(config: &mut tokio_postgres::Config) {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(Duration::from_secs(30));
    }
    config.keepalives_idle(Duration::from_secs(30));
    let mut options: Vec<String> = SESSION_LIMITS
        .iter()
        .map(|(name, value)| format!("-c {name}={value}"))
        .collect();
    if let Some(own) = config.get_options() {
        options.push(own.to_owned());
    }
    config.options(options.join(" "));
}

async fn watch(connection: impl std::future::Future<Output = Result<(), tokio_postgres::Error>>) {
    if let Err(e) = connection.await {
        tracing::warn!(error = %e, "postgres audit store connection ended; the next use dials again");
    }
}

/// A live connection in `slot`: the one there, or a new one when it is empty or has died.
async fn ready<'a>(slot: &'a mut Option<Client>, url: &str) -> Result<&'a mut Client, StoreError> {
    if slot.as_ref().is_none_or(Client::is_closed) {
        *slot = None;
        *slot = Some(connect(url).await?);
    }
    Ok(slot.as_mut().expect("just filled"))
}

/// Whether `error` leaves the connection in a known state: the server answered it. Anything else
/// (a deadline missed, the connection gone) and the connection is not used again.
fn connection_survives(error: &StoreError) -> bool {
    match error {
        StoreError::Postgres(e) => e.as_db_error().is_some(),
        StoreError::Conflict { .. } => true,
        _ => false,
    }
}

/// How many connections each read pool opens at most (verification reads a page on one per
/// core, at most eight).
const READERS: usize = 8;

/// How many connections a pool made by [`PostgresStore::apart`] opens at most.
const READERS_APART: usize = 4;

impl PostgresStore {
    /// Connects to `url` (a libpq URL or key=value string) and creates the tables if needed.
    /// TLS follows libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey`; modes that would
    /// accept an unverified server are refused (see the `connect` module).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let writer = connect(url).await?;
        // Concurrent replicas may race to create the tables; a transaction-level advisory lock
        // serialises the DDL.
        let ddl = async {
            writer
                .batch_execute("BEGIN; SELECT pg_advisory_xact_lock(7419001);")
                .await?;
            for statement in super::schema().chain(super::RUN_AND_AGENT_INDEXES) {
                writer.batch_execute(statement).await?;
            }
            for statement in SHARED_COLUMNS {
                writer.batch_execute(statement).await?;
            }
            writer.batch_execute("COMMIT").await
        };
        within("creating the tables", statement_deadline(), ddl).await?;
        let mut appenders = vec![Mutex::new(Some(writer))];
        for _ in 1..APPENDERS {
            appenders.push(Mutex::new(None));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                url: url.to_owned(),
                appenders,
                turns: std::sync::Mutex::new(Turns::default()),
                claims: Mutex::new(Claims::default()),
                lockers: std::sync::Mutex::new(Vec::new()),
            }),
            reads: Arc::new(Pool::new(READERS)),
        })
    }

    /// The same store, reading on connections of its own (at most four): for the audit read
    /// API and the standing writer, so their long reads never wait for, or hold up, the reads
    /// decisions need. Appends and claims stay shared.
    pub fn apart(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            reads: Arc::new(Pool::new(READERS_APART)),
        }
    }

    /// Waits for the cluster-wide lock on `agent`'s budget state. Replicas hold it from before
    /// they read the agent's state until the record of what they decided is durable, so that
    /// the next holder, on whichever replica, sees it. A lock not granted within the session's
    /// `lock_timeout` (a replica that hangs holding it) is an error, not a wait for ever.
    pub async fn lock_agent(&self, agent: &str) -> Result<AgentLock, StoreError> {
        let idle = {
            let mut idle = self.inner.lockers.lock().unwrap_or_else(|e| e.into_inner());
            idle.retain(|c| !c.is_closed());
            idle.pop()
        };
        let mut slot = idle;
        let client = ready(&mut slot, &self.inner.url).await?;
        let locked = within(
            "the agent's lock",
            lock_deadline(),
            client.query_one("SELECT pg_advisory_lock(7419003, hashtext($1))", &[&agent]),
        )
        .await;
        match locked {
            Ok(_) => {}
            Err(e) => {
                if connection_survives(&e)
                    && let Some(client) = slot.take()
                {
                    let mut idle = self.inner.lockers.lock().unwrap_or_else(|e| e.into_inner());
                    if idle.len() < IDLE_LOCKERS {
                        idle.push(client);
                    }
                }
                // A connection that missed the deadline may get the lock later: closing it
                // ends its session, and the lock with it.
                return Err(e);
            }
        }
        Ok(AgentLock {
            client: slot,
            key: agent.to_owned(),
            inner: self.inner.clone(),
        })
    }

    /// The position of `agent`'s latest record (0 without one): where following it starts.
    pub async fn agent_position(&self, agent: &str) -> Result<i64, StoreError> {
        let mut reader = self.reads.get(&self.inner.url).await?;
        let row = within(
            "an agent's position",
            statement_deadline(),
            reader.client().query_one(
                "SELECT COALESCE(MAX(pos), 0) FROM tollgate_audit_records WHERE agent = $1",
                &[&agent],
            ),
        )
        .await;
        let row = reader.settle(row)?;
        Ok(row.try_get(0)?)
    }

    /// `agent`'s records after position `after` that other chains than `chain` wrote, in the
    /// order they were written, with their positions.
    pub async fn agent_records_after(
        &self,
        agent: &str,
        chain: &str,
        after: i64,
    ) -> Result<Vec<(i64, Record)>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS}, pos FROM tollgate_audit_records WHERE agent = $1 AND pos > $2 AND chain <> $3 ORDER BY pos"
        );
        let rows = self
            .read("an agent's records", &sql, &[&agent, &after, &chain])
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(11)?, record(row)?)))
            .collect()
    }

    /// `sql` on a pooled read connection, under the statement deadline.
    async fn read(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let mut reader = self.reads.get(&self.inner.url).await?;
        let rows = within(
            what,
            statement_deadline(),
            reader.client().query(sql, params),
        )
        .await;
        reader.settle(rows)
    }

    /// At most one row of `sql` on a pooled read connection, under the statement deadline.
    async fn read_opt(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let mut reader = self.reads.get(&self.inner.url).await?;
        let row = within(
            what,
            statement_deadline(),
            reader.client().query_opt(sql, params),
        )
        .await;
        reader.settle(row)
    }

    /// The session holding this store's chain claims, alive: when it has died, a new one claims
    /// every chain again first, or fails with [`StoreError::Held`] naming one another writer
    /// took meanwhile.
    async fn hold_claims(&self) -> Result<(), StoreError> {
        let mut claims = self.inner.claims.lock().await;
        self.hold_claims_in(&mut claims).await
    }

    async fn hold_claims_in(&self, claims: &mut Claims) -> Result<(), StoreError> {
        if claims.session.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(());
        }
        claims.session = None;
        if claims.chains.is_empty() {
            return Ok(());
        }
        let session = connect(&self.inner.url).await?;
        for chain in &claims.chains {
            if !try_claim(&session, chain).await? {
                tracing::error!(%chain, "audit chain taken by another writer while this one was cut off");
                return Err(StoreError::Held(chain.clone()));
            }
        }
        if !claims.chains.is_empty() {
            tracing::info!(chains = ?claims.chains, "audit chains claimed again on a new connection");
        }
        claims.session = Some(session);
        Ok(())
    }
}

/// Takes `chain`'s claim on `session` if no other session holds it.
async fn try_claim(session: &Client, chain: &str) -> Result<bool, StoreError> {
    let row = within(
        "the chain's claim",
        statement_deadline(),
        session.query_one(
            "SELECT pg_try_advisory_lock(7419002, hashtext($1))",
            &[&chain],
        ),
    )
    .await?;
    Ok(row.try_get::<_, bool>(0)?)
}

/// The column types of [`COPY_COLUMNS`], in order.
const COPY_TYPES: [Type; 11] = [
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
];

const COLUMNS: &str = "chain, seq, prev, hash, time_us, event, agent, run, tool, outcome, body";

fn record(row: &Row) -> Result<Record, StoreError> {
    Ok(Record {
        chain: row.try_get(0)?,
        seq: to_u64(row.try_get(1)?)?,
        prev: row.try_get(2)?,
        hash: row.try_get(3)?,
        index: Index {
            time_us: row.try_get(4)?,
            event: row.try_get(5)?,
            agent: row.try_get(6)?,
            run: row.try_get(7)?,
            tool: row.try_get(8)?,
            outcome: row.try_get(9)?,
        },
        body: row.try_get(10)?,
    })
}

/// What [`Sealed`] is made of, in its order.
const SEALED_COLUMNS: &str = "seq, prev, hash, event, body";

/// Rows of [`SEALED_COLUMNS`] of `chain`, sealed from the text as received (no `String` per
/// column), in sequence order.
fn seal_rows(chain: &str, rows: &[Row]) -> Result<Vec<Sealed>, StoreError> {
    fn text(row: &Row, i: usize) -> Result<&[u8], StoreError> {
        Ok(row.try_get::<_, &str>(i)?.as_bytes())
    }
    let mut sealed = rows
        .iter()
        .map(|row| {
            Ok(Sealed::of_stored(
                chain,
                to_u64(row.try_get(0)?)?,
                text(row, 1)?,
                text(row, 2)?,
                text(row, 3)?,
                text(row, 4)?,
            ))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    sealed.sort_unstable_by_key(|r| r.seq);
    Ok(sealed)
}

/// Seals `rows` on a blocking thread: hashing a page takes milliseconds.
async fn seal_off_runtime(chain: &str, rows: Vec<Row>) -> Result<Vec<Sealed>, StoreError> {
    let chain = chain.to_owned();
    tokio::task::spawn_blocking(move || seal_rows(&chain, &rows))
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

impl PostgresStore {
    /// The records of `chain` in `(from, to]`, sealed, read on a connection of their own.
    async fn sealed_range(
        &self,
        chain: &str,
        (from, to): (i64, i64),
    ) -> Result<Vec<Sealed>, StoreError> {
        // A closed range without ORDER BY, as in `scan`: the rows are sorted as they are sealed.
        let rows = self
            .read(
                "a page to verify",
                &format!(
                    "SELECT {SEALED_COLUMNS} FROM tollgate_audit_records WHERE chain = $1 AND seq > $2 AND seq <= $3"
                ),
                &[&chain, &from, &to],
            )
            .await?;
        seal_off_runtime(chain, rows).await
    }
}

/// Copies `batch` in one transaction on `client`, and commits it once the batch `before` it
/// has committed (rolled back if that one failed).
async fn copy_batch(
    client: &mut Client,
    batch: &[Record],
    seqs: &[i64],
    before: Option<oneshot::Receiver<bool>>,
) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    let sink = tx
        .copy_in(
            "COPY tollgate_audit_records (chain, seq, prev, hash, time_us, event, agent, run, tool, outcome, body) FROM STDIN (FORMAT binary)",
        )
        .await?;
    let rows = BinaryCopyInWriter::new(sink, &COPY_TYPES);
    futures::pin_mut!(rows);
    let copied: Result<u64, tokio_postgres::Error> = async {
        for (r, seq) in batch.iter().zip(seqs) {
            rows.as_mut()
                .write(&[
                    &r.chain,
                    seq,
                    &r.prev,
                    &r.hash,
                    &r.index.time_us,
                    &r.index.event,
                    &r.index.agent,
                    &r.index.run,
                    &r.index.tool,
                    &r.index.outcome,
                    &r.body,
                ])
                .await?;
        }
        rows.as_mut().finish().await
    }
    .await;
    match copied {
        Ok(_) => {}
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            let first = batch.first();
            return Err(StoreError::Conflict {
                chain: first.map(|r| r.chain.clone()).unwrap_or_default(),
                seq: first.map_or(0, |r| r.seq),
            });
        }
        Err(e) => return Err(e.into()),
    }
    // Copied while the batch before was committing; committed only after it was.
    if let Some(before) = before
        && before.await != Ok(true)
    {
        tx.rollback().await?;
        return Err(StoreError::Aborted);
    }
    tx.commit().await?;
    Ok(())
}

/// A filter's parameters as PostgreSQL takes them.
fn boxed_params(filter: &Filter) -> Vec<Box<dyn ToSql + Sync + Send>> {
    filter
        .params
        .iter()
        .map(|p| -> Box<dyn ToSql + Sync + Send> {
            match p {
                Param::Text(s) => Box::new(s.clone()),
                Param::Int(i) => Box::new(*i),
            }
        })
        .collect()
}

fn param_refs(params: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

fn head(row: Option<Row>) -> Result<Option<Head>, StoreError> {
    row.map(|r| {
        Ok(Head {
            seq: to_u64(r.try_get(0)?)?,
            hash: r.try_get(1)?,
        })
    })
    .transpose()
}

impl Store for PostgresStore {
    async fn claim(&self, chain: &str) -> Result<(), StoreError> {
        let mut claims = self.inner.claims.lock().await;
        self.hold_claims_in(&mut claims).await?;
        if claims.chains.iter().any(|c| c == chain) {
            return Ok(());
        }
        let session = match claims.session.take() {
            Some(session) => session,
            None => connect(&self.inner.url).await?,
        };
        let session = claims.session.insert(session);
        match try_claim(session, chain).await {
            Ok(true) => {
                claims.chains.push(chain.to_owned());
                Ok(())
            }
            Ok(false) => Err(StoreError::Held(chain.to_owned())),
            Err(e) => {
                if !connection_survives(&e) {
                    claims.session = None;
                }
                Err(e)
            }
        }
    }

    async fn head(&self, chain: &str) -> Result<Option<Head>, StoreError> {
        let last = self
            .read_opt(
                "the chain's head",
                "SELECT seq, hash FROM tollgate_audit_records WHERE chain = $1 ORDER BY seq DESC LIMIT 1",
                &[&chain],
            )
            .await?;
        if last.is_some() {
            return head(last);
        }
        self.anchor(chain).await
    }

    const PIPELINE: usize = APPENDERS;

    async fn append(&self, batch: Vec<Record>) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        // This batch's turn is taken at the first poll, before anything is awaited.
        let (outcome, before, connection) = {
            let mut turns = self.inner.turns.lock().unwrap_or_else(|e| e.into_inner());
            let (tx, rx) = oneshot::channel();
            // Only a batch still in flight holds this one back: one that has ended, however,
            // was answered before this batch was made (a writer re-reads its head after a
            // failure before it sends more).
            let before = turns.before.replace(rx).and_then(|mut before| {
                matches!(before.try_recv(), Err(oneshot::error::TryRecvError::Empty))
                    .then_some(before)
            });
            let connection = &self.inner.appenders[(turns.next % APPENDERS as u64) as usize];
            turns.next += 1;
            (Outcome(Some(tx)), before, connection)
        };
        let seqs = batch
            .iter()
            .map(|r| to_i64(r.seq))
            .collect::<Result<Vec<_>, _>>()?;
        // The claim's session must be alive before anything is appended: a chain is never
        // extended while another process could hold it.
        self.hold_claims().await?;
        let mut slot = connection.lock().await;
        let result = within(
            "a batch",
            statement_deadline(),
            copy_batch(
                ready(&mut slot, &self.inner.url).await?,
                &batch,
                &seqs,
                before,
            ),
        )
        .await;
        match result {
            Ok(()) => {
                outcome.committed();
                Ok(())
            }
            Err(e) => {
                if !connection_survives(&e) {
                    *slot = None;
                }
                Err(e)
            }
        }
    }

    async fn chains(&self) -> Result<Vec<String>, StoreError> {
        let rows = self
            .read(
                "the chains",
                "SELECT DISTINCT chain FROM tollgate_audit_records
                 UNION SELECT chain FROM tollgate_audit_anchors ORDER BY 1",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?)
    }

    async fn anchor(&self, chain: &str) -> Result<Option<Head>, StoreError> {
        head(
            self.read_opt(
                "the chain's anchor",
                "SELECT seq, hash FROM tollgate_audit_anchors WHERE chain = $1",
                &[&chain],
            )
            .await?,
        )
    }

    async fn scan(&self, chain: &str, after: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
        // Sequences in a chain are dense, so the next page is first asked for as a closed range,
        // without ORDER BY: the rows are sorted here. The ordered, open-ended form alone
        // (`seq > $2 ORDER BY seq LIMIT $3`) is planned from table statistics; before
        // autovacuum has analysed a freshly written table, the planner expects a few hundred
        // rows and sorts every record after `after` on disk for each page (a 100,000-record
        // chain verified at 40,000 records/s that way, and even a one-page range spilled its
        // sort to disk). Only when the range comes back short (the chain's end, or a gap left
        // by a deletion) does the open-ended query look beyond it, so a gap of any size still
        // reaches the verifier.
        let after_i64 = to_i64(after)?;
        let upper = after_i64.saturating_add(i64::try_from(limit).unwrap_or(i64::MAX));
        let rows = self
            .read(
                "a page of records",
                &format!(
                    "SELECT {COLUMNS} FROM tollgate_audit_records WHERE chain = $1 AND seq > $2 AND seq <= $3"
                ),
                &[&chain, &after_i64, &upper],
            )
            .await?;
        let mut records = rows.iter().map(record).collect::<Result<Vec<_>, _>>()?;
        records.sort_unstable_by_key(|r| r.seq);
        if records.len() < limit {
            // From the last record read, not from the range's end: records appended between
            // the two queries would otherwise be skipped and look deleted.
            let last = records.last().map_or(Ok(after_i64), |r| to_i64(r.seq))?;
            let rest = self
                .read(
                    "a page of records",
                    &format!(
                        "SELECT {COLUMNS} FROM tollgate_audit_records WHERE chain = $1 AND seq > $2 ORDER BY seq LIMIT $3"
                    ),
                    &[&chain, &last, &((limit - records.len()) as i64)],
                )
                .await?;
            for row in &rest {
                records.push(record(row)?);
            }
        }
        Ok(records)
    }

    /// Verification's read: a page is read as closed ranges of sequence numbers, one per
    /// core, each on a connection of its own (so each has a server process of its own) and
    /// sealed on a blocking thread as it arrives; only the sealed columns are read and no
    /// [`Record`] is built. A range that comes back short (the chain's end, or a gap) ends the
    /// ranges taken (a later one may come from a later snapshot), and the page goes on in
    /// order from the last record read, as in [`Store::scan`], so a gap of any size still reaches
    /// the verifier. At most [`crate::verify::PAGE`] records per range are held unsealed.
    async fn sealed(
        &self,
        chain: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Sealed>, StoreError> {
        let mut from = to_i64(after)?;
        let parts = super::parts(limit);
        let mut page: Vec<Sealed> = Vec::with_capacity(limit.min(parts * crate::verify::PAGE));
        while page.len() < limit {
            let want = (limit - page.len()).min(parts * crate::verify::PAGE);
            let ranges = super::ranges(from, want);
            let pieces = futures::future::try_join_all(
                ranges.iter().map(|&range| self.sealed_range(chain, range)),
            )
            .await?;
            let (piece, last) = dense_prefix(pieces, &ranges, from, want)?;
            let short = piece.len() < want;
            page.extend(piece);
            from = last;
            if short {
                let rest = self
                    .read(
                        "a page to verify",
                        &format!(
                            "SELECT {SEALED_COLUMNS} FROM tollgate_audit_records WHERE chain = $1 AND seq > $2 ORDER BY seq LIMIT $3"
                        ),
                        &[&chain, &from, &i64::try_from(limit - page.len()).unwrap_or(i64::MAX)],
                    )
                    .await?;
                page.extend(seal_off_runtime(chain, rest).await?);
                break;
            }
        }
        Ok(page)
    }

    async fn query(&self, query: &Query) -> Result<Vec<Record>, StoreError> {
        let filter = Filter::of(query);
        let params = boxed_params(&filter);
        let refs = param_refs(&params);
        let rows = self
            .read(
                "the records asked for",
                &format!(
                    "SELECT {COLUMNS} FROM tollgate_audit_records {}",
                    filter.sql
                ),
                &refs,
            )
            .await?;
        rows.iter().map(record).collect()
    }

    async fn census(&self, query: &Query) -> Result<Vec<Census>, StoreError> {
        let filter = Filter::of(&Query {
            limit: None,
            after: None,
            ..query.clone()
        });
        let params = boxed_params(&filter);
        let refs = param_refs(&params);
        let rows = self
            .read(
                "a census of records",
                &format!(
                    "SELECT agent, COUNT(*) FROM tollgate_audit_records {} GROUP BY agent ORDER BY agent",
                    filter.conditions
                ),
                &refs,
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Census {
                    agent: r.try_get(0)?,
                    records: to_u64(r.try_get(1)?)?,
                })
            })
            .collect()
    }

    async fn tool_use(&self, since_us: i64, until_us: i64) -> Result<Vec<ToolUse>, StoreError> {
        let rows = self
            .read("tool use", crate::sql::TOOL_USE, &[&since_us, &until_us])
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ToolUse {
                    agent: r.try_get(0)?,
                    tool: r.try_get(1)?,
                    calls: to_u64(r.try_get(2)?)?,
                    allowed: to_u64(r.try_get(3)?)?,
                    last_us: r.try_get(4)?,
                })
            })
            .collect()
    }

    async fn tallies(&self, since_us: i64, until_us: i64) -> Result<Vec<ToolTally>, StoreError> {
        let rows = self
            .read("tallies", crate::sql::TALLIES, &[&since_us, &until_us])
            .await?;
        let mut tallies = rows
            .iter()
            .map(|r| {
                Ok(ToolTally {
                    agent: r.try_get(0)?,
                    tool: r.try_get(1)?,
                    event: r.try_get(2)?,
                    outcome: r.try_get(3)?,
                    count: to_u64(r.try_get(4)?)?,
                    last_us: r.try_get(5)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        tallies.sort_unstable();
        Ok(tallies)
    }

    async fn outcomes(&self, agent: &str, since_us: i64) -> Result<Vec<ToolOutcome>, StoreError> {
        let rows = self
            .read("outcomes", crate::sql::OUTCOMES, &[&agent, &since_us])
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ToolOutcome {
                    tool: r.try_get(0)?,
                    outcome: r.try_get(1)?,
                    count: to_u64(r.try_get(2)?)?,
                })
            })
            .collect()
    }

    async fn last_before(&self, chain: &str, before_us: i64) -> Result<Option<Head>, StoreError> {
        head(
            self.read_opt(
                "the last record before a time",
                crate::sql::LAST_BEFORE,
                &[&chain, &before_us],
            )
            .await?,
        )
    }

    async fn prune(&self, chain: &str, through: &Head) -> Result<u64, StoreError> {
        let seq = to_i64(through.seq)?;
        let mut slot = self.inner.appenders[0].lock().await;
        let writer = ready(&mut slot, &self.inner.url).await?;
        let pruned = async {
            let tx = writer.transaction().await?;
            let deleted = tx
                .execute(
                    "DELETE FROM tollgate_audit_records WHERE chain = $1 AND seq <= $2",
                    &[&chain, &seq],
                )
                .await?;
            tx.execute(
                "INSERT INTO tollgate_audit_anchors (chain, seq, hash) VALUES ($1, $2, $3)
                 ON CONFLICT (chain) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                &[&chain, &seq, &through.hash],
            )
            .await?;
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(deleted)
        };
        let result = within("pruning", statement_deadline(), pruned).await;
        if result.as_ref().is_err_and(|e| !connection_survives(e)) {
            *slot = None;
        }
        result
    }
}
