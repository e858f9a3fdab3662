//! A group driven by simulated members on a virtual clock. Members do what
//! they are told at once (drop what is revoked, take what is given) and
//! report what they own; after every heartbeat the checker asserts that no
//! partition is owned by two members.

use std::collections::{BTreeMap, BTreeSet};

use quiver_groups::assignor::assignment_partitions;
use quiver_groups::*;

const SESSION: u64 = 45_000;

fn topics(counts: &[(&str, u32)]) -> BTreeMap<String, u32> {
    counts.iter().map(|(t, c)| (t.to_string(), *c)).collect()
}

fn subscription(names: &[&str]) -> Option<Subscription> {
    Some(Subscription::topics(names.iter().copied()))
}

/// A simulated consumer.
#[derive(Default, Clone)]
struct Client {
    id: MemberId,
    instance: Option<String>,
    epoch: i32,
    owned: Assignment,
}

struct Sim {
    group: Group,
    topics: BTreeMap<String, u32>,
    now: u64,
    clients: BTreeMap<String, Client>,
}

impl Sim {
    fn new(counts: &[(&str, u32)]) -> Sim {
        Sim { group: Group::new("g", GroupConfig::default()), topics: topics(counts), now: 0, clients: BTreeMap::new() }
    }

    fn join(&mut self, name: &str, instance: Option<&str>, subscribed: &[&str]) {
        let hb = Heartbeat {
            member_id: String::new(),
            instance_id: instance.map(str::to_owned),
            member_epoch: JOIN_EPOCH,
            subscription: subscription(subscribed),
            owned: Some(Assignment::new()),
        };
        let answer = self.group.heartbeat(self.now, hb, &self.topics).unwrap();
        let client = Client {
            id: answer.member_id,
            instance: instance.map(str::to_owned),
            epoch: answer.member_epoch,
            owned: answer.assignment,
        };
        self.clients.insert(name.to_owned(), client);
        self.check();
    }

    /// One heartbeat of `name`, acting on the answer.
    fn beat(&mut self, name: &str) -> Result<HeartbeatAnswer, GroupError> {
        let c = self.clients[name].clone();
        let hb = Heartbeat {
            member_id: c.id.clone(),
            instance_id: c.instance.clone(),
            member_epoch: c.epoch,
            subscription: None,
            owned: Some(c.owned.clone()),
        };
        let answer = self.group.heartbeat(self.now, hb, &self.topics)?;
        let c = self.clients.get_mut(name).unwrap();
        c.epoch = answer.member_epoch;
        c.owned = answer.assignment.clone();
        self.check();
        Ok(answer)
    }

    /// Every client heartbeats, `rounds` times, a second apart.
    fn settle(&mut self, rounds: usize) {
        for _ in 0..rounds {
            self.now += 1_000;
            let names: Vec<String> = self.clients.keys().cloned().collect();
            for n in names {
                self.beat(&n).unwrap();
            }
        }
    }

    /// No partition owned by two clients.
    fn check(&self) {
        let mut seen: BTreeMap<(String, u32), &str> = BTreeMap::new();
        for (name, c) in &self.clients {
            for tp in assignment_partitions(&c.owned) {
                if let Some(other) = seen.insert(tp.clone(), name) {
                    panic!("{tp:?} owned by {other} and {name}");
                }
            }
        }
    }

    fn count(&self, name: &str) -> usize {
        assignment_partitions(&self.clients[name].owned).count()
    }

    fn owned_total(&self) -> usize {
        self.clients.values().map(|c| assignment_partitions(&c.owned).count()).sum()
    }
}

#[test]
fn members_get_every_partition_once_and_a_join_revokes_before_it_assigns() {
    let mut sim = Sim::new(&[("t", 6)]);
    sim.join("a", None, &["t"]);
    assert_eq!(sim.count("a"), 6, "a lone member owns every partition");
    sim.join("b", None, &["t"]);
    // b gets nothing until a gave up its share.
    assert_eq!(sim.count("b"), 0);
    sim.settle(3);
    assert_eq!((sim.count("a"), sim.count("b")), (3, 3));
    let a_before = sim.clients["a"].owned.clone();
    sim.join("c", None, &["t"]);
    sim.settle(3);
    assert_eq!((sim.count("a"), sim.count("b"), sim.count("c")), (2, 2, 2));
    // Incremental: a kept two of the three it had.
    let kept = assignment_partitions(&sim.clients["a"].owned).filter(|tp| a_before["t"].contains(&tp.1)).count();
    assert_eq!(kept, 2);
    let epochs: BTreeSet<i32> = sim.clients.values().map(|c| c.epoch).collect();
    assert_eq!(epochs.len(), 1, "every member at the group's epoch once stable");
    assert_eq!(*epochs.first().unwrap(), sim.group.epoch());
}

#[test]
fn a_silent_member_is_fenced_after_its_session_and_its_partitions_move() {
    let mut sim = Sim::new(&[("t", 4)]);
    sim.join("a", None, &["t"]);
    sim.join("b", None, &["t"]);
    sim.settle(3);
    // b goes silent; a keeps heartbeating.
    let b = sim.clients.remove("b").unwrap();
    sim.now += SESSION - 1_000;
    sim.beat("a").unwrap();
    assert!(sim.group.tick(sim.now).is_empty(), "within its session");
    sim.now += 2_000;
    sim.beat("a").unwrap();
    let fenced = sim.group.tick(sim.now);
    assert_eq!(fenced.len(), 1);
    assert_eq!(fenced[0].member_id, b.id);
    sim.settle(2);
    assert_eq!(sim.count("a"), 4);
    // The fenced member learns it at its next heartbeat and cannot commit.
    let hb = Heartbeat {
        member_id: b.id.clone(),
        member_epoch: b.epoch,
        owned: Some(b.owned.clone()),
        ..Default::default()
    };
    assert!(matches!(sim.group.heartbeat(sim.now, hb, &sim.topics), Err(GroupError::UnknownMember(_))));
    let commit = sim.group.check_commit(&b.id, b.epoch, &[("t".into(), 0)]);
    assert!(matches!(commit, Err(CommitError::Member(GroupError::UnknownMember(_)))), "{commit:?}");
}

#[test]
fn a_static_member_back_within_its_session_gets_its_partitions_without_a_rebalance() {
    let mut sim = Sim::new(&[("t", 6)]);
    sim.join("a", Some("host-a"), &["t"]);
    sim.join("b", Some("host-b"), &["t"]);
    sim.settle(3);
    let (a_owned, epoch) = (sim.clients["a"].owned.clone(), sim.group.epoch());
    // a restarts: leaves with epoch -2, comes back with a fresh process.
    let a = sim.clients.remove("a").unwrap();
    let away = Heartbeat {
        member_id: a.id.clone(),
        instance_id: a.instance.clone(),
        member_epoch: STATIC_LEAVE_EPOCH,
        ..Default::default()
    };
    sim.group.heartbeat(sim.now, away, &sim.topics).unwrap();
    sim.now += 10_000;
    sim.beat("b").unwrap();
    assert!(sim.group.tick(sim.now).is_empty());
    assert_eq!(sim.count("b"), 3, "b gets nothing of a's while a is away");
    sim.join("a", Some("host-a"), &["t"]);
    assert_eq!(sim.clients["a"].owned, a_owned, "the same partitions, at once");
    assert_ne!(sim.clients["a"].id, a.id, "under a new member id");
    assert_eq!(sim.group.epoch(), epoch, "no rebalance");
}

#[test]
fn a_second_process_with_an_active_instance_id_is_refused() {
    let mut sim = Sim::new(&[("t", 2)]);
    sim.join("a", Some("host-a"), &["t"]);
    let hb = Heartbeat {
        instance_id: Some("host-a".into()),
        member_epoch: JOIN_EPOCH,
        subscription: subscription(&["t"]),
        ..Default::default()
    };
    assert_eq!(sim.group.heartbeat(sim.now, hb, &sim.topics), Err(GroupError::InstanceInUse("host-a".into())));
}

#[test]
fn a_member_that_does_not_revoke_in_time_is_fenced() {
    let mut sim = Sim::new(&[("t", 4)]);
    sim.join("a", None, &["t"]);
    sim.join("b", None, &["t"]);
    // a is asked to give up two partitions but keeps reporting all four.
    let a = sim.clients["a"].clone();
    let hb = Heartbeat {
        member_id: a.id.clone(),
        member_epoch: a.epoch,
        owned: Some(a.owned.clone()),
        ..Default::default()
    };
    let answer = sim.group.heartbeat(sim.now, hb.clone(), &sim.topics).unwrap();
    assert_eq!(assignment_partitions(&answer.assignment).count(), 2);
    assert_eq!(sim.group.member(&a.id).unwrap().state, MemberState::Revoking);
    // a stays in its session (heartbeats every 40 s) for longer than the
    // rebalance timeout (300 s), never letting go.
    for _ in 0..8 {
        sim.now += 40_000;
        sim.group.heartbeat(sim.now, hb.clone(), &sim.topics).unwrap();
        sim.beat("b").unwrap();
        assert_eq!(sim.count("b"), 0, "b never gets what a still holds");
    }
    let fenced = sim.group.tick(sim.now);
    assert_eq!(fenced.len(), 1);
    assert_eq!(fenced[0].member_id, a.id);
    assert!(fenced[0].reason.contains("rebalance timeout"), "{}", fenced[0].reason);
    sim.clients.remove("a");
    sim.settle(2);
    assert_eq!(sim.count("b"), 4);
}

#[test]
fn commits_come_from_the_owner_at_its_epoch() {
    let mut sim = Sim::new(&[("t", 2)]);
    sim.join("a", None, &["t"]);
    sim.join("b", None, &["t"]);
    sim.settle(3);
    let a = sim.clients["a"].clone();
    let mine = assignment_partitions(&a.owned).next().unwrap();
    let theirs = assignment_partitions(&sim.clients["b"].owned).next().unwrap();
    assert_eq!(sim.group.check_commit(&a.id, a.epoch, std::slice::from_ref(&mine)), Ok(()));
    assert!(matches!(sim.group.check_commit(&a.id, a.epoch, &[theirs]), Err(CommitError::NotOwned { .. })));
    assert!(matches!(
        sim.group.check_commit(&a.id, a.epoch - 1, std::slice::from_ref(&mine)),
        Err(CommitError::Member(GroupError::FencedEpoch { .. }))
    ));
    assert!(matches!(sim.group.check_commit("", -1, &[mine]), Err(CommitError::GroupActive(_))));
    assert_eq!(Group::new("empty", GroupConfig::default()).check_commit("", -1, &[("t".into(), 0)]), Ok(()));
}

#[test]
fn new_partitions_of_a_subscribed_topic_are_assigned() {
    let mut sim = Sim::new(&[("t", 2), ("other", 3)]);
    sim.join("a", None, &["t"]);
    sim.join("b", None, &["t"]);
    sim.settle(3);
    assert_eq!(sim.owned_total(), 2);
    let epoch = sim.group.epoch();
    sim.topics.insert("other".into(), 5);
    sim.settle(1);
    assert_eq!(sim.group.epoch(), epoch, "a topic nobody subscribes to does not matter");
    sim.topics.insert("t".into(), 6);
    sim.settle(3);
    assert_eq!((sim.count("a"), sim.count("b")), (3, 3));
}

#[test]
fn a_lost_answer_is_recovered_with_the_previous_epoch() {
    let mut sim = Sim::new(&[("t", 4)]);
    sim.join("a", None, &["t"]);
    sim.settle(1);
    let before = sim.clients["a"].clone();
    sim.join("b", None, &["t"]);
    sim.settle(3);
    // a's view from before: its previous epoch, owning a subset of what
    // the group gave it... only if that answer was the last it missed.
    let a = sim.group.member(&before.id).unwrap().clone();
    let stale = Heartbeat {
        member_id: a.id.clone(),
        member_epoch: a.previous_epoch,
        owned: Some(a.assigned.clone()),
        ..Default::default()
    };
    let answer = sim.group.heartbeat(sim.now, stale, &sim.topics).unwrap();
    assert_eq!(answer.member_epoch, a.epoch);
    // Owning more than it was given at an old epoch: fenced.
    let zombie = Heartbeat {
        member_id: a.id.clone(),
        member_epoch: a.previous_epoch,
        owned: Some(before.owned.clone()),
        ..Default::default()
    };
    assert!(matches!(sim.group.heartbeat(sim.now, zombie, &sim.topics), Err(GroupError::FencedEpoch { .. })));
}

#[test]
fn a_member_that_leaves_frees_its_partitions_at_once() {
    let mut sim = Sim::new(&[("t", 4)]);
    sim.join("a", None, &["t"]);
    sim.join("b", None, &["t"]);
    sim.settle(3);
    let b = sim.clients.remove("b").unwrap();
    let leave = Heartbeat { member_id: b.id.clone(), member_epoch: LEAVE_EPOCH, ..Default::default() };
    assert_eq!(sim.group.heartbeat(sim.now, leave, &sim.topics).unwrap().member_epoch, LEAVE_EPOCH);
    sim.settle(1);
    assert_eq!(sim.count("a"), 4);
}

/// The records the coordinator writes after each change, through JSON as
/// the offsets topic would carry them.
fn persist(log: &mut Vec<Record>, before: &BTreeMap<RecordKey, RecordValue>, group: &Group) {
    for record in changes(before, &group.records()) {
        let bytes = serde_json::to_vec(&record).unwrap();
        log.push(serde_json::from_slice(&bytes).unwrap());
    }
}

#[test]
fn a_new_coordinator_rebuilds_the_group_from_its_records_and_members_go_on() {
    let mut sim = Sim::new(&[("t", 6)]);
    let mut log = Vec::new();
    let mut before = BTreeMap::new();
    let mut step = |sim: &mut Sim, log: &mut Vec<Record>| {
        persist(log, &before, &sim.group);
        before = sim.group.records();
    };
    sim.join("a", Some("host-a"), &["t"]);
    step(&mut sim, &mut log);
    sim.join("b", None, &["t"]);
    step(&mut sim, &mut log);
    sim.now += 1_000;
    // a is told to revoke; the coordinator fails over before it confirms.
    sim.beat("a").unwrap();
    step(&mut sim, &mut log);
    let a = sim.clients["a"].clone();
    let mine = assignment_partitions(&a.owned).next().unwrap();
    let committed = Committed { offset: 42, metadata: "m".into(), at_ms: 7 };
    sim.group.commit(&a.id, a.epoch, vec![(mine.clone(), committed.clone())]).unwrap();
    step(&mut sim, &mut log);
    sim.join("c", None, &["t"]);
    step(&mut sim, &mut log);
    let c = sim.clients.remove("c").unwrap();
    let leave = Heartbeat { member_id: c.id, member_epoch: LEAVE_EPOCH, ..Default::default() };
    sim.group.heartbeat(sim.now, leave, &sim.topics).unwrap();
    step(&mut sim, &mut log);
    assert!(log.iter().any(|r| r.value.is_none()), "the member that left is a tombstone");

    let replayed = Group::replay("g", GroupConfig::default(), sim.now + 5_000, log);
    assert_eq!(replayed.records(), sim.group.records());
    assert_eq!(replayed.committed(&mine.0, mine.1), Some(&committed));
    // The members carry on against the new coordinator, and the group
    // settles as it would have.
    sim.group = replayed;
    sim.settle(4);
    assert_eq!((sim.count("a"), sim.count("b")), (3, 3));
}

#[test]
fn offsets_are_reset_only_in_an_empty_group() {
    let mut sim = Sim::new(&[("t", 2)]);
    sim.join("a", None, &["t"]);
    let at = Committed { offset: 0, metadata: String::new(), at_ms: 0 };
    let reset = vec![(("t".to_string(), 0), at)];
    assert!(matches!(sim.group.reset_offsets(reset.clone()), Err(CommitError::GroupActive(_))));
    let a = sim.clients.remove("a").unwrap();
    let leave = Heartbeat { member_id: a.id, member_epoch: LEAVE_EPOCH, ..Default::default() };
    sim.group.heartbeat(sim.now, leave, &sim.topics).unwrap();
    sim.group.reset_offsets(reset).unwrap();
    assert_eq!(sim.group.committed("t", 0).map(|c| c.offset), Some(0));
    sim.group.forget_topic("t");
    assert!(sim.group.offsets().is_empty());
}

#[test]
fn a_pattern_subscription_takes_matching_topics_including_new_ones() {
    let mut sim = Sim::new(&[("orders-eu", 2), ("orders-us", 2), ("payments", 4)]);
    let hb = Heartbeat {
        member_epoch: JOIN_EPOCH,
        subscription: Some(Subscription::pattern("orders-.*")),
        owned: Some(Assignment::new()),
        ..Default::default()
    };
    let answer = sim.group.heartbeat(sim.now, hb, &sim.topics).unwrap();
    let topics: Vec<&String> = answer.assignment.keys().collect();
    assert_eq!(topics, ["orders-eu", "orders-us"], "whole-name matches only, not payments");
    let client = Client { id: answer.member_id, instance: None, epoch: answer.member_epoch, owned: answer.assignment };
    sim.clients.insert("a".into(), client);
    // A topic created later that matches joins the subscription.
    sim.topics.insert("orders-apac".into(), 3);
    sim.topics.insert("xorders-1".into(), 3);
    sim.settle(1);
    assert_eq!(sim.count("a"), 7);
    assert!(!sim.clients["a"].owned.contains_key("xorders-1"));
}

#[test]
fn an_invalid_pattern_is_refused_at_join() {
    let mut sim = Sim::new(&[("t", 1)]);
    let hb = Heartbeat {
        member_epoch: JOIN_EPOCH,
        subscription: Some(Subscription::pattern("orders-(")),
        ..Default::default()
    };
    let err = sim.group.heartbeat(sim.now, hb, &sim.topics).unwrap_err();
    assert!(matches!(&err, GroupError::Invalid(m) if m.contains("orders-(")), "{err}");
    assert!(sim.group.is_empty());
}

#[test]
fn a_group_with_its_own_session_fences_on_its_own_clock_and_keeps_it_across_failover() {
    let mut sim = Sim::new(&[("t", 2)]);
    let shorter =
        GroupOverrides { session_timeout_ms: Some(3_000), heartbeat_interval_ms: Some(500), ..Default::default() };
    sim.group.set_overrides(shorter).unwrap();
    sim.join("a", None, &["t"]);
    sim.join("b", None, &["t"]);
    sim.settle(3);
    let answer = sim.group.heartbeat(
        sim.now,
        Heartbeat {
            member_id: sim.clients["a"].id.clone(),
            member_epoch: sim.clients["a"].epoch,
            owned: Some(sim.clients["a"].owned.clone()),
            ..Default::default()
        },
        &sim.topics,
    );
    assert_eq!(answer.unwrap().heartbeat_interval_ms, 500, "members are told the group's interval");
    // Replayed on a new coordinator, the group keeps its own timings.
    let replayed = Group::replay("g", GroupConfig::default(), sim.now, changes(&BTreeMap::new(), &sim.group.records()));
    assert_eq!(replayed.overrides(), shorter);
    assert_eq!(replayed.config().session_timeout_ms, 3_000);
    sim.group = replayed;
    // b goes silent: fenced after 3 s, not the broker's 45 s.
    sim.clients.remove("b");
    sim.now += 2_000;
    sim.beat("a").unwrap();
    assert!(sim.group.tick(sim.now).is_empty());
    sim.now += 1_500;
    sim.beat("a").unwrap();
    assert_eq!(sim.group.tick(sim.now).len(), 1);
    // Back to the defaults; nonsense is refused and changes nothing.
    let e = sim.group.set_overrides(GroupOverrides {
        session_timeout_ms: Some(100),
        heartbeat_interval_ms: None,
        ..Default::default()
    });
    assert!(e.unwrap_err().to_string().contains("must be longer than the heartbeat interval"));
    assert_eq!(sim.group.config().session_timeout_ms, 3_000);
    sim.group.set_overrides(GroupOverrides::default()).unwrap();
    assert_eq!(sim.group.config().session_timeout_ms, SESSION);
    assert!(!sim.group.records().contains_key(&RecordKey::Config));
}

#[test]
fn transactional_commits_wait_for_their_transaction_and_survive_replay() {
    let mut sim = Sim::new(&[("t", 2)]);
    sim.join("a", None, &["t"]);
    let a = sim.clients["a"].clone();
    let committed = |offset| Committed { offset, metadata: String::new(), at_ms: 1 };
    sim.group.commit(&a.id, a.epoch, vec![(("t".into(), 0), committed(5))]).unwrap();
    // Offsets in producer 7's transaction: not the group's yet.
    sim.group.commit_transactional(&a.id, a.epoch, 7, vec![(("t".into(), 0), committed(9))]).unwrap();
    assert_eq!(sim.group.committed("t", 0).unwrap().offset, 5);
    assert!(sim.group.has_pending("t", 0) && !sim.group.has_pending("t", 1));
    // A fenced member cannot commit in a transaction either.
    let fenced = sim.group.commit_transactional(&a.id, a.epoch + 1, 8, vec![(("t".into(), 1), committed(1))]);
    assert!(fenced.is_err());
    // The records carry the pending offsets: a new coordinator knows them.
    let records = sim.group.records();
    let log = records.into_iter().map(|(key, value)| Record { key, value: Some(value) });
    let mut replayed = Group::replay("g", GroupConfig::default(), 0, log);
    assert!(replayed.has_pending("t", 0));
    // An abort drops them; a commit makes them the group's.
    let mut aborted = replayed.clone();
    aborted.end_transaction(7, false);
    assert_eq!((aborted.committed("t", 0).unwrap().offset, aborted.has_pending("t", 0)), (5, false));
    replayed.end_transaction(7, true);
    assert_eq!((replayed.committed("t", 0).unwrap().offset, replayed.has_pending("t", 0)), (9, false));
    // A marker written again changes nothing.
    replayed.end_transaction(7, false);
    assert_eq!(replayed.committed("t", 0).unwrap().offset, 9);
}
