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

#[test]
fn a_read_of_many_transfers_gets_one_disposition_each_in_one_output() {
    let mut p = Peer::sender("d1");
    // 40 transfers in one read, the last one cut in two (its rest arrives with the next read).
    let mut bytes = Vec::new();
    for i in 0..40u32 {
        let fields = vec![
            Value::Uint(C2D),
            Value::Uint(100 + i),
            Value::Binary(i.to_be_bytes().to_vec()),
            Value::Uint(0),
            Value::Bool(false),
            Value::Bool(false),
        ];
        frame::write_frame(
            &mut bytes,
            FRAME_AMQP,
            0,
            &list(code::TRANSFER, fields),
            &c2d("d1", "m").encode(),
        );
    }
    let cut = bytes.len() - 10;
    p.conn.receive(&bytes[..cut]);
    let mut out = vec![0u8; 1000];
    let reused = out.capacity();
    p.conn.swap_output(&mut out);
    let first = parse_all(out.clone());
    assert_eq!(first.len(), 39, "one disposition per complete transfer, all in one output");
    for (i, d) in first.iter().enumerate() {
        assert_eq!((d.code, d.fields.u32(1)), (code::DISPOSITION, Some(100 + i as u32)));
        assert_eq!(outcome(std::slice::from_ref(d)), Ok(()));
    }
    p.conn.receive(&bytes[cut..]);
    let mut next = Vec::new();
    p.conn.swap_output(&mut next);
    assert_eq!(next.capacity(), reused, "the connection wrote into the buffer it was given");
    let second = parse_all(next);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].fields.u32(1), Some(139));
    p.conn.swap_output(&mut out);
    assert!(out.is_empty(), "nothing more to write");
    assert_eq!(p.hub.get_device("d1").unwrap()["cloudToDeviceMessageCount"], 40);
}

// ---- The Event Hub-compatible nodes ($management, partition receivers, owner levels, redirect) ----

const MGMT_SENDER: u32 = 10;
const MGMT_RECEIVER: u32 = 11;
const PARTITION: u32 = 12;
/// The Event Hub-compatible name of a hub at `localhost`.
const EH: &str = "localhost";

impl Peer {
    /// A second connection on this peer's hub (owner levels span connections).
    fn sibling(&self) -> Self {
        Self {
            conn: Connection::new(self.hub.clone()),
            hub: self.hub.clone(),
            clock: self.clock.clone(),
            next_delivery: 0,
        }
    }

    /// A put-token for `audience` signed as the Event Hubs SDKs sign (the key's text), on CBS
    /// links it attaches; returns the reply's status.
    fn put_event_hub_token(&mut self, audience: &str) -> i32 {
        let key = self.hub.policies().iter().find(|p| p.name == "iothubowner").unwrap().primary_key.clone();
        let se = START_MS / 1000 + 3600;
        let sr = crate::sas::url_encode(audience);
        let sig = crate::sas::sign(key.as_bytes(), &sr, se);
        let token = format!(
            "SharedAccessSignature sr={sr}&sig={}&se={se}&skn=iothubowner",
            crate::sas::url_encode(&sig)
        );
        let m = Message {
            properties: Properties { message_id: Some(Value::Ulong(7)), ..Default::default() },
            application_properties: vec![
                ("operation".into(), Value::str("put-token")),
                ("type".into(), Value::str("servicebus.windows.net:sastoken")),
                ("name".into(), Value::str(audience)),
            ],
            body: Body::Value(Value::str(&token)),
            ..Default::default()
        };
        cbs_status(&self.transfer(CBS_SENDER, &m))
    }

    /// Attaches a receiver (the peer receives) with a full source terminus and link properties,
    /// then grants `credit`.
    fn attach_receiver(&mut self, handle: u32, source: Value, properties: Value, credit: u32) -> Vec<Out> {
        let mut fields = vec![
            Value::str(&format!("link-{handle}")),
            Value::Uint(handle),
            Value::Bool(true),
            Value::Ubyte(0),
            Value::Ubyte(0),
            source,
            list(code::TARGET, vec![Value::str("client")]),
        ];
        fields.resize(13, Value::Null);
        fields.push(properties);
        let mut out = self.send(list(code::ATTACH, fields));
        if credit > 0 {
            out.extend(self.send(link_flow(handle, 0, credit)));
        }
        out
    }

    /// A `$management` READ of `kind` (and `partition`), answered on the management reply link.
    fn management_read(&mut self, kind: &str, partition: Option<&str>) -> Message {
        let mut app = vec![
            ("operation".into(), Value::str("READ")),
            ("type".into(), Value::str(kind)),
            ("name".into(), Value::str(EH)),
        ];
        if let Some(p) = partition {
            app.push(("partition".into(), Value::str(p)));
        }
        let m = Message {
            properties: Properties {
                message_id: Some(Value::Uuid([7; 16])),
                reply_to: Some("mgmt-client".into()),
                ..Default::default()
            },
            application_properties: app,
            ..Default::default()
        };
        let out = self.transfer(MGMT_SENDER, &m);
        let t = out.iter().find(|f| f.code == code::TRANSFER).expect("a management reply");
        assert_eq!(t.fields.get(0), &Value::Uint(MGMT_RECEIVER));
        let reply = Message::decode(&t.payload).unwrap();
        assert_eq!(reply.properties.correlation_id, Some(Value::Uuid([7; 16])), "correlated by message-id");
        reply
    }

    fn record(&self, device: &str, i: usize) {
        self.hub.record_telemetry(crate::hub::D2cMessage {
            device_id: device.into(),
            system_properties: vec![
                ("message-id".into(), format!("m{i}")),
                ("content-type".into(), "application/json".into()),
            ],
            properties: vec![("firmwareChannel".into(), "beta".into())],
            body: bytes::Bytes::from(format!("{{\"i\":{i}}}")),
            ..Default::default()
        });
    }
}

fn status_of(m: &Message) -> i32 {
    match m.application_properties.iter().find(|(k, _)| k == "status-code") {
        Some((_, Value::Int(s))) => *s,
        other => panic!("status-code must be an AMQP int, got {other:?}"),
    }
}

fn map_get<'a>(body: &'a Body, key: &str) -> &'a Value {
    let Body::Value(Value::Map(pairs)) = body else {
        panic!("the body must be an AMQP-value map, got {body:?}")
    };
    pairs.iter().find(|(k, _)| k == &Value::str(key)).map(|(_, v)| v).unwrap_or_else(|| panic!("no {key}"))
}

fn partition_source(group: &str, partition: &str, filter: Option<&str>) -> Value {
    let mut fields =
        vec![Value::str(&format!("amqps://localhost/{EH}/ConsumerGroups/{group}/Partitions/{partition}"))];
    if let Some(f) = filter {
        fields.resize(7, Value::Null);
        // JS's numeric descriptor; the node must find the filter by its key.
        let described = Value::described(0x0000_468C_0000_0004, Value::str(f));
        fields.push(Value::Map(vec![(Value::sym("apache.org:selector-filter:string"), described)]));
    }
    list(code::SOURCE, fields)
}

fn detach_error(out: &[Out]) -> (String, Fields) {
    let d = out.iter().find(|f| f.code == code::DETACH).expect("a detach");
    let (_, err) = frame::described_list(d.fields.get(2)).expect("an error");
    (err.str(0).unwrap().to_owned(), err)
}

/// The partition `device`'s telemetry goes to, as the hub computes it.
fn partition_of(hub: &Hub, device: &str) -> String {
    crate::hub::events::partition_for(device, hub.partition_count()).to_string()
}

#[test]
fn an_event_hubs_token_signed_with_the_key_text_gets_202_and_covers_only_the_entity() {
    let mut p = Peer::new();
    p.open();
    p.cbs_links();
    assert_eq!(p.put_event_hub_token(&format!("sb://localhost/{EH}")), 202);
    assert!(!p.conn.authorized(), "an entity token does not authorize IoT Hub service operations");
    let out = p.attach_receiver(PARTITION, partition_source("$Default", "0", None), Value::Null, 10);
    assert!(!out.iter().any(|f| f.code == code::DETACH), "the entity token covers its partitions");
    let out = p.attach(MGMT_SENDER, true, "/messages/devicebound");
    assert!(!out.iter().any(|f| f.code == code::DETACH));
    let out = p.transfer(MGMT_SENDER, &c2d("d", "x"));
    assert_eq!(outcome(&out), Err("amqp:unauthorized-access".into()));
}

#[test]
fn management_reads_answer_string_keyed_maps_with_the_types_the_sdks_cast_to() {
    let mut p = Peer::new();
    p.record("dev-a", 0);
    p.record("dev-a", 1);
    p.open();
    p.cbs_links();
    p.attach(MGMT_SENDER, true, "$management");
    let out = p.send(list(
        code::ATTACH,
        vec![
            Value::str("mgmt-client"),
            Value::Uint(MGMT_RECEIVER),
            Value::Bool(true),
            Value::Ubyte(0),
            Value::Ubyte(0),
            list(code::SOURCE, vec![Value::str("$management")]),
            list(code::TARGET, vec![Value::str("mgmt-client")]),
        ],
    ));
    assert_eq!(out[0].code, code::ATTACH);
    p.send(link_flow(MGMT_RECEIVER, 0, 10));
    let refused = p.management_read("com.microsoft:eventhub", None);
    assert_eq!(status_of(&refused), 401, "no token yet");
    assert_eq!(p.put_event_hub_token(&format!("sb://localhost/{EH}/$management")), 202);

    let hub_info = p.management_read("com.microsoft:eventhub", None);
    assert_eq!(status_of(&hub_info), 200);
    assert_eq!(map_get(&hub_info.body, "name"), &Value::str(EH));
    assert!(matches!(map_get(&hub_info.body, "created_at"), Value::Timestamp(t) if *t == START_MS as i64));
    assert_eq!(map_get(&hub_info.body, "partition_count"), &Value::Int(4));
    let ids = ["0", "1", "2", "3"].map(Value::str).to_vec();
    assert_eq!(map_get(&hub_info.body, "partition_ids"), &Value::Array(ids));
    assert_eq!(Value::Array(vec![Value::str("0")]).to_bytes()[0], 0xf0, "an AMQP array, not a list");

    let part = partition_of(&p.hub, "dev-a");
    let info = p.management_read("com.microsoft:partition", Some(&part));
    assert_eq!(status_of(&info), 200);
    assert_eq!(map_get(&info.body, "partition"), &Value::str(&part));
    assert_eq!(map_get(&info.body, "begin_sequence_number"), &Value::Long(0));
    assert_eq!(map_get(&info.body, "last_enqueued_sequence_number"), &Value::Long(1));
    assert!(
        matches!(map_get(&info.body, "last_enqueued_offset"), Value::String(s) if s.parse::<u64>().is_ok())
    );
    assert!(matches!(map_get(&info.body, "last_enqueued_time_utc"), Value::Timestamp(_)));
    assert_eq!(map_get(&info.body, "is_partition_empty"), &Value::Bool(false));

    let bad = p.management_read("com.microsoft:partition", Some("9"));
    assert_eq!(status_of(&bad), 400);
    assert_eq!(bad.app_str("error-condition"), Some("com.microsoft:argument-out-of-range"));
}

#[test]
fn a_partition_receiver_starts_at_its_filter_and_sends_only_while_it_has_credit() {
    let mut p = Peer::new();
    for i in 0..4 {
        p.record("dev-b", i);
    }
    let part = partition_of(&p.hub, "dev-b");
    p.open();
    p.cbs_links();
    assert_eq!(p.put_event_hub_token(&format!("sb://localhost/{EH}")), 202);
    let source = partition_source("$default", &part, Some("amqp.annotation.x-opt-sequence-number > '1'"));
    let out = p.attach_receiver(PARTITION, source, Value::Null, 0);
    assert_eq!(out.len(), 1, "attached, and nothing sent without credit: {out:?}");
    assert!(frame::terminus_address(out[0].fields.get(5)).is_some(), "the source is echoed");
    let out = p.send(link_flow(PARTITION, 0, 1));
    let transfers: Vec<&Out> = out.iter().filter(|f| f.code == code::TRANSFER).collect();
    assert_eq!(transfers.len(), 1, "one credit, one event");
    let m = Message::decode(&transfers[0].payload).unwrap();
    let ann =
        |k: &str| m.message_annotations.iter().find(|(key, _)| key == &Value::sym(k)).map(|(_, v)| v.clone());
    assert_eq!(ann("x-opt-sequence-number"), Some(Value::Long(2)), "'> 1' is exclusive");
    assert!(matches!(ann("x-opt-offset"), Some(Value::String(_))));
    assert!(matches!(ann("x-opt-enqueued-time"), Some(Value::Timestamp(_))));
    assert_eq!(ann("iothub-connection-device-id"), Some(Value::str("dev-b")));
    assert_eq!(ann("iothub-message-source"), Some(Value::str("Telemetry")));
    assert!(
        matches!(ann("iothub-connection-auth-method"), Some(Value::String(s)) if s.contains("\"scope\":\"device\""))
    );
    assert!(matches!(ann("iothub-enqueuedtime"), Some(Value::Timestamp(_))));
    assert!(ann("iothub-connection-auth-generation-id").is_some());
    assert_eq!(m.properties.message_id, Some(Value::str("m2")));
    assert_eq!(m.properties.content_type.as_deref(), Some("application/json"));
    assert_eq!(m.application_properties, vec![("firmwareChannel".into(), Value::str("beta"))]);
    assert_eq!(m.body, Body::Data(b"{\"i\":2}".to_vec()));

    let out = p.send(link_flow(PARTITION, 1, 10));
    assert_eq!(out.iter().filter(|f| f.code == code::TRANSFER).count(), 1, "only event 3 is left");
    p.record("dev-b", 4);
    p.conn.pump();
    let out = parse_all(p.conn.take_output());
    assert_eq!(
        out.iter().filter(|f| f.code == code::TRANSFER).count(),
        1,
        "a new event goes out on the credit left"
    );
    assert!(p.conn.wakes().events, "the driver waits on the event log");
}

#[test]
fn partition_attaches_are_refused_as_event_hubs_refuses_them() {
    let mut p = Peer::new();
    p.open();
    p.cbs_links();
    let out = p.attach_receiver(PARTITION, partition_source("$Default", "0", None), Value::Null, 0);
    assert_eq!(detach_error(&out).0, "amqp:unauthorized-access", "no token");
    assert_eq!(p.put_event_hub_token(&format!("sb://localhost/{EH}")), 202);
    let out = p.attach_receiver(PARTITION + 1, partition_source("nosuchgroup", "0", None), Value::Null, 0);
    assert_eq!(detach_error(&out).0, "amqp:not-found");
    let out = p.attach_receiver(PARTITION + 2, partition_source("$Default", "9", None), Value::Null, 0);
    assert_eq!(detach_error(&out).0, "com.microsoft:argument-out-of-range");
    let bad_filter = partition_source("$Default", "0", Some("amqp.annotation.x-opt-offset < '3'"));
    let out = p.attach_receiver(PARTITION + 3, bad_filter, Value::Null, 0);
    assert_eq!(detach_error(&out).0, "com.microsoft:argument-error");
}

#[test]
fn an_owner_level_receiver_evicts_the_others_on_any_connection_and_refuses_lower_ones() {
    let epoch = |e: i64| Value::Map(vec![(Value::sym("com.microsoft:epoch"), Value::Long(e))]);
    let mut a = Peer::new();
    a.open();
    a.cbs_links();
    assert_eq!(a.put_event_hub_token(&format!("sb://localhost/{EH}")), 202);
    let out = a.attach_receiver(PARTITION, partition_source("$Default", "1", None), epoch(1), 0);
    assert!(!out.iter().any(|f| f.code == code::DETACH));
    assert!(a.conn.wakes().events, "a receiver without credit still waits: it can be evicted");

    let mut b = a.sibling();
    b.open();
    b.cbs_links();
    assert_eq!(b.put_event_hub_token(&format!("sb://localhost/{EH}")), 202);
    let out = b.attach_receiver(PARTITION, partition_source("$Default", "1", None), Value::Null, 0);
    assert_eq!(detach_error(&out).0, "amqp:link:stolen", "no epoch while an epoch receiver is attached");
    let out = b.attach_receiver(PARTITION + 1, partition_source("$Default", "1", None), epoch(0), 0);
    assert_eq!(detach_error(&out).0, "amqp:link:stolen", "a lower epoch");
    let out = b.attach_receiver(PARTITION + 2, partition_source("$Default", "1", None), epoch(2), 5);
    assert!(!out.iter().any(|f| f.code == code::DETACH), "a higher epoch attaches");

    a.conn.pump();
    let out = parse_all(a.conn.take_output());
    let (condition, err) = detach_error(&out);
    assert_eq!(condition, "amqp:link:stolen");
    assert!(err.str(1).unwrap().contains("higher epoch of '2'"), "{err:?}");
    let out = a.send(list(code::DETACH, vec![Value::Uint(PARTITION), Value::Bool(true)]));
    assert!(out.is_empty(), "the peer's answer to our detach needs none: {out:?}");
    let out = a.attach_receiver(PARTITION, partition_source("$Default", "1", None), epoch(2), 0);
    assert!(!out.iter().any(|f| f.code == code::DETACH), "an equal epoch takes over again");
}

#[test]
fn messages_events_on_the_iot_hub_redirects_once_the_client_grants_credit() {
    let mut p = Peer::new();
    p.open();
    p.cbs_links();
    p.authorize();
    let source = list(
        code::SOURCE,
        vec![Value::str("amqps://localhost/messages/events/ConsumerGroups/$Default/Partitions/0")],
    );
    let out = p.attach_receiver(PARTITION, source, Value::Null, 0);
    assert_eq!((out.len(), out[0].code), (1, code::ATTACH), "attached first: {out:?}");
    let out = p.send(link_flow(PARTITION, 0, 10));
    let (condition, err) = detach_error(&out);
    assert_eq!(condition, "amqp:link:redirect");
    let Value::Map(info) = err.get(2) else { panic!("an info map: {err:?}") };
    let get = |k: &str| info.iter().find(|(key, _)| key == &Value::sym(k)).map(|(_, v)| v.clone());
    assert_eq!(get("hostname"), Some(Value::str("localhost")));
    assert_eq!(get("network-host"), Some(Value::str("localhost")));
    assert_eq!(get("port"), Some(Value::Int(5671)));
    assert_eq!(
        get("address"),
        Some(Value::str(&format!("amqps://localhost:5671/{EH}/ConsumerGroups/$Default/Partitions/0")))
    );
}

#[test]
fn the_runtime_metric_is_offered_when_desired_and_annotates_each_delivery() {
    let mut p = Peer::new();
    p.record("dev-c", 0);
    p.record("dev-c", 1);
    let part = partition_of(&p.hub, "dev-c");
    p.open();
    p.cbs_links();
    assert_eq!(p.put_event_hub_token(&format!("sb://localhost/{EH}")), 202);
    let mut fields = vec![
        Value::str("metric"),
        Value::Uint(PARTITION),
        Value::Bool(true),
        Value::Ubyte(0),
        Value::Ubyte(0),
        partition_source("$Default", &part, None),
        list(code::TARGET, vec![Value::str("client")]),
    ];
    fields.resize(12, Value::Null);
    fields.push(Value::Array(vec![Value::sym("com.microsoft:enable-receiver-runtime-metric")]));
    let out = p.send(list(code::ATTACH, fields));
    assert_eq!(
        out[0].fields.get(11),
        &Value::Array(vec![Value::sym("com.microsoft:enable-receiver-runtime-metric")])
    );
    let out = p.send(link_flow(PARTITION, 0, 1));
    let t = out.iter().find(|f| f.code == code::TRANSFER).expect("an event");
    let mut rest = &t.payload[..];
    let section = Value::decode(&mut rest).unwrap();
    let Some((code::DELIVERY_ANNOTATIONS, Value::Map(pairs))) = section.as_described() else {
        panic!("delivery annotations first, got {section:?}")
    };
    let get = |k: &str| pairs.iter().find(|(key, _)| key == &Value::sym(k)).map(|(_, v)| v.clone());
    assert_eq!(get("last_enqueued_sequence_number"), Some(Value::Long(1)));
    assert!(matches!(get("last_enqueued_offset"), Some(Value::String(_))));
    assert!(matches!(get("last_enqueued_time_utc"), Some(Value::Timestamp(_))));
    assert!(matches!(get("runtime_info_retrieval_time_utc"), Some(Value::Timestamp(_))));
    assert_eq!(Message::decode(&t.payload).unwrap().body, Body::Data(b"{\"i\":0}".to_vec()));

    // Without the capability: nothing offered, no delivery annotations.
    let out = p.attach_receiver(PARTITION + 1, partition_source("$Default", &part, None), Value::Null, 1);
    assert_eq!(out[0].fields.get(11), &Value::Null);
    let t = out.iter().find(|f| f.code == code::TRANSFER).expect("an event");
    let mut rest = &t.payload[..];
    let first = Value::decode(&mut rest).unwrap();
    assert_eq!(first.as_described().map(|(c, _)| c), Some(code::MESSAGE_ANNOTATIONS));
}
