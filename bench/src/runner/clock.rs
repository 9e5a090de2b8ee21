//! Scenario time: what the timeline, power windows, fault rounds, rollout gates, time limits and
//! latencies are measured in. It owns the run's start instant and how much waiting compressed
//! time has skipped; the embedded hub's own offset moves in step (the runner advances both in
//! [`super::Run::try_jump`]). In real time nothing is ever skipped and scenario time is wall time.

use std::time::Duration;

use tokio::time::Instant;

use crate::scenario::plan::TimeMode;

/// Gaps shorter than this are waited out, not skipped: a jump costs a quiescence check.
pub const MIN_JUMP: Duration = Duration::from_millis(100);

/// The run's clock.
#[derive(Debug)]
pub struct ScenarioClock {
    t0: Instant,
    skipped: Duration,
    jumps: u64,
    mode: TimeMode,
}

impl ScenarioClock {
    /// Scenario time zero is now.
    pub fn start(mode: TimeMode) -> Self {
        Self { t0: Instant::now(), skipped: Duration::ZERO, jumps: 0, mode }
    }

    /// Scenario time since the start: wall time plus what was skipped.
    pub fn now(&self) -> Duration {
        self.t0.elapsed() + self.skipped
    }

    /// Wall time since the start.
    pub fn wall(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Waiting skipped so far, and in how many jumps.
    pub fn skipped(&self) -> (Duration, u64) {
        (self.skipped, self.jumps)
    }

    /// How scenario time passes in this run.
    pub fn mode(&self) -> TimeMode {
        self.mode
    }

    /// The jump worth making from `now` to `due` (the next timed event), if time is compressed
    /// and the gap is at least [`MIN_JUMP`].
    pub fn gap_to(&self, now: Duration, due: Option<Duration>) -> Option<Duration> {
        let gap = due?.checked_sub(now)?;
        (self.mode == TimeMode::Compressed && gap >= MIN_JUMP).then_some(gap)
    }

    /// Records a jump of `gap`.
    pub fn skip(&mut self, gap: Duration) {
        self.skipped += gap;
        self.jumps += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_time_never_jumps() {
        let c = ScenarioClock::start(TimeMode::Real);
        assert_eq!(c.gap_to(Duration::ZERO, Some(Duration::from_secs(60))), None);
    }

    #[test]
    fn compressed_time_jumps_whole_gaps_only_forward() {
        let mut c = ScenarioClock::start(TimeMode::Compressed);
        let now = c.now();
        assert_eq!(c.gap_to(now, Some(now + Duration::from_secs(60))), Some(Duration::from_secs(60)));
        assert_eq!(c.gap_to(now, Some(now + Duration::from_millis(20))), None);
        assert_eq!(c.gap_to(now + Duration::from_secs(1), Some(now)), None);
        assert_eq!(c.gap_to(now, None), None);
        c.skip(Duration::from_secs(3600));
        assert!(c.now() >= Duration::from_secs(3600));
        assert!(c.wall() < Duration::from_secs(3600));
        assert_eq!(c.skipped(), (Duration::from_secs(3600), 1));
    }
}
