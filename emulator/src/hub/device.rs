//! One registered device: its identity (keys, status, etags), its connection facts, its twin and its
//! C2D queue, and how the identity is rendered as IoT Hub's Device JSON.
//!
//! A [`Device`] is owned by the registry shard that holds it (see `hub::registry`); nothing else
//! keeps a copy. Fields are kept small because the hub is sized for a million of them: timestamps
//! are [`Millis`], etags and generation ids are counters rendered on demand.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use crate::c2d::DeviceQueue;
use crate::clock::{Millis, NEVER, iso8601};
use crate::error::HubError;
use crate::hub::module::Module;
use crate::hub::twin::Twin;
use crate::limits::DEVICE_ID_MAX_CHARS;

/// Whether a device may use the device-facing endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The default: the device may connect.
    Enabled,
    /// Every device-facing operation is refused.
    Disabled,
}

impl Status {
    /// IoT Hub's lowercase spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
        }
    }

    /// Parses `enabled` / `disabled` (case-insensitive).
    pub fn parse(s: &str) -> Result<Self, HubError> {
        match s.to_ascii_lowercase().as_str() {
            "enabled" => Ok(Self::Enabled),
            "disabled" => Ok(Self::Disabled),
            other => {
                Err(HubError::invalid(format!("status '{other}' is not valid; use 'enabled' or 'disabled'")))
            }
        }
    }
}

/// How a device authenticates: `sas` devices with SAS tokens, `selfSigned` and
/// `certificateAuthority` devices with a TLS client certificate (see [`crate::x509`]); `none`
/// devices cannot connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthType {
    /// Symmetric keys and SAS tokens.
    Sas,
    /// X.509 self-signed thumbprints.
    SelfSigned,
    /// X.509 CA-signed.
    CertificateAuthority,
    /// No authentication.
    None,
}

impl AuthType {
    /// IoT Hub's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sas => "sas",
            Self::SelfSigned => "selfSigned",
            Self::CertificateAuthority => "certificateAuthority",
            Self::None => "none",
        }
    }

    /// Parses IoT Hub's spelling (case-insensitive).
    pub fn parse(s: &str) -> Result<Self, HubError> {
        match s.to_ascii_lowercase().as_str() {
            "sas" => Ok(Self::Sas),
            "selfsigned" => Ok(Self::SelfSigned),
            "certificateauthority" => Ok(Self::CertificateAuthority),
            "none" => Ok(Self::None),
            other => Err(HubError::invalid(format!(
                "authentication.type '{other}' is not valid; use sas, selfSigned, certificateAuthority or none"
            ))),
        }
    }
}

/// A registered device and everything the hub keeps about it.
#[derive(Debug)]
pub struct Device {
    /// Case-sensitive device id.
    pub id: String,
    /// Tells apart devices deleted and re-created with the same id.
    pub generation_id: u64,
    /// Identity etag counter; rendered as base64 of its decimal text, as IoT Hub does.
    pub etag: u64,
    /// Enabled or disabled.
    pub status: Status,
    /// Free text from the service about the status.
    pub status_reason: Option<String>,
    /// When `status` last changed (0 = never).
    pub status_updated: Millis,
    /// How the device authenticates.
    pub auth_type: AuthType,
    /// Base64 symmetric keys (present for `sas` devices).
    pub primary_key: Option<String>,
    /// See `primary_key`.
    pub secondary_key: Option<String>,
    /// What few devices have (X.509 thumbprints, a Plug and Play model id): boxed, so a device
    /// without them pays one pointer.
    pub extra: Option<Box<DeviceExtra>>,
    /// `capabilities.iotEdge`.
    pub iot_edge: bool,
    /// Whether a device connection (MQTT/AMQP) is open now.
    pub connected: bool,
    /// When `connected` last changed (0 = never).
    pub connection_state_updated: Millis,
    /// Last time the device connected, sent or received (0 = never).
    pub last_activity: Millis,
    /// The device twin.
    pub twin: Twin,
    /// The cloud-to-device queue.
    pub c2d: DeviceQueue,
    /// The open device connection, if any (see `hub::link`).
    pub link: Option<crate::hub::link::Link>,
    /// The MQTT session kept under clean_session=0: a bitset of `hub::link::subscriptions`.
    pub session: u8,
}

/// Registered X.509 thumbprints: (primary, secondary), as given.
pub type ThumbprintPair = (Option<String>, Option<String>);

/// The rarely set parts of a [`Device`].
#[derive(Debug, Default)]
pub struct DeviceExtra {
    /// `x509Thumbprint` (primary, secondary), stored as given.
    pub thumbprints: Option<ThumbprintPair>,
    /// The Plug and Play model id the device last announced (`model-id=` in its MQTT username).
    pub model_id: Option<Box<str>>,
    /// The device's module identities, ordered by module id (at most
    /// [`crate::limits::MODULES_PER_DEVICE_MAX`]); see [`crate::hub::module`].
    pub modules: Vec<Module>,
    /// The configurations that target the device and the desired paths they wrote (see
    /// `crate::configs`).
    pub configurations: crate::configs::model::TwinConfigs,
}

impl DeviceExtra {
    /// Whether nothing is set (the device then drops the box).
    pub fn is_empty(&self) -> bool {
        self.thumbprints.is_none()
            && self.model_id.is_none()
            && self.modules.is_empty()
            && self.configurations.is_empty()
    }
}

impl Device {
    /// The registered X.509 thumbprints (primary, secondary), as given.
    pub fn thumbprints(&self) -> (Option<&str>, Option<&str>) {
        match self.extra.as_deref().and_then(|e| e.thumbprints.as_ref()) {
            Some((p, s)) => (p.as_deref(), s.as_deref()),
            None => (None, None),
        }
    }

    /// The model id the device announced, if any.
    pub fn model_id(&self) -> Option<&str> {
        self.extra.as_deref().and_then(|e| e.model_id.as_deref())
    }

    /// Changes the extra parts with `f`, dropping the box when nothing is left in it.
    pub fn update_extra(&mut self, f: impl FnOnce(&mut DeviceExtra)) {
        let mut extra = self.extra.take().unwrap_or_default();
        f(&mut extra);
        self.extra = (!extra.is_empty()).then_some(extra);
    }

    /// The device's modules, ordered by id.
    pub fn modules(&self) -> &[Module] {
        self.extra.as_deref().map_or(&[], |e| e.modules.as_slice())
    }

    /// Module `module_id` of this device.
    pub fn module(&self, module_id: &str) -> Option<&Module> {
        self.modules().iter().find(|m| &*m.id == module_id)
    }

    /// Module `module_id` of this device, to change.
    pub fn module_mut(&mut self, module_id: &str) -> Option<&mut Module> {
        self.extra.as_deref_mut()?.modules.iter_mut().find(|m| &*m.id == module_id)
    }

    /// The identity etag as IoT Hub writes it.
    pub fn etag_str(&self) -> String {
        B64.encode(self.etag.to_string())
    }

    /// IoT Hub's generation id text (18 digits).
    pub fn generation_id_str(&self) -> String {
        format!("{:018}", self.generation_id)
    }

    /// Renders the Device JSON of the registry API. `c2d_count` is the number of pending
    /// C2D messages (computed by the caller after lazy expiry).
    pub fn to_json(&self, c2d_count: usize) -> Value {
        let (p_thumb, s_thumb) = self.thumbprints();
        json!({
            "deviceId": self.id,
            "moduleId": null,
            "generationId": self.generation_id_str(),
            "etag": self.etag_str(),
            "connectionState": if self.connected { "Connected" } else { "Disconnected" },
            "status": self.status.as_str(),
            "statusReason": self.status_reason,
            "connectionStateUpdatedTime": time_or_never(self.connection_state_updated),
            "statusUpdatedTime": time_or_never(self.status_updated),
            "lastActivityTime": time_or_never(self.last_activity),
            "cloudToDeviceMessageCount": c2d_count,
            "authentication": {
                "symmetricKey": {
                    "primaryKey": self.primary_key,
                    "secondaryKey": self.secondary_key,
                },
                "x509Thumbprint": {
                    "primaryThumbprint": p_thumb,
                    "secondaryThumbprint": s_thumb,
                },
                "type": self.auth_type.as_str(),
            },
            "capabilities": { "iotEdge": self.iot_edge },
            "deviceScope": null,
            "parentScopes": [],
        })
    }
}

/// Renders `at` as ISO 8601, or IoT Hub's "never" timestamp for 0.
pub fn time_or_never(at: Millis) -> String {
    if at == 0 { NEVER.to_string() } else { iso8601(at) }
}

/// Checks a device id against IoT Hub's rules: 1 to 128 characters, ASCII letters and digits and
/// `- . + % _ # * ? ! ( ) , = @ $ '`.
pub fn validate_device_id(id: &str) -> Result<(), HubError> {
    const EXTRA: &str = "-.+%_#*?!(),=@$':";
    if id.is_empty() || id.chars().count() > DEVICE_ID_MAX_CHARS {
        return Err(HubError::new(
            crate::error::ErrorCode::InvalidDeviceId,
            format!("DeviceId '{id}' is invalid: it must be 1 to {DEVICE_ID_MAX_CHARS} characters long"),
        ));
    }
    if let Some(bad) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || EXTRA.contains(*c))) {
        return Err(HubError::new(
            crate::error::ErrorCode::InvalidDeviceId,
            format!(
                "DeviceId '{id}' is invalid: character {bad:?} is not allowed (use ASCII letters, digits and {EXTRA})"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        validate_device_id("fridge-0001").unwrap();
        validate_device_id("a.b+c%d_e#f*g?h!i(j)k,l=m@n$o'p").unwrap();
        assert!(validate_device_id("").is_err());
        assert!(validate_device_id(&"x".repeat(129)).is_err());
        validate_device_id(&"x".repeat(128)).unwrap();
        let e = validate_device_id("has space").unwrap_err();
        assert!(e.message.contains("' '"), "{}", e.message);
        assert!(validate_device_id("slash/no").is_err());
        assert!(validate_device_id("ümlaut").is_err());
    }

    #[test]
    fn status_and_auth_type_parse() {
        assert_eq!(Status::parse("Disabled").unwrap(), Status::Disabled);
        assert!(Status::parse("paused").is_err());
        assert_eq!(AuthType::parse("selfSigned").unwrap(), AuthType::SelfSigned);
        assert!(AuthType::parse("x509").is_err());
    }
}
