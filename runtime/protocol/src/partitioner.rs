//! Kafka's default partitioner, so that keys land where Kafka's Java client
//! would put them: `(murmur2(key) & 0x7fffffff) % partitions`.

/// Kafka's 32-bit murmur2 (seed 0x9747b28c), as `org.apache.kafka.common.utils.Utils.murmur2`.
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner picks for a key.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    ((murmur2(key) & 0x7fff_ffff) as u32) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden values from Kafka's own `UtilsTest.testMurmur2`.
    #[test]
    fn matches_kafka() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ];
        for (input, expected) in cases {
            assert_eq!(murmur2(input), expected, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn partition_in_range() {
        for i in 0..1000u32 {
            assert!(partition_for_key(&i.to_be_bytes(), 7) < 7);
        }
    }
}

/// Records of one batch regrouped by the partition chosen for each: one
/// builder per partition (in partition order), with the index in the
/// original batch of every record it holds, in original order. Used by a
/// client that partitions a batch locally and by a broker that partitions a
/// batch sent with `PARTITION_ANY`, so both split the same way.
pub struct Split {
    pub partition: u32,
    pub builder: crate::batch::BatchBuilder,
    pub indices: Vec<u32>,
}

/// Splits `records` by `partitions` (one entry per record).
pub fn split_by_partition(
    records: &[crate::batch::Record],
    partitions: &[u32],
    compression: crate::batch::Compression,
) -> Vec<Split> {
    assert_eq!(records.len(), partitions.len(), "one partition per record");
    let mut splits: std::collections::BTreeMap<u32, Split> = std::collections::BTreeMap::new();
    for (i, (record, &partition)) in records.iter().zip(partitions).enumerate() {
        let split = splits.entry(partition).or_insert_with(|| Split {
            partition,
            builder: crate::batch::BatchBuilder::new(compression),
            indices: Vec::new(),
        });
        split.builder.append(record.timestamp, record.key.as_deref(), record.value.as_deref(), &record.headers);
        split.indices.push(i as u32);
    }
    splits.into_values().collect()
}

#[cfg(test)]
mod split_tests {
    use super::*;
    use crate::batch::{BatchBuilder, Compression, Header, decode_records};

    #[test]
    fn split_keeps_every_record_once_in_order_per_partition() {
        let records: Vec<_> = {
            let mut b = BatchBuilder::new(Compression::None);
            for i in 0..20i64 {
                let key = format!("k{i}");
                let headers = [Header { key: "i".into(), value: Some(bytes::Bytes::from(i.to_string())) }];
                b.append(1000 + i, Some(key.as_bytes()), Some(format!("v{i}").as_bytes()), &headers);
            }
            decode_records(&b.build()).unwrap()
        };
        let partitions: Vec<u32> = (0..20).map(|i| (i * 7 % 3) as u32).collect();
        let splits = split_by_partition(&records, &partitions, Compression::Lz4);
        assert_eq!(splits.iter().map(|s| s.partition).collect::<Vec<_>>(), vec![0, 1, 2]);
        let mut seen = 0;
        for s in splits {
            let decoded = decode_records(&s.builder.build()).unwrap();
            assert_eq!(decoded.len(), s.indices.len());
            assert!(s.indices.windows(2).all(|w| w[0] < w[1]), "original order kept");
            for (r, &i) in decoded.iter().zip(&s.indices) {
                let original = &records[i as usize];
                assert_eq!(partitions[i as usize], s.partition);
                assert_eq!(
                    (r.timestamp, &r.key, &r.value, &r.headers),
                    (original.timestamp, &original.key, &original.value, &original.headers)
                );
                seen += 1;
            }
        }
        assert_eq!(seen, 20);
    }
}
