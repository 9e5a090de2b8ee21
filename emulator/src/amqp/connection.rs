//! The link engine of the AMQP endpoint, sans-IO: protocol headers (SASL or bare), SASL,
//! open/begin/attach/flow/transfer/disposition/detach/end/close, and the link bookkeeping (credit,
//! session windows, multi-frame deliveries, settlement).
//!
//! [`Connection::receive`] takes bytes from the socket and [`Connection::take_output`] hands back
//! the bytes to write; nothing here touches a socket, reads a wall clock or spawns a task, so every
//! behaviour is unit-tested by feeding frames. What a link *means* lives in its node
//! (`super::nodes`, one file per node): the engine opens the node at attach, hands it complete
//! incoming messages, pulls outgoing deliveries from it only while the link has credit and the
//! session window has room, routes replies to the session's reply link, and tells it about
//! settlements and the link's end. The engine never looks at an address itself.
//!
//! Owned state: one [`Connection`] per socket owns its sessions, their links (each with its
//! node's per-link state) and the connection's authorization; the hub owns every message. Tracked
//! deliveries (feedback batches) stay with the node until the peer settles them; a detach, end,
//! close or dropped connection gives them back through the node.

use std::collections::BTreeMap;

use super::frame::{
    self, AMQP_HEADER, FRAME_AMQP, FRAME_SASL, Fields, Frame, FrameError, SASL_HEADER, Transfer, code, list,
};
use super::message::Message;
use super::nodes::{self, AttachRequest, Auth, Ctx, Node, Outcome, Outgoing, Refusal, Settled, Wake};
use super::types::Value;
use super::{
    LINK_CREDIT, MAX_BUFFERED_DELIVERY_BYTES, MAX_FRAME_BYTES, MAX_LINKS_PER_SESSION, MAX_MESSAGE_BYTES,
    MAX_SESSIONS, MAX_UNSETTLED_DELIVERIES, SESSION_WINDOW,
};
use crate::clock::Millis;
use crate::hub::Hub;

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first protocol header.
    Header,
    /// SASL header exchanged; waiting for sasl-init.
    Sasl,
    /// SASL done; waiting for the AMQP header.
    AmqpHeader,
    /// Waiting for the peer's open.
    Open,
    /// Open: sessions and links may come and go.
    Opened,
    /// Closed (by either side); the driver flushes the output and drops the socket.
    Closed,
}

/// A protocol violation: closes the connection with this AMQP error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnError {
    /// The AMQP error condition.
    pub condition: &'static str,
    /// What was wrong.
    pub description: String,
}

impl ConnError {
    fn new(condition: &'static str, description: impl Into<String>) -> Self {
        Self { condition, description: description.into() }
    }
}

impl From<FrameError> for ConnError {
    fn from(e: FrameError) -> Self {
        let condition = match e {
            FrameError::Size { .. } => "amqp:connection:framing-error",
            _ => "amqp:decode-error",
        };
        Self::new(condition, e.to_string())
    }
}

impl From<super::types::DecodeError> for ConnError {
    fn from(e: super::types::DecodeError) -> Self {
        Self::new("amqp:decode-error", e.to_string())
    }
}

/// A delivery being received over several transfer frames.
#[derive(Debug)]
struct Partial {
    delivery_id: u32,
    settled: bool,
    bytes: Vec<u8>,
    /// Past [`MAX_MESSAGE_BYTES`]: the rest is discarded and the delivery rejected.
    oversized: bool,
}

/// One attached link. Local handles equal the peer's handles (unique per session).
#[derive(Debug)]
struct Link {
    name: String,
    /// What the link means: the node's per-link state.
    node: Box<dyn Node>,
    /// True when the peer sends on this link (we are the receiver).
    peer_sends: bool,
    /// The sender's delivery-count as we know it.
    delivery_count: u32,
    /// Receiver links: credit left of what we granted. Sender links: credit the peer gave.
    credit: u32,
    /// Sender links: the peer asked to settle on send (snd-settle-mode `settled`).
    presettled: bool,
    partial: Option<Partial>,
}

#[derive(Debug, Default)]
struct Session {
    next_outgoing_id: u32,
    next_incoming_id: u32,
    /// Transfers we may still receive before re-announcing our window.
    incoming_window: u32,
    /// Transfers the peer is ready to receive from us.
    remote_incoming_window: u32,
    next_delivery_id: u32,
    links: BTreeMap<u32, Link>,
    /// Tracked deliveries awaiting the peer's disposition: delivery id → (handle, node token).
    unsettled: BTreeMap<u32, (u32, u128)>,
}

impl Session {
    fn unsettled_room(&self) -> usize {
        MAX_UNSETTLED_DELIVERIES.saturating_sub(self.unsettled.len())
    }

    /// Removes the tracked deliveries of link `handle`, returning their tokens.
    fn take_unsettled(&mut self, handle: u32) -> Vec<u128> {
        let ids: Vec<u32> =
            self.unsettled.iter().filter(|(_, (h, _))| *h == handle).map(|(id, _)| *id).collect();
        ids.iter().filter_map(|id| self.unsettled.remove(id)).map(|(_, t)| t).collect()
    }
}

/// One AMQP connection of the endpoint.
#[derive(Debug)]
pub struct Connection {
    hub: Hub,
    phase: Phase,
    input: Vec<u8>,
    output: Vec<u8>,
    peer_max_frame: u32,
    peer_idle_timeout_ms: Option<u32>,
    sessions: BTreeMap<u16, Session>,
    /// What the CBS tokens (or the SASL PLAIN password) put on the connection allow.
    auth: Auth,
    /// Why the connection closed, when we closed it over an error.
    close_reason: Option<ConnError>,
    /// Tier throttling: hub time until which shaped C2D sends hold the connection (the driver
    /// neither writes their dispositions nor reads more before it). Always `None` without a tier.
    hold_until: Option<Millis>,
    /// A C2D message was queued since the driver last looked (see [`Connection::take_sent_c2d`]).
    sent_c2d: bool,
}

/// What a connection's driver waits on (see [`Connection::wakes`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wakes {
    /// Wait on the hub's notifier.
    pub hub: bool,
    /// Wait on the event log's notifier.
    pub events: bool,
    /// Wake at this hub time even without a notification.
    pub at: Option<Millis>,
}

/// Builds the [`Ctx`] a node is called with from the connection's fields (disjoint borrows).
macro_rules! ctx {
    ($self:ident, $room:expr) => {
        Ctx {
            hub: &$self.hub,
            auth: &mut $self.auth,
            hold_until: &mut $self.hold_until,
            sent_c2d: &mut $self.sent_c2d,
            unsettled_room: $room,
        }
    };
}

impl Connection {
    /// A connection waiting for its protocol header.
    pub fn new(hub: Hub) -> Self {
        Self {
            hub,
            phase: Phase::Header,
            input: Vec::new(),
            output: Vec::new(),
            peer_max_frame: frame::MIN_MAX_FRAME_SIZE,
            peer_idle_timeout_ms: None,
            sessions: BTreeMap::new(),
            auth: Auth::default(),
            close_reason: None,
            hold_until: None,
            sent_c2d: false,
        }
    }

    /// Whether C2D messages were queued since the last call: the driver then lets the device
    /// connections it woke run before it settles the sends and reads more (see
    /// `server::serve_connection`).
    pub fn take_sent_c2d(&mut self) -> bool {
        std::mem::take(&mut self.sent_c2d)
    }

    /// Takes the hold shaped C2D sends put on the connection: the hub time until which the driver
    /// should neither write the output nor read more (see `nodes::devicebound`).
    pub fn take_hold(&mut self) -> Option<Millis> {
        self.hold_until.take()
    }

    /// Feeds bytes read from the socket; replies accumulate in the output.
    pub fn receive(&mut self, bytes: &[u8]) {
        if self.phase == Phase::Closed {
            return;
        }
        self.input.extend_from_slice(bytes);
        if let Err(e) = self.process() {
            self.fail(e);
        }
    }

    /// Bytes to write to the socket (drained).
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Swaps the bytes to write into `buf` (cleared first), giving the connection `buf`'s
    /// allocation for its next output: a driver that writes and swaps back reuses two buffers
    /// instead of growing a new one for every batch of replies.
    pub fn swap_output(&mut self, buf: &mut Vec<u8>) {
        buf.clear();
        std::mem::swap(&mut self.output, buf);
    }

    /// True once the connection is closed; flush the output, then drop the socket.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The error we closed the connection with, if any.
    pub fn close_reason(&self) -> Option<&ConnError> {
        self.close_reason.as_ref()
    }

    /// True once the peer's `open` arrived (the driver's open deadline no longer applies).
    pub fn is_open(&self) -> bool {
        self.phase == Phase::Opened
    }

    /// The idle-time-out this side announces in its `open` (the hub's `timeouts.amqp_idle`): the
    /// driver closes a connection silent for twice as long.
    pub fn idle_timeout_ms(&self) -> u32 {
        u32::try_from(self.hub.config().timeouts.amqp_idle.as_millis()).unwrap_or(u32::MAX)
    }

    /// Closes the connection with `condition` because the driver's deadline passed (open not done
    /// in time, or the peer went silent past the idle-time-out).
    pub fn time_out(&mut self, condition: &'static str, description: impl Into<String>) {
        if self.phase != Phase::Closed {
            self.fail(ConnError::new(condition, description));
        }
    }

    /// The peer's idle-time-out: send a frame at least this often (the driver sends heartbeats at
    /// half of it).
    pub fn peer_idle_timeout_ms(&self) -> Option<u32> {
        self.peer_idle_timeout_ms
    }

    /// What the driver should wait on besides the socket: the hub's notifier, the event log's,
    /// and the earliest hub time a link may have something to send without a notification (the
    /// next feedback batch cut). Only links that could send (credit, session window, unsettled
    /// room) or that must notice an eviction count, so a driver never spins on a delivery it
    /// could not send.
    pub fn wakes(&mut self) -> Wakes {
        let mut wakes = Wakes::default();
        for session in self.sessions.values() {
            let ctx = ctx!(self, session.unsettled_room());
            for link in session.links.values().filter(|l| !l.peer_sends) {
                let can_send = link.credit > 0 && session.remote_incoming_window > 0;
                if !can_send && !link.node.watches() {
                    continue;
                }
                match link.node.wants_wake(&ctx) {
                    Wake::Never => continue,
                    Wake::OnHubChange => wakes.hub = true,
                    Wake::OnEvents => wakes.events = true,
                }
                if let Some(t) = link.node.wake_at(&ctx) {
                    wakes.at = Some(wakes.at.map_or(t, |a| a.min(t)));
                }
            }
        }
        wakes
    }

    /// True when [`Connection::wakes`] asks for any notifier.
    pub fn wants_wake(&mut self) -> bool {
        let w = self.wakes();
        w.hub || w.events
    }

    /// Sends whatever our sender links can send now (replies, feedback batches, ...).
    pub fn pump(&mut self) {
        if self.phase != Phase::Opened {
            return;
        }
        let channels: Vec<u16> = self.sessions.keys().copied().collect();
        for ch in channels {
            let handles: Vec<u32> = self.sessions[&ch].links.keys().copied().collect();
            for h in handles {
                self.pump_link(ch, h);
            }
        }
    }

    /// Closes the connection because the server is shutting down.
    pub fn shut_down(&mut self) {
        if matches!(self.phase, Phase::Open | Phase::Opened) {
            let err = frame::error("amqp:connection:forced", "the emulator is shutting down");
            self.write(0, &list(code::CLOSE, vec![err]), &[]);
        }
        self.release_all();
        self.phase = Phase::Closed;
    }

    /// Whether a CBS token currently authorizes service operations on this connection.
    pub fn authorized(&self) -> bool {
        self.auth.authorized(&self.hub)
    }

    fn fail(&mut self, e: ConnError) {
        tracing::info!(condition = e.condition, "closing an AMQP connection: {}", e.description);
        if matches!(self.phase, Phase::Open | Phase::Opened) {
            let err = frame::error(e.condition, &e.description);
            self.write(0, &list(code::CLOSE, vec![err]), &[]);
        }
        self.release_all();
        self.close_reason = Some(e);
        self.phase = Phase::Closed;
    }

    fn write(&mut self, channel: u16, body: &Value, payload: &[u8]) {
        let kind = if self.phase == Phase::Sasl { FRAME_SASL } else { FRAME_AMQP };
        frame::write_frame(&mut self.output, kind, channel, body, payload);
    }

    /// Handles every complete header and frame in the input; the bytes they took are dropped
    /// from the input once at the end (not shifted out frame by frame).
    fn process(&mut self) -> Result<(), ConnError> {
        // Out of the connection while it is read, so that a transfer's payload is decoded where
        // it lies (nothing the frames lead to reads or adds input).
        let input = std::mem::take(&mut self.input);
        let mut at = 0;
        let result = loop {
            match self.phase {
                Phase::Closed => break Ok(()),
                Phase::Header | Phase::AmqpHeader => {
                    let Some(h) = input.get(at..at + 8) else { break Ok(()) };
                    let header: [u8; 8] = h.try_into().unwrap_or_default();
                    at += 8;
                    if let Err(e) = self.on_header(&header) {
                        break Err(e);
                    }
                }
                Phase::Opened
                    if let Some((channel, t, payload, size)) =
                        frame::read_transfer(&input[at..], MAX_FRAME_BYTES) =>
                {
                    // A transfer (every C2D send) read without building its performative.
                    let payload = &input[at + payload..at + size];
                    at += size;
                    if let Err(e) = self.on_transfer(channel, &t, payload) {
                        break Err(e);
                    }
                }
                Phase::Sasl | Phase::Open | Phase::Opened => {
                    let (f, size) = match frame::parse_frame_at(&input[at..], MAX_FRAME_BYTES) {
                        Ok(Some(parsed)) => parsed,
                        Ok(None) => break Ok(()),
                        Err(e) => break Err(e.into()),
                    };
                    at += size;
                    if let Err(e) = self.on_frame(f) {
                        break Err(e);
                    }
                }
            }
        };
        self.input = input;
        self.input.drain(..at.min(self.input.len()));
        result
    }

    fn on_header(&mut self, header: &[u8]) -> Result<(), ConnError> {
        match (self.phase, header) {
            (Phase::Header, h) if h == SASL_HEADER => {
                self.output.extend_from_slice(&SASL_HEADER);
                self.phase = Phase::Sasl;
                let mechanisms = Value::Array(["MSSBCBS", "ANONYMOUS", "PLAIN"].map(Value::sym).to_vec());
                self.write(0, &list(code::SASL_MECHANISMS, vec![mechanisms]), &[]);
                Ok(())
            }
            (Phase::Header | Phase::AmqpHeader, h) if h == AMQP_HEADER => {
                self.output.extend_from_slice(&AMQP_HEADER);
                self.phase = Phase::Open;
                Ok(())
            }
            (_, h) => {
                // Part 2.2: answer with the header we support, then close the socket.
                self.output.extend_from_slice(&AMQP_HEADER);
                Err(ConnError::new(
                    "amqp:not-implemented",
                    format!("unsupported protocol header {h:02x?}; use AMQP 1.0 with or without SASL"),
                ))
            }
        }
    }

    fn on_frame(&mut self, f: Frame) -> Result<(), ConnError> {
        let Some(body) = f.body else {
            return Ok(()); // heartbeat
        };
        let (c, fields) = frame::into_described_list(body)?;
        if self.phase == Phase::Sasl {
            return self.on_sasl(c, &fields);
        }
        if self.phase == Phase::Open && c != code::OPEN {
            return Err(ConnError::new("amqp:not-allowed", "the first frame must be open"));
        }
        match c {
            code::OPEN => self.on_open(&fields),
            code::BEGIN => self.on_begin(f.channel, &fields),
            code::ATTACH => self.on_attach(f.channel, &fields),
            code::FLOW => self.on_flow(f.channel, &fields),
            code::TRANSFER => self.on_transfer(f.channel, &Transfer::from_fields(&fields), &f.payload),
            code::DISPOSITION => self.on_disposition(f.channel, &fields),
            code::DETACH => self.on_detach(f.channel, &fields),
            code::END => self.on_end(f.channel),
            code::CLOSE => {
                self.write(0, &list(code::CLOSE, vec![]), &[]);
                self.release_all();
                self.phase = Phase::Closed;
                Ok(())
            }
            other => {
                Err(ConnError::new("amqp:not-implemented", format!("unexpected performative 0x{other:x}")))
            }
        }
    }

    fn on_sasl(&mut self, c: u64, fields: &Fields) -> Result<(), ConnError> {
        if c != code::SASL_INIT {
            return Err(ConnError::new("amqp:not-allowed", format!("expected sasl-init, got 0x{c:x}")));
        }
        let mechanism = fields.str(0).unwrap_or_default().to_owned();
        let ok = match mechanism.as_str() {
            // MSSBCBS (uamqp, empty initial response) and ANONYMOUS defer auth to CBS put-token.
            "MSSBCBS" | "ANONYMOUS" => true,
            // PLAIN: `{policy}@sas.root.{hub}` / the SAS token as the password (reference §1.4).
            "PLAIN" => match fields.get(1) {
                Value::Binary(b) => nodes::sasl_plain(&self.hub, &mut self.auth, b),
                _ => false,
            },
            _ => false,
        };
        let outcome = Value::Ubyte(if ok { 0 } else { 1 });
        self.write(0, &list(code::SASL_OUTCOME, vec![outcome]), &[]);
        if ok {
            self.phase = Phase::AmqpHeader;
            Ok(())
        } else {
            Err(ConnError::new("amqp:unauthorized-access", format!("SASL {mechanism:?} refused")))
        }
    }

    fn on_open(&mut self, f: &Fields) -> Result<(), ConnError> {
        if self.phase != Phase::Open {
            return Err(ConnError::new("amqp:not-allowed", "open received twice"));
        }
        self.peer_max_frame = f.u32(2).unwrap_or(u32::MAX).max(frame::MIN_MAX_FRAME_SIZE);
        self.peer_idle_timeout_ms = f.u32(4).filter(|&ms| ms > 0);
        self.phase = Phase::Opened;
        let reply = list(
            code::OPEN,
            vec![
                Value::str(&format!("iothub-emulator-{}", self.hub.hostname())),
                Value::str(self.hub.hostname()),
                Value::Uint(MAX_FRAME_BYTES),
                Value::Ushort(MAX_SESSIONS as u16 - 1),
                Value::Uint(self.idle_timeout_ms()),
            ],
        );
        self.write(0, &reply, &[]);
        Ok(())
    }

    fn on_begin(&mut self, channel: u16, f: &Fields) -> Result<(), ConnError> {
        if self.sessions.contains_key(&channel) {
            return Err(ConnError::new(
                "amqp:not-allowed",
                format!("channel {channel} already has a session"),
            ));
        }
        if self.sessions.len() >= MAX_SESSIONS {
            return Err(ConnError::new("amqp:resource-limit-exceeded", "too many sessions"));
        }
        let session = Session {
            next_incoming_id: f.u32(1).unwrap_or(0),
            incoming_window: SESSION_WINDOW,
            remote_incoming_window: f.u32(2).unwrap_or(0),
            ..Session::default()
        };
        self.sessions.insert(channel, session);
        let reply = list(
            code::BEGIN,
            vec![
                Value::Ushort(channel),
                Value::Uint(0),
                Value::Uint(SESSION_WINDOW),
                Value::Uint(SESSION_WINDOW),
                Value::Uint(MAX_LINKS_PER_SESSION - 1),
            ],
        );
        self.write(channel, &reply, &[]);
        Ok(())
    }

    fn session(&mut self, channel: u16) -> Result<&mut Session, ConnError> {
        self.sessions
            .get_mut(&channel)
            .ok_or_else(|| ConnError::new("amqp:not-found", format!("no session on channel {channel}")))
    }

    fn on_attach(&mut self, channel: u16, f: &Fields) -> Result<(), ConnError> {
        let name = f.str(0).unwrap_or_default().to_owned();
        let handle =
            f.u32(1).ok_or_else(|| ConnError::new("amqp:decode-error", "attach without a handle"))?;
        let peer_sends = !f.bool_or(2, false);
        let (source, target) = (f.get(5).clone(), f.get(6).clone());
        let terminus = if peer_sends { &target } else { &source };
        let raw = frame::terminus_address(terminus).unwrap_or_default().to_owned();
        let session = self.session(channel)?;
        if session.links.contains_key(&handle) || session.links.len() >= MAX_LINKS_PER_SESSION as usize {
            return Err(ConnError::new(
                "amqp:session:handle-in-use",
                format!("handle {handle} in use or too many links"),
            ));
        }
        let room = session.unsettled_room();
        let request = AttachRequest {
            name: &name,
            peer_sends,
            address: &raw,
            source: &source,
            target: &target,
            desired_capabilities: f.get(12),
            properties: f.get(13),
        };
        let opened = nodes::attach(&mut ctx!(self, room), &request);
        // The reply echoes source and target (uamqp detaches without them) and asks for
        // rcv-settle-mode first (uamqp never settles under second): sdk-wire-notes §3. A refused
        // link gets no terminus on our side, then a detach with the error.
        let snd_settle = f.get(3).clone();
        let (reply_source, reply_target) = match &opened {
            Ok(_) => (source, target),
            Err(_) if peer_sends => (source, Value::Null),
            Err(_) => (Value::Null, target),
        };
        let offered = opened.as_ref().map_or(Value::Null, |n| n.offered_capabilities());
        let reply = list(
            code::ATTACH,
            vec![
                Value::str(&name),
                Value::Uint(handle),
                Value::Bool(peer_sends),
                snd_settle.clone(),
                Value::Ubyte(0),
                reply_source,
                reply_target,
                Value::Null,
                Value::Null,
                if peer_sends { Value::Null } else { Value::Uint(0) },
                Value::Ulong(MAX_MESSAGE_BYTES as u64),
                offered,
            ],
        );
        self.write(channel, &reply, &[]);
        let node = match opened {
            Ok(node) => node,
            Err(refusal) => {
                tracing::info!(link = %name, address = %raw, condition = refusal.condition, "refusing an AMQP link: {}", refusal.description);
                self.write_detach(channel, handle, &refusal);
                return Ok(());
            }
        };
        let link = Link {
            name,
            node,
            peer_sends,
            delivery_count: f.u32(9).unwrap_or(0),
            credit: 0,
            presettled: snd_settle.as_u64() == Some(1),
            partial: None,
        };
        self.session(channel)?.links.insert(handle, link);
        if peer_sends {
            self.grant_credit(channel, handle);
        }
        Ok(())
    }

    /// Writes a closing detach of `handle` carrying `refusal`'s error.
    fn write_detach(&mut self, channel: u16, handle: u32, refusal: &Refusal) {
        let body = list(code::DETACH, vec![Value::Uint(handle), Value::Bool(true), refusal.to_error()]);
        self.write(channel, &body, &[]);
    }

    /// Tops a receiving link's credit up to [`LINK_CREDIT`] and tells the peer.
    fn grant_credit(&mut self, channel: u16, handle: u32) {
        let Some(session) = self.sessions.get_mut(&channel) else { return };
        let Some(link) = session.links.get_mut(&handle) else { return };
        link.credit = LINK_CREDIT;
        let delivery_count = link.delivery_count;
        let body = flow_body(session, Some((handle, delivery_count, LINK_CREDIT)));
        self.write(channel, &body, &[]);
    }

    fn on_flow(&mut self, channel: u16, f: &Fields) -> Result<(), ConnError> {
        let session = self.session(channel)?;
        let next_incoming = f.u32(0).unwrap_or(0);
        let window = f.u32(1).unwrap_or(0);
        session.remote_incoming_window =
            next_incoming.wrapping_add(window).wrapping_sub(session.next_outgoing_id);
        let echo = f.bool_or(9, false);
        let Some(handle) = f.u32(4) else {
            if echo {
                let body = flow_body(session, None);
                self.write(channel, &body, &[]);
            }
            self.pump();
            return Ok(());
        };
        let Some(link) = session.links.get_mut(&handle) else {
            // A link we detached (refused, evicted) until the peer's detach answers ours: the
            // peer may still send its flow (rhea grants credit right after the attach).
            tracing::debug!(handle, "ignoring a flow for a detached link");
            return Ok(());
        };
        let drain = !link.peer_sends && f.bool_or(8, false);
        if !link.peer_sends {
            let peer_count = f.u32(5).unwrap_or(link.delivery_count);
            let credit = f.u32(6).unwrap_or(0);
            link.credit = peer_count.wrapping_add(credit).wrapping_sub(link.delivery_count);
        }
        // Send what there is first; a drain then uses the rest of the credit up.
        self.pump();
        let session = self.session(channel)?;
        let Some(link) = session.links.get_mut(&handle) else { return Ok(()) };
        let mut echo = echo;
        if drain && link.node.honours_drain() {
            link.delivery_count = link.delivery_count.wrapping_add(link.credit);
            link.credit = 0;
            echo = true;
        }
        if echo {
            let (count, credit) = (link.delivery_count, link.credit);
            let body = flow_body(session, Some((handle, count, credit)));
            self.write(channel, &body, &[]);
        }
        self.pump();
        Ok(())
    }

    fn on_transfer(&mut self, channel: u16, t: &Transfer, payload: &[u8]) -> Result<(), ConnError> {
        let handle =
            t.handle.ok_or_else(|| ConnError::new("amqp:decode-error", "transfer without a handle"))?;
        let more = t.more;
        // Bytes this connection already holds in unfinished deliveries (only a frame that is to be
        // kept waiting for the next one needs the sum).
        let buffered = if more { self.buffered_delivery_bytes() } else { 0 };
        let session = self.session(channel)?;
        session.next_incoming_id = session.next_incoming_id.wrapping_add(1);
        session.incoming_window = session.incoming_window.saturating_sub(1);
        if session.incoming_window < SESSION_WINDOW / 2 {
            session.incoming_window = SESSION_WINDOW;
            let body = flow_body(session, None);
            self.write(channel, &body, &[]);
        }
        let session = self.session(channel)?;
        let link = session.links.get_mut(&handle).filter(|l| l.peer_sends).ok_or_else(|| {
            ConnError::new(
                "amqp:session:unattached-handle",
                format!("transfer on handle {handle}, which is not a receiving link"),
            )
        })?;
        let partial = match link.partial.take() {
            Some(p) => p,
            None => {
                if link.credit == 0 {
                    return Err(ConnError::new(
                        "amqp:link:transfer-limit-exceeded",
                        format!("transfer on link {:?} without credit", link.name),
                    ));
                }
                let delivery_id = t.delivery_id.ok_or_else(|| {
                    ConnError::new("amqp:decode-error", "first transfer frame without delivery-id")
                })?;
                Partial { delivery_id, settled: false, bytes: Vec::new(), oversized: false }
            }
        };
        let mut partial = partial;
        partial.settled |= t.settled;
        // A delivery in one frame (every C2D send): its payload is the message, decoded where it
        // lies.
        let in_this_frame = partial.bytes.is_empty() && !more;
        if partial.bytes.len() + payload.len() > MAX_MESSAGE_BYTES
            || buffered + payload.len() > MAX_BUFFERED_DELIVERY_BYTES
        {
            partial.oversized = true;
            partial.bytes = Vec::new();
        } else if !partial.oversized && !in_this_frame {
            partial.bytes.extend_from_slice(payload);
        }
        if t.aborted {
            return Ok(()); // aborted: the delivery is forgotten
        }
        if more {
            link.partial = Some(partial);
            return Ok(());
        }
        link.credit -= 1;
        link.delivery_count = link.delivery_count.wrapping_add(1);
        if link.credit < LINK_CREDIT / 2 {
            self.grant_credit(channel, handle);
        }
        let mut needs_pump = false;
        let outcome = if partial.oversized {
            Outcome::Rejected(
                "amqp:link:message-size-exceeded",
                format!(
                    "the message is larger than the {MAX_MESSAGE_BYTES} bytes this link accepts, or the \
                     connection holds more than {MAX_BUFFERED_DELIVERY_BYTES} bytes of unfinished deliveries"
                ),
            )
        } else {
            match Message::decode(if in_this_frame { payload } else { &partial.bytes }) {
                Err(e) => Outcome::Rejected("amqp:decode-error", format!("the message does not decode: {e}")),
                Ok(m) => {
                    let (outcome, pump) = self.deliver(channel, handle, m);
                    needs_pump = pump;
                    outcome
                }
            }
        };
        if !partial.settled {
            match &outcome {
                // The common case (every accepted C2D send) written without building the
                // performative; the same bytes.
                Outcome::Accepted => {
                    frame::write_accepted_disposition(&mut self.output, channel, partial.delivery_id)
                }
                Outcome::Rejected(condition, description) => {
                    let body = list(
                        code::DISPOSITION,
                        vec![
                            Value::Bool(true),
                            Value::Uint(partial.delivery_id),
                            Value::Null,
                            Value::Bool(true),
                            frame::rejected(condition, description),
                        ],
                    );
                    self.write(channel, &body, &[]);
                }
            }
        }
        // Only a request with a reply (a put-token, a $management read) changes what the sending
        // links may send; a C2D transfer does not, and the driver pumps before every write anyway.
        if needs_pump {
            self.pump();
        }
        Ok(())
    }

    /// Bytes held in unfinished multi-frame deliveries across every link of the connection.
    fn buffered_delivery_bytes(&self) -> usize {
        self.sessions
            .values()
            .flat_map(|s| s.links.values())
            .filter_map(|l| l.partial.as_ref())
            .map(|p| p.bytes.len())
            .sum()
    }

    /// Hands a complete incoming message to its link's node and routes the node's reply.
    /// Hands a complete message to its link's node; also says whether the links need a pump (a
    /// reply was queued, or the node is not the C2D sender's, whose transfers change nothing a
    /// sending link waits for).
    fn deliver(&mut self, channel: u16, handle: u32, m: Message) -> (Outcome, bool) {
        let Some(session) = self.sessions.get_mut(&channel) else {
            return (Outcome::Rejected("amqp:not-found", "the session ended".into()), false);
        };
        let room = session.unsettled_room();
        let Some(link) = session.links.get_mut(&handle) else {
            return (Outcome::Rejected("amqp:not-found", "the link was detached".into()), false);
        };
        let kind = link.node.kind();
        let received = link.node.receive(&mut ctx!(self, room), m);
        let mut pump = kind != "devicebound";
        if let Some(reply) = received.reply {
            self.route_reply(channel, kind, reply);
            pump = true;
        }
        (received.outcome, pump)
    }

    /// Queues a reply on the session's reply link for `kind`: the one whose source address is the
    /// reply's `to` (the request's `reply-to`) if any, else the first that takes such replies.
    fn route_reply(&mut self, channel: u16, kind: &'static str, reply: Message) {
        let Some(session) = self.sessions.get_mut(&channel) else { return };
        let to = reply.properties.to.clone();
        let takes = |l: &Link| !l.peer_sends && l.node.takes_replies(kind);
        let addressed = session
            .links
            .values()
            .position(|l| takes(l) && to.is_some() && l.node.reply_address() == to.as_deref());
        let link = match addressed {
            Some(i) => session.links.values_mut().nth(i),
            None => session.links.values_mut().find(|l| takes(l)),
        };
        match link {
            Some(link) => {
                link.node.push_reply(reply);
            }
            None => tracing::info!(node = kind, "a request arrived with no reply link to answer on"),
        }
    }

    fn pump_link(&mut self, channel: u16, handle: u32) {
        let mut rechecked = false;
        loop {
            let Some(session) = self.sessions.get_mut(&channel) else { return };
            let room = session.unsettled_room();
            let window = session.remote_incoming_window;
            let Some(link) = session.links.get_mut(&handle) else { return };
            if link.peer_sends {
                return;
            }
            if let Some(refusal) = link.node.closing(&mut ctx!(self, room)) {
                tracing::info!(link = %link.name, condition = refusal.condition, "detaching an AMQP link: {}", refusal.description);
                let unsettled = session.take_unsettled(handle);
                if let Some(link) = session.links.remove(&handle) {
                    self.end_link(link, unsettled);
                }
                self.write_detach(channel, handle, &refusal);
                return;
            }
            if link.credit == 0 || window == 0 {
                return;
            }
            let Some(out) = link.node.next(&mut ctx!(self, room)) else {
                // A node may close once it has been asked for a delivery (a redirect waits for
                // the peer's credit): check again now.
                if link.node.closing_after_next() && !rechecked {
                    rechecked = true;
                    continue;
                }
                return;
            };
            let Outgoing { payload, settled, track } = out;
            let settled = settled || link.presettled;
            if let (Some(token), true) = (track, link.presettled) {
                // The peer asked for settled deliveries: hand-off is the completion.
                link.node.settled(&mut ctx!(self, room), token, Settled::Done);
            }
            let track = if settled { None } else { track };
            self.send_delivery(channel, handle, &payload, settled, track);
        }
    }

    /// Sends one delivery on a sender link, split into frames that fit the peer's max-frame-size.
    fn send_delivery(
        &mut self,
        channel: u16,
        handle: u32,
        payload: &[u8],
        settled: bool,
        track: Option<u128>,
    ) {
        let peer_max = self.peer_max_frame as usize;
        let Some(session) = self.sessions.get_mut(&channel) else { return };
        let delivery_id = session.next_delivery_id;
        session.next_delivery_id = delivery_id.wrapping_add(1);
        if let (false, Some(token)) = (settled, track) {
            session.unsettled.insert(delivery_id, (handle, token));
        }
        if let Some(link) = session.links.get_mut(&handle) {
            link.credit -= 1;
            link.delivery_count = link.delivery_count.wrapping_add(1);
        }
        let tag = Value::Binary(delivery_id.to_be_bytes().to_vec());
        let perf = |more: bool| {
            list(
                code::TRANSFER,
                vec![
                    Value::Uint(handle),
                    Value::Uint(delivery_id),
                    tag.clone(),
                    Value::Uint(0),
                    Value::Bool(settled),
                    Value::Bool(more),
                ],
            )
        };
        // Room for the payload in one frame: header, the performative (at most this long), slack.
        let room = peer_max.saturating_sub(8 + perf(true).to_bytes().len() + 8).max(1);
        let mut chunks: Vec<&[u8]> = payload.chunks(room).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let last = chunks.len() - 1;
        let mut frames = Vec::with_capacity(chunks.len());
        for (i, chunk) in chunks.into_iter().enumerate() {
            frames.push((perf(i < last), chunk));
        }
        let n = frames.len() as u32;
        for (body, chunk) in frames {
            frame::write_frame(&mut self.output, FRAME_AMQP, channel, &body, chunk);
        }
        if let Some(session) = self.sessions.get_mut(&channel) {
            session.next_outgoing_id = session.next_outgoing_id.wrapping_add(n);
            session.remote_incoming_window = session.remote_incoming_window.saturating_sub(n);
        }
    }

    fn on_disposition(&mut self, channel: u16, f: &Fields) -> Result<(), ConnError> {
        if !f.bool_or(0, false) {
            return Ok(()); // from a sender: we settle everything we receive at once
        }
        let first =
            f.u32(1).ok_or_else(|| ConnError::new("amqp:decode-error", "disposition without first"))?;
        let last = f.u32(2).unwrap_or(first).max(first);
        let settled = f.bool_or(3, false);
        let state = f.get(4).clone();
        let how = match state.as_described() {
            Some((code::RELEASED | code::MODIFIED, _)) => Settled::Returned,
            _ => Settled::Done,
        };
        let session = self
            .sessions
            .get_mut(&channel)
            .ok_or_else(|| ConnError::new("amqp:not-found", format!("no session on channel {channel}")))?;
        let ids: Vec<u32> = session.unsettled.range(first..=last).map(|(id, _)| *id).collect();
        let mut any = false;
        for id in ids {
            let Some((handle, token)) = session.unsettled.remove(&id) else { continue };
            any = true;
            let room = session.unsettled_room();
            if let Some(link) = session.links.get_mut(&handle) {
                link.node.settled(&mut ctx!(self, room), token, how);
            }
        }
        if !settled && any {
            let body = list(
                code::DISPOSITION,
                vec![Value::Bool(false), Value::Uint(first), Value::Uint(last), Value::Bool(true), state],
            );
            self.write(channel, &body, &[]);
        }
        self.pump();
        Ok(())
    }

    fn on_detach(&mut self, channel: u16, f: &Fields) -> Result<(), ConnError> {
        let handle =
            f.u32(0).ok_or_else(|| ConnError::new("amqp:decode-error", "detach without a handle"))?;
        let closed = f.bool_or(1, false);
        let session = self.session(channel)?;
        // An unknown handle is a link we detached first (refused or evicted): this is the peer's
        // answer, which needs none.
        if let Some(link) = session.links.remove(&handle) {
            let unsettled = session.take_unsettled(handle);
            self.end_link(link, unsettled);
            self.write(channel, &list(code::DETACH, vec![Value::Uint(handle), Value::Bool(closed)]), &[]);
        }
        Ok(())
    }

    fn on_end(&mut self, channel: u16) -> Result<(), ConnError> {
        let session = self
            .sessions
            .remove(&channel)
            .ok_or_else(|| ConnError::new("amqp:not-found", format!("end for unknown channel {channel}")))?;
        self.end_session(session);
        self.write(channel, &list(code::END, vec![]), &[]);
        Ok(())
    }

    /// Tells a removed link's node it is gone, with its unsettled tracked deliveries.
    fn end_link(&mut self, mut link: Link, unsettled: Vec<u128>) {
        link.node.detached(&mut ctx!(self, 0), unsettled);
    }

    fn end_session(&mut self, mut session: Session) {
        let handles: Vec<u32> = session.links.keys().copied().collect();
        for handle in handles {
            let unsettled = session.take_unsettled(handle);
            if let Some(link) = session.links.remove(&handle) {
                self.end_link(link, unsettled);
            }
        }
    }

    /// Ends every session's links (connection going away): tracked deliveries return to the hub.
    fn release_all(&mut self) {
        for session in std::mem::take(&mut self.sessions).into_values() {
            self.end_session(session);
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.release_all();
    }
}

/// A flow for the session, plus the link state when `link` is given (handle, count, credit).
fn flow_body(session: &Session, link: Option<(u32, u32, u32)>) -> Value {
    let state = [session.next_incoming_id, session.incoming_window, session.next_outgoing_id, SESSION_WINDOW];
    frame::flow(state, link)
}
