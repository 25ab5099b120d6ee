//! The uploader: committed objects, oldest first, into the archive; then their
//! `instance_archived` records.

use std::sync::Arc;
use std::time::Duration;

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
            loop {
                let ids = tokio::task::block_in_place(|| this.staging.pending(64));
                if ids.is_empty() {
                    tokio::select! {
                        _ = this.wake.notified() => continue,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
                let mut retry = None;
                for id in ids {
                    if *stop.borrow() {
                        return;
                    }
                    match this.archive_one(&id, &delivery, &creds).await {
                        Ok(()) => {
                            backoff = Duration::from_millis(200);
                            metrics
                                .archive_objects
                                .with_label_values(&["archived"])
                                .inc();
                        }
                        Err(Failure::Corrupt(why)) => {
                            tracing::error!(object = %id, reason = %why, "archive object cannot be archived; moved to failed/");
                            tokio::task::block_in_place(|| this.staging.quarantine(&id));
                        }
                        Err(Failure::Retry(why)) => {
                            metrics.archive_upload_failures.inc();
                            retry = Some(why);
                            break;
                        }
                    }
                }
                if let Some(why) = retry {
                    tracing::warn!(reason = %why, retry_in = ?backoff, "archiving delayed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        });
    }

    async fn archive_one(
        &self,
        id: &RecordId,
        delivery: &Delivery,
        creds: &watch::Receiver<Option<Arc<Credentials>>>,
    ) -> Result<(), Failure> {
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
                let c = creds
                    .borrow()
                    .clone()
                    .ok_or_else(|| Failure::Retry("no workload certificate yet".into()))?;
                let tls = MeshTls {
                    identity: c.identity.clone(),
                    bundle: c.bundle.clone(),
                    server: archive.clone(),
                };
                let ep = MeshEndpoint::new(url, Some(&tls), Duration::from_secs(10))
                    .map_err(|e| Failure::Retry(e.to_string()))?;
                let client = ClusterClient::new(ep);
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
        let rec = archived_record(&meta, &cid, &archive_id, crate::dicom_proxy::now_us());
        // Spooled (fsync) before the object goes: from here the ledger delivery retries it.
        delivery
            .later_durable(rec)
            .await
            .map_err(|e| Failure::Retry(format!("spooling the archived record: {e}")))?;
        tokio::task::block_in_place(|| self.staging.remove(id));
        Ok(())
    }
}

async fn wait_pinned(client: &ClusterClient, cid: &ContentId, min: u32) -> Result<(), Failure> {
    let deadline = tokio::time::Instant::now() + PIN_WAIT;
    let mut pause = Duration::from_millis(50);
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
