//! The uploader: committed objects, oldest first, into the archive; then their
//! `instance_archived` records.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use medmesh_archive::{AddOptions, ClusterClient, LocalStore, MeshEndpoint, MeshTls};
use medmesh_core::record::{AuditRecord, ContentId, EventKind, Outcome, RecordId};
use tokio::sync::watch;

use super::staging::StagedMeta;
use super::{Archiver, Target};
use crate::deliver::Delivery;
use crate::identity::Credentials;
use crate::metrics::Metrics;

/// How long pins may take to reach the minimum before the object is retried later.
const PIN_WAIT: Duration = Duration::from_secs(30);
/// Objects uploaded at once.
const UPLOAD_CONCURRENCY: usize = 4;
/// How long after the last instance streamed through the proxy uploads resume.
const QUIET: Duration = Duration::from_millis(300);
/// Confirmed objects whose records are spooled with one fsync.
const SPOOL_GROUP: usize = 16;

/// What uploading one object gave: its ciphertext size and its record, or why not.
type Uploaded = Result<(u64, AuditRecord), Failure>;

/// Why one object was not archived this time.
enum Failure {
    /// Try again later (archive unreachable, pins not there yet).
    Retry(String),
    /// The object can never be archived as it is (bad meta, changed ciphertext).
    Corrupt(String),
}

/// The `instance_archived` record of a confirmed object.
pub fn archived_record(
    meta: &StagedMeta,
    cid: &ContentId,
    archive: &medmesh_core::SpiffeId,
    now_us: u64,
) -> AuditRecord {
    let i = &meta.instance;
    AuditRecord {
        record_id: meta.archived_record,
        kind: EventKind::InstanceArchived,
        time_us: now_us,
        // This workload archived it (it received the instance) into the archive.
        source: i.destination.clone(),
        destination: archive.clone(),
        protocol: i.protocol,
        outcome: Outcome::Success,
        status: None,
        bytes: meta.cipher_len,
        content_sha256: Some(meta.plaintext_sha256),
        study_uid: i.study_uid,
        series_uid: i.series_uid,
        sop_instance_uid: i.sop_instance_uid,
        calling_ae: None,
        called_ae: None,
        sop_class_uid: i.sop_class_uid.clone(),
        transfer_syntax_uid: i.transfer_syntax_uid.clone(),
        cid: Some(cid.clone()),
        archived_record: Some(i.record_id),
    }
}

/// An opaque pin name: nothing of the instance, only the archived record's id.
fn pin_name(id: &RecordId) -> String {
    format!("mm-{id}")
}

impl Archiver {
    /// Starts the uploader.
    pub fn spawn_uploader(
        self: &Arc<Self>,
        delivery: Arc<Delivery>,
        creds: watch::Receiver<Option<Arc<Credentials>>>,
        metrics: Metrics,
        mut stop: watch::Receiver<bool>,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            // Objects are uploaded in lanes that are refilled as each one finishes (no batch
            // waits for its slowest object); `taken` holds the ids in flight or waiting for
            // their records to be spooled, which `pending` still lists.
            let mut queue: VecDeque<RecordId> = VecDeque::new();
            let mut taken: HashSet<RecordId> = HashSet::new();
            let mut inflight = FuturesUnordered::new();
            let mut archived: Vec<(RecordId, u64, AuditRecord)> = Vec::new();
            let mut retry: Option<String> = None;
            loop {
                if inflight.is_empty() && archived.is_empty() {
                    if *stop.borrow() {
                        return;
                    }
                    if let Some(why) = retry.take() {
                        tracing::warn!(reason = %why, retry_in = ?backoff, "archiving delayed");
                        queue.clear();
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = stop.wait_for(|s| *s) => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                }
                // Transfers come first: while instances stream through the proxy (or did in
                // the last QUIET), no upload starts, unless the backlog passes a quarter of the
                // staging area (then archiving keeps pace with a sustained load, one at a
                // time). When idle, a few at a time: each add and pin confirmation is mostly
                // waiting (TLS, the cluster's DAG import, its pin tracker).
                let busy = this.staging.busy(QUIET);
                let lanes = match (busy, this.staging.used() < this.staging.limit() / 4) {
                    (false, _) => UPLOAD_CONCURRENCY,
                    (true, true) => 0,
                    (true, false) => 1,
                };
                while retry.is_none() && !*stop.borrow() && inflight.len() < lanes {
                    if queue.is_empty() {
                        let ids = tokio::task::block_in_place(|| {
                            this.staging.pending(2 * UPLOAD_CONCURRENCY + taken.len())
                        });
                        queue.extend(ids.into_iter().filter(|id| !taken.contains(id)));
                    }
                    let Some(id) = queue.pop_front() else { break };
                    taken.insert(id);
                    let (this, creds) = (&this, &creds);
                    inflight.push(async move { (id, this.archive_one(&id, creds).await) });
                }
                if inflight.is_empty() && archived.is_empty() {
                    // Nothing to do now: wait for a committed object, or for the proxy to
                    // quiet down.
                    let pause = if lanes == 0 {
                        QUIET / 2
                    } else {
                        Duration::from_secs(1)
                    };
                    tokio::select! {
                        _ = this.wake.notified(), if lanes > 0 => {}
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    continue;
                }
                // Stopping interrupts the uploads in flight: they are replayed at the next start
                // (the add is idempotent, the record id fixed); what is confirmed is spooled
                // below before the task ends.
                let next = tokio::select! {
                    n = inflight.next() => n,
                    _ = stop.wait_for(|s| *s) => {
                        inflight.clear();
                        None
                    }
                };
                if let Some((id, r)) = next {
                    match r {
                        Ok((bytes, rec)) => archived.push((id, bytes, rec)),
                        Err(Failure::Corrupt(why)) => {
                            tracing::error!(object = %id, reason = %why, "archive object cannot be archived; moved to failed/");
                            tokio::task::block_in_place(|| this.staging.quarantine(&id));
                            taken.remove(&id);
                        }
                        Err(Failure::Retry(why)) => {
                            metrics.archive_upload_failures.inc();
                            retry = Some(why);
                            taken.remove(&id);
                        }
                    }
                }
                // Confirmed records are spooled with one fsync for a group (or when nothing is
                // left in flight) before their objects go: from there the ledger delivery
                // retries them.
                if !archived.is_empty() && (archived.len() >= SPOOL_GROUP || inflight.is_empty()) {
                    let recs: Vec<AuditRecord> =
                        archived.iter().map(|(_, _, r)| r.clone()).collect();
                    match delivery.later_durable_all(recs).await {
                        Err(e) => {
                            metrics.archive_upload_failures.inc();
                            retry = Some(format!("spooling the archived records: {e}"));
                        }
                        Ok(()) => {
                            tokio::task::block_in_place(|| {
                                for (id, bytes, _) in &archived {
                                    this.staging.remove(id);
                                    metrics
                                        .archive_objects
                                        .with_label_values(&["archived"])
                                        .inc();
                                    metrics.archive_bytes.inc_by(*bytes);
                                }
                            });
                            if retry.is_none() {
                                backoff = Duration::from_millis(200);
                            }
                        }
                    }
                    for (id, _, _) in archived.drain(..) {
                        taken.remove(&id);
                    }
                }
                if *stop.borrow() {
                    // Stopping: what is in flight is replayed at the next start (idempotent);
                    // what is confirmed is spooled at the next turn.
                    inflight.clear();
                }
            }
        });
    }

    /// The archive's client for the current credentials (rebuilt only when they rotate).
    fn cluster_client(
        &self,
        url: &str,
        archive: &medmesh_core::SpiffeId,
        creds: &watch::Receiver<Option<Arc<Credentials>>>,
    ) -> Result<ClusterClient, Failure> {
        let c = creds
            .borrow()
            .clone()
            .ok_or_else(|| Failure::Retry("no workload certificate yet".into()))?;
        // The lock guards a cheap clone; it is never held across an await.
        let mut slot = self.cluster.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((built_for, client)) = slot.as_ref()
            && Arc::ptr_eq(built_for, &c)
        {
            return Ok(client.clone());
        }
        let tls = MeshTls {
            identity: c.identity.clone(),
            bundle: c.bundle.clone(),
            server: archive.clone(),
        };
        let ep = MeshEndpoint::new(url, Some(&tls), Duration::from_secs(10))
            .map_err(|e| Failure::Retry(e.to_string()))?;
        let client = ClusterClient::new(ep);
        *slot = Some((c, client.clone()));
        Ok(client)
    }

    async fn archive_one(
        &self,
        id: &RecordId,
        creds: &watch::Receiver<Option<Arc<Credentials>>>,
    ) -> Uploaded {
        let meta = tokio::task::block_in_place(|| self.staging.load(id))
            .map_err(|e| Failure::Corrupt(e.to_string()))?;
        let path = self.staging.object_path(id);
        let (cid, archive_id) = match &self.cfg.target {
            Target::Store(dir) => {
                let store = LocalStore::open(dir).map_err(|e| Failure::Retry(e.to_string()))?;
                let cid = tokio::task::block_in_place(|| store.put_file(&path))
                    .map_err(|e| Failure::Retry(e.to_string()))?;
                (cid, meta.instance.destination.clone())
            }
            Target::Cluster {
                url,
                id: archive,
                replication_min,
                replication_max,
            } => {
                let client = self.cluster_client(url, archive, creds)?;
                let cid = client
                    .add_file(
                        &path,
                        &AddOptions {
                            name: pin_name(id),
                            replication_min: *replication_min,
                            replication_max: *replication_max,
                        },
                    )
                    .await
                    .map_err(|e| Failure::Retry(e.to_string()))?;
                if cid.multihash_bytes() == meta.cid.multihash_bytes() {
                    wait_pinned(&client, &cid, *replication_min).await?;
                }
                (cid, archive.clone())
            }
        };
        if cid.multihash_bytes() != meta.cid.multihash_bytes() {
            return Err(Failure::Corrupt(format!(
                "the archive computed {cid} for the staged ciphertext, staged as {}",
                meta.cid
            )));
        }
        Ok((
            meta.cipher_len,
            archived_record(&meta, &cid, &archive_id, crate::dicom_proxy::now_us()),
        ))
    }
}

async fn wait_pinned(client: &ClusterClient, cid: &ContentId, min: u32) -> Result<(), Failure> {
    let deadline = tokio::time::Instant::now() + PIN_WAIT;
    // The add already put the blocks in the adding peer's Kubo: the first answer often says
    // pinned, so ask at once, then back off.
    let mut pause = Duration::from_millis(10);
    loop {
        let s = client
            .pin_status(cid)
            .await
            .map_err(|e| Failure::Retry(e.to_string()))?;
        if s.pinned >= min as usize {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Failure::Retry(format!(
                "{cid}: pinned on {} of the {min} peers required after {PIN_WAIT:?} ({} pinning, errors: {:?})",
                s.pinned, s.pinning, s.errors
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}
