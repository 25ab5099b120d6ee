//! The binaries' own contracts: configuration refused whole with exit status 64 and every
//! problem listed; the sidecar stops cleanly on `POST /shutdown` from localhost.

// Integration tests: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mesh.rs"]
mod mesh;

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn sidecar_refuses_bad_configuration_whole() {
    let out = Command::new(mesh::bin("medmesh-sidecar"))
        .args([
            "run",
            "--inbound-addr",
            "nope",
            "--cert",
            "/nonexistent.pem",
            "--trust-domain",
            "Bad Domain",
            "--detect-timeout-ms",
            "0",
        ])
        .env_remove("MEDMESH_KEY")
        .env_remove("MEDMESH_CA")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", mesh::text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "inbound-addr \"nope\"",
        "cert /nonexistent.pem",
        "key: required",
        "ca: required",
        "trust-domain",
        "detect-timeout-ms",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    assert!(err.contains("6 problems"), "{err}");
}

#[test]
fn ledger_refuses_bad_configuration_whole() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("ledger.yaml");
    std::fs::write(&cfg, "node_id: x\norigin: o\ndata_dir: /tmp/x\nlisten: bad\nadmin_listen: bad\ntrust_domain: t\ncert: /n\nkey: /n\ntrust_bundle: /n\nsigning_key: /n\n").unwrap();
    let out = Command::new(mesh::bin("medmesh-ledger"))
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", mesh::text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("6 problems")
            && err.contains("listen \"bad\"")
            && err.contains("signing_key /n"),
        "{err}"
    );
}

#[test]
fn sidecar_stops_on_admin_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(mesh::bin("medmesh"))
        .args([
            "dev",
            "certs",
            "--trust-domain",
            "mesh.test",
            "--workload",
            "ns/app",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", mesh::text(&out));
    let admin = mesh::free_port();
    let d = dir.path();
    let mut child = Command::new(mesh::bin("medmesh-sidecar"))
        .args([
            "run",
            "--trust-domain",
            "mesh.test",
            "--inbound-addr",
            "127.0.0.1:0",
            "--outbound-addr",
            "127.0.0.1:0",
        ])
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{admin}"))
        .arg("--cert")
        .arg(d.join("ns.app.pem"))
        .arg("--key")
        .arg(d.join("ns.app-key.pem"))
        .arg("--ca")
        .arg(d.join("ca.pem"))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while mesh::http_status(admin, "/ready") != Some(200) {
        assert!(Instant::now() < deadline, "sidecar not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its metrics pass Prometheus' lint.
    mesh::assert_promtool_clean("127.0.0.1", admin, "sidecar");
    // POST /shutdown, from localhost.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", admin)).unwrap();
    write!(
        s,
        "POST /shutdown HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 202"), "{resp}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit {status}");
            break;
        }
        assert!(Instant::now() < deadline, "sidecar did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}
