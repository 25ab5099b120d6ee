//! Ledger benchmark (issue: audit ledger). Runs the real `medmesh-ledger` binary and measures,
//! on this machine, client and server together over mTLS:
//! - single-entry durable appends from 64 concurrent clients (each its own TLS connection);
//! - batched appends of 100 entries per request;
//! - server-side inclusion and consistency proof construction on a 10,000,000-leaf tree;
//! - redb's raw durable insert rate at 1,000 rows per commit (the storage limit).
//!
//! First prints the machine's CPU model and the median of a 4 KiB write plus `fdatasync` on
//! the disk the ledgers use. Ends with one line:
//! `ledger-bench appends_per_s=<n> p99_ack_ms=<n> batched_entries_per_s=<n> proof_us=<n> redb_limit_per_s=<n> cpu_us_per_append=<n>`
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

/// The ledger's allocator (see `medmesh-ledger`): the client shares the cores with it.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    medmesh_core::devnet::free_port().unwrap()
}

/// One running `medmesh-ledger`.
struct Node {
    child: Option<Child>,
    port: u16,
    admin: u16,
    cfg: PathBuf,
}

impl Node {
    fn spawn(&mut self) {
        let exe = std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .join("medmesh-ledger");
        // Its log beside its configuration (a killed leader's peers log every failed RPC).
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.cfg.with_extension("log"))
            .unwrap();
        let child = Command::new(&exe)
            .args(["run", "--config"])
            .arg(&self.cfg)
            .env("RUST_LOG", "warn,openraft=error")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (build it with bench/ledger)", exe.display()));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "ledger did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `/status` of this replica.
    fn status(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&admin_get(self.admin, "/status")?).ok()
    }
}

/// The body of `GET path` on a ledger's plain-HTTP admin port.
fn admin_get(admin: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", admin)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    Some(buf.split_once("\r\n\r\n")?.1.to_owned())
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `n` ledgers in `base` (one node without Raft when `n` is 1, else one Raft replica
/// each), sharing one certificate and signing key.
fn start_ledgers(s: &Setup, base: &Path, n: usize) -> Vec<Node> {
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
    let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
    let peers = if n == 1 {
        String::new()
    } else {
        let list: Vec<String> = ports
            .iter()
            .map(|(p, _)| format!("\"127.0.0.1:{p}\""))
            .collect();
        format!("peers: [{}]\n", list.join(", "))
    };
    let mut nodes: Vec<Node> = ports
        .iter()
        .enumerate()
        .map(|(i, &(port, admin))| {
            let cfg = s.write(
                &format!("ledger-{i}.yaml"),
                &format!(
                    "node_id: ledger-{i}\n{peers}origin: bench/ledger\ndata_dir: {}\nlisten: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\n\
                     trust_domain: {}\ncert: {}\nkey: {}\ntrust_bundle: {}\nsigning_key: {}\n\
                     appenders: [\"spiffe://{}/ns/pacs/sa/writer\"]\nreaders: [\"spiffe://{}/ns/pacs/sa/writer\"]\n",
                    base.join(format!("data-{i}")).display(),
                    s.td,
                    cert.display(),
                    key.display(),
                    ca.display(),
                    sk.display(),
                    s.td,
                    s.td
                ),
            );
            Node {
                child: None,
                port,
                admin,
                cfg,
            }
        })
        .collect();
    for node in &mut nodes {
        node.spawn();
    }
    if n > 1 {
        leader(&nodes, Duration::from_secs(30));
    }
    nodes
}

/// (process id, admin port) of each running replica.
fn procs(nodes: &[Node]) -> Vec<(u32, u16)> {
    nodes
        .iter()
        .filter_map(|n| Some((n.child.as_ref()?.id(), n.admin)))
        .collect()
}

/// The replica that leads with a quorum behind it.
fn leader(nodes: &[Node], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        for (i, n) in nodes.iter().enumerate() {
            if n.child.is_some()
                && n.status()
                    .is_some_and(|s| s["state"] == "Leader" && s["ready"] == true)
            {
                return i;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no Raft leader within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The parts every benchmark record shares (identities and UIDs, parsed once: the client
/// shares the cores with the ledger); [`record`] fills in the rest.
fn template(td: &TrustDomain) -> Arc<AuditRecord> {
    Arc::new(AuditRecord {
        record_id: RecordId([0; 16]),
        kind: EventKind::InstanceStored,
        time_us: 0,
        source: td.workload("ct", "scanner").unwrap(),
        destination: td.workload("pacs", "writer").unwrap(),
        protocol: Protocol::Dimse,
        outcome: Outcome::Success,
        status: Some(0),
        bytes: 524_288,
        content_sha256: None,
        study_uid: None,
        series_uid: None,
        sop_instance_uid: None,
        calling_ae: None,
        called_ae: None,
        sop_class_uid: Some("1.2.840.10008.5.1.4.1.1.2".parse().unwrap()),
        transfer_syntax_uid: Some("1.2.840.10008.1.2.1".parse().unwrap()),
        cid: None,
        archived_record: None,
    })
}

/// Record `i`: a new id, its own content and instance, one of 251 studies and 13 series.
fn record(template: &AuditRecord, i: u64) -> AuditRecord {
    AuditRecord {
        record_id: RecordId::new().unwrap(),
        time_us: 1_700_000_000_000_000 + i,
        content_sha256: Some(sha256(&i.to_be_bytes())),
        study_uid: Some(KeyedHash([(i % 251) as u8; 32])),
        series_uid: Some(KeyedHash([(i % 13) as u8; 32])),
        sop_instance_uid: Some(KeyedHash(*sha256(&i.to_le_bytes()).as_bytes())),
        ..template.clone()
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

/// The CPU model this runs on (`/proc/cpuinfo`), and how many CPUs it has.
fn cpu_model() -> (String, usize) {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "unknown".to_owned(), |(_, m)| m.trim().to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    (model, cpus)
}

/// Median time in microseconds of a 4 KiB write plus `fdatasync` on the disk the ledgers use.
fn fdatasync_median_us(dir: &Path) -> f64 {
    use std::io::Write as _;
    let mut f = std::fs::File::create(dir.join("fdatasync.probe")).unwrap();
    let page = [0x5au8; 4096];
    let mut times: Vec<f64> = (0..400)
        .map(|_| {
            let t = Instant::now();
            f.write_all(&page).unwrap();
            f.sync_data().unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    percentile(&times, 0.5)
}

/// Figures of one load run.
struct Measured {
    single_per_s: f64,
    p50: f64,
    p99: f64,
    batched_per_s: f64,
    /// CPU time (user + system) of the ledger processes and this client together, per
    /// single append.
    cpu_us_per_append: f64,
    /// Where that CPU went, and what the commits wrote (see `breakdown`).
    breakdown: String,
}

/// CPU seconds (user + system) used so far by process `pid`.
fn cpu_seconds(pid: u32) -> f64 {
    stat_ticks(&format!("/proc/{pid}/stat")) as f64 / 100.0
}

/// utime + stime, in clock ticks, of the process or thread whose `stat` file is `path`.
fn stat_ticks(path: &str) -> u64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, r)| r)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    ticks(11) + ticks(12)
}

/// What the ledger processes' threads and commits did so far, for the breakdown printed after
/// the single appends: CPU ticks and bytes written per thread kind, and the commit metrics.
#[derive(Default)]
struct Activity {
    /// (thread kind, CPU ticks, bytes written, write calls).
    threads: Vec<(&'static str, u64, u64, u64)>,
    commits: f64,
    committed_entries: f64,
    commit_seconds: f64,
}

/// Thread kinds of `medmesh-ledger`: its named threads, and the tokio workers that serve the API
/// (TLS, HTTP, JSON, the Raft RPCs when replicated).
const KINDS: [&str; 5] = [
    "tokio-rt-worker",
    "ledger-writer",
    "ledger-wal",
    "ledger-indexer",
    "other",
];

fn activity(nodes: &[(u32, u16)]) -> Activity {
    let mut a = Activity::default();
    for &(pid, admin) in nodes {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten();
        for t in tasks.flatten() {
            let path = t.path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            let kind = KINDS[..4]
                .iter()
                .find(|k| comm.trim() == **k)
                .copied()
                .unwrap_or(KINDS[4]);
            let ticks = stat_ticks(&path.join("stat").to_string_lossy());
            let io = std::fs::read_to_string(path.join("io")).unwrap_or_default();
            let io_field = |name: &str| {
                io.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            a.threads
                .push((kind, ticks, io_field("wchar:"), io_field("syscw:")));
        }
        let metrics = admin_get(admin, "/metrics").unwrap_or_default();
        let metric = |name: &str| {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        a.commits += metric("medmesh_ledger_commit_seconds_count");
        a.commit_seconds += metric("medmesh_ledger_commit_seconds_sum");
        a.committed_entries += metric("medmesh_ledger_batch_entries_sum");
    }
    a
}

/// One line saying where the CPU of `ops` appends went between `before` and `after`, with
/// `client_cpu` seconds used by this process, and how much each commit wrote.
fn breakdown(before: &Activity, after: &Activity, client_cpu: f64, ops: u64, unit: &str) -> String {
    let per = |v: f64| v * 1e6 / ops.max(1) as f64;
    let sum = |a: &Activity, kind: &str, f: fn(&(&str, u64, u64, u64)) -> u64| -> u64 {
        a.threads.iter().filter(|t| t.0 == kind).map(f).sum()
    };
    let mut line = format!(
        "where the CPU went, us per {unit}: client {:.1}",
        per(client_cpu)
    );
    for (kind, label) in KINDS
        .iter()
        .zip(["API runtime", "writer", "syncer", "indexer", "other"])
    {
        let ticks = sum(after, kind, |t| t.1).saturating_sub(sum(before, kind, |t| t.1));
        line += &format!(", {label} {:.1}", per(ticks as f64 / 100.0));
    }
    let commits = after.commits - before.commits;
    if commits > 0.0 {
        let kib = |kind: &str| {
            sum(after, kind, |t| t.2).saturating_sub(sum(before, kind, |t| t.2)) as f64
                / 1024.0
                / commits
        };
        let writes = sum(after, KINDS[1], |t| t.3).saturating_sub(sum(before, KINDS[1], |t| t.3));
        line += &format!(
            "; commits: {:.1} entries each, mean {:.0} us",
            (after.committed_entries - before.committed_entries) / commits,
            (after.commit_seconds - before.commit_seconds) * 1e6 / commits,
        );
        // The single node's writer thread; a Raft replica commits from its own threads.
        if writes > 0 {
            line += &format!(
                "; written per commit: writer {:.0} KiB in {:.1} writes, indexer {:.0} KiB",
                kib(KINDS[1]),
                writes as f64 / commits,
                kib(KINDS[2]),
            );
        }
    }
    line
}

/// Single appends from `clients` clients, then batches of 100 from 8, spread round-robin over
/// the ledgers on `ports`.
fn measure(
    s: &Setup,
    rt: &tokio::runtime::Runtime,
    ports: &[u16],
    procs: &[(u32, u16)],
    clients: usize,
    secs: u64,
) -> Measured {
    let cpu =
        || procs.iter().map(|p| cpu_seconds(p.0)).sum::<f64>() + cpu_seconds(std::process::id());
    let mut cpu_before = 0.0;
    let (mut client_before, mut activity_before) = (0.0, Activity::default());
    let (single_per_s, p50, p99, ops) = rt.block_on(async {
        let cs: Vec<_> = (0..clients)
            .map(|i| s.client(ports[i % ports.len()]))
            .collect();
        // Warm up connections (TLS handshakes) before measuring.
        let td = template(&s.td);
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
        cpu_before = cpu();
        client_before = cpu_seconds(std::process::id());
        activity_before = activity(procs);
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
            ops,
        )
    });
    let cpu_us_per_append = (cpu() - cpu_before) * 1e6 / ops.max(1) as f64;
    let breakdown = breakdown(
        &activity_before,
        &activity(procs),
        cpu_seconds(std::process::id()) - client_before,
        ops,
        "single append",
    );
    let client_before = cpu_seconds(std::process::id());
    let activity_before = activity(procs);
    let (batched_per_s, batched_ops) = rt.block_on(async {
        let cs: Vec<_> = (0..8).map(|i| s.client(ports[i % ports.len()])).collect();
        let td = template(&s.td);
        let t = Instant::now();
        let (ops, _) = load(cs, secs, move |c, i| {
            let td = td.clone();
            async move {
                let recs = (0..100).map(|k| record(&td, i + k)).collect();
                c.append_batch(recs, false).await.unwrap().results.len() as u64
            }
        })
        .await;
        (ops as f64 / t.elapsed().as_secs_f64(), ops)
    });
    let breakdown = format!(
        "{breakdown}\n{}",
        self::breakdown(
            &activity_before,
            &activity(procs),
            cpu_seconds(std::process::id()) - client_before,
            batched_ops,
            "batched entry",
        )
    );
    Measured {
        single_per_s,
        p50,
        p99,
        breakdown,
        batched_per_s,
        cpu_us_per_append,
    }
}

/// `rounds` times: under a light load through every replica, SIGKILL the leader and time the
/// first acknowledgement of an append submitted after the kill; restart the replica and wait
/// for it to be ready. Returns the sorted times in milliseconds.
fn failover(
    s: &Setup,
    rt: &tokio::runtime::Runtime,
    nodes: &mut [Node],
    rounds: usize,
) -> Vec<f64> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut out = Vec::new();
    for _ in 0..rounds {
        let l = leader(nodes, Duration::from_secs(30));
        let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let killed_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
        let first = Arc::new(std::sync::Mutex::new(None::<Duration>));
        let tasks: Vec<_> = (0..6)
            .map(|k| {
                let cs: Vec<_> = ports.iter().map(|p| s.client(*p)).collect();
                let (stop, killed_at, first, td) = (
                    stop.clone(),
                    killed_at.clone(),
                    first.clone(),
                    template(&s.td),
                );
                rt.spawn(async move {
                    let (mut via, mut i) = (k % cs.len(), (k as u64) << 40);
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        i += 1;
                        match cs[via].append(&record(&td, i), false).await {
                            Ok(_) => {
                                let at = *killed_at.lock().unwrap();
                                if let Some(t0) = at
                                    && started >= t0
                                {
                                    let mut f = first.lock().unwrap();
                                    if f.is_none() {
                                        *f = Some(t0.elapsed());
                                    }
                                }
                            }
                            Err(_) => {
                                via = (via + 1) % cs.len();
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        *killed_at.lock().unwrap() = Some(Instant::now());
        nodes[l].kill();
        let deadline = Instant::now() + Duration::from_secs(30);
        while first.lock().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "no acknowledgement within 30 s of the kill"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        out.push(first.lock().unwrap().unwrap().as_secs_f64() * 1000.0);
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = rt.block_on(t);
        }
        nodes[l].spawn();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !nodes[l].status().is_some_and(|s| s["ready"] == true) {
            assert!(Instant::now() < deadline, "restarted replica not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    out.sort_by(f64::total_cmp);
    out
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

    let (model, cpus) = cpu_model();
    let fdatasync_us = fdatasync_median_us(s.dir.path());
    eprintln!("machine: {cpus} CPUs, {model}; fdatasync of 4 KiB: median {fdatasync_us:.0} us");
    let redb_per_s = redb_limit(secs.min(5));
    eprintln!("redb: {redb_per_s:.0} durable rows/s at 1000 rows per commit");

    let mode = std::env::var("BENCH_MODE").unwrap_or_else(|_| "both".into());
    let single = (mode != "raft").then(|| {
        let nodes = start_ledgers(&s, &s.dir.path().join("single"), 1);
        let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        let m = measure(&s, &rt, &ports, &procs(&nodes), clients, secs);
        eprintln!(
            "single node: single appends, {clients} clients: {:.0}/s, ack p50 {:.2} ms, p99 {:.2} ms, {:.0} us CPU per append (ledger + client); batched (100/request, 8 clients): {:.0} entries/s",
            m.single_per_s, m.p50, m.p99, m.cpu_us_per_append, m.batched_per_s
        );
        eprintln!("{}", m.breakdown);
        m
    });
    let raft = (mode != "single").then(|| {
        let mut nodes = start_ledgers(&s, &s.dir.path().join("raft"), 3);
        let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        let m = measure(&s, &rt, &ports, &procs(&nodes), clients, secs);
        eprintln!(
            "3 Raft replicas (clients spread over all three): single appends, {clients} clients: {:.0}/s, ack p50 {:.2} ms, p99 {:.2} ms, {:.0} us CPU per append (3 replicas + client); batched (100/request, 8 clients): {:.0} entries/s",
            m.single_per_s, m.p50, m.p99, m.cpu_us_per_append, m.batched_per_s
        );
        eprintln!("{}", m.breakdown);
        let failovers = failover(&s, &rt, &mut nodes, env("BENCH_FAILOVERS", 5) as usize);
        eprintln!("failover (kill -9 of the leader -> first acknowledged append): {failovers:?} ms");
        (m, failovers[failovers.len() / 2])
    });

    let (incl_p50, incl_p99, cons_p99) = proofs(leaves);
    eprintln!(
        "proofs on {leaves} leaves (server side): inclusion p50 {incl_p50:.1} us, p99 {incl_p99:.1} us; consistency p99 {cons_p99:.1} us"
    );
    if let Some(m) = single {
        println!(
            "ledger-bench appends_per_s={:.0} p99_ack_ms={:.2} batched_entries_per_s={:.0} proof_us={:.1} redb_limit_per_s={redb_per_s:.0} cpu_us_per_append={:.0}",
            m.single_per_s,
            m.p99,
            m.batched_per_s,
            incl_p99.max(cons_p99),
            m.cpu_us_per_append
        );
    }
    if let Some((m, failover_ms)) = raft {
        println!(
            "ledger-raft-bench appends_per_s={:.0} p99_ack_ms={:.2} batched_entries_per_s={:.0} failover_ms={failover_ms:.0} cpu_us_per_append={:.0}",
            m.single_per_s, m.p99, m.batched_per_s, m.cpu_us_per_append
        );
    }
}
