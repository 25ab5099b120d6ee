//! Runs the real binaries: `medmesh dev certs`, `medmesh-ledger keygen|run`, `medmesh ledger ...`.

#![allow(dead_code)] // Each test binary uses a different part.
// Test support: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use medmesh_core::merkle::sha256;
use medmesh_core::record::{AuditRecord, EventKind, KeyedHash, Outcome, Protocol, RecordId};
use medmesh_core::tls::{Identity, ServerIdentity, TrustBundle};
use medmesh_core::{NoteVerifier, SpiffeId, TrustDomain};
use medmesh_ledger_client::{LedgerClient, LedgerClientConfig};

pub const TD: &str = "medmesh.local";
pub const ORIGIN: &str = "medmesh.local/ledger";

/// Path of a binary built in this workspace (tests run from target/<profile>/deps).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace` first",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    medmesh_core::devnet::free_port().unwrap()
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Makes, with the real CLIs, certificates in `<dir>/certs` (the ledger, pacs/writer and
/// audit/auditor) and a checkpoint signing key `<dir>/signing.key`; writes the verifier key to
/// `<dir>/verifier.key` and returns it.
pub fn dev_pki(dir: &Path) -> String {
    let certs = dir.join("certs");
    let out = run(Command::new(bin("medmesh"))
        .args(["dev", "certs", "--out"])
        .arg(&certs)
        .args([
            "--workload",
            "medmesh/ledger",
            "--workload",
            "pacs/writer",
            "--workload",
            "audit/auditor",
        ]));
    assert!(out.status.success(), "dev certs: {}", text(&out));
    let key = dir.join("signing.key");
    let out = run(Command::new(bin("medmesh-ledger"))
        .args(["keygen", "--origin", ORIGIN, "--out"])
        .arg(&key));
    assert!(out.status.success(), "keygen: {}", text(&out));
    let verifier_key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    std::fs::write(dir.join("verifier.key"), &verifier_key).unwrap();
    verifier_key
}

/// Runs `medmesh-ledger run --config <dir>/ledger.yaml` (in network namespace `netns` when
/// given) logging to `<dir>/ledger.log`, and returns it once `up()` holds; its log when it
/// exits first.
pub fn start_ledger(
    dir: &Path,
    netns: Option<&str>,
    rust_log: &str,
    up: impl Fn() -> bool,
) -> Result<Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("ledger.log"))
        .unwrap();
    // `ip netns exec` enters the namespace and execs the ledger: the child is the ledger.
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin("medmesh-ledger"));
            c
        }
        None => Command::new(bin("medmesh-ledger")),
    };
    let mut child = cmd
        .args(["run", "--config"])
        .arg(dir.join("ledger.yaml"))
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let log = std::fs::read_to_string(dir.join("ledger.log")).unwrap_or_default();
            return Err(format!("ledger exited with {status}: {log}"));
        }
        if up() {
            return Ok(child);
        }
        assert!(
            Instant::now() < deadline,
            "ledger in {} not up within 20 s",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM and wait at most 15 s.
pub fn terminate(mut c: Child, what: &str) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(c.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while c.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "{what} did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A ledger process with its own directory, certificates and signing key.
pub struct LedgerProc {
    pub dir: PathBuf,
    pub api_port: u16,
    pub admin_port: u16,
    pub child: Option<Child>,
    pub verifier_key: String,
}

impl LedgerProc {
    /// Makes certificates and a key in `dir` with the real CLIs, writes the config.
    pub fn setup(dir: &Path) -> Self {
        let verifier_key = dev_pki(dir);
        let (certs, key) = (dir.join("certs"), dir.join("signing.key"));
        let (api_port, admin_port) = (free_port(), free_port());
        let c = certs.display();
        std::fs::write(
            dir.join("ledger.yaml"),
            format!(
                "node_id: ledger-0\norigin: {ORIGIN}\ndata_dir: {data}\nlisten: 127.0.0.1:{api_port}\n\
                 admin_listen: 127.0.0.1:{admin_port}\ntrust_domain: {TD}\ncert: {c}/medmesh.ledger.pem\n\
                 key: {c}/medmesh.ledger-key.pem\ntrust_bundle: {c}/ca.pem\nsigning_key: {key}\n\
                 appenders: [\"spiffe://{TD}/ns/pacs/sa/writer\"]\nreaders: [\"spiffe://{TD}/ns/audit/*\"]\n\
                 checkpoint_interval_ms: 100\ndrain_seconds: 2\n",
                data = dir.join("data").display(),
                key = key.display(),
            ),
        )
        .unwrap();
        Self {
            dir: dir.to_owned(),
            api_port,
            admin_port,
            child: None,
            verifier_key,
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts the ledger; returns once `/ready` answers 200, or the process's output if it exits.
    pub fn start(&mut self) -> Result<(), String> {
        assert!(self.child.is_none());
        let port = self.admin_port;
        self.child = Some(start_ledger(&self.dir, None, "warn", || {
            http_status(port, "/ready") == Some(200)
        })?);
        Ok(())
    }

    /// SIGTERM and wait (a clean shutdown).
    pub fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            terminate(c, "ledger");
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// A library client with the given workload's certificate.
    pub fn client(&self, who: &str) -> LedgerClient {
        ledger_client(&self.dir, self.url(), who, &self.verifier_key)
    }

    /// Runs `medmesh ledger <args>` as the auditor, with its own trusted state file.
    pub fn cli(&self, args: &[&str]) -> Output {
        ledger_cli(
            &self.dir,
            &self.url(),
            &self.dir.join("auditor.checkpoint"),
            args,
        )
    }
}

/// A library client of the ledger at `url` with workload `who`'s certificate from
/// `<dir>/certs` (see [`dev_pki`]).
pub fn ledger_client(dir: &Path, url: String, who: &str, verifier_key: &str) -> LedgerClient {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let certs = dir.join("certs");
    let td = TrustDomain::new(TD).unwrap();
    LedgerClient::new(LedgerClientConfig {
        url,
        identity: Identity::from_pem(
            &std::fs::read(certs.join(format!("{who}.pem"))).unwrap(),
            &std::fs::read(certs.join(format!("{who}-key.pem"))).unwrap(),
        )
        .unwrap(),
        bundle: TrustBundle::from_pem(&std::fs::read(certs.join("ca.pem")).unwrap(), td.clone())
            .unwrap(),
        server: ServerIdentity::Exact(td.workload("medmesh", "ledger").unwrap()),
        verifier: NoteVerifier::parse(verifier_key).unwrap(),
        origin: ORIGIN.into(),
        timeout: Duration::from_secs(10),
    })
    .unwrap()
}

/// Runs `medmesh ledger <args>` against `url` as the auditor, keeping its trusted checkpoint in
/// `state`.
pub fn ledger_cli(dir: &Path, url: &str, state: &Path, args: &[&str]) -> Output {
    let certs = dir.join("certs");
    run(Command::new(bin("medmesh"))
        .arg("ledger")
        .args(args)
        .env("MEDMESH_LEDGER_URL", url)
        .env("MEDMESH_CERT", certs.join("audit.auditor.pem"))
        .env("MEDMESH_KEY", certs.join("audit.auditor-key.pem"))
        .env("MEDMESH_CA", certs.join("ca.pem"))
        .env(
            "MEDMESH_LEDGER_KEY",
            format!("@{}", dir.join("verifier.key").display()),
        )
        .env("MEDMESH_LEDGER_STATE", state))
}

impl Drop for LedgerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `promtool check metrics` (Prometheus' naming and format lint) on the `/metrics` of
/// `host:port`; panics with its findings. promtool must be installed (scripts/check-rules
/// installs it): a missing promtool fails, it does not skip.
pub fn assert_promtool_clean(host: &str, port: u16, what: &str) {
    use std::io::Write as _;
    let (status, body) = http_get_at(host, port, "/metrics")
        .unwrap_or_else(|| panic!("{what}: no /metrics at {host}:{port}"));
    assert_eq!(status, 200, "{what}: /metrics answered {status}");
    assert!(body.contains("# TYPE "), "{what}: /metrics is empty");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool (Debian prometheus; scripts/check-rules installs it): {e}")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{what}: promtool check metrics: {}",
        text(&out)
    );
}

/// Status of a plain HTTP GET on loopback, without a client library.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).map(|(status, _)| status)
}

/// Status and body of a plain HTTP GET on loopback.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_at("127.0.0.1", port, path)
}

/// Status and body of a plain HTTP GET to `host:port`.
pub fn http_get_at(host: &str, port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = format!("{host}:{port}").parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map_or_else(String::new, |(_, b)| b.to_owned());
    Some((status, body))
}

pub fn record(i: u64) -> AuditRecord {
    let td = TrustDomain::new(TD).unwrap();
    AuditRecord {
        record_id: RecordId::new().unwrap(),
        kind: EventKind::InstanceStored,
        time_us: 1_700_000_000_000_000 + i,
        source: td.workload("ct", "scanner").unwrap(),
        destination: td.workload("pacs", "writer").unwrap(),
        protocol: Protocol::Dimse,
        outcome: Outcome::Success,
        status: Some(0),
        bytes: 4096 + i,
        content_sha256: Some(sha256(&i.to_be_bytes())),
        study_uid: Some(KeyedHash([1; 32])),
        series_uid: None,
        sop_instance_uid: Some(KeyedHash(*sha256(format!("sop {i}").as_bytes()).as_bytes())),
        calling_ae: None,
        called_ae: None,
        sop_class_uid: Some("1.2.840.10008.5.1.4.1.1.2".parse().unwrap()),
        transfer_syntax_uid: None,
        cid: None,
        archived_record: None,
    }
}

/// Acknowledged records: index and leaf hash by record id.
pub type Acked = std::sync::Arc<
    tokio::sync::Mutex<std::collections::HashMap<RecordId, (u64, medmesh_core::merkle::Hash)>>,
>;

/// Load of client `c` until `stop`: single appends, every fourth submission a batch of 10.
/// A failed submission is retried with the same records (same ids), through the next of
/// `writers`, until one acknowledges it; each record must be acknowledged once, never in
/// conflict. Returns the number of retries.
pub async fn append_until_stopped(
    c: u64,
    writers: Vec<LedgerClient>,
    acked: Acked,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> u64 {
    let mut n = 0u64;
    let mut retries = 0u64;
    let mut via = c as usize % writers.len();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let recs: Vec<_> = (0..if n % 4 == 3 { 10 } else { 1 })
            .map(|k| record(c * 1_000_000 + n * 10 + k))
            .collect();
        n += 1;
        let results = loop {
            let w = &writers[via];
            let r = if recs.len() == 1 {
                w.append(&recs[0], false).await.map(|r| vec![r.result])
            } else {
                w.append_batch(recs.clone(), false).await.map(|r| r.results)
            };
            match r {
                Ok(r) => break r,
                Err(_) => {
                    retries += 1;
                    via = (via + 1) % writers.len();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let mut a = acked.lock().await;
        for (rec, res) in recs.iter().zip(results) {
            assert!(!res.conflict);
            if let Some((i, h)) = a.insert(rec.record_id, (res.index, res.leaf_hash)) {
                panic!(
                    "record {} acknowledged twice: {i}/{h} then {}/{}",
                    rec.record_id, res.index, res.leaf_hash
                );
            }
        }
    }
    retries
}

/// xorshift64: a reproducible schedule from a printed seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

pub fn writer_id() -> SpiffeId {
    TrustDomain::new(TD)
        .unwrap()
        .workload("pacs", "writer")
        .unwrap()
}

/// A child process killed (SIGKILL) when dropped.
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `medmesh-sidecar run <args>` on three free ports (inbound, outbound, admin), logging
/// to `<dir>/<name>.log`, and waits for `/ready`.
pub fn sidecar(dir: &Path, name: &str, args: &[String]) -> (Kill, [u16; 3]) {
    let ports = [free_port(), free_port(), free_port()];
    sidecar_on(dir, name, args, ports)
}

/// [`sidecar`] on given ports (to restart one where it was).
pub fn sidecar_on(dir: &Path, name: &str, args: &[String], ports: [u16; 3]) -> (Kill, [u16; 3]) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .unwrap();
    let child = Command::new(bin("medmesh-sidecar"))
        .arg("run")
        .args(args)
        .args(["--inbound-addr", &format!("127.0.0.1:{}", ports[0])])
        .args(["--outbound-addr", &format!("127.0.0.1:{}", ports[1])])
        .args(["--admin-addr", &format!("127.0.0.1:{}", ports[2])])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_status(ports[2], "/ready") != Some(200) {
        assert!(Instant::now() < deadline, "{name} not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Kill(child), ports)
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listening on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// DCMTK storescp (AE STORESCP) writing into `<dir>/received`; returns it and its port.
pub fn storescp(dir: &Path) -> (Kill, u16) {
    let port = free_port();
    let received = dir.join("received");
    std::fs::create_dir_all(&received).unwrap();
    let child = Command::new("storescp")
        .args(["-aet", "STORESCP", "-od"])
        .arg(&received)
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let scp = Kill(child);
    wait_port(port);
    (scp, port)
}

/// Arguments of a server sidecar (identity pacs/writer, certificates from `medmesh dev certs`
/// in `<dir>/certs`) that audits `app_port` into `ledger` with `delivery`, using `<dir>/uid.key`
/// and `<dir>/spool`.
pub fn audit_server_args(
    dir: &Path,
    ledger: &LedgerProc,
    policy: &Path,
    app_port: u16,
    delivery: &str,
) -> Vec<String> {
    audit_server_args_to(dir, &ledger.url(), policy, app_port, delivery)
}

/// [`audit_server_args`] with the ledger at `ledger_url`.
pub fn audit_server_args_to(
    dir: &Path,
    ledger_url: &str,
    policy: &Path,
    app_port: u16,
    delivery: &str,
) -> Vec<String> {
    let s = |p: PathBuf| p.display().to_string();
    let mut args = identity_args(dir, "pacs.writer");
    args.extend([
        "--policy".into(),
        s(policy.to_owned()),
        "--dev-inbound-port".into(),
        app_port.to_string(),
        "--ledger-url".into(),
        ledger_url.into(),
        "--ledger-key".into(),
        format!("@{}", s(dir.join("verifier.key"))),
        "--audit-key".into(),
        s(dir.join("uid.key")),
        "--audit-delivery".into(),
        delivery.into(),
        "--spool-dir".into(),
        s(dir.join("spool")),
    ]);
    args
}

/// Trust domain and the certificates of workload `who` (`<ns>.<sa>`) from `medmesh dev certs`
/// in `<dir>/certs`.
fn identity_args(dir: &Path, who: &str) -> Vec<String> {
    let certs = dir.join("certs");
    let s = |p: PathBuf| p.display().to_string();
    vec![
        "--trust-domain".into(),
        TD.into(),
        "--cert".into(),
        s(certs.join(format!("{who}.pem"))),
        "--key".into(),
        s(certs.join(format!("{who}-key.pem"))),
        "--ca".into(),
        s(certs.join("ca.pem")),
    ]
}

/// Arguments of a client sidecar (identity radiology/scanner) sending everything to `server_inbound`.
pub fn scanner_client_args(dir: &Path, server_inbound: u16) -> Vec<String> {
    let mut args = identity_args(dir, "radiology.scanner");
    args.extend([
        "--dev-outbound-dst".into(),
        format!("127.0.0.1:{server_inbound}"),
    ]);
    args
}

/// The storescu option proposing `ts` (storescu proposes one transfer-syntax family per run).
/// Uncompressed files propose their own syntax, so that every receiver accepts the same one and
/// storescu sends the file's bytes.
pub fn storescu_option(ts: &str) -> Option<&'static str> {
    match ts {
        "1.2.840.10008.1.2.4.50" => Some("-xy"),
        "1.2.840.10008.1.2.4.51" => Some("-xx"),
        "1.2.840.10008.1.2.4.57" | "1.2.840.10008.1.2.4.70" => Some("-xs"),
        "1.2.840.10008.1.2.4.80" => Some("-xt"),
        "1.2.840.10008.1.2.4.81" => Some("-xu"),
        "1.2.840.10008.1.2.4.90" => Some("-xv"),
        "1.2.840.10008.1.2.4.91" => Some("-xw"),
        "1.2.840.10008.1.2.5" => Some("-xr"),
        "1.2.840.10008.1.2" => Some("-xi"),
        _ => Some("-xe"),
    }
}
