//! The durable spool of records not yet acknowledged by the ledger (delivery mode `spool`).
//!
//! Layout: segment files `spool-<seq>.log` of frames `len: u32 BE ‖ record bytes ‖ check`, where
//! `check` is the first 8 bytes of SHA-256 of the record bytes (it detects torn writes after a
//! crash; tamper evidence is the ledger's job). A record is durable once [`Spool::append`]
//! returns (the segment is fsynced). The delivery cursor `ack` (`<seq> <offset>`) says how far
//! the ledger has acknowledged; it is replaced atomically, and fully acknowledged segments are
//! deleted. Recovery reads every frame after the cursor; a torn frame at the end of the last
//! segment (a crash mid-append, never acknowledged) is cut off.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use medmesh_core::record::AuditRecord;
use sha2::{Digest, Sha256};

/// Segment size after which a new segment starts.
const SEGMENT_BYTES: u64 = 4 << 20;
/// Largest frame (a record is a few hundred bytes).
const MAX_FRAME: usize = 64 * 1024;

/// Where a record ends in the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// Segment sequence number.
    pub segment: u64,
    /// Offset just past the record's frame.
    pub end: u64,
}

/// Why the spool failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// I/O failed.
    #[error("spool {path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Error.
        source: std::io::Error,
    },
    /// The spool holds its maximum of undelivered bytes.
    #[error("spool full: {pending} bytes undelivered, limit {limit}")]
    Full {
        /// Undelivered bytes.
        pending: u64,
        /// The limit.
        limit: u64,
    },
    /// A segment other than the last is damaged.
    #[error("spool segment {path} is damaged at offset {offset}: {reason}")]
    Damaged {
        /// File.
        path: String,
        /// Where.
        offset: u64,
        /// What.
        reason: String,
    },
}

fn io(path: &Path, source: std::io::Error) -> SpoolError {
    SpoolError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn check(payload: &[u8]) -> [u8; 8] {
    let d = Sha256::digest(payload);
    let mut c = [0u8; 8];
    c.copy_from_slice(&d[..8]);
    c
}

/// The spool of one sidecar.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    segment: u64,
    file: File,
    len: u64,
    limit: u64,
    segment_bytes: u64,
    /// Undelivered records, oldest first, with their positions and frame sizes.
    pending: VecDeque<(Position, u64, AuditRecord)>,
    pending_bytes: u64,
}

impl Spool {
    fn segment_path(dir: &Path, seq: u64) -> PathBuf {
        dir.join(format!("spool-{seq:012}.log"))
    }

    /// Opens (or creates) the spool in `dir`, recovering every undelivered record.
    ///
    /// # Errors
    /// On I/O errors, or a damaged segment that is not the last.
    pub fn open(dir: &Path, limit: u64) -> Result<Self, SpoolError> {
        Self::open_with(dir, limit, SEGMENT_BYTES)
    }

    /// [`Spool::open`] with a chosen segment size.
    ///
    /// # Errors
    /// As [`Spool::open`].
    pub fn open_with(dir: &Path, limit: u64, segment_bytes: u64) -> Result<Self, SpoolError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let ack = read_ack(dir)?;
        let mut segs: Vec<u64> = std::fs::read_dir(dir)
            .map_err(|e| io(dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_prefix("spool-")?.strip_suffix(".log")?.parse().ok()
            })
            .collect();
        segs.sort_unstable();
        let mut pending = VecDeque::new();
        let mut pending_bytes = 0;
        let last = segs.last().copied();
        for &seq in &segs {
            let path = Self::segment_path(dir, seq);
            let mut bytes = Vec::new();
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(|e| io(&path, e))?;
            let mut off = 0usize;
            while off < bytes.len() {
                match frame(&bytes[off..]) {
                    Ok((rec, size)) => {
                        let end = (off + size) as u64;
                        let pos = Position { segment: seq, end };
                        if ack.is_none_or(|a| pos > a) {
                            pending.push_back((pos, size as u64, rec));
                            pending_bytes += size as u64;
                        }
                        off += size;
                    }
                    Err(FrameError { torn: true, reason }) if Some(seq) == last => {
                        // A crash mid-append: the torn record was never acknowledged.
                        tracing::warn!(path = %path.display(), offset = off, %reason, "cutting a torn record off the spool");
                        let f = OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .map_err(|e| io(&path, e))?;
                        f.set_len(off as u64).map_err(|e| io(&path, e))?;
                        f.sync_all().map_err(|e| io(&path, e))?;
                        break;
                    }
                    Err(FrameError { reason, .. }) => {
                        return Err(SpoolError::Damaged {
                            path: path.display().to_string(),
                            offset: off as u64,
                            reason,
                        });
                    }
                }
            }
        }
        let segment = last.unwrap_or(1);
        let path = Self::segment_path(dir, segment);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        let len = file.metadata().map_err(|e| io(&path, e))?.len();
        // Make the (possibly new) segment's directory entry durable.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(dir, e))?;
        let mut s = Self {
            dir: dir.to_owned(),
            segment,
            file,
            len,
            limit,
            segment_bytes,
            pending,
            pending_bytes,
        };
        s.remove_delivered_segments()?;
        Ok(s)
    }

    /// Undelivered records, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = (Position, &AuditRecord)> {
        self.pending.iter().map(|(p, _, r)| (*p, r))
    }

    /// Number of undelivered records (the depth metric).
    pub fn depth(&self) -> usize {
        self.pending.len()
    }

    /// Appends one record and makes it durable (fsync) before returning.
    ///
    /// # Errors
    /// When the spool is full or the write fails (then nothing of it is kept).
    pub fn append(&mut self, rec: &AuditRecord) -> Result<Position, SpoolError> {
        self.append_all(std::slice::from_ref(rec))
    }

    /// Appends records with one fsync for all; returns the position after the last. All or
    /// none are kept.
    ///
    /// # Errors
    /// When the spool is full or the write fails (then none of them is kept).
    pub fn append_all(&mut self, recs: &[AuditRecord]) -> Result<Position, SpoolError> {
        let mut frames = Vec::new();
        let mut sizes = Vec::with_capacity(recs.len());
        for rec in recs {
            let payload = rec.encode();
            sizes.push((4 + payload.len() + 8) as u64);
            frames.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            frames.extend_from_slice(&payload);
            frames.extend_from_slice(&check(&payload));
        }
        let total = frames.len() as u64;
        if self.pending_bytes + total > self.limit {
            return Err(SpoolError::Full {
                pending: self.pending_bytes,
                limit: self.limit,
            });
        }
        if self.len >= self.segment_bytes {
            self.rotate()?;
        }
        let path = Self::segment_path(&self.dir, self.segment);
        if let Err(e) = self
            .file
            .write_all(&frames)
            .and_then(|()| self.file.sync_data())
        {
            // Cut off partial frames, or later records would sit behind them and be lost at
            // recovery; if even that fails, start a new segment.
            if self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_data())
                .is_err()
            {
                self.rotate()?;
            }
            return Err(io(&path, e));
        }
        for (rec, size) in recs.iter().zip(sizes) {
            self.len += size;
            let pos = Position {
                segment: self.segment,
                end: self.len,
            };
            self.pending.push_back((pos, size, rec.clone()));
            self.pending_bytes += size;
        }
        Ok(Position {
            segment: self.segment,
            end: self.len,
        })
    }

    fn rotate(&mut self) -> Result<(), SpoolError> {
        // The next segment becomes current only once it exists and its name is durable.
        let next = self.segment + 1;
        let path = Self::segment_path(&self.dir, next);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(&self.dir, e))?;
        self.file = file;
        self.segment = next;
        self.len = 0;
        Ok(())
    }

    /// Records everything up to `upto` as delivered (durably), and deletes segments that hold
    /// nothing undelivered any more.
    ///
    /// # Errors
    /// On I/O errors; the records then stay pending and are delivered again (idempotently).
    pub fn ack(&mut self, upto: Position) -> Result<(), SpoolError> {
        let path = self.dir.join("ack");
        let tmp = self.dir.join("ack.tmp");
        {
            let mut f = File::create(&tmp).map_err(|e| io(&tmp, e))?;
            writeln!(f, "{} {}", upto.segment, upto.end).map_err(|e| io(&tmp, e))?;
            f.sync_all().map_err(|e| io(&tmp, e))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(&self.dir, e))?;
        while self.pending.front().is_some_and(|(p, _, _)| *p <= upto) {
            if let Some((_, size, _)) = self.pending.pop_front() {
                self.pending_bytes -= size;
            }
        }
        self.remove_delivered_segments()
    }

    fn remove_delivered_segments(&mut self) -> Result<(), SpoolError> {
        let oldest_needed = self
            .pending
            .front()
            .map_or(self.segment, |(p, _, _)| p.segment);
        for e in std::fs::read_dir(&self.dir)
            .map_err(|e| io(&self.dir, e))?
            .flatten()
        {
            let n = e.file_name().to_string_lossy().into_owned();
            let Some(seq) = n
                .strip_prefix("spool-")
                .and_then(|r| r.strip_suffix(".log"))
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            if seq < oldest_needed && seq < self.segment {
                std::fs::remove_file(e.path()).map_err(|err| io(&e.path(), err))?;
            }
        }
        Ok(())
    }
}

fn read_ack(dir: &Path) -> Result<Option<Position>, SpoolError> {
    let path = dir.join("ack");
    match std::fs::read_to_string(&path) {
        Ok(t) => {
            let mut it = t.split_whitespace().map(str::parse::<u64>);
            match (it.next(), it.next()) {
                (Some(Ok(segment)), Some(Ok(end))) => Ok(Some(Position { segment, end })),
                _ => Err(SpoolError::Damaged {
                    path: path.display().to_string(),
                    offset: 0,
                    reason: format!("not '<segment> <offset>': {t:?}"),
                }),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path, e)),
    }
}

/// One frame at the start of `b`: the record and the frame's size.
/// Why a frame could not be read: `torn` when its bytes are incomplete or fail their check (a
/// crash mid-append), not when a whole, checked frame holds a record this version cannot
/// decode (which must never be cut off).
struct FrameError {
    torn: bool,
    reason: String,
}

fn frame(b: &[u8]) -> Result<(AuditRecord, usize), FrameError> {
    let torn = |reason: String| FrameError { torn: true, reason };
    if b.len() < 4 {
        return Err(torn("frame header cut short".into()));
    }
    let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    if len > MAX_FRAME {
        return Err(torn(format!("frame of {len} bytes")));
    }
    if b.len() < 4 + len + 8 {
        return Err(torn("frame cut short".into()));
    }
    let payload = &b[4..4 + len];
    if b[4 + len..4 + len + 8] != check(payload) {
        return Err(torn("frame check does not match".into()));
    }
    let rec = AuditRecord::decode(payload).map_err(|e| FrameError {
        torn: false,
        reason: format!("a checked record does not decode: {e}"),
    })?;
    Ok((rec, 4 + len + 8))
}

#[cfg(test)]
mod tests {
    use medmesh_core::record::{EventKind, Outcome, Protocol, RecordId};

    use super::*;

    fn rec(i: u64) -> AuditRecord {
        let mut r = AuditRecord::event(
            RecordId::new().unwrap(),
            EventKind::InstanceStored,
            i,
            "spiffe://td/ns/a/sa/b".parse().unwrap(),
            "spiffe://td/ns/c/sa/d".parse().unwrap(),
            Protocol::Dimse,
            Outcome::Success,
        );
        r.status = Some(0);
        r.bytes = i;
        r
    }

    #[test]
    fn survives_reopen_ack_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        let recs: Vec<_> = (0..10).map(rec).collect();
        let pos: Vec<_> = recs.iter().map(|r| s.append(r).unwrap()).collect();
        drop(s);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            s.pending().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
            recs
        );
        s.ack(pos[3]).unwrap();
        drop(s);
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.depth(), 6);
        assert_eq!(s.pending().next().unwrap().1, &recs[4]);
        drop(s);
        // A crash mid-append leaves a torn frame: it is cut off, the rest kept.
        let seg = Spool::segment_path(dir.path(), 1);
        let len = std::fs::metadata(&seg).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[0, 0, 1, 0, 1, 2, 3]).unwrap();
        drop(f);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.depth(), 6);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), len);
        let p = s.append(&rec(99)).unwrap();
        s.ack(p).unwrap();
        assert_eq!(s.depth(), 0);
    }

    #[test]
    fn a_checked_record_that_does_not_decode_is_never_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append(&rec(1)).unwrap();
        drop(s);
        // A whole frame with a valid check but a payload this version cannot decode (as after
        // a format change): refusing to start beats silently dropping what follows.
        let seg = Spool::segment_path(dir.path(), 1);
        let payload = b"not a record";
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(payload);
        frame.extend_from_slice(&check(payload));
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&frame).unwrap();
        drop(f);
        let len = std::fs::metadata(&seg).unwrap().len();
        let e = Spool::open(dir.path(), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("does not decode"), "{e}");
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len(),
            len,
            "nothing cut off"
        );
    }

    #[test]
    fn batches_are_kept_whole_or_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 4096).unwrap();
        let recs: Vec<_> = (0..5).map(rec).collect();
        let end = s.append_all(&recs).unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), 4096).unwrap();
        assert_eq!(
            s.pending().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
            recs
        );
        assert_eq!(s.pending().last().unwrap().0, end);
        // Over the limit: none of the batch is kept.
        let many: Vec<_> = (10..60).map(rec).collect();
        assert!(matches!(s.append_all(&many), Err(SpoolError::Full { .. })));
        assert_eq!(s.depth(), 5);
        s.ack(end).unwrap();
        assert_eq!(s.depth(), 0);
    }

    #[test]
    fn rotates_deletes_delivered_segments_and_bounds_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open_with(dir.path(), 64 << 20, 4096).unwrap();
        let mut last = None;
        // Enough records for a few segments.
        for i in 0..200 {
            last = Some(s.append(&rec(i)).unwrap());
        }
        let segs = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with("spool-")
                })
                .count()
        };
        assert!(segs() >= 3, "{}", segs());
        s.ack(last.unwrap()).unwrap();
        assert_eq!(segs(), 1, "delivered segments are deleted");
        // The limit refuses new records rather than growing without bound.
        let mut small = Spool::open(&dir.path().join("small"), 1000).unwrap();
        let mut n = 0;
        let err = loop {
            match small.append(&rec(n)) {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, SpoolError::Full { .. }), "{err}");
        assert!(n > 0);
    }

    #[test]
    fn damaged_middle_segment_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open_with(dir.path(), 64 << 20, 4096).unwrap();
        for i in 0..200 {
            s.append(&rec(i)).unwrap();
        }
        drop(s);
        let seg = Spool::segment_path(dir.path(), 1);
        let mut b = std::fs::read(&seg).unwrap();
        b[100] ^= 0xff;
        std::fs::write(&seg, b).unwrap();
        let err = Spool::open_with(dir.path(), 64 << 20, 4096).unwrap_err();
        assert!(err.to_string().contains("is damaged at offset"), "{err}");
    }
}
