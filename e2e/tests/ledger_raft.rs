//! The replicated ledger: three real `medmesh-ledger` processes form one Raft-replicated log.
//! Appends through any replica are stored once, in one order, on every replica; checkpoints
//! are the same on every replica; SIGKILL of the leader under concurrent appends loses no
//! acknowledged entry and never yields two inconsistent checkpoints.

// Integration tests: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mesh.rs"]
mod mesh;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/raft.rs"]
mod raft;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use medmesh_core::Checkpoint;
use medmesh_core::merkle::Hash;
use mesh::{Acked, Rng, append_until_stopped, record, text};
use raft::Cluster;
use tokio::sync::Mutex;

/// Waits until every replica in `which` serves a checkpoint of at least `size`, and returns them.
async fn checkpoints_at(c: &Cluster, which: &[usize], size: u64) -> Vec<Checkpoint> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    for &i in which {
        let auditor = c.client(i, "audit.auditor");
        loop {
            if let Ok(cp) = auditor.checkpoint().await
                && cp.checkpoint.size >= size
            {
                out.push(cp.checkpoint);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica {i} has no checkpoint of size {size}: {:?}",
                c.status(i)
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    out
}

/// Every entry below `size` of every replica in `which`, as leaf hashes.
async fn leaves(c: &Cluster, i: usize, size: u64) -> Vec<Hash> {
    let auditor = c.client(i, "audit.auditor");
    let mut out = Vec::new();
    let mut start = 0;
    while start < size {
        let page = auditor
            .entries(start, (start + 1000).min(size))
            .await
            .unwrap();
        out.extend(page.entries.iter().map(|e| e.leaf_hash));
        start += 1000;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_hold_one_log_and_any_replica_serves() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::setup(dir.path(), 3);
    c.start_all();
    let leader = c.wait_leader(Duration::from_secs(20));
    for i in 0..3 {
        c.wait_ready(i, Duration::from_secs(20));
    }
    println!("leader is replica {leader}");

    // Appends through every replica: followers forward to the leader.
    let mut indexes = HashMap::new();
    for i in 0..3 {
        let w = c.client(i, "pacs.writer");
        for k in 0..20 {
            let rec = record(i as u64 * 1000 + k);
            let r = w
                .append(&rec, k % 5 == 0)
                .await
                .unwrap_or_else(|e| panic!("append through replica {i}: {e}\n{}", c.log(i)));
            assert!(!r.result.duplicate && !r.result.conflict);
            assert!(
                indexes.insert(r.result.index, r.result.leaf_hash).is_none(),
                "index {} given twice",
                r.result.index
            );
            // The same record again (a retry) is the same entry.
            if k == 3 {
                let again = w.append(&rec, false).await.unwrap();
                assert!(again.result.duplicate);
                assert_eq!(again.result.index, r.result.index);
            }
        }
        let batch: Vec<_> = (0..50).map(|k| record(i as u64 * 1000 + 100 + k)).collect();
        let r = w.append_batch(batch, true).await.unwrap();
        for res in r.results {
            assert!(indexes.insert(res.index, res.leaf_hash).is_none());
        }
    }
    let total = indexes.len() as u64;
    assert_eq!(total, 3 * 70);

    // One log: the same checkpoint root at the same size, the same leaves, on every replica.
    let cps = checkpoints_at(&c, &[0, 1, 2], total).await;
    let size = cps.iter().map(|c| c.size).min().unwrap();
    let reference = leaves(&c, 0, size).await;
    for i in 0..3 {
        assert_eq!(leaves(&c, i, size).await, reference, "replica {i}");
    }
    for (i, h) in reference.iter().enumerate() {
        assert_eq!(indexes.get(&(i as u64)), Some(h), "entry {i}");
    }
    for w in cps.windows(2) {
        if w[0].size == w[1].size {
            assert_eq!(w[0].root, w[1].root);
        }
    }
    for i in 0..3 {
        let out = c.cli(i, &["audit", "--proofs", "50"]);
        assert!(
            out.status.success() && text(&out).contains("audit OK"),
            "replica {i}: {}",
            text(&out)
        );
    }
    // Every replica names the same leader, over the API as the CLI reads it.
    for i in 0..3 {
        let s = c.status(i).unwrap();
        assert_eq!(s["leader"], leader as u64, "replica {i}: {s}");
        let out = c.cli(i, &["status"]);
        let t = text(&out);
        assert!(out.status.success(), "replica {i}: {t}");
        assert!(
            t.contains(&format!("leader {leader}, term")) && t.contains("; ready"),
            "replica {i}: {t}"
        );
        let role = if i == leader {
            "(Leader) of 3"
        } else {
            "(Follower) of 3"
        };
        assert!(t.contains(role), "replica {i}: {t}");
        if i == leader {
            assert_eq!(t.matches("(lag ").count(), 2, "{t}");
        }
    }
}

const KILLS: usize = 20;
const CLIENTS: u64 = 9;

/// Concurrent appenders through every replica, and a collector of every checkpoint any replica
/// publishes meanwhile.
struct Load {
    acked: Acked,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<u64>>,
    seen: Arc<Mutex<Vec<Checkpoint>>>,
    collector: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(c: &Cluster) -> Self {
        Self::start_on(c, c.replicas.len())
    }

    /// Load through the first `n` replicas only.
    fn start_on(c: &Cluster, n: usize) -> Self {
        let acked: Acked = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        // On a failure, clients retry the same records (same ids) through the next replica.
        let writers: Vec<_> = (0..n).map(|i| c.client(i, "pacs.writer")).collect();
        let tasks = (0..CLIENTS)
            .map(|k| {
                let w = writers.clone();
                tokio::spawn(append_until_stopped(k, w, acked.clone(), stop.clone()))
            })
            .collect();
        let seen: Arc<Mutex<Vec<Checkpoint>>> = Arc::default();
        let auditors: Vec<_> = (0..n).map(|i| c.client(i, "audit.auditor")).collect();
        // One auditor's trusted checkpoint, moved forward through every replica in turn (as
        // through the client Service): it must never see a rollback or a fork.
        let trusted =
            medmesh_ledger_client::TrustedStore::new(c.dir.join("service-auditor.checkpoint"));
        let collector = {
            let (seen, stop) = (seen.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    for a in &auditors {
                        if let Ok(Ok(cp)) =
                            tokio::time::timeout(Duration::from_millis(500), a.checkpoint()).await
                        {
                            let mut s = seen.lock().await;
                            if !s.contains(&cp.checkpoint) {
                                s.push(cp.checkpoint);
                            }
                        }
                        let update = tokio::time::timeout(
                            Duration::from_secs(5),
                            a.update_trusted(&trusted),
                        )
                        .await;
                        if let Ok(Err(
                            e @ (medmesh_ledger_client::ClientError::Rollback { .. }
                            | medmesh_ledger_client::ClientError::Fork { .. }),
                        )) = update
                        {
                            panic!("an auditor moving through the replicas saw: {e}");
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            })
        };
        Self {
            acked,
            stop,
            tasks,
            seen,
            collector,
        }
    }

    /// Stops the load; returns what was acknowledged, the client retries and the checkpoints
    /// seen.
    async fn finish(
        self,
    ) -> (
        HashMap<medmesh_core::record::RecordId, (u64, Hash)>,
        u64,
        Vec<Checkpoint>,
    ) {
        self.stop.store(true, Ordering::Relaxed);
        let mut retries = 0;
        for t in self.tasks {
            retries += t.await.unwrap();
        }
        self.collector.await.unwrap();
        let acked = self.acked.lock().await.clone();
        let seen = self.seen.lock().await.clone();
        (acked, retries, seen)
    }
}

/// After a run: every stored entry was acknowledged exactly once, at its index, with its leaf,
/// on every replica; the audit passes on each with identical roots; and every checkpoint seen
/// during the run is a prefix of every larger one.
async fn verify_one_log(
    c: &Cluster,
    acked: &HashMap<medmesh_core::record::RecordId, (u64, Hash)>,
    seen: Vec<Checkpoint>,
) {
    let all: Vec<usize> = (0..c.replicas.len()).collect();
    verify_one_log_on(c, &all, acked, seen).await;
}

/// [`verify_one_log`] on the replicas in `which`.
async fn verify_one_log_on(
    c: &Cluster,
    which: &[usize],
    acked: &HashMap<medmesh_core::record::RecordId, (u64, Hash)>,
    mut seen: Vec<Checkpoint>,
) {
    let total = acked.len() as u64;
    for &i in which {
        c.wait_ready(i, Duration::from_secs(30));
    }
    let all = which.to_vec();
    let cps = checkpoints_at(c, &all, total).await;
    for (i, cp) in cps.iter().enumerate() {
        assert_eq!(
            cp.size, total,
            "replica {i}: every stored entry was acknowledged"
        );
        assert_eq!(cp.root, cps[0].root, "replica {i}");
    }
    let mut by_index: HashMap<u64, Hash> = HashMap::new();
    for (i, h) in acked.values() {
        assert!(
            by_index.insert(*i, *h).is_none(),
            "index {i} acknowledged twice"
        );
    }
    for &i in which {
        for (index, leaf) in leaves(c, i, total).await.iter().enumerate() {
            assert_eq!(
                by_index.get(&(index as u64)),
                Some(leaf),
                "replica {i}, entry {index}"
            );
        }
        let out = c.cli(i, &["audit", "--proofs", "200"]);
        assert!(
            out.status.success() && text(&out).contains("audit OK"),
            "replica {i}: {}",
            text(&out)
        );
    }
    seen.push(cps[0].clone());
    seen.sort_by_key(|cp| cp.size);
    let prover = c.client(which[0], "audit.auditor");
    for w in seen.windows(2) {
        prover
            .check_extends(&w[0], &w[1])
            .await
            .unwrap_or_else(|e| panic!("checkpoints {} and {}: {e}", w[0].size, w[1].size));
    }
    println!("{} distinct checkpoints, all consistent", seen.len());
}

fn seed() -> u64 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("schedule seed {seed}");
    seed
}

async fn three_ready_replicas(dir: &std::path::Path) -> Cluster {
    ready(Cluster::setup(dir, 3)).await
}

async fn ready(mut c: Cluster) -> Cluster {
    c.start_all();
    c.wait_leader(Duration::from_secs(20));
    for i in 0..3 {
        c.wait_ready(i, Duration::from_secs(20));
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_under_load_loses_no_acknowledged_entry() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = three_ready_replicas(dir.path()).await;
    let mut rng = Rng(seed());
    let load = Load::start(&c);
    let mut failovers = Vec::new();
    let mut elections = Vec::new();
    for k in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(200 + rng.next() % 400)).await;
        let leader = c.wait_leader(Duration::from_secs(20));
        let before = load.acked.lock().await.len();
        let killed = Instant::now();
        c.kill(leader);
        let next = c.wait_leader(Duration::from_secs(20));
        elections.push(killed.elapsed().as_millis());
        // Failover: until the new leader's first acknowledgement reaches a client.
        while load.acked.lock().await.len() == before {
            assert!(
                killed.elapsed() < Duration::from_secs(20),
                "nothing acknowledged within 20 s of kill {k}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        failovers.push(killed.elapsed().as_millis());
        assert_ne!(next, leader);
        c.start(leader);
    }
    let (acked, retries, seen) = load.finish().await;
    println!(
        "per kill, ms to a ready new leader: {elections:?}; to its first acknowledgement: {failovers:?}"
    );
    failovers.sort_unstable();
    println!(
        "{} entries acknowledged, {retries} client retries; failover ms (kill → next acknowledgement) median {} max {}",
        acked.len(),
        failovers[failovers.len() / 2],
        failovers[failovers.len() - 1]
    );
    assert!(acked.len() > 300, "too little traffic: {}", acked.len());
    verify_one_log(&c, &acked, seen).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_and_a_wiped_replica_rejoining_by_snapshot_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = three_ready_replicas(dir.path()).await;
    let load = Load::start(&c);
    // Rolling restart under load, one replica at a time, each back and caught up before the next.
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.stop(i);
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.start(i);
        c.wait_ready(i, Duration::from_secs(30));
    }
    // A follower loses its disk; meanwhile the others log far more than a snapshot interval,
    // so the leader no longer holds the log from the start and must send a snapshot.
    let leader = c.wait_leader(Duration::from_secs(20));
    let f = (leader + 1) % 3;
    c.kill(f);
    std::fs::remove_dir_all(c.replicas[f].dir.join("data")).unwrap();
    let before = load.acked.lock().await.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let purged = c.status(leader).and_then(|s| s["snapshot_index"].as_u64());
        if purged.is_some_and(|p| p > 0) && load.acked.lock().await.len() > before + 500 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leader built no snapshot: {:?}",
            c.status(leader)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.start(f);
    c.wait_ready(f, Duration::from_secs(60));
    let (acked, retries, seen) = load.finish().await;
    println!(
        "{} entries acknowledged, {retries} client retries",
        acked.len()
    );
    assert!(
        c.log(f).contains("installed snapshot"),
        "replica {f} rejoined without a snapshot:\n{}",
        c.log(f)
    );
    verify_one_log(&c, &acked, seen).await;
}

/// Replicas as network-namespace pods: iptables DROP cuts the leader off from the other two.
/// The isolated minority acknowledges nothing; the majority elects a leader and goes on; after
/// healing, the old leader catches up and every replica holds the one log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_acknowledges_nothing_and_the_majority_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let c = ready(Cluster::setup_in_pods(dir.path(), 3, "mmraft")).await;
    let pods = c.pods.as_ref().unwrap();
    let load = Load::start(&c);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let old = c.wait_leader(Duration::from_secs(20));
    pods.isolate(old);
    let cut = Instant::now();
    let before = load.acked.lock().await.len();

    // The majority elects another leader and acknowledges appends again.
    let deadline = Instant::now() + Duration::from_secs(20);
    let new = loop {
        let found = (0..3).filter(|&i| i != old).find(|&i| {
            c.status(i)
                .is_some_and(|s| s["state"] == "Leader" && s["ready"] == true)
        });
        if let Some(n) = found {
            break n;
        }
        assert!(Instant::now() < deadline, "the majority elected no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let elected = cut.elapsed();
    while load.acked.lock().await.len() < before + 100 {
        assert!(
            cut.elapsed() < Duration::from_secs(30),
            "the majority acknowledged too little after the partition"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "leader {old} isolated; replica {new} leads after {} ms; 100 more acknowledgements after {} ms",
        elected.as_millis(),
        cut.elapsed().as_millis()
    );

    // The isolated old leader acknowledges nothing: appends through it fail (timeout or 503),
    // and it reports itself not ready.
    let w = c.client(old, "pacs.writer");
    for k in 0..3 {
        let rec = record(9_000_000 + k);
        let r = tokio::time::timeout(Duration::from_secs(15), w.append(&rec, false)).await;
        assert!(
            !matches!(r, Ok(Ok(_))),
            "the isolated replica acknowledged an append: {r:?}"
        );
    }
    let s = c.status(old).unwrap();
    assert_eq!(s["ready"], false, "{s}");
    assert!(c.cli(old, &["status"]).status.code() == Some(1));

    // Healed: the old leader follows the new one and catches up.
    pods.heal(old);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = c.status(old).unwrap_or_default();
        if s["ready"] == true && s["state"] == "Follower" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old leader did not rejoin: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (acked, retries, seen) = load.finish().await;
    println!(
        "{} entries acknowledged, {retries} client retries",
        acked.len()
    );
    verify_one_log(&c, &acked, seen).await;
}

/// The sidecar's enforce and spool paths through a failover: unmodified storescu stores
/// instances through audited sidecars whose ledger is a follower, the leader is killed between
/// associations, and every store attempt ends as exactly one entry in the one log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audited_stores_through_a_leader_failover_are_recorded_exactly_once() {
    use std::process::Command;
    netns::require(&["storescu", "storescp"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = three_ready_replicas(d).await;
    let out = mesh::run(
        Command::new(mesh::bin("medmesh"))
            .args(["dev", "certs", "--workload", "radiology/scanner", "--out"])
            .arg(d.join("certs")),
    );
    assert!(out.status.success(), "{}", text(&out));
    // storescp keeps every instance it is sent, each in its own file: the oracle of what the
    // PACS stored.
    let scp_port = mesh::free_port();
    let received = d.join("received");
    std::fs::create_dir_all(&received).unwrap();
    let _scp = mesh::Kill(
        Command::new("storescp")
            .args(["-aet", "STORESCP", "+uf", "-od"])
            .arg(&received)
            .arg(scp_port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    mesh::wait_port(scp_port);
    let policy = d.join("policy.json");
    std::fs::write(
        &policy,
        format!(r#"{{"inbound":[{{"port":{scp_port},"protocol":"dicom","allow":[{{"service_account":"radiology/scanner"}}]}}]}}"#),
    )
    .unwrap();
    std::fs::write(d.join("uid.key"), [9u8; 32]).unwrap();
    let files_dir = d.join("send");
    let out = mesh::run(
        Command::new(mesh::bin("medmesh"))
            .args(["dev", "dicom", "--count", "10", "--size", "64", "--out"])
            .arg(&files_dir),
    );
    assert!(out.status.success(), "{}", text(&out));
    let mut files: Vec<_> = std::fs::read_dir(&files_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();

    for delivery in ["enforce", "spool"] {
        let leader = c.wait_leader(Duration::from_secs(20));
        let follower = (leader + 1) % 3;
        let sub = d.join(delivery);
        std::fs::create_dir_all(&sub).unwrap();
        for f in ["certs", "verifier.key", "uid.key"] {
            let _ = std::os::unix::fs::symlink(d.join(f), sub.join(f));
        }
        let args = mesh::audit_server_args_to(&sub, &c.url(follower), &policy, scp_port, delivery);
        let (server, sp) = mesh::sidecar(&sub, "server-sidecar", &args);
        let (client, cp) = mesh::sidecar(
            &sub,
            "client-sidecar",
            &mesh::scanner_client_args(&sub, sp[0]),
        );
        // Four associations of ten instances; the leader dies before the second.
        let mut failed = 0;
        for round in 0..4 {
            if round == 1 {
                c.kill(leader);
            }
            let out = mesh::run(
                Command::new("storescu")
                    .args(["-aec", "STORESCP", "127.0.0.1", &cp[1].to_string()])
                    .args(&files),
            );
            if !out.status.success() {
                // enforce: a store the ledger could not acknowledge in time is reported failed
                // (A700); its record stays in the spool and is delivered later.
                assert_eq!(
                    delivery,
                    "enforce",
                    "spool mode refused a store: {}",
                    text(&out)
                );
                failed += text(&out).matches("A700").count().max(1);
            }
        }
        println!("{delivery}: {failed} stores reported failed during the failover");
        c.start(leader);
        c.wait_ready(leader, Duration::from_secs(30));
        // Every record reaches the ledger once: the spool drains.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let m = http_metric(sp[2], "medmesh_sidecar_spool_depth");
            if m == Some(0.0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{delivery}: spool did not drain ({m:?})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // After a failover and a drained spool, every series exists: Prometheus' lint on them.
        mesh::assert_promtool_clean("127.0.0.1", sp[2], "the auditing sidecar");
        drop((server, client));
    }

    // Every instance the PACS stored is exactly one entry in the one log (association records
    // come in addition).
    let stores = std::fs::read_dir(&received).unwrap().count();
    assert!(
        stores >= 40,
        "too few stores (spool mode alone stores 40): {stores}"
    );
    let cps = checkpoints_at(&c, &[0, 1, 2], stores as u64).await;
    for r in &c.replicas[..3] {
        mesh::assert_promtool_clean(&r.host, r.admin_port, &format!("ledger replica {}", r.id));
    }
    let auditor = c.client(0, "audit.auditor");
    let mut stored = 0;
    let mut start = 0;
    let size = cps[0].size;
    while start < size {
        let page = auditor
            .entries(start, (start + 1000).min(size))
            .await
            .unwrap();
        stored += page
            .entries
            .iter()
            .filter(|e| {
                e.decoded.as_ref().is_some_and(|d| {
                    d.record.kind == medmesh_core::record::EventKind::InstanceStored
                })
            })
            .count();
        start += 1000;
    }
    assert_eq!(stored, stores, "one instance record per instance stored");
    println!("{stores} instances stored, each recorded once");
    for (i, cp) in cps.iter().enumerate() {
        assert_eq!(cp.root, cps[0].root, "replica {i}");
    }
}

/// A gauge's value from a Prometheus text endpoint on loopback.
fn http_metric(port: u16, name: &str) -> Option<f64> {
    let (_, body) = mesh::http_get(port, "/metrics")?;
    body.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Scaling 3 → 5 → 3 under load, as the operator does it (the ConfigMap's peers change, then the
/// StatefulSet's replicas): new replicas join as learners and are promoted once caught up;
/// removed ones leave the voters; nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_three_to_five_to_three_keeps_one_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::setup(dir.path(), 5);
    c.set_peers(3);
    for i in 0..3 {
        c.start(i);
    }
    c.wait_leader(Duration::from_secs(20));
    for i in 0..3 {
        c.wait_ready(i, Duration::from_secs(20));
    }
    let voters = |c: &Cluster| -> Option<Vec<u64>> {
        let l = c.leader()?;
        let s = c.status(l)?;
        let mut v: Vec<u64> = s["members"]
            .as_array()?
            .iter()
            .filter(|m| m["voter"] == true)
            .filter_map(|m| m["id"].as_u64())
            .collect();
        v.sort_unstable();
        Some(v)
    };
    let wait_voters = |c: &Cluster, want: Vec<u64>| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = voters(c);
            if got.as_ref() == Some(&want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "voters {got:?}, want {want:?}; leader status {:?}",
                c.leader().and_then(|l| c.status(l))
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // The writers know only the first three; the new ones serve as they join.
    let load = Load::start_on(&c, 3);
    tokio::time::sleep(Duration::from_secs(1)).await;

    c.set_peers(5);
    c.start(3);
    c.start(4);
    wait_voters(&c, vec![0, 1, 2, 3, 4]);
    c.wait_ready(3, Duration::from_secs(30));
    c.wait_ready(4, Duration::from_secs(30));
    println!("scaled up to five voters");
    tokio::time::sleep(Duration::from_secs(1)).await;

    c.set_peers(3);
    c.stop(4);
    c.stop(3);
    wait_voters(&c, vec![0, 1, 2]);
    println!("scaled down to three voters");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (acked, retries, seen) = load.finish().await;
    println!(
        "{} entries acknowledged, {retries} client retries",
        acked.len()
    );
    assert!(acked.len() > 200, "too little traffic: {}", acked.len());
    verify_one_log_on(&c, &[0, 1, 2], &acked, seen).await;
}
