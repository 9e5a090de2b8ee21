//! `scenarios/million.toml` scaled down to 20,000 devices (the whole million runs by hand: see
//! bench/README.md). In-process devices, a pipeline release (query paging + AMQP), 10% offline:
//! every device installs once, reports the version through its twin and gets Success feedback,
//! and the report says which transport carried it.

mod common;

use common::{report, run, scenarios, text};

#[test]
fn million_scaled_down_runs_in_process_with_a_pipeline_release() {
    let out = tempfile::tempdir().unwrap();
    let o = run(&scenarios().join("million.toml"), out.path(), &["--devices", "20000"]);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    assert!(all.contains("release pipeline: 20000 device ids paged through the query API"), "{all}");
    let r = report(out.path());
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(r["transport"], "in-process", "{r}");
    assert_eq!(r["devices"], 20000);
    assert_eq!(r["feedback"]["success"], 20000, "{r}");
    assert_eq!(r["duplicateInstalls"].as_array().map(Vec::len), Some(0), "{r}");
    let release = &r["releases"][0];
    assert_eq!(release["reported"], 20000, "every twin reports the version: {release}");
}
