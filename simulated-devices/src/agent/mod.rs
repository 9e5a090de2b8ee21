//! One agent: the app on one simulated device. It keeps an MQTT 3.1.1 session with the hub
//! (clean_session=0, IoT Hub's username/password/client-id contract, reconnects with exponential
//! backoff and jitter), turns C2D messages into installs, and reports every transition through
//! the twin's reported properties and D2C telemetry.
//!
//! The decisions live in [`core::AgentCore`] (sans-IO); this module is the driver that owns the
//! socket, the running install and the device's "pending command" file. A C2D message is written
//! to `<data_dir>/pending-c2d` *before* it is acknowledged (PUBACK completes it at the hub), so a
//! power cut between the two loses nothing: the next boot resumes the command from disk.
//!
//! Power and link faults: [`run`] follows a `watch` [`Switch`]. Off drops the MQTT event loop (the
//! socket closes without DISCONNECT, like a power cut) and the running install future; on boots a
//! fresh session with the version found on disk. A link drop closes only the socket (again no
//! DISCONNECT) and reconnects after the normal backoff, keeping the running install; it can also
//! cut the install's FTP connections, and the download resumes with `REST`. Acknowledgements not
//! yet sent when the link drops are discarded: the hub redelivers those messages.
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

use std::collections::VecDeque;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use iothub_emulator::clock::{Clock, SystemClock};
use rumqttc::{
    AsyncClient, ClientError, Event, EventLoop, MqttOptions, Packet, Publish, QoS, TlsConfiguration,
    Transport,
};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::core::{Action, AgentCore, InstallResult};
pub use self::ftp_backend::FtpBackend;
pub use self::installer::{DeviceContext, InstallBackend};
use crate::notice::{InstallState, UpdateNotice};

/// The file holding the C2D command being worked on, so it survives a power cut.
const PENDING_FILE: &str = "pending-c2d";
/// SAS tokens the agent signs live this long; every (re)connect signs a fresh one.
const TOKEN_LIFETIME_SECS: u64 = 24 * 3600;
/// Requests (publishes, acks) buffered between the agent and its MQTT event loop.
const REQUEST_CAPACITY: usize = 16;
/// Outgoing QoS 1 publishes in flight. rumqttc preallocates a slot per inflight message, so a
/// small window keeps per-agent memory small.
const INFLIGHT: u16 = 4;
/// Largest incoming packet (C2D is at most 64 KB plus topic and properties).
const MAX_INCOMING_BYTES: usize = 70 * 1024;
/// Largest outgoing packet (D2C is at most 256 KB).
const MAX_OUTGOING_BYTES: usize = 256 * 1024;
/// Messages waiting for room in the request channel; beyond this the oldest report is dropped.
const OUTBOX_CAPACITY: usize = 64;
/// C2D message ids remembered for duplicate detection.
pub const SEEN_IDS: usize = 8;

/// How one agent reaches the hub.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The device id (MQTT client id).
    pub device_id: String,
    /// The device's symmetric key (base64).
    pub device_key: String,
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

/// A request waiting for room in the MQTT request channel.
enum Outgoing {
    Publish { topic: String, payload: Vec<u8>, qos: QoS },
    Ack(Publish),
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
        let id = &self.cfg.device_id;
        let (ftp_cut, ftp_cuts) = watch::channel(0u32);
        let ctx = DeviceContext {
            device_id: id.clone(),
            data_dir: self.cfg.data_dir.clone(),
            sas_token: self.fresh_token(),
            ftp_cuts,
        };
        let on_disk = self.installer.current_version(&ctx);
        let version = on_disk.or_else(|| self.cfg.initial_version.as_deref().map(str::to_string));
        let mut core = AgentCore::new(id.clone(), version)
            .with_retry_on_reconnect(self.cfg.retry_on_reconnect)
            .with_retry_due(*retry_due);
        let (client, mut eventloop) = AsyncClient::new(self.mqtt_options(&ctx.sas_token), REQUEST_CAPACITY);
        let (progress_tx, mut progress_rx) = mpsc::unbounded_channel();
        let mut job: Option<Job> = None;
        let mut outbox = VecDeque::new();
        // QoS 1 publishes handed to the MQTT client and not yet acknowledged by the hub. The client
        // resends them after a reconnect, so each gets its PUBACK within this session.
        let mut unacked = 0u32;
        let mut failures = 0u32;
        // While the link is down: when to reconnect (the install keeps running meanwhile).
        let mut reconnect_at: Option<Instant> = None;
        // Link drops armed for the next new C2D message, before its PUBACK.
        let mut drop_before_ack = 0u32;
        let pending_path = self.cfg.data_dir.join(PENDING_FILE);
        let mut pending_on_disk = false;
        let clock = SystemClock;

        let mut actions = Vec::new();
        if let Ok(body) = tokio::fs::read(&pending_path).await {
            tracing::debug!(device = %id, "resuming the command saved before the power went off");
            pending_on_disk = true;
            actions = core.on_c2d(&body, clock.now_ms());
        }
        loop {
            *retry_due = core.retry_due();
            for action in actions.drain(..) {
                match action {
                    Action::Publish { topic, payload, at_least_once } => {
                        let qos = if at_least_once { QoS::AtLeastOnce } else { QoS::AtMostOnce };
                        push_bounded(&mut outbox, Outgoing::Publish { topic, payload, qos });
                    }
                    Action::FetchLatest => job = Some(self.fetch_latest_job(&ctx)),
                    Action::Install(notice) => {
                        job = Some(self.install_job(&ctx, notice, progress_tx.clone()))
                    }
                }
            }
            if pending_on_disk && !core.is_busy() && job.is_none() {
                if let Err(e) = tokio::fs::remove_file(&pending_path).await {
                    tracing::warn!(device = %id, "cannot remove {}: {e}", pending_path.display());
                }
                pending_on_disk = false;
            }
            unacked = unacked.saturating_add(flush(&client, &mut outbox));
            // After the flush (which only queues for the event loop below, in this task): a PUBACK
            // cannot reach the hub before `busy` says the command it completes is being acted on,
            // and a report counts until the hub has acknowledged (and so recorded) it.
            let busy =
                job.is_some() || core.is_busy() || pending_on_disk || !outbox.is_empty() || unacked > 0;
            self.status.busy.store(busy, Ordering::Relaxed);

            let now = || clock.now_ms();
            // Biased: a switch change made before a message arrived is applied before it.
            actions = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return SessionEnd::Shutdown,
                r = power.changed() => {
                    if r.is_err() {
                        return SessionEnd::Shutdown;
                    }
                    let switch = *power.borrow_and_update();
                    self.status.seen_switch.store(switch.generation, Ordering::Relaxed);
                    if !switch.on {
                        return SessionEnd::PowerOff;
                    }
                    if switch.ftp_cuts != applied.ftp_cuts {
                        ftp_cut.send_modify(|n| *n = n.wrapping_add(1));
                    }
                    drop_before_ack =
                        drop_before_ack.saturating_add(switch.drops_before_ack.wrapping_sub(applied.drops_before_ack));
                    let drop_now = switch.link_drops != applied.link_drops;
                    let check = switch.checks != applied.checks;
                    applied = switch;
                    if drop_now && reconnect_at.is_none() {
                        reconnect_at = Some(self.lose_link(&mut eventloop, &mut outbox, &mut failures, "link dropped"));
                    }
                    if check { core.on_check() } else { Vec::new() }
                }
                Some(state) = progress_rx.recv() => core.on_progress(state, now()),
                r = async { job.as_mut().expect("guarded by the select condition").await }, if job.is_some() => {
                    job = None;
                    // Report the transitions the job sent before it ended, in order, first.
                    let mut reports = Vec::new();
                    while let Ok(state) = progress_rx.try_recv() {
                        reports.extend(core.on_progress(state, now()));
                    }
                    reports.extend(match r {
                        JobResult::Latest(latest) => core.on_latest(latest, now()),
                        JobResult::Installed(outcome) => {
                            if outcome == InstallResult::Installed {
                                self.status.installs.fetch_add(1, Ordering::Relaxed);
                            }
                            core.on_install_done(outcome, now())
                        }
                    });
                    reports
                }
                _ = tokio::time::sleep_until(reconnect_at.unwrap_or_else(Instant::now)), if reconnect_at.is_some() => {
                    reconnect_at = None;
                    self.refresh_credentials(&mut eventloop);
                    Vec::new()
                }
                event = eventloop.poll(), if reconnect_at.is_none() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        failures = 0;
                        self.status.connected.store(true, Ordering::Relaxed);
                        tracing::debug!(device = %id, "connected");
                        subscribe(&client, id);
                        core.on_connected()
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if contract::is_c2d_topic(id, &p.topic) => {
                        let message_id = contract::c2d_message_id(&p.topic);
                        if message_id.as_deref().is_some_and(|m| seen.contains(m)) {
                            // Saved and acted on before; the hub never got the PUBACK.
                            self.status.duplicate_deliveries.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(device = %id, message_id = ?message_id, "duplicate C2D delivery");
                            push_bounded(&mut outbox, Outgoing::Ack(p));
                            Vec::new()
                        } else {
                            // Save first, then PUBACK (which completes the message at the hub).
                            match tokio::fs::write(&pending_path, &p.payload).await {
                                Ok(()) => {
                                    pending_on_disk = true;
                                    if let Some(m) = &message_id {
                                        seen.insert(m);
                                    }
                                }
                                Err(e) => tracing::warn!(device = %id, "cannot save the C2D command: {e}"),
                            }
                            let body = p.payload.clone();
                            let out = core.on_c2d(&body, now());
                            if drop_before_ack > 0 {
                                drop_before_ack -= 1;
                                reconnect_at = Some(self.lose_link(
                                    &mut eventloop,
                                    &mut outbox,
                                    &mut failures,
                                    "link dropped before the PUBACK",
                                ));
                            } else {
                                push_bounded(&mut outbox, Outgoing::Ack(p));
                            }
                            out
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        push_bounded(&mut outbox, Outgoing::Ack(p));
                        Vec::new()
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        unacked = unacked.saturating_sub(1);
                        Vec::new()
                    }
                    Ok(_) => Vec::new(),
                    Err(e) => {
                        self.status.connect_failures.fetch_add(1, Ordering::Relaxed);
                        reconnect_at =
                            Some(self.lose_link(&mut eventloop, &mut outbox, &mut failures, &e.to_string()));
                        Vec::new()
                    }
                },
            };
        }
    }

    /// The MQTT link is gone (an error, or a requested drop): closes the socket without
    /// DISCONNECT, discards acknowledgements not yet sent (the hub redelivers those messages)
    /// and returns when to reconnect (the backoff).
    fn lose_link(
        &self,
        eventloop: &mut EventLoop,
        outbox: &mut VecDeque<Outgoing>,
        failures: &mut u32,
        why: &str,
    ) -> Instant {
        if eventloop.network.is_some() {
            self.status.link_drops.fetch_add(1, Ordering::Relaxed);
        }
        // Drops the socket; unacknowledged publishes are kept for the next session.
        eventloop.clean();
        outbox.retain(|o| !matches!(o, Outgoing::Ack(_)));
        self.status.connected.store(false, Ordering::Relaxed);
        *failures = failures.saturating_add(1);
        let delay = backoff(self.cfg.backoff_min, self.cfg.backoff_max, *failures);
        tracing::debug!(device = %self.cfg.device_id, ?delay, "MQTT connection lost: {why}");
        Instant::now() + delay
    }

    fn fresh_token(&self) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        contract::password(
            &self.cfg.hub_host,
            &self.cfg.device_id,
            &self.cfg.device_key,
            now + TOKEN_LIFETIME_SECS,
        )
        .unwrap_or_else(|e| {
            tracing::error!(device = %self.cfg.device_id, "cannot sign a SAS token: {e}");
            String::new()
        })
    }

    fn refresh_credentials(&self, eventloop: &mut EventLoop) {
        let user = contract::username(&self.cfg.hub_host, &self.cfg.device_id);
        eventloop.mqtt_options.set_credentials(user, self.fresh_token());
    }

    fn mqtt_options(&self, token: &str) -> MqttOptions {
        let cfg = self.cfg;
        let mut o = MqttOptions::new(cfg.device_id.clone(), cfg.mqtt_host.clone(), cfg.mqtt_port);
        o.set_clean_session(false)
            .set_keep_alive(cfg.keep_alive)
            .set_credentials(contract::username(&cfg.hub_host, &cfg.device_id), token)
            .set_manual_acks(true)
            .set_inflight(INFLIGHT)
            .set_max_packet_size(MAX_INCOMING_BYTES, MAX_OUTGOING_BYTES);
        if let Some(tls) = &cfg.tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls.clone())));
        }
        o
    }

    fn fetch_latest_job(&self, ctx: &DeviceContext) -> Job {
        let (installer, ctx) = (self.installer.clone(), ctx.clone());
        Box::pin(async move { JobResult::Latest(installer.fetch_latest(&ctx).await) })
    }

    fn install_job(
        &self,
        ctx: &DeviceContext,
        notice: UpdateNotice,
        progress: mpsc::UnboundedSender<InstallState>,
    ) -> Job {
        let (installer, installs, ctx) = (self.installer.clone(), self.installs.clone(), ctx.clone());
        Box::pin(async move {
            let Ok(_permit) = installs.acquire_owned().await else {
                return JobResult::Installed(InstallResult::Failed("the fleet is shutting down".into()));
            };
            JobResult::Installed(installer.install(&ctx, &notice, progress).await)
        })
    }
}

/// Subscribes to C2D and twin responses. With clean_session=0 the hub keeps the subscriptions,
/// but subscribing again is harmless and covers a hub that lost the session.
fn subscribe(client: &AsyncClient, device_id: &str) {
    let filters = [
        rumqttc::SubscribeFilter::new(contract::c2d_filter(device_id), QoS::AtLeastOnce),
        rumqttc::SubscribeFilter::new(contract::TWIN_RESPONSE_FILTER.into(), QoS::AtMostOnce),
    ];
    if let Err(e) = client.try_subscribe_many(filters) {
        tracing::warn!(device = device_id, "cannot queue the subscription: {e}");
    }
}

fn push_bounded(outbox: &mut VecDeque<Outgoing>, item: Outgoing) {
    if outbox.len() >= OUTBOX_CAPACITY {
        outbox.pop_front();
        tracing::warn!("outbox full: dropped the oldest report");
    }
    outbox.push_back(item);
}

/// Moves what fits from the outbox into the request channel.
/// Hands what the outbox holds to the MQTT client, in order, until its request channel is full;
/// returns how many QoS 1 publishes it handed over.
fn flush(client: &AsyncClient, outbox: &mut VecDeque<Outgoing>) -> u32 {
    let mut at_least_once = 0;
    while let Some(item) = outbox.pop_front() {
        let r = match &item {
            Outgoing::Publish { topic, payload, qos } => {
                client.try_publish(topic.as_str(), *qos, false, payload.clone())
            }
            Outgoing::Ack(p) => client.try_ack(p),
        };
        match r {
            Ok(()) => {
                if matches!(item, Outgoing::Publish { qos: QoS::AtLeastOnce, .. }) {
                    at_least_once += 1;
                }
            }
            Err(ClientError::TryRequest(_)) | Err(ClientError::Request(_)) => {
                outbox.push_front(item);
                return at_least_once;
            }
        }
    }
    at_least_once
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
}
