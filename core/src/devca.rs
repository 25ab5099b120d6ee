//! A throw-away certificate authority for local meshes and tests (`medmesh dev certs`).
//! Never use it in production: its key sits in a file next to the certificates.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::spiffe::{SpiffeId, TrustDomain};

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
#[error("certificate generation: {0}")]
pub struct DevCaError(#[from] rcgen::Error);

/// A certificate and its private key, in PEM.
#[derive(Clone)]
pub struct Issued {
    /// Certificate (PEM).
    pub cert_pem: String,
    /// Private key (PKCS#8 PEM).
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Options of a leaf certificate; the defaults make a valid one-day X.509-SVID.
#[derive(Debug, Clone)]
pub struct LeafOptions {
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// URI SANs beyond the SPIFFE ID (to test refusal of two-URI certificates).
    pub extra_uris: Vec<String>,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// Omit the SPIFFE ID URI SAN.
    pub no_spiffe_id: bool,
}

impl Default for LeafOptions {
    fn default() -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::minutes(5),
            not_after: now + Duration::days(1),
            extra_uris: Vec::new(),
            dns: Vec::new(),
            no_spiffe_id: false,
        }
    }
}

/// A self-signed CA for one trust domain.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    ca: Issued,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DevCa")
    }
}

impl DevCa {
    /// A new CA valid for `days` days.
    ///
    /// # Errors
    /// When key or certificate generation fails.
    pub fn new(trust_domain: &TrustDomain, days: i64) -> Result<Self, DevCaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "medmesh development");
        dn.push(DnType::CommonName, format!("medmesh dev CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(days);
        let cert = params.self_signed(&key)?;
        let ca = Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(Self {
            issuer: Issuer::new(params, key),
            ca,
        })
    }

    /// Loads a CA from its PEM certificate and key.
    ///
    /// # Errors
    /// When either does not parse.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, DevCaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            issuer,
            ca: Issued {
                cert_pem: cert_pem.to_owned(),
                key_pem: key_pem.to_owned(),
            },
        })
    }

    /// The CA certificate and key.
    pub fn ca(&self) -> &Issued {
        &self.ca
    }

    /// Issues an X.509-SVID for `id`.
    ///
    /// # Errors
    /// When generation fails.
    pub fn issue(&self, id: &SpiffeId, opts: &LeafOptions) -> Result<Issued, DevCaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(opts.dns.clone())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "medmesh development");
        params.distinguished_name = dn;
        if !opts.no_spiffe_id {
            params
                .subject_alt_names
                .push(SanType::URI(id.as_str().try_into()?));
        }
        for u in &opts.extra_uris {
            params
                .subject_alt_names
                .push(SanType::URI(u.as_str().try_into()?));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = opts.not_before;
        params.not_after = opts.not_after;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
