//! The journal's on-disk framing and the primitive encoding of record fields (sans-IO).
//!
//! A file is a sequence of frames: `len: u32 LE`, `crc32: u32 LE` of the payload, then `len`
//! payload bytes. [`scan`] walks a buffer frame by frame and stops at the first frame that is
//! incomplete or fails its CRC: a crash in the middle of a `write` leaves a torn tail, which is cut
//! there (nothing after it was ever answered as written, since a group is written in one call and
//! answered only after it returns). Payloads are read with [`Reader`], which refuses (never panics
//! on, never allocates beyond the input for) anything malformed: a state file is input too.

/// Largest payload a frame may carry (a C2D message is at most 64 KB plus properties; a twin is
/// at most a few tens of KB): a length above it is corruption, not a record.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

/// Bytes before each payload.
pub const FRAME_HEADER_BYTES: usize = 8;

/// Why a payload cannot be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The payload ends inside a field.
    #[error("record truncated: needed {needed} more bytes for {what}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes missing.
        needed: usize,
    },
    /// A field holds a value no writer produces.
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// The field.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// Bytes left over after the record.
    #[error("{0} bytes after the end of the record")]
    Trailing(usize),
}

/// Appends one frame holding the payload `write` produces to `out`.
pub fn frame(out: &mut Vec<u8>, write: impl FnOnce(&mut Writer<'_>)) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    write(&mut Writer { out });
    let payload = &out[start + FRAME_HEADER_BYTES..];
    let len = u32::try_from(payload.len()).expect("a record is below 4 GiB");
    let crc = crc32(payload);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Where [`scan`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte belonged to a complete, valid frame.
    Clean,
    /// The frame at `at` is incomplete, too long or fails its CRC: the buffer is valid up to `at`.
    Torn {
        /// Offset of the first bad frame.
        at: usize,
    },
}

/// Calls `each(offset, payload)` for every valid frame of `buf` in order and says where it
/// stopped. A frame `each` refuses (`Err`) stops the scan with that error.
pub fn scan<E>(buf: &[u8], mut each: impl FnMut(usize, &[u8]) -> Result<(), E>) -> Result<ScanEnd, E> {
    let mut at = 0;
    while at < buf.len() {
        let Some(head) = buf.get(at..at + FRAME_HEADER_BYTES) else {
            return Ok(ScanEnd::Torn { at });
        };
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
        if len > MAX_FRAME_BYTES {
            return Ok(ScanEnd::Torn { at });
        }
        let start = at + FRAME_HEADER_BYTES;
        let Some(payload) = buf.get(start..start + len) else {
            return Ok(ScanEnd::Torn { at });
        };
        if crc32(payload) != crc {
            return Ok(ScanEnd::Torn { at });
        }
        each(at, payload)?;
        at = start + len;
    }
    Ok(ScanEnd::Clean)
}

/// CRC-32 (IEEE, the polynomial of zlib and Ethernet), table-driven.
pub fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for b in bytes {
        crc = TABLE[((crc ^ u32::from(*b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Writes record fields: fixed-width little-endian integers, length-prefixed bytes.
pub struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl Writer<'_> {
    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    /// A `u64`, 8 bytes.
    pub fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    /// A `bool`, one byte.
    pub fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }

    /// Bytes, prefixed by their length (`u32`).
    pub fn bytes(&mut self, v: &[u8]) {
        let len = u32::try_from(v.len()).expect("a field is below 4 GiB");
        self.out.extend_from_slice(&len.to_le_bytes());
        self.out.extend_from_slice(v);
    }

    /// A string, as [`Self::bytes`].
    pub fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }

    /// An optional string: a presence byte, then the string.
    pub fn opt_str(&mut self, v: Option<&str>) {
        match v {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }
}

/// Reads what [`Writer`] wrote, refusing malformed input.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over one payload.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated { what, needed: n - self.buf.len() });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// One byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    /// A `u64`.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }

    /// A `bool` (0 or 1).
    pub fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(DecodeError::Invalid { what, detail: format!("{b} is not a bool") }),
        }
    }

    /// Length-prefixed bytes (borrowed from the payload).
    pub fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")) as usize;
        self.take(len, what)
    }

    /// A UTF-8 string.
    pub fn str(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes(what)?)
            .map_err(|e| DecodeError::Invalid { what, detail: format!("not UTF-8: {e}") })
    }

    /// An optional string.
    pub fn opt_str(&mut self, what: &'static str) -> Result<Option<&'a str>, DecodeError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => self.str(what).map(Some),
            b => Err(DecodeError::Invalid { what, detail: format!("presence byte {b}") }),
        }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Fails unless every byte was read.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() { Ok(()) } else { Err(DecodeError::Trailing(self.buf.len())) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            frame(&mut out, |w| w.bytes(p));
        }
        out
    }

    fn payloads(buf: &[u8]) -> (Vec<Vec<u8>>, ScanEnd) {
        let mut seen = Vec::new();
        let end = scan::<()>(buf, |_, p| {
            seen.push(Reader::new(p).bytes("p").unwrap().to_vec());
            Ok(())
        })
        .unwrap();
        (seen, end)
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn frames_scan_back_in_order() {
        let buf = frames(&[b"one", b"", b"three"]);
        let (seen, end) = payloads(&buf);
        assert_eq!(seen, vec![b"one".to_vec(), Vec::new(), b"three".to_vec()]);
        assert_eq!(end, ScanEnd::Clean);
    }

    #[test]
    fn a_torn_tail_is_cut_at_the_last_complete_frame() {
        let buf = frames(&[b"kept", b"torn away"]);
        let first_len = FRAME_HEADER_BYTES + 4 + 4;
        for cut in first_len + 1..buf.len() {
            let (seen, end) = payloads(&buf[..cut]);
            assert_eq!(seen, vec![b"kept".to_vec()], "cut at {cut}");
            assert_eq!(end, ScanEnd::Torn { at: first_len }, "cut at {cut}");
        }
    }

    #[test]
    fn a_flipped_bit_or_an_absurd_length_stops_the_scan() {
        let mut buf = frames(&[b"a", b"b", b"c"]);
        let second = FRAME_HEADER_BYTES + 5;
        buf[second + FRAME_HEADER_BYTES + 4] ^= 1;
        let (seen, end) = payloads(&buf);
        assert_eq!(seen.len(), 1);
        assert_eq!(end, ScanEnd::Torn { at: second });
        let mut huge = frames(&[b"x"]);
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(payloads(&huge).1, ScanEnd::Torn { at: 0 });
    }

    #[test]
    fn the_reader_refuses_instead_of_panicking() {
        let mut out = Vec::new();
        frame(&mut out, |w| {
            w.u64(7);
            w.opt_str(Some("é"));
            w.bool(true);
        });
        let payload = &out[FRAME_HEADER_BYTES..];
        let mut r = Reader::new(payload);
        assert_eq!(r.u64("n"), Ok(7));
        assert_eq!(r.opt_str("s"), Ok(Some("é")));
        assert_eq!(r.bool("b"), Ok(true));
        r.finish().unwrap();
        for cut in 0..payload.len() {
            let mut r = Reader::new(&payload[..cut]);
            let ok = r.u64("n").and_then(|_| r.opt_str("s")).and_then(|_| r.bool("b"));
            assert!(matches!(ok, Err(DecodeError::Truncated { .. })), "cut at {cut}: {ok:?}");
        }
        assert!(matches!(Reader::new(&[2]).bool("b"), Err(DecodeError::Invalid { .. })));
        assert!(matches!(
            Reader::new(&[1, 2, 0, 0, 0, 0xff, 0xfe]).opt_str("s"),
            Err(DecodeError::Invalid { .. })
        ));
        assert_eq!(Reader::new(&[0, 1]).finish(), Err(DecodeError::Trailing(2)));
    }
}
