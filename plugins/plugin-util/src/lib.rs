//! Shared by the first-party plugins: dotted JSON field paths
//! (`customer.address.country`), simple predicates on them, and Kafka's
//! murmur2 hash.

use quiver_plugin::{Error, Params, Record};
use serde_json::Value;

/// Parses a record's value as JSON.
pub fn parse(record: &Record<'_>) -> Result<Value, Error> {
    let value = record.value().ok_or_else(|| Error::new("value is null, expected JSON"))?;
    serde_json::from_slice(value).map_err(|e| Error::new(format!("value is not JSON: {e}")))
}

/// A dotted path into a JSON document; numeric parts index arrays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath(Vec<String>);

impl FieldPath {
    pub fn parse(path: &str) -> Result<Self, Error> {
        if path.is_empty() || path.split('.').any(str::is_empty) {
            return Err(Error::new(format!("field path '{path}' is empty or has an empty part")));
        }
        Ok(FieldPath(path.split('.').map(str::to_owned).collect()))
    }

    pub fn get<'v>(&self, doc: &'v Value) -> Option<&'v Value> {
        self.0.iter().try_fold(doc, |v, part| match v {
            Value::Object(m) => m.get(part),
            Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        })
    }

    /// The value at this path in the JSON text `json`, found in one pass
    /// without building the rest of the document: other fields are checked
    /// for syntax and skipped, not allocated. `Ok(None)` when the path is
    /// absent; an error when `json` is not JSON. A key given twice counts
    /// once, the last time, as in a parsed document.
    pub fn extract(&self, json: &[u8]) -> Result<Option<Value>, Error> {
        let mut de = serde_json::Deserializer::from_slice(json);
        let found = serde::de::DeserializeSeed::deserialize(extract::At(&self.0), &mut de)
            .and_then(|found| de.end().map(|()| found))
            .map_err(|e| Error::new(format!("value is not JSON: {e}")))?;
        Ok(found)
    }

    /// [`FieldPath::extract`] on a record's value.
    pub fn extract_from(&self, record: &Record<'_>) -> Result<Option<Value>, Error> {
        self.extract(record.value().ok_or_else(|| Error::new("value is null, expected JSON"))?)
    }

    pub fn get_mut<'v>(&self, doc: &'v mut Value) -> Option<&'v mut Value> {
        self.0.iter().try_fold(doc, |v, part| match v {
            Value::Object(m) => m.get_mut(part),
            Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        })
    }
}

mod extract {
    //! A serde seed that walks a field path through JSON, skipping the rest.

    use std::fmt;

    use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use serde_json::Value;

    /// Finds the value at the path `.0` in whatever is deserialized.
    pub(crate) struct At<'p>(pub(crate) &'p [String]);

    impl<'de> DeserializeSeed<'de> for At<'_> {
        type Value = Option<Value>;

        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<Value>, D::Error> {
            if self.0.is_empty() {
                return Value::deserialize(d).map(Some);
            }
            d.deserialize_any(self)
        }
    }

    use serde::Deserialize;

    /// Whether a map key equals the wanted one, without allocating it.
    struct KeyIs<'k>(&'k str);

    impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
        type Value = bool;

        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
            d.deserialize_str(self)
        }
    }

    impl<'de> Visitor<'de> for KeyIs<'_> {
        type Value = bool;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a key")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
            Ok(v == self.0)
        }
    }

    impl<'de> Visitor<'de> for At<'_> {
        type Value = Option<Value>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("JSON")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Value>, A::Error> {
            let (part, rest) = self.0.split_first().expect("a non-empty path");
            let mut found = None;
            while let Some(hit) = map.next_key_seed(KeyIs(part))? {
                if hit {
                    found = map.next_value_seed(At(rest))?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<Value>, A::Error> {
            let (part, rest) = self.0.split_first().expect("a non-empty path");
            let index = part.parse::<usize>().ok();
            let mut found = None;
            let mut i = 0;
            loop {
                if Some(i) == index {
                    match seq.next_element_seed(At(rest))? {
                        Some(v) => found = v,
                        None => break,
                    }
                } else if seq.next_element::<IgnoredAny>()?.is_none() {
                    break;
                }
                i += 1;
            }
            Ok(found)
        }

        // A path that continues into a scalar finds nothing.
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Option<Value>, E> {
            Ok(None)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Option<Value>, E> {
            Ok(None)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Option<Value>, E> {
            Ok(None)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Option<Value>, E> {
            Ok(None)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Option<Value>, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Option<Value>, E> {
            Ok(None)
        }
    }
}

/// The text of a scalar field (strings without quotes), for routing and
/// partitioning.
pub fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `field op value`, from the parameters `field`, `op` (eq, ne, gt, ge, lt,
/// le, exists, missing, contains) and `value` (JSON, or a bare string).
#[derive(Debug, Clone)]
pub struct Predicate {
    field: FieldPath,
    op: Op,
    value: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    Exists,
    Missing,
    Contains,
}

impl Predicate {
    pub fn from_params(params: &Params) -> Result<Self, Error> {
        let field = FieldPath::parse(params.require("field")?)?;
        let op = match params.get("op").unwrap_or("eq") {
            "eq" => Op::Eq,
            "ne" => Op::Ne,
            "gt" => Op::Gt,
            "ge" => Op::Ge,
            "lt" => Op::Lt,
            "le" => Op::Le,
            "exists" => Op::Exists,
            "missing" => Op::Missing,
            "contains" => Op::Contains,
            other => {
                return Err(Error::new(format!(
                    "parameter 'op' = '{other}': expected eq, ne, gt, ge, lt, le, exists, missing or contains"
                )));
            }
        };
        let value = match (op, params.get("value")) {
            (Op::Exists | Op::Missing, _) => Value::Null,
            (_, None) => return Err(Error::new("missing parameter 'value'")),
            (_, Some(v)) => serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned())),
        };
        if matches!(op, Op::Gt | Op::Ge | Op::Lt | Op::Le) && !value.is_number() {
            return Err(Error::new(format!("parameter 'value' = '{value}': a number is needed for '{op:?}'")));
        }
        Ok(Predicate { field, op, value })
    }

    pub fn matches(&self, doc: &Value) -> bool {
        self.matches_found(self.field.get(doc))
    }

    /// Whether a record's JSON value matches, reading only the field (see
    /// [`FieldPath::extract`]). An error when the value is not JSON.
    pub fn matches_record(&self, record: &Record<'_>) -> Result<bool, Error> {
        Ok(self.matches_found(self.field.extract_from(record)?.as_ref()))
    }

    fn matches_found(&self, found: Option<&Value>) -> bool {
        let num = |v: &Value| v.as_f64();
        match (self.op, found) {
            (Op::Exists, f) => f.is_some(),
            (Op::Missing, f) => f.is_none(),
            (_, None) => self.op == Op::Ne,
            (Op::Eq, Some(f)) => *f == self.value,
            (Op::Ne, Some(f)) => *f != self.value,
            (Op::Contains, Some(Value::String(s))) => self.value.as_str().is_some_and(|v| s.contains(v)),
            (Op::Contains, Some(Value::Array(a))) => a.contains(&self.value),
            (Op::Contains, Some(_)) => false,
            (op, Some(f)) => match (num(f), num(&self.value)) {
                (Some(a), Some(b)) => match op {
                    Op::Gt => a > b,
                    Op::Ge => a >= b,
                    Op::Lt => a < b,
                    _ => a <= b,
                },
                _ => false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Reading only the field gives what parsing the whole document does.
    #[test]
    fn extract_agrees_with_parsing_the_document() {
        let docs = [
            r#"{"a":1,"b":{"c":[10,{"d":"x"},null],"e":true},"a":2}"#,
            r#"{"b":{"c":"not an array"},"f":[[1,2],[3,4]]}"#,
            r#"[{"a":1},{"a":2}]"#,
            r#""scalar""#,
            r#"{"weird key":{"":0},"b":{}}"#,
            r#"{"n": -1.5e3 , "s": "q\"uote", "u": "\u00e9"}"#,
        ];
        let paths = [
            "a",
            "b",
            "b.c",
            "b.c.0",
            "b.c.1.d",
            "b.c.5",
            "b.e",
            "f.1.0",
            "0.a",
            "1.a",
            "weird key",
            "n",
            "s",
            "u",
            "zz",
        ];
        for doc in docs {
            let parsed: Value = serde_json::from_str(doc).unwrap();
            for path in paths {
                let field = FieldPath::parse(path).unwrap();
                let got = field.extract(doc.as_bytes()).unwrap_or_else(|e| panic!("{path} in {doc}: {e}"));
                assert_eq!(got, field.get(&parsed).cloned(), "{path} in {doc}");
            }
        }
        for bad in [r#"{"a":1"#, r#"{"a":1} x"#, r#"{"a":[1,}"#, "nope", r#"{"x":tru,"a":1}"#] {
            assert!(FieldPath::parse("a").unwrap().extract(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    fn pred(pairs: &[(&str, &str)]) -> Result<Predicate, Error> {
        Predicate::from_params(&Params::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()))
    }

    #[test]
    fn predicates_compare_fields() {
        let doc = json!({"a": {"b": 5, "s": "hello"}, "tags": ["x", "y"]});
        assert!(pred(&[("field", "a.b"), ("op", "gt"), ("value", "4")]).unwrap().matches(&doc));
        assert!(!pred(&[("field", "a.b"), ("op", "lt"), ("value", "4")]).unwrap().matches(&doc));
        assert!(pred(&[("field", "a.s"), ("value", "hello")]).unwrap().matches(&doc));
        assert!(pred(&[("field", "tags"), ("op", "contains"), ("value", "y")]).unwrap().matches(&doc));
        assert!(pred(&[("field", "tags.1"), ("value", "y")]).unwrap().matches(&doc));
        assert!(pred(&[("field", "nope"), ("op", "missing")]).unwrap().matches(&doc));
        assert!(pred(&[("field", "nope"), ("op", "ne"), ("value", "1")]).unwrap().matches(&doc));
    }

    #[test]
    fn bad_parameters_are_clear_errors() {
        assert_eq!(pred(&[]).unwrap_err().message(), "missing parameter 'field'");
        assert!(pred(&[("field", "a"), ("op", "like"), ("value", "1")]).unwrap_err().message().contains("'like'"));
        assert!(pred(&[("field", "a"), ("op", "gt"), ("value", "x")]).unwrap_err().message().contains("a number"));
        assert!(pred(&[("field", "a..b"), ("value", "1")]).is_err());
    }
}

/// Kafka's murmur2 (seed 0x9747b28c), as its default partitioner uses it.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner gives a key.
pub fn kafka_partition(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) as u32 % partitions
}

#[cfg(test)]
mod murmur2_tests {
    #[test]
    fn matches_kafkas_golden_values() {
        // From Kafka's UtilsTest.testMurmur2.
        let cases: [(&[u8], i32); 3] =
            [(b"21", -973932308), (b"foobar", -790332482), (b"a-little-bit-long-string", -985981536)];
        for (input, expected) in cases {
            assert_eq!(super::murmur2(input), expected, "{}", String::from_utf8_lossy(input));
        }
    }
}
