//! The broker core driven with plain byte frames: no QUIC, no TLS, no
//! sockets. Checks create / produce / fetch / list-offsets, append order by
//! ticket, and that a bad batch appends nothing.

use bytes::Bytes;
use quiver_broker::{AppendOrder, Broker, BrokerConfig};
use quiver_protocol::batch::{BatchBuilder, Compression, Record, decode_records};
use quiver_protocol::codec::concat;
use quiver_protocol::frame::{decode_response, encode_request};
use quiver_protocol::messages::*;
use quiver_protocol::{ErrorCode, WireError};

async fn call<R: Request>(broker: &std::sync::Arc<Broker>, request: &R) -> Result<R::Response, WireError> {
    let frame = concat(&encode_request(request)).slice(4..);
    let response = concat(&broker.handle(frame, None).await);
    decode_response::<R::Response>(response.slice(4..)).unwrap()
}

/// A broker in a fresh directory with topic `t` of `partitions` partitions.
async fn broker_with_topic(partitions: u32) -> (tempfile::TempDir, std::sync::Arc<Broker>) {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(BrokerConfig::new(dir.path()), None).await.unwrap();
    let create = CreateTopicRequest { name: "t".into(), partitions, replication_factor: 1, configs: vec![] };
    call(&broker, &create).await.unwrap();
    (dir, broker)
}

fn batch(values: &[&str]) -> Bytes {
    let mut b = BatchBuilder::new(Compression::None);
    for v in values {
        b.append(1_000, None, Some(v.as_bytes()), &[]);
    }
    b.build()
}

/// A fetch of partition t-`partition` from `offset`, waiting up to
/// `max_wait_ms` for a first byte.
fn fetch_request(partition: u32, offset: i64, max_wait_ms: u32) -> FetchRequest {
    FetchRequest {
        isolation: Isolation::ReadUncommitted,
        max_wait_ms,
        min_bytes: 1,
        max_bytes: 1 << 20,
        partitions: vec![FetchPartition { topic: "t".into(), partition, offset, max_bytes: 1 << 20 }],
        filter: String::new(),
        filter_params: vec![],
        decode_values: false,
    }
}

/// Fetches partition t-`partition` from `offset`: the high watermark and
/// the records at or after `offset`.
async fn fetch_records(broker: &std::sync::Arc<Broker>, partition: u32, offset: i64) -> (i64, Vec<Record>) {
    let f = call(broker, &fetch_request(partition, offset, 0)).await.unwrap();
    let records = quiver_protocol::batch::Batches::new(f.partitions[0].records.clone())
        .flat_map(|b| decode_records(&b.unwrap().1).unwrap())
        .filter(|r| r.offset >= offset)
        .collect();
    (f.partitions[0].high_watermark, records)
}

/// The values of partition t-0 from `offset`, with the high watermark.
async fn fetch_values(broker: &std::sync::Arc<Broker>, offset: i64) -> (i64, Vec<Bytes>) {
    let (high_watermark, records) = fetch_records(broker, 0, offset).await;
    (high_watermark, records.into_iter().map(|r| r.value.unwrap()).collect())
}

fn produce(records: Bytes) -> ProduceRequest {
    ProduceRequest {
        transactional_id: None,
        acks: Acks::All,
        timeout_ms: 1000,
        partitions: vec![ProducePartition { topic: "t".into(), partition: 0, records }],
    }
}

#[tokio::test]
async fn produce_fetch_and_offsets_through_frames() {
    let (_dir, broker) = broker_with_topic(1).await;
    let create = CreateTopicRequest { name: "t".into(), partitions: 1, replication_factor: 1, configs: vec![] };
    let again = call(&broker, &create).await.unwrap_err();
    assert_eq!(again.code, ErrorCode::TopicAlreadyExists);

    let r = call(&broker, &produce(batch(&["a", "b"]))).await.unwrap();
    assert_eq!((r.partitions[0].error, r.partitions[0].base_offset), (ErrorCode::None, 0));
    let mut bad = batch(&["c"]).to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    let r = call(&broker, &produce(Bytes::from(bad))).await.unwrap();
    assert_eq!(r.partitions[0].error, ErrorCode::CorruptMessage);
    let r = call(&broker, &produce(batch(&["c"]))).await.unwrap();
    assert_eq!(r.partitions[0].base_offset, 2, "the corrupt batch took no offsets");

    let (high_watermark, values) = fetch_values(&broker, 1).await;
    assert_eq!(high_watermark, 3);
    assert_eq!(values, vec![Bytes::from("b"), Bytes::from("c")]);

    let latest = ListOffsetsRequest {
        partitions: vec![ListOffsetsPartition { topic: "t".into(), partition: 0, timestamp: OFFSET_LATEST }],
    };
    assert_eq!(call(&broker, &latest).await.unwrap().partitions[0].offset, 3);
    broker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_requests_append_in_ticket_order() {
    let (_dir, broker) = broker_with_topic(1).await;
    let mut order = AppendOrder::default();
    let tickets: Vec<_> = (0..20).map(|_| order.ticket()).collect();
    // Handle the requests in reverse: appends must still follow the tickets.
    let mut tasks = Vec::new();
    for (i, ticket) in tickets.into_iter().enumerate().rev() {
        let broker = broker.clone();
        let frame = concat(&encode_request(&produce(batch(&[&i.to_string()])))).slice(4..);
        tasks.push(tokio::spawn(async move { broker.handle(frame, Some(ticket)).await }));
        tokio::task::yield_now().await;
    }
    for t in tasks {
        let response = concat(&t.await.unwrap());
        let r = decode_response::<ProduceResponse>(response.slice(4..)).unwrap().unwrap();
        assert_eq!(r.partitions[0].error, ErrorCode::None);
    }
    let (_, values) = fetch_values(&broker, 0).await;
    let values: Vec<String> = values.iter().map(|v| String::from_utf8(v.to_vec()).unwrap()).collect();
    let expected: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    assert_eq!(values, expected);
    broker.shutdown();
}

/// `PARTITION_ANY` on a topic without a partitioner plugin: keyed records go
/// where murmur2 puts them (as a client would), the keyless records of one
/// batch stay together, and the answer says where each record went.
#[tokio::test]
async fn partition_any_places_keyed_records_by_murmur2() {
    let (_dir, broker) = broker_with_topic(4).await;
    let mut b = BatchBuilder::new(Compression::Lz4);
    for i in 0..40 {
        let key = format!("key-{i}");
        b.append(1_000 + i, (i % 5 != 0).then_some(key.as_bytes()), Some(format!("v{i}").as_bytes()), &[]);
    }
    let mut request = produce(b.build());
    request.partitions[0].partition = PARTITION_ANY;
    let r = call(&broker, &request).await.unwrap();
    let result = &r.partitions[0];
    assert_eq!((result.error, result.partition, result.placements.len()), (ErrorCode::None, PARTITION_ANY, 40));
    let keyless: Vec<u32> = (0..40).step_by(5).map(|i| result.placements[i].partition).collect();
    assert!(keyless.iter().all(|p| *p == keyless[0]), "keyless records of one batch stay together: {keyless:?}");
    for (i, placement) in result.placements.iter().enumerate() {
        if i % 5 != 0 {
            let expected = quiver_protocol::partitioner::partition_for_key(format!("key-{i}").as_bytes(), 4);
            assert_eq!(placement.partition, expected, "record {i}");
        }
        // The record is where the answer says, with its value.
        let (_, records) = fetch_records(&broker, placement.partition, placement.offset).await;
        let found = records.into_iter().find(|r| r.offset == placement.offset).unwrap();
        assert_eq!(found.value.unwrap(), Bytes::from(format!("v{i}")));
        assert_eq!(found.timestamp, 1_000 + i as i64);
    }
    // A topic that does not exist is refused for PARTITION_ANY too.
    request.partitions[0].topic = "nope".into();
    let r = call(&broker, &request).await.unwrap();
    assert_eq!(r.partitions[0].error, ErrorCode::UnknownTopic);
    broker.shutdown();
}

/// Long polls wait per partition: appends elsewhere leave a waiting fetch
/// waiting, an append to its partition answers it at once, and deleting its
/// topic answers it at once (with the error) instead of at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_wake_for_their_own_partitions() {
    use std::time::Duration;
    let (_dir, broker) = broker_with_topic(2).await;
    let to = |partition: u32, value: &str| ProduceRequest {
        transactional_id: None,
        acks: Acks::Leader,
        timeout_ms: 1000,
        partitions: vec![ProducePartition { topic: "t".into(), partition, records: batch(&[value]) }],
    };

    let b = broker.clone();
    let mut waiting = tokio::spawn(async move { call(&b, &fetch_request(1, 0, 60_000)).await });
    for i in 0..20 {
        call(&broker, &to(0, &format!("elsewhere-{i}"))).await.unwrap();
    }
    assert!(tokio::time::timeout(Duration::from_millis(300), &mut waiting).await.is_err(), "nothing for it yet");
    call(&broker, &to(1, "mine")).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("answered by the append");
    let answer = answer.unwrap().unwrap();
    let records = quiver_protocol::batch::Batches::new(answer.partitions[0].records.clone())
        .flat_map(|b| decode_records(&b.unwrap().1).unwrap())
        .collect::<Vec<_>>();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].value.as_deref(), Some(&b"mine"[..]));

    let b = broker.clone();
    let mut waiting = tokio::spawn(async move { call(&b, &fetch_request(1, 1, 60_000)).await });
    assert!(tokio::time::timeout(Duration::from_millis(300), &mut waiting).await.is_err(), "nothing for it yet");
    call(&broker, &DeleteTopicRequest { name: "t".into() }).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("answered by the deletion");
    assert_eq!(answer.unwrap().unwrap().partitions[0].error, ErrorCode::UnknownTopic);
}

/// A topic deleted and created again under its name: a write right after
/// the creation goes to the new topic's log, never to the old one being
/// removed (which would lose an acknowledged record or fail it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_again_takes_writes_at_once() {
    let (_dir, broker) = broker_with_topic(1).await;
    for round in 0..10 {
        let r = call(&broker, &produce(batch(&["old"]))).await.unwrap();
        assert_eq!(r.partitions[0].error, ErrorCode::None, "round {round}: {}", r.partitions[0].message);
        call(&broker, &DeleteTopicRequest { name: "t".into() }).await.unwrap();
        let create = CreateTopicRequest { name: "t".into(), partitions: 1, replication_factor: 1, configs: vec![] };
        call(&broker, &create).await.unwrap();
        let value = format!("new-{round}");
        let r = call(&broker, &produce(batch(&[&value]))).await.unwrap();
        assert_eq!(
            (r.partitions[0].error, r.partitions[0].base_offset),
            (ErrorCode::None, 0),
            "round {round}: {}",
            r.partitions[0].message
        );
        let (_, values) = fetch_values(&broker, 0).await;
        assert_eq!(values, vec![Bytes::from(value)], "round {round}");
    }
    broker.shutdown();
}
