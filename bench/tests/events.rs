//! `testbench run` with the timeline's fault events and the phased rollout, end to end through the
//! real binary: the shipped `flaky-network` and `phased-rollout` scenarios scaled down for CI, an
//! FTP fault that lifts by itself, and a rollout gate that is never met.

mod common;

use std::path::{Path, PathBuf};

use common::{report, run, scenarios, text, write};

#[test]
fn flaky_network_scaled_to_20_devices_passes_with_every_flap_counted() {
    let out = tempfile::tempdir().unwrap();
    let o = run(&scenarios().join("flaky-network.toml"), out.path(), &["--devices", "20"]);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    assert!(
        all.contains("link-flap: 5 of 20 devices drop their link 3 times, 4s apart, FTP included"),
        "{all}"
    );
    assert!(all.contains(r#"ftp-fault: {"bytesPerSecond":2097152,"dropAfterBytes":307200"#), "{all}");
    let r = report(out.path());
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(r["linkFlaps"], 15, "5 devices, 3 rounds: {r}");
    let m = &r["messages"];
    assert_eq!(m["sent"], 20, "{r}");
    assert_eq!(m["delivered"], 20, "{r}");
    assert_eq!(m["deliveryRatio"], 1.0, "{r}");
    assert_eq!(m["deadLettered"], 0, "{r}");
    assert_eq!(r["duplicateInstallCount"], 0, "{r}");
    assert_eq!(r["releases"][0]["reported"], 20, "{r}");
}

#[test]
fn phased_rollout_scaled_to_20_devices_gates_each_phase_in_order() {
    let out = tempfile::tempdir().unwrap();
    let o = run(&scenarios().join("phased-rollout.toml"), out.path(), &["--devices", "20"]);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    let r = report(out.path());
    let phases = r["rollout"]["phases"].as_array().expect("phases in report.json");
    let got: Vec<(&str, u64, &str)> = phases
        .iter()
        .map(|p| {
            (p["name"].as_str().unwrap(), p["targeted"].as_u64().unwrap(), p["outcome"].as_str().unwrap())
        })
        .collect();
    // canary 5% of 20 = 1 device, early 25% = 5, everyone else (no tags.group) = 14.
    assert_eq!(got, [("canary", 1, "passed"), ("early", 5, "passed"), ("everyone", 14, "passed")], "{r}");
    let mut last_end = 10_000; // rollout.at
    for p in phases {
        let (start, end) = (p["startedMs"].as_u64().unwrap(), p["endedMs"].as_u64().unwrap());
        assert!(start >= last_end && end >= start, "phases run one after the other: {r}");
        assert!(p["installed"].as_u64() >= p["needed"].as_u64(), "{r}");
        last_end = end;
    }
    assert_eq!(r["releases"].as_array().unwrap().len(), 3, "one release per phase: {r}");
}

/// A 4-device fleet, half of it in group `canary`, with package 2.0.0 (`corrupt` when asked).
fn rollout_scenario(dir: &Path, corrupt: bool, success_share: f64) -> PathBuf {
    write(
        dir,
        "gate.toml",
        &format!(
            r#"name = "gate"
time_limit = "60s"
[hub]
feedback_interval = "500ms"
[fleet]
devices = 4
[[fleet.group]]
name = "canary"
share = 0.5
[[package]]
version = "2.0.0"
size = "16KiB"
corrupt = {corrupt}
[rollout]
version = "2.0.0"
at = "500ms"
success_share = {success_share}
phase_timeout = "30s"
[[rollout.phase]]
name = "canary"
where = "tags.group = 'canary'"
[[rollout.phase]]
name = "rest"
where = "NOT IS_DEFINED(tags.group)"
[expect]
final_version = "2.0.0"
"#
        ),
    )
}

#[test]
fn an_unmet_gate_halts_the_rollout_and_names_the_phase() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = run(&rollout_scenario(dir.path(), true, 1.0), &out, &[]);
    let all = text(&o);
    assert!(!o.status.success(), "{all}");
    assert!(
        all.contains("unmet: rollout.phase[0] (canary): 0 of 2 devices installed 2.0.0"),
        "the phase is named: {all}"
    );
    assert!(all.contains("the rollout halted before rest"), "{all}");
    let r = report(&out);
    assert_eq!(r["rollout"]["halted"], true, "{r}");
    assert_eq!(r["rollout"]["phases"][0]["outcome"], "unreachable", "{r}");
    assert_eq!(r["rollout"]["phases"][1]["outcome"], "not-started", "{r}");
    assert_eq!(r["releases"].as_array().unwrap().len(), 1, "the rest never got the notice: {r}");
    assert!(
        r["unmet"].as_array().unwrap().iter().any(|u| u.as_str().unwrap().starts_with("rollout.phase[0]"))
    );
}

#[test]
fn a_gate_met_by_the_canary_releases_to_the_rest_through_the_twin_tags() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = run(&rollout_scenario(dir.path(), false, 1.0), &out, &[]);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    let r = report(&out);
    let devices = |i: usize| {
        let mut ids: Vec<String> = r["releases"][i]["devices"].as_object().unwrap().keys().cloned().collect();
        ids.sort();
        ids
    };
    // Groups take devices in index order: device-0 and device-1 are the canary.
    assert_eq!(devices(0), ["device-0", "device-1"], "{r}");
    assert_eq!(devices(1), ["device-2", "device-3"], "{r}");
}

#[test]
fn ftp_faults_refusing_every_login_then_every_session_lift_after_lasting_and_installs_complete() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "ftp.toml",
        r#"name = "ftp"
time_limit = "60s"
[hub]
feedback_interval = "500ms"
[fleet]
devices = 3
[[package]]
version = "2.0.0"
size = "16KiB"
[[event]]
at = "500ms"
action = "ftp-fault"
refuse_logins = 1.0
lasting = "1s"
[[event]]
at = "1500ms"
action = "ftp-fault"
refuse_sessions = 1.0
lasting = "1s"
[[event]]
at = "1s"
action = "release"
version = "2.0.0"
[expect]
final_version = "2.0.0"
no_duplicate_installs = true
failed = 0
"#,
    );
    let out = dir.path().join("out");
    let o = run(&file, &out, &[]);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    assert!(all.contains(r#""refuseLoginShare":1.0"#) && all.contains(r#""busyShare":1.0"#), "{all}");
    assert_eq!(all.matches("ftp-fault: cleared").count(), 1, "the second fault replaced the first: {all}");
    let r = report(&out);
    // Every login, then every session, was refused until 2.5 s: no device could install before.
    let min_install = r["releases"][0]["devices"]
        .as_object()
        .unwrap()
        .values()
        .map(|t| t["installedMs"].as_u64().unwrap() - t["sentMs"].as_u64().unwrap())
        .min()
        .unwrap();
    assert!(min_install >= 1000, "installed {min_install} ms after the notice, inside the fault: {r}");
}
