//! The webhook's metrics: one registry, names `tollgate_admission_*`, labels from closed sets.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// Admission metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reviews answered, by endpoint and outcome (allowed, denied, malformed).
    pub reviews: IntCounterVec,
    /// Time to answer a review, by endpoint.
    pub duration: HistogramVec,
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
        registry
            .register(Box::new(reviews.clone()))
            .expect("registered once");
        registry
            .register(Box::new(duration.clone()))
            .expect("registered once");
        Metrics {
            registry,
            reviews,
            duration,
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
