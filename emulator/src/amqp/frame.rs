//! AMQP 1.0 framing (part 2.3) and the described structures the service endpoint reads and
//! writes: performatives, SASL frames, terminus sources/targets, delivery states and errors.
//!
//! Incoming performatives are parsed into small typed structs holding only the fields the
//! endpoint uses; outgoing ones are built as [`Value`]s by the `*_frame` helpers.

use bytes::BufMut;

use super::types::{DecodeError, Value};

/// The 8-byte protocol header of plain AMQP 1.0.
pub const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
/// The 8-byte protocol header of the SASL layer.
pub const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
/// Frame type of AMQP frames.
pub const FRAME_AMQP: u8 = 0x00;
/// Frame type of SASL frames.
pub const FRAME_SASL: u8 = 0x01;
/// The smallest max-frame-size a peer may announce (part 2.7.1).
pub const MIN_MAX_FRAME_SIZE: u32 = 512;

/// Descriptor codes (ulong) of the described types used here.
pub mod code {
    #![allow(missing_docs)]
    pub const OPEN: u64 = 0x10;
    pub const BEGIN: u64 = 0x11;
    pub const ATTACH: u64 = 0x12;
    pub const FLOW: u64 = 0x13;
    pub const TRANSFER: u64 = 0x14;
    pub const DISPOSITION: u64 = 0x15;
    pub const DETACH: u64 = 0x16;
    pub const END: u64 = 0x17;
    pub const CLOSE: u64 = 0x18;
    pub const ERROR: u64 = 0x1d;
    pub const RECEIVED: u64 = 0x23;
    pub const ACCEPTED: u64 = 0x24;
    pub const REJECTED: u64 = 0x25;
    pub const RELEASED: u64 = 0x26;
    pub const MODIFIED: u64 = 0x27;
    pub const SOURCE: u64 = 0x28;
    pub const TARGET: u64 = 0x29;
    pub const SASL_MECHANISMS: u64 = 0x40;
    pub const SASL_INIT: u64 = 0x41;
    pub const SASL_OUTCOME: u64 = 0x44;
    pub const HEADER: u64 = 0x70;
    pub const DELIVERY_ANNOTATIONS: u64 = 0x71;
    pub const MESSAGE_ANNOTATIONS: u64 = 0x72;
    pub const PROPERTIES: u64 = 0x73;
    pub const APPLICATION_PROPERTIES: u64 = 0x74;
    pub const DATA: u64 = 0x75;
    pub const AMQP_SEQUENCE: u64 = 0x76;
    pub const AMQP_VALUE: u64 = 0x77;
    pub const FOOTER: u64 = 0x78;
}

/// One frame: its type, channel, the performative (if the body is not empty) and the payload
/// that follows it (transfer only).
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// [`FRAME_AMQP`] or [`FRAME_SASL`].
    pub kind: u8,
    /// The channel (session) number.
    pub channel: u16,
    /// The performative; `None` for an empty (heartbeat) frame.
    pub body: Option<Value>,
    /// Bytes after the performative (a transfer's message payload).
    pub payload: Vec<u8>,
}

/// Why the input could not be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame's size field is smaller than its header, or larger than we allow.
    #[error("frame size {size} is outside 8..={max}")]
    Size {
        /// The announced size.
        size: u32,
        /// Our max-frame-size.
        max: u32,
    },
    /// The data offset points inside the header or past the frame.
    #[error("frame data offset {0} is invalid")]
    Doff(u8),
    /// The performative did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Takes one complete frame off the front of `buf`, or `Ok(None)` when more bytes are needed.
pub fn parse_frame(buf: &mut Vec<u8>, max_frame_size: u32) -> Result<Option<Frame>, FrameError> {
    let parsed = parse_frame_at(buf, max_frame_size)?;
    Ok(parsed.map(|(frame, size)| {
        buf.drain(..size);
        frame
    }))
}

/// Reads one complete frame from the front of `buf` without consuming it: the frame and its
/// size in bytes, or `Ok(None)` when more bytes are needed. A reader of many frames from one
/// buffer advances an offset and drops the consumed bytes once (no shift per frame).
pub fn parse_frame_at(buf: &[u8], max_frame_size: u32) -> Result<Option<(Frame, usize)>, FrameError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let size = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if size < 8 || size > max_frame_size {
        return Err(FrameError::Size { size, max: max_frame_size });
    }
    if buf.len() < size as usize {
        return Ok(None);
    }
    let doff = buf[4];
    let body_start = doff as usize * 4;
    if body_start < 8 || body_start > size as usize {
        return Err(FrameError::Doff(doff));
    }
    let frame = &buf[..size as usize];
    let (kind, channel) = (frame[5], u16::from_be_bytes([frame[6], frame[7]]));
    let mut rest = &frame[body_start..];
    if rest.is_empty() {
        return Ok(Some((Frame { kind, channel, body: None, payload: Vec::new() }, size as usize)));
    }
    let body = Value::decode(&mut rest)?;
    Ok(Some((Frame { kind, channel, body: Some(body), payload: rest.to_vec() }, size as usize)))
}

/// The fields of a transfer performative (part 2.7.5) the endpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Transfer {
    /// `handle` (required; `None` when absent or not a uint).
    pub handle: Option<u32>,
    /// `delivery-id` (required on a delivery's first frame).
    pub delivery_id: Option<u32>,
    /// `settled`.
    pub settled: bool,
    /// `more`: the delivery continues in the next transfer.
    pub more: bool,
    /// `aborted`.
    pub aborted: bool,
}

impl Transfer {
    /// The transfer a decoded performative's fields describe.
    pub fn from_fields(f: &Fields) -> Self {
        Self {
            handle: f.u32(0),
            delivery_id: f.u32(1),
            settled: f.bool_or(4, false),
            more: f.bool_or(5, false),
            aborted: f.bool_or(9, false),
        }
    }
}

/// Reads one complete transfer frame from the front of `buf` without building its performative:
/// the channel, the transfer, the payload's offset and the frame's size. `None` when the frame
/// is incomplete, is not a transfer, or has a field in a form this reader does not take (a
/// `state`, an integer in a wider type): [`parse_frame_at`] then reads it, and reads what this
/// reads alike (every C2D send a service SDK makes takes this path).
pub fn read_transfer(buf: &[u8], max_frame_size: u32) -> Option<(u16, Transfer, usize, usize)> {
    let size = u32::from_be_bytes(buf.get(..4)?.try_into().ok()?);
    if size < 8 || size > max_frame_size || buf.len() < size as usize || buf[5] != FRAME_AMQP {
        return None;
    }
    let body_start = buf[4] as usize * 4;
    let frame = &buf[..size as usize];
    let mut rest = frame.get(body_start.max(8)..)?;
    if body_start < 8 || rest.get(..3)? != [0x00, 0x53, code::TRANSFER as u8] {
        return None;
    }
    rest = &rest[3..];
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        rest = tail;
        Some(head)
    };
    let (count, mut fields) = match take(1)?[0] {
        0x45 => (0, &[][..]),
        0xc0 => {
            let size = take(1)?[0] as usize;
            let body = take(size)?;
            (*body.first()? as usize, &body[1..])
        }
        0xd0 => {
            let size = u32::from_be_bytes(take(4)?.try_into().ok()?) as usize;
            let body = take(size)?;
            (u32::from_be_bytes(body.get(..4)?.try_into().ok()?) as usize, &body[4..])
        }
        _ => return None,
    };
    let payload = frame.len() - rest.len();
    let mut t = Transfer::default();
    for i in 0..count {
        let (&code, tail) = fields.split_first()?;
        fields = tail;
        let mut take = |n: usize| -> Option<&[u8]> {
            let (head, tail) = fields.split_at_checked(n)?;
            fields = tail;
            Some(head)
        };
        match (i, code) {
            (_, 0x40) => {}
            (0 | 1 | 3, 0x43 | 0x52 | 0x70) => {
                let v = match code {
                    0x43 => 0,
                    0x52 => u32::from(take(1)?[0]),
                    _ => u32::from_be_bytes(take(4)?.try_into().ok()?),
                };
                match i {
                    0 => t.handle = Some(v),
                    1 => t.delivery_id = Some(v),
                    _ => {}
                }
            }
            (2, 0xa0 | 0xb0) => {
                let len = match code {
                    0xa0 => take(1)?[0] as usize,
                    _ => u32::from_be_bytes(take(4)?.try_into().ok()?) as usize,
                };
                take(len)?;
            }
            (4 | 5 | 8 | 9 | 10, 0x41 | 0x42 | 0x56) => {
                let b = match code {
                    0x41 => true,
                    0x42 => false,
                    _ => take(1)?[0] != 0,
                };
                match i {
                    4 => t.settled = b,
                    5 => t.more = b,
                    9 => t.aborted = b,
                    _ => {}
                }
            }
            (6, 0x50) => {
                take(1)?;
            }
            _ => return None,
        }
    }
    Some((u16::from_be_bytes([frame[6], frame[7]]), t, payload, size as usize))
}

/// Appends one frame (header, performative, payload) to `out`.
pub fn write_frame(out: &mut Vec<u8>, kind: u8, channel: u16, body: &Value, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, 2, kind]);
    out.put_u16(channel);
    body.encode(out);
    out.extend_from_slice(payload);
    let size = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
}

/// An empty AMQP frame: the heartbeat that keeps an idle connection inside the peer's
/// idle-time-out.
pub const HEARTBEAT: [u8; 8] = [0, 0, 0, 8, 2, 0, 0, 0];

/// The fields of a described list, by position, with absent trailing fields as `Null`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fields(pub Vec<Value>);

impl Fields {
    /// Field `i` (`Null` when absent).
    pub fn get(&self, i: usize) -> &Value {
        self.0.get(i).unwrap_or(&Value::Null)
    }

    /// Field `i` as an unsigned integer.
    pub fn u64(&self, i: usize) -> Option<u64> {
        self.get(i).as_u64()
    }

    /// Field `i` as a u32 (wrapping ids such as delivery-id are u32 on the wire).
    pub fn u32(&self, i: usize) -> Option<u32> {
        self.u64(i).and_then(|v| u32::try_from(v).ok())
    }

    /// Field `i` as a boolean, `default` when absent.
    pub fn bool_or(&self, i: usize, default: bool) -> bool {
        self.get(i).as_bool().unwrap_or(default)
    }

    /// Field `i` as text.
    pub fn str(&self, i: usize) -> Option<&str> {
        self.get(i).as_str()
    }
}

/// Splits a described list into its descriptor code and fields.
pub fn described_list(v: &Value) -> Result<(u64, Fields), DecodeError> {
    match v.as_described() {
        Some((code, Value::List(items))) => Ok((code, Fields(items.clone()))),
        _ => Err(DecodeError::Shape(format!("expected a described list, got {v:?}"))),
    }
}

/// [`described_list`] of an owned value: the fields are moved, not copied.
pub fn into_described_list(v: Value) -> Result<(u64, Fields), DecodeError> {
    match v {
        Value::Described(dv) => {
            let (d, v) = *dv;
            match (d.as_u64(), v) {
                (Some(code), Value::List(items)) => Ok((code, Fields(items))),
                (_, v) => Err(DecodeError::Shape(format!(
                    "expected a described list, got {:?}",
                    Value::Described(Box::new((d, v)))
                ))),
            }
        }
        v => Err(DecodeError::Shape(format!("expected a described list, got {v:?}"))),
    }
}

/// How many fields a composite type has (part 2.7, 2.8, 3.2, 3.5, 5.3), for those we write.
fn arity(code: u64) -> usize {
    match code {
        code::OPEN => 10,
        code::BEGIN => 8,
        code::ATTACH => 14,
        code::FLOW | code::TRANSFER | code::SOURCE => 11,
        code::DISPOSITION => 6,
        code::DETACH | code::ERROR | code::MODIFIED => 3,
        code::END | code::CLOSE | code::SASL_MECHANISMS | code::REJECTED => 1,
        code::SASL_OUTCOME | code::RECEIVED => 2,
        code::PROPERTIES => 13,
        code::TARGET => 7,
        _ => 0,
    }
}

/// A described list value with every field of its type present: absent trailing fields are
/// written as nulls up to the type's field count (the spec lets them be omitted, but pyamqp, the
/// Event Hubs Python SDK's AMQP stack, indexes performative fields by position and reads a
/// transfer's payload as the field after the last one, and decodes top-level frames only as
/// `list8`/`list32`, never `list0`).
pub fn list(code: u64, fields: Vec<Value>) -> Value {
    let mut fields = fields;
    while fields.last().is_some_and(Value::is_null) {
        fields.pop();
    }
    let n = arity(code);
    if fields.len() < n {
        fields.resize(n, Value::Null);
    }
    Value::described(code, Value::List(fields))
}

/// An AMQP error (part 2.8.14).
pub fn error(condition: &str, description: &str) -> Value {
    list(code::ERROR, vec![Value::sym(condition), Value::str(description)])
}

/// The `accepted` outcome.
pub fn accepted() -> Value {
    list(code::ACCEPTED, vec![])
}

/// Appends the frame a receiver sends to settle one delivery as accepted: `disposition(role
/// receiver, first delivery_id, settled, state accepted)`. The same bytes as [`write_frame`] of
/// that performative built from [`Value`]s, written directly: the endpoint sends one per C2D
/// transfer, so this path allocates nothing.
pub fn write_accepted_disposition(out: &mut Vec<u8>, channel: u16, delivery_id: u32) {
    let mut id = [0u8; 5];
    let id: &[u8] = match delivery_id {
        0 => &[0x43],
        1..=255 => &[0x52, delivery_id as u8],
        _ => {
            id[0] = 0x70;
            id[1..].copy_from_slice(&delivery_id.to_be_bytes());
            &id
        }
    };
    // role (true = receiver), first, last (null), settled (true), state: accepted (list0),
    // batchable (null): every field present, as `list` writes performatives.
    let items_len = 1 + id.len() + 1 + 1 + 4 + 1;
    let size = 8 + 3 + 1 + 8 + items_len;
    out.reserve(size);
    out.extend_from_slice(&(size as u32).to_be_bytes());
    out.extend_from_slice(&[2, FRAME_AMQP]);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&[0x00, 0x53, code::DISPOSITION as u8, 0xd0]);
    out.extend_from_slice(&((items_len + 4) as u32).to_be_bytes());
    out.extend_from_slice(&6u32.to_be_bytes());
    out.push(0x41);
    out.extend_from_slice(id);
    out.extend_from_slice(&[0x40, 0x41, 0x00, 0x53, code::ACCEPTED as u8, 0x45, 0x40]);
}

/// The `rejected` outcome carrying `condition`.
pub fn rejected(condition: &str, description: &str) -> Value {
    list(code::REJECTED, vec![error(condition, description)])
}

/// A flow performative: the session's state (next-incoming-id, incoming-window,
/// next-outgoing-id, outgoing-window), plus a link's (handle, delivery-count, link-credit) when
/// given. Shared by the endpoint and the service client in `simulated-devices`.
pub fn flow(session: [u32; 4], link: Option<(u32, u32, u32)>) -> Value {
    let mut fields: Vec<Value> = session.into_iter().map(Value::Uint).collect();
    if let Some((handle, count, credit)) = link {
        fields.extend([Value::Uint(handle), Value::Uint(count), Value::Uint(credit)]);
    }
    list(code::FLOW, fields)
}

/// The address of a source or target terminus, if it has one.
pub fn terminus_address(v: &Value) -> Option<&str> {
    match v.as_described() {
        Some((code::SOURCE | code::TARGET, Value::List(items))) => items.first().and_then(Value::as_str),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_wait_for_more_bytes() {
        let mut out = Vec::new();
        let body = list(code::BEGIN, vec![Value::Null, Value::Uint(1), Value::Uint(100)]);
        write_frame(&mut out, FRAME_AMQP, 3, &body, b"xyz");
        let mut partial = out[..out.len() - 1].to_vec();
        assert_eq!(parse_frame(&mut partial, 65536), Ok(None));
        let mut all = out.clone();
        all.extend_from_slice(&HEARTBEAT);
        let f = parse_frame(&mut all, 65536).unwrap().unwrap();
        assert_eq!((f.kind, f.channel, f.body, f.payload), (FRAME_AMQP, 3, Some(body), b"xyz".to_vec()));
        let hb = parse_frame(&mut all, 65536).unwrap().unwrap();
        assert_eq!(hb.body, None);
        assert!(all.is_empty());
    }

    /// A transfer frame with the given fields (as values, in order) and payload.
    fn transfer_frame(fields: Vec<Value>, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, FRAME_AMQP, 7, &Value::described(code::TRANSFER, Value::List(fields)), payload);
        out
    }

    /// What the general path reads from a frame: channel, transfer, payload and size.
    fn generic_transfer(buf: &[u8]) -> Option<(u16, Transfer, Vec<u8>, usize)> {
        let (f, size) = parse_frame_at(buf, 1 << 20).ok()??;
        let (c, fields) = into_described_list(f.body?).ok()?;
        (c == code::TRANSFER && f.kind == FRAME_AMQP)
            .then(|| (f.channel, Transfer::from_fields(&fields), f.payload, size))
    }

    #[test]
    fn transfers_read_without_values_read_as_the_general_path_reads_them() {
        let tag = Value::Binary(vec![1, 2, 3, 4]);
        let cases = [
            vec![Value::Uint(0), Value::Uint(0), tag.clone(), Value::Uint(0)],
            vec![Value::Uint(5), Value::Uint(300), tag.clone(), Value::Uint(0), Value::Bool(false)],
            vec![
                Value::Uint(70_000),
                Value::Uint(u32::MAX),
                Value::Binary(vec![9; 300]),
                Value::Uint(0),
                Value::Bool(true),
                Value::Bool(true),
                Value::Ubyte(1),
                Value::Null,
                Value::Bool(false),
                Value::Bool(true),
                Value::Bool(true),
            ],
            vec![Value::Uint(1), Value::Null, Value::Null, Value::Null, Value::Null, Value::Bool(true)],
            vec![],
        ];
        for fields in cases {
            for payload in [&b""[..], b"payload", &[7u8; 70_000][..]] {
                let bytes = transfer_frame(fields.clone(), payload);
                let (channel, t, at, size) = read_transfer(&bytes, 1 << 20).expect("a plain transfer");
                let (gc, gt, gp, gs) = generic_transfer(&bytes).unwrap();
                assert_eq!((channel, t, &bytes[at..size], size), (gc, gt, &gp[..], gs), "{fields:?}");
            }
        }
        // Fields in forms it leaves to the general path, frames that are not transfers, and
        // frames not all there: `None`, never a different reading or a panic.
        let plain = vec![Value::Uint(1), Value::Uint(2), tag.clone(), Value::Uint(0)];
        let mut wide = plain.clone();
        wide[0] = Value::Ulong(1);
        let mut state = plain.clone();
        state.extend([Value::Null, Value::Null, Value::Null, accepted()]);
        let mut long_list = plain.clone();
        long_list.resize(12, Value::Bool(true));
        for fields in [wide, state, long_list] {
            let bytes = transfer_frame(fields, b"x");
            assert_eq!(read_transfer(&bytes, 65536), None);
            assert!(generic_transfer(&bytes).is_some());
        }
        let mut flow_frame = Vec::new();
        write_frame(&mut flow_frame, FRAME_AMQP, 0, &flow([0, 1, 0, 1], None), &[]);
        let whole = transfer_frame(plain, b"payload");
        for bytes in
            [&flow_frame[..], &HEARTBEAT, &whole[..whole.len() - 1], &[0, 0, 0, 4, 2, 0], &[0, 0, 0, 0]]
        {
            assert_eq!(read_transfer(bytes, 65536), None);
        }
        assert_eq!(read_transfer(&whole, 16), None, "past max-frame-size");
    }

    #[test]
    fn a_damaged_transfer_is_read_as_the_general_path_reads_it_or_left_to_it() {
        let fields = vec![
            Value::Uint(3),
            Value::Uint(9),
            Value::Binary(vec![0xab; 8]),
            Value::Uint(0),
            Value::Bool(false),
            Value::Bool(false),
        ];
        let bytes = transfer_frame(fields, b"\x00\x53\x75\xa0\x02hi");
        for i in 0..bytes.len() {
            for v in [0x00, 0x01, 0x08, 0x40, 0x41, 0x43, 0x52, 0x70, 0xa0, 0xb0, 0xc0, 0xd0, 0xff] {
                let mut damaged = bytes.clone();
                damaged[i] = v;
                if let Some((channel, t, at, size)) = read_transfer(&damaged, 65536) {
                    let (gc, gt, gp, gs) = generic_transfer(&damaged).expect("the general path reads it too");
                    assert_eq!(
                        (channel, t, &damaged[at..size], size),
                        (gc, gt, &gp[..], gs),
                        "byte {i} = {v:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors() {
        let mut big = vec![0, 2, 0, 0, 2, 0, 0, 0];
        assert!(matches!(parse_frame(&mut big, 65536), Err(FrameError::Size { .. })));
        let mut doff = vec![0, 0, 0, 8, 1, 0, 0, 0];
        assert_eq!(parse_frame(&mut doff, 65536), Err(FrameError::Doff(1)));
    }

    #[test]
    fn frames_parse_in_place_one_after_another() {
        let mut out = Vec::new();
        let body = list(code::BEGIN, vec![Value::Null, Value::Uint(1)]);
        write_frame(&mut out, FRAME_AMQP, 1, &body, b"p");
        let first = out.len();
        out.extend_from_slice(&HEARTBEAT);
        let (f, n) = parse_frame_at(&out, 65536).unwrap().unwrap();
        assert_eq!((n, f.channel, f.body, f.payload), (first, 1, Some(body), b"p".to_vec()));
        let (hb, m) = parse_frame_at(&out[n..], 65536).unwrap().unwrap();
        assert_eq!((m, hb.body), (8, None));
        assert_eq!(parse_frame_at(&out[n + m..], 65536), Ok(None));
        assert_eq!(parse_frame_at(&out[..first - 1], 65536), Ok(None));
    }

    #[test]
    fn the_direct_accepted_disposition_is_the_performative_s_encoding() {
        for id in [0, 1, 255, 256, 65_536, u32::MAX] {
            let body = list(
                code::DISPOSITION,
                vec![Value::Bool(true), Value::Uint(id), Value::Null, Value::Bool(true), accepted()],
            );
            let mut want = b"prefix".to_vec();
            write_frame(&mut want, FRAME_AMQP, 7, &body, &[]);
            let mut got = b"prefix".to_vec();
            write_accepted_disposition(&mut got, 7, id);
            assert_eq!(got, want, "delivery id {id}");
        }
    }

    #[test]
    fn owned_described_lists_split_like_borrowed_ones() {
        let v = list(code::FLOW, vec![Value::Uint(1), Value::Uint(2)]);
        assert_eq!(into_described_list(v.clone()).unwrap(), described_list(&v).unwrap());
        assert!(into_described_list(Value::Uint(1)).is_err());
        assert!(into_described_list(Value::described(code::FLOW, Value::Uint(1))).is_err());
    }

    #[test]
    fn performatives_carry_every_field_and_other_lists_drop_trailing_nulls() {
        let v = list(code::DETACH, vec![Value::Uint(0), Value::Bool(true)]);
        let (c, f) = described_list(&v).unwrap();
        assert_eq!((c, f.0.len()), (code::DETACH, 3));
        assert_eq!(f.get(2), &Value::Null);
        let end = list(code::END, vec![]).to_bytes();
        assert_eq!(&end[..4], &[0x00, 0x53, 0x17, 0xd0], "a list32 with one null, never list0");
        let (_, f) = described_list(&list(code::ACCEPTED, vec![Value::Null])).unwrap();
        assert!(f.0.is_empty());
    }
}
