//! The scenario runner (embedded mode): starts a hub with its FTP package server and the
//! simulated fleet in this process, builds the scenario's packages, plays the timeline
//! (`release`, `offline`, `send`) deterministically under the seed, observes the hub (install
//! telemetry, feedback, twins) into [`metrics::Observed`] and stops once every targeted device is
//! final or `time_limit` passes. It owns the run's hub, fleet and work directory; the hub's state
//! stays owned by the [`iothub_emulator::Hub`].

pub mod html;
pub mod metrics;
pub mod progress;
pub mod timeseries;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use iothub_emulator::HubConfig;
use iothub_emulator::c2d::{AckMode, C2dMessage, QueueConfig};
use iothub_emulator::server::{ListenConfig, RunningHub};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use simulated_devices::agent::FtpBackend;
use simulated_devices::fleet::{self, Fleet, FleetConfig, Registration};
use simulated_devices::notice::UpdateNotice;
use simulated_devices::package::{self, Manifest, Release};
use simulated_devices::service_client::ServiceClient;
use tokio::time::Instant;

use crate::scenario::plan::{Action, DurationDist, HubPlan, ScenarioPlan, Target};
use metrics::{DeviceTimes, Observed, ReleaseRecord};
use progress::{PROGRESS_EVERY, Progress};
use timeseries::TimeSeries;

/// How often the runner looks at the hub and the timeline.
const TICK: Duration = Duration::from_millis(50);
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
    /// Starting the hub, seeding the registry or building a package failed.
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
}

/// Refuses the scenario features this runner does not implement, naming the key.
pub fn check_supported(plan: &ScenarioPlan) -> Result<(), RunError> {
    let unsupported = |key: String, what: &str| Err(RunError::Unsupported { key, what: what.to_string() });
    if let HubPlan::External { .. } = plan.hub {
        return unsupported("hub.mode".into(), "an external hub");
    }
    if plan.rollout.is_some() {
        return unsupported("rollout".into(), "a phased rollout");
    }
    for (i, e) in plan.events.iter().enumerate() {
        match e.action {
            Action::LinkFlap { .. } => return unsupported(format!("event[{i}].action"), "'link-flap'"),
            Action::FtpFault { .. } => return unsupported(format!("event[{i}].action"), "'ftp-fault'"),
            Action::Release { .. } | Action::Offline { .. } | Action::Send { .. } => {}
        }
    }
    Ok(())
}

/// Resizes the fleet to `devices` and scales the absolute counts in `[expect]` (feedback
/// tallies, expired, failed, queue-full refusals) by the same factor, rounded: a scaled-down run
/// of a scenario keeps its meaning.
pub fn scale_devices(plan: &mut ScenarioPlan, devices: u64) {
    let factor = devices as f64 / plan.fleet.devices as f64;
    let scale = |v: &mut Option<u64>| {
        if let Some(n) = v {
            *n = (*n as f64 * factor).round() as u64;
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

/// Per-release bookkeeping the report does not need.
struct Tracking {
    /// device index -> position in the release's `devices`.
    pos: HashMap<usize, usize>,
    /// Devices whose notice or install ended without the version (failed, expired, refused).
    terminal: Vec<bool>,
}

/// The run in progress.
struct Run {
    plan: ScenarioPlan,
    hub: RunningHub,
    ids: Vec<String>,
    index: HashMap<String, usize>,
    releases: HashMap<String, Release>,
    tracking: Vec<Tracking>,
    by_message: HashMap<String, (usize, usize)>,
    obs: Observed,
    telemetry_after: u64,
    rng: StdRng,
    log: Box<dyn FnMut(String) + Send>,
    progress: Box<dyn FnMut(&Progress) + Send>,
    t0: Instant,
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
    let HubPlan::Embedded { feedback_interval, c2d_default_ttl } = plan.hub else {
        unreachable!("check_supported refuses external hubs")
    };
    let _ = std::fs::remove_dir_all(work_dir);
    std::fs::create_dir_all(work_dir).map_err(|e| setup("work directory")(e.to_string()))?;
    let config = HubConfig {
        feedback_batch_interval_ms: feedback_interval.as_millis() as u64,
        c2d: QueueConfig { default_ttl_ms: c2d_default_ttl.as_millis() as u64, ..QueueConfig::default() },
        ..HubConfig::default()
    };
    let listen = ListenConfig::ephemeral(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let hub = RunningHub::start(config, &listen, &work_dir.join("hub"))
        .await
        .map_err(|e| setup("starting the hub")(e.to_string()))?;
    let result = run_with_hub(plan, hub, work_dir, Box::new(log), Box::new(progress)).await;
    let _ = std::fs::remove_dir_all(work_dir);
    result
}

async fn run_with_hub(
    plan: ScenarioPlan,
    hub: RunningHub,
    work_dir: &Path,
    log: Box<dyn FnMut(String) + Send>,
    progress: Box<dyn FnMut(&Progress) + Send>,
) -> Result<Outcome, RunError> {
    let memory_start = crate::memory::current();
    let n = plan.fleet.devices;
    let ids: Vec<String> = (0..n).map(|i| plan.fleet.ids.id(i)).collect();
    let svc = ServiceClient::new(
        &hub.owner_connection_string(),
        &format!("https://127.0.0.1:{}", hub.https_addr.port()),
        Some(&hub.ca_pem),
    )
    .map_err(|e| setup("service client")(e.to_string()))?;
    fleet::seed(&svc, FLEET_KEY, &ids, 4).await.map_err(|e| setup("seeding the registry")(e.to_string()))?;
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let releases = build_packages(&plan, &hub.packages_dir, work_dir, &mut rng)?;
    let plain =
        hub.mqtt_plain_addr.ok_or_else(|| RunError::Setup("the hub has no plain MQTT listener".into()))?;
    let ftp = hub.ftp_addr.ok_or_else(|| RunError::Setup("the hub serves no FTP".into()))?;
    let ramp = plan.fleet.connect_ramp.as_secs_f64();
    let cfg = FleetConfig {
        device_ids: ids.clone(),
        fleet_key: FLEET_KEY.into(),
        registration: Registration::Seeded,
        data_root: work_dir.join("devices"),
        hub_host: hub.hub.hostname().to_string(),
        mqtt_host: plain.ip().to_string(),
        mqtt_port: plain.port(),
        tls: None,
        keep_alive: Duration::from_secs(60),
        ramp_per_sec: if ramp > 0.0 { (n as f64 / ramp).ceil() as u32 } else { 0 },
        max_concurrent_installs: 50,
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(2),
    };
    let fleet = Fleet::start(cfg, Arc::new(FtpBackend::new(ftp.to_string()))).await;
    let initial = plan.fleet.initial_version.clone();
    let mut run = Run {
        index: ids.iter().enumerate().map(|(i, id)| (id.clone(), i)).collect(),
        obs: Observed {
            scenario: plan.name.clone(),
            device_ids: ids.clone(),
            final_versions: vec![initial.clone(); ids.len()],
            final_states: vec![None; ids.len()],
            description: plan.description.clone(),
            hub_start_ms: hub.hub.now(),
            series: TimeSeries::new(ids.len(), &initial),
            memory: (memory_start, None),
            hub_in_process: true,
            ..Observed::default()
        },
        plan,
        hub,
        ids,
        releases,
        tracking: Vec::new(),
        by_message: HashMap::new(),
        telemetry_after: 0,
        rng,
        log,
        progress,
        t0: Instant::now(),
    };
    let outcome = run.play(&fleet, &svc).await;
    fleet.stop().await;
    let _ = run.hub.stop().await;
    outcome
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
        let t = self.t0.elapsed().as_secs_f64();
        (self.log)(format!("[{t:7.1}s] {line}"));
    }

    async fn targets(&self, target: &Target, svc: &ServiceClient) -> Result<Vec<usize>, RunError> {
        let n = self.ids.len();
        Ok(match target {
            Target::All => (0..n).collect(),
            Target::Group(name) => {
                let mut start = 0.0;
                let mut range = 0..0;
                for g in &self.plan.fleet.groups {
                    let end = start + g.share;
                    if &g.name == name {
                        range =
                            (start * n as f64).floor() as usize..((end * n as f64).floor() as usize).min(n);
                    }
                    start = end;
                }
                range.collect()
            }
            Target::Where(clause) => {
                let ids =
                    svc.device_ids(Some(clause)).await.map_err(|e| setup("target query")(e.to_string()))?;
                let mut v: Vec<usize> = ids.iter().filter_map(|id| self.index.get(id).copied()).collect();
                v.sort_unstable();
                v
            }
        })
    }

    async fn play(&mut self, fleet: &Fleet, svc: &ServiceClient) -> Result<Outcome, RunError> {
        let events = self.plan.events.clone();
        let mut next = 0;
        let mut power_on: BinaryHeap<Reverse<(Duration, usize)>> = BinaryHeap::new();
        let limit = self.plan.time_limit;
        let mut progress_at = Duration::ZERO;
        loop {
            let now = self.t0.elapsed();
            if self.obs.series.due(now) {
                let rss = crate::memory::current().map(|m| m.rss_kib);
                self.obs.series.record(now, fleet.connected() as u64, rss);
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
            }
            self.observe();
            if next == events.len() && power_on.is_empty() && self.settled() {
                break;
            }
            if now >= limit {
                self.obs.timed_out = true;
                break;
            }
            tokio::time::sleep(TICK).await;
        }
        self.obs.elapsed = self.t0.elapsed();
        let rss = crate::memory::current().map(|m| m.rss_kib);
        self.obs.series.record(self.obs.elapsed, fleet.connected() as u64, rss);
        self.obs.memory.1 = crate::memory::current();
        self.final_twins();
        let unmet = self.obs.unmet(&self.plan.expect);
        Ok(Outcome { observed: self.obs.clone(), unmet })
    }

    async fn execute(
        &mut self,
        action: &Action,
        at: Duration,
        fleet: &Fleet,
        svc: &ServiceClient,
        power_on: &mut BinaryHeap<Reverse<(Duration, usize)>>,
    ) -> Result<(), RunError> {
        match action {
            Action::Release { version, ttl, target } => {
                let targets = self.targets(target, svc).await?;
                let release = self.releases[version].clone();
                package::write_latest(&self.hub.packages_dir, &release)
                    .map_err(|e| setup("latest.json")(e.to_string()))?;
                let ftp = self.hub.ftp_addr.map(|a| a.to_string()).unwrap_or_default();
                let body = serde_json::to_vec(&UpdateNotice::for_release(&release, &ftp))
                    .map_err(|e| setup("notice")(e.to_string()))?;
                let r = self.obs.releases.len();
                let mut record =
                    ReleaseRecord { version: version.clone(), at, devices: Vec::new(), send_failed: 0 };
                let mut tracking = Tracking { pos: HashMap::new(), terminal: Vec::new() };
                for &i in &targets {
                    let message_id = format!("release-{version}-{r}-{}", self.ids[i]);
                    let sent = self.send(i, &message_id, body.clone(), *ttl, "application/json");
                    tracking.pos.insert(i, record.devices.len());
                    tracking.terminal.push(sent.is_none());
                    if sent.is_none() {
                        record.send_failed += 1;
                    } else {
                        self.by_message.insert(message_id, (r, record.devices.len()));
                    }
                    record.devices.push((i, DeviceTimes { sent, ..DeviceTimes::default() }));
                }
                let failed = record.send_failed;
                self.obs.releases.push(record);
                self.tracking.push(tracking);
                self.say(format!("release {version} to {} devices ({failed} refused)", targets.len()));
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
                    power_on.push(Reverse((at + off_for, i)));
                    switched_off.push((i, off_for));
                }
                self.obs.offline.record(at, &switched_off);
                self.say(format!("offline: {} of {} devices switched off", chosen.len(), targets.len()));
            }
            Action::Send { target, count, body, ttl } => {
                let targets = self.targets(target, svc).await?;
                let (mut ok, mut refused) = (0, 0);
                for &i in &targets {
                    for m in 0..*count {
                        let id = format!("send-{}-{m}-{}", at.as_millis(), self.ids[i]);
                        match self.send(i, &id, body.as_bytes().to_vec(), *ttl, "text/plain") {
                            Some(_) => ok += 1,
                            None => refused += 1,
                        }
                    }
                }
                self.say(format!("send: {ok} messages queued, {refused} refused"));
            }
            Action::LinkFlap { .. } | Action::FtpFault { .. } => {
                unreachable!("check_supported refuses link-flap and ftp-fault")
            }
        }
        Ok(())
    }

    /// Queues one message with `ack: full`; the hub time it was accepted, `None` when refused.
    fn send(
        &mut self,
        i: usize,
        message_id: &str,
        body: Vec<u8>,
        ttl: Option<Duration>,
        ct: &str,
    ) -> Option<u64> {
        let hub = &self.hub.hub;
        let msg = C2dMessage {
            message_id: Some(message_id.to_string()),
            content_type: Some(ct.to_string()),
            ack: AckMode::Full,
            expiry: ttl.map(|t| hub.now() + t.as_millis() as u64),
            body: body.into(),
            ..C2dMessage::default()
        };
        match hub.send_c2d(&self.ids[i], msg) {
            Ok(_) => {
                self.obs.acked_sends += 1;
                Some(hub.now())
            }
            Err(e) => {
                if e.code == iothub_emulator::ErrorCode::DeviceMaximumQueueDepthExceeded {
                    self.obs.queue_full_rejections += 1;
                }
                None
            }
        }
    }

    /// The latest release of `version` that targeted device `i`: (release, position).
    fn slot(&self, i: usize, version: &str) -> Option<(usize, usize)> {
        (0..self.obs.releases.len())
            .rev()
            .filter(|&r| self.obs.releases[r].version == version)
            .find_map(|r| self.tracking[r].pos.get(&i).map(|&p| (r, p)))
    }

    fn observe(&mut self) {
        let hub = self.hub.hub.clone();
        loop {
            let batch = hub.read_telemetry(None, self.telemetry_after, 1000);
            let Some(last) = batch.last() else { break };
            self.telemetry_after = last.sequence;
            for m in &batch {
                let Some(&i) = self.index.get(&m.device_id) else { continue };
                let Ok(v) = serde_json::from_slice::<Value>(&m.body) else { continue };
                if v["event"] != "installState" {
                    continue;
                }
                let state = v["installState"].as_str().unwrap_or_default().to_string();
                self.obs.final_states[i] = Some(state.clone());
                let Some(version) = v["targetVersion"].as_str() else { continue };
                if state == "installed" {
                    *self.obs.installs.entry((i, version.to_string())).or_default() += 1;
                    self.obs.series.installed(i, version);
                }
                let Some((r, p)) = self.slot(i, version) else { continue };
                let t = &mut self.obs.releases[r].devices[p].1;
                t.delivered.get_or_insert(m.enqueued_at);
                match state.as_str() {
                    "installed" => {
                        t.installed.get_or_insert(m.enqueued_at);
                    }
                    "failed" | "rolled-back" | "already-installed" => self.tracking[r].terminal[p] = true,
                    _ => {}
                }
            }
        }
        while let Some(d) = hub.receive_feedback() {
            let records: Vec<Value> = serde_json::from_slice(&d.message.body).unwrap_or_default();
            for rec in &records {
                let status = rec["statusCode"].as_str().unwrap_or_default();
                self.obs.feedback.add(status);
                if status != "Success"
                    && let Some(&(r, p)) =
                        rec["originalMessageId"].as_str().and_then(|m| self.by_message.get(m))
                {
                    self.tracking[r].terminal[p] = true;
                }
            }
            let _ = hub.settle_feedback(d.lock_token, false);
        }
        for (r, rel) in self.obs.releases.iter_mut().enumerate() {
            for (p, (i, t)) in rel.devices.iter_mut().enumerate() {
                if t.installed.is_some() && t.reported.is_none() && !self.tracking[r].terminal[p] {
                    let twin = hub.get_twin(&self.ids[*i]).unwrap_or_default();
                    if twin.pointer("/properties/reported/appVersion").and_then(Value::as_str)
                        == Some(rel.version.as_str())
                    {
                        t.reported = Some(hub.now());
                    }
                }
            }
        }
    }

    /// Hands the progress callback a snapshot (connected devices as of the last sample).
    fn progress(&mut self, events: &[crate::scenario::plan::Event], next: usize) {
        let devices = self.obs.releases.iter().flat_map(|r| r.devices.iter());
        let (targeted, installed) =
            devices.fold((0, 0), |(n, k), (_, t)| (n + 1, k + usize::from(t.installed.is_some())));
        let snapshot = Progress {
            elapsed: self.t0.elapsed(),
            phase: progress::phase(events, next),
            devices: self.ids.len(),
            connected: self.obs.series.connected.last().copied().unwrap_or(0) as usize,
            targeted,
            installed,
            time_limit: self.plan.time_limit,
        };
        (self.progress)(&snapshot);
    }

    /// Every targeted device is final and every acked message has its feedback.
    fn settled(&self) -> bool {
        let devices_final = self.obs.releases.iter().zip(&self.tracking).all(|(rel, tr)| {
            rel.devices.iter().zip(&tr.terminal).all(|((_, t), done)| *done || t.reported.is_some())
        });
        devices_final && self.obs.feedback.total() >= self.obs.acked_sends
    }

    fn final_twins(&mut self) {
        for (i, id) in self.ids.iter().enumerate() {
            let twin = self.hub.hub.get_twin(id).unwrap_or_default();
            if let Some(v) = twin.pointer("/properties/reported/appVersion").and_then(Value::as_str) {
                self.obs.final_versions[i] = v.to_string();
            }
        }
    }
}
