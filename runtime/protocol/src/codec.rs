//! The binary encoding of request and response bodies: big-endian integers,
//! `u32`-length-prefixed strings, byte strings and lists, `u8`-tagged options.
//! Decoding takes a `Bytes` so that byte fields (record batches) are slices of
//! the received frame, never copies.

use bytes::{Buf, BufMut, Bytes, BytesMut};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame ends early while reading {0}")]
    Truncated(&'static str),
    #[error("invalid UTF-8 in a string field")]
    Utf8,
    #[error("invalid tag {tag} for {what}")]
    BadTag { what: &'static str, tag: u8 },
    #[error("list of {0} items cannot fit in the remaining frame")]
    BadLength(u64),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

/// Where message bodies are encoded: a growing buffer for small fields, and
/// large byte fields (record batches) kept as their own `Bytes` chunks, so a
/// fetch response or a produce request is sent without copying its records.
#[derive(Debug, Default)]
pub struct FrameBuf {
    head: BytesMut,
    chunks: Vec<Bytes>,
}

/// Byte fields at least this large travel as their own chunk.
const SHARED_CHUNK_BYTES_MIN: usize = 4096;

impl FrameBuf {
    pub fn new() -> Self {
        FrameBuf::default()
    }

    /// Appends `bytes` by reference when it is large, by copy otherwise.
    pub fn put_shared(&mut self, bytes: &Bytes) {
        if bytes.len() >= SHARED_CHUNK_BYTES_MIN {
            if !self.head.is_empty() {
                self.chunks.push(self.head.split().freeze());
            }
            self.chunks.push(bytes.clone());
        } else {
            self.head.put_slice(bytes);
        }
    }

    /// Bytes encoded so far.
    pub fn len(&self) -> usize {
        self.head.len() + self.chunks.iter().map(Bytes::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The encoded bytes, as chunks to be written in order.
    pub fn into_chunks(mut self) -> Vec<Bytes> {
        if !self.head.is_empty() {
            self.chunks.push(self.head.freeze());
        }
        self.chunks
    }
}

// SAFETY: every method delegates to the inner `BytesMut`, which upholds the
// `BufMut` contract itself.
unsafe impl BufMut for FrameBuf {
    fn remaining_mut(&self) -> usize {
        self.head.remaining_mut()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: the caller's guarantee is forwarded unchanged.
        unsafe { self.head.advance_mut(cnt) }
    }

    fn chunk_mut(&mut self) -> &mut bytes::buf::UninitSlice {
        self.head.chunk_mut()
    }
}

/// Concatenates chunks (tests, fuzzing, and anything that wants one buffer).
pub fn concat(chunks: &[Bytes]) -> Bytes {
    if let [single] = chunks {
        return single.clone();
    }
    let mut out = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
    for c in chunks {
        out.put_slice(c);
    }
    out.freeze()
}

/// A value with a binary encoding.
pub trait Wire: Sized {
    fn encode(&self, buf: &mut FrameBuf);
    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError>;
}

/// Decodes a whole message; leftover bytes are an error.
pub fn decode_exact<T: Wire>(mut buf: Bytes) -> Result<T, DecodeError> {
    let value = T::decode(&mut buf)?;
    if !buf.is_empty() {
        return Err(DecodeError::Trailing(buf.len()));
    }
    Ok(value)
}

pub fn encode_to_bytes<T: Wire>(value: &T) -> Bytes {
    let mut buf = FrameBuf::new();
    value.encode(&mut buf);
    concat(&buf.into_chunks())
}

fn need(buf: &Bytes, n: usize, what: &'static str) -> Result<(), DecodeError> {
    if buf.remaining() < n { Err(DecodeError::Truncated(what)) } else { Ok(()) }
}

macro_rules! wire_int {
    ($($t:ty => $put:ident, $get:ident;)*) => {$(
        impl Wire for $t {
            fn encode(&self, buf: &mut FrameBuf) {
                buf.$put(*self);
            }
            fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
                need(buf, std::mem::size_of::<$t>(), stringify!($t))?;
                Ok(buf.$get())
            }
        }
    )*};
}

wire_int! {
    u8 => put_u8, get_u8;
    u16 => put_u16, get_u16;
    i16 => put_i16, get_i16;
    u32 => put_u32, get_u32;
    i32 => put_i32, get_i32;
    u64 => put_u64, get_u64;
    i64 => put_i64, get_i64;
}

impl Wire for bool {
    fn encode(&self, buf: &mut FrameBuf) {
        buf.put_u8(u8::from(*self));
    }
    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        match u8::decode(buf)? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(DecodeError::BadTag { what: "bool", tag }),
        }
    }
}

impl Wire for Bytes {
    fn encode(&self, buf: &mut FrameBuf) {
        buf.put_u32(self.len() as u32);
        buf.put_shared(self);
    }
    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        let len = u32::decode(buf)? as usize;
        need(buf, len, "bytes")?;
        Ok(buf.split_to(len))
    }
}

impl Wire for String {
    fn encode(&self, buf: &mut FrameBuf) {
        buf.put_u32(self.len() as u32);
        buf.put_slice(self.as_bytes());
    }
    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        let raw = Bytes::decode(buf)?;
        String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::Utf8)
    }
}

impl<T: Wire> Wire for Option<T> {
    fn encode(&self, buf: &mut FrameBuf) {
        match self {
            None => buf.put_u8(0),
            Some(v) => {
                buf.put_u8(1);
                v.encode(buf);
            }
        }
    }
    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        match u8::decode(buf)? {
            0 => Ok(None),
            1 => Ok(Some(T::decode(buf)?)),
            tag => Err(DecodeError::BadTag { what: "option", tag }),
        }
    }
}

impl<T: Wire> Wire for Vec<T> {
    fn encode(&self, buf: &mut FrameBuf) {
        buf.put_u32(self.len() as u32);
        for item in self {
            item.encode(buf);
        }
    }
    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        let count = u32::decode(buf)? as usize;
        // Every element takes at least one byte: a hostile count cannot make
        // us reserve more than the frame could hold.
        if count > buf.remaining() {
            return Err(DecodeError::BadLength(count as u64));
        }
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            items.push(T::decode(buf)?);
        }
        Ok(items)
    }
}

impl<A: Wire, B: Wire> Wire for (A, B) {
    fn encode(&self, buf: &mut FrameBuf) {
        self.0.encode(buf);
        self.1.encode(buf);
    }
    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        Ok((A::decode(buf)?, B::decode(buf)?))
    }
}

/// Declares a struct whose encoding is its fields in order.
#[macro_export]
macro_rules! wire_struct {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name { $($(#[$fmeta])* pub $field: $ty),* }

        impl $crate::codec::Wire for $name {
            #[allow(unused_variables)]
            fn encode(&self, buf: &mut $crate::codec::FrameBuf) {
                $($crate::codec::Wire::encode(&self.$field, buf);)*
            }
            #[allow(unused_variables)]
            fn decode(buf: &mut ::bytes::Bytes) -> Result<Self, $crate::codec::DecodeError> {
                Ok($name { $($field: <$ty as $crate::codec::Wire>::decode(buf)?),* })
            }
        }
    };
}

/// Declares a fieldless enum encoded as one `u8`.
#[macro_export]
macro_rules! wire_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $tag:literal),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name { $($(#[$vmeta])* $variant = $tag),* }

        impl $crate::codec::Wire for $name {
            fn encode(&self, buf: &mut $crate::codec::FrameBuf) {
                ::bytes::BufMut::put_u8(buf, *self as u8);
            }
            fn decode(buf: &mut ::bytes::Bytes) -> Result<Self, $crate::codec::DecodeError> {
                match <u8 as $crate::codec::Wire>::decode(buf)? {
                    $($tag => Ok($name::$variant),)*
                    tag => Err($crate::codec::DecodeError::BadTag { what: stringify!($name), tag }),
                }
            }
        }
    };
}
