//! Partitioner: picks the partition from a field of the JSON value (murmur2
//! of its text, like a Kafka key), so records can be spread by `customer.id`
//! without setting keys. Parameter: `field`. A record without the field is
//! refused with its index.

use plugin_util::{FieldPath, kafka_partition, scalar_text};
use quiver_plugin::{Error, Params, Partitioner, Record};

pub struct JsonFieldPartitioner(FieldPath);

impl Partitioner for JsonFieldPartitioner {
    fn init(params: &Params) -> Result<Self, Error> {
        Ok(JsonFieldPartitioner(FieldPath::parse(params.require("field")?)?))
    }

    fn partition(&mut self, record: &Record<'_>, partitions: u32) -> Result<u32, Error> {
        let found = self.0.extract_from(record)?;
        let text =
            found.as_ref().and_then(scalar_text).ok_or_else(|| Error::new("the field is missing or not a scalar"))?;
        Ok(kafka_partition(text.as_bytes(), partitions))
    }
}

quiver_plugin::partitioner!(JsonFieldPartitioner);

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_plugin::testing::{TestRecord, partition};

    #[test]
    fn same_field_same_partition_as_a_kafka_key() {
        let input = [TestRecord::value(r#"{"c":"foobar"}"#), TestRecord::value(r#"{"c":"foobar","x":1}"#)];
        let out = partition::<JsonFieldPartitioner>(&[("field", "c")], &input, 6).unwrap();
        assert_eq!(out, [kafka_partition(b"foobar", 6); 2]);
        let err = partition::<JsonFieldPartitioner>(&[("field", "c")], &[TestRecord::value("{}")], 6).unwrap_err();
        assert_eq!(err.0, 0);
    }
}
