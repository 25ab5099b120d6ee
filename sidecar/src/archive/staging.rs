//! The archive staging area, on the sidecar's spool volume: instances are sealed (age) as they
//! stream through the proxy, written here with their CID computed on the way, made durable when
//! the store succeeds, and removed once the archive confirmed them.
//!
//! Layout under the staging directory:
//! - `tmp/<id>.age`: being written, or written and not (yet) committed. Removed at start-up:
//!   a store whose response was never released needs no archive.
//! - `ready/<id>.age` and `ready/<id>.meta`: committed. The ciphertext is fsynced and renamed
//!   first, then the meta file (line 1: SHA-256 of line 2; line 2: JSON [`StagedMeta`]) is
//!   written to a temporary name, fsynced and renamed, then the directory is fsynced. An
//!   object is committed exactly when its meta file exists.
//! - `failed/`: objects whose meta does not check or whose ciphertext no longer has its CID,
//!   kept for inspection and counted.
//!
//! `<id>` is the `instance_archived` record's id (time-ordered), so names sort oldest first and
//! a replay after a crash appends the same record again, which the ledger deduplicates.
//!
//! The area is bounded: every byte written is reserved first; a write that would pass the
//! limit fails the object (`Full`).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use medmesh_core::merkle::{Hash, sha256};
use medmesh_core::record::{AuditRecord, ContentId, RecordId};
use medmesh_core::seal::{Recipient, Sealer};
use medmesh_core::unixfs::FileBuilder;

use crate::metrics::Metrics;

/// What is known of a committed object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagedMeta {
    /// The instance's own record (as made safe before its response was released).
    pub instance: AuditRecord,
    /// The id of the `instance_archived` record to append (also the object's name).
    pub archived_record: RecordId,
    /// The ciphertext's CID (CIDv1, raw leaves, as Kubo computes it).
    pub cid: ContentId,
    /// Ciphertext length.
    pub cipher_len: u64,
    /// Plaintext length.
    pub plaintext_len: u64,
    /// SHA-256 of the plaintext, computed while sealing.
    pub plaintext_sha256: Hash,
    /// When it was committed (µs since the epoch).
    pub staged_us: u64,
}

/// An object sealed into `tmp/`, not yet committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    /// The object's id (the archived record's id).
    pub id: RecordId,
    /// The ciphertext's CID.
    pub cid: ContentId,
    /// Ciphertext length.
    pub cipher_len: u64,
    /// Plaintext length.
    pub plaintext_len: u64,
    /// SHA-256 of the plaintext.
    pub plaintext_sha256: Hash,
}

/// Why an object could not be staged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StageError {
    /// The staging area is full.
    #[error("archive staging area is full ({limit} bytes)")]
    Full {
        /// The limit.
        limit: u64,
    },
    /// Writing, sealing or syncing failed.
    #[error("archive staging: {0}")]
    Io(String),
}

/// The staging area of one sidecar.
pub struct Staging {
    tmp: PathBuf,
    ready: PathBuf,
    failed: PathBuf,
    limit: u64,
    used: AtomicU64,
    /// Objects being written now (instances streaming through the proxy).
    active: AtomicU64,
    /// When an object last started or ended being written (ms since the epoch).
    last_activity_ms: AtomicU64,
    /// Whom new objects are sealed to (replaced when the namespace's archive key changes).
    recipients: std::sync::RwLock<Arc<Vec<Recipient>>>,
    metrics: Metrics,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging")
            .field("ready", &self.ready)
            .field("limit", &self.limit)
            .field("used", &self.used.load(Ordering::Relaxed))
            .finish()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn sync_dir(p: &Path) -> std::io::Result<()> {
    std::fs::File::open(p)?.sync_all()
}

fn io(what: &str, p: &Path, e: std::io::Error) -> StageError {
    StageError::Io(format!("{what} {}: {e}", p.display()))
}

impl Staging {
    /// Opens (creating) the staging area in `dir`: removes uncommitted objects and half-written
    /// meta files, and counts what is committed.
    ///
    /// # Errors
    /// When the directories cannot be created or read.
    pub fn open(
        dir: &Path,
        limit: u64,
        recipients: Vec<Recipient>,
        metrics: Metrics,
    ) -> Result<Arc<Self>, StageError> {
        let (tmp, ready, failed) = (dir.join("tmp"), dir.join("ready"), dir.join("failed"));
        for d in [&tmp, &ready, &failed] {
            std::fs::create_dir_all(d).map_err(|e| io("create", d, e))?;
        }
        for e in std::fs::read_dir(&tmp).map_err(|e| io("read", &tmp, e))? {
            let p = e.map_err(|e| io("read", &tmp, e))?.path();
            let _ = std::fs::remove_file(&p);
        }
        let mut used = 0u64;
        let mut backlog = 0i64;
        for e in std::fs::read_dir(&ready).map_err(|e| io("read", &ready, e))? {
            let p = e.map_err(|e| io("read", &ready, e))?.path();
            let ext = p.extension().and_then(|x| x.to_str()).unwrap_or_default();
            match ext {
                "age" if !p.with_extension("meta").exists() => {
                    // Renamed but its meta never written: not committed.
                    let _ = std::fs::remove_file(&p);
                }
                "age" => {
                    used += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                    backlog += 1;
                }
                "meta" => {}
                _ => {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        let _ = sync_dir(&ready);
        metrics.archive_staged_bytes.set(used as i64);
        metrics.archive_backlog.set(backlog);
        metrics.archive_staging_limit_bytes.set(limit as i64);
        Ok(Arc::new(Self {
            tmp,
            ready,
            failed,
            limit,
            used: AtomicU64::new(used),
            active: AtomicU64::new(0),
            last_activity_ms: AtomicU64::new(0),
            recipients: std::sync::RwLock::new(Arc::new(recipients)),
            metrics,
        }))
    }

    fn reserve(&self, n: u64) -> bool {
        let before = self.used.fetch_add(n, Ordering::AcqRel);
        if before + n > self.limit {
            self.used.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        self.metrics.archive_staged_bytes.add(n as i64);
        true
    }

    fn release(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
        self.metrics.archive_staged_bytes.sub(n as i64);
    }

    /// Bytes staged now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Whether instances are streaming through the proxy, or did within `quiet` (the uploader
    /// yields to them).
    pub fn busy(&self, quiet: std::time::Duration) -> bool {
        self.active.load(Ordering::Acquire) > 0
            || now_ms().saturating_sub(self.last_activity_ms.load(Ordering::Acquire))
                < quiet.as_millis() as u64
    }

    /// Whom new objects are sealed to.
    pub fn recipients(&self) -> Arc<Vec<Recipient>> {
        self.recipients
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Seals objects begun from now on to `recipients` (objects already staged keep theirs).
    pub fn set_recipients(&self, recipients: Vec<Recipient>) {
        *self.recipients.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(recipients);
    }

    /// The limit of the staging area.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn touch(&self) {
        self.last_activity_ms.store(now_ms(), Ordering::Release);
    }

    /// Starts sealing one object into `tmp/`. Errors are kept in the writer and reported by
    /// [`StageWriter::finish`]: the transfer itself is never disturbed by them.
    pub fn begin(self: &Arc<Self>) -> StageWriter {
        let id = match RecordId::new() {
            Ok(id) => id,
            Err(e) => return StageWriter::failed(self, StageError::Io(format!("random: {e}"))),
        };
        let path = self.tmp.join(format!("{id}.age"));
        let file = match std::fs::File::create(&path) {
            Ok(f) => f,
            Err(e) => return StageWriter::failed(self, io("create", &path, e)),
        };
        let reserved = Arc::new(AtomicU64::new(0));
        let tee = Tee {
            out: BufWriter::with_capacity(256 * 1024, file),
            fb: FileBuilder::new(),
            staging: self.clone(),
            reserved: reserved.clone(),
        };
        match Sealer::new(&self.recipients(), tee) {
            Ok(sealer) => {
                self.active.fetch_add(1, Ordering::AcqRel);
                self.touch();
                StageWriter {
                    staging: self.clone(),
                    id,
                    path: Some(path),
                    sealer: Some(sealer),
                    reserved,
                    error: None,
                    counted: true,
                }
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                self.release(reserved.swap(0, Ordering::AcqRel));
                StageWriter::failed(self, StageError::Io(e.to_string()))
            }
        }
    }

    /// Makes a staged object durable and committed (blocking: two fsyncs and a directory
    /// sync), to be archived with `instance`'s record.
    ///
    /// # Errors
    /// When syncing, writing or renaming fails; the object is then discarded.
    pub fn commit(&self, staged: &Staged, instance: &AuditRecord) -> Result<(), StageError> {
        let r = self.commit_inner(staged, instance);
        match &r {
            Ok(()) => {
                self.metrics.archive_backlog.inc();
                self.metrics
                    .archive_objects
                    .with_label_values(&["staged"])
                    .inc();
            }
            Err(_) => self.discard(staged),
        }
        r
    }

    fn commit_inner(&self, staged: &Staged, instance: &AuditRecord) -> Result<(), StageError> {
        let tmp = self.tmp.join(format!("{}.age", staged.id));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| io("sync", &tmp, e))?;
        let meta = StagedMeta {
            instance: instance.clone(),
            archived_record: staged.id,
            cid: staged.cid.clone(),
            cipher_len: staged.cipher_len,
            plaintext_len: staged.plaintext_len,
            plaintext_sha256: staged.plaintext_sha256,
            staged_us: crate::dicom_proxy::now_us(),
        };
        let json = serde_json::to_string(&meta).map_err(|e| StageError::Io(e.to_string()))?;
        let text = format!("{}\n{json}\n", sha256(json.as_bytes()).to_hex());
        let age = self.ready.join(format!("{}.age", staged.id));
        let meta_tmp = self.ready.join(format!("{}.meta.tmp", staged.id));
        let meta_path = self.ready.join(format!("{}.meta", staged.id));
        std::fs::rename(&tmp, &age).map_err(|e| io("rename", &tmp, e))?;
        let written = (|| {
            let mut f = std::fs::File::create(&meta_tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&meta_tmp, &meta_path)?;
            sync_dir(&self.ready)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&meta_tmp);
            let _ = std::fs::remove_file(&meta_path);
            // Put the ciphertext back where `discard` looks for it.
            let _ = std::fs::rename(&age, &tmp);
            return Err(io("write", &meta_path, e));
        }
        Ok(())
    }

    /// Drops an uncommitted object (its store failed, or it could not be committed).
    pub fn discard(&self, staged: &Staged) {
        let p = self.tmp.join(format!("{}.age", staged.id));
        let _ = std::fs::remove_file(p);
        self.release(staged.cipher_len);
        self.metrics
            .archive_objects
            .with_label_values(&["discarded"])
            .inc();
    }

    /// Committed objects, oldest first, at most `max`.
    pub fn pending(&self, max: usize) -> Vec<RecordId> {
        let mut ids: Vec<RecordId> = std::fs::read_dir(&self.ready)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                name.strip_suffix(".meta")?.parse().ok()
            })
            .collect();
        ids.sort();
        ids.truncate(max);
        ids
    }

    /// The ciphertext's path of a committed object.
    pub fn object_path(&self, id: &RecordId) -> PathBuf {
        self.ready.join(format!("{id}.age"))
    }

    /// Reads and checks a committed object's meta file.
    ///
    /// # Errors
    /// When it cannot be read, its checksum does not match, or it does not parse.
    pub fn load(&self, id: &RecordId) -> Result<StagedMeta, StageError> {
        let p = self.ready.join(format!("{id}.meta"));
        let text = std::fs::read_to_string(&p).map_err(|e| io("read", &p, e))?;
        let (sum, json) = text
            .split_once('\n')
            .ok_or_else(|| StageError::Io(format!("{}: no checksum line", p.display())))?;
        let json = json.trim_end_matches('\n');
        if sha256(json.as_bytes()).to_hex() != sum {
            return Err(StageError::Io(format!(
                "{}: checksum does not match its content",
                p.display()
            )));
        }
        let meta: StagedMeta = serde_json::from_str(json)
            .map_err(|e| StageError::Io(format!("{}: {e}", p.display())))?;
        if meta.archived_record != *id {
            return Err(StageError::Io(format!(
                "{}: names object {}",
                p.display(),
                meta.archived_record
            )));
        }
        Ok(meta)
    }

    /// Removes a committed object once the archive holds it and its record is spooled.
    pub fn remove(&self, id: &RecordId) {
        let age = self.object_path(id);
        let len = std::fs::metadata(&age).map(|m| m.len()).unwrap_or(0);
        // Meta first: an object without its meta is not committed, and is swept at start-up.
        // No directory sync: a removal lost to a crash only replays an idempotent upload and a
        // record the ledger deduplicates.
        let _ = std::fs::remove_file(self.ready.join(format!("{id}.meta")));
        let _ = std::fs::remove_file(&age);
        self.release(len);
        self.metrics.archive_backlog.dec();
    }

    /// Moves a committed object that cannot be archived (bad meta, changed ciphertext) to
    /// `failed/`.
    pub fn quarantine(&self, id: &RecordId) {
        let age = self.object_path(id);
        let len = std::fs::metadata(&age).map(|m| m.len()).unwrap_or(0);
        for ext in ["meta", "age"] {
            let from = self.ready.join(format!("{id}.{ext}"));
            let _ = std::fs::rename(&from, self.failed.join(format!("{id}.{ext}")));
        }
        let _ = sync_dir(&self.ready);
        self.release(len);
        self.metrics.archive_backlog.dec();
        self.metrics
            .archive_objects
            .with_label_values(&["corrupt"])
            .inc();
    }
}

/// Writes the ciphertext to the file and the CID builder, reserving space first.
struct Tee {
    out: BufWriter<std::fs::File>,
    fb: FileBuilder,
    staging: Arc<Staging>,
    reserved: Arc<AtomicU64>,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.staging.reserve(buf.len() as u64) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "archive staging area is full",
            ));
        }
        self.reserved.fetch_add(buf.len() as u64, Ordering::AcqRel);
        self.fb.push(buf, &mut |_, _| {});
        self.out.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// One object being sealed into the staging area.
pub struct StageWriter {
    staging: Arc<Staging>,
    id: RecordId,
    path: Option<PathBuf>,
    sealer: Option<Sealer<Tee>>,
    /// Bytes reserved for this object so far.
    reserved: Arc<AtomicU64>,
    error: Option<StageError>,
    /// Counted in [`Staging::busy`].
    counted: bool,
}

impl std::fmt::Debug for StageWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageWriter")
            .field("id", &self.id)
            .field("error", &self.error)
            .finish()
    }
}

impl StageWriter {
    fn failed(staging: &Arc<Staging>, e: StageError) -> Self {
        Self {
            staging: staging.clone(),
            id: RecordId([0; 16]),
            path: None,
            sealer: None,
            reserved: Arc::new(AtomicU64::new(0)),
            error: Some(e),
            counted: false,
        }
    }

    /// No longer being written: the uploader need not yield to it.
    fn done(&mut self) {
        if std::mem::take(&mut self.counted) {
            self.staging.active.fetch_sub(1, Ordering::AcqRel);
            self.staging.touch();
        }
    }

    fn fail(&mut self, e: StageError) {
        self.sealer = None;
        // The reservation of what was written is given back with the file.
        self.staging
            .release(self.reserved.swap(0, Ordering::AcqRel));
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
        self.error.get_or_insert(e);
    }

    /// Seals more plaintext. A failure (full, I/O) is remembered, the partial file removed.
    pub fn write(&mut self, data: &[u8]) {
        let Some(s) = self.sealer.as_mut() else {
            return;
        };
        if let Err(e) = s.write_all(data) {
            let err = if e.kind() == std::io::ErrorKind::StorageFull {
                StageError::Full {
                    limit: self.staging.limit,
                }
            } else {
                StageError::Io(e.to_string())
            };
            self.fail(err);
        }
    }

    /// Ends the object: the age file is complete in `tmp/` (not yet durable; see
    /// [`Staging::commit`]).
    ///
    /// # Errors
    /// The first failure met while writing, or one finishing now.
    pub fn finish(mut self) -> Result<Staged, StageError> {
        self.done();
        let r = self.finish_inner();
        if let Err(e) = &r {
            self.fail(e.clone());
            let label = match e {
                StageError::Full { .. } => "skipped_full",
                StageError::Io(_) => "staging_failed",
            };
            self.staging
                .metrics
                .archive_objects
                .with_label_values(&[label])
                .inc();
        }
        r
    }

    fn finish_inner(&mut self) -> Result<Staged, StageError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let sealer = self
            .sealer
            .take()
            .ok_or_else(|| StageError::Io("finished twice".into()))?;
        let (mut tee, sealed) = match sealer.finish() {
            Ok(x) => x,
            Err(e) => return Err(StageError::Io(e.to_string())),
        };
        tee.out.flush().map_err(|e| StageError::Io(e.to_string()))?;
        let cipher_len = tee.fb.len();
        let cid = ContentId::from_bytes(&tee.fb.finish(&mut |_, _| {}).to_bytes())
            .map_err(|e| StageError::Io(e.to_string()))?;
        // The file now belongs to the `Staged` value: commit or discard it.
        self.path = None;
        Ok(Staged {
            id: self.id,
            cid,
            cipher_len,
            plaintext_len: sealed.plaintext_len,
            plaintext_sha256: Hash(sealed.plaintext_sha256),
        })
    }
}

impl Drop for StageWriter {
    fn drop(&mut self) {
        self.done();
        // Never finished (the association ended mid-instance): nothing to archive.
        if self.path.is_some() {
            self.fail(StageError::Io("abandoned".into()));
        }
    }
}

impl Staging {
    /// Takes back a committed object whose store ended up failing (its record could not be
    /// made safe). The uploader may have taken it already; archiving it then is harmless.
    pub fn withdraw(&self, id: &RecordId) {
        if self.ready.join(format!("{id}.meta")).exists() {
            self.remove(id);
            self.metrics
                .archive_objects
                .with_label_values(&["discarded"])
                .inc();
        }
    }
}

/// Staged objects waiting for their owner's decision; what is left is discarded on drop.
#[derive(Debug, Default)]
pub struct StagedSet {
    staging: Option<Arc<Staging>>,
    items: Vec<Option<Result<Staged, StageError>>>,
}

impl StagedSet {
    /// An empty set for objects of `staging`.
    pub fn new(staging: Option<Arc<Staging>>) -> Self {
        Self {
            staging,
            items: Vec::new(),
        }
    }

    /// Adds one.
    pub fn push(&mut self, s: Option<Result<Staged, StageError>>) {
        self.items.push(s);
    }

    /// Takes them all (the caller commits or discards each).
    pub fn take(&mut self) -> Vec<Option<Result<Staged, StageError>>> {
        std::mem::take(&mut self.items)
    }
}

impl Drop for StagedSet {
    fn drop(&mut self) {
        if let Some(st) = &self.staging {
            for s in self.items.drain(..).flatten().flatten() {
                st.discard(&s);
            }
        }
    }
}

#[cfg(test)]
mod tests;
