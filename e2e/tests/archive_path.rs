//! The encrypted archive path end to end, with unmodified peers in network-namespace pods:
//! pod A (the scanner: DCMTK storescu and curl), pod B (the PACS: Orthanc with DICOMweb, the
//! ledger, B's sidecar auditing in `enforce` mode and archiving), and a real three-peer Kubo +
//! ipfs-cluster archive as the operator renders it (each peer behind its own sidecar, with the
//! archive's MeshPolicy: B's identity may add, the auditor may read).
//!
//! - storescu (pydicom-derived instances) and curl STOW-RS → Orthanc through the mesh: one
//!   `instance_archived` record per stored instance, linked to its `instance_stored` record;
//!   each one recovered by `medmesh archive get` through a gateway (CID recomputed, decrypted,
//!   hash equal to the ledger's); every CID equal to Kubo's own `ipfs add --only-hash` of the
//!   ciphertext; no identifying value of any sample in any Kubo repo, cluster state, pin name,
//!   log or metric.
//! - The cluster down during transfers: stores succeed (`async`), B's sidecar is SIGKILLed and
//!   restarted, and once the cluster is back every instance is archived exactly once.
//! - `required` with a full staging area: the store that does not fit is refused (503).
//! - Crypto-shredding: without the archive key `archive get` fails clearly, while the
//!   ciphertext is still in the archive.

// Integration tests: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/ipfs.rs"]
mod ipfs;
#[path = "support/mesh.rs"]
mod mesh;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/raft.rs"]
mod raft;

use std::collections::BTreeSet;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ipfs::{
    ArchivePod, cat, diag, ipfs_bin, json_lines, kube_owner, remove_hosts, seen_peers,
    start_pod_sidecar, wait_for, write_hosts, write_pod_policy,
};
use medmesh_core::dicom::split_part10;
use medmesh_core::merkle::sha256;
use medmesh_core::record::{EventKind, LogEntry, Outcome};
use medmesh_operator::controller::image_archive::{
    self as archive, Identities, Names, config_secret, stateful_set,
};
use medmesh_operator::crd::{ArchiveStorage, ImageArchive, ImageArchiveSpec, Replication};
use netns::{Lab, as_proxy, dicom_samples, ok, require, storescu_with_oracle};
use raft::Pods;

const NS: &str = "imaging";
const ARCHIVE_ID: &str = "spiffe://medmesh.local/ns/imaging/sa/pacs-archive";
const PACS: &str = "spiffe://medmesh.local/ns/pacs/sa/orthanc";
const AUDITOR: &str = "spiffe://medmesh.local/ns/medmesh/sa/auditor";
const BOUNDARY: &str = "medmesh-archive-e2e-7d1";

fn the_archive() -> ImageArchive {
    let mut a = ImageArchive::new(
        "pacs-archive",
        ImageArchiveSpec {
            replicas: 3,
            replication: Replication { min: 2, max: 3 },
            storage: ArchiveStorage {
                kubo_size: k8s_openapi::apimachinery::pkg::api::resource::Quantity("10Gi".into()),
                cluster_size: k8s_openapi::apimachinery::pkg::api::resource::Quantity("1Gi".into()),
                storage_class_name: None,
            },
            resources: None,
            images: None,
            adders: vec![serde_json::from_value(serde_json::json!({ "spiffeId": PACS })).unwrap()],
            readers: vec![
                serde_json::from_value(serde_json::json!({ "spiffeId": AUDITOR })).unwrap(),
            ],
        },
    );
    a.metadata.namespace = Some(NS.into());
    a.metadata.uid = Some("5c1d0e2a-7b3f-4e61-8d2c-9a0b1c2d3e4f".into());
    a
}

/// Everything the test runs, torn down on drop.
struct World {
    lab: Lab,
    _pods: Pods,
    archive: Vec<ArchivePod>,
    sts: k8s_openapi::api::apps::v1::StatefulSet,
    bin: std::path::PathBuf,
    _archive_sidecars: Vec<mesh::Kill>,
    sidecar_b: Option<Child>,
    sidecar_b_args: Vec<String>,
    _hosts: Hosts,
    /// What the CLI printed (for the identifying-value check).
    seen: std::cell::RefCell<String>,
}

struct Hosts(Vec<String>);

impl Drop for Hosts {
    fn drop(&mut self) {
        self.0.iter().for_each(|n| remove_hosts(n));
    }
}

impl World {
    fn d(&self) -> String {
        self.lab.dir.path().display().to_string()
    }

    /// `medmesh <args>` in B as the auditor. `as_proxy`: as uid 1337, so that its own mTLS to
    /// the archive's gateway is not intercepted by B's sidecar (an auditor outside the mesh).
    fn medmesh(&self, args: &str, as_proxy: bool) -> std::process::Output {
        self.medmesh_env("", args, as_proxy)
    }

    /// [`World::medmesh`] with more environment (`NAME=value ...`).
    fn medmesh_env(&self, more: &str, args: &str, as_proxy: bool) -> std::process::Output {
        let d = self.d();
        let c = format!("{d}/certs");
        let env = format!(
            "MEDMESH_LEDGER_URL=https://127.0.0.1:18443 MEDMESH_CERT={c}/medmesh.auditor.pem \
             MEDMESH_KEY={c}/medmesh.auditor-key.pem MEDMESH_CA={c}/ca.pem \
             MEDMESH_LEDGER_KEY=@{d}/verifier.key MEDMESH_LEDGER_STATE={d}/auditor/checkpoint {more}"
        );
        let user = if as_proxy {
            "setpriv --reuid 1337 --regid 1337 --clear-groups "
        } else {
            ""
        };
        let out = self.lab.exec(
            &self.lab.b,
            &format!("{user}env {env} {} {args}", mesh::bin("medmesh").display()),
        );
        self.seen.borrow_mut().push_str(&mesh::text(&out));
        out
    }

    /// Verified search hits of `sha` (hex): (index, entry).
    fn search(&self, sha: &str) -> Vec<(u64, LogEntry)> {
        let out = self.medmesh(&format!("ledger search --sha256 {sha}"), false);
        assert!(out.status.success(), "{}", mesh::text(&out));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut hits = Vec::new();
        let mut lines = text.lines();
        while let Some(l) = lines.next() {
            if let Some(rest) = l.strip_prefix("entry ") {
                assert!(l.contains("verified in checkpoint"), "{l}");
                let index: u64 = rest.split(' ').next().unwrap().parse().unwrap();
                hits.push((index, serde_json::from_str(lines.next().unwrap()).unwrap()));
            }
        }
        hits
    }

    fn metric(&self, name: &str) -> f64 {
        let out = self
            .lab
            .exec(&self.lab.b, "curl -sf http://127.0.0.1:15020/metrics");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(-1.0)
    }

    fn start_sidecar_b(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.lab.path("sidecar-b.log"))
            .unwrap();
        let child = as_proxy(&self.lab.b)
            .args(&self.sidecar_b_args)
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.sidecar_b = Some(child);
        self.lab.wait(
            &self.lab.b,
            "curl -sf http://127.0.0.1:15020/ready",
            "sidecar in B",
        );
    }

    fn kill_sidecar_b(&mut self) {
        if let Some(mut c) = self.sidecar_b.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops (SIGTERM) the ipfs-cluster daemon of every archive peer; Kubo keeps running.
    fn cluster_down(&mut self) {
        for p in &mut self.archive {
            if let Some(mut c) = p.cluster.take() {
                let _ = Command::new("kill")
                    .args(["-TERM", &c.id().to_string()])
                    .status();
                let _ = c.wait();
            }
        }
    }

    fn cluster_up(&mut self) {
        for p in &mut self.archive {
            p.start(&self.sts, "ipfs-cluster", &self.bin);
        }
        for p in &self.archive {
            wait_for(
                Duration::from_secs(90),
                &format!("{} sees three peers again", p.pod),
                || (seen_peers(p).len() == 3).then_some(()),
                || diag(&self.archive),
            );
        }
    }

    /// Waits until B's sidecar has nothing left to archive and `n` objects were archived in
    /// total.
    fn wait_archived(&self, n: f64) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let done = self.metric("medmesh_sidecar_archive_objects_total{result=\"archived\"}");
            let backlog = self.metric("medmesh_sidecar_archive_backlog");
            if done >= n && backlog == 0.0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "archived {done} of {n}, backlog {backlog}\nB: {}\n{}",
                tail(&self.lab.log("sidecar-b")),
                diag(&self.archive)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// STOW-RS of `files` from A, one request; the HTTP status.
    fn stow(&self, files: &[&serde_json::Value], tag: &str) -> u16 {
        let mut body = Vec::new();
        for m in files {
            let f = std::fs::read(m["path"].as_str().unwrap()).unwrap();
            body.extend_from_slice(
                format!("--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
            );
            body.extend_from_slice(&f);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        let file = self.lab.path(&format!("stow-{tag}.bin"));
        std::fs::write(&file, &body).unwrap();
        let out = self.lab.exec(
            &self.lab.a,
            &format!(
                "curl -sS -o /dev/null -w '%{{http_code}}' -u test:test -H 'Accept: application/dicom+json' \
                 -H 'Content-Type: multipart/related; type=\"application/dicom\"; boundary={BOUNDARY}' \
                 --data-binary @{} http://{}:8042/dicom-web/studies",
                file.display(),
                self.lab.ip_b
            ),
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// storescu from A of `files` to Orthanc in B (through the mesh); SHA-256 (hex) of each
    /// data set as sent.
    fn storescu(&self, files: &[&serde_json::Value], tag: &str) -> Vec<String> {
        let to = format!("{}:4242", self.lab.ip_b);
        let (sent, _) = storescu_with_oracle(&self.lab, files, &to, tag, || {
            format!("B: {}", tail(&self.lab.log("sidecar-b")))
        });
        sent.into_values().map(|h| h.to_hex()).collect()
    }

    /// The one `instance_stored` and the one `instance_archived` record of `sha`, linked.
    fn archived_once(&self, sha: &str) -> (u64, LogEntry) {
        let hits = self.search(sha);
        let stored: Vec<_> = hits
            .iter()
            .filter(|(_, e)| {
                e.record.kind == EventKind::InstanceStored && e.record.outcome == Outcome::Success
            })
            .collect();
        let archived: Vec<_> = hits
            .iter()
            .filter(|(_, e)| e.record.kind == EventKind::InstanceArchived)
            .collect();
        assert_eq!(stored.len(), 1, "{sha}: {hits:?}");
        assert_eq!(
            archived.len(),
            1,
            "{sha}: archived {} times",
            archived.len()
        );
        let (i, a) = archived[0].clone();
        let r = &a.record;
        assert_eq!(r.archived_record, Some(stored[0].1.record.record_id));
        assert_eq!(r.content_sha256, stored[0].1.record.content_sha256);
        assert_eq!(
            (r.source.as_str(), r.destination.as_str()),
            (PACS, ARCHIVE_ID)
        );
        assert!(r.cid.is_some() && r.bytes > stored[0].1.record.bytes);
        assert_eq!(r.sop_instance_uid, stored[0].1.record.sop_instance_uid);
        (i, a)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.kill_sidecar_b();
    }
}

fn tail(s: &str) -> String {
    s.lines().rev().take(30).collect::<Vec<_>>().join("\n")
}

fn setup() -> World {
    require(&[
        "ip",
        "iptables-nft",
        "iptables-legacy",
        "Orthanc",
        "storescu",
        "storescp",
        "setpriv",
        "curl",
        "python3",
    ]);
    let bin = ipfs_bin();
    let lab = Lab::new("v");
    let pods = Pods::new("mmav", 3);
    let (a_ns, b_ns) = (lab.a.clone(), lab.b.clone());
    let d = lab.dir.path().display().to_string();

    // B joins the archive's network (the cluster's Service addresses are reachable from it).
    let net = pods.ips[0].rsplit_once('.').unwrap().0.to_owned();
    let br = &pods.bridge;
    ok(&format!(
        "ip link add {br}hb type veth peer name {br}pb && ip link set {br}pb netns {b_ns} && \
         ip link set {br}hb master {br} && ip link set {br}hb up && \
         ip -n {b_ns} addr add {net}.50/24 dev {br}pb && ip -n {b_ns} link set {br}pb up"
    ));

    // The archive: three peers from the operator's rendered Secrets and StatefulSet.
    let a = the_archive();
    let names = Names::of(&a).unwrap();
    let owner = kube_owner(&a);
    let ids = Identities::generate(3).unwrap();
    let config = config_secret(&a, &names, &owner, &ids).unwrap();
    let sts = stateful_set(&a, &names, &owner, &archive::config_digest(&config));
    let hosts: Vec<(String, String)> = (0..3)
        .map(|i| (pods.ips[i].clone(), names.swarm_host(i)))
        .collect();
    for i in 0..3 {
        write_hosts(&pods.ns(i), &hosts);
    }
    let hosts_guard = Hosts((0..3).map(|i| pods.ns(i)).collect());
    let archive_dir = lab.path("archive");
    let mut peers: Vec<ArchivePod> = (0..3)
        .map(|i| ArchivePod::new(&pods.ns(i), &pods.ips[i], &names.replica(i), &archive_dir))
        .collect();
    for p in &mut peers {
        p.install_config(&config);
        p.start(&sts, "kubo", &bin);
        p.start(&sts, "ipfs-cluster", &bin);
    }
    let expected: BTreeSet<String> = ids.cluster_ids(3).iter().map(ToString::to_string).collect();
    for p in &peers {
        wait_for(
            Duration::from_secs(90),
            &format!("{} sees the three peers", p.pod),
            || (seen_peers(p) == expected).then_some(()),
            || diag(&peers),
        );
    }
    // Kubo's private swarm too (the peers fetch each other's blocks to pin them).
    for p in &peers {
        wait_for(
            Duration::from_secs(60),
            &format!("{}'s Kubo is connected to the two others", p.pod),
            || {
                let (ok, body) = p.curl("-X POST http://127.0.0.1:5001/api/v0/swarm/peers");
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                (ok && v["Peers"].as_array().is_some_and(|a| a.len() >= 2)).then_some(())
            },
            || diag(&peers),
        );
    }
    wait_for(
        Duration::from_secs(60),
        "free-space metrics of three peers",
        || {
            let (ok, body) = peers[0].curl("http://127.0.0.1:9094/monitor/metrics/freespace");
            (ok && json_lines(&body).len() == 3).then_some(())
        },
        || diag(&peers),
    );

    // Certificates, the ledger's keys, B's UID key; the archive key pair of the namespace.
    let (certs, signing) = lab.mesh_files_with(
        5,
        &["imaging/pacs-archive", "medmesh-system/medmesh-operator"],
    );
    let key = medmesh_core::seal::ArchiveKey::generate();
    std::fs::write(lab.path("archive.key"), key.to_secret_string()).unwrap();
    std::fs::write(
        lab.path("archive.recipients"),
        format!("{}\n", key.recipient()),
    )
    .unwrap();
    for dir in ["auditor", "got"] {
        std::fs::create_dir_all(lab.path(dir)).unwrap();
        ok(&format!("chmod 777 {}", lab.path(dir).display()));
    }
    ok(&format!(
        "chmod a+r {d}/archive.key {d}/archive.recipients && chmod -R a+rX {}",
        archive_dir.display()
    ));

    // Each peer's sidecar, with the archive's MeshPolicy compiled for its pods.
    let td = medmesh_core::TrustDomain::new("medmesh.local").unwrap();
    let policy = lab.path("archive-policy.json");
    write_pod_policy(&a, &sts, &td, &policy);
    ok(&format!("chmod a+r {}", policy.display()));
    let archive_sidecars = peers
        .iter()
        .map(|p| {
            mesh::Kill(start_pod_sidecar(
                p,
                &sts,
                &certs,
                "imaging.pacs-archive",
                &policy,
                "legacy",
            ))
        })
        .collect();

    // A and B: interception, the ledger in B, the sidecars, Orthanc.
    let sidecar = mesh::bin("medmesh-sidecar");
    let sidecar = sidecar.to_str().unwrap().to_owned();
    ok(&format!("ip netns exec {a_ns} {sidecar} init --mode nft"));
    ok(&format!("ip netns exec {b_ns} {sidecar} init --mode nft"));
    lab.write_pacs_policies();
    let c = certs.display().to_string();
    let mut lab = lab;
    lab.start_ledger(&certs, &signing, PACS);
    let a_args: Vec<String> = [
        sidecar.as_str(),
        "run",
        "--trust-domain",
        "medmesh.local",
        &format!("--cert={c}/radiology.scanner.pem"),
        &format!("--key={c}/radiology.scanner-key.pem"),
        &format!("--ca={c}/ca.pem"),
        &format!("--policy={d}/policy-a.json"),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let a_args: Vec<&str> = a_args.iter().map(String::as_str).collect();
    lab.spawn(&a_ns, "sidecar-a", true, &a_args);
    let sidecar_b_args: Vec<String> = vec![
        sidecar.clone(),
        "run".into(),
        "--trust-domain=medmesh.local".into(),
        format!("--cert={c}/pacs.orthanc.pem"),
        format!("--key={c}/pacs.orthanc-key.pem"),
        format!("--ca={c}/ca.pem"),
        format!("--policy={d}/policy-b.json"),
        "--ledger-url=https://127.0.0.1:18443".into(),
        format!("--ledger-key=@{d}/verifier.key"),
        format!("--audit-key={d}/uid.key"),
        "--audit-delivery=enforce".into(),
        format!("--spool-dir={d}/spool"),
        format!("--archive-url=http://{}:9094", pods.ips[0]),
        format!("--archive-id={ARCHIVE_ID}"),
        format!("--archive-recipients=@{d}/archive.recipients"),
        "--archive-replication-min=2".into(),
        "--archive-replication-max=3".into(),
    ];
    lab.start_orthanc("");
    lab.wait(
        &a_ns,
        "curl -sf http://127.0.0.1:15020/ready",
        "sidecar in A",
    );
    let mut w = World {
        lab,
        _pods: pods,
        archive: peers,
        sts,
        bin,
        _archive_sidecars: archive_sidecars,
        sidecar_b: None,
        sidecar_b_args,
        _hosts: hosts_guard,
        seen: Default::default(),
    };
    w.start_sidecar_b(&[]);
    w
}

#[test]
fn stored_instances_are_archived_encrypted_and_recovered_from_a_real_cluster() {
    let mut w = setup();
    let d = w.d();
    let manifest = dicom_samples(&w.lab.path("samples"), 100);
    let (first, rest) = manifest.split_at(70);
    let (dimse, stow) = first.split_at(60);

    // --- Transfers with the archive up: DIMSE and STOW-RS.
    let dimse: Vec<&serde_json::Value> = dimse.iter().collect();
    let mut sent: Vec<(String, bool)> = w
        .storescu(&dimse, "1")
        .into_iter()
        .map(|h| (h, false))
        .collect();
    assert!(sent.len() >= 50, "only {} DIMSE instances sent", sent.len());
    for (i, chunk) in stow.chunks(5).enumerate() {
        let files: Vec<&serde_json::Value> = chunk.iter().collect();
        let status = w.stow(&files, &format!("1-{i}"));
        assert_eq!(status, 200, "STOW-RS: {}", tail(&w.lab.log("sidecar-b")));
        for m in chunk {
            let f = std::fs::read(m["path"].as_str().unwrap()).unwrap();
            sent.push((sha256(&f).to_hex(), true));
        }
    }
    w.wait_archived(sent.len() as f64);

    // One instance_archived per stored instance, each recovered through a gateway.
    let mut cids = Vec::new();
    for (n, (sha, part10)) in sent.iter().enumerate() {
        let (index, entry) = w.archived_once(sha);
        cids.push(entry.record.cid.clone().unwrap().to_string());
        // Pod 1's gateway, not the peer the object was added through.
        let out_file = format!("{d}/got/{n}.dcm");
        let out = w.medmesh(
            &format!(
                "archive get {index} --gateway http://{}:8080 --archive-id {ARCHIVE_ID} --identity {d}/archive.key --out {out_file}",
                w.archive[1].ip
            ),
            true,
        );
        let text = mesh::text(&out);
        assert!(out.status.success(), "archive get {index}: {text}");
        assert!(text.contains("the CID recomputed from the"), "{text}");
        assert!(text.contains("equals the ledger's record"), "{text}");
        let got = std::fs::read(&out_file).unwrap();
        let got_sha = if *part10 {
            sha256(&got)
        } else {
            sha256(split_part10(&got).unwrap().unwrap().dataset)
        };
        assert_eq!(&got_sha.to_hex(), sha, "entry {index}");
    }

    // Restore: the archived original of a DIMSE instance sent back to a PACS by C-STORE
    // (a bit-preserving storescp in B), and to a file.
    let restored = w.lab.path("restored");
    std::fs::create_dir_all(&restored).unwrap();
    let b_ns = w.lab.b.clone();
    let rdir = restored.display().to_string();
    w.lab.spawn(
        &b_ns,
        "restore-scp",
        false,
        &[
            "storescp", "-d", "+B", "+xa", "-aet", "RESTORE", "-od", &rdir, "11112",
        ],
    );
    w.lab.wait(
        &b_ns,
        "bash -c 'echo > /dev/tcp/127.0.0.1/11112'",
        "the restore target",
    );
    let (dimse_sha, _) = sent.iter().find(|(_, p10)| !p10).unwrap();
    let (index, _) = w.archived_once(dimse_sha);
    let gateway = format!(
        "--gateway http://{}:8080 --archive-id {ARCHIVE_ID} --identity {d}/archive.key",
        w.archive[1].ip
    );
    let out = w.medmesh(
        &format!("archive restore {index} {gateway} --dicom 127.0.0.1:11112 --called RESTORE"),
        true,
    );
    assert!(
        out.status.success(),
        "{}\nstorescp: {}",
        mesh::text(&out),
        w.lab.log("restore-scp")
    );
    assert!(mesh::text(&out).contains("restored by C-STORE: status 0000"));
    let file = std::fs::read_dir(&restored)
        .unwrap()
        .next()
        .expect("the PACS received the restored instance")
        .unwrap()
        .path();
    let bytes = std::fs::read(&file).unwrap();
    let p10 = split_part10(&bytes).unwrap().unwrap();
    assert_eq!(&sha256(p10.dataset).to_hex(), dimse_sha);
    let out = w.medmesh(
        &format!("archive restore {index} {gateway} --to-file {d}/got/restored.dcm"),
        true,
    );
    assert!(out.status.success(), "{}", mesh::text(&out));
    let bytes = std::fs::read(w.lab.path("got/restored.dcm")).unwrap();
    let p10 = split_part10(&bytes).unwrap().unwrap();
    assert_eq!(&sha256(p10.dataset).to_hex(), dimse_sha);

    // Restore by STOW-RS into Orthanc (users required): a STOW-RS instance is deleted from the
    // PACS, then restored from the archive; Orthanc holds the original bytes again.
    let (stow_sha, _) = sent.iter().find(|(_, p10)| *p10).unwrap();
    let m = stow
        .iter()
        .find(|m| {
            sha256(&std::fs::read(m["path"].as_str().unwrap()).unwrap()).to_hex() == *stow_sha
        })
        .unwrap();
    let sop = m["uids"][2].as_str().unwrap();
    let orthanc = |cmd: &str| {
        let out = w
            .lab
            .exec(&w.lab.b, &format!("curl -sS -f -u test:test {cmd}"));
        assert!(out.status.success(), "Orthanc {cmd}: {}", mesh::text(&out));
        out.stdout
    };
    let lookup = |orthanc: &dyn Fn(&str) -> Vec<u8>| -> Vec<String> {
        let found: serde_json::Value = serde_json::from_slice(&orthanc(&format!(
            "-X POST --data-binary {sop} http://127.0.0.1:8042/tools/lookup"
        )))
        .unwrap();
        found
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["Type"] == "Instance")
            .map(|f| f["ID"].as_str().unwrap().to_owned())
            .collect()
    };
    let ids = lookup(&orthanc);
    assert_eq!(ids.len(), 1, "the STOW-RS instance is in Orthanc");
    orthanc(&format!(
        "-X DELETE http://127.0.0.1:8042/instances/{}",
        ids[0]
    ));
    assert!(lookup(&orthanc).is_empty(), "deleted from Orthanc");
    let (index, _) = w.archived_once(stow_sha);
    let stow_to = "--stow http://127.0.0.1:8042/dicom-web";
    // Without credentials: refused by the PACS, and said so.
    let out = w.medmesh(
        &format!("archive restore {index} {gateway} {stow_to}"),
        true,
    );
    assert!(!out.status.success());
    assert!(
        mesh::text(&out).contains("HTTP 401: it needs credentials"),
        "{}",
        mesh::text(&out)
    );
    // A user without its password: refused before anything is fetched.
    let out = w.medmesh(
        &format!("archive restore {index} {gateway} {stow_to} --stow-user test"),
        true,
    );
    assert!(!out.status.success());
    assert!(
        mesh::text(&out).contains("set MEDMESH_STOW_PASSWORD"),
        "{}",
        mesh::text(&out)
    );
    let out = w.medmesh_env(
        "MEDMESH_STOW_PASSWORD=test",
        &format!("archive restore {index} {gateway} {stow_to} --stow-user test"),
        true,
    );
    assert!(out.status.success(), "{}", mesh::text(&out));
    assert!(mesh::text(&out).contains("restored by STOW-RS: HTTP 200"));
    let ids = lookup(&orthanc);
    assert_eq!(ids.len(), 1, "restored into Orthanc");
    let file = orthanc(&format!("http://127.0.0.1:8042/instances/{}/file", ids[0]));
    assert_eq!(
        &sha256(&file).to_hex(),
        stow_sha,
        "Orthanc holds the original bytes"
    );

    // Every CID is the one Kubo computes for the ciphertext it holds.
    let cipher_dir = w.lab.path("ciphertexts");
    std::fs::create_dir_all(&cipher_dir).unwrap();
    let mut files = Vec::new();
    for (i, cid) in cids.iter().enumerate() {
        let bytes = cat(&w.archive[2], cid, "60s").unwrap_or_else(|| panic!("cat {cid}"));
        assert!(bytes.starts_with(b"age-encryption.org/v1\n"));
        let f = cipher_dir.join(format!("{i:03}.age"));
        std::fs::write(&f, bytes).unwrap();
        files.push(f.display().to_string());
    }
    let p2 = &w.archive[2];
    let out = ok(&format!(
        "ip netns exec {} env IPFS_PATH={} {}/ipfs add --only-hash --cid-version=1 --raw-leaves {}",
        p2.ns,
        p2.dir.join("kubo").display(),
        w.bin.display(),
        files.join(" ")
    ));
    let kubo: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix("added "))
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    assert_eq!(kubo, cids, "Kubo's CIDs of the ciphertexts");

    // Pin names are opaque: `mm-` and the archived record's id, nothing else.
    let (okk, body) = w.archive[0].curl("http://127.0.0.1:9094/allocations");
    assert!(okk, "{body}");
    let pins = json_lines(&body);
    assert_eq!(pins.len(), cids.len());
    for p in &pins {
        let name = p["name"].as_str().unwrap();
        assert!(
            name.len() == 35
                && name.starts_with("mm-")
                && name[3..].bytes().all(|b| b.is_ascii_hexdigit()),
            "pin name {name:?}"
        );
        assert!(
            p["metadata"].as_object().is_none_or(|m| m.is_empty()),
            "{p}"
        );
    }

    // --- The cluster down during transfers, B's sidecar SIGKILLed meanwhile.
    w.cluster_down();
    let (more_dimse, more_stow) = rest[..10].split_at(5);
    let more_dimse: Vec<&serde_json::Value> = more_dimse.iter().collect();
    let mut later: Vec<(String, bool)> = w
        .storescu(&more_dimse, "2")
        .into_iter()
        .map(|h| (h, false))
        .collect();
    let files: Vec<&serde_json::Value> = more_stow.iter().collect();
    assert_eq!(
        w.stow(&files, "2"),
        200,
        "async: stores never wait for the archive"
    );
    for m in more_stow {
        let f = std::fs::read(m["path"].as_str().unwrap()).unwrap();
        later.push((sha256(&f).to_hex(), true));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        w.metric("medmesh_sidecar_archive_backlog"),
        later.len() as f64,
        "{}",
        tail(&w.lab.log("sidecar-b"))
    );
    w.kill_sidecar_b();
    w.start_sidecar_b(&[]);
    assert_eq!(
        w.metric("medmesh_sidecar_archive_backlog"),
        later.len() as f64,
        "the staged objects survived the SIGKILL"
    );
    w.cluster_up();
    w.wait_archived(later.len() as f64);
    for (sha, _) in &later {
        w.archived_once(sha);
    }

    // --- `required` with a full staging area: the store that does not fit is refused.
    w.cluster_down();
    w.kill_sidecar_b();
    w.start_sidecar_b(&[
        "--archive-mode=required",
        "--archive-staging-max-bytes=1048576",
    ]);
    let mut statuses = Vec::new();
    for (i, m) in rest[10..].iter().enumerate() {
        let s = w.stow(&[m], &format!("3-{i}"));
        statuses.push(s);
        if s != 200 {
            break;
        }
    }
    assert_eq!(
        statuses.last(),
        Some(&503),
        "a store past the staging limit must fail in required mode: {statuses:?}"
    );
    assert!(
        statuses.len() > 1,
        "stores within the limit succeed: {statuses:?}"
    );
    assert!(w.metric("medmesh_sidecar_archive_staged_bytes") <= 1_048_576.0);
    let staged_ok = statuses.len() - 1;
    w.kill_sidecar_b();
    w.start_sidecar_b(&[]);
    w.cluster_up();
    w.wait_archived(staged_ok as f64);

    // --- Crypto-shredding: without the key, nothing archived under it can be read.
    let (index, entry) = w.archived_once(&sent[0].0);
    std::fs::remove_file(w.lab.path("archive.key")).unwrap();
    let out = w.medmesh(
        &format!(
            "archive get {index} --gateway http://{}:8080 --archive-id {ARCHIVE_ID} --identity {d}/archive.key --out {d}/got/shredded.dcm",
            w.archive[0].ip
        ),
        true,
    );
    let text = mesh::text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("shredded"), "{text}");
    assert!(!w.lab.path("got/shredded.dcm").exists());
    let other = medmesh_core::seal::ArchiveKey::generate();
    std::fs::write(w.lab.path("other.key"), other.to_secret_string()).unwrap();
    ok(&format!("chmod a+r {d}/other.key"));
    let out = w.medmesh(
        &format!(
            "archive get {index} --gateway http://{}:8080 --archive-id {ARCHIVE_ID} --identity {d}/other.key --out {d}/got/other.dcm",
            w.archive[0].ip
        ),
        true,
    );
    let text = mesh::text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("cannot decrypt"), "{text}");
    let cid = entry.record.cid.unwrap().to_string();
    let still = cat(&w.archive[0], &cid, "60s").expect("the ciphertext is still archived");
    assert_eq!(still.len() as u64, entry.record.bytes);

    // --- No identifying value of any sample anywhere the archive path wrote or printed.
    let needles = netns::identifying_values(&manifest, 6);
    assert!(needles.len() > 150, "only {} values", needles.len());
    let needle_file = w.lab.path("needles.txt");
    std::fs::write(&needle_file, needles.join("\n")).unwrap();
    // Kubo repos (blocks, datastore), cluster state (CRDT store, pinset), daemon and sidecar
    // logs of every peer; B's staging area and its sidecar log.
    let mut places: Vec<String> = w
        .archive
        .iter()
        .map(|p| p.dir.display().to_string())
        .collect();
    places.push(format!("{d}/spool/archive"));
    places.push(format!("{d}/sidecar-b.log"));
    let found = netns::sh(&format!(
        "grep -r -a -F -l -f {} {}",
        needle_file.display(),
        places.join(" ")
    ));
    assert!(
        found.stdout.is_empty(),
        "identifying values found in: {}",
        String::from_utf8_lossy(&found.stdout)
    );
    let mut dump = w.seen.borrow().clone();
    dump.push_str(&String::from_utf8_lossy(
        &w.lab
            .exec(&w.lab.b, "curl -sf http://127.0.0.1:15020/metrics")
            .stdout,
    ));
    dump.push_str(&body);
    for v in &needles {
        assert!(
            !dump.contains(v.as_str()),
            "{v:?} printed by the CLI or in metrics"
        );
    }
    println!(
        "archive path: {} instances archived and recovered, {} after an outage and a SIGKILL, required mode refused store {} past the limit",
        sent.len(),
        later.len(),
        statuses.len()
    );
}
