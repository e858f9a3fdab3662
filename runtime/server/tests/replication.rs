//! Replicated partitions across three real `quiver broker` processes:
//! followers copy their leaders over mutual TLS, `acks=all` writes survive
//! the SIGKILL of their leader (a new leader is elected from the ISR and has
//! every acknowledged record), `min.insync.replicas` refuses writes with a
//! clear error when too few replicas are in sync, and a restarted replica
//! catches up and rejoins the ISR with a byte-identical log, and killing
//! every node at once loses no acknowledged record.

mod common;

use std::time::Duration;

use common::cluster::Cluster;

/// The partition's leader; `u32::MAX` while it has none (describe prints
/// null then).
fn leader_of(p: &serde_json::Value) -> u32 {
    p["leader"].as_u64().map_or(u32::MAX, |l| l as u32)
}

fn isr_of(p: &serde_json::Value) -> Vec<u64> {
    let mut isr: Vec<u64> = p["isr"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect();
    isr.sort();
    isr
}

fn values(prefix: &str, range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i}")).collect()
}

#[test]
fn replicas_follow_their_leader_and_acknowledged_writes_survive_its_death() {
    let mut cluster = Cluster::start(
        3,
        &[("QUIVER_CLUSTER__REPLICA_LAG_TIME_MAX_MS", "2000"), ("QUIVER_CLUSTER__LEADER_REBALANCE_INTERVAL_MS", "0")],
    );
    cluster.wait_formed();

    // Three replicas per partition, leaders spread over the nodes.
    cluster.ok(1, &["topic", "create", "events", "-p", "3", "-r", "3", "-c", "min.insync.replicas=2"]);
    let partitions = cluster.partitions(2, "events");
    assert_eq!(partitions.len(), 3);
    let mut leaders: Vec<u32> = partitions.iter().map(leader_of).collect();
    leaders.sort();
    assert_eq!(leaders, [1, 2, 3], "{partitions:?}");
    for p in &partitions {
        assert_eq!(p["replicas"].as_array().unwrap().len(), 3, "{p}");
        assert_eq!(isr_of(p), [1, 2, 3], "{p}");
    }

    // acks=all through each leader; consumers see everything acknowledged.
    for p in 0..3u32 {
        let leader = leader_of(&partitions[p as usize]);
        let out = cluster.produce(leader, "events", p, "all", 30_000, &values(&format!("p{p}"), 0..300));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(cluster.values(leader, "events", p).unwrap(), values(&format!("p{p}"), 0..300));
    }
    // Every replica holds the same bytes.
    for p in 0..3u32 {
        cluster.wait_for("replicas identical", Duration::from_secs(10), || {
            let first = cluster.replica_bytes(1, "events", p);
            !first.is_empty() && (2..=3).all(|n| cluster.replica_bytes(n, "events", p) == first)
        });
    }

    // The leader of partition 0 dies: a follower from the ISR takes over
    // with every acknowledged record, and acks=all writes go on (two of
    // three in sync meets min.insync.replicas=2).
    let victim = leader_of(&partitions[0]);
    let survivor = victim % 3 + 1;
    cluster.kill9(victim);
    let mut new_leader = 0;
    cluster.wait_for("a new leader for events-0", Duration::from_secs(20), || {
        let now = cluster.partitions(survivor, "events");
        new_leader = now.first().map_or(0, leader_of);
        new_leader != 0 && new_leader != victim && new_leader != u32::MAX
    });
    // (Its high watermark catches up once the other follower fetched from
    // it; until then it may serve less, never anything else.)
    let mut read = None;
    cluster.wait_for("the new leader serving every acknowledged record", Duration::from_secs(10), || {
        read = cluster.values(new_leader, "events", 0);
        read.as_ref().is_some_and(|r| r.len() >= 300)
    });
    assert_eq!(read.unwrap(), values("p0", 0..300));
    let out = cluster.produce(new_leader, "events", 0, "all", 30_000, &values("p0", 300..400));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(cluster.values(new_leader, "events", 0).unwrap(), values("p0", 0..400));

    // It comes back: it catches up from the new leaders, rejoins every
    // ISR, and holds byte-identical logs.
    cluster.start_node(victim);
    cluster.wait_for("every ISR complete", Duration::from_secs(40), || {
        let events = cluster.partitions(survivor, "events");
        events.len() == 3 && events.iter().all(|p| isr_of(p) == [1, 2, 3])
    });
    for p in 0..3u32 {
        cluster.wait_for("replicas identical after the restart", Duration::from_secs(10), || {
            let first = cluster.replica_bytes(1, "events", p);
            (2..=3).all(|n| cluster.replica_bytes(n, "events", p) == first)
        });
    }

    // Leadership goes back to the preferred replica on request, with
    // everything acknowledged still there.
    let moved = cluster.ok(survivor, &["cluster", "rebalance"]);
    assert!(moved.contains("moved 1 leaderships") && moved.contains("events-0"), "{moved}");
    assert_eq!(leader_of(&cluster.partitions(survivor, "events")[0]), victim);
    let mut read = None;
    cluster.wait_for("the preferred leader serving events-0", Duration::from_secs(10), || {
        read = cluster.values(victim, "events", 0);
        read.as_ref().is_some_and(|r| r.len() >= 400)
    });
    assert_eq!(read.unwrap(), values("p0", 0..400));
    let again = cluster.ok(survivor, &["cluster", "rebalance"]);
    assert!(again.starts_with("every partition is led by its preferred replica"), "{again}");

    // A topic with two replicas and min.insync.replicas=2: when one replica
    // is gone, acks=all is refused with a clear error and nothing is
    // written; acks=leader still works.
    cluster.ok(1, &["topic", "create", "strict", "-p", "1", "-r", "2", "-c", "min.insync.replicas=2"]);
    let strict = cluster.partitions(1, "strict");
    let strict_leader = leader_of(&strict[0]);
    let replicas: Vec<u32> =
        strict[0]["replicas"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap() as u32).collect();
    let out = cluster.produce(strict_leader, "strict", 0, "all", 30_000, &values("s", 0..10));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let follower = replicas.iter().copied().find(|n| *n != strict_leader).unwrap();
    cluster.kill9(follower);
    cluster.wait_for("the strict ISR to shrink", Duration::from_secs(20), || {
        cluster.partitions(strict_leader, "strict").first().is_some_and(|p| isr_of(p) == [strict_leader as u64])
    });
    let out = cluster.produce(strict_leader, "strict", 0, "all", 2_000, &values("refused", 0..1));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not enough in-sync replicas") && err.contains("min.insync.replicas is 2"), "{err}");
    let out = cluster.produce(strict_leader, "strict", 0, "leader", 30_000, &values("s", 10..20));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(cluster.values(strict_leader, "strict", 0).unwrap(), values("s", 0..20));

    // The follower returns, catches up, and acks=all works again.
    cluster.start_node(follower);
    cluster.wait_for("the strict ISR complete", Duration::from_secs(40), || {
        cluster.partitions(strict_leader, "strict").first().is_some_and(|p| isr_of(p).len() == 2)
    });
    let out = cluster.produce(strict_leader, "strict", 0, "all", 30_000, &values("s", 20..30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    cluster.wait_for("strict replicas identical", Duration::from_secs(10), || {
        cluster.replica_bytes(replicas[0], "strict", 0) == cluster.replica_bytes(replicas[1], "strict", 0)
    });
    let health = cluster.ok(1, &["cluster", "health"]);
    assert!(health.starts_with("healthy"), "{health}");

    // Power loss on every node at once, right after acks=all writes were
    // acknowledged: SIGKILL all three (nothing flushed on the way out), start
    // them again: every acknowledged record is there, and the replicas agree.
    let leader = leader_of(&cluster.partitions(1, "events")[1]);
    let out = cluster.produce(leader, "events", 1, "all", 30_000, &values("p1", 300..500));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for n in 1..=3 {
        cluster.kill9(n);
    }
    for n in 1..=3 {
        cluster.start_node(n);
    }
    let mut read = None;
    cluster.wait_for("every acknowledged record after the outage", Duration::from_secs(60), || {
        let now = cluster.partitions(1, "events");
        let Some(leader) = now.get(1).map(leader_of).filter(|l| *l != u32::MAX) else { return false };
        read = cluster.values(leader, "events", 1);
        read.as_ref().is_some_and(|r| r.len() >= 500)
    });
    assert_eq!(read.unwrap(), values("p1", 0..500));
    cluster.wait_for("replicas identical after the outage", Duration::from_secs(30), || {
        let first = cluster.replica_bytes(1, "events", 1);
        (2..=3).all(|n| cluster.replica_bytes(n, "events", 1) == first)
    });
}

/// A client with the library's default timeouts (30 s per request, QUIC's
/// 10 s idle timeout) whose partition leader is killed: the producer's next
/// request and the consumer's pending long poll both went to the dead
/// process, which never answers; the client learns the new leader from the
/// other brokers and goes on well inside the 8 s delivery timeout, with
/// every record written once and read in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_default_timeouts_follows_a_killed_leader() {
    use quiver_client::{Acks, Client, ClientConfig, ConsumeError, ConsumerConfig, OffsetSpec, ProducerConfig};

    let mut cluster = Cluster::start(3, &[("QUIVER_CLUSTER__LEADER_REBALANCE_INTERVAL_MS", "0")]);
    cluster.wait_formed();
    cluster.ok(1, &["topic", "create", "moving", "-p", "1", "-r", "3", "-c", "min.insync.replicas=2"]);
    let leader = leader_of(&cluster.partitions(1, "moving")[0]);

    let ca = std::fs::read(cluster.certs().join("ca.pem")).unwrap();
    let mut config = ClientConfig::new(cluster.address(1), ca);
    config.brokers = (1..=3).map(|n| cluster.address(n)).collect();
    let client = Client::connect(config).await.unwrap();
    let producer = client.producer(ProducerConfig {
        acks: Acks::All,
        linger: Duration::ZERO,
        delivery_timeout: Duration::from_secs(8),
        ..ProducerConfig::default()
    });
    let write = |range: std::ops::Range<u32>| {
        let producer = producer.clone();
        async move {
            for v in values("m", range) {
                let delivery = producer.send(quiver_client::ProducerRecord::new("moving", v).partition(0)).await;
                delivery.unwrap().await.unwrap();
            }
        }
    };
    let mut consumer = client.consumer(ConsumerConfig::default());
    consumer.assign("moving", Some(vec![0]), OffsetSpec::Earliest).await.unwrap();
    let mut read: Vec<String> = Vec::new();
    let mut read_until = async |n: usize, within: Duration| {
        let deadline = tokio::time::Instant::now() + within;
        while read.len() < n {
            assert!(tokio::time::Instant::now() < deadline, "read {} of {n} records in {within:?}", read.len());
            match consumer.poll().await {
                Ok(records) => {
                    read.extend(records.into_iter().map(|r| String::from_utf8(r.value.unwrap().to_vec()).unwrap()))
                }
                // A new leader answers offset_not_available until its high
                // watermark is established.
                Err(ConsumeError::Partition { error, .. }) if error.code.is_retriable() => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
        read.clone()
    };

    write(0..50).await;
    assert_eq!(read_until(50, Duration::from_secs(10)).await, values("m", 0..50));
    // The consumer's next long poll is now waiting on the leader.
    cluster.kill9(leader);
    write(50..100).await;
    assert_eq!(read_until(100, Duration::from_secs(8)).await, values("m", 0..100));
    client.close();
}
