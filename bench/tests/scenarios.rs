//! Every file shipped in `scenarios/` parses and validates.

use std::path::Path;

#[test]
fn every_shipped_scenario_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let plan = testbench::scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
            names.push(plan.name);
        }
    }
    names.sort();
    assert_eq!(
        names,
        [
            "config-rollout",
            "fault-storm",
            "flaky-network",
            "hub-crash",
            "long-weekend",
            "million",
            "offline-fridges",
            "phased-rollout",
            "queue-overflow",
            "quickstart",
            "tier-s1",
            "ttl-expiry"
        ]
    );
}
