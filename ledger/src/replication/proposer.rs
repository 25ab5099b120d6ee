//! The leader's half of the sequencer: submissions waiting in the queue become one Raft entry;
//! each is acknowledged once that entry is committed (durable on a majority) and applied here.
//! Up to [`MAX_IN_FLIGHT`] entries are replicated at once, and submissions arriving meanwhile
//! form the next one (group commit across the network).
//!
//! Checkpoints are signed only here, on the leader, over the size and root its own entry
//! produced when applied: that entry follows every entry committed before it (including every
//! entry of former leaders), so a new leader never signs a tree smaller than one already signed,
//! and every tree it signs is a prefix of the one committed log. Each signature is recorded in
//! the signer state file before it is served, then replicated as a `Checkpoint` entry.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use medmesh_core::merkle::Hash;
use medmesh_core::record::LogEntry;
use medmesh_core::{Checkpoint, NoteSigner};
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{Semaphore, mpsc, watch};

use super::{Command, NodeId, Raft};
use crate::metrics::Metrics;
use crate::sequencer::{
    AppendError, Committed, Head, SignedCheckpoint, SignerStateFile, Submission,
};
use crate::storage::Placed;

/// Most Raft entries of appends being replicated at once.
pub const MAX_IN_FLIGHT: usize = 4;

/// The leader-side proposer.
pub struct Proposer {
    raft: Raft,
    id: NodeId,
    head: Arc<watch::Sender<Head>>,
    signer: NoteSigner,
    origin: String,
    signer_state: Arc<SignerStateFile>,
    /// One signature at a time: checkpoints are published in size order.
    signing: tokio::sync::Mutex<()>,
    interval: Duration,
    max_batch: usize,
    metrics: Metrics,
    timer_busy: AtomicBool,
}

impl std::fmt::Debug for Proposer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proposer").field("id", &self.id).finish()
    }
}

/// Settings of a proposer.
#[derive(Debug, Clone)]
pub struct ProposerConfig {
    /// This replica's id.
    pub id: NodeId,
    /// Log origin.
    pub origin: String,
    /// Longest time between tree growth and a checkpoint covering it.
    pub checkpoint_interval: Duration,
    /// Most entries in one Raft entry.
    pub max_batch_entries: usize,
}

impl Proposer {
    /// A proposer for `raft`.
    pub fn new(
        raft: Raft,
        head: Arc<watch::Sender<Head>>,
        signer: NoteSigner,
        signer_state: Arc<SignerStateFile>,
        cfg: ProposerConfig,
        metrics: Metrics,
    ) -> Self {
        Self {
            raft,
            id: cfg.id,
            head,
            signer,
            origin: cfg.origin,
            signer_state,
            signing: tokio::sync::Mutex::new(()),
            interval: cfg.checkpoint_interval,
            max_batch: cfg.max_batch_entries,
            metrics,
            timer_busy: AtomicBool::new(false),
        }
    }

    fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// Serves `rx` until every sender is gone, then waits for the entries in flight and, when
    /// leading, covers the tree with a last checkpoint.
    pub async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<Submission>) {
        let inflight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                sub = rx.recv() => {
                    let Some(first) = sub else { break };
                    // While every slot is busy, later submissions queue up and join this batch.
                    let Ok(permit) = inflight.clone().acquire_owned().await else { break };
                    let mut total = first.entries.len();
                    let mut batch = vec![first];
                    while total < self.max_batch {
                        match rx.try_recv() {
                            Ok(s) => {
                                total += s.entries.len();
                                batch.push(s);
                            }
                            Err(_) => break,
                        }
                    }
                    let me = self.clone();
                    tokio::spawn(async move {
                        me.propose(batch).await;
                        drop(permit);
                    });
                }
                _ = tick.tick() => {
                    if !self.timer_busy.swap(true, Ordering::AcqRel) {
                        let me = self.clone();
                        tokio::spawn(async move {
                            me.checkpoint_if_grown().await;
                            me.timer_busy.store(false, Ordering::Release);
                        });
                    }
                }
            }
        }
        let _ = inflight.acquire_many(MAX_IN_FLIGHT as u32).await;
        self.checkpoint_if_grown().await;
    }

    /// On the leader: when the tree has grown past the latest checkpoint (or none exists yet),
    /// replicates an empty entry and signs the tree it leaves.
    async fn checkpoint_if_grown(&self) {
        let grown = {
            let h = self.head.borrow();
            h.checkpoint
                .as_ref()
                .is_none_or(|c| c.checkpoint.size < h.size)
        };
        if !grown || !self.is_leader() {
            return;
        }
        match self.raft.client_write(Command::Append(Vec::new())).await {
            Ok(resp) => {
                self.covering(resp.data.size, Hash(resp.data.root)).await;
            }
            Err(e) => tracing::debug!(error = %e, "no checkpoint this round: not leading"),
        }
    }

    async fn propose(&self, mut batch: Vec<Submission>) {
        let mut encoded = Vec::new();
        let mut lens = Vec::with_capacity(batch.len());
        for s in &mut batch {
            lens.push(s.entries.len());
            for e in s.entries.drain(..) {
                encoded.push(
                    LogEntry {
                        received_us: e.received_us,
                        submitter: e.submitter,
                        record: e.record,
                    }
                    .encode(),
                );
            }
        }
        let total = encoded.len();
        let want = batch.iter().any(|s| s.want_checkpoint);
        let started = std::time::Instant::now();
        let result = self.raft.client_write(Command::Append(encoded)).await;
        let outcome = match result {
            Ok(resp) if resp.data.placed.len() == total => Ok(resp.data),
            Ok(resp) => Err(AppendError::Commit(format!(
                "state machine answered {} results for {total} entries",
                resp.data.placed.len()
            ))),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(AppendError::NotLeader(f.leader_id))
            }
            Err(e) => Err(AppendError::Unavailable(e.to_string())),
        };
        let applied = match outcome {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, entries = total, "proposal not acknowledged");
                self.metrics
                    .appends
                    .with_label_values(&["failed"])
                    .inc_by(total as u64);
                for s in batch {
                    let _ = s.reply.send(Err(e.clone()));
                }
                return;
            }
        };
        self.metrics
            .propose_seconds
            .observe(started.elapsed().as_secs_f64());
        if total > 0 {
            self.metrics.batch_entries.observe(total as f64);
        }
        let latest = if want {
            self.covering(applied.size, Hash(applied.root)).await
        } else {
            None
        };
        let mut placed = applied.placed.into_iter().map(Placed::from);
        for (s, n) in batch.into_iter().zip(lens) {
            let mine: Vec<Placed> = placed.by_ref().take(n).collect();
            self.metrics.count_placed(&mine);
            self.metrics
                .append_seconds
                .observe(s.enqueued.elapsed().as_secs_f64());
            let checkpoint = if s.want_checkpoint {
                latest.clone()
            } else {
                None
            };
            let _ = s.reply.send(Ok(Committed {
                placed: mine,
                checkpoint,
            }));
        }
    }

    /// A checkpoint covering the tree of `size` leaves with `root` (applied here, after an entry
    /// of this leader's term): the published one if it is at least that large, else a new one.
    async fn covering(&self, size: u64, root: Hash) -> Option<Arc<SignedCheckpoint>> {
        let _one = self.signing.lock().await;
        if let Some(cp) = self.head.borrow().checkpoint.clone()
            && cp.checkpoint.size >= size
        {
            return Some(cp);
        }
        let checkpoint = Checkpoint {
            origin: self.origin.clone(),
            size,
            root,
        };
        let note = match checkpoint.sign(&self.signer) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "cannot sign checkpoint");
                return None;
            }
        };
        let state = self.signer_state.clone();
        let n = note.clone();
        match tokio::task::spawn_blocking(move || state.record(size, &n)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, path = %self.signer_state.path().display(), "cannot record signer state; checkpoint not published");
                return None;
            }
            Err(e) => {
                tracing::error!(error = %e, "signer state task failed");
                return None;
            }
        }
        let signed = Arc::new(SignedCheckpoint {
            checkpoint,
            note: note.clone(),
        });
        self.metrics.checkpoints.inc();
        self.metrics.checkpoint_size.set(size as i64);
        self.metrics.checkpoint_time.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        );
        self.head.send_modify(|h| {
            if h.checkpoint
                .as_ref()
                .is_none_or(|c| c.checkpoint.size < size)
            {
                h.checkpoint = Some(signed.clone());
            }
        });
        // Every replica stores and serves it once it is committed.
        let raft = self.raft.clone();
        tokio::spawn(async move {
            if let Err(e) = raft.client_write(Command::Checkpoint(note)).await {
                tracing::debug!(error = %e, "checkpoint not replicated (leadership changed)");
            }
        });
        Some(signed)
    }
}
