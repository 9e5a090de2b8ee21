//! The runner's fault events: `link-flap` (devices drop their TCP connections without an MQTT
//! DISCONNECT, `count` times `interval` apart, and reconnect by themselves) and `ftp-fault` (the
//! embedded FTP server's fault knobs on for a while). It owns the flap rounds still to come and
//! when the FTP fault ends; the fleet owns the agents and the hub owns the fault knobs.

use std::time::Duration;

use iothub_emulator::ftp::FaultSettings;

use super::Run;
use super::fleet_side::FleetSide;

/// One flap event's remaining rounds: the same devices, `interval` apart.
#[derive(Debug)]
struct FlapRound {
    next: Duration,
    left: u32,
    interval: Duration,
    devices: Vec<usize>,
    ftp: bool,
}

/// Fault work scheduled for later in the run.
#[derive(Debug, Default)]
pub(super) struct Faults {
    flaps: Vec<FlapRound>,
    /// When the FTP fault in force ends (`None`: none, or it lasts until the end).
    ftp_clear_at: Option<Duration>,
}

impl Faults {
    /// No flap round is left.
    pub(super) fn flaps_done(&self) -> bool {
        self.flaps.is_empty()
    }

    /// When fault work is next due (a flap round, the FTP fault's end), in scenario time.
    pub(super) fn next_due(&self) -> Option<Duration> {
        self.flaps.iter().map(|r| r.next).chain(self.ftp_clear_at).min()
    }
}

/// The `count` of `total` devices a `share` selects: the same rounding as `offline` shares.
pub(super) fn share_of(total: usize, share: f64) -> usize {
    ((total as f64) * share).round() as usize
}

impl Run {
    /// Schedules a `link-flap`: `share` of `targets` (chosen with the seed) drop their link
    /// `count` times, `interval` apart, the first at `at`.
    pub(super) fn link_flap(
        &mut self,
        targets: &[usize],
        share: f64,
        count: u32,
        interval: Duration,
        ftp: bool,
        at: Duration,
    ) {
        let k = share_of(targets.len(), share);
        let mut devices: Vec<usize> = rand::seq::index::sample(&mut self.rng, targets.len(), k)
            .into_iter()
            .map(|j| targets[j])
            .collect();
        devices.sort_unstable();
        self.say(format!(
            "link-flap: {} of {} devices drop their link {count} times, {} apart{}",
            devices.len(),
            targets.len(),
            humantime::format_duration(interval),
            if ftp { ", FTP included" } else { "" }
        ));
        self.faults.flaps.push(FlapRound { next: at, left: count, interval, devices, ftp });
    }

    /// Switches the FTP server's fault knobs on (replacing any fault in force), until
    /// `at + lasting` or the end of the run.
    pub(super) fn ftp_fault(
        &mut self,
        rate_limit: Option<u64>,
        drop_after: Option<u64>,
        refuse_logins: Option<f64>,
        refuse_sessions: Option<f64>,
        lasting: Option<Duration>,
        at: Duration,
    ) {
        let ppm = |share: Option<f64>| share.map_or(0, |s| (s * 1_000_000.0).round() as u32);
        let settings = FaultSettings {
            bytes_per_second: rate_limit,
            drop_after_bytes: drop_after,
            drop_times: None,
            refuse_login_ppm: ppm(refuse_logins),
            busy_ppm: ppm(refuse_sessions),
            // Which sessions are refused follows from the scenario's seed, device and attempt.
            seed: self.plan.seed,
        };
        // check_modes refuses ftp-fault with an external hub.
        if let Some(hub) = self.hub.embedded() {
            hub.ftp_faults.set(settings);
        }
        self.faults.ftp_clear_at = lasting.map(|l| at + l);
        let until = lasting.map_or("the end".to_string(), |l| humantime::format_duration(l).to_string());
        self.say(format!("ftp-fault: {} for {until}", settings.to_json()));
    }

    /// Carries out the flap rounds due by `now` and ends the FTP fault when its time is up.
    pub(super) fn fire_faults(&mut self, fleet: &FleetSide, now: Duration) {
        let mut flapped = 0;
        for round in &mut self.faults.flaps {
            while round.left > 0 && round.next <= now {
                // check_supported refuses link flaps for fleets the runner does not hold.
                for &i in &round.devices {
                    fleet.flap_link(i, round.ftp);
                }
                flapped += round.devices.len() as u64;
                round.left -= 1;
                round.next += round.interval;
            }
        }
        self.faults.flaps.retain(|r| r.left > 0);
        if flapped > 0 {
            self.obs.link_flaps += flapped;
            self.say(format!("link-flap: {flapped} links dropped"));
        }
        if self.faults.ftp_clear_at.is_some_and(|t| t <= now) {
            self.faults.ftp_clear_at = None;
            if let Some(hub) = self.hub.embedded() {
                hub.ftp_faults.set(FaultSettings::default());
            }
            self.say("ftp-fault: cleared".to_string());
        }
    }

    /// Reads what only the agents know: how often each got a message it had already saved.
    pub(super) fn collect_fleet_counts(&mut self, fleet: &FleetSide) {
        if fleet.in_process() {
            self.obs.duplicate_deliveries = fleet.duplicate_deliveries();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_round_like_offline() {
        assert_eq!(share_of(300, 0.25), 75);
        assert_eq!(share_of(10, 0.25), 3);
        assert_eq!(share_of(1, 0.3), 0);
    }
}
