//! The socket side of one MQTT connection: frames packets with the `rumqttc` v4 codec (after the
//! checks the codec skips, in [`super::wire`]), runs the CONNECT exchange, then feeds packets and
//! hub link events to the [`Session`] and writes what it returns. Owns the connection's buffers and
//! its deadlines (keep-alive or token expiry, whichever comes first, and a write deadline: the
//! hub's `timeouts.write`, capped by the keep-alive deadline); closes when the device disconnects,
//! breaks the contract, goes silent, stops reading, its token expires, a newer connection of the
//! same device takes over, or the hub shuts down;
//! every end but DISCONNECT and hub shutdown records the device's Will (see [`Session::close`]).
//! With a tier configured, requests the session shaped (the CONNECT itself included: its CONNACK
//! waits for its turn) hold the connection until their turn.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rumqttc::mqttbytes::Error as CodecError;
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet, PubAck};

use crate::metrics::{Operation, Protocol, RefusalReason, Transport};
use crate::shutdown::Shutdown;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::hub::Hub;
use crate::limits::{MQTT_CONNECT_TIMEOUT_SECS, MQTT_MAX_PACKET_BYTES};

use super::session::{Close, Session, accept_connect_tls};
use super::wire::{self, Violation};

/// Least the read buffer is grown by when a partial packet fills it.
const IDLE_BUFFER_BYTES: usize = 256;
/// Most the read buffer is grown ahead of the bytes received.
const RESERVE_AHEAD_BYTES: usize = 16 * 1024;
/// What one read takes into the stack when the connection holds no read buffer (see [`fill`]).
pub(super) const STACK_READ_BYTES: usize = 4096;
/// Bytes a packet's fixed header, packet id and topic length take at most (a hint, not a bound).
const PACKET_OVERHEAD_BYTES: usize = 8;
/// Write-buffer capacity kept between writes: a CONNACK, SUBACK, PUBACK or PINGRESP fits. A larger
/// write (a C2D PUBLISH) grows it for that write only, so an idle device does not keep the largest
/// packet it was ever sent (244 B per device after a fan-out, measured by `bench/examples/fanout_alloc.rs`).
const IDLE_WRITE_BUFFER_BYTES: usize = 64;

/// Why reading the next packet failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the peer closed the connection")]
    Eof,
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed packet: {0}")]
    Codec(CodecError),
    #[error(transparent)]
    Violation(#[from] Violation),
}

/// Takes one complete packet out of `buf`, if it holds one. `Ok(None)` means "read more". The
/// packet's bytes are checked against what the codec does not enforce ([`wire`]) before it decodes
/// them, and what it decoded after.
pub fn take_packet(buf: &mut BytesMut) -> Result<Option<Packet>, ReadError> {
    if buf.is_empty() {
        // Everything read was taken. Nothing to reserve for: the next read goes through the stack
        // (see `fill`). Reserving here cost every turn of the loop an allocation it then freed;
        // the empty buffer is let go instead, which also drops its share of the allocation the
        // taken packets were read into (an idle connection keeps no buffer).
        *buf = BytesMut::new();
        return Ok(None);
    }
    if let [0x40, 0x02, hi, lo, ..] = buf[..] {
        // A PUBACK (one a C2D message): what the codec and the checks below read from these four
        // bytes, without them.
        buf.advance(4);
        return Ok(Some(Packet::PubAck(PubAck::new(u16::from_be_bytes([hi, lo])))));
    }
    if let Some(len) = wire::complete_frame_len(buf)?
        && len <= MQTT_MAX_PACKET_BYTES
    {
        wire::check_frame(&buf[..len])?;
    }
    match Packet::read(buf, MQTT_MAX_PACKET_BYTES) {
        Ok(p) => {
            wire::check_decoded(&p)?;
            Ok(Some(p))
        }
        Err(CodecError::InsufficientBytes(n)) => {
            // Reserve for what is missing, but never more than 16 KiB ahead of the bytes that
            // actually arrived: a header announcing 270 KB must not buy 270 KB from a peer that
            // sent 4 bytes (found by the mqtt_packet fuzz target). The buffer grows as data comes.
            buf.reserve(n.clamp(IDLE_BUFFER_BYTES, RESERVE_AHEAD_BYTES));
            Ok(None)
        }
        Err(e) => Err(ReadError::Codec(e)),
    }
}

/// Reads what the peer sent into `buf`. An empty buffer holds no allocation while the connection
/// waits (an idle device costs no read buffer): the bytes are read into the stack and copied into
/// a buffer of their own size. A partial packet is read on into `buf` itself.
pub(crate) async fn fill_buf<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<(), ReadError> {
    fill(stream, buf).await
}

async fn fill<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut BytesMut) -> Result<(), ReadError> {
    let n = if buf.capacity() == 0 {
        std::future::poll_fn(|cx| {
            // Uninitialised: zeroing 4 KiB for every read of a 4-byte PUBACK showed in profiles.
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); STACK_READ_BYTES];
            let mut chunk = ReadBuf::uninit(&mut chunk);
            ready!(Pin::new(&mut *stream).poll_read(cx, &mut chunk))?;
            buf.extend_from_slice(chunk.filled());
            Poll::Ready(Ok::<_, std::io::Error>(chunk.filled().len()))
        })
        .await?
    } else {
        if buf.capacity() == buf.len() {
            buf.reserve(IDLE_BUFFER_BYTES);
        }
        stream.read_buf(buf).await?
    };
    match n {
        0 => Err(ReadError::Eof),
        _ => Ok(()),
    }
}

async fn read_packet<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut BytesMut) -> Result<Packet, ReadError> {
    loop {
        if let Some(p) = take_packet(buf)? {
            return Ok(p);
        }
        fill(stream, buf).await?;
    }
}

/// About the bytes `packets` encode to: publishes by their topic and payload, anything else as a
/// small fixed-size packet. A hint for one reservation before encoding.
fn encoded_size_hint(packets: &[Packet]) -> usize {
    packets
        .iter()
        .map(|p| match p {
            Packet::Publish(p) => p.topic.len() + p.payload.len() + PACKET_OVERHEAD_BYTES,
            _ => PACKET_OVERHEAD_BYTES,
        })
        .sum()
}

/// Encodes `packets` onto `buf` and empties the list (keeping its allocation).
pub(super) fn encode_packets(buf: &mut BytesMut, packets: &mut Vec<Packet>) -> std::io::Result<()> {
    // One allocation that fits the turn instead of the codec growing the buffer a few times (a
    // turn of small acknowledgements fits the kept buffer and allocates nothing).
    buf.reserve(encoded_size_hint(packets));
    for p in packets.drain(..) {
        p.write(buf, usize::MAX).map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    Ok(())
}

/// Gives back a write buffer's allocation once everything in it was written, unless it is small
/// (see [`IDLE_WRITE_BUFFER_BYTES`]).
pub(super) fn release_write_buffer(buf: &mut BytesMut) {
    buf.clear();
    if buf.capacity() > IDLE_WRITE_BUFFER_BYTES {
        *buf = BytesMut::new();
    }
}

/// Writes `buf[*done..]` and flushes (a TLS stream sends its records on flush), advancing `done`.
fn poll_drain<S: AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &[u8],
    done: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<()>> {
    while *done < buf.len() {
        match ready!(Pin::new(&mut *stream).poll_write(cx, &buf[*done..]))? {
            0 => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            n => *done += n,
        }
    }
    Pin::new(&mut *stream).poll_flush(cx)
}

/// Encodes `packets` (all that are ready: one write for them all) and writes them, giving up at
/// `deadline()` (called only when the socket cannot take everything at once): a device that stops
/// reading must not hold the connection (and its in-flight C2D messages) past it. `timer` is the
/// connection's one timer; it is set to the write deadline only while a write waits, and put back.
async fn write_packets<S: AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    packets: &mut Vec<Packet>,
    mut timer: Pin<&mut Sleep>,
    deadline: impl FnOnce(Instant) -> Instant,
) -> std::io::Result<()> {
    if packets.is_empty() {
        return Ok(());
    }
    encode_packets(buf, packets)?;
    // An idle connection keeps no packet list (144 B a packet, kept for the connection's life
    // otherwise): one allocation per turn that has something to send.
    *packets = Vec::new();
    let mut done = 0;
    // The common case: the socket takes it all now, and no timer is touched.
    let first = std::future::poll_fn(|cx| Poll::Ready(poll_drain(stream, buf, &mut done, cx))).await;
    let result = match first {
        Poll::Ready(r) => r,
        Poll::Pending => {
            let silence = timer.deadline();
            timer.as_mut().reset(deadline(silence));
            let r = tokio::select! {
                biased;
                r = std::future::poll_fn(|cx| poll_drain(stream, buf, &mut done, cx)) => r,
                () = timer.as_mut() => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the device took no bytes in time",
                )),
            };
            timer.as_mut().reset(silence);
            r
        }
    };
    release_write_buffer(buf);
    result
}

/// Serves one MQTT connection until it ends.
///
/// Each idle connection is one boxed instance of this future, so it is kept small: the CONNECT
/// exchange ([`open`]) and the connected loop ([`run`]) are separate futures that share its
/// storage, the connection has one timer (the keep-alive/token deadline, moved to a write's
/// deadline only while a write waits) and one shutdown waiter, and no read buffer while idle.
/// `client_cert` is the chain the TLS client presented (X.509 devices); it is dropped once the
/// CONNECT is decided.
///
/// A plain function returning an `async move` block rather than an `async fn`: an `async fn`
/// moves its arguments into locals of its own, and the generator keeps both copies (80 B of
/// every connection's future here).
#[allow(clippy::manual_async_fn)]
pub fn serve<S>(
    hub: Hub,
    mut stream: S,
    peer: SocketAddr,
    client_cert: Option<std::sync::Arc<crate::x509::ClientChain>>,
    transport: Transport,
    shutdown: Shutdown,
) -> impl std::future::Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async move {
        let mut rbuf = BytesMut::new();
        let mut wbuf = BytesMut::new();
        let write_timeout = hub.config().timeouts.write;
        let Some(Opened { mut session, link, keep_alive, token_deadline, mut out }) =
            open(&hub, &mut stream, (&mut rbuf, &mut wbuf), (peer, transport), client_cert, &shutdown).await
        else {
            return;
        };
        // Counted open until `run` returns (a shutdown ends it too): explicit calls rather than a drop
        // guard, whose reference would grow every connection's future.
        hub.metrics().connection_moved(transport, 1);
        let ended = run(
            &hub,
            &mut session,
            &mut stream,
            &link,
            &mut out,
            Deadlines { keep_alive, token_deadline, write: write_timeout },
            &shutdown,
            (&mut rbuf, &mut wbuf),
        )
        .await;
        hub.metrics().connection_moved(transport, -1);
        end_session(&hub, session, &link.events, peer, &ended);
    }
}

/// Ends a connected session for `ended`: logs why, and records the device's Will unless the
/// device disconnected or the hub shuts down (see [`Session::close`]).
pub(super) fn end_session(
    hub: &Hub,
    mut session: Session,
    link: &crate::hub::link::LinkReceiver,
    peer: SocketAddr,
    ended: &Ended,
) {
    match ended {
        Ended::Closed(Close::ClientDisconnect) => {
            tracing::debug!(%peer, device = %session.device_id(), "MQTT device disconnected")
        }
        Ended::Closed(reason) => {
            tracing::info!(%peer, device = %session.device_id(), "MQTT connection closed: {reason}")
        }
        other => tracing::info!(%peer, device = %session.device_id(), "MQTT connection closed: {other}"),
    }
    // Every end but DISCONNECT (which already discarded it) records the Will — MQTT 3.1.1
    // §3.1.2.5: I/O error, keep-alive lapse, protocol error, token expiry, replacement by a new
    // connection — except the hub's own shutdown: the emulator going away is not the device
    // going offline, and nobody is left to read the telemetry.
    if matches!(ended, Ended::Shutdown) {
        session.discard_will();
    }
    session.close(hub, link);
}

/// A connection past its CONNECT: what [`run`] needs.
pub(super) struct Opened {
    pub(super) session: Session,
    pub(super) link: crate::hub::link::Attached,
    pub(super) keep_alive: Duration,
    pub(super) token_deadline: Instant,
    /// The CONNACK and whatever the session had to send at once.
    pub(super) out: Vec<Packet>,
}

/// What to do with the first packet.
// Returned once per connection and moved on at once, never stored: boxing `Open` would only add
// an allocation to every CONNECT.
#[allow(clippy::large_enum_variant)]
pub(super) enum Admit {
    Open(Opened),
    Not(NotOpened),
}

/// A first packet that does not open a hub session.
// Moved on at once, never stored.
#[allow(clippy::large_enum_variant)]
pub(super) enum NotOpened {
    /// Answer with this CONNACK, then close (`shutdown`: close the write side first).
    Refuse {
        code: ConnectReturnCode,
        shutdown: bool,
    },
    Close,
    /// A Device Provisioning Service connection (see [`crate::dps::mqtt`]).
    Dps(crate::dps::mqtt::DpsSession, Packet, u16),
}

/// The CONNECT exchange: reads the first packet (within [`MQTT_CONNECT_TIMEOUT_SECS`]), admits it
/// or answers the refusal. `None` when the connection is over.
async fn open<S>(
    hub: &Hub,
    stream: &mut S,
    (rbuf, wbuf): (&mut BytesMut, &mut BytesMut),
    (peer, transport): (SocketAddr, Transport),
    client_cert: Option<std::sync::Arc<crate::x509::ClientChain>>,
    shutdown: &Shutdown,
) -> Option<Opened>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let first = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(MQTT_CONNECT_TIMEOUT_SECS), read_packet(stream, rbuf)) => r,
        _ = shutdown.wait() => return None,
    };
    let Ok(first) = first else {
        tracing::info!(%peer, "MQTT: no CONNECT within {MQTT_CONNECT_TIMEOUT_SECS} s; closing");
        return None;
    };
    // Decided without an await in between, so neither the CONNECT nor the session being built is
    // kept in this future's state.
    let not_opened = match admit_counted(hub, first, (peer, transport), client_cert.as_deref(), None) {
        Admit::Open(opened) => return Some(opened),
        Admit::Not(n) => n,
    };
    // Boxed: refusals and provisioning connections are rare next to hub connections, and their
    // state would otherwise enlarge every connection's future.
    Box::pin(serve_not_opened(hub, stream, not_opened, rbuf, wbuf, shutdown)).await;
    None
}

/// Serves a connection whose first packet did not open a hub session: a refusal's CONNACK, or a
/// Device Provisioning Service session.
pub(super) async fn serve_not_opened<S>(
    hub: &Hub,
    stream: &mut S,
    not_opened: NotOpened,
    rbuf: &mut BytesMut,
    wbuf: &mut BytesMut,
    shutdown: &Shutdown,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match not_opened {
        NotOpened::Close => {}
        NotOpened::Refuse { code, shutdown } => {
            refuse(stream, wbuf, code, shutdown, hub.config().timeouts.write).await
        }
        NotOpened::Dps(session, connack, keep_alive) => {
            crate::dps::mqtt::serve(hub.clone(), stream, session, keep_alive, connack, rbuf, shutdown).await
        }
    }
}

/// Sends a refusing CONNACK and, with `close_write`, shuts the write side, all within `within`.
async fn refuse<S: AsyncWrite + Unpin>(
    stream: &mut S,
    wbuf: &mut BytesMut,
    code: ConnectReturnCode,
    close_write: bool,
    within: Duration,
) {
    let mut out = vec![Packet::ConnAck(ConnAck::new(code, false))];
    let deadline = Instant::now() + within;
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer);
    let _ = write_packets(stream, wbuf, &mut out, timer.as_mut(), |_| deadline).await;
    if close_write {
        let _ = tokio::time::timeout_at(deadline, stream.shutdown()).await;
    }
}

/// [`admit`], timed and with a refusal counted in the metrics. A plain function returning the
/// decision, so `open` matches on a temporary: nothing of the decision stays in its future while
/// a provisioning session is served (which would enlarge every connection's future).
pub(super) fn admit_counted(
    hub: &Hub,
    first: Result<Packet, ReadError>,
    (peer, transport): (SocketAddr, Transport),
    client_cert: Option<&crate::x509::ClientChain>,
    ready: Option<crate::hub::link::ReadyHook>,
) -> Admit {
    let _timer = crate::metrics::Timer::start(hub.metrics().latency(Protocol::Mqtt, Operation::Connect));
    let admitted = admit(hub, first, peer, client_cert, ready);
    if let Admit::Not(NotOpened::Refuse { code, .. }) = &admitted {
        hub.metrics().connection_refused(transport, refusal_reason(*code));
    }
    admitted
}

/// The metrics' reason for a refusing CONNACK code.
fn refusal_reason(code: ConnectReturnCode) -> RefusalReason {
    match code {
        ConnectReturnCode::RefusedProtocolVersion => RefusalReason::UnsupportedProtocolVersion,
        ConnectReturnCode::BadClientId => RefusalReason::BadClientId,
        ConnectReturnCode::BadUserNamePassword => RefusalReason::BadUsernamePassword,
        ConnectReturnCode::NotAuthorized => RefusalReason::NotAuthorized,
        ConnectReturnCode::ServiceUnavailable => RefusalReason::Throttled,
        _ => RefusalReason::Other,
    }
}

fn admit(
    hub: &Hub,
    first: Result<Packet, ReadError>,
    peer: SocketAddr,
    client_cert: Option<&crate::x509::ClientChain>,
    ready: Option<crate::hub::link::ReadyHook>,
) -> Admit {
    let close = Admit::Not(NotOpened::Close);
    let connect = match first {
        Ok(Packet::Connect(c)) => c,
        Ok(other) => {
            tracing::info!(%peer, "MQTT: the first packet must be CONNECT, got {other:?}; closing");
            return close;
        }
        Err(ReadError::Codec(e @ (CodecError::InvalidProtocol | CodecError::InvalidProtocolLevel(_)))) => {
            tracing::info!(%peer, "MQTT CONNECT refused (unacceptable protocol version): {e}");
            return Admit::Not(NotOpened::Refuse {
                code: ConnectReturnCode::RefusedProtocolVersion,
                shutdown: false,
            });
        }
        Err(ReadError::Violation(v)) => {
            tracing::info!(%peer, "MQTT CONNECT refused, closing without CONNACK: {v}");
            return close;
        }
        Err(e) => {
            tracing::debug!(%peer, "MQTT connection ended before CONNECT: {e}");
            return close;
        }
    };
    if let Some(reg) = connect
        .login
        .as_ref()
        .and_then(|l| crate::dps::mqtt::registration_of(&l.username, hub.dps().id_scope()))
    {
        return match crate::dps::mqtt::accept(hub, &connect, reg, client_cert) {
            Ok((session, connack)) => {
                tracing::debug!(%peer, registration = reg, "DPS MQTT device connected");
                Admit::Not(NotOpened::Dps(session, connack, connect.keep_alive))
            }
            Err((code, reason)) => {
                tracing::info!(%peer, registration = reg, ?code, "DPS MQTT CONNECT refused: {reason}");
                Admit::Not(NotOpened::Refuse { code, shutdown: true })
            }
        };
    }
    let accepted = match accept_connect_tls(hub, &connect, ready, client_cert) {
        Ok(a) => a,
        Err(refused) => {
            tracing::info!(%peer, client_id = %connect.client_id, code = ?refused.code, "MQTT CONNECT refused: {}", refused.reason);
            return Admit::Not(NotOpened::Refuse { code: refused.code, shutdown: true });
        }
    };
    tracing::debug!(%peer, device = %connect.client_id, clean = connect.clean_session, "MQTT device connected");
    let mut session = accepted.session;
    let token_left_ms = (accepted.token_expiry_secs * 1000).saturating_sub(hub.wall_now());
    let mut out = vec![accepted.connack];
    session.start(hub, &mut out);
    Admit::Open(Opened {
        session,
        link: accepted.link,
        keep_alive: Duration::from_secs(accepted.keep_alive_secs),
        token_deadline: Instant::now() + Duration::from_millis(token_left_ms),
        out,
    })
}

/// Holds the connection until hub time `at_ms` (shaped requests' turn): `false` if the hub shut
/// down meanwhile.
async fn hold(hub: &Hub, at_ms: crate::clock::Millis, shutdown: &Shutdown) -> bool {
    tokio::select! {
        _ = hub.sleep_until(at_ms) => true,
        _ = shutdown.wait() => false,
    }
}

struct Deadlines {
    keep_alive: Duration,
    token_deadline: Instant,
    /// A write must finish within this (and before the keep-alive deadline).
    write: Duration,
}

/// Why a connected session ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum Ended {
    #[error(transparent)]
    Closed(Close),
    #[error("{0}")]
    Read(ReadError),
    #[error("write failed: {0}")]
    Write(std::io::Error),
    #[error("404104 DeviceConnectionClosedRemotely: no packet within 1.5 × the keep-alive")]
    KeepAlive,
    #[error("401003 IotHubUnauthorized: the device's SAS token expired")]
    TokenExpired,
    #[error("400027 ConnectionForcefullyClosedOnNewConnection (or the device was deleted)")]
    Kicked,
    #[error("the hub is shutting down")]
    Shutdown,
}

/// The connected loop. A plain function returning an `async move` block, as [`serve`] is, so
/// its arguments are not kept twice in the future.
#[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
fn run<'a, S>(
    hub: &'a Hub,
    session: &'a mut Session,
    stream: &'a mut S,
    link: &'a crate::hub::link::Attached,
    out: &'a mut Vec<Packet>,
    deadlines: Deadlines,
    shutdown: &'a Shutdown,
    (rbuf, wbuf): (&'a mut BytesMut, &'a mut BytesMut),
) -> impl std::future::Future<Output = Ended> + 'a
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async move {
        let deadline_for = |last: Instant| (last + deadlines.keep_alive).min(deadlines.token_deadline);
        let silence = tokio::time::sleep_until(deadline_for(Instant::now()));
        tokio::pin!(silence);
        // One waiter on the server's shutdown for the connection's life (registered once, not at
        // every turn of the loop; polling it reads one flag, see `crate::shutdown`).
        let cancelled = shutdown.wait();
        tokio::pin!(cancelled);
        // Writes end at the write timeout or at the keep-alive/token deadline, whichever is first: a
        // device that stops reading is gone, as one that stops sending is.
        let write_deadline = |silence: Instant| (Instant::now() + deadlines.write).min(silence);
        loop {
            // A packet that ends the connection still gets what the session answered before it. The
            // one write below serves both cases: a second await point would be a second slot for a
            // write in this future, which every connection carries.
            let mut closing = None;
            loop {
                match take_packet(rbuf) {
                    Ok(Some(p)) => {
                        let op = super::session::operation(&p);
                        let _timer = crate::metrics::Timer::start(hub.metrics().latency(Protocol::Mqtt, op));
                        if let Err(close) = session.handle_packet(hub, p, out) {
                            // Boxed: kept across the write below, and rare.
                            closing = Some(Box::new(close));
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Ended::Read(e),
                }
            }
            // With --persist: the answers to what this turn changed (a reported-properties patch, a
            // C2D settlement) go out once its records are written. Boxed: rare next to the idle
            // connection's state, which must stay small.
            let ticket = hub.take_durability_ticket();
            if ticket.is_some() && Box::pin(hub.durable(ticket)).await.is_err() {
                return Ended::Write(std::io::Error::other("the state journal failed"));
            }
            if closing.is_none()
                && let Some(at_ms) = session.take_hold()
            {
                // Tier throttling: the answers go out, and reading resumes, at the requests' turn.
                if !Box::pin(hold(hub, at_ms, shutdown)).await {
                    return Ended::Shutdown;
                }
                silence.as_mut().reset(deadline_for(Instant::now()));
            }
            if rbuf.is_empty() && rbuf.capacity() > 0 {
                // Read everything: give the buffer back while waiting (see `fill`).
                *rbuf = BytesMut::new();
            }
            let written = write_packets(stream, wbuf, out, silence.as_mut(), write_deadline).await;
            if let Some(close) = closing {
                return Ended::Closed(*close);
            }
            if let Err(e) = written {
                if Instant::now() >= silence.deadline() {
                    return if Instant::now() >= deadlines.token_deadline {
                        Ended::TokenExpired
                    } else {
                        Ended::KeepAlive
                    };
                }
                return Ended::Write(e);
            }
            tokio::select! {
                r = fill(stream, rbuf) => {
                    if let Err(e) = r {
                        return Ended::Read(e);
                    }
                    silence.as_mut().reset(deadline_for(Instant::now()));
                }
                event = link.events.recv() => match event {
                    Some(event) => {
                        session.handle_event(hub, event, out);
                        // Whatever else is already waiting goes out in the same write.
                        while let Some(event) = link.events.try_recv() {
                            session.handle_event(hub, event, out);
                        }
                    }
                    None => return Ended::Kicked,
                },
                () = silence.as_mut() => {
                    return if Instant::now() >= deadlines.token_deadline { Ended::TokenExpired } else { Ended::KeepAlive };
                }
                () = cancelled.as_mut() => return Ended::Shutdown,
            }
        }
    }
}
#[cfg(test)]
mod tests {
    #[test]
    fn one_reservation_fits_a_turn_of_publishes_and_acks() {
        use rumqttc::mqttbytes::QoS;
        use rumqttc::mqttbytes::v4::{PubAck, Publish};

        use super::{BytesMut, PACKET_OVERHEAD_BYTES, Packet, encoded_size_hint};
        let topic = "devices/fanout-000001/messages/devicebound/%24.to=%2Fdevices%2Ffanout-000001%2Fmessages%2FdeviceBound&iothub-ack=none";
        let mut p = Publish::new(topic, QoS::AtLeastOnce, vec![7u8; 32]);
        p.pkid = 300;
        let packets = vec![Packet::Publish(p.clone()), Packet::PubAck(PubAck::new(9)), Packet::Publish(p)];
        let hint = encoded_size_hint(&packets);
        let mut buf = BytesMut::new();
        for p in packets {
            p.write(&mut buf, usize::MAX).unwrap();
        }
        assert!(hint >= buf.len(), "hint {hint} < {} encoded", buf.len());
        assert!(hint <= buf.len() + 3 * PACKET_OVERHEAD_BYTES, "hint {hint} is close to {}", buf.len());
    }

    #[test]
    fn pubacks_are_taken_as_the_codec_reads_them() {
        use rumqttc::mqttbytes::v4::PubAck;

        use super::{BytesMut, MQTT_MAX_PACKET_BYTES, Packet, take_packet};
        let mut wire = BytesMut::new();
        for p in [Packet::PubAck(PubAck::new(1)), Packet::PubAck(PubAck::new(0xfffe)), Packet::PingReq] {
            p.write(&mut wire, usize::MAX).unwrap();
        }
        let mut taken = Vec::new();
        let mut buf = wire.clone();
        while let Some(p) = take_packet(&mut buf).unwrap() {
            taken.push(p);
        }
        let mut read = Vec::new();
        let mut buf = wire.clone();
        while !buf.is_empty() {
            read.push(Packet::read(&mut buf, MQTT_MAX_PACKET_BYTES).unwrap());
        }
        assert_eq!(taken, read);
        assert_eq!(taken[1], Packet::PubAck(PubAck::new(0xfffe)));
        // Three bytes of a PUBACK wait for the fourth; flags on one are refused as before.
        let mut partial = BytesMut::from(&[0x40, 0x02, 0x00][..]);
        assert!(take_packet(&mut partial).unwrap().is_none());
        assert_eq!(partial.len(), 3);
        let mut flagged = BytesMut::from(&[0x41, 0x02, 0x00, 0x01][..]);
        assert!(take_packet(&mut flagged).is_err());
    }

    /// Each idle connection costs one boxed `serve` future; keep it from growing unnoticed (the
    /// per-connection budget is 2 KiB in all, measured by `examples/mqtt_idle.rs` and
    /// `bench/fanout.sh`; the future was 2,248 B before the CONNECT exchange and the connected
    /// loop shared its storage and the connection kept one write and one timer, 1,136 B after;
    /// 896 B once `serve` and `run` stopped keeping their arguments twice and a closing reason
    /// was boxed; 904 B later, 864 B once the shutdown wait became `crate::shutdown::Wait`).
    #[tokio::test]
    async fn the_connection_future_stays_small() {
        let hub = crate::hub::Hub::new(Default::default());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let f = super::serve(
            hub,
            s,
            "127.0.0.1:1".parse().unwrap(),
            None,
            super::Transport::Mqtt,
            Default::default(),
        );
        let size = std::mem::size_of_val(&f);
        assert!(size <= 928, "the plain MQTT connection future grew to {size} bytes");
    }

    /// Tier throttling of new connections: with the bucket's burst and backlog spent, a CONNECT
    /// whose credentials verify gets CONNACK 0x03 (server unavailable); a forged one still gets
    /// 0x05 and spends nothing.
    #[tokio::test]
    async fn a_connect_past_the_backlog_gets_server_unavailable() {
        use std::sync::Arc;

        use rumqttc::mqttbytes::v4::Connect;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        use crate::hub::{DeviceInput, HubConfig};
        use crate::throttle::{Admission, Op, Sku, Tier};

        const T0: u64 = 1_700_000_000_000;
        let tier = Tier::new(Sku::S1, 1).unwrap();
        let clock = crate::clock::ManualClock::new(T0);
        let hub = crate::hub::Hub::with_clock(
            HubConfig { throttle: Some(tier), ..HubConfig::default() },
            Arc::new(clock),
        );
        hub.put_device("d1", DeviceInput::default(), None).unwrap();
        let key = hub.device_primary_key("d1").unwrap().unwrap();
        while !matches!(hub.admit(Op::DeviceConnect, 1), Admission::Refused(_)) {}
        let refused_before =
            hub.throttle_stats()["operations"]["deviceConnections"]["refused"].as_u64().unwrap();
        let connack = |password: String| {
            let hub = hub.clone();
            async move {
                let (mut client, server) = tokio::io::duplex(4096);
                let task = tokio::spawn(super::serve(
                    hub,
                    server,
                    "127.0.0.1:1".parse().unwrap(),
                    None,
                    super::Transport::Mqtt,
                    Default::default(),
                ));
                let mut c = Connect::new("d1");
                c.set_login("localhost/d1/?api-version=2021-04-12", password);
                let mut bytes = bytes::BytesMut::new();
                c.write(&mut bytes).unwrap();
                client.write_all(&bytes).await.unwrap();
                let mut reply = [0u8; 4];
                client.read_exact(&mut reply).await.unwrap();
                task.await.unwrap();
                reply
            }
        };
        let forged =
            connack("SharedAccessSignature sr=localhost%2Fdevices%2Fd1&sig=x&se=9999999999".into()).await;
        assert_eq!(forged, [0x20, 2, 0, 5], "not authorized, not throttled");
        let token = crate::sas::make_token("localhost/devices/d1", &key, None, T0 / 1000 + 3600).unwrap();
        assert_eq!(connack(token).await, [0x20, 2, 0, 3], "server unavailable");
        let refused = hub.throttle_stats()["operations"]["deviceConnections"]["refused"].as_u64().unwrap();
        assert_eq!(refused, refused_before + 1, "only the verified CONNECT was counted");
    }
}
