use std::io::Read as _;

use super::*;
use medmesh_core::record::{EventKind, Outcome, Protocol};
use medmesh_core::seal::ArchiveKey;

fn area(dir: &Path, limit: u64) -> (Arc<Staging>, ArchiveKey, Metrics) {
    let key = ArchiveKey::generate();
    let metrics = Metrics::register(&prometheus::Registry::new());
    let s = Staging::open(dir, limit, vec![key.recipient()], metrics.clone()).unwrap();
    (s, key, metrics)
}

fn record() -> AuditRecord {
    let mut r = AuditRecord::event(
        RecordId::new().unwrap(),
        EventKind::InstanceStored,
        1,
        "spiffe://td/ns/a/sa/scanner".parse().unwrap(),
        "spiffe://td/ns/b/sa/pacs".parse().unwrap(),
        Protocol::Dimse,
        Outcome::Success,
    );
    r.status = Some(0);
    r.bytes = 3;
    r.content_sha256 = Some(sha256(b"abc"));
    r
}

fn stage(s: &Arc<Staging>, data: &[u8]) -> Result<Staged, StageError> {
    let mut w = s.begin();
    for c in data.chunks(1000) {
        w.write(c);
    }
    w.finish()
}

fn files(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[test]
fn staged_objects_are_sealed_named_by_cid_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (s, key, metrics) = area(dir.path(), 1 << 30);
    let data: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    let staged = stage(&s, &data).unwrap();
    assert_eq!(staged.plaintext_len, data.len() as u64);
    assert_eq!(staged.plaintext_sha256, sha256(&data));
    assert_eq!(s.used(), staged.cipher_len);
    let rec = record();
    s.commit(&staged, &rec).unwrap();
    assert_eq!(s.pending(10), vec![staged.id]);
    assert_eq!(metrics.archive_backlog.get(), 1);
    // The ciphertext hashes to the CID staged, and opens to the plaintext.
    let cipher = std::fs::read(s.object_path(&staged.id)).unwrap();
    assert_eq!(cipher.len() as u64, staged.cipher_len);
    assert_eq!(
        medmesh_core::unixfs::file_cid(&cipher).to_bytes(),
        staged.cid.to_bytes()
    );
    let mut plain = Vec::new();
    medmesh_core::seal::open(&cipher[..], &key)
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(plain, data);
    // A restart (a new Staging on the same directory) finds it committed, with its meta.
    drop(s);
    let (s, _, metrics) = area(dir.path(), 1 << 30);
    assert_eq!(s.pending(10), vec![staged.id]);
    assert_eq!(s.used(), staged.cipher_len);
    assert_eq!(metrics.archive_backlog.get(), 1);
    let meta = s.load(&staged.id).unwrap();
    assert_eq!((meta.instance, meta.cid), (rec, staged.cid.clone()));
    s.remove(&staged.id);
    assert!(s.pending(10).is_empty());
    assert_eq!((s.used(), metrics.archive_backlog.get()), (0, 0));
}

#[test]
fn uncommitted_and_half_committed_objects_are_swept_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _, _) = area(dir.path(), 1 << 30);
    // Finished but never committed (the store's response was never released).
    let a = stage(&s, b"not committed").unwrap();
    // Committed, then its meta lost as if the rename never happened.
    let b = stage(&s, b"half committed").unwrap();
    s.commit(&b, &record()).unwrap();
    std::fs::rename(
        dir.path().join(format!("ready/{}.meta", b.id)),
        dir.path().join(format!("ready/{}.meta.tmp", b.id)),
    )
    .unwrap();
    // Still being written when the process died.
    let mut c = s.begin();
    c.write(b"partial");
    std::mem::forget(c);
    drop(s);
    let (s, _, metrics) = area(dir.path(), 1 << 30);
    assert!(s.pending(10).is_empty());
    assert_eq!(files(&dir.path().join("tmp")), 0, "{a:?}");
    assert_eq!(files(&dir.path().join("ready")), 0);
    assert_eq!((s.used(), metrics.archive_backlog.get()), (0, 0));
}

#[test]
fn a_full_area_refuses_and_gives_every_byte_back() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _, metrics) = area(dir.path(), 64 * 1024);
    let small = stage(&s, &[1u8; 1000]).unwrap();
    let used = s.used();
    let err = stage(&s, &[2u8; 200_000]).unwrap_err();
    assert_eq!(err, StageError::Full { limit: 64 * 1024 });
    assert_eq!(
        s.used(),
        used,
        "the refused object's reservation is released"
    );
    assert_eq!(
        files(&dir.path().join("tmp")),
        1,
        "only the small object remains"
    );
    assert_eq!(
        metrics
            .archive_objects
            .with_label_values(&["skipped_full"])
            .get(),
        1
    );
    // Dropped mid-object (the association was cut): file and reservation go.
    let mut w = s.begin();
    w.write(&[3u8; 5000]);
    drop(w);
    assert_eq!(s.used(), used);
    s.discard(&small);
    assert_eq!((s.used(), files(&dir.path().join("tmp"))), (0, 0));
    assert_eq!(metrics.archive_staged_bytes.get(), 0);
}

#[test]
fn a_corrupted_meta_file_is_detected_and_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _, metrics) = area(dir.path(), 1 << 30);
    let st = stage(&s, b"instance").unwrap();
    s.commit(&st, &record()).unwrap();
    let meta = dir.path().join(format!("ready/{}.meta", st.id));
    let text = std::fs::read_to_string(&meta).unwrap();
    std::fs::write(&meta, text.replace("\"cipher_len\":", "\"cipher_len\":1")).unwrap();
    let err = s.load(&st.id).unwrap_err();
    assert!(err.to_string().contains("checksum does not match"), "{err}");
    s.quarantine(&st.id);
    assert!(s.pending(10).is_empty());
    assert_eq!(files(&dir.path().join("failed")), 2);
    assert_eq!(
        metrics
            .archive_objects
            .with_label_values(&["corrupt"])
            .get(),
        1
    );
    assert_eq!(s.used(), 0);
}

#[test]
fn a_withdrawn_object_is_no_longer_pending() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _, _) = area(dir.path(), 1 << 30);
    let st = stage(&s, b"instance").unwrap();
    s.commit(&st, &record()).unwrap();
    s.withdraw(&st.id);
    assert!(s.pending(10).is_empty());
    assert_eq!(s.used(), 0);
    // Withdrawing twice (the uploader took it meanwhile) changes nothing.
    s.withdraw(&st.id);
    assert_eq!(s.used(), 0);
}
