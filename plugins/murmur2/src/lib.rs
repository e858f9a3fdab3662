//! Partitioner: Kafka's default for keyed records, `murmur2(key) % partitions`,
//! so keys land where a Kafka producer would put them. Keyless records are
//! refused: producers spread those themselves (sticky partitioning).

use quiver_plugin::{Error, Record};

pub fn murmur2_partition(record: &Record<'_>, partitions: u32) -> Result<u32, Error> {
    let key = record.key().ok_or_else(|| Error::new("the murmur2 partitioner needs a key"))?;
    Ok(plugin_util::kafka_partition(key, partitions))
}

quiver_plugin::partitioner!(fn murmur2_partition);

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_plugin::testing::{TestRecord, partition};

    #[test]
    fn agrees_with_kafka() {
        // murmur2("foobar") = -790332482; & 0x7fffffff = 1357151166.
        let out = partition::<__QuiverFnPartitioner>(&[], &[TestRecord::keyed("foobar", "v")], 6).unwrap();
        assert_eq!(out, [1357151166 % 6]);
        let err = partition::<__QuiverFnPartitioner>(&[], &[TestRecord::value("v")], 6).unwrap_err();
        assert_eq!(err, (0, "the murmur2 partitioner needs a key".into()));
    }
}
