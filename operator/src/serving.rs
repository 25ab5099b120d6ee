//! The HTTPS serving certificate of the webhook and the identity service.
//!
//! Without `--serving-cert-file`, the operator keeps its own CA and serving certificate in the
//! Secret `--serving-secret` (`kubernetes.io/tls`: `tls.crt`, `tls.key`, `ca.crt` = the trust
//! bundle, current CA first, plus `ca.key`). Every replica runs [`ServingLoop`]: it reads the
//! Secret, decides with [`decide`] (pure, clock injected) whether to keep it, issue a new leaf
//! or start a new CA, writes with optimistic concurrency (create, or replace with the
//! `resourceVersion` it read; a conflict means another replica wrote first, and it re-reads),
//! publishes the new TLS configuration to the HTTPS listener (new connections use it, no
//! restart) and the CA to the policy controller (ConfigMap `medmesh-identity-ca`), and writes
//! the bundle as `caBundle` of every webhook of the MutatingWebhookConfiguration
//! `--webhook-config` (with `clientConfig.url` out of cluster).
//!
//! A rotated CA stays in the bundle next to the new one until it expires, so clients that
//! still hold the old bundle keep trusting the new leaf's predecessor and vice versa.
//!
//! With user-provided files the operator only reloads them when they change and never touches
//! `caBundle`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::watch;

use crate::names::{FIELD_MANAGER, MANAGED_BY};

#[cfg(test)]
mod tests;

/// Lifetime of a serving CA; a new one is made when a third of it is left.
pub const CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Lifetime of a serving certificate; renewed when a third of it is left.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// How often the Secret (or the files) are looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(60);
/// Backdating, for clock skew.
const BACKDATE: Duration = Duration::from_secs(300);

/// Why serving material could not be made, loaded or published.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServingError {
    /// Certificate generation failed.
    #[error("generating {what}: {source}")]
    Generate {
        /// What.
        what: &'static str,
        /// The error.
        source: rcgen::Error,
    },
    /// A stored certificate or key does not parse.
    #[error("{0}")]
    Invalid(String),
    /// The API failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was done.
        what: String,
        /// The error.
        source: kube::Error,
    },
}

/// The DNS names (and IPs) the serving certificate must hold: the Service in all its forms,
/// plus the hosts of the given URLs (out-of-cluster registration).
pub fn sans(service: &str, namespace: &str, urls: &[&str]) -> Vec<String> {
    let mut out = vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ];
    for u in urls {
        if let Some(host) = url_host(u)
            && !out.contains(&host)
        {
            out.push(host);
        }
    }
    out
}

/// The host of an `https://host[:port][/path]` URL (IPv6 literals without brackets).
fn url_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_owned())
}

/// The contents of the serving Secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    /// The serving certificate (PEM).
    pub cert_pem: String,
    /// Its key (PEM).
    pub key_pem: String,
    /// The trust bundle: the current CA first, then a previous one still valid (PEM).
    pub bundle_pem: String,
    /// The current CA's key (PEM).
    pub ca_key_pem: String,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("cert_pem", &self.cert_pem)
            .field("bundle_pem", &self.bundle_pem)
            .field("keys", &"<redacted>")
            .finish()
    }
}

impl Material {
    /// Reads the Secret's keys.
    ///
    /// # Errors
    /// When a key is missing.
    pub fn from_secret(s: &Secret) -> Result<Self, ServingError> {
        let get = |k: &str| {
            s.data
                .as_ref()
                .and_then(|d| d.get(k))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .ok_or_else(|| ServingError::Invalid(format!("serving Secret has no key {k}")))
        };
        Ok(Self {
            cert_pem: get("tls.crt")?,
            key_pem: get("tls.key")?,
            bundle_pem: get("ca.crt")?,
            ca_key_pem: get("ca.key")?,
        })
    }

    /// The Secret holding it.
    pub fn to_secret(&self, namespace: &str, name: &str) -> Secret {
        let b = |s: &str| ByteString(s.as_bytes().to_vec());
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(BTreeMap::from([
                    ("app.kubernetes.io/part-of".into(), "medmesh".into()),
                    ("app.kubernetes.io/managed-by".into(), MANAGED_BY.into()),
                ])),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(BTreeMap::from([
                ("tls.crt".into(), b(&self.cert_pem)),
                ("tls.key".into(), b(&self.key_pem)),
                ("ca.crt".into(), b(&self.bundle_pem)),
                ("ca.key".into(), b(&self.ca_key_pem)),
            ])),
            ..Secret::default()
        }
    }

    /// The rustls configuration serving this certificate.
    ///
    /// # Errors
    /// When the certificate or key is unusable.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, ServingError> {
        crate::run::server_tls(self.cert_pem.as_bytes(), self.key_pem.as_bytes())
            .map_err(|e| ServingError::Invalid(e.to_string()))
    }

    /// The current CA (first of the bundle), PEM.
    pub fn ca_pem(&self) -> Option<String> {
        first_pem(&self.bundle_pem)
    }
}

fn first_pem(pem: &str) -> Option<String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .map(|c| der_to_pem(&c))
}

fn der_to_pem(der: &[u8]) -> String {
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

/// What to do with the stored material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// It is valid for long enough and names every SAN.
    Keep,
    /// A new serving certificate from the current CA.
    NewLeaf,
    /// A new CA (and leaf); the old CA stays in the bundle while valid.
    NewCa,
}

struct Parsed {
    not_before: i64,
    not_after: i64,
    subject: Vec<u8>,
    issuer: Vec<u8>,
    dns: Vec<String>,
}

fn parse(der: &[u8]) -> Option<Parsed> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut dns = Vec::new();
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    let ip = match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip)
                            .ok()
                            .map(|b| std::net::IpAddr::from(b).to_string()),
                        16 => <[u8; 16]>::try_from(*ip)
                            .ok()
                            .map(|b| std::net::IpAddr::from(b).to_string()),
                        _ => None,
                    };
                    dns.extend(ip);
                }
                _ => {}
            }
        }
    }
    Some(Parsed {
        not_before: c.validity().not_before.timestamp(),
        not_after: c.validity().not_after.timestamp(),
        subject: c.subject().as_raw().to_vec(),
        issuer: c.issuer().as_raw().to_vec(),
        dns,
    })
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Less than a third of the validity left at `now`.
fn due(p: &Parsed, now: i64) -> bool {
    now >= p.not_after - (p.not_after - p.not_before) / 3
}

/// Decides from the stored material (pure).
pub fn decide(stored: Option<&Material>, sans: &[String], now: SystemTime) -> Decision {
    let now = unix(now);
    let Some(m) = stored else {
        return Decision::NewCa;
    };
    let ca = CertificateDer::pem_slice_iter(m.bundle_pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .and_then(|d| parse(&d));
    let Some(ca) = ca else {
        return Decision::NewCa;
    };
    if due(&ca, now) || KeyPair::from_pem(&m.ca_key_pem).is_err() {
        return Decision::NewCa;
    }
    let leaf = CertificateDer::pem_slice_iter(m.cert_pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .and_then(|d| parse(&d));
    match leaf {
        Some(l)
            if !due(&l, now)
                && l.issuer == ca.subject
                && sans.iter().all(|s| l.dns.contains(s))
                && KeyPair::from_pem(&m.key_pem).is_ok() =>
        {
            Decision::Keep
        }
        _ => Decision::NewLeaf,
    }
}

fn gen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> ServingError {
    move |source| ServingError::Generate { what, source }
}

/// Carries out a decision other than [`Decision::Keep`].
///
/// # Errors
/// When generation fails or the stored CA is unusable.
pub fn build(
    decision: Decision,
    stored: Option<&Material>,
    sans: &[String],
    now: SystemTime,
) -> Result<Material, ServingError> {
    let nowt = time::OffsetDateTime::from(now);
    let (ca_key, ca_pem, bundle) = match (decision, stored) {
        (Decision::NewLeaf, Some(m)) => {
            let key = KeyPair::from_pem(&m.ca_key_pem).map_err(gen_err("CA key"))?;
            let ca = first_pem(&m.bundle_pem)
                .ok_or_else(|| ServingError::Invalid("serving Secret: no CA".into()))?;
            (key, ca, m.bundle_pem.clone())
        }
        _ => {
            let key = KeyPair::generate().map_err(gen_err("CA key"))?;
            let mut p = CertificateParams::new(Vec::<String>::new()).map_err(gen_err("CA"))?;
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, "medmesh");
            // The time in the name tells CAs apart (leaves are matched to their CA by name).
            dn.push(
                DnType::CommonName,
                format!("medmesh-operator serving CA {}", unix(now)),
            );
            p.distinguished_name = dn;
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p.not_before = nowt - BACKDATE;
            p.not_after = nowt + CA_VALIDITY;
            let cert = p.self_signed(&key).map_err(gen_err("CA"))?;
            let pem = cert.pem();
            // Keep the previous CA while it is valid: clients may still hold it.
            let mut bundle = pem.clone();
            if let Some(old) = stored.and_then(|m| first_pem(&m.bundle_pem))
                && let Some(d) = CertificateDer::pem_slice_iter(old.as_bytes())
                    .next()
                    .and_then(Result::ok)
                && parse(&d).is_some_and(|p| p.not_after > unix(now))
            {
                bundle.push_str(&old);
            }
            (key, pem, bundle)
        }
    };
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(gen_err("CA issuer"))?;
    let leaf_key = KeyPair::generate().map_err(gen_err("serving key"))?;
    let mut p = CertificateParams::new(sans.to_vec()).map_err(gen_err("serving certificate"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "medmesh");
    dn.push(
        DnType::CommonName,
        sans.get(2)
            .cloned()
            .unwrap_or_else(|| "medmesh-operator".into()),
    );
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    p.not_before = nowt - BACKDATE;
    p.not_after = nowt + LEAF_VALIDITY;
    let leaf = p
        .signed_by(&leaf_key, &issuer)
        .map_err(gen_err("serving certificate"))?;
    Ok(Material {
        cert_pem: leaf.pem(),
        key_pem: leaf_key.serialize_pem(),
        bundle_pem: bundle,
        ca_key_pem: issuer.key().serialize_pem(),
    })
}

/// Reads the Secret and brings it up to date, racing replicas safely. Returns the material
/// now stored and whether this call wrote it.
///
/// # Errors
/// When the API fails or generation fails.
pub async fn ensure(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    sans: &[String],
    now: SystemTime,
) -> Result<(Material, bool), ServingError> {
    let kube = |what: &str| {
        let what = format!("{what} Secret {namespace}/{name}");
        move |source| ServingError::Kube { what, source }
    };
    // Two rounds: a conflict means another replica wrote; its result is then re-read.
    for _ in 0..2 {
        let stored = api.get_opt(name).await.map_err(kube("get"))?;
        let material = match &stored {
            Some(s) => Material::from_secret(s).ok(),
            None => None,
        };
        let decision = decide(material.as_ref(), sans, now);
        if decision == Decision::Keep
            && let Some(m) = material
        {
            return Ok((m, false));
        }
        let new = build(decision, material.as_ref(), sans, now)?;
        let mut secret = new.to_secret(namespace, name);
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        let written = match stored {
            None => api.create(&pp, &secret).await,
            Some(old) => {
                secret.metadata.resource_version = old.metadata.resource_version.clone();
                api.replace(name, &pp, &secret).await
            }
        };
        match written {
            Ok(_) => {
                tracing::info!(?decision, secret = name, "serving certificate written");
                return Ok((new, true));
            }
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(kube("write")(e)),
        }
    }
    let stored = api.get(name).await.map_err(kube("get"))?;
    Ok((Material::from_secret(&stored)?, false))
}

/// Writes `ca_bundle` (PEM) into every webhook of the configuration `name`, and
/// `clientConfig.url` instead of the Service when `url` is given. Returns whether it patched
/// (nothing is written when everything is already so).
///
/// # Errors
/// When the API fails.
pub async fn patch_webhook(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    ca_bundle: &str,
    url: Option<&str>,
) -> Result<bool, ServingError> {
    let kube = |what: &str| {
        let what = format!("{what} MutatingWebhookConfiguration {name}");
        move |source| ServingError::Kube { what, source }
    };
    let current = api.get(name).await.map_err(kube("get"))?;
    let bundle = ByteString(ca_bundle.as_bytes().to_vec());
    let webhooks = current.webhooks.unwrap_or_default();
    let stale = webhooks.iter().any(|w| {
        w.client_config.ca_bundle.as_ref() != Some(&bundle)
            || url.is_some_and(|u| {
                w.client_config.url.as_deref() != Some(u) || w.client_config.service.is_some()
            })
    });
    if !stale {
        return Ok(false);
    }
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(ca_bundle);
    // A strategic merge patch: `webhooks` merges by name, so only clientConfig changes.
    let entries: Vec<serde_json::Value> = webhooks
        .iter()
        .map(|w| {
            let mut cc = serde_json::json!({ "caBundle": b64 });
            if let Some(u) = url {
                cc["url"] = serde_json::json!(u);
                cc["service"] = serde_json::Value::Null;
            }
            serde_json::json!({ "name": w.name, "clientConfig": cc })
        })
        .collect();
    let patch = serde_json::json!({ "webhooks": entries });
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    api.patch(name, &pp, &Patch::Strategic(&patch))
        .await
        .map_err(kube("patch"))?;
    Ok(true)
}

/// Where the serving certificate comes from, for [`ServingLoop`].
// One value per process: the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Source {
    /// The operator-managed Secret.
    Secret {
        /// Secrets of the operator's namespace.
        api: Api<Secret>,
        /// The namespace.
        namespace: String,
        /// The Secret.
        name: String,
        /// The SANs.
        sans: Vec<String>,
        /// The webhook configuration to patch, when registered.
        webhooks: Api<MutatingWebhookConfiguration>,
        /// Its name.
        webhook_config: String,
        /// Out-of-cluster URL of the webhook.
        webhook_url: Option<String>,
    },
    /// User-provided files, reloaded when they change.
    Files {
        /// Chain (PEM).
        cert: PathBuf,
        /// Key (PEM).
        key: PathBuf,
    },
}

/// Keeps the serving certificate current and publishes it.
pub struct ServingLoop {
    /// The source.
    pub source: Source,
    /// The HTTPS listener's TLS configuration.
    pub tls: watch::Sender<Arc<ServerConfig>>,
    /// The CA published to the policy controller.
    pub ca: watch::Sender<Option<String>>,
}

impl ServingLoop {
    /// Loads the material for the first time (before the HTTPS listener starts).
    ///
    /// # Errors
    /// When the material cannot be loaded or created.
    pub async fn initial(
        source: &Source,
    ) -> Result<(Arc<ServerConfig>, Option<String>), ServingError> {
        match source {
            Source::Secret {
                api,
                namespace,
                name,
                sans,
                ..
            } => {
                let (m, _) = ensure(api, namespace, name, sans, SystemTime::now()).await?;
                Ok((m.server_config()?, m.ca_pem().map(|_| m.bundle_pem.clone())))
            }
            Source::Files { cert, key } => {
                let (c, k) = read_files(cert, key)?;
                let cfg = crate::run::server_tls(&c, &k)
                    .map_err(|e| ServingError::Invalid(e.to_string()))?;
                Ok((cfg, files_ca(&c)))
            }
        }
    }

    /// Runs until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut last_files: Option<(Vec<u8>, Vec<u8>)> = None;
        let mut last_cert: Option<String> = None;
        loop {
            match &self.source {
                Source::Secret {
                    api,
                    namespace,
                    name,
                    sans,
                    webhooks,
                    webhook_config,
                    webhook_url,
                } => match ensure(api, namespace, name, sans, SystemTime::now()).await {
                    Ok((m, _)) => {
                        self.publish(&m, &mut last_cert);
                        match patch_webhook(
                            webhooks,
                            webhook_config,
                            &m.bundle_pem,
                            webhook_url.as_deref(),
                        )
                        .await
                        {
                            Ok(true) => tracing::info!(webhook_config, "caBundle written"),
                            Ok(false) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot write the webhook caBundle")
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "serving certificate not renewed"),
                },
                Source::Files { cert, key } => match read_files(cert, key) {
                    Ok(pair) if last_files.as_ref() != Some(&pair) => {
                        match crate::run::server_tls(&pair.0, &pair.1) {
                            Ok(cfg) => {
                                if last_files.is_some() {
                                    tracing::info!("serving certificate files changed; reloaded");
                                }
                                let _ = self.tls.send(cfg);
                                let _ = self.ca.send(files_ca(&pair.0));
                                last_files = Some(pair);
                            }
                            // Keep serving the last good certificate.
                            Err(e) => {
                                tracing::warn!(error = %e, "serving certificate files unusable; keeping the previous ones")
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the serving certificate files")
                    }
                },
            }
            tokio::select! {
                () = tokio::time::sleep(CHECK_EVERY) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Publishes `m` when its certificate differs from `last` (new connections use it).
    fn publish(&self, m: &Material, last: &mut Option<String>) {
        if last.as_deref() == Some(m.cert_pem.as_str()) {
            return;
        }
        match m.server_config() {
            Ok(cfg) => {
                let _ = self.tls.send(cfg);
                let bundle = Some(m.bundle_pem.clone());
                self.ca.send_if_modified(|ca| {
                    let changed = *ca != bundle;
                    *ca = bundle.clone();
                    changed
                });
                *last = Some(m.cert_pem.clone());
            }
            // Keep serving the last good certificate.
            Err(e) => tracing::warn!(error = %e, "stored serving certificate unusable"),
        }
    }
}

fn read_files(cert: &PathBuf, key: &PathBuf) -> Result<(Vec<u8>, Vec<u8>), ServingError> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| ServingError::Invalid(format!("{}: {e}", p.display())))
    };
    Ok((read(cert)?, read(key)?))
}

/// With user files, the CA published to sidecars is the last certificate of the chain file
/// when it holds more than the leaf; otherwise it is unknown (the user then publishes the
/// `medmesh-identity-ca` ConfigMaps).
fn files_ca(chain: &[u8]) -> Option<String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(chain)
        .filter_map(Result::ok)
        .collect();
    (certs.len() > 1)
        .then(|| certs.last().map(|c| der_to_pem(c)))
        .flatten()
}
