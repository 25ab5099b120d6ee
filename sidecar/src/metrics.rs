//! Prometheus metrics of the sidecar. Every label value comes from a fixed set.

use medmesh_core::policy::Decision;
use medmesh_core::record::{EventKind, Outcome};
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The sidecar's metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Connections by direction (inbound/outbound), protocol and TLS outcome.
    pub connections: IntCounterVec,
    /// Connections open now, by direction.
    pub open: IntGaugeVec,
    /// Bytes proxied, by direction and way (to_app/from_app).
    pub bytes: IntCounterVec,
    /// TLS handshakes that failed, by direction and reason.
    pub handshake_failures: IntCounterVec,
    /// Authorization decisions (allow, deny, audit_deny) by kind (mtls, plaintext).
    pub authz: IntCounterVec,
    /// Detection outcomes by protocol (including timeout).
    pub detect: IntCounterVec,
    /// Unix time at which the current certificate expires.
    pub cert_expiry: IntGauge,
    /// Unix time from which the workload certificate is valid (its lifetime is the difference).
    pub cert_not_before: IntGauge,
    /// Credential reloads by result.
    pub cert_reloads: IntCounterVec,
    /// Policy reloads by result.
    pub policy_reloads: IntCounterVec,
    /// Outbound connections refused (no route, loop), by reason.
    pub refused: IntCounterVec,
    /// Upstream connect failures, by direction.
    pub connect_failures: IntCounterVec,
    /// Whether credentials are loaded (1) or not (0).
    pub ready: IntGauge,
    /// Connections cut by the drain deadline.
    pub drain_cut: IntCounter,
    /// Audit records by what happened to them (acknowledged, spooled, not_acknowledged,
    /// delivered, dropped).
    pub records: IntCounterVec,
    /// Records in the spool, not yet acknowledged by the ledger.
    pub spool_depth: IntGauge,
    /// Unix time of the oldest record in the spool (0 when it is empty).
    pub spool_oldest: IntGauge,
    /// Audit records made, by event kind and outcome.
    pub audit_events: IntCounterVec,
    /// Time for the ledger to acknowledge gated records (enforce).
    pub audit_gate_seconds: Histogram,
    /// Responses turned into failures because their record could not be made safe.
    pub failed_responses: IntCounter,
    /// Archived objects by what happened to them (staged, archived, skipped_full,
    /// staging_failed, discarded, corrupt).
    pub archive_objects: IntCounterVec,
    /// Ciphertext bytes in the archive staging area (committed and being written).
    pub archive_staged_bytes: IntGauge,
    /// Objects committed to staging and not yet confirmed archived.
    pub archive_backlog: IntGauge,
    /// Limit of the staging area, in bytes.
    pub archive_staging_limit_bytes: IntGauge,
    /// Upload or pin-confirmation attempts that failed (retried with backoff).
    pub archive_upload_failures: IntCounter,
    /// Ciphertext bytes confirmed archived.
    pub archive_bytes: IntCounter,
    /// Changes of the archive recipients read from the audit settings, by result.
    pub archive_key_reloads: IntCounterVec,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    match r {
        Ok(v) => v,
        // Metric definitions are static: a failure is a programming error caught by tests.
        Err(e) => panic!("invalid metric definition: {e}"),
    }
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    must(IntCounterVec::new(Opts::new(name, help), labels))
}

impl Metrics {
    /// Creates the metrics and registers them under the `medmesh_sidecar_` prefix.
    pub fn register(registry: &Registry) -> Self {
        let m = Self {
            connections: counter(
                "medmesh_sidecar_connections_total",
                "Connections by direction, protocol and TLS outcome",
                &["direction", "protocol", "tls"],
            ),
            open: must(IntGaugeVec::new(
                Opts::new("medmesh_sidecar_open_connections", "Connections open now"),
                &["direction"],
            )),
            bytes: counter(
                "medmesh_sidecar_bytes_total",
                "Bytes proxied",
                &["direction", "way"],
            ),
            handshake_failures: counter(
                "medmesh_sidecar_tls_handshake_failures_total",
                "TLS handshakes that failed, by reason",
                &["direction", "reason"],
            ),
            authz: counter(
                "medmesh_sidecar_authz_decisions_total",
                "Authorization decisions, by transport, decision and inbound port (a port the \
                 policy declares, else other)",
                &["kind", "decision", "port"],
            ),
            detect: counter(
                "medmesh_sidecar_protocol_detections_total",
                "Protocol detection outcomes",
                &["direction", "protocol"],
            ),
            cert_expiry: must(IntGauge::new(
                "medmesh_sidecar_certificate_expiry_timestamp_seconds",
                "Unix time at which the workload certificate expires",
            )),
            cert_not_before: must(IntGauge::new(
                "medmesh_sidecar_certificate_not_before_timestamp_seconds",
                "Unix time from which the workload certificate is valid",
            )),
            cert_reloads: counter(
                "medmesh_sidecar_certificate_reloads_total",
                "Credential reloads by result",
                &["result"],
            ),
            policy_reloads: counter(
                "medmesh_sidecar_policy_reloads_total",
                "Policy reloads by result",
                &["result"],
            ),
            refused: counter(
                "medmesh_sidecar_refused_connections_total",
                "Connections refused before any upstream connection, by reason",
                &["direction", "reason"],
            ),
            connect_failures: counter(
                "medmesh_sidecar_connect_failures_total",
                "Upstream connect failures",
                &["direction"],
            ),
            ready: must(IntGauge::new(
                "medmesh_sidecar_ready",
                "1 when credentials are loaded",
            )),
            drain_cut: must(IntCounter::new(
                "medmesh_sidecar_drain_cut_connections_total",
                "Connections cut at the drain deadline",
            )),
            records: counter(
                "medmesh_sidecar_audit_records_total",
                "Audit records by outcome of delivery",
                &["result"],
            ),
            spool_depth: must(IntGauge::new(
                "medmesh_sidecar_spool_depth",
                "Audit records in the spool, not yet acknowledged by the ledger",
            )),
            spool_oldest: must(IntGauge::new(
                "medmesh_sidecar_spool_oldest_timestamp_seconds",
                "Unix time of the oldest record in the spool, 0 when it is empty",
            )),
            audit_events: counter(
                "medmesh_sidecar_audit_events_total",
                "Audit records made, by event kind and outcome",
                &["kind", "outcome"],
            ),
            audit_gate_seconds: must(Histogram::with_opts(
                HistogramOpts::new(
                    "medmesh_sidecar_audit_gate_seconds",
                    "Time for the ledger to acknowledge gated records (enforce), or to time out",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )),
            failed_responses: must(IntCounter::new(
                "medmesh_sidecar_audit_failed_responses_total",
                "Success responses replaced by failures because their record could not be made safe",
            )),
            archive_objects: counter(
                "medmesh_sidecar_archive_objects_total",
                "Archived instances by outcome",
                &["result"],
            ),
            archive_staged_bytes: must(IntGauge::new(
                "medmesh_sidecar_archive_staged_bytes",
                "Ciphertext bytes in the archive staging area",
            )),
            archive_backlog: must(IntGauge::new(
                "medmesh_sidecar_archive_backlog",
                "Instances staged and not yet confirmed archived",
            )),
            archive_staging_limit_bytes: must(IntGauge::new(
                "medmesh_sidecar_archive_staging_limit_bytes",
                "Limit of the archive staging area",
            )),
            archive_upload_failures: must(IntCounter::new(
                "medmesh_sidecar_archive_upload_failures_total",
                "Archive uploads or pin confirmations that failed and will be retried",
            )),
            archive_bytes: must(IntCounter::new(
                "medmesh_sidecar_archive_bytes_total",
                "Ciphertext bytes confirmed archived",
            )),
            archive_key_reloads: counter(
                "medmesh_sidecar_archive_key_reloads_total",
                "Changes of the archive recipients read from the audit settings, by result",
                &["result"],
            ),
        };
        for c in [
            Box::new(m.connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.open.clone()),
            Box::new(m.bytes.clone()),
            Box::new(m.handshake_failures.clone()),
            Box::new(m.authz.clone()),
            Box::new(m.detect.clone()),
            Box::new(m.cert_expiry.clone()),
            Box::new(m.cert_not_before.clone()),
            Box::new(m.cert_reloads.clone()),
            Box::new(m.policy_reloads.clone()),
            Box::new(m.refused.clone()),
            Box::new(m.connect_failures.clone()),
            Box::new(m.ready.clone()),
            Box::new(m.drain_cut.clone()),
            Box::new(m.records.clone()),
            Box::new(m.spool_depth.clone()),
            Box::new(m.spool_oldest.clone()),
            Box::new(m.audit_events.clone()),
            Box::new(m.audit_gate_seconds.clone()),
            Box::new(m.failed_responses.clone()),
            Box::new(m.archive_objects.clone()),
            Box::new(m.archive_staged_bytes.clone()),
            Box::new(m.archive_backlog.clone()),
            Box::new(m.archive_staging_limit_bytes.clone()),
            Box::new(m.archive_upload_failures.clone()),
            Box::new(m.archive_bytes.clone()),
            Box::new(m.archive_key_reloads.clone()),
        ] {
            must(registry.register(c));
        }
        // Every enumerated series exists from the start, so rates and alerts work before the
        // first event (reasons and protocols, open-ended, appear when they first occur).
        for r in [
            "spooled",
            "acknowledged",
            "not_acknowledged",
            "delivered",
            "dropped",
        ] {
            m.records.with_label_values(&[r]);
        }
        for r in [
            "staged",
            "archived",
            "skipped_full",
            "staging_failed",
            "discarded",
            "corrupt",
        ] {
            m.archive_objects.with_label_values(&[r]);
        }
        for kind in EventKind::ALL {
            for outcome in Outcome::ALL {
                m.audit_events
                    .with_label_values(&[kind.as_str(), outcome.as_str()]);
            }
        }
        for kind in ["mtls", "plaintext"] {
            for d in [Decision::Allow, Decision::Deny, Decision::AuditDeny] {
                m.authz.with_label_values(&[kind, d.as_str(), "other"]);
            }
        }
        for c in [&m.cert_reloads, &m.policy_reloads, &m.archive_key_reloads] {
            for r in ["ok", "error"] {
                c.with_label_values(&[r]);
            }
        }
        m
    }
}
