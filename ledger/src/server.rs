//! Listeners: the mTLS API and the plaintext admin endpoint, credential reloading, and the
//! drain on shutdown.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::Request;
use axum::response::IntoResponse;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use medmesh_core::TrustDomain;
use medmesh_core::tls::{self, ClientAuth, Identity, SvidError, TrustBundle, Usage};
use rustls::pki_types::UnixTime;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt as _;

use crate::api::PeerAuth;
use crate::metrics::Metrics;

/// The TLS material in force: rebuilt whenever the files change.
pub struct Creds {
    /// The rustls configuration.
    pub config: Arc<rustls::ServerConfig>,
    /// The bundle client chains are checked against.
    pub bundle: TrustBundle,
    /// The server's own identity.
    pub identity: Identity,
}

/// Paths of the TLS material.
#[derive(Debug, Clone)]
pub struct CredPaths {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// Trust bundle.
    pub bundle: PathBuf,
    /// Trust domain.
    pub trust_domain: TrustDomain,
}

/// Why credentials could not be (re)loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The material is invalid.
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    /// The server certificate is not valid for the bundle.
    #[error("server certificate does not validate against the trust bundle: {0}")]
    OwnCert(SvidError),
}

impl CredPaths {
    /// Loads and checks the material.
    ///
    /// # Errors
    /// When a file is unreadable, or the certificate is not a valid SVID of the bundle.
    pub fn load(&self) -> Result<Creds, CredError> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| CredError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let identity = Identity::from_pem(&read(&self.cert)?, &read(&self.key)?)?;
        let bundle = TrustBundle::from_pem(&read(&self.bundle)?, self.trust_domain.clone())?;
        let (leaf, rest) = identity.chain().split_first().ok_or_else(|| {
            CredError::Tls(tls::TlsError::NoCertificate("certificate chain".into()))
        })?;
        tls::verify_svid(
            &bundle,
            &tls::provider(),
            leaf,
            rest,
            UnixTime::now(),
            Usage::Server,
        )
        .map_err(CredError::OwnCert)?;
        let config = tls::server_config(
            &identity,
            &bundle,
            ClientAuth::Deferred,
            &[b"h2", b"http/1.1"],
        )?;
        Ok(Creds {
            config: Arc::new(config),
            bundle,
            identity,
        })
    }

    fn mtimes(&self) -> Vec<Option<SystemTime>> {
        [&self.cert, &self.key, &self.bundle]
            .iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }
}

/// Watches the credential files and publishes new credentials when they change; keeps the last
/// good ones when new files are invalid (a half-written rotation must not take the ledger down).
pub fn spawn_reloader(
    paths: CredPaths,
    tx: watch::Sender<Arc<Creds>>,
    period: Duration,
    mut stop: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut last = paths.mtimes();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.changed() => return,
            }
            let now = paths.mtimes();
            if now == last {
                continue;
            }
            last = now;
            let p = paths.clone();
            match tokio::task::spawn_blocking(move || p.load()).await {
                Ok(Ok(c)) => {
                    tracing::info!(id = %c.identity.id(), not_after = c.identity.not_after(), "reloaded TLS credentials");
                    let _ = tx.send(Arc::new(c));
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "new TLS credentials are invalid; keeping the previous ones")
                }
                Err(e) => tracing::warn!(error = %e, "credential reload task failed"),
            }
        }
    });
}

/// Most API connections open at once; further ones are closed at accept.
const MAX_CONNECTIONS: usize = 4096;
/// Longest a client may take to send a request's headers, and for HTTP/1.1 the longest a
/// keep-alive connection may stay idle (clients give idle connections up sooner:
/// `wire::CLIENT_POOL_IDLE`).
const HEADER_TIMEOUT: Duration = medmesh_core::wire::API_HEADER_TIMEOUT;

/// Serves the API on `listener` until `shutdown` turns true, then drains for at most `drain`
/// and aborts whatever is still open (a stalled client must not hold the ledger open, and with
/// it the writer's last checkpoint).
pub async fn serve_api(
    listener: TcpListener,
    creds: watch::Receiver<Arc<Creds>>,
    router: Router,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30));
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
        // Reap finished connection tasks so the set stays small.
        while conns.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics
                .refusals
                .with_label_values(&["too_many_connections"])
                .inc();
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let creds = creds.borrow().clone();
        let router = router.clone();
        let metrics = metrics.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        conns.spawn(async move {
            let _slot = slot;
            let acceptor = tokio_rustls::TlsAcceptor::from(creds.config.clone());
            let tls = match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    metrics.handshake_failures.inc();
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics.handshake_failures.inc();
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            // Client certificates are checked here rather than in the handshake, so that a bad
            // one gets an HTTP 401 naming the problem (see `ClientAuth::Deferred`).
            let auth = {
                let (_, conn) = tls.get_ref();
                match conn.peer_certificates().and_then(|c| c.split_first()) {
                    None => Err(SvidError::Missing),
                    Some((leaf, rest)) => tls::verify_svid(
                        &creds.bundle,
                        &tls::provider(),
                        leaf,
                        rest,
                        UnixTime::now(),
                        Usage::Client,
                    )
                    .and_then(|id| Ok((id, tls::not_after(leaf)?))),
                }
            };
            let auth = PeerAuth(auth);
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(auth.clone());
                    let router = router.clone();
                    async move {
                        let req: Request = req.map(axum::body::Body::new);
                        Ok::<_, Infallible>(router.oneshot(req).await.into_response())
                    }
                },
            );
            let conn = builder.serve_connection(TokioIo::new(tls), svc);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all API connections drained"),
        _ = tokio::time::sleep(drain) => {
            tracing::warn!(deadline = ?drain, open = conns.len(), "drain deadline reached; closing remaining connections");
        }
    }
    // Whatever is left (stalled uploads, idle clients) is cut, releasing its handles on the
    // writer so that it can sign its final checkpoint and stop.
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

/// Serves `/live`, `/ready`, `/metrics` in plaintext until `shutdown` turns true.
pub async fn serve_admin(
    listener: TcpListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let fut = axum::serve(listener, router).with_graceful_shutdown(async move {
        let _ = shutdown.changed().await;
    });
    if let Err(e) = fut.await {
        tracing::warn!(error = %e, "admin listener failed");
    }
}
