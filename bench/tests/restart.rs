//! The child hub mode (`hub.mode = "child"`) and `hub-restart` events, end to end through the
//! `testbench` binary: `scenarios/hub-crash.toml` as shipped (the hub killed twice during a
//! release, 30% offline, every fridge installs once), a graceful restart with messages queued for
//! offline devices, and a run without `--persist` that the same expectations fail.
//!
//! The runner starts the `iothub-emulator` binary beside `testbench` (built by
//! `cargo test --workspace`; alone: `cargo build -p iothub-emulator && cargo test -p testbench --test restart`).

mod common;

use common::{report, run, scenarios, text, write};

#[test]
fn hub_crash_as_shipped_loses_nothing_the_hub_acknowledged() {
    let out = tempfile::tempdir().unwrap();
    let o = run(&scenarios().join("hub-crash.toml"), out.path(), &[]);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    let r = report(out.path());
    assert_eq!(r["passed"], true, "{r}");
    let restarts = r["hubRestarts"].as_array().expect("hubRestarts");
    assert_eq!(restarts.len(), 2, "{r}");
    assert!(restarts.iter().all(|h| h["kind"] == "crash"), "{r}");
    assert_eq!(r["feedback"]["success"], 1000, "{r}");
    assert_eq!(r["duplicateInstalls"].as_array().map(Vec::len), Some(0), "{r}");
    assert!(all.contains("hub-restart (crash): the child hub is healthy again"), "{all}");
    let html = std::fs::read_to_string(out.path().join("report.html")).unwrap();
    assert!(html.contains("hub killed"), "the timeline marks the restarts");
}

/// Messages for devices that are off wait in their queues through a graceful restart.
const GRACEFUL: &str = r#"
name = "graceful"
time_limit = "90s"
[hub]
mode = "child"
feedback_interval = "500ms"
[fleet]
devices = 40
initial_version = "1.0.0"
[[package]]
version = "2.0.0"
size = "16KiB"
[[event]]
at = "1s"
action = "offline"
share = 0.5
duration = "6s"
[[event]]
at = "2s"
action = "release"
version = "2.0.0"
[[event]]
at = "4s"
action = "hub-restart"
kind = "graceful"
[expect]
final_version = "2.0.0"
no_duplicate_installs = true
no_lost_messages = true
failed = 0
[expect.feedback]
success = 40
"#;

#[test]
fn a_graceful_restart_keeps_the_queued_notices() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "graceful.toml", GRACEFUL);
    let out = dir.path().join("out");
    let o = run(&file, &out, &[]);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    let r = report(&out);
    assert_eq!(r["hubRestarts"][0]["kind"], "graceful", "{r}");
    assert_eq!(r["passed"], true, "{r}");
}

/// The expectations can fail: without `--persist` the restarted hub forgot the devices, their
/// queued notices and the feedback.
#[test]
fn without_persist_a_crash_fails_the_expectations() {
    let dir = tempfile::tempdir().unwrap();
    let toml = GRACEFUL
        .replace("mode = \"child\"", "mode = \"child\"\npersist = false")
        .replace("kind = \"graceful\"", "kind = \"crash\"")
        .replace("time_limit = \"90s\"", "time_limit = \"15s\"");
    let file = write(dir.path(), "lossy.toml", &toml);
    let out = dir.path().join("out");
    let o = run(&file, &out, &[]);
    let all = text(&o);
    assert!(!o.status.success(), "an in-memory hub lost nothing? {all}");
    let r = report(&out);
    let unmet = r["unmet"].to_string();
    assert!(unmet.contains("expect.no_lost_messages"), "{unmet}");
    assert!(unmet.contains("expect.feedback.success"), "{unmet}");
}
