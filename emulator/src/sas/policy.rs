//! Access rights and shared access policies (reference §1.5).
//!
//! [`Rights`] is a four-bit set, so a policy costs a byte of rights. [`default_policies`] builds
//! the five policies every new IoT Hub has. Only the owner key is configured; the other policies'
//! keys are derived from it deterministically, `base64(HMAC-SHA256(owner key bytes,
//! "<policy>/primary"))` (and `/secondary`), so they are stable across restarts, printable from
//! the owner key alone, and different from each other.

use std::fmt;
use std::ops::{BitOr, BitOrAssign};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::{SasError, SasToken, hmac_base64};

/// A set of IoT Hub access rights.
///
/// The bits are independent: `RegistryWrite` does not imply `RegistryRead` here, so a policy
/// that should read and write the registry lists both, as `registryReadWrite` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Rights(u8);

/// Every right with its IoT Hub name, in the order IoT Hub lists them.
const NAMES: [(Rights, &str); 4] = [
    (Rights::REGISTRY_READ, "RegistryRead"),
    (Rights::REGISTRY_WRITE, "RegistryWrite"),
    (Rights::SERVICE_CONNECT, "ServiceConnect"),
    (Rights::DEVICE_CONNECT, "DeviceConnect"),
];

impl Rights {
    /// No rights.
    pub const NONE: Self = Self(0);
    /// Read the identity registry.
    pub const REGISTRY_READ: Self = Self(1);
    /// Create, update and delete identities.
    pub const REGISTRY_WRITE: Self = Self(2);
    /// Use the service-facing endpoints: C2D, feedback, twins, methods, queries.
    pub const SERVICE_CONNECT: Self = Self(4);
    /// Use the device-facing endpoints on behalf of any device.
    pub const DEVICE_CONNECT: Self = Self(8);
    /// All four rights (the `iothubowner` policy).
    pub const ALL: Self = Self(15);

    /// True when every right in `other` is also in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// True when the sets share at least one right (an operation allowed by any of several).
    pub const fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    /// The rights in either set.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// True when the set holds no right.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The IoT Hub names of the rights in the set, in IoT Hub's order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        NAMES.into_iter().filter(move |(r, _)| self.contains(*r)).map(|(_, n)| n)
    }
}

impl BitOr for Rights {
    type Output = Self;

    fn bitor(self, other: Self) -> Self {
        self.union(other)
    }
}

impl BitOrAssign for Rights {
    fn bitor_assign(&mut self, other: Self) {
        *self = self.union(other);
    }
}

/// Writes the names joined by `", "`, as IoT Hub's REST API does
/// (`RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect`); the empty set writes nothing.
impl fmt::Display for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, name) in self.names().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(name)?;
        }
        Ok(())
    }
}

/// Parses names separated by commas and/or whitespace, ignoring case, so both the `Display`
/// form and a config value like `"registryRead,serviceConnect"` work.
impl std::str::FromStr for Rights {
    type Err = SasError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut rights = Self::NONE;
        for word in s.split(|c: char| c == ',' || c.is_whitespace()).filter(|w| !w.is_empty()) {
            let (right, _) = NAMES
                .into_iter()
                .find(|(_, name)| name.eq_ignore_ascii_case(word))
                .ok_or_else(|| SasError::UnknownRight { name: word.to_owned() })?;
            rights |= right;
        }
        Ok(rights)
    }
}

/// A shared access policy: a name used as `skn`, two keys, and the rights a token signed with
/// either key carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The policy name, e.g. `iothubowner`; tokens name it in `skn`.
    pub name: String,
    /// Base64 primary key.
    pub primary_key: String,
    /// Base64 secondary key; either key verifies.
    pub secondary_key: String,
    /// What tokens signed with this policy may do.
    pub rights: Rights,
}

impl Policy {
    /// True when the primary or the secondary key signed `token`.
    pub fn verifies(&self, token: &SasToken) -> bool {
        token.verify(&self.primary_key) || token.verify(&self.secondary_key)
    }
}

/// Name of the all-rights policy.
pub const OWNER_POLICY: &str = "iothubowner";

/// The five policies of a new IoT Hub: `iothubowner` (all rights, primary key = `owner_key`),
/// `service`, `device`, `registryRead` and `registryReadWrite`. Every other key (including the
/// owner's secondary) is [`derive_key`]`(owner_key, "<policy>/primary|secondary")`.
pub fn default_policies(owner_key: &str) -> Vec<Policy> {
    let owner = Policy {
        name: OWNER_POLICY.to_owned(),
        primary_key: owner_key.to_owned(),
        secondary_key: derive_key(owner_key, "iothubowner/secondary"),
        rights: Rights::ALL,
    };
    let derived = [
        ("service", Rights::SERVICE_CONNECT),
        ("device", Rights::DEVICE_CONNECT),
        ("registryRead", Rights::REGISTRY_READ),
        ("registryReadWrite", Rights::REGISTRY_READ | Rights::REGISTRY_WRITE),
    ]
    .into_iter()
    .map(|(name, rights)| Policy {
        name: name.to_owned(),
        primary_key: derive_key(owner_key, &format!("{name}/primary")),
        secondary_key: derive_key(owner_key, &format!("{name}/secondary")),
        rights,
    });
    std::iter::once(owner).chain(derived).collect()
}

/// `base64(HMAC-SHA256(owner key bytes, label))`: a 32-byte key that anyone holding the owner
/// key can recompute. If `owner_key` is not base64 its UTF-8 bytes are the HMAC key instead, so
/// this never fails (the owner key itself is validated where it is configured).
pub fn derive_key(owner_key: &str, label: &str) -> String {
    let key = STANDARD.decode(owner_key.as_bytes()).unwrap_or_else(|_| owner_key.as_bytes().to_vec());
    hmac_base64(&key, label)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sas::{decode_key, generate_key, make_token};

    #[test]
    fn rights_set_operations() {
        let rw = Rights::REGISTRY_READ | Rights::REGISTRY_WRITE;
        assert!(rw.contains(Rights::REGISTRY_READ));
        assert!(rw.contains(rw));
        assert!(!rw.contains(Rights::SERVICE_CONNECT));
        assert!(!Rights::REGISTRY_WRITE.contains(Rights::REGISTRY_READ));
        assert!(Rights::ALL.contains(Rights::DEVICE_CONNECT | Rights::SERVICE_CONNECT));
        assert!(Rights::NONE.is_empty() && !rw.is_empty());
        assert!(rw.contains(Rights::NONE));
        let mut r = Rights::NONE;
        r |= Rights::DEVICE_CONNECT;
        assert_eq!(r, Rights::DEVICE_CONNECT.union(Rights::NONE));
    }

    #[test]
    fn rights_display_and_parse() {
        assert_eq!(Rights::ALL.to_string(), "RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect");
        assert_eq!(
            (Rights::DEVICE_CONNECT | Rights::REGISTRY_READ).to_string(),
            "RegistryRead, DeviceConnect"
        );
        assert_eq!(Rights::NONE.to_string(), "");
        for r in [Rights::NONE, Rights::ALL, Rights::SERVICE_CONNECT | Rights::REGISTRY_WRITE] {
            assert_eq!(r.to_string().parse::<Rights>().unwrap(), r);
        }
        assert_eq!(
            "serviceconnect,registryRead".parse::<Rights>().unwrap(),
            Rights::SERVICE_CONNECT | Rights::REGISTRY_READ
        );
        assert_eq!(
            "ServiceConnect, Admin".parse::<Rights>().unwrap_err(),
            SasError::UnknownRight { name: "Admin".into() }
        );
    }

    #[test]
    fn default_policies_have_the_documented_rights() {
        let owner = generate_key();
        let policies = default_policies(&owner);
        let table: Vec<(&str, Rights)> = policies.iter().map(|p| (p.name.as_str(), p.rights)).collect();
        assert_eq!(
            table,
            [
                ("iothubowner", Rights::ALL),
                ("service", Rights::SERVICE_CONNECT),
                ("device", Rights::DEVICE_CONNECT),
                ("registryRead", Rights::REGISTRY_READ),
                ("registryReadWrite", Rights::REGISTRY_READ | Rights::REGISTRY_WRITE),
            ]
        );
        assert_eq!(policies[0].primary_key, owner);
    }

    #[test]
    fn derived_keys_are_stable_distinct_and_valid() {
        let owner = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let a = default_policies(owner);
        assert_eq!(a, default_policies(owner));
        let mut keys: Vec<&str> =
            a.iter().flat_map(|p| [p.primary_key.as_str(), p.secondary_key.as_str()]).collect();
        for k in &keys {
            assert_eq!(decode_key(k).unwrap().len(), 32, "{k}");
        }
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), 10);
        let other = default_policies(&generate_key());
        assert_ne!(a[1].primary_key, other[1].primary_key);
        // Pinned (computed independently with Python's hmac module) so a change of the
        // derivation, which would invalidate printed connection strings, fails loudly.
        assert_eq!(a[1].primary_key, "AHbFRXZ/dZ2b/rdil9oviiNg8rmT0AHS6nUXrWRgY5U=");
        assert_eq!(derive_key("not base64!", "x").len(), 44);
    }

    #[test]
    fn policy_verifies_with_either_key_only() {
        let p = &default_policies(&generate_key())[1];
        for key in [&p.primary_key, &p.secondary_key] {
            let t = make_token("h", key, Some("service"), 10).unwrap();
            assert!(p.verifies(&SasToken::parse(&t).unwrap()));
        }
        let t = make_token("h", &generate_key(), Some("service"), 10).unwrap();
        assert!(!p.verifies(&SasToken::parse(&t).unwrap()));
    }
}
