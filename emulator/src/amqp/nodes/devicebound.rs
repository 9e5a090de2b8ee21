//! The `/messages/devicebound` node: C2D sends from the service SDKs (reference §3.4). A send is
//! accepted only once the hub has queued it. With a tier configured it passes the tier throttle
//! first: over the rate it is held (shaped: the connection is held until its turn), past the
//! backlog rejected with `com.microsoft:device-container-throttled`, past the daily quota with
//! `com.microsoft:quota-exceeded`.

use super::{Ctx, Node, Outcome, Received, rejected};
use crate::amqp::message::{Message, to_c2d};
use crate::throttle::{Admission, Op};

/// A link the peer sends C2D messages on. Stateless: everything lives in the hub.
#[derive(Debug)]
pub struct DeviceBound;

impl Node for DeviceBound {
    fn kind(&self) -> &'static str {
        "devicebound"
    }

    fn receive(&mut self, ctx: &mut Ctx<'_>, m: Message) -> Received {
        Received::outcome(send_c2d(ctx, m))
    }
}

fn send_c2d(ctx: &mut Ctx<'_>, m: Message) -> Outcome {
    if let Some(why) = ctx.auth.unauthorized_reason(ctx.hub) {
        tracing::info!("C2D send refused: {why}");
        return Outcome::Rejected(
            "amqp:unauthorized-access",
            format!("ErrorCode:IotHubUnauthorizedAccess;{why}"),
        );
    }
    let (device, msg) = match to_c2d(m) {
        Ok(x) => x,
        Err(e) => {
            tracing::info!("C2D send refused: {e}");
            return Outcome::Rejected(
                "com.microsoft:argument-error",
                format!("ErrorCode:ArgumentInvalid;{e}"),
            );
        }
    };
    match ctx.hub.admit_message(Op::C2dSend, msg.body.len()) {
        Admission::Now => {}
        // Accepted, worked off at the limit rate: the driver holds the connection (its
        // dispositions and further reads) until the send's turn.
        Admission::Shaped { at_ms } => ctx.hold_until(at_ms),
        Admission::Refused(r) => {
            let e = ctx.hub.throttle_error(&r);
            tracing::info!(device = %device, "C2D send refused: {e}");
            return rejected(&e);
        }
    }
    match ctx.hub.send_c2d(&device, msg) {
        Ok(_) => {
            *ctx.sent_c2d = true;
            Outcome::Accepted
        }
        Err(e) => {
            tracing::info!(device = %device, "C2D send refused: {e}");
            rejected(&e)
        }
    }
}
