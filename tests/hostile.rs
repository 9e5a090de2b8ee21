//! A hostile client: the raw bytes of every input issue 11 found to crash the hub, lose an
//! acknowledged message or hold a resource, sent over real sockets (TLS, plain TCP, WebSocket), and
//! the checks that the hub survived them. Used by the regression tests in `tests/abuse.rs` and by the
//! memory check in `tests/hostile_rss.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use iothub_emulator::amqp::frame::{self, AMQP_HEADER, SASL_HEADER};
use rumqttc::mqttbytes::v4::{Connect, Packet};
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::TestHub;

/// How long a hostile exchange may take before the test calls the hub stuck.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Finding 1: a frame of `n` zero bytes after the header, which nests described values forever.
pub fn zero_run_frame(kind: u8, n: usize) -> Vec<u8> {
    let mut f = ((8 + n) as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&[2, kind, 0, 0]);
    f.resize(8 + n, 0);
    f
}

/// Finding 2: an array32 claiming 2^32-1 `null` elements in 18 bytes.
pub const ARRAY_BOMB: [u8; 18] = [
    0x00, 0x00, 0x00, 0x12, 0x02, 0x00, 0x00, 0x00, 0xf0, 0x00, 0x00, 0x00, 0x05, 0xff, 0xff, 0xff, 0xff,
    0x40,
];

/// A TLS client stream to `addr` trusting the hub's CA.
pub async fn tls(hub: &TestHub, addr: SocketAddr) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(hub.running.ca_pem.as_bytes())?)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    Ok(TlsConnector::from(Arc::new(config)).connect(name, tcp).await?)
}

/// Writes `bytes` and reads until the hub closes the connection; returns what it sent back.
/// Fails if the hub neither answers nor closes within [`DEADLINE`].
pub async fn send_until_closed<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
) -> Result<Vec<u8>> {
    // The hub may close before it read everything; a write error then is part of the outcome.
    let _ = stream.write_all(bytes).await;
    read_until_closed(stream).await
}

/// Reads until EOF (or a reset), within [`DEADLINE`].
pub async fn read_until_closed<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>> {
    let mut got = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(DEADLINE, read).await.context("the hub kept the connection open")?;
    Ok(got)
}

/// The AMQP error condition of the first `close` frame in `bytes` (after an optional header).
pub fn close_condition(bytes: &[u8]) -> Option<String> {
    let mut buf = bytes.to_vec();
    while buf.starts_with(b"AMQP") {
        buf.drain(..8);
    }
    while let Ok(Some(f)) = frame::parse_frame(&mut buf, u32::MAX) {
        let Some(body) = f.body else { continue };
        let Ok((code, fields)) = frame::described_list(&body) else { continue };
        if code == frame::code::CLOSE {
            let (_, error) = frame::described_list(fields.get(0)).ok()?;
            return error.str(0).map(str::to_owned);
        }
    }
    None
}

/// The crash inputs of findings 1 and 2, each after the bare AMQP header and after the SASL header
/// (SASL frames have type 1), as byte strings ready to send.
pub fn amqp_crash_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let mut inputs = Vec::new();
    for (name, header, kind) in [("bare", AMQP_HEADER, 0u8), ("sasl", SASL_HEADER, 1)] {
        let mut zeros = header.to_vec();
        zeros.extend(zero_run_frame(kind, 20_000));
        inputs
            .push((if kind == 0 { "zero run after the AMQP header" } else { "zero run after SASL" }, zeros));
        let mut bomb = header.to_vec();
        let mut b = ARRAY_BOMB;
        b[5] = kind;
        bomb.extend_from_slice(&b);
        inputs.push((
            if name == "bare" { "array bomb after the AMQP header" } else { "array bomb after SASL" },
            bomb,
        ));
    }
    inputs
}

/// Sends `input` over TLS to the AMQP port and waits for the hub to close the connection.
pub async fn amqp_tls_attack(hub: &TestHub, input: &[u8]) -> Result<Vec<u8>> {
    let mut s = tls(hub, hub.running.amqp_addr).await?;
    send_until_closed(&mut s, input).await
}

/// Sends `input` as binary WebSocket messages (`AMQPWSB10`) on `/$iothub/websocket` — over TLS to
/// the HTTPS port when `https`, else to the plain port — and waits for the hub to close.
pub async fn amqp_ws_attack(hub: &TestHub, https: bool, input: &[u8]) -> Result<()> {
    let (scheme, addr) = if https { ("wss", hub.running.https_addr) } else { ("ws", hub.running.http_addr) };
    let mut req = format!("{scheme}://localhost:{}/$iothub/websocket", addr.port()).into_client_request()?;
    req.headers_mut().insert("sec-websocket-protocol", "AMQPWSB10".parse()?);
    let attack = async {
        let ws = if https {
            let s = tls(hub, addr).await?;
            let (ws, _) = tokio_tungstenite::client_async(req, s).await?;
            futures_util::future::Either::Left(ws)
        } else {
            let (ws, _) = tokio_tungstenite::client_async(req, TcpStream::connect(addr).await?).await?;
            futures_util::future::Either::Right(ws)
        };
        match ws {
            futures_util::future::Either::Left(ws) => ws_exchange(ws, input).await,
            futures_util::future::Either::Right(ws) => ws_exchange(ws, input).await,
        }
    };
    tokio::time::timeout(DEADLINE, attack).await.context("the hub kept the WebSocket open")?
}

async fn ws_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut ws: tokio_tungstenite::WebSocketStream<S>,
    input: &[u8],
) -> Result<()> {
    // The header in its own message (as the SDKs send it), then the rest.
    ws.send(WsMessage::binary(input[..8].to_vec())).await?;
    let _ = ws.send(WsMessage::binary(input[8..].to_vec())).await;
    while let Some(m) = ws.next().await {
        if m.is_err() {
            break;
        }
    }
    Ok(())
}

/// The hub still answers `/health` with 200 on its plain port.
pub async fn assert_healthy(hub: &TestHub) -> Result<()> {
    let resp = tokio::time::timeout(DEADLINE, reqwest::get(format!("{}/health", hub.http_url())))
        .await
        .context("/health did not answer")??;
    if resp.status() != 200 {
        bail!("/health answered {}", resp.status());
    }
    Ok(())
}

/// An AMQP connection still opens: bare header, `open`, and the hub's `open` back.
pub async fn assert_amqp_opens(hub: &TestHub) -> Result<()> {
    let mut s = tls(hub, hub.running.amqp_addr).await?;
    s.write_all(&AMQP_HEADER).await?;
    let mut open = Vec::new();
    let body = frame::list(frame::code::OPEN, vec![iothub_emulator::amqp::types::Value::str("probe")]);
    frame::write_frame(&mut open, frame::FRAME_AMQP, 0, &body, &[]);
    s.write_all(&open).await?;
    let mut buf = Vec::new();
    let got = tokio::time::timeout(DEADLINE, async {
        loop {
            let mut chunk = [0u8; 1024];
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                bail!("closed before open");
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > 8 {
                let mut frames = buf[8..].to_vec();
                if let Some(f) = frame::parse_frame(&mut frames, u32::MAX)? {
                    return Ok(f);
                }
            }
        }
    })
    .await??;
    let (code, _) = frame::described_list(got.body.as_ref().context("empty frame")?)?;
    if code != frame::code::OPEN {
        bail!("expected open, got 0x{code:x}");
    }
    Ok(())
}

/// The bytes of a device's MQTT CONNECT (SAS token as password, keep-alive `keep_alive_secs`).
pub fn mqtt_connect_bytes(hub: &TestHub, device: &str, key: &str, keep_alive_secs: u16) -> Vec<u8> {
    let mut c = Connect::new(device);
    c.keep_alive = keep_alive_secs;
    c.clean_session = true;
    c.set_login(
        format!("{}/{device}/?api-version=2021-04-12", hub.hostname()),
        hub.device_token(device, key),
    );
    packet_bytes(Packet::Connect(c))
}

/// One packet's bytes.
pub fn packet_bytes(p: Packet) -> Vec<u8> {
    let mut buf = BytesMut::new();
    p.write(&mut buf, usize::MAX).expect("encodable packet");
    buf.to_vec()
}

/// A plain-TCP MQTT connection for `device`, CONNECT sent and CONNACK 0 read.
pub async fn mqtt_connected(
    hub: &TestHub,
    device: &str,
    key: &str,
    keep_alive_secs: u16,
) -> Result<TcpStream> {
    let addr = hub.running.mqtt_plain_addr.context("the test hub has a plain MQTT port")?;
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&mqtt_connect_bytes(hub, device, key, keep_alive_secs)).await?;
    let mut connack = [0u8; 4];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut connack)).await??;
    if connack != [0x20, 0x02, 0x00, 0x00] {
        bail!("expected CONNACK 0, got {connack:02x?}");
    }
    Ok(s)
}
