//! Scenario time: the shipped scenarios that span minutes or days (`offline-fridges`, `ttl-expiry`,
//! `long-weekend`) run compressed as shipped, and a compressed run reaches exactly the per-device
//! outcomes of a real-time run of the same scenario and seed.

mod common;

use common::{report, run, scenarios, text};
use serde_json::Value;

/// Runs a shipped scenario as shipped and returns its report, failing with the run's output.
fn passes_as_shipped(name: &str) -> Value {
    let out = tempfile::tempdir().unwrap();
    let o = run(&scenarios().join(format!("{name}.toml")), out.path(), &[]);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    let r = report(out.path());
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(r["time"]["mode"], "compressed", "{name} ships compressed: {r}");
    assert!(r["time"]["skippedMs"].as_u64().unwrap() > 0, "waiting was skipped: {}", r["time"]);
    r
}

#[test]
fn offline_fridges_as_shipped_runs_compressed_and_every_fridge_installs_once() {
    let r = passes_as_shipped("offline-fridges");
    assert_eq!(r["devices"], 1000);
    assert_eq!(r["feedback"]["success"], 1000, "{}", r["feedback"]);
    let time = &r["time"];
    let scenario_ms = time["scenarioMs"].as_u64().unwrap();
    // The last fridge comes back after up to 300 s offline from 15 s: that much scenario time passed.
    assert!(scenario_ms >= 300_000, "{time}");
    assert!(time["wallMs"].as_u64().unwrap() < scenario_ms, "{time}");
}

#[test]
fn ttl_expiry_as_shipped_runs_compressed_with_its_expired_notices() {
    let r = passes_as_shipped("ttl-expiry");
    assert_eq!(r["feedback"]["expired"], 40, "{}", r["feedback"]);
}

#[test]
fn long_weekend_expires_fridays_notice_for_the_long_offline_and_mondays_reaches_all() {
    let r = passes_as_shipped("long-weekend");
    let outcomes = r["deviceOutcomes"].as_object().unwrap();
    assert_eq!(outcomes.len(), 1000);
    let expired = r["feedback"]["expired"].as_u64().unwrap();
    assert!(expired > 0, "some fridges were off longer than the 2-day TTL: {}", r["feedback"]);
    let mut friday_expired = 0;
    for (id, o) in outcomes {
        assert_eq!(o["finalVersion"], "2.1.0", "{id}: {o}");
        let releases = o["releases"].as_array().unwrap();
        let (friday, monday) = (&releases[0], &releases[1]);
        assert_eq!(monday["feedback"], "Success", "{id}: {o}");
        if friday["feedback"] == "Expired" {
            friday_expired += 1;
            assert_eq!(friday["installed"], false, "an expired notice installs nothing: {id}: {o}");
        } else {
            assert_eq!(friday["feedback"], "Success", "{id}: {o}");
        }
    }
    assert_eq!(friday_expired, expired, "every Expired record is a Friday notice");
    // Days passed in scenario time: the last fridge is back after up to 3 days.
    assert!(r["time"]["scenarioMs"].as_u64().unwrap() > 2 * 86_400_000, "{}", r["time"]);
}

/// The seed story at 100 devices, in real time and compressed, side by side: the same seed gives
/// the same per-device outcomes. The shipped scenario with its offline windows shortened from
/// 30-300 s to 10-60 s, so the real-time run takes about 80 s instead of 5 minutes.
#[test]
fn real_and_compressed_time_agree_on_every_device_of_offline_fridges() {
    let shipped = std::fs::read_to_string(scenarios().join("offline-fridges.toml")).unwrap();
    let shorter = shipped
        .replace(r#"min = "30s", max = "300s""#, r#"min = "10s", max = "60s""#)
        .replace(r#""6m""#, r#""2m""#);
    assert_ne!(shorter, shipped, "offline-fridges.toml no longer has the offline window this test shortens");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("offline-fridges-short.toml");
    std::fs::write(&file, shorter).unwrap();
    let runs: Vec<(Value, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = ["real", "compressed"]
            .into_iter()
            .map(|mode| {
                let file = &file;
                s.spawn(move || {
                    let out = tempfile::tempdir().unwrap();
                    let o = run(file, out.path(), &["--devices", "100", "--time", mode]);
                    (report(out.path()), text(&o))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ((real, real_out), (compressed, compressed_out)) = (&runs[0], &runs[1]);
    assert_eq!(real["passed"], true, "{real_out}");
    assert_eq!(compressed["passed"], true, "{compressed_out}");
    assert_eq!(
        (real["time"]["mode"].as_str(), compressed["time"]["mode"].as_str()),
        (Some("real"), Some("compressed"))
    );
    assert_eq!(real["time"]["skippedMs"], 0, "real time skips nothing");
    let (a, b) =
        (real["deviceOutcomes"].as_object().unwrap(), compressed["deviceOutcomes"].as_object().unwrap());
    assert_eq!(a.len(), 100);
    for (id, outcome) in a {
        assert_eq!(Some(outcome), b.get(id), "{id}: real-time and compressed outcomes differ");
    }
    assert_eq!(a.len(), b.len());
}
