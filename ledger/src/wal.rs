//! The write-ahead log of a single-node ledger (`ledger.wal`, next to `ledger.redb`).
//!
//! redb makes a transaction durable with an fsync inside its commit, on the writer's thread: the
//! writer could not sequence the next batch while the disk flushed the last one. With this log,
//! the writer commits a batch to redb without an fsync and hands its entries, framed, to the
//! syncer thread, which writes the frames of every batch waiting for it (one `pwrite` each), runs
//! one `fdatasync` for them all, and only then acknowledges them. The writer meanwhile sequences
//! the next batch.
//! Every checkpoint commit (and a commit after [`ROTATE_BYTES`] of frames) is a durable redb
//! commit, which makes all earlier ones durable too; the log then starts over from its first byte
//! (when frames were written since it last did).
//! After a crash, `Storage::open` appends again the entries of the frames redb lost.
//!
//! The file is overwritten in place from its start: once it has grown to the size of one
//! generation of frames, an `fdatasync` has no file size or extent to record.
//!
//! Frame layout (integers little-endian), see `docs/ledger-format.md`:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `MWL1` |
//! | 4..8 | payload length |
//! | 8..16 | index of the frame's first entry |
//! | 16..20 | number of entries |
//! | 20..28 | first 8 bytes of SHA-256 over bytes 0..20 and the payload |
//! | 28.. | payload: per entry, its length (u32) and its canonical bytes |
//!
//! Reading stops at the first frame that is torn, fails its checksum or does not continue the
//! entries of the frame before it (a frame of an earlier generation).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use sha2::{Digest as _, Sha256};

const MAGIC: [u8; 4] = *b"MWL1";
/// Bytes before a frame's payload.
pub(crate) const HEADER: usize = 28;
/// Frames written since the last durable commit after which the writer makes its next commit
/// durable, so that the log starts over.
pub(crate) const ROTATE_BYTES: u64 = 16 << 20;

/// The frame of one batch, built while the batch is placed.
#[derive(Debug)]
pub(crate) struct FrameBuilder {
    buf: Vec<u8>,
    first: u64,
    count: u32,
}

impl FrameBuilder {
    /// An empty frame whose first entry will have index `first`.
    pub(crate) fn new(first: u64) -> Self {
        let mut buf = Vec::with_capacity(16 << 10);
        buf.resize(HEADER, 0);
        Self {
            buf,
            first,
            count: 0,
        }
    }

    /// Adds the next entry's canonical bytes.
    pub(crate) fn push(&mut self, entry: &[u8]) {
        // An entry is bounded by the API's body limit, far below 4 GiB.
        self.buf
            .extend_from_slice(&u32::try_from(entry.len()).unwrap_or(u32::MAX).to_le_bytes());
        self.buf.extend_from_slice(entry);
        self.count += 1;
    }

    /// The frame's bytes; empty when no entry was added.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        if self.count == 0 {
            return Vec::new();
        }
        let payload = u32::try_from(self.buf.len() - HEADER).unwrap_or(u32::MAX);
        self.buf[0..4].copy_from_slice(&MAGIC);
        self.buf[4..8].copy_from_slice(&payload.to_le_bytes());
        self.buf[8..16].copy_from_slice(&self.first.to_le_bytes());
        self.buf[16..20].copy_from_slice(&self.count.to_le_bytes());
        let sum = checksum(&self.buf[..20], &self.buf[HEADER..]);
        self.buf[20..28].copy_from_slice(&sum);
        self.buf
    }
}

fn checksum(head: &[u8], payload: &[u8]) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(head);
    h.update(payload);
    let d = h.finalize();
    let mut out = [0; 8];
    out.copy_from_slice(&d[..8]);
    out
}

/// One frame read back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    /// Index of the first entry.
    pub(crate) first: u64,
    /// Canonical bytes of each entry.
    pub(crate) entries: Vec<Vec<u8>>,
}

impl Frame {
    /// Index after the frame's last entry.
    pub(crate) fn end(&self) -> u64 {
        self.first + self.entries.len() as u64
    }
}

/// Reads the frames of the log at `path`, from its start to the first frame that is torn,
/// damaged or of an earlier generation. A missing file holds no frames.
///
/// # Errors
/// When the file exists but cannot be read.
pub(crate) fn read(path: &Path) -> std::io::Result<Vec<Frame>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let mut frames: Vec<Frame> = Vec::new();
    let mut offset = 0u64;
    let mut head = [0u8; HEADER];
    while offset + HEADER as u64 <= len {
        file.read_exact_at(&mut head, offset)?;
        if head[0..4] != MAGIC {
            break;
        }
        let field = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b[..r.len()].copy_from_slice(&head[r]);
            u64::from_le_bytes(b)
        };
        let (payload, first, count) = (field(4..8), field(8..16), field(16..20));
        if offset + HEADER as u64 + payload > len {
            break;
        }
        if frames.last().is_some_and(|f| f.end() != first) {
            break;
        }
        let mut body = vec![0u8; payload as usize];
        file.read_exact_at(&mut body, offset + HEADER as u64)?;
        if checksum(&head[..20], &body)[..] != head[20..28] {
            break;
        }
        let Some(entries) = split(&body, count) else {
            break;
        };
        frames.push(Frame { first, entries });
        offset += HEADER as u64 + payload;
    }
    Ok(frames)
}

/// The `count` length-prefixed entries of a payload, or `None` when they do not fill it exactly.
fn split(mut body: &[u8], count: u64) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::with_capacity(usize::try_from(count).ok()?.min(1 << 16));
    for _ in 0..count {
        let (len, rest) = body.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        let entry = rest.get(..len)?;
        out.push(entry.to_vec());
        body = &rest[len..];
    }
    body.is_empty().then_some(out)
}

/// The log file, open for the syncer.
#[derive(Debug)]
pub(crate) struct WalFile {
    file: File,
    offset: u64,
}

impl WalFile {
    /// Opens (or creates) the log at `path` and starts it over: call only once its frames are in
    /// the database (`Storage::open` replays them).
    ///
    /// # Errors
    /// When the file cannot be opened, written or synced.
    pub(crate) fn open(path: &Path) -> std::io::Result<Self> {
        Self::open_at(path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("write-ahead log {}: {e}", path.display()))
        })
    }

    fn open_at(path: &Path) -> std::io::Result<Self> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut wal = Self { file, offset: 0 };
        wal.reset()?;
        if !existed && let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(wal)
    }

    /// A log on `/dev/full`, whose every write fails (`ENOSPC`): for the syncer's failure tests.
    #[cfg(test)]
    pub(crate) fn on_full_device() -> std::io::Result<Self> {
        let file = OpenOptions::new().write(true).open("/dev/full")?;
        Ok(Self { file, offset: 0 })
    }

    /// Writes `bytes` (whole frames) after the frames written so far; durable after [`Self::sync`].
    ///
    /// # Errors
    /// When the write fails.
    pub(crate) fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(bytes, self.offset)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Makes every frame written so far durable.
    ///
    /// # Errors
    /// When the disk reports a failure.
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Starts the log over (its frames are all in a durable database commit): the first frame's
    /// header is zeroed and synced, and the next frame is written at the start.
    ///
    /// # Errors
    /// When the write or the sync fails.
    pub(crate) fn reset(&mut self) -> std::io::Result<()> {
        self.file.write_all_at(&[0u8; HEADER], 0)?;
        self.file.sync_data()?;
        self.offset = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(first: u64, entries: &[&[u8]]) -> Vec<u8> {
        let mut f = FrameBuilder::new(first);
        for e in entries {
            f.push(e);
        }
        f.finish()
    }

    #[test]
    fn frames_read_back_until_a_torn_or_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.wal");
        let mut wal = WalFile::open(&path).unwrap();
        assert_eq!(read(&path).unwrap(), Vec::new());
        wal.append(&frame(7, &[b"a", b"bc"])).unwrap();
        wal.append(&frame(9, &[b""])).unwrap();
        wal.sync().unwrap();
        let want = vec![
            Frame {
                first: 7,
                entries: vec![b"a".to_vec(), b"bc".to_vec()],
            },
            Frame {
                first: 9,
                entries: vec![Vec::new()],
            },
        ];
        assert_eq!(read(&path).unwrap(), want);

        // A new generation over the old one: the old frame after it does not continue it.
        wal.reset().unwrap();
        assert_eq!(read(&path).unwrap(), Vec::new());
        wal.append(&frame(20, &[b"x"])).unwrap();
        let got = read(&path).unwrap();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].entries, vec![b"x".to_vec()]);

        // A torn frame (its last byte missing) and a damaged one end the log.
        let next = frame(21, &[b"yz"]);
        wal.append(&next[..next.len() - 1]).unwrap();
        assert_eq!(read(&path).unwrap().len(), 1);
        let mut damaged = next.clone();
        *damaged.last_mut().unwrap() ^= 1;
        let at = wal.offset - (next.len() as u64 - 1);
        wal.file.write_all_at(&damaged, at).unwrap();
        assert_eq!(read(&path).unwrap().len(), 1);
        wal.file.write_all_at(&next, at).unwrap();
        assert_eq!(read(&path).unwrap().len(), 2);
        // A frame that skips entries is not part of the log.
        wal.file
            .write_all_at(&frame(23, &[b"q"]), at + next.len() as u64)
            .unwrap();
        assert_eq!(read(&path).unwrap().len(), 2);
    }

    #[test]
    fn a_log_that_cannot_be_opened_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.wal");
        std::fs::create_dir(&path).unwrap();
        let err = WalFile::open(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("write-ahead log {}: ", path.display())),
            "{err}"
        );
    }

    #[test]
    fn an_empty_frame_is_not_written() {
        assert!(FrameBuilder::new(3).finish().is_empty());
        assert_eq!(
            read(Path::new("/nonexistent/ledger.wal")).unwrap(),
            Vec::new()
        );
    }
}
