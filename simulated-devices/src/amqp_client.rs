//! A small AMQP 1.0 *service* client for IoT Hub: what the release command needs to send C2D
//! messages and read delivery feedback the way a pipeline's service SDK does (reference §3.4).
//!
//! It reuses the emulator's codec (`iothub_emulator::amqp::{types, frame, message}`). Two layers:
//! [`ServiceConn`], a sans-IO state machine (bytes in, events and bytes out) that owns one
//! connection's session and its four links — `$cbs` sender and receiver (put-token), a sender on
//! `/messages/devicebound` and a receiver on `/messages/serviceBound/feedback` — and
//! [`AmqpService`], a thin tokio driver owning the TLS socket and the `ServiceConn`, reached
//! through a bounded command channel. Many C2D sends may be in flight at once (one unsettled
//! delivery each); the hub's link credit paces them. Feedback credit is granted only while the
//! driver's buffer of unaccepted batches has room, and a batch is accepted only once handed to
//! the caller, so nothing accepted is lost. A connection made with
//! [`AmqpService::connect_renewing`] puts a fresh token on `$cbs` on a timer, as the service SDKs
//! do, so it outlives its first token (the hub refuses sends once a connection's token expired).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use iothub_emulator::amqp::frame::{self, AMQP_HEADER, FRAME_AMQP, FrameError, code, list};
use iothub_emulator::amqp::message::{Body, Message, Properties};
use iothub_emulator::amqp::types::{DecodeError, Value};
use iothub_emulator::sas::url_encode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::service_client::{C2dSend, FeedbackRecord};

/// Link handles this client uses (one session, channel 0).
const CBS_OUT: u32 = 0;
const CBS_IN: u32 = 1;
const C2D: u32 = 2;
const FEEDBACK: u32 = 3;
/// The max-frame-size we announce.
const MAX_FRAME: u32 = 64 * 1024;
/// Our session incoming window; re-announced when half is used.
const WINDOW: u32 = 2048;
/// Credit on the `$cbs` reply link.
const CBS_CREDIT: u32 = 4;
/// Feedback batches received but not yet handed to the caller, credit included.
const FEEDBACK_BUFFER: u32 = 8;
/// Commands queued to the driver.
const COMMAND_QUEUE: usize = 256;
/// Handshake and put-token must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A send's outcome must arrive within this (like the REST client's request timeout).
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// How often [`AmqpService::connect_renewing`] callers in this crate put a new token: half the
/// service client's one-hour token lifetime.
pub const TOKEN_RENEWAL: Duration = Duration::from_secs(30 * 60);
/// A timer period that never fires in practice.
const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// Mints a fresh service SAS token for the hub (for renewal); an error is logged and the
/// renewal retried at the next tick.
pub type TokenSource = std::sync::Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// The token renewal a driver does: `audience`, where tokens come from, and how often.
struct Renewal {
    audience: String,
    source: TokenSource,
    every: Duration,
}

/// Errors from the AMQP service client, in IoT Hub's AMQP terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmqpError {
    /// The socket or TLS failed.
    #[error("AMQP transport: {0}")]
    Io(String),
    /// The peer sent bytes this client cannot read.
    #[error("AMQP protocol: {0}")]
    Protocol(String),
    /// The hub closed the connection, the session or a link with an error.
    #[error("the hub closed the AMQP {what}: {condition}: {description}")]
    Closed {
        /// `connection`, `session` or `link`.
        what: &'static str,
        /// The AMQP error condition (e.g. `amqp:unauthorized-access`).
        condition: String,
        /// The error's description.
        description: String,
    },
    /// The CBS put-token was refused.
    #[error("CBS put-token refused with status {status}: {description}")]
    Cbs {
        /// The reply's status-code (IoT Hub uses HTTP statuses: 401, 403, …).
        status: i64,
        /// The reply's status-description.
        description: String,
    },
    /// The hub rejected a delivery, with IoT Hub's condition (e.g. `amqp:not-found` for a
    /// device that does not exist, `amqp:resource-limit-exceeded` for a full queue).
    #[error("rejected: {condition}: {description}")]
    Rejected {
        /// The AMQP error condition.
        condition: String,
        /// The description (`ErrorCode:…;message`).
        description: String,
    },
    /// The client was closed (or its driver ended) before the operation finished.
    #[error("the AMQP client is closed")]
    Gone,
}

impl From<FrameError> for AmqpError {
    fn from(e: FrameError) -> Self {
        Self::Protocol(e.to_string())
    }
}

impl From<DecodeError> for AmqpError {
    fn from(e: DecodeError) -> Self {
        Self::Protocol(e.to_string())
    }
}

/// What happened on the connection, for the driver.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The reply to the put-token.
    CbsReply {
        /// status-code.
        status: i64,
        /// status-description.
        description: String,
    },
    /// A C2D delivery was settled by the hub.
    Settled {
        /// The id [`ServiceConn::send_c2d`] returned.
        tag: u64,
        /// `Ok` when accepted; the rejection otherwise.
        result: Result<(), AmqpError>,
    },
    /// A feedback batch arrived; accept it with [`ServiceConn::accept`] once consumed.
    Feedback {
        /// Its delivery id.
        delivery_id: u32,
        /// The records, or why the body could not be read.
        records: Result<Vec<FeedbackRecord>, String>,
    },
}

/// A delivery being received (possibly over several frames).
#[derive(Debug)]
struct Incoming {
    handle: u32,
    delivery_id: u32,
    settled: bool,
    bytes: Vec<u8>,
}

/// Sans-IO state of one service connection: one session on channel 0 with four links.
#[derive(Debug)]
pub struct ServiceConn {
    output: Vec<u8>,
    input: Vec<u8>,
    header_seen: bool,
    peer_max_frame: u32,
    /// The hub's idle-time-out (ms): we must send a frame at least this often.
    peer_idle_timeout_ms: Option<u32>,
    /// Session: next transfer id we send, next we expect, and our remaining incoming window.
    next_outgoing_id: u32,
    next_incoming_id: u32,
    incoming_window: u32,
    next_delivery_id: u32,
    /// Sender links: (deliveries sent, credit left) for `$cbs` and devicebound.
    cbs_out: (u32, u32),
    c2d_out: (u32, u32),
    /// Receiver links: (deliveries received, credit outstanding).
    cbs_in: (u32, u32),
    feedback_in: (u32, u32),
    /// Encoded messages waiting for link credit: (handle, tag, payload).
    queued: VecDeque<(u32, u64, Vec<u8>)>,
    /// Sent, unsettled C2D deliveries: delivery id → tag.
    in_flight: HashMap<u32, u64>,
    next_tag: u64,
    /// Deliveries being received, by link handle (deliveries on different links may interleave).
    incoming: HashMap<u32, Incoming>,
}

fn terminus(code: u64, address: &str) -> Value {
    list(code, vec![Value::str(address)])
}

fn error_of(v: &Value) -> (String, String) {
    match frame::described_list(v) {
        Ok((_, f)) => (f.str(0).unwrap_or("").to_owned(), f.str(1).unwrap_or("").to_owned()),
        Err(_) => (String::new(), String::new()),
    }
}

impl ServiceConn {
    /// A connection whose opening (header, open, begin, the four attaches, `$cbs` credit) is
    /// already in [`Self::take_output`]; `hostname` is the hub's host name.
    pub fn new(hostname: &str) -> Self {
        let mut c = Self {
            output: AMQP_HEADER.to_vec(),
            input: Vec::new(),
            header_seen: false,
            peer_max_frame: frame::MIN_MAX_FRAME_SIZE,
            peer_idle_timeout_ms: None,
            next_outgoing_id: 0,
            next_incoming_id: 0,
            incoming_window: WINDOW,
            next_delivery_id: 0,
            cbs_out: (0, 0),
            c2d_out: (0, 0),
            cbs_in: (0, 0),
            feedback_in: (0, 0),
            queued: VecDeque::new(),
            in_flight: HashMap::new(),
            next_tag: 0,
            incoming: HashMap::new(),
        };
        let container = format!("fleet-release-{}", uuid::Uuid::new_v4().simple());
        let open =
            vec![Value::str(&container), Value::str(hostname), Value::Uint(MAX_FRAME), Value::Ushort(0)];
        c.write(&list(code::OPEN, open), &[]);
        let begin = vec![Value::Null, Value::Uint(0), Value::Uint(WINDOW), Value::Uint(WINDOW)];
        c.write(&list(code::BEGIN, begin), &[]);
        for (handle, receiver, source, target) in [
            (CBS_OUT, false, "cbs", "$cbs"),
            (CBS_IN, true, "$cbs", "cbs"),
            (C2D, false, "c2d", "/messages/devicebound"),
            (FEEDBACK, true, "/messages/serviceBound/feedback", "feedback"),
        ] {
            let attach = vec![
                Value::str(&format!("{container}-{handle}")),
                Value::Uint(handle),
                Value::Bool(receiver),
                Value::Ubyte(0), // snd-settle-mode unsettled: we want each outcome
                Value::Ubyte(0), // rcv-settle-mode first
                terminus(code::SOURCE, source),
                terminus(code::TARGET, target),
                Value::Null,
                Value::Null,
                if receiver { Value::Null } else { Value::Uint(0) },
            ];
            c.write(&list(code::ATTACH, attach), &[]);
        }
        c.grant(CBS_IN, CBS_CREDIT);
        c
    }

    /// Bytes to write to the socket.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    fn write(&mut self, body: &Value, payload: &[u8]) {
        frame::write_frame(&mut self.output, FRAME_AMQP, 0, body, payload);
    }

    fn flow(&mut self, link: Option<(u32, u32, u32)>) {
        let state = [self.next_incoming_id, self.incoming_window, self.next_outgoing_id, WINDOW];
        self.write(&frame::flow(state, link), &[]);
    }

    /// Gives a receiver link `credit` (replacing what it had).
    fn grant(&mut self, handle: u32, credit: u32) {
        let state = if handle == CBS_IN { &mut self.cbs_in } else { &mut self.feedback_in };
        state.1 = credit;
        let count = state.0;
        self.flow(Some((handle, count, credit)));
    }

    /// Tops the feedback link's credit up so that credit plus `buffered` batches is the buffer.
    pub fn want_feedback(&mut self, buffered: usize) {
        let want = FEEDBACK_BUFFER.saturating_sub(buffered as u32);
        if want > self.feedback_in.1 {
            self.grant(FEEDBACK, want);
        }
    }

    /// Queues a CBS put-token for `audience` with a SAS `token`.
    pub fn put_token(&mut self, audience: &str, token: &str) {
        let m = Message {
            properties: Properties {
                message_id: Some(Value::Ulong(self.next_tag)),
                reply_to: Some("cbs".into()),
                to: Some("$cbs".into()),
                ..Properties::default()
            },
            application_properties: vec![
                ("operation".into(), Value::str("put-token")),
                ("type".into(), Value::str("servicebus.windows.net:sastoken")),
                ("name".into(), Value::str(audience)),
            ],
            message_annotations: vec![],
            body: Body::Value(Value::str(token)),
        };
        self.enqueue(CBS_OUT, m.encode());
    }

    /// Queues a C2D message for `device_id`; returns the tag its [`Event::Settled`] carries. An
    /// empty `message_id` sends none (the hub then assigns none, as for a REST send without one).
    pub fn send_c2d(&mut self, device_id: &str, msg: &C2dSend) -> u64 {
        let application_properties = match msg.ack {
            "" => vec![],
            ack => vec![("iothub-ack".to_owned(), Value::str(ack))],
        };
        let m = Message {
            properties: Properties {
                message_id: (!msg.message_id.is_empty()).then(|| Value::str(&msg.message_id)),
                to: Some(format!("/devices/{}/messages/devicebound", url_encode(device_id))),
                content_type: msg.content_type.clone(),
                absolute_expiry_time: msg.expiry_ms.and_then(|t| i64::try_from(t).ok()),
                ..Properties::default()
            },
            application_properties,
            message_annotations: vec![],
            body: Body::Data(msg.body.clone()),
        };
        self.enqueue(C2D, m.encode())
    }

    fn enqueue(&mut self, handle: u32, payload: Vec<u8>) -> u64 {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.queued.push_back((handle, tag, payload));
        self.pump();
        tag
    }

    /// Sends queued messages while their links have credit (in order per link).
    fn pump(&mut self) {
        let mut blocked = VecDeque::new();
        while let Some((handle, tag, payload)) = self.queued.pop_front() {
            let link = if handle == CBS_OUT { &mut self.cbs_out } else { &mut self.c2d_out };
            if link.1 == 0 || blocked.iter().any(|(h, _, _)| *h == handle) {
                blocked.push_back((handle, tag, payload));
                continue;
            }
            link.0 = link.0.wrapping_add(1);
            link.1 -= 1;
            let delivery_id = self.next_delivery_id;
            self.next_delivery_id = delivery_id.wrapping_add(1);
            if handle == C2D {
                self.in_flight.insert(delivery_id, tag);
            }
            self.transfer(handle, delivery_id, &payload);
        }
        self.queued = blocked;
    }

    /// One delivery, split into frames that fit the peer's max-frame-size.
    fn transfer(&mut self, handle: u32, delivery_id: u32, payload: &[u8]) {
        let perf = |more: bool| {
            let tag = Value::Binary(delivery_id.to_be_bytes().to_vec());
            let fields = vec![
                Value::Uint(handle),
                Value::Uint(delivery_id),
                tag,
                Value::Uint(0),
                Value::Bool(false),
                Value::Bool(more),
            ];
            list(code::TRANSFER, fields)
        };
        let room = (self.peer_max_frame as usize).saturating_sub(8 + perf(true).to_bytes().len() + 8).max(1);
        let chunks: Vec<&[u8]> = payload.chunks(room).collect();
        let last = chunks.len().saturating_sub(1);
        for (i, chunk) in chunks.into_iter().enumerate() {
            self.write(&perf(i < last), chunk);
            self.next_outgoing_id = self.next_outgoing_id.wrapping_add(1);
        }
    }

    /// How often to send a heartbeat (half the hub's idle-time-out), if the hub announced one.
    pub fn heartbeat_interval(&self) -> Option<Duration> {
        self.peer_idle_timeout_ms.map(|ms| Duration::from_millis(u64::from(ms / 2).max(1)))
    }

    /// Queues an empty frame (a heartbeat).
    pub fn heartbeat(&mut self) {
        self.output.extend_from_slice(&frame::HEARTBEAT);
    }

    /// C2D messages queued for credit or awaiting their outcome.
    pub fn unsettled(&self) -> usize {
        self.in_flight.len() + self.queued.iter().filter(|(h, _, _)| *h == C2D).count()
    }

    /// Accepts (and settles) a received feedback batch.
    pub fn accept(&mut self, delivery_id: u32) {
        let body = vec![
            Value::Bool(true),
            Value::Uint(delivery_id),
            Value::Null,
            Value::Bool(true),
            frame::accepted(),
        ];
        self.write(&list(code::DISPOSITION, body), &[]);
    }

    /// Feeds bytes read from the socket; returns what happened. An error ends the connection.
    pub fn input(&mut self, bytes: &[u8]) -> Result<Vec<Event>, AmqpError> {
        self.input.extend_from_slice(bytes);
        if !self.header_seen {
            if self.input.len() < 8 {
                return Ok(Vec::new());
            }
            if self.input[..8] != AMQP_HEADER {
                return Err(AmqpError::Protocol(format!(
                    "the hub answered header {:02x?}",
                    &self.input[..8]
                )));
            }
            self.input.drain(..8);
            self.header_seen = true;
        }
        let mut events = Vec::new();
        while let Some(f) = frame::parse_frame(&mut self.input, MAX_FRAME)? {
            let Some(body) = f.body else { continue };
            let (c, fields) = frame::described_list(&body)?;
            self.on_frame(c, &fields, f.payload, &mut events)?;
        }
        Ok(events)
    }

    fn on_frame(
        &mut self,
        c: u64,
        f: &frame::Fields,
        payload: Vec<u8>,
        events: &mut Vec<Event>,
    ) -> Result<(), AmqpError> {
        let closed = |what, v: &Value| {
            let (condition, description) = error_of(v);
            AmqpError::Closed { what, condition, description }
        };
        match c {
            code::OPEN => {
                self.peer_max_frame = f.u32(2).unwrap_or(u32::MAX).max(frame::MIN_MAX_FRAME_SIZE);
                self.peer_idle_timeout_ms = f.u32(4).filter(|&ms| ms > 0);
            }
            code::BEGIN => self.next_incoming_id = f.u32(1).unwrap_or(0),
            code::ATTACH => {}
            code::FLOW => {
                if let Some(handle) = f.u32(4) {
                    let (peer_count, credit) = (f.u32(5).unwrap_or(0), f.u32(6).unwrap_or(0));
                    let link = match handle {
                        CBS_OUT => &mut self.cbs_out,
                        C2D => &mut self.c2d_out,
                        _ => return Ok(()),
                    };
                    link.1 = peer_count.wrapping_add(credit).wrapping_sub(link.0);
                    self.pump();
                }
            }
            code::TRANSFER => self.on_transfer(f, payload, events)?,
            code::DISPOSITION => {
                if !f.bool_or(0, false) {
                    return Ok(());
                }
                let first = f.u32(1).unwrap_or(0);
                let last = f.u32(2).unwrap_or(first).max(first);
                let result = match f.get(4).as_described() {
                    Some((code::ACCEPTED, _)) => Ok(()),
                    Some((code::REJECTED, Value::List(items))) => {
                        let (condition, description) = error_of(items.first().unwrap_or(&Value::Null));
                        Err(AmqpError::Rejected { condition, description })
                    }
                    other => Err(AmqpError::Rejected {
                        condition: "amqp:released".into(),
                        description: format!("the hub settled the delivery with {other:?}"),
                    }),
                };
                for id in first..=last {
                    if let Some(tag) = self.in_flight.remove(&id) {
                        events.push(Event::Settled { tag, result: result.clone() });
                    }
                }
            }
            code::DETACH => return Err(closed("link", f.get(2))),
            code::END => return Err(closed("session", f.get(0))),
            code::CLOSE => return Err(closed("connection", f.get(0))),
            _ => {}
        }
        Ok(())
    }

    fn on_transfer(
        &mut self,
        f: &frame::Fields,
        payload: Vec<u8>,
        events: &mut Vec<Event>,
    ) -> Result<(), AmqpError> {
        self.next_incoming_id = self.next_incoming_id.wrapping_add(1);
        self.incoming_window = self.incoming_window.saturating_sub(1);
        if self.incoming_window < WINDOW / 2 {
            self.incoming_window = WINDOW;
            self.flow(None);
        }
        let handle = f.u32(0).unwrap_or(u32::MAX);
        let mut d = match self.incoming.remove(&handle) {
            Some(d) => d,
            None => Incoming {
                handle,
                delivery_id: f
                    .u32(1)
                    .ok_or_else(|| AmqpError::Protocol("a transfer without delivery-id".into()))?,
                settled: false,
                bytes: Vec::new(),
            },
        };
        d.settled |= f.bool_or(4, false);
        d.bytes.extend_from_slice(&payload);
        if d.bytes.len() > 16 * MAX_FRAME as usize {
            return Err(AmqpError::Protocol("an incoming message larger than 1 MiB".into()));
        }
        if f.bool_or(5, false) {
            self.incoming.insert(handle, d);
            return Ok(());
        }
        let m = Message::decode(&d.bytes)?;
        match d.handle {
            CBS_IN => {
                self.cbs_in.0 = self.cbs_in.0.wrapping_add(1);
                self.cbs_in.1 = self.cbs_in.1.saturating_sub(1);
                if !d.settled {
                    self.accept(d.delivery_id);
                }
                if self.cbs_in.1 < CBS_CREDIT / 2 {
                    self.grant(CBS_IN, CBS_CREDIT);
                }
                let status = m
                    .application_properties
                    .iter()
                    .find(|(k, _)| k == "status-code")
                    .and_then(|(_, v)| match v {
                        Value::Int(i) => Some(i64::from(*i)),
                        v => v.as_u64().and_then(|u| i64::try_from(u).ok()),
                    })
                    .unwrap_or(0);
                let description = m.app_str("status-description").unwrap_or_default().to_owned();
                events.push(Event::CbsReply { status, description });
            }
            FEEDBACK => {
                self.feedback_in.0 = self.feedback_in.0.wrapping_add(1);
                self.feedback_in.1 = self.feedback_in.1.saturating_sub(1);
                let records = match &m.body {
                    Body::Data(b) => serde_json::from_slice(b).map_err(|e| e.to_string()),
                    other => Err(format!("the feedback body is not data: {other:?}")),
                };
                events.push(Event::Feedback { delivery_id: d.delivery_id, records });
            }
            other => {
                return Err(AmqpError::Protocol(format!("a transfer on handle {other}, not a receiver")));
            }
        }
        Ok(())
    }
}

enum Command {
    Send { device_id: String, msg: C2dSend, done: oneshot::Sender<Result<(), AmqpError>> },
    Feedback { reply: oneshot::Sender<Vec<FeedbackRecord>> },
}

/// Where and how to reach a hub's AMQP service endpoint.
#[derive(Debug, Clone)]
pub struct AmqpEndpoint {
    /// The AMQP (TLS) port's address.
    pub addr: SocketAddr,
    /// The TLS server name (the hub certificate's name, e.g. `localhost`).
    pub server_name: String,
    /// The hub's CA certificate (PEM), trusted for TLS.
    pub ca_pem: String,
}

/// A connected AMQP service client; clones share the connection. Dropping every clone closes it.
#[derive(Clone)]
pub struct AmqpService {
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for AmqpService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AmqpService")
    }
}

type Stream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

impl AmqpService {
    /// Connects over TLS, opens the links and authorizes with a CBS put-token of `token` (a
    /// service SAS token) for `audience` (the hub host name).
    pub async fn connect(endpoint: &AmqpEndpoint, audience: &str, token: &str) -> Result<Self, AmqpError> {
        Self::open(endpoint, audience, token, None).await
    }

    /// Like [`connect`](Self::connect) with a token from `source`, then a new token from
    /// `source` put on `$cbs` every `every` for as long as the connection lives. A refused
    /// renewal ends the connection with [`AmqpError::Cbs`] (every waiting send gets it).
    pub async fn connect_renewing(
        endpoint: &AmqpEndpoint,
        audience: &str,
        source: TokenSource,
        every: Duration,
    ) -> Result<Self, AmqpError> {
        let token = source().map_err(|reason| AmqpError::Cbs { status: 0, description: reason })?;
        let renewal = Renewal { audience: audience.to_string(), source, every };
        Self::open(endpoint, audience, &token, Some(renewal)).await
    }

    async fn open(
        endpoint: &AmqpEndpoint,
        audience: &str,
        token: &str,
        renewal: Option<Renewal>,
    ) -> Result<Self, AmqpError> {
        let io = |e: std::io::Error| AmqpError::Io(e.to_string());
        let handshake = async {
            let tls = crate::install::ftp::tls_trusting(&endpoint.ca_pem).map_err(AmqpError::Io)?;
            let name = rustls::pki_types::ServerName::try_from(endpoint.server_name.clone())
                .map_err(|e| AmqpError::Io(e.to_string()))?;
            let tcp = tokio::net::TcpStream::connect(endpoint.addr).await.map_err(io)?;
            let mut stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(io)?;
            let mut conn = ServiceConn::new(audience);
            conn.put_token(audience, token);
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                stream.write_all(&conn.take_output()).await.map_err(io)?;
                let n = stream.read(&mut buf).await.map_err(io)?;
                if n == 0 {
                    return Err(AmqpError::Io("the hub closed the connection during the handshake".into()));
                }
                for event in conn.input(&buf[..n])? {
                    if let Event::CbsReply { status, description } = event {
                        if status != 200 {
                            return Err(AmqpError::Cbs { status, description });
                        }
                        return Ok((stream, conn));
                    }
                }
            }
        };
        let (stream, conn) = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| AmqpError::Io("the AMQP handshake timed out".into()))??;
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        tokio::spawn(async move {
            if let Err(e) = drive(stream, conn, rx, renewal).await {
                tracing::warn!("AMQP service connection ended: {e}");
            }
        });
        Ok(Self { commands: tx })
    }

    /// Sends a C2D message to `device_id` and waits for the hub's outcome (at most
    /// 30 s). Calls from several tasks are pipelined on the one connection.
    pub async fn send_c2d(&self, device_id: &str, msg: &C2dSend) -> Result<(), AmqpError> {
        let (done, rx) = oneshot::channel();
        let cmd = Command::Send { device_id: device_id.to_owned(), msg: msg.clone(), done };
        self.commands.send(cmd).await.map_err(|_| AmqpError::Gone)?;
        match tokio::time::timeout(SEND_TIMEOUT, rx).await {
            Ok(outcome) => outcome.map_err(|_| AmqpError::Gone)?,
            Err(_) => Err(AmqpError::Io(format!("no outcome for the send within {SEND_TIMEOUT:?}"))),
        }
    }

    /// The next feedback batch (accepted once returned), or `None` if none came within `wait`.
    pub async fn receive_feedback(&self, wait: Duration) -> Result<Option<Vec<FeedbackRecord>>, AmqpError> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Feedback { reply }).await.map_err(|_| AmqpError::Gone)?;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(records)) => Ok(Some(records)),
            Ok(Err(_)) => Err(AmqpError::Gone),
            Err(_) => Ok(None),
        }
    }
}

/// The driver: owns the socket and the state machine until every client handle is dropped or
/// the connection fails (then every waiting send gets the error).
async fn drive(
    mut stream: Stream,
    mut conn: ServiceConn,
    mut rx: mpsc::Receiver<Command>,
    renewal: Option<Renewal>,
) -> Result<(), AmqpError> {
    let mut sends: HashMap<u64, oneshot::Sender<Result<(), AmqpError>>> = HashMap::new();
    let mut ready: VecDeque<(u32, Vec<FeedbackRecord>)> = VecDeque::new();
    let mut waiters: VecDeque<oneshot::Sender<Vec<FeedbackRecord>>> = VecDeque::new();
    let mut buf = vec![0u8; 16 * 1024];
    // A heartbeat timer only when the hub announced an idle-time-out (IoT Hub does; the emulator
    // does not); otherwise a timer that never fires.
    let beat = conn.heartbeat_interval().unwrap_or(NEVER);
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + beat, beat);
    let every = renewal.as_ref().map_or(NEVER, |r| r.every);
    let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let result = loop {
        // Hand buffered batches to waiting callers; accept each one handed over.
        while !ready.is_empty()
            && let Some(w) = waiters.pop_front()
            && let Some((id, records)) = ready.pop_front()
        {
            match w.send(records) {
                Ok(()) => conn.accept(id),
                Err(records) => ready.push_front((id, records)),
            }
        }
        waiters.retain(|w| !w.is_closed());
        conn.want_feedback(ready.len());
        let out = conn.take_output();
        if !out.is_empty()
            && let Err(e) = stream.write_all(&out).await
        {
            break Err(AmqpError::Io(e.to_string()));
        }
        tokio::select! {
            _ = heartbeat.tick() => conn.heartbeat(),
            _ = renew.tick() => if let Some(r) = &renewal {
                match (r.source)() {
                    Ok(token) => conn.put_token(&r.audience, &token),
                    Err(e) => tracing::warn!("no new CBS token this time, retrying at the next renewal: {e}"),
                }
            },
            n = stream.read(&mut buf) => {
                let n = match n {
                    Ok(0) => break Err(AmqpError::Io("the hub closed the connection".into())),
                    Ok(n) => n,
                    Err(e) => break Err(AmqpError::Io(e.to_string())),
                };
                let events = match conn.input(&buf[..n]) {
                    Ok(events) => events,
                    Err(e) => break Err(e),
                };
                let mut refused = None;
                for event in events {
                    match event {
                        Event::Settled { tag, result } => {
                            if let Some(done) = sends.remove(&tag) {
                                let _ = done.send(result);
                            }
                        }
                        Event::Feedback { delivery_id, records: Ok(records) } => ready.push_back((delivery_id, records)),
                        Event::Feedback { delivery_id, records: Err(why) } => {
                            tracing::warn!("accepting an unreadable feedback batch: {why}");
                            conn.accept(delivery_id);
                        }
                        Event::CbsReply { status: 200, .. } => tracing::debug!("CBS token renewed"),
                        Event::CbsReply { status, description } => {
                            refused = Some(AmqpError::Cbs { status, description });
                        }
                    }
                }
                if let Some(e) = refused {
                    tracing::warn!("the hub refused a renewed CBS token: {e}");
                    break Err(e);
                }
            }
            cmd = rx.recv() => match cmd {
                Some(Command::Send { device_id, msg, done }) => {
                    let tag = conn.send_c2d(&device_id, &msg);
                    sends.insert(tag, done);
                }
                Some(Command::Feedback { reply }) => waiters.push_back(reply),
                None => {
                    conn.write(&list(code::CLOSE, vec![]), &[]);
                    let _ = stream.write_all(&conn.take_output()).await;
                    let _ = stream.shutdown().await;
                    break Ok(());
                }
            }
        }
    };
    if let Err(e) = &result {
        for (_, done) in sends.drain() {
            let _ = done.send(Err(e.clone()));
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(bytes: &[u8]) -> Vec<(u64, frame::Fields, Vec<u8>)> {
        let mut buf = bytes.to_vec();
        let mut out = Vec::new();
        while let Some(f) = frame::parse_frame(&mut buf, u32::MAX).unwrap() {
            let (c, fields) = frame::described_list(&f.body.unwrap()).unwrap();
            out.push((c, fields, f.payload));
        }
        out
    }

    fn server_frame(body: Value, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame::write_frame(&mut out, FRAME_AMQP, 0, &body, payload);
        out
    }

    fn opened() -> ServiceConn {
        let mut c = ServiceConn::new("hub.local");
        let out = c.take_output();
        assert_eq!(&out[..8], &AMQP_HEADER);
        let codes: Vec<u64> = frames(&out[8..]).into_iter().map(|(c, _, _)| c).collect();
        assert_eq!(
            codes,
            [code::OPEN, code::BEGIN, code::ATTACH, code::ATTACH, code::ATTACH, code::ATTACH, code::FLOW]
        );
        let mut input = AMQP_HEADER.to_vec();
        input.extend(server_frame(
            list(code::OPEN, vec![Value::str("h"), Value::str("h"), Value::Uint(65536)]),
            &[],
        ));
        input.extend(server_frame(
            list(code::BEGIN, vec![Value::Ushort(0), Value::Uint(0), Value::Uint(2048)]),
            &[],
        ));
        assert!(c.input(&input).unwrap().is_empty());
        c
    }

    /// A transfer performative from the hub.
    fn transfer(handle: u32, delivery_id: u32, settled: bool, more: bool) -> Value {
        let id = Value::Uint(delivery_id);
        let fields = [Value::Uint(handle), id, Value::Binary(vec![0]), Value::Uint(0)];
        list(code::TRANSFER, [fields.to_vec(), vec![Value::Bool(settled), Value::Bool(more)]].concat())
    }

    fn credit(handle: u32, n: u32) -> Vec<u8> {
        let f = vec![
            Value::Uint(0),
            Value::Uint(2048),
            Value::Uint(0),
            Value::Uint(2048),
            Value::Uint(handle),
            Value::Uint(0),
            Value::Uint(n),
        ];
        server_frame(list(code::FLOW, f), &[])
    }

    fn disposition(first: u32, state: Value) -> Vec<u8> {
        let f = vec![Value::Bool(true), Value::Uint(first), Value::Null, Value::Bool(true), state];
        server_frame(list(code::DISPOSITION, f), &[])
    }

    fn notice(id: &str) -> C2dSend {
        C2dSend { body: b"{}".to_vec(), message_id: id.into(), ack: "full", ..C2dSend::default() }
    }

    #[test]
    fn sends_wait_for_credit_then_pipeline_and_map_rejections() {
        let mut c = opened();
        let a = c.send_c2d("dev 1", &notice("m1"));
        let b = c.send_c2d("ghost", &notice("m2"));
        assert!(c.take_output().is_empty(), "no credit yet, nothing sent");
        assert_eq!(c.unsettled(), 2);
        c.input(&credit(C2D, 10)).unwrap();
        let sent = frames(&c.take_output());
        assert_eq!(sent.len(), 2, "both sends go out before any outcome");
        let m = Message::decode(&sent[0].2).unwrap();
        assert_eq!(m.properties.to.as_deref(), Some("/devices/dev%201/messages/devicebound"));
        assert_eq!(m.properties.message_id, Some(Value::str("m1")));
        assert_eq!(m.app_str("iothub-ack"), Some("full"));
        assert_eq!(m.body, Body::Data(b"{}".to_vec()));
        let (id_a, id_b) = (sent[0].1.u32(1).unwrap(), sent[1].1.u32(1).unwrap());
        let ev = c
            .input(&disposition(id_b, frame::rejected("amqp:not-found", "ErrorCode:DeviceNotFound;ghost")))
            .unwrap();
        assert_eq!(
            ev,
            [Event::Settled {
                tag: b,
                result: Err(AmqpError::Rejected {
                    condition: "amqp:not-found".into(),
                    description: "ErrorCode:DeviceNotFound;ghost".into()
                })
            }]
        );
        let ev = c.input(&disposition(id_a, frame::accepted())).unwrap();
        assert_eq!(ev, [Event::Settled { tag: a, result: Ok(()) }]);
        assert_eq!(c.unsettled(), 0);
    }

    #[test]
    fn heartbeats_follow_the_hubs_idle_time_out() {
        assert_eq!(opened().heartbeat_interval(), None, "the emulator announces none");
        let mut c = ServiceConn::new("hub.local");
        let open = vec![
            Value::str("h"),
            Value::str("h"),
            Value::Uint(65536),
            Value::Ushort(0),
            Value::Uint(240_000),
        ];
        let mut input = AMQP_HEADER.to_vec();
        input.extend(server_frame(list(code::OPEN, open), &[]));
        c.input(&input).unwrap();
        assert_eq!(c.heartbeat_interval(), Some(Duration::from_secs(120)));
        c.take_output();
        c.heartbeat();
        assert_eq!(c.take_output(), frame::HEARTBEAT);
    }

    #[test]
    fn cbs_reply_and_feedback_batches_are_read_and_a_close_is_an_error() {
        let mut c = opened();
        c.put_token("hub.local", "SharedAccessSignature sr=x");
        c.input(&credit(CBS_OUT, 1)).unwrap();
        let sent = frames(&c.take_output());
        let req = Message::decode(&sent[0].2).unwrap();
        assert_eq!(req.app_str("operation"), Some("put-token"));
        let reply = Message {
            application_properties: vec![
                ("status-code".into(), Value::Int(401)),
                ("status-description".into(), Value::str("no")),
            ],
            ..Message::default()
        };
        assert_eq!(
            c.input(&server_frame(transfer(CBS_IN, 0, true, false), &reply.encode())).unwrap(),
            [Event::CbsReply { status: 401, description: "no".into() }]
        );

        let body = br#"[{"originalMessageId":"m1","statusCode":"Success","deviceId":"d","description":"x"}]"#;
        let fb = Message { body: Body::Data(body.to_vec()), ..Message::default() };
        let bytes = fb.encode();
        let (one, two) = bytes.split_at(10);
        assert!(c.input(&server_frame(transfer(FEEDBACK, 1, false, true), one)).unwrap().is_empty());
        let ev = c.input(&server_frame(transfer(FEEDBACK, 1, false, false), two)).unwrap();
        let record = FeedbackRecord {
            original_message_id: "m1".into(),
            status_code: "Success".into(),
            device_id: "d".into(),
        };
        assert_eq!(ev, [Event::Feedback { delivery_id: 1, records: Ok(vec![record]) }]);

        let close = list(code::CLOSE, vec![frame::error("amqp:connection:forced", "bye")]);
        assert!(matches!(
            c.input(&server_frame(close, &[])),
            Err(AmqpError::Closed { what: "connection", .. })
        ));
    }
}
