//! `iothub-emulator`: parses flags, binds the listeners, prepares certificates and runs the hub
//! until Ctrl-C or SIGTERM. `iothub-emulator healthcheck` instead asks a running hub's `/health`
//! (for container health checks), `iothub-emulator token` prints a SAS token for curl users, and
//! `iothub-emulator monitor` prints telemetry as it arrives.
//! Everything else lives in the library.

/// mimalloc instead of glibc's malloc. A C2D message is allocated on the thread that receives the
/// send and freed on the one serving the device's connection; glibc's per-thread caches then run
/// dry on one side and fill on the other, and malloc/free were 10-12% of the hub's CPU in the
/// fan-out bench. With mimalloc (per-thread heaps that take remote frees back cheaply) the hub
/// uses 14% less CPU a message there, with the same memory per connection (`bench/README.md`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use iothub_emulator::ftp::{self, FtpConfig};
use iothub_emulator::hub::{DEFAULT_OWNER_KEY, EventsConfig, HubConfig, events};
use iothub_emulator::limits::{
    DEFAULT_AMQP_PORT, DEFAULT_FTP_PORT, DEFAULT_HTTP_PORT, DEFAULT_HTTPS_PORT, DEFAULT_MQTT_PORT,
    FTP_DEFAULT_MAX_SESSIONS, SAS_DEFAULT_SKEW_SECS,
};
use iothub_emulator::server::{self, ListenConfig, RunningHub};
use iothub_emulator::throttle::{Sku, Tier};

/// A local Azure IoT Hub emulator: registry, SAS auth, C2D queues and twins over IoT Hub's own
/// protocols, with TLS from a CA it generates.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    /// The hub's host name: HostName in connection strings, SAS audiences and a certificate SAN.
    #[arg(long, env = "IOTHUB_EMULATOR_HOSTNAME", default_value = "localhost", global = true)]
    hostname: String,

    /// Another name the TLS certificate covers (repeatable; the env twin is comma-separated): a DNS
    /// name or IP address clients dial besides --hostname, localhost, 127.0.0.1 and ::1.
    #[arg(long = "tls-san", env = "IOTHUB_EMULATOR_TLS_SANS", value_delimiter = ',', value_parser = iothub_emulator::tls::parse_tls_name)]
    tls_sans: Vec<String>,

    /// Where the emulator keeps its certificates (`certs/`) and, by default, FTP packages (`packages/`).
    #[arg(long, env = "IOTHUB_EMULATOR_DATA_DIR", default_value = "./.iothub-emulator")]
    data_dir: PathBuf,

    /// Address every listener binds (use 0.0.0.0 in containers).
    #[arg(long, env = "IOTHUB_EMULATOR_BIND", default_value = "127.0.0.1", global = true)]
    bind: IpAddr,

    /// HTTPS port: IoT Hub's REST API for services and devices (the SDKs dial 443). 0 picks a free one.
    #[arg(long, env = "IOTHUB_EMULATOR_HTTPS_PORT", default_value_t = DEFAULT_HTTPS_PORT)]
    https_port: u16,

    /// Plain HTTP port: health, CA download, telemetry read-out, the dashboard (/dashboard) and the same REST API for curl. 0 picks a free one.
    #[arg(long, env = "IOTHUB_EMULATOR_HTTP_PORT", default_value_t = DEFAULT_HTTP_PORT, global = true)]
    http_port: u16,

    /// MQTT over TLS port for devices (the SDKs dial 8883). 0 picks a free one.
    #[arg(long, env = "IOTHUB_EMULATOR_MQTT_PORT", default_value_t = DEFAULT_MQTT_PORT)]
    mqtt_port: u16,

    /// MQTT over plain TCP port for load tests on loopback (IoT Hub has none). Off unless given; 0 picks a free one.
    #[arg(long, env = "IOTHUB_EMULATOR_MQTT_PLAIN_PORT")]
    mqtt_plain_port: Option<u16>,

    /// Serve the plain MQTT port's connections with a few task-less drivers over epoll (true, the
    /// default) or with a task each (false): the drivers take less CPU and memory per connection
    /// (see bench/README.md). With --persist or --tier every connection has a task.
    #[arg(
        long,
        env = "IOTHUB_EMULATOR_MQTT_PLAIN_DRIVER",
        value_name = "BOOL",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    mqtt_plain_driver: bool,

    /// Threads that run the hub's connections and background work. Default: one less than the
    /// machine's cores, at least one: the hub is local and shares the machine with the devices and
    /// tests that use it, and on 2 cores one thread delivers C2D messages with less CPU each than
    /// two (no state passed between cores; see bench/README.md, "One worker thread").
    #[arg(long, env = "IOTHUB_EMULATOR_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,

    /// AMQP-over-TLS port: the service SDKs' C2D sends and feedback (they dial 5671). 0 picks a free one.
    #[arg(long, env = "IOTHUB_EMULATOR_AMQP_PORT", default_value_t = DEFAULT_AMQP_PORT)]
    amqp_port: u16,

    /// AMQP over plain TCP port for load tests on loopback (IoT Hub has none). Off unless given; 0 picks a free one.
    #[arg(long, env = "IOTHUB_EMULATOR_AMQP_PLAIN_PORT")]
    amqp_plain_port: Option<u16>,

    /// FTP package server port (devices download packages here). 0 picks a free one.
    #[arg(long, env = "IOTHUB_EMULATOR_FTP_PORT", default_value_t = DEFAULT_FTP_PORT)]
    ftp_port: u16,

    /// Turns the FTP package server off.
    #[arg(long, env = "IOTHUB_EMULATOR_NO_FTP")]
    no_ftp: bool,

    /// Ports the FTP server may use for passive data connections, LOW-HIGH.
    #[arg(long, env = "IOTHUB_EMULATOR_FTP_PASSIVE_PORTS", default_value = "49152-65535", value_parser = ftp::parse_port_range)]
    ftp_passive_ports: RangeInclusive<u16>,

    /// Concurrent FTP sessions at most; more are refused with 421 (devices retry).
    #[arg(long, env = "IOTHUB_EMULATOR_FTP_MAX_SESSIONS", default_value_t = FTP_DEFAULT_MAX_SESSIONS)]
    ftp_max_sessions: usize,

    /// The directory the FTP server serves (read-only): packages and latest.json. Default: <data-dir>/packages.
    #[arg(long, env = "IOTHUB_EMULATOR_PACKAGES_DIR")]
    packages_dir: Option<PathBuf>,

    /// The iothubowner primary key (base64). Defaults to the published development key.
    #[arg(long, env = "IOTHUB_EMULATOR_OWNER_KEY", default_value = DEFAULT_OWNER_KEY, hide_default_value = true, global = true)]
    owner_key: String,

    /// Seconds of clock skew tolerated on SAS token expiry.
    #[arg(long, env = "IOTHUB_EMULATOR_SAS_SKEW_SECS", default_value_t = SAS_DEFAULT_SKEW_SECS)]
    sas_skew_secs: u64,

    /// Turns off the plain port's /emulator/* routes (telemetry read-out, connection strings with
    /// the owner key, FTP fault knobs, the dashboard and its data): they answer 404. /health and
    /// /ca.pem stay.
    #[arg(long, env = "IOTHUB_EMULATOR_DISABLE_ADMIN_API")]
    disable_admin_api: bool,

    /// Feedback batch interval in milliseconds (IoT Hub: 15000).
    #[arg(long, env = "IOTHUB_EMULATOR_FEEDBACK_INTERVAL_MS", default_value_t = iothub_emulator::limits::FEEDBACK_BATCH_INTERVAL_MS)]
    feedback_interval_ms: u64,

    /// Enforce this IoT Hub tier's operation throttles and daily message quota: F1, S1, S2 or S3.
    /// Off unless given (no limits).
    #[arg(long, env = "IOTHUB_EMULATOR_TIER", value_parser = clap::builder::ValueParser::new(parse_sku))]
    tier: Option<Sku>,

    /// Units of --tier (F1: 1; S1, S2: 1 to 200; S3: 1 to 10).
    #[arg(long, env = "IOTHUB_EMULATOR_UNITS", default_value_t = 1, requires = "tier")]
    units: u32,

    /// A PEM file of CA certificates that certificateAuthority devices' chains may lead to
    /// (repeatable; the env twin is comma-separated). More can be added at runtime with
    /// POST /emulator/x509-cas. `iothub-emulator cert ca` makes one.
    #[arg(long = "x509-ca", env = "IOTHUB_EMULATOR_X509_CAS", value_delimiter = ',')]
    x509_cas: Vec<PathBuf>,
    /// Partitions of the built-in Event Hub-compatible endpoint (2 to 32; a device's messages all
    /// go to one, chosen from its id).
    #[arg(long, env = "IOTHUB_EMULATOR_PARTITIONS", default_value_t = events::DEFAULT_PARTITIONS as u16,
          value_parser = clap::value_parser!(u16).range(events::MIN_PARTITIONS as i64..=events::MAX_PARTITIONS as i64))]
    partitions: u16,

    /// How long telemetry stays readable on the built-in endpoint (a duration: 1day, 2h, 90s).
    #[arg(long, env = "IOTHUB_EMULATOR_EVENT_RETENTION", default_value = "1day", value_parser = parse_retention)]
    event_retention: Duration,

    /// Memory the telemetry log may use, in MiB, before its oldest records are dropped (at least 1).
    #[arg(long, env = "IOTHUB_EMULATOR_EVENT_MEMORY_MIB", default_value_t = (events::DEFAULT_MEMORY_BUDGET_BYTES / (1024 * 1024)) as u32,
          value_parser = clap::value_parser!(u32).range(1..=1024 * 1024))]
    event_memory_mib: u32,

    /// A consumer group to create at startup besides $Default (repeatable; the env twin is
    /// comma-separated). More can be created at runtime through /emulator/consumer-groups.
    #[arg(long = "consumer-group", env = "IOTHUB_EMULATOR_CONSUMER_GROUPS", value_delimiter = ',', value_parser = parse_consumer_group)]
    consumer_groups: Vec<String>,

    /// Keep the hub's state (registry, twins, C2D queues, feedback, jobs) under <data-dir>/state/: a
    /// change answered with success survives kill -9 of the hub. Off: everything is in memory.
    #[arg(long, env = "IOTHUB_EMULATOR_PERSIST")]
    persist: bool,

    /// With --persist, also fdatasync each group of changes before answering: survives a power
    /// cut too, at a few milliseconds per group.
    #[arg(long, env = "IOTHUB_EMULATOR_PERSIST_SYNC", requires = "persist")]
    persist_sync: bool,

    /// The Device Provisioning Service's ID scope devices name (`0ne` + 8 hex digits is DPS's
    /// form; any 1..=64 letters, digits or '-' are accepted). Generated when not given.
    #[arg(long, env = "IOTHUB_EMULATOR_DPS_ID_SCOPE", value_parser = parse_id_scope)]
    dps_id_scope: Option<String>,
}

fn parse_retention(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration such as 1day or 2h: {e}"))?;
    if d.as_millis() == 0 {
        return Err("the retention must be longer than zero".into());
    }
    Ok(d)
}

fn parse_consumer_group(s: &str) -> Result<String, String> {
    events::validate_consumer_group_name(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

fn parse_id_scope(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        Ok(s.to_string())
    } else {
        Err(format!("'{s}' is not an ID scope: 1 to 64 letters, digits or '-'"))
    }
}

fn parse_sku(s: &str) -> Result<Sku, String> {
    s.parse().map_err(|e: iothub_emulator::throttle::TierError| e.to_string())
}

impl Args {
    /// The tier to throttle at, validated against its unit range; a bad combination ends the
    /// process with clap's usage error (exit code 2).
    fn tier(&self) -> Option<Tier> {
        let sku = self.tier?;
        match Tier::new(sku, self.units) {
            Ok(t) => Some(t),
            Err(e) => {
                use clap::CommandFactory;
                Args::command().error(clap::error::ErrorKind::ValueValidation, format!("--units: {e}")).exit()
            }
        }
    }
}

/// What to do instead of running a hub.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Asks the hub at --bind (loopback when 0.0.0.0) and --http-port for GET /health: exits 0 when
    /// it answers healthy, 1 with a one-line reason otherwise (a container HEALTHCHECK).
    Healthcheck {
        /// How long the whole check may take, in milliseconds.
        #[arg(long, env = "IOTHUB_EMULATOR_HEALTHCHECK_TIMEOUT_MS", default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Prints a SAS token (the `Authorization` header value) for curl and other HTTP clients: for a
    /// shared access policy of the hub at --hostname with --owner-key (default iothubowner), or
    /// for a connection string (a device's, say). Needs no running hub.
    Token {
        /// The policy: iothubowner, service, device, registryRead or registryReadWrite.
        #[arg(long, default_value = iothub_emulator::sas::OWNER_POLICY, conflicts_with = "connection_string")]
        policy: String,
        /// Sign for this connection string instead (device, module or service).
        #[arg(long)]
        connection_string: Option<String>,
        /// How long the token is valid, in seconds.
        #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
        ttl_secs: u64,
    },
    /// Prints device telemetry as it arrives, like `az iot hub monitor-events`: one JSON object per
    /// message, from the hub at --bind (loopback when 0.0.0.0) and --http-port (its admin API).
    Monitor {
        /// Only this device's messages.
        #[arg(long, short = 'd')]
        device: Option<String>,
        /// Also print system and application properties and IoT Hub's annotations.
        #[arg(long)]
        properties: bool,
        /// Start with everything the hub still retains instead of only what arrives from now on.
        #[arg(long)]
        from_start: bool,
        /// Stop after this many seconds (default: until stopped).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        timeout_secs: Option<u64>,
        /// Stop after this many messages.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        max_events: Option<u64>,
    },
    /// Issues test certificates for X.509 devices as PEM files: a local test CA (give it to the
    /// hub with --x509-ca), and device certificates, CA-signed or self-signed. Needs no running hub.
    Cert {
        #[command(subcommand)]
        what: CertCommand,
    },
}

/// What `iothub-emulator cert` issues.
#[derive(Debug, clap::Subcommand)]
enum CertCommand {
    /// A test CA: writes <out>/ca.pem and <out>/ca-key.pem.
    Ca {
        /// The directory to write to (created if missing).
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "IoT Hub Emulator Test Device CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// A device certificate with CN=<device-id>: writes <out>/<device-id>.pem and
    /// <out>/<device-id>-key.pem and prints its thumbprints. Signed by the CA in --ca-dir
    /// (a certificateAuthority device), or self-signed without it (a selfSigned device: register
    /// the printed thumbprint).
    Device {
        /// The device id (the certificate's subject CN).
        device_id: String,
        /// The directory to write to (created if missing).
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// A directory holding ca.pem and ca-key.pem (from `cert ca`) to sign with.
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = iothub_emulator::x509::issue::DEFAULT_VALIDITY_DAYS)]
        days: i64,
    },
}

fn main() -> Result<ExitCode> {
    let started = Instant::now();
    let args = Args::parse();
    let tier = args.tier();
    match &args.command {
        Some(Command::Healthcheck { timeout_ms }) => {
            return Ok(healthcheck(args.bind, args.http_port, *timeout_ms));
        }
        Some(Command::Token { policy, connection_string, ttl_secs }) => {
            let expiry =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
                    + ttl_secs;
            println!("{}", token(&args, policy, connection_string.as_deref(), expiry)?);
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::Cert { what }) => {
            cert(what)?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::Monitor { device, properties, from_start, timeout_secs, max_events }) => {
            let options = iothub_emulator::monitor::MonitorOptions {
                device: device.clone(),
                properties: *properties,
                from_start: *from_start,
                timeout: timeout_secs.map(Duration::from_secs),
                max_events: *max_events,
            };
            let addr = iothub_emulator::healthcheck::probe_addr(args.bind, args.http_port);
            let started = || match &options.device {
                Some(d) => eprintln!(
                    "Starting event monitor on http://{addr}, filtering on device: {d}, use ctrl-c to stop..."
                ),
                None => eprintln!("Starting event monitor on http://{addr}, use ctrl-c to stop..."),
            };
            iothub_emulator::monitor::run(addr, &options, &mut std::io::stdout().lock(), started)?;
            return Ok(ExitCode::SUCCESS);
        }
        None => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,libunftp=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: container logs (docker logs, compose) stay plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    iothub_emulator::sas::decode_key(&args.owner_key)
        .map_err(|e| anyhow::anyhow!("--owner-key is not a usable key: {e} (base64 of 16 to 64 bytes)"))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = args.worker_threads.map_or_else(|| default_worker_threads(cores), usize::from);
    tracing::info!(workers, cores, "runtime worker threads");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .event_interval(iothub_emulator::server::RUNTIME_EVENT_INTERVAL)
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(args, tier, started))?;
    Ok(ExitCode::SUCCESS)
}

/// The hub's worker threads when `--worker-threads` is not given: one core is left to the devices
/// and tests beside it.
fn default_worker_threads(cores: usize) -> usize {
    cores.saturating_sub(1).max(1)
}

/// `iothub-emulator token`: a token for `connection_string`, or for `policy` of this hub.
fn token(args: &Args, policy: &str, connection_string: Option<&str>, expiry: u64) -> Result<String> {
    use iothub_emulator::sas::{ConnectionString, default_policies, make_token};
    if let Some(cs) = connection_string {
        let cs: ConnectionString = cs.parse().context("--connection-string")?;
        cs.validate().context("--connection-string")?;
        return cs.token(expiry).context("--connection-string");
    }
    iothub_emulator::sas::decode_key(&args.owner_key)
        .map_err(|e| anyhow::anyhow!("--owner-key is not a usable key: {e} (base64 of 16 to 64 bytes)"))?;
    let policies = default_policies(&args.owner_key);
    let Some(found) = policies.iter().find(|p| p.name.eq_ignore_ascii_case(policy)) else {
        let names: Vec<&str> = policies.iter().map(|p| p.name.as_str()).collect();
        anyhow::bail!("--policy {policy:?} is not one of this hub's policies: {}", names.join(", "));
    };
    Ok(make_token(&args.hostname, &found.primary_key, Some(&found.name), expiry)?)
}

/// Writes `contents` to `path`, refusing to replace a file that exists.
fn write_new(path: &std::path::Path, contents: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("writing {} (an existing file is not replaced)", path.display()))?;
    f.write_all(contents.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// `iothub-emulator cert`: issues a test CA or a device certificate as PEM files.
fn cert(what: &CertCommand) -> Result<()> {
    use iothub_emulator::x509::issue;
    match what {
        CertCommand::Ca { out, name, days } => {
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            let ca = issue::test_ca(name, *days)?;
            let (cert_path, key_path) = (out.join("ca.pem"), out.join("ca-key.pem"));
            write_new(&cert_path, &ca.cert_pem)?;
            write_new(&key_path, &ca.key_pem)?;
            println!("CA certificate: {}", cert_path.display());
            println!("CA key: {}", key_path.display());
            println!("trust it: iothub-emulator --x509-ca {}", cert_path.display());
            println!(
                "  or, while the hub runs: curl --data-binary @{} http://127.0.0.1:{DEFAULT_HTTP_PORT}/emulator/x509-cas",
                cert_path.display()
            );
        }
        CertCommand::Device { device_id, out, ca_dir, days } => {
            iothub_emulator::hub::validate_device_id(device_id)
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            let issued = match ca_dir {
                Some(dir) => {
                    let read = |name: &str| {
                        let p = dir.join(name);
                        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
                    };
                    issue::ca_signed_device(device_id, &read("ca.pem")?, &read("ca-key.pem")?, *days)?
                }
                None => issue::self_signed_device(device_id, *days)?,
            };
            let (cert_path, key_path) =
                (out.join(format!("{device_id}.pem")), out.join(format!("{device_id}-key.pem")));
            write_new(&cert_path, &issued.cert_pem)?;
            write_new(&key_path, &issued.key_pem)?;
            println!("certificate: {}", cert_path.display());
            println!("key: {}", key_path.display());
            println!("SHA-1 thumbprint: {}", issued.thumbprints.sha1_hex());
            println!("SHA-256 thumbprint: {}", issued.thumbprints.sha256_hex());
            match ca_dir {
                Some(_) => println!(
                    "register it: {{\"deviceId\":\"{device_id}\",\"authentication\":{{\"type\":\"certificateAuthority\"}}}}"
                ),
                None => println!(
                    "register it: {{\"deviceId\":\"{device_id}\",\"authentication\":{{\"type\":\"selfSigned\",\"x509Thumbprint\":{{\"primaryThumbprint\":\"{}\"}}}}}}",
                    issued.thumbprints.sha1_hex()
                ),
            }
        }
    }
    Ok(())
}

/// `iothub-emulator healthcheck`: 0 when healthy, 1 and one line on stderr otherwise.
fn healthcheck(bind: IpAddr, http_port: u16, timeout_ms: u64) -> ExitCode {
    use iothub_emulator::healthcheck::{probe, probe_addr};
    let addr = probe_addr(bind, http_port);
    match probe(addr, Duration::from_millis(timeout_ms.max(1))) {
        Ok(()) => {
            println!("healthy: http://{addr}/health");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, tier: Option<Tier>, started: Instant) -> Result<()> {
    let mut x509_cas = Vec::new();
    for path in &args.x509_cas {
        let pem = std::fs::read_to_string(path).with_context(|| format!("--x509-ca {}", path.display()))?;
        // Checked here, so a bad file stops the start with its name rather than a warning.
        iothub_emulator::x509::TrustedCas::default()
            .add_pem(&pem)
            .with_context(|| format!("--x509-ca {}", path.display()))?;
        x509_cas.push(pem);
    }
    let config = HubConfig {
        hostname: args.hostname.clone(),
        owner_key: args.owner_key.clone(),
        sas_skew_secs: args.sas_skew_secs,
        feedback_batch_interval_ms: args.feedback_interval_ms,
        admin_api: !args.disable_admin_api,
        throttle: tier,
        x509_cas,
        events: EventsConfig {
            partitions: usize::from(args.partitions),
            retention_ms: args.event_retention.as_millis().min(u128::from(u64::MAX)) as u64,
            memory_budget_bytes: (args.event_memory_mib as usize).saturating_mul(1024 * 1024),
            consumer_groups: args.consumer_groups.clone(),
        },
        dps_id_scope: args.dps_id_scope.clone().unwrap_or_else(iothub_emulator::dps::generate_id_scope),
        persist: args.persist.then_some(if args.persist_sync {
            iothub_emulator::persist::SyncMode::Sync
        } else {
            iothub_emulator::persist::SyncMode::Write
        }),
        ..HubConfig::default()
    };
    let listen = ListenConfig {
        bind: args.bind,
        https_port: args.https_port,
        http_port: args.http_port,
        amqp_port: args.amqp_port,
        amqp_plain_port: args.amqp_plain_port,
        mqtt_port: args.mqtt_port,
        mqtt_plain_port: args.mqtt_plain_port,
        mqtt_plain_driver: args.mqtt_plain_driver,
        ftp_port: (!args.no_ftp).then_some(args.ftp_port),
        tls_names: args.tls_sans.clone(),
    };
    let ftp = FtpConfig {
        passive_ports: args.ftp_passive_ports.clone(),
        max_sessions: args.ftp_max_sessions,
        ..FtpConfig::new(args.packages_dir.clone().unwrap_or_else(|| args.data_dir.join("packages")))
    };
    let running = RunningHub::start_with_ftp(config, &listen, &args.data_dir, ftp).await?;
    // Before the startup lines: whoever reads them may signal at once.
    let on_signal = server::shutdown_on_signal(running.shutdown_token());
    let ca_path = std::fs::canonicalize(&running.ca_path).unwrap_or_else(|_| running.ca_path.clone());
    println!("https://{}:{}", args.hostname, running.https_addr.port());
    println!("http://{}", running.http_addr);
    println!("mqtts://{}:{}", args.hostname, running.mqtt_addr.port());
    if let Some(plain) = running.mqtt_plain_addr {
        println!("mqtt://{plain}");
    }
    println!("amqps://{}:{}", args.hostname, running.amqp_addr.port());
    if let Some(plain) = running.amqp_plain_addr {
        println!("amqp://{plain}");
    }
    if let Some(ftp) = running.ftp_addr {
        println!("ftp://{ftp}");
        println!("FTP packages directory: {}", running.packages_dir.display());
    }
    println!("CA certificate: {}", ca_path.display());
    if let Some(t) = tier {
        println!("throttling as IoT Hub {t}: operation rates and the daily message quota");
    }
    println!("EVENTHUB_CONNECTION_STRING={}", running.event_hub_connection_string());
    let dps = running.hub.dps();
    println!("DPS_ID_SCOPE={}", dps.id_scope());
    println!("DPS_CONNECTION_STRING={}", dps.service_connection_string(&args.hostname));
    // Last: supervisors read the startup lines up to this one.
    println!("IOTHUB_CONNECTION_STRING={}", running.owner_connection_string());
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "hub ready");
    tokio::spawn(on_signal);
    running.wait().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Args;

    #[test]
    fn the_plain_mqtt_drivers_are_on_unless_turned_off() {
        let parse = |extra: &[&str]| {
            let args = ["iothub-emulator"].iter().chain(extra);
            Args::try_parse_from(args).map(|a| a.mqtt_plain_driver).map_err(|e| e.to_string())
        };
        // The environment could turn it off; a test that reads it would race the others.
        if std::env::var_os("IOTHUB_EMULATOR_MQTT_PLAIN_DRIVER").is_none() {
            assert_eq!(parse(&[]), Ok(true));
        }
        assert_eq!(parse(&["--mqtt-plain-driver"]), Ok(true));
        assert_eq!(parse(&["--mqtt-plain-driver=false"]), Ok(false));
        assert_eq!(parse(&["--mqtt-plain-driver", "false"]), Ok(false));
        assert_eq!(parse(&["--mqtt-plain-driver", "true"]), Ok(true));
        assert!(parse(&["--mqtt-plain-driver=maybe"]).is_err());
    }

    #[test]
    fn worker_threads_leave_a_core_unless_given() {
        assert_eq!(super::default_worker_threads(1), 1);
        assert_eq!(super::default_worker_threads(2), 1);
        assert_eq!(super::default_worker_threads(8), 7);
        let parse = |extra: &[&str]| {
            let args = ["iothub-emulator"].iter().chain(extra);
            Args::try_parse_from(args).map(|a| a.worker_threads).map_err(|e| e.to_string())
        };
        assert_eq!(parse(&["--worker-threads", "2"]), Ok(Some(2)));
        assert!(parse(&["--worker-threads", "0"]).is_err());
        assert!(parse(&["--worker-threads", "many"]).is_err());
    }
}
