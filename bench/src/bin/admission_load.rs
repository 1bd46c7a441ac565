//! Load on the admission face over real TLS on loopback: the webhook router (with a fixed view of
//! one agent and its policy) behind axum-server + rustls, and a client in the same process that
//! sends AdmissionReviews for an agent's protected delete (the guard's longest path: identity
//! lookup, policy compile, selector match, denial).
//!
//! Two runs: an open-loop run at a fixed rate (latency measured from each request's scheduled
//! send time, so a stall is not hidden), and a closed-loop run with concurrent workers for
//! throughput. Prints a Markdown table. `cargo run --release --bin admission-load [rate] [secs]`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tollgate_runtime::cluster::StaticView;
use tollgate_webhook::{AdmissionState, Settings, admission};

fn review() -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "7d1e", "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
            "name": "web-prod", "namespace": "ns", "operation": "DELETE",
            "userInfo": {"username": "system:serviceaccount:ns:agent-deployer"},
            "object": null,
            "oldObject": {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web-prod", "namespace": "ns", "labels": {"env": "production"}}},
            "dryRun": false
        }
    })
}

fn view() -> StaticView {
    let identity = serde_json::from_value(json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": {"name": "deployer", "namespace": "ns"},
        "spec": {"description": "d", "owner": {"team": "t", "contacts": ["a"]}, "podSelector": {"matchLabels": {"app": "deployer"}}}
    }))
    .unwrap();
    let policy = serde_json::from_value(json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentPolicy",
        "metadata": {"name": "deployer", "namespace": "ns"},
        "spec": {"identityRef": {"name": "deployer"}, "kubernetes": {"protectedResources": [
            {"operations": ["DELETE", "UPDATE"], "selector": {"matchLabels": {"env": "production"}}}]}}
    }))
    .unwrap();
    StaticView {
        identities: vec![Arc::new(identity)],
        policies: vec![Arc::new(policy)],
        global_kill: false,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rate: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let seconds: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10);
    tollgate_runtime::server::install_crypto_provider();

    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap()
        .pem();
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
        cert.into_bytes(),
        key.serialize_pem().into_bytes(),
    )
    .await
    .unwrap();

    let state = Arc::new(AdmissionState {
        view: Arc::new(view()),
        settings: Settings {
            gateway_username: "gw".into(),
            gateway_url: "https://gw".into(),
        },
        metrics: Default::default(),
        now: jiff::Timestamp::now,
        // The verdicts alone; a recorded agent write also waits for its durable append (the
        // audit section's one-at-a-time figures).
        audit: None,
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(
        axum_server::from_tcp_rustls(listener, tls)
            .unwrap()
            .serve(admission::router(state).into_make_service()),
    );

    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let url = format!("https://localhost:{port}/admission/validate-agents");
    let body = serde_json::to_vec(&review()).unwrap();
    let send = |client: reqwest::Client, url: String, body: Vec<u8>| async move {
        let response = client
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let review: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(
            review["response"]["allowed"], false,
            "the protected delete is denied"
        );
    };
    // Warm up connections and caches.
    for _ in 0..200 {
        send(client.clone(), url.clone(), body.clone()).await;
    }

    // Open loop at a fixed rate.
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let scheduled = start + interval * i as u32;
        tokio::time::sleep_until(scheduled.into()).await;
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            send(client, url, body).await;
            scheduled.elapsed()
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    for task in tasks {
        latencies.push(task.await.unwrap());
    }
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    latencies.sort();

    // Closed loop for throughput.
    let workers = 32;
    let deadline = Instant::now() + Duration::from_secs(5);
    let counted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut handles = Vec::new();
    let began = Instant::now();
    for _ in 0..workers {
        let (client, url, body, counted) =
            (client.clone(), url.clone(), body.clone(), counted.clone());
        handles.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                send(client.clone(), url.clone(), body.clone()).await;
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    let throughput =
        counted.load(std::sync::atomic::Ordering::Relaxed) as f64 / began.elapsed().as_secs_f64();

    println!("| run | requests | rate | p50 | p99 | max |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| open loop, {rate}/s for {seconds}s | {total} | {achieved:.0}/s | {} | {} | {} |",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().unwrap())
    );
    println!(
        "| closed loop, {workers} workers, 5s | {} | {throughput:.0}/s | | | |",
        counted.load(std::sync::atomic::Ordering::Relaxed)
    );
}
