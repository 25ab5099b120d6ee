//! Archiving of stored instances into the namespace's `ImageArchive` (encrypted, content
//! addressed, replicated), linked to their ledger records.
//!
//! 1. While a C-STORE data set or a STOW-RS part streams through the proxy, a
//!    [`staging::StageWriter`] seals it (age, to the archive recipients) into the staging area,
//!    computing the ciphertext's CID on the way; nothing is held in memory.
//! 2. When the store succeeded, the object is committed (fsync) together with the instance's
//!    record, before the response is released. `async`: a full or failing staging area only
//!    loses the archive copy (counted); `required`: the store is answered as failed.
//! 3. [`upload`] sends committed objects to the archive cluster's REST API through the mesh (or
//!    to a local store), checks the CID it answers, waits until at least the minimum number of
//!    peers pinned it, then spools an `instance_archived` record (delivered to the ledger like
//!    any other) and removes the object. A crash at any step replays it: the add is idempotent
//!    and the record id is fixed at staging time.

pub mod staging;
pub mod upload;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use medmesh_core::SpiffeId;
use medmesh_core::seal::Recipient;

pub use staging::{StageError, StageWriter, Staged, Staging};

/// What a store waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Stores never wait for the archive; an instance that cannot be staged is not archived.
    Async,
    /// A store whose instance cannot be staged durably is answered as failed.
    Required,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "async" => Ok(Self::Async),
            "required" => Ok(Self::Required),
            other => Err(format!("{other:?}: must be async or required")),
        }
    }
}

/// Where archived objects go.
#[derive(Debug, Clone)]
pub enum Target {
    /// An ipfs-cluster REST API, reached through the mesh.
    Cluster {
        /// `http://host:port` of the REST API (its sidecar adds mTLS).
        url: String,
        /// The archive's SPIFFE ID (pinned).
        id: SpiffeId,
        /// Least number of peers that must pin an object before it counts as archived.
        replication_min: u32,
        /// Most peers that pin it.
        replication_max: u32,
    },
    /// A local object store (demo, development).
    Store(PathBuf),
}

/// Checked archive settings.
#[derive(Debug, Clone)]
pub struct ArchiveConfig {
    /// What stores wait for.
    pub mode: Mode,
    /// Where objects go.
    pub target: Target,
    /// The age recipients: the namespace's archive key, and a break-glass key if any.
    pub recipients: Vec<Recipient>,
    /// The audit settings file the recipients came from, followed for a new key.
    pub recipients_file: Option<PathBuf>,
    /// The staging directory.
    pub staging_dir: PathBuf,
    /// Most ciphertext bytes staged.
    pub staging_max_bytes: u64,
}

/// The archiving service of one sidecar.
#[derive(Debug)]
pub struct Archiver {
    /// Settings.
    pub cfg: ArchiveConfig,
    /// The staging area.
    pub staging: Arc<Staging>,
    wake: tokio::sync::Notify,
    /// The archive cluster's client, with the credentials it was built for.
    cluster: std::sync::Mutex<
        Option<(
            Arc<crate::identity::Credentials>,
            medmesh_archive::ClusterClient,
        )>,
    >,
}

impl Archiver {
    /// Opens the staging area.
    ///
    /// # Errors
    /// When it cannot be opened.
    pub fn open(
        cfg: ArchiveConfig,
        metrics: crate::metrics::Metrics,
    ) -> Result<Arc<Self>, StageError> {
        let staging = Staging::open(
            &cfg.staging_dir,
            cfg.staging_max_bytes,
            cfg.recipients.clone(),
            metrics,
        )?;
        Ok(Arc::new(Self {
            cfg,
            staging,
            wake: tokio::sync::Notify::new(),
            cluster: std::sync::Mutex::new(None),
        }))
    }

    /// Starts sealing one instance.
    pub fn begin(&self) -> StageWriter {
        self.staging.begin()
    }

    /// Commits a staged instance with its record (blocking work moved off the runtime) and
    /// wakes the uploader.
    ///
    /// # Errors
    /// When it could not be made durable (the object is discarded).
    pub async fn commit(
        &self,
        staged: &Staged,
        instance: &medmesh_core::AuditRecord,
    ) -> Result<(), StageError> {
        let r = tokio::task::block_in_place(|| self.staging.commit(staged, instance));
        if r.is_ok() {
            self.wake.notify_one();
        }
        r
    }

    /// Commits a staged instance whose store succeeded: `Err` only when the mode requires the
    /// archive copy and it could not be made durable (the store must then fail).
    pub async fn settle(
        &self,
        staged: Option<Result<Staged, StageError>>,
        instance: &medmesh_core::AuditRecord,
    ) -> Result<(), StageError> {
        let r = match staged {
            None => Err(StageError::Io("the instance was not staged".into())),
            Some(Err(e)) => Err(e),
            Some(Ok(s)) => self.commit(&s, instance).await,
        };
        match (r, self.cfg.mode) {
            (Ok(()), _) => Ok(()),
            (Err(e), Mode::Required) => Err(e),
            (Err(e), Mode::Async) => {
                tracing::warn!(error = %e, "instance stored without an archive copy (archive mode async)");
                Ok(())
            }
        }
    }

    /// Drops a staged instance whose store failed or was not acknowledged.
    pub fn discard(&self, staged: Option<Result<Staged, StageError>>) {
        if let Some(Ok(s)) = staged {
            self.staging.discard(&s);
        }
    }

    /// Follows the audit settings file (the namespace's `audit.json`, a mounted ConfigMap):
    /// when its archive recipients change (the operator made a new key after crypto-shredding),
    /// instances that begin streaming from then on are sealed to the new ones. The small file
    /// is read and compared every `period` (a change of content is what counts, not its
    /// time stamp). A version that cannot be read, or names no valid recipient, changes
    /// nothing (counted and logged once per distinct problem).
    pub fn follow_recipients(
        self: &Arc<Self>,
        path: PathBuf,
        period: Duration,
        metrics: crate::metrics::Metrics,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            let text = |r: &[Recipient]| r.iter().map(ToString::to_string).collect::<Vec<_>>();
            let mut last_problem: Option<String> = None;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let p = path.clone();
                match tokio::task::spawn_blocking(move || read_recipients(&p)).await {
                    Ok(Ok(new)) => {
                        last_problem = None;
                        if text(&new) != text(&this.staging.recipients()) {
                            tracing::info!(path = %path.display(), recipients = new.len(), "archive recipients changed; new instances are sealed to them");
                            this.staging.set_recipients(new);
                            metrics.archive_key_reloads.with_label_values(&["ok"]).inc();
                        }
                    }
                    Ok(Err(e)) => {
                        if last_problem.as_deref() != Some(e.as_str()) {
                            metrics
                                .archive_key_reloads
                                .with_label_values(&["error"])
                                .inc();
                            tracing::warn!(error = %e, "new archive recipients refused; the previous ones stay in force");
                            last_problem = Some(e);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "archive recipients reader failed"),
                }
            }
        });
    }
}

/// The archive recipients of an audit settings file.
fn read_recipients(path: &Path) -> Result<Vec<Recipient>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let audit: medmesh_core::wire::SidecarAudit =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let archive = audit.archive.ok_or_else(|| {
        format!(
            "{}: no archive settings any more (restart the pod to stop archiving)",
            path.display()
        )
    })?;
    if archive.recipients.is_empty() {
        return Err(format!("{}: no archive recipient", path.display()));
    }
    archive
        .recipients
        .iter()
        .map(|r| {
            r.parse::<Recipient>()
                .map_err(|e| format!("{}: {e}", path.display()))
        })
        .collect()
}
