//! Group commit: one writer thread turns every append waiting in its queue into a single redb
//! transaction; the syncer thread makes it durable through the write-ahead log (`crate::wal`)
//! while the writer goes on with the next one, then acknowledges it.
//!
//! Invariants:
//! - an append is acknowledged only once it is durable: its write-ahead log frame is synced, or
//!   the transaction holding it (or a later one) committed with `Durability::Immediate`;
//! - readers (the API, the indexer) see only durable entries: `Storage` caps their snapshots at
//!   the durable size this module publishes;
//! - a checkpoint is signed from the writer's own frontier, stored in the same transaction as the
//!   entries it covers, recorded in the signer state file, and only then published. Every
//!   checkpoint therefore extends the previous one: two inconsistent checkpoints are never signed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use medmesh_core::merkle::Frontier;
use medmesh_core::{Checkpoint, NoteSigner, NoteVerifier};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::storage::{self, NewEntry, Placed, Storage, StorageError};
use crate::wal;

/// A signed checkpoint and its note text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    /// Parsed checkpoint.
    pub checkpoint: Checkpoint,
    /// The signed note as served.
    pub note: String,
}

/// What readers see of the writer's progress.
#[derive(Debug, Clone)]
pub struct Head {
    /// Committed tree size.
    pub size: u64,
    /// Latest published checkpoint.
    pub checkpoint: Option<Arc<SignedCheckpoint>>,
}

/// The result of one submission.
#[derive(Debug)]
pub struct Committed {
    /// One result per submitted entry, in order.
    pub placed: Vec<Placed>,
    /// A checkpoint covering every entry of the submission, when one was requested.
    pub checkpoint: Option<Arc<SignedCheckpoint>>,
}

/// Why a submission failed as a whole. Nothing of it was acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The commit failed; nothing of the batch was stored.
    #[error("commit failed, nothing was stored: {0}")]
    Commit(String),
    /// The ledger is shutting down.
    #[error("ledger is shutting down")]
    ShuttingDown,
    /// This replica is not the Raft leader (the leader's id, when known); nothing was proposed.
    #[error("this replica is not the leader")]
    NotLeader(Option<u64>),
    /// The write-ahead log could not be synced after the entries were committed: they may or
    /// may not be stored.
    #[error(
        "the write-ahead log could not be synced (the entries may or may not be stored; retry with the same record ids): {0}"
    )]
    Unsynced(String),
    /// Replication failed after the entries were proposed: they may or may not be stored.
    #[error(
        "replication did not confirm the entries (they may or may not be stored; retry with the same record ids): {0}"
    )]
    Unavailable(String),
}

/// Entries waiting for the writer (or, replicated, the proposer).
pub struct Submission {
    pub(crate) entries: Vec<NewEntry>,
    pub(crate) want_checkpoint: bool,
    pub(crate) reply: oneshot::Sender<Result<Committed, AppendError>>,
    pub(crate) enqueued: Instant,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission")
            .field("entries", &self.entries.len())
            .finish()
    }
}

/// Settings of the writer.
#[derive(Debug, Clone)]
pub struct SequencerConfig {
    /// Log origin for checkpoints.
    pub origin: String,
    /// Longest time between a growth of the tree and the checkpoint covering it.
    pub checkpoint_interval: Duration,
    /// Most entries in one transaction.
    pub max_batch_entries: usize,
    /// Where the last signed checkpoint is recorded outside the database.
    pub signer_state: PathBuf,
    /// The write-ahead log of the database (`None`: every commit syncs redb itself).
    pub wal: Option<PathBuf>,
}

/// Handle to the writer: clone it to submit from many tasks.
#[derive(Clone)]
pub struct Sequencer {
    tx: mpsc::Sender<Submission>,
    head: watch::Receiver<Head>,
}

impl std::fmt::Debug for Sequencer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequencer")
            .field("head", &*self.head.borrow())
            .finish()
    }
}

/// Checks the database against the signer state file: a database older than the last checkpoint
/// this signer published (a restored backup, a rolled-back disk) must not be continued, or the
/// ledger would sign a fork. Then brings the file up to the database's latest checkpoint (a crash
/// between the commit and the file write leaves it one checkpoint behind).
///
/// The file guards against the database being replaced on its own; a restore of the whole data
/// directory takes the file back too, which is why clients keep their own trusted checkpoint.
///
/// # Errors
/// When the state file is unreadable or the database does not extend it.
pub fn reconcile_signer_state(
    path: &std::path::Path,
    storage: &Storage,
    recovered: &storage::Recovered,
    verifier: &NoteVerifier,
    origin: &str,
) -> Result<(), StorageError> {
    check_signer_state(path, storage, verifier, origin)?;
    if let Some((cp, note)) = &recovered.checkpoint {
        let stale = match std::fs::read_to_string(path) {
            Ok(n) => Checkpoint::open(&n, verifier, origin).map_or(true, |c| c.size < cp.size),
            Err(_) => true,
        };
        if stale {
            write_signer_state(path, note).map_err(|e| {
                StorageError::Inconsistent(format!(
                    "cannot write signer state {}: {e}",
                    path.display()
                ))
            })?;
        }
    }
    Ok(())
}

fn check_signer_state(
    path: &std::path::Path,
    storage: &Storage,
    verifier: &NoteVerifier,
    origin: &str,
) -> Result<(), StorageError> {
    let note = match std::fs::read_to_string(path) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if storage.reader()?.latest_checkpoint()?.is_some() {
                tracing::warn!(path = %path.display(), "signer state file is missing although the database holds checkpoints; recreating it from the database");
            }
            return Ok(());
        }
        Err(e) => {
            return Err(StorageError::Inconsistent(format!(
                "cannot read signer state {}: {e}",
                path.display()
            )));
        }
    };
    let cp = Checkpoint::open(&note, verifier, origin).map_err(|e| {
        StorageError::Inconsistent(format!(
            "signer state {} does not verify: {e}",
            path.display()
        ))
    })?;
    let reader = storage.reader()?;
    if reader.size() < cp.size {
        return Err(StorageError::Inconsistent(format!(
            "database has {} entries but this ledger already signed a checkpoint of size {}: \
             the database was rolled back or replaced by an older copy",
            reader.size(),
            cp.size
        )));
    }
    let root = reader.root_at(cp.size)?;
    if root != cp.root {
        return Err(StorageError::Inconsistent(format!(
            "database root at size {} is {root}, but this ledger signed {} for that size: \
             the database was altered",
            cp.size, cp.root
        )));
    }
    Ok(())
}

/// The signer state file shared by the writers of a replicated ledger (the state machine records
/// every checkpoint it applies, the leader every checkpoint it signs): records only checkpoints
/// larger than the last one recorded, one writer at a time.
#[derive(Debug)]
pub struct SignerStateFile {
    path: PathBuf,
    recorded: std::sync::Mutex<u64>,
}

impl SignerStateFile {
    /// The file at `path`, whose latest checkpoint has `size` entries.
    pub fn new(path: PathBuf, size: u64) -> Self {
        Self {
            path,
            recorded: std::sync::Mutex::new(size),
        }
    }

    /// Records `note` (of a checkpoint of `size`) durably unless a larger one is recorded.
    ///
    /// # Errors
    /// When the file cannot be written and synced.
    pub fn record(&self, size: u64, note: &str) -> std::io::Result<()> {
        let mut recorded = self
            .recorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if size <= *recorded && self.path.exists() {
            return Ok(());
        }
        write_signer_state(&self.path, note)?;
        *recorded = size;
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

pub(crate) fn write_signer_state(path: &std::path::Path, note: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(note.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Sequencer {
    /// Starts the writer thread.
    ///
    /// # Errors
    /// When the thread cannot be spawned.
    pub fn start(
        storage: Storage,
        recovered: storage::Recovered,
        signer: NoteSigner,
        cfg: SequencerConfig,
        metrics: Metrics,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(8192);
        let checkpoint = recovered
            .checkpoint
            .map(|(checkpoint, note)| Arc::new(SignedCheckpoint { checkpoint, note }));
        let head = Head {
            size: recovered.frontier.size(),
            checkpoint,
        };
        metrics.tree_size.set(head.size as i64);
        let size = head.size;
        let (head_tx, head_rx) = watch::channel(head);
        let head_tx = Arc::new(head_tx);
        let wal = match &cfg.wal {
            None => None,
            Some(path) => {
                let file = wal::WalFile::open(path)?;
                storage.hold_visible(size);
                Some(Syncer::start(
                    file,
                    storage.clone(),
                    head_tx.clone(),
                    metrics.clone(),
                )?)
            }
        };
        let writer = Writer {
            storage,
            frontier: recovered.frontier,
            signer,
            cfg,
            metrics,
            head: head_tx,
            last_checkpoint: std::time::Instant::now(),
            backoff_until: std::time::Instant::now(),
            wal,
        };
        let handle = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok((Self { tx, head: head_rx }, handle))
    }

    /// A sequencer whose submissions the caller serves from the returned receiver (the Raft
    /// proposer), publishing `head`.
    pub fn replicated(head: watch::Receiver<Head>) -> (Self, mpsc::Receiver<Submission>) {
        let (tx, rx) = mpsc::channel(8192);
        (Self { tx, head }, rx)
    }

    /// Appends entries; resolves once they are durable.
    ///
    /// # Errors
    /// When the commit fails or the writer has stopped.
    pub async fn append(
        &self,
        entries: Vec<NewEntry>,
        want_checkpoint: bool,
    ) -> Result<Committed, AppendError> {
        let (reply, rx) = oneshot::channel();
        let sub = Submission {
            entries,
            want_checkpoint,
            reply,
            enqueued: Instant::now(),
        };
        self.tx
            .send(sub)
            .await
            .map_err(|_| AppendError::ShuttingDown)?;
        rx.await.map_err(|_| AppendError::ShuttingDown)?
    }

    /// The latest head.
    pub fn head(&self) -> Head {
        self.head.borrow().clone()
    }

    /// A receiver of head updates.
    pub fn subscribe(&self) -> watch::Receiver<Head> {
        self.head.clone()
    }
}

/// Pause before a timer-driven retry after a failed commit or signer-state write.
const RETRY_BACKOFF: Duration = Duration::from_secs(1);

/// Results per submission, and the checkpoint signed in the same transaction.
type TxnOutcome = (Vec<Vec<Placed>>, Option<(Checkpoint, String)>);

struct Writer {
    storage: Storage,
    frontier: Frontier,
    signer: NoteSigner,
    cfg: SequencerConfig,
    metrics: Metrics,
    head: Arc<watch::Sender<Head>>,
    last_checkpoint: std::time::Instant,
    /// After a failed commit or signer-state write, no timer-driven retry before this instant
    /// (a failing disk must not be hammered with signed, fsynced retries).
    backoff_until: std::time::Instant,
    /// The syncer of the write-ahead log, when the ledger has one.
    wal: Option<Syncer>,
}

impl Writer {
    fn checkpoint_size(&self) -> u64 {
        self.head
            .borrow()
            .checkpoint
            .as_ref()
            .map_or(0, |c| c.checkpoint.size)
    }

    fn run(mut self, rx: mpsc::Receiver<Submission>) {
        self.serve(rx);
        if let Some(wal) = self.wal.take() {
            wal.stop();
        }
    }

    fn serve(&mut self, mut rx: mpsc::Receiver<Submission>) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "ledger writer cannot start its timer runtime");
                return;
            }
        };
        let mut batch: Vec<Submission> = Vec::new();
        loop {
            let due = (self.frontier.size() > self.checkpoint_size()
                || self.head.borrow().checkpoint.is_none())
            .then(|| (self.last_checkpoint + self.cfg.checkpoint_interval).max(self.backoff_until));
            let first = rt.block_on(async {
                match due {
                    Some(at) => tokio::time::timeout_at(at.into(), rx.recv())
                        .await
                        .map_err(|_| ()),
                    None => Ok(rx.recv().await),
                }
            });
            match first {
                Ok(Some(sub)) => batch.push(sub),
                Ok(None) => {
                    // All senders are gone: cover what was appended with a final checkpoint.
                    if self.frontier.size() > self.checkpoint_size() {
                        self.commit(&mut Vec::new(), true);
                    }
                    return;
                }
                Err(()) => {
                    // Timer: the tree grew and no checkpoint covers it yet.
                    self.commit(&mut Vec::new(), true);
                    continue;
                }
            }
            let mut total: usize = batch.iter().map(|s| s.entries.len()).sum();
            while total < self.cfg.max_batch_entries {
                match rx.try_recv() {
                    Ok(sub) => {
                        total += sub.entries.len();
                        batch.push(sub);
                    }
                    Err(_) => break,
                }
            }
            let due = self.last_checkpoint.elapsed() >= self.cfg.checkpoint_interval;
            self.commit(&mut batch, due);
        }
    }

    fn commit(&mut self, batch: &mut Vec<Submission>, checkpoint_due: bool) {
        let started = std::time::Instant::now();
        let before = self.frontier.clone();
        let want_cp = checkpoint_due
            || batch.iter().any(|s| s.want_checkpoint)
            || self.head.borrow().checkpoint.is_none();
        // Ahead of the log unless a checkpoint is signed (it is published only once durable),
        // the log has failed, or it is due to start over.
        let ahead = !want_cp
            && self
                .wal
                .as_ref()
                .is_some_and(|w| w.usable() && w.since_reset < wal::ROTATE_BYTES);
        let mut frame = ahead.then(|| wal::FrameBuilder::new(self.frontier.size()));
        let result = (|| -> Result<TxnOutcome, StorageError> {
            let txn = if ahead {
                self.storage.begin_write_ahead()?
            } else {
                self.storage.begin_write()?
            };
            let mut placed = Vec::with_capacity(batch.len());
            let mut tables = storage::BatchTables::open(&txn)?;
            for sub in batch.iter() {
                let mut out = Vec::with_capacity(sub.entries.len());
                tables.place(&mut self.frontier, &sub.entries, &mut out, frame.as_mut())?;
                placed.push(out);
            }
            tables.finish(&txn, &self.frontier)?;
            let cp = if want_cp
                && (self.frontier.size() > self.checkpoint_size()
                    || self.head.borrow().checkpoint.is_none())
            {
                Some(storage::write_checkpoint(
                    &txn,
                    &self.frontier,
                    &self.cfg.origin,
                    &self.signer,
                )?)
            } else {
                None
            };
            txn.commit()?;
            Ok((placed, cp))
        })();
        let entries: usize = batch.iter().map(|s| s.entries.len()).sum();
        match result {
            Ok((placed, cp)) => {
                self.metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                if entries > 0 {
                    self.metrics.batch_entries.observe(entries as f64);
                }
                let signed = match cp {
                    Some((checkpoint, note)) => {
                        // Persisted in the database; record it outside too before anyone sees it.
                        if let Err(e) = write_signer_state(&self.cfg.signer_state, &note) {
                            self.backoff_until = std::time::Instant::now() + RETRY_BACKOFF;
                            tracing::error!(error = %e, path = %self.cfg.signer_state.display(), "cannot record signer state; checkpoint not published");
                            None
                        } else {
                            self.last_checkpoint = std::time::Instant::now();
                            self.metrics.checkpoint_size.set(checkpoint.size as i64);
                            self.metrics.checkpoints.inc();
                            self.metrics.checkpoint_time.set(unix_seconds());
                            Some(Arc::new(SignedCheckpoint { checkpoint, note }))
                        }
                    }
                    None => None,
                };
                let size = self.frontier.size();
                if !ahead {
                    // Durable, and so is every commit before it.
                    self.storage.publish(size);
                    self.metrics.tree_size.set(size as i64);
                }
                self.head.send_modify(|h| {
                    if !ahead {
                        h.size = h.size.max(size);
                    }
                    if let Some(s) = &signed {
                        h.checkpoint = Some(s.clone());
                    }
                });
                let latest = self.head.borrow().checkpoint.clone();
                let mut acks = Vec::with_capacity(if ahead { batch.len() } else { 0 });
                for (sub, placed) in batch.drain(..).zip(placed) {
                    let covering = latest.clone().filter(|c| {
                        placed.iter().all(|p| match p {
                            Placed::Appended { index, .. } | Placed::Duplicate { index, .. } => {
                                *index < c.checkpoint.size
                            }
                            Placed::Conflict { .. } => true,
                        })
                    });
                    let checkpoint = if sub.want_checkpoint { covering } else { None };
                    let ack = Ack {
                        reply: sub.reply,
                        enqueued: sub.enqueued,
                        committed: Committed { placed, checkpoint },
                    };
                    if ahead {
                        acks.push(ack);
                    } else {
                        ack.send(&self.metrics);
                    }
                }
                if let Some(wal) = &mut self.wal {
                    if ahead {
                        let bytes = frame
                            .take()
                            .map(wal::FrameBuilder::finish)
                            .unwrap_or_default();
                        wal.send(ToSync::Frame { bytes, size, acks }, &self.metrics);
                    } else if wal.usable() && wal.since_reset > 0 {
                        // Only when frames were written since the log last started over: a
                        // ledger whose every commit is durable (proofs asked on each append)
                        // would otherwise zero and sync the log's header after each one.
                        wal.send(ToSync::Reset, &self.metrics);
                    }
                }
            }
            Err(e) => {
                self.frontier = before;
                self.backoff_until = std::time::Instant::now() + RETRY_BACKOFF;
                tracing::error!(error = %e, entries, "ledger commit failed; batch rejected");
                self.metrics
                    .appends
                    .with_label_values(&["failed"])
                    .inc_by(entries as u64);
                for sub in batch.drain(..) {
                    let _ = sub.reply.send(Err(AppendError::Commit(e.to_string())));
                }
            }
        }
    }
}

/// An answer held until its entries are durable.
struct Ack {
    reply: oneshot::Sender<Result<Committed, AppendError>>,
    enqueued: Instant,
    committed: Committed,
}

impl Ack {
    fn send(self, metrics: &Metrics) {
        metrics.count_placed(&self.committed.placed);
        metrics
            .append_seconds
            .observe(self.enqueued.elapsed().as_secs_f64());
        // The submitter may have given up (client gone); the entries are stored anyway.
        let _ = self.reply.send(Ok(self.committed));
    }

    fn fail(self, metrics: &Metrics, reason: &str) {
        let entries = self.committed.placed.len() as u64;
        metrics
            .appends
            .with_label_values(&["failed"])
            .inc_by(entries);
        let _ = self
            .reply
            .send(Err(AppendError::Unsynced(reason.to_owned())));
    }
}

/// What the writer hands the syncer, in commit order.
enum ToSync {
    /// The frame of a commit ahead of the log (empty when it appended nothing: its answers then
    /// wait only for the frames before it), the tree size after it, and its answers.
    Frame {
        bytes: Vec<u8>,
        size: u64,
        acks: Vec<Ack>,
    },
    /// A durable commit made every frame so far redundant: start the log over.
    Reset,
}

/// Most messages between the writer and the syncer: when the disk falls behind, the writer waits.
const SYNC_QUEUE: usize = 1024;

/// The writer's handle on the syncer thread.
struct Syncer {
    tx: std::sync::mpsc::SyncSender<ToSync>,
    failed: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
    /// Frame bytes handed over since the log last started over.
    since_reset: u64,
}

impl Syncer {
    fn start(
        file: wal::WalFile,
        storage: Storage,
        head: Arc<watch::Sender<Head>>,
        metrics: Metrics,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(SYNC_QUEUE);
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let state = SyncState {
            file,
            storage,
            head,
            metrics,
            failed: failed.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("ledger-wal".into())
            .spawn(move || state.run(&rx))?;
        Ok(Self {
            tx,
            failed,
            thread,
            since_reset: 0,
        })
    }

    /// Whether commits may still go ahead of the log: after a failed write or sync, every commit
    /// syncs redb itself.
    fn usable(&self) -> bool {
        !self.failed.load(std::sync::atomic::Ordering::Acquire)
    }

    fn send(&mut self, msg: ToSync, metrics: &Metrics) {
        match &msg {
            ToSync::Frame { bytes, .. } => self.since_reset += bytes.len() as u64,
            ToSync::Reset => self.since_reset = 0,
        }
        if let Err(std::sync::mpsc::SendError(msg)) = self.tx.send(msg) {
            self.failed
                .store(true, std::sync::atomic::Ordering::Release);
            if let ToSync::Frame { acks, .. } = msg {
                for ack in acks {
                    ack.fail(metrics, "the syncer thread is gone");
                }
            }
        }
    }

    /// Waits for every frame handed over to be synced and answered.
    fn stop(self) {
        drop(self.tx);
        if self.thread.join().is_err() {
            tracing::error!("the write-ahead log syncer panicked");
        }
    }
}

struct SyncState {
    file: wal::WalFile,
    storage: Storage,
    head: Arc<watch::Sender<Head>>,
    metrics: Metrics,
    failed: Arc<std::sync::atomic::AtomicBool>,
}

impl SyncState {
    fn run(mut self, rx: &std::sync::mpsc::Receiver<ToSync>) {
        let mut acks = Vec::new();
        let mut size = None;
        let mut written = false;
        while let Ok(first) = rx.recv() {
            // Everything waiting is written (one `pwrite` per frame) and synced once.
            let mut next = Some(first);
            while let Some(msg) = next {
                match msg {
                    ToSync::Frame {
                        bytes,
                        size: s,
                        acks: a,
                    } => {
                        if !bytes.is_empty() && self.usable() {
                            if let Err(e) = self.file.append(&bytes) {
                                self.fail(&e);
                            }
                            written = true;
                        }
                        size = Some(s);
                        acks.extend(a);
                    }
                    ToSync::Reset => {
                        self.flush(&mut acks, &mut size, &mut written);
                        if self.usable()
                            && let Err(e) = self.file.reset()
                        {
                            self.fail(&e);
                        }
                    }
                }
                next = rx.try_recv().ok();
            }
            self.flush(&mut acks, &mut size, &mut written);
        }
    }

    fn usable(&self) -> bool {
        !self.failed.load(std::sync::atomic::Ordering::Acquire)
    }

    fn fail(&self, e: &std::io::Error) {
        if self.usable() {
            tracing::error!(error = %e, "the write-ahead log failed; every commit now syncs the database itself");
        }
        self.failed
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Syncs what was written, then publishes the new size and answers.
    fn flush(&mut self, acks: &mut Vec<Ack>, size: &mut Option<u64>, written: &mut bool) {
        if std::mem::take(written) && self.usable() {
            let started = std::time::Instant::now();
            if let Err(e) = self.file.sync() {
                self.fail(&e);
            }
            self.metrics
                .wal_sync_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        if !self.usable() {
            for ack in acks.drain(..) {
                ack.fail(
                    &self.metrics,
                    "a write or sync of the write-ahead log failed",
                );
            }
            *size = None;
            return;
        }
        if let Some(size) = size.take() {
            self.storage.publish(size);
            self.head.send_if_modified(|h| {
                let grew = size > h.size;
                h.size = h.size.max(size);
                grew
            });
            self.metrics.tree_size.set(self.head.borrow().size as i64);
        }
        for ack in acks.drain(..) {
            ack.send(&self.metrics);
        }
    }
}

fn unix_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    // Unit tests: a panic is the failure report.
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A write of the log that fails (a full disk) answers its submitters "may or may not be
    /// stored", publishes nothing to readers, and stops commits going ahead of the log.
    #[test]
    fn a_log_that_cannot_be_written_answers_unsynced_and_stops_going_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let signer = NoteSigner::from_seed("test/wal-fail", [7; 32]).unwrap();
        let (storage, _) = Storage::open(
            &dir.path().join("ledger.redb"),
            &signer.verifier(),
            "test/wal-fail",
        )
        .unwrap();
        storage.hold_visible(0);
        let (head, head_rx) = watch::channel(Head {
            size: 0,
            checkpoint: None,
        });
        let registry = prometheus::Registry::new();
        let metrics = Metrics::register(&registry);
        let mut syncer = Syncer::start(
            wal::WalFile::on_full_device().unwrap(),
            storage.clone(),
            Arc::new(head),
            metrics.clone(),
        )
        .unwrap();
        assert!(syncer.usable());
        let mut frame = wal::FrameBuilder::new(0);
        frame.push(b"an entry");
        let (reply, answer) = oneshot::channel();
        let placed = vec![Placed::Appended {
            index: 0,
            leaf: medmesh_core::merkle::leaf_hash(b"an entry"),
            received_us: 1,
        }];
        syncer.send(
            ToSync::Frame {
                bytes: frame.finish(),
                size: 1,
                acks: vec![Ack {
                    reply,
                    enqueued: Instant::now(),
                    committed: Committed {
                        placed,
                        checkpoint: None,
                    },
                }],
            },
            &metrics,
        );
        let err = answer.blocking_recv().unwrap().unwrap_err();
        assert!(matches!(err, AppendError::Unsynced(_)), "{err}");
        assert!(
            err.to_string().contains("may or may not be stored"),
            "{err}"
        );
        assert!(!syncer.usable(), "commits no longer go ahead of the log");
        assert_eq!(head_rx.borrow().size, 0, "nothing published");
        assert_eq!(storage.reader().unwrap().size(), 0);
        assert_eq!(
            metrics.appends.with_label_values(&["failed"]).get(),
            1,
            "the failed append is counted"
        );
        syncer.stop();
    }
}
