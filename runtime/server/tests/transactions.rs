//! Transactions through the real binary: `topic produce --transactional-id`
//! commits in chunks that read_committed consumers see whole; a second
//! instance of a transactional id (another process) fences the first, whose
//! records are never visible; a producer killed in the middle of a
//! transaction leaves it hanging until its timeout (or an operator's
//! `transaction abort`), after which the last stable offset moves and
//! compaction cleans past it; bad input gets a clear error and loses
//! nothing.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{DevNode, json_lines};
use quiver_client::{Client, ProducerConfig, ProducerRecord};

/// Values a consumer with `isolation` reads from the start to the end
/// offsets as of now.
fn read(node: &DevNode, topic: &str, isolation: &str) -> Vec<String> {
    let out = node.ok(&["topic", "consume", topic, "-o", "start:end", "--isolation", isolation]);
    out.lines().map(str::to_owned).collect()
}

fn describe(node: &DevNode, id: &str) -> serde_json::Value {
    serde_json::from_str(&node.ok(&["transaction", "describe", id, "--format", "json"])).unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A `topic produce --transactional-id` process fed through a pipe, one
/// huge transaction: it stays open until the pipe closes.
fn hanging_producer(node: &DevNode, topic: &str, id: &str, timeout_ms: &str) -> Child {
    node.command(&[
        "topic",
        "produce",
        topic,
        "--key-sep",
        "=",
        "--transactional-id",
        id,
        "--transaction-size",
        "1000000",
        "--transaction-timeout-ms",
        timeout_ms,
        "--linger-ms",
        "0",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

/// Writes lines to a hanging producer and waits until its transaction is
/// open at the coordinator with a partition in it.
fn feed(node: &DevNode, child: &mut Child, id: &str, lines: &[&str]) {
    let stdin = child.stdin.as_mut().unwrap();
    for line in lines {
        writeln!(stdin, "{line}").unwrap();
    }
    stdin.flush().unwrap();
    wait_for("the transaction open with a partition", Duration::from_secs(30), || {
        let out = node.quiver(&["transaction", "describe", id, "--format", "json"]);
        out.status.success() && {
            let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            t["state"] == "ongoing" && !t["partitions"].as_array().unwrap().is_empty()
        }
    });
}

#[test]
fn cli_transactions_commit_in_chunks_that_read_committed_consumers_see_whole() {
    let node = DevNode::start();
    node.ok(&["topic", "create", "payments", "-p", "3"]);
    let input: String = (0..95).map(|i| format!("k{i}=payment-{i}\n")).collect();
    let out = node.produce(
        &["topic", "produce", "payments", "--key-sep", "=", "--transactional-id", "writer", "--transaction-size", "10"],
        input.as_bytes(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("produced 95 record(s) to 'payments' in 10 transaction(s)"), "{stderr}");

    let committed: BTreeSet<String> = read(&node, "payments", "read-committed").into_iter().collect();
    let expected: BTreeSet<String> = (0..95).map(|i| format!("payment-{i}")).collect();
    assert_eq!(committed, expected);
    // Markers are never records: read_uncommitted sees the same 95.
    assert_eq!(read(&node, "payments", "read-uncommitted").len(), 95);

    let t = describe(&node, "writer");
    assert_eq!(t["state"], "complete-commit");
    assert_eq!(t["producer_epoch"], 10, "init at 0, one bump per commit");
    let listed = node.ok(&["transaction", "list"]);
    assert!(listed.lines().any(|l| l.starts_with("writer\tcomplete-commit")), "{listed}");
}

#[test]
fn a_second_instance_fences_the_first_whose_records_are_never_seen() {
    let node = DevNode::start();
    node.ok(&["topic", "create", "ledger", "-p", "2"]);
    let mut zombie = hanging_producer(&node, "ledger", "ledger-writer", "60000");
    feed(&node, &mut zombie, "ledger-writer", &["a=zombie-1", "b=zombie-2", "c=zombie-3"]);

    // Another process takes the id over: the zombie's open transaction is
    // aborted, and it is fenced.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(node.client_config()).await.unwrap();
        let producer = client.transactional_producer("ledger-writer", ProducerConfig::default());
        producer.init().await.unwrap();
        producer.begin().unwrap();
        producer.send(ProducerRecord::new("ledger", "new-1").key("a")).await.unwrap().await.unwrap();
        producer.commit().await.unwrap();
    });

    // The zombie's next records and its commit are refused.
    {
        let stdin = zombie.stdin.as_mut().unwrap();
        writeln!(stdin, "d=zombie-4").unwrap();
    }
    drop(zombie.stdin.take());
    let out = zombie.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the fenced producer must fail: {stderr}");
    assert!(stderr.contains("fenced"), "{stderr}");

    assert_eq!(read(&node, "ledger", "read-committed"), vec!["new-1".to_owned()]);
    let uncommitted: BTreeSet<String> = read(&node, "ledger", "read-uncommitted").into_iter().collect();
    assert!(uncommitted.contains("zombie-1"), "the aborted records are in the log: {uncommitted:?}");
    assert!(!uncommitted.contains("zombie-4"), "a fenced write is never appended: {uncommitted:?}");
}

#[test]
fn a_hanging_transaction_ends_at_its_timeout_or_by_an_operator_and_compaction_passes_it() {
    let node = DevNode::start();
    node.ok(&["topic", "create", "table", "-p", "1", "-c", "cleanup.policy=compact"]);
    node.produce(&["topic", "produce", "table", "--key-sep", "="], b"a=1\nb=1\n");

    // A producer killed with its transaction open: read_committed readers
    // stop at it until the coordinator aborts it at its timeout.
    let mut killed = hanging_producer(&node, "table", "crashed", "2000");
    feed(&node, &mut killed, "crashed", &["a=aborted", "c=aborted"]);
    killed.kill().unwrap();
    killed.wait().unwrap();
    let after = node.produce(&["topic", "produce", "table", "--key-sep", "="], b"b=2\n");
    assert!(after.status.success());
    assert_eq!(read(&node, "table", "read-committed"), vec!["1", "1"], "stopped at the open transaction");
    wait_for("the timeout's abort", Duration::from_secs(30), || {
        describe(&node, "crashed")["state"] == "complete-abort"
    });
    assert_eq!(read(&node, "table", "read-committed"), vec!["1", "1", "2"]);

    // One left hanging with a long timeout: an operator aborts it.
    let mut hanging = hanging_producer(&node, "table", "stuck", "600000");
    feed(&node, &mut hanging, "stuck", &["d=aborted"]);
    hanging.kill().unwrap();
    hanging.wait().unwrap();
    assert!(node.fails(&["transaction", "abort", "nobody"]).contains("unknown_transactional_id"));
    let out = node.ok(&["transaction", "abort", "stuck"]);
    assert!(out.contains("aborted the transaction of 'stuck' (1 partition(s))"), "{out}");
    assert_eq!(describe(&node, "stuck")["state"], "complete-abort");
    assert!(node.fails(&["transaction", "abort", "stuck"]).contains("no transaction is open"));
    node.produce(&["topic", "produce", "table", "--key-sep", "="], b"e=1\n");
    assert_eq!(read(&node, "table", "read-committed"), vec!["1", "1", "2", "1"]);

    // Compaction is not held back: it cleans past both, drops the aborted
    // records and keeps each key's latest committed value.
    let compacted = json_lines(&node.ok(&["topic", "compact", "table", "--format", "json"]));
    assert!(!compacted.is_empty());
    let uncommitted = read(&node, "table", "read-uncommitted");
    assert!(!uncommitted.iter().any(|v| v == "aborted"), "aborted records dropped by the cleaner: {uncommitted:?}");
    let keyed =
        node.ok(&["topic", "consume", "table", "-o", "start:end", "--key-sep", "=", "--isolation", "read-committed"]);
    let table: BTreeSet<&str> = keyed.lines().collect();
    assert_eq!(table, BTreeSet::from(["a=1", "b=2", "e=1"]));
}

#[test]
fn bad_transactional_input_gets_a_clear_error_and_loses_nothing() {
    let node = DevNode::start();
    node.ok(&["topic", "create", "t", "-p", "1"]);
    let produce = |args: &[&str]| {
        let mut all = vec!["topic", "produce", "t"];
        all.extend_from_slice(args);
        node.produce(&all, b"x\n")
    };
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();
    let zero = produce(&["--transactional-id", "w", "--transaction-size", "0"]);
    assert!(
        !zero.status.success() && stderr(&zero).contains("--transaction-size must be at least 1"),
        "{}",
        stderr(&zero)
    );
    let empty = produce(&["--transactional-id", ""]);
    assert!(!empty.status.success() && stderr(&empty).contains("transactional id is empty"), "{}", stderr(&empty));
    let long = produce(&["--transactional-id", "w", "--transaction-timeout-ms", "99999999"]);
    assert!(!long.status.success() && stderr(&long).contains("invalid_transaction_timeout"), "{}", stderr(&long));
    let size_alone = produce(&["--transaction-size", "5"]);
    assert!(!size_alone.status.success() && stderr(&size_alone).contains("--transactional-id"));
    assert!(node.fails(&["topic", "consume", "t", "--isolation", "sometimes"]).contains("read-committed"));
    assert!(node.fails(&["transaction", "describe", "never-initialised"]).contains("unknown_transactional_id"));
    // Clients may not write the coordinators' topic.
    let internal = node.produce(&["topic", "produce", "__transaction_state", "-p", "0"], b"x\n");
    assert!(!internal.status.success() && stderr(&internal).contains("internal topic"), "{}", stderr(&internal));

    // Nothing of the refused attempts was written; a good one still works.
    assert!(read(&node, "t", "read-uncommitted").is_empty());
    let good = produce(&["--transactional-id", "w"]);
    assert!(good.status.success(), "{}", stderr(&good));
    assert_eq!(read(&node, "t", "read-committed"), vec!["x"]);
}

/// Consume → transform → produce in transactions (`send_offsets`): outputs
/// and the group's offsets commit together. An aborted round (a crash
/// before the commit, in effect) leaves neither its outputs nor its
/// offsets: the next round reads the same inputs again and the outputs a
/// read_committed reader sees are each input's, once. A member the group
/// fenced cannot commit offsets in a transaction.
#[test]
fn consume_transform_produce_is_exactly_once_with_offsets_in_the_transaction() {
    use quiver_client::{ConsumerConfig, OffsetReset};
    let node = DevNode::start();
    node.ok(&["topic", "create", "in", "-p", "2"]);
    node.ok(&["topic", "create", "out", "-p", "2"]);
    // Four batches per partition: polls of one batch each make several
    // rounds.
    for chunk in 0..4 {
        let input: String = (chunk * 50..chunk * 50 + 50).map(|i| format!("k{i}=v{i}\n")).collect();
        assert!(node.produce(&["topic", "produce", "in", "--key-sep", "="], input.as_bytes()).status.success());
    }

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(node.client_config()).await.unwrap();
        let config = || ConsumerConfig {
            auto_offset_reset: OffsetReset::Earliest,
            enable_auto_commit: false,
            isolation: quiver_client::Isolation::ReadCommitted,
            fetch_max_wait: Duration::from_millis(100),
            partition_fetch_bytes_max: 1,
            ..ConsumerConfig::default()
        };
        let mut consumer = client.consumer(config());
        consumer.subscribe("upper", &["in"]).await.unwrap();
        let producer = client.transactional_producer("upper-0", ProducerConfig::default());
        producer.init().await.unwrap();
        let (mut processed, mut rounds) = (0usize, 0usize);
        while processed < 200 {
            let records = consumer.poll().await.unwrap();
            if records.is_empty() {
                continue;
            }
            rounds += 1;
            producer.begin().unwrap();
            for r in &records {
                let value = String::from_utf8(r.value.as_deref().unwrap().to_vec()).unwrap().to_uppercase();
                producer.send(ProducerRecord::new("out", value).key(r.key.clone().unwrap())).await.unwrap();
            }
            let offsets: Vec<(String, u32, i64)> = consumer
                .assignment()
                .into_iter()
                .filter_map(|(t, p)| consumer.position(&t, p).map(|o| (t, p, o)))
                .collect();
            producer.send_offsets(&offsets, &consumer.group_metadata().unwrap()).await.unwrap();
            if rounds == 2 {
                // As if the process died before committing: abort, and
                // read again from the group's committed offsets.
                producer.abort().await.unwrap();
                for (t, p, _) in &offsets {
                    let committed = consumer.committed(t, *p).await.unwrap().unwrap_or(0);
                    consumer.seek(t, *p, quiver_client::OffsetSpec::Offset(committed)).await.unwrap();
                }
                continue;
            }
            producer.commit().await.unwrap();
            processed += records.len();
        }
        assert!(rounds > 3, "{rounds} rounds: the aborted one and others");
        // A member whose epoch is stale (fenced) cannot commit offsets in a
        // transaction: the transaction can only be aborted.
        let (group, member, epoch) = consumer.group_metadata().unwrap();
        producer.begin().unwrap();
        let stale = producer.send_offsets(&[("in".into(), 0, 1)], &(group, member, epoch + 5)).await.unwrap_err();
        assert!(stale.to_string().contains("fenced_member_epoch"), "{stale}");
        assert!(producer.commit().await.is_err(), "a failed send_offsets makes the transaction abortable");
        producer.abort().await.unwrap();
        consumer.close().await.unwrap();
    });
    let out = read(&node, "out", "read-committed");
    let expected: BTreeSet<String> = (0..200).map(|i| format!("V{i}")).collect();
    assert_eq!(out.len(), 200, "each input's output once: {} outputs", out.len());
    assert_eq!(out.into_iter().collect::<BTreeSet<_>>(), expected);
    let described = node.ok(&["group", "describe", "upper", "--format", "json"]);
    let g: serde_json::Value = serde_json::from_str(&described).unwrap();
    let lag: i64 = g["offsets"].as_array().unwrap().iter().map(|o| o["lag"].as_i64().unwrap()).sum();
    assert_eq!(lag, 0, "the group's offsets reached the ends: {described}");
}
