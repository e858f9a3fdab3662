//! A request frame as the broker receives it (length prefix already
//! stripped): split the header, then decode the body as every request type.
//! Decoding must never panic, and whatever decodes must re-encode to exactly
//! the bytes it came from (the body encoding has one form per value).

#![no_main]

use std::fmt::Debug;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use quiver_protocol::codec::{Wire, decode_exact, encode_to_bytes};
use quiver_protocol::frame::split_request;
use quiver_protocol::messages::*;

fn check<T: Wire + PartialEq + Debug>(body: &Bytes) {
    if let Ok(value) = decode_exact::<T>(body.clone()) {
        assert_eq!(&encode_to_bytes(&value), body, "re-encoding differs from input");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok((header, body)) = split_request(Bytes::copy_from_slice(data)) else {
        return;
    };
    let _ = ApiKey::from_u16(header.api_key);
    check::<ApiVersionsRequest>(&body);
    check::<MetadataRequest>(&body);
    check::<CreateTopicRequest>(&body);
    check::<DeleteTopicRequest>(&body);
    check::<DescribeTopicsRequest>(&body);
    check::<ProduceRequest>(&body);
    check::<FetchRequest>(&body);
    check::<ListOffsetsRequest>(&body);
});
