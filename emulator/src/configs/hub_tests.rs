//! Configurations against a hub: content reaching matching twins, devices entering and leaving
//! scope, priority changes, deletion, metrics, and the background sweeper.

use serde_json::{Value, json};

use crate::hub::{DeviceInput, Hub, HubConfig, IfMatch, ModuleInput};

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

fn module_desired(hub: &Hub, device: &str, module: &str) -> Value {
    let mut d = hub.get_module_twin(device, module).unwrap()["properties"]["desired"].clone();
    let m = d.as_object_mut().unwrap();
    m.remove("$metadata");
    m.remove("$version");
    d
}

/// Devices `a`, `b`, `c` with modules: `a/sensor` and `b/sensor` tagged `env = test`, `c/sensor`
/// tagged `prod`, `a/other` untagged.
fn hub_with_modules() -> Hub {
    let hub = hub_with(&[("a", json!({"env": "test"})), ("b", json!({})), ("c", json!({}))]);
    for (d, m, tags) in [
        ("a", "sensor", json!({"env": "test"})),
        ("b", "sensor", json!({"env": "test"})),
        ("c", "sensor", json!({"env": "prod"})),
        ("a", "other", json!({})),
    ] {
        hub.put_module(d, m, ModuleInput::default(), None).unwrap();
        hub.update_module_twin(d, m, &json!({ "tags": tags }), None, false).unwrap();
    }
    hub
}

fn module_config(value: i64, condition: &str, priority: i64) -> Value {
    json!({
        "content": { "moduleContent": { "properties.desired.settings": { "interval": value } } },
        "targetCondition": condition,
        "priority": priority,
        "metrics": { "queries": {
            "reporting": "SELECT deviceId, moduleId FROM devices.modules WHERE properties.reported.interval = 5",
            "devices": "SELECT deviceId FROM devices WHERE tags.env = 'test'",
        } },
    })
}

#[test]
fn module_content_reaches_matching_module_twins_only() {
    let hub = hub_with_modules();
    let condition = "FROM devices.modules WHERE moduleId = 'sensor' AND tags.env = 'test'";
    let v0 =
        hub.get_module_twin("a", "sensor").unwrap()["properties"]["desired"]["$version"].as_u64().unwrap();
    let created = hub.put_configuration("sensors", &module_config(5, condition, 1), None).unwrap();
    assert_eq!(
        created["systemMetrics"]["queries"]["appliedCount"],
        "select deviceId, moduleId from devices.modules where configurations.[[sensors]].status = 'Applied'"
    );
    hub.settle_configurations();
    for d in ["a", "b"] {
        assert_eq!(module_desired(&hub, d, "sensor"), json!({ "settings": { "interval": 5 } }), "{d}/sensor");
    }
    assert_eq!(module_desired(&hub, "c", "sensor"), json!({}), "tagged prod");
    assert_eq!(module_desired(&hub, "a", "other"), json!({}), "another module id");
    assert_eq!(desired(&hub, "a"), json!({}), "the device twin tagged env = test is not a module twin");
    assert!(hub.get_twin("a").unwrap().get("configurations").is_none());
    let twin = hub.get_module_twin("a", "sensor").unwrap();
    assert_eq!(twin["properties"]["desired"]["$version"].as_u64().unwrap(), v0 + 1);
    assert_eq!(twin["configurations"], json!({ "sensors": { "status": "applied" } }));
    assert!(hub.get_module_twin("c", "sensor").unwrap().get("configurations").is_none());

    hub.patch_reported("a/sensor", &json!({ "interval": 5 })).unwrap();
    let got = hub.get_configuration("sensors").unwrap();
    assert_eq!(got["systemMetrics"]["results"], json!({ "targetedCount": 2, "appliedCount": 2 }));
    assert_eq!(got["metrics"]["results"], json!({ "reporting": 1, "devices": 1 }));
    assert_eq!(hub.list_configurations(None)[0]["systemMetrics"]["results"]["appliedCount"], 2);
    let applied = hub
        .query(
            "SELECT deviceId, moduleId FROM devices.modules WHERE configurations.[[sensors]].status = 'Applied'",
            None,
            None,
        )
        .unwrap();
    let mut found: Vec<String> =
        applied.items.iter().map(|i| format!("{}/{}", i["deviceId"], i["moduleId"])).collect();
    found.sort();
    assert_eq!(found, [r#""a"/"sensor""#, r#""b"/"sensor""#]);
}

#[test]
fn device_and_module_configurations_do_not_compete() {
    let hub = hub_with_modules();
    // A device configuration writing the same path with a higher priority leaves module twins alone,
    // and a module configuration leaves device twins alone.
    let device = json!({
        "content": { "deviceContent": { "properties.desired.settings": { "interval": 60 } } },
        "targetCondition": "*",
        "priority": 100,
    });
    hub.put_configuration("devices", &device, None).unwrap();
    hub.put_configuration(
        "modules",
        &module_config(5, "FROM devices.modules WHERE tags.env = 'test'", 1),
        None,
    )
    .unwrap();
    hub.settle_configurations();
    assert_eq!(desired(&hub, "a"), json!({ "settings": { "interval": 60 } }));
    assert_eq!(module_desired(&hub, "a", "sensor"), json!({ "settings": { "interval": 5 } }));
    assert_eq!(hub.get_twin("a").unwrap()["configurations"], json!({ "devices": { "status": "applied" } }));
    let counts = |id: &str| hub.get_configuration(id).unwrap()["systemMetrics"]["results"].clone();
    assert_eq!(counts("devices"), json!({ "targetedCount": 3, "appliedCount": 3 }), "three device twins");
    assert_eq!(counts("modules"), json!({ "targetedCount": 2, "appliedCount": 2 }), "two module twins");
}

#[test]
fn module_priority_scope_and_deletion() {
    let hub = hub_with_modules();
    hub.put_configuration(
        "base",
        &module_config(5, "FROM devices.modules WHERE moduleId = 'sensor'", 1),
        None,
    )
    .unwrap();
    hub.put_configuration("test", &module_config(9, "FROM devices.modules WHERE tags.env = 'test'", 5), None)
        .unwrap();
    hub.settle_configurations();
    assert_eq!(
        module_desired(&hub, "a", "sensor"),
        json!({ "settings": { "interval": 9 } }),
        "higher priority"
    );
    assert_eq!(module_desired(&hub, "c", "sensor"), json!({ "settings": { "interval": 5 } }));
    assert_eq!(
        hub.get_module_twin("a", "sensor").unwrap()["configurations"],
        json!({ "base": { "status": "targeted" }, "test": { "status": "applied" } })
    );

    // A module leaving scope (its tags) falls back to the next configuration; one entering gets it.
    hub.update_module_twin("a", "sensor", &json!({ "tags": { "env": "prod" } }), None, false).unwrap();
    assert!(!hub.configurations_settled(), "a module twin write owes a re-evaluation");
    hub.settle_configurations();
    assert_eq!(module_desired(&hub, "a", "sensor"), json!({ "settings": { "interval": 5 } }));
    hub.update_module_twin("a", "other", &json!({ "tags": { "env": "test" } }), None, false).unwrap();
    hub.settle_configurations();
    assert_eq!(module_desired(&hub, "a", "other"), json!({ "settings": { "interval": 9 } }));
    // A module registered later (then tagged) gets it; so does one whose reported properties match.
    hub.put_module("b", "late", ModuleInput::default(), None).unwrap();
    hub.update_module_twin("b", "late", &json!({ "tags": { "env": "test" } }), None, false).unwrap();
    hub.put_configuration(
        "reported",
        &module_config(7, "FROM devices.modules WHERE properties.reported.ready = true", 10),
        None,
    )
    .unwrap();
    hub.settle_configurations();
    assert_eq!(module_desired(&hub, "b", "late"), json!({ "settings": { "interval": 9 } }));
    hub.patch_reported("b/late", &json!({ "ready": true })).unwrap();
    hub.settle_configurations();
    assert_eq!(module_desired(&hub, "b", "late"), json!({ "settings": { "interval": 7 } }));

    // The user's own desired properties stay when configurations go.
    hub.update_module_twin(
        "c",
        "sensor",
        &json!({ "properties": { "desired": { "mine": 1 } } }),
        None,
        false,
    )
    .unwrap();
    for id in ["base", "test", "reported"] {
        hub.delete_configuration(id, None).unwrap();
    }
    hub.settle_configurations();
    assert_eq!(module_desired(&hub, "c", "sensor"), json!({ "mine": 1 }));
    for (d, m) in [("a", "sensor"), ("a", "other"), ("b", "late")] {
        assert_eq!(module_desired(&hub, d, m), json!({}), "{d}/{m}");
        assert!(hub.get_module_twin(d, m).unwrap().get("configurations").is_none());
    }
}

#[test]
fn a_connected_module_is_sent_the_configuration_patch() {
    use crate::hub::link::{LinkEvent, subscriptions};
    let hub = hub_with_modules();
    let link = hub.attach_link("a/sensor", false).unwrap();
    hub.save_session("a/sensor", link.conn_id, subscriptions::DESIRED);
    hub.put_configuration(
        "sensors",
        &module_config(5, "FROM devices.modules WHERE tags.env = 'test'", 1),
        None,
    )
    .unwrap();
    hub.settle_configurations();
    let Some(LinkEvent::DesiredPatch(patch)) = link.events.try_recv() else { panic!("no desired patch") };
    let version = hub.get_module_twin("a", "sensor").unwrap()["properties"]["desired"]["$version"].clone();
    assert_eq!(*patch, json!({ "settings": { "interval": 5 }, "$version": version }));
    hub.delete_configuration("sensors", None).unwrap();
    hub.settle_configurations();
    let Some(LinkEvent::DesiredPatch(patch)) = link.events.try_recv() else { panic!("no removal patch") };
    assert_eq!(patch["settings"], Value::Null);
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

/// A hub with one device and one configuration, once its sweeper (not a settle call) applied it.
async fn hub_swept_by_its_sweeper() -> Hub {
    let hub = hub_with(&[("a", json!({"env": "test"}))]);
    hub.put_configuration("fw", &fw_config("3.0", "*", 0), None).unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while desired(&hub, "a") != json!({ "firmware": { "version": "3.0" } }) {
        assert!(tokio::time::Instant::now() < deadline, "the sweeper did not apply the configuration");
        tokio::task::yield_now().await;
    }
    hub
}

#[tokio::test]
async fn the_sweeper_applies_without_being_asked() {
    hub_swept_by_its_sweeper().await.shutdown_configurations();
}

/// The sweeper holds the hub only while it works: dropping the last handle frees the hub (and
/// ends the sweeper) without `shutdown_configurations`. It held a strong handle before.
#[tokio::test]
async fn dropping_the_last_handle_frees_a_hub_with_a_sweeper() {
    let hub = hub_swept_by_its_sweeper().await;
    let weak = hub.downgrade();
    drop(hub);
    assert!(weak.upgrade().is_none(), "something still holds the hub after its last handle was dropped");
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
    // Module configurations: 1 device in 100 has two modules, one of them tagged.
    for i in (0..n).step_by(100) {
        let id = format!("d{i}");
        for m in ["sensor", "other"] {
            hub.put_module(&id, m, ModuleInput::default(), None).unwrap();
        }
        hub.update_module_twin(&id, "sensor", &json!({ "tags": { "env": "test" } }), None, false).unwrap();
    }
    hub.settle_configurations();
    let t = std::time::Instant::now();
    hub.put_configuration(
        "sensors",
        &module_config(5, "FROM devices.modules WHERE tags.env = 'test'", 1),
        None,
    )
    .unwrap();
    hub.settle_configurations();
    println!("full sweep over {n} devices, {} module twins (half targeted): {:?}", n / 50, t.elapsed());
    let t = std::time::Instant::now();
    let c = hub.get_configuration("sensors").unwrap();
    println!("GET with 2 custom metrics: {:?} -> {}", t.elapsed(), c["systemMetrics"]["results"]);
}
