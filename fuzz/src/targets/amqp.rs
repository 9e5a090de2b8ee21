//! AMQP targets: the type decoder, framing, message sections, the hub's sans-IO connection and
//! the simulated-devices service client. Seeds are real traffic, encoded with the emulator's own
//! encoder (client side) or recorded from the emulator's [`Connection`] talking to the client
//! (server side), so mutations start from structure the decoders actually see.

use iothub_emulator::Hub;
use iothub_emulator::amqp::frame::{self, AMQP_HEADER, FRAME_AMQP, FRAME_SASL, SASL_HEADER, code, list};
use iothub_emulator::amqp::message::{self, Body, Message, Properties};
use iothub_emulator::amqp::types::Value;
use iothub_emulator::amqp::{Connection, MAX_FRAME_BYTES};
use iothub_emulator::hub::DeviceInput;
use simulated_devices::amqp_client::ServiceConn;
use simulated_devices::service_client::C2dSend;

use crate::alloc::untracked;
use crate::runner::{Check, Outcome, Target};

/// The device the seeds send C2D messages to (registered in the connection target's hub).
const DEVICE: &str = "dev1";

/// AMQP format codes and common symbols, for dictionary mutations.
fn dictionary() -> Vec<Vec<u8>> {
    let mut d: Vec<Vec<u8>> = [
        0x00u8, 0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x50, 0x52, 0x53, 0x56, 0x60, 0x70, 0x71, 0x72, 0x73,
        0x74, 0x80, 0x82, 0x83, 0x84, 0x94, 0x98, 0xa0, 0xa1, 0xa3, 0xb0, 0xb1, 0xb3, 0xc0, 0xc1, 0xd0, 0xd1,
        0xe0, 0xf0,
    ]
    .iter()
    .map(|c| vec![*c])
    .collect();
    d.extend(
        [
            &b"\x00\x53\x70"[..],
            b"\x00\x53\x73",
            b"\x00\x53\x74",
            b"\x00\x53\x75",
            b"\x00\x53\x77",
            b"\xe0\xff\xff\x40",
            b"\xf0\xff\xff\xff\xff\xff\xff\xff\xff\x40",
            b"\xd0\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\xb0\x7f\xff\xff\xff",
            b"\x00\x00\x00\x00",
            b"\xff\xff\xff\xff",
            b"\x02\x00\x00\x00",
            b"\xa3\x07MSSBCBS",
            b"$management",
            b"ConsumerGroups/$Default/Partitions/",
            b"messages/events/",
            b"com.microsoft:epoch",
            b"amqp.annotation.x-opt-sequence-number >= ",
        ]
        .iter()
        .map(|s| s.to_vec()),
    );
    d
}

fn token() -> String {
    let hub = Hub::new(Default::default());
    let key = hub.policies().iter().find(|p| p.name == "iothubowner").map(|p| p.primary_key.clone());
    let key = key.unwrap_or_default();
    // Far in the future, so the seeds authorize whenever they run.
    iothub_emulator::sas::make_token("localhost", &key, Some("iothubowner"), 4_000_000_000)
        .unwrap_or_default()
}

fn c2d_message(id: &str) -> Message {
    Message {
        properties: Properties {
            message_id: Some(Value::str(id)),
            to: Some(format!("/devices/{DEVICE}/messages/devicebound")),
            content_type: Some("application/json".into()),
            ..Default::default()
        },
        application_properties: vec![
            ("iothub-ack".into(), Value::str("full")),
            ("custom".into(), Value::Int(-7)),
            ("bytes".into(), Value::Binary(vec![1, 2, 3])),
        ],
        body: Body::Data(format!("{{\"body\":\"{id}\"}}").into_bytes()),
        ..Default::default()
    }
}

fn put_token_message(token: &str) -> Message {
    Message {
        properties: Properties {
            message_id: Some(Value::Ulong(1)),
            reply_to: Some("cbs".into()),
            ..Default::default()
        },
        application_properties: vec![
            ("operation".into(), Value::str("put-token")),
            ("type".into(), Value::str("servicebus.windows.net:sastoken")),
            ("name".into(), Value::str("amqps://localhost")),
        ],
        body: Body::Value(Value::str(token)),
        ..Default::default()
    }
}

/// Message payloads: C2D, CBS put-token, and bodies of each kind.
fn message_seeds() -> Vec<Vec<u8>> {
    let mut sequence = c2d_message("seq");
    sequence.body = Body::Sequence(vec![Value::Uuid([7; 16]), Value::Timestamp(1_700_000_000_000)]);
    let mut annotated = c2d_message("ann");
    annotated.message_annotations = vec![(Value::sym("x-opt-partition-key"), Value::str("p"))];
    annotated.properties.correlation_id = Some(Value::Uuid([1; 16]));
    annotated.properties.user_id = Some(b"iothubowner".to_vec());
    [c2d_message("m1"), put_token_message(&token()), sequence, annotated]
        .iter()
        .map(Message::encode)
        .collect()
}

fn frame_bytes(kind: u8, channel: u16, body: &Value, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::write_frame(&mut out, kind, channel, body, payload);
    out
}

fn amqp(body: Value) -> Vec<u8> {
    frame_bytes(FRAME_AMQP, 0, &body, &[])
}

fn attach(handle: u32, peer_sends: bool, address: &str) -> Vec<u8> {
    let source = list(code::SOURCE, vec![Value::str(if peer_sends { "client" } else { address })]);
    let target = list(code::TARGET, vec![Value::str(if peer_sends { address } else { "client" })]);
    amqp(list(
        code::ATTACH,
        vec![
            Value::str(&format!("link-{handle}")),
            Value::Uint(handle),
            Value::Bool(!peer_sends),
            Value::Ubyte(0),
            Value::Ubyte(1),
            source,
            target,
            Value::Null,
            Value::Null,
            if peer_sends { Value::Uint(0) } else { Value::Null },
        ],
    ))
}

fn flow(handle: u32, credit: u32) -> Vec<u8> {
    let fields = [0, 5000, 0, 5000, handle, 0, credit];
    amqp(list(code::FLOW, fields.into_iter().map(Value::Uint).collect()))
}

/// Transfer frames of one message on `handle`, its payload split into frames of `chunk` bytes.
fn transfer(handle: u32, id: u32, m: &Message, chunk: usize) -> Vec<u8> {
    let payload = m.encode();
    let parts: Vec<&[u8]> = payload.chunks(chunk).collect();
    let mut out = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let more = Value::Bool(i + 1 < parts.len());
        let fields = if i == 0 {
            vec![
                Value::Uint(handle),
                Value::Uint(id),
                Value::Binary(id.to_be_bytes().to_vec()),
                Value::Uint(0),
                Value::Bool(false),
                more,
            ]
        } else {
            vec![Value::Uint(handle), Value::Null, Value::Null, Value::Null, Value::Null, more]
        };
        out.extend(frame_bytes(FRAME_AMQP, 0, &list(code::TRANSFER, fields), part));
    }
    out
}

fn open_begin() -> Vec<u8> {
    let mut out = amqp(list(
        code::OPEN,
        vec![
            Value::str("fuzz"),
            Value::str("localhost"),
            Value::Uint(65536),
            Value::Ushort(7),
            Value::Uint(30_000),
        ],
    ));
    out.extend(amqp(list(
        code::BEGIN,
        vec![Value::Null, Value::Uint(0), Value::Uint(5000), Value::Uint(5000)],
    )));
    out
}

/// What a service SDK sends after the AMQP header: open, begin, CBS links, put-token, a C2D
/// sender, two C2D messages (one in three frames), a feedback receiver, a disposition, detach,
/// end, close.
fn session_after_header(chunk: usize) -> Vec<u8> {
    let mut out = open_begin();
    out.extend(attach(0, true, "$cbs"));
    out.extend(attach(1, false, "$cbs"));
    out.extend(flow(1, 100));
    out.extend(transfer(0, 0, &put_token_message(&token()), usize::MAX));
    out.extend(attach(2, true, "/messages/devicebound"));
    out.extend(transfer(2, 1, &c2d_message("one"), usize::MAX));
    out.extend(transfer(2, 2, &c2d_message("two"), chunk));
    out.extend(attach(3, false, "/messages/serviceBound/feedback"));
    out.extend(flow(3, 10));
    let state = list(code::ACCEPTED, vec![]);
    out.extend(amqp(list(
        code::DISPOSITION,
        vec![Value::Bool(true), Value::Uint(0), Value::Uint(0), Value::Bool(true), state],
    )));
    out.extend(amqp(list(code::DETACH, vec![Value::Uint(2), Value::Bool(true)])));
    out.extend(amqp(list(code::END, vec![])));
    out.extend(amqp(list(code::CLOSE, vec![])));
    out
}

/// What an Event Hubs consumer sends (reference-2 §1): CBS, `$management` links and a READ, a
/// partition receiver with a selector filter, an epoch and the runtime-metric capability, credit;
/// then a receiver on IoT Hub's `messages/events` (redirected once it has credit).
fn event_hub_session() -> Vec<u8> {
    let mut out = open_begin();
    out.extend(attach(0, true, "$cbs"));
    out.extend(attach(1, false, "$cbs"));
    out.extend(flow(1, 100));
    out.extend(transfer(0, 0, &put_token_message(&token()), usize::MAX));
    out.extend(attach(2, true, "$management"));
    out.extend(attach(3, false, "$management"));
    out.extend(flow(3, 10));
    let read = Message {
        properties: Properties {
            message_id: Some(Value::Uuid([1; 16])),
            reply_to: Some("client".into()),
            ..Default::default()
        },
        application_properties: vec![
            ("operation".into(), Value::str("READ")),
            ("type".into(), Value::str("com.microsoft:partition")),
            ("name".into(), Value::str("localhost")),
            ("partition".into(), Value::str("0")),
        ],
        ..Default::default()
    };
    out.extend(transfer(2, 1, &read, usize::MAX));
    let filter = Value::Map(vec![(
        Value::sym("apache.org:selector-filter:string"),
        Value::described(0x0000_468C_0000_0004, Value::str("amqp.annotation.x-opt-offset > '-1'")),
    )]);
    let mut source = vec![Value::str("localhost/ConsumerGroups/$Default/Partitions/0")];
    source.resize(7, Value::Null);
    source.push(filter);
    let mut fields = vec![
        Value::str("partition-0"),
        Value::Uint(4),
        Value::Bool(true),
        Value::Ubyte(0),
        Value::Ubyte(0),
        list(code::SOURCE, source),
        list(code::TARGET, vec![Value::str("client")]),
    ];
    fields.resize(12, Value::Null);
    fields.push(Value::Array(vec![Value::sym("com.microsoft:enable-receiver-runtime-metric")]));
    fields.push(Value::Map(vec![(Value::sym("com.microsoft:epoch"), Value::Long(1))]));
    out.extend(amqp(list(code::ATTACH, fields)));
    out.extend(flow(4, 10));
    out.extend(attach(5, false, "amqps://localhost/messages/events/$management"));
    out.extend(flow(5, 1));
    out.extend(amqp(list(code::DETACH, vec![Value::Uint(4), Value::Bool(true)])));
    out.extend(amqp(list(code::END, vec![])));
    out.extend(amqp(list(code::CLOSE, vec![])));
    out
}

fn sasl(mechanism: &str, response: &[u8]) -> Vec<u8> {
    let mut out = SASL_HEADER.to_vec();
    let init = list(
        code::SASL_INIT,
        vec![Value::sym(mechanism), Value::Binary(response.to_vec()), Value::str("localhost")],
    );
    out.extend(frame_bytes(FRAME_SASL, 0, &init, &[]));
    out.extend(AMQP_HEADER);
    out
}

/// Whole client byte streams: uamqp (SASL MSSBCBS), SASL PLAIN with a token password, rhea (bare
/// header), plus a few short ones.
fn connection_seeds() -> Vec<Vec<u8>> {
    let plain = format!("\0iothubowner@sas.root.localhost\0{}", token()).into_bytes();
    let mut seeds = Vec::new();
    for (prefix, chunk) in
        [(sasl("MSSBCBS", &[]), 40), (sasl("PLAIN", &plain), 100), (AMQP_HEADER.to_vec(), 7)]
    {
        let mut s = prefix;
        s.extend(session_after_header(chunk));
        seeds.push(s);
    }
    let mut event_hub = AMQP_HEADER.to_vec();
    event_hub.extend(event_hub_session());
    seeds.push(event_hub);
    seeds.push(sasl("ANONYMOUS", &[]));
    let mut open_only = AMQP_HEADER.to_vec();
    open_only.extend(open_begin());
    open_only.extend(frame::HEARTBEAT);
    seeds.push(open_only);
    seeds
}

/// Single frames of every performative a client sends.
fn frame_seeds() -> Vec<Vec<u8>> {
    let stream = session_after_header(40);
    let mut frames = Vec::new();
    let mut buf = stream;
    while let Ok(Some(f)) = frame::parse_frame(&mut buf, u32::MAX) {
        if let Some(body) = &f.body {
            frames.push(frame_bytes(f.kind, f.channel, body, &f.payload));
        }
    }
    frames.push(frame::HEARTBEAT.to_vec());
    frames.push(sasl("PLAIN", b"\0user\0pass")[8..].to_vec());
    frames
}

/// Values: every performative's body and the message sections.
fn value_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for f in frame_seeds() {
        let mut buf = f;
        if let Ok(Some(frame)) = frame::parse_frame(&mut buf, u32::MAX)
            && let Some(body) = frame.body
        {
            seeds.push(body.to_bytes());
        }
    }
    seeds.extend(message_seeds());
    seeds.push(
        Value::Map(vec![
            (Value::sym("k"), Value::Double(f64::NAN)),
            (Value::Long(-1), Value::Array(vec![Value::sym("a"), Value::sym("b")])),
            (Value::Char('é'), Value::Decimal(0x74, vec![0; 4])),
            (Value::Short(-2), Value::Array(vec![Value::Int(1), Value::Int(300)])),
        ])
        .to_bytes(),
    );
    seeds
}

/// Compares encodings after one decode/encode pass: the encoder writes compact forms (and
/// non-symbol arrays as lists), so the first re-encoding may differ from the input but must be a
/// fixed point. Bytes, not `PartialEq`, because NaN floats are unequal to themselves.
fn round_trip(v: &Value) -> Result<(), String> {
    let first = v.to_bytes();
    let mut rest = &first[..];
    let again = Value::decode(&mut rest).map_err(|e| format!("the re-encoding does not decode: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("the re-encoding decodes with {} bytes left over", rest.len()));
    }
    let second = again.to_bytes();
    if first != second {
        return Err(format!(
            "the encoding is not a fixed point:\n  first  {}\n  second {}",
            crate::engine::hex(&first),
            crate::engine::hex(&second)
        ));
    }
    Ok(())
}

fn check_value() -> Check {
    Box::new(|input| {
        let mut buf = input;
        match Value::decode(&mut buf) {
            Err(_) => Ok(Outcome::Rejected),
            Ok(v) => untracked(|| round_trip(&v)).map(|()| Outcome::Accepted),
        }
    })
}

/// Writing a frame back and parsing it gives the same frame, byte for byte.
fn rewrite_round_trip(f: &frame::Frame, body: &Value) -> Result<(), String> {
    let mut again = frame_bytes(f.kind, f.channel, body, &f.payload);
    let g = frame::parse_frame(&mut again, u32::MAX)
        .map_err(|e| format!("a re-written frame does not parse: {e}"))?
        .ok_or("a re-written frame is incomplete")?;
    let body2 = g.body.as_ref().ok_or("a re-written frame lost its body")?;
    if (g.kind, g.channel, body2.to_bytes(), &g.payload) != (f.kind, f.channel, body.to_bytes(), &f.payload) {
        return Err("a re-written frame parses differently".into());
    }
    Ok(())
}

fn check_frame() -> Check {
    Box::new(|input| {
        let mut buf = input.to_vec();
        let mut outcome = Outcome::Rejected;
        loop {
            let before = buf.len();
            // The transfer reader that skips building values reads what the general path reads.
            if let Some((channel, t, at, size)) = frame::read_transfer(&buf, MAX_FRAME_BYTES) {
                let Ok(Some((f, general_size))) = frame::parse_frame_at(&buf, MAX_FRAME_BYTES) else {
                    return Err("read_transfer read a frame parse_frame_at refuses".into());
                };
                let fields = f.body.as_ref().map(frame::described_list);
                let Some(Ok((0x14, fields))) = fields else {
                    return Err("read_transfer read a frame that is not a transfer".into());
                };
                let general =
                    (f.channel, frame::Transfer::from_fields(&fields), &f.payload[..], general_size);
                if (channel, t, &buf[at..size], size) != general {
                    return Err(format!("read_transfer read {t:?}, parse_frame_at {general:?}"));
                }
            }
            match frame::parse_frame(&mut buf, MAX_FRAME_BYTES) {
                Ok(Some(f)) => {
                    if buf.len() >= before {
                        return Err("parse_frame returned a frame without consuming input".into());
                    }
                    outcome = Outcome::Accepted;
                    if let Some(body) = &f.body {
                        let _ = frame::described_list(body);
                        untracked(|| rewrite_round_trip(&f, body))?;
                    }
                }
                Ok(None) | Err(_) => return Ok(outcome),
            }
        }
    })
}

fn check_message() -> Check {
    Box::new(|input| match Message::decode(input) {
        Err(_) => Ok(Outcome::Rejected),
        Ok(m) => {
            let _ = message::to_c2d(m.clone());
            untracked(|| {
                let first = m.encode();
                let again =
                    Message::decode(&first).map_err(|e| format!("the re-encoding does not decode: {e}"))?;
                if again.encode() != first {
                    return Err("the message encoding is not a fixed point".to_owned());
                }
                Ok(Outcome::Accepted)
            })
        }
    })
}

/// Output one case of the connection target may produce: a reply per frame at most a few times
/// the frame's size, plus fixed-size replies (header, open, begin, close).
fn connection_output_limit(input: usize) -> usize {
    16 * input + 16 * 1024
}

/// A fresh connection on `hub` still completes the bare-header handshake.
fn hub_serves(hub: &Hub) -> Result<(), String> {
    let mut c = Connection::new(hub.clone());
    let mut hello = AMQP_HEADER.to_vec();
    hello.extend(open_begin());
    c.receive(&hello);
    let mut out = c.take_output();
    if !out.starts_with(&AMQP_HEADER) || !c.is_open() {
        return Err("after this input the hub no longer opens a new connection".into());
    }
    out.drain(..8);
    let codes: Vec<u64> = std::iter::from_fn(|| frame::parse_frame(&mut out, u32::MAX).ok().flatten())
        .filter_map(|f| f.body.and_then(|b| frame::described_list(&b).ok().map(|(c, _)| c)))
        .collect();
    if codes != [code::OPEN, code::BEGIN] {
        return Err(format!("after this input a new connection gets {codes:x?}, not open and begin"));
    }
    hub.get_twin(DEVICE).map_err(|e| format!("after this input the hub cannot read a twin: {e}"))?;
    Ok(())
}

fn check_connection() -> Check {
    let hub = Hub::new(Default::default());
    let _ = hub.put_device(DEVICE, DeviceInput::default(), None);
    // Telemetry in every partition, so partition receivers have events to send.
    for i in 0..16 {
        hub.record_telemetry(iothub_emulator::hub::D2cMessage {
            device_id: format!("fuzz-device-{i}"),
            properties: vec![("k".into(), "v".into())],
            body: bytes::Bytes::from_static(b"{}"),
            ..Default::default()
        });
    }
    Box::new(move |input| {
        let mut conn = Connection::new(hub.clone());
        let mut output = 0;
        // Two reads: a frame split across reads must be reassembled.
        let (a, b) = input.split_at(input.len() / 2);
        for part in [a, b] {
            conn.receive(part);
            conn.pump();
            output += conn.take_output().len();
        }
        let outcome = if conn.is_open() { Outcome::Accepted } else { Outcome::Rejected };
        conn.shut_down();
        output += conn.take_output().len();
        drop(conn);
        let limit = connection_output_limit(input.len());
        if output > limit {
            return Err(format!("wrote {output} bytes for a {}-byte input (limit {limit})", input.len()));
        }
        untracked(|| hub_serves(&hub))?;
        // Keep the hub's state steady across cases: with a full queue (50) every later C2D send
        // would stop at the depth check instead of reaching the deeper paths.
        untracked(|| hub.purge_c2d(DEVICE))
            .map_err(|e| format!("after this input the queue cannot be purged: {e}"))?;
        Ok(outcome)
    })
}

/// Server traffic recorded from the emulator's [`Connection`] answering the service client:
/// header, open, begin, attaches, flows, the CBS reply, dispositions, plus a close.
fn client_seeds() -> Vec<Vec<u8>> {
    let hub = Hub::new(Default::default());
    let _ = hub.put_device(DEVICE, DeviceInput::default(), None);
    let mut client = ServiceConn::new("localhost");
    let mut server = Connection::new(hub);
    client.put_token("localhost", &token());
    for i in 0..2 {
        let msg = C2dSend {
            body: b"{\"update\":true}".to_vec(),
            message_id: format!("msg-{i}"),
            ack: "full",
            content_type: Some("application/json".into()),
            expiry_ms: None,
        };
        client.send_c2d(DEVICE, &msg);
    }
    let mut recorded = Vec::new();
    for _ in 0..6 {
        server.receive(&client.take_output());
        server.pump();
        let out = server.take_output();
        recorded.extend_from_slice(&out);
        let _ = client.input(&out);
    }
    server.shut_down();
    recorded.extend(server.take_output());
    let mut header_only = AMQP_HEADER.to_vec();
    header_only.extend(frame::HEARTBEAT);
    vec![recorded, header_only]
}

fn check_client() -> Check {
    Box::new(|input| {
        let mut client = ServiceConn::new("localhost");
        client.take_output(); // its own opening frames
        let result = client.input(input);
        let written = client.take_output().len();
        let limit = 16 * input.len() + 4096;
        if written > limit {
            return Err(format!(
                "the client wrote {written} bytes for a {}-byte input (limit {limit})",
                input.len()
            ));
        }
        Ok(if result.is_ok() { Outcome::Accepted } else { Outcome::Rejected })
    })
}

/// `amqp_value`: [`Value::decode`], round-tripped.
pub const VALUE: Target = Target {
    name: "amqp_value",
    about: "amqp::types::Value::decode; accepted values re-encode to a fixed point",
    seeds: value_seeds,
    dictionary,
    max_len: 64 * 1024,
    alloc_k: 80,
    alloc_c: 16 * 1024,
    make: check_value,
};

/// `amqp_frame`: [`frame::parse_frame`] and [`frame::described_list`]; [`frame::read_transfer`]
/// reads what they read.
pub const FRAME: Target = Target {
    name: "amqp_frame",
    about: "amqp::frame::parse_frame (MAX_FRAME_BYTES) and described_list; frames re-write identically",
    seeds: frame_seeds,
    dictionary,
    max_len: 64 * 1024,
    alloc_k: 96,
    alloc_c: 16 * 1024,
    make: check_frame,
};

/// `amqp_message`: [`Message::decode`] and [`message::to_c2d`].
pub const MESSAGE: Target = Target {
    name: "amqp_message",
    about: "amqp::message::Message::decode and to_c2d; accepted messages re-encode to a fixed point",
    seeds: message_seeds,
    dictionary,
    max_len: 64 * 1024,
    alloc_k: 96,
    alloc_c: 16 * 1024,
    make: check_message,
};

/// `amqp_connection`: the hub's sans-IO [`Connection`].
pub const CONNECTION: Target = Target {
    name: "amqp_connection",
    about: "amqp::Connection receive/pump/take_output on one hub; output bounded, the hub keeps serving",
    seeds: connection_seeds,
    dictionary,
    max_len: 64 * 1024,
    alloc_k: 128,
    alloc_c: 256 * 1024,
    make: check_connection,
};

/// `amqp_client`: the simulated-devices service client's [`ServiceConn::input`].
pub const CLIENT: Target = Target {
    name: "amqp_client",
    about: "simulated_devices::amqp_client::ServiceConn::input on server bytes; output bounded",
    seeds: client_seeds,
    dictionary,
    max_len: 64 * 1024,
    alloc_k: 128,
    alloc_c: 64 * 1024,
    make: check_client,
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The connection seeds must reach the deep states, or mutations start from a refused
    /// connection: each full flow (MSSBCBS, PLAIN, bare header) authorizes through CBS or SASL and
    /// gets both C2D messages queued.
    #[test]
    fn full_connection_seeds_authorize_and_queue_both_c2d_messages() {
        for (i, seed) in connection_seeds().iter().take(3).enumerate() {
            let hub = Hub::new(Default::default());
            hub.put_device(DEVICE, DeviceInput::default(), None).unwrap();
            let mut conn = Connection::new(hub.clone());
            conn.receive(seed);
            assert!(conn.close_reason().is_none(), "seed {i}: {:?}", conn.close_reason());
            assert_eq!(hub.purge_c2d(DEVICE).unwrap(), 2, "seed {i} did not queue both messages");
        }
    }

    /// The Event Hubs seed reaches the deep states too: the management reply, events on the
    /// partition receiver and the redirect.
    #[test]
    fn the_event_hub_seed_reads_events_and_is_redirected() {
        let mut check = check_connection();
        let seed = connection_seeds().remove(3);
        assert!(check(&seed).is_ok(), "the target's checks hold on the seed");
        let hub = Hub::new(Default::default());
        for i in 0..16 {
            hub.record_telemetry(iothub_emulator::hub::D2cMessage {
                device_id: format!("fuzz-device-{i}"),
                ..Default::default()
            });
        }
        let mut conn = Connection::new(hub);
        conn.receive(&seed);
        assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
        let mut out = conn.take_output();
        out.drain(..8);
        let mut transfers_on = Vec::new();
        let mut conditions = Vec::new();
        while let Ok(Some(f)) = frame::parse_frame(&mut out, u32::MAX) {
            let Some(body) = f.body else { continue };
            let (c, fields) = frame::described_list(&body).unwrap();
            if c == code::TRANSFER {
                transfers_on.push(fields.u32(0).unwrap());
            }
            if c == code::DETACH
                && let Ok((_, err)) = frame::described_list(fields.get(2))
            {
                conditions.push(err.str(0).unwrap_or_default().to_owned());
            }
        }
        assert!(transfers_on.contains(&3), "a management reply: {transfers_on:?}");
        assert!(transfers_on.contains(&4), "events on the partition receiver: {transfers_on:?}");
        assert_eq!(conditions, vec!["amqp:link:redirect".to_owned()]);
    }

    /// The recorded server traffic holds the CBS reply and the dispositions, not only the opening.
    #[test]
    fn client_seed_is_the_whole_conversation() {
        let mut recorded = client_seeds().remove(0);
        assert!(recorded.starts_with(&AMQP_HEADER));
        recorded.drain(..8);
        let mut codes = Vec::new();
        while let Ok(Some(f)) = frame::parse_frame(&mut recorded, u32::MAX) {
            codes.extend(f.body.and_then(|b| frame::described_list(&b).ok()).map(|(c, _)| c));
        }
        for c in [code::OPEN, code::BEGIN, code::ATTACH, code::FLOW, code::TRANSFER, code::DISPOSITION] {
            assert!(codes.contains(&c), "no 0x{c:x} in {codes:x?}");
        }
    }
}
