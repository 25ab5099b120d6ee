//! Ledger benchmark (issue: audit ledger). Runs the real `medmesh-ledger` binary and measures,
//! on this machine, client and server together over mTLS:
//! - single-entry durable appends from 64 concurrent clients (each its own TLS connection);
//! - batched appends of 100 entries per request;
//! - server-side inclusion and consistency proof construction on a 10,000,000-leaf tree;
//! - redb's raw durable insert rate at 1,000 rows per commit (the storage limit).
//!
//! Ends with one line:
//! `ledger-bench appends_per_s=<n> p99_ack_ms=<n> batched_entries_per_s=<n> proof_us=<n> redb_limit_per_s=<n>`
//!
//! Environment: `BENCH_SECONDS` (per load phase, default 10), `BENCH_PROOF_LEAVES` (default
//! 10000000), `BENCH_CLIENTS` (default 64).

// A benchmark driver: failing loudly is the right reaction to any error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use medmesh_core::devca::{DevCa, LeafOptions};
use medmesh_core::merkle::{Frontier, sha256};
use medmesh_core::record::{AuditRecord, EventKind, KeyedHash, Outcome, Protocol, RecordId};
use medmesh_core::tls::{Identity, ServerIdentity, TrustBundle};
use medmesh_core::{NoteSigner, TrustDomain};
use medmesh_ledger_client::{LedgerClient, LedgerClientConfig};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Setup {
    dir: tempfile::TempDir,
    td: TrustDomain,
    ca: DevCa,
    signer: NoteSigner,
}

impl Setup {
    fn write(&self, name: &str, data: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    fn identity(&self, ns: &str, sa: &str) -> Identity {
        let i = self
            .ca
            .issue(&self.td.workload(ns, sa).unwrap(), &LeafOptions::default())
            .unwrap();
        Identity::from_pem(i.cert_pem.as_bytes(), i.key_pem.as_bytes()).unwrap()
    }

    fn client(&self, port: u16) -> LedgerClient {
        LedgerClient::new(LedgerClientConfig {
            url: format!("https://127.0.0.1:{port}"),
            identity: self.identity("pacs", "writer"),
            bundle: TrustBundle::from_pem(self.ca.ca().cert_pem.as_bytes(), self.td.clone())
                .unwrap(),
            server: ServerIdentity::Exact(self.td.workload("medmesh", "ledger").unwrap()),
            verifier: self.signer.verifier(),
            origin: "bench/ledger".into(),
            timeout: Duration::from_secs(30),
        })
        .unwrap()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_ledger(s: &Setup, data: &Path) -> (Child, u16) {
    let ledger =
        s.ca.issue(
            &s.td.workload("medmesh", "ledger").unwrap(),
            &LeafOptions::default(),
        )
        .unwrap();
    let cert = s.write("ledger.pem", &ledger.cert_pem);
    let key = s.write("ledger-key.pem", &ledger.key_pem);
    let ca = s.write("ca.pem", &s.ca.ca().cert_pem);
    let sk = s.write("signing.key", &s.signer.private_key());
    let (port, admin) = (free_port(), free_port());
    let cfg = s.write(
        "ledger.yaml",
        &format!(
            "node_id: bench\norigin: bench/ledger\ndata_dir: {}\nlisten: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\n\
             trust_domain: {}\ncert: {}\nkey: {}\ntrust_bundle: {}\nsigning_key: {}\n\
             appenders: [\"spiffe://{}/ns/pacs/sa/writer\"]\nreaders: [\"spiffe://{}/ns/pacs/sa/writer\"]\n",
            data.display(),
            s.td,
            cert.display(),
            key.display(),
            ca.display(),
            sk.display(),
            s.td,
            s.td
        ),
    );
    let exe = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join("medmesh-ledger");
    let child = Command::new(&exe)
        .args(["run", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (build it with bench/ledger)", exe.display()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "ledger did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, port)
}

fn record(td: &TrustDomain, i: u64) -> AuditRecord {
    AuditRecord {
        record_id: RecordId::new().unwrap(),
        kind: EventKind::InstanceStored,
        time_us: 1_700_000_000_000_000 + i,
        source: td.workload("ct", "scanner").unwrap(),
        destination: td.workload("pacs", "writer").unwrap(),
        protocol: Protocol::Dimse,
        outcome: Outcome::Success,
        status: Some(0),
        bytes: 524_288,
        content_sha256: Some(sha256(&i.to_be_bytes())),
        study_uid: Some(KeyedHash([(i % 251) as u8; 32])),
        series_uid: Some(KeyedHash([(i % 13) as u8; 32])),
        sop_instance_uid: Some(KeyedHash(*sha256(&i.to_le_bytes()).as_bytes())),
        calling_ae: None,
        called_ae: None,
        sop_class_uid: Some("1.2.840.10008.5.1.4.1.1.2".parse().unwrap()),
        transfer_syntax_uid: Some("1.2.840.10008.1.2.1".parse().unwrap()),
        cid: None,
    }
}

/// Runs `clients` loops of `f` for `secs`; returns (operations, latencies in ms).
async fn load<F, Fut>(clients: Vec<LedgerClient>, secs: u64, f: F) -> (u64, Vec<f64>)
where
    F: Fn(LedgerClient, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = u64> + Send,
{
    let f = Arc::new(f);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for (c, client) in clients.into_iter().enumerate() {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut ops = 0;
            let mut i = (c as u64) << 40;
            while Instant::now() < end {
                let t = Instant::now();
                ops += f(client.clone(), i).await;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                i += 1000;
            }
            (ops, lat)
        }));
    }
    let (mut ops, mut lat) = (0, Vec::new());
    for t in tasks {
        let (o, l) = t.await.unwrap();
        ops += o;
        lat.extend(l);
    }
    lat.sort_by(f64::total_cmp);
    (ops, lat)
}

fn proofs(leaves: u64) -> (f64, f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let signer = NoteSigner::from_seed("bench/proofs", [9; 32]).unwrap();
    let (storage, rec) = medmesh_ledger::storage::Storage::open(
        &dir.path().join("proofs.redb"),
        &signer.verifier(),
        "bench/proofs",
    )
    .unwrap();
    let mut frontier: Frontier = rec.frontier;
    let t = Instant::now();
    medmesh_ledger::storage::bench_fill_nodes(&storage, &mut frontier, leaves, 1_000_000).unwrap();
    eprintln!(
        "proofs: built a {leaves}-leaf tree ({} node rows) in {:.1} s",
        2 * leaves - 1,
        t.elapsed().as_secs_f64()
    );
    let reader = storage.reader().unwrap();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Warm the cache the way a serving ledger's would be, then measure.
    for _ in 0..2000 {
        let _ = reader.inclusion_proof(next() % leaves, leaves).unwrap();
    }
    let mut incl = Vec::new();
    let mut cons = Vec::new();
    for _ in 0..5000 {
        let i = next() % leaves;
        let t = Instant::now();
        let p = reader.inclusion_proof(i, leaves).unwrap();
        incl.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(!p.is_empty());
        let old = 1 + next() % (leaves - 1);
        let t = Instant::now();
        let _ = reader.consistency_proof(old, leaves).unwrap();
        cons.push(t.elapsed().as_secs_f64() * 1e6);
    }
    incl.sort_by(f64::total_cmp);
    cons.sort_by(f64::total_cmp);
    let root = reader.root_at(leaves).unwrap();
    assert_eq!(root, frontier.root());
    (
        percentile(&incl, 0.5),
        percentile(&incl, 0.99),
        percentile(&cons, 0.99),
    )
}

fn redb_limit(secs: u64) -> f64 {
    const T: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("rows");
    let dir = tempfile::tempdir().unwrap();
    let db = redb::Database::create(dir.path().join("raw.redb")).unwrap();
    let value = vec![0x5au8; 360]; // about one encoded entry
    let end = Instant::now() + Duration::from_secs(secs);
    let (mut rows, t) = (0u64, Instant::now());
    while Instant::now() < end {
        let mut txn = db.begin_write().unwrap();
        txn.set_durability(redb::Durability::Immediate).unwrap();
        {
            let mut tab = txn.open_table(T).unwrap();
            for _ in 0..1000 {
                tab.insert(rows, value.as_slice()).unwrap();
                rows += 1;
            }
        }
        txn.commit().unwrap();
    }
    rows as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let secs = env("BENCH_SECONDS", 10);
    let leaves = env("BENCH_PROOF_LEAVES", 10_000_000);
    let clients = env("BENCH_CLIENTS", 64) as usize;
    let td = TrustDomain::new("bench.local").unwrap();
    let s = Setup {
        dir: tempfile::tempdir().unwrap(),
        ca: DevCa::new(&td, 2).unwrap(),
        td,
        signer: NoteSigner::from_seed("bench/ledger", [3; 32]).unwrap(),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();

    let redb_per_s = redb_limit(secs.min(5));
    eprintln!("redb: {redb_per_s:.0} durable rows/s at 1000 rows per commit");

    let data = s.dir.path().join("data");
    let (mut child, port) = start_ledger(&s, &data);
    let (single_per_s, p50, p99) = rt.block_on(async {
        let cs: Vec<_> = (0..clients).map(|_| s.client(port)).collect();
        // Warm up connections (TLS handshakes) before measuring.
        let td = s.td.clone();
        let _ = load(cs.clone(), 1, {
            let td = td.clone();
            move |c, i| {
                let td = td.clone();
                async move {
                    c.append(&record(&td, i), false).await.unwrap();
                    1
                }
            }
        })
        .await;
        let t = Instant::now();
        let (ops, lat) = load(cs, secs, move |c, i| {
            let td = td.clone();
            async move {
                c.append(&record(&td, i), false).await.unwrap();
                1
            }
        })
        .await;
        (
            ops as f64 / t.elapsed().as_secs_f64(),
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
        )
    });
    eprintln!(
        "single appends, {clients} clients: {single_per_s:.0}/s, ack p50 {p50:.2} ms, p99 {p99:.2} ms"
    );

    let batched_per_s = rt.block_on(async {
        let cs: Vec<_> = (0..8).map(|_| s.client(port)).collect();
        let td = s.td.clone();
        let t = Instant::now();
        let (ops, _) = load(cs, secs, move |c, i| {
            let td = td.clone();
            async move {
                let recs = (0..100).map(|k| record(&td, i + k)).collect();
                c.append_batch(recs, false).await.unwrap().results.len() as u64
            }
        })
        .await;
        ops as f64 / t.elapsed().as_secs_f64()
    });
    eprintln!("batched appends (100/request, 8 clients): {batched_per_s:.0} entries/s");
    let _ = child.kill();
    let _ = child.wait();

    let (incl_p50, incl_p99, cons_p99) = proofs(leaves);
    eprintln!(
        "proofs on {leaves} leaves (server side): inclusion p50 {incl_p50:.1} us, p99 {incl_p99:.1} us; consistency p99 {cons_p99:.1} us"
    );
    println!(
        "ledger-bench appends_per_s={single_per_s:.0} p99_ack_ms={p99:.2} batched_entries_per_s={batched_per_s:.0} proof_us={:.1} redb_limit_per_s={redb_per_s:.0}",
        incl_p99.max(cons_p99)
    );
}
