//! Serving: the admission router over rustls on one port, with the certificate and key read
//! from files and reloaded when they change (cert-manager rotates them in place), and a plain
//! port for probes and metrics that never needs a certificate.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum_server::Handle;
use axum_server::tls_rustls::RustlsConfig;

use crate::metrics::Metrics;

/// The flags every in-cluster Tollgate server takes: its TLS listener, its probe listener and its
/// certificate (`#[command(flatten)]` them into a binary's arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct Serving {
    /// Address of the TLS listener.
    #[arg(long, env = "TOLLGATE_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Address of the plain listener for /healthz, /readyz and /metrics.
    #[arg(long, env = "TOLLGATE_PROBE_LISTEN", default_value = "0.0.0.0:8080")]
    pub probe_listen: SocketAddr,
    /// PEM certificate chain; reloaded when the file changes.
    #[arg(
        long,
        env = "TOLLGATE_TLS_CERT",
        default_value = "/etc/tollgate/tls/tls.crt"
    )]
    pub tls_cert: PathBuf,
    /// PEM private key; reloaded when the file changes.
    #[arg(
        long,
        env = "TOLLGATE_TLS_KEY",
        default_value = "/etc/tollgate/tls/tls.key"
    )]
    pub tls_key: PathBuf,
}

impl Serving {
    /// The certificate's files.
    pub fn tls(&self) -> TlsFiles {
        TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        }
    }
}

/// Where the serving certificate lives.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Readiness, flipped once the watches have synced.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the server ready.
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Installs ring as rustls' process-wide crypto provider (once; later calls are harmless).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Loads the certificate and starts watching its files; a change is picked up within
/// `interval`. A file that cannot be read keeps the previous certificate in service.
pub async fn tls_config(files: &TlsFiles, interval: Duration) -> std::io::Result<RustlsConfig> {
    install_crypto_provider();
    let config = RustlsConfig::from_pem_file(&files.cert, &files.key).await?;
    let reloading = config.clone();
    let files = files.clone();
    tokio::spawn(async move {
        let modified = |files: &TlsFiles| -> Option<(SystemTime, SystemTime)> {
            Some((
                std::fs::metadata(&files.cert).ok()?.modified().ok()?,
                std::fs::metadata(&files.key).ok()?.modified().ok()?,
            ))
        };
        let mut last = modified(&files);
        loop {
            tokio::time::sleep(interval).await;
            let now = modified(&files);
            if now.is_some() && now != last {
                match reloading
                    .reload_from_pem_file(&files.cert, &files.key)
                    .await
                {
                    Ok(()) => {
                        tracing::info!(cert = %files.cert.display(), "reloaded the serving certificate");
                        last = now;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the new certificate cannot be loaded; keeping the previous one")
                    }
                }
            }
        }
    });
    Ok(config)
}

/// Serves `app` over TLS until `handle` is shut down.
pub async fn serve_tls(
    app: Router,
    addr: SocketAddr,
    config: RustlsConfig,
    handle: Handle<SocketAddr>,
) -> std::io::Result<()> {
    // TCP_NODELAY: a streamed answer's events (SSE from the LLM and MCP proxies) leave as they
    // are written, not held back by Nagle's algorithm until the agent's ACK of the previous one.
    let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(config)
        .acceptor(axum_server::accept::NoDelayAcceptor::new());
    axum_server::bind(addr)
        .acceptor(acceptor)
        .handle(handle)
        .serve(app.into_make_service())
        .await
}

/// The probe router: /healthz, /readyz and /metrics.
pub fn probes(readiness: Readiness, metrics: Metrics) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(
                |State((readiness, _)): State<(Readiness, Metrics)>| async move {
                    if readiness.is_ready() {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "watches not synced")
                    }
                },
            ),
        )
        .route(
            "/metrics",
            get(|State((_, metrics)): State<(Readiness, Metrics)>| async move { metrics.render() }),
        )
        .with_state((readiness, metrics))
}

/// Completes on SIGTERM (what Kubernetes sends a pod it stops) or SIGINT (Ctrl-C), so a server
/// drains its in-flight requests instead of dying with them. The handlers are installed when this
/// is called, not when the future is first polled: a container's first process ignores a signal
/// it has no handler for, so a SIGTERM that came while the server was still opening its stores
/// would otherwise be lost and the pod killed only at the end of its grace period.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let listen = |kind: SignalKind, name: &'static str| match signal(kind) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, signal = name, "cannot catch the signal");
            None
        }
    };
    let mut terminate = listen(SignalKind::terminate(), "SIGTERM");
    let mut interrupt = listen(SignalKind::interrupt(), "SIGINT");
    async move {
        let received = |signal: &mut Option<tokio::signal::unix::Signal>| {
            let signal = signal.take();
            async move {
                match signal {
                    Some(mut signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
        };
        tokio::select! {
            () = received(&mut terminate) => {}
            () = received(&mut interrupt) => {}
        }
        tracing::info!("shutting down: draining in-flight requests");
    }
}

/// Shuts `handle`'s servers down gracefully (up to `grace` for in-flight requests) once a
/// shutdown signal arrives. Call it before anything slow: the handlers are installed now.
pub fn drain_on_signal(handle: Handle<SocketAddr>, grace: Duration) {
    let signal = shutdown_signal();
    tokio::spawn(async move {
        signal.await;
        handle.graceful_shutdown(Some(grace));
    });
}
