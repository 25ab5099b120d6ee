//! Raft's log and vote in `raft.redb`, written by one writer thread with group commit.
//!
//! openraft calls the log store from its core task, one call at a time. `append` returns at once
//! (the entries are readable from memory) and the writer thread makes them durable: it drains
//! every operation queued meanwhile (appends, truncations, purges, votes) into one redb
//! transaction committed with `Durability::Immediate`, then reports the appends flushed (so
//! Raft counts them toward a commit) and the votes saved. Operations reach the file in the order
//! Raft issued them. Recent entries stay in memory, so replication to followers rarely reads
//! the file.

// openraft's `StorageError` is what its traits return; boxing it here would only move the cost.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError,
    StorageIOError, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::{NodeId, TypeConfig, decode, encode};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const VOTE: &str = "vote";
const PURGED: &str = "last_purged";
const COMMITTED: &str = "committed";
/// Durable entries kept in memory for replication reads.
const CACHE: usize = 4096;

type SErr = StorageError<NodeId>;

fn io_err(subject: ErrorSubject<NodeId>, verb: ErrorVerb, e: impl std::fmt::Display) -> SErr {
    StorageIOError::new(subject, verb, AnyError::error(e.to_string())).into()
}

fn read_err(e: impl std::fmt::Display) -> SErr {
    io_err(ErrorSubject::Logs, ErrorVerb::Read, e)
}

fn write_err(e: impl std::fmt::Display) -> SErr {
    io_err(ErrorSubject::Logs, ErrorVerb::Write, e)
}

/// One write, in Raft's order.
enum Op {
    /// Encoded entries (their log ids, for the memory trim) and the flush callback.
    Append(Vec<(LogId<NodeId>, Vec<u8>)>, LogFlushed<TypeConfig>),
    Truncate(u64),
    Purge(LogId<NodeId>),
    Vote(Vote<NodeId>, oneshot::Sender<Result<(), String>>),
    Committed(Option<LogId<NodeId>>),
}

/// What readers see before the file does.
#[derive(Default)]
struct Mem {
    /// Entries not yet known durable, and the most recent durable ones.
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    /// Entries in the file at or above this index are stale until the writer truncates them.
    truncated_from: Option<u64>,
    last_log_id: Option<LogId<NodeId>>,
    last_purged: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
}

/// The Raft log store (cheap to clone: handles on the database, the memory view and the writer).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    mem: Arc<Mutex<Mem>>,
    tx: std::sync::mpsc::Sender<Op>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogStore")
    }
}

fn meta<T: for<'de> serde::Deserialize<'de>>(db: &Database, key: &str) -> Result<Option<T>, SErr> {
    let txn = db.begin_read().map_err(read_err)?;
    let t = txn.open_table(META).map_err(read_err)?;
    match t.get(key).map_err(read_err)? {
        None => Ok(None),
        Some(v) => decode(v.value())
            .map(Some)
            .map_err(|e| read_err(format!("raft meta {key}: {e}"))),
    }
}

fn put_meta<T: serde::Serialize>(
    txn: &redb::WriteTransaction,
    key: &str,
    v: &T,
) -> Result<(), redb::Error> {
    let bytes = encode(v).map_err(|e| redb::Error::Corrupted(e.to_string()))?;
    txn.open_table(META)?.insert(key, bytes.as_slice())?;
    Ok(())
}

impl LogStore {
    /// Opens (or creates) `raft.redb` and starts its writer thread.
    ///
    /// # Errors
    /// When redb cannot open or initialise the file, or its state does not decode.
    pub fn open(path: &Path) -> Result<Self, String> {
        let db = Database::builder()
            .set_cache_size(64 << 20)
            .create(path)
            .map_err(|e| e.to_string())?;
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.open_table(LOG).map_err(|e| e.to_string())?;
        txn.open_table(META).map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())?;
        let last_purged: Option<LogId<NodeId>> = meta(&db, PURGED).map_err(|e| e.to_string())?;
        let vote: Option<Vote<NodeId>> = meta(&db, VOTE).map_err(|e| e.to_string())?;
        let last = {
            let txn = db.begin_read().map_err(|e| e.to_string())?;
            let t = txn.open_table(LOG).map_err(|e| e.to_string())?;
            match t.last().map_err(|e| e.to_string())? {
                None => None,
                Some((k, v)) => {
                    let e: Entry<TypeConfig> = decode(v.value())
                        .map_err(|e| format!("raft log entry {}: {e}", k.value()))?;
                    Some(e.log_id)
                }
            }
        };
        let db = Arc::new(db);
        let mem = Arc::new(Mutex::new(Mem {
            last_log_id: last.or(last_purged),
            last_purged,
            vote,
            ..Mem::default()
        }));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let (db, mem) = (db.clone(), mem.clone());
            std::thread::Builder::new()
                .name("raft-log-writer".into())
                .spawn(move || writer(&db, &mem, &rx))
                .map_err(|e| e.to_string())?;
        }
        Ok(Self { db, mem, tx })
    }

    fn mem(&self) -> MutexGuard<'_, Mem> {
        self.mem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn send(&self, op: Op) -> Result<(), SErr> {
        self.tx
            .send(op)
            .map_err(|_| write_err("the Raft log writer has stopped"))
    }
}

/// The writer thread: one durable transaction per drained queue.
fn writer(db: &Database, mem: &Mutex<Mem>, rx: &std::sync::mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut ops = vec![first];
        while let Ok(op) = rx.try_recv() {
            ops.push(op);
        }
        let result = (|| -> Result<(), redb::Error> {
            let mut txn = db.begin_write()?;
            txn.set_durability(redb::Durability::Immediate)?;
            {
                let mut log = txn.open_table(LOG)?;
                for op in &ops {
                    match op {
                        Op::Append(entries, _) => {
                            for (id, b) in entries {
                                log.insert(id.index, b.as_slice())?;
                            }
                        }
                        Op::Truncate(from) => {
                            log.retain_in(*from.., |_, _| false)?;
                        }
                        Op::Purge(upto) => {
                            log.retain_in(..=upto.index, |_, _| false)?;
                        }
                        Op::Vote(..) | Op::Committed(_) => {}
                    }
                }
            }
            for op in &ops {
                match op {
                    Op::Purge(upto) => put_meta(&txn, PURGED, upto)?,
                    Op::Vote(v, _) => put_meta(&txn, VOTE, v)?,
                    Op::Committed(c) => put_meta(&txn, COMMITTED, c)?,
                    Op::Append(..) | Op::Truncate(_) => {}
                }
            }
            txn.commit()?;
            Ok(())
        })();
        if let Err(e) = &result {
            tracing::error!(error = %e, "cannot write the Raft log");
        }
        // The file now holds these entries: drop them from memory (unless a later append
        // replaced them), keeping the most recent ones for replication reads.
        if result.is_ok() {
            let mut m = mem
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if ops.iter().any(|o| matches!(o, Op::Truncate(_))) {
                m.truncated_from = None;
            }
            let keep_from = m
                .entries
                .keys()
                .next_back()
                .map_or(0, |last| last.saturating_sub(CACHE as u64));
            for op in &ops {
                if let Op::Append(entries, _) = op {
                    for (id, _) in entries {
                        let idx = id.index;
                        if idx < keep_from && m.entries.get(&idx).is_some_and(|x| x.log_id == *id) {
                            m.entries.remove(&idx);
                        }
                    }
                }
            }
        }
        for op in ops {
            match op {
                Op::Append(_, cb) => cb.log_io_completed(
                    result
                        .as_ref()
                        .map(|_| ())
                        .map_err(|e| std::io::Error::other(e.to_string())),
                ),
                Op::Vote(_, reply) => {
                    let _ = reply.send(result.as_ref().map(|_| ()).map_err(ToString::to_string));
                }
                Op::Truncate(_) | Op::Purge(_) | Op::Committed(_) => {}
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        if start >= end {
            return Ok(Vec::new());
        }
        let (mut out, from_file_below) = {
            let m = self.mem();
            let cached: BTreeMap<u64, Entry<TypeConfig>> = m
                .entries
                .range(start..end)
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            // Everything from the first cached index on is in memory (entries enter memory in
            // order and leave it oldest first); the file serves what lies below it.
            let below = m
                .entries
                .keys()
                .next()
                .copied()
                .map_or(end, |first| first.max(start))
                .min(m.truncated_from.unwrap_or(u64::MAX));
            (cached, below.min(end))
        };
        if start < from_file_below {
            let txn = self.db.begin_read().map_err(read_err)?;
            let t = txn.open_table(LOG).map_err(read_err)?;
            for item in t.range(start..from_file_below).map_err(read_err)? {
                let (k, v) = item.map_err(read_err)?;
                let entry: Entry<TypeConfig> = decode(v.value())
                    .map_err(|e| read_err(format!("raft log entry {}: {e}", k.value())))?;
                out.entry(k.value()).or_insert(entry);
            }
        }
        Ok(out.into_values().collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let m = self.mem();
        Ok(LogState {
            last_purged_log_id: m.last_purged,
            last_log_id: m.last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        let (reply, done) = oneshot::channel();
        self.send(Op::Vote(*vote, reply))?;
        done.await
            .map_err(|_| io_err(ErrorSubject::Vote, ErrorVerb::Write, "writer stopped"))?
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        self.mem().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        Ok(self.mem().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        // Written with the next batch; losing it only delays re-applying after a restart.
        self.send(Op::Committed(committed))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(meta::<Option<LogId<NodeId>>>(&self.db, COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Encoded here, once; the entries themselves move into memory for readers.
        let mut rows = Vec::new();
        let mut decoded = Vec::new();
        for e in entries {
            rows.push((e.log_id, encode(&e).map_err(write_err)?));
            decoded.push(e);
        }
        {
            let mut m = self.mem();
            if let Some(last) = decoded.last() {
                m.last_log_id = Some(last.log_id);
            }
            for e in decoded {
                m.entries.insert(e.log_id.index, e);
            }
        }
        self.send(Op::Append(rows, callback))
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let from = log_id.index;
        {
            let mut m = self.mem();
            m.entries.retain(|k, _| *k < from);
            m.truncated_from = Some(m.truncated_from.map_or(from, |t| t.min(from)));
            // The entry before `from` is the last one now (or the purge point).
            let prev = from.checked_sub(1);
            m.last_log_id = match prev {
                None => None,
                Some(p) => match m.entries.get(&p) {
                    Some(e) => Some(e.log_id),
                    None => {
                        let txn = self.db.begin_read().map_err(read_err)?;
                        let t = txn.open_table(LOG).map_err(read_err)?;
                        match t.get(p).map_err(read_err)? {
                            Some(v) => Some(
                                decode::<Entry<TypeConfig>>(v.value())
                                    .map_err(|e| read_err(format!("raft log entry {p}: {e}")))?
                                    .log_id,
                            ),
                            None => m.last_purged,
                        }
                    }
                },
            };
        }
        self.send(Op::Truncate(from))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        {
            let mut m = self.mem();
            m.entries.retain(|k, _| *k > log_id.index);
            m.last_purged = Some(log_id);
            if m.last_log_id.is_none_or(|l| l.index < log_id.index) {
                m.last_log_id = Some(log_id);
            }
        }
        self.send(Op::Purge(log_id))
    }
}
