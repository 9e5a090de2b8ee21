//! What the runner drives, in either mode. [`HubSide`] is the hub: an embedded
//! [`RunningHub`] read through its in-process handle, or an [`ExternalHub`] reached only over the
//! wire. [`FleetSide`] is the fleet: agents in this process, or `fleet run` processes elsewhere
//! that the runner only observes through the registry. The timeline and expectation code in
//! [`super`] calls these and never asks which mode it is in; each side owns its handles and
//! its read positions (telemetry sequence, feedback) and nothing else.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use iothub_emulator::c2d::{AckMode, C2dMessage, QueueConfig};
use iothub_emulator::server::{ListenConfig, RunningHub};
use iothub_emulator::{ErrorCode, HubConfig};
use serde_json::Value;
use simulated_devices::agent::{FtpBackend, tls_config};
use simulated_devices::fleet::{Fleet, FleetConfig, Registration};
use simulated_devices::service_client::ServiceClient;

use super::RunError;
use super::external::ExternalHub;
use super::shards::{ShardLink, ShardedFleet};
use crate::scenario::plan::HubPlan;

/// Telemetry messages read from an embedded hub per call.
const TELEMETRY_BATCH: usize = 1000;
/// Installs (FTP sessions) at once across an in-process fleet.
pub(crate) const MAX_CONCURRENT_INSTALLS: usize = 50;

/// One D2C message whose body is JSON.
#[derive(Debug, Clone)]
pub struct Telemetry {
    /// The sending device.
    pub device_id: String,
    /// When the hub received it (Unix milliseconds).
    pub enqueued_at: u64,
    /// The body.
    pub body: Value,
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

/// The hub the run drives.
pub enum HubSide {
    /// Started by the runner in this process; read through the [`iothub_emulator::Hub`] handle.
    Embedded {
        /// The hub.
        hub: Box<RunningHub>,
        /// The last telemetry sequence number read.
        telemetry_after: u64,
    },
    /// Running elsewhere; reached over REST, AMQP and the admin endpoints only.
    External(Box<ExternalHub>),
}

/// Now as Unix milliseconds (an external hub's clock is assumed to be this machine's).
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl HubSide {
    /// Starts the embedded hub (every listener on a free loopback port, files under
    /// `<work_dir>/hub`) or connects to the external one.
    pub async fn start(plan: &HubPlan, work_dir: &Path) -> Result<Self, RunError> {
        match *plan {
            HubPlan::Embedded { feedback_interval, c2d_default_ttl } => {
                let config = HubConfig {
                    feedback_batch_interval_ms: feedback_interval.as_millis() as u64,
                    c2d: QueueConfig {
                        default_ttl_ms: c2d_default_ttl.as_millis() as u64,
                        ..QueueConfig::default()
                    },
                    ..HubConfig::default()
                };
                let listen = ListenConfig::ephemeral(IpAddr::V4(Ipv4Addr::LOCALHOST));
                let hub = RunningHub::start(config, &listen, &work_dir.join("hub"))
                    .await
                    .map_err(|e| RunError::Setup(format!("starting the hub: {e}")))?;
                Ok(Self::Embedded { hub: Box::new(hub), telemetry_after: 0 })
            }
            HubPlan::External { .. } => Ok(Self::External(Box::new(ExternalHub::connect(plan).await?))),
        }
    }

    /// The embedded hub, for features that need in-process control (FTP faults).
    pub fn embedded(&self) -> Option<&RunningHub> {
        match self {
            Self::Embedded { hub, .. } => Some(hub),
            Self::External(_) => None,
        }
    }

    /// A service client for the registry, twins and queries: over the embedded hub's HTTPS port,
    /// or `hub.http_url` for an external hub.
    pub fn service_client(&self) -> Result<ServiceClient, RunError> {
        match self {
            Self::Embedded { hub, .. } => ServiceClient::new(
                &hub.owner_connection_string(),
                &format!("https://127.0.0.1:{}", hub.https_addr.port()),
                Some(&hub.ca_pem),
            )
            .map_err(|e| RunError::Setup(format!("service client: {e}"))),
            Self::External(x) => Ok(x.service().clone()),
        }
    }

    /// How an in-process fleet of `ids` reaches this hub: the embedded hub's plain MQTT listener,
    /// or an external hub's MQTT over TLS at its host name (resolved by the MQTT client on every
    /// connect); FTP at [`Self::ftp_addr`]. Every device starts on `initial_version`.
    pub fn fleet_config(
        &self,
        ids: Vec<String>,
        fleet_key: &str,
        data_root: PathBuf,
        ramp_per_sec: u32,
        initial_version: &str,
    ) -> Result<(FleetConfig, FtpBackend), RunError> {
        let link = self.link()?;
        let tls = match &link.ca_pem {
            Some(pem) => Some(tls_config(pem).map_err(|e| RunError::Setup(format!("hub.ca_file: {e}")))?),
            None => None,
        };
        let cfg = FleetConfig {
            device_ids: ids,
            fleet_key: fleet_key.into(),
            registration: Registration::Seeded,
            data_root,
            hub_host: link.hub_host,
            mqtt_host: link.mqtt_host,
            mqtt_port: link.mqtt_port,
            tls,
            keep_alive: Duration::from_secs(60),
            ramp_per_sec,
            max_concurrent_installs: MAX_CONCURRENT_INSTALLS,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            initial_version: Some(initial_version.to_string()),
            update_retry: Default::default(),
        };
        Ok((cfg, FtpBackend::new(self.ftp_addr())))
    }

    /// Where agents connect: the embedded hub's plain MQTT listener, or an external hub's MQTT
    /// over TLS at its host name; FTP at [`Self::ftp_addr`].
    pub fn link(&self) -> Result<ShardLink, RunError> {
        let (hub_host, mqtt_host, mqtt_port, ca_pem) = match self {
            Self::Embedded { hub, .. } => {
                let plain = hub
                    .mqtt_plain_addr
                    .ok_or_else(|| RunError::Setup("the hub has no plain MQTT listener".into()))?;
                (hub.hub.hostname().to_string(), plain.ip().to_string(), plain.port(), None)
            }
            Self::External(x) => {
                (x.host().to_string(), x.host().to_string(), x.mqtt_port(), Some(x.ca_pem().to_string()))
            }
        };
        Ok(ShardLink { hub_host, mqtt_host, mqtt_port, ca_pem, ftp_addr: self.ftp_addr() })
    }

    /// The directory the hub's FTP server serves packages from.
    pub fn packages_dir(&self) -> &Path {
        match self {
            Self::Embedded { hub, .. } => &hub.packages_dir,
            Self::External(x) => x.packages_dir(),
        }
    }

    /// The FTP server as devices reach it (`host:port`), for update notices.
    pub fn ftp_addr(&self) -> String {
        match self {
            Self::Embedded { hub, .. } => hub.ftp_addr.map(|a| a.to_string()).unwrap_or_default(),
            Self::External(x) => x.ftp_addr().to_string(),
        }
    }

    /// The hub's time (Unix milliseconds).
    pub fn now(&self) -> u64 {
        match self {
            Self::Embedded { hub, .. } => hub.hub.now(),
            Self::External(_) => unix_ms(),
        }
    }

    /// Sends every message with `iothub-ack: full`, in order; one outcome per message. An
    /// external hub gets them pipelined on its AMQP connection.
    pub async fn send_all(&mut self, msgs: Vec<Outgoing<'_>>) -> Vec<Sent> {
        match self {
            Self::Embedded { hub, .. } => {
                let hub = &hub.hub;
                msgs.into_iter()
                    .map(|m| {
                        let msg = C2dMessage {
                            message_id: Some(m.message_id.to_string()),
                            content_type: Some(m.content_type.to_string()),
                            ack: AckMode::Full,
                            expiry: m.ttl.map(|t| hub.now() + t.as_millis() as u64),
                            body: m.body.to_vec().into(),
                            ..C2dMessage::default()
                        };
                        match hub.send_c2d(m.device_id, msg) {
                            Ok(_) => Sent::Accepted(hub.now()),
                            Err(e) if e.code == ErrorCode::DeviceMaximumQueueDepthExceeded => Sent::QueueFull,
                            Err(_) => Sent::Refused,
                        }
                    })
                    .collect()
            }
            Self::External(x) => x.send_all(msgs).await,
        }
    }

    /// D2C messages with a JSON body received since the last call, oldest first.
    pub async fn telemetry(&mut self) -> Result<Vec<Telemetry>, RunError> {
        match self {
            Self::Embedded { hub, telemetry_after } => {
                let mut out = Vec::new();
                loop {
                    let batch = hub.hub.read_telemetry(None, *telemetry_after, TELEMETRY_BATCH);
                    let Some(last) = batch.last() else { break };
                    *telemetry_after = last.sequence;
                    out.extend(batch.into_iter().filter_map(|m| {
                        let body = serde_json::from_slice(&m.body).ok()?;
                        Some(Telemetry { device_id: m.device_id, enqueued_at: m.enqueued_at, body })
                    }));
                }
                Ok(out)
            }
            Self::External(x) => x.telemetry(),
        }
    }

    /// Feedback records received since the last call (each batch is completed).
    pub async fn feedback(&mut self) -> Result<Vec<Feedback>, RunError> {
        match self {
            Self::Embedded { hub, .. } => {
                let hub = &hub.hub;
                let mut out = Vec::new();
                while let Some(d) = hub.receive_feedback() {
                    let records: Vec<Value> = serde_json::from_slice(&d.message.body).unwrap_or_default();
                    out.extend(records.iter().map(|r| Feedback {
                        status: r["statusCode"].as_str().unwrap_or_default().to_string(),
                        original_message_id: r["originalMessageId"].as_str().unwrap_or_default().to_string(),
                    }));
                    let _ = hub.settle_feedback(d.lock_token, false);
                }
                Ok(out)
            }
            Self::External(x) => x.feedback(),
        }
    }

    /// Which of `ids` have a twin reporting `appVersion` = `version`.
    pub async fn reporting(&mut self, version: &str, ids: &[&str]) -> Result<HashSet<String>, RunError> {
        match self {
            Self::Embedded { hub, .. } => Ok(ids
                .iter()
                .filter(|id| {
                    let twin = hub.hub.get_twin(id).unwrap_or_default();
                    twin.pointer("/properties/reported/appVersion").and_then(Value::as_str) == Some(version)
                })
                .map(|id| id.to_string())
                .collect()),
            Self::External(x) => x.reporting(version, ids).await,
        }
    }

    /// The `appVersion` every device's twin reports, by device id (devices reporting none are
    /// absent).
    pub async fn app_versions(&self, ids: &[String]) -> Result<HashMap<String, String>, RunError> {
        match self {
            Self::Embedded { hub, .. } => Ok(ids
                .iter()
                .filter_map(|id| {
                    let twin = hub.hub.get_twin(id).ok()?;
                    let v = twin.pointer("/properties/reported/appVersion")?.as_str()?;
                    Some((id.clone(), v.to_string()))
                })
                .collect()),
            Self::External(x) => x.app_versions().await,
        }
    }

    /// Stops the embedded hub, or closes the connections to the external one.
    pub async fn stop(self) {
        match self {
            Self::Embedded { hub, .. } => {
                let _ = hub.stop().await;
            }
            Self::External(x) => x.close(),
        }
    }
}

/// The fleet the run observes.
pub enum FleetSide {
    /// Agents in this process, with a power switch each.
    InProcess(Fleet),
    /// `fleet run` processes elsewhere; seen only through the registry (`connectionState`).
    External(ServiceClient),
    /// Child processes of the runner (`fleet.shards > 1`), switched through their stdin and seen
    /// through the registry.
    Shards(ShardedFleet, ServiceClient),
}

impl FleetSide {
    /// Switches device `index` off or on. An external fleet cannot be switched: the runner
    /// refuses such events before it starts ([`super::external::check_modes`]).
    pub fn set_power(&self, index: usize, on: bool) {
        match self {
            Self::InProcess(f) => f.set_power(index, on),
            Self::Shards(s, _) => s.set_power(index, on),
            Self::External(_) => {}
        }
    }

    /// Asks device `index` to check `latest.json` now (an external fleet cannot be asked).
    pub fn check_for_update(&self, index: usize) {
        match self {
            Self::InProcess(f) => f.check_for_update(index),
            Self::Shards(s, _) => s.check_for_update(index),
            Self::External(_) => {}
        }
    }

    /// The in-process fleet, for events that control devices.
    pub fn in_process(&self) -> Option<&Fleet> {
        match self {
            Self::InProcess(f) => Some(f),
            Self::External(_) | Self::Shards(..) => None,
        }
    }

    /// How many of the run's devices (`index`: id → index) are connected.
    pub async fn connected(&self, index: &HashMap<String, usize>) -> Result<usize, RunError> {
        match self {
            Self::InProcess(f) => Ok(f.connected()),
            Self::External(svc) | Self::Shards(_, svc) => {
                super::external::connected_devices(svc, index).await
            }
        }
    }

    /// Stops in-process agents; an external fleet keeps running.
    pub async fn stop(self) {
        match self {
            Self::InProcess(f) => f.stop().await,
            Self::Shards(s, _) => s.stop().await,
            Self::External(_) => {}
        }
    }
}
