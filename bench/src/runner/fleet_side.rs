//! What the runner drives on the device side: agents in this process ([`Fleet`], over sockets, or
//! [`InProcessFleet`], through the hub's session state machine without them), shard processes it
//! started ([`ShardedFleet`]), or `fleet run` processes elsewhere that it only observes through
//! the registry. The timeline calls [`FleetSide`] and never asks which one it has.

use std::collections::HashMap;

use simulated_devices::fleet::Fleet;
use simulated_devices::inprocess::InProcessFleet;
use simulated_devices::service_client::ServiceClient;

use super::RunError;
use super::shards::ShardedFleet;

/// The fleet the run observes.
pub enum FleetSide {
    /// Agents in this process, with a power switch each.
    InProcess(Fleet),
    /// Agents in this process without sockets (`fleet.transport = "in-process"`).
    Sessions(InProcessFleet),
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
            Self::Sessions(f) => f.set_power(index, on),
            Self::Shards(s, _) => s.set_power(index, on),
            Self::External(_) => {}
        }
    }

    /// Asks device `index` to check `latest.json` now (an external fleet cannot be asked).
    pub fn check_for_update(&self, index: usize) {
        match self {
            Self::InProcess(f) => f.check_for_update(index),
            Self::Sessions(f) => f.check_for_update(index),
            Self::Shards(s, _) => s.check_for_update(index),
            Self::External(_) => {}
        }
    }

    /// Powered-on agents not yet connected or with work in flight, when the runner can see them
    /// (`None` for fleets in other processes).
    pub fn unsettled(&self) -> Option<usize> {
        match self {
            Self::InProcess(f) => Some(f.unsettled()),
            Self::Sessions(f) => Some(f.unsettled()),
            Self::External(_) | Self::Shards(..) => None,
        }
    }

    /// Whether the agents run in this process (the runner can control and count them).
    pub fn in_process(&self) -> bool {
        matches!(self, Self::InProcess(_) | Self::Sessions(_))
    }

    /// Drops device `index`'s MQTT link (and with `ftp` its FTP connections); only agents in this
    /// process can be asked ([`super::check_supported`] refuses link flaps otherwise).
    pub fn flap_link(&self, index: usize, ftp: bool) {
        match self {
            Self::InProcess(f) => f.flap_link(index, ftp),
            Self::Sessions(f) => f.flap_link(index, ftp),
            Self::External(_) | Self::Shards(..) => {}
        }
    }

    /// Devices that received a message again after acting on it, with how often (agents in this
    /// process only).
    pub fn duplicate_deliveries(&self) -> Vec<(usize, u32)> {
        let count = |len: usize, f: &dyn Fn(usize) -> u32| {
            (0..len).filter_map(|i| Some((i, f(i))).filter(|&(_, n)| n > 0)).collect()
        };
        match self {
            Self::InProcess(f) => count(f.len(), &|i| f.duplicate_deliveries(i)),
            Self::Sessions(f) => count(f.len(), &|i| f.duplicate_deliveries(i)),
            Self::External(_) | Self::Shards(..) => Vec::new(),
        }
    }

    /// How many of the run's devices (`index`: id → index) are connected.
    pub async fn connected(&self, index: &HashMap<String, usize>) -> Result<usize, RunError> {
        match self {
            Self::InProcess(f) => Ok(f.connected()),
            Self::Sessions(f) => Ok(f.connected()),
            Self::External(svc) | Self::Shards(_, svc) => {
                super::external::connected_devices(svc, index).await
            }
        }
    }

    /// Stops in-process agents; an external fleet keeps running.
    pub async fn stop(self) {
        match self {
            Self::InProcess(f) => f.stop().await,
            Self::Sessions(f) => f.stop().await,
            Self::Shards(s, _) => s.stop().await,
            Self::External(_) => {}
        }
    }
}
