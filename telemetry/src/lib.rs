//! Logs and traces of every medmesh process.
//!
//! [`init`] installs the process's one `tracing` subscriber: the env filter (`RUST_LOG`, `info`
//! by default), the fmt layer on stderr and, only when an OTLP endpoint is given, a
//! `tracing-opentelemetry` layer whose spans go to `<endpoint>/v1/traces` over OTLP/HTTP
//! (protobuf). Without an endpoint no OpenTelemetry object is created at all, and
//! [`inject`] adds no header.
//!
//! Spans are exported by the SDK's batch span processor, which runs on a thread of its own with
//! the blocking reqwest client: the data path only hands a finished span to a bounded queue
//! (spans are dropped, never waited for, when the collector is slow or absent).
//! [`Telemetry::shutdown`] flushes that queue and stops the thread; `main` calls it after the
//! runtime has stopped, so that spans of the drain are sent too.
//!
//! Trace context crosses processes as W3C Trace Context headers (`traceparent`, `tracestate`):
//! the sidecar's ledger client [`inject`]s the current span's context into its append request
//! and the ledger [`extract`]s it as the parent of its own spans, so that one transfer is one
//! trace from the sidecar's socket to the ledger's Merkle leaf.
//!
//! Which spans each process makes, and which attributes they carry, is documented where they
//! are made; the rule for all of them: names, kinds, sizes, counts, bounded results, workload
//! identities and record ids (keyed hashes); never a DICOM identifier, an AE title, a URL path,
//! a token or a body.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// Longest [`Telemetry::shutdown`] waits for the last spans to be sent.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// The W3C Trace Context header naming the caller's span.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C Trace Context header carrying vendor state along.
pub const TRACESTATE: &str = "tracestate";

/// Where traces go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Otlp {
    /// The OTLP base endpoint (`http://collector:4318`); spans are posted to
    /// `<endpoint>/v1/traces`, as `OTEL_EXPORTER_OTLP_ENDPOINT` means in the OpenTelemetry
    /// specification.
    pub endpoint: String,
    /// Resource attributes beyond `service.name` and `service.version`
    /// (`k8s.namespace.name`, `k8s.pod.name`…).
    pub attributes: Vec<(&'static str, String)>,
}

impl Otlp {
    /// Spans to `endpoint`, with no attributes beyond the service's.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            attributes: Vec::new(),
        }
    }

    /// The URL spans are posted to.
    pub fn traces_url(&self) -> String {
        format!("{}/v1/traces", self.endpoint.trim_end_matches('/'))
    }
}

/// Whether `endpoint` can be an OTLP base endpoint: an `http://` or `https://` URL with a host
/// and no query. The message names the problem, for a configuration error list.
///
/// # Errors
/// When it cannot.
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let scheme_ok = endpoint.starts_with("http://") || endpoint.starts_with("https://");
    match endpoint.parse::<http::Uri>() {
        Ok(u) if scheme_ok && u.host().is_some() && u.query().is_none() => Ok(()),
        _ => Err(format!(
            "otlp-endpoint {endpoint:?}: must be an http:// or https:// URL without a query"
        )),
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

/// The tracer provider for `otlp`: OTLP/HTTP protobuf, batch span processor, resource
/// attributes `service.name`, `service.version`, `otlp.attributes` and whatever
/// `OTEL_RESOURCE_ATTRIBUTES` adds.
///
/// # Errors
/// When the endpoint is not a URL or the HTTP client cannot be built.
pub fn tracer_provider(
    service: &'static str,
    version: &'static str,
    otlp: &Otlp,
) -> Result<SdkTracerProvider, TelemetryError> {
    let url = otlp.traces_url();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url.clone())
        .build()
        .map_err(|source| TelemetryError::Exporter { url, source })?;
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attributes(
            std::iter::once(KeyValue::new("service.version", version)).chain(
                otlp.attributes
                    .iter()
                    .map(|(k, v)| KeyValue::new(*k, v.clone())),
            ),
        )
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

/// What the exporter receives: spans down to DEBUG (the data path makes its per-transfer spans
/// at DEBUG so that they cost nothing unless exported) and events down to INFO, except those
/// of the export path.
fn exported(m: &tracing::Metadata<'_>) -> bool {
    let level = if m.is_span() {
        tracing::Level::DEBUG
    } else {
        tracing::Level::INFO
    };
    *m.level() <= level && !export_path(m.target())
}

/// Installs the global subscriber: `filter`, the fmt layer on stderr and, when `otlp` is given,
/// the OpenTelemetry layer for `service` at `version`. `main` calls it once; so do tests that
/// look at exported spans.
///
/// # Errors
/// When the exporter cannot be built or a global subscriber exists already.
pub fn init(
    service: &'static str,
    version: &'static str,
    filter: EnvFilter,
    otlp: Option<&Otlp>,
) -> Result<Telemetry, TelemetryError> {
    let provider = otlp
        .map(|o| tracer_provider(service, version, o))
        .transpose()?;
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service))
            .with_filter(filter_fn(exported))
    });
    // Each layer has its own filter: the logs follow `filter`, the data path's DEBUG spans go
    // only to the exporter. Without an exporter nothing is interested in them, so they are
    // never even created (a disabled callsite costs one branch).
    let installed = Registry::default()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
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

/// [`init`] as a binary's `main` calls it: the filter from `RUST_LOG` ([`env_filter`]), and a
/// log line naming where spans go, when they go anywhere.
///
/// # Errors
/// As [`init`].
pub fn start(
    service: &'static str,
    version: &'static str,
    otlp: Option<&Otlp>,
) -> Result<Telemetry, TelemetryError> {
    let t = init(service, version, env_filter(), otlp)?;
    if let Some(o) = otlp {
        tracing::info!(url = %o.traces_url(), "exporting traces over OTLP/HTTP");
    }
    Ok(t)
}

/// The filter of `RUST_LOG`, `info` when it is unset or invalid.
pub fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Adds `span`'s context to `headers` as W3C Trace Context (`traceparent`, and `tracestate`
/// when there is any). Nothing is added when spans are not exported (the span has no valid
/// OpenTelemetry context).
pub fn inject(span: &tracing::Span, headers: &mut http::HeaderMap) {
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    }
}

/// Makes the caller named by `headers`' W3C Trace Context the parent of `span`; call it before
/// `span` is first entered. A missing or malformed `traceparent` leaves `span` a root: a bad
/// header never fails a request, it only starts a new trace. Returns whether a parent was set.
pub fn extract(span: &tracing::Span, headers: &http::HeaderMap) -> bool {
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if !cx.span().span_context().is_valid() {
        return false;
    }
    span.set_parent(cx).is_ok()
}

#[cfg(test)]
mod tests;
