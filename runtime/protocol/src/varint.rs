//! Zig-zag variable-length integers, as Kafka's record format uses them
//! (protobuf's encoding: 7 bits per byte, high bit = more follows).

use bytes::BufMut;

use crate::batch::BatchError;

pub fn put_varint(buf: &mut impl BufMut, value: i32) {
    put_unsigned(buf, ((value << 1) ^ (value >> 31)) as u32 as u64);
}

pub fn put_varlong(buf: &mut impl BufMut, value: i64) {
    put_unsigned(buf, ((value << 1) ^ (value >> 63)) as u64);
}

fn put_unsigned(buf: &mut impl BufMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

/// Encoded size of a zig-zag varint, without writing it.
pub fn varint_len(value: i32) -> usize {
    unsigned_len(((value << 1) ^ (value >> 31)) as u32 as u64)
}

pub fn varlong_len(value: i64) -> usize {
    unsigned_len(((value << 1) ^ (value >> 63)) as u64)
}

fn unsigned_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

fn get_unsigned(buf: &mut &[u8], max_bytes: usize) -> Result<u64, BatchError> {
    let mut result = 0u64;
    for i in 0..max_bytes {
        let Some((&byte, rest)) = buf.split_first() else {
            return Err(BatchError::Truncated);
        };
        *buf = rest;
        result |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(result);
        }
    }
    Err(BatchError::BadVarint)
}

pub fn get_varint(buf: &mut &[u8]) -> Result<i32, BatchError> {
    let raw = get_unsigned(buf, 5)?;
    if raw > u64::from(u32::MAX) {
        return Err(BatchError::BadVarint);
    }
    let raw = raw as u32;
    Ok(((raw >> 1) as i32) ^ -((raw & 1) as i32))
}

pub fn get_varlong(buf: &mut &[u8]) -> Result<i64, BatchError> {
    let raw = get_unsigned(buf, 10)?;
    Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn varint_roundtrip(v: i32) {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            prop_assert_eq!(buf.len(), varint_len(v));
            let mut slice = &buf[..];
            prop_assert_eq!(get_varint(&mut slice).unwrap(), v);
            prop_assert!(slice.is_empty());
        }

        #[test]
        fn varlong_roundtrip(v: i64) {
            let mut buf = Vec::new();
            put_varlong(&mut buf, v);
            prop_assert_eq!(buf.len(), varlong_len(v));
            let mut slice = &buf[..];
            prop_assert_eq!(get_varlong(&mut slice).unwrap(), v);
        }

        #[test]
        fn varint_never_panics(bytes: Vec<u8>) {
            let mut slice = &bytes[..];
            let _ = get_varint(&mut slice);
            let mut slice = &bytes[..];
            let _ = get_varlong(&mut slice);
        }
    }

    #[test]
    fn known_encodings() {
        let mut buf = Vec::new();
        put_varint(&mut buf, -1);
        put_varint(&mut buf, 1);
        put_varint(&mut buf, 64);
        assert_eq!(buf, [0x01, 0x02, 0x80, 0x01]);
    }
}
