//! HTTP+SSE upstreams (`mcp.transport: Sse`, MCP 2024-11-05), which many hosted servers still
//! serve alone: the gateway holds the server's GET stream for each MCP session of an agent, POSTs
//! each message where the stream's `endpoint` event says, and hands each answer on the stream to
//! the request waiting for it. The client speaks streamable HTTP to the gateway as to any other
//! upstream; the session id it gets is the gateway's own, random, bound to the agent and upstream.
//!
//! The endpoint must be on the stream's own origin (scheme, host and port): a server cannot send
//! the agent's credential anywhere else. A session ends on the client's `DELETE`, when idle, when
//! the stream ends, when the agent's kill switch is engaged or its policy changes, and with the
//! gateway; an agent holds at most `per_agent` at a time. Its progress and log notifications reach
//! the client in the answer stream of the call they are about ([`Relays`]), and its requests of
//! the client the stream of the call in flight, which lets them through or refuses them by
//! policy; a request no call takes is answered with an error at once. Other notifications are
//! dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::mcp::Relay;
use crate::stdio::{Relays, StdioError as SessionError};

/// The answers awaited on one stream, by JSON-RPC id.
type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>;

struct Session {
    agent: String,
    upstream: String,
    /// The stream's URL, as the policy named it when the session began.
    url: String,
    /// Where messages are POSTed (the `endpoint` event, on the stream's origin).
    post: reqwest::Url,
    /// The agent's credential header for this upstream.
    credential: Option<(String, String)>,
    /// The client the session's messages are POSTed with (the gateway's).
    http: reqwest::Client,
    pending: Pending,
    relays: Arc<Relays>,
    last_used: Mutex<Instant>,
    /// The task reading the stream; aborted (the stream closed) with the session.
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The HTTP+SSE sessions of one gateway, by session id.
pub(crate) struct SseSessions {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    idle: Duration,
    per_agent: usize,
    reaper: std::sync::Once,
}

impl std::fmt::Debug for SseSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseSessions")
            .field("sessions", &self.lock().len())
            .finish_non_exhaustive()
    }
}

impl Default for SseSessions {
    fn default() -> Self {
        Self {
            sessions: Mutex::default(),
            idle: crate::stdio::DEFAULT_IDLE,
            per_agent: crate::stdio::DEFAULT_PER_AGENT,
            reaper: std::sync::Once::new(),
        }
    }
}

/// What the reaper asks of the gateway: may `agent` still reach `url` as `upstream`?
pub(crate) trait Keeper: Send + Sync + 'static {
    fn keeps_stream(&self, agent: &str, upstream: &str, url: &str) -> bool;
    fn streams(&self) -> &SseSessions;
}

impl SseSessions {
    pub(crate) fn count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts, once, the task that ends idle, ended, killed and changed sessions every second.
    pub(crate) fn reap_for<K: Keeper>(&self, keeper: Weak<K>) {
        self.reaper.call_once(|| {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let Some(keeper) = keeper.upgrade() else {
                        return;
                    };
                    let streams = keeper.streams();
                    let now = Instant::now();
                    streams.lock().retain(|id, session| {
                        let used = *session.last_used.lock().unwrap_or_else(|e| e.into_inner());
                        let keep = !session.reader.is_finished()
                            && now.duration_since(used) <= streams.idle
                            && keeper.keeps_stream(&session.agent, &session.upstream, &session.url);
                        if !keep {
                            tracing::info!(session = %id, agent = %session.agent, upstream = %session.upstream, "HTTP+SSE upstream session ended");
                        }
                        keep
                    });
                }
            });
        });
    }

    /// Opens the server's stream for `agent`'s new session at `upstream`; returns the session id
    /// once the server has named where to POST.
    pub(crate) async fn open(
        &self,
        http: &reqwest::Client,
        agent: &str,
        upstream: &str,
        url: &str,
        credential: Option<(String, String)>,
        limit: usize,
    ) -> Result<String, SessionError> {
        let held = self.lock().values().filter(|s| s.agent == agent).count();
        if held >= self.per_agent {
            return Err(SessionError::Limit(self.per_agent));
        }
        let stream_url = reqwest::Url::parse(url).map_err(|e| {
            SessionError::NotSent(format!("upstream {upstream:?}: {url:?} is not a URL: {e}"))
        })?;
        let mut request = http
            .get(stream_url.clone())
            .header("accept", "text/event-stream");
        if let Some((header, value)) = &credential {
            request = request.header(header, value);
        }
        let not_sent =
            |what: String| SessionError::NotSent(format!("upstream {upstream:?}: {what}"));
        let response = tokio::time::timeout(Duration::from_secs(30), request.send())
            .await
            .map_err(|_| not_sent("its SSE stream did not answer within 30 s".into()))?
            .map_err(|e| not_sent(format!("its SSE stream cannot be opened: {e}")))?;
        if !response.status().is_success() {
            return Err(not_sent(format!(
                "its SSE stream answered HTTP {}",
                response.status()
            )));
        }
        let mut events = Box::pin(sse_events(response, limit));
        // The first event names where to POST.
        let endpoint = tokio::time::timeout(Duration::from_secs(30), async {
            use futures::StreamExt;
            while let Some((event, data)) = events.next().await {
                if event == "endpoint" {
                    return Some(data);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| not_sent("its SSE stream named no endpoint".into()))?;
        let post = stream_url
            .join(endpoint.trim())
            .map_err(|e| not_sent(format!("its endpoint {endpoint:?} is not a URL: {e}")))?;
        if post.origin() != stream_url.origin() {
            return Err(not_sent(format!(
                "its endpoint {post} is not on the stream's origin, where the agent's credential \
                 may go"
            )));
        }
        let pending: Pending = Arc::default();
        let relays: Arc<Relays> = Arc::default();
        let reader = tokio::spawn(read_answers(
            events,
            pending.clone(),
            relays.clone(),
            http.clone(),
            post.clone(),
            credential.clone(),
        ));
        let id = crate::stdio::session_id()
            .map_err(|e| not_sent(format!("no randomness for a session id: {e}")))?;
        let mut sessions = self.lock();
        // Counted again under the lock: concurrent opens cannot pass the bound together (a
        // session opened past it is dropped, which closes its stream).
        if sessions.values().filter(|s| s.agent == agent).count() >= self.per_agent {
            reader.abort();
            return Err(SessionError::Limit(self.per_agent));
        }
        sessions.insert(
            id.clone(),
            Arc::new(Session {
                agent: agent.to_owned(),
                upstream: upstream.to_owned(),
                url: url.to_owned(),
                post,
                credential,
                http: http.clone(),
                pending,
                relays,
                last_used: Mutex::new(Instant::now()),
                reader,
            }),
        );
        drop(sessions);
        tracing::info!(session = %id, agent, upstream, "HTTP+SSE upstream session opened");
        Ok(id)
    }

    /// Sends `message` in `agent`'s session `id` at `upstream` and waits for its answer on the
    /// stream (none for a notification).
    pub(crate) async fn request(
        &self,
        id: &str,
        agent: &str,
        upstream: &str,
        message: &Value,
        timeout: Duration,
        relay: Option<&Relay>,
    ) -> Result<Option<Value>, SessionError> {
        let session = self
            .lock()
            .get(id)
            .filter(|s| s.agent == agent && s.upstream == upstream)
            .cloned()
            .ok_or(SessionError::UnknownSession)?;
        *session.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        let _followed = session.relays.follow(message, relay);
        // A request waits for its answer; a notification, or the client's answer to the
        // server's own request, does not.
        let waiting = message
            .get("id")
            .filter(|_| message.get("method").is_some())
            .map(|request| {
                let (tx, rx) = oneshot::channel();
                session
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(request.to_string(), tx);
                (request.to_string(), rx)
            });
        let forget = |key: &str| {
            session
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(key);
        };
        let mut post = session
            .http
            .post(session.post.clone())
            .header("content-type", "application/json")
            .timeout(timeout)
            .body(message.to_string());
        if let Some((header, value)) = &session.credential {
            post = post.header(header, value);
        }
        let posted = post.send().await;
        let refused = match &posted {
            Ok(answer) if answer.status().is_success() => None,
            Ok(answer) if answer.status() == reqwest::StatusCode::NOT_FOUND => {
                Some(SessionError::UnknownSession)
            }
            Ok(answer) => Some(SessionError::NotSent(format!(
                "upstream {upstream:?} refused the message with HTTP {}",
                answer.status()
            ))),
            Err(e) => Some(SessionError::NotSent(format!(
                "upstream {upstream:?} unreachable: {e}"
            ))),
        };
        if let Some(refused) = refused {
            if let Some((key, _)) = &waiting {
                forget(key);
            }
            return Err(refused);
        }
        let Some((key, rx)) = waiting else {
            return Ok(None);
        };
        let answer = tokio::time::timeout(timeout, rx).await;
        forget(&key);
        *session.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        match answer {
            Ok(Ok(answer)) => Ok(Some(answer)),
            Ok(Err(_)) => Err(SessionError::Unanswered(format!(
                "upstream {upstream:?}: its SSE stream ended before it answered"
            ))),
            Err(_) => Err(SessionError::Unanswered(format!(
                "upstream {upstream:?} did not answer within {timeout:?} (mcp.timeoutSeconds, \
                 or the gateway's --mcp-call-timeout)"
            ))),
        }
    }

    /// Ends `agent`'s session `id` at `upstream` (its stream is closed); false if it had none.
    pub(crate) fn end(&self, id: &str, agent: &str, upstream: &str) -> bool {
        let mut sessions = self.lock();
        let mine = sessions
            .get(id)
            .is_some_and(|s| s.agent == agent && s.upstream == upstream);
        if mine {
            sessions.remove(id);
        }
        mine
    }

    /// Ends every session (the gateway is stopping).
    pub(crate) fn end_all(&self) {
        std::mem::take(&mut *self.lock());
    }
}

/// The events of an SSE response, as (event name, data), each at most `limit` bytes.
fn sse_events(
    response: reqwest::Response,
    limit: usize,
) -> impl futures::Stream<Item = (String, String)> {
    futures::stream::unfold(
        (response, Vec::<u8>::new(), false),
        move |(mut response, mut buffer, mut ended)| async move {
            loop {
                if let Some(end) = crate::mcp::event_end(&buffer, 0) {
                    let event: Vec<u8> = buffer.drain(..end).collect();
                    let text = String::from_utf8_lossy(&event);
                    let mut name = "message".to_owned();
                    let mut data = Vec::new();
                    for line in text.lines() {
                        if let Some(rest) = line.strip_prefix("event:") {
                            name = rest.trim().to_owned();
                        } else if let Some(rest) = line.strip_prefix("data:") {
                            data.push(rest.strip_prefix(' ').unwrap_or(rest).to_owned());
                        }
                    }
                    if data.is_empty() {
                        continue;
                    }
                    return Some(((name, data.join("\n")), (response, buffer, ended)));
                }
                if ended || buffer.len() > limit {
                    return None;
                }
                match response.chunk().await {
                    Ok(Some(chunk)) => buffer.extend_from_slice(&chunk),
                    Ok(None) | Err(_) => ended = true,
                }
            }
        },
    )
}

/// Hands each answer on the stream to the request waiting for it and each progress or log
/// notification to the call it is about; answers the server's own requests with an error; drops
/// the rest. The end of the stream fails every waiting request.
async fn read_answers(
    mut events: std::pin::Pin<Box<impl futures::Stream<Item = (String, String)>>>,
    pending: Pending,
    relays: Arc<Relays>,
    http: reqwest::Client,
    post: reqwest::Url,
    credential: Option<(String, String)>,
) {
    use futures::StreamExt;
    while let Some((event, data)) = events.next().await {
        if event != "message" {
            continue;
        }
        let Ok(message) = serde_json::from_str::<Value>(&data) else {
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
                let refusal = json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601,
                    "message": format!("Tollgate does not relay {method} to the client")}});
                let mut answer = http
                    .post(post.clone())
                    .header("content-type", "application/json")
                    .body(refusal.to_string());
                if let Some((header, value)) = &credential {
                    answer = answer.header(header, value);
                }
                let _ = answer.send().await;
            }
            (None, Some(_), false) => relays.deliver(&message),
            _ => {}
        }
    }
    pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
}
