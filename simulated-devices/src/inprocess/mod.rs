//! In-process devices: a fleet whose agents reach the hub without sockets. Each device is the
//! agent's real sans-IO core ([`AgentCore`]) on one side and the hub's real MQTT session state
//! machine ([`Session`], admitted by [`accept_connect_with`] with a SAS-token CONNECT) on the other;
//! this module carries MQTT packets between the two as values (CONNECT, SUBSCRIBE, PUBLISH and
//! PUBACK both ways, twin-patch and telemetry topics), so one process holds a million devices.
//! The device's side of the protocol (the CONNECT, SUBSCRIBE, packet ids, publishes in flight,
//! the outbox kept across a lost link, duplicate C2D detection) is the socket agent's
//! [`DeviceMqtt`]: one device-side MQTT implementation for both transports.
//!
//! Ownership: the fleet is split into a few partitions (one per core by default); device `i`
//! belongs to partition `i % P`, whose task owns its state outright (no locks, no task or timer
//! per device). A partition wakes for the runner's commands (power, link faults, update checks:
//! one channel), for its links' hub events (one [`ReadySet`], fed by the hub when a C2D message is
//! queued or a connection is kicked) and for its next due connect (the ramp cursor and a heap of
//! reconnects). Every step runs to quiescence at once: a C2D delivery, the agent's install
//! against [`MemoryPackages`] and every report it publishes happen in one go, unless tier
//! throttling shapes a request: then the session is held as a socket connection would be (its
//! answers reach the device, and the device is heard again, when hub time reaches the request's
//! turn; one heap of hold ends per partition). Work is done in
//! batches of [`BATCH`] with a yield between, so other tasks (the hub's listeners, the runner)
//! keep running.
//!
//! What a device keeps: its core (boxed, absent while off), its connection (boxed, absent while
//! disconnected), its MQTT state (queues boxed, absent while empty), the version "on disk", the
//! ids of the last C2D messages it saved, and a few counters: a few hundred bytes. The
//! pending-command file of socket agents is not needed: a command is saved, acted on and
//! acknowledged in one step, which a power cut cannot split. A link drop armed before an
//! acknowledgement still drops it: the hub redelivers, the agent sees a duplicate and
//! acknowledges without acting again. Reports queued when the link drops are sent after the
//! reconnect (a QoS 1 one the hub took without acknowledging it, again).

pub mod packages;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use iothub_emulator::Hub;
use iothub_emulator::clock::{Clock, Millis, SystemClock};
use iothub_emulator::hub::link::{Attached, ReadyHook, ReadySet};
use iothub_emulator::mqtt::session::{Session, accept_connect_with};
use rumqttc::mqttbytes::v4::Packet;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::packages::MemoryPackages;
use crate::agent::core::{Action, AgentCore, InstallResult};
use crate::agent::mqtt_device::{self, DeviceMqtt, Incoming};
use crate::agent::{SeenIds, backoff};

/// Devices a partition handles before it yields to other tasks.
pub const BATCH: usize = 64;
/// The keep-alive in the CONNECT (no socket: nothing times out, but the hub checks the field).
const KEEP_ALIVE: Duration = Duration::from_secs(60);

/// Everything an in-process fleet needs.
#[derive(Debug, Clone)]
pub struct InProcessConfig {
    /// The devices, in fleet order (device `i` is `device_ids[i]`).
    pub device_ids: Arc<[String]>,
    /// The fleet secret every device key derives from ([`crate::fleet::device_key`]).
    pub fleet_key: String,
    /// The version every device runs before its first install.
    pub initial_version: Option<String>,
    /// Devices connected per second (the ramp); 0 connects all at once.
    pub ramp_per_sec: u32,
    /// After a failed install, check `latest.json` again on every reconnect.
    pub retry_on_reconnect: bool,
    /// First reconnect delay (doubles per failure, with jitter).
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Partitions (tasks); 0 means one per available core.
    pub partitions: usize,
}

impl InProcessConfig {
    /// A configuration with the socket fleet's defaults for everything but the devices.
    pub fn new(device_ids: Arc<[String]>, fleet_key: &str) -> Self {
        Self {
            device_ids,
            fleet_key: fleet_key.to_string(),
            initial_version: None,
            ramp_per_sec: 0,
            retry_on_reconnect: true,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            partitions: 0,
        }
    }
}

/// What the runner can read of one device (lock-free).
#[derive(Debug, Default)]
struct DevStatus {
    installs: AtomicU32,
    duplicates: AtomicU32,
    link_drops: AtomicU32,
}

/// A partition's counters, for [`InProcessFleet::connected`] and [`InProcessFleet::unsettled`].
#[derive(Debug, Default)]
struct Counters {
    connected: AtomicUsize,
    /// Powered on but not connected (waiting for the ramp or a reconnect).
    disconnected_on: AtomicUsize,
    /// Commands sent and not yet carried out, plus hub events not yet looked at.
    pending: AtomicUsize,
    connect_failures: AtomicUsize,
}

/// What the runner asks of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Power(bool),
    DropLink,
    DropBeforeAck,
    Check,
}

struct PartHandle {
    tx: mpsc::UnboundedSender<(u32, Cmd)>,
    counters: Arc<Counters>,
}

/// A running in-process fleet. Stop it with [`InProcessFleet::stop`].
pub struct InProcessFleet {
    parts: Vec<PartHandle>,
    status: Arc<[DevStatus]>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl InProcessFleet {
    /// Starts the fleet against `hub` (every device powered on, connecting along the ramp),
    /// installing from `packages`.
    pub fn start(hub: Hub, cfg: InProcessConfig, packages: Arc<MemoryPackages>) -> Self {
        let n = cfg.device_ids.len();
        let nparts = match cfg.partitions {
            0 => std::thread::available_parallelism().map_or(1, |p| p.get()),
            p => p,
        }
        .clamp(1, n.max(1));
        let status: Arc<[DevStatus]> = (0..n).map(|_| DevStatus::default()).collect();
        let shared = Arc::new(Shared {
            hub_host: hub.hostname().to_string(),
            hub,
            cfg,
            packages,
            status: status.clone(),
            nparts,
        });
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let mut parts = Vec::with_capacity(nparts);
        for p in 0..nparts {
            let (tx, rx) = mpsc::unbounded_channel();
            let counters = Arc::new(Counters::default());
            let part = Partition::new(shared.clone(), p, counters.clone());
            tracker.spawn(part.run(rx, shutdown.clone()));
            parts.push(PartHandle { tx, counters });
        }
        tracker.close();
        Self { parts, status, shutdown, tracker }
    }

    /// Devices in the fleet.
    pub fn len(&self) -> usize {
        self.status.len()
    }

    /// True for an empty fleet.
    pub fn is_empty(&self) -> bool {
        self.status.is_empty()
    }

    fn send(&self, index: usize, cmd: Cmd) {
        if index >= self.len() {
            return;
        }
        let part = &self.parts[index % self.parts.len()];
        part.counters.pending.fetch_add(1, Ordering::AcqRel);
        if part.tx.send(((index / self.parts.len()) as u32, cmd)).is_err() {
            part.counters.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Switches device `index` off (its connection drops without DISCONNECT, like a power cut)
    /// or on (it boots with the version it last installed and connects at once).
    pub fn set_power(&self, index: usize, on: bool) {
        self.send(index, Cmd::Power(on));
    }

    /// Drops device `index`'s link (no DISCONNECT); it reconnects after its backoff. There is no
    /// FTP link to cut in this transport, so `ftp` changes nothing.
    pub fn flap_link(&self, index: usize, ftp: bool) {
        let _ = ftp;
        self.send(index, Cmd::DropLink);
    }

    /// Drops device `index`'s link when its next new C2D message has been acted on, before the
    /// PUBACK.
    pub fn drop_link_before_next_ack(&self, index: usize) {
        self.send(index, Cmd::DropBeforeAck);
    }

    /// Asks device `index` to check `latest.json` now.
    pub fn check_for_update(&self, index: usize) {
        self.send(index, Cmd::Check);
    }

    /// Devices with a session up.
    pub fn connected(&self) -> usize {
        self.parts.iter().map(|p| p.counters.connected.load(Ordering::Acquire)).sum()
    }

    /// Devices powered on but not connected, plus commands and hub events not yet handled: zero
    /// means nothing happens until something outside changes.
    pub fn unsettled(&self) -> usize {
        self.parts
            .iter()
            .map(|p| {
                p.counters.disconnected_on.load(Ordering::Acquire)
                    + p.counters.pending.load(Ordering::Acquire)
            })
            .sum()
    }

    /// CONNECTs the hub refused.
    pub fn connect_failures(&self) -> usize {
        self.parts.iter().map(|p| p.counters.connect_failures.load(Ordering::Relaxed)).sum()
    }

    /// Installs completed by device `index`.
    pub fn installs(&self, index: usize) -> u32 {
        self.status.get(index).map_or(0, |s| s.installs.load(Ordering::Relaxed))
    }

    /// C2D messages device `index` received again after acting on them.
    pub fn duplicate_deliveries(&self, index: usize) -> u32 {
        self.status.get(index).map_or(0, |s| s.duplicates.load(Ordering::Relaxed))
    }

    /// Link drops device `index` carried out.
    pub fn link_drops(&self, index: usize) -> u32 {
        self.status.get(index).map_or(0, |s| s.link_drops.load(Ordering::Relaxed))
    }

    /// Stops every partition; open sessions are closed at the hub (as the hub going away would:
    /// no Will, unacknowledged messages back in their queues).
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.wait().await;
    }
}

/// What every partition reads.
struct Shared {
    hub: Hub,
    hub_host: String,
    cfg: InProcessConfig,
    packages: Arc<MemoryPackages>,
    status: Arc<[DevStatus]>,
    nparts: usize,
}

/// One device's connection: the hub's session and link.
struct Conn {
    session: Session,
    link: Attached,
    /// Set while tier throttling holds the session (see [`Session::take_hold`]).
    held: Option<Box<Held>>,
}

/// A session held by tier throttling: like a socket connection that neither writes its answers
/// nor reads more packets until the shaped requests' turn, the device gets `to_device` and the
/// session hears from the device (and from the hub) only once hub time reaches `until`.
struct Held {
    until: Millis,
    to_device: VecDeque<Packet>,
}

/// One device, owned by its partition.
#[derive(Default)]
struct Dev {
    /// The agent, while powered on.
    core: Option<Box<AgentCore>>,
    conn: Option<Box<Conn>>,
    /// The device side of MQTT: packet ids, publishes in flight, reports waiting for the link.
    mqtt: DeviceMqtt,
    /// The active version "on disk" (`None`: the initial one).
    installed: Option<Arc<str>>,
    seen: SeenIds,
    on: bool,
    retry_due: bool,
    failures: u8,
    drops_before_ack: u16,
    /// Reached by the connect ramp.
    started: bool,
}

struct Partition {
    shared: Arc<Shared>,
    p: usize,
    devs: Vec<Dev>,
    ready: Arc<ReadySet>,
    counters: Arc<Counters>,
    reconnects: BinaryHeap<Reverse<(Instant, u32)>>,
    /// Held sessions by the hub time their hold ends (stale entries are skipped).
    holds: BinaryHeap<Reverse<(Millis, u32)>>,
    ramp_next: usize,
    ramp_start: Instant,
    ramp_gap: Option<Duration>,
    initial: Option<Arc<str>>,
    keys: Vec<u32>,
    key_pos: usize,
}

impl Partition {
    fn new(shared: Arc<Shared>, p: usize, counters: Arc<Counters>) -> Self {
        let n = shared.cfg.device_ids.len();
        let len = n / shared.nparts + usize::from(p < n % shared.nparts);
        let devs: Vec<Dev> = (0..len).map(|_| Dev { on: true, ..Dev::default() }).collect();
        counters.disconnected_on.store(len, Ordering::Release);
        let per_part = shared.cfg.ramp_per_sec as f64 / shared.nparts as f64;
        let ramp_gap = (per_part > 0.0).then(|| Duration::from_secs_f64(1.0 / per_part));
        let initial = shared.cfg.initial_version.as_deref().map(Arc::from);
        Self {
            shared,
            p,
            devs,
            ready: ReadySet::new(),
            counters,
            reconnects: BinaryHeap::new(),
            holds: BinaryHeap::new(),
            ramp_next: 0,
            ramp_start: Instant::now(),
            ramp_gap,
            initial,
            keys: Vec::new(),
            key_pos: 0,
        }
    }

    fn id(&self, k: usize) -> &str {
        &self.shared.cfg.device_ids[k * self.shared.nparts + self.p]
    }

    fn status(&self, k: usize) -> &DevStatus {
        &self.shared.status[k * self.shared.nparts + self.p]
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<(u32, Cmd)>, shutdown: CancellationToken) {
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let mut done = 0;
            while done < BATCH {
                let Ok((k, cmd)) = rx.try_recv() else { break };
                self.command(k as usize, cmd);
                self.counters.pending.fetch_sub(1, Ordering::AcqRel);
                done += 1;
            }
            if self.key_pos == self.keys.len() {
                self.keys.clear();
                self.key_pos = 0;
                let before = self.keys.len();
                self.ready.drain_into(&mut self.keys);
                self.counters.pending.fetch_add(self.keys.len() - before, Ordering::AcqRel);
            }
            while done < BATCH && self.key_pos < self.keys.len() {
                let k = self.keys[self.key_pos] as usize;
                self.key_pos += 1;
                self.on_ready(k);
                self.counters.pending.fetch_sub(1, Ordering::AcqRel);
                done += 1;
            }
            done += self.connect_due(Instant::now(), BATCH.saturating_sub(done).max(1));
            done += self.release_holds(BATCH.saturating_sub(done).max(1));
            if done > 0 {
                tokio::task::yield_now().await;
                continue;
            }
            let next = self.next_due();
            let hold_end = self.holds.peek().map(|Reverse((at, _))| *at);
            let hub = self.shared.hub.clone();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some((k, cmd)) => {
                        self.command(k as usize, cmd);
                        self.counters.pending.fetch_sub(1, Ordering::AcqRel);
                    }
                    None => break,
                },
                _ = self.ready.wait() => {}
                _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {}
                _ = hub.sleep_until(hold_end.unwrap_or(0)), if hold_end.is_some() => {}
            }
        }
        // The hub stops with the run: close sessions without recording Wills.
        let hub = &self.shared.hub;
        for dev in &mut self.devs {
            if let Some(conn) = dev.conn.take() {
                let mut session = conn.session;
                session.discard_will();
                session.close(hub, &conn.link.events);
            }
        }
    }

    /// When the next ramp step or reconnect is due.
    fn next_due(&self) -> Option<Instant> {
        let ramp = (self.ramp_next < self.devs.len()).then(|| self.ramp_due(self.ramp_next));
        let reconnect = self.reconnects.peek().map(|Reverse((at, _))| *at);
        ramp.into_iter().chain(reconnect).min()
    }

    fn ramp_due(&self, k: usize) -> Instant {
        match self.ramp_gap {
            Some(gap) => self.ramp_start + gap.mul_f64(k as f64),
            None => self.ramp_start,
        }
    }

    /// Connects what the ramp and the reconnect heap say is due, at most `budget` devices.
    fn connect_due(&mut self, now: Instant, budget: usize) -> usize {
        let mut done = 0;
        while done < budget && self.ramp_next < self.devs.len() && self.ramp_due(self.ramp_next) <= now {
            let k = self.ramp_next;
            self.ramp_next += 1;
            self.devs[k].started = true;
            if self.devs[k].on && self.devs[k].conn.is_none() {
                self.connect(k);
            }
            done += 1;
        }
        while done < budget
            && let Some(&Reverse((at, k))) = self.reconnects.peek()
            && at <= now
        {
            self.reconnects.pop();
            let k = k as usize;
            if self.devs[k].on && self.devs[k].conn.is_none() {
                self.connect(k);
            }
            done += 1;
        }
        done
    }

    fn command(&mut self, k: usize, cmd: Cmd) {
        let Some(dev) = self.devs.get_mut(k) else { return };
        match cmd {
            Cmd::Power(false) if dev.on => {
                let was = self.conn_state(k);
                let dev = &mut self.devs[k];
                dev.on = false;
                dev.core = None;
                dev.mqtt = DeviceMqtt::default();
                dev.failures = 0;
                if let Some(conn) = dev.conn.take() {
                    conn.session.close(&self.shared.hub, &conn.link.events);
                }
                self.account(was, k);
            }
            Cmd::Power(true) if !dev.on => {
                let was = self.conn_state(k);
                self.devs[k].on = true;
                self.account(was, k);
                if self.devs[k].started {
                    self.connect(k);
                }
            }
            Cmd::Power(_) => {}
            Cmd::DropLink => {
                if dev.conn.is_some() {
                    self.status(k).link_drops.fetch_add(1, Ordering::Relaxed);
                    self.lose_link(k, "link dropped");
                }
            }
            Cmd::DropBeforeAck => dev.drops_before_ack = dev.drops_before_ack.saturating_add(1),
            Cmd::Check => {
                if let Some(core) = dev.core.as_mut() {
                    let actions = core.on_check();
                    self.run_actions(k, actions);
                    self.exchange(k, VecDeque::new());
                }
            }
        }
    }

    /// (powered on, connected) of device `k`.
    fn conn_state(&self, k: usize) -> (bool, bool) {
        (self.devs[k].on, self.devs[k].conn.is_some())
    }

    /// Moves the partition's counters from device `k`'s state `was` to its state now.
    fn account(&self, was: (bool, bool), k: usize) {
        let now = self.conn_state(k);
        let c = &self.counters;
        if was.1 != now.1 {
            if now.1 {
                c.connected.fetch_add(1, Ordering::AcqRel);
            } else {
                c.connected.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let (a, b) = (was.0 && !was.1, now.0 && !now.1);
        if a != b {
            if b {
                c.disconnected_on.fetch_add(1, Ordering::AcqRel);
            } else {
                c.disconnected_on.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Ends the holds whose hub time has come, at most `budget`: the held answers reach their
    /// devices, then what the devices and the hub queued meanwhile is carried.
    fn release_holds(&mut self, budget: usize) -> usize {
        let now = self.shared.hub.now();
        let mut done = 0;
        while done < budget
            && let Some(&Reverse((at, k))) = self.holds.peek()
            && at <= now
        {
            self.holds.pop();
            let k = k as usize;
            let Some(conn) = self.devs[k].conn.as_mut() else { continue };
            // A stale entry: the link was lost, or a later hold extended this one.
            let Some(held) = conn.held.take_if(|h| h.until <= now) else { continue };
            self.exchange(k, held.to_device);
            self.on_ready(k);
            done += 1;
        }
        done
    }

    /// Takes device `k`'s hold, if its last requests were shaped, and parks `to_device` in it.
    /// Returns whether the session is held.
    fn hold(&mut self, k: usize, to_device: &mut VecDeque<Packet>) -> bool {
        let Some(conn) = self.devs[k].conn.as_mut() else { return false };
        if let Some(until) = conn.session.take_hold() {
            let held = conn.held.get_or_insert_with(|| Box::new(Held { until, to_device: VecDeque::new() }));
            held.until = held.until.max(until);
            self.holds.push(Reverse((held.until, k as u32)));
        }
        match conn.held.as_mut() {
            Some(held) => {
                held.to_device.append(to_device);
                true
            }
            None => false,
        }
    }

    /// Sends device `k`'s CONNECT (a fresh SAS token) through the hub's admission.
    fn connect(&mut self, k: usize) {
        let id = self.id(k).to_string();
        let cfg = &self.shared.cfg;
        let key = crate::fleet::device_key(&cfg.fleet_key, &id);
        let password = match mqtt_device::fresh_password(&self.shared.hub_host, &id, &key) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(device = %id, "cannot sign a SAS token: {e}");
                return;
            }
        };
        let connect = mqtt_device::connect_packet(&id, &self.shared.hub_host, password, KEEP_ALIVE);
        let hook = ReadyHook::new(self.ready.clone(), k as u32);
        let accepted = match accept_connect_with(&self.shared.hub, &connect, Some(hook)) {
            Ok(a) => a,
            Err(refused) => {
                self.counters.connect_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(device = %id, code = ?refused.code, "CONNECT refused: {}", refused.reason);
                self.schedule_reconnect(k);
                return;
            }
        };
        let was = self.conn_state(k);
        let mut session = accepted.session;
        let mut to_device = vec![accepted.connack];
        session.start(&self.shared.hub, &mut to_device);
        let dev = &mut self.devs[k];
        dev.conn = Some(Box::new(Conn { session, link: accepted.link, held: None }));
        dev.failures = 0;
        if dev.core.is_none() {
            let version = dev.installed.clone().or_else(|| self.initial.clone());
            let core = AgentCore::new(id, version.as_deref().map(str::to_string))
                .with_retry_on_reconnect(cfg.retry_on_reconnect)
                .with_retry_due(dev.retry_due);
            dev.core = Some(Box::new(core));
        }
        self.account(was, k);
        self.exchange(k, to_device.into());
    }

    fn schedule_reconnect(&mut self, k: usize) {
        let cfg = &self.shared.cfg;
        let dev = &mut self.devs[k];
        dev.failures = dev.failures.saturating_add(1);
        let delay = backoff(cfg.backoff_min, cfg.backoff_max, u32::from(dev.failures));
        self.reconnects.push(Reverse((Instant::now() + delay, k as u32)));
    }

    /// The link is gone (no DISCONNECT): the hub releases what was not acknowledged; the device
    /// keeps its reports (not its acknowledgements) and reconnects after its backoff.
    fn lose_link(&mut self, k: usize, why: &str) {
        let was = self.conn_state(k);
        if let Some(conn) = self.devs[k].conn.take() {
            conn.session.close(&self.shared.hub, &conn.link.events);
        }
        self.devs[k].mqtt.link_lost();
        tracing::debug!(device = %self.id(k), "in-process link lost: {why}");
        self.account(was, k);
        if self.devs[k].on {
            self.schedule_reconnect(k);
        }
    }

    /// The hub announced device `k`'s link: a kick, or events to hand to its session.
    fn on_ready(&mut self, k: usize) {
        let hub = &self.shared.hub;
        let Some(conn) = self.devs[k].conn.as_mut() else { return };
        if conn.held.is_some() {
            // Heard when the hold ends (`release_holds`), as a held socket reads nothing.
            return;
        }
        conn.link.events.rearm();
        if conn.link.events.is_kicked() {
            self.lose_link(k, "the hub closed the connection");
            return;
        }
        let mut out = Vec::new();
        while let Some(event) = conn.link.events.try_recv() {
            conn.session.handle_event(hub, event, &mut out);
        }
        if !out.is_empty() {
            self.exchange(k, out.into());
        }
    }

    /// Carries packets between device `k` and its session until neither side has more, or
    /// until tier throttling holds the session.
    fn exchange(&mut self, k: usize, mut to_device: VecDeque<Packet>) {
        let hub = self.shared.hub.clone();
        let mut out = Vec::new();
        loop {
            if self.hold(k, &mut to_device) {
                return;
            }
            while let Some(p) = to_device.pop_front() {
                self.device_packet(k, p);
            }
            let dev = &mut self.devs[k];
            let Some(conn) = dev.conn.as_mut() else { return };
            while let Some(p) = dev.mqtt.poll_transmit() {
                if let Err(close) = conn.session.handle_packet(&hub, p, &mut out) {
                    tracing::info!(device = %self.id(k), "the hub closed the in-process session: {close}");
                    self.lose_link(k, "closed by the hub");
                    return;
                }
            }
            if out.is_empty() {
                // A shaped request holds the session even before anything answers it.
                self.hold(k, &mut to_device);
                return;
            }
            to_device.extend(out.drain(..));
        }
    }

    /// One packet from the hub to device `k`; what the device sends back waits in its
    /// [`DeviceMqtt`].
    fn device_packet(&mut self, k: usize, p: Packet) {
        let i = k * self.shared.nparts + self.p;
        let id = self.shared.cfg.device_ids[i].as_str();
        let dev = &mut self.devs[k];
        match dev.mqtt.handle(id, p, &dev.seen) {
            Incoming::Connected => {
                let actions = dev.core.as_mut().map(|c| c.on_connected()).unwrap_or_default();
                self.run_actions(k, actions);
            }
            Incoming::Refused(code) => tracing::debug!(device = %id, ?code, "CONNECT refused"),
            Incoming::Duplicate { .. } => {
                self.shared.status[i].duplicates.fetch_add(1, Ordering::Relaxed);
            }
            Incoming::Command(cmd) => {
                if let Some(m) = &cmd.message_id {
                    dev.seen.insert(m);
                }
                let now = SystemClock.now_ms();
                let actions = dev.core.as_mut().map(|c| c.on_c2d(&cmd.payload, now)).unwrap_or_default();
                if dev.drops_before_ack > 0 {
                    dev.drops_before_ack -= 1;
                    self.run_actions(k, actions);
                    self.shared.status[i].link_drops.fetch_add(1, Ordering::Relaxed);
                    self.lose_link(k, "link dropped before the PUBACK");
                    return;
                }
                dev.mqtt.ack(cmd.pkid);
                self.run_actions(k, actions);
            }
            Incoming::Desired(notice) => {
                let now = SystemClock.now_ms();
                let actions = dev.core.as_mut().map(|c| c.on_desired(&notice, now)).unwrap_or_default();
                self.run_actions(k, actions);
            }
            Incoming::Nothing | Incoming::Pong => {}
        }
    }

    /// Carries out the agent's actions: publishes are queued in the device's [`DeviceMqtt`],
    /// `latest.json` reads and installs run at once against the in-memory packages.
    fn run_actions(&mut self, k: usize, actions: Vec<Action>) {
        if actions.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        let seed = (k * shared.nparts + self.p) as u64;
        let dev = &mut self.devs[k];
        let Some(core) = dev.core.as_mut() else { return };
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            let now = SystemClock.now_ms();
            match dev.mqtt.take_publish(action) {
                None | Some(Action::Publish { .. }) => {}
                Some(Action::FetchLatest) => queue.extend(core.on_latest(shared.packages.latest(), now)),
                Some(Action::Install(notice)) => {
                    let mut progress = Vec::new();
                    let result = shared
                        .packages
                        .install(&notice, core.app_version(), seed, |state| progress.push(state));
                    for state in progress {
                        queue.extend(core.on_progress(state, now));
                    }
                    if result == InstallResult::Installed {
                        shared.status[k * shared.nparts + self.p].installs.fetch_add(1, Ordering::Relaxed);
                    }
                    queue.extend(core.on_install_done(result, now));
                    if core.app_version().is_some_and(|v| dev.installed.as_deref() != Some(v)) {
                        dev.installed = core.app_version().map(Arc::from);
                    }
                }
            }
        }
        dev.retry_due = core.retry_due();
    }
}

#[cfg(test)]
mod tests;
