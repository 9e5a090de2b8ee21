//! Throughput of the AMQP service endpoint's protocol layer, without sockets or TLS: one
//! [`Connection`] takes a CBS put-token and then `MESSAGES` C2D transfers (rhea's shape: data body,
//! message-id, `to`, `iothub-ack`) spread over `DEVICES` devices, and settles each into the hub.
//! Prints messages per second and the bytes per message on the wire.
//!
//! Run: `cargo run --release -p iothub-emulator --example amqp_c2d_throughput [messages] [devices]`

use std::time::Instant;

use iothub_emulator::amqp::Connection;
use iothub_emulator::amqp::frame::{self, AMQP_HEADER, FRAME_AMQP, code, list};
use iothub_emulator::amqp::message::{Body, Message, Properties};
use iothub_emulator::amqp::types::Value;
use iothub_emulator::hub::{DeviceInput, Hub, HubConfig};
use iothub_emulator::sas::make_token;

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

fn transfer(handle: u32, id: u32, m: &Message) -> Vec<u8> {
    let fields = vec![
        Value::Uint(handle),
        Value::Uint(id),
        Value::Binary(id.to_be_bytes().to_vec()),
        Value::Uint(0),
        Value::Bool(false),
    ];
    frame_bytes(list(code::TRANSFER, fields), &m.encode())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let messages: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let devices: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let hub = Hub::new(HubConfig::default());
    for d in 0..devices {
        hub.put_device(&format!("bench-{d}"), DeviceInput::default(), None).expect("device");
    }
    let key = hub.policies().iter().find(|p| p.name == "iothubowner").expect("owner").primary_key.clone();
    let se = hub.now() / 1000 + 3600;
    let token = make_token(hub.hostname(), &key, Some("iothubowner"), se).expect("token");

    let mut conn = Connection::new(hub.clone());
    conn.receive(&AMQP_HEADER);
    conn.receive(&frame_bytes(list(code::OPEN, vec![Value::str("bench")]), &[]));
    conn.receive(&frame_bytes(
        list(code::BEGIN, vec![Value::Null, Value::Uint(0), Value::Uint(u32::MAX), Value::Uint(u32::MAX)]),
        &[],
    ));
    conn.receive(&attach(0, true, "$cbs"));
    conn.receive(&attach(1, false, "$cbs"));
    let put = Message {
        properties: Properties { message_id: Some(Value::Ulong(0)), ..Properties::default() },
        application_properties: vec![
            ("operation".into(), Value::str("put-token")),
            ("type".into(), Value::str("servicebus.windows.net:sastoken")),
        ],
        body: Body::Value(Value::str(&token)),
        ..Message::default()
    };
    conn.receive(&transfer(0, 0, &put));
    conn.receive(&attach(2, true, "/messages/devicebound"));
    conn.take_output();
    assert!(conn.authorized(), "the put-token must be accepted");

    let inputs: Vec<Vec<u8>> = (0..messages)
        .map(|i| {
            let m = Message {
                properties: Properties {
                    message_id: Some(Value::str(&format!("msg-{i}"))),
                    to: Some(format!("/devices/bench-{}/messages/devicebound", i % devices)),
                    ..Properties::default()
                },
                application_properties: vec![("iothub-ack".into(), Value::str("full"))],
                body: Body::Data(format!("{{\"release\":\"1.2.3\",\"n\":{i}}}").into_bytes()),
                ..Message::default()
            };
            transfer(2, i + 1, &m)
        })
        .collect();
    let in_bytes: usize = inputs.iter().map(Vec::len).sum();
    let mut out_bytes = 0usize;
    let started = Instant::now();
    for bytes in &inputs {
        conn.receive(bytes);
        out_bytes += conn.take_output().len();
    }
    let secs = started.elapsed().as_secs_f64();
    assert!(!conn.is_closed(), "the connection must survive the run: {:?}", conn.close_reason());
    let queued: usize = (0..devices)
        .map(|d| {
            let mut n = 0;
            while hub.receive_c2d(&format!("bench-{d}"), 60_000).expect("device").is_some() {
                n += 1;
            }
            n
        })
        .sum();
    assert_eq!(queued as u32, messages.min(devices * 50), "every accepted message is queued");
    println!("messages={messages} devices={devices} queued={queued}");
    println!("elapsed_s={secs:.3} rate_msgs_per_s={:.0}", f64::from(messages) / secs);
    println!(
        "wire_in_bytes_per_msg={:.1} wire_out_bytes_per_msg={:.1}",
        in_bytes as f64 / f64::from(messages),
        out_bytes as f64 / f64::from(messages)
    );
}
