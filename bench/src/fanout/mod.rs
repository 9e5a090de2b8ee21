//! The C2D fan-out bench's shared pieces (the `fanout` binary and `examples/fanout_alloc.rs`):
//! device naming and credentials, the payload that carries its send time, the lean MQTT codec
//! ([`codec`]), the device-side client process ([`devices`]), the floor broker ([`floor`]) and readers of a server process's
//! CPU time and memory ([`procfs`]).
//!
//! Every process of one run reads the same clock, `CLOCK_MONOTONIC` ([`mono_ns`]), so a latency is
//! the receiver's reading minus the sender's, taken in different processes.

pub mod codec;
pub mod devices;
pub mod floor;
pub mod procfs;
pub mod telemetry;

use std::time::{SystemTime, UNIX_EPOCH};

use iothub_emulator::c2d::{C2dMessage, Delivery, LockToken};

/// The host name every server is told it is (the hub's default): part of each device's username
/// and of its SAS token's audience.
pub const HOSTNAME: &str = "localhost";

/// The symmetric key every bench device is registered with in the hub (base64 of 32 bytes).
pub const DEVICE_KEY: &str = "ZmFub3V0LWJlbmNoLWRldmljZS1rZXktMDAwMDAwMCE=";

/// The api-version devices put in their username, as the SDKs do.
pub const API_VERSION: &str = "2021-04-12";

/// Smallest payload: the send time (8 bytes), the device index (4 bytes) and the round (4 bytes).
pub const MIN_PAYLOAD_BYTES: usize = 16;

/// Most rounds (messages per device) one run may send.
pub const MAX_ROUNDS: u32 = 64;

/// Errors of the bench's library parts.
#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    /// A socket or pipe failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A server sent bytes the codec refused.
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
    /// A server answered something the contract does not allow.
    #[error("{0}")]
    Protocol(String),
    /// A wait passed its deadline.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A credential could not be made.
    #[error("SAS token: {0}")]
    Sas(String),
}

impl FanoutError {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { what: what.into(), source }
    }
}

/// The id of bench device `i` (the same on every server).
pub fn device_id(i: usize) -> String {
    format!("fanout-{i:06}")
}

/// The username IoT Hub's MQTT contract asks for.
pub fn username(id: &str) -> String {
    format!("{HOSTNAME}/{id}/?api-version={API_VERSION}")
}

/// A device-scoped SAS token for `id`, signed with [`DEVICE_KEY`], valid for a day.
pub fn device_token(id: &str) -> Result<String, FanoutError> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    iothub_emulator::sas::make_token(&format!("{HOSTNAME}/devices/{id}"), DEVICE_KEY, None, now + 86_400)
        .map_err(|e| FanoutError::Sas(e.to_string()))
}

/// The filter each device subscribes to.
pub fn c2d_filter(id: &str) -> String {
    format!("devices/{id}/messages/devicebound/#")
}

/// The topic the hub publishes a C2D message sent through its REST extension (no properties,
/// `iothub-ack: none`) on, from the hub's own code: the publisher sends the peers exactly this,
/// and every device checks it receives exactly this from every server.
pub fn c2d_topic(id: &str) -> String {
    let delivery = Delivery {
        message: std::sync::Arc::new(C2dMessage::default()),
        sequence_number: 1,
        enqueued_at: 0,
        expires_at: 0,
        delivery_count: 0,
        lock_token: LockToken(0),
        locked_until: 0,
    };
    iothub_emulator::mqtt::topics::c2d_topic(id, &delivery)
}

/// `CLOCK_MONOTONIC` in nanoseconds: comparable across the processes of one machine.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Writes the payload of round `round` (from 1) for device `index`, sent at `sent_ns`, into
/// `out` (`len` bytes, at least [`MIN_PAYLOAD_BYTES`]).
pub fn payload(out: &mut Vec<u8>, index: usize, round: u32, sent_ns: u64, len: usize) {
    let start = out.len();
    out.extend_from_slice(&sent_ns.to_le_bytes());
    out.extend_from_slice(&(index as u32).to_le_bytes());
    out.extend_from_slice(&round.to_le_bytes());
    out.resize(start + len.max(MIN_PAYLOAD_BYTES), 0);
}

/// The send time, device index and round a payload carries.
pub fn read_payload(p: &[u8]) -> Option<(u64, usize, u32)> {
    let sent = u64::from_le_bytes(p.get(..8)?.try_into().ok()?);
    let index = u32::from_le_bytes(p.get(8..12)?.try_into().ok()?);
    let round = u32::from_le_bytes(p.get(12..16)?.try_into().ok()?);
    Some((sent, index as usize, round))
}

/// Raises this process's open-file soft limit to its hard limit; returns the new soft limit.
/// Children inherit it.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid rlimit for getrlimit/setrlimit to read and write.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

/// The value at quantile `q` (0..=1) of sorted `v`, nearest rank.
pub fn quantile(sorted: &[u32], q: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_and_topic_is_the_hubs() {
        let mut p = Vec::new();
        payload(&mut p, 4242, 2, 123_456_789, 32);
        assert_eq!(p.len(), 32);
        assert_eq!(read_payload(&p), Some((123_456_789, 4242, 2)));
        let t = c2d_topic("fanout-000001");
        assert!(t.starts_with("devices/fanout-000001/messages/devicebound/"), "{t}");
        assert!(t.contains("iothub-ack=none"), "{t}");
        assert_eq!(quantile(&[1, 2, 3, 4], 0.5), Some(2));
        assert_eq!(quantile(&[1, 2, 3, 4], 0.99), Some(4));
    }
}
