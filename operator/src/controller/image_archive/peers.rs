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
/// the body of a 200 answer, within 10 s.
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
    use http_body_util::BodyExt as _;
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("{url}: no host"))?
        .to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let cfg = medmesh_core::tls::client_config(
        Some(identity),
        bundle,
        medmesh_core::tls::ServerIdentity::Exact(server.clone()),
        // A sidecar terminates only TLS that offers the mesh's ALPN.
        &[medmesh_core::tls::MESH_ALPN],
    )
    .map_err(|e| format!("TLS configuration: {e}"))?;
    let work = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("connect {host}:{port}: {e}"))?;
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("{host}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP with {host}:{port}: {e}"))?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, format!("{host}:{port}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("GET {path}: HTTP {status}"));
        }
        Ok(body.to_vec())
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| format!("GET {url}{path}: no answer within 10 s"))?
}
