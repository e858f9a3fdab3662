//! Transform: turns an array field into one record per element. Each output
//! value is the element (JSON); with `keep` = true it is the whole document
//! with the array replaced by the element. The key is kept. Parameters:
//! `field`, `keep` (default false). A record without the array is a poison
//! record.

use plugin_util::{FieldPath, parse};
use quiver_plugin::{Error, Output, Params, Record, Transform};
use serde_json::Value;

pub struct Explode {
    field: FieldPath,
    keep: bool,
}

impl Transform for Explode {
    fn init(params: &Params) -> Result<Self, Error> {
        Ok(Explode { field: FieldPath::parse(params.require("field")?)?, keep: params.parse_or("keep", false)? })
    }

    fn transform(&mut self, record: &Record<'_>) -> Result<impl IntoIterator<Item = Output>, Error> {
        let mut doc = parse(record)?;
        let Some(Value::Array(items)) = self.field.get_mut(&mut doc).map(Value::take) else {
            return Err(Error::new("the field is missing or not an array"));
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let value = if self.keep {
                *self.field.get_mut(&mut doc).expect("the field was found above") = item;
                serde_json::to_vec(&doc)?
            } else {
                serde_json::to_vec(&item)?
            };
            out.push(Output::with_value(record, value));
        }
        Ok(out)
    }
}

quiver_plugin::transform!(Explode);

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_plugin::testing::{TestRecord, transform};

    #[test]
    fn one_record_per_element() {
        let input = [TestRecord::keyed("o1", r#"{"id":1,"items":[{"sku":"a"},{"sku":"b"}]}"#)];
        let out = transform::<Explode>(&[("field", "items")], &["out"], &input).unwrap();
        let values: Vec<_> = out.iter().map(|o| o.record.value.clone().unwrap()).collect();
        assert_eq!(values, [br#"{"sku":"a"}"#.to_vec(), br#"{"sku":"b"}"#.to_vec()]);
        let out = transform::<Explode>(&[("field", "items"), ("keep", "true")], &["out"], &input).unwrap();
        assert_eq!(out[1].record.value.as_deref(), Some(&br#"{"id":1,"items":{"sku":"b"}}"#[..]));
        assert_eq!(out[1].record.key.as_deref(), Some(&b"o1"[..]));
    }

    #[test]
    fn a_missing_array_is_an_error() {
        let err = transform::<Explode>(&[("field", "items")], &["out"], &[TestRecord::value("{}")]).unwrap_err();
        assert_eq!(err.0, 0);
    }
}
