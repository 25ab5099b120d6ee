//! Raft replication of the ledger (openraft): three or five replicas hold one log.
//!
//! - [`log_store`]: Raft's own log and vote in `raft.redb`, one durable commit per append.
//! - [`state_machine`]: applies committed Raft entries to the Merkle log in `ledger.redb`
//!   (one durable transaction per apply call, with the applied log id and membership in it), and
//!   builds and installs snapshots (a snapshot is the log's entries; installing one appends the
//!   entries this replica is missing).
//! - [`network`]: Raft RPCs and forwarded appends between replicas, over mTLS with the ledger's
//!   own SVID (every replica has the same SPIFFE ID; only that ID may call the peer routes).
//! - [`proposer`]: the leader's side of the sequencer: batches submissions into one Raft entry,
//!   acknowledges them once it is committed and applied, and signs checkpoints over applied state.
//!
//! One Raft entry carries one batch of appends, in the canonical `LogEntry` encoding, with the
//! receive time the leader assigned; applying it is deterministic (dedupe by record id against the
//! applied state), so every replica holds the same entries, the same tree and the same roots.
//! Checkpoints are signed by the leader only, over its applied state, after an entry of its own
//! term was applied (so it never signs a tree smaller than one a former leader signed); they are
//! then replicated as Raft entries so that every replica serves them.

pub mod log_store;
pub mod network;
pub mod node;
pub mod proposer;
pub mod state_machine;

use std::sync::Arc;

use medmesh_core::merkle::Hash;
use serde::{Deserialize, Serialize};

use crate::storage::Placed;

openraft::declare_raft_types!(
    /// The ledger's Raft types.
    pub TypeConfig:
        D = Command,
        R = Applied,
        SnapshotData = tokio::fs::File,
);

/// A Raft node id: the replica's StatefulSet ordinal.
pub type NodeId = u64;
/// The ledger's Raft instance.
pub type Raft = openraft::Raft<TypeConfig>;

/// Path prefix of the peer routes (Raft RPCs and forwarded appends).
pub const PEER_PATH: &str = "/v1/raft";
/// Raft AppendEntries.
pub const APPEND_PATH: &str = "/v1/raft/append";
/// Raft RequestVote.
pub const VOTE_PATH: &str = "/v1/raft/vote";
/// Raft InstallSnapshot (one chunk per request).
pub const SNAPSHOT_PATH: &str = "/v1/raft/snapshot";
/// An append forwarded by a follower: `…/forward` (one record) or `…/forward/batch`.
pub const FORWARD_PATH: &str = "/v1/raft/forward";
/// Header carrying the authenticated submitter of a forwarded append.
pub const SUBMITTER_HEADER: &str = "x-medmesh-submitter";
/// Content type of Raft RPC bodies (postcard).
pub const RPC_CONTENT_TYPE: &str = "application/x-medmesh-raft";

/// What one Raft entry asks the state machine to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Append these entries (canonical `LogEntry` encodings) in order; an entry whose record id
    /// is already in the log is answered as a duplicate or conflict and not stored. An empty
    /// list appends nothing and answers the current size and root.
    Append(Vec<Vec<u8>>),
    /// Store a checkpoint note the leader signed over applied state.
    Checkpoint(String),
}

/// What applying one entry produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Applied {
    /// One result per appended entry, in order (empty for other commands).
    pub placed: Vec<WirePlaced>,
    /// Tree size after the entry.
    pub size: u64,
    /// Root of that tree.
    pub root: [u8; 32],
}

/// [`Placed`] as it crosses the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WirePlaced {
    /// Newly appended: index, leaf hash, receive time.
    Appended(u64, [u8; 32], u64),
    /// Already present: index, leaf hash, receive time of the original.
    Duplicate(u64, [u8; 32], u64),
    /// The record id is used by another record: index, leaf hash.
    Conflict(u64, [u8; 32]),
}

impl From<&Placed> for WirePlaced {
    fn from(p: &Placed) -> Self {
        match *p {
            Placed::Appended {
                index,
                leaf,
                received_us,
            } => Self::Appended(index, leaf.0, received_us),
            Placed::Duplicate {
                index,
                leaf,
                received_us,
            } => Self::Duplicate(index, leaf.0, received_us),
            Placed::Conflict { index, leaf } => Self::Conflict(index, leaf.0),
        }
    }
}

impl From<WirePlaced> for Placed {
    fn from(p: WirePlaced) -> Self {
        match p {
            WirePlaced::Appended(index, leaf, received_us) => Self::Appended {
                index,
                leaf: Hash(leaf),
                received_us,
            },
            WirePlaced::Duplicate(index, leaf, received_us) => Self::Duplicate {
                index,
                leaf: Hash(leaf),
                received_us,
            },
            WirePlaced::Conflict(index, leaf) => Self::Conflict {
                index,
                leaf: Hash(leaf),
            },
        }
    }
}

/// When this replica last accepted entries (or a heartbeat) from a leader, and the commit index
/// that leader announced then: a follower serves only while it hears from a leader and has
/// applied what that leader had committed.
#[derive(Debug, Default)]
pub struct LeaderContact {
    /// Milliseconds since the Unix epoch of the last accepted AppendEntries.
    pub at_ms: std::sync::atomic::AtomicU64,
    /// The leader's commit index announced with it.
    pub commit: std::sync::atomic::AtomicU64,
}

impl LeaderContact {
    /// Records an accepted AppendEntries announcing `commit`.
    pub fn record(&self, commit: Option<u64>) {
        use std::sync::atomic::Ordering;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.at_ms.store(now, Ordering::Relaxed);
        if let Some(c) = commit {
            self.commit.fetch_max(c, Ordering::Relaxed);
        }
    }
}

/// What the API needs of replication.
#[derive(Clone)]
pub struct Replica {
    /// The Raft instance.
    pub raft: Raft,
    /// The last contact with a leader (followers).
    pub contact: Arc<LeaderContact>,
    /// This replica's id.
    pub id: NodeId,
    /// The SPIFFE ID every replica presents: the only one allowed on the peer routes.
    pub peer_id: medmesh_core::SpiffeId,
    /// Forwards appends to the leader.
    pub forwarder: Arc<network::Forwarder>,
    /// Longest an append waits for a leader to be known.
    pub leader_wait: std::time::Duration,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("id", &self.id).finish()
    }
}

/// Where appends go right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This replica leads: submit locally.
    Local,
    /// Forward to the leader at this address.
    Leader(NodeId, String),
}

impl Replica {
    /// The current leader, waiting up to `leader_wait` for one to be elected.
    pub async fn route(&self) -> Option<Route> {
        let mut rx = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + self.leader_wait;
        loop {
            let found = {
                let m = rx.borrow_and_update();
                m.current_leader.and_then(|l| {
                    if l == self.id {
                        Some(Route::Local)
                    } else {
                        m.membership_config
                            .membership()
                            .get_node(&l)
                            .map(|n| Route::Leader(l, n.addr.clone()))
                    }
                })
            };
            if found.is_some() {
                return found;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }
}

/// Serializes a Raft message.
///
/// # Errors
/// When serde refuses the value (never for the ledger's own types).
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(v)
}

/// Deserializes a Raft message; the whole input must be one value.
///
/// # Errors
/// When the bytes are not one such value.
pub fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, postcard::Error> {
    let (v, rest) = postcard::take_from_bytes(b)?;
    if rest.is_empty() {
        Ok(v)
    } else {
        Err(postcard::Error::DeserializeBadEncoding)
    }
}
