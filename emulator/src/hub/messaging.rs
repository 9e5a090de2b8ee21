//! Cloud-to-device messages and their feedback, as hub operations: send into a device's queue,
//! receive with a lock, settle, purge; feedback records from final states into the hub-wide
//! feedback queue. The queue rules themselves are the sans-IO state machine in `crate::c2d`.

pub use crate::c2d::Settlement;
use crate::c2d::{
    C2dMessage, Delivery, DeviceQueue, FeedbackRecord, FeedbackStatus, LockToken, Outcome, OutcomeSink,
    SendError, SendReceipt, SettleError,
};
use crate::error::{ErrorCode, HubError};
use crate::metrics::{C2dCounts, status_index};

use super::Hub;

/// A C2D message handed to a device, with its lock token.
pub type C2dDelivery = Delivery;
/// A feedback batch handed to a service, with its lock token.
pub type FeedbackDelivery = Delivery;

fn send_error(device_id: &str, e: SendError) -> HubError {
    match e {
        SendError::QueueFull { depth } => HubError::new(
            ErrorCode::DeviceMaximumQueueDepthExceeded,
            format!("device '{device_id}' already has {depth} messages pending, IoT Hub's maximum"),
        ),
        SendError::TooLarge { size, max } => HubError::new(
            ErrorCode::MessageTooLarge,
            format!("the message is {size} bytes; C2D messages are at most {max}"),
        ),
        other @ SendError::InvalidExpiry { .. } => {
            HubError::new(ErrorCode::InvalidMessageExpiryTime, other.to_string())
        }
    }
}

/// The link of connection `conn_id`, if it is still `d`'s.
fn link_of(d: &super::Device, conn_id: Option<u64>) -> Option<&super::link::LinkShared> {
    d.link.as_ref().filter(|l| Some(l.conn_id) == conn_id).map(|l| &*l.shared)
}

fn lock_lost(device_id: &str, token: LockToken, _e: SettleError) -> HubError {
    HubError::new(
        ErrorCode::DeviceMessageLockLost,
        format!("lock token {token} of device '{device_id}' is unknown or its lock has lapsed"),
    )
}

/// The outcome sink of the hub's queue operations: the feedback outcomes the ack modes ask for,
/// and counts of everything for the metrics (see [`Hub::c2d_visit`]).
#[derive(Debug, Default)]
pub(super) struct Tally {
    outcomes: Vec<Outcome>,
    counts: C2dCounts,
}

impl OutcomeSink for Tally {
    fn finished(&mut self, message: &C2dMessage, status: FeedbackStatus, at: crate::clock::Millis) {
        self.counts.finished[status_index(status)] += 1;
        self.outcomes.finished(message, status, at);
    }

    fn abandoned(&mut self) {
        self.counts.abandoned += 1;
    }
}

impl Hub {
    /// Queues `msg` for `device_id`. Fails with IoT Hub's error when the device does not exist,
    /// the queue holds 50 messages, the message is too large or its expiry too far away.
    ///
    /// When the device's connection is armed for it (its window has room and it saw nothing else
    /// visible), the next visible message, this one as a rule, is locked for the connection here
    /// and handed over in its link (see `hub::link`): one visit to the shard instead of two.
    pub fn send_c2d(&self, device_id: &str, msg: C2dMessage) -> Result<SendReceipt, HubError> {
        let now = self.now();
        let mut fb = Vec::new();
        // A link that delivers on the sender's thread (see `link::DirectDelivery`), once the
        // shard is let go.
        let mut direct = None;
        let r = self.with_device(device_id, |d| {
            let armed = d.link.as_ref().and_then(|l| l.shared.armed_for());
            let cfg = &self.config().c2d;
            let (r, handed) = self.c2d_visit(d, &mut fb, |q, t| {
                let r = q.send(msg, now, cfg, t);
                t.counts.sent += u64::from(r.is_ok());
                let handed = match (&r, armed) {
                    (Ok(_), Some(lock_ms)) => q.receive_with(now, lock_ms, LockToken::random, cfg, t),
                    _ => None,
                };
                t.counts.delivered += u64::from(handed.is_some());
                (r, handed)
            });
            match (handed, &d.link) {
                (Some(delivery), Some(link)) => {
                    direct = link.shared.hand(delivery).then(|| link.shared.clone())
                }
                _ if r.is_ok() => Hub::poke_c2d(d),
                _ => {}
            }
            r.map_err(|e| send_error(device_id, e))
        });
        if let Some(link) = direct {
            link.deliver(self);
        }
        self.emit_feedback(fb);
        if r.is_ok() {
            self.shared.changed.notify_waiters();
        }
        r
    }

    /// Locks and returns the next message for `device_id` (lock for `lock_ms`), if any.
    pub fn receive_c2d(&self, device_id: &str, lock_ms: u64) -> Result<Option<C2dDelivery>, HubError> {
        let now = self.now();
        let mut fb = Vec::new();
        let r = self.with_device(device_id, |d| {
            d.last_activity = now;
            Ok(self.c2d_visit(d, &mut fb, |q, t| {
                let got = q.receive_with(now, lock_ms, LockToken::random, &self.config().c2d, t);
                t.counts.delivered += u64::from(got.is_some());
                got
            }))
        });
        self.emit_feedback(fb);
        r
    }

    /// Locks up to `max` of the next messages for `device_id` (each for `lock_ms`) in one visit to
    /// its shard, handing each to `each` under the shard lock (keep `each` short: no I/O, no
    /// waiting); returns how many. With `settle`, that delivery is settled first in the same visit:
    /// what an MQTT PUBACK does before the next publish, one shard look-up instead of two. A
    /// settlement that fails (lock lost) is returned beside the count; the receive still happens.
    ///
    /// `conn_id` is the calling connection's link (see `hub::link`), while it is still the
    /// device's: a delivery handed over to it and not taken yet comes first (within `max`; past
    /// it, it is released), and the link is armed for a hand-over when the window keeps room
    /// after this visit (the queue had nothing more to give), disarmed otherwise.
    pub fn settle_and_receive_c2d(
        &self,
        device_id: &str,
        conn_id: Option<u64>,
        settle: Option<(LockToken, Settlement)>,
        lock_ms: u64,
        max: usize,
        mut each: impl FnMut(C2dDelivery),
    ) -> Result<(usize, Result<(), HubError>), HubError> {
        let now = self.now();
        let mut fb = Vec::new();
        let r = self.with_device(device_id, |d| {
            let cfg = &self.config().c2d;
            d.last_activity = now;
            let handed = link_of(d, conn_id).and_then(|l| l.take_handed());
            let (n, settled) = self.c2d_visit(d, &mut fb, |q, t| {
                let settled = match settle {
                    Some((token, how)) => {
                        q.settle(token, how, now, cfg, t).map_err(|e| lock_lost(device_id, token, e))
                    }
                    None => Ok(()),
                };
                let mut n = 0;
                // A hand-over whose lock lapsed (or whose message left the queue) is not the
                // session's any more: the queue gives the message again below, if it still has it.
                if let Some(delivery) = handed.filter(|d| q.holds_lock(d.lock_token, now)) {
                    if max > 0 {
                        each(*delivery);
                        n = 1;
                    } else {
                        // Unsubscribed since: back to the queue (a lapsed lock has done it already).
                        let _ = q.settle(delivery.lock_token, Settlement::Release, now, cfg, t);
                    }
                }
                let handed_n = n;
                while n < max {
                    match q.receive_with(now, lock_ms, LockToken::random, cfg, t) {
                        Some(delivery) => {
                            each(delivery);
                            n += 1;
                        }
                        None => break,
                    }
                }
                t.counts.delivered += (n - handed_n) as u64;
                (n, settled)
            });
            if let Some(link) = link_of(d, conn_id) {
                link.arm((n < max).then_some(lock_ms));
            }
            Ok((n, settled))
        });
        self.emit_feedback(fb);
        r
    }

    /// Settles the delivery with lock `token` of `device_id`.
    pub fn settle_c2d(&self, device_id: &str, token: LockToken, how: Settlement) -> Result<(), HubError> {
        let now = self.now();
        let mut fb = Vec::new();
        let r = self.with_device(device_id, |d| {
            let cfg = &self.config().c2d;
            d.last_activity = now;
            let r = self.c2d_visit(d, &mut fb, |q, t| q.settle(token, how, now, cfg, t));
            r.map_err(|e| lock_lost(device_id, token, e))
        });
        self.emit_feedback(fb);
        r
    }

    /// `DELETE /devices/{id}/commands`: drops every pending message; returns how many.
    pub fn purge_c2d(&self, device_id: &str) -> Result<usize, HubError> {
        let now = self.now();
        let mut fb = Vec::new();
        let r = self.with_device(device_id, |d| {
            Ok(self.c2d_visit(d, &mut fb, |q, t| q.purge(now, &self.config().c2d, t)))
        });
        self.emit_feedback(fb);
        r
    }

    /// Runs `f` on `d`'s C2D queue with a [`Tally`] as its outcome sink: the feedback outcomes go
    /// to `fb`, and what happened (ends, the queue's length before and after, and the sends and
    /// deliveries `f` adds to the tally's counts) to the hub's metrics. Every queue operation of
    /// the hub goes through here, which keeps the queue-depth histogram exact without a scan, and
    /// journals what changed in the queue (`--persist`).
    pub(super) fn c2d_visit<T>(
        &self,
        d: &mut super::Device,
        fb: &mut Vec<(String, u64, Outcome)>,
        f: impl FnOnce(&mut DeviceQueue, &mut Tally) -> T,
    ) -> T {
        let before = d.c2d.len();
        let kept = self.queue_before(&d.c2d);
        let mut tally = Tally::default();
        let r = f(&mut d.c2d, &mut tally);
        self.record_queue(d, kept);
        let metrics = self.metrics();
        metrics.c2d_depth_moved(before, d.c2d.len());
        metrics.add_c2d(&tally.counts);
        if !tally.outcomes.is_empty() {
            fb.extend(tally.outcomes.into_iter().map(|o| (d.id.clone(), d.generation_id, o)));
        }
        r
    }

    /// Turns queue outcomes into feedback records (called with no shard lock held).
    pub(super) fn emit_feedback(&self, outcomes: Vec<(String, u64, Outcome)>) {
        if outcomes.is_empty() {
            return;
        }
        let now = self.now();
        {
            let mut feedback = self.feedback();
            let before = self.feedback_before(&feedback);
            for (id, generation, outcome) in outcomes {
                self.count_feedback(outcome.status);
                let record = FeedbackRecord::from_outcome(outcome, &id, &format!("{generation:018}"));
                self.record_feedback_push(feedback.next_serial(), &record);
                feedback.push(record, now);
            }
            self.record_feedback(&feedback, before);
        }
        self.shared.changed.notify_waiters();
    }

    /// Locks and returns the next feedback batch, if one is ready.
    pub fn receive_feedback(&self) -> Option<FeedbackDelivery> {
        let mut feedback = self.feedback();
        let before = self.feedback_before(&feedback);
        let got = feedback.receive_with(self.now(), LockToken::random);
        self.record_feedback(&feedback, before);
        got
    }

    /// Completes (`abandon == false`) or abandons a feedback batch.
    pub fn settle_feedback(&self, token: LockToken, abandon: bool) -> Result<(), HubError> {
        let now = self.now();
        let mut feedback = self.feedback();
        let before = self.feedback_before(&feedback);
        let r = if abandon { feedback.abandon(token, now) } else { feedback.complete(token, now) };
        self.record_feedback(&feedback, before);
        drop(feedback);
        r.map_err(|_| {
            HubError::new(
                ErrorCode::DeviceMessageLockLost,
                format!("feedback lock token {token} is unknown or its lock has lapsed"),
            )
        })
    }

    /// When pending feedback records will be cut into a batch, if any are waiting.
    pub fn feedback_next_due(&self) -> Option<crate::clock::Millis> {
        self.feedback().next_due(self.now())
    }
}
