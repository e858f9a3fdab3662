//! Decoding the entries a plugin returns (spec/plugins.md), checked against
//! the batch they answer: a plugin cannot make the host read out of bounds
//! or invent an input record.

use quiver_protocol::varint::{get_varint, get_varlong};

const FORWARD: u8 = 0;
const NEW: u8 = 1;

/// One output record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry<'a> {
    /// Input record `input`, unchanged, to output `topic`.
    Forward { input: u32, topic: u32 },
    /// A new record derived from input `input` (it takes that timestamp).
    New {
        input: u32,
        topic: u32,
        partition: Option<u32>,
        key: Option<&'a [u8]>,
        value: Option<&'a [u8]>,
        headers: Vec<(&'a str, Option<&'a [u8]>)>,
    },
}

impl Entry<'_> {
    pub fn input(&self) -> u32 {
        match self {
            Entry::Forward { input, .. } | Entry::New { input, .. } => *input,
        }
    }

    pub fn topic(&self) -> u32 {
        match self {
            Entry::Forward { topic, .. } | Entry::New { topic, .. } => *topic,
        }
    }
}

/// Decodes every entry; `inputs` is the batch's record count and `topics`
/// the number of outputs the plugin may name.
pub fn decode(mut buf: &[u8], inputs: u32, topics: u32) -> Result<Vec<Entry<'_>>, String> {
    let mut out = Vec::new();
    while let Some((&tag, rest)) = buf.split_first() {
        buf = rest;
        let n = out.len();
        let bad = |what: &str| format!("entry {n}: {what}");
        let input = u32::try_from(get_varlong(&mut buf).map_err(|_| bad("bad input index"))?)
            .ok()
            .filter(|i| *i < inputs)
            .ok_or_else(|| bad(&format!("input index out of range for a batch of {inputs}")))?;
        let topic = u32::try_from(get_varlong(&mut buf).map_err(|_| bad("bad topic index"))?)
            .ok()
            .filter(|t| *t < topics)
            .ok_or_else(|| bad(&format!("output topic index out of range ({topics} outputs)")))?;
        match tag {
            FORWARD => out.push(Entry::Forward { input, topic }),
            NEW => {
                let partition = get_varlong(&mut buf).map_err(|_| bad("bad partition"))?;
                let partition = match partition {
                    -1 => None,
                    p => Some(u32::try_from(p).map_err(|_| bad("bad partition"))?),
                };
                let key = take(&mut buf).ok_or_else(|| bad("bad key"))?;
                let value = take(&mut buf).ok_or_else(|| bad("bad value"))?;
                let count = get_varint(&mut buf).map_err(|_| bad("bad header count"))?;
                if count < 0 || count as usize > buf.len() {
                    return Err(bad("bad header count"));
                }
                let mut headers = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    let k = take(&mut buf).flatten().ok_or_else(|| bad("bad header key"))?;
                    let k = std::str::from_utf8(k).map_err(|_| bad("header key is not UTF-8"))?;
                    headers.push((k, take(&mut buf).ok_or_else(|| bad("bad header value"))?));
                }
                out.push(Entry::New { input, topic, partition, key, value, headers });
            }
            other => return Err(bad(&format!("unknown tag {other}"))),
        }
    }
    Ok(out)
}

fn take<'a>(buf: &mut &'a [u8]) -> Option<Option<&'a [u8]>> {
    let len = get_varint(buf).ok()?;
    if len == -1 {
        return Some(None);
    }
    let len = usize::try_from(len).ok().filter(|l| *l <= buf.len())?;
    let (field, rest) = buf.split_at(len);
    *buf = rest;
    Some(Some(field))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_indexes_are_refused() {
        assert_eq!(decode(&[FORWARD, 0, 0], 1, 1).unwrap(), [Entry::Forward { input: 0, topic: 0 }]);
        assert!(decode(&[FORWARD, 2, 0], 1, 1).unwrap_err().contains("input index out of range"));
        assert!(decode(&[FORWARD, 0, 2], 1, 1).unwrap_err().contains("output topic index"));
        assert!(decode(&[7, 0, 0], 1, 1).unwrap_err().contains("unknown tag 7"));
        // A new record whose value length runs past the buffer.
        assert!(decode(&[NEW, 0, 0, 1, 1, 40], 1, 1).is_err());
    }

    #[test]
    fn new_records_decode_with_their_fields() {
        // key "k", value null, one header ("h", "v"), partition 3.
        let buf = [NEW, 0, 0, 6, 2, b'k', 1, 2, 2, b'h', 2, b'v'];
        let entries = decode(&buf, 1, 1).unwrap();
        assert_eq!(
            entries,
            [Entry::New {
                input: 0,
                topic: 0,
                partition: Some(3),
                key: Some(b"k"),
                value: None,
                headers: vec![("h", Some(&b"v"[..]))]
            }]
        );
    }
}
