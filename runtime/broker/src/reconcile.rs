//! What a broker must change so that the replicas it holds match the
//! metadata image, decided without I/O: [`plan`] compares what is open here
//! with the image and lists [`Step`]s; `Broker::reconcile` (cluster.rs)
//! carries them out in order.
//!
//! The rules:
//! - a topic the image assigns here and that is not open is opened (with
//!   the partitions held here);
//! - only a `complete` image (caught up with the leader) removes anything or
//!   moves replicas: a stale one (a restart replaying the log) may lack a
//!   topic created meanwhile but never proves one deleted;
//! - a local topic whose image topic has another id (deleted and created
//!   again under its name) or no replica here any more is removed, then the
//!   new one opened;
//! - a reassignment changes which partitions of an open topic are held.

use std::collections::BTreeMap;

use quiver_controller::{ClusterImage, TopicImage};

/// A topic open on this broker, as `topics.json` records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Local {
    /// The metadata-log id of the topic it was opened for.
    pub(crate) id: Option<u64>,
    pub(crate) held: Option<Vec<u32>>,
}

/// One change, in the order the plan lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Close the topic's logs here and remove its files.
    Remove { name: String },
    /// Open or retire replicas of an open topic: afterwards it holds `held`.
    ChangeHeld { name: String, held: Vec<u32> },
    /// Open the replicas `held` of the image's topic `id`.
    Open { name: String, id: u64, partitions: u32, configs: Vec<(String, String)>, held: Vec<u32> },
}

/// The steps that make `local` (topic name → what is open) match `image`
/// for broker `me`.
pub(crate) fn plan(me: u32, local: &BTreeMap<String, Local>, image: &ClusterImage, complete: bool) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut removed = Vec::new();
    if complete {
        for (name, l) in local {
            let keep = image.topics.get(name).is_some_and(|t| Some(t.id) == l.id && !held(t, me).is_empty());
            if !keep {
                steps.push(Step::Remove { name: name.clone() });
                removed.push(name.as_str());
            }
        }
    }
    for (name, t) in &image.topics {
        let held = held(t, me);
        match local.get(name) {
            Some(l) if !removed.contains(&name.as_str()) => {
                if complete && l.id == Some(t.id) && l.held.as_ref() != Some(&held) {
                    steps.push(Step::ChangeHeld { name: name.clone(), held });
                }
            }
            _ if held.is_empty() => {}
            _ => steps.push(Step::Open {
                name: name.clone(),
                id: t.id,
                partitions: t.partitions.len() as u32,
                configs: t.configs.clone(),
                held,
            }),
        }
    }
    steps
}

/// The partitions of `t` that `node` holds a replica of.
fn held(t: &TopicImage, node: u32) -> Vec<u32> {
    t.partitions.iter().enumerate().filter(|(_, p)| p.replicas.contains(&node)).map(|(i, _)| i as u32).collect()
}

#[cfg(test)]
mod tests {
    use quiver_controller::PartitionImage;

    use super::*;

    fn topic(id: u64, replicas: &[&[u32]]) -> TopicImage {
        TopicImage {
            id,
            configs: vec![("retention.ms".into(), "1000".into())],
            partitions: replicas
                .iter()
                .map(|r| PartitionImage {
                    replicas: r.to_vec(),
                    isr: r.to_vec(),
                    leader: r.first().copied(),
                    leader_epoch: 0,
                    partition_epoch: 0,
                    target: None,
                    moving_from: None,
                })
                .collect(),
        }
    }

    fn image(topics: &[(&str, TopicImage)]) -> ClusterImage {
        ClusterImage { topics: topics.iter().map(|(n, t)| (n.to_string(), t.clone())).collect(), ..Default::default() }
    }

    fn local(topics: &[(&str, u64, &[u32])]) -> BTreeMap<String, Local> {
        topics.iter().map(|(n, id, held)| (n.to_string(), Local { id: Some(*id), held: Some(held.to_vec()) })).collect()
    }

    #[test]
    fn new_topics_open_with_the_partitions_held_here() {
        let image = image(&[("a", topic(5, &[&[1, 2], &[2, 3], &[3, 1]])), ("b", topic(6, &[&[2, 3]]))]);
        let steps = plan(1, &BTreeMap::new(), &image, false);
        let configs = vec![("retention.ms".to_string(), "1000".to_string())];
        assert_eq!(steps, [Step::Open { name: "a".into(), id: 5, partitions: 3, configs, held: vec![0, 2] }]);
    }

    #[test]
    fn a_stale_image_removes_and_moves_nothing() {
        let open = local(&[("gone", 1, &[0]), ("moved", 2, &[0]), ("recreated", 3, &[0])]);
        let image = image(&[("moved", topic(2, &[&[1], &[1]])), ("recreated", topic(9, &[&[1]]))]);
        assert_eq!(plan(1, &open, &image, false), []);
        assert_eq!(
            plan(1, &open, &image, true),
            [
                Step::Remove { name: "gone".into() },
                Step::Remove { name: "recreated".into() },
                Step::ChangeHeld { name: "moved".into(), held: vec![0, 1] },
                Step::Open {
                    name: "recreated".into(),
                    id: 9,
                    partitions: 1,
                    configs: vec![("retention.ms".into(), "1000".into())],
                    held: vec![0],
                },
            ]
        );
    }

    #[test]
    fn a_topic_whose_replicas_all_left_is_removed_and_a_matching_one_kept() {
        let open = local(&[("left", 4, &[0]), ("same", 5, &[0, 1])]);
        let image = image(&[("left", topic(4, &[&[2, 3]])), ("same", topic(5, &[&[1, 2], &[3, 1]]))]);
        assert_eq!(plan(1, &open, &image, true), [Step::Remove { name: "left".into() }]);
    }
}
