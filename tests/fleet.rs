//! The simulated fleet end to end (issue #5, point 6): a hub with its FTP package server, agents
//! on the plain MQTT listener installing real packages, the release run, and the power switch.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use iothub_emulator::HubConfig;
use iothub_emulator_tests::{TestHub, unique};
use serde_json::Value;
use simulated_devices::agent::FtpBackend;
use simulated_devices::amqp_client::AmqpEndpoint;
use simulated_devices::fleet::{self, Fleet, FleetConfig, IdPattern, Registration, Shard};
use simulated_devices::notice::UpdateNotice;
use simulated_devices::package::{self, Manifest, Release};
use simulated_devices::release::{ReleaseOptions, notify_devices};
use simulated_devices::service_client::{C2dSend, ServiceClient};

const FLEET_KEY: &str = "ZmxlZXQta2V5LWZvci10aGUtZTJlLXRlc3Rz";
const POLL: Duration = Duration::from_millis(50);

/// A service client for `hub`'s owner policy over HTTPS.
pub(crate) fn service(hub: &TestHub) -> Result<ServiceClient> {
    Ok(ServiceClient::new(
        &hub.running.owner_connection_string(),
        &hub.https_url(),
        Some(&hub.running.ca_pem),
    )?)
}

/// `hub`'s AMQP service endpoint, for releases sent the way a pipeline's service SDK sends them.
pub(crate) fn amqp_endpoint(hub: &TestHub) -> AmqpEndpoint {
    AmqpEndpoint {
        addr: hub.running.amqp_addr,
        server_name: hub.running.hub.hostname().to_string(),
        ca_pem: hub.running.ca_pem.clone(),
    }
}

/// Builds the package for `version` into the hub's FTP directory and points `latest.json` at it.
fn publish(hub: &TestHub, work: &Path, version: &str) -> Result<Release> {
    let src = work.join(format!("src-{version}"));
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("fridge.txt"), format!("fridge firmware {version}\n").repeat(200))?;
    let manifest = Manifest { name: "fridge".into(), version: version.into(), self_test: None };
    Ok(package::publish(&src, Some(&manifest), &hub.running.packages_dir)?)
}

fn fleet_config(
    hub: &TestHub,
    ids: Vec<String>,
    data_root: &Path,
    registration: Registration,
    tls: bool,
) -> Result<FleetConfig> {
    // TLS goes to the hub's host name (its certificate's name); plain TCP to the loopback address.
    let (mqtt_host, mqtt_port, tls) = if tls {
        let config = simulated_devices::agent::tls_config(&hub.running.ca_pem).map_err(anyhow::Error::msg)?;
        (hub.hostname(), hub.running.mqtt_addr.port(), Some(config))
    } else {
        let plain = hub.running.mqtt_plain_addr.context("the test hub has a plain MQTT listener")?;
        (plain.ip().to_string(), plain.port(), None)
    };
    Ok(FleetConfig {
        device_ids: ids,
        fleet_key: FLEET_KEY.into(),
        registration,
        data_root: data_root.to_path_buf(),
        hub_host: hub.hostname(),
        mqtt_host,
        mqtt_port,
        tls,
        keep_alive: Duration::from_secs(60),
        ramp_per_sec: 0,
        max_concurrent_installs: 50,
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(2),
        initial_version: None,
        update_retry: Default::default(),
        x509: None,
    })
}

fn backend(hub: &TestHub) -> Result<Arc<FtpBackend>> {
    let ftp = hub.running.ftp_addr.context("the test hub serves FTP")?;
    Ok(Arc::new(FtpBackend::new(ftp.to_string())))
}

/// Polls `check` until it returns true or `timeout` passes.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        ensure!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// The `installState` telemetry events the hub received from `device_id`, in order.
fn install_events(hub: &TestHub, device_id: &str) -> Vec<Value> {
    hub.running
        .hub
        .read_telemetry(Some(device_id), 0, 1000)
        .iter()
        .filter_map(|m| serde_json::from_slice::<Value>(&m.body).ok())
        .filter(|v| v["event"] == "installState")
        .collect()
}

fn reported(twin: &Value, key: &str) -> Value {
    twin.pointer(&format!("/properties/reported/{key}")).cloned().unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_while_30_percent_are_off_ends_with_every_device_on_v2_installed_once() -> Result<()> {
    const N: usize = 200;
    let hub =
        TestHub::start_with(HubConfig { feedback_batch_interval_ms: 100, ..HubConfig::default() }).await?;
    let work = tempfile::tempdir()?;
    let svc = service(&hub)?;
    let ids = fleet::device_ids(
        &format!("{}-{{n:03}}", unique("fridge")).parse::<IdPattern>()?,
        N as u64,
        Shard::default(),
    );
    fleet::seed(&svc, FLEET_KEY, &ids, 4).await?;
    let fleet = Fleet::start(
        fleet_config(&hub, ids.clone(), work.path(), Registration::Seeded, false)?,
        backend(&hub)?,
    )
    .await;
    ensure!(
        fleet.wait_connected(N, POLL, Duration::from_secs(20)).await,
        "only {} of {N} connected",
        fleet.connected()
    );

    // 30% lose power (every index ending in 0, 1 or 2).
    let off: Vec<usize> = (0..N).filter(|i| i % 10 < 3).collect();
    for &i in &off {
        fleet.set_power(i, false);
    }
    eventually("the switched-off agents to disconnect", Duration::from_secs(10), || async {
        Ok(fleet.connected() == N - off.len())
    })
    .await?;

    let release = publish(&hub, work.path(), "2.0.0")?;
    let notice = UpdateNotice::for_release(&release, &hub.running.ftp_addr.context("ftp")?.to_string());
    let opts = ReleaseOptions {
        timeout: Duration::from_secs(40),
        poll_interval: POLL,
        wait_installed: true,
        amqp: Some(amqp_endpoint(&hub)),
        ..Default::default()
    };
    let run = {
        let (svc, notice) = (svc.clone(), notice.clone());
        tokio::spawn(async move { notify_devices(&svc, &notice, &opts).await })
    };

    let on_v2 = "properties.reported.appVersion = '2.0.0'";
    eventually("the powered agents to install v2", Duration::from_secs(30), || async {
        Ok(svc.device_ids(Some(on_v2)).await?.len() == N - off.len())
    })
    .await?;
    for &i in &off {
        let twin = svc.get_twin(&ids[i]).await?;
        ensure!(reported(&twin, "appVersion").is_null(), "switched-off {} installed: {twin}", ids[i]);
        fleet.set_power(i, true);
    }

    let summary = run.await??;
    ensure!(summary.sent == N && summary.completed == N && summary.not_final == 0, "{summary}");
    ensure!(summary.installed == Some(N), "{summary}");

    for (i, id) in ids.iter().enumerate() {
        let twin = svc.get_twin(id).await?;
        ensure!(reported(&twin, "appVersion") == "2.0.0", "{id}: {twin}");
        ensure!(reported(&twin, "installState") == "installed", "{id}: {twin}");
        ensure!(fleet.installs(i) == 1, "{id} installed {} times", fleet.installs(i));
        let installed: Vec<_> =
            install_events(&hub, id).into_iter().filter(|e| e["installState"] == "installed").collect();
        ensure!(installed.len() == 1 && installed[0]["targetVersion"] == "2.0.0", "{id}: {installed:?}");
        ensure!(installed[0]["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{installed:?}");
        let current =
            std::fs::read_link(simulated_devices::agent::data_dir(work.path(), id).join("current"))?;
        ensure!(current.ends_with("releases/2.0.0"), "{id}: current -> {}", current.display());
    }
    fleet.stop().await;
    hub.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_registered_agents_over_tls_read_latest_skip_the_active_version_and_fail_a_bad_checksum()
-> Result<()> {
    let hub = TestHub::start().await?;
    let work = tempfile::tempdir()?;
    let svc = service(&hub)?;
    let ids =
        fleet::device_ids(&format!("{}-{{n}}", unique("self")).parse::<IdPattern>()?, 2, Shard::default());
    let registration = Registration::SelfRegister(Box::new(svc.clone()));
    let fleet =
        Fleet::start(fleet_config(&hub, ids.clone(), work.path(), registration, true)?, backend(&hub)?).await;
    ensure!(fleet.wait_connected(2, POLL, Duration::from_secs(20)).await, "agents did not connect");
    ensure!(svc.get_device(&ids[0]).await?.is_some(), "the agent registered itself");
    let release = publish(&hub, work.path(), "2.0.0")?;
    let send = |id: &str, body: Vec<u8>| {
        let (svc, id) = (svc.clone(), id.to_string());
        async move {
            let msg = C2dSend { body, message_id: unique("m"), ack: "none", ..C2dSend::default() };
            svc.send_c2d(&id, &msg).await
        }
    };
    let twin_state = |id: String| {
        let svc = svc.clone();
        async move {
            let twin = svc.get_twin(&id).await?;
            Ok::<_, anyhow::Error>((reported(&twin, "appVersion"), reported(&twin, "installState")))
        }
    };

    // Plain text, like the seed's pipeline: the agent reads latest.json and installs it.
    send(&ids[0], b"new firmware available".to_vec()).await?;
    eventually("device 0 to install latest", Duration::from_secs(20), || async {
        Ok(twin_state(ids[0].clone()).await? == ("2.0.0".into(), "installed".into()))
    })
    .await?;

    // The same version again: no reinstall, reported as already-installed.
    let notice = UpdateNotice::for_release(&release, &hub.running.ftp_addr.context("ftp")?.to_string());
    send(&ids[0], serde_json::to_vec(&notice)?).await?;
    eventually("device 0 to report already-installed", Duration::from_secs(20), || async {
        Ok(twin_state(ids[0].clone()).await? == ("2.0.0".into(), "already-installed".into()))
    })
    .await?;
    ensure!(fleet.installs(0) == 1, "device 0 reinstalled");

    // A notice whose sha256 does not match the package: failed, nothing switched.
    let bad = UpdateNotice { sha256: "0".repeat(64), ..notice };
    send(&ids[1], serde_json::to_vec(&bad)?).await?;
    eventually("device 1 to report failed", Duration::from_secs(20), || async {
        Ok(twin_state(ids[1].clone()).await? == (Value::Null, "failed".into()))
    })
    .await?;
    let events = install_events(&hub, &ids[1]);
    let failed = events.last().context("device 1 sent events")?;
    ensure!(failed["installState"] == "failed", "{events:?}");
    ensure!(
        failed["reason"].as_str().is_some_and(|r| r.contains("sha256")),
        "the reason names the check: {failed}"
    );
    ensure!(events.iter().any(|e| e["installState"] == "verifying"), "transitions reported: {events:?}");
    let dir = simulated_devices::agent::data_dir(work.path(), &ids[1]);
    ensure!(std::fs::symlink_metadata(dir.join("current")).is_err(), "no version was switched in");
    ensure!(fleet.installs(1) == 0, "device 1 counted an install");

    fleet.stop().await;
    hub.stop().await
}

/// `--registration dps`: the agents provision through the hub's DPS with keys derived from the
/// enrollment group's key, then connect to the hub with them and get the group's twin; a key
/// from the wrong group is refused at registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dps_fleet_provisions_through_an_enrollment_group_and_connects() -> Result<()> {
    let hub = TestHub::start().await?;
    let work = tempfile::tempdir()?;
    let svc = service(&hub)?;
    svc.put_enrollment_group("fleet", FLEET_KEY).await?;
    let id_scope = hub.running.hub.dps().id_scope().to_string();
    let ids =
        fleet::device_ids(&format!("{}-{{n}}", unique("dps")).parse::<IdPattern>()?, 3, Shard::default());
    let registration = Registration::Dps { service: Box::new(svc.clone()), id_scope: id_scope.clone() };
    let fleet =
        Fleet::start(fleet_config(&hub, ids.clone(), work.path(), registration, true)?, backend(&hub)?).await;
    ensure!(fleet.wait_connected(3, POLL, Duration::from_secs(20)).await, "DPS agents did not connect");
    let key = iothub_emulator::dps::derive_device_key(FLEET_KEY, &ids[0])?;
    let identity = svc.get_device(&ids[0]).await?.context("DPS created the device")?;
    ensure!(identity.primary_key == key, "the device holds the DPS-derived key");
    let other_key =
        iothub_emulator::dps::derive_device_key("b3RoZXIta2V5LW90aGVyLWtleS1vdGhlcg==", "stranger")?;
    ensure!(svc.dps_register(&id_scope, "stranger", &other_key).await.is_err(), "a foreign key was refused");
    fleet.stop().await;
    hub.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_mid_download_resumes_from_the_saved_command_and_installs_once() -> Result<()> {
    use iothub_emulator::ftp::FaultSettings;
    let hub = TestHub::start().await?;
    let work = tempfile::tempdir()?;
    let svc = service(&hub)?;
    let ids =
        fleet::device_ids(&format!("{}-{{n}}", unique("cut")).parse::<IdPattern>()?, 1, Shard::default());
    fleet::seed(&svc, FLEET_KEY, &ids, 1).await?;
    let fleet = Fleet::start(
        fleet_config(&hub, ids.clone(), work.path(), Registration::Seeded, false)?,
        backend(&hub)?,
    )
    .await;
    ensure!(fleet.wait_connected(1, POLL, Duration::from_secs(20)).await, "the agent did not connect");

    // A package that does not compress (so it stays ~48 KB) served at 16 KB/s: ~3 s to download.
    let src = work.path().join("src-cut");
    std::fs::create_dir_all(&src)?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: Vec<u8> = (0..48 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(src.join("firmware.bin"), noise)?;
    let manifest = Manifest { name: "fridge".into(), version: "2.0.0".into(), self_test: None };
    let release = package::publish(&src, Some(&manifest), &hub.running.packages_dir)?;
    hub.running
        .ftp_faults
        .set(FaultSettings { bytes_per_second: Some(16 * 1024), ..FaultSettings::default() });

    let notice = UpdateNotice::for_release(&release, &hub.running.ftp_addr.context("ftp")?.to_string());
    let msg = C2dSend {
        body: serde_json::to_vec(&notice)?,
        message_id: unique("m"),
        ack: "none",
        ..C2dSend::default()
    };
    svc.send_c2d(&ids[0], &msg).await?;
    eventually("the download to start", Duration::from_secs(20), || async {
        Ok(reported(&svc.get_twin(&ids[0]).await?, "installState") == "downloading")
    })
    .await?;

    // Power cut: the message was already completed at the hub (PUBACK), so only the command saved
    // on disk can bring the install back.
    fleet.set_power(0, false);
    eventually("the agent to go offline", Duration::from_secs(10), || async { Ok(fleet.connected() == 0) })
        .await?;
    let dir = simulated_devices::agent::data_dir(work.path(), &ids[0]);
    ensure!(dir.join("pending-c2d").exists(), "the command was saved before the PUBACK");
    ensure!(std::fs::symlink_metadata(dir.join("current")).is_err(), "nothing was switched in yet");
    ensure!(hub.running.hub.receive_c2d(&ids[0], 1_000)?.is_none(), "the hub no longer holds the message");

    hub.running.ftp_faults.set(FaultSettings::default());
    fleet.set_power(0, true);
    eventually("the install to finish after power-on", Duration::from_secs(20), || async {
        let twin = svc.get_twin(&ids[0]).await?;
        Ok(reported(&twin, "appVersion") == "2.0.0" && reported(&twin, "installState") == "installed")
    })
    .await?;
    ensure!(fleet.installs(0) == 1, "installed {} times", fleet.installs(0));
    let installed =
        install_events(&hub, &ids[0]).into_iter().filter(|e| e["installState"] == "installed").count();
    ensure!(installed == 1, "{installed} installed events");
    eventually("the saved command to be cleared", Duration::from_secs(5), || async {
        Ok(!dir.join("pending-c2d").exists())
    })
    .await?;
    fleet.stop().await;
    hub.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_x509_fleet_connects_with_ca_signed_certificates_and_installs_a_release_over_ftp() -> Result<()> {
    const N: usize = 6;
    let hub =
        TestHub::start_with(HubConfig { feedback_batch_interval_ms: 100, ..HubConfig::default() }).await?;
    let work = tempfile::tempdir()?;
    let svc = service(&hub)?;
    let ids = fleet::device_ids(
        &format!("{}-{{n}}", unique("x509")).parse::<IdPattern>()?,
        N as u64,
        Shard::default(),
    );
    fleet::seed_ca_signed(&svc, &ids, 2).await?;
    let ca = iothub_emulator::x509::issue::test_ca("Fleet Test CA", 30)?;
    // The CA route is the plain port's (an emulator extension).
    let plain = ServiceClient::new(&hub.running.owner_connection_string(), &hub.http_url(), None)?;
    plain.trust_x509_ca(&ca.cert_pem).await?;
    let x509 = fleet::FleetX509 {
        ca_cert_pem: ca.cert_pem.clone(),
        ca_key_pem: ca.key_pem.clone(),
        hub_ca_pem: hub.running.ca_pem.clone(),
        ftp_policy: Arc::new(svc.policy().context("owner policy")?),
    };
    let cfg = FleetConfig {
        x509: Some(Arc::new(x509)),
        ..fleet_config(&hub, ids.clone(), work.path(), Registration::Seeded, true)?
    };
    let fleet = Fleet::start(cfg, backend(&hub)?).await;
    ensure!(
        fleet.wait_connected(N, POLL, Duration::from_secs(20)).await,
        "only {} of {N} connected",
        fleet.connected()
    );
    let device = svc.get_twin(&ids[0]).await?;
    ensure!(device["authenticationType"] == "certificateAuthority", "{device}");
    ensure!(device["connectionState"] == "Connected", "{device}");

    let release = publish(&hub, work.path(), "3.0.0")?;
    let notice = UpdateNotice::for_release(&release, &hub.running.ftp_addr.context("ftp")?.to_string());
    let opts = ReleaseOptions {
        timeout: Duration::from_secs(30),
        poll_interval: POLL,
        wait_installed: true,
        amqp: Some(amqp_endpoint(&hub)),
        ..Default::default()
    };
    let summary = notify_devices(&svc, &notice, &opts).await?;
    ensure!(summary.completed == N && summary.installed == Some(N), "{summary}");
    for (i, id) in ids.iter().enumerate() {
        let twin = svc.get_twin(id).await?;
        ensure!(reported(&twin, "appVersion") == "3.0.0", "{id}: {twin}");
        ensure!(fleet.installs(i) == 1, "{id} installed {} times", fleet.installs(i));
    }
    fleet.stop().await;
    hub.stop().await
}
