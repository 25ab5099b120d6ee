//! What the cluster tests share: the environment `scripts/cluster-e2e up` prints (a real API
//! server, the chart installed, two operator replicas running as the chart's ServiceAccount),
//! polling, and a namespace per test.
//!
//! Nothing here skips: without that environment every test fails with the command to run.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};

/// How long a test waits for the cluster to converge.
pub const WAIT: Duration = Duration::from_secs(60);

/// The environment of `scripts/cluster-e2e up`.
#[derive(Debug, Clone)]
pub struct Env {
    /// The operators' HTTPS base URL (webhook and identity service), e.g. `https://127.0.0.1:18443`.
    pub url: String,
    /// The operators' namespace.
    pub namespace: String,
    /// The MutatingWebhookConfiguration the chart installed.
    pub webhook: String,
    /// The operators' ServiceAccount (the chart's).
    pub service_account: String,
    /// `name=admin address` of each operator replica.
    pub operators: Vec<(String, String)>,
    /// The harness directory (operator PIDs and logs).
    pub dir: std::path::PathBuf,
    /// The API server's service-account signing key (PEM file) and token issuer: the expired
    /// token case signs its own token (the server mints none shorter than 10 minutes).
    pub sa_key: std::path::PathBuf,
    /// `--service-account-issuer` of the API server.
    pub sa_issuer: String,
    /// The namespace and address of the one ledger a test runs (`<ns>/ledger=<addr>`; the
    /// operators connect to `ledger.<ns>.svc:8443` there).
    pub ledger: (String, String),
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests need a real API server with medmesh installed. Run\n  \
             eval \"$(scripts/k8s up)\" && eval \"$(scripts/cluster-e2e up)\"\n\
             (scripts/check does), or see README.md for any other cluster"
        )
    })
}

impl Env {
    /// Reads the environment, panicking with the command to run when it is missing.
    pub fn get() -> Self {
        var("KUBECONFIG");
        let operators = var("MEDMESH_E2E_OPERATORS")
            .split(',')
            .filter_map(|p| p.split_once('='))
            .map(|(n, a)| (n.to_owned(), a.to_owned()))
            .collect();
        Self {
            url: var("MEDMESH_E2E_URL"),
            namespace: var("MEDMESH_E2E_NAMESPACE"),
            webhook: var("MEDMESH_E2E_WEBHOOK"),
            service_account: var("MEDMESH_E2E_SERVICE_ACCOUNT"),
            operators,
            dir: var("MEDMESH_E2E_DIR").into(),
            sa_key: var("MEDMESH_E2E_SA_KEY").into(),
            sa_issuer: var("MEDMESH_E2E_SA_ISSUER"),
            ledger: var("MEDMESH_E2E_LEDGER")
                .split_once("/ledger=")
                .map(|(n, a)| (n.to_owned(), a.to_owned()))
                .expect("MEDMESH_E2E_LEDGER: <namespace>/ledger=<addr>"),
        }
    }

    /// The admin client (the tests' own actions; the operators use their ServiceAccount).
    pub async fn client() -> Client {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        Client::try_default()
            .await
            .expect("a client from KUBECONFIG")
    }

    /// The operators' serving CA, as they wrote it into the webhook configuration.
    pub async fn bundle(&self, client: &Client) -> String {
        let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        let name = self.webhook.clone();
        eventually("caBundle", || {
            let hooks = hooks.clone();
            let name = name.clone();
            async move {
                let w = hooks.get(&name).await.ok()?;
                let cc = w.webhooks?.into_iter().next()?.client_config;
                cc.ca_bundle
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            }
        })
        .await
    }

    /// `system:serviceaccount:<ns>:<sa>`: the operators' user name.
    pub fn operator_user(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

/// A document of the namespace's policy ConfigMap (`policy.json`, `audit.json`), once published.
pub async fn policy_doc(ns: &TestNs, key: &str) -> Option<String> {
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = ns.api();
    cms.get("medmesh-policy").await.ok()?.data?.remove(key)
}

/// Polls `f` until it returns `Some`, for at most [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_for(what, WAIT, f).await
}

/// Polls `f` every 250 ms until it returns `Some`, for at most `limit`.
pub async fn eventually_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Gets `name`, waiting for it to exist.
pub async fn get<K>(api: &Api<K>, name: &str) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(name, || {
        let api = api.clone();
        let name = name.to_owned();
        async move { api.get(&name).await.ok() }
    })
    .await
}

/// Waits for `name` to be gone (deleted and garbage-collected).
pub async fn gone<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(&format!("{name} to be deleted"), || {
        let api = api.clone();
        let name = name.to_owned();
        async move { matches!(api.get_opt(&name).await, Ok(None)).then_some(()) }
    })
    .await;
}

/// A fresh namespace for one test, deleted when dropped.
pub struct TestNs {
    /// Admin client.
    pub client: Client,
    /// The namespace.
    pub name: String,
}

impl TestNs {
    /// Creates `<prefix>-<random>`, labelled for injection when `inject`, and waits for its
    /// default ServiceAccount (pods need it).
    pub async fn new(prefix: &str, inject: bool) -> Self {
        let mut rnd = [0u8; 4];
        getrandom::fill(&mut rnd).expect("random bytes");
        Self::named(&format!("{prefix}-{}", hex::encode(rnd)), inject).await
    }

    /// Creates namespace `name`, first waiting for a namespace of that name left by an earlier
    /// run to be deleted.
    pub async fn named(name: &str, inject: bool) -> Self {
        let client = Env::client().await;
        let name = name.to_owned();
        let namespaces: Api<Namespace> = Api::all(client.clone());
        if namespaces
            .get_opt(&name)
            .await
            .expect("get namespace")
            .is_some()
        {
            let _ = namespaces.delete(&name, &DeleteParams::default()).await;
            gone(&namespaces, &name).await;
        }
        let mut labels = BTreeMap::new();
        if inject {
            labels.insert("medmesh.io/inject".to_owned(), "enabled".to_owned());
        }
        Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some(labels),
                        ..ObjectMeta::default()
                    },
                    ..Namespace::default()
                },
            )
            .await
            .expect("create the test namespace");
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(client.clone(), &name);
        get(&sas, "default").await;
        Self { client, name }
    }

    /// An API for `K` in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        // The runtime may be shutting down: delete through kubectl, not a spawned task.
        let _ = std::process::Command::new("kubectl")
            .args(["delete", "namespace", &self.name, "--wait=false"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Deletes `name` in the foreground (children first) and waits until it is gone.
pub async fn delete_and_wait<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.delete(name, &DeleteParams::default())
        .await
        .expect("delete");
    gone(api, name).await;
}

/// Runs kubectl (from PATH: `scripts/k8s env` puts the built one first) with the test's
/// KUBECONFIG; returns (success, stdout, stderr).
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("kubectl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl on PATH (scripts/k8s env)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A PersistentVolume pre-bound to claim `claim` in `ns` (static provisioning: the control
/// plane has no dynamic provisioner, so a StatefulSet's claims would stay Pending), for the
/// real PV controller to bind. Deleted when the claim is (reclaim policy Delete is refused
/// without a provisioner for hostPath, so Retain; the name is unique per namespace).
pub async fn volume_for(client: &Client, ns: &str, claim: &str, size: &str) {
    let pvs: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(client.clone());
    let pv = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": format!("{ns}-{claim}"), "labels": {"medmesh.io/e2e": "true"}},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": format!("/tmp/medmesh-e2e-pv/{ns}/{claim}")},
            "claimRef": {"namespace": ns, "name": claim},
        },
    }))
    .expect("PersistentVolume");
    // One left by an earlier run in a namespace of the same name is released, not reused.
    let name = format!("{ns}-{claim}");
    if pvs
        .get_opt(&name)
        .await
        .expect("get PersistentVolume")
        .is_some()
    {
        delete_and_wait(&pvs, &name).await;
    }
    pvs.create(&PostParams::default(), &pv)
        .await
        .expect("create PersistentVolume");
}

/// Kills the child when dropped.
pub struct Kill(pub std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A workspace binary, through `CARGO_TARGET_DIR` when it is set.
pub fn target_bin(name: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        Into::into,
    );
    let p = dir.join("debug").join(name);
    assert!(
        p.exists(),
        "{} not built: cargo build --workspace --bins",
        p.display()
    );
    p
}

/// The replicas of AuditLedger `name` in `ns`, run here as the real ledger binary on what the
/// StatefulSet would mount (the operator's Secrets and ConfigMap, read from the server) under
/// a temporary root. The last replica listens on `addr` (where the operators were told, with
/// --resolve, that the ledger's Service is); with several, the others on free ports, each
/// replica's stable headless-Service name dialled through the ledger's `resolve` as a pod's
/// DNS would.
pub struct RunningLedger {
    /// The ConfigMap's data (origin, verifier key, per-replica configuration).
    pub data: BTreeMap<String, String>,
    /// The API address.
    pub addr: String,
    _processes: Vec<Kill>,
    _dir: tempfile::TempDir,
}

pub async fn run_ledger(ns: &TestNs, name: &str, addr: &str, replicas: usize) -> RunningLedger {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    let key: Secret = get(&ns.api(), &format!("{name}-signing-key")).await;
    let tls: Secret = get(&ns.api(), &format!("{name}-tls")).await;
    let cm: ConfigMap = get(&ns.api(), &format!("{name}-config")).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let write = |path: String, bytes: &[u8]| {
        let p = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    };
    for (k, v) in key.data.unwrap() {
        write(format!("/etc/medmesh/signing/{k}"), &v.0);
    }
    for (k, v) in tls.data.unwrap() {
        write(format!("/etc/medmesh/tls/{k}"), &v.0);
    }
    let data = cm.data.unwrap();
    let free = || format!("127.0.0.1:{}", medmesh_core::devnet::free_port().unwrap());
    let apis: Vec<String> = (0..replicas)
        .map(|i| {
            if i + 1 == replicas {
                addr.to_owned()
            } else {
                free()
            }
        })
        .collect();
    let resolve: String = (0..replicas)
        .map(|j| {
            format!(
                "  {name}-{j}.{name}-headless.{}.svc:8443: {}\n",
                ns.name, apis[j]
            )
        })
        .collect();
    let mut processes = Vec::new();
    let mut admins = Vec::new();
    for (i, api) in apis.iter().enumerate() {
        let admin = free();
        let mut yaml = data[&format!("{name}-{i}.yaml")]
            .replace("/etc/medmesh/", &format!("{}/etc/medmesh/", root.display()))
            .replace(
                "/var/lib/medmesh/",
                &format!("{}/replica-{i}/var/lib/medmesh/", root.display()),
            )
            .replace("0.0.0.0:8443", api)
            .replace("0.0.0.0:9090", &admin);
        if replicas > 1 {
            yaml.push_str(&format!("resolve:\n{resolve}"));
        }
        let config = root.join(format!("ledger-{i}.yaml"));
        std::fs::write(&config, &yaml).unwrap();
        let log = std::fs::File::create(root.join(format!("ledger-{i}.log"))).unwrap();
        processes.push(Kill(
            std::process::Command::new(target_bin("medmesh-ledger"))
                .env("MEDMESH_LEDGER_CONFIG", &config)
                .arg("run")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        ));
        admins.push(admin);
    }
    // Ready (its admin listener answers) before anything is asked of it; a ledger that exits
    // (a port taken, a configuration refused) fails here with its log.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for (i, admin) in admins.iter().enumerate() {
        let log =
            || std::fs::read_to_string(root.join(format!("ledger-{i}.log"))).unwrap_or_default();
        loop {
            if let Some(status) = processes[i].0.try_wait().unwrap() {
                panic!(
                    "ledger replica {i} exited ({status}) on the operator's configuration:\n{}\n{}",
                    std::fs::read_to_string(root.join(format!("ledger-{i}.yaml")))
                        .unwrap_or_default(),
                    log()
                );
            }
            let ready = reqwest::get(format!("http://{admin}/ready"))
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ledger replica {i} did not become ready:\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    RunningLedger {
        data,
        addr: addr.to_owned(),
        _processes: processes,
        _dir: dir,
    }
}

/// Signs `data` with RSA PKCS#1 v1.5 and SHA-256 under the PEM key at `key` (openssl);
/// returns (success, signature, stderr).
pub fn openssl_sign(key: &std::path::Path, data: &[u8]) -> (bool, Vec<u8>, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
