//! The socket under one agent's MQTT session: a TCP stream, or TLS over it (`tokio-rustls`), with
//! small buffers and a deadline on every wait. It owns the stream and nothing else: packets are
//! framed by [`super::mqtt_device`] and the session's decisions are the driver's ([`super::run`]).
//!
//! Memory is what a fleet of sockets costs, so an idle plain connection holds no buffer at all:
//! [`Stream::read_into`] waits for readiness before it asks the caller's buffer for room, and the
//! driver gives the buffer back once it is empty. TLS keeps rustls' own buffers.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::mqtt_device::{FrameError, encode, take_packet};

/// Room asked of the read buffer when it is full (a PUBACK, SUBACK or small PUBLISH fits).
pub const READ_CHUNK_BYTES: usize = 256;
/// Most the read buffer is grown ahead of the bytes received for a partial packet.
pub const RESERVE_AHEAD_BYTES: usize = 16 * 1024;

/// Why the link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A socket or TLS error.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The hub closed the connection.
    #[error("the hub closed the connection")]
    Closed,
    /// A wait ran past its deadline.
    #[error("{0} timed out after {1:?}")]
    Timeout(&'static str, Duration),
    /// Bytes that are not MQTT, or a packet above the size cap.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The first packet was not a CONNACK.
    #[error("expected a CONNACK, got {0}")]
    NotConnAck(&'static str),
    /// The hub refused the CONNECT.
    #[error("the hub refused the CONNECT: {0:?}")]
    Refused(ConnectReturnCode),
    /// The host name is not a valid TLS server name.
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
}

/// A connected stream, plain or TLS.
#[derive(Debug)]
pub enum Stream {
    /// The emulator's plain listener.
    Plain(TcpStream),
    /// MQTT over TLS (8883); boxed, rustls' state is large.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// Waits for bytes and appends them to `buf`, growing it by [`READ_CHUNK_BYTES`] only when
    /// it is full and bytes are ready. `Ok(0)`: the peer closed. Cancel-safe.
    pub async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => loop {
                s.readable().await?;
                if buf.capacity() == buf.len() {
                    buf.reserve(READ_CHUNK_BYTES);
                }
                match s.try_read_buf(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Readiness was stale: wait again without holding a buffer.
                        if buf.is_empty() {
                            *buf = BytesMut::new();
                        }
                        continue;
                    }
                    r => return r,
                }
            },
            Stream::Tls(s) => {
                if buf.capacity() == buf.len() {
                    buf.reserve(READ_CHUNK_BYTES);
                }
                s.read_buf(buf).await
            }
        }
    }

    /// Writes all of `bytes` and flushes, giving up after `limit`.
    pub async fn write_all(&mut self, bytes: &[u8], limit: Duration) -> Result<(), LinkError> {
        let write = async {
            match self {
                Stream::Plain(s) => s.write_all(bytes).await,
                Stream::Tls(s) => {
                    s.write_all(bytes).await?;
                    s.flush().await
                }
            }
        };
        tokio::time::timeout(limit, write).await.map_err(|_| LinkError::Timeout("a write", limit))??;
        Ok(())
    }
}

/// A session the hub accepted.
#[derive(Debug)]
pub struct Connected {
    /// The stream.
    pub stream: Stream,
    /// The hub's CONNACK (accepted).
    pub connack: ConnAck,
    /// Bytes that arrived after the CONNACK (the hub may deliver at once).
    pub rest: BytesMut,
}

/// Connects to `host:port` (TLS with `tls`), sends `connect` and waits for an accepted CONNACK,
/// all within `limit`. Incoming packets above `max_incoming` are refused.
pub async fn connect(
    host: &str,
    port: u16,
    tls: Option<&Arc<rustls::ClientConfig>>,
    connect: &Connect,
    max_incoming: usize,
    limit: Duration,
) -> Result<Connected, LinkError> {
    let work = async {
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let mut stream = match tls {
            None => Stream::Plain(tcp),
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|_| LinkError::ServerName(host.to_string()))?;
                let tls = TlsConnector::from(config.clone()).connect(name, tcp).await?;
                Stream::Tls(Box::new(tls))
            }
        };
        let mut out = BytesMut::new();
        encode(&Packet::Connect(connect.clone()), &mut out, usize::MAX)?;
        stream.write_all(&out, limit).await?;
        let mut buf = BytesMut::new();
        loop {
            if let Some(p) = take_packet(&mut buf, max_incoming, RESERVE_AHEAD_BYTES)? {
                return match p {
                    Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {
                        Ok(Connected { stream, connack: ack, rest: buf })
                    }
                    Packet::ConnAck(ack) => Err(LinkError::Refused(ack.code)),
                    other => Err(LinkError::NotConnAck(packet_name(&other))),
                };
            }
            if stream.read_into(&mut buf).await? == 0 {
                return Err(LinkError::Closed);
            }
        }
    };
    tokio::time::timeout(limit, work).await.map_err(|_| LinkError::Timeout("the CONNECT", limit))?
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

#[cfg(test)]
mod tests {
    use rumqttc::mqttbytes::QoS;
    use rumqttc::mqttbytes::v4::Publish;
    use tokio::net::TcpListener;

    use super::*;
    use crate::agent::mqtt_device::connect_packet;

    /// A hub that answers the CONNECT with `reply` (nothing when empty) and keeps the socket open.
    async fn hub(reply: Vec<Packet>) -> (u16, tokio::task::JoinHandle<Connect>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = BytesMut::new();
            let connect = loop {
                if let Some(Packet::Connect(c)) = take_packet(&mut buf, 4096, 4096).unwrap() {
                    break c;
                }
                assert_ne!(s.read_buf(&mut buf).await.unwrap(), 0);
            };
            let mut out = BytesMut::new();
            for p in &reply {
                encode(p, &mut out, usize::MAX).unwrap();
            }
            s.write_all(&out).await.unwrap();
            // Hold the socket until the client is done with it.
            let _ = s.read_buf(&mut buf).await;
            connect
        });
        (port, task)
    }

    fn connect() -> Connect {
        connect_packet("d1", "hub.local", "sas".into(), Duration::from_secs(30))
    }

    #[tokio::test]
    async fn an_accepted_connack_comes_with_the_bytes_after_it() {
        let mut c2d = Publish::new("devices/d1/messages/devicebound/", QoS::AtLeastOnce, b"{}".to_vec());
        c2d.pkid = 1;
        let reply = vec![
            Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, true)),
            Packet::Publish(c2d.clone()),
        ];
        let (port, hub) = hub(reply).await;
        let mut c =
            super::connect("127.0.0.1", port, None, &connect(), 4096, Duration::from_secs(10)).await.unwrap();
        assert!(c.connack.session_present);
        assert_eq!(take_packet(&mut c.rest, 4096, 256).unwrap(), Some(Packet::Publish(c2d)));
        drop(c);
        let seen = hub.await.unwrap();
        assert_eq!((seen.client_id.as_str(), seen.clean_session), ("d1", false));
    }

    #[tokio::test]
    async fn a_refused_or_missing_connack_fails_within_the_deadline() {
        let refused = vec![Packet::ConnAck(ConnAck::new(ConnectReturnCode::NotAuthorized, false))];
        let (port, _hub) = hub(refused).await;
        let r = super::connect("127.0.0.1", port, None, &connect(), 4096, Duration::from_secs(10)).await;
        assert!(matches!(r, Err(LinkError::Refused(ConnectReturnCode::NotAuthorized))), "{r:?}");

        let (port, _hub) = hub(Vec::new()).await;
        let started = tokio::time::Instant::now();
        let limit = Duration::from_millis(200);
        let r = super::connect("127.0.0.1", port, None, &connect(), 4096, limit).await;
        assert!(matches!(r, Err(LinkError::Timeout(..))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(5));

        let (port, _hub) = hub(vec![Packet::PingResp]).await;
        let r = super::connect("127.0.0.1", port, None, &connect(), 4096, Duration::from_secs(10)).await;
        assert!(matches!(r, Err(LinkError::NotConnAck("PINGRESP"))), "{r:?}");
    }

    #[tokio::test]
    async fn an_idle_plain_socket_holds_no_read_buffer_until_bytes_arrive() {
        let (port, _hub) = hub(vec![Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))]).await;
        let mut c =
            super::connect("127.0.0.1", port, None, &connect(), 4096, Duration::from_secs(10)).await.unwrap();
        let mut buf = BytesMut::new();
        let idle = tokio::time::timeout(Duration::from_millis(50), c.stream.read_into(&mut buf)).await;
        assert!(idle.is_err(), "nothing to read");
        assert_eq!(buf.capacity(), 0, "no buffer taken while waiting");
    }
}
