//! Archive peers as the operator renders them, run as real Kubo and ipfs-cluster daemons in
//! network-namespace pods: each pod gets the files of the operator's configuration Secret
//! (as its volume would hold them), an /etc/hosts that resolves the swarm Service's pod names,
//! and runs each container's own command with the container's own environment; only the three
//! path variables point into the test's directories instead of the volumes.

#![allow(dead_code)] // Each test binary uses a different part.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Container, Secret};

use std::collections::BTreeSet;

use serde_json::Value;

use super::netns::{ok, sh};

/// The daemons' directory: `scripts/ipfs env` builds them once per machine (cached outside
/// the work tree) and prints where. Fails, never skips, when they cannot be built.
pub fn ipfs_bin() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/ipfs"))
        .arg("env")
        .output()
        .expect("running scripts/ipfs");
    assert!(
        out.status.success(),
        "scripts/ipfs could not build Kubo and ipfs-cluster from the Go module proxy:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let dir = text
        .lines()
        .find_map(|l| l.strip_prefix("export MEDMESH_IPFS_BIN="))
        .expect("scripts/ipfs env prints MEDMESH_IPFS_BIN");
    let dir = PathBuf::from(dir.trim_matches('\''));
    for b in ["ipfs", "ipfs-cluster-service", "ipfs-cluster-ctl", "age"] {
        assert!(dir.join(b).is_file(), "{b} missing from {}", dir.display());
    }
    dir
}

/// One pod's files and daemons.
pub struct ArchivePod {
    pub ns: String,
    pub ip: String,
    pub pod: String,
    pub dir: PathBuf,
    pub kubo: Option<Child>,
    pub cluster: Option<Child>,
}

/// The container `name` of the StatefulSet's pod template.
pub fn container<'a>(sts: &'a StatefulSet, name: &str) -> &'a Container {
    sts.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

impl ArchivePod {
    pub fn new(ns: &str, ip: &str, pod: &str, dir: &Path) -> Self {
        let dir = dir.join(pod);
        for d in ["config", "kubo", "cluster", "tmp"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        Self {
            ns: ns.into(),
            ip: ip.into(),
            pod: pod.into(),
            dir,
            kubo: None,
            cluster: None,
        }
    }

    /// Writes every key of the configuration Secret into the pod's config directory (what
    /// the Secret volume holds).
    pub fn install_config(&self, config: &Secret) {
        let cfg = self.dir.join("config");
        for (k, v) in config.data.as_ref().unwrap() {
            std::fs::write(cfg.join(k), &v.0).unwrap();
        }
    }

    /// The container's environment, fieldRef `metadata.name` resolved to the pod name and the
    /// volume paths moved into the test directory.
    pub fn env_of(&self, c: &Container, bin: &Path) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "PATH".to_owned(),
                format!("{}:/usr/bin:/bin:/usr/sbin:/sbin", bin.display()),
            ),
            (
                "HOME".to_owned(),
                self.dir.join("tmp").display().to_string(),
            ),
            (
                "TMPDIR".to_owned(),
                self.dir.join("tmp").display().to_string(),
            ),
        ];
        for e in c.env.as_ref().unwrap() {
            let value = match (e.name.as_str(), &e.value, &e.value_from) {
                ("MEDMESH_ARCHIVE_CONFIG", _, _) => self.dir.join("config").display().to_string(),
                ("IPFS_PATH", _, _) => self.dir.join("kubo").display().to_string(),
                ("IPFS_CLUSTER_PATH", _, _) => self.dir.join("cluster").display().to_string(),
                (_, Some(v), _) => v.clone(),
                (_, None, Some(from)) => {
                    let f = from.field_ref.as_ref().expect("only fieldRef is used");
                    assert_eq!(f.field_path, "metadata.name");
                    self.pod.clone()
                }
                _ => panic!("env {} has no value", e.name),
            };
            env.push((e.name.clone(), value));
        }
        // To debug the daemons: e.g. `info,crdt:debug,bitswap/network:debug`.
        if let Ok(level) = std::env::var("MEDMESH_E2E_CLUSTER_LOG_LEVEL") {
            env.push(("IPFS_CLUSTER_LOG_LEVEL".to_owned(), level));
        }
        env
    }

    /// Starts the container's command in the pod (output into `<dir>/<name>.log`).
    pub fn start(&mut self, sts: &StatefulSet, name: &str, bin: &Path) {
        let c = container(sts, name);
        let cmd = c.command.as_ref().unwrap();
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.ns, "env", "-i"])
            .args(self.env_of(c, bin).iter().map(|(k, v)| format!("{k}={v}")))
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = command.spawn().unwrap();
        if name == "kubo" {
            self.kubo = Some(child);
        } else {
            self.cluster = Some(child);
        }
    }

    /// Runs the container's readiness probe command in the pod; whether it succeeded.
    pub fn probe(&self, sts: &StatefulSet, name: &str, bin: &Path) -> bool {
        let c = container(sts, name);
        let probe = c.readiness_probe.as_ref().unwrap().exec.as_ref().unwrap();
        Command::new("ip")
            .args(["netns", "exec", &self.ns, "env", "-i"])
            .args(self.env_of(c, bin).iter().map(|(k, v)| format!("{k}={v}")))
            .args(probe.command.as_ref().unwrap())
            .output()
            .unwrap()
            .status
            .success()
    }

    /// SIGKILLs both daemons.
    pub fn kill(&mut self) {
        for c in [self.kubo.take(), self.cluster.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
        // `ip netns exec` execs into env, which execs sh, which execs the daemon: the child
        // PID is the daemon's. Nothing else is left in the pod.
    }

    /// SIGTERMs both daemons and waits for them (a rolling restart's stop).
    pub fn stop(&mut self) {
        for c in [self.cluster.take(), self.kubo.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = sh(&format!("kill -TERM {}", c.id()));
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if c.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// `curl` inside the pod (the REST API and the RPC listen on the pod's loopback).
    pub fn curl(&self, args: &str) -> (bool, String) {
        let o = sh(&format!(
            "ip netns exec {} curl -sS --max-time 60 {args}",
            self.ns
        ));
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    }

    /// `curl` that must succeed with a 2xx answer; its body.
    pub fn curl_ok(&self, args: &str) -> String {
        let o = sh(&format!(
            "ip netns exec {} curl -sS --fail-with-body --max-time 60 {args}",
            self.ns
        ));
        assert!(
            o.status.success(),
            "{}: curl {args}: {}{}",
            self.pod,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for ArchivePod {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Gives network namespace `ns` an /etc/hosts (`ip netns exec` bind-mounts
/// `/etc/netns/<ns>/hosts` over /etc/hosts): the pods' names as the headless Service's DNS
/// would answer them. Removed by [`remove_hosts`].
pub fn write_hosts(ns: &str, entries: &[(String, String)]) {
    let dir = PathBuf::from("/etc/netns").join(ns);
    std::fs::create_dir_all(&dir).unwrap();
    let mut text = "127.0.0.1 localhost\n".to_owned();
    for (ip, name) in entries {
        text.push_str(&format!("{ip} {name}\n"));
    }
    std::fs::write(dir.join("hosts"), text).unwrap();
}

pub fn remove_hosts(ns: &str) {
    let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(ns));
}

/// Polls `f` every 500 ms until it returns `Some`, or panics with `what` and `diag()`.
pub fn wait_for<T>(
    within: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
    diag: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("{what}: not within {within:?}\n{}", diag());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Runs a command (no shell) and asserts success.
pub fn run_ok(args: &[&str]) -> String {
    ok(&args
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" "))
}

pub fn kube_owner(
    a: &medmesh_operator::crd::ImageArchive,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
    use kube::Resource as _;
    a.controller_owner_ref(&()).unwrap()
}

pub fn json_lines(body: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(body)
        .into_iter::<Value>()
        .flat_map(|v| match v.unwrap() {
            Value::Array(a) => a,
            o => vec![o],
        })
        .collect()
}

/// The healthy cluster peer IDs `pod` sees.
pub fn seen_peers(pod: &ArchivePod) -> BTreeSet<String> {
    // ipfs-cluster 1.1.6 serves its REST API before it has an RPC client, and a request in that
    // window crashes it (nil pointer in go-libp2p-gorpc): ask only once it logged that it is
    // ready. (In a cluster, the container would restart; the readiness probe asks the same way.)
    if !pod.log("ipfs-cluster").contains("IPFS Cluster is READY") {
        return BTreeSet::new();
    }
    let (ok, body) = pod.curl("http://127.0.0.1:9094/peers");
    if !ok {
        return BTreeSet::new();
    }
    json_lines(&body)
        .iter()
        .filter(|p| p["error"].as_str().unwrap_or("").is_empty())
        .filter_map(|p| p["id"].as_str().map(str::to_owned))
        .collect()
}

/// Peer IDs whose status for `cid` is `pinned`, as `pod` reports.
pub fn pinned_on(pod: &ArchivePod, cid: &str) -> BTreeSet<String> {
    let (ok, body) = pod.curl(&format!("http://127.0.0.1:9094/pins/{cid}"));
    if !ok {
        return BTreeSet::new();
    }
    let Ok(v) = serde_json::from_str::<Value>(&body) else {
        return BTreeSet::new();
    };
    v["peer_map"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, s)| s["status"] == "pinned")
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// The CIDs in `pod`'s shared pin set.
pub fn allocations(pod: &ArchivePod) -> BTreeSet<String> {
    let (ok, body) = pod.curl("http://127.0.0.1:9094/allocations");
    if !ok {
        return BTreeSet::new();
    }
    json_lines(&body)
        .iter()
        .filter_map(|p| p["cid"].as_str().map(str::to_owned))
        .collect()
}

/// Adds `file` through `pod`'s REST API with the given replication; the root CID.
pub fn add(pod: &ArchivePod, file: &Path, name: &str, rmin: u32, rmax: u32) -> String {
    add_with(pod, file, name, rmin, rmax, "")
}

/// Adds `file` to `pod`'s own Kubo only (`local=true`), allocated to `pod` when it is one of
/// `rmin` = `rmax` = 1 allocations: a peer the others do not trust cannot stream blocks to
/// them, and without `local` ipfs-cluster allocates to whichever peer its metrics favour.
pub fn add_local(pod: &ArchivePod, file: &Path, name: &str) -> String {
    add_with(pod, file, name, 1, 1, "&local=true")
}

fn add_with(
    pod: &ArchivePod,
    file: &Path,
    name: &str,
    rmin: u32,
    rmax: u32,
    extra: &str,
) -> String {
    let body = pod.curl_ok(&format!(
        "-X POST -F 'file=@{};filename={name}.age;type=application/octet-stream' \
         'http://127.0.0.1:9094/add?cid-version=1&raw-leaves=true&chunker=size-262144&name={name}&replication-min={rmin}&replication-max={rmax}&stream-channels=false{extra}'",
        file.display()
    ));
    let out = json_lines(&body);
    out.last().unwrap()["cid"].as_str().unwrap().to_owned()
}

pub fn cat(pod: &ArchivePod, cid: &str, timeout: &str) -> Option<Vec<u8>> {
    let o = sh(&format!(
        "ip netns exec {} curl -sS --fail --max-time 90 -X POST 'http://127.0.0.1:5001/api/v0/cat?arg={cid}&timeout={timeout}'",
        pod.ns
    ));
    o.status.success().then_some(o.stdout)
}

/// What each peer says of `cid` (its global status) and every cluster log line naming it.
pub fn pin_diag(pods: &[ArchivePod], cid: &str) -> String {
    pods.iter()
        .map(|p| {
            let (_, status) = p.curl(&format!("http://127.0.0.1:9094/pins/{cid}"));
            let log = p.log("ipfs-cluster");
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(cid) && !l.contains("GET /pins/"))
                .take(20)
                .collect();
            format!(
                "--- {} status of {cid}:\n{status}\n--- {} log lines naming it:\n{}\n",
                p.pod,
                p.pod,
                lines.join("\n")
            )
        })
        .collect::<String>()
        + &diag(pods)
}

pub fn diag(pods: &[ArchivePod]) -> String {
    // The whole logs, kept where MEDMESH_E2E_KEEP_LOGS says (the pods' directories go with
    // the test).
    // A failure to keep them is printed, not raised: diag describes a failure already under way.
    if let Ok(dir) = std::env::var("MEDMESH_E2E_KEEP_LOGS") {
        let dir = Path::new(&dir).join(std::process::id().to_string());
        let kept = std::fs::create_dir_all(&dir).and_then(|()| {
            pods.iter().try_for_each(|p| {
                ["kubo", "ipfs-cluster"].iter().try_for_each(|name| {
                    std::fs::write(dir.join(format!("{}.{name}.log", p.pod)), p.log(name))
                })
            })
        });
        if let Err(e) = kept {
            eprintln!("cannot keep the peers' logs in {}: {e}", dir.display());
        }
    }
    pods.iter()
        .map(|p| {
            let tail = |s: String| s.lines().rev().take(15).collect::<Vec<_>>().join("\n");
            format!(
                "--- {} kubo:\n{}\n--- {} cluster:\n{}\n",
                p.pod,
                tail(p.log("kubo")),
                p.pod,
                tail(p.log("ipfs-cluster"))
            )
        })
        .collect()
}

/// The sidecar policy of the archive's pods: the operator's MeshPolicy for `a`, compiled for
/// the pod template's labels as the namespace's ConfigMap would hold it; written to `file`.
pub fn write_pod_policy(
    a: &medmesh_operator::crd::ImageArchive,
    sts: &StatefulSet,
    td: &medmesh_core::TrustDomain,
    file: &Path,
) {
    use medmesh_operator::controller::image_archive::{Names, mesh_policy};
    let names = Names::of(a).unwrap();
    let owner = kube_owner(a);
    let operator_id = td.workload("medmesh-system", "medmesh-operator").unwrap();
    let policy = mesh_policy(a, &names, &owner, Some(&operator_id));
    let tpl = template_meta(sts);
    let ns = a.metadata.namespace.as_deref().unwrap();
    let snap = medmesh_operator::policy::Snapshot {
        namespace: ns,
        trust_domain: td,
        policies: &[policy],
        ledgers: &Default::default(),
        secrets: &Default::default(),
    };
    let compiled =
        medmesh_operator::policy::compile_for_labels(&snap, tpl.labels.as_ref().unwrap());
    std::fs::write(file, serde_json::to_vec(&compiled.doc).unwrap()).unwrap();
}

/// Starts the pod's sidecar as injection would: `init` (iptables `mode`) with the pod
/// annotations' skips, then `run` as uid 1337 with the identity `who` (`<ns>.<sa>` files of
/// `medmesh dev certs` in `certs`) and `policy`; waits until it is ready. Logs to
/// `<pod dir>/sidecar.log`.
pub fn start_pod_sidecar(
    pod: &ArchivePod,
    sts: &StatefulSet,
    certs: &Path,
    who: &str,
    policy: &Path,
    mode: &str,
) -> Child {
    let tpl = template_meta(sts);
    let skips = &tpl.annotations.as_ref().unwrap()["medmesh.io/skip-inbound-ports"];
    let sidecar = super::mesh::bin("medmesh-sidecar");
    let sidecar = sidecar.to_str().unwrap();
    let ns = &pod.ns;
    ok(&format!(
        "ip netns exec {ns} {sidecar} init --mode {mode} --skip-inbound-ports {skips} --skip-outbound-ports {skips}"
    ));
    let c = certs.display();
    let log_path = pod.dir.join("sidecar.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = super::netns::as_proxy(ns)
        .arg(sidecar)
        .args([
            "run",
            "--trust-domain",
            "medmesh.local",
            "--reload-ms",
            "200",
        ])
        .arg(format!("--cert={c}/{who}.pem"))
        .arg(format!("--key={c}/{who}-key.pem"))
        .arg(format!("--ca={c}/ca.pem"))
        .arg(format!("--policy={}", policy.display()))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for(
        Duration::from_secs(30),
        &format!("{}'s sidecar is ready", pod.pod),
        || pod.curl("-f http://127.0.0.1:15020/ready").0.then_some(()),
        || std::fs::read_to_string(&log_path).unwrap_or_default(),
    );
    child
}

/// The pod template's metadata (labels, annotations).
pub fn template_meta(
    sts: &StatefulSet,
) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
    sts.spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
}
