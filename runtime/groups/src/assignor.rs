//! Server-side assignors: from the members' subscriptions and the topics'
//! partition counts to a target assignment. Both give every partition that
//! some member subscribes to exactly one owner.
//!
//! - [`Assignor::Uniform`] (Kafka's default for KIP-848 groups): balanced
//!   counts, and sticky — a member keeps the partitions it was given before
//!   as long as it stays subscribed and within its share, so a join or a
//!   leave moves only what must move.
//! - [`Assignor::Range`]: per topic, contiguous ranges in member order (not
//!   sticky), for consumers that want co-partitioned topics side by side.

use std::collections::{BTreeMap, BTreeSet};

use crate::{Assignment, MemberId, TopicPartition};

/// Which server-side assignor a group uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Assignor {
    #[default]
    Uniform,
    Range,
}

impl Assignor {
    pub fn name(self) -> &'static str {
        match self {
            Assignor::Uniform => "uniform",
            Assignor::Range => "range",
        }
    }

    pub fn parse(name: &str) -> Result<Assignor, String> {
        match name {
            "uniform" => Ok(Assignor::Uniform),
            "range" => Ok(Assignor::Range),
            other => Err(format!("unknown assignor '{other}' (uniform, range)")),
        }
    }

    /// The target assignment of `members` (their subscribed topics) over
    /// `topics` (name → partition count), given the previous target
    /// (`previous`, for stickiness). Topics nobody subscribes to, or that do
    /// not exist, are left out.
    pub fn assign(
        self,
        members: &BTreeMap<MemberId, BTreeSet<String>>,
        topics: &BTreeMap<String, u32>,
        previous: &BTreeMap<MemberId, Assignment>,
    ) -> BTreeMap<MemberId, Assignment> {
        match self {
            Assignor::Uniform => uniform(members, topics, previous),
            Assignor::Range => range(members, topics),
        }
    }
}

/// Every partition of a subscribed topic, with the members that may own it.
fn eligible(
    members: &BTreeMap<MemberId, BTreeSet<String>>,
    topics: &BTreeMap<String, u32>,
) -> BTreeMap<TopicPartition, Vec<MemberId>> {
    let mut out = BTreeMap::new();
    for (topic, count) in topics {
        let subscribed: Vec<MemberId> =
            members.iter().filter(|(_, s)| s.contains(topic)).map(|(m, _)| m.clone()).collect();
        if subscribed.is_empty() {
            continue;
        }
        for p in 0..*count {
            out.insert((topic.clone(), p), subscribed.clone());
        }
    }
    out
}

fn uniform(
    members: &BTreeMap<MemberId, BTreeSet<String>>,
    topics: &BTreeMap<String, u32>,
    previous: &BTreeMap<MemberId, Assignment>,
) -> BTreeMap<MemberId, Assignment> {
    let eligible = eligible(members, topics);
    let mut owner: BTreeMap<TopicPartition, MemberId> = BTreeMap::new();
    let mut load: BTreeMap<MemberId, usize> = members.keys().map(|m| (m.clone(), 0)).collect();
    // A member's share: no more than an even split of what it may own
    // (rounded up), so stickiness never keeps a member above its share.
    let share = |m: &MemberId| -> usize {
        let mut total = 0.0;
        for candidates in eligible.values() {
            if candidates.contains(m) {
                total += 1.0 / candidates.len() as f64;
            }
        }
        total.ceil() as usize
    };
    let shares: BTreeMap<MemberId, usize> = members.keys().map(|m| (m.clone(), share(m))).collect();
    // Sticky: keep what the previous target gave, within the share.
    for (m, assigned) in previous {
        let Some(limit) = shares.get(m) else { continue };
        for tp in assignment_partitions(assigned) {
            let still = eligible.get(&tp).is_some_and(|c| c.contains(m));
            if still && !owner.contains_key(&tp) && load[m] < *limit {
                owner.insert(tp, m.clone());
                *load.get_mut(m).expect("member") += 1;
            }
        }
    }
    // The rest to the least loaded member that may own it.
    for (tp, candidates) in &eligible {
        if owner.contains_key(tp) {
            continue;
        }
        let m = candidates.iter().min_by_key(|m| (load[*m], (*m).clone())).expect("a subscribed member");
        owner.insert(tp.clone(), m.clone());
        *load.get_mut(m).expect("member") += 1;
    }
    // Even out: move a partition from a member with two more than another
    // that may own it, until none can move (each move lowers the spread).
    loop {
        let mut moved = false;
        for (tp, candidates) in &eligible {
            let from = owner[tp].clone();
            let to = candidates.iter().filter(|c| **c != from).min_by_key(|c| (load[*c], (*c).clone()));
            if let Some(to) = to
                && load[to] + 1 < load[&from]
            {
                owner.insert(tp.clone(), to.clone());
                *load.get_mut(&from).expect("member") -= 1;
                *load.get_mut(to).expect("member") += 1;
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    collect(members, owner)
}

fn range(
    members: &BTreeMap<MemberId, BTreeSet<String>>,
    topics: &BTreeMap<String, u32>,
) -> BTreeMap<MemberId, Assignment> {
    let mut owner = BTreeMap::new();
    for (topic, count) in topics {
        let subscribed: Vec<&MemberId> = members.iter().filter(|(_, s)| s.contains(topic)).map(|(m, _)| m).collect();
        if subscribed.is_empty() {
            continue;
        }
        let (each, extra) = (*count as usize / subscribed.len(), *count as usize % subscribed.len());
        let mut next = 0u32;
        for (i, m) in subscribed.iter().enumerate() {
            let n = each + usize::from(i < extra);
            for p in next..next + n as u32 {
                owner.insert((topic.clone(), p), (*m).clone());
            }
            next += n as u32;
        }
    }
    collect(members, owner)
}

fn collect(
    members: &BTreeMap<MemberId, BTreeSet<String>>,
    owner: BTreeMap<TopicPartition, MemberId>,
) -> BTreeMap<MemberId, Assignment> {
    let mut out: BTreeMap<MemberId, Assignment> = members.keys().map(|m| (m.clone(), Assignment::new())).collect();
    for ((topic, p), m) in owner {
        out.get_mut(&m).expect("member").entry(topic).or_default().insert(p);
    }
    out
}

/// The topic-partitions of an assignment.
pub fn assignment_partitions(a: &Assignment) -> impl Iterator<Item = TopicPartition> + '_ {
    a.iter().flat_map(|(t, ps)| ps.iter().map(move |p| (t.clone(), *p)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn subs(members: &[(&str, &[&str])]) -> BTreeMap<MemberId, BTreeSet<String>> {
        members.iter().map(|(m, ts)| (m.to_string(), ts.iter().map(|t| t.to_string()).collect())).collect()
    }

    fn counts(a: &BTreeMap<MemberId, Assignment>) -> BTreeMap<&str, usize> {
        a.iter().map(|(m, x)| (m.as_str(), assignment_partitions(x).count())).collect()
    }

    fn owners(a: &BTreeMap<MemberId, Assignment>) -> BTreeMap<TopicPartition, Vec<MemberId>> {
        let mut out: BTreeMap<TopicPartition, Vec<MemberId>> = BTreeMap::new();
        for (m, x) in a {
            for tp in assignment_partitions(x) {
                out.entry(tp).or_default().push(m.clone());
            }
        }
        out
    }

    #[test]
    fn uniform_balances_and_a_join_moves_only_what_it_must() {
        let topics = BTreeMap::from([("t".to_string(), 6)]);
        let two = subs(&[("a", &["t"]), ("b", &["t"])]);
        let first = Assignor::Uniform.assign(&two, &topics, &BTreeMap::new());
        assert_eq!(counts(&first), BTreeMap::from([("a", 3), ("b", 3)]));
        let three = subs(&[("a", &["t"]), ("b", &["t"]), ("c", &["t"])]);
        let second = Assignor::Uniform.assign(&three, &topics, &first);
        assert_eq!(counts(&second), BTreeMap::from([("a", 2), ("b", 2), ("c", 2)]));
        // a and b each gave up one partition and kept the rest.
        for m in ["a", "b"] {
            let kept = assignment_partitions(&second[m]).filter(|tp| first[m]["t"].contains(&tp.1)).count();
            assert_eq!(kept, 2, "{m}: {first:?} -> {second:?}");
        }
    }

    #[test]
    fn uniform_gives_a_topic_only_to_its_subscribers() {
        let topics = BTreeMap::from([("x".to_string(), 4), ("y".to_string(), 2), ("z".to_string(), 3)]);
        let members = subs(&[("a", &["x", "y"]), ("b", &["x"]), ("c", &["y"])]);
        let a = Assignor::Uniform.assign(&members, &topics, &BTreeMap::new());
        assert!(!a["b"].contains_key("y") && !a["c"].contains_key("x"), "{a:?}");
        // z has no subscriber; every other partition one owner.
        assert_eq!(owners(&a).len(), 6);
        assert_eq!(counts(&a), BTreeMap::from([("a", 2), ("b", 2), ("c", 2)]));
    }

    #[test]
    fn range_gives_contiguous_ranges_in_member_order() {
        let topics = BTreeMap::from([("t".to_string(), 7)]);
        let members = subs(&[("a", &["t"]), ("b", &["t"]), ("c", &["t"])]);
        let a = Assignor::Range.assign(&members, &topics, &BTreeMap::new());
        let ranges: Vec<Vec<u32>> = ["a", "b", "c"].iter().map(|m| a[*m]["t"].iter().copied().collect()).collect();
        assert_eq!(ranges, vec![vec![0, 1, 2], vec![3, 4], vec![5, 6]]);
    }

    proptest! {
        /// Whatever the subscriptions and the previous target: each
        /// subscribed partition has exactly one owner, subscribed to its
        /// topic; with identical subscriptions the counts differ by at most one.
        #[test]
        fn uniform_invariants(
            n_members in 1usize..6,
            partitions in proptest::collection::vec(1u32..9, 1..4),
            pattern in proptest::collection::vec(any::<u8>(), 6),
            same in any::<bool>(),
            seed_previous in any::<bool>(),
        ) {
            let topics: BTreeMap<String, u32> =
                partitions.iter().enumerate().map(|(i, c)| (format!("t{i}"), *c)).collect();
            let names: Vec<String> = topics.keys().cloned().collect();
            let members: BTreeMap<MemberId, BTreeSet<String>> = (0..n_members)
                .map(|i| {
                    let chosen: BTreeSet<String> = if same {
                        names.iter().cloned().collect()
                    } else {
                        names.iter().enumerate().filter(|(j, _)| pattern[i] >> j & 1 == 1).map(|(_, t)| t.clone()).collect()
                    };
                    (format!("m{i}"), chosen)
                })
                .collect();
            let previous = if seed_previous {
                Assignor::Range.assign(&members, &topics, &BTreeMap::new())
            } else {
                BTreeMap::new()
            };
            let a = Assignor::Uniform.assign(&members, &topics, &previous);
            let owners = owners(&a);
            for ((t, p), who) in &owners {
                prop_assert_eq!(who.len(), 1, "{}-{} owned by {:?}", t, p, who);
                prop_assert!(members[&who[0]].contains(t));
            }
            let subscribed: usize = topics.iter().filter(|(t, _)| members.values().any(|s| s.contains(*t))).map(|(_, c)| *c as usize).sum();
            prop_assert_eq!(owners.len(), subscribed);
            if same {
                let c = counts(&a);
                let (lo, hi) = (c.values().min().unwrap(), c.values().max().unwrap());
                prop_assert!(hi - lo <= 1, "{:?}", c);
            }
        }
    }
}
