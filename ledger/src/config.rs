//! Ledger configuration: a YAML file read whole, checked whole, and refused with every problem
//! listed at once.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use medmesh_core::{SpiffeId, TrustDomain};

/// The configuration file as written.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// This node's name in the replica set (e.g. the StatefulSet pod name).
    pub node_id: String,
    /// Every replica's API address (`host:port`, this one included), in StatefulSet ordinal
    /// order: replica `N` (the `node_id` ending in `-N`) is `peers[N]`. Empty: a single node
    /// without Raft.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Raft heartbeat period, in milliseconds (replicated only).
    #[serde(default = "default_heartbeat_ms")]
    pub raft_heartbeat_ms: u64,
    /// Shortest Raft election timeout, in milliseconds; the longest is twice it. A follower that
    /// knew a leader campaigns after the longest (the leader's lease) plus a random timeout
    /// between the two: 1.5–2 s without heartbeats at the default.
    #[serde(default = "default_election_ms")]
    pub raft_election_timeout_ms: u64,
    /// Raft entries between two snapshots (each entry is one batch of appends).
    #[serde(default = "default_snapshot_logs")]
    pub raft_snapshot_logs: u64,
    /// Connect-address overrides for peers (`host:port` in `peers` → `ip:port` to dial), like
    /// curl's `--resolve`: for replicas run outside a cluster. TLS still checks the peer's
    /// SPIFFE ID.
    #[serde(default)]
    pub resolve: std::collections::BTreeMap<String, String>,
    /// Log origin, the first line of every checkpoint (e.g. `medmesh.local/ledger`).
    pub origin: String,
    /// Directory holding `ledger.redb` and the signer state.
    pub data_dir: PathBuf,
    /// API listener (mTLS).
    pub listen: String,
    /// Admin listener (`/live`, `/ready`, `/metrics`), plaintext.
    pub admin_listen: String,
    /// Mesh trust domain.
    pub trust_domain: String,
    /// Server certificate chain (PEM X.509-SVID).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// Trust bundle (PEM CA certificates).
    pub trust_bundle: PathBuf,
    /// Checkpoint signing key file (`PRIVATE+KEY+...`).
    pub signing_key: PathBuf,
    /// Identities allowed to append (exact SPIFFE IDs, or a prefix ending in `/*`).
    #[serde(default)]
    pub appenders: Vec<String>,
    /// Identities allowed to read.
    #[serde(default)]
    pub readers: Vec<String>,
    /// Longest time between tree growth and a checkpoint covering it, in milliseconds.
    #[serde(default = "default_checkpoint_ms")]
    pub checkpoint_interval_ms: u64,
    /// Most entries in one write transaction.
    #[serde(default = "default_max_batch")]
    pub max_batch_entries: usize,
    /// Largest request body, in bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Shutdown drain deadline, in seconds.
    #[serde(default = "default_drain")]
    pub drain_seconds: u64,
}

fn default_heartbeat_ms() -> u64 {
    100
}
fn default_election_ms() -> u64 {
    500
}
fn default_snapshot_logs() -> u64 {
    10_000
}
fn default_checkpoint_ms() -> u64 {
    500
}
fn default_max_batch() -> usize {
    8192
}
fn default_max_body() -> usize {
    1 << 20
}
fn default_drain() -> u64 {
    10
}

/// A rule matching client identities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityRule {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Every ID under this prefix (written `spiffe://td/ns/x/*`).
    Prefix(String),
}

impl IdentityRule {
    fn parse(s: &str) -> Result<Self, String> {
        if let Some(prefix) = s.strip_suffix("/*") {
            // Validate the prefix as an ID, so typos in the trust domain are caught.
            let id: SpiffeId = prefix.parse().map_err(|e| format!("{e}"))?;
            return Ok(Self::Prefix(format!("{id}/")));
        }
        s.parse().map(Self::Exact).map_err(|e| format!("{e}"))
    }

    /// Whether `id` matches.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(e) => e == id,
            Self::Prefix(p) => id.as_str().starts_with(p.as_str()),
        }
    }
}

impl fmt::Display for IdentityRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(e) => write!(f, "{e}"),
            Self::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// Raft replication settings, present when `peers` is not empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    /// This replica's Raft id: its ordinal, the position of its address in `peers`.
    pub id: u64,
    /// Every replica's API address (`host:port`), by ordinal.
    pub peers: Vec<String>,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// Shortest election timeout (the longest is twice it).
    pub election_timeout: Duration,
    /// Raft entries between two snapshots.
    pub snapshot_logs: u64,
    /// Connect-address overrides: peer address → address to dial.
    pub resolve: std::collections::BTreeMap<String, String>,
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration was read from, when it was (a replica re-reads its `peers`
    /// from it: the membership follows the StatefulSet's ConfigMap without restarts).
    pub source: Option<PathBuf>,
    /// Node name.
    pub node_id: String,
    /// Replication, when this ledger is one replica of several.
    pub replication: Option<Replication>,
    /// Log origin.
    pub origin: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// API listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Certificate chain path.
    pub cert: PathBuf,
    /// Key path.
    pub key: PathBuf,
    /// Trust bundle path.
    pub trust_bundle: PathBuf,
    /// Signing key path.
    pub signing_key: PathBuf,
    /// Appender rules.
    pub appenders: Vec<IdentityRule>,
    /// Reader rules.
    pub readers: Vec<IdentityRule>,
    /// Checkpoint interval.
    pub checkpoint_interval: Duration,
    /// Batch limit.
    pub max_batch_entries: usize,
    /// Body limit.
    pub max_body_bytes: usize,
    /// Drain deadline.
    pub drain: Duration,
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid ledger configuration ({} problems):",
            self.0.len()
        )?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Checks the replication fields of a configuration whose `peers` is not empty.
fn check_replication(raw: &RawConfig, errs: &mut Vec<String>) -> Option<Replication> {
    let before = errs.len();
    let id = raw
        .node_id
        .rsplit_once('-')
        .and_then(|(_, n)| n.parse::<u64>().ok());
    match id {
        None => errs.push(format!(
            "node_id {:?}: a replica's name must end in -<ordinal> (the StatefulSet pod name), \
             which is its position in peers",
            raw.node_id
        )),
        Some(n) if n as usize >= raw.peers.len() => errs.push(format!(
            "node_id {:?}: ordinal {n} has no address in peers (only {} listed)",
            raw.node_id,
            raw.peers.len()
        )),
        Some(_) => {}
    }
    for (i, p) in raw.peers.iter().enumerate() {
        let ok = p
            .rsplit_once(':')
            .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok_and(|n| n > 0));
        if !ok {
            errs.push(format!("peers[{i}] {p:?}: expected host:port"));
        }
        if raw.peers[..i].contains(p) {
            errs.push(format!("peers[{i}] {p:?}: listed twice"));
        }
    }
    if !(10..=10_000).contains(&raw.raft_heartbeat_ms) {
        errs.push(format!(
            "raft_heartbeat_ms {}: must be between 10 and 10000",
            raw.raft_heartbeat_ms
        ));
    }
    if raw.raft_election_timeout_ms < 3 * raw.raft_heartbeat_ms
        || raw.raft_election_timeout_ms > 60_000
    {
        errs.push(format!(
            "raft_election_timeout_ms {}: must be at least three heartbeats ({} ms) and at most 60000",
            raw.raft_election_timeout_ms,
            3 * raw.raft_heartbeat_ms
        ));
    }
    for (from, to) in &raw.resolve {
        if !raw.peers.contains(from) {
            errs.push(format!("resolve {from:?}: not one of peers"));
        }
        if to.parse::<SocketAddr>().is_err() {
            errs.push(format!("resolve {from:?} -> {to:?}: expected ip:port"));
        }
    }
    if raw.raft_snapshot_logs < 10 {
        errs.push(format!(
            "raft_snapshot_logs {}: must be at least 10",
            raw.raft_snapshot_logs
        ));
    }
    (errs.len() == before).then(|| Replication {
        id: id.unwrap_or(0),
        peers: raw.peers.clone(),
        heartbeat: Duration::from_millis(raw.raft_heartbeat_ms),
        election_timeout: Duration::from_millis(raw.raft_election_timeout_ms),
        snapshot_logs: raw.raft_snapshot_logs,
        resolve: raw.resolve.clone(),
    })
}

impl Config {
    /// Parses YAML text and checks every field.
    ///
    /// # Errors
    /// Every problem found, together.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigErrors> {
        let raw: RawConfig =
            serde_saphyr::from_str(text).map_err(|e| ConfigErrors(vec![e.to_string()]))?;
        Self::check(raw)
    }

    /// Checks a parsed configuration.
    ///
    /// # Errors
    /// Every problem found, together.
    pub fn check(raw: RawConfig) -> Result<Self, ConfigErrors> {
        let mut errs = Vec::new();
        if raw.node_id.is_empty()
            || !raw
                .node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            errs.push(format!(
                "node_id {:?}: must be non-empty letters, digits, '-' or '.'",
                raw.node_id
            ));
        }
        let replication = (!raw.peers.is_empty())
            .then(|| check_replication(&raw, &mut errs))
            .flatten();
        if raw.origin.is_empty()
            || raw
                .origin
                .chars()
                .any(|c| c.is_whitespace() || c == '+' || c.is_control())
        {
            errs.push(format!(
                "origin {:?}: must be non-empty, without spaces or '+'",
                raw.origin
            ));
        }
        let mut addr = |field: &str, v: &str| -> SocketAddr {
            v.parse().unwrap_or_else(|e| {
                errs.push(format!("{field} {v:?}: {e} (expected ip:port)"));
                SocketAddr::from(([0, 0, 0, 0], 0))
            })
        };
        let listen = addr("listen", &raw.listen);
        let admin_listen = addr("admin_listen", &raw.admin_listen);
        let trust_domain = TrustDomain::new(&raw.trust_domain)
            .map_err(|e| errs.push(format!("trust_domain: {e}")));
        for (field, path) in [
            ("cert", &raw.cert),
            ("key", &raw.key),
            ("trust_bundle", &raw.trust_bundle),
            ("signing_key", &raw.signing_key),
        ] {
            if !path.is_file() {
                errs.push(format!("{field} {}: no such file", path.display()));
            }
        }
        if raw.data_dir.as_os_str().is_empty() {
            errs.push("data_dir: must be set".into());
        }
        let mut rules = |field: &str, list: &[String]| -> Vec<IdentityRule> {
            list.iter()
                .filter_map(|s| {
                    IdentityRule::parse(s)
                        .map_err(|e| errs.push(format!("{field}: {e}")))
                        .ok()
                })
                .collect()
        };
        let appenders = rules("appenders", &raw.appenders);
        let readers = rules("readers", &raw.readers);
        if let Ok(td) = &trust_domain {
            for r in appenders.iter().chain(&readers) {
                let in_td = match r {
                    IdentityRule::Exact(id) => id.is_in(td),
                    IdentityRule::Prefix(p) => p.starts_with(&format!("spiffe://{td}/")),
                };
                if !in_td {
                    errs.push(format!("identity rule {r} is outside trust domain {td}"));
                }
            }
        }
        if !(10..=1000).contains(&raw.checkpoint_interval_ms) {
            errs.push(format!(
                "checkpoint_interval_ms {}: must be between 10 and 1000",
                raw.checkpoint_interval_ms
            ));
        }
        if !(1..=100_000).contains(&raw.max_batch_entries) {
            errs.push(format!(
                "max_batch_entries {}: must be between 1 and 100000",
                raw.max_batch_entries
            ));
        }
        if !(1024..=64 << 20).contains(&raw.max_body_bytes) {
            errs.push(format!(
                "max_body_bytes {}: must be between 1 KiB and 64 MiB",
                raw.max_body_bytes
            ));
        }
        match (errs.is_empty(), trust_domain) {
            (true, Ok(trust_domain)) => Ok(Self {
                source: None,
                node_id: raw.node_id,
                replication,
                origin: raw.origin,
                data_dir: raw.data_dir,
                listen,
                admin_listen,
                trust_domain,
                cert: raw.cert,
                key: raw.key,
                trust_bundle: raw.trust_bundle,
                signing_key: raw.signing_key,
                appenders,
                readers,
                checkpoint_interval: Duration::from_millis(raw.checkpoint_interval_ms),
                max_batch_entries: raw.max_batch_entries,
                max_body_bytes: raw.max_body_bytes,
                drain: Duration::from_secs(raw.drain_seconds),
            }),
            _ => Err(ConfigErrors(errs)),
        }
    }

    /// Whether `id` may append.
    pub fn may_append(&self, id: &SpiffeId) -> bool {
        self.appenders.iter().any(|r| r.matches(id))
    }

    /// Whether `id` may read.
    pub fn may_read(&self, id: &SpiffeId) -> bool {
        self.readers.iter().any(|r| r.matches(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_problem_at_once() {
        let yaml = r#"
node_id: "bad id"
peers: ["ledger-1:8443"]
origin: "has space"
data_dir: /tmp/x
listen: "nonsense"
admin_listen: "127.0.0.1:9"
trust_domain: "Bad"
cert: /nonexistent/cert.pem
key: /nonexistent/key.pem
trust_bundle: /nonexistent/ca.pem
signing_key: /nonexistent/signing.key
appenders: ["spiffe://other/ns/a/sa/b", "not-an-id"]
checkpoint_interval_ms: 5000
"#;
        let errs = Config::from_yaml(yaml).unwrap_err();
        let text = errs.to_string();
        for want in [
            "node_id",
            "must end in -<ordinal>",
            "origin",
            "listen \"nonsense\"",
            "trust_domain",
            "cert /nonexistent",
            "key /nonexistent",
            "trust_bundle",
            "signing_key",
            "not-an-id",
            "checkpoint_interval_ms 5000",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(errs.0.len() >= 11, "{text}");
    }

    #[test]
    fn replication_settings_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "x").unwrap();
        let yaml = |node: &str, peers: &str, extra: &str| {
            format!(
                "node_id: {node}\npeers: {peers}\norigin: o\ndata_dir: /tmp/x\nlisten: 127.0.0.1:1\n\
                 admin_listen: 127.0.0.1:2\ntrust_domain: td\ncert: {f}\nkey: {f}\ntrust_bundle: {f}\n\
                 signing_key: {f}\n{extra}",
                f = f.display()
            )
        };
        let ok = Config::from_yaml(&yaml("ledger-2", "[a:1, b:1, c:1]", "")).unwrap();
        let r = ok.replication.unwrap();
        assert_eq!((r.id, r.peers.len()), (2, 3));
        assert_eq!(r.election_timeout, Duration::from_millis(500));
        assert!(
            Config::from_yaml(&yaml("ledger", "[]", ""))
                .unwrap()
                .replication
                .is_none()
        );
        let text = Config::from_yaml(&yaml(
            "ledger-4",
            "[a:1, a:1, 'b', c:0]",
            "raft_heartbeat_ms: 500\nraft_election_timeout_ms: 1000\nraft_snapshot_logs: 1\n\
             resolve: {'x:1': '127.0.0.1:5', 'a:1': 'nowhere'}\n",
        ))
        .unwrap_err()
        .to_string();
        for want in [
            "ordinal 4 has no address",
            "peers[1] \"a:1\": listed twice",
            "peers[2] \"b\": expected host:port",
            "peers[3] \"c:0\"",
            "raft_election_timeout_ms 1000",
            "raft_snapshot_logs 1",
            "resolve \"x:1\": not one of peers",
            "resolve \"a:1\" -> \"nowhere\": expected ip:port",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = Config::from_yaml("node_id: a\nbogus: 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn identity_rules() {
        let p = IdentityRule::parse("spiffe://td/ns/pacs/*").unwrap();
        assert!(p.matches(&"spiffe://td/ns/pacs/sa/orthanc".parse().unwrap()));
        assert!(!p.matches(&"spiffe://td/ns/pacs2/sa/orthanc".parse().unwrap()));
        let e = IdentityRule::parse("spiffe://td/ns/pacs/sa/a").unwrap();
        assert!(!e.matches(&"spiffe://td/ns/pacs/sa/ab".parse().unwrap()));
    }
}
