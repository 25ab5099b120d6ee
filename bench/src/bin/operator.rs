//! Operator benchmark: the injection webhook and the identity service over real HTTPS (TLS 1.3,
//! the operator's own serving certificate), in process.
//!
//! - Admission: the AdmissionReview fixtures, open loop at `BENCH_ADMISSION_RATE` per second
//!   (default 200) for `BENCH_ADMISSION_SECONDS` (default 10), over a pool of keep-alive
//!   connections; the p99 of request latency.
//! - Identity: `POST /v1/certificate` with `BENCH_CERT_CONCURRENCY` (default 16) clients for
//!   `BENCH_CERT_SECONDS` (default 5), the TokenReview answered locally from the recorded
//!   review (`RecordedReviewer`); certificates per second.
//!
//! Ends with: `operator-bench admission_p99_ms=<n> certs_per_s=<n>`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use medmesh_operator::events::NoEvents;
use medmesh_operator::identity::{IdentityService, IssuerCa, RecordedReviewer};
use medmesh_operator::metrics::Metrics;
use medmesh_operator::run::{https_router, serve_https};
use medmesh_operator::serving::{self, Decision};
use medmesh_operator::webhook::{InjectConfig, WebhookState};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/../operator/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// An HTTPS client trusting `bundle` that resolves the Service name to `addr`.
fn client(bundle: &str, host: &str, addr: std::net::SocketAddr) -> anyhow::Result<reqwest::Client> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(c?)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(medmesh_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .resolve(host, addr)
        .pool_max_idle_per_host(64)
        .build()?)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rate = env_num("BENCH_ADMISSION_RATE", 200);
    let seconds = env_num("BENCH_ADMISSION_SECONDS", 10);
    let concurrency = env_num("BENCH_CERT_CONCURRENCY", 16);
    let cert_seconds = env_num("BENCH_CERT_SECONDS", 5);

    let td = medmesh_core::TrustDomain::new("cluster.local")?;
    let registry = prometheus::Registry::new();
    let metrics = Metrics::register(&registry)?;
    let sans = serving::sans("medmesh-operator", "medmesh-system", &[]);
    let material = serving::build(Decision::NewCa, None, &sans, SystemTime::now())?;
    let webhook = WebhookState {
        config: Arc::new(InjectConfig {
            sidecar_image: "ghcr.io/medmesh/sidecar:bench".into(),
            image_pull_policy: None,
            trust_domain: td.clone(),
            identity_url: "https://medmesh-operator.medmesh-system.svc:8443".into(),
            version: "bench".into(),
            native_sidecar: true,
        }),
        events: Arc::new(NoEvents),
        metrics: metrics.clone(),
    };
    let review = fixture("tokenreview-authenticated.json");
    let token = serde_json::from_str::<serde_json::Value>(&review)?["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let identity = Arc::new(IdentityService {
        ca: Arc::new(IssuerCa::generate(&td, SystemTime::now())?),
        reviewer: RecordedReviewer::from_json([review.as_str()]).map_err(anyhow::Error::msg)?,
        trust_domain: td.clone(),
        ttl: Duration::from_secs(24 * 3600),
        metrics: metrics.clone(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (_tls_tx, tls_rx) = tokio::sync::watch::channel(material.server_config()?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(serve_https(
        listener,
        tls_rx,
        https_router(webhook, identity),
        stop_rx,
        Duration::from_secs(5),
    ));
    // The name in the certificate; resolved to the local listener.
    let base = format!(
        "https://medmesh-operator.medmesh-system.svc:{}",
        addr.port()
    );
    let http = client(
        &material.bundle_pem,
        "medmesh-operator.medmesh-system.svc",
        addr,
    )?;

    // Admission: the fixtures in turn, open loop.
    let bodies: Vec<bytes::Bytes> = [
        "admission-pod-create-from-replicaset.json",
        "admission-pod-create-from-statefulset.json",
        "admission-pod-create-direct-with-init-container.json",
        "admission-pod-create-dry-run.json",
    ]
    .iter()
    .map(|n| bytes::Bytes::from(fixture(n)))
    .collect();
    // Warm-up: connections and code paths.
    for b in &bodies {
        http.post(format!("{base}/mutate"))
            .header("content-type", "application/json")
            .body(b.clone())
            .send()
            .await?
            .error_for_status()?;
    }
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        tick.tick().await;
        let http = http.clone();
        let body = bodies[(i as usize) % bodies.len()].clone();
        let url = format!("{base}/mutate");
        tasks.spawn(async move {
            let t = Instant::now();
            let r = http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .and_then(reqwest::Response::error_for_status);
            let ok = match r {
                Ok(resp) => resp.bytes().await.is_ok(),
                Err(_) => false,
            };
            (t.elapsed(), ok)
        });
    }
    let mut lat = Vec::with_capacity(total as usize);
    let mut failed = 0u64;
    while let Some(r) = tasks.join_next().await {
        let (d, ok) = r?;
        if !ok {
            failed += 1;
        }
        lat.push(d);
    }
    lat.sort();
    let p50 = percentile(&lat, 0.50);
    let p99 = percentile(&lat, 0.99);
    eprintln!(
        "admission: {total} requests at {rate}/s, {failed} failed, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );

    // Identity: CSRs made beforehand (the sidecar's work), then closed-loop clients.
    let mut csrs = Vec::new();
    for _ in 0..concurrency {
        let key = rcgen::KeyPair::generate()?;
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
        p.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://cluster.local/ns/radiology/sa/modality".try_into()?,
        )];
        csrs.push(p.serialize_request(&key)?.pem()?);
    }
    let issued = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(cert_seconds);
    let start = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for csr in csrs {
        let http = http.clone();
        let body = serde_json::json!({"csr": csr, "token": token}).to_string();
        let url = format!("{base}/v1/certificate");
        let (issued, refused) = (issued.clone(), refused.clone());
        clients.spawn(async move {
            while Instant::now() < deadline {
                let ok = match http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                };
                if ok { &issued } else { &refused }.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while clients.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    let n = issued.load(Ordering::Relaxed);
    let certs_per_s = n as f64 / elapsed;
    eprintln!(
        "identity: {n} certificates in {elapsed:.1} s with {concurrency} clients ({} refused), {certs_per_s:.0}/s",
        refused.load(Ordering::Relaxed)
    );

    let _ = stop_tx.send(true);
    let _ = server.await;
    if failed > 0 || n == 0 || refused.load(Ordering::Relaxed) > 0 {
        anyhow::bail!("requests failed");
    }
    println!(
        "operator-bench admission_p99_ms={:.2} certs_per_s={:.0}",
        p99.as_secs_f64() * 1e3,
        certs_per_s
    );
    Ok(())
}
