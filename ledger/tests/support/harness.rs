//! Shared by the ledger's integration tests: a CA made at test time, a ledger on ephemeral
//! ports with real TLS and a real redb file, and clients with arbitrary certificates.

#![allow(dead_code)]
// Each test binary uses a different part of the harness.
// Test support: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use medmesh_core::devca::{DevCa, LeafOptions};
use medmesh_core::merkle::sha256;
use medmesh_core::record::{AuditRecord, EventKind, KeyedHash, Outcome, Protocol, RecordId};
use medmesh_core::tls::{Identity, ServerIdentity, TrustBundle};
use medmesh_core::{NoteSigner, NoteVerifier, SpiffeId, TrustDomain};
use medmesh_ledger::{Config, Ledger};
use medmesh_ledger_client::{LedgerClient, LedgerClientConfig};

pub const TD: &str = "medmesh.test";
pub const ORIGIN: &str = "medmesh.test/ledger";
pub const WRITER: (&str, &str) = ("pacs", "writer");
pub const AUDITOR: (&str, &str) = ("audit", "auditor");

pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: DevCa,
    pub td: TrustDomain,
}

impl Pki {
    pub fn new() -> Self {
        // reqwest (even for plain HTTP) wants the process-wide rustls provider, as the binaries install it.
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

    pub fn id(&self, (ns, sa): (&str, &str)) -> SpiffeId {
        self.td.workload(ns, sa).unwrap()
    }

    /// Issues a certificate and returns (cert path, key path).
    pub fn issue(&self, who: (&str, &str)) -> (PathBuf, PathBuf) {
        self.issue_with(who, &LeafOptions::default())
    }

    pub fn issue_with(&self, (ns, sa): (&str, &str), opts: &LeafOptions) -> (PathBuf, PathBuf) {
        let id = self.td.workload(ns, sa).unwrap();
        let issued = self.ca.issue(&id, opts).unwrap();
        let stamp = format!("{ns}.{sa}.{}", rand_suffix());
        let cert = self.dir.path().join(format!("{stamp}.pem"));
        let key = self.dir.path().join(format!("{stamp}-key.pem"));
        std::fs::write(&cert, issued.cert_pem).unwrap();
        std::fs::write(&key, issued.key_pem).unwrap();
        (cert, key)
    }

    pub fn identity(&self, who: (&str, &str)) -> Identity {
        let (c, k) = self.issue(who);
        Identity::from_pem(&std::fs::read(c).unwrap(), &std::fs::read(k).unwrap()).unwrap()
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::from_pem(self.ca.ca().cert_pem.as_bytes(), self.td.clone()).unwrap()
    }
}

fn rand_suffix() -> String {
    hex::encode(RecordId::random().unwrap().0)
}

pub struct TestLedger {
    pub ledger: Option<Ledger>,
    pub data: PathBuf,
    pub signing_key: PathBuf,
    pub verifier: NoteVerifier,
    pub cfg: Config,
}

/// Writes a signing key for `ORIGIN` into `dir`.
pub fn signing_key(dir: &Path) -> (PathBuf, NoteVerifier) {
    let signer = NoteSigner::from_seed(
        ORIGIN,
        RecordId::random().unwrap().0.repeat(2).try_into().unwrap(),
    )
    .unwrap();
    let path = dir.join("signing.key");
    std::fs::write(&path, signer.private_key()).unwrap();
    (path, signer.verifier())
}

pub fn config(pki: &Pki, data: &Path, signing_key: &Path) -> Config {
    config_with(pki, data, signing_key, 100)
}

pub fn config_with(pki: &Pki, data: &Path, signing_key: &Path, checkpoint_ms: u64) -> Config {
    let (cert, key) = pki.issue(("medmesh", "ledger"));
    let yaml = format!(
        r#"
node_id: ledger-0
origin: {ORIGIN}
data_dir: {data}
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
trust_domain: {TD}
cert: {cert}
key: {key}
trust_bundle: {ca}
signing_key: {sk}
appenders: ["spiffe://{TD}/ns/pacs/sa/writer"]
readers: ["spiffe://{TD}/ns/audit/*"]
checkpoint_interval_ms: {checkpoint_ms}
max_body_bytes: 65536
drain_seconds: 2
"#,
        data = data.display(),
        cert = cert.display(),
        key = key.display(),
        ca = pki.ca_path().display(),
        sk = signing_key.display(),
    );
    Config::from_yaml(&yaml).unwrap()
}

impl TestLedger {
    pub async fn start(pki: &Pki) -> Self {
        Self::start_with(pki, 100).await
    }

    pub async fn start_with(pki: &Pki, checkpoint_ms: u64) -> Self {
        let data = pki.dir.path().join("data");
        let (signing_key, verifier) = signing_key(pki.dir.path());
        let cfg = config_with(pki, &data, &signing_key, checkpoint_ms);
        let ledger = Ledger::start(cfg.clone()).await.unwrap();
        Self {
            ledger: Some(ledger),
            data,
            signing_key,
            verifier,
            cfg,
        }
    }

    pub fn api(&self) -> String {
        format!("https://{}", self.ledger.as_ref().unwrap().api_addr)
    }

    pub fn admin(&self) -> String {
        format!("http://{}", self.ledger.as_ref().unwrap().admin_addr)
    }

    pub fn client(&self, pki: &Pki, who: (&str, &str)) -> LedgerClient {
        self.client_via(pki, who, &self.api())
    }

    /// A client of this ledger that connects to `url` (a proxy in front of it).
    pub fn client_via(&self, pki: &Pki, who: (&str, &str), url: &str) -> LedgerClient {
        LedgerClient::new(LedgerClientConfig {
            url: url.to_owned(),
            identity: pki.identity(who),
            bundle: pki.bundle(),
            server: ServerIdentity::Exact(pki.id(("medmesh", "ledger"))),
            verifier: self.verifier.clone(),
            origin: ORIGIN.into(),
            timeout: Duration::from_secs(20),
        })
        .unwrap()
    }

    pub async fn stop(&mut self) {
        if let Some(l) = self.ledger.take() {
            l.shutdown().await;
        }
    }

    pub async fn restart(&mut self) -> Result<(), medmesh_ledger::StartError> {
        self.stop().await;
        self.ledger = Some(Ledger::start(self.cfg.clone()).await?);
        Ok(())
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

pub fn record(i: u64, src: &SpiffeId, dst: &SpiffeId) -> AuditRecord {
    AuditRecord {
        record_id: RecordId::new().unwrap(),
        kind: EventKind::InstanceStored,
        time_us: 1_700_000_000_000_000 + i,
        source: src.clone(),
        destination: dst.clone(),
        protocol: Protocol::Dimse,
        outcome: Outcome::Success,
        status: Some(0),
        bytes: 1000 + i,
        content_sha256: Some(sha256(&i.to_be_bytes())),
        study_uid: Some(KeyedHash([(i % 7) as u8; 32])),
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

/// A rustls client that presents any certificate (even an invalid SVID) and accepts any server:
/// for testing how the ledger treats bad clients.
pub fn raw_client(
    cert_key: Option<(&Path, &Path)>,
    tls12_only: bool,
    http1: bool,
) -> reqwest::Client {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    #[derive(Debug)]
    struct AnyServer(Arc<rustls::crypto::CryptoProvider>);
    impl ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let provider = medmesh_core::tls::provider();
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let b = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut cfg = match cert_key {
        Some((c, k)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(c)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            b.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(k).unwrap())
                .unwrap()
        }
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = if http1 {
        vec![b"http/1.1".to_vec()]
    } else {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    };
    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured(cfg)
        .timeout(Duration::from_secs(10));
    if http1 {
        builder = builder.http1_only();
    }
    builder.build().unwrap()
}
