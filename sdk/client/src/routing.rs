//! Finding partition leaders in a cluster: a metadata cache and one
//! connection per broker, shared by every clone of a [`Client`] and by the
//! producers and consumers made from it.
//!
//! A client bootstraps from the brokers it was given. The first request for
//! a partition asks for the topic's metadata and remembers each partition's
//! leader; requests then go straight to the leader's connection. A
//! `not_leader` answer (or a lost connection) forgets the cache, so the next
//! attempt asks again. A cluster of one (a single node) is always served by
//! the bootstrap connection, whatever address it advertises.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quiver_protocol::messages::{MetadataRequest, MetadataResponse, NO_LEADER};

use crate::connection::{CallError, Client, Inner};

pub(crate) struct Routing {
    /// The connection made to the brokers the client was given.
    bootstrap: Arc<Inner>,
    routes: Mutex<Routes>,
    /// Connections to other brokers, by address.
    peers: Mutex<HashMap<String, Arc<Inner>>>,
    pub(crate) suspects: Suspects,
    /// When a leadership check last asked the cluster: concurrent checks
    /// share its answer (through the cache) instead of asking again.
    checked: Mutex<Option<Instant>>,
    /// Each group's partition of the offsets topic (it never changes).
    /// Coordinators' partitions by (kind, group or transactional id).
    pub(crate) group_partitions: Mutex<HashMap<(u8, String), u32>>,
}

/// Addresses that lately failed to connect or to answer in time, and when:
/// tried last (for `SUSPECT_FOR`) when there is a choice.
#[derive(Default)]
pub(crate) struct Suspects(Mutex<HashMap<String, Instant>>);

/// How long a broker that failed is tried after the others.
const SUSPECT_FOR: Duration = Duration::from_secs(10);

impl Suspects {
    pub(crate) fn mark(&self, address: &str) {
        self.lock().insert(address.to_string(), Instant::now());
    }

    pub(crate) fn clear(&self, address: &str) {
        self.lock().remove(address);
    }

    /// `addresses` in the order to try them: those that did not fail lately
    /// first, each group in the given order.
    pub(crate) fn ordered<'a>(&self, addresses: impl IntoIterator<Item = &'a String>) -> Vec<&'a String> {
        let suspects = self.lock();
        let mut ordered: Vec<&String> = addresses.into_iter().collect();
        ordered.sort_by_key(|a| suspects.get(*a).is_some_and(|at| at.elapsed() < SUSPECT_FOR));
        ordered
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.0.lock().expect("suspects lock")
    }
}

/// A request to a partition leader unanswered after this long makes the
/// client ask the other brokers whether the leadership moved: a killed
/// leader is otherwise noticed only at the request timeout (QUIC gets no
/// reset from a dead process).
const LEADER_CHECK_AFTER: Duration = Duration::from_millis(500);
/// How often that check repeats while the request stays unanswered.
const LEADER_CHECK_EVERY: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Routes {
    /// Leader address (`None` when it has none: offline) and leader epoch
    /// per partition.
    leaders: HashMap<(String, u32), (Option<String>, i32)>,
    /// Every live broker of the last metadata answer.
    brokers: Vec<String>,
    /// The cluster is one broker: the bootstrap connection serves it all.
    single: bool,
}

impl Routing {
    pub(crate) fn new(bootstrap: Arc<Inner>) -> Routing {
        Routing {
            bootstrap,
            routes: Mutex::default(),
            peers: Mutex::default(),
            suspects: Suspects::default(),
            checked: Mutex::default(),
            group_partitions: Mutex::default(),
        }
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().expect("routes lock")
    }
}

impl Client {
    /// The connection to use for `topic`-`partition`: its leader's, or this
    /// one when the cluster is a single node, the leader is unknown, or the
    /// partition is offline (its answer then says so).
    pub async fn for_partition(&self, topic: &str, partition: u32) -> Result<Client, CallError> {
        if let Some(found) = self.cached_route(topic, partition) {
            return Ok(found);
        }
        self.refresh_routes(topic).await?;
        Ok(self.cached_route(topic, partition).unwrap_or_else(|| self.clone()))
    }

    /// Forgets every known leader (after `not_leader` or a lost
    /// connection): the next request asks the cluster again.
    pub fn forget_routes(&self) {
        let mut routes = self.routing().routes();
        routes.leaders.clear();
        routes.single = false;
    }

    fn cached_route(&self, topic: &str, partition: u32) -> Option<Client> {
        let address = {
            let routes = self.routing().routes();
            if routes.single {
                return Some(self.bootstrap());
            }
            routes.leaders.get(&(topic.to_string(), partition))?.0.clone()
        };
        Some(match address {
            Some(address) => self.peer(&address),
            None => self.bootstrap(),
        })
    }

    /// Asks for `topic`'s metadata: through the bootstrap connection, or
    /// when it does not answer (a dead node) through any broker the last
    /// answer named.
    async fn refresh_routes(&self, topic: &str) -> Result<(), CallError> {
        let request = MetadataRequest { topics: Some(vec![topic.to_string()]) };
        let bootstrap = self.bootstrap();
        let mut answer = bootstrap.call(&request).await;
        let unanswered = |a: &Result<_, CallError>| matches!(a, Err(e) if !matches!(e, CallError::Broker(_)));
        if unanswered(&answer) && bootstrap.config().brokers.len() > 1 {
            // Its connection is closed and that broker suspect: this
            // reconnects to another of the given brokers first.
            answer = bootstrap.call(&request).await;
        }
        if unanswered(&answer) {
            let known = self.routing().routes().brokers.clone();
            for address in
                self.routing().suspects.ordered(&known).into_iter().filter(|a| !bootstrap.config().brokers.contains(a))
            {
                let attempt = self.peer(address).call(&request).await;
                let answered = matches!(attempt, Ok(_) | Err(CallError::Broker(_)));
                answer = attempt;
                if answered {
                    break;
                }
            }
        }
        self.remember(answer?);
        Ok(())
    }

    /// Takes a metadata answer into the cache.
    pub(crate) fn remember(&self, metadata: MetadataResponse) {
        let addresses: HashMap<u32, String> = metadata.brokers.iter().map(|b| (b.node_id, b.address.clone())).collect();
        let mut routes = self.routing().routes();
        routes.single = metadata.brokers.len() <= 1;
        routes.brokers = metadata.brokers.into_iter().map(|b| b.address).collect();
        for t in metadata.topics.into_iter().filter(|t| t.error == quiver_protocol::ErrorCode::None) {
            for p in t.partitions {
                let leader = (p.leader != NO_LEADER).then(|| addresses.get(&p.leader).cloned()).flatten();
                // A broker behind the metadata log does not undo what a
                // newer answer said.
                let key = (t.name.clone(), p.partition);
                if routes.leaders.get(&key).is_none_or(|(_, epoch)| *epoch <= p.leader_epoch) {
                    routes.leaders.insert(key, (leader, p.leader_epoch));
                }
            }
        }
    }

    /// Whether the last metadata answer said the partition has no leader.
    pub(crate) fn known_offline(&self, topic: &str, partition: u32) -> bool {
        matches!(self.routing().routes().leaders.get(&(topic.to_string(), partition)), Some((None, _)))
    }

    /// Waits for `call`, a request to the leaders of `partitions`; gives
    /// it up as [`CallError::LeaderMoved`] (outcome unknown) once the
    /// cluster names another leader for one of them: a leader that died
    /// with the request is noticed then, not at the request timeout.
    /// `patience`: how long the request may wait normally (a long poll).
    pub(crate) async fn unless_leadership_moves<'a, T>(
        &self,
        partitions: impl IntoIterator<Item = (&'a str, u32)>,
        patience: Duration,
        call: impl Future<Output = Result<T, CallError>>,
    ) -> Result<T, CallError> {
        let leaders = self.routed_leaders(partitions);
        tokio::select! {
            answer = call => answer,
            moved = self.leadership_moved(leaders, patience) => Err(CallError::LeaderMoved(moved)),
        }
    }

    /// The leaders the cache names for these partitions (those it knows, in
    /// a cluster of more than one broker): where a request routed now goes.
    fn routed_leaders<'a>(&self, partitions: impl IntoIterator<Item = (&'a str, u32)>) -> Vec<RoutedLeader> {
        let routes = self.routing().routes();
        if routes.single {
            return Vec::new();
        }
        partitions
            .into_iter()
            .filter_map(|(topic, partition)| match routes.leaders.get(&(topic.to_string(), partition)) {
                Some((Some(address), epoch)) => {
                    Some(RoutedLeader { topic: topic.to_string(), partition, address: address.clone(), epoch: *epoch })
                }
                _ => None,
            })
            .collect()
    }

    /// Resolves, with what changed, once the cluster names a newer leader
    /// than `expected` for one of its partitions (the cache then holds it);
    /// stays pending while they lead. For a request still unanswered after
    /// `patience` + `LEADER_CHECK_AFTER`, asks brokers other than those
    /// leaders every `LEADER_CHECK_EVERY` (once for all concurrent checks).
    async fn leadership_moved(&self, expected: Vec<RoutedLeader>, patience: Duration) -> String {
        if expected.is_empty() {
            return std::future::pending().await;
        }
        let mut topics: Vec<String> = expected.iter().map(|l| l.topic.clone()).collect();
        topics.sort();
        topics.dedup();
        let request = MetadataRequest { topics: Some(topics) };
        tokio::time::sleep(patience + LEADER_CHECK_AFTER).await;
        loop {
            if self.check_due() {
                self.ask_others(&request, &expected).await;
            }
            if let Some(moved) = self.moved_in_cache(&expected) {
                return moved;
            }
            tokio::time::sleep(LEADER_CHECK_EVERY).await;
        }
    }

    /// What the cache says moved away from `expected`, if anything.
    fn moved_in_cache(&self, expected: &[RoutedLeader]) -> Option<String> {
        let routes = self.routing().routes();
        expected.iter().find_map(|l| {
            let (now, epoch) = routes.leaders.get(&(l.topic.clone(), l.partition))?;
            (*epoch > l.epoch && now.as_ref() != Some(&l.address)).then(|| {
                let now = now.as_deref().unwrap_or("no broker (offline)");
                format!(
                    "{} did not answer, and the cluster names {now} leader of {}-{} (epoch {epoch})",
                    l.address, l.topic, l.partition
                )
            })
        })
    }

    /// Whether this check asks the cluster (no other did lately).
    fn check_due(&self) -> bool {
        let mut checked = self.routing().checked.lock().expect("checked lock");
        let due = checked.is_none_or(|at| at.elapsed() >= LEADER_CHECK_EVERY);
        if due {
            *checked = Some(Instant::now());
        }
        due
    }

    /// Asks the first broker, other than the `expected` leaders, that
    /// answers promptly for `request`'s metadata, into the cache.
    async fn ask_others(&self, request: &MetadataRequest, expected: &[RoutedLeader]) {
        let known = self.routing().routes().brokers.clone();
        let others: Vec<String> = self
            .routing()
            .suspects
            .ordered(&known)
            .into_iter()
            .filter(|a| expected.iter().all(|l| l.address != **a))
            .cloned()
            .collect();
        for address in others {
            // One that does not answer promptly may be as dead as the leader.
            if let Ok(Ok(metadata)) =
                tokio::time::timeout(LEADER_CHECK_EVERY * 2, self.peer(&address).call(request)).await
            {
                self.remember(metadata);
                return;
            }
        }
    }

    /// The connection to `address`, shared by every clone of this client.
    pub(crate) fn peer(&self, address: &str) -> Client {
        let routing = self.routing();
        // The bootstrap connection is that broker's only when it was given
        // alone (with several, it may be connected to any of them).
        if routing.bootstrap.config.brokers == [address] {
            return self.bootstrap();
        }
        let inner = routing
            .peers
            .lock()
            .expect("peers lock")
            .entry(address.to_string())
            .or_insert_with(|| Arc::new(routing.bootstrap.sibling(address)))
            .clone();
        Client { inner, routing: routing.clone() }
    }

    /// The connection to the brokers this client was given.
    pub fn bootstrap(&self) -> Client {
        Client { inner: self.routing().bootstrap.clone(), routing: self.routing().clone() }
    }

    pub(crate) fn routing(&self) -> &Arc<Routing> {
        &self.routing
    }
}

/// A partition's leader as the client's cache named it when a request was
/// routed.
struct RoutedLeader {
    topic: String,
    partition: u32,
    address: String,
    epoch: i32,
}

/// Items grouped by the connection they go to, in first-seen order (items
/// keep their order within a group).
pub(crate) fn group_by_connection<T>(routed: impl IntoIterator<Item = (Client, T)>) -> Vec<(Client, Vec<T>)> {
    let mut groups: Vec<(Client, Vec<T>)> = Vec::new();
    for (route, item) in routed {
        match groups.iter_mut().find(|(c, _)| c.same_connection(&route)) {
            Some((_, members)) => members.push(item),
            None => groups.push((route, vec![item])),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brokers_that_failed_lately_are_tried_last() {
        let suspects = Suspects::default();
        let given: Vec<String> = ["a:1", "b:2", "c:3"].map(String::from).to_vec();
        assert_eq!(suspects.ordered(&given), [&given[0], &given[1], &given[2]]);
        suspects.mark("a:1");
        suspects.mark("c:3");
        assert_eq!(suspects.ordered(&given), [&given[1], &given[0], &given[2]], "stable within each group");
        suspects.clear("a:1");
        assert_eq!(suspects.ordered(&given), [&given[0], &given[1], &given[2]]);
        if let Some(long_ago) = Instant::now().checked_sub(SUSPECT_FOR) {
            suspects.0.lock().unwrap().insert("a:1".into(), long_ago);
            assert_eq!(suspects.ordered(&given)[0], &given[0], "a suspicion expires");
        }
    }
}
