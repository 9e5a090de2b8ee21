//! The `run` and `release` subcommands: flags (each with an `IOTHUB_EMULATOR_*` twin), their
//! validation, and the calls into the library.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use iothub_emulator::hub::DEFAULT_OWNER_KEY;
use simulated_devices::agent::{FtpBackend, tls_config};
use simulated_devices::amqp_client::AmqpEndpoint;
use simulated_devices::fleet::{
    self, Fleet, FleetConfig, FleetX509, IdPattern, Registration, Shard, UpdateRetry,
};
use simulated_devices::notice::UpdateNotice;
use simulated_devices::package;
use simulated_devices::release::{ReleaseOptions, notify_devices};
use simulated_devices::service_client::ServiceClient;
use tokio_util::sync::CancellationToken;

use super::Source;

/// The emulator's well-known owner connection string (host `localhost`).
fn default_connection_string() -> String {
    format!("HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey={DEFAULT_OWNER_KEY}")
}

/// How to reach the hub's service API.
#[derive(Debug, clap::Args)]
pub struct ServiceArgs {
    /// Service connection string (a policy with registry read/write and service connect).
    /// Default: the emulator's well-known iothubowner string for host `localhost`.
    #[arg(long, env = "IOTHUB_EMULATOR_CONNECTION_STRING")]
    connection_string: Option<String>,
    /// Where REST calls go: the emulator's HTTPS (`https://localhost:443`) or plain HTTP port.
    #[arg(long, env = "IOTHUB_EMULATOR_SERVICE_ENDPOINT", default_value = "http://127.0.0.1:8080")]
    service_endpoint: String,
    /// The hub's CA certificate (PEM), trusted for HTTPS and MQTT over TLS.
    #[arg(long, env = "IOTHUB_EMULATOR_CA_FILE", default_value = "./.iothub-emulator/certs/ca.pem")]
    ca_file: PathBuf,
}

impl ServiceArgs {
    fn ca_pem(&self) -> Result<Option<String>> {
        match std::fs::read_to_string(&self.ca_file) {
            Ok(pem) => Ok(Some(pem)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading --ca-file {}", self.ca_file.display())),
        }
    }

    fn client(&self) -> Result<ServiceClient> {
        let cs = self.connection_string.clone().unwrap_or_else(default_connection_string);
        Ok(ServiceClient::new(&cs, &self.service_endpoint, self.ca_pem()?.as_deref())?)
    }
}

/// `fleet run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    service: ServiceArgs,
    /// Devices in the whole fleet (all shards together).
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_COUNT", default_value_t = 100)]
    count: u64,
    /// Device ids: `{n}` is the device's index, `{n:0W}` zero-pads it to W digits. To run a
    /// scenario's devices, use its `fleet.id_pattern` with `{n:0W}`, W = the digits of
    /// `fleet.devices - 1` (e.g. `fridge-{n:02}` for 100 devices).
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_ID_PATTERN", default_value = "fridge-{n:05}")]
    id_pattern: String,
    /// The version a device reports (`appVersion`) before its first install, like a factory image;
    /// a scenario's `fleet.initial_version`. Without it a fresh device reports no version.
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_INITIAL_VERSION")]
    initial_version: Option<String>,
    /// The slice this process runs, `i/n`: devices whose index k has k % n == i.
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_SHARD", default_value = "0/1")]
    shard: String,
    /// The secret every device key derives from (HMAC-SHA256 of the device id).
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_KEY", default_value = DEFAULT_OWNER_KEY)]
    fleet_key: String,
    /// How devices get identities: `seed` registers this shard in bulk first (POST /devices);
    /// `self` makes each agent register itself if missing; `dps` creates the enrollment group
    /// `fleet` (symmetric key = --fleet-key; needs the iothubowner connection string) and each
    /// agent provisions itself through the emulator's DPS over HTTPS with its derived key;
    /// `none` assumes they exist.
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_REGISTRATION", default_value = "seed", value_parser = ["seed", "self", "dps", "none"])]
    registration: String,
    /// The DPS ID scope for --registration dps (the hub prints it at startup as DPS_ID_SCOPE).
    #[arg(long, env = "IOTHUB_EMULATOR_DPS_ID_SCOPE")]
    dps_id_scope: Option<String>,
    /// Per-device data directories (releases, `current`) go under here.
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_DATA_DIR", default_value = "./.fleet")]
    data_dir: PathBuf,
    /// MQTT host.
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_MQTT_HOST", default_value = "127.0.0.1")]
    mqtt_host: String,
    /// MQTT port: 8883 is TLS; with --mqtt-plain, the emulator's --mqtt-plain-port.
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_MQTT_PORT", default_value_t = 8883)]
    mqtt_port: u16,
    /// Connect without TLS (the emulator's plain listener; use it for large fleets).
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_MQTT_PLAIN")]
    mqtt_plain: bool,
    /// The FTP package server, host:port.
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_FTP_ADDR", default_value = "127.0.0.1:2121")]
    ftp_addr: String,
    /// Download over explicit FTPS (AUTH TLS) trusting --ca-file, so SAS tokens are not sent in clear.
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_FTPS")]
    ftps: bool,
    /// Agents started per second (the connection ramp); 0 starts all at once.
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_RAMP_PER_SEC", default_value_t = 500)]
    ramp_per_sec: u32,
    /// Installs (FTP sessions) at once across this process.
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_MAX_CONCURRENT_INSTALLS", default_value_t = 200)]
    max_concurrent_installs: usize,
    /// MQTT keep-alive in seconds.
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_KEEP_ALIVE_SECS", default_value_t = 240)]
    keep_alive_secs: u64,
    /// Seconds between status lines.
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_STATUS_SECS", default_value_t = 5)]
    status_secs: u64,
    /// Every device checks latest.json once per this period (e.g. `10m`; spread evenly over the
    /// fleet) and installs the version it names unless that is already active. Off by default.
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_CHECK_EVERY", value_parser = parse_period)]
    check_every: Option<Duration>,
    /// After a failed install, check latest.json again whenever the MQTT session comes back
    /// (`true` or `false`).
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_RETRY_ON_RECONNECT", default_value_t = true, action = clap::ArgAction::Set)]
    retry_on_reconnect: bool,
    /// How devices authenticate: `sas` (derived keys) or `x509` (certificateAuthority devices,
    /// each with a certificate from the fleet CA in --x509-ca-dir, which is created if missing and
    /// given to the hub through POST /emulator/x509-cas: --service-endpoint must be the plain port).
    /// x509 needs TLS and --registration seed.
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_AUTH", default_value = "sas", value_parser = ["sas", "x509"])]
    auth: String,
    /// The fleet CA for --auth x509: ca.pem and ca-key.pem (as `iothub-emulator cert ca` writes
    /// them). Default: <data-dir>/x509-ca.
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_X509_CA_DIR")]
    x509_ca_dir: Option<PathBuf>,
}

/// The fleet CA in `dir` (`ca.pem`, `ca-key.pem`), created there if missing.
fn fleet_ca(dir: &std::path::Path) -> Result<(String, String)> {
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    if !cert_path.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca = iothub_emulator::x509::issue::test_ca("Simulated Fleet CA", 3650)?;
        std::fs::write(&key_path, &ca.key_pem).with_context(|| format!("writing {}", key_path.display()))?;
        std::fs::write(&cert_path, &ca.cert_pem)
            .with_context(|| format!("writing {}", cert_path.display()))?;
        eprintln!("created the fleet CA {}", cert_path.display());
    }
    let read =
        |p: &std::path::Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    Ok((read(&cert_path)?, read(&key_path)?))
}

/// A `--check-every` period: a humantime duration (`30s`, `10m`, `1h`) above zero.
fn parse_period(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("the period must be above zero (leave the flag out for no periodic check)".into()),
        Err(e) => Err(format!("'{s}' is not a duration like 30s, 10m or 1h: {e}")),
    }
}

/// `fleet release`.
#[derive(Debug, clap::Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    service: ServiceArgs,
    #[command(flatten)]
    source: Source,
    /// The hub's FTP packages directory (the emulator's --packages-dir).
    #[arg(long, env = "IOTHUB_EMULATOR_PACKAGES_DIR", default_value = "./.iothub-emulator/packages")]
    packages_dir: PathBuf,
    /// The FTP server as devices reach it (host:port), for the notice's URL.
    #[arg(long, env = "IOTHUB_EMULATOR_FLEET_FTP_ADDR", default_value = "127.0.0.1:2121")]
    ftp_addr: String,
    /// Only devices matching this query condition, e.g. "tags.site = 'lab'".
    #[arg(long = "where", env = "IOTHUB_EMULATOR_RELEASE_WHERE")]
    where_clause: Option<String>,
    /// How long to wait for feedback (and installs) in seconds.
    #[arg(long, env = "IOTHUB_EMULATOR_RELEASE_TIMEOUT_SECS", default_value_t = 300)]
    timeout_secs: u64,
    /// Also wait until every targeted twin reports the new appVersion.
    #[arg(long, env = "IOTHUB_EMULATOR_RELEASE_WAIT_INSTALLED")]
    wait_installed: bool,
    /// Print the summary as JSON.
    #[arg(long, env = "IOTHUB_EMULATOR_RELEASE_JSON")]
    json: bool,
    /// How notices are sent and feedback read: `amqp` (the service SDKs' protocol, TLS trusting
    /// --ca-file) or `rest` (the emulator's HTTP extension, for hubs without AMQP).
    #[arg(long, env = "IOTHUB_EMULATOR_RELEASE_VIA", default_value = "amqp", value_parser = ["amqp", "rest"])]
    via: String,
    /// The hub's AMQP port (host:port) for --via amqp; the TLS name checked is the connection
    /// string's HostName.
    #[arg(long, env = "IOTHUB_EMULATOR_RELEASE_AMQP_ADDR", default_value = "127.0.0.1:5671")]
    amqp_addr: String,
    /// Notices in flight at once.
    #[arg(long, env = "IOTHUB_EMULATOR_RELEASE_SEND_CONCURRENCY", default_value_t = 64)]
    send_concurrency: usize,
}

/// Resident memory of this process in bytes (Linux `/proc/self/status`), if known.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs the fleet until a signal.
pub async fn run(a: RunArgs) -> Result<()> {
    let shard: Shard = a.shard.parse()?;
    let pattern: IdPattern = a.id_pattern.parse()?;
    let ids = fleet::device_ids(&pattern, a.count, shard);
    if ids.is_empty() {
        bail!("shard {} of a {}-device fleet has no devices", a.shard, a.count);
    }
    let service = a.service.client()?;
    let hub_host = service.hub_host().to_string();
    let x509 = a.auth == "x509";
    if x509 && (a.mqtt_plain || a.registration != "seed") {
        bail!("--auth x509 needs TLS (no --mqtt-plain) and --registration seed");
    }
    let ca = || {
        a.service
            .ca_pem()?
            .with_context(|| format!("TLS needs --ca-file ({} not found)", a.service.ca_file.display()))
    };
    let x509 = if x509 {
        let (ca_cert_pem, ca_key_pem) =
            fleet_ca(&a.x509_ca_dir.clone().unwrap_or_else(|| a.data_dir.join("x509-ca")))?;
        service.trust_x509_ca(&ca_cert_pem).await.context(
            "giving the fleet CA to the hub (POST /emulator/x509-cas on --service-endpoint, the plain port)",
        )?;
        let ftp_policy = Arc::new(service.policy().context("the connection string has no policy key")?);
        Some(Arc::new(FleetX509 { ca_cert_pem, ca_key_pem, hub_ca_pem: ca()?, ftp_policy }))
    } else {
        None
    };
    let registration = match a.registration.as_str() {
        "seed" if x509.is_some() => {
            let t = Instant::now();
            fleet::seed_ca_signed(&service, &ids, 8).await?;
            eprintln!("seeded {} X.509 devices in {:.1} s", ids.len(), t.elapsed().as_secs_f64());
            Registration::Seeded
        }
        "seed" => {
            let t = Instant::now();
            fleet::seed(&service, &a.fleet_key, &ids, 8).await?;
            eprintln!("seeded {} devices in {:.1} s", ids.len(), t.elapsed().as_secs_f64());
            Registration::Seeded
        }
        "self" => Registration::SelfRegister(Box::new(service)),
        "dps" => {
            let id_scope = a.dps_id_scope.clone().context("--registration dps needs --dps-id-scope")?;
            service
                .put_enrollment_group("fleet", &a.fleet_key)
                .await
                .context("creating the DPS enrollment group 'fleet'")?;
            Registration::Dps { service: Box::new(service), id_scope }
        }
        _ => Registration::Seeded,
    };
    let mut backend = FtpBackend::new(a.ftp_addr.clone());
    if a.ftps {
        backend.tls = Some((tls_config(&ca()?).map_err(anyhow::Error::msg)?, hub_host.clone()));
    }
    let tls = if a.mqtt_plain { None } else { Some(tls_config(&ca()?).map_err(anyhow::Error::msg)?) };
    let n = ids.len();
    let cfg = FleetConfig {
        device_ids: ids,
        fleet_key: a.fleet_key.clone(),
        registration,
        data_root: a.data_dir.clone(),
        hub_host,
        mqtt_host: a.mqtt_host.clone(),
        mqtt_port: a.mqtt_port,
        tls,
        keep_alive: Duration::from_secs(a.keep_alive_secs),
        ramp_per_sec: a.ramp_per_sec,
        max_concurrent_installs: a.max_concurrent_installs,
        backoff_min: Duration::from_millis(500),
        backoff_max: Duration::from_secs(30),
        initial_version: a.initial_version.clone(),
        update_retry: UpdateRetry { on_reconnect: a.retry_on_reconnect, check_every: a.check_every },
        x509,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(iothub_emulator::server::shutdown_on_signal(shutdown.clone()));
    let started = Instant::now();
    let fleet = Fleet::start(cfg, Arc::new(backend)).await;
    eprintln!("started {n} agents (shard {}) in {:.1} s", a.shard, started.elapsed().as_secs_f64());
    let mut all_connected_reported = false;
    let mut tick = tokio::time::interval(Duration::from_secs(a.status_secs.max(1)));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let connected = fleet.connected();
        let installs: u64 = (0..n).map(|i| u64::from(fleet.installs(i))).sum();
        let rss = rss_bytes().unwrap_or(0);
        eprintln!(
            "connected {connected}/{n}, installs {installs}, RSS {:.1} MiB ({:.1} KiB per agent)",
            rss as f64 / 1048576.0,
            rss as f64 / 1024.0 / n as f64
        );
        if connected == n && !all_connected_reported {
            all_connected_reported = true;
            eprintln!("all {n} connected after {:.1} s", started.elapsed().as_secs_f64());
        }
    }
    fleet.stop().await;
    Ok(())
}

/// Publishes the package, notifies the devices and prints the summary. Exits non-zero when some
/// notice did not end completed (or, with --wait-installed, some device did not install).
pub async fn release(a: ReleaseArgs) -> Result<()> {
    let service = a.service.client()?;
    let release = package::publish(&a.source.dir, a.source.manifest().as_ref(), &a.packages_dir)
        .with_context(|| {
            format!("publishing {} into {}", a.source.dir.display(), a.packages_dir.display())
        })?;
    eprintln!(
        "published {} {} ({} bytes, sha256 {})",
        release.file, release.version, release.size, release.sha256
    );
    let notice = UpdateNotice::for_release(&release, &a.ftp_addr);
    let amqp = match a.via.as_str() {
        "amqp" => {
            let addr = tokio::net::lookup_host(&a.amqp_addr)
                .await
                .ok()
                .and_then(|mut addrs| addrs.next())
                .with_context(|| format!("--amqp-addr {} does not resolve", a.amqp_addr))?;
            let ca_pem = a.service.ca_pem()?.with_context(|| {
                format!("AMQP needs --ca-file ({} not found); or use --via rest", a.service.ca_file.display())
            })?;
            Some(AmqpEndpoint { addr, server_name: service.hub_host().to_string(), ca_pem })
        }
        _ => None,
    };
    let opts = ReleaseOptions {
        where_clause: a.where_clause.clone(),
        timeout: Duration::from_secs(a.timeout_secs),
        wait_installed: a.wait_installed,
        send_concurrency: a.send_concurrency,
        amqp,
        ..ReleaseOptions::default()
    };
    let summary = notify_devices(&service, &notice, &opts).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{summary}");
    }
    let installed_ok = !a.wait_installed || summary.installed == Some(summary.targeted);
    if summary.completed != summary.targeted || !installed_ok {
        bail!("not every device took the release");
    }
    Ok(())
}
