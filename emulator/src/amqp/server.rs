//! The AMQP socket driver: accepts TLS connections on the AMQP listener (and plain TCP ones on the
//! optional load-test listener, `--amqp-plain-port`) and runs one [`Connection`] per socket,
//! moving bytes between them.
//!
//! A connection task waits on its socket, the hub's and the event log's notifiers (while a link
//! could send once they fire, e.g. a feedback or partition link with credit, so nothing polls) and
//! its timers (a node's next wake-up such as the next feedback batch cut, a heartbeat inside the
//! peer's idle-time-out, and the deadline by which the peer must open or speak again). Nothing is
//! spawned per device or per link.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::frame::HEARTBEAT;
use super::{Connection, Wakes};
use crate::hub::Hub;
use crate::listener::{accept_connections, tls_handshake};

/// Read buffer per connection.
const READ_BUFFER_BYTES: usize = 16 * 1024;
/// Output buffers larger than this (a burst of feedback or replies) are not kept for reuse.
const OUTPUT_KEEP_BYTES: usize = 64 * 1024;

/// Accepts AMQP connections on `listener` until `shutdown`: over TLS with `tls`, plain TCP
/// without (the load-test listener; IoT Hub has none).
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    hub: Hub,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let sd = shutdown.clone();
    let name = if tls.is_some() { "amqps" } else { "amqp" };
    accept_connections(listener, name, shutdown, tracker, move |stream, peer| {
        let (tls, hub, sd) = (tls.clone(), hub.clone(), sd.clone());
        async move {
            let result = match tls {
                Some(tls) => match tls_handshake(&tls, stream, peer, "AMQP").await {
                    Some(stream) => serve_connection(stream, hub, sd).await,
                    None => Ok(()),
                },
                None => serve_connection(stream, hub, sd).await,
            };
            if let Err(e) = result {
                tracing::debug!(%peer, "AMQP connection ended: {e}");
            }
        }
    })
    .await;
}

/// Runs one AMQP connection over `stream` until either side closes it or `shutdown`.
///
/// Deadlines (the hub's `timeouts`): the protocol header, SASL and `open` must be done within
/// `amqp_open` of the start; once open, a peer silent for twice the idle-time-out we announce
/// (`amqp_idle`) is closed with `amqp:resource-limit-exceeded`; a write the peer does not take
/// within `write` ends the connection (it stopped reading). Unsettled feedback returns to the hub
/// whichever way the connection ends.
pub async fn serve_connection<S>(mut stream: S, hub: Hub, shutdown: CancellationToken) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let timeouts = hub.config().timeouts;
    let mut conn = Connection::new(hub.clone());
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    // The bytes being written; swapped with the connection's output (see `swap_output`).
    let mut out = Vec::new();
    let open_deadline = Instant::now() + timeouts.amqp_open;
    let silence_limit = Duration::from_millis(u64::from(conn.idle_timeout_ms()) * 2);
    let mut last_write = Instant::now();
    let mut last_read = Instant::now();
    // With --persist: the ticket of what a read journaled, taken before the yield below (tickets
    // are per thread, and the task may resume on another worker, or another task take it).
    let mut read_ticket = None;
    // The notifiers the last turn's links waited on. Only those are registered with: a sender's
    // connection (no link waits on the hub) then costs the hub's notifier nothing per turn, and
    // each C2D send notifies no one. A turn whose links start waiting on another runs again.
    let mut watch = Wakes { hub: true, events: true, at: None };
    loop {
        // Watched and enabled before checking the hub, so a record queued in between still wakes
        // us (a connection whose links do not wait on the hub does not watch: see `hub::changes`).
        let _watching = watch.hub.then(|| hub.notifier().watch());
        let notified = hub.notifier().notified();
        tokio::pin!(notified);
        if watch.hub {
            notified.as_mut().enable();
        }
        let events = hub.events_notifier().notified();
        tokio::pin!(events);
        if watch.events {
            events.as_mut().enable();
        }
        conn.pump();
        // With --persist: the dispositions answering what this turn changed (C2D sends, feedback
        // settlements) go out once its records are written.
        let ticket = hub.take_durability_ticket().max(read_ticket.take());
        if ticket.is_some()
            && let Err(e) = hub.durable(ticket).await
        {
            return Err(std::io::Error::other(e.message));
        }
        // Tier throttling: shaped C2D sends are settled at their turn, and nothing more is read
        // before it (backpressure on the sender). Bounded by the throttle's backlog; a hub time
        // jump ends it early.
        if let Some(at) = conn.take_hold() {
            tokio::select! {
                _ = hub.sleep_until(at) => last_read = Instant::now(),
                _ = shutdown.cancelled() => conn.shut_down(),
            }
        }
        conn.swap_output(&mut out);
        if !out.is_empty() {
            write_within(&mut stream, &out, timeouts.write).await?;
            last_write = Instant::now();
            if out.capacity() > OUTPUT_KEEP_BYTES {
                out = Vec::new();
            }
        }
        if conn.is_closed() {
            break;
        }
        let wakes = conn.wakes();
        if (wakes.hub && !watch.hub) || (wakes.events && !watch.events) {
            // A link started waiting on a notifier not registered with before this turn's check.
            watch = wakes;
            continue;
        }
        watch = Wakes { at: None, ..wakes };
        let wake_at =
            wakes.at.map(|due| Instant::now() + Duration::from_millis(due.saturating_sub(hub.now())));
        let heartbeat_at =
            conn.peer_idle_timeout_ms().map(|ms| last_write + Duration::from_millis(u64::from(ms) / 2));
        let give_up_at = if conn.is_open() { last_read + silence_limit } else { open_deadline };
        tokio::select! {
            r = stream.read(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => {
                    last_read = Instant::now();
                    conn.receive(&buf[..n]);
                    if conn.take_sent_c2d() {
                        read_ticket = hub.take_durability_ticket();
                        // The device connections these sends woke go first: they write their
                        // PUBLISHes before this connection settles the sends and reads more, so a
                        // sender's window of unsettled sends also bounds the messages waiting
                        // for delivery (as a broker that acknowledges after forwarding does), and
                        // send-to-device latency stays flat under fan-out load.
                        tokio::task::yield_now().await;
                    }
                }
                Err(e) => return Err(e),
            },
            _ = &mut notified, if wakes.hub => {}
            _ = &mut events, if wakes.events => {}
            _ = tokio::time::sleep_until(wake_at.unwrap_or_else(Instant::now)), if wake_at.is_some() => {}
            _ = tokio::time::sleep_until(heartbeat_at.unwrap_or_else(Instant::now)), if heartbeat_at.is_some() => {
                write_within(&mut stream, &HEARTBEAT, timeouts.write).await?;
                last_write = Instant::now();
            }
            _ = tokio::time::sleep_until(give_up_at) => {
                if conn.is_open() {
                    conn.time_out(
                        "amqp:resource-limit-exceeded",
                        format!("no frame for {} ms, twice the idle-time-out this side announced", silence_limit.as_millis()),
                    );
                } else {
                    conn.time_out(
                        "amqp:resource-limit-exceeded",
                        format!("the connection was not opened within {} ms", timeouts.amqp_open.as_millis()),
                    );
                }
            }
            _ = shutdown.cancelled() => {
                conn.shut_down();
                let out = conn.take_output();
                write_within(&mut stream, &out, timeouts.write).await?;
                break;
            }
        }
    }
    // Bounded too: a peer that stopped reading must not hold the task in the TLS close.
    let _ = tokio::time::timeout(timeouts.write, stream.shutdown()).await;
    Ok(())
}

/// Writes `bytes`, or fails with `TimedOut` when the peer does not take them within `limit`.
async fn write_within<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
    limit: Duration,
) -> std::io::Result<()> {
    match tokio::time::timeout(limit, stream.write_all(bytes)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the peer took no bytes for {} ms (it stopped reading)", limit.as_millis()),
        )),
    }
}
