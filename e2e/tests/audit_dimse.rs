//! DICOM auditing end to end with real peers: DCMTK storescu -> client sidecar -> server sidecar
//! (auditing, `enforce`) -> DCMTK storescp, the real ledger behind. Every instance yields one
//! verified record whose SHA-256 is the data set's; no patient data reaches the ledger; while the
//! ledger is down no store is reported successful, and the spooled records arrive once it is back.

// Integration tests: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mesh.rs"]
mod mesh;

use std::process::Command;
use std::time::{Duration, Instant};

use medmesh_core::dicom::{SyntheticInstance, split_part10, synthetic_ct};
use medmesh_core::merkle::sha256;
use mesh::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storescu_through_audited_sidecars() {
    for t in ["storescu", "storescp"] {
        assert!(
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {t}"))
                .status()
                .unwrap()
                .success(),
            "{t} is not installed: scripts/check installs DCMTK"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let mut ledger = LedgerProc::setup(dir.path());
    ledger.start().unwrap();
    let certs = dir.path().join("certs");
    let out = run(Command::new(bin("medmesh"))
        .args(["dev", "certs", "--workload", "radiology/scanner", "--out"])
        .arg(&certs));
    assert!(out.status.success(), "{}", text(&out));

    // The receiver: DCMTK storescp.
    let (_scp, scp_port) = storescp(dir.path());
    let received = dir.path().join("received");

    // The server sidecar audits the DICOM port (identity pacs/writer: an appender of the ledger).
    let (s_in, s_out, s_admin) = (free_port(), free_port(), free_port());
    let policy = dir.path().join("server-policy.json");
    std::fs::write(
        &policy,
        format!(r#"{{"inbound":[{{"port":{scp_port},"protocol":"dicom","allow":[{{"service_account":"radiology/scanner"}}]}}]}}"#),
    )
    .unwrap();
    let key = dir.path().join("uid.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let c = |n: &str| certs.join(n);
    let _server = Kill(
        Command::new(bin("medmesh-sidecar"))
            .args([
                "run",
                "--trust-domain",
                TD,
                "--audit-delivery",
                "enforce",
                "--audit-deadline-ms",
                "2000",
            ])
            .arg("--cert")
            .arg(c("pacs.writer.pem"))
            .arg("--key")
            .arg(c("pacs.writer-key.pem"))
            .arg("--ca")
            .arg(c("ca.pem"))
            .arg("--policy")
            .arg(&policy)
            .arg("--inbound-addr")
            .arg(format!("127.0.0.1:{s_in}"))
            .arg("--outbound-addr")
            .arg(format!("127.0.0.1:{s_out}"))
            .arg("--admin-addr")
            .arg(format!("127.0.0.1:{s_admin}"))
            .arg("--dev-inbound-port")
            .arg(scp_port.to_string())
            .arg("--ledger-url")
            .arg(ledger.url())
            .arg("--ledger-key")
            .arg(format!("@{}", dir.path().join("verifier.key").display()))
            .arg("--audit-key")
            .arg(&key)
            .arg("--spool-dir")
            .arg(dir.path().join("spool"))
            .env("RUST_LOG", "warn")
            .stderr(std::fs::File::create(dir.path().join("server-sidecar.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let (c_in, c_out, c_admin) = (free_port(), free_port(), free_port());
    let _client = Kill(
        Command::new(bin("medmesh-sidecar"))
            .args(["run", "--trust-domain", TD])
            .arg("--cert")
            .arg(c("radiology.scanner.pem"))
            .arg("--key")
            .arg(c("radiology.scanner-key.pem"))
            .arg("--ca")
            .arg(c("ca.pem"))
            .arg("--inbound-addr")
            .arg(format!("127.0.0.1:{c_in}"))
            .arg("--outbound-addr")
            .arg(format!("127.0.0.1:{c_out}"))
            .arg("--admin-addr")
            .arg(format!("127.0.0.1:{c_admin}"))
            .arg("--dev-outbound-dst")
            .arg(format!("127.0.0.1:{s_in}"))
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    for p in [s_admin, c_admin] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_status(p, "/ready") != Some(200) {
            assert!(Instant::now() < deadline, "sidecar not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // Twelve synthetic CT instances, sent in one association by unmodified storescu.
    let files_dir = dir.path().join("send");
    std::fs::create_dir_all(&files_dir).unwrap();
    let mut files = Vec::new();
    let mut hashes = Vec::new();
    for n in 0..12u64 {
        let f = synthetic_ct(&SyntheticInstance {
            study_uid: "2.25.4242".into(),
            series_uid: "2.25.4242.1".into(),
            sop_instance_uid: format!("2.25.4242.1.{}", n + 1),
            patient_name: "AUDIT^SECRET^NAME".into(),
            patient_id: "SECRET-PID-77".into(),
            rows: 64,
            columns: 64,
            seed: n + 1,
        });
        hashes.push(sha256(split_part10(&f).unwrap().unwrap().dataset));
        let p = files_dir.join(format!("ct{n:02}.dcm"));
        std::fs::write(&p, f).unwrap();
        files.push(p);
    }
    let out = run(Command::new("storescu")
        .args(["-aec", "STORESCP", "127.0.0.1", &c_out.to_string()])
        .args(&files));
    assert!(
        out.status.success(),
        "storescu: {}\n{}",
        text(&out),
        std::fs::read_to_string(dir.path().join("server-sidecar.log")).unwrap_or_default()
    );
    assert_eq!(
        std::fs::read_dir(&received).unwrap().count(),
        12,
        "storescp received every instance"
    );

    // One verified record per instance, with the data set's SHA-256; no patient data anywhere.
    let auditor = ledger.client("audit.auditor");
    for h in &hashes {
        let (_, hits, _) = auditor.search("sha256", &h.to_hex()).await.unwrap();
        assert_eq!(hits.len(), 1, "records for {h}");
        let r = &hits[0].entry.record;
        assert_eq!(r.kind, medmesh_core::record::EventKind::InstanceStored);
        assert_eq!(
            r.source.as_str(),
            "spiffe://medmesh.local/ns/radiology/sa/scanner"
        );
        assert_eq!(
            r.destination.as_str(),
            "spiffe://medmesh.local/ns/pacs/sa/writer"
        );
        assert_eq!(
            (r.outcome, r.status),
            (medmesh_core::record::Outcome::Success, Some(0))
        );
    }
    let all = auditor.entries(0, 1000).await.unwrap();
    let dump = serde_json::to_string(&all.entries).unwrap();
    for secret in ["AUDIT^SECRET^NAME", "SECRET-PID-77", "2.25.4242"] {
        assert!(!dump.contains(secret), "{secret} reached the ledger");
    }
    let log = std::fs::read_to_string(dir.path().join("server-sidecar.log")).unwrap_or_default();
    assert!(!log.contains("SECRET"), "patient data in the sidecar log");

    // Ledger down: the store is not reported as successful, and its record is kept.
    ledger.stop();
    let out = run(Command::new("storescu")
        .args(["-aec", "STORESCP", "127.0.0.1", &c_out.to_string()])
        .arg(&files[0]));
    let t = text(&out);
    // storescu reports the failed store (status A700) and exits non-zero.
    assert!(
        !out.status.success(),
        "storescu saw success while the ledger was down:\n{t}"
    );
    let m = String::from_utf8(
        run(Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{s_admin}/metrics")]))
            .stdout,
    )
    .unwrap();
    assert!(
        m.contains("medmesh_sidecar_audit_failed_responses_total 1"),
        "{m}"
    );
    assert!(m.contains("medmesh_sidecar_spool_depth"), "{m}");

    // Ledger back: the spooled record (and the association records) arrive, none twice.
    ledger.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, hits, _) = auditor
            .search("sha256", &hashes[0].to_hex())
            .await
            .unwrap_or_default_hits();
        if hits == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spooled record not delivered (hits {hits})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

trait HitsOrZero {
    fn unwrap_or_default_hits(self) -> ((), usize, ());
}

impl HitsOrZero
    for Result<
        (
            medmesh_ledger_client::VerifiedCheckpoint,
            Vec<medmesh_ledger_client::ProvenEntry>,
            bool,
        ),
        medmesh_ledger_client::ClientError,
    >
{
    fn unwrap_or_default_hits(self) -> ((), usize, ()) {
        ((), self.map(|(_, h, _)| h.len()).unwrap_or(0), ())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_mode_survives_sigkill_and_ledger_outage() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut ledger = LedgerProc::setup(d);
    // The ledger starts down: stores succeed on the strength of the local spool alone.
    let certs = d.join("certs");
    let out = run(Command::new(bin("medmesh"))
        .args(["dev", "certs", "--workload", "radiology/scanner", "--out"])
        .arg(&certs));
    assert!(out.status.success(), "{}", text(&out));
    let (_scp, scp_port) = storescp(d);
    let policy = d.join("policy.json");
    std::fs::write(
        &policy,
        format!(r#"{{"inbound":[{{"port":{scp_port},"protocol":"dicom","allow":[{{"service_account":"radiology/scanner"}}]}}]}}"#),
    )
    .unwrap();
    std::fs::write(d.join("uid.key"), [5u8; 32]).unwrap();
    let server_args = audit_server_args(d, &ledger, &policy, scp_port, "spool");
    let (server, sp) = sidecar(d, "server-sidecar", &server_args);
    let client_args = scanner_client_args(d, sp[0]);
    let (_client, cp) = sidecar(d, "client-sidecar", &client_args);

    let files_dir = d.join("send");
    let out = run(Command::new(bin("medmesh"))
        .args(["dev", "dicom", "--count", "20", "--size", "64", "--out"])
        .arg(&files_dir));
    assert!(out.status.success(), "{}", text(&out));
    let mut files: Vec<_> = std::fs::read_dir(&files_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let out = run(Command::new("storescu")
        .args(["-aec", "STORESCP", "127.0.0.1", &cp[1].to_string()])
        .args(&files));
    assert!(
        out.status.success(),
        "spool mode must accept while the ledger is down: {}",
        text(&out)
    );
    let m = String::from_utf8(
        run(Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{}/metrics", sp[2])]))
            .stdout,
    )
    .unwrap();
    let depth: u64 = m
        .lines()
        .find(|l| l.starts_with("medmesh_sidecar_spool_depth "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert!(depth >= 20, "spool depth {depth}\n{m}");

    // SIGKILL the sidecar holding the spool, restart it on the same spool, bring the ledger up.
    drop(server);
    let (_server, _) = sidecar_on(d, "server-sidecar", &server_args, sp);
    ledger.start().unwrap();
    let auditor = ledger.client("audit.auditor");
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let h = sha256(split_part10(&bytes).unwrap().unwrap().dataset);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n = auditor
                .search("sha256", &h.to_hex())
                .await
                .map(|(_, h, _)| h.len())
                .unwrap_or(0);
            if n == 1 {
                break;
            }
            assert!(n < 2, "a spooled record was delivered twice");
            assert!(
                Instant::now() < deadline,
                "spooled record for {} never arrived",
                f.display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
