//! The hub: the one owner of all IoT Hub state (registry, twins, C2D queues, feedback, the
//! telemetry event log and its consumer groups, scheduled jobs) and the operations protocol front ends call.
//!
//! Front ends (HTTP today; MQTT and AMQP in their own modules) translate wire traffic into calls on
//! [`Hub`] and never keep hub state of their own. [`Hub`] is a cheap handle (`Arc` inside).
//!
//! Ownership and locking: devices live in [`SHARD_COUNT`] shards, each a `std::sync::Mutex` over a
//! map ordered by device id (`devmap::DeviceMap`, a B-tree whose keys carry the id's first bytes
//! inline); a device belongs to the shard its id hashes to. The feedback hub
//! and the telemetry event log have one mutex each (the log's wake-up signals sit outside it, see
//! `events`; the dashboard's cache and scenario status have theirs, see [`dashboard`]); scheduled
//! jobs have theirs inside `crate::jobs::Jobs`, configurations theirs inside `crate::configs::Configs`.
//! With a tier configured, the tier throttle has one mutex too (see `admission`).
//! Every critical section is short and synchronous: no lock is ever held across an `.await`, and no
//! two shard locks are held at once.

mod admission;
mod auth;
pub mod changes;
mod config_apply;
pub mod dashboard;
mod device;
mod devmap;
mod durable;
pub mod events;
pub mod link;
pub mod messaging;
pub mod module;
pub mod receivers;
mod registry;
mod scrape;
pub mod time;
mod twin;

use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::c2d::{FeedbackHub, QueueConfig};
use crate::clock::{Clock, Millis, SystemClock};
use crate::limits::{FEEDBACK_BATCH_INTERVAL_MS, SAS_DEFAULT_SKEW_SECS};
use crate::sas::{Policy, default_policies};

pub use auth::{Authenticated, Principal};
pub use device::{AuthType, Device, DeviceExtra, Status, validate_device_id};
pub use durable::{Recovered, SnapshotStats};
pub use events::{D2cMessage, Event, EventLog, EventPosition, EventsConfig, EventsError};
pub use link::{LinkEvent, MethodCall, MethodReply};
pub use messaging::{C2dDelivery, FeedbackDelivery};
pub use module::{Module, ModuleInput};
pub use registry::{BulkResult, DeviceInput, IfMatch, QueryPage, RegistryStats};
pub use twin::{Section, Twin};

/// Number of registry shards. A power of two well above the core count keeps contention low
/// without making cross-device scans (list, query) expensive.
pub const SHARD_COUNT: usize = 64;

/// The well-known development owner key, published in the README like Azurite's account key.
/// Never use it for anything but local development.
pub const DEFAULT_OWNER_KEY: &str = "SG9zdGVkIGxvY2FsbHk6IGlvdGh1Yi1lbXVsYXRvciE=";

/// Hub-wide settings.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The hub's host name: `HostName` in connection strings and the host in SAS audiences.
    pub hostname: String,
    /// The `iothubowner` primary key (base64). The other policies' keys derive from it.
    pub owner_key: String,
    /// Clock skew tolerated on SAS expiry, in seconds.
    pub sas_skew_secs: u64,
    /// C2D queue settings for every device.
    pub c2d: QueueConfig,
    /// Feedback batch interval (IoT Hub: 15 s).
    pub feedback_batch_interval_ms: u64,
    /// Deadlines on waits a network peer controls (HTTP headers and idle, AMQP open and idle,
    /// writes).
    pub timeouts: crate::limits::Timeouts,
    /// Whether the plain HTTP port serves the emulator's `/emulator/*` routes (telemetry read-out,
    /// connection strings with the owner key, FTP fault knobs). `--disable-admin-api` turns them
    /// off; `/health` and `/ca.pem` stay.
    pub admin_api: bool,
    /// Most D2C records the event log keeps (the oldest go first), on top of its time and memory
    /// limits in [`HubConfig::events`]. No cap by default; the testbench sets one.
    pub telemetry_buffer_messages: usize,
    /// The built-in Event Hub-compatible endpoint's log: partitions, retention, memory budget and
    /// consumer groups (see [`events`]).
    pub events: EventsConfig,
    /// IoT Hub tier throttling (`--tier`/`--units`): `None` (the default) enforces no operation
    /// rates and no daily quota. See [`crate::throttle`].
    pub throttle: Option<crate::throttle::Tier>,
    /// CA certificates (PEM) that `certificateAuthority` devices' chains may lead to
    /// (`--x509-ca`); more can be added while the hub runs ([`Hub::add_x509_ca`]).
    pub x509_cas: Vec<String>,
    /// The Device Provisioning Service's ID scope (`--dps-id-scope`; generated when not given).
    pub dps_id_scope: String,
    /// `--persist`: keep the hub's state under `<data-dir>/state/` with this sync mode
    /// (`--persist-sync`: `Sync`); `None` (the default) keeps everything in memory only. Read by
    /// `server::RunningHub`, which opens the state directory (see [`Hub::open_persistent`]).
    pub persist: Option<crate::persist::SyncMode>,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            hostname: "localhost".into(),
            owner_key: DEFAULT_OWNER_KEY.into(),
            sas_skew_secs: SAS_DEFAULT_SKEW_SECS,
            c2d: QueueConfig::default(),
            feedback_batch_interval_ms: FEEDBACK_BATCH_INTERVAL_MS,
            timeouts: crate::limits::Timeouts::default(),
            admin_api: true,
            telemetry_buffer_messages: usize::MAX,
            events: EventsConfig::default(),
            throttle: None,
            x509_cas: Vec::new(),
            dps_id_scope: crate::dps::generate_id_scope(),
            persist: None,
        }
    }
}

/// A handle to the hub's state. Clones share the same hub.
#[derive(Debug, Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

/// A handle that does not keep the hub alive: for the hub's own background tasks, so dropping
/// the last [`Hub`] frees it.
#[derive(Debug, Clone)]
pub(crate) struct WeakHub(std::sync::Weak<Shared>);

impl WeakHub {
    /// The hub, while some [`Hub`] still holds it.
    pub(crate) fn upgrade(&self) -> Option<Hub> {
        self.0.upgrade().map(|shared| Hub { shared })
    }
}

#[derive(Debug)]
struct Shared {
    config: HubConfig,
    clock: Arc<dyn Clock>,
    /// How far time travel moved hub time ahead of `clock` (see [`time`]); only grows.
    time_offset: AtomicU64,
    /// Woken whenever time travel moves hub time, for [`Hub::sleep_until`].
    time_moved: tokio::sync::Notify,
    policies: Vec<Policy>,
    shards: Box<[ShardSlot]>,
    feedback: Mutex<FeedbackHub>,
    /// The telemetry event log (see [`events`]).
    events: Mutex<EventLog>,
    /// Its wake-up side, read without the log's lock.
    event_signals: events::EventSignals,
    /// The partitions' attached readers, for the owner-level rules (see [`receivers`]).
    receivers: Mutex<receivers::Receivers>,
    /// The Event Hub-compatible name, derived from the host name once.
    event_hub_name: String,
    /// The AMQP listener's port once bound (the Event Hub-compatible endpoint's port).
    amqp_port: AtomicU16,
    /// Source of identity etags and generation ids (unique, increasing).
    counter: AtomicU64,
    /// Registered devices, kept beside the shards so statistics need no scan.
    device_count: AtomicUsize,
    /// Module identities registered (devices' modules), for the hub's identity cap.
    module_count: AtomicUsize,
    /// Devices with `connected` set, kept by [`Hub::set_connected`] (the dashboard reads it live).
    connected_count: AtomicUsize,
    /// Scheduled jobs: their own table and tasks (see `crate::jobs`).
    jobs: crate::jobs::Jobs,
    /// Woken whenever a feedback record or a C2D message is queued, or a device connects
    /// or changes its subscriptions, for long-poll style readers (they re-check what they wait for).
    changed: changes::Changes,
    /// The tier throttle, only when a tier is configured (see `admission`).
    throttle: Option<Mutex<crate::throttle::Throttle>>,
    /// The dashboard's cache, feedback counts and scenario status (see [`dashboard`]).
    dashboard: dashboard::DashboardState,
    /// Counters and histograms for `/metrics` (see `crate::metrics`).
    metrics: crate::metrics::Metrics,
    /// Policy tokens that verified, so a service presenting the same token on every request is not
    /// re-verified each time (see `auth`).
    verified_tokens: Mutex<auth::VerifiedTokens>,
    /// The CAs X.509 devices' chains may lead to (see `crate::x509`).
    x509_cas: crate::x509::TrustedCas,
    /// The Device Provisioning Service on this host (see `crate::dps`).
    dps: crate::dps::Dps,
    /// Configurations and the re-evaluation work they owe (see `crate::configs`).
    configs: crate::configs::Configs,
    /// The journal and snapshots with `--persist` (see `durable`); empty otherwise.
    durable: std::sync::OnceLock<durable::Durability>,
}

#[derive(Debug, Default)]
struct Shard {
    devices: devmap::DeviceMap,
}

/// A shard's lock on a cache line of its own: neighbouring shards locked from two cores at once
/// do not take the line from each other.
#[derive(Debug)]
#[repr(align(64))]
struct ShardSlot(Mutex<Shard>);

impl Hub {
    /// A handle that does not keep the hub alive (see [`WeakHub`]).
    pub(crate) fn downgrade(&self) -> WeakHub {
        WeakHub(Arc::downgrade(&self.shared))
    }

    /// A hub with `config`, on the system clock.
    pub fn new(config: HubConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// A hub with `config` whose time comes from `clock` (tests use a `ManualClock`).
    pub fn with_clock(config: HubConfig, clock: Arc<dyn Clock>) -> Self {
        let policies = default_policies(&config.owner_key);
        let mut feedback = FeedbackHub::new(&config.hostname);
        feedback.set_batch_interval_ms(config.feedback_batch_interval_ms);
        let shards = (0..SHARD_COUNT).map(|_| ShardSlot(Mutex::new(Shard::default()))).collect();
        let start = clock.now_ms();
        let events = EventLog::new(&config.events, config.telemetry_buffer_messages, start);
        let event_signals = events::EventSignals::new(events.partition_count());
        let event_hub_name = events::event_hub_name_for(&config.hostname);
        let throttle = config.throttle.map(|tier| Mutex::new(crate::throttle::Throttle::new(tier)));
        let x509_cas = crate::x509::TrustedCas::default();
        for pem in &config.x509_cas {
            if let Err(e) = x509_cas.add_pem(pem) {
                tracing::warn!("a configured X.509 CA is not trusted: {e}");
            }
        }
        let dps = crate::dps::Dps::new(config.dps_id_scope.clone(), &config.owner_key);
        Self {
            shared: Arc::new(Shared {
                dps,
                configs: crate::configs::Configs::default(),
                config,
                clock,
                time_offset: AtomicU64::new(0),
                time_moved: tokio::sync::Notify::new(),
                policies,
                shards,
                feedback: Mutex::new(feedback),
                events: Mutex::new(events),
                event_signals,
                receivers: Mutex::default(),
                event_hub_name,
                amqp_port: AtomicU16::new(crate::limits::DEFAULT_AMQP_PORT),
                counter: AtomicU64::new(start),
                device_count: AtomicUsize::new(0),
                module_count: AtomicUsize::new(0),
                connected_count: AtomicUsize::new(0),
                jobs: crate::jobs::Jobs::default(),
                changed: changes::Changes::default(),
                throttle,
                verified_tokens: Mutex::default(),
                x509_cas,
                dashboard: dashboard::DashboardState::default(),
                metrics: crate::metrics::Metrics::default(),
                durable: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The Device Provisioning Service on this host.
    pub fn dps(&self) -> &crate::dps::Dps {
        &self.shared.dps
    }

    /// The hub's metrics (see `crate::metrics`; [`Hub::prometheus_text`] renders them).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.shared.metrics
    }

    /// The hub's settings.
    pub fn config(&self) -> &HubConfig {
        &self.shared.config
    }

    /// The hub's host name.
    pub fn hostname(&self) -> &str {
        &self.shared.config.hostname
    }

    /// The shared access policies (iothubowner, service, device, registryRead, registryReadWrite).
    pub fn policies(&self) -> &[Policy] {
        &self.shared.policies
    }

    /// The connection string of policy `name`, if it exists.
    pub fn policy_connection_string(&self, name: &str) -> Option<String> {
        let p = self.shared.policies.iter().find(|p| p.name == name)?;
        Some(format!(
            "HostName={};SharedAccessKeyName={};SharedAccessKey={}",
            self.hostname(),
            p.name,
            p.primary_key
        ))
    }

    /// Hub time: the clock plus what time travel added (see [`time`]). Every IoT Hub timer
    /// reads it; SAS expiry reads [`Hub::wall_now`].
    pub fn now(&self) -> Millis {
        self.shared.clock.now_ms() + self.shared.time_offset.load(Ordering::Relaxed)
    }

    /// Registered devices.
    pub fn device_count(&self) -> usize {
        self.shared.device_count.load(Ordering::Relaxed)
    }

    /// Devices connected now (a counter, no scan).
    pub fn connected_count(&self) -> usize {
        self.shared.connected_count.load(Ordering::Relaxed)
    }

    /// Sets `d.connected` (and when it changed) keeping [`Hub::connected_count`] in step; every
    /// change of `connected` goes through here.
    fn set_connected(&self, d: &mut Device, connected: bool, now: Millis) {
        if d.connected != connected {
            if connected {
                self.shared.connected_count.fetch_add(1, Ordering::Relaxed);
            } else {
                self.shared.connected_count.fetch_sub(1, Ordering::Relaxed);
            }
        }
        d.connected = connected;
        d.connection_state_updated = now;
    }

    /// Notified whenever a C2D message or a feedback record is queued, or a device connects or
    /// changes its subscriptions (telemetry has its own: see [`Hub::events_notifier`]).
    /// To wait without missing a wake-up: `watch()` and hold it, create `notified()`, pin it,
    /// call `enable()`, check the hub, then await it.
    pub fn notifier(&self) -> &changes::Changes {
        &self.shared.changed
    }

    /// The scheduled jobs' owner.
    pub(crate) fn jobs(&self) -> &crate::jobs::Jobs {
        &self.shared.jobs
    }

    fn next_counter(&self) -> u64 {
        self.shared.counter.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The shard of device `id`: FNV-1a over its bytes, then a 64-bit finalizer (MurmurHash3's
    /// `fmix64`) so the low bits depend on every byte. Deterministic across runs (a query's
    /// continuation token names a shard), and a few nanoseconds where SipHash took tens: every
    /// C2D message looks its device up three times. Not a defence against chosen ids; registering
    /// devices needs the registry's write permission, and a crowded shard is only slower.
    fn shard_index(id: &str) -> usize {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in id.as_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 33;
        (h as usize) % SHARD_COUNT
    }

    fn shard(&self, index: usize) -> MutexGuard<'_, Shard> {
        // A panic while holding a shard lock leaves plain data behind; keep serving.
        self.shared.shards[index].0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shard_for(&self, id: &str) -> MutexGuard<'_, Shard> {
        self.shard(Self::shard_index(id))
    }

    /// Runs `f` on device `id` under its shard lock.
    fn with_device<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Device) -> Result<T, crate::error::HubError>,
    ) -> Result<T, crate::error::HubError> {
        let mut shard = self.shard_for(id);
        let device = shard.devices.get_mut(id).ok_or_else(|| crate::error::HubError::device_not_found(id))?;
        f(device)
    }

    fn feedback(&self) -> MutexGuard<'_, FeedbackHub> {
        self.shared.feedback.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn event_log(&self) -> MutexGuard<'_, EventLog> {
        self.shared.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The AMQP listener's port (5671 until the server says otherwise).
    pub fn amqp_port(&self) -> u16 {
        self.shared.amqp_port.load(Ordering::Relaxed)
    }

    /// Tells the hub which port its AMQP listener (and so its Event Hub-compatible endpoint) is on.
    pub fn set_amqp_port(&self, port: u16) {
        self.shared.amqp_port.store(port, Ordering::Relaxed);
    }
}
