//! A transform that misbehaves on purpose, for the host's safety tests. It
//! forwards records until it meets a value naming a misdeed, then does it:
//! `loop` (never returns), `alloc` (allocates without end), `trap` (an
//! unreachable instruction), `panic`, `file` (tries to read /etc/hostname),
//! `socket` (tries to connect to 127.0.0.1:9), `fail` (a record error).
//! `file` and `socket` report what happened as a record error, so a test can
//! see that the attempt was refused.

use quiver_plugin::{Error, Level, Output, Record, log};

pub fn misbehave(record: &Record<'_>) -> Result<Option<Output>, Error> {
    match record.value().unwrap_or_default() {
        b"loop" => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        b"alloc" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        b"trap" => {
            #[cfg(target_arch = "wasm32")]
            core::arch::wasm32::unreachable();
            #[cfg(not(target_arch = "wasm32"))]
            std::process::abort();
        }
        b"panic" => panic!("misbehave was asked to panic"),
        b"file" => match std::fs::read("/etc/hostname") {
            Ok(_) => Err(Error::new("file: opened")),
            Err(e) => Err(Error::new(format!("file: refused: {e}"))),
        },
        b"socket" => match std::net::TcpStream::connect("127.0.0.1:9") {
            Ok(_) => Err(Error::new("socket: connected")),
            Err(e) => Err(Error::new(format!("socket: refused: {e}"))),
        },
        b"fail" => Err(Error::new("asked to fail")),
        b"log" => {
            log(Level::Info, "hello from misbehave");
            Ok(Some(Output::forward()))
        }
        _ => Ok(Some(Output::forward())),
    }
}

quiver_plugin::transform!(fn misbehave);
