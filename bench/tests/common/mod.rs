//! Helpers the `testbench` binary's end-to-end tests share: where the shipped scenarios are,
//! running `testbench run` in an environment free of the external-hub variables, and reading
//! what it wrote.

// Each test file uses a different subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The repository's `scenarios/` folder.
pub fn scenarios() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

/// Runs `testbench run <file> --out <out> <args>`. The variables that switch a run to an
/// external hub or fleet are removed, so a developer's shell cannot change what a test runs.
pub fn run(file: &Path, out: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_testbench"));
    for var in [
        "IOTHUB_EMULATOR_CONNECTION_STRING",
        "IOTHUB_EMULATOR_CA_FILE",
        "IOTHUB_EMULATOR_HTTP_URL",
        "IOTHUB_EMULATOR_PACKAGES_DIR",
        "IOTHUB_EMULATOR_FLEET_EXTERNAL",
        "IOTHUB_EMULATOR_DEVICES",
        "IOTHUB_EMULATOR_OUT",
    ] {
        cmd.env_remove(var);
    }
    cmd.arg("run").arg(file).arg("--out").arg(out).args(args).output().expect("testbench runs")
}

/// Standard output then standard error.
pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The `report.json` a run wrote into `out`.
pub fn report(out: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json written"))
        .expect("report.json is JSON")
}

/// Writes `toml` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, toml: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, toml).unwrap();
    p
}
