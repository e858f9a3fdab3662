//! Plugins through the real `quiver` binary: a transform with a
//! dead-letter policy surviving kill -9, a serializer rejecting a batch
//! whole, a read-side filter, `plugin test`, and deploy-time errors.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{DevNode, json_lines};
use quiver_plugin_host::builder::first_party;

fn plugin(name: &str) -> String {
    first_party(name).expect("build plugin").display().to_string()
}

fn values(node: &DevNode, topic: &str) -> Vec<serde_json::Value> {
    json_lines(&node.ok(&["topic", "consume", topic, "-o", "start:end", "--format", "json"]))
}

/// Waits until the transform has processed everything in its input: every
/// input partition that holds records has progress (a task that has not
/// finished a step yet shows none), with no lag.
fn caught_up(node: &DevNode, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = &json_lines(&node.ok(&["plugin", "describe", name, "--format", "json"]))[0];
        let progress = d["progress"].as_array().cloned().unwrap_or_default();
        // `topic describe`: partition, leader, replicas, isr, start, high_watermark, ...
        let input = node.ok(&["topic", "describe", d["input"].as_str().unwrap()]);
        let holding = input.lines().skip(2).map(|l| l.split('\t').collect::<Vec<_>>()).take_while(|c| c.len() > 5);
        let mut holding = holding.filter(|c| c[4] != c[5]).map(|c| c[0].parse::<u64>().unwrap());
        let done = |p: u64| progress.iter().any(|x| x["partition"] == p && x["lag"] == 0);
        if holding.all(done) && progress.iter().all(|p| p["lag"] == 0) {
            return;
        }
        assert!(Instant::now() < deadline, "transform did not catch up: {d}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn transform_filters_dead_letters_and_resumes_after_kill9() {
    let mut node = DevNode::start();
    for (t, p) in [("orders", "3"), ("big", "2"), ("dlq", "1")] {
        node.ok(&["topic", "create", t, "-p", p]);
    }
    let wasm = plugin("json-filter");
    let out = node.ok(&[
        "plugin",
        "deploy",
        "big-orders",
        &wasm,
        "--kind",
        "transform",
        "--input",
        "orders",
        "--output",
        "big",
        "--param",
        "field=amount",
        "--param",
        "op=gt",
        "--param",
        "value=100",
        "--on-error",
        "dead-letter=dlq",
    ]);
    assert!(out.contains("version 1"), "{out}");

    let mut input = String::new();
    for i in 0..300 {
        input.push_str(&format!("k{i}\t{{\"id\":{i},\"amount\":{}}}\n", i % 200));
    }
    input.push_str("kbad\tnot json\n");
    assert!(node.produce(&["topic", "produce", "orders", "--key-sep", "\\t"], input.as_bytes()).status.success());
    caught_up(&node, "big-orders");
    let ids = |node: &DevNode| -> Vec<i64> {
        let mut ids: Vec<i64> = values(node, "big")
            .iter()
            .map(|r| {
                serde_json::from_str::<serde_json::Value>(r["value"].as_str().unwrap()).unwrap()["id"].as_i64().unwrap()
            })
            .collect();
        ids.sort();
        ids.dedup();
        ids
    };
    let expected: Vec<i64> = (0..300).filter(|i| i % 200 > 100).collect();
    assert_eq!(ids(&node), expected);
    let dlq = values(&node, "dlq");
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0]["value"], "not json");
    let header = |name: &str| dlq[0]["headers"].as_array().unwrap().iter().find(|h| h["key"] == name).cloned();
    assert!(header("quiver.error").unwrap()["value"].as_str().unwrap().contains("value is not JSON"), "{}", dlq[0]);
    assert!(header("quiver.source").unwrap()["value"].as_str().unwrap().starts_with("orders/"), "{}", dlq[0]);
    let logs = node.ok(&["plugin", "logs", "big-orders"]);
    assert!(logs.contains("dead-lettered record orders-"), "{logs}");

    // kill -9, more input while down, restart: the transform resumes from
    // its stored progress and loses nothing.
    node.kill9();
    node.spawn();
    let mut more = String::new();
    for i in 300..400 {
        more.push_str(&format!("k{i}\t{{\"id\":{i},\"amount\":500}}\n"));
    }
    assert!(node.produce(&["topic", "produce", "orders", "--key-sep", "\\t"], more.as_bytes()).status.success());
    caught_up(&node, "big-orders");
    let expected: Vec<i64> = (0..400).filter(|i| *i >= 300 || i % 200 > 100).collect();
    assert_eq!(ids(&node), expected);

    // Pause, resume, remove.
    node.ok(&["plugin", "pause", "big-orders"]);
    let d = &json_lines(&node.ok(&["plugin", "describe", "big-orders", "--format", "json"]))[0];
    assert_eq!(d["state"], "paused");
    node.ok(&["plugin", "resume", "big-orders"]);
    node.ok(&["plugin", "remove", "big-orders"]);
    assert!(node.fails(&["plugin", "describe", "big-orders"]).contains("not deployed"));
}

#[test]
fn a_trapping_transform_never_takes_the_broker_down() {
    let node = DevNode::start();
    node.ok(&["topic", "create", "in", "-p", "1"]);
    node.ok(&["topic", "create", "out", "-p", "1"]);
    let wasm = plugin("misbehave");
    node.ok(&[
        "plugin",
        "deploy",
        "bad",
        &wasm,
        "--kind",
        "transform",
        "--input",
        "in",
        "--output",
        "out",
        "--on-error",
        "fail",
        // At-least-once: the records before the trap are written even when
        // a step holds both batches (an exactly-once step that fails writes
        // nothing).
        "--guarantee",
        "at-least-once",
    ]);
    // One batch per produce call: the fine records, then the trap.
    assert!(node.produce(&["topic", "produce", "in"], b"a\nb\n").status.success());
    assert!(node.produce(&["topic", "produce", "in"], b"trap\n").status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = &json_lines(&node.ok(&["plugin", "describe", "bad", "--format", "json"]))[0];
        if d["state"] == "failed" {
            assert!(d["reason"].as_str().unwrap().contains("trapped"), "{d}");
            break;
        }
        assert!(Instant::now() < deadline, "the policy did not pause the transform: {d}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(values(&node, "out").len(), 2, "records before the trap were transformed");
    // The broker still serves.
    assert!(node.produce(&["topic", "produce", "in"], b"c\n").status.success());
    assert_eq!(values(&node, "in").len(), 4);
}

#[test]
fn a_serializer_rejects_a_bad_batch_whole_and_a_filter_runs_in_the_fetch() {
    let node = DevNode::start();
    let schema = r#"schema={"type":"object","required":["id"],"properties":{"id":{"type":"integer","minimum":1}}}"#;
    node.ok(&["plugin", "deploy", "ids", &plugin("json-schema"), "--kind", "serializer", "--param", schema]);
    node.ok(&["topic", "create", "users", "-p", "1", "-c", "value.serializer=ids"]);
    assert!(
        node.produce(&["topic", "produce", "users"], b"{\"id\": 1, \"c\":\"fr\"}\n{\"id\":2,\"c\":\"de\"}\n")
            .status
            .success()
    );
    let out = node.produce(&["topic", "produce", "users"], b"{\"id\":3}\n{\"id\":0}\n{\"id\":4}\n");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("record 1 rejected by serializer 'ids': at '/id': 0 is below the minimum 1"), "{stderr}");
    let stored = values(&node, "users");
    assert_eq!(stored.len(), 2, "nothing of the rejected batch was appended");
    assert_eq!(stored[0]["value"], r#"{"id":1,"c":"fr"}"#, "stored compact");

    // A topic cannot name a plugin of another kind.
    node.ok(&[
        "plugin",
        "deploy",
        "country",
        &plugin("json-match"),
        "--kind",
        "filter",
        "--param",
        "field=c",
        "--param",
        "value=x",
    ]);
    let err = node.fails(&["topic", "create", "t2", "-c", "value.serializer=country"]);
    assert!(err.contains("the plugin is a filter, not a serializer"), "{err}");

    let filtered = json_lines(&node.ok(&[
        "topic",
        "consume",
        "users",
        "-o",
        "start:end",
        "--format",
        "json",
        "--filter",
        "country",
        "--filter-param",
        "field=c",
        "--filter-param",
        "value=de",
    ]));
    assert_eq!(filtered.len(), 1);
    assert_eq!(filtered[0]["offset"], 1);
}

#[test]
fn deploy_errors_are_clear() {
    let node = DevNode::start();
    node.ok(&["topic", "create", "in"]);
    node.ok(&["topic", "create", "out"]);
    let wasm = plugin("json-filter");
    let err = node.fails(&["plugin", "deploy", "f", &wasm, "--kind", "transform", "--input", "in", "--output", "out"]);
    assert!(err.contains("the plugin refused its parameters: missing parameter 'field'"), "{err}");
    let err = node.fails(&["plugin", "deploy", "f", &wasm, "--kind", "serializer", "--param", "field=a"]);
    assert!(err.contains("the plugin is a transform, not a serializer"), "{err}");
    let err = node.fails(&[
        "plugin",
        "deploy",
        "f",
        &wasm,
        "--kind",
        "transform",
        "--input",
        "nope",
        "--output",
        "out",
        "--param",
        "field=a",
        "--param",
        "value=1",
    ]);
    assert!(err.contains("topic 'nope' does not exist"), "{err}");

    // The same component claiming another ABI version.
    let mut bytes = std::fs::read(&wasm).unwrap();
    let needle = b"quiver:plugin/transform@0.1.0";
    let spots: Vec<usize> =
        bytes.windows(needle.len()).enumerate().filter(|(_, w)| w == needle).map(|(i, _)| i).collect();
    assert!(!spots.is_empty());
    for at in spots {
        bytes[at + needle.len() - 5..at + needle.len()].copy_from_slice(b"9.9.9");
    }
    let patched: PathBuf = node.data_dir().join("patched.wasm");
    std::fs::write(&patched, bytes).unwrap();
    let err = node.fails(&["plugin", "deploy", "f", patched.to_str().unwrap(), "--kind", "transform"]);
    assert!(err.contains("built for Quiver plugin ABI 9.9.9; this broker supports 0.1.0"), "{err}");
    assert_eq!(node.ok(&["plugin", "list"]), "", "nothing was deployed");
}

#[test]
fn plugin_test_runs_a_component_on_sample_records_without_a_broker() {
    let dir = tempfile::tempdir().unwrap();
    let sample = dir.path().join("sample.jsonl");
    std::fs::write(&sample, "{\"key\":\"k\",\"value\":{\"card\":\"4111\",\"n\":1}}\n{\"value\":\"oops\"}\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args(["plugin", "test", &plugin("redact"), "--input"])
        .arg(&sample)
        .args(["--param", "fields=card"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a refused record fails the command: {stderr}");
    let lines = json_lines(&stdout);
    assert_eq!(lines.len(), 1, "{stdout}");
    assert_eq!(lines[0]["value"], r#"{"card":"***","n":1}"#);
    assert!(stderr.contains("record 1 refused: value is not JSON"), "{stderr}");
}

/// A topic naming a partitioner plugin: the client library runs the module
/// locally, the broker runs it for `PARTITION_ANY` batches, and every record
/// lands in the same partition either way (and where Kafka's murmur2 of the
/// field would put it, which is what this plugin promises). A record the
/// partitioner refuses fails its batch, with nothing appended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioner_runs_the_same_in_client_and_broker() {
    use quiver_client::{Client, PARTITION_ANY, ProducerConfig, ProducerRecord};
    let node = DevNode::start();
    let wasm = plugin("json-field-partitioner");
    let out =
        node.ok(&["plugin", "deploy", "by-customer", &wasm, "--kind", "partitioner", "--param", "field=customer.id"]);
    assert!(out.contains("version 1"), "{out}");
    let err = node.fails(&["topic", "create", "bad", "-c", "partitioner=nope"]);
    assert!(err.contains("partitioner: plugin 'nope' is not deployed"), "{err}");
    node.ok(&["topic", "create", "payments", "-p", "5", "-c", "partitioner=by-customer"]);
    let described = node.ok(&["topic", "describe", "payments"]);
    assert!(described.contains("by-customer"), "{described}");
    let err = node.fails(&["plugin", "remove", "by-customer"]);
    assert!(err.contains("named by the config of topic(s) payments"), "{err}");

    let client = Client::connect(node.client_config()).await.unwrap();
    let value = |i: u32| format!(r#"{{"customer":{{"id":"c{}"}},"n":{i}}}"#, i % 37);
    let mut placed = Vec::new();
    for locally in [true, false] {
        let producer = client.producer(ProducerConfig { partition_locally: locally, ..ProducerConfig::default() });
        let mut deliveries = Vec::new();
        for i in 0..500u32 {
            // Keys differ from the field: murmur2 of the key would disagree.
            let record = ProducerRecord::new("payments", value(i)).key(format!("key-{i}"));
            deliveries.push(producer.send(record).await.unwrap());
        }
        let mut partitions = Vec::new();
        for d in deliveries {
            let meta = d.await.unwrap();
            assert_ne!(meta.partition, PARTITION_ANY);
            partitions.push(meta.partition);
        }
        placed.push(partitions);
        // Who ran it: the broker's instance saw records only in the second round.
        let d = &json_lines(&node.ok(&["plugin", "describe", "by-customer", "--format", "json"]))[0];
        assert_eq!(d["stats"]["records_in"], if locally { 0 } else { 500 }, "locally={locally}: {d}");
    }
    assert_eq!(placed[0], placed[1], "client-side and broker-side partitioning agree");
    for (i, p) in placed[0].iter().enumerate() {
        let field = format!("c{}", i % 37);
        assert_eq!(*p, quiver_client::partitioner::partition_for_key(field.as_bytes(), 5), "record {i}");
    }

    // What was acknowledged is what is stored, in both paths.
    let stored = values(&node, "payments");
    assert_eq!(stored.len(), 1000);
    for r in &stored {
        let v: serde_json::Value = serde_json::from_str(r["value"].as_str().unwrap()).unwrap();
        let n = v["n"].as_u64().unwrap() as usize;
        assert_eq!(r["partition"].as_u64().unwrap() as u32, placed[0][n], "{r}");
    }

    // A value without the field: refused whole, locally and by the broker.
    for flag in [None, Some("--broker-partitioning")] {
        let mut args = vec!["topic", "produce", "payments"];
        args.extend(flag);
        let out = node.produce(&args, b"{\"customer\":{}}\n");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag:?}");
        assert!(
            stderr.contains("record 0 rejected by partitioner 'by-customer': the field is missing or not a scalar"),
            "{flag:?}: {stderr}"
        );
    }
    assert_eq!(values(&node, "payments").len(), 1000, "nothing of a refused batch was appended");
    let listed = node.ok(&["plugin", "list"]);
    assert!(listed.contains("by-customer"), "{listed}");
}

/// The first-party plugins not covered above, through the broker: msgpack as
/// key and value serializer (stored binary, decoded on request, a bad key
/// refused), the murmur2 partitioner (same partitions as Kafka's default),
/// the explode and redact transforms, and the Wasm identity transform next
/// to the built-in native one.
#[test]
fn first_party_plugins_through_the_broker() {
    let node = DevNode::start();
    // msgpack on keys and values.
    node.ok(&["plugin", "deploy", "mp", &plugin("msgpack"), "--kind", "serializer"]);
    node.ok(&["topic", "create", "packed", "-p", "1", "-c", "key.serializer=mp", "-c", "value.serializer=mp"]);
    let input = b"{\"user\":1}\t{\"name\":\"ada\",\"tags\":[1,2]}\n{\"user\":2}\t{\"name\":\"bob\"}\n";
    assert!(node.produce(&["topic", "produce", "packed", "--key-sep", "\\t"], input).status.success());
    let raw = values(&node, "packed");
    assert_eq!(raw.len(), 2);
    assert!(raw[0]["key"]["hex"].is_string() && raw[0]["value"]["hex"].is_string(), "stored as MessagePack: {raw:?}");
    let decoded =
        json_lines(&node.ok(&["topic", "consume", "packed", "-o", "start:end", "--format", "json", "--decode"]));
    assert_eq!(decoded[0]["key"], r#"{"user":1}"#);
    assert_eq!(decoded[0]["value"], r#"{"name":"ada","tags":[1,2]}"#);
    assert_eq!(decoded[1]["key"], r#"{"user":2}"#);
    let out = node.produce(&["topic", "produce", "packed", "--key-sep", "\\t"], b"not-json\t{\"name\":\"eve\"}\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("record 0 rejected by key serializer 'mp': value is not JSON"), "{stderr}");
    assert_eq!(values(&node, "packed").len(), 2, "nothing of the refused batch was appended");

    // murmur2: the partitions Kafka's default partitioner would choose.
    node.ok(&["plugin", "deploy", "m2", &plugin("murmur2"), "--kind", "partitioner"]);
    node.ok(&["topic", "create", "keyed", "-p", "7", "-c", "partitioner=m2"]);
    let input: String = (0..200).map(|i| format!("user-{i}\tv{i}\n")).collect();
    for flag in [None, Some("--broker-partitioning")] {
        let mut args = vec!["topic", "produce", "keyed", "--key-sep", "\\t"];
        args.extend(flag);
        assert!(node.produce(&args, input.as_bytes()).status.success(), "{flag:?}");
    }
    let keyed = values(&node, "keyed");
    assert_eq!(keyed.len(), 400);
    for r in &keyed {
        let key = r["key"].as_str().unwrap();
        let expected = quiver_client::partitioner::partition_for_key(key.as_bytes(), 7);
        assert_eq!(r["partition"].as_u64().unwrap() as u32, expected, "{r}");
    }

    // explode and redact, chained: orders -> items -> masked.
    for t in ["orders", "items", "masked"] {
        node.ok(&["topic", "create", t, "-p", "2"]);
    }
    let explode = ["--kind", "transform", "--input", "orders", "--output", "items", "--param", "field=items"];
    node.ok(
        &[&["plugin", "deploy", "explode", &plugin("explode")][..], &explode[..], &["--param", "keep=true"]].concat()
    );
    let redact = ["--kind", "transform", "--input", "items", "--output", "masked", "--param", "fields=items.card"];
    node.ok(&[&["plugin", "deploy", "redact", &plugin("redact")][..], &redact[..]].concat());
    let order = "o1\t{\"id\":1,\"items\":[{\"sku\":\"a\",\"card\":\"4111\"},{\"sku\":\"b\",\"card\":\"5500\"}]}\n";
    assert!(node.produce(&["topic", "produce", "orders", "--key-sep", "\\t"], order.as_bytes()).status.success());
    caught_up(&node, "explode");
    caught_up(&node, "redact");
    let mut masked: Vec<String> =
        values(&node, "masked").iter().map(|r| r["value"].as_str().unwrap().to_string()).collect();
    masked.sort();
    assert_eq!(
        masked,
        [r#"{"id":1,"items":{"sku":"a","card":"***"}}"#, r#"{"id":1,"items":{"sku":"b","card":"***"}}"#],
    );

    // The Wasm identity and the built-in native identity copy the same records.
    for t in ["wasm-copy", "native-copy"] {
        node.ok(&["topic", "create", t, "-p", "2"]);
    }
    let wasm = ["--kind", "transform", "--input", "keyed", "--output", "wasm-copy"];
    node.ok(&[&["plugin", "deploy", "copy-wasm", &plugin("identity")][..], &wasm[..]].concat());
    let native = ["--builtin", "identity", "--kind", "transform", "--input", "keyed", "--output", "native-copy"];
    node.ok(&[&["plugin", "deploy", "copy-native"][..], &native[..]].concat());
    caught_up(&node, "copy-wasm");
    caught_up(&node, "copy-native");
    let copy = |t: &str| {
        let mut v: Vec<(String, String)> = values(&node, t)
            .iter()
            .map(|r| (r["key"].as_str().unwrap().to_string(), r["value"].as_str().unwrap().to_string()))
            .collect();
        v.sort();
        v
    };
    let (wasm_copy, native_copy) = (copy("wasm-copy"), copy("native-copy"));
    assert_eq!(wasm_copy.len(), 400);
    assert_eq!(wasm_copy, native_copy);
    let err = node.fails(&["plugin", "deploy", "x", "--builtin", "nope", "--kind", "transform"]);
    assert!(err.contains("there is no built-in plugin 'nope' (built in: identity)"), "{err}");
}

/// A producer that is running when the topic's partitioner is redeployed
/// (new parameters: another field) follows the new version once its
/// metadata is older than `metadata_max_age`, without being recreated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_producer_picks_up_a_redeployed_partitioner() {
    use quiver_client::partitioner::partition_for_key;
    use quiver_client::{Client, ProducerConfig, ProducerRecord};
    let node = DevNode::start();
    let wasm = plugin("json-field-partitioner");
    let deploy = |field: &str| {
        let param = format!("field={field}");
        node.ok(&["plugin", "deploy", "by-field", &wasm, "--kind", "partitioner", "--param", &param])
    };
    deploy("a");
    node.ok(&["topic", "create", "routed", "-p", "7", "-c", "partitioner=by-field"]);
    let client = Client::connect(node.client_config()).await.unwrap();
    let producer = client.producer(ProducerConfig {
        metadata_max_age: Duration::from_millis(200),
        linger: Duration::from_millis(1),
        ..ProducerConfig::default()
    });
    let send = |n: u32| {
        let producer = producer.clone();
        async move {
            let value = format!(r#"{{"a":"x{n}","b":"y{n}"}}"#);
            producer.send(ProducerRecord::new("routed", value)).await.unwrap().await.unwrap().partition
        }
    };
    for n in 0..20 {
        assert_eq!(send(n).await, partition_for_key(format!("x{n}").as_bytes(), 7), "record {n} by field a");
    }
    let out = deploy("b");
    assert!(out.contains("version 2"), "{out}");
    // Sends go on; within a few metadata ages every record follows field b.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (mut n, mut following) = (20u32, 0);
    while following < 30 {
        assert!(std::time::Instant::now() < deadline, "the producer still places records by field a");
        let by_b = partition_for_key(format!("y{n}").as_bytes(), 7);
        following = if send(n).await == by_b { following + 1 } else { 0 };
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn deploy_aggregate(node: &DevNode, name: &str, input: &str, output: &str, extra: &[&str]) -> std::process::Output {
    let wasm = plugin("aggregate");
    let mut args = vec!["plugin", "deploy", name, &wasm, "--kind", "transform", "--input", input, "--output", output];
    args.extend(["--param", "field=amount"]);
    args.extend(extra);
    node.quiver(&args)
}

/// Rounds: a backlog of `records` payments piles up while transform `name`
/// (reading `payments`) is paused; it resumes, and once it is at work (the
/// first records through the plugin in this broker's life) the broker is
/// killed (-9) somewhere in the middle, a random while (`seed`) later, and
/// restarted.
fn kill_during_backlogs(node: &mut DevNode, name: &str, kills: u64, records: u64, mut seed: u64) {
    for round in 0..kills {
        node.ok(&["plugin", "pause", name]);
        let text: String = (0..records)
            .map(|i| format!("c{}\t{{\"amount\":{}}}\n", (i * 7 + round) % 50, (i % 13) as i64 - 3))
            .collect();
        let out = node.produce(&["topic", "produce", "payments", "--key-sep", "\\t"], text.as_bytes());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        node.ok(&["plugin", "resume", name]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let d = &json_lines(&node.ok(&["plugin", "describe", name, "--format", "json"]))[0];
            if d["stats"]["records_in"].as_u64().unwrap_or(0) > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "the transform did not start: {d}");
            std::thread::sleep(Duration::from_millis(5));
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(seed % 200));
        node.kill9();
        node.spawn();
    }
}

/// The aggregate transform keeps its totals in a state store changelogged
/// to `totals-state`. The broker is killed (-9) at random points of the
/// transform's work on a backlog and restarted, again and again. No input is lost or counted twice: every total emitted is the
/// key's totals after a prefix of its inputs (as the input topic holds
/// them), every prefix is emitted, and the changelog holds each key's whole
/// total. Outputs may repeat (at-least-once): a step redone after a crash
/// emits the same totals again.
#[test]
fn a_stateful_transform_keeps_exact_totals_across_kill9() {
    use common::totals::Inputs;
    let mut node = DevNode::start();
    node.ok(&["topic", "create", "payments", "-p", "2"]);
    node.ok(&["topic", "create", "spend", "-p", "2"]);
    let out = deploy_aggregate(&node, "totals", "payments", "spend", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The changelog: as many partitions as the input, compacted.
    let described = node.ok(&["topic", "describe", "totals-state", "--format", "json"]);
    let described: serde_json::Value = serde_json::from_str(&described).unwrap();
    assert_eq!(described["partitions"].as_array().unwrap().len(), 2, "{described}");
    assert!(described["configs"].to_string().contains("\"compact\""), "{described}");

    let kills = 5;
    kill_during_backlogs(&mut node, "totals", kills, 40_000, 0x9e37_79b9_7f4a_7c15);
    caught_up(&node, "totals");
    let inputs = Inputs::from_records(&values(&node, "payments"));
    let repeated = inputs.check_outputs(&values(&node, "spend")).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{repeated} outputs of {} inputs repeated after {kills} kills", inputs.len());
    // At most one step (1 MiB of input) per partition redone per kill.
    assert!(repeated < inputs.len() / 2, "{repeated} outputs repeated");
    inputs.check_state(&values(&node, "totals-state")).unwrap_or_else(|e| panic!("{e}"));
    // Compacting the changelog keeps what a rebuild needs.
    node.ok(&["topic", "compact", "totals-state"]);
    inputs.check_state(&values(&node, "totals-state")).unwrap_or_else(|e| panic!("{e}"));
    let logs = node.ok(&["plugin", "logs", "totals"]);
    assert!(logs.contains("rebuilt from 'totals-state'"), "{logs}");

    // A restart after compaction rebuilds from the compacted changelog and
    // goes on from there.
    node.kill9();
    node.spawn();
    let out = node.produce(&["topic", "produce", "payments", "--key-sep", "\\t"], b"c1\t{\"amount\":1000}\n");
    assert!(out.status.success());
    caught_up(&node, "totals");
    let inputs = Inputs::from_records(&values(&node, "payments"));
    inputs.check_outputs(&values(&node, "spend")).unwrap_or_else(|e| panic!("{e}"));
    inputs.check_state(&values(&node, "totals-state")).unwrap_or_else(|e| panic!("{e}"));
    // `plugin describe` shows the store: its changelog and its 50 keys.
    let d = &json_lines(&node.ok(&["plugin", "describe", "totals", "--format", "json"]))[0];
    assert_eq!(d["state_store"]["changelog"], "totals-state", "{d}");
    assert_eq!(d["state_store"]["keys"], 50, "{d}");
    assert!(d["state_store"]["bytes"].as_u64().unwrap() > 50 * 48, "{d}");
}

/// Bad input to a stateful transform: a changelog topic that cannot hold
/// state refuses the deploy; keyless and malformed records go to the
/// dead-letter topic and change no total.
#[test]
fn a_stateful_transform_refuses_bad_input_clearly() {
    use common::totals::Inputs;
    let node = DevNode::start();
    for (t, p) in [("in", "1"), ("out", "1"), ("dlq", "1"), ("agg-state", "1"), ("bad-state", "1")] {
        node.ok(&["topic", "create", t, "-p", p]);
    }
    let refused = deploy_aggregate(&node, "agg", "in", "out", &[]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("cannot hold this transform's state"), "{err}");
    let refused = deploy_aggregate(&node, "bad", "in", "bad-state", &[]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("is this transform's state changelog"), "{err}");
    node.ok(&["topic", "delete", "agg-state"]);
    let out = deploy_aggregate(&node, "agg", "in", "out", &["--on-error", "dead-letter=dlq"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let keyed = "k1\t{\"amount\":2}\nk1\t{\"amount\":\"x\"}\nk2\t{}\nk1\t{\"amount\":3}\n";
    assert!(node.produce(&["topic", "produce", "in", "--key-sep", "\\t"], keyed.as_bytes()).status.success());
    assert!(node.produce(&["topic", "produce", "in"], b"{\"amount\":5}\n").status.success());
    caught_up(&node, "agg");
    let mut inputs = Inputs::default();
    inputs.push("k1", 2);
    inputs.push("k1", 3);
    inputs.check_outputs(&values(&node, "out")).unwrap_or_else(|e| panic!("{e}"));
    inputs.check_state(&values(&node, "agg-state")).unwrap_or_else(|e| panic!("{e}"));
    let dlq = values(&node, "dlq");
    let reasons: Vec<String> = dlq
        .iter()
        .map(|r| {
            let h = r["headers"].as_array().unwrap().iter().find(|h| h["key"] == "quiver.error").unwrap();
            h["value"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].contains("not a number") && reasons[1].contains("missing"), "{reasons:?}");
    assert!(reasons[2].contains("keyed records"), "{reasons:?}");
}

/// `--guarantee exactly-once`: the aggregate transform's steps commit their
/// outputs, state and progress in one transaction. The broker is killed
/// (-9) in the middle of its work, again and again: a read_committed
/// reader of the outputs sees every key's totals after each of its inputs
/// exactly once, and the committed changelog holds the whole totals.
#[test]
fn an_exactly_once_transform_emits_each_total_once_across_kill9() {
    use common::totals::Inputs;
    let committed = |node: &DevNode, topic: &str| {
        let args = ["topic", "consume", topic, "-o", "start:end", "--format", "json", "--isolation", "read-committed"];
        json_lines(&node.ok(&args))
    };
    let mut node = DevNode::start();
    node.ok(&["topic", "create", "payments", "-p", "2"]);
    node.ok(&["topic", "create", "spend", "-p", "2"]);
    let out = deploy_aggregate(&node, "totals", "payments", "spend", &["--guarantee", "exactly-once"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d = &json_lines(&node.ok(&["plugin", "describe", "totals", "--format", "json"]))[0];
    assert_eq!(d["guarantee"], "exactly-once", "{d}");
    let kills = 3;
    kill_during_backlogs(&mut node, "totals", kills, 40_000, 0x2545_f491_4f6c_dd1d);
    caught_up(&node, "totals");
    let inputs = Inputs::from_records(&values(&node, "payments"));
    // The last step's transaction may still be ending: read until whole.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match inputs.check_outputs(&committed(&node, "spend")) {
            Ok(repeated) => {
                assert_eq!(repeated, 0, "read committed, no total is emitted twice");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    inputs.check_state(&committed(&node, "totals-state")).unwrap_or_else(|e| panic!("{e}"));
    let uncommitted = values(&node, "spend").len();
    eprintln!(
        "{uncommitted} outputs in the log for {} inputs after {kills} kills (aborted steps' included)",
        inputs.len()
    );
}
