//! The leader-only controllers: [`audit_ledger`] (one `AuditLedger` → its Secret, ConfigMap,
//! Services, StatefulSet and PodDisruptionBudget), [`image_archive`] (one `ImageArchive` → a
//! private Kubo + ipfs-cluster StatefulSet with its keys, configuration, Services, MeshPolicy,
//! NetworkPolicy and PodDisruptionBudget) and [`mesh_policy`] (one namespace → its policy and
//! identity-CA ConfigMaps and the conditions of its `MeshPolicy` objects).
//!
//! Both follow kube-rs/controller-rs: children are written with server-side apply under one
//! field manager ([`FIELD_MANAGER`]), status goes to `/status`, and every decision is a pure
//! function of gathered input and an injected clock (tested without an API server), while the
//! `reconcile` functions only gather, call those and write (tested against a mocked API
//! server, see `mock`).
//!
//! Status is written only when it differs from what is stored, so the watch event our own
//! status write causes ends in a reconcile that writes nothing (this stands in for the
//! generation predicate, which would also hide the StatefulSet status changes we want).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use medmesh_core::TrustDomain;
use tokio::sync::watch;
use tracing::{Instrument as _, Span};

use crate::crd::{AuditLedger, ImageArchive, MeshPolicy};
use crate::events::EventSink;
use crate::identity::IssuerCa;
use crate::metrics::{ControllerKind, ReconcileMetrics, ReconcileResult, ReconcileTimer};
use crate::names::{FIELD_MANAGER, MANAGED_BY};

pub mod audit_ledger;
pub mod children;
pub mod image_archive;
pub mod mesh_policy;
#[cfg(test)]
pub(crate) mod mock;

pub use audit_ledger::{CheckpointReader, LedgerCheckpoint, LedgerTarget};
pub use image_archive::{ArchiveTarget, ClusterPeer, PeerReader};

/// Why a reconcile failed (it is retried after [`RETRY`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An API request failed.
    #[error("{what}: {source}")]
    Kube {
        /// Which object and operation.
        what: String,
        /// The error.
        source: kube::Error,
    },
    /// The object lacks a namespace or uid (not expected from the API server).
    #[error("{0}")]
    Object(String),
    /// Generating or signing key material failed.
    #[error("{what}: {reason}")]
    Crypto {
        /// What was generated.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// Serialization of a child failed (not expected).
    #[error("serializing {what}: {reason}")]
    Serialize {
        /// Which child.
        what: String,
        /// Why.
        reason: String,
    },
}

pub(crate) fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Kube { what, source }
}

/// Delay before a failed reconcile is retried.
pub const RETRY: Duration = Duration::from_secs(30);

/// The time source of decisions (tests fix it).
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(SystemTime::now)
}

/// `SystemTime` as a Kubernetes `Time`, whole seconds (what the API server stores, so that a
/// status read back compares equal).
pub fn k8s_time(t: SystemTime) -> Time {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    Time(
        k8s_openapi::jiff::Timestamp::from_second(secs)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

/// Server-side apply with our field manager; `force` takes over fields another manager set
/// (the operator owns these objects).
pub fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// What the controllers share.
#[derive(Clone)]
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Mesh trust domain.
    pub trust_domain: TrustDomain,
    /// Default ledger image.
    pub ledger_image: String,
    /// Where ledgers send their spans (`OTEL_EXPORTER_OTLP_ENDPOINT`); none: no traces.
    pub otlp_endpoint: Option<String>,
    /// The workload-identity issuer (signs the ledgers' server certificates).
    pub ca: Arc<IssuerCa>,
    /// Reads ledgers' checkpoints; `None` when no reader credentials are configured.
    pub checkpoints: Option<Arc<dyn CheckpointReader>>,
    /// Reads archives' cluster peer views; `None` when no reader credentials are configured.
    pub archive_peers: Option<Arc<dyn PeerReader>>,
    /// The operator's own SPIFFE ID, added to every ledger's readers when it reads checkpoints
    /// (and to every archive's REST port).
    pub reader_id: Option<medmesh_core::SpiffeId>,
    /// PEM of the CA that signs the operator's HTTPS certificate (published as
    /// `medmesh-identity-ca`); `None` until known.
    pub serving_ca: watch::Receiver<Option<String>>,
    /// Events about resources.
    pub events: Arc<dyn EventSink>,
    /// Reconcile counters.
    pub metrics: ReconcileMetrics,
    /// Time source.
    pub clock: Clock,
    /// Connect-address overrides for ledger URLs (out of cluster: `--resolve`).
    pub resolve: crate::resolve::Resolve,
}

impl Context {
    fn now(&self) -> SystemTime {
        (self.clock)()
    }
}

/// The span of one reconcile: which controller, which object (names only), and the result.
fn reconcile_span<K: kube::Resource<DynamicType = ()>>(kind: ControllerKind, obj: &K) -> Span {
    tracing::info_span!(
        "reconcile",
        controller = kind.as_str(),
        kind = %K::kind(&()),
        namespace = obj.meta().namespace.as_deref().unwrap_or(""),
        name = obj.meta().name.as_deref().unwrap_or(""),
        result = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// Counts a finished reconcile and records its result on the current (reconcile) span.
fn finish(timer: ReconcileTimer, r: &Result<Action, Error>) {
    let result = if r.is_ok() {
        ReconcileResult::Success
    } else {
        ReconcileResult::Error
    };
    timer.finish(result);
    let span = Span::current();
    span.record("result", result.as_str());
    if r.is_err() {
        span.record("otel.status_code", "ERROR");
    }
}

fn error_policy<K>(kind: ControllerKind) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action {
    move |_obj, err, ctx| {
        tracing::warn!(controller = kind.as_str(), error = %err, "reconcile failed");
        drop(ctx);
        Action::requeue(RETRY)
    }
}

/// Runs the controllers until `shutdown` resolves (then they finish the reconciles in flight).
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let ledgers = Controller::new(
        Api::<AuditLedger>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<StatefulSet>::all(client.clone()),
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}")),
    )
    .graceful_shutdown_on(stopped(stop_rx.clone()))
    .run(
        |obj, ctx| {
            let span = reconcile_span(ControllerKind::AuditLedger, obj.as_ref());
            async move {
                let m = ctx.metrics.start(ControllerKind::AuditLedger);
                let r = audit_ledger::reconcile(obj, ctx.clone()).await;
                finish(m, &r);
                r
            }
            .instrument(span)
        },
        error_policy(ControllerKind::AuditLedger),
        ctx.clone(),
    )
    .for_each(|_| async {});

    // The policy controller is keyed by namespace: every change to a namespace's labels,
    // policies, ledgers or our ConfigMaps recompiles that namespace; a new serving CA
    // recompiles all (it is published into each).
    let mut ca_rx = ctx.serving_ca.clone();
    let ca_changes = async_stream_from_watch(&mut ca_rx);
    let policies = Controller::new(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches(
        Api::<MeshPolicy>::all(client.clone()),
        watcher::Config::default(),
        |p| p.namespace().map(|ns| ObjectRef::<Namespace>::new(&ns)),
    )
    .watches(
        Api::<AuditLedger>::all(client.clone()),
        watcher::Config::default(),
        |l| l.namespace().map(|ns| ObjectRef::<Namespace>::new(&ns)),
    )
    .watches(
        Api::<ConfigMap>::all(client.clone()),
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}")),
        |c| c.namespace().map(|ns| ObjectRef::<Namespace>::new(&ns)),
    )
    // An archive reporting its endpoint turns archiving on for the namespaces that name it;
    // a deleted archive key (crypto-shredding) is replaced by a new one at once, and the
    // sidecars seal to the new recipient.
    .watches(
        Api::<ImageArchive>::all(client.clone()),
        watcher::Config::default(),
        |a| a.namespace().map(|ns| ObjectRef::<Namespace>::new(&ns)),
    )
    .watches(
        Api::<Secret>::all(client.clone()),
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}")),
        |s| s.namespace().map(|ns| ObjectRef::<Namespace>::new(&ns)),
    )
    .reconcile_all_on(ca_changes)
    .graceful_shutdown_on(stopped(stop_rx.clone()))
    .run(
        |obj, ctx| {
            let span = reconcile_span(ControllerKind::MeshPolicy, obj.as_ref());
            async move {
                let m = ctx.metrics.start(ControllerKind::MeshPolicy);
                let r = mesh_policy::reconcile(obj, ctx.clone()).await;
                finish(m, &r);
                r
            }
            .instrument(span)
        },
        error_policy(ControllerKind::MeshPolicy),
        ctx.clone(),
    )
    .for_each(|_| async {});

    let archives = Controller::new(
        Api::<ImageArchive>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<StatefulSet>::all(client.clone()),
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}")),
    )
    .graceful_shutdown_on(stopped(stop_rx))
    .run(
        |obj, ctx| {
            let span = reconcile_span(ControllerKind::ImageArchive, obj.as_ref());
            async move {
                let m = ctx.metrics.start(ControllerKind::ImageArchive);
                let r = image_archive::reconcile(obj, ctx.clone()).await;
                finish(m, &r);
                r
            }
            .instrument(span)
        },
        error_policy(ControllerKind::ImageArchive),
        ctx,
    )
    .for_each(|_| async {});

    let both = futures::future::join3(ledgers, archives, policies);
    tokio::pin!(both);
    tokio::select! {
        _ = &mut both => {}
        () = shutdown => {
            let _ = stop_tx.send(true);
            both.await;
        }
    }
}

/// A stream that yields once per change of `rx` (the first value is not a change).
fn async_stream_from_watch(
    rx: &mut watch::Receiver<Option<String>>,
) -> impl futures::Stream<Item = ()> + Send + 'static {
    let rx = rx.clone();
    futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok().map(|()| ((), rx))
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
    use tracing_subscriber::registry::LookupSpan;

    use super::*;

    type FieldMap = BTreeMap<String, String>;

    /// Every span's name and the fields it ended with.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<(String, FieldMap)>>>);

    struct Fields<'a>(&'a mut FieldMap);

    impl Visit for Fields<'_> {
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.insert(field.name().into(), value.into());
        }
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.insert(field.name().into(), format!("{value:?}"));
        }
    }

    impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Capture {
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
            let mut f = BTreeMap::new();
            attrs.record(&mut Fields(&mut f));
            if let Some(span) = ctx.span(id) {
                span.extensions_mut().insert(f);
            }
        }
        fn on_record(&self, id: &Id, values: &Record<'_>, ctx: LayerContext<'_, S>) {
            if let Some(span) = ctx.span(id)
                && let Some(f) = span.extensions_mut().get_mut::<FieldMap>()
            {
                values.record(&mut Fields(f));
            }
        }
        fn on_close(&self, id: Id, ctx: LayerContext<'_, S>) {
            if let Some(span) = ctx.span(&id) {
                let f = span
                    .extensions()
                    .get::<FieldMap>()
                    .cloned()
                    .unwrap_or_default();
                self.0.lock().unwrap().push((span.name().into(), f));
            }
        }
    }

    #[tokio::test]
    async fn reconciles_are_spans_with_names_and_results() {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::registry().with(capture.clone());
        let _guard = tracing::subscriber::set_default(subscriber);
        let metrics = ReconcileMetrics::unregistered();
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some("radiology".into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        for ok in [true, false] {
            let span = reconcile_span(ControllerKind::MeshPolicy, &ns);
            async {
                let timer = metrics.start(ControllerKind::MeshPolicy);
                let r = if ok {
                    Ok(Action::await_change())
                } else {
                    Err(Error::Object("no uid".into()))
                };
                finish(timer, &r);
            }
            .instrument(span)
            .await;
        }
        let spans = capture.0.lock().unwrap().clone();
        assert_eq!(spans.len(), 2, "{spans:?}");
        for (name, f) in &spans {
            assert_eq!(name, "reconcile");
            assert_eq!(f["controller"], ControllerKind::MeshPolicy.as_str());
            assert_eq!(f["kind"], "Namespace");
            assert_eq!(f["name"], "radiology");
            assert_eq!(f["namespace"], "");
        }
        assert_eq!(spans[0].1["result"], "success");
        assert!(!spans[0].1.contains_key("otel.status_code"));
        assert_eq!(spans[1].1["result"], "error");
        assert_eq!(spans[1].1["otel.status_code"], "ERROR");
        assert_eq!(
            metrics.reconciles(ControllerKind::MeshPolicy, ReconcileResult::Error),
            1
        );
    }
}
