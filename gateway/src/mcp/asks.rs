//! Requests an MCP server makes of the agent's client while a call runs (elicitation, sampling,
//! roots), for the upstreams whose policy lets them through (`mcp.serverRequests`).
//!
//! - The client's capabilities for them reach the server only when the policy names them
//!   ([`without_client_capabilities`]), so a server asks only what it may.
//! - A request the server makes inside a call's answer stream (streamable HTTP, stdio, HTTP+SSE,
//!   the stdio bridge) goes to the client in the stream of the call it belongs to (or on the
//!   session's GET stream, where the server sent it there), under an id of the gateway's
//!   (random, bound to the agent, upstream and session), so no client can answer a request it
//!   was not asked and two upstreams' ids never meet at `/mcp`. It is recorded
//!   (`serverRequest`: what the server asked).
//! - The client answers with a JSON-RPC response POSTed like any message. It passes only when it
//!   names a request that waits in this session, the agent's kill switch is off and the policy
//!   still lets the server ask; it is recorded (`clientAnswer`: what the person or the model
//!   said) and passed to the server under the server's own id.
//! - Anything else is answered with an error at once, so the server never waits for an answer
//!   that cannot come, and recorded: a request the policy does not let through, one made to a
//!   client that takes no stream, one past the agent's bound ([`PER_AGENT`]).
//! - At 2026-07-28 the server asks in an `input_required` result instead, and the client answers
//!   in its retry's `inputResponses`: both pass by the same policy ([`input_required`],
//!   [`retry_of`]) and are recorded alike.
//!
//! Which kinds an upstream may ask is the compiled policy's to say
//! (`CompiledPolicy::lets_server_ask`).

use super::*;

use std::collections::HashMap;
use std::sync::Mutex;

use tollgate_crds::policy::ServerRequest;

/// The most requests of servers an agent's clients may leave unanswered at a time.
pub(crate) const PER_AGENT: usize = 32;

/// The prefix of the ids the gateway gives the requests it relays.
const ID_PREFIX: &str = "tollgate-ask-";

/// One request of a server that waits for the client's answer.
struct Ask {
    agent: String,
    upstream: String,
    /// The upstream session the request came in.
    session: Option<HeaderValue>,
    /// The server's own id for it.
    id: Value,
    method: String,
    run: Option<String>,
    /// Past this, the server has given up on it (the call's timeout).
    expires: Instant,
}

/// The requests of servers waiting for their clients' answers, by the id the client sees.
#[derive(Default)]
pub(crate) struct Asks(Mutex<HashMap<String, Ask>>);

impl std::fmt::Debug for Asks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Asks").field(&self.lock().len()).finish()
    }
}

impl Asks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Ask>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `ask` until it is answered or expires; the id the client sees for it.
    fn open(&self, ask: Ask) -> Result<String, String> {
        let now = Instant::now();
        let mut asks = self.lock();
        asks.retain(|_, a| a.expires > now);
        if asks.values().filter(|a| a.agent == ask.agent).count() >= PER_AGENT {
            return Err(format!(
                "agent {} leaves {PER_AGENT} requests of servers unanswered already, the most it may",
                ask.agent
            ));
        }
        let key = crate::stdio::random_bytes::<12>()
            .map(|bytes| format!("{ID_PREFIX}{}", hex::encode(bytes)))
            .map_err(|e| format!("no randomness for the request's id: {e}"))?;
        asks.insert(key.clone(), ask);
        Ok(key)
    }

    /// The request `key` of `agent`, taken when it came in a session `belongs` accepts and has
    /// not expired; otherwise it stays (another agent cannot spend it).
    fn take(
        &self,
        agent: &str,
        key: &str,
        belongs: impl Fn(&str, Option<&HeaderValue>) -> bool,
    ) -> Option<Ask> {
        let mut asks = self.lock();
        let ask = asks.get(key)?;
        let yours = ask.agent == agent && belongs(&ask.upstream, ask.session.as_ref());
        if !yours {
            return None;
        }
        let ask = asks.remove(key)?;
        (ask.expires > Instant::now()).then_some(ask)
    }

    fn forget(&self, key: &str) {
        self.lock().remove(key);
    }
}

/// `message` as the upstream may see it: the client's capabilities (in `initialize`, and in the
/// `_meta` of a 2026-07-28 request) cut to the requests `allowed` lets the server make of the
/// client; a server told the client can answer others would ask, and wait.
pub(super) fn without_client_capabilities(message: &Value, allowed: &[ServerRequest]) -> Value {
    let mut message = message.clone();
    let keep = |capabilities: &mut Value| {
        if let Some(capabilities) = capabilities.as_object_mut() {
            capabilities.retain(|name, _| allowed.iter().any(|kind| kind.capability() == name));
        } else {
            *capabilities = json!({});
        }
    };
    if message.get("method").and_then(Value::as_str) == Some("initialize")
        && let Some(capabilities) = message.pointer_mut("/params/capabilities")
    {
        keep(capabilities);
    }
    if let Some(capabilities) =
        message.pointer_mut("/params/_meta/io.modelcontextprotocol~1clientCapabilities")
    {
        keep(capabilities);
    }
    message
}

/// What of `message`, which the server of `route` sent while a call ran, goes to the client:
/// a notification as it is; a request the policy lets through under the gateway's id, once
/// recorded; nothing for a request refused (answered with an error, and recorded).
pub(super) async fn pass(route: Route<'_>, mut message: Value) -> Option<Value> {
    let (Some(id), Some(method)) = (
        message.get("id").cloned(),
        message
            .get("method")
            .and_then(Value::as_str)
            .map(str::to_owned),
    ) else {
        return Some(message);
    };
    let Route {
        gateway,
        holder,
        url,
        upstream,
        headers,
    } = route;
    let allowed = policy_of(gateway, holder).is_some_and(|p| p.lets_server_ask(upstream, &method));
    let opened = if !allowed {
        Err(format!(
            "the policy does not let upstream {upstream:?} make it of the client \
             (mcp.serverRequests)"
        ))
    } else if killed(gateway, holder) {
        Err(format!("agent {}'s kill switch is engaged", holder.agent))
    } else {
        let (timeout, _) = call_timeout(gateway, url);
        gateway.asks.open(Ask {
            agent: holder.agent.clone(),
            upstream: upstream.to_owned(),
            session: headers.get(SESSION_HEADER).cloned(),
            id: id.clone(),
            method: method.clone(),
            run: run_of(headers).ok(),
            expires: Instant::now() + timeout,
        })
    };
    let key = match opened {
        Ok(key) => key,
        Err(why) => {
            refuse_upstream(route, &id, &method, why).await;
            return None;
        }
    };
    let mut entry = Entry::new(
        (gateway.now)(),
        Event::ServerRequest,
        identity_of(Some(holder)),
    );
    entry.agent = Some(holder.agent.clone());
    entry.run = run_of(headers).ok();
    entry.tool = Some(method.clone());
    if let Some(params) = message.get("params") {
        entry.set_arguments(&gateway.redactor, params);
    }
    if let Err(e) = gateway.audit.append(entry).await {
        gateway.asks.forget(&key);
        let why = format!("the audit trail is unavailable ({e})");
        refuse_upstream(route, &id, &method, why).await;
        return None;
    }
    message["id"] = json!(key);
    Some(message)
}

/// Answers the server's request `id` with an error saying `why`, and records the refusal.
async fn refuse_upstream(route: Route<'_>, id: &Value, method: &str, why: String) {
    let Route {
        gateway,
        holder,
        url,
        upstream,
        headers,
    } = route;
    let why = format!("the server's request {method} was answered with an error: {why}");
    let error = json!({"jsonrpc": "2.0", "id": id, "error": {
        "code": codes::METHOD_NOT_FOUND, "message": why}});
    if let Err(e) = send(gateway, holder, url, upstream, headers, &error, None).await {
        tracing::warn!(%upstream, error = %e, "could not answer the server's request");
    }
    if let Err(refusal) = gateway.reject(Some(holder), upstream, why).await {
        tracing::error!(message = %refusal.message, "a refused server request could not be recorded");
    }
}

/// The most input requests one round of a 2026-07-28 call may carry, and answers its retry.
pub(super) const INPUT_ROUND: usize = 16;

/// What a 2026-07-28 retry of a call carries back to its server: the client's answers to the
/// input requests of the round before (`inputResponses`), and the server's opaque
/// `requestState`. Each answer must be what a request the policy lets the server make is answered
/// with (an elicitation's `action`, a sample's `role` and `model`, a `roots` list); the server
/// checks the rest against its own state.
#[derive(Debug, Default)]
pub(super) struct Retry {
    pub(super) responses: Option<Map<String, Value>>,
    pub(super) state: Option<Value>,
}

/// The kind of request `answer` answers, by its shape.
fn answered(answer: &Value) -> Option<ServerRequest> {
    if answer.get("action").is_some_and(Value::is_string) {
        Some(ServerRequest::Elicitation)
    } else if answer.get("role").is_some() && answer.get("model").is_some() {
        Some(ServerRequest::Sampling)
    } else if answer.get("roots").is_some_and(Value::is_array) {
        Some(ServerRequest::Roots)
    } else {
        None
    }
}

/// The retry fields of a call's `params` for `upstream`, checked against `policy`.
pub(super) fn retry_of(
    params: &Value,
    policy: Option<&tollgate_engine::CompiledPolicy>,
    upstream: &str,
) -> Result<Retry, String> {
    let mut retry = Retry::default();
    match params.get("requestState") {
        None => {}
        Some(state @ Value::String(_)) => retry.state = Some(state.clone()),
        Some(_) => return Err("params.requestState must be a string".to_owned()),
    }
    let responses = match params.get("inputResponses") {
        None => return Ok(retry),
        Some(Value::Object(responses)) => responses,
        Some(_) => return Err("params.inputResponses must be an object".to_owned()),
    };
    if responses.len() > INPUT_ROUND {
        return Err(format!(
            "params.inputResponses holds {} answers, more than the {INPUT_ROUND} a round may",
            responses.len()
        ));
    }
    for (key, answer) in responses {
        let Some(kind) = answered(answer) else {
            return Err(format!(
                "params.inputResponses.{key} is no answer to an elicitation, a sampling or a \
                 roots request"
            ));
        };
        if !policy.is_some_and(|p| p.lets_server_ask(upstream, kind.method())) {
            return Err(format!(
                "params.inputResponses.{key} answers a request of kind {kind:?}, which the \
                 policy does not let upstream {upstream:?} make of the client (mcp.serverRequests)"
            ));
        }
    }
    retry.responses = Some(responses.clone());
    Ok(retry)
}

/// Records each answer of a 2026-07-28 retry (`clientAnswer`, its method inferred from its
/// shape, its key in `arguments`).
pub(super) async fn record_answers(
    gateway: &Gateway,
    holder: &Caller,
    run: Option<&str>,
    responses: &Map<String, Value>,
) -> Result<(), tollgate_audit::AppendError> {
    for (key, answer) in responses {
        let mut entry = Entry::new(
            (gateway.now)(),
            Event::ClientAnswer,
            identity_of(Some(holder)),
        );
        entry.agent = Some(holder.agent.clone());
        entry.run = run.map(str::to_owned);
        entry.tool = answered(answer).map(|kind| kind.method().to_owned());
        entry.set_arguments(&gateway.redactor, &json!({"inputResponse": key}));
        entry.set_result(&gateway.redactor, answer);
        gateway.audit.append(entry).await?;
    }
    Ok(())
}

/// A 2026-07-28 `input_required` result of the call on `route`: each of its input requests must
/// be one the policy lets the server make, with the agent's kill switch off; each is then
/// recorded (`serverRequest`) and the result, cut to what such a result says (no tool output
/// rides past the tool's `resultFields` in it), passes to the client, which answers on retry.
/// Otherwise the reason, and the result must not pass.
pub(super) async fn input_required(
    route: Route<'_>,
    run: Option<&str>,
    result: &mut Value,
) -> Result<(), String> {
    if let Some(result) = result.as_object_mut() {
        result.retain(|key, _| {
            matches!(
                key.as_str(),
                "resultType" | "inputRequests" | "requestState" | "_meta"
            )
        });
    }
    let Route {
        gateway,
        holder,
        upstream,
        ..
    } = route;
    let requests = match result.get("inputRequests") {
        None => return Ok(()),
        Some(Value::Object(requests)) => requests,
        Some(_) => return Err("the server's inputRequests is not an object".to_owned()),
    };
    if requests.len() > INPUT_ROUND {
        return Err(format!(
            "the server asked {} questions at once, more than the {INPUT_ROUND} a round may",
            requests.len()
        ));
    }
    let policy = policy_of(gateway, holder);
    for (key, request) in requests {
        let method = request.get("method").and_then(Value::as_str).unwrap_or("");
        let allowed = policy
            .as_ref()
            .is_some_and(|p| p.lets_server_ask(upstream, method));
        if !allowed {
            return Err(format!(
                "the server's input request {key:?} ({method}) is not one the policy lets \
                 upstream {upstream:?} make of the client (mcp.serverRequests)"
            ));
        }
    }
    if killed(gateway, holder) {
        return Err(format!("agent {}'s kill switch is engaged", holder.agent));
    }
    for (key, request) in requests {
        let mut entry = Entry::new(
            (gateway.now)(),
            Event::ServerRequest,
            identity_of(Some(holder)),
        );
        entry.agent = Some(holder.agent.clone());
        entry.run = run.map(str::to_owned);
        entry.tool = request
            .get("method")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let mut asked = request.get("params").cloned().unwrap_or_else(|| json!({}));
        if let Some(asked) = asked.as_object_mut() {
            asked.insert("inputRequest".to_owned(), json!(key));
        }
        entry.set_arguments(&gateway.redactor, &asked);
        gateway
            .audit
            .append(entry)
            .await
            .map_err(|e| format!("the audit trail is unavailable ({e})"))?;
    }
    Ok(())
}

fn killed(gateway: &Gateway, holder: &Caller) -> bool {
    gateway
        .policies
        .agent(&holder.agent)
        .is_none_or(|agent| agent.killed || gateway.escalation.holds(&agent.id, agent.killed))
}

/// Whether `message` is a JSON-RPC response (it has no method, and a result or an error).
pub(crate) fn is_answer(message: &Map<String, Value>) -> bool {
    !message.contains_key("method")
        && (message.contains_key("result") || message.contains_key("error"))
}

/// The id of a client's answer to a server's request, once its shape is checked.
fn check_answer(message: &Map<String, Value>) -> Result<String, String> {
    if message.get("jsonrpc") != Some(&Value::String("2.0".to_owned())) {
        return Err("a JSON-RPC message must carry \"jsonrpc\": \"2.0\"".to_owned());
    }
    for key in message.keys() {
        if !matches!(key.as_str(), "jsonrpc" | "id" | "result" | "error") {
            return Err(format!("unexpected member {key:?} in a JSON-RPC response"));
        }
    }
    match (message.get("result"), message.get("error")) {
        (Some(Value::Object(_)), None) => {}
        (Some(_), None) => return Err("a response's \"result\" must be an object".to_owned()),
        (None, Some(Value::Object(error))) => {
            let code = error.get("code").is_some_and(|c| c.is_i64());
            let message = error.get("message").is_some_and(Value::is_string);
            let known = error
                .keys()
                .all(|k| matches!(k.as_str(), "code" | "message" | "data"));
            if !(code && message && known) {
                return Err(
                    "a response's \"error\" must hold an integer \"code\", a string \"message\" \
                     and at most \"data\""
                        .to_owned(),
                );
            }
        }
        (None, Some(_)) => return Err("a response's \"error\" must be an object".to_owned()),
        _ => return Err("a response holds a \"result\" or an \"error\", not both".to_owned()),
    }
    match message.get("id") {
        Some(Value::String(id)) if id.starts_with(ID_PREFIX) => Ok(id.clone()),
        Some(id) => Err(format!(
            "response {id} answers no request of a server: Tollgate sends the requests it relays \
             under ids starting {ID_PREFIX:?}"
        )),
        None => Err("a response needs the \"id\" of the request it answers".to_owned()),
    }
}

/// The client's answer `message` to a server's request, POSTed at `path` (an upstream's name, or
/// empty for `/mcp`) in a session `belongs` accepts: passed to the server that asked, under its
/// own id, once checked and recorded; otherwise refused (recorded) with the reason. 202 when the
/// server took it.
pub(crate) async fn answer(
    gateway: &Gateway,
    holder: &Caller,
    path: &str,
    headers: &HeaderMap,
    mut message: Map<String, Value>,
    belongs: impl Fn(&str, Option<&HeaderValue>) -> bool,
) -> Response {
    let reply_id = message.get("id").cloned().unwrap_or(Value::Null);
    let refused = async |problem: String| {
        refuse(
            gateway,
            Some(holder),
            path,
            StatusCode::BAD_REQUEST,
            reply_id.clone(),
            codes::INVALID_REQUEST,
            problem,
        )
        .await
    };
    let key = match check_answer(&message) {
        Ok(key) => key,
        Err(problem) => return refused(problem).await,
    };
    let Some(ask) = gateway.asks.take(&holder.agent, &key, belongs) else {
        return refused(format!(
            "response {key:?} answers no request a server made in this session that waits for \
             an answer (never made, answered already, or past its call's timeout)"
        ))
        .await;
    };
    let upstream = ask.upstream.as_str();
    let url = match upstream_url(gateway, holder, upstream) {
        Ok(url) => url,
        Err(refusal) => return refuse_with(gateway, holder, upstream, reply_id, refusal).await,
    };
    let mut headers = headers.clone();
    headers.remove(SESSION_HEADER);
    if let Some(session) = &ask.session {
        headers.insert(SESSION_HEADER, session.clone());
    }
    let route = Route {
        gateway,
        holder,
        url: &url,
        upstream,
        headers: &headers,
    };
    let still_allowed =
        policy_of(gateway, holder).is_some_and(|p| p.lets_server_ask(upstream, &ask.method));
    let withheld = if killed(gateway, holder) {
        Some(format!(
            "agent {}'s kill switch is engaged: its client's answer was not passed on",
            holder.agent
        ))
    } else if !still_allowed {
        Some(format!(
            "the policy no longer lets upstream {upstream:?} make {} of the client: its client's \
             answer was not passed on",
            ask.method
        ))
    } else {
        None
    };
    if let Some(why) = withheld {
        refuse_upstream(route, &ask.id, &ask.method, why.clone()).await;
        return rpc_error(StatusCode::FORBIDDEN, reply_id, codes::REFUSED, why, None);
    }
    let mut entry = Entry::new(
        (gateway.now)(),
        Event::ClientAnswer,
        identity_of(Some(holder)),
    );
    entry.agent = Some(holder.agent.clone());
    entry.run = ask.run.clone();
    entry.tool = Some(ask.method.clone());
    match (message.get("result"), message.get("error")) {
        (Some(result), _) => entry.set_result(&gateway.redactor, result),
        (_, Some(error)) => entry.error = Some(format!("the client refused: {error}")),
        _ => {}
    }
    if let Err(e) = gateway.audit.append(entry).await {
        let why = format!("the audit trail is unavailable ({e})");
        refuse_upstream(route, &ask.id, &ask.method, why).await;
        return rpc_refusal(reply_id, &audit_unavailable(e));
    }
    message.insert("id".to_owned(), ask.id.clone());
    match send(
        gateway,
        holder,
        &url,
        upstream,
        &headers,
        &Value::Object(message),
        None,
    )
    .await
    {
        Ok(_) => StatusCode::ACCEPTED.into_response(),
        Err(e) => e.answer(reply_id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_capabilities_the_policy_names_reach_the_server() {
        let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "capabilities": {"elicitation": {"form": {}}, "sampling": {}, "roots": {"listChanged": true}}}});
        let cut = without_client_capabilities(&initialize, &[ServerRequest::Elicitation]);
        assert_eq!(
            cut["params"]["capabilities"],
            json!({"elicitation": {"form": {}}})
        );
        let cut = without_client_capabilities(&initialize, &[]);
        assert_eq!(cut["params"]["capabilities"], json!({}));
        let modern = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"_meta": {
            "io.modelcontextprotocol/clientCapabilities": {"sampling": {}, "roots": {}}}}});
        let cut = without_client_capabilities(&modern, &[ServerRequest::Roots]);
        assert_eq!(
            cut["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"],
            json!({"roots": {}})
        );
    }

    #[test]
    fn an_answer_names_a_relayed_request_and_nothing_else() {
        let answer = |value: Value| check_answer(value.as_object().unwrap());
        let id = format!("{ID_PREFIX}00ff");
        assert_eq!(
            answer(json!({"jsonrpc": "2.0", "id": id, "result": {"action": "accept"}})),
            Ok(id.clone())
        );
        assert_eq!(
            answer(json!({"jsonrpc": "2.0", "id": id, "error": {"code": -1, "message": "no"}})),
            Ok(id.clone())
        );
        for (bad, says) in [
            (
                json!({"jsonrpc": "2.0", "id": 0, "result": {}}),
                "answers no request",
            ),
            (
                json!({"jsonrpc": "2.0", "id": "7", "result": {}}),
                "answers no request",
            ),
            (json!({"jsonrpc": "2.0", "result": {}}), "needs the \"id\""),
            (json!({"jsonrpc": "1.0", "id": id, "result": {}}), "\"2.0\""),
            (
                json!({"jsonrpc": "2.0", "id": id, "result": 3}),
                "must be an object",
            ),
            (
                json!({"jsonrpc": "2.0", "id": id, "result": {}, "error": {}}),
                "not both",
            ),
            (
                json!({"jsonrpc": "2.0", "id": id, "error": {"code": "x", "message": "m"}}),
                "integer",
            ),
            (
                json!({"jsonrpc": "2.0", "id": id, "error": {"code": 1, "message": "m", "x": 1}}),
                "at most",
            ),
            (
                json!({"jsonrpc": "2.0", "id": id, "result": {}, "extra": 1}),
                "unexpected member \"extra\"",
            ),
        ] {
            let problem = answer(bad.clone()).unwrap_err();
            assert!(problem.contains(says), "{bad}: {problem}");
        }
    }

    #[test]
    fn a_request_is_taken_once_by_its_own_agent_and_session_before_it_expires() {
        let asks = Asks::default();
        let session = HeaderValue::from_static("s1");
        let ask = |agent: &str, expires: Instant| Ask {
            agent: agent.to_owned(),
            upstream: "crm".to_owned(),
            session: Some(session.clone()),
            id: json!(0),
            method: "elicitation/create".to_owned(),
            run: None,
            expires,
        };
        let later = Instant::now() + std::time::Duration::from_secs(60);
        let key = asks.open(ask("default/a", later)).unwrap();
        assert!(key.starts_with(ID_PREFIX) && key.len() == ID_PREFIX.len() + 24);
        let same = |_: &str, s: Option<&HeaderValue>| s == Some(&session);
        assert!(
            asks.take("default/b", &key, same).is_none(),
            "another agent"
        );
        assert!(
            asks.take("default/a", &key, |_, _| false).is_none(),
            "another session"
        );
        assert!(asks.take("default/a", &key, same).is_some());
        assert!(asks.take("default/a", &key, same).is_none(), "taken once");
        let expired = asks.open(ask("default/a", Instant::now())).unwrap();
        assert!(asks.take("default/a", &expired, same).is_none(), "expired");
        for _ in 0..PER_AGENT {
            asks.open(ask("default/a", later)).unwrap();
        }
        let over = asks.open(ask("default/a", later)).unwrap_err();
        assert!(over.contains("32 requests"), "{over}");
        asks.open(ask("default/b", later))
            .expect("another agent's bound is its own");
    }
}
