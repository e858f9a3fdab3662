//! Builds plugin crates into components: `cargo build --release --target
//! wasm32-wasip2`, run in the crate's directory (so its `.cargo/config.toml`
//! applies), reading the artifact's path from cargo's JSON messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The Rust target plugins are built for.
pub const TARGET: &str = "wasm32-wasip2";

/// Builds `package` (or the crate at `dir`) and returns the `.wasm` file.
/// Cargo's diagnostics go to this process's stderr.
pub fn build(dir: &Path, package: Option<&str>) -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(dir)
        .args(["build", "--release", "--target", TARGET, "--message-format=json-render-diagnostics"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(p) = package {
        cmd.args(["-p", p]);
    }
    let out = cmd.output().map_err(|e| format!("cannot run cargo in {}: {e}", dir.display()))?;
    if !out.status.success() {
        return Err(format!(
            "cargo build for {TARGET} failed in {} (is the target installed? `rustup target add {TARGET}`)",
            dir.display()
        ));
    }
    let mut wasm = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        if let Some(p) = package
            && msg["target"]["name"].as_str().map(|n| n.replace('_', "-")) != Some(p.replace('_', "-"))
        {
            continue;
        }
        for f in msg["filenames"].as_array().into_iter().flatten().filter_map(|f| f.as_str()) {
            if f.ends_with(".wasm") {
                wasm = Some(PathBuf::from(f));
            }
        }
    }
    wasm.ok_or_else(|| format!("cargo built no .wasm component in {} (is the crate a cdylib?)", dir.display()))
}

/// Builds a first-party plugin from `plugins/` of this source tree (tests
/// and benchmarks use this; nothing built is committed).
pub fn first_party(name: &str) -> Result<PathBuf, String> {
    let plugins = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins");
    build(&plugins, Some(name))
}
