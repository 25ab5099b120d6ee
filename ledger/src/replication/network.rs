//! Calls between replicas: Raft RPCs (postcard bodies) and appends forwarded to the leader.
//! Every call is HTTPS with the ledger's own SVID as client certificate and accepts only a
//! server presenting that same SPIFFE ID; credentials are re-read when they rotate.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use medmesh_core::tls::{self, ServerIdentity};
use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use tokio::sync::watch;

use super::{
    APPEND_PATH, NodeId, RPC_CONTENT_TYPE, SNAPSHOT_PATH, SUBMITTER_HEADER, TypeConfig, VOTE_PATH,
    decode, encode,
};
use crate::metrics::Metrics;
use crate::server::Creds;

/// An HTTPS client presenting the current credentials.
pub struct PeerTls {
    creds: watch::Receiver<Arc<Creds>>,
    cached: Mutex<Option<(usize, reqwest::Client)>>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerTls")
    }
}

impl PeerTls {
    /// A client source following `creds`.
    pub fn new(creds: watch::Receiver<Arc<Creds>>) -> Self {
        Self {
            creds,
            cached: Mutex::new(None),
        }
    }

    /// The client for the credentials in force (rebuilt after a rotation).
    ///
    /// # Errors
    /// When rustls or reqwest refuse the material.
    pub fn client(&self) -> Result<reqwest::Client, String> {
        let creds = self.creds.borrow().clone();
        let key = Arc::as_ptr(&creds) as usize;
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((k, c)) = cached.as_ref()
            && *k == key
        {
            return Ok(c.clone());
        }
        let cfg = tls::client_config(
            Some(&creds.identity),
            &creds.bundle,
            ServerIdentity::Exact(creds.identity.id().clone()),
            &[b"h2"],
        )
        .map_err(|e| e.to_string())?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(cfg)
            .connect_timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(16)
            .build()
            .map_err(|e| e.to_string())?;
        *cached = Some((key, client.clone()));
        Ok(client)
    }
}

/// Makes one [`PeerNetwork`] per replication target.
#[derive(Debug, Clone)]
pub struct NetworkFactory {
    tls: Arc<PeerTls>,
    metrics: Metrics,
    resolve: Resolve,
}

/// Connect-address overrides (peer address → address to dial), re-read with the configuration.
pub type Resolve = Arc<std::sync::RwLock<BTreeMap<String, String>>>;

fn dial(resolve: &Resolve, addr: &str) -> String {
    resolve
        .read()
        .ok()
        .and_then(|r| r.get(addr).cloned())
        .unwrap_or_else(|| addr.to_owned())
}

impl NetworkFactory {
    /// A factory whose clients use `tls`, dialling `resolve[addr]` instead of `addr` when set.
    pub fn new(tls: Arc<PeerTls>, metrics: Metrics, resolve: Resolve) -> Self {
        Self {
            tls,
            metrics,
            resolve,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerNetwork {
        PeerNetwork {
            tls: self.tls.clone(),
            metrics: self.metrics.clone(),
            base: format!("https://{}", dial(&self.resolve, &node.addr)),
            target,
            node: node.clone(),
        }
    }
}

/// The RPC client of one peer.
#[derive(Debug)]
pub struct PeerNetwork {
    tls: Arc<PeerTls>,
    metrics: Metrics,
    base: String,
    target: NodeId,
    node: BasicNode,
}

impl PeerNetwork {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: serde::Serialize,
        Resp: for<'de> serde::Deserialize<'de>,
        E: std::error::Error + for<'de> serde::Deserialize<'de>,
    {
        let net = |e: &dyn std::fmt::Display| {
            RPCError::Network(NetworkError::new(&std::io::Error::other(e.to_string())))
        };
        let started = std::time::Instant::now();
        let client = self.tls.client().map_err(|e| net(&e))?;
        let body = encode(req).map_err(|e| net(&e))?;
        let url = format!("{}{path}", self.base);
        let resp = client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, RPC_CONTENT_TYPE)
            .timeout(ttl)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(format!(
                        "{url}: {e}"
                    ))))
                } else {
                    net(&format!("{url}: {e}"))
                }
            })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| net(&format!("{url}: {e}")))?;
        if !status.is_success() {
            return Err(net(&format!(
                "{url}: {status}: {}",
                String::from_utf8_lossy(&bytes)
            )));
        }
        let r: Result<Resp, RaftError<NodeId, E>> =
            decode(&bytes).map_err(|e| net(&format!("{url}: response does not decode: {e}")))?;
        let label = path.rsplit('/').next().unwrap_or("other");
        self.metrics
            .raft_rpc_sent_seconds
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        r.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))
        })
    }
}

/// Largest AppendEntries body sent: openraft gives one AppendEntries a heartbeat interval to
/// complete, so a follower catching up gets its entries in pieces that fit.
pub const MAX_APPEND_BYTES: usize = 512 << 10;

impl RaftNetwork<TypeConfig> for PeerNetwork {
    /// Retries an unreachable peer every 100 ms (openraft's default is 500 ms): a replica
    /// restarting after a crash must hear from the leader before its own election timeout, or
    /// it campaigns in a higher term and deposes a healthy leader.
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(100)))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(APPEND_PATH, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(SNAPSHOT_PATH, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(VOTE_PATH, &rpc, option.hard_ttl()).await
    }
}

/// Forwards appends received by a follower to the leader.
#[derive(Debug)]
pub struct Forwarder {
    tls: Arc<PeerTls>,
    timeout: Duration,
    resolve: Resolve,
}

/// The leader's answer to a forwarded append, passed back to the client as is.
#[derive(Debug)]
pub struct Forwarded {
    /// HTTP status.
    pub status: reqwest::StatusCode,
    /// Content type, if any.
    pub content_type: Option<String>,
    /// Body.
    pub body: Bytes,
}

impl Forwarder {
    /// A forwarder using `tls`, giving up on a leader after `timeout`, dialling `resolve[addr]`
    /// instead of `addr` when set.
    pub fn new(tls: Arc<PeerTls>, timeout: Duration, resolve: Resolve) -> Self {
        Self {
            tls,
            timeout,
            resolve,
        }
    }

    /// Sends `body` to `path_and_query` on the leader at `addr` for `submitter`.
    ///
    /// # Errors
    /// When the leader cannot be reached or does not answer in time (the outcome is then
    /// unknown: the client retries with the same record ids).
    pub async fn forward(
        &self,
        addr: &str,
        path_and_query: &str,
        submitter: &str,
        body: Bytes,
    ) -> Result<Forwarded, String> {
        let client = self.tls.client()?;
        let url = format!("https://{}{path_and_query}", dial(&self.resolve, addr));
        // The leader's spans join the caller's trace.
        let mut trace = reqwest::header::HeaderMap::new();
        medmesh_telemetry::inject(&tracing::Span::current(), &mut trace);
        let resp = client
            .post(&url)
            .headers(trace)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SUBMITTER_HEADER, submitter)
            .timeout(self.timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp.bytes().await.map_err(|e| format!("{url}: {e}"))?;
        Ok(Forwarded {
            status,
            content_type,
            body,
        })
    }
}
