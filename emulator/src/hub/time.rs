//! Hub time: the clock every IoT Hub timer reads (C2D expiry and locks, feedback batches, jobs'
//! start times and execution budgets, twin and registry timestamps, telemetry enqueued times,
//! `lastActivityTime`). Hub time is the injected wall clock plus a forward-only offset that time
//! travel (`POST /emulator/time`, [`Hub::advance_time`], the scenario runner's compressed mode)
//! moves; the offset is owned here, in one atomic beside the clock.
//!
//! SAS expiry is the exception: clients sign tokens on their own (wall) clock, so `se` is checked
//! against [`Hub::wall_now`]. A time jump therefore never invalidates a device's token.
//!
//! Waiting on hub time ([`Hub::sleep_until`]) wakes both when the wall clock gets there and as
//! soon as a jump passes the moment, so nothing sleeps through travelled time.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::clock::Millis;

use super::Hub;

/// How far time travel may move in one call (about 10 years): keeps `now + ttl` sums far from
/// overflow.
pub const MAX_ADVANCE_MS: u64 = 10 * 366 * 24 * 3_600_000;

/// Why time could not be moved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeTravelError {
    /// More than [`MAX_ADVANCE_MS`] in one step.
    #[error("a single advance is at most {max_ms} ms (about 10 years); asked for {asked_ms} ms")]
    TooFar {
        /// Requested.
        asked_ms: u64,
        /// Allowed.
        max_ms: u64,
    },
}

impl Hub {
    /// The wall clock without time travel: what SAS tokens are signed against.
    pub fn wall_now(&self) -> Millis {
        self.shared.clock.now_ms()
    }

    /// How far time travel has moved hub time ahead of the wall clock, in milliseconds.
    pub fn time_offset_ms(&self) -> u64 {
        self.shared.time_offset.load(Ordering::SeqCst)
    }

    /// Moves hub time forward by `ms` (time never goes back), then settles what the jump made
    /// due: expired C2D messages become `Expired` feedback, lapsed locks make messages visible
    /// again (connected devices are told), and every waiter on hub time or hub changes wakes.
    /// Returns the new hub time.
    pub fn advance_time(&self, ms: u64) -> Result<Millis, TimeTravelError> {
        if ms > MAX_ADVANCE_MS {
            return Err(TimeTravelError::TooFar { asked_ms: ms, max_ms: MAX_ADVANCE_MS });
        }
        if ms > 0 {
            self.shared.time_offset.fetch_add(ms, Ordering::SeqCst);
            self.settle_due();
            tracing::info!(advanced_ms = ms, offset_ms = self.time_offset_ms(), "hub time moved forward");
        }
        self.shared.time_moved.notify_waiters();
        self.shared.changed.notify_waiters();
        Ok(self.now())
    }

    /// Waits until hub time reaches `at`: on the wall clock, or at once when a jump passes it.
    pub async fn sleep_until(&self, at: Millis) {
        loop {
            let moved = self.shared.time_moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            let now = self.now();
            if now >= at {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(at - now)) => {}
                _ = moved => {}
            }
        }
    }

    /// Connected devices with a C2D message pending (queued or locked, after lazy expiry): the
    /// deliveries about to happen or under way. With the fleet idle, zero means the hub has
    /// nothing to do until something outside changes, which is when time may jump. A scan of
    /// every shard, one lock at a time: call it when deciding a jump, not on every packet.
    pub fn connected_with_c2d(&self) -> usize {
        let now = self.now();
        let cfg = &self.config().c2d;
        let mut count = 0;
        for s in 0..super::SHARD_COUNT {
            let mut fb = Vec::new();
            {
                let mut shard = self.shard(s);
                for d in shard.devices.values_mut().filter(|d| d.connected && !d.c2d.is_empty()) {
                    if self.c2d_visit(d, &mut fb, |q, t| q.pending(now, cfg, t)) > 0 {
                        count += 1;
                    }
                }
            }
            self.emit_feedback(fb);
        }
        count
    }

    /// One pass over every device's queue at the current hub time, a shard at a time (no two
    /// locks at once; feedback is emitted after each shard's lock is released).
    fn settle_due(&self) {
        let now = self.now();
        let cfg = &self.config().c2d;
        for s in 0..super::SHARD_COUNT {
            let mut fb = Vec::new();
            {
                let mut shard = self.shard(s);
                for d in shard.devices.values_mut() {
                    if d.c2d.is_empty() {
                        continue;
                    }
                    let visible = self.c2d_visit(d, &mut fb, |q, t| q.pending(now, cfg, t));
                    if visible > 0 {
                        Hub::poke_c2d(d);
                    }
                }
            }
            self.emit_feedback(fb);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::c2d::{AckMode, C2dMessage};
    use crate::clock::ManualClock;
    use crate::hub::{DeviceInput, HubConfig};

    const T0: Millis = 1_700_000_000_000;

    fn hub() -> (Hub, ManualClock) {
        let clock = ManualClock::new(T0);
        let hub = Hub::with_clock(
            HubConfig { feedback_batch_interval_ms: 0, ..HubConfig::default() },
            Arc::new(clock.clone()),
        );
        hub.put_device("fridge", DeviceInput::default(), None).expect("device");
        (hub, clock)
    }

    #[test]
    fn advancing_moves_hub_time_but_not_the_wall_clock() {
        let (hub, _) = hub();
        assert_eq!(hub.advance_time(7_200_000), Ok(T0 + 7_200_000));
        assert_eq!((hub.now(), hub.wall_now(), hub.time_offset_ms()), (T0 + 7_200_000, T0, 7_200_000));
        assert!(hub.advance_time(MAX_ADVANCE_MS + 1).is_err());
        assert_eq!(hub.now(), T0 + 7_200_000);
    }

    #[test]
    fn a_jump_past_expiry_gives_expired_feedback_without_the_device() {
        let (hub, _) = hub();
        let msg = C2dMessage {
            message_id: Some("update".into()),
            ack: AckMode::Full,
            expiry: Some(T0 + 3_600_000),
            ..C2dMessage::default()
        };
        hub.send_c2d("fridge", msg).expect("queued");
        hub.advance_time(1_800_000).expect("advance");
        assert!(hub.receive_feedback().is_none(), "not expired after 30 minutes");
        hub.advance_time(2 * 3_600_000).expect("advance");
        let batch = hub.receive_feedback().expect("a feedback batch");
        let records: serde_json::Value = serde_json::from_slice(&batch.message.body).expect("json");
        assert_eq!(records[0]["statusCode"], "Expired");
        assert_eq!(records[0]["originalMessageId"], "update");
        assert_eq!(hub.receive_c2d("fridge", 60_000).expect("device"), None);
    }

    #[tokio::test]
    async fn sleepers_wake_when_a_jump_passes_their_time() {
        let (hub, _) = hub();
        let sleeper = tokio::spawn({
            let hub = hub.clone();
            async move { hub.sleep_until(T0 + 86_400_000).await }
        });
        tokio::task::yield_now().await;
        hub.advance_time(86_400_000).expect("advance");
        tokio::time::timeout(Duration::from_secs(10), sleeper).await.expect("woke").expect("joined");
    }
}
