//! The shipped scenarios that finish in seconds run in CI exactly as shipped (no `--devices`):
//! `quickstart` (100 devices, all online), `config-rollout` (the phased rollout through
//! configurations) and `queue-overflow` (the 51st message to each offline
//! device refused, the 50 queued ones delivered when it comes back). The ones that span minutes or
//! days of scenario time (`offline-fridges`, `ttl-expiry`, `long-weekend`) run as shipped in
//! `time.rs`; `flaky-network` and `phased-rollout` run scaled down in `events.rs`; `hub-crash` (a
//! child hub killed twice, real time) runs as shipped in `restart.rs`.

mod common;

use common::{report, run, scenarios, text};

#[test]
fn quickstart_as_shipped_passes_and_writes_both_reports() {
    let out = tempfile::tempdir().unwrap();
    let o = run(&scenarios().join("quickstart.toml"), out.path(), &[]);
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
    let o = run(&scenarios().join("queue-overflow.toml"), out.path(), &[]);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    let r = report(out.path());
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(r["queueFullRejections"], 10, "one refusal per device: {r}");
    assert_eq!(r["messages"]["sent"], 500, "50 queued per device: {r}");
    assert_eq!(r["messages"]["delivered"], 500, "nothing queued is lost: {r}");
}

#[test]
fn config_rollout_as_shipped_releases_each_phase_through_a_configuration() {
    let out = tempfile::tempdir().unwrap();
    let o = run(&scenarios().join("config-rollout.toml"), out.path(), &[]);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    let r = report(out.path());
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(r["rollout"]["via"], "configuration", "{r}");
    let got: Vec<(&str, u64, &str)> = r["rollout"]["phases"]
        .as_array()
        .expect("phases in report.json")
        .iter()
        .map(|p| {
            (p["name"].as_str().unwrap(), p["targeted"].as_u64().unwrap(), p["outcome"].as_str().unwrap())
        })
        .collect();
    // canary 5% of 200 = 10 devices, early 25% = 50, everyone else = 140.
    assert_eq!(got, [("canary", 10, "passed"), ("early", 50, "passed"), ("everyone", 140, "passed")], "{r}");
    for phase in 0..3 {
        assert!(all.contains(&format!("configuration rollout-2.0.0-{phase} applied to")), "{all}");
    }
    // No C2D: nothing was sent or acknowledged, every install came from a desired patch.
    assert_eq!(r["messages"]["sent"], 0, "{r}");
    assert_eq!(r["feedback"]["success"], 0, "{r}");
    assert_eq!(r["duplicateInstallCount"], 0, "{r}");
}
