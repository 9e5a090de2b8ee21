//! The shipped scenarios that finish in seconds run in CI exactly as shipped (no `--devices`):
//! `quickstart` (100 devices, all online) and `queue-overflow` (the 51st message to each offline
//! device refused, the 50 queued ones delivered when it comes back). The slow ones
//! (`offline-fridges`, `ttl-expiry`) are the README's main command and a manual run; `flaky-network`
//! and `phased-rollout` run scaled down in `events.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios").join(name)
}

fn run(file: &Path, out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_testbench"))
        .arg("run")
        .arg(file)
        .arg("--out")
        .arg(out)
        .env_remove("IOTHUB_EMULATOR_CONNECTION_STRING")
        .env_remove("IOTHUB_EMULATOR_CA_FILE")
        .env_remove("IOTHUB_EMULATOR_HTTP_URL")
        .env_remove("IOTHUB_EMULATOR_PACKAGES_DIR")
        .env_remove("IOTHUB_EMULATOR_FLEET_EXTERNAL")
        .env_remove("IOTHUB_EMULATOR_DEVICES")
        .output()
        .expect("testbench runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn report(out: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json written"))
        .expect("report.json is JSON")
}

#[test]
fn quickstart_as_shipped_passes_and_writes_both_reports() {
    let out = tempfile::tempdir().unwrap();
    let o = run(&scenario("quickstart.toml"), out.path());
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    assert!(all.contains("report.html"), "the run says where report.html is: {all}");
    let r = report(out.path());
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(r["devices"], 100, "{r}");
    assert_eq!(r["feedback"]["success"], 100, "{r}");
    assert_eq!(r["duplicateInstalls"].as_array().map(Vec::len), Some(0), "{r}");
    let html = std::fs::read_to_string(out.path().join("report.html")).expect("report.html written");
    assert_eq!(html.matches("<svg").count(), 3, "three plots");
}

#[test]
fn queue_overflow_as_shipped_refuses_the_51st_message_and_delivers_the_rest() {
    let out = tempfile::tempdir().unwrap();
    let o = run(&scenario("queue-overflow.toml"), out.path());
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    let r = report(out.path());
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(r["queueFullRejections"], 10, "one refusal per device: {r}");
    assert_eq!(r["messages"]["sent"], 500, "50 queued per device: {r}");
    assert_eq!(r["messages"]["delivered"], 500, "nothing queued is lost: {r}");
}
