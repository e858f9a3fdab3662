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

    pub fn get_mut<'v>(&self, doc: &'v mut Value) -> Option<&'v mut Value> {
        self.0.iter().try_fold(doc, |v, part| match v {
            Value::Object(m) => m.get_mut(part),
            Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        })
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
        let found = self.field.get(doc);
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
