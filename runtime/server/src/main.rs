//! `quiver`: broker, development node, topic commands, benchmarks, demo.

use clap::Parser;

/// glibc malloc serialises the broker's and the QUIC drivers' threads on
/// its arena locks under load (futex waits in the produce profile).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
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
