//! Frames: one request or one response, each preceded by its length.
//!
//! ```text
//! request  = u32 length | u16 api_key | u16 api_version | body
//! response = u32 length | u8 error_code | string message | body (only if error_code = 0)
//! ```
//!
//! Each request travels on its own QUIC bidirectional stream, so frames need
//! no correlation id. The reading side checks the length against its limit
//! before it reads the rest.

use bytes::{Buf, BufMut, Bytes};

use crate::codec::{DecodeError, FrameBuf, Wire, decode_exact};
use crate::error::{ErrorCode, WireError};
use crate::messages::Request;

/// Length prefix size.
pub const LENGTH_PREFIX_BYTES: usize = 4;
/// Default upper bound on a request frame; brokers make it configurable.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 64 * 1024 * 1024;

/// A request frame, length prefix included, as chunks to write in order.
pub fn encode_request<R: Request>(request: &R) -> Vec<Bytes> {
    let mut buf = FrameBuf::new();
    buf.put_u16(R::API as u16);
    buf.put_u16(R::VERSION);
    request.encode(&mut buf);
    finish(buf)
}

/// The frame of a successful response.
pub fn encode_response<T: Wire>(body: &T) -> Vec<Bytes> {
    let mut buf = FrameBuf::new();
    ErrorCode::None.encode(&mut buf);
    String::new().encode(&mut buf);
    body.encode(&mut buf);
    finish(buf)
}

/// The frame of a failed request.
pub fn encode_error_response(error: &WireError) -> Vec<Bytes> {
    let mut buf = FrameBuf::new();
    error.code.encode(&mut buf);
    error.message.encode(&mut buf);
    finish(buf)
}

fn finish(buf: FrameBuf) -> Vec<Bytes> {
    let len = buf.len() as u32;
    let mut chunks = Vec::with_capacity(4);
    chunks.push(Bytes::copy_from_slice(&len.to_be_bytes()));
    chunks.extend(buf.into_chunks());
    chunks
}

/// Reads the length prefix of a frame.
pub fn frame_len(prefix: [u8; LENGTH_PREFIX_BYTES]) -> usize {
    u32::from_be_bytes(prefix) as usize
}

/// The head of a request frame (after the length prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub api_key: u16,
    pub api_version: u16,
}

/// Splits a request frame (without its length prefix) into header and body.
pub fn split_request(mut frame: Bytes) -> Result<(RequestHeader, Bytes), DecodeError> {
    if frame.len() < 4 {
        return Err(DecodeError::Truncated("request header"));
    }
    let header = RequestHeader { api_key: frame.get_u16(), api_version: frame.get_u16() };
    Ok((header, frame))
}

/// Decodes a response frame (without its length prefix).
pub fn decode_response<T: Wire>(mut frame: Bytes) -> Result<Result<T, WireError>, DecodeError> {
    let code = ErrorCode::decode(&mut frame)?;
    let message = String::decode(&mut frame)?;
    if code != ErrorCode::None {
        return Ok(Err(WireError { code, message }));
    }
    Ok(Ok(decode_exact(frame)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;

    #[test]
    fn request_roundtrip() {
        let req = ProduceRequest {
            transactional_id: None,
            acks: Acks::All,
            timeout_ms: 30_000,
            partitions: vec![ProducePartition {
                topic: "orders".into(),
                partition: 3,
                records: Bytes::from_static(b"batch"),
            }],
        };
        let frame = crate::codec::concat(&encode_request(&req));
        let len = frame_len(frame[..4].try_into().unwrap());
        assert_eq!(len, frame.len() - 4);
        let (header, body) = split_request(frame.slice(4..)).unwrap();
        assert_eq!(header.api_key, ApiKey::Produce as u16);
        assert_eq!(decode_exact::<ProduceRequest>(body).unwrap(), req);
    }

    #[test]
    fn large_byte_fields_are_sent_by_reference() {
        let batch = Bytes::from(vec![7u8; 10_000]);
        let req = ProduceRequest {
            transactional_id: None,
            acks: Acks::Leader,
            timeout_ms: 1,
            partitions: vec![ProducePartition { topic: "t".into(), partition: 0, records: batch.clone() }],
        };
        let chunks = encode_request(&req);
        assert!(chunks.iter().any(|c| c.as_ptr() == batch.as_ptr()), "the batch is not copied");
        let frame = crate::codec::concat(&chunks);
        let (_, body) = split_request(frame.slice(4..)).unwrap();
        assert_eq!(decode_exact::<ProduceRequest>(body).unwrap(), req);
    }

    #[test]
    fn error_response_roundtrip() {
        let frame =
            crate::codec::concat(&encode_error_response(&WireError::new(ErrorCode::UnknownTopic, "no topic 'x'")));
        let got = decode_response::<MetadataResponse>(frame.slice(4..)).unwrap();
        assert_eq!(got.unwrap_err().code, ErrorCode::UnknownTopic);
    }

    #[test]
    fn hostile_list_length_is_rejected_without_allocating() {
        let mut buf = bytes::BytesMut::new();
        buf.put_u8(0); // transactional_id: none
        buf.put_u8(1); // acks
        buf.put_u32(5); // timeout
        buf.put_u32(u32::MAX); // partitions count
        assert!(matches!(decode_exact::<ProduceRequest>(buf.freeze()), Err(DecodeError::BadLength(_))));
    }
}
