use std::sync::Arc;

use proptest::prelude::*;

use super::*;

/// A real ClientHello, produced by rustls with medmesh's client configuration.
fn rustls_client_hello(alpn: &[&[u8]]) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from("10.0.0.1").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

#[test]
fn recognises_real_client_hellos() {
    let hello = rustls_client_hello(&[MEDMESH_ALPN]);
    // The post-quantum key share makes it large: detection must wait for the whole record.
    assert!(hello.len() > 1200, "{}", hello.len());
    for n in 0..hello.len() {
        assert_eq!(detect(&hello[..n]), None, "decided early at {n}");
    }
    let d = detect(&hello).unwrap();
    assert!(d.is_medmesh_tls(), "{d:?}");
    let other = detect(&rustls_client_hello(&[b"h2", b"http/1.1"])).unwrap();
    assert_eq!(
        other,
        Detected::Tls {
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        }
    );
    assert!(!other.is_medmesh_tls());
    assert_eq!(
        detect(&rustls_client_hello(&[])).unwrap(),
        Detected::Tls { alpn: vec![] }
    );
}

#[test]
fn recognises_plaintext_protocols_at_every_split() {
    let cases: [(&[u8], Detected); 5] = [
        (
            b"GET /dicom-web/studies HTTP/1.1\r\nHost: x\r\n\r\n",
            Detected::Http1,
        ),
        (b"POST /dicom-web/studies HTTP/1.1\r\n", Detected::Http1),
        (
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04",
            Detected::Http2,
        ),
        (
            // A-ASSOCIATE-RQ header: type 1, reserved, length 205, version 1.
            &[
                0x01, 0x00, 0x00, 0x00, 0x00, 0xcd, 0x00, 0x01, 0x00, 0x00, b'O', b'R',
            ],
            Detected::Dicom,
        ),
        (b"SSH-2.0-OpenSSH_9.2\r\n", Detected::Opaque),
    ];
    for (bytes, want) in cases {
        let full = detect(bytes).unwrap();
        assert_eq!(full, want, "{bytes:?}");
        // A prefix is either undecided or already the right answer.
        for n in 1..bytes.len() {
            if let Some(d) = detect(&bytes[..n]) {
                assert_eq!(d, want, "prefix {n} of {bytes:?}");
            }
        }
    }
    assert_eq!(detect(b""), None);
    assert_eq!(detect(b"P"), None);
    assert_eq!(detect(b"PU"), None);
    assert_eq!(detect(b"PX"), Some(Detected::Opaque));
    // DICOM-like bytes with a wrong version or absurd length are not DICOM.
    assert_eq!(detect(&[1, 0, 0, 0, 0, 10, 0, 1]), Some(Detected::Opaque));
    assert_eq!(
        detect(&[1, 0, 0xff, 0, 0, 0xcd, 0, 1]),
        Some(Detected::Opaque)
    );
}

#[test]
fn malformed_tls_is_opaque() {
    let mut hello = rustls_client_hello(&[MEDMESH_ALPN]);
    // Corrupt the extensions length: not a well-formed ClientHello any more.
    let at = 5 + 4 + 2 + 32;
    let sid = hello[at] as usize;
    let ext_len_at = at + 1 + sid;
    let suites = u16::from_be_bytes([hello[ext_len_at], hello[ext_len_at + 1]]) as usize;
    let comp_at = ext_len_at + 2 + suites;
    let ext_at = comp_at + 1 + hello[comp_at] as usize;
    hello[ext_at] = 0xff;
    assert_eq!(detect(&hello), Some(Detected::Opaque));
    assert_eq!(detect(&[0x16, 0x02, 0, 0, 5]), Some(Detected::Opaque));
    assert_eq!(
        detect(&[0x16, 0x03, 1, 0xff, 0xff]),
        Some(Detected::Opaque),
        "record over 16 KiB"
    );
}

proptest! {
    /// Never panics; never asks for more than one TLS record's worth of bytes.
    #[test]
    fn total(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let d = detect(&bytes);
        if bytes.len() >= 24 && bytes[0] != 0x16 {
            prop_assert!(d.is_some());
        }
    }
}

/// Seed corpus of the `detect` fuzz target, written by this test:
/// `MEDMESH_BLESS=1 cargo test -p medmesh-sidecar fuzz_seeds`. (ClientHellos carry fresh random
/// bytes, so the check is of shape, not bytes.)
#[test]
fn fuzz_seeds() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/detect");
    let seeds: [(&str, Vec<u8>); 4] = [
        ("client-hello-medmesh", rustls_client_hello(&[MEDMESH_ALPN])),
        (
            "http1",
            b"GET /dicom-web/studies HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("http2", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
        (
            "a-associate-rq",
            vec![0x01, 0x00, 0x00, 0x00, 0x00, 0xcd, 0x00, 0x01, 0x00, 0x00],
        ),
    ];
    for (name, bytes) in seeds {
        let path = format!("{dir}/{name}");
        if std::env::var_os("MEDMESH_BLESS").is_some() {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let stored = std::fs::read(&path).unwrap();
        assert_eq!(
            detect(&stored),
            detect(&bytes),
            "{path} is stale: regenerate with MEDMESH_BLESS=1"
        );
    }
}
