//! The injection webhook on AdmissionReview bodies recorded from a real API server: the patch is
//! applied to the request object, the result read as a `Pod` and checked for what was promised,
//! and validated by the real Kubernetes schemas (`kubernetes-validate --strict`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/kubernetes_validate.rs"]
mod kubernetes_validate;

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use medmesh_operator::events::{EventSink, EventType, InjectionEvent};
use medmesh_operator::metrics::{AdmissionResult, Metrics};
use medmesh_operator::webhook::{self, Admission, InjectConfig, WebhookState};
use serde_json::Value;
use tower::ServiceExt;

const DIRECT: &str = "admission-pod-create-direct-with-init-container.json";
const REPLICASET: &str = "admission-pod-create-from-replicaset.json";
const STATEFULSET: &str = "admission-pod-create-from-statefulset.json";
const DRY_RUN: &str = "admission-pod-create-dry-run.json";
const HOST_NETWORK: &str = "admission-pod-create-host-network.json";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn request(name: &str) -> (AdmissionRequest<DynamicObject>, Value) {
    let text = fixture(name);
    let raw: Value = serde_json::from_str(&text).unwrap();
    let review: AdmissionReview<DynamicObject> = serde_json::from_str(&text).unwrap();
    (review.try_into().unwrap(), raw["request"]["object"].clone())
}

fn config(native: bool) -> InjectConfig {
    InjectConfig {
        sidecar_image: "ghcr.io/medmesh/sidecar:0.1.0".into(),
        image_pull_policy: Some("IfNotPresent".into()),
        trust_domain: medmesh_core::TrustDomain::new("cluster.local").unwrap(),
        identity_url: "https://medmesh-operator.medmesh-system.svc:8443".into(),
        version: "0.1.0".into(),
        native_sidecar: native,
        otlp_endpoint: None,
    }
}

/// Applies the response's patch to the request object.
fn apply(admission: &Admission, object: &Value) -> Value {
    let patch: json_patch::Patch =
        serde_json::from_slice(admission.response.patch.as_ref().expect("a patch")).unwrap();
    let mut out = object.clone();
    json_patch::patch(&mut out, &patch).unwrap();
    out
}

fn names(cs: &[Container]) -> Vec<&str> {
    cs.iter().map(|c| c.name.as_str()).collect()
}

fn env<'a>(c: &'a Container, name: &str) -> &'a str {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
        .unwrap_or_else(|| panic!("{} has no env {name}", c.name))
}

/// Everything an injected Pod must have; `before` is the Pod as submitted.
fn check_injected(before: &Pod, after: &Pod, native: bool) {
    let spec = after.spec.as_ref().unwrap();
    let old = before.spec.as_ref().unwrap();
    let inits = spec.init_containers.as_deref().unwrap();
    let old_inits = old.init_containers.as_deref().unwrap_or_default();

    // Order: medmesh-init, the native sidecar, then the app's init containers unchanged.
    let mut want = vec!["medmesh-init"];
    if native {
        want.push("medmesh-sidecar");
    }
    want.extend(names(old_inits));
    assert_eq!(names(inits), want);
    assert_eq!(&inits[want.len() - old_inits.len()..], old_inits);
    let mut want_containers = names(&old.containers);
    if !native {
        want_containers.push("medmesh-sidecar");
    }
    assert_eq!(names(&spec.containers), want_containers);
    assert_eq!(
        &spec.containers[..old.containers.len()],
        &old.containers[..]
    );

    // medmesh-init: NET_ADMIN and NET_RAW only.
    let init = &inits[0];
    assert_eq!(init.args.as_ref().unwrap()[0], "init");
    let sc = init.security_context.as_ref().unwrap();
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.add.as_deref().unwrap(), ["NET_ADMIN", "NET_RAW"]);
    assert_eq!(caps.drop.as_deref().unwrap(), ["ALL"]);
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.privileged, Some(false));

    // The sidecar.
    let sidecar = if native {
        &inits[1]
    } else {
        spec.containers.last().unwrap()
    };
    assert_eq!(sidecar.name, "medmesh-sidecar");
    assert_eq!(sidecar.args.as_deref().unwrap(), ["run"]);
    if native {
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        let probe = sidecar
            .startup_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(probe.path.as_deref(), Some("/ready"));
        assert_eq!(
            probe.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15020)
        );
    } else {
        assert_eq!(sidecar.restart_policy, None);
        assert!(sidecar.startup_probe.is_none());
    }
    let sc = sidecar.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_user, Some(1337));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref().unwrap(),
        ["ALL"]
    );
    assert!(sc.capabilities.as_ref().unwrap().add.is_none());
    assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    assert_eq!(env(sidecar, "MEDMESH_TRUST_DOMAIN"), "cluster.local");
    assert_eq!(
        env(sidecar, "MEDMESH_POLICY"),
        "/etc/medmesh/policy/policy.json"
    );
    assert_eq!(
        env(sidecar, "MEDMESH_IDENTITY_URL"),
        "https://medmesh-operator.medmesh-system.svc:8443"
    );
    assert_eq!(
        env(sidecar, "MEDMESH_IDENTITY_TOKEN"),
        "/var/run/secrets/medmesh/identity/token"
    );
    let mounts: Vec<_> = sidecar
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_path.as_str(), m.read_only))
        .collect();
    assert_eq!(
        mounts,
        [
            (
                "medmesh-identity-token",
                "/var/run/secrets/medmesh/identity",
                Some(true)
            ),
            ("medmesh-policy", "/etc/medmesh/policy", Some(true)),
            ("medmesh-identity-ca", "/etc/medmesh/identity", Some(true)),
            ("medmesh-spool", "/var/run/medmesh/spool", None),
            ("medmesh-archive-staging", "/var/run/medmesh/archive", None),
            ("medmesh-audit-key", "/etc/medmesh/audit", Some(true)),
            ("medmesh-podinfo", "/etc/medmesh/podinfo", Some(true)),
        ]
    );

    // Volumes: the Pod's own, then the token, the policy and the identity CA ConfigMaps.
    let vols = spec.volumes.as_deref().unwrap();
    let old_vols = old.volumes.as_deref().unwrap_or_default();
    assert_eq!(&vols[..old_vols.len()], old_vols);
    let token = vols
        .iter()
        .find(|v| v.name == "medmesh-identity-token")
        .unwrap();
    let sources = token
        .projected
        .as_ref()
        .unwrap()
        .sources
        .as_deref()
        .unwrap();
    let sat = sources[0].service_account_token.as_ref().unwrap();
    assert_eq!(sat.audience.as_deref(), Some("medmesh-identity"));
    assert_eq!(sat.expiration_seconds, Some(3600));
    let policy = vols.iter().find(|v| v.name == "medmesh-policy").unwrap();
    let cm = policy.config_map.as_ref().unwrap();
    assert_eq!(cm.name, "medmesh-policy");
    assert_eq!(cm.optional, Some(false));
    let ca = vols
        .iter()
        .find(|v| v.name == "medmesh-identity-ca")
        .unwrap();
    assert_eq!(ca.config_map.as_ref().unwrap().name, "medmesh-identity-ca");
    assert_eq!(
        env(sidecar, "MEDMESH_IDENTITY_CA"),
        "/etc/medmesh/identity/ca.crt"
    );
    // Auditing: settings from the policy ConfigMap when the namespace audits, a spool that
    // survives sidecar restarts, the namespace's key Secret (optional: absent without audit).
    assert_eq!(
        env(sidecar, "MEDMESH_AUDIT_CONFIG"),
        "/etc/medmesh/policy/audit.json"
    );
    assert_eq!(env(sidecar, "MEDMESH_SPOOL_DIR"), "/var/run/medmesh/spool");
    // The pod's labels, to pick the policies that select it.
    assert_eq!(
        env(sidecar, "MEDMESH_POD_LABELS"),
        "/etc/medmesh/podinfo/labels"
    );
    let podinfo = vols.iter().find(|v| v.name == "medmesh-podinfo").unwrap();
    let items = podinfo
        .downward_api
        .as_ref()
        .unwrap()
        .items
        .as_ref()
        .unwrap();
    assert_eq!(
        items[0].field_ref.as_ref().unwrap().field_path,
        "metadata.labels"
    );
    let spool = vols.iter().find(|v| v.name == "medmesh-spool").unwrap();
    assert!(spool.empty_dir.is_some());
    // Archiving stages on a volume of its own, the sidecar's limit below the volume's.
    let staging = vols
        .iter()
        .find(|v| v.name == "medmesh-archive-staging")
        .unwrap();
    assert_eq!(
        staging
            .empty_dir
            .as_ref()
            .unwrap()
            .size_limit
            .as_ref()
            .unwrap()
            .0,
        "2Gi"
    );
    assert_eq!(
        env(sidecar, "MEDMESH_ARCHIVE_STAGING_DIR"),
        "/var/run/medmesh/archive"
    );
    let max: u64 = env(sidecar, "MEDMESH_ARCHIVE_STAGING_MAX_BYTES")
        .parse()
        .unwrap();
    assert!((3 << 29..2 << 30).contains(&max), "{max}");
    let key = vols.iter().find(|v| v.name == "medmesh-audit-key").unwrap();
    let secret = key.secret.as_ref().unwrap();
    assert_eq!(
        (secret.secret_name.as_deref(), secret.optional),
        (Some("medmesh-audit-key"), Some(true))
    );

    // The version annotation, next to the Pod's own annotations.
    let ann = after.metadata.annotations.as_ref().unwrap();
    assert_eq!(ann["medmesh.io/injected-version"], "0.1.0");
    for (k, v) in before.metadata.annotations.iter().flatten() {
        assert_eq!(&ann[k], v, "annotation {k} kept");
    }
    assert_eq!(after.metadata.labels, before.metadata.labels);
}

/// Injects one fixture and checks everything; returns the patched object.
fn inject(name: &str, native: bool) -> (Admission, Value) {
    let cfg = config(native);
    let (req, object) = request(name);
    let admission = webhook::mutate(&req, &cfg);
    assert_eq!(
        admission.result,
        AdmissionResult::Injected,
        "{name}: {:?}",
        admission.response
    );
    assert!(admission.response.allowed);
    let patched = apply(&admission, &object);
    let before: Pod = serde_json::from_value(object).unwrap();
    let after: Pod = serde_json::from_value(patched.clone()).unwrap();
    check_injected(&before, &after, native);

    // The real schemas accept the result. The API server names a generateName Pod after
    // admission; the validator needs a name, so one is given as the server would.
    let mut stored = patched.clone();
    if stored["metadata"]["name"].is_null() {
        let generated = format!(
            "{}x7k2q",
            stored["metadata"]["generateName"].as_str().unwrap()
        );
        stored["metadata"]["name"] = Value::String(generated);
    }
    let dir = tempfile::tempdir().unwrap();
    kubernetes_validate::validate_value(dir.path(), "pod.json", &stored);

    // Idempotent: the patched Pod submitted again is left alone.
    let mut again = req.clone();
    again.object = Some(serde_json::from_value(patched.clone()).unwrap());
    let second = webhook::mutate(&again, &cfg);
    assert_eq!(second.result, AdmissionResult::AlreadyInjected, "{name}");
    assert!(second.response.allowed);
    assert!(second.response.patch.is_none(), "{name}: injected twice");
    (admission, patched)
}

#[test]
fn injects_a_bare_pod_with_init_container_and_skip_ports() {
    let (admission, patched) = inject(DIRECT, true);
    let pod: Pod = serde_json::from_value(patched).unwrap();
    let init = &pod.spec.unwrap().init_containers.unwrap()[0];
    let args = init.args.as_deref().unwrap();
    let at = args
        .iter()
        .position(|a| a == "--skip-outbound-ports")
        .unwrap();
    assert_eq!(args[at + 1], "53");
    assert!(!args.iter().any(|a| a == "--skip-inbound-ports"));
    // The annotation key's `/` is escaped (RFC 6901) in the patch path.
    let patch = String::from_utf8(admission.response.patch.clone().unwrap()).unwrap();
    assert!(
        patch.contains(r#""path":"/metadata/annotations/medmesh.io~1injected-version""#),
        "{patch}"
    );
    assert!(
        patch.contains(r#""path":"/spec/initContainers/0""#),
        "{patch}"
    );
    let event = admission.event.unwrap();
    assert_eq!(event.type_, EventType::Normal);
    assert_eq!(event.reason, "Injected");
    assert_eq!(event.regarding.kind.as_deref(), Some("Pod"));
    assert_eq!(event.regarding.name.as_deref(), Some("modality-ct1"));
    assert!(
        event.note.contains("pod radiology/modality-ct1"),
        "{}",
        event.note
    );
}

#[test]
fn injects_a_generate_name_pod_of_a_replicaset() {
    let (admission, _) = inject(REPLICASET, true);
    // No name yet: the Event is about the owning ReplicaSet and names the generateName.
    let event = admission.event.unwrap();
    assert_eq!(event.regarding.kind.as_deref(), Some("ReplicaSet"));
    assert_eq!(event.regarding.name.as_deref(), Some("orthanc-d88f4f5fd"));
    assert_eq!(
        event.regarding.uid.as_deref(),
        Some("cb12f4f1-95cf-4359-a1dd-b63172985c9a")
    );
    assert!(
        event
            .note
            .contains("pod radiology/orthanc-d88f4f5fd-* (ReplicaSet orthanc-d88f4f5fd)"),
        "{}",
        event.note
    );
}

#[test]
fn injects_a_statefulset_pod_without_annotations_or_init_containers() {
    let (admission, _) = inject(STATEFULSET, true);
    let patch = String::from_utf8(admission.response.patch.clone().unwrap()).unwrap();
    // Neither map nor list existed: they are created whole.
    assert!(
        patch.contains(
            r#""path":"/metadata/annotations","value":{"medmesh.io/injected-version":"0.1.0"}"#
        ),
        "{patch}"
    );
    assert!(
        patch.contains(r#""path":"/spec/initContainers","value":["#),
        "{patch}"
    );
}

#[test]
fn falls_back_to_a_plain_container_for_old_clusters() {
    for f in [DIRECT, REPLICASET, STATEFULSET] {
        inject(f, false);
    }
}

#[test]
fn dry_run_is_patched_without_events() {
    let (admission, _) = inject(DRY_RUN, true);
    assert!(admission.event.is_none());
}

#[test]
fn host_network_pods_are_allowed_unchanged() {
    let (req, _) = request(HOST_NETWORK);
    let a = webhook::mutate(&req, &config(true));
    assert_eq!(a.result, AdmissionResult::HostNetwork);
    assert!(a.response.allowed);
    assert!(a.response.patch.is_none());
    let warnings = a.response.warnings.unwrap();
    assert!(warnings[0].contains("hostNetwork"), "{warnings:?}");
    assert_eq!(a.event.unwrap().reason, "InjectionSkipped");
}

#[derive(Default)]
struct Recorder(Mutex<Vec<InjectionEvent>>);

impl EventSink for Recorder {
    fn emit(&self, event: InjectionEvent) {
        self.0.lock().unwrap().push(event);
    }
}

async fn post(state: &WebhookState, body: String) -> (StatusCode, Value) {
    let res = webhook::router(state.clone())
        .oneshot(
            Request::post("/mutate")
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

#[tokio::test]
async fn handler_answers_reviews_emits_events_and_counts() {
    let events = Arc::new(Recorder::default());
    let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
    let state = WebhookState {
        config: Arc::new(config(true)),
        events: events.clone(),
        metrics: metrics.clone(),
    };

    let (status, review) = post(&state, fixture(REPLICASET)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    let response = &review["response"];
    assert_eq!(response["uid"], request(REPLICASET).0.uid.as_str());
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    // The patch travels as base64 (a Go []byte) and applies to the request object.
    let patch = {
        use base64::Engine as _;
        let text = response["patch"].as_str().expect("base64 string");
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap()
    };
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut object = request(REPLICASET).1;
    json_patch::patch(&mut object, &patch).unwrap();
    let pod: Pod = serde_json::from_value(object).unwrap();
    assert_eq!(
        names(
            pod.spec
                .as_ref()
                .unwrap()
                .init_containers
                .as_deref()
                .unwrap()
        ),
        ["medmesh-init", "medmesh-sidecar"]
    );
    {
        let recorded = events.0.lock().unwrap();
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].reason, "Injected");
    }

    // dryRun: answered with the patch, but no Event (no side effects).
    let (status, review) = post(&state, fixture(DRY_RUN)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(review["response"]["patchType"], "JSONPatch");
    assert_eq!(
        events.0.lock().unwrap().len(),
        1,
        "dry run emitted an Event"
    );

    let (status, body) = post(&state, "{not json".into()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body.as_str().unwrap().contains("malformed AdmissionReview"),
        "{body}"
    );

    assert_eq!(metrics.admissions(AdmissionResult::Injected), 2);
    assert_eq!(metrics.admissions(AdmissionResult::Malformed), 1);
    // Every request is timed through the router, the malformed one too.
    assert_eq!(metrics.admissions_timed(), 3);
}
