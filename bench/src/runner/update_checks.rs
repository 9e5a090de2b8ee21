//! Periodic update checks on scenario time (`fleet.update_retry.check_every`): every device asks
//! the package server's `latest.json` once per period and installs what it names unless that
//! version is active, as a polling update agent does. The runner drives the checks itself, from
//! its main loop's elapsed time, because agents' own timers run on real time. It owns one rolling
//! [`CheckSchedule`] over the device indices (two words, no timer or task per device); the fleet
//! side carries a check to its agent ([`FleetSide::check_for_update`]).

use std::time::Duration;

use simulated_devices::check_schedule::CheckSchedule;

use super::RunError;
use super::fleet_side::FleetSide;
use crate::scenario::plan::{ScenarioPlan, UpdateRetryPlan};

/// The run's periodic-check schedule (none without `check_every`).
#[derive(Debug)]
pub(super) struct UpdateChecks {
    schedule: Option<CheckSchedule>,
}

impl UpdateChecks {
    /// Checks for `devices` devices under `policy`.
    pub(super) fn new(policy: &UpdateRetryPlan, devices: usize) -> Self {
        Self { schedule: policy.check_every.and_then(|every| CheckSchedule::new(devices, every)) }
    }

    /// When the next check is due (scenario time), if there is a schedule: a timed event
    /// compressed time jumps to.
    pub(super) fn next_due(&self) -> Option<Duration> {
        self.schedule.as_ref().map(CheckSchedule::next_at)
    }

    /// Asks every device whose check is due at `elapsed` (scenario time) to check; returns how
    /// many were asked.
    pub(super) fn poll(&mut self, fleet: &FleetSide, elapsed: Duration) -> usize {
        let Some(schedule) = &mut self.schedule else { return 0 };
        let due = schedule.due(elapsed);
        for &i in &due {
            fleet.check_for_update(i);
        }
        due.len()
    }
}

/// Refuses `check_every` with an external fleet: the runner cannot reach those agents (their
/// `fleet run --check-every` does the same on real time).
pub(super) fn check_supported(plan: &ScenarioPlan) -> Result<(), RunError> {
    if plan.fleet.external && plan.fleet.update_retry.check_every.is_some() {
        return Err(RunError::Mode {
            key: "fleet.update_retry.check_every".into(),
            why: "the runner cannot ask an external fleet's devices to check; start the `fleet run` \
                  shards with --check-every instead"
                .into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_schedule_without_a_period() {
        let c = UpdateChecks::new(&UpdateRetryPlan::default(), 10);
        assert!(c.schedule.is_none());
        let mut with = UpdateChecks::new(
            &UpdateRetryPlan { on_reconnect: true, check_every: Some(Duration::from_secs(10)) },
            10,
        );
        let s = with.schedule.as_mut().unwrap();
        assert_eq!(s.due(Duration::from_secs(10)).len(), 10, "each device once per period");
    }
}
