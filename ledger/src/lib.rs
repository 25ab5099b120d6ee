//! The medmesh audit ledger: an RFC 9162 Merkle log stored in redb, with signed C2SP
//! checkpoints, served over mTLS to SPIFFE-authenticated appenders and readers.
//!
//! Composition (read top to bottom in [`Ledger::start`]): configuration → credentials → storage
//! (with its consistency checks) → the group-commit sequencer → the API and admin listeners.

pub mod api;
pub mod config;
pub mod indexer;
pub mod metrics;
pub mod replication;
pub mod sequencer;
pub mod server;
pub mod storage;
mod wal;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use medmesh_core::NoteSigner;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Config;

/// Why the ledger could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// TLS material is missing or invalid.
    #[error("TLS credentials: {0}")]
    Creds(#[from] server::CredError),
    /// The signing key is unreadable or malformed.
    #[error("signing key {path}: {reason}")]
    SigningKey {
        /// The key file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The database could not be opened or is inconsistent.
    #[error("{0}")]
    Storage(#[from] storage::StorageError),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Error.
        source: std::io::Error,
    },
    /// Raft could not start.
    #[error("replication: {0}")]
    Raft(String),
    /// Any other I/O failure.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Error.
        source: std::io::Error,
    },
}

/// Reads a `PRIVATE+KEY+...` signing key file.
///
/// # Errors
/// When the file cannot be read or parsed.
pub fn load_signer(path: &std::path::Path) -> Result<NoteSigner, StartError> {
    let bad = |reason: String| StartError::SigningKey {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    NoteSigner::from_private_key(&text).map_err(|e| bad(e.to_string()))
}

/// A running ledger.
pub struct Ledger {
    /// Where the API listens.
    pub api_addr: SocketAddr,
    /// Where the admin endpoint listens.
    pub admin_addr: SocketAddr,
    /// The checkpoint verifier key.
    pub verifier_key: String,
    shutdown: watch::Sender<bool>,
    drain: Duration,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Replicated: the Raft instance and the proposer task, stopped after the API drains.
    raft: Option<(replication::Raft, tokio::task::JoinHandle<()>)>,
    /// The writer (single node), then the indexer (which follows it).
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("api_addr", &self.api_addr)
            .field("admin_addr", &self.admin_addr)
            .finish()
    }
}

impl Ledger {
    /// Opens the database, starts the writer and binds both listeners.
    ///
    /// # Errors
    /// When credentials, the signing key or the database are unusable, or a port cannot be bound.
    pub async fn start(cfg: Config) -> Result<Self, StartError> {
        let cfg = Arc::new(cfg);
        let paths = server::CredPaths {
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
            bundle: cfg.trust_bundle.clone(),
            trust_domain: cfg.trust_domain.clone(),
        };
        let creds = paths.load()?;
        tracing::info!(id = %creds.identity.id(), not_after = creds.identity.not_after(), "loaded TLS credentials");
        let signer = load_signer(&cfg.signing_key)?;
        let verifier = signer.verifier();
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| StartError::Io {
            what: format!("create data_dir {}", cfg.data_dir.display()),
            source,
        })?;
        let db_path = cfg.data_dir.join("ledger.redb");
        let state_path = cfg.data_dir.join("signer-state.note");
        let (storage, recovered) = {
            let (db_path, verifier, origin) =
                (db_path.clone(), verifier.clone(), cfg.origin.clone());
            tokio::task::spawn_blocking(move || {
                storage::Storage::open(&db_path, &verifier, &origin)
            })
            .await
            .map_err(|e| StartError::Io {
                what: "open database".into(),
                source: std::io::Error::other(e.to_string()),
            })??
        };
        sequencer::reconcile_signer_state(
            &state_path,
            &storage,
            &recovered,
            &verifier,
            &cfg.origin,
        )?;
        tracing::info!(size = recovered.frontier.size(), path = %db_path.display(), "opened ledger database");

        let registry = prometheus::Registry::new();
        let metrics = metrics::Metrics::register(&registry);
        let (creds_tx, creds_rx) = watch::channel(Arc::new(creds));
        let mut threads = Vec::new();
        let (seq, replicated) = match &cfg.replication {
            None => {
                let (seq, writer) = sequencer::Sequencer::start(
                    storage.clone(),
                    recovered,
                    signer,
                    sequencer::SequencerConfig {
                        origin: cfg.origin.clone(),
                        checkpoint_interval: cfg.checkpoint_interval,
                        max_batch_entries: cfg.max_batch_entries,
                        signer_state: state_path,
                        wal: Some(storage::wal_path(&db_path)),
                    },
                    metrics.clone(),
                )
                .map_err(|source| StartError::Io {
                    what: "start the writer thread and open its write-ahead log".into(),
                    source,
                })?;
                threads.push(writer);
                (seq, None)
            }
            Some(rep) => {
                let started = replication::node::start(replication::node::Parts {
                    cfg: &cfg,
                    rep,
                    storage: storage.clone(),
                    recovered,
                    signer,
                    verifier: verifier.clone(),
                    state_path,
                    creds: creds_rx.clone(),
                    metrics: metrics.clone(),
                    registry: &registry,
                })
                .await?;
                (started.seq, Some(started.replica))
            }
        };
        let indexed_now = storage.indexed_size()?;
        let (indexed_tx, indexed_rx) = watch::channel(indexed_now);
        let indexer = indexer::spawn(
            storage.clone(),
            seq.subscribe(),
            indexed_tx,
            metrics.clone(),
        )
        .map_err(|source| StartError::Io {
            what: "start indexer thread".into(),
            source,
        })?;

        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        let api_listener = bind(cfg.listen).await?;
        let admin_listener = bind(cfg.admin_listen).await?;
        let api_addr = api_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: cfg.admin_listen,
                source,
            })?;

        let (shutdown, shutdown_rx) = watch::channel(false);
        server::spawn_reloader(paths, creds_tx, Duration::from_secs(5), shutdown_rx.clone());

        let state = api::AppState::new(api::AppParts {
            cfg: cfg.clone(),
            storage,
            seq: seq.clone(),
            metrics: metrics.clone(),
            indexed: indexed_rx,
            replica: replicated.as_ref().map(|r| r.0.clone()),
        });
        let api_task = tokio::spawn(server::serve_api(
            api_listener,
            creds_rx,
            api::router(state),
            metrics.clone(),
            shutdown_rx.clone(),
            cfg.drain,
        ));
        let admin_task = tokio::spawn(server::serve_admin(
            admin_listener,
            admin_router(AdminState {
                head: seq.subscribe(),
                registry,
                metrics,
                replica: replicated.as_ref().map(|r| r.0.clone()),
            }),
            shutdown_rx,
        ));
        tracing::info!(%api_addr, %admin_addr, origin = %cfg.origin, verifier_key = %verifier, "ledger ready");
        Ok(Self {
            api_addr,
            admin_addr,
            verifier_key: verifier.to_string(),
            shutdown,
            drain: cfg.drain,
            tasks: vec![api_task, admin_task],
            raft: replicated.map(|(r, proposer)| (r.raft, proposer)),
            threads: {
                threads.push(indexer);
                threads
            },
        })
    }

    /// Resolves only if replication stops on its own (Raft reported a fatal error or its core
    /// task died), with the reason; never for a single node.
    pub async fn failed(&self) -> String {
        match &self.raft {
            Some((raft, _)) => replication::node::stopped(raft).await,
            None => std::future::pending().await,
        }
    }

    /// Stops accepting, drains connections (bounded by the configured deadline), lets the writer
    /// commit what it holds and sign a final checkpoint, and waits for it.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        // The API task drains and aborts within the deadline; the admin task could be held by a
        // scraper's keep-alive connection, so it gets the same deadline and is then aborted.
        for mut t in self.tasks.drain(..) {
            if tokio::time::timeout(self.drain + Duration::from_secs(1), &mut t)
                .await
                .is_err()
            {
                t.abort();
            }
        }
        // The router (and with it the last sequencer handle) is gone: the proposer finishes
        // what is in flight and exits; Raft stops.
        if let Some((raft, proposer)) = self.raft.take() {
            if tokio::time::timeout(self.drain + Duration::from_secs(1), proposer)
                .await
                .is_err()
            {
                tracing::warn!("proposer did not finish within the drain deadline");
            }
            if let Err(e) = raft.shutdown().await {
                tracing::warn!(error = %e, "Raft did not stop cleanly");
            }
        }
        // The writer drains and exits, then the indexer catches up and exits.
        for t in self.threads.drain(..) {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

#[derive(Clone)]
struct AdminState {
    // A receiver only: the admin endpoint must not keep the writer alive at shutdown.
    head: watch::Receiver<sequencer::Head>,
    registry: prometheus::Registry,
    metrics: metrics::Metrics,
    replica: Option<replication::Replica>,
}

fn admin_router(state: AdminState) -> Router {
    Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route(
            "/status",
            get(|State(s): State<AdminState>| async move {
                let head = s.head.borrow().clone();
                axum::Json(replication::node::status(
                    s.replica.as_ref(),
                    head.size,
                    head.checkpoint.as_ref().map(|c| c.checkpoint.size),
                ))
            }),
        )
        .route(
            "/ready",
            get(|State(s): State<AdminState>| async move {
                let cp = s.head.borrow().checkpoint.clone();
                if let Some(replica) = &s.replica
                    && let Err(why) = replication::node::ready(replica)
                {
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                    );
                }
                match cp {
                    Some(cp) => (
                        StatusCode::OK,
                        format!("ready: tree size {}\n", cp.checkpoint.size),
                    ),
                    None => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: no checkpoint yet\n".into(),
                    ),
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<AdminState>| async move {
                let published = s.metrics.checkpoint_time.get();
                if published > 0 {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0.0, |d| d.as_secs_f64());
                    s.metrics.checkpoint_age.set(now - published as f64);
                }
                let mut out = String::new();
                match prometheus::TextEncoder::new().encode_utf8(&s.registry.gather(), &mut out) {
                    Ok(()) => {
                        ([("content-type", "text/plain; version=0.0.4")], out).into_response()
                    }
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
                }
            }),
        )
        .with_state(state)
}
