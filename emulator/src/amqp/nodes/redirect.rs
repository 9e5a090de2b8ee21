//! IoT Hub's redirect to its built-in Event Hub-compatible endpoint (reference-2 §1.8): a receiver
//! that attaches to `messages/events/...` on the IoT hub itself (the Event Hubs SDK samples'
//! IoT Hub connection-string flow) is refused with `amqp:link:redirect`, whose info map names the
//! compatible endpoint: `hostname`, `network-host`, `port` and `address`
//! (`amqps://{host}:{port}/{eh}/{the same suffix}`; the samples parse the Event Hub name out of it
//! between `:{port}/` and `/$management` or `/ConsumerGroups`). The link must be authorized by a
//! token covering `{host}/messages/events` (SASL PLAIN or CBS).
//!
//! The link is attached first and detached with the error only once the client granted credit:
//! the SDK sample (rhea-promise) listens for the link's error only after its attach completed, so
//! an attach and a detach arriving in one read would go unseen.

use super::{Ctx, Node, Outgoing, Refusal};
use crate::amqp::types::Value;

/// The refusal for an attach to `messages/events` followed by `suffix` (without a leading `/`).
pub fn refusal(ctx: &Ctx<'_>, suffix: &str) -> Refusal {
    let hub = ctx.hub;
    let target = format!("{}/messages/events", hub.hostname());
    if let Some(why) = ctx.auth.reason(hub, &target) {
        return Refusal::new("amqp:unauthorized-access", why);
    }
    let (host, port) = hub.event_hub_endpoint();
    let entity = hub.event_hub_name();
    let address = if suffix.is_empty() {
        format!("amqps://{host}:{port}/{entity}")
    } else {
        format!("amqps://{host}:{port}/{entity}/{suffix}")
    };
    Refusal {
        condition: "amqp:link:redirect",
        description: format!(
            "the built-in endpoint messages/events is served as Event Hub '{entity}' at {address}"
        ),
        info: vec![
            (Value::sym("hostname"), Value::str(host)),
            (Value::sym("network-host"), Value::str(host)),
            (Value::sym("port"), Value::Int(i32::from(port))),
            (Value::sym("address"), Value::str(&address)),
        ],
    }
}

/// A link to `messages/events` waiting for the client's credit to be refused (see the module doc).
#[derive(Debug)]
pub struct Redirect {
    refusal: Refusal,
    /// The client granted credit (it is listening).
    asked: bool,
}

impl Redirect {
    /// A link that will be detached with `refusal`.
    pub fn new(refusal: Refusal) -> Self {
        Self { refusal, asked: false }
    }
}

impl Node for Redirect {
    fn kind(&self) -> &'static str {
        "redirect"
    }

    fn next(&mut self, _ctx: &mut Ctx<'_>) -> Option<Outgoing> {
        self.asked = true;
        None
    }

    fn closing_after_next(&self) -> bool {
        self.asked
    }

    fn closing(&mut self, _ctx: &mut Ctx<'_>) -> Option<Refusal> {
        self.asked.then(|| self.refusal.clone())
    }
}
