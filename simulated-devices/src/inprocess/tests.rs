//! The in-process fleet against a real hub core: connects, installs on a C2D notice, reports
//! through the twin, redelivery after a dropped acknowledgement, power cuts.

use std::time::Duration;

use iothub_emulator::c2d::{AckMode, C2dMessage};
use iothub_emulator::hub::{DeviceInput, HubConfig};

use super::*;
use crate::notice::UpdateNotice;
use crate::package::{Manifest, build_package};

const KEY: &str = "dGVzdC1mbGVldC1rZXk=";

fn hub_with(n: usize) -> (Hub, Arc<[String]>) {
    let hub = Hub::new(HubConfig::default());
    let ids: Arc<[String]> = (0..n).map(|i| format!("dev-{i}")).collect();
    for id in ids.iter() {
        let key = crate::fleet::device_key(KEY, id);
        let input =
            DeviceInput { primary_key: Some(key.clone()), secondary_key: Some(key), ..Default::default() };
        hub.put_device(id, input, None).unwrap();
    }
    (hub, ids)
}

fn package(version: &str) -> (Arc<MemoryPackages>, UpdateNotice) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("firmware.bin"), b"firmware").unwrap();
    let m = Manifest { name: "app".into(), version: version.into(), self_test: None };
    let (_, path, release) = build_package(&src, Some(&m), &tmp.path().join("out")).unwrap();
    let packages = MemoryPackages::new();
    packages.add(&release.file, std::fs::read(path).unwrap()).unwrap();
    packages.set_latest(release.clone());
    (packages, UpdateNotice::for_release(&release, "127.0.0.1:21"))
}

fn notice_message(notice: &UpdateNotice, id: &str) -> C2dMessage {
    C2dMessage {
        message_id: Some(format!("release-{id}")),
        ack: AckMode::Full,
        body: serde_json::to_vec(notice).unwrap().into(),
        ..C2dMessage::default()
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn reported_version(hub: &Hub, id: &str) -> Option<String> {
    let twin = hub.get_twin(id).ok()?;
    Some(twin.pointer("/properties/reported/appVersion")?.as_str()?.to_string())
}

fn config(ids: Arc<[String]>) -> InProcessConfig {
    InProcessConfig {
        initial_version: Some("1.0.0".into()),
        backoff_min: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        partitions: 2,
        ..InProcessConfig::new(ids, KEY)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_connect_install_once_and_report_through_the_twin() {
    let (hub, ids) = hub_with(50);
    let (packages, notice) = package("2.0.0");
    let fleet = InProcessFleet::start(hub.clone(), config(ids.clone()), packages);
    until("every device connected", || fleet.connected() == 50 && fleet.unsettled() == 0).await;
    assert_eq!(reported_version(&hub, "dev-7").as_deref(), Some("1.0.0"), "reported on connect");
    assert_eq!(hub.get_device("dev-7").unwrap()["connectionState"], "Connected");
    for id in ids.iter() {
        hub.send_c2d(id, notice_message(&notice, id)).unwrap();
    }
    until("every twin reports 2.0.0", || {
        ids.iter().all(|id| reported_version(&hub, id).as_deref() == Some("2.0.0"))
    })
    .await;
    assert!((0..50).all(|i| fleet.installs(i) == 1));
    let telemetry = hub.read_telemetry(Some("dev-3"), 0, 100);
    let states: Vec<String> = telemetry
        .iter()
        .filter_map(|m| serde_json::from_slice::<serde_json::Value>(&m.body).ok())
        .filter_map(|v| v["installState"].as_str().map(str::to_string))
        .collect();
    assert_eq!(states, ["downloading", "verifying", "installing", "installed"]);
    fleet.stop().await;
    assert_eq!(hub.get_device("dev-7").unwrap()["connectionState"], "Disconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_ack_is_redelivered_and_not_acted_on_twice() {
    let (hub, ids) = hub_with(4);
    let (packages, notice) = package("2.0.0");
    let fleet = InProcessFleet::start(hub.clone(), config(ids.clone()), packages);
    until("connected", || fleet.connected() == 4 && fleet.unsettled() == 0).await;
    fleet.drop_link_before_next_ack(1);
    until("the drop is armed", || fleet.unsettled() == 0).await;
    hub.send_c2d("dev-1", notice_message(&notice, "dev-1")).unwrap();
    until("redelivered and acknowledged", || {
        fleet.duplicate_deliveries(1) == 1 && fleet.connected() == 4 && hub.connected_with_c2d() == 0
    })
    .await;
    assert_eq!(fleet.installs(1), 1, "acted on once");
    assert_eq!(fleet.link_drops(1), 1);
    assert_eq!(reported_version(&hub, "dev-1").as_deref(), Some("2.0.0"));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplugged_device_gets_its_queued_notice_when_it_is_back() {
    let (hub, ids) = hub_with(3);
    let (packages, notice) = package("2.0.0");
    let fleet = InProcessFleet::start(hub.clone(), config(ids.clone()), packages);
    until("connected", || fleet.connected() == 3).await;
    fleet.set_power(2, false);
    until("off", || fleet.connected() == 2 && fleet.unsettled() == 0).await;
    hub.send_c2d("dev-2", notice_message(&notice, "dev-2")).unwrap();
    assert_eq!(reported_version(&hub, "dev-2").as_deref(), Some("1.0.0"), "queued while off");
    fleet.set_power(2, true);
    until("installed after power-on", || reported_version(&hub, "dev-2").as_deref() == Some("2.0.0")).await;
    assert_eq!(fleet.installs(2), 1);
    // A check finds the version already active: nothing more happens.
    fleet.check_for_update(2);
    until("checked", || fleet.unsettled() == 0).await;
    assert_eq!(fleet.installs(2), 1);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_connect_is_answered_at_its_turn_in_hub_time() {
    use iothub_emulator::clock::ManualClock;
    use iothub_emulator::throttle::{Admission, Op, Sku, Tier};

    const START_MS: u64 = 1_700_000_000_000;
    let clock = ManualClock::new(START_MS);
    let tier = Tier::new(Sku::S1, 1).unwrap();
    let hub =
        Hub::with_clock(HubConfig { throttle: Some(tier), ..HubConfig::default() }, Arc::new(clock.clone()));
    let key = crate::fleet::device_key(KEY, "dev-0");
    let input =
        DeviceInput { primary_key: Some(key.clone()), secondary_key: Some(key), ..Default::default() };
    hub.put_device("dev-0", input, None).unwrap();
    // S1 admits 100 connects a second with 1 s of burst: use the burst up, so the device's
    // CONNECT is shaped to START + 10 ms.
    for _ in 0..101 {
        assert_eq!(hub.admit(Op::DeviceConnect, 1), Admission::Now);
    }
    let ids: Arc<[String]> = vec!["dev-0".to_string()].into();
    let (packages, _) = package("2.0.0");
    let fleet = InProcessFleet::start(hub.clone(), config(ids), packages);
    until("the hub took the CONNECT", || fleet.connected() == 1).await;
    // A command is handled after the step that connected the device has run to its end.
    fleet.check_for_update(0);
    until("the connect step is over", || fleet.unsettled() == 0).await;
    assert_eq!(reported_version(&hub, "dev-0"), None, "the CONNACK waits for hub time to reach its turn");
    clock.advance(10);
    until("the device reports once its turn came", || reported_version(&hub, "dev-0").is_some()).await;
    fleet.stop().await;
}
