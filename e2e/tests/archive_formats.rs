//! The archive's formats against the reference implementations, built from the Go module proxy by
//! `scripts/ipfs` (the tests fail, never skip, without them):
//! - `medmesh_core::unixfs` against Kubo: for every boundary of the balanced layout (empty, one
//!   byte, one chunk ± 1, 174 chunks ± 1, two and three tree levels with small chunks, 50 MiB)
//!   the CID computed in Rust equals the one `ipfs add --only-hash --cid-version=1` prints;
//! - `medmesh_core::seal` against filippo.io/age: what medmesh seals, `age -d` opens with either
//!   recipient's key; what `age -r` encrypts, medmesh opens; an edited byte is refused by both.

// Integration tests: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/ipfs.rs"]
mod ipfs;
#[path = "support/mesh.rs"]
mod mesh;
#[path = "support/netns.rs"]
mod netns;

use std::process::Command;

use medmesh_core::unixfs::{CHUNK_SIZE, FileBuilder, MAX_LINKS};

fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn cids_equal_kubos_at_every_layout_boundary() {
    let bin = ipfs::ipfs_bin();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let ipfs = |args: &[&str]| {
        let out = Command::new(bin.join("ipfs"))
            .args(args)
            .env("IPFS_PATH", &repo)
            .env("IPFS_TELEMETRY", "off")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ipfs {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    ipfs(&["init", "--profile=test"]);
    let l = MAX_LINKS;
    let cases: Vec<(usize, usize)> = vec![
        (0, CHUNK_SIZE),
        (1, CHUNK_SIZE),
        (CHUNK_SIZE - 1, CHUNK_SIZE),
        (CHUNK_SIZE, CHUNK_SIZE),
        (CHUNK_SIZE + 1, CHUNK_SIZE),
        (l * CHUNK_SIZE, CHUNK_SIZE),
        (l * CHUNK_SIZE + 1, CHUNK_SIZE),
        (50 << 20, CHUNK_SIZE),
        (l * l, 1),
        (l * l + 1, 1),
        (2 * l * l + l + 3, 1),
        (l * 7 * 3 + 2, 7),
    ];
    for (i, &(size, chunk)) in cases.iter().enumerate() {
        let data = bytes(size, i as u64 + 1);
        let path = dir.path().join(format!("f{i}"));
        std::fs::write(&path, &data).unwrap();
        let kubo = ipfs(&[
            "add",
            "--only-hash",
            "-Q",
            "--cid-version=1",
            "--raw-leaves",
            &format!("--chunker=size-{chunk}"),
            path.to_str().unwrap(),
        ]);
        let mut b = FileBuilder::with_chunk_size(chunk);
        let mut blocks = 0usize;
        for piece in data.chunks(100_000) {
            b.push(piece, &mut |_, _| blocks += 1);
        }
        let ours = b.finish(&mut |_, _| blocks += 1).to_string();
        assert_eq!(ours, kubo, "size {size}, chunk {chunk}");
        eprintln!("size {size:>9} chunk {chunk:>6}: {blocks:>6} blocks, {ours}");
    }
}

#[test]
fn sealed_objects_are_age_files_both_ways() {
    use std::io::{Read as _, Write as _};

    use medmesh_core::seal::{ArchiveKey, Recipient, Sealer, open};

    let bin = ipfs::ipfs_bin();
    let age = bin.join("age");
    let dir = tempfile::tempdir().unwrap();
    let (archive, glass) = (ArchiveKey::generate(), ArchiveKey::generate());
    let data = bytes(1_000_003, 42);

    // medmesh seals; Go age opens with each key file.
    let mut s = Sealer::new(&[archive.recipient(), glass.recipient()], Vec::new()).unwrap();
    for p in data.chunks(65_000) {
        s.write_all(p).unwrap();
    }
    let (ct, _) = s.finish().unwrap();
    let sealed = dir.path().join("object.age");
    std::fs::write(&sealed, &ct).unwrap();
    for (name, k) in [("archive", &archive), ("glass", &glass)] {
        let key_file = dir.path().join(format!("{name}.key"));
        std::fs::write(&key_file, format!("{}\n", k.to_secret_string())).unwrap();
        let out = Command::new(&age)
            .args(["-d", "-i"])
            .arg(&key_file)
            .arg(&sealed)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "age -d: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == data, "{name}: Go age decrypted other bytes");
    }
    let mut edited = ct.clone();
    let at = edited.len() / 2;
    edited[at] ^= 0x40;
    std::fs::write(dir.path().join("edited.age"), &edited).unwrap();
    let out = Command::new(&age)
        .args(["-d", "-i"])
        .arg(dir.path().join("archive.key"))
        .arg(dir.path().join("edited.age"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "Go age accepted an edited ciphertext"
    );

    // Go age encrypts to medmesh's recipient; medmesh opens it.
    let plain = dir.path().join("plain.bin");
    std::fs::write(&plain, &data).unwrap();
    let recipient: Recipient = archive.recipient();
    let out = Command::new(&age)
        .args(["-r", &recipient.to_string(), "-o"])
        .arg(dir.path().join("from-go.age"))
        .arg(&plain)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "age -r: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from_go = std::fs::read(dir.path().join("from-go.age")).unwrap();
    let mut opened = Vec::new();
    open(&from_go[..], &archive)
        .unwrap()
        .read_to_end(&mut opened)
        .unwrap();
    assert!(
        opened == data,
        "medmesh decrypted other bytes than Go age encrypted"
    );
    assert!(
        open(&from_go[..], &glass).is_err(),
        "a key it was not sealed to opened it"
    );
}
