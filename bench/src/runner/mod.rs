//! The scenario runner: starts a hub with its FTP package server and the simulated fleet in this
//! process (embedded mode), or drives a hub and fleet running elsewhere ([`external`]); builds the
//! scenario's packages, plays the timeline (`release`, `offline`, `send`; the faults in
//! [`events`]; the phased rollout in [`rollout`]) deterministically under the seed, observes the
//! hub (install telemetry, feedback, twins) into [`metrics::Observed`] and stops once every
//! targeted device is final or `time_limit` passes. It owns the run's work directory and its
//! [`hub_side::HubSide`] / [`fleet_side::FleetSide`]; the hub's state stays owned by the hub.

pub mod child;
pub mod clock;
pub mod embedded;
pub mod events;
pub mod external;
pub mod fleet_side;
pub mod html;
pub mod hub_side;
pub mod junit;
pub mod metrics;
pub mod pipeline;
pub mod progress;
pub mod rollout;
pub mod shards;
pub mod shared;
pub mod tier;
pub mod timeseries;
mod update_checks;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use iothub_emulator::clock::parse_iso8601;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use simulated_devices::fleet::{self, Fleet};
use simulated_devices::inprocess::{InProcessConfig, InProcessFleet, MemoryPackages};
use simulated_devices::notice::UpdateNotice;
use simulated_devices::package::{self, Manifest, Release};
use simulated_devices::service_client::ServiceClient;

use crate::scenario::plan::{Action, DurationDist, HubPlan, ScenarioPlan, Target, TimeMode, Transport};
use clock::ScenarioClock;
use fleet_side::FleetSide;
use hub_side::HubSide;
use metrics::{DeviceTimes, Observed, ReleaseRecord};
use progress::{PROGRESS_EVERY, Progress};
use shards::ShardedFleet;
use shared::{InstallEvent, Outgoing, Sent};
use timeseries::TimeSeries;

/// How often the runner looks at the hub and the timeline.
const TICK: Duration = Duration::from_millis(50);
/// The same in compressed time, where every tick of lag between the end of one device's work
/// and the next jump is wall time the run pays for.
const COMPRESSED_TICK: Duration = Duration::from_millis(5);
/// AMQP connections a pipeline release sends over (the hub serves each from its own task).
const PIPELINE_CONNECTIONS: usize = 2;
/// Notices a release sends before the runner reads the hub again.
const SEND_ROUND: usize = 10_000;
/// How often, once telemetry was missed, every open device's twin is read.
const TWIN_SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Twins read per tick to confirm reported versions.
const TWIN_CHECKS_PER_TICK: usize = 20_000;
/// The slowest connect ramp compressed time plays (agents started per second).
const COMPRESSED_RAMP_PER_SEC: u32 = 2000;
/// The fleet secret device keys derive from (only this process uses it).
const FLEET_KEY: &str = "dGVzdGJlbmNoLXNjZW5hcmlvLXJ1bm5lci1rZXk=";
/// The application name of every package the runner builds.
const APP_NAME: &str = "app";

/// Why a run could not start or finish (unmet expectations are not errors: see [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The scenario uses a feature this runner does not have yet.
    #[error("{key}: {what} is not supported yet by `testbench run`")]
    Unsupported {
        /// The scenario key.
        key: String,
        /// The feature.
        what: String,
    },
    /// The scenario asks for something its hub or fleet mode cannot do.
    #[error("{key}: {why}")]
    Mode {
        /// The scenario key.
        key: String,
        /// Why, and what would work.
        why: String,
    },
    /// Starting or reaching the hub, seeding the registry or building a package failed.
    #[error("{0}")]
    Setup(String),
}

fn setup(what: &str) -> impl FnOnce(String) -> RunError + '_ {
    move |e| RunError::Setup(format!("{what}: {e}"))
}

/// A finished run: what was observed and every unmet expectation.
#[derive(Debug)]
pub struct Outcome {
    /// Observations.
    pub observed: Observed,
    /// Unmet expectations, each naming its key; empty when the scenario passed.
    pub unmet: Vec<String>,
    /// Every expectation checked, met or not (the JUnit report's test cases).
    pub verdicts: Vec<metrics::Verdict>,
}

/// Refuses the scenario features this runner does not implement, naming the key.
pub fn check_supported(plan: &ScenarioPlan) -> Result<(), RunError> {
    let unsupported = |key: String, what: &str| Err(RunError::Unsupported { key, what: what.to_string() });
    external::check_modes(plan)?;
    if plan.time == TimeMode::Compressed && !compressible(plan) {
        return Err(RunError::Mode {
            key: "time".into(),
            why: "compressed time needs the embedded hub and an in-process fleet (fleet.shards = 1): the \
                  runner must see every queue and every agent to know that nothing is in flight"
                .into(),
        });
    }
    update_checks::check_supported(plan)?;
    if plan.fleet.transport != Transport::default() && !matches!(plan.hub, HubPlan::Embedded { .. }) {
        return Err(RunError::Mode {
            key: "fleet.transport".into(),
            why: "the runner's agents reach an external hub over MQTT with TLS only; remove fleet.transport"
                .into(),
        });
    }
    if plan.fleet.transport == Transport::InProcess {
        for (i, e) in plan.events.iter().enumerate() {
            if let Action::FtpFault { .. } = e.action {
                return unsupported(
                    format!("event[{i}].action"),
                    "'ftp-fault' with fleet.transport = \"in-process\" (its devices read packages from memory, \
                     not over FTP); use transport \"mqtt\"",
                );
            }
        }
    }
    if plan.fleet.shards > 1 {
        for (i, e) in plan.events.iter().enumerate() {
            if let Action::LinkFlap { .. } = e.action {
                return unsupported(
                    format!("event[{i}].action"),
                    "'link-flap' with fleet.shards > 1 (shard processes can only be switched off and on)",
                );
            }
        }
    }
    Ok(())
}

/// Whether `plan` can run in compressed time: only with the embedded hub and an in-process fleet
/// can the runner see every queue and every agent, and so know that nothing is in flight.
pub fn compressible(plan: &ScenarioPlan) -> bool {
    matches!(plan.hub, HubPlan::Embedded { .. }) && !plan.fleet.external && plan.fleet.shards <= 1
}

/// Resizes the fleet to `devices` and scales the absolute counts in `[expect]` (feedback
/// tallies, expired, failed, queue-full refusals) by the same factor, rounded: a scaled-down run
/// of a scenario keeps its meaning. A count is scaled as a share of the fleet (`count / devices`
/// times the new size, rounded), the same rounding `offline` shares and group sizes use, so a
/// count that is a share of the fleet stays exactly that share.
pub fn scale_devices(plan: &mut ScenarioPlan, devices: u64) {
    let before = plan.fleet.devices as f64;
    let scale = |v: &mut Option<u64>| {
        if let Some(n) = v {
            *n = (devices as f64 * (*n as f64 / before)).round() as u64;
        }
    };
    plan.fleet.devices = devices;
    let e = &mut plan.expect;
    for v in [
        &mut e.expired,
        &mut e.failed,
        &mut e.queue_full_rejections,
        &mut e.feedback.success,
        &mut e.feedback.expired,
        &mut e.feedback.rejected,
        &mut e.feedback.delivery_count_exceeded,
        &mut e.feedback.purged,
    ] {
        scale(v);
    }
}

/// Per-release bookkeeping the report does not need. The counters keep the runner's tick
/// independent of the fleet's size: a million-device release is not scanned every few ms.
struct Tracking {
    /// device index -> position in the release's `devices`.
    pos: HashMap<usize, usize>,
    /// Devices whose notice or install ended without the version (failed, expired, refused).
    terminal: Vec<bool>,
    /// Devices neither terminal nor reporting the version yet.
    open: usize,
    /// Of those, the ones a notice reached (a state was reported): work is under way.
    started: usize,
    /// Positions that reported `installed` and whose twin has not been seen with the version.
    to_check: Vec<usize>,
    /// The notices travel as desired-property patches of a configuration (a rollout with
    /// `via = "configuration"`): the hub pushed them when it applied the configuration, with no
    /// C2D queue to show them in flight, so every powered-on device that has not finished counts
    /// as work under way (compressed time does not jump past it).
    desired: bool,
}

impl Tracking {
    /// `n` targeted devices, every one open (a release registered before its sends finish).
    fn all_open(n: usize, desired: bool) -> Self {
        Self {
            pos: HashMap::with_capacity(n),
            terminal: vec![false; n],
            open: n,
            started: 0,
            to_check: Vec::new(),
            desired,
        }
    }

    fn is_done(&self, p: usize, t: &DeviceTimes) -> bool {
        self.terminal[p] || t.reported.is_some()
    }

    /// Device `p` ended without the version.
    fn finish_terminal(&mut self, p: usize, t: &DeviceTimes) {
        if !self.is_done(p, t) {
            self.open -= 1;
            self.started -= usize::from(t.delivered.is_some());
        }
        self.terminal[p] = true;
    }

    /// Device `p`'s twin reports the version (at `now`).
    fn finish_reported(&mut self, p: usize, t: &mut DeviceTimes, now: u64) {
        if !self.is_done(p, t) {
            self.open -= 1;
            self.started -= usize::from(t.delivered.is_some());
        }
        t.reported.get_or_insert(now);
    }
}

/// The run in progress.
struct Run {
    plan: ScenarioPlan,
    hub: HubSide,
    ids: Vec<String>,
    index: HashMap<String, usize>,
    releases: HashMap<String, Release>,
    tracking: Vec<Tracking>,
    by_message: HashMap<String, (usize, usize)>,
    obs: Observed,
    rng: StdRng,
    log: Box<dyn FnMut(String) + Send>,
    progress: Box<dyn FnMut(&Progress) + Send>,
    /// Scenario time.
    clock: ScenarioClock,
    /// Devices the timeline has switched off (until their power-on time).
    off: Vec<bool>,
    /// Link flaps still to come and the FTP fault's end.
    faults: events::Faults,
    /// The packages in-process devices install from (`fleet.transport = "in-process"`).
    memory: Option<Arc<MemoryPackages>>,
    /// Telemetry the hub dropped unread, as of the last look.
    telemetry_missed_seen: u64,
    /// When (wall time into the run) open devices' twins are swept next, once telemetry was missed.
    twin_sweep_at: Option<Duration>,
    /// Releases whose notices are still being sent in the background.
    sending: Vec<pipeline::Sending>,
}

/// Runs `plan` with its working files under `work_dir` (removed afterwards); `log` gets one line
/// per timeline step, `progress` a snapshot every [`PROGRESS_EVERY`].
pub async fn run(
    plan: ScenarioPlan,
    work_dir: &Path,
    log: impl FnMut(String) + Send + 'static,
    progress: impl FnMut(&Progress) + Send + 'static,
) -> Result<Outcome, RunError> {
    check_supported(&plan)?;
    let _ = std::fs::remove_dir_all(work_dir);
    std::fs::create_dir_all(work_dir).map_err(|e| setup("work directory")(e.to_string()))?;
    let hub = HubSide::start(&plan.hub, plan.fleet.devices, work_dir).await?;
    let result = run_with_hub(plan, hub, work_dir, Box::new(log), Box::new(progress)).await;
    let _ = std::fs::remove_dir_all(work_dir);
    result
}

async fn run_with_hub(
    plan: ScenarioPlan,
    hub: HubSide,
    work_dir: &Path,
    mut log: Box<dyn FnMut(String) + Send>,
    progress: Box<dyn FnMut(&Progress) + Send>,
) -> Result<Outcome, RunError> {
    let memory_start = crate::memory::current();
    let n = plan.fleet.devices;
    let ids: Vec<String> = (0..n).map(|i| plan.fleet.ids.id(i)).collect();
    let index: HashMap<String, usize> = ids.iter().enumerate().map(|(i, id)| (id.clone(), i)).collect();
    let svc = hub.service_client()?;
    log(format!("dashboard: {}", hub.dashboard_url()));
    let mut rng = StdRng::seed_from_u64(plan.seed);
    tracing::debug!("building packages");
    let releases = build_packages(&plan, hub.packages_dir(), work_dir, &mut rng)?;
    tracing::debug!("packages built");
    let ramp = plan.fleet.connect_ramp.as_secs_f64();
    let mut ramp_per_sec = if ramp > 0.0 { (n as f64 / ramp).ceil() as u32 } else { 0 };
    if plan.time == TimeMode::Compressed && ramp_per_sec > 0 {
        // The ramp is waiting before the timeline starts: compressed time keeps a ramp (so a big
        // fleet does not connect in one burst) but at least COMPRESSED_RAMP_PER_SEC.
        ramp_per_sec = ramp_per_sec.max(COMPRESSED_RAMP_PER_SEC);
    }
    let shards = u64::from(plan.fleet.shards).min(n) as u32;
    if !plan.fleet.external {
        fleet::seed(&svc, FLEET_KEY, &ids, 4)
            .await
            .map_err(|e| setup("seeding the registry")(e.to_string()))?;
    }
    let transport = plan.fleet.transport;
    let memory = (transport == Transport::InProcess)
        .then(|| memory_packages(&releases, hub.packages_dir()))
        .transpose()?;
    let fleet = if plan.fleet.external {
        external::wait_for_fleet(&svc, &plan, &index, plan.time_limit, &mut *log).await?;
        FleetSide::External(svc.clone())
    } else if shards > 1 {
        let (link, initial) = (hub.link(false)?, &plan.fleet.initial_version);
        let work = work_dir.join("shards");
        let retry = plan.fleet.update_retry.on_reconnect;
        let children =
            ShardedFleet::start(&ids, shards, &link, FLEET_KEY, &work, ramp_per_sec, initial, retry).await?;
        log(format!("fleet: {n} devices in {shards} shard processes"));
        FleetSide::Shards(children, svc.clone())
    } else if let (Some(memory), Some(embedded)) = (&memory, hub.embedded()) {
        let cfg = InProcessConfig {
            initial_version: Some(plan.fleet.initial_version.clone()),
            ramp_per_sec,
            retry_on_reconnect: plan.fleet.update_retry.on_reconnect,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            ..InProcessConfig::new(ids.iter().cloned().collect(), FLEET_KEY)
        };
        log(format!("fleet: {n} devices in this process, no sockets (transport in-process)"));
        FleetSide::Sessions(InProcessFleet::start(embedded.hub.clone(), cfg, memory.clone()))
    } else {
        let (mut cfg, backend) = hub
            .link(transport == Transport::MqttTls)?
            .fleet_config(
                ids.clone(),
                FLEET_KEY,
                work_dir.join("devices"),
                ramp_per_sec,
                &plan.fleet.initial_version,
            )
            .map_err(|e| RunError::Setup(format!("hub.ca_file: {e}")))?;
        // Periodic checks run on scenario time ([`update_checks`]), not on the agents' clocks.
        cfg.update_retry =
            fleet::UpdateRetry { on_reconnect: plan.fleet.update_retry.on_reconnect, check_every: None };
        FleetSide::InProcess(Fleet::start(cfg, Arc::new(backend)).await)
    };
    tracing::debug!("fleet started");
    // After the fleet is up: an external fleet registers its devices itself.
    rollout::tag_groups(&svc, &plan.fleet.groups, &ids).await?;
    let initial = plan.fleet.initial_version.clone();
    let plan_time = plan.time;
    let mut run = Run {
        index,
        obs: Observed {
            scenario: plan.name.clone(),
            device_ids: ids.clone(),
            final_versions: vec![initial.clone(); ids.len()],
            final_states: vec![None; ids.len()],
            rollout: plan.rollout.as_ref().map(rollout::RolloutRecord::new),
            description: plan.description.clone(),
            hub_start_ms: hub.now(),
            series: TimeSeries::new(ids.len(), &initial),
            memory: (memory_start, None),
            hub_in_process: hub.embedded().is_some() && fleet.in_process(),
            transport: (!plan.fleet.external && shards <= 1).then_some(transport),
            time_mode: plan.time,
            // The embedded hub's dashboard ends with the run; an external one stays up.
            dashboard_url: hub.embedded().is_none().then(|| hub.dashboard_url()),
            ..Observed::default()
        },
        plan,
        hub,
        ids,
        releases,
        tracking: Vec::new(),
        by_message: HashMap::new(),
        rng,
        log,
        progress,
        clock: ScenarioClock::start(plan_time),
        off: vec![false; n as usize],
        faults: events::Faults::default(),
        memory,
        telemetry_missed_seen: 0,
        twin_sweep_at: None,
        sending: Vec::new(),
    };
    let outcome = run.play(&fleet, &svc).await;
    run.hub.publish_final_status().await;
    tracing::debug!("timeline done; stopping the fleet");
    fleet.stop().await;
    tracing::debug!("fleet stopped; stopping the hub");
    run.hub.stop().await;
    tracing::debug!("hub stopped");
    outcome
}

/// The built packages, read into memory for in-process devices (which never touch the disk).
fn memory_packages(
    releases: &HashMap<String, Release>,
    packages_dir: &Path,
) -> Result<Arc<MemoryPackages>, RunError> {
    let memory = MemoryPackages::new();
    for release in releases.values() {
        let path = packages_dir.join(&release.file);
        let bytes =
            std::fs::read(&path).map_err(|e| setup("packages")(format!("{}: {e}", path.display())))?;
        memory.add(&release.file, bytes).map_err(|e| setup("packages")(e.to_string()))?;
    }
    Ok(memory)
}

/// Builds every package into the FTP directory: `size` bytes of seeded noise (so it does not
/// compress); a `corrupt` package is announced with a wrong sha256.
fn build_packages(
    plan: &ScenarioPlan,
    packages_dir: &Path,
    work_dir: &Path,
    rng: &mut StdRng,
) -> Result<HashMap<String, Release>, RunError> {
    let mut out = HashMap::new();
    for p in &plan.packages {
        let src: PathBuf = work_dir.join("src").join(&p.version);
        std::fs::create_dir_all(&src).map_err(|e| setup("package sources")(e.to_string()))?;
        let mut noise = vec![0u8; p.size as usize];
        rng.fill(&mut noise[..]);
        std::fs::write(src.join("firmware.bin"), noise)
            .map_err(|e| setup("package sources")(e.to_string()))?;
        let manifest = Manifest { name: APP_NAME.into(), version: p.version.clone(), self_test: None };
        let (_, _, mut release) = package::build_package(&src, Some(&manifest), packages_dir)
            .map_err(|e| setup("building a package")(e.to_string()))?;
        if p.corrupt {
            release.sha256 = "0".repeat(64);
        }
        out.insert(p.version.clone(), release);
    }
    Ok(out)
}

fn draw(dist: &DurationDist, rng: &mut StdRng) -> Duration {
    match *dist {
        DurationDist::Fixed(d) => d,
        DurationDist::Uniform { min, max } => {
            Duration::from_millis(rng.random_range(min.as_millis() as u64..=max.as_millis() as u64))
        }
        DurationDist::Exponential { mean } => {
            let u: f64 = rng.random_range(0.0..1.0);
            mean.mul_f64(-(1.0 - u).ln())
        }
    }
}

impl Run {
    fn say(&mut self, line: String) {
        let t = self.clock.now().as_secs_f64();
        (self.log)(format!("[{t:7.1}s] {line}"));
    }

    async fn targets(&self, target: &Target, svc: &ServiceClient) -> Result<Vec<usize>, RunError> {
        let n = self.ids.len();
        Ok(match target {
            Target::All => (0..n).collect(),
            Target::Group(name) => rollout::group_range(&self.plan.fleet.groups, name, n).collect(),
            Target::Where(clause) => {
                let ids =
                    svc.device_ids(Some(clause)).await.map_err(|e| setup("target query")(e.to_string()))?;
                let mut v: Vec<usize> = ids.iter().filter_map(|id| self.index.get(id).copied()).collect();
                v.sort_unstable();
                v
            }
        })
    }

    async fn play(&mut self, fleet: &FleetSide, svc: &ServiceClient) -> Result<Outcome, RunError> {
        let events = self.plan.events.clone();
        let mut next = 0;
        let mut power_on: BinaryHeap<Reverse<(Duration, usize)>> = BinaryHeap::new();
        let limit = self.plan.time_limit;
        let mut progress_at = Duration::ZERO;
        let tick = if self.clock.mode() == TimeMode::Compressed { COMPRESSED_TICK } else { TICK };
        let mut checks = update_checks::UpdateChecks::new(&self.plan.fleet.update_retry, self.ids.len());
        loop {
            let now = self.clock.now();
            if self.obs.series.due(now) {
                let connected = fleet.connected(&self.index).await? as u64;
                let rss = crate::memory::current().map(|m| m.rss_kib);
                self.obs.series.record(now, connected, rss);
            }
            if now >= progress_at {
                progress_at = now + PROGRESS_EVERY;
                self.progress(&events, next);
            }
            while next < events.len() && events[next].at <= now {
                self.execute(&events[next].action, events[next].at, fleet, svc, &mut power_on).await?;
                next += 1;
            }
            while let Some(&Reverse((at, i))) = power_on.peek()
                && at <= now
            {
                power_on.pop();
                fleet.set_power(i, true);
                self.off[i] = false;
            }
            self.fire_faults(fleet, now);
            checks.poll(fleet, now);
            self.observe().await?;
            self.step_rollout(svc, now).await?;
            if next == events.len() && power_on.is_empty() && self.settled() {
                break;
            }
            if now >= limit {
                self.obs.timed_out = true;
                break;
            }
            let due = [events.get(next).map(|e| e.at), power_on.peek().map(|Reverse((at, _))| *at)]
                .into_iter()
                .chain([self.faults.next_due(), self.rollout_next_due(), checks.next_due(), Some(limit)])
                .chain([self.hub.next_due().map(|gap| now + gap)])
                .flatten()
                .min();
            if let Some(gap) = self.clock.gap_to(now, due)
                && self.try_jump(fleet, gap).await?
            {
                continue;
            }
            tokio::time::sleep(tick).await;
        }
        self.obs.elapsed = self.clock.now();
        self.obs.wall_elapsed = self.clock.wall();
        self.obs.throttled_retries += self.hub.throttled_retries();
        (self.obs.skipped, self.obs.time_jumps) = self.clock.skipped();
        let connected = fleet.connected(&self.index).await? as u64;
        let rss = crate::memory::current().map(|m| m.rss_kib);
        self.obs.series.record(self.obs.elapsed, connected, rss);
        self.obs.memory.1 = crate::memory::current();
        self.collect_fleet_counts(fleet);
        tracing::debug!("reading final twins");
        self.final_twins().await?;
        tracing::debug!("final twins read");
        let verdicts = self.obs.verdicts(&self.plan.expect);
        let unmet = verdicts.iter().filter_map(|v| v.failure.clone()).collect();
        Ok(Outcome { observed: self.obs.clone(), unmet, verdicts })
    }

    async fn execute(
        &mut self,
        action: &Action,
        at: Duration,
        fleet: &FleetSide,
        svc: &ServiceClient,
        power_on: &mut BinaryHeap<Reverse<(Duration, usize)>>,
    ) -> Result<(), RunError> {
        match action {
            Action::Release { version, ttl, target, pipeline: false } => {
                let targets = self.targets(target, svc).await?;
                self.notify(version, *ttl, &targets, at, None).await?;
            }
            Action::Release { version, ttl, target, pipeline: true } => {
                // The seed pipeline: the ids paged through the query API, then AMQP sends.
                let clause = match target {
                    Target::All => None,
                    Target::Group(name) => Some(format!("tags.group = '{name}'")),
                    Target::Where(clause) => Some(clause.clone()),
                };
                let ids = svc
                    .device_ids(clause.as_deref())
                    .await
                    .map_err(|e| setup("release query")(e.to_string()))?;
                let mut targets: Vec<usize> =
                    ids.iter().filter_map(|id| self.index.get(id).copied()).collect();
                targets.sort_unstable();
                self.say(format!("release pipeline: {} device ids paged through the query API", ids.len()));
                self.notify(version, *ttl, &targets, at, Some(svc)).await?;
            }
            Action::Offline { target, share, duration } => {
                let targets = self.targets(target, svc).await?;
                let k = ((targets.len() as f64) * share).round() as usize;
                let mut chosen: Vec<usize> = rand::seq::index::sample(&mut self.rng, targets.len(), k)
                    .into_iter()
                    .map(|j| targets[j])
                    .collect();
                chosen.sort_unstable();
                let mut switched_off = Vec::with_capacity(chosen.len());
                for &i in &chosen {
                    let off_for = draw(duration, &mut self.rng);
                    fleet.set_power(i, false);
                    self.off[i] = true;
                    power_on.push(Reverse((at + off_for, i)));
                    switched_off.push((i, off_for));
                }
                self.obs.offline.record(at, &switched_off);
                self.say(format!("offline: {} of {} devices switched off", chosen.len(), targets.len()));
            }
            Action::Send { target, count, body, ttl } => {
                let targets = self.targets(target, svc).await?;
                let msgs = targets
                    .iter()
                    .flat_map(|&i| (0..*count).map(move |m| (i, m)))
                    .map(|(i, m)| (i, format!("send-{}-{m}-{}", at.as_millis(), self.ids[i])))
                    .collect();
                let outcomes = self.send_all(msgs, body.as_bytes(), *ttl, "text/plain").await;
                let ok = outcomes.iter().filter(|(_, sent)| sent.is_some()).count();
                let refused = outcomes.len() - ok;
                self.say(format!("send: {ok} messages queued, {refused} refused"));
            }
            Action::LinkFlap { target, share, count, interval, ftp } => {
                let targets = self.targets(target, svc).await?;
                self.link_flap(&targets, *share, *count, *interval, *ftp, at);
            }
            Action::FtpFault { rate_limit, drop_after, refuse_logins, refuse_sessions, lasting } => {
                self.ftp_fault(*rate_limit, *drop_after, *refuse_logins, *refuse_sessions, *lasting, at);
            }
            Action::HubRestart { kind } => {
                let down = self.hub.restart(*kind).await?;
                self.obs.hub_restarts.push(metrics::HubRestart { at, kind: kind.name(), down });
                self.say(format!(
                    "hub-restart ({}): the child hub is healthy again after {:.2} s; the fleet reconnects",
                    kind.name(),
                    down.as_secs_f64()
                ));
            }
        }
        Ok(())
    }

    /// Releases `version` to `targets`: writes `latest.json` and sends each an update notice
    /// (ack `full`, `ttl` as the expiry when given). Returns the release's index.
    /// With `pipeline`, the notices go out through that service client's AMQP connection.
    async fn notify(
        &mut self,
        version: &str,
        ttl: Option<Duration>,
        targets: &[usize],
        at: Duration,
        pipeline: Option<&ServiceClient>,
    ) -> Result<usize, RunError> {
        let release = self.releases[version].clone();
        package::write_latest(self.hub.packages_dir(), &release)
            .map_err(|e| setup("latest.json")(e.to_string()))?;
        if let Some(memory) = &self.memory {
            memory.set_latest(release.clone());
        }
        let ftp = self.hub.ftp_addr();
        let body = serde_json::to_vec(&UpdateNotice::for_release(&release, &ftp))
            .map_err(|e| setup("notice")(e.to_string()))?;
        let r = self.obs.releases.len();
        if let Some(svc) = pipeline
            && let Some((connections, hub)) = self.hub.background_sender(svc, PIPELINE_CONNECTIONS).await?
        {
            // Registered up front (every device open, nothing sent yet); the outcomes arrive
            // while the timeline goes on ([`Self::take_send_outcomes`]).
            let mut record = ReleaseRecord::new(version, at, targets.len());
            let mut tracking = Tracking::all_open(targets.len(), false);
            let mut notices = Vec::with_capacity(targets.len());
            for (p, &i) in targets.iter().enumerate() {
                let message_id = format!("release-{version}-{r}-{}", self.ids[i]);
                tracking.pos.insert(i, p);
                self.by_message.insert(message_id.clone(), (r, p));
                record.devices.push((i, DeviceTimes::default()));
                notices.push(pipeline::Notice { device_id: self.ids[i].clone(), message_id });
            }
            self.obs.releases.push(record);
            self.tracking.push(tracking);
            self.sending.push(pipeline::Sending::start(r, notices, body, ttl, connections, hub));
            self.say(format!(
                "release {version}: sending to {} devices over {PIPELINE_CONNECTIONS} AMQP connections",
                targets.len()
            ));
            return Ok(r);
        }
        self.obs.releases.push(ReleaseRecord::new(version, at, targets.len()));
        // Filled in as the rounds are sent.
        let mut tracking = Tracking::all_open(0, false);
        tracking.pos.reserve(targets.len());
        tracking.terminal.reserve(targets.len());
        self.tracking.push(tracking);
        // In rounds, with a look at the hub between them: a big release takes a while to send,
        // and the hub's telemetry ring and feedback queue are bounded.
        for chunk in targets.chunks(SEND_ROUND) {
            let msgs = chunk.iter().map(|&i| (i, format!("release-{version}-{r}-{}", self.ids[i]))).collect();
            let outcomes = self.send_all(msgs, &body, ttl, "application/json").await;
            let (record, tracking) = (&mut self.obs.releases[r], &mut self.tracking[r]);
            for (&i, (message_id, sent)) in chunk.iter().zip(outcomes) {
                tracking.pos.insert(i, record.devices.len());
                tracking.terminal.push(sent.is_none());
                tracking.open += usize::from(sent.is_some());
                if sent.is_none() {
                    record.send_failed += 1;
                } else {
                    self.by_message.insert(message_id, (r, record.devices.len()));
                }
                record.devices.push((i, DeviceTimes { sent, ..DeviceTimes::default() }));
            }
            if chunk.len() == SEND_ROUND {
                self.observe().await?;
            }
        }
        let failed = self.obs.releases[r].send_failed;
        self.say(format!("release {version} to {} devices ({failed} refused)", targets.len()));
        Ok(r)
    }

    /// Queues `(device index, message id)` messages with `ack: full`, in order; returns each
    /// message id with the hub time it was accepted, `None` when refused.
    async fn send_all(
        &mut self,
        msgs: Vec<(usize, String)>,
        body: &[u8],
        ttl: Option<Duration>,
        content_type: &str,
    ) -> Vec<(String, Option<u64>)> {
        let ids: Vec<String> = msgs.iter().map(|(_, id)| id.clone()).collect();
        let out: Vec<Outgoing<'_>> = msgs
            .into_iter()
            .map(|(i, message_id)| Outgoing { device_id: &self.ids[i], message_id, body, ttl, content_type })
            .collect();
        let outcomes = self.hub.send_all(out).await;
        ids.into_iter()
            .zip(outcomes)
            .map(|(id, sent)| match sent {
                Sent::Accepted(at) => {
                    self.obs.acked_sends += 1;
                    (id, Some(at))
                }
                Sent::QueueFull => {
                    self.obs.queue_full_rejections += 1;
                    (id, None)
                }
                Sent::Refused => (id, None),
            })
            .collect()
    }

    /// The latest release of `version` that targeted device `i`: (release, position).
    fn slot(&self, i: usize, version: &str) -> Option<(usize, usize)> {
        (0..self.obs.releases.len())
            .rev()
            .filter(|&r| self.obs.releases[r].version == version)
            .find_map(|r| self.tracking[r].pos.get(&i).map(|&p| (r, p)))
    }

    async fn observe(&mut self) -> Result<(), RunError> {
        self.take_send_outcomes();
        for m in self.hub.telemetry().await? {
            let Some(&i) = self.index.get(&m.device_id) else { continue };
            let InstallEvent { state, target_version, timestamp } = m.event;
            self.obs.final_states[i] = Some(state.clone());
            let Some(version) = target_version.as_deref() else { continue };
            if state == "installed" {
                *self.obs.installs.entry((i, version.to_string())).or_default() += 1;
                self.obs.series.installed(i, version);
            }
            let Some((r, p)) = self.slot(i, version) else { continue };
            // The device's own time of the transition: its events can reach the hub in a burst
            // (QoS 1 publishes queued behind a download), so the hub's enqueue time would move
            // "delivered" late and shrink "install". Same host clock as the hub's in every mode
            // the runner supports; the hub's time is the fallback.
            // Devices stamp with the wall clock; hub time is ahead by what compressed time skipped
            // (jumps happen only while no device works, so the offset now is the one in force then).
            let at = timestamp
                .as_deref()
                .and_then(parse_iso8601)
                .map_or(m.enqueued_at, |t| t + self.hub.time_offset_ms());
            let (t, tracking) = (&mut self.obs.releases[r].devices[p].1, &mut self.tracking[r]);
            if t.delivered.is_none() && !tracking.is_done(p, t) {
                tracking.started += 1;
            }
            t.delivered.get_or_insert(at);
            match state.as_str() {
                "installed" => {
                    if t.installed.is_none() {
                        tracking.to_check.push(p);
                    }
                    t.installed.get_or_insert(at);
                }
                "failed" | "rolled-back" | "already-installed" => tracking.finish_terminal(p, t),
                _ => {}
            }
        }
        for rec in self.hub.feedback().await? {
            let slot = self.by_message.get(&rec.original_message_id).copied();
            if let Some((r, p)) = slot
                && self.obs.releases[r].devices[p].1.feedback.is_some()
            {
                // The same record again: a feedback batch whose completion a hub restart lost is
                // delivered again (at least once).
                self.obs.duplicate_feedback += 1;
                continue;
            }
            self.obs.feedback.add(&rec.status);
            if let Some((r, p)) = slot {
                let t = &mut self.obs.releases[r].devices[p].1;
                if rec.status != "Success" {
                    self.tracking[r].finish_terminal(p, t);
                }
                t.feedback = Some(rec.status);
            }
        }
        self.check_twins().await?;
        Ok(())
    }

    /// Reads the twins of devices that reported `installed` (and, once telemetry was missed,
    /// of every open device a round at a time) and marks those reporting the version.
    async fn check_twins(&mut self) -> Result<(), RunError> {
        let missed = self.hub.telemetry_missed();
        if missed > self.telemetry_missed_seen {
            self.telemetry_missed_seen = missed;
            let line = if self.hub.restarts() > 0 {
                "telemetry: the hub restarted and lost what it held unread; open devices are checked through \
                 their twins"
                    .to_string()
            } else {
                format!(
                    "telemetry: the hub's ring dropped {missed} messages before they were read; open devices are \
                     checked through their twins"
                )
            };
            self.say(line);
        }
        // Devices whose `installed` event was lost are found through their twins instead: every
        // open device once a second.
        let wall = self.clock.wall();
        if missed > 0 && self.twin_sweep_at.is_none_or(|at| wall >= at) {
            self.twin_sweep_at = Some(wall + TWIN_SWEEP_EVERY);
            for (rel, tr) in self.obs.releases.iter().zip(&mut self.tracking) {
                tr.to_check = (0..rel.devices.len()).filter(|&p| !tr.is_done(p, &rel.devices[p].1)).collect();
            }
        }
        for r in 0..self.obs.releases.len() {
            if self.tracking[r].to_check.is_empty() {
                continue;
            }
            let rel = &self.obs.releases[r];
            let tracking = &self.tracking[r];
            // A bounded round per tick: twin reads cost a few µs each.
            let round = tracking.to_check.len().min(TWIN_CHECKS_PER_TICK);
            let waiting: Vec<usize> = tracking.to_check[..round]
                .iter()
                .copied()
                .filter(|&p| !tracking.is_done(p, &rel.devices[p].1))
                .collect();
            let later: Vec<usize> = tracking.to_check[round..].to_vec();
            let ids: Vec<&str> = waiting.iter().map(|&p| self.ids[rel.devices[p].0].as_str()).collect();
            let reporting = self.hub.reporting(&rel.version, &ids).await?;
            let now = self.hub.now();
            let mut still = Vec::new();
            for (p, id) in waiting.into_iter().zip(ids.iter().map(|s| s.to_string()).collect::<Vec<_>>()) {
                let t = &mut self.obs.releases[r].devices[p].1;
                if reporting.contains(&id) {
                    self.tracking[r].finish_reported(p, t, now);
                } else if t.installed.is_some() {
                    // Installed: its twin follows shortly. Others wait for the next sweep.
                    still.push(p);
                }
            }
            still.extend(later);
            self.tracking[r].to_check = still;
        }
        Ok(())
    }

    /// Takes what the background senders answered: accept times, refusals (the device is then
    /// final without the version).
    fn take_send_outcomes(&mut self) {
        let mut k = 0;
        while k < self.sending.len() {
            let r = self.sending[k].release;
            for (p, sent) in self.sending[k].take() {
                let rel = &mut self.obs.releases[r];
                let t = &mut rel.devices[p].1;
                match sent {
                    Sent::Accepted(at) => {
                        self.obs.acked_sends += 1;
                        t.sent = Some(at);
                        continue;
                    }
                    Sent::QueueFull => self.obs.queue_full_rejections += 1,
                    Sent::Refused => {}
                }
                rel.send_failed += 1;
                self.tracking[r].finish_terminal(p, t);
            }
            let s = &self.sending[k];
            if s.left == 0 || s.is_abandoned() {
                let (left, rel) = (s.left, &self.obs.releases[r]);
                let line = format!(
                    "release {} sent to {} devices ({} refused{})",
                    rel.version,
                    rel.devices.len(),
                    rel.send_failed,
                    if left > 0 { format!(", {left} never answered") } else { String::new() }
                );
                let done = self.sending.remove(k);
                self.obs.throttled_retries += done.throttled.load(std::sync::atomic::Ordering::Relaxed);
                self.say(line);
            } else {
                k += 1;
            }
        }
    }

    /// Hands the progress callback a snapshot (connected devices as of the last sample).
    fn progress(&mut self, events: &[crate::scenario::plan::Event], next: usize) {
        let devices = self.obs.releases.iter().flat_map(|r| r.devices.iter());
        let (targeted, installed) =
            devices.fold((0, 0), |(n, k), (_, t)| (n + 1, k + usize::from(t.installed.is_some())));
        let snapshot = Progress {
            elapsed: self.clock.now(),
            phase: progress::phase(events, next),
            devices: self.ids.len(),
            connected: self.obs.series.connected.last().copied().unwrap_or(0) as usize,
            targeted,
            installed,
            time_limit: self.plan.time_limit,
        };
        // The hub's dashboard shows the run too: a small value replaced each report (sent to an
        // external hub at most once a second).
        self.hub.publish_status(progress::status_json(&self.plan.name, &snapshot, events, next));
        (self.progress)(&snapshot);
    }

    /// Every targeted device is final and every acked message has its feedback.
    fn settled(&self) -> bool {
        let devices_final = self.sending.is_empty() && self.tracking.iter().all(|tr| tr.open == 0);
        devices_final
            && self.obs.feedback.total() >= self.obs.acked_sends
            && self.faults.flaps_done()
            && self.rollout_done()
    }

    /// Compressed time: when nothing is in flight, skips `gap` of scenario time (and hub time)
    /// to the next timed event. Nothing in flight means: every targeted device that started on
    /// its notice (reported a state) has finished (failed, or its twin reports the version) or is
    /// switched off, no connected device has a C2D message queued or locked, and every powered-on
    /// agent is connected and idle; checked in that order, hub before fleet, so a message the hub
    /// hands over between the two looks is seen as the agent's work. Returns whether it jumped.
    async fn try_jump(&mut self, fleet: &FleetSide, gap: Duration) -> Result<bool, RunError> {
        // A cheap look at the fleet first: the hub's count scans every device.
        if !self.sending.is_empty() || fleet.unsettled() != Some(0) {
            return Ok(false);
        }
        if self.hub.deliveries_in_flight() != Some(0) || fleet.unsettled() != Some(0) {
            return Ok(false);
        }
        // Idle agents have had every report acknowledged, so the hub holds them all: read them
        // now, before the jump, so their device timestamps map to the hub time they belong to.
        self.observe().await?;
        // Only a release with work under way needs the scan (the counters say which).
        let open = self
            .obs
            .releases
            .iter()
            .zip(&self.tracking)
            .filter(|(_, tr)| tr.started > 0 || tr.desired)
            .any(|(rel, tr)| {
                rel.devices.iter().zip(&tr.terminal).any(|((i, t), done)| {
                    !*done && (t.delivered.is_some() || tr.desired) && t.reported.is_none() && !self.off[*i]
                })
            });
        if open {
            return Ok(false);
        }
        tracing::debug!(now = ?self.clock.now(), ?gap, "compressed time: nothing in flight, jumping");
        self.hub.advance_time(gap)?;
        self.clock.skip(gap);
        Ok(true)
    }

    async fn final_twins(&mut self) -> Result<(), RunError> {
        let versions = self.hub.app_versions(&self.ids).await?;
        for (i, id) in self.ids.iter().enumerate() {
            if let Some(v) = versions.get(id) {
                self.obs.final_versions[i] = v.clone();
            }
        }
        Ok(())
    }
}
