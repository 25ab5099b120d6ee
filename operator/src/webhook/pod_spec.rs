//! The objects injected into a Pod. The sidecar's settings come from environment variables
//! whose names are those of `medmesh-sidecar` (`sidecar/src/config.rs`), plus the identity
//! source's `MEDMESH_IDENTITY_URL` and `MEDMESH_IDENTITY_TOKEN`.

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, DownwardAPIVolumeFile,
    DownwardAPIVolumeSource, EmptyDirVolumeSource, EnvVar, HTTPGetAction, ObjectFieldSelector, Pod,
    Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecretVolumeSource,
    SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::InjectConfig;
use crate::names::{
    AUDIT_CONFIG_KEY, AUDIT_KEY_MOUNT, AUDIT_KEY_SECRET, IDENTITY_AUDIENCE, IDENTITY_CA_CONFIGMAP,
    INJECTED_ANNOTATION, POLICY_CONFIGMAP, POLICY_KEY,
};

/// Name of the init container that programs iptables.
pub const INIT_NAME: &str = "medmesh-init";
/// Name of the sidecar container.
pub const SIDECAR_NAME: &str = "medmesh-sidecar";
/// UID of the proxy (iptables lets its own traffic through).
pub const PROXY_UID: i64 = 1337;
/// The sidecar's inbound listener.
pub const INBOUND_PORT: i32 = 15006;
/// The sidecar's admin listener (`/live`, `/ready`, `/metrics`).
pub const ADMIN_PORT: i32 = crate::names::SIDECAR_ADMIN_PORT;
/// Volume of the projected identity token.
pub const TOKEN_VOLUME: &str = "medmesh-identity-token";
/// Where the token is mounted in the sidecar.
pub const TOKEN_MOUNT: &str = "/var/run/secrets/medmesh/identity";
/// Volume of the policy ConfigMap.
pub const POLICY_VOLUME: &str = "medmesh-policy";
/// Where the policy is mounted in the sidecar.
pub const POLICY_MOUNT: &str = "/etc/medmesh/policy";
/// Volume of the identity service's CA (ConfigMap `medmesh-identity-ca`, published by the
/// policy controller into every meshed namespace).
pub const IDENTITY_CA_VOLUME: &str = "medmesh-identity-ca";
/// Where it is mounted: the sidecar's default `MEDMESH_IDENTITY_CA` directory.
pub const IDENTITY_CA_MOUNT: &str = "/etc/medmesh/identity";
/// Volume of the audit spool (an `emptyDir`: it survives sidecar restarts, and the sidecar
/// delivers it before the Pod goes).
pub const SPOOL_VOLUME: &str = "medmesh-spool";
/// Where the spool is mounted.
pub const SPOOL_MOUNT: &str = "/var/run/medmesh/spool";
/// Volume of the archive staging area (an `emptyDir` of its own, so that archived instances
/// waiting for the archive never fill the record spool's volume).
pub const ARCHIVE_STAGING_VOLUME: &str = "medmesh-archive-staging";
/// Where the staging area is mounted.
pub const ARCHIVE_STAGING_MOUNT: &str = "/var/run/medmesh/archive";
/// The staging volume's size limit (the kubelet evicts a pod that passes it).
pub const ARCHIVE_STAGING_SIZE: &str = "2Gi";
/// The sidecar's staging limit: 90% of the volume, leaving room for meta files and the
/// partial object a write that does not fit leaves until it is removed.
pub const ARCHIVE_STAGING_MAX_BYTES: u64 = 2 * 1024 * 1024 * 1024 / 10 * 9;
/// Volume of the keyed-hash key (the Secret the policy controller maintains; optional: a
/// namespace without auditing has none).
pub const AUDIT_KEY_VOLUME: &str = "medmesh-audit-key";
/// Volume of the pod's labels (downward API): the sidecar picks the policies selecting it.
pub const PODINFO_VOLUME: &str = "medmesh-podinfo";
/// Where it is mounted.
pub const PODINFO_MOUNT: &str = "/etc/medmesh/podinfo";
/// Lifetime of the projected token; the kubelet refreshes it at 80 %.
const TOKEN_SECONDS: i64 = 3600;

/// Whether the Pod already carries the injection (annotation and both containers).
pub(super) fn already_injected(pod: &Pod) -> bool {
    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
    let spec = pod.spec.as_ref();
    let has = |name: &str| {
        spec.is_some_and(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .any(|c| c.name == name)
        })
    };
    annotated && has(INIT_NAME) && has(SIDECAR_NAME)
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn seccomp() -> Option<SeccompProfile> {
    Some(SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..SeccompProfile::default()
    })
}

/// `medmesh-sidecar init`: needs NET_ADMIN and NET_RAW, nothing else, and runs as root
/// (iptables checks the UID). Its root filesystem stays writable because iptables-legacy
/// takes its lock in `/run`.
pub(super) fn init_container(cfg: &InjectConfig, skip_in: &[u16], skip_out: &[u16]) -> Container {
    let mut args = vec![
        "init".to_owned(),
        "--proxy-uid".to_owned(),
        PROXY_UID.to_string(),
        "--inbound-port".to_owned(),
        INBOUND_PORT.to_string(),
        "--admin-port".to_owned(),
        ADMIN_PORT.to_string(),
    ];
    let list = |ports: &[u16]| {
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    if !skip_in.is_empty() {
        args.extend(["--skip-inbound-ports".to_owned(), list(skip_in)]);
    }
    if !skip_out.is_empty() {
        args.extend(["--skip-outbound-ports".to_owned(), list(skip_out)]);
    }
    Container {
        name: INIT_NAME.into(),
        image: Some(cfg.sidecar_image.clone()),
        image_pull_policy: cfg.image_pull_policy.clone(),
        args: Some(args),
        resources: Some(resources("10m", "16Mi", "64Mi")),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            seccomp_profile: seccomp(),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

fn resources(cpu: &str, memory: &str, memory_limit: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(
            [
                ("cpu".to_owned(), Quantity(cpu.into())),
                ("memory".to_owned(), Quantity(memory.into())),
            ]
            .into(),
        ),
        limits: Some([("memory".to_owned(), Quantity(memory_limit.into()))].into()),
        ..ResourceRequirements::default()
    }
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(ADMIN_PORT),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Probe::default()
    }
}

/// The sidecar. As a native sidecar (`restartPolicy: Always` in `initContainers`) its startup
/// probe holds the app's containers until it has its certificate and policy.
pub(super) fn sidecar_container(cfg: &InjectConfig) -> Container {
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(cfg.sidecar_image.clone()),
        image_pull_policy: cfg.image_pull_policy.clone(),
        args: Some(vec!["run".into()]),
        restart_policy: cfg.native_sidecar.then(|| "Always".to_owned()),
        ports: Some(vec![
            ContainerPort {
                name: Some("medmesh-in".into()),
                container_port: INBOUND_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("medmesh-admin".into()),
                container_port: ADMIN_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        env: Some(
            vec![
                env("MEDMESH_TRUST_DOMAIN", cfg.trust_domain.as_str()),
                env("MEDMESH_POLICY", format!("{POLICY_MOUNT}/{}", POLICY_KEY)),
                env("MEDMESH_IDENTITY_URL", cfg.identity_url.clone()),
                env("MEDMESH_IDENTITY_TOKEN", format!("{TOKEN_MOUNT}/token")),
                env("MEDMESH_IDENTITY_CA", format!("{IDENTITY_CA_MOUNT}/ca.crt")),
                // Auditing, when the namespace's policies ask for it (the file is absent otherwise).
                env(
                    "MEDMESH_AUDIT_CONFIG",
                    format!("{POLICY_MOUNT}/{}", AUDIT_CONFIG_KEY),
                ),
                env("MEDMESH_SPOOL_DIR", SPOOL_MOUNT),
                // Archiving, when the audit settings name an archive: staged on a volume of its own.
                env("MEDMESH_ARCHIVE_STAGING_DIR", ARCHIVE_STAGING_MOUNT),
                env(
                    "MEDMESH_ARCHIVE_STAGING_MAX_BYTES",
                    ARCHIVE_STAGING_MAX_BYTES.to_string(),
                ),
                env("MEDMESH_POD_LABELS", format!("{PODINFO_MOUNT}/labels")),
                // The kubelet probes the admin port on the Pod's address, not on loopback.
                env("MEDMESH_ADMIN_ADDR", format!("0.0.0.0:{ADMIN_PORT}")),
            ]
            .into_iter()
            .chain(
                cfg.otlp_endpoint
                    .as_ref()
                    .map(|e| env("OTEL_EXPORTER_OTLP_ENDPOINT", e.clone())),
            )
            .collect(),
        ),
        volume_mounts: Some(vec![
            VolumeMount {
                name: TOKEN_VOLUME.into(),
                mount_path: TOKEN_MOUNT.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: POLICY_VOLUME.into(),
                mount_path: POLICY_MOUNT.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: IDENTITY_CA_VOLUME.into(),
                mount_path: IDENTITY_CA_MOUNT.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: SPOOL_VOLUME.into(),
                mount_path: SPOOL_MOUNT.into(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: ARCHIVE_STAGING_VOLUME.into(),
                mount_path: ARCHIVE_STAGING_MOUNT.into(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: AUDIT_KEY_VOLUME.into(),
                mount_path: AUDIT_KEY_MOUNT.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: PODINFO_VOLUME.into(),
                mount_path: PODINFO_MOUNT.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        // Native sidecars gate the app on the startup probe. Probing every second for up to
        // 10 minutes starts the app as soon as the first certificate arrives, and tolerates a
        // slow or restarting identity service without restarting the sidecar.
        startup_probe: cfg.native_sidecar.then(|| probe("/ready", 1, 600)),
        readiness_probe: Some(probe("/ready", 5, 3)),
        liveness_probe: Some(probe("/live", 10, 3)),
        resources: Some(resources("50m", "32Mi", "256Mi")),
        security_context: Some(crate::security::restricted_container(PROXY_UID)),
        ..Container::default()
    }
}

/// The projected identity token, the policy ConfigMap and the identity CA ConfigMap. Both
/// ConfigMaps are required (`optional: false`): the operator publishes them in every
/// namespace labelled for injection (a deny-all policy when there is no MeshPolicy), and a
/// Pod created before that waits in ContainerCreating instead of starting a sidecar that
/// cannot load its policy or trust the identity service.
pub(super) fn volumes() -> Vec<Volume> {
    vec![
        Volume {
            name: TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(IDENTITY_AUDIENCE.into()),
                        expiration_seconds: Some(TOKEN_SECONDS),
                        path: "token".into(),
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: POLICY_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: POLICY_CONFIGMAP.into(),
                optional: Some(false),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: IDENTITY_CA_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: IDENTITY_CA_CONFIGMAP.into(),
                optional: Some(false),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: SPOOL_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("300Mi".into())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: ARCHIVE_STAGING_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity(ARCHIVE_STAGING_SIZE.into())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: AUDIT_KEY_VOLUME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(AUDIT_KEY_SECRET.into()),
                optional: Some(true),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: PODINFO_VOLUME.into(),
            downward_api: Some(DownwardAPIVolumeSource {
                items: Some(vec![DownwardAPIVolumeFile {
                    path: "labels".into(),
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.labels".into(),
                        ..ObjectFieldSelector::default()
                    }),
                    ..DownwardAPIVolumeFile::default()
                }]),
                ..DownwardAPIVolumeSource::default()
            }),
            ..Volume::default()
        },
    ]
}
