//! Raft's log and vote in `raft.redb`: every write (append, truncate, purge, vote) is one redb
//! transaction committed with `Durability::Immediate` before Raft is told it is done, and writes
//! are serialized because openraft calls them one at a time (`&mut self`) and each awaits its
//! commit.

// openraft's `StorageError` is what its traits return; boxing it here would only move the cost.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError,
    StorageIOError, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{NodeId, TypeConfig, decode, encode};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const VOTE: &str = "vote";
const PURGED: &str = "last_purged";
const COMMITTED: &str = "committed";

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

/// The Raft log store (cheap to clone: a handle on the database).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogStore")
    }
}

impl LogStore {
    /// Opens (or creates) `raft.redb`.
    ///
    /// # Errors
    /// When redb cannot open or initialise the file.
    pub fn open(path: &Path) -> Result<Self, redb::Error> {
        let db = Database::builder().set_cache_size(64 << 20).create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(LOG)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(Self { db: Arc::new(db) })
    }

    fn meta<T: for<'de> serde::Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, SErr> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let t = txn.open_table(META).map_err(read_err)?;
        match t.get(key).map_err(read_err)? {
            None => Ok(None),
            Some(v) => decode(v.value())
                .map(Some)
                .map_err(|e| read_err(format!("raft meta {key}: {e}"))),
        }
    }

    /// Runs one durable write transaction on a blocking thread.
    async fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error> + Send + 'static,
    ) -> Result<(), SErr> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<(), redb::Error> {
            let mut txn = db.begin_write()?;
            txn.set_durability(redb::Durability::Immediate)?;
            f(&txn)?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(write_err)?
        .map_err(write_err)
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

    /// The last log id present (or purged), for status reports.
    ///
    /// # Errors
    /// On a database error.
    pub fn last_index(&self) -> Result<Option<u64>, SErr> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let t = txn.open_table(LOG).map_err(read_err)?;
        Ok(t.last().map_err(read_err)?.map(|(k, _)| k.value()))
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
            Bound::Included(&e) => Some(e + 1),
            Bound::Excluded(&e) => Some(e),
            Bound::Unbounded => None,
        };
        let txn = self.db.begin_read().map_err(read_err)?;
        let t = txn.open_table(LOG).map_err(read_err)?;
        let iter = match end {
            Some(e) => t.range(start..e),
            None => t.range(start..),
        }
        .map_err(read_err)?;
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item.map_err(read_err)?;
            let entry: Entry<TypeConfig> = decode(v.value())
                .map_err(|e| read_err(format!("raft log entry {}: {e}", k.value())))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged: Option<LogId<NodeId>> = self.meta(PURGED)?;
        let last = {
            let txn = self.db.begin_read().map_err(read_err)?;
            let t = txn.open_table(LOG).map_err(read_err)?;
            match t.last().map_err(read_err)? {
                None => None,
                Some((k, v)) => {
                    let e: Entry<TypeConfig> = decode(v.value())
                        .map_err(|e| read_err(format!("raft log entry {}: {e}", k.value())))?;
                    Some(e.log_id)
                }
            }
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        let vote = *vote;
        self.write(move |txn| Self::put_meta(txn, VOTE, &vote))
            .await
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        self.meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        // Not fsynced on its own: losing it only delays re-applying after a restart.
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<(), redb::Error> {
            let mut txn = db.begin_write()?;
            txn.set_durability(redb::Durability::None)?;
            Self::put_meta(&txn, COMMITTED, &committed)?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(write_err)?
        .map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(self.meta::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for e in entries {
            let bytes = encode(&e).map_err(write_err)?;
            rows.push((e.log_id.index, bytes));
        }
        let r = self
            .write(move |txn| {
                let mut t = txn.open_table(LOG)?;
                for (i, b) in &rows {
                    t.insert(*i, b.as_slice())?;
                }
                Ok(())
            })
            .await;
        match r {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let from = log_id.index;
        self.write(move |txn| {
            let mut t = txn.open_table(LOG)?;
            t.retain_in(from.., |_, _| false)?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let upto = log_id.index;
        self.write(move |txn| {
            Self::put_meta(txn, PURGED, &log_id)?;
            let mut t = txn.open_table(LOG)?;
            t.retain_in(..=upto, |_, _| false)?;
            Ok(())
        })
        .await
    }
}
