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
/// At 5 s the same run takes about 700 faults. `MIMALLOC_PURGE_DELAY`
/// overrides it.
const PURGE_DELAY_MS: std::ffi::c_long = 5_000;

/// mimalloc returns memory whose purge delay has passed only when the
/// process allocates again, so a broker that went idle after a burst kept
/// what it had freed (≈ 45 MiB after 1 GB produced and read back). A
/// thread asks it this often to return what is due.
const COLLECT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// No transparent huge pages for this process (mimalloc asks for them on its
/// memory, `MIMALLOC_ALLOW_THP=1` keeps them): the kernel's khugepaged
/// filled partly used 2 MiB ranges in the background, so an idle broker's
/// memory grew from ≈ 47 to ≈ 60 MiB with no client connected, and a fresh
/// node started at 28 MiB instead of 16. Throughput was the same either way
/// (`quiver bench produce|consume --embedded --baseline`, alternated).
fn disable_transparent_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches only
        // this process's memory policy; a kernel without it returns an error.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

fn main() -> std::process::ExitCode {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: no other thread exists yet (mi_option_set is not thread
        // safe), and the option number is mimalloc's purge delay.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
    disable_transparent_huge_pages();
    // Best effort: without it, memory is returned at the next allocations.
    let _ = std::thread::Builder::new().name("mi-collect".into()).spawn(|| {
        loop {
            std::thread::sleep(COLLECT_EVERY);
            // SAFETY: mi_collect may be called from any thread; without
            // `force` it returns only memory whose purge delay has passed.
            unsafe { libmimalloc_sys::mi_collect(false) };
        }
    });
    let cli = quiver_server::cli::Cli::parse();
    if !matches!(cli.command, quiver_server::cli::Command::Dev { .. } | quiver_server::cli::Command::Broker { .. }) {
        // A client command whose reader went away (`quiver topic consume
        // ... | head`) ends quietly, as other command-line tools do, instead
        // of failing on a write to a closed pipe. The nodes keep Rust's
        // default (SIGPIPE ignored: a closed socket is an error to handle).
        // SAFETY: restoring a signal's default disposition, before any
        // other thread than mi-collect (which never writes) exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
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
