//! The ledger's redb file: entries, Merkle nodes, checkpoints and search indexes.
//!
//! Layout and invariants are documented in `docs/ledger-format.md`. In short: the `nodes` table
//! holds every complete, aligned subtree hash (level 0 = leaf hashes), so a proof is `O(log n)`
//! point reads; `meta.tree_size` is written in the same transaction as the entries and nodes it
//! counts, so a crash leaves either all of a batch or none of it.
//!
//! Two redb files: `ledger.redb` holds what appends must make durable before they are
//! acknowledged (entries, nodes, record ids, checkpoints; made durable by its own commit or by
//! the write-ahead log `ledger.wal`, see `crate::wal`); `index.redb` holds the search indexes, derived from
//! the entries by the indexer thread off the acknowledgement path. A random-key insert costs
//! several times a sequential one in a B-tree and the search indexes are keyed by hashes, so
//! keeping them out of the acknowledging commit is what lets the writer keep up. The index file
//! records how far it has indexed and is rebuilt from the entries when it is missing, damaged or
//! ahead of the log.

use std::path::Path;

use crate::wal;
use medmesh_core::merkle::{self, Frontier, Hash, NodeSource};
use medmesh_core::record::{AuditRecord, LogEntry};
use medmesh_core::{Checkpoint, NoteSigner, NoteVerifier};
use redb::{
    Database, MultimapTableDefinition, ReadOnlyTable, ReadTransaction, ReadableDatabase,
    ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction,
};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const NODES: TableDefinition<u64, [u8; 32]> = TableDefinition::new("tree_nodes");
/// Format 1's node table, keyed by level then index; migrated to [`NODES`] on open.
const V1_NODES: TableDefinition<u64, [u8; 32]> = TableDefinition::new("nodes");
const RECORD_IDS: TableDefinition<[u8; 16], u64> = TableDefinition::new("record_ids");
const CHECKPOINTS: TableDefinition<u64, &str> = TableDefinition::new("checkpoints");
/// Replicated ledgers: Raft's last applied log id and membership, written in the same
/// transaction as the entries they account for (values are opaque to this module).
const RAFT_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_state");
const RAFT_APPLIED: &str = "applied";
const RAFT_MEMBERSHIP: &str = "membership";

// In index.redb.
const INDEX_META: TableDefinition<&str, u64> = TableDefinition::new("index_meta");
// Leaf hashes, content hashes and UIDs are random 32-byte keys: each is indexed as one 16-byte
// row of a plain table (`hashed_key`: the entry's epoch, then the key's first 6 bytes and the
// index within the epoch), found by one range scan per epoch (`hashed_hits`); a reader checks
// each hit's full key against the entry (a shared prefix is rare, and only costs that check).
// Rows of 16 bytes instead of a multimap's per-key value sets make a random insert cost 2.4
// instead of 5.5 us (redb 4.6, 720,000 entries). CIDs keep their whole multihash (its first bytes
// are the hash code and length); identities are few keys with long, ordered value lists, which a
// multimap stores best.
const LEAF_INDEX: TableDefinition<(u64, u64), ()> = TableDefinition::new("leaf_epochs");
const BY_SHA256: TableDefinition<(u64, u64), ()> = TableDefinition::new("sha256_epochs");
const BY_CID: TableDefinition<(&[u8], u64), ()> = TableDefinition::new("cid_entries");
const BY_IDENTITY: MultimapTableDefinition<&str, u64> = MultimapTableDefinition::new("by_identity");
const BY_UID: TableDefinition<(u64, u64), ()> = TableDefinition::new("uid_epochs");
/// Tables of earlier index formats, dropped when such an index is rebuilt: format 1's leaf
/// table and multimaps, format 2's whole-key tables, format 3's (prefix, index) tables.
const OLD_LEAF_INDEX: TableDefinition<[u8; 32], u64> = TableDefinition::new("leaf_index");
const V1_BY_SHA256: MultimapTableDefinition<[u8; 32], u64> =
    MultimapTableDefinition::new("by_sha256");
const V1_BY_CID: MultimapTableDefinition<&[u8], u64> = MultimapTableDefinition::new("by_cid");
const V1_BY_UID: MultimapTableDefinition<[u8; 32], u64> = MultimapTableDefinition::new("by_uid");
const V2_BY_SHA256: TableDefinition<([u8; 32], u64), ()> = TableDefinition::new("sha256_entries");
const V2_BY_UID: TableDefinition<([u8; 32], u64), ()> = TableDefinition::new("uid_entries");
const V3_LEAF_INDEX: TableDefinition<(u64, u64), ()> = TableDefinition::new("leaf_prefixes");
const V3_BY_SHA256: TableDefinition<(u64, u64), ()> = TableDefinition::new("sha256_prefixes");
const V3_BY_UID: TableDefinition<(u64, u64), ()> = TableDefinition::new("uid_prefixes");

/// The index key of a random 32-byte value: its first 8 bytes.
fn prefix(h: &[u8; 32]) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&h[..8]);
    u64::from_be_bytes(b)
}

/// Epochs of the hash-keyed index tables, as powers of two: 2^16 entries at level 0, 2^20 at
/// level 1. Rows of one epoch sort together (`hashed_key`), so an index transaction's random
/// inserts land among the pages of the level 0 epoch being filled (at most 2^16 rows, about 360
/// pages per table) instead of all over a table that grows with the log. A lookup costs one range
/// scan per epoch; once the 16 level 0 epochs of a level 1 epoch are complete, `compact_index`
/// moves their rows there in one sorted pass, so a lookup scans at most 16 level 0 epochs and one
/// level 1 epoch per 2^20 entries.
const LEVEL_BITS: [u32; 2] = [16, 20];
/// In `index_meta`: rows of entries below this bound (whole level 1 epochs) are at level 1.
const META_LEVEL_1: &str = "level_1_upto";

/// The index bits below the epoch at `level`.
fn in_epoch(level: usize) -> u64 {
    (1 << LEVEL_BITS[level]) - 1
}

/// The row of entry `index` at `level` under a hashed key whose first 8 bytes are `prefix`:
/// (level in the top byte, then the epoch; the prefix's bits above the epoch's, then the index
/// within the epoch).
fn hashed_key(level: usize, prefix: u64, index: u64) -> (u64, u64) {
    (
        ((level as u64) << 56) | (index >> LEVEL_BITS[level]),
        (prefix & !in_epoch(level)) | (index & in_epoch(level)),
    )
}

/// The indexes below `size` of rows in `t` under `prefix`, ascending (candidates: the caller
/// checks the whole key), when entries below `level_1` are at level 1.
fn hashed_hits<'t>(
    t: &'t impl ReadableTable<(u64, u64), ()>,
    prefix: u64,
    size: u64,
    level_1: u64,
) -> impl Iterator<Item = Result<u64, redb::StorageError>> + 't {
    let spans = [(1, 0, level_1.min(size)), (0, level_1, size)];
    spans
        .into_iter()
        .filter(|&(_, lo, hi)| lo < hi)
        .flat_map(move |(level, lo, hi)| {
            let (bits, mask) = (LEVEL_BITS[level], in_epoch(level));
            let head = prefix & !mask;
            ((lo >> bits)..=((hi - 1) >> bits)).flat_map(move |epoch| {
                let at = ((level as u64) << 56) | epoch;
                let rows: Box<dyn Iterator<Item = _>> =
                    match t.range((at, head)..=(at, head | mask)) {
                        Ok(rows) => Box::new(rows.map(move |row| {
                            row.map(|(k, _)| (epoch << bits) | (k.value().1 & mask))
                        })),
                        Err(e) => Box::new(std::iter::once(Err(e))),
                    };
                rows
            })
        })
        .filter(move |i| i.as_ref().map_or(true, |&i| i < size))
}

const META_TREE_SIZE: &str = "tree_size";
const META_FORMAT: &str = "format_version";
const META_INDEXED: &str = "indexed_size";
/// While a format 1 file is moved to format 2: leaves `0..migrated_leaves` have their nodes moved.
const META_MIGRATED: &str = "migrated_leaves";
/// Leaves whose nodes are moved per transaction (about 2 s each): a restart during a long move,
/// such as a pod killed by its probes, resumes where it stopped instead of starting again.
const MIGRATION_CHUNK: u64 = 1 << 20;
/// Layout of `index.redb` (absent: format 1). Another format is rebuilt from the log.
const META_INDEX_FORMAT: &str = "index_format";
const INDEX_FORMAT: u64 = 4;
const FORMAT_VERSION: u64 = 2;

/// Key of node `(level, index)` in the node table: its position in post-order, the order in
/// which `Frontier::push` completes nodes. Each commit's nodes are therefore appended at the end
/// of the table, onto one or two B-tree pages, instead of onto one page per level.
fn node_key(level: u8, index: u64) -> u64 {
    // The subtree's last leaf sits at `2·last − popcount(last)`; the nodes it completes follow
    // it, one per level.
    let last = ((index + 1) << level) - 1;
    2 * last - u64::from(last.count_ones()) + u64::from(level)
}

/// Key of node `(level, index)` in format 1's node table.
fn v1_node_key(level: u8, index: u64) -> u64 {
    (u64::from(level) << 56) | index
}

/// What went wrong in the storage layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// redb failed.
    #[error("ledger database: {0}")]
    Db(#[from] redb::Error),
    /// A node a proof needs is absent: the database was altered or truncated.
    #[error(
        "ledger database is missing Merkle node (level {level}, index {index}) for tree size {size}"
    )]
    MissingNode {
        /// Node level.
        level: u8,
        /// Node index.
        index: u64,
        /// Tree size being served.
        size: u64,
    },
    /// The database contradicts its own signed checkpoint or the signer's state file.
    #[error("ledger database is inconsistent: {0}")]
    Inconsistent(String),
    /// The database was written by an unknown format version.
    #[error("ledger database format version {0} is not supported (this build reads 1 and 2)")]
    Format(u64),
    /// A stored entry does not decode.
    #[error("stored entry {index} is corrupt: {reason}")]
    CorruptEntry {
        /// Entry index.
        index: u64,
        /// Why.
        reason: String,
    },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self { Self::Db(e.into()) }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// The tree state the writer continues from.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// The right edge of the tree.
    pub frontier: Frontier,
    /// The latest signed checkpoint, if any.
    pub checkpoint: Option<(Checkpoint, String)>,
}

/// The open database.
#[derive(Clone)]
pub struct Storage {
    db: std::sync::Arc<Database>,
    index: std::sync::Arc<Database>,
    /// Readers see at most this many entries: the writer commits a batch to redb before its
    /// write-ahead log frame is durable, and readers must not see (or sign, or index) entries a
    /// crash could take back. `u64::MAX` when every commit is durable.
    visible: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Storage")
    }
}

impl Storage {
    /// Opens (or creates) the database and recovers the tree state, checking that the latest
    /// checkpoint matches the tree and was signed by `verifier` for `origin`.
    ///
    /// # Errors
    /// When the file cannot be opened, has another format, or contradicts its checkpoint.
    pub fn open(
        path: &Path,
        verifier: &NoteVerifier,
        origin: &str,
    ) -> Result<(Self, Recovered), StorageError> {
        let db = Database::builder().set_cache_size(256 << 20).create(path)?;
        migrate_v1_nodes(&db, MIGRATION_CHUNK)?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let format = meta.get(META_FORMAT)?.map(|v| v.value());
            match format {
                None => {
                    meta.insert(META_FORMAT, FORMAT_VERSION)?;
                    meta.insert(META_TREE_SIZE, 0)?;
                }
                Some(FORMAT_VERSION) => {}
                Some(v) => return Err(StorageError::Format(v)),
            }
            // Create every table so readers never meet a missing one.
            txn.open_table(ENTRIES)?;
            txn.open_table(NODES)?;
            txn.open_table(RECORD_IDS)?;
            txn.open_table(CHECKPOINTS)?;
            txn.open_table(RAFT_STATE)?;
        }
        txn.commit()?;
        let index = open_index(&path.with_file_name("index.redb"))?;
        let storage = Self {
            db: std::sync::Arc::new(db),
            index: std::sync::Arc::new(index),
            visible: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX)),
        };
        storage.replay_wal(&wal_path(path))?;
        let reader = storage.reader()?;
        let size = reader.size();
        if reader.indexed > size {
            // The index describes a longer log than this one (the log was replaced): rebuild.
            tracing::warn!(
                indexed = reader.indexed,
                size,
                "search index is ahead of the log; rebuilding it"
            );
            drop(reader);
            let txn = storage.index.begin_write()?;
            reset_index(&txn)?;
            txn.commit()?;
            return Self::open_checked(storage, verifier, origin);
        }
        drop(reader);
        Self::open_checked(storage, verifier, origin)
    }

    fn open_checked(
        storage: Self,
        verifier: &NoteVerifier,
        origin: &str,
    ) -> Result<(Self, Recovered), StorageError> {
        let reader = storage.reader()?;
        let size = reader.size();
        let frontier = Frontier::load(&reader, size)?;
        let checkpoint = match reader.latest_checkpoint()? {
            None => None,
            Some(note) => {
                let cp = Checkpoint::open(&note, verifier, origin).map_err(|e| {
                    StorageError::Inconsistent(format!(
                        "latest stored checkpoint does not verify: {e}"
                    ))
                })?;
                if cp.size > size {
                    return Err(StorageError::Inconsistent(format!(
                        "latest checkpoint has size {} but the tree has only {size} entries",
                        cp.size
                    )));
                }
                let root = merkle::root_at(&reader, cp.size)?;
                if root != cp.root {
                    return Err(StorageError::Inconsistent(format!(
                        "Merkle nodes give root {root} at size {}, but the signed checkpoint says {}",
                        cp.size, cp.root
                    )));
                }
                // The writer continues from the frontier's peaks, which are other nodes than
                // those of the checkpoint's root once the tree has grown past it: check that
                // what will be signed next extends what was signed.
                let proof = reader.consistency_proof(cp.size, size)?;
                merkle::verify_consistency(cp.size, size, &cp.root, &frontier.root(), &proof)
                    .map_err(|e| {
                        StorageError::Inconsistent(format!(
                            "the tree of {size} entries does not extend the signed checkpoint of size {}: {e}",
                            cp.size
                        ))
                    })?;
                Some((cp, note))
            }
        };
        drop(reader);
        Ok((
            storage,
            Recovered {
                frontier,
                checkpoint,
            },
        ))
    }

    /// Appends again the entries of the write-ahead log at `path` that the database lost in a
    /// crash (they were acknowledged once their frame was synced), in one durable commit.
    fn replay_wal(&self, path: &Path) -> Result<(), StorageError> {
        let frames = wal::read(path).map_err(|e| {
            StorageError::Inconsistent(format!(
                "cannot read the write-ahead log {}: {e}",
                path.display()
            ))
        })?;
        let reader = self.reader()?;
        let size = reader.size();
        let lost: Vec<wal::Frame> = frames.into_iter().filter(|f| f.end() > size).collect();
        let Some(first) = lost.first() else {
            return Ok(());
        };
        if first.first != size {
            return Err(StorageError::Inconsistent(format!(
                "the write-ahead log {} holds entries {}..{} but the database has {size} entries: \
                 the database was rolled back or replaced by an older copy",
                path.display(),
                first.first,
                lost.last().map_or(first.end(), wal::Frame::end),
            )));
        }
        let mut frontier = Frontier::load(&reader, size)?;
        drop(reader);
        let mut entries = Vec::new();
        for (i, bytes) in lost.into_iter().flat_map(|f| f.entries).enumerate() {
            let index = size + i as u64;
            let entry = LogEntry::decode(&bytes).map_err(|e| StorageError::CorruptEntry {
                index,
                reason: format!("in the write-ahead log: {e}"),
            })?;
            entries.push((entry, bytes));
        }
        let txn = self.begin_write()?;
        let mut tables = BatchTables::open(&txn)?;
        let mut placed = Vec::with_capacity(entries.len());
        tables.place(&mut frontier, &entries, &mut placed, None)?;
        if let Some(p) = placed
            .iter()
            .find(|p| !matches!(p, Placed::Appended { .. }))
        {
            return Err(StorageError::Inconsistent(format!(
                "the write-ahead log {} repeats a record id already in the log ({p:?})",
                path.display()
            )));
        }
        tables.finish(&txn, &frontier)?;
        txn.commit()?;
        tracing::warn!(
            entries = entries.len(),
            from = size,
            "appended again the acknowledged entries the database lost, from its write-ahead log"
        );
        Ok(())
    }

    /// Caps what readers see at `size` entries (the writer's durable size when it starts
    /// committing ahead of its write-ahead log).
    pub(crate) fn hold_visible(&self, size: u64) {
        self.visible
            .store(size, std::sync::atomic::Ordering::Release);
    }

    /// Lets readers see `size` entries once they are durable (never fewer than before).
    pub(crate) fn publish(&self, size: u64) {
        self.visible
            .fetch_max(size, std::sync::atomic::Ordering::AcqRel);
    }

    /// A consistent read snapshot.
    ///
    /// # Errors
    /// When redb cannot open the transaction or tables.
    pub fn reader(&self) -> Result<Reader, StorageError> {
        let visible = self.visible.load(std::sync::atomic::Ordering::Acquire);
        let txn = self.db.begin_read()?;
        let size = txn
            .open_table(META)?
            .get(META_TREE_SIZE)?
            .map(|v| v.value())
            .unwrap_or(0)
            .min(visible);
        let nodes = txn.open_table(NODES)?;
        let index_txn = self.index.begin_read()?;
        let (indexed, level_1) = {
            let meta = index_txn.open_table(INDEX_META)?;
            let get = |k| -> Result<u64, StorageError> {
                Ok(meta.get(k)?.map(|v| v.value()).unwrap_or(0))
            };
            (get(META_INDEXED)?, get(META_LEVEL_1)?)
        };
        Ok(Reader {
            txn,
            nodes,
            size,
            index_txn,
            indexed,
            level_1,
        })
    }

    /// How many entries the search indexes cover.
    ///
    /// # Errors
    /// On a database error.
    pub fn indexed_size(&self) -> Result<u64, StorageError> {
        let txn = self.index.begin_read()?;
        let meta = txn.open_table(INDEX_META)?;
        Ok(meta.get(META_INDEXED)?.map(|v| v.value()).unwrap_or(0))
    }

    pub(crate) fn begin_write(&self) -> Result<WriteTransaction, StorageError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)?;
        Ok(txn)
    }

    /// A write transaction whose commit does not sync: durable only through the write-ahead log
    /// frame of its entries, or the next durable commit.
    pub(crate) fn begin_write_ahead(&self) -> Result<WriteTransaction, StorageError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::None)?;
        Ok(txn)
    }
}

/// Where the write-ahead log of the database at `db_path` is.
pub(crate) fn wal_path(db_path: &Path) -> std::path::PathBuf {
    db_path.with_extension("wal")
}

/// Raft's applied log id and membership as stored (encoded by the replication module).
pub type RaftStateBytes = (Option<Vec<u8>>, Option<Vec<u8>>);

/// Records Raft's applied log id and membership in `txn`, next to the state they describe.
///
/// # Errors
/// On a database error.
pub(crate) fn put_raft_state(
    txn: &WriteTransaction,
    applied: &[u8],
    membership: &[u8],
) -> Result<(), StorageError> {
    let mut t = txn.open_table(RAFT_STATE)?;
    t.insert(RAFT_APPLIED, applied)?;
    t.insert(RAFT_MEMBERSHIP, membership)?;
    Ok(())
}

/// Stores a checkpoint note signed elsewhere (by the Raft leader), after checking that it
/// describes this tree: same root at its size. Returns false, storing nothing, when it does not.
///
/// # Errors
/// On a database error.
pub(crate) fn put_checkpoint(
    txn: &WriteTransaction,
    frontier: &Frontier,
    cp: &Checkpoint,
    note: &str,
) -> Result<bool, StorageError> {
    if cp.size > frontier.size() {
        return Ok(false);
    }
    let root = if cp.size == frontier.size() {
        frontier.root()
    } else {
        let nodes = txn.open_table(NODES)?;
        merkle::root_at(&TxnNodes(&nodes, frontier.size()), cp.size)?
    };
    if root != cp.root {
        return Ok(false);
    }
    txn.open_table(CHECKPOINTS)?.insert(cp.size, note)?;
    Ok(true)
}

/// The nodes table of a write transaction, as a proof source (sees the transaction's own writes).
struct TxnNodes<'a, 'txn>(&'a redb::Table<'txn, u64, [u8; 32]>, u64);

impl NodeSource for TxnNodes<'_, '_> {
    type Error = StorageError;
    fn node(&self, level: u8, index: u64) -> Result<Hash, StorageError> {
        match self.0.get(node_key(level, index))? {
            Some(v) => Ok(Hash(v.value())),
            None => Err(StorageError::MissingNode {
                level,
                index,
                size: self.1,
            }),
        }
    }
}

/// Which index a search uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SearchKey {
    /// SHA-256 of the transferred bytes.
    Sha256(Hash),
    /// A CID's multihash (code, length, digest).
    Cid(Vec<u8>),
    /// A workload identity: source, destination or submitter.
    Identity(String),
    /// A keyed hash of a Study, Series or SOP Instance UID.
    Uid([u8; 32]),
}

/// A read snapshot of the ledger.
pub struct Reader {
    txn: ReadTransaction,
    nodes: ReadOnlyTable<u64, [u8; 32]>,
    size: u64,
    index_txn: ReadTransaction,
    indexed: u64,
    /// Hash-keyed index rows of entries below this are at level 1 (see `LEVEL_BITS`).
    level_1: u64,
}

impl Reader {
    /// Tree size in this snapshot.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Entries the search indexes cover in this snapshot.
    pub fn indexed(&self) -> u64 {
        self.indexed.min(self.size)
    }

    /// The encoded entry at `index`, if present.
    ///
    /// # Errors
    /// On a database error.
    pub fn entry(&self, index: u64) -> Result<Option<Vec<u8>>, StorageError> {
        if index >= self.size {
            return Ok(None);
        }
        let t = self.txn.open_table(ENTRIES)?;
        Ok(t.get(index)?.map(|v| v.value().to_vec()))
    }

    /// Entries `[start, end)` clipped to the tree.
    ///
    /// # Errors
    /// On a database error.
    pub fn entries(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let end = end.min(self.size);
        if start >= end {
            return Ok(Vec::new());
        }
        let t = self.txn.open_table(ENTRIES)?;
        let mut out = Vec::with_capacity((end - start) as usize);
        for item in t.range(start..end)? {
            let (k, v) = item?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// The stored leaf hash at `index` (node level 0).
    ///
    /// # Errors
    /// On a database error or a missing node.
    pub fn leaf_hash(&self, index: u64) -> Result<Hash, StorageError> {
        self.node(0, index)
    }

    /// The first index whose leaf hash is `leaf`.
    ///
    /// # Errors
    /// On a database error.
    pub fn index_of_leaf(&self, leaf: &Hash) -> Result<Option<u64>, StorageError> {
        let t = self.index_txn.open_table(LEAF_INDEX)?;
        for index in hashed_hits(&t, prefix(&leaf.0), self.indexed(), self.level_1) {
            let index = index?;
            if self.leaf_hash(index)? == *leaf {
                return Ok(Some(index));
            }
        }
        Ok(None)
    }

    /// The latest signed checkpoint note.
    ///
    /// # Errors
    /// On a database error.
    pub fn latest_checkpoint(&self) -> Result<Option<String>, StorageError> {
        let t = self.txn.open_table(CHECKPOINTS)?;
        Ok(t.last()?.map(|(_, v)| v.value().to_owned()))
    }

    /// Raft's applied log id and membership in this snapshot (opaque bytes), if recorded.
    ///
    /// # Errors
    /// On a database error.
    pub fn raft_state(&self) -> Result<RaftStateBytes, StorageError> {
        let t = self.txn.open_table(RAFT_STATE)?;
        let get = |k| -> Result<Option<Vec<u8>>, StorageError> {
            Ok(t.get(k)?.map(|v| v.value().to_vec()))
        };
        Ok((get(RAFT_APPLIED)?, get(RAFT_MEMBERSHIP)?))
    }

    /// The stored checkpoint note for exactly `size`, if one was signed.
    ///
    /// # Errors
    /// On a database error.
    pub fn checkpoint_at(&self, size: u64) -> Result<Option<String>, StorageError> {
        let t = self.txn.open_table(CHECKPOINTS)?;
        Ok(t.get(size)?.map(|v| v.value().to_owned()))
    }

    /// Indexes below `size` of entries matching `key`, at most `limit` (ascending), and whether
    /// more exist below `size`.
    ///
    /// # Errors
    /// On a database error.
    pub fn search(
        &self,
        key: &SearchKey,
        size: u64,
        limit: usize,
    ) -> Result<(Vec<u64>, bool), StorageError> {
        let size = size.min(self.indexed());
        /// The first `limit` indexes below `size` among `values` that `keep` accepts, and
        /// whether more follow.
        fn first(
            values: impl Iterator<Item = Result<u64, redb::StorageError>>,
            size: u64,
            limit: usize,
            mut keep: impl FnMut(u64) -> Result<bool, StorageError>,
        ) -> Result<(Vec<u64>, bool), StorageError> {
            let mut out = Vec::new();
            for v in values {
                let i = v?;
                if i >= size || !keep(i)? {
                    continue;
                }
                if out.len() == limit {
                    return Ok((out, true));
                }
                out.push(i);
            }
            Ok((out, false))
        }
        // A prefix row's entry, when it decodes, for checking the whole key.
        let entries = self.txn.open_table(ENTRIES)?;
        let record = |i: u64| -> Result<Option<medmesh_core::AuditRecord>, StorageError> {
            Ok(entries
                .get(i)?
                .and_then(|v| LogEntry::decode(v.value()).ok())
                .map(|e| e.record))
        };
        // Every arm is clipped to the same `size`: hits beyond it have no proof yet. The tables
        // keyed (key, index) hold a key's indexes in order, so the range stops at `size`; the
        // hashed ones, epoch by epoch.
        match key {
            SearchKey::Sha256(h) => {
                let t = self.index_txn.open_table(BY_SHA256)?;
                first(
                    hashed_hits(&t, prefix(&h.0), size, self.level_1),
                    size,
                    limit,
                    |i| Ok(record(i)?.is_some_and(|r| r.content_sha256 == Some(*h))),
                )
            }
            SearchKey::Cid(c) => {
                let t = self.index_txn.open_table(BY_CID)?;
                first(
                    t.range((c.as_slice(), 0)..(c.as_slice(), size))?
                        .map(|r| r.map(|(k, _)| k.value().1)),
                    size,
                    limit,
                    |_| Ok(true),
                )
            }
            SearchKey::Identity(s) => {
                let t = self.index_txn.open_multimap_table(BY_IDENTITY)?;
                first(
                    t.get(s.as_str())?.map(|r| r.map(|v| v.value())),
                    size,
                    limit,
                    |_| Ok(true),
                )
            }
            SearchKey::Uid(u) => {
                let t = self.index_txn.open_table(BY_UID)?;
                first(
                    hashed_hits(&t, prefix(u), size, self.level_1),
                    size,
                    limit,
                    |i| {
                        Ok(record(i)?.is_some_and(|r| {
                            [r.study_uid, r.series_uid, r.sop_instance_uid]
                                .into_iter()
                                .flatten()
                                .any(|k| k.0 == *u)
                        }))
                    },
                )
            }
        }
    }

    /// Inclusion proof of `index` in the tree of `size` leaves.
    ///
    /// # Errors
    /// When a node is missing or unreadable. Callers check `index < size <= self.size()`.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, StorageError> {
        merkle::inclusion_proof(self, index, size).map_err(|e| {
            e.unwrap_or_else(|| {
                StorageError::Inconsistent(format!("index {index} outside size {size}"))
            })
        })
    }

    /// Consistency proof from `old` to `new`.
    ///
    /// # Errors
    /// When a node is missing or unreadable. Callers check `old <= new <= self.size()`.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, StorageError> {
        merkle::consistency_proof(self, old, new).map_err(|e| {
            e.unwrap_or_else(|| StorageError::Inconsistent(format!("size {old} above {new}")))
        })
    }

    /// Root of the first `size` leaves.
    ///
    /// # Errors
    /// When a node is missing or unreadable.
    pub fn root_at(&self, size: u64) -> Result<Hash, StorageError> {
        merkle::root_at(self, size)
    }
}

impl NodeSource for Reader {
    type Error = StorageError;
    fn node(&self, level: u8, index: u64) -> Result<Hash, StorageError> {
        match self.nodes.get(node_key(level, index))? {
            Some(v) => Ok(Hash(v.value())),
            None => Err(StorageError::MissingNode {
                level,
                index,
                size: self.size,
            }),
        }
    }
}

/// One entry to append, with what the server vouches for.
#[derive(Debug, Clone)]
pub struct NewEntry {
    /// The record as submitted.
    pub record: AuditRecord,
    /// The authenticated submitter.
    pub submitter: medmesh_core::SpiffeId,
    /// Server receive time (µs since the epoch).
    pub received_us: u64,
}

/// The result of one entry in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    /// Newly appended.
    Appended {
        /// Its index.
        index: u64,
        /// Its leaf hash.
        leaf: Hash,
        /// Receive time stored in the entry.
        received_us: u64,
    },
    /// Already present with the same record id and content: nothing written.
    Duplicate {
        /// Index of the original.
        index: u64,
        /// Its leaf hash.
        leaf: Hash,
        /// Receive time stored in the original entry.
        received_us: u64,
    },
    /// Record id already used for a different record or by another submitter: not stored.
    Conflict {
        /// Index of the record holding that id.
        index: u64,
        /// Its leaf hash.
        leaf: Hash,
    },
}

/// An entry [`write_batch`] places: what the record-id dedupe compares, and its canonical entry
/// bytes (made only when the entry is new).
pub(crate) trait ToPlace {
    /// The record.
    fn record(&self) -> &AuditRecord;
    /// The authenticated submitter.
    fn submitter(&self) -> &medmesh_core::SpiffeId;
    /// Receive time (µs since the epoch).
    fn received_us(&self) -> u64;
    /// Canonical entry v1 bytes.
    fn bytes(&self) -> std::borrow::Cow<'_, [u8]>;
}

impl ToPlace for NewEntry {
    fn record(&self) -> &AuditRecord {
        &self.record
    }
    fn submitter(&self) -> &medmesh_core::SpiffeId {
        &self.submitter
    }
    fn received_us(&self) -> u64 {
        self.received_us
    }
    fn bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        LogEntry::encode_parts(self.received_us, &self.submitter, &self.record).into()
    }
}

/// An entry already in canonical form (a replicated batch, a snapshot), with its decoding:
/// stored as received, never re-encoded.
impl<B: AsRef<[u8]>> ToPlace for (LogEntry, B) {
    fn record(&self) -> &AuditRecord {
        &self.0.record
    }
    fn submitter(&self) -> &medmesh_core::SpiffeId {
        &self.0.submitter
    }
    fn received_us(&self) -> u64 {
        self.0.received_us
    }
    fn bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        self.1.as_ref().into()
    }
}

/// The tables a write transaction appends entries to, opened once for all the batches it
/// holds (a commit of single appends holds one batch per request).
pub(crate) struct BatchTables<'t> {
    entries: redb::Table<'t, u64, &'static [u8]>,
    nodes: redb::Table<'t, u64, [u8; 32]>,
    ids: redb::Table<'t, [u8; 16], u64>,
}

impl<'t> BatchTables<'t> {
    /// Opens the tables in `txn`.
    ///
    /// # Errors
    /// On a database error.
    pub(crate) fn open(txn: &'t WriteTransaction) -> Result<Self, StorageError> {
        Ok(Self {
            entries: txn.open_table(ENTRIES)?,
            nodes: txn.open_table(NODES)?,
            ids: txn.open_table(RECORD_IDS)?,
        })
    }

    /// Writes one batch: entries, nodes and record ids. Advances `frontier` in place; the
    /// caller restores it if the transaction does not commit.
    ///
    /// # Errors
    /// On a database error; the transaction must then be dropped.
    pub(crate) fn place<E: ToPlace>(
        &mut self,
        frontier: &mut Frontier,
        batch: &[E],
        out: &mut Vec<Placed>,
        mut frame: Option<&mut wal::FrameBuilder>,
    ) -> Result<(), StorageError> {
        for e in batch {
            let id = e.record().record_id;
            // A write transaction reads its own inserts: ids earlier in this batch are found too.
            if let Some(index) = self.ids.get(id.0)?.map(|v| v.value()) {
                let stored = self
                    .entries
                    .get(index)?
                    .map(|v| LogEntry::decode(v.value()))
                    .transpose()
                    .map_err(|err| StorageError::CorruptEntry {
                        index,
                        reason: err.to_string(),
                    })?;
                let leaf = self
                    .nodes
                    .get(node_key(0, index))?
                    .map(|v| Hash(v.value()))
                    .ok_or(StorageError::MissingNode {
                        level: 0,
                        index,
                        size: frontier.size(),
                    })?;
                out.push(match stored {
                    Some(s) if s.record == *e.record() && s.submitter == *e.submitter() => {
                        Placed::Duplicate {
                            index,
                            leaf,
                            received_us: s.received_us,
                        }
                    }
                    _ => Placed::Conflict { index, leaf },
                });
                continue;
            }

            let index = frontier.size();
            let bytes = e.bytes();
            let leaf = merkle::leaf_hash(&bytes);
            self.entries.insert(index, bytes.as_ref())?;
            let mut err = None;
            frontier.push(leaf, |n| {
                if err.is_none()
                    && let Err(e) = self.nodes.insert(node_key(n.level, n.index), n.hash.0)
                {
                    err = Some(e);
                }
            });
            if let Some(e) = err {
                return Err(e.into());
            }
            self.ids.insert(id.0, index)?;
            if let Some(f) = frame.as_deref_mut() {
                f.push(&bytes);
            }
            out.push(Placed::Appended {
                index,
                leaf,
                received_us: e.received_us(),
            });
        }
        Ok(())
    }

    /// Closes the tables and records the new tree size in `txn`.
    ///
    /// # Errors
    /// On a database error.
    pub(crate) fn finish(
        self,
        txn: &WriteTransaction,
        frontier: &Frontier,
    ) -> Result<(), StorageError> {
        drop(self);
        txn.open_table(META)?
            .insert(META_TREE_SIZE, frontier.size())?;
        Ok(())
    }
}

/// Writes one batch into `txn`: entries, nodes, indexes and the new tree size. Advances
/// `frontier` in place; the caller restores it if the transaction does not commit.
///
/// # Errors
/// On a database error; the transaction must then be dropped.
pub(crate) fn write_batch<E: ToPlace>(
    txn: &WriteTransaction,
    frontier: &mut Frontier,
    batch: &[E],
    out: &mut Vec<Placed>,
) -> Result<(), StorageError> {
    let mut tables = BatchTables::open(txn)?;
    tables.place(frontier, batch, out, None)?;
    tables.finish(txn, frontier)
}

/// Signs the checkpoint for `frontier` and stores it in `txn`.
///
/// # Errors
/// On a database or signing error.
pub(crate) fn write_checkpoint(
    txn: &WriteTransaction,
    frontier: &Frontier,
    origin: &str,
    signer: &NoteSigner,
) -> Result<(Checkpoint, String), StorageError> {
    let cp = Checkpoint {
        origin: origin.to_owned(),
        size: frontier.size(),
        root: frontier.root(),
    };
    let note = cp
        .sign(signer)
        .map_err(|e| StorageError::Inconsistent(format!("cannot sign checkpoint: {e}")))?;
    txn.open_table(CHECKPOINTS)?
        .insert(cp.size, note.as_str())?;
    Ok((cp, note))
}

/// Writes synthetic leaves straight into the node table, for the proof benchmark only: builds a
/// tree of `count` more leaves without entries or indexes, in transactions of `chunk` leaves.
///
/// # Errors
/// On a database error.
pub fn bench_fill_nodes(
    storage: &Storage,
    frontier: &mut Frontier,
    count: u64,
    chunk: u64,
) -> Result<(), StorageError> {
    let mut done = 0;
    while done < count {
        let mut txn = storage.db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)?;
        {
            let mut nodes = txn.open_table(NODES)?;
            let n = chunk.min(count - done);
            let mut err = None;
            for _ in 0..n {
                let leaf = merkle::leaf_hash(&frontier.size().to_be_bytes());
                frontier.push(leaf, |nn| {
                    if err.is_none()
                        && let Err(e) = nodes.insert(node_key(nn.level, nn.index), nn.hash.0)
                    {
                        err = Some(e);
                    }
                });
            }
            if let Some(e) = err {
                return Err(e.into());
            }
            txn.open_table(META)?
                .insert(META_TREE_SIZE, frontier.size())?;
            done += n;
        }
        txn.commit()?;
    }
    Ok(())
}

/// Moves format 1's node table (keyed by level, then index) to post-order keys, if the file is in
/// format 1: `chunk` leaves per transaction, each recording how far it got in `meta`, so that a
/// crash resumes where it stopped. The last transaction deletes the old table and records
/// format 2. Until then the file is a valid format 1 file (the old table is whole), which an
/// older build still opens. Nodes are copied in the order `Frontier::push` made them, so the new
/// table grows at its end; `open_checked` then verifies the moved tree against the signed
/// checkpoint.
fn migrate_v1_nodes(db: &Database, chunk: u64) -> Result<(), StorageError> {
    let started = std::time::Instant::now();
    loop {
        let txn = db.begin_write()?;
        let finished = {
            let mut meta = txn.open_table(META)?;
            if meta.get(META_FORMAT)?.map(|v| v.value()) != Some(1) {
                drop(meta);
                txn.abort()?;
                return Ok(());
            }
            let size = meta.get(META_TREE_SIZE)?.map_or(0, |v| v.value());
            let from = meta.get(META_MIGRATED)?.map_or(0, |v| v.value());
            if from < size {
                let to = from.saturating_add(chunk).min(size);
                let old = txn.open_table(V1_NODES)?;
                let mut new = txn.open_table(NODES)?;
                for leaf in from..to {
                    // Leaf `leaf` completes one node on each level up to `trailing_ones(leaf)`.
                    for level in 0..=leaf.trailing_ones() as u8 {
                        let index = leaf >> level;
                        let hash = old
                            .get(v1_node_key(level, index))?
                            .ok_or(StorageError::MissingNode { level, index, size })?
                            .value();
                        new.insert(node_key(level, index), hash)?;
                    }
                }
                meta.insert(META_MIGRATED, to)?;
                tracing::info!(
                    moved = to,
                    size,
                    "moving the ledger database from format 1 to 2 (Merkle nodes in post-order)"
                );
                false
            } else {
                meta.remove(META_MIGRATED)?;
                meta.insert(META_FORMAT, FORMAT_VERSION)?;
                true
            }
        };
        if finished {
            txn.delete_table(V1_NODES)?;
        }
        txn.commit()?;
        if finished {
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "ledger database moved from format 1 to 2"
            );
            return Ok(());
        }
    }
}

fn open_index(path: &Path) -> Result<Database, StorageError> {
    let open = |path: &Path| -> Result<Database, StorageError> {
        let db = Database::builder().set_cache_size(128 << 20).create(path)?;
        let txn = db.begin_write()?;
        let (indexed, format) = {
            let meta = txn.open_table(INDEX_META)?;
            (
                meta.get(META_INDEXED)?.map(|v| v.value()),
                meta.get(META_INDEX_FORMAT)?.map_or(1, |v| v.value()),
            )
        };
        match indexed {
            None => reset_index(&txn)?,
            Some(_) if format != INDEX_FORMAT => {
                tracing::warn!(
                    from = format,
                    to = INDEX_FORMAT,
                    path = %path.display(),
                    "search index has another layout; rebuilding it from the log (searches wait until it catches up)"
                );
                reset_index(&txn)?;
            }
            Some(_) => create_index_tables(&txn)?,
        }
        txn.commit()?;
        Ok(db)
    };
    match open(path) {
        Ok(db) => Ok(db),
        Err(e) => {
            // Derived data: a damaged index is rebuilt from the entries, never trusted.
            tracing::warn!(error = %e, path = %path.display(), "search index unusable; rebuilding it");
            std::fs::remove_file(path).map_err(|io| {
                StorageError::Inconsistent(format!("cannot remove {}: {io}", path.display()))
            })?;
            open(path)
        }
    }
}

fn create_index_tables(txn: &WriteTransaction) -> Result<(), StorageError> {
    txn.open_table(INDEX_META)?;
    txn.open_table(LEAF_INDEX)?;
    txn.open_table(BY_SHA256)?;
    txn.open_table(BY_CID)?;
    txn.open_multimap_table(BY_IDENTITY)?;
    txn.open_table(BY_UID)?;
    Ok(())
}

/// Empties the search indexes (of any format) and marks them as covering nothing, in the
/// current format: the indexer rebuilds them from the log.
fn reset_index(txn: &WriteTransaction) -> Result<(), StorageError> {
    txn.delete_table(LEAF_INDEX)?;
    txn.delete_table(BY_SHA256)?;
    txn.delete_table(BY_CID)?;
    txn.delete_multimap_table(BY_IDENTITY)?;
    txn.delete_table(BY_UID)?;
    txn.delete_table(OLD_LEAF_INDEX)?;
    txn.delete_multimap_table(V1_BY_SHA256)?;
    txn.delete_multimap_table(V1_BY_CID)?;
    txn.delete_multimap_table(V1_BY_UID)?;
    txn.delete_table(V2_BY_SHA256)?;
    txn.delete_table(V2_BY_UID)?;
    txn.delete_table(V3_LEAF_INDEX)?;
    txn.delete_table(V3_BY_SHA256)?;
    txn.delete_table(V3_BY_UID)?;
    create_index_tables(txn)?;
    let mut meta = txn.open_table(INDEX_META)?;
    meta.insert(META_INDEXED, 0)?;
    meta.remove(META_LEVEL_1)?;
    meta.insert(META_INDEX_FORMAT, INDEX_FORMAT)?;
    Ok(())
}

/// Indexes entries `[from, to)` of the log into the search indexes in one transaction (durable
/// if `durable`) and records `to` as the indexed size. An entry that does not decode is left out of the
/// record indexes (an audit reports it) but its leaf hash is still indexed.
///
/// # Errors
/// On a database error.
pub fn index_entries(
    storage: &Storage,
    from: u64,
    to: u64,
    durable: bool,
) -> Result<(), StorageError> {
    let read = storage.db.begin_read()?;
    let entries = read.open_table(ENTRIES)?;
    let nodes = read.open_table(NODES)?;
    let txn = index_write(storage, durable)?;
    // Keys are hashes: inserted in log order they land on random pages of each B-tree. Sorted
    // first, each table's inserts walk its pages once, in order.
    let mut leaves: Vec<(u64, u64)> = Vec::new();
    let mut by_sha: Vec<(u64, u64)> = Vec::new();
    let mut by_cid: Vec<(Vec<u8>, u64)> = Vec::new();
    let mut by_id: Vec<(medmesh_core::SpiffeId, u64)> = Vec::new();
    let mut by_uid: Vec<(u64, u64)> = Vec::new();
    // Record ids are unique in the log, so entry bytes and leaf hashes are too: no need to read
    // before writing. The leaves of `from..to` lie in one key range of the node table, between
    // the interior nodes they complete (post-order, skipped): one range scan instead of a lookup
    // per entry (8 % of the indexer's CPU).
    if from < to {
        let mut want = from;
        for item in nodes.range(node_key(0, from)..=node_key(0, to - 1))? {
            let (k, leaf) = item?;
            if k.value() == node_key(0, want) {
                leaves.push(hashed_key(0, prefix(&leaf.value()), want));
                want += 1;
            }
        }
    }
    for item in entries.range(from..to)? {
        let (k, v) = item?;
        let index = k.value();
        let Ok(e) = LogEntry::decode(v.value()) else {
            tracing::warn!(
                index,
                "entry does not decode; left out of the search indexes"
            );
            continue;
        };
        let r = e.record;
        if let Some(h) = r.content_sha256 {
            by_sha.push(hashed_key(0, prefix(&h.0), index));
        }
        if let Some(c) = &r.cid {
            // By multihash: CIDv0 and CIDv1 of the same content find each other.
            by_cid.push((c.multihash_bytes(), index));
        }
        for u in [r.study_uid, r.series_uid, r.sop_instance_uid]
            .into_iter()
            .flatten()
        {
            by_uid.push(hashed_key(0, prefix(&u.0), index));
        }
        if e.submitter != r.source && e.submitter != r.destination {
            by_id.push((e.submitter, index));
        }
        if r.destination != r.source {
            by_id.push((r.destination, index));
        }
        by_id.push((r.source, index));
    }
    leaves.sort_unstable();
    by_sha.sort_unstable();
    by_cid.sort_unstable();
    by_id.sort_unstable_by(|a, b| (a.0.as_str(), a.1).cmp(&(b.0.as_str(), b.1)));
    by_uid.sort_unstable();
    {
        let mut t = txn.open_table(LEAF_INDEX)?;
        for key in &leaves {
            t.insert(key, ())?;
        }
        let mut t = txn.open_table(BY_SHA256)?;
        for key in &by_sha {
            t.insert(key, ())?;
        }
        let mut t = txn.open_table(BY_CID)?;
        for (c, index) in &by_cid {
            t.insert((c.as_slice(), *index), ())?;
        }
        let mut t = txn.open_multimap_table(BY_IDENTITY)?;
        for (id, index) in &by_id {
            t.insert(id.as_str(), index)?;
        }
        let mut t = txn.open_table(BY_UID)?;
        for key in &by_uid {
            t.insert(key, ())?;
        }
        txn.open_table(INDEX_META)?.insert(META_INDEXED, to)?;
    }
    txn.commit()?;
    Ok(())
}

/// A write transaction on the search indexes. Derived data: most index commits skip the fsync.
/// After a crash redb returns to the last durable commit, whose watermark matches its tables,
/// and the indexer redoes the rest.
fn index_write(storage: &Storage, durable: bool) -> Result<WriteTransaction, StorageError> {
    let mut txn = storage.index.begin_write()?;
    txn.set_durability(if durable {
        redb::Durability::Immediate
    } else {
        redb::Durability::None
    })?;
    Ok(txn)
}

/// Moves the hash-keyed index rows of the first level 1 epoch still at level 0 there, when all
/// its entries are indexed (see `LEVEL_BITS`); returns whether it moved one. One transaction: a
/// reader sees the rows at one level or the other, with the bound that says which.
///
/// # Errors
/// On a database error.
pub fn compact_index(storage: &Storage, durable: bool) -> Result<bool, StorageError> {
    let txn = index_write(storage, durable)?;
    let (indexed, from) = {
        let meta = txn.open_table(INDEX_META)?;
        let get =
            |k| -> Result<u64, StorageError> { Ok(meta.get(k)?.map(|v| v.value()).unwrap_or(0)) };
        (get(META_INDEXED)?, get(META_LEVEL_1)?)
    };
    let to = from + (1 << LEVEL_BITS[1]);
    if indexed < to {
        return Ok(false);
    }
    let rows = (hashed_key(0, 0, from).0, 0)..(hashed_key(0, 0, to).0, 0);
    for table in [LEAF_INDEX, BY_SHA256, BY_UID] {
        let mut t = txn.open_table(table)?;
        let mut moved = Vec::new();
        for row in t.range(rows.clone())? {
            let (at, rest) = row?.0.value();
            let index = ((at & ((1 << 56) - 1)) << LEVEL_BITS[0]) | (rest & in_epoch(0));
            moved.push(hashed_key(1, rest, index));
        }
        t.retain_in(rows.clone(), |_, _| false)?;
        moved.sort_unstable();
        for key in &moved {
            t.insert(key, ())?;
        }
    }
    txn.open_table(INDEX_META)?.insert(META_LEVEL_1, to)?;
    txn.commit()?;
    Ok(true)
}

/// Counts rows of the main tables (for `medmesh-ledger inspect` and tests).
///
/// # Errors
/// On a database error.
pub fn table_counts(storage: &Storage) -> Result<Vec<(&'static str, u64)>, StorageError> {
    let txn = storage.db.begin_read()?;
    Ok(vec![
        ("entries", txn.open_table(ENTRIES)?.len()?),
        ("nodes", txn.open_table(NODES)?.len()?),
        ("checkpoints", txn.open_table(CHECKPOINTS)?.len()?),
    ])
}

#[cfg(test)]
mod tests {
    // Unit tests: a panic is the failure report.
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Three hashed keys: `twin` shares all but the last 16 bits of `key` (a candidate for it
    /// at level 0, where the reader checks the whole key), `other` differs above bit 20.
    const KEY: u64 = 0x0123_4567_89ab_cdef;
    const TWIN: u64 = KEY ^ 0x1234;
    const OTHER: u64 = KEY ^ (1 << 40);
    const EPOCH: u64 = 1 << LEVEL_BITS[0];
    const L1: u64 = 1 << LEVEL_BITS[1];
    /// (key, index) rows across level 0 epochs of the first two level 1 epochs.
    const ROWS: [(u64, u64); 8] = [
        (KEY, 3),
        (OTHER, 4),
        (KEY, EPOCH - 1),
        (TWIN, EPOCH + 7),
        (KEY, 5 * EPOCH + 2),
        (OTHER, 5 * EPOCH + 3),
        (KEY, L1 - 1),
        (KEY, L1 + 6 * EPOCH),
    ];

    /// Rows under hashed keys are found epoch by epoch, in index order, below the size asked
    /// for; a key differing in the bits kept is not a candidate.
    #[test]
    fn hashed_rows_are_found_across_epochs_in_index_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("index.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(BY_SHA256).unwrap();
            for (k, i) in ROWS {
                let (at, _) = hashed_key(0, k, i);
                assert_eq!(at, i >> LEVEL_BITS[0]);
                t.insert(hashed_key(0, k, i), ()).unwrap();
            }
        }
        txn.commit().unwrap();
        let read = db.begin_read().unwrap();
        let t = read.open_table(BY_SHA256).unwrap();
        let hits =
            |k, size| -> Vec<u64> { hashed_hits(&t, k, size, 0).map(|r| r.unwrap()).collect() };
        let all = 2 * L1;
        assert_eq!(
            hits(KEY, all),
            vec![
                3,
                EPOCH - 1,
                EPOCH + 7,
                5 * EPOCH + 2,
                L1 - 1,
                L1 + 6 * EPOCH
            ]
        );
        assert_eq!(hits(TWIN, all), hits(KEY, all));
        assert_eq!(hits(OTHER, all), vec![4, 5 * EPOCH + 3]);
        // Clipped to the size: the last epoch asked for is partly above it.
        assert_eq!(hits(KEY, 5 * EPOCH + 2), vec![3, EPOCH - 1, EPOCH + 7]);
        assert_eq!(hits(KEY, L1 + 6 * EPOCH).len(), 5);
        assert!(hits(KEY, 0).is_empty());
        assert!(hits(KEY ^ (1 << 50), all).is_empty());
    }

    /// Once a level 1 epoch is wholly indexed, its rows move there in one transaction: lookups
    /// find the same entries, level 0 keeps only the newer rows, and nothing moves twice.
    #[test]
    fn complete_level_1_epochs_move_up_and_are_found_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let signer = NoteSigner::from_seed("test/compact", [5; 32]).unwrap();
        let (storage, _) = Storage::open(
            &dir.path().join("ledger.redb"),
            &signer.verifier(),
            "test/compact",
        )
        .unwrap();
        let set_indexed = |n: u64| {
            let txn = storage.index.begin_write().unwrap();
            txn.open_table(INDEX_META)
                .unwrap()
                .insert(META_INDEXED, n)
                .unwrap();
            txn.commit().unwrap();
        };
        let txn = storage.index.begin_write().unwrap();
        for table in [LEAF_INDEX, BY_SHA256, BY_UID] {
            let mut t = txn.open_table(table).unwrap();
            for (k, i) in ROWS {
                t.insert(hashed_key(0, k, i), ()).unwrap();
            }
        }
        txn.commit().unwrap();
        let lookups = |level_1: u64| -> Vec<Vec<u64>> {
            let read = storage.index.begin_read().unwrap();
            let mut out = Vec::new();
            for table in [LEAF_INDEX, BY_SHA256, BY_UID] {
                let t = read.open_table(table).unwrap();
                for k in [KEY, TWIN, OTHER] {
                    out.push(
                        hashed_hits(&t, k, 2 * L1, level_1)
                            .map(|r| r.unwrap())
                            .collect(),
                    );
                }
            }
            out
        };
        let before = lookups(0);

        // The first level 1 epoch is not wholly indexed yet.
        set_indexed(L1 - 1);
        assert!(!compact_index(&storage, false).unwrap());
        set_indexed(L1 + 6 * EPOCH + 1);
        assert!(compact_index(&storage, true).unwrap());
        assert!(
            !compact_index(&storage, true).unwrap(),
            "nothing moves twice"
        );

        let reader = storage.reader().unwrap();
        assert_eq!(reader.level_1, L1);
        drop(reader);
        assert_eq!(lookups(L1), before);
        let read = storage.index.begin_read().unwrap();
        for table in [LEAF_INDEX, BY_SHA256, BY_UID] {
            let t = read.open_table(table).unwrap();
            let levels: Vec<(u64, u64)> = t
                .iter()
                .unwrap()
                .map(|r| {
                    let (at, _) = r.unwrap().0.value();
                    (at >> 56, at & 0xff_ffff)
                })
                .collect();
            // Seven rows in level 1 epoch 0, the newest in level 0 epoch 22.
            assert_eq!(levels, [vec![(0, 22)], vec![(1, 0); 7]].concat());
        }
    }

    /// A format 1 file is moved a few leaves per transaction: every node lands under its
    /// post-order key, and the last transaction leaves no trace of the old layout.
    #[test]
    fn format_1_nodes_move_in_bounded_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("ledger.redb")).unwrap();
        let mut made = Vec::new();
        let txn = db.begin_write().unwrap();
        {
            let mut old = txn.open_table(V1_NODES).unwrap();
            let mut f = Frontier::new();
            for i in 0..37u64 {
                f.push(merkle::leaf_hash(&i.to_be_bytes()), |n| {
                    old.insert(v1_node_key(n.level, n.index), n.hash.0).unwrap();
                    made.push(n);
                });
            }
            let mut meta = txn.open_table(META).unwrap();
            meta.insert(META_FORMAT, 1).unwrap();
            meta.insert(META_TREE_SIZE, 37).unwrap();
        }
        txn.commit().unwrap();

        // 37 leaves, 5 per transaction: 8 transactions of nodes, then the switch.
        migrate_v1_nodes(&db, 5).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        assert_eq!(meta.get(META_FORMAT).unwrap().unwrap().value(), 2);
        assert!(meta.get(META_MIGRATED).unwrap().is_none());
        assert!(
            txn.open_table(V1_NODES).is_err(),
            "the old table is deleted"
        );
        let nodes = txn.open_table(NODES).unwrap();
        assert_eq!(nodes.len().unwrap(), 2 * 37 - 3);
        assert_eq!(made.len() as u64, 2 * 37 - 3);
        for n in &made {
            let got = nodes.get(node_key(n.level, n.index)).unwrap().unwrap();
            assert_eq!(got.value(), n.hash.0, "node ({}, {})", n.level, n.index);
        }
        // Post-order keys are dense: 0..71, in the order the nodes were made.
        let keys: Vec<u64> = nodes
            .iter()
            .unwrap()
            .map(|r| r.unwrap().0.value())
            .collect();
        assert_eq!(keys, (0..71).collect::<Vec<_>>());
        let made_keys: Vec<u64> = made.iter().map(|n| node_key(n.level, n.index)).collect();
        assert_eq!(made_keys, keys);
        drop((meta, nodes, txn));
        // A file in format 2 is left alone.
        migrate_v1_nodes(&db, 5).unwrap();
    }

    fn entry(i: u64) -> NewEntry {
        use medmesh_core::record::{EventKind, Outcome, Protocol, RecordId};
        let id = |p: &str| p.parse::<medmesh_core::SpiffeId>().unwrap();
        NewEntry {
            record: AuditRecord::event(
                RecordId::new().unwrap(),
                EventKind::InstanceStored,
                1_700_000_000_000_000 + i,
                id("spiffe://medmesh.test/ns/ct/sa/scanner"),
                id("spiffe://medmesh.test/ns/pacs/sa/orthanc"),
                Protocol::Dimse,
                Outcome::Success,
            ),
            submitter: id("spiffe://medmesh.test/ns/pacs/sa/writer"),
            received_us: 1_700_000_000_000_000 + i,
        }
    }

    fn wal_frame(first: u64, entries: &[NewEntry]) -> Vec<u8> {
        let mut f = wal::FrameBuilder::new(first);
        for e in entries {
            f.push(&e.bytes());
        }
        f.finish()
    }

    /// Entries whose write-ahead log frame was synced but whose commit redb lost (a crash before
    /// the next durable commit) are appended again at their indexes when the file is opened;
    /// frames the database already holds are skipped, and a log that does not continue the
    /// database (which was rolled back) stops the start, as does a record id stored twice.
    #[test]
    fn lost_entries_come_back_from_the_write_ahead_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.redb");
        let signer = NoteSigner::from_seed("test/wal", [6; 32]).unwrap();
        let open = || Storage::open(&path, &signer.verifier(), "test/wal");
        let all: Vec<NewEntry> = (0..7).map(entry).collect();
        let (storage, recovered) = open().unwrap();
        let mut frontier = recovered.frontier;
        let txn = storage.begin_write().unwrap();
        write_batch(&txn, &mut frontier, &all[..3], &mut Vec::new()).unwrap();
        txn.commit().unwrap();
        drop(storage);
        // The log of a run that synced frames for entries 1..3 (already in the database) and
        // 3..7, then lost its last commits: only 3..7 are appended again.
        let frames = [
            wal_frame(1, &all[1..3]),
            wal_frame(3, &all[3..5]),
            wal_frame(5, &all[5..]),
        ]
        .concat();
        std::fs::write(wal_path(&path), &frames).unwrap();
        for _ in 0..2 {
            let (storage, recovered) = open().unwrap();
            assert_eq!(recovered.frontier.size(), 7);
            let r = storage.reader().unwrap();
            for (i, e) in all.iter().enumerate() {
                let bytes = r.entry(i as u64).unwrap().unwrap();
                assert_eq!(bytes, e.bytes().as_ref(), "entry {i}");
                assert_eq!(r.leaf_hash(i as u64).unwrap(), merkle::leaf_hash(&bytes));
            }
        }

        // A log ahead of the database: entries 9.. cannot follow its 7.
        std::fs::write(wal_path(&path), wal_frame(9, &[entry(9)])).unwrap();
        let err = open().unwrap_err().to_string();
        assert!(
            err.contains("holds entries 9..10 but the database has 7 entries")
                && err.contains("rolled back"),
            "{err}"
        );
        // A record id the log already holds.
        let mut again = entry(7);
        again.record.record_id = all[2].record.record_id;
        std::fs::write(wal_path(&path), wal_frame(7, &[again])).unwrap();
        let err = open().unwrap_err().to_string();
        assert!(err.contains("repeats a record id"), "{err}");
        // Nothing was appended by the refused starts.
        std::fs::remove_file(wal_path(&path)).unwrap();
        assert_eq!(open().unwrap().1.frontier.size(), 7);
    }
}
