//! SAS authentication and authorization against the hub's policies and device keys
//! (reference §1.3): who presented a token, and whether that caller may do what it asks.
//!
//! X.509 devices authenticate with their TLS client certificate instead ([`Hub::authenticate_x509`],
//! reference-2 §3.2): `selfSigned` ones by the leaf's thumbprint, `certificateAuthority` ones by
//! a chain leading to a trusted CA and `CN={deviceId}`.
//!
//! Owns the cache of verified policy tokens ([`VerifiedTokens`]): a service sends the same token
//! with every request, and its signature check (an HMAC over the token's fields) is the same
//! answer until the token expires, because the hub's policies, their keys and its host name never
//! change. Device tokens are not cached: a device's keys and status can.

use crate::error::{ErrorCode, HubError};
use crate::sas::{ResourceTarget, Rights, SasToken, scope_covers};

use super::{AuthType, Hub, Status};

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A shared access policy and its rights.
    Policy {
        /// The policy name (`skn`).
        name: String,
        /// What the policy may do.
        rights: Rights,
    },
    /// A device, by its own key.
    Device {
        /// The device id.
        id: String,
    },
    /// A module, by its own key (a token for `{host}/devices/{id}/modules/{mid}`).
    Module {
        /// The device id.
        device_id: String,
        /// The module id.
        module_id: String,
    },
}

/// A token that verified: its principal, the decoded resource it is scoped to, and its expiry.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// Who signed it.
    pub principal: Principal,
    /// The URL-decoded `sr`.
    pub resource: String,
    /// `se`, seconds since the epoch.
    pub expiry_secs: u64,
}

/// Policy tokens verified recently, by their exact text. Bounded: at most [`Self::CAPACITY`]
/// tokens, forgotten all at once when full (only tokens that verified get in).
#[derive(Debug, Default)]
pub(super) struct VerifiedTokens {
    tokens: Vec<(Box<str>, Authenticated)>,
}

impl VerifiedTokens {
    const CAPACITY: usize = 32;

    fn get(&self, token: &str) -> Option<&Authenticated> {
        self.tokens.iter().find(|(t, _)| &**t == token).map(|(_, a)| a)
    }

    fn insert(&mut self, token: &str, auth: &Authenticated) {
        if self.get(token).is_some() {
            return;
        }
        if self.tokens.len() >= Self::CAPACITY {
            self.tokens.clear();
        }
        self.tokens.push((token.into(), auth.clone()));
    }
}

/// Whether policy `name` with `rights` and a token for `resource` may act on `target` for a
/// device or module connection (`what` names it in the error): DeviceConnect, scoped to `target`
/// or wider.
fn policy_may_connect(
    name: &str,
    rights: Rights,
    resource: &str,
    target: &str,
    what: &str,
) -> Result<(), HubError> {
    if !rights.contains(Rights::DEVICE_CONNECT) {
        return Err(HubError::new(
            ErrorCode::IotHubUnauthorized,
            format!("policy '{name}' has {rights}; {what} need DeviceConnect"),
        ));
    }
    if !scope_covers(resource, target) {
        return Err(HubError::new(
            ErrorCode::IotHubUnauthorized,
            format!("token scoped to '{resource}' does not cover '{target}'"),
        ));
    }
    Ok(())
}

fn refused(message: impl Into<String>) -> HubError {
    HubError::new(ErrorCode::IotHubUnauthorizedAccess, message)
}

impl Hub {
    /// Verifies a SAS token (the `Authorization` header, MQTT password or CBS token): syntax, expiry
    /// with the configured skew, audience host, and the signature against the policy named by
    /// `skn` or, without `skn`, the keys of the device the audience names. Disabled devices are
    /// refused. Every failure is `401` in IoT Hub's terms. Tokens are signed on the client's wall
    /// clock: time travel does not expire them.
    pub fn authenticate(&self, token_text: &str) -> Result<Authenticated, HubError> {
        let now_secs = self.wall_now() / 1000;
        let skew = self.config().sas_skew_secs;
        {
            let cache = self.shared.verified_tokens.lock().unwrap_or_else(|p| p.into_inner());
            // A token that verified before verifies again until it expires (see the module docs).
            if let Some(auth) = cache.get(token_text)
                && auth.expiry_secs.saturating_add(skew) >= now_secs
            {
                return Ok(auth.clone());
            }
        }
        let auth = self.verify_token(token_text, now_secs)?;
        if matches!(auth.principal, Principal::Policy { .. }) {
            self.shared.verified_tokens.lock().unwrap_or_else(|p| p.into_inner()).insert(token_text, &auth);
        }
        Ok(auth)
    }

    fn verify_token(&self, token: &str, now_secs: u64) -> Result<Authenticated, HubError> {
        let token =
            SasToken::parse(token).map_err(|e| refused(format!("malformed SharedAccessSignature: {e}")))?;
        if token.is_expired(now_secs, self.config().sas_skew_secs) {
            return Err(HubError::new(
                ErrorCode::IotHubUnauthorized,
                format!(
                    "SAS token expired: se={} is more than {} s before the hub's time {now_secs}",
                    token.expiry_secs,
                    self.config().sas_skew_secs
                ),
            ));
        }
        let target = ResourceTarget::parse(&token.resource)
            .map_err(|e| refused(format!("SAS token audience '{}': {e}", token.resource)))?;
        if !scope_covers(&token.resource, self.hostname()) && !scope_covers(self.hostname(), &target.host) {
            return Err(refused(format!(
                "SAS token audience host '{}' is not this hub ('{}'); sign for the hub's HostName",
                target.host,
                self.hostname()
            )));
        }
        let principal = match &token.key_name {
            Some(name) => self.verify_policy_token(&token, name)?,
            None => self.verify_device_token(&token, &target)?,
        };
        Ok(Authenticated { principal, resource: token.resource, expiry_secs: token.expiry_secs })
    }

    fn verify_policy_token(&self, token: &SasToken, name: &str) -> Result<Principal, HubError> {
        let policy = self
            .policies()
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| refused(format!("no shared access policy named '{name}'")))?;
        if token.verify(&policy.primary_key) || token.verify(&policy.secondary_key) {
            Ok(Principal::Policy { name: policy.name.clone(), rights: policy.rights })
        } else {
            Err(refused(format!("the signature does not verify with policy '{name}' keys")))
        }
    }

    fn verify_device_token(&self, token: &SasToken, target: &ResourceTarget) -> Result<Principal, HubError> {
        let Some(id) = &target.device_id else {
            return Err(refused(
                "a token without skn must be scoped to a device ({host}/devices/{deviceId})",
            ));
        };
        let shard = self.shard_for(id);
        let device =
            shard.devices.get(id).ok_or_else(|| refused(format!("device '{id}' is not registered")))?;
        if let Some(mid) = &target.module_id {
            // A module token: `sr={host}/devices/{id}/modules/{mid}`, signed with the module's key.
            let m = device
                .module(mid)
                .ok_or_else(|| refused(format!("module '{mid}' is not registered on device '{id}'")))?;
            if ![&m.primary_key, &m.secondary_key]
                .iter()
                .any(|k| k.as_deref().is_some_and(|k| token.verify(k)))
            {
                return Err(refused(format!("the signature does not verify with module '{id}/{mid}' keys")));
            }
            if device.status == Status::Disabled {
                return Err(refused(format!("device '{id}' of module '{mid}' is disabled")));
            }
            return Ok(Principal::Module { device_id: id.clone(), module_id: mid.clone() });
        }
        let keys = [&device.primary_key, &device.secondary_key];
        if !keys.iter().any(|k| k.as_deref().is_some_and(|k| token.verify(k))) {
            return Err(refused(format!("the signature does not verify with device '{id}' keys")));
        }
        if device.status == Status::Disabled {
            return Err(refused(format!("device '{id}' is disabled")));
        }
        Ok(Principal::Device { id: id.clone() })
    }

    /// Checks that `auth` may call a service-facing operation needing any of `rights`, with a
    /// token scoped to the whole hub.
    pub fn authorize_service(&self, auth: &Authenticated, rights: Rights) -> Result<(), HubError> {
        match &auth.principal {
            Principal::Device { id } => Err(refused(format!(
                "device '{id}' credentials cannot call service operations (needs {rights})"
            ))),
            Principal::Module { device_id, module_id } => Err(refused(format!(
                "module '{device_id}/{module_id}' credentials cannot call service operations (needs {rights})"
            ))),
            Principal::Policy { name, rights: have } => {
                if !have.intersects(rights) {
                    return Err(HubError::new(
                        ErrorCode::IotHubUnauthorized,
                        format!("policy '{name}' has {have}; this operation needs {rights}"),
                    ));
                }
                if !scope_covers(&auth.resource, self.hostname()) {
                    return Err(HubError::new(
                        ErrorCode::IotHubUnauthorized,
                        format!(
                            "token scoped to '{}' does not cover the hub '{}'",
                            auth.resource,
                            self.hostname()
                        ),
                    ));
                }
                Ok(())
            }
        }
    }

    /// Checks that `auth` may act as device `device_id`: its own key, or a policy with
    /// DeviceConnect scoped to that device (or wider). The device must exist and be enabled.
    pub fn authorize_device(&self, auth: &Authenticated, device_id: &str) -> Result<(), HubError> {
        match &auth.principal {
            Principal::Device { id } if id == device_id => Ok(()),
            Principal::Device { id } => Err(HubError::new(
                ErrorCode::IotHubUnauthorized,
                format!("a token for device '{id}' cannot act as device '{device_id}'"),
            )),
            Principal::Module { device_id: d, module_id: m } => Err(HubError::new(
                ErrorCode::IotHubUnauthorized,
                format!("a token for module '{d}/{m}' cannot act as device '{device_id}'"),
            )),
            Principal::Policy { name, rights } => {
                let target = format!("{}/devices/{device_id}", self.hostname());
                policy_may_connect(name, *rights, &auth.resource, &target, "device operations")?;
                let shard = self.shard_for(device_id);
                match shard.devices.get(device_id) {
                    None => Err(refused(format!("device '{device_id}' is not registered"))),
                    Some(d) if d.status == Status::Disabled => {
                        Err(refused(format!("device '{device_id}' is disabled")))
                    }
                    Some(_) => Ok(()),
                }
            }
        }
    }

    /// Checks that `auth` may act as module `module_id` of `device_id`: the module's own key, or a
    /// policy with DeviceConnect scoped to the module (or wider). The module must exist and its
    /// device be enabled. A device's own token does not cover its modules (an IoT Edge gateway
    /// feature the emulator does not have).
    pub fn authorize_module(
        &self,
        auth: &Authenticated,
        device_id: &str,
        module_id: &str,
    ) -> Result<(), HubError> {
        match &auth.principal {
            Principal::Module { device_id: d, module_id: m } if d == device_id && m == module_id => Ok(()),
            Principal::Module { device_id: d, module_id: m } => Err(HubError::new(
                ErrorCode::IotHubUnauthorized,
                format!("a token for module '{d}/{m}' cannot act as module '{device_id}/{module_id}'"),
            )),
            Principal::Device { id } => Err(HubError::new(
                ErrorCode::IotHubUnauthorized,
                format!(
                    "a token for device '{id}' cannot act as module '{device_id}/{module_id}': sign for {{host}}/devices/{device_id}/modules/{module_id} with the module's key"
                ),
            )),
            Principal::Policy { name, rights } => {
                let target = format!("{}/devices/{device_id}/modules/{module_id}", self.hostname());
                policy_may_connect(name, *rights, &auth.resource, &target, "module connections")?;
                let shard = self.shard_for(device_id);
                match shard.devices.get(device_id) {
                    None => Err(refused(format!("device '{device_id}' is not registered"))),
                    Some(d) if d.status == Status::Disabled => {
                        Err(refused(format!("device '{device_id}' is disabled")))
                    }
                    Some(d) if d.module(module_id).is_none() => Err(refused(format!(
                        "module '{module_id}' is not registered on device '{device_id}'"
                    ))),
                    Some(_) => Ok(()),
                }
            }
        }
    }

    /// [`Hub::authenticate`] then [`Hub::authorize_device`] or [`Hub::authorize_module`]:
    /// the check a connection with client identity `client_id` (`{deviceId}` or
    /// `{deviceId}/{moduleId}`) makes.
    pub fn authenticate_client(&self, token: &str, client_id: &str) -> Result<Authenticated, HubError> {
        let auth = self.authenticate(token)?;
        match super::module::split_client_id(client_id) {
            (d, Some(m)) => self.authorize_module(&auth, d, m)?,
            (d, None) => self.authorize_device(&auth, d)?,
        }
        Ok(auth)
    }

    /// [`Hub::authenticate`] then [`Hub::authorize_device`]: the check every device-facing
    /// endpoint makes.
    pub fn authenticate_device(&self, token: &str, device_id: &str) -> Result<Authenticated, HubError> {
        let auth = self.authenticate(token)?;
        self.authorize_device(&auth, device_id)?;
        Ok(auth)
    }

    /// Authenticates device `device_id` by the certificate chain its TLS client presented (the
    /// TLS layer already checked the chain's validity periods and links, see
    /// [`crate::x509::verifier`]): a `selfSigned` device when the leaf's SHA-1 or SHA-256
    /// thumbprint equals its primary or secondary thumbprint; a `certificateAuthority` device
    /// when the leaf's subject CN is the device id and the chain leads to a CA the hub trusts.
    /// The device must exist and be enabled. Returns the leaf's `notAfter` (seconds since the
    /// epoch): the connection's credential lasts until then. Every refusal is `401`.
    pub fn authenticate_x509(
        &self,
        chain: &crate::x509::ClientChain,
        device_id: &str,
    ) -> Result<u64, HubError> {
        let leaf = chain.leaf().ok_or_else(|| refused("no client certificate was presented"))?;
        let leaf = crate::x509::leaf_identity(leaf).map_err(|e| refused(e.to_string()))?;
        let (auth_type, thumbprints) = {
            let shard = self.shard_for(device_id);
            let d = shard
                .devices
                .get(device_id)
                .ok_or_else(|| refused(format!("device '{device_id}' is not registered")))?;
            if d.status == Status::Disabled {
                return Err(refused(format!("device '{device_id}' is disabled")));
            }
            let (p, s) = d.thumbprints();
            (d.auth_type, [p.map(str::to_string), s.map(str::to_string)])
        };
        match auth_type {
            AuthType::SelfSigned => {
                if !thumbprints.iter().flatten().any(|t| leaf.thumbprints.matches(t)) {
                    return Err(refused(format!(
                        "the client certificate (SHA-1 thumbprint {}, SHA-256 {}) matches neither thumbprint of device '{device_id}'",
                        leaf.thumbprints.sha1_hex(),
                        leaf.thumbprints.sha256_hex()
                    )));
                }
            }
            AuthType::CertificateAuthority => {
                if leaf.common_name.as_deref() != Some(device_id) {
                    return Err(refused(format!(
                        "the client certificate's subject CN ({}) is not the device id '{device_id}'",
                        leaf.common_name.as_deref().unwrap_or("none")
                    )));
                }
                if self.shared.x509_cas.anchor(&chain.0).is_none() {
                    return Err(refused(format!(
                        "the client certificate of device '{device_id}' does not chain to a CA this hub trusts (add one with --x509-ca or POST /emulator/x509-cas)"
                    )));
                }
            }
            other => {
                return Err(refused(format!(
                    "device '{device_id}' authenticates with '{}', not with a client certificate",
                    other.as_str()
                )));
            }
        }
        Ok(u64::try_from(leaf.not_after_secs).unwrap_or(0))
    }

    /// Trusts the CA certificates in `pem` for `certificateAuthority` devices
    /// (`POST /emulator/x509-cas`). Returns what was in it.
    pub fn add_x509_ca(&self, pem: &str) -> Result<Vec<crate::x509::CaSummary>, HubError> {
        self.shared.x509_cas.add_pem(pem).map_err(|e| HubError::invalid(e.to_string()))
    }

    /// The CA certificates the hub trusts for `certificateAuthority` devices.
    pub fn x509_cas(&self) -> Vec<crate::x509::CaSummary> {
        self.shared.x509_cas.list()
    }

    /// [`Hub::authenticate`] then [`Hub::authorize_service`].
    pub fn authenticate_service(&self, token: &str, rights: Rights) -> Result<Authenticated, HubError> {
        let auth = self.authenticate(token)?;
        self.authorize_service(&auth, rights)?;
        Ok(auth)
    }

    /// Verifies a policy token scoped to any resource on this hub's host (`sb://{host}/{eh}`,
    /// `{host}/messages/events`, ...), the tokens the built-in Event Hub-compatible endpoint and the
    /// IoT Hub redirect take: syntax, expiry with the configured skew, the audience host, a policy
    /// named by `skn` that has any of `rights`, and the signature by that policy's primary or
    /// secondary key, used either as the base64-decoded bytes (IoT Hub's rule) or as its UTF-8 text
    /// (what the Event Hubs SDKs sign with, reference-2 §0.1). The caller checks that the returned
    /// `resource` covers what is accessed. Not cached: these tokens come once per CBS put-token.
    pub fn authenticate_scoped_policy(
        &self,
        token_text: &str,
        rights: Rights,
    ) -> Result<Authenticated, HubError> {
        let now_secs = self.wall_now() / 1000;
        let token = SasToken::parse(token_text)
            .map_err(|e| refused(format!("malformed SharedAccessSignature: {e}")))?;
        if token.is_expired(now_secs, self.config().sas_skew_secs) {
            return Err(HubError::new(
                ErrorCode::IotHubUnauthorized,
                format!(
                    "SAS token expired: se={} is more than {} s before the hub's time {now_secs}",
                    token.expiry_secs,
                    self.config().sas_skew_secs
                ),
            ));
        }
        if !scope_covers(self.hostname(), &token.resource) {
            return Err(refused(format!(
                "SAS token audience '{}' is not on this hub ('{}')",
                token.resource,
                self.hostname()
            )));
        }
        let Some(name) = &token.key_name else {
            return Err(refused("the token names no shared access policy (skn)"));
        };
        let policy = self
            .policies()
            .iter()
            .find(|p| &p.name == name)
            .ok_or_else(|| refused(format!("no shared access policy named '{name}'")))?;
        let keys = [&policy.primary_key, &policy.secondary_key];
        if !keys.iter().any(|k| token.verify(k) || token.verify_key_bytes(k.as_bytes())) {
            return Err(refused(format!("the signature does not verify with policy '{name}' keys")));
        }
        if !policy.rights.intersects(rights) {
            return Err(HubError::new(
                ErrorCode::IotHubUnauthorized,
                format!("policy '{name}' has {}; this operation needs {rights}", policy.rights),
            ));
        }
        let principal = Principal::Policy { name: policy.name.clone(), rights: policy.rights };
        Ok(Authenticated { principal, resource: token.resource, expiry_secs: token.expiry_secs })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::clock::ManualClock;
    use crate::error::ErrorCode;
    use crate::hub::{Hub, HubConfig};
    use crate::sas::{Rights, make_token};

    /// The cache of verified policy tokens answers like a fresh verification: a token stops
    /// verifying once it expires, a forged token with the same expiry never does, and a device
    /// token is checked against the registry every time.
    #[test]
    fn a_cached_token_still_expires_and_forgeries_are_not_cached() {
        const T0: u64 = 1_700_000_000_000;
        let clock = ManualClock::new(T0);
        let hub = Hub::with_clock(HubConfig::default(), Arc::new(clock.clone()));
        let owner = hub.policies().iter().find(|p| p.name == "iothubowner").unwrap().primary_key.clone();
        let expiry = T0 / 1000 + 60;
        let token = make_token("localhost", &owner, Some("iothubowner"), expiry).unwrap();
        for _ in 0..2 {
            hub.authenticate_service(&token, Rights::SERVICE_CONNECT).unwrap();
        }
        let forged =
            make_token("localhost", &crate::sas::generate_key(), Some("iothubowner"), expiry).unwrap();
        assert!(hub.authenticate(&forged).is_err());
        assert!(hub.authenticate(&forged).is_err(), "a refused token is not remembered as verified");

        hub.put_device("d1", Default::default(), None).unwrap();
        let key = hub.device_primary_key("d1").unwrap().unwrap();
        let device_token = make_token("localhost/devices/d1", &key, None, expiry).unwrap();
        hub.authenticate_device(&device_token, "d1").unwrap();
        hub.delete_device("d1", None).unwrap();
        assert!(hub.authenticate_device(&device_token, "d1").is_err(), "device tokens are not cached");

        clock.advance((60 + hub.config().sas_skew_secs + 1) * 1000);
        let e = hub.authenticate_service(&token, Rights::SERVICE_CONNECT).unwrap_err();
        assert!(e.message.contains("expired"), "{}", e.message);
    }

    /// Which device a client certificate may act as: `selfSigned` by either thumbprint (SHA-1 or
    /// SHA-256), `certificateAuthority` by CN and a trusted CA; never a `sas` or disabled device.
    #[test]
    fn x509_devices_are_matched_by_thumbprint_or_by_cn_and_a_trusted_ca() {
        use crate::hub::DeviceInput;
        use crate::hub::IfMatch;
        use crate::x509::{ClientChain, issue};
        use serde_json::json;

        let chain = |c: &issue::Issued| {
            ClientChain(rustls_pemfile::certs(&mut c.cert_pem.as_bytes()).map(|c| c.unwrap()).collect())
        };
        let put = |hub: &Hub, id: &str, body: serde_json::Value, if_match: Option<IfMatch>| {
            hub.put_device(id, DeviceInput::from_json(&body).unwrap(), if_match).unwrap();
        };
        let hub = Hub::new(HubConfig::default());
        let (old, new) =
            (issue::self_signed_device("ss", 30).unwrap(), issue::self_signed_device("ss", 30).unwrap());
        let thumbs = json!({"primaryThumbprint": old.thumbprints.sha256_hex(), "secondaryThumbprint": new.thumbprints.sha256_hex()});
        put(&hub, "ss", json!({"authentication": {"type": "selfSigned", "x509Thumbprint": thumbs}}), None);
        assert!(hub.authenticate_x509(&chain(&old), "ss").is_ok(), "primary");
        assert!(hub.authenticate_x509(&chain(&new), "ss").is_ok(), "secondary (a certificate rollover)");
        let stranger = issue::self_signed_device("ss", 30).unwrap();
        let e = hub.authenticate_x509(&chain(&stranger), "ss").unwrap_err();
        assert_eq!(e.code, ErrorCode::IotHubUnauthorizedAccess);
        assert!(hub.authenticate_x509(&chain(&old), "nobody").is_err(), "unknown device");
        put(
            &hub,
            "ss",
            json!({"status": "disabled", "authentication": {"type": "selfSigned", "x509Thumbprint": thumbs}}),
            Some(IfMatch::Any),
        );
        let e = hub.authenticate_x509(&chain(&old), "ss").unwrap_err();
        assert!(e.message.contains("disabled"), "{}", e.message);

        hub.put_device("sas", DeviceInput::default(), None).unwrap();
        let e = hub.authenticate_x509(&chain(&old), "sas").unwrap_err();
        assert!(e.message.contains("'sas'"), "{}", e.message);

        let ca = issue::test_ca("Unit CA", 30).unwrap();
        put(&hub, "ca-dev", json!({"authentication": {"type": "certificateAuthority"}}), None);
        let leaf = issue::ca_signed_device("ca-dev", &ca.cert_pem, &ca.key_pem, 30).unwrap();
        let e = hub.authenticate_x509(&chain(&leaf), "ca-dev").unwrap_err();
        assert!(e.message.contains("does not chain to a CA"), "{}", e.message);
        hub.add_x509_ca(&ca.cert_pem).unwrap();
        let not_after = hub.authenticate_x509(&chain(&leaf), "ca-dev").unwrap();
        assert!(not_after > hub.wall_now() / 1000 + 29 * 86_400, "the credential lasts until notAfter");
        let other = issue::ca_signed_device("other", &ca.cert_pem, &ca.key_pem, 30).unwrap();
        let e = hub.authenticate_x509(&chain(&other), "ca-dev").unwrap_err();
        assert!(e.message.contains("CN (other)"), "{}", e.message);
        assert_eq!(hub.x509_cas().len(), 1);
    }

    /// The Event Hubs SDKs sign with the key's text, IoT Hub tools with its decoded bytes: both
    /// verify for a token scoped under the hub's host; another host, a forged signature or a
    /// policy without ServiceConnect do not.
    #[test]
    fn scoped_policy_tokens_verify_with_the_key_text_or_bytes() {
        const T0: u64 = 1_700_000_000_000;
        let hub = Hub::with_clock(HubConfig::default(), Arc::new(ManualClock::new(T0)));
        let policy = |n: &str| hub.policies().iter().find(|p| p.name == n).unwrap().primary_key.clone();
        let se = T0 / 1000 + 60;
        let text_signed = |sr: &str, key: &str, skn: &str| {
            let encoded = crate::sas::url_encode(sr);
            let sig = crate::sas::sign(key.as_bytes(), &encoded, se);
            format!(
                "SharedAccessSignature sr={encoded}&sig={}&se={se}&skn={skn}",
                crate::sas::url_encode(&sig)
            )
        };
        let owner = policy("iothubowner");
        let a = hub
            .authenticate_scoped_policy(
                &text_signed("sb://localhost/iothub", &owner, "iothubowner"),
                Rights::SERVICE_CONNECT,
            )
            .unwrap();
        assert_eq!((a.resource.as_str(), a.expiry_secs), ("sb://localhost/iothub", se));
        let bytes_signed = make_token("localhost/messages/events", &owner, Some("iothubowner"), se).unwrap();
        hub.authenticate_scoped_policy(&bytes_signed, Rights::SERVICE_CONNECT).unwrap();
        let other_host = text_signed("sb://elsewhere/iothub", &owner, "iothubowner");
        assert!(hub.authenticate_scoped_policy(&other_host, Rights::SERVICE_CONNECT).is_err());
        let forged = text_signed("sb://localhost/iothub", &crate::sas::generate_key(), "iothubowner");
        assert!(hub.authenticate_scoped_policy(&forged, Rights::SERVICE_CONNECT).is_err());
        let device_policy = text_signed("sb://localhost/iothub", &policy("device"), "device");
        assert!(hub.authenticate_scoped_policy(&device_policy, Rights::SERVICE_CONNECT).is_err());
    }
}
