//! Credentials from the operator's identity service: the sidecar generates its key in memory
//! (never written anywhere), sends a CSR for its SPIFFE ID with its projected service-account
//! token, and gets back a short-lived X.509-SVID and the trust bundle. It renews at half the
//! certificate's lifetime, keeps the last good credentials while renewals fail (retrying with
//! backoff), and is not ready until the first certificate arrives.
//!
//! The SPIFFE ID is `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`, with the
//! namespace and service account read from the token's claims; the service only signs it if
//! the API server's TokenReview of that token says the same.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use medmesh_core::tls::{Identity, TrustBundle};
use medmesh_core::wire::{CertificateRequest, CertificateResponse};
use medmesh_core::{SpiffeId, TrustDomain};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::watch;

use crate::identity::{Credentials, IdentitySource};
use crate::metrics::Metrics;

/// Where and how to ask for certificates.
#[derive(Debug, Clone)]
pub struct CsrConfig {
    /// Base URL of the identity service (`https://medmesh-operator.<ns>.svc:443`).
    pub url: String,
    /// The projected service-account token (re-read before every request: it rotates).
    pub token: PathBuf,
    /// CA certificates (PEM) that sign the identity service's serving certificate.
    pub service_ca: PathBuf,
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Longest wait between two failed attempts.
    pub max_backoff: Duration,
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// The token could not be read or has no Kubernetes claims.
    #[error("service-account token {path}: {what}")]
    Token {
        /// Its path.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// The service CA could not be read.
    #[error("identity service CA {path}: {what}")]
    ServiceCa {
        /// Its path.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// Key or CSR generation failed.
    #[error("CSR: {0}")]
    Csr(#[from] rcgen::Error),
    /// The request failed or the service refused it.
    #[error("identity service {url}: {what}")]
    Service {
        /// The URL.
        url: String,
        /// What happened (status and the service's message).
        what: String,
    },
    /// The answer is not a usable SVID for this workload.
    #[error("issued certificate unusable: {0}")]
    Unusable(String),
}

/// The namespace and service account named by a Kubernetes service-account token's claims.
/// The token's signature is not checked here: the identity service has the API server do that.
///
/// # Errors
/// When the token is not a JWT with `kubernetes.io` claims.
pub fn token_subject(token: &str) -> Result<(String, String), String> {
    let payload = token
        .trim()
        .split('.')
        .nth(1)
        .ok_or("not a JWT (no payload)")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| format!("payload is not base64url: {e}"))?;
    let claims: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("payload is not JSON: {e}"))?;
    let k = claims
        .get("kubernetes.io")
        .ok_or("no kubernetes.io claims (not a projected service-account token)")?;
    let ns = k.get("namespace").and_then(|v| v.as_str());
    let sa = k
        .get("serviceaccount")
        .and_then(|s| s.get("name"))
        .and_then(|v| v.as_str());
    match (ns, sa) {
        (Some(ns), Some(sa)) => Ok((ns.to_owned(), sa.to_owned())),
        _ => Err("kubernetes.io claims lack namespace or serviceaccount.name".into()),
    }
}

/// A fresh key and a CSR (PEM) whose only SAN is `id`.
///
/// # Errors
/// When generation fails.
pub fn key_and_csr(id: &SpiffeId) -> Result<(KeyPair, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

fn http_client(cfg: &CsrConfig) -> Result<reqwest::Client, CsrError> {
    let ca_err = |what: String| CsrError::ServiceCa {
        path: cfg.service_ca.display().to_string(),
        what,
    };
    let pem = std::fs::read(&cfg.service_ca).map_err(|e| ca_err(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| ca_err(e.to_string()))?;
        roots.add(c).map_err(|e| ca_err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ca_err("no certificate in the file".into()));
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| ca_err(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // The request carries a credential: never follow a redirect, never leave HTTPS.
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(reqwest::redirect::Policy::none())
        .https_only(true)
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| CsrError::Service {
            url: cfg.url.clone(),
            what: e.to_string(),
        })
}

/// One request: new key, CSR, certificate.
///
/// # Errors
/// See [`CsrError`].
pub async fn request(cfg: &CsrConfig) -> Result<Credentials, CsrError> {
    let token_err = |what: String| CsrError::Token {
        path: cfg.token.display().to_string(),
        what,
    };
    let token = tokio::fs::read_to_string(&cfg.token)
        .await
        .map_err(|e| token_err(e.to_string()))?;
    let (ns, sa) = token_subject(&token).map_err(token_err)?;
    let id: SpiffeId = format!("spiffe://{}/ns/{ns}/sa/{sa}", cfg.trust_domain)
        .parse()
        .map_err(|e| token_err(format!("claims make no SPIFFE ID: {e}")))?;
    let (key, csr) = key_and_csr(&id)?;
    let url = format!("{}/v1/certificate", cfg.url.trim_end_matches('/'));
    let svc_err = |what: String| CsrError::Service {
        url: url.clone(),
        what,
    };
    let resp = http_client(cfg)?
        .post(&url)
        .json(&CertificateRequest {
            csr,
            token: token.trim().to_owned(),
        })
        .send()
        .await
        .map_err(|e| svc_err(e.to_string()))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        let msg: String = body.chars().take(512).collect();
        return Err(svc_err(format!("{status}: {msg}")));
    }
    let answer: CertificateResponse = resp.json().await.map_err(|e| svc_err(e.to_string()))?;
    let identity = Identity::from_pem(
        answer.certificate.as_bytes(),
        key.serialize_pem().as_bytes(),
    )
    .map_err(|e| CsrError::Unusable(e.to_string()))?;
    if identity.id() != &id {
        return Err(CsrError::Unusable(format!(
            "issued for {}, asked for {id}",
            identity.id()
        )));
    }
    let bundle = TrustBundle::from_pem(answer.bundle.as_bytes(), cfg.trust_domain.clone())
        .map_err(|e| CsrError::Unusable(e.to_string()))?;
    Credentials::new(identity, bundle).map_err(|e| CsrError::Unusable(e.to_string()))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// When to renew credentials expiring at `not_after`: at half the remaining lifetime, at least
/// a second from now.
pub fn renew_in(not_after: i64, now: i64) -> Duration {
    Duration::from_secs(((not_after - now) / 2).max(1) as u64)
}

/// Credentials from the identity service, renewed in the background.
pub struct CsrIdentity {
    rx: watch::Receiver<Option<Arc<Credentials>>>,
}

impl CsrIdentity {
    /// Starts requesting credentials.
    pub fn spawn(cfg: CsrConfig, metrics: Metrics) -> Self {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(500);
            loop {
                let wait = match request(&cfg).await {
                    Ok(c) => {
                        let not_after = c.identity.not_after();
                        tracing::info!(id = %c.identity.id(), not_after, "certificate issued");
                        metrics.cert_expiry.set(not_after);
                        metrics.cert_not_before.set(c.identity.not_before());
                        metrics.cert_reloads.with_label_values(&["ok"]).inc();
                        metrics.ready.set(1);
                        tx.send_replace(Some(Arc::new(c)));
                        backoff = Duration::from_millis(500);
                        renew_in(not_after, unix_now())
                    }
                    Err(e) => {
                        metrics.cert_reloads.with_label_values(&["error"]).inc();
                        tracing::warn!(error = %e, retry_in = ?backoff, "certificate request failed; keeping the previous credentials");
                        let w = backoff;
                        backoff = (backoff * 2).min(cfg.max_backoff);
                        w
                    }
                };
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(wait).await;
            }
        });
        Self { rx }
    }
}

impl IdentitySource for CsrIdentity {
    fn credentials(&self) -> watch::Receiver<Option<Arc<Credentials>>> {
        self.rx.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let e = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", e(r#"{"alg":"RS256"}"#), e(claims))
    }

    #[test]
    fn subject_from_projected_token_claims() {
        let t = jwt(
            r#"{"aud":["medmesh-identity"],"kubernetes.io":{"namespace":"pacs","serviceaccount":{"name":"orthanc","uid":"x"}}}"#,
        );
        assert_eq!(
            token_subject(&t).unwrap(),
            ("pacs".into(), "orthanc".into())
        );
        for (bad, why) in [
            ("abc", "not a JWT"),
            ("a.!!!.c", "base64url"),
            (&jwt("[1]"), "kubernetes.io"),
            (&jwt(r#"{"kubernetes.io":{"namespace":"x"}}"#), "lack"),
        ] {
            let e = token_subject(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn csr_names_only_the_spiffe_id() {
        let id: SpiffeId = "spiffe://td/ns/a/sa/b".parse().unwrap();
        let (_, pem) = key_and_csr(&id).unwrap();
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
        let sans: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| format!("{s:?}"))
            .collect();
        assert_eq!(sans.len(), 1);
        assert!(sans[0].contains("spiffe://td/ns/a/sa/b"), "{sans:?}");
    }

    #[test]
    fn renews_at_half_life() {
        assert_eq!(renew_in(1000 + 86_400, 1000), Duration::from_secs(43_200));
        assert_eq!(renew_in(10, 100), Duration::from_secs(1));
    }
}
