//! Serializer: on produce, checks each JSON value against a schema and stores
//! it compact (whitespace removed); a record that does not conform rejects
//! its whole batch, naming the record, the path and the rule. On consume,
//! values pass through.
//!
//! Parameter `schema`: a JSON Schema using this subset of keywords: `type`
//! (a name or a list), `properties`, `required`, `additionalProperties`
//! (boolean), `items`, `enum`, `const`, `minimum`, `maximum`, `minLength`,
//! `maxLength`, `minItems`, `maxItems`, plus the annotations `$schema`,
//! `title`, `description`. Any other keyword is refused at deploy time,
//! rather than silently not checked.

use quiver_plugin::{Error, Output, Params, Record, Serializer};
use serde_json::Value;

const KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "$schema",
    "title",
    "description",
];

pub struct JsonSchema {
    schema: Value,
}

impl Serializer for JsonSchema {
    fn init(params: &Params) -> Result<Self, Error> {
        let text = params.require("schema")?;
        let schema: Value =
            serde_json::from_str(text).map_err(|e| Error::new(format!("parameter 'schema' is not JSON: {e}")))?;
        check_schema(&schema, "")?;
        Ok(JsonSchema { schema })
    }

    fn encode(&mut self, record: &Record<'_>) -> Result<Output, Error> {
        let raw = record.value().ok_or_else(|| Error::new("value is null, expected JSON"))?;
        let doc: Value = serde_json::from_slice(raw).map_err(|e| Error::new(format!("value is not JSON: {e}")))?;
        validate(&self.schema, &doc, &mut String::new())?;
        let compact = serde_json::to_vec(&doc)?;
        Ok(if compact == raw { Output::forward() } else { Output::with_value(record, compact) })
    }

    fn decode(&mut self, _record: &Record<'_>) -> Result<Output, Error> {
        Ok(Output::forward())
    }
}

quiver_plugin::serializer!(JsonSchema);

fn check_schema(schema: &Value, at: &str) -> Result<(), Error> {
    let Value::Object(map) = schema else {
        return Err(Error::new(format!("schema at '{at}' must be an object")));
    };
    for (k, v) in map {
        if !KEYWORDS.contains(&k.as_str()) {
            return Err(Error::new(format!("schema keyword '{k}' at '{at}' is not supported")));
        }
        match k.as_str() {
            "properties" => {
                for (name, sub) in v.as_object().ok_or_else(|| Error::new("'properties' must be an object"))? {
                    check_schema(sub, &format!("{at}/{name}"))?;
                }
            }
            "items" => check_schema(v, &format!("{at}/items"))?,
            _ => {}
        }
    }
    Ok(())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_matches(want: &str, v: &Value) -> bool {
    let have = type_name(v);
    want == have || (want == "number" && have == "integer")
}

fn validate(schema: &Value, doc: &Value, path: &mut String) -> Result<(), Error> {
    let fail =
        |path: &str, why: String| Err(Error::new(format!("at '{}': {why}", if path.is_empty() { "/" } else { path })));
    let s = |k: &str| schema.get(k);
    match s("type") {
        Some(Value::String(t)) if !type_matches(t, doc) => {
            return fail(path, format!("expected {t}, found {}", type_name(doc)));
        }
        Some(Value::Array(ts)) if !ts.iter().filter_map(Value::as_str).any(|t| type_matches(t, doc)) => {
            return fail(path, format!("expected one of {}, found {}", Value::Array(ts.clone()), type_name(doc)));
        }
        _ => {}
    }
    if let Some(Value::Array(options)) = s("enum") {
        if !options.contains(doc) {
            return fail(path, format!("{doc} is not one of {}", Value::Array(options.clone())));
        }
    }
    if let Some(c) = s("const") {
        if c != doc {
            return fail(path, format!("{doc} is not {c}"));
        }
    }
    if let Some(n) = doc.as_f64() {
        if let Some(min) = s("minimum").and_then(Value::as_f64) {
            if n < min {
                return fail(path, format!("{doc} is below the minimum {min}"));
            }
        }
        if let Some(max) = s("maximum").and_then(Value::as_f64) {
            if n > max {
                return fail(path, format!("{doc} is above the maximum {max}"));
            }
        }
    }
    if let Value::String(text) = doc {
        let len = text.chars().count() as u64;
        if s("minLength").and_then(Value::as_u64).is_some_and(|m| len < m) {
            return fail(path, format!("string is shorter than {}", s("minLength").unwrap()));
        }
        if s("maxLength").and_then(Value::as_u64).is_some_and(|m| len > m) {
            return fail(path, format!("string is longer than {}", s("maxLength").unwrap()));
        }
    }
    if let Value::Array(items) = doc {
        let len = items.len() as u64;
        if s("minItems").and_then(Value::as_u64).is_some_and(|m| len < m) {
            return fail(path, format!("fewer than {} items", s("minItems").unwrap()));
        }
        if s("maxItems").and_then(Value::as_u64).is_some_and(|m| len > m) {
            return fail(path, format!("more than {} items", s("maxItems").unwrap()));
        }
        if let Some(item_schema) = s("items") {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("/{i}"));
                validate(item_schema, item, path)?;
                path.truncate(len);
            }
        }
    }
    if let Value::Object(fields) = doc {
        if let Some(Value::Array(required)) = s("required") {
            if let Some(missing) = required.iter().filter_map(Value::as_str).find(|r| !fields.contains_key(*r)) {
                return fail(path, format!("required field '{missing}' is missing"));
            }
        }
        let properties = s("properties").and_then(Value::as_object);
        for (name, value) in fields {
            match properties.and_then(|p| p.get(name)) {
                Some(sub) => {
                    let len = path.len();
                    path.push('/');
                    path.push_str(name);
                    validate(sub, value, path)?;
                    path.truncate(len);
                }
                None if s("additionalProperties") == Some(&Value::Bool(false)) => {
                    return fail(path, format!("field '{name}' is not allowed"));
                }
                None => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_plugin::testing::{TestRecord, serialize};

    const SCHEMA: &str = r#"{"type":"object","required":["id","age"],"additionalProperties":false,
        "properties":{"id":{"type":"string","minLength":1},"age":{"type":"integer","minimum":18},
        "tags":{"type":"array","items":{"enum":["a","b"]}}}}"#;

    #[test]
    fn valid_records_are_stored_compact() {
        let input = [TestRecord::value(r#"{ "id": "x", "age": 30 }"#), TestRecord::value(r#"{"age":18,"id":"y"}"#)];
        let out = serialize::<JsonSchema>(&[("schema", SCHEMA)], &input, true).unwrap();
        assert_eq!(out[0].record.value.as_deref(), Some(&br#"{"id":"x","age":30}"#[..]));
        assert_eq!(out[1].record, input[1]);
    }

    #[test]
    fn the_first_bad_record_is_named_with_the_rule() {
        let input =
            [TestRecord::value(r#"{"id":"x","age":30}"#), TestRecord::value(r#"{"id":"x","age":30,"tags":["a","z"]}"#)];
        let err = serialize::<JsonSchema>(&[("schema", SCHEMA)], &input, true).unwrap_err();
        assert_eq!(err, (1, r#"at '/tags/1': "z" is not one of ["a","b"]"#.into()));
        let cases = [
            (r#"{"id":"x"}"#, "at '/': required field 'age' is missing"),
            (r#"{"id":"x","age":17}"#, "at '/age': 17 is below the minimum 18"),
            (r#"{"id":"x","age":1.5}"#, "at '/age': expected integer, found number"),
            (r#"{"id":"x","age":20,"extra":1}"#, "at '/': field 'extra' is not allowed"),
            ("nope", "value is not JSON: expected ident at line 1 column 2"),
        ];
        for (value, message) in cases {
            let err = serialize::<JsonSchema>(&[("schema", SCHEMA)], &[TestRecord::value(value)], true).unwrap_err();
            assert_eq!(err, (0, message.into()), "{value}");
        }
    }

    #[test]
    fn unsupported_keywords_are_refused_at_start() {
        let err = serialize::<JsonSchema>(&[("schema", r#"{"pattern":"^a"}"#)], &[], true).unwrap_err();
        assert_eq!(err.1, "schema keyword 'pattern' at '' is not supported");
        let err = serialize::<JsonSchema>(&[], &[], true).unwrap_err();
        assert_eq!(err.1, "missing parameter 'schema'");
    }
}
