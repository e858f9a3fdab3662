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

    let (code, msg) = error_of(raw_request(&conn, &frame(6, 1, b"\x02garbage")).await.unwrap());
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
    body.put_u8(2); // acks=all
    body.put_u32(1000);
    body.put_u32(1);
    body.put_u32(1);
    body.put_slice(b"t");
    body.put_u32(0);
    body.put_u32(70);
    body.put_slice(&[0xAB; 70]);
    let response = raw_request(&conn, &frame(6, 1, &body)).await.unwrap();
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
