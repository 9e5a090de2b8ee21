//! Same seed, same verdict: the shipped `flaky-network` scenario (link flaps during delivery and
//! download, a throttled FTP server that cuts data connections), scaled to 40 devices, run twice
//! at once with its one seed by the real binary. Both runs must reach the same verdict and every
//! device the same outcome: the version it ends on, its last install state, its `installed`
//! events per version and the feedback status of each notice it was sent.

mod common;

use std::collections::BTreeMap;

use common::{report, run, scenarios, text};
use serde_json::Value;

/// Per device id: (final version, final state, installs per version, feedback per release).
fn outcomes(r: &Value) -> BTreeMap<String, (Value, Value, Value, Vec<Value>)> {
    let mut out = BTreeMap::new();
    for (id, o) in r["outcomes"].as_object().expect("report.json has outcomes") {
        let feedback = r["releases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|rel| rel["devices"][id.as_str()]["feedback"].clone())
            .collect();
        out.insert(
            id.clone(),
            (o["finalVersion"].clone(), o["finalState"].clone(), o["installs"].clone(), feedback),
        );
    }
    out
}

#[test]
fn flaky_network_twice_with_one_seed_gives_identical_per_device_outcomes() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    // Each run is its own process with its own hub on free ports, so both run at once.
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
    let (a, b) = (outcomes(&reports[0]), outcomes(&reports[1]));
    assert_eq!(a.len(), 40);
    let differ: Vec<String> = a
        .iter()
        .filter(|(id, o)| b.get(*id) != Some(*o))
        .map(|(id, o)| format!("{id}: {o:?} vs {:?}", b.get(id)))
        .collect();
    assert!(
        differ.is_empty(),
        "{} devices differ between two runs of one seed:\n{}",
        differ.len(),
        differ.join("\n")
    );
    assert_eq!(
        (&reports[0]["passed"], &reports[0]["unmet"]),
        (&reports[1]["passed"], &reports[1]["unmet"]),
        "same seed, same verdict:\n{}\n---\n{}",
        text(&outputs[0]),
        text(&outputs[1])
    );
    assert_eq!(reports[0]["passed"], true, "{}", text(&outputs[0]));
}
