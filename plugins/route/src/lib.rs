//! Transform: fans records out to output topics by a field's value. The
//! output topic is `prefix` + the field's value; a record whose field is
//! missing or names no deployed output goes to `default` (a deployed output)
//! or, without `default`, is a poison record. Parameters: `field`, `prefix`
//! (optional), `default` (optional).

use plugin_util::{FieldPath, scalar_text};
use quiver_plugin::{Error, Output, Params, Record, Transform};

pub struct Route {
    field: FieldPath,
    prefix: String,
    default: Option<String>,
    outputs: Vec<String>,
}

impl Transform for Route {
    fn init(params: &Params) -> Result<Self, Error> {
        Ok(Route {
            field: FieldPath::parse(params.require("field")?)?,
            prefix: params.get("prefix").unwrap_or("").to_owned(),
            default: params.get("default").map(str::to_owned),
            outputs: params.outputs().to_vec(),
        })
    }

    fn transform(&mut self, record: &Record<'_>) -> Result<impl IntoIterator<Item = Output>, Error> {
        let found = self.field.extract_from(record)?;
        let topic = found.as_ref().and_then(scalar_text).map(|v| format!("{}{v}", self.prefix));
        let output = Output::forward();
        Ok(Some(match (topic, &self.default) {
            (Some(topic), Some(default)) if !self.outputs.contains(&topic) => output.topic(default.clone()),
            (Some(topic), _) => output.topic(topic),
            (None, Some(default)) => output.topic(default.clone()),
            (None, None) => return Err(Error::new("the routing field is missing or not a scalar")),
        }))
    }
}

quiver_plugin::transform!(Route);

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_plugin::testing::{TestRecord, transform};

    #[test]
    fn routes_by_field_value() {
        let input = [TestRecord::value(r#"{"region":"eu"}"#), TestRecord::value(r#"{"region":"us"}"#)];
        let out =
            transform::<Route>(&[("field", "region"), ("prefix", "orders-")], &["orders-eu", "orders-us"], &input)
                .unwrap();
        assert_eq!(out.iter().map(|o| o.topic.as_str()).collect::<Vec<_>>(), ["orders-eu", "orders-us"]);
    }

    #[test]
    fn unknown_values_go_to_the_default_or_fail() {
        let input = [TestRecord::value(r#"{"region":"mars"}"#)];
        let err = transform::<Route>(&[("field", "region")], &["eu"], &input).unwrap_err();
        assert!(err.1.contains("'mars' is not one of"), "{}", err.1);
        let out = transform::<Route>(&[("field", "x"), ("default", "other")], &["eu", "other"], &input).unwrap();
        assert_eq!(out[0].topic, "other");
        let out = transform::<Route>(&[("field", "region"), ("default", "other")], &["eu", "other"], &input).unwrap();
        assert_eq!(out[0].topic, "other", "a value naming no output goes to the default");
    }
}
