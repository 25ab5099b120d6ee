//! Where the sidecar's credentials come from. [`IdentitySource`] hides the source: certificates
//! read from files here ([`FileIdentity`]); the operator's CSR flow plugs in the same way.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use medmesh_core::TrustDomain;
use medmesh_core::tls::{self, ClientAuth, Identity, ServerIdentity, TrustBundle, Usage};
use rustls::pki_types::UnixTime;
use tokio::sync::watch;

use crate::detect::MEDMESH_ALPN;
use crate::metrics::Metrics;

/// Credentials in force, with the TLS configurations built from them once.
pub struct Credentials {
    /// The workload identity.
    pub identity: Identity,
    /// The trust bundle.
    pub bundle: TrustBundle,
    /// Server side of inbound mTLS (client certificate required).
    pub server: Arc<rustls::ServerConfig>,
    /// Client side of outbound mTLS, accepting any server of the trust domain.
    pub client_any: Arc<rustls::ClientConfig>,
}

impl Credentials {
    /// Builds the TLS configurations, checking that the certificate is a valid SVID of the
    /// bundle now.
    ///
    /// # Errors
    /// When the material is inconsistent, expired or not an SVID.
    pub fn new(identity: Identity, bundle: TrustBundle) -> Result<Self, tls::TlsError> {
        let (leaf, rest) = identity
            .chain()
            .split_first()
            .ok_or_else(|| tls::TlsError::NoCertificate("certificate chain".into()))?;
        tls::verify_svid(
            &bundle,
            &tls::provider(),
            leaf,
            rest,
            UnixTime::now(),
            Usage::Server,
        )?;
        let server = tls::server_config(&identity, &bundle, ClientAuth::Required, &[MEDMESH_ALPN])?;
        let client_any = tls::client_config(
            Some(&identity),
            &bundle,
            ServerIdentity::AnyInTrustDomain,
            &[MEDMESH_ALPN],
        )?;
        Ok(Self {
            identity,
            bundle,
            server: Arc::new(server),
            client_any: Arc::new(client_any),
        })
    }

    /// A client configuration for a destination with a pinned identity.
    ///
    /// # Errors
    /// When rustls refuses the configuration.
    pub fn client_for(
        &self,
        server: &ServerIdentity,
    ) -> Result<Arc<rustls::ClientConfig>, tls::TlsError> {
        match server {
            ServerIdentity::AnyInTrustDomain => Ok(self.client_any.clone()),
            exact => Ok(Arc::new(tls::client_config(
                Some(&self.identity),
                &self.bundle,
                exact.clone(),
                &[MEDMESH_ALPN],
            )?)),
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .finish()
    }
}

/// A source of credentials. `None` until the first valid credentials arrive; then always the
/// latest valid ones (a source keeps the last good credentials when a renewal fails).
pub trait IdentitySource: Send + Sync + 'static {
    /// The current credentials and their updates.
    fn credentials(&self) -> watch::Receiver<Option<Arc<Credentials>>>;
}

/// Paths of the PEM files.
#[derive(Debug, Clone)]
pub struct FilePaths {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// Trust bundle.
    pub bundle: PathBuf,
    /// Trust domain.
    pub trust_domain: TrustDomain,
}

impl FilePaths {
    fn load(&self) -> Result<Credentials, String> {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let identity =
            Identity::from_pem(&read(&self.cert)?, &read(&self.key)?).map_err(|e| e.to_string())?;
        let bundle = TrustBundle::from_pem(&read(&self.bundle)?, self.trust_domain.clone())
            .map_err(|e| e.to_string())?;
        Credentials::new(identity, bundle).map_err(|e| e.to_string())
    }

    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        [&self.cert, &self.key, &self.bundle]
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            })
            .collect()
    }
}

/// Credentials read from PEM files and reloaded when the files change (polled), without
/// touching established connections: new handshakes use the new credentials.
pub struct FileIdentity {
    rx: watch::Receiver<Option<Arc<Credentials>>>,
}

impl FileIdentity {
    /// Loads the files (if they are there yet) and watches them every `period`.
    pub fn spawn(paths: FilePaths, period: Duration, metrics: Metrics) -> Self {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let stamp = paths.stamp();
                if last.as_ref() != Some(&stamp) {
                    last = Some(stamp);
                    let p = paths.clone();
                    match tokio::task::spawn_blocking(move || p.load()).await {
                        Ok(Ok(c)) => {
                            tracing::info!(id = %c.identity.id(), not_after = c.identity.not_after(), "loaded credentials");
                            metrics.cert_expiry.set(c.identity.not_after());
                            metrics.cert_not_before.set(c.identity.not_before());
                            metrics.cert_reloads.with_label_values(&["ok"]).inc();
                            metrics.ready.set(1);
                            tx.send_replace(Some(Arc::new(c)));
                        }
                        Ok(Err(e)) => {
                            metrics.cert_reloads.with_label_values(&["error"]).inc();
                            tracing::warn!(error = %e, "credentials not usable; keeping the previous ones");
                        }
                        Err(e) => tracing::warn!(error = %e, "credential loader failed"),
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(period).await;
            }
        });
        Self { rx }
    }
}

impl IdentitySource for FileIdentity {
    fn credentials(&self) -> watch::Receiver<Option<Arc<Credentials>>> {
        self.rx.clone()
    }
}
