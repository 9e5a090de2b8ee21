//! The few MQTT 3.1.1 packets the fan-out bench exchanges, encoded into and decoded from plain
//! byte slices: CONNECT, SUBSCRIBE, PUBLISH (QoS 0/1), PUBACK and DISCONNECT out; CONNACK,
//! SUBACK, PUBLISH, PUBACK and PINGRESP in. Decoding borrows from the read buffer and allocates
//! nothing, so a device connection costs its socket and a small buffer, and the client side stays
//! far cheaper than the servers it measures.

/// Packets larger than this are refused: nothing in the bench comes close.
pub const MAX_PACKET_BYTES: usize = 64 * 1024;

/// A packet the bench could not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The remaining-length field runs past four bytes.
    #[error("malformed remaining length")]
    RemainingLength,
    /// The packet announces more than [`MAX_PACKET_BYTES`].
    #[error("packet of {0} bytes is larger than the bench allows")]
    TooLarge(usize),
    /// The packet's fields do not fit its length.
    #[error("malformed {0} packet")]
    Malformed(&'static str),
}

/// A decoded packet, borrowing from the buffer it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// CONNACK: session present and the return code (0 = accepted).
    ConnAck {
        /// Session-present flag.
        session_present: bool,
        /// Return code.
        code: u8,
    },
    /// SUBACK: packet id and one return code per filter (0x80 = failure).
    SubAck {
        /// Packet id.
        pkid: u16,
        /// Granted QoS per filter.
        codes: &'a [u8],
    },
    /// PUBLISH.
    Publish {
        /// QoS 0, 1 or 2.
        qos: u8,
        /// DUP flag.
        dup: bool,
        /// Packet id (0 for QoS 0).
        pkid: u16,
        /// The topic bytes (UTF-8 by the protocol; not checked here).
        topic: &'a [u8],
        /// The payload.
        payload: &'a [u8],
    },
    /// PUBACK.
    PubAck {
        /// Packet id.
        pkid: u16,
    },
    /// PINGRESP.
    PingResp,
    /// Any other packet type (the high nibble of the first byte).
    Other(u8),
}

/// Appends the MQTT remaining-length encoding of `len`.
fn put_len(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// Appends a CONNECT (protocol level 4) with username and password.
pub fn connect(
    out: &mut Vec<u8>,
    client_id: &str,
    username: &str,
    password: &str,
    keep_alive: u16,
    clean: bool,
) {
    let len = 10 + 2 + client_id.len() + 2 + username.len() + 2 + password.len();
    out.push(0x10);
    put_len(out, len);
    put_str(out, b"MQTT");
    out.push(4);
    out.push(0x80 | 0x40 | if clean { 0x02 } else { 0 });
    out.extend_from_slice(&keep_alive.to_be_bytes());
    put_str(out, client_id.as_bytes());
    put_str(out, username.as_bytes());
    put_str(out, password.as_bytes());
}

/// Appends a SUBSCRIBE of one filter.
pub fn subscribe(out: &mut Vec<u8>, pkid: u16, filter: &str, qos: u8) {
    out.push(0x82);
    put_len(out, 2 + 2 + filter.len() + 1);
    out.extend_from_slice(&pkid.to_be_bytes());
    put_str(out, filter.as_bytes());
    out.push(qos);
}

/// Appends a PUBLISH at QoS 0 (`pkid` ignored) or 1.
pub fn publish(out: &mut Vec<u8>, qos: u8, pkid: u16, topic: &[u8], payload: &[u8]) {
    out.push(0x30 | (qos << 1));
    let id_len = if qos > 0 { 2 } else { 0 };
    put_len(out, 2 + topic.len() + id_len + payload.len());
    put_str(out, topic);
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// A PUBACK.
pub fn puback(pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [0x40, 2, hi, lo]
}

/// A DISCONNECT.
pub const DISCONNECT: [u8; 2] = [0xE0, 0];

/// The length of the first complete packet in `buf`, or `None` when more bytes are needed.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, CodecError> {
    let mut len = 0usize;
    let mut shift = 0;
    for i in 1..5 {
        let Some(&b) = buf.get(i) else { return Ok(None) };
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            let total = i + 1 + len;
            if total > MAX_PACKET_BYTES {
                return Err(CodecError::TooLarge(total));
            }
            return Ok((buf.len() >= total).then_some(total));
        }
        shift += 7;
    }
    Err(CodecError::RemainingLength)
}

fn u16_at(b: &[u8], at: usize, what: &'static str) -> Result<u16, CodecError> {
    b.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]])).ok_or(CodecError::Malformed(what))
}

/// Decodes the complete packet `frame` (exactly [`frame_len`] bytes).
pub fn decode(frame: &[u8]) -> Result<Packet<'_>, CodecError> {
    let first = frame.first().copied().ok_or(CodecError::Malformed("empty"))?;
    let mut body_at = 1;
    while frame.get(body_at).is_some_and(|b| b & 0x80 != 0) {
        body_at += 1;
    }
    body_at += 1;
    let body = frame.get(body_at..).ok_or(CodecError::Malformed("header"))?;
    Ok(match first >> 4 {
        2 => {
            if body.len() != 2 {
                return Err(CodecError::Malformed("CONNACK"));
            }
            Packet::ConnAck { session_present: body[0] & 1 == 1, code: body[1] }
        }
        3 => {
            let qos = (first >> 1) & 3;
            let topic_len = usize::from(u16_at(body, 0, "PUBLISH")?);
            let topic = body.get(2..2 + topic_len).ok_or(CodecError::Malformed("PUBLISH"))?;
            let mut at = 2 + topic_len;
            let pkid = if qos > 0 {
                at += 2;
                u16_at(body, at - 2, "PUBLISH")?
            } else {
                0
            };
            let payload = body.get(at..).ok_or(CodecError::Malformed("PUBLISH"))?;
            Packet::Publish { qos, dup: first & 0x08 != 0, pkid, topic, payload }
        }
        4 => Packet::PubAck { pkid: u16_at(body, 0, "PUBACK")? },
        9 => Packet::SubAck { pkid: u16_at(body, 0, "SUBACK")?, codes: &body[2..] },
        13 => Packet::PingResp,
        other => Packet::Other(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every encoder against rumqttc's v4 codec, the one the hub itself decodes with.
    #[test]
    fn encoders_agree_with_rumqttc() {
        use bytes::BytesMut;
        use rumqttc::mqttbytes::v4::Packet as R;
        let read = |b: &[u8]| R::read(&mut BytesMut::from(b), MAX_PACKET_BYTES).unwrap();

        let mut b = Vec::new();
        connect(
            &mut b,
            "dev-1",
            "host/dev-1/?api-version=2021-04-12",
            "SharedAccessSignature sr=x",
            1000,
            true,
        );
        match read(&b) {
            R::Connect(c) => {
                assert_eq!(c.client_id, "dev-1");
                assert_eq!(c.keep_alive, 1000);
                assert!(c.clean_session);
                let login = c.login.unwrap();
                assert_eq!(login.username, "host/dev-1/?api-version=2021-04-12");
                assert_eq!(login.password, "SharedAccessSignature sr=x");
            }
            other => panic!("{other:?}"),
        }

        b.clear();
        subscribe(&mut b, 7, "devices/dev-1/messages/devicebound/#", 1);
        match read(&b) {
            R::Subscribe(s) => {
                assert_eq!(s.pkid, 7);
                assert_eq!(s.filters[0].path, "devices/dev-1/messages/devicebound/#");
            }
            other => panic!("{other:?}"),
        }

        b.clear();
        let payload = vec![7u8; 300];
        publish(&mut b, 1, 513, b"a/b", &payload);
        match read(&b) {
            R::Publish(p) => {
                assert_eq!((p.pkid, p.topic.as_str(), p.payload.len()), (513, "a/b", 300));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(frame_len(&b), Ok(Some(b.len())));
        assert_eq!(frame_len(&b[..b.len() - 1]), Ok(None));
        match decode(&b).unwrap() {
            Packet::Publish { qos, pkid, topic, payload, .. } => {
                assert_eq!((qos, pkid, topic, payload.len()), (1, 513, &b"a/b"[..], 300));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(decode(&puback(513)).unwrap(), Packet::PubAck { pkid: 513 });
    }

    #[test]
    fn decodes_what_servers_send() {
        assert_eq!(decode(&[0x20, 2, 0, 0]).unwrap(), Packet::ConnAck { session_present: false, code: 0 });
        assert_eq!(decode(&[0x90, 3, 0, 1, 1]).unwrap(), Packet::SubAck { pkid: 1, codes: &[1] });
        assert_eq!(decode(&[0xD0, 0]).unwrap(), Packet::PingResp);
        assert_eq!(frame_len(&[0x30, 0xff, 0xff, 0xff, 0xff]), Err(CodecError::RemainingLength));
    }
}
