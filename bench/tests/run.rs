//! `testbench run` end to end: the real binary starts a hub, FTP server and fleet in its process,
//! plays a scenario and exits 0 or names each unmet expectation.

mod common;

use std::path::{Path, PathBuf};

use common::{report, run, scenarios, text, write};

#[test]
fn quickstart_scaled_to_10_devices_passes_and_writes_report_json() {
    let out = tempfile::tempdir().unwrap();
    let o = run(&scenarios().join("quickstart.toml"), out.path(), &["--devices", "10"]);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    assert!(all.contains("verdict: every expectation met"), "{all}");
    let r = report(out.path());
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(r["devices"], 10);
    assert_eq!(r["feedback"]["success"], 10, "{r}");
    assert_eq!(r["releases"][0]["reported"], 10, "{r}");
    assert_eq!(r["latency"]["endToEnd"]["count"], 10, "{r}");
    let (p50, max) = (
        r["latency"]["endToEnd"]["p50Ms"].as_u64().unwrap(),
        r["latency"]["endToEnd"]["maxMs"].as_u64().unwrap(),
    );
    assert!(p50 >= 1 && p50 <= max, "{r}");
    assert!(!out.path().join("work").exists(), "the work directory is removed");
    // The time series, memory and the latency breakdown by offline time.
    let ts = &r["timeSeries"];
    let samples = ts["tMs"].as_array().unwrap().len();
    assert!(samples >= 2, "{ts}");
    assert_eq!(ts["connected"].as_array().unwrap().len(), samples);
    assert_eq!(ts["onVersion"]["2.0.0"].as_array().unwrap().last().unwrap(), 10, "{ts}");
    assert_eq!(ts["onVersion"]["1.0.0"][0], 10, "{ts}");
    assert!(r["memory"]["rssPeakKib"].as_u64().unwrap() >= r["memory"]["rssEndKib"].as_u64().unwrap(), "{r}");
    assert_eq!(r["latencyByOffline"][0]["offline"], "online");
    assert_eq!(r["latencyByOffline"][0]["count"], 10, "nobody went offline: {r}");
    assert_eq!(r["offlineWindows"], serde_json::json!([]));
    let html = std::fs::read_to_string(out.path().join("report.html")).expect("report.html written");
    assert_eq!(html.matches("<svg").count(), 3);
    assert!(html.contains("Verdict: every expectation met"));
    assert!(all.contains(&format!("report: {}", out.path().join("report.html").display())), "{all}");
}

/// A small fast scenario `name` with `devices` devices and one 16 KiB package 2.0.0 (corrupt when
/// asked) released to `target` at 1 s, feedback every 500 ms; `rest` adds events and expectations.
fn small(dir: &Path, name: &str, devices: u32, corrupt: bool, target: &str, rest: &str) -> PathBuf {
    let head = format!(
        "name = \"{name}\"\nseed = 5\ntime_limit = \"60s\"\n[hub]\nfeedback_interval = \"500ms\"\n\
         [fleet]\ndevices = {devices}\n[[package]]\nversion = \"2.0.0\"\nsize = \"16KiB\"\ncorrupt = {corrupt}\n\
         [[event]]\nat = \"1s\"\naction = \"release\"\nversion = \"2.0.0\"\ntarget = \"{target}\"\n"
    );
    write(dir, &format!("{name}.toml"), &format!("{head}{rest}"))
}

#[test]
fn a_corrupt_package_fails_every_install_and_the_run_names_each_unmet_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let file = small(
        dir.path(),
        "corrupt",
        3,
        true,
        "all",
        r#"
[expect]
final_version = "2.0.0"
failed = 0
[expect.feedback]
success = 3
"#,
    );
    let out = dir.path().join("out");
    let junit = dir.path().join("junit.xml");
    let o = run(&file, &out, &["--junit", junit.to_str().unwrap()]);
    let all = text(&o);
    assert!(!o.status.success(), "{all}");
    assert!(all.contains("unmet: expect.final_version: 3 of 3 devices are not on 2.0.0"), "{all}");
    assert!(all.contains("unmet: expect.failed: expected 0, got 3"), "{all}");
    assert!(!all.contains("expect.feedback.success"), "the notices were delivered: {all}");
    let r = report(&out);
    assert_eq!(r["passed"], false);
    assert_eq!(r["unmet"].as_array().unwrap().len(), 2, "{r}");
    // The JUnit file: one case per expectation checked, the unmet ones failing with the message.
    let xml = std::fs::read_to_string(&junit).expect("the JUnit file is written");
    assert!(all.contains(&format!("junit: {}", junit.display())), "{all}");
    assert!(xml.contains("<testsuite name=\"corrupt\" tests=\"4\" failures=\"2\" errors=\"0\""), "{xml}");
    for met in ["time_limit", "expect.feedback.success"] {
        assert!(xml.contains(&format!("name=\"{met}\" time=\"0\"/>")), "{met} passed: {xml}");
    }
    assert!(
        xml.contains("<failure type=\"UnmetExpectation\" message=\"expect.final_version: 3 of 3 devices are not on 2.0.0 (first: device-0"),
        "{xml}"
    );
    assert!(xml.contains("message=\"expect.failed: expected 0, got 3\""), "{xml}");
}

#[test]
fn a_run_that_cannot_start_writes_one_junit_error_case() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "broken.toml", "name = \"broken\"\n[fleet]\ndevices = 0\n");
    let junit = dir.path().join("junit.xml");
    let o = run(&file, &dir.path().join("out"), &["--junit", junit.to_str().unwrap()]);
    let all = text(&o);
    assert!(!o.status.success(), "{all}");
    let xml = std::fs::read_to_string(&junit).expect("the JUnit file is written for a failed start");
    assert!(xml.contains("tests=\"1\" failures=\"0\" errors=\"1\""), "{xml}");
    assert!(xml.contains("<testcase classname=\"testbench.broken\" name=\"run\""), "{xml}");
    assert!(xml.contains("<error type=\"RunError\" message=\""), "{xml}");
}

#[test]
fn devices_switched_off_during_a_release_install_once_after_power_on() {
    let dir = tempfile::tempdir().unwrap();
    let file = small(
        dir.path(),
        "offline",
        6,
        false,
        "all",
        r#"
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
    );
    let out = dir.path().join("out");
    let o = run(&file, &out, &[]);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    assert!(all.contains("offline: 3 of 6 devices switched off"), "{all}");
    let r = report(&out);
    let e2e = &r["latency"]["endToEnd"];
    assert_eq!(e2e["count"], 6, "{r}");
    // The switched-off half came back 0.5-1.5 s after the release: they set the maximum.
    assert!(e2e["maxMs"].as_u64().unwrap() >= 500, "{r}");
    let w = &r["offlineWindows"][0];
    assert_eq!(w["devices"], 3, "{r}");
    assert_eq!(w["startMs"], 500, "{r}");
    let end = w["endMs"].as_u64().unwrap();
    assert!((1500..=2500).contains(&end), "{r}");
    // Switched off before the release at 1 s, back 0.5-1.5 s after it: the three land in `<1m`.
    let by_off = &r["latencyByOffline"];
    assert_eq!((by_off[0]["count"].as_u64(), by_off[1]["count"].as_u64()), (Some(3), Some(3)), "{r}");
    assert_eq!(by_off[1]["offline"], "<1m");
    assert!(by_off[1]["p50Ms"].as_u64().unwrap() >= 500, "{r}");
    let html = std::fs::read_to_string(out.join("report.html")).expect("report.html written");
    assert!(html.contains("offline windows (3 devices switched off)"), "the window is shaded");
}

#[test]
fn a_where_target_releases_to_the_matching_devices_only() {
    let dir = tempfile::tempdir().unwrap();
    let rest = "[expect]\nfinal_version = \"2.0.0\"\n[expect.feedback]\nsuccess = 1\n";
    let file = small(dir.path(), "where", 2, false, "deviceId = 'device-1'", rest);
    let out = dir.path().join("out");
    let o = run(&file, &out, &[]);
    let all = text(&o);
    assert!(!o.status.success(), "{all}");
    assert!(
        all.contains("unmet: expect.final_version: 1 of 2 devices are not on 2.0.0 (first: device-0)"),
        "{all}"
    );
    let r = report(&out);
    assert_eq!(r["releases"][0]["targeted"], 1, "{r}");
    assert_eq!(r["unmet"].as_array().unwrap().len(), 1, "{r}");
}
