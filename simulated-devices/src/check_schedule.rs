//! When each device of a fleet checks for updates, for a periodic check every `every`: one
//! rolling cursor over the device indices, so a fleet of any size costs two words and no timer
//! per device. Check number `c` (from 0) is for device `c % devices` and is due at
//! `(c + 1) × every / devices` from the start, so device `i` checks at `(i + 1) × every / devices`
//! and then every `every`, and the fleet's checks are spread evenly over each period.
//!
//! The schedule is pure (it is asked with an elapsed time), so the in-process fleet drives it on
//! real time ([`crate::fleet::Fleet`]) and the scenario runner on scenario time.

use std::time::Duration;

/// Checks issued at most per [`CheckSchedule::due`] call, so a long stall does not flood the
/// fleet; the rest stay due.
pub const MAX_DUE_PER_CALL: usize = 100_000;

/// A rolling schedule of update checks.
#[derive(Debug, Clone)]
pub struct CheckSchedule {
    devices: u64,
    every: Duration,
    /// Checks issued so far.
    issued: u64,
}

impl CheckSchedule {
    /// Every one of `devices` devices checks once per `every`. `None` for an empty fleet or a
    /// zero period.
    pub fn new(devices: usize, every: Duration) -> Option<Self> {
        (devices > 0 && !every.is_zero()).then_some(Self { devices: devices as u64, every, issued: 0 })
    }

    /// When check number `c` is due.
    fn at(&self, c: u64) -> Duration {
        let nanos = self.every.as_nanos() * u128::from(c + 1) / u128::from(self.devices);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// When the next check is due (elapsed time from the start).
    pub fn next_at(&self) -> Duration {
        self.at(self.issued)
    }

    /// The devices whose checks are due at `elapsed` (at most [`MAX_DUE_PER_CALL`]), in order;
    /// each is returned once.
    pub fn due(&mut self, elapsed: Duration) -> Vec<usize> {
        let mut out = Vec::new();
        while out.len() < MAX_DUE_PER_CALL && self.at(self.issued) <= elapsed {
            out.push((self.issued % self.devices) as usize);
            self.issued += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_device_checks_once_per_period_spread_evenly() {
        let mut s = CheckSchedule::new(4, Duration::from_secs(40)).unwrap();
        assert!(s.due(Duration::from_secs(9)).is_empty());
        assert_eq!(s.next_at(), Duration::from_secs(10));
        assert_eq!(s.due(Duration::from_secs(10)), [0]);
        assert_eq!(s.due(Duration::from_secs(35)), [1, 2]);
        assert_eq!(s.due(Duration::from_secs(85)), [3, 0, 1, 2, 3]);
        assert_eq!(s.next_at(), Duration::from_secs(90));
        // Over ten periods every device checks ten times.
        let mut s = CheckSchedule::new(7, Duration::from_millis(700)).unwrap();
        let mut counts = [0; 7];
        for i in s.due(Duration::from_millis(7000)) {
            counts[i] += 1;
        }
        assert_eq!(counts, [10; 7]);
        assert!(CheckSchedule::new(0, Duration::from_secs(1)).is_none());
        assert!(CheckSchedule::new(3, Duration::ZERO).is_none());
    }

    #[test]
    fn a_long_stall_is_bounded_per_call() {
        let mut s = CheckSchedule::new(1_000_000, Duration::from_secs(1)).unwrap();
        assert_eq!(s.due(Duration::from_secs(3)).len(), MAX_DUE_PER_CALL);
        assert_eq!(s.due(Duration::from_secs(3)).len(), MAX_DUE_PER_CALL);
    }
}
