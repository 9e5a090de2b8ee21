//! The types the runner exchanges with whatever hub and fleet it drives: telemetry and feedback
//! read from the hub, C2D sends and their outcomes, where agents connect. A leaf module: the hub
//! sides ([`super::embedded`], [`super::external`]), the fleet sides and the timeline all import
//! it, and it imports none of them.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use simulated_devices::agent::{FtpBackend, tls_config};
use simulated_devices::fleet::{FleetConfig, Registration};

/// Installs (FTP sessions) at once across an in-process fleet or one shard process.
pub(crate) const MAX_CONCURRENT_INSTALLS: usize = 50;

/// One D2C message whose body is JSON.
#[derive(Debug, Clone)]
pub struct Telemetry {
    /// The sending device.
    pub device_id: String,
    /// When the hub received it (Unix milliseconds).
    pub enqueued_at: u64,
    /// The agent's `installState` event in the body.
    pub event: InstallEvent,
}

/// The fields of an agent's `installState` telemetry event the runner reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallEvent {
    /// `installState`.
    pub state: String,
    /// `targetVersion`.
    pub target_version: Option<String>,
    /// `timestamp`: the device's time of the transition (ISO 8601).
    pub timestamp: Option<String>,
}

impl InstallEvent {
    /// The event in a telemetry body; `None` for other bodies. Read without building a JSON
    /// tree: a million-device release sends millions of them.
    pub fn parse(body: &[u8]) -> Option<Self> {
        use std::borrow::Cow;
        #[derive(serde::Deserialize)]
        struct Raw<'a> {
            #[serde(borrow)]
            event: Option<Cow<'a, str>>,
            #[serde(rename = "installState", borrow)]
            state: Option<Cow<'a, str>>,
            #[serde(rename = "targetVersion", borrow)]
            target_version: Option<Cow<'a, str>>,
            #[serde(borrow)]
            timestamp: Option<Cow<'a, str>>,
        }
        let raw: Raw<'_> = serde_json::from_slice(body).ok()?;
        if raw.event.as_deref() != Some("installState") {
            return None;
        }
        Some(Self {
            state: raw.state.map(Cow::into_owned).unwrap_or_default(),
            target_version: raw.target_version.map(Cow::into_owned),
            timestamp: raw.timestamp.map(Cow::into_owned),
        })
    }
}

/// One feedback record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feedback {
    /// IoT Hub's `statusCode` (`Success`, `Expired`, …).
    pub status: String,
    /// The message id the runner sent.
    pub original_message_id: String,
}

/// What the hub said to a C2D send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Queued at this hub time (Unix milliseconds).
    Accepted(u64),
    /// Refused with `DeviceMaximumQueueDepthExceeded`.
    QueueFull,
    /// Refused for another reason (unknown device, …).
    Refused,
}

/// A C2D message the runner sends (always with `iothub-ack: full`).
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// The device.
    pub device_id: &'a str,
    /// `iothub-messageid`, which feedback records name.
    pub message_id: String,
    /// The body (shared by every message of a release).
    pub body: &'a [u8],
    /// Time to live (the hub's default when `None`).
    pub ttl: Option<Duration>,
    /// The content type.
    pub content_type: &'a str,
}

/// Where agents connect (the hub side decides); the same for an in-process fleet and each shard.
#[derive(Debug, Clone)]
pub struct ShardLink {
    /// The hub's host name.
    pub hub_host: String,
    /// MQTT host.
    pub mqtt_host: String,
    /// MQTT port.
    pub mqtt_port: u16,
    /// CA for MQTT over TLS (`None`: plain).
    pub ca_pem: Option<String>,
    /// FTP `host:port`.
    pub ftp_addr: String,
}

impl ShardLink {
    /// The configuration of a fleet of `ids` reaching this hub: seeded registration under
    /// `fleet_key`, files under `data_root`, `ramp_per_sec` connects a second (0: all at once),
    /// every device starting on `initial_version`; and its FTP backend.
    pub fn fleet_config(
        &self,
        ids: Vec<String>,
        fleet_key: &str,
        data_root: PathBuf,
        ramp_per_sec: u32,
        initial_version: &str,
    ) -> Result<(FleetConfig, FtpBackend), String> {
        let tls = self.ca_pem.as_deref().map(tls_config).transpose()?;
        let cfg = FleetConfig {
            device_ids: ids,
            fleet_key: fleet_key.into(),
            registration: Registration::Seeded,
            data_root,
            hub_host: self.hub_host.clone(),
            mqtt_host: self.mqtt_host.clone(),
            mqtt_port: self.mqtt_port,
            tls,
            keep_alive: Duration::from_secs(60),
            ramp_per_sec,
            max_concurrent_installs: MAX_CONCURRENT_INSTALLS,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            initial_version: Some(initial_version.to_string()),
            update_retry: Default::default(),
            x509: None,
        };
        Ok((cfg, FtpBackend::new(self.ftp_addr.clone())))
    }
}

/// Now as Unix milliseconds (an external hub's clock is assumed to be this machine's).
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_events_are_read_and_other_bodies_skipped() {
        let body = br#"{"event":"installState","deviceId":"d","installState":"installed","targetVersion":"2.0.0","appVersion":"2.0.0","timestamp":"2026-12-03T07:00:00.000Z"}"#;
        let e = InstallEvent::parse(body).unwrap();
        assert_eq!(e.state, "installed");
        assert_eq!(e.target_version.as_deref(), Some("2.0.0"));
        assert_eq!(e.timestamp.as_deref(), Some("2026-12-03T07:00:00.000Z"));
        let escaped =
            br#"{"event":"installState","installState":"failed","reason":"x","targetVersion":"2.0\u002e0"}"#;
        assert_eq!(InstallEvent::parse(escaped).unwrap().target_version.as_deref(), Some("2.0.0"));
        assert_eq!(InstallEvent::parse(br#"{"event":"other"}"#), None);
        assert_eq!(InstallEvent::parse(b"temperature=3"), None);
    }
}
