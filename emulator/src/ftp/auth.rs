//! FTP logins: user = device id, password = a SAS token for that device (signed with the device's
//! key, or a policy token with DeviceConnect scoped to it), checked by [`Hub::authenticate_device`]
//! exactly as the device-facing HTTP and MQTT endpoints check it. The fault knob that refuses a
//! share of logins is applied first. A refused login gets libunftp's `530`.

use std::sync::Arc;

use async_trait::async_trait;
use unftp_core::auth::{AuthenticationError, Authenticator, Credentials, Principal};

use super::faults::FtpFaults;
use crate::hub::Hub;

/// Checks device credentials against the hub.
#[derive(Debug)]
pub struct DeviceAuthenticator {
    hub: Hub,
    faults: Arc<FtpFaults>,
}

impl DeviceAuthenticator {
    /// Authenticates against `hub`, refusing logins as `faults` says.
    pub fn new(hub: Hub, faults: Arc<FtpFaults>) -> Self {
        Self { hub, faults }
    }
}

#[async_trait]
impl Authenticator for DeviceAuthenticator {
    async fn authenticate(
        &self,
        username: &str,
        creds: &Credentials,
    ) -> Result<Principal, AuthenticationError> {
        if self.faults.refuse_next_login() {
            tracing::debug!(device = username, "FTP login refused by fault injection");
            return Err(AuthenticationError::new("login refused by fault injection (refuseLoginShare)"));
        }
        let token = creds.password.as_deref().unwrap_or_default();
        match self.hub.authenticate_device(token, username) {
            Ok(_) => Ok(Principal { username: username.to_string() }),
            Err(e) => {
                // libunftp logs the refusal (with the peer); this adds the hub's reason.
                tracing::debug!(device = username, ip = %creds.source_ip, "FTP login refused: {e}");
                Err(AuthenticationError::new(e.to_string()))
            }
        }
    }

    fn name(&self) -> &str {
        "iothub-emulator device SAS"
    }
}
