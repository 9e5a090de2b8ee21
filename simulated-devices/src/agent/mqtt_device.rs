//! The device side of IoT Hub's MQTT 3.1.1, without sockets (sans-IO): what a simulated device
//! sends and how it answers what the hub sends, as `rumqttc::mqttbytes::v4` packet values. Both
//! transports use it: the socket agent ([`super::run`]) frames the packets onto a TCP or TLS
//! stream ([`take_packet`], [`encode`]), the in-process fleet ([`crate::inprocess`]) hands them to
//! the hub's session as values.
//!
//! It owns one device's protocol state across its connections ([`DeviceMqtt`]): packet ids, the
//! QoS 1 publishes sent and not yet acknowledged (at most [`INFLIGHT`]; resent, flagged `dup`,
//! after a reconnect, as rumqttc does), and the packets waiting to go out (reports queued while the
//! link is down or the window is full, at most [`OUTBOX_CAPACITY`] reports; acknowledgements are
//! discarded with the link, since the hub redelivers what was not acknowledged). It builds the
//! CONNECT ([`connect_packet`]: client id = device id, IoT Hub's username and SAS password,
//! clean_session=0) and, on the CONNACK, the SUBSCRIBE (C2D at QoS 1, twin responses and desired
//! patches at QoS 0; a desired patch carrying an `update` notice becomes [`Incoming::Desired`]), then a
//! twin GET whose answer is read the same way (an update announced while the device was offline),
//! and tells a C2D delivery seen before (the agent's [`SeenIds`]) from a new command, which the
//! driver saves and acts on before it calls [`DeviceMqtt::ack`]. Keep-alive timing is a separate
//! [`KeepAlive`] (only sockets need it): a deadline the driver sleeps until.
//!
//! The decisions about updates stay in [`super::core::AgentCore`]; this layer only carries them.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use iothub_emulator::sas::SasError;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Login, Packet, PubAck, Publish, Subscribe, SubscribeFilter,
    SubscribeReasonCode,
};
use tokio::time::Instant;

use super::SeenIds;
use super::contract;
use super::core::Action;

/// QoS 1 publishes in flight (sent, not yet acknowledged); more wait in the outbox.
pub const INFLIGHT: usize = 4;
/// Reports waiting to go out; beyond this the oldest report is dropped.
pub const OUTBOX_CAPACITY: usize = 80;
/// SAS tokens a device signs live this long; every (re)connect signs a fresh one.
pub const TOKEN_LIFETIME_SECS: u64 = 24 * 3600;

/// Why an incoming buffer cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The bytes are not an MQTT 3.1.1 packet, or the packet is larger than allowed.
    #[error("malformed packet from the hub: {0}")]
    Codec(#[from] rumqttc::mqttbytes::Error),
}

/// Least room [`take_packet`] reserves for a partial packet, so small packets arriving behind it
/// are read in the same call.
pub const MIN_RESERVE_BYTES: usize = 256;

/// Takes one complete packet out of `buf` (`Ok(None)`: read more), refusing packets above
/// `max_bytes`. Reserves room for the rest of a partial packet (at least [`MIN_RESERVE_BYTES`]),
/// but never more than `ahead` bytes past what arrived, so a header announcing a large packet
/// does not buy its memory.
pub fn take_packet(buf: &mut BytesMut, max_bytes: usize, ahead: usize) -> Result<Option<Packet>, FrameError> {
    match Packet::read(buf, max_bytes) {
        Ok(p) => Ok(Some(p)),
        Err(rumqttc::mqttbytes::Error::InsufficientBytes(n)) => {
            buf.reserve(n.max(MIN_RESERVE_BYTES).min(ahead));
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Appends `packet`'s bytes to `buf` (packets larger than `max_bytes` are refused).
pub fn encode(packet: &Packet, buf: &mut BytesMut, max_bytes: usize) -> Result<(), FrameError> {
    packet.write(buf, max_bytes)?;
    Ok(())
}

/// A fresh device SAS token (the MQTT password, also the FTP password), valid for
/// [`TOKEN_LIFETIME_SECS`].
pub fn fresh_password(hub_host: &str, device_id: &str, key_b64: &str) -> Result<String, SasError> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    contract::password(hub_host, device_id, key_b64, now + TOKEN_LIFETIME_SECS)
}

/// The CONNECT of `device_id`: its id as client id, IoT Hub's username, `password` (a SAS
/// token), clean_session=0 (the hub keeps the subscriptions and undelivered C2D messages).
pub fn connect_packet(device_id: &str, hub_host: &str, password: String, keep_alive: Duration) -> Connect {
    let mut connect = Connect::new(device_id);
    connect.clean_session = false;
    connect.keep_alive = u16::try_from(keep_alive.as_secs()).unwrap_or(u16::MAX);
    connect.login = Some(Login::new(contract::username(hub_host, device_id), password));
    connect
}

/// What a packet from the hub means for the device.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// The hub accepted the CONNECT: the SUBSCRIBE is queued, unacknowledged publishes will be
    /// resent. Tell the core ([`super::core::AgentCore::on_connected`]).
    Connected,
    /// The hub refused the CONNECT.
    Refused(ConnectReturnCode),
    /// A C2D message not seen before: save it, act on it, then [`DeviceMqtt::ack`] it (or drop
    /// the link first, and the hub delivers it again).
    Command(C2dCommand),
    /// A C2D message saved before (the hub never got its PUBACK): acknowledged again, not to be
    /// acted on.
    Duplicate {
        /// Its id.
        message_id: Option<String>,
    },
    /// A desired-properties patch announcing an update (its notice, as JSON): hand it to
    /// [`super::core::AgentCore::on_desired`]. Patches are QoS 0: nothing to acknowledge.
    Desired(Bytes),
    /// Nothing for the device (a twin response, SUBACK, PUBACK, PINGRESP).
    Nothing,
    /// A PINGRESP: the hub is alive ([`KeepAlive::on_pingresp`]).
    Pong,
}

/// A new C2D command.
#[derive(Debug, PartialEq, Eq)]
pub struct C2dCommand {
    /// The packet id its PUBACK must carry (0: a QoS 0 delivery, nothing to acknowledge).
    pub pkid: u16,
    /// The message id (`$.mid`), for duplicate detection.
    pub message_id: Option<String>,
    /// The body.
    pub payload: Bytes,
}

/// Packets waiting and in flight (boxed: most devices have none most of the time).
#[derive(Debug, Default)]
struct Queues {
    /// To send, in order.
    waiting: VecDeque<Packet>,
    /// QoS 1 publishes sent and not yet acknowledged, oldest first.
    inflight: VecDeque<Publish>,
}

/// One device's MQTT state across its connections (see the module documentation).
#[derive(Debug, Default)]
pub struct DeviceMqtt {
    last_pkid: u16,
    /// A CONNACK accepted the current connection.
    up: bool,
    queues: Option<Box<Queues>>,
}

impl DeviceMqtt {
    /// True between an accepted CONNACK and [`Self::link_lost`].
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Nothing waiting to go out and nothing in flight.
    pub fn is_idle(&self) -> bool {
        self.queues.is_none()
    }

    /// QoS 1 publishes sent and not yet acknowledged.
    pub fn inflight(&self) -> usize {
        self.queues.as_ref().map_or(0, |q| q.inflight.len())
    }

    /// Packets waiting to go out.
    pub fn waiting(&self) -> usize {
        self.queues.as_ref().map_or(0, |q| q.waiting.len())
    }

    fn queues(&mut self) -> &mut Queues {
        self.queues.get_or_insert_with(Default::default)
    }

    /// Gives the queues' memory back once both are empty.
    fn tidy(&mut self) {
        if self.queues.as_ref().is_some_and(|q| q.waiting.is_empty() && q.inflight.is_empty()) {
            self.queues = None;
        }
    }

    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.wrapping_add(1).max(1);
            let pkid = self.last_pkid;
            if !self.queues.as_ref().is_some_and(|q| q.inflight.iter().any(|p| p.pkid == pkid)) {
                return pkid;
            }
        }
    }

    /// Queues a publish (QoS 1 with `at_least_once`, else QoS 0); a full outbox drops its oldest
    /// report first.
    pub fn publish(&mut self, topic: String, payload: Vec<u8>, at_least_once: bool) {
        let qos = if at_least_once { QoS::AtLeastOnce } else { QoS::AtMostOnce };
        let mut publish = Publish::new(topic, qos, Vec::new());
        publish.payload = Bytes::from(payload);
        let waiting = &mut self.queues().waiting;
        if waiting.iter().filter(|p| matches!(p, Packet::Publish(_))).count() >= OUTBOX_CAPACITY
            && let Some(i) = waiting.iter().position(|p| matches!(p, Packet::Publish(_)))
        {
            waiting.remove(i);
            tracing::warn!("outbox full: dropped the oldest report");
        }
        waiting.push_back(Packet::Publish(publish));
    }

    /// Queues `action` if it is a publish; hands any other action back to the driver.
    pub fn take_publish(&mut self, action: Action) -> Option<Action> {
        match action {
            Action::Publish { topic, payload, at_least_once } => {
                self.publish(topic, payload, at_least_once);
                None
            }
            other => Some(other),
        }
    }

    /// Queues a PINGREQ (keep-alive; dropped with the link).
    pub fn ping(&mut self) {
        if self.up {
            self.queues().waiting.push_back(Packet::PingReq);
        }
    }

    /// Acknowledges the C2D message `pkid` (a no-op while the link is down: the hub redelivers;
    /// and for packet id 0, a QoS 0 delivery).
    pub fn ack(&mut self, pkid: u16) {
        if self.up && pkid != 0 {
            self.queues().waiting.push_back(Packet::PubAck(PubAck::new(pkid)));
        }
    }

    /// The next packet to send, if the link is up: waiting packets in order, new QoS 1 publishes
    /// while fewer than [`INFLIGHT`] are unacknowledged (they get their packet id here and stay
    /// in flight until their PUBACK). While the window is full, acknowledgements, pings and the
    /// SUBSCRIBE go ahead of the publishes waiting for it (publishes keep their order).
    pub fn poll_transmit(&mut self) -> Option<Packet> {
        if !self.up {
            return None;
        }
        let q = self.queues.as_mut()?;
        let new_qos1 =
            |p: &Packet| matches!(p, Packet::Publish(p) if p.qos == QoS::AtLeastOnce && p.pkid == 0);
        let next = if q.inflight.len() >= INFLIGHT && q.waiting.front().is_some_and(new_qos1) {
            q.waiting.iter().position(|p| !matches!(p, Packet::Publish(_)))?
        } else {
            0
        };
        let mut packet = q.waiting.remove(next)?;
        match &mut packet {
            Packet::Publish(p) if p.qos == QoS::AtLeastOnce => {
                if p.pkid == 0 {
                    p.pkid = self.next_pkid();
                }
                let p = p.clone();
                self.queues().inflight.push_back(p);
            }
            Packet::Subscribe(s) if s.pkid == 0 => s.pkid = self.next_pkid(),
            _ => {}
        }
        self.tidy();
        Some(packet)
    }

    /// The link is gone (no DISCONNECT was sent): acknowledgements not yet sent are discarded,
    /// publishes in flight go back to the front of the outbox (in order) to be resent.
    pub fn link_lost(&mut self) {
        self.up = false;
        if let Some(q) = self.queues.as_mut() {
            q.waiting.retain(|p| matches!(p, Packet::Publish(_)));
            for mut p in q.inflight.drain(..).rev() {
                p.dup = true;
                q.waiting.push_front(Packet::Publish(p));
            }
        }
        self.tidy();
    }

    /// Handles one packet from the hub (`device_id` is this device; `seen` the ids of the C2D
    /// messages it saved).
    pub fn handle(&mut self, device_id: &str, packet: Packet, seen: &SeenIds) -> Incoming {
        match packet {
            Packet::ConnAck(ConnAck { code: ConnectReturnCode::Success, .. }) => {
                self.up = true;
                let filters = vec![
                    SubscribeFilter::new(contract::c2d_filter(device_id), QoS::AtLeastOnce),
                    SubscribeFilter::new(contract::TWIN_RESPONSE_FILTER.into(), QoS::AtMostOnce),
                    SubscribeFilter::new(contract::DESIRED_PATCH_FILTER.into(), QoS::AtMostOnce),
                ];
                // With clean_session=0 the hub keeps the subscriptions, but subscribing again is
                // harmless and covers a hub that lost the session. First, before any resend.
                let mut subscribe = Subscribe::new_many(filters);
                subscribe.pkid = 0;
                // Last, after the resends, read the twin: desired properties set while the link was
                // down (an update a configuration announced) arrive as its answer.
                let get = Publish::new(
                    contract::twin_get_topic(contract::DESIRED_SYNC_RID),
                    QoS::AtMostOnce,
                    Vec::new(),
                );
                let waiting = &mut self.queues().waiting;
                waiting
                    .retain(|p| !matches!(p, Packet::Publish(p) if p.topic.starts_with("$iothub/twin/GET/")));
                waiting.push_front(Packet::Subscribe(subscribe));
                waiting.push_back(Packet::Publish(get));
                Incoming::Connected
            }
            Packet::ConnAck(ack) => Incoming::Refused(ack.code),
            Packet::Publish(p) if contract::is_c2d_topic(device_id, &p.topic) => {
                let message_id = contract::c2d_message_id(&p.topic);
                if message_id.as_deref().is_some_and(|m| seen.contains(m)) {
                    self.ack(p.pkid);
                    return Incoming::Duplicate { message_id };
                }
                Incoming::Command(C2dCommand { pkid: p.pkid, message_id, payload: p.payload })
            }
            Packet::Publish(p) if contract::is_desired_sync_response(&p.topic) => {
                match contract::update_from_twin(&p.payload) {
                    Some(notice) => Incoming::Desired(Bytes::from(notice)),
                    None => Incoming::Nothing,
                }
            }
            Packet::Publish(p) if contract::is_desired_patch_topic(&p.topic) => {
                match contract::update_from_desired(&p.payload) {
                    Some(notice) => Incoming::Desired(Bytes::from(notice)),
                    None => Incoming::Nothing,
                }
            }
            Packet::Publish(p) => {
                if p.qos == QoS::AtLeastOnce {
                    self.ack(p.pkid);
                }
                Incoming::Nothing
            }
            Packet::PubAck(ack) => {
                if let Some(q) = self.queues.as_mut()
                    && let Some(i) = q.inflight.iter().position(|p| p.pkid == ack.pkid)
                {
                    q.inflight.remove(i);
                }
                self.tidy();
                Incoming::Nothing
            }
            Packet::SubAck(s) => {
                if s.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
                    tracing::warn!(device = device_id, "the hub refused a subscription");
                }
                Incoming::Nothing
            }
            Packet::PingResp => Incoming::Pong,
            other => {
                tracing::debug!(device = device_id, packet = ?other, "unexpected packet from the hub");
                Incoming::Nothing
            }
        }
    }
}

/// Keep-alive for a socket: a PINGREQ every `every` from the CONNACK on (whatever else is
/// sent, like rumqttc), and the link is dead if the previous one is still unanswered when the
/// next is due.
#[derive(Debug, Clone, Copy)]
pub struct KeepAlive {
    every: Duration,
    next: Instant,
    awaiting: bool,
}

/// The hub did not answer a PINGREQ within a keep-alive period.
#[derive(Debug, thiserror::Error)]
#[error("no PINGRESP within the keep-alive ({0:?})")]
pub struct Unanswered(pub Duration);

impl KeepAlive {
    /// Started at `now` (the CONNACK); `every` zero disables it.
    pub fn new(every: Duration, now: Instant) -> Self {
        Self { every, next: now + every, awaiting: false }
    }

    /// When [`Self::on_deadline`] is due (`None`: never).
    pub fn deadline(&self) -> Option<Instant> {
        (!self.every.is_zero()).then_some(self.next)
    }

    /// The deadline passed: a PINGREQ to send, or the link is dead.
    pub fn on_deadline(&mut self, now: Instant) -> Result<Option<Packet>, Unanswered> {
        if self.every.is_zero() || now < self.next {
            return Ok(None);
        }
        if self.awaiting {
            return Err(Unanswered(self.every));
        }
        self.awaiting = true;
        self.next = now + self.every;
        Ok(Some(Packet::PingReq))
    }

    /// A PINGRESP arrived.
    pub fn on_pingresp(&mut self) {
        self.awaiting = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "d1";

    fn connack() -> Packet {
        Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, true))
    }

    fn c2d(pkid: u16, mid: &str, body: &str) -> Packet {
        let topic = format!("devices/{ID}/messages/devicebound/%24.mid={mid}&iothub-ack=full");
        let mut p = Publish::new(topic, QoS::AtLeastOnce, body.as_bytes().to_vec());
        p.pkid = pkid;
        Packet::Publish(p)
    }

    fn drain(m: &mut DeviceMqtt) -> Vec<Packet> {
        std::iter::from_fn(|| m.poll_transmit()).collect()
    }

    fn telemetry(n: u32) -> (String, Vec<u8>) {
        (contract::telemetry_topic(ID), format!("{{\"n\":{n}}}").into_bytes())
    }

    #[test]
    fn the_connect_follows_iot_hubs_contract() {
        let c = connect_packet(ID, "hub.local", "SharedAccessSignature sr=x".into(), Duration::from_secs(60));
        assert_eq!((c.client_id.as_str(), c.clean_session, c.keep_alive), (ID, false, 60));
        let login = c.login.unwrap();
        assert_eq!(login.username, contract::username("hub.local", ID));
        assert_eq!(login.password, "SharedAccessSignature sr=x");
        let key = iothub_emulator::hub::DEFAULT_OWNER_KEY;
        assert!(fresh_password("hub.local", ID, key).unwrap().starts_with("SharedAccessSignature sr="));
    }

    #[test]
    fn a_desired_patch_with_an_update_is_handed_over_and_others_are_not() {
        let mut m = DeviceMqtt::default();
        m.handle(ID, connack(), &SeenIds::default());
        let patch = |body: &str| {
            Packet::Publish(Publish::new(
                "$iothub/twin/PATCH/properties/desired/?$version=2",
                QoS::AtMostOnce,
                body.as_bytes().to_vec(),
            ))
        };
        let got = m.handle(
            ID,
            patch(r#"{"update":{"version":"2.0.0","url":"x","sha256":"s","size":1},"$version":2}"#),
            &SeenIds::default(),
        );
        let Incoming::Desired(notice) = got else { panic!("{got:?}") };
        assert!(std::str::from_utf8(&notice).unwrap().contains("\"2.0.0\""));
        assert_eq!(
            m.handle(ID, patch(r#"{"interval":5,"$version":3}"#), &SeenIds::default()),
            Incoming::Nothing
        );
        // The answer to the twin GET sent on connect is read the same way.
        let twin = r#"{"desired":{"update":{"version":"2.0.0","url":"x","sha256":"s","size":1},"$version":2},"reported":{}}"#;
        let answer = Publish::new(
            "$iothub/twin/res/200/?$rid=desired-sync",
            QoS::AtMostOnce,
            twin.as_bytes().to_vec(),
        );
        assert!(matches!(m.handle(ID, Packet::Publish(answer), &SeenIds::default()), Incoming::Desired(_)));
    }

    #[test]
    fn nothing_leaves_before_the_connack_then_subscribe_comes_first() {
        let mut m = DeviceMqtt::default();
        m.publish("$iothub/twin/PATCH/properties/reported/?$rid=1".into(), b"{}".to_vec(), false);
        assert!(m.poll_transmit().is_none(), "link down");
        assert_eq!(m.handle(ID, connack(), &SeenIds::default()), Incoming::Connected);
        let out = drain(&mut m);
        let Packet::Subscribe(s) = &out[0] else { panic!("{out:?}") };
        assert_ne!(s.pkid, 0);
        let filters: Vec<_> = s.filters.iter().map(|f| (f.path.as_str(), f.qos)).collect();
        assert_eq!(
            filters,
            [
                ("devices/d1/messages/devicebound/#", QoS::AtLeastOnce),
                ("$iothub/twin/res/#", QoS::AtMostOnce),
                ("$iothub/twin/PATCH/properties/desired/#", QoS::AtMostOnce)
            ]
        );
        assert!(matches!(&out[1], Packet::Publish(p) if p.qos == QoS::AtMostOnce && p.pkid == 0));
        assert!(
            matches!(&out[2], Packet::Publish(p) if p.topic == "$iothub/twin/GET/?$rid=desired-sync" && p.qos == QoS::AtMostOnce),
            "then the twin GET that catches up with desired properties: {out:?}"
        );
        assert_eq!(out.len(), 3);
        assert!(m.is_idle(), "QoS 0 is not kept once sent");
        let refused = Packet::ConnAck(ConnAck::new(ConnectReturnCode::NotAuthorized, false));
        assert_eq!(
            m.handle(ID, refused, &SeenIds::default()),
            Incoming::Refused(ConnectReturnCode::NotAuthorized)
        );
    }

    #[test]
    fn qos1_publishes_get_ids_a_small_window_and_leave_it_on_their_puback() {
        let mut m = DeviceMqtt::default();
        m.handle(ID, connack(), &SeenIds::default());
        drain(&mut m);
        for n in 0..6 {
            let (t, p) = telemetry(n);
            m.publish(t, p, true);
        }
        let out = drain(&mut m);
        assert_eq!(out.len(), INFLIGHT, "the window");
        let ids: Vec<u16> = out.iter().map(|p| if let Packet::Publish(p) = p { p.pkid } else { 0 }).collect();
        assert!(ids.iter().all(|&i| i != 0));
        let mut sorted = ids.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len(), "distinct ids");
        assert_eq!((m.inflight(), m.waiting()), (INFLIGHT, 2));
        // An acknowledgement does not wait for the window.
        let Incoming::Command(cmd) = m.handle(ID, c2d(40, "m", "{}"), &SeenIds::default()) else { panic!() };
        m.ack(cmd.pkid);
        m.ping();
        assert_eq!(drain(&mut m), [Packet::PubAck(PubAck::new(40)), Packet::PingReq]);
        m.handle(ID, Packet::PubAck(PubAck::new(ids[1])), &SeenIds::default());
        assert_eq!(drain(&mut m).len(), 1, "one slot freed");
        for id in [ids[0], ids[2], ids[3]] {
            m.handle(ID, Packet::PubAck(PubAck::new(id)), &SeenIds::default());
        }
        assert_eq!(drain(&mut m).len(), 1);
        assert!(!m.is_idle(), "two still in flight");
        let rest: Vec<u16> = (m.last_pkid - 1..=m.last_pkid).collect();
        for id in rest {
            m.handle(ID, Packet::PubAck(PubAck::new(id)), &SeenIds::default());
        }
        assert!(m.is_idle(), "{m:?}");
    }

    #[test]
    fn a_lost_link_resends_what_was_in_flight_first_and_forgets_unsent_acks() {
        let mut m = DeviceMqtt::default();
        m.handle(ID, connack(), &SeenIds::default());
        drain(&mut m);
        let (t, p) = telemetry(1);
        m.publish(t, p, true);
        let sent = drain(&mut m);
        let Packet::Publish(first) = &sent[0] else { panic!() };
        // A C2D message arrives and is acknowledged, a report is queued, and the link drops
        // before any of it leaves.
        let Incoming::Command(cmd) = m.handle(ID, c2d(7, "m1", "x"), &SeenIds::default()) else { panic!() };
        m.ack(cmd.pkid);
        let (t, p) = telemetry(2);
        m.publish(t, p, true);
        m.link_lost();
        assert!(!m.is_up());
        m.ack(9);
        assert!(m.poll_transmit().is_none());
        m.handle(ID, connack(), &SeenIds::default());
        let out = drain(&mut m);
        assert!(matches!(&out[0], Packet::Subscribe(_)), "{out:?}");
        let Packet::Publish(again) = &out[1] else { panic!("{out:?}") };
        assert_eq!((again.pkid, again.dup, &again.payload), (first.pkid, true, &first.payload));
        assert!(
            matches!(&out[2], Packet::Publish(p) if p.payload.as_ref() == b"{\"n\":2}" && p.pkid != first.pkid)
        );
        assert!(matches!(&out[3], Packet::Publish(p) if p.topic.starts_with("$iothub/twin/GET/")), "{out:?}");
        assert_eq!(out.len(), 4, "the PUBACK of the lost link is not sent: {out:?}");
    }

    #[test]
    fn c2d_commands_are_told_from_duplicates_and_other_qos1_publishes_are_acked() {
        let mut m = DeviceMqtt::default();
        let mut seen = SeenIds::default();
        m.handle(ID, connack(), &seen);
        drain(&mut m);
        let Incoming::Command(cmd) = m.handle(ID, c2d(3, "release-1", "{}"), &seen) else { panic!() };
        assert_eq!(
            (cmd.pkid, cmd.message_id.as_deref(), cmd.payload.as_ref()),
            (3, Some("release-1"), &b"{}"[..])
        );
        assert!(m.is_idle(), "not acknowledged until the driver says so");
        seen.insert("release-1");
        m.ack(cmd.pkid);
        assert_eq!(drain(&mut m), [Packet::PubAck(PubAck::new(3))]);
        let dup = m.handle(ID, c2d(4, "release-1", "{}"), &seen);
        assert_eq!(dup, Incoming::Duplicate { message_id: Some("release-1".into()) });
        assert_eq!(drain(&mut m), [Packet::PubAck(PubAck::new(4))], "a duplicate is acknowledged at once");
        let mut other = Publish::new("$iothub/methods/POST/x/?$rid=1", QoS::AtLeastOnce, b"{}".to_vec());
        other.pkid = 5;
        assert_eq!(m.handle(ID, Packet::Publish(other), &seen), Incoming::Nothing);
        let twin = Publish::new("$iothub/twin/res/204/?$rid=1", QoS::AtMostOnce, Vec::new());
        assert_eq!(m.handle(ID, Packet::Publish(twin), &seen), Incoming::Nothing);
        assert_eq!(drain(&mut m), [Packet::PubAck(PubAck::new(5))]);
        assert_eq!(m.handle(ID, Packet::PingResp, &seen), Incoming::Pong);
        // Another device's topic is not a command.
        let mut p = Publish::new("devices/d2/messages/devicebound/", QoS::AtLeastOnce, Vec::new());
        p.pkid = 6;
        assert_eq!(m.handle(ID, Packet::Publish(p), &seen), Incoming::Nothing);
    }

    #[test]
    fn actions_other_than_publishes_go_back_to_the_driver_and_the_outbox_is_bounded() {
        let mut m = DeviceMqtt::default();
        assert_eq!(m.take_publish(Action::FetchLatest), Some(Action::FetchLatest));
        for n in 0..OUTBOX_CAPACITY as u32 + 5 {
            let (topic, payload) = telemetry(n);
            assert_eq!(m.take_publish(Action::Publish { topic, payload, at_least_once: true }), None);
        }
        assert_eq!(m.waiting(), OUTBOX_CAPACITY);
        m.handle(ID, connack(), &SeenIds::default());
        let Some(Packet::Subscribe(_)) = m.poll_transmit() else { panic!() };
        let Some(Packet::Publish(p)) = m.poll_transmit() else { panic!() };
        assert_eq!(p.payload.as_ref(), b"{\"n\":5}", "the oldest were dropped");
    }

    #[test]
    fn packet_ids_skip_zero_and_the_ones_in_flight() {
        let mut m = DeviceMqtt { last_pkid: u16::MAX - 1, ..DeviceMqtt::default() };
        m.handle(ID, connack(), &SeenIds::default());
        let Some(Packet::Subscribe(s)) = m.poll_transmit() else { panic!() };
        assert_eq!(s.pkid, u16::MAX);
        let Some(Packet::Publish(get)) = m.poll_transmit() else { panic!() };
        assert_eq!(get.pkid, 0, "the twin GET is QoS 0");
        let (t, p) = telemetry(0);
        m.publish(t, p, true);
        let Some(Packet::Publish(p1)) = m.poll_transmit() else { panic!() };
        assert_eq!(p1.pkid, 1, "wraps past zero");
        m.last_pkid = 0;
        assert_eq!(m.next_pkid(), 2, "1 is in flight");
    }

    #[test]
    fn frames_round_trip_and_partial_or_oversized_input_is_handled() {
        let mut buf = BytesMut::new();
        let (t, p) = telemetry(1);
        let mut publish = Publish::new(t, QoS::AtLeastOnce, p);
        publish.pkid = 9;
        encode(&Packet::Publish(publish.clone()), &mut buf, 1024).unwrap();
        encode(&Packet::PingResp, &mut buf, 1024).unwrap();
        let whole = buf.clone();
        let mut partial = BytesMut::from(&whole[..10]);
        assert!(take_packet(&mut partial, 1024, 256).unwrap().is_none());
        assert!(partial.capacity() <= 10 + 256, "reserved at most 256 ahead");
        assert_eq!(take_packet(&mut buf, 1024, 256).unwrap(), Some(Packet::Publish(publish)));
        assert_eq!(take_packet(&mut buf, 1024, 256).unwrap(), Some(Packet::PingResp));
        assert!(buf.is_empty());
        let mut big = BytesMut::new();
        encode(&Packet::Publish(Publish::new("t", QoS::AtMostOnce, vec![0; 2000])), &mut big, usize::MAX)
            .unwrap();
        assert!(take_packet(&mut big, 1024, 256).is_err(), "above the cap");
        // A header announcing 268 MB reserves at most `ahead` bytes.
        let mut liar = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0x7f][..]);
        let r = take_packet(&mut liar, usize::MAX, 256);
        assert!(matches!(r, Ok(None)), "{r:?}");
        assert!(liar.capacity() <= 5 + 256, "{}", liar.capacity());
        assert!(
            encode(&Packet::Publish(Publish::new("t", QoS::AtMostOnce, vec![0; 2000])), &mut big, 100)
                .is_err()
        );
    }

    #[test]
    fn keep_alive_pings_every_period_and_gives_up_on_an_unanswered_ping() {
        let t0 = Instant::now();
        let every = Duration::from_secs(30);
        let mut k = KeepAlive::new(every, t0);
        assert_eq!(k.deadline(), Some(t0 + every));
        assert_eq!(k.on_deadline(t0 + Duration::from_secs(1)).unwrap(), None, "not yet");
        assert_eq!(k.on_deadline(t0 + every).unwrap(), Some(Packet::PingReq));
        assert_eq!(k.deadline(), Some(t0 + every * 2));
        k.on_pingresp();
        assert_eq!(k.on_deadline(t0 + every * 2).unwrap(), Some(Packet::PingReq));
        assert!(k.on_deadline(t0 + every * 3).is_err(), "no PINGRESP for the last one");
        assert_eq!(KeepAlive::new(Duration::ZERO, t0).deadline(), None);
    }
}
