//! Kubernetes Events for violations, so `kubectl get events` and `kubectl describe` show them
//! on the object concerned. Publishing happens off the request path through a bounded queue;
//! when the API server is slow, events are dropped (and counted), never requests delayed.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

/// Events waiting to be published at most; beyond that they are dropped.
const QUEUE: usize = 1024;
/// The API server refuses event notes over 1 kB.
const MAX_NOTE: usize = 1000;

/// One event to publish.
#[derive(Debug, Clone)]
pub struct Notice {
    pub regarding: ObjectReference,
    pub warning: bool,
    pub reason: String,
    pub action: String,
    pub note: String,
}

/// A handle to the background publisher.
#[derive(Clone)]
pub struct EventSink {
    queue: mpsc::Sender<Notice>,
}

impl EventSink {
    /// Starts the publisher task. `instance` names this replica in `reportingInstance`.
    pub fn start(client: Client, instance: Option<String>) -> Self {
        let (queue, mut notices) = mpsc::channel::<Notice>(QUEUE);
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: "fixity".to_owned(),
                instance,
            },
        );
        tokio::spawn(async move {
            while let Some(notice) = notices.recv().await {
                let event = Event {
                    type_: if notice.warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: notice.reason,
                    note: Some(super::shorten(notice.note, MAX_NOTE)),
                    action: notice.action,
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&event, &notice.regarding).await {
                    tracing::debug!(error = %e, "event not published");
                }
            }
        });
        Self { queue }
    }

    /// Queues a notice; `false` when the queue is full and it was dropped.
    pub fn send(&self, notice: Notice) -> bool {
        self.queue.try_send(notice).is_ok()
    }
}
