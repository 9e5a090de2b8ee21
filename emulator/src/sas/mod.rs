//! Shared access signatures: parsing, signing and verifying SAS tokens, plus the pieces the hub
//! needs around them (resource scopes, policies and rights, connection strings).
//!
//! This module is pure: no I/O, no clock (callers pass "now"), no state. It owns the one rule that
//! every official SDK was verified against (sdk-wire-notes §5.3, reference §0.1):
//! `sig = base64(HMAC-SHA256(base64decode(key), <sr as written in the token> + "\n" + se))`.
//! The signature is always checked over the *raw* `sr` text, because SDKs disagree on hex case
//! (`%2f` from C, `%2F` from Node/Python/C#); the URL-decoded `sr` is used only for scope matching.
//!
//! Submodules: [`scope`] (does a token's resource cover a target, and whose token is it),
//! [`policy`] (rights and the default shared access policies), [`connection_string`].

pub mod connection_string;
pub mod policy;
pub mod scope;

pub use connection_string::{ConnectionKind, ConnectionString};
pub use policy::{OWNER_POLICY, Policy, Rights, default_policies};
pub use scope::{ResourceTarget, scope_covers};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The literal first word of every SAS token.
pub const SAS_PREFIX: &str = "SharedAccessSignature";

/// Smallest decoded key IoT Hub accepts for a device or policy, in bytes.
pub const KEY_MIN_BYTES: usize = 16;
/// Largest decoded key IoT Hub accepts for a device or policy, in bytes.
pub const KEY_MAX_BYTES: usize = 64;
/// Bytes of randomness in a key made by [`generate_key`] (44 base64 characters, like Azure's).
pub const GENERATED_KEY_BYTES: usize = 32;

/// Characters left unescaped by Python's `quote(s, safe="")`: ASCII letters, digits and `-._~`.
/// Everything else becomes `%XX` with uppercase hex, as the Python and Node device SDKs write it.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Everything that can be wrong with a SAS token, a key, a resource URI or a connection string.
///
/// Variants carry enough detail for the hub to build IoT Hub's error text, but never a key or a
/// signature, so they are safe to log and to send back to the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// The token text does not have the `SharedAccessSignature k=v&k=v` shape.
    #[error("malformed shared access signature: {reason}")]
    Malformed {
        /// What is wrong, in words.
        reason: &'static str,
    },
    /// A required token field (`sr`, `sig` or `se`) is absent or empty.
    #[error("shared access signature is missing the '{0}' field")]
    MissingField(&'static str),
    /// A token field appears more than once.
    #[error("shared access signature has the '{0}' field more than once")]
    DuplicateField(&'static str),
    /// `se` is not a decimal count of seconds.
    #[error("shared access signature expiry 'se' is not a decimal integer: '{value}'")]
    BadExpiry {
        /// The `se` text as sent.
        value: String,
    },
    /// A key is not standard base64 of 16 to 64 bytes.
    #[error("invalid shared access key: {reason}")]
    BadKey {
        /// What is wrong, in words.
        reason: &'static str,
    },
    /// A resource URI does not name the hub, `{hub}/devices`, a device or a module.
    #[error("invalid resource '{resource}': {reason}")]
    BadResource {
        /// The decoded resource URI.
        resource: String,
        /// What is wrong, in words.
        reason: &'static str,
    },
    /// A right name that is not one of IoT Hub's four.
    #[error("unknown access right '{name}'")]
    UnknownRight {
        /// The name as given.
        name: String,
    },
    /// A connection string uses a key IoT Hub does not know (keys are case-sensitive).
    #[error("connection string has unknown key '{key}'")]
    UnknownKey {
        /// The key as given.
        key: String,
    },
    /// A connection-string key appears twice.
    #[error("connection string has the key '{0}' more than once")]
    DuplicateKey(&'static str),
    /// A connection-string key that this kind of string needs is absent or empty.
    #[error("connection string is missing '{0}'")]
    MissingKey(&'static str),
    /// A connection string combines keys that cannot go together, or is otherwise malformed.
    #[error("invalid connection string: {reason}")]
    InvalidConnectionString {
        /// What is wrong, in words.
        reason: &'static str,
    },
}

/// A parsed SAS token. Parsing checks only the shape; [`SasToken::verify`],
/// [`SasToken::is_expired`] and [`scope_covers`] do the checks that need a key, a clock or a
/// target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` exactly as written in the token: the text the signature is computed over.
    pub resource_raw: String,
    /// `sr` URL-decoded, for scope matching and identity lookup (e.g. `localhost/devices/dev1`).
    pub resource: String,
    /// `sig` URL-decoded: the base64 text of the HMAC.
    pub signature: String,
    /// `se`: expiry in seconds since the Unix epoch.
    pub expiry_secs: u64,
    /// `skn` URL-decoded: the policy name for policy-signed tokens, `None` for identity keys.
    pub key_name: Option<String>,
}

/// The four fields a token may carry, as raw (still URL-encoded) slices.
#[derive(Default)]
struct RawFields<'a> {
    sr: Option<&'a str>,
    sig: Option<&'a str>,
    se: Option<&'a str>,
    skn: Option<&'a str>,
}

impl SasToken {
    /// Parses `SharedAccessSignature sr=..&sig=..&se=..[&skn=..]`.
    ///
    /// Surrounding whitespace is tolerated; inside, the prefix must be followed by exactly one
    /// space (the C# parser demands exactly two whitespace-separated parts). Fields may come in
    /// any order (Node puts `skn` before `se`), each is split on its first `=`, unknown fields
    /// are ignored, empty `&&` gaps are skipped, and a repeated `sr`/`sig`/`se`/`skn` is rejected.
    /// Field names are matched exactly (all SDKs write them in lowercase).
    pub fn parse(text: &str) -> Result<Self, SasError> {
        let raw = split_fields(strip_prefix(text)?)?;
        let resource_raw = required(raw.sr, "sr")?;
        let signature = url_decode(required(raw.sig, "sig")?)?;
        let expiry_secs = parse_expiry(required(raw.se, "se")?)?;
        let key_name = match raw.skn {
            None => None,
            Some("") => {
                return Err(SasError::Malformed { reason: "empty 'skn' field" });
            }
            Some(skn) => Some(url_decode(skn)?),
        };
        Ok(Self {
            resource_raw: resource_raw.to_owned(),
            resource: url_decode(resource_raw)?,
            signature,
            expiry_secs,
            key_name,
        })
    }

    /// True when `key_b64` (a base64 device or policy key) signed this token. The comparison
    /// is constant-time; a key or signature that is not valid base64 simply does not verify.
    pub fn verify(&self, key_b64: &str) -> bool {
        decode_key(key_b64).is_ok_and(|key| self.verify_key_bytes(&key))
    }

    /// Like [`SasToken::verify`] with an already-decoded key.
    pub fn verify_key_bytes(&self, key: &[u8]) -> bool {
        let Ok(sig) = STANDARD.decode(self.signature.as_bytes()) else {
            return false;
        };
        let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
            return false;
        };
        mac.update(string_to_sign(&self.resource_raw, self.expiry_secs).as_bytes());
        mac.verify_slice(&sig).is_ok()
    }

    /// True once `se + skew_secs` is in the past, i.e. `se + skew < now`. At exactly
    /// `se + skew` the token is still accepted. The hub's default skew is
    /// `limits::SAS_DEFAULT_SKEW_SECS` (5 minutes, the C# `MaxClockSkew`).
    pub fn is_expired(&self, now_secs: u64, skew_secs: u64) -> bool {
        self.expiry_secs.saturating_add(skew_secs) < now_secs
    }
}

impl std::str::FromStr for SasToken {
    type Err = SasError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Removes surrounding whitespace and `SharedAccessSignature `; returns the field list.
fn strip_prefix(text: &str) -> Result<&str, SasError> {
    let rest = text
        .trim()
        .strip_prefix(SAS_PREFIX)
        .ok_or(SasError::Malformed { reason: "does not start with 'SharedAccessSignature'" })?;
    let fields = rest
        .strip_prefix(' ')
        .ok_or(SasError::Malformed { reason: "expected one space after 'SharedAccessSignature'" })?;
    if fields.contains(char::is_whitespace) {
        return Err(SasError::Malformed { reason: "unexpected whitespace inside the token" });
    }
    Ok(fields)
}

/// Splits `k=v&k=v` into the known fields, rejecting duplicates and fields without `=`.
fn split_fields(fields: &str) -> Result<RawFields<'_>, SasError> {
    let mut raw = RawFields::default();
    for field in fields.split('&').filter(|f| !f.is_empty()) {
        let (name, value) =
            field.split_once('=').ok_or(SasError::Malformed { reason: "a field has no '='" })?;
        let (slot, name) = match name {
            "sr" => (&mut raw.sr, "sr"),
            "sig" => (&mut raw.sig, "sig"),
            "se" => (&mut raw.se, "se"),
            "skn" => (&mut raw.skn, "skn"),
            _ => continue,
        };
        if slot.replace(value).is_some() {
            return Err(SasError::DuplicateField(name));
        }
    }
    Ok(raw)
}

/// A required field's value; absent and empty both count as missing.
fn required<'a>(value: Option<&'a str>, name: &'static str) -> Result<&'a str, SasError> {
    value.filter(|v| !v.is_empty()).ok_or(SasError::MissingField(name))
}

/// `se` must be plain ASCII digits (no sign, no fraction) that fit in a `u64`.
fn parse_expiry(se: &str) -> Result<u64, SasError> {
    let bad = || SasError::BadExpiry { value: se.to_owned() };
    if !se.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    se.parse().map_err(|_| bad())
}

/// Percent-decodes a token field; `+` stays `+` (this is not form encoding).
fn url_decode(value: &str) -> Result<String, SasError> {
    percent_decode_str(value)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| SasError::Malformed { reason: "a field is not UTF-8 once URL-decoded" })
}

/// URL-encodes one component the way Python's `quote(s, safe="")` does (uppercase hex).
pub fn url_encode(value: &str) -> String {
    utf8_percent_encode(value, COMPONENT).to_string()
}

/// [`url_encode`] appended to `out` (no allocation of its own): runs of characters that stay
/// as they are go in one copy (a C2D topic encodes every property this way).
pub fn url_encode_into(out: &mut String, value: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = value.as_bytes();
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        // What [`COMPONENT`] leaves as it is (its `contains` is not public); the test
        // `url_encode_into_encodes_as_the_percent_encoding_crate_does` keeps the two alike.
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            continue;
        }
        if run < i {
            // ASCII only, so both ends are character boundaries.
            out.push_str(&value[run..i]);
        }
        for c in [b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]] {
            out.push(char::from(c));
        }
        run = i + 1;
    }
    if run < bytes.len() {
        out.push_str(&value[run..]);
    }
}

/// The text a SAS signature covers: the raw `sr`, a newline, the decimal expiry.
fn string_to_sign(resource_raw: &str, expiry_secs: u64) -> String {
    format!("{resource_raw}\n{expiry_secs}")
}

/// Signs `resource_raw + "\n" + expiry` with HMAC-SHA256 and returns the base64 signature
/// (not yet URL-encoded). `resource_raw` must be the `sr` text exactly as it will appear in the
/// token.
pub fn sign(key: &[u8], resource_raw: &str, expiry_secs: u64) -> String {
    hmac_base64(key, &string_to_sign(resource_raw, expiry_secs))
}

/// `base64(HMAC-SHA256(key, message))`.
fn hmac_base64(key: &[u8], message: &str) -> String {
    // HMAC takes keys of any length, so this never fails; an empty signature never verifies.
    let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
        return String::new();
    };
    mac.update(message.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

/// Decodes a standard-base64 (padded) key and checks IoT Hub's 16..=64 byte length rule.
pub fn decode_key(b64: &str) -> Result<Vec<u8>, SasError> {
    let key = STANDARD.decode(b64.as_bytes()).map_err(|_| SasError::BadKey { reason: "not valid base64" })?;
    if !(KEY_MIN_BYTES..=KEY_MAX_BYTES).contains(&key.len()) {
        return Err(SasError::BadKey { reason: "must decode to 16 to 64 bytes" });
    }
    Ok(key)
}

/// A fresh random key: 32 bytes from the thread RNG, base64-encoded (44 characters).
/// Used when a device is created without keys (reference §0.7).
pub fn generate_key() -> String {
    let bytes: [u8; GENERATED_KEY_BYTES] = rand::random();
    STANDARD.encode(bytes)
}

/// Builds a token for `resource_uri` (the decoded resource, e.g. `myhub/devices/dev1`), encoding
/// `sr` like the Python and Node device SDKs (`quote(uri, safe="")`: `/` → `%2F`), signing over
/// that encoded text, and appending `skn` when a policy key is used. Fields come in the order
/// `sr, sig, se[, skn]`. For our own tools and tests.
pub fn make_token(
    resource_uri: &str,
    key_b64: &str,
    key_name: Option<&str>,
    expiry_secs: u64,
) -> Result<String, SasError> {
    let key = decode_key(key_b64)?;
    let sr = url_encode(resource_uri);
    let sig = url_encode(&sign(&key, &sr, expiry_secs));
    let mut token = format!("{SAS_PREFIX} sr={sr}&sig={sig}&se={expiry_secs}");
    if let Some(name) = key_name {
        token.push_str("&skn=");
        token.push_str(&url_encode(name));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_encode_into_encodes_as_the_percent_encoding_crate_does() {
        let every_char: String = (0u32..0x300).filter_map(char::from_u32).collect();
        for value in ["", "plain-id_1.2~", "a b&c=d/e%f", "ü", "xü", "üx", "€€", "devices/d 1/é", &every_char]
        {
            let mut out = String::from("prefix&");
            url_encode_into(&mut out, value);
            assert_eq!(out, format!("prefix&{}", utf8_percent_encode(value, COMPONENT)), "{value:?}");
        }
    }

    /// 32 bytes 0x00..=0x1f. Signatures below were computed with Python's `hmac` module, not
    /// with [`sign`], so they check our HMAC against an independent implementation.
    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const SE: u64 = 1_795_663_911;

    fn parse(text: &str) -> SasToken {
        SasToken::parse(text).unwrap()
    }

    fn parse_err(text: &str) -> SasError {
        SasToken::parse(text).unwrap_err()
    }

    #[test]
    fn node_device_token() {
        let t = parse(
            "SharedAccessSignature sr=localhost%2Fdevices%2Fnodedev1\
             &sig=Onh4X9nsjqelSHJB8DgnTFr4khhcDfFyvjsf7AQfL%2Bw%3D&se=1795663911",
        );
        assert_eq!(t.resource_raw, "localhost%2Fdevices%2Fnodedev1");
        assert_eq!(t.resource, "localhost/devices/nodedev1");
        assert_eq!(t.signature, "Onh4X9nsjqelSHJB8DgnTFr4khhcDfFyvjsf7AQfL+w=");
        assert_eq!((t.expiry_secs, t.key_name.as_deref()), (SE, None));
        assert!(t.verify(KEY));
        assert!(!t.verify(&generate_key()));
    }

    #[test]
    fn python_service_token_with_raw_slash_in_sig_and_skn_last() {
        let t = parse(
            "SharedAccessSignature sr=localhost&sig=/XZ/1PPdAFre3EGMCexMC71ueTO8%2B9CsatFjwixrGv8%3D\
             &se=1795663923&skn=iothubowner",
        );
        assert_eq!(t.signature, "/XZ/1PPdAFre3EGMCexMC71ueTO8+9CsatFjwixrGv8=");
        assert_eq!(t.key_name.as_deref(), Some("iothubowner"));
        assert!(t.verify(KEY));
    }

    #[test]
    fn node_service_token_with_skn_before_se() {
        let t = parse(
            "SharedAccessSignature sr=localhost&sig=tfaKHCgzagMFzbNzm6MOcFA4gvZvVP%2Bk13WR9eH5mDk%3D\
             &skn=iothubowner&se=1795663911",
        );
        assert_eq!((t.resource.as_str(), t.key_name.as_deref()), ("localhost", Some("iothubowner")));
        assert!(t.verify(KEY));
    }

    #[test]
    fn c_sdk_lowercase_hex_is_signed_over_the_raw_text() {
        let token = "SharedAccessSignature sr=localhost%2fdevices%2fcdev1\
                     &sig=jsFeNZ31Yj0gIRRUj6ZSHWEwsnPXgo9LNXQde8cYrfo%3d&se=1795663911";
        let t = parse(token);
        assert_eq!(t.resource, "localhost/devices/cdev1");
        assert!(t.verify(KEY));
        // The same signature over the uppercase spelling of the same resource must not verify.
        let upper = parse(&token.replace("%2f", "%2F"));
        assert_eq!(upper.resource, t.resource);
        assert!(!upper.verify(KEY));
    }

    #[test]
    fn raw_host_with_port_as_uamqp_sends_it() {
        let t = parse(
            "SharedAccessSignature sr=localhost:18443\
             &sig=ysHTtdr3mciVtoC6UCS1CAu9Vg7Fv%2FrgBK%2Bt6V2%2F8zY%3D&se=1795663911&skn=iothubowner",
        );
        assert_eq!(t.resource_raw, "localhost:18443");
        assert!(t.verify(KEY));
    }

    #[test]
    fn make_token_round_trips_and_encodes_like_python() {
        let token = make_token("localhost/devices/nodedev1", KEY, None, SE).unwrap();
        assert_eq!(
            token,
            "SharedAccessSignature sr=localhost%2Fdevices%2Fnodedev1\
             &sig=Onh4X9nsjqelSHJB8DgnTFr4khhcDfFyvjsf7AQfL%2Bw%3D&se=1795663911"
        );
        let key = generate_key();
        let token = make_token("h/devices/d é+~!*'()", &key, Some("my policy"), 42).unwrap();
        assert!(token.contains("sr=h%2Fdevices%2Fd%20%C3%A9%2B~%21%2A%27%28%29&"), "{token}");
        let t = parse(&token);
        assert_eq!(t.resource, "h/devices/d é+~!*'()");
        assert_eq!((t.expiry_secs, t.key_name.as_deref()), (42, Some("my policy")));
        assert!(t.verify(&key));
        assert_eq!(
            make_token("h", "short", None, 1).unwrap_err(),
            SasError::BadKey { reason: "not valid base64" }
        );
    }

    #[test]
    fn secondary_key_verifies_its_own_tokens_only() {
        let (primary, secondary) = (generate_key(), generate_key());
        let t = parse(&make_token("h/devices/d", &secondary, None, 1).unwrap());
        assert!(t.verify(&secondary));
        assert!(!t.verify(&primary));
        assert!([primary.as_str(), secondary.as_str()].iter().any(|k| t.verify(k)));
    }

    #[test]
    fn tampering_breaks_verification() {
        let t = parse(&make_token("h/devices/d", KEY, None, SE).unwrap());
        assert!(t.verify(KEY));
        let mut sig = t.clone();
        sig.signature = sign(&decode_key(KEY).unwrap(), "h%2Fdevices%2Fe", SE);
        assert!(!sig.verify(KEY));
        let mut garbage = t.clone();
        garbage.signature = "not base64!".into();
        assert!(!garbage.verify(KEY));
        let mut sr = t.clone();
        sr.resource_raw = "h%2Fdevices%2Fe".into();
        assert!(!sr.verify(KEY));
        let mut se = t.clone();
        se.expiry_secs += 1;
        assert!(!se.verify(KEY));
        assert!(!t.verify("not a key"));
    }

    #[test]
    fn expiry_with_skew() {
        let t = parse(&make_token("h", KEY, None, 1000).unwrap());
        assert!(!t.is_expired(999, 0));
        assert!(!t.is_expired(1000, 0));
        assert!(t.is_expired(1001, 0));
        assert!(!t.is_expired(1300, 300));
        assert!(t.is_expired(1301, 300));
        let far = SasToken { expiry_secs: u64::MAX, ..t };
        assert!(!far.is_expired(u64::MAX, u64::MAX));
    }

    #[test]
    fn tolerates_outer_whitespace_unknown_and_empty_fields() {
        let t = parse("  SharedAccessSignature se=5&foo=bar&&sr=h&sig=abc%3D&  \n");
        assert_eq!((t.resource.as_str(), t.signature.as_str(), t.expiry_secs), ("h", "abc=", 5));
        let t: SasToken = "SharedAccessSignature sr=h&sig=a&se=1&x=1=2".parse().unwrap();
        assert_eq!(t.expiry_secs, 1);
    }

    #[test]
    fn rejects_malformed_shapes() {
        for bad in [
            "",
            "sr=h&sig=a&se=1",
            "SharedAccessSignaturesr=h&sig=a&se=1",
            "SharedAccessSignature  sr=h&sig=a&se=1",
            "sharedaccesssignature sr=h&sig=a&se=1",
            "SharedAccessSignature sr=h&sig=a &se=1",
            "SharedAccessSignature sr=h&sig&se=1",
            "SharedAccessSignature sr=h&sig=a&se=1&skn=",
            "SharedAccessSignature sr=%FF&sig=a&se=1",
        ] {
            assert!(matches!(parse_err(bad), SasError::Malformed { .. }), "{bad:?}");
        }
    }

    #[test]
    fn rejects_missing_duplicate_and_bad_fields() {
        assert_eq!(parse_err("SharedAccessSignature sig=a&se=1"), SasError::MissingField("sr"));
        assert_eq!(parse_err("SharedAccessSignature sr=h&se=1"), SasError::MissingField("sig"));
        assert_eq!(parse_err("SharedAccessSignature sr=h&sig=a&se="), SasError::MissingField("se"));
        assert_eq!(parse_err("SharedAccessSignature &"), SasError::MissingField("sr"));
        assert_eq!(parse_err("SharedAccessSignature sr=h&sr=h&sig=a&se=1"), SasError::DuplicateField("sr"));
        assert_eq!(
            parse_err("SharedAccessSignature sr=h&sig=a&se=1&skn=p&skn=p"),
            SasError::DuplicateField("skn")
        );
        for se in ["-1", "+1", "1.5", "1e9", "0x10", "18446744073709551616"] {
            let err = parse_err(&format!("SharedAccessSignature sr=h&sig=a&se={se}"));
            assert_eq!(err, SasError::BadExpiry { value: se.into() });
        }
    }

    #[test]
    fn key_rules() {
        assert_eq!(generate_key().len(), 44);
        assert_ne!(generate_key(), generate_key());
        assert_eq!(decode_key(&generate_key()).unwrap().len(), GENERATED_KEY_BYTES);
        assert_eq!(decode_key(&STANDARD.encode([7u8; 16])).unwrap().len(), 16);
        assert_eq!(decode_key(&STANDARD.encode([7u8; 64])).unwrap().len(), 64);
        let length = SasError::BadKey { reason: "must decode to 16 to 64 bytes" };
        assert_eq!(decode_key(&STANDARD.encode([7u8; 15])).unwrap_err(), length);
        assert_eq!(decode_key(&STANDARD.encode([7u8; 65])).unwrap_err(), length);
        assert_eq!(decode_key(""), Err(length));
        assert!(decode_key("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8").is_err());
        assert!(decode_key("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8-").is_err());
    }

    #[test]
    fn errors_never_echo_secrets() {
        let text = SasError::BadKey { reason: "not valid base64" }.to_string();
        assert!(!text.contains(KEY));
        let err = parse_err("SharedAccessSignature sr=h&sig=SECRET&se=x");
        assert!(!err.to_string().contains("SECRET"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn any_resource_round_trips(resource in "\\PC{1,40}", se in proptest::num::u64::ANY) {
            let token = make_token(&resource, KEY, Some("p"), se).unwrap();
            let t = SasToken::parse(&token).unwrap();
            proptest::prop_assert_eq!(&t.resource, &resource);
            proptest::prop_assert_eq!(t.expiry_secs, se);
            proptest::prop_assert!(t.verify(KEY));
        }
    }
}
