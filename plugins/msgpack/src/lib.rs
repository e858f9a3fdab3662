//! Serializer: stores JSON values as MessagePack (smaller, faster to parse)
//! and gives JSON back on consume. A value that is not JSON rejects its
//! batch on produce; one that is not MessagePack is refused on decode.

use quiver_plugin::{Error, Output, Params, Record, Serializer};
use serde_json::Value;

pub struct MsgPack;

impl Serializer for MsgPack {
    fn init(_: &Params) -> Result<Self, Error> {
        Ok(MsgPack)
    }

    fn encode(&mut self, record: &Record<'_>) -> Result<Output, Error> {
        let Some(raw) = record.value() else { return Ok(Output::forward()) };
        let doc: Value = serde_json::from_slice(raw).map_err(|e| Error::new(format!("value is not JSON: {e}")))?;
        Ok(Output::with_value(record, rmp_serde::to_vec(&doc)?))
    }

    fn decode(&mut self, record: &Record<'_>) -> Result<Output, Error> {
        let Some(raw) = record.value() else { return Ok(Output::forward()) };
        let doc: Value =
            rmp_serde::from_slice(raw).map_err(|e| Error::new(format!("value is not MessagePack: {e}")))?;
        Ok(Output::with_value(record, serde_json::to_vec(&doc)?))
    }
}

quiver_plugin::serializer!(MsgPack);

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_plugin::testing::{TestRecord, serialize};

    #[test]
    fn json_round_trips_through_msgpack_and_shrinks() {
        let json = r#"{"id":12345,"name":"quiver","tags":["a","b"],"ok":true}"#;
        let input = [TestRecord::keyed("k", json).with_header("h", Some(b"1"))];
        let packed = serialize::<MsgPack>(&[], &input, true).unwrap();
        let packed_value = packed[0].record.value.clone().unwrap();
        assert!(packed_value.len() < json.len());
        assert_eq!(packed[0].record.headers, input[0].headers);
        let back = serialize::<MsgPack>(&[], &[packed[0].record.clone()], false).unwrap();
        assert_eq!(back[0].record.value.as_deref(), Some(json.as_bytes()));
    }

    #[test]
    fn bad_input_is_refused_with_its_index() {
        let err = serialize::<MsgPack>(&[], &[TestRecord::value("{}"), TestRecord::value("{")], true).unwrap_err();
        assert_eq!(err.0, 1);
        assert!(serialize::<MsgPack>(&[], &[TestRecord::value([0xc1])], false).is_err());
    }
}
