//! What the operator generates for an `AuditLedger` runs the real ledger: the signing-key
//! Secret, the TLS Secret (an SVID from the operator's identity CA) and the per-replica
//! configuration in the ConfigMap are written where the StatefulSet mounts them (paths and
//! ports moved to a temporary directory and free ports), `medmesh-ledger run` starts on them
//! and becomes ready, an appender named in the AuditLedger appends, and the operator's own
//! checkpoint reader (the one that fills the status) reads and verifies the checkpoint.

// Integration tests: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mesh.rs"]
mod mesh;

use std::time::{Duration, SystemTime};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use medmesh_core::TrustDomain;
use medmesh_core::tls::{Identity, ServerIdentity, TrustBundle};
use medmesh_ledger_client::{LedgerClient, LedgerClientConfig};
use medmesh_operator::controller::audit_ledger::{
    self, CheckpointReader, ClientCheckpointReader, LedgerTarget, Names,
};
use medmesh_operator::crd::AuditLedger;
use medmesh_operator::identity::IssuerCa;
use mesh::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_ledger_objects_run_the_real_ledger() {
    operators_ledger_runs(1).await;
}

/// Three replicas from the operator's objects: each replica's configuration lists the others
/// by their headless-Service names (dialled on loopback through the ledger's `resolve`, as a
/// pod's DNS would), they elect a leader, an append through a follower is stored, and the
/// operator's reader reports the Raft leader and each follower's lag in the status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_three_replica_ledger_replicates() {
    operators_ledger_runs(3).await;
}

async fn operators_ledger_runs(replicas: i32) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let td = TrustDomain::new("cluster.local").unwrap();
    let ledger: AuditLedger = serde_json::from_value(serde_json::json!({
        "apiVersion": "medmesh.io/v1alpha1", "kind": "AuditLedger",
        "metadata": {"name": "audit", "namespace": "pacs", "uid": "u-1"},
        "spec": {
            "replicas": replicas,
            "storage": {"size": "1Gi"},
            "signingKey": {"generate": {}},
            "appenders": [{"serviceAccount": {"namespace": "pacs", "name": "orthanc"}}],
            "readers": [{"spiffeId": "spiffe://cluster.local/ns/medmesh/sa/auditor"}]
        }
    }))
    .unwrap();
    let names = Names::of(&ledger).unwrap();
    let owner = OwnerReference {
        api_version: "medmesh.io/v1alpha1".into(),
        kind: "AuditLedger".into(),
        name: "audit".into(),
        uid: "u-1".into(),
        ..OwnerReference::default()
    };
    let now = SystemTime::now();
    let ca = IssuerCa::generate(&td, now).unwrap();
    let (signing, signer) = audit_ledger::new_signing_secret(&names, &names.origin(&td)).unwrap();
    let server_id = names.server_id(&td).unwrap();
    let (chain, key) =
        audit_ledger::issue_svid(&ca, &server_id, Duration::from_secs(3600), now).unwrap();
    let tls = audit_ledger::tls_secret(&names, &owner, &chain, &key, ca.bundle_pem());
    let operator_id = "spiffe://cluster.local/ns/medmesh-system/sa/medmesh-operator"
        .parse()
        .unwrap();
    let cm = audit_ledger::config_map(&ledger, &names, &owner, &td, &signer, Some(&operator_id))
        .unwrap();

    // The volumes, as the StatefulSet mounts them, under a temporary root.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let write = |path: &str, bytes: &[u8]| {
        let p = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    };
    for (k, v) in signing.data.as_ref().unwrap() {
        write(&format!("/etc/medmesh/signing/{k}"), &v.0);
    }
    for (k, v) in tls.data.as_ref().unwrap() {
        write(&format!("/etc/medmesh/tls/{k}"), &v.0);
    }
    let data = cm.data.as_ref().unwrap();
    let ports: Vec<(u16, u16)> = (0..replicas).map(|_| (free_port(), free_port())).collect();
    // A pod's DNS, on loopback: each replica's stable name dials its port here.
    let resolve: String = (0..replicas)
        .map(|j| {
            format!(
                "  {}: 127.0.0.1:{}\n",
                names.replica_addr(j),
                ports[j as usize].0
            )
        })
        .collect();
    let mut procs = Vec::new();
    for i in 0..replicas {
        let (api, admin) = ports[i as usize];
        let data_root = root.join(format!("replica-{i}"));
        let mut yaml = data[&format!("audit-{i}.yaml")]
            .replace("/etc/medmesh/", &format!("{}/etc/medmesh/", root.display()))
            .replace(
                "/var/lib/medmesh/",
                &format!("{}/var/lib/medmesh/", data_root.display()),
            )
            .replace("0.0.0.0:8443", &format!("127.0.0.1:{api}"))
            .replace("0.0.0.0:9090", &format!("127.0.0.1:{admin}"));
        if replicas > 1 {
            yaml.push_str(&format!("resolve:\n{resolve}"));
        }
        let config = root.join(format!("audit-{i}.yaml"));
        std::fs::write(&config, &yaml).unwrap();
        let log = std::fs::File::create(root.join(format!("ledger-{i}.log"))).unwrap();
        procs.push(Kill(
            std::process::Command::new(bin("medmesh-ledger"))
                .env("MEDMESH_LEDGER_CONFIG", &config)
                .arg("run")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        ));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for (i, (_, admin)) in ports.iter().enumerate() {
        while http_status(*admin, "/ready") != Some(200) {
            assert!(
                std::time::Instant::now() < deadline,
                "replica {i} did not become ready on the operator's configuration:\n{}\n{}",
                std::fs::read_to_string(root.join(format!("audit-{i}.yaml"))).unwrap_or_default(),
                std::fs::read_to_string(root.join(format!("ledger-{i}.log"))).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Clients use the last replica (a follower when replicated, mostly).
    let api = ports[replicas as usize - 1].0;

    // An appender named in the AuditLedger appends (with an SVID from the same CA).
    let app_id = "spiffe://cluster.local/ns/pacs/sa/orthanc".parse().unwrap();
    let (c, k) = audit_ledger::issue_svid(&ca, &app_id, Duration::from_secs(600), now).unwrap();
    let verifier = medmesh_core::NoteVerifier::parse(data["verifier.key"].trim()).unwrap();
    let client = LedgerClient::new(LedgerClientConfig {
        url: format!("https://127.0.0.1:{api}"),
        identity: Identity::from_pem(c.as_bytes(), k.as_bytes()).unwrap(),
        bundle: TrustBundle::from_pem(ca.bundle_pem().as_bytes(), td.clone()).unwrap(),
        server: ServerIdentity::Exact(server_id.clone()),
        verifier,
        origin: data["origin"].clone(),
        timeout: Duration::from_secs(5),
    })
    .unwrap();
    let mut rec = record(1);
    rec.source = app_id;
    client.append(&rec, true).await.unwrap();

    // The operator's checkpoint reader, as it fills the status.
    let reader =
        ClientCheckpointReader::from_ca(&ca, &operator_id, &td, Duration::from_secs(600), now)
            .unwrap();
    let target = LedgerTarget {
        url: format!("https://127.0.0.1:{api}"),
        server_id,
        origin: data["origin"].clone(),
        verifier_key: data["verifier.key"].trim().to_owned(),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let cp = reader.read(&target).await.unwrap();
        if cp.tree_size == 1 {
            assert!(!cp.root_hash.is_empty());
            let view = cp
                .status
                .clone()
                .expect("the reader reads the replica's status");
            assert_eq!(view.replicated, replicas > 1, "{view:?}");
            if replicas > 1 {
                // The status the controller writes from what its reader saw.
                let obs = audit_ledger::Observed {
                    ready_replicas: replicas,
                    key_problem: None,
                    checkpoint: Ok(cp),
                };
                let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now(),
                );
                let st = audit_ledger::status(&ledger, &names, &obs, &now);
                let r = st.replication.expect("replication status");
                let leader = r.leader.clone().expect("a leader");
                assert!(leader.starts_with("audit-"), "{r:?}");
                assert!(r.term.unwrap_or(0) >= 1, "{r:?}");
                if r.observed_from.as_deref() == Some(leader.as_str()) {
                    assert_eq!(r.followers.len(), 2, "{r:?}");
                }
            }
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "checkpoint stuck at {cp:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
