//! The first-party plugins' own unit tests (`cargo test` in plugins/, run
//! natively), so that `cargo test --workspace` covers them too.

#[test]
fn first_party_plugins_pass_their_unit_tests() {
    let plugins = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = std::process::Command::new(cargo).current_dir(&plugins).args(["test", "--quiet"]).output().unwrap();
    assert!(
        out.status.success(),
        "plugins/ unit tests failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
