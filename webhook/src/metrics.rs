//! The webhook's metrics: one registry, names `tollgate_admission_*` and `tollgate_gateway_*`,
//! labels from closed sets.

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
    /// Gateway decisions, by decision (allow, deny, requireApproval, halt) and deny code.
    pub decisions: IntCounterVec,
    /// Time to decide and record one call, before any approval wait.
    pub decision_duration: prometheus::Histogram,
    /// Requests the gateway refused before deciding, by path kind (api, mcp).
    pub refusals: IntCounterVec,
    /// Calls waiting for people now.
    pub waiting: IntGauge,
    /// Budget breaches escalated.
    pub breaches: IntCounter,
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
            &["decision", "code"],
        )
        .expect("a valid metric");
        let decision_duration = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "tollgate_gateway_decision_duration_seconds",
                "Time to decide and durably record one call",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
            ]),
        )
        .expect("a valid metric");
        let refusals = IntCounterVec::new(
            Opts::new(
                "tollgate_gateway_refusals_total",
                "Requests refused before a decision (unauthenticated, malformed, oversized)",
            ),
            &["surface"],
        )
        .expect("a valid metric");
        let waiting = IntGauge::new(
            "tollgate_gateway_approvals_waiting",
            "Calls waiting for an approval decision",
        )
        .expect("a valid metric");
        let breaches = IntCounter::new(
            "tollgate_gateway_breaches_total",
            "Budget breaches that halted a run and were escalated",
        )
        .expect("a valid metric");
        for collector in [
            Box::new(reviews.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(decisions.clone()),
            Box::new(decision_duration.clone()),
            Box::new(refusals.clone()),
            Box::new(waiting.clone()),
            Box::new(breaches.clone()),
        ] {
            registry.register(collector).expect("registered once");
        }
        Metrics {
            registry,
            reviews,
            duration,
            decisions,
            decision_duration,
            refusals,
            waiting,
            breaches,
        }
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
