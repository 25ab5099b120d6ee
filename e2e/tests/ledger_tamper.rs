//! Tamper evidence, with the real binaries: alter the ledger's redb file the way an attacker with
//! disk access would (through redb, using the documented table layout), restart the ledger, and
//! check that `medmesh ledger audit`, proofs and the auditor's trusted checkpoint each catch it
//! with a message that names what is wrong and where.

// Integration tests: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mesh.rs"]
mod mesh;

use mesh::*;
use redb::{ReadableTable, TableDefinition};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const NODES: TableDefinition<u64, [u8; 32]> = TableDefinition::new("tree_nodes");
const N: u64 = 40;

/// Key of node `(level, index)`: its position in post-order (docs/ledger-format.md §4).
fn node(level: u8, index: u64) -> u64 {
    let last = ((index + 1) << level) - 1;
    2 * last - u64::from(last.count_ones()) + u64::from(level)
}

/// A ledger holding `N` entries, trusted and audited clean by the auditor, then stopped.
async fn prepared() -> (tempfile::TempDir, LedgerProc) {
    let dir = tempfile::tempdir().unwrap();
    let mut l = LedgerProc::setup(dir.path());
    l.start().unwrap();
    append(&l, 0, N).await;
    trust_and_audit_clean(&l, N);
    l.stop();
    (dir, l)
}

async fn append(l: &LedgerProc, from: u64, to: u64) {
    let w = l.client("pacs.writer");
    let resp = w
        .append_batch((from..to).map(record).collect(), true)
        .await
        .unwrap();
    assert_eq!(resp.results.len() as u64, to - from);
}

fn trust_and_audit_clean(l: &LedgerProc, size: u64) {
    let out = l.cli(&["checkpoint"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("checkpoint size={size} ")),
        "{}",
        text(&out)
    );
    let out = l.cli(&["audit", "--proofs", "1000"]);
    assert!(
        out.status.success() && text(&out).contains("audit OK"),
        "{}",
        text(&out)
    );
}

fn mutate(l: &LedgerProc, f: impl FnOnce(&redb::WriteTransaction)) {
    let db = redb::Database::open(l.data().join("ledger.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    f(&txn);
    txn.commit().unwrap();
}

fn audit_fails_with(l: &LedgerProc, wants: &[&str]) -> String {
    let out = l.cli(&["audit", "--proofs", "1000"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "audit must fail:\n{t}");
    for w in wants {
        assert!(t.contains(w), "audit output lacks {w:?}:\n{t}");
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_entry_is_caught_by_audit_and_proofs() {
    let (_d, mut l) = prepared().await;
    mutate(&l, |t| {
        let mut e = t.open_table(ENTRIES).unwrap();
        let mut v = e.get(17).unwrap().unwrap().value().to_vec();
        // Change the recorded byte count, as a forger hiding an altered instance would.
        let at = v.len() - 60;
        v[at] ^= 0x01;
        e.insert(17, v.as_slice()).unwrap();
    });
    l.start().unwrap();
    audit_fails_with(
        &l,
        &[
            "PROBLEM at entry 17",
            "entry 17 hashes to",
            "first bad index 17",
        ],
    );
    let out = l.cli(&["get", "17"]);
    assert!(
        !out.status.success() && text(&out).contains("the entry was altered"),
        "{}",
        text(&out)
    );
    // Untouched entries still prove.
    assert!(l.cli(&["get", "16"]).status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_leaf_node_is_caught() {
    let (_d, mut l) = prepared().await;
    mutate(&l, |t| {
        let mut n = t.open_table(NODES).unwrap();
        n.insert(node(0, 10), [0xAA; 32]).unwrap();
    });
    l.start().unwrap();
    audit_fails_with(&l, &["PROBLEM at entry 10", "but the tree holds leaf aaaa"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_interior_node_is_caught_by_proofs() {
    let (_d, mut l) = prepared().await;
    // Node (level 2, index 1) covers leaves 4..8; it is a sibling in the proofs of leaves 0..4.
    mutate(&l, |t| {
        let mut n = t.open_table(NODES).unwrap();
        n.insert(node(2, 1), [0x55; 32]).unwrap();
    });
    l.start().unwrap();
    let t = audit_fails_with(
        &l,
        &["the ledger's inclusion proof for entry 0 does not verify"],
    );
    for i in 0..4 {
        assert!(t.contains(&format!("PROBLEM at entry {i}:")), "{t}");
    }
    assert!(!t.contains("PROBLEM at entry 4:"), "{t}");
    let out = l.cli(&["prove", "2"]);
    assert!(
        !out.status.success() && text(&out).contains("does not verify"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_peak_node_stops_the_ledger_at_start() {
    let (_d, mut l) = prepared().await;
    // Size 40 = 32 + 8: node (3, 4) is a peak of the signed tree.
    mutate(&l, |t| {
        let mut n = t.open_table(NODES).unwrap();
        n.insert(node(3, 4), [0x33; 32]).unwrap();
    });
    let err = l.start().unwrap_err();
    assert!(err.contains("but the signed checkpoint says"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_entry_is_caught() {
    let (_d, mut l) = prepared().await;
    mutate(&l, |t| {
        t.open_table(ENTRIES).unwrap().remove(25).unwrap();
    });
    l.start().unwrap();
    audit_fails_with(&l, &["entry 25 is missing", "first bad index 25"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_entries_are_caught() {
    let (_d, mut l) = prepared().await;
    mutate(&l, |t| {
        let mut e = t.open_table(ENTRIES).unwrap();
        let a = e.get(5).unwrap().unwrap().value().to_vec();
        let b = e.get(6).unwrap().unwrap().value().to_vec();
        e.insert(5, b.as_slice()).unwrap();
        e.insert(6, a.as_slice()).unwrap();
    });
    l.start().unwrap();
    audit_fails_with(
        &l,
        &[
            "first bad index 5",
            "PROBLEM at entry 5",
            "PROBLEM at entry 6",
        ],
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_older_copy_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = LedgerProc::setup(dir.path());
    l.start().unwrap();
    append(&l, 0, 20).await;
    trust_and_audit_clean(&l, 20);
    l.stop();
    let backup = dir.path().join("backup");
    copy_dir(&l.data(), &backup);
    l.start().unwrap();
    append(&l, 20, N).await;
    trust_and_audit_clean(&l, N);
    l.stop();

    // 1. Only the database is restored: the ledger's own signer state refuses it.
    std::fs::copy(backup.join("ledger.redb"), l.data().join("ledger.redb")).unwrap();
    let err = l.start().unwrap_err();
    assert!(
        err.contains(
            "database has 20 entries but this ledger already signed a checkpoint of size 40"
        ),
        "{err}"
    );

    // 2. Database and signer state restored together: the ledger starts, the auditor's trusted
    //    checkpoint catches the rollback.
    copy_dir(&backup, &l.data());
    l.start().unwrap();
    let out = l.cli(&["checkpoint"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("ROLLBACK: the ledger serves a checkpoint of size 20, smaller than the trusted checkpoint of size 40"),
        "{}",
        text(&out)
    );

    // 3. The rolled-back ledger grows past the trusted size with other entries: a fork.
    append(&l, 100, 125).await;
    let out = l.cli(&["checkpoint"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(
            "FORK: checkpoint of size 45 does not extend the trusted checkpoint of size 40"
        ),
        "{}",
        text(&out)
    );
    // Every other command refuses to work from a forked log too.
    let out = l.cli(&["audit"]);
    assert!(
        !out.status.success() && text(&out).contains("FORK"),
        "{}",
        text(&out)
    );
}
