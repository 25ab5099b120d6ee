use std::sync::{Arc, Mutex};

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

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
        assert_eq!(Otlp::new(endpoint).traces_url(), want);
    }
}

#[test]
fn endpoints_are_checked() {
    for ok in ["http://collector:4318", "https://otel.example/base"] {
        assert_eq!(check_endpoint(ok), Ok(()), "{ok}");
    }
    for bad in [
        "collector:4318",
        "ftp://collector",
        "http://",
        "http://c:4318/?x=1",
    ] {
        let e = check_endpoint(bad).unwrap_err();
        assert!(e.starts_with("otlp-endpoint"), "{bad}: {e}");
    }
}

#[test]
fn the_export_path_is_not_traced() {
    assert!(export_path("opentelemetry_sdk"));
    assert!(export_path("hyper_util::client"));
    assert!(!export_path("medmesh_operator::webhook"));
    assert!(!export_path("medmesh_sidecar::dicom_proxy"));
}

/// Spans ended, kept in memory.
#[derive(Debug, Clone, Default)]
struct Kept(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Kept {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

/// Runs `f` under a subscriber that exports to `Kept` (simple processor: spans are there as
/// soon as they end).
fn traced(f: impl FnOnce()) -> Vec<SpanData> {
    let kept = Kept::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(kept.clone())
        .build();
    let subscriber =
        Registry::default().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
    tracing::subscriber::with_default(subscriber, f);
    provider.shutdown().unwrap();
    kept.0.lock().unwrap().clone()
}

#[test]
fn trace_context_crosses_a_request_as_parent_and_child() {
    let mut headers = http::HeaderMap::new();
    let spans = traced(|| {
        let client = tracing::info_span!("client");
        inject(&client, &mut headers);
        let server = tracing::info_span!("server");
        assert!(extract(&server, &headers));
        server.in_scope(|| {
            let _ = tracing::info_span!("commit").entered();
        });
    });
    let tp = headers[TRACEPARENT].to_str().unwrap();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(
        (parts[0], parts[1].len(), parts[2].len(), parts[3]),
        ("00", 32, 16, "01"),
        "{tp}"
    );
    let by = |n: &str| spans.iter().find(|s| s.name == n).unwrap();
    let (client, server, commit) = (by("client"), by("server"), by("commit"));
    let trace = client.span_context.trace_id();
    assert_eq!(trace, TraceId::from_hex(parts[1]).unwrap());
    assert_eq!(
        client.span_context.span_id(),
        SpanId::from_hex(parts[2]).unwrap()
    );
    assert_eq!(server.span_context.trace_id(), trace);
    assert_eq!(server.parent_span_id, client.span_context.span_id());
    assert!(server.parent_span_is_remote);
    assert_eq!(commit.span_context.trace_id(), trace);
    assert_eq!(commit.parent_span_id, server.span_context.span_id());
}

#[test]
fn a_bad_or_missing_traceparent_starts_a_new_trace() {
    for value in [
        None,
        Some("garbage"),
        Some("00-00000000000000000000000000000000-0000000000000000-01"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"),
    ] {
        let mut headers = http::HeaderMap::new();
        if let Some(v) = value {
            headers.insert(TRACEPARENT, http::HeaderValue::from_static(v));
        }
        let spans = traced(|| {
            let server = tracing::info_span!("server");
            assert!(!extract(&server, &headers), "{value:?}");
            let _ = server.entered();
        });
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].parent_span_id, SpanId::INVALID, "{value:?}");
    }
}

#[test]
fn nothing_is_injected_when_spans_are_not_exported() {
    let mut headers = http::HeaderMap::new();
    let span = tracing::info_span!("client");
    inject(&span, &mut headers);
    assert!(headers.is_empty(), "{headers:?}");
}
