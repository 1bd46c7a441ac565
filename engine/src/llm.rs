//! Model calls through the gateway's LLM proxy: which provider and model an agent may use, how
//! much of its run's token and cost ceilings one call may still spend, and what a call cost.
//!
//! The gateway meters; the engine decides. Before a call leaves, [`CompiledPolicy::grant_model_call`]
//! turns the run's remaining ceilings (less what calls still in flight have reserved) into an
//! output cap for this call, or refuses it; after the call, [`CompiledPolicy::charge_model_call`]
//! charges what the provider reported (or, without a report, the estimate), which may halt the run.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tollgate_crds::policy::{Capture, LlmApi};

use crate::budget::{Ceiling, RunState, Usage, WindowState};
use crate::compile::CompiledPolicy;
use crate::decision::{Decision, DenyCode};
use crate::evaluate::Agent;

/// One `spec.upstreams[].llm`, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmRoute {
    /// The provider's API style.
    pub api: LlmApi,
    /// The provider's base URL, without a trailing slash.
    pub url: String,
    /// The models the agent may name.
    pub models: BTreeSet<String>,
    /// The most output tokens one call may ask for.
    pub max_output_tokens: Option<u64>,
    /// What the trail keeps of prompts and completions.
    pub capture: Capture,
}

/// A model's price, in US dollars per million tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Price {
    /// Per million input tokens.
    pub input: Decimal,
    /// Per million input tokens read from the provider's prompt cache; the input price if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input: Option<Decimal>,
    /// Per million output tokens.
    pub output: Decimal,
}

/// A price table: what each model costs, as of a date.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Prices {
    /// The day the prices were read from the providers' price lists (YYYY-MM-DD).
    #[serde(default)]
    pub as_of: String,
    /// Prices by exact model name.
    #[serde(default)]
    pub models: BTreeMap<String, Price>,
}

impl Prices {
    /// Parses a price table (YAML or JSON); unknown fields, negative prices and unknown units are
    /// errors that name the model.
    pub fn parse(text: &str) -> Result<Self, String> {
        let prices: Prices = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        for (model, price) in &prices.models {
            let all = [Some(price.input), price.cached_input, Some(price.output)];
            if all
                .iter()
                .flatten()
                .any(|p| p.is_sign_negative() && !p.is_zero())
            {
                return Err(format!("model {model:?}: a price cannot be negative"));
            }
        }
        Ok(prices)
    }

    /// The price of `model`, by exact name.
    pub fn get(&self, model: &str) -> Option<&Price> {
        self.models.get(model)
    }

    /// This table with `other`'s entries laid over it (an override replaces a model whole).
    pub fn overlay(mut self, other: Prices) -> Self {
        if !other.as_of.is_empty() {
            self.as_of = other.as_of;
        }
        self.models.extend(other.models);
        self
    }
}

/// Tokens of one model call, as the provider reported them or as estimated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelUsage {
    /// Input tokens, cached ones included.
    pub input_tokens: u64,
    /// Of the input, tokens read from the provider's prompt cache.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cached_input_tokens: u64,
    /// Output tokens (reasoning included).
    pub output_tokens: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ModelUsage {
    /// Input and output tokens together: what the run's token ceiling counts.
    pub fn total(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }

    /// What these tokens cost at `price`, rounded up to the micro-dollar (a ceiling is never
    /// under-charged by rounding). Saturates instead of overflowing.
    pub fn cost(&self, price: &Price) -> Decimal {
        let million = Decimal::from(1_000_000u32);
        let cached = self.cached_input_tokens.min(self.input_tokens);
        let fresh = self.input_tokens - cached;
        let parts = [
            (fresh, price.input),
            (cached, price.cached_input.unwrap_or(price.input)),
            (self.output_tokens, price.output),
        ];
        let mut sum = Decimal::ZERO;
        for (tokens, per_million) in parts {
            let part = Decimal::from(tokens)
                .checked_mul(per_million)
                .unwrap_or(Decimal::MAX);
            sum = sum.checked_add(part).unwrap_or(Decimal::MAX);
        }
        (sum / million).round_dp_with_strategy(6, rust_decimal::RoundingStrategy::AwayFromZero)
    }
}

/// What calls of the run still in flight have reserved and not been charged yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reserved {
    /// Tokens.
    pub tokens: u64,
    /// US dollars.
    pub cost: Decimal,
    /// How many calls.
    pub calls: u32,
}

impl Reserved {
    /// Adds a grant's reservation.
    pub fn add(&mut self, grant: &Grant) {
        self.tokens = self.tokens.saturating_add(grant.reserve.tokens);
        self.cost = crate::budget::add_cost(self.cost, grant.reserve.cost);
        self.calls = self.calls.saturating_add(1);
    }

    /// Takes a grant's reservation back.
    pub fn release(&mut self, grant: &Grant) {
        self.tokens = self.tokens.saturating_sub(grant.reserve.tokens);
        self.cost = (self.cost - grant.reserve.cost).max(Decimal::ZERO);
        self.calls = self.calls.saturating_sub(1);
    }
}

/// One model call, as the gateway sees it before forwarding.
#[derive(Debug, Clone, Copy)]
pub struct ModelCall<'a> {
    /// The run.
    pub run_id: &'a str,
    /// `spec.upstreams[].name`.
    pub upstream: &'a str,
    /// The model the request names.
    pub model: &'a str,
    /// A bound on the request's input tokens (never below the real count).
    pub input_tokens: u64,
    /// The output cap the request asks for, if any.
    pub requested_output: Option<u64>,
    /// Whether the endpoint produces output tokens (embeddings and token counts do not).
    pub generates: bool,
    /// The model's price, if the gateway's table has it.
    pub price: Option<&'a Price>,
}

/// A model call let through: the output cap to send, and what it reserves until it is charged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The output cap the request must carry (None: no ceiling and no cap asked for).
    pub output_cap: Option<u64>,
    /// What the call may cost at most (input bound plus the cap), held back from other calls of
    /// the run until it is charged.
    pub reserve: Usage,
    /// The run ceiling that set the cap, if one did: an answer that goes past the cap reached
    /// that ceiling, and halts the run.
    pub binding: Option<Ceiling>,
    /// When the run's wall clock runs out (`maxWallClockSeconds` from its first call): an answer
    /// still coming then is ended, and the run halts.
    pub deadline: Option<(Timestamp, Ceiling)>,
    /// The decision, for the record.
    pub decision: Decision,
}

impl CompiledPolicy {
    /// The model provider `upstream`, if the policy declares it.
    pub fn llm_route(&self, upstream: &str) -> Option<&LlmRoute> {
        self.llm.get(upstream)
    }

    /// Whether the gateway meters this agent's model calls itself (the policy declares a model
    /// provider): reported usage is then recorded as the agent's claim, never charged.
    pub fn meters_models(&self) -> bool {
        !self.llm.is_empty()
    }

    /// Decides a model call before it leaves: the agent's kill switch, the run's halt and
    /// ceilings, the model list, and how much output the run's remaining tokens and cost (less
    /// `reserved` by calls in flight) can pay for. The refusal is boxed: it is the rare path.
    pub fn grant_model_call(
        &self,
        agent: &Agent<'_>,
        call: &ModelCall<'_>,
        run: &RunState,
        window: &WindowState,
        reserved: &Reserved,
        now: Timestamp,
    ) -> Result<Grant, Box<Decision>> {
        self.grant(agent, call, run, window, reserved, now)
            .map_err(Box::new)
    }

    // Boxed once, by the public entry point.
    #[allow(clippy::result_large_err)]
    fn grant(
        &self,
        agent: &Agent<'_>,
        call: &ModelCall<'_>,
        run: &RunState,
        window: &WindowState,
        reserved: &Reserved,
        now: Timestamp,
    ) -> Result<Grant, Decision> {
        let price = call.price;
        if let Some(stopped) = self.stopped(agent, call.run_id, run, window, now, false) {
            return Err(stopped);
        }
        let clause = format!("spec.upstreams[{}].llm.models", call.upstream);
        let Some(route) = self.llm.get(call.upstream) else {
            return Err(self.deny(
                None,
                (
                    DenyCode::ModelNotAllowed,
                    "spec.upstreams".into(),
                    format!(
                        "upstream {:?} is not a model provider of this policy",
                        call.upstream
                    ),
                ),
            ));
        };
        if !route.models.contains(call.model) {
            return Err(self.deny(
                None,
                (
                    DenyCode::ModelNotAllowed,
                    clause.into(),
                    format!(
                        "model {:?} is not allowed through upstream {:?}; allowed: {}",
                        call.model,
                        call.upstream,
                        route.models.iter().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ),
            ));
        }
        let budget = &self.budget;
        let costs_count = budget.max_cost.is_some() || budget.window_max_cost.is_some();
        if costs_count && price.is_none() {
            return Err(self.deny(
                None,
                (
                    DenyCode::ModelNotAllowed,
                    "spec.execution.maxCostUSD".into(),
                    format!(
                        "model {:?} has no price in the gateway's price table, and the run has a \
                         cost ceiling: add the model's price to the table",
                        call.model
                    ),
                ),
            ));
        }

        // What the ceilings leave, after the calls in flight.
        let tokens_left = budget.max_tokens.map(|limit| {
            limit
                .saturating_sub(run.tokens)
                .saturating_sub(reserved.tokens)
        });
        let mut cost_left: Option<(Decimal, Ceiling)> = budget.max_cost.map(|limit| {
            (
                (limit - run.cost - reserved.cost).max(Decimal::ZERO),
                Ceiling::MaxCostUsd { limit },
            )
        });
        if let (Some(span), Some(limit)) = (budget.window, budget.window_max_cost) {
            let left = (limit - window.cost_within(span, now) - reserved.cost).max(Decimal::ZERO);
            if cost_left.as_ref().is_none_or(|(l, _)| left < *l) {
                cost_left = Some((left, Ceiling::WindowMaxCostUsd { limit }));
            }
        }

        // The output those leave once the input is paid for.
        let mut cap: Option<u64> = call.requested_output;
        let mut binding: Option<Ceiling> = None;
        let mut tighten = |cap: &mut Option<u64>, bound: u64, ceiling: Option<Ceiling>| {
            if cap.is_none_or(|c| bound <= c) {
                binding = ceiling;
            }
            *cap = Some(cap.map_or(bound, |c| c.min(bound)));
        };
        if let Some(max) = route.max_output_tokens {
            tighten(&mut cap, max, None);
        }
        let mut short: Option<(Ceiling, String)> = None;
        if let (Some(left), Some(limit)) = (tokens_left, budget.max_tokens) {
            let ceiling = Ceiling::MaxTokensPerRun { limit };
            match left.checked_sub(call.input_tokens) {
                Some(out) if out > 0 || !call.generates => tighten(&mut cap, out, Some(ceiling)),
                _ => {
                    short = Some((
                        ceiling,
                        format!(
                            "{left} token(s) of the run's ceiling are left{}, and the prompt alone \
                             may take {}",
                            in_flight(reserved),
                            call.input_tokens
                        ),
                    ))
                }
            }
        }
        if let (Some((left, ceiling)), Some(price)) = (&cost_left, price) {
            let input_cost = ModelUsage {
                input_tokens: call.input_tokens,
                ..Default::default()
            }
            .cost(price);
            let after_input = *left - input_cost;
            if after_input < Decimal::ZERO || (after_input.is_zero() && call.generates) {
                short.get_or_insert((
                    ceiling.clone(),
                    format!(
                        "${left} of the cost ceiling is left{}, and the prompt alone may cost \
                         ${input_cost}",
                        in_flight(reserved)
                    ),
                ));
            } else if price.output > Decimal::ZERO {
                let per_token = price.output / Decimal::from(1_000_000u32);
                let affordable = (after_input / per_token).floor();
                let affordable = u64::try_from(affordable).unwrap_or(u64::MAX);
                tighten(&mut cap, affordable, Some(ceiling.clone()));
            }
        }
        if call.generates && cap == Some(0) && short.is_none() {
            short = Some((
                Ceiling::MaxTokensPerRun {
                    limit: budget.max_tokens.unwrap_or(0),
                },
                "the call may produce no output token".to_owned(),
            ));
        }
        if let Some((ceiling, why)) = short {
            // Nothing at all left (and nothing in flight to give any back): the ceiling is
            // reached, and the run halts. Otherwise only this call cannot be paid for.
            let exhausted = reserved.calls == 0
                && match &ceiling {
                    Ceiling::MaxTokensPerRun { limit } => run.tokens >= *limit,
                    Ceiling::MaxCostUsd { limit } => run.cost >= *limit,
                    Ceiling::WindowMaxCostUsd { limit } => budget
                        .window
                        .is_some_and(|span| window.cost_within(span, now) >= *limit),
                    _ => false,
                };
            if exhausted {
                return Err(self.halt(ceiling));
            }
            return Err(self.deny(
                None,
                (
                    DenyCode::InsufficientBudget,
                    ceiling.clause().into(),
                    format!(
                        "this model call cannot be paid for: {why}; send a shorter prompt, or wait \
                         for the run's calls in flight to end"
                    ),
                ),
            ));
        }
        let cap = if call.generates { cap } else { None };
        let binding = binding.filter(|_| cap.is_some());
        let reserve_tokens = call.input_tokens.saturating_add(cap.unwrap_or(0));
        let reserve_cost = price.map_or(Decimal::ZERO, |price| {
            ModelUsage {
                input_tokens: call.input_tokens,
                cached_input_tokens: 0,
                output_tokens: cap.unwrap_or(0),
            }
            .cost(price)
        });
        Ok(Grant {
            output_cap: cap,
            reserve: Usage {
                tokens: reserve_tokens,
                cost: reserve_cost,
            },
            binding,
            deadline: self.budget.max_wall_clock.and_then(|limit| {
                let started = run.started_at.unwrap_or(now);
                let end = started
                    .checked_add(jiff::SignedDuration::try_from(limit).ok()?)
                    .ok()?;
                Some((
                    end,
                    Ceiling::MaxWallClockSeconds {
                        limit: limit.as_secs(),
                    },
                ))
            }),
            decision: Decision::Allow {
                rule: self.rule(None, clause),
                review: false,
            },
        })
    }

    /// Starts the run (its wall clock, its place in the identity's window) for a model call that
    /// was let through.
    pub fn start_model_call(
        &self,
        run_id: &str,
        run: &mut RunState,
        window: &mut WindowState,
        now: Timestamp,
    ) {
        run.started_at.get_or_insert(now);
        if let Some(span) = self.budget.window {
            if !window.has_run(run_id, span, now) {
                window.runs.push((now, run_id.to_owned()));
            }
            window.prune(span, now);
        }
    }

    /// Charges a model call's tokens and cost to the run and the window; the ceiling it breached,
    /// if any, halts the run.
    pub fn charge_model_call(
        &self,
        usage: &Usage,
        run: &mut RunState,
        window: &mut WindowState,
        now: Timestamp,
    ) -> Option<Ceiling> {
        self.report(usage, run, window, now)
    }
}

fn in_flight(reserved: &Reserved) -> String {
    if reserved.calls == 0 {
        String::new()
    } else {
        format!(
            " after {} model call(s) in flight reserved {} token(s) and ${}",
            reserved.calls, reserved.tokens, reserved.cost
        )
    }
}

/// Compiles `spec.upstreams[i].llm`.
pub(crate) fn compile_route(llm: &tollgate_crds::policy::LlmUpstream) -> Result<LlmRoute, String> {
    if !(llm.url.starts_with("http://") || llm.url.starts_with("https://")) {
        return Err(format!("{:?} is not an http or https URL", llm.url));
    }
    if llm.models.is_empty() || llm.models.iter().any(|m| m.is_empty()) {
        return Err("list at least one model, by its exact name".to_owned());
    }
    Ok(LlmRoute {
        api: llm.api,
        url: llm.url.trim_end_matches('/').to_owned(),
        models: llm.models.iter().cloned().collect(),
        max_output_tokens: llm.max_output_tokens.map(|n| n.max(1) as u64),
        capture: llm.capture,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::tests::{now, policy, policy_with};

    const WHO: Agent<'static> = Agent {
        name: "support",
        namespace: "ns",
        username: "system:serviceaccount:ns:agent-support",
        killed: false,
    };

    fn metered(execution: serde_json::Value) -> CompiledPolicy {
        policy(json!({
            "upstreams": [{"name": "crm"}, {"name": "llm", "llm": {"api": "OpenAI",
                "url": "https://api.example.com/v1/", "models": ["m"], "maxOutputTokens": 500}}],
            "execution": execution,
        }))
    }

    fn call(input: u64, requested: Option<u64>) -> ModelCall<'static> {
        ModelCall {
            run_id: "run-1",
            upstream: "llm",
            model: "m",
            input_tokens: input,
            requested_output: requested,
            generates: true,
            price: None,
        }
    }

    /// $1 per million input tokens, $10 per million output.
    fn price() -> Price {
        Price {
            input: Decimal::ONE,
            cached_input: Some(Decimal::new(1, 1)),
            output: Decimal::TEN,
        }
    }

    fn grant(
        policy: &CompiledPolicy,
        call: &ModelCall<'_>,
        run: &RunState,
        reserved: &Reserved,
    ) -> Result<Grant, Box<Decision>> {
        let window = WindowState::default();
        let price = price();
        let call = ModelCall {
            price: Some(&price),
            ..*call
        };
        policy.grant_model_call(&WHO, &call, run, &window, reserved, now())
    }

    #[test]
    fn the_cap_is_the_least_of_request_upstream_tokens_and_cost() {
        let policy = metered(json!({"maxTokensPerRun": 1000, "maxCostUSD": "0.002"}));
        let run = RunState::default();
        let none = Reserved::default();
        // Requested 100: under every bound.
        let g = grant(&policy, &call(10, Some(100)), &run, &none).unwrap();
        assert_eq!((g.output_cap, g.binding.clone()), (Some(100), None));
        assert_eq!(g.deadline, None, "no wall-clock ceiling");
        let clocked = metered(json!({"maxWallClockSeconds": 60}));
        let started = RunState {
            started_at: Some(now() - jiff::SignedDuration::from_secs(45)),
            ..Default::default()
        };
        let timed = grant(&clocked, &call(10, Some(5)), &started, &none).unwrap();
        assert_eq!(
            timed.deadline,
            Some((
                now() + jiff::SignedDuration::from_secs(15),
                Ceiling::MaxWallClockSeconds { limit: 60 }
            ))
        );
        assert_eq!(g.reserve.tokens, 110);
        // No request: maxOutputTokens (500) is under the tokens left (990), but $0.002 buys 199
        // output tokens after the prompt's $0.00001.
        let g = grant(&policy, &call(10, None), &run, &none).unwrap();
        assert_eq!(g.output_cap, Some(199));
        assert!(matches!(g.binding, Some(Ceiling::MaxCostUsd { .. })));
        // 900 tokens of prompt: 100 left for output, set by the token ceiling.
        let g = grant(&policy, &call(900, None), &run, &none).unwrap();
        assert_eq!(g.output_cap, Some(100));
        assert_eq!(g.binding, Some(Ceiling::MaxTokensPerRun { limit: 1000 }));
        // $0.002 with $0.0005 spent: $0.0015 buys at most 150 output tokens after 10 input
        // tokens ($0.00001): floor(0.00149 / 0.00001) = 149.
        let spent = RunState {
            cost: Decimal::new(5, 4),
            ..Default::default()
        };
        let g = grant(&policy, &call(10, None), &spent, &none).unwrap();
        assert_eq!(g.output_cap, Some(149));
        assert!(matches!(g.binding, Some(Ceiling::MaxCostUsd { .. })));
        assert!(g.reserve.cost <= Decimal::new(15, 4), "{}", g.reserve.cost);
    }

    #[test]
    fn calls_in_flight_hold_their_share_and_an_empty_run_halts() {
        let policy = metered(json!({"maxTokensPerRun": 1000}));
        let run = RunState {
            tokens: 600,
            ..Default::default()
        };
        let mut reserved = Reserved::default();
        let first = grant(&policy, &call(100, Some(250)), &run, &reserved).unwrap();
        reserved.add(&first);
        // 400 left, 350 reserved: 50 for the next call, whose prompt alone may take 100.
        let refused = grant(&policy, &call(100, Some(10)), &run, &reserved).unwrap_err();
        assert_eq!(
            refused.deny_code(),
            Some(DenyCode::InsufficientBudget),
            "{refused:?}"
        );
        reserved.release(&first);
        assert_eq!(reserved, Reserved::default());
        // Nothing left and nothing in flight: the ceiling is reached, the run halts.
        let spent = RunState {
            tokens: 1000,
            ..Default::default()
        };
        let halted = grant(&policy, &call(1, Some(1)), &spent, &Reserved::default()).unwrap_err();
        assert!(matches!(
            *halted,
            Decision::Halt {
                ceiling: Ceiling::MaxTokensPerRun { limit: 1000 },
                ..
            }
        ));
        // Steps do not stop model calls; the halt of a run does.
        let stepped = RunState {
            steps: 10_000,
            ..Default::default()
        };
        let steps = metered(json!({"maxSteps": 5}));
        assert!(grant(&steps, &call(1, Some(1)), &stepped, &Reserved::default()).is_ok());
        let halted = RunState {
            halted: Some(Ceiling::MaxSteps { limit: 5 }),
            ..Default::default()
        };
        assert!(matches!(
            grant(&steps, &call(1, Some(1)), &halted, &Reserved::default()),
            Err(d) if matches!(*d, Decision::Halt { .. })
        ));
    }

    #[test]
    fn models_are_matched_exactly_and_priced_when_costs_count() {
        let policy = metered(json!({"maxCostUSD": "1"}));
        let run = RunState::default();
        for model in ["M", "m ", "m\u{200b}", "", "other"] {
            let call = ModelCall {
                model,
                ..call(1, None)
            };
            let refused = grant(&policy, &call, &run, &Reserved::default()).unwrap_err();
            assert_eq!(
                refused.deny_code(),
                Some(DenyCode::ModelNotAllowed),
                "{model:?}"
            );
        }
        let window = WindowState::default();
        let unpriced = policy
            .grant_model_call(
                &WHO,
                &call(1, None),
                &run,
                &window,
                &Reserved::default(),
                now(),
            )
            .unwrap_err();
        assert_eq!(unpriced.deny_code(), Some(DenyCode::ModelNotAllowed));
        assert!(format!("{unpriced:?}").contains("has no price"));
        let killed = Agent {
            killed: true,
            ..WHO
        };
        let refused = policy
            .grant_model_call(
                &killed,
                &call(1, None),
                &run,
                &window,
                &Reserved::default(),
                now(),
            )
            .unwrap_err();
        assert_eq!(refused.deny_code(), Some(DenyCode::KillSwitch));
    }

    #[test]
    fn costs_round_up_and_saturate() {
        let usage = ModelUsage {
            input_tokens: 3,
            cached_input_tokens: 1,
            output_tokens: 1,
        };
        // 2 * $1 + 1 * $0.1 + 1 * $10 per million = $0.0000121, rounded up to $0.000013.
        assert_eq!(usage.cost(&price()), Decimal::new(13, 6));
        let huge = ModelUsage {
            input_tokens: u64::MAX,
            cached_input_tokens: u64::MAX,
            output_tokens: u64::MAX,
        };
        assert!(huge.cost(&price()) > Decimal::new(1_000_000, 0));
        assert_eq!(huge.total(), u64::MAX);
    }

    #[test]
    fn a_provider_upstream_compiles_only_when_complete() {
        let bad = |llm: serde_json::Value| {
            policy_with(json!({"upstreams": [{"name": "llm", "llm": llm}]}))
                .unwrap_err()
                .to_string()
        };
        assert!(
            bad(json!({"api": "OpenAI", "url": "ftp://x", "models": ["m"]}))
                .contains("not an http")
        );
        assert!(
            bad(json!({"api": "OpenAI", "url": "https://x", "models": []}))
                .contains("at least one model")
        );
        let both = policy_with(
            json!({"upstreams": [{"name": "x", "mcp": {"url": "https://x/mcp"},
            "llm": {"api": "Anthropic", "url": "https://x", "models": ["m"]}}]}),
        );
        assert!(
            both.unwrap_err()
                .to_string()
                .contains("both an MCP server and a model provider")
        );
        let p = metered(json!({}));
        assert_eq!(
            p.llm_route("llm").unwrap().url,
            "https://api.example.com/v1"
        );
        assert!(p.meters_models());
        assert!(!policy(json!({})).meters_models());
    }

    #[test]
    fn price_tables_refuse_what_they_cannot_mean() {
        let table = "asOf: \"2026-12-01\"\nmodels:\n  m: {input: \"1\", output: \"2\"}\n";
        let prices = Prices::parse(table).unwrap();
        assert_eq!(prices.get("m").unwrap().output, Decimal::TWO);
        assert!(
            Prices::parse("models:\n  m: {input: \"-1\", output: \"2\"}\n")
                .unwrap_err()
                .contains("negative")
        );
        assert!(
            Prices::parse("models:\n  m: {input: \"1\", ouput: \"2\"}\n")
                .unwrap_err()
                .contains("ouput")
        );
        let over =
            prices.overlay(Prices::parse("models:\n  n: {input: \"3\", output: \"4\"}\n").unwrap());
        assert_eq!(over.models.len(), 2);
        assert_eq!(over.as_of, "2026-12-01");
    }
}
