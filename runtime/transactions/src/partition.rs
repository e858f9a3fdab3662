//! A partition's view of transactions, fed every batch the log appends (or
//! finds at recovery) in offset order: which producers have a transaction
//! open and from which offset, which transactions were aborted (their
//! offset range, for read_committed reads), and the last stable offset
//! (LSO) — below it every transaction is decided, so read_committed reads
//! stop there. No I/O.

use std::collections::BTreeMap;

/// An aborted transaction in this partition: its data lies in
/// `first_offset..=last_offset` (the abort marker's offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbortedTxn {
    pub producer_id: i64,
    pub first_offset: i64,
    pub last_offset: i64,
}

/// How a batch ended a transaction, if it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Committed { producer_id: i64, first_offset: i64 },
    Aborted(AbortedTxn),
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PartitionTxns {
    /// Producer id → first offset of its open transaction.
    open: BTreeMap<i64, i64>,
    /// Aborted transactions by marker offset.
    aborted: Vec<AbortedTxn>,
}

impl PartitionTxns {
    /// A batch of `producer_id` over `base_offset..=last_offset`:
    /// transactional data opens its producer's transaction (or continues
    /// it); a control batch with `commit` (`Some(true)` commit, `Some(false)`
    /// abort) ends it. Non-transactional batches change nothing.
    pub fn on_batch(
        &mut self,
        producer_id: i64,
        base_offset: i64,
        last_offset: i64,
        transactional: bool,
        marker: Option<bool>,
    ) -> Option<Ended> {
        match marker {
            None if transactional => {
                self.open.entry(producer_id).or_insert(base_offset);
                None
            }
            None => None,
            Some(commit) => {
                // A marker with no open transaction (a retried end, or one
                // written to a partition the transaction never reached):
                // nothing to end.
                let first_offset = self.open.remove(&producer_id)?;
                if commit {
                    return Some(Ended::Committed { producer_id, first_offset });
                }
                let aborted = AbortedTxn { producer_id, first_offset, last_offset };
                self.aborted.push(aborted);
                Some(Ended::Aborted(aborted))
            }
        }
    }

    /// The first offset a read_committed reader may not read yet: the
    /// oldest open transaction's first offset, never above the high
    /// watermark.
    pub fn last_stable_offset(&self, high_watermark: i64) -> i64 {
        self.open.values().copied().min().map_or(high_watermark, |first| first.min(high_watermark))
    }

    /// The aborted transactions with data in `from..to`: what a
    /// read_committed read of that range must be told to drop.
    pub fn aborted_overlapping(&self, from: i64, to: i64) -> Vec<AbortedTxn> {
        self.aborted.iter().filter(|a| a.first_offset < to && a.last_offset >= from).copied().collect()
    }

    /// The first offset of `producer_id`'s open transaction, if it has one.
    pub fn open_of(&self, producer_id: i64) -> Option<i64> {
        self.open.get(&producer_id).copied()
    }

    /// Open transactions: (producer id, first offset), oldest first.
    pub fn open(&self) -> Vec<(i64, i64)> {
        let mut open: Vec<_> = self.open.iter().map(|(p, f)| (*p, *f)).collect();
        open.sort_by_key(|&(_, first)| first);
        open
    }

    /// Every aborted transaction remembered, oldest marker first.
    pub fn aborted(&self) -> &[AbortedTxn] {
        &self.aborted
    }

    /// An aborted transaction read back from a snapshot.
    pub fn restore_aborted(&mut self, aborted: AbortedTxn) {
        self.aborted.push(aborted);
    }

    /// Forgets aborted transactions wholly below `log_start` (retention
    /// deleted their data and marker).
    pub fn trim(&mut self, log_start: i64) {
        self.aborted.retain(|a| a.last_offset >= log_start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lso_waits_for_the_oldest_open_transaction() {
        let mut p = PartitionTxns::default();
        assert_eq!(p.on_batch(-1, 0, 9, false, None), None);
        p.on_batch(1, 10, 19, true, None);
        p.on_batch(2, 20, 29, true, None);
        p.on_batch(1, 30, 39, true, None);
        assert_eq!(p.last_stable_offset(40), 10);
        assert_eq!(p.last_stable_offset(5), 5, "never above the high watermark");
        assert_eq!(
            p.on_batch(1, 40, 40, true, Some(true)),
            Some(Ended::Committed { producer_id: 1, first_offset: 10 })
        );
        assert_eq!(p.last_stable_offset(41), 20);
        let ended = p.on_batch(2, 41, 41, true, Some(false));
        assert_eq!(ended, Some(Ended::Aborted(AbortedTxn { producer_id: 2, first_offset: 20, last_offset: 41 })));
        assert_eq!(p.last_stable_offset(42), 42);
        assert_eq!(p.aborted_overlapping(0, 20), vec![]);
        assert_eq!(p.aborted_overlapping(25, 26).len(), 1);
        assert_eq!(p.aborted_overlapping(41, 50).len(), 1);
        assert_eq!(p.aborted_overlapping(42, 50), vec![]);
        // A marker without an open transaction ends nothing.
        assert_eq!(p.on_batch(3, 42, 42, true, Some(false)), None);
        p.trim(42);
        assert_eq!(p.aborted_overlapping(0, 100), vec![]);
    }
}
