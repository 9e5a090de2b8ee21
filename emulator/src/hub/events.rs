//! The built-in Event Hub-compatible endpoint's storage: the partitioned log of device-to-cloud
//! telemetry ([`EventLog`]), its consumer groups, and the runtime information Event Hubs clients
//! read (reference-2 §1). Owned by [`Hub`] behind one mutex; every producer (MQTT D2C and Wills,
//! HTTP single and batch sends) appends through [`Hub::record_telemetry`], and every reader (the
//! Event Hubs AMQP nodes, `/emulator/telemetry`, the testbench) reads the same records.
//!
//! **Partitions.** 2 to 32 (default 4). A message goes to the partition its *device id* maps to
//! with Event Hubs' own partition-key hash (Bob Jenkins' lookup3 `hashlittle2` over the UTF-8
//! bytes, `c ^ b` truncated to a signed 16-bit value, `abs(h % count)`, as the Event Hubs SDKs'
//! `mapPartitionKeyToId` and the service do for a partition key), so the mapping is stable across
//! runs, machines and versions. IoT Hub partitions by device id too, with a hash Microsoft does not
//! document (reference-2 §1.1): the partition a given device lands in may differ from a real hub's.
//!
//! **Records.** Each [`Event`] carries its partition, its sequence number (per partition, from 0,
//! consecutive), its offset (per partition, the bytes of the records before it as this log accounts
//! them, so increasing but not consecutive; Event Hubs clients see it as a decimal string), the
//! enqueued time (hub time, never decreasing), the device and module ids, IoT Hub's auth-method and
//! generation-id annotations, the message source, system and application properties (application
//! property names exactly as the device sent them) and the body. A hub-wide number
//! ([`Event::hub_sequence`], consecutive across partitions) orders records for the emulator's own
//! `/emulator/telemetry` read-out. Records are `Arc`s: readers share them, nothing is copied.
//!
//! **Retention.** Records leave oldest first, hub-wide, when they are older than the retention
//! period (default one day, IoT Hub's default), when the log's accounted memory passes its budget
//! (default 256 MiB: body, property text, ids and per-record overhead), or when it holds more than
//! its record cap (none by default; the testbench sets one). Eviction is lazy: it runs on append and
//! before reads, never on a timer. A reader whose position was evicted resumes at the oldest
//! retained record, as Event Hubs does after retention passes it; [`ReadBatch::missed`] says how
//! many it lost.
//!
//! **Reading.** [`EventPosition`] is an Event Hubs start position (offset, sequence number or
//! enqueued time, each inclusive or exclusive, `-1` for the start of the stream and `@latest` for
//! the end); [`Hub::resolve_event_position`] turns it into the sequence number to read next (sequence
//! numbers index the partition directly; offsets and times are found by binary search), and
//! [`Hub::read_events`] returns up to `max` records from there plus the position after them.
//! Consumer groups hold no copies and no positions: readers hold their own.
//!
//! **Waking readers.** Appending stores the partition's new end (the next sequence number) in an
//! atomic and calls `notify_waiters` on that partition's [`Notify`] and on one hub-wide events
//! `Notify`, after the log's lock is released. A reader waits without a task of its own: create
//! `notified()` on [`Hub::partition_notifier`] (one partition) or [`Hub::events_notifier`] (any,
//! for a connection serving links on several partitions), pin it, `enable()` it, check
//! [`Hub::partition_end`] against its position, then await it. Nothing is registered per reader.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::clock::{Millis, iso8601};

use super::Hub;

/// Fewest partitions a hub may have (IoT Hub's range is 2 to 32 on the SKUs most hubs use).
pub const MIN_PARTITIONS: usize = 2;
/// Most partitions a hub may have.
pub const MAX_PARTITIONS: usize = 32;
/// Partitions when none are configured (IoT Hub's default).
pub const DEFAULT_PARTITIONS: usize = 4;
/// Retention when none is configured: one day, IoT Hub's default.
pub const DEFAULT_RETENTION_MS: u64 = 24 * 60 * 60 * 1000;
/// Memory the log may account for when no budget is configured.
pub const DEFAULT_MEMORY_BUDGET_BYTES: usize = 256 * 1024 * 1024;
/// Smallest memory budget accepted: room for a few maximum-size (256 KiB) messages.
pub const MIN_MEMORY_BUDGET_BYTES: usize = 1024 * 1024;
/// The consumer group every hub has; it cannot be deleted.
pub const DEFAULT_CONSUMER_GROUP: &str = "$Default";
/// Consumer groups per hub, `$Default` included (Event Hubs Standard's limit; IoT Hub's own is
/// unconfirmed, reference-2 §1.1).
pub const MAX_CONSUMER_GROUPS: usize = 20;
/// Longest consumer group name.
pub const CONSUMER_GROUP_NAME_MAX_CHARS: usize = 50;

/// Accounted per-record overhead beyond the text and body: the record itself, its `Arc` counts,
/// its slot in the partition and in the hub-wide order.
const RECORD_OVERHEAD_BYTES: usize = std::mem::size_of::<Event>() + 16 + 8 + 1;
/// Accounted overhead of each property pair beyond its text.
const PROPERTY_OVERHEAD_BYTES: usize = std::mem::size_of::<(String, String)>();

/// The log's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsConfig {
    /// Partitions, [`MIN_PARTITIONS`] to [`MAX_PARTITIONS`] (out-of-range values are clamped).
    pub partitions: usize,
    /// How long a record is kept, in milliseconds of hub time.
    pub retention_ms: u64,
    /// Memory the log may account for before dropping its oldest records (at least
    /// [`MIN_MEMORY_BUDGET_BYTES`]).
    pub memory_budget_bytes: usize,
    /// Consumer groups created at startup besides `$Default`.
    pub consumer_groups: Vec<String>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            partitions: DEFAULT_PARTITIONS,
            retention_ms: DEFAULT_RETENTION_MS,
            memory_budget_bytes: DEFAULT_MEMORY_BUDGET_BYTES,
            consumer_groups: Vec::new(),
        }
    }
}

/// Errors of the event log's operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventsError {
    /// The partition id is not one of the hub's (`com.microsoft:argument-out-of-range`).
    #[error(
        "The specified partition is invalid for an EventHub partition sender or receiver. It should be between 0 and {max}; got '{id}'."
    )]
    PartitionOutOfRange {
        /// The id asked for.
        id: String,
        /// The highest valid id.
        max: usize,
    },
    /// No consumer group by that name (`amqp:not-found`).
    #[error("The messaging entity '{entity}' could not be found (consumer group '{group}').")]
    ConsumerGroupNotFound {
        /// The Event Hub-compatible name.
        entity: String,
        /// The group asked for.
        group: String,
    },
    /// The consumer group name is not valid.
    #[error(
        "consumer group name '{0}' is not valid: use 1 to {CONSUMER_GROUP_NAME_MAX_CHARS} letters, digits, '.', '-' or '_', starting and ending with a letter or digit"
    )]
    InvalidConsumerGroupName(String),
    /// `$Default` cannot be deleted.
    #[error("the {DEFAULT_CONSUMER_GROUP} consumer group cannot be deleted")]
    DefaultConsumerGroup,
    /// The hub has [`MAX_CONSUMER_GROUPS`] already.
    #[error("the hub has {MAX_CONSUMER_GROUPS} consumer groups, the most it may have")]
    TooManyConsumerGroups,
    /// A selector filter is not an Event Hubs start position.
    #[error("invalid event position filter '{filter}': {reason}")]
    InvalidPosition {
        /// The filter text.
        filter: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Who sent a message, as IoT Hub's `iothub-connection-auth-method` annotation describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMethod {
    /// A device with a SAS token or key (`{"scope":"device","type":"sas","issuer":"iothub"}`).
    #[default]
    DeviceSas,
    /// A module with a SAS token or key.
    ModuleSas,
    /// A device with an X.509 certificate (`"type":"x509Certificate","issuer":"external"`).
    DeviceX509,
    /// A module with an X.509 certificate.
    ModuleX509,
}

impl AuthMethod {
    /// The annotation's JSON text, exactly as IoT Hub writes it (reference-2 §1.7).
    pub fn as_json_str(self) -> &'static str {
        match self {
            Self::DeviceSas => {
                r#"{"scope":"device","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}"#
            }
            Self::ModuleSas => {
                r#"{"scope":"module","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}"#
            }
            Self::DeviceX509 => {
                r#"{"scope":"device","type":"x509Certificate","issuer":"external","acceptingIpFilterRule":null}"#
            }
            Self::ModuleX509 => {
                r#"{"scope":"module","type":"x509Certificate","issuer":"external","acceptingIpFilterRule":null}"#
            }
        }
    }
}

/// Where a message came from (`iothub-message-source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MessageSource {
    /// Device telemetry.
    #[default]
    Telemetry,
}

impl MessageSource {
    /// IoT Hub's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Telemetry => "Telemetry",
        }
    }
}

/// One D2C message as a producer hands it to the hub.
#[derive(Debug, Clone, Default)]
pub struct D2cMessage {
    /// The sending device (`iothub-connection-device-id`).
    pub device_id: String,
    /// The sending module, if a module sent it (`iothub-connection-module-id`).
    pub module_id: Option<String>,
    /// How the sender authenticated.
    pub auth: AuthMethod,
    /// System properties (`message-id`, `content-type`, …) by their AMQP names.
    pub system_properties: Vec<(String, String)>,
    /// Application properties, names exactly as sent.
    pub properties: Vec<(String, String)>,
    /// The payload.
    pub body: Bytes,
}

/// One record of the log: a D2C message as the built-in endpoint serves it.
#[derive(Debug, Clone)]
pub struct Event {
    /// The partition index (its id is this number in decimal).
    pub partition: u8,
    /// `x-opt-sequence-number`: per partition, from 0, consecutive.
    pub sequence_number: i64,
    /// `x-opt-offset` (as a decimal string on the wire): per partition, increasing.
    pub offset: u64,
    /// Hub-wide number, from 1, consecutive across partitions: the `/emulator/telemetry`
    /// read-out's `sequenceNumber` and `after`.
    pub hub_sequence: u64,
    /// `x-opt-enqueued-time` and `iothub-enqueuedtime`: hub time the hub took it, never decreasing.
    pub enqueued_at: Millis,
    /// `iothub-connection-device-id`.
    pub device_id: Box<str>,
    /// `iothub-connection-module-id`, only for messages a module sent.
    pub module_id: Option<Box<str>>,
    /// `iothub-connection-auth-method`.
    pub auth: AuthMethod,
    /// The sender's generation id at the time (`iothub-connection-auth-generation-id`, see
    /// [`Event::auth_generation_id_str`]).
    pub auth_generation_id: u64,
    /// `iothub-message-source`.
    pub source: MessageSource,
    /// System properties (`message-id`, `correlation-id`, `content-type`, …) by AMQP name.
    pub system_properties: Vec<(String, String)>,
    /// Application properties, names exactly as sent.
    pub properties: Vec<(String, String)>,
    /// The payload.
    pub body: Bytes,
}

impl Event {
    /// The partition id (`"0"`, `"1"`, …).
    pub fn partition_id(&self) -> String {
        self.partition.to_string()
    }

    /// `x-opt-offset` as Event Hubs sends it: decimal text.
    pub fn offset_str(&self) -> String {
        self.offset.to_string()
    }

    /// `iothub-connection-auth-generation-id` as IoT Hub writes it (18 digits).
    pub fn auth_generation_id_str(&self) -> String {
        format!("{:018}", self.auth_generation_id)
    }

    /// The system property named `name` (AMQP name, e.g. `message-id`), if set.
    pub fn system_property(&self, name: &str) -> Option<&str> {
        self.system_properties.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// JSON for the `/emulator/telemetry` read-out: the body as text when it is UTF-8, else base64
    /// with `bodyEncoding`; `eventHub` says where the record sits in the built-in endpoint.
    pub fn to_json(&self) -> Value {
        let (body, encoding) = match std::str::from_utf8(&self.body) {
            Ok(s) => (Value::String(s.to_string()), "utf-8"),
            Err(_) => (Value::String(B64.encode(&self.body)), "base64"),
        };
        let map = |v: &[(String, String)]| {
            Value::Object(v.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect())
        };
        let mut out = json!({
            "sequenceNumber": self.hub_sequence,
            "deviceId": &*self.device_id,
            "enqueuedTimeUtc": iso8601(self.enqueued_at),
            "systemProperties": map(&self.system_properties),
            "properties": map(&self.properties),
            "body": body,
            "bodyEncoding": encoding,
            "eventHub": {
                "partitionId": self.partition_id(),
                "sequenceNumber": self.sequence_number,
                "offset": self.offset_str(),
            },
        });
        if let Some(m) = &self.module_id {
            out["moduleId"] = Value::String(m.to_string());
        }
        out
    }

    /// Memory this record is accounted for (and how far it moves its partition's offset).
    fn accounted_bytes(&self) -> usize {
        let props = |v: &[(String, String)]| {
            v.iter().map(|(k, v)| PROPERTY_OVERHEAD_BYTES + k.capacity() + v.capacity()).sum::<usize>()
        };
        RECORD_OVERHEAD_BYTES
            + self.device_id.len()
            + self.module_id.as_ref().map_or(0, |m| m.len())
            + props(&self.system_properties)
            + props(&self.properties)
            + self.body.len()
    }
}

/// The partition a device's messages go to, of `count`: Event Hubs' partition-key mapping with the
/// device id as the key (see the module docs).
pub fn partition_for(device_id: &str, count: usize) -> usize {
    let (b, c) = lookup3(device_id.as_bytes());
    let h = i32::from((c ^ b) as u16 as i16);
    (h % count.max(1) as i32).unsigned_abs() as usize
}

/// Bob Jenkins' lookup3 `hashlittle2` with zero seeds: the `(b, c)` pair.
fn lookup3(data: &[u8]) -> (u32, u32) {
    let init = 0xdead_beef_u32.wrapping_add(data.len() as u32);
    let (mut a, mut b, mut c) = (init, init, init);
    let word = |s: &[u8]| -> u32 {
        let mut w = [0u8; 4];
        w[..s.len()].copy_from_slice(s);
        u32::from_le_bytes(w)
    };
    let mut rest = data;
    while rest.len() > 12 {
        a = a.wrapping_add(word(&rest[0..4]));
        b = b.wrapping_add(word(&rest[4..8]));
        c = c.wrapping_add(word(&rest[8..12]));
        // mix(a, b, c)
        a = a.wrapping_sub(c);
        a ^= c.rotate_left(4);
        c = c.wrapping_add(b);
        b = b.wrapping_sub(a);
        b ^= a.rotate_left(6);
        a = a.wrapping_add(c);
        c = c.wrapping_sub(b);
        c ^= b.rotate_left(8);
        b = b.wrapping_add(a);
        a = a.wrapping_sub(c);
        a ^= c.rotate_left(16);
        c = c.wrapping_add(b);
        b = b.wrapping_sub(a);
        b ^= a.rotate_left(19);
        a = a.wrapping_add(c);
        c = c.wrapping_sub(b);
        c ^= b.rotate_left(4);
        b = b.wrapping_add(a);
        rest = &rest[12..];
    }
    if rest.is_empty() {
        return (b, c);
    }
    // The last 1 to 12 bytes, zero-padded, little-endian words.
    a = a.wrapping_add(word(&rest[..rest.len().min(4)]));
    if rest.len() > 4 {
        b = b.wrapping_add(word(&rest[4..rest.len().min(8)]));
    }
    if rest.len() > 8 {
        c = c.wrapping_add(word(&rest[8..]));
    }
    // final(a, b, c)
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    (b, c)
}

/// The Event Hub-compatible name for a hub at `host`: the hub's name, i.e. the first label of its
/// host name (`myhub` for `myhub.azure-devices.net`), as the Azure portal shows it; `iothub` when the
/// host is an IP address.
pub fn event_hub_name_for(host: &str) -> String {
    let label = host.split('.').next().unwrap_or_default();
    if label.is_empty() || host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
        "iothub".into()
    } else {
        label.to_string()
    }
}

/// Where a reader starts, as an Event Hubs client's `apache.org:selector-filter:string` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventPosition {
    /// The oldest retained record (`x-opt-offset > '-1'`).
    Start,
    /// Only records enqueued after the position is resolved (`x-opt-offset > '@latest'`).
    Latest,
    /// By `x-opt-offset`.
    Offset {
        /// The offset (a negative one means the start).
        offset: i64,
        /// `>=` rather than `>`.
        inclusive: bool,
    },
    /// By `x-opt-sequence-number`.
    SequenceNumber {
        /// The sequence number.
        sequence_number: i64,
        /// `>=` rather than `>`.
        inclusive: bool,
    },
    /// By `x-opt-enqueued-time` (epoch milliseconds).
    EnqueuedTime {
        /// The time.
        at: Millis,
        /// `>=` rather than `>`.
        inclusive: bool,
    },
}

impl EventPosition {
    /// Parses a selector filter such as `amqp.annotation.x-opt-offset > '-1'` (every SDK's
    /// spelling: quoted or not, `>` or `>=`, reference-2 §1.4).
    pub fn from_selector(filter: &str) -> Result<Self, EventsError> {
        let bad =
            |reason: &str| EventsError::InvalidPosition { filter: filter.into(), reason: reason.into() };
        let rest = filter.trim().strip_prefix("amqp.annotation.x-opt-").ok_or_else(|| {
            bad("expected amqp.annotation.x-opt-offset, -sequence-number or -enqueued-time")
        })?;
        let field_end = rest.find(|c: char| c.is_whitespace() || c == '>' || c == '=').unwrap_or(rest.len());
        let (field, rest) = (&rest[..field_end], rest[field_end..].trim_start());
        let (inclusive, value) = if let Some(v) = rest.strip_prefix(">=") {
            (true, v)
        } else if let Some(v) = rest.strip_prefix('>') {
            (false, v)
        } else {
            return Err(bad("the operator must be > or >="));
        };
        let value = value.trim();
        let value = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')).unwrap_or(value);
        match field {
            "offset" => match value {
                "@latest" => Ok(Self::Latest),
                "-1" if !inclusive => Ok(Self::Start),
                v => {
                    let offset = v.parse().map_err(|_| bad("the offset is not a number"))?;
                    Ok(Self::Offset { offset, inclusive })
                }
            },
            "sequence-number" => {
                let sequence_number =
                    value.parse().map_err(|_| bad("the sequence number is not an integer"))?;
                Ok(Self::SequenceNumber { sequence_number, inclusive })
            }
            "enqueued-time" => {
                let at = value.parse().map_err(|_| bad("the enqueued time is not epoch milliseconds"))?;
                Ok(Self::EnqueuedTime { at, inclusive })
            }
            _ => Err(bad("expected x-opt-offset, x-opt-sequence-number or x-opt-enqueued-time")),
        }
    }
}

/// What [`Hub::read_events`] returns.
#[derive(Debug, Clone, Default)]
pub struct ReadBatch {
    /// Up to `max` records, oldest first.
    pub events: Vec<Arc<Event>>,
    /// The sequence number to read from next time.
    pub next: i64,
    /// Records between the asked position and the first one returned that retention dropped
    /// before they were read (the reader fell behind).
    pub missed: u64,
}

/// The hub-level runtime information (`$management` READ `com.microsoft:eventhub`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventHubInfo {
    /// The Event Hub-compatible name (`EntityPath`).
    pub name: String,
    /// When the log was created (the hub started).
    pub created_at: Millis,
    /// `"0"` … `"{count-1}"`.
    pub partition_ids: Vec<String>,
}

/// One partition's runtime information (`$management` READ `com.microsoft:partition`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// The partition id.
    pub id: String,
    /// The oldest retained record's sequence number; for an empty partition, the next one to be
    /// assigned, or -1 if none ever was.
    pub begin_sequence_number: i64,
    /// The last enqueued record's sequence number (-1 if none ever was).
    pub last_enqueued_sequence_number: i64,
    /// The last enqueued record's offset (-1 if none ever was).
    pub last_enqueued_offset: i64,
    /// The last enqueued record's time (0 if none ever was).
    pub last_enqueued_time: Millis,
    /// No record is retained.
    pub is_empty: bool,
}

impl PartitionInfo {
    /// `last_enqueued_offset` as Event Hubs sends it: decimal text, `"-1"` when none.
    pub fn last_enqueued_offset_str(&self) -> String {
        self.last_enqueued_offset.to_string()
    }
}

/// The whole log at a glance (`GET /emulator/event-hub`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsStatus {
    /// Hub-level runtime information.
    pub info: EventHubInfo,
    /// Each partition's.
    pub partitions: Vec<PartitionInfo>,
    /// The retention period.
    pub retention_ms: u64,
    /// The memory budget.
    pub memory_budget_bytes: usize,
    /// The record cap (`usize::MAX`: none).
    pub max_events: usize,
    /// Memory the retained records are accounted for.
    pub accounted_bytes: usize,
    /// Retained records.
    pub retained: usize,
    /// The last hub-wide number assigned ([`Event::hub_sequence`]; 0 before the first record): a
    /// `/emulator/telemetry` reader starting here sees only what arrives next.
    pub last_hub_sequence: u64,
}

/// A consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerGroup {
    /// Its name as created (matched case-insensitively).
    pub name: String,
    /// When it was created.
    pub created_at: Millis,
}

/// Checks a consumer group name: 1 to 50 letters, digits, `.`, `-`, `_`, starting and ending with a
/// letter or digit (`$Default` is the one exception).
pub fn validate_consumer_group_name(name: &str) -> Result<(), EventsError> {
    let ok = name.eq_ignore_ascii_case(DEFAULT_CONSUMER_GROUP)
        || (!name.is_empty()
            && name.len() <= CONSUMER_GROUP_NAME_MAX_CHARS
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && name.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric()));
    if ok { Ok(()) } else { Err(EventsError::InvalidConsumerGroupName(name.into())) }
}

#[derive(Debug, Default)]
struct Partition {
    events: VecDeque<Arc<Event>>,
    /// The sequence number the next record gets.
    next_sequence: i64,
    /// The offset the next record gets.
    next_offset: u64,
    /// `(sequence number, offset, time)` of the last record ever appended.
    last: Option<(i64, u64, Millis)>,
}

impl Partition {
    /// The oldest retained sequence number (the next one when empty).
    fn begin(&self) -> i64 {
        self.events.front().map_or(self.next_sequence, |e| e.sequence_number)
    }

    /// Index of the first retained record for which `before` is false (records are ordered).
    fn index_where(&self, before: impl Fn(&Event) -> bool) -> usize {
        self.events.partition_point(|e| before(e))
    }

    fn sequence_at(&self, index: usize) -> i64 {
        self.begin() + index as i64
    }
}

/// The partitioned log. Sans-IO: every operation takes hub time as an argument.
#[derive(Debug)]
pub struct EventLog {
    partitions: Box<[Partition]>,
    /// Partition of each retained record in hub-wide order, oldest first: eviction pops here.
    order: VecDeque<u8>,
    retention_ms: u64,
    memory_budget_bytes: usize,
    max_events: usize,
    /// Accounted bytes of the retained records.
    bytes: usize,
    last_hub_sequence: u64,
    last_enqueued_at: Millis,
    created_at: Millis,
    groups: Vec<ConsumerGroup>,
}

impl EventLog {
    /// A log with `config`, keeping at most `max_events` records, created at `now`.
    pub fn new(config: &EventsConfig, max_events: usize, now: Millis) -> Self {
        let count = config.partitions.clamp(MIN_PARTITIONS, MAX_PARTITIONS);
        let mut log = Self {
            partitions: (0..count).map(|_| Partition::default()).collect(),
            order: VecDeque::new(),
            retention_ms: config.retention_ms.max(1),
            memory_budget_bytes: config.memory_budget_bytes.max(MIN_MEMORY_BUDGET_BYTES),
            max_events: max_events.max(1),
            bytes: 0,
            last_hub_sequence: 0,
            last_enqueued_at: 0,
            created_at: now,
            groups: vec![ConsumerGroup { name: DEFAULT_CONSUMER_GROUP.into(), created_at: now }],
        };
        for g in &config.consumer_groups {
            // Startup flags are validated by the binary; a bad or surplus one is skipped here.
            let _ = log.create_group(g, now);
        }
        log
    }

    /// Number of partitions.
    pub fn partition_count(&self) -> usize {
        self.partitions.len()
    }

    /// Retained records.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// No record is retained.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Memory the retained records are accounted for.
    pub fn accounted_bytes(&self) -> usize {
        self.bytes
    }

    /// The partition index of `id` (`"0"` … `"{count-1}"`).
    pub fn partition_index(&self, id: &str) -> Result<usize, EventsError> {
        let out_of_range =
            || EventsError::PartitionOutOfRange { id: id.into(), max: self.partitions.len() - 1 };
        let canonical = id.len() == 1 || !id.starts_with('0');
        if id.is_empty() || id.len() > 3 || !canonical || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(out_of_range());
        }
        match id.parse::<usize>() {
            Ok(i) if i < self.partitions.len() => Ok(i),
            _ => Err(out_of_range()),
        }
    }

    fn partition(&self, p: usize) -> Result<&Partition, EventsError> {
        self.partitions.get(p).ok_or_else(|| EventsError::PartitionOutOfRange {
            id: p.to_string(),
            max: self.partitions.len() - 1,
        })
    }

    /// Appends `msg` at hub time `now` with the sender's `generation_id`, then drops what
    /// retention no longer allows; returns the record.
    pub fn append(&mut self, msg: D2cMessage, generation_id: u64, now: Millis) -> Arc<Event> {
        let p = partition_for(&msg.device_id, self.partitions.len());
        let enqueued_at = now.max(self.last_enqueued_at);
        self.last_enqueued_at = enqueued_at;
        self.last_hub_sequence += 1;
        let part = &mut self.partitions[p];
        let event = Arc::new(Event {
            partition: p as u8,
            sequence_number: part.next_sequence,
            offset: part.next_offset,
            hub_sequence: self.last_hub_sequence,
            enqueued_at,
            device_id: msg.device_id.into_boxed_str(),
            module_id: msg.module_id.map(String::into_boxed_str),
            auth: msg.auth,
            auth_generation_id: generation_id,
            source: MessageSource::Telemetry,
            system_properties: msg.system_properties,
            properties: msg.properties,
            // A view into a connection's read buffer would pin the whole buffer for as long as the
            // record is retained (and make the memory budget a fiction): keep a copy of its own.
            body: Bytes::copy_from_slice(&msg.body),
        });
        let size = event.accounted_bytes();
        part.last = Some((event.sequence_number, event.offset, enqueued_at));
        part.next_sequence += 1;
        part.next_offset += size as u64;
        part.events.push_back(Arc::clone(&event));
        self.order.push_back(p as u8);
        self.bytes += size;
        self.evict(now);
        event
    }

    /// Drops the oldest records while any limit is exceeded (the newest record always stays).
    pub fn evict(&mut self, now: Millis) {
        while let Some(&p) = self.order.front() {
            let Some(oldest) = self.partitions[p as usize].events.front() else {
                // Cannot happen: `order` mirrors the partitions. Resynchronise rather than spin.
                self.order.pop_front();
                continue;
            };
            let expired = oldest.enqueued_at.saturating_add(self.retention_ms) <= now;
            let over = self.order.len() > 1
                && (self.bytes > self.memory_budget_bytes || self.order.len() > self.max_events);
            if !expired && !over {
                break;
            }
            let size = oldest.accounted_bytes();
            self.partitions[p as usize].events.pop_front();
            self.order.pop_front();
            self.bytes -= size;
        }
        if self.order.is_empty() && self.order.capacity() > 0 {
            // An idle, emptied log gives its buffers back.
            self.order = VecDeque::new();
            for part in self.partitions.iter_mut() {
                part.events = VecDeque::new();
            }
        }
    }

    /// The next sequence number of partition `p` (its end: a reader there has read everything).
    pub fn partition_end(&self, p: usize) -> Result<i64, EventsError> {
        Ok(self.partition(p)?.next_sequence)
    }

    /// Hub-level runtime information under the Event Hub-compatible `name`.
    pub fn info(&self, name: &str) -> EventHubInfo {
        EventHubInfo {
            name: name.into(),
            created_at: self.created_at,
            partition_ids: (0..self.partitions.len()).map(|p| p.to_string()).collect(),
        }
    }

    /// The whole log at a glance, under the Event Hub-compatible `name`.
    pub fn status(&self, name: &str) -> EventsStatus {
        EventsStatus {
            info: self.info(name),
            partitions: (0..self.partitions.len()).filter_map(|p| self.partition_info(p).ok()).collect(),
            retention_ms: self.retention_ms,
            memory_budget_bytes: self.memory_budget_bytes,
            max_events: self.max_events,
            accounted_bytes: self.bytes,
            retained: self.order.len(),
            last_hub_sequence: self.last_hub_sequence,
        }
    }

    /// Partition `p`'s runtime information.
    pub fn partition_info(&self, p: usize) -> Result<PartitionInfo, EventsError> {
        let part = self.partition(p)?;
        let (last_seq, last_offset, last_time) = part.last.map_or((-1, -1, 0), |(s, o, t)| (s, o as i64, t));
        Ok(PartitionInfo {
            id: p.to_string(),
            begin_sequence_number: if part.last.is_none() { -1 } else { part.begin() },
            last_enqueued_sequence_number: last_seq,
            last_enqueued_offset: last_offset,
            last_enqueued_time: last_time,
            is_empty: part.events.is_empty(),
        })
    }

    /// The sequence number a reader starting at `position` in partition `p` reads next. A position
    /// before the oldest retained record resolves to that record; one past the end, to the end.
    pub fn resolve(&self, p: usize, position: &EventPosition) -> Result<i64, EventsError> {
        let part = self.partition(p)?;
        let (begin, end) = (part.begin(), part.next_sequence);
        let at = match *position {
            EventPosition::Start => begin,
            EventPosition::Latest => end,
            EventPosition::SequenceNumber { sequence_number, inclusive } => {
                let first = if inclusive { sequence_number } else { sequence_number.saturating_add(1) };
                first.clamp(begin, end)
            }
            EventPosition::Offset { offset, inclusive } => {
                if offset < 0 {
                    begin
                } else {
                    let o = offset as u64;
                    part.sequence_at(
                        part.index_where(|e| if inclusive { e.offset < o } else { e.offset <= o }),
                    )
                }
            }
            EventPosition::EnqueuedTime { at, inclusive } => part.sequence_at(
                part.index_where(|e| if inclusive { e.enqueued_at < at } else { e.enqueued_at <= at }),
            ),
        };
        Ok(at)
    }

    /// Up to `max` records of partition `p` from sequence number `from` on (from the oldest
    /// retained one if `from` was dropped).
    pub fn read(&self, p: usize, from: i64, max: usize) -> Result<ReadBatch, EventsError> {
        let part = self.partition(p)?;
        let (begin, end) = (part.begin(), part.next_sequence);
        let missed = if from < begin { (begin - from) as u64 } else { 0 };
        let start = from.clamp(begin, end);
        let events: Vec<Arc<Event>> =
            part.events.range((start - begin) as usize..).take(max).cloned().collect();
        Ok(ReadBatch { next: start + events.len() as i64, events, missed })
    }

    /// Records with a hub-wide number above `after`, oldest first, at most `limit`, optionally only
    /// `device_id`'s, each handed to `f` (the `/emulator/telemetry` read-out).
    pub fn read_hub_wide<T>(
        &self,
        device_id: Option<&str>,
        after: u64,
        limit: usize,
        mut f: impl FnMut(&Arc<Event>) -> T,
    ) -> Vec<T> {
        let mut out = Vec::new();
        if let Some(d) = device_id {
            // A device's records are all in its partition.
            let part = &self.partitions[partition_for(d, self.partitions.len())];
            let start = part.index_where(|e| e.hub_sequence <= after);
            out.extend(part.events.range(start..).filter(|e| &*e.device_id == d).take(limit).map(&mut f));
            return out;
        }
        // Merge the partitions by hub-wide number.
        let mut next: Vec<usize> =
            self.partitions.iter().map(|part| part.index_where(|e| e.hub_sequence <= after)).collect();
        while out.len() < limit {
            let best = self
                .partitions
                .iter()
                .zip(&next)
                .enumerate()
                .filter_map(|(p, (part, &i))| part.events.get(i).map(|e| (e.hub_sequence, p)))
                .min();
            let Some((_, p)) = best else { break };
            out.push(f(&self.partitions[p].events[next[p]]));
            next[p] += 1;
        }
        out
    }

    /// Up to `limit` of the newest records (only `device_id`'s, if given), newest first, each
    /// handed to `f`. With a device, its partition is scanned from the end (a device that sent
    /// nothing recently costs one pass over that partition); without, the partitions are merged
    /// from their ends by hub-wide number.
    pub fn newest<T>(
        &self,
        device_id: Option<&str>,
        limit: usize,
        mut f: impl FnMut(&Arc<Event>) -> T,
    ) -> Vec<T> {
        if let Some(d) = device_id {
            let part = &self.partitions[partition_for(d, self.partitions.len())];
            return part.events.iter().rev().filter(|e| &*e.device_id == d).take(limit).map(f).collect();
        }
        let mut out = Vec::with_capacity(limit.min(self.order.len()));
        let mut next: Vec<usize> = self.partitions.iter().map(|part| part.events.len()).collect();
        while out.len() < limit {
            let best = self
                .partitions
                .iter()
                .zip(&next)
                .enumerate()
                .filter_map(|(p, (part, &i))| i.checked_sub(1).map(|i| (part.events[i].hub_sequence, p)))
                .max();
            let Some((_, p)) = best else { break };
            next[p] -= 1;
            out.push(f(&self.partitions[p].events[next[p]]));
        }
        out
    }

    /// The last hub-wide number assigned: records appended since the hub started.
    pub fn appended(&self) -> u64 {
        self.last_hub_sequence
    }

    /// The consumer group named `name` (case-insensitively).
    pub fn group(&self, name: &str) -> Option<&ConsumerGroup> {
        self.groups.iter().find(|g| g.name.eq_ignore_ascii_case(name))
    }

    /// Every consumer group, `$Default` first.
    pub fn groups(&self) -> &[ConsumerGroup] {
        &self.groups
    }

    /// Creates consumer group `name` at `now`; `Ok(false)` if it exists already (creation is
    /// idempotent, like ARM's PUT).
    pub fn create_group(&mut self, name: &str, now: Millis) -> Result<bool, EventsError> {
        validate_consumer_group_name(name)?;
        if self.group(name).is_some() {
            return Ok(false);
        }
        if self.groups.len() >= MAX_CONSUMER_GROUPS {
            return Err(EventsError::TooManyConsumerGroups);
        }
        self.groups.push(ConsumerGroup { name: name.into(), created_at: now });
        Ok(true)
    }

    /// Deletes consumer group `name`; `Ok(false)` if there was none.
    pub fn delete_group(&mut self, name: &str) -> Result<bool, EventsError> {
        if name.eq_ignore_ascii_case(DEFAULT_CONSUMER_GROUP) {
            return Err(EventsError::DefaultConsumerGroup);
        }
        let before = self.groups.len();
        self.groups.retain(|g| !g.name.eq_ignore_ascii_case(name));
        Ok(self.groups.len() < before)
    }
}

/// The wake-up side of the log, outside its mutex: per-partition ends and notifiers.
#[derive(Debug)]
pub(super) struct EventSignals {
    ends: Box<[AtomicI64]>,
    partitions: Box<[Notify]>,
    any: Notify,
}

impl EventSignals {
    pub(super) fn new(partitions: usize) -> Self {
        Self {
            ends: (0..partitions).map(|_| AtomicI64::new(0)).collect(),
            partitions: (0..partitions).map(|_| Notify::new()).collect(),
            any: Notify::new(),
        }
    }
}

impl Hub {
    /// Records a D2C message from `msg.device_id` in the event log and wakes its readers; returns
    /// the record.
    pub fn record_telemetry(&self, mut msg: D2cMessage) -> Arc<Event> {
        let now = self.now();
        let mut model_id = None;
        let mut x509 = false;
        let generation_id = self
            .with_device(&msg.device_id, |d| {
                if let Some(mid) = msg.module_id.as_deref() {
                    // A module's message: its own activity, generation id and model id.
                    let m = d
                        .module_mut(mid)
                        .ok_or_else(|| crate::error::HubError::module_not_found(&msg.device_id, mid))?;
                    m.last_activity = now;
                    model_id = m.model_id.as_deref().map(str::to_string);
                    return Ok(m.generation_id);
                }
                d.last_activity = now;
                model_id = d.model_id().map(str::to_string);
                x509 = matches!(
                    d.auth_type,
                    super::AuthType::SelfSigned | super::AuthType::CertificateAuthority
                );
                Ok(d.generation_id)
            })
            .unwrap_or(0);
        // A device that announced a Plug and Play model id gets it as `dt-dataschema`, as IoT Hub
        // annotates its events (reference-2 §5); a value the device sent itself is replaced.
        if let Some(m) = model_id {
            msg.system_properties.retain(|(k, _)| k != "dt-dataschema");
            msg.system_properties.push(("dt-dataschema".into(), m));
        }
        // X.509 devices authenticate only with their certificate (SAS devices never present one).
        if x509 && msg.auth == AuthMethod::DeviceSas {
            msg.auth = AuthMethod::DeviceX509;
        }
        let event = self.event_log().append(msg, generation_id, now);
        let p = usize::from(event.partition);
        let signals = &self.shared.event_signals;
        // `fetch_max`: two appenders to one partition may get here in either order, and the end a
        // reader sees must never move back.
        signals.ends[p].fetch_max(event.sequence_number + 1, Ordering::AcqRel);
        signals.partitions[p].notify_waiters();
        signals.any.notify_waiters();
        event
    }

    /// Up to `limit` records with a hub-wide number above `after`, optionally only from
    /// `device_id`, oldest first (the `/emulator/telemetry` read-out).
    pub fn read_telemetry(&self, device_id: Option<&str>, after: u64, limit: usize) -> Vec<Arc<Event>> {
        self.event_log_evicted().read_hub_wide(device_id, after, limit, Arc::clone)
    }

    /// [`Self::read_telemetry`] of every device, handing each record to `f` instead of cloning it
    /// (a reader that wants a few fields of many); `f` runs under the log's lock: keep it short.
    pub fn read_telemetry_with<T>(
        &self,
        after: u64,
        limit: usize,
        f: impl FnMut(&Arc<Event>) -> T,
    ) -> Vec<T> {
        self.event_log_evicted().read_hub_wide(None, after, limit, f)
    }

    /// Up to `limit` of the newest records (only `device_id`'s, if given), newest first, each
    /// passed through `f` under the log's lock (the dashboard's recent telemetry).
    pub fn newest_telemetry<T>(
        &self,
        device_id: Option<&str>,
        limit: usize,
        f: impl FnMut(&Arc<Event>) -> T,
    ) -> Vec<T> {
        self.event_log_evicted().newest(device_id, limit, f)
    }

    /// Messages recorded since the hub started.
    pub fn telemetry_received(&self) -> u64 {
        self.event_log().appended()
    }

    /// The Event Hub-compatible name (`EntityPath`): see [`event_hub_name_for`].
    pub fn event_hub_name(&self) -> &str {
        &self.shared.event_hub_name
    }

    /// The Event Hub-compatible endpoint's host and AMQP port (the hub's own host and AMQP port:
    /// one listener serves both).
    pub fn event_hub_endpoint(&self) -> (&str, u16) {
        (self.hostname(), self.amqp_port())
    }

    /// The Event Hub-compatible connection string of policy `name`, if it exists:
    /// `Endpoint=sb://{host}/;SharedAccessKeyName=…;SharedAccessKey=…;EntityPath={name}` (the
    /// port appears in `Endpoint` only when it is not 5671).
    pub fn event_hub_connection_string(&self, name: &str) -> Option<String> {
        let p = self.shared.policies.iter().find(|p| p.name == name)?;
        let (host, port) = self.event_hub_endpoint();
        let host = if port == crate::limits::DEFAULT_AMQP_PORT {
            host.to_string()
        } else {
            format!("{host}:{port}")
        };
        Some(format!(
            "Endpoint=sb://{host}/;SharedAccessKeyName={};SharedAccessKey={};EntityPath={}",
            p.name,
            p.primary_key,
            self.event_hub_name()
        ))
    }

    /// Number of partitions.
    pub fn partition_count(&self) -> usize {
        self.shared.event_signals.ends.len()
    }

    /// The partition index of partition id `id`.
    pub fn partition_index(&self, id: &str) -> Result<usize, EventsError> {
        self.event_log().partition_index(id)
    }

    /// Hub-level runtime information.
    pub fn event_hub_info(&self) -> EventHubInfo {
        self.event_log().info(self.event_hub_name())
    }

    /// The whole log at a glance.
    pub fn events_status(&self) -> EventsStatus {
        self.event_log_evicted().status(self.event_hub_name())
    }

    /// Partition `p`'s runtime information.
    pub fn partition_info(&self, p: usize) -> Result<PartitionInfo, EventsError> {
        self.event_log_evicted().partition_info(p)
    }

    /// The sequence number a reader of partition `p` starting at `position` reads next.
    pub fn resolve_event_position(&self, p: usize, position: &EventPosition) -> Result<i64, EventsError> {
        self.event_log_evicted().resolve(p, position)
    }

    /// Up to `max` records of partition `p` from sequence number `from` (see [`ReadBatch`]).
    pub fn read_events(&self, p: usize, from: i64, max: usize) -> Result<ReadBatch, EventsError> {
        self.event_log_evicted().read(p, from, max)
    }

    /// The next sequence number of partition `p`, without taking the log's lock: a reader whose
    /// position is below it has records to read. 0 for an unknown partition.
    pub fn partition_end(&self, p: usize) -> i64 {
        self.shared.event_signals.ends.get(p).map_or(0, |e| e.load(Ordering::Acquire))
    }

    /// Notified (`notify_waiters`) whenever partition `p` grows; see the module docs for how to
    /// wait without missing a wake-up. `None` for an unknown partition.
    pub fn partition_notifier(&self, p: usize) -> Option<&Notify> {
        self.shared.event_signals.partitions.get(p)
    }

    /// Notified (`notify_waiters`) whenever any partition grows.
    pub fn events_notifier(&self) -> &Notify {
        &self.shared.event_signals.any
    }

    /// The consumer group named `name` (case-insensitively), if it exists.
    pub fn consumer_group(&self, name: &str) -> Option<ConsumerGroup> {
        self.event_log().group(name).cloned()
    }

    /// Checks that consumer group `name` exists, in the error Event Hubs gives an attach to an
    /// unknown one.
    pub fn require_consumer_group(&self, name: &str) -> Result<ConsumerGroup, EventsError> {
        self.consumer_group(name).ok_or_else(|| EventsError::ConsumerGroupNotFound {
            entity: self.event_hub_name().into(),
            group: name.into(),
        })
    }

    /// Every consumer group, `$Default` first.
    pub fn consumer_groups(&self) -> Vec<ConsumerGroup> {
        self.event_log().groups().to_vec()
    }

    /// Creates consumer group `name` (idempotent); returns it and whether it is new.
    pub fn create_consumer_group(&self, name: &str) -> Result<(ConsumerGroup, bool), EventsError> {
        let now = self.now();
        let mut log = self.event_log();
        let created = log.create_group(name, now)?;
        let group =
            log.group(name).cloned().ok_or_else(|| EventsError::InvalidConsumerGroupName(name.into()))?;
        Ok((group, created))
    }

    /// Deletes consumer group `name`; `Ok(false)` if there was none.
    pub fn delete_consumer_group(&self, name: &str) -> Result<bool, EventsError> {
        self.event_log().delete_group(name)
    }

    /// The log after dropping what retention no longer allows at hub time now.
    fn event_log_evicted(&self) -> std::sync::MutexGuard<'_, EventLog> {
        let now = self.now();
        let mut log = self.event_log();
        log.evict(now);
        log
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(dev: &str, body: &[u8]) -> D2cMessage {
        D2cMessage { device_id: dev.into(), body: Bytes::copy_from_slice(body), ..Default::default() }
    }

    fn log(partitions: usize) -> EventLog {
        EventLog::new(&EventsConfig { partitions, ..Default::default() }, usize::MAX, 1_000)
    }

    /// A device id that maps to partition `p` of `count`.
    fn device_in(p: usize, count: usize) -> String {
        (0..).map(|i| format!("dev-{i}")).find(|d| partition_for(d, count) == p).unwrap()
    }

    #[test]
    fn partition_mapping_matches_event_hubs_partition_key_hash() {
        // Vectors from the Event Hubs SDK's tests (computed with the service's C# lookup3).
        assert_eq!(partition_for("alphabet", 3), 0);
        assert_eq!(partition_for("alphabet", 11), 4);
        assert_eq!(partition_for("TheBestParitionEver", 4), 2);
        assert_eq!(partition_for("TheWorstParitionEver", 15), 1);
        // Stable and in range for every length (each tail case of the hash).
        for len in 0..40 {
            let id: String = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEF"[..len].into();
            let p = partition_for(&id, 4);
            assert!(p < 4);
            assert_eq!(p, partition_for(&id, 4));
        }
        // Spreads devices over the partitions.
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[partition_for(&format!("device-{i}"), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }

    #[test]
    fn a_device_always_lands_in_the_same_partition_with_consecutive_sequence_numbers() {
        let mut log = log(4);
        let d = device_in(2, 4);
        let events: Vec<_> = (0..5).map(|i| log.append(msg(&d, b"abc"), 7, 1_000 + i)).collect();
        assert!(events.iter().all(|e| e.partition == 2));
        assert_eq!(events.iter().map(|e| e.sequence_number).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        assert_eq!(events.iter().map(|e| e.hub_sequence).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        assert!(events.windows(2).all(|w| w[1].offset > w[0].offset), "offsets increase");
        assert_eq!(events[0].offset, 0);
        assert_eq!(events[4].auth_generation_id_str(), "000000000000000007");
        // Another partition numbers from 0 on its own.
        let other = log.append(msg(&device_in(0, 4), b"x"), 1, 2_000);
        assert_eq!((other.partition, other.sequence_number, other.hub_sequence), (0, 0, 6));
    }

    #[test]
    fn enqueued_times_never_go_backwards() {
        let mut log = log(2);
        let a = log.append(msg("a", b""), 0, 5_000);
        let b = log.append(msg("a", b""), 0, 4_000);
        assert_eq!((a.enqueued_at, b.enqueued_at), (5_000, 5_000));
    }

    #[test]
    fn runtime_information_of_empty_and_used_partitions() {
        let mut log = log(4);
        let info = log.info("myhub");
        assert_eq!(info.partition_ids, ["0", "1", "2", "3"]);
        assert_eq!(info.created_at, 1_000);
        let empty = log.partition_info(1).unwrap();
        assert_eq!(
            (
                empty.begin_sequence_number,
                empty.last_enqueued_sequence_number,
                empty.last_enqueued_offset_str()
            ),
            (-1, -1, "-1".to_string())
        );
        assert!(empty.is_empty);
        let d = device_in(1, 4);
        log.append(msg(&d, b"one"), 0, 2_000);
        let e = log.append(msg(&d, b"two"), 0, 3_000);
        let info = log.partition_info(1).unwrap();
        assert_eq!(info.begin_sequence_number, 0);
        assert_eq!(info.last_enqueued_sequence_number, 1);
        assert_eq!(info.last_enqueued_offset, e.offset as i64);
        assert_eq!(info.last_enqueued_time, 3_000);
        assert!(!info.is_empty);
        assert!(matches!(log.partition_info(4), Err(EventsError::PartitionOutOfRange { .. })));
        assert_eq!(log.partition_index("3"), Ok(3));
        assert!(log.partition_index("4").is_err());
        assert!(log.partition_index("-1").is_err());
        assert!(log.partition_index("01x").is_err());
        assert!(log.partition_index("01").is_err(), "ids are the plain decimal numbers");
        assert_eq!(log.partition_index("0"), Ok(0));
    }

    /// A partition holding sequence numbers 0..10 at times 10_000, 10_010, …
    fn ten() -> (EventLog, usize, Vec<Arc<Event>>) {
        let mut log = log(2);
        let d = device_in(1, 2);
        let events = (0..10).map(|i| log.append(msg(&d, b"0123456789"), 0, 10_000 + 10 * i)).collect();
        (log, 1, events)
    }

    #[test]
    fn every_start_position_kind_resolves_inclusive_or_exclusive() {
        let (log, p, ev) = ten();
        let at = |pos| log.resolve(p, &pos).unwrap();
        assert_eq!(at(EventPosition::Start), 0);
        assert_eq!(at(EventPosition::Latest), 10);
        use EventPosition::*;
        assert_eq!(at(SequenceNumber { sequence_number: 3, inclusive: true }), 3);
        assert_eq!(at(SequenceNumber { sequence_number: 3, inclusive: false }), 4);
        assert_eq!(at(SequenceNumber { sequence_number: -1, inclusive: false }), 0);
        assert_eq!(at(SequenceNumber { sequence_number: 99, inclusive: false }), 10, "past the end: the end");
        let o5 = ev[5].offset as i64;
        assert_eq!(at(Offset { offset: o5, inclusive: true }), 5);
        assert_eq!(at(Offset { offset: o5, inclusive: false }), 6);
        assert_eq!(at(Offset { offset: o5 + 1, inclusive: true }), 6, "between records: the next one");
        assert_eq!(at(Offset { offset: -1, inclusive: false }), 0);
        assert_eq!(at(EnqueuedTime { at: 10_050, inclusive: true }), 5);
        assert_eq!(at(EnqueuedTime { at: 10_050, inclusive: false }), 6);
        assert_eq!(at(EnqueuedTime { at: 0, inclusive: false }), 0);
        assert_eq!(at(EnqueuedTime { at: 99_999, inclusive: false }), 10);
    }

    #[test]
    fn reading_returns_up_to_max_from_a_position_and_where_to_continue() {
        let (log, p, _) = ten();
        let b = log.read(p, 3, 4).unwrap();
        assert_eq!(b.events.iter().map(|e| e.sequence_number).collect::<Vec<_>>(), [3, 4, 5, 6]);
        assert_eq!((b.next, b.missed), (7, 0));
        let b = log.read(p, 7, 100).unwrap();
        assert_eq!((b.events.len(), b.next), (3, 10));
        let b = log.read(p, 10, 100).unwrap();
        assert!(b.events.is_empty());
        assert_eq!(b.next, 10, "at the end a reader stays at the end");
        let latest = log.resolve(p, &EventPosition::Latest).unwrap();
        assert!(log.read(p, latest, 10).unwrap().events.is_empty(), "@latest sees nothing old");
        assert!(log.read(7, 0, 1).is_err());
    }

    #[test]
    fn latest_sees_only_what_arrives_after_it_resolves() {
        let (mut log, p, _) = ten();
        let pos = log.resolve(p, &EventPosition::Latest).unwrap();
        let d = device_in(p, 2);
        log.append(msg(&d, b"new"), 0, 20_000);
        let b = log.read(p, pos, 10).unwrap();
        assert_eq!(b.events.len(), 1);
        assert_eq!(&b.events[0].body[..], b"new");
    }

    #[test]
    fn selector_filters_of_every_sdk_parse() {
        use EventPosition::*;
        let parse = |s: &str| EventPosition::from_selector(s).unwrap();
        assert_eq!(parse("amqp.annotation.x-opt-offset > '-1'"), Start);
        assert_eq!(parse("amqp.annotation.x-opt-offset > -1"), Start);
        assert_eq!(parse("amqp.annotation.x-opt-offset > '@latest'"), Latest);
        assert_eq!(parse("amqp.annotation.x-opt-offset > @latest"), Latest);
        assert_eq!(
            parse("amqp.annotation.x-opt-offset >= '550576'"),
            Offset { offset: 550_576, inclusive: true }
        );
        assert_eq!(parse("amqp.annotation.x-opt-offset > 42"), Offset { offset: 42, inclusive: false });
        assert_eq!(
            parse("amqp.annotation.x-opt-sequence-number > '17'"),
            SequenceNumber { sequence_number: 17, inclusive: false }
        );
        assert_eq!(
            parse("amqp.annotation.x-opt-sequence-number >= 17"),
            SequenceNumber { sequence_number: 17, inclusive: true }
        );
        assert_eq!(
            parse("amqp.annotation.x-opt-enqueued-time > '1619976150277'"),
            EnqueuedTime { at: 1_619_976_150_277, inclusive: false }
        );
        assert_eq!(
            parse("amqp.annotation.x-opt-enqueued-time>='5'"),
            EnqueuedTime { at: 5, inclusive: true }
        );
        for bad in [
            "",
            "x-opt-offset > 1",
            "amqp.annotation.x-opt-offset < '1'",
            "amqp.annotation.x-opt-offset = '1'",
            "amqp.annotation.x-opt-offset > 'abc'",
            "amqp.annotation.x-opt-partition-key > '1'",
            "amqp.annotation.x-opt-enqueued-time > '-5'",
        ] {
            assert!(EventPosition::from_selector(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn records_older_than_the_retention_period_leave_lazily() {
        let mut log =
            EventLog::new(&EventsConfig { retention_ms: 1_000, ..Default::default() }, usize::MAX, 0);
        let d = device_in(0, 4);
        log.append(msg(&d, b"a"), 0, 0);
        log.append(msg(&d, b"b"), 0, 500);
        assert_eq!(log.len(), 2);
        log.evict(999);
        assert_eq!(log.len(), 2, "nothing has expired yet");
        log.evict(1_000);
        assert_eq!(log.len(), 1, "the first expired at 1_000");
        let info = log.partition_info(0).unwrap();
        assert_eq!((info.begin_sequence_number, info.last_enqueued_sequence_number), (1, 1));
        log.append(msg(&d, b"c"), 0, 5_000);
        assert_eq!(log.len(), 1, "appending evicts too");
        let info = log.partition_info(0).unwrap();
        assert_eq!((info.begin_sequence_number, info.last_enqueued_sequence_number), (2, 2));
        log.evict(10_000);
        let info = log.partition_info(0).unwrap();
        assert!(info.is_empty);
        assert_eq!(info.begin_sequence_number, 3, "an emptied partition begins at its next number");
        assert_eq!(info.last_enqueued_sequence_number, 2, "and remembers its last");
        assert_eq!(log.accounted_bytes(), 0);
    }

    #[test]
    fn the_memory_budget_drops_the_oldest_records_hub_wide() {
        let mut log =
            EventLog::new(&EventsConfig { memory_budget_bytes: 0, ..Default::default() }, usize::MAX, 0);
        let body = vec![7u8; 100 * 1024];
        for i in 0..40 {
            // Alternate partitions: eviction is hub-wide oldest first, not per partition.
            log.append(msg(&device_in(i % 4, 4), &body), 0, i as u64);
        }
        assert!(log.accounted_bytes() <= MIN_MEMORY_BUDGET_BYTES, "{}", log.accounted_bytes());
        assert_eq!(log.len(), 10, "1 MiB holds ten 100 KiB records");
        let kept = log.read_hub_wide(None, 0, 100, |e| e.hub_sequence);
        assert_eq!(kept, (31..=40).collect::<Vec<_>>(), "the newest ten, consecutive");
    }

    #[test]
    fn the_record_cap_drops_the_oldest_and_the_newest_always_stays() {
        let mut log = EventLog::new(&EventsConfig::default(), 3, 0);
        for i in 0..5 {
            log.append(msg(&format!("d{i}"), b"x"), 0, 0);
        }
        assert_eq!(log.read_hub_wide(None, 0, 10, |e| e.hub_sequence), [3, 4, 5]);
        let mut tiny = EventLog::new(&EventsConfig::default(), 1, 0);
        tiny.append(msg("d", &vec![0; 300 * 1024]), 0, 0);
        assert_eq!(tiny.len(), 1);
    }

    #[test]
    fn a_reader_that_falls_behind_resumes_at_the_oldest_retained_record() {
        let mut log = EventLog::new(&EventsConfig::default(), 4, 0);
        let d = device_in(3, 4);
        for i in 0..10 {
            log.append(msg(&d, b"x"), 0, i);
        }
        let b = log.read(3, 2, 100).unwrap();
        assert_eq!(b.events.iter().map(|e| e.sequence_number).collect::<Vec<_>>(), [6, 7, 8, 9]);
        assert_eq!((b.missed, b.next), (4, 10));
        assert_eq!(
            log.resolve(3, &EventPosition::SequenceNumber { sequence_number: 0, inclusive: true }),
            Ok(6)
        );
        assert_eq!(log.resolve(3, &EventPosition::Start), Ok(6));
        assert_eq!(log.resolve(3, &EventPosition::Offset { offset: 0, inclusive: true }), Ok(6));
    }

    #[test]
    fn hub_wide_reads_merge_partitions_in_order_and_filter_by_device() {
        let mut log = log(4);
        let devs: Vec<String> = (0..4).map(|p| device_in(p, 4)).collect();
        for i in 0..12 {
            log.append(msg(&devs[(i * 3) % 4], b"x"), 0, i as u64);
        }
        assert_eq!(log.read_hub_wide(None, 0, 100, |e| e.hub_sequence), (1..=12).collect::<Vec<_>>());
        assert_eq!(log.read_hub_wide(None, 5, 3, |e| e.hub_sequence), [6, 7, 8]);
        let only = log.read_hub_wide(Some(&devs[1]), 0, 100, |e| e.device_id.to_string());
        assert_eq!(only.len(), 3);
        assert!(only.iter().all(|d| *d == devs[1]));
        assert!(log.read_hub_wide(Some("nobody"), 0, 100, |e| e.hub_sequence).is_empty());
    }

    #[test]
    fn consumer_groups_are_created_listed_and_deleted_case_insensitively() {
        let mut log = EventLog::new(
            &EventsConfig {
                consumer_groups: vec!["analytics".into(), "bad name".into()],
                ..Default::default()
            },
            usize::MAX,
            0,
        );
        let names = |l: &EventLog| l.groups().iter().map(|g| g.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&log), ["$Default", "analytics"], "the invalid startup name is skipped");
        assert!(log.group("$default").is_some(), "JS asks for $default");
        assert_eq!(log.create_group("Archive.v2", 5), Ok(true));
        assert_eq!(log.create_group("archive.V2", 6), Ok(false), "exists: idempotent");
        assert_eq!(log.group("ARCHIVE.V2").map(|g| g.created_at), Some(5));
        for bad in ["", "-x", "x-", "a b", "a/b", &"x".repeat(51)] {
            assert!(
                matches!(log.create_group(bad, 0), Err(EventsError::InvalidConsumerGroupName(_))),
                "{bad}"
            );
        }
        assert_eq!(log.delete_group("$DEFAULT"), Err(EventsError::DefaultConsumerGroup));
        assert_eq!(log.delete_group("Analytics"), Ok(true));
        assert_eq!(log.delete_group("analytics"), Ok(false));
        assert_eq!(names(&log), ["$Default", "Archive.v2"]);
        for i in 0..MAX_CONSUMER_GROUPS - 2 {
            log.create_group(&format!("g{i}"), 0).unwrap();
        }
        assert_eq!(log.create_group("one-more", 0), Err(EventsError::TooManyConsumerGroups));
    }

    #[test]
    fn records_keep_property_case_and_carry_iot_hub_annotations() {
        let mut log = log(4);
        let e = log.append(
            D2cMessage {
                device_id: "d1".into(),
                system_properties: vec![("message-id".into(), "m1".into())],
                properties: vec![("firmwareChannel".into(), "Beta".into())],
                body: Bytes::from_static(b"{}"),
                ..Default::default()
            },
            637_553_997_165_220_462,
            1_000,
        );
        assert_eq!(e.properties, [("firmwareChannel".to_string(), "Beta".to_string())]);
        assert_eq!(e.system_property("message-id"), Some("m1"));
        assert_eq!(e.auth_generation_id_str(), "637553997165220462");
        assert_eq!(
            e.auth.as_json_str(),
            r#"{"scope":"device","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}"#
        );
        assert_eq!(e.source.as_str(), "Telemetry");
        let j = e.to_json();
        assert_eq!(j["sequenceNumber"], 1);
        assert_eq!(j["eventHub"]["partitionId"], e.partition_id());
        assert_eq!(j["properties"]["firmwareChannel"], "Beta");
    }

    fn hub(config: crate::hub::HubConfig) -> Hub {
        let hub = Hub::new(config);
        hub.put_device("d1", crate::hub::DeviceInput::default(), None).unwrap();
        hub
    }

    #[tokio::test]
    async fn appending_wakes_the_partitions_readers_and_the_hub_wide_waiters_only() {
        let hub = hub(crate::hub::HubConfig::default());
        let p = partition_for("d1", hub.partition_count());
        let other = (p + 1) % hub.partition_count();
        let mine = hub.partition_notifier(p).unwrap().notified();
        let theirs = hub.partition_notifier(other).unwrap().notified();
        let any = hub.events_notifier().notified();
        tokio::pin!(mine, theirs, any);
        for n in [mine.as_mut(), theirs.as_mut(), any.as_mut()] {
            n.enable();
        }
        assert_eq!(hub.partition_end(p), 0);
        let e = hub.record_telemetry(msg("d1", b"hello"));
        assert_eq!(usize::from(e.partition), p);
        assert_eq!(hub.partition_end(p), 1, "the end moves before the wake-up");
        let woke = |f: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>| {
            let waker = std::task::Waker::noop();
            f.poll(&mut std::task::Context::from_waker(waker)).is_ready()
        };
        use std::future::Future;
        assert!(woke(mine.as_mut()), "the partition's reader is woken");
        assert!(woke(any.as_mut()), "the hub-wide waiter is woken");
        assert!(!woke(theirs.as_mut()), "another partition's reader is not");
        let batch = hub.read_events(p, 0, 10).unwrap();
        assert_eq!(&batch.events[0].body[..], b"hello");
    }

    #[test]
    fn the_hub_stamps_generation_ids_and_expires_records_in_hub_time() {
        let hub = hub(crate::hub::HubConfig {
            events: EventsConfig { retention_ms: 60_000, ..Default::default() },
            ..Default::default()
        });
        let device = hub.get_device("d1").unwrap();
        let e = hub.record_telemetry(msg("d1", b"x"));
        assert_eq!(e.auth_generation_id_str(), device["generationId"].as_str().unwrap());
        assert_eq!(hub.read_telemetry(Some("d1"), 0, 10).len(), 1);
        hub.advance_time(60_000).unwrap();
        assert!(hub.read_telemetry(Some("d1"), 0, 10).is_empty(), "a minute later it has expired");
        let p = usize::from(e.partition);
        let info = hub.partition_info(p).unwrap();
        assert!(info.is_empty);
        assert_eq!(info.last_enqueued_sequence_number, 0);
    }

    #[test]
    fn event_hub_names_and_connection_strings() {
        assert_eq!(event_hub_name_for("myhub.azure-devices.net"), "myhub");
        assert_eq!(event_hub_name_for("localhost"), "localhost");
        assert_eq!(event_hub_name_for("127.0.0.1"), "iothub");
        assert_eq!(event_hub_name_for("::1"), "iothub");
        let hub = Hub::new(crate::hub::HubConfig { hostname: "MyHub.Test".into(), ..Default::default() });
        let key = hub.policies().iter().find(|p| p.name == "service").unwrap().primary_key.clone();
        assert_eq!(
            hub.event_hub_connection_string("service").unwrap(),
            format!(
                "Endpoint=sb://MyHub.Test/;SharedAccessKeyName=service;SharedAccessKey={key};EntityPath=MyHub"
            )
        );
        hub.set_amqp_port(15671);
        assert!(
            hub.event_hub_connection_string("service")
                .unwrap()
                .starts_with("Endpoint=sb://MyHub.Test:15671/;")
        );
        assert!(hub.event_hub_connection_string("nobody").is_none());
        assert_eq!(hub.event_hub_info().name, "MyHub");
        assert!(matches!(hub.require_consumer_group("nope"), Err(EventsError::ConsumerGroupNotFound { .. })));
    }

    #[test]
    fn a_pnp_devices_telemetry_carries_its_model_id_as_dt_dataschema() {
        let hub = Hub::new(Default::default());
        for id in ["pnp", "plain"] {
            hub.put_device(id, Default::default(), None).unwrap();
        }
        hub.announce_model_id("pnp", "dtmi:com:example:Thermostat;1");
        let mut forged = msg("pnp", b"{}");
        forged.system_properties.push(("dt-dataschema".into(), "dtmi:forged;1".into()));
        hub.record_telemetry(forged);
        hub.record_telemetry(msg("plain", b"{}"));
        let schema = |id: &str| {
            let m = hub.read_telemetry(Some(id), 0, 10).pop().unwrap();
            m.system_properties
                .iter()
                .filter(|(k, _)| k == "dt-dataschema")
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(schema("pnp"), ["dtmi:com:example:Thermostat;1"], "the hub's value, once");
        assert!(schema("plain").is_empty());
    }

    #[test]
    fn newest_records_come_newest_first_across_partitions_or_for_one_device() {
        let mut log = log(4);
        for i in 0..12 {
            log.append(msg(&format!("dev-{}", i % 5), b"x"), 0, 1_000 + i);
        }
        assert_eq!(log.newest(None, 5, |e| e.hub_sequence), [12, 11, 10, 9, 8]);
        assert_eq!(log.newest(None, 100, |e| e.hub_sequence).len(), 12);
        assert_eq!(log.newest(Some("dev-1"), 10, |e| e.hub_sequence), [12, 7, 2]);
        assert!(log.newest(Some("nobody"), 10, |e| e.hub_sequence).is_empty());
        assert_eq!(log.appended(), 12);
    }
}
