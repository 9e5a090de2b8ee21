//! One device's C2D queue: the Enqueued → Invisible → Completed / Dead-lettered lifecycle of
//! reference §3.1, applied lazily on each call.
//!
//! A queue is a `VecDeque` of entries in sequence order plus the last sequence number handed out,
//! so an empty queue costs 32 bytes and no allocation — also once messages have come and gone: a
//! deque left empty gives its buffer back (a fan-out to a million devices must not leave each
//! queue holding the slots of its one delivered message). Final messages leave the deque at once;
//! what remains is exactly the queue depth. Depth is at most 50, so every lookup is a linear scan.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{C2dMessage, FeedbackStatus, LockToken, OutcomeSink, QueueConfig, SendError, SettleError};
use crate::clock::Millis;

/// What a successful send tells the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendReceipt {
    /// The per-queue sequence number given to the message (from 1, never reused).
    pub sequence_number: u64,
    /// When the message will expire.
    pub expires_at: Millis,
}

/// One delivery of a message to a device: everything a protocol front end needs to present it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The message, shared with the queue so a delivery costs a reference count.
    pub message: Arc<C2dMessage>,
    /// `x-opt-sequence-number` / `iothub-sequencenumber`.
    pub sequence_number: u64,
    /// When the hub accepted the message.
    pub enqueued_at: Millis,
    /// When the message expires.
    pub expires_at: Millis,
    /// Abandons so far (0 on first delivery).
    pub delivery_count: u32,
    /// The token that settles this delivery.
    pub lock_token: LockToken,
    /// When the lock lapses and the message becomes visible again.
    pub locked_until: Millis,
}

/// A pending entry as the durable hub stores it.
#[derive(Debug, Clone, Copy)]
pub struct StoredEntry<'a> {
    /// The message.
    pub message: &'a C2dMessage,
    /// Its sequence number.
    pub sequence_number: u64,
    /// When the hub accepted it.
    pub enqueued_at: Millis,
    /// When it expires.
    pub expires_at: Millis,
    /// Abandons so far.
    pub delivery_count: u32,
}

/// A lock held by a receiver: the message is Invisible until `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lock {
    token: LockToken,
    until: Millis,
}

/// A non-final message. `lock: None` means Enqueued (visible), `Some` means Invisible.
#[derive(Debug, Clone)]
struct Entry {
    message: Arc<C2dMessage>,
    sequence_number: u64,
    enqueued_at: Millis,
    expires_at: Millis,
    delivery_count: u32,
    lock: Option<Lock>,
}

/// How a receiver settles a locked message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Done: the message leaves the queue (Success feedback if asked).
    Complete,
    /// Back to Enqueued with the delivery count + 1 (dead-lettered at the maximum).
    Abandon,
    /// Dead-lettered as Rejected.
    Reject,
    /// Back to Enqueued without counting: the receiver went away before settling.
    Release,
}

/// A device's pending C2D messages, in sequence order.
#[derive(Debug, Clone, Default)]
pub struct DeviceQueue {
    entries: VecDeque<Entry>,
    last_sequence: u64,
}

impl DeviceQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Enqueues `msg`, or refuses it when it is too large, expires too far ahead or the queue is
    /// full. An expiry already in the past is accepted; the message expires on the next access.
    pub fn send(
        &mut self,
        msg: C2dMessage,
        now: Millis,
        cfg: &QueueConfig,
        out: &mut impl OutcomeSink,
    ) -> Result<SendReceipt, SendError> {
        self.expire(now, out);
        let size = msg.size_bytes();
        if size > cfg.max_message_bytes {
            return Err(SendError::TooLarge { size, max: cfg.max_message_bytes });
        }
        let latest = now.saturating_add(cfg.max_ttl_ms);
        let expires_at = match msg.expiry {
            Some(expiry) if expiry > latest => {
                return Err(SendError::InvalidExpiry { expiry, latest });
            }
            Some(expiry) => expiry,
            None => now.saturating_add(cfg.default_ttl_ms),
        };
        if self.entries.len() >= cfg.max_depth {
            return Err(SendError::QueueFull { depth: self.entries.len() });
        }
        self.last_sequence += 1;
        self.entries.push_back(Entry {
            message: Arc::new(msg),
            sequence_number: self.last_sequence,
            enqueued_at: now,
            expires_at,
            delivery_count: 0,
            lock: None,
        });
        Ok(SendReceipt { sequence_number: self.last_sequence, expires_at })
    }

    /// Locks the oldest visible message for `lock_ms` under `token` and returns it, or `None` when
    /// nothing is visible. Tokens must be unique among the queue's live locks.
    pub fn receive(
        &mut self,
        now: Millis,
        lock_ms: u64,
        token: LockToken,
        cfg: &QueueConfig,
        out: &mut impl OutcomeSink,
    ) -> Option<Delivery> {
        self.receive_with(now, lock_ms, || token, cfg, out)
    }

    /// [`Self::receive`] with the token made by `token` only when a message is there to lock:
    /// callers polling an often-empty queue pay for no random token.
    pub fn receive_with(
        &mut self,
        now: Millis,
        lock_ms: u64,
        token: impl FnOnce() -> LockToken,
        _cfg: &QueueConfig,
        out: &mut impl OutcomeSink,
    ) -> Option<Delivery> {
        self.expire(now, out);
        let entry = self.entries.iter_mut().find(|e| e.lock.is_none())?;
        let token = token();
        let until = now.saturating_add(lock_ms);
        entry.lock = Some(Lock { token, until });
        Some(Delivery {
            message: Arc::clone(&entry.message),
            sequence_number: entry.sequence_number,
            enqueued_at: entry.enqueued_at,
            expires_at: entry.expires_at,
            delivery_count: entry.delivery_count,
            lock_token: token,
            locked_until: until,
        })
    }

    /// Completes the message locked under `token` (Success feedback if asked).
    pub fn complete(
        &mut self,
        token: LockToken,
        now: Millis,
        cfg: &QueueConfig,
        out: &mut impl OutcomeSink,
    ) -> Result<(), SettleError> {
        self.settle(token, Settlement::Complete, now, cfg, out)
    }

    /// Returns the locked message to Enqueued and counts the abandon; at the configured maximum
    /// the message is dead-lettered as `DeliveryCountExceeded` instead.
    pub fn abandon(
        &mut self,
        token: LockToken,
        now: Millis,
        cfg: &QueueConfig,
        out: &mut impl OutcomeSink,
    ) -> Result<(), SettleError> {
        self.settle(token, Settlement::Abandon, now, cfg, out)
    }

    /// Dead-letters the locked message as `Rejected`.
    pub fn reject(
        &mut self,
        token: LockToken,
        now: Millis,
        cfg: &QueueConfig,
        out: &mut impl OutcomeSink,
    ) -> Result<(), SettleError> {
        self.settle(token, Settlement::Reject, now, cfg, out)
    }

    /// Returns the locked message to Enqueued without counting a delivery: the receiver went
    /// away before settling (an MQTT connection closed before PUBACK).
    pub fn release(
        &mut self,
        token: LockToken,
        now: Millis,
        cfg: &QueueConfig,
        out: &mut impl OutcomeSink,
    ) -> Result<(), SettleError> {
        self.settle(token, Settlement::Release, now, cfg, out)
    }

    /// Removes every pending message (`Purged` feedback if asked) and returns how many.
    pub fn purge(&mut self, now: Millis, _cfg: &QueueConfig, out: &mut impl OutcomeSink) -> usize {
        self.expire(now, out);
        let purged = self.entries.len();
        for entry in self.entries.drain(..) {
            report(&entry, FeedbackStatus::Purged, now, out);
        }
        self.release_if_empty();
        purged
    }

    /// Pending (non-final) messages after lazy expiry: IoT Hub's `cloudToDeviceMessageCount`.
    pub fn pending(&mut self, now: Millis, _cfg: &QueueConfig, out: &mut impl OutcomeSink) -> usize {
        self.expire(now, out);
        self.entries.len()
    }

    /// Messages still alive at `now` and the oldest one's enqueued time, without changing
    /// anything (no lazy expiry, no feedback): for read-only views such as the dashboard.
    pub fn live(&self, now: Millis) -> (usize, Option<Millis>) {
        let mut alive = self.entries.iter().filter(|e| e.expires_at > now);
        let oldest = alive.next().map(|e| e.enqueued_at);
        (oldest.map_or(0, |_| 1 + alive.count()), oldest)
    }

    /// Messages held, counting those that expired unnoticed (no lazy expiry): what the hub's
    /// queue-depth metric tracks, compared before and after each operation.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the queue holds nothing at all, not even messages that expired unnoticed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The earliest time at or after `now` when a receive would find a message, without changing
    /// anything: `Some(now)` when one is visible now, the earliest lock lapse of a message that
    /// will still be alive then, or `None` when nothing will become visible.
    pub fn next_visible_at(&self, now: Millis) -> Option<Millis> {
        self.entries
            .iter()
            .filter_map(|e| {
                let at = e.lock.map_or(now, |l| l.until.max(now));
                (e.expires_at > at).then_some(at)
            })
            .min()
    }

    /// The earliest expiry among pending messages: when an idle queue next owes `Expired`
    /// feedback, for a hub that wants to deliver it without waiting for the device.
    pub fn next_expiry(&self) -> Option<Millis> {
        self.entries.iter().map(|e| e.expires_at).min()
    }

    /// Drops the oldest pending message whatever its state (`Purged` feedback if asked); used to
    /// make room in a bounded queue that must not refuse new messages.
    pub(super) fn drop_oldest(&mut self, now: Millis, out: &mut impl OutcomeSink) -> bool {
        let dropped = self.entries.pop_front().map(|entry| report(&entry, FeedbackStatus::Purged, now, out));
        self.release_if_empty();
        dropped.is_some()
    }

    /// Frees the deque's buffer once it holds nothing (`VecDeque` never shrinks by itself).
    fn release_if_empty(&mut self) {
        if self.entries.is_empty() && self.entries.capacity() > 0 {
            self.entries = VecDeque::new();
        }
    }

    /// Dead-letters expired messages and unlocks lapsed locks; the lazy clock of the queue.
    fn expire(&mut self, now: Millis, out: &mut impl OutcomeSink) {
        self.entries.retain_mut(|entry| {
            if entry.expires_at <= now {
                report(entry, FeedbackStatus::Expired, entry.expires_at, out);
                return false;
            }
            if entry.lock.is_some_and(|l| l.until <= now) {
                entry.lock = None;
            }
            true
        });
        self.release_if_empty();
    }

    /// Applies one settlement to the message locked under `token`.
    pub fn settle(
        &mut self,
        token: LockToken,
        action: Settlement,
        now: Millis,
        cfg: &QueueConfig,
        out: &mut impl OutcomeSink,
    ) -> Result<(), SettleError> {
        self.expire(now, out);
        let index = self
            .entries
            .iter()
            .position(|e| e.lock.is_some_and(|l| l.token == token))
            .ok_or(SettleError::LockLost { token })?;
        let entry = &mut self.entries[index];
        entry.lock = None;
        let status = match action {
            Settlement::Complete => FeedbackStatus::Success,
            Settlement::Reject => FeedbackStatus::Rejected,
            Settlement::Release => return Ok(()),
            Settlement::Abandon => {
                out.abandoned();
                entry.delivery_count = entry.delivery_count.saturating_add(1);
                if entry.delivery_count < cfg.max_delivery_count {
                    return Ok(());
                }
                FeedbackStatus::DeliveryCountExceeded
            }
        };
        if let Some(entry) = self.entries.remove(index) {
            report(&entry, status, now, out);
        }
        self.release_if_empty();
        Ok(())
    }

    /// Whether `token` still locks a message at `now` (it was not settled, purged, expired or
    /// left to lapse).
    pub fn holds_lock(&self, token: LockToken, now: Millis) -> bool {
        self.entries
            .iter()
            .any(|e| e.expires_at > now && e.lock.is_some_and(|l| l.token == token && l.until > now))
    }

    /// The last sequence number handed out (0: none yet).
    pub fn last_sequence(&self) -> u64 {
        self.last_sequence
    }

    /// `(sequence, delivery count)` of every pending entry, in order: what the durable hub
    /// compares before and after an operation to know which records to write.
    pub fn states(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.entries.iter().map(|e| (e.sequence_number, e.delivery_count))
    }

    /// Every pending entry as the durable hub stores it (no lock: locks are not stored).
    pub fn stored(&self) -> impl Iterator<Item = StoredEntry<'_>> + '_ {
        self.entries.iter().map(|e| StoredEntry {
            message: &e.message,
            sequence_number: e.sequence_number,
            enqueued_at: e.enqueued_at,
            expires_at: e.expires_at,
            delivery_count: e.delivery_count,
        })
    }

    /// The stored form of the entry with `sequence`, if pending.
    pub fn stored_entry(&self, sequence: u64) -> Option<StoredEntry<'_>> {
        self.stored().find(|e| e.sequence_number == sequence)
    }

    /// Recovery: puts a stored entry back (unlocked), in sequence order; an entry already there
    /// is left as it is (records are replayed idempotently).
    pub fn restore(
        &mut self,
        message: C2dMessage,
        sequence_number: u64,
        enqueued_at: Millis,
        expires_at: Millis,
        delivery_count: u32,
    ) {
        self.last_sequence = self.last_sequence.max(sequence_number);
        let at = self.entries.partition_point(|e| e.sequence_number < sequence_number);
        if self.entries.get(at).is_some_and(|e| e.sequence_number == sequence_number) {
            return;
        }
        self.entries.insert(
            at,
            Entry {
                message: Arc::new(message),
                sequence_number,
                enqueued_at,
                expires_at,
                delivery_count,
                lock: None,
            },
        );
    }

    /// Recovery: removes the entry with `sequence`, if there.
    pub fn restore_removed(&mut self, sequence: u64) {
        self.last_sequence = self.last_sequence.max(sequence);
        self.entries.retain(|e| e.sequence_number != sequence);
        self.release_if_empty();
    }

    /// Recovery: sets the delivery count of the entry with `sequence`, if there.
    pub fn restore_delivery_count(&mut self, sequence: u64, delivery_count: u32) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.sequence_number == sequence) {
            e.delivery_count = delivery_count;
        }
    }

    /// Recovery: sequence numbers up to `last` were handed out.
    pub fn restore_last_sequence(&mut self, last: u64) {
        self.last_sequence = self.last_sequence.max(last);
    }

    /// Every entry as `(sequence, delivery count, lock, expiry)`, for the model test.
    #[cfg(test)]
    pub(super) fn snapshot(&self) -> Vec<EntrySnapshot> {
        self.entries
            .iter()
            .map(|e| {
                let lock = e.lock.map(|l| (l.token, l.until));
                (e.sequence_number, e.delivery_count, lock, e.expires_at)
            })
            .collect()
    }
}

/// One entry as the model test sees it: `(sequence, delivery count, lock, expiry)`.
#[cfg(test)]
pub(super) type EntrySnapshot = (u64, u32, Option<(LockToken, Millis)>, Millis);

/// Tells `out` that `entry` ended with `status` at `at`.
fn report(entry: &Entry, status: FeedbackStatus, at: Millis, out: &mut impl OutcomeSink) {
    out.finished(&entry.message, status, at);
}

#[cfg(test)]
mod tests {
    use super::super::{AckMode, Outcome};
    use super::*;

    const T0: Millis = 1_700_000_000_000;

    fn msg(id: &str, ack: AckMode) -> C2dMessage {
        C2dMessage { message_id: Some(id.into()), ack, ..Default::default() }
    }

    fn outcome(id: &str, at: Millis, status: FeedbackStatus) -> Outcome {
        Outcome { message_id: Some(id.into()), enqueued_at: at, status }
    }

    #[test]
    fn a_queue_emptied_by_settling_holds_no_buffer() {
        let cfg = QueueConfig::default();
        let mut q = DeviceQueue::new();
        let mut out = Vec::new();
        q.send(msg("a", AckMode::None), T0, &cfg, &mut out).unwrap();
        let d = q.receive(T0, 60_000, LockToken(1), &cfg, &mut out).unwrap();
        assert!(q.entries.capacity() > 0);
        q.complete(d.lock_token, T0, &cfg, &mut out).unwrap();
        assert_eq!(q.entries.capacity(), 0, "a delivered message's slot is given back");
    }

    #[test]
    fn empty_queue_is_small() {
        assert!(std::mem::size_of::<DeviceQueue>() <= 40);
    }

    #[test]
    fn a_token_is_made_only_when_a_message_is_locked() {
        let (cfg, mut out, mut q) = (QueueConfig::default(), Vec::new(), DeviceQueue::new());
        let none = q.receive_with(T0, 60_000, || panic!("no token for an empty queue"), &cfg, &mut out);
        assert!(none.is_none());
        q.send(msg("a", AckMode::None), T0, &cfg, &mut out).unwrap();
        let d = q.receive_with(T0, 60_000, || LockToken(7), &cfg, &mut out).unwrap();
        assert_eq!(d.lock_token, LockToken(7));
        let locked = q.receive_with(T0, 60_000, || panic!("no token when all are locked"), &cfg, &mut out);
        assert!(locked.is_none());
    }

    #[test]
    fn fifo_lock_complete_with_feedback() {
        let (cfg, mut out, mut q) = (QueueConfig::default(), Vec::new(), DeviceQueue::new());
        let r1 = q.send(msg("a", AckMode::Positive), T0, &cfg, &mut out).unwrap();
        let r2 = q.send(msg("b", AckMode::None), T0, &cfg, &mut out).unwrap();
        assert_eq!((r1.sequence_number, r2.sequence_number), (1, 2));
        assert_eq!(r1.expires_at, T0 + cfg.default_ttl_ms);
        let d = q.receive(T0, 60_000, LockToken(1), &cfg, &mut out).unwrap();
        assert_eq!(d.sequence_number, 1);
        assert_eq!(d.locked_until, T0 + 60_000);
        assert_eq!(q.receive(T0, 60_000, LockToken(2), &cfg, &mut out).unwrap().sequence_number, 2);
        assert!(q.receive(T0, 60_000, LockToken(3), &cfg, &mut out).is_none());
        q.complete(LockToken(1), T0 + 5, &cfg, &mut out).unwrap();
        assert_eq!(out, vec![outcome("a", T0 + 5, FeedbackStatus::Success)]);
        assert_eq!(
            q.complete(LockToken(1), T0 + 6, &cfg, &mut out),
            Err(SettleError::LockLost { token: LockToken(1) })
        );
        assert_eq!(q.pending(T0 + 6, &cfg, &mut out), 1);
    }

    #[test]
    fn lapsed_lock_returns_message_without_counting() {
        let (cfg, mut out, mut q) = (QueueConfig::default(), Vec::new(), DeviceQueue::new());
        q.send(msg("a", AckMode::Full), T0, &cfg, &mut out).unwrap();
        q.receive(T0, 1000, LockToken(1), &cfg, &mut out).unwrap();
        assert_eq!(q.next_visible_at(T0), Some(T0 + 1000));
        let d = q.receive(T0 + 1000, 1000, LockToken(2), &cfg, &mut out).unwrap();
        assert_eq!(d.delivery_count, 0);
        assert!(q.complete(LockToken(1), T0 + 1001, &cfg, &mut out).is_err());
        q.release(LockToken(2), T0 + 1001, &cfg, &mut out).unwrap();
        assert_eq!(q.receive(T0 + 1002, 1000, LockToken(3), &cfg, &mut out).unwrap().delivery_count, 0);
        assert!(out.is_empty());
    }

    #[test]
    fn abandon_counts_until_dead_lettered() {
        let cfg = QueueConfig { max_delivery_count: 2, ..Default::default() };
        let (mut out, mut q) = (Vec::new(), DeviceQueue::new());
        q.send(msg("a", AckMode::Negative), T0, &cfg, &mut out).unwrap();
        q.receive(T0, 1000, LockToken(1), &cfg, &mut out).unwrap();
        q.abandon(LockToken(1), T0, &cfg, &mut out).unwrap();
        let d = q.receive(T0, 1000, LockToken(2), &cfg, &mut out).unwrap();
        assert_eq!(d.delivery_count, 1);
        q.abandon(LockToken(2), T0 + 7, &cfg, &mut out).unwrap();
        assert!(q.is_empty());
        assert_eq!(out, vec![outcome("a", T0 + 7, FeedbackStatus::DeliveryCountExceeded)]);
    }

    #[test]
    fn reject_and_purge_dead_letter() {
        let (cfg, mut out, mut q) = (QueueConfig::default(), Vec::new(), DeviceQueue::new());
        q.send(msg("a", AckMode::Full), T0, &cfg, &mut out).unwrap();
        q.send(msg("b", AckMode::Positive), T0, &cfg, &mut out).unwrap();
        q.send(msg("c", AckMode::Negative), T0, &cfg, &mut out).unwrap();
        q.receive(T0, 1000, LockToken(1), &cfg, &mut out).unwrap();
        q.reject(LockToken(1), T0 + 1, &cfg, &mut out).unwrap();
        q.receive(T0, 1000, LockToken(2), &cfg, &mut out).unwrap();
        assert_eq!(q.purge(T0 + 2, &cfg, &mut out), 2);
        assert!(q.complete(LockToken(2), T0 + 3, &cfg, &mut out).is_err());
        let expect = vec![
            outcome("a", T0 + 1, FeedbackStatus::Rejected),
            outcome("c", T0 + 2, FeedbackStatus::Purged),
        ];
        assert_eq!(out, expect);
    }

    #[test]
    fn expiry_is_lazy_and_dead_letters_locked_messages() {
        let (cfg, mut out, mut q) = (QueueConfig::default(), Vec::new(), DeviceQueue::new());
        let past = C2dMessage { expiry: Some(T0 - 1), ..msg("old", AckMode::Negative) };
        q.send(past, T0, &cfg, &mut out).unwrap();
        assert_eq!((q.next_expiry(), q.is_empty()), (Some(T0 - 1), false));
        let soon = C2dMessage { expiry: Some(T0 + 500), ..msg("soon", AckMode::Full) };
        q.send(soon, T0, &cfg, &mut out).unwrap();
        assert_eq!(q.next_expiry(), Some(T0 + 500));
        let d = q.receive(T0, 60_000, LockToken(9), &cfg, &mut out).unwrap();
        assert_eq!(d.message.message_id.as_deref(), Some("soon"));
        assert_eq!(q.next_visible_at(T0), None);
        assert_eq!(q.pending(T0 + 500, &cfg, &mut out), 0);
        let expect = vec![
            outcome("old", T0 - 1, FeedbackStatus::Expired),
            outcome("soon", T0 + 500, FeedbackStatus::Expired),
        ];
        assert_eq!(out, expect);
    }

    #[test]
    fn send_limits() {
        let (cfg, mut out, mut q) = (QueueConfig::default(), Vec::new(), DeviceQueue::new());
        let far = C2dMessage { expiry: Some(T0 + cfg.max_ttl_ms + 1), ..Default::default() };
        let err = q.send(far, T0, &cfg, &mut out).unwrap_err();
        assert!(matches!(err, SendError::InvalidExpiry { .. }));
        let big = C2dMessage { body: vec![0; cfg.max_message_bytes + 1].into(), ..Default::default() };
        let err = q.send(big, T0, &cfg, &mut out).unwrap_err();
        assert_eq!(err, SendError::TooLarge { size: cfg.max_message_bytes + 1, max: cfg.max_message_bytes });
        for i in 0..cfg.max_depth {
            let r = q.send(C2dMessage::default(), T0, &cfg, &mut out).unwrap();
            assert_eq!(r.sequence_number, i as u64 + 1);
        }
        let err = q.send(C2dMessage::default(), T0, &cfg, &mut out).unwrap_err();
        assert_eq!(err, SendError::QueueFull { depth: 50 });
        q.purge(T0, &cfg, &mut out);
        let r = q.send(C2dMessage::default(), T0, &cfg, &mut out).unwrap();
        assert_eq!(r.sequence_number, 51);
    }
}
