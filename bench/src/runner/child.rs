//! The child hub mode (`hub.mode = "child"`): the runner starts the real `iothub-emulator`
//! binary as a child process ([`crate::child_hub::ChildHub`], `--persist` by default) on free
//! loopback ports and drives it over the wire exactly like an external hub ([`ExternalHub`]).
//! A `hub-restart` event stops it (SIGKILL or SIGTERM), starts it again on the same data
//! directory and ports, waits until `/health` answers, and reconnects the runner's service side;
//! the fleet's agents reconnect on their own, as devices do against a real hub.
//!
//! [`ChildSide`] owns the process and the connections over it; the hub owns its state.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use super::RunError;
use super::external::ExternalHub;
use super::shared::ShardLink;
use crate::child_hub::{ChildHub, ChildHubConfig, StopKind, find_binary};
use crate::scenario::plan::HubPlan;

/// A child hub and the runner's connections to it.
pub struct ChildSide {
    hub: ChildHub,
    /// The same hub as an external hub's plan (its addresses never change across restarts).
    wire: HubPlan,
    /// The connections over the wire.
    pub ext: ExternalHub,
    /// Restarts so far.
    pub restarts: u64,
}

fn setup(what: impl std::fmt::Display) -> RunError {
    RunError::Setup(format!("child hub: {what}"))
}

impl ChildSide {
    /// Starts the hub `plan` describes (data under `hub.data_dir`, else `<work_dir>/hub`) and
    /// connects to it.
    pub async fn start(plan: &HubPlan, work_dir: &Path) -> Result<Self, RunError> {
        let HubPlan::Child { binary, data_dir, persist, feedback_interval } = plan else {
            return Err(setup("not a child hub"));
        };
        let binary = find_binary(binary.as_deref().map(Path::new)).map_err(setup)?;
        let data_dir = data_dir.as_ref().map_or_else(|| work_dir.join("hub"), PathBuf::from);
        let config = ChildHubConfig {
            feedback_interval_ms: Some(feedback_interval.as_millis() as u64),
            ..ChildHubConfig::new(binary, data_dir, *persist)
        };
        let hub = ChildHub::start(config).await.map_err(setup)?;
        let s = hub.startup();
        let wire = HubPlan::External {
            connection_string: s.connection_string.clone(),
            ca_file: s.ca_path.display().to_string(),
            http_url: hub.http_url(),
            packages_dir: Some(s.packages_dir.display().to_string()),
            amqp_port: s.ports.amqp,
            mqtt_port: s.ports.mqtt,
            ftp_port: s.ports.ftp,
        };
        let ext = ExternalHub::connect(&wire).await?;
        Ok(Self { hub, wire, ext, restarts: 0 })
    }

    /// The process id of the running hub.
    pub fn pid(&self) -> Option<u32> {
        self.hub.pid()
    }

    /// Where agents connect: the plain MQTT listener on loopback, or with `tls` MQTT over TLS.
    pub fn link(&self, tls: bool) -> ShardLink {
        let p = &self.hub.startup().ports;
        ShardLink {
            hub_host: self.ext.host().to_string(),
            mqtt_host: "127.0.0.1".into(),
            mqtt_port: if tls { p.mqtt } else { p.mqtt_plain },
            ca_pem: tls.then(|| self.ext.ca_pem().to_string()),
            ftp_addr: self.ext.ftp_addr().to_string(),
        }
    }

    /// Stops the hub as `kind` says, starts it again on the same data directory and ports, waits
    /// for `/health` and reconnects. Returns how long the hub was unavailable.
    pub async fn restart(&mut self, kind: StopKind) -> Result<Duration, RunError> {
        let started = Instant::now();
        self.hub.restart(kind).await.map_err(setup)?;
        self.ext.reconnect(&self.wire).await?;
        self.restarts += 1;
        Ok(started.elapsed())
    }

    /// Stops the hub gracefully (its data directory stays; the runner removes its work directory).
    pub async fn stop(self) {
        let Self { mut hub, ext, .. } = self;
        ext.close();
        if let Err(e) = hub.stop(StopKind::Graceful).await {
            tracing::warn!("stopping the child hub: {e}");
        }
    }
}
