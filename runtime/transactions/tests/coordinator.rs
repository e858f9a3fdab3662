//! The transaction coordinator's rules on a virtual clock: ids and epochs,
//! fencing of older instances, the epoch bump at every end, retried ends,
//! timeouts, a takeover finishing half-done ends, and replay.

use proptest::prelude::*;
use quiver_transactions::*;

/// A coordinator that stores every decision at once, as the broker does
/// once a record is acknowledged; it keeps the records for a replay.
struct Harness {
    c: Coordinator,
    records: Vec<Transaction>,
    next_id: i64,
}

impl Harness {
    fn new() -> Self {
        Harness { c: Coordinator::new(TxnConfig::default()), records: Vec::new(), next_id: 1000 }
    }

    fn store(&mut self, t: Transaction) {
        self.records.push(t.clone());
        self.c.apply(t);
    }

    fn init(&mut self, id: &str, now: u64) -> Result<(i64, i16), TxnError> {
        let mut next = self.next_id;
        let decided = self.c.init(id, 60_000, now, &mut || {
            next += 1;
            next
        });
        self.next_id = next;
        match decided? {
            Init::Ready(t) => {
                let answer = (t.producer_id, t.producer_epoch);
                self.store(t);
                Ok(answer)
            }
            Init::AbortFirst(t, _markers) => {
                self.store(t);
                let done = self.c.complete(id, now).unwrap();
                self.store(done);
                Err(TxnError::Concurrent(id.into()))
            }
        }
    }

    fn add(&mut self, id: &str, (p, e): (i64, i16), tp: (&str, u32), now: u64) -> Result<(), TxnError> {
        if let Some(t) = self.c.add(id, p, e, &[(tp.0.to_owned(), tp.1)], &[], now)? {
            self.store(t);
        }
        Ok(())
    }

    /// Ends the transaction; returns the producer's next id and epoch and
    /// the markers written (if any).
    fn end(
        &mut self,
        id: &str,
        (p, e): (i64, i16),
        commit: bool,
        now: u64,
    ) -> Result<((i64, i16), Option<Markers>), TxnError> {
        let mut next = self.next_id;
        let decided = self.c.end(id, p, e, commit, now, &mut || {
            next += 1;
            next
        });
        self.next_id = next;
        match decided? {
            End::Prepare(t, markers) => {
                self.store(t);
                let done = self.c.complete(id, now).unwrap();
                let answer = (done.producer_id, done.producer_epoch);
                self.store(done);
                Ok((answer, Some(markers)))
            }
            End::Empty(t) => {
                let answer = (t.producer_id, t.producer_epoch);
                self.store(t);
                Ok((answer, None))
            }
            End::AlreadyDone { producer_id, producer_epoch } => Ok(((producer_id, producer_epoch), None)),
        }
    }
}

#[test]
fn init_gives_an_id_and_a_new_epoch_that_fences_the_older_instance() {
    let mut h = Harness::new();
    let a = h.init("tx", 0).unwrap();
    assert_eq!(a, (1001, 0));
    h.add("tx", a, ("t", 0), 1).unwrap();
    // A second instance: the open transaction is aborted first (the
    // producer retries), then it gets the next epoch.
    assert!(matches!(h.init("tx", 2), Err(TxnError::Concurrent(_))));
    let b = h.init("tx", 3).unwrap();
    assert_eq!(b.0, 1001);
    assert!(b.1 > a.1 + 1, "the abort and the init each bumped the epoch: {b:?}");
    let fenced = h.add("tx", a, ("t", 1), 4).unwrap_err();
    assert!(matches!(fenced, TxnError::ProducerFenced { .. }) && fenced.is_fatal(), "{fenced}");
    assert!(matches!(h.end("tx", a, true, 5), Err(TxnError::ProducerFenced { .. })));
    h.add("tx", b, ("t", 1), 6).unwrap();
    assert_eq!(h.c.get("tx").unwrap().state, TxnState::Ongoing);
}

#[test]
fn every_end_bumps_the_epoch_and_its_markers_fence_the_transactions_writes() {
    let mut h = Harness::new();
    let p = h.init("tx", 0).unwrap();
    h.add("tx", p, ("a", 0), 1).unwrap();
    h.add("tx", p, ("b", 2), 2).unwrap();
    h.add("tx", p, ("a", 0), 3).unwrap();
    assert_eq!(h.c.verify("tx", p.0, p.1, &("b".into(), 2)), Ok(()));
    assert!(h.c.verify("tx", p.0, p.1, &("c".into(), 0)).is_err(), "a partition never added");
    let (next, markers) = h.end("tx", p, true, 4).unwrap();
    let markers = markers.unwrap();
    assert!(markers.commit);
    assert_eq!(markers.partitions, vec![("a".into(), 0), ("b".into(), 2)]);
    assert_eq!((markers.producer_id, markers.producer_epoch), (p.0, p.1 + 1));
    assert_eq!(next, (p.0, p.1 + 1));
    assert_eq!(h.c.get("tx").unwrap().state, TxnState::CompleteCommit);
    // A late write of the ended transaction, or a late add, is fenced.
    assert!(matches!(h.c.verify("tx", p.0, p.1, &("a".into(), 0)), Err(TxnError::ProducerFenced { .. })));
    assert!(matches!(h.add("tx", p, ("a", 0), 5), Err(TxnError::ProducerFenced { .. })));
    // The next transaction, with the new epoch, begins afresh.
    h.add("tx", next, ("c", 0), 6).unwrap();
    let t = h.c.get("tx").unwrap();
    assert_eq!((t.state, t.partitions.len(), t.started_ms), (TxnState::Ongoing, 1, 6));
}

#[test]
fn a_retried_end_is_answered_again_and_never_ends_the_next_transaction() {
    let mut h = Harness::new();
    let p = h.init("tx", 0).unwrap();
    h.add("tx", p, ("a", 0), 1).unwrap();
    let (next, _) = h.end("tx", p, true, 2).unwrap();
    // The answer was lost; the producer sends the same commit again.
    assert_eq!(h.end("tx", p, true, 3).unwrap(), (next, None));
    // An abort from that epoch is not the end that happened.
    assert!(matches!(h.end("tx", p, false, 3), Err(TxnError::InvalidState { .. })));
    // Once the next transaction began, a late end from the old epoch cannot
    // touch it.
    h.add("tx", next, ("a", 1), 4).unwrap();
    assert!(matches!(h.end("tx", p, true, 5), Err(TxnError::ProducerFenced { .. })));
    assert_eq!(h.c.get("tx").unwrap().state, TxnState::Ongoing);
    assert!(matches!(h.end("tx", (p.0, p.1 - 1), true, 5), Err(TxnError::ProducerFenced { .. })));
}

#[test]
fn an_end_while_markers_are_written_is_retried_later() {
    let mut h = Harness::new();
    let p = h.init("tx", 0).unwrap();
    h.add("tx", p, ("a", 0), 1).unwrap();
    let End::Prepare(t, _) = h.c.end("tx", p.0, p.1, false, 2, &mut || unreachable!()).unwrap() else { panic!() };
    let next = (t.producer_id, t.producer_epoch);
    h.store(t);
    let busy = h.c.add("tx", next.0, next.1, &[("a".into(), 0)], &[], 3).unwrap_err();
    assert!(busy.is_retriable(), "{busy}");
    assert!(matches!(h.c.end("tx", p.0, p.1, false, 3, &mut || 0), Err(TxnError::Concurrent(_))));
    assert!(matches!(h.init("tx", 3), Err(TxnError::Concurrent(_))));
    // A coordinator taking over now finds the markers still to write.
    let mut replayed = Coordinator::new(TxnConfig::default());
    for r in &h.records {
        replayed.apply(Transaction::decode(&r.encode()).unwrap());
    }
    assert_eq!(replayed.pending(3, 2), vec![], "decided at 2: not yet a second old at 3");
    let pending = replayed.pending(3, 0);
    assert_eq!(pending.len(), 1);
    assert!(!pending[0].commit);
    assert_eq!((pending[0].producer_id, pending[0].producer_epoch), (p.0, p.1 + 1));
    assert!(replayed.awaits_markers(&pending[0]));
    let done = replayed.complete("tx", 4).unwrap();
    assert_eq!(done.state, TxnState::CompleteAbort);
    // Once complete, the same markers are stale: written now, they would
    // end the producer's next transaction (same epoch).
    replayed.apply(done);
    assert!(!replayed.awaits_markers(&pending[0]));
    let next = (pending[0].producer_id, pending[0].producer_epoch);
    if let Some(t) = replayed.add("tx", next.0, next.1, &[("a".into(), 0)], &[], 5).unwrap() {
        replayed.apply(t);
    }
    assert!(!replayed.awaits_markers(&pending[0]), "the next transaction is ongoing, not preparing");
}

#[test]
fn an_abandoned_transaction_is_aborted_at_its_timeout_and_its_producer_fenced() {
    let mut h = Harness::new();
    let p = h.init("tx", 0).unwrap();
    h.add("tx", p, ("a", 0), 1_000).unwrap();
    assert!(h.c.timed_out(61_000, &mut || 0).is_empty(), "not before its 60 s");
    let timed_out = h.c.timed_out(61_001, &mut || 0);
    assert_eq!(timed_out.len(), 1);
    let (t, markers) = timed_out.into_iter().next().unwrap();
    assert!(!markers.commit && markers.partitions == vec![("a".into(), 0)]);
    h.store(t);
    let done = h.c.complete("tx", 61_002).unwrap();
    h.store(done);
    assert!(matches!(h.end("tx", p, true, 61_003), Err(TxnError::ProducerFenced { .. })));
    assert!(matches!(h.add("tx", p, ("a", 0), 61_003), Err(TxnError::ProducerFenced { .. })));
    // The producer starts over with init.
    let again = h.init("tx", 62_000).unwrap();
    assert!(again.1 > p.1);
}

#[test]
fn ends_without_writes_need_no_markers_and_bad_requests_are_refused() {
    let mut h = Harness::new();
    let p = h.init("tx", 0).unwrap();
    let (next, markers) = h.end("tx", p, true, 1).unwrap();
    assert_eq!((next, markers), ((p.0, p.1 + 1), None));
    assert!(matches!(h.c.add("nope", 1, 0, &[], &[], 2), Err(TxnError::Unknown(_))));
    assert!(matches!(h.c.add("tx", 999, next.1, &[], &[], 2), Err(TxnError::WrongProducer { .. })));
    let mut fresh = || 7;
    assert!(matches!(h.c.init("tx", 0, 2, &mut fresh), Err(TxnError::InvalidTimeout { .. })));
    assert!(matches!(h.c.init("tx", 16 * 60_000, 2, &mut fresh), Err(TxnError::InvalidTimeout { .. })));
    // Offsets of a group join a transaction like a partition.
    let t = h.c.add("tx", next.0, next.1, &[], &["g".into()], 3).unwrap().unwrap();
    assert_eq!((t.state, t.groups.len()), (TxnState::Ongoing, 1));
}

#[test]
fn an_exhausted_epoch_moves_the_producer_to_a_new_id() {
    let mut c = Coordinator::new(TxnConfig::default());
    let mut t = match c.init("tx", 1_000, 0, &mut || 5).unwrap() {
        Init::Ready(t) => t,
        other => panic!("{other:?}"),
    };
    t.producer_epoch = EPOCH_MAX;
    c.apply(t);
    c.apply(c.add("tx", 5, EPOCH_MAX, &[("a".into(), 0)], &[], 1).unwrap().unwrap());
    let End::Prepare(t, markers) = c.end("tx", 5, EPOCH_MAX, true, 2, &mut || 6).unwrap() else { panic!() };
    // The markers fence the old id's last epoch; the producer goes on as 6.
    assert_eq!((markers.producer_id, markers.producer_epoch), (5, i16::MAX));
    assert_eq!((t.producer_id, t.producer_epoch), (6, 0));
}

#[test]
fn idle_ids_expire_and_the_state_partition_is_kafkas() {
    let mut h = Harness::new();
    h.init("tx", 0).unwrap();
    let week = TxnConfig::default().id_expiration_ms;
    assert!(h.c.expired_ids(week).is_empty());
    assert_eq!(h.c.expired_ids(week + 1), vec!["tx".to_string()]);
    // Java's "tx".hashCode() = 116 * 31 + 120 = 3716; Kafka places it at
    // 3716 % 50.
    assert_eq!(state_partition("tx", 50), 16);
    assert!(state_partition("a-much-longer-transactional-id-Ω", 50) < 50);
}

#[derive(Debug, Clone)]
enum Op {
    Init(usize),
    Add(usize, u32),
    End(usize, bool),
    Tick(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3usize).prop_map(Op::Init),
        (0..3usize, 0..4u32).prop_map(|(i, p)| Op::Add(i, p)),
        (0..3usize, any::<bool>()).prop_map(|(i, c)| Op::End(i, c)),
        (1..40_000u64).prop_map(Op::Tick),
    ]
}

proptest! {
    /// Three instances of one producer, any interleaving of their calls
    /// and the clock: at most one instance's epoch is accepted at a time,
    /// it is the newest one handed out, every marker's epoch is above every
    /// epoch a write of its transaction was accepted with, and a replay of
    /// the stored records gives the same state.
    #[test]
    fn only_the_newest_instance_is_ever_accepted(ops in proptest::collection::vec(op(), 1..60)) {
        let mut h = Harness::new();
        let mut instances: Vec<Option<(i64, i16)>> = vec![None; 3];
        let mut newest: Option<(i64, i16)> = None;
        let mut accepted_in_txn: Vec<(i64, i16)> = Vec::new();
        let mut now = 0;
        for op in ops {
            match op {
                Op::Init(i) => {
                    if let Ok(p) = h.init("tx", now) {
                        prop_assert!(newest.is_none_or(|n| p != n));
                        instances[i] = Some(p);
                        newest = Some(p);
                        accepted_in_txn.clear();
                    }
                }
                Op::Add(i, part) => {
                    let Some(p) = instances[i] else { continue };
                    if h.add("tx", p, ("t", part), now).is_ok() {
                        let t = h.c.get("tx").unwrap();
                        prop_assert_eq!((t.producer_id, t.producer_epoch), p);
                        accepted_in_txn.push(p);
                    }
                }
                Op::End(i, commit) => {
                    let Some(p) = instances[i] else { continue };
                    if let Ok((next, markers)) = h.end("tx", p, commit, now) {
                        if let Some(m) = markers {
                            for (id, epoch) in &accepted_in_txn {
                                prop_assert!(m.producer_id == *id && m.producer_epoch > *epoch);
                            }
                        }
                        if Some(p) == newest {
                            instances[i] = Some(next);
                            newest = Some(next);
                        }
                        accepted_in_txn.clear();
                    }
                }
                Op::Tick(ms) => {
                    now += ms;
                    for (t, m) in h.c.timed_out(now, &mut || unreachable!("epochs are far from exhausted")) {
                        for (id, epoch) in &accepted_in_txn {
                            prop_assert!(m.producer_id == *id && m.producer_epoch > *epoch);
                        }
                        h.store(t);
                        let done = h.c.complete("tx", now).unwrap();
                        h.store(done);
                        accepted_in_txn.clear();
                    }
                }
            }
            // Only the current epoch is accepted.
            if let Some(t) = h.c.get("tx") {
                for p in instances.iter().flatten() {
                    let accepted = h.c.add("tx", p.0, p.1, &[], &[], now).is_ok();
                    prop_assert_eq!(accepted, (p.0, p.1) == (t.producer_id, t.producer_epoch));
                }
            }
        }
        let mut replayed = Coordinator::new(TxnConfig::default());
        for r in &h.records {
            replayed.apply(Transaction::decode(&r.encode()).unwrap());
        }
        prop_assert_eq!(replayed.get("tx"), h.c.get("tx"));
    }
}
