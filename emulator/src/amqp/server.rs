//! The AMQP socket driver: accepts TLS connections on the AMQP listener and runs one
//! [`Connection`] per socket, moving bytes between them.
//!
//! A connection task waits on three things only: its socket, the hub's notifier (while a feedback
//! link has credit, so feedback flows without polling) and, when needed, one timer (the next
//! feedback batch cut, or a heartbeat inside the peer's idle-time-out). Nothing is spawned per
//! device or per link.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Connection;
use super::frame::HEARTBEAT;
use crate::hub::Hub;
use crate::server::accept_connections;

/// A TLS handshake that takes longer than this is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Read buffer per connection.
const READ_BUFFER_BYTES: usize = 16 * 1024;

/// Accepts AMQP-over-TLS connections on `listener` until `shutdown`.
pub async fn accept_loop(
    listener: TcpListener,
    tls: TlsAcceptor,
    hub: Hub,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let sd = shutdown.clone();
    accept_connections(listener, "amqp", shutdown, tracker, move |stream, peer| {
        let (tls, hub, sd) = (tls.clone(), hub.clone(), sd.clone());
        async move {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok(stream)) => {
                    if let Err(e) = serve_connection(stream, hub, sd).await {
                        tracing::debug!(%peer, "AMQP connection ended: {e}");
                    }
                }
                Ok(Err(e)) => tracing::debug!(%peer, "AMQP TLS handshake failed: {e}"),
                Err(_) => tracing::debug!(%peer, "AMQP TLS handshake timed out"),
            }
        }
    })
    .await;
}

/// Runs one AMQP connection over `stream` until either side closes it or `shutdown`.
pub async fn serve_connection<S>(mut stream: S, hub: Hub, shutdown: CancellationToken) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Connection::new(hub.clone());
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    let mut last_write = Instant::now();
    loop {
        // Enabled before checking the hub, so a record queued in between still wakes us.
        let notified = hub.notifier().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        conn.pump();
        let out = conn.take_output();
        if !out.is_empty() {
            stream.write_all(&out).await?;
            last_write = Instant::now();
        }
        if conn.is_closed() {
            break;
        }
        let wants_feedback = conn.wants_feedback();
        let feedback_at = wants_feedback
            .then(|| hub.feedback_next_due())
            .flatten()
            .map(|due| Instant::now() + Duration::from_millis(due.saturating_sub(hub.now())));
        let heartbeat_at =
            conn.peer_idle_timeout_ms().map(|ms| last_write + Duration::from_millis(u64::from(ms) / 2));
        tokio::select! {
            r = stream.read(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => conn.receive(&buf[..n]),
                Err(e) => return Err(e),
            },
            _ = &mut notified, if wants_feedback => {}
            _ = tokio::time::sleep_until(feedback_at.unwrap_or_else(Instant::now)), if feedback_at.is_some() => {}
            _ = tokio::time::sleep_until(heartbeat_at.unwrap_or_else(Instant::now)), if heartbeat_at.is_some() => {
                stream.write_all(&HEARTBEAT).await?;
                last_write = Instant::now();
            }
            _ = shutdown.cancelled() => {
                conn.shut_down();
                let out = conn.take_output();
                stream.write_all(&out).await?;
                break;
            }
        }
    }
    stream.shutdown().await
}
