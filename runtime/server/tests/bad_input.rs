//! Bad input gets a clear error, the broker stays up, and other clients are
//! unaffected: oversized records and frames, malformed frames, unknown
//! request versions and API keys, and clients without the right CA.

mod common;

use bytes::{BufMut, BytesMut};
use common::DevNode;
use quiver_protocol::ErrorCode;
use quiver_protocol::frame::decode_response;
use quiver_protocol::messages::MetadataResponse;

#[test]
fn oversized_record_is_refused_and_nothing_is_appended() {
    let node = DevNode::start();
    node.ok(&["topic", "create", "small", "-p", "1", "-c", "max.message.bytes=1000"]);
    let big = format!("{}\n", "x".repeat(2000));
    let out = node.produce(&["topic", "produce", "small"], big.as_bytes());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("record_too_large") && err.contains("max.message.bytes"), "{err}");
    let out = node.produce(&["topic", "produce", "small"], b"fine\n");
    assert!(out.status.success());
    assert_eq!(node.ok(&["topic", "consume", "small", "-o", "start:end"]), "fine\n");
}

async fn raw_connection(node: &DevNode) -> quinn::Connection {
    let config = quiver_client::quic_client_config(&std::fs::read(node.ca()).unwrap()).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.connect_with(config, node.address().parse().unwrap(), "127.0.0.1").unwrap().await.unwrap()
}

/// Sends raw bytes on a new stream; returns the response frame body, or None
/// when the broker reset the stream.
async fn raw_request(conn: &quinn::Connection, bytes: &[u8]) -> Option<bytes::Bytes> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await.ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
    recv.read_exact(&mut body).await.ok()?;
    Some(body.into())
}

fn frame(api: u16, version: u16, body: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32((4 + body.len()) as u32);
    b.put_u16(api);
    b.put_u16(version);
    b.put_slice(body);
    b.to_vec()
}

fn error_of(response: bytes::Bytes) -> (ErrorCode, String) {
    let e = decode_response::<MetadataResponse>(response).unwrap().unwrap_err();
    (e.code, e.message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_clear_errors_and_the_broker_stays_up() {
    let node = DevNode::start();
    node.ok(&["topic", "create", "t", "-p", "1"]);
    let conn = raw_connection(&node).await;

    let (code, msg) = error_of(raw_request(&conn, &frame(6, 2, b"\x02garbage")).await.unwrap());
    assert_eq!(code, ErrorCode::CorruptMessage, "{msg}");

    let (code, msg) = error_of(raw_request(&conn, &frame(99, 0, b"")).await.unwrap());
    assert_eq!(code, ErrorCode::UnknownApi);
    assert!(msg.contains("99"), "{msg}");

    let (code, msg) = error_of(raw_request(&conn, &frame(2, 7, b"\x00")).await.unwrap());
    assert_eq!(code, ErrorCode::UnsupportedVersion);
    assert!(msg.contains("version 7") && msg.contains("1 to 1"), "{msg}");

    let mut huge = (1u32 << 30).to_be_bytes().to_vec();
    huge.extend_from_slice(&[0, 6, 0, 0]);
    let (code, msg) = error_of(raw_request(&conn, &huge).await.unwrap());
    assert_eq!(code, ErrorCode::FrameTooLarge);
    assert!(msg.contains("exceeds"), "{msg}");

    // A produce whose batch is garbage, inside a well-formed request.
    let mut body = BytesMut::new();
    body.put_u8(0); // no transactional id
    body.put_u8(2); // acks=all
    body.put_u32(1000);
    body.put_u32(1);
    body.put_u32(1);
    body.put_slice(b"t");
    body.put_u32(0);
    body.put_u32(70);
    body.put_slice(&[0xAB; 70]);
    let response = raw_request(&conn, &frame(6, 2, &body)).await.unwrap();
    let produce = decode_response::<quiver_protocol::messages::ProduceResponse>(response).unwrap().unwrap();
    assert_eq!(produce.partitions[0].error, ErrorCode::CorruptMessage);
    assert!(produce.partitions[0].message.contains("invalid record batch"), "{}", produce.partitions[0].message);

    // A frame shorter than its length prefix says: the stream just ends.
    let mut short = frame(2, 1, b"\x00");
    short[3] += 100;
    assert!(raw_request(&conn, &short).await.is_none());

    // Same connection and other clients still work; nothing was appended.
    let ok = raw_request(&conn, &frame(2, 1, b"\x00")).await.unwrap();
    assert!(decode_response::<MetadataResponse>(ok).unwrap().is_ok());
    let described = node.ok(&["topic", "describe", "t", "--format", "json"]);
    let d: serde_json::Value = serde_json::from_str(&described).unwrap();
    assert_eq!(d["partitions"][0]["high_watermark"], 0);
}

#[test]
fn clients_without_the_right_ca_get_a_clear_error() {
    let node = DevNode::start();
    let other = tempfile::tempdir().unwrap();
    let paths = quiver_server::tls::ensure_dev_certs(other.path(), &[]).unwrap();
    let ca = paths.ca_cert.to_str().unwrap();
    let out = node.command(&["topic", "list", "--ca", ca]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS handshake") && err.contains("CA"), "{err}");

    let not_pem = other.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let out = node.command(&["topic", "list", "--ca", not_pem.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no usable PEM certificate"), "{err}");

    let out = node.command(&["topic", "list", "--ca", "/nonexistent/ca.pem"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read the CA certificate"), "{err}");

    // The broker is unaffected.
    node.ok(&["topic", "create", "still-up"]);
}

#[test]
fn no_broker_gives_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["topic", "list"])
        .env("QUIVER_DEV_DIR", dir.path())
        .env_remove("QUIVER_BROKERS")
        .env_remove("QUIVER_CA")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no broker address") && err.contains("quiver dev"), "{err}");
}

/// The broker's peak resident memory (`VmHWM`), in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/PID/status");
    line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() / 1024.0
}

/// Connections that declare the largest request body and send it slowly
/// cannot make the broker hold more than its budget for request bytes (and
/// QUIC's receive windows): here 8 connections × 100 streams each send
/// 2 MiB of a declared 64 MiB, 1.6 GB offered in all, and the broker's peak
/// memory stays far below it. Their streams are cut at the read deadline,
/// and an honest client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_large_requests_are_bounded_and_others_are_served() {
    use std::time::{Duration, Instant};
    const CONNECTIONS: usize = 8;
    const STREAMS: usize = 100;
    const SENT_BYTES: usize = 2 << 20;
    let node = DevNode::start_with_env(&[
        ("QUIVER_BROKER__REQUEST_BYTES_IN_FLIGHT_MAX", "67108864"),
        ("QUIVER_BROKER__REQUEST_READ_TIMEOUT_MS", "3000"),
    ]);
    node.ok(&["topic", "create", "honest", "-p", "1"]);
    let mut attackers = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..CONNECTIONS {
        let conn = raw_connection(&node).await;
        for _ in 0..STREAMS {
            let conn = conn.clone();
            attackers.spawn(async move {
                let Ok((mut send, mut recv)) = conn.open_bi().await else {
                    return Ok(None);
                };
                let mut head = BytesMut::new();
                head.put_u32(64 << 20); // the largest frame the broker takes
                head.put_u16(6); // Produce
                head.put_u16(2);
                let junk = vec![0x5a; 64 * 1024];
                let sending = async {
                    send.write_all(&head).await?;
                    for _ in 0..SENT_BYTES / junk.len() {
                        send.write_all(&junk).await?;
                    }
                    // Then nothing more: the body never completes.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    anyhow::Ok(())
                };
                let answer = async {
                    let mut prefix = [0u8; 4];
                    recv.read_exact(&mut prefix).await.ok()?;
                    let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
                    recv.read_exact(&mut body).await.ok()?;
                    Some(error_of(body.into()).0)
                };
                tokio::pin!(answer);
                let ended = async {
                    tokio::select! {
                        code = &mut answer => code,
                        // Sending fails once the broker stops the stream;
                        // its answer, if any, follows.
                        _ = sending => tokio::time::timeout(Duration::from_secs(10), answer).await.ok().flatten(),
                    }
                };
                // `Err`: the broker kept the stream open past every deadline.
                tokio::time::timeout(Duration::from_secs(90), ended).await
            });
        }
    }

    // An honest client produces and reads back while the attack is on.
    let client = quiver_client::Client::connect(node.client_config()).await.unwrap();
    let producer = client.producer(quiver_client::ProducerConfig::default());
    for i in 0..100 {
        let delivery = producer.send(quiver_client::ProducerRecord::new("honest", format!("v{i}"))).await.unwrap();
        if i == 99 {
            tokio::time::timeout(Duration::from_secs(30), delivery).await.expect("honest producer served").unwrap();
        }
    }
    let mut consumer = client.consumer(quiver_client::ConsumerConfig::default());
    consumer.assign("honest", Some(vec![0]), quiver_client::OffsetSpec::Earliest).await.unwrap();
    let mut read = 0;
    while read < 100 {
        read += tokio::time::timeout(Duration::from_secs(30), consumer.poll()).await.unwrap().unwrap().len();
    }
    let served_after = started.elapsed();

    // Slow streams end at their read deadline (`request_timed_out`) or for
    // want of room (`broker_busy`); those queued behind them on their own
    // connection (the broker reads a connection's stream heads in order)
    // wait their turn, holding no more than QUIC's window. None of their
    // bytes is appended.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (mut answered, mut cut) = (0, 0);
    while let Some(ended) = attackers.try_join_next() {
        match ended.unwrap() {
            Ok(Some(ErrorCode::RequestTimedOut | ErrorCode::BrokerBusy)) => answered += 1,
            Ok(Some(other)) => panic!("a slow stream answered {other:?}"),
            Ok(None) => cut += 1,
            Err(_) => {}
        }
    }
    attackers.abort_all();
    let peak = peak_rss_mib(node.pid());
    let offered = (CONNECTIONS * STREAMS * SENT_BYTES) as f64 / (1024.0 * 1024.0);
    eprintln!(
        "offered {offered:.0} MiB; broker peak {peak:.0} MiB; honest client served after {served_after:?}; slow \
         streams answered {answered}, cut {cut} after {:?}",
        started.elapsed()
    );
    assert!(answered >= CONNECTIONS, "slow streams must be cut at their deadline: {answered} answered");
    // Budget (64 MiB) + QUIC windows (16 MiB per connection) + the node's
    // own ≈ 30-60 MiB and quinn's packet buffers, with room to spare;
    // reading every offered byte would take over 1 600 MiB.
    assert!(peak < 800.0, "broker peak memory {peak:.0} MiB with {offered:.0} MiB offered");
    let described = node.ok(&["topic", "describe", "honest", "--format", "json"]);
    let d: serde_json::Value = serde_json::from_str(&described).unwrap();
    assert_eq!(d["partitions"][0]["high_watermark"], 100);
}
