//! Cluster end-to-end tests against a real API server: the loopback control plane of
//! `scripts/k8s` (etcd, kube-apiserver, controller-manager, scheduler, kwok nodes) with the chart
//! installed and two operator replicas running as the chart's ServiceAccount, out of cluster
//! (`scripts/cluster-e2e up`; the webhook and identity service are registered by URL). Any other
//! cluster works the same way (README.md, "Cluster end-to-end tests").
//!
//! Each test works in its own namespace, deleted at the end. The tests fail, never skip, when
//! that environment is missing. Leader hand-over kills an operator, so it lives in its own
//! binary (`cluster_serial`), run after these.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/cluster.rs"]
mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use medmesh_operator::crd::{AuditLedger, MeshPolicy};
use serde_json::{Value, json};
use support::{Env, TestNs, delete_and_wait, eventually, get, gone, kubectl, policy_doc};

fn ledger(name: &str, replicas: i32) -> AuditLedger {
    serde_json::from_value(json!({
        "apiVersion": "medmesh.io/v1alpha1", "kind": "AuditLedger",
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "storage": {"size": "1Gi"}, "signingKey": {"generate": {}}},
    }))
    .unwrap()
}

/// The API server's refusal of `obj` (created in `ns`), as text.
async fn refused(ns: &TestNs, obj: Value) -> String {
    let (ok, out, err) = kubectl(
        &["-n", &ns.name, "create", "-f", "-", "-o", "name"],
        Some(&obj.to_string()),
    );
    assert!(!ok, "the server accepted {obj}: {out}");
    err
}

#[tokio::test]
async fn crds_are_established_and_the_server_enforces_their_schema_and_cel_rules() {
    let client = Env::client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "auditledgers.medmesh.io",
        "imagearchives.medmesh.io",
        "meshpolicies.medmesh.io",
    ] {
        let c = crds.get(name).await.unwrap();
        let conds = c.status.unwrap().conditions.unwrap();
        for t in ["Established", "NamesAccepted"] {
            assert!(
                conds.iter().any(|c| c.type_ == t && c.status == "True"),
                "{name}: {t} is not True: {conds:?}"
            );
        }
        assert_eq!(
            c.metadata
                .annotations
                .unwrap_or_default()
                .get("helm.sh/resource-policy"),
            Some(&"keep".to_owned()),
            "{name}: the chart keeps its CRDs on uninstall"
        );
    }

    let ns = TestNs::new("e2e-crd", false).await;
    // One case per CEL rule the CRDs declare, each refused by the server with the rule's message.
    let both_keys = refused(
        &ns,
        json!({"apiVersion": "medmesh.io/v1alpha1", "kind": "AuditLedger", "metadata": {"name": "both"},
               "spec": {"storage": {"size": "1Gi"},
                        "signingKey": {"generate": {}, "secretRef": {"name": "k", "key": "signing.key"}}}}),
    )
    .await;
    assert!(
        both_keys.contains("exactly one of generate or secretRef must be set"),
        "{both_keys}"
    );
    let two_readers = refused(
        &ns,
        json!({"apiVersion": "medmesh.io/v1alpha1", "kind": "AuditLedger", "metadata": {"name": "readers"},
               "spec": {"storage": {"size": "1Gi"}, "signingKey": {"generate": {}},
                        "readers": [{"spiffeId": "spiffe://cluster.local/ns/a/sa/b", "serviceAccount": {"namespace": "a", "name": "b"}}]}}),
    )
    .await;
    assert!(
        two_readers.contains("exactly one of spiffeId or serviceAccount must be set"),
        "{two_readers}"
    );
    let two_peers = refused(
        &ns,
        json!({"apiVersion": "medmesh.io/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": "peers"},
               "spec": {"podSelector": {}, "ports": [{"port": 104,
                        "allow": [{"namespace": "radiology", "serviceAccount": {"namespace": "a", "name": "b"}}]}]}}),
    )
    .await;
    assert!(
        two_peers.contains("exactly one of spiffeId, serviceAccount or namespace must be set"),
        "{two_peers}"
    );
    // ImageArchive: replication within bounds, and within the replicas.
    let archive = |name: &str, spec: Value| {
        json!({"apiVersion": "medmesh.io/v1alpha1", "kind": "ImageArchive", "metadata": {"name": name},
               "spec": spec})
    };
    let storage = json!({"kuboSize": "1Gi", "clusterSize": "1Gi"});
    let inverted = refused(
        &ns,
        archive(
            "inverted",
            json!({"storage": storage, "replication": {"min": 3, "max": 2}}),
        ),
    )
    .await;
    assert!(
        inverted.contains("replication.min cannot exceed replication.max"),
        "{inverted}"
    );
    let too_few = refused(
        &ns,
        archive(
            "few",
            json!({"storage": storage, "replicas": 1, "replication": {"min": 2, "max": 2}}),
        ),
    )
    .await;
    assert!(
        too_few.contains("replication.min cannot exceed replicas"),
        "{too_few}"
    );
    let many = refused(
        &ns,
        archive("many", json!({"storage": storage, "replicas": 16})),
    )
    .await;
    assert!(
        many.contains("should be less than or equal to 15"),
        "{many}"
    );

    // Schema (not CEL): a port out of range, an unknown protocol.
    let port = refused(
        &ns,
        json!({"apiVersion": "medmesh.io/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": "port"},
               "spec": {"podSelector": {}, "ports": [{"port": 70000, "protocol": "smtp"}]}}),
    )
    .await;
    assert!(
        port.contains("should be less than or equal to 65535"),
        "{port}"
    );
    assert!(port.contains("Unsupported value: \"smtp\""), "{port}");

    // Transition rules: the signing key and the storage class cannot change.
    let ledgers: Api<AuditLedger> = ns.api();
    let mut l = ledger("immutable", 1);
    l.spec.storage.storage_class_name = Some("fast".into());
    ledgers.create(&PostParams::default(), &l).await.unwrap();
    let err = ledgers
        .patch(
            "immutable",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"signingKey": {"generate": null, "secretRef": {"name": "k", "key": "signing.key"}}}})),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("signingKey is immutable: a new key starts a new log"),
        "{err}"
    );
    let err = ledgers
        .patch(
            "immutable",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"storage": {"storageClassName": "slow"}}})),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("storageClassName is immutable"), "{err}");
    // The replica count is not immutable.
    ledgers
        .patch(
            "immutable",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();

    // Printer columns, as kubectl shows them.
    let (ok, out, err) = kubectl(&["-n", &ns.name, "get", "auditledgers"], None);
    assert!(ok, "{err}");
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header[..3],
        ["NAME", "REPLICAS", "READY"],
        "AuditLedger columns: {out}"
    );
    assert!(
        out.lines().nth(1).unwrap().starts_with("immutable"),
        "{out}"
    );
    assert!(
        out.lines().nth(1).unwrap().split_whitespace().nth(1) == Some("3"),
        "{out}"
    );
    let policies: Api<MeshPolicy> = ns.api();
    policies
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "medmesh.io/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": "pacs"},
                "spec": {"podSelector": {}, "ports": [{"port": 4242, "protocol": "dicom"}, {"port": 8042}]},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let out = support::eventually("the MeshPolicy's status", || async {
        let (ok, out, err) = kubectl(&["-n", &ns.name, "get", "meshpolicies"], None);
        assert!(ok, "{err}");
        out.contains("True").then_some(out)
    })
    .await;
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header[..3],
        ["NAME", "MODE", "PORTS"],
        "MeshPolicy columns: {out}"
    );
    assert!(out.contains("4242/dicom,8042"), "{out}");
}

/// The resourceVersions of a ledger's children (not the StatefulSet, whose status moves).
async fn child_versions(ns: &TestNs) -> Vec<Option<String>> {
    vec![
        get::<Secret>(&ns.api(), "ledger-signing-key")
            .await
            .resource_version(),
        get::<Secret>(&ns.api(), "ledger-tls")
            .await
            .resource_version(),
        get::<ConfigMap>(&ns.api(), "ledger-config")
            .await
            .resource_version(),
        get::<Service>(&ns.api(), "ledger").await.resource_version(),
        get::<Service>(&ns.api(), "ledger-headless")
            .await
            .resource_version(),
        get::<PodDisruptionBudget>(&ns.api(), "ledger")
            .await
            .resource_version(),
    ]
}

#[tokio::test]
async fn audit_ledger_yields_its_children_a_status_and_is_garbage_collected() {
    let ns = TestNs::new("e2e-ledger", false).await;
    support::volume_for(&ns.client, &ns.name, "data-ledger-0", "1Gi").await;
    let ledgers: Api<AuditLedger> = ns.api();
    ledgers
        .create(&PostParams::default(), &ledger("ledger", 1))
        .await
        .unwrap();

    let key: Secret = get(&ns.api(), "ledger-signing-key").await;
    let tls: Secret = get(&ns.api(), "ledger-tls").await;
    let cm: ConfigMap = get(&ns.api(), "ledger-config").await;
    let headless: Service = get(&ns.api(), "ledger-headless").await;
    let client_svc: Service = get(&ns.api(), "ledger").await;
    let sts: StatefulSet = get(&ns.api(), "ledger").await;
    let pdb: PodDisruptionBudget = get(&ns.api(), "ledger").await;
    assert!(
        key.owner_references().is_empty(),
        "the signing key outlives the ledger"
    );
    for (kind, refs) in [
        ("tls Secret", tls.owner_references()),
        ("ConfigMap", cm.owner_references()),
        ("headless Service", headless.owner_references()),
        ("Service", client_svc.owner_references()),
        ("StatefulSet", sts.owner_references()),
        ("PDB", pdb.owner_references()),
    ] {
        assert_eq!(refs.len(), 1, "{kind}: {refs:?}");
        assert_eq!(refs[0].kind, "AuditLedger", "{kind}");
        assert_eq!(refs[0].controller, Some(true), "{kind}");
    }
    assert!(cm.data.unwrap().contains_key("ledger-0.yaml"));
    assert_eq!(headless.spec.unwrap().cluster_ip.as_deref(), Some("None"));
    assert_eq!(
        sts.spec.as_ref().unwrap().service_name.as_deref(),
        Some("ledger-headless")
    );

    // kwok runs the pod: the real StatefulSet controller, PV binder and scheduler make it
    // Ready, and the status follows. No ledger answers at the Service's DNS name from outside
    // the cluster: Ready (the replicas are) but Degraded, saying why.
    let status = eventually("a status with one ready replica", || {
        let ledgers = ledgers.clone();
        async move {
            ledgers
                .get("ledger")
                .await
                .ok()?
                .status
                .filter(|s| s.ready_replicas == Some(1))
        }
    })
    .await;
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(
        status.endpoint.as_deref(),
        Some(format!("https://ledger.{}.svc:8443", ns.name).as_str())
    );
    let cond = |t: &str| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == t)
            .cloned()
            .unwrap()
    };
    assert_eq!(cond("Ready").status, "True", "{:?}", cond("Ready"));
    let degraded = cond("Degraded");
    assert_eq!(degraded.status, "True", "{degraded:?}");
    assert_eq!(degraded.reason, "CheckpointUnreadable", "{degraded:?}");
    assert!(
        degraded
            .message
            .contains("checkpoint not read: ledger https://ledger."),
        "{degraded:?}"
    );
    let pods: Api<Pod> = ns.api();
    let pod = get(&pods, "ledger-0").await;
    assert!(
        pod.spec.unwrap().node_name.is_some(),
        "ledger-0 was never scheduled"
    );

    // Further reconciles change no child: resourceVersions stay. The checkpoint is unreadable
    // here, so the ledger is reconciled every RECHECK (5 s); the touch below adds one more.
    let before = child_versions(&ns).await;
    ledgers
        .patch(
            "ledger",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"e2e/touch": "1"}}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after = child_versions(&ns).await;
    assert_eq!(before, after, "a reconcile without changes rewrote a child");
    let sts_rv = get::<StatefulSet>(&ns.api(), "ledger").await;
    assert_eq!(
        sts_rv.metadata.generation, sts.metadata.generation,
        "the StatefulSet spec was rewritten"
    );

    // Deletion: the garbage collector removes every owned child; the signing key stays.
    delete_and_wait(&ledgers, "ledger").await;
    gone(&ns.api::<StatefulSet>(), "ledger").await;
    gone(&ns.api::<Service>(), "ledger").await;
    gone(&ns.api::<Service>(), "ledger-headless").await;
    gone(&ns.api::<ConfigMap>(), "ledger-config").await;
    gone(&ns.api::<Secret>(), "ledger-tls").await;
    gone(&ns.api::<PodDisruptionBudget>(), "ledger").await;
    let kept: Secret = ns.api().get("ledger-signing-key").await.unwrap();
    assert_eq!(kept.metadata.uid, key.metadata.uid);
    assert_eq!(kept.data, key.data);
}

#[tokio::test]
async fn image_archive_yields_a_private_cluster_whose_identities_survive_scaling() {
    use medmesh_operator::controller::image_archive::Identities;
    use medmesh_operator::crd::ImageArchive;

    let ns = TestNs::new("e2e-archive", true).await;
    for i in 0..4 {
        for claim in ["kubo", "cluster"] {
            support::volume_for(&ns.client, &ns.name, &format!("{claim}-arch-{i}"), "1Gi").await;
        }
    }
    let archives: Api<ImageArchive> = ns.api();
    archives
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "medmesh.io/v1alpha1", "kind": "ImageArchive", "metadata": {"name": "arch"},
                "spec": {"storage": {"kuboSize": "1Gi", "clusterSize": "1Gi"},
                         "adders": [{"serviceAccount": {"name": "orthanc"}}]},
            }))
            .unwrap(),
        )
        .await
        .unwrap();

    // The children: generated identities (no owner), the rest owned by the archive.
    let ids_secret: Secret = get(&ns.api(), "arch-identities").await;
    assert!(
        ids_secret.owner_references().is_empty(),
        "identities outlive the archive"
    );
    let ids = Identities::from_secret(&ids_secret).unwrap();
    assert_eq!(ids.peers.len(), 3, "replicas default to 3");
    let config: Secret = get(&ns.api(), "arch-config").await;
    let sa: ServiceAccount = get(&ns.api(), "arch").await;
    let swarm: Service = get(&ns.api(), "arch-swarm").await;
    let client_svc: Service = get(&ns.api(), "arch").await;
    let policy: MeshPolicy = get(&ns.api(), "arch-archive").await;
    let np: NetworkPolicy = get(&ns.api(), "arch").await;
    let sts: StatefulSet = get(&ns.api(), "arch").await;
    let pdb: PodDisruptionBudget = get(&ns.api(), "arch").await;
    for (kind, refs) in [
        ("config Secret", config.owner_references()),
        ("ServiceAccount", sa.owner_references()),
        ("swarm Service", swarm.owner_references()),
        ("Service", client_svc.owner_references()),
        ("MeshPolicy", policy.owner_references()),
        ("NetworkPolicy", np.owner_references()),
        ("StatefulSet", sts.owner_references()),
        ("PDB", pdb.owner_references()),
    ] {
        assert_eq!(refs.len(), 1, "{kind}: {refs:?}");
        assert_eq!(refs[0].kind, "ImageArchive", "{kind}");
    }
    assert_eq!(swarm.spec.unwrap().cluster_ip.as_deref(), Some("None"));
    let data = config.data.clone().unwrap();
    for i in 0..3 {
        for f in ["kubo.json", "cluster.env", "identity.json"] {
            assert!(data.contains_key(&format!("arch-{i}.{f}")), "arch-{i}.{f}");
        }
    }
    // The archive's MeshPolicy is compiled into the namespace's policy like any other.
    let compiled = support::eventually("the policy document with the archive's REST port", || {
        let ns = &ns;
        async move {
            let doc = policy_doc(ns, "policy.json").await?;
            (doc.contains("9094") && doc.contains("/orthanc")).then_some(doc)
        }
    })
    .await;
    assert!(compiled.contains("8080"), "{compiled}");

    // kwok runs the pods; the status lists the generated peers. No cluster answers at the
    // Service's name from outside: Degraded, saying why.
    let status = eventually("a status with three ready replicas", || {
        let archives = archives.clone();
        async move {
            archives
                .get("arch")
                .await
                .ok()?
                .status
                .filter(|s| s.ready_replicas == Some(3))
        }
    })
    .await;
    let cluster_ids: Vec<String> = ids.cluster_ids(3).iter().map(ToString::to_string).collect();
    let listed: Vec<String> = status.peers.iter().map(|p| p.peer_id.clone()).collect();
    assert_eq!(listed, cluster_ids);
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.status, "True", "{degraded:?}");
    assert_eq!(degraded.reason, "ClusterUnreadable", "{degraded:?}");
    assert_eq!(
        status.endpoint.as_deref(),
        Some(format!("http://arch.{}.svc:9094", ns.name).as_str())
    );

    // Scale up: identities extended, the first three unchanged, the pods roll.
    let digest = |s: &StatefulSet| {
        medmesh_operator::controller::image_archive::template_digest(s)
            .unwrap()
            .to_owned()
    };
    archives
        .patch(
            "arch",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();
    let four = support::eventually("four identities", || {
        let secrets: Api<Secret> = ns.api();
        async move {
            let ids = Identities::from_secret(&secrets.get("arch-identities").await.ok()?).ok()?;
            (ids.peers.len() == 4).then_some(ids)
        }
    })
    .await;
    for i in 0..3 {
        assert_eq!(
            four.peers[i].kubo.to_libp2p_base64(),
            ids.peers[i].kubo.to_libp2p_base64()
        );
        assert_eq!(
            four.peers[i].cluster.to_libp2p_base64(),
            ids.peers[i].cluster.to_libp2p_base64()
        );
    }
    assert_eq!(four.swarm_key, ids.swarm_key);
    let sts4 = support::eventually("the StatefulSet at four replicas", || {
        let sets: Api<StatefulSet> = ns.api();
        async move {
            sets.get("arch")
                .await
                .ok()
                .filter(|s| s.spec.as_ref().and_then(|p| p.replicas) == Some(4))
        }
    })
    .await;
    assert_ne!(digest(&sts), digest(&sts4), "a new peer set rolls the pods");

    // Scale down: nothing is forgotten; back up, the same identity returns.
    archives
        .patch(
            "arch",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .unwrap();
    support::eventually("the StatefulSet at two replicas", || {
        let sets: Api<StatefulSet> = ns.api();
        async move {
            sets.get("arch")
                .await
                .ok()
                .filter(|s| s.spec.as_ref().and_then(|p| p.replicas) == Some(2))
        }
    })
    .await;
    let kept = Identities::from_secret(&get(&ns.api(), "arch-identities").await).unwrap();
    assert_eq!(kept.peers.len(), 4);
    assert_eq!(
        kept.peers[3].cluster.to_libp2p_base64(),
        four.peers[3].cluster.to_libp2p_base64()
    );

    // Deletion: owned children go, the identities stay.
    delete_and_wait(&archives, "arch").await;
    gone(&ns.api::<StatefulSet>(), "arch").await;
    gone(&ns.api::<Secret>(), "arch-config").await;
    gone(&ns.api::<MeshPolicy>(), "arch-archive").await;
    gone(&ns.api::<NetworkPolicy>(), "arch").await;
    let left: Secret = ns.api().get("arch-identities").await.unwrap();
    assert_eq!(left.metadata.uid, ids_secret.metadata.uid);
}

#[tokio::test]
async fn mesh_policy_yields_the_policy_config_map_and_conditions_for_bad_references() {
    let env = Env::get();
    let ns = TestNs::new("e2e-policy", false).await;
    let policies: Api<MeshPolicy> = ns.api();
    policies
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "medmesh.io/v1alpha1", "kind": "MeshPolicy",
                "metadata": {"name": "pacs"},
                "spec": {"podSelector": {}, "ports": [{"port": 4242, "protocol": "dicom", "allow": [{"namespace": "radiology"}]}]},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let cm: ConfigMap = get(&ns.api(), "medmesh-policy").await;
    let set: Value = serde_json::from_str(&cm.data.unwrap()["policy.json"]).unwrap();
    assert_eq!(set["selected"][0]["document"]["inbound"][0]["port"], 4242);
    let ca: ConfigMap = get(&ns.api(), "medmesh-identity-ca").await;
    assert_eq!(
        ca.data.unwrap()["ca.crt"],
        env.bundle(&ns.client).await,
        "the published CA is the one the webhook configuration trusts"
    );
    let condition = |name: &'static str, ty: &'static str| {
        let policies = policies.clone();
        async move {
            eventually(&format!("{name} condition {ty}"), || {
                let policies = policies.clone();
                async move {
                    policies
                        .get(name)
                        .await
                        .ok()?
                        .status?
                        .conditions
                        .into_iter()
                        .find(|c| c.type_ == ty)
                }
            })
            .await
        }
    };
    assert_eq!(condition("pacs", "Ready").await.status, "True");

    // References to a ledger and a key Secret that do not exist.
    policies
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "medmesh.io/v1alpha1", "kind": "MeshPolicy",
                "metadata": {"name": "audited"},
                "spec": {"podSelector": {"matchLabels": {"app": "orthanc"}},
                         "ports": [{"port": 104, "protocol": "dicom", "allow": [{"namespace": "radiology"}]}],
                         "audit": {"ledgerRef": {"name": "nowhere"}, "keySecretRef": {"name": "no-key", "key": "key"}}},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let ready = condition("audited", "Ready").await;
    assert_eq!(ready.status, "False", "{ready:?}");
    assert_eq!(ready.reason, "InvalidReference", "{ready:?}");
    assert!(
        ready
            .message
            .contains(&format!("AuditLedger {}/nowhere not found", ns.name)),
        "{ready:?}"
    );
    assert!(
        ready
            .message
            .contains(&format!("Secret {}/no-key not found", ns.name)),
        "{ready:?}"
    );
    // The valid policy is still published; the refused one is not.
    let cm: ConfigMap = get(&ns.api(), "medmesh-policy").await;
    let set: Value = serde_json::from_str(&cm.data.unwrap()["policy.json"]).unwrap();
    assert_eq!(set["selected"].as_array().unwrap().len(), 1, "{set}");
}

fn pod_template(app: &str) -> Value {
    json!({
        "metadata": {"labels": {"app": app}},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
    })
}

fn injected(pod: &Pod) -> bool {
    let inits: Vec<&str> = pod
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .map(|c| c.iter().map(|c| c.name.as_str()).collect())
        .unwrap_or_default();
    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("medmesh.io/injected-version"));
    match (inits.as_slice(), annotated) {
        (["medmesh-init", "medmesh-sidecar"], true) => true,
        ([], false) => false,
        other => panic!("half-injected pod {}: {other:?}", pod.name_any()),
    }
}

async fn pods_of(pods: &Api<Pod>, app: &str, n: usize) -> Vec<Pod> {
    eventually(&format!("{n} running pods of {app}"), || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels(&format!("app={app}")))
                .await
                .ok()?;
            let running = list
                .items
                .into_iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .collect::<Vec<_>>();
            (running.len() == n).then_some(running)
        }
    })
    .await
}

#[tokio::test]
async fn pods_created_by_the_real_controllers_are_stored_injected_and_exemptions_hold() {
    let ns = TestNs::new("e2e-inject", true).await;
    // The deny-all policy and the CA are published for a labelled namespace without policies.
    let _: ConfigMap = get(&ns.api(), "medmesh-policy").await;
    let _: ConfigMap = get(&ns.api(), "medmesh-identity-ca").await;

    // A Deployment (→ ReplicaSet → Pods) and a StatefulSet: the controller-manager creates the
    // Pods, the API server calls the webhook, the server validates the patched Pods (native
    // sidecar included), the scheduler binds them and kwok runs them.
    let deployments: Api<Deployment> = ns.api();
    deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "viewer"},
                "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "viewer"}}, "template": pod_template("viewer")},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let sets: Api<StatefulSet> = ns.api();
    sets.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "pacs"},
            "spec": {"replicas": 2, "serviceName": "pacs", "selector": {"matchLabels": {"app": "pacs"}}, "template": pod_template("pacs")},
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    let pods: Api<Pod> = ns.api();
    for app in ["viewer", "pacs"] {
        for p in pods_of(&pods, app, 2).await {
            assert!(injected(&p), "{} was not injected", p.name_any());
            let name = p.name_any();
            let status = p.status.unwrap();
            let sidecar = status
                .init_container_statuses
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.name == "medmesh-sidecar")
                .expect("the native sidecar has a status");
            assert_eq!(sidecar.started, Some(true), "{name}");
            // The projected identity token and the policy volumes are in the stored Pod.
            let volumes: Vec<String> = p
                .spec
                .unwrap()
                .volumes
                .unwrap_or_default()
                .into_iter()
                .map(|v| v.name)
                .collect();
            for v in [
                "medmesh-identity-token",
                "medmesh-policy",
                "medmesh-identity-ca",
            ] {
                assert!(volumes.iter().any(|n| n == v), "{v} missing: {volumes:?}");
            }
        }
    }
    let sts = get(&sets, "pacs").await;
    eventually("StatefulSet pacs ready", || {
        let sets = sets.clone();
        async move {
            let s = sets.get("pacs").await.ok()?;
            (s.status?.ready_replicas == Some(2)).then_some(())
        }
    })
    .await;
    assert_eq!(sts.spec.unwrap().replicas, Some(2));

    // Not injected: an opted-out Pod and a hostNetwork Pod.
    let opt_out: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "opt-out", "labels": {"medmesh.io/inject": "disabled"}},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
    }))
    .unwrap();
    let stored = pods.create(&PostParams::default(), &opt_out).await.unwrap();
    assert!(!injected(&stored));
    let host: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "host"},
        "spec": {"hostNetwork": true, "containers": [{"name": "app", "image": "registry.example/app:1"}]},
    }))
    .unwrap();
    let stored = pods.create(&PostParams::default(), &host).await.unwrap();
    assert!(!injected(&stored));

    // Dry run: the answer is injected, nothing is stored, no Event is emitted.
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let plain: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "dry"},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
    }))
    .unwrap();
    let answer = pods.create(&dry, &plain).await.unwrap();
    assert!(injected(&answer));
    assert!(pods.get_opt("dry").await.unwrap().is_none());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events: Api<k8s_openapi::api::events::v1::Event> = ns.api();
    let about_dry = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("dry"))
        .count();
    assert_eq!(about_dry, 0);
}

async fn service_account(ns: &TestNs, sa: &str) {
    let sas: Api<ServiceAccount> = ns.api();
    sas.create(
        &PostParams::default(),
        &ServiceAccount {
            metadata: ObjectMeta {
                name: Some(sa.into()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        },
    )
    .await
    .unwrap();
}

/// A token minted by the API server (TokenRequest) for `sa` with `audience`.
async fn token_of(ns: &TestNs, sa: &str, audience: &str) -> String {
    let sas: Api<ServiceAccount> = ns.api();
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.into()],
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    sas.create_token_request(sa, &PostParams::default(), &req)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
}

fn csr_for(id: &str) -> String {
    csr_and_key(id).0
}

/// A CSR for `id` and its private key (PEM).
fn csr_and_key(id: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    (
        p.serialize_request(&key).unwrap().pem().unwrap(),
        key.serialize_pem(),
    )
}

async fn ask(env: &Env, client: &Client, csr: &str, token: &str) -> (u16, Value) {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(env.bundle(client).await.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(medmesh_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .unwrap();
    let r = http
        .post(format!("{}/v1/certificate", env.url))
        .json(&json!({"csr": csr, "token": token}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn a_projected_token_gets_the_svid_of_exactly_its_service_account() {
    let env = Env::get();
    let ns = TestNs::new("e2e-identity", false).await;
    service_account(&ns, "modality").await;
    service_account(&ns, "viewer").await;
    let modality = token_of(&ns, "modality", "medmesh-identity").await;
    let viewer = token_of(&ns, "viewer", "medmesh-identity").await;
    let id = format!("spiffe://cluster.local/ns/{}/sa/modality", ns.name);

    let (status, body) = ask(&env, &ns.client, &csr_for(&id), &modality).await;
    assert_eq!(status, 200, "{body}");
    let leaf = body["certificate"].as_str().unwrap();
    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::CertificateDer::pem_slice_iter(leaf.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(medmesh_core::tls::spiffe_id_of(&der).unwrap().as_str(), id);

    // Another account's token cannot get the modality's identity.
    let (status, body) = ask(&env, &ns.client, &csr_for(&id), &viewer).await;
    assert_eq!(status, 403, "{body}");
    // A token for the API server's own audience (what a pod's default token is) is refused.
    let apiserver = token_of(
        &ns,
        "modality",
        "https://kubernetes.default.svc.cluster.local",
    )
    .await;
    let (status, body) = ask(&env, &ns.client, &csr_for(&id), &apiserver).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.to_string().contains("audiences"), "{body}");
    // A token whose account is gone is refused, although its signature and times are valid:
    // the identity service asks the API server every time, which caches a successful
    // authentication for 10 s (kube-apiserver's token cache), so within that bound.
    let sas: Api<ServiceAccount> = ns.api();
    delete_and_wait(&sas, "modality").await;
    let deleted = std::time::Instant::now();
    support::eventually_for(
        "the deleted account's token to be refused",
        Duration::from_secs(30),
        || {
            let (env, client, id, token) = (&env, &ns.client, &id, &modality);
            async move {
                let (status, body) = ask(env, client, &csr_for(id), token).await;
                assert!(status == 200 || status == 401, "{status} {body}");
                (status == 401).then_some(())
            }
        },
    )
    .await;
    eprintln!(
        "token of a deleted account refused after {:?}",
        deleted.elapsed()
    );
    // Garbage is refused with a precise message, not a server error.
    let (status, body) = ask(&env, &ns.client, &csr_for(&id), "not-a-token").await;
    assert_eq!(status, 401, "{body}");

    // An expired token: the API server mints none shorter than 10 minutes, so it is signed here
    // with the cluster's service-account key, exactly as the server would have, but for a time
    // already past. The same token, still valid, is accepted (so the signature is right).
    let viewer_id = format!("spiffe://cluster.local/ns/{}/sa/viewer", ns.name);
    let uid = sas.get("viewer").await.unwrap().metadata.uid.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let forged_valid = sign_token(&env, &ns.name, "viewer", &uid, now - 60, now + 600);
    let (status, body) = ask(&env, &ns.client, &csr_for(&viewer_id), &forged_valid).await;
    assert_eq!(
        status, 200,
        "a token signed like the server's is valid: {body}"
    );
    let expired = sign_token(&env, &ns.name, "viewer", &uid, now - 1200, now - 600);
    let (status, body) = ask(&env, &ns.client, &csr_for(&viewer_id), &expired).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.to_string().contains("expired"), "{body}");
}

/// A service-account token for `ns/sa` (uid `uid`) with audience `medmesh-identity`, valid from
/// `iat` to `exp` (seconds), signed RS256 with the cluster's signing key (`MEDMESH_E2E_SA_KEY`).
fn sign_token(env: &Env, ns: &str, sa: &str, uid: &str, iat: u64, exp: u64) -> String {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = b64(br#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = json!({
        "iss": env.sa_issuer, "aud": ["medmesh-identity"], "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "iat": iat, "nbf": iat, "exp": exp,
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": uid}},
    });
    let signing_input = format!("{header}.{}", b64(claims.to_string().as_bytes()));
    let (ok, sig, err) = support::openssl_sign(&env.sa_key, signing_input.as_bytes());
    assert!(ok, "openssl: {err}");
    format!("{signing_input}.{}", b64(&sig))
}

/// Whether the API server lets `user` do `verb` on `resource` (in `namespace`, named `name`).
async fn allowed(
    client: &Client,
    user: &str,
    (group, resource, verb): (&str, &str, &str),
    namespace: Option<&str>,
    name: Option<&str>,
) -> bool {
    let sar = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.into()),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                group: Some(group.into()),
                resource: Some(resource.split('/').next().unwrap().into()),
                subresource: resource.split('/').nth(1).map(Into::into),
                verb: Some(verb.into()),
                namespace: namespace.map(Into::into),
                name: name.map(Into::into),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    api.create(&PostParams::default(), &sar)
        .await
        .unwrap()
        .status
        .unwrap()
        .allowed
}

/// Every operator replica's `/metrics` passes `promtool check metrics` (Prometheus' naming and
/// format lint) and exports both CAs' expiry; exactly one replica reports itself the leader.
#[tokio::test]
async fn operator_metrics_pass_promtool_and_name_one_leader() {
    use std::io::Write as _;
    let env = Env::get();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let scrape = |addr: String| async move {
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let value = |body: &str, series: &str| {
        body.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    for (name, addr) in &env.operators {
        let body = scrape(addr.clone()).await;
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool (Debian prometheus; scripts/check-rules installs it)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "operator {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for ca in ["workload", "serving"] {
            let t = value(
                &body,
                &format!(
                    "medmesh_operator_ca_certificate_expiry_timestamp_seconds{{ca=\"{ca}\"}} "
                ),
            )
            .unwrap_or_else(|| panic!("{name}: no {ca} CA expiry"));
            assert!(t > now, "{name}: the {ca} CA expired at {t}");
        }
    }
    // The Lease may still be changing hands right after the replicas start.
    eventually("exactly one replica reporting itself the leader", || {
        let operators = env.operators.clone();
        async move {
            let mut leaders = 0.0;
            for (_, addr) in operators {
                leaders += value(&scrape(addr).await, "medmesh_operator_leader ")?;
            }
            (leaders == 1.0).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn the_operators_service_account_has_exactly_the_charts_permissions() {
    let env = Env::get();
    let client = Env::client().await;
    let user = env.operator_user();
    // What the operator needs (it runs with nothing else in these tests, so a missing rule
    // already fails the other tests; here each is named).
    let needed: &[(&str, &str, &str)] = &[
        ("medmesh.io", "auditledgers", "watch"),
        ("medmesh.io", "meshpolicies", "list"),
        ("medmesh.io", "auditledgers/status", "patch"),
        ("medmesh.io", "imagearchives", "watch"),
        ("medmesh.io", "imagearchives/status", "patch"),
        ("medmesh.io", "meshpolicies", "patch"),
        ("", "secrets", "update"),
        ("", "serviceaccounts", "create"),
        ("networking.k8s.io", "networkpolicies", "patch"),
        ("rbac.authorization.k8s.io", "roles", "patch"),
        ("rbac.authorization.k8s.io", "rolebindings", "create"),
        ("medmesh.io", "meshpolicies/status", "patch"),
        ("", "secrets", "create"),
        ("", "configmaps", "patch"),
        ("", "services", "patch"),
        ("", "namespaces", "watch"),
        ("apps", "statefulsets", "patch"),
        ("policy", "poddisruptionbudgets", "patch"),
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("events.k8s.io", "events", "create"),
    ];
    for &rule in needed {
        assert!(
            allowed(&client, &user, rule, Some("radiology"), None).await,
            "{user} may not {rule:?}"
        );
    }
    assert!(
        allowed(
            &client,
            &user,
            ("coordination.k8s.io", "leases", "update"),
            Some(&env.namespace),
            None
        )
        .await
    );
    assert!(
        allowed(
            &client,
            &user,
            (
                "admissionregistration.k8s.io",
                "mutatingwebhookconfigurations",
                "patch"
            ),
            None,
            Some(&env.webhook)
        )
        .await
    );
    // What it must not do: delete anything (children go by garbage collection), touch Pods or
    // other webhooks, take leases elsewhere, or grant itself more.
    // (group, resource, verb, namespace, name)
    type Attempt<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, Option<&'a str>);
    let denied: &[Attempt<'_>] = &[
        ("", "secrets", "delete", Some("radiology"), None),
        ("", "pods", "list", Some("radiology"), None),
        ("", "pods", "create", Some("radiology"), None),
        ("apps", "statefulsets", "delete", Some("radiology"), None),
        ("apps", "deployments", "patch", Some("radiology"), None),
        (
            "medmesh.io",
            "auditledgers",
            "patch",
            Some("radiology"),
            None,
        ),
        (
            "medmesh.io",
            "imagearchives",
            "patch",
            Some("radiology"),
            None,
        ),
        ("", "serviceaccounts", "delete", Some("radiology"), None),
        (
            "coordination.k8s.io",
            "leases",
            "update",
            Some("radiology"),
            None,
        ),
        (
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            "patch",
            None,
            Some("another-webhook"),
        ),
        (
            "admissionregistration.k8s.io",
            "validatingwebhookconfigurations",
            "patch",
            None,
            None,
        ),
        (
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            "create",
            None,
            None,
        ),
        (
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "patch",
            None,
            None,
        ),
    ];
    for &(group, resource, verb, ns, name) in denied {
        assert!(
            !allowed(&client, &user, (group, resource, verb), ns, name).await,
            "{user} may {verb} {group}/{resource} in {ns:?} ({name:?})"
        );
    }
}

#[tokio::test]
async fn audit_ledger_turns_ready_on_the_real_ledgers_verified_checkpoint() {
    let env = Env::get();
    let (ns_name, addr) = env.ledger.clone();
    let ns = TestNs::named(&ns_name, false).await;
    service_account(&ns, "orthanc").await;
    for i in 0..3 {
        support::volume_for(&ns.client, &ns.name, &format!("data-ledger-{i}"), "1Gi").await;
    }
    let ledgers: Api<AuditLedger> = ns.api();
    let mut l = ledger("ledger", 3);
    let orthanc = json!([{"serviceAccount": {"name": "orthanc"}}]);
    l.spec.appenders = serde_json::from_value(orthanc.clone()).unwrap();
    l.spec.readers = serde_json::from_value(orthanc).unwrap();
    ledgers.create(&PostParams::default(), &l).await.unwrap();

    // Three replicas: the real StatefulSet controller starts them in parallel (a quorum must
    // form before any is ready), each replica's configuration lists the others as Raft peers.
    let sts: StatefulSet = get(&ns.api(), "ledger").await;
    assert_eq!(
        sts.spec.as_ref().unwrap().pod_management_policy.as_deref(),
        Some("Parallel")
    );
    let client_svc: Service = get(&ns.api(), "ledger").await;
    assert!(
        !client_svc
            .spec
            .unwrap()
            .selector
            .unwrap()
            .contains_key("statefulset.kubernetes.io/pod-name"),
        "the client Service selects every replica"
    );
    let running = support::run_ledger(&ns, "ledger", &addr, 3).await;
    let data = running.data.clone();
    assert!(
        data["ledger-1.yaml"].contains(&format!("ledger-2.ledger-headless.{}.svc:8443", ns.name)),
        "{}",
        data["ledger-1.yaml"]
    );

    // kwok makes the replicas Ready; the operator reads and verifies the ledger's checkpoint
    // and the replica's Raft view (as its own SVID, through --resolve) and the status turns
    // Ready, naming the leader.
    let status = support::eventually_for(
        "Ready with a checkpoint and a Raft leader",
        Duration::from_secs(90),
        || {
            let ledgers = ledgers.clone();
            async move {
                let s = ledgers.get("ledger").await.ok()?.status?;
                let ready = s.conditions.iter().find(|c| c.type_ == "Ready")?;
                let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded")?;
                let leader = s.replication.as_ref()?.leader.is_some();
                (ready.status == "True"
                    && degraded.status == "False"
                    && s.checkpoint.is_some()
                    && leader)
                    .then_some(s)
            }
        },
    )
    .await;
    let replication = status.replication.clone().unwrap();
    assert!(replication.term.unwrap_or(0) >= 1, "{replication:?}");
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.message.contains("Raft leader ledger-")),
        "{:?}",
        status.conditions
    );
    let seen = status.checkpoint.unwrap();

    // The same checkpoint, verified independently by the ledger client, as a workload named in
    // the AuditLedger's appenders with an SVID the identity service issued for its token.
    let id = format!("spiffe://cluster.local/ns/{}/sa/orthanc", ns.name);
    let token = token_of(&ns, "orthanc", "medmesh-identity").await;
    let (csr, key_pem) = csr_and_key(&id);
    let (code, body) = ask(&env, &ns.client, &csr, &token).await;
    assert_eq!(code, 200, "{body}");
    let chain = body["certificate"].as_str().unwrap().to_owned();
    let bundle = body["bundle"].as_str().unwrap().to_owned();
    let td = medmesh_core::TrustDomain::new("cluster.local").unwrap();
    let client =
        medmesh_ledger_client::LedgerClient::new(medmesh_ledger_client::LedgerClientConfig {
            url: format!("https://{addr}"),
            identity: medmesh_core::tls::Identity::from_pem(chain.as_bytes(), key_pem.as_bytes())
                .unwrap(),
            bundle: medmesh_core::tls::TrustBundle::from_pem(bundle.as_bytes(), td.clone())
                .unwrap(),
            server: medmesh_core::tls::ServerIdentity::Exact(
                format!("spiffe://cluster.local/ns/{}/ledger/ledger", ns.name)
                    .parse()
                    .unwrap(),
            ),
            verifier: medmesh_core::NoteVerifier::parse(data["verifier.key"].trim()).unwrap(),
            origin: data["origin"].clone(),
            timeout: Duration::from_secs(5),
        })
        .unwrap();
    let cp = client.checkpoint().await.unwrap();
    assert!(cp.checkpoint.size >= u64::try_from(seen.tree_size).unwrap());
    if cp.checkpoint.size == u64::try_from(seen.tree_size).unwrap() {
        use base64::Engine as _;
        assert_eq!(
            base64::engine::general_purpose::STANDARD.encode(cp.checkpoint.root.0),
            seen.root_hash
        );
    }
    use medmesh_core::record::{EventKind, Outcome, Protocol, RecordId};
    let mut rec = medmesh_core::AuditRecord::event(
        RecordId::new().unwrap(),
        EventKind::InstanceStored,
        1_700_000_000_000_000,
        format!("spiffe://cluster.local/ns/{}/sa/modality", ns.name)
            .parse()
            .unwrap(),
        id.parse().unwrap(),
        Protocol::Dimse,
        Outcome::Success,
    );
    rec.status = Some(0);
    rec.bytes = 4096;
    rec.content_sha256 = Some(medmesh_core::merkle::sha256(b"instance"));
    let appended = client.append(&rec, true).await.unwrap();
    eprintln!("appended as {id}: {appended:?}");

    // Archiving: a MeshPolicy that audits into this ledger and archives into an ImageArchive.
    // The operator generates the namespace's archive key once (no owner), publishes its
    // recipient with the archive's endpoint in audit.json, and lets only the restorers read
    // the private half.
    service_account(&ns, "auditor").await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = ns.api();
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "audit-hmac"},
                "data": {"hmac": "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let archives: Api<medmesh_operator::crd::ImageArchive> = ns.api();
    archives
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "medmesh.io/v1alpha1", "kind": "ImageArchive",
                "metadata": {"name": "pacs-archive"},
                "spec": {"storage": {"kuboSize": "1Gi", "clusterSize": "1Gi"},
                         "adders": [{"serviceAccount": {"name": "orthanc"}}]},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let policies: Api<MeshPolicy> = ns.api();
    policies
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "medmesh.io/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": "pacs"},
                "spec": {"podSelector": {}, "ports": [{"port": 4242, "protocol": "dicom"}],
                         "audit": {"ledgerRef": {"name": "ledger"},
                                   "keySecretRef": {"name": "audit-hmac", "key": "hmac"},
                                   "archive": {"archiveRef": {"name": "pacs-archive"},
                                               "restorers": [{"kind": "ServiceAccount", "name": "auditor",
                                                              "namespace": ns.name}]}}},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let recipient_of = |s: &k8s_openapi::api::core::v1::Secret| -> String {
        let data = s.data.as_ref().unwrap();
        let identity: medmesh_core::seal::ArchiveKey = std::str::from_utf8(&data["identity"].0)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let recipient = std::str::from_utf8(&data["recipient"].0).unwrap().trim();
        assert_eq!(identity.recipient().to_string(), recipient);
        recipient.to_owned()
    };
    let key_secret = eventually("the namespace's archive key", || {
        let secrets = secrets.clone();
        async move { secrets.get_opt("medmesh-archive-key").await.ok()? }
    })
    .await;
    assert!(
        key_secret.owner_references().is_empty(),
        "deleting the key is crypto-shredding: never by garbage collection"
    );
    let recipient = recipient_of(&key_secret);
    let archive_settings = |want: String| {
        let ns = &ns;
        async move {
            let doc = policy_doc(ns, "audit.json").await?;
            assert!(!doc.contains("AGE-SECRET-KEY"), "{doc}");
            let audit: medmesh_core::wire::SidecarAudit = serde_json::from_str(&doc).unwrap();
            audit.archive.filter(|a| a.recipients == [want.clone()])
        }
    };
    let settings = eventually("audit.json archiving to the archive's endpoint", || {
        archive_settings(recipient.clone())
    })
    .await;
    assert_eq!(
        settings.url,
        format!("http://pacs-archive.{}.svc:9094", ns.name)
    );
    assert_eq!(
        settings.id,
        format!("spiffe://cluster.local/ns/{}/sa/pacs-archive", ns.name)
    );
    assert_eq!(
        (
            settings.mode.as_str(),
            settings.replication_min,
            settings.replication_max
        ),
        ("async", 2, 3)
    );
    // The real authorizer: the restorer may get that one Secret; not other Secrets, not a
    // list; other workloads not even that one.
    let auditor = format!("system:serviceaccount:{}:auditor", ns.name);
    let get_secret = ("", "secrets", "get");
    let key_name = Some("medmesh-archive-key");
    eventually("the restorer's binding", || {
        let (client, auditor) = (ns.client.clone(), auditor.clone());
        let ns = ns.name.clone();
        async move {
            allowed(&client, &auditor, get_secret, Some(&ns), key_name)
                .await
                .then_some(())
        }
    })
    .await;
    let nsn = Some(ns.name.as_str());
    assert!(!allowed(&ns.client, &auditor, get_secret, nsn, Some("audit-hmac")).await);
    assert!(!allowed(&ns.client, &auditor, ("", "secrets", "list"), nsn, None).await);
    let orthanc_user = format!("system:serviceaccount:{}:orthanc", ns.name);
    assert!(!allowed(&ns.client, &orthanc_user, get_secret, nsn, key_name).await);
    // Made once: another reconcile (a changed policy) keeps the key.
    policies
        .patch(
            "pacs",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"audit": {"archive": {"mode": "required"}}}})),
        )
        .await
        .unwrap();
    eventually("audit.json in required mode", || {
        let s = archive_settings(recipient.clone());
        async move { s.await.filter(|a| a.mode == "required") }
    })
    .await;
    let kept = secrets.get("medmesh-archive-key").await.unwrap();
    assert_eq!(kept.metadata.uid, key_secret.metadata.uid);
    assert_eq!(kept.data, key_secret.data);

    // Crypto-shredding with `medmesh archive shred`, as this appender: refused without the
    // right confirmation; then recorded in the ledger, and the namespace's archive key deleted.
    let dir = tempfile::tempdir().unwrap();
    let w = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (cert, keyf, ca, vk) = (
        w("svid.pem", &chain),
        w("svid-key.pem", &key_pem),
        w("bundle.pem", &bundle),
        w("verifier.key", data["verifier.key"].trim()),
    );
    let ledger_id = format!("spiffe://cluster.local/ns/{}/ledger/ledger", ns.name);
    let shred = |confirm: &str| {
        std::process::Command::new(support::target_bin("medmesh"))
            .args([
                "archive",
                "shred",
                "--namespace",
                &ns.name,
                "--archive",
                "pacs-archive",
            ])
            .args(["--confirm", confirm, "--url", &format!("https://{addr}")])
            .args(["--cert", &cert, "--key", &keyf, "--ca", &ca])
            .args(["--trust-domain", "cluster.local", "--ledger-id", &ledger_id])
            .args([
                "--verifier-key",
                &format!("@{vk}"),
                "--origin",
                &data["origin"],
            ])
            .arg("--state")
            .arg(dir.path().join("state"))
            .output()
            .unwrap()
    };
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let out = shred("not-the-namespace");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("not confirmed"), "{}", text(&out));
    assert!(
        secrets
            .get_opt("medmesh-archive-key")
            .await
            .unwrap()
            .is_some()
    );
    let out = shred(&ns.name);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("recorded: entry "), "{}", text(&out));
    // The shredded key is gone for good; the namespace still archives, so the operator makes
    // a new key at once and the sidecars' settings name only the new recipient.
    let fresh = eventually("a new archive key after the shredding", || {
        let secrets = secrets.clone();
        let old = key_secret.metadata.uid.clone();
        async move {
            secrets
                .get_opt("medmesh-archive-key")
                .await
                .ok()?
                .filter(|s| s.metadata.uid != old)
        }
    })
    .await;
    let fresh_recipient = recipient_of(&fresh);
    assert_ne!(fresh_recipient, recipient);
    eventually("audit.json with the new recipient", || {
        archive_settings(fresh_recipient.clone())
    })
    .await;
    // The ledger says who destroyed which key (by the hash of its public half) for which archive.
    let fingerprint = medmesh_core::merkle::sha256(recipient.as_bytes());
    let (_, hits, _) = support::eventually_for(
        "the shredding is searchable",
        Duration::from_secs(10),
        || {
            let client = client.clone();
            async move {
                let r = client.search("sha256", &fingerprint.to_hex()).await.ok()?;
                (!r.1.is_empty()).then_some(r)
            }
        },
    )
    .await;
    let r = &hits[0].entry.record;
    assert_eq!(r.kind, EventKind::ArchiveKeyShredded);
    assert_eq!(r.source.as_str(), id);
    assert_eq!(
        r.destination.as_str(),
        format!("spiffe://cluster.local/ns/{}/sa/pacs-archive", ns.name)
    );
    assert!(!text(&out).contains("AGE-SECRET-KEY"));
}
