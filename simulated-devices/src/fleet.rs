//! The fleet: N agents in one process. It owns the device-id list (pattern and shard), the
//! per-device keys and data directories, the connection ramp, the cap on concurrent installs, and
//! one power switch per agent that the bench or the scenario runner flips programmatically.
//!
//! Besides power, the switch carries link faults ([`Fleet::flap_link`]): the agent drops its MQTT
//! socket without DISCONNECT (and optionally its FTP connections) and reconnects by itself.
//!
//! Update retries ([`UpdateRetry`]): an agent whose install failed checks `latest.json` again on
//! reconnect; [`Fleet::check_for_update`] asks one agent to check now, and with
//! [`UpdateRetry::check_every`] one fleet-wide task walks a [`CheckSchedule`] asking each agent in
//! turn, so every agent checks once per period without a timer of its own.
//!
//! Cost per agent: one tokio task (parked on its power switch while off), one `watch` channel,
//! an [`AgentStatus`] of a few atomics, and while connected one socket (no buffer while idle; see
//! [`crate::agent`]): about 5 KiB per connected idle agent, process included (bench/README.md).
//! No thread per agent; the only timer of one is its keep-alive while connected.
//!
//! Identities: every device key is `derive_key(fleet_key, device_id)` (HMAC-SHA256, like DPS group
//! enrollment), so any process holding the fleet key can compute a device's key without asking
//! the hub. Devices are either seeded in bulk ([`seed`], `POST /devices` 100 at a time) or each
//! agent registers itself on first start ([`Registration::SelfRegister`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use iothub_emulator::sas::policy::derive_key;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::{self, AgentAuth, AgentConfig, AgentStatus, InstallBackend, Switch};
use crate::check_schedule::CheckSchedule;
use crate::service_client::{BULK_MAX_DEVICES, DeviceIdentity, ServiceClient, ServiceError};

/// Errors in fleet settings.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// `--shard` is not `i/n` with `0 <= i < n`.
    #[error("--shard '{0}' is not valid; use i/n with 0 <= i < n, e.g. 0/4")]
    BadShard(String),
    /// The device-id pattern has no `{n}` placeholder.
    #[error(
        "--id-pattern '{0}' is not valid; it needs {{n}} or {{n:0W}} (W = zero-padded width), e.g. fridge-{{n:05}}"
    )]
    BadPattern(String),
    /// Seeding the registry failed.
    #[error("seeding the registry: {0}")]
    Seed(#[from] ServiceError),
}

/// Which slice of the fleet this process runs: devices whose index `k` has `k % count == index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This process's shard, `0..count`.
    pub index: u32,
    /// How many shards split the fleet.
    pub count: u32,
}

impl Default for Shard {
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

impl std::str::FromStr for Shard {
    type Err = FleetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || FleetError::BadShard(s.to_string());
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (u32, u32) =
            (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

/// A device-id pattern: text with one `{n}` (the device index) or `{n:0W}` (zero-padded to W).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdPattern {
    prefix: String,
    width: usize,
    suffix: String,
}

impl std::str::FromStr for IdPattern {
    type Err = FleetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || FleetError::BadPattern(s.to_string());
        let start = s.find("{n").ok_or_else(bad)?;
        let end = start + s[start..].find('}').ok_or_else(bad)?;
        let width = match &s[start + 2..end] {
            "" => 0,
            spec => {
                spec.strip_prefix(":0").and_then(|w| w.parse().ok()).filter(|w| *w <= 20).ok_or_else(bad)?
            }
        };
        Ok(Self { prefix: s[..start].to_string(), width, suffix: s[end + 1..].to_string() })
    }
}

impl IdPattern {
    /// The id of device `n`.
    pub fn id(&self, n: u64) -> String {
        format!("{}{:0w$}{}", self.prefix, n, self.suffix, w = self.width)
    }
}

/// The ids this shard runs out of a fleet of `count` devices.
pub fn device_ids(pattern: &IdPattern, count: u64, shard: Shard) -> Vec<String> {
    (0..count)
        .filter(|k| k % u64::from(shard.count) == u64::from(shard.index))
        .map(|k| pattern.id(k))
        .collect()
}

/// The key of `device_id` in a fleet whose secret is `fleet_key`.
pub fn device_key(fleet_key: &str, device_id: &str) -> String {
    derive_key(fleet_key, &format!("simulated-device/{device_id}"))
}

/// Registers `ids` in bulk (`POST /devices`, [`BULK_MAX_DEVICES`] per call, `concurrency` calls at
/// once) with their derived keys. Idempotent.
pub async fn seed(
    service: &ServiceClient,
    fleet_key: &str,
    ids: &[String],
    concurrency: usize,
) -> Result<(), FleetError> {
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in ids.chunks(BULK_MAX_DEVICES) {
        let batch: Vec<DeviceIdentity> = chunk
            .iter()
            .map(|id| DeviceIdentity { device_id: id.clone(), primary_key: device_key(fleet_key, id) })
            .collect();
        let (service, permit) = (service.clone(), sem.clone().acquire_owned().await);
        tasks.spawn(async move {
            let _permit = permit;
            service.bulk_upsert(&batch).await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| ServiceError::Protocol { op: "bulk registry", reason: e.to_string() })??;
    }
    Ok(())
}

/// Registers `ids` in bulk as `certificateAuthority` devices (X.509, see [`FleetX509`]),
/// [`BULK_MAX_DEVICES`] per call, `concurrency` calls at once. Idempotent.
pub async fn seed_ca_signed(
    service: &ServiceClient,
    ids: &[String],
    concurrency: usize,
) -> Result<(), FleetError> {
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in ids.chunks(BULK_MAX_DEVICES) {
        let batch = chunk.to_vec();
        let (service, permit) = (service.clone(), sem.clone().acquire_owned().await);
        tasks.spawn(async move {
            let _permit = permit;
            service.bulk_upsert_ca_signed(&batch).await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| ServiceError::Protocol { op: "bulk registry", reason: e.to_string() })??;
    }
    Ok(())
}

/// An X.509 fleet (`fleet run --auth x509`): every agent gets a certificate with `CN={id}`
/// signed by the fleet CA (which the hub must trust, see
/// [`ServiceClient::trust_x509_ca`]) and presents it over TLS instead of a SAS password.
#[derive(Debug, Clone)]
pub struct FleetX509 {
    /// The fleet CA's certificate (PEM).
    pub ca_cert_pem: String,
    /// The fleet CA's private key (PEM).
    pub ca_key_pem: String,
    /// The hub's CA certificate (PEM), trusted for TLS.
    pub hub_ca_pem: String,
    /// The policy the agents' FTP tokens are signed with: (name, key). See
    /// [`crate::agent::AgentAuth::X509`].
    pub ftp_policy: Arc<(String, String)>,
}

impl FleetX509 {
    /// Issues `device_id`'s certificate and the TLS configuration presenting it.
    fn tls_for(&self, device_id: &str) -> Result<Arc<rustls::ClientConfig>, String> {
        let issued = iothub_emulator::x509::issue::ca_signed_device(
            device_id,
            &self.ca_cert_pem,
            &self.ca_key_pem,
            iothub_emulator::x509::issue::DEFAULT_VALIDITY_DAYS,
        )
        .map_err(|e| e.to_string())?;
        crate::agent::tls_config_with_client_cert(&self.hub_ca_pem, &issued.cert_pem, &issued.key_pem)
    }
}

/// How agents get their identity.
#[derive(Debug, Clone)]
pub enum Registration {
    /// The registry already holds every device with its derived key ([`seed`]).
    Seeded,
    /// Each agent checks the registry on start and registers itself if it is missing (the
    /// client needs a policy with registryWrite). An existing device keeps its key.
    SelfRegister(Box<ServiceClient>),
    /// Each agent provisions itself through the emulator's Device Provisioning Service (HTTPS) with
    /// the key derived from the enrollment group's key, the fleet key
    /// (`base64(HMAC-SHA256(base64decode(fleetKey), deviceId))`, DPS's formula), as factory
    /// devices do; the group must exist ([`ServiceClient::put_enrollment_group`]).
    Dps {
        /// The client whose endpoint serves DPS (the hub's HTTPS or plain port).
        service: Box<ServiceClient>,
        /// The DPS ID scope.
        id_scope: String,
    },
}

/// When agents whose install failed try again (see [`crate::agent::core`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateRetry {
    /// Check `latest.json` again on every reconnect until an install succeeds.
    pub on_reconnect: bool,
    /// Every agent checks `latest.json` once per this period, on real time (`None`: never).
    /// The scenario runner leaves it off and asks for checks on scenario time instead.
    pub check_every: Option<Duration>,
}

impl Default for UpdateRetry {
    /// Retry on reconnect, no periodic check.
    fn default() -> Self {
        Self { on_reconnect: true, check_every: None }
    }
}

/// Everything the fleet needs to start its agents.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The devices this process runs.
    pub device_ids: Vec<String>,
    /// The fleet secret every device key derives from.
    pub fleet_key: String,
    /// How agents get their identity.
    pub registration: Registration,
    /// Per-device data directories live under here.
    pub data_root: PathBuf,
    /// The hub's host name (SAS audience, MQTT username).
    pub hub_host: String,
    /// MQTT host.
    pub mqtt_host: String,
    /// MQTT port.
    pub mqtt_port: u16,
    /// TLS for MQTT (`None`: the emulator's plain listener).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Agents started per second (the connection ramp); 0 starts all at once.
    pub ramp_per_sec: u32,
    /// Installs (and FTP sessions) running at once across the fleet.
    pub max_concurrent_installs: usize,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// The version every agent runs before its first install (`None`: no version reported
    /// until one installs).
    pub initial_version: Option<String>,
    /// When agents retry an update that failed.
    pub update_retry: UpdateRetry,
    /// X.509 agents (certificates from this CA over TLS) instead of SAS ones; needs TLS and
    /// seeded `certificateAuthority` devices ([`seed_ca_signed`]).
    pub x509: Option<Arc<FleetX509>>,
}

struct AgentHandle {
    device_id: String,
    power: watch::Sender<Switch>,
    status: Arc<AgentStatus>,
}

/// A running fleet. Stop it with [`Fleet::stop`].
pub struct Fleet {
    agents: Arc<[AgentHandle]>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Fleet {
    /// Starts every agent (powered on), following the ramp. Returns once all are started; they
    /// connect in the background.
    pub async fn start<I: InstallBackend>(cfg: FleetConfig, backend: Arc<I>) -> Self {
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let installs = Arc::new(Semaphore::new(cfg.max_concurrent_installs.max(1)));
        let mut agents = Vec::with_capacity(cfg.device_ids.len());
        let ramp_gap = (cfg.ramp_per_sec > 0).then(|| Duration::from_secs(1) / cfg.ramp_per_sec);
        let started = tokio::time::Instant::now();
        let initial_version: Option<Arc<str>> = cfg.initial_version.as_deref().map(Arc::from);
        for (i, device_id) in cfg.device_ids.iter().enumerate() {
            if let Some(gap) = ramp_gap {
                tokio::time::sleep_until(started + gap * i as u32).await;
            }
            let (power, power_rx) = watch::channel(Switch::on());
            let status = Arc::new(AgentStatus::default());
            let agent_cfg = AgentConfig {
                device_id: device_id.clone(),
                device_key: match &cfg.registration {
                    Registration::Dps { .. } => {
                        iothub_emulator::dps::derive_device_key(&cfg.fleet_key, device_id).unwrap_or_default()
                    }
                    _ => device_key(&cfg.fleet_key, device_id),
                },
                auth: match &cfg.x509 {
                    Some(x) => AgentAuth::X509 { ftp_policy: x.ftp_policy.clone() },
                    None => AgentAuth::Sas,
                },
                hub_host: cfg.hub_host.clone(),
                mqtt_host: cfg.mqtt_host.clone(),
                mqtt_port: cfg.mqtt_port,
                tls: cfg.tls.clone(),
                keep_alive: cfg.keep_alive,
                data_dir: agent::data_dir(&cfg.data_root, device_id),
                backoff_min: cfg.backoff_min,
                backoff_max: cfg.backoff_max,
                initial_version: initial_version.clone(),
                retry_on_reconnect: cfg.update_retry.on_reconnect,
            };
            let (backend, installs, st, sd) =
                (backend.clone(), installs.clone(), status.clone(), shutdown.clone());
            let registration = cfg.registration.clone();
            let x509 = cfg.x509.clone();
            tracker.spawn(async move {
                let Some(mut agent_cfg) = register(agent_cfg, &registration, &sd).await else { return };
                if let Some(x509) = x509 {
                    match x509.tls_for(&agent_cfg.device_id) {
                        Ok(tls) => agent_cfg.tls = Some(tls),
                        Err(e) => {
                            tracing::error!(device = %agent_cfg.device_id, "cannot issue its certificate: {e}");
                            return;
                        }
                    }
                }
                if let Err(e) = tokio::fs::create_dir_all(&agent_cfg.data_dir).await {
                    tracing::error!(device = %agent_cfg.device_id, "cannot create {}: {e}", agent_cfg.data_dir.display());
                    return;
                }
                agent::run(Arc::new(agent_cfg), backend, installs, power_rx, st, sd).await;
            });
            agents.push(AgentHandle { device_id: device_id.clone(), power, status });
        }
        let agents: Arc<[AgentHandle]> = agents.into();
        if let Some(schedule) =
            cfg.update_retry.check_every.and_then(|every| CheckSchedule::new(agents.len(), every))
        {
            tracker.spawn(periodic_checks(agents.clone(), schedule, shutdown.clone()));
        }
        tracker.close();
        Self { agents, shutdown, tracker }
    }

    /// How many agents the fleet runs.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// True when the fleet runs no agent.
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// The device id of agent `index`.
    pub fn device_id(&self, index: usize) -> Option<&str> {
        self.agents.get(index).map(|a| a.device_id.as_str())
    }

    /// Switches agent `index` off (its socket closes without DISCONNECT and any install stops,
    /// like a power cut) or back on (it boots from what is on disk and reconnects).
    pub fn set_power(&self, index: usize, on: bool) {
        if let Some(a) = self.agents.get(index) {
            change_switch(a, |s| s.on = on);
        }
    }

    /// Drops agent `index`'s network link: its MQTT socket closes without DISCONNECT (messages
    /// delivered but not yet acknowledged go back to the hub's queue) and, with `ftp`, a running
    /// download's FTP connections close too. The agent keeps its state and running install and
    /// reconnects after its normal backoff. Ignored while the agent is off.
    pub fn flap_link(&self, index: usize, ftp: bool) {
        if let Some(a) = self.agents.get(index) {
            change_switch(a, |s| {
                s.link_drops = s.link_drops.wrapping_add(1);
                if ftp {
                    s.ftp_cuts = s.ftp_cuts.wrapping_add(1);
                }
            });
        }
    }

    /// Drops agent `index`'s MQTT link when the next new C2D message arrives, after the agent
    /// saved and acted on it but before its PUBACK goes out: the worst moment, which makes the
    /// hub deliver the message again. Deterministic, for tests of redelivery.
    pub fn drop_link_before_next_ack(&self, index: usize) {
        if let Some(a) = self.agents.get(index) {
            change_switch(a, |s| s.drops_before_ack = s.drops_before_ack.wrapping_add(1));
        }
    }

    /// Asks agent `index` to check `latest.json` now and install what it names unless that
    /// version is active (as a periodic check would). Ignored while the agent is off or
    /// installing.
    pub fn check_for_update(&self, index: usize) {
        if let Some(a) = self.agents.get(index) {
            request_check(a);
        }
    }

    /// C2D messages agent `index` received again after having saved them (redeliveries).
    pub fn duplicate_deliveries(&self, index: usize) -> u32 {
        self.agents.get(index).map_or(0, |a| a.status.duplicate_deliveries.load(Ordering::Relaxed))
    }

    /// Link drops agent `index` carried out (a link was up when asked).
    pub fn link_drops(&self, index: usize) -> u32 {
        self.agents.get(index).map_or(0, |a| a.status.link_drops.load(Ordering::Relaxed))
    }

    /// How many agents have an MQTT session up.
    pub fn connected(&self) -> usize {
        self.agents.iter().filter(|a| a.status.connected.load(Ordering::Relaxed)).count()
    }

    /// Agents not yet where their switch puts them: powered on but not connected (starting,
    /// reconnecting) or with work in flight ([`AgentStatus::busy`]), switched off but not yet down
    /// (still connected or working), or not yet having looked at the switch's last change (a
    /// link drop or check asked for). Zero means the fleet is quiescent: nothing
    /// will happen until something outside changes (a C2D message, a power switch, a link fault).
    pub fn unsettled(&self) -> usize {
        self.agents
            .iter()
            .filter(|a| {
                let (connected, busy) =
                    (a.status.connected.load(Ordering::Relaxed), a.status.busy.load(Ordering::Relaxed));
                let switch = *a.power.borrow();
                let settled = if switch.on { connected && !busy } else { !connected && !busy };
                !settled || a.status.seen_switch.load(Ordering::Relaxed) != switch.generation
            })
            .count()
    }

    /// Installs completed by agent `index` since the fleet started.
    pub fn installs(&self, index: usize) -> u32 {
        self.agents.get(index).map_or(0, |a| a.status.installs.load(Ordering::Relaxed))
    }

    /// Waits until `connected() >= n`, polling every `poll`, up to `timeout`. True if reached.
    pub async fn wait_connected(&self, n: usize, poll: Duration, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.connected() >= n {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Stops every agent and waits for their tasks.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.wait().await;
    }
}

fn request_check(agent: &AgentHandle) {
    change_switch(agent, |s| s.checks = s.checks.wrapping_add(1));
}

/// Changes `agent`'s switch with `f` and bumps its generation, so [`Fleet::unsettled`] counts
/// the agent until it has looked at the change.
fn change_switch(agent: &AgentHandle, f: impl FnOnce(&mut Switch)) {
    agent.power.send_modify(|s| {
        f(s);
        s.generation = s.generation.wrapping_add(1);
    });
}

/// The fleet's one periodic-check task: asks each agent in turn, following `schedule` on real
/// time from now, until `shutdown`.
async fn periodic_checks(
    agents: Arc<[AgentHandle]>,
    mut schedule: CheckSchedule,
    shutdown: CancellationToken,
) {
    let start = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(start + schedule.next_at()) => {}
        }
        for i in schedule.due(start.elapsed()) {
            if let Some(a) = agents.get(i) {
                request_check(a);
            }
        }
    }
}

/// Applies `registration` to `cfg`: with self-registration, creates the device if missing or
/// adopts the key the registry holds. `None` if the agent must not run (shutdown, or the registry
/// refused).
async fn register(
    mut cfg: AgentConfig,
    registration: &Registration,
    shutdown: &CancellationToken,
) -> Option<AgentConfig> {
    let id = cfg.device_id.clone();
    let work = async {
        match registration {
            Registration::Seeded => Ok(None),
            Registration::SelfRegister(service) => match service.get_device(&id).await? {
                Some(existing) => Ok(Some(existing)),
                None => service.create_device(&id, &cfg.device_key).await.map(Some),
            },
            Registration::Dps { service, id_scope } => {
                service.dps_register(id_scope, &id, &cfg.device_key).await.map(Some)
            }
        }
    };
    let result = tokio::select! {
        _ = shutdown.cancelled() => return None,
        r = work => r,
    };
    match result {
        Ok(Some(identity)) => {
            cfg.device_key = identity.primary_key;
            Some(cfg)
        }
        Ok(None) => Some(cfg),
        Err(e) => {
            tracing::error!(device = %id, "cannot register: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_the_fleet_without_overlap() {
        let p: IdPattern = "fridge-{n:03}".parse().unwrap();
        let all: Vec<String> =
            (0..3).flat_map(|i| device_ids(&p, 10, Shard { index: i, count: 3 })).collect();
        assert_eq!(all.len(), 10);
        let mut sorted = all.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 10);
        assert_eq!(device_ids(&p, 10, "1/3".parse().unwrap()), ["fridge-001", "fridge-004", "fridge-007"]);
    }

    #[test]
    fn shard_syntax() {
        assert_eq!("2/4".parse::<Shard>().unwrap(), Shard { index: 2, count: 4 });
        for bad in ["4/4", "1/0", "x/2", "1", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn id_patterns() {
        assert_eq!("dev{n}".parse::<IdPattern>().unwrap().id(7), "dev7");
        assert_eq!("a-{n:04}-b".parse::<IdPattern>().unwrap().id(42), "a-0042-b");
        for bad in ["nothing", "{n:4}", "{n", "{n:0x}"] {
            assert!(bad.parse::<IdPattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn device_keys_are_stable_distinct_and_valid() {
        let k = device_key("c2VjcmV0LXNlY3JldC1zZWNyZXQ=", "d1");
        assert_eq!(k, device_key("c2VjcmV0LXNlY3JldC1zZWNyZXQ=", "d1"));
        assert_ne!(k, device_key("c2VjcmV0LXNlY3JldC1zZWNyZXQ=", "d2"));
        assert!(iothub_emulator::sas::decode_key(&k).is_ok());
    }
}
