//! The embedded hub: a [`RunningHub`] the runner starts in this process (every listener on a free
//! loopback port) and reads through its in-process [`iothub_emulator::Hub`] handle. Owns the hub
//! and the telemetry read position; the hub owns its state.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use iothub_emulator::c2d::{AckMode, C2dMessage, QueueConfig};
use iothub_emulator::server::{ListenConfig, RunningHub};
use iothub_emulator::{ErrorCode, HubConfig};
use serde_json::Value;
use simulated_devices::amqp_client::AmqpService;
use simulated_devices::service_client::ServiceClient;

use super::RunError;
use super::shared::{Feedback, InstallEvent, Outgoing, Sent, ShardLink, Telemetry};

/// Telemetry messages read per call.
const TELEMETRY_BATCH: usize = 1000;
/// The least telemetry the embedded hub keeps for the runner.
const TELEMETRY_BUFFER_MIN: usize = 10_000;
/// The most telemetry the embedded hub keeps for the runner (a message is a few hundred bytes).
const TELEMETRY_BUFFER_MAX: usize = 131_072;

/// A hub running in this process.
pub struct EmbeddedHub {
    /// The hub.
    pub hub: RunningHub,
    /// The last telemetry sequence number read.
    telemetry_after: u64,
    /// Messages the hub's telemetry ring dropped before they were read.
    pub telemetry_missed: u64,
}

impl EmbeddedHub {
    /// Starts a hub with files under `dir`: feedback batches every `feedback_interval`, C2D
    /// messages living `c2d_default_ttl` unless a send says otherwise, throttled as `tier` if given,
    /// telemetry kept for the runner in proportion to the run's `devices` (a big fleet reports in
    /// bursts).
    pub async fn start(
        feedback_interval: std::time::Duration,
        c2d_default_ttl: std::time::Duration,
        tier: Option<iothub_emulator::throttle::Tier>,
        devices: u64,
        dir: &Path,
    ) -> Result<Self, RunError> {
        let telemetry_buffer_messages =
            (devices as usize / 8).clamp(TELEMETRY_BUFFER_MIN, TELEMETRY_BUFFER_MAX);
        let config = HubConfig {
            telemetry_buffer_messages,
            throttle: tier,
            feedback_batch_interval_ms: feedback_interval.as_millis() as u64,
            c2d: QueueConfig { default_ttl_ms: c2d_default_ttl.as_millis() as u64, ..QueueConfig::default() },
            ..HubConfig::default()
        };
        let listen = ListenConfig::ephemeral(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let hub = RunningHub::start(config, &listen, dir)
            .await
            .map_err(|e| RunError::Setup(format!("starting the hub: {e}")))?;
        Ok(Self { hub, telemetry_after: 0, telemetry_missed: 0 })
    }

    /// A service client over the hub's HTTPS port.
    pub fn service_client(&self) -> Result<ServiceClient, RunError> {
        let hub = &self.hub;
        ServiceClient::new(
            &hub.owner_connection_string(),
            &format!("https://127.0.0.1:{}", hub.https_addr.port()),
            Some(&hub.ca_pem),
        )
        .map_err(|e| RunError::Setup(format!("service client: {e}")))
    }

    /// Agents connect to the plain MQTT listener, or with `tls` to MQTT over TLS (trusting the
    /// hub's CA).
    pub fn link(&self, tls: bool) -> Result<ShardLink, RunError> {
        let hub = &self.hub;
        let (addr, ca_pem) = if tls {
            (hub.mqtt_addr, Some(hub.ca_pem.clone()))
        } else {
            let plain = hub
                .mqtt_plain_addr
                .ok_or_else(|| RunError::Setup("the hub has no plain MQTT listener".into()))?;
            (plain, None)
        };
        Ok(ShardLink {
            hub_host: hub.hub.hostname().to_string(),
            mqtt_host: addr.ip().to_string(),
            mqtt_port: addr.port(),
            ca_pem,
            ftp_addr: self.ftp_addr(),
        })
    }

    /// The FTP server as devices reach it.
    pub fn ftp_addr(&self) -> String {
        self.hub.ftp_addr.map(|a| a.to_string()).unwrap_or_default()
    }

    /// Sends every message with `iothub-ack: full` straight into the hub.
    pub fn send_all(&self, msgs: Vec<Outgoing<'_>>) -> Vec<Sent> {
        let hub = &self.hub.hub;
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

    /// `n` service connections to the hub's AMQP port with `svc`'s token, for a release sent in
    /// the background ([`super::pipeline`]).
    pub async fn amqp_connections(
        &self,
        svc: &ServiceClient,
        n: usize,
    ) -> Result<Vec<AmqpService>, RunError> {
        let (addr, ca) = (self.hub.amqp_addr, &self.hub.ca_pem);
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(super::external::connect_amqp(&addr.ip().to_string(), addr.port(), ca, svc).await?);
        }
        Ok(out)
    }

    /// The agents' `installState` events since the last call (other telemetry is skipped).
    pub fn telemetry(&mut self) -> Vec<Telemetry> {
        let mut out = Vec::new();
        loop {
            let batch = self.hub.hub.read_telemetry_with(self.telemetry_after, TELEMETRY_BATCH, |m| {
                (m.hub_sequence, m.device_id.to_string(), m.enqueued_at, m.body.clone())
            });
            let (Some(first), Some(last)) = (batch.first(), batch.last()) else { break };
            self.telemetry_missed += first.0 - self.telemetry_after - 1;
            self.telemetry_after = last.0;
            out.extend(batch.into_iter().filter_map(|(_, device_id, enqueued_at, body)| {
                Some(Telemetry { device_id, enqueued_at, event: InstallEvent::parse(&body)? })
            }));
        }
        out
    }

    /// Feedback records since the last call (each batch is completed).
    pub fn feedback(&self) -> Vec<Feedback> {
        let hub = &self.hub.hub;
        let mut out = Vec::new();
        while let Some(d) = hub.receive_feedback() {
            let records: Vec<Value> = serde_json::from_slice(&d.message.body).unwrap_or_default();
            out.extend(records.iter().map(|r| Feedback {
                status: r["statusCode"].as_str().unwrap_or_default().to_string(),
                original_message_id: r["originalMessageId"].as_str().unwrap_or_default().to_string(),
            }));
            let _ = hub.settle_feedback(d.lock_token, false);
        }
        out
    }

    /// The twin's reported `appVersion` of `id`.
    fn app_version(&self, id: &str) -> Option<String> {
        match self.hub.hub.reported_property(id, "appVersion")? {
            Value::String(v) => Some(v),
            _ => None,
        }
    }

    /// Which of `ids` report `appVersion` = `version`.
    pub fn reporting(&self, version: &str, ids: &[&str]) -> HashSet<String> {
        ids.iter()
            .filter(|id| self.app_version(id).as_deref() == Some(version))
            .map(|id| id.to_string())
            .collect()
    }

    /// Every reported `appVersion` by device id.
    pub fn app_versions(&self, ids: &[String]) -> HashMap<String, String> {
        ids.iter().filter_map(|id| Some((id.clone(), self.app_version(id)?))).collect()
    }

    /// Stops the hub.
    pub async fn stop(self) {
        let _ = self.hub.stop().await;
    }
}
