//! The service side of the fan-out: sends one message to every device over a few kept-alive
//! connections, each with a window of requests in flight (pipelined: a writer batches what the
//! window allows, a reader counts answers and reopens the window).
//!
//! - Hub, REST: `POST /devices/{id}/messages/deviceBound` (the REST send extension) on the plain
//!   HTTP port, the body being the payload, with an `iothubowner` SAS token; each answer must be
//!   204.
//! - Hub, AMQP: what the service SDKs do (the seed pipeline's path): a connection to the plain AMQP
//!   listener (bare AMQP header), an `iothubowner` SAS token put on `$cbs`, then one transfer per
//!   message on a `/messages/devicebound` sender link (`to` = `/devices/{id}/messages/devicebound`,
//!   no message id, ack `none`), unsettled; each must be settled `accepted` by the hub's
//!   disposition. The client is the project's own sans-IO service client
//!   ([`simulated_devices::amqp_client::ServiceConn`]); the hub's link credit bounds the window too.
//! - Peers: PUBLISH at QoS 1 of the same payload on the topic the hub would publish to the device
//!   ([`testbench::fanout::c2d_topic`]); each must be PUBACKed.
//!
//! Connections are opened by [`Sender::open`] before the timed phase; the payload carries the
//! send time ([`testbench::fanout::payload`]), taken when the request is encoded.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use simulated_devices::amqp_client::{Event, ServiceConn};
use simulated_devices::service_client::C2dSend;
use testbench::fanout::{self, codec, mono_ns};

/// Deadline of a sender connection's connect (and CONNACK).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests encoded into one write at most.
const BATCH: usize = 32;

/// When a paced sender may send: message `k` of connection `conn` (of `conns`) is the
/// `k * conns + conn`-th of the round, due `1 / rate` seconds after the one before it.
#[derive(Clone, Copy)]
struct Pace {
    start: Instant,
    rate: f64,
    conn: usize,
    conns: usize,
}

impl Pace {
    fn at(&self, k: usize) -> Instant {
        self.start + Duration::from_secs_f64((k * self.conns + self.conn) as f64 / self.rate)
    }

    fn due(pace: Option<Pace>, k: usize, now: Instant) -> bool {
        pace.is_none_or(|p| p.at(k) <= now)
    }
}

/// What a send phase did.
#[derive(Debug, Default, Clone)]
pub struct SendStats {
    /// When the first request was encoded (`CLOCK_MONOTONIC` ns).
    pub first_ns: u64,
    /// When the last answer arrived.
    pub last_answer_ns: u64,
    /// Requests answered with success (204 / PUBACK).
    pub ok: usize,
    /// Requests refused or unanswered.
    pub failed: usize,
    /// The first failure.
    pub error: Option<String>,
}

/// How messages are sent.
#[derive(Debug, Clone)]
pub enum Via {
    /// The hub's REST extension with this `Authorization` value.
    Rest {
        /// The plain HTTP address.
        http: SocketAddr,
        /// The SAS token.
        token: String,
    },
    /// The hub's AMQP service endpoint (plain listener), authorized with this SAS token on `$cbs`.
    Amqp {
        /// The plain AMQP address.
        addr: SocketAddr,
        /// The SAS token.
        token: String,
    },
    /// An MQTT publisher.
    Mqtt {
        /// The broker's address.
        addr: SocketAddr,
    },
}

/// One open sender connection.
enum Conn {
    /// HTTP or MQTT: the socket.
    Plain(TcpStream),
    /// AMQP: the socket and the authorized connection's state.
    Amqp(TcpStream, Box<ServiceConn>),
}

/// Open sender connections.
pub struct Sender {
    via: Via,
    conns: Vec<Conn>,
    window: usize,
    payload_bytes: usize,
    /// Messages a second over all connections; `None`: as fast as the window allows.
    rate: Option<f64>,
}

impl Sender {
    /// Opens `conns` connections (MQTT ones CONNECTed). With a `rate` (messages a second, over
    /// all connections) the sender paces its messages; without one it sends as fast as the
    /// window allows.
    pub async fn open(
        via: Via,
        conns: usize,
        window: usize,
        payload_bytes: usize,
        rate: Option<f64>,
    ) -> Result<Self> {
        let mut open = Vec::new();
        for c in 0..conns.max(1) {
            let s = match &via {
                Via::Rest { http, .. } => Conn::Plain(
                    tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(http))
                        .await
                        .context("connect timeout")?
                        .with_context(|| format!("connect to {http}"))?,
                ),
                Via::Amqp { addr, token } => {
                    let (s, conn) = tokio::time::timeout(CONNECT_TIMEOUT, amqp_open(*addr, token))
                        .await
                        .context("AMQP connect and put-token timeout")??;
                    Conn::Amqp(s, conn)
                }
                Via::Mqtt { addr } => {
                    let mut s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
                        .await
                        .context("connect timeout")?
                        .with_context(|| format!("connect to {addr}"))?;
                    let mut b = Vec::new();
                    codec::connect(&mut b, &format!("fanout-sender-{c}"), "sender", "-", 1000, true);
                    s.write_all(&b).await?;
                    let mut buf = [0u8; 4];
                    tokio::time::timeout(CONNECT_TIMEOUT, s.read_exact(&mut buf))
                        .await
                        .context("CONNACK timeout")??;
                    if buf != [0x20, 2, 0, 0] {
                        bail!("the publisher's CONNECT was answered with {buf:?}");
                    }
                    Conn::Plain(s)
                }
            };
            if let Conn::Plain(s) = &s {
                let _ = s.set_nodelay(true);
            }
            open.push(s);
        }
        let rate = rate.filter(|r| r.is_finite() && *r > 0.0);
        Ok(Self { via, conns: open, window: window.max(1), payload_bytes, rate })
    }

    /// Sends one message to each device in `order`, spread over the connections; returns when
    /// every request is answered (or failed). The connections are closed afterwards.
    /// Gives up on answers after `timeout`.
    pub async fn run(self, order: &[usize], round: u32, timeout: Duration) -> SendStats {
        let n = self.conns.len();
        let start = Instant::now();
        let mut jobs = Vec::new();
        for (c, conn) in self.conns.into_iter().enumerate() {
            let mine: Vec<usize> = order.iter().copied().skip(c).step_by(n).collect();
            let via = self.via.clone();
            let (window, payload_bytes) = (self.window, self.payload_bytes);
            let pace = self.rate.map(|rate| Pace { start, rate, conn: c, conns: n });
            jobs.push(async move {
                let total = mine.len();
                let job = async {
                    match conn {
                        Conn::Plain(stream) => {
                            let (rd, wr) = stream.into_split();
                            one_conn(via, rd, wr, mine, round, window, payload_bytes, pace).await
                        }
                        Conn::Amqp(stream, conn) => {
                            one_amqp_conn(stream, conn, mine, round, window, payload_bytes, pace).await
                        }
                    }
                };
                match tokio::time::timeout(timeout, job).await {
                    Ok(s) => s,
                    Err(_) => SendStats {
                        failed: total,
                        error: Some(format!("send phase over {timeout:?}")),
                        ..Default::default()
                    },
                }
            });
        }
        let all = futures_util::future::join_all(jobs).await;
        let mut stats = SendStats { first_ns: u64::MAX, ..Default::default() };
        for s in all {
            stats.first_ns = stats.first_ns.min(s.first_ns);
            stats.last_answer_ns = stats.last_answer_ns.max(s.last_answer_ns);
            stats.ok += s.ok;
            stats.failed += s.failed;
            if stats.error.is_none() {
                stats.error = s.error;
            }
        }
        stats
    }
}

#[allow(clippy::too_many_arguments)]
async fn one_conn(
    via: Via,
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    devices: Vec<usize>,
    round: u32,
    window: usize,
    payload_bytes: usize,
    pace: Option<Pace>,
) -> SendStats {
    let total = devices.len();
    let permits = Semaphore::new(window);
    let mut stats = SendStats { first_ns: u64::MAX, ..Default::default() };
    let mqtt = matches!(via, Via::Mqtt { .. });
    let writer = async {
        let mut buf = Vec::with_capacity(BATCH * (payload_bytes + 256));
        let mut next = 0;
        let mut pkid: u16 = 0;
        let mut first = u64::MAX;
        while next < devices.len() {
            if let Some(p) = pace {
                tokio::time::sleep_until(p.at(next)).await;
            }
            match permits.acquire().await {
                Ok(p) => p.forget(),
                Err(_) => break,
            }
            let mut batch = 1;
            while batch < BATCH
                && next + batch < devices.len()
                && Pace::due(pace, next + batch, Instant::now())
            {
                match permits.try_acquire() {
                    Ok(p) => {
                        p.forget();
                        batch += 1;
                    }
                    Err(_) => break,
                }
            }
            buf.clear();
            for &i in &devices[next..next + batch] {
                let id = fanout::device_id(i);
                let now = mono_ns();
                first = first.min(now);
                let mut body = Vec::with_capacity(payload_bytes);
                fanout::payload(&mut body, i, round, now, payload_bytes);
                match &via {
                    Via::Rest { http, token } => {
                        buf.extend_from_slice(
                            format!(
                                "POST /devices/{id}/messages/deviceBound?api-version={} HTTP/1.1\r\nHost: {http}\r\n\
                                 Authorization: {token}\r\nContent-Length: {}\r\n\r\n",
                                fanout::API_VERSION,
                                body.len()
                            )
                            .as_bytes(),
                        );
                        buf.extend_from_slice(&body);
                    }
                    Via::Amqp { .. } => unreachable!("AMQP connections are driven by one_amqp_conn"),
                    Via::Mqtt { .. } => {
                        pkid = pkid.checked_add(1).unwrap_or(1);
                        codec::publish(&mut buf, 1, pkid, fanout::c2d_topic(&id).as_bytes(), &body);
                    }
                }
            }
            next += batch;
            if let Err(e) = wr.write_all(&buf).await {
                return (first, Some(format!("write: {e}")));
            }
        }
        (first, None)
    };
    let read_all = async {
        let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
        let (mut ok, mut failed, mut error, mut last) = (0, 0, None, 0);
        while ok + failed < total {
            // Every complete answer in the buffer.
            loop {
                let parsed = if mqtt { take_puback(&buf) } else { take_http(&buf) };
                match parsed {
                    Ok(Some((len, good, what))) => {
                        buf.drain(..len);
                        last = mono_ns();
                        if good {
                            ok += 1;
                        } else {
                            failed += 1;
                            error.get_or_insert(what);
                        }
                        permits.add_permits(1);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        return (ok, total - ok, Some(e), last);
                    }
                }
                if ok + failed == total {
                    break;
                }
            }
            if ok + failed == total {
                break;
            }
            let mut chunk = [0u8; 16 * 1024];
            match rd.read(&mut chunk).await {
                Ok(0) => return (ok, total - ok, Some("the server closed the connection".into()), last),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return (ok, total - ok, Some(format!("read: {e}")), last),
            }
        }
        (ok, failed, error, last)
    };
    let reader = async {
        let r = read_all.await;
        // Wakes a writer still waiting for the window when the reader gave up.
        permits.close();
        r
    };
    let ((first, write_error), (ok, failed, read_error, last)) = tokio::join!(writer, reader);
    stats.first_ns = first;
    stats.last_answer_ns = last;
    stats.ok = ok;
    stats.failed = failed;
    stats.error = read_error.or(write_error);
    stats
}

/// Connects to the hub's plain AMQP listener, opens the service client's links and puts `token`
/// on `$cbs`; returns once the hub accepted the token.
async fn amqp_open(addr: SocketAddr, token: &str) -> Result<(TcpStream, Box<ServiceConn>)> {
    let mut s = TcpStream::connect(addr).await.with_context(|| format!("connect to {addr}"))?;
    let _ = s.set_nodelay(true);
    let mut conn = Box::new(ServiceConn::new(fanout::HOSTNAME));
    conn.put_token(fanout::HOSTNAME, token);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        s.write_all(&conn.take_output()).await?;
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("the hub closed the AMQP connection during the put-token");
        }
        for event in conn.input(&buf[..n])? {
            if let Event::CbsReply { status, description } = event {
                if status != 200 {
                    bail!("the hub refused the CBS token: {status} {description}");
                }
                s.write_all(&conn.take_output()).await?;
                return Ok((s, conn));
            }
        }
    }
}

/// The AMQP sender: keeps up to `window` transfers unsettled (the hub's link credit may allow
/// fewer), writes what the client encoded in one write per turn, and counts the hub's
/// dispositions (accepted = ok).
async fn one_amqp_conn(
    mut stream: TcpStream,
    mut conn: Box<ServiceConn>,
    devices: Vec<usize>,
    round: u32,
    window: usize,
    payload_bytes: usize,
    pace: Option<Pace>,
) -> SendStats {
    let total = devices.len();
    let mut stats = SendStats { first_ns: u64::MAX, ..Default::default() };
    let mut next = 0;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while next < total && conn.unsettled() < window && Pace::due(pace, next, Instant::now()) {
            let i = devices[next];
            let now = mono_ns();
            stats.first_ns = stats.first_ns.min(now);
            let mut body = Vec::with_capacity(payload_bytes);
            fanout::payload(&mut body, i, round, now, payload_bytes);
            let msg =
                C2dSend { body, message_id: String::new(), ack: "", content_type: None, expiry_ms: None };
            conn.send_c2d(&fanout::device_id(i), &msg);
            next += 1;
        }
        let out = conn.take_output();
        if !out.is_empty()
            && let Err(e) = stream.write_all(&out).await
        {
            stats.error = Some(format!("write: {e}"));
            break;
        }
        if stats.ok + stats.failed == total {
            break;
        }
        // Paced, with the next message not due yet: its time or the hub's answers, whichever
        // comes first (a read is cancel-safe).
        let read = match pace.filter(|_| next < total && conn.unsettled() < window) {
            Some(p) => tokio::select! {
                r = stream.read(&mut buf) => r,
                () = tokio::time::sleep_until(p.at(next)) => continue,
            },
            None => stream.read(&mut buf).await,
        };
        let n = match read {
            Ok(0) => {
                stats.error = Some("the hub closed the AMQP connection".into());
                break;
            }
            Ok(n) => n,
            Err(e) => {
                stats.error = Some(format!("read: {e}"));
                break;
            }
        };
        let events = match conn.input(&buf[..n]) {
            Ok(events) => events,
            Err(e) => {
                stats.error = Some(e.to_string());
                break;
            }
        };
        for event in events {
            if let Event::Settled { result, .. } = event {
                stats.last_answer_ns = mono_ns();
                match result {
                    Ok(()) => stats.ok += 1,
                    Err(e) => {
                        stats.failed += 1;
                        stats.error.get_or_insert(e.to_string());
                    }
                }
            }
        }
    }
    stats.failed = total - stats.ok;
    stats
}

/// One PUBACK from the front of `buf`: `(length, true, _)`; anything else is an error.
fn take_puback(buf: &[u8]) -> Result<Option<(usize, bool, String)>, String> {
    match codec::frame_len(buf).map_err(|e| e.to_string())? {
        None => Ok(None),
        Some(len) => match codec::decode(&buf[..len]).map_err(|e| e.to_string())? {
            codec::Packet::PubAck { .. } => Ok(Some((len, true, String::new()))),
            other => Err(format!("the broker sent the publisher {other:?}")),
        },
    }
}

/// One HTTP/1.1 response from the front of `buf`: `(length, status == 204, status line)`.
fn take_http(buf: &[u8]) -> Result<Option<(usize, bool, String)>, String> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "a response head that is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut body = 0usize;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                body = v.trim().parse().map_err(|_| format!("bad content-length {v:?}"))?;
            } else if k.trim().eq_ignore_ascii_case("transfer-encoding") {
                return Err("chunked responses are not expected".into());
            }
        }
    }
    let total = head_end + 4 + body;
    if buf.len() < total {
        return Ok(None);
    }
    let what = if status == 204 {
        String::new()
    } else {
        format!("{status_line}: {}", String::from_utf8_lossy(&buf[head_end + 4..total]))
    };
    Ok(Some((total, status == 204, what)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paced_round_spaces_its_messages_evenly_over_the_connections() {
        let start = Instant::now();
        let pace = |conn| Pace { start, rate: 1000.0, conn, conns: 4 };
        // Connection 1's third message is the round's tenth (2 * 4 + 1 = 9 after the first).
        assert_eq!(pace(1).at(2) - start, Duration::from_millis(9));
        assert_eq!(pace(0).at(0), start);
        assert!(Pace::due(None, 1_000_000, start));
        assert!(Pace::due(Some(pace(3)), 0, start + Duration::from_millis(3)));
        assert!(!Pace::due(Some(pace(3)), 1, start + Duration::from_millis(3)));
    }

    #[test]
    fn parses_pipelined_http_answers() {
        let two = b"HTTP/1.1 204 No Content\r\ndate: x\r\n\r\nHTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}";
        let (len, ok, _) = take_http(two).unwrap().unwrap();
        assert!(ok);
        let (len2, ok2, what) = take_http(&two[len..]).unwrap().unwrap();
        assert!(!ok2 && what.contains("404"));
        assert_eq!(len + len2, two.len());
        assert_eq!(take_http(&two[..10]).unwrap(), None);
    }
}
