//! Delivery of audit records to the ledger.
//!
//! - `enforce`: [`Delivery::commit`] returns only once the ledger acknowledged the record; if it
//!   cannot within the deadline the caller gets an error: the client then sees a failure, never
//!   an unrecorded success, and the caller keeps the record (with that failure) for later
//!   delivery through [`Delivery::later`].
//! - `spool`: [`Delivery::commit`] returns once the record is durable in the local spool; a
//!   background task delivers the spool with backoff.
//!
//! Delivery is idempotent (record ids), so a replay after a crash never duplicates an entry.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use medmesh_core::NoteVerifier;
use medmesh_core::record::AuditRecord;
use medmesh_core::tls::{ServerIdentity, TrustBundle};
use medmesh_ledger_client::{LedgerClient, LedgerClientConfig};
use tokio::sync::{Notify, watch};

use crate::identity::Credentials;
use crate::metrics::Metrics;
use crate::spool::{Spool, SpoolError};

/// How records are made safe before a response is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Acknowledged by the ledger.
    Enforce,
    /// Durable in the local spool.
    Spool,
}

/// Where the ledger is and how to trust it.
#[derive(Debug, Clone)]
pub struct LedgerTarget {
    /// Base URL.
    pub url: String,
    /// Expected server identity.
    pub server: ServerIdentity,
    /// Checkpoint verifier.
    pub verifier: NoteVerifier,
    /// Log origin.
    pub origin: String,
}

/// Why a record could not be made safe.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryError {
    /// The ledger did not acknowledge in time (enforce).
    #[error("ledger did not acknowledge within {0:?}")]
    NotAcknowledged(Duration),
    /// No credentials to talk to the ledger yet.
    #[error("no workload certificate loaded yet")]
    NoCredentials,
    /// The spool refused it.
    #[error("{0}")]
    Spool(#[from] SpoolError),
}

/// The delivery service of one sidecar.
pub struct Delivery {
    mode: Mode,
    target: LedgerTarget,
    deadline: Duration,
    creds: watch::Receiver<Option<Arc<Credentials>>>,
    client: Mutex<Option<(usize, LedgerClient)>>,
    spool: Mutex<Spool>,
    wake: Notify,
    metrics: Metrics,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("mode", &self.mode)
            .field("url", &self.target.url)
            .finish()
    }
}

impl Delivery {
    /// A delivery service; call [`Delivery::spawn`] to start draining the spool.
    pub fn new(
        mode: Mode,
        target: LedgerTarget,
        deadline: Duration,
        creds: watch::Receiver<Option<Arc<Credentials>>>,
        spool: Spool,
        metrics: Metrics,
    ) -> Arc<Self> {
        spool_gauges(&metrics, &spool);
        Arc::new(Self {
            mode,
            target,
            deadline,
            creds,
            client: Mutex::new(None),
            spool: Mutex::new(spool),
            wake: Notify::new(),
            metrics,
        })
    }

    /// The ledger client for the current credentials (rebuilt when they rotate).
    fn client(&self) -> Result<LedgerClient, DeliveryError> {
        let creds = self
            .creds
            .borrow()
            .clone()
            .ok_or(DeliveryError::NoCredentials)?;
        let key = Arc::as_ptr(&creds) as usize;
        // The lock guards a cheap clone; it is never held across an await.
        let mut slot = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, c)) = slot.as_ref()
            && *k == key
        {
            return Ok(c.clone());
        }
        let bundle: TrustBundle = creds.bundle.clone();
        let c = LedgerClient::new(LedgerClientConfig {
            url: self.target.url.clone(),
            identity: creds.identity.clone(),
            bundle,
            server: self.target.server.clone(),
            verifier: self.target.verifier.clone(),
            origin: self.target.origin.clone(),
            timeout: self.deadline,
        })
        .map_err(|_| DeliveryError::NoCredentials)?;
        *slot = Some((key, c.clone()));
        Ok(c)
    }

    /// Counts records made, by kind and outcome.
    fn count(&self, recs: &[AuditRecord]) {
        for r in recs {
            self.metrics
                .audit_events
                .with_label_values(&[r.kind.as_str(), r.outcome.as_str()])
                .inc();
        }
    }

    /// Appends `recs` to the spool with one fsync (blocking work) and wakes the drain.
    fn spool_all(&self, recs: &[AuditRecord]) -> Result<(), DeliveryError> {
        let mut s = self.spool.lock().unwrap_or_else(|p| p.into_inner());
        s.append_all(recs)?;
        spool_gauges(&self.metrics, &s);
        drop(s);
        self.wake.notify_one();
        Ok(())
    }

    /// Makes `rec` safe according to the mode. See the module documentation.
    ///
    /// # Errors
    /// When the record could not be made safe; the response must then report a failure.
    pub async fn commit(&self, rec: AuditRecord) -> Result<(), DeliveryError> {
        self.commit_all(vec![rec]).await
    }

    /// Makes all of `recs` safe at once (one spool fsync, or one batch the ledger commits in
    /// one transaction); all or nothing is reported safe.
    ///
    /// # Errors
    /// When they could not be made safe; the response must then report a failure.
    pub async fn commit_all(&self, recs: Vec<AuditRecord>) -> Result<(), DeliveryError> {
        self.count(&recs);
        if recs.is_empty() {
            return Ok(());
        }
        let n = recs.len() as u64;
        match self.mode {
            Mode::Spool => {
                // fsync is blocking work.
                tokio::task::block_in_place(|| self.spool_all(&recs))?;
                self.metrics
                    .records
                    .with_label_values(&["spooled"])
                    .inc_by(n);
                Ok(())
            }
            Mode::Enforce => {
                // On failure nothing is spooled here: the caller keeps the records as the client
                // sees them (failures), so that the ledger never shows a success that was not.
                let client = self.client()?;
                // A conflict is a record id the ledger holds with other content: not this
                // record, so not safe.
                let all = async {
                    let mut conflicts = 0;
                    for chunk in recs.chunks(1000) {
                        let r = client.append_batch(chunk.to_vec(), false).await?;
                        conflicts += r.results.iter().filter(|r| r.conflict).count();
                    }
                    Ok::<_, medmesh_ledger_client::ClientError>(conflicts)
                };
                let started = std::time::Instant::now();
                let acked = tokio::time::timeout(self.deadline, all).await;
                self.metrics
                    .audit_gate_seconds
                    .observe(started.elapsed().as_secs_f64());
                match acked {
                    Ok(Ok(0)) => {
                        self.metrics
                            .records
                            .with_label_values(&["acknowledged"])
                            .inc_by(n);
                        Ok(())
                    }
                    _ => {
                        self.metrics
                            .records
                            .with_label_values(&["not_acknowledged"])
                            .inc_by(n);
                        Err(DeliveryError::NotAcknowledged(self.deadline))
                    }
                }
            }
        }
    }

    /// Several records that need no gate, with one spool fsync.
    pub async fn later_all(&self, recs: Vec<AuditRecord>) {
        self.count(&recs);
        if recs.is_empty() {
            return;
        }
        let n = recs.len() as u64;
        if let Err(e) = tokio::task::block_in_place(|| self.spool_all(&recs)) {
            self.metrics
                .records
                .with_label_values(&["dropped"])
                .inc_by(n);
            tracing::error!(error = %e, records = n, "audit records could not be spooled");
        }
    }

    /// Records spooled durably (one fsync) for background delivery; the caller learns whether
    /// they were.
    ///
    /// # Errors
    /// When the spool refused them.
    pub async fn later_durable_all(&self, recs: Vec<AuditRecord>) -> Result<(), DeliveryError> {
        if recs.is_empty() {
            return Ok(());
        }
        tokio::task::block_in_place(|| self.spool_all(&recs))?;
        // Counted once they are safe: the caller retries the same records after a failure.
        self.count(&recs);
        self.metrics
            .records
            .with_label_values(&["spooled"])
            .inc_by(recs.len() as u64);
        Ok(())
    }

    /// Records that need no gate (associations, queries, retrievals): spooled, delivered later.
    pub async fn later(&self, rec: AuditRecord) {
        self.later_all(vec![rec]).await;
    }

    /// Starts the background task that delivers the spool, oldest first, with backoff.
    pub fn spawn(self: &Arc<Self>, mut stop: watch::Receiver<bool>) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let batch: Vec<(crate::spool::Position, AuditRecord)> = {
                    let s = this.spool.lock().unwrap_or_else(|p| p.into_inner());
                    s.pending().take(500).map(|(p, r)| (p, r.clone())).collect()
                };
                if batch.is_empty() {
                    tokio::select! {
                        _ = this.wake.notified() => continue,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
                let Some(last) = batch.last().map(|(p, _)| *p) else {
                    continue;
                };
                let records: Vec<AuditRecord> = batch.into_iter().map(|(_, r)| r).collect();
                let n = records.len();
                let ok = match this.client() {
                    Ok(c) => {
                        matches!(c.append_batch(records, false).await, Ok(r) if r.results.len() == n)
                    }
                    Err(_) => false,
                };
                if ok {
                    backoff = Duration::from_millis(100);
                    this.metrics
                        .records
                        .with_label_values(&["delivered"])
                        .inc_by(n as u64);
                    let r = tokio::task::block_in_place(|| {
                        let mut s = this.spool.lock().unwrap_or_else(|p| p.into_inner());
                        let r = s.ack(last);
                        spool_gauges(&this.metrics, &s);
                        r
                    });
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "spool acknowledgement not recorded; records will be sent again (idempotently)");
                    }
                } else {
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        });
    }

    /// Undelivered records.
    pub fn depth(&self) -> usize {
        self.spool.lock().unwrap_or_else(|p| p.into_inner()).depth()
    }
}

/// The spool's depth and the time of its oldest record.
fn spool_gauges(metrics: &Metrics, spool: &Spool) {
    metrics.spool_depth.set(spool.depth() as i64);
    metrics.spool_oldest.set(
        spool
            .pending()
            .next()
            .map_or(0, |(_, r)| (r.time_us / 1_000_000) as i64),
    );
}
