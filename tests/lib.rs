//! The end-to-end test harness: start a hub in-process on loopback, talk to it over HTTPS with its
//! CA trusted, sign SAS tokens, and run the official-SDK scripts under `tests/sdk/` against it.
//!
//! Hubs for Rust-client tests bind port 0 on 127.0.0.1. Hubs for the official SDKs need the fixed
//! ports the SDKs dial (443, …), so each gets its own loopback address 127.0.0.N with a certificate
//! for that IP (`--bind 127.0.0.N --hostname 127.0.0.N`), and several can run side by side.

pub mod hostile;
pub mod hub_process;
pub mod sdk_setup;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use iothub_emulator::HubConfig;
use iothub_emulator::sas::make_token;
use iothub_emulator::server::{ListenConfig, RunningHub, ServerError};

/// A hub running for one test, with a client that trusts its CA. Stops and cleans up on drop of
/// [`TestHub::stop`].
pub struct TestHub {
    /// The running hub (its `hub` field gives direct access to state).
    pub running: RunningHub,
    /// The address every listener is bound to.
    pub ip: IpAddr,
    /// Scratch data directory (certificates), removed by [`TestHub::stop`].
    pub data_dir: PathBuf,
    /// An HTTPS client trusting the hub's CA.
    pub client: reqwest::Client,
}

/// A fresh, unique name (device ids, directories).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(unique("iothub-test"));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

fn client_for(ca_pem: &str) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes())?)
        .timeout(Duration::from_secs(30))
        .build()?)
}

impl TestHub {
    /// A hub on 127.0.0.1 with every port picked by the OS, host name `localhost`.
    pub async fn start() -> Result<Self> {
        Self::start_with(HubConfig::default()).await
    }

    /// Like [`TestHub::start`] with a custom hub configuration.
    pub async fn start_with(config: HubConfig) -> Result<Self> {
        Self::start_listening(config, ListenConfig::ephemeral(IpAddr::V4(Ipv4Addr::LOCALHOST))).await
    }

    /// Like [`TestHub::start_with`], serving the plain MQTT port with the task-less drivers
    /// (`--mqtt-plain-driver`, the default), whatever the default becomes.
    pub async fn start_with_mqtt_drivers(config: HubConfig) -> Result<Self> {
        Self::start_with_plain_mqtt(config, true).await
    }

    /// Like [`TestHub::start_with`], serving the plain MQTT port with a task per connection
    /// (`--mqtt-plain-driver=false`).
    pub async fn start_with_mqtt_tasks(config: HubConfig) -> Result<Self> {
        Self::start_with_plain_mqtt(config, false).await
    }

    async fn start_with_plain_mqtt(config: HubConfig, mqtt_plain_driver: bool) -> Result<Self> {
        let listen =
            ListenConfig { mqtt_plain_driver, ..ListenConfig::ephemeral(IpAddr::V4(Ipv4Addr::LOCALHOST)) };
        Self::start_listening(config, listen).await
    }

    /// Like [`TestHub::start_with`] on the listeners of `listen`.
    pub async fn start_listening(config: HubConfig, listen: ListenConfig) -> Result<Self> {
        let ip = listen.bind;
        let data_dir = scratch_dir();
        let running = RunningHub::start(config, &listen, &data_dir).await?;
        let client = client_for(&running.ca_pem)?;
        Ok(Self { running, ip, data_dir, client })
    }

    /// A hub on its own loopback address 127.0.0.N serving the SDKs' fixed ports, with host name
    /// `127.0.0.N`. Tries addresses until one has the ports free.
    pub async fn start_for_sdk() -> Result<Self> {
        Self::start_for_sdk_with(HubConfig::default()).await
    }

    /// Like [`TestHub::start_for_sdk`] with `settings` for every setting but the host name.
    pub async fn start_for_sdk_with(settings: HubConfig) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let base = 10 + (std::process::id() % 50) * 4;
        let mut last_err = None;
        for _ in 0..200 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let ip = IpAddr::V4(Ipv4Addr::new(127, 0, (base + n / 250) as u8 % 255, (2 + n % 250) as u8));
            let config = HubConfig { hostname: ip.to_string(), ..settings.clone() };
            let listen =
                ListenConfig { bind: ip, http_port: 0, ftp_port: Some(0), ..ListenConfig::default() };
            let data_dir = scratch_dir();
            match RunningHub::start(config, &listen, &data_dir).await {
                Ok(running) => {
                    let client = client_for(&running.ca_pem)?;
                    return Ok(Self { running, ip, data_dir, client });
                }
                Err(e @ ServerError::Bind { .. }) => {
                    let _ = std::fs::remove_dir_all(&data_dir);
                    let denied = matches!(&e, ServerError::Bind { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied);
                    if denied {
                        return Err(e.into());
                    }
                    last_err = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last_err.map(Into::into).unwrap_or_else(|| anyhow::anyhow!("no free loopback address")))
    }

    /// The hub's host name.
    pub fn hostname(&self) -> String {
        self.running.hub.hostname().to_string()
    }

    /// `https://host:port` of the REST API.
    pub fn https_url(&self) -> String {
        format!("https://{}:{}", self.ip, self.running.https_addr.port())
    }

    /// `http://ip:port` of the plain port.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.running.http_addr)
    }

    /// A SAS token for policy `policy` (e.g. `iothubowner`), valid for an hour.
    pub fn policy_token(&self, policy: &str) -> String {
        let p = self.running.hub.policies().iter().find(|p| p.name == policy).expect("known policy");
        make_token(&self.hostname(), &p.primary_key, Some(policy), now_secs() + 3600).expect("token")
    }

    /// The `iothubowner` token.
    pub fn owner_token(&self) -> String {
        self.policy_token("iothubowner")
    }

    /// A device token signed with `key`, expiring at `expiry_secs`.
    pub fn device_token_at(&self, device_id: &str, key: &str, expiry_secs: u64) -> String {
        let resource = format!("{}/devices/{device_id}", self.hostname());
        make_token(&resource, key, None, expiry_secs).expect("token")
    }

    /// A device token signed with `key`, valid for an hour.
    pub fn device_token(&self, device_id: &str, key: &str) -> String {
        self.device_token_at(device_id, key, now_secs() + 3600)
    }

    /// Registers `id` over REST and returns its primary key.
    pub async fn create_device(&self, id: &str) -> Result<String> {
        let resp = self
            .client
            .put(format!("{}/devices/{id}?api-version=2021-04-12", self.https_url()))
            .header("authorization", self.owner_token())
            .json(&serde_json::json!({ "deviceId": id }))
            .send()
            .await?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await?;
        if status != 200 {
            bail!("creating {id}: {status} {body}");
        }
        body.pointer("/authentication/symmetricKey/primaryKey")
            .and_then(|k| k.as_str())
            .map(str::to_string)
            .context("no primary key in the response")
    }

    /// Stops the hub and removes its data directory.
    pub async fn stop(self) -> Result<()> {
        self.running.stop().await?;
        let _ = std::fs::remove_dir_all(&self.data_dir);
        Ok(())
    }
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The repository root (where `tests/sdk` lives).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Whether the official-SDK tests must run: yes unless `IOTHUB_SDK_TESTS=skip` (see
/// [`sdk_setup`]); the SDKs install themselves on first use.
pub fn sdk_tests_required() -> bool {
    !sdk_setup::skip_allowed()
}

/// Which official SDK a script uses.
#[derive(Debug, Clone, Copy)]
pub enum Sdk {
    /// `python3 tests/sdk/python/<script>`.
    Python,
    /// `node tests/sdk/node/<script>`.
    Node,
}

fn sdk_missing(sdk: Sdk) -> Option<String> {
    sdk_setup::ensure(sdk).err()
}

/// Runs an official-SDK script against a fresh SDK hub and fails with its output unless it exits 0,
/// or when the SDK cannot be set up or port 443 cannot be bound, unless the user opted out
/// (`IOTHUB_SDK_TESTS=skip`: then it is skipped, loudly, and counted; see [`sdk_setup`]).
pub async fn run_sdk_script(sdk: Sdk, script: &str) -> Result<()> {
    run_sdk_script_with(sdk, script, HubConfig::default()).await
}

/// Like [`run_sdk_script`] against a hub configured with `config` (its host name aside).
pub async fn run_sdk_script_with(sdk: Sdk, script: &str, config: HubConfig) -> Result<()> {
    run_sdk_script_env(sdk, script, config, Vec::new()).await
}

/// Like [`run_sdk_script`] for a Python script that also needs Azure Storage: Azurite's blob
/// service from the Node SDK cache (npm `azurite`, pinned in `tests/sdk/node/package.json`), whose
/// `azurite-blob` binary the script gets as `AZURITE_BLOB` and starts itself.
pub async fn run_sdk_script_with_azurite(script: &str) -> Result<()> {
    let blob = match sdk_setup::ensure(Sdk::Node) {
        Ok(node) => {
            let bin = node.dir.join(".bin").join("azurite-blob");
            if bin.exists() { Ok(bin) } else { Err(format!("npm ci left no {}", bin.display())) }
        }
        Err(why) => Err(why),
    };
    match blob {
        Ok(bin) => {
            let extra = vec![("AZURITE_BLOB", bin.display().to_string())];
            run_sdk_script_env(Sdk::Python, script, HubConfig::default(), extra).await
        }
        Err(why) if sdk_tests_required() => {
            bail!(
                "{script} cannot run: Azurite: {why} (IOTHUB_SDK_TESTS=skip opts out of the official-SDK tests)"
            )
        }
        Err(why) => {
            sdk_setup::note_skip(script, &format!("Azurite: {why}"));
            Ok(())
        }
    }
}

async fn run_sdk_script_env(
    sdk: Sdk,
    script: &str,
    config: HubConfig,
    extra: Vec<(&str, String)>,
) -> Result<()> {
    if let Some(why) = sdk_missing(sdk) {
        if sdk_tests_required() {
            bail!("{script} cannot run: {why} (IOTHUB_SDK_TESTS=skip opts out of the official-SDK tests)");
        }
        sdk_setup::note_skip(script, &why);
        return Ok(());
    }
    let hub = match TestHub::start_for_sdk_with(config).await {
        Ok(h) => h,
        Err(e) => {
            let why = format!(
                "cannot start a hub on the SDKs' fixed ports (443, 5671, 8883 on 127.0.0.N): {e:#}; as a \
                 non-root user run `sudo sysctl -w net.ipv4.ip_unprivileged_port_start=443` once"
            );
            if sdk_tests_required() {
                bail!(
                    "{script} cannot run: {why} (IOTHUB_SDK_TESTS=skip opts out of the official-SDK tests)"
                );
            }
            sdk_setup::note_skip(script, &why);
            return Ok(());
        }
    };
    let result = run_script_extra(&hub, sdk, script, &extra).await;
    hub.stop().await?;
    result
}

/// Like [`run_sdk_script`] for the X.509 device scripts: issues device certificates into
/// `<data dir>/x509` (see [`issue_x509_fixtures`]) and passes the folder as `X509_DIR`.
pub async fn run_sdk_script_x509(sdk: Sdk, script: &str) -> Result<()> {
    if let Some(why) = sdk_missing(sdk) {
        if sdk_tests_required() {
            bail!("IOTHUB_SDK_TESTS=required but {why}");
        }
        eprintln!("skipped {script}: {why}");
        return Ok(());
    }
    let hub = match TestHub::start_for_sdk().await {
        Ok(h) => h,
        Err(e) if !sdk_tests_required() => {
            eprintln!("skipped {script}: cannot start a hub on the SDK ports: {e:#}");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let dir = hub.data_dir.join("x509");
    let result = match issue_x509_fixtures(&dir) {
        Ok(()) => run_script_extra(&hub, sdk, script, &[("X509_DIR", dir.display().to_string())]).await,
        Err(e) => Err(e),
    };
    hub.stop().await?;
    result
}

/// Writes the X.509 test certificates into `dir` as `<name>.pem` and `<name>-key.pem`: `self`
/// (self-signed, CN `x509-self`), `ca` (a test CA), `ca-signed` (CN `x509-ca`, signed by `ca`),
/// `wrong` (another self-signed one, CN `x509-self`) and `rogue` (CN `x509-ca`, signed by a CA
/// nobody trusts).
pub fn issue_x509_fixtures(dir: &Path) -> Result<()> {
    use iothub_emulator::x509::issue;
    std::fs::create_dir_all(dir)?;
    let write = |name: &str, issued: &issue::Issued| -> Result<()> {
        std::fs::write(dir.join(format!("{name}.pem")), &issued.cert_pem)?;
        std::fs::write(dir.join(format!("{name}-key.pem")), &issued.key_pem)?;
        Ok(())
    };
    let ca = issue::test_ca("SDK Test CA", 30)?;
    let untrusted = issue::test_ca("Untrusted CA", 30)?;
    write("self", &issue::self_signed_device("x509-self", 30)?)?;
    write("ca", &ca)?;
    write("ca-signed", &issue::ca_signed_device("x509-ca", &ca.cert_pem, &ca.key_pem, 30)?)?;
    write("wrong", &issue::self_signed_device("x509-self", 30)?)?;
    write("rogue", &issue::ca_signed_device("x509-ca", &untrusted.cert_pem, &untrusted.key_pem, 30)?)?;
    Ok(())
}

async fn run_script_extra(hub: &TestHub, sdk: Sdk, script: &str, extra: &[(&str, String)]) -> Result<()> {
    let ca = hub.running.ca_path.display().to_string();
    let mut env = vec![
        ("IOTHUB_CONNECTION_STRING", hub.running.owner_connection_string()),
        ("IOTHUB_HOSTNAME", hub.hostname()),
        ("IOTHUB_HTTP_URL", hub.http_url()),
        ("IOTHUB_CA_FILE", ca.clone()),
        ("REQUESTS_CA_BUNDLE", ca.clone()),
        ("SSL_CERT_FILE", ca.clone()),
        ("NODE_EXTRA_CA_CERTS", ca),
        ("DPS_ID_SCOPE", hub.running.hub.dps().id_scope().to_string()),
        ("DPS_CONNECTION_STRING", hub.running.hub.dps().service_connection_string(&hub.hostname())),
    ];
    env.extend(extra.iter().cloned());
    run_script_with_env(sdk, script, &env).await
}

/// Runs the official-SDK script `script` with `env` (plus a unique `TEST_DEVICE_PREFIX`) and fails
/// with its output unless it exits 0 within 180 s. The caller provides the hub.
pub async fn run_script_with_env(sdk: Sdk, script: &str, env: &[(&str, String)]) -> Result<()> {
    run_script_args(sdk, script, &[], env, &unique("sdk")).await.map(drop)
}

/// The official Python SDK script `script` in two runs around a SIGKILL of the hub (issue 15):
/// the hub runs as a child process (the real binary) with `--persist` on an SDK loopback address;
/// `script send` runs, the hub is killed with SIGKILL and started again on the same data
/// directory, then `script receive` runs with every `NAME=value` line the first run printed in
/// its environment. Skips and fails like [`run_sdk_script`].
pub async fn run_sdk_script_across_hub_kill(script: &str) -> Result<()> {
    use hub_process::{HubProcess, StartError, hub_binary};
    if let Some(why) = sdk_missing(Sdk::Python) {
        if sdk_tests_required() {
            bail!("{script} cannot run: {why} (IOTHUB_SDK_TESTS=skip opts out of the official-SDK tests)");
        }
        sdk_setup::note_skip(script, &why);
        return Ok(());
    }
    let bin = tokio::task::spawn_blocking(hub_binary).await??;
    let data_dir = scratch_dir();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Addresses apart from the in-process SDK hubs' (`TestHub::start_for_sdk_with`).
    let base = 210 + std::process::id() % 20;
    let mut started = None;
    for _ in 0..100 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, (base + n / 250) as u8, (2 + n % 250) as u8));
        match HubProcess::start(&bin, ip, &data_dir, &["--persist"]).await {
            Ok(hub) => {
                started = Some(hub);
                break;
            }
            Err(StartError::AddressInUse(_)) => continue,
            Err(StartError::Other(e)) => return Err(e),
        }
    }
    let Some(hub) = started else { bail!("no loopback address had the SDK ports free") };
    let ip = hub.ip;
    let prefix = unique("sdk");
    let printed = run_script_args(Sdk::Python, script, &["send"], &hub.script_env(), &prefix).await?;
    hub.kill().await?;
    let hub = match HubProcess::start(&bin, ip, &data_dir, &["--persist"]).await {
        Ok(h) => h,
        Err(StartError::AddressInUse(e)) => bail!("the restarted hub cannot bind {ip} again: {e}"),
        Err(StartError::Other(e)) => return Err(e),
    };
    let mut env = hub.script_env();
    for line in printed.lines() {
        if let Some((k, v)) = line.split_once('=')
            && !k.is_empty()
            && k.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
        {
            env.push((Box::leak(k.to_string().into_boxed_str()), v.to_string()));
        }
    }
    let result = run_script_args(Sdk::Python, script, &["receive"], &env, &prefix).await;
    hub.kill().await?;
    let _ = std::fs::remove_dir_all(&data_dir);
    result.map(drop)
}

/// Runs `script` with `args` and `env` (plus `TEST_DEVICE_PREFIX=prefix`); returns its stdout, or
/// fails with its output unless it exits 0 within 180 s.
async fn run_script_args(
    sdk: Sdk,
    script: &str,
    args: &[&str],
    env: &[(&str, String)],
    prefix: &str,
) -> Result<String> {
    let (program, path) = match sdk {
        Sdk::Python => ("python3", format!("tests/sdk/python/{script}")),
        Sdk::Node => ("node", format!("tests/sdk/node/{script}")),
    };
    let paths = sdk_setup::ensure(sdk).map_err(anyhow::Error::msg)?;
    let child = tokio::process::Command::new(program)
        .arg(&path)
        .args(args)
        .env(paths.var, &paths.dir)
        .current_dir(repo_root())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("TEST_DEVICE_PREFIX", prefix)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {program} {path}"))?;
    let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .with_context(|| format!("{path} did not finish within 180 s"))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("{path} failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}", out.status);
    }
    println!("{stdout}");
    Ok(stdout.into_owned())
}

/// Why `sdk` cannot run here (not installed), if so.
pub fn sdk_unavailable(sdk: Sdk) -> Option<String> {
    sdk_missing(sdk)
}

/// Whether the container tests must run (CI sets `IOTHUB_CONTAINER_TESTS=required`); otherwise a
/// missing Docker or image skips them with a message.
pub fn container_tests_required() -> bool {
    std::env::var("IOTHUB_CONTAINER_TESTS").is_ok_and(|v| v == "required")
}

/// Why containers of `image` cannot be started here (no Docker daemon, or the image was never
/// built), if so.
pub fn container_unavailable(image: &str) -> Option<String> {
    let docker = |args: &[&str]| {
        std::process::Command::new("docker").args(args).stdout(Stdio::null()).stderr(Stdio::piped()).output()
    };
    match docker(&["info"]) {
        Err(e) => return Some(format!("the docker CLI cannot run: {e}")),
        Ok(out) if !out.status.success() => {
            let err = String::from_utf8_lossy(&out.stderr);
            return Some(format!("docker info failed (is dockerd running?): {}", err.trim()));
        }
        Ok(_) => {}
    }
    match docker(&["image", "inspect", image]) {
        Ok(out) if out.status.success() => None,
        _ => Some(format!("the image {image} does not exist (build it with docker/build.sh)")),
    }
}

/// `len` pseudo-random bytes (xorshift, fixed seed): file content that gzip cannot shrink, for
/// packages whose size must be predictable.
pub fn incompressible(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ len as u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
