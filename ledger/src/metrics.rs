//! Prometheus metrics of the ledger. Every label value comes from a fixed set.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The ledger's metrics, registered once at start. Clones share them through one reference count
/// (the API clones its state, and with it these, for every request).
#[derive(Clone, Debug)]
pub struct Metrics(std::sync::Arc<MetricSet>);

impl std::ops::Deref for Metrics {
    type Target = MetricSet;
    fn deref(&self) -> &MetricSet {
        &self.0
    }
}

/// The metrics themselves (see [`Metrics`]).
#[derive(Debug)]
pub struct MetricSet {
    /// Entries by result: appended, duplicate, conflict, failed.
    pub appends: IntCounterVec,
    /// Entries per committed transaction.
    pub batch_entries: Histogram,
    /// Time from enqueue to durable acknowledgement.
    pub append_seconds: Histogram,
    /// Time of one write transaction including its fsync.
    pub commit_seconds: Histogram,
    /// Write and sync of one group of write-ahead log frames.
    pub wal_sync_seconds: Histogram,
    /// Committed tree size.
    pub tree_size: IntGauge,
    /// Size of the latest published checkpoint.
    pub checkpoint_size: IntGauge,
    /// Unix time (seconds) of the latest published checkpoint; age = now - this.
    pub checkpoint_time: IntGauge,
    /// Seconds since the latest checkpoint was published (set at scrape time).
    pub checkpoint_age: prometheus::Gauge,
    /// Checkpoints signed.
    pub checkpoints: IntCounter,
    /// HTTP requests by route and status class.
    pub requests: IntCounterVec,
    /// Requests refused, by reason.
    pub refusals: IntCounterVec,
    /// TLS handshakes that failed.
    pub handshake_failures: IntCounter,
    /// Time to build a proof, server side.
    pub proof_seconds: Histogram,
    /// Entries appended but not yet in the search indexes.
    pub index_lag: IntGauge,
    /// Replicated: time from proposing a batch to its acknowledgement (committed and applied).
    pub propose_seconds: Histogram,
    /// Replicated: time to serve one Raft RPC from a peer, by RPC.
    pub raft_rpc_seconds: prometheus::HistogramVec,
    /// Replicated: round trip of one Raft RPC sent to a peer, by RPC.
    pub raft_rpc_sent_seconds: prometheus::HistogramVec,
    /// Replicated: snapshots built here and installed here (sent by a leader).
    pub raft_snapshots: IntCounterVec,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    match r {
        Ok(v) => v,
        // Metric definitions are static: a failure here is a programming error caught by tests.
        Err(e) => panic!("invalid metric definition: {e}"),
    }
}

impl Metrics {
    /// Counts each placed entry by its result.
    pub fn count_placed(&self, placed: &[crate::storage::Placed]) {
        use crate::storage::Placed;
        for p in placed {
            self.appends
                .with_label_values(&[match p {
                    Placed::Appended { .. } => "appended",
                    Placed::Duplicate { .. } => "duplicate",
                    Placed::Conflict { .. } => "conflict",
                }])
                .inc();
        }
    }

    /// Creates the metrics and registers them in `registry` under the `medmesh_ledger_` prefix.
    pub fn register(registry: &Registry) -> Self {
        let ms =
            |lo: f64, n: usize| prometheus::exponential_buckets(lo, 2.0, n).unwrap_or_default();
        let m = MetricSet {
            appends: must(IntCounterVec::new(
                Opts::new(
                    "medmesh_ledger_appends_total",
                    "Entries submitted, by result",
                ),
                &["result"],
            )),
            batch_entries: must(Histogram::with_opts(
                HistogramOpts::new(
                    "medmesh_ledger_batch_entries",
                    "Entries per committed transaction",
                )
                .buckets(ms(1.0, 14)),
            )),
            append_seconds: must(Histogram::with_opts(
                HistogramOpts::new(
                    "medmesh_ledger_append_latency_seconds",
                    "Time from enqueue to durable acknowledgement",
                )
                .buckets(ms(0.000_125, 14)),
            )),
            commit_seconds: must(Histogram::with_opts(
                HistogramOpts::new(
                    "medmesh_ledger_commit_seconds",
                    "Duration of one write transaction (durable, or ahead of its write-ahead log sync)",
                )
                .buckets(ms(0.000_125, 14)),
            )),
            wal_sync_seconds: must(Histogram::with_opts(
                HistogramOpts::new(
                    "medmesh_ledger_wal_sync_seconds",
                    "Duration of one fdatasync of the write-ahead log (acknowledges every append it covers)",
                )
                .buckets(ms(0.000_125, 14)),
            )),
            tree_size: must(IntGauge::new(
                "medmesh_ledger_tree_size",
                "Committed entries",
            )),
            checkpoint_size: must(IntGauge::new(
                "medmesh_ledger_checkpoint_size",
                "Tree size of the latest published checkpoint",
            )),
            checkpoint_time: must(IntGauge::new(
                "medmesh_ledger_checkpoint_timestamp_seconds",
                "Unix time of the latest published checkpoint",
            )),
            checkpoint_age: must(prometheus::Gauge::new(
                "medmesh_ledger_checkpoint_age_seconds",
                "Seconds since the latest checkpoint was published",
            )),
            checkpoints: must(IntCounter::new(
                "medmesh_ledger_checkpoints_total",
                "Checkpoints signed",
            )),
            requests: must(IntCounterVec::new(
                Opts::new(
                    "medmesh_ledger_http_requests_total",
                    "API requests by route and status class",
                ),
                &["route", "status"],
            )),
            refusals: must(IntCounterVec::new(
                Opts::new(
                    "medmesh_ledger_refusals_total",
                    "Requests refused, by reason",
                ),
                &["reason"],
            )),
            handshake_failures: must(IntCounter::new(
                "medmesh_ledger_tls_handshake_failures_total",
                "TLS handshakes that failed",
            )),
            proof_seconds: must(Histogram::with_opts(
                HistogramOpts::new(
                    "medmesh_ledger_proof_seconds",
                    "Server-side proof construction time",
                )
                .buckets(ms(0.000_008, 14)),
            )),
            index_lag: must(IntGauge::new(
                "medmesh_ledger_index_lag_entries",
                "Entries appended but not yet in the search indexes",
            )),
            propose_seconds: must(Histogram::with_opts(
                HistogramOpts::new(
                    "medmesh_ledger_raft_propose_seconds",
                    "Time from proposing a batch to Raft until it is committed and applied",
                )
                .buckets(ms(0.000_125, 14)),
            )),
            raft_rpc_seconds: must(prometheus::HistogramVec::new(
                HistogramOpts::new(
                    "medmesh_ledger_raft_rpc_seconds",
                    "Time to serve one Raft RPC from a peer",
                )
                .buckets(ms(0.000_125, 14)),
                &["rpc"],
            )),
            raft_snapshots: must(IntCounterVec::new(
                Opts::new(
                    "medmesh_ledger_raft_snapshots_total",
                    "Raft snapshots built here, and installed here from the leader",
                ),
                &["event"],
            )),
            raft_rpc_sent_seconds: must(prometheus::HistogramVec::new(
                HistogramOpts::new(
                    "medmesh_ledger_raft_rpc_sent_seconds",
                    "Round trip of one Raft RPC sent to a peer",
                )
                .buckets(ms(0.000_125, 14)),
                &["rpc"],
            )),
        };
        for c in [
            Box::new(m.appends.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.batch_entries.clone()),
            Box::new(m.append_seconds.clone()),
            Box::new(m.commit_seconds.clone()),
            Box::new(m.wal_sync_seconds.clone()),
            Box::new(m.propose_seconds.clone()),
            Box::new(m.raft_rpc_seconds.clone()),
            Box::new(m.raft_rpc_sent_seconds.clone()),
            Box::new(m.raft_snapshots.clone()),
            Box::new(m.tree_size.clone()),
            Box::new(m.checkpoint_size.clone()),
            Box::new(m.checkpoint_time.clone()),
            Box::new(m.checkpoint_age.clone()),
            Box::new(m.checkpoints.clone()),
            Box::new(m.requests.clone()),
            Box::new(m.refusals.clone()),
            Box::new(m.handshake_failures.clone()),
            Box::new(m.proof_seconds.clone()),
            Box::new(m.index_lag.clone()),
        ] {
            must(registry.register(c));
        }
        Self(std::sync::Arc::new(m))
    }
}
