//! What a run observed and the verdict on it: per-device timings of every release (sent,
//! delivered, installed, reported, in hub milliseconds), feedback tallies, end-to-end latency
//! percentiles (hdrhistogram) per stage and, end to end, by how long the device was offline,
//! the time series ([`super::timeseries`]), memory, the evaluation of `[expect]` and
//! `report.json`. Pure data: the runner ([`super`]) fills it in; nothing here touches a socket.

use std::collections::HashMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::rollout::RolloutRecord;
use super::timeseries::{OfflineLog, TimeSeries};
use crate::memory::Memory;
use crate::scenario::plan::{Expectations, FeedbackTallies};

/// End-to-end latency buckets by how long the device was switched off between the notice being
/// sent and the twin reporting the version: (name, offline below this many ms).
pub const OFFLINE_BUCKETS: [(&str, u64); 4] =
    [("online", 1), ("<1m", 60_000), ("1-5m", 300_000), (">5m", u64::MAX)];

/// Timings of one release at one device, in hub milliseconds (Unix epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceTimes {
    /// The hub accepted the notice.
    pub sent: Option<u64>,
    /// The device's first install event for the version (it took the notice).
    pub delivered: Option<u64>,
    /// The device's `installed` event.
    pub installed: Option<u64>,
    /// The runner saw the twin report the version.
    pub reported: Option<u64>,
    /// The notice's final feedback status (`Success`, `Expired`, …), once it arrived.
    pub feedback: Option<String>,
}

/// One release's bookkeeping.
#[derive(Debug, Clone)]
pub struct ReleaseRecord {
    /// The version released.
    pub version: String,
    /// Seconds from the start of the run.
    pub at: Duration,
    /// Targeted device indices, each with its timings.
    pub devices: Vec<(usize, DeviceTimes)>,
    /// Notices the hub refused.
    pub send_failed: u64,
}

impl ReleaseRecord {
    /// A release of `version` at `at`, with room for `targets` devices and none in it yet.
    pub fn new(version: &str, at: Duration, targets: usize) -> Self {
        Self { version: version.to_string(), at, devices: Vec::with_capacity(targets), send_failed: 0 }
    }

    /// How far the release got: "targeted N, sent N, delivered N, installed N, reported N, refused N".
    pub fn stage_counts(&self) -> String {
        let n = |f: fn(&DeviceTimes) -> bool| self.devices.iter().filter(|(_, t)| f(t)).count();
        format!(
            "targeted {}, sent {}, delivered {}, installed {}, reported {}, refused {}",
            self.devices.len(),
            n(|t| t.sent.is_some()),
            n(|t| t.delivered.is_some()),
            n(|t| t.installed.is_some()),
            n(|t| t.reported.is_some()),
            self.send_failed
        )
    }
}

/// Counts of feedback records by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// `Success`.
    pub success: u64,
    /// `Expired`.
    pub expired: u64,
    /// `Rejected`.
    pub rejected: u64,
    /// `DeliveryCountExceeded`.
    pub delivery_count_exceeded: u64,
    /// `Purged`.
    pub purged: u64,
}

impl Tally {
    /// Counts one record with IoT Hub's `statusCode`.
    pub fn add(&mut self, status_code: &str) {
        match status_code {
            "Success" => self.success += 1,
            "Expired" => self.expired += 1,
            "Rejected" => self.rejected += 1,
            "DeliveryCountExceeded" => self.delivery_count_exceeded += 1,
            "Purged" => self.purged += 1,
            _ => {}
        }
    }

    /// Records of any status.
    pub fn total(&self) -> u64 {
        self.success + self.expired + self.rejected + self.delivery_count_exceeded + self.purged
    }
}

/// One `hub-restart` of a child hub.
#[derive(Debug, Clone, PartialEq)]
pub struct HubRestart {
    /// Scenario time of the event.
    pub at: Duration,
    /// `crash` or `graceful`.
    pub kind: &'static str,
    /// From the stop until `/health` answered again and the runner reconnected.
    pub down: Duration,
}

/// Everything a run observed.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Scenario name.
    pub scenario: String,
    /// Device ids by index.
    pub device_ids: Vec<String>,
    /// The version each device's twin reports at the end (the initial version when none).
    pub final_versions: Vec<String>,
    /// The last install state each device reported, if any.
    pub final_states: Vec<Option<String>>,
    /// `installed` events per (device index, version).
    pub installs: HashMap<(usize, String), u32>,
    /// Releases in timeline order.
    pub releases: Vec<ReleaseRecord>,
    /// Feedback records received.
    pub feedback: Tally,
    /// Sends refused because the device queue was full.
    pub queue_full_rejections: u64,
    /// C2D sends the hub throttled (tier throttling) that the runner retried, as a service SDK
    /// would.
    pub throttled_retries: u64,
    /// Messages sent with `ack: full` (notices and plain sends).
    pub acked_sends: u64,
    /// Link drops the runner requested (`link-flap` events), summed over devices and rounds.
    pub link_flaps: u64,
    /// Devices that received a C2D message they had already saved (the hub redelivered it), with
    /// how many times: (device index, duplicates).
    pub duplicate_deliveries: Vec<(usize, u32)>,
    /// The phased rollout, if the scenario has one.
    pub rollout: Option<RolloutRecord>,
    /// Restarts of a child hub (`hub-restart` events), in timeline order.
    pub hub_restarts: Vec<HubRestart>,
    /// Feedback records received again for a message that already had its feedback (a batch
    /// delivered again after a hub restart); counted once in [`Self::feedback`].
    pub duplicate_feedback: u64,
    /// The run hit `time_limit` before settling.
    pub timed_out: bool,
    /// Scenario time of the run (wall time, plus what compressed time skipped).
    pub elapsed: Duration,
    /// Wall time of the run.
    pub wall_elapsed: Duration,
    /// How scenario time passed.
    pub time_mode: crate::scenario::plan::TimeMode,
    /// Waiting compressed time skipped, and in how many jumps.
    pub skipped: Duration,
    /// See [`Self::skipped`].
    pub time_jumps: u64,
    /// The scenario's description.
    pub description: String,
    /// The hub's clock (ms since the Unix epoch) when the run started: turns [`DeviceTimes`]
    /// into times since the start.
    pub hub_start_ms: u64,
    /// Connected devices, versions and memory over time.
    pub series: TimeSeries,
    /// Devices the timeline switched off.
    pub offline: OfflineLog,
    /// This process's memory when the run started (hub up, fleet not yet) and when it ended.
    pub memory: (Option<Memory>, Option<Memory>),
    /// The hub and the fleet run in this process, so [`Self::memory`] is theirs together.
    pub hub_in_process: bool,
    /// How the runner's own devices reached the hub (`None`: an external or sharded fleet).
    pub transport: Option<crate::scenario::plan::Transport>,
    /// An external hub's dashboard, linked from the reports (the embedded hub's ends with the run).
    pub dashboard_url: Option<String>,
}

/// p50/p90/p99/max of one latency, in milliseconds, with the sample count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Maximum.
    pub max: u64,
}

impl Percentiles {
    fn of(samples: impl Iterator<Item = u64>) -> Self {
        let mut h = Histogram::<u64>::new_with_bounds(1, 24 * 3_600_000, 3).expect("valid histogram bounds");
        for s in samples {
            h.saturating_record(s.max(1));
        }
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
        }
    }

    fn to_json(self) -> Value {
        json!({"count": self.count, "p50Ms": self.p50, "p90Ms": self.p90, "p99Ms": self.p99, "maxMs": self.max})
    }
}

/// Latencies by stage over every release.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latencies {
    /// Sent → delivered.
    pub delivery: Percentiles,
    /// Delivered → installed.
    pub install: Percentiles,
    /// Sent → reported (end to end).
    pub end_to_end: Percentiles,
}

/// A stage: from which timestamp to which.
pub type Stage = (fn(&DeviceTimes) -> Option<u64>, fn(&DeviceTimes) -> Option<u64>);

/// The stages of [`Latencies`] with their report names: delivery, install, end to end.
pub const STAGES: [(&str, Stage); 3] = [
    ("delivery", (|t| t.sent, |t| t.delivered)),
    ("install", (|t| t.delivered, |t| t.installed)),
    ("end to end", (|t| t.sent, |t| t.reported)),
];

/// A scenario-time span for people: `41.3 s`, `2h 14m 5s`.
fn scenario_span(d: Duration) -> String {
    if d < Duration::from_secs(60) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

impl Observed {
    /// Every sample of one stage, in milliseconds, unsorted.
    pub fn stage_samples(&self, (from, to): Stage) -> Vec<u64> {
        self.releases
            .iter()
            .flat_map(|r| r.devices.iter())
            .filter_map(|(_, t)| {
                let (a, b) = (from(t)?, to(t)?);
                Some(b.saturating_sub(a))
            })
            .collect()
    }

    /// End-to-end percentiles per [`OFFLINE_BUCKETS`] bucket, by how long each device was
    /// switched off between its notice being sent and its twin reporting the version.
    pub fn latency_by_offline(&self) -> Vec<(&'static str, Percentiles)> {
        let index = self.offline.index();
        let mut buckets: Vec<Vec<u64>> = vec![Vec::new(); OFFLINE_BUCKETS.len()];
        for (i, t) in self.releases.iter().flat_map(|r| r.devices.iter()) {
            let (Some(sent), Some(reported)) = (t.sent, t.reported) else { continue };
            let off = index.offline_ms(
                *i,
                sent.saturating_sub(self.hub_start_ms),
                reported.saturating_sub(self.hub_start_ms),
            );
            let b = OFFLINE_BUCKETS
                .iter()
                .position(|&(_, below)| off < below)
                .unwrap_or(OFFLINE_BUCKETS.len() - 1);
            buckets[b].push(reported.saturating_sub(sent));
        }
        OFFLINE_BUCKETS
            .iter()
            .zip(buckets)
            .map(|(&(name, _), v)| (name, Percentiles::of(v.into_iter())))
            .collect()
    }

    /// `report.json`'s `memory`.
    fn memory_json(&self) -> Value {
        let (start, end) = self.memory;
        json!({
            "scope": if self.hub_in_process {
                "this process: hub, FTP server, fleet and runner share it (embedded mode)"
            } else {
                "this process: the runner and its fleet"
            },
            "rssStartKib": start.map(|m| m.rss_kib),
            "rssEndKib": end.map(|m| m.rss_kib),
            "rssPeakKib": end.map(|m| m.peak_kib),
        })
    }

    /// Latency percentiles per stage.
    pub fn latencies(&self) -> Latencies {
        let p = |k: usize| Percentiles::of(self.stage_samples(STAGES[k].1).into_iter());
        Latencies { delivery: p(0), install: p(1), end_to_end: p(2) }
    }

    /// Devices that installed a version more than once: (id, version, times).
    pub fn duplicate_installs(&self) -> Vec<(String, String, u32)> {
        let mut d: Vec<_> = self
            .installs
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|((i, v), n)| (self.device_ids[*i].clone(), v.clone(), *n))
            .collect();
        d.sort();
        d
    }

    /// Messages delivered (completed by the device: `Success` feedback) per message the hub
    /// accepted; `None` before anything was sent.
    pub fn delivery_ratio(&self) -> Option<f64> {
        (self.acked_sends > 0).then(|| self.feedback.success as f64 / self.acked_sends as f64)
    }

    /// Duplicate deliveries over all devices.
    pub fn duplicate_delivery_count(&self) -> u64 {
        self.duplicate_deliveries.iter().map(|(_, n)| u64::from(*n)).sum()
    }

    /// Devices whose last install state is `failed` or `rolled-back`.
    pub fn failed_devices(&self) -> u64 {
        self.final_states.iter().filter(|s| matches!(s.as_deref(), Some("failed" | "rolled-back"))).count()
            as u64
    }

    /// Every unmet expectation, each naming its key.
    pub fn unmet(&self, expect: &Expectations) -> Vec<String> {
        self.verdicts(expect).into_iter().filter_map(|v| v.failure).collect()
    }

    /// Every expectation the run was checked against (the ones the scenario sets, the time limit,
    /// and the rollout's phases when it has any), met or not, in a fixed order: the JUnit report's
    /// test cases.
    pub fn verdicts(&self, expect: &Expectations) -> Vec<Verdict> {
        let mut out = Vec::new();
        let mut check =
            |key: &str, failure: Option<String>| out.push(Verdict { key: key.to_string(), failure });
        check(
            "time_limit",
            self.timed_out.then(|| "time_limit: the run did not settle before the time limit".to_string()),
        );
        if let Some(r) = &self.rollout {
            check("rollout", r.unmet());
        }
        if let Some(v) = &expect.final_version {
            let off: Vec<&str> = self
                .final_versions
                .iter()
                .zip(&self.device_ids)
                .filter(|(fv, _)| *fv != v)
                .map(|(_, id)| id.as_str())
                .collect();
            check(
                "expect.final_version",
                (!off.is_empty()).then(|| {
                    format!(
                        "expect.final_version: {} of {} devices are not on {v} (first: {})",
                        off.len(),
                        self.device_ids.len(),
                        off[..off.len().min(3)].join(", ")
                    )
                }),
            );
        }
        if let Some(within) = expect.all_installed_within {
            let limit = within.as_millis() as u64;
            let late = self
                .releases
                .iter()
                .flat_map(|r| r.devices.iter())
                .filter(|(_, t)| match (t.sent, t.reported) {
                    (Some(s), Some(r)) => r.saturating_sub(s) > limit,
                    _ => true,
                })
                .count();
            let total: usize = self.releases.iter().map(|r| r.devices.len()).sum();
            check(
                "expect.all_installed_within",
                (late > 0).then(|| {
                    format!(
                        "expect.all_installed_within: {late} of {total} targeted devices did not report the release within {}",
                        humantime::format_duration(within)
                    )
                }),
            );
        }
        if expect.no_duplicate_installs {
            let dups = self.duplicate_installs();
            check(
                "expect.no_duplicate_installs",
                dups.first().map(|(id, v, n)| {
                    format!(
                        "expect.no_duplicate_installs: {} devices installed a version more than once (first: {id} installed {v} {n} times)",
                        dups.len()
                    )
                }),
            );
        }
        if expect.no_lost_messages {
            let lost: Vec<&str> = self
                .releases
                .iter()
                .flat_map(|r| r.devices.iter())
                .filter(|(_, t)| {
                    t.sent.is_some() && t.delivered.is_none() && t.reported.is_none() && t.feedback.is_none()
                })
                .map(|(i, _)| self.device_ids[*i].as_str())
                .collect();
            check(
                "expect.no_lost_messages",
                (!lost.is_empty()).then(|| {
                    format!(
                        "expect.no_lost_messages: {} acknowledged notices never reached their device and got no feedback (first: {})",
                        lost.len(),
                        lost[..lost.len().min(3)].join(", ")
                    )
                }),
            );
        }
        let mut exact = |key: &str, want: Option<u64>, got: u64| {
            if let Some(w) = want {
                check(key, (w != got).then(|| format!("{key}: expected {w}, got {got}")));
            }
        };
        exact("expect.expired", expect.expired, self.feedback.expired);
        exact("expect.failed", expect.failed, self.failed_devices());
        exact("expect.queue_full_rejections", expect.queue_full_rejections, self.queue_full_rejections);
        let FeedbackTallies { success, expired, rejected, delivery_count_exceeded, purged } =
            &expect.feedback;
        exact("expect.feedback.success", *success, self.feedback.success);
        exact("expect.feedback.expired", *expired, self.feedback.expired);
        exact("expect.feedback.rejected", *rejected, self.feedback.rejected);
        exact(
            "expect.feedback.delivery_count_exceeded",
            *delivery_count_exceeded,
            self.feedback.delivery_count_exceeded,
        );
        exact("expect.feedback.purged", *purged, self.feedback.purged);
        let e2e = self.latencies().end_to_end;
        let l = &expect.latency;
        for (key, bound, got) in [
            ("expect.latency.p50", l.p50, e2e.p50),
            ("expect.latency.p90", l.p90, e2e.p90),
            ("expect.latency.p99", l.p99, e2e.p99),
            ("expect.latency.max", l.max, e2e.max),
        ] {
            if let Some(b) = bound {
                let which = key.rsplit('.').next().unwrap_or(key);
                check(
                    key,
                    (got > b.as_millis() as u64).then(|| {
                        format!("{key}: end-to-end {which} is {got} ms, above {} ms", b.as_millis())
                    }),
                );
            }
        }
        out
    }

    /// What each device ended with, independent of timing: its final version and install state,
    /// installs per version, and per release whether it took the notice, installed, reported and
    /// which feedback the notice got. Runs of one scenario and seed agree on this whatever the
    /// timing (real or compressed time, a slower machine). Built one device at a time as it is
    /// serialized ([`DeviceOutcomes`]); this collects it.
    pub fn device_outcomes(&self) -> Value {
        serde_json::to_value(DeviceOutcomes(self)).unwrap_or(Value::Null)
    }

    /// The outcome of device `i` (see [`Observed::device_outcomes`]); `installs` are its
    /// (version, count) pairs and `positions[r]` maps device indices to their entry in release
    /// `r`'s devices.
    fn device_outcome(&self, i: usize, installs: &[(&str, u32)], positions: &[Vec<u32>]) -> Value {
        let inst: Vec<Value> = installs.iter().map(|(v, c)| json!({"version": v, "count": c})).collect();
        let rels: Vec<Value> = self
            .releases
            .iter()
            .zip(positions)
            .filter_map(|(r, pos)| {
                let (_, t) = r.devices.get(*pos.get(i)? as usize)?;
                Some(json!({
                    "version": r.version,
                    "sent": t.sent.is_some(),
                    "delivered": t.delivered.is_some(),
                    "installed": t.installed.is_some(),
                    "reported": t.reported.is_some(),
                    "feedback": t.feedback,
                }))
            })
            .collect();
        json!({
            "finalVersion": self.final_versions[i],
            "installState": self.final_states[i],
            "installs": inst,
            "releases": rels,
        })
    }

    /// `report.json`: the summary, latencies, feedback, the verdict and per-device timings.
    /// Collects [`Report`], which writes the same document without holding it whole.
    pub fn report_json(&self, unmet: &[String]) -> Value {
        serde_json::to_value(Report::new(self, unmet)).unwrap_or(Value::Null)
    }

    /// Everything in `report.json` but its per-device parts, which are `null` here and made one
    /// device at a time by [`Report`] (`deviceOutcomes`, and each release's `devices`).
    fn report_head(&self, unmet: &[String]) -> Value {
        let lat = self.latencies();
        let releases: Vec<Value> = self
            .releases
            .iter()
            .map(|r| {
                json!({
                    "version": r.version,
                    "atMs": r.at.as_millis() as u64,
                    "targeted": r.devices.len(),
                    "sendFailed": r.send_failed,
                    "delivered": r.devices.iter().filter(|(_, t)| t.delivered.is_some()).count(),
                    "installed": r.devices.iter().filter(|(_, t)| t.installed.is_some()).count(),
                    "reported": r.devices.iter().filter(|(_, t)| t.reported.is_some()).count(),
                    "devices": Value::Null,
                })
            })
            .collect();
        let dups: Vec<Value> = self
            .duplicate_installs()
            .into_iter()
            .map(|(id, v, n)| json!({"deviceId": id, "version": v, "installs": n}))
            .collect();
        json!({
            "scenario": self.scenario,
            "passed": unmet.is_empty(),
            "unmet": unmet,
            "timedOut": self.timed_out,
            "elapsedMs": self.elapsed.as_millis() as u64,
            "time": {
                "mode": self.time_mode.as_str(),
                "scenarioMs": self.elapsed.as_millis() as u64,
                "wallMs": self.wall_elapsed.as_millis() as u64,
                "skippedMs": self.skipped.as_millis() as u64,
                "jumps": self.time_jumps,
            },
            "devices": self.device_ids.len(),
            "transport": self.transport.map(|t| t.as_str()),
            "dashboardUrl": self.dashboard_url,
            "latency": {
                "delivery": lat.delivery.to_json(),
                "install": lat.install.to_json(),
                "endToEnd": lat.end_to_end.to_json(),
            },
            "feedback": {
                "success": self.feedback.success,
                "expired": self.feedback.expired,
                "rejected": self.feedback.rejected,
                "deliveryCountExceeded": self.feedback.delivery_count_exceeded,
                "purged": self.feedback.purged,
            },
            "queueFullRejections": self.queue_full_rejections,
            "messages": {
                "sent": self.acked_sends,
                "delivered": self.feedback.success,
                "deliveryRatio": self.delivery_ratio(),
                "expired": self.feedback.expired,
                "rejected": self.feedback.rejected,
                "deadLettered": self.feedback.delivery_count_exceeded,
                "purged": self.feedback.purged,
                "refusedQueueFull": self.queue_full_rejections,
                "throttledRetries": self.throttled_retries,
                "duplicateDeliveries": self.duplicate_delivery_count(),
                "duplicateDeliveryDevices": self.duplicate_deliveries.iter()
                    .map(|(i, n)| json!({"deviceId": self.device_ids[*i], "duplicates": n}))
                    .collect::<Vec<_>>(),
            },
            "linkFlaps": self.link_flaps,
            "hubRestarts": self.hub_restarts.iter().map(|h| json!({
                "atMs": h.at.as_millis() as u64,
                "kind": h.kind,
                "downMs": h.down.as_millis() as u64,
            })).collect::<Vec<_>>(),
            "duplicateFeedback": self.duplicate_feedback,
            "duplicateInstallCount": self.duplicate_installs().iter().map(|(_, _, n)| u64::from(*n) - 1).sum::<u64>(),
            "rollout": self.rollout.as_ref().map(RolloutRecord::to_json),
            "failedDevices": self.failed_devices(),
            "duplicateInstalls": dups,
            "latencyByOffline": self.latency_by_offline().into_iter().zip(OFFLINE_BUCKETS).map(|((name, p), (_, below))| {
                let mut v = p.to_json();
                v["offline"] = json!(name);
                v["offlineBelowMs"] = if below == u64::MAX { Value::Null } else { json!(below) };
                v
            }).collect::<Vec<_>>(),
            "memory": self.memory_json(),
            "deviceOutcomes": Value::Null,
            "offlineWindows": self.offline.to_json(),
            "timeSeries": self.series.to_json(),
            "releases": releases,
        })
    }

    /// The terminal summary, one fact per line.
    pub fn summary_lines(&self, unmet: &[String]) -> Vec<String> {
        let lat = self.latencies();
        let row = |name: &str, p: Percentiles| {
            format!("  {name:<12} {:>6} {:>8} {:>8} {:>8} {:>8}", p.count, p.p50, p.p90, p.p99, p.max)
        };
        let mut lines = vec![
            format!(
                "scenario {}: {} devices{}, {} scenario time, {:.1} s wall{}{}",
                self.scenario,
                self.device_ids.len(),
                self.transport.map(|t| format!(" ({})", t.as_str())).unwrap_or_default(),
                scenario_span(self.elapsed),
                self.wall_elapsed.as_secs_f64(),
                match self.time_mode {
                    crate::scenario::plan::TimeMode::Real => String::new(),
                    crate::scenario::plan::TimeMode::Compressed => format!(
                        " (compressed: {} skipped in {} jumps)",
                        scenario_span(self.skipped),
                        self.time_jumps
                    ),
                },
                if self.timed_out { " (time limit reached)" } else { "" }
            ),
            format!("  {:<12} {:>6} {:>8} {:>8} {:>8} {:>8}", "latency ms", "n", "p50", "p90", "p99", "max"),
            row("delivery", lat.delivery),
            row("install", lat.install),
            row("end-to-end", lat.end_to_end),
        ];
        let by_offline = self.latency_by_offline();
        if by_offline.iter().skip(1).any(|(_, p)| p.count > 0) {
            for (name, p) in by_offline {
                if p.count > 0 {
                    let name =
                        if name == "online" { "e2e online".to_string() } else { format!("e2e off{name}") };
                    lines.push(row(&name, p));
                }
            }
        }
        for r in &self.releases {
            lines.push(format!(
                "  release {} at {:.1} s: {}",
                r.version,
                r.at.as_secs_f64(),
                r.stage_counts()
            ));
        }
        if let Some(r) = &self.rollout {
            lines.extend(r.summary_lines());
        }
        for (k, h) in self.hub_restarts.iter().enumerate() {
            lines.push(format!(
                "  hub restart {} ({}) at {:.1} s: healthy again after {:.2} s",
                k + 1,
                h.kind,
                h.at.as_secs_f64(),
                h.down.as_secs_f64()
            ));
        }
        for (k, w) in self.offline.windows.iter().enumerate() {
            lines.push(format!(
                "  offline window {}: {} devices from {:.1} s to {:.1} s",
                k + 1,
                w.devices,
                w.start.as_secs_f64(),
                w.end.as_secs_f64()
            ));
        }
        let (start, end) = self.memory;
        if let (Some(start), Some(end)) = (start, end) {
            lines.push(format!(
                "  memory (RSS{}): start {:.1} MiB, peak {:.1} MiB, end {:.1} MiB",
                if self.hub_in_process { " of hub + fleet + runner, one process" } else { "" },
                start.rss_kib as f64 / 1024.0,
                end.peak_kib as f64 / 1024.0,
                end.rss_kib as f64 / 1024.0
            ));
        }
        let f = self.feedback;
        lines.push(format!(
            "  feedback: success {}, expired {}, rejected {}, delivery count exceeded {}, purged {}; queue full {}",
            f.success, f.expired, f.rejected, f.delivery_count_exceeded, f.purged, self.queue_full_rejections
        ));
        let ratio = self.delivery_ratio().map_or("-".to_string(), |r| format!("{:.3}", r));
        let dup_installs: u32 = self.duplicate_installs().iter().map(|(_, _, n)| n - 1).sum();
        lines.push(format!(
            "  messages: sent {}, delivered {} (ratio {ratio}), dead-lettered {}, rejected {}, expired {}; duplicate deliveries {}, duplicate installs {}; link drops {}",
            self.acked_sends,
            f.success,
            f.delivery_count_exceeded,
            f.rejected,
            f.expired,
            self.duplicate_delivery_count(),
            dup_installs,
            self.link_flaps
        ));
        if self.throttled_retries > 0 {
            lines.push(format!(
                "  throttling: {} sends throttled by the hub and retried",
                self.throttled_retries
            ));
        }
        if let Some(url) = &self.dashboard_url {
            lines.push(format!("  dashboard: {url} (the external hub's, still live)"));
        }
        if unmet.is_empty() {
            lines.push("verdict: every expectation met".to_string());
        } else {
            lines.extend(unmet.iter().map(|u| format!("unmet: {u}")));
        }
        lines
    }
}

/// One expectation a run was checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The scenario key (`expect.final_version`, `time_limit`, `rollout`, …).
    pub key: String,
    /// Why it is unmet (the message names the key); `None` when it held.
    pub failure: Option<String>,
}

/// `report.json` as a serde document that makes its per-device parts (`deviceOutcomes`, and each
/// release's `devices`) one device at a time while it is written: at a million devices those are
/// most of a 600 MB file, and held whole as `serde_json::Value`s they took the process from 3.6 to
/// 8.8 GiB once the run had ended. The rest ([`Observed::report_head`]) is small and built first.
pub struct Report<'a> {
    observed: &'a Observed,
    unmet: &'a [String],
    /// Entries added after the run's own (the tier projection), in order.
    extra: Vec<(String, Value)>,
}

impl<'a> Report<'a> {
    /// The report of `observed` with the expectations `unmet`.
    pub fn new(observed: &'a Observed, unmet: &'a [String]) -> Self {
        Self { observed, unmet, extra: Vec::new() }
    }

    /// Adds `key` after the report's own entries.
    pub fn push(&mut self, key: &str, value: Value) {
        self.extra.push((key.to_string(), value));
    }
}

impl serde::Serialize for Report<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let head = self.observed.report_head(self.unmet);
        let mut map = s.serialize_map(None)?;
        for (k, v) in head.as_object().into_iter().flatten() {
            match k.as_str() {
                "deviceOutcomes" => map.serialize_entry(k, &DeviceOutcomes(self.observed))?,
                "releases" => map.serialize_entry(k, &Releases { observed: self.observed, heads: v })?,
                _ => map.serialize_entry(k, v)?,
            }
        }
        for (k, v) in &self.extra {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// `deviceOutcomes`, one device at a time (see [`Observed::device_outcomes`]).
struct DeviceOutcomes<'a>(&'a Observed);

impl serde::Serialize for DeviceOutcomes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let o = self.0;
        let n = o.device_ids.len();
        // Installs by device, then version: a cursor walks them in device order.
        let mut installs: Vec<(usize, &str, u32)> =
            o.installs.iter().map(|((i, v), c)| (*i, v.as_str(), *c)).collect();
        installs.sort_unstable();
        // Per release, each device's entry in its `devices` (u32::MAX: not targeted).
        let positions: Vec<Vec<u32>> = o
            .releases
            .iter()
            .map(|r| {
                let mut pos = vec![u32::MAX; n];
                for (k, (i, _)) in r.devices.iter().enumerate() {
                    if let Some(p) = pos.get_mut(*i) {
                        *p = k as u32;
                    }
                }
                pos
            })
            .collect();
        let mut map = s.serialize_map(Some(n))?;
        let mut at = 0;
        let mut mine: Vec<(&str, u32)> = Vec::new();
        for (i, id) in o.device_ids.iter().enumerate() {
            mine.clear();
            while let Some(&(d, v, c)) = installs.get(at).filter(|e| e.0 <= i) {
                if d == i {
                    mine.push((v, c));
                }
                at += 1;
            }
            map.serialize_entry(id, &o.device_outcome(i, &mine, &positions))?;
        }
        map.end()
    }
}

/// `releases`: each release's small fields from the head, its `devices` one device at a time.
struct Releases<'a> {
    observed: &'a Observed,
    heads: &'a Value,
}

impl serde::Serialize for Releases<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        let heads = self.heads.as_array().map(Vec::as_slice).unwrap_or_default();
        let mut seq = s.serialize_seq(Some(heads.len()))?;
        for (r, head) in self.observed.releases.iter().zip(heads) {
            struct One<'b>(&'b Observed, &'b ReleaseRecord, &'b Value);
            impl serde::Serialize for One<'_> {
                fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                    let mut map = s.serialize_map(None)?;
                    for (k, v) in self.2.as_object().into_iter().flatten() {
                        if k == "devices" {
                            map.serialize_entry(k, &ReleaseDevices(self.0, self.1))?;
                        } else {
                            map.serialize_entry(k, v)?;
                        }
                    }
                    map.end()
                }
            }
            seq.serialize_element(&One(self.observed, r, head))?;
        }
        seq.end()
    }
}

/// One release's `devices`: id → its timings, in the order the release targeted them.
struct ReleaseDevices<'a>(&'a Observed, &'a ReleaseRecord);

impl serde::Serialize for ReleaseDevices<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.1.devices.len()))?;
        for (i, t) in &self.1.devices {
            let times = json!({"sentMs": t.sent, "deliveredMs": t.delivered, "installedMs": t.installed,
                "reportedMs": t.reported, "feedback": t.feedback});
            map.serialize_entry(&self.0.device_ids[*i], &times)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed() -> Observed {
        let t = |s, d, i, r| DeviceTimes {
            sent: Some(s),
            delivered: Some(d),
            installed: Some(i),
            reported: Some(r),
            feedback: None,
        };
        Observed {
            scenario: "t".into(),
            device_ids: vec!["a".into(), "b".into(), "c".into()],
            final_versions: vec!["2.0.0".into(), "2.0.0".into(), "1.0.0".into()],
            final_states: vec![Some("installed".into()), Some("installed".into()), Some("failed".into())],
            installs: [((0, "2.0.0".to_string()), 1), ((1, "2.0.0".to_string()), 2)].into_iter().collect(),
            releases: vec![ReleaseRecord {
                version: "2.0.0".into(),
                at: Duration::from_secs(5),
                devices: vec![
                    (0, t(1000, 1100, 1500, 1600)),
                    (1, t(1000, 1200, 1800, 3000)),
                    (2, DeviceTimes { sent: Some(1000), ..Default::default() }),
                ],
                send_failed: 0,
            }],
            feedback: Tally { success: 2, expired: 1, ..Default::default() },
            ..Default::default()
        }
    }

    #[test]
    fn percentiles_come_from_the_recorded_stages() {
        let lat = observed().latencies();
        assert_eq!(lat.end_to_end.count, 2);
        assert_eq!(lat.end_to_end.p50, 600);
        assert!((1999..=2001).contains(&lat.end_to_end.max), "{:?}", lat.end_to_end);
        assert_eq!(lat.delivery.count, 2);
        assert_eq!(lat.install.p50, 400);
    }

    #[test]
    fn an_acknowledged_notice_without_report_or_feedback_is_lost() {
        let mut o = observed();
        let expect = Expectations { no_lost_messages: true, ..Default::default() };
        let unmet = o.unmet(&expect);
        assert_eq!(unmet.len(), 1, "{unmet:?}");
        assert!(
            unmet[0]
                .contains("1 acknowledged notices never reached their device and got no feedback (first: c)"),
            "{unmet:?}"
        );
        o.releases[0].devices[2].1.feedback = Some("Expired".into());
        assert!(o.unmet(&expect).is_empty(), "the hub accounted for it");
    }

    #[test]
    fn every_unmet_expectation_is_named() {
        let expect = Expectations {
            final_version: Some("2.0.0".into()),
            all_installed_within: Some(Duration::from_secs(1)),
            no_duplicate_installs: true,
            no_lost_messages: true,
            expired: Some(0),
            failed: Some(0),
            feedback: FeedbackTallies { success: Some(3), ..Default::default() },
            ..Default::default()
        };
        let unmet = observed().unmet(&expect);
        let keys: Vec<&str> = unmet.iter().map(|u| u.split(':').next().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "expect.final_version",
                "expect.all_installed_within",
                "expect.no_duplicate_installs",
                "expect.no_lost_messages",
                "expect.expired",
                "expect.failed",
                "expect.feedback.success"
            ]
        );
        assert_eq!(unmet[0], "expect.final_version: 1 of 3 devices are not on 2.0.0 (first: c)");
        assert!(unmet[1].contains("2 of 3 targeted devices"), "{}", unmet[1]);
        assert!(unmet[2].contains("b installed 2.0.0 2 times"), "{}", unmet[2]);
    }

    #[test]
    fn met_expectations_leave_nothing_unmet() {
        let expect = Expectations {
            all_installed_within: Some(Duration::from_secs(3)),
            expired: Some(1),
            failed: Some(1),
            feedback: FeedbackTallies { success: Some(2), expired: Some(1), ..Default::default() },
            ..Default::default()
        };
        let o = Observed {
            releases: vec![ReleaseRecord {
                devices: observed().releases[0].devices[..2].to_vec(),
                ..observed().releases[0].clone()
            }],
            ..observed()
        };
        assert_eq!(o.unmet(&expect), Vec::<String>::new());
        let report = o.report_json(&[]);
        assert_eq!(report["passed"], true);
        assert_eq!(report["releases"][0]["reported"], 2);
    }

    /// The per-device parts of `report.json`, made one device at a time while written: each
    /// device's outcome across two releases (one that skipped device c), its installs, and each
    /// release's timings; the written bytes parse to what `report_json` collects, key order too.
    #[test]
    fn the_written_report_has_every_device_and_release_in_order() {
        let mut o = observed();
        let mut second = o.releases[0].clone();
        second.version = "3.0.0".into();
        second.devices.truncate(2);
        second.devices.reverse();
        o.releases.push(second);
        o.installs.insert((0, "3.0.0".to_string()), 1);
        let mut report = Report::new(&o, &[]);
        report.push("tier", json!({"name": "S1"}));
        let mut bytes = Vec::new();
        serde_json::to_writer_pretty(&mut bytes, &report).unwrap();
        let written: Value = serde_json::from_slice(&bytes).unwrap();
        let mut collected = o.report_json(&[]);
        collected.as_object_mut().unwrap().insert("tier".into(), json!({"name": "S1"}));
        assert_eq!(written, collected);
        let keys: Vec<&String> = written.as_object().unwrap().keys().collect();
        assert_eq!(keys.first().map(|k| k.as_str()), Some("scenario"));
        assert_eq!(keys.last().map(|k| k.as_str()), Some("tier"));
        let a = &written["deviceOutcomes"]["a"];
        assert_eq!(a["finalVersion"], "2.0.0");
        assert_eq!(
            a["installs"],
            json!([{"version": "2.0.0", "count": 1}, {"version": "3.0.0", "count": 1}])
        );
        assert_eq!(a["releases"].as_array().unwrap().len(), 2);
        assert_eq!(a["releases"][1]["version"], "3.0.0");
        let c = &written["deviceOutcomes"]["c"];
        assert_eq!(c["installs"], json!([]));
        assert_eq!(c["installState"], "failed");
        assert_eq!(
            c["releases"],
            json!([{"version": "2.0.0", "sent": true, "delivered": false,
            "installed": false, "reported": false, "feedback": null}])
        );
        assert_eq!(written["deviceOutcomes"].as_object().unwrap().len(), 3);
        let second: Vec<&String> = written["releases"][1]["devices"].as_object().unwrap().keys().collect();
        assert_eq!(second, ["b", "a"], "in the order the release targeted them");
        assert_eq!(written["releases"][0]["devices"]["b"]["reportedMs"], 3000);
        assert_eq!(written["releases"][1]["targeted"], 2);
    }
}
