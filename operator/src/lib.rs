//! The medmesh operator: custom resources, policy compilation, sidecar injection and the
//! workload-identity CA.
//!
//! - [`crd`]: `AuditLedger` and `MeshPolicy` and their generated CRDs (`medmesh-operator crds`).
//! - [`policy`]: compiles a namespace's `MeshPolicy` objects into the document sidecars enforce.
//! - [`webhook`]: the mutating admission webhook that injects the sidecar (`POST /mutate`).
//! - [`events`]: Kubernetes Events through kube's recorder (the webhook's and controllers').
//! - [`identity`]: the CA that issues X.509-SVIDs for projected service-account tokens
//!   (`POST /v1/certificate`, `GET /v1/bundle`).
//! - [`controller`]: the leader-only `AuditLedger` and `MeshPolicy` controllers.
//! - [`leader`]: leader election on a Lease (only the leader runs the controllers).
//! - [`metrics`]: admission and certificate counters (bounded labels).
//! - [`security`]: the restricted security contexts of the containers the operator writes.
//! - [`names`]: the labels, annotations, object names and paths the parts share.
//! - [`serving`]: the operator's own serving CA and certificate, rotation, `caBundle`.
//! - [`telemetry`]: the log subscriber and, with an OTLP endpoint, trace export.
//! - [`resolve`]: connect-address overrides for an operator run out of cluster.
//! - [`run`]: the `run` command wiring them to HTTPS and admin listeners.

pub mod controller;
pub mod crd;
pub mod events;
pub mod identity;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod policy;
pub mod resolve;
pub mod run;
pub mod security;
pub mod serving;
pub mod telemetry;
pub mod webhook;
