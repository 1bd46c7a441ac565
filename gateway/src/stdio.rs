//! stdio MCP upstreams (`spec.upstreams[].mcp.stdio`): servers a standalone gateway starts
//! itself, one process per MCP session of an agent, spoken to in newline-delimited JSON-RPC over
//! their stdin and stdout (MCP's stdio transport).
//!
//! - A process starts at the session's `initialize`, with a clean environment (PATH, HOME, LANG,
//!   the policy's `env` and the agent's credential in `credentialEnv`); the session id the client
//!   gets is the gateway's own, random, and bound to the agent and upstream that started it.
//! - Its stderr goes to the gateway's log, line by line, named by agent and upstream.
//! - It ends on the client's `DELETE`, after `idle` without a request, when the agent's kill
//!   switch is engaged or its policy no longer names that server, when it exits, and with the
//!   gateway (every process is killed when the registry is dropped; a process whose gateway was
//!   killed sees its stdin close, which ends MCP stdio servers).
//! - An agent holds at most `per_agent` processes; one more is refused (`SessionLimit`).
//! - Its progress and log notifications reach the client in the answer stream of the call they
//!   are about (progress by its token, a log message to a call in flight: [`Relays`]), as on the
//!   HTTP transport; other notifications are dropped. Its requests of the client (sampling,
//!   elicitation, roots) go to the stream of the call in flight, which lets them through or
//!   refuses them by policy; without one they are answered with an error at once, so the server
//!   never waits for an answer that cannot come.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::oneshot;
use tollgate_crds::policy::StdioServer;

use crate::mcp::{RELAYED, Relay};

/// How long a session may go without a request before its process is ended.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(600);
/// How many stdio processes one agent may hold at a time.
pub const DEFAULT_PER_AGENT: usize = 8;
/// The most bytes of one stderr line logged.
const STDERR_LINE: usize = 4096;

/// The answers awaited from one process, by JSON-RPC id.
type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>;

/// The calls in flight of one session the gateway holds (a stdio process, an HTTP+SSE stream)
/// whose client takes what the server says besides the answer, each with the progress token
/// its request carries: the server's progress notifications go to the call whose token they
/// name, its log messages to a call in flight (a held session says nothing of which).
#[derive(Default)]
pub(crate) struct Relays(Mutex<Vec<(u64, Option<String>, Relay)>>);

/// A call [`Relays`] follows until this is dropped.
pub(crate) struct Followed<'a> {
    relays: &'a Relays,
    key: u64,
}

impl Drop for Followed<'_> {
    fn drop(&mut self) {
        self.relays.lock().retain(|(key, _, _)| *key != self.key);
    }
}

impl Relays {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Option<String>, Relay)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows the call `message` (a request) while the guard lives, when its client takes
    /// relayed messages.
    pub(crate) fn follow(&self, message: &Value, relay: Option<&Relay>) -> Option<Followed<'_>> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let relay = relay?.clone();
        message.get("id")?;
        let token = message
            .pointer("/params/_meta/progressToken")
            .map(Value::to_string);
        let key = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().push((key, token, relay));
        Some(Followed { relays: self, key })
    }

    /// Hands `notification` of the server to the call it is about, if one follows it: progress
    /// by its token, a log message to the call in flight longest. A client too slow to take it
    /// loses it, never its answer.
    pub(crate) fn deliver(&self, notification: &Value) {
        let method = notification.get("method").and_then(Value::as_str);
        if !method.is_some_and(|m| RELAYED.contains(&m)) {
            return;
        }
        let relays = self.lock();
        let to = if method == Some("notifications/progress") {
            let token = notification
                .pointer("/params/progressToken")
                .map(Value::to_string);
            relays
                .iter()
                .find(|(_, t, _)| token.is_some() && *t == token)
        } else {
            relays.first()
        };
        if let Some((_, _, relay)) = to {
            let _ = relay.try_send(notification.clone());
        }
    }

    /// Hands `request`, the server's of the client, to the call in flight longest, whose
    /// stream lets it through or refuses it by policy; false when no call takes it.
    pub(crate) fn ask(&self, request: &Value) -> bool {
        self.lock()
            .first()
            .is_some_and(|(_, _, relay)| relay.try_send(request.clone()).is_ok())
    }
}

/// Why a stdio session could not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StdioError {
    /// The process could not be started, or the message could not be written: nothing ran.
    NotSent(String),
    /// No live session of this agent and upstream has that id.
    UnknownSession,
    /// The agent holds as many processes as it may.
    Limit(usize),
    /// Sent, and no usable answer came (the process exited, answered too much, or too late).
    Unanswered(String),
}

struct Session {
    agent: String,
    upstream: String,
    /// The server as the policy named it when the session started.
    server: StdioServer,
    stdin: tokio::sync::Mutex<ChildStdin>,
    pending: Pending,
    relays: Arc<Relays>,
    last_used: Mutex<Instant>,
    /// Killed when the session is dropped (`kill_on_drop`).
    child: Mutex<Child>,
}

impl Session {
    fn exited(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        !matches!(child.try_wait(), Ok(None))
    }
}

/// The stdio processes of one gateway, by session id.
pub(crate) struct StdioSessions {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    idle: Duration,
    per_agent: usize,
    reaper: std::sync::Once,
}

impl std::fmt::Debug for StdioSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StdioSessions")
            .field("sessions", &self.count())
            .field("idle", &self.idle)
            .field("per_agent", &self.per_agent)
            .finish()
    }
}

impl Default for StdioSessions {
    fn default() -> Self {
        Self::new(DEFAULT_IDLE, DEFAULT_PER_AGENT)
    }
}

/// What the reaper asks of the gateway about a session: may it live on?
pub(crate) trait Keeper: Send + Sync + 'static {
    /// Whether `agent` may still use `server` as `upstream` (kill switch off, policy unchanged).
    fn keeps(&self, agent: &str, upstream: &str, server: &StdioServer) -> bool;
    /// The registry to reap.
    fn sessions(&self) -> &StdioSessions;
}

impl StdioSessions {
    pub(crate) fn new(idle: Duration, per_agent: usize) -> Self {
        Self {
            sessions: Mutex::default(),
            idle,
            per_agent,
            reaper: std::sync::Once::new(),
        }
    }

    fn count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts, once, the task that ends idle, killed, changed and exited sessions every second;
    /// it stops when the gateway is gone.
    pub(crate) fn reap_for<K: Keeper>(&self, keeper: Weak<K>) {
        self.reaper.call_once(|| {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let Some(keeper) = keeper.upgrade() else {
                        return;
                    };
                    keeper
                        .sessions()
                        .reap(|agent, upstream, server| keeper.keeps(agent, upstream, server));
                }
            });
        });
    }

    fn reap(&self, keeps: impl Fn(&str, &str, &StdioServer) -> bool) {
        let now = Instant::now();
        let mut ended = Vec::new();
        self.lock().retain(|id, session| {
            let idle = now
                .duration_since(*session.last_used.lock().unwrap_or_else(|e| e.into_inner()))
                > self.idle;
            let why = if session.exited() {
                Some("the process exited")
            } else if idle {
                Some("idle")
            } else if !keeps(&session.agent, &session.upstream, &session.server) {
                Some("the agent's kill switch is engaged or its policy no longer names this server")
            } else {
                None
            };
            if let Some(why) = why {
                ended.push((id.clone(), session.clone(), why));
            }
            why.is_none()
        });
        for (id, session, why) in ended {
            tracing::info!(session = %id, agent = %session.agent, upstream = %session.upstream, why, "stdio MCP server ended");
            // Dropping the last handle kills the process (kill_on_drop).
        }
    }

    /// Starts `server` for `agent`'s new session at `upstream`; returns the session id.
    pub(crate) fn start(
        &self,
        agent: &str,
        upstream: &str,
        server: &StdioServer,
        credential: Option<String>,
        answer_limit: usize,
    ) -> Result<String, StdioError> {
        // Held from the count to the insert (nothing here awaits), so that concurrent starts
        // cannot pass the bound together.
        let mut sessions = self.lock();
        let held = sessions.values().filter(|s| s.agent == agent).count();
        if held >= self.per_agent {
            return Err(StdioError::Limit(self.per_agent));
        }
        let mut command = Command::new(&server.command);
        command
            .args(&server.args)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for name in ["PATH", "HOME", "LANG"] {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        command.envs(&server.env);
        if let (Some(name), Some(value)) = (&server.credential_env, credential) {
            command.env(name, value);
        }
        let mut child = command.spawn().map_err(|e| {
            StdioError::NotSent(format!(
                "upstream {upstream:?}: could not start {:?}: {e}",
                server.command
            ))
        })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(StdioError::NotSent(format!(
                "upstream {upstream:?}: the process has no pipes"
            )));
        };
        let id = session_id().map_err(|e| {
            StdioError::NotSent(format!(
                "upstream {upstream:?}: no randomness for a session id: {e}"
            ))
        })?;
        let pending: Pending = Arc::default();
        let relays: Arc<Relays> = Arc::default();
        let session = Arc::new(Session {
            agent: agent.to_owned(),
            upstream: upstream.to_owned(),
            server: server.clone(),
            stdin: tokio::sync::Mutex::new(stdin),
            pending: pending.clone(),
            relays: relays.clone(),
            last_used: Mutex::new(Instant::now()),
            child: Mutex::new(child),
        });
        let (agent_name, upstream_name) = (agent.to_owned(), upstream.to_owned());
        tokio::spawn(log_stderr(
            stderr,
            agent_name.clone(),
            upstream_name.clone(),
        ));
        tokio::spawn(read_answers(
            BufReader::new(stdout),
            pending,
            relays,
            Arc::downgrade(&session),
            answer_limit,
            upstream_name,
        ));
        sessions.insert(id.clone(), session);
        tracing::info!(session = %id, agent = %agent_name, upstream, command = %server.command, "stdio MCP server started");
        Ok(id)
    }

    /// Sends `message` in `agent`'s session `id` at `upstream` and waits for its answer (none for
    /// a notification); what the server says about the call meanwhile goes to `relay`.
    pub(crate) async fn request(
        &self,
        id: &str,
        agent: &str,
        upstream: &str,
        message: &Value,
        timeout: Duration,
        relay: Option<&Relay>,
    ) -> Result<Option<Value>, StdioError> {
        let session = self
            .lock()
            .get(id)
            .filter(|s| s.agent == agent && s.upstream == upstream)
            .cloned()
            .ok_or(StdioError::UnknownSession)?;
        *session.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        let _followed = session.relays.follow(message, relay);
        // A request waits for its answer; a notification, or the client's answer to the
        // server's own request, does not.
        let waiting = match message
            .get("id")
            .filter(|_| message.get("method").is_some())
        {
            Some(request) => {
                let (tx, rx) = oneshot::channel();
                session
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(request.to_string(), tx);
                Some((request.to_string(), rx))
            }
            None => None,
        };
        let mut line = message.to_string();
        line.push('\n');
        let written = {
            let mut stdin = session.stdin.lock().await;
            match stdin.write_all(line.as_bytes()).await {
                Ok(()) => stdin.flush().await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = written {
            if let Some((key, _)) = &waiting {
                session
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(key);
            }
            return Err(StdioError::NotSent(format!(
                "upstream {upstream:?}: the stdio server does not take input ({e})"
            )));
        }
        let Some((key, rx)) = waiting else {
            return Ok(None);
        };
        let answer = tokio::time::timeout(timeout, rx).await;
        session
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        *session.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        match answer {
            Ok(Ok(answer)) => Ok(Some(answer)),
            Ok(Err(_)) => Err(StdioError::Unanswered(format!(
                "upstream {upstream:?}: the stdio server exited, or answered more than the gateway \
                 reads, before it answered"
            ))),
            Err(_) => Err(StdioError::Unanswered(format!(
                "upstream {upstream:?} did not answer within {timeout:?} (mcp.timeoutSeconds, \
                 or the gateway's --mcp-call-timeout)"
            ))),
        }
    }

    /// Ends `agent`'s session `id` at `upstream` (its process is killed); false if it had none.
    pub(crate) fn end(&self, id: &str, agent: &str, upstream: &str) -> bool {
        let mut sessions = self.lock();
        let mine = sessions
            .get(id)
            .is_some_and(|s| s.agent == agent && s.upstream == upstream);
        if mine {
            sessions.remove(id);
            tracing::info!(session = %id, agent, upstream, "stdio MCP server ended by its client");
        }
        mine
    }

    /// Ends every session (the gateway is stopping).
    pub(crate) fn end_all(&self) {
        let ended = std::mem::take(&mut *self.lock());
        if !ended.is_empty() {
            tracing::info!(
                count = ended.len(),
                "stdio MCP servers ended with the gateway"
            );
        }
    }

    /// The pid of a session's process, for tests.
    #[doc(hidden)]
    pub fn pids(&self) -> Vec<u32> {
        self.lock()
            .values()
            .filter_map(|s| s.child.lock().unwrap_or_else(|e| e.into_inner()).id())
            .collect()
    }
}

/// 128 random bits from the kernel, hex: a session id nobody can guess.
pub(crate) fn session_id() -> std::io::Result<String> {
    random_bytes::<16>().map(hex::encode)
}

/// `N` bytes from the kernel's random source.
pub(crate) fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    use std::io::Read as _;
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// What one bounded line read found.
enum Line {
    Text,
    TooLong,
    End,
}

/// Reads one line of at most `limit` bytes into `line`; a longer line is skipped to its end.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<Line> {
    line.clear();
    let mut too_long = false;
    loop {
        let buffer = reader.fill_buf().await?;
        if buffer.is_empty() {
            return Ok(if line.is_empty() && !too_long {
                Line::End
            } else if too_long {
                Line::TooLong
            } else {
                Line::Text
            });
        }
        let (chunk, done) = match buffer.iter().position(|b| *b == b'\n') {
            Some(end) => (&buffer[..end], Some(end + 1)),
            None => (buffer, None),
        };
        if !too_long {
            if line.len() + chunk.len() > limit {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let used = done.unwrap_or(buffer.len());
        reader.consume(used);
        if done.is_some() {
            return Ok(if too_long { Line::TooLong } else { Line::Text });
        }
    }
}

/// Hands each answer on stdout to the request waiting for it and each progress or log
/// notification to the call it is about; answers the server's own requests with an error; logs
/// the rest. A line over the limit fails every waiting request (the gateway
/// cannot tell whose it was); the end of stdout fails them all.
async fn read_answers<R: AsyncBufRead + Unpin>(
    mut stdout: R,
    pending: Pending,
    relays: Arc<Relays>,
    session: Weak<Session>,
    limit: usize,
    upstream: String,
) {
    let mut line = Vec::new();
    loop {
        match read_line(&mut stdout, &mut line, limit).await {
            Ok(Line::Text) => {}
            Ok(Line::TooLong) => {
                tracing::warn!(%upstream, limit, "stdio MCP server wrote a line past the answer limit");
                pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
                continue;
            }
            Ok(Line::End) | Err(_) => break,
        }
        let Ok(message) = serde_json::from_slice::<Value>(&line) else {
            tracing::debug!(%upstream, "stdio MCP server wrote a line that is not JSON");
            continue;
        };
        let is_answer = message.get("result").is_some() || message.get("error").is_some();
        match (message.get("id"), message.get("method"), is_answer) {
            (Some(id), None, true) => {
                let waiting = pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id.to_string());
                if let Some(waiting) = waiting {
                    let _ = waiting.send(message);
                }
            }
            (Some(_), Some(_), false) if relays.ask(&message) => {}
            (Some(id), Some(method), false) => {
                // A request to the client that no call's stream takes: refused at once.
                let refusal = json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601,
                    "message": format!("Tollgate does not relay {method} to the client")}});
                if let Some(session) = session.upgrade() {
                    let mut stdin = session.stdin.lock().await;
                    let _ = stdin.write_all(format!("{refusal}\n").as_bytes()).await;
                    let _ = stdin.flush().await;
                }
            }
            (None, Some(_), false) => relays.deliver(&message),
            _ => tracing::debug!(%upstream, "stdio MCP server message dropped"),
        }
    }
    pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

async fn log_stderr(stderr: tokio::process::ChildStderr, agent: String, upstream: String) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        match read_line(&mut reader, &mut line, STDERR_LINE).await {
            Ok(Line::Text) => {
                let text = String::from_utf8_lossy(&line);
                tracing::info!(%agent, %upstream, stderr = %text.trim_end(), "stdio MCP server");
            }
            Ok(Line::TooLong) => {
                tracing::info!(%agent, %upstream, "stdio MCP server wrote a stderr line past {STDERR_LINE} bytes");
            }
            Ok(Line::End) | Err(_) => return,
        }
    }
}
