//! The children rendered from the spec and the identities: the daemons' configuration, the
//! Services, the policies, the StatefulSet and the PDB. Pure functions.

// The parent's names and imports: one concern split in files.
use super::*;

/// Kubo's `Datastore.StorageMax` for a Kubernetes quantity (`500Gi` → `500GiB`); Kubo reads
/// it with go-humanize, which knows the same suffixes with a `B`.
pub fn storage_max(q: &Quantity) -> String {
    let s = q.0.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let unit = match unit {
        "" => "B",
        "k" => "kB",
        "Ki" => "KiB",
        "M" => "MB",
        "Mi" => "MiB",
        "G" => "GB",
        "Gi" => "GiB",
        "T" => "TB",
        "Ti" => "TiB",
        "P" => "PB",
        "Pi" => "PiB",
        // Exponent or milli notation: not a sensible volume size; Kubo's default.
        _ => return "10GB".to_owned(),
    };
    format!("{num}{unit}")
}

/// Replica `i`'s complete Kubo configuration (its `$IPFS_PATH/config`).
///
/// # Panics
/// When `ids` holds fewer identities than `i + 1` (or than the replicas):
/// [`config_secret`] checks that first.
pub fn kubo_config(
    archive: &ImageArchive,
    names: &Names,
    ids: &Identities,
    i: usize,
) -> serde_json::Value {
    let replicas = usize::try_from(archive.spec.replicas.max(1)).unwrap_or(1);
    let me = &ids.peers[i];
    let peering: Vec<serde_json::Value> = (0..replicas)
        .filter(|&j| j != i)
        .map(|j| {
            json!({
                "ID": ids.peers[j].kubo.peer_id().to_string(),
                "Addrs": [format!("/dns4/{}/tcp/{KUBO_SWARM_PORT}", names.swarm_host(j))],
            })
        })
        .collect();
    json!({
        "Identity": {
            "PeerID": me.kubo.peer_id().to_string(),
            "PrivKey": me.kubo.to_libp2p_base64(),
        },
        "Datastore": {
            "StorageMax": storage_max(&archive.spec.storage.kubo_size),
            "StorageGCWatermark": 90,
            "GCPeriod": "1h",
            "BloomFilterSize": 0,
            "HashOnRead": false,
            // Kubo's default layout, with fsync on: an archive keeps what it acknowledged.
            "Spec": {
                "type": "mount",
                "mounts": [
                    {"mountpoint": "/blocks", "type": "flatfs", "prefix": "flatfs.datastore",
                     "path": "blocks", "sync": true, "shardFunc": "/repo/flatfs/shard/v1/next-to-last/2"},
                    {"mountpoint": "/", "type": "levelds", "prefix": "leveldb.datastore",
                     "path": "datastore", "compression": "none"},
                ],
            },
        },
        "Addresses": {
            "Swarm": [format!("/ip4/0.0.0.0/tcp/{KUBO_SWARM_PORT}")],
            "Announce": [],
            "AppendAnnounce": [],
            "NoAnnounce": [],
            "API": [format!("/ip4/127.0.0.1/tcp/{KUBO_RPC_PORT}")],
            "Gateway": [format!("/ip4/127.0.0.1/tcp/{GATEWAY_PORT}")],
        },
        // A private network: no public bootstrap, discovery, routing, relays or HTTP retrieval.
        "Bootstrap": [],
        "Peering": {"Peers": peering},
        "Discovery": {"MDNS": {"Enabled": false}},
        "Routing": {"Type": "none", "DelegatedRouters": []},
        "Ipns": {"ResolveCacheSize": 128, "DelegatedPublishers": []},
        "DNS": {"Resolvers": {}},
        "AutoConf": {"Enabled": false},
        "AutoTLS": {"Enabled": false},
        "AutoNAT": {"ServiceMode": "disabled"},
        "Provide": {"Enabled": false},
        "HTTPRetrieval": {"Enabled": false},
        "Swarm": {
            "DisableNatPortMap": true,
            "RelayClient": {"Enabled": false},
            "RelayService": {"Enabled": false},
            "Transports": {"Network": {
                "TCP": true, "QUIC": false, "WebTransport": false, "WebRTCDirect": false,
                "Websocket": false,
            }},
        },
        "API": {"HTTPHeaders": {}},
        "Gateway": {"HTTPHeaders": {}, "NoFetch": false},
        "Pinning": {"RemoteServices": {}},
        "Mounts": {"IPFS": "/ipfs", "IPNS": "/ipns", "MFS": "/mfs"},
    })
}

/// Replica `i`'s ipfs-cluster settings, as `CLUSTER_*` variables (a file the container
/// sources; values are single words, so no quoting is needed).
///
/// # Panics
/// When `ids` holds fewer identities than the replicas: [`config_secret`] checks that first.
pub fn cluster_env(archive: &ImageArchive, names: &Names, ids: &Identities, i: usize) -> String {
    let replicas = usize::try_from(archive.spec.replicas.max(1)).unwrap_or(1);
    let trusted: Vec<String> = ids
        .cluster_ids(replicas)
        .iter()
        .map(ToString::to_string)
        .collect();
    let others: Vec<String> = (0..replicas)
        .filter(|&j| j != i)
        .map(|j| {
            format!(
                "/dns4/{}/tcp/{CLUSTER_SWARM_PORT}/p2p/{}",
                names.swarm_host(j),
                ids.peers[j].cluster.peer_id()
            )
        })
        .collect();
    let r = archive.spec.replication;
    let lines = [
        ("CLUSTER_PEERNAME", names.replica(i)),
        ("CLUSTER_SECRET", ids.cluster_secret.to_hex()),
        (
            "CLUSTER_LISTENMULTIADDRESS",
            format!("/ip4/0.0.0.0/tcp/{CLUSTER_SWARM_PORT}"),
        ),
        ("CLUSTER_PEERADDRESSES", others.join(",")),
        ("CLUSTER_REPLICATIONFACTORMIN", r.min.to_string()),
        ("CLUSTER_REPLICATIONFACTORMAX", r.max.to_string()),
        // Re-place pins of a lost peer when there is room between min and max.
        ("CLUSTER_DISABLEREPINNING", (r.min >= r.max).to_string()),
        ("CLUSTER_MDNSINTERVAL", "0s".into()),
        ("CLUSTER_MONITORPINGINTERVAL", "15s".into()),
        ("CLUSTER_CRDT_CLUSTERNAME", names.cluster_name()),
        ("CLUSTER_CRDT_TRUSTEDPEERS", trusted.join(",")),
        // A peer that missed a pin's broadcast (or whose fetch of it stalled) learns of it at
        // the next rebroadcast of the heads: every 10 s instead of ipfs-cluster's 1 min, so
        // the archive's uploads are confirmed on their peers soon after a lost message.
        ("CLUSTER_CRDT_REBROADCASTINTERVAL", "10s".into()),
        (
            "CLUSTER_RESTAPI_HTTPLISTENMULTIADDRESS",
            format!("/ip4/127.0.0.1/tcp/{REST_PORT}"),
        ),
        (
            "CLUSTER_IPFSPROXY_LISTENMULTIADDRESS",
            format!("/ip4/127.0.0.1/tcp/{PROXY_PORT}"),
        ),
        (
            "CLUSTER_IPFSPROXY_NODEMULTIADDRESS",
            format!("/ip4/127.0.0.1/tcp/{KUBO_RPC_PORT}"),
        ),
        (
            "CLUSTER_PINSVCAPI_HTTPLISTENMULTIADDRESS",
            format!("/ip4/127.0.0.1/tcp/{PINSVC_PORT}"),
        ),
        (
            "CLUSTER_IPFSHTTP_NODEMULTIADDRESS",
            format!("/ip4/127.0.0.1/tcp/{KUBO_RPC_PORT}"),
        ),
        // Pins by status (queued, pinning, error, pinned) for the Archive dashboard.
        ("CLUSTER_METRICS_ENABLESTATS", "true".into()),
        (
            "CLUSTER_METRICS_PROMETHEUSENDPOINT",
            format!("/ip4/0.0.0.0/tcp/{CLUSTER_METRICS_PORT}"),
        ),
    ];
    lines.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

/// Replica `i`'s ipfs-cluster `identity.json`.
///
/// # Panics
/// When `ids` holds fewer identities than `i + 1` (or than the replicas):
/// [`config_secret`] checks that first.
pub fn cluster_identity(ids: &Identities, i: usize) -> serde_json::Value {
    let p = &ids.peers[i].cluster;
    json!({"id": p.peer_id().to_string(), "private_key": p.to_libp2p_base64()})
}

/// The rendered configuration Secret.
///
/// # Errors
/// When fewer identities exist than replicas (the caller extends them first).
pub fn config_secret(
    archive: &ImageArchive,
    names: &Names,
    owner: &OwnerReference,
    ids: &Identities,
) -> Result<Secret, Error> {
    let replicas = usize::try_from(archive.spec.replicas.max(1)).unwrap_or(1);
    if ids.peers.len() < replicas {
        return Err(Error::Object(format!(
            "ImageArchive {}: {} identities for {replicas} replicas",
            names.archive,
            ids.peers.len()
        )));
    }
    let ser = |v: &serde_json::Value| {
        serde_json::to_vec_pretty(v).map_err(|e| Error::Serialize {
            what: format!("Secret {}", names.config),
            reason: e.to_string(),
        })
    };
    let mut data = BTreeMap::from([(
        SWARM_KEY.to_owned(),
        ByteString(ids.swarm_key.to_file().into_bytes()),
    )]);
    for i in 0..replicas {
        let pod = names.replica(i);
        data.insert(
            format!("{pod}.kubo.json"),
            ByteString(ser(&kubo_config(archive, names, ids, i))?),
        );
        data.insert(
            format!("{pod}.cluster.env"),
            ByteString(cluster_env(archive, names, ids, i).into_bytes()),
        );
        data.insert(
            format!("{pod}.identity.json"),
            ByteString(ser(&cluster_identity(ids, i))?),
        );
    }
    Ok(Secret {
        metadata: meta(&names.config, names, owner),
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Secret::default()
    })
}

/// The pods' ServiceAccount (their mesh identity; no API access).
pub fn service_account(names: &Names, owner: &OwnerReference) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(&names.archive, names, owner),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

// The REST and gateway ports are not container ports (loopback only): target by number.
fn service_port(name: &str, port: i32) -> ServicePort {
    children::service_port(name, port, IntOrString::Int(port))
}

/// The headless Service of the swarm ports (not-ready pods resolve too).
pub fn swarm_service(names: &Names, owner: &OwnerReference) -> Service {
    Service {
        metadata: meta(&names.swarm, names, owner),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(names)),
            ports: Some(vec![
                service_port("kubo-swarm", KUBO_SWARM_PORT),
                service_port("cluster-swarm", CLUSTER_SWARM_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The client Service: REST and gateway, through the pods' sidecars.
pub fn client_service(names: &Names, owner: &OwnerReference) -> Service {
    Service {
        metadata: meta(&names.archive, names, owner),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(names)),
            ports: Some(vec![
                service_port("cluster-api", REST_PORT),
                service_port("gateway", GATEWAY_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn to_peer(w: &WorkloadIdentity) -> Peer {
    Peer {
        spiffe_id: w.spiffe_id.clone(),
        service_account: w.service_account.clone(),
        namespace: None,
    }
}

/// The archive pods' MeshPolicy: REST for adders (and the operator), gateway for readers.
pub fn mesh_policy(
    archive: &ImageArchive,
    names: &Names,
    owner: &OwnerReference,
    operator_id: Option<&SpiffeId>,
) -> MeshPolicy {
    let mut rest: Vec<Peer> = archive.spec.adders.iter().map(to_peer).collect();
    if let Some(me) = operator_id
        && !rest
            .iter()
            .any(|p| p.spiffe_id.as_deref() == Some(me.as_str()))
    {
        rest.push(Peer {
            spiffe_id: Some(me.as_str().to_owned()),
            service_account: None,
            namespace: None,
        });
    }
    let mut policy = MeshPolicy::new(
        &names.policy,
        MeshPolicySpec {
            pod_selector: LabelSelector {
                match_labels: Some(selector_labels(names)),
                ..LabelSelector::default()
            },
            ports: vec![
                PortRule {
                    port: REST_PORT,
                    protocol: Some(PortProtocol::Http),
                    allow: rest,
                },
                PortRule {
                    port: GATEWAY_PORT,
                    protocol: Some(PortProtocol::Http),
                    allow: archive.spec.readers.iter().map(to_peer).collect(),
                },
            ],
            mode: PolicyMode::Enforce,
            audit: None,
        },
    );
    policy.metadata = meta(&names.policy, names, owner);
    policy
}

fn np_port(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    }
}

/// The NetworkPolicy: swarm ports only from this archive's pods; the mesh ports (which the
/// sidecar authorises per identity), the sidecar's admin port and the cluster's metrics from
/// anywhere.
pub fn network_policy(names: &Names, owner: &OwnerReference) -> NetworkPolicy {
    let pods = LabelSelector {
        match_labels: Some(selector_labels(names)),
        ..LabelSelector::default()
    };
    NetworkPolicy {
        metadata: meta(&names.archive, names, owner),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(pods.clone()),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(pods),
                        ..NetworkPolicyPeer::default()
                    }]),
                    ports: Some(vec![np_port(KUBO_SWARM_PORT), np_port(CLUSTER_SWARM_PORT)]),
                },
                NetworkPolicyIngressRule {
                    from: None,
                    ports: Some(vec![
                        np_port(REST_PORT),
                        np_port(GATEWAY_PORT),
                        np_port(SIDECAR_ADMIN_PORT),
                        np_port(CLUSTER_METRICS_PORT),
                    ]),
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn exec_probe(script: &str, period: i32, failures: i32) -> Probe {
    Probe {
        exec: Some(ExecAction {
            command: Some(vec!["/bin/sh".into(), "-c".into(), script.into()]),
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(5),
        ..Probe::default()
    }
}

fn tcp_probe(port: i32, period: i32, failures: i32) -> Probe {
    Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::Int(port),
            ..TCPSocketAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

/// Annotation on the pod template: a digest of the rendered configuration, so that a change
/// (a replica added or removed changes every peer's peering and trusted set) rolls the pods,
/// one at a time.
pub const CONFIG_DIGEST_ANNOTATION: &str = "medmesh.io/archive-config-digest";

/// SHA-256 over the configuration Secret's keys and values, hex.
pub fn config_digest(config: &Secret) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for (k, v) in config.data.iter().flatten() {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update((v.0.len() as u64).to_be_bytes());
        h.update(&v.0);
    }
    hex::encode(h.finalize())
}

/// The configuration digest a StatefulSet's pod template carries, if any.
pub fn template_digest(sts: &StatefulSet) -> Option<&str> {
    sts.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(CONFIG_DIGEST_ANNOTATION)
        .map(String::as_str)
}

/// The StatefulSet; `digest` is [`config_digest`] of the configuration Secret.
pub fn stateful_set(
    archive: &ImageArchive,
    names: &Names,
    owner: &OwnerReference,
    digest: &str,
) -> StatefulSet {
    let selector = selector_labels(names);
    let spec = &archive.spec;
    let images = spec.images.clone().unwrap_or_default();
    let resources = spec.resources.clone().unwrap_or_default();
    let pod_name = EnvVar {
        name: "POD_NAME".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let port = |name: &str, p: i32| ContainerPort {
        name: Some(name.into()),
        container_port: p,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    };
    let kubo = Container {
        name: "kubo".into(),
        image: Some(images.kubo.unwrap_or_else(|| DEFAULT_KUBO_IMAGE.into())),
        command: Some(vec!["/bin/sh".into(), "-c".into(), KUBO_SCRIPT.into()]),
        env: Some(vec![
            pod_name.clone(),
            env("MEDMESH_ARCHIVE_CONFIG", CONFIG_DIR),
            env("IPFS_PATH", KUBO_DIR),
            // Refuse to start without the private-network key.
            env("LIBP2P_FORCE_PNET", "1"),
            env("IPFS_TELEMETRY", "off"),
        ]),
        // The swarm only: RPC (5001) and gateway (8080) listen on loopback.
        ports: Some(vec![port("kubo-swarm", KUBO_SWARM_PORT)]),
        readiness_probe: Some(exec_probe("ipfs id >/dev/null", 10, 3)),
        liveness_probe: Some(tcp_probe(KUBO_SWARM_PORT, 10, 6)),
        resources: resources.kubo,
        security_context: Some(crate::security::restricted_container(ARCHIVE_UID)),
        volume_mounts: Some(vec![
            mount("kubo", KUBO_DIR, false),
            mount("config", CONFIG_DIR, true),
            mount("tmp", "/tmp", false),
        ]),
        ..Container::default()
    };
    let cluster = Container {
        name: "ipfs-cluster".into(),
        image: Some(
            images
                .cluster
                .unwrap_or_else(|| DEFAULT_CLUSTER_IMAGE.into()),
        ),
        command: Some(vec!["/bin/sh".into(), "-c".into(), CLUSTER_SCRIPT.into()]),
        env: Some(vec![
            pod_name,
            env("MEDMESH_ARCHIVE_CONFIG", CONFIG_DIR),
            env("IPFS_CLUSTER_PATH", CLUSTER_DIR),
            env("MEDMESH_ARCHIVE_REPLICAS", spec.replicas.to_string()),
        ]),
        ports: Some(vec![
            port("cluster-swarm", CLUSTER_SWARM_PORT),
            port("cluster-metrics", CLUSTER_METRICS_PORT),
        ]),
        readiness_probe: Some(exec_probe(CLUSTER_READY_SCRIPT, 10, 3)),
        liveness_probe: Some(tcp_probe(CLUSTER_SWARM_PORT, 10, 6)),
        resources: resources.cluster,
        security_context: Some(crate::security::restricted_container(ARCHIVE_UID)),
        volume_mounts: Some(vec![
            mount("cluster", CLUSTER_DIR, false),
            mount("config", CONFIG_DIR, true),
            mount("tmp", "/tmp", false),
        ]),
        ..Container::default()
    };
    let volumes = vec![
        Volume {
            name: "config".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names.config.clone()),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let swarm_ports = format!("{KUBO_SWARM_PORT},{CLUSTER_SWARM_PORT}");
    // Prometheus scrapes the cluster's metrics directly, as it does the sidecar's admin port.
    let skip_inbound = format!("{swarm_ports},{CLUSTER_METRICS_PORT}");
    let class = spec.storage.storage_class_name.as_ref();
    let mut pod_labels = labels(names);
    pod_labels.insert(INJECT_LABEL.into(), "enabled".into());
    StatefulSet {
        metadata: meta(&names.archive, names, owner),
        spec: Some(StatefulSetSpec {
            replicas: Some(spec.replicas),
            service_name: Some(names.swarm.clone()),
            // Peers find each other before any is ready: start them together.
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    // libp2p with the pre-shared keys is its own encrypted, authenticated
                    // channel between peers; the NetworkPolicy confines it to them.
                    annotations: Some(BTreeMap::from([
                        (SKIP_INBOUND_ANNOTATION.into(), skip_inbound),
                        (SKIP_OUTBOUND_ANNOTATION.into(), swarm_ports),
                        (CONFIG_DIGEST_ANNOTATION.into(), digest.to_owned()),
                    ])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(names.archive.clone()),
                    automount_service_account_token: Some(false),
                    security_context: Some(crate::security::restricted_pod(ARCHIVE_UID)),
                    topology_spread_constraints: Some(vec![children::spread(selector)]),
                    termination_grace_period_seconds: Some(60),
                    containers: vec![kubo, cluster],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![
                children::claim(
                    "kubo",
                    selector_labels(names),
                    &spec.storage.kubo_size,
                    class,
                ),
                children::claim(
                    "cluster",
                    selector_labels(names),
                    &spec.storage.cluster_size,
                    class,
                ),
            ]),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

/// The PodDisruptionBudget: one peer at a time, so that pins of `min` ≥ 2 stay readable.
pub fn pdb(names: &Names, owner: &OwnerReference) -> PodDisruptionBudget {
    children::one_down_pdb(meta(&names.archive, names, owner), selector_labels(names))
}
