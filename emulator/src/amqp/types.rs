//! The AMQP 1.0 type system (OASIS AMQP 1.0 part 1): one [`Value`] enum for every primitive,
//! compound and described value, with a decoder that accepts every encoding a peer may choose and
//! an encoder that writes the compact forms.
//!
//! Only what the service endpoint needs is modelled specially; decimals are carried as raw bytes.
//!
//! The decoder is bounded by construction, because its input comes from unauthenticated peers:
//! nesting (compound and described values) is limited to [`MAX_DEPTH`] levels, so recursion never
//! follows the input's length; and every allocation is charged against a budget proportional to
//! the input ([`ALLOC_BYTES_PER_INPUT_BYTE`] per byte plus [`ALLOC_SLACK_BYTES`]) *before* it is
//! made, so an element count or length field cannot make it reserve more than the bytes present
//! justify (an array of zero-width elements claiming 2^32 of them is refused, not allocated).

use bytes::{Buf, BufMut};

/// Why bytes could not be decoded as an AMQP value (reported to the peer as `amqp:decode-error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended inside a value.
    #[error("the input ends inside an AMQP value")]
    Truncated,
    /// A format code this decoder does not know.
    #[error("unknown AMQP format code 0x{0:02x}")]
    UnknownCode(u8),
    /// A string or symbol that is not valid UTF-8 (or a char that is not a scalar value).
    #[error("invalid UTF-8 in an AMQP string, symbol or char")]
    Utf8,
    /// A structure had the wrong shape (e.g. a performative that is not a described list).
    #[error("{0}")]
    Shape(String),
    /// Compound or described values nested deeper than [`MAX_DEPTH`].
    #[error("AMQP values nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// The value would take more memory than its encoding justifies (see the module doc).
    #[error("an AMQP value claims more elements than its {0} bytes can hold")]
    TooLarge(usize),
}

/// Deepest nesting of compound (list, map, array) and described values the decoder accepts.
/// IoT Hub's traffic nests four levels at most (a described message section holding a map of
/// described values); 32 leaves room for any sane peer.
pub const MAX_DEPTH: usize = 32;
/// Heap bytes the decoder may allocate per input byte. One `Value` is 32 bytes and the smallest
/// element (e.g. `null` in a list) is one byte, so honest input stays under 32 per byte.
pub const ALLOC_BYTES_PER_INPUT_BYTE: usize = 48;
/// Heap bytes the decoder may allocate whatever the input's size (tiny inputs, zero-width
/// elements such as an array of a few `null`s).
pub const ALLOC_SLACK_BYTES: usize = 4096;

/// A bounded decoder: how deep it is and how much it may still allocate. One decoder reads every
/// value of one input (a frame's performative, a message's sections), so the budget covers the
/// whole input, not each value afresh.
#[derive(Debug)]
pub struct Decoder {
    depth: usize,
    budget: usize,
}

impl Decoder {
    /// A decoder for an input of `len` bytes.
    pub fn for_input(len: usize) -> Self {
        Self {
            depth: 0,
            budget: len.saturating_mul(ALLOC_BYTES_PER_INPUT_BYTE).saturating_add(ALLOC_SLACK_BYTES),
        }
    }

    /// Charges `bytes` of heap against the budget, or refuses.
    fn charge(&mut self, bytes: usize, input: usize) -> Result<(), DecodeError> {
        self.budget = self.budget.checked_sub(bytes).ok_or(DecodeError::TooLarge(input))?;
        Ok(())
    }

    /// Charges `n` values of `per_item` heap bytes each.
    fn charge_items(&mut self, n: usize, per_item: usize, input: usize) -> Result<(), DecodeError> {
        self.charge(n.checked_mul(per_item).ok_or(DecodeError::TooLarge(input))?, input)
    }

    fn enter(&mut self) -> Result<(), DecodeError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    /// Decodes one value from the front of `buf`, advancing it.
    pub fn value(&mut self, buf: &mut &[u8]) -> Result<Value, DecodeError> {
        let code = take_u8(buf)?;
        if code == 0x00 {
            self.enter()?;
            self.charge_items(2, VALUE_BYTES, buf.len())?;
            let descriptor = self.value(buf)?;
            let value = self.value(buf)?;
            self.leave();
            return Ok(Value::Described(Box::new((descriptor, value))));
        }
        self.with_code(code, buf)
    }

    /// Decodes the value whose constructor `code` was already read.
    fn with_code(&mut self, code: u8, buf: &mut &[u8]) -> Result<Value, DecodeError> {
        Ok(match code {
            0xa0 | 0xa1 | 0xa3 => {
                let len = take_u8(buf)? as usize;
                self.charge(len, len)?;
                variable(code, take(buf, len)?)?
            }
            0xb0 | 0xb1 | 0xb3 => {
                let len = u32::from_be_bytes(fixed(buf)?) as usize;
                let bytes = take(buf, len)?;
                self.charge(len, len)?;
                variable(code, bytes)?
            }
            0x74 | 0x84 | 0x94 => {
                let n = match code {
                    0x74 => 4,
                    0x84 => 8,
                    _ => 16,
                };
                self.charge(n, n)?;
                Value::Decimal(code, take(buf, n)?.to_vec())
            }
            0xc0 | 0xc1 | 0xe0 => {
                let size = take_u8(buf)? as usize;
                let mut body = take(buf, size)?;
                let count = take_u8(&mut body)? as usize;
                self.compound(code, count, &mut body)?
            }
            0xd0 | 0xd1 | 0xf0 => {
                let size = u32::from_be_bytes(fixed(buf)?) as usize;
                let mut body = take(buf, size)?;
                let count = u32::from_be_bytes(fixed(&mut body)?) as usize;
                self.compound(code, count, &mut body)?
            }
            other => fixed_width(other, buf)?,
        })
    }

    /// Reads the descriptor of the described value at the front of `buf` (advancing past it,
    /// the value itself still to read): `Ok(Some(code))` for a numeric descriptor, `Ok(None)`
    /// when the value is not described or its descriptor is not a number (`buf` is then left as
    /// it was). The same budget as [`Decoder::value`] on the same input; what follows is read one
    /// nesting level less deep than inside [`Decoder::value`].
    pub fn descriptor(&mut self, buf: &mut &[u8]) -> Result<Option<u64>, DecodeError> {
        let mut rest = *buf;
        if take_u8(&mut rest)? != 0x00 {
            return Ok(None);
        }
        self.enter()?;
        let charged = self.charge_items(2, VALUE_BYTES, rest.len());
        self.leave();
        charged?;
        let code = match take_u8(&mut rest)? {
            0x53 => u64::from(take_u8(&mut rest)?),
            0x80 => u64::from_be_bytes(fixed(&mut rest)?),
            0x44 => 0,
            _ => return Ok(None),
        };
        *buf = rest;
        Ok(Some(code))
    }

    /// Reads the binary value at the front of `buf` without copying it: `Ok(None)` (and `buf`
    /// left as it was) when the value there is not a binary.
    pub fn binary<'a>(&mut self, buf: &mut &'a [u8]) -> Result<Option<&'a [u8]>, DecodeError> {
        let mut rest = *buf;
        let len = match take_u8(&mut rest)? {
            0xa0 => take_u8(&mut rest)? as usize,
            0xb0 => u32::from_be_bytes(fixed(&mut rest)?) as usize,
            _ => return Ok(None),
        };
        let bytes = take(&mut rest, len)?;
        self.charge(len, len)?;
        *buf = rest;
        Ok(Some(bytes))
    }

    /// Reads the list (`map == false`) or map at the front of `buf` element by element, handing
    /// `each` the element's index and the bytes it starts at (it must read exactly one value
    /// from them, with this decoder): what [`Decoder::value`] does for the compound, without
    /// building it, under the same bounds. `Ok(false)` (and `buf` left as it was) when the
    /// value there is not one.
    pub fn elements<'a>(
        &mut self,
        buf: &mut &'a [u8],
        map: bool,
        mut each: impl FnMut(&mut Self, usize, &mut &'a [u8]) -> Result<(), DecodeError>,
    ) -> Result<bool, DecodeError> {
        let mut rest = *buf;
        let code = take_u8(&mut rest)?;
        let (count, mut body) = match (code, map) {
            (0x45, false) => (0, &[][..]),
            (0xc0, false) | (0xc1, true) => {
                let size = take_u8(&mut rest)? as usize;
                let mut body = take(&mut rest, size)?;
                (take_u8(&mut body)? as usize, body)
            }
            (0xd0, false) | (0xd1, true) => {
                let size = u32::from_be_bytes(fixed(&mut rest)?) as usize;
                let mut body = take(&mut rest, size)?;
                (u32::from_be_bytes(fixed(&mut body)?) as usize, body)
            }
            _ => return Ok(false),
        };
        self.enter()?;
        let input = body.len();
        if map && !count.is_multiple_of(2) {
            return Err(DecodeError::Shape(format!("a map with an odd element count ({count})")));
        }
        // The budget is charged as if the compound were built, so both ways refuse alike.
        if count > input {
            return Err(DecodeError::TooLarge(input));
        }
        self.charge_items(count, VALUE_BYTES, input)?;
        for i in 0..count {
            each(self, i, &mut body)?;
        }
        self.leave();
        *buf = rest;
        Ok(true)
    }

    fn compound(&mut self, code: u8, count: usize, body: &mut &[u8]) -> Result<Value, DecodeError> {
        self.enter()?;
        let input = body.len();
        let v = match code {
            0xc0 | 0xd0 => {
                // Every list element takes at least one byte.
                if count > input {
                    return Err(DecodeError::TooLarge(input));
                }
                self.charge_items(count, VALUE_BYTES, input)?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(body)?);
                }
                Value::List(items)
            }
            0xc1 | 0xd1 => {
                if !count.is_multiple_of(2) {
                    return Err(DecodeError::Shape(format!("a map with an odd element count ({count})")));
                }
                if count > input {
                    return Err(DecodeError::TooLarge(input));
                }
                self.charge_items(count, VALUE_BYTES, input)?;
                let mut pairs = Vec::with_capacity(count / 2);
                for _ in 0..count / 2 {
                    let k = self.value(body)?;
                    let v = self.value(body)?;
                    pairs.push((k, v));
                }
                Value::Map(pairs)
            }
            _ => {
                let mut element = take_u8(body)?;
                let mut descriptor = None;
                if element == 0x00 {
                    descriptor = Some(self.value(body)?);
                    element = take_u8(body)?;
                }
                // Array elements may be zero-width (`null`, `true`, `uint0`, ...), so the count is
                // bounded by the budget alone: each element is one value, plus (when described) a
                // copy of the descriptor and two boxes.
                let per_item =
                    VALUE_BYTES + descriptor.as_ref().map_or(0, |d| heap_bytes(d) + 2 * VALUE_BYTES);
                self.charge_items(count, per_item, input)?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    let v = self.with_code(element, body)?;
                    items.push(match &descriptor {
                        Some(d) => Value::Described(Box::new((d.clone(), v))),
                        None => v,
                    });
                }
                Value::Array(items)
            }
        };
        self.leave();
        Ok(v)
    }
}

/// Heap bytes one `Value` takes inside a vector or box.
const VALUE_BYTES: usize = std::mem::size_of::<Value>();

/// The heap bytes a decoded value holds (what a clone of it allocates).
fn heap_bytes(v: &Value) -> usize {
    match v {
        Value::Decimal(_, b) | Value::Binary(b) => b.len(),
        Value::String(s) | Value::Symbol(s) => s.len(),
        Value::List(items) | Value::Array(items) => items.iter().map(|i| VALUE_BYTES + heap_bytes(i)).sum(),
        Value::Map(pairs) => pairs.iter().map(|(k, v)| 2 * VALUE_BYTES + heap_bytes(k) + heap_bytes(v)).sum(),
        Value::Described(dv) => 2 * VALUE_BYTES + heap_bytes(&dv.0) + heap_bytes(&dv.1),
        _ => 0,
    }
}

/// One AMQP value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`.
    Null,
    /// `boolean`.
    Bool(bool),
    /// `ubyte`.
    Ubyte(u8),
    /// `ushort`.
    Ushort(u16),
    /// `uint`.
    Uint(u32),
    /// `ulong`.
    Ulong(u64),
    /// `byte`.
    Byte(i8),
    /// `short`.
    Short(i16),
    /// `int`.
    Int(i32),
    /// `long`.
    Long(i64),
    /// `float`.
    Float(f32),
    /// `double`.
    Double(f64),
    /// `decimal32/64/128`, raw (format code and bytes).
    Decimal(u8, Vec<u8>),
    /// `char`.
    Char(char),
    /// `timestamp`: milliseconds since the Unix epoch.
    Timestamp(i64),
    /// `uuid`.
    Uuid([u8; 16]),
    /// `binary`.
    Binary(Vec<u8>),
    /// `string`.
    String(String),
    /// `symbol`.
    Symbol(String),
    /// `list`.
    List(Vec<Value>),
    /// `map`, in wire order.
    Map(Vec<(Value, Value)>),
    /// `array` (all elements share one type).
    Array(Vec<Value>),
    /// A described value: descriptor, then the value (one allocation for the two: every message
    /// section and performative is one).
    Described(Box<(Value, Value)>),
}

impl Value {
    /// A symbol.
    pub fn sym(s: &str) -> Self {
        Self::Symbol(s.to_owned())
    }

    /// A string.
    pub fn str(s: &str) -> Self {
        Self::String(s.to_owned())
    }

    /// A value described by a numeric (ulong) descriptor.
    pub fn described(code: u64, value: Value) -> Self {
        Self::Described(Box::new((Value::Ulong(code), value)))
    }

    /// The text of a string or symbol.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) | Self::Symbol(s) => Some(s),
            _ => None,
        }
    }

    /// Any unsigned or non-negative signed integer, widened.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::Ubyte(v) => Some(v.into()),
            Self::Ushort(v) => Some(v.into()),
            Self::Uint(v) => Some(v.into()),
            Self::Ulong(v) => Some(v),
            Self::Byte(v) => u64::try_from(v).ok(),
            Self::Short(v) => u64::try_from(v).ok(),
            Self::Int(v) => u64::try_from(v).ok(),
            Self::Long(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// A boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// True for `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Self::Null)
    }

    /// The numeric descriptor and the described value, if this is a value described by a ulong
    /// (or by the symbolic name is not supported: IoT Hub's clients use numeric descriptors).
    pub fn as_described(&self) -> Option<(u64, &Value)> {
        match self {
            Self::Described(dv) => dv.0.as_u64().map(|code| (code, &dv.1)),
            _ => None,
        }
    }

    /// [`Value::as_described`], taking the described value out instead of borrowing it.
    pub fn into_described(self) -> Option<(u64, Value)> {
        match self {
            Self::Described(dv) => {
                let (d, v) = *dv;
                d.as_u64().map(|code| (code, v))
            }
            _ => None,
        }
    }

    /// The text form used for message ids and logs: strings as they are, uuids hyphenated,
    /// numbers in decimal, binaries as lowercase hex.
    pub fn to_id_string(&self) -> Option<String> {
        match self {
            Self::String(s) | Self::Symbol(s) => Some(s.clone()),
            Self::Uuid(u) => Some(uuid::Uuid::from_bytes(*u).hyphenated().to_string()),
            Self::Binary(b) => Some(b.iter().map(|x| format!("{x:02x}")).collect()),
            v => v.as_u64().map(|n| n.to_string()),
        }
    }

    /// [`Value::to_id_string`], moving a string's text out instead of copying it.
    pub fn into_id_string(self) -> Option<String> {
        match self {
            Self::String(s) | Self::Symbol(s) => Some(s),
            v => v.to_id_string(),
        }
    }

    /// Decodes one value from the front of `buf`, advancing it. Bounded: see the module doc.
    pub fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        Decoder::for_input(buf.len()).value(buf)
    }

    /// Appends the encoding of this value to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Null => out.put_u8(0x40),
            Self::Bool(true) => out.put_u8(0x41),
            Self::Bool(false) => out.put_u8(0x42),
            Self::Ubyte(v) => out.extend_from_slice(&[0x50, *v]),
            Self::Ushort(v) => {
                out.put_u8(0x60);
                out.put_u16(*v);
            }
            Self::Uint(0) => out.put_u8(0x43),
            Self::Uint(v) if *v < 256 => out.extend_from_slice(&[0x52, *v as u8]),
            Self::Uint(v) => {
                out.put_u8(0x70);
                out.put_u32(*v);
            }
            Self::Ulong(0) => out.put_u8(0x44),
            Self::Ulong(v) if *v < 256 => out.extend_from_slice(&[0x53, *v as u8]),
            Self::Ulong(v) => {
                out.put_u8(0x80);
                out.put_u64(*v);
            }
            Self::Byte(v) => out.extend_from_slice(&[0x51, *v as u8]),
            Self::Short(v) => {
                out.put_u8(0x61);
                out.put_i16(*v);
            }
            Self::Int(v) if i8::try_from(*v).is_ok() => out.extend_from_slice(&[0x54, *v as i8 as u8]),
            Self::Int(v) => {
                out.put_u8(0x71);
                out.put_i32(*v);
            }
            Self::Long(v) if i8::try_from(*v).is_ok() => out.extend_from_slice(&[0x55, *v as i8 as u8]),
            Self::Long(v) => {
                out.put_u8(0x81);
                out.put_i64(*v);
            }
            Self::Float(v) => {
                out.put_u8(0x72);
                out.put_f32(*v);
            }
            Self::Double(v) => {
                out.put_u8(0x82);
                out.put_f64(*v);
            }
            Self::Decimal(code, bytes) => {
                out.put_u8(*code);
                out.extend_from_slice(bytes);
            }
            Self::Char(c) => {
                out.put_u8(0x73);
                out.put_u32(*c as u32);
            }
            Self::Timestamp(ms) => {
                out.put_u8(0x83);
                out.put_i64(*ms);
            }
            Self::Uuid(u) => {
                out.put_u8(0x98);
                out.extend_from_slice(u);
            }
            Self::Binary(b) => put_variable(out, 0xa0, 0xb0, b),
            Self::String(s) => put_variable(out, 0xa1, 0xb1, s.as_bytes()),
            Self::Symbol(s) => put_variable(out, 0xa3, 0xb3, s.as_bytes()),
            Self::List(items) if items.is_empty() => out.put_u8(0x45),
            Self::List(items) => {
                let mut body = Vec::new();
                items.iter().for_each(|v| v.encode(&mut body));
                put_compound(out, 0xd0, items.len(), &body);
            }
            Self::Map(pairs) => {
                let mut body = Vec::new();
                for (k, v) in pairs {
                    k.encode(&mut body);
                    v.encode(&mut body);
                }
                put_compound(out, 0xd1, pairs.len() * 2, &body);
            }
            Self::Array(items) => encode_array(items, out),
            Self::Described(dv) => {
                out.put_u8(0x00);
                dv.0.encode(out);
                dv.1.encode(out);
            }
        }
    }

    /// The encoding as a fresh vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

fn put_variable(out: &mut Vec<u8>, short: u8, long: u8, bytes: &[u8]) {
    if let Ok(len) = u8::try_from(bytes.len()) {
        out.extend_from_slice(&[short, len]);
    } else {
        out.put_u8(long);
        out.put_u32(bytes.len() as u32);
    }
    out.extend_from_slice(bytes);
}

/// 32-bit list/map: size (counting the count field), count, body.
fn put_compound(out: &mut Vec<u8>, code: u8, count: usize, body: &[u8]) {
    out.put_u8(code);
    out.put_u32((body.len() + 4) as u32);
    out.put_u32(count as u32);
    out.extend_from_slice(body);
}

/// Arrays are only written for symbols (sasl mechanisms, capabilities) and strings (Event Hubs'
/// `partition_ids`), as `sym32`/`str32` elements. Anything else is written as a list: the endpoint
/// never sends other arrays.
fn encode_array(items: &[Value], out: &mut Vec<u8>) {
    let element = match items.first() {
        Some(Value::Symbol(_)) if items.iter().all(|v| matches!(v, Value::Symbol(_))) => 0xb3,
        Some(Value::String(_)) if items.iter().all(|v| matches!(v, Value::String(_))) => 0xb1,
        _ => return Value::List(items.to_vec()).encode(out),
    };
    let mut body = vec![element];
    for v in items {
        if let Value::Symbol(s) | Value::String(s) = v {
            body.put_u32(s.len() as u32);
            body.extend_from_slice(s.as_bytes());
        }
    }
    put_compound(out, 0xf0, items.len(), &body);
}

fn take_u8(buf: &mut &[u8]) -> Result<u8, DecodeError> {
    if buf.is_empty() {
        return Err(DecodeError::Truncated);
    }
    Ok(buf.get_u8())
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], DecodeError> {
    if buf.len() < n {
        return Err(DecodeError::Truncated);
    }
    let (head, tail) = buf.split_at(n);
    *buf = tail;
    Ok(head)
}

fn fixed<const N: usize>(buf: &mut &[u8]) -> Result<[u8; N], DecodeError> {
    let mut a = [0u8; N];
    a.copy_from_slice(take(buf, N)?);
    Ok(a)
}

fn utf8(bytes: &[u8]) -> Result<String, DecodeError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Utf8)
}

/// Decodes a value of fixed width (no heap) whose constructor `code` was already read.
fn fixed_width(code: u8, buf: &mut &[u8]) -> Result<Value, DecodeError> {
    Ok(match code {
        0x40 => Value::Null,
        0x41 => Value::Bool(true),
        0x42 => Value::Bool(false),
        0x56 => Value::Bool(take_u8(buf)? != 0),
        0x50 => Value::Ubyte(take_u8(buf)?),
        0x60 => Value::Ushort(u16::from_be_bytes(fixed(buf)?)),
        0x70 => Value::Uint(u32::from_be_bytes(fixed(buf)?)),
        0x52 => Value::Uint(take_u8(buf)?.into()),
        0x43 => Value::Uint(0),
        0x80 => Value::Ulong(u64::from_be_bytes(fixed(buf)?)),
        0x53 => Value::Ulong(take_u8(buf)?.into()),
        0x44 => Value::Ulong(0),
        0x51 => Value::Byte(take_u8(buf)? as i8),
        0x61 => Value::Short(i16::from_be_bytes(fixed(buf)?)),
        0x71 => Value::Int(i32::from_be_bytes(fixed(buf)?)),
        0x54 => Value::Int((take_u8(buf)? as i8).into()),
        0x81 => Value::Long(i64::from_be_bytes(fixed(buf)?)),
        0x55 => Value::Long((take_u8(buf)? as i8).into()),
        0x72 => Value::Float(f32::from_be_bytes(fixed(buf)?)),
        0x82 => Value::Double(f64::from_be_bytes(fixed(buf)?)),
        0x73 => Value::Char(char::from_u32(u32::from_be_bytes(fixed(buf)?)).ok_or(DecodeError::Utf8)?),
        0x83 => Value::Timestamp(i64::from_be_bytes(fixed(buf)?)),
        0x98 => Value::Uuid(fixed(buf)?),
        0x45 => Value::List(Vec::new()),
        other => return Err(DecodeError::UnknownCode(other)),
    })
}

fn variable(code: u8, bytes: &[u8]) -> Result<Value, DecodeError> {
    Ok(match code & 0x0f {
        0x00 => Value::Binary(bytes.to_vec()),
        0x01 => Value::String(utf8(bytes)?),
        _ => Value::Symbol(utf8(bytes)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(v: Value) {
        let bytes = v.to_bytes();
        let mut slice = bytes.as_slice();
        assert_eq!(Value::decode(&mut slice).unwrap(), v, "bytes {bytes:02x?}");
        assert!(slice.is_empty());
    }

    #[test]
    fn every_type_round_trips() {
        let values = vec![
            Value::Null,
            Value::Bool(true),
            Value::Bool(false),
            Value::Ubyte(7),
            Value::Ushort(65535),
            Value::Uint(0),
            Value::Uint(200),
            Value::Uint(70_000),
            Value::Ulong(0),
            Value::Ulong(3),
            Value::Ulong(1 << 40),
            Value::Byte(-3),
            Value::Short(-300),
            Value::Int(200),
            Value::Int(-5),
            Value::Long(-1 << 40),
            Value::Long(4),
            Value::Double(1.5),
            Value::Char('é'),
            Value::Timestamp(1_700_000_000_000),
            Value::Uuid([7; 16]),
            Value::Binary(vec![1, 2, 3]),
            Value::Binary(vec![9; 300]),
            Value::str("héllo"),
            Value::String("x".repeat(1000)),
            Value::sym("amqp:not-found"),
            Value::List(vec![]),
            Value::List(vec![Value::Null, Value::str("a")]),
            Value::Map(vec![(Value::sym("k"), Value::Int(1))]),
            Value::Array(vec![Value::sym("MSSBCBS"), Value::sym("ANONYMOUS")]),
            Value::Array(vec![Value::str("0"), Value::str("1")]),
            Value::described(0x24, Value::List(vec![])),
        ];
        values.into_iter().for_each(round_trip);
    }

    #[test]
    fn status_code_200_is_an_int_not_a_uint() {
        // uamqp reads the CBS status-code with amqpvalue_get_int: 0x54 (smallint) or 0x71 (int).
        assert_eq!(Value::Int(200).to_bytes(), vec![0x71, 0, 0, 0, 200]);
        assert_eq!(Value::Int(100).to_bytes(), vec![0x54, 100]);
    }

    #[test]
    fn decodes_the_short_compound_forms() {
        // list8 with two elements: smalluint 5 and str8 "ab".
        let mut b: &[u8] = &[0xc0, 0x07, 0x02, 0x52, 0x05, 0xa1, 0x02, b'a', b'b'];
        assert_eq!(Value::decode(&mut b).unwrap(), Value::List(vec![Value::Uint(5), Value::str("ab")]));
        // map8 with one pair.
        let mut b: &[u8] = &[0xc1, 0x05, 0x02, 0xa3, 0x01, b'k', 0x41];
        assert_eq!(Value::decode(&mut b).unwrap(), Value::Map(vec![(Value::sym("k"), Value::Bool(true))]));
        // array8 of two sym8.
        let mut b: &[u8] = &[0xe0, 0x06, 0x02, 0xa3, 0x01, b'A', 0x01, b'B'];
        assert_eq!(Value::decode(&mut b).unwrap(), Value::Array(vec![Value::sym("A"), Value::sym("B")]));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        for bad in [&[0xa1, 0x05, b'a'][..], &[0xd0, 0, 0, 0, 9], &[0xff], &[0xc1, 0x02, 0x01, 0x40], &[]] {
            let mut b = bad;
            assert!(Value::decode(&mut b).is_err(), "{bad:02x?}");
        }
        let mut b: &[u8] = &[0xa1, 0x02, 0xff, 0xfe];
        assert_eq!(Value::decode(&mut b), Err(DecodeError::Utf8));
    }

    #[test]
    fn nesting_is_bounded_instead_of_overflowing_the_stack() {
        // Issue 11, finding 1: a run of 0x00 bytes is a described value describing itself, forever.
        let zeros = vec![0u8; 20_000];
        assert_eq!(Value::decode(&mut zeros.as_slice()), Err(DecodeError::TooDeep));
        // Nested lists: list32 inside list32 ..., 10,000 deep, each size exact.
        let mut nested = vec![0x40];
        for _ in 0..10_000 {
            let mut outer = vec![0xd0];
            outer.extend_from_slice(&(nested.len() as u32 + 4).to_be_bytes());
            outer.extend_from_slice(&1u32.to_be_bytes());
            outer.extend_from_slice(&nested);
            nested = outer;
        }
        assert_eq!(Value::decode(&mut nested.as_slice()), Err(DecodeError::TooDeep));
        // MAX_DEPTH levels are fine.
        let mut ok = Value::Null;
        for _ in 0..MAX_DEPTH {
            ok = Value::List(vec![ok]);
        }
        round_trip(ok);
    }

    #[test]
    fn element_counts_cannot_reserve_more_than_the_input_justifies() {
        // Issue 11, finding 2: array32 of 2^32-1 nulls in 10 bytes.
        let bomb: &[u8] = &[0xf0, 0x00, 0x00, 0x00, 0x05, 0xff, 0xff, 0xff, 0xff, 0x40];
        assert!(matches!(Value::decode(&mut &bomb[..]), Err(DecodeError::TooLarge(_))));
        // list32 claiming more elements than bytes.
        let list: &[u8] = &[0xd0, 0x00, 0x00, 0x00, 0x05, 0x00, 0x01, 0x00, 0x00, 0x40];
        assert!(matches!(Value::decode(&mut &list[..]), Err(DecodeError::TooLarge(_))));
        // An array whose every element would clone a 60 KB descriptor.
        let mut arr = vec![0xf0];
        let mut body = 30_000u32.to_be_bytes().to_vec();
        body.push(0x00);
        body.push(0xb0);
        body.extend_from_slice(&60_000u32.to_be_bytes());
        body.extend(std::iter::repeat_n(7u8, 60_000));
        body.push(0x40);
        arr.extend_from_slice(&(body.len() as u32).to_be_bytes());
        arr.extend_from_slice(&body);
        assert!(matches!(Value::decode(&mut arr.as_slice()), Err(DecodeError::TooLarge(_))));
        // A few zero-width elements are fine.
        let small: &[u8] = &[0xe0, 0x02, 0x03, 0x40];
        assert_eq!(Value::decode(&mut &small[..]), Ok(Value::Array(vec![Value::Null; 3])));
    }

    #[test]
    fn id_strings() {
        assert_eq!(Value::Ulong(42).to_id_string().as_deref(), Some("42"));
        assert_eq!(
            Value::Uuid(uuid::Uuid::nil().into_bytes()).to_id_string().as_deref(),
            Some("00000000-0000-0000-0000-000000000000")
        );
        assert_eq!(Value::Null.to_id_string(), None);
    }
}
