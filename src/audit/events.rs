//! Kubernetes Events for violations, so `kubectl get events` and `kubectl describe` show them
//! on the object concerned. Publishing happens off the request path through a bounded queue;
//! when the API server is slow, events are dropped (and counted), never requests delayed.
//!
//! Events are rate-limited per namespace and reason, and in all: a review names the user and
//! the object the event tells of, and whoever can reach the webhook port unauthenticated (no
//! `serve --client-ca`) could otherwise have fixity write Events of their choosing into any
//! namespace as fast as they can send reviews.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

/// Events waiting to be published at most; beyond that they are dropped.
const QUEUE: usize = 1024;
/// The API server refuses event notes over 1 kB.
const MAX_NOTE: usize = 1000;

/// Events of one reason in one namespace: a burst of 10, then one each 10 s.
const PER_KEY: Rate = Rate {
    burst: 10.0,
    every: Duration::from_secs(10),
};
/// All events: a burst of 100, then 10 a second.
const ALL: Rate = Rate {
    burst: 100.0,
    every: Duration::from_millis(100),
};
/// (namespace, reason) pairs remembered; a forged review can name any namespace.
const MAX_KEYS: usize = 4096;

/// One event to publish.
#[derive(Debug, Clone)]
pub struct Notice {
    pub regarding: ObjectReference,
    pub warning: bool,
    pub reason: String,
    pub action: String,
    pub note: String,
}

/// Why a notice was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Its namespace and reason, or all events, were over their rate.
    RateLimited,
    /// The publisher is behind.
    QueueFull,
}

/// A token bucket's shape.
#[derive(Debug, Clone, Copy)]
struct Rate {
    burst: f64,
    every: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: rate.burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let earned =
            now.saturating_duration_since(self.at).as_secs_f64() / rate.every.as_secs_f64();
        self.tokens = (self.tokens + earned).min(rate.burst);
        self.at = now;
    }
}

/// Event rates per (namespace, reason) and in all.
#[derive(Debug)]
pub struct RateLimit {
    keys: HashMap<(String, String), Bucket>,
    all: Bucket,
}

impl RateLimit {
    pub fn new(now: Instant) -> Self {
        Self {
            keys: HashMap::new(),
            all: Bucket::full(ALL, now),
        }
    }

    /// Whether an event of `reason` in `namespace` may be published at `now`; if so, it is
    /// counted against both rates.
    pub fn admit(&mut self, namespace: &str, reason: &str, now: Instant) -> bool {
        self.all.refill(ALL, now);
        if self.all.tokens < 1.0 {
            return false;
        }
        let key = (namespace.to_owned(), reason.to_owned());
        if !self.keys.contains_key(&key) && self.keys.len() >= MAX_KEYS {
            // A bucket that has refilled says nothing a new one would not: forget those.
            self.keys.retain(|_, b| {
                b.refill(PER_KEY, now);
                b.tokens < PER_KEY.burst
            });
            if self.keys.len() >= MAX_KEYS {
                return false;
            }
        }
        let bucket = self
            .keys
            .entry(key)
            .or_insert_with(|| Bucket::full(PER_KEY, now));
        bucket.refill(PER_KEY, now);
        if bucket.tokens < 1.0 {
            return false;
        }
        bucket.tokens -= 1.0;
        self.all.tokens -= 1.0;
        true
    }
}

/// A handle to the background publisher.
#[derive(Clone)]
pub struct EventSink {
    queue: mpsc::Sender<Notice>,
    limit: std::sync::Arc<Mutex<RateLimit>>,
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
        Self {
            queue,
            limit: std::sync::Arc::new(Mutex::new(RateLimit::new(Instant::now()))),
        }
    }

    /// Queues a notice, unless it is over its rate or the queue is full.
    pub fn send(&self, notice: Notice) -> Result<(), Dropped> {
        let namespace = notice.regarding.namespace.as_deref().unwrap_or("default");
        let admitted = self
            .limit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(namespace, &notice.reason, Instant::now());
        if !admitted {
            return Err(Dropped::RateLimited);
        }
        self.queue.try_send(notice).map_err(|_| Dropped::QueueFull)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_limited_per_namespace_and_reason() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(t0);
        let sent = |limit: &mut RateLimit, ns: &str, reason: &str, at: Instant| {
            (0..50).filter(|_| limit.admit(ns, reason, at)).count()
        };
        assert_eq!(sent(&mut limit, "shop", "ExecDenied", t0), 10, "the burst");
        assert_eq!(
            sent(&mut limit, "shop", "MutableTag", t0),
            10,
            "its own reason"
        );
        assert_eq!(
            sent(&mut limit, "bank", "ExecDenied", t0),
            10,
            "its own namespace"
        );
        // One more each 10 s.
        let later = t0 + Duration::from_secs(25);
        assert_eq!(sent(&mut limit, "shop", "ExecDenied", later), 2);
        assert_eq!(
            sent(
                &mut limit,
                "shop",
                "ExecDenied",
                later + Duration::from_secs(3600)
            ),
            10,
            "never more than the burst"
        );
    }

    /// Forged reviews naming ever new namespaces meet the rate for all events, and the
    /// namespaces remembered are bounded.
    #[test]
    fn events_in_all_are_limited_and_memory_is_bounded() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(t0);
        let admitted = (0..10_000)
            .filter(|i| limit.admit(&format!("ns-{i}"), "ExecDenied", t0))
            .count();
        assert_eq!(admitted, 100, "the burst of all events");
        // Ten a second after that, across namespaces.
        let mut admitted = 0;
        for i in 0..10_000u64 {
            let at = t0 + Duration::from_millis(i);
            admitted += usize::from(limit.admit(&format!("other-{i}"), "ExecDenied", at));
        }
        assert!((99..=101).contains(&admitted), "{admitted} in 10 s");
        assert!(limit.keys.len() <= MAX_KEYS);
    }
}
