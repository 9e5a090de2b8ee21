//! Prometheus metrics: the counters and histograms the hub's hot paths bump, and the text
//! exposition format (version 0.0.4) `GET /metrics` answers with.
//!
//! Owns [`Metrics`], one per hub (inside `Hub`'s shared state). Every counter is a relaxed
//! `AtomicU64` bumped where the event happens: no lock, no allocation, a few nanoseconds. The ones
//! every C2D message bumps from several threads (the C2D counts, the queue-depth histogram and the
//! request-latency histograms) are *striped*: each thread adds to its own copy ([`STRIPES`] of
//! them, each on cache lines of its own) and a scrape adds the copies up, so the fan-out's
//! threads never pull the same line back and forth. Histograms keep one non-cumulative count
//! per bucket plus a sum; a scrape adds the buckets up. The C2D queue-depth histogram counts
//! devices by depth, moved incrementally whenever an operation changes a queue's length (see
//! [`Metrics::c2d_depth_moved`]), so a scrape never walks the devices. Gauges that other owners
//! already keep (registered and connected devices, feedback records, telemetry appended) are read
//! from them at scrape time by the hub (`Hub::prometheus_text`) and written with [`Encoder`].
//!
//! [`Encoder`] is a small hand-written writer of the text format: `# HELP` and `# TYPE` once per
//! family, label values escaped (`\\`, `"`, newline), histograms as cumulative `_bucket{le=…}`
//! series ending in `+Inf`, then `_sum` and `_count`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};

use crate::c2d::FeedbackStatus;
use crate::throttle::Op;

/// The content type of a scrape (Prometheus text exposition format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the request-latency buckets.
pub const LATENCY_BUCKETS_SECONDS: [f64; 14] =
    [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// [`LATENCY_BUCKETS_SECONDS`] in nanoseconds, what observations are compared with.
const LATENCY_BUCKETS_NS: [u64; 14] = [
    100_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    10_000_000_000,
];

/// Upper bounds of the C2D queue-depth buckets (messages; IoT Hub's maximum depth is 50). Depth 0
/// is its own bucket.
pub const QUEUE_DEPTH_BUCKETS: [u64; 8] = [0, 1, 2, 5, 10, 20, 50, 100];

/// The protocols request latency is measured on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// IoT Hub's REST API on the HTTPS port.
    Https,
    /// The plain HTTP port (the same API plus the emulator's own routes).
    Http,
    /// MQTT (over TCP/TLS or WebSocket): the CONNECT decision and each device packet's handling.
    Mqtt,
}

impl Protocol {
    const ALL: [Protocol; 3] = [Protocol::Https, Protocol::Http, Protocol::Mqtt];

    /// The `protocol` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Https => "https",
            Protocol::Http => "http",
            Protocol::Mqtt => "mqtt",
        }
    }
}

/// What a timed request did: the `operation` label (a fixed set, so the series stay bounded
/// whatever paths clients send).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Operation {
    RegistryRead,
    RegistryWrite,
    Query,
    TwinRead,
    TwinUpdate,
    DirectMethod,
    C2dSend,
    C2dReceive,
    C2dSettle,
    C2dPurge,
    D2cSend,
    FeedbackReceive,
    FeedbackSettle,
    Statistics,
    Jobs,
    Dps,
    Emulator,
    Connect,
    Subscribe,
    Ping,
    Other,
}

impl Operation {
    const ALL: [Operation; 21] = [
        Operation::RegistryRead,
        Operation::RegistryWrite,
        Operation::Query,
        Operation::TwinRead,
        Operation::TwinUpdate,
        Operation::DirectMethod,
        Operation::C2dSend,
        Operation::C2dReceive,
        Operation::C2dSettle,
        Operation::C2dPurge,
        Operation::D2cSend,
        Operation::FeedbackReceive,
        Operation::FeedbackSettle,
        Operation::Statistics,
        Operation::Jobs,
        Operation::Dps,
        Operation::Emulator,
        Operation::Connect,
        Operation::Subscribe,
        Operation::Ping,
        Operation::Other,
    ];

    /// The `operation` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::RegistryRead => "registry_read",
            Operation::RegistryWrite => "registry_write",
            Operation::Query => "query",
            Operation::TwinRead => "twin_read",
            Operation::TwinUpdate => "twin_update",
            Operation::DirectMethod => "direct_method",
            Operation::C2dSend => "c2d_send",
            Operation::C2dReceive => "c2d_receive",
            Operation::C2dSettle => "c2d_settle",
            Operation::C2dPurge => "c2d_purge",
            Operation::D2cSend => "d2c_send",
            Operation::FeedbackReceive => "feedback_receive",
            Operation::FeedbackSettle => "feedback_settle",
            Operation::Statistics => "statistics",
            Operation::Jobs => "jobs",
            Operation::Dps => "dps",
            Operation::Emulator => "emulator",
            Operation::Connect => "connect",
            Operation::Subscribe => "subscribe",
            Operation::Ping => "ping",
            Operation::Other => "other",
        }
    }
}

/// Why a device connection was refused: the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// Not MQTT 3.1.1.
    UnsupportedProtocolVersion,
    /// The client id is not a device id.
    BadClientId,
    /// The user name or password is missing or malformed.
    BadUsernamePassword,
    /// The credentials did not verify, or the device does not exist or is disabled.
    NotAuthorized,
    /// The tier's connection rate refused it.
    Throttled,
    /// Anything else (a malformed CONNECT, a first packet that is not CONNECT).
    Other,
}

impl RefusalReason {
    const ALL: [RefusalReason; 6] = [
        RefusalReason::UnsupportedProtocolVersion,
        RefusalReason::BadClientId,
        RefusalReason::BadUsernamePassword,
        RefusalReason::NotAuthorized,
        RefusalReason::Throttled,
        RefusalReason::Other,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::UnsupportedProtocolVersion => "unsupported_protocol_version",
            RefusalReason::BadClientId => "bad_client_id",
            RefusalReason::BadUsernamePassword => "bad_username_password",
            RefusalReason::NotAuthorized => "not_authorized",
            RefusalReason::Throttled => "throttled",
            RefusalReason::Other => "other",
        }
    }
}

/// The device transports connections are counted on (`iothub_device_connections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// MQTT over TCP (TLS on 8883, or plain).
    Mqtt,
    /// MQTT over WebSocket (443, `/$iothub/websocket`).
    MqttWs,
}

impl Transport {
    const ALL: [Transport; 2] = [Transport::Mqtt, Transport::MqttWs];

    /// The `protocol` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Mqtt => "mqtt",
            Transport::MqttWs => "mqtt_ws",
        }
    }
}

/// Copies of each striped counter (see the module doc): threads are given one in turn.
pub const STRIPES: usize = 8;

/// The stripe of the calling thread, given once per thread, round robin.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|s| *s)
}

/// One thread's copy of a histogram: 15 buckets and the sum fill its two cache lines exactly.
#[derive(Debug, Default)]
#[repr(align(128))]
struct HistogramStripe {
    buckets: [AtomicU64; LATENCY_BUCKETS_NS.len() + 1],
    sum_ns: AtomicU64,
}

/// A histogram of durations: non-cumulative bucket counts (the last one is `+Inf`) and the sum
/// in nanoseconds, striped.
#[derive(Debug, Default)]
pub struct Histogram {
    stripes: [HistogramStripe; STRIPES],
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: std::time::Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_NS.partition_point(|b| *b < ns);
        let s = &self.stripes[stripe()];
        s.buckets[i].fetch_add(1, Ordering::Relaxed);
        s.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket (the last is the total) and the sum in seconds.
    fn snapshot(&self) -> (Vec<u64>, f64) {
        let mut acc = 0;
        let cumulative = (0..LATENCY_BUCKETS_NS.len() + 1)
            .map(|i| {
                acc += self.stripes.iter().map(|s| s.buckets[i].load(Ordering::Relaxed)).sum::<u64>();
                acc
            })
            .collect();
        let sum_ns: u64 = self.stripes.iter().map(|s| s.sum_ns.load(Ordering::Relaxed)).sum();
        (cumulative, sum_ns as f64 / 1e9)
    }
}

/// Records the time from its creation to its drop into a histogram: a request timed this way is
/// counted however it ends (answered, refused, or its connection dropped).
#[derive(Debug)]
pub struct Timer<'a> {
    histogram: &'a Histogram,
    started: std::time::Instant,
}

impl<'a> Timer<'a> {
    /// Starts timing into `histogram`.
    pub fn start(histogram: &'a Histogram) -> Self {
        Self { histogram, started: std::time::Instant::now() }
    }
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed());
    }
}

/// What one batch of C2D queue operations did, added to the counters at once (see
/// [`Metrics::add_c2d`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct C2dCounts {
    /// Messages accepted into a queue.
    pub sent: u64,
    /// Deliveries handed to a device (a redelivery counts again).
    pub delivered: u64,
    /// Deliveries abandoned.
    pub abandoned: u64,
    /// Final states, indexed like [`FEEDBACK_STATUSES`].
    pub finished: [u64; 5],
}

/// Every final state a C2D message can reach, in the order counts are kept.
pub const FEEDBACK_STATUSES: [FeedbackStatus; 5] = [
    FeedbackStatus::Success,
    FeedbackStatus::Expired,
    FeedbackStatus::DeliveryCountExceeded,
    FeedbackStatus::Rejected,
    FeedbackStatus::Purged,
];

/// The index of `status` in [`FEEDBACK_STATUSES`].
pub fn status_index(status: FeedbackStatus) -> usize {
    match status {
        FeedbackStatus::Success => 0,
        FeedbackStatus::Expired => 1,
        FeedbackStatus::DeliveryCountExceeded => 2,
        FeedbackStatus::Rejected => 3,
        FeedbackStatus::Purged => 4,
    }
}

/// The hub's metrics (see the module doc).
#[derive(Debug)]
pub struct Metrics {
    c2d: [C2dStripe; STRIPES],
    refused: [[AtomicU64; RefusalReason::ALL.len()]; Transport::ALL.len()],
    connections: [AtomicI64; Transport::ALL.len()],
    throttled: [[AtomicU64; 2]; Op::ALL.len()],
    latency: Box<[Histogram]>,
}

/// One thread's copy of the C2D counters (see the module doc). A copy alone may go negative
/// (a queue grown on one thread and emptied on another); the sum is exact.
#[derive(Debug, Default)]
#[repr(align(128))]
struct C2dStripe {
    sent: AtomicU64,
    delivered: AtomicU64,
    abandoned: AtomicU64,
    finished: [AtomicU64; 5],
    /// Devices whose queue length falls in `QUEUE_DEPTH_BUCKETS[i]` (non-cumulative), for
    /// `i >= 1`; index 0 (empty queues) is derived from the registered count at scrape time.
    depth_devices: [AtomicI64; QUEUE_DEPTH_BUCKETS.len() + 1],
    /// Messages held in all queues.
    depth_sum: AtomicI64,
}

/// Picks one counter out of a [`C2dStripe`] (for summing it over the stripes).
type StripeField = fn(&C2dStripe) -> &AtomicU64;

impl Default for Metrics {
    fn default() -> Self {
        Self {
            c2d: Default::default(),
            refused: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            connections: std::array::from_fn(|_| AtomicI64::new(0)),
            throttled: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            latency: (0..Protocol::ALL.len() * Operation::ALL.len()).map(|_| Histogram::default()).collect(),
        }
    }
}

fn depth_bucket(depth: usize) -> usize {
    QUEUE_DEPTH_BUCKETS.partition_point(|b| (*b as usize) < depth)
}

fn add(counter: &AtomicU64, n: u64) {
    if n > 0 {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Adds what a batch of queue operations did.
    pub fn add_c2d(&self, c: &C2dCounts) {
        let s = &self.c2d[stripe()];
        add(&s.sent, c.sent);
        add(&s.delivered, c.delivered);
        add(&s.abandoned, c.abandoned);
        for (counter, n) in s.finished.iter().zip(c.finished) {
            add(counter, n);
        }
    }

    /// A device's queue went from `before` to `after` messages (a new device: from 0; a deleted
    /// one: to 0).
    pub fn c2d_depth_moved(&self, before: usize, after: usize) {
        if before == after {
            return;
        }
        let s = &self.c2d[stripe()];
        s.depth_sum.fetch_add(after as i64 - before as i64, Ordering::Relaxed);
        let (from, to) = (depth_bucket(before), depth_bucket(after));
        if from != to {
            if from > 0 {
                s.depth_devices[from].fetch_sub(1, Ordering::Relaxed);
            }
            if to > 0 {
                s.depth_devices[to].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A device connection on `transport` was refused for `reason`.
    pub fn connection_refused(&self, transport: Transport, reason: RefusalReason) {
        let r = RefusalReason::ALL.iter().position(|x| *x == reason).unwrap_or(0);
        self.refused[transport as usize][r].fetch_add(1, Ordering::Relaxed);
    }

    /// A device connection on `transport` opened (`+1`) or closed (`-1`).
    pub fn connection_moved(&self, transport: Transport, delta: i64) {
        self.connections[transport as usize].fetch_add(delta, Ordering::Relaxed);
    }

    /// Device connections open on `transport`.
    pub fn connections(&self, transport: Transport) -> usize {
        usize::try_from(self.connections[transport as usize].load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// The tier throttle shaped (`refused == false`) or refused a request of `op`.
    pub fn throttled(&self, op: Op, refused: bool) {
        let i = Op::ALL.iter().position(|x| *x == op).unwrap_or(0);
        self.throttled[i][usize::from(refused)].fetch_add(1, Ordering::Relaxed);
    }

    /// The latency histogram of `operation` on `protocol`.
    pub fn latency(&self, protocol: Protocol, operation: Operation) -> &Histogram {
        &self.latency[protocol as usize * Operation::ALL.len() + operation as usize]
    }

    /// Writes this struct's families (everything but the gauges the hub reads from elsewhere);
    /// `devices` is the registered count, which makes the queue-depth histogram's empty bucket.
    pub fn encode(&self, e: &mut Encoder, devices: u64) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let total = |f: StripeField| self.c2d.iter().map(|s| load(f(s))).sum::<u64>();
        let c2d: [(&str, &str, StripeField); 8] = [
            ("iothub_c2d_messages_sent_total", "C2D messages accepted into a device queue.", |s| &s.sent),
            (
                "iothub_c2d_messages_delivered_total",
                "C2D deliveries handed to a device (a redelivery counts again).",
                |s| &s.delivered,
            ),
            ("iothub_c2d_messages_abandoned_total", "C2D deliveries abandoned by the device.", |s| {
                &s.abandoned
            }),
            ("iothub_c2d_messages_completed_total", "C2D messages completed by the device.", |s| {
                &s.finished[0]
            }),
            ("iothub_c2d_messages_expired_total", "C2D messages whose TTL ran out before completion.", |s| {
                &s.finished[1]
            }),
            (
                "iothub_c2d_messages_dead_lettered_total",
                "C2D messages dead-lettered after the maximum delivery count (DeliveryCountExceeded).",
                |s| &s.finished[2],
            ),
            ("iothub_c2d_messages_rejected_total", "C2D messages rejected by the device.", |s| {
                &s.finished[3]
            }),
            ("iothub_c2d_messages_purged_total", "C2D messages dropped by a queue purge.", |s| {
                &s.finished[4]
            }),
        ];
        for (name, help, counter) in c2d {
            e.family(name, help, "counter");
            e.sample(name, &[], total(counter) as f64);
        }

        // Queue depth: devices by depth; the empty bucket is every other registered device.
        let held: Vec<u64> = (0..QUEUE_DEPTH_BUCKETS.len() + 1)
            .map(|i| {
                self.c2d.iter().map(|s| s.depth_devices[i].load(Ordering::Relaxed)).sum::<i64>().max(0) as u64
            })
            .collect();
        let nonempty: u64 = held[1..].iter().sum();
        let mut counts = vec![devices.saturating_sub(nonempty)];
        counts.extend_from_slice(&held[1..]);
        let mut acc = 0;
        let cumulative: Vec<u64> = counts
            .iter()
            .map(|n| {
                acc += n;
                acc
            })
            .collect();
        let bounds: Vec<f64> = QUEUE_DEPTH_BUCKETS.iter().map(|b| *b as f64).collect();
        let name = "iothub_c2d_queue_depth";
        e.family(name, "Devices by the number of C2D messages their queue holds.", "histogram");
        let sum = self.c2d.iter().map(|s| s.depth_sum.load(Ordering::Relaxed)).sum::<i64>().max(0) as f64;
        e.histogram(name, &[], &bounds, &cumulative, sum);

        let name = "iothub_device_connections";
        e.family(name, "Open device connections by transport.", "gauge");
        for t in Transport::ALL {
            e.sample(
                name,
                &[("protocol", t.as_str())],
                self.connections[t as usize].load(Ordering::Relaxed) as f64,
            );
        }

        let name = "iothub_connections_refused_total";
        e.family(name, "Device connections refused, by transport and reason.", "counter");
        for t in Transport::ALL {
            for (i, r) in RefusalReason::ALL.iter().enumerate() {
                let n = load(&self.refused[t as usize][i]);
                e.sample(name, &[("protocol", t.as_str()), ("reason", r.as_str())], n as f64);
            }
        }

        let name = "iothub_throttled_requests_total";
        e.family(
            name,
            "Requests the tier throttle shaped (delayed) or refused, by IoT Hub operation class.",
            "counter",
        );
        for (i, op) in Op::ALL.iter().enumerate() {
            for (j, outcome) in ["shaped", "refused"].iter().enumerate() {
                let n = load(&self.throttled[i][j]);
                e.sample(name, &[("operation", op.name()), ("outcome", outcome)], n as f64);
            }
        }

        let name = "iothub_request_duration_seconds";
        e.family(name, "Time to handle a request, by protocol and operation.", "histogram");
        for p in Protocol::ALL {
            for o in Operation::ALL {
                let (cumulative, sum) = self.latency(p, o).snapshot();
                if cumulative.last().is_some_and(|n| *n > 0) {
                    let labels = [("protocol", p.as_str()), ("operation", o.as_str())];
                    e.histogram(name, &labels, &LATENCY_BUCKETS_SECONDS, &cumulative, sum);
                }
            }
        }
    }
}

/// Writes the text exposition format into a `String`.
#[derive(Debug, Default)]
pub struct Encoder {
    out: String,
}

impl Encoder {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// The `# HELP` and `# TYPE` lines of a family (write them once, before its samples).
    pub fn family(&mut self, name: &str, help: &str, kind: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample line.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        self.labels(labels, None);
        self.out.push(' ');
        self.value(value);
        self.out.push('\n');
    }

    /// A histogram's series: `cumulative[i]` observations at most `bounds[i]`, the last entry of
    /// `cumulative` (one more than `bounds`) the total.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        bounds: &[f64],
        cumulative: &[u64],
        sum: f64,
    ) {
        let total = cumulative.last().copied().unwrap_or(0);
        for (i, bound) in bounds.iter().enumerate() {
            let mut le = String::new();
            let _ = write!(le, "{bound}");
            self.out.push_str(name);
            self.out.push_str("_bucket");
            self.labels(labels, Some(&le));
            let _ = writeln!(self.out, " {}", cumulative.get(i).copied().unwrap_or(total));
        }
        self.out.push_str(name);
        self.out.push_str("_bucket");
        self.labels(labels, Some("+Inf"));
        let _ = writeln!(self.out, " {total}");
        self.out.push_str(name);
        self.out.push_str("_sum");
        self.labels(labels, None);
        self.out.push(' ');
        self.value(sum);
        self.out.push('\n');
        self.out.push_str(name);
        self.out.push_str("_count");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {total}");
    }

    fn labels(&mut self, labels: &[(&str, &str)], le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let mut first = true;
        for (k, v) in labels.iter().copied().chain(le.map(|v| ("le", v))) {
            if !first {
                self.out.push(',');
            }
            first = false;
            self.out.push_str(k);
            self.out.push_str("=\"");
            for c in v.chars() {
                match c {
                    '\\' => self.out.push_str("\\\\"),
                    '"' => self.out.push_str("\\\""),
                    '\n' => self.out.push_str("\\n"),
                    c => self.out.push(c),
                }
            }
            self.out.push('"');
        }
        self.out.push('}');
    }

    fn value(&mut self, v: f64) {
        if v.is_nan() {
            self.out.push_str("NaN");
        } else if v.is_infinite() {
            self.out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
        } else if v.fract() == 0.0 && v.abs() < 1e15 {
            let _ = write!(self.out, "{}", v as i64);
        } else {
            let _ = write!(self.out, "{v}");
        }
    }

    /// The exposition written so far.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Striped counters add up across threads, and a queue that grew on one thread and emptied
    /// on another leaves the depth histogram as it was.
    #[test]
    fn striped_counts_add_up_across_threads() {
        let m = Metrics::default();
        std::thread::scope(|scope| {
            for _ in 0..2 * STRIPES {
                scope.spawn(|| {
                    m.add_c2d(&C2dCounts { sent: 1, delivered: 2, ..Default::default() });
                    m.c2d_depth_moved(0, 1);
                    m.latency(Protocol::Mqtt, Operation::ALL[0]).observe(Duration::from_micros(50));
                });
            }
        });
        std::thread::scope(|scope| {
            for _ in 0..2 * STRIPES {
                scope.spawn(|| m.c2d_depth_moved(1, 0));
            }
        });
        let mut e = Encoder::default();
        m.encode(&mut e, 3);
        let text = e.finish();
        let n = 2 * STRIPES;
        assert!(text.contains(&format!("iothub_c2d_messages_sent_total {n}\n")), "{text}");
        assert!(text.contains(&format!("iothub_c2d_messages_delivered_total {}\n", 2 * n)), "{text}");
        assert!(text.contains("iothub_c2d_queue_depth_bucket{le=\"0\"} 3\n"), "{text}");
        assert!(text.contains("iothub_c2d_queue_depth_sum 0\n"), "{text}");
        let (counts, sum) = m.latency(Protocol::Mqtt, Operation::ALL[0]).snapshot();
        assert_eq!(counts, vec![n as u64; LATENCY_BUCKETS_NS.len() + 1], "all in the first bucket");
        assert!((sum - n as f64 * 50e-6).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn label_tables_are_in_declaration_order() {
        assert!(Operation::ALL.iter().enumerate().all(|(i, o)| *o as usize == i));
        assert!(Protocol::ALL.iter().enumerate().all(|(i, p)| *p as usize == i));
        assert!(Transport::ALL.iter().enumerate().all(|(i, t)| *t as usize == i));
    }

    #[test]
    fn samples_escape_labels_and_format_values() {
        let mut e = Encoder::new();
        e.family("x_total", "A \\ counter\nwith two lines.", "counter");
        e.sample("x_total", &[], 3.0);
        e.sample("x_total", &[("a", "q\"b\\c\nd"), ("b", "")], 0.25);
        e.sample("x_total", &[("a", "z")], f64::INFINITY);
        let text = e.finish();
        let expected = "# HELP x_total A \\\\ counter\\nwith two lines.\n\
                        # TYPE x_total counter\n\
                        x_total 3\n\
                        x_total{a=\"q\\\"b\\\\c\\nd\",b=\"\"} 0.25\n\
                        x_total{a=\"z\"} +Inf\n";
        assert_eq!(text, expected);
    }

    #[test]
    fn histograms_are_cumulative_and_end_in_inf() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let (cumulative, sum) = h.snapshot();
        assert_eq!(cumulative.len(), LATENCY_BUCKETS_SECONDS.len() + 1);
        // 50 µs and 100 µs (le is inclusive) in the first bucket, 3 ms in le=0.005, 60 s only in +Inf.
        assert_eq!(&cumulative[..5], &[2, 2, 2, 2, 3]);
        assert_eq!(cumulative[LATENCY_BUCKETS_SECONDS.len() - 1], 3);
        assert_eq!(*cumulative.last().unwrap(), 4);
        assert!((sum - 60.00315).abs() < 1e-9, "{sum}");
        let mut e = Encoder::new();
        e.histogram("d_seconds", &[("op", "x")], &[0.1, 1.0], &[1, 2, 3], 4.5);
        assert_eq!(
            e.finish(),
            "d_seconds_bucket{op=\"x\",le=\"0.1\"} 1\n\
             d_seconds_bucket{op=\"x\",le=\"1\"} 2\n\
             d_seconds_bucket{op=\"x\",le=\"+Inf\"} 3\n\
             d_seconds_sum{op=\"x\"} 4.5\n\
             d_seconds_count{op=\"x\"} 3\n"
        );
    }

    #[test]
    fn queue_depth_moves_between_buckets_and_zero_is_derived() {
        let m = Metrics::default();
        m.c2d_depth_moved(0, 1); // device a: 1
        m.c2d_depth_moved(0, 1); // device b: 1
        m.c2d_depth_moved(1, 3); // device b: 3
        m.c2d_depth_moved(3, 3);
        m.c2d_depth_moved(0, 50); // device c: 50
        m.c2d_depth_moved(1, 0); // device a: 0
        let mut e = Encoder::new();
        m.encode(&mut e, 10);
        let text = e.finish();
        for line in [
            "iothub_c2d_queue_depth_bucket{le=\"0\"} 8",
            "iothub_c2d_queue_depth_bucket{le=\"1\"} 8",
            "iothub_c2d_queue_depth_bucket{le=\"2\"} 8",
            "iothub_c2d_queue_depth_bucket{le=\"5\"} 9",
            "iothub_c2d_queue_depth_bucket{le=\"20\"} 9",
            "iothub_c2d_queue_depth_bucket{le=\"50\"} 10",
            "iothub_c2d_queue_depth_bucket{le=\"+Inf\"} 10",
            "iothub_c2d_queue_depth_sum 53",
            "iothub_c2d_queue_depth_count 10",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn every_family_has_help_and_type_once_and_counters_end_in_total() {
        let m = Metrics::default();
        m.add_c2d(&C2dCounts { sent: 2, delivered: 3, abandoned: 1, finished: [1, 0, 0, 1, 0] });
        m.connection_refused(Transport::Mqtt, RefusalReason::NotAuthorized);
        m.throttled(Op::D2cSend, true);
        m.latency(Protocol::Https, Operation::C2dSend).observe(Duration::from_millis(2));
        let mut e = Encoder::new();
        m.encode(&mut e, 5);
        let text = e.finish();
        let mut families = std::collections::BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(families.insert(name.to_string(), kind.to_string()).is_none(), "{name} twice");
                assert!(name.starts_with("iothub_"));
                assert_eq!(kind == "counter", name.ends_with("_total"), "{name} {kind}");
            } else if !line.starts_with("# HELP ") {
                let name = line.split(['{', ' ']).next().unwrap();
                let family =
                    name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
                assert!(families.contains_key(family) || families.contains_key(name), "{line}");
            }
        }
        let has = |l: &str| text.lines().any(|x| x == l);
        assert!(has("iothub_c2d_messages_sent_total 2"));
        assert!(has("iothub_c2d_messages_delivered_total 3"));
        assert!(has("iothub_c2d_messages_completed_total 1"));
        assert!(has("iothub_c2d_messages_rejected_total 1"));
        assert!(has("iothub_c2d_messages_abandoned_total 1"));
        assert!(has("iothub_connections_refused_total{protocol=\"mqtt\",reason=\"not_authorized\"} 1"));
        assert!(has("iothub_throttled_requests_total{operation=\"d2cSends\",outcome=\"refused\"} 1"));
        assert!(has(
            "iothub_request_duration_seconds_bucket{protocol=\"https\",operation=\"c2d_send\",le=\"0.0025\"} 1"
        ));
        assert!(has("iothub_request_duration_seconds_count{protocol=\"https\",operation=\"c2d_send\"} 1"));
        assert!(!text.contains("operation=\"c2d_receive\""), "empty histograms are left out");
    }
}
