//! Names the operator's parts share (labels, annotations, object names and keys, mount paths
//! the controllers write into documents the sidecar reads, the field manager), in one place so
//! that no part imports another's constants.

/// The operator's version: injected into Pods, stamped on the leader's Lease, default image tags.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The one field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "medmesh-operator";
/// `app.kubernetes.io/managed-by` value on every object the operator creates.
pub const MANAGED_BY: &str = "medmesh-operator";

/// Namespace and Pod label: `enabled` on a namespace meshes its Pods; `disabled` on a Pod opts
/// it out.
pub const INJECT_LABEL: &str = "medmesh.io/inject";
/// Annotation added to injected Pods, holding the injector's version.
pub const INJECTED_ANNOTATION: &str = "medmesh.io/injected-version";
/// Annotation: inbound ports not redirected to the sidecar (comma-separated).
pub const SKIP_INBOUND_ANNOTATION: &str = "medmesh.io/skip-inbound-ports";
/// Annotation: outbound ports not redirected to the sidecar (comma-separated).
pub const SKIP_OUTBOUND_ANNOTATION: &str = "medmesh.io/skip-outbound-ports";
/// Annotation on the leader-election Lease: the holder's [`VERSION`].
pub const OPERATOR_VERSION_ANNOTATION: &str = "medmesh.io/operator-version";

/// Audience of the projected token the identity service accepts.
pub const IDENTITY_AUDIENCE: &str = "medmesh-identity";
/// ConfigMap (in each meshed namespace) holding the identity service's CA.
pub const IDENTITY_CA_CONFIGMAP: &str = "medmesh-identity-ca";
/// Its key.
pub const IDENTITY_CA_KEY: &str = "ca.crt";

/// The ConfigMap (in each namespace) that holds the compiled policy document.
pub const POLICY_CONFIGMAP: &str = "medmesh-policy";
/// The key of the document in that ConfigMap (the file name sidecars read).
pub const POLICY_KEY: &str = "policy.json";
/// Key of the sidecar audit settings in that ConfigMap (absent when no policy audits).
pub const AUDIT_CONFIG_KEY: &str = "audit.json";
/// The Secret holding the keyed-hash key the namespace's sidecars use (a copy of the one the
/// policies reference), key [`AUDIT_KEY_NAME`].
pub const AUDIT_KEY_SECRET: &str = "medmesh-audit-key";
/// Key of the key in that Secret.
pub const AUDIT_KEY_NAME: &str = "key";
/// Where the sidecar finds that key (the audit settings name the file).
pub const AUDIT_KEY_MOUNT: &str = "/etc/medmesh/audit";
/// Secret with a namespace's archive key pair (generated once, never owned: deleting it is
/// crypto-shredding everything archived under it).
pub const ARCHIVE_KEY_SECRET: &str = "medmesh-archive-key";
/// Key of the private identity (`AGE-SECRET-KEY-1…`) in [`ARCHIVE_KEY_SECRET`].
pub const ARCHIVE_IDENTITY_KEY: &str = "identity";
/// Key of the public recipient (`age1…`) in [`ARCHIVE_KEY_SECRET`].
pub const ARCHIVE_RECIPIENT_KEY: &str = "recipient";
/// Role (and RoleBinding) that lets a policy's `restorers` read [`ARCHIVE_KEY_SECRET`].
pub const ARCHIVE_RESTORER_ROLE: &str = "medmesh-archive-restorer";

/// The injected sidecar's admin listener (`/live`, `/ready`, `/metrics`) on the Pod's address:
/// controllers that write NetworkPolicies let the kubelet reach it.
pub const SIDECAR_ADMIN_PORT: i32 = 15020;
