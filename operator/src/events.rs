//! Kubernetes Events through kube's `Recorder` (`events.k8s.io/v1`), behind the webhook's
//! [`EventSink`]: emitting only queues, a background task publishes, and under load (a full
//! queue) Events are dropped and counted rather than slowing admissions down.

use kube::runtime::events::{Event, EventType as KubeEventType, Recorder, Reporter};
use tokio::sync::mpsc;

use crate::webhook::{EventSink, EventType, InjectionEvent};

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
