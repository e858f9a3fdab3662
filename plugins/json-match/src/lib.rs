//! Read-side filter: a consumer names it in its fetch and only records whose
//! JSON value matches leave the broker. Parameters as for `json-filter`
//! (`field`, `op`, `value`); values that are not JSON are dropped.

use plugin_util::Predicate;
use quiver_plugin::{Error, Filter, Output, Params, Record};

pub struct JsonMatch(Predicate);

impl Filter for JsonMatch {
    fn init(params: &Params) -> Result<Self, Error> {
        Ok(JsonMatch(Predicate::from_params(params)?))
    }

    fn filter(&mut self, record: &Record<'_>) -> Result<Option<Output>, Error> {
        Ok(self.0.matches_record(record).unwrap_or(false).then(Output::forward))
    }
}

quiver_plugin::filter!(JsonMatch);

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_plugin::testing::{TestRecord, filter};

    #[test]
    fn drops_non_matching_and_invalid_records() {
        let input = [TestRecord::value(r#"{"c": "fr"}"#), TestRecord::value("x"), TestRecord::value(r#"{"c": "de"}"#)];
        let out = filter::<JsonMatch>(&[("field", "c"), ("value", "de")], &input).unwrap();
        assert_eq!(out.iter().map(|o| o.input).collect::<Vec<_>>(), [2]);
    }
}
