//! The installer of `simulated-devices` against the hub's embedded FTP package server (port 0,
//! in-process): happy path, corrupted package, failed self-test, dropped data connection,
//! refused logins, already installed, the session cap and the fault admin API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use iothub_emulator::HubConfig;
use iothub_emulator::ftp::faults::{FaultKind, decide};
use iothub_emulator::ftp::{FaultSettings, FtpConfig};
use iothub_emulator::server::{ListenConfig, RunningHub};
use iothub_emulator_tests::{TestHub, incompressible, unique};
use simulated_devices::InstallReport;
use simulated_devices::install::{
    Credentials, FtpSource, InstallState, Installer, RetryPolicy, tls_trusting,
};
use simulated_devices::package::{self, Manifest, Release};
use tokio::io::AsyncReadExt;

/// Fast retries so fault tests finish quickly.
const FAST_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 8,
    base_backoff: Duration::from_millis(10),
    max_backoff: Duration::from_millis(50),
};

struct Device {
    installer: Installer,
    dir: PathBuf,
}

async fn device(hub: &TestHub) -> Device {
    let id = unique("ftp-dev");
    let key = hub.create_device(&id).await.unwrap();
    let dir = hub.data_dir.join("devices").join(&id);
    let source = FtpSource {
        addr: hub.running.ftp_addr.expect("FTP is on").to_string(),
        device_id: id,
        credentials: Credentials::Key { hostname: hub.hostname(), key },
        step_timeout: Duration::from_secs(10),
        tls: None,
    };
    Device { installer: Installer::new(dir.clone(), source).with_retry(FAST_RETRY), dir }
}

/// An app folder for `version`: a config file, `size` bytes of incompressible data, and a manifest.
fn app(root: &Path, version: &str, self_test: Option<&str>, size: usize) -> (PathBuf, Manifest) {
    let dir = root.join(unique("app-src"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.txt"), format!("version={version}\n")).unwrap();
    std::fs::write(dir.join("blob.bin"), incompressible(size)).unwrap();
    let manifest =
        Manifest { name: "fridge".into(), version: version.into(), self_test: self_test.map(Into::into) };
    (dir, manifest)
}

fn publish(hub: &TestHub, version: &str, self_test: Option<&str>, size: usize) -> Release {
    let (dir, manifest) = app(&hub.data_dir, version, self_test, size);
    package::publish(&dir, Some(&manifest), &hub.running.packages_dir).unwrap()
}

async fn install(d: &Device, release: &Release) -> (simulated_devices::InstallOutcome, Vec<InstallReport>) {
    let mut reports = Vec::new();
    let outcome = d.installer.install(release, |r| reports.push(r)).await;
    (outcome, reports)
}

fn states(reports: &[InstallReport]) -> Vec<&'static str> {
    reports.iter().map(|r| r.state.as_str()).collect()
}

/// A hub, and a device that installed version "1" (published as latest).
async fn hub_with_device_on_v1() -> (TestHub, Device) {
    let hub = TestHub::start().await.unwrap();
    let d = device(&hub).await;
    let v1 = publish(&hub, "1", None, 1000);
    assert_eq!(install(&d, &v1).await.0.state, InstallState::Installed);
    (hub, d)
}

fn set_faults(hub: &TestHub, settings: FaultSettings) {
    hub.running.ftp_faults.set(settings);
}

#[tokio::test]
async fn installs_latest_then_upgrades_keeping_the_previous_release() {
    let hub = TestHub::start().await.unwrap();
    let d = device(&hub).await;
    assert_eq!(d.installer.current_version(), None);
    let v1 = publish(&hub, "1.0.0", None, 1000);
    assert_eq!(d.installer.latest().await.unwrap(), v1, "latest.json names the newest package");
    let (out, reports) = install(&d, &v1).await;
    assert_eq!(out.state, InstallState::Installed, "{out:?}");
    assert_eq!(states(&reports), ["downloading", "verifying", "installing", "installed"]);
    assert_eq!(d.installer.current_version().as_deref(), Some("1.0.0"));

    let v2 = publish(&hub, "2.0.0", Some("grep -q version=2.0.0 config.txt"), 1000);
    assert_eq!(d.installer.latest().await.unwrap(), v2);
    let (out, _) = install(&d, &v2).await;
    assert_eq!(out.state, InstallState::Installed, "{out:?}");
    assert_eq!(out.download_attempts, 1);
    assert_eq!(std::fs::read_link(d.dir.join("current")).unwrap(), Path::new("releases/2.0.0"));
    assert_eq!(std::fs::read_to_string(d.dir.join("current/config.txt")).unwrap(), "version=2.0.0\n");
    assert!(d.dir.join("releases/1.0.0/config.txt").exists(), "the previous release is kept");
    assert!(!d.dir.join("downloads/fridge-2.0.0.tar.gz.part").exists(), "the download is cleaned up");

    let v3 = publish(&hub, "3.0.0", None, 1000);
    assert_eq!(install(&d, &v3).await.0.state, InstallState::Installed);
    assert!(!d.dir.join("releases/1.0.0").exists(), "releases older than the previous are pruned");
    assert!(d.dir.join("releases/2.0.0").exists());
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn installs_over_explicit_ftps_trusting_the_hub_ca() {
    let hub = TestHub::start().await.unwrap();
    let mut d = device(&hub).await;
    let v1 = publish(&hub, "1", None, 50_000);
    let tls = tls_trusting(&hub.running.ca_pem).unwrap();
    let mut source = d.installer.source().clone();
    source.tls = Some((tls.clone(), hub.hostname()));
    d.installer = Installer::new(d.dir.clone(), source.clone()).with_retry(FAST_RETRY);
    let (out, _) = install(&d, &v1).await;
    assert_eq!(out.state, InstallState::Installed, "{out:?}");
    assert_eq!(out.download_attempts, 1);
    // A certificate for another name is refused: the client really verifies.
    source.tls = Some((tls, "not-the-hub.example".into()));
    let other = Installer::new(hub.data_dir.join("other"), source)
        .with_retry(RetryPolicy { max_attempts: 1, ..FAST_RETRY });
    let out = other.install(&v1, |_| {}).await;
    assert_eq!(out.state, InstallState::Failed);
    assert!(out.reason.as_deref().unwrap().contains("AUTH TLS"), "{out:?}");
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn corrupted_package_fails_and_previous_version_stays_current() {
    let (hub, d) = hub_with_device_on_v1().await;
    let v2 = publish(&hub, "2", None, 5000);
    let path = hub.running.packages_dir.join(&v2.file);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let (out, reports) = install(&d, &v2).await;
    assert_eq!(out.state, InstallState::Failed, "{out:?}");
    assert!(out.reason.as_deref().unwrap().contains("sha256 mismatch"), "{out:?}");
    assert_eq!(states(&reports), ["downloading", "verifying", "failed"]);
    assert_eq!(reports.last().unwrap().reason, out.reason);
    assert_eq!(d.installer.current_version().as_deref(), Some("1"));
    assert!(!d.dir.join("releases/2").exists());
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn failed_self_test_rolls_back() {
    let (hub, d) = hub_with_device_on_v1().await;
    let v2 = publish(&hub, "2", Some("echo fridge too warm >&2; exit 3"), 100);
    let (out, reports) = install(&d, &v2).await;
    assert_eq!(out.state, InstallState::RolledBack, "{out:?}");
    let reason = out.reason.unwrap();
    assert!(reason.contains("self-test failed") && reason.contains("fridge too warm"), "{reason}");
    assert_eq!(states(&reports), ["downloading", "verifying", "installing", "rolled-back"]);
    assert_eq!(d.installer.current_version().as_deref(), Some("1"));
    assert!(!d.dir.join("releases/2").exists(), "the failed release is removed");
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn dropped_data_connection_resumes_with_rest() {
    let hub = TestHub::start().await.unwrap();
    let d = device(&hub).await;
    let v1 = publish(&hub, "1", None, 300_000);
    assert!(v1.size > 250_000, "the blob is incompressible: {}", v1.size);
    set_faults(&hub, FaultSettings { drop_after_bytes: Some(100_000), ..FaultSettings::default() });
    let (out, reports) = install(&d, &v1).await;
    assert_eq!(out.state, InstallState::Installed, "{out:?}");
    let expected_attempts = v1.size.div_ceil(100_000) as u32;
    assert_eq!(out.download_attempts, expected_attempts, "every attempt resumes where the last one was cut");
    let retries: Vec<&str> = reports.iter().filter_map(|r| r.reason.as_deref()).collect();
    assert!(retries[0].contains("retrying from byte 100000"), "{retries:?}");
    assert!(retries[1].contains("retrying from byte 200000"), "{retries:?}");
    assert_eq!(d.installer.current_version().as_deref(), Some("1"));
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn refused_logins_are_retried_until_one_succeeds() {
    let hub = TestHub::start().await.unwrap();
    let d = device(&hub).await;
    let v1 = publish(&hub, "1", None, 100);
    // Through the admin API, as a scenario would.
    let resp = hub
        .client
        .put(format!("{}/emulator/ftp/faults", hub.http_url()))
        .json(&serde_json::json!({ "refuseLoginShare": 0.5, "seed": 3 }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Which attempts are refused is a function of the seed, the device and its attempt number.
    let id = d.installer.source().device_id.clone();
    let refused = |attempt| decide(3, &id, attempt, FaultKind::RefuseLogin, 500_000);
    let first_accepted = (0..).find(|&a| !refused(a)).unwrap();
    let (out, reports) = install(&d, &v1).await;
    if first_accepted >= u64::from(FAST_RETRY.max_attempts) {
        assert_eq!(out.state, InstallState::Failed, "every allowed attempt is refused: {out:?}");
        hub.stop().await.unwrap();
        return;
    }
    assert_eq!(out.state, InstallState::Installed, "{out:?}");
    assert_eq!(
        u64::from(out.download_attempts),
        first_accepted + 1,
        "refused until attempt {first_accepted}"
    );
    if first_accepted > 0 {
        assert!(reports[1].reason.as_deref().unwrap().contains("530"), "{reports:?}");
    }
    hub.stop().await.unwrap();
}

/// Opens a plain FTP session, reads the greeting, sends `USER user` and `PASS x`, and returns
/// the replies' codes until the server answers something other than `331` (or closes).
async fn login_codes(addr: std::net::SocketAddr, user: &str) -> Vec<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut s = tokio::io::BufReader::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    let mut greeting = String::new();
    s.read_line(&mut greeting).await.unwrap();
    assert!(greeting.starts_with("220"), "{greeting}");
    let mut codes = Vec::new();
    for cmd in [format!("USER {user}"), "PASS x".to_string()] {
        if s.get_mut().write_all(format!("{cmd}\r\n").as_bytes()).await.is_err() {
            break;
        }
        let mut reply = String::new();
        if s.read_line(&mut reply).await.unwrap_or(0) == 0 {
            break;
        }
        codes.push(reply.get(..3).unwrap_or_default().to_string());
        if !reply.starts_with("331") {
            break;
        }
    }
    codes
}

#[tokio::test]
async fn busy_sessions_get_421_and_follow_the_seed() {
    let hub = TestHub::start().await.unwrap();
    let addr = hub.running.ftp_addr.unwrap();
    set_faults(&hub, FaultSettings { busy_ppm: 1_000_000, ..FaultSettings::default() });
    // The test hub offers FTPS, so the decision taken at USER is answered at PASS, where the
    // server knows this channel is plain: 421, then the session closes.
    assert_eq!(login_codes(addr, "dev-a").await, ["331", "421"]);
    // A share: each user's attempts are turned away exactly as the pure decision says (the
    // others are refused for the bad password, 530).
    set_faults(&hub, FaultSettings { busy_ppm: 500_000, seed: 11, ..FaultSettings::default() });
    let mut busy_seen = 0;
    for attempt in 0..6 {
        for user in ["dev-a", "dev-b"] {
            let busy = decide(11, user, attempt, FaultKind::Busy, 500_000);
            busy_seen += usize::from(busy);
            let want = if busy { ["331", "421"] } else { ["331", "530"] };
            assert_eq!(login_codes(addr, user).await, want, "{user} attempt {attempt}");
        }
    }
    assert!(busy_seen > 0 && busy_seen < 12, "{busy_seen}");
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn already_installed_version_is_not_downloaded_again() {
    let (hub, d) = hub_with_device_on_v1().await;
    let v1 = d.installer.latest().await.unwrap();
    // Any FTP use would now fail: the second install must not need the server.
    set_faults(&hub, FaultSettings { refuse_login_ppm: 1_000_000, ..FaultSettings::default() });
    let (out, reports) = install(&d, &v1).await;
    assert_eq!(out.state, InstallState::AlreadyInstalled);
    assert_eq!(out.download_attempts, 0);
    assert_eq!(states(&reports), ["already-installed"]);
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn wrong_credentials_fail_after_the_retry_budget() {
    let hub = TestHub::start().await.unwrap();
    let id = unique("ftp-dev");
    hub.create_device(&id).await.unwrap();
    let v1 = publish(&hub, "1", None, 100);
    let source = FtpSource {
        addr: hub.running.ftp_addr.unwrap().to_string(),
        device_id: id.clone(),
        credentials: Credentials::Token("SharedAccessSignature sr=x&sig=y&se=1".into()),
        step_timeout: Duration::from_secs(5),
        tls: None,
    };
    let retry = RetryPolicy { max_attempts: 2, ..FAST_RETRY };
    let installer = Installer::new(hub.data_dir.join(&id), source).with_retry(retry);
    let out = installer.install(&v1, |_| {}).await;
    assert_eq!(out.state, InstallState::Failed);
    let reason = out.reason.unwrap();
    assert!(reason.contains("after 2 attempts") && reason.contains("login"), "{reason}");
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn sessions_over_the_cap_get_421() {
    let dir = std::env::temp_dir().join(unique("iothub-ftp-cap"));
    let listen = ListenConfig::ephemeral(std::net::IpAddr::from([127, 0, 0, 1]));
    let ftp = FtpConfig { max_sessions: 1, ..FtpConfig::new(dir.join("packages")) };
    let running = RunningHub::start_with_ftp(HubConfig::default(), &listen, &dir, ftp).await.unwrap();
    let addr = running.ftp_addr.unwrap();
    let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; 3];
    first.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"220");
    let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut reply = String::new();
    second.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("421 "), "{reply}");
    drop(first);
    // Once the first session ends, a new one is served again (poll: the server notices the close).
    let mut served = false;
    for _ in 0..200 {
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut code = [0u8; 3];
        third.read_exact(&mut code).await.unwrap();
        if &code == b"220" {
            served = true;
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(served, "the cap frees up when a session ends");
    running.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn fault_admin_api_reads_validates_and_writes() {
    let hub = TestHub::start().await.unwrap();
    let url = format!("{}/emulator/ftp/faults", hub.http_url());
    let resp = hub.client.put(&url).json(&serde_json::json!({ "refuseLoginShare": 2 })).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["iothub-errorcode"], "ArgumentInvalid");
    let body = serde_json::json!({ "bytesPerSecond": 50000, "dropAfterBytes": 10, "dropTimes": 2 });
    let resp = hub.client.put(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let got: serde_json::Value = hub.client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(got["bytesPerSecond"], 50000);
    assert_eq!(got["dropTimes"], 2);
    assert_eq!(
        hub.running.ftp_faults.settings(),
        FaultSettings {
            bytes_per_second: Some(50000),
            drop_after_bytes: Some(10),
            drop_times: Some(2),
            refuse_login_ppm: 0,
            busy_ppm: 0,
            seed: 0,
        }
    );
    let https = hub.client.get(format!("{}/emulator/ftp/faults", hub.https_url())).send().await.unwrap();
    assert_eq!(https.status(), 404, "admin endpoints are on the plain port only");
    hub.stop().await.unwrap();
}
