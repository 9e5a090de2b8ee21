//! The MQTT 3.1.1 rules the `rumqttc` codec does not enforce, checked on each complete packet
//! before the codec sees it ([`check_frame`]) and on what it decoded ([`check_decoded`]).
//!
//! The codec is a client library's: it ignores a CONNECT's reserved flag and the fixed-header
//! flags of SUBSCRIBE/UNSUBSCRIBE, accepts an UNSUBSCRIBE without topics, and subtracts lengths
//! without checking them on some packets (a debug build panics, a release build wraps). A server
//! must refuse all of these by closing the connection (MQTT 3.1.1 §2.2.2, §3.1.2.3, §3.8.1,
//! §3.10.3, §4.8), so malformed input never reaches the codec or the session. Pure functions over
//! bytes: no state, no allocation.

use rumqttc::mqttbytes::v4::Packet;

/// Why a packet breaks the protocol. The connection is closed without a reply (MQTT 3.1.1 §4.8:
/// there is no return code for a malformed packet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed packet: {0}")]
pub struct Violation(pub &'static str);

/// The length of the first packet in `buf` (fixed header included) when all of it is there,
/// `Ok(None)` when more bytes are needed.
pub fn complete_frame_len(buf: &[u8]) -> Result<Option<usize>, Violation> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else { return Ok(None) };
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let total = 1 + (i + 1) + remaining;
            return Ok((buf.len() >= total).then_some(total));
        }
    }
    Err(Violation("the remaining length takes more than four bytes (§2.2.3)"))
}

/// Checks one complete packet (`frame`: fixed header, remaining length, body) against the rules
/// the codec skips: fixed-header flags per type (§2.2.2), packets only a server sends, the minimum
/// length of each packet's variable header, the CONNECT flags (§3.1.2.3, §3.1.2.5–9), QoS 3, and
/// SUBSCRIBE/UNSUBSCRIBE carrying at least one topic (§3.8.3, §3.10.3).
pub fn check_frame(frame: &[u8]) -> Result<(), Violation> {
    let Some(&first) = frame.first() else { return Err(Violation("an empty packet")) };
    let header_len = 1 + frame[1..].iter().take(4).position(|b| b & 0x80 == 0).map_or(4, |i| i + 1);
    let body = frame.get(header_len..).unwrap_or_default();
    let (kind, flags) = (first >> 4, first & 0x0f);
    let expect_flags = |want: u8, what: &'static str| {
        if flags == want { Ok(()) } else { Err(Violation(what)) }
    };
    let expect_len = |ok: bool, what: &'static str| if ok { Ok(()) } else { Err(Violation(what)) };
    match kind {
        1 => {
            expect_flags(0, "CONNECT with fixed-header flags set (§2.2.2)")?;
            check_connect(body)
        }
        3 => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(Violation("PUBLISH with QoS 3 (§3.3.1.2)"));
            }
            if qos == 0 && flags & 0b1000 != 0 {
                return Err(Violation("PUBLISH at QoS 0 with DUP set (§3.3.1.1)"));
            }
            let topic_len = body.get(..2).map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
            let need = 2 + topic_len + if qos > 0 { 2 } else { 0 };
            expect_len(body.len() >= 2 && body.len() >= need, "PUBLISH shorter than its topic and packet id")
        }
        4 | 5 | 7 => {
            expect_flags(0, "PUBACK/PUBREC/PUBCOMP with fixed-header flags set (§2.2.2)")?;
            expect_len(body.len() == 2, "PUBACK/PUBREC/PUBCOMP must be exactly a packet id")
        }
        6 => {
            expect_flags(2, "PUBREL without fixed-header flags 0010 (§3.6.1)")?;
            expect_len(body.len() == 2, "PUBREL must be exactly a packet id")
        }
        8 => {
            expect_flags(2, "SUBSCRIBE without fixed-header flags 0010 (§3.8.1)")?;
            // Packet id, then at least one (length, filter, requested QoS).
            expect_len(body.len() >= 2 + 3, "SUBSCRIBE without a topic filter (§3.8.3)")?;
            check_subscribe_payload(&body[2..])
        }
        10 => {
            expect_flags(2, "UNSUBSCRIBE without fixed-header flags 0010 (§3.10.1)")?;
            expect_len(body.len() >= 2 + 2, "UNSUBSCRIBE without a topic filter (§3.10.3)")?;
            check_strings(&body[2..], "UNSUBSCRIBE whose topic filters overrun the packet")
        }
        12 | 14 => {
            expect_flags(0, "PINGREQ/DISCONNECT with fixed-header flags set (§2.2.2)")?;
            expect_len(body.is_empty(), "PINGREQ/DISCONNECT with a body")
        }
        2 | 9 | 11 | 13 => Err(Violation("a packet only a server sends")),
        _ => Err(Violation("a reserved packet type (0 or 15)")),
    }
}

/// CONNECT's variable header: protocol name (any; the codec answers an unknown one), level, flags,
/// keep-alive.
fn check_connect(body: &[u8]) -> Result<(), Violation> {
    let name_len = body.get(..2).map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    let Some(&flags) = body.get(2 + name_len + 1) else {
        return Err(Violation("CONNECT shorter than its variable header"));
    };
    if body.len() < 2 + name_len + 4 {
        return Err(Violation("CONNECT shorter than its variable header"));
    }
    if flags & 0x01 != 0 {
        return Err(Violation("CONNECT with the reserved flag set (§3.1.2.3)"));
    }
    let will = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    if will_qos == 3 {
        return Err(Violation("CONNECT with Will QoS 3 (§3.1.2.6)"));
    }
    if !will && (will_qos != 0 || will_retain) {
        return Err(Violation("CONNECT with Will QoS or Retain but no Will flag (§3.1.2.6, §3.1.2.7)"));
    }
    if flags & 0x40 != 0 && flags & 0x80 == 0 {
        return Err(Violation("CONNECT with a password but no user name (§3.1.2.9)"));
    }
    Ok(())
}

/// SUBSCRIBE's payload: (length-prefixed filter, requested QoS byte) pairs filling it exactly, each
/// QoS byte 0..=2 with its reserved bits clear (§3.8.3.1).
fn check_subscribe_payload(mut p: &[u8]) -> Result<(), Violation> {
    while !p.is_empty() {
        let len = p.get(..2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])));
        let Some(qos) = len.and_then(|l| p.get(2 + l)) else {
            return Err(Violation("SUBSCRIBE whose topic filters overrun the packet"));
        };
        if *qos > 2 {
            return Err(Violation("SUBSCRIBE with a requested QoS above 2 or reserved bits set (§3.8.3.1)"));
        }
        p = &p[2 + len.unwrap_or(0) + 1..];
    }
    Ok(())
}

/// A run of length-prefixed strings filling `p` exactly.
fn check_strings(mut p: &[u8], what: &'static str) -> Result<(), Violation> {
    while !p.is_empty() {
        let Some(len) = p.get(..2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))) else {
            return Err(Violation(what));
        };
        p = p.get(2 + len..).ok_or(Violation(what))?;
    }
    Ok(())
}

/// Rules on what the codec decoded: strings must not contain U+0000 (§1.5.3), and topic names and
/// filters must not be empty (§4.7.3).
pub fn check_decoded(packet: &Packet) -> Result<(), Violation> {
    let nul = |s: &str| s.contains('\0');
    match packet {
        Packet::Connect(c) => {
            let user = c.login.as_ref().is_some_and(|l| nul(&l.username));
            let will = c.last_will.as_ref().is_some_and(|w| nul(&w.topic));
            if nul(&c.client_id) || user || will {
                return Err(Violation("a CONNECT string contains U+0000 (§1.5.3)"));
            }
        }
        Packet::Publish(p) if nul(&p.topic) => {
            return Err(Violation("a topic name contains U+0000 (§1.5.3)"));
        }
        Packet::Publish(p) if p.topic.is_empty() => return Err(Violation("an empty topic name (§4.7.3)")),
        Packet::Subscribe(s) if s.filters.iter().any(|f| f.path.is_empty() || nul(&f.path)) => {
            return Err(Violation("an empty topic filter or one containing U+0000 (§1.5.3, §4.7.3)"));
        }
        Packet::Unsubscribe(u) if u.topics.iter().any(|t| t.is_empty() || nul(t)) => {
            return Err(Violation("an empty topic filter or one containing U+0000 (§1.5.3, §4.7.3)"));
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn frame(first: u8, body: &[u8]) -> Vec<u8> {
        let mut f = vec![first, body.len() as u8];
        f.extend_from_slice(body);
        f
    }

    fn connect_body(flags: u8) -> Vec<u8> {
        let mut b = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 60, 0, 1, b'd'];
        if flags & 0x80 != 0 {
            b.extend_from_slice(&[0, 1, b'u']);
        }
        if flags & 0x40 != 0 {
            b.extend_from_slice(&[0, 1, b'p']);
        }
        b
    }

    #[test]
    fn valid_packets_pass() {
        for f in [
            frame(0x10, &connect_body(0x02)),
            frame(0x10, &connect_body(0xc2)),
            frame(0x30, &[0, 1, b't', b'x']),
            frame(0x32, &[0, 1, b't', 0, 7]),
            frame(0x40, &[0, 7]),
            frame(0x82, &[0, 1, 0, 1, b'#', 1]),
            frame(0xa2, &[0, 1, 0, 1, b'#']),
            frame(0xc0, &[]),
            frame(0xe0, &[]),
        ] {
            assert_eq!(complete_frame_len(&f), Ok(Some(f.len())), "{f:02x?}");
            assert_eq!(check_frame(&f), Ok(()), "{f:02x?}");
            let p = Packet::read(&mut BytesMut::from(&f[..]), 1024).unwrap();
            assert_eq!(check_decoded(&p), Ok(()));
        }
    }

    #[test]
    fn what_the_codec_lets_through_is_refused() {
        for (f, why) in [
            (frame(0x10, &connect_body(0x03)), "reserved"),
            (frame(0x10, &connect_body(0x40 | 0x02)), "password but no user"),
            (frame(0x10, &connect_body(0x08)), "Will QoS"),
            (frame(0x11, &connect_body(0x02)), "fixed-header flags"),
            (frame(0x80, &[0, 1, 0, 1, b'#', 1]), "0010"),
            (frame(0x82, &[0, 1, 0, 1, b'#', 4]), "QoS above 2"),
            (frame(0x82, &[0, 1, 0, 5, b'#', 1]), "overrun"),
            (frame(0xa0, &[0, 1, 0, 1, b'#']), "0010"),
            (frame(0xa2, &[0, 1]), "without a topic filter"),
            (frame(0xa2, &[0]), "without a topic filter"),
            (frame(0x36, &[0, 1, b't', 0, 1]), "QoS 3"),
            (frame(0x38, &[0, 1, b't']), "DUP"),
            (frame(0x40, &[0]), "exactly a packet id"),
            (frame(0x20, &[0, 0]), "only a server sends"),
            (frame(0xf0, &[]), "reserved packet type"),
            (frame(0xc0, &[1]), "with a body"),
        ] {
            let e = check_frame(&f).expect_err(why);
            assert!(e.0.contains(why), "{f:02x?}: {e} does not say {why:?}");
        }
        assert!(complete_frame_len(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
        assert_eq!(complete_frame_len(&[0x30, 0x05, 0]), Ok(None));
    }

    #[test]
    fn nul_in_a_topic_is_refused_after_decoding() {
        let f = frame(0x30, &[0, 3, b'a', 0, b'b', b'x']);
        check_frame(&f).unwrap();
        let p = Packet::read(&mut BytesMut::from(&f[..]), 1024).unwrap();
        assert!(check_decoded(&p).unwrap_err().0.contains("U+0000"));
    }
}
