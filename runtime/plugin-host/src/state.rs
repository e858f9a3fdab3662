//! A transform's keyed state store (the WIT `state` interface), as the host
//! keeps it for one input partition: a map the plugin reads and writes
//! through host calls, the set of keys changed since the owner last took
//! them (what goes to the changelog), and an undo log so that a call that
//! failed halfway leaves nothing behind. No I/O: the broker writes the
//! changes to `<plugin>-state` and rebuilds the store from it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

/// Keys starting with this byte are the host's own (the changelog's progress
/// record); a plugin cannot write them.
pub const RESERVED_KEY_PREFIX: u8 = 0;

/// What one stored entry costs against the cap besides its key and value.
const ENTRY_OVERHEAD: usize = 48;

/// A store shared by a partition's task and whichever instance serves it
/// (an instance replaced after a trap keeps the same store).
pub type SharedState = Arc<Mutex<StateStore>>;

#[derive(Debug)]
pub struct StateStore {
    map: HashMap<Vec<u8>, Vec<u8>>,
    /// Keys written since [`StateStore::take_changes`].
    dirty: BTreeSet<Vec<u8>>,
    /// Each write's key and previous value, since the last take.
    undo: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    bytes: usize,
    max_bytes: usize,
}

/// A point to roll back to ([`StateStore::mark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark(usize);

impl StateStore {
    /// An empty store holding at most `max_bytes` of keys, values and
    /// per-entry overhead.
    pub fn new(max_bytes: usize) -> Self {
        StateStore { map: HashMap::new(), dirty: BTreeSet::new(), undo: Vec::new(), bytes: 0, max_bytes }
    }

    pub fn shared(max_bytes: usize) -> SharedState {
        Arc::new(Mutex::new(StateStore::new(max_bytes)))
    }

    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.map.get(key).map(Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes counted against the cap.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A plugin's write: refused for a reserved key or past the cap.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        if key.first() == Some(&RESERVED_KEY_PREFIX) {
            return Err("state keys starting with the byte 0x00 are reserved for the host".into());
        }
        let old = self.map.get(key).map_or(0, |v| cost(key, v));
        let after = self.bytes - old + cost(key, value);
        if after > self.max_bytes {
            return Err(format!(
                "the state store is full: {after} bytes with this value, the cap is {} (state.max.bytes)",
                self.max_bytes
            ));
        }
        let previous = self.map.insert(key.to_vec(), value.to_vec());
        self.bytes = after;
        self.wrote(key, previous);
        Ok(())
    }

    pub fn delete(&mut self, key: &[u8]) {
        if let Some(previous) = self.map.remove(key) {
            self.bytes -= cost(key, &previous);
            self.wrote(key, Some(previous));
        }
    }

    fn wrote(&mut self, key: &[u8], previous: Option<Vec<u8>>) {
        self.dirty.insert(key.to_vec());
        self.undo.push((key.to_vec(), previous));
    }

    /// Where the store is now, to [`rollback`](Self::rollback) to.
    pub fn mark(&self) -> Mark {
        Mark(self.undo.len())
    }

    /// Undoes every write since `mark` (a failed call's).
    pub fn rollback(&mut self, mark: Mark) {
        while self.undo.len() > mark.0 {
            let (key, previous) = self.undo.pop().expect("checked");
            if let Some(v) = self.map.remove(&key) {
                self.bytes -= cost(&key, &v);
            }
            if let Some(v) = previous {
                self.bytes += cost(&key, &v);
                self.map.insert(key, v);
            }
        }
    }

    /// The changes since the last take, each key once with its value now
    /// (`None`: deleted), in key order; from here on they are the
    /// changelog's and cannot be rolled back.
    pub fn take_changes(&mut self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        self.undo.clear();
        std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|k| {
                let v = self.map.get(&k).cloned();
                (k, v)
            })
            .collect()
    }

    /// Empties the store (before a rebuild from the changelog).
    pub fn clear(&mut self) {
        self.map.clear();
        self.dirty.clear();
        self.undo.clear();
        self.bytes = 0;
    }

    /// Applies one changelog record while rebuilding: not a change, and not
    /// held to the cap (what was stored once is restored whatever the cap is
    /// now; the next write is refused if it is over).
    pub fn restore(&mut self, key: &[u8], value: Option<&[u8]>) {
        if let Some(v) = self.map.remove(key) {
            self.bytes -= cost(key, &v);
        }
        if let Some(v) = value {
            self.bytes += cost(key, v);
            self.map.insert(key.to_vec(), v.to_vec());
        }
    }
}

fn cost(key: &[u8], value: &[u8]) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_see_writes_and_changes_are_the_latest_value_per_key() {
        let mut s = StateStore::new(1 << 20);
        s.put(b"a", b"1").unwrap();
        s.put(b"b", b"2").unwrap();
        s.put(b"a", b"3").unwrap();
        s.delete(b"b");
        s.delete(b"never");
        assert_eq!(s.get(b"a"), Some(&b"3"[..]));
        assert_eq!(s.get(b"b"), None);
        assert_eq!(s.take_changes(), vec![(b"a".to_vec(), Some(b"3".to_vec())), (b"b".to_vec(), None)]);
        assert!(s.take_changes().is_empty());
        assert_eq!(s.bytes(), 1 + 1 + ENTRY_OVERHEAD);
    }

    #[test]
    fn rollback_undoes_only_what_came_after_the_mark() {
        let mut s = StateStore::new(1 << 20);
        s.put(b"a", b"1").unwrap();
        let mark = s.mark();
        s.put(b"a", b"22").unwrap();
        s.put(b"c", b"3").unwrap();
        s.delete(b"a");
        s.rollback(mark);
        assert_eq!(s.get(b"a"), Some(&b"1"[..]));
        assert_eq!(s.get(b"c"), None);
        assert_eq!(s.len(), 1);
        assert_eq!(s.bytes(), 2 + ENTRY_OVERHEAD);
        // The keys touched stay in the changes, with their values now.
        let changes = s.take_changes();
        assert!(changes.contains(&(b"a".to_vec(), Some(b"1".to_vec()))));
        assert!(changes.contains(&(b"c".to_vec(), None)));
    }

    #[test]
    fn the_cap_and_reserved_keys_refuse_writes_and_change_nothing() {
        let mut s = StateStore::new(2 * (ENTRY_OVERHEAD + 2));
        s.put(b"a", b"1").unwrap();
        s.put(b"b", b"2").unwrap();
        let full = s.put(b"c", b"3").unwrap_err();
        assert!(full.contains("state store is full"), "{full}");
        // Replacing a value with one of the same size still fits.
        s.put(b"a", b"9").unwrap();
        assert!(s.put(b"\0progress", b"1").unwrap_err().contains("reserved"));
        assert_eq!(s.len(), 2);
        // Restoring is not held to the cap.
        s.restore(b"c", Some(b"3"));
        s.restore(b"a", None);
        assert_eq!((s.len(), s.get(b"c")), (2, Some(&b"3"[..])));
        assert!(s.take_changes().iter().all(|(k, _)| k != b"c"));
    }
}
