//! The runnable examples under `examples/` work with this build's binary.
//! Each script checks its own claims and exits non-zero when one fails.

use std::path::Path;
use std::process::Command;

#[test]
fn orders_pipeline_example_runs() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/orders-pipeline/run.sh");
    let out = Command::new("bash").arg(&script).env("QUIVER", env!("CARGO_BIN_EXE_quiver")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    assert!(stdout.contains("rejected by serializer 'order-schema'"), "{stdout}");
    assert!(stdout.contains("every customer's orders are in one partition"), "{stdout}");
    assert!(stdout.contains("the transform routed all 200 orders"), "{stdout}");
    assert!(stdout.contains("== pipeline OK"), "{stdout}");
}
