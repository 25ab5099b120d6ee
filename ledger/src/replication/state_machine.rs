//! The replicated state machine: committed Raft entries applied to the Merkle log in
//! `ledger.redb`, and snapshots.
//!
//! Each `apply` call is one redb transaction committed with `Durability::Immediate`, holding the
//! entries, their Merkle nodes, the record-id index, replicated checkpoints, and Raft's applied
//! log id and membership: after a crash the state and the applied position agree, and Raft
//! re-applies what follows from its own durable log.
//!
//! A snapshot is the log itself: a header (Raft metadata, tree size, root, latest checkpoint)
//! followed by every entry's canonical bytes. Installing one checks that the entries this replica
//! already holds are the snapshot's first ones (same leaf hashes), appends the rest, and checks
//! the resulting root against the header.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use medmesh_core::merkle::{self, Frontier, Hash};
use medmesh_core::record::LogEntry;
use medmesh_core::{Checkpoint, NoteVerifier};
use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend,
    RaftSnapshotBuilder, StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Applied, Command, NodeId, TypeConfig, WirePlaced, decode, encode};
use crate::metrics::Metrics;
use crate::sequencer::{Head, SignedCheckpoint, SignerStateFile};
use crate::storage::{self, Storage, StorageError as LedgerError};

type SErr = StorageError<NodeId>;

const SNAPSHOT_MAGIC: &[u8] = b"medmesh-ledger-snapshot-v1\n";
const CURRENT: &str = "current.snap";
/// Entries per transaction while installing a snapshot.
const INSTALL_CHUNK: usize = 4096;

fn sm_err(verb: ErrorVerb, e: impl std::fmt::Display) -> SErr {
    StorageIOError::new(
        ErrorSubject::StateMachine,
        verb,
        AnyError::error(e.to_string()),
    )
    .into()
}

fn snap_err(verb: ErrorVerb, e: impl std::fmt::Display) -> SErr {
    StorageIOError::new(
        ErrorSubject::Snapshot(None),
        verb,
        AnyError::error(e.to_string()),
    )
    .into()
}

/// The header of a snapshot file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotHeader {
    meta: SnapshotMeta<NodeId, BasicNode>,
    size: u64,
    root: [u8; 32],
    checkpoint: Option<String>,
}

/// What the state machine shares with the rest of the ledger.
#[derive(Clone)]
pub struct Shared {
    /// Readers' view of progress (size, latest checkpoint).
    pub head: Arc<watch::Sender<Head>>,
    /// The signer state file.
    pub signer_state: Arc<SignerStateFile>,
    /// Checkpoint verifier.
    pub verifier: NoteVerifier,
    /// Log origin.
    pub origin: String,
    /// Metrics.
    pub metrics: Metrics,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

/// The ledger's Raft state machine.
#[derive(Debug)]
pub struct StateMachine {
    storage: Storage,
    frontier: Frontier,
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    snapshot_dir: PathBuf,
    receiving: Option<PathBuf>,
    shared: Shared,
}

impl StateMachine {
    /// The state machine over `storage`, continuing from `frontier`; snapshots live in
    /// `snapshot_dir`.
    ///
    /// # Errors
    /// When Raft's recorded state does not decode or the snapshot directory cannot be made.
    pub fn new(
        storage: Storage,
        frontier: Frontier,
        snapshot_dir: PathBuf,
        shared: Shared,
    ) -> Result<Self, LedgerError> {
        std::fs::create_dir_all(&snapshot_dir).map_err(|e| {
            LedgerError::Inconsistent(format!("cannot create {}: {e}", snapshot_dir.display()))
        })?;
        let (applied, membership) = storage.reader()?.raft_state()?;
        let bad = |what: &str, e: postcard::Error| {
            LedgerError::Inconsistent(format!("recorded Raft {what} does not decode: {e}"))
        };
        let applied = match applied {
            Some(b) => decode(&b).map_err(|e| bad("applied log id", e))?,
            None => None,
        };
        let membership = match membership {
            Some(b) => decode(&b).map_err(|e| bad("membership", e))?,
            None => StoredMembership::default(),
        };
        Ok(Self {
            storage,
            frontier,
            applied,
            membership,
            snapshot_dir,
            receiving: None,
            shared,
        })
    }

    /// Publishes the tree size and, if larger than the published one, a checkpoint already
    /// recorded in the signer state (see [`record`]).
    fn publish(&self, size: u64, signed: Option<Arc<SignedCheckpoint>>) {
        let m = &self.shared.metrics;
        m.tree_size.set(size as i64);
        self.shared.head.send_modify(|h| {
            h.size = size;
            if let Some(s) = signed
                && h.checkpoint
                    .as_ref()
                    .is_none_or(|c| c.checkpoint.size < s.checkpoint.size)
            {
                m.checkpoint_size.set(s.checkpoint.size as i64);
                m.checkpoint_time.set(unix_seconds());
                h.checkpoint = Some(s);
            }
        });
    }
}

/// Records a replicated checkpoint in the signer state before it may be served (the file
/// guards against a rolled-back database); blocking (an fsync), so called on the blocking
/// threads that committed it. None when it cannot be recorded: it is then not served.
fn record(
    shared: &Shared,
    checkpoint: Option<(Checkpoint, String)>,
) -> Option<Arc<SignedCheckpoint>> {
    let (checkpoint, note) = checkpoint?;
    if let Err(e) = shared.signer_state.record(checkpoint.size, &note) {
        tracing::error!(error = %e, path = %shared.signer_state.path().display(), "cannot record signer state; replicated checkpoint not published");
        return None;
    }
    Some(Arc::new(SignedCheckpoint { checkpoint, note }))
}

fn unix_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Everything one `apply` call changes, computed on a blocking thread.
struct ApplyOutcome {
    frontier: Frontier,
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    results: Vec<Applied>,
    checkpoint: Option<Arc<SignedCheckpoint>>,
}

fn apply_blocking(
    storage: &Storage,
    mut frontier: Frontier,
    mut applied: Option<LogId<NodeId>>,
    mut membership: StoredMembership<NodeId, BasicNode>,
    entries: Vec<Entry<TypeConfig>>,
    shared: &Shared,
) -> Result<ApplyOutcome, LedgerError> {
    let txn = storage.begin_write()?;
    let mut results = Vec::with_capacity(entries.len());
    let mut checkpoint: Option<(Checkpoint, String)> = None;
    for e in entries {
        applied = Some(e.log_id);
        let mut placed = Vec::new();
        match e.payload {
            EntryPayload::Blank => {}
            EntryPayload::Membership(m) => {
                membership = StoredMembership::new(Some(e.log_id), m);
            }
            EntryPayload::Normal(Command::Append(list)) => {
                let mut batch = Vec::with_capacity(list.len());
                for (i, bytes) in list.iter().enumerate() {
                    match LogEntry::decode(bytes) {
                        Ok(le) => batch.push((le, bytes.as_slice())),
                        // The leader encodes these itself; a replica never diverges on it.
                        Err(err) => {
                            return Err(LedgerError::CorruptEntry {
                                index: e.log_id.index,
                                reason: format!("Raft entry, appended entry {i}: {err}"),
                            });
                        }
                    }
                }
                let mut out = Vec::with_capacity(batch.len());
                storage::write_batch(&txn, &mut frontier, &batch, &mut out)?;
                placed = out.iter().map(WirePlaced::from).collect();
            }
            EntryPayload::Normal(Command::Checkpoint(note)) => {
                match Checkpoint::open(&note, &shared.verifier, &shared.origin) {
                    Ok(cp) => {
                        if storage::put_checkpoint(&txn, &frontier, &cp, &note)? {
                            if checkpoint.as_ref().is_none_or(|(c, _)| c.size < cp.size) {
                                checkpoint = Some((cp, note));
                            }
                        } else {
                            tracing::error!(
                                size = cp.size,
                                tree = frontier.size(),
                                "replicated checkpoint does not describe this tree; not stored"
                            );
                        }
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "replicated checkpoint does not verify; not stored");
                    }
                }
            }
        }
        results.push(Applied {
            placed,
            size: frontier.size(),
            root: frontier.root().0,
        });
    }
    let applied_b = encode(&applied).map_err(|e| LedgerError::Inconsistent(e.to_string()))?;
    let membership_b = encode(&membership).map_err(|e| LedgerError::Inconsistent(e.to_string()))?;
    storage::put_raft_state(&txn, &applied_b, &membership_b)?;
    txn.commit()?;
    Ok(ApplyOutcome {
        frontier,
        applied,
        membership,
        results,
        checkpoint: record(shared, checkpoint),
    })
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), SErr> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let started = std::time::Instant::now();
        let storage = self.storage.clone();
        let frontier = self.frontier.clone();
        let applied = self.applied;
        let membership = self.membership.clone();
        let shared = self.shared.clone();
        let out = tokio::task::spawn_blocking(move || {
            apply_blocking(&storage, frontier, applied, membership, entries, &shared)
        })
        .await
        .map_err(|e| sm_err(ErrorVerb::Write, e))?
        .map_err(|e| {
            tracing::error!(error = %e, "cannot apply committed Raft entries");
            sm_err(ErrorVerb::Write, e)
        })?;
        self.shared
            .metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        self.frontier = out.frontier;
        self.applied = out.applied;
        self.membership = out.membership;
        self.publish(self.frontier.size(), out.checkpoint);
        Ok(out.results)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
            storage: self.storage.clone(),
            dir: self.snapshot_dir.clone(),
            metrics: self.shared.metrics.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, SErr> {
        // A fresh file per transfer: a write still in flight on an abandoned transfer's handle
        // (tokio completes file writes in the background) must not land in this one.
        if let Some(old) = self.receiving.take() {
            let _ = tokio::fs::remove_file(old).await;
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = self.snapshot_dir.join(format!("receiving-{nanos}.snap"));
        let f = tokio::fs::File::create(&path)
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, format!("{}: {e}", path.display())))?;
        self.receiving = Some(path);
        Ok(Box::new(f))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), SErr> {
        let mut file = *snapshot;
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        file.sync_all()
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        drop(file);
        let path = self
            .receiving
            .take()
            .ok_or_else(|| snap_err(ErrorVerb::Read, "no snapshot is being received"))?;
        let storage = self.storage.clone();
        let frontier = self.frontier.clone();
        let dir = self.snapshot_dir.clone();
        let shared = self.shared.clone();
        let meta = meta.clone();
        let (frontier, header, signed) = tokio::task::spawn_blocking(move || {
            let (f, h) = install_blocking(
                &storage,
                frontier,
                &path,
                &meta,
                &shared.verifier,
                &shared.origin,
            )?;
            std::fs::rename(&path, dir.join(CURRENT))
                .map_err(|e| format!("cannot keep snapshot: {e}"))?;
            let cp = h.checkpoint.as_deref().and_then(|n| {
                Some((
                    Checkpoint::open(n, &shared.verifier, &shared.origin).ok()?,
                    n.to_owned(),
                ))
            });
            let signed = record(&shared, cp);
            Ok::<_, String>((f, h, signed))
        })
        .await
        .map_err(|e| snap_err(ErrorVerb::Write, e))?
        .map_err(|e| {
            tracing::error!(error = %e, "cannot install snapshot");
            snap_err(ErrorVerb::Write, e)
        })?;
        tracing::info!(
            size = header.size,
            last_log = ?header.meta.last_log_id,
            "installed snapshot"
        );
        self.shared
            .metrics
            .raft_snapshots
            .with_label_values(&["installed"])
            .inc();
        self.frontier = frontier;
        self.applied = header.meta.last_log_id;
        self.membership = header.meta.last_membership.clone();
        self.publish(self.frontier.size(), signed);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let path = self.snapshot_dir.join(CURRENT);
        let header = match tokio::task::spawn_blocking({
            let path = path.clone();
            move || read_header_at(&path)
        })
        .await
        .map_err(|e| snap_err(ErrorVerb::Read, e))?
        {
            Ok(Some((h, _))) => h,
            Ok(None) => return Ok(None),
            Err(e) => return Err(snap_err(ErrorVerb::Read, e)),
        };
        let f = tokio::fs::File::open(&path)
            .await
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        Ok(Some(Snapshot {
            meta: header.meta,
            snapshot: Box::new(f),
        }))
    }
}

fn read_header(r: &mut impl Read) -> Result<SnapshotHeader, String> {
    let mut magic = vec![0u8; SNAPSHOT_MAGIC.len()];
    r.read_exact(&mut magic)
        .map_err(|e| format!("snapshot header: {e}"))?;
    if magic != SNAPSHOT_MAGIC {
        return Err("not a medmesh ledger snapshot (bad magic)".into());
    }
    let bytes = read_chunk(r, 1 << 20)?.ok_or("snapshot ends before its header")?;
    decode(&bytes).map_err(|e| format!("snapshot header does not decode: {e}"))
}

fn read_header_at(
    path: &Path,
) -> Result<Option<(SnapshotHeader, BufReader<std::fs::File>)>, String> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut r = BufReader::new(f);
    let h = read_header(&mut r)?;
    Ok(Some((h, r)))
}

/// One length-prefixed chunk (u32 big-endian length), or None at a clean end of input.
fn read_chunk(r: &mut impl Read, max: usize) -> Result<Option<Vec<u8>>, String> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(format!("snapshot chunk of {len} bytes exceeds {max}"));
    }
    let mut b = vec![0u8; len];
    r.read_exact(&mut b)
        .map_err(|e| format!("snapshot truncated: {e}"))?;
    Ok(Some(b))
}

fn write_chunk(w: &mut impl Write, b: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(b.len()).map_err(|_| std::io::Error::other("chunk too large"))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(b)
}

fn install_blocking(
    storage: &Storage,
    mut frontier: Frontier,
    path: &Path,
    meta: &SnapshotMeta<NodeId, BasicNode>,
    verifier: &NoteVerifier,
    origin: &str,
) -> Result<(Frontier, SnapshotHeader), String> {
    let (header, mut r) = read_header_at(path)?.ok_or("received snapshot file is missing")?;
    if header.meta.last_log_id != meta.last_log_id {
        return Err(format!(
            "snapshot file is for {:?}, Raft installs {:?}",
            header.meta.last_log_id, meta.last_log_id
        ));
    }
    let have = frontier.size();
    if header.size < have {
        return Err(format!(
            "snapshot has {} entries but this replica already applied {have}",
            header.size
        ));
    }
    let reader = storage.reader().map_err(|e| e.to_string())?;
    let mut batch = Vec::with_capacity(INSTALL_CHUNK);
    let flush = |batch: &mut Vec<(LogEntry, Vec<u8>)>, frontier: &mut Frontier, last: bool| {
        let txn = storage.begin_write().map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(batch.len());
        storage::write_batch(&txn, frontier, batch, &mut out).map_err(|e| e.to_string())?;
        if last {
            let applied = encode(&header.meta.last_log_id).map_err(|e| e.to_string())?;
            let membership = encode(&header.meta.last_membership).map_err(|e| e.to_string())?;
            storage::put_raft_state(&txn, &applied, &membership).map_err(|e| e.to_string())?;
            if let Some(note) = &header.checkpoint {
                let cp = Checkpoint::open(note, verifier, origin)
                    .map_err(|e| format!("snapshot checkpoint does not verify: {e}"))?;
                if !storage::put_checkpoint(&txn, frontier, &cp, note).map_err(|e| e.to_string())? {
                    return Err("snapshot checkpoint does not describe its entries".to_owned());
                }
            }
        }
        txn.commit().map_err(|e| e.to_string())?;
        batch.clear();
        Ok::<(), String>(())
    };
    for i in 0..header.size {
        let bytes = read_chunk(&mut r, 1 << 20)?
            .ok_or_else(|| format!("snapshot ends after {i} of {} entries", header.size))?;
        if i < have {
            let mine = reader.leaf_hash(i).map_err(|e| e.to_string())?;
            if merkle::leaf_hash(&bytes) != mine {
                return Err(format!(
                    "entry {i} of the snapshot differs from this replica's: the logs diverged"
                ));
            }
            continue;
        }
        let le = LogEntry::decode(&bytes).map_err(|e| format!("snapshot entry {i}: {e}"))?;
        batch.push((le, bytes));
        if batch.len() == INSTALL_CHUNK {
            flush(&mut batch, &mut frontier, false)?;
        }
    }
    drop(reader);
    flush(&mut batch, &mut frontier, true)?;
    if frontier.root() != Hash(header.root) {
        return Err(format!(
            "snapshot root {} differs from the root of its entries {}",
            Hash(header.root),
            frontier.root()
        ));
    }
    Ok((frontier, header))
}

/// Builds snapshots from a read snapshot of the database.
#[derive(Debug)]
pub struct SnapshotBuilder {
    storage: Storage,
    dir: PathBuf,
    metrics: Metrics,
}

fn build_blocking(storage: &Storage, dir: &Path) -> Result<SnapshotHeader, String> {
    let reader = storage.reader().map_err(|e| e.to_string())?;
    let (applied, membership) = reader.raft_state().map_err(|e| e.to_string())?;
    let last_log_id: Option<LogId<NodeId>> = match applied {
        Some(b) => decode(&b).map_err(|e| e.to_string())?,
        None => None,
    };
    let last_membership: StoredMembership<NodeId, BasicNode> = match membership {
        Some(b) => decode(&b).map_err(|e| e.to_string())?,
        None => StoredMembership::default(),
    };
    let size = reader.size();
    let root = reader.root_at(size).map_err(|e| e.to_string())?;
    let checkpoint = reader.latest_checkpoint().map_err(|e| e.to_string())?;
    let snapshot_id = match &last_log_id {
        Some(l) => format!("{}-{}-{size}", l.leader_id.term, l.index),
        None => format!("0-0-{size}"),
    };
    let header = SnapshotHeader {
        meta: SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        },
        size,
        root: root.0,
        checkpoint,
    };
    let tmp = dir.join("building.snap");
    let f = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let io = |e: std::io::Error| format!("{}: {e}", tmp.display());
    w.write_all(SNAPSHOT_MAGIC).map_err(io)?;
    write_chunk(&mut w, &encode(&header).map_err(|e| e.to_string())?).map_err(io)?;
    let mut start = 0;
    while start < size {
        let end = (start + 1000).min(size);
        for (_, bytes) in reader.entries(start, end).map_err(|e| e.to_string())? {
            write_chunk(&mut w, &bytes).map_err(io)?;
        }
        start = end;
    }
    let f = w.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, dir.join(CURRENT)).map_err(io)?;
    Ok(header)
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let storage = self.storage.clone();
        let dir = self.dir.clone();
        let header = tokio::task::spawn_blocking(move || build_blocking(&storage, &dir))
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))?
            .map_err(|e| {
                tracing::error!(error = %e, "cannot build snapshot");
                snap_err(ErrorVerb::Write, e)
            })?;
        tracing::info!(size = header.size, id = %header.meta.snapshot_id, "built snapshot");
        self.metrics
            .raft_snapshots
            .with_label_values(&["built"])
            .inc();
        let f = tokio::fs::File::open(self.dir.join(CURRENT))
            .await
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        Ok(Snapshot {
            meta: header.meta,
            snapshot: Box::new(f),
        })
    }
}
