//! The archive cluster an `ImageArchive` describes, run with the real daemons: the operator's
//! own rendered Secrets and StatefulSet (identities, Kubo configuration, ipfs-cluster settings,
//! the containers' commands and environment) start Kubo and ipfs-cluster-service, built from
//! the Go module proxy, as peers in network-namespace pods.
//!
//! Proves: the cluster forms with exactly the generated peer IDs; an add with replication 2 is
//! pinned on 2 peers; a Kubo without the swarm key can neither connect nor fetch (and can once
//! it has the key); a peer with the cluster secret but an identity outside `trusted_peers`
//! cannot change the pin set; killing a peer leaves the content retrievable; a fourth replica
//! added by scaling joins with a new identity while the first three keep theirs.

// Integration tests: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/ipfs.rs"]
mod ipfs;
#[path = "support/mesh.rs"]
mod mesh;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/prom.rs"]
mod prom;
#[path = "support/raft.rs"]
mod raft;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use ipfs::{
    ArchivePod, add, add_local, allocations, cat, diag, ipfs_bin, json_lines, kube_owner, pin_diag,
    pinned_on, remove_hosts, seen_peers, start_pod_sidecar, wait_for, write_hosts,
    write_pod_policy,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use medmesh_operator::controller::image_archive::{
    self as archive, CLUSTER_READY_SCRIPT, Identities, Names, config_secret, stateful_set,
};
use medmesh_operator::crd::{ArchiveStorage, ImageArchive, ImageArchiveSpec, Replication};
use netns::{require, sh};
use raft::Pods;
use serde_json::Value;

const NS: &str = "imaging";

fn archive_of(replicas: i32) -> ImageArchive {
    let mut a = ImageArchive::new(
        "pacs-archive",
        ImageArchiveSpec {
            replicas,
            replication: Replication { min: 2, max: 2 },
            storage: ArchiveStorage {
                kubo_size: Quantity("10Gi".into()),
                cluster_size: Quantity("1Gi".into()),
                storage_class_name: None,
            },
            resources: None,
            images: None,
            adders: Vec::new(),
            readers: Vec::new(),
        },
    );
    a.metadata.namespace = Some(NS.into());
    a.metadata.uid = Some("0b6f6e3c-5d1f-4a53-9a43-1c1f3f3e0a01".into());
    a
}

struct Rendered {
    archive: ImageArchive,
    names: Names,
    config: k8s_openapi::api::core::v1::Secret,
    sts: k8s_openapi::api::apps::v1::StatefulSet,
}

fn render(replicas: i32, ids: &Identities) -> Rendered {
    let archive = archive_of(replicas);
    let names = Names::of(&archive).unwrap();
    let owner = kube_owner(&archive);
    let config = config_secret(&archive, &names, &owner, ids).unwrap();
    let sts = stateful_set(&archive, &names, &owner, &archive::config_digest(&config));
    Rendered {
        archive,
        names,
        config,
        sts,
    }
}

#[test]
fn the_operators_archive_cluster_forms_is_private_and_survives_a_peer_loss() {
    require(&["ip", "iptables", "curl"]);
    let bin = ipfs_bin();
    let dir = tempfile::tempdir().unwrap();
    // Pods 0-2: the archive; 3: the replica added by scaling; 4: the intruder.
    let lab = Pods::new("mmipfs", 5);
    let mut ids = Identities::generate(3).unwrap();
    let r3 = render(3, &ids);
    let names = r3.names.clone();
    let hosts: Vec<(String, String)> = (0..4)
        .map(|i| (lab.ips[i].clone(), names.swarm_host(i)))
        .collect();
    for i in 0..5 {
        write_hosts(&lab.ns(i), &hosts);
    }
    struct Hosts(Vec<String>);
    impl Drop for Hosts {
        fn drop(&mut self) {
            self.0.iter().for_each(|n| remove_hosts(n));
        }
    }
    let _hosts = Hosts((0..5).map(|i| lab.ns(i)).collect());

    let mut pods: Vec<ArchivePod> = (0..3)
        .map(|i| ArchivePod::new(&lab.ns(i), &lab.ips[i], &names.replica(i), dir.path()))
        .collect();
    for p in &mut pods {
        p.install_config(&r3.config);
        p.start(&r3.sts, "kubo", &bin);
        p.start(&r3.sts, "ipfs-cluster", &bin);
    }

    // The cluster forms, with exactly the generated identities.
    let expected: BTreeSet<String> = ids.cluster_ids(3).iter().map(ToString::to_string).collect();
    for p in &pods {
        wait_for(
            Duration::from_secs(90),
            &format!("{} sees the three generated peers", p.pod),
            || (seen_peers(p) == expected).then_some(()),
            || format!("seen {:?}\n{}", seen_peers(p), diag(&pods)),
        );
    }
    for (i, p) in pods.iter().enumerate() {
        let id: Value = serde_json::from_str(&p.curl_ok("http://127.0.0.1:9094/id")).unwrap();
        assert_eq!(id["id"], ids.peers[i].cluster.peer_id().to_string());
        assert_eq!(id["peername"], names.replica(i));
        let kubo: Value =
            serde_json::from_str(&p.curl_ok("-X POST http://127.0.0.1:5001/api/v0/id")).unwrap();
        assert_eq!(kubo["ID"], ids.peers[i].kubo.peer_id().to_string());
        // The containers' readiness probes pass (the cluster's own peer view).
        assert!(
            p.probe(&r3.sts, "ipfs-cluster", &bin),
            "{}",
            CLUSTER_READY_SCRIPT
        );
        assert!(p.probe(&r3.sts, "kubo", &bin));
        // Loopback only: the REST API and the RPC are not on the pod's address.
        let (reached, _) = p.curl(&format!("--max-time 3 http://{}:9094/id", p.ip));
        assert!(!reached, "{}: REST API reachable on the pod address", p.pod);
        let (reached, _) = p.curl(&format!(
            "--max-time 3 -X POST http://{}:5001/api/v0/id",
            p.ip
        ));
        assert!(!reached, "{}: Kubo RPC reachable on the pod address", p.pod);
    }
    // Allocation needs every peer's free-space metric.
    wait_for(
        Duration::from_secs(60),
        "free-space metrics of three peers",
        || {
            let (ok, body) = pods[0].curl("http://127.0.0.1:9094/monitor/metrics/freespace");
            (ok && json_lines(&body).len() == 3).then_some(())
        },
        || diag(&pods),
    );

    // An add with replication 2 is pinned on exactly 2 peers.
    let plain = dir.path().join("object.age");
    let bytes: Vec<u8> = (0..1_300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&plain, &bytes).unwrap();
    let cid = add(&pods[0], &plain, "a1b2c3", 2, 2);
    assert!(cid.starts_with("bafy"), "CIDv1 dag-pb root: {cid}");
    // The cluster's DAG builder and medmesh's agree (the archive path recomputes CIDs).
    assert_eq!(medmesh_core::unixfs::file_cid(&bytes).to_string(), cid);
    // ipfs-cluster heals a lost broadcast at the next rebroadcast (10 s as rendered) and a
    // stalled fetch of the pin's delta after its 2 min timeout: wait past that.
    let pinning = std::time::Instant::now();
    let holders = wait_for(
        Duration::from_secs(150),
        "the add pinned on 2 peers",
        || {
            let p = pinned_on(&pods[1], &cid);
            (p.len() == 2).then_some(p)
        },
        || pin_diag(&pods, &cid),
    );
    eprintln!(
        "the add was pinned on 2 peers after {:?}",
        pinning.elapsed()
    );
    assert!(holders.is_subset(&expected));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(pinned_on(&pods[2], &cid).len(), 2, "never more than max");
    for p in &pods {
        assert_eq!(
            cat(p, &cid, "60s").as_deref(),
            Some(&bytes[..]),
            "{}",
            p.pod
        );
    }

    // Each peer's own metrics (enabled by the rendered settings, on the pod's address as the
    // chart's PodMonitor scrapes them) fill the Archive dashboard's "Pins by status" in a real
    // Prometheus: every query of that panel returns data, and the pinset counts the add.
    let targets: String = pods
        .iter()
        .map(|p| {
            format!(
                "      - targets: [\"{}:{}\"]\n        labels: {{namespace: radiology, pod: {}}}\n",
                p.ip,
                archive::CLUSTER_METRICS_PORT,
                p.pod
            )
        })
        .collect();
    let prometheus = prom::start(
        dir.path(),
        &format!(
            "global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: medmesh-archive\n    static_configs:\n{targets}"
        ),
    );
    let pin_queries: Vec<(String, String)> = prom::queries(&prom::dashboard("medmesh-archive"))
        .into_iter()
        .filter(|(_, q)| q.contains(prom::IPFS_CLUSTER_METRICS))
        .collect();
    assert_eq!(pin_queries.len(), 5, "{pin_queries:?}");
    wait_for(
        Duration::from_secs(60),
        "every pin-status query answers and the pinset holds the add",
        || {
            let all = pin_queries
                .iter()
                .all(|(_, q)| !prom::query(prometheus.port, q).is_empty());
            let pinset = prom::query(
                prometheus.port,
                "max(ipfscluster_pins{job=\"medmesh-archive\"})",
            );
            let n: f64 = pinset
                .first()
                .and_then(|s| s["value"][1].as_str())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            (all && n >= 1.0).then_some(())
        },
        || {
            pin_queries
                .iter()
                .map(|(t, q)| format!("{t}: {q} -> {:?}", prom::query(prometheus.port, q)))
                .collect::<Vec<_>>()
                .join("\n")
        },
    );
    drop(prometheus);

    // A Kubo without the swarm key can neither connect nor fetch.
    let intruder = &lab.ns(4);
    let idir = dir.path().join("intruder");
    std::fs::create_dir_all(&idir).unwrap();
    let ienv = format!(
        "env -i PATH={}:/usr/bin:/bin HOME={} IPFS_PATH={}/kubo IPFS_TELEMETRY=off",
        bin.display(),
        idir.display(),
        idir.display()
    );
    netns::ok(&format!(
        "ip netns exec {intruder} {ienv} ipfs init --profile=test >/dev/null && \
         ip netns exec {intruder} {ienv} ipfs config --json Addresses.Swarm '[\"/ip4/0.0.0.0/tcp/4001\"]' && \
         ip netns exec {intruder} {ienv} ipfs config Addresses.API /ip4/127.0.0.1/tcp/5001"
    ));
    let start_intruder = |pnet: bool| {
        let log = std::fs::File::create(idir.join("kubo.log")).unwrap();
        let pnet_env = if pnet { "LIBP2P_FORCE_PNET=1" } else { "" };
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "exec ip netns exec {intruder} {ienv} {pnet_env} ipfs daemon --migrate=false"
            ))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    };
    let mut ik = start_intruder(false);
    let iapi = |args: &str| {
        sh(&format!(
            "ip netns exec {intruder} curl -sS --max-time 40 -X POST 'http://127.0.0.1:5001/api/v0/{args}'"
        ))
    };
    wait_for(
        Duration::from_secs(30),
        "the intruder's Kubo answers",
        || iapi("id").status.success().then_some(()),
        || std::fs::read_to_string(idir.join("kubo.log")).unwrap_or_default(),
    );
    let target = format!(
        "/ip4/{}/tcp/4001/p2p/{}",
        lab.ips[0],
        ids.peers[0].kubo.peer_id()
    );
    let connect = iapi(&format!("swarm/connect?arg={target}&timeout=15s"));
    let said = String::from_utf8_lossy(&connect.stdout).into_owned();
    assert!(
        !said.contains("success"),
        "a Kubo without the swarm key connected: {said}"
    );
    let fetched = iapi(&format!("cat?arg={cid}&timeout=15s"));
    assert!(
        !fetched.stdout.windows(64).any(|w| w == &bytes[..64]),
        "a Kubo without the swarm key fetched the object"
    );
    // With the key it connects: the key, nothing else, kept it out.
    let _ = ik.kill();
    let _ = ik.wait();
    std::fs::write(idir.join("kubo/swarm.key"), ids.swarm_key.to_file()).unwrap();
    let mut ik = start_intruder(true);
    wait_for(
        Duration::from_secs(30),
        "the keyed Kubo connects",
        || {
            let o = iapi(&format!("swarm/connect?arg={target}&timeout=10s"));
            String::from_utf8_lossy(&o.stdout)
                .contains("success")
                .then_some(())
        },
        || std::fs::read_to_string(idir.join("kubo.log")).unwrap_or_default(),
    );

    // A cluster peer with the secret but an identity outside trusted_peers cannot change the
    // pin set: it unpins the object and pins another; the trusted peers' pin set is unchanged,
    // while a change by a trusted peer propagates.
    let rogue_key = medmesh_core::p2p::PeerKey::generate().unwrap();
    let mut rogue = ArchivePod::new(intruder, &lab.ips[4], "rogue", dir.path());
    {
        // Its own settings: the same secret and cluster name, every real peer as bootstrap,
        // and (its choice) trusting everyone.
        let env0 = archive::cluster_env(&r3.archive, &names, &ids, 0);
        let env = env0
            .lines()
            .map(|l| match l.split_once('=').unwrap().0 {
                "CLUSTER_PEERNAME" => "CLUSTER_PEERNAME=rogue".to_owned(),
                "CLUSTER_CRDT_TRUSTEDPEERS" => "CLUSTER_CRDT_TRUSTEDPEERS=*".to_owned(),
                "CLUSTER_PEERADDRESSES" => format!(
                    "CLUSTER_PEERADDRESSES={}",
                    (0..3)
                        .map(|j| format!(
                            "/dns4/{}/tcp/9096/p2p/{}",
                            names.swarm_host(j),
                            ids.peers[j].cluster.peer_id()
                        ))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let cfg = rogue.dir.join("config");
        std::fs::write(cfg.join("rogue.cluster.env"), format!("{env}\n")).unwrap();
        std::fs::write(
            cfg.join("rogue.identity.json"),
            serde_json::json!({"id": rogue_key.peer_id().to_string(), "private_key": rogue_key.to_libp2p_base64()}).to_string(),
        )
        .unwrap();
        std::fs::write(cfg.join("swarm.key"), ids.swarm_key.to_file()).unwrap();
    }
    // The intruder's Kubo already runs on 127.0.0.1:5001 in that pod.
    rogue.start(&r3.sts, "ipfs-cluster", &bin);
    wait_for(
        Duration::from_secs(60),
        "the rogue peer reaches the cluster",
        || seen_peers(&rogue).len().ge(&2).then_some(()),
        || format!("{}\n{}", rogue.log("ipfs-cluster"), diag(&pods)),
    );
    // It has the shared pin set before it tries to change it: a trusted change makes the
    // peers broadcast their CRDT heads (otherwise that waits for the rebroadcast interval).
    let warm_file = dir.path().join("warm.bin");
    std::fs::write(&warm_file, b"a trusted pin that makes the heads move").unwrap();
    let warm = add(&pods[1], &warm_file, "c0ffee", 2, 2);
    wait_for(
        Duration::from_secs(120),
        "the rogue peer syncs the pin set",
        || {
            let a = allocations(&rogue);
            (a.contains(&cid) && a.contains(&warm)).then_some(())
        },
        || rogue.log("ipfs-cluster"),
    );
    let rogue_file = dir.path().join("rogue.bin");
    std::fs::write(&rogue_file, b"not an archived image").unwrap();
    // To its own Kubo: the trusted peers refuse the rogue's block streams, and with their
    // metrics in hand its allocator might pick one of them.
    let rogue_cid = add_local(&rogue, &rogue_file, "rogue");
    let unpin = rogue.curl_ok(&format!("-X DELETE http://127.0.0.1:9094/pins/{cid}"));
    // A trusted change, made after the rogue's, must arrive; the rogue's must not.
    let trusted_file = dir.path().join("trusted.bin");
    std::fs::write(&trusted_file, b"archived by a trusted peer").unwrap();
    let trusted_cid = add(&pods[2], &trusted_file, "d4e5f6", 2, 2);
    for p in &pods {
        wait_for(
            Duration::from_secs(60),
            &format!("{} has the trusted peer's pin", p.pod),
            || allocations(p).contains(&trusted_cid).then_some(()),
            || diag(&pods),
        );
    }
    std::thread::sleep(Duration::from_secs(5));
    // The rogue made both changes in its own state: only the trusted peers refused them.
    let own = allocations(&rogue);
    assert!(
        own.contains(&rogue_cid) && !own.contains(&cid),
        "rogue's own pin set: {own:?}"
    );
    eprintln!(
        "rogue peer: pinned {rogue_cid} and unpinned {cid} locally; the trusted peers ignored both"
    );
    for p in &pods {
        let set = allocations(p);
        assert!(
            set.contains(&cid),
            "{}: the rogue's unpin ({unpin}) took effect",
            p.pod
        );
        assert!(
            !set.contains(&rogue_cid),
            "{}: the rogue's pin took effect",
            p.pod
        );
    }
    rogue.kill();
    let _ = ik.kill();
    let _ = ik.wait();

    // Killing a peer that holds the object leaves it retrievable.
    let holder = (0..3)
        .find(|&i| holders.contains(&ids.peers[i].cluster.peer_id().to_string()))
        .unwrap();
    pods[holder].kill();
    for (i, p) in pods.iter().enumerate() {
        if i != holder {
            assert_eq!(
                cat(p, &cid, "60s").as_deref(),
                Some(&bytes[..]),
                "{} after {} was killed",
                p.pod,
                names.replica(holder)
            );
        }
    }
    pods[holder].start(&r3.sts, "kubo", &bin);
    pods[holder].start(&r3.sts, "ipfs-cluster", &bin);

    // Scale to four: the identities are extended, the first three unchanged.
    let before: Vec<(String, String)> = ids
        .peers
        .iter()
        .map(|p| (p.kubo.to_libp2p_base64(), p.cluster.to_libp2p_base64()))
        .collect();
    ids.extend_to(4).unwrap();
    for (i, (k, c)) in before.iter().enumerate() {
        assert_eq!(&ids.peers[i].kubo.to_libp2p_base64(), k);
        assert_eq!(&ids.peers[i].cluster.to_libp2p_base64(), c);
    }
    let r4 = render(4, &ids);
    assert_ne!(
        container_annotation(&r3.sts),
        container_annotation(&r4.sts),
        "a new peer set rolls the pods"
    );
    let mut new = ArchivePod::new(&lab.ns(3), &lab.ips[3], &names.replica(3), dir.path());
    new.install_config(&r4.config);
    new.start(&r4.sts, "kubo", &bin);
    new.start(&r4.sts, "ipfs-cluster", &bin);
    // The rolling update: each old peer restarts on the new configuration, one at a time.
    for p in &mut pods {
        p.stop();
        p.install_config(&r4.config);
        p.start(&r4.sts, "kubo", &bin);
        p.start(&r4.sts, "ipfs-cluster", &bin);
    }
    pods.push(new);
    let expected4: BTreeSet<String> = ids.cluster_ids(4).iter().map(ToString::to_string).collect();
    for p in &pods {
        wait_for(
            Duration::from_secs(90),
            &format!("{} sees the four peers", p.pod),
            || (seen_peers(p) == expected4).then_some(()),
            || format!("seen {:?}\n{}", seen_peers(p), diag(&pods)),
        );
    }
    for (i, p) in pods.iter().enumerate() {
        let id: Value = serde_json::from_str(&p.curl_ok("http://127.0.0.1:9094/id")).unwrap();
        assert_eq!(
            id["id"],
            ids.peers[i].cluster.peer_id().to_string(),
            "{}",
            p.pod
        );
    }
    // The new replica holds the shared pin set and serves the object.
    wait_for(
        Duration::from_secs(60),
        "the new replica has the pin set",
        || {
            let a = allocations(&pods[3]);
            (a.contains(&cid) && a.contains(&trusted_cid)).then_some(())
        },
        || diag(&pods),
    );
    assert_eq!(cat(&pods[3], &cid, "60s").as_deref(), Some(&bytes[..]));
}

fn container_annotation(sts: &k8s_openapi::api::apps::v1::StatefulSet) -> String {
    archive::template_digest(sts).unwrap().to_owned()
}

/// `medmesh dev certs` identities for the mesh test, readable by the proxy's uid.
fn dev_certs(dir: &Path, workloads: &[&str]) -> std::path::PathBuf {
    let certs = dir.join("certs");
    let mut cmd = std::process::Command::new(mesh::bin("medmesh"));
    cmd.args(["dev", "certs", "--out"]).arg(&certs);
    for w in workloads {
        cmd.args(["--workload", w]);
    }
    let out = mesh::run(&mut cmd);
    assert!(out.status.success(), "{}", mesh::text(&out));
    netns::ok(&format!("chmod -R a+rX {}", dir.display()));
    certs
}

fn identity(certs: &Path, who: &str) -> medmesh_core::tls::Identity {
    medmesh_core::tls::Identity::from_pem(
        &std::fs::read(certs.join(format!("{who}.pem"))).unwrap(),
        &std::fs::read(certs.join(format!("{who}-key.pem"))).unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_apis_are_reached_only_through_the_mesh_by_the_named_identities() {
    use medmesh_core::TrustDomain;
    use medmesh_operator::controller::image_archive::{mesh_get, parse_peers};

    require(&["ip", "iptables-legacy", "curl", "setpriv"]);
    let bin = ipfs_bin();
    let dir = tempfile::tempdir().unwrap();
    let lab = Pods::new("mmarch", 1);
    let ns0 = lab.ns(0);
    let ip = lab.ips[0].clone();

    // One peer, rendered by the operator, with adders (orthanc) and readers (auditor).
    let mut a = archive_of(1);
    a.spec.replication = Replication { min: 1, max: 1 };
    a.spec.adders = vec![
        serde_json::from_value(serde_json::json!({"serviceAccount": {"name": "orthanc"}})).unwrap(),
    ];
    a.spec.readers = vec![
        serde_json::from_value(
            serde_json::json!({"spiffeId": "spiffe://medmesh.local/ns/imaging/sa/auditor"}),
        )
        .unwrap(),
    ];
    let names = Names::of(&a).unwrap();
    let owner = kube_owner(&a);
    let ids = Identities::generate(1).unwrap();
    let config = config_secret(&a, &names, &owner, &ids).unwrap();
    let sts = stateful_set(&a, &names, &owner, &archive::config_digest(&config));
    write_hosts(&ns0, &[(ip.clone(), names.swarm_host(0))]);
    struct Hosts(String);
    impl Drop for Hosts {
        fn drop(&mut self) {
            remove_hosts(&self.0);
        }
    }
    let _hosts = Hosts(ns0.clone());
    let mut pod = ArchivePod::new(&ns0, &ip, &names.replica(0), dir.path());
    pod.install_config(&config);
    pod.start(&sts, "kubo", &bin);
    pod.start(&sts, "ipfs-cluster", &bin);
    wait_for(
        Duration::from_secs(60),
        "the peer's REST API",
        || pod.curl("http://127.0.0.1:9094/id").0.then_some(()),
        || diag(std::slice::from_ref(&pod)),
    );
    let object = dir.path().join("object.age");
    std::fs::write(&object, b"age-encryption.org/v1 ... an encrypted instance").unwrap();
    let cid = add(&pod, &object, "b7c8d9", 1, 1);

    // The sidecar with the operator's policy for this pod (compiled as the namespace's
    // ConfigMap would be), the pod's workload identity, and the pod annotations' skips.
    let td = TrustDomain::new("medmesh.local").unwrap();
    let policy_file = dir.path().join("policy.json");
    write_pod_policy(&a, &sts, &td, &policy_file);
    let certs = dev_certs(
        dir.path(),
        &[
            "imaging/pacs-archive",
            "imaging/orthanc",
            "imaging/auditor",
            "medmesh-system/medmesh-operator",
            "radiology/scanner",
        ],
    );
    let _sidecar = mesh::Kill(start_pod_sidecar(
        &pod,
        &sts,
        &certs,
        "imaging.pacs-archive",
        &policy_file,
        "legacy",
    ));

    let bundle = medmesh_core::tls::TrustBundle::from_pem(
        &std::fs::read(certs.join("ca.pem")).unwrap(),
        td.clone(),
    )
    .unwrap();
    let server = td.workload(NS, "pacs-archive").unwrap();
    let rest = format!("http://{ip}:9094");
    let gateway = format!("http://{ip}:8080");
    let get = |who: &str, url: &str, path: &str| {
        let id = identity(&certs, who);
        let (bundle, server, url, path) = (
            bundle.clone(),
            server.clone(),
            url.to_owned(),
            path.to_owned(),
        );
        async move { mesh_get(&id, &bundle, &server, &url, &path).await }
    };

    // The operator reads the peer view as the controller does: the generated identity.
    let sidecar_log = || std::fs::read_to_string(pod.dir.join("sidecar.log")).unwrap_or_default();
    let peers = get("medmesh-system.medmesh-operator", &rest, "/peers")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", sidecar_log()));
    let peers = parse_peers(&peers).unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].id, ids.peers[0].cluster.peer_id().to_string());
    // An adder reaches the REST API (its pin status), not the gateway.
    let pin: Value = serde_json::from_slice(
        &get("imaging.orthanc", &rest, &format!("/pins/{cid}"))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(pin["cid"], cid);
    let denied = get("imaging.orthanc", &gateway, &format!("/ipfs/{cid}")).await;
    assert!(denied.is_err(), "an adder read the gateway: {denied:?}");
    // A reader reaches the gateway (the ciphertext), not the REST API.
    let bytes = get("imaging.auditor", &gateway, &format!("/ipfs/{cid}"))
        .await
        .unwrap();
    assert_eq!(bytes, std::fs::read(&object).unwrap());
    let denied = get("imaging.auditor", &rest, "/peers").await;
    assert!(denied.is_err(), "a reader reached the REST API: {denied:?}");
    // Anyone else: refused on both; a client expecting another server identity refuses the pod.
    for (url, path) in [(&rest, "/id"), (&gateway, "/ipfs/bafkqaaa")] {
        let r = get("radiology.scanner", url, path).await;
        assert!(r.is_err(), "an unnamed identity reached {url}{path}: {r:?}");
    }
    let other = td.workload(NS, "not-the-archive").unwrap();
    let wrong = mesh_get(
        &identity(&certs, "medmesh-system.medmesh-operator"),
        &bundle,
        &other,
        &rest,
        "/id",
    )
    .await;
    assert!(
        wrong.as_ref().is_err_and(|e| e.contains("TLS")),
        "the archive's SVID was accepted as another identity: {wrong:?}"
    );
    // Plaintext from outside the mesh: refused (the ports are not permissive).
    let plain = sh(&format!("curl -sS --max-time 5 {rest}/id"));
    assert!(
        !plain.status.success() || !String::from_utf8_lossy(&plain.stdout).contains("peername"),
        "plaintext reached the REST API"
    );
    let log = std::fs::read_to_string(pod.dir.join("sidecar.log")).unwrap_or_default();
    eprintln!(
        "sidecar: {} denial(s) logged",
        log.matches("denied").count() + log.matches("refused").count()
    );
}
