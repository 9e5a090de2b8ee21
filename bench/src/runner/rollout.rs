//! Fleet groups and the phased rollout (`[rollout]`).
//!
//! Groups: `[[fleet.group]]` shares become contiguous ranges of device indices (cumulative shares
//! times the fleet size, rounded, so the groups always tile their part of the fleet and a scaled
//! run keeps each group's share), written to every member's twin as `tags.group` when the runner
//! seeds the registry, so `WHERE` clauses select them through the hub's real twin query.
//!
//! The rollout: phase `i` sends the update notice to the devices its `where` clause returns
//! (minus devices an earlier phase already targeted); the next phase starts once the share of
//! phase `i`'s devices that installed reaches `success_share`. A phase that misses the share within
//! `phase_timeout`, or can no longer reach it (the rest failed, expired or were refused), halts
//! the rollout and is an unmet expectation naming the phase. This module owns the per-phase
//! records ([`RolloutRecord`]); the notices and device timings are ordinary releases of the run.
//!
//! With `via = "configuration"` a phase's notices are not C2D messages: the phase becomes one
//! IoT Hub configuration (automatic device management) targeting the phase's `where`, whose
//! content writes the notice into `properties.desired.update`; the hub pushes the desired patch
//! to every matching twin and the agents install from it. Installs are tracked from the devices'
//! telemetry as for C2D; there is no feedback.

use std::collections::HashSet;
use std::ops::Range;
use std::time::Duration;

use iothub_emulator::clock::parse_iso8601;
use serde_json::{Value, json};
use simulated_devices::notice::UpdateNotice;
use simulated_devices::package;
use simulated_devices::service_client::{BULK_MAX_DEVICES, ServiceClient, ServiceError};

use super::metrics::{DeviceTimes, ReleaseRecord};
use super::{Run, RunError, Tracking, setup};
use crate::scenario::plan::{Group, RolloutPlan, RolloutVia, Target};

/// Bulk tag requests in flight at once.
const TAG_CONCURRENCY: usize = 4;

/// The device indices of group `name` in a fleet of `n` (empty for an unknown name).
pub fn group_range(groups: &[Group], name: &str, n: usize) -> Range<usize> {
    group_ranges(groups, n).into_iter().find(|(g, _)| *g == name).map_or(0..0, |(_, r)| r)
}

/// Every group's device indices, in file order: `round(start·n)..round(end·n)` of the cumulative
/// shares.
pub fn group_ranges(groups: &[Group], n: usize) -> Vec<(&str, Range<usize>)> {
    let mut start = 0.0;
    groups
        .iter()
        .map(|g| {
            let end = start + g.share;
            let at = |share: f64| ((share * n as f64).round() as usize).min(n);
            let range = at(start)..at(end);
            start = end;
            (g.name.as_str(), range)
        })
        .collect()
}

/// Writes `tags.group` into the twin of every device in a group (bulk `updateTwin`, 100 devices
/// per request).
pub(super) async fn tag_groups(
    svc: &ServiceClient,
    groups: &[Group],
    ids: &[String],
) -> Result<(), RunError> {
    let tagged: Vec<(String, Value)> = group_ranges(groups, ids.len())
        .into_iter()
        .flat_map(|(name, range)| ids[range].iter().map(move |id| (id.clone(), json!({"group": name}))))
        .collect();
    let mut tasks: tokio::task::JoinSet<Result<(), ServiceError>> = tokio::task::JoinSet::new();
    for chunk in tagged.chunks(BULK_MAX_DEVICES) {
        if tasks.len() >= TAG_CONCURRENCY
            && let Some(r) = tasks.join_next().await
        {
            r.map_err(|e| setup("tagging groups")(e.to_string()))?
                .map_err(|e| setup("tagging groups")(e.to_string()))?;
        }
        let (svc, chunk) = (svc.clone(), chunk.to_vec());
        tasks.spawn(async move { svc.bulk_update_tags(&chunk).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| setup("tagging groups")(e.to_string()))?
            .map_err(|e| setup("tagging groups")(e.to_string()))?;
    }
    Ok(())
}

/// How a phase ended (or that it did not start or end yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseOutcome {
    /// Not started (waiting for its turn, or the rollout halted before it).
    NotStarted,
    /// Notices sent; waiting for the success share.
    Running,
    /// The success share installed; the next phase started.
    Passed,
    /// `phase_timeout` passed before the success share installed.
    TimedOut,
    /// Every device of the phase is final and too few installed.
    Unreachable,
}

impl PhaseOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::NotStarted => "not-started",
            Self::Running => "running",
            Self::Passed => "passed",
            Self::TimedOut => "timed-out",
            Self::Unreachable => "unreachable",
        }
    }
}

/// One phase as it went.
#[derive(Debug, Clone)]
pub struct PhaseRecord {
    /// Phase name.
    pub name: String,
    /// Its `WHERE` clause.
    pub condition: String,
    /// Devices that got the notice.
    pub targeted: u64,
    /// Installs the gate needs: `ceil(success_share · targeted)`.
    pub needed: u64,
    /// Devices of the phase that installed (when the phase ended, or so far).
    pub installed: u64,
    /// When the notices went out, from the start of the run.
    pub started: Option<Duration>,
    /// When the gate was met or the phase failed, from the start of the run.
    pub ended: Option<Duration>,
    /// How it went.
    pub outcome: PhaseOutcome,
    /// The run's release (index into `Observed::releases`) carrying the phase's notices.
    pub release: Option<usize>,
}

/// The phased rollout as it went.
#[derive(Debug, Clone)]
pub struct RolloutRecord {
    /// The version rolled out.
    pub version: String,
    /// The gate's share.
    pub success_share: f64,
    /// Longest wait per phase.
    pub phase_timeout: Duration,
    /// When the first phase is due.
    pub at: Duration,
    /// Phases in order.
    pub phases: Vec<PhaseRecord>,
    /// How the notices travel.
    pub via: RolloutVia,
}

impl RolloutRecord {
    /// The record of `plan` before it starts.
    pub fn new(plan: &RolloutPlan) -> Self {
        Self {
            version: plan.version.clone(),
            success_share: plan.success_share,
            phase_timeout: plan.phase_timeout,
            at: plan.at,
            via: plan.via,
            phases: plan
                .phases
                .iter()
                .map(|(name, condition)| PhaseRecord {
                    name: name.clone(),
                    condition: condition.clone(),
                    targeted: 0,
                    needed: 0,
                    installed: 0,
                    started: None,
                    ended: None,
                    outcome: PhaseOutcome::NotStarted,
                    release: None,
                })
                .collect(),
        }
    }

    /// A phase failed: the rollout stopped there.
    pub fn halted(&self) -> bool {
        self.phases.iter().any(|p| matches!(p.outcome, PhaseOutcome::TimedOut | PhaseOutcome::Unreachable))
    }

    /// Every phase passed, or the rollout halted.
    pub fn done(&self) -> bool {
        self.halted() || self.phases.iter().all(|p| p.outcome == PhaseOutcome::Passed)
    }

    /// The unmet expectation of a halted rollout, naming the phase.
    pub fn unmet(&self) -> Option<String> {
        let (i, p) = self
            .phases
            .iter()
            .enumerate()
            .find(|(_, p)| matches!(p.outcome, PhaseOutcome::TimedOut | PhaseOutcome::Unreachable))?;
        let why = match p.outcome {
            PhaseOutcome::TimedOut => {
                format!("within rollout.phase_timeout ({})", humantime::format_duration(self.phase_timeout))
            }
            _ => "and the others failed, expired or were refused".to_string(),
        };
        let skipped: Vec<&str> = self.phases[i + 1..].iter().map(|p| p.name.as_str()).collect();
        let mut line = format!(
            "rollout.phase[{i}] ({}): {} of {} devices installed {} {why}; rollout.success_share {} needs {}; the rollout halted",
            p.name, p.installed, p.targeted, self.version, self.success_share, p.needed
        );
        if !skipped.is_empty() {
            line.push_str(&format!(" before {}", skipped.join(", ")));
        }
        Some(line)
    }

    /// The rollout in `report.json`.
    pub fn to_json(&self) -> Value {
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        json!({
            "version": self.version,
            "via": match self.via { RolloutVia::C2d => "c2d", RolloutVia::Configuration => "configuration" },
            "successShare": self.success_share,
            "phaseTimeoutMs": self.phase_timeout.as_millis() as u64,
            "halted": self.halted(),
            "phases": self.phases.iter().map(|p| json!({
                "name": p.name,
                "where": p.condition,
                "outcome": p.outcome.as_str(),
                "targeted": p.targeted,
                "needed": p.needed,
                "installed": p.installed,
                "startedMs": ms(p.started),
                "endedMs": ms(p.ended),
                "gateWaitMs": p.started.zip(p.ended).map(|(s, e)| e.saturating_sub(s).as_millis() as u64),
            })).collect::<Vec<_>>(),
        })
    }

    /// One summary line per phase.
    pub fn summary_lines(&self) -> Vec<String> {
        let secs = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1} s", d.as_secs_f64()));
        self.phases
            .iter()
            .map(|p| {
                format!(
                    "  phase {}: {}, started {}, ended {}, installed {}/{} (needed {})",
                    p.name,
                    p.outcome.as_str(),
                    secs(p.started),
                    secs(p.ended),
                    p.installed,
                    p.targeted,
                    p.needed
                )
            })
            .collect()
    }
}

/// Longest wait for the hub to apply a phase's configuration before the timeline goes on.
const CONFIGURATION_APPLY_WAIT: Duration = Duration::from_secs(60);
/// How often the configuration's metrics are read while waiting.
const CONFIGURATION_POLL: Duration = Duration::from_millis(20);

/// The configuration id of phase `i` of the rollout of `version`: IoT Hub's id rules (lowercase,
/// no spaces or `& ^ [ ] { } \ | " < > /`) with anything else replaced by `-`.
fn configuration_id(version: &str, i: usize) -> String {
    let v: String = version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    format!("rollout-{v}-{i}")
}

/// Installs `ceil(share · n)`, with a little slack for floating point (`0.95 · 20` is 19).
fn needed(share: f64, n: usize) -> u64 {
    ((share * n as f64) - 1e-9).ceil().max(0.0) as u64
}

impl Run {
    /// When the rollout next needs the clock: its start, or the running phase's timeout. Phase
    /// gates that wait on installs need no time to pass.
    pub(super) fn rollout_next_due(&self) -> Option<Duration> {
        let rollout = self.obs.rollout.as_ref()?;
        if rollout.done() {
            return None;
        }
        let phase = rollout.phases.iter().find(|p| p.outcome != PhaseOutcome::Passed)?;
        match phase.outcome {
            PhaseOutcome::NotStarted => Some(rollout.at),
            PhaseOutcome::Running => phase.started.map(|s| s + rollout.phase_timeout),
            _ => None,
        }
    }

    /// Advances the rollout: starts the first phase at `rollout.at`, checks the running phase's
    /// gate and starts the next one as soon as it is met.
    pub(super) async fn step_rollout(&mut self, svc: &ServiceClient, now: Duration) -> Result<(), RunError> {
        loop {
            let Some(rollout) = &self.obs.rollout else { return Ok(()) };
            if rollout.done() || now < rollout.at {
                return Ok(());
            }
            let Some(i) = rollout.phases.iter().position(|p| p.outcome != PhaseOutcome::Passed) else {
                return Ok(());
            };
            let phase = rollout.phases[i].clone();
            let (share, timeout, version, via) =
                (rollout.success_share, rollout.phase_timeout, rollout.version.clone(), rollout.via);
            match phase.outcome {
                PhaseOutcome::NotStarted => {
                    let earlier: HashSet<usize> = rollout.phases[..i]
                        .iter()
                        .filter_map(|p| p.release)
                        .flat_map(|r| self.obs.releases[r].devices.iter().map(|(d, _)| *d))
                        .collect();
                    let targets: Vec<usize> = self
                        .targets(&Target::Where(phase.condition.clone()), svc)
                        .await?
                        .into_iter()
                        .filter(|d| !earlier.contains(d))
                        .collect();
                    self.say(format!(
                        "rollout phase {} ({}): {} devices",
                        phase.name,
                        phase.condition,
                        targets.len()
                    ));
                    let r = match via {
                        RolloutVia::C2d => self.notify(&version, None, &targets, now, None).await?,
                        RolloutVia::Configuration => {
                            self.release_by_configuration(&version, i, &phase, &targets, now, svc).await?
                        }
                    };
                    let p = &mut self.rollout_mut().phases[i];
                    p.release = Some(r);
                    p.targeted = targets.len() as u64;
                    p.needed = needed(share, targets.len());
                    p.started = Some(now);
                    p.outcome = PhaseOutcome::Running;
                }
                PhaseOutcome::Running => {
                    let r = phase.release.expect("a running phase has its release");
                    let devices = &self.obs.releases[r].devices;
                    let installed = devices.iter().filter(|(_, t)| t.installed.is_some()).count() as u64;
                    let open = devices
                        .iter()
                        .zip(&self.tracking[r].terminal)
                        .filter(|((_, t), done)| t.installed.is_none() && !**done)
                        .count() as u64;
                    let started = phase.started.unwrap_or(now);
                    let outcome = if installed >= phase.needed {
                        PhaseOutcome::Passed
                    } else if installed + open < phase.needed {
                        PhaseOutcome::Unreachable
                    } else if now.saturating_sub(started) >= timeout {
                        PhaseOutcome::TimedOut
                    } else {
                        PhaseOutcome::Running
                    };
                    let p = &mut self.rollout_mut().phases[i];
                    p.installed = installed;
                    if outcome == PhaseOutcome::Running {
                        return Ok(());
                    }
                    p.outcome = outcome;
                    p.ended = Some(now);
                    self.say(format!(
                        "rollout phase {}: {} ({installed} of {} installed, {} needed)",
                        phase.name,
                        outcome.as_str(),
                        phase.targeted,
                        phase.needed
                    ));
                }
                PhaseOutcome::Passed | PhaseOutcome::TimedOut | PhaseOutcome::Unreachable => return Ok(()),
            }
        }
    }

    /// Releases `version` to phase `i` through a configuration: writes `latest.json`, creates
    /// configuration `rollout-{version}-{i}` whose target condition is the phase's `where` and
    /// whose content sets `properties.desired.update` to the update notice, and waits (bounded)
    /// until the hub applied it to every target, so the notices are on their way before the
    /// timeline moves on. The release's devices are those the phase's query returned; its `sent`
    /// time is the configuration's creation. Returns the release's index.
    async fn release_by_configuration(
        &mut self,
        version: &str,
        i: usize,
        phase: &PhaseRecord,
        targets: &[usize],
        at: Duration,
        svc: &ServiceClient,
    ) -> Result<usize, RunError> {
        let release = self.releases[version].clone();
        package::write_latest(self.hub.packages_dir(), &release)
            .map_err(|e| setup("latest.json")(e.to_string()))?;
        if let Some(memory) = &self.memory {
            memory.set_latest(release.clone());
        }
        let notice = serde_json::to_value(UpdateNotice::for_release(&release, &self.hub.ftp_addr()))
            .map_err(|e| setup("notice")(e.to_string()))?;
        let id = configuration_id(version, i);
        let body = json!({
            "id": id,
            "labels": { "rollout": version, "phase": phase.name },
            "content": { "deviceContent": { "properties.desired.update": notice } },
            "targetCondition": phase.condition,
            "priority": i + 1,
        });
        let created = svc
            .create_configuration(&id, &body)
            .await
            .map_err(|e| setup("rollout configuration")(e.to_string()))?;
        let sent =
            created["createdTimeUtc"].as_str().and_then(parse_iso8601).unwrap_or_else(|| self.hub.now());
        let r = self.obs.releases.len();
        let mut record = ReleaseRecord::new(version, at, targets.len());
        let mut tracking = Tracking::all_open(targets.len(), true);
        for (p, &d) in targets.iter().enumerate() {
            tracking.pos.insert(d, p);
            record.devices.push((d, DeviceTimes { sent: Some(sent), ..DeviceTimes::default() }));
        }
        self.obs.releases.push(record);
        self.tracking.push(tracking);
        let deadline = tokio::time::Instant::now() + CONFIGURATION_APPLY_WAIT;
        loop {
            let c = svc
                .get_configuration(&id)
                .await
                .map_err(|e| setup("rollout configuration")(e.to_string()))?;
            let applied = c["systemMetrics"]["results"]["appliedCount"].as_u64().unwrap_or(0);
            if applied >= targets.len() as u64 {
                self.say(format!("release {version}: configuration {id} applied to {applied} twins"));
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                self.say(format!(
                    "release {version}: configuration {id} applied to {applied} of {} twins after {}",
                    targets.len(),
                    humantime::format_duration(CONFIGURATION_APPLY_WAIT)
                ));
                break;
            }
            tokio::time::sleep(CONFIGURATION_POLL).await;
        }
        Ok(r)
    }

    fn rollout_mut(&mut self) -> &mut RolloutRecord {
        self.obs.rollout.as_mut().expect("called while a rollout runs")
    }

    /// No rollout, or it is over (every phase passed, or it halted).
    pub(super) fn rollout_done(&self) -> bool {
        self.obs.rollout.as_ref().is_none_or(RolloutRecord::done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(shares: &[(&str, f64)]) -> Vec<Group> {
        shares.iter().map(|(n, s)| Group { name: n.to_string(), share: *s }).collect()
    }

    #[test]
    fn groups_tile_the_fleet_in_index_order_with_rounded_bounds() {
        let g = groups(&[("canary", 0.05), ("early", 0.25)]);
        let r = group_ranges(&g, 500);
        assert_eq!(r, [("canary", 0..25), ("early", 25..150)]);
        assert_eq!(group_range(&g, "early", 20), 1..6);
        assert_eq!(group_range(&g, "nobody", 20), 0..0);
        // The group's size is its share of the fleet rounded, as a scaled count is.
        let sleepy = groups(&[("sleepy", 0.2)]);
        assert_eq!(group_range(&sleepy, "sleepy", 13).len(), 3);
    }

    #[test]
    fn scaled_counts_match_the_group_and_offline_sizes_they_stand_for() {
        // ttl-expiry's shape: the 20% group "sleepy" stays offline past the TTL, so `expired` is
        // that group's size and `success` the other releases' notices.
        let text = "[fleet]\ndevices = 200\n[[fleet.group]]\nname = \"sleepy\"\nshare = 0.2\n\
                    [expect]\nexpired = 40\n[expect.feedback]\nsuccess = 360\n";
        for n in 1..=60u64 {
            let mut plan = crate::scenario::parse_str("t.toml", text).unwrap();
            super::super::scale_devices(&mut plan, n);
            let sleepy = group_range(&plan.fleet.groups, "sleepy", n as usize).len() as u64;
            assert_eq!(plan.expect.expired, Some(sleepy), "{n} devices");
            assert_eq!(plan.expect.feedback.success, Some(2 * n - sleepy), "{n} devices");
            // An offline share of 0.2 of the whole fleet picks as many devices.
            assert_eq!(super::super::events::share_of(n as usize, 0.2) as u64, sleepy, "{n} devices");
        }
    }

    #[test]
    fn configuration_ids_follow_iot_hubs_rules() {
        assert_eq!(configuration_id("2.0.0", 1), "rollout-2.0.0-1");
        assert_eq!(configuration_id("V2 beta/1", 0), "rollout-v2-beta-1-0");
        assert!(crate::scenario::plan::RolloutVia::default() == RolloutVia::C2d);
    }

    #[test]
    fn the_gate_needs_the_rounded_up_share() {
        assert_eq!(needed(0.95, 20), 19);
        assert_eq!(needed(0.95, 1), 1);
        assert_eq!(needed(1.0, 7), 7);
        assert_eq!(needed(0.5, 0), 0);
        assert_eq!(needed(0.5, 3), 2);
    }

    #[test]
    fn a_halted_rollout_names_the_phase_and_what_it_missed() {
        let plan = RolloutPlan {
            version: "2.0.0".into(),
            at: Duration::ZERO,
            success_share: 1.0,
            phase_timeout: Duration::from_secs(30),
            phases: vec![("canary".into(), "tags.group = 'canary'".into()), ("rest".into(), "x = 1".into())],
            via: RolloutVia::C2d,
        };
        let mut r = RolloutRecord::new(&plan);
        assert!(!r.done() && r.unmet().is_none());
        let p = &mut r.phases[0];
        (p.targeted, p.needed, p.installed, p.outcome) = (2, 2, 0, PhaseOutcome::Unreachable);
        (p.started, p.ended) = (Some(Duration::from_secs(1)), Some(Duration::from_millis(2500)));
        assert!(r.done() && r.halted());
        let unmet = r.unmet().unwrap();
        assert!(unmet.starts_with("rollout.phase[0] (canary): 0 of 2 devices installed 2.0.0"), "{unmet}");
        assert!(unmet.ends_with("the rollout halted before rest"), "{unmet}");
        let j = r.to_json();
        assert_eq!(j["phases"][0]["gateWaitMs"], 1500);
        assert_eq!(j["phases"][1]["outcome"], "not-started");
    }
}
