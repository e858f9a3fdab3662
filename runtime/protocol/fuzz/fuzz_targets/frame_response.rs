//! A response frame as the client receives it (length prefix already
//! stripped), decoded as every response type. Decoding must never panic; an
//! error response never carries code `None`; a decoded success re-encodes to
//! a frame that decodes to the same value.

#![no_main]

use std::fmt::Debug;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use quiver_protocol::ErrorCode;
use quiver_protocol::codec::{Wire, concat};
use quiver_protocol::frame::{LENGTH_PREFIX_BYTES, decode_response, encode_response};
use quiver_protocol::messages::*;

fn check<T: Wire + PartialEq + Debug>(frame: &Bytes) {
    match decode_response::<T>(frame.clone()) {
        Err(_) => {}
        Ok(Err(error)) => assert_ne!(error.code, ErrorCode::None),
        Ok(Ok(value)) => {
            let again = concat(&encode_response(&value)).slice(LENGTH_PREFIX_BYTES..);
            assert_eq!(decode_response::<T>(again), Ok(Ok(value)));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let frame = Bytes::copy_from_slice(data);
    check::<ApiVersionsResponse>(&frame);
    check::<MetadataResponse>(&frame);
    check::<CreateTopicResponse>(&frame);
    check::<DeleteTopicResponse>(&frame);
    check::<DescribeTopicsResponse>(&frame);
    check::<ProduceResponse>(&frame);
    check::<FetchResponse>(&frame);
    check::<ListOffsetsResponse>(&frame);
});
