//! Cloud-to-device messaging as a sans-IO state machine: per-device queues ([`DeviceQueue`]) and
//! the hub-wide feedback channel ([`FeedbackHub`]).
//!
//! Nothing here reads a clock, spawns a task or touches a socket. Every operation takes `now`
//! ([`Millis`]) and, where a lock is taken, the caller's [`LockToken`]; expiry and lock lapses are
//! applied lazily on the next access (reference §3.1). That keeps per-device state to a few words,
//! makes a million idle queues free, and makes every behaviour testable by moving numbers forward.
//! Final states the sender asked to hear about come back as [`Outcome`]s pushed into a
//! caller-supplied `Vec`, which the hub turns into [`FeedbackRecord`]s.

mod feedback;
#[cfg(test)]
mod model_tests;
mod queue;

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

use crate::clock::Millis;
use crate::limits;

pub use feedback::{FEEDBACK_CONTENT_TYPE, FeedbackHub, FeedbackRecord};
pub use queue::{Delivery, DeviceQueue, SendReceipt, Settlement, StoredEntry};

/// The lock token of one delivery: the HTTP `ETag`, the AMQP `x-opt-lock-token`.
///
/// Chosen by the caller (usually a random UUID) so this module stays deterministic. It is shown
/// and parsed as a hyphenated UUID, which is what SDKs expect to echo back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LockToken(pub u128);

impl LockToken {
    /// A fresh random token (UUID v4), from the thread's user-space CSPRNG (`rand`'s, seeded from
    /// the OS): `Uuid::new_v4` makes a `getrandom` system call per token, one per C2D delivery.
    pub fn random() -> Self {
        Self(uuid::Builder::from_random_bytes(rand::random()).into_uuid().as_u128())
    }
}

impl fmt::Display for LockToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        uuid::Uuid::from_u128(self.0).hyphenated().fmt(f)
    }
}

/// A lock token string that is not a UUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lock token {token:?} is not a UUID")]
pub struct LockTokenParseError {
    /// The rejected input.
    pub token: String,
}

impl FromStr for LockToken {
    type Err = LockTokenParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim().trim_matches('"');
        uuid::Uuid::parse_str(trimmed)
            .map(|u| Self(u.as_u128()))
            .map_err(|_| LockTokenParseError { token: s.to_owned() })
    }
}

/// Which final states the sender wants feedback for (`iothub-ack`, reference §3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AckMode {
    /// No feedback (the default).
    #[default]
    None,
    /// Feedback when the device completes the message.
    Positive,
    /// Feedback when the message is dead-lettered or purged.
    Negative,
    /// Both.
    Full,
}

impl AckMode {
    /// Parses an `iothub-ack` value, ignoring case.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::None, Self::Positive, Self::Negative, Self::Full]
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s.trim()))
    }

    /// The wire value (`none`, `positive`, `negative`, `full`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Positive => "positive",
            Self::Negative => "negative",
            Self::Full => "full",
        }
    }

    /// Whether a message with this ack mode produces feedback when it ends with `status`.
    pub fn wants(self, status: FeedbackStatus) -> bool {
        let positive = status == FeedbackStatus::Success;
        match self {
            Self::None => false,
            Self::Positive => positive,
            Self::Negative => !positive,
            Self::Full => true,
        }
    }
}

/// One cloud-to-device message as the service sent it. The hub adds sequence number, enqueued
/// time, delivery count and lock token per delivery (see [`Delivery`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct C2dMessage {
    /// `message-id`; feedback can only be correlated when it is set.
    pub message_id: Option<String>,
    /// `correlation-id`.
    pub correlation_id: Option<String>,
    /// `user-id`.
    pub user_id: Option<String>,
    /// `content-type`.
    pub content_type: Option<String>,
    /// `content-encoding`.
    pub content_encoding: Option<String>,
    /// `iothub-ack`.
    pub ack: AckMode,
    /// Absolute expiry the sender asked for; `None` means the hub's default TTL.
    pub expiry: Option<Millis>,
    /// Application properties in the order the sender gave them.
    pub properties: Vec<(String, String)>,
    /// The payload.
    pub body: Bytes,
}

impl C2dMessage {
    /// Size as IoT Hub counts it for the 64 KB limit (reference §3.3): body, plus the values of
    /// the string system properties, plus application property names and values. The fixed-size
    /// system properties (`ack`, `expiry`) are not counted.
    pub fn size_bytes(&self) -> usize {
        let system: usize = [
            &self.message_id,
            &self.correlation_id,
            &self.user_id,
            &self.content_type,
            &self.content_encoding,
        ]
        .into_iter()
        .map(|v| v.as_ref().map_or(0, String::len))
        .sum();
        let app: usize = self.properties.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.body.len() + system + app
    }
}

/// Hub-wide C2D settings (reference §3.2). Passed by reference into every queue operation so a
/// device queue does not carry a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// Non-final messages a queue may hold; the next send fails with `QueueFull`.
    pub max_depth: usize,
    /// TTL of a message that does not ask for an expiry.
    pub default_ttl_ms: u64,
    /// How far in the future an explicit expiry may lie.
    pub max_ttl_ms: u64,
    /// Abandons after which a message is dead-lettered as `DeliveryCountExceeded`.
    pub max_delivery_count: u32,
    /// Largest message ([`C2dMessage::size_bytes`]).
    pub max_message_bytes: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_depth: limits::C2D_MAX_QUEUE_DEPTH,
            default_ttl_ms: limits::C2D_DEFAULT_TTL_MS,
            max_ttl_ms: limits::C2D_MAX_TTL_MS,
            max_delivery_count: limits::C2D_DEFAULT_MAX_DELIVERY_COUNT,
            max_message_bytes: limits::C2D_MAX_MESSAGE_BYTES,
        }
    }
}

/// How a message ended, in IoT Hub's feedback vocabulary (reference §3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeedbackStatus {
    /// The device completed the message.
    Success,
    /// The message's TTL ran out before it was completed.
    Expired,
    /// The device abandoned it `max_delivery_count` times.
    DeliveryCountExceeded,
    /// The device rejected it.
    Rejected,
    /// The service purged the device's queue.
    Purged,
}

impl FeedbackStatus {
    /// The `statusCode` string IoT Hub writes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "Success",
            Self::Expired => "Expired",
            Self::DeliveryCountExceeded => "DeliveryCountExceeded",
            Self::Rejected => "Rejected",
            Self::Purged => "Purged",
        }
    }

    /// The human-readable `description` of the record.
    pub fn description(self) -> &'static str {
        match self {
            Self::Success => "Success",
            Self::Expired => "Message expired",
            Self::DeliveryCountExceeded => "Maximum delivery count exceeded",
            Self::Rejected => "Message rejected",
            Self::Purged => "Message purged",
        }
    }
}

/// A final state that the message's ack mode asked feedback for. The hub adds the device's id
/// and generation id to make a [`FeedbackRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The original message's `message-id`.
    pub message_id: Option<String>,
    /// When the outcome happened (IoT Hub's `enqueuedTimeUtc`): the settle or purge time, or the
    /// message's expiry time for `Expired`, even when the expiry is noticed later.
    pub enqueued_at: Millis,
    /// How the message ended.
    pub status: FeedbackStatus,
}

/// Where queue operations report how messages end. A `Vec<Outcome>` keeps the outcomes the
/// messages' ack modes ask feedback for; the hub's sink also counts every end for its metrics.
pub trait OutcomeSink {
    /// `message` reached the final state `status` at `at` (whatever its ack mode).
    fn finished(&mut self, message: &C2dMessage, status: FeedbackStatus, at: Millis);
    /// A delivery was abandoned (counted before a possible dead-lettering is reported).
    fn abandoned(&mut self) {}
}

impl OutcomeSink for Vec<Outcome> {
    fn finished(&mut self, message: &C2dMessage, status: FeedbackStatus, at: Millis) {
        if message.ack.wants(status) {
            self.push(Outcome { message_id: message.message_id.clone(), enqueued_at: at, status });
        }
    }
}

/// Why a send was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The queue holds `depth` non-final messages already (`DeviceMaximumQueueDepthExceeded`).
    #[error("device queue holds {depth} messages, the maximum")]
    QueueFull {
        /// Messages in the queue.
        depth: usize,
    },
    /// The message is larger than allowed (`MessageTooLarge`).
    #[error("message is {size} bytes, larger than the {max} allowed")]
    TooLarge {
        /// [`C2dMessage::size_bytes`].
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The explicit expiry lies further ahead than the maximum TTL (`InvalidMessageExpiryTime`).
    #[error("message expiry {expiry} is later than the latest allowed, {latest}")]
    InvalidExpiry {
        /// The requested absolute expiry.
        expiry: Millis,
        /// `now + max_ttl_ms`.
        latest: Millis,
    },
}

/// Why a settle (complete, abandon, reject, release) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettleError {
    /// No message is locked under this token: unknown token, lapsed lock, or the message was
    /// already settled or expired (`DeviceMessageLockLost`).
    #[error("lock {token} is unknown or lost")]
    LockLost {
        /// The token the caller presented.
        token: LockToken,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_token_round_trips_as_uuid() {
        let t = LockToken(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let s = t.to_string();
        assert_eq!(s, "01234567-89ab-cdef-0123-456789abcdef");
        assert_eq!(s.parse::<LockToken>(), Ok(t));
        assert_eq!(format!("\"{s}\"").parse::<LockToken>(), Ok(t));
        assert!("nope".parse::<LockToken>().is_err());
        assert_ne!(LockToken::random(), LockToken::random());
    }

    #[test]
    fn ack_mode_parses_and_filters() {
        assert_eq!(AckMode::parse("FULL"), Some(AckMode::Full));
        assert_eq!(AckMode::parse("positive"), Some(AckMode::Positive));
        assert_eq!(AckMode::parse("sometimes"), None);
        assert_eq!(AckMode::default(), AckMode::None);
        use FeedbackStatus::*;
        let all = [Success, Expired, DeliveryCountExceeded, Rejected, Purged];
        for s in all {
            assert!(!AckMode::None.wants(s));
            assert!(AckMode::Full.wants(s));
            assert_eq!(AckMode::Positive.wants(s), s == Success);
            assert_eq!(AckMode::Negative.wants(s), s != Success);
        }
    }

    #[test]
    fn size_counts_body_system_values_and_properties() {
        let m = C2dMessage {
            message_id: Some("abc".into()),
            content_type: Some("json".into()),
            properties: vec![("k".into(), "vv".into())],
            body: Bytes::from_static(b"12345"),
            ..Default::default()
        };
        assert_eq!(m.size_bytes(), 5 + 3 + 4 + 1 + 2);
    }

    #[test]
    fn default_config_uses_hub_limits() {
        let c = QueueConfig::default();
        assert_eq!(c.max_depth, 50);
        assert_eq!(c.max_delivery_count, 10);
        assert_eq!(c.default_ttl_ms, 3_600_000);
    }

    #[test]
    fn status_strings_match_iot_hub() {
        assert_eq!(FeedbackStatus::DeliveryCountExceeded.as_str(), "DeliveryCountExceeded");
        assert_eq!(FeedbackStatus::Success.description(), "Success");
    }
}
