//! The operator's Prometheus metrics. Label values come from the enums here, never from object
//! names or error text.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// The outcome of one admission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmissionResult {
    /// The sidecar was injected.
    Injected,
    /// The Pod opted out (`medmesh.io/inject: disabled`).
    Disabled,
    /// The Pod was injected before.
    AlreadyInjected,
    /// A hostNetwork Pod: allowed without injection.
    HostNetwork,
    /// Not a Pod CREATE: allowed untouched.
    Ignored,
    /// Refused (the message says why).
    Denied,
    /// The body was not an AdmissionReview.
    Malformed,
}

impl AdmissionResult {
    const ALL: [Self; 7] = [
        Self::Injected,
        Self::Disabled,
        Self::AlreadyInjected,
        Self::HostNetwork,
        Self::Ignored,
        Self::Denied,
        Self::Malformed,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Injected => "injected",
            Self::Disabled => "disabled",
            Self::AlreadyInjected => "already_injected",
            Self::HostNetwork => "host_network",
            Self::Ignored => "ignored",
            Self::Denied => "denied",
            Self::Malformed => "malformed",
        }
    }
}

/// The outcome of one certificate request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueResult {
    /// A certificate was issued.
    Issued,
    /// The token was not authenticated (401).
    Unauthenticated,
    /// The CSR does not match the token's identity (403).
    Forbidden,
    /// The request or CSR is malformed (400).
    BadRequest,
    /// TokenReview or signing failed (5xx).
    Error,
}

impl IssueResult {
    const ALL: [Self; 5] = [
        Self::Issued,
        Self::Unauthenticated,
        Self::Forbidden,
        Self::BadRequest,
        Self::Error,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Issued => "issued",
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::BadRequest => "bad_request",
            Self::Error => "error",
        }
    }
}

/// The metrics of the webhook, the identity service and the replica's state.
#[derive(Debug, Clone)]
pub struct Metrics {
    admissions: IntCounterVec,
    admission_seconds: Histogram,
    certificates: IntCounterVec,
    leader: IntGauge,
    ca_expiry: IntGaugeVec,
}

/// Which certificate authority a `ca_certificate_expiry_timestamp_seconds` series is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaKind {
    /// The workload CA that signs SVIDs.
    Workload,
    /// The CA of the operator's own HTTPS certificate (webhook, identity service).
    Serving,
}

impl CaKind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Workload => "workload",
            Self::Serving => "serving",
        }
    }
}

impl Metrics {
    /// Creates the metrics and registers them (the caller chooses the registry's prefix).
    ///
    /// # Errors
    /// When a metric of the same name is already registered.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let admissions = IntCounterVec::new(
            Opts::new("admissions_total", "Admission requests by result"),
            &["result"],
        )?;
        let certificates = IntCounterVec::new(
            Opts::new("certificates_total", "Certificate requests by result"),
            &["result"],
        )?;
        // The API server's webhook timeout is 10 s; buckets from 1 ms.
        let admission_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "admission_duration_seconds",
                "Time to answer one admission request",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )?;
        let leader = IntGauge::new(
            "leader",
            "1 while this replica holds the Lease and runs the controllers",
        )?;
        let ca_expiry = IntGaugeVec::new(
            Opts::new(
                "ca_certificate_expiry_timestamp_seconds",
                "Unix time at which a CA certificate of the operator expires",
            ),
            &["ca"],
        )?;
        // Every series exists from the start, so rates work before the first event.
        for r in AdmissionResult::ALL {
            admissions.with_label_values(&[r.as_str()]);
        }
        for r in IssueResult::ALL {
            certificates.with_label_values(&[r.as_str()]);
        }
        registry.register(Box::new(admissions.clone()))?;
        registry.register(Box::new(admission_seconds.clone()))?;
        registry.register(Box::new(certificates.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(ca_expiry.clone()))?;
        Ok(Self {
            admissions,
            admission_seconds,
            certificates,
            leader,
            ca_expiry,
        })
    }

    /// Records how long one admission took.
    pub fn admission_took(&self, d: std::time::Duration) {
        self.admission_seconds.observe(d.as_secs_f64());
    }

    /// Whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// When the `ca` certificate expires (Unix seconds).
    pub fn set_ca_expiry(&self, ca: CaKind, not_after_unix: i64) {
        self.ca_expiry
            .with_label_values(&[ca.as_str()])
            .set(not_after_unix);
    }

    /// Counts one admission.
    pub fn admission(&self, r: AdmissionResult) {
        self.admissions.with_label_values(&[r.as_str()]).inc();
    }

    /// Counts one certificate request.
    pub fn certificate(&self, r: IssueResult) {
        self.certificates.with_label_values(&[r.as_str()]).inc();
    }

    /// Current count of an admission result (tests and the benchmark).
    pub fn admissions(&self, r: AdmissionResult) -> u64 {
        self.admissions.with_label_values(&[r.as_str()]).get()
    }

    /// Admissions timed so far (every answered request, refused ones included).
    pub fn admissions_timed(&self) -> u64 {
        self.admission_seconds.get_sample_count()
    }

    /// Current count of a certificate result.
    pub fn certificates(&self, r: IssueResult) -> u64 {
        self.certificates.with_label_values(&[r.as_str()]).get()
    }
}

/// Which controller reconciled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControllerKind {
    /// The `AuditLedger` controller.
    AuditLedger,
    /// The `MeshPolicy` (per namespace) controller.
    MeshPolicy,
    /// The `ImageArchive` controller.
    ImageArchive,
}

impl ControllerKind {
    const ALL: [Self; 3] = [Self::AuditLedger, Self::MeshPolicy, Self::ImageArchive];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AuditLedger => "audit_ledger",
            Self::MeshPolicy => "mesh_policy",
            Self::ImageArchive => "image_archive",
        }
    }
}

/// How a reconcile ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconcileResult {
    /// It wrote what it had to (or nothing was needed).
    Success,
    /// It failed and will be retried.
    Error,
}

impl ReconcileResult {
    const ALL: [Self; 2] = [Self::Success, Self::Error];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Error => "error",
        }
    }
}

/// Reconcile counts and durations per controller.
#[derive(Debug, Clone)]
pub struct ReconcileMetrics {
    reconciles: IntCounterVec,
    duration: prometheus::HistogramVec,
}

impl ReconcileMetrics {
    /// Creates the metrics and registers them.
    ///
    /// # Errors
    /// When a metric of the same name is already registered.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let reconciles = IntCounterVec::new(
            Opts::new("reconciles_total", "Reconciles by controller and result"),
            &["controller", "result"],
        )?;
        let duration = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(
                "reconcile_duration_seconds",
                "Duration of reconciles by controller",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["controller"],
        )?;
        for c in ControllerKind::ALL {
            for r in ReconcileResult::ALL {
                reconciles.with_label_values(&[c.as_str(), r.as_str()]);
            }
            duration.with_label_values(&[c.as_str()]);
        }
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Self {
            reconciles,
            duration,
        })
    }

    /// Metrics that go nowhere (tests).
    pub fn unregistered() -> Self {
        // Registering into a throwaway registry cannot collide.
        match Self::register(&Registry::new()) {
            Ok(m) => m,
            Err(e) => unreachable!("fresh registry: {e}"),
        }
    }

    /// Starts timing one reconcile.
    pub fn start(&self, controller: ControllerKind) -> ReconcileTimer {
        ReconcileTimer {
            metrics: self.clone(),
            controller,
            start: std::time::Instant::now(),
        }
    }

    /// Current count (tests).
    pub fn reconciles(&self, c: ControllerKind, r: ReconcileResult) -> u64 {
        self.reconciles
            .with_label_values(&[c.as_str(), r.as_str()])
            .get()
    }
}

/// One reconcile being timed.
#[derive(Debug)]
pub struct ReconcileTimer {
    metrics: ReconcileMetrics,
    controller: ControllerKind,
    start: std::time::Instant,
}

impl ReconcileTimer {
    /// Records its result and duration.
    pub fn finish(self, result: ReconcileResult) {
        let c = self.controller.as_str();
        self.metrics
            .reconciles
            .with_label_values(&[c, result.as_str()])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[c])
            .observe(self.start.elapsed().as_secs_f64());
    }
}
