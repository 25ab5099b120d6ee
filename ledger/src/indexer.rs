//! The indexer: keeps the search indexes (`index.redb`) up with the log, off the path that
//! acknowledges appends. It follows the writer's head, indexes new entries in transactions of up
//! to `CHUNK` entries, and publishes how far it got so that searches can wait for it.

use std::time::Duration;

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::sequencer::Head;
use crate::storage::{self, Storage};

/// Most entries indexed in one transaction.
const CHUNK: u64 = 20_000;
/// How long the indexer lets new entries accumulate before indexing fewer than `CHUNK`: larger
/// transactions amortise the B-tree page copies of random-key inserts.
const GATHER: Duration = Duration::from_millis(250);
/// Longest time between durable index commits.
const DURABLE_EVERY: Duration = Duration::from_secs(1);

/// Starts the indexer thread. It exits once the writer is gone and everything is indexed.
///
/// # Errors
/// When the thread cannot be spawned.
pub fn spawn(
    storage: Storage,
    mut head: watch::Receiver<Head>,
    indexed_tx: watch::Sender<u64>,
    metrics: Metrics,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ledger-indexer".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_time().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "indexer cannot start its runtime; search will not update");
                    return;
                }
            };
            let mut indexed = *indexed_tx.borrow();
            let mut writer_gone = false;
            let mut last_durable = std::time::Instant::now();
            let mut failures_after_writer = 0;
            loop {
                let mut target = head.borrow_and_update().size;
                if indexed < target && target - indexed < CHUNK && !writer_gone {
                    std::thread::sleep(GATHER);
                    target = head.borrow_and_update().size;
                }
                metrics.index_lag.set(target.saturating_sub(indexed) as i64);
                if indexed < target {
                    let to = target.min(indexed + CHUNK);
                    let durable = writer_gone || last_durable.elapsed() >= DURABLE_EVERY;
                    match storage::index_entries(&storage, indexed, to, durable) {
                        Ok(()) => {
                            indexed = to;
                            if durable {
                                last_durable = std::time::Instant::now();
                            }
                            indexed_tx.send_replace(indexed);
                            // Whole level 1 epochs of the hash-keyed tables move up, keeping
                            // lookups bounded: a rare, sequential pass. Retried after the next
                            // index commit when it fails.
                            loop {
                                match storage::compact_index(&storage, durable) {
                                    Ok(true) => {}
                                    Ok(false) => break,
                                    Err(e) => {
                                        tracing::warn!(error = %e, "moving index rows to level 1 failed; retrying later");
                                        break;
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            // Derived data: retry later; appends and proofs are unaffected. Once
                            // the writer is gone, give up after a few tries: the next start
                            // redoes the missing part.
                            tracing::error!(error = %e, from = indexed, to, "indexing failed; retrying");
                            if writer_gone {
                                failures_after_writer += 1;
                                if failures_after_writer >= 3 {
                                    return;
                                }
                            }
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                    continue;
                }
                if writer_gone {
                    // Make the last index commit durable before exiting.
                    if let Err(e) = storage::index_entries(&storage, indexed, indexed, true) {
                        tracing::warn!(error = %e, "final index commit failed; the index will be redone");
                    }
                    return;
                }
                if rt.block_on(head.changed()).is_err() {
                    // The writer stopped; index what it left, then stop too.
                    writer_gone = true;
                }
            }
        })
}
