//! The receiving side of the telemetry bench (`fanout --telemetry`): devices publish QoS 1
//! telemetry ([`super::devices`], command `publish`) and one reader takes every message out again,
//! stamping its arrival against the send time in the payload.
//!
//! - The hub: [`EventHubReader`], a sans-IO AMQP 1.0 receiver of the hub's Event Hub-compatible
//!   endpoint as the Event Hubs SDKs use it (CBS put-token of an entity token for
//!   `sb://{host}/{event hub}`, then one receiver link per partition on
//!   `{event hub}/ConsumerGroups/$Default/Partitions/{p}`, settle-on-send, credit topped up
//!   [`CREDIT`] at a time like Python's prefetch). It owns one connection's session and links.
//! - MQTT peers: a subscriber on [`TELEMETRY_FILTER`] at QoS 1 ([`mqtt_subscriber_frames`]).
//!
//! [`read`] drives either one over a socket until every expected message arrived or a deadline;
//! what it counts is a [`Collected`]. Bytes from the server are bounded: frames by the codecs'
//! limits, one AMQP delivery by [`MAX_DELIVERY`].

use std::collections::HashMap;
use std::net::SocketAddr;

use iothub_emulator::amqp::frame::{self, AMQP_HEADER, FRAME_AMQP, code, list};
use iothub_emulator::amqp::message::{Body, Message, Properties};
use iothub_emulator::amqp::types::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::codec::{self, Packet};
use super::{FanoutError, mono_ns, read_payload};

/// Credit per partition link, topped up when half is used.
pub const CREDIT: u32 = 300;
/// Our max-frame-size, and the session window we announce.
const MAX_FRAME: u32 = 65_536;
const WINDOW: u32 = 1_000_000;
/// Largest delivery accepted (telemetry is at most 256 KiB).
const MAX_DELIVERY: usize = 1024 * 1024;
/// The filter the MQTT subscriber uses: every device's telemetry.
pub const TELEMETRY_FILTER: &str = "devices/+/messages/events/#";

/// The topic device `id` publishes telemetry on (IoT Hub's contract, no properties).
pub fn telemetry_topic(id: &str) -> String {
    format!("devices/{id}/messages/events/")
}

/// Sans-IO Event Hubs receiver of every partition: bytes in, payloads and bytes out.
#[derive(Debug)]
pub struct EventHubReader {
    output: Vec<u8>,
    input: Vec<u8>,
    header_seen: bool,
    partitions: u32,
    next_incoming_id: u32,
    /// Per partition link (handle 2 + p): deliveries received and credit left.
    links: Vec<(u32, u32)>,
    /// Partition links the hub attached.
    attached: u32,
    /// Deliveries being received (split over frames), by handle.
    partial: HashMap<u32, Vec<u8>>,
}

impl EventHubReader {
    /// A connection whose opening (header, open, begin, `$cbs` links, the put-token of `token`
    /// for `sb://{host}/{event_hub}`, one receiver per partition with credit) is already in
    /// [`Self::take_output`].
    pub fn new(host: &str, event_hub: &str, partitions: u32, token: &str) -> Self {
        let mut r = Self {
            output: AMQP_HEADER.to_vec(),
            input: Vec::new(),
            header_seen: false,
            partitions,
            next_incoming_id: 0,
            links: vec![(0, CREDIT); partitions as usize],
            attached: 0,
            partial: HashMap::new(),
        };
        let open = vec![Value::str("telemetry-bench"), Value::str(host), Value::Uint(MAX_FRAME)];
        r.write(&list(code::OPEN, open), &[]);
        r.write(
            &list(code::BEGIN, vec![Value::Null, Value::Uint(0), Value::Uint(WINDOW), Value::Uint(WINDOW)]),
            &[],
        );
        r.attach(0, false, "cbs", "$cbs");
        r.attach(1, true, "$cbs", "cbs");
        r.write(&frame::flow([0, WINDOW, 0, WINDOW], Some((1, 0, 10))), &[]);
        let entity = format!("sb://{host}/{event_hub}");
        let put = Message {
            properties: Properties {
                message_id: Some(Value::Ulong(0)),
                reply_to: Some("cbs".into()),
                to: Some("$cbs".into()),
                ..Properties::default()
            },
            application_properties: vec![
                ("operation".into(), Value::str("put-token")),
                ("type".into(), Value::str("servicebus.windows.net:sastoken")),
                ("name".into(), Value::str(&entity)),
            ],
            message_annotations: vec![],
            body: Body::Value(Value::str(token)),
        };
        let transfer =
            vec![Value::Uint(0), Value::Uint(0), Value::Binary(vec![0]), Value::Uint(0), Value::Bool(true)];
        r.write(&list(code::TRANSFER, transfer), &put.encode());
        for p in 0..partitions {
            r.attach(2 + p, true, &format!("{event_hub}/ConsumerGroups/$Default/Partitions/{p}"), "bench");
            r.write(&frame::flow([0, WINDOW, 1, WINDOW], Some((2 + p, 0, CREDIT))), &[]);
        }
        r
    }

    fn write(&mut self, body: &Value, payload: &[u8]) {
        frame::write_frame(&mut self.output, FRAME_AMQP, 0, body, payload);
    }

    fn attach(&mut self, handle: u32, receiver: bool, source: &str, target: &str) {
        let fields = vec![
            Value::str(&format!("bench-{handle}")),
            Value::Uint(handle),
            Value::Bool(receiver),
            Value::Ubyte(if receiver && handle >= 2 { 1 } else { 0 }), // partitions: settle on send
            Value::Ubyte(0),
            list(code::SOURCE, vec![Value::str(source)]),
            list(code::TARGET, vec![Value::str(target)]),
            Value::Null,
            Value::Null,
            if receiver { Value::Null } else { Value::Uint(0) },
        ];
        self.write(&list(code::ATTACH, fields), &[]);
    }

    /// Bytes to write to the socket.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Whether the hub attached every partition link.
    pub fn ready(&self) -> bool {
        self.attached == self.partitions
    }

    /// Feeds bytes read from the socket; returns the body of every event that completed. An error
    /// (the hub detaching a link, ending the session or closing, or bytes the codec refuses) ends
    /// the connection.
    pub fn input(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, FanoutError> {
        let proto = |e: String| FanoutError::Protocol(e);
        self.input.extend_from_slice(bytes);
        if !self.header_seen {
            if self.input.len() < 8 {
                return Ok(Vec::new());
            }
            if self.input[..8] != AMQP_HEADER {
                return Err(proto(format!("the hub answered header {:02x?}", &self.input[..8])));
            }
            self.input.drain(..8);
            self.header_seen = true;
        }
        let mut bodies = Vec::new();
        while let Some(f) =
            frame::parse_frame(&mut self.input, MAX_FRAME).map_err(|e| proto(e.to_string()))?
        {
            let Some(body) = f.body else { continue };
            let (c, fields) = frame::described_list(&body).map_err(|e| proto(e.to_string()))?;
            match c {
                code::ATTACH if fields.u32(1).is_some_and(|h| h >= 2) => self.attached += 1,
                code::TRANSFER => {
                    self.next_incoming_id = self.next_incoming_id.wrapping_add(1);
                    let handle = fields.u32(0).unwrap_or(u32::MAX);
                    let buf = self.partial.entry(handle).or_default();
                    buf.extend_from_slice(&f.payload);
                    if buf.len() > MAX_DELIVERY {
                        return Err(proto("a delivery larger than 1 MiB".into()));
                    }
                    if fields.bool_or(5, false) {
                        continue;
                    }
                    let bytes = self.partial.remove(&handle).unwrap_or_default();
                    if handle < 2 {
                        continue; // the CBS reply: a refused token shows as refused attaches
                    }
                    let Some(link) = self.links.get_mut((handle - 2) as usize) else {
                        return Err(proto(format!("a transfer on handle {handle}, not a receiver")));
                    };
                    link.0 = link.0.wrapping_add(1);
                    link.1 = link.1.saturating_sub(1);
                    let (count, left) = *link;
                    if left < CREDIT / 2 {
                        link.1 = CREDIT;
                        let state = [self.next_incoming_id, WINDOW, 1, WINDOW];
                        self.write(&frame::flow(state, Some((handle, count, CREDIT))), &[]);
                    }
                    let m = Message::decode(&bytes).map_err(|e| proto(e.to_string()))?;
                    match m.body {
                        Body::Data(b) => bodies.push(b),
                        other => return Err(proto(format!("an event whose body is not data: {other:?}"))),
                    }
                }
                code::DETACH | code::END | code::CLOSE => {
                    let at = if c == code::DETACH { 2 } else { 0 };
                    return Err(proto(format!(
                        "the hub closed a link, session or connection: {:?}",
                        fields.get(at)
                    )));
                }
                _ => {}
            }
        }
        Ok(bodies)
    }
}

/// The frames that connect an MQTT subscriber and subscribe it to [`TELEMETRY_FILTER`] at QoS 1.
pub fn mqtt_subscriber_frames() -> Vec<u8> {
    let mut out = Vec::new();
    codec::connect(&mut out, "telemetry-bench-reader", "reader", "-", 1000, true);
    codec::subscribe(&mut out, 1, TELEMETRY_FILTER, 1);
    out
}

/// What a reader counted.
#[derive(Debug, Default, Clone)]
pub struct Collected {
    /// New messages (each device's each round once).
    pub received: usize,
    /// Messages seen again.
    pub dups: usize,
    /// Messages whose payload is not the bench's.
    pub bad: usize,
    /// The latest arrival (`CLOCK_MONOTONIC` ns).
    pub last_ns: u64,
    /// Each new message's send→receive latency (µs).
    pub lat_us: Vec<u32>,
    /// Why reading stopped early, if it did.
    pub error: Option<String>,
}

/// Which server the reader reads from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The hub's Event Hub-compatible endpoint (plain AMQP listener).
    EventHub {
        /// Its address.
        addr: SocketAddr,
        /// The hub's host name.
        host: String,
        /// The Event Hub-compatible name.
        event_hub: String,
        /// Its partitions.
        partitions: u32,
        /// An entity token for `sb://{host}/{event_hub}`.
        token: String,
    },
    /// An MQTT broker.
    Mqtt(SocketAddr),
}

/// One open reader: its socket and, for the hub, the AMQP state (kept over the rounds of a run,
/// as a consumer stays attached).
#[derive(Debug)]
pub struct Reader {
    s: TcpStream,
    eh: Option<EventHubReader>,
    /// MQTT bytes not yet a whole packet.
    mqtt: Vec<u8>,
}

/// Connects to `source` and returns once it reads (partition links attached, or SUBACK).
pub async fn open(source: &Source) -> Result<Reader, FanoutError> {
    let (addr, mut reader) = match source {
        Source::EventHub { addr, host, event_hub, partitions, token } => {
            (*addr, Some(EventHubReader::new(host, event_hub, *partitions, token)))
        }
        Source::Mqtt(addr) => (*addr, None),
    };
    let mut s = TcpStream::connect(addr).await.map_err(|e| FanoutError::io(format!("connect {addr}"), e))?;
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    match &mut reader {
        Some(r) => {
            s.write_all(&r.take_output()).await.map_err(|e| FanoutError::io("write", e))?;
            while !r.ready() {
                let n = s.read(&mut buf).await.map_err(|e| FanoutError::io("read", e))?;
                if n == 0 {
                    return Err(FanoutError::Protocol("the hub closed the connection".into()));
                }
                if !r.input(&buf[..n])?.is_empty() {
                    return Err(FanoutError::Protocol("events before the bench published any".into()));
                }
                s.write_all(&r.take_output()).await.map_err(|e| FanoutError::io("write", e))?;
            }
        }
        None => {
            s.write_all(&mqtt_subscriber_frames()).await.map_err(|e| FanoutError::io("write", e))?;
            let mut got = Vec::new();
            let mut suback = false;
            while !suback {
                let n = s.read(&mut buf).await.map_err(|e| FanoutError::io("read", e))?;
                if n == 0 {
                    return Err(FanoutError::Protocol("the broker closed the connection".into()));
                }
                got.extend_from_slice(&buf[..n]);
                while let Some(len) = codec::frame_len(&got)? {
                    match codec::decode(&got[..len])? {
                        Packet::ConnAck { code: 0, .. } => {}
                        Packet::SubAck { codes: [c], .. } if *c != 0x80 => suback = true,
                        other => return Err(FanoutError::Protocol(format!("subscriber got {other:?}"))),
                    }
                    got.drain(..len);
                }
            }
        }
    }
    Ok(Reader { s, eh: reader, mqtt: Vec::new() })
}

impl Reader {
    /// Closes the connection with a reset.
    pub fn close(self) {
        let _ = self.s.set_zero_linger();
    }
}

/// Reads until `want` new messages of round `round` from devices `0..devices` arrived, or
/// `deadline`.
pub async fn read(
    rd: &mut Reader,
    devices: usize,
    round: u32,
    want: usize,
    deadline: tokio::time::Instant,
) -> Collected {
    let Reader { s, eh: reader, mqtt } = rd;
    let mut c = Collected::default();
    let mut seen = vec![false; devices];
    let mut buf = vec![0u8; 256 * 1024];
    let mut record = |c: &mut Collected, body: &[u8], now: u64| match read_payload(body) {
        Some((sent, i, r)) if i < devices && r == round => {
            if seen[i] {
                c.dups += 1;
            } else {
                seen[i] = true;
                c.received += 1;
                c.last_ns = c.last_ns.max(now);
                c.lat_us.push((now.saturating_sub(sent) / 1000).min(u64::from(u32::MAX)) as u32);
            }
        }
        _ => c.bad += 1,
    };
    while c.received < want {
        let n = match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => {
                c.error = Some(format!("timed out with {} of {want}", c.received));
                break;
            }
            Ok(Ok(0)) => {
                c.error = Some("the server closed the connection".into());
                break;
            }
            Ok(Err(e)) => {
                c.error = Some(e.to_string());
                break;
            }
            Ok(Ok(n)) => n,
        };
        let now = mono_ns();
        let out = match reader {
            Some(r) => match r.input(&buf[..n]) {
                Ok(bodies) => {
                    for b in &bodies {
                        record(&mut c, b, now);
                    }
                    r.take_output()
                }
                Err(e) => {
                    c.error = Some(e.to_string());
                    break;
                }
            },
            None => {
                mqtt.extend_from_slice(&buf[..n]);
                let mut acks = Vec::new();
                loop {
                    let len = match codec::frame_len(mqtt) {
                        Ok(Some(len)) => len,
                        Ok(None) => break,
                        Err(e) => {
                            c.error = Some(e.to_string());
                            return c;
                        }
                    };
                    match codec::decode(&mqtt[..len]) {
                        Ok(Packet::Publish { qos, pkid, payload, .. }) => {
                            if qos == 1 {
                                acks.extend_from_slice(&codec::puback(pkid));
                            }
                            record(&mut c, payload, now);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            c.error = Some(e.to_string());
                            return c;
                        }
                    }
                    mqtt.drain(..len);
                }
                acks
            }
        };
        if !out.is_empty() && s.write_all(&out).await.is_err() {
            c.error = Some("write to the server failed".into());
            break;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reader_asks_for_the_entity_and_every_partition() {
        let mut r = EventHubReader::new("localhost", "localhost", 4, "SharedAccessSignature x");
        let out = r.take_output();
        assert_eq!(&out[..8], &AMQP_HEADER);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("sb://localhost/localhost"), "the put-token names the entity");
        for p in 0..4 {
            assert!(text.contains(&format!("localhost/ConsumerGroups/$Default/Partitions/{p}")));
        }
        assert!(!r.ready());
        assert!(r.input(b"AMQP\x03\x01\x00\x00").is_err(), "a SASL header is refused");
    }
}
