//! Run a plugin natively on sample records, through the same batch ABI the
//! host uses: `cargo test` on a plugin crate needs no Wasm.
//!
//! ```ignore
//! let out = testing::transform::<MyTransform>(&[("field", "id")], &["out"], &[TestRecord::value("{}")]);
//! ```

use crate::record::get_varint;
use crate::{Error, Filter, Params, Partitioner, Serializer, Transform, encode_record, glue};

/// A record to feed a plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestRecord {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub timestamp: i64,
}

impl TestRecord {
    pub fn new(key: Option<&[u8]>, value: Option<&[u8]>) -> Self {
        TestRecord { key: key.map(<[u8]>::to_vec), value: value.map(<[u8]>::to_vec), ..Default::default() }
    }

    /// A record with no key and this value.
    pub fn value(value: impl AsRef<[u8]>) -> Self {
        Self::new(None, Some(value.as_ref()))
    }

    pub fn keyed(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        Self::new(Some(key.as_ref()), Some(value.as_ref()))
    }

    pub fn with_header(mut self, key: &str, value: Option<&[u8]>) -> Self {
        self.headers.push((key.to_owned(), value.map(<[u8]>::to_vec)));
        self
    }
}

/// One output record, materialised (a forwarded input appears as its copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestOutput {
    /// The input record it came from.
    pub input: u32,
    /// Output topic (transforms), empty for other kinds.
    pub topic: String,
    /// Explicit partition, if the plugin chose one.
    pub partition: Option<u32>,
    pub record: TestRecord,
}

/// A refused record: its index and the plugin's message.
pub type Refusal = (u32, String);

/// Encodes records as a batch's records section (base timestamp 0).
pub fn encode(records: &[TestRecord]) -> Vec<u8> {
    let mut buf = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let headers: Vec<(&str, Option<&[u8]>)> = r.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        encode_record(&mut buf, r.timestamp, i as i64, r.key.as_deref(), r.value.as_deref(), &headers);
    }
    buf
}

fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn finish(result: glue::BatchResult, inputs: &[TestRecord], outputs: &[&str]) -> Result<Vec<TestOutput>, Refusal> {
    if let Some(error) = result.error {
        return Err(error);
    }
    Ok(decode_entries(&result.entries, inputs, outputs).expect("the SDK wrote these entries"))
}

/// Runs a transform over `records` with these parameters and output topics.
pub fn transform<T: Transform>(
    params_: &[(&str, &str)],
    outputs: &[&str],
    records: &[TestRecord],
) -> Result<Vec<TestOutput>, Refusal> {
    glue::init_transform::<T>(params(params_), outputs.iter().map(|s| s.to_string()).collect()).map_err(|e| (0, e))?;
    finish(glue::call_transform::<T>(&encode(records), 0, 0), records, outputs)
}

/// Runs a read-side filter over `records`.
pub fn filter<T: Filter>(params_: &[(&str, &str)], records: &[TestRecord]) -> Result<Vec<TestOutput>, Refusal> {
    glue::init_plugin::<T>(params(params_), T::init).map_err(|e| (0, e))?;
    finish(glue::call_filter::<T>(&encode(records), 0, 0), records, &[""])
}

/// Runs a serializer's encode (`encode = true`) or decode over `records`.
pub fn serialize<T: Serializer>(
    params_: &[(&str, &str)],
    records: &[TestRecord],
    encode_: bool,
) -> Result<Vec<TestOutput>, Refusal> {
    glue::init_plugin::<T>(params(params_), T::init).map_err(|e| (0, e))?;
    finish(glue::call_serializer::<T>(&encode(records), 0, 0, encode_), records, &[""])
}

/// Runs a partitioner over `records` for a topic of `partitions` partitions.
pub fn partition<T: Partitioner>(
    params_: &[(&str, &str)],
    records: &[TestRecord],
    partitions: u32,
) -> Result<Vec<u32>, Refusal> {
    glue::init_plugin::<T>(params(params_), T::init).map_err(|e| (0, e))?;
    glue::call_partitioner::<T>(&encode(records), 0, 0, partitions)
}

#[cfg(not(target_arch = "wasm32"))]
/// The state store's content on this thread (what a transform's
/// [`crate::state`] calls left), in key order.
pub fn state() -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
    crate::state::imp::snapshot()
}

#[cfg(not(target_arch = "wasm32"))]
/// Empties this thread's state store (between test cases).
pub fn clear_state() {
    crate::state::imp::clear()
}

/// Checks a plugin's parameters the way the host does at deploy time.
pub fn init<T: 'static>(params_: &[(&str, &str)], init: fn(&Params) -> Result<T, Error>) -> Result<(), String> {
    glue::init_plugin::<T>(params(params_), init)
}

fn decode_entries(mut buf: &[u8], inputs: &[TestRecord], outputs: &[&str]) -> Option<Vec<TestOutput>> {
    let mut out = Vec::new();
    while let Some((&tag, rest)) = buf.split_first() {
        buf = rest;
        let input = get_varint(&mut buf)? as u32;
        let topic = outputs.get(get_varint(&mut buf)? as usize)?.to_string();
        if tag == crate::output::FORWARD {
            out.push(TestOutput { input, topic, partition: None, record: inputs.get(input as usize)?.clone() });
            continue;
        }
        let partition = u32::try_from(get_varint(&mut buf)?).ok();
        let key = take(&mut buf)?;
        let value = take(&mut buf)?;
        let mut headers = Vec::new();
        for _ in 0..get_varint(&mut buf)? {
            let k = String::from_utf8(take(&mut buf)??).ok()?;
            headers.push((k, take(&mut buf)?));
        }
        let timestamp = inputs.get(input as usize)?.timestamp;
        out.push(TestOutput { input, topic, partition, record: TestRecord { key, value, headers, timestamp } });
    }
    Some(out)
}

fn take(buf: &mut &[u8]) -> Option<Option<Vec<u8>>> {
    let len = get_varint(buf)?;
    if len == -1 {
        return Some(None);
    }
    let len = usize::try_from(len).ok().filter(|l| *l <= buf.len())?;
    let (field, rest) = buf.split_at(len);
    *buf = rest;
    Some(Some(field.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Output, Record};

    struct Split {
        sep: String,
    }

    impl Transform for Split {
        fn init(params: &Params) -> Result<Self, Error> {
            Ok(Split { sep: params.require("sep")?.to_owned() })
        }

        fn transform(&mut self, record: &Record<'_>) -> Result<impl IntoIterator<Item = Output>, Error> {
            let text = record.value_str()?;
            if text == "poison" {
                return Err(Error::new("poison record"));
            }
            if text.is_empty() {
                return Ok(vec![Output::forward().topic("empty")]);
            }
            Ok(text.split(self.sep.as_str()).map(|part| Output::new(record.key(), Some(part)).topic("parts")).collect())
        }
    }

    #[test]
    fn a_transform_runs_natively_through_the_batch_abi() {
        let input = [TestRecord::keyed("k", "a,b"), TestRecord::value("")];
        let out = transform::<Split>(&[("sep", ",")], &["parts", "empty"], &input).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!((out[0].topic.as_str(), out[0].record.value.as_deref()), ("parts", Some(&b"a"[..])));
        assert_eq!(out[1].record.key.as_deref(), Some(&b"k"[..]));
        assert_eq!((out[2].topic.as_str(), out[2].input, &out[2].record), ("empty", 1, &input[1]));
    }

    #[test]
    fn the_first_failing_record_is_named_by_index() {
        let input = [TestRecord::value("a"), TestRecord::value("poison"), TestRecord::value("b")];
        let err = transform::<Split>(&[("sep", ",")], &["parts", "empty"], &input).unwrap_err();
        assert_eq!(err, (1, "poison record".into()));
    }

    #[test]
    fn a_missing_parameter_fails_init() {
        let err = transform::<Split>(&[], &["parts"], &[]).unwrap_err();
        assert_eq!(err.1, "missing parameter 'sep'");
    }

    #[test]
    fn an_unknown_output_topic_is_an_error() {
        let err = transform::<Split>(&[("sep", ",")], &["parts"], &[TestRecord::value("")]).unwrap_err();
        assert!(err.1.contains("'empty' is not one of this transform's outputs"), "{}", err.1);
    }
}
