//! The sidecar injection webhook: a pure [`mutate`] from an AdmissionReview request to an
//! AdmissionResponse carrying a JSON patch, and the axum handler for `POST /mutate`
//! ([`router`]).
//!
//! Which namespaces are injected is decided by the webhook configuration's
//! `namespaceSelector` (`medmesh.io/inject: enabled`); a Pod opts out with the label
//! `medmesh.io/inject: disabled` (also filtered by the `objectSelector`, and checked here).
//!
//! What an injected Pod gets (see [`pod_spec`] for the exact objects):
//! - init container `medmesh-init` (`medmesh-sidecar init`, NET_ADMIN and NET_RAW only) first;
//! - the sidecar `medmesh-sidecar` as a native sidecar (an init container with
//!   `restartPolicy: Always` and a startup probe on `/ready`) right after it, before the app's
//!   init containers, or as a plain container when [`InjectConfig::native_sidecar`] is off
//!   (clusters without native sidecars);
//! - a projected service-account token for audience `medmesh-identity`, the policy ConfigMap
//!   `medmesh-policy` and the identity service's CA (`medmesh-identity-ca`, at
//!   `/etc/medmesh/identity/ca.crt`), mounted into the sidecar;
//! - the annotation `medmesh.io/injected-version`.
//!
//! Decisions are pure and return the Event to emit as data; the handler hands it to an
//! [`EventSink`] (never for `dryRun` requests, which must have no side effects).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde_json::Value;

use crate::events::{EventSink, EventType, InjectionEvent};
use crate::metrics::{AdmissionResult, Metrics};
use crate::names::{
    INJECT_LABEL, INJECTED_ANNOTATION, SKIP_INBOUND_ANNOTATION, SKIP_OUTBOUND_ANNOTATION,
};

mod pod_spec;
#[cfg(test)]
mod tests;

pub use pod_spec::{
    ADMIN_PORT, AUDIT_KEY_VOLUME, IDENTITY_CA_MOUNT, IDENTITY_CA_VOLUME, INIT_NAME, POLICY_MOUNT,
    POLICY_VOLUME, PROXY_UID, SIDECAR_NAME, SPOOL_MOUNT, SPOOL_VOLUME, TOKEN_MOUNT, TOKEN_VOLUME,
};

/// What is injected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// The sidecar image (also runs `medmesh-init`).
    pub sidecar_image: String,
    /// `imagePullPolicy` of the injected containers; the cluster default when `None`.
    pub image_pull_policy: Option<String>,
    /// The mesh trust domain.
    pub trust_domain: medmesh_core::TrustDomain,
    /// URL of the identity service the sidecar gets its certificate from.
    pub identity_url: String,
    /// Version written into [`INJECTED_ANNOTATION`].
    pub version: String,
    /// Inject the sidecar as a native sidecar (Kubernetes 1.29+); a plain container otherwise.
    pub native_sidecar: bool,
    /// Where injected sidecars send their spans (`OTEL_EXPORTER_OTLP_ENDPOINT`); no traces
    /// when `None`. The sidecar's own connections are not intercepted, so the collector is
    /// reached directly.
    pub otlp_endpoint: Option<String>,
}

/// The decision on one admission request.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The response for the API server.
    pub response: AdmissionResponse,
    /// The bounded outcome, for metrics.
    pub result: AdmissionResult,
    /// The Event to emit; always `None` for `dryRun` requests.
    pub event: Option<InjectionEvent>,
}

/// Why a Pod is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InjectError {
    /// The request carries no object.
    #[error("admission request {uid} carries no object")]
    NoObject {
        /// The request uid.
        uid: String,
    },
    /// The object is not a readable v1 Pod.
    #[error("{pod}: not a readable v1 Pod: {reason}")]
    NotAPod {
        /// Which Pod.
        pod: String,
        /// The decoding error.
        reason: String,
    },
    /// The opt-out label has a value other than `enabled` or `disabled`.
    #[error("{pod}: label {INJECT_LABEL}={value:?} must be \"enabled\" or \"disabled\"")]
    BadLabel {
        /// Which Pod.
        pod: String,
        /// The value found.
        value: String,
    },
    /// A skip-ports annotation is not a list of ports.
    #[error("{pod}: annotation {annotation}={value:?} must be comma-separated ports 1-65535")]
    BadPorts {
        /// Which Pod.
        pod: String,
        /// The annotation.
        annotation: &'static str,
        /// Its value.
        value: String,
    },
    /// The Pod already uses a name the injection needs.
    #[error("{pod}: {what} {name:?} already exists; medmesh cannot inject its own")]
    NameTaken {
        /// Which Pod.
        pod: String,
        /// `volume` or `container`.
        what: &'static str,
        /// The name.
        name: &'static str,
    },
    /// Serializing the patch failed (not expected).
    #[error("{pod}: cannot serialize the patch: {reason}")]
    Patch {
        /// Which Pod.
        pod: String,
        /// Why.
        reason: String,
    },
}

/// Decides one admission request (see the module documentation). Never panics on any input.
pub fn mutate(req: &AdmissionRequest<DynamicObject>, cfg: &InjectConfig) -> Admission {
    let allow = AdmissionResponse::from(req);
    // The webhook is registered for Pod CREATE only; anything else passes untouched.
    if req.operation != Operation::Create || req.kind.kind != "Pod" || !req.kind.group.is_empty() {
        return Admission {
            response: allow,
            result: AdmissionResult::Ignored,
            event: None,
        };
    }
    let Some(obj) = &req.object else {
        let e = InjectError::NoObject {
            uid: req.uid.clone(),
        };
        return deny(req, allow, None, &e);
    };
    let display = display_name(obj, req);
    let pod: Pod = match serde_json::to_value(obj).and_then(serde_json::from_value) {
        Ok(p) => p,
        Err(e) => {
            let e = InjectError::NotAPod {
                pod: display,
                reason: e.to_string(),
            };
            return deny(req, allow, None, &e);
        }
    };
    let regarding = regarding(&pod, req);
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    match labels.get(INJECT_LABEL).map(String::as_str) {
        Some("disabled") => {
            return Admission {
                response: allow,
                result: AdmissionResult::Disabled,
                event: None,
            };
        }
        None | Some("enabled") => {}
        Some(other) => {
            let e = InjectError::BadLabel {
                pod: display,
                value: other.to_owned(),
            };
            return deny(req, allow, Some(regarding), &e);
        }
    }
    if pod_spec::already_injected(&pod) {
        return Admission {
            response: allow,
            result: AdmissionResult::AlreadyInjected,
            event: None,
        };
    }
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.host_network == Some(true) {
        let note = format!(
            "{display}: not injected: hostNetwork pods share the node's network, which the sidecar must not redirect"
        );
        let mut response = allow;
        response.warnings = Some(vec![note.clone()]);
        return Admission {
            response,
            result: AdmissionResult::HostNetwork,
            event: (!req.dry_run).then_some(InjectionEvent {
                regarding,
                type_: EventType::Normal,
                reason: "InjectionSkipped",
                note,
            }),
        };
    }
    match build_patch(&pod, cfg, &display) {
        Ok(patch) => match allow.with_patch(patch) {
            Ok(response) => Admission {
                response,
                result: AdmissionResult::Injected,
                event: (!req.dry_run).then(|| InjectionEvent {
                    regarding,
                    type_: EventType::Normal,
                    reason: "Injected",
                    note: format!("{display}: medmesh sidecar {} injected", cfg.version),
                }),
            },
            Err(e) => {
                let e = InjectError::Patch {
                    pod: display,
                    reason: e.to_string(),
                };
                deny(req, AdmissionResponse::from(req), Some(regarding), &e)
            }
        },
        Err(e) => deny(req, allow, Some(regarding), &e),
    }
}

fn deny(
    req: &AdmissionRequest<DynamicObject>,
    base: AdmissionResponse,
    regarding: Option<ObjectReference>,
    e: &InjectError,
) -> Admission {
    let message = format!("medmesh sidecar injection: {e}");
    Admission {
        response: base.deny(&message),
        result: AdmissionResult::Denied,
        event: regarding
            .filter(|_| !req.dry_run)
            .map(|regarding| InjectionEvent {
                regarding,
                type_: EventType::Warning,
                reason: "InjectionFailed",
                note: message,
            }),
    }
}

/// `namespace/name`, or for controller-made Pods without a name yet
/// `namespace/<generateName>* (ReplicaSet orthanc-7c9d)`.
fn display_name(obj: &DynamicObject, req: &AdmissionRequest<DynamicObject>) -> String {
    let ns = obj
        .metadata
        .namespace
        .as_deref()
        .or(req.namespace.as_deref())
        .unwrap_or("default");
    let name = obj
        .metadata
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .or(Some(req.name.as_str()).filter(|n| !n.is_empty()));
    let owner = obj
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| format!(" ({} {})", o.kind, o.name))
        .unwrap_or_default();
    match (name, obj.metadata.generate_name.as_deref()) {
        (Some(n), _) => format!("pod {ns}/{n}{owner}"),
        (None, Some(g)) => format!("pod {ns}/{g}*{owner}"),
        (None, None) => format!("pod in {ns} without a name{owner}"),
    }
}

fn regarding(pod: &Pod, req: &AdmissionRequest<DynamicObject>) -> ObjectReference {
    let ns = pod
        .metadata
        .namespace
        .clone()
        .or_else(|| req.namespace.clone());
    if let Some(o) = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    {
        return ObjectReference {
            api_version: Some(o.api_version.clone()),
            kind: Some(o.kind.clone()),
            name: Some(o.name.clone()),
            namespace: ns,
            uid: Some(o.uid.clone()),
            ..ObjectReference::default()
        };
    }
    let name = pod
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .or_else(|| Some(req.name.clone()).filter(|n| !n.is_empty()))
        .or_else(|| pod.metadata.generate_name.clone());
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name,
        namespace: ns,
        ..ObjectReference::default()
    }
}

fn ports(
    annotations: &BTreeMap<String, String>,
    annotation: &'static str,
    pod: &str,
) -> Result<Vec<u16>, InjectError> {
    let Some(value) = annotations.get(annotation) else {
        return Ok(Vec::new());
    };
    let bad = || InjectError::BadPorts {
        pod: pod.to_owned(),
        annotation,
        value: value.clone(),
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad))
        .collect()
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens.iter().copied()),
        value,
    })
}

fn build_patch(pod: &Pod, cfg: &InjectConfig, display: &str) -> Result<Patch, InjectError> {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let skip_in = ports(&annotations, SKIP_INBOUND_ANNOTATION, display)?;
    let skip_out = ports(&annotations, SKIP_OUTBOUND_ANNOTATION, display)?;
    let spec = pod.spec.clone().unwrap_or_default();
    for v in spec.volumes.iter().flatten() {
        for name in [TOKEN_VOLUME, POLICY_VOLUME, IDENTITY_CA_VOLUME] {
            if v.name == name {
                return Err(InjectError::NameTaken {
                    pod: display.to_owned(),
                    what: "volume",
                    name,
                });
            }
        }
    }
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        // A container named like ours means a half-injected or hand-made Pod: refuse rather
        // than guess (already_injected() handled the complete case).
        for name in [INIT_NAME, SIDECAR_NAME] {
            if c.name == name {
                return Err(InjectError::NameTaken {
                    pod: display.to_owned(),
                    what: "container",
                    name,
                });
            }
        }
    }
    let init = json(&pod_spec::init_container(cfg, &skip_in, &skip_out), display)?;
    let sidecar = json(&pod_spec::sidecar_container(cfg), display)?;
    let volumes = pod_spec::volumes()
        .iter()
        .map(|v| json(v, display))
        .collect::<Result<Vec<_>, _>>()?;

    let mut ops = Vec::new();
    // Annotations: create the map when the Pod has none; the key's `/` is escaped as `~1`.
    let version = Value::String(cfg.version.clone());
    if pod.metadata.annotations.is_some() {
        ops.push(add(
            &["metadata", "annotations", INJECTED_ANNOTATION],
            version,
        ));
    } else {
        ops.push(add(
            &["metadata", "annotations"],
            serde_json::json!({ INJECTED_ANNOTATION: version }),
        ));
    }
    // Init containers: ours first (iptables before anything else runs), then the native sidecar
    // so that the app's own init containers already go through the mesh.
    let mut ours = vec![init];
    if cfg.native_sidecar {
        ours.push(sidecar.clone());
    }
    if spec.init_containers.is_some() {
        for (i, c) in ours.into_iter().enumerate() {
            ops.push(add(&["spec", "initContainers", &i.to_string()], c));
        }
    } else {
        ops.push(add(&["spec", "initContainers"], Value::Array(ours)));
    }
    if !cfg.native_sidecar {
        ops.push(add(&["spec", "containers", "-"], sidecar));
    }
    if spec.volumes.is_some() {
        for v in volumes {
            ops.push(add(&["spec", "volumes", "-"], v));
        }
    } else {
        ops.push(add(&["spec", "volumes"], Value::Array(volumes)));
    }
    Ok(Patch(ops))
}

fn json<T: serde::Serialize>(v: &T, display: &str) -> Result<Value, InjectError> {
    serde_json::to_value(v).map_err(|e| InjectError::Patch {
        pod: display.to_owned(),
        reason: e.to_string(),
    })
}

/// State of the `/mutate` handler.
#[derive(Clone)]
pub struct WebhookState {
    /// What is injected.
    pub config: Arc<InjectConfig>,
    /// Where Events go.
    pub events: Arc<dyn EventSink>,
    /// Admission counters.
    pub metrics: Metrics,
}

/// Largest AdmissionReview accepted: the API server's request limit is 3 MiB and a review
/// carries the object once (CREATE has no old object).
const MAX_REVIEW_BYTES: usize = 4 << 20;

/// `POST /mutate`.
pub fn router(state: WebhookState) -> Router {
    Router::new()
        .route("/mutate", post(handle))
        .layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES))
        // Timed from the request's head to the response: reading the review, deciding and
        // encoding the answer (the TLS handshake is the connection's, before).
        .layer(axum::middleware::from_fn_with_state(state.clone(), timed))
        .with_state(state)
}

async fn timed(
    State(state): State<WebhookState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let response = next.run(req).await;
    state.metrics.admission_took(started.elapsed());
    response
}

async fn handle(State(state): State<WebhookState>, body: Bytes) -> Response {
    // Deciding never awaits, so the span is entered around a plain call. Its attributes are
    // names and bounded results; the Pod itself is never recorded.
    let span = tracing::info_span!(
        "admission",
        otel.kind = "server",
        namespace = tracing::field::Empty,
        pod = tracing::field::Empty,
        dry_run = tracing::field::Empty,
        result = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    span.in_scope(|| answer(&state, &body, &span))
}

/// What the API server sees of an outcome: passed unchanged, patched, or refused.
fn verdict(result: AdmissionResult) -> &'static str {
    match result {
        AdmissionResult::Injected => "patched",
        AdmissionResult::Denied | AdmissionResult::Malformed => "refused",
        AdmissionResult::Disabled
        | AdmissionResult::AlreadyInjected
        | AdmissionResult::HostNetwork
        | AdmissionResult::Ignored => "allowed",
    }
}

fn record(span: &tracing::Span, result: AdmissionResult) {
    span.record("result", verdict(result));
    span.record("outcome", result.as_str());
}

fn answer(state: &WebhookState, body: &[u8], span: &tracing::Span) -> Response {
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            record(span, AdmissionResult::Malformed);
            state.metrics.admission(AdmissionResult::Malformed);
            return (
                StatusCode::BAD_REQUEST,
                format!("malformed AdmissionReview: {e}"),
            )
                .into_response();
        }
    };
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(_) => {
            record(span, AdmissionResult::Malformed);
            state.metrics.admission(AdmissionResult::Malformed);
            return (
                StatusCode::BAD_REQUEST,
                "malformed AdmissionReview: no request",
            )
                .into_response();
        }
    };
    if let Some(ns) = &req.namespace {
        span.record("namespace", ns.as_str());
    }
    // A Pod made by a controller has only a generateName when it is admitted.
    let generated = req
        .object
        .as_ref()
        .and_then(|o| o.metadata.generate_name.as_deref());
    match (req.name.as_str(), generated) {
        ("", Some(g)) => span.record("pod", tracing::field::display(format_args!("{g}*"))),
        (name, _) => span.record("pod", name),
    };
    span.record("dry_run", req.dry_run);
    let admission = mutate(&req, &state.config);
    record(span, admission.result);
    state.metrics.admission(admission.result);
    if let Some(event) = admission.event {
        state.events.emit(event);
    }
    tracing::debug!(uid = %req.uid, result = admission.result.as_str(), "admission");
    match review_json(admission.response) {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the AdmissionReview response: {e}"),
        )
            .into_response(),
    }
}

/// The AdmissionReview answering `response`, as the API server reads it.
///
/// kube 5 serializes `response.patch` (a Go `[]byte`) as an array of numbers
/// (kube-rs/kube#1781); the API documents it as base64 in JSON, so it is re-encoded here.
///
/// # Errors
/// When serialization fails.
pub fn review_json(response: AdmissionResponse) -> Result<Value, serde_json::Error> {
    use base64::Engine as _;
    let patch = response
        .patch
        .as_ref()
        .map(|p| base64::engine::general_purpose::STANDARD.encode(p));
    let mut v = serde_json::to_value(response.into_review())?;
    if let (Some(patch), Some(r)) = (patch, v.get_mut("response").and_then(Value::as_object_mut)) {
        r.insert("patch".into(), Value::String(patch));
    }
    Ok(v)
}
