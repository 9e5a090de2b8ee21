//! IoT Hub connection strings: `;`-separated `Key=Value` pairs (reference §1.1).
//!
//! Parsing follows the official SDKs: each pair is split on its *first* `=` (base64 keys end in
//! `=`), keys are case-sensitive and limited to the eight IoT Hub knows (Python rejects others),
//! an empty value counts as absent (Node's `!cn[key]` check), and the key combinations the Node
//! parser refuses are refused here too. [`ConnectionString::token`] makes the SAS token an SDK
//! would send with the string, for our own tools and tests.

use std::fmt;

use super::{SasError, make_token};

/// The connection-string keys IoT Hub accepts, in the order `Display` writes them.
const KEYS: [&str; 8] = [
    "HostName",
    "DeviceId",
    "ModuleId",
    "SharedAccessKeyName",
    "SharedAccessKey",
    "SharedAccessSignature",
    "x509",
    "GatewayHostName",
];

/// What a valid connection string authenticates as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionKind {
    /// A service client holding a shared access policy key.
    Service,
    /// A device or module holding a symmetric key: its own, or a policy key when
    /// `SharedAccessKeyName` is set.
    DeviceKey,
    /// A device or module holding a ready-made SAS token.
    DeviceToken,
    /// A device or module authenticating with an X.509 client certificate.
    DeviceX509,
}

/// A parsed connection string. Fields mirror the keys; `None` means absent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectionString {
    /// `HostName`: the hub, also the SAS audience and MQTT username host (may carry `:port`).
    pub host_name: String,
    /// `DeviceId`: present for device and module strings.
    pub device_id: Option<String>,
    /// `ModuleId`: present for module strings (requires `DeviceId`).
    pub module_id: Option<String>,
    /// `SharedAccessKeyName`: the policy name (`skn`) for policy keys.
    pub shared_access_key_name: Option<String>,
    /// `SharedAccessKey`: a base64 symmetric key.
    pub shared_access_key: Option<String>,
    /// `SharedAccessSignature`: a complete, pre-made SAS token.
    pub shared_access_signature: Option<String>,
    /// `x509=true`: authenticate with a client certificate.
    pub x509: bool,
    /// `GatewayHostName`: where device sockets connect instead of `HostName`.
    pub gateway_host_name: Option<String>,
}

impl ConnectionString {
    /// Parses and validates a connection string; see [`ConnectionString::validate`] for the rules.
    ///
    /// Whitespace around each `key=value` part is ignored (not only around the whole text), so a
    /// value never keeps trailing whitespace that the whole-text trim would drop once the part is
    /// written last: what [`Display`](fmt::Display) writes always parses back to the same value.
    pub fn parse(text: &str) -> Result<Self, SasError> {
        let mut values: [Option<&str>; 8] = [None; 8];
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or(SasError::InvalidConnectionString { reason: "a part has no '='" })?;
            let index = KEYS
                .iter()
                .position(|k| *k == key)
                .ok_or_else(|| SasError::UnknownKey { key: key.to_owned() })?;
            if values[index].replace(value).is_some() {
                return Err(SasError::DuplicateKey(KEYS[index]));
            }
        }
        let cs = Self::from_values(values)?;
        cs.validate()?;
        Ok(cs)
    }

    /// Builds the struct from values indexed like [`KEYS`]; empty values count as absent.
    fn from_values(values: [Option<&str>; 8]) -> Result<Self, SasError> {
        let [host, device, module, key_name, key, sas, x509, gateway] =
            values.map(|v| v.filter(|v| !v.is_empty()).map(str::to_owned));
        let x509 = match x509.as_deref() {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            Some(_) => {
                return Err(SasError::InvalidConnectionString { reason: "x509 must be true or false" });
            }
        };
        Ok(Self {
            host_name: host.unwrap_or_default(),
            device_id: device,
            module_id: module,
            shared_access_key_name: key_name,
            shared_access_key: key,
            shared_access_signature: sas,
            x509,
            gateway_host_name: gateway,
        })
    }

    /// Checks the rules and says what the string authenticates as: `HostName` is required;
    /// `ModuleId` needs `DeviceId`; `SharedAccessKey`, `SharedAccessSignature` and `x509=true`
    /// exclude each other and a device string needs one of them; a service string (no
    /// `DeviceId`) needs `SharedAccessKeyName` and `SharedAccessKey`.
    pub fn validate(&self) -> Result<ConnectionKind, SasError> {
        let invalid = |reason| Err(SasError::InvalidConnectionString { reason });
        if self.host_name.is_empty() {
            return Err(SasError::MissingKey("HostName"));
        }
        if self.module_id.is_some() && self.device_id.is_none() {
            return invalid("ModuleId requires DeviceId");
        }
        let (key, sas) = (self.shared_access_key.is_some(), self.shared_access_signature.is_some());
        match (key, sas, self.x509) {
            (true, true, _) => invalid("SharedAccessKey and SharedAccessSignature cannot be combined"),
            (true, _, true) => invalid("SharedAccessKey and x509 cannot be combined"),
            (_, true, true) => invalid("SharedAccessSignature and x509 cannot be combined"),
            _ if self.device_id.is_none() => self.validate_service(),
            (true, _, _) => Ok(ConnectionKind::DeviceKey),
            (_, true, _) => Ok(ConnectionKind::DeviceToken),
            (_, _, true) => Ok(ConnectionKind::DeviceX509),
            _ => invalid(
                "a device connection string needs SharedAccessKey, SharedAccessSignature or x509=true",
            ),
        }
    }

    /// The service-string rules (no `DeviceId`).
    fn validate_service(&self) -> Result<ConnectionKind, SasError> {
        if self.shared_access_key_name.is_none() {
            return Err(SasError::MissingKey("SharedAccessKeyName"));
        }
        if self.shared_access_key.is_none() {
            return Err(SasError::MissingKey("SharedAccessKey"));
        }
        Ok(ConnectionKind::Service)
    }

    /// A service connection string for a shared access policy.
    pub fn service(host: &str, policy: &str, key: &str) -> Self {
        Self {
            host_name: host.to_owned(),
            shared_access_key_name: Some(policy.to_owned()),
            shared_access_key: Some(key.to_owned()),
            ..Self::default()
        }
    }

    /// A device connection string with the device's own symmetric key.
    pub fn device(host: &str, device_id: &str, key: &str) -> Self {
        Self {
            host_name: host.to_owned(),
            device_id: Some(device_id.to_owned()),
            shared_access_key: Some(key.to_owned()),
            ..Self::default()
        }
    }

    /// The decoded SAS resource an SDK signs for this string: `HostName` for a service,
    /// `HostName/devices/{id}[/modules/{mid}]` for a device or module. `HostName` is used as
    /// written, port included, as the SDKs do.
    pub fn resource_uri(&self) -> String {
        match (&self.device_id, &self.module_id) {
            (None, _) => self.host_name.clone(),
            (Some(d), None) => format!("{}/devices/{d}", self.host_name),
            (Some(d), Some(m)) => format!("{}/devices/{d}/modules/{m}", self.host_name),
        }
    }

    /// The SAS token a client would present: the string's own `SharedAccessSignature` if it has
    /// one, else a token for [`ConnectionString::resource_uri`] signed with `SharedAccessKey`
    /// (and `skn` = `SharedAccessKeyName` when set), expiring at `expiry_secs`.
    pub fn token(&self, expiry_secs: u64) -> Result<String, SasError> {
        if let Some(sas) = &self.shared_access_signature {
            return Ok(sas.clone());
        }
        let key = self.shared_access_key.as_deref().ok_or(SasError::MissingKey("SharedAccessKey"))?;
        let skn = self.shared_access_key_name.as_deref();
        make_token(&self.resource_uri(), key, skn, expiry_secs)
    }
}

impl std::str::FromStr for ConnectionString {
    type Err = SasError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Writes the keys that are set, in the order HostName, DeviceId, ModuleId,
/// SharedAccessKeyName, SharedAccessKey, SharedAccessSignature, x509, GatewayHostName.
impl fmt::Display for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let x509 = self.x509.then_some("true");
        let values = [
            Some(self.host_name.as_str()),
            self.device_id.as_deref(),
            self.module_id.as_deref(),
            self.shared_access_key_name.as_deref(),
            self.shared_access_key.as_deref(),
            self.shared_access_signature.as_deref(),
            x509,
            self.gateway_host_name.as_deref(),
        ];
        let mut first = true;
        for (key, value) in KEYS.iter().zip(values) {
            let Some(value) = value else { continue };
            if !first {
                f.write_str(";")?;
            }
            first = false;
            write!(f, "{key}={value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sas::{SasToken, generate_key};

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn err(text: &str) -> SasError {
        ConnectionString::parse(text).unwrap_err()
    }

    #[test]
    fn parses_each_kind() {
        let cases = [
            (
                format!("HostName=h;SharedAccessKeyName=iothubowner;SharedAccessKey={KEY}"),
                ConnectionKind::Service,
            ),
            (format!("HostName=h;DeviceId=d;SharedAccessKey={KEY}"), ConnectionKind::DeviceKey),
            (
                format!("HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey={KEY};GatewayHostName=gw"),
                ConnectionKind::DeviceKey,
            ),
            (
                "HostName=h;DeviceId=d;SharedAccessSignature=SharedAccessSignature sr=h&sig=a&se=1".into(),
                ConnectionKind::DeviceToken,
            ),
            ("HostName=h;DeviceId=d;x509=true".into(), ConnectionKind::DeviceX509),
        ];
        for (text, kind) in cases {
            let cs = ConnectionString::parse(&text).unwrap();
            assert_eq!(cs.validate().unwrap(), kind, "{text}");
            assert_eq!(cs.to_string(), text, "round trip");
        }
    }

    #[test]
    fn splits_on_first_equals_and_keeps_key_padding() {
        let cs = ConnectionString::parse(&format!("HostName=h;DeviceId=a=b;SharedAccessKey={KEY};")).unwrap();
        assert_eq!(cs.shared_access_key.as_deref(), Some(KEY));
        assert_eq!(cs.device_id.as_deref(), Some("a=b"));
        let cs: ConnectionString = "HostName=h:8883;DeviceId=d;x509=True".parse().unwrap();
        assert!(cs.x509);
        assert_eq!(cs.host_name, "h:8883");
    }

    #[test]
    fn rejects_unknown_duplicate_and_malformed_keys() {
        assert_eq!(err("HostName=h;Foo=1"), SasError::UnknownKey { key: "Foo".into() });
        assert_eq!(err("hostname=h;DeviceId=d;x509=true"), SasError::UnknownKey { key: "hostname".into() });
        assert_eq!(err("HostName=h;HostName=g;DeviceId=d;x509=true"), SasError::DuplicateKey("HostName"));
        assert!(matches!(err("HostName=h;DeviceId"), SasError::InvalidConnectionString { .. }));
        assert!(matches!(err("HostName=h;DeviceId=d;x509=yes"), SasError::InvalidConnectionString { .. }));
    }

    #[test]
    fn rejects_missing_host_and_service_keys() {
        assert_eq!(err(&format!("DeviceId=d;SharedAccessKey={KEY}")), SasError::MissingKey("HostName"));
        assert_eq!(
            err(&format!("HostName=;DeviceId=d;SharedAccessKey={KEY}")),
            SasError::MissingKey("HostName")
        );
        assert_eq!(
            err(&format!("HostName=h;SharedAccessKey={KEY}")),
            SasError::MissingKey("SharedAccessKeyName")
        );
        assert_eq!(err("HostName=h;SharedAccessKeyName=p"), SasError::MissingKey("SharedAccessKey"));
        assert!(matches!(err("HostName=h;x509=true"), SasError::MissingKey("SharedAccessKeyName")));
        assert_eq!(err(""), SasError::MissingKey("HostName"));
    }

    #[test]
    fn rejects_node_invalid_combinations() {
        let sas = "SharedAccessSignature=SharedAccessSignature sr=h&sig=a&se=1";
        for bad in [
            format!("HostName=h;DeviceId=d;SharedAccessKey={KEY};x509=true"),
            format!("HostName=h;DeviceId=d;SharedAccessKey={KEY};{sas}"),
            format!("HostName=h;DeviceId=d;x509=true;{sas}"),
            "HostName=h;DeviceId=d".to_owned(),
            "HostName=h;DeviceId=d;x509=false".to_owned(),
            format!("HostName=h;ModuleId=m;SharedAccessKeyName=p;SharedAccessKey={KEY}"),
            format!("HostName=h;SharedAccessKeyName=p;SharedAccessKey={KEY};{sas}"),
        ] {
            assert!(matches!(err(&bad), SasError::InvalidConnectionString { .. }), "{bad}");
        }
    }

    #[test]
    fn constructors_and_tokens() {
        let key = generate_key();
        let svc = ConnectionString::service("localhost", "iothubowner", &key);
        assert_eq!(
            svc.to_string(),
            format!("HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey={key}")
        );
        let t = SasToken::parse(&svc.token(100).unwrap()).unwrap();
        assert_eq!((t.resource.as_str(), t.key_name.as_deref()), ("localhost", Some("iothubowner")));
        assert!(t.verify(&key));

        let dev = ConnectionString::device("localhost", "dev1", &key);
        assert_eq!(ConnectionString::parse(&dev.to_string()).unwrap(), dev);
        let t = SasToken::parse(&dev.token(100).unwrap()).unwrap();
        assert_eq!(t.resource_raw, "localhost%2Fdevices%2Fdev1");
        assert_eq!(t.key_name, None);
        assert!(t.verify(&key));

        let module = ConnectionString { module_id: Some("m".into()), ..dev };
        assert_eq!(module.resource_uri(), "localhost/devices/dev1/modules/m");
        let pre = ConnectionString::parse(
            "HostName=h;DeviceId=d;SharedAccessSignature=SharedAccessSignature sr=x&sig=y&se=1",
        )
        .unwrap();
        assert_eq!(pre.token(5).unwrap(), "SharedAccessSignature sr=x&sig=y&se=1");
    }

    #[test]
    fn whitespace_around_parts_is_ignored_so_display_round_trips() {
        // Found by the fuzz target `connection_string` (fuzz/regressions/connection_string/):
        // a value ending in whitespace, not last in the text, kept it; written last by Display,
        // the whole-text trim dropped it and the string parsed to another value.
        let cs = ConnectionString::parse("HostName=h;SharedAccessKey=AAAA\r ;DeviceId=d").unwrap();
        assert_eq!(cs.shared_access_key.as_deref(), Some("AAAA"));
        assert_eq!(ConnectionString::parse(&cs.to_string()).unwrap(), cs);
        let spaced = ConnectionString::parse(" HostName=h ;\n DeviceId=d;\tSharedAccessKey=AAAA\n").unwrap();
        assert_eq!((spaced.host_name.as_str(), spaced.device_id.as_deref()), ("h", Some("d")));
    }
}
