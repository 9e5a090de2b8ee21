//! Throughput of the Event Hub-compatible partition receiver's protocol layer, without sockets or
//! TLS: `EVENTS` telemetry records from `DEVICES` devices go into the hub's event log, then one
//! [`Connection`] (CBS put-token for the entity, one receiver per partition from the start, credit
//! granted in steps of 300 like Python's prefetch) reads them all. Prints events per second out
//! (encoding included), the bytes per event on the wire, and events per second into the log.
//!
//! Run: `cargo run --release -p iothub-emulator --example amqp_event_hub_throughput [events] [devices]`

use std::time::Instant;

use iothub_emulator::amqp::Connection;
use iothub_emulator::amqp::frame::{self, AMQP_HEADER, FRAME_AMQP, code, list};
use iothub_emulator::amqp::message::{Body, Message, Properties};
use iothub_emulator::amqp::types::Value;
use iothub_emulator::hub::{D2cMessage, Hub, HubConfig};
use iothub_emulator::sas::make_token;

/// Credit granted per top-up (Python's default prefetch).
const CREDIT: u32 = 300;

fn frame_bytes(body: Value, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::write_frame(&mut out, FRAME_AMQP, 0, &body, payload);
    out
}

fn attach(handle: u32, peer_sends: bool, address: &str) -> Vec<u8> {
    let terminus = |c, a: &str| list(c, vec![Value::str(a)]);
    let (source, target) = if peer_sends {
        (terminus(code::SOURCE, "bench"), terminus(code::TARGET, address))
    } else {
        (terminus(code::SOURCE, address), terminus(code::TARGET, "bench"))
    };
    let fields = vec![
        Value::str(&format!("link-{handle}")),
        Value::Uint(handle),
        Value::Bool(!peer_sends),
        Value::Ubyte(0),
        Value::Ubyte(0),
        source,
        target,
    ];
    frame_bytes(list(code::ATTACH, fields), &[])
}

fn flow(handle: u32, delivery_count: u32, credit: u32) -> Vec<u8> {
    let fields =
        [0, 0x7fff_ffff, 0, 100_000, handle, delivery_count, credit].into_iter().map(Value::Uint).collect();
    frame_bytes(list(code::FLOW, fields), &[])
}

/// Transfers in `bytes`, by handle.
fn count_transfers(mut bytes: Vec<u8>, per_handle: &mut [u32]) {
    while let Ok(Some(f)) = frame::parse_frame(&mut bytes, u32::MAX) {
        let Some(body) = f.body else { continue };
        if let Ok((code::TRANSFER, fields)) = frame::described_list(&body)
            && let Some(h) = fields.u32(0)
            && let Some(n) = per_handle.get_mut(h as usize)
        {
            *n += 1;
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let events: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let devices: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let mut config = HubConfig::default();
    config.events.memory_budget_bytes = 1024 * 1024 * 1024;
    let hub = Hub::new(config);
    let started = Instant::now();
    for i in 0..events {
        hub.record_telemetry(D2cMessage {
            device_id: format!("bench-{}", i % devices),
            system_properties: vec![("message-id".into(), format!("m{i}"))],
            properties: vec![("temperature".into(), "21.5".into())],
            body: bytes::Bytes::from_static(b"{\"temperature\":21.5,\"humidity\":40}"),
            ..Default::default()
        });
    }
    let into_log = started.elapsed();
    let partitions = hub.partition_count() as u32;

    let mut conn = Connection::new(hub.clone());
    let mut input = AMQP_HEADER.to_vec();
    input.extend(frame_bytes(list(code::OPEN, vec![Value::str("bench")]), &[]));
    let begin =
        list(code::BEGIN, vec![Value::Null, Value::Uint(0), Value::Uint(100_000), Value::Uint(100_000)]);
    input.extend(frame_bytes(begin, &[]));
    input.extend(attach(0, true, "$cbs"));
    input.extend(attach(1, false, "$cbs"));
    input.extend(flow(1, 0, 10));
    let key = &hub.policies().iter().find(|p| p.name == "iothubowner").expect("owner").primary_key;
    let entity = format!("sb://localhost/{}", hub.event_hub_name());
    let token = make_token(&entity, key, Some("iothubowner"), u64::MAX / 2).expect("token");
    let put = Message {
        properties: Properties { message_id: Some(Value::Ulong(0)), ..Default::default() },
        application_properties: vec![
            ("operation".into(), Value::str("put-token")),
            ("type".into(), Value::str("servicebus.windows.net:sastoken")),
            ("name".into(), Value::str(&entity)),
        ],
        body: Body::Value(Value::str(&token)),
        ..Default::default()
    };
    let transfer = list(
        code::TRANSFER,
        vec![Value::Uint(0), Value::Uint(0), Value::Binary(vec![0]), Value::Uint(0), Value::Bool(true)],
    );
    input.extend(frame_bytes(transfer, &put.encode()));
    for p in 0..partitions {
        input.extend(attach(
            2 + p,
            false,
            &format!("{}/ConsumerGroups/$Default/Partitions/{p}", hub.event_hub_name()),
        ));
    }
    conn.receive(&input);
    let _ = conn.take_output();

    let mut received = vec![0u32; 2 + partitions as usize];
    let mut wire_bytes = 0usize;
    let started = Instant::now();
    loop {
        let total: u32 = received[2..].iter().sum();
        if total >= events {
            break;
        }
        let mut grant = Vec::new();
        for p in 0..partitions {
            let h = 2 + p;
            grant.extend(flow(h, received[h as usize], CREDIT));
        }
        conn.receive(&grant);
        conn.pump();
        let out = conn.take_output();
        wire_bytes += out.len();
        let before: u32 = received[2..].iter().sum();
        count_transfers(out, &mut received);
        if received[2..].iter().sum::<u32>() == before {
            eprintln!("stalled at {before} of {events} events");
            std::process::exit(1);
        }
    }
    let elapsed = started.elapsed();
    println!(
        "{events} events from {devices} devices over {partitions} partitions: into the log {:.0}/s; out through one connection {:.0}/s ({:.1} ms), {} bytes per event on the wire",
        f64::from(events) / into_log.as_secs_f64(),
        f64::from(events) / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1000.0,
        wire_bytes / events as usize
    );
}
