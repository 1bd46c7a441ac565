//! The LLM proxy with the official OpenAI and Anthropic Python SDKs as the agent (from PyPI, in
//! target/sdk-venv: `.ci/run` installs them) and the fake provider of examples/fake_llm.rs behind
//! a real listening gateway, on a real SQLite trail. What is checked is what a run can spend: the
//! agent reports nothing and still cannot pass its ceilings.

#[path = "../examples/fake_llm.rs"]
mod fake_llm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tollgate_audit::{
    AuditLog, Cut, Entry, Event, Metered, Query, Redactor, SqliteStore, Store, WriterConfig, verify,
};
use tollgate_engine::llm::Prices;
use tollgate_gateway::keys::Keys;
use tollgate_gateway::policies::WatchedDir;
use tollgate_gateway::{Gateway, standalone_router};
use tollgate_runtime::metrics::Metrics;

const AGENT_KEY: &str = "llm-agent-key";
const OTHER_KEY: &str = "other-agent-key";

fn sha(key: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

/// The agent and its policy; `execution` is the policy's execution block (YAML, one line).
fn policy(provider: &str, execution: &str) -> String {
    format!(
        r#"apiVersion: tollgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{name: llm-agent}}
spec:
  description: Writes summaries with a model
  owner: {{team: platform, contacts: [dana@example.com]}}
  podSelector: {{matchLabels: {{app: llm-agent}}}}
  credentials:
    - {{upstream: openai, secretRef: {{name: provider, key: openai}}, header: Authorization, format: "Bearer {{}}"}}
    - {{upstream: anthropic, secretRef: {{name: provider, key: anthropic}}, header: x-api-key, format: "{{}}"}}
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentPolicy
metadata: {{name: llm-agent}}
spec:
  identityRef: {{name: llm-agent}}
  upstreams:
    - name: openai
      llm: {{api: OpenAI, url: "{provider}/v1", models: [gpt-4o-mini, greedy, no-usage, busy, slow, tools, text-embedding-3-small], maxOutputTokens: 30}}
    - name: anthropic
      llm: {{api: Anthropic, url: "{provider}", models: [claude-haiku-4-5, greedy, no-usage, busy, slow], capture: Full}}
  tools:
    allowed:
      - {{name: lookup}}
  execution: {execution}
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{name: other-agent}}
spec:
  description: Another agent, with no model provider
  owner: {{team: platform, contacts: [dana@example.com]}}
  podSelector: {{matchLabels: {{app: other-agent}}}}
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentPolicy
metadata: {{name: other-agent}}
spec:
  identityRef: {{name: other-agent}}
  tools:
    allowed:
      - {{name: lookup}}
"#
    )
}

struct Harness {
    url: String,
    provider: String,
    store: Arc<SqliteStore>,
    policies: PathBuf,
    _dir: tempfile::TempDir,
}

async fn harness(execution: &str) -> Harness {
    let provider = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let provider_url = format!("http://{}", provider.local_addr().unwrap());
    tokio::spawn(fake_llm::serve(provider));

    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("agent.yaml"),
        policy(&provider_url, execution),
    )
    .unwrap();
    let secrets = dir.path().join("secrets/default/provider");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("openai"), fake_llm::PROVIDER_KEY).unwrap();
    std::fs::write(
        secrets.join("anthropic"),
        format!("{}\n", fake_llm::PROVIDER_KEY),
    )
    .unwrap();

    let keys = Keys::parse(&format!(
        "keys:\n  - {{name: llm, agent: default/llm-agent, sha256: {}}}\n  - {{name: other, agent: default/other-agent, sha256: {}}}\n",
        sha(AGENT_KEY),
        sha(OTHER_KEY)
    ))
    .unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("audit.db")).unwrap());
    let metrics = Metrics::default();
    let (log, _) = AuditLog::open(
        store.clone(),
        WriterConfig::new("llm-test").with_observer(Arc::new(metrics.clone())),
    )
    .await
    .unwrap();
    // Prices for the fake's models: $1 per million input tokens, $10 per million output tokens
    // (so 100,000 output tokens are a dollar).
    let fake = [
        "gpt-4o-mini",
        "greedy",
        "no-usage",
        "busy",
        "slow",
        "tools",
        "claude-haiku-4-5",
    ];
    let mut table = String::from("asOf: \"2026-12-01\"\nmodels:\n");
    for model in fake {
        table.push_str(&format!("  {model}: {{input: \"1\", output: \"10\"}}\n"));
    }
    let prices = tollgate_gateway::default_prices().overlay(Prices::parse(&table).unwrap());
    let watched = WatchedDir::start(policies.clone(), Duration::from_millis(50));
    let gateway = Gateway::new(watched, keys, log, Redactor::default())
        .with_metrics(metrics)
        .with_prices(prices)
        .with_history(store.clone())
        .with_secrets(dir.path().join("secrets"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = standalone_router(Arc::new(gateway));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Harness {
        url,
        provider: provider_url,
        store,
        policies,
        _dir: dir,
    }
}

fn venv_python() -> PathBuf {
    let venv = std::env::var_os("TOLLGATE_SDK_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/sdk-venv"));
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: install the official SDKs with `bash e2e/prepare.sh` (the README's test \
         command; `bash e2e/sdk/install.sh` installs only them)",
        python.display()
    );
    python
}

impl Harness {
    /// One call through an official SDK, as the agent.
    async fn sdk(&self, mut spec: Value) -> Value {
        let base = match spec["sdk"].as_str() {
            Some("openai") => format!("{}/llm/openai", self.url),
            _ => format!("{}/llm/anthropic", self.url),
        };
        spec["base_url"] = json!(base);
        if spec.get("key").is_none() {
            spec["key"] = json!(AGENT_KEY);
        }
        let python = venv_python();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/llm_client.py");
        let output = tokio::process::Command::new(python)
            .arg(script)
            .arg(spec.to_string())
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
            panic!(
                "the SDK driver printed no outcome: {stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
    }

    /// What the fake provider last received.
    async fn seen(&self) -> Value {
        reqwest::get(format!("{}/_seen", self.provider))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Engages the agent's kill switch in its policy file (in force at the next reload).
    fn engage_kill_switch(&self) {
        let file = self.policies.join("agent.yaml");
        let text = std::fs::read_to_string(&file).unwrap();
        let engaged = text.replacen(
            "  podSelector: {matchLabels: {app: llm-agent}}",
            "  podSelector: {matchLabels: {app: llm-agent}}\n  killSwitch: {engaged: true, reason: drill}",
            1,
        );
        std::fs::write(file, engaged).unwrap();
    }

    /// Waits until the fake provider has received a request.
    async fn until_the_provider_has_a_call(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.seen().await == Value::Null {
            assert!(Instant::now() < deadline, "no call reached the provider");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn audit(&self) -> Vec<Entry> {
        verify(self.store.as_ref(), true, &BTreeMap::new())
            .await
            .expect("the audit chain verifies");
        self.store
            .query(&Query::default())
            .await
            .unwrap()
            .iter()
            .map(|r| r.entry().unwrap())
            .collect()
    }

    async fn model_records(&self, run: &str) -> Vec<Entry> {
        self.audit()
            .await
            .into_iter()
            .filter(|e| e.event == Event::Model && e.run.as_deref() == Some(run))
            .collect()
    }

    /// The run's tokens as the gateway counts them now, through the decision API.
    async fn run_tokens(&self, run: &str) -> Value {
        let client = reqwest::Client::new();
        client
            .post(format!("{}/v1/decide", self.url))
            .bearer_auth(AGENT_KEY)
            .json(&json!({"runId": run, "tool": "lookup"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

fn error_of(outcome: &Value) -> &Value {
    assert_eq!(outcome["ok"], false, "the SDK raised nothing: {outcome}");
    &outcome["error"]
}

#[tokio::test]
async fn both_sdks_call_through_the_proxy_with_a_key_the_agent_never_holds() {
    let h = harness("{maxTokensPerRun: 100000}").await;
    let out = h
        .sdk(json!({"sdk": "openai", "run": "r-openai", "model": "gpt-4o-mini", "max_tokens": 5}))
        .await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(
        out["text"].as_str().unwrap().split_whitespace().count(),
        5,
        "{out}"
    );
    let seen = h.seen().await;
    assert_eq!(
        seen["headers"]["authorization"],
        format!("Bearer {}", fake_llm::PROVIDER_KEY)
    );
    assert!(
        !seen.to_string().contains(AGENT_KEY),
        "the agent's credential left the gateway: {seen}"
    );
    assert!(seen["headers"].get("tollgate-run-id").is_none(), "{seen}");

    let out = h
        .sdk(json!({"sdk": "anthropic", "run": "r-anthropic", "model": "claude-haiku-4-5", "max_tokens": 7, "stream": true}))
        .await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["usage"]["output_tokens"], 7, "{out}");
    assert_eq!(out["finish"], "max_tokens");
    let seen = h.seen().await;
    assert_eq!(
        seen["headers"]["x-api-key"],
        fake_llm::PROVIDER_KEY,
        "the credential's newline is trimmed"
    );
    assert!(!seen.to_string().contains(AGENT_KEY), "{seen}");

    // Responses, embeddings and the model list work too; the list shows only allowed models.
    let out = h
        .sdk(json!({"sdk": "openai", "run": "r-openai", "model": "gpt-4o-mini", "endpoint": "responses", "max_tokens": 4}))
        .await;
    assert_eq!(out["usage"]["output_tokens"], 4, "{out}");
    let out = h
        .sdk(json!({"sdk": "openai", "run": "r-openai", "model": "text-embedding-3-small", "endpoint": "embeddings"}))
        .await;
    assert_eq!(out["ok"], true, "{out}");
    let out = h.sdk(json!({"sdk": "openai", "endpoint": "models"})).await;
    let models: Vec<&str> = out["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(models, ["gpt-4o-mini", "greedy", "slow"], "{out}");
    let out = h
        .sdk(json!({"sdk": "anthropic", "model": "claude-haiku-4-5", "endpoint": "count_tokens"}))
        .await;
    assert!(out["input_tokens"].as_u64().unwrap() > 0, "{out}");

    // One model record per metered call, charged as the provider reported.
    let records = h.model_records("r-openai").await;
    assert_eq!(records.len(), 3);
    let chat = records[0].model.as_ref().unwrap();
    assert_eq!(
        (chat.endpoint.as_str(), chat.metered),
        ("chat/completions", Metered::Reported)
    );
    assert_eq!(chat.tokens.output_tokens, 5);
    assert_eq!(chat.output_cap, Some(5));
    assert!(
        records[0].arguments.is_none() && records[0].arguments_digest.is_some(),
        "Digest capture keeps digests only"
    );
    let streamed = &h.model_records("r-anthropic").await[0];
    assert_eq!(streamed.model.as_ref().unwrap().tokens.output_tokens, 7);
    assert!(streamed.model.as_ref().unwrap().first_token_us.is_some());
    assert_eq!(
        streamed.result.as_ref().unwrap()["text"],
        json!(out_text(7)),
        "Full capture keeps the streamed text"
    );
}

fn out_text(n: u64) -> String {
    const WORDS: [&str; 8] = ["the", "gate", "holds", "every", "call", "to", "its", "rule"];
    (0..n)
        .map(|i| format!("{} ", WORDS[(i % 8) as usize]))
        .collect()
}

#[tokio::test]
async fn models_outside_the_list_and_bad_requests_are_refused_before_anything_leaves() {
    let h = harness("{maxTokensPerRun: 100000}").await;
    let out = h
        .sdk(json!({"sdk": "openai", "run": "r1", "model": "gpt-4o", "max_tokens": 5}))
        .await;
    let error = error_of(&out);
    assert_eq!(
        (error["class"].as_str(), error["status"].as_u64()),
        (Some("PermissionDeniedError"), Some(403)),
        "{out}"
    );
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("model \"gpt-4o\" is not allowed"),
        "{out}"
    );
    assert_eq!(h.seen().await, Value::Null, "nothing reached the provider");
    // Refused models never name a metric series (an agent could grow them without bound).
    let metrics = reqwest::get(format!("{}/metrics", h.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains("model=\"gpt-4o\""), "{metrics}");
    assert!(metrics.contains("model=\"(not allowed)\""), "{metrics}");

    let out = h
        .sdk(json!({"sdk": "anthropic", "model": "claude-haiku-4-5", "max_tokens": 5}))
        .await;
    assert!(
        error_of(&out)["message"]
            .as_str()
            .unwrap()
            .contains("a run id is required"),
        "{out}"
    );
    let out = h
        .sdk(json!({"sdk": "openai", "run": "r1", "model": "gpt-4o-mini", "key": "wrong"}))
        .await;
    assert_eq!(error_of(&out)["class"], "AuthenticationError", "{out}");
    let out = h
        .sdk(json!({"sdk": "openai", "run": "r1", "model": "gpt-4o-mini", "key": OTHER_KEY}))
        .await;
    assert!(
        error_of(&out)["message"]
            .as_str()
            .unwrap()
            .contains("not a model provider"),
        "{out}"
    );
    assert_eq!(h.seen().await, Value::Null, "nothing reached the provider");

    // Raw requests: a bad cap, several choices, an unknown path, a smuggled endpoint.
    let client = reqwest::Client::new();
    for (path, body, want) in [
        (
            "chat/completions",
            json!({"model": "gpt-4o-mini", "messages": [], "max_tokens": -5}),
            "max_tokens must be a positive integer",
        ),
        (
            "chat/completions",
            json!({"model": "gpt-4o-mini", "messages": [], "n": 4}),
            "n is 4",
        ),
        (
            "chat/completions",
            json!({"messages": []}),
            "\"model\" must name the model",
        ),
        ("files", json!({"model": "gpt-4o-mini"}), "is not served"),
        (
            "chat/completions/../../files",
            json!({"model": "gpt-4o-mini"}),
            "is not served",
        ),
    ] {
        let response = client
            .post(format!("{}/llm/openai/{path}", h.url))
            .bearer_auth(AGENT_KEY)
            .header("tollgate-run-id", "r1")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["x-should-retry"], "false");
        let answer: Value = response.json().await.unwrap();
        assert!(
            answer["error"]["message"].as_str().unwrap().contains(want),
            "{path}: {answer}"
        );
    }
    assert_eq!(h.seen().await, Value::Null, "nothing reached the provider");
    let refusals = h
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event == Event::Rejected || e.event == Event::Model)
        .count();
    assert_eq!(refusals, 9, "every refusal is recorded");
}

#[tokio::test]
async fn output_caps_are_lowered_to_what_the_run_can_pay_for() {
    // 600 tokens for the run. The prompt's bound is its bytes, so the first call's cap is what
    // is left after it, and at most the upstream's maxOutputTokens (30).
    let h = harness("{maxTokensPerRun: 600}").await;
    let out = h
        .sdk(json!({"sdk": "openai", "run": "r1", "model": "gpt-4o-mini", "max_tokens": 1000}))
        .await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(
        h.seen().await["body"]["max_tokens"],
        30,
        "lowered to maxOutputTokens"
    );

    let long = "word ".repeat(100); // a 500-byte prompt
    let out = h
        .sdk(json!({"sdk": "anthropic", "run": "r2", "model": "claude-haiku-4-5", "max_tokens": 1000, "prompt": long}))
        .await;
    assert_eq!(out["ok"], true, "{out}");
    let cap = h.seen().await["body"]["max_tokens"].as_u64().unwrap();
    assert!(
        cap < 100 && cap > 0,
        "the cap leaves room for the prompt's bound: {cap}"
    );
    let record = &h.model_records("r2").await[0];
    assert_eq!(record.model.as_ref().unwrap().output_cap, Some(cap));
    assert_eq!(record.model.as_ref().unwrap().metered, Metered::Reported);
}

#[tokio::test]
async fn a_stream_past_the_ceiling_is_cut_and_the_run_halted_without_any_report() {
    // A provider that ignores the cap streams 5,000 words; the run may spend 70 tokens, so the
    // cap (what is left after the prompt's bound) is set by the run's ceiling.
    let h = harness("{maxTokensPerRun: 70}").await;
    for sdk in ["openai", "anthropic"] {
        let run = format!("r-{sdk}");
        let out = h
            .sdk(json!({"sdk": sdk, "run": run, "model": "greedy", "max_tokens": 1000, "stream": true}))
            .await;
        let error = error_of(&out);
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("maxTokensPerRun"),
            "{sdk}: the SDK raised the cut: {out}"
        );
        let received = out["chunks"].as_u64().unwrap();
        let record = &h.model_records(&run).await[0];
        let model = record.model.as_ref().unwrap();
        assert_eq!(model.cut, Some(Cut::Ceiling), "{sdk}");
        assert_eq!(model.metered, Metered::Estimated);
        let cap = model.output_cap.unwrap();
        assert!(
            received <= cap,
            "{sdk}: {received} chunks past a cap of {cap}"
        );
        // Halted: the next call of the run, tool or model, is refused.
        let decided = h.run_tokens(&run).await;
        assert_eq!(decided["decision"], "halt", "{decided}");
        let out = h
            .sdk(json!({"sdk": sdk, "run": run, "model": if sdk == "openai" { "gpt-4o-mini" } else { "claude-haiku-4-5" }, "max_tokens": 5}))
            .await;
        assert!(
            error_of(&out)["message"]
                .as_str()
                .unwrap()
                .contains("halted"),
            "{out}"
        );
    }
    let halts = h
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event == Event::Halt)
        .count();
    assert_eq!(
        halts, 2,
        "one halt per run, recorded when the stream was cut"
    );
}

#[tokio::test]
async fn reported_usage_is_a_claim_when_the_gateway_meters() {
    let h = harness("{maxTokensPerRun: 100000}").await;
    let decided = h.run_tokens("r1").await;
    assert_eq!(decided["decision"], "allow", "{decided}");
    // The agent claims a huge usage for its tool call: recorded as its claim, not charged.
    let client = reqwest::Client::new();
    let report: Value = client
        .post(format!("{}/v1/report", h.url))
        .bearer_auth(AGENT_KEY)
        .json(&json!({"runId": "r1", "step": 1, "tool": "lookup", "usage": {"tokens": 99999, "cost": "0"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["counters"]["tokens"], 0, "{report}");
    let out = h
        .sdk(json!({"sdk": "openai", "run": "r1", "model": "gpt-4o-mini", "max_tokens": 3}))
        .await;
    assert_eq!(out["ok"], true, "{out}");
    let entries = h.audit().await;
    let claimed = entries.iter().find(|e| e.event == Event::Report).unwrap();
    assert!(claimed.usage_claimed);
    let model = entries.iter().find(|e| e.event == Event::Model).unwrap();
    let metered = model.model.as_ref().unwrap().tokens.total();
    assert_eq!(
        model.counters.as_ref().unwrap().tokens,
        metered,
        "only metered tokens count"
    );
    // A replay rebuilds the same budget: the claim is not charged there either.
    let agent = tollgate_gateway::policies::PolicySet::load(&h.policies);
    let policy = agent.agents["default/llm-agent"].policy.clone().unwrap();
    let rebuilt = tollgate_audit::replay::rebuild(&policy, &entries);
    assert_eq!(rebuilt.runs["r1"].tokens, metered);
}

#[tokio::test]
async fn answers_without_usage_are_charged_the_estimate_and_provider_errors_pass_through() {
    let h = harness("{maxTokensPerRun: 100000, maxCostUSD: \"5\"}").await;
    let out = h
        .sdk(json!({"sdk": "openai", "run": "r1", "model": "no-usage", "max_tokens": 6, "stream": true}))
        .await;
    assert_eq!(out["ok"], true, "{out}");
    let record = &h.model_records("r1").await[0];
    let model = record.model.as_ref().unwrap();
    assert_eq!(model.metered, Metered::Estimated);
    assert!(
        model.tokens.output_tokens >= 6 && model.tokens.input_tokens > 0,
        "{model:?}"
    );
    assert!(
        record.usage.as_ref().unwrap().cost > rust_decimal::Decimal::ZERO,
        "never zero"
    );

    for sdk in ["openai", "anthropic"] {
        let out = h
            .sdk(json!({"sdk": sdk, "run": "r2", "model": "busy", "max_tokens": 6}))
            .await;
        let error = error_of(&out);
        assert_eq!(
            (error["class"].as_str(), error["status"].as_u64()),
            (Some("RateLimitError"), Some(429)),
            "{out}"
        );
    }
    let records = h.model_records("r2").await;
    assert_eq!(records.len(), 2);
    for record in records {
        let model = record.model.as_ref().unwrap();
        assert_eq!((model.status, model.tokens.total()), (Some(429), 0));
        assert!(
            record.error.as_deref().unwrap().contains("429"),
            "{:?}",
            record.error
        );
    }
}

#[tokio::test]
async fn a_cost_ceiling_bounds_output_and_unpriced_models_are_refused() {
    // $0.0005 at $10 per million output tokens: at most 50 tokens of output, less the prompt.
    let h = harness("{maxCostUSD: \"0.0005\"}").await;
    let out = h
        .sdk(json!({"sdk": "anthropic", "run": "r1", "model": "claude-haiku-4-5", "max_tokens": 1000}))
        .await;
    assert_eq!(out["ok"], true, "{out}");
    let cap = h.seen().await["body"]["max_tokens"].as_u64().unwrap();
    assert!(cap <= 50, "{cap}");
    let out = h
        .sdk(json!({"sdk": "openai", "run": "r1", "model": "text-embedding-3-small"}))
        .await;
    // The built-in table prices the embedding model; the fake's are priced by the test.
    assert_eq!(out["ok"], true, "{out}");
    std::fs::write(
        h.policies.join("agent.yaml"),
        policy(&h.provider, "{maxCostUSD: \"1\"}")
            .replace("models: [gpt-4o-mini,", "models: [unpriced, gpt-4o-mini,"),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = h
        .sdk(json!({"sdk": "openai", "run": "r2", "model": "unpriced", "max_tokens": 5}))
        .await;
    assert!(
        error_of(&out)["message"]
            .as_str()
            .unwrap()
            .contains("has no price"),
        "{out}"
    );
}

#[tokio::test]
async fn parallel_calls_cannot_spend_the_same_tokens_twice() {
    // Eight streams at once in one run of 400 tokens, each asking for 30 (maxOutputTokens) with a
    // prompt of about 60 bytes: reservations keep the sum within the ceiling.
    let h = harness("{maxTokensPerRun: 400}").await;
    let calls = (0..8).map(|_| {
        h.sdk(json!({"sdk": "openai", "run": "r1", "model": "slow", "max_tokens": 30, "stream": true}))
    });
    let outs = futures::future::join_all(calls).await;
    let refused = outs.iter().filter(|o| o["ok"] == false).count();
    assert!(refused > 0, "some calls must wait their turn: {outs:?}");
    let records = h.model_records("r1").await;
    let charged: u64 = records
        .iter()
        .filter_map(|r| r.usage.as_ref())
        .map(|u| u.tokens)
        .sum();
    assert!(
        charged <= 400,
        "{charged} tokens charged past a ceiling of 400"
    );
    for out in outs.iter().filter(|o| o["ok"] == false) {
        let message = out["error"]["message"].as_str().unwrap();
        assert!(message.contains("in flight"), "{out}");
    }
}

#[tokio::test]
async fn the_kill_switch_ends_a_live_stream() {
    let h = harness("{maxTokensPerRun: 100000}").await;
    let call = h.sdk(json!({"sdk": "anthropic", "run": "r1", "model": "slow", "max_tokens": 1000, "stream": true}));
    let kill = async {
        // Once the provider has the call (the SDK's start takes its time), and a few words.
        h.until_the_provider_has_a_call().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        h.engage_kill_switch();
        Instant::now()
    };
    let (out, engaged_at) = tokio::join!(call, kill);
    let ended = engaged_at.elapsed();
    let error = error_of(&out);
    assert!(
        error["message"].as_str().unwrap().contains("kill switch"),
        "{out}"
    );
    assert!(
        ended < Duration::from_secs(5),
        "the stream ended {ended:?} after the switch"
    );
    let records = h.model_records("r1").await;
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(
        records[0].model.as_ref().unwrap().cut,
        Some(Cut::KillSwitch),
        "{out}"
    );
    let chunks = out["chunks"].as_u64().unwrap();
    assert!(chunks > 0 && chunks < 600, "{chunks}");
}

#[tokio::test]
async fn a_crafted_run_header_or_body_cannot_charge_another_agent() {
    let h = harness("{maxTokensPerRun: 100000}").await;
    let client = reqwest::Client::new();
    let other_decides = || async {
        let answer: Value = client
            .post(format!("{}/v1/decide", h.url))
            .bearer_auth(OTHER_KEY)
            .json(&json!({"runId": "shared-run", "tool": "lookup"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["decision"], "allow", "{answer}");
    };
    other_decides().await;
    // This agent names the other's run id, and puts identity fields in the body.
    let out = h
        .sdk(json!({"sdk": "openai", "run": "shared-run", "model": "gpt-4o-mini", "max_tokens": 3}))
        .await;
    assert_eq!(out["ok"], true, "{out}");
    let response = client
        .post(format!("{}/llm/openai/chat/completions", h.url))
        .bearer_auth(AGENT_KEY)
        .header("tollgate-run-id", "../other-agent/shared-run")
        .json(&json!({"model": "gpt-4o-mini", "messages": [], "user": "default/other-agent"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    other_decides().await;
    let records = h.audit().await;
    for record in records.iter().filter(|e| e.event == Event::Model) {
        assert_eq!(record.agent.as_deref(), Some("default/llm-agent"));
        assert_eq!(record.identity.username, "apikey:llm");
    }
    let others: Vec<_> = records
        .iter()
        .filter(|e| e.event == Event::Decide && e.agent.as_deref() == Some("default/other-agent"))
        .collect();
    assert_eq!(others.len(), 2);
    assert_eq!(
        others[1].counters.as_ref().unwrap().tokens,
        0,
        "the other agent's run was not charged"
    );
}

#[tokio::test]
async fn the_kill_switch_ends_a_call_waiting_for_its_whole_answer() {
    let h = harness("{maxTokensPerRun: 100000}").await;
    // 30 words at 100 ms: the answer would come after three seconds.
    let call = h.sdk(json!({"sdk": "openai", "run": "r1", "model": "slow", "max_tokens": 30}));
    let kill = async {
        h.until_the_provider_has_a_call().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        h.engage_kill_switch();
        Instant::now()
    };
    let (out, engaged_at) = tokio::join!(call, kill);
    assert!(
        engaged_at.elapsed() < Duration::from_millis(1500),
        "ended with the switch"
    );
    let error = error_of(&out);
    assert_eq!(error["status"], 403, "{out}");
    assert!(
        error["message"].as_str().unwrap().contains("kill switch"),
        "{out}"
    );
    let record = &h.model_records("r1").await[0];
    let model = record.model.as_ref().unwrap();
    assert_eq!(
        (model.cut, model.metered),
        (Some(Cut::KillSwitch), Metered::Estimated)
    );
    assert_eq!(model.tokens.output_tokens, 30, "charged all it reserved");
}

#[tokio::test]
async fn an_agent_that_goes_away_mid_stream_is_charged_and_its_reservation_released() {
    // 200 tokens: a 30-token call reserves about 90 of them; had the reservation leaked, the
    // calls after it could not be paid for.
    let h = harness("{maxTokensPerRun: 200}").await;
    let client = reqwest::Client::new();
    let mut response = client
        .post(format!("{}/llm/openai/chat/completions", h.url))
        .bearer_auth(AGENT_KEY)
        .header("tollgate-run-id", "r1")
        .json(&json!({"model": "slow", "stream": true, "max_tokens": 30,
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap().unwrap();
    assert!(
        String::from_utf8_lossy(&first).starts_with("data: "),
        "relayed as it came"
    );
    drop(response);
    let deadline = Instant::now() + Duration::from_secs(10);
    let record = loop {
        if let Some(record) = h.model_records("r1").await.pop() {
            break record;
        }
        assert!(Instant::now() < deadline, "the call was never recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let model = record.model.as_ref().unwrap();
    assert_eq!(model.cut, Some(Cut::ClientGone));
    assert!(record.usage.as_ref().unwrap().tokens > 0, "never free");
    let charged = record.counters.as_ref().unwrap().tokens;
    let out = h
        .sdk(json!({"sdk": "openai", "run": "r1", "model": "gpt-4o-mini", "max_tokens": 5}))
        .await;
    assert_eq!(
        out["ok"], true,
        "the reservation was released ({charged} charged): {out}"
    );
}

#[tokio::test]
async fn an_answer_still_coming_when_the_runs_wall_clock_runs_out_is_ended_and_the_run_halted() {
    let h = harness("{maxTokensPerRun: 100000, maxWallClockSeconds: 2}").await;
    // 100 words at 100 ms: ten seconds of answer in a run of two.
    let started = Instant::now();
    let out = h
        .sdk(json!({"sdk": "anthropic", "run": "r1", "model": "slow", "max_tokens": 100, "stream": true}))
        .await;
    let error = error_of(&out);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("maxWallClockSeconds"),
        "{out}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "ended with the clock"
    );
    let chunks = out["chunks"].as_u64().unwrap();
    assert!(chunks < 100, "{chunks}");
    let records = h.model_records("r1").await;
    let model = records[0].model.as_ref().unwrap();
    assert_eq!(model.cut, Some(Cut::Ceiling));
    let halts: Vec<_> = h
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event == Event::Halt)
        .collect();
    assert_eq!(halts.len(), 1);
    assert_eq!(
        halts[0].ceiling.as_ref().unwrap().clause(),
        "spec.execution.maxWallClockSeconds"
    );
    // A whole answer too: the same run is halted now; another run's long call ends at its clock.
    let out = h
        .sdk(json!({"sdk": "openai", "run": "r2", "model": "slow", "max_tokens": 50}))
        .await;
    assert!(
        error_of(&out)["message"]
            .as_str()
            .unwrap()
            .contains("maxWallClockSeconds"),
        "{out}"
    );
    let decided = h.run_tokens("r2").await;
    assert_eq!(decided["decision"], "halt", "{decided}");
}
