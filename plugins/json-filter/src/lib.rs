//! Transform: forwards the records whose JSON value matches a predicate.
//! Parameters: `field` (dotted path), `op` (eq, ne, gt, ge, lt, le, exists,
//! missing, contains; default eq), `value`; `on-invalid` = skip | error
//! (default error: a value that is not JSON is a poison record).

use plugin_util::Predicate;
use quiver_plugin::{Error, Output, Params, Record, Transform};

pub struct JsonFilter {
    predicate: Predicate,
    skip_invalid: bool,
}

impl Transform for JsonFilter {
    fn init(params: &Params) -> Result<Self, Error> {
        let skip_invalid = match params.get("on-invalid").unwrap_or("error") {
            "skip" => true,
            "error" => false,
            other => return Err(Error::new(format!("parameter 'on-invalid' = '{other}': expected skip or error"))),
        };
        Ok(JsonFilter { predicate: Predicate::from_params(params)?, skip_invalid })
    }

    fn transform(&mut self, record: &Record<'_>) -> Result<impl IntoIterator<Item = Output>, Error> {
        match self.predicate.matches_record(record) {
            Ok(keep) => Ok(keep.then(Output::forward)),
            Err(_) if self.skip_invalid => Ok(None),
            Err(e) => Err(e),
        }
    }
}

quiver_plugin::transform!(JsonFilter);

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_plugin::testing::{TestRecord, transform};

    #[test]
    fn keeps_only_matching_records() {
        let input = [TestRecord::value(r#"{"n": 1}"#), TestRecord::value(r#"{"n": 7}"#)];
        let out = transform::<JsonFilter>(&[("field", "n"), ("op", "gt"), ("value", "5")], &["out"], &input).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].input, 1);
    }

    #[test]
    fn invalid_json_is_a_poison_record_unless_skipped() {
        let input = [TestRecord::value(r#"{"n": 9}"#), TestRecord::value("not json")];
        let err = transform::<JsonFilter>(&[("field", "n"), ("value", "9")], &["out"], &input).unwrap_err();
        assert_eq!(err.0, 1);
        let params = [("field", "n"), ("value", "9"), ("on-invalid", "skip")];
        assert_eq!(transform::<JsonFilter>(&params, &["out"], &input).unwrap().len(), 1);
    }
}
