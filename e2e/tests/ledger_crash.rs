//! Crash consistency of the ledger binary: many clients append while the ledger is SIGKILLed at
//! random moments (20 times) and restarted. Afterwards every acknowledged entry must be present at
//! its acknowledged index with the same leaf hash, no record may be stored twice, every checkpoint
//! the auditor saw must extend the previous one, and the audit must pass.

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
    println!(
        "{} entries acknowledged, {retries} client retries, trusted sizes {trusted_sizes:?}",
        acked.len()
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
