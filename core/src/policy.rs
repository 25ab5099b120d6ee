//! The policy a sidecar enforces: per inbound port, which identities may connect and how the
//! bytes are to be read; which outbound destinations are outside the mesh. Default deny.
//!
//! The operator compiles a namespace's `MeshPolicy` objects into this document; the sidecar
//! reads it from a file (JSON or YAML) and reloads it when it changes.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::spiffe::{SpiffeId, TrustDomain};

/// Why a policy document is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The document does not parse.
    #[error("policy does not parse: {0}")]
    Parse(String),
    /// A rule is invalid; every problem is listed.
    #[error("invalid policy: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

/// How the bytes on a port are to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ProtocolHint {
    /// Detect from the first bytes (HTTP/1, HTTP/2, DICOM, else opaque).
    #[default]
    Detect,
    /// DICOM upper layer (DIMSE).
    Dicom,
    /// HTTP (DICOMweb or other).
    Http,
    /// An opaque byte stream: no detection (use for server-speaks-first protocols).
    Opaque,
}

/// Whether denials are enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Deny what the policy does not allow.
    #[default]
    Enforce,
    /// Allow everything, but count and log what would have been denied.
    Audit,
}

/// Who may connect.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Principal {
    /// Exactly this SPIFFE ID.
    Id(SpiffeId),
    /// A Kubernetes service account, `namespace/name`.
    ServiceAccount(String),
    /// Every workload of a Kubernetes namespace.
    Namespace(String),
    /// Every workload of the mesh trust domain.
    AnyInTrustDomain,
}

impl Principal {
    fn matches(&self, id: &SpiffeId, td: &TrustDomain) -> bool {
        if !id.is_in(td) {
            return false;
        }
        match self {
            Self::Id(want) => want == id,
            Self::ServiceAccount(sa) => id
                .workload()
                .is_ok_and(|(ns, name)| sa.split_once('/') == Some((ns, name))),
            Self::Namespace(want) => id.workload().is_ok_and(|(ns, _)| ns == want),
            Self::AnyInTrustDomain => true,
        }
    }

    fn check(&self, td: &TrustDomain, errs: &mut Vec<String>, at: &str) {
        let seg_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        };
        match self {
            Self::Id(id) if !id.is_in(td) => {
                errs.push(format!("{at}: {id} is outside trust domain {td}"));
            }
            Self::ServiceAccount(sa) => match sa.split_once('/') {
                Some((ns, name)) if seg_ok(ns) && seg_ok(name) => {}
                _ => errs.push(format!(
                    "{at}: service account {sa:?} is not <namespace>/<name>"
                )),
            },
            Self::Namespace(ns) if !seg_ok(ns) => {
                errs.push(format!("{at}: namespace {ns:?} is not a valid name"));
            }
            _ => {}
        }
    }
}

/// Policy of one inbound port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundPort {
    /// The application's port.
    pub port: u16,
    /// How to read the bytes.
    #[serde(default)]
    pub protocol: ProtocolHint,
    /// Who may connect over mTLS. Empty: nobody.
    #[serde(default)]
    pub allow: Vec<Principal>,
    /// Accept plaintext from outside the mesh (health probes, legacy devices).
    #[serde(default)]
    pub permissive: bool,
}

/// A destination outside the mesh that workloads may reach directly (no mTLS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalDestination {
    /// Address range, e.g. `10.1.2.0/24` or `192.0.2.7/32`.
    pub cidr: String,
    /// Ports; empty means all.
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// A meshed destination whose server identity is pinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedDestination {
    /// Address range of the destination.
    pub cidr: String,
    /// Port; absent means all.
    #[serde(default)]
    pub port: Option<u16>,
    /// The only server identity accepted there.
    pub identity: SpiffeId,
}

/// The whole document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyDoc {
    /// Enforce or audit.
    #[serde(default)]
    pub mode: Mode,
    /// Inbound ports. A port not listed refuses everything.
    #[serde(default)]
    pub inbound: Vec<InboundPort>,
    /// Destinations outside the mesh.
    #[serde(default)]
    pub external: Vec<ExternalDestination>,
    /// Pinned server identities.
    #[serde(default)]
    pub pinned: Vec<PinnedDestination>,
}

/// An address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`, `x::y/n`, or a bare address (a /32 or /128).
    ///
    /// # Errors
    /// When the text is not a CIDR.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?} has an invalid prefix length"))?,
        };
        Ok(Self { addr, prefix })
    }

    /// Whether `ip` is inside the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The decision on an inbound connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by a rule.
    Allow,
    /// Denied.
    Deny,
    /// Would be denied, but the policy is in audit mode: allowed and counted.
    AuditDeny,
}

impl Decision {
    /// Whether the connection proceeds.
    pub fn proceeds(self) -> bool {
        !matches!(self, Self::Deny)
    }

    /// A bounded metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::AuditDeny => "audit_deny",
        }
    }
}

/// Where an outbound connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Inside the mesh: originate mTLS, accepting this server identity.
    Mesh(crate::tls::ServerIdentity),
    /// An allowed destination outside the mesh: forward plaintext.
    External,
}

/// A checked policy, ready for lookups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    doc: PolicyDoc,
    td: TrustDomain,
    external: Vec<(Cidr, Vec<u16>)>,
    pinned: Vec<(Cidr, Option<u16>, SpiffeId)>,
}

impl Policy {
    /// The policy that denies every inbound connection and sends everything outbound into the
    /// mesh: what a sidecar enforces before it has read a policy.
    pub fn deny_all(td: TrustDomain) -> Self {
        Self {
            doc: PolicyDoc::default(),
            td,
            external: Vec::new(),
            pinned: Vec::new(),
        }
    }

    /// Parses a JSON document (YAML documents are converted by the caller).
    ///
    /// # Errors
    /// [`PolicyError::Parse`] or [`PolicyError::Invalid`] with every problem found.
    pub fn from_json(text: &str, td: TrustDomain) -> Result<Self, PolicyError> {
        let doc: PolicyDoc =
            serde_json::from_str(text).map_err(|e| PolicyError::Parse(e.to_string()))?;
        Self::new(doc, td)
    }

    /// Checks a document.
    ///
    /// # Errors
    /// [`PolicyError::Invalid`] with every problem found.
    pub fn new(doc: PolicyDoc, td: TrustDomain) -> Result<Self, PolicyError> {
        let mut errs = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, p) in doc.inbound.iter().enumerate() {
            if p.port == 0 {
                errs.push(format!("inbound[{i}]: port 0"));
            }
            if !seen.insert(p.port) {
                errs.push(format!("inbound[{i}]: port {} listed twice", p.port));
            }
            for (j, a) in p.allow.iter().enumerate() {
                a.check(&td, &mut errs, &format!("inbound[{i}].allow[{j}]"));
            }
        }
        let mut external = Vec::new();
        for (i, e) in doc.external.iter().enumerate() {
            match Cidr::parse(&e.cidr) {
                Ok(c) => external.push((c, e.ports.clone())),
                Err(m) => errs.push(format!("external[{i}]: {m}")),
            }
        }
        let mut pinned = Vec::new();
        for (i, p) in doc.pinned.iter().enumerate() {
            match Cidr::parse(&p.cidr) {
                Ok(c) => pinned.push((c, p.port, p.identity.clone())),
                Err(m) => errs.push(format!("pinned[{i}]: {m}")),
            }
            if !p.identity.is_in(&td) {
                errs.push(format!(
                    "pinned[{i}]: {} is outside trust domain {td}",
                    p.identity
                ));
            }
        }
        if !errs.is_empty() {
            return Err(PolicyError::Invalid(errs));
        }
        Ok(Self {
            doc,
            td,
            external,
            pinned,
        })
    }

    /// The document.
    pub fn doc(&self) -> &PolicyDoc {
        &self.doc
    }

    /// The inbound rule of `port`, if any.
    pub fn inbound(&self, port: u16) -> Option<&InboundPort> {
        self.doc.inbound.iter().find(|p| p.port == port)
    }

    /// Whether the mesh peer `id` may connect to `port`.
    pub fn authorize(&self, port: u16, id: &SpiffeId) -> Decision {
        let allowed = self
            .inbound(port)
            .is_some_and(|p| p.allow.iter().any(|a| a.matches(id, &self.td)));
        self.decide(allowed)
    }

    /// Whether plaintext from outside the mesh may reach `port`.
    pub fn allow_plaintext(&self, port: u16) -> Decision {
        self.decide(self.inbound(port).is_some_and(|p| p.permissive))
    }

    fn decide(&self, allowed: bool) -> Decision {
        match (allowed, self.doc.mode) {
            (true, _) => Decision::Allow,
            (false, Mode::Enforce) => Decision::Deny,
            (false, Mode::Audit) => Decision::AuditDeny,
        }
    }

    /// How to reach `ip:port` from this workload.
    pub fn route(&self, ip: IpAddr, port: u16) -> Route {
        if self
            .external
            .iter()
            .any(|(c, ports)| c.contains(ip) && (ports.is_empty() || ports.contains(&port)))
        {
            return Route::External;
        }
        for (c, p, id) in &self.pinned {
            if c.contains(ip) && p.is_none_or(|p| p == port) {
                return Route::Mesh(crate::tls::ServerIdentity::Exact(id.clone()));
            }
        }
        Route::Mesh(crate::tls::ServerIdentity::AnyInTrustDomain)
    }

    /// The protocol hint of an inbound port.
    pub fn protocol(&self, port: u16) -> ProtocolHint {
        self.inbound(port).map(|p| p.protocol).unwrap_or_default()
    }
}

/// An operator of a [`SelectorRequirement`] (Kubernetes label-selector semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelectorOperator {
    /// The label's value is one of the values.
    In,
    /// The label is absent or its value is none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// One requirement of a [`PodSelector`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SelectorRequirement {
    /// Label key.
    pub key: String,
    /// How the label is compared.
    pub operator: SelectorOperator,
    /// Values, for `In` and `NotIn`.
    #[serde(default)]
    pub values: Vec<String>,
}

/// A Kubernetes label selector, without a Kubernetes dependency: every `matchLabels` entry and
/// every requirement must hold; an empty selector selects every pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodSelector {
    /// Labels that must have these values.
    #[serde(default)]
    pub match_labels: std::collections::BTreeMap<String, String>,
    /// Further requirements.
    #[serde(default)]
    pub match_expressions: Vec<SelectorRequirement>,
}

impl PodSelector {
    /// Whether a pod with `labels` is selected.
    pub fn matches(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let have = labels.get(&r.key);
                match r.operator {
                    SelectorOperator::In => have.is_some_and(|v| r.values.contains(v)),
                    SelectorOperator::NotIn => have.is_none_or(|v| !r.values.contains(v)),
                    SelectorOperator::Exists => have.is_some(),
                    SelectorOperator::DoesNotExist => have.is_none(),
                }
            })
    }
}

/// One policy's document and the pods it applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectedDoc {
    /// The pods it applies to.
    pub selector: PodSelector,
    /// What it allows.
    pub document: PolicyDoc,
}

/// The policies of a namespace as the operator publishes them: each sidecar enforces the union
/// of those that select its pod (none: default deny). The operator has already refused
/// policies that contradict each other, so any union of these is consistent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicySet {
    /// The accepted policies, in name order.
    pub selected: Vec<SelectedDoc>,
}

impl PolicySet {
    /// The document for a pod with `labels`.
    pub fn for_labels(&self, labels: &std::collections::BTreeMap<String, String>) -> PolicyDoc {
        union(
            self.selected
                .iter()
                .filter(|s| s.selector.matches(labels))
                .map(|s| &s.document),
        )
    }
}

/// The union of documents: per port, the first protocol and every allowed principal (any
/// permissive makes it permissive); external and pinned destinations of all; audit mode only
/// when there is at least one document and all of them audit.
pub fn union<'a>(docs: impl Iterator<Item = &'a PolicyDoc>) -> PolicyDoc {
    let mut out = PolicyDoc::default();
    let (mut any, mut all_audit) = (false, true);
    for d in docs {
        any = true;
        all_audit &= d.mode == Mode::Audit;
        for p in &d.inbound {
            match out.inbound.iter_mut().find(|q| q.port == p.port) {
                Some(q) => {
                    for a in &p.allow {
                        if !q.allow.contains(a) {
                            q.allow.push(a.clone());
                        }
                    }
                    q.permissive |= p.permissive;
                }
                None => out.inbound.push(p.clone()),
            }
        }
        for e in &d.external {
            if !out.external.contains(e) {
                out.external.push(e.clone());
            }
        }
        for p in &d.pinned {
            if !out.pinned.contains(p) {
                out.pinned.push(p.clone());
            }
        }
    }
    out.mode = if any && all_audit {
        Mode::Audit
    } else {
        Mode::Enforce
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("mesh.test").unwrap()
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    const DOC: &str = r#"{
        "mode": "enforce",
        "inbound": [
            {"port": 4242, "protocol": "dicom", "allow": [
                {"service_account": "radiology/ct-scanner"},
                {"id": "spiffe://mesh.test/ns/pacs/sa/viewer"}
            ]},
            {"port": 8042, "protocol": "http", "allow": [{"namespace": "viewers"}]},
            {"port": 9000, "allow": ["any_in_trust_domain"]},
            {"port": 8080, "permissive": true}
        ],
        "external": [{"cidr": "192.0.2.0/24", "ports": [443]}],
        "pinned": [{"cidr": "10.0.0.7", "port": 4242, "identity": "spiffe://mesh.test/ns/pacs/sa/orthanc"}]
    }"#;

    #[test]
    fn authorizes_by_rule_and_denies_by_default() {
        let p = Policy::from_json(DOC, td()).unwrap();
        let scanner = id("spiffe://mesh.test/ns/radiology/sa/ct-scanner");
        assert_eq!(p.authorize(4242, &scanner), Decision::Allow);
        assert_eq!(
            p.authorize(4242, &id("spiffe://mesh.test/ns/pacs/sa/viewer")),
            Decision::Allow
        );
        assert_eq!(
            p.authorize(4242, &id("spiffe://mesh.test/ns/radiology/sa/other")),
            Decision::Deny
        );
        assert_eq!(
            p.authorize(8042, &id("spiffe://mesh.test/ns/viewers/sa/ohif")),
            Decision::Allow
        );
        assert_eq!(p.authorize(8042, &scanner), Decision::Deny);
        assert_eq!(p.authorize(9000, &scanner), Decision::Allow);
        assert_eq!(
            p.authorize(9000, &id("spiffe://other.test/ns/a/sa/b")),
            Decision::Deny
        );
        assert_eq!(p.authorize(1234, &scanner), Decision::Deny, "unlisted port");
        assert_eq!(p.allow_plaintext(8080), Decision::Allow);
        assert_eq!(p.allow_plaintext(4242), Decision::Deny);
        assert_eq!(p.protocol(4242), ProtocolHint::Dicom);
        assert_eq!(p.protocol(8080), ProtocolHint::Detect);
    }

    #[test]
    fn audit_mode_allows_but_marks() {
        let doc = DOC.replace("\"enforce\"", "\"audit\"");
        let p = Policy::from_json(&doc, td()).unwrap();
        let d = p.authorize(4242, &id("spiffe://mesh.test/ns/x/sa/y"));
        assert_eq!(d, Decision::AuditDeny);
        assert!(d.proceeds());
    }

    #[test]
    fn routes_outbound() {
        let p = Policy::from_json(DOC, td()).unwrap();
        assert_eq!(p.route("192.0.2.9".parse().unwrap(), 443), Route::External);
        assert!(matches!(
            p.route("192.0.2.9".parse().unwrap(), 80),
            Route::Mesh(_)
        ));
        assert_eq!(
            p.route("10.0.0.7".parse().unwrap(), 4242),
            Route::Mesh(crate::tls::ServerIdentity::Exact(id(
                "spiffe://mesh.test/ns/pacs/sa/orthanc"
            )))
        );
        assert_eq!(
            p.route("10.0.0.8".parse().unwrap(), 4242),
            Route::Mesh(crate::tls::ServerIdentity::AnyInTrustDomain)
        );
    }

    #[test]
    fn reports_every_problem() {
        let bad = r#"{"inbound": [
            {"port": 1, "allow": [{"service_account": "no-slash"}, {"id": "spiffe://other/ns/a/sa/b"}]},
            {"port": 1},
            {"port": 2, "allow": [{"namespace": "bad ns"}]}
        ], "external": [{"cidr": "10.0.0.0/33"}], "pinned": [{"cidr": "x", "identity": "spiffe://other/x"}]}"#;
        let Err(PolicyError::Invalid(errs)) = Policy::from_json(bad, td()) else {
            panic!("accepted")
        };
        assert_eq!(errs.len(), 7, "{errs:#?}");
        let unknown = Policy::from_json(r#"{"inbound": [{"port": 1, "alow": []}]}"#, td());
        assert!(
            matches!(unknown, Err(PolicyError::Parse(m)) if m.contains("unknown field `alow`"))
        );
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!(
            Cidr::parse("fd00::/8")
                .unwrap()
                .contains("fd12::1".parse().unwrap())
        );
        assert!(Cidr::parse("300.1.1.1").is_err());
    }

    #[test]
    fn a_pod_gets_the_union_of_the_policies_that_select_it() {
        let doc = |mode: Mode, port: u16, who: &str, permissive: bool| PolicyDoc {
            mode,
            inbound: vec![InboundPort {
                port,
                protocol: ProtocolHint::Dicom,
                allow: vec![Principal::ServiceAccount(who.into())],
                permissive,
            }],
            ..PolicyDoc::default()
        };
        let sel = |k: &str, v: &str| PodSelector {
            match_labels: [(k.to_owned(), v.to_owned())].into(),
            ..PodSelector::default()
        };
        let set = PolicySet {
            selected: vec![
                SelectedDoc {
                    selector: sel("app", "orthanc"),
                    document: doc(Mode::Enforce, 4242, "a/scanner", false),
                },
                SelectedDoc {
                    selector: PodSelector {
                        match_expressions: vec![SelectorRequirement {
                            key: "tier".into(),
                            operator: SelectorOperator::In,
                            values: vec!["pacs".into()],
                        }],
                        ..PodSelector::default()
                    },
                    document: doc(Mode::Audit, 4242, "a/viewer", true),
                },
                SelectedDoc {
                    selector: sel("app", "other"),
                    document: doc(Mode::Enforce, 8080, "a/x", false),
                },
            ],
        };
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let d = set.for_labels(&labels(&[("app", "orthanc"), ("tier", "pacs")]));
        assert_eq!(d.mode, Mode::Enforce);
        assert_eq!(d.inbound.len(), 1);
        assert_eq!(d.inbound[0].allow.len(), 2);
        assert!(d.inbound[0].permissive);
        // Only the audit policy selects it: audit mode, its own rule only.
        let d = set.for_labels(&labels(&[("tier", "pacs")]));
        assert_eq!((d.mode, d.inbound[0].allow.len()), (Mode::Audit, 1));
        // Nothing selects it: default deny.
        let d = set.for_labels(&labels(&[("app", "viewer")]));
        assert_eq!((d.mode, d.inbound.len()), (Mode::Enforce, 0));
        // Operators.
        let req = |operator, values: &[&str]| PodSelector {
            match_expressions: vec![SelectorRequirement {
                key: "k".into(),
                operator,
                values: values.iter().map(|v| (*v).to_owned()).collect(),
            }],
            ..PodSelector::default()
        };
        let with = labels(&[("k", "v")]);
        let without = labels(&[]);
        assert!(req(SelectorOperator::NotIn, &["w"]).matches(&with));
        assert!(req(SelectorOperator::NotIn, &["v"]).matches(&without));
        assert!(!req(SelectorOperator::NotIn, &["v"]).matches(&with));
        assert!(req(SelectorOperator::Exists, &[]).matches(&with));
        assert!(req(SelectorOperator::DoesNotExist, &[]).matches(&without));
        assert!(PodSelector::default().matches(&without));
    }
}
