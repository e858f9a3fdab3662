//! Transform: masks named fields of a JSON value. Parameters: `fields`
//! (comma-separated dotted paths), `mask` (default `***`). Fields that are
//! absent are left alone; a value that is not JSON is a poison record.

use plugin_util::{FieldPath, parse};
use quiver_plugin::{Error, Output, Params, Record, Transform};
use serde_json::Value;

pub struct Redact {
    fields: Vec<FieldPath>,
    mask: Value,
}

impl Transform for Redact {
    fn init(params: &Params) -> Result<Self, Error> {
        let fields = params.list("fields");
        if fields.is_empty() {
            return Err(Error::new("missing parameter 'fields' (comma-separated field paths)"));
        }
        let fields = fields.into_iter().map(FieldPath::parse).collect::<Result<_, _>>()?;
        Ok(Redact { fields, mask: Value::String(params.get("mask").unwrap_or("***").to_owned()) })
    }

    fn transform(&mut self, record: &Record<'_>) -> Result<impl IntoIterator<Item = Output>, Error> {
        let mut doc = parse(record)?;
        let mut changed = false;
        for field in &self.fields {
            if let Some(v) = field.get_mut(&mut doc) {
                *v = self.mask.clone();
                changed = true;
            }
        }
        if !changed {
            return Ok(Some(Output::forward()));
        }
        Ok(Some(Output::with_value(record, serde_json::to_vec(&doc)?)))
    }
}

quiver_plugin::transform!(Redact);

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_plugin::testing::{TestRecord, transform};

    #[test]
    fn masks_named_fields_and_keeps_the_rest() {
        let input = [TestRecord::keyed("k", r#"{"card":"4111","user":{"email":"a@b"},"n":1}"#)];
        let out = transform::<Redact>(&[("fields", "card,user.email")], &["out"], &input).unwrap();
        let doc: Value = serde_json::from_slice(out[0].record.value.as_deref().unwrap()).unwrap();
        assert_eq!(doc, serde_json::json!({"card":"***","user":{"email":"***"},"n":1}));
        assert_eq!(out[0].record.key.as_deref(), Some(&b"k"[..]));
    }

    #[test]
    fn needs_fields() {
        assert!(transform::<Redact>(&[], &["out"], &[]).unwrap_err().1.contains("'fields'"));
    }
}
