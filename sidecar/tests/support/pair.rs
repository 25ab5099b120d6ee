//! Two sidecars in process, a client-side one and a server-side one, with a CA made at test
//! time. Without iptables, the dev fallbacks stand in for the original destination: the client
//! sidecar sends everything to the server sidecar's inbound listener, which forwards to the app.

#![allow(dead_code)] // Each test binary uses a different part.
// Test support: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use medmesh_core::TrustDomain;
use medmesh_core::devca::{DevCa, LeafOptions};
use medmesh_sidecar::Sidecar;
use medmesh_sidecar::config::{Config, RawConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const TD: &str = "mesh.test";

pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: DevCa,
    pub td: TrustDomain,
}

impl Pki {
    pub fn new() -> Self {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let td = TrustDomain::new(TD).unwrap();
        let ca = DevCa::new(&td, 30).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca.ca().cert_pem).unwrap();
        Self { dir, ca, td }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Writes `<name>.pem` and `<name>-key.pem` for `spiffe://mesh.test/ns/<ns>/sa/<sa>`.
    pub fn issue(&self, name: &str, ns: &str, sa: &str, opts: &LeafOptions) -> (PathBuf, PathBuf) {
        let id = self.td.workload(ns, sa).unwrap();
        let i = self.ca.issue(&id, opts).unwrap();
        let (c, k) = (
            self.dir.path().join(format!("{name}.pem")),
            self.dir.path().join(format!("{name}-key.pem")),
        );
        std::fs::write(&c, i.cert_pem).unwrap();
        std::fs::write(&k, i.key_pem).unwrap();
        (c, k)
    }
}

pub fn write_policy(dir: &Path, name: &str, json: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, json).unwrap();
    p
}

pub fn raw(cert: &Path, key: &Path, ca: &Path) -> RawConfig {
    RawConfig {
        inbound_addr: "127.0.0.1:0".into(),
        outbound_addr: "127.0.0.1:0".into(),
        admin_addr: "127.0.0.1:0".into(),
        otlp_endpoint: None,
        cert: Some(cert.into()),
        key: Some(key.into()),
        ca: Some(ca.into()),
        identity_url: None,
        audit_config: None,
        archive_recipients_from_config: false,
        pod_labels: None,
        identity_token: "/nonexistent/token".into(),
        identity_ca: "/nonexistent/ca.crt".into(),
        trust_domain: TD.into(),
        policy: None,
        app_host: "127.0.0.1".into(),
        detect_timeout_ms: "300".into(),
        connect_timeout_ms: "3000".into(),
        drain_seconds: "2".into(),
        reload_ms: "100".into(),
        dev_outbound_dst: None,
        dev_inbound_port: None,
        ledger_url: None,
        ledger_id: None,
        ledger_key: None,
        ledger_origin: None,
        audit_delivery: Some("spool".into()),
        audit_key: None,
        spool_dir: None,
        spool_max_bytes: "268435456".into(),
        audit_deadline_ms: "5000".into(),
        archive_url: None,
        archive_id: None,
        archive_store: None,
        archive_recipients: None,
        archive_mode: None,
        archive_replication_min: None,
        archive_replication_max: None,
        archive_staging_dir: None,
        archive_staging_max_bytes: "4294967296".into(),
    }
}

pub struct Pair {
    pub pki: Pki,
    pub client: Sidecar,
    pub server: Sidecar,
    pub app_port: u16,
    pub server_policy: PathBuf,
}

/// A server sidecar in front of `app_port` whose policy is `server_policy` (JSON with `{PORT}`
/// standing for the app port; empty: no policy file yet), and a client sidecar for
/// `client_ns/client_sa`.
pub async fn pair(
    app_port: u16,
    server_policy: &str,
    client: (&str, &str),
    client_opts: LeafOptions,
) -> Pair {
    let pki = Pki::new();
    let (sc, sk) = pki.issue("server", "pacs", "orthanc", &LeafOptions::default());
    // An empty policy stands for a file that does not exist yet.
    let policy = if server_policy.is_empty() {
        pki.dir.path().join("server-policy.json")
    } else {
        write_policy(
            pki.dir.path(),
            "server-policy.json",
            &server_policy.replace("{PORT}", &app_port.to_string()),
        )
    };
    let mut s = raw(&sc, &sk, &pki.ca_path());
    s.policy = Some(policy.clone());
    // The pod's labels (downward API); absent until a test writes them.
    s.pod_labels = Some(pki.dir.path().join("labels"));
    s.dev_inbound_port = Some(app_port.to_string());
    let server = Sidecar::start(Config::check(s).unwrap()).await.unwrap();
    let (cc, ck) = pki.issue("client", client.0, client.1, &client_opts);
    let mut c = raw(&cc, &ck, &pki.ca_path());
    c.dev_outbound_dst = Some(server.inbound.to_string());
    let client = Sidecar::start(Config::check(c).unwrap()).await.unwrap();
    wait_ready(client.admin).await;
    wait_ready(server.admin).await;
    Pair {
        pki,
        client,
        server,
        app_port,
        server_policy: policy,
    }
}

pub async fn wait_ready(admin: SocketAddr) {
    for _ in 0..200 {
        if get(admin, "/ready").await.0 == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("sidecar at {admin} never became ready");
}

/// A plain HTTP/1.0 GET without a client library: (status, body).
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let _ = s
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub async fn metrics(admin: SocketAddr) -> String {
    get(admin, "/metrics").await.1
}

/// Value of the metric line starting with `prefix` (0 when absent).
pub fn metric(text: &str, prefix: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// An echo server: copies every connection back to itself, then closes.
pub async fn echo_app() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

/// A server that speaks first: writes a banner on connect, then echoes.
pub async fn banner_app() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s
                    .write_all(b"220 hello from a server-first protocol\r\n")
                    .await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}
