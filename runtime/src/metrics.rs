//! The webhook's metrics: one registry, names `tollgate_admission_*`, `tollgate_gateway_*` and
//! `tollgate_audit_*`, labels from closed sets.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Admission metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reviews answered, by endpoint and outcome (allowed, denied, malformed).
    pub reviews: IntCounterVec,
    /// Time to answer a review, by endpoint.
    pub duration: HistogramVec,
    /// Gateway decisions, by agent (its namespace and name), decision (allow, deny,
    /// requireApproval, halt) and deny code.
    pub decisions: IntCounterVec,
    /// Time to decide and record one call, before any approval wait.
    pub decision_duration: prometheus::Histogram,
    /// Requests the gateway refused before deciding, by path kind (api, mcp) and refusal code.
    pub refusals: IntCounterVec,
    /// Tokens charged to agents' runs, by agent and source (`reported` by the agent, `metered`
    /// by the LLM proxy).
    pub charged_tokens: IntCounterVec,
    /// Cost charged to agents' runs in millionths of a US dollar, by agent and source.
    pub charged_cost_microusd: IntCounterVec,
    /// The ceilings of each agent's policy in force (`maxTokensPerRun`, `maxCostUSDPerWindow`,
    /// …), for dashboards to draw beside what was charged.
    pub agent_ceiling: prometheus::GaugeVec,
    /// Calls waiting for people now.
    pub waiting: IntGauge,
    /// Runs whose budget state the gateway holds in memory now (bounded per agent; the rest are
    /// rebuilt from the trail when they come back).
    pub runs_in_memory: IntGauge,
    /// Budget breaches escalated.
    pub breaches: IntCounter,
    /// Model tokens metered by the LLM proxy, by agent, model and kind (input, cachedInput, output).
    pub model_tokens: IntCounterVec,
    /// Model cost metered by the LLM proxy, in micro-dollars, by agent and model.
    pub model_cost_microusd: IntCounterVec,
    /// Model calls, by agent, model and outcome (ok, providerError, refused, cut).
    pub model_calls: IntCounterVec,
    /// Audit batches the writer handed to its store, by outcome (committed, failed).
    pub audit_batches: IntCounterVec,
    /// Records per audit batch.
    pub audit_batch_records: prometheus::Histogram,
    /// Time from handing a batch to the store until it was durable (or failed).
    pub audit_commit_duration: prometheus::Histogram,
    /// Time a batch's oldest record waited before its commit began.
    pub audit_queue_wait: prometheus::Histogram,
    /// Passes of the policy status writer over each AgentPolicy, by outcome.
    pub policy_status: IntCounterVec,
}

/// Buckets for the audit store's latencies: a commit is an fsync or a round trip, 0.1 to a few ms.
const AUDIT_SECONDS: [f64; 11] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 0.5, 2.0,
];

/// A histogram named `name` with `help` and `buckets`.
fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> prometheus::Histogram {
    prometheus::Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("a valid metric")
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let reviews = IntCounterVec::new(
            Opts::new(
                "tollgate_admission_reviews_total",
                "AdmissionReviews answered",
            ),
            &["endpoint", "outcome"],
        )
        .expect("a valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_admission_review_duration_seconds",
                "Time to answer an AdmissionReview",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05,
            ]),
            &["endpoint"],
        )
        .expect("a valid metric");
        let decisions = IntCounterVec::new(
            Opts::new("tollgate_gateway_decisions_total", "Tool calls decided"),
            &["namespace", "agent", "decision", "code"],
        )
        .expect("a valid metric");
        let decision_duration = histogram(
            "tollgate_gateway_decision_duration_seconds",
            "Time to decide and durably record one call",
            vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5],
        );
        let refusals = IntCounterVec::new(
            Opts::new(
                "tollgate_gateway_refusals_total",
                "Requests refused before a decision (unauthenticated, malformed, oversized, audit unavailable), by surface and refusal code",
            ),
            &["surface", "code"],
        )
        .expect("a valid metric");
        let charged_tokens = IntCounterVec::new(
            Opts::new(
                "tollgate_gateway_charged_tokens_total",
                "Tokens charged to agents' runs, by source: reported by the agent, or metered by the LLM proxy",
            ),
            &["namespace", "agent", "source"],
        )
        .expect("a valid metric");
        let charged_cost_microusd = IntCounterVec::new(
            Opts::new(
                "tollgate_gateway_charged_cost_microusd_total",
                "Cost charged to agents' runs, in millionths of a US dollar, by source",
            ),
            &["namespace", "agent", "source"],
        )
        .expect("a valid metric");
        let agent_ceiling = prometheus::GaugeVec::new(
            Opts::new(
                "tollgate_gateway_agent_ceiling",
                "The ceilings of each agent's policy in force (steps and tokens per run, US dollars per run and per window, runs per window)",
            ),
            &["namespace", "agent", "ceiling"],
        )
        .expect("a valid metric");
        let waiting = IntGauge::new(
            "tollgate_gateway_approvals_waiting",
            "Calls waiting for an approval decision",
        )
        .expect("a valid metric");
        let runs_in_memory = IntGauge::new(
            "tollgate_gateway_runs_in_memory",
            "Runs whose budget state the gateway holds in memory",
        )
        .expect("a valid metric");
        let breaches = IntCounter::new(
            "tollgate_gateway_breaches_total",
            "Budget breaches that halted a run and were escalated",
        )
        .expect("a valid metric");
        let model_tokens = IntCounterVec::new(
            Opts::new(
                "tollgate_gateway_model_tokens_total",
                "Model tokens metered by the gateway's LLM proxy",
            ),
            &["agent", "model", "kind"],
        )
        .expect("a valid metric");
        let model_cost_microusd = IntCounterVec::new(
            Opts::new(
                "tollgate_gateway_model_cost_microusd_total",
                "Model cost metered by the gateway's LLM proxy, in millionths of a US dollar",
            ),
            &["agent", "model"],
        )
        .expect("a valid metric");
        let model_calls = IntCounterVec::new(
            Opts::new(
                "tollgate_gateway_model_calls_total",
                "Model calls through the gateway's LLM proxy, by outcome",
            ),
            &["agent", "model", "outcome"],
        )
        .expect("a valid metric");
        let audit_batches = IntCounterVec::new(
            Opts::new(
                "tollgate_audit_batches_total",
                "Audit batches handed to the store, by outcome",
            ),
            &["outcome"],
        )
        .expect("a valid metric");
        // Both series exist from the start, so an alert on failed commits has a zero to rise from.
        for outcome in ["committed", "failed"] {
            audit_batches.with_label_values(&[outcome]);
        }
        let audit_batch_records = histogram(
            "tollgate_audit_batch_records",
            "Records per audit batch (group commit)",
            prometheus::exponential_buckets(1.0, 4.0, 7).expect("valid buckets"),
        );
        let audit_commit_duration = histogram(
            "tollgate_audit_commit_duration_seconds",
            "Time from handing an audit batch to the store until it was durable or failed",
            AUDIT_SECONDS.to_vec(),
        );
        let audit_queue_wait = histogram(
            "tollgate_audit_queue_wait_seconds",
            "Time an audit batch's oldest record waited before its commit began",
            AUDIT_SECONDS.to_vec(),
        );
        let policy_status = IntCounterVec::new(
            Opts::new(
                "tollgate_gateway_policy_status_total",
                "AgentPolicy track-record and drift evaluations: written, fresh (left as another pass wrote it), failed (the write was refused), unreadable (the trail could not be read; counted once per pass)",
            ),
            &["outcome"],
        )
        .expect("a valid metric");
        for outcome in ["written", "fresh", "failed", "unreadable"] {
            policy_status.with_label_values(&[outcome]);
        }
        for collector in [
            Box::new(reviews.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(decisions.clone()),
            Box::new(charged_tokens.clone()),
            Box::new(charged_cost_microusd.clone()),
            Box::new(agent_ceiling.clone()),
            Box::new(decision_duration.clone()),
            Box::new(refusals.clone()),
            Box::new(waiting.clone()),
            Box::new(runs_in_memory.clone()),
            Box::new(breaches.clone()),
            Box::new(model_tokens.clone()),
            Box::new(model_cost_microusd.clone()),
            Box::new(model_calls.clone()),
            Box::new(audit_batches.clone()),
            Box::new(audit_batch_records.clone()),
            Box::new(audit_commit_duration.clone()),
            Box::new(audit_queue_wait.clone()),
            Box::new(policy_status.clone()),
        ] {
            registry.register(collector).expect("registered once");
        }
        Metrics {
            registry,
            reviews,
            duration,
            decisions,
            charged_tokens,
            charged_cost_microusd,
            agent_ceiling,
            decision_duration,
            refusals,
            waiting,
            runs_in_memory,
            breaches,
            model_tokens,
            model_cost_microusd,
            model_calls,
            audit_batches,
            audit_batch_records,
            audit_commit_duration,
            audit_queue_wait,
            policy_status,
        }
    }
}

/// The audit writer reports each batch here (`WriterConfig::with_observer`).
impl tollgate_audit::Observer for Metrics {
    fn batch(&self, batch: &tollgate_audit::Batch) {
        let outcome = if batch.committed {
            "committed"
        } else {
            "failed"
        };
        self.audit_batches.with_label_values(&[outcome]).inc();
        self.audit_batch_records.observe(batch.records as f64);
        self.audit_commit_duration
            .observe(batch.commit.as_secs_f64());
        self.audit_queue_wait.observe(batch.waited.as_secs_f64());
    }
}

impl Metrics {
    /// The registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("metrics encode");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}
