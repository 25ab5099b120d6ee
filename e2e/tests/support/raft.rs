//! A replicated ledger of real `medmesh-ledger` processes on loopback: one certificate (the
//! ledger's SVID, shared by every replica as the operator's Secret is), one signing key, one
//! data directory and configuration per replica.

#![allow(dead_code)] // Each test binary uses a different part.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use medmesh_ledger_client::LedgerClient;

use super::mesh::{
    ORIGIN, TD, dev_pki, free_port, http_get_at, ledger_cli, ledger_client, start_ledger, terminate,
};
use super::netns::{ok, require, sh};

/// One replica.
pub struct Replica {
    pub id: usize,
    pub dir: PathBuf,
    /// Its address: loopback, or its network namespace's.
    pub host: String,
    /// Its network namespace, when it runs in one.
    pub netns: Option<String>,
    pub api_port: u16,
    pub admin_port: u16,
    pub child: Option<Child>,
}

/// The replicas of one ledger.
pub struct Cluster {
    pub dir: PathBuf,
    pub replicas: Vec<Replica>,
    pub verifier_key: String,
    /// The network-namespace pods, when the replicas run in them.
    pub pods: Option<Pods>,
}

/// Network namespaces `<tag>-<i>` as pods on one bridge (the "node"): pod `i` has
/// 10.<n>.<m>.(10+i), the bridge (where the test runs) 10.<n>.<m>.1. Deleted on drop.
pub struct Pods {
    pub tag: String,
    pub bridge: String,
    pub ips: Vec<String>,
}

impl Pods {
    pub fn new(tag: &str, n: usize) -> Self {
        require(&["ip", "iptables"]);
        let pid = std::process::id();
        // Another range than `Lab`'s (10.100-199.x): these addresses are on the host side too.
        let net = format!("10.{}.{}", 200 + (pid % 50), (pid / 50) % 250);
        let bridge = format!("mmbr{}", pid % 100_000);
        ok(&format!(
            "ip link add {bridge} type bridge && ip link set {bridge} up && ip addr add {net}.1/24 dev {bridge}"
        ));
        let mut ips = Vec::new();
        for i in 0..n {
            let ns = format!("{tag}-{i}");
            let (host_end, pod_end) = (format!("{bridge}h{i}"), format!("{bridge}p{i}"));
            let ip = format!("{net}.{}", 10 + i);
            let _ = sh(&format!("ip netns del {ns} 2>/dev/null"));
            ok(&format!(
                "ip netns add {ns} && ip link add {host_end} type veth peer name {pod_end} && \
                 ip link set {pod_end} netns {ns} && ip link set {host_end} master {bridge} && \
                 ip link set {host_end} up && ip netns exec {ns} ip addr add {ip}/24 dev {pod_end} && \
                 ip netns exec {ns} ip link set {pod_end} up && ip netns exec {ns} ip link set lo up"
            ));
            ips.push(ip);
        }
        Self {
            tag: tag.to_owned(),
            bridge,
            ips,
        }
    }

    pub fn ns(&self, i: usize) -> String {
        format!("{}-{i}", self.tag)
    }

    /// Drops every packet between pod `i` and the other pods (clients on the bridge still
    /// reach it).
    pub fn isolate(&self, i: usize) {
        for (j, ip) in self.ips.iter().enumerate() {
            if j != i {
                ok(&format!(
                    "ip netns exec {ns} iptables -A INPUT -s {ip} -j DROP && \
                     ip netns exec {ns} iptables -A OUTPUT -d {ip} -j DROP",
                    ns = self.ns(i)
                ));
            }
        }
    }

    /// Undoes [`Pods::isolate`].
    pub fn heal(&self, i: usize) {
        ok(&format!("ip netns exec {} iptables -F", self.ns(i)));
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        for i in 0..self.ips.len() {
            let _ = sh(&format!("ip netns del {}", self.ns(i)));
        }
        let _ = sh(&format!("ip link del {}", self.bridge));
    }
}

impl Cluster {
    /// Certificates, signing key and `n` configurations in `dir`, replicas on loopback.
    pub fn setup(dir: &Path, n: usize) -> Self {
        Self::setup_on(dir, n, None)
    }

    /// [`Cluster::setup`] with each replica in its own network-namespace pod.
    pub fn setup_in_pods(dir: &Path, n: usize, tag: &str) -> Self {
        Self::setup_on(dir, n, Some(Pods::new(tag, n)))
    }

    fn setup_on(dir: &Path, n: usize, pods: Option<Pods>) -> Self {
        let verifier_key = dev_pki(dir);
        let (certs, key) = (dir.join("certs"), dir.join("signing.key"));
        let hosts: Vec<String> = match &pods {
            Some(p) => p.ips.clone(),
            None => vec!["127.0.0.1".to_owned(); n],
        };
        // In pods every replica has its own address: the same ports everywhere.
        let ports: Vec<(u16, u16)> = match &pods {
            Some(_) => vec![(8443, 9090); n],
            None => (0..n).map(|_| (free_port(), free_port())).collect(),
        };
        let peers = ports
            .iter()
            .zip(&hosts)
            .map(|((a, _), h)| format!("\"{h}:{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let c = certs.display();
        let replicas = ports
            .iter()
            .enumerate()
            .map(|(i, &(api_port, admin_port))| {
                let rdir = dir.join(format!("ledger-{i}"));
                std::fs::create_dir_all(&rdir).unwrap();
                std::fs::write(
                    rdir.join("ledger.yaml"),
                    format!(
                        "node_id: ledger-{i}\npeers: [{peers}]\norigin: {ORIGIN}\ndata_dir: {data}\n\
                         listen: {host}:{api_port}\nadmin_listen: {host}:{admin_port}\n\
                         trust_domain: {TD}\ncert: {c}/medmesh.ledger.pem\nkey: {c}/medmesh.ledger-key.pem\n\
                         trust_bundle: {c}/ca.pem\nsigning_key: {key}\n\
                         appenders: [\"spiffe://{TD}/ns/pacs/sa/writer\"]\nreaders: [\"spiffe://{TD}/ns/audit/*\"]\n\
                         checkpoint_interval_ms: 100\ndrain_seconds: 2\nraft_snapshot_logs: 200\n",
                        data = rdir.join("data").display(),
                        key = key.display(),
                        host = hosts[i],
                    ),
                )
                .unwrap();
                Replica {
                    id: i,
                    dir: rdir,
                    host: hosts[i].clone(),
                    netns: pods.as_ref().map(|p| p.ns(i)),
                    api_port,
                    admin_port,
                    child: None,
                }
            })
            .collect();
        Self {
            dir: dir.to_owned(),
            replicas,
            verifier_key,
            pods,
        }
    }

    /// Starts replica `i` and waits until its admin port answers (a lone replica is not ready).
    pub fn start(&mut self, i: usize) {
        let r = &mut self.replicas[i];
        assert!(r.child.is_none(), "replica {i} already running");
        let (host, port) = (r.host.clone(), r.admin_port);
        let child = start_ledger(
            &r.dir,
            r.netns.as_deref(),
            "warn,openraft=error,medmesh_ledger::replication=info",
            || http_get_at(&host, port, "/live").is_some(),
        )
        .unwrap_or_else(|e| panic!("replica {i}: {e}"));
        r.child = Some(child);
    }

    /// Rewrites every replica's configuration to list only the first `k` replicas as peers
    /// (what a scaled StatefulSet's new ConfigMap does); running replicas re-read it.
    pub fn set_peers(&self, k: usize) {
        let list: Vec<String> = self.replicas[..k]
            .iter()
            .map(|r| format!("\"{}:{}\"", r.host, r.api_port))
            .collect();
        for r in &self.replicas {
            let path = r.dir.join("ledger.yaml");
            let text = std::fs::read_to_string(&path).unwrap();
            let new: Vec<String> = text
                .lines()
                .map(|l| {
                    if l.starts_with("peers: ") {
                        format!("peers: [{}]", list.join(", "))
                    } else {
                        l.to_owned()
                    }
                })
                .collect();
            // Written aside and renamed, as the kubelet swaps a ConfigMap volume.
            let tmp = r.dir.join("ledger.yaml.tmp");
            std::fs::write(&tmp, new.join("\n") + "\n").unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
    }

    /// Starts every replica.
    pub fn start_all(&mut self) {
        for i in 0..self.replicas.len() {
            self.start(i);
        }
    }

    /// Waits until replica `i` answers `/ready` with 200.
    pub fn wait_ready(&self, i: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let r = &self.replicas[i];
            let got = http_get_at(&r.host, r.admin_port, "/ready");
            if got.as_ref().is_some_and(|(s, _)| *s == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replica {i} not ready within {within:?}: {got:?}; status {:?}",
                self.status(i)
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `/status` of replica `i`, if it answers.
    pub fn status(&self, i: usize) -> Option<serde_json::Value> {
        let r = &self.replicas[i];
        let (code, body) = http_get_at(&r.host, r.admin_port, "/status")?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// The leader as reported by a running replica that considers itself leader.
    pub fn leader(&self) -> Option<usize> {
        (0..self.replicas.len()).find(|&i| {
            self.replicas[i].child.is_some()
                && self
                    .status(i)
                    .is_some_and(|s| s["state"] == "Leader" && s["ready"] == true)
        })
    }

    /// Waits for a ready leader.
    pub fn wait_leader(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.leader() {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no leader within {within:?}: {:?}",
                (0..self.replicas.len())
                    .map(|i| self.status(i))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL replica `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.replicas[i].child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM replica `i` and wait.
    pub fn stop(&mut self, i: usize) {
        if let Some(c) = self.replicas[i].child.take() {
            terminate(c, &format!("replica {i}"));
        }
    }

    pub fn url(&self, i: usize) -> String {
        format!(
            "https://{}:{}",
            self.replicas[i].host, self.replicas[i].api_port
        )
    }

    /// A library client of replica `i` with workload `who`'s certificate.
    pub fn client(&self, i: usize, who: &str) -> LedgerClient {
        ledger_client(&self.dir, self.url(i), who, &self.verifier_key)
    }

    /// `medmesh ledger <args>` against replica `i` as the auditor (one trusted state per replica).
    pub fn cli(&self, i: usize, args: &[&str]) -> Output {
        let state = self.dir.join(format!("auditor-{i}.checkpoint"));
        ledger_cli(&self.dir, &self.url(i), &state, args)
    }

    /// The log of replica `i`.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.replicas[i].dir.join("ledger.log")).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..self.replicas.len() {
                let log = self.log(i);
                for l in log
                    .lines()
                    .filter(|l| l.contains("panicked at") || l.contains("quit RaftCore"))
                    .take(3)
                {
                    eprintln!("--- replica {i} panicked: {l}");
                }
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("--- replica {i}: status {:?}", self.status(i));
                for l in tail.iter().rev() {
                    eprintln!("    {l}");
                }
            }
        }
        for i in 0..self.replicas.len() {
            self.kill(i);
        }
    }
}
