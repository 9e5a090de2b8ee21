//! Wall-clock time for everything that expires: SAS tokens, C2D messages, locks, feedback batches.
//!
//! Time is milliseconds since the Unix epoch ([`Millis`]) because IoT Hub speaks absolute wall-clock
//! times on the wire (SAS `se`, `iothub-expiry`, AMQP `absolute-expiry-time`). The clock is injected
//! ([`Clock`]) so that state machines and tests are deterministic: tests use [`ManualClock`] and move
//! it forward by hand; the server uses [`SystemClock`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since 1970-01-01T00:00:00Z.
pub type Millis = u64;

/// A source of the current wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time in milliseconds since the Unix epoch.
    fn now_ms(&self) -> Millis;
}

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as Millis).unwrap_or(0)
    }
}

/// A clock that only moves when told to; shared handles see the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: Millis) -> Self {
        Self { now: Arc::new(AtomicU64::new(start)) }
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets the clock to `at`.
    pub fn set(&self, at: Millis) {
        self.now.store(at, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.now.load(Ordering::SeqCst)
    }
}

/// Formats `at` as ISO 8601 UTC with milliseconds, as IoT Hub writes timestamps
/// (`2015-07-28T16:24:48.789Z`).
pub fn iso8601(at: Millis) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_millis(at);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Parses an ISO 8601 / RFC 3339 UTC timestamp into [`Millis`].
pub fn parse_iso8601(s: &str) -> Option<Millis> {
    let t = humantime::parse_rfc3339_weak(s.trim()).ok()?;
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_millis() as Millis)
}

/// IoT Hub's "never" timestamp, used for times that were never set.
pub const NEVER: &str = "0001-01-01T00:00:00Z";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_round_trip() {
        let at = 1_438_100_688_789;
        assert_eq!(iso8601(at), "2015-07-28T16:24:48.789Z");
        assert_eq!(parse_iso8601("2015-07-28T16:24:48.789Z"), Some(at));
    }

    #[test]
    fn manual_clock_is_shared() {
        let c = ManualClock::new(10);
        let d = c.clone();
        c.advance(5);
        assert_eq!(d.now_ms(), 15);
    }
}
