//! medmesh-sidecar: a transparent mTLS proxy for one pod.
//!
//! Composition ([`Sidecar::start`], top to bottom): configuration → identity source (files; the
//! operator's CSR flow later) → policy (file, hot-reloaded) → metrics → listeners: inbound,
//! outbound, admin. Shutdown stops the listeners, drains open connections until the deadline,
//! then cuts what is left.

pub mod admin;
pub mod archive;
pub mod audit;
pub mod config;
pub mod deliver;
pub mod detect;
pub mod dicom;
pub mod dicom_proxy;
pub mod dicomweb;
pub mod identity;
pub mod identity_csr;
pub mod iptables;
pub mod metrics;
pub mod multipart;
pub mod policy_file;
pub mod proxy;
pub mod spool;

use std::net::SocketAddr;
use std::sync::Arc;

use medmesh_core::policy::Policy;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Config;

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The policy file is invalid.
    #[error("{0}")]
    Policy(String),
    /// Auditing could not start (spool, key).
    #[error("auditing: {0}")]
    Audit(String),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Error.
        source: std::io::Error,
    },
}

/// A running sidecar.
pub struct Sidecar {
    /// Inbound listener address.
    pub inbound: SocketAddr,
    /// Outbound listener address.
    pub outbound: SocketAddr,
    /// Admin listener address.
    pub admin: SocketAddr,
    shutdown: Arc<watch::Sender<bool>>,
    cut: watch::Sender<bool>,
    tracker: proxy::Tracker,
    drain: std::time::Duration,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sidecar")
            .field("inbound", &self.inbound)
            .field("outbound", &self.outbound)
            .finish()
    }
}

impl Sidecar {
    /// Loads the policy, starts the identity source and binds the three listeners.
    ///
    /// # Errors
    /// When the policy is invalid or a port cannot be bound.
    pub async fn start(cfg: Config) -> Result<Self, StartError> {
        let cfg = Arc::new(cfg);
        let registry = prometheus::Registry::new();
        let metrics = metrics::Metrics::register(&registry);
        // Identity: certificates from files (reloaded on change) or the identity service.
        let identity: Box<dyn identity::IdentitySource> = match &cfg.identity {
            config::IdentityConfig::Files { cert, key, ca } => {
                Box::new(identity::FileIdentity::spawn(
                    identity::FilePaths {
                        cert: cert.clone(),
                        key: key.clone(),
                        bundle: ca.clone(),
                        trust_domain: cfg.trust_domain.clone(),
                    },
                    cfg.reload,
                    metrics.clone(),
                ))
            }
            config::IdentityConfig::Service {
                url,
                token,
                service_ca,
            } => Box::new(identity_csr::CsrIdentity::spawn(
                identity_csr::CsrConfig {
                    url: url.clone(),
                    token: token.clone(),
                    service_ca: service_ca.clone(),
                    trust_domain: cfg.trust_domain.clone(),
                    max_backoff: std::time::Duration::from_secs(30),
                },
                metrics.clone(),
            )),
        };
        // Policy: default deny until a valid document is read; a bad one refuses to start.
        let initial = match &cfg.policy {
            Some(p) if !p.exists() => {
                tracing::warn!(path = %p.display(), "no policy file yet: every inbound connection is refused until it appears");
                Policy::deny_all(cfg.trust_domain.clone())
            }
            Some(p) => policy_file::load(p, cfg.pod_labels.as_deref(), &cfg.trust_domain)
                .map_err(StartError::Policy)?,
            None => Policy::deny_all(cfg.trust_domain.clone()),
        };
        let policy = policy_file::watch(
            cfg.policy.clone(),
            cfg.pod_labels.clone(),
            initial,
            cfg.trust_domain.clone(),
            cfg.reload,
            metrics.clone(),
        );

        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        let inbound_l = bind(cfg.inbound_addr).await?;
        let outbound_l = bind(cfg.outbound_addr).await?;
        let admin_l = bind(cfg.admin_addr).await?;
        let addr = |l: &TcpListener, a| {
            l.local_addr()
                .map_err(|source| StartError::Bind { addr: a, source })
        };
        let (inbound, outbound, admin) = (
            addr(&inbound_l, cfg.inbound_addr)?,
            addr(&outbound_l, cfg.outbound_addr)?,
            addr(&admin_l, cfg.admin_addr)?,
        );

        let (shutdown, stop) = watch::channel(false);
        let shutdown = Arc::new(shutdown);
        // Auditing of DICOM ports: the spool, the delivery service and the UID key.
        let audit = match &cfg.audit {
            None => None,
            Some(a) => {
                let spool = spool::Spool::open(&a.spool_dir, a.spool_max_bytes)
                    .map_err(|e| StartError::Audit(e.to_string()))?;
                let key = std::fs::read(&a.key)
                    .map_err(|e| StartError::Audit(format!("{}: {e}", a.key.display())))
                    .and_then(|k| {
                        medmesh_core::record::UidKey::new(k)
                            .map_err(|e| StartError::Audit(e.to_string()))
                    })?;
                let delivery = deliver::Delivery::new(
                    a.mode,
                    deliver::LedgerTarget {
                        url: a.ledger_url.clone(),
                        server: match &a.ledger_id {
                            Some(id) => medmesh_core::tls::ServerIdentity::Exact(id.clone()),
                            None => medmesh_core::tls::ServerIdentity::AnyInTrustDomain,
                        },
                        verifier: a.verifier.clone(),
                        origin: a.origin.clone(),
                    },
                    a.deadline,
                    identity.credentials(),
                    spool,
                    metrics.clone(),
                );
                delivery.spawn(stop.clone());
                let archive = match &a.archive {
                    None => None,
                    Some(ac) => {
                        let archiver = archive::Archiver::open(ac.clone(), metrics.clone())
                            .map_err(|e| StartError::Audit(e.to_string()))?;
                        archiver.spawn_uploader(
                            delivery.clone(),
                            identity.credentials(),
                            metrics.clone(),
                            stop.clone(),
                        );
                        if let Some(file) = &ac.recipients_file {
                            archiver.follow_recipients(
                                file.clone(),
                                cfg.reload,
                                metrics.clone(),
                                stop.clone(),
                            );
                        }
                        Some(archiver)
                    }
                };
                Some(Arc::new(proxy::Audit {
                    delivery,
                    key: Arc::new(key),
                    archive,
                }))
            }
        };
        let (tracker, cut) = proxy::Tracker::new();
        let shared = proxy::Shared {
            cfg: cfg.clone(),
            creds: identity.credentials(),
            policy,
            metrics: metrics.clone(),
            conns: tracker.clone(),
            audit,
        };
        let tasks = vec![
            tokio::spawn(proxy::serve(inbound_l, shared.clone(), true, stop.clone())),
            tokio::spawn(proxy::serve(outbound_l, shared, false, stop.clone())),
            tokio::spawn(admin::serve(
                admin_l,
                identity.credentials(),
                registry,
                shutdown.clone(),
                stop,
            )),
        ];
        tracing::info!(%inbound, %outbound, %admin, "sidecar listening");
        Ok(Self {
            inbound,
            outbound,
            admin,
            shutdown,
            cut,
            tracker,
            drain: cfg.drain,
            tasks,
        })
    }

    /// Resolves when a shutdown was requested (`POST /shutdown`).
    pub async fn shutdown_requested(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Stops accepting, waits for open connections up to the drain deadline, then cuts the rest.
    pub async fn shutdown(self) {
        self.shutdown.send_replace(true);
        let open = self.tracker.open();
        if open > 0 {
            tracing::info!(open, deadline = ?self.drain, "draining connections");
        }
        if tokio::time::timeout(self.drain, self.tracker.idle())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.tracker.open(),
                "drain deadline reached; cutting connections"
            );
            self.cut.send_replace(true);
            self.tracker.idle().await;
        }
        for t in self.tasks {
            let _ = t.await;
        }
    }
}
