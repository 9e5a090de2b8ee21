//! External mode: a hub the runner did not start, reached only over the wire, and a fleet run by
//! `fleet run --shard i/n` processes elsewhere. [`ExternalHub`] owns the connections: REST (registry,
//! twins, queries) at `hub.http_url`, one AMQP connection (C2D sends and feedback, like a service
//! SDK) at the connection string's `HostName`, and a long-poll of the emulator's
//! `GET /emulator/telemetry?waitMs=` admin endpoint; two background tasks feed bounded channels
//! that the runner drains each tick. This module also holds the mode rules
//! ([`check_modes`]), the command-line overrides ([`HubOverrides`]) and the wait for an external
//! fleet ([`wait_for_fleet`]).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use simulated_devices::amqp_client::{AmqpEndpoint, AmqpError, AmqpService, TOKEN_RENEWAL, TokenSource};
use simulated_devices::service_client::{C2dSend, ServiceClient};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::RunError;
use super::shared::{Feedback, InstallEvent, Outgoing, Sent, Telemetry, unix_ms};
use crate::scenario::plan::{
    Action, DEFAULT_AMQP_PORT, DEFAULT_FTP_PORT, DEFAULT_MQTT_PORT, HubPlan, ScenarioPlan,
};

/// How long one telemetry long-poll waits on the hub.
const TELEMETRY_WAIT_MS: u64 = 1000;
/// Telemetry messages asked for per read (the admin endpoint's own cap is 10,000).
const TELEMETRY_PAGE: usize = 1000;
/// C2D sends in flight at once on the AMQP connection (the hub's link credit paces them too).
pub(super) const SEND_WINDOW: usize = 64;
/// How long one AMQP feedback receive waits.
const FEEDBACK_WAIT: Duration = Duration::from_secs(1);
/// Batches buffered between a background reader and the runner's tick.
const CHANNEL_BATCHES: usize = 64;
/// Consecutive failed telemetry reads before the run fails.
const TELEMETRY_RETRIES: u32 = 5;
/// Pause after a failed telemetry read.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// How often the hub's health and the external fleet's connections are polled.
const POLL: Duration = Duration::from_millis(250);
/// Longest wait for an external hub's `/health` to answer 200.
const HEALTH_WAIT: Duration = Duration::from_secs(60);
/// Most device ids in one `deviceId IN [...]` twin query; more pending devices are checked with
/// one query over every device on the version.
const IDS_PER_QUERY: usize = 500;
/// Shortest time between two twin checks of the same version.
const TWIN_CHECK_EVERY: Duration = Duration::from_millis(100);
/// How often the wait for an external fleet logs its progress.
const WAIT_LOG_EVERY: Duration = Duration::from_secs(5);
/// How often the run's status is published to the hub's dashboard (at most).
pub const STATUS_EVERY: Duration = Duration::from_secs(1);
/// Deadline of one status publication.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Command-line settings that point a scenario at an external hub or fleet; each overrides the
/// file's `[hub]` / `[fleet]` key of the same meaning.
#[derive(Debug, Clone, Default)]
pub struct HubOverrides {
    /// `--hub-connection-string`: switches any scenario to an external hub.
    pub connection_string: Option<String>,
    /// `--hub-ca`.
    pub ca_file: Option<String>,
    /// `--hub-http-url`.
    pub http_url: Option<String>,
    /// `--packages-dir`.
    pub packages_dir: Option<String>,
    /// `--hub-amqp-port`.
    pub amqp_port: Option<u16>,
    /// `--hub-mqtt-port`.
    pub mqtt_port: Option<u16>,
    /// `--hub-ftp-port`.
    pub ftp_port: Option<u16>,
    /// `--fleet-external`.
    pub fleet_external: bool,
}

impl HubOverrides {
    /// Applies the overrides to `plan`. `--hub-connection-string` makes the hub external (the
    /// file's `[hub]` is replaced, `--hub-ca` and `--hub-http-url` become required); the other hub
    /// flags only change an external hub. Errors name the flag and what is allowed.
    pub fn apply(&self, plan: &mut ScenarioPlan) -> Result<(), String> {
        if let Some(cs) = &self.connection_string {
            let need = |flag: &str, v: &Option<String>| {
                v.clone().ok_or_else(|| format!("{flag}: required with --hub-connection-string"))
            };
            plan.hub = HubPlan::External {
                connection_string: cs.clone(),
                ca_file: need("--hub-ca", &self.ca_file)?,
                http_url: need("--hub-http-url", &self.http_url)?,
                packages_dir: None,
                amqp_port: DEFAULT_AMQP_PORT,
                mqtt_port: DEFAULT_MQTT_PORT,
                ftp_port: DEFAULT_FTP_PORT,
            };
        }
        match &mut plan.hub {
            HubPlan::External { ca_file, http_url, packages_dir, amqp_port, mqtt_port, ftp_port, .. } => {
                let port = |flag: &str, v: Option<u16>, slot: &mut u16| match v {
                    Some(0) => Err(format!("{flag}: 0 is not a port; use 1 to 65535")),
                    Some(p) => {
                        *slot = p;
                        Ok(())
                    }
                    None => Ok(()),
                };
                port("--hub-amqp-port", self.amqp_port, amqp_port)?;
                port("--hub-mqtt-port", self.mqtt_port, mqtt_port)?;
                port("--hub-ftp-port", self.ftp_port, ftp_port)?;
                if let Some(v) = &self.ca_file {
                    *ca_file = v.clone();
                }
                if let Some(v) = &self.http_url {
                    *http_url = v.clone();
                }
                if let Some(v) = &self.packages_dir {
                    *packages_dir = Some(v.clone());
                }
            }
            HubPlan::Embedded { .. } | HubPlan::Child { .. } => {
                for (flag, env, set) in [
                    ("--hub-ca", "CA_FILE", self.ca_file.is_some()),
                    ("--hub-http-url", "HTTP_URL", self.http_url.is_some()),
                    ("--packages-dir", "PACKAGES_DIR", self.packages_dir.is_some()),
                    ("--hub-amqp-port", "HUB_AMQP_PORT", self.amqp_port.is_some()),
                    ("--hub-mqtt-port", "HUB_MQTT_PORT", self.mqtt_port.is_some()),
                    ("--hub-ftp-port", "HUB_FTP_PORT", self.ftp_port.is_some()),
                ] {
                    if set {
                        return Err(format!(
                            "{flag} (or IOTHUB_EMULATOR_{env}): only for an external hub; also give \
                             --hub-connection-string (or set hub.mode = \"external\" in the scenario), \
                             or leave it out"
                        ));
                    }
                }
            }
        }
        if self.fleet_external {
            plan.fleet.external = true;
        }
        Ok(())
    }
}

/// Refuses what a mode cannot do, naming the key: events that switch devices (`offline`,
/// `link-flap`) with an external fleet, `ftp-fault` with a hub not in this process, `hub-restart`
/// with a hub the runner does not own as a child process, and an external fleet with the
/// embedded or child hub (whose ports only this process knows).
pub fn check_modes(plan: &ScenarioPlan) -> Result<(), RunError> {
    let external_hub = matches!(plan.hub, HubPlan::External { .. });
    let embedded_hub = matches!(plan.hub, HubPlan::Embedded { .. });
    let child_hub = matches!(plan.hub, HubPlan::Child { .. });
    if plan.fleet.external && !external_hub {
        return Err(RunError::Mode {
            key: "fleet.mode".into(),
            why: "an external fleet needs an external hub (hub.mode = \"external\" or \
                  --hub-connection-string): fleet run processes cannot reach the runner's embedded hub"
                .into(),
        });
    }
    for (i, e) in plan.events.iter().enumerate() {
        let key = format!("event[{i}].action");
        match e.action {
            Action::Offline { .. } | Action::LinkFlap { .. } if plan.fleet.external => {
                let name = if matches!(e.action, Action::Offline { .. }) { "offline" } else { "link-flap" };
                return Err(RunError::Mode {
                    key,
                    why: format!(
                        "'{name}' switches devices, which an external fleet (fleet.mode = \"external\", \
                         --fleet-external) does not let the runner do; run the fleet in the runner"
                    ),
                });
            }
            Action::FtpFault { .. } if !embedded_hub => {
                return Err(RunError::Mode {
                    key,
                    why: "'ftp-fault' needs the embedded hub's FTP server; an external or child hub \
                          (hub.mode = \"external\" or \"child\", --hub-connection-string) cannot be \
                          faulted from here"
                        .into(),
                });
            }
            Action::HubRestart { .. } if !child_hub => {
                return Err(RunError::Mode {
                    key,
                    why: "'hub-restart' restarts a hub the runner owns as a child process; set \
                          hub.mode = \"child\" (the iothub-emulator binary, with --persist by default)"
                        .into(),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

fn setup(what: impl std::fmt::Display) -> RunError {
    RunError::Setup(what.to_string())
}

/// A hub reached over the wire. Dropping it stops its background readers.
pub struct ExternalHub {
    svc: ServiceClient,
    amqp: AmqpService,
    host: String,
    ca_pem: String,
    mqtt_port: u16,
    packages_dir: PathBuf,
    ftp_addr: String,
    /// Appended to every message id this run sends (`<id>.<nonce>`), so feedback about an earlier
    /// run's messages on the same hub is told apart and ignored.
    nonce: String,
    /// Throttled sends retried (tier throttling on the hub).
    throttled: AtomicU64,
    /// When each version's twins may be checked again ([`ExternalHub::reporting`]).
    next_twin_check: HashMap<String, Instant>,
    telemetry: mpsc::Receiver<Result<Vec<Telemetry>, String>>,
    feedback: mpsc::Receiver<Result<Vec<Feedback>, String>>,
    tasks: Vec<JoinHandle<()>>,
    /// The dashboard's scenario status (see [`ExternalHub::publish_status`]).
    status: StatusPublisher,
    /// `{http_url}/dashboard`.
    dashboard_url: String,
}

/// Publishes the run's status to an external hub's dashboard (`PUT {http_url}/emulator/dashboard/
/// scenario`): at most once per [`STATUS_EVERY`], one request in flight (a slow hub makes the
/// runner skip updates, never queue them), each within [`STATUS_TIMEOUT`]. Failures are logged
/// once and never fail the run: a hub started with `--disable-admin-api` answers 404.
struct StatusPublisher {
    http: reqwest::Client,
    url: String,
    /// When the last request started, and the newest status handed in.
    state: std::sync::Mutex<(Option<Instant>, Option<Value>)>,
    in_flight: Arc<std::sync::atomic::AtomicBool>,
    warned: Arc<std::sync::atomic::AtomicBool>,
}

impl StatusPublisher {
    fn new(http: reqwest::Client, http_url: &str) -> Self {
        Self {
            http,
            url: format!("{http_url}/emulator/dashboard/scenario"),
            state: std::sync::Mutex::new((None, None)),
            in_flight: Arc::default(),
            warned: Arc::default(),
        }
    }

    fn publish(&self, status: Value) {
        let now = Instant::now();
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.1 = Some(status.clone());
            if state.0.is_some_and(|t| now.duration_since(t) < STATUS_EVERY)
                || self.in_flight.swap(true, Ordering::AcqRel)
            {
                return;
            }
            state.0 = Some(now);
        }
        let (http, url, in_flight, warned) =
            (self.http.clone(), self.url.clone(), self.in_flight.clone(), self.warned.clone());
        tokio::spawn(async move {
            put_status(&http, &url, &status, &warned).await;
            in_flight.store(false, Ordering::Release);
        });
    }

    /// Sends the newest status marked finished, and waits for it (bounded).
    async fn finish(&self) {
        let last = self.state.lock().unwrap_or_else(|p| p.into_inner()).1.take();
        if let Some(mut status) = last {
            status["phase"] = Value::from("finished");
            status["finished"] = Value::from(true);
            put_status(&self.http, &self.url, &status, &self.warned).await;
        }
    }
}

async fn put_status(
    http: &reqwest::Client,
    url: &str,
    status: &Value,
    warned: &std::sync::atomic::AtomicBool,
) {
    let sent = http.put(url).json(status).timeout(STATUS_TIMEOUT).send().await;
    let failure = match sent {
        Ok(r) if r.status().is_success() => return,
        Ok(r) => format!("HTTP {}", r.status()),
        Err(e) => e.to_string(),
    };
    if !warned.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "publishing the run's status to the hub's dashboard ({url}): {failure}; the run goes on"
        );
    }
}

impl Drop for ExternalHub {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl ExternalHub {
    /// Connects to the hub `plan.hub` names: reads the CA, waits (bounded) for `/health`, checks
    /// the packages directory, opens the AMQP connection (the host name resolved once) and starts
    /// reading telemetry after the newest message already recorded.
    pub async fn connect(plan: &HubPlan) -> Result<Self, RunError> {
        Self::connect_with_nonce(plan, format!("{:x}", unix_ms())).await
    }

    /// Connects again to the hub `plan` names (after it restarted), keeping this run's nonce so
    /// feedback about messages sent before the restart is still recognised, and the count of
    /// throttled retries. Telemetry is read from the newest message the restarted hub holds.
    pub async fn reconnect(&mut self, plan: &HubPlan) -> Result<(), RunError> {
        let fresh = Self::connect_with_nonce(plan, self.nonce.clone()).await?;
        fresh.throttled.fetch_add(self.throttled.load(Ordering::Relaxed), Ordering::Relaxed);
        // The old readers stop when the old value drops.
        *self = fresh;
        Ok(())
    }

    async fn connect_with_nonce(plan: &HubPlan, nonce: String) -> Result<Self, RunError> {
        let HubPlan::External {
            connection_string,
            ca_file,
            http_url,
            packages_dir,
            amqp_port,
            mqtt_port,
            ftp_port,
        } = plan
        else {
            return Err(setup("not an external hub"));
        };
        let ca_pem = std::fs::read_to_string(ca_file)
            .map_err(|e| setup(format!("hub.ca_file (--hub-ca) {ca_file}: cannot read it: {e}")))?;
        let packages_dir = packages_dir.as_deref().map(PathBuf::from).ok_or_else(|| {
            setup(
                "hub.packages_dir (--packages-dir): required with an external hub: the hub's FTP \
                 packages directory (the emulator's --packages-dir) on a shared disk or volume",
            )
        })?;
        if !packages_dir.is_dir() {
            return Err(setup(format!(
                "hub.packages_dir (--packages-dir) {}: not a directory",
                packages_dir.display()
            )));
        }
        let http_url = http_url.trim_end_matches('/').to_string();
        let svc = ServiceClient::new(connection_string, &http_url, Some(&ca_pem))
            .map_err(|e| setup(format!("hub.connection_string (--hub-connection-string): {e}")))?;
        let host = svc.hub_host().to_string();
        // The admin endpoints are on the plain HTTP port; trusting the CA also lets an https URL work.
        let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes())
            .map_err(|e| setup(format!("hub.ca_file (--hub-ca) {ca_file}: {e}")))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(TELEMETRY_WAIT_MS) + Duration::from_secs(30))
            .add_root_certificate(ca)
            .build()
            .map_err(setup)?;
        wait_healthy(&http, &http_url).await?;
        let amqp = connect_amqp(&host, *amqp_port, &ca_pem, &svc).await?;
        let after = newest_sequence(&http, &http_url).await?;
        let (ttx, telemetry) = mpsc::channel(CHANNEL_BATCHES);
        let (ftx, feedback) = mpsc::channel(CHANNEL_BATCHES);
        let status = StatusPublisher::new(http.clone(), &http_url);
        let tasks = vec![
            tokio::spawn(read_telemetry(http, http_url.clone(), after, ttx)),
            tokio::spawn(read_feedback(amqp.clone(), nonce.clone(), ftx)),
        ];
        Ok(Self {
            svc,
            amqp,
            ftp_addr: format!("{host}:{ftp_port}"),
            host,
            ca_pem,
            mqtt_port: *mqtt_port,
            packages_dir,
            nonce,
            throttled: AtomicU64::new(0),
            next_twin_check: HashMap::new(),
            telemetry,
            feedback,
            tasks,
            status,
            dashboard_url: format!("{http_url}/dashboard"),
        })
    }

    /// The hub's dashboard page.
    pub fn dashboard_url(&self) -> &str {
        &self.dashboard_url
    }

    /// Hands the run's status to the hub's dashboard (rate-limited, in the background; see
    /// `StatusPublisher`).
    pub fn publish_status(&self, status: Value) {
        self.status.publish(status);
    }

    /// Publishes the last status as finished and waits for the hub's answer (bounded).
    pub async fn publish_final_status(&self) {
        self.status.finish().await;
    }

    /// The REST service client (registry, twins, queries over `hub.http_url`).
    pub fn service(&self) -> &ServiceClient {
        &self.svc
    }

    /// The hub's host name (connection string `HostName`): MQTT, AMQP and FTP are dialed there.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The hub's CA (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The MQTT (TLS) port.
    pub fn mqtt_port(&self) -> u16 {
        self.mqtt_port
    }

    /// The shared packages directory.
    pub fn packages_dir(&self) -> &Path {
        &self.packages_dir
    }

    /// `host:port` of the FTP server.
    pub fn ftp_addr(&self) -> &str {
        &self.ftp_addr
    }

    /// Sends every message over the one AMQP connection, up to [`SEND_WINDOW`] in flight, handed
    /// to the connection in order; the outcomes come back in the same order.
    pub async fn send_all(&self, msgs: Vec<Outgoing<'_>>) -> Vec<Sent> {
        futures_util::stream::iter(msgs).map(|m| self.send(m)).buffered(SEND_WINDOW).collect().await
    }

    /// Sends over AMQP; the hub's accept time is this machine's clock at the settlement.
    async fn send(&self, m: Outgoing<'_>) -> Sent {
        let message_id = format!("{}.{}", m.message_id, self.nonce);
        amqp_send(&self.amqp, m, message_id, unix_ms, &self.throttled).await
    }

    /// Sends the hub throttled and this side retried.
    pub fn throttled_retries(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    /// Telemetry the background reader collected since the last call.
    pub fn telemetry(&mut self) -> Result<Vec<Telemetry>, RunError> {
        drain(&mut self.telemetry, "reading the hub's telemetry (hub.http_url /emulator/telemetry)")
    }

    /// Feedback about this run's messages collected since the last call.
    pub fn feedback(&mut self) -> Result<Vec<Feedback>, RunError> {
        drain(&mut self.feedback, "receiving feedback over AMQP")
    }

    /// Which of `ids` report `appVersion` = `version`: one twin query, by id for up to
    /// [`IDS_PER_QUERY`] devices, else over every device on the version. Each version is checked
    /// at most every [`TWIN_CHECK_EVERY`] (or as long as its last query took), so a big fleet's
    /// scans do not keep the hub busy; until then the answer is "none yet".
    pub async fn reporting(&mut self, version: &str, ids: &[&str]) -> Result<HashSet<String>, RunError> {
        let now = Instant::now();
        if self.next_twin_check.get(version).is_some_and(|at| now < *at) {
            return Ok(HashSet::new());
        }
        let on_version = format!("properties.reported.appVersion = {}", quote(version));
        let cond = if ids.len() <= IDS_PER_QUERY {
            let list: Vec<String> = ids.iter().map(|id| quote(id)).collect();
            format!("deviceId IN [{}] AND {on_version}", list.join(", "))
        } else {
            on_version
        };
        let items = self
            .svc
            .query_all(&format!("SELECT deviceId FROM devices WHERE {cond}"))
            .await
            .map_err(|e| setup(format!("twin query: {e}")))?;
        self.next_twin_check
            .insert(version.to_string(), Instant::now() + TWIN_CHECK_EVERY.max(now.elapsed()));
        let wanted: HashSet<&str> = ids.iter().copied().collect();
        Ok(items
            .iter()
            .filter_map(|t| t["deviceId"].as_str())
            .filter(|id| wanted.contains(id))
            .map(str::to_string)
            .collect())
    }

    /// Every device's reported `appVersion` (one query over all twins).
    pub async fn app_versions(&self) -> Result<HashMap<String, String>, RunError> {
        let items = self
            .svc
            .query_all("SELECT deviceId, properties.reported.appVersion AS v FROM devices")
            .await
            .map_err(|e| setup(format!("twin query: {e}")))?;
        Ok(items
            .iter()
            .filter_map(|t| Some((t["deviceId"].as_str()?.to_string(), t["v"].as_str()?.to_string())))
            .collect())
    }

    /// Stops the background readers (dropping the last AMQP handle closes the connection).
    pub fn close(self) {}
}

/// A query string literal.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn drain<T>(rx: &mut mpsc::Receiver<Result<Vec<T>, String>>, what: &str) -> Result<Vec<T>, RunError> {
    let mut out = Vec::new();
    loop {
        match rx.try_recv() {
            Ok(Ok(batch)) => out.extend(batch),
            Ok(Err(e)) => return Err(setup(format!("{what}: {e}"))),
            Err(mpsc::error::TryRecvError::Empty) => return Ok(out),
            Err(mpsc::error::TryRecvError::Disconnected) => {
                return Err(setup(format!("{what}: the reader stopped")));
            }
        }
    }
}

/// Polls `GET {http_url}/health` until it answers 200, for at most [`HEALTH_WAIT`] (a hub
/// container may still be starting).
async fn wait_healthy(http: &reqwest::Client, http_url: &str) -> Result<(), RunError> {
    let deadline = Instant::now() + HEALTH_WAIT;
    let url = format!("{http_url}/health");
    loop {
        let last = match http.get(&url).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => format!("it answered {}", r.status()),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(setup(format!(
                "hub.http_url (--hub-http-url) {url}: no healthy answer within {HEALTH_WAIT:?}: {last}"
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The AMQP condition a throttled send is rejected with (tier throttling).
const THROTTLED: &str = "com.microsoft:device-container-throttled";
/// Attempts of a throttled send before it counts as refused.
const THROTTLE_ATTEMPTS: u32 = 12;
/// First wait before retrying a throttled send; doubles per attempt up to [`THROTTLE_RETRY_MAX`].
/// The service SDKs' policies have the same shape with longer waits (Node's starts at 10 s).
const THROTTLE_RETRY_FIRST: Duration = Duration::from_millis(500);
/// Longest wait between attempts of a throttled send.
const THROTTLE_RETRY_MAX: Duration = Duration::from_secs(10);

/// Sends one message over `amqp` with `ack: full` under `message_id`; `now` says when the hub
/// accepted it (the settlement), in the hub's time. A send the hub throttles is retried after a
/// backoff, as the service SDKs do; each retry counts in `throttled`.
pub(super) async fn amqp_send(
    amqp: &AmqpService,
    m: Outgoing<'_>,
    message_id: String,
    now: impl Fn() -> u64,
    throttled: &AtomicU64,
) -> Sent {
    let msg = C2dSend {
        body: m.body.to_vec(),
        message_id,
        ack: "full",
        content_type: Some(m.content_type.to_string()),
        expiry_ms: m.ttl.map(|t| now() + t.as_millis() as u64),
    };
    let (mut wait, mut attempt) = (THROTTLE_RETRY_FIRST, 1);
    loop {
        match amqp.send_c2d(m.device_id, &msg).await {
            Ok(()) => return Sent::Accepted(now()),
            Err(AmqpError::Rejected { condition, .. })
                if condition == THROTTLED && attempt < THROTTLE_ATTEMPTS =>
            {
                throttled.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(THROTTLE_RETRY_MAX);
                attempt += 1;
            }
            Err(AmqpError::Rejected { condition, description })
                if condition == "amqp:resource-limit-exceeded"
                    || description.contains("DeviceMaximumQueueDepthExceeded") =>
            {
                return Sent::QueueFull;
            }
            Err(_) => return Sent::Refused,
        }
    }
}

/// Resolves `host:port` once and opens the AMQP service connection on the first address that
/// accepts it (names such as `hub` in docker-compose, or `localhost` with IPv4 and IPv6).
pub(super) async fn connect_amqp(
    host: &str,
    port: u16,
    ca_pem: &str,
    svc: &ServiceClient,
) -> Result<AmqpService, RunError> {
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| {
            setup(format!("AMQP: {host}:{port} (the connection string's HostName) does not resolve: {e}"))
        })?
        .collect();
    svc.token().map_err(setup)?;
    let source: TokenSource = {
        let svc = svc.clone();
        Arc::new(move || svc.token().map_err(|e| e.to_string()))
    };
    let mut last = format!("{host} resolves to no address");
    for addr in addrs {
        let endpoint = AmqpEndpoint { addr, server_name: host.to_string(), ca_pem: ca_pem.to_string() };
        match AmqpService::connect_renewing(&endpoint, host, source.clone(), TOKEN_RENEWAL).await {
            Ok(a) => return Ok(a),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(setup(format!("AMQP at {host}:{port} (--hub-amqp-port): {last}")))
}

/// The sequence number of the newest telemetry message the hub holds (0 when none), so the run
/// reads only what devices send from now on.
async fn newest_sequence(http: &reqwest::Client, http_url: &str) -> Result<u64, RunError> {
    let url = format!("{http_url}/emulator/telemetry?after=0&limit=10000");
    let items = fetch_items(http, &url).await.map_err(|e| setup(format!("{url}: {e}")))?;
    Ok(items.iter().filter_map(|m| m["sequenceNumber"].as_u64()).max().unwrap_or(0))
}

async fn fetch_items(http: &reqwest::Client, url: &str) -> Result<Vec<Value>, String> {
    let resp = http.get(url).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("the hub answered {}", resp.status()));
    }
    match resp.json::<Value>().await.map_err(|e| e.to_string())? {
        Value::Array(items) => Ok(items),
        other => Err(format!("not a JSON array: {other}")),
    }
}

/// Long-polls the admin telemetry endpoint after `after`, forwarding JSON bodies; reports an error
/// after [`TELEMETRY_RETRIES`] failures in a row and stops.
async fn read_telemetry(
    http: reqwest::Client,
    http_url: String,
    mut after: u64,
    tx: mpsc::Sender<Result<Vec<Telemetry>, String>>,
) {
    let mut failures = 0;
    loop {
        let url = format!(
            "{http_url}/emulator/telemetry?after={after}&limit={TELEMETRY_PAGE}&waitMs={TELEMETRY_WAIT_MS}"
        );
        let items = match fetch_items(&http, &url).await {
            Ok(items) => {
                failures = 0;
                items
            }
            Err(e) => {
                failures += 1;
                if failures >= TELEMETRY_RETRIES {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        if let Some(first) = items.first().and_then(|m| m["sequenceNumber"].as_u64())
            && first > after + 1
        {
            let lost = first - after - 1;
            let _ = tx
                .send(Err(format!(
                    "{lost} messages left the hub's telemetry buffer before the runner read them, so \
                     install events are missing (the runner fell behind)"
                )))
                .await;
            return;
        }
        let mut batch = Vec::with_capacity(items.len());
        for m in &items {
            after = after.max(m["sequenceNumber"].as_u64().unwrap_or(after));
            let (Some(device_id), Some(at), Some(body)) =
                (m["deviceId"].as_str(), m["enqueuedTimeUtc"].as_str(), m["body"].as_str())
            else {
                continue;
            };
            if m["bodyEncoding"] != "utf-8" {
                continue;
            }
            let (Some(enqueued_at), Some(event)) =
                (iothub_emulator::clock::parse_iso8601(at), InstallEvent::parse(body.as_bytes()))
            else {
                continue;
            };
            batch.push(Telemetry { device_id: device_id.to_string(), enqueued_at, event });
        }
        if !batch.is_empty() && tx.send(Ok(batch)).await.is_err() {
            return;
        }
    }
}

/// Receives feedback over AMQP, keeping the records about this run's messages (`<id>.<nonce>`,
/// the suffix removed); stops on the first error, which it forwards.
async fn read_feedback(amqp: AmqpService, nonce: String, tx: mpsc::Sender<Result<Vec<Feedback>, String>>) {
    let suffix = format!(".{nonce}");
    loop {
        let records = match amqp.receive_feedback(FEEDBACK_WAIT).await {
            Ok(Some(records)) => records,
            Ok(None) => continue,
            Err(e) => {
                let _ = tx.send(Err(e.to_string())).await;
                return;
            }
        };
        let batch: Vec<Feedback> = records
            .into_iter()
            .filter_map(|r| {
                let id = r.original_message_id.strip_suffix(&suffix)?;
                Some(Feedback { status: r.status_code, original_message_id: id.to_string() })
            })
            .collect();
        if !batch.is_empty() && tx.send(Ok(batch)).await.is_err() {
            return;
        }
    }
}

/// How many devices the registry shows connected, the run's or not.
async fn count_connected(svc: &ServiceClient) -> Result<usize, RunError> {
    let items = svc
        .query_all("SELECT COUNT() AS n FROM devices WHERE connectionState = 'Connected'")
        .await
        .map_err(|e| setup(format!("registry query: {e}")))?;
    Ok(items.first().and_then(|t| t["n"].as_u64()).unwrap_or(0) as usize)
}

/// How many of the run's devices (`index`) the registry shows connected.
pub async fn connected_devices(
    svc: &ServiceClient,
    index: &HashMap<String, usize>,
) -> Result<usize, RunError> {
    let items = svc
        .query_all("SELECT deviceId FROM devices WHERE connectionState = 'Connected'")
        .await
        .map_err(|e| setup(format!("registry query: {e}")))?;
    Ok(items.iter().filter(|t| t["deviceId"].as_str().is_some_and(|id| index.contains_key(id))).count())
}

/// Waits until every one of the run's devices is registered and connected (an external fleet's
/// `fleet run` processes), polling the registry, for at most `limit`.
pub async fn wait_for_fleet(
    svc: &ServiceClient,
    plan: &ScenarioPlan,
    index: &HashMap<String, usize>,
    limit: Duration,
    log: &mut (dyn FnMut(String) + Send),
) -> Result<(), RunError> {
    let n = index.len();
    let ids = &plan.fleet.ids;
    log(format!(
        "waiting for an external fleet of {n} devices ({} .. {}), e.g. `fleet run --count {n} --id-pattern '{}' \
         --initial-version {} --shard i/k` (one per shard)",
        ids.id(0),
        ids.id(n as u64 - 1),
        ids.fleet_run_pattern(),
        plan.fleet.initial_version
    ));
    let started = Instant::now();
    let mut log_at = started + WAIT_LOG_EVERY;
    loop {
        let polled = Instant::now();
        // A COUNT is cheap for the hub; the id-by-id check runs once enough devices are connected.
        let total = count_connected(svc).await?;
        let connected = if total >= n { connected_devices(svc, index).await? } else { total };
        if connected >= n {
            log(format!(
                "external fleet: all {n} devices connected after {:.1} s",
                started.elapsed().as_secs_f64()
            ));
            return Ok(());
        }
        if started.elapsed() >= limit {
            return Err(RunError::Mode {
                key: "fleet.mode".into(),
                why: format!(
                    "only {connected} of the {n} devices ({} .. {}) were connected within time_limit ({limit:?}); \
                     start them with `fleet run --count {n} --id-pattern '{}'`",
                    ids.id(0),
                    ids.id(n as u64 - 1),
                    ids.fleet_run_pattern()
                ),
            });
        }
        if Instant::now() >= log_at {
            log_at += WAIT_LOG_EVERY;
            log(format!("external fleet: {connected}/{n} devices connected"));
        }
        // Never keep the hub busier than half the time with these scans (a million twins take ~1 s).
        tokio::time::sleep(POLL.max(polled.elapsed())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::parse_str;

    const EVENTS: &str = "[fleet]\ndevices = 4\n[[event]]\nat = \"1s\"\naction = \"offline\"\nshare = 0.5\n\
                          duration = \"2s\"\n[[event]]\nat = \"2s\"\naction = \"ftp-fault\"\nrate_limit = \"1KiB\"\n";

    fn external(cs: &str) -> HubOverrides {
        HubOverrides {
            connection_string: Some(cs.into()),
            ca_file: Some("ca.pem".into()),
            http_url: Some("http://hub:8080".into()),
            ..HubOverrides::default()
        }
    }

    #[test]
    fn the_connection_string_flag_makes_any_scenario_external() {
        let mut plan =
            parse_str("t.toml", "[hub]\nfeedback_interval = \"1s\"\n[fleet]\ndevices = 2\n").unwrap();
        let o = HubOverrides {
            packages_dir: Some("/data/packages".into()),
            ftp_port: Some(2122),
            ..external("cs")
        };
        o.apply(&mut plan).unwrap();
        let HubPlan::External { connection_string, packages_dir, amqp_port, ftp_port, .. } = &plan.hub else {
            panic!("still embedded")
        };
        assert_eq!(
            (connection_string.as_str(), packages_dir.as_deref(), *amqp_port, *ftp_port),
            ("cs", Some("/data/packages"), 5671, 2122)
        );
        assert!(!plan.fleet.external);
        HubOverrides { fleet_external: true, ..HubOverrides::default() }.apply(&mut plan).unwrap();
        assert!(plan.fleet.external);
    }

    #[test]
    fn hub_flags_without_an_external_hub_are_errors_naming_the_flag() {
        let mut plan = parse_str("t.toml", "[fleet]\ndevices = 2\n").unwrap();
        let e = HubOverrides { connection_string: Some("cs".into()), ..HubOverrides::default() }
            .apply(&mut plan)
            .unwrap_err();
        assert!(e.starts_with("--hub-ca: required"), "{e}");
        let e = HubOverrides { mqtt_port: Some(1), ..HubOverrides::default() }.apply(&mut plan).unwrap_err();
        assert!(
            e.starts_with("--hub-mqtt-port (or IOTHUB_EMULATOR_HUB_MQTT_PORT): only for an external hub"),
            "{e}"
        );
        let e = HubOverrides { amqp_port: Some(0), ..external("cs") }.apply(&mut plan).unwrap_err();
        assert!(e.starts_with("--hub-amqp-port: 0 is not a port"), "{e}");
    }

    #[test]
    fn each_mode_refuses_what_it_cannot_do_naming_the_key() {
        let mut plan = parse_str("t.toml", EVENTS).unwrap();
        assert!(check_modes(&plan).is_ok(), "embedded hub and fleet can do both");
        plan.fleet.external = true;
        let e = check_modes(&plan).unwrap_err().to_string();
        assert!(e.starts_with("fleet.mode: an external fleet needs an external hub"), "{e}");
        external("cs").apply(&mut plan).unwrap();
        let e = check_modes(&plan).unwrap_err().to_string();
        assert!(e.starts_with("event[0].action: 'offline' switches devices"), "{e}");
        plan.fleet.external = false;
        let e = check_modes(&plan).unwrap_err().to_string();
        assert!(e.starts_with("event[1].action: 'ftp-fault' needs the embedded hub"), "{e}");
    }
}
