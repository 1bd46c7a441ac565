//! The server as operated: the certificate is reloaded from its files without a restart, and
//! the probe port answers /healthz, /readyz (only once ready) and /metrics.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tollgate_runtime::metrics::Metrics;
use tollgate_runtime::server::{self, Readiness, TlsFiles};
use tower::ServiceExt;

struct Ca {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn ca() -> Ca {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let pem = params.self_signed(&key).unwrap().pem();
    Ca {
        pem,
        issuer: rcgen::Issuer::new(params, key),
    }
}

/// A serving certificate for localhost; returns (cert PEM, key PEM, cert DER).
fn leaf(ca: &Ca) -> (String, String, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca.issuer)
        .unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().to_vec())
}

async fn served_certificate(client: &reqwest::Client, port: u16) -> Vec<u8> {
    let response = client
        .get(format!("https://localhost:{port}/nothing"))
        .send()
        .await
        .unwrap();
    let info = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .expect("TLS info");
    info.peer_certificate()
        .expect("a peer certificate")
        .to_vec()
}

#[tokio::test]
async fn the_certificate_is_reloaded_when_its_files_change() {
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles {
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
    };
    let ca = ca();
    let (cert, key, first) = leaf(&ca);
    std::fs::write(&files.cert, cert).unwrap();
    std::fs::write(&files.key, key).unwrap();

    let config = server::tls_config(&files, Duration::from_millis(100))
        .await
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(
        axum_server::from_tcp_rustls(listener, config)
            .unwrap()
            .serve(axum::Router::new().into_make_service()),
    );

    let client = || {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap())
            .tls_info(true)
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    assert_eq!(served_certificate(&client(), port).await, first);

    // A rotation writes new files in place (as cert-manager's Secret volume does).
    tokio::time::sleep(Duration::from_millis(1100)).await; // a distinct mtime on coarse clocks
    let (cert, key, second) = leaf(&ca);
    std::fs::write(&files.key, key).unwrap();
    std::fs::write(&files.cert, cert).unwrap();
    let mut served = Vec::new();
    for _ in 0..50 {
        served = served_certificate(&client(), port).await;
        if served == second {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        served, second,
        "the new certificate is served without a restart"
    );

    // A broken file keeps the last good certificate in service.
    std::fs::write(&files.cert, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(served_certificate(&client(), port).await, second);
}

async fn get(app: axum::Router, path: &str) -> (StatusCode, String) {
    let response = app
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    (
        status,
        String::from_utf8(
            response
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap(),
    )
}

#[tokio::test]
async fn probes_and_metrics() {
    let readiness = Readiness::default();
    let metrics = Metrics::default();
    metrics
        .reviews
        .with_label_values(&["validate-agents", "denied"])
        .inc();
    let app = server::probes(readiness.clone(), metrics);
    assert_eq!(
        get(app.clone(), "/healthz").await,
        (StatusCode::OK, "ok".to_owned())
    );
    assert_eq!(
        get(app.clone(), "/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE,
        "not ready before the watches sync"
    );
    readiness.set_ready();
    assert_eq!(get(app.clone(), "/readyz").await.0, StatusCode::OK);
    let (status, text) = get(app, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        text.contains(
            r#"tollgate_admission_reviews_total{endpoint="validate-agents",outcome="denied"} 1"#
        ),
        "{text}"
    );
}
