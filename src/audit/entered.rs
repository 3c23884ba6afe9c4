//! Pods someone entered: an exec or attach that a policy forbids but that was admitted (an
//! Audit policy, a break-glass exemption). The request path hands each one to a bounded queue
//! and moves on; the taint controller (`scan::taint`) marks and later replaces the pod. A full
//! queue drops the notice (and counts it), never delays or fails the request.

use std::time::SystemTime;

use tokio::sync::mpsc;

/// Notices waiting at most; the controller drains them as fast as the API server takes patches.
const QUEUE: usize = 256;

/// How a pod was entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Exec,
    Attach,
}

impl Entry {
    pub fn as_str(self) -> &'static str {
        match self {
            Entry::Exec => "exec",
            Entry::Attach => "attach",
        }
    }
}

/// One admitted exec or attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entered {
    pub namespace: String,
    pub pod: String,
    pub entry: Entry,
    pub container: Option<String>,
    pub user: String,
    /// Policies whose rule forbids it, and how each let it through (`would_deny`, `exempted`).
    pub policies: Vec<(String, &'static str)>,
    pub at: SystemTime,
}

/// The request path's end of the queue.
#[derive(Clone)]
pub struct EnteredSink {
    queue: mpsc::Sender<Entered>,
}

impl EnteredSink {
    /// A sink and the receiver the taint controller reads.
    pub fn channel() -> (Self, mpsc::Receiver<Entered>) {
        let (queue, notices) = mpsc::channel(QUEUE);
        (Self { queue }, notices)
    }

    /// Queues a notice; `false` when the queue is full and it was dropped.
    pub fn send(&self, entered: Entered) -> bool {
        self.queue.try_send(entered).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_instead_of_waiting() {
        let (sink, mut notices) = EnteredSink::channel();
        let entered = Entered {
            namespace: "ns".into(),
            pod: "web".into(),
            entry: Entry::Exec,
            container: None,
            user: "oncall".into(),
            policies: vec![("p".into(), "exempted")],
            at: SystemTime::UNIX_EPOCH,
        };
        for _ in 0..QUEUE {
            assert!(sink.send(entered.clone()));
        }
        assert!(!sink.send(entered.clone()), "the queue is bounded");
        assert_eq!(notices.try_recv().ok(), Some(entered.clone()));
        assert!(sink.send(entered));
    }
}
