//! Device SAS tokens, as the official device SDKs make them: `sr` is the URL-encoded
//! `{hub}/devices/{id}`, signed with the device's base64 key over `sr + "\n" + se`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use sha2::Sha256;

/// What `urllib.parse.quote(s, safe="")` and `encodeURIComponent` escape (unreserved characters
/// stay as they are).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Why a token could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the device key is not usable: {0}")]
pub struct KeyError(String);

/// A device token for `device_id` on `hostname`, expiring at `expiry_secs` (seconds since the
/// epoch), signed with `key` (base64).
pub fn device_token(
    hostname: &str,
    device_id: &str,
    key: &str,
    expiry_secs: u64,
) -> Result<String, KeyError> {
    let key = B64.decode(key).map_err(|e| KeyError(e.to_string()))?;
    let resource = format!("{hostname}/devices/{device_id}");
    let sr = utf8_percent_encode(&resource, COMPONENT).to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|e| KeyError(e.to_string()))?;
    mac.update(format!("{sr}\n{expiry_secs}").as_bytes());
    let sig = B64.encode(mac.finalize().into_bytes());
    let sig = utf8_percent_encode(&sig, COMPONENT);
    Ok(format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry_secs}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_shape() {
        let t = device_token("hub.local", "d-1", "AAAAAAAAAAAAAAAAAAAAAA==", 1000).unwrap();
        assert!(t.starts_with("SharedAccessSignature sr=hub.local%2Fdevices%2Fd-1&sig="), "{t}");
        assert!(t.ends_with("&se=1000"));
        assert!(device_token("h", "d", "not base64!", 1).is_err());
    }
}
