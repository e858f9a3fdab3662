//! Transform: a running aggregate per key, kept in the transform's durable
//! state store. For each input record it adds one to the key's count and,
//! with `field`, the record's JSON number at that dotted path to the key's
//! sum, stores the new totals and emits them to the first output:
//! `{"count":N,"sum":S}` under the record's key. A tombstone (null value)
//! forgets the key and is forwarded, so the output stays a changelog of
//! totals that a compacted topic keeps one record per key of. Sums of
//! integers stay exact integers; a fractional addend makes the sum a float.
//! Parameters: `field` (optional).

use plugin_util::FieldPath;
use quiver_plugin::{Error, Output, Params, Record, Transform, state};
use serde_json::{Number, Value, json};

pub struct Aggregate {
    field: Option<FieldPath>,
}

impl Transform for Aggregate {
    fn init(params: &Params) -> Result<Self, Error> {
        Ok(Aggregate { field: params.get("field").map(FieldPath::parse).transpose()? })
    }

    fn transform(&mut self, record: &Record<'_>) -> Result<impl IntoIterator<Item = Output>, Error> {
        let key = record.key().ok_or_else(|| Error::new("aggregate needs keyed records: this one has no key"))?;
        if record.value().is_none() {
            state::delete(key);
            return Ok(Some(Output::forward()));
        }
        let addend = match &self.field {
            None => None,
            Some(path) => match path.extract_from(record)? {
                Some(Value::Number(n)) => Some(n),
                Some(other) => return Err(Error::new(format!("the field to sum is not a number: {other}"))),
                None => return Err(Error::new("the field to sum is missing")),
            },
        };
        let mut totals = match state::get(key) {
            Some(stored) => Totals::decode(&stored)?,
            None => Totals::default(),
        };
        totals.count += 1;
        if let Some(n) = addend {
            totals.sum = add(&totals.sum, &n)?;
        }
        let encoded = totals.encode(self.field.is_some());
        state::put(key, &encoded)?;
        Ok(Some(Output::new(Some(key), Some(encoded))))
    }
}

/// A key's totals, stored (and emitted) as JSON.
#[derive(Debug)]
struct Totals {
    count: u64,
    sum: Number,
}

impl Default for Totals {
    fn default() -> Self {
        Totals { count: 0, sum: Number::from(0) }
    }
}

impl Totals {
    fn decode(stored: &[u8]) -> Result<Self, Error> {
        let v: Value = serde_json::from_slice(stored).map_err(|e| Error::new(format!("stored totals: {e}")))?;
        let count = v["count"].as_u64().ok_or_else(|| Error::new("stored totals have no count"))?;
        let sum = match &v["sum"] {
            Value::Number(n) => n.clone(),
            _ => Number::from(0),
        };
        Ok(Totals { count, sum })
    }

    fn encode(&self, with_sum: bool) -> Vec<u8> {
        let v = if with_sum { json!({"count": self.count, "sum": self.sum}) } else { json!({"count": self.count}) };
        serde_json::to_vec(&v).expect("totals serialise")
    }
}

/// `a + b`, exact while both are integers and the sum fits in 64 bits.
fn add(a: &Number, b: &Number) -> Result<Number, Error> {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64())
        && let Some(s) = x.checked_add(y)
    {
        return Ok(Number::from(s));
    }
    let s = a.as_f64().unwrap_or(0.0) + b.as_f64().unwrap_or(0.0);
    Number::from_f64(s).ok_or_else(|| Error::new("the sum is not a finite number"))
}

quiver_plugin::transform!(Aggregate);

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_plugin::testing::{TestRecord, clear_state, state, transform};

    fn values(out: &[quiver_plugin::testing::TestOutput]) -> Vec<String> {
        out.iter().map(|o| String::from_utf8(o.record.value.clone().unwrap_or_default()).unwrap()).collect()
    }

    #[test]
    fn counts_and_sums_per_key_across_batches() {
        clear_state();
        let batch = [
            TestRecord::keyed("a", r#"{"amount":5}"#),
            TestRecord::keyed("b", r#"{"amount":1}"#),
            TestRecord::keyed("a", r#"{"amount":-2}"#),
        ];
        let out = transform::<Aggregate>(&[("field", "amount")], &["totals"], &batch).unwrap();
        assert_eq!(values(&out), [r#"{"count":1,"sum":5}"#, r#"{"count":1,"sum":1}"#, r#"{"count":2,"sum":3}"#]);
        assert_eq!(out[2].record.key.as_deref(), Some(&b"a"[..]));
        // The store carries over to the next batch (and instance).
        let out =
            transform::<Aggregate>(&[("field", "amount")], &["totals"], &[TestRecord::keyed("a", r#"{"amount":0.5}"#)])
                .unwrap();
        assert_eq!(values(&out), [r#"{"count":3,"sum":3.5}"#]);
        assert_eq!(state().len(), 2);
    }

    #[test]
    fn without_a_field_it_counts() {
        clear_state();
        let batch = [TestRecord::keyed("k", "anything"), TestRecord::keyed("k", "else")];
        let out = transform::<Aggregate>(&[], &["totals"], &batch).unwrap();
        assert_eq!(values(&out), [r#"{"count":1}"#, r#"{"count":2}"#]);
    }

    #[test]
    fn a_tombstone_forgets_the_key_and_is_forwarded() {
        clear_state();
        let batch = [TestRecord::keyed("k", "x"), TestRecord::new(Some(b"k"), None), TestRecord::keyed("k", "y")];
        let out = transform::<Aggregate>(&[], &["totals"], &batch).unwrap();
        assert_eq!(out[1].record, batch[1]);
        assert_eq!(values(&out)[2], r#"{"count":1}"#);
    }

    #[test]
    fn bad_records_are_refused_by_index_and_change_nothing() {
        clear_state();
        let keyless = [TestRecord::value(r#"{"amount":1}"#)];
        let err = transform::<Aggregate>(&[("field", "amount")], &["t"], &keyless).unwrap_err();
        assert!(err.1.contains("keyed records"), "{}", err.1);
        let batch = [TestRecord::keyed("k", r#"{"amount":1}"#), TestRecord::keyed("k", r#"{"amount":"x"}"#)];
        let err = transform::<Aggregate>(&[("field", "amount")], &["t"], &batch).unwrap_err();
        assert_eq!(err.0, 1);
        assert!(err.1.contains("not a number"), "{}", err.1);
        let missing = [TestRecord::keyed("k", r#"{}"#)];
        assert!(transform::<Aggregate>(&[("field", "amount")], &["t"], &missing).unwrap_err().1.contains("missing"));
        assert!(transform::<Aggregate>(&[("field", "a..b")], &["t"], &[]).is_err());
    }
}
