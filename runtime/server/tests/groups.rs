//! Consumer groups against the real binary: members share a topic's
//! partitions and hand them over without two owners; a group resumes from
//! its commits (also after kill -9 of the broker); a static member's
//! restart moves nothing; a crashed member's partitions go to the others
//! after its session; bad requests get clear errors and change nothing.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{DevNode, json_lines};
use quiver_client::{
    Client, ConsumeError, Consumer, ConsumerConfig, ErrorCode, OffsetReset, ProducerConfig, ProducerRecord,
    RebalanceListener,
};

/// Fast group timings for tests.
const GROUP_ENV: [(&str, &str); 3] = [
    ("QUIVER_GROUPS__HEARTBEAT_INTERVAL_MS", "200"),
    ("QUIVER_GROUPS__SESSION_TIMEOUT_MS", "3000"),
    ("QUIVER_GROUPS__OFFSETS_TOPIC_PARTITIONS", "5"),
];

type Tp = (String, u32);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Assigned(Vec<Tp>),
    Revoked(Vec<Tp>),
    Lost(Vec<Tp>),
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Event>>>);

impl RebalanceListener for Recorder {
    fn on_assigned(&mut self, partitions: &[(String, u32)]) {
        self.0.lock().unwrap().push(Event::Assigned(partitions.to_vec()));
    }
    fn on_revoked(&mut self, partitions: &[(String, u32)]) {
        self.0.lock().unwrap().push(Event::Revoked(partitions.to_vec()));
    }
    fn on_lost(&mut self, partitions: &[(String, u32)]) {
        self.0.lock().unwrap().push(Event::Lost(partitions.to_vec()));
    }
}

impl Recorder {
    fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }
}

async fn produce_keyed(client: &Client, topic: &str, from: usize, to: usize) {
    let producer = client.producer(ProducerConfig::default());
    let mut deliveries = Vec::new();
    for i in from..to {
        let record = ProducerRecord::new(topic.to_string(), format!("v{i}")).key(format!("k{i}"));
        deliveries.push(producer.send(record).await.unwrap());
    }
    for d in deliveries {
        d.await.unwrap();
    }
}

async fn member(client: &Client, group: &str, topic: &str, config: ConsumerConfig) -> (Consumer, Recorder) {
    let mut consumer = client.consumer(config);
    let recorder = Recorder::default();
    consumer.set_rebalance_listener(recorder.clone());
    consumer.subscribe(group, &[topic]).await.unwrap();
    (consumer, recorder)
}

fn earliest() -> ConsumerConfig {
    ConsumerConfig {
        auto_offset_reset: OffsetReset::Earliest,
        fetch_max_wait: Duration::from_millis(100),
        ..ConsumerConfig::default()
    }
}

/// Polls every consumer in turn until `done` says so; returns what each read.
async fn poll_all(
    consumers: &mut [&mut Consumer],
    within: Duration,
    mut done: impl FnMut(&[Vec<(u32, i64, String)>], &[&mut Consumer]) -> bool,
) -> Vec<Vec<(u32, i64, String)>> {
    let mut read: Vec<Vec<(u32, i64, String)>> = vec![Vec::new(); consumers.len()];
    let deadline = Instant::now() + within;
    while !done(&read, consumers) {
        assert!(
            Instant::now() < deadline,
            "not done within {within:?}; read {:?}",
            read.iter().map(Vec::len).collect::<Vec<_>>()
        );
        for (i, c) in consumers.iter_mut().enumerate() {
            for r in c.poll().await.unwrap() {
                read[i].push((r.partition, r.offset, String::from_utf8(r.value.unwrap().to_vec()).unwrap()));
            }
        }
    }
    read
}

fn owned(c: &Consumer) -> BTreeSet<Tp> {
    c.assignment().into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_partitions_and_the_group_resumes_from_its_commits() {
    let mut node = DevNode::start_with_env(&GROUP_ENV);
    node.ok(&["topic", "create", "orders", "-p", "6"]);
    let client = Client::connect(node.client_config()).await.unwrap();
    produce_keyed(&client, "orders", 0, 600).await;

    let (mut a, a_log) = member(&client, "billing", "orders", earliest()).await;
    // A alone owns everything, then B joins and the partitions split.
    let alone = poll_all(&mut [&mut a], Duration::from_secs(30), |_, c| owned(c[0]).len() == 6).await;
    let (mut b, b_log) = member(&client, "billing", "orders", earliest()).await;
    let read = poll_all(&mut [&mut a, &mut b], Duration::from_secs(30), |_, c| {
        owned(c[0]).len() == 3 && owned(c[1]).len() == 3
    })
    .await;
    assert!(owned(&a).is_disjoint(&owned(&b)));
    // Nothing B got was A's at that moment: A gave up exactly what B got,
    // before B got it.
    let revoked: BTreeSet<Tp> = a_log
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::Revoked(p) => Some(p.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(revoked, owned(&b), "A's log: {:?}", a_log.events());
    assert_eq!(b_log.events(), vec![Event::Assigned(owned(&b).into_iter().collect())]);

    // Together they read every record once (A committed what it read of
    // B's partitions before giving them up).
    let mut all: Vec<(u32, i64, String)> = alone.into_iter().chain(read).flatten().collect();
    let more = poll_all(&mut [&mut a, &mut b], Duration::from_secs(30), |r, _| {
        all.len() + r.iter().map(Vec::len).sum::<usize>() >= 600
    })
    .await;
    all.extend(more.into_iter().flatten());
    let values: BTreeSet<String> = all.iter().map(|(_, _, v)| v.clone()).collect();
    assert_eq!(values.len(), 600);
    assert_eq!(all.len(), 600, "a record was read twice");

    // Commits: describe shows no lag once both closed.
    a.close().await.unwrap();
    b.close().await.unwrap();
    let described: serde_json::Value =
        serde_json::from_str(&node.ok(&["group", "describe", "billing", "--format", "json"])).unwrap();
    assert_eq!(described["state"], "empty");
    let offsets = described["offsets"].as_array().unwrap();
    assert_eq!(offsets.len(), 6, "{described}");
    assert!(offsets.iter().all(|o| o["lag"] == 0 && o["committed"] == o["end"]), "{described}");
    let listed = node.ok(&["group", "list", "--format", "json"]);
    assert!(listed.contains("\"billing\""), "{listed}");

    // kill -9 of the broker: the group comes back from the offsets topic,
    // and a new member reads only what came after the commits.
    node.kill9();
    node.spawn();
    let client = Client::connect(node.client_config()).await.unwrap();
    produce_keyed(&client, "orders", 600, 650).await;
    let (mut c, _) = member(&client, "billing", "orders", earliest()).await;
    let read = poll_all(&mut [&mut c], Duration::from_secs(30), |r, _| r[0].len() >= 50).await;
    let values: BTreeSet<String> = read[0].iter().map(|(_, _, v)| v.clone()).collect();
    assert_eq!(values, (600..650).map(|i| format!("v{i}")).collect());
    c.commit().await.unwrap();
    let committed: i64 = {
        let mut sum = 0;
        for p in 0..6 {
            sum += c.committed("orders", p).await.unwrap().unwrap();
        }
        sum
    };
    assert_eq!(committed, 650, "every record's position committed");
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_member_restarting_within_its_session_moves_nothing() {
    let node = DevNode::start_with_env(&GROUP_ENV);
    node.ok(&["topic", "create", "events", "-p", "4"]);
    let client = Client::connect(node.client_config()).await.unwrap();
    let statically = |id: &str| ConsumerConfig { instance_id: Some(id.to_string()), ..earliest() };
    let (mut a, _) = member(&client, "static", "events", statically("a")).await;
    let (mut b, b_log) = member(&client, "static", "events", earliest()).await;
    poll_all(&mut [&mut a, &mut b], Duration::from_secs(30), |_, c| owned(c[0]).len() == 2 && owned(c[1]).len() == 2)
        .await;
    let a_had = owned(&a);
    let b_before = b_log.events();

    // A leaves for a moment (-2) and comes back under the same instance id.
    a.close().await.unwrap();
    for _ in 0..5 {
        b.poll().await.unwrap();
    }
    let (mut a2, a2_log) = member(&client, "static", "events", statically("a")).await;
    poll_all(&mut [&mut a2, &mut b], Duration::from_secs(30), |_, c| owned(c[0]).len() == 2).await;
    assert_eq!(owned(&a2), a_had, "the same partitions back");
    assert_eq!(a2_log.events(), vec![Event::Assigned(a_had.iter().cloned().collect())]);
    for _ in 0..5 {
        b.poll().await.unwrap();
    }
    assert_eq!(b_log.events(), b_before, "B saw no rebalance");

    // A second member under an instance id in use is refused clearly.
    let (mut dup, _) = member(&client, "static", "events", statically("a")).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        match dup.poll().await {
            Err(e) => break e,
            Ok(_) => assert!(Instant::now() < deadline, "the duplicate instance was never refused"),
        }
    };
    match &refused {
        ConsumeError::Group { error, .. } => assert_eq!(error.code, ErrorCode::InstanceInUse, "{refused}"),
        other => panic!("unexpected error {other}"),
    }
    assert!(refused.to_string().contains("instance id 'a' is in use"), "{refused}");
    a2.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_members_partitions_go_to_the_others_after_its_groups_session() {
    // The broker's session is long; the group sets its own, shorter one.
    let node = DevNode::start_with_env(&[
        ("QUIVER_GROUPS__SESSION_TIMEOUT_MS", "60000"),
        ("QUIVER_GROUPS__OFFSETS_TOPIC_PARTITIONS", "5"),
    ]);
    node.ok(&["topic", "create", "jobs", "-p", "4"]);
    let e = node.fails(&["group", "configure", "workers", "-c", "session.timeout.ms=100"]);
    assert!(e.contains("must be longer than the heartbeat interval"), "{e}");
    assert!(node.fails(&["group", "configure", "workers", "-c", "retention=1"]).contains("unknown group config"));
    let set =
        node.ok(&["group", "configure", "workers", "-c", "session.timeout.ms=3000", "-c", "heartbeat.interval.ms=200"]);
    assert!(set.contains("session.timeout.ms=3000") && set.contains("heartbeat.interval.ms=200"), "{set}");
    let client = Client::connect(node.client_config()).await.unwrap();
    let (mut a, _) = member(&client, "workers", "jobs", earliest()).await;
    let (mut b, b_log) = member(&client, "workers", "jobs", earliest()).await;
    poll_all(&mut [&mut a, &mut b], Duration::from_secs(30), |_, c| owned(c[0]).len() == 2 && owned(c[1]).len() == 2)
        .await;
    let described = node.ok(&["group", "describe", "workers"]);
    assert!(described.contains("session.timeout.ms=3000 (group)"), "{described}");
    // A "crashes": no leave, no more heartbeats.
    let crashed_at = Instant::now();
    drop(a);
    poll_all(&mut [&mut b], Duration::from_secs(30), |_, c| owned(c[0]).len() == 4).await;
    let waited = crashed_at.elapsed();
    assert!(waited >= Duration::from_secs(2), "B got A's partitions before A's session (3 s) ended: {waited:?}");
    assert!(waited < Duration::from_secs(20), "the group's session was not used: {waited:?}");
    assert!(matches!(b_log.events().last(), Some(Event::Assigned(p)) if p.len() == 2), "{:?}", b_log.events());
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_group_requests_get_clear_errors_and_change_nothing() {
    let node = DevNode::start_with_env(&GROUP_ENV);
    node.ok(&["topic", "create", "t", "-p", "2"]);
    let client = Client::connect(node.client_config()).await.unwrap();
    let admin = client.admin();

    // A subscription pattern that is not a regular expression.
    let mut bad = client.consumer(earliest());
    bad.subscribe_pattern("g", "(unclosed").await.unwrap();
    let e = loop {
        if let Err(e) = bad.poll().await {
            break e;
        }
    };
    assert!(e.to_string().contains("subscription pattern '(unclosed'"), "{e}");

    // Offsets: unknown topic or partition, a member that is not one.
    let e = admin.set_group_offsets("g2", vec![("nope".into(), 0, 1)]).await.unwrap_err();
    assert!(e.to_string().contains("unknown_topic"), "{e}");
    let e = admin.set_group_offsets("g2", vec![("t".into(), 7, 1)]).await.unwrap_err();
    assert!(e.to_string().contains("there is no partition 7"), "{e}");
    let e = admin.set_group_offsets("g2", vec![("t".into(), 0, -5)]).await.unwrap_err();
    assert!(e.to_string().contains("negative"), "{e}");
    assert!(admin.group_offsets("g2", None).await.unwrap().is_empty(), "nothing was stored");
    let e = admin.describe_group("g2").await.unwrap_err();
    assert!(e.to_string().contains("unknown_group"), "{e}");

    // A member commits only what it owns, at its epoch.
    let (mut m, _) = member(&client, "g3", "t", earliest()).await;
    poll_all(&mut [&mut m], Duration::from_secs(30), |_, c| owned(c[0]).len() == 2).await;
    let (_, member_id, epoch) = m.group_metadata().unwrap();
    let commit = |member_id: &str, epoch: i32, partition: u32| {
        let request = quiver_protocol::messages::OffsetCommitRequest {
            group: "g3".into(),
            member_id: member_id.into(),
            member_epoch: epoch,
            offsets: vec![quiver_protocol::messages::CommittedOffset {
                topic: "t".into(),
                partition,
                offset: 0,
                metadata: String::new(),
                committed_at_ms: 0,
            }],
        };
        let client = client.clone();
        async move { client.call(&request).await }
    };
    let code = |r: Result<_, quiver_client::CallError>| match r {
        Err(quiver_client::CallError::Broker(e)) => e.code,
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    };
    assert_eq!(code(commit("someone-else", 1, 0).await), ErrorCode::UnknownMember);
    assert_eq!(code(commit(&member_id, epoch + 7, 0).await), ErrorCode::FencedMemberEpoch);
    // Setting offsets by hand while the group has a member.
    let e = admin.set_group_offsets("g3", vec![("t".into(), 0, 0)]).await.unwrap_err();
    assert!(e.to_string().contains("has 1 active member(s): stop its consumers first"), "{e}");
    let e = admin.delete_group("g3").await.unwrap_err();
    assert!(e.to_string().contains("group_not_empty"), "{e}");
    m.close().await.unwrap();
    admin.delete_group("g3").await.unwrap();
    assert!(admin.describe_group("g3").await.is_err());

    // Group names; the offsets topic is the coordinators' own.
    let e = client.consumer(earliest()).subscribe("", &["t"]).await.unwrap_err();
    assert!(e.to_string().contains("group name is empty"), "{e}");
    let out = node.produce(&["topic", "produce", "__consumer_offsets"], b"x\n");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("internal topic"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(node.fails(&["topic", "delete", "__consumer_offsets"]).contains("internal topic"));
    // A group member does not seek outside its partitions, nor assign by hand.
    let (mut m, _) = member(&client, "g4", "t", earliest()).await;
    assert!(
        m.seek("t", 0, quiver_client::OffsetSpec::Earliest).await.unwrap_err().to_string().contains("not assigned")
    );
    assert!(m.assign("t", None, quiver_client::OffsetSpec::Earliest).await.is_err());
    m.close().await.unwrap();
}

#[test]
fn the_cli_consumes_as_a_group_and_manages_groups() {
    let node = DevNode::start_with_env(&GROUP_ENV);
    node.ok(&["topic", "create", "logs", "-p", "3"]);
    let input: String = (0..90).map(|i| format!("k{i}:line {i}\n")).collect();
    assert!(node.produce(&["topic", "produce", "logs", "--key-sep", ":"], input.as_bytes()).status.success());

    // Two runs of one group read every record once between them: the
    // first stops after 40 and commits exactly what it printed.
    let first = json_lines(
        &node.ok(&["topic", "consume", "logs", "--group", "etl", "-o", "start", "-n", "40", "--format", "json"]),
    );
    assert_eq!(first.len(), 40);
    let second = json_lines(
        &node.ok(&["topic", "consume", "logs", "--group", "etl", "-o", "start", "-n", "50", "--format", "json"]),
    );
    let mut values: Vec<String> =
        first.iter().chain(&second).map(|r| r["value"].as_str().unwrap().to_string()).collect();
    values.sort();
    values.dedup();
    assert_eq!(values.len(), 90);

    let described = node.ok(&["group", "describe", "etl"]);
    assert!(described.contains("state empty"), "{described}");
    let lags: Vec<serde_json::Value> =
        serde_json::from_str::<serde_json::Value>(&node.ok(&["group", "describe", "etl", "--format", "json"])).unwrap()
            ["offsets"]
            .as_array()
            .unwrap()
            .clone();
    assert_eq!(lags.iter().map(|o| o["lag"].as_i64().unwrap()).sum::<i64>(), 0);

    // Reset to the start (dry run first), then a run reads everything again.
    let plan = node.ok(&[
        "group",
        "reset-offsets",
        "etl",
        "--topic",
        "logs",
        "--to",
        "start",
        "--dry-run",
        "--format",
        "json",
    ]);
    let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
    assert_eq!(plan["dry_run"], true);
    assert!(plan["offsets"].as_array().unwrap().iter().all(|o| o["offset"] == 0), "{plan}");
    let lag_after_dry_run: serde_json::Value =
        serde_json::from_str(&node.ok(&["group", "describe", "etl", "--format", "json"])).unwrap();
    assert!(lag_after_dry_run["offsets"].as_array().unwrap().iter().all(|o| o["lag"] == 0), "dry run changed nothing");
    node.ok(&["group", "reset-offsets", "etl", "--topic", "logs", "--to", "start"]);
    let again = json_lines(&node.ok(&["topic", "consume", "logs", "--group", "etl", "-n", "90", "--format", "json"]));
    assert_eq!(again.len(), 90);
    node.ok(&["group", "reset-offsets", "etl", "--topic", "logs", "-p", "1", "--to", "offset:5"]);
    let described: serde_json::Value =
        serde_json::from_str(&node.ok(&["group", "describe", "etl", "--format", "json"])).unwrap();
    let p1 = described["offsets"].as_array().unwrap().iter().find(|o| o["partition"] == 1).unwrap().clone();
    assert_eq!(p1["committed"], 5, "{described}");

    // An active group refuses a reset and a delete; the member's own
    // assignment shows in describe.
    let running = node
        .command(&["topic", "consume", "logs", "--group", "etl", "--format", "json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node.ok(&["group", "describe", "etl"]).contains("state stable") {
        assert!(Instant::now() < deadline, "the member never became stable");
        std::thread::sleep(Duration::from_millis(100));
    }
    let e = node.fails(&["group", "reset-offsets", "etl", "--topic", "logs", "--to", "end"]);
    assert!(e.contains("cannot reset the offsets of an active group"), "{e}");
    assert!(node.fails(&["group", "delete", "etl"]).contains("stop its consumers first"));
    let members: serde_json::Value =
        serde_json::from_str(&node.ok(&["group", "describe", "etl", "--format", "json"])).unwrap();
    let assigned: Vec<u64> = members["members"][0]["assignment"][0]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert_eq!(assigned, vec![0, 1, 2], "{members}");
    unsafe { libc::kill(running.id() as i32, libc::SIGTERM) };
    let out = running.wait_with_output().unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    for event in ["assigned", "revoked"] {
        let line = format!(r#""event":"{event}","partitions":["logs-0","logs-1","logs-2"]"#);
        assert!(log.contains(&line), "{log}");
    }
    node.ok(&["group", "delete", "etl"]);
    assert!(node.fails(&["group", "describe", "etl"]).contains("group 'etl' does not exist"));
    assert!(node.fails(&["topic", "consume", "logs", "--group", "etl", "-o", "5"]).contains("start or end"));
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&node.ok(&["group", "list", "--format", "json"])).unwrap();
    assert!(listed.iter().all(|g| g["group"] != "etl"), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_records_of_a_failed_fetch_are_read_again() {
    let node = DevNode::start();
    node.ok(&["topic", "create", "one", "-p", "1"]);
    let client = Client::connect(node.client_config()).await.unwrap();
    produce_keyed(&client, "one", 0, 10).await;
    let mut consumer = client.consumer(earliest());
    consumer.assign("one", None, quiver_client::OffsetSpec::Earliest).await.unwrap();
    // A partition that does not exist fails the fetch; the records of the
    // partition that answered must not be skipped.
    consumer.seek("one", 5, quiver_client::OffsetSpec::Offset(0)).await.unwrap();
    let e = consumer.poll().await.unwrap_err();
    assert!(e.to_string().contains("no partition 5"), "{e}");
    assert_eq!(consumer.position("one", 0), Some(0));
    consumer.unassign("one", 5);
    let mut offsets = Vec::new();
    while offsets.len() < 10 {
        offsets.extend(consumer.poll().await.unwrap().iter().map(|r| r.offset));
    }
    assert_eq!(offsets, (0..10).collect::<Vec<i64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_policies_pauses_and_manual_commits() {
    let node = DevNode::start_with_env(&GROUP_ENV);
    node.ok(&["topic", "create", "p", "-p", "2"]);
    let client = Client::connect(node.client_config()).await.unwrap();
    produce_keyed(&client, "p", 0, 20).await;

    // `none`: a partition without a commit is an error, not a guess.
    let (mut strict, _) =
        member(&client, "strict", "p", ConsumerConfig { auto_offset_reset: OffsetReset::None, ..earliest() }).await;
    let e = loop {
        if let Err(e) = strict.poll().await {
            break e;
        }
    };
    assert!(matches!(e, ConsumeError::NoOffset { .. }), "{e}");
    assert!(e.to_string().contains("no committed offset"), "{e}");
    drop(strict);

    // `latest`: only what comes after the member got its partitions.
    let manual = ConsumerConfig { auto_offset_reset: OffsetReset::Latest, enable_auto_commit: false, ..earliest() };
    let (mut late, _) = member(&client, "late", "p", manual).await;
    poll_all(&mut [&mut late], Duration::from_secs(30), |_, c| owned(c[0]).len() == 2).await;
    produce_keyed(&client, "p", 20, 30).await;
    let read = poll_all(&mut [&mut late], Duration::from_secs(30), |r, _| r[0].len() >= 10).await;
    let values: BTreeSet<String> = read[0].iter().map(|(_, _, v)| v.clone()).collect();
    assert_eq!(values, (20..30).map(|i| format!("v{i}")).collect());
    assert_eq!(late.committed("p", 0).await.unwrap(), None, "no auto-commit");
    late.commit_async().unwrap().await.unwrap().unwrap();
    let committed = late.committed("p", 0).await.unwrap().unwrap() + late.committed("p", 1).await.unwrap().unwrap();
    assert_eq!(committed, 30);

    // A paused partition keeps its place and is not read until resumed.
    late.pause("p", 0);
    assert_eq!(late.paused(), vec![("p".to_string(), 0)]);
    produce_keyed(&client, "p", 30, 60).await;
    let ends: Vec<i64> = {
        let probe = client.consumer(ConsumerConfig::default());
        let mut ends = Vec::new();
        for p in 0..2 {
            ends.push(probe.lookup("p", p, quiver_protocol::messages::OFFSET_LATEST).await.unwrap());
        }
        ends
    };
    let read = poll_all(&mut [&mut late], Duration::from_secs(30), |_, c| c[0].position("p", 1) == Some(ends[1])).await;
    assert!(read[0].iter().all(|(p, _, _)| *p == 1), "read a paused partition");
    late.resume("p", 0);
    poll_all(&mut [&mut late], Duration::from_secs(30), |_, c| c[0].position("p", 0) == Some(ends[0])).await;
    // Closing without auto-commit leaves the commits where they were.
    late.close().await.unwrap();
    let after = client.admin().group_offsets("late", None).await.unwrap();
    assert_eq!(after.iter().map(|o| o.offset).sum::<i64>(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_outside_the_log_starts_where_the_reset_policy_says() {
    let node = DevNode::start_with_env(&GROUP_ENV);
    node.ok(&["topic", "create", "short", "-p", "1"]);
    let client = Client::connect(node.client_config()).await.unwrap();
    produce_keyed(&client, "short", 0, 10).await;
    // As if retention had passed the group by, or the topic was created
    // again: the committed offset is past the log's end.
    client.admin().set_group_offsets("behind", vec![("short".into(), 0, 1_000)]).await.unwrap();
    let (mut m, _) = member(&client, "behind", "short", earliest()).await;
    let read = poll_all(&mut [&mut m], Duration::from_secs(30), |r, _| r[0].len() >= 10).await;
    assert_eq!(read[0].iter().map(|(_, o, _)| *o).collect::<Vec<_>>(), (0..10).collect::<Vec<i64>>());
    m.close().await.unwrap();
    assert_eq!(client.admin().group_offsets("behind", None).await.unwrap()[0].offset, 10);
}
