//! `medmesh demo` (the README's first command): DICOM through two real sidecars, one verified
//! ledger record per instance, a tampered instance caught, and no patient data printed.

// Integration tests: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mesh.rs"]
mod mesh;

#[test]
fn demo_records_verifies_and_catches_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(mesh::bin("medmesh"))
        .args(["demo", "--instances", "6", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = mesh::text(&out);
    assert!(out.status.success(), "{text}");
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        last,
        "demo transfers=6 recorded=6 verified=6 tamper_detected=true archived=6 recovered=true",
        "{text}"
    );
    assert!(text.contains("audit OK: "), "{text}");
    assert!(text.contains("6 of 6 stores answered success"), "{text}");
    assert!(text.contains("through the mesh"), "{text}");
    assert!(text.contains("ARCHIVED ORIGINAL: entry "), "{text}");
    assert!(text.contains("equals the ledger's record"), "{text}");
    // The archive holds six ciphertexts, each named by the CID Kubo gives its bytes, none
    // carrying anything of the instances in clear.
    let store = dir.path().join("archive-store");
    let mut objects = 0;
    for e in std::fs::read_dir(&store).unwrap() {
        let p = e.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(
            medmesh_core::unixfs::file_cid(&bytes).to_string(),
            p.file_name().unwrap().to_str().unwrap()
        );
        assert!(bytes.starts_with(b"age-encryption.org/v1\n"));
        for needle in [&b"DEMO^SYNTHETIC"[..], b"DEMO-0001", b"2.25."] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} holds {:?} in clear",
                p.display(),
                String::from_utf8_lossy(needle)
            );
        }
        objects += 1;
    }
    assert_eq!(objects, 6);
    // Everything archived left the staging area.
    let ready = dir.path().join("pacs-spool/archive/ready");
    assert_eq!(std::fs::read_dir(&ready).unwrap().count(), 0);
    // No patient data in what the demo printed about records (its sample files carry a
    // synthetic name and ID, which must stay out of the ledger).
    assert!(
        !text.contains("DEMO^SYNTHETIC") && !text.contains("DEMO-0001"),
        "{text}"
    );
}
