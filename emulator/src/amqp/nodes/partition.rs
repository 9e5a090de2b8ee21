//! The Event Hub-compatible endpoint's partition receivers (reference-2 §1.4–§1.7): a receiver
//! link on `{eh}/ConsumerGroups/{group}/Partitions/{id}` reads one partition of the hub's event
//! log (`crate::hub::events`) from the start position its `apache.org:selector-filter:string`
//! names, and gets each event as IoT Hub writes it: the body as one data section, the device's
//! application properties with their names as sent, its system properties in the properties
//! section, and the annotations `x-opt-sequence-number`, `x-opt-offset`, `x-opt-enqueued-time`,
//! `iothub-connection-device-id`, `iothub-connection-auth-method`,
//! `iothub-connection-auth-generation-id`, `iothub-enqueuedtime` and `iothub-message-source`.
//!
//! Flow: events are read only while the link has credit, at most [`READ_BATCH`] at a time (shared
//! `Arc` records, not copies), so a slow reader costs nothing but its position. Deliveries go
//! unsettled (settled when the client asked for settle-on-send); dispositions are not needed:
//! Event Hubs readers keep their own position.
//!
//! Runtime metric: a link that desires `com.microsoft:enable-receiver-runtime-metric` gets it
//! offered and each event carries the partition's last enqueued sequence number, offset and time
//! (as of the read that fetched it) in its delivery annotations.
//!
//! Owner level: the link's `com.microsoft:epoch` property claims its place through
//! [`crate::hub::Hub::claim_receiver`]; a receiver a newer epoch overrules detaches with
//! `amqp:link:stolen`, as the SDKs expect.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{AttachRequest, Ctx, Node, Outgoing, Refusal, Wake};
use crate::amqp::frame::code;
use crate::amqp::message::{Body, Message, Properties};
use crate::amqp::types::Value;
use crate::hub::events::{Event, EventPosition, EventsError};
use crate::hub::receivers::{ClaimRefused, ReceiverClaim};

/// Events read from the log at once (at most this many wait in a link for credit).
pub const READ_BATCH: usize = 32;

/// The filter key every SDK uses for the start position.
const SELECTOR: &str = "apache.org:selector-filter:string";
/// The link property carrying the owner level.
const EPOCH: &str = "com.microsoft:epoch";
/// The capability asking for the partition's last enqueued event on every delivery.
const RUNTIME_METRIC: &str = "com.microsoft:enable-receiver-runtime-metric";

/// One partition receiver link.
#[derive(Debug)]
pub struct PartitionReceiver {
    partition: usize,
    /// The sequence number to read next.
    next: i64,
    /// Events read but not yet sent (at most [`READ_BATCH`]).
    ready: VecDeque<Arc<Event>>,
    claim: ReceiverClaim,
    /// The client asked for the runtime metric: the delivery-annotations section written with
    /// each event of the batch read last (the partition's last enqueued event at that read).
    runtime_metric: Option<Vec<u8>>,
}

/// Opens a receiver on partition `id` of consumer group `group`, or refuses it as Event Hubs does.
pub fn open(
    ctx: &mut Ctx<'_>,
    req: &AttachRequest<'_>,
    group: &str,
    id: &str,
) -> Result<Box<dyn Node>, Refusal> {
    let hub = ctx.hub;
    let resource =
        format!("{}/ConsumerGroups/{group}/Partitions/{id}", super::management::entity_resource(hub));
    if let Some(why) = ctx.auth.reason(hub, &resource) {
        return Err(Refusal::new("amqp:unauthorized-access", why));
    }
    hub.require_consumer_group(group).map_err(|e| Refusal::new("amqp:not-found", e.to_string()))?;
    let partition = hub.partition_index(id).map_err(|e| events_refusal(&e))?;
    let position = match selector(req.source) {
        Some(filter) => EventPosition::from_selector(filter).map_err(|e| events_refusal(&e))?,
        None => EventPosition::Start,
    };
    let epoch = link_property(req.properties, EPOCH).and_then(|v| match *v {
        Value::Long(e) => Some(e),
        ref other => other.as_u64().and_then(|e| i64::try_from(e).ok()),
    });
    let next = hub.resolve_event_position(partition, &position).map_err(|e| events_refusal(&e))?;
    let claim = hub.claim_receiver(group, partition, epoch).map_err(|e| claim_refusal(&e))?;
    tracing::debug!(group, partition, next, ?epoch, "partition receiver attached");
    let runtime_metric = capabilities(req.desired_capabilities).any(|c| c == RUNTIME_METRIC).then(Vec::new);
    Ok(Box::new(PartitionReceiver { partition, next, ready: VecDeque::new(), claim, runtime_metric }))
}

fn events_refusal(e: &EventsError) -> Refusal {
    let condition = match e {
        EventsError::PartitionOutOfRange { .. } => "com.microsoft:argument-out-of-range",
        EventsError::ConsumerGroupNotFound { .. } => "amqp:not-found",
        _ => "com.microsoft:argument-error",
    };
    Refusal::new(condition, e.to_string())
}

fn claim_refusal(e: &ClaimRefused) -> Refusal {
    let condition = match e {
        ClaimRefused::TooManyReaders => "com.microsoft:quota-exceeded",
        _ => "amqp:link:stolen",
    };
    Refusal::new(condition, e.to_string())
}

/// The selector filter's expression in a source terminus, found by its key (the descriptor differs
/// between SDKs: reference-2 §0.5).
fn selector(source: &Value) -> Option<&str> {
    let Some((code::SOURCE, Value::List(fields))) = source.as_described() else { return None };
    let Some(Value::Map(filters)) = fields.get(7) else { return None };
    let (_, v) = filters.iter().find(|(k, _)| k.as_str() == Some(SELECTOR))?;
    match v {
        Value::Described(dv) => dv.1.as_str(),
        other => other.as_str(),
    }
}

/// The symbols of a capabilities field (one symbol or an array of them).
fn capabilities(v: &Value) -> impl Iterator<Item = &str> {
    let items: &[Value] = match v {
        Value::Array(items) | Value::List(items) => items,
        single => std::slice::from_ref(single),
    };
    items.iter().filter_map(Value::as_str)
}

fn link_property<'a>(properties: &'a Value, key: &str) -> Option<&'a Value> {
    let Value::Map(pairs) = properties else { return None };
    pairs.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
}

impl Node for PartitionReceiver {
    fn kind(&self) -> &'static str {
        "partition"
    }

    fn next(&mut self, ctx: &mut Ctx<'_>) -> Option<Outgoing> {
        if self.ready.is_empty() {
            if ctx.hub.partition_end(self.partition) <= self.next {
                return None;
            }
            let batch = ctx.hub.read_events(self.partition, self.next, READ_BATCH).ok()?;
            if batch.missed > 0 {
                tracing::info!(
                    partition = self.partition,
                    missed = batch.missed,
                    "a partition reader fell behind retention"
                );
            }
            self.next = batch.next;
            self.ready.extend(batch.events);
            if let Some(section) = &mut self.runtime_metric {
                *section = runtime_metric(ctx, self.partition);
            }
        }
        let event = self.ready.pop_front()?;
        let mut payload = self.runtime_metric.clone().unwrap_or_default();
        payload.extend_from_slice(&event_message(&event).encode());
        Some(Outgoing { payload, settled: false, track: None })
    }

    fn offered_capabilities(&self) -> Value {
        match self.runtime_metric {
            Some(_) => Value::Array(vec![Value::sym(RUNTIME_METRIC)]),
            None => Value::Null,
        }
    }

    fn wants_wake(&self, _ctx: &Ctx<'_>) -> Wake {
        Wake::OnEvents
    }

    /// Every receiver can be evicted (by an epoch receiver), credit or not.
    fn watches(&self) -> bool {
        true
    }

    fn closing(&mut self, ctx: &mut Ctx<'_>) -> Option<Refusal> {
        let new = self.claim.evicted_by()?;
        let old = self.claim.epoch.map_or_else(|| "nil".to_owned(), |e| e.to_string());
        ctx.hub.release_receiver(&self.claim);
        Some(Refusal::new(
            "amqp:link:stolen",
            format!(
                "New receiver 'nil' with higher epoch of '{new}' is created hence current receiver 'nil' with epoch '{old}' is getting disconnected. If you are recreating the receiver, make sure a higher epoch is used."
            ),
        ))
    }

    fn detached(&mut self, ctx: &mut Ctx<'_>, _unsettled: Vec<u128>) {
        ctx.hub.release_receiver(&self.claim);
    }
}

/// The delivery-annotations section of the runtime metric (reference-2 §1.7): the partition's last
/// enqueued event and when that was read.
fn runtime_metric(ctx: &Ctx<'_>, partition: usize) -> Vec<u8> {
    let Ok(info) = ctx.hub.partition_info(partition) else { return Vec::new() };
    let annotations = vec![
        (Value::sym("last_enqueued_sequence_number"), Value::Long(info.last_enqueued_sequence_number)),
        (Value::sym("last_enqueued_offset"), Value::str(&info.last_enqueued_offset_str())),
        (Value::sym("last_enqueued_time_utc"), Value::Timestamp(info.last_enqueued_time as i64)),
        (Value::sym("runtime_info_retrieval_time_utc"), Value::Timestamp(ctx.hub.now() as i64)),
    ];
    Value::described(code::DELIVERY_ANNOTATIONS, Value::Map(annotations)).to_bytes()
}

/// An event as IoT Hub's built-in endpoint delivers it (reference-2 §1.7).
pub fn event_message(e: &Event) -> Message {
    let s = |v: &str| Value::str(v);
    let mut annotations = vec![(Value::sym("iothub-connection-device-id"), s(&e.device_id))];
    if let Some(m) = &e.module_id {
        annotations.push((Value::sym("iothub-connection-module-id"), s(m)));
    }
    annotations.extend([
        (Value::sym("iothub-connection-auth-method"), s(e.auth.as_json_str())),
        (Value::sym("iothub-connection-auth-generation-id"), s(&e.auth_generation_id_str())),
        (Value::sym("iothub-enqueuedtime"), Value::Timestamp(e.enqueued_at as i64)),
        (Value::sym("iothub-message-source"), s(e.source.as_str())),
    ]);
    let mut properties = Properties::default();
    for (name, value) in &e.system_properties {
        match name.as_str() {
            "message-id" => properties.message_id = Some(s(value)),
            "correlation-id" => properties.correlation_id = Some(s(value)),
            "user-id" => properties.user_id = Some(value.as_bytes().to_vec()),
            "content-type" => properties.content_type = Some(value.clone()),
            "content-encoding" => properties.content_encoding = Some(value.clone()),
            "to" => properties.to = Some(value.clone()),
            "absolute-expiry-time" => properties.absolute_expiry_time = time_ms(value),
            "creation-time" => properties.creation_time = time_ms(value),
            // `$.ctime` and anything else IoT Hub keeps (PnP `dt-subject`, `dt-dataschema`, ...)
            // travel as annotations.
            "ctime" => annotations.push((Value::sym("iothub-creation-time-utc"), s(value))),
            "sub" => annotations.push((Value::sym("dt-subject"), s(value))),
            other => annotations.push((Value::sym(other), s(value))),
        }
    }
    annotations.extend([
        (Value::sym("x-opt-sequence-number"), Value::Long(e.sequence_number)),
        (Value::sym("x-opt-offset"), s(&e.offset_str())),
        (Value::sym("x-opt-enqueued-time"), Value::Timestamp(e.enqueued_at as i64)),
    ]);
    Message {
        properties,
        application_properties: e.properties.iter().map(|(k, v)| (k.clone(), s(v))).collect(),
        message_annotations: annotations,
        body: Body::Data(e.body.to_vec()),
    }
}

/// A time system property as epoch ms: digits as they are, else an RFC 3339 / ISO 8601 time.
fn time_ms(text: &str) -> Option<i64> {
    text.parse().ok().or_else(|| crate::clock::parse_iso8601(text).and_then(|t| i64::try_from(t).ok()))
}
