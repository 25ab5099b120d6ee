//! The cluster's own peer view (`GET /peers`), read through the archive pods' sidecars.

// The parent's names and imports: one concern split in files.
use super::*;

/// One peer as the cluster reports it (`GET /peers`, `GET /id`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ClusterPeer {
    /// Cluster peer ID.
    pub id: String,
    /// Its peer name.
    #[serde(default)]
    pub peername: String,
    /// What is wrong with it, empty when nothing.
    #[serde(default)]
    pub error: String,
}

/// Parses the body of `GET /peers`: a JSON array, or one object per line (newer versions
/// stream them).
///
/// # Errors
/// When the body is neither.
pub fn parse_peers(body: &[u8]) -> Result<Vec<ClusterPeer>, String> {
    let mut out = Vec::new();
    for v in serde_json::Deserializer::from_slice(body).into_iter::<serde_json::Value>() {
        let v = v.map_err(|e| format!("peers: {e}"))?;
        let items = match v {
            serde_json::Value::Array(a) => a,
            o => vec![o],
        };
        for item in items {
            out.push(serde_json::from_value(item).map_err(|e| format!("peers: {e}"))?);
        }
    }
    Ok(out)
}

/// How the operator reaches an archive's cluster REST API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveTarget {
    /// Base URL (the client Service, or a resolved address out of cluster).
    pub url: String,
    /// The archive pods' SPIFFE ID (their sidecars present it).
    pub server_id: SpiffeId,
}

/// Reads the cluster's peer view. Behind a trait so that reconciler tests need no cluster.
pub trait PeerReader: Send + Sync {
    /// The peers `GET /peers` lists, or why they could not be read.
    fn peers<'a>(
        &'a self,
        target: &'a ArchiveTarget,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<ClusterPeer>, String>> + Send + 'a>>;
}

/// Reads `/peers` over mTLS through the archive pods' sidecar, presenting an SVID the
/// operator issues itself from its CA for each read.
pub struct MeshPeerReader {
    /// The identity CA.
    pub ca: Arc<crate::identity::IssuerCa>,
    /// The operator's SPIFFE ID (allowed on the REST port by the archive's MeshPolicy).
    pub id: SpiffeId,
    /// The trust domain.
    pub trust_domain: TrustDomain,
}

impl PeerReader for MeshPeerReader {
    fn peers<'a>(
        &'a self,
        target: &'a ArchiveTarget,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<ClusterPeer>, String>> + Send + 'a>> {
        Box::pin(async move {
            let (chain, key) = crate::controller::audit_ledger::issue_svid(
                &self.ca,
                &self.id,
                Duration::from_secs(600),
                SystemTime::now(),
            )
            .map_err(|e| e.to_string())?;
            let identity = medmesh_core::tls::Identity::from_pem(chain.as_bytes(), key.as_bytes())
                .map_err(|e| format!("operator SVID: {e}"))?;
            let bundle = medmesh_core::tls::TrustBundle::from_pem(
                self.ca.bundle_pem().as_bytes(),
                self.trust_domain.clone(),
            )
            .map_err(|e| format!("trust bundle: {e}"))?;
            let body =
                mesh_get(&identity, &bundle, &target.server_id, &target.url, "/peers").await?;
            parse_peers(&body)
        })
    }
}

/// `GET <url><path>` over medmesh mTLS (TLS 1.3, ALPN `medmesh/1`, the server's SVID must be
/// `server`), HTTP/1.1;
/// the body of a 200 answer (the head and the body each within 10 s).
///
/// # Errors
/// A message saying which step failed.
pub async fn mesh_get(
    identity: &medmesh_core::tls::Identity,
    bundle: &medmesh_core::tls::TrustBundle,
    server: &SpiffeId,
    url: &str,
    path: &str,
) -> Result<Vec<u8>, String> {
    let tls = medmesh_archive::MeshTls {
        identity: identity.clone(),
        bundle: bundle.clone(),
        server: server.clone(),
    };
    let ep = medmesh_archive::MeshEndpoint::new(url, Some(&tls), Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let body = ep
        .call(
            http::Method::GET,
            path,
            None,
            medmesh_archive::mesh::empty(),
            4 << 20,
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(body.to_vec())
}
