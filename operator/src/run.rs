//! `medmesh-operator run`: the HTTPS listener (webhook and identity service, served by every
//! replica), the admin listener, and the place where the leader-only controllers will run.
//!
//! Start-up order, and why:
//! 1. configuration, checked whole (exit 64 on any problem);
//! 2. the admin listener, so that `/live` answers while the rest starts (`/ready` stays false);
//! 3. the Kubernetes client, the issuer CA (read or bootstrapped) and the serving certificate;
//! 4. the HTTPS listener; `/ready` turns true once it accepts;
//! 5. the serving-certificate loop (every replica: rotation through the `watch` channel the
//!    HTTPS listener reads its TLS configuration from, `caBundle` of the webhook);
//! 6. leader election on the Lease, and under it the `AuditLedger` and `MeshPolicy`
//!    controllers, started when this replica becomes leader and stopped when it stops being
//!    one.
//!
//! Traces (`--otlp-endpoint`) are set up before this, by `main` with
//! [`crate::telemetry::init`], and flushed after it returns.
//!
//! SIGTERM or Ctrl-C stops accepting, drains open connections for at most [`DRAIN`], then
//! closes what is left.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::Registry;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

use crate::controller::{self, Context};
use crate::events::EventSink;
use crate::events::KubeEvents;
use crate::identity::{self, IdentityService, IssuerCa, KubeTokenReviewer};
use crate::leader::{self, LeaseLock};
use crate::metrics::{CaKind, Metrics, ReconcileMetrics};
use crate::serving::{self, ServingLoop, Source};
use crate::webhook::{self, InjectConfig, WebhookState};

pub mod config;

pub use config::{Config, RawConfig, Resolve, ServingCert, VERSION};

/// Longest the drain of open connections may take at shutdown.
pub const DRAIN: Duration = Duration::from_secs(10);
/// Longest a client may take to finish its TLS handshake or send its request headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most HTTPS connections open at once (the API server keeps a few; sidecars come and go).
const MAX_CONNECTIONS: usize = 2048;

/// Why the operator could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The serving certificate could not be loaded.
    #[error("serving certificate: {0}")]
    Serving(String),
    /// Binding a listener failed.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The Kubernetes client could not be built.
    #[error("Kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    /// The issuer CA could not be loaded or bootstrapped.
    #[error("issuer CA: {0}")]
    Ca(#[from] identity::CaError),
    /// Metrics registration failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The serving certificate could not be created or loaded.
    #[error("serving certificate: {0}")]
    ServingMaterial(#[from] serving::ServingError),
}

/// A TLS 1.3-only server configuration (aws-lc-rs, post-quantum hybrid key exchange first)
/// offering HTTP/2 and HTTP/1.1.
///
/// # Errors
/// When the PEM inputs hold no certificate or key, or they do not match.
pub fn server_tls(chain_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, RunError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| RunError::Serving(format!("certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(RunError::Serving("no PEM certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| RunError::Serving(format!("private key: {e}")))?;
    let mut cfg = ServerConfig::builder_with_provider(medmesh_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| RunError::Serving(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| RunError::Serving(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves `app` over TLS on `listener` until `shutdown` turns true, then drains for at most
/// `drain`. The TLS configuration is read from `tls` per connection, so a rotated serving
/// certificate applies to new connections without a restart.
pub async fn serve_https(
    listener: TcpListener,
    tls: watch::Receiver<Arc<ServerConfig>>,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        while conns.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many connections; closing");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.borrow().clone());
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        conns.spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let app = app.clone();
                    async move {
                        let req: Request = req.map(axum::body::Body::new);
                        Ok::<_, Infallible>(app.oneshot(req).await.into_response())
                    }
                });
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("HTTPS connections drained"),
        _ = tokio::time::sleep(drain) => {
            tracing::warn!(deadline = ?drain, open = conns.len(), "drain deadline reached; closing remaining connections");
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

/// State of the admin listener.
#[derive(Clone)]
pub struct Admin {
    /// Whether the HTTPS listener accepts (and the CA is loaded).
    pub ready: Arc<AtomicBool>,
    /// The registry `/metrics` exports.
    pub registry: Registry,
}

/// `GET /live`, `/ready`, `/metrics`.
pub fn admin_router(admin: Admin) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok" }))
        .route(
            "/ready",
            get(|State(a): State<Admin>| async move {
                if a.ready.load(Ordering::Acquire) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(a): State<Admin>| async move {
                let mut out = String::new();
                match prometheus::TextEncoder::new().encode_utf8(&a.registry.gather(), &mut out) {
                    Ok(()) => (StatusCode::OK, out),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }),
        )
        .with_state(admin)
}

/// The HTTPS application: the webhook and the identity service.
pub fn https_router<R: identity::TokenReviewer>(
    webhook: WebhookState,
    identity: Arc<IdentityService<R>>,
) -> Router {
    webhook::router(webhook).merge(identity::router(identity))
}

async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Listen { addr, source })
}

/// Runs the operator until SIGTERM or Ctrl-C.
///
/// # Errors
/// When a listener cannot be bound, or the client, CA or serving certificate cannot be loaded.
pub async fn run(cfg: Config) -> Result<(), RunError> {
    run_until(cfg, shutdown_signal()).await
}

/// Runs the operator until `shutdown` resolves (the cluster e2e tests run it in process).
///
/// # Errors
/// When a listener cannot be bound, or the client, CA or serving certificate cannot be loaded.
pub async fn run_until(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let registry = Registry::new_custom(Some("medmesh_operator".into()), None)?;
    let metrics = Metrics::register(&registry)?;
    let reconcile_metrics = ReconcileMetrics::register(&registry)?;
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);

    let admin = bind(cfg.admin_addr).await?;
    let admin_app = admin_router(Admin {
        ready: ready.clone(),
        registry,
    });
    let mut admin_stop = stop_rx.clone();
    let admin_task = tokio::spawn(async move {
        let serve = axum::serve(admin, admin_app).with_graceful_shutdown(async move {
            let _ = admin_stop.wait_for(|stop| *stop).await;
        });
        if let Err(e) = serve.await {
            tracing::warn!(error = %e, "admin listener failed");
        }
    });

    let client = kube::Client::try_default().await?;
    // The pod name (HOSTNAME in a pod) tells replicas apart in the Lease and in Events.
    let identity = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| format!("medmesh-operator-{}", std::process::id()));
    let secrets = kube::Api::namespaced(client.clone(), &cfg.namespace);
    let ca = Arc::new(
        IssuerCa::load_or_bootstrap(&secrets, &cfg.namespace, &cfg.ca_secret, &cfg.trust_domain)
            .await?,
    );
    let source = match &cfg.serving {
        ServingCert::Files { cert, key } => Source::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        ServingCert::Secret(name) => {
            let urls: Vec<&str> = cfg
                .webhook_url
                .iter()
                .chain(std::iter::once(&cfg.identity_url))
                .map(String::as_str)
                .collect();
            Source::Secret {
                api: secrets.clone(),
                namespace: cfg.namespace.clone(),
                name: name.clone(),
                sans: serving::sans(&cfg.webhook_service, &cfg.namespace, &urls),
                webhooks: kube::Api::all(client.clone()),
                webhook_config: cfg.webhook_config.clone(),
                webhook_url: cfg.webhook_url.clone(),
            }
        }
    };
    let (tls, serving_ca) = ServingLoop::initial(&source).await?;
    let (tls_tx, tls_rx) = watch::channel(tls);
    let (ca_tx, ca_rx) = watch::channel(serving_ca);
    let ca_watch = ca_rx.clone();
    let serving_task = tokio::spawn(
        ServingLoop {
            source,
            tls: tls_tx,
            ca: ca_tx,
        }
        .run(stop_rx.clone()),
    );

    let events: Arc<dyn EventSink> =
        Arc::new(KubeEvents::start(client.clone(), Some(identity.clone())));
    let webhook_state = WebhookState {
        config: Arc::new(InjectConfig {
            sidecar_image: cfg.sidecar_image.clone(),
            image_pull_policy: None,
            trust_domain: cfg.trust_domain.clone(),
            identity_url: cfg.identity_url.clone(),
            version: VERSION.to_owned(),
            native_sidecar: cfg.native_sidecar,
            otlp_endpoint: cfg.otlp_endpoint.clone(),
        }),
        events: events.clone(),
        metrics: metrics.clone(),
    };
    metrics.set_ca_expiry(CaKind::Workload, ca.not_after().unix_timestamp());
    let replica_metrics = metrics.clone();
    let identity_service = Arc::new(IdentityService {
        ca: ca.clone(),
        reviewer: KubeTokenReviewer::new(client.clone()),
        trust_domain: cfg.trust_domain.clone(),
        ttl: cfg.cert_ttl,
        metrics,
    });
    let https = bind(cfg.https_addr).await?;
    let https_task = tokio::spawn(serve_https(
        https,
        tls_rx,
        https_router(webhook_state, identity_service),
        stop_rx.clone(),
        DRAIN,
    ));
    ready.store(true, Ordering::Release);
    tracing::info!(https = %cfg.https_addr, admin = %cfg.admin_addr, %identity, "serving");

    // The operator reads ledger checkpoints as spiffe://<td>/ns/<ns>/sa/<service>, an SVID
    // it issues itself from the identity CA.
    let reader_id = cfg
        .trust_domain
        .workload(&cfg.namespace, &cfg.webhook_service)
        .ok();
    let ctx = Arc::new(Context {
        client: client.clone(),
        trust_domain: cfg.trust_domain.clone(),
        ledger_image: cfg.ledger_image.clone(),
        otlp_endpoint: cfg.otlp_endpoint.clone(),
        ca: ca.clone(),
        checkpoints: reader_id.clone().map(|id| {
            Arc::new(controller::audit_ledger::SelfIssuedReader {
                ca: ca.clone(),
                id,
                trust_domain: cfg.trust_domain.clone(),
            }) as Arc<dyn controller::CheckpointReader>
        }),
        archive_peers: reader_id.clone().map(|id| {
            Arc::new(controller::image_archive::MeshPeerReader {
                ca: ca.clone(),
                id,
                trust_domain: cfg.trust_domain.clone(),
            }) as Arc<dyn controller::PeerReader>
        }),
        reader_id,
        serving_ca: ca_rx.clone(),
        events,
        metrics: reconcile_metrics,
        clock: controller::system_clock(),
        resolve: cfg.resolve.clone(),
    });
    let lock = LeaseLock::new(
        kube::Api::namespaced(client.clone(), &cfg.namespace),
        &cfg.lease_name,
        &identity,
    );
    let (lead_tx, lead_rx) = watch::channel(false);
    let elector = tokio::spawn(leader::run(lock, lead_tx, stop_rx.clone()));
    // The replica's state as metrics: whether it leads, and when the serving CA (rotated by
    // the serving loop) expires.
    tokio::spawn(follow_replica_state(
        replica_metrics,
        lead_rx.clone(),
        ca_watch,
        stop_rx.clone(),
    ));
    let controllers = tokio::spawn(lead(ctx, lead_rx, stop_rx.clone()));

    shutdown.await;
    tracing::info!("shutting down");
    ready.store(false, Ordering::Release);
    let _ = stop_tx.send(true);
    let _ = controllers.await;
    let _ = elector.await;
    let _ = https_task.await;
    let _ = serving_task.await;
    let _ = admin_task.await;
    Ok(())
}

/// Keeps the leader gauge and the serving CA's expiry current until `stop`.
async fn follow_replica_state(
    metrics: Metrics,
    mut leading: watch::Receiver<bool>,
    mut serving_ca: watch::Receiver<Option<String>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        metrics.set_leader(*leading.borrow_and_update());
        if let Some(t) = serving_ca
            .borrow_and_update()
            .as_deref()
            .and_then(pem_not_after)
        {
            metrics.set_ca_expiry(CaKind::Serving, t);
        }
        tokio::select! {
            r = leading.changed() => if r.is_err() { break },
            r = serving_ca.changed() => if r.is_err() { break },
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    metrics.set_leader(false);
}

/// The `notAfter` (Unix seconds) of the first certificate in `pem`.
fn pem_not_after(pem: &str) -> Option<i64> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = p.parse_x509().ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Runs the controllers while `leading` is true, until `stop`.
async fn lead(
    ctx: Arc<Context>,
    mut leading: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = leading.wait_for(|l| *l) => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        tracing::info!("starting controllers");
        let mut lost = leading.clone();
        let mut stopped = stop.clone();
        controller::run(ctx.clone(), async move {
            tokio::select! {
                _ = lost.wait_for(|l| !*l) => {}
                _ = stopped.wait_for(|s| *s) => {}
            }
        })
        .await;
        tracing::info!("controllers stopped");
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
