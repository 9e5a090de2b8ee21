//! One agent: the app on one simulated device. It keeps an MQTT 3.1.1 session with the hub
//! (clean_session=0, IoT Hub's username/password/client-id contract, reconnects with exponential
//! backoff and jitter), turns C2D messages into installs, and reports every transition through
//! the twin's reported properties and D2C telemetry.
//!
//! The decisions live in [`core::AgentCore`] (sans-IO), the device side of MQTT in
//! [`mqtt_device::DeviceMqtt`] (sans-IO, shared with the in-process fleet) and the socket in
//! [`transport`]; this module is the driver that owns them, the running install and the device's
//! "pending command" file, with one task per agent and no MQTT client event loop or request
//! channel: an idle connected agent is its task, its socket and a few small structs (no buffer
//! while nothing is arriving or leaving). Every wait has a deadline: the CONNACK
//! ([`CONNECT_TIMEOUT`]), each write ([`WRITE_TIMEOUT`]), the keep-alive's PINGRESP.
//!
//! A C2D message is written to `<data_dir>/pending-c2d` *before* it is acknowledged (PUBACK
//! completes it at the hub), so a power cut between the two loses nothing: the next boot resumes
//! the command from disk.
//!
//! Power and link faults: [`run`] follows a `watch` [`Switch`]. Off drops the MQTT session (the
//! socket closes without DISCONNECT, like a power cut) and the running install future; on boots a
//! fresh session with the version found on disk. A link drop closes only the socket (again no
//! DISCONNECT) and reconnects after the normal backoff, keeping the running install; it can also
//! cut the install's FTP connections, and the download resumes with `REST`. Acknowledgements not
//! yet sent when the link drops are discarded: the hub redelivers those messages. Reports are
//! kept, and QoS 1 ones the hub had not acknowledged are sent again after the reconnect.
//!
//! Update retries: an agent whose install failed checks `latest.json` again when its MQTT
//! session comes back (with [`AgentConfig::retry_on_reconnect`]) and whenever the fleet asks for a
//! check ([`Switch::checks`], a counter like the link faults), and installs what it names unless
//! it is already active (see [`core`]). The "retry due" flag is one bool kept across power
//! cycles of the process, like the seen ids; nothing runs for it while the agent is idle.
//!
//! Duplicates: the agent remembers the ids of the last [`SEEN_IDS`] C2D messages it saved (as
//! 64-bit hashes, across power cycles of the process). A message seen again (the hub redelivers
//! what was never acknowledged) is acknowledged without acting on it again and counted in
//! [`AgentStatus::duplicate_deliveries`].

pub mod contract;
pub mod core;
pub mod ftp_backend;
pub mod installer;
pub mod mqtt_device;
pub mod transport;

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use iothub_emulator::clock::{Clock, SystemClock};
use rumqttc::mqttbytes::v4::Packet;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::core::{Action, AgentCore, InstallResult};
pub use self::ftp_backend::FtpBackend;
pub use self::installer::{DeviceContext, InstallBackend};
use self::mqtt_device::{DeviceMqtt, Incoming, KeepAlive};
use self::transport::{Connected, LinkError, Stream};
use crate::notice::{InstallState, UpdateNotice};

/// The file holding the C2D command being worked on, so it survives a power cut.
const PENDING_FILE: &str = "pending-c2d";
/// Largest incoming packet (C2D is at most 64 KB plus topic and properties).
pub const MAX_INCOMING_BYTES: usize = 70 * 1024;
/// Largest outgoing packet (D2C is at most 256 KB).
const MAX_OUTGOING_BYTES: usize = 256 * 1024;
/// From the start of a connection attempt to the hub's CONNACK (rumqttc's default).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One write to the socket (rumqttc's flush timeout).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// C2D message ids remembered for duplicate detection.
pub const SEEN_IDS: usize = 8;

/// How an agent authenticates.
#[derive(Debug, Clone, Default)]
pub enum AgentAuth {
    /// SAS tokens signed with the device key: the MQTT and the FTP password.
    #[default]
    Sas,
    /// The X.509 client certificate in [`AgentConfig::tls`]: a CONNECT without a password. FTP has
    /// no certificate login, so its password is a token of the shared access policy
    /// `(name, key)` (one with DeviceConnect) scoped to the device.
    X509 {
        /// The policy FTP tokens are signed with: (name, base64 key).
        ftp_policy: Arc<(String, String)>,
    },
}

/// How one agent reaches the hub.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The device id (MQTT client id).
    pub device_id: String,
    /// The device's symmetric key (base64); unused with [`AgentAuth::X509`].
    pub device_key: String,
    /// SAS or X.509.
    pub auth: AgentAuth,
    /// The hub's host name: SAS audience and MQTT username.
    pub hub_host: String,
    /// Where the MQTT listener is.
    pub mqtt_host: String,
    /// Its port (8883 with TLS; the emulator's plain listener without).
    pub mqtt_port: u16,
    /// TLS settings, `None` for the plain listener.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// The device's data directory.
    pub data_dir: PathBuf,
    /// First reconnect delay; doubles per failure up to `backoff_max`, with jitter.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// The version the device runs before its first install (nothing on disk yet): reported as
    /// `appVersion` like a factory image. `None` reports no version until an install.
    pub initial_version: Option<Arc<str>>,
    /// After a failed install, check `latest.json` again on every reconnect until an install
    /// succeeds.
    pub retry_on_reconnect: bool,
}

/// What the fleet can see of a running agent (shared, lock-free).
#[derive(Debug, Default)]
pub struct AgentStatus {
    /// True while the MQTT session is up.
    pub connected: AtomicBool,
    /// Installs completed (`installed`) since the process started, across power cycles.
    pub installs: AtomicU32,
    /// MQTT connection attempts that failed.
    pub connect_failures: AtomicU32,
    /// C2D messages received again with an id already seen (redeliveries).
    pub duplicate_deliveries: AtomicU32,
    /// Link drops carried out (requested through the [`Switch`]).
    pub link_drops: AtomicU32,
    /// True while the agent has work in flight: a saved command not yet done, an install (or
    /// the fetch before it, or the wait for an install slot), or reports not yet handed to MQTT.
    /// Set before the PUBACK of a command leaves, so "the hub has nothing queued and every agent
    /// is idle" means nothing is happening (the runner's compressed time relies on it).
    pub busy: AtomicBool,
    /// The [`Switch::generation`] the agent last looked at.
    pub seen_switch: AtomicU32,
}

/// What the fleet asks of one agent: power, and link faults as counters that only grow, so the
/// agent acts once per increase and no request is lost between two looks at the switch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Switch {
    /// Powered on.
    pub on: bool,
    /// MQTT link drops requested: each closes the socket without DISCONNECT.
    pub link_drops: u32,
    /// FTP cuts requested: each closes the running download's FTP connections.
    pub ftp_cuts: u32,
    /// Link drops requested for the moment the next new C2D message arrives: it is saved and
    /// acted on, then the link drops before the PUBACK goes out.
    pub drops_before_ack: u32,
    /// Update checks requested: each reads `latest.json` and installs a version that is not
    /// active (ignored while an install runs or the agent is off).
    pub checks: u32,
    /// Bumped by every change of the switch; the agent publishes the last one it looked at in
    /// [`AgentStatus::seen_switch`], so "asked but not yet acted on" is visible from outside.
    pub generation: u32,
}

impl Switch {
    /// Powered on, no faults requested.
    pub fn on() -> Self {
        Self { on: true, ..Self::default() }
    }
}

/// The last [`SEEN_IDS`] C2D message ids (hashed) an agent saved.
#[derive(Debug, Default)]
pub struct SeenIds {
    ids: [u64; SEEN_IDS],
    next: usize,
}

impl SeenIds {
    fn hash(id: &str) -> u64 {
        let mut h = std::hash::DefaultHasher::new();
        id.hash(&mut h);
        h.finish() | 1
    }

    /// True if `id` is among the remembered ones.
    pub fn contains(&self, id: &str) -> bool {
        let h = Self::hash(id);
        self.ids.contains(&h)
    }

    /// Remembers `id`, forgetting the oldest when full.
    pub fn insert(&mut self, id: &str) {
        self.ids[self.next] = Self::hash(id);
        self.next = (self.next + 1) % SEEN_IDS;
    }
}

/// Why a session ended.
enum SessionEnd {
    PowerOff,
    Shutdown,
}

/// The background work an agent can have running: a `latest.json` read or an install.
enum JobResult {
    Latest(Result<UpdateNotice, String>),
    Installed(InstallResult),
}

type Job = Pin<Box<dyn Future<Output = JobResult> + Send>>;

/// Runs one agent until `shutdown`, following the [`Switch`] (power and link faults). Installs
/// take a permit from `installs` first, which caps concurrent downloads across the fleet.
pub async fn run<I: InstallBackend>(
    cfg: Arc<AgentConfig>,
    installer: Arc<I>,
    installs: Arc<Semaphore>,
    mut power: watch::Receiver<Switch>,
    status: Arc<AgentStatus>,
    shutdown: CancellationToken,
) {
    let mut seen = SeenIds::default();
    // An install failed and no later one succeeded (kept across power cycles).
    let mut retry_due = false;
    loop {
        let switch = *power.borrow_and_update();
        status.seen_switch.store(switch.generation, Ordering::Relaxed);
        if !switch.on {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = power.changed() => if r.is_err() { return } else { continue },
            }
        }
        let session = Session { cfg: &cfg, installer: &installer, installs: &installs, status: &status };
        let end = session.run(&mut power, switch, &mut seen, &mut retry_due, &shutdown).await;
        status.connected.store(false, Ordering::Relaxed);
        // Powered off (or stopping): whatever was running stopped with the power.
        status.busy.store(false, Ordering::Relaxed);
        if matches!(end, SessionEnd::Shutdown) {
            return;
        }
    }
}

/// One powered-on period of an agent.
struct Session<'a, I> {
    cfg: &'a AgentConfig,
    installer: &'a Arc<I>,
    installs: &'a Arc<Semaphore>,
    status: &'a AgentStatus,
}

/// The MQTT link of a powered-on agent.
enum Link<'a> {
    /// No socket: connect at this instant (the backoff; the first attempt is due at once).
    Down(Instant),
    /// Connecting: TCP (and TLS), CONNECT, waiting for the CONNACK. Boxed: only while connecting.
    Connecting(Pin<Box<dyn Future<Output = Result<Connected, LinkError>> + Send + 'a>>),
    /// The session is up.
    Up(Up),
}

/// An open MQTT session: the socket, the bytes of a packet not yet complete (empty and without
/// a buffer while idle) and the keep-alive.
struct Up {
    stream: Stream,
    rbuf: BytesMut,
    keep_alive: KeepAlive,
}

/// What the link has to say.
enum LinkEvent {
    /// The backoff is over: connect.
    ConnectDue,
    /// The connection attempt ended.
    Connected(Result<Connected, LinkError>),
    /// Bytes arrived (0: the hub closed the connection).
    Read(std::io::Result<usize>),
    /// A PINGREQ is due.
    KeepAlive,
}

/// Waits for the next thing the link has to say. Cancel-safe.
async fn link_event(link: &mut Link<'_>) -> LinkEvent {
    match link {
        Link::Down(at) => {
            tokio::time::sleep_until(*at).await;
            LinkEvent::ConnectDue
        }
        Link::Connecting(attempt) => LinkEvent::Connected(attempt.as_mut().await),
        Link::Up(up) => {
            let deadline = up.keep_alive.deadline();
            tokio::select! {
                r = up.stream.read_into(&mut up.rbuf) => LinkEvent::Read(r),
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    LinkEvent::KeepAlive
                }
            }
        }
    }
}

/// A `latest.json` read or an install in the background, with what it reports meanwhile.
struct Running {
    job: Job,
    /// The install's progress (`None` for a `latest.json` read).
    progress: Option<mpsc::UnboundedReceiver<InstallState>>,
    /// Bumped to cut the job's FTP connections.
    ftp_cut: watch::Sender<u32>,
}

/// What the running job has to say.
enum JobEvent {
    Progress(InstallState),
    Done(JobResult),
}

async fn job_event(running: &mut Option<Running>) -> JobEvent {
    let Some(Running { job, progress, .. }) = running else { return std::future::pending().await };
    let progress = async {
        match progress {
            Some(rx) => rx.recv().await,
            None => None,
        }
    };
    tokio::select! {
        biased;
        Some(state) = progress => JobEvent::Progress(state),
        r = job.as_mut() => JobEvent::Done(r),
    }
}

/// A powered-on agent's state: the core, its MQTT state and link, the running job.
struct Agent<'a, I> {
    session: Session<'a, I>,
    core: AgentCore,
    mqtt: DeviceMqtt,
    link: Link<'a>,
    running: Option<Running>,
    seen: &'a mut SeenIds,
    /// Consecutive connection failures (the backoff's exponent).
    failures: u32,
    /// Link drops armed for the next new C2D message, before its PUBACK.
    drop_before_ack: u32,
    /// The command being worked on is saved in [`PENDING_FILE`].
    pending_on_disk: bool,
}

impl<I: InstallBackend> Session<'_, I> {
    async fn run(
        self,
        power: &mut watch::Receiver<Switch>,
        mut applied: Switch,
        seen: &mut SeenIds,
        retry_due: &mut bool,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let cfg = self.cfg;
        let id = &cfg.device_id;
        let on_disk = self.installer.current_version(&self.context(watch::channel(0).1));
        let version = on_disk.or_else(|| cfg.initial_version.as_deref().map(str::to_string));
        let core = AgentCore::new(id.clone(), version)
            .with_retry_on_reconnect(cfg.retry_on_reconnect)
            .with_retry_due(*retry_due);
        let pending_path = cfg.data_dir.join(PENDING_FILE);
        let mut agent = Agent {
            session: self,
            core,
            mqtt: DeviceMqtt::default(),
            link: Link::Down(Instant::now()),
            running: None,
            seen,
            failures: 0,
            drop_before_ack: 0,
            pending_on_disk: false,
        };

        let mut actions = Vec::new();
        if let Ok(body) = tokio::fs::read(&pending_path).await {
            tracing::debug!(device = %id, "resuming the command saved before the power went off");
            agent.pending_on_disk = true;
            actions = agent.core.on_c2d(&body, SystemClock.now_ms());
        }
        loop {
            agent.carry_out(std::mem::take(&mut actions));
            *retry_due = agent.core.retry_due();
            if agent.pending_on_disk && !agent.core.is_busy() && agent.running.is_none() {
                if let Err(e) = tokio::fs::remove_file(&pending_path).await {
                    tracing::warn!(device = %id, "cannot remove {}: {e}", pending_path.display());
                }
                agent.pending_on_disk = false;
            }
            // Before the write: a PUBACK cannot reach the hub before `busy` says the command it
            // completes is being acted on. After it: what left is no longer waiting.
            agent.publish_busy();
            agent.flush().await;
            agent.publish_busy();

            // Biased: a switch change made before a message arrived is applied before it.
            actions = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return SessionEnd::Shutdown,
                r = power.changed() => {
                    if r.is_err() {
                        return SessionEnd::Shutdown;
                    }
                    let switch = *power.borrow_and_update();
                    agent.session.status.seen_switch.store(switch.generation, Ordering::Relaxed);
                    if !switch.on {
                        return SessionEnd::PowerOff;
                    }
                    let actions = agent.apply(&applied, &switch);
                    applied = switch;
                    actions
                }
                e = job_event(&mut agent.running), if agent.running.is_some() => agent.on_job(e),
                e = link_event(&mut agent.link) => agent.on_link(e).await,
            };
        }
    }

    /// What an installer needs to know of the device (a fresh SAS token for FTP).
    fn context(&self, ftp_cuts: watch::Receiver<u32>) -> DeviceContext {
        DeviceContext {
            device_id: self.cfg.device_id.clone(),
            data_dir: self.cfg.data_dir.clone(),
            sas_token: self.ftp_token(),
            ftp_cuts,
        }
    }

    /// The CONNECT password: a fresh device SAS token, or none for an X.509 device.
    fn mqtt_password(&self) -> String {
        match &self.cfg.auth {
            AgentAuth::Sas => self.fresh_token(),
            AgentAuth::X509 { .. } => String::new(),
        }
    }

    /// The FTP password: a fresh SAS token for the device (see [`AgentAuth`]).
    fn ftp_token(&self) -> String {
        match &self.cfg.auth {
            AgentAuth::Sas => self.fresh_token(),
            AgentAuth::X509 { ftp_policy } => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let resource = format!("{}/devices/{}", self.cfg.hub_host, self.cfg.device_id);
                let (name, key) = &**ftp_policy;
                iothub_emulator::sas::make_token(
                    &resource,
                    key,
                    Some(name),
                    now + mqtt_device::TOKEN_LIFETIME_SECS,
                )
                .unwrap_or_else(|e| {
                    tracing::error!(device = %self.cfg.device_id, "cannot sign an FTP token: {e}");
                    String::new()
                })
            }
        }
    }

    fn fresh_token(&self) -> String {
        mqtt_device::fresh_password(&self.cfg.hub_host, &self.cfg.device_id, &self.cfg.device_key)
            .unwrap_or_else(|e| {
                tracing::error!(device = %self.cfg.device_id, "cannot sign a SAS token: {e}");
                String::new()
            })
    }

    fn fetch_latest_job(&self) -> Running {
        let (ftp_cut, cuts) = watch::channel(0u32);
        let (installer, ctx) = (self.installer.clone(), self.context(cuts));
        let job = Box::pin(async move { JobResult::Latest(installer.fetch_latest(&ctx).await) });
        Running { job, progress: None, ftp_cut }
    }

    fn install_job(&self, notice: UpdateNotice) -> Running {
        let (ftp_cut, cuts) = watch::channel(0u32);
        let (progress_tx, progress) = mpsc::unbounded_channel();
        let (installer, installs, ctx) = (self.installer.clone(), self.installs.clone(), self.context(cuts));
        let job = Box::pin(async move {
            let Ok(_permit) = installs.acquire_owned().await else {
                return JobResult::Installed(InstallResult::Failed("the fleet is shutting down".into()));
            };
            JobResult::Installed(installer.install(&ctx, &notice, progress_tx).await)
        });
        Running { job, progress: Some(progress), ftp_cut }
    }
}

impl<'a, I: InstallBackend> Agent<'a, I> {
    fn id(&self) -> &'a str {
        let cfg: &'a AgentConfig = self.session.cfg;
        &cfg.device_id
    }

    /// Queues the core's publishes and starts its fetches and installs.
    fn carry_out(&mut self, actions: Vec<Action>) {
        for action in actions {
            match self.mqtt.take_publish(action) {
                None | Some(Action::Publish { .. }) => {}
                Some(Action::FetchLatest) => self.running = Some(self.session.fetch_latest_job()),
                Some(Action::Install(notice)) => self.running = Some(self.session.install_job(notice)),
            }
        }
    }

    /// [`AgentStatus::busy`]: a job, a command not done, or packets waiting or unacknowledged.
    fn publish_busy(&self) {
        let busy =
            self.running.is_some() || self.core.is_busy() || self.pending_on_disk || !self.mqtt.is_idle();
        self.session.status.busy.store(busy, Ordering::Relaxed);
    }

    /// Writes what may go out now, within [`WRITE_TIMEOUT`]; a failed write loses the link.
    async fn flush(&mut self) {
        let Link::Up(up) = &mut self.link else { return };
        let mut buf = BytesMut::new();
        while let Some(p) = self.mqtt.poll_transmit() {
            if let Err(e) = mqtt_device::encode(&p, &mut buf, MAX_OUTGOING_BYTES) {
                tracing::warn!(device = %self.session.cfg.device_id, "not sent: {e}");
            }
        }
        if buf.is_empty() {
            return;
        }
        if let Err(e) = up.stream.write_all(&buf, WRITE_TIMEOUT).await {
            self.session.status.connect_failures.fetch_add(1, Ordering::Relaxed);
            self.lose_link(&e.to_string());
        }
    }

    /// Applies a switch change (power is handled by the caller); the core's answer to a check.
    fn apply(&mut self, applied: &Switch, switch: &Switch) -> Vec<Action> {
        if switch.ftp_cuts != applied.ftp_cuts
            && let Some(r) = &self.running
        {
            r.ftp_cut.send_modify(|n| *n = n.wrapping_add(1));
        }
        self.drop_before_ack = self
            .drop_before_ack
            .saturating_add(switch.drops_before_ack.wrapping_sub(applied.drops_before_ack));
        if switch.link_drops != applied.link_drops && !matches!(self.link, Link::Down(_)) {
            self.lose_link("link dropped");
        }
        if switch.checks != applied.checks { self.core.on_check() } else { Vec::new() }
    }

    fn on_job(&mut self, event: JobEvent) -> Vec<Action> {
        let now = SystemClock.now_ms();
        let r = match event {
            JobEvent::Progress(state) => return self.core.on_progress(state, now),
            JobEvent::Done(r) => r,
        };
        // Report the transitions the job sent before it ended, in order, first.
        let mut reports = Vec::new();
        if let Some(mut progress) = self.running.take().and_then(|r| r.progress) {
            while let Ok(state) = progress.try_recv() {
                reports.extend(self.core.on_progress(state, now));
            }
        }
        reports.extend(match r {
            JobResult::Latest(latest) => self.core.on_latest(latest, now),
            JobResult::Installed(outcome) => {
                if outcome == InstallResult::Installed {
                    self.session.status.installs.fetch_add(1, Ordering::Relaxed);
                }
                self.core.on_install_done(outcome, now)
            }
        });
        reports
    }

    async fn on_link(&mut self, event: LinkEvent) -> Vec<Action> {
        let cfg = self.session.cfg;
        match event {
            LinkEvent::ConnectDue => {
                let connect = mqtt_device::connect_packet(
                    &cfg.device_id,
                    &cfg.hub_host,
                    self.session.mqtt_password(),
                    cfg.keep_alive,
                );
                self.link = Link::Connecting(Box::pin(async move {
                    transport::connect(
                        &cfg.mqtt_host,
                        cfg.mqtt_port,
                        cfg.tls.as_ref(),
                        &connect,
                        MAX_INCOMING_BYTES,
                        CONNECT_TIMEOUT,
                    )
                    .await
                }));
                Vec::new()
            }
            LinkEvent::Connected(Err(e)) => {
                self.session.status.connect_failures.fetch_add(1, Ordering::Relaxed);
                self.lose_link(&e.to_string());
                Vec::new()
            }
            LinkEvent::Connected(Ok(c)) => {
                self.failures = 0;
                self.session.status.connected.store(true, Ordering::Relaxed);
                tracing::debug!(device = %cfg.device_id, "connected");
                let keep_alive = KeepAlive::new(cfg.keep_alive, Instant::now());
                self.link = Link::Up(Up { stream: c.stream, rbuf: c.rest, keep_alive });
                let mut actions = self.on_packet(Packet::ConnAck(c.connack)).await;
                actions.extend(self.on_bytes().await);
                actions
            }
            LinkEvent::Read(Ok(0)) => self.fail("the hub closed the connection"),
            LinkEvent::Read(Err(e)) => self.fail(&format!("socket: {e}")),
            LinkEvent::Read(Ok(_)) => self.on_bytes().await,
            LinkEvent::KeepAlive => {
                let Link::Up(up) = &mut self.link else { return Vec::new() };
                match up.keep_alive.on_deadline(Instant::now()) {
                    Ok(Some(_ping)) => self.mqtt.ping(),
                    Ok(None) => {}
                    Err(e) => return self.fail(&e.to_string()),
                }
                Vec::new()
            }
        }
    }

    /// The link failed: counted, lost.
    fn fail(&mut self, why: &str) -> Vec<Action> {
        self.session.status.connect_failures.fetch_add(1, Ordering::Relaxed);
        self.lose_link(why);
        Vec::new()
    }

    /// Handles every complete packet in the read buffer, then gives the buffer back if empty.
    async fn on_bytes(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        loop {
            let Link::Up(up) = &mut self.link else { return actions };
            match mqtt_device::take_packet(&mut up.rbuf, MAX_INCOMING_BYTES, transport::RESERVE_AHEAD_BYTES) {
                Ok(Some(p)) => actions.extend(self.on_packet(p).await),
                Ok(None) => {
                    if up.rbuf.is_empty() {
                        up.rbuf = BytesMut::new();
                    }
                    return actions;
                }
                Err(e) => {
                    actions.extend(self.fail(&e.to_string()));
                    return actions;
                }
            }
        }
    }

    /// One packet from the hub.
    async fn on_packet(&mut self, packet: Packet) -> Vec<Action> {
        let id = self.id();
        match self.mqtt.handle(id, packet, self.seen) {
            Incoming::Connected => self.core.on_connected(),
            Incoming::Refused(code) => self.fail(&format!("CONNECT refused: {code:?}")),
            Incoming::Pong => {
                if let Link::Up(up) = &mut self.link {
                    up.keep_alive.on_pingresp();
                }
                Vec::new()
            }
            Incoming::Nothing => Vec::new(),
            Incoming::Desired(notice) => self.core.on_desired(&notice, SystemClock.now_ms()),
            Incoming::Duplicate { message_id } => {
                // Saved and acted on before; the hub never got the PUBACK.
                self.session.status.duplicate_deliveries.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(device = %id, message_id = ?message_id, "duplicate C2D delivery");
                Vec::new()
            }
            Incoming::Command(cmd) => {
                // Save first, then PUBACK (which completes the message at the hub).
                let pending_path = self.session.cfg.data_dir.join(PENDING_FILE);
                match tokio::fs::write(&pending_path, &cmd.payload).await {
                    Ok(()) => {
                        self.pending_on_disk = true;
                        if let Some(m) = &cmd.message_id {
                            self.seen.insert(m);
                        }
                    }
                    Err(e) => tracing::warn!(device = %id, "cannot save the C2D command: {e}"),
                }
                let out = self.core.on_c2d(&cmd.payload, SystemClock.now_ms());
                if self.drop_before_ack > 0 {
                    self.drop_before_ack -= 1;
                    self.lose_link("link dropped before the PUBACK");
                } else {
                    self.mqtt.ack(cmd.pkid);
                }
                out
            }
        }
    }

    /// The MQTT link is gone (an error, or a requested drop): closes the socket without
    /// DISCONNECT, discards acknowledgements not yet sent (the hub redelivers those messages),
    /// keeps the reports (unacknowledged ones are resent) and reconnects after the backoff.
    fn lose_link(&mut self, why: &str) {
        let status = self.session.status;
        if matches!(self.link, Link::Up(_)) {
            status.link_drops.fetch_add(1, Ordering::Relaxed);
        }
        self.mqtt.link_lost();
        status.connected.store(false, Ordering::Relaxed);
        self.failures = self.failures.saturating_add(1);
        let cfg = self.session.cfg;
        let delay = backoff(cfg.backoff_min, cfg.backoff_max, self.failures);
        tracing::debug!(device = %cfg.device_id, ?delay, "MQTT connection lost: {why}");
        // Drops the socket (or the attempt).
        self.link = Link::Down(Instant::now() + delay);
    }
}

/// The delay before reconnect attempt `failures` (1-based): `min * 2^(failures-1)` capped at
/// `max`, then a random point in its upper half (equal jitter), so a fleet cut off at once does
/// not come back at once.
pub fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    let exp = min.saturating_mul(1u32 << failures.saturating_sub(1).min(16)).min(max);
    let half = exp / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// A rustls client configuration trusting `ca_pem` (the emulator's CA), for MQTT over TLS (the
/// installer's FTPS uses the same).
pub use crate::install::ftp::tls_trusting as tls_config;

/// A TLS client configuration trusting only the CA in `ca_pem` (the hub's) and presenting the
/// device certificate `cert_pem` with its key `key_pem` (an X.509 device).
pub fn tls_config_with_client_cert(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("the CA PEM cannot be read: {e}"))?;
        roots.add(cert).map_err(|e| format!("the CA certificate is not usable: {e}"))?;
    }
    let chain = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the device certificate cannot be read: {e}"))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| format!("the device key cannot be read: {e}"))?
        .ok_or("no private key in the device key PEM")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("the device certificate is not usable: {e}"))?;
    Ok(Arc::new(config))
}

/// The data directory of `device_id` under `root` (one directory per device).
pub fn data_dir(root: &Path, device_id: &str) -> PathBuf {
    let safe: String = device_id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-._".contains(c) { c } else { '_' })
        .collect();
    root.join(safe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_in_the_upper_half() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        for (n, full) in [(1, 100), (2, 200), (3, 400), (6, 2000), (40, 2000)] {
            for _ in 0..20 {
                let d = backoff(min, max, n).as_millis() as u64;
                assert!((full / 2..=full).contains(&d), "attempt {n}: {d} ms not in {}..={full}", full / 2);
            }
        }
    }

    #[test]
    fn seen_ids_remember_the_last_few_message_ids() {
        let mut seen = SeenIds::default();
        assert!(!seen.contains("m0"));
        for i in 0..SEEN_IDS {
            seen.insert(&format!("m{i}"));
        }
        assert!((0..SEEN_IDS).all(|i| seen.contains(&format!("m{i}"))));
        assert!(!seen.contains("other"));
        seen.insert("newest");
        assert!(seen.contains("newest") && !seen.contains("m0"), "the oldest is forgotten first");
        assert!(seen.contains("m1"));
    }

    #[test]
    fn data_dirs_are_per_device_and_path_safe() {
        let root = Path::new("/r");
        assert_eq!(data_dir(root, "dev-1"), Path::new("/r/dev-1"));
        assert_eq!(data_dir(root, "../x/y"), Path::new("/r/.._x_y"));
    }

    #[test]
    fn an_agent_task_stays_small() {
        // The whole per-agent task of a fleet is this future (plus the socket and a few Arcs):
        // keep it well under the 6 KiB per connected agent the fleet bench aims for.
        let cfg = Arc::new(AgentConfig {
            device_id: "d1".into(),
            device_key: iothub_emulator::hub::DEFAULT_OWNER_KEY.into(),
            auth: AgentAuth::Sas,
            hub_host: "hub.local".into(),
            mqtt_host: "127.0.0.1".into(),
            mqtt_port: 1,
            tls: None,
            keep_alive: Duration::from_secs(60),
            data_dir: PathBuf::from("/nonexistent"),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(2),
            initial_version: None,
            retry_on_reconnect: true,
        });
        let (_power, power_rx) = watch::channel(Switch::on());
        let backend = Arc::new(FtpBackend::new("127.0.0.1:1"));
        let status = Arc::new(AgentStatus::default());
        let task = run(cfg, backend, Arc::new(Semaphore::new(1)), power_rx, status, CancellationToken::new());
        let size = std::mem::size_of_val(&task);
        assert!(size <= 2560, "the agent's future is {size} bytes");
        assert!(std::mem::size_of::<DeviceMqtt>() <= 16);
    }
}
