//! Group commit: one writer thread turns every append waiting in its queue into a single durable
//! redb transaction, then acknowledges them all.
//!
//! Invariants:
//! - an append is acknowledged only after the transaction holding it has committed with
//!   `Durability::Immediate`;
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
        let (head_tx, head_rx) = watch::channel(head);
        let writer = Writer {
            storage,
            frontier: recovered.frontier,
            signer,
            cfg,
            metrics,
            head: head_tx,
            last_checkpoint: std::time::Instant::now(),
            backoff_until: std::time::Instant::now(),
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
    head: watch::Sender<Head>,
    last_checkpoint: std::time::Instant,
    /// After a failed commit or signer-state write, no timer-driven retry before this instant
    /// (a failing disk must not be hammered with signed, fsynced retries).
    backoff_until: std::time::Instant,
}

impl Writer {
    fn checkpoint_size(&self) -> u64 {
        self.head
            .borrow()
            .checkpoint
            .as_ref()
            .map_or(0, |c| c.checkpoint.size)
    }

    fn run(mut self, mut rx: mpsc::Receiver<Submission>) {
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
        let result = (|| -> Result<TxnOutcome, StorageError> {
            let txn = self.storage.begin_write()?;
            let mut placed = Vec::with_capacity(batch.len());
            let mut tables = storage::BatchTables::open(&txn)?;
            for sub in batch.iter() {
                let mut out = Vec::with_capacity(sub.entries.len());
                tables.place(&mut self.frontier, &sub.entries, &mut out)?;
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
                self.metrics.tree_size.set(size as i64);
                self.head.send_modify(|h| {
                    h.size = size;
                    if let Some(s) = &signed {
                        h.checkpoint = Some(s.clone());
                    }
                });
                let latest = self.head.borrow().checkpoint.clone();
                for (sub, placed) in batch.drain(..).zip(placed) {
                    self.metrics.count_placed(&placed);
                    self.metrics
                        .append_seconds
                        .observe(sub.enqueued.elapsed().as_secs_f64());
                    let covering = latest.clone().filter(|c| {
                        placed.iter().all(|p| match p {
                            Placed::Appended { index, .. } | Placed::Duplicate { index, .. } => {
                                *index < c.checkpoint.size
                            }
                            Placed::Conflict { .. } => true,
                        })
                    });
                    let checkpoint = if sub.want_checkpoint { covering } else { None };
                    // The submitter may have given up (client gone); the entries are stored anyway.
                    let _ = sub.reply.send(Ok(Committed { placed, checkpoint }));
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

fn unix_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
