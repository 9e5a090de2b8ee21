//! The pieces every front end's listener shares, and nothing else: binding a listening socket with
//! a large backlog, the accept loop that survives file-descriptor exhaustion, and the TLS
//! handshake with its deadline. A leaf module: the protocol front ends (`http`, `mqtt`, `amqp`,
//! `ftp`) import it, and [`crate::server`] assembles them; none of them imports `server`.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A TLS handshake that takes longer than this is dropped (slow clients must not pin sockets).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pending connections the kernel queues per listener (capped by `net.core.somaxconn`). The std
/// default of 128 drops SYNs when a fleet connects at once, and clients then wait seconds for
/// the retransmission.
const LISTEN_BACKLOG: u32 = 4096;
/// Pause after an accept failure caused by file-descriptor exhaustion.
const EMFILE_BACKOFF: Duration = Duration::from_millis(100);

/// A listener that could not be bound, with the flag that moves it.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind the {what} listener to {addr}: {source}{}; choose another port with {flag} (0 picks a free one)",
    if addr.port() < 1024 && addr.port() != 0 { " (ports below 1024 need root or CAP_NET_BIND_SERVICE)" } else { "" })]
pub struct BindError {
    /// Which listener.
    pub what: &'static str,
    /// The address tried.
    pub addr: SocketAddr,
    /// The flag that moves it.
    pub flag: &'static str,
    /// The cause.
    pub source: io::Error,
}

/// Binds one listener, with an error that says which flag moves it.
pub fn bind_one(
    ip: IpAddr,
    port: u16,
    what: &'static str,
    flag: &'static str,
) -> Result<TcpListener, BindError> {
    let addr = SocketAddr::new(ip, port);
    let bind = || -> io::Result<TcpListener> {
        let socket =
            if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        #[cfg(unix)]
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bind().map_err(|source| BindError { what, addr, flag, source })
}

/// True for accept errors that mean "out of file descriptors" (EMFILE, ENFILE): wait and retry,
/// never exit.
pub fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(24 | 23))
}

/// The process's open-file limit (soft), for the log line that says the cap was reached.
fn nofile_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Accepts connections on `listener` until `shutdown`, logging accept errors and backing off on
/// file-descriptor exhaustion (logged once per episode, with the limit and how to raise it), so
/// connections already open are not disturbed. Shared by every protocol's listener.
pub async fn accept_connections<F, Fut>(
    listener: TcpListener,
    name: &'static str,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    mut on_conn: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let open = tracker.clone();
    accept_streams(
        listener,
        name,
        shutdown,
        move || open.len(),
        move |stream, peer| {
            tracker.spawn(on_conn(stream, peer));
        },
    )
    .await;
}

/// [`accept_connections`] for connections served without a task each: `on_conn` takes each
/// accepted stream (with `TCP_NODELAY` set), and `open` counts the connections open, for the log
/// line when file descriptors run out.
pub async fn accept_streams(
    listener: TcpListener,
    name: &'static str,
    shutdown: CancellationToken,
    open: impl Fn() -> usize,
    mut on_conn: impl FnMut(TcpStream, SocketAddr),
) {
    let mut exhausted = false;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                if exhausted {
                    tracing::info!(listener = name, "file descriptors available again; accepting");
                    exhausted = false;
                }
                let _ = stream.set_nodelay(true);
                on_conn(stream, peer);
            }
            Err(e) if is_fd_exhaustion(&e) => {
                if !exhausted {
                    let limit = nofile_limit().map_or_else(|| "unknown".to_owned(), |n| n.to_string());
                    tracing::warn!(
                        listener = name,
                        open_connections = open(),
                        nofile_limit = %limit,
                        "out of file descriptors; new connections wait in the backlog until some close \
                         (raise `ulimit -n`, or split the fleet across hubs): {e}"
                    );
                    exhausted = true;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(EMFILE_BACKOFF) => {}
                }
            }
            Err(e) => tracing::debug!(listener = name, "accept failed: {e}"),
        }
    }
}

/// Runs the TLS handshake on `stream` within [`TLS_HANDSHAKE_TIMEOUT`]; `None` (logged at debug,
/// naming `what`) when it fails or takes too long.
pub async fn tls_handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    what: &'static str,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(%peer, "{what} TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "{what} TLS handshake timed out");
            None
        }
    }
}
