//! Configurations against a hub: content reaching matching twins, devices entering and leaving
//! scope, priority changes, deletion, metrics, and the background sweeper.

use serde_json::{Value, json};

use crate::hub::{DeviceInput, Hub, HubConfig, IfMatch};

fn hub_with(devices: &[(&str, Value)]) -> Hub {
    let hub = Hub::new(HubConfig::default());
    for (id, tags) in devices {
        hub.put_device(id, DeviceInput::default(), None).unwrap();
        hub.update_twin(id, &json!({ "tags": tags }), None, false).unwrap();
    }
    hub
}

fn desired(hub: &Hub, id: &str) -> Value {
    let mut d = hub.get_twin(id).unwrap()["properties"]["desired"].clone();
    let m = d.as_object_mut().unwrap();
    m.remove("$metadata");
    m.remove("$version");
    d
}

fn fw_config(version: &str, condition: &str, priority: i64) -> Value {
    json!({
        "content": { "deviceContent": { "properties.desired.firmware": { "version": version } } },
        "targetCondition": condition,
        "priority": priority,
        "metrics": { "queries": { "current": format!("SELECT deviceId FROM devices WHERE properties.reported.firmware = '{version}'") } },
    })
}

#[test]
fn content_reaches_matching_twins_and_metrics_count_them() {
    let hub = hub_with(&[
        ("a", json!({"env": "test"})),
        ("b", json!({"env": "test"})),
        ("c", json!({"env": "prod"})),
    ]);
    let v0 = hub.get_twin("a").unwrap()["properties"]["desired"]["$version"].as_u64().unwrap();
    let created = hub.put_configuration("fw", &fw_config("2.0", "tags.env = 'test'", 10), None).unwrap();
    assert_eq!(
        created["systemMetrics"]["results"],
        json!({ "targetedCount": 0, "appliedCount": 0 }),
        "nothing applied before the sweep"
    );
    hub.settle_configurations();
    assert_eq!(desired(&hub, "a"), json!({ "firmware": { "version": "2.0" } }));
    assert_eq!(desired(&hub, "b"), json!({ "firmware": { "version": "2.0" } }));
    assert_eq!(desired(&hub, "c"), json!({}), "a device outside the condition is untouched");
    let twin = hub.get_twin("a").unwrap();
    assert_eq!(twin["properties"]["desired"]["$version"].as_u64().unwrap(), v0 + 1);
    assert_eq!(twin["configurations"], json!({ "fw": { "status": "applied" } }));
    assert!(hub.get_twin("c").unwrap().get("configurations").is_none());
    hub.patch_reported("a", &json!({ "firmware": "2.0" })).unwrap();
    let got = hub.get_configuration("fw").unwrap();
    assert_eq!(got["systemMetrics"]["results"], json!({ "targetedCount": 2, "appliedCount": 2 }));
    assert_eq!(got["metrics"]["results"], json!({ "current": 1 }));
    let applied = hub
        .query("SELECT deviceId FROM devices WHERE configurations.[[fw]].status = 'Applied'", None, None)
        .unwrap();
    assert_eq!(applied.items.len(), 2);
}

#[test]
fn devices_entering_and_leaving_scope_follow() {
    let hub = hub_with(&[("a", json!({"env": "test"}))]);
    hub.put_configuration("fw", &fw_config("2.0", "tags.env = 'test'", 1), None).unwrap();
    hub.settle_configurations();
    // Registered later, tagged later: applied on the next sweep step.
    hub.put_device("late", DeviceInput::default(), None).unwrap();
    hub.settle_configurations();
    assert_eq!(desired(&hub, "late"), json!({}));
    hub.update_twin("late", &json!({ "tags": { "env": "test" } }), None, false).unwrap();
    assert!(!hub.configurations_settled(), "the tag change owes a re-evaluation");
    hub.settle_configurations();
    assert_eq!(desired(&hub, "late"), json!({ "firmware": { "version": "2.0" } }));
    // Leaving scope takes the configuration's settings back, the user's own stay.
    hub.update_twin("a", &json!({ "properties": { "desired": { "mine": 1 } } }), None, false).unwrap();
    hub.update_twin("a", &json!({ "tags": { "env": "prod" } }), None, false).unwrap();
    hub.settle_configurations();
    assert_eq!(desired(&hub, "a"), json!({ "mine": 1 }));
    assert!(hub.get_twin("a").unwrap().get("configurations").is_none());
    assert_eq!(hub.get_configuration("fw").unwrap()["systemMetrics"]["results"]["targetedCount"], 1);
}

#[test]
fn priority_decides_and_deletion_falls_back_to_the_next() {
    let hub = hub_with(&[("a", json!({"env": "test", "ring": 1}))]);
    hub.put_configuration("base", &fw_config("1.0", "tags.env = 'test'", 1), None).unwrap();
    hub.put_configuration("ring1", &fw_config("2.0", "tags.ring = 1", 5), None).unwrap();
    hub.settle_configurations();
    assert_eq!(desired(&hub, "a"), json!({ "firmware": { "version": "2.0" } }));
    assert_eq!(
        hub.get_twin("a").unwrap()["configurations"],
        json!({ "base": { "status": "targeted" }, "ring1": { "status": "applied" } })
    );
    let base = hub.get_configuration("base").unwrap();
    assert_eq!(base["systemMetrics"]["results"], json!({ "targetedCount": 1, "appliedCount": 0 }));
    // Raising base's priority (an allowed update) makes it win.
    let mut raised = fw_config("1.0", "tags.env = 'test'", 9);
    raised["id"] = json!("base");
    let etag = base["etag"].as_str().unwrap().to_string();
    hub.put_configuration("base", &raised, Some(IfMatch::Etag(etag))).unwrap();
    hub.settle_configurations();
    assert_eq!(desired(&hub, "a"), json!({ "firmware": { "version": "1.0" } }));
    hub.delete_configuration("base", None).unwrap();
    hub.settle_configurations();
    assert_eq!(desired(&hub, "a"), json!({ "firmware": { "version": "2.0" } }));
    hub.delete_configuration("ring1", Some(IfMatch::Any)).unwrap();
    hub.settle_configurations();
    assert_eq!(desired(&hub, "a"), json!({}));
    assert!(hub.list_configurations(None).is_empty());
}

#[test]
fn list_is_by_id_and_honours_top() {
    let hub = hub_with(&[]);
    for id in ["b", "a", "c"] {
        hub.put_configuration(id, &fw_config("1", "*", 0), None).unwrap();
    }
    let ids: Vec<String> =
        hub.list_configurations(Some(2)).iter().map(|c| c["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["a", "b"]);
}

#[tokio::test]
async fn the_sweeper_applies_without_being_asked() {
    let hub = hub_with(&[("a", json!({"env": "test"}))]);
    hub.put_configuration("fw", &fw_config("3.0", "*", 0), None).unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while desired(&hub, "a") != json!({ "firmware": { "version": "3.0" } }) {
        assert!(tokio::time::Instant::now() < deadline, "the sweeper did not apply the configuration");
        tokio::task::yield_now().await;
    }
    hub.shutdown_configurations();
}

/// Rough cost of a full sweep and of reading a configuration's metrics (run by hand:
/// `cargo test -p iothub-emulator --release --lib configs::hub_tests::sweep_cost -- --ignored --nocapture`).
#[test]
#[ignore = "a measurement, not a check"]
fn sweep_cost() {
    let n = 100_000;
    let hub = Hub::new(HubConfig::default());
    for i in 0..n {
        let id = format!("d{i}");
        hub.put_device(&id, DeviceInput::default(), None).unwrap();
        if i % 10 == 0 {
            hub.update_twin(&id, &json!({ "tags": { "env": "test" } }), None, false).unwrap();
        }
    }
    let t = std::time::Instant::now();
    hub.put_configuration("fw", &fw_config("2.0", "tags.env = 'test'", 1), None).unwrap();
    hub.settle_configurations();
    println!("full sweep over {n} devices (1 in 10 targeted): {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let c = hub.get_configuration("fw").unwrap();
    println!("GET with 1 custom metric: {:?} -> {}", t.elapsed(), c["systemMetrics"]["results"]);
    let t = std::time::Instant::now();
    for i in 0..1000 {
        hub.patch_reported(&format!("d{i}"), &json!({ "x": i })).unwrap();
    }
    hub.settle_configurations();
    println!("1000 reported patches + their re-evaluation: {:?}", t.elapsed());
}
