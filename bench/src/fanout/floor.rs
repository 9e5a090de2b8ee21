//! The floor broker (`fanout floor-serve`): the least work any MQTT server can do for the fan-out
//! bench, to measure what the kernel alone costs per delivered message on this machine.
//!
//! It owns nothing but a table of device id → socket and one buffer per connection. It answers
//! CONNECT and SUBSCRIBE without checking credentials, forwards each QoS 1 PUBLISH on
//! `devices/{id}/…` to the socket that subscribed for `{id}` (one `send` per message, as every
//! server must, since each device has its own socket), acknowledges a sender's PUBLISHes in one
//! write per read and drops the devices' PUBACKs. No topic tree, no queue, no session, no
//! retries: a lower bound, not a broker. One thread, `epoll` (level-triggered) or, with
//! `--uring`, io_uring with one submission per event-loop turn ([`serve_uring`]).
//!
//! The packet handling ([`Router`]) is sans-IO: it takes a connection's complete frames and says
//! what to write where; the loops around it only move bytes. It trusts its client (this bench):
//! it is a measuring instrument, never pointed at anything else, and listens on loopback only.

use std::collections::HashMap;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};

use super::codec::{self, CodecError, Packet};

/// Bytes one read may take.
const READ_BYTES: usize = 64 * 1024;

/// What one frame asks the loop to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing to send.
    None,
    /// The answer was appended to the connection's own reply buffer.
    Reply,
    /// Send the bytes in the forward buffer to this socket (a device's PUBLISH).
    Forward(RawFd),
    /// Close the connection.
    Close,
}

/// Device ids to sockets, and the packet ids used towards each device.
#[derive(Debug, Default)]
pub struct Router {
    subscribers: HashMap<Box<[u8]>, RawFd>,
    /// Per subscribed socket: its device id and the last packet id sent to it.
    by_fd: HashMap<RawFd, (Box<[u8]>, u16)>,
}

/// The id in `devices/{id}/…`.
fn device_of(topic: &[u8]) -> Option<&[u8]> {
    let rest = topic.strip_prefix(b"devices/")?;
    let end = rest.iter().position(|&b| b == b'/')?;
    Some(&rest[..end])
}

/// The first topic filter of a SUBSCRIBE body (after the packet id).
fn first_filter(body: &[u8]) -> Option<&[u8]> {
    let len = usize::from(u16::from_be_bytes([*body.get(2)?, *body.get(3)?]));
    body.get(4..4 + len)
}

impl Router {
    /// Handles one complete frame from `fd`: replies go to `reply`, a forwarded PUBLISH to `fwd`.
    pub fn handle(
        &mut self,
        fd: RawFd,
        frame: &[u8],
        reply: &mut Vec<u8>,
        fwd: &mut Vec<u8>,
    ) -> Result<Action, CodecError> {
        let first = frame[0];
        let body_at = frame.iter().skip(1).position(|b| b & 0x80 == 0).map_or(frame.len(), |i| i + 2);
        let body = frame.get(body_at..).ok_or(CodecError::Malformed("header"))?;
        match first >> 4 {
            1 => reply.extend_from_slice(&[0x20, 2, 0, 0]),
            8 => {
                let filter = first_filter(body).ok_or(CodecError::Malformed("SUBSCRIBE"))?;
                if let Some(id) = device_of(filter) {
                    self.subscribers.insert(id.into(), fd);
                    self.by_fd.insert(fd, (id.into(), 0));
                }
                reply.extend_from_slice(&[0x90, 3, body[0], body[1], 1]);
            }
            3 => {
                let Packet::Publish { qos, pkid, topic, payload, .. } = codec::decode(frame)? else {
                    return Err(CodecError::Malformed("PUBLISH"));
                };
                if qos == 1 {
                    reply.extend_from_slice(&codec::puback(pkid));
                }
                if let Some(&to) = device_of(topic).and_then(|id| self.subscribers.get(id)) {
                    let next = &mut self.by_fd.get_mut(&to).expect("subscribed socket").1;
                    *next = next.checked_add(1).unwrap_or(1);
                    codec::publish(fwd, 1, *next, topic, payload);
                    return Ok(Action::Forward(to));
                }
                return Ok(if qos == 1 { Action::Reply } else { Action::None });
            }
            4 => return Ok(Action::None),
            12 => reply.extend_from_slice(&[0xD0, 0]),
            14 => return Ok(Action::Close),
            _ => return Err(CodecError::Malformed("unexpected packet")),
        }
        Ok(Action::Reply)
    }

    /// Forgets a closed socket.
    pub fn closed(&mut self, fd: RawFd) {
        if let Some((id, _)) = self.by_fd.remove(&fd)
            && self.subscribers.get(&id) == Some(&fd)
        {
            self.subscribers.remove(&id);
        }
    }
}

/// One connection's bytes.
#[derive(Debug, Default)]
struct Conn {
    /// The start of a packet the last read ended in.
    partial: Vec<u8>,
    /// Bytes a short write left over, sent when the socket is writable.
    pending: Vec<u8>,
}

/// The epoll loop's buffers, shared by every connection.
#[derive(Debug, Default)]
struct Buffers {
    scratch: Vec<u8>,
    reply: Vec<u8>,
    fwd: Vec<u8>,
}

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as usize) }
}

fn epoll_ctl(ep: RawFd, op: i32, fd: RawFd, events: u32) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: fd as u64 };
    // SAFETY: `ev` lives across the call; `ep` and `fd` are open descriptors this loop owns.
    cvt(unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } as isize).map(drop)
}

fn send(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: `bytes` is a live slice; `fd` is a socket this loop owns.
    cvt(unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) })
}

/// Routes the complete frames at the start of `bytes`, read from `fd`: each forward goes out
/// through `send` as it comes, then `fd`'s own answers in one piece. Returns how many bytes it
/// consumed, or `None` when the connection is to be closed (DISCONNECT, or bytes that are not
/// MQTT).
fn route(
    router: &mut Router,
    fd: RawFd,
    bytes: &[u8],
    reply: &mut Vec<u8>,
    fwd: &mut Vec<u8>,
    mut send: impl FnMut(RawFd, &[u8]) -> io::Result<()>,
) -> io::Result<Option<usize>> {
    let mut at = 0;
    reply.clear();
    while let Some(frame) = match codec::frame_len(&bytes[at..]) {
        Ok(f) => f,
        Err(_) => return Ok(None),
    } {
        fwd.clear();
        let action = router.handle(fd, &bytes[at..at + frame], reply, fwd);
        at += frame;
        match action {
            Ok(Action::Forward(to)) => send(to, fwd)?,
            Ok(Action::None | Action::Reply) => {}
            Ok(Action::Close) | Err(_) => return Ok(None),
        }
    }
    if !reply.is_empty() {
        send(fd, reply)?;
    }
    Ok(Some(at))
}

/// The epoll loop: accepts on `listener`, serves until the process is signalled.
pub fn serve_epoll(listener: TcpListener) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let lfd = listener.as_raw_fd();
    // SAFETY: creates a descriptor this function owns for the process's life.
    let ep = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) } as isize)? as RawFd;
    epoll_ctl(ep, libc::EPOLL_CTL_ADD, lfd, libc::EPOLLIN as u32)?;
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut router = Router::default();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut bufs = Buffers::default();
    loop {
        // SAFETY: `events` has room for the count passed.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in &events[..n as usize] {
            let (fd, flags) = (ev.u64 as RawFd, ev.events);
            if fd == lfd {
                accept_all(&listener, ep, &mut conns);
                continue;
            }
            if flags & libc::EPOLLOUT as u32 != 0 {
                // Closed earlier in this batch of events: nothing to send.
                let Some(c) = conns.get_mut(fd as usize).and_then(Option::as_mut) else { continue };
                match send(fd, &c.pending) {
                    Ok(k) => {
                        c.pending.drain(..k);
                        if c.pending.is_empty() {
                            epoll_ctl(ep, libc::EPOLL_CTL_MOD, fd, libc::EPOLLIN as u32)?;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => close(ep, fd, &mut conns, &mut router),
                }
            }
            if flags & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
                && conns.get(fd as usize).is_some_and(Option::is_some)
            {
                readable(ep, fd, &mut conns, &mut router, &mut bufs)?;
            }
        }
    }
}

fn accept_all(listener: &TcpListener, ep: RawFd, conns: &mut Vec<Option<Conn>>) {
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                let _ = s.set_nonblocking(true);
                let fd = std::os::fd::IntoRawFd::into_raw_fd(s);
                if conns.len() <= fd as usize {
                    conns.resize_with(fd as usize + 1, || None);
                }
                conns[fd as usize] = Some(Conn::default());
                if epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32).is_err() {
                    conns[fd as usize] = None;
                    // SAFETY: `fd` was just accepted and is owned here.
                    unsafe { libc::close(fd) };
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and the like: the listener stays registered and is tried again.
                eprintln!("floor-serve: accept: {e}");
                return;
            }
        }
    }
}

fn close(ep: RawFd, fd: RawFd, conns: &mut [Option<Conn>], router: &mut Router) {
    let _ = epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, 0);
    conns[fd as usize] = None;
    router.closed(fd);
    // SAFETY: `fd` is owned by this loop and forgotten above.
    unsafe { libc::close(fd) };
}

/// Sends `bytes` to `to`, or queues them behind what is already waiting there.
fn deliver(ep: RawFd, to: RawFd, bytes: &[u8], conns: &mut [Option<Conn>]) -> io::Result<()> {
    let Some(c) = conns.get_mut(to as usize).and_then(Option::as_mut) else { return Ok(()) };
    let sent = if c.pending.is_empty() {
        match send(to, bytes) {
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(_) => bytes.len(), // the peer is gone; its read will see it and close
        }
    } else {
        0
    };
    if sent < bytes.len() {
        if c.pending.is_empty() {
            epoll_ctl(ep, libc::EPOLL_CTL_MOD, to, (libc::EPOLLIN | libc::EPOLLOUT) as u32)?;
        }
        c.pending.extend_from_slice(&bytes[sent..]);
    }
    Ok(())
}

fn readable(
    ep: RawFd,
    fd: RawFd,
    conns: &mut [Option<Conn>],
    router: &mut Router,
    bufs: &mut Buffers,
) -> io::Result<()> {
    let Buffers { scratch, reply, fwd } = bufs;
    // Reads go through one buffer shared by all connections; a connection keeps only the part of
    // a packet a read ended in (so an idle one holds no buffer).
    let c = conns[fd as usize].as_mut().expect("registered connection");
    let keep = c.partial.len();
    if scratch.len() < keep + READ_BYTES {
        scratch.resize(keep + READ_BYTES, 0);
    }
    scratch[..keep].copy_from_slice(&c.partial);
    // SAFETY: reads into the shared buffer past the kept bytes, within its length.
    let n = unsafe { libc::recv(fd, scratch[keep..].as_mut_ptr().cast(), scratch.len() - keep, 0) };
    match n {
        0 => {
            close(ep, fd, conns, router);
            return Ok(());
        }
        n if n < 0 => {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                close(ep, fd, conns, router);
            }
            return Ok(());
        }
        _ => {}
    }
    let len = keep + n as usize;
    let Some(at) = route(router, fd, &scratch[..len], reply, fwd, |to, bytes| deliver(ep, to, bytes, conns))?
    else {
        close(ep, fd, conns, router);
        return Ok(());
    };
    if let Some(c) = conns[fd as usize].as_mut() {
        if at == len {
            c.partial = Vec::new();
        } else {
            c.partial.clear();
            c.partial.extend_from_slice(&scratch[at..len]);
        }
    }
    Ok(())
}

/// What an io_uring completion was for (the low byte of its user data; the rest is the socket).
const OP_ACCEPT: u64 = 1;
const OP_RECV: u64 = 2;
const OP_SEND: u64 = 3;
/// A connection's receive buffer over io_uring (each connection has a receive in flight).
const URING_READ_BYTES: usize = 2048;

/// One connection over io_uring: a receive always in flight into `buf`, at most one send in flight
/// (`sending`, untouched until it completes, so sends to a socket keep their order), the rest
/// waiting in `pending`.
#[derive(Debug, Default)]
struct UConn {
    buf: Vec<u8>,
    len: usize,
    sending: Vec<u8>,
    sent: usize,
    pending: Vec<u8>,
    /// The peer closed; the socket is closed once no operation is in flight.
    closing: bool,
    recv_in_flight: bool,
}

/// Queues `sqe`, submitting what is queued first when the submission queue is full.
fn push(ring: &mut io_uring::IoUring, sqe: &io_uring::squeue::Entry) -> io::Result<()> {
    loop {
        // SAFETY: every buffer an entry points into belongs to a connection that is kept (and
        // not written to) until the entry's completion is taken.
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

fn arm_recv(ring: &mut io_uring::IoUring, fd: RawFd, c: &mut UConn) -> io::Result<()> {
    if c.buf.len() - c.len < 256 {
        c.buf.resize((c.buf.len() * 2).max(URING_READ_BYTES), 0);
    }
    let spare = &mut c.buf[c.len..];
    let sqe = io_uring::opcode::Recv::new(io_uring::types::Fd(fd), spare.as_mut_ptr(), spare.len() as u32)
        .build()
        .user_data((fd as u64) << 8 | OP_RECV);
    c.recv_in_flight = true;
    push(ring, &sqe)
}

fn arm_send(ring: &mut io_uring::IoUring, fd: RawFd, c: &mut UConn) -> io::Result<()> {
    let rest = &c.sending[c.sent..];
    let sqe = io_uring::opcode::Send::new(io_uring::types::Fd(fd), rest.as_ptr(), rest.len() as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data((fd as u64) << 8 | OP_SEND);
    push(ring, &sqe)
}

/// Queues `bytes` for `to`: sent now if nothing is in flight there, else after what is.
fn uring_deliver(
    ring: &mut io_uring::IoUring,
    to: RawFd,
    bytes: &[u8],
    conns: &mut [Option<UConn>],
) -> io::Result<()> {
    let Some(c) = conns.get_mut(to as usize).and_then(Option::as_mut) else { return Ok(()) };
    if c.closing {
        return Ok(());
    }
    if c.sending.is_empty() {
        c.sending.extend_from_slice(bytes);
        c.sent = 0;
        arm_send(ring, to, c)
    } else {
        c.pending.extend_from_slice(bytes);
        Ok(())
    }
}

/// Closes `fd` once nothing is in flight on it.
fn uring_maybe_close(fd: RawFd, conns: &mut [Option<UConn>], router: &mut Router) {
    let done =
        conns[fd as usize].as_ref().is_some_and(|c| c.closing && !c.recv_in_flight && c.sending.is_empty());
    if done {
        conns[fd as usize] = None;
        router.closed(fd);
        // SAFETY: no operation is in flight on `fd`, which this loop owns.
        unsafe { libc::close(fd) };
    }
}

/// The io_uring loop: the same work as [`serve_epoll`], but every receive, send and accept is an
/// io_uring operation, and all the operations one batch of completions starts go to the kernel
/// in one `io_uring_enter`, which also waits for the next completions.
pub fn serve_uring(listener: TcpListener) -> io::Result<()> {
    let lfd = listener.as_raw_fd();
    let mut ring = io_uring::IoUring::builder().setup_cqsize(65_536).build(4096)?;
    let accept = io_uring::opcode::AcceptMulti::new(io_uring::types::Fd(lfd))
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data((lfd as u64) << 8 | OP_ACCEPT);
    push(&mut ring, &accept)?;
    let mut conns: Vec<Option<UConn>> = Vec::new();
    let mut router = Router::default();
    let (mut reply, mut fwd) = (Vec::new(), Vec::new());
    let mut done: Vec<(u64, i32, u32)> = Vec::with_capacity(4096);
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        done.clear();
        done.extend(ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
        for &(ud, res, flags) in &done {
            let (fd, op) = ((ud >> 8) as RawFd, ud & 0xff);
            match op {
                OP_ACCEPT => {
                    if res >= 0 {
                        let s = res as RawFd;
                        let one: libc::c_int = 1;
                        // SAFETY: sets an option on the socket just accepted, from a live value.
                        unsafe {
                            libc::setsockopt(
                                s,
                                libc::IPPROTO_TCP,
                                libc::TCP_NODELAY,
                                (&one as *const libc::c_int).cast(),
                                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                            )
                        };
                        if conns.len() <= s as usize {
                            conns.resize_with(s as usize + 1, || None);
                        }
                        let c = conns[s as usize].insert(UConn::default());
                        arm_recv(&mut ring, s, c)?;
                    } else {
                        eprintln!("floor-serve: accept: {}", io::Error::from_raw_os_error(-res));
                    }
                    if !io_uring::cqueue::more(flags) {
                        push(&mut ring, &accept)?;
                    }
                }
                OP_RECV => {
                    let c = conns[fd as usize].as_mut().expect("connection with a receive in flight");
                    c.recv_in_flight = false;
                    if res <= 0 {
                        c.closing = true;
                        uring_maybe_close(fd, &mut conns, &mut router);
                        continue;
                    }
                    c.len += res as usize;
                    let mut buf = std::mem::take(&mut c.buf);
                    let len = c.len;
                    let routed = route(&mut router, fd, &buf[..len], &mut reply, &mut fwd, |to, bytes| {
                        uring_deliver(&mut ring, to, bytes, &mut conns)
                    })?;
                    let (at, close_it) = routed.map_or((len, true), |at| (at, false));
                    buf.copy_within(at..len, 0);
                    let c = conns[fd as usize].as_mut().expect("connection being read");
                    c.buf = buf;
                    c.len = len - at;
                    if close_it {
                        c.closing = true;
                        uring_maybe_close(fd, &mut conns, &mut router);
                    } else {
                        arm_recv(&mut ring, fd, c)?;
                    }
                }
                OP_SEND => {
                    let c = conns[fd as usize].as_mut().expect("connection with a send in flight");
                    if res < 0 {
                        c.sending.clear();
                        c.pending.clear();
                        c.closing = true;
                    } else {
                        c.sent += res as usize;
                        if c.sent == c.sending.len() {
                            c.sending.clear();
                            c.sent = 0;
                            if !c.pending.is_empty() && !c.closing {
                                std::mem::swap(&mut c.sending, &mut c.pending);
                            }
                        }
                        if !c.sending.is_empty() {
                            arm_send(&mut ring, fd, c)?;
                        }
                    }
                    uring_maybe_close(fd, &mut conns, &mut router);
                }
                _ => unreachable!("user data this loop did not set"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(bytes: &[u8]) -> Vec<u8> {
        bytes.to_vec()
    }

    #[test]
    fn forwards_a_publish_to_the_device_that_subscribed_and_acks_the_sender() {
        let mut r = Router::default();
        let (mut reply, mut fwd) = (Vec::new(), Vec::new());
        let mut connect = Vec::new();
        codec::connect(&mut connect, "d1", "u", "p", 60, true);
        assert_eq!(r.handle(7, &connect, &mut reply, &mut fwd), Ok(Action::Reply));
        assert_eq!(reply, [0x20, 2, 0, 0]);
        reply.clear();
        let mut sub = Vec::new();
        codec::subscribe(&mut sub, 9, "devices/d1/messages/devicebound/#", 1);
        assert_eq!(r.handle(7, &sub, &mut reply, &mut fwd), Ok(Action::Reply));
        assert_eq!(reply, [0x90, 3, 0, 9, 1]);
        reply.clear();
        let mut publish = Vec::new();
        codec::publish(&mut publish, 1, 300, b"devices/d1/messages/devicebound/x", b"hello");
        assert_eq!(r.handle(3, &publish, &mut reply, &mut fwd), Ok(Action::Forward(7)));
        assert_eq!(reply, codec::puback(300));
        match codec::decode(&fwd).unwrap() {
            Packet::Publish { qos: 1, pkid: 1, topic, payload, .. } => {
                assert_eq!(topic, b"devices/d1/messages/devicebound/x");
                assert_eq!(payload, b"hello");
            }
            other => panic!("forwarded {other:?}"),
        }
        // A device nobody subscribed for: acknowledged, not forwarded.
        reply.clear();
        fwd.clear();
        let mut stray = Vec::new();
        codec::publish(&mut stray, 1, 301, b"devices/d2/messages/devicebound/x", b"x");
        assert_eq!(r.handle(3, &stray, &mut reply, &mut fwd), Ok(Action::Reply));
        assert!(fwd.is_empty());
        // Closing forgets the subscription.
        r.closed(7);
        reply.clear();
        assert_eq!(r.handle(3, &publish, &mut reply, &mut fwd), Ok(Action::Reply));
        assert_eq!(r.handle(7, &frame(&codec::puback(1)), &mut reply, &mut fwd), Ok(Action::None));
        assert_eq!(r.handle(7, &frame(&codec::DISCONNECT), &mut reply, &mut fwd), Ok(Action::Close));
    }

    #[test]
    fn a_subscribe_without_a_filter_is_refused() {
        let mut r = Router::default();
        let (mut reply, mut fwd) = (Vec::new(), Vec::new());
        assert!(r.handle(1, &[0x82, 2, 0, 1], &mut reply, &mut fwd).is_err());
    }
}
