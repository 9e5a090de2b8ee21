//! The `/messages/serviceBound/feedback` node: IoT Hub's delivery-feedback batches for the service
//! SDKs' feedback receivers (reference §3.9). A batch handed to the link stays locked in the hub
//! until the peer settles it (accepted/rejected complete it, released/modified abandon it); a
//! detach, end, close or dropped connection abandons whatever is still unsettled, so it is
//! redelivered. A peer that asked for settled deliveries completes each batch on hand-off.

use super::{Ctx, Node, Outgoing, Settled, Wake};
use crate::amqp::message::{Body, Message, Properties};
use crate::amqp::types::Value;
use crate::c2d::{Delivery, LockToken};
use crate::clock::Millis;

/// A link the peer receives feedback batches on. The locks it holds are tracked by the engine.
#[derive(Debug)]
pub struct Feedback;

impl Node for Feedback {
    fn kind(&self) -> &'static str {
        "feedback"
    }

    fn next(&mut self, ctx: &mut Ctx<'_>) -> Option<Outgoing> {
        if ctx.unsettled_room == 0 || !ctx.auth.authorized(ctx.hub) {
            return None;
        }
        let d = ctx.hub.receive_feedback()?;
        Some(Outgoing { payload: feedback_message(&d).encode(), settled: false, track: Some(d.lock_token.0) })
    }

    fn settled(&mut self, ctx: &mut Ctx<'_>, token: u128, how: Settled) {
        if let Err(e) = ctx.hub.settle_feedback(LockToken(token), how == Settled::Returned) {
            tracing::info!("settling a feedback batch: {e}");
        }
    }

    fn detached(&mut self, ctx: &mut Ctx<'_>, unsettled: Vec<u128>) {
        for token in unsettled {
            let _ = ctx.hub.settle_feedback(LockToken(token), true);
        }
    }

    /// Batches are cut every interval: a drain keeps its credit for the next one.
    fn honours_drain(&self) -> bool {
        false
    }

    fn wants_wake(&self, ctx: &Ctx<'_>) -> Wake {
        if ctx.unsettled_room > 0 && ctx.auth.authorized(ctx.hub) { Wake::OnHubChange } else { Wake::Never }
    }

    fn wake_at(&self, ctx: &Ctx<'_>) -> Option<Millis> {
        if self.wants_wake(ctx) == Wake::OnHubChange { ctx.hub.feedback_next_due() } else { None }
    }
}

/// The AMQP message carrying a feedback batch (JSON array body, IoT Hub's feedback content
/// type, the hub name as user-id).
pub fn feedback_message(d: &Delivery) -> Message {
    let m = &d.message;
    Message {
        properties: Properties {
            message_id: Some(Value::str(&d.lock_token.to_string())),
            user_id: m.user_id.as_ref().map(|u| u.as_bytes().to_vec()),
            to: Some("/messages/servicebound/feedback".into()),
            content_type: m.content_type.clone(),
            content_encoding: Some("utf-8".into()),
            absolute_expiry_time: i64::try_from(d.expires_at).ok(),
            creation_time: i64::try_from(d.enqueued_at).ok(),
            ..Properties::default()
        },
        application_properties: vec![],
        message_annotations: vec![
            (Value::sym("x-opt-lock-token"), Value::Uuid(uuid::Uuid::from_u128(d.lock_token.0).into_bytes())),
            (Value::sym("x-opt-sequence-number"), Value::Long(d.sequence_number as i64)),
            (Value::sym("iothub-enqueuedtime"), Value::Timestamp(d.enqueued_at as i64)),
            (Value::sym("iothub-deliverycount"), Value::Int(d.delivery_count as i32)),
        ],
        body: Body::Data(m.body.to_vec()),
    }
}
