//! The hub-wide feedback channel (`/messages/serviceBound/feedback`, reference §3.4): records of
//! final C2D outcomes, batched into feedback messages and queued for the service to receive.
//!
//! Batching is lazy like everything else in [`super`]: a batch is cut when 64 records are
//! pending, or on any call once the batch interval has passed since the last cut. There is no
//! timer; [`FeedbackHub::next_due`] tells one hub-wide waker when to come back. Batches live in a
//! [`DeviceQueue`] with the feedback TTL, lock and delivery-count settings, so they get the same
//! lock / complete / abandon semantics as device messages.

use bytes::Bytes;
use serde_json::{Value, json};

use super::{
    C2dMessage, Delivery, DeviceQueue, FeedbackStatus, LockToken, Outcome, QueueConfig, SettleError,
};
use crate::clock::{self, Millis};
use crate::limits;

/// Content type of every feedback message.
pub const FEEDBACK_CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.feedback.json";

/// One feedback record: how one C2D message ended, on which device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackRecord {
    /// The original message's `message-id`.
    pub original_message_id: Option<String>,
    /// When the outcome happened ([`Outcome::enqueued_at`]).
    pub enqueued_at: Millis,
    /// How the message ended.
    pub status: FeedbackStatus,
    /// The device the message was sent to.
    pub device_id: String,
    /// That device's generation id, so a re-created device's feedback is told apart.
    pub device_generation_id: String,
}

impl FeedbackRecord {
    /// A record for `outcome` on the given device.
    pub fn from_outcome(outcome: Outcome, device_id: &str, device_generation_id: &str) -> Self {
        Self {
            original_message_id: outcome.message_id,
            enqueued_at: outcome.enqueued_at,
            status: outcome.status,
            device_id: device_id.to_owned(),
            device_generation_id: device_generation_id.to_owned(),
        }
    }

    /// The record as IoT Hub serialises it in a feedback body.
    pub fn to_json(&self) -> Value {
        json!({
            "originalMessageId": self.original_message_id,
            "enqueuedTimeUtc": clock::iso8601(self.enqueued_at),
            "statusCode": self.status.as_str(),
            "description": self.status.description(),
            "deviceId": self.device_id,
            "deviceGenerationId": self.device_generation_id,
        })
    }
}

/// The feedback queue's settings: feedback TTL and delivery count (reference §3.2), a bound on
/// kept batches, and no size limit (a batch of 64 records is always accepted).
fn feedback_config() -> QueueConfig {
    QueueConfig {
        max_depth: limits::FEEDBACK_MAX_PENDING_BATCHES,
        default_ttl_ms: limits::FEEDBACK_TTL_MS,
        max_ttl_ms: limits::FEEDBACK_TTL_MS,
        max_delivery_count: limits::FEEDBACK_MAX_DELIVERY_COUNT,
        max_message_bytes: usize::MAX,
    }
}

/// Pending feedback records and the queue of feedback batches, for the whole hub.
#[derive(Debug, Clone)]
pub struct FeedbackHub {
    /// Minimum time between two batch cuts while fewer than 64 records are pending.
    batch_interval_ms: u64,
    hub_name: String,
    config: QueueConfig,
    pending: Vec<FeedbackRecord>,
    /// The serial of `pending[0]` in the hub's stream of records (for the durable hub's records).
    pending_base: u64,
    last_cut: Option<Millis>,
    batches: DeviceQueue,
    dropped_batches: u64,
}

impl FeedbackHub {
    /// An empty feedback channel; batches carry `hub_name` as their user id.
    pub fn new(hub_name: impl Into<String>) -> Self {
        Self {
            batch_interval_ms: limits::FEEDBACK_BATCH_INTERVAL_MS,
            hub_name: hub_name.into(),
            config: feedback_config(),
            pending: Vec::new(),
            pending_base: 0,
            last_cut: None,
            batches: DeviceQueue::new(),
            dropped_batches: 0,
        }
    }

    /// Changes the batch interval (IoT Hub: 15 s); tests and the CLI shorten it.
    pub fn set_batch_interval_ms(&mut self, ms: u64) {
        self.batch_interval_ms = ms;
    }

    /// The batch interval in force.
    pub fn batch_interval_ms(&self) -> u64 {
        self.batch_interval_ms
    }

    /// Adds a record; it goes out with the next batch cut (at once if none was cut recently).
    pub fn push(&mut self, record: FeedbackRecord, now: Millis) {
        self.pending.push(record);
        self.cut_due(now);
    }

    /// Locks the oldest available batch for the feedback lock duration.
    pub fn receive(&mut self, now: Millis, token: LockToken) -> Option<Delivery> {
        self.receive_with(now, || token)
    }

    /// [`Self::receive`] with the token made only when a batch is there to lock.
    pub fn receive_with(&mut self, now: Millis, token: impl FnOnce() -> LockToken) -> Option<Delivery> {
        self.cut_due(now);
        let lock_ms = limits::FEEDBACK_LOCK_MS;
        self.batches.receive_with(now, lock_ms, token, &self.config, &mut Vec::new())
    }

    /// Completes (removes) the batch locked under `token`.
    pub fn complete(&mut self, token: LockToken, now: Millis) -> Result<(), SettleError> {
        self.batches.complete(token, now, &self.config, &mut Vec::new())
    }

    /// Returns the batch locked under `token` for redelivery, counting a delivery.
    pub fn abandon(&mut self, token: LockToken, now: Millis) -> Result<(), SettleError> {
        self.batches.abandon(token, now, &self.config, &mut Vec::new())
    }

    /// Drops the batch locked under `token`.
    pub fn reject(&mut self, token: LockToken, now: Millis) -> Result<(), SettleError> {
        self.batches.reject(token, now, &self.config, &mut Vec::new())
    }

    /// Whether a receive would find a batch now, cutting one first if due.
    pub fn has_ready(&mut self, now: Millis) -> bool {
        self.cut_due(now);
        self.batches.next_visible_at(now).is_some_and(|at| at <= now)
    }

    /// When the pending records will be cut into a batch, or `None` when none are pending.
    pub fn next_due(&self, now: Millis) -> Option<Millis> {
        if self.pending.is_empty() {
            return None;
        }
        let due = self.last_cut.map_or(now, |t| t.saturating_add(self.batch_interval_ms));
        Some(due.max(now))
    }

    /// Batches dropped unread because [`limits::FEEDBACK_MAX_PENDING_BATCHES`] were queued.
    pub fn dropped_batches(&self) -> u64 {
        self.dropped_batches
    }

    /// Records waiting for the next cut.
    pub fn pending_records(&self) -> usize {
        self.pending.len()
    }

    /// The serial the next pushed record gets (records are numbered from 0 in push order).
    pub fn next_serial(&self) -> u64 {
        self.pending_base + self.pending.len() as u64
    }

    /// The serial of the first record still pending.
    pub fn pending_base(&self) -> u64 {
        self.pending_base
    }

    /// The records waiting for the next cut, oldest first.
    pub fn pending_list(&self) -> &[FeedbackRecord] {
        &self.pending
    }

    /// The queue of cut batches.
    pub fn batches(&self) -> &DeviceQueue {
        &self.batches
    }

    /// Recovery: the queue of cut batches, to restore entries into.
    pub fn batches_mut(&mut self) -> &mut DeviceQueue {
        &mut self.batches
    }

    /// Recovery: the record with `serial` is pending (ignored when it was cut or is there).
    pub fn restore_pushed(&mut self, serial: u64, record: FeedbackRecord) {
        if serial < self.next_serial() {
            return;
        }
        if self.pending.is_empty() {
            self.pending_base = serial;
        }
        self.pending.push(record);
    }

    /// Recovery: the records before `next` were cut into batches.
    pub fn restore_cut(&mut self, next: u64) {
        let k = next.saturating_sub(self.pending_base).min(self.pending.len() as u64) as usize;
        self.pending.drain(..k);
        self.pending_base = self.pending_base.max(next);
    }

    /// Cuts full batches, then a partial one if the interval has passed.
    fn cut_due(&mut self, now: Millis) {
        while self.pending.len() >= limits::FEEDBACK_MAX_BATCH_RECORDS {
            let rest = self.pending.split_off(limits::FEEDBACK_MAX_BATCH_RECORDS);
            let batch = std::mem::replace(&mut self.pending, rest);
            self.pending_base += batch.len() as u64;
            self.enqueue(batch, now);
        }
        let interval_passed = self.last_cut.is_none_or(|t| now.saturating_sub(t) >= self.batch_interval_ms);
        if !self.pending.is_empty() && interval_passed {
            let batch = std::mem::take(&mut self.pending);
            self.pending_base += batch.len() as u64;
            self.enqueue(batch, now);
        }
    }

    /// Queues one batch as a feedback message, dropping the oldest batch if the queue is full.
    fn enqueue(&mut self, records: Vec<FeedbackRecord>, now: Millis) {
        self.last_cut = Some(now);
        let body = Value::Array(records.iter().map(FeedbackRecord::to_json).collect()).to_string();
        let msg = C2dMessage {
            user_id: Some(self.hub_name.clone()),
            content_type: Some(FEEDBACK_CONTENT_TYPE.to_owned()),
            body: Bytes::from(body),
            ..Default::default()
        };
        let mut sink = Vec::new();
        if self.batches.pending(now, &self.config, &mut sink) >= self.config.max_depth
            && self.batches.drop_oldest(now, &mut sink)
        {
            self.dropped_batches += 1;
        }
        // With room made and no size or expiry limit, the send cannot be refused; count it if it is.
        if self.batches.send(msg, now, &self.config, &mut sink).is_err() {
            self.dropped_batches += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_438_100_688_789;

    fn record(id: usize, now: Millis) -> FeedbackRecord {
        let outcome =
            Outcome { message_id: Some(format!("m{id}")), enqueued_at: now, status: FeedbackStatus::Success };
        FeedbackRecord::from_outcome(outcome, "dev", "gen")
    }

    fn body(d: &Delivery) -> Vec<Value> {
        match serde_json::from_slice(&d.message.body).unwrap() {
            Value::Array(items) => items,
            other => panic!("not an array: {other}"),
        }
    }

    #[test]
    fn record_json_matches_iot_hub() {
        let r = FeedbackRecord {
            original_message_id: Some("0987654321".into()),
            enqueued_at: T0,
            status: FeedbackStatus::Success,
            device_id: "123".into(),
            device_generation_id: "abcdefghijklmnopqrstuvwxyz".into(),
        };
        let expect = r#"{"originalMessageId":"0987654321","enqueuedTimeUtc":"2015-07-28T16:24:48.789Z","statusCode":"Success","description":"Success","deviceId":"123","deviceGenerationId":"abcdefghijklmnopqrstuvwxyz"}"#;
        assert_eq!(r.to_json().to_string(), expect);
    }

    #[test]
    fn first_record_goes_out_at_once_then_batches_by_interval() {
        let mut hub = FeedbackHub::new("myhub");
        assert_eq!((hub.batch_interval_ms(), hub.next_due(T0)), (15_000, None));
        hub.push(record(0, T0), T0);
        assert!(hub.has_ready(T0));
        let d = hub.receive(T0, LockToken(1)).unwrap();
        assert_eq!(d.message.user_id.as_deref(), Some("myhub"));
        assert_eq!(d.message.content_type.as_deref(), Some(FEEDBACK_CONTENT_TYPE));
        assert_eq!(d.locked_until, T0 + limits::FEEDBACK_LOCK_MS);
        assert_eq!(body(&d).len(), 1);
        hub.complete(LockToken(1), T0).unwrap();
        hub.push(record(1, T0 + 1000), T0 + 1000);
        hub.push(record(2, T0 + 2000), T0 + 2000);
        assert!(!hub.has_ready(T0 + 14_999));
        assert_eq!(hub.next_due(T0 + 2000), Some(T0 + 15_000));
        assert!(hub.has_ready(T0 + 15_000));
        assert_eq!(hub.next_due(T0 + 15_000), None);
        let d = hub.receive(T0 + 15_000, LockToken(2)).unwrap();
        assert_eq!(body(&d)[1]["originalMessageId"], "m2");
    }

    #[test]
    fn sixty_four_records_cut_a_batch_immediately() {
        let mut hub = FeedbackHub::new("h");
        hub.push(record(0, T0), T0);
        for i in 1..=64 {
            hub.push(record(i, T0 + 1), T0 + 1);
        }
        assert_eq!(hub.pending_records(), 0);
        let first = hub.receive(T0 + 1, LockToken(1)).unwrap();
        let second = hub.receive(T0 + 1, LockToken(2)).unwrap();
        assert_eq!((body(&first).len(), body(&second).len()), (1, 64));
        assert!(hub.receive(T0 + 1, LockToken(3)).is_none());
    }

    #[test]
    fn settling_follows_queue_rules() {
        let mut hub = FeedbackHub::new("h");
        hub.set_batch_interval_ms(0);
        hub.push(record(0, T0), T0);
        hub.receive(T0, LockToken(1)).unwrap();
        assert!(!hub.has_ready(T0 + 1));
        hub.abandon(LockToken(1), T0 + 1).unwrap();
        let d = hub.receive(T0 + 2, LockToken(2)).unwrap();
        assert_eq!(d.delivery_count, 1);
        hub.reject(LockToken(2), T0 + 3).unwrap();
        assert!(hub.complete(LockToken(2), T0 + 4).is_err());
        assert!(!hub.has_ready(T0 + 5));
    }

    #[test]
    fn batches_expire_after_feedback_ttl() {
        let mut hub = FeedbackHub::new("h");
        hub.push(record(0, T0), T0);
        assert!(hub.has_ready(T0 + limits::FEEDBACK_TTL_MS - 1));
        assert!(!hub.has_ready(T0 + limits::FEEDBACK_TTL_MS));
    }

    #[test]
    fn full_queue_drops_oldest_batch() {
        let mut hub = FeedbackHub::new("h");
        hub.set_batch_interval_ms(0);
        hub.config.max_depth = 2;
        for i in 0..3 {
            hub.push(record(i, T0), T0);
        }
        assert_eq!(hub.dropped_batches(), 1);
        let d = hub.receive(T0, LockToken(1)).unwrap();
        assert_eq!(body(&d)[0]["originalMessageId"], "m1");
    }
}
