//! The hub the runner drives, in any mode: [`EmbeddedHub`] (started here, read through its
//! in-process handle), [`ExternalHub`] (reached only over the wire) or [`ChildSide`] (the
//! `iothub-emulator` binary started here as a child process, reached over the wire, restartable). [`HubSide`] only dispatches;
//! each side owns its handles and read positions (telemetry sequence, feedback) in its own module,
//! and the types they exchange with the runner live in the leaf [`super::shared`].

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use iothub_emulator::server::RunningHub;
use simulated_devices::service_client::ServiceClient;

use super::RunError;
use super::child::ChildSide;
use super::embedded::EmbeddedHub;
use super::external::ExternalHub;
use super::shared::{Feedback, Outgoing, Sent, ShardLink, Telemetry, unix_ms};
use crate::scenario::plan::HubPlan;

/// The hub the run drives.
pub enum HubSide {
    /// Started by the runner in this process.
    Embedded(Box<EmbeddedHub>),
    /// Running elsewhere; reached over REST, AMQP and the admin endpoints only.
    External(Box<ExternalHub>),
    /// A child process of the runner, reached like an external hub.
    Child(Box<ChildSide>),
}

impl HubSide {
    /// Starts the embedded hub (files under `<work_dir>/hub`) or connects to the external one.
    /// An embedded hub keeps telemetry for readers in proportion to the `devices` of the run.
    pub async fn start(plan: &HubPlan, devices: u64, work_dir: &Path) -> Result<Self, RunError> {
        match *plan {
            HubPlan::Embedded { feedback_interval, c2d_default_ttl, tier } => {
                let dir = work_dir.join("hub");
                let hub = EmbeddedHub::start(feedback_interval, c2d_default_ttl, tier, devices, &dir).await?;
                Ok(Self::Embedded(Box::new(hub)))
            }
            HubPlan::External { .. } => Ok(Self::External(Box::new(ExternalHub::connect(plan).await?))),
            HubPlan::Child { .. } => Ok(Self::Child(Box::new(ChildSide::start(plan, work_dir).await?))),
        }
    }

    /// Restarts a child hub (`hub-restart`); returns how long it was unavailable.
    pub async fn restart(&mut self, kind: crate::child_hub::StopKind) -> Result<Duration, RunError> {
        match self {
            Self::Child(c) => c.restart(kind).await,
            _ => Err(RunError::Setup("only a child hub (hub.mode = \"child\") can be restarted".into())),
        }
    }

    /// Restarts so far (child hub only).
    pub fn restarts(&self) -> u64 {
        match self {
            Self::Child(c) => c.restarts,
            _ => 0,
        }
    }

    /// The embedded hub, for features that need in-process control (FTP faults).
    pub fn embedded(&self) -> Option<&RunningHub> {
        match self {
            Self::Embedded(e) => Some(&e.hub),
            Self::External(_) | Self::Child(_) => None,
        }
    }

    /// A service client for the registry, twins and queries: over the embedded hub's HTTPS port,
    /// or `hub.http_url` for an external hub.
    pub fn service_client(&self) -> Result<ServiceClient, RunError> {
        match self {
            Self::Embedded(e) => e.service_client(),
            Self::External(x) => Ok(x.service().clone()),
            Self::Child(c) => Ok(c.ext.service().clone()),
        }
    }

    /// Where agents connect: the embedded hub's plain MQTT listener (its TLS one with `tls`), or
    /// an external hub's MQTT over TLS at its host name (resolved by the MQTT client on every
    /// connect); FTP at [`Self::ftp_addr`].
    pub fn link(&self, tls: bool) -> Result<ShardLink, RunError> {
        match self {
            Self::Embedded(e) => e.link(tls),
            Self::External(x) => Ok(ShardLink {
                hub_host: x.host().to_string(),
                mqtt_host: x.host().to_string(),
                mqtt_port: x.mqtt_port(),
                ca_pem: Some(x.ca_pem().to_string()),
                ftp_addr: self.ftp_addr(),
            }),
            Self::Child(c) => Ok(c.link(tls)),
        }
    }

    /// The hub's dashboard page (`/dashboard` on its plain port).
    pub fn dashboard_url(&self) -> String {
        match self {
            Self::Embedded(e) => format!("http://{}/dashboard", e.hub.http_addr),
            Self::External(x) => x.dashboard_url().to_string(),
            Self::Child(c) => c.ext.dashboard_url().to_string(),
        }
    }

    /// Shows the run's status on the hub's dashboard: set in process on the embedded hub, sent
    /// (at most once a second, in the background) to an external one.
    pub fn publish_status(&self, status: serde_json::Value) {
        match self {
            Self::Embedded(e) => e.hub.hub.set_scenario_status(Some(status)),
            Self::External(x) => x.publish_status(status),
            Self::Child(c) => c.ext.publish_status(status),
        }
    }

    /// At the end of the run: an external (or child) hub's dashboard gets the last status marked finished
    /// (the embedded hub stops with the run).
    pub async fn publish_final_status(&self) {
        match self {
            Self::External(x) => x.publish_final_status().await,
            Self::Child(c) => c.ext.publish_final_status().await,
            Self::Embedded(_) => {}
        }
    }

    /// The directory the hub's FTP server serves packages from.
    pub fn packages_dir(&self) -> &Path {
        match self {
            Self::Embedded(e) => &e.hub.packages_dir,
            Self::External(x) => x.packages_dir(),
            Self::Child(c) => c.ext.packages_dir(),
        }
    }

    /// The FTP server as devices reach it (`host:port`), for update notices.
    pub fn ftp_addr(&self) -> String {
        match self {
            Self::Embedded(e) => e.ftp_addr(),
            Self::External(x) => x.ftp_addr().to_string(),
            Self::Child(c) => c.ext.ftp_addr().to_string(),
        }
    }

    /// The hub's time (Unix milliseconds).
    pub fn now(&self) -> u64 {
        match self {
            Self::Embedded(e) => e.hub.hub.now(),
            Self::External(_) | Self::Child(_) => unix_ms(),
        }
    }

    /// How far hub time is ahead of the wall clock (time travel), in milliseconds; an external
    /// hub is not moved by the runner.
    pub fn time_offset_ms(&self) -> u64 {
        match self {
            Self::Embedded(e) => e.hub.hub.time_offset_ms(),
            Self::External(_) | Self::Child(_) => 0,
        }
    }

    /// Moves hub time forward by `gap` (compressed scenario time). Only the embedded hub can
    /// (`check_supported` refuses compressed time otherwise).
    pub fn advance_time(&self, gap: Duration) -> Result<(), RunError> {
        match self {
            Self::Embedded(e) => e
                .hub
                .hub
                .advance_time(gap.as_millis() as u64)
                .map(drop)
                .map_err(|err| RunError::Setup(format!("moving hub time: {err}"))),
            Self::External(_) | Self::Child(_) => {
                Err(RunError::Setup("an external hub's time is not the runner's to move".into()))
            }
        }
    }

    /// How long until the hub has timed work of its own (a feedback batch cut), if the runner can
    /// see it.
    pub fn next_due(&self) -> Option<Duration> {
        match self {
            Self::Embedded(e) => {
                let hub = &e.hub.hub;
                hub.feedback_next_due().map(|at| Duration::from_millis(at.saturating_sub(hub.now())))
            }
            Self::External(_) | Self::Child(_) => None,
        }
    }

    /// Connected devices with a C2D message queued or in flight, when the runner can see it
    /// (`None` for an external hub).
    pub fn deliveries_in_flight(&self) -> Option<usize> {
        match self {
            Self::Embedded(e) => Some(e.hub.hub.connected_with_c2d()),
            Self::External(_) | Self::Child(_) => None,
        }
    }

    /// Sends every message with `iothub-ack: full`, in order; one outcome per message. An
    /// external hub gets them pipelined on its AMQP connection.
    pub async fn send_all(&mut self, msgs: Vec<Outgoing<'_>>) -> Vec<Sent> {
        match self {
            Self::Embedded(e) => e.send_all(msgs),
            Self::External(x) => x.send_all(msgs).await,
            Self::Child(c) => c.ext.send_all(msgs).await,
        }
    }

    /// D2C messages with a JSON body received since the last call, oldest first.
    pub async fn telemetry(&mut self) -> Result<Vec<Telemetry>, RunError> {
        match self {
            Self::Embedded(e) => Ok(e.telemetry()),
            Self::External(x) => x.telemetry(),
            Self::Child(c) => c.ext.telemetry(),
        }
    }

    /// Sends the hub throttled and the runner retried (an external hub's sends; the embedded
    /// hub's pipeline releases count theirs in [`super::pipeline::Sending`]).
    pub fn throttled_retries(&self) -> u64 {
        match self {
            Self::Embedded(_) => 0,
            Self::External(x) => x.throttled_retries(),
            Self::Child(c) => c.ext.throttled_retries(),
        }
    }

    /// For a release the embedded hub's runner sends in the background: `n` AMQP service
    /// connections and the hub (whose clock stamps the accepts). `None` for an external hub.
    pub async fn background_sender(
        &self,
        svc: &ServiceClient,
        n: usize,
    ) -> Result<Option<(Vec<simulated_devices::amqp_client::AmqpService>, iothub_emulator::Hub)>, RunError>
    {
        match self {
            Self::Embedded(e) => Ok(Some((e.amqp_connections(svc, n).await?, e.hub.hub.clone()))),
            Self::External(_) | Self::Child(_) => Ok(None),
        }
    }

    /// Telemetry messages the embedded hub's ring dropped before the runner read them; for a
    /// child hub, its restarts (each may have lost unread telemetry). Non-zero makes the runner
    /// check open devices through their twins.
    pub fn telemetry_missed(&self) -> u64 {
        match self {
            Self::Embedded(e) => e.telemetry_missed,
            Self::External(_) => 0,
            // A restart loses the telemetry the hub held unread (it is not kept across restarts).
            Self::Child(c) => c.restarts,
        }
    }

    /// Feedback records received since the last call (each batch is completed).
    pub async fn feedback(&mut self) -> Result<Vec<Feedback>, RunError> {
        match self {
            Self::Embedded(e) => Ok(e.feedback()),
            Self::External(x) => x.feedback(),
            Self::Child(c) => c.ext.feedback(),
        }
    }

    /// Which of `ids` have a twin reporting `appVersion` = `version`.
    pub async fn reporting(&mut self, version: &str, ids: &[&str]) -> Result<HashSet<String>, RunError> {
        match self {
            Self::Embedded(e) => Ok(e.reporting(version, ids)),
            Self::External(x) => x.reporting(version, ids).await,
            Self::Child(c) => c.ext.reporting(version, ids).await,
        }
    }

    /// The `appVersion` every device's twin reports, by device id (devices reporting none are
    /// absent).
    pub async fn app_versions(&self, ids: &[String]) -> Result<HashMap<String, String>, RunError> {
        match self {
            Self::Embedded(e) => Ok(e.app_versions(ids)),
            Self::External(x) => x.app_versions().await,
            Self::Child(c) => c.ext.app_versions().await,
        }
    }

    /// Stops the embedded hub, or closes the connections to the external one.
    pub async fn stop(self) {
        match self {
            Self::Embedded(e) => e.stop().await,
            Self::External(x) => x.close(),
            Self::Child(c) => c.stop().await,
        }
    }
}
