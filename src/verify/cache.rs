//! Verification results by (digest, authorities): positive answers kept for a TTL, failures
//! briefly, and concurrent misses for one key coalesced into a single verification. The
//! verification runs as its own task, so a caller that gives up at its deadline does not
//! cancel it: the next request for the same image finds the answer. The task is told when
//! nobody waits for it any more ([`Waiters::all_gone`]), so work that has not started yet
//! (waiting for registry capacity) can be dropped instead of piling up behind the deadline;
//! a result whose TTL is zero is not kept.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicUsize, Ordering};

use futures::FutureExt;
use futures::future::Shared;
use tokio::sync::{Notify, oneshot};

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
    Pending(Pending<V>, Arc<Waiters>),
}

/// The callers waiting for one pending verification.
#[derive(Debug, Default)]
pub struct Waiters {
    count: AtomicUsize,
    gone: Notify,
}

impl Waiters {
    /// Resolves once no caller waits for the result any more.
    pub async fn all_gone(&self) {
        loop {
            // Registered before the count is read, so a last caller leaving in between
            // still wakes it.
            let gone = self.gone.notified();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            gone.await;
        }
    }
}

/// One caller's interest, given up when its wait ends (answered, or dropped at a deadline).
struct Waiting(Arc<Waiters>);

impl Waiting {
    fn new(waiters: &Arc<Waiters>) -> Self {
        waiters.count.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(waiters))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.gone.notify_waiters();
        }
    }
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
    /// callers. `verify` is handed the callers' [`Waiters`]. `None` only if the verification
    /// task panicked.
    pub async fn get_or_verify<F>(
        self: &Arc<Self>,
        key: K,
        verify: impl FnOnce(Arc<Waiters>) -> F,
    ) -> (Option<V>, Lookup)
    where
        F: Future<Output = V> + Send + 'static,
    {
        let (pending, waiting, lookup) = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            match slots.get(&key) {
                Some(Slot::Ready { value, expires, .. }) if *expires > Instant::now() => {
                    return (Some(value.clone()), Lookup::Hit);
                }
                Some(Slot::Pending(pending, waiters)) => {
                    (pending.clone(), Waiting::new(waiters), Lookup::Coalesced)
                }
                _ => {
                    let (tx, rx) = oneshot::channel();
                    let pending = rx.shared();
                    let waiters = Arc::new(Waiters::default());
                    let waiting = Waiting::new(&waiters);
                    slots.insert(
                        key.clone(),
                        Slot::Pending(pending.clone(), Arc::clone(&waiters)),
                    );
                    let cache = Arc::clone(self);
                    let work = verify(waiters);
                    tokio::spawn(async move {
                        let value = work.await;
                        cache.store(key, value.clone());
                        let _ = tx.send(value);
                    });
                    (pending, waiting, Lookup::Miss)
                }
            }
        };
        let value = pending.await.ok();
        drop(waiting);
        (value, lookup)
    }

    /// Puts a result in the cache as if a verification had just produced it.
    pub fn insert(&self, key: K, value: V) {
        self.store(key, value);
    }

    /// The cached result for `key` if there is a fresh one; never starts a verification.
    pub fn peek(&self, key: &K) -> Option<V> {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        match slots.get(key) {
            Some(Slot::Ready { value, expires, .. }) if *expires > Instant::now() => {
                Some(value.clone())
            }
            _ => None,
        }
    }

    fn store(&self, key: K, value: V) {
        let now = Instant::now();
        let ttl = (self.ttl)(&value);
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if ttl.is_zero() {
            slots.remove(&key);
            return;
        }
        let expires = now + ttl;
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
                    Slot::Pending(..) => None,
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
                    .get_or_verify("sha256:a", move |_| async move {
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
        let (_, lookup) = cache.get_or_verify("sha256:a", |_| async { Ok(0) }).await;
        assert_eq!(lookup, Lookup::Hit);
    }

    #[tokio::test]
    async fn failures_expire_quickly_successes_stay() {
        let cache = VerdictCache::new(100, ttl);
        let (v, _) = cache
            .get_or_verify("bad", |_| async { Err::<u32, _>("down".to_owned()) })
            .await;
        assert_eq!(v, Some(Err("down".into())));
        let (_, lookup) = cache.get_or_verify("bad", |_| async { Ok(1) }).await;
        assert_eq!(lookup, Lookup::Hit);
        tokio::time::sleep(Duration::from_millis(80)).await;
        let (v, lookup) = cache.get_or_verify("bad", |_| async { Ok(1) }).await;
        assert_eq!((v, lookup), (Some(Ok(1)), Lookup::Miss));
    }

    #[tokio::test]
    async fn peek_sees_fresh_results_only_and_starts_nothing() {
        let cache = VerdictCache::new(100, ttl);
        assert_eq!(cache.peek(&"a"), None);
        assert!(cache.is_empty(), "peek started no verification");
        cache
            .get_or_verify("a", |_| async { Ok::<u32, String>(5) })
            .await;
        cache
            .get_or_verify("b", |_| async { Err::<u32, _>("x".to_owned()) })
            .await;
        assert_eq!(cache.peek(&"a"), Some(Ok(5)));
        assert_eq!(cache.peek(&"b"), Some(Err("x".to_owned())));
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(cache.peek(&"b"), None, "expired");
    }

    #[tokio::test]
    async fn a_caller_giving_up_does_not_cancel_the_verification() {
        let cache = VerdictCache::new(100, ttl);
        let slow = tokio::time::timeout(
            Duration::from_millis(10),
            cache.get_or_verify("slow", |_| async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<u32, String>(3)
            }),
        )
        .await;
        assert!(slow.is_err(), "the caller hit its deadline");
        tokio::time::sleep(Duration::from_millis(80)).await;
        let (v, lookup) = cache.get_or_verify("slow", |_| async { Ok(0) }).await;
        assert_eq!((v, lookup), (Some(Ok(3)), Lookup::Hit));
    }

    /// Work that has not started when every caller has given up learns it, and may drop
    /// itself; a result with a zero TTL leaves no entry, so the next caller starts afresh.
    #[tokio::test]
    async fn work_nobody_waits_for_is_told_so() {
        fn ttl(v: &Result<u32, String>) -> Duration {
            match v {
                Ok(_) => Duration::from_secs(60),
                Err(_) => Duration::ZERO,
            }
        }
        let cache = VerdictCache::new(100, ttl);
        let never = Arc::new(tokio::sync::Semaphore::new(0));
        let started = Arc::new(AtomicUsize::new(0));
        let (s, n) = (started.clone(), never.clone());
        let gave_up = tokio::time::timeout(
            Duration::from_millis(20),
            cache.get_or_verify("queued", move |waiters| async move {
                tokio::select! {
                    () = waiters.all_gone() => Err("nobody waits".to_owned()),
                    _ = n.acquire() => {
                        s.fetch_add(1, Ordering::SeqCst);
                        Ok(1)
                    }
                }
            }),
        )
        .await;
        assert!(gave_up.is_err(), "the caller hit its deadline");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(cache.is_empty(), "the dropped work left nothing behind");
        assert_eq!(started.load(Ordering::SeqCst), 0);
        let (v, lookup) = cache.get_or_verify("queued", |_| async { Ok(2) }).await;
        assert_eq!((v, lookup), (Some(Ok(2)), Lookup::Miss));

        // While a second caller still waits, the work is not told to stop.
        let (tx, rx) = oneshot::channel::<()>();
        let first = tokio::time::timeout(
            Duration::from_millis(10),
            cache.get_or_verify("shared", move |waiters| async move {
                tokio::select! {
                    () = waiters.all_gone() => Err("nobody waits".to_owned()),
                    _ = rx => Ok(3),
                }
            }),
        );
        let second = cache.get_or_verify("shared", |_| async { Ok(0) });
        let finish = async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let _ = tx.send(());
        };
        let (first, second, ()) = tokio::join!(first, second, finish);
        assert!(first.is_err());
        assert_eq!(second, (Some(Ok(3)), Lookup::Coalesced));
    }

    #[tokio::test]
    async fn size_is_bounded() {
        let cache = VerdictCache::new(10, ttl);
        for i in 0..50u32 {
            cache.get_or_verify(i, move |_| async move { Ok(i) }).await;
        }
        assert!(cache.len() <= 10, "{}", cache.len());
        let (_, lookup) = cache.get_or_verify(49, |_| async { Ok(0) }).await;
        assert_eq!(lookup, Lookup::Hit, "the newest entries stay");
    }
}
