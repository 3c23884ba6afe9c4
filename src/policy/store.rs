//! The policies in force and the namespace labels their selectors need, shared between the
//! watchers that write them and the request path that reads them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use super::CompiledPolicy;

pub type Labels = BTreeMap<String, String>;

/// Readers take a cheap snapshot (`Arc` clone); writers swap whole sets, so a request never
/// sees a half-updated policy set.
#[derive(Debug, Default)]
pub struct PolicyStore {
    policies: RwLock<Arc<[CompiledPolicy]>>,
    namespaces: RwLock<HashMap<String, Arc<Labels>>>,
    ready: AtomicBool,
}

impl PolicyStore {
    /// A store whose policies are fixed (files or the built-in default): ready at once.
    pub fn fixed(policies: Vec<CompiledPolicy>) -> Self {
        let store = Self::default();
        store.replace_policies(policies);
        store.mark_ready();
        store
    }

    /// A store filled by watchers later; not ready until they have synced.
    pub fn pending() -> Self {
        Self::default()
    }

    pub fn policies(&self) -> Arc<[CompiledPolicy]> {
        self.policies
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn replace_policies(&self, mut policies: Vec<CompiledPolicy>) {
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        *self
            .policies
            .write()
            .unwrap_or_else(PoisonError::into_inner) = policies.into();
    }

    pub fn namespace_labels(&self, namespace: &str) -> Option<Arc<Labels>> {
        self.namespaces
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(namespace)
            .cloned()
    }

    pub fn set_namespace(&self, name: String, labels: Labels) {
        self.namespaces
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name, Arc::new(labels));
    }

    pub fn remove_namespace(&self, name: &str) {
        self.namespaces
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }

    pub fn replace_namespaces(&self, all: HashMap<String, Labels>) {
        let all = all.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        *self
            .namespaces
            .write()
            .unwrap_or_else(PoisonError::into_inner) = all;
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn mark_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_survive_replacement() {
        let store = PolicyStore::fixed(vec![crate::policy::builtin()]);
        assert!(store.is_ready());
        let before = store.policies();
        store.replace_policies(Vec::new());
        assert_eq!(before.len(), 1);
        assert!(store.policies().is_empty());
        assert!(!PolicyStore::pending().is_ready());
    }

    #[test]
    fn namespace_labels() {
        let store = PolicyStore::pending();
        assert!(store.namespace_labels("a").is_none());
        store.set_namespace("a".into(), Labels::from([("env".into(), "prod".into())]));
        assert_eq!(
            store
                .namespace_labels("a")
                .unwrap()
                .get("env")
                .map(String::as_str),
            Some("prod")
        );
        store.remove_namespace("a");
        assert!(store.namespace_labels("a").is_none());
    }
}
