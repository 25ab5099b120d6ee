//! Kubernetes Events through kube's `Recorder` (`events.k8s.io/v1`), behind the
//! [`EventSink`] the webhook and the controllers emit through: emitting only queues, a
//! background task publishes, and under load (a full queue) Events are dropped and counted
//! rather than slowing admissions down.

use kube::runtime::events::{Event, EventType as KubeEventType, Recorder, Reporter};
use tokio::sync::mpsc;

use k8s_openapi::api::core::v1::ObjectReference;

/// An Event about an admission, for an [`EventSink`].
#[derive(Debug, Clone, PartialEq)]
pub struct InjectionEvent {
    /// The object the Event is about: the Pod's controller when it has one (a Pod being
    /// created has no uid yet), else the Pod by name.
    pub regarding: ObjectReference,
    /// `Normal` or `Warning`.
    pub type_: EventType,
    /// CamelCase reason.
    pub reason: &'static str,
    /// What happened, for people.
    pub note: String,
}

/// The type of an Event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Routine.
    Normal,
    /// Something to look at.
    Warning,
}

impl EventType {
    /// The API value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "Normal",
            Self::Warning => "Warning",
        }
    }
}

/// Where the webhook's Events go. Emitting must not block the admission: implementations queue
/// (the Kubernetes implementation publishes from a background task) and may drop under load.
pub trait EventSink: Send + Sync {
    /// Queues one Event.
    fn emit(&self, event: InjectionEvent);
}

/// An [`EventSink`] that drops everything (tests and out-of-cluster runs without Events).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEvents;

impl EventSink for NoEvents {
    fn emit(&self, _event: InjectionEvent) {}
}

/// Events waiting to be published at most.
const QUEUE: usize = 1024;

/// An [`EventSink`] publishing through the API server.
#[derive(Clone)]
pub struct KubeEvents {
    tx: mpsc::Sender<InjectionEvent>,
}

impl KubeEvents {
    /// Starts the publishing task (it ends when every sender is dropped).
    pub fn start(client: kube::Client, instance: Option<String>) -> Self {
        let (tx, mut rx) = mpsc::channel::<InjectionEvent>(QUEUE);
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: "medmesh-operator".into(),
                instance,
            },
        );
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                let ev = Event {
                    type_: match e.type_ {
                        EventType::Normal => KubeEventType::Normal,
                        EventType::Warning => KubeEventType::Warning,
                    },
                    reason: e.reason.to_owned(),
                    note: Some(e.note),
                    action: e.reason.to_owned(),
                    secondary: None,
                };
                if let Err(err) = recorder.publish(&ev, &e.regarding).await {
                    tracing::debug!(error = %err, reason = e.reason, "event not published");
                }
            }
        });
        Self { tx }
    }
}

impl EventSink for KubeEvents {
    fn emit(&self, event: InjectionEvent) {
        if self.tx.try_send(event).is_err() {
            tracing::debug!("event queue full; event dropped");
        }
    }
}
