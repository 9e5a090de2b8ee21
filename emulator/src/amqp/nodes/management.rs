//! The Event Hub-compatible endpoint's `$management` node (reference-2 §1.3): READ requests for
//! the hub's runtime information (`com.microsoft:eventhub`: name, created time, partition ids) and a
//! partition's (`com.microsoft:partition`: sequence numbers, offset and time of the last event,
//! `is_partition_empty`), answered on the session's `$management` receiver link.
//!
//! Requests arrive on a link targeting `$management` (JS, Python) or `{eh}/$management`; each is
//! authorized by the connection's CBS grants for the entity or by its own `security_token`
//! application property. The answer is an AMQP-value map with string keys, timestamps in ms and
//! `partition_ids` as an AMQP array of strings, as every SDK parses it; the status is an int in
//! `status-code`, with `error-condition` on errors.

use super::{Ctx, Node, Outcome, Received};
use crate::amqp::message::{Body, Message};
use crate::amqp::types::Value;
use crate::hub::Hub;
use crate::hub::events::EventsError;
use crate::sas::Rights;

/// The node kind replies are routed by.
pub(super) const KIND: &str = "$management";

/// A link the peer sends management requests on.
#[derive(Debug)]
pub struct Requests;

impl Node for Requests {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn receive(&mut self, ctx: &mut Ctx<'_>, request: Message) -> Received {
        let reply = match answer(ctx, &request) {
            Ok(body) => {
                let mut reply = super::cbs::reply(&request, 200, "OK");
                reply.body = Body::Value(body);
                reply
            }
            Err(e) => {
                tracing::info!(
                    status = e.status,
                    condition = e.condition,
                    "$management request refused: {}",
                    e.description
                );
                let mut reply = super::cbs::reply(&request, e.status, &e.description);
                reply.application_properties.push(("error-condition".into(), Value::sym(e.condition)));
                reply
            }
        };
        Received { outcome: Outcome::Accepted, reply: Some(reply) }
    }
}

/// A refused management request.
#[derive(Debug)]
struct Refused {
    status: i32,
    condition: &'static str,
    description: String,
}

fn refused(status: i32, condition: &'static str, description: impl Into<String>) -> Refused {
    Refused { status, condition, description: description.into() }
}

/// The decoded resource a management request must be authorized for.
pub(super) fn entity_resource(hub: &Hub) -> String {
    format!("{}/{}", hub.hostname(), hub.event_hub_name())
}

fn answer(ctx: &mut Ctx<'_>, request: &Message) -> Result<Value, Refused> {
    let hub = ctx.hub;
    let entity = entity_resource(hub);
    let token_ok = request.app_str("security_token").is_some_and(|t| {
        hub.authenticate_scoped_policy(t, Rights::SERVICE_CONNECT)
            .is_ok_and(|a| crate::sas::scope_covers(&a.resource, &entity))
    });
    if !token_ok && let Some(why) = ctx.auth.reason(hub, &format!("{entity}/$management")) {
        return Err(refused(401, "amqp:unauthorized-access", why));
    }
    match request.app_str("operation") {
        Some("READ") => {}
        other => {
            return Err(refused(
                400,
                "amqp:not-implemented",
                format!("unsupported $management operation {other:?}; only READ is served"),
            ));
        }
    }
    let name = request.app_str("name").unwrap_or_default();
    if !name.eq_ignore_ascii_case(hub.event_hub_name()) {
        return Err(refused(
            404,
            "amqp:not-found",
            format!(
                "The messaging entity '{name}' could not be found; this hub's is '{}'.",
                hub.event_hub_name()
            ),
        ));
    }
    let s = |v: &str| Value::str(v);
    match request.app_str("type") {
        Some("com.microsoft:eventhub") => {
            let info = hub.event_hub_info();
            Ok(Value::Map(vec![
                (s("name"), s(&info.name)),
                (s("type"), s("com.microsoft:eventhub")),
                (s("created_at"), Value::Timestamp(info.created_at as i64)),
                (s("partition_count"), Value::Int(info.partition_ids.len() as i32)),
                (s("partition_ids"), Value::Array(info.partition_ids.iter().map(|p| s(p)).collect())),
            ]))
        }
        Some("com.microsoft:partition") => {
            let id = request.app_str("partition").unwrap_or_default();
            let p = hub.partition_index(id).map_err(|e| out_of_range(&e))?;
            let info = hub.partition_info(p).map_err(|e| out_of_range(&e))?;
            Ok(Value::Map(vec![
                (s("name"), s(hub.event_hub_name())),
                (s("type"), s("com.microsoft:partition")),
                (s("partition"), s(&info.id)),
                (s("begin_sequence_number"), Value::Long(info.begin_sequence_number)),
                (s("last_enqueued_sequence_number"), Value::Long(info.last_enqueued_sequence_number)),
                (s("last_enqueued_offset"), s(&info.last_enqueued_offset_str())),
                (s("last_enqueued_time_utc"), Value::Timestamp(info.last_enqueued_time as i64)),
                (s("is_partition_empty"), Value::Bool(info.is_empty)),
            ]))
        }
        other => Err(refused(
            400,
            "com.microsoft:argument-error",
            format!("unsupported READ type {other:?}; use com.microsoft:eventhub or com.microsoft:partition"),
        )),
    }
}

fn out_of_range(e: &EventsError) -> Refused {
    refused(400, "com.microsoft:argument-out-of-range", e.to_string())
}
