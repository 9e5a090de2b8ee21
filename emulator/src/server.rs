//! Runs the hub's front ends on already-bound listeners until a shutdown signal: the HTTPS port
//! (TLS, IoT Hub's REST API), the plain HTTP port (the same API plus health, CA download and
//! telemetry read-out), the MQTT device endpoint (TLS, plus an optional plain-TCP port for load tests),
//! the AMQP port (TLS, the service SDKs' C2D and feedback) and the FTP package server ([`crate::ftp`]).
//!
//! Each listener gets one accept loop ([`crate::listener`]); each connection one task, tracked so
//! shutdown can wait for them. This module assembles the front ends; none of them imports it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ftp::{self, FtpConfig, FtpFaults};
use crate::http::{self, HttpContext, Port};
use crate::hub::{Hub, HubConfig};
use crate::limits::{
    DEFAULT_AMQP_PORT, DEFAULT_FTP_PORT, DEFAULT_HTTP_PORT, DEFAULT_HTTPS_PORT, DEFAULT_MQTT_PORT,
};
use crate::listener::{BindError, accept_connections, bind_one, tls_handshake};
use crate::tls::{HubCertificates, TlsError};

/// How long shutdown waits for open connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Task polls between two looks at the sockets for a runtime serving the hub (tokio's
/// `event_interval`; its default is 61). Under fan-out load every read of C2D sends wakes one
/// device connection per message: looking at the sockets again after 61 polls reads the next
/// sends before the last ones were delivered, so the backlog (and send-to-device latency) grows
/// for as long as the senders keep up. With 1,024 the tasks woken by one read run first (a
/// runtime with nothing left to run looks at once, as before). `bench/fanout.sh`, 19,000
/// devices, AMQP sender: p99 0.8–1.1× Mosquitto's against 1.0–2.0× with 61 (bench/README.md).
pub const RUNTIME_EVENT_INTERVAL: u32 = 1024;

/// Where the hub listens. Port 0 picks a free port.
#[derive(Debug, Clone)]
pub struct ListenConfig {
    /// Address every listener binds (`127.0.0.1`; containers use `0.0.0.0`).
    pub bind: IpAddr,
    /// HTTPS: IoT Hub's REST API (the SDKs dial 443).
    pub https_port: u16,
    /// Plain HTTP: health, CA, telemetry read-out and the REST API without TLS.
    pub http_port: u16,
    /// MQTT over TLS (the SDKs dial 8883).
    pub mqtt_port: u16,
    /// MQTT over plain TCP, for load tests on loopback; off when `None`.
    pub mqtt_plain_port: Option<u16>,
    /// Serve the plain MQTT port with task-less drivers (`crate::mqtt::driver`, the default)
    /// instead of one task per connection.
    pub mqtt_plain_driver: bool,
    /// AMQP over TLS: the service SDKs' C2D sends and feedback (they dial 5671).
    pub amqp_port: u16,
    /// AMQP over plain TCP, for load tests on loopback (the fan-out bench's AMQP sender); off when
    /// `None`.
    pub amqp_plain_port: Option<u16>,
    /// The FTP package server (`None`: off).
    pub ftp_port: Option<u16>,
    /// Names the server certificate covers besides the hub's host name, `localhost`, `127.0.0.1`
    /// and `::1` (`--tls-san`): DNS names or addresses clients dial.
    pub tls_names: Vec<String>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            bind: IpAddr::from([127, 0, 0, 1]),
            https_port: DEFAULT_HTTPS_PORT,
            http_port: DEFAULT_HTTP_PORT,
            mqtt_port: DEFAULT_MQTT_PORT,
            mqtt_plain_port: None,
            mqtt_plain_driver: true,
            amqp_port: DEFAULT_AMQP_PORT,
            amqp_plain_port: None,
            ftp_port: Some(DEFAULT_FTP_PORT),
            tls_names: Vec::new(),
        }
    }
}

impl ListenConfig {
    /// Every listener on `bind` with a port the OS picks, the plain MQTT and AMQP listeners and the
    /// FTP server included: what tests, examples and benches use so that parallel hubs never collide.
    pub fn ephemeral(bind: IpAddr) -> Self {
        Self {
            bind,
            https_port: 0,
            http_port: 0,
            amqp_port: 0,
            amqp_plain_port: Some(0),
            ftp_port: Some(0),
            mqtt_port: 0,
            mqtt_plain_port: Some(0),
            mqtt_plain_driver: true,
            tls_names: Vec::new(),
        }
    }
}

/// The sockets the hub serves on, already bound.
#[derive(Debug)]
pub struct Listeners {
    /// HTTPS: IoT Hub's REST API (service and device).
    pub https: TcpListener,
    /// Plain HTTP: the same API plus the emulator's endpoints.
    pub http: TcpListener,
    /// MQTT over TLS.
    pub mqtt: TcpListener,
    /// MQTT over plain TCP, if enabled.
    pub mqtt_plain: Option<TcpListener>,
    /// Serve `mqtt_plain` with task-less drivers ([`ListenConfig::mqtt_plain_driver`]).
    pub mqtt_plain_driver: bool,
    /// AMQP over TLS: the service endpoint.
    pub amqp: TcpListener,
    /// AMQP over plain TCP, if enabled.
    pub amqp_plain: Option<TcpListener>,
    /// The FTP package server, if on.
    pub ftp: Option<TcpListener>,
}

impl Listeners {
    /// Binds every listener of `cfg`. Must run inside a tokio runtime.
    pub fn bind(cfg: &ListenConfig) -> Result<Self, ServerError> {
        Ok(Self {
            https: bind_one(cfg.bind, cfg.https_port, "HTTPS", "--https-port")?,
            http: bind_one(cfg.bind, cfg.http_port, "plain HTTP", "--http-port")?,
            mqtt: bind_one(cfg.bind, cfg.mqtt_port, "MQTT", "--mqtt-port")?,
            mqtt_plain: cfg
                .mqtt_plain_port
                .map(|p| bind_one(cfg.bind, p, "plain MQTT", "--mqtt-plain-port"))
                .transpose()?,
            mqtt_plain_driver: cfg.mqtt_plain_driver,
            amqp: bind_one(cfg.bind, cfg.amqp_port, "AMQP", "--amqp-port")?,
            amqp_plain: cfg
                .amqp_plain_port
                .map(|p| bind_one(cfg.bind, p, "plain AMQP", "--amqp-plain-port"))
                .transpose()?,
            ftp: cfg.ftp_port.map(|p| bind_one(cfg.bind, p, "FTP", "--ftp-port")).transpose()?,
        })
    }
}

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A listener could not be bound.
    #[error("cannot bind the {what} listener to {addr}: {source}{}; choose another port with {flag} (0 picks a free one)",
        if addr.port() < 1024 && addr.port() != 0 { " (ports below 1024 need root or CAP_NET_BIND_SERVICE)" } else { "" })]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address tried.
        addr: SocketAddr,
        /// The flag that moves it.
        flag: &'static str,
        /// The cause.
        source: io::Error,
    },
    /// The FTP server's settings are unusable.
    #[error(transparent)]
    Ftp(#[from] ftp::Error),
    /// The state directory (`--persist`) cannot be opened or recovered.
    #[error("--persist: {0}")]
    Persist(#[from] crate::persist::PersistError),
    /// The server task failed.
    #[error("the server task failed: {0}")]
    Task(String),
}

impl From<BindError> for ServerError {
    fn from(e: BindError) -> Self {
        let BindError { what, addr, flag, source } = e;
        Self::Bind { what, addr, flag, source }
    }
}

/// A hub serving on its listeners in the background: what tests, the bench and the binary use.
#[derive(Debug)]
pub struct RunningHub {
    /// The hub's state, for direct inspection.
    pub hub: Hub,
    /// The HTTPS listener's address.
    pub https_addr: SocketAddr,
    /// The plain HTTP listener's address.
    pub http_addr: SocketAddr,
    /// The MQTT-over-TLS listener's address.
    pub mqtt_addr: SocketAddr,
    /// The plain MQTT listener's address, if enabled.
    pub mqtt_plain_addr: Option<SocketAddr>,
    /// The AMQP listener's address.
    pub amqp_addr: SocketAddr,
    /// The plain AMQP listener's address, if enabled.
    pub amqp_plain_addr: Option<SocketAddr>,
    /// The FTP package server's address, if on.
    pub ftp_addr: Option<SocketAddr>,
    /// The directory the FTP server serves.
    pub packages_dir: PathBuf,
    /// The FTP fault knobs (also at `PUT /emulator/ftp/faults`).
    pub ftp_faults: Arc<FtpFaults>,
    /// The CA certificate file clients must trust.
    pub ca_path: PathBuf,
    /// The CA certificate in PEM.
    pub ca_pem: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

impl RunningHub {
    /// Prepares certificates under `<data_dir>/certs`, binds `listen` and serves a new hub with
    /// `config` until [`RunningHub::stop`]; FTP serves `<data_dir>/packages` with default
    /// settings. Returns once every listener accepts.
    pub async fn start(
        config: HubConfig,
        listen: &ListenConfig,
        data_dir: &Path,
    ) -> Result<Self, ServerError> {
        Self::start_with_ftp(config, listen, data_dir, FtpConfig::new(data_dir.join("packages"))).await
    }

    /// Like [`RunningHub::start`] with the FTP package server's settings.
    pub async fn start_with_ftp(
        config: HubConfig,
        listen: &ListenConfig,
        data_dir: &Path,
        ftp: FtpConfig,
    ) -> Result<Self, ServerError> {
        let certs =
            HubCertificates::load_or_create(&data_dir.join("certs"), &config.hostname, &listen.tls_names)?;
        ftp::prepare(&ftp)?;
        let listeners = Listeners::bind(listen)?;
        let https_addr = listeners.https.local_addr().map_err(|e| ServerError::Task(e.to_string()))?;
        let http_addr = listeners.http.local_addr().map_err(|e| ServerError::Task(e.to_string()))?;
        let mqtt_addr = listeners.mqtt.local_addr().map_err(|e| ServerError::Task(e.to_string()))?;
        let mqtt_plain_addr = match &listeners.mqtt_plain {
            Some(l) => Some(l.local_addr().map_err(|e| ServerError::Task(e.to_string()))?),
            None => None,
        };
        let amqp_addr = listeners.amqp.local_addr().map_err(|e| ServerError::Task(e.to_string()))?;
        let amqp_plain_addr = match &listeners.amqp_plain {
            Some(l) => Some(l.local_addr().map_err(|e| ServerError::Task(e.to_string()))?),
            None => None,
        };
        let ftp_addr = listeners
            .ftp
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()
            .map_err(|e| ServerError::Task(e.to_string()))?;
        let (packages_dir, ftp_faults) = (ftp.packages_dir.clone(), ftp.faults.clone());
        let hub = match config.persist {
            None => Hub::new(config),
            // Recovery runs before anything is served: the listeners accept nothing (and
            // `/health` does not answer) until the state is back.
            Some(sync) => {
                let persist = crate::persist::PersistConfig { dir: data_dir.join("state"), sync };
                tokio::task::spawn_blocking(move || {
                    Hub::open_persistent(config, Arc::new(crate::clock::SystemClock), &persist)
                })
                .await
                .map_err(|e| ServerError::Task(e.to_string()))??
                .0
            }
        };
        hub.set_amqp_port(amqp_addr.port());
        let shutdown = CancellationToken::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = {
            let (hub, certs, shutdown) = (hub.clone(), certs.clone(), shutdown.clone());
            tokio::spawn(async move {
                serve(hub, &certs, listeners, ftp, shutdown, move || {
                    let _ = ready_tx.send(());
                })
                .await
            })
        };
        if ready_rx.await.is_err() {
            return match task.await {
                Ok(Err(e)) => Err(e),
                other => Err(ServerError::Task(format!("the server stopped before it was ready: {other:?}"))),
            };
        }
        Ok(Self {
            hub,
            https_addr,
            http_addr,
            mqtt_addr,
            mqtt_plain_addr,
            amqp_addr,
            amqp_plain_addr,
            ftp_addr,
            packages_dir,
            ftp_faults,
            ca_path: certs.ca_path.clone(),
            ca_pem: certs.ca_pem,
            shutdown,
            task,
        })
    }

    /// The Event Hub-compatible connection string with the `iothubowner` policy (the built-in
    /// endpoint, `messages/events`).
    pub fn event_hub_connection_string(&self) -> String {
        self.hub.event_hub_connection_string(crate::sas::OWNER_POLICY).unwrap_or_default()
    }

    /// The `iothubowner` connection string.
    pub fn owner_connection_string(&self) -> String {
        self.hub.policy_connection_string(crate::sas::OWNER_POLICY).unwrap_or_default()
    }

    /// A token that cancels the hub when cancelled (for signal handlers).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Resolves when the hub has stopped (after [`RunningHub::shutdown_token`] was cancelled).
    pub async fn wait(self) -> Result<(), ServerError> {
        self.task.await.map_err(|e| ServerError::Task(e.to_string()))?
    }

    /// Stops the hub and waits for it.
    pub async fn stop(self) -> Result<(), ServerError> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// Serves `hub` on `listeners` until `shutdown` is cancelled, then waits (up to a grace period)
/// for open connections to finish. `ftp` configures the FTP package server (when
/// `listeners.ftp` is bound). `on_ready` runs once every accept loop is running.
pub async fn serve(
    hub: Hub,
    certs: &HubCertificates,
    listeners: Listeners,
    ftp: FtpConfig,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(),
) -> Result<(), ServerError> {
    // The device endpoints ask for (never require) a client certificate: X.509 devices.
    let tls = TlsAcceptor::from(certs.device_server_config(&[b"h2", b"http/1.1"])?);
    let amqp_tls = TlsAcceptor::from(certs.server_config(&[])?);
    let mqtt_tls = TlsAcceptor::from(certs.device_server_config(&[])?);
    let ctx =
        HttpContext::with_shutdown(hub.clone(), certs.ca_pem.clone(), ftp.faults.clone(), shutdown.clone());
    let tracker = TaskTracker::new();
    let ftps = certs.server_config(&[])?;
    let ftp_loop = listeners.ftp.map(|l| {
        tokio::spawn(ftp::serve(l, hub.clone(), ftp, Some(ftps), shutdown.clone(), tracker.clone()))
    });
    let mut loops = vec![
        tokio::spawn(accept_loop(
            listeners.https,
            Some(tls),
            ctx.clone(),
            Port::Https,
            shutdown.clone(),
            tracker.clone(),
        )),
        tokio::spawn(accept_loop(
            listeners.http,
            None,
            ctx.clone(),
            Port::Plain,
            shutdown.clone(),
            tracker.clone(),
        )),
        tokio::spawn(crate::amqp::server::accept_loop(
            listeners.amqp,
            Some(amqp_tls),
            hub.clone(),
            shutdown.clone(),
            tracker.clone(),
        )),
        tokio::spawn(crate::mqtt::accept_loop(
            listeners.mqtt,
            Some(mqtt_tls),
            false,
            hub.clone(),
            shutdown.clone(),
            tracker.clone(),
        )),
    ];
    if let Some(plain) = listeners.mqtt_plain {
        loops.push(tokio::spawn(crate::mqtt::accept_loop(
            plain,
            None,
            listeners.mqtt_plain_driver,
            hub.clone(),
            shutdown.clone(),
            tracker.clone(),
        )));
    }
    if let Some(plain) = listeners.amqp_plain {
        loops.push(tokio::spawn(crate::amqp::server::accept_loop(
            plain,
            None,
            hub.clone(),
            shutdown.clone(),
            tracker.clone(),
        )));
    }
    loops.extend(ftp_loop);
    ctx.ready.store(true, Ordering::Release);
    on_ready();
    for l in loops {
        if let Err(e) = l.await {
            tracing::error!("an accept loop ended abnormally: {e}");
        }
    }
    ctx.ready.store(false, Ordering::Release);
    hub.shutdown_jobs();
    hub.shutdown_configurations();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait()).await.is_err() {
        tracing::warn!(open = tracker.len(), "connections still open after the shutdown grace period");
    }
    // With --persist: what is pending is written and the journal closed (off the runtime: it
    // joins the committer and snapshot threads).
    if hub.is_persistent() {
        let h = hub.clone();
        let _ = tokio::task::spawn_blocking(move || h.close_persistence()).await;
    }
    Ok(())
}

/// Shuts down when Ctrl-C or SIGTERM arrives (cancels `token`).
pub fn shutdown_on_signal(
    token: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    // Registered now, not at the first poll: a signal sent as soon as the caller says it is
    // ready (its startup lines) must find the handlers in place, not the default action.
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{SignalKind, signal};
        (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    };
    async move {
        #[cfg(unix)]
        match signals {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            (int, term) => {
                if let Some(e) = int.err().or(term.err()) {
                    tracing::warn!("cannot listen for Ctrl-C and SIGTERM: {e}; Ctrl-C only");
                }
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
        token.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ctx: Arc<HttpContext>,
    port: Port,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let name = match port {
        Port::Https => "https",
        Port::Plain => "http",
    };
    let sd = shutdown.clone();
    accept_connections(listener, name, shutdown, tracker, move |stream, peer| {
        let tls = tls.clone();
        let ctx = ctx.clone();
        let sd = sd.clone();
        async move {
            match tls {
                None => http::connection::serve(stream, ctx, port, None, sd).await,
                Some(acceptor) => {
                    if let Some(tls_stream) = tls_handshake(&acceptor, stream, peer, "HTTPS").await {
                        let cert = crate::x509::ClientChain::from_tls(tls_stream.get_ref().1);
                        http::connection::serve(tls_stream, ctx, port, cert, sd).await
                    }
                }
            }
        }
    })
    .await;
}
