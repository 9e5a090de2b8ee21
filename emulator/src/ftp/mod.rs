//! The embedded FTP package server: devices download application packages from `--packages-dir`
//! over FTP (libunftp with its filesystem back end), logging in with their own IoT Hub credentials
//! (user = device id, password = a SAS token for that device; see [`auth`]).
//!
//! This module owns everything FTP: the session cap, the fault knobs ([`faults::FtpFaults`], also
//! reachable through the admin API) and the read-only view of the packages directory
//! ([`storage`]). libunftp's own `listen` binds by address and cannot take a bound socket, so the
//! hub accepts connections itself (with the shared EMFILE-tolerant accept loop) and hands each one
//! to libunftp's `Server::service`. A session over the cap gets `421` and is closed, so devices
//! retry with backoff and hub sockets stay bounded. Explicit FTPS (`AUTH TLS`) is offered with the
//! hub's certificate when TLS is configured; plain FTP stays allowed.

pub mod auth;
pub mod faults;
pub mod storage;

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use libunftp::ServerBuilder;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::Hub;
use crate::limits::{FTP_DEFAULT_MAX_SESSIONS, FTP_DEFAULT_PASSIVE_PORTS, FTP_IDLE_TIMEOUT_SECS};
use crate::listener::accept_connections;
pub use faults::{FaultSettings, FaultsError, FtpFaults};

/// How long writing the `421` refusal may take before the socket is simply closed.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// The greeting every session gets.
const GREETING: &str = "iothub-emulator package server: log in with your device id and a SAS token";

/// Settings of the FTP package server (its port is in [`crate::server::ListenConfig`]).
#[derive(Debug, Clone)]
pub struct FtpConfig {
    /// The directory served (read-only): packages and `latest.json`. Created if missing.
    pub packages_dir: PathBuf,
    /// Ports the server may open for passive-mode data connections.
    pub passive_ports: RangeInclusive<u16>,
    /// Concurrent sessions at most; a session over the cap is refused with `421`.
    pub max_sessions: usize,
    /// A session idle this long is closed.
    pub idle_timeout_secs: u64,
    /// The fault knobs, shared with the admin API (and tests).
    pub faults: Arc<FtpFaults>,
}

impl FtpConfig {
    /// Defaults serving `packages_dir`.
    pub fn new(packages_dir: PathBuf) -> Self {
        Self {
            packages_dir,
            passive_ports: FTP_DEFAULT_PASSIVE_PORTS,
            max_sessions: FTP_DEFAULT_MAX_SESSIONS,
            idle_timeout_secs: FTP_IDLE_TIMEOUT_SECS,
            faults: Arc::new(FtpFaults::new()),
        }
    }
}

/// Errors that stop the FTP server from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The packages directory cannot be created.
    #[error("cannot create the FTP packages directory {dir}: {source}; choose another with --packages-dir")]
    PackagesDir {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The settings are unusable.
    #[error("invalid FTP setting: {0}")]
    Config(String),
}

/// Parses a passive port range `50000-50100` (or a single port).
pub fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let port = |p: &str| p.trim().parse::<u16>().map_err(|e| format!("'{p}' is not a port: {e}"));
    let (lo, hi) = (port(lo)?, port(hi)?);
    if lo == 0 || lo > hi {
        return Err(format!("'{s}' is not a range LOW-HIGH with 1 <= LOW <= HIGH <= 65535"));
    }
    Ok(lo..=hi)
}

/// Checks `config` and creates the packages directory.
pub fn prepare(config: &FtpConfig) -> Result<(), Error> {
    if config.max_sessions == 0 {
        return Err(Error::Config("--ftp-max-sessions must be at least 1".into()));
    }
    if config.passive_ports.is_empty() || *config.passive_ports.start() == 0 {
        return Err(Error::Config(
            "--ftp-passive-ports must be a range LOW-HIGH with 1 <= LOW <= HIGH".into(),
        ));
    }
    std::fs::create_dir_all(&config.packages_dir)
        .map_err(|source| Error::PackagesDir { dir: config.packages_dir.clone(), source })
}

/// Serves FTP sessions on `listener` until `shutdown`; sessions are tracked by `tracker` and end
/// when shutdown is signalled. `tls` enables explicit FTPS (`AUTH TLS`).
pub async fn serve(
    listener: TcpListener,
    hub: Hub,
    config: FtpConfig,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let sessions = Arc::new(Semaphore::new(config.max_sessions));
    let at_cap = Arc::new(AtomicBool::new(false));
    let config = Arc::new(config);
    let sd = shutdown.clone();
    accept_connections(listener, "ftp", shutdown, tracker, move |stream, peer| {
        let permit = sessions.clone().try_acquire_owned();
        let (config, hub, tls, sd, at_cap) =
            (config.clone(), hub.clone(), tls.clone(), sd.clone(), at_cap.clone());
        async move {
            let Ok(_permit) = permit else {
                if !at_cap.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        max = config.max_sessions,
                        "FTP session cap reached; refusing new sessions with 421 until some end"
                    );
                }
                refuse(stream, config.max_sessions).await;
                return;
            };
            at_cap.store(false, Ordering::Relaxed);
            // A busy share answers `421` at USER on the control socket, which libunftp owns by
            // then: keep a duplicate of it, only while such a share is set.
            let (stream, control) = if config.faults.settings().busy_ppm > 0 {
                match duplicate(stream) {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(%peer, "cannot set up an FTP session: {e}");
                        return;
                    }
                }
            } else {
                (stream, None)
            };
            let session = Arc::new(auth::SessionState::new(control, tls.is_some()));
            let authenticator =
                Arc::new(auth::DeviceAuthenticator::new(hub, config.faults.clone(), session.clone()));
            let root = config.packages_dir.clone();
            let faults = config.faults.clone();
            let mut builder = ServerBuilder::with_authenticator(
                Box::new(move || storage::PackageStorage::new(&root, faults.clone(), session.clone())),
                authenticator,
            )
            .greeting(GREETING)
            .passive_ports(config.passive_ports.clone())
            .idle_session_timeout(config.idle_timeout_secs);
            if let Some(tls) = tls {
                builder = builder.ftps_manual::<PathBuf>(tls);
            }
            let server = match builder.build() {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(%peer, "cannot set up an FTP session: {e}");
                    return;
                }
            };
            tokio::select! {
                r = server.service(stream) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, "FTP session ended with an error: {e}");
                    }
                }
                // Dropping the session's future tells libunftp's control loop to shut down.
                _ = sd.cancelled() => {}
            }
        }
    })
    .await;
}

/// Splits `stream` into the stream libunftp serves and a duplicate of its socket.
fn duplicate(stream: TcpStream) -> std::io::Result<(TcpStream, Option<std::net::TcpStream>)> {
    let std = stream.into_std()?;
    let dup = std.try_clone()?;
    Ok((TcpStream::from_std(std)?, Some(dup)))
}

/// Answers a session over the cap with `421` and closes it.
async fn refuse(stream: TcpStream, max: usize) {
    write_and_close(stream, &format!("421 Too many FTP sessions (at most {max}); try again later\r\n")).await;
}

/// Writes `reply` and closes the connection, giving up after [`REFUSAL_WRITE_TIMEOUT`].
async fn write_and_close(mut stream: TcpStream, reply: &str) {
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
        stream.write_all(reply.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        assert_eq!(parse_port_range("50000-50100").unwrap(), 50000..=50100);
        assert_eq!(parse_port_range("50000").unwrap(), 50000..=50000);
        assert!(parse_port_range("50100-50000").is_err());
        assert!(parse_port_range("0-10").is_err());
        assert!(parse_port_range("a-b").is_err());
    }
}
