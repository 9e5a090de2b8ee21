//! One device's MQTT session as a socket-free state machine: CONNECT admission, then every decoded
//! packet and every hub event in, packets to write out.
//!
//! The session owns only per-connection facts: the device id, the subscription bits (mirrored into
//! the hub's persisted session), the C2D in-flight window (packet id → lock token), direct-method
//! calls awaiting an answer and the CONNECT's Will, if it had one. Everything else is hub state
//! reached through [`Hub`] calls, which are synchronous and short, so the whole machine is driven
//! and tested without sockets or timers.
//!
//! C2D (reference §4.5): messages are taken from the hub's queue with a lock of
//! [`C2D_LOCK_TIMEOUT_MS`] (IoT Hub's fixed minute) and published at QoS 1; the PUBACK completes
//! the message, closing the connection releases every unacknowledged one back to the queue. If a
//! lock lapses while the connection stays open without a PUBACK, the message becomes visible again
//! and is published anew (new packet id) at the next pull — after the next packet or hub event, a
//! PINGREQ at the latest — which is IoT Hub's "redelivered after a minute". A late PUBACK for the
//! old packet id then finds its lock lost and is ignored; the new delivery still needs its own.
//!
//! Will (reference §4.2): a CONNECT's Will must name this device's telemetry topic
//! (`devices/{id}/messages/events/` plus an optional property bag) and fit the D2C size limit, or
//! the CONNECT is refused with `0x05 Not authorized`. The session keeps it (boxed, only when present)
//! until the connection ends: a DISCONNECT discards it, any other end records it as D2C telemetry
//! with the bag's properties plus `iothub-MessageType=Will` (see [`Session::close`]).
//!
//! Tier throttling (reference §4.8, §5.1; only with a tier configured): a CONNECT past the
//! new-connections backlog is refused with `0x03 Server unavailable`; CONNECTs, telemetry and twin
//! requests over their rate are answered in turn — the session records the hub time of the latest turn and
//! the driver holds the connection until then ([`Session::take_hold`]). Past the shaping backlog a
//! twin GET or reported PATCH gets status 429 on its response topic; telemetry past the backlog or
//! the daily quota closes the connection ([`Close::Throttled`]) before any PUBACK, so the device
//! still holds the message.

use std::collections::VecDeque;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::c2d::LockToken;
use crate::error::HubError;
use crate::hub::link::{Attached, LinkEvent, LinkReceiver, MethodReply, subscriptions};
use crate::hub::messaging::Settlement;
use crate::hub::{D2cMessage, Hub};
use crate::limits::{
    C2D_LOCK_TIMEOUT_MS, D2C_MAX_MESSAGE_BYTES, MQTT_C2D_INFLIGHT_WINDOW, MQTT_MAX_KEEP_ALIVE_WAIT_SECS,
};
use crate::throttle::{Admission, Op};

use super::topics::{self, DeviceTopic, TopicError};

/// Why a connection ends.
#[derive(Debug, thiserror::Error)]
pub enum Close {
    /// The device sent DISCONNECT.
    #[error("the device disconnected")]
    ClientDisconnect,
    /// A publish to a topic the device may not use.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// QoS 2 is not supported: IoT Hub closes the connection.
    #[error("QoS 2 is not supported by IoT Hub; closing the connection")]
    QoS2,
    /// A D2C message above IoT Hub's size limit.
    #[error("the message is {size} bytes; D2C messages are at most {D2C_MAX_MESSAGE_BYTES}")]
    TooLarge {
        /// Its size.
        size: usize,
    },
    /// A packet a client must not send (a second CONNECT, a SUBACK, …).
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// Tier throttling: a D2C send past the shaping backlog or the daily quota. IoT Hub answers
    /// MQTT errors other than on twin topics by closing the connection (reference §4.8).
    #[error("{0}")]
    Throttled(HubError),
}

/// A CONNECT the hub accepted.
#[derive(Debug)]
pub struct Accepted {
    /// The session, ready for packets.
    pub session: Session,
    /// Hub events (and the kick) for the driver.
    pub link: Attached,
    /// The CONNACK to send.
    pub connack: Packet,
    /// Seconds of silence after which the connection is closed.
    pub keep_alive_secs: u64,
    /// When the device's token expires (seconds since the epoch, skew included).
    pub token_expiry_secs: u64,
}

/// A CONNECT's Will, validated: what is recorded as telemetry if the connection drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// The property bag of its topic (`devices/{id}/messages/events/{bag}`).
    pub properties: topics::PropertyBag,
    /// The payload, at most [`D2C_MAX_MESSAGE_BYTES`].
    pub payload: Bytes,
    /// The QoS the device asked for (the hub records the Will whatever it is).
    pub qos: QoS,
    /// The RETAIN flag: becomes `mqtt-retain=true`, as for a retained PUBLISH.
    pub retain: bool,
}

/// Checks a CONNECT's Will against the device's telemetry topic and the D2C size limit.
fn validate_will(device_id: &str, will: &rumqttc::mqttbytes::v4::LastWill) -> Result<Will, String> {
    let properties = match topics::parse_publish_topic(device_id, &will.topic) {
        Ok(DeviceTopic::Telemetry(bag)) => bag,
        _ => {
            return Err(format!(
                "the Will topic '{}' is not this device's 'devices/{device_id}/messages/events/' (+ property bag)",
                will.topic
            ));
        }
    };
    if will.message.len() > D2C_MAX_MESSAGE_BYTES {
        return Err(format!(
            "the Will payload is {} bytes; D2C messages are at most {D2C_MAX_MESSAGE_BYTES}",
            will.message.len()
        ));
    }
    // A copy, not a slice of the CONNECT's frame: the Will outlives the read buffer it came in.
    let payload = Bytes::copy_from_slice(&will.message);
    Ok(Will { properties, payload, qos: will.qos, retain: will.retain })
}

/// A refused CONNECT: the CONNACK code to send before closing, and why (logged once).
#[derive(Debug)]
pub struct Refused {
    /// The CONNACK return code.
    pub code: ConnectReturnCode,
    /// What was wrong.
    pub reason: String,
}

fn refuse(code: ConnectReturnCode, reason: impl Into<String>) -> Refused {
    Refused { code, reason: reason.into() }
}

/// Checks a CONNECT (reference §4.2): protocol 3.1.1, client id = device id, username
/// `{hostname}/{deviceId}/?api-version=…`, password a SAS token for that device; or, for a module
/// (reference-2 §4.2), client id `{deviceId}/{moduleId}`, username
/// `{hostname}/{deviceId}/{moduleId}/?api-version=…` and a token for
/// `{hostname}/devices/{deviceId}/modules/{moduleId}` signed with the module's key. On success the
/// device's connection is registered with the hub (closing an older one). With a tier, a CONNECT
/// past the new-connections backlog is refused with `0x03 Server unavailable`, and a shaped one
/// holds the session (its CONNACK goes out at its turn, see [`Session::take_hold`]).
pub fn accept_connect(hub: &Hub, c: &Connect) -> Result<Accepted, Refused> {
    accept_connect_with(hub, c, None)
}

/// [`accept_connect`] for a session served without a task of its own: hub events for it are
/// announced through `ready` (see [`crate::hub::link::ReadySet`]).
pub fn accept_connect_with(
    hub: &Hub,
    c: &Connect,
    ready: Option<crate::hub::link::ReadyHook>,
) -> Result<Accepted, Refused> {
    accept_connect_tls(hub, c, ready, None)
}

/// [`accept_connect_with`] for a connection whose TLS client presented `client_cert`: a CONNECT
/// with a user name and no password then authenticates with the certificate (X.509 devices,
/// reference-2 §3.3); one with a password is a SAS device as ever.
pub fn accept_connect_tls(
    hub: &Hub,
    c: &Connect,
    ready: Option<crate::hub::link::ReadyHook>,
    client_cert: Option<&crate::x509::ClientChain>,
) -> Result<Accepted, Refused> {
    use ConnectReturnCode::*;
    if c.protocol != rumqttc::mqttbytes::Protocol::V4 {
        return Err(refuse(RefusedProtocolVersion, "only MQTT 3.1.1 (protocol level 4) is supported"));
    }
    let id = c.client_id.as_str();
    let (device_id, module_id) = crate::hub::module::split_client_id(id);
    let id_ok = crate::hub::validate_device_id(device_id).is_ok()
        && module_id.is_none_or(|m| crate::hub::module::validate_module_id(m).is_ok());
    if !id_ok {
        return Err(refuse(
            BadClientId,
            format!("client id '{id}' is not a device id or a '{{deviceId}}/{{moduleId}}' module identity"),
        ));
    }
    let Some(login) = &c.login else {
        return Err(refuse(
            BadUserNamePassword,
            "a username and a password (a SAS token) or a TLS client certificate are required",
        ));
    };
    let expected = format!("{}/{id}/", hub.hostname());
    let user_ok = login.username.get(..expected.len()).is_some_and(|p| p.eq_ignore_ascii_case(&expected))
        && login.username.get(expected.len()..).is_some_and(|rest| rest.is_empty() || rest.starts_with('?'));
    if !user_ok {
        return Err(refuse(
            BadUserNamePassword,
            format!("username '{}' must be '{expected}?api-version=…'", login.username),
        ));
    }
    let model_id = model_id(&login.username[expected.len()..]).map_err(|r| refuse(BadUserNamePassword, r))?;
    let credential_expiry_secs = match client_cert {
        Some(_) if login.password.is_empty() && module_id.is_some() => {
            return Err(refuse(
                NotAuthorized,
                format!(
                    "module '{id}' presented a client certificate: the emulator authenticates modules with SAS tokens only"
                ),
            ));
        }
        Some(chain) if login.password.is_empty() => hub
            .authenticate_x509(chain, id)
            .map_err(|e| refuse(NotAuthorized, format!("{}: {}", e.code.name(), e.message)))?,
        _ => {
            let auth = hub
                .authenticate_client(&login.password, id)
                .map_err(|e| refuse(NotAuthorized, format!("{}: {}", e.code.name(), e.message)))?;
            auth.expiry_secs.saturating_add(hub.config().sas_skew_secs)
        }
    };
    // Checked before attaching, so a refused Will does not close the device's current connection.
    let will = match &c.last_will {
        Some(w) => Some(Box::new(validate_will(id, w).map_err(|reason| refuse(NotAuthorized, reason))?)),
        None => None,
    };
    // Tier throttling of new connections, once the credentials verified (a forged CONNECT spends
    // nothing): past the backlog the CONNECT is refused; a shaped one gets its CONNACK at its turn.
    let hold_until = match hub.admit(Op::DeviceConnect, 1) {
        Admission::Now => None,
        Admission::Shaped { at_ms } => Some(at_ms),
        Admission::Refused(r) => return Err(refuse(ServiceUnavailable, hub.throttle_error(&r).to_string())),
    };
    let link = hub
        .attach_link_with(id, c.clean_session, ready)
        .map_err(|e| refuse(NotAuthorized, format!("{}: {}", e.code.name(), e.message)))?;
    if let Some(m) = &model_id {
        hub.announce_model_id(id, m);
    }
    let session_present = !c.clean_session && link.session != 0;
    let keep_alive_secs = match c.keep_alive {
        0 => MQTT_MAX_KEEP_ALIVE_WAIT_SECS,
        k => (u64::from(k) * 3).div_ceil(2).min(MQTT_MAX_KEEP_ALIVE_WAIT_SECS),
    };
    let mut session = Session::new(id.to_string(), link.conn_id, c.clean_session, link.session);
    session.will = will;
    session.hold_until = hold_until;
    Ok(Accepted {
        session,
        link,
        connack: Packet::ConnAck(ConnAck::new(Success, session_present)),
        keep_alive_secs,
        token_expiry_secs: credential_expiry_secs,
    })
}

/// Longest Plug and Play model id accepted (the DTDL v2 limit on a DTMI).
pub const MODEL_ID_MAX_CHARS: usize = 4096;

/// The Plug and Play model id in the MQTT username's query (`?api-version=…&model-id=dtmi%3A…`,
/// reference-2 §5), percent-decoded; `None` without one. A value that is not a DTMI is refused.
pub fn model_id(query: &str) -> Result<Option<String>, String> {
    let query = query.strip_prefix('?').unwrap_or(query);
    let Some(raw) = query.split('&').find_map(|kv| kv.strip_prefix("model-id=")) else {
        return Ok(None);
    };
    let value = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
    let ok = value.len() <= MODEL_ID_MAX_CHARS
        && value.strip_prefix("dtmi:").is_some_and(|rest| !rest.is_empty())
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | ';' | '_'));
    if !ok {
        return Err(format!(
            "model-id '{}' is not a DTMI (dtmi:<path>;<version>, at most {MODEL_ID_MAX_CHARS} characters)",
            value.chars().take(80).collect::<String>()
        ));
    }
    Ok((!value.is_empty()).then(|| value.into_owned()))
}

/// One connected device's session.
#[derive(Debug)]
pub struct Session {
    device_id: String,
    conn_id: u64,
    clean: bool,
    subs: u8,
    /// C2D publishes awaiting PUBACK, oldest first (at most [`MQTT_C2D_INFLIGHT_WINDOW`]).
    inflight: VecDeque<(u16, LockToken)>,
    last_pkid: u16,
    /// Direct-method calls sent to the device, by request id.
    methods: Vec<(String, oneshot::Sender<MethodReply>)>,
    last_rid: u64,
    /// The CONNECT's Will until DISCONNECT discards it (boxed: most devices set none).
    will: Option<Box<Will>>,
    /// Tier throttling: hub time until which shaped requests hold the connection (the driver
    /// writes their answers and reads on only then). Always `None` without a tier.
    hold_until: Option<crate::clock::Millis>,
}

impl Session {
    fn new(device_id: String, conn_id: u64, clean: bool, subs: u8) -> Self {
        Self {
            device_id,
            conn_id,
            clean,
            subs,
            inflight: VecDeque::new(),
            last_pkid: 0,
            methods: Vec::new(),
            last_rid: 0,
            will: None,
            hold_until: None,
        }
    }

    /// The device this session serves.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// The subscription bits (`hub::link::subscriptions`).
    pub fn subscriptions(&self) -> u8 {
        self.subs
    }

    /// The Will to record if the connection ends without a DISCONNECT.
    pub fn will(&self) -> Option<&Will> {
        self.will.as_deref()
    }

    /// Drops the Will without recording it (the hub is shutting down).
    pub fn discard_will(&mut self) {
        self.will = None;
    }

    /// Takes the hold shaped requests put on the connection: the hub time before which the driver
    /// should neither write the answers nor read more packets (tier throttling's backpressure).
    pub fn take_hold(&mut self) -> Option<crate::clock::Millis> {
        self.hold_until.take()
    }

    /// Applies the tier throttle's admission for a request: `Ok` to go ahead (holding the
    /// connection until a shaped request's turn), `Err` with IoT Hub's error when refused.
    fn admitted(&mut self, admission: Admission, hub: &Hub) -> Result<(), HubError> {
        match admission {
            Admission::Now => Ok(()),
            Admission::Shaped { at_ms } => {
                self.hold_until = Some(self.hold_until.map_or(at_ms, |h| h.max(at_ms)));
                Ok(())
            }
            Admission::Refused(r) => Err(hub.throttle_error(&r)),
        }
    }

    /// C2D deliveries awaiting PUBACK.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Starts the session: delivers queued C2D if a kept subscription asks for it.
    pub fn start(&mut self, hub: &Hub, out: &mut Vec<Packet>) {
        self.pump_c2d(hub, out);
    }

    /// Handles one packet from the device (see [`operation`] for how its handling is timed).
    pub fn handle_packet(&mut self, hub: &Hub, packet: Packet, out: &mut Vec<Packet>) -> Result<(), Close> {
        if let Packet::PubAck(ack) = &packet {
            // Settling, recording the activity and publishing the next message are one visit to
            // the device's shard.
            self.on_puback(hub, ack.pkid, out);
            return Ok(());
        }
        hub.touch_device(&self.device_id);
        match packet {
            Packet::Publish(p) => self.on_publish(hub, p, out)?,
            Packet::PubAck(_) => unreachable!("handled above"),
            Packet::Subscribe(s) => {
                let codes = s
                    .filters
                    .iter()
                    .map(|f| match topics::parse_subscription(&self.device_id, &f.path) {
                        Some(bit) => {
                            self.subs |= bit;
                            SubscribeReasonCode::Success(match f.qos {
                                QoS::AtMostOnce => QoS::AtMostOnce,
                                _ => QoS::AtLeastOnce,
                            })
                        }
                        None => {
                            tracing::info!(device = %self.device_id, filter = %f.path, "subscription refused");
                            SubscribeReasonCode::Failure
                        }
                    })
                    .collect();
                hub.save_session(&self.device_id, self.conn_id, self.subs);
                out.push(Packet::SubAck(SubAck::new(s.pkid, codes)));
            }
            Packet::Unsubscribe(u) => {
                for f in &u.topics {
                    if let Some(bit) = topics::parse_subscription(&self.device_id, f) {
                        self.subs &= !bit;
                    }
                }
                hub.save_session(&self.device_id, self.conn_id, self.subs);
                out.push(Packet::UnsubAck(UnsubAck { pkid: u.pkid }));
            }
            Packet::PingReq => out.push(Packet::PingResp),
            Packet::Disconnect => {
                // MQTT 3.1.1 §3.14.4: a DISCONNECT discards the Will.
                self.will = None;
                return Err(Close::ClientDisconnect);
            }
            Packet::Connect(_) => return Err(Close::Protocol("a second CONNECT on one connection")),
            Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => return Err(Close::QoS2),
            _ => return Err(Close::Protocol("a packet only a server sends")),
        }
        self.pump_c2d(hub, out);
        Ok(())
    }

    /// Handles one hub event for this connection.
    pub fn handle_event(&mut self, hub: &Hub, event: LinkEvent, out: &mut Vec<Packet>) {
        match event {
            LinkEvent::C2dAvailable => {}
            // Locked for this session when it was sent: no need to ask the queue (the hub only
            // hands over while the window has room; see `hub::link`).
            LinkEvent::C2dHanded(delivery)
                if self.subs & subscriptions::C2D != 0 && self.inflight.len() < MQTT_C2D_INFLIGHT_WINDOW =>
            {
                publish_c2d(&self.device_id, &mut self.last_pkid, &mut self.inflight, &delivery, out);
                return;
            }
            LinkEvent::C2dHanded(delivery) => {
                // Unsubscribed meanwhile: back to the queue, for the next subscription to find.
                let _ = hub.settle_c2d(&self.device_id, delivery.lock_token, Settlement::Release);
            }
            LinkEvent::DesiredPatch(patch) if self.subs & subscriptions::DESIRED != 0 => {
                let version = patch.get("$version").and_then(Value::as_u64).unwrap_or(0);
                let body = serde_json::to_vec(&patch).unwrap_or_default();
                out.push(publish0(topics::desired_patch_topic(version), body.into()));
            }
            LinkEvent::DesiredPatch(_) => {}
            LinkEvent::Method(call) if self.subs & subscriptions::METHODS != 0 => {
                self.last_rid += 1;
                let rid = self.last_rid.to_string();
                out.push(publish0(topics::method_request_topic(&call.name, &rid), call.payload));
                self.methods.retain(|(_, tx)| !tx.is_closed());
                self.methods.push((rid, call.reply));
            }
            // Dropping the reply sender tells the caller the device is not listening.
            LinkEvent::Method(_) => {}
        }
        self.pump_c2d(hub, out);
    }

    /// Ends the session: a Will still held (no DISCONNECT came) is recorded as telemetry unless the
    /// device was deleted or disabled meanwhile, the hub forgets the connection (and the
    /// subscriptions under clean session), unacknowledged C2D messages go back to the queue (with
    /// one still handed over in `link`, the connection's mailbox), and pending method calls fail.
    /// The Will is recorded before the device shows as disconnected.
    pub fn close(self, hub: &Hub, link: &LinkReceiver) {
        if let Some(will) = self.will
            && hub.device_may_send(&self.device_id)
        {
            let Will { properties, payload, retain, .. } = *will;
            let mut msg = telemetry(&self.device_id, properties, retain, payload);
            // The hub's marker wins over a bag property of the same name.
            msg.properties.retain(|(k, _)| !k.eq_ignore_ascii_case("iothub-MessageType"));
            msg.properties.push(("iothub-MessageType".into(), "Will".into()));
            hub.record_telemetry(msg);
            tracing::debug!(device = %self.device_id, "MQTT Will recorded as telemetry");
        }
        // Detached first: the hub hands nothing over to a link it no longer has, so what the
        // mailbox holds after this is all there will be.
        hub.detach_link(&self.device_id, self.conn_id, !self.clean);
        let handed = link.take_handed().map(|d| d.lock_token);
        for token in self.inflight.iter().map(|(_, t)| *t).chain(handed) {
            let _ = hub.settle_c2d(&self.device_id, token, Settlement::Release);
        }
        if !self.inflight.is_empty() || handed.is_some() {
            hub.wake_c2d(&self.device_id);
        }
    }

    fn on_publish(&mut self, hub: &Hub, p: Publish, out: &mut Vec<Packet>) -> Result<(), Close> {
        if p.qos == QoS::ExactlyOnce {
            return Err(Close::QoS2);
        }
        let topic = topics::parse_publish_topic(&self.device_id, &p.topic)?;
        // Every check that can refuse the message comes before the PUBACK: a device must never be
        // told that a message it then loses was delivered (MQTT 3.1.1 §4.3.2).
        if matches!(topic, DeviceTopic::Telemetry(_)) {
            if p.payload.len() > D2C_MAX_MESSAGE_BYTES {
                return Err(Close::TooLarge { size: p.payload.len() });
            }
            let admission = hub.admit_message(Op::D2cSend, p.payload.len());
            self.admitted(admission, hub).map_err(Close::Throttled)?;
        }
        if p.qos == QoS::AtLeastOnce {
            out.push(Packet::PubAck(PubAck::new(p.pkid)));
        }
        match topic {
            DeviceTopic::Telemetry(bag) => {
                hub.record_telemetry(telemetry(&self.device_id, bag, p.retain, p.payload));
            }
            DeviceTopic::TwinGet { rid } => match self
                .admitted(hub.admit(Op::TwinRead, 1), hub)
                .and_then(|()| hub.device_twin_properties(&self.device_id))
            {
                Ok(twin) => out.push(publish0(
                    topics::twin_response_topic(200, &rid, None),
                    serde_json::to_vec(&twin).unwrap_or_default().into(),
                )),
                Err(e) => out.push(twin_error(&self.device_id, &rid, &e)),
            },
            DeviceTopic::TwinPatchReported { rid } => {
                let result = self
                    .admitted(hub.admit(Op::TwinUpdate, 1), hub)
                    .and_then(|()| {
                        serde_json::from_slice::<Value>(&p.payload)
                            .map_err(|e| HubError::invalid(format!("the reported patch is not JSON: {e}")))
                    })
                    .and_then(|patch| hub.patch_reported(&self.device_id, &patch));
                match result {
                    Ok(v) => {
                        out.push(publish0(topics::twin_response_topic(204, &rid, Some(v)), Bytes::new()))
                    }
                    Err(e) => out.push(twin_error(&self.device_id, &rid, &e)),
                }
            }
            DeviceTopic::MethodResponse { status, rid } => {
                match self.methods.iter().position(|(r, _)| *r == rid) {
                    Some(i) => {
                        let (_, tx) = self.methods.swap_remove(i);
                        let _ = tx.send(MethodReply { status, payload: p.payload });
                    }
                    None => {
                        tracing::info!(device = %self.device_id, rid, "method response for no pending call")
                    }
                }
            }
        }
        Ok(())
    }

    /// A PUBACK: completes its delivery and publishes what the window now has room for, in one
    /// visit to the hub (which records the device's activity). A PUBACK for nothing in flight
    /// only records the activity and pumps.
    fn on_puback(&mut self, hub: &Hub, pkid: u16, out: &mut Vec<Packet>) {
        let Some(i) = self.inflight.iter().position(|(p, _)| *p == pkid) else {
            tracing::debug!(device = %self.device_id, pkid, "PUBACK for no in-flight message");
            hub.touch_device(&self.device_id);
            self.pump_c2d(hub, out);
            return;
        };
        let settled = self.inflight.remove(i).map(|(_, token)| (token, Settlement::Complete));
        if let Err(e) = self.settle_and_pump(hub, settled, out) {
            tracing::info!(device = %self.device_id, pkid, "late PUBACK: {}", e.message);
        }
    }

    /// Publishes queued C2D messages while the device is subscribed and the window has room.
    fn pump_c2d(&mut self, hub: &Hub, out: &mut Vec<Packet>) {
        let _ = self.settle_and_pump(hub, None, out);
    }

    /// Settles `settle` (if given), then publishes queued C2D messages while the device is
    /// subscribed and the window has room; one visit to the device's shard. Returns the
    /// settlement's failure (a lapsed lock), if any.
    fn settle_and_pump(
        &mut self,
        hub: &Hub,
        settle: Option<(LockToken, Settlement)>,
        out: &mut Vec<Packet>,
    ) -> Result<(), HubError> {
        let room = if self.subs & subscriptions::C2D != 0 {
            MQTT_C2D_INFLIGHT_WINDOW.saturating_sub(self.inflight.len())
        } else {
            0
        };
        if room == 0 && settle.is_none() {
            if self.inflight.is_empty() {
                self.inflight = VecDeque::new();
            }
            return Ok(());
        }
        let (inflight, last_pkid, device_id) = (&mut self.inflight, &mut self.last_pkid, &self.device_id);
        let conn = Some(self.conn_id);
        let result =
            hub.settle_and_receive_c2d(device_id, conn, settle, C2D_LOCK_TIMEOUT_MS, room, |delivery| {
                publish_c2d(device_id, last_pkid, inflight, &delivery, out);
            });
        if self.inflight.is_empty() {
            // An empty window gives its buffer back: most devices wait idle between messages.
            self.inflight = VecDeque::new();
        }
        match result {
            Ok((_, settled)) => settled,
            Err(e) => {
                tracing::debug!(device = %self.device_id, "C2D receive failed: {}", e.message);
                Ok(())
            }
        }
    }
}

/// Publishes `delivery` (QoS 1) under the next free packet id and puts it in flight.
fn publish_c2d(
    device_id: &str,
    last_pkid: &mut u16,
    inflight: &mut VecDeque<(u16, LockToken)>,
    delivery: &crate::c2d::Delivery,
    out: &mut Vec<Packet>,
) {
    let pkid = next_pkid(last_pkid, inflight);
    let mut publish = Publish::from_bytes(
        topics::c2d_topic(device_id, delivery),
        QoS::AtLeastOnce,
        delivery.message.body.clone(),
    );
    publish.pkid = pkid;
    out.push(Packet::Publish(publish));
    inflight.push_back((pkid, delivery.lock_token));
}

/// The next packet id after `last` that no in-flight publish uses.
fn next_pkid(last: &mut u16, inflight: &VecDeque<(u16, LockToken)>) -> u16 {
    loop {
        *last = last.checked_add(1).unwrap_or(1);
        if !inflight.iter().any(|(p, _)| *p == *last) {
            return *last;
        }
    }
}

fn publish0(topic: String, payload: Bytes) -> Packet {
    Packet::Publish(Publish::from_bytes(topic, QoS::AtMostOnce, payload))
}

fn twin_error(device_id: &str, rid: &str, e: &HubError) -> Packet {
    let status = e.code.http_status();
    if status == 429 {
        tracing::info!(device = %device_id, rid, code = e.code.name(), "twin request throttled: {}", e.message);
    }
    let body = json!({ "errorCode": e.code.number(), "message": e.message });
    publish0(
        topics::twin_response_topic(status, rid, None),
        serde_json::to_vec(&body).unwrap_or_default().into(),
    )
}

/// A telemetry PUBLISH as a D2C message: `$.`-keys become system properties under their AMQP
/// names, the rest application properties (`mqtt-retain` added for RETAIN, as IoT Hub does).
/// `client_id` is the device id or a module's `{deviceId}/{moduleId}` (then the message carries
/// `iothub-connection-module-id` and the module auth method).
fn telemetry(client_id: &str, bag: topics::PropertyBag, retain: bool, body: Bytes) -> D2cMessage {
    let (device_id, module_id) = crate::hub::module::split_client_id(client_id);
    let mut system = Vec::new();
    let mut properties = Vec::new();
    for (k, v) in bag {
        let v = v.unwrap_or_default();
        match k.strip_prefix("$.") {
            Some(sys) => {
                let name = match sys {
                    "mid" => "message-id",
                    "cid" => "correlation-id",
                    "uid" => "user-id",
                    "ct" => "content-type",
                    "ce" => "content-encoding",
                    "exp" => "absolute-expiry-time",
                    other => other,
                };
                system.push((name.to_string(), v));
            }
            None => properties.push((k, v)),
        }
    }
    if retain {
        properties.push(("mqtt-retain".into(), "true".into()));
    }
    D2cMessage {
        device_id: device_id.to_string(),
        module_id: module_id.map(str::to_string),
        auth: if module_id.is_some() {
            crate::hub::events::AuthMethod::ModuleSas
        } else {
            crate::hub::events::AuthMethod::DeviceSas
        },
        system_properties: system,
        properties,
        body,
    }
}

/// The `operation` a device packet's handling is timed under in the metrics (by topic for a
/// PUBLISH, without parsing it).
pub fn operation(packet: &Packet) -> crate::metrics::Operation {
    use crate::metrics::Operation as O;
    match packet {
        Packet::Publish(p) if p.topic.starts_with("$iothub/twin/GET") => O::TwinRead,
        Packet::Publish(p) if p.topic.starts_with("$iothub/twin/") => O::TwinUpdate,
        Packet::Publish(p) if p.topic.starts_with("$iothub/methods/") => O::DirectMethod,
        Packet::Publish(_) => O::D2cSend,
        Packet::PubAck(_) => O::C2dSettle,
        Packet::Subscribe(_) | Packet::Unsubscribe(_) => O::Subscribe,
        Packet::PingReq => O::Ping,
        _ => O::Other,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rumqttc::mqttbytes::v4::{LastWill, Subscribe, Unsubscribe};

    use super::*;
    use crate::c2d::C2dMessage;
    use crate::clock::ManualClock;
    use crate::hub::link::MethodCall;
    use crate::hub::{DeviceInput, HubConfig};
    use crate::sas::make_token;

    const START_MS: u64 = 1_700_000_000_000;

    struct Fixture {
        hub: Hub,
        clock: ManualClock,
        key: String,
    }

    fn fixture(id: &str) -> Fixture {
        let clock = ManualClock::new(START_MS);
        let hub = Hub::with_clock(HubConfig::default(), Arc::new(clock.clone()));
        hub.put_device(id, DeviceInput::default(), None).unwrap();
        let key = hub.device_primary_key(id).unwrap().unwrap();
        Fixture { hub, clock, key }
    }

    fn connect_packet(f: &Fixture, id: &str, clean: bool) -> Connect {
        let token =
            make_token(&format!("localhost/devices/{id}"), &f.key, None, START_MS / 1000 + 3600).unwrap();
        let mut c = Connect::new(id);
        c.clean_session = clean;
        c.keep_alive = 60;
        c.set_login(format!("localhost/{id}/?api-version=2021-04-12&DeviceClientType=x"), token);
        c
    }

    fn connect(f: &Fixture, id: &str, clean: bool) -> (Accepted, Vec<Packet>) {
        let mut a = accept_connect(&f.hub, &connect_packet(f, id, clean)).unwrap();
        let mut out = Vec::new();
        a.session.start(&f.hub, &mut out);
        (a, out)
    }

    fn send(f: &Fixture, id: &str, mid: &str) {
        let msg = C2dMessage {
            message_id: Some(mid.into()),
            properties: vec![("k".into(), "v".into())],
            body: Bytes::from(format!("body of {mid}")),
            ..Default::default()
        };
        f.hub.send_c2d(id, msg).unwrap();
    }

    fn subscribe(s: &mut Session, hub: &Hub, filters: &[&str]) -> Vec<Packet> {
        let mut sub = Subscribe::new(filters[0], QoS::AtLeastOnce);
        for f in &filters[1..] {
            sub.add(f.to_string(), QoS::ExactlyOnce);
        }
        sub.pkid = 7;
        let mut out = Vec::new();
        s.handle_packet(hub, Packet::Subscribe(sub), &mut out).unwrap();
        out
    }

    fn publishes(out: &[Packet]) -> Vec<&Publish> {
        out.iter().filter_map(|p| if let Packet::Publish(p) = p { Some(p) } else { None }).collect()
    }

    fn pending(f: &Fixture, id: &str) -> u64 {
        f.hub.get_device(id).unwrap()["cloudToDeviceMessageCount"].as_u64().unwrap()
    }

    #[test]
    fn the_model_id_comes_from_the_username_query_decoded() {
        assert_eq!(model_id("?api-version=2021-04-12&DeviceClientType=x").unwrap(), None);
        assert_eq!(model_id("").unwrap(), None);
        let q = "?api-version=2020-09-30&DeviceClientType=py&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1";
        assert_eq!(model_id(q).unwrap().as_deref(), Some("dtmi:com:example:Thermostat;1"));
        assert_eq!(model_id("?model-id=dtmi:a:b;2").unwrap().as_deref(), Some("dtmi:a:b;2"), "unencoded");
        for bad in ["?model-id=", "?model-id=urn%3Ax", "?model-id=dtmi%3A", "?model-id=dtmi%3Aa%20b%3B1"] {
            assert!(model_id(bad).is_err(), "{bad}");
        }
        let long = format!("?model-id=dtmi:{}", "a".repeat(MODEL_ID_MAX_CHARS));
        assert!(model_id(&long).is_err());
    }

    #[test]
    fn a_connect_with_a_model_id_sets_the_twins_model_id_and_a_bad_one_is_refused() {
        let f = fixture("pnp");
        let twin_model = |f: &Fixture| f.hub.get_twin("pnp").unwrap()["modelId"].clone();
        assert_eq!(twin_model(&f), serde_json::json!(""));
        let mut c = connect_packet(&f, "pnp", true);
        c.login.as_mut().unwrap().username.push_str("&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1");
        accept_connect(&f.hub, &c).unwrap();
        assert_eq!(twin_model(&f), serde_json::json!("dtmi:com:example:Thermostat;1"));
        assert!(f.hub.get_device("pnp").unwrap().get("modelId").is_none(), "the identity has no modelId");
        // Reconnecting without one keeps the last announced value.
        accept_connect(&f.hub, &connect_packet(&f, "pnp", true)).unwrap();
        assert_eq!(twin_model(&f), serde_json::json!("dtmi:com:example:Thermostat;1"));
        c.login.as_mut().unwrap().username.push_str("x%20y");
        assert_eq!(accept_connect(&f.hub, &c).unwrap_err().code, ConnectReturnCode::BadUserNamePassword);
    }

    #[test]
    fn refusals_get_the_right_connack_codes() {
        let f = fixture("d1");
        let mut forged = connect_packet(&f, "d1", false);
        let other_key = crate::sas::generate_key();
        let token = make_token("localhost/devices/d1", &other_key, None, START_MS / 1000 + 3600).unwrap();
        forged.set_login("localhost/d1/?api-version=2021-04-12", token.clone());
        assert_eq!(accept_connect(&f.hub, &forged).unwrap_err().code, ConnectReturnCode::NotAuthorized);

        let mut bad_user = connect_packet(&f, "d1", false);
        bad_user.login.as_mut().unwrap().username = "localhost/other/?api-version=1".into();
        assert_eq!(
            accept_connect(&f.hub, &bad_user).unwrap_err().code,
            ConnectReturnCode::BadUserNamePassword
        );

        let mut no_login = connect_packet(&f, "d1", false);
        no_login.login = None;
        assert_eq!(
            accept_connect(&f.hub, &no_login).unwrap_err().code,
            ConnectReturnCode::BadUserNamePassword
        );

        let mut bad_id = connect_packet(&f, "d1", false);
        for bad in ["d1/module/x", "d1/", "/m", "has space"] {
            bad_id.client_id = bad.into();
            assert_eq!(
                accept_connect(&f.hub, &bad_id).unwrap_err().code,
                ConnectReturnCode::BadClientId,
                "{bad}"
            );
        }

        let mut v5 = connect_packet(&f, "d1", false);
        v5.protocol = rumqttc::mqttbytes::Protocol::V5;
        assert_eq!(accept_connect(&f.hub, &v5).unwrap_err().code, ConnectReturnCode::RefusedProtocolVersion);

        f.clock.advance(3 * 3600 * 1000);
        let expired = connect_packet(&f, "d1", false);
        assert_eq!(accept_connect(&f.hub, &expired).unwrap_err().code, ConnectReturnCode::NotAuthorized);
        assert_eq!(f.hub.get_device("d1").unwrap()["connectionState"], "Disconnected");
    }

    #[test]
    fn offline_c2d_arrives_completes_on_puback_and_unacked_is_redelivered() {
        let f = fixture("d1");
        let (a, _) = connect(&f, "d1", false);
        let mut s = a.session;
        subscribe(&mut s, &f.hub, &["devices/d1/messages/devicebound/#"]);
        s.close(&f.hub, &a.link.events);
        assert_eq!(f.hub.get_device("d1").unwrap()["connectionState"], "Disconnected");

        send(&f, "d1", "m1");
        send(&f, "d1", "m2");
        let (a, out) = connect(&f, "d1", false);
        assert_eq!(a.connack, Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, true)));
        assert_eq!(f.hub.get_device("d1").unwrap()["connectionState"], "Connected");
        let mut s = a.session;
        let got = publishes(&out);
        assert_eq!(got.len(), 2, "both offline messages arrive without a new SUBSCRIBE");
        assert_eq!(got[0].qos, QoS::AtLeastOnce);
        assert_eq!(&got[0].payload[..], b"body of m1");
        assert!(got[0].topic.starts_with("devices/d1/messages/devicebound/%24.mid=m1&"), "{}", got[0].topic);
        assert!(got[0].topic.ends_with("iothub-ack=none&k=v"), "{}", got[0].topic);
        let p1 = got[0].pkid;
        assert_ne!(p1, got[1].pkid);

        let mut out = Vec::new();
        s.handle_packet(&f.hub, Packet::PubAck(PubAck::new(p1)), &mut out).unwrap();
        assert_eq!(pending(&f, "d1"), 1, "the PUBACK completed m1");
        s.close(&f.hub, &a.link.events);

        let (a, out) = connect(&f, "d1", false);
        let got = publishes(&out);
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].payload[..], b"body of m2", "m2 was never PUBACKed: redelivered");
        let mut out2 = Vec::new();
        let mut s = a.session;
        s.handle_packet(&f.hub, Packet::PubAck(PubAck::new(got[0].pkid)), &mut out2).unwrap();
        assert_eq!(pending(&f, "d1"), 0);
    }

    #[test]
    fn clean_session_keeps_nothing() {
        let f = fixture("d1");
        let (a, _) = connect(&f, "d1", false);
        let mut s = a.session;
        subscribe(&mut s, &f.hub, &["devices/d1/messages/devicebound/#"]);
        s.close(&f.hub, &a.link.events);
        send(&f, "d1", "m1");
        let (a, out) = connect(&f, "d1", true);
        assert_eq!(a.connack, Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)));
        assert!(publishes(&out).is_empty(), "no subscription survives clean_session=1");
        a.session.close(&f.hub, &a.link.events);
        let (a, out) = connect(&f, "d1", false);
        assert!(publishes(&out).is_empty(), "the clean session's end left nothing behind");
        assert_eq!(a.session.subscriptions(), 0);
    }

    #[test]
    fn subscriptions_to_other_devices_fail_and_qos2_is_granted_1() {
        let f = fixture("d1");
        let (a, _) = connect(&f, "d1", false);
        let mut s = a.session;
        let out = subscribe(
            &mut s,
            &f.hub,
            &["devices/d2/messages/devicebound/#", "$iothub/twin/res/#", "$iothub/methods/POST/#"],
        );
        let Packet::SubAck(ack) = &out[0] else { panic!("{out:?}") };
        assert_eq!(ack.pkid, 7);
        assert_eq!(
            ack.return_codes,
            vec![
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
            ]
        );
        assert_eq!(s.subscriptions(), subscriptions::TWIN_RESPONSES | subscriptions::METHODS);
        let mut out = Vec::new();
        let unsub = Unsubscribe { pkid: 8, topics: vec!["$iothub/methods/POST/#".into()] };
        s.handle_packet(&f.hub, Packet::Unsubscribe(unsub), &mut out).unwrap();
        assert_eq!(out, vec![Packet::UnsubAck(UnsubAck { pkid: 8 })]);
        assert_eq!(s.subscriptions(), subscriptions::TWIN_RESPONSES);
    }

    #[test]
    fn forbidden_publishes_close_the_connection() {
        let f = fixture("d1");
        let (a, _) = connect(&f, "d1", false);
        let mut s = a.session;
        let mut out = Vec::new();
        let other = Publish::new("devices/d2/messages/events/", QoS::AtLeastOnce, "x");
        assert!(matches!(s.handle_packet(&f.hub, Packet::Publish(other), &mut out), Err(Close::Topic(_))));
        let qos2 = Publish::new("devices/d1/messages/events/", QoS::ExactlyOnce, "x");
        assert!(matches!(s.handle_packet(&f.hub, Packet::Publish(qos2), &mut out), Err(Close::QoS2)));
        // At QoS 1: no PUBACK for a message that is not recorded (issue 11, finding 3).
        let mut big = Publish::new(
            "devices/d1/messages/events/",
            QoS::AtLeastOnce,
            vec![0u8; D2C_MAX_MESSAGE_BYTES + 1],
        );
        big.pkid = 9;
        assert!(matches!(
            s.handle_packet(&f.hub, Packet::Publish(big), &mut out),
            Err(Close::TooLarge { .. })
        ));
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn telemetry_is_recorded_with_properties_and_acked() {
        let f = fixture("d1");
        let (a, _) = connect(&f, "d1", false);
        let mut s = a.session;
        let mut p = Publish::new(
            "devices/d1/messages/events/%24.mid=m9&%24.ct=application%2Fjson&temp=21",
            QoS::AtLeastOnce,
            "{}",
        );
        p.pkid = 3;
        let mut out = Vec::new();
        s.handle_packet(&f.hub, Packet::Publish(p), &mut out).unwrap();
        assert_eq!(out, vec![Packet::PubAck(PubAck::new(3))]);
        let got = f.hub.read_telemetry(Some("d1"), 0, 10);
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].system_properties,
            vec![("message-id".into(), "m9".into()), ("content-type".into(), "application/json".into())]
        );
        assert_eq!(got[0].properties, vec![("temp".to_string(), "21".to_string())]);
    }

    #[test]
    fn twin_get_and_reported_patch_answer_without_a_subscription() {
        let f = fixture("d1");
        let (a, _) = connect(&f, "d1", false);
        let mut s = a.session;
        let mut out = Vec::new();
        let patch = Publish::new(
            "$iothub/twin/PATCH/properties/reported/?$rid=p1",
            QoS::AtMostOnce,
            r#"{"fw":"1.2"}"#,
        );
        s.handle_packet(&f.hub, Packet::Publish(patch), &mut out).unwrap();
        let get = Publish::new("$iothub/twin/GET/?$rid=g1", QoS::AtLeastOnce, " ");
        s.handle_packet(&f.hub, Packet::Publish(get), &mut out).unwrap();
        let bad =
            Publish::new("$iothub/twin/PATCH/properties/reported/?$rid=p2", QoS::AtMostOnce, "not json");
        s.handle_packet(&f.hub, Packet::Publish(bad), &mut out).unwrap();
        let got = publishes(&out);
        assert_eq!(got[0].topic, "$iothub/twin/res/204/?$rid=p1&$version=2");
        assert_eq!(got[1].topic, "$iothub/twin/res/200/?$rid=g1");
        let twin: Value = serde_json::from_slice(&got[1].payload).unwrap();
        assert_eq!(twin["reported"]["fw"], "1.2");
        assert!(twin["desired"]["$version"].is_u64(), "{twin}");
        assert_eq!(got[2].topic, "$iothub/twin/res/400/?$rid=p2");
        let err: Value = serde_json::from_slice(&got[2].payload).unwrap();
        assert_eq!(err["errorCode"], 400004);
    }

    #[test]
    fn desired_patches_and_methods_reach_subscribed_sessions() {
        let f = fixture("d1");
        let (a, _) = connect(&f, "d1", false);
        let mut s = a.session;
        let link = a.link;
        let mut out = Vec::new();
        s.handle_event(&f.hub, LinkEvent::DesiredPatch(Box::new(json!({"a": 1, "$version": 2}))), &mut out);
        assert!(out.is_empty(), "not subscribed to desired");
        subscribe(&mut s, &f.hub, &["$iothub/twin/PATCH/properties/desired/#", "$iothub/methods/POST/#"]);

        f.hub.update_twin("d1", &json!({"properties": {"desired": {"a": 1}}}), None, false).unwrap();
        let event = link.events.try_recv().expect("the hub queued the desired patch");
        let mut out = Vec::new();
        s.handle_event(&f.hub, event, &mut out);
        let got = publishes(&out);
        assert_eq!(got[0].topic, "$iothub/twin/PATCH/properties/desired/?$version=2");
        let body: Value = serde_json::from_slice(&got[0].payload).unwrap();
        assert_eq!(body, json!({"a": 1, "$version": 2}));

        let (reply, mut rx) = oneshot::channel();
        let call = MethodCall { name: "reboot".into(), payload: Bytes::from_static(b"{\"delay\":1}"), reply };
        let mut out = Vec::new();
        s.handle_event(&f.hub, LinkEvent::Method(Box::new(call)), &mut out);
        let got = publishes(&out);
        assert_eq!(got[0].topic, "$iothub/methods/POST/reboot/?$rid=1");
        assert_eq!(&got[0].payload[..], b"{\"delay\":1}");
        let res = Publish::new("$iothub/methods/res/201/?$rid=1", QoS::AtMostOnce, r#"{"ok":true}"#);
        s.handle_packet(&f.hub, Packet::Publish(res), &mut Vec::new()).unwrap();
        let reply = rx.try_recv().unwrap();
        assert_eq!(reply.status, 201);
        assert_eq!(&reply.payload[..], br#"{"ok":true}"#);
    }

    #[test]
    fn inflight_window_is_bounded_and_lapsed_locks_are_redelivered() {
        let f = fixture("d1");
        for i in 0..MQTT_C2D_INFLIGHT_WINDOW + 2 {
            send(&f, "d1", &format!("m{i}"));
        }
        let (a, _) = connect(&f, "d1", false);
        let mut s = a.session;
        let out = subscribe(&mut s, &f.hub, &["devices/d1/messages/devicebound/#"]);
        let got = publishes(&out);
        assert_eq!(got.len(), MQTT_C2D_INFLIGHT_WINDOW);
        assert_eq!(s.inflight(), MQTT_C2D_INFLIGHT_WINDOW);
        let first = got[0].pkid;
        let mut out = Vec::new();
        s.handle_packet(&f.hub, Packet::PubAck(PubAck::new(first)), &mut out).unwrap();
        assert_eq!(publishes(&out).len(), 1, "one PUBACK frees one slot");

        f.clock.advance(C2D_LOCK_TIMEOUT_MS + 1);
        let mut out = Vec::new();
        s.handle_packet(&f.hub, Packet::PingReq, &mut out).unwrap();
        assert_eq!(out[0], Packet::PingResp);
        assert!(publishes(&out).is_empty(), "the window is still full of unacknowledged deliveries");
        let mut out = Vec::new();
        let second = got[1].pkid;
        s.handle_packet(&f.hub, Packet::PubAck(PubAck::new(second)), &mut out).unwrap();
        let again = publishes(&out);
        assert_eq!(again.len(), 1);
        assert_eq!(
            &again[0].payload[..],
            b"body of m1",
            "m1's lock lapsed: its PUBACK came too late, it is redelivered"
        );
        assert_eq!(pending(&f, "d1"), (MQTT_C2D_INFLIGHT_WINDOW + 1) as u64);
    }

    #[test]
    fn a_puback_completes_records_activity_and_publishes_the_next_message_in_one_visit() {
        let f = fixture("d1");
        let (a, _) = connect(&f, "d1", false);
        let mut s = a.session;
        subscribe(&mut s, &f.hub, &["devices/d1/messages/devicebound/#"]);
        send(&f, "d1", "m1");
        let mut out = Vec::new();
        s.handle_event(&f.hub, LinkEvent::C2dAvailable, &mut out);
        let first = publishes(&out)[0].pkid;
        send(&f, "d1", "m2");
        let before = f.hub.get_device("d1").unwrap()["lastActivityTime"].clone();
        f.clock.advance(5_000);
        let mut out = Vec::new();
        s.handle_packet(&f.hub, Packet::PubAck(PubAck::new(first)), &mut out).unwrap();
        let got = publishes(&out);
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].payload[..], b"body of m2");
        assert_ne!(got[0].pkid, first);
        assert_eq!(pending(&f, "d1"), 1, "m1 completed, m2 locked");
        let after = f.hub.get_device("d1").unwrap()["lastActivityTime"].clone();
        assert_ne!(before, after, "the PUBACK recorded the activity");
        // A PUBACK whose lock lapsed still lets the next message out (the settlement fails alone).
        send(&f, "d1", "m3");
        f.clock.advance(C2D_LOCK_TIMEOUT_MS + 1);
        let mut out = Vec::new();
        s.handle_packet(&f.hub, Packet::PubAck(PubAck::new(got[0].pkid)), &mut out).unwrap();
        let again: Vec<_> = publishes(&out).iter().map(|p| p.payload.clone()).collect();
        assert_eq!(again, [Bytes::from_static(b"body of m2"), Bytes::from_static(b"body of m3")]);
    }

    /// A connection of `d1` subscribed to its C2D topic: its session and its link.
    fn c2d_session(f: &Fixture) -> (Session, Attached) {
        let (a, _) = connect(f, "d1", false);
        let mut s = a.session;
        subscribe(&mut s, &f.hub, &["devices/d1/messages/devicebound/#"]);
        (s, a.link)
    }

    /// The hand-over (see `hub::link`): a send to a session whose visit left room and found
    /// nothing is locked for it at once and published from the link, without asking the queue.
    #[test]
    fn a_send_to_an_idle_subscribed_session_is_handed_over_and_completes() {
        let f = fixture("d1");
        let (mut s, link) = c2d_session(&f);
        send(&f, "d1", "m1");
        let Some(LinkEvent::C2dHanded(d)) = link.events.try_recv() else { panic!("m1 was not handed over") };
        assert!(link.events.try_recv().is_none(), "no wake-up besides the hand-over");
        let mut out = Vec::new();
        s.handle_event(&f.hub, LinkEvent::C2dHanded(d), &mut out);
        let got = publishes(&out);
        assert_eq!(&got[0].payload[..], b"body of m1");
        assert!(got[0].topic.starts_with("devices/d1/messages/devicebound/%24.mid=m1&"), "{}", got[0].topic);
        assert_eq!(s.inflight(), 1);
        send(&f, "d1", "m2");
        assert!(
            matches!(link.events.try_recv(), Some(LinkEvent::C2dAvailable)),
            "a hand-over disarms: the next send only wakes the session"
        );
        let mut out = Vec::new();
        s.handle_packet(&f.hub, Packet::PubAck(PubAck::new(got[0].pkid)), &mut out).unwrap();
        assert_eq!(&publishes(&out)[0].payload[..], b"body of m2", "the PUBACK's visit takes m2");
        assert_eq!(pending(&f, "d1"), 1, "m1 completed");
        s.close(&f.hub, &link.events);
    }

    /// Hand-overs and visits together never put more than the window in flight, and a delivery
    /// left in the link is the visit's first.
    #[test]
    fn hand_overs_never_overfill_the_window() {
        let f = fixture("d1");
        let (mut s, link) = c2d_session(&f);
        for i in 0..MQTT_C2D_INFLIGHT_WINDOW + 3 {
            send(&f, "d1", &format!("m{i}"));
        }
        // The connection was slow: the hand-over (m0) is still in the link when the wake-up for
        // the others is handled, and the visit delivers it first.
        let mut out = Vec::new();
        s.handle_event(&f.hub, LinkEvent::C2dAvailable, &mut out);
        let got: Vec<_> = publishes(&out).iter().map(|p| p.payload.clone()).collect();
        assert_eq!(got.len(), MQTT_C2D_INFLIGHT_WINDOW);
        assert_eq!(&got[0][..], b"body of m0");
        assert_eq!(&got[1][..], b"body of m1");
        assert_eq!(s.inflight(), MQTT_C2D_INFLIGHT_WINDOW);
        while let Some(event) = link.events.try_recv() {
            assert!(!matches!(event, LinkEvent::C2dHanded(_)), "nothing handed over twice");
            s.handle_event(&f.hub, event, &mut out);
        }
        assert_eq!(s.inflight(), MQTT_C2D_INFLIGHT_WINDOW, "a full window is not armed");
        send(&f, "d1", "late");
        assert!(!matches!(link.events.try_recv(), Some(LinkEvent::C2dHanded(_))));
        s.close(&f.hub, &link.events);
    }

    /// A delivery still in the link when the connection ends goes back to the queue at once (not
    /// at its lock's lapse), and one handed to a session that unsubscribed meanwhile too.
    #[test]
    fn a_hand_over_not_taken_is_released() {
        let f = fixture("d1");
        let (s, link) = c2d_session(&f);
        send(&f, "d1", "m1");
        s.close(&f.hub, &link.events);
        let (b, out) = connect(&f, "d1", false);
        let got = publishes(&out);
        assert_eq!(&got[0].payload[..], b"body of m1", "released when the session closed");
        let mut s = b.session;
        let mut out = Vec::new();
        s.handle_packet(&f.hub, Packet::PubAck(PubAck::new(got[0].pkid)), &mut out).unwrap();
        let unsub = Unsubscribe { pkid: 9, topics: vec!["devices/d1/messages/devicebound/#".into()] };
        s.handle_packet(&f.hub, Packet::Unsubscribe(unsub), &mut out).unwrap();
        send(&f, "d1", "m2");
        let event = b.link.events.try_recv().expect("the PUBACK's visit armed the link");
        assert!(matches!(event, LinkEvent::C2dHanded(_)), "{event:?}");
        let mut out = Vec::new();
        s.handle_event(&f.hub, event, &mut out);
        assert!(publishes(&out).is_empty(), "unsubscribed: nothing is published");
        let again = f.hub.receive_c2d("d1", 1_000).unwrap().expect("m2 is back in the queue");
        assert_eq!(again.message.message_id.as_deref(), Some("m2"));
        s.close(&f.hub, &b.link.events);
    }

    #[test]
    fn messages_released_by_a_replaced_connection_wake_the_new_one() {
        let f = fixture("d1");
        send(&f, "d1", "m1");
        let (a, _) = connect(&f, "d1", false);
        let mut old = a.session;
        assert_eq!(publishes(&subscribe(&mut old, &f.hub, &["devices/d1/messages/devicebound/#"])).len(), 1);
        let (mut b, out) = connect(&f, "d1", false);
        assert!(publishes(&out).is_empty(), "m1 is still locked by the old connection");
        old.close(&f.hub, &a.link.events);
        let event = b.link.events.try_recv().expect("the release woke the new connection");
        let mut out = Vec::new();
        b.session.handle_event(&f.hub, event, &mut out);
        assert_eq!(&publishes(&out)[0].payload[..], b"body of m1");
    }

    fn connect_with_will(f: &Fixture, id: &str, topic: &str, payload: &[u8], retain: bool) -> Accepted {
        let mut c = connect_packet(f, id, false);
        c.last_will = Some(LastWill::new(topic, payload.to_vec(), QoS::AtLeastOnce, retain));
        accept_connect(&f.hub, &c).unwrap()
    }

    #[test]
    fn a_will_is_kept_and_recorded_as_telemetry_when_the_connection_ends_without_disconnect() {
        let f = fixture("d1");
        let a =
            connect_with_will(&f, "d1", "devices/d1/messages/events/%24.mid=w1&state=offline", b"bye", true);
        let s = a.session;
        let will = s.will().expect("the Will is kept");
        assert_eq!(
            will.properties,
            vec![("$.mid".into(), Some("w1".into())), ("state".into(), Some("offline".into()))]
        );
        assert_eq!((&will.payload[..], will.qos, will.retain), (&b"bye"[..], QoS::AtLeastOnce, true));
        assert!(f.hub.read_telemetry(Some("d1"), 0, 10).is_empty(), "nothing is recorded while connected");

        s.close(&f.hub, &a.link.events);
        let got = f.hub.read_telemetry(Some("d1"), 0, 10);
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].body[..], b"bye");
        assert_eq!(got[0].system_properties, vec![("message-id".to_string(), "w1".to_string())]);
        assert_eq!(
            got[0].properties,
            vec![
                ("state".to_string(), "offline".to_string()),
                ("mqtt-retain".to_string(), "true".to_string()),
                ("iothub-MessageType".to_string(), "Will".to_string()),
            ]
        );
        assert_eq!(f.hub.get_device("d1").unwrap()["connectionState"], "Disconnected");
    }

    #[test]
    fn disconnect_and_shutdown_discard_the_will_and_no_will_means_nothing_recorded() {
        let f = fixture("d1");
        let w = connect_with_will(&f, "d1", "devices/d1/messages/events/", b"bye", false);
        let mut s = w.session;
        let r = s.handle_packet(&f.hub, Packet::Disconnect, &mut Vec::new());
        assert!(matches!(r, Err(Close::ClientDisconnect)), "{r:?}");
        assert!(s.will().is_none(), "DISCONNECT discards the Will");
        s.close(&f.hub, &w.link.events);

        let w = connect_with_will(&f, "d1", "devices/d1/messages/events", b"bye", false);
        let mut s = w.session;
        s.discard_will();
        s.close(&f.hub, &w.link.events);

        let (a, _) = connect(&f, "d1", false);
        assert!(a.session.will().is_none());
        a.session.close(&f.hub, &a.link.events);
        assert!(f.hub.read_telemetry(Some("d1"), 0, 10).is_empty());
    }

    #[test]
    fn the_will_marker_replaces_a_bag_property_of_the_same_name() {
        let f = fixture("d1");
        let topic = "devices/d1/messages/events/iothub-MessageType=Telemetry&a=1";
        let w = connect_with_will(&f, "d1", topic, b"bye", false);
        w.session.close(&f.hub, &w.link.events);
        let got = f.hub.read_telemetry(Some("d1"), 0, 10);
        assert_eq!(
            got[0].properties,
            vec![("a".to_string(), "1".to_string()), ("iothub-MessageType".to_string(), "Will".to_string())]
        );
    }

    #[test]
    fn the_will_of_a_disabled_or_deleted_device_is_not_recorded() {
        let f = fixture("d1");
        let w = connect_with_will(&f, "d1", "devices/d1/messages/events/", b"bye", false);
        let s = w.session;
        let disabled = DeviceInput { status: Some(crate::hub::Status::Disabled), ..Default::default() };
        f.hub.put_device("d1", disabled, Some(crate::hub::IfMatch::Any)).unwrap();
        s.close(&f.hub, &w.link.events);
        assert!(f.hub.read_telemetry(Some("d1"), 0, 10).is_empty(), "disabled");

        let f = fixture("d1");
        let w = connect_with_will(&f, "d1", "devices/d1/messages/events/", b"bye", false);
        let s = w.session;
        f.hub.delete_device("d1", None).unwrap();
        s.close(&f.hub, &w.link.events);
        assert!(f.hub.read_telemetry(Some("d1"), 0, 10).is_empty(), "deleted");
    }

    #[test]
    fn wills_outside_the_devices_telemetry_topic_or_too_large_are_refused_with_not_authorized() {
        let f = fixture("d1");
        f.hub.put_device("d2", DeviceInput::default(), None).unwrap();
        let (current, _) = connect(&f, "d1", false);
        let big = vec![0u8; D2C_MAX_MESSAGE_BYTES + 1];
        for (topic, payload) in [
            ("devices/d2/messages/events/", &b"x"[..]),
            ("devices/d1/messages/devicebound/", b"x"),
            ("$iothub/twin/GET/?$rid=1", b"x"),
            ("status/d1", b"x"),
            ("devices/d1/messages/events/", &big[..]),
        ] {
            let mut c = connect_packet(&f, "d1", false);
            c.last_will = Some(LastWill::new(topic, payload.to_vec(), QoS::AtMostOnce, false));
            let refused = accept_connect(&f.hub, &c).unwrap_err();
            assert_eq!(refused.code, ConnectReturnCode::NotAuthorized, "{topic}: {}", refused.reason);
        }
        assert!(!current.link.events.is_kicked(), "a refused CONNECT leaves the current connection alone");
        let ok = connect_with_will(
            &f,
            "d1",
            "devices/d1/messages/events/a=1",
            &vec![0u8; D2C_MAX_MESSAGE_BYTES],
            false,
        );
        assert!(ok.session.will().is_some(), "a Will of exactly the limit is accepted");
    }

    #[test]
    fn a_new_connection_kicks_the_old_one() {
        let f = fixture("d1");
        let (a, _) = connect(&f, "d1", false);
        assert!(!a.link.events.is_kicked());
        let (b, _) = connect(&f, "d1", false);
        assert!(a.link.events.is_kicked());
        a.session.close(&f.hub, &a.link.events);
        assert_eq!(
            f.hub.get_device("d1").unwrap()["connectionState"],
            "Connected",
            "the old close must not detach the new one"
        );
        b.session.close(&f.hub, &b.link.events);
        assert_eq!(f.hub.get_device("d1").unwrap()["connectionState"], "Disconnected");
    }

    #[test]
    fn throttled_twin_requests_get_429_and_throttled_telemetry_closes_before_the_puback() {
        let clock = ManualClock::new(START_MS);
        let tier = crate::throttle::Tier::new(crate::throttle::Sku::S1, 1).unwrap();
        let config = HubConfig { throttle: Some(tier), ..HubConfig::default() };
        let hub = Hub::with_clock(config, Arc::new(clock.clone()));
        hub.put_device("d1", DeviceInput::default(), None).unwrap();
        let key = hub.device_primary_key("d1").unwrap().unwrap();
        let f = Fixture { hub, clock, key };
        let (a, _) = connect(&f, "d1", false);
        let mut s = a.session;
        // S1 twin reads: 100/s; 1 s burst + 5 s backlog = 601 at one instant, then 429.
        let mut statuses = Vec::new();
        for i in 0..605 {
            let mut out = Vec::new();
            let get = Publish::new(format!("$iothub/twin/GET/?$rid={i}"), QoS::AtMostOnce, "");
            s.handle_packet(&f.hub, Packet::Publish(get), &mut out).unwrap();
            statuses.extend(publishes(&out).iter().map(|p| p.topic.split('/').nth(3).unwrap().to_string()));
        }
        assert!(statuses[..601].iter().all(|t| t == "200"), "{statuses:?}");
        assert!(statuses[601..].iter().all(|t| t == "429"), "{statuses:?}");
        // The shaped ones hold the connection until the last one's turn: 5 s on.
        assert_eq!(s.take_hold(), Some(START_MS + 5000));
        assert_eq!(s.take_hold(), None);
        // Telemetry: 601 pass (shaped), the next closes the connection without a PUBACK.
        for pkid in 1..=601u16 {
            let mut out = Vec::new();
            let mut p = Publish::new("devices/d1/messages/events/", QoS::AtLeastOnce, "t");
            p.pkid = pkid;
            s.handle_packet(&f.hub, Packet::Publish(p), &mut out).unwrap();
            assert_eq!(out, vec![Packet::PubAck(PubAck::new(pkid))]);
        }
        let mut out = Vec::new();
        let mut p = Publish::new("devices/d1/messages/events/", QoS::AtLeastOnce, "t");
        p.pkid = 602;
        match s.handle_packet(&f.hub, Packet::Publish(p), &mut out) {
            Err(Close::Throttled(e)) => {
                assert_eq!(e.code, crate::error::ErrorCode::ThrottleBacklogLimitExceeded)
            }
            other => panic!("expected a throttled close, got {other:?}"),
        }
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(f.hub.read_telemetry(Some("d1"), 0, 1000).len(), 601);
    }

    #[test]
    fn throttled_connects_are_held_for_their_turn_then_refused_with_server_unavailable() {
        let clock = ManualClock::new(START_MS);
        let tier = crate::throttle::Tier::new(crate::throttle::Sku::S1, 1).unwrap();
        let hub = Hub::with_clock(
            HubConfig { throttle: Some(tier), ..HubConfig::default() },
            Arc::new(clock.clone()),
        );
        hub.put_device("d1", DeviceInput::default(), None).unwrap();
        let key = hub.device_primary_key("d1").unwrap().unwrap();
        let f = Fixture { hub, clock, key };
        // S1: 100 new connections a second; 1 s of burst passes at once.
        for _ in 0..101 {
            assert_eq!(f.hub.admit(Op::DeviceConnect, 1), Admission::Now);
        }
        let mut shaped = accept_connect(&f.hub, &connect_packet(&f, "d1", true)).unwrap();
        assert_eq!(shaped.session.take_hold(), Some(START_MS + 10), "the CONNACK waits 10 ms for its turn");
        while !matches!(f.hub.admit(Op::DeviceConnect, 1), Admission::Refused(_)) {}
        let refused = accept_connect(&f.hub, &connect_packet(&f, "d1", true)).unwrap_err();
        assert_eq!(refused.code, ConnectReturnCode::ServiceUnavailable);
        assert!(refused.reason.contains("deviceConnections"), "{}", refused.reason);
    }

    /// A module's CONNECT: client id `{d}/{m}`, username `{host}/{d}/{m}/?…`, a token for
    /// `{host}/devices/{d}/modules/{m}` signed with the module's key.
    fn module_connect_packet(module_key: &str, sr: &str, client: &str) -> Connect {
        let token = make_token(sr, module_key, None, START_MS / 1000 + 3600).unwrap();
        let mut c = Connect::new(client);
        c.clean_session = false;
        c.keep_alive = 60;
        c.set_login(
            format!("localhost/{client}/?api-version=2021-04-12&DeviceClientType=x&model-id=dtmi%3Acom%3Aexample%3AM%3B1"),
            token,
        );
        c
    }

    #[test]
    fn a_module_connects_with_its_own_key_and_gets_its_own_twin_methods_and_telemetry() {
        let f = fixture("d1");
        let (m, _) = f.hub.put_module("d1", "m1", crate::hub::ModuleInput::default(), None).unwrap();
        let mkey = m["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_string();
        let sr = "localhost/devices/d1/modules/m1";
        // The device's key, another module's audience, or a device client id do not pass.
        let refused = |c: Connect| accept_connect(&f.hub, &c).unwrap_err().code;
        assert_eq!(refused(module_connect_packet(&f.key, sr, "d1/m1")), ConnectReturnCode::NotAuthorized);
        assert_eq!(
            refused(module_connect_packet(&mkey, "localhost/devices/d1", "d1/m1")),
            ConnectReturnCode::NotAuthorized
        );
        assert_eq!(refused(module_connect_packet(&mkey, sr, "d1/nope")), ConnectReturnCode::NotAuthorized);
        assert_eq!(refused(module_connect_packet(&mkey, sr, "d1/m 1")), ConnectReturnCode::BadClientId);

        let mut a = accept_connect(&f.hub, &module_connect_packet(&mkey, sr, "d1/m1")).unwrap();
        assert_eq!(f.hub.get_module("d1", "m1").unwrap()["connectionState"], "Connected");
        assert_eq!(f.hub.get_device("d1").unwrap()["connectionState"], "Disconnected", "the device is apart");
        assert_eq!(f.hub.get_module_twin("d1", "m1").unwrap()["modelId"], "dtmi:com:example:M;1");
        let s = &mut a.session;
        // Module connections have twin and method topics, not C2D.
        let out = subscribe(
            s,
            &f.hub,
            &[
                "$iothub/twin/PATCH/properties/desired/#",
                "$iothub/methods/POST/#",
                "devices/d1/messages/devicebound/#",
            ],
        );
        let Packet::SubAck(ack) = &out[0] else { panic!("{out:?}") };
        assert_eq!(ack.return_codes[2], SubscribeReasonCode::Failure);

        let mut out = Vec::new();
        let patch =
            Publish::new("$iothub/twin/PATCH/properties/reported/?$rid=p1", QoS::AtMostOnce, r#"{"r":1}"#);
        s.handle_packet(&f.hub, Packet::Publish(patch), &mut out).unwrap();
        assert_eq!(publishes(&out)[0].topic, "$iothub/twin/res/204/?$rid=p1&$version=2");
        assert_eq!(f.hub.get_module_twin("d1", "m1").unwrap()["properties"]["reported"]["r"], 1);
        assert_eq!(f.hub.get_twin("d1").unwrap()["properties"]["reported"].get("r"), None);

        f.hub
            .update_module_twin("d1", "m1", &json!({"properties": {"desired": {"x": 5}}}), None, false)
            .unwrap();
        f.hub.update_twin("d1", &json!({"properties": {"desired": {"y": 6}}}), None, false).unwrap();
        let event = a.link.events.try_recv().expect("the module's desired patch");
        assert!(a.link.events.try_recv().is_none(), "the device's patch is not the module's");
        let mut out = Vec::new();
        s.handle_event(&f.hub, event, &mut out);
        assert_eq!(publishes(&out)[0].topic, "$iothub/twin/PATCH/properties/desired/?$version=2");

        let mut p = Publish::new(
            "devices/d1/modules/m1/messages/events/%24.ct=text%2Fplain&k=v",
            QoS::AtLeastOnce,
            "hi",
        );
        p.pkid = 4;
        s.handle_packet(&f.hub, Packet::Publish(p), &mut Vec::new()).unwrap();
        let got = f.hub.read_telemetry(Some("d1"), 0, 10);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].module_id.as_deref(), Some("m1"));
        assert_eq!(got[0].auth, crate::hub::events::AuthMethod::ModuleSas);
        // The built-in Event Hub-compatible endpoint annotates it with both ids and the module scope.
        let amqp = crate::amqp::nodes::partition::event_message(&got[0]);
        let annotation = |name: &str| {
            amqp.message_annotations
                .iter()
                .find(|(k, _)| *k == crate::amqp::types::Value::sym(name))
                .map(|(_, v)| v.clone())
        };
        let text = crate::amqp::types::Value::str;
        assert_eq!(annotation("iothub-connection-device-id"), Some(text("d1")));
        assert_eq!(annotation("iothub-connection-module-id"), Some(text("m1")));
        assert_eq!(
            annotation("iothub-connection-auth-method"),
            Some(text(r#"{"scope":"module","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}"#))
        );
        // A module publishes only to its own telemetry topic.
        let other = Publish::new("devices/d1/messages/events/", QoS::AtMostOnce, "x");
        assert!(matches!(
            s.handle_packet(&f.hub, Packet::Publish(other), &mut Vec::new()),
            Err(Close::Topic(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_module_method_reaches_the_module_connection_and_its_answer_the_caller() {
        let f = fixture("d1");
        let (m, _) = f.hub.put_module("d1", "m1", crate::hub::ModuleInput::default(), None).unwrap();
        let mkey = m["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_string();
        let c = module_connect_packet(&mkey, "localhost/devices/d1/modules/m1", "d1/m1");
        let mut a = accept_connect(&f.hub, &c).unwrap();
        subscribe(&mut a.session, &f.hub, &["$iothub/methods/POST/#"]);
        let hub = f.hub.clone();
        let call = tokio::spawn(async move {
            let t = std::time::Duration::from_secs(5);
            hub.invoke_method("d1/m1", "ping", Bytes::from_static(b"1"), t, t).await
        });
        let event = a.link.events.recv().await.expect("the method call");
        let mut out = Vec::new();
        a.session.handle_event(&f.hub, event, &mut out);
        assert_eq!(publishes(&out)[0].topic, "$iothub/methods/POST/ping/?$rid=1");
        let res = Publish::new("$iothub/methods/res/200/?$rid=1", QoS::AtMostOnce, r#""pong""#);
        a.session.handle_packet(&f.hub, Packet::Publish(res), &mut Vec::new()).unwrap();
        let reply = call.await.unwrap().unwrap();
        assert_eq!((reply.status, &reply.payload[..]), (200, &br#""pong""#[..]));
        let t = std::time::Duration::ZERO;
        let e = f.hub.invoke_method("d1", "ping", Bytes::new(), t, t).await.unwrap_err();
        assert_eq!(e.code, crate::error::ErrorCode::DeviceNotOnline, "the device itself is not connected");
        f.hub.delete_module("d1", "m1", None).unwrap();
        assert!(a.link.events.is_kicked(), "deleting the module closes its connection");

        let (m, _) = f.hub.put_module("d1", "m2", crate::hub::ModuleInput::default(), None).unwrap();
        let mkey = m["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_string();
        let c = module_connect_packet(&mkey, "localhost/devices/d1/modules/m2", "d1/m2");
        let b = accept_connect(&f.hub, &c).unwrap();
        let disable = DeviceInput { status: Some(crate::hub::Status::Disabled), ..Default::default() };
        f.hub.put_device("d1", disable, Some(crate::hub::IfMatch::Any)).unwrap();
        assert!(b.link.events.is_kicked(), "disabling the device closes its modules' connections");
        assert_eq!(f.hub.get_module("d1", "m2").unwrap()["connectionState"], "Disconnected");
        assert_eq!(accept_connect(&f.hub, &c).unwrap_err().code, ConnectReturnCode::NotAuthorized);
    }
}
