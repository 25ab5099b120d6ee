//! Crash consistency of the ledger binary: many clients append while the ledger is SIGKILLed at
//! random moments (20 times) and restarted. Afterwards every acknowledged entry must be present at
//! its acknowledged index with the same leaf hash, no record may be stored twice, every checkpoint
//! the auditor saw must extend the previous one, and the audit must pass. Entries acknowledged
//! between two checkpoints are durable only in the write-ahead log: the restarts must have
//! appended such entries again.

// Integration tests: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mesh.rs"]
mod mesh;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use medmesh_core::merkle::Hash;
use mesh::*;

const KILLS: usize = 20;
const CLIENTS: u64 = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_entries_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = LedgerProc::setup(dir.path());
    l.start().unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("kill schedule seed {seed}");
    let mut rng = Rng(seed);

    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let w = vec![l.client("pacs.writer")];
            tokio::spawn(append_until_stopped(c, w, acked.clone(), stop.clone()))
        })
        .collect();

    let mut trusted_sizes = Vec::new();
    for k in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(80 + rng.next() % 320)).await;
        l.kill();
        l.start()
            .unwrap_or_else(|e| panic!("restart {k} failed: {e}"));
        // The auditor moves its trusted checkpoint forward after every restart: a lost or
        // rewritten entry would show up here as a rollback or fork.
        let out = l.cli(&["checkpoint"]);
        assert!(out.status.success(), "after kill {k}: {}", text(&out));
        let t = text(&out);
        let size: u64 = t
            .split("size=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        trusted_sizes.push(size);
    }
    stop.store(true, Ordering::Relaxed);
    let mut retries = 0;
    for t in tasks {
        retries += t.await.unwrap();
    }
    let acked = acked.lock().await.clone();
    let replays = wal_replays(&l);
    println!(
        "{} entries acknowledged, {retries} client retries, trusted sizes {trusted_sizes:?}, \
         {replays} restarts appended entries again from the write-ahead log",
        acked.len()
    );
    assert!(
        replays > 0,
        "no restart found entries only in the write-ahead log: the test did not exercise it"
    );
    assert!(
        acked.len() > 200,
        "too little traffic to mean anything: {}",
        acked.len()
    );
    assert!(trusted_sizes.windows(2).all(|w| w[0] <= w[1]));

    // Every acknowledged entry is at its index with its leaf; nothing else is in the log.
    let auditor = l.client("audit.auditor");
    let cp = loop {
        let cp = auditor.checkpoint().await.unwrap().checkpoint;
        if cp.size as usize >= acked.len() {
            break cp;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        cp.size as usize,
        acked.len(),
        "every stored entry was acknowledged exactly once"
    );
    let mut by_index: HashMap<u64, Hash> = HashMap::new();
    for (i, h) in acked.values() {
        assert!(
            by_index.insert(*i, *h).is_none(),
            "index {i} acknowledged for two records"
        );
    }
    let mut start = 0;
    while start < cp.size {
        let page = auditor
            .entries(start, (start + 1000).min(cp.size))
            .await
            .unwrap();
        for e in page.entries {
            assert_eq!(
                by_index.get(&e.index),
                Some(&e.leaf_hash),
                "entry {}",
                e.index
            );
        }
        start += 1000;
    }
    let out = l.cli(&["audit", "--proofs", "300"]);
    assert!(
        out.status.success() && text(&out).contains("audit OK"),
        "{}",
        text(&out)
    );
    l.stop();
}

/// How many starts of the ledger appended lost entries again from its write-ahead log.
fn wal_replays(l: &LedgerProc) -> usize {
    std::fs::read_to_string(l.dir.join("ledger.log"))
        .unwrap()
        .lines()
        .filter(|line| line.contains("from its write-ahead log"))
        .count()
}

/// Appends acknowledged after the last checkpoint, before a SIGKILL, are durable only in the
/// write-ahead log (redb commits them without syncing): the restart appends them again at the
/// indexes and with the leaf hashes they were acknowledged with, and the next checkpoint
/// covers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_between_checkpoints_come_back_from_the_write_ahead_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = LedgerProc::setup(dir.path());
    // A second between checkpoints: the appends below all fall between two of them.
    let cfg = std::fs::read_to_string(dir.path().join("ledger.yaml")).unwrap();
    std::fs::write(
        dir.path().join("ledger.yaml"),
        cfg.replace(
            "checkpoint_interval_ms: 100",
            "checkpoint_interval_ms: 1000",
        ),
    )
    .unwrap();
    l.start().unwrap();
    let w = l.client("pacs.writer");
    // The first append is covered by a checkpoint at once (there is none yet).
    w.append(&record(0), true).await.unwrap();
    let mut acked = Vec::new();
    for i in 1..=40 {
        let r = w.append(&record(i), false).await.unwrap().result;
        acked.push((r.index, r.leaf_hash));
    }
    l.kill();
    l.start().unwrap();
    assert_eq!(wal_replays(&l), 1, "the restart appended entries again");
    let auditor = l.client("audit.auditor");
    let cp = loop {
        let cp = auditor.checkpoint().await.unwrap().checkpoint;
        if cp.size >= 41 {
            break cp;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(cp.size, 41);
    let page = auditor.entries(1, 41).await.unwrap();
    let got: Vec<(u64, Hash)> = page
        .entries
        .iter()
        .map(|e| (e.index, e.leaf_hash))
        .collect();
    assert_eq!(got, acked);
    let out = l.cli(&["audit", "--proofs", "41"]);
    assert!(
        out.status.success() && text(&out).contains("audit OK"),
        "{}",
        text(&out)
    );
    l.stop();
}
