//! The `ImageArchive` reconciler against a mocked API server (`mock_api_*`), and its pure
//! parts. The real daemons run the rendered output in `e2e/tests/archive_cluster.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;

use serde_json::{Value, json};

use super::*;
use crate::controller::mock::{self, ApiServer};
use crate::events::EventSink;
use crate::identity::IssuerCa;
use crate::metrics::ReconcileMetrics;

const NS: &str = "imaging";
const BASE: &str = "/api/v1/namespaces/imaging";
const STS: &str = "/apis/apps/v1/namespaces/imaging/statefulsets/arch";
const STATUS: &str = "/apis/medmesh.io/v1alpha1/namespaces/imaging/imagearchives/arch/status";
const UID: &str = "6a3c1f0e-1d2b-4c5d-8e9f-0000000000a1";
const OPERATOR: &str = "spiffe://cluster.local/ns/medmesh-system/sa/medmesh-operator";

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000)
}

fn archive(replicas: i32) -> ImageArchive {
    serde_json::from_value(json!({
        "apiVersion": "medmesh.io/v1alpha1",
        "kind": "ImageArchive",
        "metadata": {"name": "arch", "namespace": NS, "uid": UID, "generation": 1},
        "spec": {
            "replicas": replicas,
            "replication": {"min": 2, "max": 3},
            "storage": {"kuboSize": "50Gi", "clusterSize": "2Gi", "storageClassName": "fast"},
            "adders": [{"serviceAccount": {"name": "orthanc"}}],
            "readers": [{"spiffeId": "spiffe://cluster.local/ns/imaging/sa/auditor"}],
        },
    }))
    .unwrap()
}

#[derive(Default)]
struct Events(Mutex<Vec<InjectionEvent>>);

impl EventSink for Events {
    fn emit(&self, event: InjectionEvent) {
        self.0.lock().unwrap().push(event);
    }
}

/// Answers with fixed peers and records the targets asked.
struct FixedPeers(Mutex<(Vec<ArchiveTarget>, Vec<ClusterPeer>)>);

impl PeerReader for FixedPeers {
    fn peers<'a>(
        &'a self,
        target: &'a ArchiveTarget,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<ClusterPeer>, String>> + Send + 'a>> {
        let mut g = self.0.lock().unwrap();
        g.0.push(target.clone());
        let peers = g.1.clone();
        Box::pin(async move { Ok(peers) })
    }
}

struct Fixture {
    ctx: Arc<Context>,
    events: Arc<Events>,
    peers: Arc<FixedPeers>,
    api: ApiServer,
}

fn fixture() -> Fixture {
    let (client, api) = mock::pair();
    let events = Arc::new(Events::default());
    let peers = Arc::new(FixedPeers(Mutex::new((Vec::new(), Vec::new()))));
    let (_tx, serving_ca) = tokio::sync::watch::channel(None);
    let ca = Arc::new(IssuerCa::generate(&td(), t0() - Duration::from_secs(3600)).unwrap());
    let ctx = Arc::new(Context {
        client,
        trust_domain: td(),
        ledger_image: "ghcr.io/medmesh/ledger:test".into(),
        otlp_endpoint: None,
        ca,
        checkpoints: None,
        archive_peers: Some(peers.clone() as Arc<dyn PeerReader>),
        reader_id: Some(OPERATOR.parse().unwrap()),
        serving_ca,
        events: events.clone(),
        metrics: ReconcileMetrics::unregistered(),
        clock: Arc::new(t0),
        resolve: crate::resolve::Resolve::default(),
    });
    Fixture {
        ctx,
        events,
        peers,
        api,
    }
}

/// The API server's answer to a status patch: the stored object with the new status.
fn echo_status(s: &mock::Seen) -> Value {
    let mut v = serde_json::to_value(archive(3)).unwrap();
    mock::merge(&mut v, &s.body);
    v
}

fn meshed_namespace() -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": NS, "labels": {"medmesh.io/inject": "enabled"}}})
}

/// The applies of one pass after the identities, in order; the StatefulSet reports `ready`.
async fn children(api: &mut ApiServer, ready: i32) -> Vec<(String, Value)> {
    let mut applied = Vec::new();
    for path in [
        format!("{BASE}/secrets/arch-config"),
        format!("{BASE}/serviceaccounts/arch"),
        format!("{BASE}/services/arch-swarm"),
        format!("{BASE}/services/arch"),
        "/apis/medmesh.io/v1alpha1/namespaces/imaging/meshpolicies/arch-archive".to_owned(),
        "/apis/networking.k8s.io/v1/namespaces/imaging/networkpolicies/arch".to_owned(),
    ] {
        let s = api.apply(&path, json!({})).await;
        applied.push((path, s.body));
    }
    let sts = api
        .apply(STS, json!({"status": {"readyReplicas": ready}}))
        .await;
    applied.push((STS.to_owned(), sts.body));
    let pdb = "/apis/policy/v1/namespaces/imaging/poddisruptionbudgets/arch".to_owned();
    let s = api.apply(&pdb, json!({})).await;
    applied.push((pdb, s.body));
    applied
}

fn data(secret: &Value, key: &str) -> String {
    use base64::Engine as _;
    let b = secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key}"));
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).unwrap()).unwrap()
}

fn applied_at<'a>(applied: &'a [(String, Value)], suffix: &str) -> &'a Value {
    &applied
        .iter()
        .find(|(p, _)| p.ends_with(suffix))
        .unwrap_or_else(|| panic!("no apply of {suffix}"))
        .1
}

#[tokio::test]
async fn mock_api_archive_first_pass_generates_identities_once_and_renders_everything() {
    let mut f = fixture();
    let (r, (created, applied, status)) = mock::run(
        reconcile(Arc::new(archive(3)), f.ctx.clone()),
        async {
            let api = &mut f.api;
            api.expect("GET", "/api/v1/namespaces/imaging", 200, |_| {
                meshed_namespace()
            })
            .await;
            api.not_found(&format!("{BASE}/secrets/arch-identities"))
                .await;
            let created = api
                .expect("POST", &format!("{BASE}/secrets"), 201, |s| s.body.clone())
                .await;
            let applied = children(api, 0).await;
            let status = api.expect("PATCH", STATUS, 200, echo_status).await;
            api.quiet(Duration::from_millis(100)).await;
            (created.body, applied, status.body)
        },
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(r.unwrap(), Action::requeue(RECHECK));

    // The identities: created (never applied), no owner, every key parses, three replicas.
    assert_eq!(created["metadata"]["name"], "arch-identities");
    assert!(created["metadata"].get("ownerReferences").is_none());
    let secret: Secret = serde_json::from_value(created.clone()).unwrap();
    let ids = Identities::from_secret(&secret).unwrap();
    assert_eq!(ids.peers.len(), 3);
    let distinct: std::collections::BTreeSet<String> = ids
        .peers
        .iter()
        .flat_map(|p| {
            [
                p.kubo.peer_id().to_string(),
                p.cluster.peer_id().to_string(),
            ]
        })
        .collect();
    assert_eq!(distinct.len(), 6, "every identity is its own");
    let events = f.events.0.lock().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].reason, "IdentitiesGenerated");

    // The rendered configuration: per replica a Kubo config with its own identity that peers
    // with the other two, and cluster settings trusting exactly the three cluster IDs.
    let config = applied_at(&applied, "/secrets/arch-config");
    let trusted: Vec<String> = ids.cluster_ids(3).iter().map(ToString::to_string).collect();
    for i in 0..3 {
        let kubo: Value =
            serde_json::from_str(&data(config, &format!("arch-{i}.kubo.json"))).unwrap();
        assert_eq!(
            kubo["Identity"]["PeerID"],
            ids.peers[i].kubo.peer_id().to_string()
        );
        assert_eq!(
            kubo["Identity"]["PrivKey"],
            ids.peers[i].kubo.to_libp2p_base64()
        );
        assert_eq!(kubo["Bootstrap"], json!([]));
        assert_eq!(kubo["AutoConf"]["Enabled"], false);
        assert_eq!(kubo["Discovery"]["MDNS"]["Enabled"], false);
        assert_eq!(kubo["Routing"]["Type"], "none");
        assert_eq!(kubo["Addresses"]["API"], json!(["/ip4/127.0.0.1/tcp/5001"]));
        assert_eq!(
            kubo["Addresses"]["Gateway"],
            json!(["/ip4/127.0.0.1/tcp/8080"])
        );
        assert_eq!(kubo["Datastore"]["StorageMax"], "50GiB");
        let peering = kubo["Peering"]["Peers"].as_array().unwrap();
        assert_eq!(peering.len(), 2);
        assert!(
            peering
                .iter()
                .all(|p| p["ID"] != kubo["Identity"]["PeerID"])
        );
        assert_eq!(
            peering[0]["Addrs"][0],
            format!(
                "/dns4/arch-{}.arch-swarm.imaging.svc/tcp/4001",
                usize::from(i == 0)
            )
        );
        let env = data(config, &format!("arch-{i}.cluster.env"));
        assert!(env.contains(&format!(
            "CLUSTER_CRDT_TRUSTEDPEERS={}\n",
            trusted.join(",")
        )));
        assert!(env.contains(&format!("CLUSTER_PEERNAME=arch-{i}\n")));
        assert!(env.contains(&format!("CLUSTER_SECRET={}\n", ids.cluster_secret.to_hex())));
        assert!(env.contains("CLUSTER_RESTAPI_HTTPLISTENMULTIADDRESS=/ip4/127.0.0.1/tcp/9094\n"));
        assert!(env.contains("CLUSTER_REPLICATIONFACTORMIN=2\nCLUSTER_REPLICATIONFACTORMAX=3\n"));
        assert!(env.contains("CLUSTER_DISABLEREPINNING=false\n"));
        assert!(env.contains("CLUSTER_CRDT_REBROADCASTINTERVAL=10s\n"));
        assert!(
            !env.contains(
                &ids.peers[i]
                    .cluster
                    .peer_id()
                    .to_string()
                    .replace("12D3", "/p2p/12D3")
            )
        );
        let ident: Value =
            serde_json::from_str(&data(config, &format!("arch-{i}.identity.json"))).unwrap();
        assert_eq!(ident["id"], trusted[i]);
    }
    assert_eq!(data(config, "swarm.key"), ids.swarm_key.to_file());
    assert_eq!(
        config["metadata"]["ownerReferences"][0]["kind"],
        "ImageArchive"
    );

    // The policy: REST for the adders and the operator, gateway for the readers.
    let policy = applied_at(&applied, "/meshpolicies/arch-archive");
    assert_eq!(policy["spec"]["ports"][0]["port"], 9094);
    assert_eq!(
        policy["spec"]["ports"][0]["allow"],
        json!([{"serviceAccount": {"name": "orthanc"}}, {"spiffeId": OPERATOR}])
    );
    assert_eq!(policy["spec"]["ports"][1]["port"], 8080);
    assert_eq!(
        policy["spec"]["ports"][1]["allow"],
        json!([{"spiffeId": "spiffe://cluster.local/ns/imaging/sa/auditor"}])
    );
    // The NetworkPolicy: swarm ports only from the archive's pods.
    let np = applied_at(&applied, "/networkpolicies/arch");
    assert_eq!(
        np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"],
        "arch"
    );
    assert_eq!(
        np["spec"]["ingress"][0]["ports"],
        json!([{"port": 4001, "protocol": "TCP"}, {"port": 9096, "protocol": "TCP"}])
    );
    // Every other port (the mesh's, the sidecar's admin, the cluster's metrics) from anywhere.
    assert_eq!(
        np["spec"]["ingress"][1]["ports"],
        json!([
            {"port": 9094, "protocol": "TCP"},
            {"port": 8080, "protocol": "TCP"},
            {"port": 15020, "protocol": "TCP"},
            {"port": 8888, "protocol": "TCP"}
        ])
    );
    // The StatefulSet: meshed pods, swarm and metrics ports past the sidecar, two claims,
    // restricted.
    let sts = applied_at(&applied, "/statefulsets/arch");
    let tpl = &sts["spec"]["template"];
    assert_eq!(tpl["metadata"]["labels"]["medmesh.io/inject"], "enabled");
    assert_eq!(
        tpl["metadata"]["annotations"]["medmesh.io/skip-inbound-ports"],
        "4001,9096,8888"
    );
    assert_eq!(tpl["spec"]["serviceAccountName"], "arch");
    assert_eq!(tpl["spec"]["containers"][0]["image"], DEFAULT_KUBO_IMAGE);
    assert_eq!(tpl["spec"]["containers"][1]["image"], DEFAULT_CLUSTER_IMAGE);
    for c in tpl["spec"]["containers"].as_array().unwrap() {
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
        let ports: Vec<i64> = c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["containerPort"].as_i64().unwrap())
            .collect();
        assert!(
            ports.iter().all(|p| [4001, 9096, 8888].contains(p)),
            "only swarm and metrics ports: {ports:?}"
        );
    }
    let claims = sts["spec"]["volumeClaimTemplates"].as_array().unwrap();
    assert_eq!(
        claims[0]["spec"]["resources"]["requests"]["storage"],
        "50Gi"
    );
    assert_eq!(claims[1]["spec"]["resources"]["requests"]["storage"], "2Gi");
    assert_eq!(claims[1]["spec"]["storageClassName"], "fast");

    // No pod ready yet: not ready, not degraded, every replica listed with its IDs.
    let st = &status["status"];
    assert_eq!(st["readyReplicas"], 0);
    assert_eq!(st["endpoint"], "http://arch.imaging.svc:9094");
    assert_eq!(st["peers"].as_array().unwrap().len(), 3);
    assert_eq!(st["peers"][1]["peerId"], trusted[1]);
    let cond = |t: &str| {
        st["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == t)
            .unwrap()
            .clone()
    };
    assert_eq!(cond("Ready")["status"], "False");
    assert_eq!(cond("Degraded")["status"], "False");
    assert!(
        f.peers.0.lock().unwrap().0.is_empty(),
        "no read before a pod is ready"
    );
}

/// A pass over an archive whose identities Secret exists (`stored`), with `ready` pods and the
/// cluster reporting `peers`; returns the Secret written (if any), the applies and the status.
async fn pass(
    spec_replicas: i32,
    stored: &Secret,
    ready: i32,
    peers: Vec<ClusterPeer>,
) -> (
    Option<Value>,
    Vec<(String, Value)>,
    Option<Value>,
    Arc<Events>,
) {
    let mut f = fixture();
    f.peers.0.lock().unwrap().1 = peers;
    let stored = serde_json::to_value(stored).unwrap();
    let (r, out) = mock::run(
        reconcile(Arc::new(archive(spec_replicas)), f.ctx.clone()),
        async {
            let api = &mut f.api;
            api.expect("GET", "/api/v1/namespaces/imaging", 200, |_| {
                meshed_namespace()
            })
            .await;
            api.expect(
                "GET",
                &format!("{BASE}/secrets/arch-identities"),
                200,
                |_| stored.clone(),
            )
            .await;
            let have = Identities::from_secret(&serde_json::from_value(stored.clone()).unwrap())
                .unwrap()
                .peers
                .len();
            let written = if have < usize::try_from(spec_replicas).unwrap() {
                Some(
                    api.expect(
                        "PUT",
                        &format!("{BASE}/secrets/arch-identities"),
                        200,
                        |s| s.body.clone(),
                    )
                    .await
                    .body,
                )
            } else {
                None
            };
            let applied = children(api, ready).await;
            let status = api.expect("PATCH", STATUS, 200, echo_status).await;
            api.quiet(Duration::from_millis(100)).await;
            (written, applied, Some(status.body))
        },
        Duration::from_secs(10),
    )
    .await;
    r.unwrap();
    (out.0, out.1, out.2, f.events.clone())
}

fn stored(ids: &Identities) -> Secret {
    let names = Names::of(&archive(3)).unwrap();
    let mut s = identities_secret(&names, ids);
    s.metadata.resource_version = Some("7".into());
    s
}

fn healthy(ids: &Identities, n: usize) -> Vec<ClusterPeer> {
    (0..n)
        .map(|i| ClusterPeer {
            id: ids.peers[i].cluster.peer_id().to_string(),
            peername: format!("arch-{i}"),
            error: String::new(),
        })
        .collect()
}

#[tokio::test]
async fn mock_api_archive_scale_up_extends_identities_and_scale_down_keeps_them() {
    let ids = Identities::generate(3).unwrap();
    // Up to five: a PUT with the version read that keeps the three and adds two.
    let (written, applied, _, events) = pass(5, &stored(&ids), 3, healthy(&ids, 3)).await;
    let written = written.expect("the identities are extended");
    assert_eq!(
        written["metadata"]["resourceVersion"], "7",
        "conditional on the version read"
    );
    let extended = Identities::from_secret(&serde_json::from_value(written).unwrap()).unwrap();
    assert_eq!(extended.peers.len(), 5);
    for i in 0..3 {
        assert_eq!(
            extended.peers[i].kubo.to_libp2p_base64(),
            ids.peers[i].kubo.to_libp2p_base64()
        );
        assert_eq!(
            extended.peers[i].cluster.to_libp2p_base64(),
            ids.peers[i].cluster.to_libp2p_base64()
        );
    }
    assert_eq!(extended.cluster_secret, ids.cluster_secret);
    assert_eq!(extended.swarm_key, ids.swarm_key);
    assert_eq!(events.0.lock().unwrap()[0].reason, "IdentitiesExtended");
    let config = applied_at(&applied, "/secrets/arch-config");
    assert!(config["data"].get("arch-4.kubo.json").is_some());

    // Down to three from five identities: nothing written, the config renders three.
    let (written, applied3, status, _) =
        pass(3, &stored(&extended), 3, healthy(&extended, 3)).await;
    assert!(written.is_none());
    let config = applied_at(&applied3, "/secrets/arch-config");
    assert!(config["data"].get("arch-3.kubo.json").is_none());
    let env = data(config, "arch-0.cluster.env");
    assert!(!env.contains(&extended.peers[3].cluster.peer_id().to_string()));
    // Scaling changed the configuration: the pods roll.
    let digest = |a: &[(String, Value)]| {
        applied_at(a, "/statefulsets/arch")["spec"]["template"]["metadata"]["annotations"]
            [CONFIG_DIGEST_ANNOTATION]
            .clone()
    };
    assert_ne!(digest(&applied), digest(&applied3));
    let st = &status.unwrap()["status"];
    assert_eq!(st["clusterPeers"], 3);
    assert_eq!(
        st["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap()["status"],
        "True"
    );

    // Back up to five: the same two identities come back (their volumes hold their repos).
    let (written, _, _, _) = pass(5, &stored(&extended), 5, healthy(&extended, 5)).await;
    assert!(written.is_none(), "identities 3 and 4 were kept");
}

#[tokio::test]
async fn mock_api_archive_second_pass_is_idempotent() {
    let ids = Identities::generate(3).unwrap();
    let (_, first, _, _) = pass(3, &stored(&ids), 3, healthy(&ids, 3)).await;
    let (_, second, _, _) = pass(3, &stored(&ids), 3, healthy(&ids, 3)).await;
    assert_eq!(first, second, "the same objects, byte for byte");
}

#[test]
fn status_is_degraded_when_a_peer_is_missing_or_untrusted_or_the_namespace_unmeshed() {
    let ids = Identities::generate(3).unwrap();
    let a = archive(3);
    let names = Names::of(&a).unwrap();
    let now = k8s_time(t0());
    let expected: Vec<(PeerId, PeerId)> = ids
        .peers
        .iter()
        .map(|p| (p.cluster.peer_id(), p.kubo.peer_id()))
        .collect();
    let obs = |peers: Vec<ClusterPeer>, meshed: bool| Observed {
        ready_replicas: 3,
        meshed,
        identities_problem: None,
        expected: expected.clone(),
        peers: Ok(peers),
    };
    let degraded = |s: &ImageArchiveStatus| {
        let c = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        (c.status.clone(), c.reason.clone(), c.message.clone())
    };
    let ready = |s: &ImageArchiveStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap()
            .status
            .clone()
    };

    let ok = status(&a, &names, &obs(healthy(&ids, 3), true), &now);
    assert_eq!(degraded(&ok).0, "False");
    assert_eq!(ready(&ok), "True");
    assert!(ok.peers.iter().all(|p| p.seen));

    let mut two = healthy(&ids, 3);
    two.remove(2);
    let s = status(&a, &names, &obs(two, true), &now);
    assert_eq!(degraded(&s).1, "PeerMissing");
    assert!(degraded(&s).2.contains("arch-2"), "{:?}", degraded(&s));
    assert_eq!(ready(&s), "False");
    assert_eq!(
        s.peers[2].error.as_deref(),
        Some("not in the cluster's peer set")
    );

    let mut erring = healthy(&ids, 3);
    erring[1].error = "dial backoff".into();
    let s = status(&a, &names, &obs(erring, true), &now);
    assert_eq!(degraded(&s).1, "PeerMissing");
    assert_eq!(s.peers[1].error.as_deref(), Some("dial backoff"));
    assert_eq!(s.cluster_peers, Some(2));

    let rogue = PeerKey::generate().unwrap().peer_id().to_string();
    let mut extra = healthy(&ids, 3);
    extra.push(ClusterPeer {
        id: rogue.clone(),
        peername: "rogue".into(),
        error: String::new(),
    });
    let s = status(&a, &names, &obs(extra, true), &now);
    assert_eq!(degraded(&s).1, "UntrustedPeer");
    assert!(degraded(&s).2.contains(&rogue));

    let s = status(&a, &names, &obs(healthy(&ids, 3), false), &now);
    assert_eq!(degraded(&s).1, "NamespaceNotMeshed");
    assert_eq!(ready(&s), "False");

    let mut bad = obs(Vec::new(), true);
    bad.peers = Err("connect arch.imaging.svc:9094: refused".into());
    let s = status(&a, &names, &bad, &now);
    assert_eq!(degraded(&s).1, "ClusterUnreadable");
}

#[test]
fn malformed_identities_are_refused_with_the_key_named() {
    let ids = Identities::generate(2).unwrap();
    let names = Names::of(&archive(2)).unwrap();
    let mut s = identities_secret(&names, &ids);
    s.data
        .as_mut()
        .unwrap()
        .insert("cluster-1.key".into(), ByteString(b"AAAA".to_vec()));
    let e = Identities::from_secret(&s).unwrap_err();
    assert!(e.contains("cluster-1.key") && e.contains("Ed25519"), "{e}");
    s.data.as_mut().unwrap().remove("swarm.key");
    let e = Identities::from_secret(&s).unwrap_err();
    assert!(e.contains("no key \"swarm.key\""), "{e}");
}

#[test]
fn peers_parse_from_an_array_or_a_stream() {
    let one = r#"{"id":"12D3KooA","peername":"arch-0","error":""}"#;
    let two = r#"{"id":"12D3KooB","peername":"arch-1","error":"down"}"#;
    let arr = format!("[{one},{two}]");
    let ndjson = format!("{one}\n{two}\n");
    assert_eq!(
        parse_peers(arr.as_bytes()).unwrap(),
        parse_peers(ndjson.as_bytes()).unwrap()
    );
    assert_eq!(parse_peers(ndjson.as_bytes()).unwrap()[1].error, "down");
    assert!(parse_peers(b"{not json").unwrap_err().starts_with("peers:"));
}

#[test]
fn storage_sizes_map_to_kubo_units() {
    for (q, want) in [
        ("500Gi", "500GiB"),
        ("1Ti", "1TiB"),
        ("20G", "20GB"),
        ("1024", "1024B"),
        ("1e3", "10GB"),
    ] {
        assert_eq!(storage_max(&Quantity(q.into())), want, "{q}");
    }
}
