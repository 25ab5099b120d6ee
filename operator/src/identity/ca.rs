//! The issuer CA of workload certificates: bootstrapped (generated) once into a Secret, or
//! supplied by the user (for example by cert-manager) as a `kubernetes.io/tls` Secret or files.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use medmesh_core::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;

/// Secret keys, as cert-manager writes them.
pub const TLS_CRT: &str = "tls.crt";
/// The issuer's private key.
pub const TLS_KEY: &str = "tls.key";
/// The trust anchors.
pub const CA_CRT: &str = "ca.crt";

/// Lifetime of a bootstrapped CA. Rotation (overlapping bundles) comes with serving-cert
/// rotation; ten years keeps a bootstrapped mesh working until then.
const BOOTSTRAP_DAYS: i64 = 3650;
/// Backdating of issued certificates, for clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(300);

/// Why the CA could not be loaded or could not sign.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A PEM input is missing or malformed.
    #[error("{what}: {reason}")]
    Pem {
        /// Which input.
        what: String,
        /// Why.
        reason: String,
    },
    /// A file could not be read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// rcgen refused.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The Kubernetes API failed.
    #[error("Secret {namespace}/{name}: {source}")]
    Kube {
        /// Namespace of the Secret.
        namespace: String,
        /// Its name.
        name: String,
        /// The error.
        source: kube::Error,
    },
}

/// The issuer: its key and certificate chain, and the trust bundle handed to workloads.
pub struct IssuerCa {
    issuer: Issuer<'static, KeyPair>,
    /// The issuer certificate and, when it is an intermediate, its chain (PEM).
    chain_pem: String,
    /// Certificates of the chain that are not trust anchors, leaf side first (DER).
    intermediates: Vec<CertificateDer<'static>>,
    /// Trust anchors (PEM).
    bundle_pem: String,
    key_pem: String,
    not_after: OffsetDateTime,
}

impl std::fmt::Debug for IssuerCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerCa")
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A signed workload certificate.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The leaf then the intermediates (PEM).
    pub chain_pem: String,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

fn pem_err(what: &str, e: impl std::fmt::Display) -> CaError {
    CaError::Pem {
        what: what.into(),
        reason: e.to_string(),
    }
}

fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(what, e))?;
    if certs.is_empty() {
        return Err(pem_err(what, "no PEM certificate"));
    }
    Ok(certs)
}

fn to_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

impl IssuerCa {
    /// Generates a self-signed CA for `trust_domain`, valid from `now`.
    ///
    /// # Errors
    /// When key or certificate generation fails.
    pub fn generate(trust_domain: &TrustDomain, now: SystemTime) -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "medmesh");
        dn.push(
            DnType::CommonName,
            format!("medmesh identity CA {trust_domain}"),
        );
        params.distinguished_name = dn;
        // Only leaves below it: a compromised workload key cannot mint identities.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        let now = OffsetDateTime::from(now);
        params.not_before = now - BACKDATE;
        params.not_after = now + time::Duration::days(BOOTSTRAP_DAYS);
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        let pem = cert.pem();
        Self::from_pem(&pem, &key.serialize_pem(), &pem)
    }

    /// Loads an issuer from PEM: its certificate (then its chain, when an intermediate), its
    /// key, and the trust anchors handed to workloads.
    ///
    /// # Errors
    /// When an input does not parse or the key does not match the certificate.
    pub fn from_pem(chain_pem: &str, key_pem: &str, bundle_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| pem_err("issuer key", e))?;
        let chain = certs(chain_pem, "issuer certificate")?;
        let anchors = certs(bundle_pem, "trust bundle")?;
        let not_after = {
            let (_, c) = x509_parser::parse_x509_certificate(&chain[0])
                .map_err(|e| pem_err("issuer certificate", e))?;
            if c.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
                return Err(pem_err(
                    "issuer key",
                    "does not match the issuer certificate",
                ));
            }
            OffsetDateTime::from_unix_timestamp(c.validity().not_after.timestamp())
                .map_err(|e| pem_err("issuer certificate", e))?
        };
        let issuer = Issuer::from_ca_cert_der(&chain[0], key)
            .map_err(|e| pem_err("issuer certificate", e))?;
        let intermediates = chain
            .iter()
            .filter(|c| !anchors.contains(c))
            .cloned()
            .collect();
        Ok(Self {
            issuer,
            chain_pem: chain_pem.to_owned(),
            intermediates,
            bundle_pem: bundle_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            not_after,
        })
    }

    /// Loads an issuer from PEM files (`tls.crt`, `tls.key`, `ca.crt` of a mounted Secret, or
    /// anything else).
    ///
    /// # Errors
    /// When a file cannot be read or its content is invalid.
    pub fn from_files(chain: &Path, key: &Path, bundle: &Path) -> Result<Self, CaError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CaError::File {
                path: p.display().to_string(),
                source,
            })
        };
        Self::from_pem(&read(chain)?, &read(key)?, &read(bundle)?)
    }

    /// Loads an issuer from a `kubernetes.io/tls` Secret with `ca.crt` (cert-manager's layout).
    ///
    /// # Errors
    /// When a key is missing or invalid.
    pub fn from_secret(secret: &Secret) -> Result<Self, CaError> {
        let name = secret.metadata.name.as_deref().unwrap_or("?");
        let data = secret.data.as_ref();
        let get = |k: &str| {
            data.and_then(|d| d.get(k))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .ok_or_else(|| pem_err(&format!("Secret {name}"), format!("no key {k}")))
        };
        Self::from_pem(&get(TLS_CRT)?, &get(TLS_KEY)?, &get(CA_CRT)?)
    }

    /// The Secret holding this CA (for bootstrapping).
    pub fn to_secret(&self, namespace: &str, name: &str) -> Secret {
        let data = BTreeMap::from([
            (
                TLS_CRT.to_owned(),
                ByteString(self.chain_pem.clone().into_bytes()),
            ),
            (
                TLS_KEY.to_owned(),
                ByteString(self.key_pem.clone().into_bytes()),
            ),
            (
                CA_CRT.to_owned(),
                ByteString(self.bundle_pem.clone().into_bytes()),
            ),
        ]);
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/part-of".to_owned(),
                    "medmesh".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data),
            ..Secret::default()
        }
    }

    /// Reads the CA Secret, or generates the CA and creates the Secret when there is none.
    /// Replicas racing to create it all end up with the one that was stored.
    ///
    /// # Errors
    /// When the API fails or the stored Secret is invalid.
    pub async fn load_or_bootstrap(
        api: &Api<Secret>,
        namespace: &str,
        name: &str,
        trust_domain: &TrustDomain,
    ) -> Result<Self, CaError> {
        let kube_err = |source| CaError::Kube {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source,
        };
        if let Some(s) = api.get_opt(name).await.map_err(kube_err)? {
            return Self::from_secret(&s);
        }
        let ca = Self::generate(trust_domain, SystemTime::now())?;
        match api
            .create(&PostParams::default(), &ca.to_secret(namespace, name))
            .await
        {
            Ok(_) => Ok(ca),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                Self::from_secret(&api.get(name).await.map_err(kube_err)?)
            }
            Err(e) => Err(kube_err(e)),
        }
    }

    /// When the issuing certificate expires.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The trust bundle (PEM).
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// Signs the public key of a verified CSR as an X.509-SVID for `id`, valid from
    /// `now - 5 min` for `ttl` (never beyond the CA's own expiry). Nothing from the CSR but
    /// its public key is used.
    ///
    /// # Errors
    /// When signing fails.
    pub fn sign(
        &self,
        csr: &CertificateSigningRequestParams,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Signed, CaError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "medmesh");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::from(now);
        params.not_before = now - BACKDATE;
        params.not_after = (now + ttl).min(self.not_after);
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        let mut chain_pem = cert.pem();
        for c in &self.intermediates {
            chain_pem.push_str(&to_pem(c));
        }
        Ok(Signed {
            chain_pem,
            not_after: params.not_after,
        })
    }
}

/// A random 128-bit serial (positive), so that no two certificates share one.
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| pem_err("serial number", "no randomness"))?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}
