use kube::core::admission::{AdmissionRequest, AdmissionReview};
use serde_json::{Value, json};

use super::*;

fn cfg() -> InjectConfig {
    InjectConfig {
        sidecar_image: "sidecar:1".into(),
        image_pull_policy: None,
        trust_domain: medmesh_core::TrustDomain::new("mesh.test").unwrap(),
        identity_url: "https://op:8443".into(),
        version: "1.2.3".into(),
        native_sidecar: true,
        otlp_endpoint: None,
    }
}

fn review(operation: &str, object: Value, dry_run: bool) -> AdmissionRequest<DynamicObject> {
    let body = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "",
            "namespace": "ns",
            "operation": operation,
            "userInfo": {"username": "tester"},
            "object": object,
            "dryRun": dry_run,
        }
    });
    let r: AdmissionReview<DynamicObject> = serde_json::from_value(body).unwrap();
    r.try_into().unwrap()
}

/// The smallest Pod: no annotations, labels, init containers or volumes.
fn minimal() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    })
}

fn patched(a: &Admission, object: &Value) -> Pod {
    let patch: json_patch::Patch =
        serde_json::from_slice(a.response.patch.as_ref().unwrap()).unwrap();
    let mut out = object.clone();
    json_patch::patch(&mut out, &patch).unwrap();
    serde_json::from_value(out).unwrap()
}

#[test]
fn creates_missing_maps_and_lists() {
    let obj = minimal();
    let a = mutate(&review("CREATE", obj.clone(), false), &cfg());
    assert_eq!(a.result, AdmissionResult::Injected);
    let pod = patched(&a, &obj);
    let spec = pod.spec.unwrap();
    let inits: Vec<_> = spec
        .init_containers
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(inits, ["medmesh-init", "medmesh-sidecar"]);
    let vols: Vec<_> = spec.volumes.unwrap().into_iter().map(|v| v.name).collect();
    assert_eq!(
        vols,
        [
            "medmesh-identity-token",
            "medmesh-policy",
            "medmesh-identity-ca",
            "medmesh-spool",
            "medmesh-archive-staging",
            "medmesh-audit-key",
            "medmesh-podinfo"
        ]
    );
    assert_eq!(
        pod.metadata.annotations.unwrap()["medmesh.io/injected-version"],
        "1.2.3"
    );
}

#[test]
fn appends_to_existing_empty_lists() {
    let mut obj = minimal();
    obj["metadata"]["annotations"] = json!({});
    obj["spec"]["initContainers"] = json!([]);
    obj["spec"]["volumes"] = json!([]);
    let a = mutate(&review("CREATE", obj.clone(), false), &cfg());
    let patch = String::from_utf8(a.response.patch.clone().unwrap()).unwrap();
    assert!(
        patch.contains("/metadata/annotations/medmesh.io~1injected-version"),
        "{patch}"
    );
    assert!(patch.contains("/spec/volumes/-"), "{patch}");
    let spec = patched(&a, &obj).spec.unwrap();
    assert_eq!(spec.init_containers.unwrap().len(), 2);
    assert_eq!(spec.volumes.unwrap().len(), 7);
}

/// The value of `name` in the environment of the injected sidecar, if set.
fn sidecar_env(pod: &Pod, name: &str) -> Option<String> {
    let spec = pod.spec.clone().unwrap();
    spec.init_containers
        .into_iter()
        .flatten()
        .chain(spec.containers)
        .filter(|c| c.name == SIDECAR_NAME)
        .flat_map(|c| c.env.unwrap_or_default())
        .find(|e| e.name == name)
        .and_then(|e| e.value)
}

#[test]
fn sidecars_trace_only_where_the_operator_is_told_to() {
    let obj = minimal();
    let a = mutate(&review("CREATE", obj.clone(), false), &cfg());
    assert_eq!(
        sidecar_env(&patched(&a, &obj), "OTEL_EXPORTER_OTLP_ENDPOINT"),
        None
    );
    let traced = InjectConfig {
        otlp_endpoint: Some("http://collector.observability:4318".into()),
        ..cfg()
    };
    let a = mutate(&review("CREATE", obj.clone(), false), &traced);
    let pod = patched(&a, &obj);
    assert_eq!(
        sidecar_env(&pod, "OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(),
        Some("http://collector.observability:4318")
    );
    assert!(sidecar_env(&pod, "MEDMESH_ADMIN_ADDR").is_some());
}

#[test]
fn skip_port_annotations_become_init_flags() {
    let mut obj = minimal();
    obj["metadata"]["annotations"] = json!({
        "medmesh.io/skip-inbound-ports": "8080, 9090",
        "medmesh.io/skip-outbound-ports": "53",
    });
    let a = mutate(&review("CREATE", obj.clone(), false), &cfg());
    let init = &patched(&a, &obj).spec.unwrap().init_containers.unwrap()[0];
    let args = init.args.clone().unwrap().join(" ");
    assert!(args.contains("--skip-inbound-ports 8080,9090"), "{args}");
    assert!(args.contains("--skip-outbound-ports 53"), "{args}");
}

#[test]
fn refuses_with_clear_messages() {
    let cases = [
        (
            json!({"labels": {"medmesh.io/inject": "yes"}}),
            "label medmesh.io/inject=\"yes\" must be \"enabled\" or \"disabled\"",
        ),
        (
            json!({"annotations": {"medmesh.io/skip-inbound-ports": "80,http"}}),
            "annotation medmesh.io/skip-inbound-ports=\"80,http\" must be comma-separated ports 1-65535",
        ),
        (
            json!({"annotations": {"medmesh.io/skip-outbound-ports": "0"}}),
            "medmesh.io/skip-outbound-ports=\"0\"",
        ),
    ];
    for (meta, want) in cases {
        let mut obj = minimal();
        for (k, v) in meta.as_object().unwrap() {
            obj["metadata"][k] = v.clone();
        }
        let a = mutate(&review("CREATE", obj, false), &cfg());
        assert_eq!(a.result, AdmissionResult::Denied);
        assert!(!a.response.allowed);
        let msg = &a.response.result.message;
        assert!(
            msg.starts_with("medmesh sidecar injection: pod ns/p: "),
            "{msg}"
        );
        assert!(msg.contains(want), "{msg}");
        let ev = a.event.unwrap();
        assert_eq!(ev.type_, EventType::Warning);
        assert_eq!(ev.reason, "InjectionFailed");
    }
    // A Pod that already uses one of our names.
    let mut obj = minimal();
    obj["spec"]["volumes"] = json!([{"name": "medmesh-policy", "emptyDir": {}}]);
    let a = mutate(&review("CREATE", obj, true), &cfg());
    assert!(
        a.response
            .result
            .message
            .contains("volume \"medmesh-policy\" already exists"),
        "{}",
        a.response.result.message
    );
    assert!(a.event.is_none(), "dry run: no Event, even for a refusal");
}

#[test]
fn opt_out_and_explicit_opt_in() {
    let mut obj = minimal();
    obj["metadata"]["labels"] = json!({"medmesh.io/inject": "disabled"});
    let a = mutate(&review("CREATE", obj.clone(), false), &cfg());
    assert_eq!(a.result, AdmissionResult::Disabled);
    assert!(a.response.allowed && a.response.patch.is_none() && a.event.is_none());
    obj["metadata"]["labels"] = json!({"medmesh.io/inject": "enabled"});
    let a = mutate(&review("CREATE", obj, false), &cfg());
    assert_eq!(a.result, AdmissionResult::Injected);
}

#[test]
fn other_requests_pass_untouched() {
    let a = mutate(&review("UPDATE", minimal(), false), &cfg());
    assert_eq!(a.result, AdmissionResult::Ignored);
    assert!(a.response.allowed && a.response.patch.is_none());

    let a = mutate(&review("CREATE", Value::Null, false), &cfg());
    assert_eq!(a.result, AdmissionResult::Denied);
    assert!(
        a.response
            .result
            .message
            .contains("request u-1 carries no object")
    );

    let mut obj = minimal();
    obj["spec"]["containers"] = json!("not a list");
    let a = mutate(&review("CREATE", obj, false), &cfg());
    assert_eq!(a.result, AdmissionResult::Denied);
    assert!(
        a.response
            .result
            .message
            .contains("pod ns/p: not a readable v1 Pod"),
        "{}",
        a.response.result.message
    );
}

#[test]
fn partial_injection_is_refused_not_repeated() {
    let mut obj = minimal();
    obj["spec"]["initContainers"] = json!([{"name": "medmesh-init", "image": "x"}]);
    let a = mutate(&review("CREATE", obj, false), &cfg());
    assert_eq!(a.result, AdmissionResult::Denied);
    assert!(
        a.response
            .result
            .message
            .contains("container \"medmesh-init\" already exists")
    );
}

#[test]
fn review_json_encodes_the_patch_in_base64() {
    use base64::Engine as _;
    let a = mutate(&review("CREATE", minimal(), false), &cfg());
    let v = review_json(a.response.clone()).unwrap();
    let text = v["response"]["patch"].as_str().unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap();
    assert_eq!(Some(bytes), a.response.patch);
    assert_eq!(v["response"]["uid"], "u-1");
    let denied = mutate(&review("CREATE", Value::Null, false), &cfg());
    let v = review_json(denied.response).unwrap();
    assert!(v["response"].get("patch").is_none());
    assert_eq!(v["response"]["allowed"], false);
}
