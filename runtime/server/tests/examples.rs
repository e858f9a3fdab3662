//! The runnable examples under `examples/` work with this build's binary.
//! Each script checks its own claims and exits non-zero when one fails.

use std::path::Path;
use std::process::Command;

/// Runs `examples/NAME/run.sh` with this build's binary; its stdout.
fn run_example(name: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../examples/{name}/run.sh"));
    let out = Command::new("bash").arg(&script).env("QUIVER", env!("CARGO_BIN_EXE_quiver")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    stdout
}

#[test]
fn orders_pipeline_example_runs() {
    let stdout = run_example("orders-pipeline");
    assert!(stdout.contains("rejected by serializer 'order-schema'"), "{stdout}");
    assert!(stdout.contains("every customer's orders are in one partition"), "{stdout}");
    assert!(stdout.contains("the transform routed all 200 orders"), "{stdout}");
    assert!(stdout.contains("== pipeline OK"), "{stdout}");
}

#[test]
fn changelog_example_runs() {
    let stdout = run_example("changelog");
    assert!(stdout.contains("rebuilds the table of"), "{stdout}");
    assert!(stdout.contains("hold the same table"), "{stdout}");
    assert!(stdout.contains("tombstones dropped after delete.retention.ms"), "{stdout}");
    assert!(stdout.contains("customers equal their orders exactly"), "{stdout}");
    assert!(stdout.contains("== changelog OK"), "{stdout}");
}

#[test]
fn exactly_once_example_runs() {
    let stdout = run_example("exactly-once");
    assert!(stdout.contains("aborted at its timeout"), "{stdout}");
    assert!(stdout.contains("equal their committed payments exactly"), "{stdout}");
    assert!(stdout.contains("none repeated, none missing"), "{stdout}");
    assert!(stdout.contains("== exactly-once OK"), "{stdout}");
}
