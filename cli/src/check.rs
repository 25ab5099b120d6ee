//! `medmesh check`: is medmesh healthy in the cluster of the current kubeconfig? Like
//! `linkerd check`: a list of checks by category, each ✓ (passed), ‼ (warning) or ✗ (failed)
//! with a one-line hint, and a non-zero exit status if any failed; `--output json` for tools.
//!
//! What is read first (the API server's state, the ledgers' checkpoints, a server-side dry run
//! of a Pod through the webhook) is separate from the decisions, which are pure functions of
//! what was read and the time ([`evaluate`]), so that every verdict is unit-tested.
//! Nothing is written to the cluster: the webhook probe is a dry run.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use medmesh_core::TrustDomain;
use medmesh_operator::controller::audit_ledger::{
    CheckpointReader, ClientCheckpointReader, LedgerTarget, Names, VERIFIER_KEY,
};
use medmesh_operator::crd::{self, AuditLedger, MeshPolicy};
use medmesh_operator::identity::IssuerCa;
use medmesh_operator::names::{
    INJECT_LABEL, INJECTED_ANNOTATION, OPERATOR_VERSION_ANNOTATION, VERSION,
};
use medmesh_operator::resolve::Resolve;
use serde::Serialize;

/// Oldest Kubernetes minor version served: native sidecars (`restartPolicy: Always` init
/// containers) are on by default from 1.29.
const MIN_MINOR: u32 = 29;

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The operator's namespace.
    #[arg(long, default_value = "medmesh-system")]
    namespace: String,
    /// The MutatingWebhookConfiguration of the injector.
    #[arg(long, default_value = "medmesh-sidecar-injector")]
    webhook: String,
    /// The operator's leader-election Lease (in its namespace).
    #[arg(long, default_value = "medmesh-operator")]
    lease: String,
    /// The operator's Deployment and Service name (its SPIFFE ID reads ledgers).
    #[arg(long, default_value = "medmesh-operator")]
    operator: String,
    /// The Secret of the workload-identity CA (in the operator's namespace).
    #[arg(long, default_value = "medmesh-identity-ca")]
    ca_secret: String,
    /// The mesh trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Fail when the identity CA expires within this many days.
    #[arg(long, default_value_t = 30)]
    min_ca_days: u64,
    /// Fail when a ledger's checkpoint in its status is older than this many seconds.
    #[arg(long, default_value_t = 300)]
    max_checkpoint_age: u64,
    /// Out of cluster: reach HOST:PORT (a ledger's Service) at ADDR:PORT, as curl's --resolve.
    #[arg(long = "resolve", value_name = "HOST:PORT=ADDR:PORT")]
    resolve: Vec<String>,
    /// `text` (✓/‼/✗ per check) or `json`.
    #[arg(long, short = 'o', default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Passed.
    Success,
    /// Worth a look; does not fail the run.
    Warning,
    /// Failed.
    Error,
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// Category (`kubernetes-api`, `medmesh-crds`, ...).
    pub category: &'static str,
    /// What was checked.
    pub description: String,
    /// The verdict.
    pub result: Verdict,
    /// What was found (a version, a time left, an error).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// What to do about a warning or failure.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hint: String,
}

fn pass(
    category: &'static str,
    description: impl Into<String>,
    detail: impl Into<String>,
) -> Outcome {
    Outcome {
        category,
        description: description.into(),
        result: Verdict::Success,
        detail: detail.into(),
        hint: String::new(),
    }
}

fn fail(
    category: &'static str,
    description: impl Into<String>,
    detail: impl Into<String>,
    hint: impl Into<String>,
) -> Outcome {
    Outcome {
        category,
        description: description.into(),
        result: Verdict::Error,
        detail: detail.into(),
        hint: hint.into(),
    }
}

fn warn(
    category: &'static str,
    description: impl Into<String>,
    detail: impl Into<String>,
    hint: impl Into<String>,
) -> Outcome {
    Outcome {
        result: Verdict::Warning,
        ..fail(category, description, detail, hint)
    }
}

/// What a ledger's own client saw, independently of the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerProbe {
    /// Tree size and root (base64) of the verified checkpoint.
    pub checkpoint: Result<(u64, String), String>,
}

/// Everything the decisions need, read from the cluster.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// `major.minor` and git version of the API server.
    pub version: Option<(u32, u32, String)>,
    /// CRDs by name, as stored.
    pub crds: BTreeMap<String, Option<CustomResourceDefinition>>,
    /// The leader-election Lease.
    pub lease: Option<Lease>,
    /// The operator's Deployment (absent when it runs out of cluster).
    pub deployment: Option<Deployment>,
    /// The webhook configuration.
    pub webhook: Option<MutatingWebhookConfiguration>,
    /// Result of a dry-run Pod creation in a labelled namespace (`None`: no such namespace).
    pub webhook_probe: Option<(String, Result<Pod, String>)>,
    /// The identity CA Secret.
    pub ca_secret: Option<Secret>,
    /// Every AuditLedger, with the independent read of its checkpoint.
    pub ledgers: Vec<(AuditLedger, LedgerProbe)>,
    /// Namespaces labelled for injection, with their MeshPolicy count.
    pub meshed: Vec<(String, usize)>,
    /// Injected Pods: `ns/name` and their injected version.
    pub injected: Vec<(String, String)>,
}

/// Settings of the decisions.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Operator namespace (for messages).
    pub namespace: String,
    /// Webhook configuration name (for messages).
    pub webhook: String,
    /// Minimum CA lifetime left.
    pub min_ca: Duration,
    /// Oldest acceptable checkpoint in a status.
    pub max_checkpoint_age: Duration,
}

/// The verdicts, in the order they are printed.
pub fn evaluate(s: &Snapshot, limits: &Limits, now: SystemTime) -> Vec<Outcome> {
    let mut out = Vec::new();
    api_checks(s, &mut out);
    crd_checks(s, &mut out);
    operator_checks(s, limits, now, &mut out);
    webhook_checks(s, limits, now, &mut out);
    identity_checks(s, limits, now, &mut out);
    ledger_checks(s, limits, now, &mut out);
    data_plane_checks(s, &mut out);
    out
}

fn api_checks(s: &Snapshot, out: &mut Vec<Outcome>) {
    const C: &str = "kubernetes-api";
    match &s.version {
        Some((major, minor, git)) => {
            out.push(pass(C, "can reach the API server", git.clone()));
            if *major == 1 && *minor >= MIN_MINOR {
                out.push(pass(
                    C,
                    "API server version is supported",
                    format!("1.{minor} >= 1.{MIN_MINOR}"),
                ));
            } else {
                out.push(fail(
                    C,
                    "API server version is supported",
                    format!("{major}.{minor} < 1.{MIN_MINOR}"),
                    "medmesh injects native sidecars, which need Kubernetes 1.29 or later",
                ));
            }
        }
        None => out.push(fail(
            C,
            "can reach the API server",
            "no answer",
            "check KUBECONFIG and the current context",
        )),
    }
}

fn crd_checks(s: &Snapshot, out: &mut Vec<Outcome>) {
    const C: &str = "medmesh-crds";
    for want in crd::all() {
        let name = want.name_any();
        let what = format!("CRD {name} is installed at this version ({VERSION})");
        let Some(Some(have)) = s.crds.get(&name) else {
            out.push(fail(
                C,
                what,
                "not found",
                "install the chart, or kubectl apply -f crds/ from this release",
            ));
            continue;
        };
        let established = have
            .status
            .as_ref()
            .and_then(|st| st.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
        if !established {
            out.push(fail(
                C,
                what,
                "not Established",
                format!("kubectl describe crd {name}"),
            ));
            continue;
        }
        let schemas =
            |c: &CustomResourceDefinition| -> Vec<(String, bool, Option<serde_json::Value>)> {
                c.spec
                    .versions
                    .iter()
                    .map(|v| {
                        (
                            v.name.clone(),
                            v.served,
                            v.schema
                                .as_ref()
                                .and_then(|s| serde_json::to_value(&s.open_api_v3_schema).ok()),
                        )
                    })
                    .collect()
            };
        if schemas(have) == schemas(&want) {
            out.push(pass(C, what, ""));
        } else {
            out.push(fail(
                C,
                what,
                "the stored schema differs from this release's",
                "upgrade the chart (CRDs are kept across releases) or kubectl apply -f crds/",
            ));
        }
    }
}

fn operator_checks(s: &Snapshot, limits: &Limits, now: SystemTime, out: &mut Vec<Outcome>) {
    const C: &str = "medmesh-operator";
    let lease = s.lease.as_ref().and_then(|l| l.spec.as_ref());
    let holder = lease
        .and_then(|l| l.holder_identity.clone())
        .filter(|h| !h.is_empty());
    let renewed = lease.and_then(|l| l.renew_time.as_ref()).map(|t| {
        SystemTime::UNIX_EPOCH + Duration::from_micros(t.0.as_microsecond().max(0).unsigned_abs())
    });
    let duration = lease
        .and_then(|l| l.lease_duration_seconds)
        .map_or(Duration::ZERO, |d| {
            Duration::from_secs(u64::try_from(d).unwrap_or(0))
        });
    match (holder, renewed) {
        (Some(h), Some(r)) if r + duration >= now => {
            let ago = now.duration_since(r).unwrap_or_default().as_secs();
            out.push(pass(
                C,
                "an operator replica is leading",
                format!("{h}, renewed {ago} s ago"),
            ));
        }
        (Some(h), _) => out.push(fail(
            C,
            "an operator replica is leading",
            format!("the Lease of {h} has expired"),
            format!(
                "is the operator running? kubectl -n {} logs deploy/medmesh-operator",
                limits.namespace
            ),
        )),
        (None, _) => out.push(fail(
            C,
            "an operator replica is leading",
            "no holder",
            format!(
                "is the operator running? kubectl -n {} get pods",
                limits.namespace
            ),
        )),
    }
    match &s.deployment {
        Some(d) => {
            let ready = d
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            if ready >= 1 {
                out.push(pass(
                    C,
                    "operator pods are ready",
                    format!("{ready}/{want}"),
                ));
            } else {
                out.push(fail(
                    C,
                    "operator pods are ready",
                    format!("{ready}/{want}"),
                    format!(
                        "kubectl -n {} describe deploy/medmesh-operator",
                        limits.namespace
                    ),
                ));
            }
        }
        None => out.push(warn(
            C,
            "operator pods are ready",
            "no Deployment: the operator runs out of cluster",
            "expected only with the chart's operator.enabled=false",
        )),
    }
}

fn pem_validity(pem: &[u8]) -> Result<Vec<(SystemTime, SystemTime)>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let mut out = Vec::new();
    for der in CertificateDer::pem_slice_iter(pem) {
        let der = der.map_err(|e| format!("PEM: {e}"))?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| format!("X.509: {e}"))?;
        let v = cert.validity();
        let t = |t: &x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
        };
        out.push((t(&v.not_before), t(&v.not_after)));
    }
    if out.is_empty() {
        return Err("no certificate".into());
    }
    Ok(out)
}

fn webhook_checks(s: &Snapshot, limits: &Limits, now: SystemTime, out: &mut Vec<Outcome>) {
    const C: &str = "medmesh-webhook";
    let what = format!("webhook {} has a valid caBundle", limits.webhook);
    let Some(w) = &s.webhook else {
        out.push(fail(C, what, "not found", "install the chart"));
        return;
    };
    let bundle = w
        .webhooks
        .as_ref()
        .and_then(|h| h.first())
        .and_then(|h| h.client_config.ca_bundle.as_ref());
    match bundle.map(|b| pem_validity(&b.0)) {
        None => out.push(fail(
            C,
            what,
            "no caBundle",
            "the operator writes it once its serving certificate exists: is it running?",
        )),
        Some(Err(e)) => out.push(fail(
            C,
            what,
            e,
            "delete the caBundle; the operator writes it again",
        )),
        Some(Ok(v)) if v.iter().all(|(nb, na)| *nb <= now && now < *na) => {
            out.push(pass(
                C,
                what,
                format!("{} certificate(s) valid now", v.len()),
            ));
        }
        Some(Ok(_)) => out.push(fail(
            C,
            what,
            "a certificate is expired or not yet valid",
            format!(
                "delete Secret {}/medmesh-operator-serving; the operator re-issues it",
                limits.namespace
            ),
        )),
    }
    match &s.webhook_probe {
        None => out.push(warn(
            C,
            "the webhook injects Pods",
            format!("no namespace labelled {INJECT_LABEL}=enabled to probe"),
            format!("kubectl label namespace <ns> {INJECT_LABEL}=enabled"),
        )),
        Some((ns, Ok(pod))) => {
            let injected = pod
                .spec
                .as_ref()
                .and_then(|s| s.init_containers.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.name == "medmesh-sidecar"));
            if injected {
                out.push(pass(
                    C,
                    "the webhook injects Pods",
                    format!("dry run in {ns}"),
                ));
            } else {
                out.push(fail(
                    C,
                    "the webhook injects Pods",
                    format!("a dry-run Pod in {ns} came back without the sidecar"),
                    "check the webhook's namespaceSelector and objectSelector",
                ));
            }
        }
        Some((ns, Err(e))) => out.push(fail(
            C,
            "the webhook injects Pods",
            format!("dry run in {ns}: {e}"),
            format!(
                "is the operator serving? kubectl -n {} logs deploy/medmesh-operator",
                limits.namespace
            ),
        )),
    }
}

fn identity_checks(s: &Snapshot, limits: &Limits, now: SystemTime, out: &mut Vec<Outcome>) {
    const C: &str = "medmesh-identity";
    let what = format!(
        "identity CA is valid for at least {} days",
        limits.min_ca.as_secs() / 86_400
    );
    let Some(secret) = &s.ca_secret else {
        out.push(fail(
            C,
            what,
            "Secret not found",
            "the operator bootstraps it at start: is it running?",
        ));
        return;
    };
    let pem = secret
        .data
        .as_ref()
        .and_then(|d| d.get("ca.crt").or_else(|| d.get("tls.crt")))
        .map(|b| b.0.clone())
        .unwrap_or_default();
    match pem_validity(&pem) {
        Err(e) => out.push(fail(
            C,
            what,
            e,
            "the Secret holds no usable CA certificate",
        )),
        Ok(v) => {
            let soonest = v.iter().map(|(_, na)| *na).min().unwrap_or(now);
            let left = soonest.duration_since(now).unwrap_or_default();
            let days = left.as_secs() / 86_400;
            if left >= limits.min_ca {
                out.push(pass(C, what, format!("{days} days left")));
            } else {
                out.push(fail(
                    C,
                    what,
                    format!("{days} days left"),
                    "rotate the identity CA (docs/operations) before workloads lose their identity",
                ));
            }
        }
    }
}

fn ledger_checks(s: &Snapshot, limits: &Limits, now: SystemTime, out: &mut Vec<Outcome>) {
    const C: &str = "medmesh-ledgers";
    if s.ledgers.is_empty() {
        out.push(warn(
            C,
            "audit ledgers",
            "no AuditLedger",
            "transfers are not recorded without one",
        ));
        return;
    }
    for (l, probe) in &s.ledgers {
        let id = format!("{}/{}", l.namespace().unwrap_or_default(), l.name_any());
        let status = l.status.clone().unwrap_or_default();
        let cond = |t: &str| status.conditions.iter().find(|c| c.type_ == t).cloned();
        let current = status.observed_generation == l.metadata.generation;
        match (cond("Ready"), cond("Degraded")) {
            (Some(r), d)
                if r.status == "True"
                    && current
                    && d.as_ref().is_none_or(|d| d.status != "True") =>
            {
                out.push(pass(C, format!("ledger {id} is Ready"), r.message));
            }
            (r, d) => {
                let why = d.filter(|d| d.status == "True").or(r).map_or_else(
                    || "no status yet".to_owned(),
                    |c| format!("{}: {}", c.reason, c.message),
                );
                out.push(fail(
                    C,
                    format!("ledger {id} is Ready"),
                    why,
                    format!(
                        "kubectl -n {} describe auditledger {}",
                        l.namespace().unwrap_or_default(),
                        l.name_any()
                    ),
                ));
            }
        }
        let Some(cp) = &status.checkpoint else {
            out.push(fail(
                C,
                format!("ledger {id} has a fresh checkpoint"),
                "none read yet",
                "the operator reads it once a replica is ready",
            ));
            continue;
        };
        let read_at = SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(cp.time.0.as_second()).unwrap_or(0));
        let age = now.duration_since(read_at).unwrap_or_default();
        if age <= limits.max_checkpoint_age {
            out.push(pass(
                C,
                format!("ledger {id} has a fresh checkpoint"),
                format!("tree size {}, read {} s ago", cp.tree_size, age.as_secs()),
            ));
        } else {
            out.push(fail(
                C,
                format!("ledger {id} has a fresh checkpoint"),
                format!(
                    "read {} s ago (limit {} s)",
                    age.as_secs(),
                    limits.max_checkpoint_age.as_secs()
                ),
                "is the operator leading, and can it reach the ledger?",
            ));
        }
        let what = format!("ledger {id} checkpoint verifies here");
        match &probe.checkpoint {
            Err(e) => out.push(fail(
                C,
                what,
                e.clone(),
                "out of cluster, pass --resolve <ledger>.<ns>.svc:8443=<addr:port>",
            )),
            Ok((size, root)) => {
                let seen = u64::try_from(cp.tree_size).unwrap_or(u64::MAX);
                if *size < seen {
                    out.push(fail(
                        C,
                        what,
                        format!("tree size {size} is smaller than the {seen} the operator saw"),
                        "the ledger rolled back: treat it as tampered and investigate",
                    ));
                } else if *size == seen && *root != cp.root_hash {
                    out.push(fail(
                        C,
                        what,
                        format!("root at size {size} differs from the operator's"),
                        "two roots for one size: a forked ledger, investigate",
                    ));
                } else {
                    out.push(pass(
                        C,
                        what,
                        format!("signed checkpoint of size {size} verified"),
                    ));
                }
            }
        }
    }
}

/// `Ok(detail)` passes; `Err((detail, hint))` fails.
fn judged(
    category: &'static str,
    description: &str,
    result: Result<String, (String, &str)>,
) -> Outcome {
    match result {
        Ok(detail) => pass(category, description, detail),
        Err((detail, hint)) => fail(category, description, detail, hint),
    }
}

fn data_plane_checks(s: &Snapshot, out: &mut Vec<Outcome>) {
    const C: &str = "medmesh-data-plane";
    let bare: Vec<&str> = s
        .meshed
        .iter()
        .filter(|(_, n)| *n == 0)
        .map(|(ns, _)| ns.as_str())
        .collect();
    out.push(judged(
        C,
        "meshed namespaces have a MeshPolicy",
        if bare.is_empty() {
            Ok(format!("{} namespace(s)", s.meshed.len()))
        } else {
            Err((
                format!("none in {}: all inbound traffic is denied", bare.join(", ")),
                "apply a MeshPolicy allowing the peers each workload needs",
            ))
        },
    ));
    // The version the leading operator stamped on its Lease; this release's without one.
    let current = s
        .lease
        .as_ref()
        .and_then(|l| l.metadata.annotations.as_ref())
        .and_then(|a| a.get(OPERATOR_VERSION_ANNOTATION))
        .map_or(VERSION, String::as_str);
    let stale: Vec<String> = s
        .injected
        .iter()
        .filter(|(_, v)| v != current)
        .map(|(p, v)| format!("{p} ({v})"))
        .collect();
    out.push(judged(
        C,
        "injected Pods run the operator's sidecar version",
        if stale.is_empty() {
            Ok(format!("{} Pod(s) at {current}", s.injected.len()))
        } else {
            Err((
                format!("{} not at {current}: {}", stale.len(), stale.join(", ")),
                "kubectl rollout restart their workloads to inject the current sidecar",
            ))
        },
    ));
}

async fn gather(
    client: &Client,
    args: &CheckArgs,
    td: &TrustDomain,
    resolve: &Resolve,
) -> Snapshot {
    let mut s = Snapshot::default();
    let Ok(info) = client.apiserver_version().await else {
        return s;
    };
    let digits = |v: &str| v.trim_end_matches('+').parse::<u32>().unwrap_or(0);
    s.version = Some((digits(&info.major), digits(&info.minor), info.git_version));

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for c in crd::all() {
        let name = c.name_any();
        s.crds
            .insert(name.clone(), crds.get_opt(&name).await.ok().flatten());
    }
    let ns = &args.namespace;
    s.lease = Api::<Lease>::namespaced(client.clone(), ns)
        .get_opt(&args.lease)
        .await
        .ok()
        .flatten();
    s.deployment = Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt(&args.operator)
        .await
        .ok()
        .flatten();
    s.webhook = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get_opt(&args.webhook)
        .await
        .ok()
        .flatten();
    s.ca_secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(&args.ca_secret)
        .await
        .ok()
        .flatten();

    // Namespaces being deleted are left out: nothing new starts there.
    let terminating: std::collections::BTreeSet<String> = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.metadata.deletion_timestamp.is_some())
        .map(|n| n.name_any())
        .collect();
    let meshed: Vec<Namespace> = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{INJECT_LABEL}=enabled")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|n| !terminating.contains(&n.name_any()))
        .collect();
    for n in &meshed {
        let name = n.name_any();
        let policies = Api::<MeshPolicy>::namespaced(client.clone(), &name)
            .list(&ListParams::default())
            .await
            .map_or(0, |l| l.items.len());
        s.meshed.push((name.clone(), policies));
        for p in Api::<Pod>::namespaced(client.clone(), &name)
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
        {
            if let Some(v) = p.annotations().get(INJECTED_ANNOTATION) {
                s.injected
                    .push((format!("{name}/{}", p.name_any()), v.clone()));
            }
        }
    }
    if let Some(first) = meshed.first() {
        let name = first.name_any();
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "medmesh-check-"},
            "spec": {"containers": [{"name": "probe", "image": "medmesh.invalid/check:0"}]},
        }))
        .unwrap_or_default();
        let dry = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        let r = Api::<Pod>::namespaced(client.clone(), &name)
            .create(&dry, &pod)
            .await
            .map_err(|e| e.to_string());
        s.webhook_probe = Some((name, r));
    }

    let reader = s
        .ca_secret
        .as_ref()
        .ok_or_else(|| "no identity CA Secret".to_owned())
        .and_then(|sec| IssuerCa::from_secret(sec).map_err(|e| e.to_string()))
        .and_then(|ca| {
            let id = td.workload(ns, &args.operator).map_err(|e| e.to_string())?;
            ClientCheckpointReader::from_ca(
                &ca,
                &id,
                td,
                Duration::from_secs(600),
                SystemTime::now(),
            )
            .map_err(|e| e.to_string())
        });
    let ledgers = Api::<AuditLedger>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    for l in ledgers {
        if terminating.contains(&l.namespace().unwrap_or_default()) {
            continue;
        }
        let checkpoint = match &reader {
            Err(e) => Err(format!("cannot read as the operator: {e}")),
            Ok(reader) => probe_ledger(client, &l, reader, td, resolve).await,
        };
        s.ledgers.push((l, LedgerProbe { checkpoint }));
    }
    s
}

async fn probe_ledger(
    client: &Client,
    l: &AuditLedger,
    reader: &ClientCheckpointReader,
    td: &TrustDomain,
    resolve: &Resolve,
) -> Result<(u64, String), String> {
    let names = Names::of(l).map_err(|e| e.to_string())?;
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &names.namespace)
        .get(&names.config)
        .await
        .map_err(|e| format!("ConfigMap {}: {e}", names.config))?;
    let data = cm.data.unwrap_or_default();
    let field = |k: &str| {
        data.get(k)
            .cloned()
            .ok_or_else(|| format!("ConfigMap {} has no {k}", names.config))
    };
    let target = LedgerTarget {
        url: resolve.apply(&names.endpoint()),
        server_id: names.server_id(td).map_err(|e| e.to_string())?,
        origin: field("origin")?,
        verifier_key: field(VERIFIER_KEY)?.trim().to_owned(),
    };
    let cp = reader.read(&target).await?;
    Ok((cp.tree_size, cp.root_hash))
}

fn print_text(outcomes: &[Outcome]) {
    let mut category = "";
    for o in outcomes {
        if o.category != category {
            if !category.is_empty() {
                println!();
            }
            category = o.category;
            println!("{category}\n{}", "-".repeat(category.len()));
        }
        let mark = match o.result {
            Verdict::Success => "✓",
            Verdict::Warning => "‼",
            Verdict::Error => "✗",
        };
        if o.detail.is_empty() {
            println!("{mark} {}", o.description);
        } else {
            println!("{mark} {} [{}]", o.description, o.detail);
        }
        if !o.hint.is_empty() {
            println!("    hint: {}", o.hint);
        }
    }
    let failed = outcomes
        .iter()
        .filter(|o| o.result == Verdict::Error)
        .count();
    println!();
    if failed == 0 {
        println!("Status check results are ✓");
    } else {
        println!("Status check results are ✗ ({failed} failed)");
    }
}

/// Runs the checks; exit status 1 if any failed.
pub async fn run(args: CheckArgs) -> anyhow::Result<std::process::ExitCode> {
    let td = TrustDomain::new(&args.trust_domain).context("--trust-domain")?;
    let resolve = Resolve::parse(&args.resolve).map_err(|e| anyhow::anyhow!(e.join("; ")))?;
    let client = Client::try_default()
        .await
        .context("no usable kubeconfig")?;
    let snapshot = gather(&client, &args, &td, &resolve).await;
    let limits = Limits {
        namespace: args.namespace.clone(),
        webhook: args.webhook.clone(),
        min_ca: Duration::from_secs(args.min_ca_days * 86_400),
        max_checkpoint_age: Duration::from_secs(args.max_checkpoint_age),
    };
    let outcomes = evaluate(&snapshot, &limits, SystemTime::now());
    let success = outcomes.iter().all(|o| o.result != Verdict::Error);
    if args.output == "json" {
        let doc = serde_json::json!({"success": success, "checks": outcomes});
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print_text(&outcomes);
    }
    Ok(if success {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

#[cfg(test)]
#[path = "check/tests.rs"]
mod tests;
