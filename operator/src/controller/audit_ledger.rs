//! The `AuditLedger` controller.
//!
//! Children (all named after the ledger `<l>`, labelled, server-side applied):
//! - the checkpoint signing key: with `signingKey.generate`, the Secret `<l>-signing-key` (or
//!   the given name) is created once with a fresh `NoteSigner` key and never written again;
//!   with `signingKey.secretRef` the user's Secret is only read. The key Secret has **no**
//!   ownerReference, on purpose: like the PersistentVolumeClaims a StatefulSet leaves behind,
//!   it outlives the `AuditLedger`, because losing the key of a tamper-evident log whose data
//!   survives would make the log unverifiable from then on;
//! - `<l>-tls`: the ledger's server X.509-SVID (`spiffe://<td>/ns/<ns>/ledger/<l>`, a path no
//!   service-account token can obtain) signed by the identity CA, renewed at half its life;
//! - `<l>-config`: one ledger YAML configuration per replica (`<l>-<i>.yaml`, differing only
//!   in `node_id`; the pod picks its own through `$(POD_NAME)`), plus `origin` and
//!   `verifier.key` for clients. With more than one replica every configuration lists all
//!   replicas' stable names (`<l>-<i>.<l>-headless.<ns>.svc:8443`) as Raft `peers`;
//! - `<l>-headless` (pod DNS, not-ready pods included: replicas must find each other before any
//!   is ready) and `<l>` (clients: [`LedgerTarget::url`], every replica: followers forward
//!   appends to the leader) Services;
//! - the StatefulSet `<l>` (pods started in parallel: a quorum must form before any replica is
//!   ready) and the PodDisruptionBudget `<l>` (at most one replica down: a quorum of three).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe, Secret,
    SecretVolumeSource, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use medmesh_core::checkpoint::NoteSigner;
use medmesh_core::{SpiffeId, TrustDomain};

use super::children::{self, apply};
use super::{Context, Error, FIELD_MANAGER, MANAGED_BY, k8s_time, kube_err};
use crate::crd::{
    AuditLedger, AuditLedgerStatus, CheckpointStatus, Condition, FollowerLag, ReplicationStatus,
    WorkloadIdentity, condition,
};
use crate::events::{EventType, InjectionEvent};
use crate::identity::IssuerCa;

#[cfg(test)]
mod tests;

/// The ledger's API port (mTLS).
pub const API_PORT: i32 = 8443;
/// The ledger's admin port (`/live`, `/ready`, `/metrics`).
pub const ADMIN_PORT: i32 = 9090;
/// Key of the private signing key in a generated Secret.
pub const SIGNING_KEY: &str = "signing.key";
/// Key of the verifier (public) key in the generated Secret and the ConfigMap.
pub const VERIFIER_KEY: &str = "verifier.key";
/// Lifetime of the ledger's server certificate; renewed at half.
pub const TLS_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often a healthy ledger is looked at again (checkpoint refresh).
pub const RESYNC: Duration = Duration::from_secs(60);
/// How soon a ledger whose checkpoint could not be read is looked at again.
pub const RECHECK: Duration = Duration::from_secs(5);

const CONFIG_DIR: &str = "/etc/medmesh/ledger";
const SIGNING_DIR: &str = "/etc/medmesh/signing";
const TLS_DIR: &str = "/etc/medmesh/tls";
const DATA_DIR: &str = "/var/lib/medmesh/ledger";
/// Non-root UID/GID of the ledger container (distroless `nonroot`); also the volumes' group.
const LEDGER_UID: i64 = 65532;

/// How the operator reaches one ledger to read its checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerTarget {
    /// Base URL (the client Service).
    pub url: String,
    /// The ledger's server identity.
    pub server_id: SpiffeId,
    /// The log origin.
    pub origin: String,
    /// The verifier key (`name+hash+key`).
    pub verifier_key: String,
}

/// A checkpoint read and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerCheckpoint {
    /// Entries covered.
    pub tree_size: u64,
    /// Root hash, base64 as in the signed note.
    pub root_hash: String,
    /// The answering replica's view of replication, when it could be read.
    pub status: Option<medmesh_core::wire::LedgerStatus>,
}

/// Reads a ledger's latest checkpoint. Behind a trait so that tests need no ledger; the
/// operator's implementation is [`ClientCheckpointReader`].
pub trait CheckpointReader: Send + Sync {
    /// The latest verified checkpoint, or why it could not be read.
    fn read<'a>(
        &'a self,
        target: &'a LedgerTarget,
    ) -> Pin<Box<dyn Future<Output = Result<LedgerCheckpoint, String>> + Send + 'a>>;
}

/// Reads checkpoints with `medmesh-ledger-client` over mTLS, as the operator's own SVID.
pub struct ClientCheckpointReader {
    identity: medmesh_core::tls::Identity,
    bundle: medmesh_core::tls::TrustBundle,
}

impl ClientCheckpointReader {
    /// A reader presenting `identity` and trusting `bundle`.
    pub fn new(
        identity: medmesh_core::tls::Identity,
        bundle: medmesh_core::tls::TrustBundle,
    ) -> Self {
        Self { identity, bundle }
    }

    /// Issues the operator's own SVID for `id` from `ca` (valid `ttl`) and builds a reader.
    ///
    /// # Errors
    /// When key generation, signing or the TLS material fails.
    pub fn from_ca(
        ca: &IssuerCa,
        id: &SpiffeId,
        td: &TrustDomain,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Self, Error> {
        let (chain, key) = issue_svid(ca, id, ttl, now)?;
        let crypto = |what: &str, e: &dyn std::fmt::Display| Error::Crypto {
            what: what.into(),
            reason: e.to_string(),
        };
        let identity = medmesh_core::tls::Identity::from_pem(chain.as_bytes(), key.as_bytes())
            .map_err(|e| crypto("operator SVID", &e))?;
        let bundle =
            medmesh_core::tls::TrustBundle::from_pem(ca.bundle_pem().as_bytes(), td.clone())
                .map_err(|e| crypto("trust bundle", &e))?;
        Ok(Self::new(identity, bundle))
    }
}

impl CheckpointReader for ClientCheckpointReader {
    fn read<'a>(
        &'a self,
        target: &'a LedgerTarget,
    ) -> Pin<Box<dyn Future<Output = Result<LedgerCheckpoint, String>> + Send + 'a>> {
        Box::pin(async move {
            let verifier = medmesh_core::checkpoint::NoteVerifier::parse(&target.verifier_key)
                .map_err(|e| format!("verifier key: {e}"))?;
            let client = medmesh_ledger_client::LedgerClient::new(
                medmesh_ledger_client::LedgerClientConfig {
                    url: target.url.clone(),
                    identity: self.identity.clone(),
                    bundle: self.bundle.clone(),
                    server: medmesh_core::tls::ServerIdentity::Exact(target.server_id.clone()),
                    verifier,
                    origin: target.origin.clone(),
                    timeout: Duration::from_secs(5),
                },
            )
            .map_err(|e| e.to_string())?;
            let cp = client.checkpoint().await.map_err(|e| e.to_string())?;
            // Operational, unsigned: a failure here does not fail the checkpoint read.
            let status = client.status().await.ok();
            Ok(LedgerCheckpoint {
                tree_size: cp.checkpoint.size,
                root_hash: root_b64(&cp.checkpoint.root),
                status,
            })
        })
    }
}

/// A [`CheckpointReader`] that issues the operator a fresh short-lived SVID from its own
/// identity CA for each read (so it never holds an expired one), then reads with
/// [`ClientCheckpointReader`].
pub struct SelfIssuedReader {
    /// The identity CA.
    pub ca: Arc<IssuerCa>,
    /// The operator's SPIFFE ID (added to every ledger's readers).
    pub id: SpiffeId,
    /// The trust domain.
    pub trust_domain: TrustDomain,
}

impl CheckpointReader for SelfIssuedReader {
    fn read<'a>(
        &'a self,
        target: &'a LedgerTarget,
    ) -> Pin<Box<dyn Future<Output = Result<LedgerCheckpoint, String>> + Send + 'a>> {
        Box::pin(async move {
            let reader = ClientCheckpointReader::from_ca(
                &self.ca,
                &self.id,
                &self.trust_domain,
                Duration::from_secs(3600),
                SystemTime::now(),
            )
            .map_err(|e| e.to_string())?;
            reader.read(target).await
        })
    }
}

fn root_b64(root: &medmesh_core::Hash) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(root.0)
}

/// A fresh key and a certificate for `id` signed by `ca` (chain PEM, key PEM).
pub fn issue_svid(
    ca: &IssuerCa,
    id: &SpiffeId,
    ttl: Duration,
    now: SystemTime,
) -> Result<(String, String), Error> {
    let crypto = |e: rcgen::Error| Error::Crypto {
        what: format!("certificate for {id}"),
        reason: e.to_string(),
    };
    let key = rcgen::KeyPair::generate().map_err(crypto)?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .map_err(crypto)?;
    let params = rcgen::CertificateSigningRequestParams::from_der(csr.der()).map_err(crypto)?;
    let signed = ca.sign(&params, id, ttl, now).map_err(|e| Error::Crypto {
        what: format!("certificate for {id}"),
        reason: e.to_string(),
    })?;
    Ok((signed.chain_pem, key.serialize_pem()))
}

/// Names of a ledger's children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The ledger (also the StatefulSet, client Service and PDB).
    pub ledger: String,
    /// Namespace.
    pub namespace: String,
    /// Signing key Secret and key inside it.
    pub signing_secret: String,
    /// Key of the private key in that Secret.
    pub signing_key: String,
    /// Whether the operator generates that Secret.
    pub generated: bool,
    /// TLS Secret.
    pub tls_secret: String,
    /// ConfigMap.
    pub config: String,
    /// Headless Service.
    pub headless: String,
}

impl Names {
    /// The names for `ledger`.
    ///
    /// # Errors
    /// When the ledger has no namespace.
    pub fn of(ledger: &AuditLedger) -> Result<Self, Error> {
        let name = ledger.name_any();
        let namespace = ledger
            .namespace()
            .ok_or_else(|| Error::Object(format!("AuditLedger {name} has no namespace")))?;
        let (signing_secret, signing_key, generated) = match (
            &ledger.spec.signing_key.generate,
            &ledger.spec.signing_key.secret_ref,
        ) {
            (_, Some(r)) => (r.name.clone(), r.key.clone(), false),
            (g, None) => (
                g.as_ref()
                    .and_then(|g| g.secret_name.clone())
                    .unwrap_or_else(|| format!("{name}-signing-key")),
                SIGNING_KEY.to_owned(),
                true,
            ),
        };
        Ok(Self {
            signing_secret,
            signing_key,
            generated,
            tls_secret: format!("{name}-tls"),
            config: format!("{name}-config"),
            headless: format!("{name}-headless"),
            ledger: name,
            namespace,
        })
    }

    /// Replica `i`'s stable API address through the headless Service (its Raft peer address).
    pub fn replica_addr(&self, i: i32) -> String {
        format!(
            "{}-{i}.{}.{}.svc:{API_PORT}",
            self.ledger, self.headless, self.namespace
        )
    }

    /// The client endpoint.
    pub fn endpoint(&self) -> String {
        format!("https://{}.{}.svc:{API_PORT}", self.ledger, self.namespace)
    }

    /// The ledger's server SPIFFE ID.
    ///
    /// # Errors
    /// When the names do not form a valid SPIFFE ID.
    pub fn server_id(&self, td: &TrustDomain) -> Result<SpiffeId, Error> {
        format!("spiffe://{td}/ns/{}/ledger/{}", self.namespace, self.ledger)
            .parse()
            .map_err(|e| Error::Object(format!("ledger SPIFFE ID: {e}")))
    }

    /// The default log origin of a generated key.
    pub fn origin(&self, td: &TrustDomain) -> String {
        format!("{td}/{}/{}", self.namespace, self.ledger)
    }
}

/// Labels of every child; the first two also select the pods.
pub fn labels(names: &Names) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "medmesh-ledger".into()),
        ("app.kubernetes.io/instance".into(), names.ledger.clone()),
        ("app.kubernetes.io/part-of".into(), "medmesh".into()),
        ("app.kubernetes.io/managed-by".into(), MANAGED_BY.into()),
    ])
}

fn selector_labels(names: &Names) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "medmesh-ledger".into()),
        ("app.kubernetes.io/instance".into(), names.ledger.clone()),
    ])
}

fn meta(name: &str, names: &Names, owner: &OwnerReference) -> ObjectMeta {
    children::meta(name, &names.namespace, labels(names), owner)
}

/// A fresh signing key Secret (no owner: see the module documentation).
///
/// # Errors
/// When no randomness is available or the origin is not a valid key name.
pub fn new_signing_secret(names: &Names, origin: &str) -> Result<(Secret, NoteSigner), Error> {
    let mut seed = [0u8; 32];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut seed)
        .map_err(|_| Error::Crypto {
            what: "signing key".into(),
            reason: "no randomness".into(),
        })?;
    let signer = NoteSigner::from_seed(origin, seed).map_err(|e| Error::Crypto {
        what: format!("signing key for origin {origin}"),
        reason: e.to_string(),
    })?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(names.signing_secret.clone()),
            namespace: Some(names.namespace.clone()),
            labels: Some(labels(names)),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                SIGNING_KEY.to_owned(),
                ByteString(format!("{}\n", signer.private_key()).into_bytes()),
            ),
            (
                VERIFIER_KEY.to_owned(),
                ByteString(signer.verifier_key().into_bytes()),
            ),
        ])),
        immutable: Some(true),
        ..Secret::default()
    };
    Ok((secret, signer))
}

/// The signer stored under `key` in `secret`, or what is wrong with it.
pub fn signer_from_secret(secret: &Secret, key: &str) -> Result<NoteSigner, String> {
    let name = secret.name_any();
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .ok_or_else(|| format!("Secret {name} has no key {key:?}"))?;
    let text = std::str::from_utf8(&bytes.0)
        .map_err(|_| format!("Secret {name} key {key:?} is not text"))?;
    NoteSigner::from_private_key(text.trim())
        .map_err(|e| format!("Secret {name} key {key:?} is not a signing key: {e}"))
}

/// Whether the TLS Secret holds a certificate for `id` from the current `bundle` that is
/// still in the first half of its life at `now`.
pub fn tls_is_current(secret: &Secret, id: &SpiffeId, bundle: &str, now: SystemTime) -> bool {
    let Some(data) = secret.data.as_ref() else {
        return false;
    };
    if data.get("ca.crt").map(|b| b.0.as_slice()) != Some(bundle.as_bytes())
        || !data.contains_key("tls.key")
    {
        return false;
    }
    let Some(crt) = data.get("tls.crt") else {
        return false;
    };
    use rustls_pki_types::pem::PemObject as _;
    let Some(Ok(der)) = rustls_pki_types::CertificateDer::pem_slice_iter(&crt.0).next() else {
        return false;
    };
    if medmesh_core::tls::spiffe_id_of(&der).ok().as_ref() != Some(id) {
        return false;
    }
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return false;
    };
    let (from, to) = (
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    );
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    now < from + (to - from) / 2
}

/// The TLS Secret for a freshly issued certificate.
pub fn tls_secret(
    names: &Names,
    owner: &OwnerReference,
    chain: &str,
    key: &str,
    bundle: &str,
) -> Secret {
    Secret {
        metadata: meta(&names.tls_secret, names, owner),
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(chain.as_bytes().to_vec())),
            ("tls.key".to_owned(), ByteString(key.as_bytes().to_vec())),
            ("ca.crt".to_owned(), ByteString(bundle.as_bytes().to_vec())),
        ])),
        ..Secret::default()
    }
}

/// The ledger's configuration file, field for field `medmesh-ledger`'s `RawConfig`
/// (`ledger/src/config.rs`, which refuses unknown fields).
#[derive(Debug, Clone, serde::Serialize)]
struct LedgerConfigFile<'a> {
    node_id: String,
    peers: Vec<String>,
    origin: &'a str,
    data_dir: &'a str,
    listen: String,
    admin_listen: String,
    trust_domain: &'a str,
    cert: String,
    key: String,
    trust_bundle: String,
    signing_key: String,
    appenders: Vec<String>,
    readers: Vec<String>,
}

fn identity_rules(
    list: &[WorkloadIdentity],
    namespace: &str,
    td: &TrustDomain,
) -> Result<Vec<String>, String> {
    list.iter()
        .map(|w| match (&w.spiffe_id, &w.service_account) {
            (Some(id), None) => Ok(id.clone()),
            (None, Some(sa)) => td
                .workload(sa.namespace.as_deref().unwrap_or(namespace), &sa.name)
                .map(|id| id.as_str().to_owned())
                .map_err(|e| format!("serviceAccount {}: {e}", sa.name)),
            _ => Err("exactly one of spiffeId or serviceAccount must be set".into()),
        })
        .collect()
}

/// The ConfigMap: one configuration per replica, the origin and the verifier key.
///
/// # Errors
/// [`Error::Object`] naming an identity that has no SPIFFE ID.
pub fn config_map(
    ledger: &AuditLedger,
    names: &Names,
    owner: &OwnerReference,
    td: &TrustDomain,
    signer: &NoteSigner,
    extra_reader: Option<&SpiffeId>,
) -> Result<ConfigMap, Error> {
    let bad = |e: String| Error::Object(format!("AuditLedger {}: {e}", names.ledger));
    let appenders = identity_rules(&ledger.spec.appenders, &names.namespace, td).map_err(bad)?;
    let mut readers = identity_rules(&ledger.spec.readers, &names.namespace, td).map_err(bad)?;
    if let Some(me) = extra_reader
        && !readers.iter().any(|r| r == me.as_str())
    {
        readers.push(me.as_str().to_owned());
    }
    let origin = signer.name();
    let mut data = BTreeMap::new();
    let replicas = ledger.spec.replicas.max(1);
    let peers: Vec<String> = if replicas > 1 {
        (0..replicas).map(|i| names.replica_addr(i)).collect()
    } else {
        Vec::new()
    };
    for i in 0..replicas {
        let node_id = format!("{}-{i}", names.ledger);
        let file = LedgerConfigFile {
            node_id: node_id.clone(),
            peers: peers.clone(),
            origin,
            data_dir: DATA_DIR,
            listen: format!("0.0.0.0:{API_PORT}"),
            admin_listen: format!("0.0.0.0:{ADMIN_PORT}"),
            trust_domain: td.as_str(),
            cert: format!("{TLS_DIR}/tls.crt"),
            key: format!("{TLS_DIR}/tls.key"),
            trust_bundle: format!("{TLS_DIR}/ca.crt"),
            signing_key: format!("{SIGNING_DIR}/{SIGNING_KEY}"),
            appenders: appenders.clone(),
            readers: readers.clone(),
        };
        let yaml = serde_saphyr::to_string(&file).map_err(|e| Error::Serialize {
            what: format!("ConfigMap {}", names.config),
            reason: e.to_string(),
        })?;
        data.insert(format!("{node_id}.yaml"), yaml);
    }
    data.insert("origin".into(), origin.to_owned());
    data.insert(VERIFIER_KEY.into(), signer.verifier_key());
    Ok(ConfigMap {
        metadata: meta(&names.config, names, owner),
        data: Some(data),
        ..ConfigMap::default()
    })
}

fn port(name: &str, port: i32) -> ServicePort {
    children::service_port(name, port, IntOrString::String(name.into()))
}

/// The headless Service (stable pod DNS; not-ready pods resolve too, for start-up).
pub fn headless_service(names: &Names, owner: &OwnerReference) -> Service {
    Service {
        metadata: meta(&names.headless, names, owner),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(names)),
            ports: Some(vec![port("api", API_PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The client Service: the endpoint in the status. It selects every ready replica: followers
/// forward appends to the leader and serve reads at their latest applied checkpoint.
pub fn client_service(names: &Names, owner: &OwnerReference) -> Service {
    let selector = selector_labels(names);
    Service {
        metadata: meta(&names.ledger, names, owner),
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![port("api", API_PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("admin".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(path != DATA_DIR),
        ..VolumeMount::default()
    }
}

/// The StatefulSet.
pub fn stateful_set(
    ledger: &AuditLedger,
    names: &Names,
    owner: &OwnerReference,
    default_image: &str,
    otlp_endpoint: Option<&str>,
) -> StatefulSet {
    let selector = selector_labels(names);
    let mut env = vec![
        EnvVar {
            name: "POD_NAME".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
        // The kubelet expands $(POD_NAME): each replica reads its own file.
        EnvVar {
            name: "MEDMESH_LEDGER_CONFIG".into(),
            value: Some(format!("{CONFIG_DIR}/$(POD_NAME).yaml")),
            ..EnvVar::default()
        },
        // The binary's allocator never asks for transparent huge pages (`no_thp`); on nodes that
        // give them to every process, this makes it opt out too. Faulted back in after each
        // purge, a huge page is zeroed whole: 6 % of the ledger's CPU under load.
        EnvVar {
            name: "MIMALLOC_ALLOW_THP".into(),
            value: Some("0".into()),
            ..EnvVar::default()
        },
    ];
    if let Some(e) = otlp_endpoint {
        env.push(EnvVar {
            name: "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            value: Some(e.to_owned()),
            ..EnvVar::default()
        });
    }
    let container = Container {
        name: "ledger".into(),
        image: Some(
            ledger
                .spec
                .image
                .clone()
                .unwrap_or_else(|| default_image.to_owned()),
        ),
        args: Some(vec!["run".into()]),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some("api".into()),
                container_port: API_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("admin".into()),
                container_port: ADMIN_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(http_probe("/ready", 5, 3)),
        liveness_probe: Some(http_probe("/live", 10, 6)),
        resources: ledger.spec.resources.clone(),
        security_context: Some(crate::security::restricted_container(LEDGER_UID)),
        volume_mounts: Some(vec![
            mount("data", DATA_DIR),
            mount("config", CONFIG_DIR),
            mount("signing-key", SIGNING_DIR),
            mount("tls", TLS_DIR),
        ]),
        ..Container::default()
    };
    let volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.config.clone(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "signing-key".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names.signing_secret.clone()),
                items: Some(vec![k8s_openapi::api::core::v1::KeyToPath {
                    key: names.signing_key.clone(),
                    path: SIGNING_KEY.into(),
                    mode: Some(0o400),
                }]),
                default_mode: Some(0o400),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names.tls_secret.clone()),
                default_mode: Some(0o400),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    let claim = children::claim(
        "data",
        selector.clone(),
        &ledger.spec.storage.size,
        ledger.spec.storage.storage_class_name.as_ref(),
    );
    StatefulSet {
        metadata: meta(&names.ledger, names, owner),
        spec: Some(StatefulSetSpec {
            replicas: Some(ledger.spec.replicas),
            service_name: Some(names.headless.clone()),
            // Replicas find each other before any is ready: start them together.
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(names)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    // The ledger needs no API access.
                    automount_service_account_token: Some(false),
                    security_context: Some(crate::security::restricted_pod(LEDGER_UID)),
                    topology_spread_constraints: Some(vec![children::spread(selector)]),
                    termination_grace_period_seconds: Some(30),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![claim]),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

/// The PodDisruptionBudget: one replica at a time may be evicted (never zero, which would
/// block every node drain).
pub fn pdb(names: &Names, owner: &OwnerReference) -> PodDisruptionBudget {
    children::one_down_pdb(meta(&names.ledger, names, owner), selector_labels(names))
}

/// What was observed, for [`status`].
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// Ready replicas of the StatefulSet.
    pub ready_replicas: i32,
    /// Why the signing key is unusable, if it is.
    pub key_problem: Option<String>,
    /// The checkpoint, or why it was not read.
    pub checkpoint: Result<LedgerCheckpoint, String>,
}

/// The status for what was observed, merged into the stored one (conditions keep their
/// transition times; the checkpoint keeps its time while it does not change).
pub fn status(
    ledger: &AuditLedger,
    names: &Names,
    obs: &Observed,
    now: &Time,
) -> AuditLedgerStatus {
    let old = ledger.status.clone().unwrap_or_default();
    let generation = ledger.metadata.generation;
    let want = ledger.spec.replicas;
    let ready = obs.ready_replicas;
    let mut conditions: Vec<Condition> = old.conditions.clone();
    let set = |conditions: &mut Vec<Condition>, t: &str, s: bool, reason: &str, msg: &str| {
        condition::set(
            conditions,
            condition::new(t, s, reason, msg, generation, now),
        );
    };
    let checkpoint = match (&obs.checkpoint, &old.checkpoint) {
        (Ok(cp), Some(o))
            if i64::try_from(cp.tree_size).ok() == Some(o.tree_size)
                && cp.root_hash == o.root_hash =>
        {
            Some(o.clone())
        }
        (Ok(cp), _) => Some(CheckpointStatus {
            tree_size: i64::try_from(cp.tree_size).unwrap_or(i64::MAX),
            root_hash: cp.root_hash.clone(),
            time: now.clone(),
        }),
        // A failed read keeps the last checkpoint seen.
        (Err(_), o) => o.clone(),
    };
    if let Some(problem) = &obs.key_problem {
        set(
            &mut conditions,
            condition::READY,
            false,
            "SigningKeyInvalid",
            problem,
        );
        set(
            &mut conditions,
            condition::PROGRESSING,
            false,
            "SigningKeyInvalid",
            problem,
        );
        set(
            &mut conditions,
            condition::DEGRADED,
            true,
            "SigningKeyInvalid",
            problem,
        );
        return AuditLedgerStatus {
            observed_generation: generation,
            conditions,
            ready_replicas: Some(ready),
            endpoint: None,
            checkpoint,
            replication: old.replication,
        };
    }
    // A failed read keeps the last view, as for the checkpoint.
    let replication = match &obs.checkpoint {
        Ok(cp) => cp
            .status
            .as_ref()
            .filter(|s| s.replicated)
            .map(|s| replication_status(names, s)),
        Err(_) => old.replication.clone(),
    };
    let leader_note = match &replication {
        Some(r) => match &r.leader {
            Some(l) => format!("; Raft leader {l}"),
            None => "; no Raft leader".to_owned(),
        },
        None => String::new(),
    };
    let replicas = format!("{ready}/{want} replicas ready{leader_note}");
    let (cp_note, cp_failed) = match &obs.checkpoint {
        Ok(cp) => (format!("; checkpoint tree size {}", cp.tree_size), false),
        Err(e) => (format!("; checkpoint not read: {e}"), ready >= want),
    };
    let all_ready = ready >= want && want > 0;
    set(
        &mut conditions,
        condition::READY,
        all_ready,
        if all_ready {
            "ReplicasReady"
        } else {
            "ReplicasNotReady"
        },
        &format!("{replicas}{cp_note}"),
    );
    set(
        &mut conditions,
        condition::PROGRESSING,
        !all_ready,
        if all_ready { "Stable" } else { "RollingOut" },
        &replicas,
    );
    set(
        &mut conditions,
        condition::DEGRADED,
        cp_failed,
        if cp_failed {
            "CheckpointUnreadable"
        } else {
            "AsExpected"
        },
        if cp_failed {
            cp_note.trim_start_matches("; ")
        } else {
            ""
        },
    );
    AuditLedgerStatus {
        observed_generation: generation,
        conditions,
        ready_replicas: Some(ready),
        endpoint: Some(names.endpoint()),
        checkpoint,
        replication,
    }
}

/// The replication part of the status, from one replica's view.
fn replication_status(names: &Names, s: &medmesh_core::wire::LedgerStatus) -> ReplicationStatus {
    let pod = |id: u64| format!("{}-{id}", names.ledger);
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    ReplicationStatus {
        leader: s.leader.map(pod),
        term: s.term.map(int),
        applied_index: s.applied_index.map(int),
        observed_from: s.id.map(pod),
        followers: s
            .followers
            .iter()
            .map(|f| FollowerLag {
                replica: pod(f.id),
                lag: int(f.lag),
            })
            .collect(),
    }
}

fn owner_of(ledger: &AuditLedger) -> Result<OwnerReference, Error> {
    ledger
        .controller_owner_ref(&())
        .ok_or_else(|| Error::Object(format!("AuditLedger {} has no uid yet", ledger.name_any())))
}

/// The signing key: read, or created once.
async fn signing_key(
    ledger: &AuditLedger,
    names: &Names,
    ctx: &Context,
) -> Result<Result<NoteSigner, String>, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let what = format!("Secret {}/{}", names.namespace, names.signing_secret);
    if let Some(s) = api
        .get_opt(&names.signing_secret)
        .await
        .map_err(kube_err(format!("get {what}")))?
    {
        return Ok(signer_from_secret(&s, &names.signing_key));
    }
    if !names.generated {
        return Ok(Err(format!("{what} not found")));
    }
    let (secret, signer) = new_signing_secret(names, &names.origin(&ctx.trust_domain))?;
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    match api.create(&pp, &secret).await {
        Ok(_) => {
            ctx.events.emit(InjectionEvent {
                regarding: ledger.object_ref(&()),
                type_: EventType::Normal,
                reason: "SigningKeyGenerated",
                note: format!("generated checkpoint signing key into {what}"),
            });
            Ok(Ok(signer))
        }
        // Someone created it meanwhile (another leader term): use theirs, never overwrite.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let s = api
                .get(&names.signing_secret)
                .await
                .map_err(kube_err(format!("get {what}")))?;
            Ok(signer_from_secret(&s, &names.signing_key))
        }
        Err(e) => Err(kube_err(format!("create {what}"))(e)),
    }
}

/// Reconciles one `AuditLedger` (see the module documentation).
///
/// # Errors
/// When an API request fails; the controller retries.
pub async fn reconcile(ledger: Arc<AuditLedger>, ctx: Arc<Context>) -> Result<Action, Error> {
    let names = Names::of(&ledger)?;
    let owner = owner_of(&ledger)?;
    let now = ctx.now();
    let now_k8s = k8s_time(now);
    let ns = names.namespace.as_str();
    let client = ctx.client.clone();
    let ledgers: Api<AuditLedger> = Api::namespaced(client.clone(), ns);

    let signer = match signing_key(&ledger, &names, &ctx).await? {
        Ok(s) => s,
        Err(problem) => {
            let obs = Observed {
                ready_replicas: 0,
                key_problem: Some(problem.clone()),
                checkpoint: Err(problem),
            };
            write_status(&ledgers, &ledger, &names, &obs, &now_k8s).await?;
            return Ok(Action::requeue(super::RETRY));
        }
    };

    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let server_id = names.server_id(&ctx.trust_domain)?;
    let bundle = ctx.ca.bundle_pem();
    let tls_ok = secrets
        .get_opt(&names.tls_secret)
        .await
        .map_err(kube_err(format!("get Secret {ns}/{}", names.tls_secret)))?
        .is_some_and(|s| tls_is_current(&s, &server_id, bundle, now));
    if !tls_ok {
        let (chain, key) = issue_svid(&ctx.ca, &server_id, TLS_TTL, now)?;
        apply(
            &secrets,
            &tls_secret(&names, &owner, &chain, &key, bundle),
            "Secret",
        )
        .await?;
    }

    let cm = config_map(
        &ledger,
        &names,
        &owner,
        &ctx.trust_domain,
        &signer,
        ctx.checkpoints.as_ref().and(ctx.reader_id.as_ref()),
    )?;
    apply(
        &Api::<ConfigMap>::namespaced(client.clone(), ns),
        &cm,
        "ConfigMap",
    )
    .await?;
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    apply(&services, &headless_service(&names, &owner), "Service").await?;
    apply(&services, &client_service(&names, &owner), "Service").await?;
    let sts = apply(
        &Api::<StatefulSet>::namespaced(client.clone(), ns),
        &stateful_set(
            &ledger,
            &names,
            &owner,
            &ctx.ledger_image,
            ctx.otlp_endpoint.as_deref(),
        ),
        "StatefulSet",
    )
    .await?;
    apply(
        &Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
        &pdb(&names, &owner),
        "PodDisruptionBudget",
    )
    .await?;

    let ready = sts
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let checkpoint = match (&ctx.checkpoints, ready) {
        (None, _) => Err("no reader credentials configured".to_owned()),
        (Some(_), 0) => Err("no replica is ready".to_owned()),
        (Some(reader), _) => {
            let target = LedgerTarget {
                url: ctx.resolve.apply(&names.endpoint()),
                server_id,
                origin: signer.name().to_owned(),
                verifier_key: signer.verifier_key(),
            };
            reader.read(&target).await
        }
    };
    // Until a checkpoint is read (replicas starting, the ledger not answering yet), look again
    // soon rather than at the next resync: Ready should follow the ledger within seconds.
    let next = if checkpoint.is_ok() { RESYNC } else { RECHECK };
    let obs = Observed {
        ready_replicas: ready,
        key_problem: None,
        checkpoint,
    };
    write_status(&ledgers, &ledger, &names, &obs, &now_k8s).await?;
    Ok(Action::requeue(next))
}

async fn write_status(
    api: &Api<AuditLedger>,
    ledger: &AuditLedger,
    names: &Names,
    obs: &Observed,
    now: &Time,
) -> Result<(), Error> {
    let new = status(ledger, names, obs, now);
    if ledger.status.as_ref() == Some(&new) {
        return Ok(());
    }
    children::apply_status(api, "AuditLedger", &names.namespace, &names.ledger, &new).await
}
