//! A local object store keyed by CID: the demo's archive, and a fallback target in tests.
//! Each object is one file named by its CID (computed with `medmesh_core::unixfs`, so equal to
//! what Kubo gives the same bytes), written to a temporary name, fsynced, then renamed.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use medmesh_core::record::ContentId;
use medmesh_core::unixfs::FileBuilder;

use crate::ArchiveError;

/// A directory of objects named by CID.
#[derive(Debug, Clone)]
pub struct LocalStore {
    dir: PathBuf,
}

impl LocalStore {
    /// The store in `dir` (created if missing).
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, ArchiveError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| ArchiveError::io(&dir, e))?;
        Ok(Self { dir })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the object `cid` lives.
    pub fn path(&self, cid: &ContentId) -> PathBuf {
        self.dir.join(cid.to_string())
    }

    /// Copies the file at `src` into the store (blocking I/O); returns its CID. Storing the
    /// same bytes twice leaves one object.
    ///
    /// # Errors
    /// When reading, writing or syncing fails.
    pub fn put_file(&self, src: &Path) -> Result<ContentId, ArchiveError> {
        let mut input = std::fs::File::open(src).map_err(|e| ArchiveError::io(src, e))?;
        let mut rnd = [0u8; 8];
        getrandom::fill(&mut rnd).map_err(|e| ArchiveError::Tls(e.to_string()))?;
        let tmp = self.dir.join(format!(".tmp-{}", hex::encode(rnd)));
        let result = (|| {
            let mut out = std::fs::File::create(&tmp).map_err(|e| ArchiveError::io(&tmp, e))?;
            let mut fb = FileBuilder::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = input.read(&mut buf).map_err(|e| ArchiveError::io(src, e))?;
                if n == 0 {
                    break;
                }
                fb.push(&buf[..n], &mut |_, _| {});
                out.write_all(&buf[..n])
                    .map_err(|e| ArchiveError::io(&tmp, e))?;
            }
            out.sync_all().map_err(|e| ArchiveError::io(&tmp, e))?;
            let cid = ContentId::from_bytes(&fb.finish(&mut |_, _| {}).to_bytes())
                .map_err(|e| ArchiveError::Tls(e.to_string()))?;
            let dst = self.path(&cid);
            std::fs::rename(&tmp, &dst).map_err(|e| ArchiveError::io(&dst, e))?;
            std::fs::File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| ArchiveError::io(&self.dir, e))?;
            Ok(cid)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Opens the object `cid`.
    ///
    /// # Errors
    /// [`ArchiveError::NotFound`] when it is not stored.
    pub fn open_object(&self, cid: &ContentId) -> Result<std::fs::File, ArchiveError> {
        let p = self.path(cid);
        std::fs::File::open(&p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ArchiveError::NotFound {
                cid: cid.to_string(),
                dir: self.dir.display().to_string(),
            },
            _ => ArchiveError::io(&p, e),
        })
    }
}
