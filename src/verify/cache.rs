//! Verification results by (digest, authorities): positive answers kept for a TTL, failures
//! briefly, and concurrent misses for one key coalesced into a single verification. The
//! verification runs as its own task, so a caller that gives up at its deadline does not
//! cancel it: the next request for the same image finds the answer.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::Shared;
use tokio::sync::oneshot;

/// How a lookup was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lookup {
    /// From the cache.
    Hit,
    /// Joined a verification another request had started.
    Coalesced,
    /// Started a new verification.
    Miss,
}

impl Lookup {
    pub fn as_str(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Coalesced => "coalesced",
            Lookup::Miss => "miss",
        }
    }
}

type Pending<V> = Shared<oneshot::Receiver<V>>;

enum Slot<V> {
    Ready {
        value: V,
        expires: Instant,
        stored: Instant,
    },
    Pending(Pending<V>),
}

/// A bounded, coalescing cache of verification results.
pub struct VerdictCache<K, V> {
    slots: Mutex<HashMap<K, Slot<V>>>,
    ttl: fn(&V) -> Duration,
    capacity: usize,
}

impl<K, V> VerdictCache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// `ttl` says how long a result stays: long for successes, short for failures.
    pub fn new(capacity: usize, ttl: fn(&V) -> Duration) -> Arc<Self> {
        Arc::new(Self {
            slots: Mutex::new(HashMap::new()),
            ttl,
            capacity: capacity.max(1),
        })
    }

    /// The cached result for `key`, or the result of `verify` run once for all concurrent
    /// callers. `None` only if the verification task panicked.
    pub async fn get_or_verify<F>(
        self: &Arc<Self>,
        key: K,
        verify: impl FnOnce() -> F,
    ) -> (Option<V>, Lookup)
    where
        F: Future<Output = V> + Send + 'static,
    {
        let (pending, lookup) = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            match slots.get(&key) {
                Some(Slot::Ready { value, expires, .. }) if *expires > Instant::now() => {
                    return (Some(value.clone()), Lookup::Hit);
                }
                Some(Slot::Pending(pending)) => (pending.clone(), Lookup::Coalesced),
                _ => {
                    let (tx, rx) = oneshot::channel();
                    let pending = rx.shared();
                    slots.insert(key.clone(), Slot::Pending(pending.clone()));
                    let cache = Arc::clone(self);
                    let work = verify();
                    tokio::spawn(async move {
                        let value = work.await;
                        cache.store(key, value.clone());
                        let _ = tx.send(value);
                    });
                    (pending, Lookup::Miss)
                }
            }
        };
        (pending.await.ok(), lookup)
    }

    fn store(&self, key: K, value: V) {
        let now = Instant::now();
        let expires = now + (self.ttl)(&value);
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.insert(
            key,
            Slot::Ready {
                value,
                expires,
                stored: now,
            },
        );
        if slots.len() > self.capacity {
            slots.retain(|_, s| !matches!(s, Slot::Ready { expires, .. } if *expires <= now));
        }
        while slots.len() > self.capacity {
            let oldest = slots
                .iter()
                .filter_map(|(k, s)| match s {
                    Slot::Ready { stored, .. } => Some((k.clone(), *stored)),
                    Slot::Pending(_) => None,
                })
                .min_by_key(|(_, stored)| *stored)
                .map(|(k, _)| k);
            match oldest {
                Some(k) => {
                    slots.remove(&k);
                }
                None => break,
            }
        }
    }

    /// Entries held, pending verifications included.
    pub fn len(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn ttl(v: &Result<u32, String>) -> Duration {
        match v {
            Ok(_) => Duration::from_secs(60),
            Err(_) => Duration::from_millis(50),
        }
    }

    #[tokio::test]
    async fn concurrent_misses_verify_once() {
        let cache = VerdictCache::new(100, ttl);
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..1000 {
            let cache = cache.clone();
            let calls = calls.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_verify("sha256:a", move || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok::<u32, String>(7)
                    })
                    .await
            }));
        }
        let mut lookups = HashMap::new();
        for t in tasks {
            let (value, lookup) = t.await.unwrap();
            assert_eq!(value, Some(Ok(7)));
            *lookups.entry(lookup).or_insert(0) += 1;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(lookups.get(&Lookup::Miss), Some(&1));
        let (_, lookup) = cache.get_or_verify("sha256:a", || async { Ok(0) }).await;
        assert_eq!(lookup, Lookup::Hit);
    }

    #[tokio::test]
    async fn failures_expire_quickly_successes_stay() {
        let cache = VerdictCache::new(100, ttl);
        let (v, _) = cache
            .get_or_verify("bad", || async { Err::<u32, _>("down".to_owned()) })
            .await;
        assert_eq!(v, Some(Err("down".into())));
        let (_, lookup) = cache.get_or_verify("bad", || async { Ok(1) }).await;
        assert_eq!(lookup, Lookup::Hit);
        tokio::time::sleep(Duration::from_millis(80)).await;
        let (v, lookup) = cache.get_or_verify("bad", || async { Ok(1) }).await;
        assert_eq!((v, lookup), (Some(Ok(1)), Lookup::Miss));
    }

    #[tokio::test]
    async fn a_caller_giving_up_does_not_cancel_the_verification() {
        let cache = VerdictCache::new(100, ttl);
        let slow = tokio::time::timeout(
            Duration::from_millis(10),
            cache.get_or_verify("slow", || async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<u32, String>(3)
            }),
        )
        .await;
        assert!(slow.is_err(), "the caller hit its deadline");
        tokio::time::sleep(Duration::from_millis(80)).await;
        let (v, lookup) = cache.get_or_verify("slow", || async { Ok(0) }).await;
        assert_eq!((v, lookup), (Some(Ok(3)), Lookup::Hit));
    }

    #[tokio::test]
    async fn size_is_bounded() {
        let cache = VerdictCache::new(10, ttl);
        for i in 0..50u32 {
            cache.get_or_verify(i, move || async move { Ok(i) }).await;
        }
        assert!(cache.len() <= 10, "{}", cache.len());
        let (_, lookup) = cache.get_or_verify(49, || async { Ok(0) }).await;
        assert_eq!(lookup, Lookup::Hit, "the newest entries stay");
    }
}
