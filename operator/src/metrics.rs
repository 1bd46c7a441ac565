//! The operator's metrics: one registry, names `tollgate_operator_*`, labels from closed sets.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Operator metrics. Gauges are refreshed from the watch caches when scraped.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconciliations run, by controller.
    pub reconciliations: IntCounterVec,
    /// Reconciliations that failed, by controller and error kind.
    pub errors: IntCounterVec,
    /// Time spent in one reconciliation, by controller.
    pub duration: HistogramVec,
    /// AgentIdentities by state: ready, killed, failed, pending.
    pub agents: IntGaugeVec,
    /// ApprovalRequests by phase.
    pub approvals: IntGaugeVec,
    /// 1 while this replica holds the Lease and reconciles.
    pub leader: IntGauge,
    /// When the first pending ApprovalRequest expires, in seconds since the epoch (0: none).
    pub approval_soonest_expiry: IntGauge,
    /// Time from an ApprovalRequest's creation to its final phase, by phase.
    pub approval_decision: HistogramVec,
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let reconciliations = IntCounterVec::new(
            Opts::new(
                "tollgate_operator_reconciliations_total",
                "Reconciliations run",
            ),
            &["controller"],
        )
        .expect("a valid metric");
        let errors = IntCounterVec::new(
            Opts::new(
                "tollgate_operator_reconcile_errors_total",
                "Reconciliations that failed",
            ),
            &["controller", "error"],
        )
        .expect("a valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_operator_reconcile_duration_seconds",
                "Time spent in one reconciliation",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ]),
            &["controller"],
        )
        .expect("a valid metric");
        let agents = IntGaugeVec::new(
            Opts::new("tollgate_operator_agents", "AgentIdentities by state"),
            &["state"],
        )
        .expect("a valid metric");
        let approvals = IntGaugeVec::new(
            Opts::new("tollgate_operator_approvals", "ApprovalRequests by phase"),
            &["phase"],
        )
        .expect("a valid metric");
        let leader = IntGauge::new(
            "tollgate_operator_leader",
            "1 while this replica holds the operator's Lease and reconciles, else 0",
        )
        .expect("a valid metric");
        let approval_soonest_expiry = IntGauge::new(
            "tollgate_operator_approval_soonest_expiry_timestamp_seconds",
            "When the first pending ApprovalRequest expires, in seconds since the epoch; 0 when none waits",
        )
        .expect("a valid metric");
        let approval_decision = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_operator_approval_decision_seconds",
                "Time from an ApprovalRequest's creation to its final phase (Approved, Denied, Expired, Cancelled)",
            )
            .buckets(vec![
                1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0,
                86400.0,
            ]),
            &["phase"],
        )
        .expect("a valid metric");
        for collector in [
            Box::new(reconciliations.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(approval_decision.clone()),
            Box::new(leader.clone()),
            Box::new(approval_soonest_expiry.clone()),
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(agents.clone()),
            Box::new(approvals.clone()),
        ] {
            registry.register(collector).expect("registered once");
        }
        Metrics {
            registry,
            reconciliations,
            errors,
            duration,
            agents,
            approvals,
            leader,
            approval_soonest_expiry,
            approval_decision,
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
