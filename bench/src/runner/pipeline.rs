//! A release sent the seed pipeline's way in the background: the notices go over a few AMQP
//! service connections from a task of their own, so the runner's timeline (power-ons, faults,
//! reading the hub's telemetry and feedback) keeps running while a big release is on its way.
//! Owns the sending task's end; the outcomes come back to the runner one message at a time, in
//! no particular order, as `(position in the release, outcome)`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use futures_util::StreamExt;
use iothub_emulator::Hub;
use simulated_devices::amqp_client::AmqpService;
use tokio::sync::mpsc;

use super::external::{SEND_WINDOW, amqp_send};
use super::shared::{Outgoing, Sent};

/// One message of the release: the device, its message id.
pub struct Notice {
    /// The target device.
    pub device_id: String,
    /// `iothub-messageid`.
    pub message_id: String,
}

/// A release being sent.
pub struct Sending {
    /// Which release (index into the run's releases).
    pub release: usize,
    /// Outcomes not yet taken.
    pub left: usize,
    outcomes: mpsc::UnboundedReceiver<(usize, Sent)>,
    /// Throttled sends retried so far.
    pub throttled: Arc<AtomicU64>,
}

impl Sending {
    /// Starts sending `notices` (position `p` is `notices[p]`) over `connections`, each with
    /// [`SEND_WINDOW`] in flight; `hub`'s clock stamps the accepts.
    pub fn start(
        release: usize,
        notices: Vec<Notice>,
        body: Vec<u8>,
        ttl: Option<std::time::Duration>,
        connections: Vec<AmqpService>,
        hub: Hub,
    ) -> Self {
        let (tx, outcomes) = mpsc::unbounded_channel();
        let throttled = Arc::new(AtomicU64::new(0));
        let left = notices.len();
        let notices: Arc<[Notice]> = notices.into();
        let body: Arc<[u8]> = body.into();
        let k = connections.len().max(1);
        for (c, amqp) in connections.into_iter().enumerate() {
            let (tx, notices, body, hub) = (tx.clone(), notices.clone(), body.clone(), hub.clone());
            let throttled = throttled.clone();
            tokio::spawn(async move {
                let sends = (c..notices.len()).step_by(k).map(|p| {
                    let n = &notices[p];
                    let m = Outgoing {
                        device_id: &n.device_id,
                        message_id: n.message_id.clone(),
                        body: &body,
                        ttl,
                        content_type: "application/json",
                    };
                    let (amqp, hub, throttled) = (&amqp, &hub, &throttled);
                    async move { (p, amqp_send(amqp, m, n.message_id.clone(), || hub.now(), throttled).await) }
                });
                let mut outcomes = futures_util::stream::iter(sends).buffer_unordered(SEND_WINDOW);
                while let Some(o) = outcomes.next().await {
                    if tx.send(o).is_err() {
                        return;
                    }
                }
            });
        }
        Self { release, left, outcomes, throttled }
    }

    /// The outcomes that arrived since the last call.
    pub fn take(&mut self) -> Vec<(usize, Sent)> {
        let mut out = Vec::new();
        while let Ok(o) = self.outcomes.try_recv() {
            out.push(o);
        }
        self.left -= out.len();
        out
    }

    /// Every sender stopped: what is left will never be answered.
    pub fn is_abandoned(&self) -> bool {
        self.left > 0 && self.outcomes.is_closed() && self.outcomes.is_empty()
    }
}
