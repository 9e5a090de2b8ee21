//! Serves one HTTP connection (HTTP/1.1 or HTTP/2, TLS or plain) with deadlines on every wait the
//! peer controls ([`crate::limits::Timeouts`]):
//!
//! - **Header read** (`http_header_read`, slowloris): a request's head must be complete within
//!   this of the connection's accept (first request) or of the request's first byte (later
//!   requests on a kept-alive connection). Enforced by hyper's HTTP/1 `header_read_timeout` with a
//!   timer ([`HeadTimer`]) that starts the clock of a later request only when its first byte
//!   arrives: hyper arms its timer as soon as it waits for the next request, which would close
//!   every idle keep-alive connection after the header-read time instead of the idle time.
//! - **Idle** (`http_idle`): a connection with no request in flight for this long is shut down
//!   gracefully (HTTP/1: closed; HTTP/2: GOAWAY), then dropped if it does not finish within
//!   [`CLOSE_GRACE`]. A request in flight (a direct method waiting up to 300 s for the device, a
//!   telemetry long poll) keeps the connection open however long it takes.
//! - **HTTP/2**: keep-alive pings find dead peers; concurrent streams and the header list are
//!   bounded.
//!
//! A connection upgraded to WebSocket leaves this module when hyper hands over the socket; the
//! protocol it carries (MQTT, AMQP) keeps its own deadlines.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Sleep, Timer};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::{HttpContext, Port};

/// HTTP/2: how often the hub pings a connection to find a dead peer. An emulator choice.
pub const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// HTTP/2: how long the hub waits for a ping's acknowledgement before closing. An emulator choice.
pub const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// HTTP/2: streams a client may have open at once (hyper's default is 200). An emulator choice:
/// the SDKs send one request at a time per connection.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// HTTP/2: largest header list (decoded) a request may carry: 16 KiB, like HTTP/1's practical
/// limits; a SAS token is a few hundred bytes.
pub const H2_MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// How long a connection shut down for idleness (or hub shutdown) may take to finish before it
/// is dropped: a peer that stopped reading must not hold it open.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Serves `stream` until the peer closes it, a deadline passes, it is upgraded to WebSocket, or
/// `shutdown` is cancelled.
pub async fn serve<S>(stream: S, ctx: Arc<HttpContext>, port: Port, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeouts = ctx.hub.config().timeouts;
    let bytes_read = Arc::new(AtomicU64::new(0));
    let activity = Arc::new(Activity::new());
    let service = {
        let activity = activity.clone();
        service_fn(move |req| {
            let busy = activity.begin();
            let ctx = ctx.clone();
            async move {
                let resp = super::handle(ctx, port, req).await;
                drop(busy);
                resp
            }
        })
    };
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(HeadTimer::new(timeouts.http_header_read, bytes_read.clone()))
        .header_read_timeout(timeouts.http_header_read)
        // Application property names keep their case (see `header_case`).
        .preserve_header_case(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST_BYTES);
    let io = CountingIo { inner: stream, bytes_read };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let why = tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("HTTP connection ended with an error: {e}");
            }
            return;
        }
        () = activity.idle_for(timeouts.http_header_read, timeouts.http_idle) => "idle",
        () = shutdown.cancelled() => "shutdown",
    };
    tracing::debug!("closing an HTTP connection ({why})");
    conn.as_mut().graceful_shutdown();
    if tokio::time::timeout(CLOSE_GRACE, conn).await.is_err() {
        tracing::debug!("an HTTP connection did not finish within {CLOSE_GRACE:?} of its shutdown; dropped");
    }
}

/// Requests in flight on one connection, and when the last one finished.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    /// Whether any request has begun (its head was read).
    begun: AtomicBool,
    /// The accept, then the end of the latest request.
    last_done: Mutex<Instant>,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            begun: AtomicBool::new(false),
            last_done: Mutex::new(Instant::now()),
        }
    }

    /// Marks a request in flight until the guard drops.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.begun.store(true, Ordering::Release);
        InFlight(self.clone())
    }

    fn last_done(&self) -> Instant {
        *self.last_done.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves once no request has been in flight for `idle`, or when no request has begun
    /// within `first` of the accept. The latter also bounds what hyper's header timer cannot: the
    /// wait for the bytes that tell HTTP/1 from HTTP/2.
    async fn idle_for(&self, first: Duration, idle: Duration) {
        loop {
            if self.in_flight.load(Ordering::Acquire) > 0 {
                tokio::time::sleep(idle).await;
                continue;
            }
            let wait = if self.begun.load(Ordering::Acquire) { idle } else { first };
            let deadline = self.last_done() + wait;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// A request in flight; dropping it records when it finished.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last_done.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connection's stream, counting the bytes read from it (for [`HeadTimer`]).
struct CountingIo<S> {
    inner: S,
    bytes_read: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for CountingIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.bytes_read.fetch_add(n as u64, Ordering::AcqRel);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountingIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// hyper's HTTP/1 timer for one connection. hyper uses it only for the header-read timeout,
/// arming it whenever it starts waiting for a request head. The first request's clock runs from
/// the accept; a later request's clock starts at its first byte, so the wait between requests is
/// governed by the idle deadline instead.
struct HeadTimer {
    header_read: Duration,
    bytes_read: Arc<AtomicU64>,
    first_armed: AtomicBool,
}

impl HeadTimer {
    fn new(header_read: Duration, bytes_read: Arc<AtomicU64>) -> Self {
        Self { header_read, bytes_read, first_armed: AtomicBool::new(false) }
    }
}

impl Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        let started = if self.first_armed.swap(true, Ordering::AcqRel) { None } else { Some(deadline) };
        Box::pin(HeadSleep {
            header_read: self.header_read,
            bytes_read: self.bytes_read.clone(),
            bytes_at_arm: self.bytes_read.load(Ordering::Acquire),
            sleep: started.map(|d| Box::pin(tokio::time::sleep_until(d.into()))),
        })
    }
}

/// The header-read deadline of one request: pending until the request's first byte arrives (or,
/// for the first request, from the start), then a plain sleep.
struct HeadSleep {
    header_read: Duration,
    bytes_read: Arc<AtomicU64>,
    bytes_at_arm: u64,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // hyper polls this each time a read leaves the head incomplete, so the first byte of the
        // request is seen on the poll right after it arrives.
        if self.sleep.is_none() && self.bytes_read.load(Ordering::Acquire) != self.bytes_at_arm {
            let deadline = tokio::time::Instant::now() + self.header_read;
            self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline)));
        }
        match self.sleep.as_mut() {
            Some(s) => s.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

impl Sleep for HeadSleep {}
