//! SAS authentication and authorization against the hub's policies and device keys
//! (reference §1.3): who presented a token, and whether that caller may do what it asks.

use crate::error::{ErrorCode, HubError};
use crate::sas::{ResourceTarget, Rights, SasToken, scope_covers};

use super::{Hub, Status};

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

fn refused(message: impl Into<String>) -> HubError {
    HubError::new(ErrorCode::IotHubUnauthorizedAccess, message)
}

impl Hub {
    /// Verifies a SAS token (the `Authorization` header, MQTT password or CBS token): syntax, expiry
    /// with the configured skew, audience host, and the signature against the policy named by
    /// `skn` or, without `skn`, the keys of the device the audience names. Disabled devices are
    /// refused. Every failure is `401` in IoT Hub's terms.
    pub fn authenticate(&self, token: &str) -> Result<Authenticated, HubError> {
        let token =
            SasToken::parse(token).map_err(|e| refused(format!("malformed SharedAccessSignature: {e}")))?;
        // Tokens are signed on the client's wall clock: time travel does not expire them.
        let now_secs = self.wall_now() / 1000;
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
        if target.module_id.is_some() {
            return Err(refused("module identities are not supported by the emulator"));
        }
        let shard = self.shard_for(id);
        let device =
            shard.devices.get(id).ok_or_else(|| refused(format!("device '{id}' is not registered")))?;
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
            Principal::Policy { name, rights } => {
                if !rights.contains(Rights::DEVICE_CONNECT) {
                    return Err(HubError::new(
                        ErrorCode::IotHubUnauthorized,
                        format!("policy '{name}' has {rights}; device operations need DeviceConnect"),
                    ));
                }
                let target = format!("{}/devices/{device_id}", self.hostname());
                if !scope_covers(&auth.resource, &target) {
                    return Err(HubError::new(
                        ErrorCode::IotHubUnauthorized,
                        format!("token scoped to '{}' does not cover '{target}'", auth.resource),
                    ));
                }
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

    /// [`Hub::authenticate`] then [`Hub::authorize_device`]: the check every device-facing
    /// endpoint makes.
    pub fn authenticate_device(&self, token: &str, device_id: &str) -> Result<Authenticated, HubError> {
        let auth = self.authenticate(token)?;
        self.authorize_device(&auth, device_id)?;
        Ok(auth)
    }

    /// [`Hub::authenticate`] then [`Hub::authorize_service`].
    pub fn authenticate_service(&self, token: &str, rights: Rights) -> Result<Authenticated, HubError> {
        let auth = self.authenticate(token)?;
        self.authorize_service(&auth, rights)?;
        Ok(auth)
    }
}
