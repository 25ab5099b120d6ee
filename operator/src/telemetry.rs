//! Logs, and traces when an OTLP endpoint is set.
//!
//! [`init`] installs the process's one `tracing` subscriber: the env filter (`RUST_LOG`, `info`
//! by default), the fmt layer on stderr and, only when `--otlp-endpoint` is given, a
//! `tracing-opentelemetry` layer whose spans go to `<endpoint>/v1/traces` over OTLP/HTTP
//! (protobuf). Without the flag no OpenTelemetry object is created at all.
//!
//! Spans are exported by the SDK's batch span processor, which runs on a thread of its own with
//! the blocking reqwest client: an admission or a certificate request only hands the finished
//! span to a bounded queue (spans are dropped, never waited for, when the collector is slow).
//! [`Telemetry::shutdown`] flushes that queue and stops the thread; `main` calls it after the
//! runtime has stopped, so that spans of the drain are sent too.
//!
//! Which spans exist (names are stable, attributes are names, kinds and bounded results; never
//! tokens, CSRs or Pod contents):
//! - `admission` (`POST /mutate`): `namespace`, `pod`, `dry_run`, `result`
//!   (`allowed`/`patched`/`refused`) and `outcome` (the admission metric's label);
//! - `issue_certificate` (`POST /v1/certificate`): `spiffe_id` once the token is reviewed,
//!   `result` (the certificate metric's label);
//! - `reconcile` (both controllers): `controller`, `kind`, `namespace`, `name`, `result`, under
//!   kube-runtime's own `reconciling object` span.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// `service.name` of every exported span.
pub const SERVICE_NAME: &str = "medmesh-operator";
/// Longest [`Telemetry::shutdown`] waits for the last spans to be sent.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// The URL spans are posted to.
    pub fn traces_url(&self) -> String {
        format!("{}/v1/traces", self.endpoint.trim_end_matches('/'))
    }
}

/// Why telemetry could not be set up or shut down.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (endpoint, HTTP client).
    #[error("OTLP exporter for {url}: {source}")]
    Exporter {
        /// Where spans would have gone.
        url: String,
        /// The error.
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// A global subscriber was installed before.
    #[error("tracing subscriber: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
    /// Flushing or shutting down the span processor failed.
    #[error("shutting down the tracer provider: {0}")]
    Shutdown(#[from] opentelemetry_sdk::error::OTelSdkError),
}

/// What [`init`] installed; keep it until the end of `main`, then call [`Telemetry::shutdown`].
#[derive(Debug)]
#[must_use = "spans still queued are lost unless shutdown() is called"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exports(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends the spans still queued and stops the export thread, waiting at most
    /// [`FLUSH_TIMEOUT`]. Blocks: call it outside the runtime (or in `spawn_blocking`).
    ///
    /// # Errors
    /// When the last export fails or does not finish in time.
    pub fn shutdown(self) -> Result<(), TelemetryError> {
        match self.provider {
            Some(p) => Ok(p.shutdown_with_timeout(FLUSH_TIMEOUT)?),
            None => Ok(()),
        }
    }
}

/// The tracer provider for `otlp`: OTLP/HTTP protobuf, batch span processor, the operator's
/// resource attributes (`service.name`, `service.version`, `k8s.namespace.name`, and whatever
/// `OTEL_RESOURCE_ATTRIBUTES` adds).
///
/// # Errors
/// When the endpoint is not a URL or the HTTP client cannot be built.
pub fn tracer_provider(otlp: &Otlp) -> Result<SdkTracerProvider, TelemetryError> {
    let url = otlp.traces_url();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url.clone())
        .build()
        .map_err(|source| TelemetryError::Exporter { url, source })?;
    let resource = Resource::builder()
        .with_service_name(SERVICE_NAME)
        .with_attributes([
            KeyValue::new("service.version", crate::run::VERSION),
            KeyValue::new("k8s.namespace.name", otlp.namespace.clone()),
        ])
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Events of the export path itself (the SDK, its HTTP client) are logged but never turned
/// into spans or span events: exporting them would feed the exporter its own traffic.
fn export_path(target: &str) -> bool {
    ["opentelemetry", "reqwest", "hyper", "h2", "tower", "rustls"]
        .iter()
        .any(|p| target.starts_with(p))
}

/// Installs the global subscriber: `filter`, the fmt layer on stderr and, when `otlp` is given,
/// the OpenTelemetry layer. `main` calls it once; so do tests that look at exported spans.
///
/// # Errors
/// When the exporter cannot be built or a global subscriber exists already.
pub fn init(filter: EnvFilter, otlp: Option<&Otlp>) -> Result<Telemetry, TelemetryError> {
    let provider = otlp.map(tracer_provider).transpose()?;
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(SERVICE_NAME))
            .with_filter(filter_fn(|m| !export_path(m.target())))
    });
    let installed = Registry::default()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(otel)
        .try_init();
    if let Err(e) = installed {
        if let Some(p) = provider {
            let _ = p.shutdown_with_timeout(Duration::ZERO);
        }
        return Err(e.into());
    }
    Ok(Telemetry { provider })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_url_follows_the_specification() {
        for (endpoint, want) in [
            ("http://collector:4318", "http://collector:4318/v1/traces"),
            ("http://collector:4318/", "http://collector:4318/v1/traces"),
            (
                "https://otel.example/base",
                "https://otel.example/base/v1/traces",
            ),
        ] {
            let o = Otlp {
                endpoint: endpoint.into(),
                namespace: "medmesh-system".into(),
            };
            assert_eq!(o.traces_url(), want);
        }
    }

    #[test]
    fn the_export_path_is_not_traced() {
        assert!(export_path("opentelemetry_sdk"));
        assert!(export_path("hyper_util::client"));
        assert!(!export_path("medmesh_operator::webhook"));
        assert!(!export_path("kube_runtime::controller"));
    }
}
