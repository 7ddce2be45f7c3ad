//! One async lock per key, for as long as someone holds or waits for it: the map keeps no
//! entry for a key nobody uses, so it does not grow with every key ever locked.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex as StdMutex};

use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::lock;

/// Async locks by key, pruned as their last user lets go.
pub(crate) struct KeyedLocks<K> {
    map: StdMutex<HashMap<K, Arc<Mutex<()>>>>,
}

/// Holds the lock of one key; dropping it unlocks, and forgets the key if nobody waits.
pub(crate) struct KeyedGuard<'a, K: Eq + Hash + Copy> {
    locks: &'a KeyedLocks<K>,
    key: K,
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Eq + Hash + Copy> Default for KeyedLocks<K> {
    fn default() -> Self {
        Self {
            map: StdMutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Copy> KeyedLocks<K> {
    fn entry(&self, key: K) -> Arc<Mutex<()>> {
        Arc::clone(lock(&self.map).entry(key).or_default())
    }

    /// Waits for `key`'s lock.
    pub(crate) async fn lock(&self, key: K) -> KeyedGuard<'_, K> {
        // A waiter holds a clone of the entry, so the holder's drop leaves it in the map.
        let guard = self.entry(key).lock_owned().await;
        KeyedGuard {
            locks: self,
            key,
            guard: Some(guard),
        }
    }

    /// `key`'s lock if it is free now.
    pub(crate) fn try_lock(&self, key: K) -> Option<KeyedGuard<'_, K>> {
        // On failure the entry is someone else's: its holder prunes it.
        let guard = self.entry(key).try_lock_owned().ok()?;
        Some(KeyedGuard {
            locks: self,
            key,
            guard: Some(guard),
        })
    }

    /// Whether someone holds `key`'s lock now.
    pub(crate) fn is_locked(&self, key: &K) -> bool {
        lock(&self.map)
            .get(key)
            .is_some_and(|m| m.try_lock().is_err())
    }

    /// Keys with an entry: held or waited for.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.map).len()
    }
}

impl<K: Eq + Hash + Copy> Drop for KeyedGuard<'_, K> {
    fn drop(&mut self) {
        // Unlock first, then look under the map's lock: nobody can take a new clone of the
        // entry meanwhile, so a count of one (the map's own) means nobody holds or waits.
        drop(self.guard.take());
        let mut map = lock(&self.locks.map);
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unused_key_leaves_no_entry() {
        let locks = KeyedLocks::<u32>::default();
        {
            let _a = locks.lock(1).await;
            assert!(locks.is_locked(&1));
            assert!(locks.try_lock(1).is_none());
            assert_eq!(locks.len(), 1);
        }
        assert!(!locks.is_locked(&1));
        assert_eq!(locks.len(), 0);
        drop(locks.try_lock(2).expect("free"));
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn a_waiter_keeps_the_entry_and_gets_the_lock() {
        let locks = Arc::new(KeyedLocks::<u32>::default());
        let first = locks.lock(7).await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let waiter = {
            let locks = Arc::clone(&locks);
            tokio::spawn(async move {
                let _g = locks.lock(7).await;
                let _ = tx.send(());
            })
        };
        // Let the waiter clone the entry and queue.
        while Arc::strong_count(&lock(&locks.map)[&7]) < 3 {
            tokio::task::yield_now().await;
        }
        drop(first);
        assert_eq!(locks.len(), 1, "the waiter still needs it");
        rx.await.unwrap();
        waiter.await.unwrap();
        assert_eq!(locks.len(), 0);
    }
}
