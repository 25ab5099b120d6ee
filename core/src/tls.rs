//! X.509-SVIDs and the rustls configurations every medmesh component speaks: TLS 1.3 only, peers
//! authenticated by a SPIFFE ID in exactly one URI SAN, chained to the mesh trust bundle.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::spiffe::{SpiffeId, TrustDomain};

/// Why credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM input holds no certificate.
    #[error("{0}: no PEM certificate found")]
    NoCertificate(String),
    /// A PEM input holds no usable private key.
    #[error("{what}: no usable PEM private key: {reason}")]
    NoKey {
        /// Which input.
        what: String,
        /// Why.
        reason: String,
    },
    /// A trust bundle certificate cannot be a trust anchor.
    #[error("trust bundle certificate {index}: {reason}")]
    Anchor {
        /// Position in the bundle.
        index: usize,
        /// Why.
        reason: String,
    },
    /// The identity's own certificate is not a valid SVID.
    #[error("own certificate: {0}")]
    Svid(#[from] SvidError),
    /// rustls refused the configuration (e.g. key does not match certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Why a peer's certificate chain is not an acceptable X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    /// The peer presented no certificate.
    #[error("no client certificate presented")]
    Missing,
    /// The certificate has expired.
    #[error("certificate expired")]
    Expired,
    /// The certificate is not valid yet.
    #[error("certificate not valid yet")]
    NotYetValid,
    /// The chain does not lead to the trust bundle.
    #[error("certificate not issued by the mesh trust bundle (unknown issuer)")]
    UnknownIssuer,
    /// Some other path-validation failure.
    #[error("certificate chain invalid: {0}")]
    Invalid(String),
    /// The certificate cannot be parsed.
    #[error("certificate cannot be parsed: {0}")]
    Malformed(String),
    /// The certificate has no URI SAN.
    #[error("certificate has no URI SAN (not an X.509-SVID)")]
    NoUriSan,
    /// The certificate has more than one URI SAN.
    #[error("certificate has {0} URI SANs; an X.509-SVID has exactly one")]
    ManyUriSans(usize),
    /// The URI SAN is not a SPIFFE ID.
    #[error("URI SAN is not a SPIFFE ID: {0}")]
    BadId(String),
    /// The SPIFFE ID belongs to another trust domain.
    #[error("SPIFFE ID {got} is not in trust domain {want}")]
    ForeignTrustDomain {
        /// The peer's ID.
        got: String,
        /// The mesh trust domain.
        want: String,
    },
    /// The SPIFFE ID is not the one expected for this peer.
    #[error("peer is {got}, expected {want}")]
    UnexpectedIdentity {
        /// The peer's ID.
        got: String,
        /// The expected ID.
        want: String,
    },
}

impl SvidError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "no_certificate",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::UnknownIssuer => "unknown_issuer",
            Self::Invalid(_) => "invalid_chain",
            Self::Malformed(_) => "malformed",
            Self::NoUriSan | Self::ManyUriSans(_) | Self::BadId(_) => "not_svid",
            Self::ForeignTrustDomain { .. } => "foreign_trust_domain",
            Self::UnexpectedIdentity { .. } => "unexpected_identity",
        }
    }
}

impl From<SvidError> for rustls::Error {
    fn from(e: SvidError) -> Self {
        use rustls::CertificateError as C;
        match e {
            SvidError::Expired => rustls::Error::InvalidCertificate(C::Expired),
            SvidError::NotYetValid => rustls::Error::InvalidCertificate(C::NotValidYet),
            SvidError::UnknownIssuer => rustls::Error::InvalidCertificate(C::UnknownIssuer),
            SvidError::Malformed(_) => rustls::Error::InvalidCertificate(C::BadEncoding),
            other => {
                rustls::Error::InvalidCertificate(C::Other(rustls::OtherError(Arc::new(other))))
            }
        }
    }
}

/// ALPN protocol id that marks medmesh's own mTLS (between sidecars, and from a mesh client such
/// as the operator to a sidecar's inbound port): a sidecar terminates only TLS that offers it.
pub const MESH_ALPN: &[u8] = b"medmesh/1";

/// The crypto provider every medmesh TLS configuration uses (aws-lc-rs, post-quantum hybrid first).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The mesh's trust anchors.
#[derive(Clone)]
pub struct TrustBundle {
    anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
    subjects: Vec<DistinguishedName>,
    trust_domain: TrustDomain,
}

impl TrustBundle {
    /// Parses PEM CA certificates for the given trust domain.
    ///
    /// # Errors
    /// When there is no certificate or one cannot serve as a trust anchor.
    pub fn from_pem(pem: &[u8], trust_domain: TrustDomain) -> Result<Self, TlsError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::NoCertificate(format!("trust bundle ({e})")))?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate("trust bundle".into()));
        }
        let mut anchors = Vec::with_capacity(certs.len());
        let mut subjects = Vec::with_capacity(certs.len());
        for (index, der) in certs.iter().enumerate() {
            let anchor = webpki::anchor_from_trusted_cert(der).map_err(|e| TlsError::Anchor {
                index,
                reason: e.to_string(),
            })?;
            subjects.push(DistinguishedName::in_sequence(anchor.subject.as_ref()));
            anchors.push(anchor.to_owned());
        }
        Ok(Self {
            anchors,
            subjects,
            trust_domain,
        })
    }

    /// The trust domain this bundle speaks for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain)
            .field("anchors", &self.anchors.len())
            .finish()
    }
}

/// Which way a certificate is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A TLS client.
    Client,
    /// A TLS server.
    Server,
}

/// Validates a chain against the bundle and returns the SPIFFE ID of its leaf.
///
/// # Errors
/// When the chain does not validate at `now`, or the leaf is not an X.509-SVID of the bundle's
/// trust domain.
pub fn verify_svid(
    bundle: &TrustBundle,
    provider: &CryptoProvider,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: Usage,
) -> Result<SpiffeId, SvidError> {
    let cert = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|e| SvidError::Malformed(e.to_string()))?;
    let ku = match usage {
        Usage::Client => webpki::KeyUsage::client_auth(),
        Usage::Server => webpki::KeyUsage::server_auth(),
    };
    cert.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &bundle.anchors,
        intermediates,
        now,
        ku,
        None,
        None,
    )
    .map_err(|e| match e {
        webpki::Error::CertExpired { .. } => SvidError::Expired,
        webpki::Error::CertNotValidYet { .. } => SvidError::NotYetValid,
        // A CA with the same name but another key (or an altered certificate) fails here.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            SvidError::UnknownIssuer
        }
        other => SvidError::Invalid(format!("{other:?}")),
    })?;
    let id = spiffe_id_of(end_entity)?;
    if !id.is_in(&bundle.trust_domain) {
        return Err(SvidError::ForeignTrustDomain {
            got: id.to_string(),
            want: bundle.trust_domain.to_string(),
        });
    }
    Ok(id)
}

/// The SPIFFE ID in a certificate's only URI SAN. Does not validate the chain.
///
/// # Errors
/// When the certificate cannot be parsed or has not exactly one URI SAN holding a SPIFFE ID.
pub fn spiffe_id_of(der: &CertificateDer<'_>) -> Result<SpiffeId, SvidError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| SvidError::Malformed(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SvidError::Malformed(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|g| match g {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(SvidError::NoUriSan),
        [uri] => uri
            .parse()
            .map_err(|e: crate::spiffe::SpiffeIdError| SvidError::BadId(e.to_string())),
        more => Err(SvidError::ManyUriSans(more.len())),
    }
}

/// The `notAfter` of a certificate, in seconds since the Unix epoch.
///
/// # Errors
/// When the certificate cannot be parsed.
pub fn not_after(der: &CertificateDer<'_>) -> Result<i64, SvidError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| SvidError::Malformed(e.to_string()))?;
    Ok(cert.validity().not_after.timestamp())
}

/// The `notBefore` of a certificate, in seconds since the Unix epoch.
///
/// # Errors
/// When the certificate cannot be parsed.
pub fn not_before(der: &CertificateDer<'_>) -> Result<i64, SvidError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| SvidError::Malformed(e.to_string()))?;
    Ok(cert.validity().not_before.timestamp())
}

/// A workload's own credentials: its SVID chain and private key.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    id: SpiffeId,
    not_before: i64,
    not_after: i64,
}

impl Identity {
    /// Loads a PEM certificate chain (leaf first) and a PEM private key.
    ///
    /// # Errors
    /// When either is missing or malformed, or the leaf is not an X.509-SVID.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::NoCertificate(format!("certificate chain ({e})")))?;
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::NoCertificate("certificate chain".into()))?;
        let id = spiffe_id_of(leaf)?;
        let not_after = not_after(leaf)?;
        let not_before = not_before(leaf)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::NoKey {
            what: "private key".into(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            chain,
            key,
            id,
            not_before,
            not_after,
        })
    }

    /// The SPIFFE ID of this identity.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// When the leaf certificate expires (seconds since the Unix epoch).
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// When the leaf certificate became valid (seconds since the Unix epoch).
    pub fn not_before(&self) -> i64 {
        self.not_before
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            id: self.id.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// How a server treats client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// The handshake fails unless the client presents a valid SVID of the trust domain.
    Required,
    /// The handshake accepts any certificate (or none) whose handshake signature is valid; the
    /// application must call [`verify_svid`] on the peer chain before granting anything. Lets an
    /// HTTP server answer a bad certificate with a precise 401 instead of a TLS alert.
    Deferred,
}

/// Expected identity of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerIdentity {
    /// Any SVID of the trust domain.
    AnyInTrustDomain,
    /// Exactly this SPIFFE ID.
    Exact(SpiffeId),
}

#[derive(Debug)]
struct SvidVerifier {
    bundle: TrustBundle,
    provider: Arc<CryptoProvider>,
    client_auth: ClientAuth,
    expected_server: ServerIdentity,
}

impl SvidVerifier {
    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

impl ServerCertVerifier for SvidVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // SPIFFE authenticates by URI SAN, not by DNS name: the server name is not consulted.
        let id = verify_svid(
            &self.bundle,
            &self.provider,
            end_entity,
            intermediates,
            now,
            Usage::Server,
        )?;
        if let ServerIdentity::Exact(want) = &self.expected_server
            && &id != want
        {
            return Err(SvidError::UnexpectedIdentity {
                got: id.to_string(),
                want: want.to_string(),
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Configurations built here only enable TLS 1.3.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for SvidVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.bundle.subjects
    }

    fn client_auth_mandatory(&self) -> bool {
        self.client_auth == ClientAuth::Required
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.client_auth {
            ClientAuth::Required => {
                verify_svid(
                    &self.bundle,
                    &self.provider,
                    end_entity,
                    intermediates,
                    now,
                    Usage::Client,
                )?;
            }
            // Checked by the application after the handshake (see `ClientAuth::Deferred`).
            ClientAuth::Deferred => {}
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// A TLS 1.3-only server configuration presenting `identity` and checking clients per `client_auth`.
///
/// # Errors
/// When rustls refuses the key or certificate.
pub fn server_config(
    identity: &Identity,
    bundle: &TrustBundle,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SvidVerifier {
        bundle: bundle.clone(),
        provider: provider.clone(),
        client_auth,
        expected_server: ServerIdentity::AnyInTrustDomain,
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key())?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// A TLS 1.3-only client configuration presenting `identity` (if any) and accepting only servers
/// whose SVID matches `expected`.
///
/// # Errors
/// When rustls refuses the key or certificate.
pub fn client_config(
    identity: Option<&Identity>,
    bundle: &TrustBundle,
    expected: ServerIdentity,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SvidVerifier {
        bundle: bundle.clone(),
        provider: provider.clone(),
        client_auth: ClientAuth::Required,
        expected_server: expected,
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key())?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}
