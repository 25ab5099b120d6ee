//! ipfs-cluster's REST API (`/add`, `/pins/{cid}`), as the sidecar uses it.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::BodyExt;
use medmesh_core::record::ContentId;

use crate::ArchiveError;
use crate::mesh::{Body, MeshEndpoint, empty};

/// How an object is added.
#[derive(Debug, Clone)]
pub struct AddOptions {
    /// The pin's name: opaque (never a UID or a plaintext hash).
    pub name: String,
    /// Least number of peers that must pin it.
    pub replication_min: u32,
    /// Most peers that pin it.
    pub replication_max: u32,
}

/// A pin's status across the cluster (`GET /pins/{cid}`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PinStatus {
    /// Peers reporting `pinned`.
    pub pinned: usize,
    /// Peers still working on it (`pinning`, `pin_queued`).
    pub pinning: usize,
    /// Peers reporting an error, with their messages.
    pub errors: Vec<String>,
    /// Peers in the answer.
    pub peers: usize,
}

/// A client of one archive's ipfs-cluster REST API.
#[derive(Debug, Clone)]
pub struct ClusterClient {
    ep: MeshEndpoint,
}

/// The ipfs-cluster answer to `/add?stream-channels=false`: one entry per added node.
#[derive(serde::Deserialize)]
struct Added {
    #[serde(default)]
    name: String,
    cid: String,
}

#[derive(serde::Deserialize)]
struct GlobalPinInfo {
    #[serde(default)]
    peer_map: std::collections::BTreeMap<String, PinInfo>,
}

#[derive(serde::Deserialize)]
struct PinInfo {
    #[serde(default)]
    status: String,
    #[serde(default)]
    error: String,
}

fn pin_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl ClusterClient {
    /// A client of the REST API at `ep`.
    pub fn new(ep: MeshEndpoint) -> Self {
        Self { ep }
    }

    /// Adds the file at `path` as one UnixFS file (CIDv1, raw leaves, 256 KiB chunks, the
    /// layout `medmesh_core::unixfs` computes) and pins it with `opts`; returns its root CID.
    /// Adding the same bytes again is harmless (same CID, same pin).
    ///
    /// # Errors
    /// When the file cannot be read, the API refuses, or the answer names no root.
    pub async fn add_file(
        &self,
        path: &Path,
        opts: &AddOptions,
    ) -> Result<ContentId, ArchiveError> {
        if !pin_name_ok(&opts.name) {
            return Err(ArchiveError::Url {
                url: opts.name.clone(),
                reason: "a pin name is 1-64 letters, digits, '-' or '_'".into(),
            });
        }
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| ArchiveError::io(path, e))?;
        let len = file
            .metadata()
            .await
            .map_err(|e| ArchiveError::io(path, e))?
            .len();
        let mut boundary = [0u8; 16];
        getrandom::fill(&mut boundary).map_err(|e| ArchiveError::Tls(e.to_string()))?;
        let boundary = hex::encode(boundary);
        let head = Bytes::from(format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}\"\r\nContent-Type: application/octet-stream\r\n\r\n",
            opts.name
        ));
        let tail = Bytes::from(format!("\r\n--{boundary}--\r\n"));
        let file_stream = file_chunks(file);
        let stream = futures::stream::once(async move { Ok(head) })
            .chain(file_stream)
            .chain(futures::stream::once(async move { Ok(tail) }))
            .map(|r| r.map(hyper::body::Frame::data));
        let body: Body = BodyExt::boxed(http_body_util::StreamBody::new(stream));
        let path_q = format!(
            "/add?cid-version=1&raw-leaves=true&chunker=size-{}&layout=balanced&hash=sha2-256&stream-channels=false&name={}&replication-min={}&replication-max={}",
            medmesh_core::unixfs::CHUNK_SIZE,
            opts.name,
            opts.replication_min,
            opts.replication_max
        );
        // The answer comes after the whole body was added: allow for a slow link.
        let ep = self
            .ep
            .with_timeout(Duration::from_secs(60) + Duration::from_millis(len / 1024));
        let answer = ep
            .call(
                http::Method::POST,
                &path_q,
                Some(&format!("multipart/form-data; boundary={boundary}")),
                body,
                1 << 20,
            )
            .await?;
        let target = format!("{}/add", self.ep.authority());
        let added: Vec<Added> =
            serde_json::from_slice(&answer).map_err(|e| ArchiveError::Malformed {
                target: target.clone(),
                reason: format!(
                    "{e}: {}",
                    String::from_utf8_lossy(&answer[..answer.len().min(200)])
                ),
            })?;
        // One file, no wrapping directory: the root is the entry named after the file (the
        // last one).
        let root = added
            .iter()
            .rev()
            .find(|a| a.name == opts.name)
            .or(added.last())
            .ok_or_else(|| ArchiveError::Malformed {
                target: target.clone(),
                reason: "no CID in the answer".into(),
            })?;
        root.cid.parse().map_err(|e| ArchiveError::Malformed {
            target,
            reason: format!("{e}"),
        })
    }

    /// The pin's status on every peer of the cluster.
    ///
    /// # Errors
    /// When the API refuses or answers something else than a pin's status.
    pub async fn pin_status(&self, cid: &ContentId) -> Result<PinStatus, ArchiveError> {
        let path = format!("/pins/{cid}");
        let answer = self
            .ep
            .call(http::Method::GET, &path, None, empty(), 4 << 20)
            .await?;
        let info: GlobalPinInfo =
            serde_json::from_slice(&answer).map_err(|e| ArchiveError::Malformed {
                target: format!("{}{path}", self.ep.authority()),
                reason: e.to_string(),
            })?;
        let mut s = PinStatus {
            peers: info.peer_map.len(),
            ..PinStatus::default()
        };
        for p in info.peer_map.values() {
            match p.status.as_str() {
                "pinned" => s.pinned += 1,
                "pinning" | "pin_queued" | "queued" => s.pinning += 1,
                "pin_error" | "error" | "cluster_error" | "unexpectedly_unpinned" => {
                    s.errors.push(if p.error.is_empty() {
                        p.status.clone()
                    } else {
                        p.error.clone()
                    })
                }
                _ => {}
            }
        }
        Ok(s)
    }
}

/// A file as a stream of chunks of at most 256 KiB.
fn file_chunks(
    file: tokio::fs::File,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    use tokio::io::AsyncReadExt as _;
    futures::stream::unfold(Some(file), |f| async move {
        let mut f = f?;
        let mut buf = vec![0u8; 256 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), Some(f)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}
