//! The MQTT device endpoint: IoT Hub's MQTT 3.1.1 contract for devices (reference §4), on TLS
//! (`--mqtt-port`, 8883) and optionally on plain TCP for load tests (`--mqtt-plain-port`).
//!
//! Layers: [`topics`] (the topic contract and property bags, pure functions), [`session`] (the
//! sans-IO session state machine: packets and hub events in, packets out), and the code that
//! touches sockets: [`connection`] (one task per connection: framing with the `rumqttc` v4 codec,
//! the keep-alive and token deadline, and the hub's link events) and [`driver`] (the plain
//! listener's connections without a task each, a few drivers over epoll). State about the device stays in the [`crate::hub::Hub`];
//! a connection holds only its session, one timer (or a driver's heap entry) and, while bytes are
//! in flight, its buffers; no timer or task exists for a device that is not connected.

pub mod connection;
pub mod driver;
pub mod session;
pub mod topics;
pub mod wire;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::Hub;
use crate::listener::{accept_connections, accept_streams, tls_handshake};
use crate::metrics::Transport;
use crate::shutdown::Shutdown;

/// Accepts MQTT connections on `listener` (TLS when `tls` is set) until `shutdown`; plain ones
/// are served by [`driver`]s with `drivers` (when [`driver::serves`] the hub).
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    drivers: bool,
    hub: Hub,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let name = if tls.is_some() { "mqtts" } else { "mqtt" };
    // What the connections wait on: fired when `shutdown` is cancelled, cheap to poll.
    let sd = Shutdown::on_cancel(&shutdown);
    if drivers && tls.is_none() && driver::serves(&hub) {
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        match driver::Drivers::start(&hub, workers * driver::DRIVERS_PER_WORKER, &sd, &tracker) {
            Ok(mut drivers) => {
                let open = hub.clone();
                let count = move || open.metrics().connections(Transport::Mqtt);
                accept_streams(listener, name, shutdown, count, |s, peer| drivers.dispatch(s, peer)).await;
                return;
            }
            Err(e) => tracing::warn!(
                "MQTT: cannot start the connection drivers, one task per connection instead: {e}"
            ),
        }
    }
    // Each connection's task holds only a box sized for its own protocol: an idle plain connection
    // does not carry the TLS variant's state, nor a TLS connection its finished handshake's.
    accept_connections(listener, name, shutdown, tracker, move |stream, peer| -> ConnectionFuture {
        let (hub, sd) = (hub.clone(), sd.clone());
        match tls.clone() {
            None => Box::pin(connection::serve(hub, stream, peer, None, Transport::Mqtt, sd)),
            Some(acceptor) => Box::pin(serve_tls(acceptor, hub, stream, peer, sd)),
        }
    })
    .await;
}

type ConnectionFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

async fn serve_tls(acceptor: TlsAcceptor, hub: Hub, stream: TcpStream, peer: SocketAddr, sd: Shutdown) {
    if let Some(s) = tls_handshake(&acceptor, stream, peer, "MQTT").await {
        let cert = crate::x509::ClientChain::from_tls(s.get_ref().1);
        Box::pin(connection::serve(hub, s, peer, cert, Transport::Mqtt, sd)).await
    }
}
