//! `quiver`: broker, development node, topic commands, benchmarks, demo.

use clap::Parser;

/// glibc malloc serialises the broker's and the QUIC drivers' threads on
/// its arena locks under load (futex waits in the produce profile).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option (the C enum's value: mimalloc does not
/// export option constants, and keeps their numbers stable).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory stays mapped before mimalloc returns it to the
/// system. By default (1 s) a produce stream of a few hundred MiB/s had its
/// batch and packet buffers returned and faulted back in again: about 3 500
/// page faults per GiB, the kernel zeroing 2 MiB pages for 7 % of the CPU.
/// At 5 s the same run takes about 700 faults; an idle broker still gives
/// the memory back, 5 s later. `MIMALLOC_PURGE_DELAY` overrides it.
const PURGE_DELAY_MS: std::ffi::c_long = 5_000;

fn main() -> std::process::ExitCode {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: no other thread exists yet (mi_option_set is not thread
        // safe), and the option number is mimalloc's purge delay.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
    let cli = quiver_server::cli::Cli::parse();
    quiver_server::cli::init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(quiver_server::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
