//! The alternatives' shared measurement code (benches/alternatives/chain_bench.py) has its
//! own unit tests in Python; they run here so that CI runs them.

use std::path::Path;
use std::process::Command;

#[test]
fn the_alternatives_measurement_code_passes_its_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../alternatives");
    let out = Command::new("python3")
        .args(["-B", "-m", "unittest", "-q", "test_chain_bench"])
        .current_dir(&dir)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python3 -m unittest test_chain_bench failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
