//! Device-to-cloud telemetry the hub received, kept in one bounded, hub-wide ring so tests and tools
//! can read what devices sent (the real hub forwards it to Event Hubs; the emulator keeps the most
//! recent [`TELEMETRY_BUFFER_MESSAGES`] instead). Owned by [`Hub`] behind its own mutex.

use std::collections::VecDeque;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::clock::{Millis, iso8601};
use crate::limits::TELEMETRY_BUFFER_MESSAGES;

use super::Hub;

/// One D2C message as received.
#[derive(Debug, Clone)]
pub struct D2cMessage {
    /// Hub-wide sequence number, increasing; readers resume after the last one they saw.
    pub sequence: u64,
    /// The sending device (`iothub-connection-device-id`).
    pub device_id: String,
    /// When the hub received it.
    pub enqueued_at: Millis,
    /// System properties (`message-id`, `content-type`, …) by IoT Hub name.
    pub system_properties: Vec<(String, String)>,
    /// Application properties.
    pub properties: Vec<(String, String)>,
    /// The payload.
    pub body: Bytes,
}

impl D2cMessage {
    /// JSON for the read API: the body as text when it is UTF-8, else base64 with `bodyEncoding`.
    pub fn to_json(&self) -> Value {
        let (body, encoding) = match std::str::from_utf8(&self.body) {
            Ok(s) => (Value::String(s.to_string()), "utf-8"),
            Err(_) => (Value::String(B64.encode(&self.body)), "base64"),
        };
        let map = |v: &[(String, String)]| {
            Value::Object(v.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect())
        };
        json!({
            "sequenceNumber": self.sequence,
            "deviceId": self.device_id,
            "enqueuedTimeUtc": iso8601(self.enqueued_at),
            "systemProperties": map(&self.system_properties),
            "properties": map(&self.properties),
            "body": body,
            "bodyEncoding": encoding,
        })
    }
}

/// The ring of recent D2C messages.
#[derive(Debug)]
pub struct TelemetryLog {
    ring: VecDeque<D2cMessage>,
    capacity: usize,
    last_sequence: u64,
}

impl Default for TelemetryLog {
    fn default() -> Self {
        Self { ring: VecDeque::new(), capacity: TELEMETRY_BUFFER_MESSAGES, last_sequence: 0 }
    }
}

impl TelemetryLog {
    /// A log keeping the last `capacity` messages (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), ..Self::default() }
    }

    fn push(&mut self, mut msg: D2cMessage) -> u64 {
        self.last_sequence += 1;
        msg.sequence = self.last_sequence;
        if self.ring.len() == self.capacity {
            self.ring.pop_front();
        }
        self.ring.push_back(msg);
        self.last_sequence
    }

    /// The last sequence number handed out (0 before the first message).
    fn last_sequence(&self) -> u64 {
        self.last_sequence
    }

    /// Up to `limit` of the newest messages (from `device_id` only, if given), newest first.
    fn newest<T>(&self, device_id: Option<&str>, limit: usize, f: impl FnMut(&D2cMessage) -> T) -> Vec<T> {
        self.ring
            .iter()
            .rev()
            .filter(|m| device_id.is_none_or(|d| d == m.device_id))
            .take(limit)
            .map(f)
            .collect()
    }

    fn read<T>(
        &self,
        device_id: Option<&str>,
        after: u64,
        limit: usize,
        f: impl FnMut(&D2cMessage) -> T,
    ) -> Vec<T> {
        // Sequence numbers in the ring are consecutive: start at `after`'s successor directly.
        let skip =
            self.ring.front().map_or(0, |m| after.saturating_add(1).saturating_sub(m.sequence) as usize);
        self.ring
            .iter()
            .skip(skip)
            .filter(|m| m.sequence > after && device_id.is_none_or(|d| d == m.device_id))
            .take(limit)
            .map(f)
            .collect()
    }
}

impl Hub {
    /// Records a D2C message from `msg.device_id` and wakes long-polling readers; returns its
    /// sequence number.
    pub fn record_telemetry(&self, msg: D2cMessage) -> u64 {
        let now = self.now();
        let _ = self.with_device(&msg.device_id, |d| {
            d.last_activity = now;
            Ok(())
        });
        let sequence = self.telemetry_log().push(D2cMessage { enqueued_at: now, ..msg });
        // Wakes `/emulator/telemetry?waitMs=` readers.
        self.shared.changed.notify_waiters();
        sequence
    }

    /// Up to `limit` recorded messages with a sequence number above `after`, optionally only
    /// from `device_id`, oldest first.
    pub fn read_telemetry(&self, device_id: Option<&str>, after: u64, limit: usize) -> Vec<D2cMessage> {
        self.telemetry_log().read(device_id, after, limit, D2cMessage::clone)
    }

    /// Up to `limit` of the newest recorded messages (only `device_id`'s, if given), newest first,
    /// each passed through `f` under the log's lock. Scans the ring from its end: with a device
    /// filter, a device that sent nothing recently costs one pass over the ring.
    pub fn newest_telemetry<T>(
        &self,
        device_id: Option<&str>,
        limit: usize,
        f: impl FnMut(&D2cMessage) -> T,
    ) -> Vec<T> {
        self.telemetry_log().newest(device_id, limit, f)
    }

    /// Messages recorded since the hub started (the last sequence number handed out).
    pub fn telemetry_received(&self) -> u64 {
        self.telemetry_log().last_sequence()
    }

    /// [`Self::read_telemetry`] handing each message to `f` instead of cloning it all (a reader
    /// that wants a few fields of many messages); `f` runs under the log's lock: keep it short.
    pub fn read_telemetry_with<T>(
        &self,
        after: u64,
        limit: usize,
        f: impl FnMut(&D2cMessage) -> T,
    ) -> Vec<T> {
        self.telemetry_log().read(None, after, limit, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(dev: &str) -> D2cMessage {
        D2cMessage {
            sequence: 0,
            device_id: dev.into(),
            enqueued_at: 0,
            system_properties: vec![],
            properties: vec![],
            body: Bytes::from_static(b"x"),
        }
    }

    #[test]
    fn ring_is_bounded_and_filtered() {
        let mut log = TelemetryLog { capacity: 3, ..Default::default() };
        for d in ["a", "b", "a", "a"] {
            log.push(msg(d));
        }
        let all = log.read(None, 0, 10, D2cMessage::clone);
        assert_eq!(all.iter().map(|m| m.sequence).collect::<Vec<_>>(), vec![2, 3, 4]);
        let a = log.read(Some("a"), 2, 10, D2cMessage::clone);
        assert_eq!(a.iter().map(|m| m.sequence).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(log.read(None, 0, 1, D2cMessage::clone).len(), 1);
        assert_eq!(log.read(None, 3, 10, |m| m.sequence), [4], "starts after `after`");
    }
}
