//! How far a run is, as plain data handed to the caller's callback a few times a second: the
//! runner library stays free of terminal code; `testbench run` draws a progress bar on a terminal
//! or prints a line now and then otherwise. The same snapshot, with the scenario's timeline
//! ([`status_json`]), is what an embedded hub's dashboard shows.

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

/// Timeline entries a published status carries at most (a window around the next event).
pub const STATUS_TIMELINE_MAX: usize = 40;

/// What an event does, in a few words ("release 2.0.0", "offline").
pub fn what(action: &Action) -> String {
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

/// The status an embedded hub's dashboard shows for the run (see
/// `iothub_emulator::Hub::set_scenario_status`): the snapshot, the scenario's name, and up to
/// [`STATUS_TIMELINE_MAX`] timeline events around the next one, each marked done or not.
pub fn status_json(name: &str, p: &Progress, events: &[Event], next: usize) -> serde_json::Value {
    let from = next.saturating_sub(STATUS_TIMELINE_MAX / 4);
    let timeline: Vec<serde_json::Value> = events
        .iter()
        .enumerate()
        .skip(from)
        .take(STATUS_TIMELINE_MAX)
        .map(|(i, e)| {
            serde_json::json!({ "atMs": e.at.as_millis() as u64, "what": what(&e.action), "done": i < next })
        })
        .collect();
    serde_json::json!({
        "name": name,
        "phase": p.phase,
        "elapsedMs": p.elapsed.as_millis() as u64,
        "timeLimitMs": p.time_limit.as_millis() as u64,
        "devices": p.devices,
        "connected": p.connected,
        "targeted": p.targeted,
        "installed": p.installed,
        "events": events.len(),
        "eventsDone": next,
        "timeline": timeline,
    })
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

    #[test]
    fn the_published_status_marks_done_events_and_bounds_the_timeline() {
        let release = Event {
            at: Duration::from_secs(5),
            action: Action::Release {
                version: "2.0.0".into(),
                ttl: None,
                target: Target::All,
                pipeline: false,
            },
        };
        let p = Progress { targeted: 4, installed: 1, phase: "x".into(), ..Progress::default() };
        let s = status_json("demo", &p, &[release.clone(), release.clone()], 1);
        assert_eq!(s["name"], "demo");
        assert_eq!((s["targeted"].as_u64(), s["installed"].as_u64()), (Some(4), Some(1)));
        assert_eq!(
            s["timeline"][0],
            serde_json::json!({"atMs": 5000, "what": "release 2.0.0", "done": true})
        );
        assert_eq!(s["timeline"][1]["done"], false);
        let many = vec![release; 500];
        let s = status_json("demo", &p, &many, 300);
        let timeline = s["timeline"].as_array().unwrap();
        assert_eq!(timeline.len(), STATUS_TIMELINE_MAX);
        assert!(timeline.iter().any(|e| e["done"] == false) && timeline.iter().any(|e| e["done"] == true));
    }
}
