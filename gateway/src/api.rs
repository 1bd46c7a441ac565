//! The decision API over HTTP: who is calling (a key, or a token the apiserver reviews), the
//! request read strictly, `/v1/decide` and `/v1/report`.

use super::*;

pub(crate) async fn authenticate(
    gateway: &Gateway,
    headers: &HeaderMap,
) -> Result<Caller, Refusal> {
    authenticate_with(gateway, headers, false).await
}

/// Authenticates the caller's `Authorization: Bearer` credential; with `api_key`, Anthropic's
/// `x-api-key` header is read too (when there is no Authorization header), so its SDK works
/// with the agent's credential as its key.
pub(crate) async fn authenticate_with(
    gateway: &Gateway,
    headers: &HeaderMap,
    api_key: bool,
) -> Result<Caller, Refusal> {
    let token = bearer(headers, api_key)?;
    match &gateway.auth {
        Auth::Keys(keys) => match keys.holder(token) {
            Some(h) if h.role == keys::Role::Agent => Ok(Caller {
                username: format!("apikey:{}", h.name),
                agent: h.agent.clone(),
                pod: None,
                token_id: h.key_id.clone(),
            }),
            Some(h) => Err(Refusal::new(
                StatusCode::FORBIDDEN,
                RefusalCode::NotAnAgent,
                format!(
                    "key {:?} is an approver's: it decides approvals at /v1/approvals and makes \
                     no agent's calls",
                    h.name
                ),
            )
            .by(h.name.clone())),
            None => Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                RefusalCode::Unauthenticated,
                "the key is not known",
            )),
        },
        Auth::TokenReview(reviewer) => match &gateway.policies {
            Policies::Cluster(cluster) => reviewer.review(token, cluster).await,
            Policies::Dir(_) => Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                RefusalCode::Misconfigured,
                "token authentication needs the cluster policy source",
            )),
        },
    }
}

/// The credential a request presents: `Authorization: Bearer`, or with `api_key` Anthropic's
/// `x-api-key` when there is no Authorization header.
pub(crate) fn bearer(headers: &HeaderMap, api_key: bool) -> Result<&str, Refusal> {
    let key = headers
        .get("x-api-key")
        .filter(|_| api_key && !headers.contains_key(header::AUTHORIZATION));
    let token = if let Some(key) = key {
        key.to_str().unwrap_or_default().trim()
    } else {
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| {
                Refusal::new(
                    StatusCode::UNAUTHORIZED,
                    RefusalCode::Unauthenticated,
                    if api_key {
                        "no credential: send Authorization: Bearer <token> or x-api-key: <token>"
                    } else {
                        "no Authorization header: send Authorization: Bearer <token>"
                    },
                )
            })?
            .to_str()
            .unwrap_or_default();
        value.strip_prefix("Bearer ").ok_or_else(|| {
            Refusal::new(
                StatusCode::UNAUTHORIZED,
                RefusalCode::Unauthenticated,
                "the Authorization header must be Bearer <token>",
            )
        })?
    };
    if token.is_empty() {
        return Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            RefusalCode::Unauthenticated,
            "the credential is empty",
        ));
    }
    Ok(token)
}

pub(crate) fn identity_of(caller: Option<&Caller>) -> Identity {
    match caller {
        Some(c) => Identity {
            username: c.username.clone(),
            pod: c.pod.clone(),
            token_id: Some(c.token_id.clone()),
        },
        None => Identity {
            username: "anonymous".to_owned(),
            ..Identity::default()
        },
    }
}

/// Reads, authenticates and parses a request; a refusal is audited and answered.
async fn admit<T: for<'de> Deserialize<'de>>(
    gateway: &Gateway,
    headers: &HeaderMap,
    body: Body,
    path: &str,
) -> Result<(Caller, T), Refusal> {
    let refuse = async |holder: Option<&Caller>, refusal: Refusal| {
        gateway.refuse_recorded(holder, None, path, refusal).await
    };
    let holder = match authenticate(gateway, headers).await {
        Ok(holder) => holder,
        Err(refusal) => {
            let route = if path == "/v1/report" {
                "/v1/report"
            } else {
                "/v1/decide"
            };
            if gateway.summarized(route, &refusal) {
                return Err(refusal);
            }
            return Err(refuse(None, refusal).await);
        }
    };
    let holder = &holder;
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(bytes) => bytes,
        Err(_) => {
            return Err(refuse(
                Some(holder),
                Refusal::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    RefusalCode::PayloadTooLarge,
                    format!("the request body exceeds {MAX_BODY} bytes"),
                ),
            )
            .await);
        }
    };
    let parsed = canonical::parse_strict(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|value| match value {
            Value::Object(_) => serde_json::from_value::<T>(value).map_err(|e| e.to_string()),
            _ => Err("it must be a JSON object".to_owned()),
        });
    match parsed {
        Ok(request) => Ok((holder.clone(), request)),
        Err(e) => Err(refuse(
            Some(holder),
            Refusal::new(
                StatusCode::BAD_REQUEST,
                RefusalCode::MalformedRequest,
                format!("the request body is not a valid request: {e}"),
            ),
        )
        .await),
    }
}

pub(crate) fn run_id(body_run: Option<String>, headers: &HeaderMap) -> Result<String, Refusal> {
    let header_run = headers
        .get(RUN_HEADER)
        .map(|v| v.to_str().unwrap_or("\u{0}").to_owned());
    let run = match (body_run, header_run) {
        (Some(a), Some(b)) if a != b => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                RefusalCode::MalformedRequest,
                format!("runId {a:?} and the {RUN_HEADER} header {b:?} disagree"),
            ));
        }
        (Some(run), _) | (None, Some(run)) => run,
        (None, None) => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                RefusalCode::MalformedRequest,
                format!("a run id is required: runId in the body or the {RUN_HEADER} header"),
            ));
        }
    };
    if !valid_run_id(&run) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            RefusalCode::MalformedRequest,
            format!("run id {run:?} must be 1 to 128 characters of A-Z a-z 0-9 . _ : -"),
        ));
    }
    Ok(run)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DecideRequest {
    run_id: Option<String>,
    tool: String,
    #[serde(default = "empty_object")]
    arguments: Value,
    /// False: a call that needs approval returns at once (202) with its ApprovalRequest.
    #[serde(default = "yes")]
    wait: bool,
    /// Redeem this ApprovalRequest (its name) for exactly this call.
    approval: Option<String>,
}

fn yes() -> bool {
    true
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

pub(crate) fn counters(run: &RunState) -> Counters {
    Counters {
        steps: run.steps,
        tokens: run.tokens,
        cost_usd: run.cost.to_string(),
    }
}

pub(crate) fn policy_ref(policy: &CompiledPolicy) -> PolicyRef {
    PolicyRef::of(policy)
}

pub(crate) async fn decide(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let (holder, request) =
        match admit::<DecideRequest>(&gateway, &headers, body, "/v1/decide").await {
            Ok(ok) => ok,
            Err(refusal) => return refusal.into_response(),
        };
    let run = match run_id(request.run_id.clone(), &headers) {
        Ok(run) => run,
        Err(refusal) => {
            return gateway
                .refuse_recorded(Some(&holder), Some(&request.tool), "/v1/decide", refusal)
                .await
                .into_response();
        }
    };

    let mut ticket = None;
    let decided = if let Some(name) = &request.approval {
        // Redeeming an approval asked for earlier without waiting.
        match gateway
            .redeem(&holder, &run, &request.tool, &request.arguments, name)
            .await
        {
            Ok(approvals::Redeemed::Settled(decided)) => *decided,
            Ok(approvals::Redeemed::Pending(pending)) => {
                return (
                    StatusCode::ACCEPTED,
                    axum::Json(json!({"decision": "requireApproval", "runId": run,
                        "message": format!("ApprovalRequest {}/{} is not decided yet", pending.namespace, pending.name),
                        "approvalRequest": pending.json()})),
                )
                    .into_response();
            }
            Err(refusal) => return refusal.into_response(),
        }
    } else {
        let decided = match gateway
            .decide_call(&holder, &run, &request.tool, &request.arguments, started)
            .await
        {
            Ok(decided) => decided,
            Err(refusal) => return refusal.into_response(),
        };
        if request.wait {
            // A call that needs people waits for them here (in a cluster).
            match gateway
                .await_approval(&holder, &run, &request.tool, &request.arguments, decided)
                .await
            {
                Ok(decided) => decided,
                Err(refusal) => return refusal.into_response(),
            }
        } else {
            match gateway
                .request_approval(&holder, &run, &request.tool, &request.arguments, decided)
                .await
            {
                Ok((decided, created)) => {
                    ticket = created;
                    decided
                }
                Err(refusal) => return refusal.into_response(),
            }
        }
    };
    let (decision, step, appended) = (decided.decision, decided.step, decided.audit);
    let mut body = serde_json::to_value(&decision).expect("a decision serialises");
    if let Some(ticket) = &ticket
        && let Value::Object(map) = &mut body
    {
        map.insert("approvalRequest".into(), ticket.json());
    }
    if let Value::Object(map) = &mut body {
        map.insert("runId".into(), Value::String(run));
        if let Some(step) = step {
            map.insert("step".into(), step.into());
        }
        map.insert(
            "audit".into(),
            json!({"chain": appended.chain.as_ref(), "seq": appended.seq}),
        );
    }
    let status = if ticket.is_some() {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    (status, axum::Json(body)).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ReportRequest {
    run_id: Option<String>,
    /// The step the decision answered (`step`): a report is for one released call, once.
    step: u64,
    tool: String,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<String>,
}

pub(crate) async fn report(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let (holder, request) =
        match admit::<ReportRequest>(&gateway, &headers, body, "/v1/report").await {
            Ok(ok) => ok,
            Err(refusal) => return refusal.into_response(),
        };
    let identity = identity_of(Some(&holder));
    let now = (gateway.now)();
    let run = match run_id(request.run_id.clone(), &headers) {
        Ok(run) => run,
        Err(refusal) => {
            return gateway
                .refuse_recorded(Some(&holder), Some(&request.tool), "/v1/report", refusal)
                .await
                .into_response();
        }
    };
    let policy = match gateway
        .policies
        .agent(&holder.agent)
        .map(|a| a.policy.clone())
    {
        Some(Ok(policy)) => policy,
        unusable => {
            let refusal = match unusable {
                Some(Err(problem)) => Refusal::unusable_policy(&holder.agent, &problem),
                _ => Refusal::unknown_agent(&holder.agent),
            };
            return gateway
                .refuse_recorded(Some(&holder), Some(&request.tool), "/v1/report", refusal)
                .await
                .into_response();
        }
    };
    let usage = request.usage.clone().unwrap_or_default();
    if let Err(e) = usage.check() {
        let refusal = Refusal::new(
            StatusCode::BAD_REQUEST,
            RefusalCode::MalformedRequest,
            format!("the request body is not a valid request: {e}"),
        );
        return gateway
            .refuse_recorded(Some(&holder), Some(&request.tool), "/v1/report", refusal)
            .await
            .into_response();
    }
    let _following = match gateway.follow(&holder.agent, &policy).await {
        Ok(following) => following,
        Err(refusal) => return refusal.into_response(),
    };
    if let Err(refusal) = gateway.hydrate(&holder.agent, &run, &policy, now).await {
        return refusal.into_response();
    }
    let reported = {
        let state = gateway.agent_state(&holder.agent);
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        let AgentState { window, runs, .. } = &mut *state;
        // A run with no step has never started (with a trail, `hydrate` holds every run it
        // looked up, started or not).
        runs.get_mut(&run).filter(|r| r.steps > 0).map(|run_state| {
            match run_state.take_report(request.step) {
                Some(tool) if tool == request.tool => {}
                other => {
                    if let Some(tool) = other {
                        // Not this step's tool: the step stays for its own report.
                        run_state.await_report(request.step, &tool);
                    }
                    return Err(());
                }
            }
            let was_halted = run_state.halted.is_some();
            // A policy with a model provider is metered by the gateway: what the agent reports
            // is its claim, recorded and never charged.
            let breach = if policy.meters_models() {
                None
            } else {
                policy
                    .report(&usage, run_state, window, now)
                    .filter(|_| !was_halted)
            };
            Ok((breach, counters(run_state)))
        })
    };
    let (breach, run_counters) = match reported {
        Some(Ok(reported)) => reported,
        Some(Err(())) => {
            let refusal = Refusal::new(
                StatusCode::CONFLICT,
                RefusalCode::UnknownStep,
                format!(
                    "step {} of run {run:?} is not a call of {:?} that Tollgate let through and \
                     that waits for its report: a result is reported once, for a call that was \
                     allowed (or approved and released), with the step its decision answered",
                    request.step, request.tool
                ),
            );
            return gateway
                .refuse_recorded(Some(&holder), Some(&request.tool), "/v1/report", refusal)
                .await
                .into_response();
        }
        None => {
            let refusal = Refusal::new(
                StatusCode::CONFLICT,
                RefusalCode::UnknownRun,
                format!("run {run:?} has no decided call to report on"),
            );
            return gateway
                .refuse_recorded(Some(&holder), Some(&request.tool), "/v1/report", refusal)
                .await
                .into_response();
        }
    };
    let (visible, removed) = match (&request.result, policy.result_fields(&request.tool)) {
        (Some(result), Some(fields)) => {
            let (visible, removed) = tollgate_engine::redact(result, fields);
            (Some(visible), removed)
        }
        (result, None) => (result.clone(), Vec::new()),
        (None, Some(_)) => (None, Vec::new()),
    };

    let mut entry = Entry::new(now, Event::Report, identity.clone());
    entry.agent = Some(holder.agent.clone());
    entry.run = Some(run.clone());
    entry.step = Some(request.step);
    entry.tool = Some(request.tool.clone());
    if let Some(result) = &request.result {
        entry.set_result(&gateway.redactor, result);
    }
    entry.usage = request.usage.clone();
    entry.usage_claimed = request.usage.is_some() && policy.meters_models();
    entry.error = request.error.clone();
    entry.policy = Some(policy_ref(&policy));
    entry.counters = Some(run_counters.clone());
    entry.latency_us = Some(started.elapsed().as_micros() as u64);
    if let Err(e) = gateway.audit.append(entry).await {
        return audit_unavailable(e).into_response();
    }
    if !policy.meters_models() {
        gateway.count_charged(&holder.agent, "reported", usage.tokens, usage.cost);
    }
    let mut body = json!({
        "runId": run,
        "result": visible,
        "withheldFields": removed,
        "counters": {"steps": run_counters.steps, "tokens": run_counters.tokens, "costUSD": run_counters.cost_usd},
    });
    if let Some(ceiling) = breach {
        let mut halt = Entry::new(now, Event::Halt, identity);
        halt.agent = Some(holder.agent.clone());
        halt.run = Some(body["runId"].as_str().unwrap_or_default().to_owned());
        halt.policy = Some(policy_ref(&policy));
        halt.counters = Some(run_counters);
        halt.ceiling = Some(ceiling.clone());
        halt.error = Some(format!(
            "{} breached; the run is halted and every further call of it is refused",
            ceiling.clause()
        ));
        if let Err(e) = gateway.audit.append(halt).await {
            return audit_unavailable(e).into_response();
        }
        tracing::warn!(agent = %holder.agent, clause = ceiling.clause(), "run halted");
        if let Err(response) = gateway
            .escalate(&holder, &run, &policy, ceiling.clause())
            .await
        {
            return response.into_response();
        }
        body["halted"] = json!({"ceiling": ceiling, "clause": ceiling.clause()});
    }
    (StatusCode::OK, axum::Json(body)).into_response()
}
