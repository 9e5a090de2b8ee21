//! Crash tests of module identities (with their twins and MQTT sessions) and configurations (with
//! what they applied to twins) through the library: change, wait for the acknowledgement, halt
//! the journal as kill -9 would, reopen the same directory and compare.

use std::sync::Arc;

use serde_json::{Value, json};

use super::Hub;
use super::tests::{T0, acked, crash, open};
use crate::clock::ManualClock;
use crate::error::ErrorCode;
use crate::hub::link::subscriptions;
use crate::hub::{AuthType, DeviceInput, IfMatch, LinkEvent, ModuleInput};

/// `v` without the members that are not kept (connection facts restart).
fn kept(mut v: Value) -> Value {
    let m = v.as_object_mut().unwrap();
    for key in ["connectionState", "connectionStateUpdatedTime", "lastActivityTime"] {
        m.remove(key);
    }
    v
}

fn desired(hub: &Hub, id: &str) -> Value {
    let mut d = hub.get_twin(id).unwrap()["properties"]["desired"].clone();
    let m = d.as_object_mut().unwrap();
    m.remove("$metadata");
    m.remove("$version");
    d
}

fn desired_version(hub: &Hub, id: &str) -> u64 {
    hub.get_twin(id).unwrap()["properties"]["desired"]["$version"].as_u64().unwrap()
}

fn fw_config(version: &str, condition: &str, priority: i64) -> Value {
    json!({
        "labels": { "team": "ops" },
        "content": { "deviceContent": { "properties.desired.firmware": { "version": version } } },
        "targetCondition": condition,
        "priority": priority,
        "metrics": { "queries": { "current": format!("SELECT deviceId FROM devices WHERE properties.reported.firmware = '{version}'") } },
    })
}

#[tokio::test]
async fn modules_with_keys_twins_and_sessions_survive_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let (hub, _) = open(tmp.path(), &clock);
    for d in ["d1", "d2"] {
        hub.put_device(d, DeviceInput::default(), None).unwrap();
    }
    let (m1, _) = hub.put_module("d1", "m1", ModuleInput::default(), None).unwrap();
    acked(&hub).await;
    let x509 = ModuleInput {
        managed_by: Some("me".into()),
        identity: DeviceInput {
            auth_type: Some(AuthType::SelfSigned),
            thumbprints: Some((Some("AB".repeat(20)), Some("CD".repeat(20)))),
            ..DeviceInput::default()
        },
        ..ModuleInput::default()
    };
    hub.put_module("d1", "cam", x509, None).unwrap();
    acked(&hub).await;
    // An update keeps the generation id and takes a new etag.
    let managed = ModuleInput { managed_by: Some("ops".into()), ..ModuleInput::default() };
    let etag = IfMatch::Etag(m1["etag"].as_str().unwrap().into());
    let (m1, _) = hub.put_module("d1", "m1", managed, Some(etag)).unwrap();
    acked(&hub).await;
    let patch = json!({"tags": {"site": "a"}, "properties": {"desired": {"rate": 5}}});
    hub.update_module_twin("d1", "m1", &patch, None, false).unwrap();
    acked(&hub).await;
    let link = hub.attach_link("d1/m1", false).unwrap();
    hub.save_session("d1/m1", link.conn_id, subscriptions::METHODS | subscriptions::DESIRED);
    acked(&hub).await;
    hub.patch_reported("d1/m1", &json!({"rate": 5, "fw": "1.0"})).unwrap();
    acked(&hub).await;
    hub.announce_model_id("d1/m1", "dtmi:com:example:Sensor;1");
    acked(&hub).await;
    hub.put_module("d1", "gone", ModuleInput::default(), None).unwrap();
    hub.delete_module("d1", "gone", None).unwrap();
    acked(&hub).await;
    // A device deleted with its modules, then registered again: none come back.
    hub.put_module("d2", "m", ModuleInput::default(), None).unwrap();
    acked(&hub).await;
    hub.delete_device("d2", None).unwrap();
    hub.put_device("d2", DeviceInput::default(), None).unwrap();
    acked(&hub).await;

    let modules_before: Vec<Value> = hub.list_modules("d1").unwrap().into_iter().map(kept).collect();
    let twin_before = kept(hub.get_module_twin("d1", "m1").unwrap());
    assert_eq!(twin_before["properties"]["reported"]["fw"], "1.0");
    assert_eq!(hub.identity_count(), 4);
    crash(hub).await;

    let (hub, _) = open(tmp.path(), &clock);
    assert_eq!(hub.identity_count(), 4, "two devices and two modules");
    let modules: Vec<Value> = hub.list_modules("d1").unwrap().into_iter().map(kept).collect();
    assert_eq!(modules, modules_before, "identities with keys, thumbprints, etags, generation ids");
    assert_eq!(modules[1]["managedBy"], "ops");
    assert_eq!(modules[1]["etag"], m1["etag"]);
    assert_eq!(kept(hub.get_module_twin("d1", "m1").unwrap()), twin_before);
    assert_eq!(hub.get_module_twin("d1", "m1").unwrap()["modelId"], "dtmi:com:example:Sensor;1");
    assert_eq!(hub.get_module("d1", "gone").unwrap_err().code, ErrorCode::ModuleNotFound);
    assert!(hub.list_modules("d2").unwrap().is_empty());
    // The module still authenticates with its recovered key, and its session is there.
    let key = m1["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap();
    let sr = "localhost/devices/d1/modules/m1";
    let token = crate::sas::make_token(sr, key, None, hub.wall_now() / 1000 + 600).unwrap();
    hub.authenticate_client(&token, "d1/m1").unwrap();
    let again = hub.attach_link("d1/m1", false).unwrap();
    assert_eq!(again.session, subscriptions::METHODS | subscriptions::DESIRED);
    // Ids stay taken, new identities get newer generation ids, and deleting a module counts.
    let e = hub.put_module("d1", "m1", ModuleInput::default(), None).unwrap_err();
    assert_eq!(e.code, ErrorCode::ModuleAlreadyExistsOnDevice);
    let (new, _) = hub.put_module("d1", "new", ModuleInput::default(), None).unwrap();
    let gen_of = |v: &Value| v["generationId"].as_str().unwrap().parse::<u64>().unwrap();
    assert!(gen_of(&new) > gen_of(&m1));
    hub.delete_module("d1", "cam", None).unwrap();
    assert_eq!(hub.identity_count(), 4);
}

#[tokio::test]
async fn configurations_and_what_they_applied_survive_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let (hub, _) = open(tmp.path(), &clock);
    for (id, env) in [("a", "test"), ("b", "test"), ("c", "prod")] {
        hub.put_device(id, DeviceInput::default(), None).unwrap();
        hub.update_twin(id, &json!({ "tags": { "env": env } }), None, false).unwrap();
    }
    acked(&hub).await;
    hub.put_configuration("fw", &fw_config("2.0", "tags.env = 'test'", 10), None).unwrap();
    acked(&hub).await;
    // Retargeted with its etag: a newer etag and update time, the creation time stays.
    let other = hub.put_configuration("other", &fw_config("1.0", "tags.env = 'none'", 1), None).unwrap();
    acked(&hub).await;
    clock.advance(5_000);
    let etag = IfMatch::Etag(other["etag"].as_str().unwrap().into());
    hub.put_configuration("other", &fw_config("1.0", "tags.env = 'prod'", 2), Some(etag)).unwrap();
    acked(&hub).await;
    hub.put_configuration("gone", &fw_config("0.1", "*", 0), None).unwrap();
    hub.delete_configuration("gone", None).unwrap();
    acked(&hub).await;
    hub.settle_configurations();
    hub.durable_all().await.unwrap();
    hub.patch_reported("a", &json!({ "firmware": "2.0" })).unwrap();
    acked(&hub).await;

    let fw_before = hub.get_configuration("fw").unwrap();
    assert_eq!(fw_before["systemMetrics"]["results"], json!({ "targetedCount": 2, "appliedCount": 2 }));
    assert_eq!(fw_before["metrics"]["results"], json!({ "current": 1 }));
    let other_before = hub.get_configuration("other").unwrap();
    assert_ne!(other_before["createdTimeUtc"], other_before["lastUpdatedTimeUtc"]);
    let versions: Vec<u64> = ["a", "b", "c"].iter().map(|id| desired_version(&hub, id)).collect();
    let twin_a = hub.get_twin("a").unwrap();
    assert_eq!(twin_a["configurations"], json!({ "fw": { "status": "applied" } }));
    crash(hub).await;

    let (hub, _) = open(tmp.path(), &clock);
    // Connected before the owed sweep runs: nothing is sent to a twin already in line.
    let link = hub.attach_link("a", false).unwrap();
    hub.save_session("a", link.conn_id, subscriptions::DESIRED);
    hub.settle_configurations();
    assert!(link.events.try_recv().is_none(), "no desired patch after recovery");
    assert_eq!(hub.get_configuration("fw").unwrap(), fw_before, "content, etag, times, metrics");
    assert_eq!(hub.get_configuration("other").unwrap(), other_before);
    assert_eq!(hub.get_configuration("gone").unwrap_err().code, ErrorCode::ConfigurationNotFound);
    assert_eq!(hub.list_configurations(None).len(), 2);
    let after: Vec<u64> = ["a", "b", "c"].iter().map(|id| desired_version(&hub, id)).collect();
    assert_eq!(after, versions, "the sweep after recovery changes no desired version");
    assert_eq!(hub.get_twin("a").unwrap()["configurations"], twin_a["configurations"]);
    assert_eq!(desired(&hub, "c"), json!({ "firmware": { "version": "1.0" } }));

    // The sweeper still works: a device that starts matching gets the content.
    hub.put_device("late", DeviceInput::default(), None).unwrap();
    hub.update_twin("late", &json!({ "tags": { "env": "test" } }), None, false).unwrap();
    hub.settle_configurations();
    assert_eq!(desired(&hub, "late"), json!({ "firmware": { "version": "2.0" } }));
    // Deleting a recovered configuration takes back what it wrote (the recovered paths say what).
    hub.update_twin("b", &json!({ "properties": { "desired": { "mine": 1 } } }), None, false).unwrap();
    hub.delete_configuration("fw", None).unwrap();
    hub.settle_configurations();
    assert_eq!(desired(&hub, "a"), json!({}));
    assert_eq!(desired(&hub, "b"), json!({ "mine": 1 }), "the user's own stays");
    assert!(hub.get_twin("a").unwrap().get("configurations").is_none());
    match link.events.try_recv() {
        Some(LinkEvent::DesiredPatch(p)) => assert_eq!(p["firmware"], Value::Null),
        other => panic!("expected the removal patch, got {other:?}"),
    }
    // A new configuration of equal priority is newer than the recovered ones and takes a fresh etag.
    let newer = hub.put_configuration("newer", &fw_config("3.0", "tags.env = 'prod'", 2), None).unwrap();
    assert_ne!(newer["etag"], other_before["etag"]);
    hub.settle_configurations();
    assert_eq!(desired(&hub, "c"), json!({ "firmware": { "version": "3.0" } }));
}

#[tokio::test]
async fn a_snapshot_keeps_modules_and_configurations_and_the_log_replays_over_it() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let (hub, _) = open(tmp.path(), &clock);
    for i in 0..20 {
        let id = format!("d{i}");
        hub.put_device(&id, DeviceInput::default(), None).unwrap();
        hub.update_twin(&id, &json!({ "tags": { "ring": i % 2 } }), None, false).unwrap();
        hub.put_module(&id, "edge", ModuleInput::default(), None).unwrap();
        hub.patch_reported(&format!("{id}/edge"), &json!({ "n": i })).unwrap();
    }
    hub.put_configuration("ring0", &fw_config("2.0", "tags.ring = 0", 1), None).unwrap();
    hub.put_configuration("ring1", &fw_config("1.0", "tags.ring = 1", 1), None).unwrap();
    hub.settle_configurations();
    hub.durable_all().await.unwrap();
    let stats = hub.snapshot().unwrap().unwrap();
    assert!(!crate::persist::store::segment_path(tmp.path(), 0).exists(), "the history is gone");
    assert!(stats.records >= 20 * 4 + 2, "devices, twins, modules, records, configurations: {stats:?}");
    // After the snapshot: a module deleted, one added, a twin patched, a configuration deleted.
    hub.delete_module("d0", "edge", None).unwrap();
    hub.put_module("d1", "extra", ModuleInput::default(), None).unwrap();
    hub.update_module_twin("d2", "edge", &json!({"properties": {"desired": {"x": 1}}}), None, false).unwrap();
    hub.delete_configuration("ring1", None).unwrap();
    hub.settle_configurations();
    hub.durable_all().await.unwrap();
    let versions: Vec<u64> = (0..20).map(|i| desired_version(&hub, &format!("d{i}"))).collect();
    crash(hub).await;

    let (hub, _) = open(tmp.path(), &clock);
    assert_eq!(hub.identity_count(), 20 + 20);
    assert!(hub.get_module("d0", "edge").is_err());
    assert!(hub.get_module("d1", "extra").is_ok());
    assert_eq!(hub.get_module_twin("d2", "edge").unwrap()["properties"]["desired"]["x"], 1);
    assert_eq!(hub.get_module_twin("d7", "edge").unwrap()["properties"]["reported"]["n"], 7);
    assert!(hub.get_configuration("ring1").is_err());
    let ring0 = hub.get_configuration("ring0").unwrap();
    assert_eq!(ring0["systemMetrics"]["results"], json!({ "targetedCount": 10, "appliedCount": 10 }));
    hub.settle_configurations();
    assert_eq!(desired(&hub, "d4"), json!({ "firmware": { "version": "2.0" } }));
    assert_eq!(desired(&hub, "d5"), json!({}), "ring1's content left when it was deleted");
    let after: Vec<u64> = (0..20).map(|i| desired_version(&hub, &format!("d{i}"))).collect();
    assert_eq!(after, versions);
}

#[tokio::test]
async fn a_sweep_the_crash_cut_short_is_finished_after_recovery() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let (hub, _) = open(tmp.path(), &clock);
    // Written from a thread without a runtime: no background sweeper runs while this test awaits.
    let writer = hub.clone();
    std::thread::spawn(move || {
        writer.put_device("a", DeviceInput::default(), None).unwrap();
        let old = json!({
            "content": { "deviceContent": { "properties.desired.legacy": { "on": true } } },
            "targetCondition": "*",
        });
        writer.put_configuration("old", &old, None).unwrap();
        writer.settle_configurations();
        assert_eq!(desired(&writer, "a"), json!({ "legacy": { "on": true } }));
        // Acknowledged, but the hub dies before the sweeper reached the twin.
        writer.delete_configuration("old", None).unwrap();
        writer.put_configuration("fw", &fw_config("2.0", "*", 0), None).unwrap();
    })
    .join()
    .unwrap();
    hub.durable_all().await.unwrap();
    assert!(!hub.configurations_settled());
    crash(hub).await;

    let (hub, _) = open(tmp.path(), &clock);
    assert!(!hub.configurations_settled(), "recovery owes a sweep");
    hub.settle_configurations();
    // The device's recovered record says what the deleted configuration wrote: it is taken back.
    assert_eq!(desired(&hub, "a"), json!({ "firmware": { "version": "2.0" } }));
    let fw = hub.get_configuration("fw").unwrap();
    assert_eq!(fw["systemMetrics"]["results"], json!({ "targetedCount": 1, "appliedCount": 1 }));
}

#[tokio::test]
async fn module_configurations_and_what_they_wrote_into_module_twins_survive_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let (hub, _) = open(tmp.path(), &clock);
    let module_desired = |hub: &Hub, d: &str| {
        let mut v = hub.get_module_twin(d, "thermo").unwrap()["properties"]["desired"].clone();
        let m = v.as_object_mut().unwrap();
        m.remove("$metadata");
        m.remove("$version");
        v
    };
    let rate = |n: u64, priority: i64| {
        json!({
            "content": { "moduleContent": { "properties.desired.rate": n } },
            "targetCondition": "FROM devices.modules WHERE moduleId = 'thermo' AND tags.env = 'test'",
            "priority": priority,
        })
    };
    // Written from a thread without a runtime: no background sweeper runs while this test awaits.
    let writer = hub.clone();
    std::thread::spawn(move || {
        for d in ["g1", "g2"] {
            writer.put_device(d, DeviceInput::default(), None).unwrap();
            writer.put_module(d, "thermo", ModuleInput::default(), None).unwrap();
        }
        writer
            .update_module_twin("g1", "thermo", &json!({ "tags": { "env": "test" } }), None, false)
            .unwrap();
        writer.put_configuration("old", &rate(7, 1), None).unwrap();
        writer.put_configuration("keep", &rate(3, 0), None).unwrap();
        writer.settle_configurations();
        assert_eq!(module_desired(&writer, "g1"), json!({ "rate": 7 }));
    })
    .join()
    .unwrap();
    hub.durable_all().await.unwrap();
    let twin_before = kept(hub.get_module_twin("g1", "thermo").unwrap());
    let keep_before = hub.get_configuration("keep").unwrap();
    assert_eq!(keep_before["systemMetrics"]["results"], json!({ "targetedCount": 1, "appliedCount": 0 }));
    crash(hub).await;

    let (hub, _) = open(tmp.path(), &clock);
    hub.settle_configurations();
    assert_eq!(kept(hub.get_module_twin("g1", "thermo").unwrap()), twin_before, "desired, versions, status");
    assert_eq!(hub.get_configuration("keep").unwrap(), keep_before, "metrics from the recovered records");
    let writer = hub.clone();
    std::thread::spawn(move || {
        // A module that writes nothing itself gets a value only from configurations.
        writer
            .update_module_twin(
                "g2",
                "thermo",
                &json!({ "properties": { "desired": { "mine": 1 } } }),
                None,
                false,
            )
            .unwrap();
        // Acknowledged, but the hub dies before the sweeper reached the module twin.
        writer.delete_configuration("keep", None).unwrap();
        writer.delete_configuration("old", None).unwrap();
    })
    .join()
    .unwrap();
    hub.durable_all().await.unwrap();
    crash(hub).await;

    let (hub, _) = open(tmp.path(), &clock);
    assert!(!hub.configurations_settled(), "recovery owes a sweep, with no configuration left too");
    hub.settle_configurations();
    // The module twin's recovered record says what "old" wrote: it is taken back.
    assert_eq!(module_desired(&hub, "g1"), json!({}));
    assert_eq!(module_desired(&hub, "g2"), json!({ "mine": 1 }), "the user's own stays");
    assert!(hub.get_module_twin("g1", "thermo").unwrap().get("configurations").is_none());
}
