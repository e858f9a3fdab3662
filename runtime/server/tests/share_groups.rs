//! Share groups (queue semantics) against the real binary: members split
//! the records of every partition between them, each accepted once;
//! released and expired records come back with a higher delivery count and
//! end in the dead-letter topic; a kill -9 of the broker loses nothing
//! acknowledged; bad requests get clear errors and change nothing; the CLI
//! consumes as a share member and describes the group.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{DevNode, json_lines};
use quiver_client::{
    AckKind, Client, ConsumeError, ConsumerConfig, ErrorCode, OffsetSpec, ProducerConfig, ProducerRecord,
    ShareConsumer, ShareConsumerConfig,
};

const ENV: [(&str, &str); 3] = [
    ("QUIVER_GROUPS__HEARTBEAT_INTERVAL_MS", "200"),
    ("QUIVER_GROUPS__SESSION_TIMEOUT_MS", "3000"),
    ("QUIVER_GROUPS__OFFSETS_TOPIC_PARTITIONS", "5"),
];

async fn produce(client: &Client, topic: &str, from: usize, to: usize) {
    let producer = client.producer(ProducerConfig::default());
    let mut deliveries = Vec::new();
    for i in from..to {
        deliveries.push(producer.send(ProducerRecord::new(topic.to_string(), format!("v{i}"))).await.unwrap());
    }
    for d in deliveries {
        d.await.unwrap();
    }
}

fn config() -> ShareConsumerConfig {
    ShareConsumerConfig { max_records: 50, max_wait: Duration::from_millis(100), ..ShareConsumerConfig::default() }
}

fn value(r: &quiver_client::ShareRecord) -> String {
    String::from_utf8(r.record.value.clone().unwrap().to_vec()).unwrap()
}

async fn configure(client: &Client, group: &str, configs: &[(&str, &str)]) {
    let configs: Vec<(String, String)> = configs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    client.admin().alter_group_config(group, &configs).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_split_every_partition_and_each_record_is_accepted_once() {
    let mut node = DevNode::start_with_env(&ENV);
    node.ok(&["topic", "create", "jobs", "-p", "3"]);
    let client = Client::connect(node.client_config()).await.unwrap();
    configure(&client, "workers", &[("share.auto.offset.reset", "earliest")]).await;
    produce(&client, "jobs", 0, 300).await;

    let mut a = client.share_consumer("workers", &["jobs"], config());
    let mut b = client.share_consumer("workers", &["jobs"], config());
    let mut by: BTreeMap<String, Vec<char>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while by.len() < 300 {
        assert!(Instant::now() < deadline, "read {} of 300", by.len());
        for (name, c) in [('a', &mut a), ('b', &mut b)] {
            for r in c.poll().await.unwrap() {
                assert_eq!(r.delivery_count, 1, "{r:?}: nothing was released");
                by.entry(value(&r)).or_default().push(name);
            }
        }
    }
    assert!(by.values().all(|who| who.len() == 1), "a record went to two members");
    let per: BTreeMap<char, usize> = by.values().fold(BTreeMap::new(), |mut m, who| {
        *m.entry(who[0]).or_default() += 1;
        m
    });
    assert_eq!(per.len(), 2, "both members got records: {per:?}");
    // Their acknowledgements (implicit: accepted) go with the next fetch.
    assert!(a.commit().await.unwrap().is_empty());
    assert!(b.commit().await.unwrap().is_empty());
    let described = client.admin().describe_group("workers").await.unwrap();
    assert_eq!((described.kind.as_str(), described.share_members.len()), ("share", 2));
    let topic = &client.admin().describe_topics(Some(vec!["jobs".into()])).await.unwrap()[0];
    assert_eq!(described.share_partitions.len(), 3);
    for (p, t) in described.share_partitions.iter().zip(&topic.partitions) {
        let end = t.high_watermark;
        assert_eq!((p.start_offset, p.end_offset, p.acquired), (end, end, 0), "{p:?}: all done");
    }

    // Acknowledged state survives a kill -9 of the broker: nothing is
    // delivered again, new records are.
    node.kill9();
    node.spawn();
    let client = Client::connect(node.client_config()).await.unwrap();
    produce(&client, "jobs", 300, 330).await;
    let mut c = client.share_consumer("workers", &["jobs"], config());
    let mut later = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while later.len() < 30 {
        assert!(Instant::now() < deadline, "read {later:?} after the restart");
        let polled = match c.poll().await {
            Ok(polled) => polled,
            Err(e) if e.is_transient() => continue,
            Err(e) => panic!("{e}"),
        };
        for r in polled {
            assert!(later.insert(value(&r)), "{r:?} twice");
        }
    }
    assert_eq!(later, (300..330).map(|i| format!("v{i}")).collect());
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_and_expired_records_come_back_then_go_to_the_dead_letter_topic() {
    let node = DevNode::start_with_env(&ENV);
    node.ok(&["topic", "create", "tasks", "-p", "1"]);
    let client = Client::connect(node.client_config()).await.unwrap();
    configure(
        &client,
        "retry",
        &[
            ("share.auto.offset.reset", "earliest"),
            ("share.record.lock.duration.ms", "1000"),
            ("share.delivery.count.limit", "2"),
        ],
    )
    .await;
    produce(&client, "tasks", 0, 3).await;

    // A rejects v0, releases v1 and dies holding v2 (no further fetch).
    let mut a = client.share_consumer("retry", &["tasks"], config());
    let got = poll_until(&mut a, 3).await;
    assert_eq!(got.iter().map(value).collect::<Vec<_>>(), ["v0", "v1", "v2"]);
    a.acknowledge(&got[0], AckKind::Reject);
    a.acknowledge(&got[1], AckKind::Release);
    a.acknowledge(&got[2], AckKind::Release);
    assert!(a.commit().await.unwrap().is_empty());
    let one = ShareConsumerConfig { max_records: 1, ..config() };
    let mut b = client.share_consumer("retry", &["tasks"], one);
    // B releases v1 on its last delivery (a dead letter), then holds v2
    // past its lock: its late acceptance is refused, v2 is a dead letter too.
    let again = poll_until(&mut b, 1).await;
    assert_eq!((value(&again[0]), again[0].delivery_count), ("v1".to_string(), 2));
    b.acknowledge(&again[0], AckKind::Release);
    assert!(b.commit().await.unwrap().is_empty());
    let again = poll_until(&mut b, 1).await;
    assert_eq!((value(&again[0]), again[0].delivery_count), ("v2".to_string(), 2));
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let refused = b.commit().await.unwrap();
    assert_eq!(
        refused.iter().map(|e| (e.offset, e.error.code)).collect::<Vec<_>>(),
        [(2, ErrorCode::InvalidRecordState)]
    );

    // The dead-letter topic gets all three, with where they came from.
    let mut dlq = client.consumer(ConsumerConfig { fetch_max_wait: Duration::from_millis(100), ..Default::default() });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client.admin().describe_topics(None).await.unwrap().iter().any(|t| t.name == "tasks-dlq") {
        assert!(Instant::now() < deadline, "no dead-letter topic");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    dlq.assign("tasks-dlq", None, OffsetSpec::Earliest).await.unwrap();
    let mut dead = Vec::new();
    while dead.len() < 3 {
        assert!(Instant::now() < deadline, "dead letters: {dead:?}");
        dead.extend(dlq.poll().await.unwrap());
    }
    let header = |r: &quiver_client::ConsumerRecord, key: &str| {
        let h = r.headers.iter().find(|h| h.key == key).unwrap_or_else(|| panic!("{key} missing in {r:?}"));
        String::from_utf8(h.value.clone().unwrap().to_vec()).unwrap()
    };
    let mut summary: Vec<(String, String, String, String)> = dead
        .iter()
        .map(|r| {
            let v = String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap();
            (v, header(r, "quiver.dlq.offset"), header(r, "quiver.dlq.delivery.count"), header(r, "quiver.dlq.reason"))
        })
        .collect();
    summary.sort();
    assert_eq!(
        summary,
        [
            ("v0".into(), "0".into(), "1".into(), "rejected".into()),
            ("v1".into(), "1".into(), "2".into(), "delivery limit".into()),
            ("v2".into(), "2".into(), "2".into(), "delivery limit".into()),
        ]
    );
    assert!(dead.iter().all(|r| header(r, "quiver.dlq.group") == "retry" && header(r, "quiver.dlq.topic") == "tasks"));
    // Done: nothing in flight, nothing delivered again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = client.admin().describe_group("retry").await.unwrap();
        let p = &d.share_partitions[0];
        if (p.start_offset, p.dead_letters) == (3, 0) {
            break;
        }
        assert!(Instant::now() < deadline, "{p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(b.poll().await.unwrap().is_empty());
    b.close().await.unwrap();
    a.close().await.unwrap();
}

async fn poll_until(c: &mut ShareConsumer, n: usize) -> Vec<quiver_client::ShareRecord> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < n {
        assert!(Instant::now() < deadline, "got {got:?}");
        got.extend(c.poll().await.unwrap());
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_share_requests_get_clear_errors_and_change_nothing() {
    let node = DevNode::start_with_env(&ENV);
    node.ok(&["topic", "create", "q", "-p", "2"]);
    let client = Client::connect(node.client_config()).await.unwrap();
    let group_error = |e: ConsumeError| match e {
        ConsumeError::Group { error, .. } => (error.code, error.message),
        other => panic!("not a group error: {other}"),
    };

    // A topic that does not exist.
    let mut lost = client.share_consumer("s1", &["nope"], config());
    let e = lost.poll().await.unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");

    // A consumer group cannot take share members, nor the other way round.
    let mut member = client.consumer(ConsumerConfig::default());
    member.subscribe("classic", &["q"]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while member.assignment().is_empty() {
        assert!(Instant::now() < deadline, "the consumer did not join");
        member.poll().await.unwrap();
    }
    let mut wrong = client.share_consumer("classic", &["q"], config());
    let (code, message) = group_error(wrong.poll().await.unwrap_err());
    assert_eq!(code, ErrorCode::InvalidRequest);
    assert!(message.contains("consumer group"), "{message}");
    member.close().await.unwrap();
    let mut share = client.share_consumer("queue", &["q"], config());
    share.poll().await.unwrap();
    let mut classic = client.consumer(ConsumerConfig::default());
    let e = match classic.subscribe("queue", &["q"]).await {
        Err(e) => e,
        // The join's answer comes to a poll.
        Ok(()) => {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match classic.poll().await {
                    Err(e) => break e,
                    Ok(_) => assert!(Instant::now() < deadline, "a consumer joined a share group"),
                }
            }
        }
    };
    assert!(e.to_string().contains("share group"), "{e}");

    // Deleting a share group with members is refused; an unknown config is
    // named.
    let e = client.admin().delete_group("queue").await.unwrap_err();
    assert!(e.to_string().contains("active member"), "{e}");
    let e = client.admin().alter_group_config("queue", &[("share.lock".into(), "5".into())]).await.unwrap_err();
    assert!(e.to_string().contains("share.record.lock.duration.ms"), "{e}");
    let e = client
        .admin()
        .alter_group_config("queue", &[("share.auto.offset.reset".into(), "middle".into())])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("neither earliest nor latest"), "{e}");

    // Internal topics cannot be read as a queue.
    let mut internal = client.share_consumer("s2", &["__consumer_offsets"], config());
    let (code, _) = group_error(internal.poll().await.unwrap_err());
    assert_eq!(code, ErrorCode::InvalidRequest);

    share.close().await.unwrap();
    client.admin().delete_group("queue").await.unwrap();
}

#[test]
fn the_cli_consumes_as_a_share_member_and_describes_the_group() {
    let node = DevNode::start_with_env(&ENV);
    node.ok(&["topic", "create", "mail", "-p", "2"]);
    node.ok(&["group", "configure", "senders", "-c", "share.auto.offset.reset=earliest"]);
    let input: String = (0..20).map(|i| format!("m{i}\n")).collect();
    assert!(node.produce(&["topic", "produce", "mail"], input.as_bytes()).status.success());

    let first =
        json_lines(&node.ok(&["topic", "consume", "mail", "--share-group", "senders", "-n", "8", "--format", "json"]));
    assert_eq!(first.len(), 8);
    assert!(first.iter().all(|r| r["delivery_count"] == 1), "{first:?}");
    // The rest (and nothing printed before) go to the next member; what
    // the first fetched past -n was released, so it comes again.
    let rest =
        json_lines(&node.ok(&["topic", "consume", "mail", "--share-group", "senders", "-n", "12", "--format", "json"]));
    let mut values: Vec<String> = first.iter().chain(&rest).map(|r| r["value"].as_str().unwrap().to_string()).collect();
    values.sort();
    let mut expected: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    expected.sort();
    assert_eq!(values, expected, "each record printed once");

    let described: serde_json::Value =
        serde_json::from_str(&node.ok(&["group", "describe", "senders", "--format", "json"])).unwrap();
    assert_eq!(described["kind"], "share");
    assert_eq!(described["state"], "empty", "both members left");
    let partitions = described["share_partitions"].as_array().unwrap();
    assert_eq!(partitions.iter().map(|p| p["start"].as_i64().unwrap()).sum::<i64>(), 20, "{described}");
    let listed = node.ok(&["group", "list"]);
    assert!(listed.contains("senders\tshare\tempty"), "{listed}");

    // --ack reject sends what it printed to mail-dlq.
    assert!(node.produce(&["topic", "produce", "mail"], b"poison\n").status.success());
    let out = node.ok(&["topic", "consume", "mail", "--share-group", "senders", "-n", "1", "--ack", "reject"]);
    assert_eq!(out.trim(), "poison");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = node.quiver(&["topic", "consume", "mail-dlq", "-o", "start:end", "--format", "json"]);
        let lines = json_lines(&String::from_utf8_lossy(&out.stdout));
        if lines.len() == 1 {
            assert_eq!(lines[0]["value"], "poison");
            break;
        }
        assert!(Instant::now() < deadline, "no dead letter: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(200));
    }
    let e = node.fails(&["topic", "consume", "mail", "--share-group", "senders", "--group", "g"]);
    assert!(e.contains("cannot be used with"), "{e}");
}
