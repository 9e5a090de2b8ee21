//! Every IoT Hub limit and default the emulator enforces, in one place, with units in the names.
//!
//! Each value cites the IoT Hub documentation it comes from (see `shared/docs/iothub-reference.md`
//! §3.2 and §5.2). Code elsewhere refers to these names instead of repeating numbers.

/// Pending cloud-to-device messages per device; the 51st send fails with
/// `DeviceMaximumQueueDepthExceeded` (quotas and throttling, "C2D pending per device").
pub const C2D_MAX_QUEUE_DEPTH: usize = 50;

/// Default C2D time to live (`cloudToDevice.defaultTtlAsIso8601`): 1 hour.
pub const C2D_DEFAULT_TTL_MS: u64 = 60 * 60 * 1000;

/// Largest C2D time to live a message may ask for: 2 days.
pub const C2D_MAX_TTL_MS: u64 = 2 * 24 * 60 * 60 * 1000;

/// How long a received C2D message stays Invisible before it returns to Enqueued: 1 minute, fixed.
pub const C2D_LOCK_TIMEOUT_MS: u64 = 60 * 1000;

/// Default `cloudToDevice.maxDeliveryCount`: abandons allowed before a message is dead-lettered.
pub const C2D_DEFAULT_MAX_DELIVERY_COUNT: u32 = 10;

/// Largest C2D message: 64 KB (body plus system property values plus application properties).
pub const C2D_MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Largest D2C message: 256 KB.
pub const D2C_MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Feedback records per feedback message at most.
pub const FEEDBACK_MAX_BATCH_RECORDS: usize = 64;

/// Feedback batches go out at least this often when records are pending: 15 s after the last send.
pub const FEEDBACK_BATCH_INTERVAL_MS: u64 = 15 * 1000;

/// Feedback message time to live (`cloudToDevice.feedback.ttlAsIso8601`): 1 hour.
pub const FEEDBACK_TTL_MS: u64 = 60 * 60 * 1000;

/// Feedback lock duration (`cloudToDevice.feedback.lockDurationAsIso8601`): 60 s.
pub const FEEDBACK_LOCK_MS: u64 = 60 * 1000;

/// Feedback max delivery count (`cloudToDevice.feedback.maxDeliveryCount`): 10.
pub const FEEDBACK_MAX_DELIVERY_COUNT: u32 = 10;

/// Feedback batches kept while nobody reads them. Not an IoT Hub number: a bound on memory.
/// The oldest batch is dropped past it (and counted in the metrics).
pub const FEEDBACK_MAX_PENDING_BATCHES: usize = 10_000;

/// Identities returned by one `GET /devices` call; `top` outside 1..=1000 counts as 1000.
pub const REGISTRY_LIST_MAX: usize = 1000;

/// Default and largest page size of `POST /devices/query`.
pub const QUERY_PAGE_DEFAULT: usize = 1000;
/// Largest page size a client may ask for with `x-ms-max-item-count`.
pub const QUERY_PAGE_MAX: usize = 10_000;
/// Longest query expression: 8192 characters.
pub const QUERY_MAX_CHARS: usize = 8192;

/// Devices in one bulk `POST /devices` call.
pub const BULK_MAX_DEVICES: usize = 100;

/// Longest device id: 128 characters.
pub const DEVICE_ID_MAX_CHARS: usize = 128;

/// Module identities per device (IoT Hub's current limit; older pages say 20).
pub const MODULES_PER_DEVICE_MAX: usize = 50;

/// Devices (plus modules) per hub.
pub const HUB_MAX_DEVICES: usize = 1_000_000;

/// Tier throttling (`--tier`, [`crate::throttle`]): how much lag behind an operation's limit rate
/// still passes at once, in milliseconds of work at that rate. IoT Hub says bursts are "first
/// processed" but publishes no size: ASSUMED one second. An idle operation class always admits
/// the next request, however much it costs.
pub const THROTTLE_BURST_MS: u64 = 1000;

/// Tier throttling: the traffic-shaping backlog, in milliseconds of work at the limit rate past
/// the burst. Requests that fit wait their turn (at most this long); past it IoT Hub answers 429.
/// IoT Hub publishes no size: ASSUMED five seconds, so a caller that waits for each answer is
/// slowed to the rate but never refused (the slowest class, queries at 20/min, needs 3 s).
pub const THROTTLE_BACKLOG_MS: u64 = 5000;

/// Twin section sizes: tags 8 KB, desired 32 KB, reported 32 KB; nesting depth at most 10.
pub const TWIN_TAGS_MAX_BYTES: usize = 8 * 1024;
/// See [`TWIN_TAGS_MAX_BYTES`].
pub const TWIN_DESIRED_MAX_BYTES: usize = 32 * 1024;
/// See [`TWIN_TAGS_MAX_BYTES`].
pub const TWIN_REPORTED_MAX_BYTES: usize = 32 * 1024;
/// See [`TWIN_TAGS_MAX_BYTES`].
pub const TWIN_MAX_DEPTH: usize = 10;

/// Default SAS clock skew tolerance: a token is refused once `se` + skew is in the past.
pub const SAS_DEFAULT_SKEW_SECS: u64 = 5 * 60;

/// Default ports the official SDKs dial (fixed in every SDK: see sdk-wire-notes §0).
pub const DEFAULT_HTTPS_PORT: u16 = 443;
/// MQTT over TLS.
pub const DEFAULT_MQTT_PORT: u16 = 8883;
/// AMQP over TLS.
pub const DEFAULT_AMQP_PORT: u16 = 5671;
/// Plain HTTP (health, CA download, admin, registry for curl). An emulator choice.
pub const DEFAULT_HTTP_PORT: u16 = 8080;

/// FTP package server port. An emulator choice (IoT Hub has no FTP server): 2121 needs no root.
pub const DEFAULT_FTP_PORT: u16 = 2121;
/// Ports the FTP server may use for passive data connections (IANA's dynamic range, libunftp's
/// default).
pub const FTP_DEFAULT_PASSIVE_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;
/// Concurrent FTP sessions at most. Each session holds a control socket and, while downloading, a
/// data socket and a passive listener; 1,000 sessions keep the hub well under a 20,000-fd limit.
pub const FTP_DEFAULT_MAX_SESSIONS: usize = 1000;
/// An FTP session idle this long is closed (libunftp's default is 600 s; devices reconnect).
pub const FTP_IDLE_TIMEOUT_SECS: u64 = 120;

/// MQTT: the hub closes a connection after 1.5 × the client's keep-alive without traffic, but
/// never waits longer than this (reference §4.2): 1767 s.
pub const MQTT_MAX_KEEP_ALIVE_WAIT_SECS: u64 = 1767;

/// MQTT: C2D messages delivered to one connection and not yet PUBACKed. Not a documented IoT Hub
/// number: a bound on per-connection state (the queue itself holds at most 50).
pub const MQTT_C2D_INFLIGHT_WINDOW: usize = 8;

/// MQTT: largest packet the hub reads. D2C messages are at most 256 KB; the rest is topic and
/// headers.
pub const MQTT_MAX_PACKET_BYTES: usize = D2C_MAX_MESSAGE_BYTES + 16 * 1024;

/// MQTT: a connection must send CONNECT within this many seconds of opening.
pub const MQTT_CONNECT_TIMEOUT_SECS: u64 = 10;

/// Direct methods (reference §2.7): response timeout default and range, connect timeout maximum.
pub const METHOD_DEFAULT_RESPONSE_TIMEOUT_SECS: u64 = 30;
/// See [`METHOD_DEFAULT_RESPONSE_TIMEOUT_SECS`].
pub const METHOD_MIN_RESPONSE_TIMEOUT_SECS: u64 = 5;
/// See [`METHOD_DEFAULT_RESPONSE_TIMEOUT_SECS`].
pub const METHOD_MAX_RESPONSE_TIMEOUT_SECS: u64 = 300;
/// See [`METHOD_DEFAULT_RESPONSE_TIMEOUT_SECS`].
pub const METHOD_MAX_CONNECT_TIMEOUT_SECS: u64 = 300;
/// Direct-method payloads: at most 128 KB each way.
pub const METHOD_MAX_PAYLOAD_BYTES: usize = 128 * 1024;

/// Scheduled jobs (reference §2.10): jobs scheduled, queued or running at once. IoT Hub caps
/// concurrent jobs at 1 (Free/S1), 5 (S2) or 10 (S3); the emulator behaves like an S3 hub. The next
/// job is refused with `429004 ThrottlingMaxActiveJobCountExceeded`.
pub const JOBS_MAX_ACTIVE: usize = 10;
/// Finished jobs kept for `GET /jobs/v2/{id}` and the jobs query. IoT Hub keeps them for 30 days;
/// the emulator keeps the most recent ones instead, a bound on memory.
pub const JOBS_HISTORY_MAX: usize = 1000;
/// Direct-method calls one method job keeps in flight. Not an IoT Hub number: a bound on the
/// job's own state (IoT Hub throttles per-device job operations instead).
pub const JOBS_METHOD_CONCURRENCY: usize = 64;
/// Devices a job reads from the query engine per page.
pub const JOBS_DEVICE_PAGE: usize = 1000;
/// `maxExecutionTimeInSeconds` when a job request leaves it out (the Node SDK's default).
pub const JOBS_DEFAULT_MAX_EXECUTION_SECS: u64 = 3600;
/// Longest job id, like a device id: 128 characters.
pub const JOB_ID_MAX_CHARS: usize = 128;
/// Default and largest page size of `GET /jobs/v2/query`.
pub const JOBS_QUERY_PAGE_MAX: usize = 1000;

/// Deadlines on every wait a network peer controls. IoT Hub publishes none of these values except
/// where noted; the defaults are the emulator's choices, listed in the README's "Differences".
/// Tests shorten them through [`crate::HubConfig::timeouts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// HTTP/1: a request's headers must arrive within this (slowloris).
    pub http_header_read: std::time::Duration,
    /// HTTP: a keep-alive connection with no request in flight is closed after this (Azure's load
    /// balancers close idle TCP flows after 4 minutes).
    pub http_idle: std::time::Duration,
    /// AMQP: protocol header, SASL and `open` must be done within this of the TCP accept.
    pub amqp_open: std::time::Duration,
    /// AMQP: the idle-time-out the hub announces in its `open`; a connection that sends no frame
    /// for twice this long is closed with `amqp:resource-limit-exceeded`.
    pub amqp_idle: std::time::Duration,
    /// MQTT and AMQP: a write the peer does not take within this (it stopped reading) ends the
    /// connection; MQTT also ends it at the keep-alive deadline if that comes first.
    pub write: std::time::Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        use std::time::Duration;
        Self {
            http_header_read: Duration::from_secs(30),
            http_idle: Duration::from_secs(240),
            amqp_open: Duration::from_secs(10),
            amqp_idle: Duration::from_secs(240),
            write: Duration::from_secs(30),
        }
    }
}
