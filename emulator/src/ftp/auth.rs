//! FTP logins: user = device id, password = a SAS token for that device (signed with the device's
//! key, or a policy token with DeviceConnect scoped to it), checked by [`Hub::authenticate_device`]
//! exactly as the device-facing HTTP and MQTT endpoints check it. A refused login gets libunftp's
//! `530`.
//!
//! This module also owns each session's fault decisions ([`SessionState`]): libunftp calls
//! [`Authenticator::cert_auth_sufficient`] with the user name as soon as `USER` arrives, which is
//! where the session's attempt is counted and the fault knobs decide
//! ([`super::faults::FtpFaults::begin_session`]). A session turned away as busy gets `421` written
//! straight onto its control socket (through a duplicate of the socket taken at accept time, held
//! only while a busy share is set) and the socket is shut down, so libunftp's own reply never
//! reaches the client. When the server offers FTPS the control channel may be encrypted by `USER`
//! (nothing tells), so the decision made at `USER` is carried out at `PASS`, where libunftp says
//! whether the channel is plain: `421` and close if it is, `530` if it is TLS (a plain-text reply
//! would corrupt the stream). A session accepted without the duplicate (the busy share was switched
//! on after it connected) gets `530` at `PASS` too. A login refused by `refuseLoginShare` is refused
//! before the token is checked.

use std::io::Write;
use std::net::Shutdown;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use unftp_core::auth::{AuthenticationError, Authenticator, ChannelEncryptionState, Credentials, Principal};

use super::faults::{FtpFaults, SessionFaults};
use crate::hub::Hub;

/// The `421` a busy session gets when `USER` arrives.
const BUSY_REPLY: &[u8] = b"421 Service not available (fault injection: busyShare); try again later\r\n";

/// One FTP session's fault state, shared by its authenticator and its storage back end.
#[derive(Debug, Default)]
pub struct SessionState {
    /// The decisions for the session's user, once `USER` arrived.
    decided: Mutex<Option<SessionFaults>>,
    /// A duplicate of the control socket, to answer `421` and close it at `USER`.
    control: Option<std::net::TcpStream>,
    /// The server offers FTPS: the control channel may be encrypted at `USER`.
    tls: bool,
}

impl SessionState {
    /// State for a new session; `control` is a duplicate of its control socket (needed only to
    /// turn it away as busy), `tls` whether the server offers FTPS.
    pub fn new(control: Option<std::net::TcpStream>, tls: bool) -> Self {
        Self { decided: Mutex::new(None), control, tls }
    }

    /// The [`super::faults::user_key`] of the session's user (0 before `USER`).
    pub fn user_key(&self) -> u64 {
        self.decisions().map_or(0, |d| d.user)
    }

    fn decisions(&self) -> Option<SessionFaults> {
        *self.decided.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers `421` on the plain control channel and shuts the socket down. False without a
    /// duplicate of the socket.
    fn turn_away(&self) -> bool {
        let Some(socket) = &self.control else { return false };
        // The socket is non-blocking; a 70-byte reply fits in any send buffer.
        let _ = (&*socket).write_all(BUSY_REPLY);
        let _ = socket.shutdown(Shutdown::Both);
        true
    }
}

/// Checks device credentials against the hub; one per session.
#[derive(Debug)]
pub struct DeviceAuthenticator {
    hub: Hub,
    faults: Arc<FtpFaults>,
    session: Arc<SessionState>,
}

impl DeviceAuthenticator {
    /// Authenticates against `hub`, applying `faults` to the session `session`.
    pub fn new(hub: Hub, faults: Arc<FtpFaults>, session: Arc<SessionState>) -> Self {
        Self { hub, faults, session }
    }
}

#[async_trait]
impl Authenticator for DeviceAuthenticator {
    /// Called by libunftp when `USER` arrives: counts the attempt and applies the busy fault.
    /// Never lets a certificate replace the password.
    async fn cert_auth_sufficient(&self, username: &str) -> bool {
        let mut decided = self.faults.begin_session(username);
        // With FTPS offered the channel may be encrypted by now: answer at PASS (see above).
        if decided.busy && !self.session.tls && self.session.turn_away() {
            tracing::debug!(
                device = username,
                attempt = decided.attempt,
                "FTP session turned away (busyShare)"
            );
            decided.busy = false;
            decided.refuse_login = true;
        }
        *self.session.decided.lock().unwrap_or_else(|p| p.into_inner()) = Some(decided);
        false
    }

    async fn authenticate(
        &self,
        username: &str,
        creds: &Credentials,
    ) -> Result<Principal, AuthenticationError> {
        let decided = match self.session.decisions() {
            Some(d) => d,
            None => self.faults.begin_session(username),
        };
        if decided.busy {
            let plain = creds.command_channel_security == ChannelEncryptionState::Plaintext;
            if plain && self.session.turn_away() {
                tracing::debug!(
                    device = username,
                    attempt = decided.attempt,
                    "FTP session turned away (busyShare)"
                );
            }
            return Err(AuthenticationError::new("server busy (fault injection: busyShare)"));
        }
        if decided.refuse_login {
            tracing::debug!(
                device = username,
                attempt = decided.attempt,
                "FTP login refused by fault injection"
            );
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
