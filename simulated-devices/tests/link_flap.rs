//! Link flaps against a real hub (plain MQTT and FTP on 127.0.0.1, ports 0): a device whose link
//! drops without DISCONNECT reconnects by itself; a C2D message delivered but never acknowledged is
//! delivered again, recognised as a duplicate and not installed twice; a download whose FTP
//! connections are cut resumes where it stopped.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use iothub_emulator::HubConfig;
use iothub_emulator::c2d::{AckMode, C2dMessage};
use iothub_emulator::ftp::FaultSettings;
use iothub_emulator::server::{ListenConfig, RunningHub};
use serde_json::Value;
use simulated_devices::agent::FtpBackend;
use simulated_devices::fleet::{self, Fleet, FleetConfig, Registration};
use simulated_devices::install::{Credentials, FtpSource};
use simulated_devices::notice::UpdateNotice;
use simulated_devices::package::{self, Manifest, Release};
use simulated_devices::service_client::ServiceClient;

const FLEET_KEY: &str = "bGluay1mbGFwLXRlc3RzLWZsZWV0LWtleQ==";
const POLL: Duration = Duration::from_millis(20);

struct Setup {
    hub: RunningHub,
    work: tempfile::TempDir,
    ids: Vec<String>,
}

async fn start(devices: usize) -> Setup {
    let work = tempfile::tempdir().unwrap();
    let config = HubConfig { feedback_batch_interval_ms: 100, ..HubConfig::default() };
    let hub =
        RunningHub::start(config, &ListenConfig::ephemeral(IpAddr::V4(Ipv4Addr::LOCALHOST)), work.path())
            .await
            .unwrap();
    let ids: Vec<String> = (0..devices).map(|i| format!("flap-{i}")).collect();
    let svc = ServiceClient::new(
        &hub.owner_connection_string(),
        &format!("https://127.0.0.1:{}", hub.https_addr.port()),
        Some(&hub.ca_pem),
    )
    .unwrap();
    fleet::seed(&svc, FLEET_KEY, &ids, 1).await.unwrap();
    Setup { hub, work, ids }
}

impl Setup {
    async fn fleet(&self) -> Fleet {
        let plain = self.hub.mqtt_plain_addr.unwrap();
        let cfg = FleetConfig {
            device_ids: self.ids.clone(),
            fleet_key: FLEET_KEY.into(),
            registration: Registration::Seeded,
            data_root: self.work.path().join("devices"),
            hub_host: self.hub.hub.hostname().to_string(),
            mqtt_host: plain.ip().to_string(),
            mqtt_port: plain.port(),
            tls: None,
            keep_alive: Duration::from_secs(60),
            ramp_per_sec: 0,
            max_concurrent_installs: 10,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(200),
            initial_version: None,
            update_retry: Default::default(),
            x509: None,
        };
        let fleet =
            Fleet::start(cfg, Arc::new(FtpBackend::new(self.hub.ftp_addr.unwrap().to_string()))).await;
        assert!(fleet.wait_connected(self.ids.len(), POLL, Duration::from_secs(20)).await);
        fleet
    }

    /// A package of `size` bytes of noise (so it does not compress) for `version`.
    fn publish(&self, version: &str, size: usize) -> Release {
        let src = self.work.path().join(format!("src-{version}"));
        std::fs::create_dir_all(&src).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let noise: Vec<u8> = (0..size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(src.join("firmware.bin"), noise).unwrap();
        let manifest = Manifest { name: "app".into(), version: version.into(), self_test: None };
        package::publish(&src, Some(&manifest), &self.hub.packages_dir).unwrap()
    }

    fn notify(&self, device: usize, release: &Release, message_id: &str) {
        let notice = UpdateNotice::for_release(release, &self.hub.ftp_addr.unwrap().to_string());
        let msg = C2dMessage {
            message_id: Some(message_id.into()),
            ack: AckMode::Full,
            body: serde_json::to_vec(&notice).unwrap().into(),
            ..C2dMessage::default()
        };
        self.hub.hub.send_c2d(&self.ids[device], msg).unwrap();
    }

    /// `installState` values the device reported by telemetry, in order.
    fn states(&self, device: usize) -> Vec<String> {
        self.hub
            .hub
            .read_telemetry(Some(&self.ids[device]), 0, 1000)
            .iter()
            .filter_map(|m| serde_json::from_slice::<Value>(&m.body).ok())
            .filter(|v| v["event"] == "installState")
            .map(|v| v["installState"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Feedback status codes received so far.
    fn feedback(&self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(d) = self.hub.hub.receive_feedback() {
            let records: Vec<Value> = serde_json::from_slice(&d.message.body).unwrap();
            out.extend(records.iter().map(|r| r["statusCode"].as_str().unwrap_or_default().to_string()));
            self.hub.hub.settle_feedback(d.lock_token, false).unwrap();
        }
        out
    }
}

async fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_whose_puback_was_lost_is_redelivered_once_and_installed_once() {
    let s = start(2).await;
    let fleet = s.fleet().await;
    let release = s.publish("2.0.0", 8 * 1024);
    fleet.drop_link_before_next_ack(0);
    s.notify(0, &release, "notice-0");
    s.notify(1, &release, "notice-1");

    eventually("both devices to install", Duration::from_secs(20), || {
        fleet.installs(0) + fleet.installs(1) == 2
    })
    .await;
    eventually("device 0 to reconnect", Duration::from_secs(10), || fleet.connected() == 2).await;
    assert_eq!(fleet.link_drops(0), 1, "device 0's link dropped once");
    assert_eq!(fleet.link_drops(1), 0);
    // The hub got no PUBACK for the first delivery: it delivers the notice again after the
    // reconnect (which may still be on its way when the agent reports itself connected), and the
    // agent recognises it.
    eventually("the notice to be delivered again", Duration::from_secs(10), || {
        fleet.duplicate_deliveries(0) >= 1
    })
    .await;
    let mut feedback = Vec::new();
    eventually("the feedback for both notices", Duration::from_secs(10), || {
        feedback.extend(s.feedback());
        feedback.len() >= 2
    })
    .await;
    assert_eq!(fleet.duplicate_deliveries(0), 1, "delivered again once, not more");
    assert_eq!(fleet.duplicate_deliveries(1), 0);
    assert_eq!(feedback, ["Success", "Success"], "the redelivery was completed, nothing dead-lettered");
    assert!(s.hub.hub.receive_c2d(&s.ids[0], 1000).unwrap().is_none(), "nothing left in the queue");
    let installed = s.states(0).iter().filter(|st| *st == "installed").count();
    assert_eq!(installed, 1, "{:?}", s.states(0));
    assert!(!s.states(0).iter().any(|st| st == "already-installed"), "{:?}", s.states(0));
    fleet.stop().await;
    s.hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_flap_during_a_download_cuts_ftp_and_the_install_finishes_once() {
    let s = start(1).await;
    let fleet = s.fleet().await;
    let release = s.publish("2.0.0", 96 * 1024);
    // 48 KiB/s: the download takes about two seconds, long enough to cut it midway.
    s.hub.ftp_faults.set(FaultSettings { bytes_per_second: Some(48 * 1024), ..FaultSettings::default() });
    s.notify(0, &release, "notice");
    eventually("the download to start", Duration::from_secs(10), || {
        s.states(0).last().is_some_and(|st| st == "downloading")
    })
    .await;
    fleet.flap_link(0, true);
    eventually("the link drop", Duration::from_secs(5), || fleet.link_drops(0) == 1).await;
    eventually("the install", Duration::from_secs(20), || fleet.installs(0) == 1).await;
    eventually("the reconnect", Duration::from_secs(10), || fleet.connected() == 1).await;
    eventually("the installed report", Duration::from_secs(10), || {
        s.states(0).last().is_some_and(|st| st == "installed")
    })
    .await;
    let states = s.states(0);
    assert_eq!(states.iter().filter(|st| *st == "installed").count(), 1, "{states:?}");
    assert_eq!(fleet.duplicate_deliveries(0), 0, "the notice was acknowledged before the flap");
    fleet.stop().await;
    s.hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_download_resumes_from_the_bytes_it_kept() {
    let s = start(1).await;
    let release = s.publish("3.0.0", 64 * 1024);
    s.hub.ftp_faults.set(FaultSettings { bytes_per_second: Some(64 * 1024), ..FaultSettings::default() });
    let token = simulated_devices::agent::contract::password(
        s.hub.hub.hostname(),
        &s.ids[0],
        &fleet::device_key(FLEET_KEY, &s.ids[0]),
        u64::MAX / 2,
    )
    .unwrap();
    let source = FtpSource {
        addr: s.hub.ftp_addr.unwrap().to_string(),
        device_id: s.ids[0].clone(),
        credentials: Credentials::Token(token),
        step_timeout: Duration::from_secs(10),
        tls: None,
    };
    let dest = s.work.path().join("download.part");
    // The link drops once the first bytes are on disk.
    let watched = dest.clone();
    let cut = async move {
        while std::fs::metadata(&watched).map_or(0, |m| m.len()) == 0 {
            tokio::time::sleep(POLL).await;
        }
    };
    let (kept, err) = source.download_until(&release.file, &dest, 0, cut).await.unwrap_err();
    assert!(err.message.contains("link dropped"), "{err}");
    assert!(kept > 0 && kept < release.size, "kept {kept} of {} bytes", release.size);
    s.hub.ftp_faults.set(FaultSettings::default());
    let size = source.download(&release.file, &dest, kept).await.unwrap();
    assert_eq!(size, release.size);
    let (sha, _) = package::sha256_file(&dest).unwrap();
    assert_eq!(sha, release.sha256, "the resumed file is the package");
    s.hub.stop().await.unwrap();
}
