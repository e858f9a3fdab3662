//! Zig-zag varints and varlongs: decoding arbitrary bytes never panics and
//! never reads more than 5 (varint) or 10 (varlong) bytes; whatever decodes
//! re-encodes to a value that decodes the same; encoding the leading bytes as
//! integers round-trips with the length `varint_len` / `varlong_len` predicts.

#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_protocol::varint::{
    get_varint, get_varlong, put_varint, put_varlong, varint_len, varlong_len,
};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    if let Ok(v) = get_varint(&mut rest) {
        assert!(data.len() - rest.len() <= 5);
        let mut buf = Vec::new();
        put_varint(&mut buf, v);
        assert_eq!(buf.len(), varint_len(v));
        assert_eq!(get_varint(&mut &buf[..]), Ok(v));
    }
    let mut rest = data;
    if let Ok(v) = get_varlong(&mut rest) {
        assert!(data.len() - rest.len() <= 10);
        let mut buf = Vec::new();
        put_varlong(&mut buf, v);
        assert_eq!(buf.len(), varlong_len(v));
        assert_eq!(get_varlong(&mut &buf[..]), Ok(v));
    }
    if let Some(raw) = data.get(..8) {
        let v64 = i64::from_be_bytes(raw.try_into().expect("8 bytes"));
        let v32 = v64 as i32;
        let mut buf = Vec::new();
        put_varint(&mut buf, v32);
        assert_eq!(buf.len(), varint_len(v32));
        let mut slice = &buf[..];
        assert_eq!(get_varint(&mut slice), Ok(v32));
        assert!(slice.is_empty());
        buf.clear();
        put_varlong(&mut buf, v64);
        assert_eq!(buf.len(), varlong_len(v64));
        let mut slice = &buf[..];
        assert_eq!(get_varlong(&mut slice), Ok(v64));
        assert!(slice.is_empty());
    }
});
