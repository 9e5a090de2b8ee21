//! Same seed, same verdict: the shipped `flaky-network` scenario (link flaps during delivery and
//! download, a throttled FTP server that cuts data connections), scaled to 40 devices, run five
//! times at once with its one seed by the real binary. All runs must reach the same verdict and every
//! device the same outcome: the version it ends on, its last install state, its `installed`
//! events per version and the feedback status of each notice it was sent.

mod common;

use std::collections::BTreeMap;

use common::{report, run, scenarios, text};
use serde_json::Value;

/// Per device id, what it ended with regardless of timing (`deviceOutcomes`: final version and
/// install state, installs per version, and per notice whether it was taken, installed and
/// reported and its feedback status).
fn outcomes(r: &Value) -> BTreeMap<String, Value> {
    let o = r["deviceOutcomes"].as_object().expect("report.json has deviceOutcomes");
    o.iter().map(|(id, v)| (id.clone(), v.clone())).collect()
}

#[test]
fn flaky_network_five_times_with_one_seed_gives_identical_per_device_outcomes() {
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    // Each run is its own process with its own hub on free ports, so they run at once.
    let runs: Vec<_> = dirs
        .iter()
        .map(|d| {
            let out = d.path().to_path_buf();
            std::thread::spawn(move || {
                run(&scenarios().join("flaky-network.toml"), &out, &["--devices", "40"])
            })
        })
        .collect();
    let outputs: Vec<_> = runs.into_iter().map(|t| t.join().unwrap()).collect();
    let reports: Vec<Value> = dirs.iter().map(|d| report(d.path())).collect();
    let first = outcomes(&reports[0]);
    assert_eq!(first.len(), 40);
    assert_eq!(reports[0]["passed"], true, "{}", text(&outputs[0]));
    for (k, r) in reports.iter().enumerate().skip(1) {
        let other = outcomes(r);
        let differ: Vec<String> = first
            .iter()
            .filter(|(id, o)| other.get(*id) != Some(*o))
            .map(|(id, o)| format!("{id}: {o} vs {:?}", other.get(id)))
            .collect();
        assert!(
            differ.is_empty(),
            "{} devices differ between runs 1 and {} of one seed:\n{}",
            differ.len(),
            k + 1,
            differ.join("\n")
        );
        assert_eq!(
            (&reports[0]["passed"], &reports[0]["unmet"]),
            (&r["passed"], &r["unmet"]),
            "same seed, same verdict:\n{}\n---\n{}",
            text(&outputs[0]),
            text(&outputs[k])
        );
    }
}
