//! A partition's view of transactions, fed every batch the log appends (or
//! finds at recovery) in offset order: which producers have a transaction
//! open and from which offset, which transactions were aborted (their
//! offset range, for read_committed reads), and the last stable offset
//! (LSO) — below it every transaction is decided, so read_committed reads
//! stop there. No I/O.

use std::collections::BTreeMap;

/// An aborted transaction in this partition: its data lies in
/// `first_offset..=last_offset` (the abort marker's offset).
/// `last_stable_offset` is the partition's LSO right after the marker: every
/// transaction aborted later started at or after it, which is what lets a
/// reader of the aborted-transaction index stop early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbortedTxn {
    pub producer_id: i64,
    pub first_offset: i64,
    pub last_offset: i64,
    pub last_stable_offset: i64,
}

/// How a batch ended a transaction, if it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Committed { producer_id: i64, first_offset: i64 },
    Aborted(AbortedTxn),
}

/// The open transactions of a partition. The aborted ones are kept by the
/// log, in each segment's index of the aborts whose marker it holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PartitionTxns {
    /// Producer id → first offset of its open transaction.
    open: BTreeMap<i64, i64>,
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
                let last_stable_offset = self.last_stable_offset(last_offset + 1);
                Some(Ended::Aborted(AbortedTxn { producer_id, first_offset, last_offset, last_stable_offset }))
            }
        }
    }

    /// The first offset a read_committed reader may not read yet: the
    /// oldest open transaction's first offset, never above the high
    /// watermark.
    pub fn last_stable_offset(&self, high_watermark: i64) -> i64 {
        self.open.values().copied().min().map_or(high_watermark, |first| first.min(high_watermark))
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
}

/// The aborted transactions with data in `from..to`, from aborts listed in
/// marker order (`aborts`: the segments' indexes one after another): what a
/// read_committed read of that range must be told to drop. Stops at the
/// first abort whose LSO reaches `to`: every later one started after it.
pub fn aborted_overlapping<'a>(
    aborts: impl IntoIterator<Item = &'a AbortedTxn>,
    from: i64,
    to: i64,
) -> Vec<AbortedTxn> {
    let mut found = Vec::new();
    for a in aborts {
        if a.first_offset < to && a.last_offset >= from {
            found.push(*a);
        }
        if a.last_stable_offset >= to {
            break;
        }
    }
    found
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
        let aborted = AbortedTxn { producer_id: 2, first_offset: 20, last_offset: 41, last_stable_offset: 42 };
        assert_eq!(ended, Some(Ended::Aborted(aborted)));
        assert_eq!(p.last_stable_offset(42), 42);
        // A marker without an open transaction ends nothing.
        assert_eq!(p.on_batch(3, 42, 42, true, Some(false)), None);
    }

    #[test]
    fn aborts_are_found_by_range_and_the_search_stops_at_their_lso() {
        let mut p = PartitionTxns::default();
        // 1 opens at 0 and stays open; 2 aborts over 10..=12, then 3 over 20..=30.
        p.on_batch(1, 0, 4, true, None);
        p.on_batch(2, 10, 11, true, None);
        let Some(Ended::Aborted(a2)) = p.on_batch(2, 12, 12, true, Some(false)) else { panic!() };
        assert_eq!(a2.last_stable_offset, 0, "1 is still open");
        p.on_batch(1, 13, 13, true, Some(true));
        p.on_batch(3, 20, 29, true, None);
        let Some(Ended::Aborted(a3)) = p.on_batch(3, 30, 30, true, Some(false)) else { panic!() };
        assert_eq!(a3.last_stable_offset, 31);
        let aborts = [a2, a3];
        assert_eq!(aborted_overlapping(&aborts, 0, 10), vec![]);
        assert_eq!(aborted_overlapping(&aborts, 0, 11), vec![a2]);
        assert_eq!(aborted_overlapping(&aborts, 12, 21), vec![a2, a3]);
        assert_eq!(aborted_overlapping(&aborts, 13, 100), vec![a3]);
        // The search stops at an abort whose LSO reaches the range's end,
        // even with later (wrongly placed) entries after it.
        let bogus = AbortedTxn { producer_id: 9, first_offset: 0, last_offset: 40, last_stable_offset: 41 };
        assert_eq!(aborted_overlapping(&[a2, a3, bogus], 13, 31), vec![a3]);
    }
}
