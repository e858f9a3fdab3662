//! A transform's durable keyed state: `get`, `put` and `delete`, scoped to
//! the input partition being transformed. On the broker every change goes,
//! with the transform's progress, to the compacted changelog topic
//! `<plugin>-state`, and the store is rebuilt from it after a restart or a
//! failover, so a running total or the last value seen per key survives
//! both. A transform that calls these has a state store; one that never
//! does, has none.
//!
//! Keys starting with the byte 0x00 are the host's own. Natively (plugin
//! unit tests) the store is a map of this thread's, emptied by
//! [`crate::testing::clear_state`].

use crate::Error;

/// The value stored under `key`, if any.
pub fn get(key: &[u8]) -> Option<Vec<u8>> {
    imp::get(key)
}

/// Stores `value` under `key`. Fails for a reserved key or when the store
/// would outgrow the broker's cap (`state.max.bytes`).
pub fn put(key: &[u8], value: &[u8]) -> Result<(), Error> {
    imp::put(key, value).map_err(Error::new)
}

/// Removes `key` (a tombstone in the changelog).
pub fn delete(key: &[u8]) {
    imp::delete(key)
}

#[cfg(all(target_arch = "wasm32", feature = "transform"))]
mod imp {
    use crate::__wasm::quiver::plugin::state;

    pub fn get(key: &[u8]) -> Option<Vec<u8>> {
        state::get(key)
    }

    pub fn put(key: &[u8], value: &[u8]) -> Result<(), String> {
        state::put(key, value)
    }

    pub fn delete(key: &[u8]) {
        state::delete(key)
    }
}

#[cfg(all(target_arch = "wasm32", not(feature = "transform")))]
mod imp {
    const NONE: &str = "only transforms have a state store";

    pub fn get(_: &[u8]) -> Option<Vec<u8>> {
        None
    }

    pub fn put(_: &[u8], _: &[u8]) -> Result<(), String> {
        Err(NONE.into())
    }

    pub fn delete(_: &[u8]) {}
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod imp {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    thread_local! {
        static STORE: RefCell<BTreeMap<Vec<u8>, Vec<u8>>> = const { RefCell::new(BTreeMap::new()) };
    }

    pub fn get(key: &[u8]) -> Option<Vec<u8>> {
        STORE.with(|s| s.borrow().get(key).cloned())
    }

    pub fn put(key: &[u8], value: &[u8]) -> Result<(), String> {
        if key.first() == Some(&0) {
            return Err("state keys starting with the byte 0x00 are reserved for the host".into());
        }
        STORE.with(|s| s.borrow_mut().insert(key.to_vec(), value.to_vec()));
        Ok(())
    }

    pub fn delete(key: &[u8]) {
        STORE.with(|s| s.borrow_mut().remove(key));
    }

    pub fn snapshot() -> BTreeMap<Vec<u8>, Vec<u8>> {
        STORE.with(|s| s.borrow().clone())
    }

    pub fn clear() {
        STORE.with(|s| s.borrow_mut().clear());
    }
}
