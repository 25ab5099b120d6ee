//! Identity rotation, readiness, pinned server identities, other trust domains and the drain.

// Integration tests: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/pair.rs"]
mod support;

use std::time::Duration;

use medmesh_core::devca::LeafOptions;
use medmesh_sidecar::Sidecar;
use medmesh_sidecar::config::Config;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ALLOW_ANY: &str = r#"{"inbound": [{"port": {PORT}, "allow": ["any_in_trust_domain"]}]}"#;

async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_connections_and_pins_apply_to_new_handshakes() {
    let port = echo_app().await;
    let pki = Pki::new();
    let (sc, sk) = pki.issue("server", "pacs", "orthanc", &LeafOptions::default());
    let policy = write_policy(
        pki.dir.path(),
        "server.json",
        &ALLOW_ANY.replace("{PORT}", &port.to_string()),
    );
    let mut s = raw(&sc, &sk, &pki.ca_path());
    s.policy = Some(policy);
    s.dev_inbound_port = Some(port.to_string());
    let server = Sidecar::start(Config::check(s).unwrap()).await.unwrap();
    // Its certificate loads after start; before that it closes connections (no_credentials),
    // which the client would count as `eof`, not as the identity it refuses.
    wait_ready(server.admin).await;
    // The client pins the server identity it expects at that address.
    let pin = write_policy(
        pki.dir.path(),
        "client.json",
        r#"{"pinned": [{"cidr": "127.0.0.1", "identity": "spiffe://mesh.test/ns/pacs/sa/orthanc-v2"}]}"#,
    );
    let (cc, ck) = pki.issue("client", "radiology", "scanner", &LeafOptions::default());
    let mut c = raw(&cc, &ck, &pki.ca_path());
    c.policy = Some(pin);
    c.dev_outbound_dst = Some(server.inbound.to_string());
    let client = Sidecar::start(Config::check(c).unwrap()).await.unwrap();
    wait_ready(client.admin).await;

    // The server presents orthanc, not the pinned orthanc-v2: refused by the client sidecar.
    let mut s = TcpStream::connect(client.outbound).await.unwrap();
    let _ = s.write_all(b"x").await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf)).await;
    assert!(buf.is_empty());
    let m = metrics(client.admin).await;
    assert_eq!(
        metric(
            &m,
            "medmesh_sidecar_tls_handshake_failures_total{direction=\"outbound\",reason=\"unexpected_identity\"}"
        ),
        1,
        "{m}"
    );

    // Rotate the server to orthanc-v2; new handshakes succeed.
    let v2 = pki
        .ca
        .issue(
            &pki.td.workload("pacs", "orthanc-v2").unwrap(),
            &LeafOptions::default(),
        )
        .unwrap();
    std::fs::write(&sk, v2.key_pem).unwrap();
    std::fs::write(&sc, v2.cert_pem).unwrap();
    let mut conn = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut s = TcpStream::connect(client.outbound).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        let mut b = [0u8; 5];
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut b)).await
        {
            conn = Some(s);
            break;
        }
    }
    let mut conn = conn.expect("rotated certificate never used");
    // Rotate again (a new key for the same identity): the established connection is untouched.
    let (c3, k3) = pki.issue("server-3", "pacs", "orthanc-v2", &LeafOptions::default());
    std::fs::copy(&k3, &sk).unwrap();
    std::fs::copy(&c3, &sc).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(roundtrip(&mut conn, b"still here").await, b"still here");
    let sm = metrics(server.admin).await;
    assert!(
        metric(
            &sm,
            "medmesh_sidecar_certificate_reloads_total{result=\"ok\"}"
        ) >= 3,
        "{sm}"
    );
    assert!(
        metric(&sm, "medmesh_sidecar_certificate_expiry_timestamp_seconds") > 1_700_000_000,
        "{sm}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_a_valid_certificate() {
    let pki = Pki::new();
    let cert = pki.dir.path().join("late.pem");
    let key = pki.dir.path().join("late-key.pem");
    std::fs::write(&cert, "not yet").unwrap();
    std::fs::write(&key, "not yet").unwrap();
    let sc = Sidecar::start(Config::check(raw(&cert, &key, &pki.ca_path())).unwrap())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(sc.admin, "/ready").await.0, 503);
    assert_eq!(get(sc.admin, "/live").await.0, 200);
    let (c, k) = pki.issue("valid", "pacs", "orthanc", &LeafOptions::default());
    std::fs::copy(&k, &key).unwrap();
    std::fs::copy(&c, &cert).unwrap();
    wait_ready(sc.admin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_then_cuts_at_the_deadline() {
    let port = echo_app().await;
    let p = pair(
        port,
        ALLOW_ANY,
        ("radiology", "scanner"),
        LeafOptions::default(),
    )
    .await;
    let mut s = TcpStream::connect(p.client.outbound).await.unwrap();
    assert_eq!(roundtrip(&mut s, b"before").await, b"before");
    let admin = p.client.admin;
    let started = std::time::Instant::now();
    let shutdown = tokio::spawn(p.client.shutdown());
    // Still served during the drain; new connections are not accepted.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(roundtrip(&mut s, b"during").await, b"during");
    // The drain deadline (2 s in these tests) cuts the idle connection.
    shutdown.await.unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "connection still open after the cut"
    );
    assert_eq!(get(admin, "/live").await.0, 0, "admin listener closed");
}
