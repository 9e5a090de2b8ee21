//! How far a run is, as plain data handed to the caller's callback a few times a second: the
//! runner library stays free of terminal code; `testbench run` draws a progress bar on a terminal
//! or prints a line now and then otherwise.

use std::time::Duration;

use crate::scenario::plan::{Action, Event};

/// How often the runner reports progress.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// A snapshot of the run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Since the run started.
    pub elapsed: Duration,
    /// What the timeline is at (see [`phase`]).
    pub phase: String,
    /// Fleet size.
    pub devices: usize,
    /// Devices with an MQTT session up (as of the last sample).
    pub connected: usize,
    /// Notices sent so far, over every release (a device targeted twice counts twice).
    pub targeted: usize,
    /// Of those, how many ended in an `installed` event.
    pub installed: usize,
    /// The run's time limit.
    pub time_limit: Duration,
}

fn what(action: &Action) -> String {
    match action {
        Action::Release { version, .. } => format!("release {version}"),
        Action::Offline { .. } => "offline".to_string(),
        Action::Send { .. } => "send".to_string(),
        Action::LinkFlap { .. } => "link flap".to_string(),
        // FTP faults and kinds added later.
        _ => "fault".to_string(),
    }
}

/// The phase of a timeline whose first `next` events ran: "before the first event (release
/// 2.0.0 at 5s)", "after release 2.0.0 at 5s (next: offline at 20s)" or, once every event ran,
/// "settling: waiting for installs and feedback".
pub fn phase(events: &[Event], next: usize) -> String {
    let at = |e: &Event| format!("{}", humantime::format_duration(e.at));
    match (next.checked_sub(1).and_then(|p| events.get(p)), events.get(next)) {
        (None, Some(n)) => format!("before the first event ({} at {})", what(&n.action), at(n)),
        (Some(p), Some(n)) => {
            format!("after {} at {} (next: {} at {})", what(&p.action), at(p), what(&n.action), at(n))
        }
        _ => "settling: waiting for installs and feedback".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::plan::Target;

    #[test]
    fn the_phase_names_the_last_and_next_events() {
        let release = Event {
            at: Duration::from_secs(5),
            action: Action::Release {
                version: "2.0.0".into(),
                ttl: None,
                target: Target::All,
                pipeline: false,
            },
        };
        let events = vec![release.clone(), Event { at: Duration::from_secs(20), ..release }];
        assert_eq!(phase(&events, 0), "before the first event (release 2.0.0 at 5s)");
        assert_eq!(phase(&events, 1), "after release 2.0.0 at 5s (next: release 2.0.0 at 20s)");
        assert!(phase(&events, 2).starts_with("settling"));
        assert!(phase(&[], 0).starts_with("settling"));
    }
}
