//! The hot paths' instruction counts against `perf/baseline.json`: this test fails, naming the
//! path, when one grew past the baseline's margin. It runs the release build `e2e/prepare.sh`
//! makes (`target/release/tollgate-perf`), under valgrind, whatever else the machine is doing.

use std::process::Command;

#[test]
fn no_hot_path_costs_more_instructions_than_its_baseline_allows() {
    let binary =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/tollgate-perf");
    assert!(
        binary.exists(),
        "{} is missing: build it with `bash e2e/prepare.sh` (the README's test command), or \
         `cargo build --release -p tollgate-perf`",
        binary.display()
    );
    let output = Command::new(&binary).arg("check").output().unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    let verdict = String::from_utf8_lossy(&output.stderr);
    eprintln!("{table}");
    assert!(output.status.success(), "{table}{verdict}");
    // Every path was counted.
    for path in [
        "engine/allow",
        "engine/allow-cel",
        "canonical/digest",
        "audit/seal",
    ] {
        assert!(table.contains(path), "{table}");
    }
}
