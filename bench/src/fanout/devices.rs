//! The device side of the fan-out bench: one client process holding many plain MQTT 3.1.1
//! device connections, steered one phase at a time by text commands (the orchestrator writes
//! them to its stdin, it answers one line each on stdout):
//!
//! - `connect`: every device opens a TCP connection from its source address and sends CONNECT
//!   (IoT Hub's contract: client id = device id, username `{host}/{id}/?api-version=…`, a
//!   device-scoped SAS token as password, clean session, keep-alive 1000 s), at most
//!   `connect_in_flight` at once; answers `connected ok= failed= secs= error=`.
//! - `subscribe`: every connected device subscribes at QoS 1 to `devices/{id}/messages/devicebound/#`;
//!   answers `subscribed ok= failed= secs= error=`. From then on each device reads, checks that
//!   a PUBLISH carries its own C2D topic (exactly the one the hub sends) and its own index, and
//!   PUBACKs it at once.
//! - `collect ROUND TIMEOUT_MS`: waits until every device has its message of rounds 1..=ROUND
//!   (or the timeout), then answers `collected received= dups= bad= closed= last_ns= cpu_us=
//!   error= lat_us=a,b,…`, counting what arrived since the previous `collect` (`received`: new
//!   messages; `last_ns`: the latest arrival; `cpu_us`: this process's CPU time; `lat_us`: each
//!   new message's send→receive latency). The payload names its round, so a repeated round is
//!   a duplicate.
//! - `publish ROUND IN_FLIGHT` (instead of `subscribe`, for the telemetry bench): every
//!   connected device publishes one QoS 1 telemetry message of round ROUND
//!   ([`super::telemetry::telemetry_topic`], the payload stamped when it is encoded) and waits for
//!   its PUBACK, IN_FLIGHT devices at once; answers `published ok= failed= first_ns= last_ns=
//!   cpu_us= error=` (`first_ns`: the first send; `last_ns`: the last PUBACK).
//! - `stop`: closes every connection with a reset (no TIME_WAIT left behind) and answers `stopped`.
//!
//! A device costs one task, its socket and a read buffer of a few hundred bytes; packets are
//! decoded in place ([`super::codec`]). Everything runs on one thread ([`run`] wants a
//! current-thread runtime), so a client process uses at most one core.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, watch};

use super::codec::{self, Packet};
use super::{FanoutError, c2d_filter, c2d_topic, device_id, device_token, mono_ns, read_payload, username};

/// Keep-alive every device announces: no PINGREQ is due during a run.
pub const KEEP_ALIVE_SECS: u16 = 1000;
/// Deadline of one device's connect (TCP + CONNECT → CONNACK) or subscribe.
const OP_TIMEOUT: Duration = Duration::from_secs(20);
/// Subscriptions in flight at once (the subscribe phase is not timed).
const SUBSCRIBE_IN_FLIGHT: usize = 256;

/// What one client process does.
#[derive(Debug, Clone)]
pub struct DevicesConfig {
    /// The server's MQTT address.
    pub server: SocketAddr,
    /// The bench indices of this process's devices.
    pub indices: Vec<usize>,
    /// Source addresses; device `k` of this process uses `sources[k / per_source]`.
    pub sources: Vec<Ipv4Addr>,
    /// Devices per source address.
    pub per_source: usize,
    /// Connects in flight at once.
    pub connect_in_flight: usize,
    /// The payload size the sender uses (sizes the read buffers).
    pub payload_bytes: usize,
}

/// What the devices received, shared by their tasks.
#[derive(Debug, Default)]
struct Received {
    /// Rounds received per device (bit r-1 for round r; by position in `indices`).
    rounds: Vec<u64>,
    /// Messages received in all (each device's each round once).
    total: usize,
    /// `total` once every device has every round up to this.
    target: usize,
    /// Messages since the last `collect`.
    received: usize,
    dups: usize,
    bad: usize,
    closed: usize,
    first_error: Option<String>,
    last_ns: u64,
    lat_us: Vec<u32>,
}

impl Received {
    fn error(&mut self, e: impl FnOnce() -> String) {
        if self.first_error.is_none() {
            self.first_error = Some(e());
        }
    }
}

/// A one-line form of an error for the answer lines.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r', ' '], "_")
}

fn set_zero_linger(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

async fn read_packet_into(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<std::ops::Range<usize>, FanoutError> {
    loop {
        if let Some(len) = codec::frame_len(buf)? {
            return Ok(0..len);
        }
        let mut chunk = [0u8; 256];
        let n = s.read(&mut chunk).await.map_err(|e| FanoutError::io("read", e))?;
        if n == 0 {
            return Err(FanoutError::Protocol("the server closed the connection".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn connect_one(server: SocketAddr, source: Ipv4Addr, index: usize) -> Result<TcpStream, FanoutError> {
    let id = device_id(index);
    let socket = TcpSocket::new_v4().map_err(|e| FanoutError::io("socket", e))?;
    socket
        .bind(SocketAddr::new(IpAddr::V4(source), 0))
        .map_err(|e| FanoutError::io(format!("bind {source}"), e))?;
    let mut s = socket.connect(server).await.map_err(|e| FanoutError::io(format!("connect {server}"), e))?;
    let _ = s.set_nodelay(true);
    let mut out = Vec::with_capacity(320);
    codec::connect(&mut out, &id, &username(&id), &device_token(&id)?, KEEP_ALIVE_SECS, true);
    s.write_all(&out).await.map_err(|e| FanoutError::io("write CONNECT", e))?;
    let mut buf = Vec::with_capacity(16);
    let frame = read_packet_into(&mut s, &mut buf).await?;
    match codec::decode(&buf[frame])? {
        Packet::ConnAck { code: 0, .. } => Ok(s),
        other => Err(FanoutError::Protocol(format!("{id}: CONNECT answered with {other:?}"))),
    }
}

async fn subscribe_one(s: &mut TcpStream, index: usize) -> Result<(), FanoutError> {
    let id = device_id(index);
    let mut out = Vec::with_capacity(64);
    codec::subscribe(&mut out, 1, &c2d_filter(&id), 1);
    s.write_all(&out).await.map_err(|e| FanoutError::io("write SUBSCRIBE", e))?;
    let mut buf = Vec::with_capacity(16);
    let frame = read_packet_into(s, &mut buf).await?;
    match codec::decode(&buf[frame])? {
        Packet::SubAck { pkid: 1, codes: [c] } if *c != 0x80 => Ok(()),
        other => Err(FanoutError::Protocol(format!("{id}: SUBSCRIBE answered with {other:?}"))),
    }
}

/// When one publish was sent and PUBACKed (`CLOCK_MONOTONIC` ns), or why not.
type Published = Result<(u64, u64), FanoutError>;

/// Publishes device `index`'s telemetry message of `round` at QoS 1 and reads its PUBACK; returns
/// when it was sent and when the PUBACK arrived (`CLOCK_MONOTONIC` ns).
async fn publish_one(
    s: &mut TcpStream,
    index: usize,
    round: u32,
    payload_bytes: usize,
) -> Result<(u64, u64), FanoutError> {
    let id = device_id(index);
    let pkid = (round % 0xffff) as u16 + 1;
    let mut body = Vec::with_capacity(payload_bytes);
    let sent = mono_ns();
    super::payload(&mut body, index, round, sent, payload_bytes);
    let mut out = Vec::with_capacity(payload_bytes + 64);
    codec::publish(&mut out, 1, pkid, super::telemetry::telemetry_topic(&id).as_bytes(), &body);
    s.write_all(&out).await.map_err(|e| FanoutError::io("write PUBLISH", e))?;
    let mut buf = Vec::with_capacity(16);
    let frame = read_packet_into(s, &mut buf).await?;
    match codec::decode(&buf[frame])? {
        Packet::PubAck { pkid: p } if p == pkid => Ok((sent, mono_ns())),
        other => Err(FanoutError::Protocol(format!("{id}: PUBLISH answered with {other:?}"))),
    }
}

/// One device after its SUBACK: PUBACKs and records every PUBLISH until `stop`.
async fn receive(
    k: usize,
    index: usize,
    mut s: TcpStream,
    buf_bytes: usize,
    state: Rc<RefCell<Received>>,
    all_in: Rc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; buf_bytes];
    let mut len = 0;
    let mut acks = Vec::new();
    loop {
        let n = tokio::select! {
            r = s.read(&mut buf[len..]) => r,
            _ = stop.changed() => break,
        };
        let n = match n {
            Ok(0) | Err(_) => {
                let mut st = state.borrow_mut();
                st.closed += 1;
                st.error(|| format!("{}: the server closed the connection", device_id(index)));
                return;
            }
            Ok(n) => n,
        };
        len += n;
        let mut at = 0;
        let now = mono_ns();
        loop {
            let frame = match codec::frame_len(&buf[at..len]) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    state.borrow_mut().error(|| format!("{}: {e}", device_id(index)));
                    return;
                }
            };
            let packet = codec::decode(&buf[at..at + frame]);
            at += frame;
            let mut st = state.borrow_mut();
            match packet {
                Ok(Packet::Publish { qos, pkid, topic, payload, .. }) => {
                    if qos == 1 {
                        acks.push(pkid);
                    }
                    let id = device_id(index);
                    match read_payload(payload) {
                        Some((sent, i, round))
                            if i == index
                                && (1..=super::MAX_ROUNDS).contains(&round)
                                && topic == c2d_topic(&id).as_bytes() =>
                        {
                            let bit = 1u64 << (round - 1);
                            if st.rounds[k] & bit == 0 {
                                st.rounds[k] |= bit;
                                st.total += 1;
                                st.received += 1;
                                st.lat_us
                                    .push((now.saturating_sub(sent) / 1000).min(u64::from(u32::MAX)) as u32);
                                st.last_ns = st.last_ns.max(now);
                                if st.total == st.target {
                                    all_in.notify_one();
                                }
                            } else {
                                st.dups += 1;
                            }
                        }
                        _ => {
                            st.bad += 1;
                            st.error(|| {
                                format!("{id}: unexpected PUBLISH on {}", String::from_utf8_lossy(topic))
                            });
                        }
                    }
                }
                Ok(Packet::PingResp) => {}
                Ok(other) => {
                    st.bad += 1;
                    st.error(|| format!("{}: unexpected {other:?}", device_id(index)));
                }
                Err(e) => {
                    st.bad += 1;
                    st.error(|| format!("{}: {e}", device_id(index)));
                }
            }
        }
        buf.copy_within(at..len, 0);
        len -= at;
        if len == buf.len() {
            // A packet larger than the buffer: grow it (nothing the bench sends is this large).
            buf.resize(buf.len() * 2, 0);
        }
        if !acks.is_empty() {
            let mut out = Vec::with_capacity(acks.len() * 4);
            for pkid in acks.drain(..) {
                out.extend_from_slice(&codec::puback(pkid));
            }
            if s.write_all(&out).await.is_err() {
                state.borrow_mut().closed += 1;
                return;
            }
        }
    }
    set_zero_linger(&s);
}

/// Runs one client process: reads commands from `commands`, answers on stdout, returns after
/// `stop` (or when `commands` ends). Must run on a current-thread runtime.
pub async fn run<R: AsyncBufRead + Unpin>(cfg: DevicesConfig, commands: R) -> Result<(), FanoutError> {
    tokio::task::LocalSet::new().run_until(run_local(cfg, commands)).await
}

fn answer(line: &str) -> Result<(), FanoutError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).map_err(|e| FanoutError::io("stdout", e))
}

async fn run_local<R: AsyncBufRead + Unpin>(cfg: DevicesConfig, commands: R) -> Result<(), FanoutError> {
    let n = cfg.indices.len();
    let mut streams: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let state = Rc::new(RefCell::new(Received { rounds: vec![0; n], ..Default::default() }));
    let all_in = Rc::new(Notify::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut cpu_mark = 0;
    let mut lines = commands.lines();
    answer("ready")?;
    while let Some(line) = lines.next_line().await.map_err(|e| FanoutError::io("stdin", e))? {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("connect") => {
                let started = Instant::now();
                let results: Vec<(usize, Result<TcpStream, FanoutError>)> = futures_util::stream::iter(0..n)
                    .map(|k| {
                        let source = cfg.sources[(k / cfg.per_source).min(cfg.sources.len() - 1)];
                        let (server, index) = (cfg.server, cfg.indices[k]);
                        async move {
                            let r =
                                tokio::time::timeout(OP_TIMEOUT, connect_one(server, source, index)).await;
                            (
                                k,
                                r.unwrap_or_else(|_| {
                                    Err(FanoutError::Timeout(format!("connect of device {index}")))
                                }),
                            )
                        }
                    })
                    .buffer_unordered(cfg.connect_in_flight.max(1))
                    .collect()
                    .await;
                let secs = started.elapsed().as_secs_f64();
                let (mut ok, mut failed, mut error) = (0, 0, None);
                for (k, r) in results {
                    match r {
                        Ok(s) => {
                            streams[k] = Some(s);
                            ok += 1;
                        }
                        Err(e) => {
                            failed += 1;
                            error.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
                answer(&format!(
                    "connected ok={ok} failed={failed} secs={secs:.4} error={}",
                    one_line(error.as_deref().unwrap_or("-"))
                ))?;
            }
            Some("subscribe") => {
                let started = Instant::now();
                let taken: Vec<(usize, TcpStream)> =
                    streams.iter_mut().enumerate().filter_map(|(k, s)| Some((k, s.take()?))).collect();
                let results: Vec<(usize, TcpStream, Result<(), FanoutError>)> =
                    futures_util::stream::iter(taken)
                        .map(|(k, mut s)| {
                            let index = cfg.indices[k];
                            async move {
                                let r = tokio::time::timeout(OP_TIMEOUT, subscribe_one(&mut s, index)).await;
                                (
                                    k,
                                    s,
                                    r.unwrap_or_else(|_| {
                                        Err(FanoutError::Timeout(format!("subscribe of device {index}")))
                                    }),
                                )
                            }
                        })
                        .buffer_unordered(SUBSCRIBE_IN_FLIGHT)
                        .collect()
                        .await;
                let secs = started.elapsed().as_secs_f64();
                let (mut ok, mut failed, mut error) = (0, 0, None);
                let buf_bytes = (cfg.payload_bytes + 256).next_power_of_two();
                for (k, s, r) in results {
                    match r {
                        Ok(()) => {
                            ok += 1;
                            tasks.push(tokio::task::spawn_local(receive(
                                k,
                                cfg.indices[k],
                                s,
                                buf_bytes,
                                state.clone(),
                                all_in.clone(),
                                stop_rx.clone(),
                            )));
                        }
                        Err(e) => {
                            failed += 1;
                            error.get_or_insert_with(|| e.to_string());
                            set_zero_linger(&s);
                        }
                    }
                }
                cpu_mark = super::procfs::cpu_us(std::process::id()).unwrap_or(0);
                answer(&format!(
                    "subscribed ok={ok} failed={failed} secs={secs:.4} error={}",
                    one_line(error.as_deref().unwrap_or("-"))
                ))?;
            }
            Some("collect") => {
                let round: usize = words.next().and_then(|w| w.parse().ok()).unwrap_or(1);
                let timeout_ms: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(60_000);
                let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
                state.borrow_mut().target = n * round;
                loop {
                    if state.borrow().total >= n * round {
                        break;
                    }
                    if tokio::time::timeout_at(deadline, all_in.notified()).await.is_err() {
                        break;
                    }
                }
                let cpu = super::procfs::cpu_us(std::process::id()).unwrap_or(0);
                let mut st = state.borrow_mut();
                let lat: Vec<String> = st.lat_us.drain(..).map(|l| l.to_string()).collect();
                answer(&format!(
                    "collected received={} dups={} bad={} closed={} last_ns={} cpu_us={} error={} lat_us={}",
                    st.received,
                    st.dups,
                    st.bad,
                    st.closed,
                    st.last_ns,
                    cpu.saturating_sub(cpu_mark),
                    one_line(st.first_error.as_deref().unwrap_or("-")),
                    lat.join(",")
                ))?;
                st.received = 0;
                cpu_mark = cpu;
            }
            Some("publish") => {
                let round: u32 = words.next().and_then(|w| w.parse().ok()).unwrap_or(1);
                let in_flight: usize = words.next().and_then(|w| w.parse().ok()).unwrap_or(256);
                let cpu0 = super::procfs::cpu_us(std::process::id()).unwrap_or(0);
                let taken: Vec<(usize, TcpStream)> =
                    streams.iter_mut().enumerate().filter_map(|(k, s)| Some((k, s.take()?))).collect();
                let payload_bytes = cfg.payload_bytes;
                let results: Vec<(usize, TcpStream, Published)> = futures_util::stream::iter(taken)
                    .map(|(k, mut s)| {
                        let index = cfg.indices[k];
                        async move {
                            let r = tokio::time::timeout(
                                OP_TIMEOUT,
                                publish_one(&mut s, index, round, payload_bytes),
                            )
                            .await;
                            (
                                k,
                                s,
                                r.unwrap_or_else(|_| {
                                    Err(FanoutError::Timeout(format!("PUBACK to device {index}")))
                                }),
                            )
                        }
                    })
                    .buffer_unordered(in_flight.max(1))
                    .collect()
                    .await;
                let (mut ok, mut failed, mut error) = (0, 0, None);
                let (mut first, mut last) = (u64::MAX, 0);
                for (k, s, r) in results {
                    match r {
                        Ok((sent, acked)) => {
                            ok += 1;
                            first = first.min(sent);
                            last = last.max(acked);
                            streams[k] = Some(s);
                        }
                        Err(e) => {
                            failed += 1;
                            error.get_or_insert_with(|| e.to_string());
                            set_zero_linger(&s);
                        }
                    }
                }
                let cpu = super::procfs::cpu_us(std::process::id()).unwrap_or(0);
                answer(&format!(
                    "published ok={ok} failed={failed} first_ns={} last_ns={last} cpu_us={} error={}",
                    if first == u64::MAX { 0 } else { first },
                    cpu.saturating_sub(cpu0),
                    one_line(error.as_deref().unwrap_or("-"))
                ))?;
            }
            Some("stop") | None => break,
            Some(other) => return Err(FanoutError::Protocol(format!("unknown command {other:?}"))),
        }
    }
    let _ = stop_tx.send(true);
    for s in streams.into_iter().flatten() {
        set_zero_linger(&s);
    }
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    answer("stopped")
}
