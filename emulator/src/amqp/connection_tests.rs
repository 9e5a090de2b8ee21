//! Unit tests of the sans-IO [`Connection`] against a real [`Hub`] on a manual clock: a test peer
//! writes headers and frames in and reads the frames that come back, as uamqp and rhea would.

use std::sync::Arc;

use super::connection::Connection;
use super::frame::{self, AMQP_HEADER, FRAME_AMQP, FRAME_SASL, Fields, SASL_HEADER, code, list};
use super::message::{Body, Message, Properties};
use super::types::Value;
use crate::c2d::AckMode;
use crate::clock::ManualClock;
use crate::hub::messaging::Settlement;
use crate::hub::{DeviceInput, Hub, HubConfig};
use crate::sas::make_token;

const START_MS: u64 = 1_700_000_000_000;
const CBS_SENDER: u32 = 0;
const CBS_RECEIVER: u32 = 1;
const C2D: u32 = 2;
const FEEDBACK: u32 = 3;

/// One frame the connection wrote.
#[derive(Debug)]
struct Out {
    channel: u16,
    code: u64,
    fields: Fields,
    payload: Vec<u8>,
}

struct Peer {
    conn: Connection,
    hub: Hub,
    clock: ManualClock,
    next_delivery: u32,
}

impl Peer {
    fn new() -> Self {
        Self::with_config(HubConfig::default())
    }

    fn with_config(config: HubConfig) -> Self {
        let clock = ManualClock::new(START_MS);
        let hub = Hub::with_clock(config, Arc::new(clock.clone()));
        Self { conn: Connection::new(hub.clone()), hub, clock, next_delivery: 0 }
    }

    /// Writes `bytes` and returns the frames written back (after any protocol header).
    fn raw(&mut self, bytes: &[u8]) -> Vec<Out> {
        self.conn.receive(bytes);
        let mut out = self.conn.take_output();
        if out.starts_with(b"AMQP") {
            out.drain(..8);
        }
        parse_all(out)
    }

    fn frame(&mut self, kind: u8, channel: u16, body: Value, payload: &[u8]) -> Vec<Out> {
        let mut bytes = Vec::new();
        frame::write_frame(&mut bytes, kind, channel, &body, payload);
        self.raw(&bytes)
    }

    fn send(&mut self, body: Value) -> Vec<Out> {
        self.frame(FRAME_AMQP, 0, body, &[])
    }

    /// Bare header (rhea), open, begin.
    fn open(&mut self) {
        self.raw(&AMQP_HEADER);
        let open = self
            .send(list(code::OPEN, vec![Value::str("peer"), Value::str("localhost"), Value::Uint(65536)]));
        assert_eq!(open[0].code, code::OPEN);
        let begin = self
            .send(list(code::BEGIN, vec![Value::Null, Value::Uint(0), Value::Uint(5000), Value::Uint(5000)]));
        assert_eq!(begin[0].code, code::BEGIN);
        assert_eq!(begin[0].fields.get(0), &Value::Ushort(0));
    }

    /// Attaches a link; `peer_sends` is the peer's role (sender = false on the wire).
    fn attach(&mut self, handle: u32, peer_sends: bool, address: &str) -> Vec<Out> {
        let source = list(code::SOURCE, vec![Value::str(if peer_sends { "client" } else { address })]);
        let target = list(code::TARGET, vec![Value::str(if peer_sends { address } else { "client" })]);
        let out = self.send(list(
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
        ));
        if !peer_sends {
            // Grant credit like every client's receiver does.
            self.send(link_flow(handle, 0, 100));
        }
        out
    }

    fn cbs_links(&mut self) {
        self.attach(CBS_SENDER, true, "$cbs");
        self.attach(CBS_RECEIVER, false, "$cbs");
    }

    /// Sends one unsettled message on `handle`; returns the frames written back.
    fn transfer(&mut self, handle: u32, m: &Message) -> Vec<Out> {
        self.transfer_in_frames(handle, m, usize::MAX)
    }

    /// Like [`Peer::transfer`], splitting the payload into frames of at most `chunk` bytes
    /// (`more` on all but the last; later frames carry only the handle).
    fn transfer_in_frames(&mut self, handle: u32, m: &Message, chunk: usize) -> Vec<Out> {
        let id = self.next_delivery;
        self.next_delivery += 1;
        let payload = m.encode();
        let chunks: Vec<&[u8]> = payload.chunks(chunk).collect();
        let mut out = Vec::new();
        for (i, part) in chunks.iter().enumerate() {
            let more = Value::Bool(i + 1 < chunks.len());
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
            out.extend(self.frame(FRAME_AMQP, 0, list(code::TRANSFER, fields), part));
        }
        out
    }

    fn token(&self, expiry_secs: u64) -> String {
        let key = &self.hub.policies().iter().find(|p| p.name == "iothubowner").unwrap().primary_key;
        make_token("localhost", key, Some("iothubowner"), expiry_secs).unwrap()
    }

    fn put_token(&mut self, token: &str, message_id: Value) -> Vec<Out> {
        let m = Message {
            properties: Properties { message_id: Some(message_id), ..Default::default() },
            application_properties: vec![
                ("operation".into(), Value::str("put-token")),
                ("type".into(), Value::str("servicebus.windows.net:sastoken")),
                ("name".into(), Value::str("https://localhost")),
            ],
            body: Body::Value(Value::str(token)),
            ..Default::default()
        };
        self.transfer(CBS_SENDER, &m)
    }

    fn authorize(&mut self) {
        let token = self.token(START_MS / 1000 + 3600);
        let out = self.put_token(&token, Value::Ulong(0));
        assert_eq!(cbs_status(&out), 200);
    }

    /// An authorized connection with a C2D sender link, and device `device` registered.
    fn sender(device: &str) -> Self {
        Self::sender_on(HubConfig::default(), device)
    }

    /// [`Peer::sender`] on a hub configured with `config`.
    fn sender_on(config: HubConfig, device: &str) -> Self {
        let mut p = Self::with_config(config);
        p.create_device(device);
        p.open();
        p.cbs_links();
        p.authorize();
        p.attach(C2D, true, "/messages/devicebound");
        p
    }

    fn create_device(&self, id: &str) {
        self.hub.put_device(id, DeviceInput::default(), None).unwrap();
    }
}

/// The flow a receiving client sends: session windows of 5000, then the link's count and credit.
fn link_flow(handle: u32, delivery_count: u32, credit: u32) -> Value {
    let fields = [0, 5000, 0, 5000, handle, delivery_count, credit];
    list(code::FLOW, fields.into_iter().map(Value::Uint).collect())
}

fn parse_all(mut bytes: Vec<u8>) -> Vec<Out> {
    let mut frames = Vec::new();
    while let Some(f) = frame::parse_frame(&mut bytes, u32::MAX).unwrap() {
        let Some(body) = f.body else { continue };
        let (code, fields) = frame::described_list(&body).unwrap();
        frames.push(Out { channel: f.channel, code, fields, payload: f.payload });
    }
    frames
}

fn c2d(to: &str, id: &str) -> Message {
    Message {
        properties: Properties {
            message_id: Some(Value::str(id)),
            to: Some(format!("/devices/{to}/messages/devicebound")),
            ..Default::default()
        },
        application_properties: vec![("iothub-ack".into(), Value::str("full"))],
        body: Body::Data(format!("body of {id}").into_bytes()),
        ..Default::default()
    }
}

fn disposition(out: &[Out]) -> &Out {
    out.iter().find(|f| f.code == code::DISPOSITION).expect("a disposition")
}

/// The outcome of the single disposition in `out`: `Ok(())` for settled accepted, `Err(condition)`.
fn outcome(out: &[Out]) -> Result<(), String> {
    let d = disposition(out);
    assert_eq!(d.fields.get(0), &Value::Bool(true), "role receiver");
    assert_eq!(d.fields.get(3), &Value::Bool(true), "settled");
    let (c, state) = frame::described_list(d.fields.get(4)).unwrap();
    match c {
        code::ACCEPTED => Ok(()),
        code::REJECTED => {
            let (_, err) = frame::described_list(state.get(0)).unwrap();
            Err(err.str(0).unwrap().to_owned())
        }
        other => panic!("unexpected state 0x{other:x}"),
    }
}

fn cbs_reply(out: &[Out]) -> Message {
    let t = out.iter().find(|f| f.code == code::TRANSFER).expect("a CBS reply");
    assert_eq!(t.fields.get(0), &Value::Uint(CBS_RECEIVER));
    Message::decode(&t.payload).unwrap()
}

fn cbs_status(out: &[Out]) -> i32 {
    match cbs_reply(out).application_properties.iter().find(|(k, _)| k == "status-code") {
        Some((_, Value::Int(s))) => *s,
        other => panic!("status-code must be an AMQP int, got {other:?}"),
    }
}

#[test]
fn bare_amqp_header_is_answered_and_open_echoed() {
    let mut p = Peer::new();
    p.conn.receive(&AMQP_HEADER);
    assert_eq!(p.conn.take_output(), AMQP_HEADER.to_vec());
    let out = p.send(list(
        code::OPEN,
        vec![
            Value::str("rhea"),
            Value::str("localhost"),
            Value::Uint(1024),
            Value::Null,
            Value::Uint(30_000),
        ],
    ));
    assert_eq!(out[0].code, code::OPEN);
    assert_eq!(out[0].fields.u32(2), Some(super::MAX_FRAME_BYTES));
    assert_eq!(p.conn.peer_idle_timeout_ms(), Some(30_000));
}

#[test]
fn sasl_mssbcbs_with_an_empty_initial_response_succeeds() {
    let mut p = Peer::new();
    p.conn.receive(&SASL_HEADER);
    let out = p.conn.take_output();
    assert_eq!(&out[..8], &SASL_HEADER);
    let frames = parse_all(out[8..].to_vec());
    assert_eq!(frames[0].code, code::SASL_MECHANISMS);
    let Value::Array(mechs) = frames[0].fields.get(0) else { panic!("mechanisms must be an array") };
    assert!(mechs.contains(&Value::sym("MSSBCBS")) && mechs.contains(&Value::sym("ANONYMOUS")));
    let init =
        list(code::SASL_INIT, vec![Value::sym("MSSBCBS"), Value::Binary(vec![]), Value::str("localhost")]);
    let out = p.frame(FRAME_SASL, 0, init, &[]);
    assert_eq!((out[0].code, out[0].fields.get(0)), (code::SASL_OUTCOME, &Value::Ubyte(0)));
    p.conn.receive(&AMQP_HEADER);
    assert_eq!(p.conn.take_output(), AMQP_HEADER.to_vec());
    assert!(!p.conn.is_closed());
}

#[test]
fn sasl_plain_checks_the_password_as_a_sas_token() {
    for (password_ok, code_expected) in [(true, 0u8), (false, 1u8)] {
        let mut p = Peer::new();
        p.raw(&SASL_HEADER);
        let token =
            if password_ok { p.token(START_MS / 1000 + 60) } else { "SharedAccessSignature sr=x".into() };
        let response = format!("\0iothubowner@sas.root.localhost\0{token}").into_bytes();
        let init = list(code::SASL_INIT, vec![Value::sym("PLAIN"), Value::Binary(response)]);
        let out = p.frame(FRAME_SASL, 0, init, &[]);
        assert_eq!(out[0].fields.get(0), &Value::Ubyte(code_expected));
        assert_eq!(p.conn.is_closed(), !password_ok);
        assert_eq!(p.conn.authorized(), password_ok);
    }
}

#[test]
fn an_unknown_protocol_header_gets_ours_and_a_close() {
    let mut p = Peer::new();
    p.conn.receive(b"HTTP/1.1");
    assert_eq!(p.conn.take_output(), AMQP_HEADER.to_vec());
    assert!(p.conn.is_closed());
    assert_eq!(p.conn.close_reason().unwrap().condition, "amqp:not-implemented");
}

#[test]
fn attach_reply_echoes_terminus_asks_first_and_states_max_message_size() {
    let mut p = Peer::new();
    p.open();
    let out = p.attach(C2D, true, "amqps://localhost/messages/devicebound");
    let attach = &out[0];
    assert_eq!(attach.code, code::ATTACH);
    assert_eq!(attach.fields.get(2), &Value::Bool(true), "we are the receiver");
    assert_eq!(
        attach.fields.get(4),
        &Value::Ubyte(0),
        "rcv-settle-mode first even though the peer asked second"
    );
    assert_eq!(frame::terminus_address(attach.fields.get(5)), Some("client"));
    assert_eq!(frame::terminus_address(attach.fields.get(6)), Some("amqps://localhost/messages/devicebound"));
    assert_eq!(attach.fields.u64(10), Some(super::MAX_MESSAGE_BYTES as u64));
    let flow = &out[1];
    assert_eq!(
        (flow.code, flow.fields.u32(4), flow.fields.u32(6)),
        (code::FLOW, Some(C2D), Some(super::LINK_CREDIT))
    );
}

#[test]
fn an_unknown_node_is_refused_with_not_found() {
    let mut p = Peer::new();
    p.open();
    let out = p.attach(9, true, "/messages/events");
    assert_eq!(out[0].code, code::ATTACH);
    assert_eq!(out[0].fields.get(6), &Value::Null, "no target: the link is refused");
    assert_eq!(out[1].code, code::DETACH);
    let (_, err) = frame::described_list(out[1].fields.get(2)).unwrap();
    assert_eq!(err.str(0), Some("amqp:not-found"));
}

#[test]
fn put_token_reply_keeps_the_message_id_type_and_sends_an_int_status() {
    let mut p = Peer::new();
    p.open();
    p.cbs_links();
    let good = p.token(START_MS / 1000 + 3600);
    // uamqp: ulong message-id, read back with amqpvalue_get_ulong.
    let out = p.put_token(&good, Value::Ulong(7));
    assert_eq!(outcome(&out), Ok(()));
    let reply = cbs_reply(&out);
    assert_eq!(reply.properties.correlation_id, Some(Value::Ulong(7)));
    assert_eq!(cbs_status(&out), 200);
    assert!(
        reply.application_properties.iter().any(|(k, v)| k == "status-description" && v.as_str().is_some())
    );
    // rhea: string message-id.
    let out = p.put_token(&good, Value::str("abc"));
    assert_eq!(cbs_reply(&out).properties.correlation_id, Some(Value::str("abc")));
    assert!(p.conn.authorized());
}

#[test]
fn a_forged_token_gets_401_and_later_sends_are_refused() {
    let mut p = Peer::new();
    p.create_device("d1");
    p.open();
    p.cbs_links();
    let good = p.token(START_MS / 1000 + 3600);
    let forged = good.replace("sig=", "sig=AAAA");
    let out = p.put_token(&forged, Value::Ulong(0));
    assert_eq!(cbs_status(&out), 401);
    p.attach(C2D, true, "/messages/devicebound");
    let out = p.transfer(C2D, &c2d("d1", "m1"));
    assert_eq!(outcome(&out), Err("amqp:unauthorized-access".into()));
    assert!(p.hub.receive_c2d("d1", 60_000).unwrap().is_none(), "nothing was queued");
}

#[test]
fn sends_are_queued_with_every_property_then_accepted() {
    let mut p = Peer::sender("dev%1");
    let mut m = c2d("dev%251", "m1");
    m.properties.correlation_id = Some(Value::Ulong(5));
    m.properties.content_type = Some("application/json".into());
    m.properties.absolute_expiry_time = Some((START_MS + 60_000) as i64);
    m.application_properties.push(("k".into(), Value::str("v")));
    assert_eq!(outcome(&p.transfer(C2D, &m)), Ok(()));
    let d = p.hub.receive_c2d("dev%1", 60_000).unwrap().expect("queued");
    assert_eq!(d.message.message_id.as_deref(), Some("m1"));
    assert_eq!(d.message.correlation_id.as_deref(), Some("5"));
    assert_eq!(d.message.content_type.as_deref(), Some("application/json"));
    assert_eq!(d.message.ack, AckMode::Full);
    assert_eq!(d.expires_at, START_MS + 60_000);
    assert_eq!(d.message.properties, vec![("k".to_string(), "v".to_string())]);
    assert_eq!(&d.message.body[..], b"body of m1");
}

#[test]
fn hub_errors_become_iot_hub_conditions_and_the_link_keeps_working() {
    let mut p = Peer::sender("full");
    assert_eq!(outcome(&p.transfer(C2D, &c2d("missing", "x"))), Err("amqp:not-found".into()));
    for i in 0..50 {
        assert_eq!(outcome(&p.transfer(C2D, &c2d("full", &format!("m{i}")))), Ok(()), "message {i}");
    }
    assert_eq!(outcome(&p.transfer(C2D, &c2d("full", "m50"))), Err("amqp:resource-limit-exceeded".into()));
    let mut big = c2d("full", "big");
    big.body = Body::Data(vec![b'x'; 70 * 1024]);
    p.hub.purge_c2d("full").unwrap();
    assert_eq!(
        outcome(&p.transfer_in_frames(C2D, &big, 16 * 1024)),
        Err("amqp:link:message-size-exceeded".into())
    );
    let mut huge = c2d("full", "huge");
    huge.body = Body::Data(vec![b'x'; super::MAX_MESSAGE_BYTES + 1]);
    let out = p.transfer_in_frames(C2D, &huge, 60 * 1024);
    assert_eq!(
        outcome(&out),
        Err("amqp:link:message-size-exceeded".into()),
        "past the link limit, unbuffered"
    );
    let mut bad = c2d("full", "bad");
    bad.properties.to = Some("/devices/full/messages/events".into());
    assert_eq!(outcome(&p.transfer(C2D, &bad)), Err("com.microsoft:argument-error".into()));
    assert_eq!(outcome(&p.transfer(C2D, &c2d("full", "after"))), Ok(()));
    assert!(!p.conn.is_closed());
}

#[test]
fn an_expired_token_stops_sends_until_a_new_one_is_put() {
    let mut p = Peer::new();
    p.create_device("d");
    p.open();
    p.cbs_links();
    let expiry = START_MS / 1000 + 60;
    let out = p.put_token(&p.token(expiry), Value::Ulong(0));
    assert_eq!(cbs_status(&out), 200);
    p.attach(C2D, true, "/messages/devicebound");
    assert_eq!(outcome(&p.transfer(C2D, &c2d("d", "a"))), Ok(()));
    let skew_ms = p.hub.config().sas_skew_secs * 1000;
    p.clock.advance(60_000 + skew_ms + 1000);
    assert_eq!(outcome(&p.transfer(C2D, &c2d("d", "b"))), Err("amqp:unauthorized-access".into()));
    let now_secs = p.hub.now() / 1000;
    let out = p.put_token(&p.token(now_secs + 3600), Value::Ulong(1));
    assert_eq!(cbs_status(&out), 200, "renewal on the same connection");
    assert_eq!(outcome(&p.transfer(C2D, &c2d("d", "c"))), Ok(()));
}

#[test]
fn a_delivery_split_over_several_frames_is_reassembled() {
    let mut p = Peer::sender("d");
    let mut m = c2d("d", "split");
    m.body = Body::Data(vec![7; 3000]);
    let bytes = m.encode();
    let (a, b) = bytes.split_at(1000);
    let first = list(
        code::TRANSFER,
        vec![
            Value::Uint(C2D),
            Value::Uint(40),
            Value::Binary(vec![1]),
            Value::Uint(0),
            Value::Bool(false),
            Value::Bool(true),
        ],
    );
    assert!(p.frame(FRAME_AMQP, 0, first, a).is_empty(), "nothing settles before the last frame");
    let last = list(code::TRANSFER, vec![Value::Uint(C2D)]);
    let out = p.frame(FRAME_AMQP, 0, last, b);
    assert_eq!(disposition(&out).fields.get(1), &Value::Uint(40));
    assert_eq!(outcome(&out), Ok(()));
    assert_eq!(p.hub.receive_c2d("d", 60_000).unwrap().unwrap().message.body.len(), 3000);
}

#[test]
fn feedback_flows_to_a_credited_link_and_is_completed_on_accept() {
    let mut p = Peer::sender("d");
    p.attach(FEEDBACK, false, "/messages/serviceBound/feedback");
    assert!(p.conn.wants_wake());
    assert_eq!(outcome(&p.transfer(C2D, &c2d("d", "fb-1"))), Ok(()));
    let d = p.hub.receive_c2d("d", 60_000).unwrap().unwrap();
    p.hub.settle_c2d("d", d.lock_token, Settlement::Complete).unwrap();
    p.conn.pump();
    let out = parse_all(p.conn.take_output());
    let t = out.iter().find(|f| f.code == code::TRANSFER).expect("a feedback transfer");
    assert_eq!((t.fields.get(0), t.fields.get(4)), (&Value::Uint(FEEDBACK), &Value::Bool(false)));
    let m = Message::decode(&t.payload).unwrap();
    assert_eq!(m.properties.content_type.as_deref(), Some(crate::c2d::FEEDBACK_CONTENT_TYPE));
    let Body::Data(json) = &m.body else { panic!("feedback body must be data") };
    let records: serde_json::Value = serde_json::from_slice(json).unwrap();
    assert_eq!(records[0]["originalMessageId"], "fb-1");
    assert_eq!(records[0]["statusCode"], "Success");
    // rhea's auto-accept: settled accepted disposition from the receiver.
    let id = t.fields.get(1).clone();
    p.send(list(
        code::DISPOSITION,
        vec![Value::Bool(true), id, Value::Null, Value::Bool(true), frame::accepted()],
    ));
    drop(p.conn);
    assert!(p.hub.receive_feedback().is_none(), "the batch was completed, not abandoned");
}

#[test]
fn unsettled_feedback_is_returned_to_the_hub_when_the_connection_drops() {
    let mut p = Peer::sender("d");
    p.attach(FEEDBACK, false, "/messages/serviceBound/feedback");
    p.transfer(C2D, &c2d("d", "fb-2"));
    let d = p.hub.receive_c2d("d", 60_000).unwrap().unwrap();
    p.hub.settle_c2d("d", d.lock_token, Settlement::Complete).unwrap();
    p.conn.pump();
    assert!(parse_all(p.conn.take_output()).iter().any(|f| f.code == code::TRANSFER));
    assert!(p.hub.receive_feedback().is_none(), "locked while the link holds it");
    drop(p.conn);
    assert!(p.hub.receive_feedback().is_some(), "abandoned on drop, so it is redelivered");
}

#[test]
fn close_is_answered_and_garbage_closes_with_a_decode_error() {
    let mut p = Peer::new();
    p.open();
    let out = p.send(list(code::CLOSE, vec![]));
    assert_eq!(out[0].code, code::CLOSE);
    assert!(p.conn.is_closed());

    let mut p = Peer::new();
    p.open();
    let out = p.raw(&[0, 0, 0, 10, 2, 0, 0, 0, 0xff, 0xff]);
    assert_eq!(out[0].code, code::CLOSE);
    assert_eq!(p.conn.close_reason().unwrap().condition, "amqp:decode-error");
    assert_eq!(out[0].channel, 0);
}

#[test]
fn feedback_waits_for_credit_and_a_released_batch_is_redelivered() {
    let mut p = Peer::sender("d");
    p.attach(FEEDBACK, false, "/messages/serviceBound/feedback");
    // The client lowers its credit to one batch.
    let flow = |credit: u32, count: u32| link_flow(FEEDBACK, count, credit);
    p.send(flow(1, 0));
    p.transfer(C2D, &c2d("d", "r-1"));
    p.transfer(C2D, &c2d("d", "r-2"));
    for _ in 0..2 {
        let d = p.hub.receive_c2d("d", 60_000).unwrap().unwrap();
        p.hub.settle_c2d("d", d.lock_token, Settlement::Complete).unwrap();
        p.clock.advance(p.hub.config().feedback_batch_interval_ms);
    }
    p.conn.pump();
    let sent: Vec<Out> =
        parse_all(p.conn.take_output()).into_iter().filter(|f| f.code == code::TRANSFER).collect();
    assert_eq!(sent.len(), 1, "one credit, one batch");
    assert!(!p.conn.wants_wake(), "no credit left: the driver must not wake for feedback");
    // Released: the batch goes back to the hub; with new credit both batches come (again).
    let id = sent[0].fields.get(1).clone();
    let released = list(code::RELEASED, vec![]);
    p.send(list(code::DISPOSITION, vec![Value::Bool(true), id, Value::Null, Value::Bool(true), released]));
    let out = p.send(flow(5, 1));
    assert_eq!(out.iter().filter(|f| f.code == code::TRANSFER).count(), 2);
}

#[test]
fn throttled_sends_are_held_then_rejected_as_device_container_throttled() {
    let tier = crate::throttle::Tier::new(crate::throttle::Sku::S1, 1).unwrap();
    let mut p = Peer::sender_on(HubConfig { throttle: Some(tier), ..HubConfig::default() }, "d");
    // S1 × 1: 100 sends a minute; 1 s of burst and 5 s of backlog take 11 at one instant.
    for i in 0..11 {
        assert_eq!(outcome(&p.transfer(C2D, &c2d("d", &format!("m{i}")))), Ok(()), "send {i}");
    }
    // The shaped ones hold the connection until the last one's turn (the driver waits for it).
    assert_eq!(p.conn.take_hold(), Some(START_MS + 5000));
    assert_eq!(
        outcome(&p.transfer(C2D, &c2d("d", "m11"))),
        Err("com.microsoft:device-container-throttled".into())
    );
    let mut queued = 0;
    while p.hub.receive_c2d("d", 60_000).unwrap().is_some() {
        queued += 1;
    }
    assert_eq!(queued, 11, "the refused send was not queued");
    // A minute later (wall clock or time travel) the bucket is empty again.
    p.clock.advance(60_000);
    assert_eq!(outcome(&p.transfer(C2D, &c2d("d", "m12"))), Ok(()));
    assert_eq!(p.conn.take_hold(), None);
}
