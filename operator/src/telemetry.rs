//! Logs, and traces when an OTLP endpoint is set: the operator's use of `medmesh-telemetry`.
//!
//! [`init`] installs the process's subscriber through [`medmesh_telemetry::init`]: logs on
//! stderr and, only when `--otlp-endpoint` is given, spans over OTLP/HTTP with the operator's
//! resource (`service.name` [`SERVICE_NAME`], `k8s.namespace.name`).
//!
//! Which spans exist (names are stable, attributes are names, kinds and bounded results; never
//! tokens, CSRs or Pod contents):
//! - `admission` (`POST /mutate`): `namespace`, `pod`, `dry_run`, `result`
//!   (`allowed`/`patched`/`refused`) and `outcome` (the admission metric's label);
//! - `issue_certificate` (`POST /v1/certificate`): `spiffe_id` once the token is reviewed,
//!   `result` (the certificate metric's label);
//! - `reconcile` (both controllers): `controller`, `kind`, `namespace`, `name`, `result`, under
//!   kube-runtime's own `reconciling object` span.

pub use medmesh_telemetry::{FLUSH_TIMEOUT, Telemetry, TelemetryError};
use tracing_subscriber::filter::EnvFilter;

/// `service.name` of every exported span.
pub const SERVICE_NAME: &str = "medmesh-operator";

/// Where traces go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Otlp {
    /// The OTLP base endpoint (`http://collector:4318`); spans are posted to
    /// `<endpoint>/v1/traces`, as `OTEL_EXPORTER_OTLP_ENDPOINT` means in the OpenTelemetry
    /// specification.
    pub endpoint: String,
    /// The operator's namespace (`k8s.namespace.name`).
    pub namespace: String,
}

impl Otlp {
    fn export(&self) -> medmesh_telemetry::Otlp {
        medmesh_telemetry::Otlp {
            endpoint: self.endpoint.clone(),
            attributes: vec![("k8s.namespace.name", self.namespace.clone())],
        }
    }

    /// The URL spans are posted to.
    pub fn traces_url(&self) -> String {
        self.export().traces_url()
    }
}

/// Installs the global subscriber (see [`medmesh_telemetry::init`]) for the operator's spans.
///
/// # Errors
/// When the exporter cannot be built or a global subscriber exists already.
pub fn init(filter: EnvFilter, otlp: Option<&Otlp>) -> Result<Telemetry, TelemetryError> {
    medmesh_telemetry::init(
        SERVICE_NAME,
        crate::run::VERSION,
        filter,
        otlp.map(Otlp::export).as_ref(),
    )
}
