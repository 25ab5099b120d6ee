//! The workload identity service: a sidecar posts a CSR with its projected service-account
//! token and gets an X.509-SVID for exactly the identity the token proves.
//!
//! - `POST /v1/certificate` `{"csr": PEM, "token": string}` →
//!   `{"certificate": PEM chain, "bundle": PEM, "notAfter": RFC 3339}`.
//! - `GET /v1/bundle` → the trust bundle (PEM).
//!
//! Refusals are JSON `{"error": message}`: 400 for a malformed request or CSR, 401 for a token
//! the API server does not authenticate for audience `medmesh-identity`, 403 when the token is
//! not a service account's or the CSR asks for anything but that account's SPIFFE ID, 503 when
//! the TokenReview itself fails.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use medmesh_core::{SpiffeId, TrustDomain};
use rcgen::{CertificateSigningRequestParams, SanType};
use tracing::Instrument as _;

use crate::metrics::{IssueResult, Metrics};

mod ca;
mod review;

pub use ca::{CaError, IssuerCa, Signed};
pub use review::{KubeTokenReviewer, RecordedReviewer, ReviewError, TokenReviewer};

/// The audience of the tokens the service accepts (projected by the injected volume).
pub const AUDIENCE: &str = crate::names::IDENTITY_AUDIENCE;
/// Default certificate lifetime.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

pub use medmesh_core::wire::{CertificateRequest, CertificateResponse};

/// Why a certificate was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The body is not a certificate request.
    #[error("malformed request: {0}")]
    BadRequest(String),
    /// The CSR does not parse or its signature is invalid.
    #[error("malformed CSR: {0}")]
    BadCsr(String),
    /// The API server does not authenticate the token for our audience.
    #[error("token not authenticated: {0}")]
    Unauthenticated(String),
    /// The token or the CSR asks for something it may not have.
    #[error("{0}")]
    Forbidden(String),
    /// The TokenReview could not be made.
    #[error(transparent)]
    Review(#[from] ReviewError),
    /// Signing failed.
    #[error("signing: {0}")]
    Sign(#[from] CaError),
}

impl IssueError {
    /// The HTTP status and the metric label.
    pub fn status(&self) -> (StatusCode, IssueResult) {
        match self {
            Self::BadRequest(_) | Self::BadCsr(_) => {
                (StatusCode::BAD_REQUEST, IssueResult::BadRequest)
            }
            Self::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, IssueResult::Unauthenticated),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, IssueResult::Forbidden),
            Self::Review(_) => (StatusCode::SERVICE_UNAVAILABLE, IssueResult::Error),
            Self::Sign(_) => (StatusCode::INTERNAL_SERVER_ERROR, IssueResult::Error),
        }
    }
}

/// The service: CA, reviewer, policy.
pub struct IdentityService<R> {
    /// The issuer.
    pub ca: Arc<IssuerCa>,
    /// Who reviews tokens.
    pub reviewer: R,
    /// The mesh trust domain.
    pub trust_domain: TrustDomain,
    /// Certificate lifetime.
    pub ttl: Duration,
    /// Counters.
    pub metrics: Metrics,
}

/// The SPIFFE ID a reviewed token proves.
///
/// # Errors
/// [`IssueError::Unauthenticated`] when the token is not authenticated for [`AUDIENCE`],
/// [`IssueError::Forbidden`] when it is not a service account's.
pub fn identity_of(status: &TokenReviewStatus, td: &TrustDomain) -> Result<SpiffeId, IssueError> {
    if status.authenticated != Some(true) {
        return Err(IssueError::Unauthenticated(
            status
                .error
                .clone()
                .unwrap_or_else(|| "the API server did not authenticate it".into()),
        ));
    }
    // An API server that ignores audiences answers with its own; only ours will do.
    if !status.audiences.iter().flatten().any(|a| a == AUDIENCE) {
        return Err(IssueError::Unauthenticated(format!(
            "not valid for audience {AUDIENCE} (audiences: {:?})",
            status.audiences.as_deref().unwrap_or_default()
        )));
    }
    let user = status
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .unwrap_or("");
    let Some((ns, sa)) = user
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
    else {
        return Err(IssueError::Forbidden(format!(
            "token of {user:?} is not a service account token"
        )));
    };
    td.workload(ns, sa).map_err(|e| {
        IssueError::Forbidden(format!("service account {ns}/{sa} has no SPIFFE ID: {e}"))
    })
}

/// Parses a PEM CSR and verifies its signature (proof of possession of the key).
///
/// # Errors
/// [`IssueError::BadCsr`].
pub fn parse_csr(pem: &str) -> Result<CertificateSigningRequestParams, IssueError> {
    CertificateSigningRequestParams::from_pem(pem).map_err(|e| {
        IssueError::BadCsr(match e {
            rcgen::Error::InvalidCertificationRequestSignature => {
                "its signature does not verify".into()
            }
            other => other.to_string(),
        })
    })
}

/// Checks that the CSR asks for exactly `id`: one subject alternative name, that URI.
///
/// # Errors
/// [`IssueError::Forbidden`] saying what the CSR asks for instead.
pub fn check_csr(
    csr: &CertificateSigningRequestParams,
    id: &SpiffeId,
    td: &TrustDomain,
) -> Result<(), IssueError> {
    let sans = &csr.params.subject_alt_names;
    let uri = match sans.as_slice() {
        [SanType::URI(uri)] => uri.as_str(),
        [] => {
            return Err(IssueError::Forbidden(format!(
                "CSR has no subject alternative name; it must have exactly one, the URI {id}"
            )));
        }
        [_] => {
            return Err(IssueError::Forbidden(format!(
                "CSR's subject alternative name is not a URI; it must be the URI {id}"
            )));
        }
        more => {
            return Err(IssueError::Forbidden(format!(
                "CSR has {} subject alternative names; it must have exactly one, the URI {id}",
                more.len()
            )));
        }
    };
    let asked: SpiffeId = uri
        .parse()
        .map_err(|e| IssueError::Forbidden(format!("CSR's URI {uri:?} is not a SPIFFE ID: {e}")))?;
    if !asked.is_in(td) {
        return Err(IssueError::Forbidden(format!(
            "CSR asks for {asked}, outside trust domain {td}"
        )));
    }
    if &asked != id {
        return Err(IssueError::Forbidden(format!(
            "CSR asks for {asked}, but the token is that of {id}"
        )));
    }
    Ok(())
}

impl<R: TokenReviewer> IdentityService<R> {
    /// Handles one certificate request (the body of `POST /v1/certificate`) at `now`.
    ///
    /// # Errors
    /// See [`IssueError`].
    pub async fn issue(
        &self,
        body: &[u8],
        now: SystemTime,
    ) -> Result<CertificateResponse, IssueError> {
        // The span names the identity and the outcome; the token and the CSR stay out of it.
        let span = tracing::info_span!(
            "issue_certificate",
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            spiffe_id = tracing::field::Empty,
            result = tracing::field::Empty,
        );
        let r = self.decide(body, now).instrument(span.clone()).await;
        let result = match &r {
            Ok(_) => IssueResult::Issued,
            Err(e) => e.status().1,
        };
        span.record("result", result.as_str());
        if result == IssueResult::Error {
            span.record("otel.status_code", "ERROR");
        }
        r
    }

    async fn decide(
        &self,
        body: &[u8],
        now: SystemTime,
    ) -> Result<CertificateResponse, IssueError> {
        let req: CertificateRequest =
            serde_json::from_slice(body).map_err(|e| IssueError::BadRequest(e.to_string()))?;
        if req.token.is_empty() {
            return Err(IssueError::BadRequest("token is empty".into()));
        }
        // Parse the CSR before asking the API server, so that garbage costs no TokenReview.
        let csr = parse_csr(&req.csr)?;
        let status = self.reviewer.review(&req.token).await?;
        let id = identity_of(&status, &self.trust_domain)?;
        tracing::Span::current().record("spiffe_id", tracing::field::display(&id));
        check_csr(&csr, &id, &self.trust_domain)?;
        let signed = self.ca.sign(&csr, &id, self.ttl, now)?;
        let not_after = signed
            .not_after
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|e| {
                IssueError::Sign(CaError::Pem {
                    what: "notAfter".into(),
                    reason: e.to_string(),
                })
            })?;
        tracing::info!(%id, %not_after, "certificate issued");
        Ok(CertificateResponse {
            certificate: signed.chain_pem,
            bundle: self.ca.bundle_pem().to_owned(),
            not_after,
        })
    }
}

/// Largest request body: a CSR and a token are a few KiB.
const MAX_BODY: usize = 64 << 10;

/// `POST /v1/certificate` and `GET /v1/bundle`.
pub fn router<R: TokenReviewer>(service: Arc<IdentityService<R>>) -> Router {
    Router::new()
        .route("/v1/certificate", post(certificate::<R>))
        .route("/v1/bundle", get(bundle::<R>))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(service)
}

async fn certificate<R: TokenReviewer>(
    State(svc): State<Arc<IdentityService<R>>>,
    body: Bytes,
) -> Response {
    match svc.issue(&body, SystemTime::now()).await {
        Ok(r) => {
            svc.metrics.certificate(IssueResult::Issued);
            axum::Json(r).into_response()
        }
        Err(e) => {
            let (status, result) = e.status();
            svc.metrics.certificate(result);
            tracing::warn!(error = %e, "certificate refused");
            (
                status,
                axum::Json(serde_json::json!({ "error": e.to_string() })),
            )
                .into_response()
        }
    }
}

async fn bundle<R: TokenReviewer>(State(svc): State<Arc<IdentityService<R>>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        svc.ca.bundle_pem().to_owned(),
    )
        .into_response()
}
