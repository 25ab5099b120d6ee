//! Fetching an archived object by CID, trusting nothing that serves it: the CID is recomputed
//! from the bytes received, as they are written to a file, and a mismatch is refused.

use std::io::{Read as _, Write as _};
use std::path::Path;

use futures::StreamExt as _;
use medmesh_core::record::ContentId;
use medmesh_core::unixfs::FileBuilder;

use crate::mesh::{MeshEndpoint, empty};
use crate::{ArchiveError, LocalStore};

/// Where objects are read from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A Kubo gateway (`GET /ipfs/{cid}`), through the mesh.
    Gateway(MeshEndpoint),
    /// A local object store.
    Store(LocalStore),
}

/// Writes the object `cid` from `source` to `out` (created; removed again on failure) and
/// returns its length. The CID of the bytes written is recomputed as they arrive and must
/// equal `cid`.
///
/// # Errors
/// [`ArchiveError::CidMismatch`] when the bytes are not the object; transport and I/O errors.
pub async fn fetch_verified(
    source: &Source,
    cid: &ContentId,
    out: &Path,
) -> Result<u64, ArchiveError> {
    let mut file = std::fs::File::create(out).map_err(|e| ArchiveError::io(out, e))?;
    let mut fb = FileBuilder::new();
    let mut sink = |chunk: &[u8], file: &mut std::fs::File| -> Result<(), ArchiveError> {
        fb.push(chunk, &mut |_, _| {});
        file.write_all(chunk).map_err(|e| ArchiveError::io(out, e))
    };
    let result = async {
        match source {
            Source::Store(store) => {
                let mut input = store.open_object(cid)?;
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = input
                        .read(&mut buf)
                        .map_err(|e| ArchiveError::io(&store.path(cid), e))?;
                    if n == 0 {
                        break;
                    }
                    sink(&buf[..n], &mut file)?;
                }
            }
            Source::Gateway(ep) => {
                let path = format!("/ipfs/{cid}");
                let target = format!("{}{path}", ep.authority());
                let resp = ep.send(http::Method::GET, &path, None, empty()).await?;
                let status = resp.status();
                if !status.is_success() {
                    return Err(ArchiveError::Status {
                        target,
                        status: status.as_u16(),
                        body: String::new(),
                    });
                }
                let mut frames = http_body_util::BodyDataStream::new(resp.into_body());
                while let Some(chunk) = frames.next().await {
                    let chunk = chunk.map_err(|e| ArchiveError::Transport {
                        target: target.clone(),
                        reason: format!("reading the body: {e}"),
                    })?;
                    sink(&chunk, &mut file)?;
                }
            }
        }
        file.sync_all().map_err(|e| ArchiveError::io(out, e))?;
        Ok(())
    }
    .await;
    let outcome = result.and_then(|()| {
        let got = fb.len();
        let computed = ContentId::from_bytes(&fb.finish(&mut |_, _| {}).to_bytes())
            .map_err(|e| ArchiveError::Tls(e.to_string()))?;
        if computed.multihash_bytes() != cid.multihash_bytes() {
            return Err(ArchiveError::CidMismatch {
                expected: cid.to_string(),
                got: computed.to_string(),
            });
        }
        Ok(got)
    });
    if outcome.is_err() {
        let _ = std::fs::remove_file(out);
    }
    outcome
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn what_a_store_serves_is_checked_against_the_cid_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path().join("store")).unwrap();
        let object: Vec<u8> = (0..700_000u32).map(|i| (i % 253) as u8).collect();
        let src = dir.path().join("object");
        std::fs::write(&src, &object).unwrap();
        let cid = store.put_file(&src).unwrap();
        // Named by the CID Kubo would give the bytes (medmesh_core::unixfs).
        assert_eq!(
            cid.to_bytes(),
            medmesh_core::unixfs::file_cid(&object).to_bytes()
        );
        let out = dir.path().join("out");
        let source = Source::Store(store.clone());
        assert_eq!(
            fetch_verified(&source, &cid, &out).await.unwrap(),
            object.len() as u64
        );
        assert_eq!(std::fs::read(&out).unwrap(), object);
        // A store (or gateway) serving other bytes under that CID is refused, nothing kept.
        let mut other = object.clone();
        other[400_000] ^= 1;
        std::fs::write(store.path(&cid), &other).unwrap();
        let err = fetch_verified(&source, &cid, &out).await.unwrap_err();
        assert!(matches!(err, ArchiveError::CidMismatch { .. }), "{err}");
        assert!(!out.exists());
        // An object the store does not have.
        let missing =
            ContentId::from_bytes(&medmesh_core::unixfs::file_cid(b"x").to_bytes()).unwrap();
        let err = fetch_verified(&source, &missing, &out).await.unwrap_err();
        assert!(matches!(err, ArchiveError::NotFound { .. }), "{err}");
    }

    #[test]
    fn endpoints_take_only_http_origins() {
        use crate::MeshEndpoint;
        use std::time::Duration;
        for bad in ["https://a:1", "http://a:1/path", "a:1", "http://"] {
            assert!(
                MeshEndpoint::new(bad, None, Duration::from_secs(1)).is_err(),
                "{bad}"
            );
        }
        let ep =
            MeshEndpoint::new("http://archive.ns.svc:9094", None, Duration::from_secs(1)).unwrap();
        assert_eq!(ep.authority(), "archive.ns.svc:9094");
    }
}
