//! Pods made of network namespaces: a veth pair between two namespaces, each with its own
//! addresses, iptables and processes. Needs root, iproute2, iptables and the peers that
//! `scripts/check` installs. Everything started is killed, and the namespaces deleted, on drop.

#![allow(dead_code)] // Each test binary uses a different part.
// Test support: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Fails (never skips) when a prerequisite is missing: a skipped e2e proves nothing.
pub fn require(tools: &[&str]) {
    // SAFETY-free check of root: `id -u` prints 0.
    let uid = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "network-namespace e2e tests need root (run scripts/check as root)"
    );
    for t in tools {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .output()
            .unwrap();
        assert!(
            found.status.success(),
            "{t} is not installed: scripts/check installs the e2e peers"
        );
    }
}

pub fn sh(cmd: &str) -> Output {
    Command::new("sh").arg("-c").arg(cmd).output().unwrap()
}

pub fn ok(cmd: &str) -> String {
    let o = sh(cmd);
    assert!(
        o.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Two namespaces, `a` and `b`, joined by a veth pair on 10.<n>.<m>.0/24.
pub struct Lab {
    pub a: String,
    pub b: String,
    pub ip_a: String,
    pub ip_b: String,
    pub veth_a: String,
    pub dir: tempfile::TempDir,
    children: Vec<Child>,
    pid_files: Vec<PathBuf>,
}

impl Lab {
    pub fn new(tag: &str) -> Self {
        let pid = std::process::id();
        let (a, b) = (format!("mm{tag}a{pid}"), format!("mm{tag}b{pid}"));
        let (n, m) = (100 + (pid % 100), (pid / 100) % 250);
        let (ip_a, ip_b) = (format!("10.{n}.{m}.1"), format!("10.{n}.{m}.2"));
        let veth_a = format!("va{}", pid % 100_000);
        let veth_b = format!("vb{}", pid % 100_000);
        ok(&format!("ip netns add {a} && ip netns add {b}"));
        ok(&format!(
            "ip link add {veth_a} type veth peer name {veth_b}"
        ));
        ok(&format!(
            "ip link set {veth_a} netns {a} && ip link set {veth_b} netns {b}"
        ));
        ok(&format!(
            "ip -n {a} addr add {ip_a}/24 dev {veth_a} && ip -n {b} addr add {ip_b}/24 dev {veth_b}"
        ));
        ok(&format!(
            "ip -n {a} link set lo up && ip -n {b} link set lo up && ip -n {a} link set {veth_a} up && ip -n {b} link set {veth_b} up"
        ));
        let dir = tempfile::tempdir().unwrap();
        // The sidecars run as uid 1337 and must read their certificates and policies.
        ok(&format!("chmod 755 {}", dir.path().display()));
        Self {
            a,
            b,
            ip_a,
            ip_b,
            veth_a,
            dir,
            children: Vec::new(),
            pid_files: Vec::new(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs a command in namespace `ns` and returns its output.
    pub fn exec(&self, ns: &str, cmd: &str) -> Output {
        sh(&format!("ip netns exec {ns} {cmd}"))
    }

    /// Starts a long-running process in `ns` (optionally as uid 1337), logging to `<name>.log`.
    pub fn spawn(&mut self, ns: &str, name: &str, as_proxy: bool, cmd: &[&str]) {
        let log = std::fs::File::create(self.path(&format!("{name}.log"))).unwrap();
        let mut c = if as_proxy {
            self::as_proxy(ns)
        } else {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]);
            c
        };
        c.args(cmd).stdout(log.try_clone().unwrap()).stderr(log);
        self.children.push(c.spawn().unwrap());
    }

    /// Remembers a pid file whose process must be killed on drop (daemons such as nginx).
    pub fn track_pid_file(&mut self, p: PathBuf) {
        self.pid_files.push(p);
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }

    /// Waits until `cmd` succeeds in `ns`.
    pub fn wait(&self, ns: &str, cmd: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.exec(ns, cmd).status.success() {
                return;
            }
            assert!(Instant::now() < deadline, "{what} not up within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Writes what a mesh of the two pods needs, readable by the proxy's uid: certificates for
    /// radiology/scanner, pacs/orthanc, medmesh/ledger and medmesh/auditor in `certs/`, the
    /// ledger's `signing.key` and `verifier.key`, B's `uid.key` (filled with `uid_key_byte`) and
    /// a `spool/` directory. Returns (certs, signing key).
    pub fn mesh_files(&self, uid_key_byte: u8) -> (PathBuf, PathBuf) {
        self.mesh_files_with(uid_key_byte, &[])
    }

    /// [`Lab::mesh_files`] with certificates for the `extra` workloads (`ns/sa`) too.
    pub fn mesh_files_with(&self, uid_key_byte: u8, extra: &[&str]) -> (PathBuf, PathBuf) {
        use crate::mesh::{bin, run, text};
        let certs = self.path("certs");
        let mut cmd = Command::new(bin("medmesh"));
        cmd.args(["dev", "certs", "--out"]).arg(&certs);
        for w in [
            "radiology/scanner",
            "pacs/orthanc",
            "medmesh/ledger",
            "medmesh/auditor",
        ]
        .iter()
        .chain(extra)
        {
            cmd.args(["--workload", w]);
        }
        let out = run(&mut cmd);
        assert!(out.status.success(), "{}", text(&out));
        let signing = self.path("signing.key");
        let out = run(Command::new(bin("medmesh-ledger"))
            .args(["keygen", "--origin", "medmesh.local/ledger", "--out"])
            .arg(&signing));
        assert!(out.status.success(), "{}", text(&out));
        std::fs::write(self.path("verifier.key"), &out.stdout).unwrap();
        std::fs::write(self.path("uid.key"), [uid_key_byte; 32]).unwrap();
        std::fs::create_dir_all(self.path("spool")).unwrap();
        ok(&format!("chmod 777 {}", self.path("spool").display()));
        ok(&format!(
            "chmod -R a+rX {} {} {}",
            certs.display(),
            self.path("uid.key").display(),
            self.path("verifier.key").display()
        ));
        (certs, signing)
    }

    /// Writes the pods' policies: `policy-b.json` (the PACS in B takes DICOM on 4242 and HTTP on
    /// 8042 from radiology/scanner only) and `policy-a.json` (A accepts nothing inbound).
    pub fn write_pacs_policies(&self) {
        std::fs::write(
            self.path("policy-b.json"),
            r#"{"inbound": [
          {"port": 8042, "protocol": "http", "allow": [{"service_account": "radiology/scanner"}]},
          {"port": 4242, "protocol": "dicom", "allow": [{"service_account": "radiology/scanner"}]}
        ]}"#,
        )
        .unwrap();
        std::fs::write(self.path("policy-a.json"), "{}").unwrap();
    }

    /// Starts a ledger in pod B on 127.0.0.1:18443 (admin 19443) with certificates from
    /// `medmesh dev certs` in `certs`, `signing` from `medmesh-ledger keygen`, one appender and
    /// the reader `medmesh/auditor`; waits until it is ready.
    pub fn start_ledger(&mut self, certs: &Path, signing: &Path, appender: &str) {
        self.start_ledger_with(certs, signing, appender, &[]);
    }

    /// [`Lab::start_ledger`] with more arguments for `medmesh-ledger run`.
    pub fn start_ledger_with(
        &mut self,
        certs: &Path,
        signing: &Path,
        appender: &str,
        extra: &[&str],
    ) {
        let (c, d) = (certs.display(), self.dir.path().display());
        std::fs::write(
            self.path("ledger.yaml"),
            format!(
                "node_id: ledger-0\norigin: medmesh.local/ledger\ndata_dir: {d}/ledger-data\nlisten: 127.0.0.1:18443\n\
                 admin_listen: 127.0.0.1:19443\ntrust_domain: medmesh.local\ncert: {c}/medmesh.ledger.pem\n\
                 key: {c}/medmesh.ledger-key.pem\ntrust_bundle: {c}/ca.pem\nsigning_key: {s}\n\
                 appenders: [\"{appender}\"]\nreaders: [\"spiffe://medmesh.local/ns/medmesh/sa/auditor\"]\n",
                s = signing.display()
            ),
        )
        .unwrap();
        let bin = crate::mesh::bin("medmesh-ledger");
        let cfg = self.path("ledger.yaml");
        let b = self.b.clone();
        let mut cmd = vec![
            bin.to_str().unwrap(),
            "run",
            "--config",
            cfg.to_str().unwrap(),
        ];
        cmd.extend_from_slice(extra);
        self.spawn(&b, "ledger", false, &cmd);
        self.wait(&b, "curl -sf http://127.0.0.1:19443/ready", "ledger in B");
    }

    /// Starts Orthanc with its DICOMweb plugin in pod B (HTTP 8042 with user test:test, DICOM
    /// 4242 as ORTHANC, any calling AE may store) and waits for it; `extra` adds settings
    /// (`"Key":value,` JSON members).
    pub fn start_orthanc(&mut self, extra: &str) {
        let d = self.dir.path().display().to_string();
        std::fs::write(
            self.path("orthanc.json"),
            format!(
                r#"{{"Name":"pacs","StorageDirectory":"{d}/orthanc-db","IndexDirectory":"{d}/orthanc-db","HttpPort":8042,
                "DicomPort":4242,"DicomAet":"ORTHANC","RemoteAccessAllowed":true,"AuthenticationEnabled":true,
                "RegisteredUsers":{{"test":"test"}},"DicomAlwaysAllowStore":true,"DicomCheckCalledAet":false,{extra}
                "Plugins":["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
                "DicomWeb":{{"Enable":true,"Root":"/dicom-web/"}}}}"#
            ),
        )
        .unwrap();
        let cfg = self.path("orthanc.json").to_str().unwrap().to_owned();
        let b = self.b.clone();
        self.spawn(&b, "orthanc", false, &["Orthanc", &cfg]);
        self.wait(
            &b,
            "curl -sf -u test:test http://127.0.0.1:8042/dicom-web/studies",
            "Orthanc with DICOMweb",
        );
    }

    /// Captures TCP on `a`'s veth into `file` while `f` runs; returns the capture's bytes.
    pub fn capture<T>(&mut self, file: &Path, f: impl FnOnce(&mut Self) -> T) -> (T, Vec<u8>) {
        let mut td = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.a,
                "tcpdump",
                "--immediate-mode",
                "-U",
                "-s0",
                "-i",
                &self.veth_a,
                "-w",
            ])
            .arg(file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1000));
        let r = f(self);
        std::thread::sleep(Duration::from_millis(500));
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(td.id().to_string())
            .status();
        let _ = td.wait();
        (r, std::fs::read(file).unwrap_or_default())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for p in &self.pid_files {
            if let Ok(pid) = std::fs::read_to_string(p) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
        }
        // Processes setpriv started are children of `ip netns exec`: kill whatever is left in
        // the namespaces before deleting them.
        for ns in [&self.a, &self.b] {
            let _ = sh(&format!("ip netns pids {ns} | xargs -r kill -9"));
            let _ = sh(&format!("ip netns del {ns}"));
        }
    }
}

/// A veth pair from the root namespace into `ns`: (the root side's address, the pod's).
pub fn link_root(ns: &str, i: u32) -> (String, String) {
    let pid = std::process::id();
    let (n, m) = (100 + (pid % 100), (pid / 100) % 250);
    // 10.n.m.0/24 is the pods' own link (Lab); these are /30s in 172.(16+i).n.m
    let (root, pod) = (
        format!("172.{}.{n}.{}", 16 + i, 1 + 4 * (m % 60)),
        format!("172.{}.{n}.{}", 16 + i, 2 + 4 * (m % 60)),
    );
    let (vr, vp) = (
        format!("or{i}{}", pid % 100_000),
        format!("op{i}{}", pid % 100_000),
    );
    ok(&format!("ip link add {vr} type veth peer name {vp}"));
    ok(&format!("ip link set {vp} netns {ns}"));
    ok(&format!(
        "ip addr add {root}/30 dev {vr} && ip link set {vr} up && ip -n {ns} addr add {pod}/30 dev {vp} && ip -n {ns} link set {vp} up"
    ));
    (root, pod)
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `ip netns exec <ns> setpriv …` as the proxy's uid (1337): what a sidecar runs as, and what
/// iptables does not redirect.
pub fn as_proxy(ns: &str) -> Command {
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        ns,
        "setpriv",
        "--reuid",
        "1337",
        "--regid",
        "1337",
        "--clear-groups",
    ]);
    c
}

/// DICOM instances derived from pydicom's samples (`e2e/scripts/dicom_samples.py`) in `dir`:
/// the manifest (path, source, transfer syntax, UIDs, identifying values).
pub fn dicom_samples(dir: &Path, n: usize) -> Vec<serde_json::Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/dicom_samples.py");
    let out = crate::mesh::run(Command::new("python3").args([
        script,
        dir.to_str().unwrap(),
        &n.to_string(),
    ]));
    assert!(
        out.status.success(),
        "pydicom samples: {}",
        crate::mesh::text(&out)
    );
    let m: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(m.len() >= n, "only {} samples", m.len());
    m
}

/// The identifying values of the samples in `manifest` (patient attributes, study, series and
/// instance UIDs) that must never leave the pod in clear: those of at least `min_len`
/// characters that could not occur by chance in hex hashes (all hex digits, dashes, spaces).
pub fn identifying_values(manifest: &[serde_json::Value], min_len: usize) -> Vec<String> {
    let mut out = Vec::new();
    for m in manifest {
        for v in m["phi"]
            .as_array()
            .unwrap()
            .iter()
            .chain(m["uids"].as_array().unwrap())
        {
            let v = v.as_str().unwrap();
            if v.len() >= min_len
                && !v
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == '-' || c == ' ')
            {
                out.push(v.to_owned());
            }
        }
    }
    out
}

/// storescu in `lab.a` of `files` to `ORTHANC` at `to` (host:port), one association per
/// transfer-syntax family, each after the same storescu against a local bit-preserving
/// storescp: the oracle of the bytes sent. Returns the SHA-256 of each data set as sent, by
/// SOP Instance UID, and the number of families. `context` explains a failure.
pub fn storescu_with_oracle(
    lab: &Lab,
    files: &[&serde_json::Value],
    to: &str,
    tag: &str,
    context: impl Fn() -> String,
) -> (
    std::collections::HashMap<String, medmesh_core::merkle::Hash>,
    usize,
) {
    use crate::mesh;
    let mut groups: std::collections::BTreeMap<Option<&str>, Vec<&str>> = Default::default();
    for m in files {
        groups
            .entry(mesh::storescu_option(
                m["transfer_syntax"].as_str().unwrap(),
            ))
            .or_default()
            .push(m["path"].as_str().unwrap());
    }
    let oracle_dir = lab.path(&format!("oracle-{tag}"));
    std::fs::create_dir_all(&oracle_dir).unwrap();
    let port = mesh::free_port();
    let oracle = mesh::Kill(
        Command::new("storescp")
            .args(["+B", "+xa", "-aet", "ORACLE", "-od"])
            .arg(&oracle_dir)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    mesh::wait_port(port);
    let (host, to_port) = to.rsplit_once(':').unwrap();
    for (opt, paths) in &groups {
        let opt = opt.unwrap_or("");
        let paths = paths.join(" ");
        ok(&format!(
            "storescu -nh -aec ORACLE 127.0.0.1 {port} {opt} {paths}"
        ));
        let out = lab.exec(
            &lab.a,
            &format!("storescu -nh -aec ORTHANC {host} {to_port} {opt} {paths}"),
        );
        assert!(
            out.status.success() && !mesh::text(&out).contains("Store Failed"),
            "storescu {opt}: {}\n{}",
            mesh::text(&out),
            context()
        );
    }
    drop(oracle);
    let mut sent = std::collections::HashMap::new();
    for e in std::fs::read_dir(&oracle_dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let uid = name.split_once('.').map(|(_, u)| u.to_owned()).unwrap();
        let bytes = std::fs::read(e.path()).unwrap();
        let p10 = medmesh_core::dicom::split_part10(&bytes).unwrap().unwrap();
        sent.insert(uid, medmesh_core::merkle::sha256(p10.dataset));
    }
    (sent, groups.len())
}
