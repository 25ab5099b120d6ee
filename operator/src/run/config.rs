//! `medmesh-operator run` settings (the flags of `notes/operator-contract.md`), read as text and
//! checked together so that a bad deployment reports every problem at once (exit status 64).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use medmesh_core::TrustDomain;

pub use crate::resolve::Resolve;

pub use crate::names::VERSION;

/// Settings as given (flags or environment).
#[derive(Debug, Clone, clap::Args)]
pub struct RawConfig {
    /// Mesh trust domain.
    #[arg(long, env = "MEDMESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The operator's own namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "medmesh-system")]
    pub namespace: String,
    /// HTTPS listener: POST /mutate, POST /v1/certificate, GET /v1/bundle.
    #[arg(long, env = "MEDMESH_HTTPS_ADDR", default_value = "0.0.0.0:8443")]
    pub https_addr: String,
    /// Admin listener: GET /live /ready /metrics.
    #[arg(long, env = "MEDMESH_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: String,
    /// Secret holding the serving certificate (kubernetes.io/tls + ca.crt).
    #[arg(
        long,
        env = "MEDMESH_SERVING_SECRET",
        default_value = "medmesh-operator-serving"
    )]
    pub serving_secret: String,
    /// User-provided serving certificate chain (PEM) instead of the Secret.
    #[arg(long, env = "MEDMESH_SERVING_CERT_FILE")]
    pub serving_cert_file: Option<PathBuf>,
    /// User-provided serving key (PEM) instead of the Secret.
    #[arg(long, env = "MEDMESH_SERVING_KEY_FILE")]
    pub serving_key_file: Option<PathBuf>,
    /// Secret of the workload-identity issuer CA (bootstrapped when absent).
    #[arg(long, env = "MEDMESH_CA_SECRET", default_value = "medmesh-identity-ca")]
    pub ca_secret: String,
    /// MutatingWebhookConfiguration whose caBundle the operator writes.
    #[arg(
        long,
        env = "MEDMESH_WEBHOOK_CONFIG",
        default_value = "medmesh-sidecar-injector"
    )]
    pub webhook_config: String,
    /// Service name in the serving certificate's SANs.
    #[arg(
        long,
        env = "MEDMESH_WEBHOOK_SERVICE",
        default_value = "medmesh-operator"
    )]
    pub webhook_service: String,
    /// Out of cluster: register the webhook by this URL instead of the Service.
    #[arg(long, env = "MEDMESH_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// URL sidecars use for the identity service (default https://<service>.<namespace>.svc:8443).
    #[arg(long, env = "MEDMESH_IDENTITY_URL")]
    pub identity_url: Option<String>,
    /// Sidecar image (default ghcr.io/medmesh/sidecar:<version>).
    #[arg(long, env = "MEDMESH_SIDECAR_IMAGE")]
    pub sidecar_image: Option<String>,
    /// Ledger image (default ghcr.io/medmesh/ledger:<version>).
    #[arg(long, env = "MEDMESH_LEDGER_IMAGE")]
    pub ledger_image: Option<String>,
    /// Inject the sidecar as a native sidecar (Kubernetes 1.29+); `false` for older clusters.
    #[arg(long, env = "MEDMESH_NATIVE_SIDECAR", default_value = "true")]
    pub native_sidecar: String,
    /// Lease used for leader election.
    #[arg(long, env = "MEDMESH_LEASE_NAME", default_value = "medmesh-operator")]
    pub lease_name: String,
    /// Lifetime of workload certificates, in hours.
    #[arg(long, env = "MEDMESH_CERT_TTL_HOURS", default_value = "24")]
    pub cert_ttl_hours: String,
    /// OTLP/HTTP base endpoint for traces (spans go to <endpoint>/v1/traces); none: no traces.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Out of cluster, where Service names do not resolve: connect to HOST:PORT (a ledger's
    /// `<name>.<namespace>.svc:8443`) at ADDR:PORT instead, as curl's `--resolve` does. The
    /// ledger is still authenticated by its SPIFFE ID. Repeatable; comma-separated in the
    /// environment.
    #[arg(
        long = "resolve",
        env = "MEDMESH_RESOLVE",
        value_delimiter = ',',
        value_name = "HOST:PORT=ADDR:PORT"
    )]
    pub resolve: Vec<String>,
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServingCert {
    /// User-provided files.
    Files {
        /// Chain (PEM).
        cert: PathBuf,
        /// Key (PEM).
        key: PathBuf,
    },
    /// The operator-managed Secret.
    Secret(String),
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Own namespace.
    pub namespace: String,
    /// HTTPS listener.
    pub https_addr: SocketAddr,
    /// Admin listener.
    pub admin_addr: SocketAddr,
    /// Serving certificate source.
    pub serving: ServingCert,
    /// Issuer CA Secret.
    pub ca_secret: String,
    /// Webhook configuration name.
    pub webhook_config: String,
    /// Webhook Service name.
    pub webhook_service: String,
    /// Webhook URL (out of cluster).
    pub webhook_url: Option<String>,
    /// Identity service URL for sidecars.
    pub identity_url: String,
    /// Sidecar image.
    pub sidecar_image: String,
    /// Ledger image.
    pub ledger_image: String,
    /// Native sidecar injection.
    pub native_sidecar: bool,
    /// Leader-election Lease.
    pub lease_name: String,
    /// Certificate lifetime.
    pub cert_ttl: Duration,
    /// OTLP/HTTP base endpoint (`http://collector:4318`).
    pub otlp_endpoint: Option<String>,
    /// Connect-address overrides for ledgers (`host:port` → `addr:port`).
    pub resolve: Resolve,
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl Config {
    /// Checks every setting.
    ///
    /// # Errors
    /// Every problem found.
    pub fn check(raw: RawConfig) -> Result<Self, Vec<String>> {
        let mut errs = Vec::new();
        let mut addr = |field: &str, v: &str| -> SocketAddr {
            v.parse().unwrap_or_else(|e| {
                errs.push(format!("{field} {v:?}: {e} (expected ip:port)"));
                SocketAddr::from(([0, 0, 0, 0], 0))
            })
        };
        let https_addr = addr("https-addr", &raw.https_addr);
        let admin_addr = addr("admin-addr", &raw.admin_addr);
        let trust_domain = TrustDomain::new(&raw.trust_domain)
            .map_err(|e| errs.push(format!("trust-domain: {e}")))
            .ok();
        for (field, v) in [
            ("namespace", &raw.namespace),
            ("webhook-service", &raw.webhook_service),
        ] {
            if !is_dns_label(v) {
                errs.push(format!("{field} {v:?}: not a DNS label"));
            }
        }
        for (field, v) in [
            ("serving-secret", &raw.serving_secret),
            ("ca-secret", &raw.ca_secret),
            ("webhook-config", &raw.webhook_config),
            ("lease-name", &raw.lease_name),
        ] {
            if v.is_empty() || v.len() > 253 || !v.split('.').all(is_dns_label) {
                errs.push(format!("{field} {v:?}: not a valid object name"));
            }
        }
        let serving = match (&raw.serving_cert_file, &raw.serving_key_file) {
            (Some(cert), Some(key)) => {
                for (field, p) in [("serving-cert-file", cert), ("serving-key-file", key)] {
                    if !p.is_file() {
                        errs.push(format!("{field} {}: no such file", p.display()));
                    }
                }
                ServingCert::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                }
            }
            (None, None) => ServingCert::Secret(raw.serving_secret.clone()),
            _ => {
                errs.push(
                    "serving-cert-file and serving-key-file: give both or neither".to_owned(),
                );
                ServingCert::Secret(raw.serving_secret.clone())
            }
        };
        for (field, v) in [
            ("webhook-url", &raw.webhook_url),
            ("identity-url", &raw.identity_url),
        ] {
            if let Some(u) = v
                && !u.starts_with("https://")
            {
                errs.push(format!("{field} {u:?}: must be an https:// URL"));
            }
        }
        if let Some(e) = &raw.otlp_endpoint
            && let Err(m) = medmesh_telemetry::check_endpoint(e)
        {
            errs.push(m);
        }
        let resolve = Resolve::parse(&raw.resolve).unwrap_or_else(|e| {
            errs.extend(e);
            Resolve::default()
        });
        let native_sidecar = match raw.native_sidecar.as_str() {
            "true" => true,
            "false" => false,
            other => {
                errs.push(format!("native-sidecar {other:?}: must be true or false"));
                true
            }
        };
        let cert_ttl = match raw.cert_ttl_hours.parse::<u64>() {
            Ok(h) if (1..=24 * 30).contains(&h) => Duration::from_secs(h * 3600),
            _ => {
                errs.push(format!(
                    "cert-ttl-hours {:?}: must be a whole number from 1 to 720",
                    raw.cert_ttl_hours
                ));
                Duration::ZERO
            }
        };
        if errs.is_empty() && https_addr.port() != 0 && https_addr.port() == admin_addr.port() {
            errs.push(format!(
                "https-addr and admin-addr need distinct ports, got {}",
                https_addr.port()
            ));
        }
        let identity_url = raw.identity_url.clone().unwrap_or_else(|| {
            format!(
                "https://{}.{}.svc:{}",
                raw.webhook_service,
                raw.namespace,
                https_addr.port()
            )
        });
        match (errs.is_empty(), trust_domain) {
            (true, Some(trust_domain)) => Ok(Self {
                trust_domain,
                namespace: raw.namespace,
                https_addr,
                admin_addr,
                serving,
                ca_secret: raw.ca_secret,
                webhook_config: raw.webhook_config,
                webhook_service: raw.webhook_service,
                webhook_url: raw.webhook_url,
                identity_url,
                sidecar_image: raw
                    .sidecar_image
                    .unwrap_or_else(|| format!("ghcr.io/medmesh/sidecar:{VERSION}")),
                ledger_image: raw
                    .ledger_image
                    .unwrap_or_else(|| format!("ghcr.io/medmesh/ledger:{VERSION}")),
                native_sidecar,
                lease_name: raw.lease_name,
                cert_ttl,
                otlp_endpoint: raw.otlp_endpoint,
                resolve,
            }),
            _ => Err(errs),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        raw: RawConfig,
    }

    fn parse(args: &[&str]) -> Result<Config, Vec<String>> {
        let cli = Cli::try_parse_from(std::iter::once("test").chain(args.iter().copied()))
            .map_err(|e| vec![e.to_string()])?;
        Config::check(cli.raw)
    }

    #[test]
    fn defaults_follow_the_contract() {
        // Defaults only (no flag given); environment variables of the contract are not set in
        // tests, which never mutate the environment.
        let c = parse(&[]).unwrap();
        assert_eq!(c.trust_domain.as_str(), "cluster.local");
        assert_eq!(c.https_addr, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(c.admin_addr, "0.0.0.0:9090".parse().unwrap());
        assert_eq!(
            c.serving,
            ServingCert::Secret("medmesh-operator-serving".into())
        );
        assert_eq!(
            c.identity_url,
            "https://medmesh-operator.medmesh-system.svc:8443"
        );
        assert_eq!(
            c.sidecar_image,
            format!("ghcr.io/medmesh/sidecar:{VERSION}")
        );
        assert_eq!(c.cert_ttl, Duration::from_secs(24 * 3600));
        assert!(c.native_sidecar);
        assert_eq!(c.otlp_endpoint, None);
    }

    #[test]
    fn otlp_endpoint_is_a_url() {
        for ok in [
            "http://otel-collector.observability:4318",
            "https://otel.example/",
        ] {
            let c = parse(&["--otlp-endpoint", ok]).unwrap();
            assert_eq!(c.otlp_endpoint.as_deref(), Some(ok));
        }
        for bad in [
            "otel-collector:4318",
            "grpc://c:4317",
            "http://",
            "http://c:4318/?x=1",
        ] {
            let errs = parse(&["--otlp-endpoint", bad]).unwrap_err();
            assert!(errs[0].starts_with("otlp-endpoint"), "{bad}: {errs:?}");
        }
    }

    #[test]
    fn lists_every_problem() {
        let errs = parse(&[
            "--trust-domain",
            "Bad Domain",
            "--https-addr",
            "nope",
            "--namespace",
            "Bad_NS",
            "--serving-cert-file",
            "/nonexistent.pem",
            "--webhook-url",
            "http://plain",
            "--native-sidecar",
            "maybe",
            "--cert-ttl-hours",
            "0",
            "--otlp-endpoint",
            "collector:4318",
            "--resolve",
            "ledger.pacs.svc:8443=nowhere",
        ])
        .unwrap_err();
        let text = errs.join("\n");
        for want in [
            "https-addr \"nope\"",
            "trust-domain:",
            "namespace \"Bad_NS\"",
            "give both or neither",
            "webhook-url \"http://plain\": must be an https:// URL",
            "native-sidecar \"maybe\"",
            "cert-ttl-hours \"0\"",
            "otlp-endpoint \"collector:4318\"",
            "resolve \"ledger.pacs.svc:8443=nowhere\"",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
        assert_eq!(errs.len(), 9, "{text}");
    }

    #[test]
    fn resolve_replaces_exactly_the_named_authority() {
        let c = parse(&[
            "--resolve",
            "ledger.pacs.svc:8443=127.0.0.1:28443",
            "--resolve",
            "a.b.svc:1=[::1]:2",
        ])
        .unwrap();
        let r = &c.resolve;
        assert_eq!(
            r.apply("https://ledger.pacs.svc:8443"),
            "https://127.0.0.1:28443"
        );
        assert_eq!(
            r.apply("https://LEDGER.pacs.svc:8443/v1/checkpoint"),
            "https://127.0.0.1:28443/v1/checkpoint"
        );
        assert_eq!(r.apply("https://a.b.svc:1"), "https://[::1]:2");
        // Another port or host is left alone.
        assert_eq!(
            r.apply("https://ledger.pacs.svc:9443"),
            "https://ledger.pacs.svc:9443"
        );
        assert_eq!(
            r.apply("https://ledger.radiology.svc:8443"),
            "https://ledger.radiology.svc:8443"
        );
        for bad in [
            "ledger.pacs.svc=127.0.0.1:1",
            ":8443=127.0.0.1:1",
            "x:1=host:2",
        ] {
            let errs = parse(&["--resolve", bad]).unwrap_err();
            assert!(errs[0].starts_with("resolve"), "{bad}: {errs:?}");
        }
    }
}
