//! Sidecar configuration: every setting read as text (flags or environment), then checked
//! together, so that a bad deployment reports all its problems at once (exit status 64).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use medmesh_core::TrustDomain;

/// Settings as given (flags or `MEDMESH_*` environment variables).
#[derive(Debug, Clone, clap::Args)]
pub struct RawConfig {
    /// Inbound listener (receives redirected inbound connections).
    #[arg(long, env = "MEDMESH_INBOUND_ADDR", default_value = "0.0.0.0:15006")]
    pub inbound_addr: String,
    /// Outbound listener (receives redirected outbound connections).
    #[arg(long, env = "MEDMESH_OUTBOUND_ADDR", default_value = "127.0.0.1:15001")]
    pub outbound_addr: String,
    /// Admin listener: /live, /ready, /metrics, POST /shutdown.
    #[arg(long, env = "MEDMESH_ADMIN_ADDR", default_value = "127.0.0.1:15020")]
    pub admin_addr: String,
    /// OTLP/HTTP base endpoint for traces (spans go to <endpoint>/v1/traces); none: no traces.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Audit settings in one JSON file (as the operator publishes them); flags given
    /// explicitly win. A path that does not exist means no auditing. Archive recipients taken
    /// from it are followed: a new namespace key (after crypto-shredding) applies without a
    /// restart.
    #[arg(long, env = "MEDMESH_AUDIT_CONFIG")]
    pub audit_config: Option<PathBuf>,
    /// Set when the archive recipients came from the audit config file (not a flag).
    #[arg(skip)]
    pub archive_recipients_from_config: bool,
    /// Workload certificate chain (PEM X.509-SVID).
    #[arg(long, env = "MEDMESH_CERT")]
    pub cert: Option<PathBuf>,
    /// Workload private key (PEM).
    #[arg(long, env = "MEDMESH_KEY")]
    pub key: Option<PathBuf>,
    /// Trust bundle (PEM).
    #[arg(long, env = "MEDMESH_CA")]
    pub ca: Option<PathBuf>,
    /// The operator's identity service: credentials come from it (a key generated in memory,
    /// a CSR and the projected token) instead of --cert/--key/--ca.
    #[arg(long, env = "MEDMESH_IDENTITY_URL")]
    pub identity_url: Option<String>,
    /// The projected service-account token (audience medmesh-identity).
    #[arg(
        long,
        env = "MEDMESH_IDENTITY_TOKEN",
        default_value = "/var/run/secrets/medmesh/identity/token"
    )]
    pub identity_token: PathBuf,
    /// CA certificates (PEM) of the identity service's serving certificate.
    #[arg(
        long,
        env = "MEDMESH_IDENTITY_CA",
        default_value = "/etc/medmesh/identity/ca.crt"
    )]
    pub identity_ca: PathBuf,
    /// Mesh trust domain.
    #[arg(long, env = "MEDMESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Policy document (JSON or YAML). Without one, every inbound connection is refused.
    #[arg(long, env = "MEDMESH_POLICY")]
    pub policy: Option<PathBuf>,
    /// The pod's labels (downward API), to pick the policies of a policy set that select it.
    #[arg(long, env = "MEDMESH_POD_LABELS")]
    pub pod_labels: Option<PathBuf>,
    /// Host the inbound side forwards to (the application's address inside the pod).
    #[arg(long, env = "MEDMESH_APP_HOST", default_value = "127.0.0.1")]
    pub app_host: String,
    /// How long to wait for a client's first bytes before treating the stream as opaque.
    #[arg(long, env = "MEDMESH_DETECT_TIMEOUT_MS", default_value = "500")]
    pub detect_timeout_ms: String,
    /// Upstream connect timeout.
    #[arg(long, env = "MEDMESH_CONNECT_TIMEOUT_MS", default_value = "5000")]
    pub connect_timeout_ms: String,
    /// Drain deadline on SIGTERM.
    #[arg(long, env = "MEDMESH_DRAIN_SECONDS", default_value = "10")]
    pub drain_seconds: String,
    /// How often credential and policy files are checked for changes.
    #[arg(long, env = "MEDMESH_RELOAD_MS", default_value = "1000")]
    pub reload_ms: String,
    /// Development and tests only: where outbound connections go when they were not redirected
    /// by iptables (no original destination).
    #[arg(long, env = "MEDMESH_DEV_OUTBOUND_DST")]
    pub dev_outbound_dst: Option<String>,
    /// Development and tests only: the application port for inbound connections that were not
    /// redirected by iptables.
    #[arg(long, env = "MEDMESH_DEV_INBOUND_PORT")]
    pub dev_inbound_port: Option<String>,
    /// Audit ledger base URL; auditing of DICOM ports is on when set.
    #[arg(long, env = "MEDMESH_LEDGER_URL")]
    pub ledger_url: Option<String>,
    /// Expected SPIFFE ID of the ledger (default: any identity of the trust domain).
    #[arg(long, env = "MEDMESH_LEDGER_ID")]
    pub ledger_id: Option<String>,
    /// The ledger's checkpoint verifier key, or `@FILE`.
    #[arg(long, env = "MEDMESH_LEDGER_KEY")]
    pub ledger_key: Option<String>,
    /// The ledger's origin (default: the verifier key's name).
    #[arg(long, env = "MEDMESH_LEDGER_ORIGIN")]
    pub ledger_origin: Option<String>,
    /// `enforce` (responses wait for the ledger) or `spool` (responses wait for the local spool;
    /// the default).
    #[arg(long, env = "MEDMESH_AUDIT_DELIVERY")]
    pub audit_delivery: Option<String>,
    /// File holding the tenant's UID hashing key (at least 32 bytes).
    #[arg(long, env = "MEDMESH_AUDIT_KEY")]
    pub audit_key: Option<PathBuf>,
    /// Directory of the record spool (on the pod's volume).
    #[arg(long, env = "MEDMESH_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Most undelivered record bytes the spool holds.
    #[arg(long, env = "MEDMESH_SPOOL_MAX_BYTES", default_value = "268435456")]
    pub spool_max_bytes: String,
    /// Enforce mode: how long a response may wait for the ledger.
    #[arg(long, env = "MEDMESH_AUDIT_DEADLINE_MS", default_value = "5000")]
    pub audit_deadline_ms: String,
    /// The archive cluster's REST API (`http://host:port`, reached through the mesh): stored
    /// instances are archived, encrypted, when set (needs auditing).
    #[arg(long, env = "MEDMESH_ARCHIVE_URL")]
    pub archive_url: Option<String>,
    /// The archive's SPIFFE ID (required with --archive-url).
    #[arg(long, env = "MEDMESH_ARCHIVE_ID")]
    pub archive_id: Option<String>,
    /// A local object store directory instead of an archive cluster (demo, development).
    #[arg(long, env = "MEDMESH_ARCHIVE_STORE")]
    pub archive_store: Option<PathBuf>,
    /// age recipients (`age1…`, comma-separated, or `@FILE` with one per line) that archived
    /// instances are sealed to.
    #[arg(long, env = "MEDMESH_ARCHIVE_RECIPIENTS")]
    pub archive_recipients: Option<String>,
    /// `async` (stores never wait for the archive; the default) or `required` (a store whose
    /// instance cannot be staged fails).
    #[arg(long, env = "MEDMESH_ARCHIVE_MODE")]
    pub archive_mode: Option<String>,
    /// Least number of archive peers that must pin an instance.
    #[arg(long, env = "MEDMESH_ARCHIVE_REPLICATION_MIN")]
    pub archive_replication_min: Option<String>,
    /// Most archive peers that pin an instance.
    #[arg(long, env = "MEDMESH_ARCHIVE_REPLICATION_MAX")]
    pub archive_replication_max: Option<String>,
    /// The archive staging directory (default: `archive/` in the spool directory).
    #[arg(long, env = "MEDMESH_ARCHIVE_STAGING_DIR")]
    pub archive_staging_dir: Option<PathBuf>,
    /// Most ciphertext bytes staged before archiving falls behind (then `async` skips and
    /// `required` fails stores).
    #[arg(
        long,
        env = "MEDMESH_ARCHIVE_STAGING_MAX_BYTES",
        default_value = "4294967296"
    )]
    pub archive_staging_max_bytes: String,
}

/// Checked audit settings.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Ledger URL.
    pub ledger_url: String,
    /// Expected ledger identity.
    pub ledger_id: Option<medmesh_core::SpiffeId>,
    /// Verifier of its checkpoints.
    pub verifier: medmesh_core::NoteVerifier,
    /// Its origin.
    pub origin: String,
    /// Delivery mode.
    pub mode: crate::deliver::Mode,
    /// UID key file.
    pub key: PathBuf,
    /// Spool directory.
    pub spool_dir: PathBuf,
    /// Spool limit.
    pub spool_max_bytes: u64,
    /// Enforce deadline.
    pub deadline: Duration,
    /// Archiving of stored instances, when configured.
    pub archive: Option<crate::archive::ArchiveConfig>,
}

/// Where the workload's credentials come from.
#[derive(Debug, Clone)]
pub enum IdentityConfig {
    /// PEM files, reloaded when they change.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
        /// Trust bundle.
        ca: PathBuf,
    },
    /// The operator's identity service.
    Service {
        /// Its base URL.
        url: String,
        /// The projected token file.
        token: PathBuf,
        /// Its serving CA.
        service_ca: PathBuf,
    },
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Inbound listener.
    pub inbound_addr: SocketAddr,
    /// Outbound listener.
    pub outbound_addr: SocketAddr,
    /// Admin listener.
    pub admin_addr: SocketAddr,
    /// Where credentials come from.
    pub identity: IdentityConfig,
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Policy path.
    pub policy: Option<PathBuf>,
    /// Pod labels file.
    pub pod_labels: Option<PathBuf>,
    /// Application host.
    pub app_host: std::net::IpAddr,
    /// Detection timeout.
    pub detect_timeout: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Drain deadline.
    pub drain: Duration,
    /// Reload period.
    pub reload: Duration,
    /// Fallback outbound destination (development).
    pub dev_outbound_dst: Option<SocketAddr>,
    /// Fallback inbound port (development).
    pub dev_inbound_port: Option<u16>,
    /// Auditing of DICOM ports, when configured.
    pub audit: Option<AuditConfig>,
    /// Where spans go, when traced.
    pub otlp_endpoint: Option<String>,
}

fn ms(field: &str, v: &str, lo: u64, hi: u64, errs: &mut Vec<String>) -> Duration {
    match v.parse::<u64>() {
        Ok(n) if (lo..=hi).contains(&n) => Duration::from_millis(n),
        _ => {
            errs.push(format!(
                "{field} {v:?}: must be a whole number from {lo} to {hi}"
            ));
            Duration::ZERO
        }
    }
}

impl Config {
    /// Checks every setting.
    ///
    /// # Errors
    /// Every problem found.
    pub fn check(mut raw: RawConfig) -> Result<Self, Vec<String>> {
        let mut errs = Vec::new();
        merge_audit_file(&mut raw, &mut errs);
        let mut addr = |field: &str, v: &str| -> SocketAddr {
            v.parse().unwrap_or_else(|e| {
                errs.push(format!("{field} {v:?}: {e} (expected ip:port)"));
                SocketAddr::from(([0, 0, 0, 0], 0))
            })
        };
        let inbound_addr = addr("inbound-addr", &raw.inbound_addr);
        let outbound_addr = addr("outbound-addr", &raw.outbound_addr);
        let admin_addr = addr("admin-addr", &raw.admin_addr);
        let dev_outbound_dst = raw
            .dev_outbound_dst
            .as_deref()
            .map(|v| addr("dev-outbound-dst", v));
        let mut file = |field: &str, p: &Option<PathBuf>, env: &str| -> PathBuf {
            match p {
                Some(p) if p.is_file() => p.clone(),
                Some(p) => {
                    errs.push(format!("{field} {}: no such file", p.display()));
                    p.clone()
                }
                None => {
                    errs.push(format!("{field}: required (--{field} or {env})"));
                    PathBuf::new()
                }
            }
        };
        let identity = match &raw.identity_url {
            Some(url) => {
                if !url.starts_with("https://") {
                    errs.push(format!("identity-url {url:?}: must be an https:// URL"));
                }
                if raw.cert.is_some() || raw.key.is_some() || raw.ca.is_some() {
                    errs.push("identity-url excludes --cert, --key and --ca".into());
                }
                IdentityConfig::Service {
                    url: url.clone(),
                    token: raw.identity_token.clone(),
                    service_ca: raw.identity_ca.clone(),
                }
            }
            None => IdentityConfig::Files {
                cert: file("cert", &raw.cert, "MEDMESH_CERT"),
                key: file("key", &raw.key, "MEDMESH_KEY"),
                ca: file("ca", &raw.ca, "MEDMESH_CA"),
            },
        };
        // A policy path that does not exist yet is not an error: in a pod it is an optional
        // ConfigMap the operator may publish after the pod starts. Until it appears, every
        // inbound connection is refused (see `Sidecar::start`).
        if let Some(p) = &raw.policy
            && p.exists()
            && !p.is_file()
        {
            errs.push(format!("policy {}: not a file", p.display()));
        }
        let trust_domain = TrustDomain::new(&raw.trust_domain)
            .map_err(|e| errs.push(format!("trust-domain: {e}")));
        let app_host = raw.app_host.parse().unwrap_or_else(|_| {
            errs.push(format!("app-host {:?}: not an IP address", raw.app_host));
            std::net::IpAddr::from([127, 0, 0, 1])
        });
        let detect_timeout = ms(
            "detect-timeout-ms",
            &raw.detect_timeout_ms,
            1,
            60_000,
            &mut errs,
        );
        let connect_timeout = ms(
            "connect-timeout-ms",
            &raw.connect_timeout_ms,
            1,
            120_000,
            &mut errs,
        );
        let drain = match raw.drain_seconds.parse::<u64>() {
            Ok(n) if n <= 3600 => Duration::from_secs(n),
            _ => {
                errs.push(format!(
                    "drain-seconds {:?}: must be 0 to 3600",
                    raw.drain_seconds
                ));
                Duration::ZERO
            }
        };
        let reload = ms("reload-ms", &raw.reload_ms, 50, 600_000, &mut errs);
        let dev_inbound_port =
            raw.dev_inbound_port
                .as_deref()
                .and_then(|v| match v.parse::<u16>() {
                    Ok(p) if p > 0 => Some(p),
                    _ => {
                        errs.push(format!("dev-inbound-port {v:?}: not a port"));
                        None
                    }
                });
        let audit = check_audit(&raw, &mut errs);
        if let Some(Err(e)) = raw
            .otlp_endpoint
            .as_deref()
            .map(medmesh_telemetry::check_endpoint)
        {
            errs.push(e);
        }
        let ports = [inbound_addr.port(), outbound_addr.port(), admin_addr.port()];
        if errs.is_empty()
            && (ports[0] == ports[1] || ports[1] == ports[2] || ports[0] == ports[2])
            && ports[0] != 0
        {
            errs.push(format!(
                "inbound, outbound and admin listeners need distinct ports, got {ports:?}"
            ));
        }
        match (errs.is_empty(), trust_domain) {
            (true, Ok(trust_domain)) => Ok(Self {
                inbound_addr,
                outbound_addr,
                admin_addr,
                identity,
                trust_domain,
                policy: raw.policy,
                pod_labels: raw.pod_labels,
                app_host,
                detect_timeout,
                connect_timeout,
                drain,
                reload,
                dev_outbound_dst,
                dev_inbound_port,
                audit,
                otlp_endpoint: raw.otlp_endpoint,
            }),
            _ => Err(errs),
        }
    }
}

/// Fills the audit settings not given as flags from the `--audit-config` file, if it exists.
fn merge_audit_file(raw: &mut RawConfig, errs: &mut Vec<String>) {
    let Some(path) = raw.audit_config.clone() else {
        return;
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            errs.push(format!("audit-config {}: {e}", path.display()));
            return;
        }
    };
    let a: medmesh_core::wire::SidecarAudit = match serde_json::from_str(&text) {
        Ok(a) => a,
        Err(e) => {
            errs.push(format!("audit-config {}: {e}", path.display()));
            return;
        }
    };
    raw.ledger_url.get_or_insert(a.ledger_url);
    if let Some(id) = a.ledger_id {
        raw.ledger_id.get_or_insert(id);
    }
    raw.ledger_key.get_or_insert(a.ledger_verifier);
    raw.ledger_origin.get_or_insert(a.ledger_origin);
    raw.audit_key.get_or_insert(PathBuf::from(a.key_file));
    raw.audit_delivery.get_or_insert(a.delivery);
    if let Some(ar) = a.archive {
        raw.archive_url.get_or_insert(ar.url);
        raw.archive_id.get_or_insert(ar.id);
        if raw.archive_recipients.is_none() {
            raw.archive_recipients = Some(ar.recipients.join(","));
            raw.archive_recipients_from_config = true;
        }
        raw.archive_mode.get_or_insert(ar.mode);
        raw.archive_replication_min
            .get_or_insert(ar.replication_min.to_string());
        raw.archive_replication_max
            .get_or_insert(ar.replication_max.to_string());
    }
}

fn check_archive(
    raw: &RawConfig,
    spool_dir: Option<&std::path::Path>,
    errs: &mut Vec<String>,
) -> Option<crate::archive::ArchiveConfig> {
    use crate::archive::{ArchiveConfig, Mode, Target};
    if raw.archive_url.is_none() && raw.archive_store.is_none() {
        for (set, flag) in [
            (raw.archive_id.is_some(), "archive-id"),
            (raw.archive_recipients.is_some(), "archive-recipients"),
            (raw.archive_mode.is_some(), "archive-mode"),
        ] {
            if set {
                errs.push(format!("{flag}: needs archive-url or archive-store"));
            }
        }
        return None;
    }
    let before = errs.len();
    let mode = raw
        .archive_mode
        .as_deref()
        .unwrap_or("async")
        .parse::<Mode>()
        .map_err(|e| errs.push(format!("archive-mode {e}")))
        .ok();
    let count = |flag: &str, v: &Option<String>, default: u32, errs: &mut Vec<String>| match v
        .as_deref()
        .map(str::parse::<u32>)
    {
        None => default,
        Some(Ok(n)) if (1..=15).contains(&n) => n,
        _ => {
            errs.push(format!("{flag} {v:?}: must be 1 to 15"));
            default
        }
    };
    let rmin = count(
        "archive-replication-min",
        &raw.archive_replication_min,
        2,
        errs,
    );
    let rmax = count(
        "archive-replication-max",
        &raw.archive_replication_max,
        3,
        errs,
    );
    if rmin > rmax {
        errs.push(format!(
            "archive-replication-min {rmin} is above archive-replication-max {rmax}"
        ));
    }
    let target = match (&raw.archive_url, &raw.archive_store) {
        (Some(_), Some(_)) => {
            errs.push("archive-url and archive-store exclude each other".into());
            None
        }
        (Some(url), None) => {
            if let Err(e) = medmesh_archive::MeshEndpoint::new(url, None, Duration::from_secs(1)) {
                errs.push(format!("archive-url: {e}"));
            }
            match raw
                .archive_id
                .as_deref()
                .map(str::parse::<medmesh_core::SpiffeId>)
            {
                None => {
                    errs.push("archive-id: required with archive-url".into());
                    None
                }
                Some(Err(e)) => {
                    errs.push(format!("archive-id: {e}"));
                    None
                }
                Some(Ok(id)) => Some(Target::Cluster {
                    url: url.clone(),
                    id,
                    replication_min: rmin,
                    replication_max: rmax,
                }),
            }
        }
        (None, Some(dir)) => Some(Target::Store(dir.clone())),
        (None, None) => None,
    };
    let recipients = match raw.archive_recipients.as_deref() {
        None => {
            errs.push("archive-recipients: required to archive (age1… recipients)".into());
            Vec::new()
        }
        Some(v) => {
            let text = match v.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| errs.push(format!("archive-recipients {path}: {e}")))
                    .unwrap_or_default(),
                None => v.replace(',', "\n"),
            };
            let mut out = Vec::new();
            for r in text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
            {
                match r.parse::<medmesh_core::seal::Recipient>() {
                    Ok(r) => out.push(r),
                    Err(e) => errs.push(format!("archive-recipients: {e}")),
                }
            }
            if out.is_empty() {
                errs.push("archive-recipients: no recipient given".into());
            }
            out
        }
    };
    let staging_dir = raw
        .archive_staging_dir
        .clone()
        .or_else(|| spool_dir.map(|d| d.join("archive")));
    let staging_max_bytes = raw
        .archive_staging_max_bytes
        .parse::<u64>()
        .ok()
        .filter(|n| *n >= 1 << 20)
        .or_else(|| {
            errs.push(format!(
                "archive-staging-max-bytes {:?}: must be at least 1048576",
                raw.archive_staging_max_bytes
            ));
            None
        });
    if errs.len() > before {
        return None;
    }
    Some(ArchiveConfig {
        mode: mode?,
        target: target?,
        recipients,
        recipients_file: raw
            .audit_config
            .clone()
            .filter(|_| raw.archive_recipients_from_config),
        staging_dir: staging_dir?,
        staging_max_bytes: staging_max_bytes?,
    })
}

fn check_audit(raw: &RawConfig, errs: &mut Vec<String>) -> Option<AuditConfig> {
    let Some(url) = raw.ledger_url.clone() else {
        if raw.archive_url.is_some() || raw.archive_store.is_some() {
            errs.push("archive-url/archive-store: archiving needs auditing (ledger-url)".into());
        }
        return None;
    };
    let before = errs.len();
    if !url.starts_with("https://") {
        errs.push(format!("ledger-url {url:?}: must be an https:// URL"));
    }
    let ledger_id = raw.ledger_id.as_deref().and_then(|v| {
        v.parse()
            .map_err(|e| errs.push(format!("ledger-id: {e}")))
            .ok()
    });
    let verifier = match raw.ledger_key.as_deref() {
        None => {
            errs.push("ledger-key: required with ledger-url (or MEDMESH_LEDGER_KEY)".into());
            None
        }
        Some(v) => {
            let text = match v.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| errs.push(format!("ledger-key {path}: {e}")))
                    .ok(),
                None => Some(v.to_owned()),
            };
            text.and_then(|t| {
                medmesh_core::NoteVerifier::parse(t.trim())
                    .map_err(|e| errs.push(format!("ledger-key: {e}")))
                    .ok()
            })
        }
    };
    let mode = match raw.audit_delivery.as_deref().unwrap_or("spool") {
        "enforce" => Some(crate::deliver::Mode::Enforce),
        "spool" => Some(crate::deliver::Mode::Spool),
        other => {
            errs.push(format!(
                "audit-delivery {other:?}: must be enforce or spool"
            ));
            None
        }
    };
    let key = match &raw.audit_key {
        None => {
            errs.push("audit-key: required with ledger-url (or MEDMESH_AUDIT_KEY)".into());
            None
        }
        Some(p) => match std::fs::metadata(p) {
            Ok(m) if m.len() >= 32 => Some(p.clone()),
            Ok(m) => {
                errs.push(format!(
                    "audit-key {}: {} bytes; at least 32 are required",
                    p.display(),
                    m.len()
                ));
                None
            }
            Err(e) => {
                errs.push(format!("audit-key {}: {e}", p.display()));
                None
            }
        },
    };
    let spool_dir = raw.spool_dir.clone().or_else(|| {
        errs.push("spool-dir: required with ledger-url (or MEDMESH_SPOOL_DIR)".into());
        None
    });
    let spool_max_bytes = raw
        .spool_max_bytes
        .parse::<u64>()
        .ok()
        .filter(|n| *n >= 1 << 16)
        .or_else(|| {
            errs.push(format!(
                "spool-max-bytes {:?}: must be at least 65536",
                raw.spool_max_bytes
            ));
            None
        });
    let deadline = ms(
        "audit-deadline-ms",
        &raw.audit_deadline_ms,
        10,
        120_000,
        errs,
    );
    let archive = check_archive(raw, spool_dir.as_deref(), errs);
    if errs.len() > before {
        return None;
    }
    let verifier = verifier?;
    Some(AuditConfig {
        ledger_url: url,
        ledger_id,
        origin: raw
            .ledger_origin
            .clone()
            .unwrap_or_else(|| verifier.name().to_owned()),
        verifier,
        mode: mode?,
        key: key?,
        spool_dir: spool_dir?,
        spool_max_bytes: spool_max_bytes?,
        deadline,
        archive,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Args {
        #[command(flatten)]
        raw: RawConfig,
    }

    #[test]
    fn audit_settings_come_from_the_operators_file() {
        use clap::Parser as _;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in ["cert.pem", "key.pem", "ca.pem"] {
            std::fs::write(d.join(f), "x").unwrap();
        }
        std::fs::write(d.join("hmac"), [7u8; 32]).unwrap();
        let verifier = medmesh_core::checkpoint::NoteSigner::from_seed("td/ns/l", [1; 32])
            .unwrap()
            .verifier_key();
        let audit = medmesh_core::wire::SidecarAudit {
            ledger_url: "https://l.ns.svc:8443".into(),
            ledger_id: Some("spiffe://td/ns/ns/ledger/l".into()),
            ledger_verifier: verifier,
            ledger_origin: "td/ns/l".into(),
            delivery: "enforce".into(),
            key_file: d.join("hmac").display().to_string(),
            archive: None,
        };
        std::fs::write(d.join("audit.json"), serde_json::to_string(&audit).unwrap()).unwrap();
        let args = |file: &str| {
            let mut a = Args::try_parse_from([
                "sidecar",
                "--cert",
                d.join("cert.pem").to_str().unwrap(),
                "--key",
                d.join("key.pem").to_str().unwrap(),
                "--ca",
                d.join("ca.pem").to_str().unwrap(),
                "--spool-dir",
                d.to_str().unwrap(),
            ])
            .unwrap()
            .raw;
            a.audit_config = Some(d.join(file));
            a
        };
        let cfg = Config::check(args("audit.json")).unwrap();
        let a = cfg.audit.unwrap();
        assert_eq!(a.ledger_url, "https://l.ns.svc:8443");
        assert_eq!(a.mode, crate::deliver::Mode::Enforce);
        assert_eq!(a.origin, "td/ns/l");
        assert!(a.archive.is_none());
        // Archiving: the recipients come from the file and are followed there; given as a
        // flag, they are not.
        let key = medmesh_core::seal::ArchiveKey::generate()
            .recipient()
            .to_string();
        let mut archiving = audit.clone();
        archiving.archive = Some(medmesh_core::wire::SidecarArchive {
            url: "http://a.ns.svc:9094".into(),
            id: "spiffe://td/ns/ns/sa/a".into(),
            recipients: vec![key.clone()],
            mode: "async".into(),
            replication_min: 2,
            replication_max: 3,
        });
        std::fs::write(
            d.join("archive.json"),
            serde_json::to_string(&archiving).unwrap(),
        )
        .unwrap();
        let ac = Config::check(args("archive.json"))
            .unwrap()
            .audit
            .unwrap()
            .archive
            .unwrap();
        assert_eq!(ac.recipients_file, Some(d.join("archive.json")));
        assert_eq!(ac.recipients[0].to_string(), key);
        let mut flagged = args("archive.json");
        flagged.archive_recipients = Some(key);
        let ac = Config::check(flagged)
            .unwrap()
            .audit
            .unwrap()
            .archive
            .unwrap();
        assert_eq!(ac.recipients_file, None);
        // No file (the namespace does not audit): no auditing.
        assert!(Config::check(args("absent.json")).unwrap().audit.is_none());
        // A bad file is refused with its path.
        std::fs::write(d.join("bad.json"), "{\"ledgerUrl\": 1}").unwrap();
        let errs = Config::check(args("bad.json")).unwrap_err().join("\n");
        assert!(errs.contains("bad.json"), "{errs}");
    }

    #[test]
    fn lists_every_problem() {
        let raw = RawConfig {
            inbound_addr: "nope".into(),
            outbound_addr: "127.0.0.1:15001".into(),
            admin_addr: "127.0.0.1:99999".into(),
            cert: None,
            key: Some("/nonexistent/key.pem".into()),
            ca: None,
            identity_url: None,
            audit_config: None,
            otlp_endpoint: Some("collector:4318".into()),
            archive_recipients_from_config: false,
            pod_labels: None,
            identity_token: "/nonexistent/token".into(),
            identity_ca: "/nonexistent/ca.crt".into(),
            trust_domain: "Bad Domain".into(),
            policy: Some("/nonexistent/policy.yaml".into()),
            app_host: "localhost".into(),
            detect_timeout_ms: "0".into(),
            connect_timeout_ms: "x".into(),
            drain_seconds: "-1".into(),
            reload_ms: "10".into(),
            dev_outbound_dst: None,
            dev_inbound_port: Some("0".into()),
            ledger_url: Some("http://ledger".into()),
            ledger_id: None,
            ledger_key: None,
            ledger_origin: None,
            audit_delivery: Some("sometimes".into()),
            audit_key: None,
            spool_dir: None,
            spool_max_bytes: "1".into(),
            audit_deadline_ms: "5000".into(),
            archive_url: Some("https://archive:9094".into()),
            archive_id: None,
            archive_store: None,
            archive_recipients: Some("age1notarecipient".into()),
            archive_mode: Some("sometimes".into()),
            archive_replication_min: Some("0".into()),
            archive_replication_max: None,
            archive_staging_dir: None,
            archive_staging_max_bytes: "12".into(),
        };
        let errs = Config::check(raw).unwrap_err();
        let text = errs.join("\n");
        for want in [
            "inbound-addr \"nope\"",
            "admin-addr",
            "cert: required",
            "key /nonexistent",
            "ca: required",
            "trust-domain",
            "app-host",
            "detect-timeout-ms",
            "connect-timeout-ms",
            "drain-seconds",
            "reload-ms",
            "dev-inbound-port",
            "ledger-url",
            "ledger-key: required",
            "audit-delivery",
            "audit-key: required",
            "spool-dir: required",
            "spool-max-bytes",
            "archive-url: archive URL \"https://archive:9094\": the scheme must be http",
            "archive-id: required with archive-url",
            "archive-recipients: ",
            "archive-mode \"sometimes\": must be async or required",
            "archive-replication-min Some(\"0\"): must be 1 to 15",
            "archive-staging-max-bytes \"12\"",
            "otlp-endpoint \"collector:4318\"",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
