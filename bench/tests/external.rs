//! `testbench run` against a hub it did not start: the test starts a hub (every listener on port 0),
//! then runs the real binary with `--hub-connection-string` and the port overrides, once with the
//! runner's own fleet and once with `--fleet-external` while the test runs the fleet as two
//! library shards (what `fleet run --shard i/2` processes do). Both must meet every expectation of
//! the quickstart scenario.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use iothub_emulator::HubConfig;
use iothub_emulator::server::{ListenConfig, RunningHub};
use serde_json::Value;
use simulated_devices::agent::{FtpBackend, tls_config};
use simulated_devices::fleet::{self, Fleet, FleetConfig, IdPattern, Registration, Shard};
use simulated_devices::service_client::ServiceClient;

/// Devices in each run (quickstart scaled down).
const DEVICES: u64 = 20;
/// The secret the test's own fleet shards derive device keys from.
const SHARD_KEY: &str = "ZXh0ZXJuYWwtZmxlZXQtdGVzdC1rZXktMDEyMzQ1Njc=";

fn quickstart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/quickstart.toml")
}

/// A hub on 127.0.0.1 with every port picked by the OS and 1 s feedback batches (quickstart's).
async fn start_hub(data: &Path) -> RunningHub {
    let config = HubConfig { feedback_batch_interval_ms: 1000, ..HubConfig::default() };
    let listen = ListenConfig::ephemeral(IpAddr::V4(Ipv4Addr::LOCALHOST));
    RunningHub::start(config, &listen, data).await.expect("the hub starts")
}

/// The flags that point `testbench run` at `hub` (its host name is `localhost`: a name, not an IP).
fn hub_flags(hub: &RunningHub) -> Vec<String> {
    vec![
        "--hub-connection-string".into(),
        hub.owner_connection_string(),
        "--hub-ca".into(),
        hub.ca_path.display().to_string(),
        "--hub-http-url".into(),
        format!("http://127.0.0.1:{}", hub.http_addr.port()),
        "--packages-dir".into(),
        hub.packages_dir.display().to_string(),
        "--hub-amqp-port".into(),
        hub.amqp_addr.port().to_string(),
        "--hub-mqtt-port".into(),
        hub.mqtt_addr.port().to_string(),
        "--hub-ftp-port".into(),
        hub.ftp_addr.expect("the hub serves FTP").port().to_string(),
    ]
}

/// `testbench run FILE --out OUT ARGS` without any external-hub settings from the environment.
async fn testbench(file: &Path, out: &Path, args: &[String]) -> (std::process::ExitStatus, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_testbench"));
    cmd.arg("run").arg(file).arg("--out").arg(out).args(args).kill_on_drop(true);
    for var in [
        "CONNECTION_STRING",
        "CA_FILE",
        "HTTP_URL",
        "PACKAGES_DIR",
        "HUB_AMQP_PORT",
        "HUB_MQTT_PORT",
        "HUB_FTP_PORT",
        "FLEET_EXTERNAL",
    ] {
        cmd.env_remove(format!("IOTHUB_EMULATOR_{var}"));
    }
    let o = cmd.output().await.expect("testbench runs");
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    eprintln!("{text}");
    (o.status, text)
}

/// Runs the binary on quickstart at [`DEVICES`] devices with `extra` flags; returns its output and
/// the report.
async fn run_testbench(out: &Path, extra: &[String]) -> (String, Value) {
    let mut args = vec!["--devices".to_string(), DEVICES.to_string()];
    args.extend_from_slice(extra);
    let (status, text) = testbench(&quickstart(), out, &args).await;
    assert!(status.success(), "{text}");
    let report = serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json"))
        .expect("report.json is JSON");
    (text, report)
}

fn assert_all_installed(text: &str, r: &Value) {
    assert!(text.contains("verdict: every expectation met"), "{text}");
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(r["devices"], DEVICES, "{r}");
    assert_eq!(r["feedback"]["success"], DEVICES, "{r}");
    assert_eq!(r["releases"][0]["reported"], DEVICES, "{r}");
    assert_eq!(r["latency"]["endToEnd"]["count"], DEVICES, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_passes_against_an_external_hub_with_the_runners_own_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(&dir.path().join("hub")).await;
    let (text, r) = run_testbench(&dir.path().join("out"), &hub_flags(&hub)).await;
    assert_all_installed(&text, &r);
    // The runner's devices live in the external hub's registry and report the release there.
    let twin = hub.hub.get_twin("fridge-07").expect("the runner registered fridge-07");
    assert_eq!(twin.pointer("/properties/reported/appVersion"), Some(&Value::from("2.0.0")));
    // The reports link the external hub's dashboard, which shows the run's status, finished.
    let dashboard = format!("http://127.0.0.1:{}/dashboard", hub.http_addr.port());
    assert!(text.contains(&format!("dashboard: {dashboard}")), "{text}");
    assert_eq!(r["dashboardUrl"], dashboard.as_str(), "{r}");
    let html = std::fs::read_to_string(dir.path().join("out/report.html")).expect("report.html");
    assert!(html.contains(&format!("<a href=\"{dashboard}\">")), "the HTML report links the dashboard");
    let status = hub.hub.scenario_status().expect("the runner published its status to the hub");
    assert_eq!(
        (status["name"].as_str(), status["finished"].as_bool()),
        (Some("quickstart"), Some(true)),
        "{status}"
    );
    assert_eq!(status["devices"], DEVICES, "{status}");
    assert!(status["timeline"].as_array().is_some_and(|t| t.iter().all(|e| e["done"] == true)), "{status}");
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_passes_with_a_fleet_run_by_two_other_shards() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(&dir.path().join("hub")).await;
    // What `fleet run --count 20 --id-pattern 'fridge-{n:02}' --shard i/2 --initial-version 1.0.0
    // --registration seed --mqtt-host localhost` does in two processes: MQTT over TLS at the host
    // name, FTP at localhost:port.
    let svc = ServiceClient::new(
        &hub.owner_connection_string(),
        &format!("http://127.0.0.1:{}", hub.http_addr.port()),
        Some(&hub.ca_pem),
    )
    .unwrap();
    let pattern: IdPattern = "fridge-{n:02}".parse().unwrap();
    let tls = tls_config(&hub.ca_pem).unwrap();
    let ftp = format!("localhost:{}", hub.ftp_addr.unwrap().port());
    let mut shards = Vec::new();
    for index in 0..2 {
        let ids = fleet::device_ids(&pattern, DEVICES, Shard { index, count: 2 });
        fleet::seed(&svc, SHARD_KEY, &ids, 2).await.unwrap();
        let cfg = FleetConfig {
            device_ids: ids,
            fleet_key: SHARD_KEY.into(),
            registration: Registration::Seeded,
            data_root: dir.path().join(format!("shard-{index}")),
            hub_host: "localhost".into(),
            mqtt_host: "localhost".into(),
            mqtt_port: hub.mqtt_addr.port(),
            tls: Some(tls.clone()),
            keep_alive: Duration::from_secs(60),
            ramp_per_sec: 0,
            max_concurrent_installs: 20,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            initial_version: Some("1.0.0".into()),
            update_retry: Default::default(),
            x509: None,
        };
        shards.push(Fleet::start(cfg, Arc::new(FtpBackend::new(ftp.clone()))).await);
    }
    // `--initial-version`: before any install the shards' twins report the scenario's version.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let twin = svc.get_twin("fridge-19").await.unwrap();
        if twin.pointer("/properties/reported/appVersion") == Some(&Value::from("1.0.0")) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "fridge-19 never reported 1.0.0: {twin}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut flags = hub_flags(&hub);
    flags.push("--fleet-external".into());
    let (text, r) = run_testbench(&dir.path().join("out"), &flags).await;
    assert_all_installed(&text, &r);
    assert!(text.contains("external fleet: all 20 devices connected"), "{text}");
    // The shards' agents did the installs, exactly once each.
    let installs: u32 = shards.iter().flat_map(|f| (0..f.len()).map(|i| f.installs(i))).sum();
    assert_eq!(installs, DEVICES as u32);
    for f in shards {
        f.stop().await;
    }
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_fleet_that_never_connects_fails_the_run_naming_fleet_mode() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(&dir.path().join("hub")).await;
    let file = dir.path().join("lonely.toml");
    std::fs::write(
        &file,
        "time_limit = \"1s\"\n[fleet]\ndevices = 3\nid_pattern = \"lonely-{n}\"\nmode = \"external\"\n",
    )
    .unwrap();
    let (status, text) = testbench(&file, &dir.path().join("out"), &hub_flags(&hub)).await;
    assert!(!status.success(), "{text}");
    assert!(
        text.contains(
            "fleet.mode: only 0 of the 3 devices (lonely-0 .. lonely-2) were connected within time_limit"
        ),
        "{text}"
    );
    assert!(text.contains("--id-pattern 'lonely-{n:01}'"), "{text}");
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn offline_events_are_refused_with_an_external_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("off.toml");
    std::fs::write(
        &file,
        "[fleet]\ndevices = 2\n[[event]]\nat = \"1s\"\naction = \"offline\"\nshare = 0.5\nduration = \"1s\"\n",
    )
    .unwrap();
    let flags: Vec<String> =
        ["--hub-connection-string", "HostName=h;SharedAccessKeyName=iothubowner;SharedAccessKey=a2V5"]
            .into_iter()
            .chain(["--hub-ca", "ca.pem", "--hub-http-url", "http://h:8080", "--fleet-external"])
            .map(String::from)
            .collect();
    let (status, text) = testbench(&file, &dir.path().join("out"), &flags).await;
    assert!(!status.success(), "{text}");
    assert!(text.contains("event[0].action: 'offline' switches devices"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_whose_ttl_passes_while_devices_are_off_expires_at_the_external_hub() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(&dir.path().join("hub")).await;
    let file = dir.path().join("ttl.toml");
    std::fs::write(
        &file,
        r#"
name = "ttl"
time_limit = "60s"
[fleet]
devices = 2
id_pattern = "ttl-{n}"
[[package]]
version = "2.0.0"
size = "4KiB"
[[event]]
at = "0s"
action = "offline"
share = 1
duration = "3s"
[[event]]
at = "500ms"
action = "release"
version = "2.0.0"
ttl = "1s"
[expect]
final_version = "1.0.0"
expired = 2
[expect.feedback]
expired = 2
success = 0
"#,
    )
    .unwrap();
    let out = dir.path().join("out");
    let (status, text) = testbench(&file, &out, &hub_flags(&hub)).await;
    assert!(status.success(), "{text}");
    let twin = hub.hub.get_twin("ttl-0").unwrap();
    assert_eq!(twin.pointer("/properties/reported/appVersion"), Some(&Value::from("1.0.0")), "{twin}");
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_processes_reach_an_external_hub_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(&dir.path().join("hub")).await;
    let file = dir.path().join("sharded.toml");
    std::fs::write(
        &file,
        r#"
name = "sharded"
time_limit = "60s"
[fleet]
devices = 4
shards = 2
id_pattern = "sh-{n}"
[[package]]
version = "2.0.0"
size = "4KiB"
[[event]]
at = "500ms"
action = "release"
version = "2.0.0"
[expect]
final_version = "2.0.0"
no_duplicate_installs = true
[expect.feedback]
success = 4
"#,
    )
    .unwrap();
    let (status, text) = testbench(&file, &dir.path().join("out"), &hub_flags(&hub)).await;
    assert!(status.success(), "{text}");
    assert!(text.contains("fleet: 4 devices in 2 shard processes"), "{text}");
    hub.stop().await.unwrap();
}
