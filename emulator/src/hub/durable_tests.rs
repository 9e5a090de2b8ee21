//! Crash tests of the durable hub through the library: change state, wait for what was
//! acknowledged, halt the journal as kill -9 would (nothing unwritten is written), drop the hub,
//! reopen the same directory and compare.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::json;

use super::*;
use crate::c2d::{AckMode, Settlement};
use crate::clock::ManualClock;
use crate::hub::{DeviceInput, HubConfig, IfMatch};
use crate::persist::{PersistConfig, SyncMode};

pub(super) const T0: u64 = 1_800_000_000_000;

pub(super) fn open(dir: &std::path::Path, clock: &Arc<ManualClock>) -> (Hub, Recovered) {
    let config = HubConfig { feedback_batch_interval_ms: 1000, ..HubConfig::default() };
    let persist = PersistConfig { dir: dir.to_path_buf(), sync: SyncMode::Write };
    Hub::open_persistent(config, clock.clone(), &persist).expect("the state directory opens")
}

/// Takes this thread's ticket and waits for it: what a protocol driver does before answering.
pub(super) async fn acked(hub: &Hub) {
    let t = hub.take_durability_ticket();
    assert!(t.is_some(), "a change appended a record");
    hub.durable(t).await.unwrap();
}

fn msg(id: &str, ack: AckMode) -> C2dMessage {
    C2dMessage {
        message_id: Some(id.into()),
        ack,
        properties: vec![("k".into(), "v".into())],
        body: Bytes::from(format!("body of {id}")),
        ..Default::default()
    }
}

/// Kill -9: nothing more is written, then the hub goes away (its job tasks too, which hold
/// handles to it; the state directory is unlocked once the last handle is gone).
pub(super) async fn crash(hub: Hub) {
    hub.halt_persistence();
    hub.shutdown_jobs();
    hub.shutdown_configurations();
    let gone = Arc::downgrade(&hub.shared);
    drop(hub);
    while gone.strong_count() > 0 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn everything_acknowledged_survives_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let (hub, recovered) = open(tmp.path(), &clock);
    assert_eq!(recovered.devices, 0);

    let (dev, _) = hub.put_device("fridge-1", DeviceInput::default(), None).unwrap();
    acked(&hub).await;
    let x509 = DeviceInput {
        auth_type: Some(AuthType::SelfSigned),
        thumbprints: Some((Some("AB".repeat(20)), None)),
        ..DeviceInput::default()
    };
    hub.put_device("cam-1", x509, None).unwrap();
    acked(&hub).await;
    hub.announce_model_id("cam-1", "dtmi:com:example:Cam;1");
    let disabled = DeviceInput { status: Some(Status::Disabled), ..DeviceInput::default() };
    hub.put_device("old-1", DeviceInput::default(), None).unwrap();
    hub.put_device("old-1", disabled, Some(IfMatch::Any)).unwrap();
    hub.put_device("gone-1", DeviceInput::default(), None).unwrap();
    hub.delete_device("gone-1", None).unwrap();
    acked(&hub).await;

    hub.update_twin(
        "fridge-1",
        &json!({"tags": {"site": "a"}, "properties": {"desired": {"t": 4}}}),
        None,
        false,
    )
    .unwrap();
    acked(&hub).await;
    hub.patch_reported("fridge-1", &json!({"t": 5})).unwrap();
    acked(&hub).await;

    for i in 0..4 {
        hub.send_c2d("fridge-1", msg(&format!("m{i}"), AckMode::Full)).unwrap();
        acked(&hub).await;
    }
    // m0 completed (Success feedback), m1 abandoned once, m2 locked (the lock lapses), m3 queued.
    let d0 = hub.receive_c2d("fridge-1", 60_000).unwrap().unwrap();
    hub.settle_c2d("fridge-1", d0.lock_token, Settlement::Complete).unwrap();
    acked(&hub).await;
    let d1 = hub.receive_c2d("fridge-1", 60_000).unwrap().unwrap();
    hub.settle_c2d("fridge-1", d1.lock_token, Settlement::Abandon).unwrap();
    acked(&hub).await;
    let again = hub.receive_c2d("fridge-1", 60_000).unwrap().unwrap();
    assert_eq!(again.sequence_number, d1.sequence_number);
    let _locked = hub.receive_c2d("fridge-1", 60_000).unwrap().unwrap();
    let twin_before = hub.get_twin("fridge-1").unwrap();
    let cam_before = hub.get_device("cam-1").unwrap();
    let old_before = hub.get_device("old-1").unwrap();
    crash(hub).await;

    let (hub, recovered) = open(tmp.path(), &clock);
    assert_eq!(recovered.devices, 3);
    assert_eq!(hub.device_count(), 3);
    let fridge = hub.get_device("fridge-1").unwrap();
    for key in ["generationId", "etag", "authentication", "status"] {
        assert_eq!(fridge[key], dev[key], "{key}");
    }
    assert_eq!(fridge["cloudToDeviceMessageCount"], 3);
    let mut cam = hub.get_device("cam-1").unwrap();
    let mut cam_before = cam_before;
    for v in [&mut cam, &mut cam_before] {
        v.as_object_mut().unwrap().remove("connectionStateUpdatedTime");
        v.as_object_mut().unwrap().remove("lastActivityTime");
    }
    assert_eq!(cam, cam_before);
    assert_eq!(hub.get_twin("cam-1").unwrap()["modelId"], "dtmi:com:example:Cam;1");
    assert_eq!(hub.get_device("old-1").unwrap()["status"], old_before["status"]);
    assert_eq!(hub.get_device("old-1").unwrap()["etag"], old_before["etag"]);
    assert!(hub.get_device("gone-1").is_err());
    let mut twin = hub.get_twin("fridge-1").unwrap();
    let mut twin_before = twin_before;
    for v in [&mut twin, &mut twin_before] {
        v.as_object_mut().unwrap().remove("lastActivityTime");
    }
    assert_eq!(twin, twin_before);

    // The locks lapsed: m1 (delivery count 1), m2 and m3 come again in order.
    let got: Vec<(String, u32)> = std::iter::from_fn(|| hub.receive_c2d("fridge-1", 60_000).unwrap())
        .map(|d| (d.message.message_id.clone().unwrap(), d.delivery_count))
        .collect();
    assert_eq!(got, vec![("m1".into(), 1), ("m2".into(), 0), ("m3".into(), 0)]);
    assert_eq!(
        &*hub.receive_c2d("fridge-1", 1).unwrap().map_or(Bytes::new(), |d| d.message.body.clone()),
        b""
    );

    // m0's Success feedback was pending or batched: it comes out after the interval.
    clock.advance(2_000);
    let batch = hub.receive_feedback().expect("the feedback batch survived");
    let body: serde_json::Value = serde_json::from_slice(&batch.message.body).unwrap();
    assert_eq!(body[0]["originalMessageId"], "m0");
    assert_eq!(body[0]["statusCode"], "Success");

    // New identities do not reuse the recovered etags and generation ids.
    let (new, _) = hub.put_device("new-1", DeviceInput::default(), None).unwrap();
    let gen_of = |v: &serde_json::Value| v["generationId"].as_str().unwrap().parse::<u64>().unwrap();
    assert!(gen_of(&new) > gen_of(&fridge));
}

#[tokio::test]
async fn what_was_not_acknowledged_may_be_lost_but_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let (hub, _) = open(tmp.path(), &clock);
    hub.put_device("d", DeviceInput::default(), None).unwrap();
    acked(&hub).await;
    hub.send_c2d("d", msg("acked", AckMode::None)).unwrap();
    acked(&hub).await;
    // Appended but halted before the committer may have written it: either outcome is allowed.
    hub.send_c2d("d", msg("unacked", AckMode::None)).unwrap();
    crash(hub).await;
    let (hub, _) = open(tmp.path(), &clock);
    let first = hub.receive_c2d("d", 60_000).unwrap().unwrap();
    assert_eq!(first.message.message_id.as_deref(), Some("acked"));
    assert_eq!(first.message.properties, vec![("k".to_string(), "v".to_string())]);
}

#[tokio::test]
async fn a_torn_tail_is_cut_and_the_hub_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let (hub, _) = open(tmp.path(), &clock);
    hub.put_device("d", DeviceInput::default(), None).unwrap();
    acked(&hub).await;
    crash(hub).await;
    // A write the hub was killed in the middle of.
    let seg = crate::persist::store::segment_path(tmp.path(), 0);
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3, 4, 5]);
    std::fs::write(&seg, &bytes).unwrap();
    let (hub, recovered) = open(tmp.path(), &clock);
    assert_eq!(recovered.replayed.torn_bytes, 9);
    assert!(hub.get_device("d").is_ok());
    hub.put_device("e", DeviceInput::default(), None).unwrap();
    acked(&hub).await;
    crash(hub).await;
    let (hub, recovered) = open(tmp.path(), &clock);
    assert_eq!(recovered.devices, 2);
    assert_eq!(recovered.replayed.torn_bytes, 0);
    drop(hub);
}

#[tokio::test]
async fn a_snapshot_replaces_the_history_and_changes_during_it_replay_over_it() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let (hub, _) = open(tmp.path(), &clock);
    for i in 0..200 {
        let id = format!("d{i}");
        hub.put_device(&id, DeviceInput::default(), None).unwrap();
        hub.send_c2d(&id, msg("x", AckMode::None)).unwrap();
        // Churn the snapshot makes obsolete.
        for k in 0..5 {
            hub.patch_reported(&id, &json!({ "k": k })).unwrap();
        }
    }
    hub.purge_c2d("d0").unwrap();
    hub.delete_device("d1", None).unwrap();
    acked(&hub).await;
    let log_before = std::fs::metadata(crate::persist::store::segment_path(tmp.path(), 0)).unwrap().len();
    let stats = hub.snapshot().unwrap().unwrap();
    assert_eq!(stats.number, 1);
    assert!(
        stats.bytes < log_before,
        "the snapshot ({}) is smaller than the history ({log_before})",
        stats.bytes
    );
    assert!(!crate::persist::store::segment_path(tmp.path(), 0).exists(), "the old segment is gone");
    // Changes after the snapshot land in the new segment.
    hub.send_c2d("d2", msg("after", AckMode::None)).unwrap();
    hub.patch_reported("d3", &json!({ "k": "after" })).unwrap();
    acked(&hub).await;
    crash(hub).await;
    let (hub, recovered) = open(tmp.path(), &clock);
    assert_eq!(recovered.devices, 199);
    assert_eq!(hub.get_device("d0").unwrap()["cloudToDeviceMessageCount"], 0);
    assert_eq!(hub.get_device("d2").unwrap()["cloudToDeviceMessageCount"], 2);
    assert_eq!(hub.reported_property("d3", "k"), Some(json!("after")));
    assert_eq!(hub.reported_property("d4", "k"), Some(json!(4)));
    assert!(hub.get_device("d1").is_err());
    // The sequence numbers continue: the next message for d0 is not sequence 1 again.
    let r = hub.send_c2d("d0", msg("y", AckMode::None)).unwrap();
    assert_eq!(r.sequence_number, 2);
}

#[tokio::test]
async fn without_persist_nothing_is_journaled() {
    let hub = Hub::new(HubConfig::default());
    hub.put_device("d", DeviceInput::default(), None).unwrap();
    assert!(!hub.is_persistent());
    assert_eq!(hub.take_durability_ticket(), None);
    assert!(hub.snapshot().is_none());
}

#[tokio::test]
async fn one_hub_per_state_directory_and_a_graceful_close_keeps_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let (hub, _) = open(tmp.path(), &clock);
    let persist = PersistConfig { dir: tmp.path().to_path_buf(), sync: SyncMode::Write };
    let second = Hub::open_persistent(HubConfig::default(), clock.clone(), &persist);
    assert!(matches!(second, Err(crate::persist::PersistError::Locked(_))), "{second:?}");
    hub.put_device("d", DeviceInput::default(), None).unwrap();
    // Not awaited: a graceful close writes what is pending.
    hub.close_persistence();
    let t = hub.take_durability_ticket();
    hub.durable(t).await.unwrap();
    drop(hub);
    let (hub, recovered) = open(tmp.path(), &clock);
    assert_eq!(recovered.devices, 1);
    drop(hub);
}

#[tokio::test]
async fn the_mqtt_session_survives_so_a_device_need_not_subscribe_again() {
    use crate::hub::link::subscriptions;
    let tmp = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let (hub, _) = open(tmp.path(), &clock);
    hub.put_device("d", DeviceInput::default(), None).unwrap();
    let link = hub.attach_link("d", false).unwrap();
    hub.save_session("d", link.conn_id, subscriptions::C2D | subscriptions::METHODS);
    acked(&hub).await;
    crash(hub).await;
    let (hub, _) = open(tmp.path(), &clock);
    let again = hub.attach_link("d", false).unwrap();
    assert_eq!(again.session, subscriptions::C2D | subscriptions::METHODS);
    assert_eq!(hub.get_device("d").unwrap()["connectionState"], "Connected");
}

#[tokio::test]
async fn finished_jobs_are_kept_and_a_job_cut_short_by_the_crash_ends_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let (hub, _) = open(tmp.path(), &clock);
    hub.put_device("d", DeviceInput::default(), None).unwrap();
    let now_job = json!({
        "jobId": "now", "type": "scheduleUpdateTwin", "queryCondition": "deviceId = 'd'",
        "updateTwin": {"tags": {"rolled": true}}, "maxExecutionTimeInSeconds": 60,
    });
    hub.create_job("now", &now_job).unwrap();
    acked(&hub).await;
    let later = json!({
        "jobId": "later", "type": "scheduleUpdateTwin", "queryCondition": "deviceId = 'd'",
        "updateTwin": {"tags": {"late": true}}, "startTime": crate::clock::iso8601(T0 + 3_600_000),
        "maxExecutionTimeInSeconds": 60,
    });
    assert_eq!(hub.create_job("later", &later).unwrap()["status"], "scheduled");
    acked(&hub).await;
    // The first job runs on its task: poll until it completed (its end is recorded then).
    while hub.get_job("now").unwrap()["status"] != "completed" {
        tokio::task::yield_now().await;
    }
    hub.durable_all().await.unwrap();
    let done = hub.get_job("now").unwrap();
    crash(hub).await;

    let (hub, _) = open(tmp.path(), &clock);
    assert_eq!(hub.get_job("now").unwrap(), done);
    let cut = hub.get_job("later").unwrap();
    assert_eq!(cut["status"], "failed");
    assert_eq!(cut["failureReason"], "the hub restarted before the job finished");
    assert_eq!(hub.get_twin("d").unwrap()["tags"], json!({"rolled": true}));
    // The ids stay taken; new jobs are accepted.
    assert!(hub.create_job("now", &now_job).is_err());
    let again = json!({
        "jobId": "again", "type": "scheduleUpdateTwin", "queryCondition": "deviceId = 'd'",
        "updateTwin": {"tags": {"x": 1}},
    });
    hub.create_job("again", &again).unwrap();
    let listed = hub.query_jobs(None, None, None, 10).unwrap();
    let ids: Vec<&str> = listed.items.iter().map(|j| j["jobId"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["now", "later", "again"], "creation order survives");
}
