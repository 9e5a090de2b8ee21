//! Plain MQTT connections served without a task each (`--mqtt-plain-port`, the load-test
//! listener): a few driver tasks, one per core, each owning an epoll instance (`mio::Poll`,
//! edge-triggered), a slab of connections and a heap of their deadlines. A connection is its
//! socket, its [`Session`], its buffers while bytes are in flight and its deadlines: no task,
//! future, timer or reactor registration of its own. The in-process transport drives sessions
//! the same way (`simulated-devices/src/inprocess`).
//!
//! A driver wakes for its sockets (the epoll instance, itself registered with tokio's reactor),
//! for its links' hub events (one [`ReadySet`]: a C2D hand-over, a desired-properties patch, a
//! method call, a kick), for new connections from the accept loop, for its earliest deadline and
//! for the server's shutdown; it then serves every connection with something to do, in turns as
//! `connection::run` does: read what arrived, hand each packet to the session, take the hub's
//! events, write all the answers in one `send`. Deadlines are lazy: a read moves the
//! connection's keep-alive deadline without touching the heap; an entry that comes due early is
//! put back at the connection's current deadline.
//!
//! A C2D message handed over at send time does not wait for the driver: the sending thread
//! publishes it itself once it let go of the device's shard (`hub::link::DirectDelivery`), unless
//! the driver is serving that connection at the moment (the connection's lock is taken: each
//! connection is a [`Cell`]) or a write is backed up; then the driver is woken as for any event.
//! A driver the OS preempts in the middle of a pass then holds up only the PUBACKs of its
//! connections, not their deliveries.
//!
//! What it does not do itself: a CONNECT that does not open a hub session (a refusal's CONNACK,
//! a Device Provisioning Service registration) is handed to a task of its own on tokio's reactor
//! (`connection::serve_not_opened`), as is every plain connection of a hub that must wait
//! before answering (`--persist`'s journal, a `--tier`'s shaping): [`serves`] says which hubs the
//! drivers serve; `connection::serve` serves the rest, and every TLS connection.
//!
//! Owns: each driver's connections (sockets, sessions, buffers, deadlines), each locked by whoever
//! serves it (its driver, or a sender delivering). The hub owns the devices' state; the accept
//! loop owns the listener.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use mio::{Events, Interest, Poll, Registry, Token};
use rumqttc::mqttbytes::v4::Packet;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::connection::{self, Admit, Ended, NotOpened, ReadError};
use super::session::{Close, Session};
use crate::hub::Hub;
use crate::hub::link::{Attached, DirectDelivery, ReadyHook, ReadySet};
use crate::limits::MQTT_CONNECT_TIMEOUT_SECS;
use crate::metrics::{Protocol, Transport};
use crate::shutdown::Shutdown;

/// Drivers per runtime worker. A driver is one task: a worker the OS preempts in the middle of a
/// driver's pass holds up every connection of that driver, and the other worker cannot take the
/// pass over (as it steals connection tasks from a preempted worker); with several drivers per
/// worker it takes the others'. Before deliveries were written by their senders ([`Cell`]), 1
/// driver per worker left a fifth of the hand-overs waiting 10–50 ms, 8 gave p99 7–23 ms
/// (`fanout --servers hub-amqp-drivers`, 19,000 devices). With direct delivery 1 and 8 measured
/// the same CPU and latency, 1 connecting a fifth slower (bench/README.md).
pub const DRIVERS_PER_WORKER: usize = 8;
/// Socket events taken from the epoll instance at once.
const EVENTS: usize = 256;
/// Bytes one `recv` takes (into the driver's one scratch buffer, then copied into the
/// connection's read buffer).
const READ_CHUNK: usize = 16 * 1024;
/// `recv`s one connection gets per turn before the others have theirs; the rest waits for the
/// next pass of the loop.
const READS_PER_TURN: usize = 4;

/// Deadline entries one pass of the loop looks at (the rest wait for the next pass): a fleet
/// that connected at once comes due at once.
const EXPIRIES_PER_PASS: usize = 256;

/// Whether the drivers serve `hub`'s plain MQTT connections: not when a turn may have to wait
/// (the journal with `--persist`, a tier's shaping), which the drivers do not do.
pub fn serves(hub: &Hub) -> bool {
    hub.config().throttle.is_none() && !hub.is_persistent()
}

/// A new connection on its way to a driver.
type Incoming = (std::net::TcpStream, SocketAddr);

/// The accept loop's end: hands each accepted connection to a driver, in turn.
pub struct Drivers {
    to: Vec<mpsc::UnboundedSender<Incoming>>,
    next: usize,
}

impl Drivers {
    /// Starts `count` drivers (at least one) for `hub`'s plain MQTT connections; they end with
    /// `shutdown`, closing their connections (`tracker` tracks them and their hand-offs).
    pub fn start(
        hub: &Hub,
        count: usize,
        shutdown: &Shutdown,
        tracker: &TaskTracker,
    ) -> std::io::Result<Self> {
        // Every epoll instance first: a failure starts no driver (the caller falls back to a task
        // per connection).
        let polls = (0..count.max(1))
            .map(|_| {
                // SAFETY: `Poll` owns its epoll descriptor until it is dropped (with the `AsyncFd`)
                // and its `as_raw_fd` always returns that one.
                unsafe { AsyncFd::register_with_interest(Poll::new()?, tokio::io::Interest::READABLE) }
                    .map_err(std::io::Error::from)
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut to = Vec::new();
        for poll in polls {
            let (tx, rx) = mpsc::unbounded_channel();
            let driver = Driver {
                hub: hub.clone(),
                ready: ReadySet::new(),
                slots: Vec::new(),
                free: Vec::new(),
                deadlines: BinaryHeap::new(),
                again: Vec::new(),
                scratch: vec![0; READ_CHUNK].into_boxed_slice(),
                out: Vec::new(),
                write_timeout: hub.config().timeouts.write,
                shutdown: shutdown.clone(),
                tracker: tracker.clone(),
            };
            tracker.spawn(driver.run(poll, rx));
            to.push(tx);
        }
        Ok(Self { to, next: 0 })
    }

    /// Gives `stream` to the next driver.
    pub fn dispatch(&mut self, stream: tokio::net::TcpStream, peer: SocketAddr) {
        // Off tokio's reactor (the driver's epoll instance takes it), still non-blocking.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, "MQTT: cannot take the accepted socket: {e}");
                return;
            }
        };
        self.next = (self.next + 1) % self.to.len();
        // A driver only ends at shutdown; the connection then closes with it.
        let _ = self.to[self.next].send((stream, peer));
    }
}

/// One connection's slot: `epoch` tells a connection from the earlier ones that had the slot.
struct Slot {
    epoch: u32,
    cell: Option<Arc<Cell>>,
}

/// A connection, locked by whoever serves it: its driver, or the thread that sent it a C2D
/// message ([`DirectDelivery`], which only ever tries the lock). Empty once the connection ended.
/// Lock order: a connection, then the hub's shards (never the other way: a sender offers its
/// hand-over only once it let go of the device's shard).
struct Cell(Mutex<Option<Conn>>);

impl std::fmt::Debug for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mqtt::driver::Cell")
    }
}

impl Cell {
    fn lock(&self) -> MutexGuard<'_, Option<Conn>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl DirectDelivery for Cell {
    /// Publishes the handed-over message (and whatever else waits in the mailbox) from the
    /// sender's thread, unless the driver is serving the connection, a write is backed up, or it
    /// is ending: then its driver is woken, as without this.
    fn try_deliver(&self, hub: &Hub) -> bool {
        let Ok(mut guard) = self.0.try_lock() else { return false };
        let Some(conn) = guard.as_mut() else { return false };
        let State::Open(o) = &mut conn.state else { return false };
        if conn.written < conn.wbuf.len() || o.closing.is_some() || o.failed.is_some() {
            return false;
        }
        // The sending thread's packet list, kept between deliveries (one per message otherwise).
        thread_local! {
            static OUT: std::cell::RefCell<Vec<Packet>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let encoded = OUT.with(|out| {
            let mut fresh = Vec::new();
            let mut kept = out.try_borrow_mut();
            let out = kept.as_deref_mut().unwrap_or(&mut fresh);
            while let Some(event) = o.link.events.try_recv() {
                o.session.handle_event(hub, event, out);
            }
            let any = !out.is_empty();
            connection::encode_packets(&mut conn.wbuf, out).map(|()| any)
        });
        let written = match encoded {
            Ok(false) => return true,
            Ok(true) => flush(&conn.stream, &mut conn.wbuf, &mut conn.written),
            Err(e) => Err(e),
        };
        match written {
            Ok(done) => done,
            Err(e) => {
                // Ended by its driver, which owns the slot and the deadlines.
                o.failed = Some(e);
                false
            }
        }
    }
}

struct Conn {
    stream: mio::net::TcpStream,
    peer: SocketAddr,
    rbuf: BytesMut,
    /// Bytes not written yet: `wbuf[written..]`.
    wbuf: BytesMut,
    written: usize,
    /// Bytes may wait in the socket: an edge came and the socket was not read dry since.
    readable: bool,
    /// The time of this connection's live entry in the deadline heap (others are stale).
    queued_at: Instant,
    state: State,
}

// Every connection is allocated once at its full size (boxed in its slot): boxing `Open` would
// add an allocation to every CONNECT for the few bytes a connection waiting for one would save.
#[allow(clippy::large_enum_variant)]
enum State {
    /// Waiting for the CONNECT until the deadline.
    Connecting(Instant),
    Open(Open),
}

struct Open {
    session: Session,
    link: Attached,
    keep_alive: Duration,
    token_deadline: Instant,
    /// Keep-alive or token expiry, whichever comes first.
    silence: Instant,
    /// While a write waits for the socket: when it gives up (never after `silence`).
    write_deadline: Option<Instant>,
    /// A packet ended the session; it closes once the answers before it are written.
    closing: Option<Box<Close>>,
    /// A write from a sender's thread failed ([`Cell::try_deliver`]); the driver ends the session.
    failed: Option<std::io::Error>,
}

impl Conn {
    fn deadline(&self) -> Instant {
        match &self.state {
            State::Connecting(at) => *at,
            State::Open(o) => o.write_deadline.unwrap_or(o.silence),
        }
    }

    fn write_pending(&self) -> bool {
        self.written < self.wbuf.len()
    }

    /// Writes what is pending: `Ok(true)` once all of it went, `Ok(false)` when the socket is
    /// full (the rest goes at its next writable edge).
    fn flush(&mut self) -> std::io::Result<bool> {
        flush(&self.stream, &mut self.wbuf, &mut self.written)
    }

    /// Reads what arrived into the read buffer, at most [`READS_PER_TURN`] chunks: `Ok(true)` if
    /// more may be waiting.
    fn read(&mut self, scratch: &mut [u8]) -> Result<bool, ReadError> {
        for _ in 0..READS_PER_TURN {
            match (&self.stream).read(scratch) {
                Ok(0) => return Err(ReadError::Eof),
                Ok(n) => {
                    self.rbuf.extend_from_slice(&scratch[..n]);
                    if n < scratch.len() {
                        // A short read drained the socket: the next bytes bring a new edge.
                        self.readable = false;
                        return Ok(false);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(false);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        Ok(true)
    }
}

/// How a connection's turn ended.
enum Step {
    /// It waits for its socket, its link or its deadline.
    Wait,
    End(Ended),
    HandOff(Box<NotOpened>),
}

/// What woke a waiting driver.
enum Wake {
    Shutdown,
    Work,
    Incoming(Option<Incoming>),
    Failed(std::io::Error),
}

struct Driver {
    hub: Hub,
    ready: Arc<ReadySet>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// `(deadline, slot, epoch)`, earliest first; see [`Conn::queued_at`].
    deadlines: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    /// Connections whose turn ended with bytes left to read.
    again: Vec<u32>,
    scratch: Box<[u8]>,
    /// One turn's packets to send (emptied by every turn).
    out: Vec<Packet>,
    write_timeout: Duration,
    shutdown: Shutdown,
    tracker: TaskTracker,
}

fn token(slot: u32, epoch: u32) -> Token {
    Token((u64::from(epoch) << 32 | u64::from(slot)) as usize)
}

fn untoken(t: Token) -> (u32, u32) {
    let t = t.0 as u64;
    (t as u32, (t >> 32) as u32)
}

impl Driver {
    async fn run(mut self, poll: AsyncFd<Poll>, mut incoming: mpsc::UnboundedReceiver<Incoming>) {
        let mut poll = poll;
        let mut events = Events::with_capacity(EVENTS);
        let mut keys = Vec::new();
        let mut again = Vec::new();
        let shutdown = self.shutdown.clone();
        let mut stopped = pin!(shutdown.wait());
        let mut accepting = true;
        // The last look at the epoll instance filled `events` or was interrupted: look again
        // without waiting for an edge.
        let mut look_again = true;
        loop {
            let mut work = 0usize;
            while let Ok((stream, peer)) = incoming.try_recv() {
                self.add(poll.get_ref().registry(), stream, peer);
                work += 1;
            }
            // Hub events first (a C2D message handed over waits for nothing else), then the
            // sockets.
            self.ready.drain_into(&mut keys);
            for key in keys.drain(..) {
                self.on_link(poll.get_ref().registry(), key);
                work += 1;
            }
            // The epoll instance is read only when tokio saw it become readable since the last
            // look, or when that look filled `events` (more may wait): a pass woken by the hub
            // alone makes no system call for sockets that have nothing to say.
            let readable = match poll.readable().now_or_never() {
                Some(Ok(mut guard)) => {
                    // Cleared before the look below: an edge after this is a new one.
                    guard.clear_ready();
                    true
                }
                Some(Err(e)) => {
                    tracing::error!("MQTT driver: waiting on epoll failed, closing its connections: {e}");
                    break;
                }
                None => false,
            };
            events.clear();
            let mut interrupted = false;
            if readable || look_again {
                match poll.get_mut().poll(&mut events, Some(Duration::ZERO)) {
                    Ok(()) => {}
                    // The readiness is cleared and the look did not happen: the next pass looks.
                    Err(e) if e.kind() == ErrorKind::Interrupted => interrupted = true,
                    Err(e) => {
                        tracing::error!("MQTT driver: epoll failed, closing its connections: {e}");
                        break;
                    }
                }
            }
            look_again = interrupted || events.iter().count() == EVENTS;
            for ev in events.iter() {
                let (slot, epoch) = untoken(ev.token());
                let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                self.on_socket(poll.get_ref().registry(), slot, epoch, readable, ev.is_writable());
                work += 1;
            }
            std::mem::swap(&mut again, &mut self.again);
            for slot in again.drain(..) {
                let epoch = self.slots[slot as usize].epoch;
                self.on_socket(poll.get_ref().registry(), slot, epoch, false, false);
                work += 1;
            }
            work += self.expire(Instant::now());
            if self.shutdown.is_fired() {
                break;
            }
            if work > 0 || look_again {
                // Let the other tasks on this worker (a sender's connection, say) have their turn:
                // a driver with work after every pass would otherwise keep its worker to itself.
                tokio::task::yield_now().await;
                if look_again || !self.again.is_empty() {
                    continue;
                }
            }
            let next = self.deadlines.peek().map(|Reverse((at, ..))| *at);
            let wake = tokio::select! {
                biased;
                () = stopped.as_mut() => Wake::Shutdown,
                r = poll.readable() => match r {
                    // Left set: the pass clears it before it looks.
                    Ok(_) => Wake::Work,
                    Err(e) => Wake::Failed(e),
                },
                () = self.ready.wait() => Wake::Work,
                c = incoming.recv(), if accepting => Wake::Incoming(c),
                () = sleep_until(next) => Wake::Work,
            };
            match wake {
                Wake::Shutdown => break,
                Wake::Work => {}
                // The accept loop ended (the server is stopping): serve on until the shutdown.
                Wake::Incoming(None) => accepting = false,
                Wake::Incoming(Some((stream, peer))) => self.add(poll.get_ref().registry(), stream, peer),
                Wake::Failed(e) => {
                    tracing::error!("MQTT driver: waiting on epoll failed, closing its connections: {e}");
                    break;
                }
            }
        }
        self.close_all();
    }

    fn add(&mut self, registry: &Registry, stream: std::net::TcpStream, peer: SocketAddr) {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot { epoch: 0, cell: None });
                (self.slots.len() - 1) as u32
            }
        };
        let epoch = self.slots[slot as usize].epoch;
        let mut stream = mio::net::TcpStream::from_std(stream);
        if let Err(e) =
            registry.register(&mut stream, token(slot, epoch), Interest::READABLE | Interest::WRITABLE)
        {
            tracing::warn!(%peer, "MQTT: cannot watch the connection's socket, closing it: {e}");
            self.free.push(slot);
            return;
        }
        let at = Instant::now() + Duration::from_secs(MQTT_CONNECT_TIMEOUT_SECS);
        self.slots[slot as usize].cell = Some(Arc::new(Cell(Mutex::new(Some(Conn {
            stream,
            peer,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            written: 0,
            readable: false,
            queued_at: at,
            state: State::Connecting(at),
        })))));
        self.deadlines.push(Reverse((at, slot, epoch)));
    }

    /// The connection cell in `slot`, if it still holds the connection of `epoch`.
    fn cell(&self, slot: u32, epoch: u32) -> Option<Arc<Cell>> {
        let s = self.slots.get(slot as usize)?;
        if s.epoch != epoch {
            return None;
        }
        s.cell.clone()
    }

    /// Takes the connection out of its slot (the slot is free for the next one) and its cell.
    fn remove(&mut self, slot: u32) -> Option<Conn> {
        let s = &mut self.slots[slot as usize];
        let cell = s.cell.take()?;
        s.epoch = s.epoch.wrapping_add(1);
        self.free.push(slot);
        cell.lock().take()
    }

    fn on_socket(&mut self, registry: &Registry, slot: u32, epoch: u32, readable: bool, writable: bool) {
        let Some(cell) = self.cell(slot, epoch) else { return };
        let flushed = {
            let mut guard = cell.lock();
            let Some(conn) = guard.as_mut() else { return };
            conn.readable |= readable;
            if !(writable && conn.write_pending()) {
                Ok(true)
            } else {
                let r = conn.flush();
                if let (Ok(true), State::Open(o)) = (&r, &mut conn.state) {
                    o.write_deadline = None;
                }
                r
            }
        };
        match flushed {
            Ok(true) => self.turn(registry, slot),
            Ok(false) => {}
            Err(e) => self.end(slot, Ended::Write(e)),
        }
    }

    fn on_link(&mut self, registry: &Registry, key: u32) {
        let Some(Slot { cell: Some(cell), .. }) = self.slots.get(key as usize) else { return };
        {
            let guard = cell.lock();
            // A key of an earlier connection in this slot finds the current one's mailbox empty.
            let Some(Conn { state: State::Open(o), .. }) = guard.as_ref() else { return };
            // Looking now: whatever comes after this queues the key again.
            o.link.events.rearm();
        }
        self.turn(registry, key);
    }

    /// One turn of the connection in `slot` (see [`Driver::step`]).
    fn turn(&mut self, registry: &Registry, slot: u32) {
        let Some(cell) = self.slots[slot as usize].cell.clone() else { return };
        let step = {
            let mut guard = cell.lock();
            let Some(conn) = guard.as_mut() else { return };
            self.step(conn, slot, &cell)
        };
        match step {
            Step::Wait => {}
            Step::End(ended) => self.end(slot, ended),
            Step::HandOff(not_opened) => self.hand_off(registry, slot, *not_opened),
        }
    }

    /// Reads what arrived, hands the packets to the session (admitting the CONNECT first), takes
    /// the hub's events and writes the answers. Nothing happens while a write waits for the
    /// socket: the rest of the turn follows its writable edge.
    fn step(&mut self, conn: &mut Conn, slot: u32, cell: &Arc<Cell>) -> Step {
        if let State::Open(o) = &mut conn.state
            && let Some(e) = o.failed.take()
        {
            // A sender's write failed ([`Cell::try_deliver`]); whatever it left unwritten is lost.
            return Step::End(Ended::Write(e));
        }
        if conn.write_pending() {
            if let State::Open(o) = &mut conn.state
                && o.write_deadline.is_none()
            {
                // A sender's thread wrote part of a delivery ([`Cell::try_deliver`]): the rest
                // gets until the write timeout, as a write of the driver's own.
                let at = (Instant::now() + self.write_timeout).min(o.silence);
                o.write_deadline = Some(at);
                conn.queued_at = at;
                self.deadlines.push(Reverse((at, slot, self.slots[slot as usize].epoch)));
            }
            return Step::Wait;
        }
        if let State::Open(o) = &mut conn.state
            && let Some(close) = o.closing.take()
        {
            // Its answers are written: the session ends as the packet asked.
            return Step::End(Ended::Closed(*close));
        }
        let mut eof = None;
        if conn.readable {
            match conn.read(&mut self.scratch) {
                Ok(true) => self.again.push(slot),
                Ok(false) => {}
                Err(e) => eof = Some(e),
            }
            if let State::Open(o) = &mut conn.state
                && !conn.rbuf.is_empty()
            {
                o.silence = (Instant::now() + o.keep_alive).min(o.token_deadline);
            }
        }
        if let State::Connecting(_) = conn.state {
            let first = match connection::take_packet(&mut conn.rbuf) {
                Ok(Some(p)) => Ok(p),
                Ok(None) => match eof.take() {
                    Some(e) => Err(e),
                    None => return Step::Wait,
                },
                Err(e) => Err(e),
            };
            let ready = ReadyHook::with_direct(self.ready.clone(), slot, cell.clone());
            match connection::admit_counted(&self.hub, first, (conn.peer, Transport::Mqtt), None, Some(ready))
            {
                Admit::Open(opened) => {
                    self.hub.metrics().connection_moved(Transport::Mqtt, 1);
                    let silence = (Instant::now() + opened.keep_alive).min(opened.token_deadline);
                    conn.state = State::Open(Open {
                        session: opened.session,
                        link: opened.link,
                        keep_alive: opened.keep_alive,
                        token_deadline: opened.token_deadline,
                        silence,
                        write_deadline: None,
                        closing: None,
                        failed: None,
                    });
                    self.out.extend(opened.out);
                    // The keep-alive's entry replaces the CONNECT's (which is dropped when it
                    // comes due: re-queueing every connection 10 s after a fleet connected would
                    // stall the driver for that long).
                    conn.queued_at = silence;
                    let epoch = self.slots[slot as usize].epoch;
                    self.deadlines.push(Reverse((silence, slot, epoch)));
                }
                Admit::Not(not_opened) => return Step::HandOff(Box::new(not_opened)),
            }
        }
        let State::Open(o) = &mut conn.state else { return Step::Wait };
        let hub = &self.hub;
        loop {
            match connection::take_packet(&mut conn.rbuf) {
                Ok(Some(p)) => {
                    let op = super::session::operation(&p);
                    let _timer = crate::metrics::Timer::start(hub.metrics().latency(Protocol::Mqtt, op));
                    if let Err(close) = o.session.handle_packet(hub, p, &mut self.out) {
                        o.closing = Some(Box::new(close));
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.out.clear();
                    return Step::End(Ended::Read(e));
                }
            }
        }
        if o.closing.is_none() {
            if o.link.events.is_kicked() {
                self.out.clear();
                return Step::End(Ended::Kicked);
            }
            while let Some(event) = o.link.events.try_recv() {
                o.session.handle_event(hub, event, &mut self.out);
            }
        }
        if !self.out.is_empty() {
            if let Err(e) = connection::encode_packets(&mut conn.wbuf, &mut self.out) {
                self.out.clear();
                return Step::End(Ended::Write(e));
            }
            match flush(&conn.stream, &mut conn.wbuf, &mut conn.written) {
                Ok(true) => {}
                Ok(false) => {
                    // The device is slow to read: the write gets until the write timeout, within
                    // the keep-alive deadline.
                    let at = (Instant::now() + self.write_timeout).min(o.silence);
                    o.write_deadline = Some(at);
                    conn.queued_at = at;
                    let epoch = self.slots[slot as usize].epoch;
                    self.deadlines.push(Reverse((at, slot, epoch)));
                    return Step::Wait;
                }
                Err(e) => {
                    return Step::End(match o.closing.take() {
                        Some(close) => Ended::Closed(*close),
                        None => Ended::Write(e),
                    });
                }
            }
        }
        if let Some(close) = o.closing.take() {
            return Step::End(Ended::Closed(*close));
        }
        match eof {
            Some(e) => Step::End(Ended::Read(e)),
            None => Step::Wait,
        }
    }

    /// Serves what is due: connections past their deadline end; an entry that came due early (the
    /// connection was heard since) is put back at the connection's deadline. Returns how many
    /// entries it looked at.
    fn expire(&mut self, now: Instant) -> usize {
        let mut seen = 0;
        while let Some(&Reverse((at, slot, epoch))) = self.deadlines.peek() {
            if at > now || seen == EXPIRIES_PER_PASS {
                break;
            }
            self.deadlines.pop();
            seen += 1;
            let Some(cell) = self.cell(slot, epoch) else { continue };
            let ended = {
                let mut guard = cell.lock();
                let Some(conn) = guard.as_mut() else { continue };
                if conn.queued_at != at {
                    continue;
                }
                let due = conn.deadline();
                if due > now {
                    conn.queued_at = due;
                    self.deadlines.push(Reverse((due, slot, epoch)));
                    continue;
                }
                match &mut conn.state {
                    State::Connecting(_) => {
                        tracing::info!(peer = %conn.peer, "MQTT: no CONNECT within {MQTT_CONNECT_TIMEOUT_SECS} s; closing");
                        None
                    }
                    State::Open(o) => Some(match o.closing.take() {
                        Some(close) => Ended::Closed(*close),
                        None if now >= o.token_deadline => Ended::TokenExpired,
                        None if now >= o.silence => Ended::KeepAlive,
                        None => Ended::Write(std::io::Error::new(
                            ErrorKind::TimedOut,
                            "the device took no bytes in time",
                        )),
                    }),
                }
            };
            match ended {
                Some(ended) => self.end(slot, ended),
                None => drop(self.remove(slot)),
            }
        }
        seen
    }

    /// Ends the connection in `slot`: its session closes as `ended` says, its socket with it.
    fn end(&mut self, slot: u32, ended: Ended) {
        let Some(Conn { peer, state, .. }) = self.remove(slot) else { return };
        if let State::Open(o) = state {
            self.hub.metrics().connection_moved(Transport::Mqtt, -1);
            connection::end_session(&self.hub, o.session, &o.link.events, peer, &ended);
        }
    }

    /// Hands a connection whose CONNECT opened no hub session to a task of its own (a refusal's
    /// CONNACK, a provisioning session).
    fn hand_off(&mut self, registry: &Registry, slot: u32, not_opened: NotOpened) {
        let Some(Conn { mut stream, peer, mut rbuf, .. }) = self.remove(slot) else { return };
        if let NotOpened::Close = not_opened {
            return;
        }
        let _ = registry.deregister(&mut stream);
        let stream = std::net::TcpStream::from(stream);
        let (hub, shutdown) = (self.hub.clone(), self.shutdown.clone());
        self.tracker.spawn(async move {
            let mut stream = match tokio::net::TcpStream::from_std(stream) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, "MQTT: cannot serve the connection: {e}");
                    return;
                }
            };
            let mut wbuf = BytesMut::new();
            connection::serve_not_opened(&hub, &mut stream, not_opened, &mut rbuf, &mut wbuf, &shutdown)
                .await;
        });
    }

    /// The server is shutting down: every session ends without its Will (see `connection::serve`).
    fn close_all(&mut self) {
        for slot in 0..self.slots.len() as u32 {
            self.end(slot, Ended::Shutdown);
        }
    }
}

impl Drop for Driver {
    /// A driver dropped without [`Driver::close_all`] (its runtime went away) still empties its
    /// cells: an open connection's link holds its cell ([`ReadyHook::with_direct`]), which would
    /// otherwise keep both alive.
    fn drop(&mut self) {
        for cell in self.slots.iter().filter_map(|s| s.cell.as_ref()) {
            drop(cell.lock().take());
        }
    }
}

/// Writes `wbuf[*written..]` to `stream`: `Ok(true)` once all of it went (the buffer is then
/// emptied), `Ok(false)` when the socket is full.
fn flush(
    mut stream: &mio::net::TcpStream,
    wbuf: &mut BytesMut,
    written: &mut usize,
) -> std::io::Result<bool> {
    while *written < wbuf.len() {
        match stream.write(&wbuf[*written..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => *written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    connection::release_write_buffer(wbuf);
    *written = 0;
    Ok(true)
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_slot_and_epoch() {
        for (slot, epoch) in [(0, 0), (1, 0), (0, 1), (u32::MAX, u32::MAX), (19_000, 7)] {
            assert_eq!(untoken(token(slot, epoch)), (slot, epoch));
        }
    }

    /// A connection that sends no CONNECT is closed at the CONNECT deadline (hub time paused:
    /// the runtime jumps to the driver's next deadline once everything waits).
    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_connect_is_closed_at_the_connect_deadline() {
        use tokio::io::AsyncReadExt;

        let hub = Hub::new(Default::default());
        let (shutdown, tracker) = (Shutdown::new(), TaskTracker::new());
        let mut drivers = Drivers::start(&hub, 1, &shutdown, &tracker).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let started = Instant::now();
        drivers.dispatch(stream, peer);
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(60), client.read(&mut byte)).await;
        assert_eq!(read.expect("closed within a minute").unwrap(), 0, "closed without an answer");
        assert!(
            started.elapsed() >= Duration::from_secs(MQTT_CONNECT_TIMEOUT_SECS),
            "{:?}",
            started.elapsed()
        );
        shutdown.fire();
        tracker.close();
        tracker.wait().await;
    }

    /// Every connection is one boxed record (and a heap entry): keep it from growing unnoticed
    /// (the per-connection budget is 2 KiB in all; 0.93–0.97 KiB measured by `bench/fanout.sh
    /// --servers hub-amqp-drivers`, kernel socket buffers excluded).
    #[test]
    fn a_connection_record_stays_small() {
        let size = std::mem::size_of::<Conn>();
        assert!(size <= 384, "a driver's connection record grew to {size} bytes");
    }
}
