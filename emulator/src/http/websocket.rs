//! WebSocket upgrades on the HTTPS port: `GET /$iothub/websocket` (and the Event Hubs clients'
//! `/$servicebus/websocket/`) with `Upgrade: websocket` is handed to the protocol named by the
//! client's `Sec-WebSocket-Protocol` (reference §4.1, wire notes §0).
//!
//! The hook is generic: [`SUBPROTOCOLS`] maps a subprotocol to the byte-stream server that speaks it:
//! `mqtt` for devices, `AMQPWSB10` for the service endpoint (the service SDKs' AMQP-over-WebSockets
//! transports, such as Node's `AmqpWs`, dial the same path). The upgraded socket's binary
//! WebSocket messages are pumped through an in-memory duplex pipe, so protocol servers see a plain
//! `AsyncRead + AsyncWrite` stream exactly as on their TCP listeners. Messages and frames larger
//! than [`MAX_MESSAGE_BYTES`] close the connection.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{CONNECTION, UPGRADE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;

use crate::error::{ErrorCode, HubError};
use crate::hub::Hub;
use crate::shutdown::Shutdown;

use super::{HttpContext, HttpResponse};

/// IoT Hub's WebSocket path for device protocols.
pub const WEBSOCKET_PATH: &str = "/$iothub/websocket";

/// Buffer of the in-memory pipe between the WebSocket and the protocol server.
const PIPE_BYTES: usize = 16 * 1024;

/// Largest WebSocket message (and frame) a client may send; a larger one closes its connection
/// (tungstenite's defaults, 64 MiB and 16 MiB, would let every connection buffer that much).
/// The official SDKs may put one whole MQTT packet or AMQP frame in one message, so it must hold
/// the largest of those with room to spare. An emulator choice: IoT Hub publishes no limit.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
const _: () = assert!(crate::limits::MQTT_MAX_PACKET_BYTES <= MAX_MESSAGE_BYTES);
const _: () = assert!(crate::amqp::MAX_FRAME_BYTES as usize <= MAX_MESSAGE_BYTES);

/// The bounds every upgraded connection reads with.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES))
}

type ProtocolFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
/// A subprotocol's server: the hub, the pipe, the peer, the TLS client's certificate chain (X.509
/// devices over MQTT-over-WebSocket on 443), and the shutdown token.
type ProtocolServer = fn(Hub, DuplexStream, SocketAddr, ClientCert, CancellationToken) -> ProtocolFuture;
type ClientCert = Option<Arc<crate::x509::ClientChain>>;

/// Subprotocols served over WebSocket, and the server for each.
pub const SUBPROTOCOLS: &[(&str, ProtocolServer)] = &[
    ("mqtt", |hub, io, peer, cert, shutdown| Box::pin(serve_mqtt(hub, io, peer, cert, shutdown))),
    ("AMQPWSB10", |hub, io, _peer, _cert, shutdown| Box::pin(serve_amqp(hub, io, shutdown))),
];

/// MQTT on an upgraded connection, as on the 8883 listener. The connection waits on a
/// [`Shutdown`] of its own, fired here when `shutdown` is cancelled (then the connection ends as
/// at any hub shutdown); a listener-wide one would need a task per WebSocket connection that
/// outlives it.
async fn serve_mqtt(
    hub: Hub,
    io: DuplexStream,
    peer: SocketAddr,
    cert: ClientCert,
    shutdown: CancellationToken,
) {
    let signal = Shutdown::new();
    let serve = crate::mqtt::connection::serve(
        hub,
        io,
        peer,
        cert,
        crate::metrics::Transport::MqttWs,
        signal.clone(),
    );
    tokio::pin!(serve);
    tokio::select! {
        () = &mut serve => return,
        () = shutdown.cancelled() => signal.fire(),
    }
    serve.await
}

/// The AMQP service endpoint on an upgraded connection, as on the 5671 listener.
async fn serve_amqp(hub: Hub, io: DuplexStream, shutdown: CancellationToken) {
    if let Err(e) = crate::amqp::server::serve_connection(io, hub, shutdown).await {
        tracing::debug!("AMQP over WebSocket ended: {e}");
    }
}

/// The WebSocket path of the Event Hubs and Service Bus AMQP clients (`azure-eventhub`,
/// `@azure/event-hubs`, uamqp's `AmqpOverWebsocket`), with or without its trailing `/`: the same
/// AMQP endpoint, including the Event Hub-compatible nodes, as on `AMQPWSB10` over
/// [`WEBSOCKET_PATH`].
pub const SERVICEBUS_WEBSOCKET_PATH: &str = "/$servicebus/websocket/";

/// Whether `req` asks for a WebSocket upgrade on [`WEBSOCKET_PATH`] or
/// [`SERVICEBUS_WEBSOCKET_PATH`].
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    let path = req.uri().path();
    (path.eq_ignore_ascii_case(WEBSOCKET_PATH)
        || path.trim_end_matches('/').eq_ignore_ascii_case(SERVICEBUS_WEBSOCKET_PATH.trim_end_matches('/')))
        && req
            .headers()
            .get(UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Answers `101 Switching Protocols` and serves the upgraded connection in the background, or
/// explains in IoT Hub's error shape why it cannot.
pub fn upgrade<B>(ctx: &Arc<HttpContext>, mut req: Request<B>) -> Result<HttpResponse, HubError> {
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| derive_accept_key(k.as_bytes()))
        .ok_or_else(|| HubError::invalid("a WebSocket upgrade needs a Sec-WebSocket-Key header"))?;
    let offered = req.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).unwrap_or("");
    let Some((name, server)) = offered
        .split(',')
        .map(str::trim)
        .find_map(|o| SUBPROTOCOLS.iter().find(|(name, _)| name.eq_ignore_ascii_case(o)).copied())
    else {
        let known: Vec<&str> = SUBPROTOCOLS.iter().map(|(n, _)| *n).collect();
        return Err(HubError::new(
            ErrorCode::ArgumentInvalid,
            format!(
                "Sec-WebSocket-Protocol '{offered}' names no supported subprotocol (use one of {known:?})"
            ),
        ));
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let cert = req.extensions_mut().remove::<Arc<crate::x509::ClientChain>>();
    let (hub, shutdown) = (ctx.hub.clone(), ctx.shutdown.clone());
    let write_deadline = hub.config().timeouts.write;
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => return tracing::debug!("WebSocket upgrade failed: {e}"),
        };
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(ws_config())).await;
        let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
        let peer = SocketAddr::from(([0, 0, 0, 0], 0));
        tokio::join!(server(hub, theirs, peer, cert, shutdown), pump(ws, ours, write_deadline));
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = resp.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert("sec-websocket-protocol", HeaderValue::from_static(name));
    if let Ok(v) = HeaderValue::from_str(&key) {
        headers.insert("sec-websocket-accept", v);
    }
    Ok(resp)
}

/// Moves bytes between the WebSocket (binary messages) and the protocol server's pipe until either
/// side closes, or the peer does not take a message within `write_deadline` (it stopped reading;
/// without the deadline the pump, and the socket, would wait for it forever).
async fn pump<S>(ws: WebSocketStream<S>, pipe: DuplexStream, write_deadline: std::time::Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let (mut rd, mut wr) = tokio::io::split(pipe);
    let inbound = async {
        while let Some(msg) = stream.next().await {
            match msg {
                Ok(Message::Binary(b)) => {
                    if wr.write_all(&b).await.is_err() {
                        break;
                    }
                }
                Ok(Message::Close(_)) => break,
                Err(e) => {
                    tracing::debug!("WebSocket connection closed: {e}");
                    break;
                }
                Ok(_) => {}
            }
        }
        let _ = wr.shutdown().await;
    };
    let outbound = async {
        let mut buf = vec![0u8; PIPE_BYTES];
        while let Ok(n @ 1..) = rd.read(&mut buf).await {
            let send = sink.send(Message::Binary(Bytes::copy_from_slice(&buf[..n])));
            match tokio::time::timeout(write_deadline, send).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break,
                Err(_) => {
                    tracing::debug!("WebSocket peer took no data for {write_deadline:?}; closing");
                    return;
                }
            }
        }
        let _ = tokio::time::timeout(write_deadline, sink.close()).await;
    };
    tokio::select! {
        _ = inbound => {}
        _ = outbound => {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    #[tokio::test]
    async fn a_peer_that_stops_reading_ends_the_pump_at_the_write_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server_side, _) = listener.accept().await.unwrap();
        let ws = WebSocketStream::from_raw_socket(server_side, Role::Server, Some(ws_config())).await;
        let (ours, mut theirs) = tokio::io::duplex(PIPE_BYTES);
        // The protocol server writes without end; the client never reads a byte.
        let feeder = tokio::spawn(async move {
            let chunk = vec![0u8; 64 * 1024];
            while theirs.write_all(&chunk).await.is_ok() {}
        });
        let pumped =
            tokio::time::timeout(Duration::from_secs(20), pump(ws, ours, Duration::from_millis(300))).await;
        assert!(pumped.is_ok(), "the pump still waits for a peer that stopped reading");
        tokio::time::timeout(Duration::from_secs(5), feeder).await.unwrap().unwrap();
    }
}
