//! The DPS device protocol over MQTT (reference-2 §2.3) on the hub's MQTT listeners: a CONNECT
//! whose user name is `{idScope}/registrations/{registrationId}/api-version=…` is a provisioning
//! connection. [`DpsSession`] is its socket-free state machine (the registration id, its
//! credential, the next packet id); [`serve`] drives it on a socket after the hub's connection
//! code read the CONNECT. Requests are answered on
//! `$dps/registrations/res/{status}/?$rid={rid}` (`$` on `rid` only: Python splits the topic on
//! `$`), at QoS 1; the device's PUBACKs are not tracked (an unacknowledged answer is not resent).

use crate::shutdown::Shutdown;
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::{Credential, DpsError};
use crate::hub::Hub;
use crate::limits::MQTT_MAX_KEEP_ALIVE_WAIT_SECS;

const REGISTER_PREFIX: &str = "$dps/registrations/PUT/iotdps-register/?";
const POLL_PREFIX: &str = "$dps/registrations/GET/iotdps-get-operationstatus/?";
/// The request body's size limit (a registration payload is small JSON).
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The registration id a CONNECT's user name names, when it is a DPS CONNECT for `id_scope`.
pub fn registration_of<'a>(username: &'a str, id_scope: &str) -> Option<&'a str> {
    let rest = username.strip_prefix(id_scope)?.strip_prefix("/registrations/")?;
    let (reg, _) = rest.split_once('/')?;
    Some(reg)
}

/// One provisioning connection, past its CONNECT.
#[derive(Debug, Clone)]
pub struct DpsSession {
    registration_id: String,
    credential: Credential,
    next_pkid: u16,
}

/// Why a provisioning connection ends.
#[derive(Debug, thiserror::Error)]
pub enum DpsClose {
    /// DISCONNECT.
    #[error("the device disconnected")]
    Disconnect,
    /// A packet the protocol does not allow.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Checks a provisioning CONNECT (`registration` from [`registration_of`]): client id = the
/// registration id, password a SAS token the enrollment store verifies, or no password and the
/// TLS client certificate `client_cert` (X.509 attestation). Returns the session and its CONNACK,
/// or the refusal code and reason.
pub fn accept(
    hub: &Hub,
    c: &Connect,
    registration: &str,
    client_cert: Option<&crate::x509::ClientChain>,
) -> Result<(DpsSession, Packet), (ConnectReturnCode, String)> {
    if c.client_id != registration {
        return Err((
            ConnectReturnCode::BadClientId,
            format!("client id '{}' must be the registration id '{registration}'", c.client_id),
        ));
    }
    let password = c.login.as_ref().map(|l| l.password.as_str()).unwrap_or_default();
    let now_secs = hub.wall_now() / 1000;
    let credential = match client_cert {
        Some(chain) if password.is_empty() => hub.dps().authenticate_device_x509(registration, chain),
        _ if password.is_empty() => {
            return Err((
                ConnectReturnCode::BadUserNamePassword,
                "a provisioning CONNECT needs a SAS token or a TLS client certificate".into(),
            ));
        }
        _ => hub.dps().authenticate_device(registration, password, now_secs, hub.config().sas_skew_secs),
    }
    .map_err(|e| (ConnectReturnCode::NotAuthorized, e.message))?;
    let session = DpsSession { registration_id: registration.to_string(), credential, next_pkid: 0 };
    Ok((session, Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))))
}

/// `k=v` pairs of a topic's query part.
fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
}

impl DpsSession {
    /// The registration id.
    pub fn registration_id(&self) -> &str {
        &self.registration_id
    }

    /// When the connection's token expires (seconds since the epoch).
    pub fn expiry_secs(&self) -> u64 {
        self.credential.expiry_secs
    }

    fn response(&mut self, status: u16, rid: &str, retry_after: Option<u32>, body: &Value) -> Packet {
        let mut topic = format!("$dps/registrations/res/{status}/?$rid={rid}");
        if let Some(s) = retry_after {
            topic.push_str(&format!("&retry-after={s}"));
        }
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        let mut p = Publish::new(topic, QoS::AtLeastOnce, serde_json::to_vec(body).unwrap_or_default());
        p.pkid = self.next_pkid;
        Packet::Publish(p)
    }

    fn answer(&mut self, hub: &Hub, rid: &str, result: Result<Value, DpsError>, out: &mut Vec<Packet>) {
        let packet = match result {
            Ok(v) => self.response(200, rid, None, &v),
            Err(e) => {
                let retry = (e.status == 429).then_some(2);
                self.response(e.status, rid, retry, &e.body(hub.wall_now()))
            }
        };
        out.push(packet);
    }

    /// Handles one packet after the CONNECT, appending what to send to `out`.
    pub fn handle_packet(
        &mut self,
        hub: &Hub,
        packet: Packet,
        out: &mut Vec<Packet>,
    ) -> Result<(), DpsClose> {
        match packet {
            Packet::Subscribe(s) => {
                let codes = s
                    .filters
                    .iter()
                    .map(|f| {
                        if f.path.starts_with("$dps/registrations/res/") {
                            SubscribeReasonCode::Success(QoS::AtLeastOnce)
                        } else {
                            SubscribeReasonCode::Failure
                        }
                    })
                    .collect();
                out.push(Packet::SubAck(SubAck::new(s.pkid, codes)));
            }
            Packet::Unsubscribe(u) => out.push(Packet::UnsubAck(UnsubAck::new(u.pkid))),
            Packet::PingReq => out.push(Packet::PingResp),
            Packet::PubAck(_) => {}
            Packet::Disconnect => return Err(DpsClose::Disconnect),
            Packet::Publish(p) => {
                if p.qos == QoS::ExactlyOnce {
                    return Err(DpsClose::Protocol("QoS 2 is not supported".into()));
                }
                if p.qos == QoS::AtLeastOnce {
                    out.push(Packet::PubAck(PubAck::new(p.pkid)));
                }
                self.on_request(hub, &p.topic, &p.payload, out)?;
            }
            other => return Err(DpsClose::Protocol(format!("unexpected packet {other:?}"))),
        }
        Ok(())
    }

    fn on_request(
        &mut self,
        hub: &Hub,
        topic: &str,
        body: &[u8],
        out: &mut Vec<Packet>,
    ) -> Result<(), DpsClose> {
        let (query, register) = if let Some(q) = topic.strip_prefix(REGISTER_PREFIX) {
            (q, true)
        } else if let Some(q) = topic.strip_prefix(POLL_PREFIX) {
            (q, false)
        } else {
            return Err(DpsClose::Protocol(format!("'{topic}' is not a provisioning request topic")));
        };
        let Some(rid) = query_param(query, "$rid").filter(|r| !r.is_empty() && r.len() <= 128) else {
            return Err(DpsClose::Protocol(format!("'{topic}' has no $rid")));
        };
        let rid = rid.to_string();
        if body.len() > MAX_REQUEST_BYTES {
            let e =
                DpsError::bad_request(format!("the request body is larger than {MAX_REQUEST_BYTES} bytes"));
            self.answer(hub, &rid, Err(e), out);
            return Ok(());
        }
        let dps = hub.dps();
        let result = if register {
            parse_register_body(body, &self.registration_id).and_then(|payload| {
                dps.register(hub, &self.registration_id, &self.credential, payload.as_ref())
            })
        } else {
            match query_param(query, "operationId") {
                Some(op) => dps.operation_status(hub, &self.registration_id, op),
                None => Err(DpsError::bad_request("the operation status request names no operationId")),
            }
        };
        self.answer(hub, &rid, result, out);
        Ok(())
    }
}

/// The register body (`{"registrationId": …, "payload": …}`, or empty): its `payload`, if any.
/// The registration id in it, when present, must be the connection's.
pub fn parse_register_body(body: &[u8], registration_id: &str) -> Result<Option<Value>, DpsError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| DpsError::bad_request(format!("the register body is not JSON: {e}")))?;
    if let Some(r) = v.get("registrationId").and_then(Value::as_str)
        && r != registration_id
    {
        return Err(DpsError::bad_request(format!(
            "registrationId '{r}' in the body is not '{registration_id}'"
        )));
    }
    Ok(v.get("payload").filter(|p| !p.is_null()).cloned())
}

/// Drives an accepted provisioning connection: writes `connack`, then answers requests until the
/// device disconnects, goes silent past 1.5 × its keep-alive, its token expires or the hub shuts
/// down. `rbuf` holds whatever followed the CONNECT.
pub async fn serve<S>(
    hub: Hub,
    stream: &mut S,
    mut session: DpsSession,
    keep_alive_secs: u16,
    connack: Packet,
    rbuf: &mut BytesMut,
    shutdown: &Shutdown,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let keep_alive = match keep_alive_secs {
        0 => MQTT_MAX_KEEP_ALIVE_WAIT_SECS,
        k => (u64::from(k) * 3).div_ceil(2).min(MQTT_MAX_KEEP_ALIVE_WAIT_SECS),
    };
    let token_left = (session.expiry_secs() * 1000).saturating_sub(hub.wall_now());
    let token_deadline = Instant::now() + std::time::Duration::from_millis(token_left);
    let write_timeout = hub.config().timeouts.write;
    let mut out = vec![connack];
    let reg = session.registration_id().to_string();
    loop {
        let mut ended = None;
        loop {
            match crate::mqtt::connection::take_packet(rbuf) {
                Ok(Some(p)) => {
                    if let Err(e) = session.handle_packet(&hub, p, &mut out) {
                        ended = Some(e.to_string());
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    ended = Some(e.to_string());
                    break;
                }
            }
        }
        // With --persist: a registration's answer goes out once the device it assigned is
        // written (everything appended so far: assignments are rare).
        if !out.is_empty() && hub.durable_all().await.is_err() {
            break;
        }
        if !out.is_empty() {
            let mut wbuf = BytesMut::new();
            for p in out.drain(..) {
                let _ = p.write(&mut wbuf, usize::MAX);
            }
            let w = tokio::time::timeout(write_timeout, async {
                stream.write_all(&wbuf).await?;
                stream.flush().await
            })
            .await;
            if !matches!(w, Ok(Ok(()))) {
                tracing::info!(registration = %reg, "DPS MQTT: the device took no bytes in time; closing");
                return;
            }
        }
        if let Some(why) = ended {
            tracing::debug!(registration = %reg, "DPS MQTT connection ended: {why}");
            return;
        }
        let deadline = (Instant::now() + std::time::Duration::from_secs(keep_alive)).min(token_deadline);
        tokio::select! {
            r = crate::mqtt::connection::fill_buf(stream, rbuf) => if let Err(e) = r {
                tracing::debug!(registration = %reg, "DPS MQTT connection ended: {e}");
                return;
            },
            () = tokio::time::sleep_until(deadline) => {
                tracing::info!(registration = %reg, "DPS MQTT: keep-alive or token lapsed; closing");
                return;
            }
            () = shutdown.wait() => return,
        }
    }
}

/// Bytes of a provisioning response payload, for tests.
pub fn payload_of(p: &Packet) -> Option<(&str, &Bytes)> {
    match p {
        Packet::Publish(p) => Some((p.topic.as_str(), &p.payload)),
        _ => None,
    }
}
