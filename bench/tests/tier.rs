//! `scenarios/tier-s1.toml` as shipped: a pipeline release to 30 devices on an S1 × 1 hub. The
//! hub throttles the C2D sends (1.67/s), the runner retries them as a service SDK would, every
//! device still installs, and the report carries the tier's projection of the release.

mod common;

use common::{report, run, scenarios, text};

#[test]
fn an_s1_release_is_throttled_retried_and_projected() {
    let out = tempfile::tempdir().unwrap();
    let o = run(&scenarios().join("tier-s1.toml"), out.path(), &[]);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    let r = report(out.path());
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(r["feedback"]["success"], 30, "{r}");
    assert_eq!(r["releases"][0]["sendFailed"], 0, "throttled sends are retried, not refused: {r}");
    assert!(r["messages"]["throttledRetries"].as_u64().unwrap() > 0, "the hub throttled: {r}");
    assert!(all.contains("projected 18.0 s on S1 × 1 unit"), "30 / 1.67 per s: {all}");
}
