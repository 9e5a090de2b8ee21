//! `fleet.shards > 1`: the runner spreads the fleet over child processes of its own binary
//! (`testbench fleet-shard`), switches their devices off and on through them, and still meets
//! every expectation.

use std::process::Command;

#[test]
fn a_fleet_over_two_shard_processes_installs_once_even_with_devices_switched_off() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sharded.toml");
    std::fs::write(
        &file,
        r#"
name = "sharded"
seed = 5
time_limit = "60s"
[hub]
feedback_interval = "500ms"
[fleet]
devices = 6
shards = 2
[[package]]
version = "2.0.0"
size = "16KiB"
[[event]]
at = "1s"
action = "release"
version = "2.0.0"
[[event]]
at = "500ms"
action = "offline"
share = 0.5
duration = { distribution = "uniform", min = "1s", max = "2s" }
[expect]
final_version = "2.0.0"
no_duplicate_installs = true
failed = 0
[expect.feedback]
success = 6
"#,
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_testbench"))
        .arg("run")
        .arg(&file)
        .arg("--out")
        .arg(&out)
        .env_remove("IOTHUB_EMULATOR_CONNECTION_STRING")
        .env_remove("IOTHUB_EMULATOR_FLEET_EXTERNAL")
        .output()
        .expect("testbench runs");
    let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{all}");
    assert!(all.contains("fleet: 6 devices in 2 shard processes"), "{all}");
    assert!(all.contains("offline: 3 of 6 devices switched off"), "{all}");
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let e2e = &r["latency"]["endToEnd"];
    assert_eq!(e2e["count"], 6, "{r}");
    // The switched-off half (in both shards) came back 0.5-1.5 s after the release.
    assert!(e2e["maxMs"].as_u64().unwrap() >= 500, "{r}");
}
