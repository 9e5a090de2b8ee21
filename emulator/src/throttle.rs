//! IoT Hub tier throttling (reference §5.1), sans-IO: the per-operation rate table for F1, S1, S2
//! and S3 × units, traffic shaping, and the daily message quota. Owns only arithmetic and the
//! hub-wide bucket state; it never sleeps, reads a clock or logs. Hub time comes in as a parameter
//! (milliseconds), so time travel and compressed scenario time refill the buckets like real time.
//!
//! The hub holds one [`Throttle`] (behind one short `std::sync::Mutex`, only when a tier is
//! configured) and front ends ask it for an [`Admission`] before doing an operation:
//!
//! - [`Admission::Now`]: go ahead.
//! - [`Admission::Shaped`]: accepted, but worked off at the limit rate: wait (in hub time) until
//!   `at_ms`, then go ahead. The request keeps its place; nothing accepted is lost.
//! - [`Admission::Refused`]: the shaping backlog is full (429 `ThrottlingException` /
//!   `ThrottleBacklogLimitExceeded`) or the daily quota is spent (403 `IotHubQuotaExceeded`).
//!
//! Each operation class is a virtual-scheduling bucket (GCRA): `next_ms` is when the work already
//! accepted will have been worked off at the limit rate. A request's lag is `next_ms - now`. Up to
//! [`THROTTLE_BURST_MS`] of lag passes at once (bursts are "first processed"); up to
//! [`THROTTLE_BACKLOG_MS`] more is the shaping backlog (the request waits out the difference);
//! past that the request is refused, with the time until it would fit as `retry_after_ms`. An idle
//! class always admits at once, whatever the request costs.
//!
//! Published figures: the table in [`Tier::rate_per_sec`] and [`Tier::daily_quota`]. Not published,
//! and so ASSUMED: the burst and backlog sizes (in `crate::limits`), that bulk registry calls cost
//! one registry operation, that direct methods are metered on the request payload, which messages
//! count against the quota (D2C and C2D sends), and that the quota day is the UTC day of hub time.

use std::fmt;
use std::str::FromStr;

use serde_json::{Value, json};

use crate::clock::Millis;
use crate::error::ErrorCode;
use crate::limits::{THROTTLE_BACKLOG_MS, THROTTLE_BURST_MS};

/// An IoT Hub pricing tier (Basic tiers are not modelled: they lack C2D, twins and methods).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sku {
    /// Free: one unit, 8,000 messages a day of 0.5 KB.
    F1,
    /// Standard 1.
    S1,
    /// Standard 2.
    S2,
    /// Standard 3.
    S3,
}

impl Sku {
    /// The name as Azure writes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F1 => "F1",
            Self::S1 => "S1",
            Self::S2 => "S2",
            Self::S3 => "S3",
        }
    }

    /// Most units a hub of this tier can have (Azure: F1 1, S1 and S2 200, S3 10).
    pub fn max_units(self) -> u32 {
        match self {
            Self::F1 => 1,
            Self::S1 | Self::S2 => 200,
            Self::S3 => 10,
        }
    }
}

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Sku {
    type Err = TierError;

    fn from_str(s: &str) -> Result<Self, TierError> {
        match s.to_ascii_uppercase().as_str() {
            "F1" => Ok(Self::F1),
            "S1" => Ok(Self::S1),
            "S2" => Ok(Self::S2),
            "S3" => Ok(Self::S3),
            _ => Err(TierError::UnknownSku(s.to_string())),
        }
    }
}

/// Why a tier is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TierError {
    /// Not F1, S1, S2 or S3.
    #[error("tier '{0}' is not one of F1, S1, S2, S3 (Basic tiers are not modelled)")]
    UnknownSku(String),
    /// Units outside what the tier allows.
    #[error("{sku} takes 1 to {max} units; got {units}")]
    Units {
        /// The tier.
        sku: Sku,
        /// Asked for.
        units: u32,
        /// Allowed at most.
        max: u32,
    },
}

/// A tier and its number of units: what IoT Hub scales its throttles and quota by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tier {
    /// The tier.
    pub sku: Sku,
    /// Units (1 for F1).
    pub units: u32,
}

/// One of IoT Hub's throttled operation classes (reference §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Identity registry create, get, list, update, delete (and bulk calls, one each).
    Registry,
    /// New device connections (MQTT CONNECT).
    DeviceConnect,
    /// Device-to-cloud sends (each message of a batch counts).
    D2cSend,
    /// Cloud-to-device sends.
    C2dSend,
    /// Cloud-to-device receives over HTTPS.
    C2dReceive,
    /// File-upload initiations (the emulator has no file upload; kept for the table).
    FileUpload,
    /// Direct methods, metered in 4 KB chunks of payload.
    DirectMethod,
    /// Device queries (`POST /devices/query`).
    Query,
    /// Twin reads (service GET and device GET).
    TwinRead,
    /// Twin updates (service PATCH/PUT and device reported patches).
    TwinUpdate,
    /// Jobs operations (create, get, cancel, query).
    JobsOp,
    /// Jobs per-device operations (a job's twin update or method call on one device).
    JobsDeviceOp,
}

impl Op {
    /// Every class, in table order.
    pub const ALL: [Op; 12] = [
        Op::Registry,
        Op::DeviceConnect,
        Op::D2cSend,
        Op::C2dSend,
        Op::C2dReceive,
        Op::FileUpload,
        Op::DirectMethod,
        Op::Query,
        Op::TwinRead,
        Op::TwinUpdate,
        Op::JobsOp,
        Op::JobsDeviceOp,
    ];

    /// The class's name in reports and logs.
    pub fn name(self) -> &'static str {
        match self {
            Op::Registry => "registryOperations",
            Op::DeviceConnect => "deviceConnections",
            Op::D2cSend => "d2cSends",
            Op::C2dSend => "c2dSends",
            Op::C2dReceive => "c2dReceives",
            Op::FileUpload => "fileUploadInitiations",
            Op::DirectMethod => "directMethods",
            Op::Query => "queries",
            Op::TwinRead => "twinReads",
            Op::TwinUpdate => "twinUpdates",
            Op::JobsOp => "jobsOperations",
            Op::JobsDeviceOp => "jobsPerDeviceOperations",
        }
    }

    /// What one unit of the rate is.
    pub fn unit(self) -> &'static str {
        match self {
            Op::DirectMethod => "4 KB chunks",
            _ => "operations",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes in one direct-method meter chunk (4 KB).
pub const METHOD_CHUNK_BYTES: usize = 4 * 1024;

/// Per minute → per second.
const fn per_min(n: f64) -> f64 {
    n / 60.0
}

impl Tier {
    /// A validated tier: F1 has exactly one unit, S1/S2 up to 200, S3 up to 10.
    pub fn new(sku: Sku, units: u32) -> Result<Self, TierError> {
        if units == 0 || units > sku.max_units() {
            return Err(TierError::Units { sku, units, max: sku.max_units() });
        }
        Ok(Self { sku, units })
    }

    /// The published limit of `op`, per second (chunks per second for direct methods), with the
    /// "higher of" rules (reference §5.1, from the quotas-and-throttling page).
    pub fn rate_per_sec(&self, op: Op) -> f64 {
        use Sku::*;
        let u = f64::from(self.units);
        let (s3, base) = (self.sku == S3, matches!(self.sku, F1 | S1));
        match op {
            // 100/min/unit; S3 5,000/min/unit.
            Op::Registry | Op::C2dSend | Op::FileUpload | Op::JobsOp => {
                if s3 {
                    per_min(5000.0) * u
                } else {
                    per_min(100.0) * u
                }
            }
            // Free/S1: the higher of 100/s or 12/s/unit; S2 120/s/unit; S3 6,000/s/unit.
            Op::DeviceConnect | Op::D2cSend => match self.sku {
                F1 | S1 => (12.0 * u).max(100.0),
                S2 => 120.0 * u,
                S3 => 6000.0 * u,
            },
            // 1,000/min/unit; S3 50,000/min/unit (833.33/s/unit).
            Op::C2dReceive => {
                if s3 {
                    per_min(50_000.0) * u
                } else {
                    per_min(1000.0) * u
                }
            }
            // 160 KB/s/unit, 480 KB/s/unit, 24 MB/s/unit, metered in 4 KB chunks.
            Op::DirectMethod => match self.sku {
                F1 | S1 => 160.0 / 4.0 * u,
                S2 => 480.0 / 4.0 * u,
                S3 => 24.0 * 1024.0 / 4.0 * u,
            },
            // 20/min/unit; S3 1,000/min/unit.
            Op::Query => {
                if s3 {
                    per_min(1000.0) * u
                } else {
                    per_min(20.0) * u
                }
            }
            // Free/S1 100/s; S2 the higher of 100/s or 10/s/unit; S3 500/s/unit.
            Op::TwinRead if base => 100.0,
            Op::TwinRead if s3 => 500.0 * u,
            Op::TwinRead => (10.0 * u).max(100.0),
            // Free/S1 50/s; S2 the higher of 50/s or 5/s/unit; S3 250/s/unit.
            Op::TwinUpdate if base => 50.0,
            Op::TwinUpdate if s3 => 250.0 * u,
            Op::TwinUpdate => (5.0 * u).max(50.0),
            // Free/S1 10/s; S2 the higher of 10/s or 1/s/unit; S3 50/s/unit.
            Op::JobsDeviceOp if base => 10.0,
            Op::JobsDeviceOp if s3 => 50.0 * u,
            Op::JobsDeviceOp => u.max(10.0),
        }
    }

    /// Messages a day (reference §5.1): F1 8,000; S1 400,000, S2 6,000,000, S3 300,000,000 per unit.
    pub fn daily_quota(&self) -> u64 {
        let u = u64::from(self.units);
        match self.sku {
            Sku::F1 => 8_000,
            Sku::S1 => 400_000 * u,
            Sku::S2 => 6_000_000 * u,
            Sku::S3 => 300_000_000 * u,
        }
    }

    /// Bytes of one metered message: 0.5 KB on Free, 4 KB otherwise.
    pub fn quota_chunk_bytes(&self) -> usize {
        if self.sku == Sku::F1 { 512 } else { 4096 }
    }

    /// How many quota messages a message of `bytes` counts as (at least one).
    pub fn quota_messages(&self, bytes: usize) -> u64 {
        bytes.div_ceil(self.quota_chunk_bytes()).max(1) as u64
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} × {} unit{}", self.sku, self.units, if self.units == 1 { "" } else { "s" })
    }
}

/// The direct-method meter: 4 KB chunks of `bytes`, at least one.
pub fn method_chunks(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(METHOD_CHUNK_BYTES).max(1)).unwrap_or(u32::MAX)
}

/// What the throttle says about one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    /// Go ahead now.
    Now,
    /// Accepted into the shaping backlog: go ahead once hub time reaches `at_ms`.
    Shaped {
        /// When the request's turn comes, in hub time.
        at_ms: Millis,
    },
    /// Refused.
    Refused(Refusal),
}

/// A refused request: which limit, the IoT Hub error code to answer with, and when a retry would
/// fit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refusal {
    /// The operation class.
    pub op: Op,
    /// `ThrottlingException`, `ThrottleBacklogLimitExceeded` or `IotHubQuotaExceeded`.
    pub code: ErrorCode,
    /// Milliseconds of hub time until the request would be accepted (the quota: until the next
    /// UTC day).
    pub retry_after_ms: u64,
}

impl Refusal {
    /// Words for the error message and the log line.
    pub fn describe(&self, tier: &Tier) -> String {
        if self.code == ErrorCode::IotHubQuotaExceeded {
            format!(
                "the daily message quota of this {tier} hub ({} messages of {} bytes) is used up until 00:00 UTC",
                tier.daily_quota(),
                tier.quota_chunk_bytes()
            )
        } else {
            format!(
                "{} are throttled at {:.2} {}/s on this {tier} hub and the shaping backlog is full; \
                 retry after {} ms",
                self.op,
                tier.rate_per_sec(self.op),
                self.op.unit(),
                self.retry_after_ms
            )
        }
    }
}

/// One operation class's schedule and counters.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// When the work accepted so far is worked off at the limit rate (hub-time ms, fractional).
    next_ms: f64,
    admitted: u64,
    shaped: u64,
    refused: u64,
}

/// The daily message quota's meter.
#[derive(Debug, Clone, Copy, Default)]
struct Quota {
    /// The UTC day (days since the epoch, hub time) `used` belongs to.
    day: u64,
    used: u64,
    refused: u64,
}

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// The hub's throttle: one bucket per operation class and the quota meter. Small (a few hundred
/// bytes) and per hub, never per device.
#[derive(Debug, Clone)]
pub struct Throttle {
    tier: Tier,
    buckets: [Bucket; Op::ALL.len()],
    quota: Quota,
}

impl Throttle {
    /// A throttle for `tier`, every bucket idle and the quota unused.
    pub fn new(tier: Tier) -> Self {
        Self { tier, buckets: [Bucket::default(); Op::ALL.len()], quota: Quota::default() }
    }

    /// The tier.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// Milliseconds one unit of `op` takes at the limit rate.
    fn interval_ms(&self, op: Op) -> f64 {
        1000.0 / self.tier.rate_per_sec(op)
    }

    /// Asks to do `cost` units of `op` at hub time `now` (ops; chunks for direct methods).
    pub fn admit(&mut self, op: Op, cost: u32, now: Millis) -> Admission {
        self.schedule(op, cost, now, Some(THROTTLE_BACKLOG_MS))
    }

    /// Like [`Throttle::admit`], but never refuses: the hub's own paced work (a job walking its
    /// devices) waits as long as the rate needs.
    pub fn reserve(&mut self, op: Op, cost: u32, now: Millis) -> Admission {
        self.schedule(op, cost, now, None)
    }

    /// Asks to send a message of `bytes` (a D2C or C2D send): the quota is checked first, then the
    /// rate; the quota is charged only for an admitted message.
    pub fn admit_message(&mut self, op: Op, bytes: usize, now: Millis) -> Admission {
        let day = now / DAY_MS;
        if self.quota.day != day {
            self.quota = Quota { day, ..Quota::default() };
        }
        let messages = self.tier.quota_messages(bytes);
        if self.quota.used + messages > self.tier.daily_quota() {
            self.quota.refused += 1;
            return Admission::Refused(Refusal {
                op,
                code: ErrorCode::IotHubQuotaExceeded,
                retry_after_ms: (day + 1) * DAY_MS - now,
            });
        }
        let admission = self.admit(op, 1, now);
        if !matches!(admission, Admission::Refused(_)) {
            self.quota.used += messages;
        }
        admission
    }

    fn schedule(&mut self, op: Op, cost: u32, now: Millis, backlog_ms: Option<u64>) -> Admission {
        let work_ms = self.interval_ms(op) * f64::from(cost.max(1));
        let bucket = &mut self.buckets[op.index()];
        let now_f = now as f64;
        let start = bucket.next_ms.max(now_f);
        let lag = start - now_f;
        let burst = THROTTLE_BURST_MS as f64;
        if lag <= burst {
            bucket.next_ms = start + work_ms;
            bucket.admitted += 1;
            return Admission::Now;
        }
        let wait = lag - burst;
        if let Some(backlog) = backlog_ms
            && wait > backlog as f64
        {
            bucket.refused += 1;
            let code = if op == Op::D2cSend {
                ErrorCode::ThrottleBacklogLimitExceeded
            } else {
                ErrorCode::ThrottlingException
            };
            return Admission::Refused(Refusal {
                op,
                code,
                retry_after_ms: (wait - backlog as f64).ceil() as u64,
            });
        }
        bucket.next_ms = start + work_ms;
        bucket.admitted += 1;
        bucket.shaped += 1;
        Admission::Shaped { at_ms: now + wait.ceil() as u64 }
    }

    /// Counters and settings for the admin API: per class the rate, admitted (of which shaped)
    /// and refused requests; the quota's use today.
    pub fn stats_json(&self, now: Millis) -> Value {
        let ops: serde_json::Map<String, Value> = Op::ALL
            .iter()
            .map(|&op| {
                let b = &self.buckets[op.index()];
                let v = json!({
                    "ratePerSec": self.tier.rate_per_sec(op),
                    "unit": op.unit(),
                    "admitted": b.admitted,
                    "shaped": b.shaped,
                    "refused": b.refused,
                });
                (op.name().to_string(), v)
            })
            .collect();
        let used = if self.quota.day == now / DAY_MS { self.quota.used } else { 0 };
        json!({
            "tier": self.tier.sku.name(),
            "units": self.tier.units,
            "burstMs": THROTTLE_BURST_MS,
            "backlogMs": THROTTLE_BACKLOG_MS,
            "operations": ops,
            "quota": {
                "messagesPerDay": self.tier.daily_quota(),
                "chunkBytes": self.tier.quota_chunk_bytes(),
                "usedToday": used,
                "refused": self.quota.refused,
            },
        })
    }

    /// Requests of `op` refused so far.
    pub fn refused(&self, op: Op) -> u64 {
        self.buckets[op.index()].refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_700_000_000_000;

    fn tier(sku: Sku, units: u32) -> Tier {
        Tier::new(sku, units).expect("valid tier")
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6 * b.max(1.0)
    }

    #[test]
    fn tiers_validate_units() {
        assert!(Tier::new(Sku::F1, 1).is_ok());
        assert_eq!(Tier::new(Sku::F1, 2), Err(TierError::Units { sku: Sku::F1, units: 2, max: 1 }));
        assert!(Tier::new(Sku::S1, 0).is_err());
        assert!(Tier::new(Sku::S1, 200).is_ok());
        assert!(Tier::new(Sku::S3, 11).is_err());
        assert_eq!("s2".parse::<Sku>(), Ok(Sku::S2));
        assert!("B1".parse::<Sku>().is_err());
    }

    #[test]
    fn rates_follow_the_published_table() {
        let s1 = tier(Sku::S1, 1);
        assert!(close(s1.rate_per_sec(Op::Registry), 100.0 / 60.0));
        assert!(close(s1.rate_per_sec(Op::C2dSend), 100.0 / 60.0));
        assert!(close(s1.rate_per_sec(Op::C2dReceive), 1000.0 / 60.0));
        assert!(close(s1.rate_per_sec(Op::Query), 20.0 / 60.0));
        assert!(close(s1.rate_per_sec(Op::DirectMethod), 40.0)); // 160 KB/s in 4 KB chunks
        assert!(close(s1.rate_per_sec(Op::JobsDeviceOp), 10.0));
        let s3 = tier(Sku::S3, 10);
        assert!(close(s3.rate_per_sec(Op::Registry), 5000.0 / 60.0 * 10.0));
        assert!(close(s3.rate_per_sec(Op::C2dSend), 5000.0 / 60.0 * 10.0));
        assert!(close(s3.rate_per_sec(Op::C2dReceive), 833.333_333_333 * 10.0));
        assert!(close(s3.rate_per_sec(Op::D2cSend), 60_000.0));
        assert!(close(s3.rate_per_sec(Op::TwinRead), 5000.0));
        assert!(close(s3.rate_per_sec(Op::TwinUpdate), 2500.0));
        assert!(close(s3.rate_per_sec(Op::Query), 1000.0 / 60.0 * 10.0));
        let s2 = tier(Sku::S2, 3);
        assert!(close(s2.rate_per_sec(Op::D2cSend), 360.0));
        assert!(close(s2.rate_per_sec(Op::DirectMethod), 360.0));
    }

    #[test]
    fn higher_of_rules_pick_the_floor_until_units_pass_it() {
        // Free/S1 connections and D2C: the higher of 100/s or 12/s/unit.
        assert!(close(tier(Sku::S1, 1).rate_per_sec(Op::DeviceConnect), 100.0));
        assert!(close(tier(Sku::S1, 8).rate_per_sec(Op::D2cSend), 100.0));
        assert!(close(tier(Sku::S1, 9).rate_per_sec(Op::D2cSend), 108.0));
        assert!(close(tier(Sku::F1, 1).rate_per_sec(Op::DeviceConnect), 100.0));
        // S2 twin reads: the higher of 100/s or 10/s/unit; updates 50/s or 5/s/unit; jobs 10 or 1.
        assert!(close(tier(Sku::S2, 5).rate_per_sec(Op::TwinRead), 100.0));
        assert!(close(tier(Sku::S2, 20).rate_per_sec(Op::TwinRead), 200.0));
        assert!(close(tier(Sku::S2, 20).rate_per_sec(Op::TwinUpdate), 100.0));
        assert!(close(tier(Sku::S2, 9).rate_per_sec(Op::TwinUpdate), 50.0));
        assert!(close(tier(Sku::S2, 30).rate_per_sec(Op::JobsDeviceOp), 30.0));
        // Free/S1 twin limits do not scale with units.
        assert!(close(tier(Sku::S1, 50).rate_per_sec(Op::TwinRead), 100.0));
        assert!(close(tier(Sku::S1, 50).rate_per_sec(Op::TwinUpdate), 50.0));
    }

    #[test]
    fn bursts_pass_then_are_shaped_then_refused() {
        // S1 × 1 registry: one operation per 600 ms; 1 s of burst, 5 s of backlog.
        let mut t = Throttle::new(tier(Sku::S1, 1));
        let mut outcomes = Vec::new();
        for _ in 0..20 {
            outcomes.push(t.admit(Op::Registry, 1, T0));
        }
        // Lags 0 and 600 ms pass; 1200 … 6000 ms are shaped (wait = lag − 1000); then refused.
        assert_eq!(outcomes[0], Admission::Now);
        assert_eq!(outcomes[1], Admission::Now);
        assert_eq!(outcomes[2], Admission::Shaped { at_ms: T0 + 200 });
        assert_eq!(outcomes[3], Admission::Shaped { at_ms: T0 + 800 });
        assert_eq!(outcomes[10], Admission::Shaped { at_ms: T0 + 5000 });
        match outcomes[11] {
            Admission::Refused(r) => {
                assert_eq!(r.code, ErrorCode::ThrottlingException);
                assert_eq!(r.op, Op::Registry);
                assert_eq!(r.retry_after_ms, 600);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(outcomes[11..].iter().all(|o| matches!(o, Admission::Refused(_))));
        assert_eq!(t.refused(Op::Registry), 9);
        // A refusal takes no slot: once its retry-after has passed, the same request fits.
        assert!(
            matches!(t.admit(Op::Registry, 1, T0 + 600), Admission::Shaped { at_ms } if at_ms == T0 + 5600)
        );
        // Other classes are untouched.
        assert_eq!(t.admit(Op::TwinRead, 1, T0), Admission::Now);
    }

    #[test]
    fn sequential_callers_are_shaped_to_the_rate_and_never_refused() {
        // Queries at S1 × 1: 20/min, one every 3 s. A caller that waits for each answer.
        let mut t = Throttle::new(tier(Sku::S1, 1));
        let mut now = T0;
        for _ in 0..50 {
            match t.admit(Op::Query, 1, now) {
                Admission::Now => {}
                Admission::Shaped { at_ms } => now = at_ms,
                Admission::Refused(r) => panic!("a sequential caller was refused: {r:?}"),
            }
        }
        // 50 queries at 3 s each, the first burst second free: 49 × 3 s − 1 s after the start.
        assert_eq!(now - T0, 49 * 3000 - 1000);
    }

    #[test]
    fn hub_time_refills_the_buckets() {
        let mut t = Throttle::new(tier(Sku::S1, 1));
        while !matches!(t.admit(Op::C2dSend, 1, T0), Admission::Refused(_)) {}
        // A time-travel jump past the backlog empties it: the next send passes at once.
        assert_eq!(t.admit(Op::C2dSend, 1, T0 + 60_000), Admission::Now);
    }

    #[test]
    fn method_cost_counts_4_kb_chunks_and_an_idle_class_admits_any_cost() {
        assert_eq!(method_chunks(0), 1);
        assert_eq!(method_chunks(4096), 1);
        assert_eq!(method_chunks(4097), 2);
        assert_eq!(method_chunks(128 * 1024), 32);
        // S1: 40 chunks/s. 32 chunks pass at once (idle), the next 32 start 800 ms later: within
        // the burst. A third starts at 1600 ms: shaped by 600 ms.
        let mut t = Throttle::new(tier(Sku::S1, 1));
        assert_eq!(t.admit(Op::DirectMethod, 32, T0), Admission::Now);
        assert_eq!(t.admit(Op::DirectMethod, 32, T0), Admission::Now);
        assert_eq!(t.admit(Op::DirectMethod, 32, T0), Admission::Shaped { at_ms: T0 + 600 });
    }

    #[test]
    fn quota_meters_chunks_and_resets_at_the_utc_day() {
        let s1 = tier(Sku::S1, 1);
        assert_eq!(s1.quota_messages(0), 1);
        assert_eq!(s1.quota_messages(4096), 1);
        assert_eq!(s1.quota_messages(4097), 2);
        let f1 = tier(Sku::F1, 1);
        assert_eq!(f1.quota_messages(512), 1);
        assert_eq!(f1.quota_messages(4096), 8);
        assert_eq!(f1.daily_quota(), 8_000);
        assert_eq!(tier(Sku::S2, 2).daily_quota(), 12_000_000);
        assert_eq!(tier(Sku::S3, 1).daily_quota(), 300_000_000);

        // F1: 8,000 half-KB messages a day; a 4 KB message is 8 of them.
        let day_start = (T0 / DAY_MS) * DAY_MS;
        let mut t = Throttle::new(f1);
        let mut now = day_start;
        for _ in 0..1000 {
            // Spread over the day so the rate (100/s) never bites.
            assert!(!matches!(t.admit_message(Op::D2cSend, 4096, now), Admission::Refused(_)));
            now += 20;
        }
        match t.admit_message(Op::D2cSend, 1, now) {
            Admission::Refused(r) => {
                assert_eq!(r.code, ErrorCode::IotHubQuotaExceeded);
                assert_eq!(r.retry_after_ms, day_start + DAY_MS - now);
                assert!(r.describe(&f1).contains("8000 messages of 512 bytes"), "{}", r.describe(&f1));
            }
            other => panic!("expected the quota to be used up, got {other:?}"),
        }
        // The next UTC day (here reached by a time jump) starts afresh.
        assert_eq!(t.admit_message(Op::D2cSend, 1, day_start + DAY_MS), Admission::Now);
        assert_eq!(t.stats_json(day_start + DAY_MS)["quota"]["usedToday"], 1);
    }

    #[test]
    fn d2c_refusals_name_the_backlog_and_rate_refusals_are_not_charged() {
        let mut t = Throttle::new(tier(Sku::S1, 1));
        let mut last = Admission::Now;
        let mut sent = 0;
        while !matches!(last, Admission::Refused(_)) {
            last = t.admit_message(Op::D2cSend, 10, T0);
            sent += 1;
        }
        let Admission::Refused(r) = last else { unreachable!() };
        assert_eq!(r.code, ErrorCode::ThrottleBacklogLimitExceeded);
        // 100/s: 1 s burst + 5 s backlog = 600 messages, plus the one at lag 0.
        assert_eq!(sent - 1, 601);
        assert_eq!(t.stats_json(T0)["quota"]["usedToday"], 601);
    }

    #[test]
    fn reserve_never_refuses() {
        let mut t = Throttle::new(tier(Sku::S1, 1));
        let mut last = Admission::Now;
        for _ in 0..200 {
            last = t.reserve(Op::JobsDeviceOp, 1, T0);
        }
        // 10/s: the 200th starts 19.9 s in, 18.9 s past the burst.
        assert_eq!(last, Admission::Shaped { at_ms: T0 + 18_900 });
    }
}
