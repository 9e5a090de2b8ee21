//! What changes during a run, sampled on the runner's tick: devices connected, how many devices
//! are on each version and the process's resident memory ([`TimeSeries`], bounded to
//! [`MAX_SAMPLES`] by halving its resolution when full), and the devices the timeline switched off
//! ([`OfflineLog`]: one window per `offline` event plus each device's own span, which the latency
//! breakdown by offline time reads). Pure data; the runner ([`super`]) feeds it.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};

/// The most samples a series holds; when full, every other sample is dropped and the interval
/// doubles, so a run of any length costs at most this many.
pub const MAX_SAMPLES: usize = 1000;
/// The sampling interval a run of up to 250,000 devices starts with.
pub const FIRST_INTERVAL: Duration = Duration::from_millis(250);
/// Bigger fleets start at this much per device: counting connected devices reads one flag per
/// device (about 14 ms for a million), so a million-device run samples once a second.
const INTERVAL_PER_DEVICE: Duration = Duration::from_micros(1);

/// Samples over time, columnar (one vector per quantity, same length as `t_ms`).
#[derive(Debug, Clone)]
pub struct TimeSeries {
    interval: Duration,
    next_at: Duration,
    /// Sample times, milliseconds since the run started.
    pub t_ms: Vec<u64>,
    /// Devices with an MQTT session up.
    pub connected: Vec<u64>,
    /// The process's `VmRSS` in KiB (0 when unknown).
    pub rss_kib: Vec<u64>,
    /// Versions seen, the fleet's initial version first.
    pub versions: Vec<String>,
    /// Devices on `versions[k]` at each sample: `on_version[k][sample]`.
    pub on_version: Vec<Vec<u64>>,
    /// Index into `versions` of each device's current version (2 bytes a device).
    of_device: Vec<u16>,
    /// Devices on each version now.
    counts: Vec<u64>,
}

impl Default for TimeSeries {
    fn default() -> Self {
        Self::new(0, "")
    }
}

impl TimeSeries {
    /// A series for `devices` devices, all on `initial_version`.
    pub fn new(devices: usize, initial_version: &str) -> Self {
        Self {
            interval: FIRST_INTERVAL.max(INTERVAL_PER_DEVICE * devices as u32),
            next_at: Duration::ZERO,
            t_ms: Vec::new(),
            connected: Vec::new(),
            rss_kib: Vec::new(),
            versions: vec![initial_version.to_string()],
            on_version: vec![Vec::new()],
            of_device: vec![0; devices],
            counts: vec![devices as u64],
        }
    }

    /// Device `device` installed `version` (an `installed` event).
    pub fn installed(&mut self, device: usize, version: &str) {
        let Some(&old) = self.of_device.get(device) else { return };
        let k = match self.versions.iter().position(|v| v == version) {
            Some(k) => k,
            None if self.versions.len() <= u16::MAX as usize => {
                self.versions.push(version.to_string());
                self.on_version.push(vec![0; self.t_ms.len()]);
                self.counts.push(0);
                self.versions.len() - 1
            }
            None => return,
        };
        self.counts[old as usize] -= 1;
        self.counts[k] += 1;
        self.of_device[device] = k as u16;
    }

    /// True when a sample is due at `now` (time since the run started).
    pub fn due(&self, now: Duration) -> bool {
        now >= self.next_at
    }

    /// The current sampling interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Records a sample at `now` (whether due or not: the runner records one at the end).
    pub fn record(&mut self, now: Duration, connected: u64, rss_kib: Option<u64>) {
        self.t_ms.push(now.as_millis() as u64);
        self.connected.push(connected);
        self.rss_kib.push(rss_kib.unwrap_or(0));
        for (series, &n) in self.on_version.iter_mut().zip(&self.counts) {
            series.push(n);
        }
        if self.t_ms.len() >= MAX_SAMPLES {
            for v in [&mut self.t_ms, &mut self.connected, &mut self.rss_kib]
                .into_iter()
                .chain(self.on_version.iter_mut())
            {
                *v = v.iter().step_by(2).copied().collect();
            }
            self.interval *= 2;
        }
        self.next_at = now + self.interval;
    }

    /// Devices on each version now, in `versions` order.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// `report.json`'s `timeSeries`.
    pub fn to_json(&self) -> Value {
        let on: serde_json::Map<String, Value> =
            self.versions.iter().zip(&self.on_version).map(|(v, s)| (v.clone(), json!(s))).collect();
        json!({
            "intervalMs": self.interval.as_millis() as u64,
            "tMs": self.t_ms,
            "connected": self.connected,
            "rssKib": self.rss_kib,
            "onVersion": on,
        })
    }
}

/// Devices switched off by one `offline` event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OfflineWindow {
    /// When the event switched them off (since the run started).
    pub start: Duration,
    /// When the last of them is switched back on.
    pub end: Duration,
    /// How many it switched off.
    pub devices: u64,
}

/// Every device the timeline switched off, and when.
#[derive(Debug, Clone, Default)]
pub struct OfflineLog {
    /// One window per `offline` event, in timeline order.
    pub windows: Vec<OfflineWindow>,
    /// (device index, off from ms, back on at ms), since the run started.
    spans: Vec<(usize, u64, u64)>,
}

impl OfflineLog {
    /// An `offline` event at `at` switched off each `(device, for how long)`.
    pub fn record(&mut self, at: Duration, devices: &[(usize, Duration)]) {
        let from = at.as_millis() as u64;
        let mut end = at;
        for &(i, off_for) in devices {
            end = end.max(at + off_for);
            self.spans.push((i, from, (at + off_for).as_millis() as u64));
        }
        self.windows.push(OfflineWindow { start: at, end, devices: devices.len() as u64 });
    }

    /// Each switched-off device's spans, for [`OfflineIndex::offline_ms`].
    pub fn index(&self) -> OfflineIndex {
        let mut by_device: HashMap<usize, Vec<(u64, u64)>> = HashMap::new();
        for &(i, a, b) in &self.spans {
            by_device.entry(i).or_default().push((a, b));
        }
        OfflineIndex { by_device }
    }

    /// `report.json`'s `offlineWindows`.
    pub fn to_json(&self) -> Value {
        json!(
            self.windows
                .iter()
                .map(|w| json!({
                    "startMs": w.start.as_millis() as u64,
                    "endMs": w.end.as_millis() as u64,
                    "devices": w.devices,
                }))
                .collect::<Vec<_>>()
        )
    }
}

/// The offline spans by device (built once per report, only for devices that went offline).
#[derive(Debug, Default)]
pub struct OfflineIndex {
    by_device: HashMap<usize, Vec<(u64, u64)>>,
}

impl OfflineIndex {
    /// How long device `i` was switched off within `[from_ms, to_ms]` (ms since the run started).
    pub fn offline_ms(&self, i: usize, from_ms: u64, to_ms: u64) -> u64 {
        self.by_device
            .get(&i)
            .map_or(0, |spans| spans.iter().map(|&(a, b)| b.min(to_ms).saturating_sub(a.max(from_ms))).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_counts_follow_installs() {
        let mut s = TimeSeries::new(4, "1.0.0");
        s.record(Duration::ZERO, 0, None);
        s.installed(1, "2.0.0");
        s.installed(2, "2.0.0");
        s.installed(2, "2.0.0");
        s.installed(9, "2.0.0");
        assert!(!s.due(Duration::from_millis(100)));
        assert!(s.due(FIRST_INTERVAL));
        s.record(FIRST_INTERVAL, 4, Some(1000));
        s.installed(1, "3.0.0");
        s.record(FIRST_INTERVAL * 2, 3, Some(1200));
        assert_eq!(s.versions, ["1.0.0", "2.0.0", "3.0.0"]);
        assert_eq!(s.on_version, [vec![4, 2, 2], vec![0, 2, 1], vec![0, 0, 1]]);
        assert_eq!(s.connected, [0, 4, 3]);
        assert_eq!(s.rss_kib, [0, 1000, 1200]);
        assert_eq!(s.counts().iter().sum::<u64>(), 4);
        let j = s.to_json();
        assert_eq!(j["onVersion"]["2.0.0"], json!([0, 2, 1]));
        assert_eq!(j["tMs"], json!([0, 250, 500]));
    }

    #[test]
    fn big_fleets_sample_less_often() {
        assert_eq!(TimeSeries::new(1000, "1").interval(), FIRST_INTERVAL);
        assert_eq!(TimeSeries::new(1_000_000, "1").interval(), Duration::from_secs(1));
    }

    #[test]
    fn a_long_run_stays_bounded_and_keeps_its_span() {
        let mut s = TimeSeries::new(1, "1.0.0");
        let mut now = Duration::ZERO;
        for k in 0..10 * MAX_SAMPLES as u64 {
            if s.due(now) {
                s.record(now, k, None);
            }
            now += Duration::from_millis(50);
        }
        assert!(s.t_ms.len() < MAX_SAMPLES, "{}", s.t_ms.len());
        assert!(s.t_ms.len() > MAX_SAMPLES / 4, "{}", s.t_ms.len());
        assert_eq!(s.t_ms[0], 0);
        assert!(*s.t_ms.last().unwrap() > now.as_millis() as u64 * 9 / 10);
        assert!(s.t_ms.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(s.on_version[0].len(), s.t_ms.len());
        assert!(s.interval() > FIRST_INTERVAL);
    }

    #[test]
    fn offline_time_is_the_overlap_with_the_asked_interval() {
        let mut log = OfflineLog::default();
        let s = Duration::from_secs;
        log.record(s(10), &[(3, s(30)), (5, s(100))]);
        log.record(s(200), &[(3, s(10))]);
        assert_eq!(log.windows[0], OfflineWindow { start: s(10), end: s(110), devices: 2 });
        let idx = log.index();
        assert_eq!(idx.offline_ms(3, 20_000, 300_000), 20_000 + 10_000);
        assert_eq!(idx.offline_ms(3, 0, 15_000), 5_000);
        assert_eq!(idx.offline_ms(5, 120_000, 130_000), 0);
        assert_eq!(idx.offline_ms(4, 0, 1_000_000), 0);
        assert_eq!(log.to_json()[1], json!({"startMs": 200_000, "endMs": 210_000, "devices": 1}));
    }
}
