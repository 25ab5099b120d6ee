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
//! - Through a real API server (`bench/operator` brings up `scripts/k8s` and the operators of
//!   `scripts/cluster-e2e`, release build): `BENCH_CREATES` (default 500) Pods created one at a
//!   time in a namespace labelled for injection and as many in one that is not, interleaved; the
//!   p99 of the create call with the webhook minus without (and, to tell the two apart, the
//!   injected spec created where no webhook applies: the API server's own cost of the larger
//!   Pod). Then `BENCH_LEDGERS` (default 5)
//!   AuditLedgers applied one at a time: the median time until every child exists and the status
//!   is written. Skipped (and the figures absent) when `BENCH_CLUSTER` is not 1.
//!
//! Ends with: `operator-bench admission_p99_ms=<n> certs_per_s=<n> apiserver_create_p99_added_ms=<n> ledger_ready_s=<n>`.

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
            otlp_endpoint: None,
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
    let cluster = if std::env::var("BENCH_CLUSTER").as_deref() == Ok("1") {
        let (added, ready) = cluster::run().await?;
        format!(
            " apiserver_create_p99_added_ms={:.2} ledger_ready_s={:.2}",
            added * 1e3,
            ready
        )
    } else {
        String::new()
    };
    println!(
        "operator-bench admission_p99_ms={:.2} certs_per_s={:.0}{cluster}",
        p99.as_secs_f64() * 1e3,
        certs_per_s
    );
    Ok(())
}

/// The figures measured through the API server of `KUBECONFIG`.
mod cluster {
    use std::time::{Duration, Instant};

    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::core::v1::{
        ConfigMap, Namespace, PersistentVolume, Pod, Secret, Service, ServiceAccount,
    };
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use kube::Client;
    use kube::api::{Api, DeleteParams, PostParams};
    use medmesh_operator::crd::AuditLedger;
    use serde_json::json;

    use super::{env_num, percentile};

    async fn wait<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = f().await {
                return Ok(v);
            }
            anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn namespace(client: &Client, name: &str, inject: bool) -> anyhow::Result<()> {
        let nss: Api<Namespace> = Api::all(client.clone());
        if nss.get_opt(name).await?.is_some() {
            nss.delete(name, &DeleteParams::default()).await?;
            wait(&format!("namespace {name} deleted"), || async {
                matches!(nss.get_opt(name).await, Ok(None)).then_some(())
            })
            .await?;
        }
        let labels = if inject {
            json!({"medmesh.io/inject": "enabled"})
        } else {
            json!({})
        };
        nss.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))?,
        )
        .await?;
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
        wait("default ServiceAccount", || async {
            sas.get_opt("default").await.ok().flatten()
        })
        .await?;
        if inject {
            // Injection needs the policy and CA ConfigMaps the operator publishes.
            let cms: Api<ConfigMap> = Api::namespaced(client.clone(), name);
            for cm in ["medmesh-policy", "medmesh-identity-ca"] {
                wait(cm, || async { cms.get_opt(cm).await.ok().flatten() }).await?;
            }
        }
        Ok(())
    }

    fn pod(i: usize) -> anyhow::Result<Pod> {
        Ok(serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("p-{i}")},
            // Unschedulable on purpose: the figure is the create call, not the node's work.
            "spec": {"nodeSelector": {"medmesh.io/bench": "none"},
                     "containers": [{"name": "app", "image": "registry.example/app:1"}]},
        }))?)
    }

    async fn ledger_ready(client: &Client, ns: &str) -> anyhow::Result<f64> {
        let ledger: AuditLedger = serde_json::from_value(json!({
            "apiVersion": "medmesh.io/v1alpha1", "kind": "AuditLedger", "metadata": {"name": "ledger"},
            "spec": {"replicas": 1, "storage": {"size": "1Gi"}, "signingKey": {"generate": {}}},
        }))?;
        let ledgers: Api<AuditLedger> = Api::namespaced(client.clone(), ns);
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
        let sts: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
        let t0 = Instant::now();
        ledgers.create(&PostParams::default(), &ledger).await?;
        wait("children and status", || async {
            secrets.get_opt("ledger-signing-key").await.ok()??;
            secrets.get_opt("ledger-tls").await.ok()??;
            cms.get_opt("ledger-config").await.ok()??;
            svcs.get_opt("ledger").await.ok()??;
            svcs.get_opt("ledger-headless").await.ok()??;
            sts.get_opt("ledger").await.ok()??;
            pdbs.get_opt("ledger").await.ok()??;
            let l = ledgers.get("ledger").await.ok()?;
            (l.status?.observed_generation == Some(1)).then_some(())
        })
        .await?;
        Ok(t0.elapsed().as_secs_f64())
    }

    /// The API server's own timing of its calls to our webhook (the request, our answer and the
    /// patch): (calls, seconds), cumulative.
    async fn webhook_calls(client: &Client) -> anyhow::Result<(f64, f64)> {
        let metrics = client
            .request_text(http::Request::get("/metrics").body(Vec::new())?)
            .await?;
        let series = |name: &str| -> f64 {
            metrics
                .lines()
                .filter(|l| l.starts_with(name) && l.contains("name=\"inject.medmesh.io\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        Ok((
            series("apiserver_admission_webhook_admission_duration_seconds_count"),
            series("apiserver_admission_webhook_admission_duration_seconds_sum"),
        ))
    }

    /// (p99 added by the webhook to a Pod create, in seconds; median AuditLedger ready time).
    pub async fn run() -> anyhow::Result<(f64, f64)> {
        let client = Client::try_default().await?;
        let creates = usize::try_from(env_num("BENCH_CREATES", 500))?;
        namespace(&client, "bench-meshed", true).await?;
        namespace(&client, "bench-plain", false).await?;
        let meshed: Api<Pod> = Api::namespaced(client.clone(), "bench-meshed");
        let plain: Api<Pod> = Api::namespaced(client.clone(), "bench-plain");
        // Warm both paths (connections, caches) before measuring.
        for i in 0..20 {
            meshed
                .create(&PostParams::default(), &pod(1_000_000 + i)?)
                .await?;
            plain
                .create(&PostParams::default(), &pod(1_000_000 + i)?)
                .await?;
        }
        // A third series separates the webhook call from the API server's own work on the
        // larger injected Pod: the injected spec, created as it is where no webhook applies.
        let mut injected = meshed
            .create(&PostParams::default(), &pod(2_000_000)?)
            .await?;
        injected.metadata = kube::api::ObjectMeta {
            annotations: injected.metadata.annotations.take(),
            ..kube::api::ObjectMeta::default()
        };
        injected.status = None;
        let (calls0, total0) = webhook_calls(&client).await?;
        let (mut with, mut without, mut big) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..creates {
            let t = Instant::now();
            let p = meshed.create(&PostParams::default(), &pod(i)?).await?;
            with.push(t.elapsed());
            anyhow::ensure!(
                p.spec
                    .and_then(|s| s.init_containers)
                    .is_some_and(|c| c.iter().any(|c| c.name == "medmesh-sidecar")),
                "a Pod in the meshed namespace was not injected"
            );
            let t = Instant::now();
            plain.create(&PostParams::default(), &pod(i)?).await?;
            without.push(t.elapsed());
            let mut pre = injected.clone();
            pre.metadata.name = Some(format!("pre-{i}"));
            let t = Instant::now();
            plain.create(&PostParams::default(), &pre).await?;
            big.push(t.elapsed());
        }
        big.sort();
        let (calls1, total1) = webhook_calls(&client).await?;
        let (calls, total) = (calls1 - calls0, total1 - total0);
        if calls > 0.0 {
            eprintln!(
                "apiserver: its webhook calls took {:.2} ms on average ({calls} calls, as the API server times them)",
                total / calls * 1e3
            );
        }
        eprintln!(
            "apiserver: the injected spec created without the webhook: p50 {:.2} ms, p99 {:.2} ms",
            percentile(&big, 0.5).as_secs_f64() * 1e3,
            percentile(&big, 0.99).as_secs_f64() * 1e3
        );
        with.sort();
        without.sort();
        let (p99w, p99o) = (percentile(&with, 0.99), percentile(&without, 0.99));
        let (p50w, p50o) = (percentile(&with, 0.5), percentile(&without, 0.5));
        eprintln!(
            "apiserver: {creates} Pod creates each; p50 {:.2} ms with the webhook, {:.2} ms without; p99 {:.2} ms with, {:.2} ms without",
            p50w.as_secs_f64() * 1e3,
            p50o.as_secs_f64() * 1e3,
            p99w.as_secs_f64() * 1e3,
            p99o.as_secs_f64() * 1e3
        );
        let added = p99w.as_secs_f64() - p99o.as_secs_f64();

        let rounds = usize::try_from(env_num("BENCH_LEDGERS", 5))?;
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        let mut times = Vec::new();
        for r in 0..rounds {
            let ns = format!("bench-ledger-{r}");
            namespace(&client, &ns, false).await?;
            let pv_name = format!("{ns}-data");
            if pvs.get_opt(&pv_name).await?.is_some() {
                pvs.delete(&pv_name, &DeleteParams::default()).await?;
                wait("old PersistentVolume deleted", || async {
                    matches!(pvs.get_opt(&pv_name).await, Ok(None)).then_some(())
                })
                .await?;
            }
            pvs.create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": pv_name},
                    "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                             "persistentVolumeReclaimPolicy": "Retain",
                             "hostPath": {"path": format!("/tmp/medmesh-bench-pv/{ns}")},
                             "claimRef": {"namespace": ns, "name": "data-ledger-0"}},
                }))?,
            )
            .await?;
            times.push(ledger_ready(&client, &ns).await?);
        }
        times.sort_by(f64::total_cmp);
        eprintln!("ledger: apply -> children and status in {times:.2?} s");
        let nss: Api<Namespace> = Api::all(client.clone());
        for ns in ["bench-meshed", "bench-plain"]
            .into_iter()
            .map(String::from)
            .chain((0..rounds).map(|r| format!("bench-ledger-{r}")))
        {
            let _ = nss.delete(&ns, &DeleteParams::default()).await;
        }
        Ok((added, times[times.len() / 2]))
    }
}
