//! The `ImageArchive` controller: a private IPFS cluster (Kubo + ipfs-cluster, CRDT consensus)
//! per `ImageArchive`.
//!
//! Children (named after the archive `<a>`, labelled, server-side applied):
//! - `<a>-identities` (Secret): the ipfs-cluster secret, the libp2p private-network key and one
//!   Kubo and one ipfs-cluster Ed25519 identity per replica. **Generated once**, extended when
//!   replicas are added, never rewritten and kept on scale-down (a replica that comes back has
//!   its old identity, which its volume's repository was initialised with). Like a ledger's
//!   signing key it has no ownerReference: the volumes outlive the `ImageArchive`, and a new
//!   network key would cut them off from the peers that keep the old one;
//! - `<a>-config` (Secret, derived from the identities and the spec on every reconcile): per
//!   replica the complete Kubo configuration (private network only: no bootstrap, AutoConf,
//!   mDNS, relays, NAT traversal, providing or HTTP retrieval; routing off; peering with the
//!   other replicas; RPC and gateway on loopback), the ipfs-cluster settings as `CLUSTER_*`
//!   variables (re-applied at every start; CRDT with `trusted_peers` = exactly the generated
//!   identities; REST, proxy and pinning-service APIs on loopback) and the cluster identity;
//!   and `swarm.key`;
//! - `<a>` (ServiceAccount): the pods' workload identity, `spiffe://<td>/ns/<ns>/sa/<a>`;
//! - `<a>-swarm` (headless Service, not-ready pods included: peers must find each other before
//!   any is ready) for the two swarm ports, and `<a>` (client Service) for the cluster REST API
//!   and the Kubo gateway, which only loopback listens on: they are reached through the
//!   injected medmesh sidecar, which forwards to loopback;
//! - `<a>-archive` (MeshPolicy): REST for `adders` (and the operator, which reads the peer
//!   view), gateway for `readers`; everything else is denied;
//! - `<a>` (NetworkPolicy): the swarm ports (which bypass the sidecar: libp2p with the
//!   pre-shared keys is its own encrypted channel) only from this archive's pods;
//! - the StatefulSet `<a>` (Kubo + ipfs-cluster containers, two volume claim templates,
//!   restricted security context, readiness from the cluster's own peer view) and the
//!   PodDisruptionBudget `<a>`.
//!
//! Status: ready replicas, and the peer set as the cluster reports it on its REST API (`GET
//! /peers`, read over the mesh as the operator's SVID); Degraded when a replica is missing from
//! it or an identity outside the trusted set appears in it.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction, Namespace,
    ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe, Secret, SecretVolumeSource, Service,
    ServiceAccount, ServicePort, ServiceSpec, TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use medmesh_core::p2p::{ClusterSecret, PeerId, PeerKey, SwarmKey};
use medmesh_core::{SpiffeId, TrustDomain};
use serde_json::json;

use super::children::{self, apply};
use super::{Context, Error, FIELD_MANAGER, MANAGED_BY, k8s_time, kube_err};
use crate::crd::{
    ArchivePeer, Condition, ImageArchive, ImageArchiveStatus, MeshPolicy, MeshPolicySpec, Peer,
    PolicyMode, PortProtocol, PortRule, WorkloadIdentity, condition,
};
use crate::events::{EventType, InjectionEvent};
use crate::names::{
    INJECT_LABEL, SIDECAR_ADMIN_PORT, SKIP_INBOUND_ANNOTATION, SKIP_OUTBOUND_ANNOTATION,
};

mod identities;
mod peers;
mod render;
#[cfg(test)]
mod tests;

pub use identities::*;
pub use peers::*;
pub use render::*;

/// Kubo's libp2p swarm (TCP only: a private network supports no other transport).
pub const KUBO_SWARM_PORT: i32 = 4001;
/// ipfs-cluster's libp2p swarm.
pub const CLUSTER_SWARM_PORT: i32 = 9096;
/// ipfs-cluster's REST API (loopback; through the sidecar for `adders`).
pub const REST_PORT: i32 = 9094;
/// Kubo's gateway (loopback; through the sidecar for `readers`).
pub const GATEWAY_PORT: i32 = 8080;
/// Kubo's RPC API (loopback only, never exposed: it is the node's admin interface).
pub const KUBO_RPC_PORT: i32 = 5001;
/// ipfs-cluster's IPFS proxy (loopback only: unauthenticated).
pub const PROXY_PORT: i32 = 9095;
/// ipfs-cluster's pinning-service API (loopback only).
pub const PINSVC_PORT: i32 = 9097;
/// ipfs-cluster's Prometheus metrics (pin counts by status, Go runtime; no CIDs or names), on
/// the pod's address for Prometheus, outside the mesh like the sidecar's admin port.
pub const CLUSTER_METRICS_PORT: i32 = 8888;

/// Kubo image when the spec names none (the version the tests build from source).
pub const DEFAULT_KUBO_IMAGE: &str = "ipfs/kubo:v0.43.0";
/// ipfs-cluster image when the spec names none.
pub const DEFAULT_CLUSTER_IMAGE: &str = "ipfs/ipfs-cluster:v1.1.6";

/// Keys of the identities Secret.
pub const CLUSTER_SECRET_KEY: &str = "cluster-secret";
/// The private-network key, in Kubo's `swarm.key` format.
pub const SWARM_KEY: &str = "swarm.key";

/// Mount path of the config Secret in both containers (also `$MEDMESH_ARCHIVE_CONFIG`).
pub const CONFIG_DIR: &str = "/etc/medmesh/archive";
/// Kubo's repository (`$IPFS_PATH`).
pub const KUBO_DIR: &str = "/data/ipfs";
/// ipfs-cluster's state (`$IPFS_CLUSTER_PATH`).
pub const CLUSTER_DIR: &str = "/data/ipfs-cluster";
/// UID/GID of both containers (the upstream images' `ipfs` user).
const ARCHIVE_UID: i64 = 1000;

/// How often a healthy archive is looked at again.
pub const RESYNC: Duration = Duration::from_secs(60);
/// How soon an archive that is not ready yet is looked at again.
pub const RECHECK: Duration = Duration::from_secs(5);

/// Kubo's start: initialise the repository from the rendered configuration once, then on every
/// start replace the configuration with the rendered one (the operator's is the source of
/// truth: scale changes the peering list) and install the network key. The daemon refuses to
/// start without a network key (`LIBP2P_FORCE_PNET=1`).
pub const KUBO_SCRIPT: &str = r#"set -eu
conf="$MEDMESH_ARCHIVE_CONFIG/$POD_NAME.kubo.json"
if [ ! -f "$IPFS_PATH/config" ]; then
  ipfs init --empty-repo "$conf"
else
  cp "$conf" "$IPFS_PATH/config"
fi
cp "$MEDMESH_ARCHIVE_CONFIG/swarm.key" "$IPFS_PATH/swarm.key"
chmod 0400 "$IPFS_PATH/swarm.key"
exec ipfs daemon --migrate=false
"#;

/// ipfs-cluster's start: its settings come from `CLUSTER_*` variables, which ipfs-cluster
/// applies over `service.json` at every start; `init` only creates that file once; the
/// identity file is installed on every start.
pub const CLUSTER_SCRIPT: &str = r#"set -eu
set -a
. "$MEDMESH_ARCHIVE_CONFIG/$POD_NAME.cluster.env"
set +a
if [ ! -f "$IPFS_CLUSTER_PATH/service.json" ]; then
  ipfs-cluster-service init --consensus crdt --datastore pebble --force
fi
cp "$MEDMESH_ARCHIVE_CONFIG/$POD_NAME.identity.json" "$IPFS_CLUSTER_PATH/identity.json"
chmod 0400 "$IPFS_CLUSTER_PATH/identity.json"
exec ipfs-cluster-service daemon
"#;

/// Readiness of the cluster container: the REST API answers and this peer sees at least one
/// other peer (with one replica: itself). ipfs-cluster-ctl prints `<id> | <name> | Sees <n>
/// other peers`.
pub const CLUSTER_READY_SCRIPT: &str = r#"out=$(ipfs-cluster-ctl --host /ip4/127.0.0.1/tcp/9094 id) || exit 1
[ "$MEDMESH_ARCHIVE_REPLICAS" = 1 ] && exit 0
echo "$out" | grep -q 'Sees [1-9][0-9]* other peer'
"#;

/// Names of an archive's children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The archive (also the StatefulSet, client Service, ServiceAccount, PDB, NetworkPolicy).
    pub archive: String,
    /// Namespace.
    pub namespace: String,
    /// Identities Secret (generated once).
    pub identities: String,
    /// Rendered configuration Secret.
    pub config: String,
    /// Headless Service of the swarm ports.
    pub swarm: String,
    /// The MeshPolicy for the archive's pods.
    pub policy: String,
}

impl Names {
    /// The names for `archive`.
    ///
    /// # Errors
    /// When the archive has no namespace.
    pub fn of(archive: &ImageArchive) -> Result<Self, Error> {
        let name = archive.name_any();
        let namespace = archive
            .namespace()
            .ok_or_else(|| Error::Object(format!("ImageArchive {name} has no namespace")))?;
        Ok(Self {
            identities: format!("{name}-identities"),
            config: format!("{name}-config"),
            swarm: format!("{name}-swarm"),
            policy: format!("{name}-archive"),
            archive: name,
            namespace,
        })
    }

    /// Pod (and cluster peer) name of replica `i`.
    pub fn replica(&self, i: usize) -> String {
        format!("{}-{i}", self.archive)
    }

    /// Replica `i`'s stable DNS name through the swarm Service.
    pub fn swarm_host(&self, i: usize) -> String {
        format!("{}.{}.{}.svc", self.replica(i), self.swarm, self.namespace)
    }

    /// The cluster REST API through the mesh.
    pub fn endpoint(&self) -> String {
        format!("http://{}.{}.svc:{REST_PORT}", self.archive, self.namespace)
    }

    /// The Kubo gateway through the mesh.
    pub fn gateway(&self) -> String {
        format!(
            "http://{}.{}.svc:{GATEWAY_PORT}",
            self.archive, self.namespace
        )
    }

    /// The pods' SPIFFE ID (their ServiceAccount's).
    ///
    /// # Errors
    /// When the names do not form a valid SPIFFE ID.
    pub fn workload_id(&self, td: &TrustDomain) -> Result<SpiffeId, Error> {
        td.workload(&self.namespace, &self.archive)
            .map_err(|e| Error::Object(format!("archive SPIFFE ID: {e}")))
    }

    /// The CRDT cluster name (its pubsub topic): unique per archive.
    pub fn cluster_name(&self) -> String {
        format!("medmesh-{}-{}", self.namespace, self.archive)
    }
}

/// Labels of every child; the first two also select the pods.
pub fn labels(names: &Names) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "medmesh-archive".into()),
        ("app.kubernetes.io/instance".into(), names.archive.clone()),
        ("app.kubernetes.io/part-of".into(), "medmesh".into()),
        ("app.kubernetes.io/managed-by".into(), MANAGED_BY.into()),
    ])
}

/// The labels that select an archive's pods.
pub fn selector_labels(names: &Names) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "medmesh-archive".into()),
        ("app.kubernetes.io/instance".into(), names.archive.clone()),
    ])
}

fn meta(name: &str, names: &Names, owner: &OwnerReference) -> ObjectMeta {
    children::meta(name, &names.namespace, labels(names), owner)
}

/// What was observed, for [`status`].
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// Ready pods of the StatefulSet.
    pub ready_replicas: i32,
    /// Whether the namespace is meshed (the REST API is reachable only through the sidecar).
    pub meshed: bool,
    /// Why the identities are unusable, if they are.
    pub identities_problem: Option<String>,
    /// The generated cluster and Kubo peer IDs, per replica.
    pub expected: Vec<(PeerId, PeerId)>,
    /// The cluster's peer view, or why it was not read.
    pub peers: Result<Vec<ClusterPeer>, String>,
}

fn clip(s: &str) -> String {
    const MAX: usize = 256;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The status for what was observed, merged into the stored one.
pub fn status(
    archive: &ImageArchive,
    names: &Names,
    obs: &Observed,
    now: &Time,
) -> ImageArchiveStatus {
    let old = archive.status.clone().unwrap_or_default();
    let generation = archive.metadata.generation;
    let want = archive.spec.replicas;
    let ready = obs.ready_replicas;
    let mut conditions: Vec<Condition> = old.conditions.clone();
    let set = |conditions: &mut Vec<Condition>, t: &str, s: bool, reason: &str, msg: &str| {
        condition::set(
            conditions,
            condition::new(t, s, reason, msg, generation, now),
        );
    };
    if let Some(problem) = &obs.identities_problem {
        set(
            &mut conditions,
            condition::READY,
            false,
            "IdentitiesInvalid",
            problem,
        );
        set(
            &mut conditions,
            condition::PROGRESSING,
            false,
            "IdentitiesInvalid",
            problem,
        );
        set(
            &mut conditions,
            condition::DEGRADED,
            true,
            "IdentitiesInvalid",
            problem,
        );
        return ImageArchiveStatus {
            observed_generation: generation,
            conditions,
            ready_replicas: Some(ready),
            ..old
        };
    }

    // The peer list: every replica with its generated IDs, marked with what the cluster says.
    let view = obs.peers.as_ref().ok();
    let mut peers = Vec::new();
    for (i, (cluster, kubo)) in obs.expected.iter().enumerate() {
        let id = cluster.to_string();
        let found = view.and_then(|v| v.iter().find(|p| p.id == id));
        let (seen, error) = match (view, found) {
            (None, _) => (
                old.peers
                    .iter()
                    .find(|p| p.peer_id == id)
                    .is_some_and(|p| p.seen),
                None,
            ),
            (Some(_), None) => (false, Some("not in the cluster's peer set".to_owned())),
            (Some(_), Some(p)) if p.error.is_empty() => (true, None),
            (Some(_), Some(p)) => (false, Some(clip(&p.error))),
        };
        peers.push(ArchivePeer {
            replica: names.replica(i),
            peer_id: id,
            ipfs_peer_id: kubo.to_string(),
            seen,
            error,
        });
    }
    let untrusted: Vec<String> = view
        .map(|v| {
            v.iter()
                .filter(|p| !obs.expected.iter().any(|(c, _)| c.to_string() == p.id))
                .map(|p| p.id.clone())
                .collect()
        })
        .unwrap_or_default();
    let cluster_peers = view.map(|v| {
        i32::try_from(v.iter().filter(|p| p.error.is_empty()).count()).unwrap_or(i32::MAX)
    });
    let missing: Vec<&str> = peers
        .iter()
        .filter(|p| !p.seen)
        .map(|p| p.replica.as_str())
        .collect();

    let replicas = format!("{ready}/{want} replicas ready");
    let (degraded, reason, message) = if !obs.meshed {
        (
            true,
            "NamespaceNotMeshed",
            format!(
                "namespace {} is not labelled {INJECT_LABEL}=enabled: the archive's APIs are reachable only through the mesh",
                names.namespace
            ),
        )
    } else if !untrusted.is_empty() {
        (
            true,
            "UntrustedPeer",
            format!(
                "peers outside the generated identities: {}",
                untrusted.join(", ")
            ),
        )
    } else {
        match &obs.peers {
            Err(e) if ready >= want => (true, "ClusterUnreadable", clip(e)),
            Err(_) => (false, "AsExpected", String::new()),
            Ok(_) if !missing.is_empty() && ready >= want => (
                true,
                "PeerMissing",
                format!(
                    "missing from the cluster's peer set: {}",
                    missing.join(", ")
                ),
            ),
            Ok(_) => (false, "AsExpected", String::new()),
        }
    };
    let all_ready =
        ready >= want && want > 0 && !degraded && obs.peers.is_ok() && missing.is_empty();
    let peers_note = match cluster_peers {
        Some(n) => format!("; the cluster sees {n} of {want} peers"),
        None => match &obs.peers {
            Err(e) => format!("; peers not read: {}", clip(e)),
            Ok(_) => String::new(),
        },
    };
    set(
        &mut conditions,
        condition::READY,
        all_ready,
        if all_ready {
            "PeersReady"
        } else if degraded {
            reason
        } else {
            "PeersNotReady"
        },
        &format!("{replicas}{peers_note}"),
    );
    set(
        &mut conditions,
        condition::PROGRESSING,
        ready < want,
        if ready < want { "RollingOut" } else { "Stable" },
        &replicas,
    );
    set(
        &mut conditions,
        condition::DEGRADED,
        degraded,
        reason,
        &message,
    );
    ImageArchiveStatus {
        observed_generation: generation,
        conditions,
        ready_replicas: Some(ready),
        cluster_peers: cluster_peers.or(old.cluster_peers),
        endpoint: Some(names.endpoint()),
        gateway: Some(names.gateway()),
        peers,
    }
}

fn owner_of(archive: &ImageArchive) -> Result<OwnerReference, Error> {
    archive.controller_owner_ref(&()).ok_or_else(|| {
        Error::Object(format!(
            "ImageArchive {} has no uid yet",
            archive.name_any()
        ))
    })
}

/// The identities: read, created once, or extended to `replicas` (an update conditional on
/// the version read, so that two leaders can never both write).
async fn identities(
    archive: &ImageArchive,
    names: &Names,
    ctx: &Context,
    replicas: usize,
) -> Result<Result<Identities, String>, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let what = format!("Secret {}/{}", names.namespace, names.identities);
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    let event = |reason: &'static str, note: String| {
        ctx.events.emit(InjectionEvent {
            regarding: archive.object_ref(&()),
            type_: EventType::Normal,
            reason,
            note,
        });
    };
    match api
        .get_opt(&names.identities)
        .await
        .map_err(kube_err(format!("get {what}")))?
    {
        None => {
            let ids = Identities::generate(replicas)?;
            match api.create(&pp, &identities_secret(names, &ids)).await {
                Ok(_) => {
                    event(
                        "IdentitiesGenerated",
                        format!(
                            "generated the archive's keys and {replicas} peer identities into {what}"
                        ),
                    );
                    Ok(Ok(ids))
                }
                Err(kube::Error::Api(e)) if e.code == 409 => Err(Error::Object(format!(
                    "{what} was created concurrently; retrying"
                ))),
                Err(e) => Err(kube_err(format!("create {what}"))(e)),
            }
        }
        Some(secret) => {
            let mut ids = match Identities::from_secret(&secret) {
                Ok(ids) => ids,
                Err(problem) => return Ok(Err(problem)),
            };
            if ids.peers.len() >= replicas {
                return Ok(Ok(ids));
            }
            let had = ids.peers.len();
            ids.extend_to(replicas)?;
            let mut updated = secret.clone();
            updated.data = Some(ids.secret_data());
            // `replace` sends the resourceVersion read: a concurrent change fails with 409.
            api.replace(&names.identities, &pp, &updated)
                .await
                .map_err(kube_err(format!("extend {what}")))?;
            event(
                "IdentitiesExtended",
                format!("added peer identities {had}..{replicas} to {what}"),
            );
            Ok(Ok(ids))
        }
    }
}

/// Reconciles one `ImageArchive` (see the module documentation).
///
/// # Errors
/// When an API request fails; the controller retries.
pub async fn reconcile(archive: Arc<ImageArchive>, ctx: Arc<Context>) -> Result<Action, Error> {
    let names = Names::of(&archive)?;
    let owner = owner_of(&archive)?;
    let now_k8s = k8s_time(ctx.now());
    let ns = names.namespace.as_str();
    let client = ctx.client.clone();
    let archives: Api<ImageArchive> = Api::namespaced(client.clone(), ns);
    let replicas = usize::try_from(archive.spec.replicas.max(1)).unwrap_or(1);

    let meshed = Api::<Namespace>::all(client.clone())
        .get_opt(ns)
        .await
        .map_err(kube_err(format!("get Namespace {ns}")))?
        .and_then(|n| n.metadata.labels)
        .and_then(|l| l.get(INJECT_LABEL).cloned())
        .is_some_and(|v| v == "enabled");

    let ids = match identities(&archive, &names, &ctx, replicas).await? {
        Ok(ids) => ids,
        Err(problem) => {
            let obs = Observed {
                ready_replicas: 0,
                meshed,
                identities_problem: Some(problem.clone()),
                expected: Vec::new(),
                peers: Err(problem),
            };
            write_status(&archives, &archive, &names, &obs, &now_k8s).await?;
            return Ok(Action::requeue(super::RETRY));
        }
    };

    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let config = config_secret(&archive, &names, &owner, &ids)?;
    apply(&secrets, &config, "Secret").await?;
    apply(
        &Api::<ServiceAccount>::namespaced(client.clone(), ns),
        &service_account(&names, &owner),
        "ServiceAccount",
    )
    .await?;
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    apply(&services, &swarm_service(&names, &owner), "Service").await?;
    apply(&services, &client_service(&names, &owner), "Service").await?;
    apply(
        &Api::<MeshPolicy>::namespaced(client.clone(), ns),
        &mesh_policy(&archive, &names, &owner, ctx.reader_id.as_ref()),
        "MeshPolicy",
    )
    .await?;
    apply(
        &Api::<NetworkPolicy>::namespaced(client.clone(), ns),
        &network_policy(&names, &owner),
        "NetworkPolicy",
    )
    .await?;
    let sts = apply(
        &Api::<StatefulSet>::namespaced(client.clone(), ns),
        &stateful_set(&archive, &names, &owner, &config_digest(&config)),
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
    let peers = match (&ctx.archive_peers, ready) {
        (None, _) => Err("no reader credentials configured".to_owned()),
        (Some(_), 0) => Err("no replica is ready".to_owned()),
        (Some(reader), _) => {
            let target = ArchiveTarget {
                url: ctx.resolve.apply(&names.endpoint()),
                server_id: names.workload_id(&ctx.trust_domain)?,
            };
            reader.peers(&target).await
        }
    };
    let expected = ids
        .peers
        .iter()
        .take(replicas)
        .map(|p| (p.cluster.peer_id(), p.kubo.peer_id()))
        .collect();
    let settled = peers.is_ok() && ready >= archive.spec.replicas;
    let obs = Observed {
        ready_replicas: ready,
        meshed,
        identities_problem: None,
        expected,
        peers,
    };
    write_status(&archives, &archive, &names, &obs, &now_k8s).await?;
    Ok(Action::requeue(if settled { RESYNC } else { RECHECK }))
}

async fn write_status(
    api: &Api<ImageArchive>,
    archive: &ImageArchive,
    names: &Names,
    obs: &Observed,
    now: &Time,
) -> Result<(), Error> {
    let new = status(archive, names, obs, now);
    if archive.status.as_ref() == Some(&new) {
        return Ok(());
    }
    children::apply_status(api, "ImageArchive", &names.namespace, &names.archive, &new).await
}
