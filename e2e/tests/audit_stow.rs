//! STOW-RS auditing through a ledger outage, with Orthanc's DICOMweb plugin behind two server
//! sidecars (one `enforce`, one `spool`) and curl in front of client sidecars:
//! - `enforce`: while the ledger is down, the client gets 503, never 200; the records of what
//!   Orthanc stored are kept as failures (what the client saw) and arrive when it returns;
//! - `spool`: the client gets 200 from the spool alone; every record arrives after the ledger
//!   returns, none twice.

// Integration tests: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mesh.rs"]
mod mesh;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use medmesh_core::dicom::{SyntheticInstance, synthetic_ct};
use medmesh_core::merkle::{Hash, sha256};
use medmesh_core::record::{EventKind, Outcome};
use medmesh_ledger_client::LedgerClient;
use mesh::*;

const BOUNDARY: &str = "stow-e2e-91d2";

fn instance(n: u32) -> Vec<u8> {
    synthetic_ct(&SyntheticInstance {
        study_uid: format!("2.25.88.{n}"),
        series_uid: format!("2.25.88.{n}.1"),
        sop_instance_uid: format!("2.25.88.{n}.1.1"),
        patient_name: "STOW^SECRET^NAME".into(),
        patient_id: "SECRET-PID-88".into(),
        rows: 64,
        columns: 64,
        seed: n.into(),
    })
}

/// POSTs `files` as one STOW-RS request through the client sidecar; returns the HTTP status.
fn stow(dir: &std::path::Path, port: u16, files: &[Vec<u8>]) -> u16 {
    let mut body = Vec::new();
    for f in files {
        body.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(f);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    let path = dir.join("stow.bin");
    std::fs::write(&path, &body).unwrap();
    let out = run(Command::new("curl").args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-u",
        "test:test",
        "-H",
        &format!(
            "Content-Type: multipart/related; type=\"application/dicom\"; boundary={BOUNDARY}"
        ),
        "--data-binary",
        &format!("@{}", path.display()),
        &format!("http://127.0.0.1:{port}/dicom-web/studies"),
    ]));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// The records of `sha`, once there are `n` (or after 30 s).
async fn records(auditor: &LedgerClient, sha: &Hash, n: usize) -> Vec<(Outcome, Option<u16>)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let hits = match auditor.search("sha256", &sha.to_hex()).await {
            Ok((_, hits, _)) => hits
                .iter()
                .filter(|h| h.entry.record.kind == EventKind::InstanceStored)
                .map(|h| (h.entry.record.outcome, h.entry.record.status))
                .collect(),
            Err(_) => Vec::new(),
        };
        if hits.len() >= n || Instant::now() > deadline {
            return hits;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stow_rs_through_a_ledger_outage() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut ledger = LedgerProc::setup(d);
    ledger.start().unwrap();
    let out = run(Command::new(bin("medmesh"))
        .args(["dev", "certs", "--workload", "radiology/scanner", "--out"])
        .arg(d.join("certs")));
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(d.join("uid.key"), [4u8; 32]).unwrap();

    let http_port = free_port();
    let db = d.join("orthanc-db");
    std::fs::write(
        d.join("orthanc.json"),
        format!(
            r#"{{"Name":"pacs","StorageDirectory":"{db}","IndexDirectory":"{db}","HttpPort":{http_port},
            "DicomPort":{dicom},"RemoteAccessAllowed":false,"AuthenticationEnabled":true,
            "RegisteredUsers":{{"test":"test"}},
            "Plugins":["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
            "DicomWeb":{{"Enable":true,"Root":"/dicom-web/"}}}}"#,
            db = db.display(),
            dicom = free_port()
        ),
    )
    .unwrap();
    let _orthanc = Kill(
        Command::new("Orthanc")
            .arg(d.join("orthanc.json"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("orthanc.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_port(http_port);
    let policy = d.join("policy.json");
    std::fs::write(
        &policy,
        format!(r#"{{"inbound":[{{"port":{http_port},"protocol":"http","permissive":true,"allow":[{{"service_account":"radiology/scanner"}}]}}]}}"#),
    )
    .unwrap();

    // Two server sidecars in front of the same Orthanc, with their own spools.
    let mut ports = Vec::new();
    let mut kept = Vec::new();
    for mode in ["enforce", "spool"] {
        let sub = d.join(mode);
        std::fs::create_dir_all(sub.join("spool")).unwrap();
        for f in ["uid.key", "verifier.key"] {
            std::fs::copy(d.join(f), sub.join(f)).unwrap();
        }
        std::os::unix::fs::symlink(d.join("certs"), sub.join("certs")).unwrap();
        let (server, sp) = sidecar(
            &sub,
            &format!("server-{mode}"),
            &audit_server_args(&sub, &ledger, &policy, http_port, mode),
        );
        let (client, cp) = sidecar(
            &sub,
            &format!("client-{mode}"),
            &scanner_client_args(&sub, sp[0]),
        );
        ports.push((cp[1], sp[2], sp[0]));
        kept.push((server, client));
    }
    let (enforce_port, enforce_admin, enforce_inbound) = ports[0];
    let spool_port = ports[1].0;
    let auditor = ledger.client("audit.auditor");

    // Ledger up: 200, and each instance has its success record.
    let files: Vec<Vec<u8>> = (0..13).map(instance).collect();
    let sha: Vec<Hash> = files.iter().map(|f| sha256(f)).collect();
    assert_eq!(stow(d, enforce_port, &files[0..3]), 200);
    for h in &sha[0..3] {
        assert_eq!(
            records(&auditor, h, 1).await,
            [(Outcome::Success, Some(200))]
        );
    }

    // Ledger down. Enforce: 503, never 200. Spool: 200 on the strength of the spool.
    ledger.stop();
    assert_eq!(
        stow(d, enforce_port, &files[3..6]),
        503,
        "success while the ledger was down"
    );
    assert_eq!(stow(d, spool_port, &files[6..9]), 200);
    let m = String::from_utf8(
        run(Command::new("curl")
            .args(["-sf", &format!("http://127.0.0.1:{enforce_admin}/metrics")]))
        .stdout,
    )
    .unwrap();
    assert!(
        m.contains("medmesh_sidecar_audit_failed_responses_total 3"),
        "{m}"
    );

    // Ledger back: every record arrives once; the enforce ones say what the client saw.
    ledger.start().unwrap();
    assert_eq!(stow(d, enforce_port, &files[9..12]), 200);
    for h in &sha[3..6] {
        assert_eq!(
            records(&auditor, h, 1).await,
            [(Outcome::Failure, Some(503))]
        );
    }
    for h in &sha[6..12] {
        assert_eq!(
            records(&auditor, h, 1).await,
            [(Outcome::Success, Some(200))]
        );
    }
    // A permissive port takes plaintext from outside the mesh: still audited, the sender
    // recorded as unauthenticated.
    assert_eq!(stow(d, enforce_inbound, &files[12..13]), 200);
    assert_eq!(records(&auditor, &sha[12], 1).await.len(), 1);
    let hits = auditor.search("sha256", &sha[12].to_hex()).await.unwrap().1;
    assert_eq!(hits.len(), 1);
    assert_eq!(
        hits[0].entry.record.source.as_str(),
        "spiffe://medmesh.local/unauthenticated"
    );
    // Orthanc closes idle keep-alive connections after 1 s; a client reusing its connection to
    // the mesh after that still gets answers (the sidecar reconnects to the application).
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{enforce_port}/dicom-web/studies");
    for _ in 0..3 {
        let r = http
            .get(&url)
            .basic_auth("test", Some("test"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        r.bytes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    // Delivery is idempotent: a while later, still one record each.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for h in &sha {
        assert_eq!(records(&auditor, h, 1).await.len(), 1);
    }
    let all = auditor.entries(0, 1000).await.unwrap();
    let dump = serde_json::to_string(&all.entries).unwrap();
    for secret in ["STOW^SECRET^NAME", "SECRET-PID-88", "2.25.88."] {
        assert!(!dump.contains(secret), "{secret} reached the ledger");
    }
}
