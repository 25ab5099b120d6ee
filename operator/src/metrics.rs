//! The operator's Prometheus metrics. Label values come from the enums here, never from object
//! names or error text.

use prometheus::{IntCounterVec, Opts, Registry};

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

/// Counters of the webhook and the identity service.
#[derive(Debug, Clone)]
pub struct Metrics {
    admissions: IntCounterVec,
    certificates: IntCounterVec,
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
        // Every series exists from the start, so rates work before the first event.
        for r in AdmissionResult::ALL {
            admissions.with_label_values(&[r.as_str()]);
        }
        for r in IssueResult::ALL {
            certificates.with_label_values(&[r.as_str()]);
        }
        registry.register(Box::new(admissions.clone()))?;
        registry.register(Box::new(certificates.clone()))?;
        Ok(Self {
            admissions,
            certificates,
        })
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

    /// Current count of a certificate result.
    pub fn certificates(&self, r: IssueResult) -> u64 {
        self.certificates.with_label_values(&[r.as_str()]).get()
    }
}
