//! A client sidecar and a server sidecar in process, real TLS 1.3 between them: traffic that the
//! policy allows flows both ways unchanged; everything else is refused and counted.

// Integration tests: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/pair.rs"]
mod support;

use std::time::Duration;

use medmesh_core::devca::LeafOptions;
use sha2_free::digest;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Allow the scanner on the app port; everything else is denied.
const ALLOW_SCANNER: &str =
    r#"{"inbound": [{"port": {PORT}, "allow": [{"service_account": "radiology/scanner"}]}]}"#;
const SCANNER: (&str, &str) = ("radiology", "scanner");

mod sha2_free {
    /// A cheap content digest for comparing large streams (FNV-1a, 64 bit): the test compares
    /// bytes it generated itself, so collision resistance is not needed.
    pub fn digest(data: &[u8]) -> u64 {
        data.iter().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
        })
    }
}

async fn http_app() -> u16 {
    use axum::routing::{get, post};
    let app = axum::Router::new()
        .route("/hello", get(|| async { "hello through the mesh" }))
        .route("/echo", post(|body: axum::body::Bytes| async move { body }))
        .layer(axum::extract::DefaultBodyLimit::disable());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(l, app).await });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_flow_through_the_pair() {
    let port = http_app().await;
    let p = pair(port, ALLOW_SCANNER, SCANNER, LeafOptions::default()).await;
    let base = format!("http://{}", p.client.outbound);
    for h2 in [false, true] {
        let mut b = reqwest::Client::builder();
        if h2 {
            b = b.http2_prior_knowledge();
        } else {
            b = b.http1_only();
        }
        let c = b.build().unwrap();
        let r = c.get(format!("{base}/hello")).send().await.unwrap();
        assert_eq!(
            r.version(),
            if h2 {
                reqwest::Version::HTTP_2
            } else {
                reqwest::Version::HTTP_11
            }
        );
        assert_eq!(r.text().await.unwrap(), "hello through the mesh");
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let r = c
            .post(format!("{base}/echo"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.bytes().await.unwrap().as_ref(), body.as_slice());
        // Dropping the client closes its pooled connection: records are emitted at the end.
        drop(c);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = metrics(p.server.admin).await;
    assert!(
        metric(
            &m,
            &format!(
                "medmesh_sidecar_authz_decisions_total{{decision=\"allow\",kind=\"mtls\",port=\"{port}\"}}"
            )
        ) >= 2,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "medmesh_sidecar_protocol_detections_total{direction=\"inbound\",protocol=\"http2\"}"
        ) >= 1,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "medmesh_sidecar_protocol_detections_total{direction=\"inbound\",protocol=\"http1\"}"
        ) >= 1,
        "{m}"
    );
    let cm = metrics(p.client.admin).await;
    assert!(
        metric(
            &cm,
            "medmesh_sidecar_connections_total{direction=\"outbound\",protocol=\"http1\",tls=\"mtls\"}"
        ) >= 1,
        "{cm}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_half_closed_and_dicom_streams_pass_unchanged() {
    let port = echo_app().await;
    let p = pair(port, ALLOW_SCANNER, SCANNER, LeafOptions::default()).await;
    // 64 MiB opaque: write all, half-close, read the echo back to the end.
    let data: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let s = TcpStream::connect(p.client.outbound).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let want = digest(&data);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(64 << 20);
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), 64 << 20);
    assert_eq!(digest(&back), want, "stream altered in transit");

    // A DICOM association request, byte-exact.
    let mut assoc = vec![0x01, 0x00, 0x00, 0x00, 0x00, 0xcd, 0x00, 0x01, 0x00, 0x00];
    assoc.extend_from_slice(b"ORTHANC         STORESCU        ");
    assoc.resize(6 + 0xcd, 0x20);
    let mut s = TcpStream::connect(p.client.outbound).await.unwrap();
    s.write_all(&assoc).await.unwrap();
    s.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    s.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed, assoc);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let m = metrics(p.server.admin).await;
    assert!(
        metric(
            &m,
            "medmesh_sidecar_protocol_detections_total{direction=\"inbound\",protocol=\"dicom\"}"
        ) >= 1,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "medmesh_sidecar_bytes_total{direction=\"inbound\",way=\"to_app\"}"
        ) >= 64 << 20,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first_does_not_stall() {
    let port = banner_app().await;
    let p = pair(port, ALLOW_SCANNER, SCANNER, LeafOptions::default()).await;
    let started = std::time::Instant::now();
    let mut s = TcpStream::connect(p.client.outbound).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].starts_with(b"220 hello"), "{:?}", &buf[..n]);
    // Through the mesh the client side never waits for the app to speak.
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
}

async fn refused(p: &Pair) {
    let mut s = TcpStream::connect(p.client.outbound).await.unwrap();
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(
        r.is_err() || buf.is_empty(),
        "refused connection delivered {:?}",
        String::from_utf8_lossy(&buf)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_not_in_policy_is_denied_and_policy_reloads() {
    let port = echo_app().await;
    let p = pair(
        port,
        ALLOW_SCANNER,
        ("radiology", "intruder"),
        LeafOptions::default(),
    )
    .await;
    refused(&p).await;
    let m = metrics(p.server.admin).await;
    assert_eq!(
        metric(
            &m,
            &format!(
                "medmesh_sidecar_authz_decisions_total{{decision=\"deny\",kind=\"mtls\",port=\"{port}\"}}"
            )
        ),
        1,
        "{m}"
    );
    // Audit mode: the same peer is let through, and counted as a would-be denial.
    std::fs::write(
        &p.server_policy,
        ALLOW_SCANNER.replace("{PORT}", &port.to_string()).replacen(
            '{',
            "{\"mode\": \"audit\", ",
            1,
        ),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let back = ping(&p).await;
    assert_eq!(back, b"ping");
    let m = metrics(p.server.admin).await;
    assert_eq!(
        metric(
            &m,
            &format!(
                "medmesh_sidecar_authz_decisions_total{{decision=\"audit_deny\",kind=\"mtls\",port=\"{port}\"}}"
            )
        ),
        1,
        "{m}"
    );
    // A broken policy is refused; the audit policy stays in force.
    std::fs::write(
        &p.server_policy,
        "{\"inbound\": [{\"port\": 0, \"alow\": []}]}",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let m = metrics(p.server.admin).await;
    assert!(
        metric(&m, "medmesh_sidecar_policy_reloads_total{result=\"error\"}") >= 1,
        "{m}"
    );
    assert!(
        metric(&m, "medmesh_sidecar_policy_reloads_total{result=\"ok\"}") >= 1,
        "{m}"
    );
}

/// In a pod the policy is an optional ConfigMap that may appear after the sidecar starts:
/// until then everything is refused, then the policy takes effect without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_file_that_appears_later_takes_effect() {
    let port = echo_app().await;
    let p = pair(port, "", ("radiology", "scanner"), LeafOptions::default()).await;
    refused(&p).await;
    std::fs::write(
        &p.server_policy,
        ALLOW_SCANNER.replace("{PORT}", &port.to_string()),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let back = ping(&p).await;
    assert_eq!(back, b"ping");
}

/// The operator's policy set: the sidecar enforces the policies whose selector matches its
/// pod's labels, and follows label changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_set_applies_the_policies_that_select_the_pod() {
    let port = echo_app().await;
    let p = pair(port, "", ("radiology", "scanner"), LeafOptions::default()).await;
    let labels = p.server_policy.parent().unwrap().join("labels");
    std::fs::write(&labels, "app=\"orthanc\"\ntier=\"pacs\"\n").unwrap();
    let set = format!(
        r#"{{"selected": [
          {{"selector": {{"matchLabels": {{"app": "orthanc"}}}},
            "document": {{"inbound": [{{"port": {port}, "allow": [{{"service_account": "radiology/scanner"}}]}}]}}}},
          {{"selector": {{"matchLabels": {{"app": "viewer"}}}},
            "document": {{"inbound": [{{"port": {port}, "allow": [{{"service_account": "radiology/other"}}]}}]}}}}
        ]}}"#
    );
    std::fs::write(&p.server_policy, set).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let back = ping(&p).await;
    assert_eq!(back, b"ping", "the selecting policy allows the scanner");
    // The pod is relabelled: no policy selects it any more, default deny.
    std::fs::write(&labels, "app=\"viewer2\"\n").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    refused(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_certificates_are_refused_by_reason() {
    let port = echo_app().await;
    let now = time::OffsetDateTime::now_utc();
    let cases: Vec<(&str, LeafOptions)> = vec![
        (
            "expired",
            LeafOptions {
                not_before: now - time::Duration::days(2),
                not_after: now - time::Duration::days(1),
                ..Default::default()
            },
        ),
        (
            "not_svid",
            LeafOptions {
                extra_uris: vec!["spiffe://mesh.test/ns/radiology/sa/other".into()],
                ..Default::default()
            },
        ),
    ];
    for (reason, opts) in cases {
        let p = pair(port, ALLOW_SCANNER, SCANNER, LeafOptions::default()).await;
        // Replace the client's certificate files; the client sidecar reloads them, but the
        // server must refuse them. (Expired and two-URI certificates are refused by the client
        // sidecar's own loader too, so present them with a raw TLS client.)
        let (c, k) = p.pki.issue("bad", SCANNER.0, SCANNER.1, &opts);
        let err = raw_tls(p.server.inbound, Some((&c, &k)), false).await;
        assert!(err.is_err(), "{reason}: handshake succeeded");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let m = metrics(p.server.admin).await;
        let line = format!(
            "medmesh_sidecar_tls_handshake_failures_total{{direction=\"inbound\",reason=\"{reason}\"}}"
        );
        assert_eq!(metric(&m, &line), 1, "{reason}:\n{m}");
    }
    // No client certificate at all; a TLS 1.2 client; a certificate from another CA.
    let p = pair(port, ALLOW_SCANNER, SCANNER, LeafOptions::default()).await;
    assert!(raw_tls(p.server.inbound, None, false).await.is_err());
    assert!(raw_tls(p.server.inbound, None, true).await.is_err());
    let other = Pki::new();
    let (c, k) = other.issue("foreign", SCANNER.0, SCANNER.1, &LeafOptions::default());
    assert!(
        raw_tls(p.server.inbound, Some((&c, &k)), false)
            .await
            .is_err()
    );
    // A certificate of another trust domain, signed by the CA the server trusts.
    let other_td = medmesh_core::TrustDomain::new("other.test").unwrap();
    let issued = p
        .pki
        .ca
        .issue(
            &other_td.workload("radiology", "scanner").unwrap(),
            &LeafOptions::default(),
        )
        .unwrap();
    let (oc, ok) = (
        p.pki.dir.path().join("other-td.pem"),
        p.pki.dir.path().join("other-td-key.pem"),
    );
    std::fs::write(&oc, issued.cert_pem).unwrap();
    std::fs::write(&ok, issued.key_pem).unwrap();
    assert!(
        raw_tls(p.server.inbound, Some((&oc, &ok)), false)
            .await
            .is_err()
    );
    // Plaintext to a strict port.
    let mut s = TcpStream::connect(p.server.inbound).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf)).await;
    assert!(buf.is_empty());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let m = metrics(p.server.admin).await;
    for line in [
        "medmesh_sidecar_tls_handshake_failures_total{direction=\"inbound\",reason=\"no_certificate\"}",
        "medmesh_sidecar_tls_handshake_failures_total{direction=\"inbound\",reason=\"incompatible\"}",
        "medmesh_sidecar_tls_handshake_failures_total{direction=\"inbound\",reason=\"unknown_issuer\"}",
        "medmesh_sidecar_tls_handshake_failures_total{direction=\"inbound\",reason=\"foreign_trust_domain\"}",
        "medmesh_sidecar_refused_connections_total{direction=\"inbound\",reason=\"plaintext\"}",
        &format!(
            "medmesh_sidecar_authz_decisions_total{{decision=\"deny\",kind=\"plaintext\",port=\"{port}\"}}"
        ),
    ] {
        assert_eq!(metric(&m, line), 1, "{line}:\n{m}");
    }
}

/// A TLS client offering medmesh's ALPN with any certificate: for refusal tests.
async fn raw_tls(
    addr: std::net::SocketAddr,
    cert_key: Option<(&std::path::Path, &std::path::Path)>,
    tls12: bool,
) -> std::io::Result<()> {
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    #[derive(Debug)]
    struct Any(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for Any {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let v: &[&rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let b = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(v)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Any(provider)));
    let mut cfg = match cert_key {
        Some((c, k)) => b
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(c)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(k).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"medmesh/1".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await?;
    // TLS 1.3 client authentication fails after the client's handshake completes: the server's
    // alert arrives on the first read.
    tls.write_all(b"x").await?;
    let mut buf = [0u8; 1];
    match tls.read(&mut buf).await {
        Ok(0) => Err(std::io::Error::other("closed")),
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sends `ping` through the client sidecar to the echo app and returns what came back.
async fn ping(p: &Pair) -> Vec<u8> {
    let mut s = TcpStream::connect(p.client.outbound).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    back
}
