//! What a plugin returns for a record, and how it crosses back to the host.
//!
//! Entries (spec/plugins.md): `0x00 input topic` forwards input record
//! `input` unchanged; `0x01 input topic partition key value headers` is a new
//! record derived from input `input` (it takes that record's timestamp).
//! `partition` is -1 for "by key".

use crate::record::{put_nullable, put_varint};
use crate::{Error, Record};

pub(crate) const FORWARD: u8 = 0;
pub(crate) const NEW: u8 = 1;

/// One output record: the input record unchanged, or a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    topic: Option<String>,
    body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Body {
    Forward,
    New {
        key: Option<Vec<u8>>,
        value: Option<Vec<u8>>,
        headers: Vec<(String, Option<Vec<u8>>)>,
        partition: Option<u32>,
    },
}

impl Output {
    /// The input record, unchanged. Nothing is copied back to the host.
    pub fn forward() -> Self {
        Output { topic: None, body: Body::Forward }
    }

    /// A new record with this key and value and no headers.
    pub fn new(key: Option<impl Into<Vec<u8>>>, value: Option<impl Into<Vec<u8>>>) -> Self {
        Output {
            topic: None,
            body: Body::New {
                key: key.map(Into::into),
                value: value.map(Into::into),
                headers: Vec::new(),
                partition: None,
            },
        }
    }

    /// The input record's key and headers with a new value.
    pub fn with_value(record: &Record<'_>, value: impl Into<Vec<u8>>) -> Self {
        Output {
            topic: None,
            body: Body::New {
                key: record.key().map(<[u8]>::to_vec),
                value: Some(value.into()),
                headers: record.headers().map(|(k, v)| (k.to_owned(), v.map(<[u8]>::to_vec))).collect(),
                partition: None,
            },
        }
    }

    /// Sends the record to this output topic (a transform's first output
    /// topic otherwise).
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// Adds a header. A forwarded record becomes a new one: call this on
    /// records built with `new` or `with_value`.
    pub fn header(mut self, key: impl Into<String>, value: Option<impl Into<Vec<u8>>>) -> Self {
        if let Body::New { headers, .. } = &mut self.body {
            headers.push((key.into(), value.map(Into::into)));
        }
        self
    }

    /// Writes the record to this partition of its topic instead of choosing
    /// one by key.
    pub fn partition(mut self, partition: u32) -> Self {
        if let Body::New { partition: p, .. } = &mut self.body {
            *p = Some(partition);
        }
        self
    }

    pub fn is_forward(&self) -> bool {
        matches!(self.body, Body::Forward)
    }

    pub fn topic_name(&self) -> Option<&str> {
        self.topic.as_deref()
    }

    pub fn key(&self) -> Option<&[u8]> {
        match &self.body {
            Body::Forward => None,
            Body::New { key, .. } => key.as_deref(),
        }
    }

    pub fn value(&self) -> Option<&[u8]> {
        match &self.body {
            Body::Forward => None,
            Body::New { value, .. } => value.as_deref(),
        }
    }

    /// Appends this output's entry for input record `input`; `topic` is the
    /// index of its output topic.
    pub(crate) fn encode(&self, out: &mut Vec<u8>, input: u32, topic: u32) {
        match &self.body {
            Body::Forward => {
                out.push(FORWARD);
                put_varint(out, i64::from(input));
                put_varint(out, i64::from(topic));
            }
            Body::New { key, value, headers, partition } => {
                out.push(NEW);
                put_varint(out, i64::from(input));
                put_varint(out, i64::from(topic));
                put_varint(out, partition.map_or(-1, i64::from));
                put_nullable(out, key.as_deref());
                put_nullable(out, value.as_deref());
                put_varint(out, headers.len() as i64);
                for (k, v) in headers {
                    put_nullable(out, Some(k.as_bytes()));
                    put_nullable(out, v.as_deref());
                }
            }
        }
    }
}

/// Resolves an output's topic name to its index among the deployed outputs.
pub(crate) fn topic_index(outputs: &[String], output: &Output) -> Result<u32, Error> {
    match &output.topic {
        None => Ok(0),
        Some(name) => outputs.iter().position(|t| t == name).map(|i| i as u32).ok_or_else(|| {
            Error::new(format!("output topic '{name}' is not one of this transform's outputs ({})", outputs.join(", ")))
        }),
    }
}
