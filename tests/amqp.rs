//! The AMQP listener end to end with a minimal hand-rolled client over TLS: the listener is bound
//! and served by `RunningHub`, speaks AMQP 1.0 after a bare header, and closes open connections with
//! `amqp:connection:forced` when the hub shuts down. The SDK scripts in `sdk.rs` cover the rest.

use std::sync::Arc;

use iothub_emulator::amqp::frame::{self, AMQP_HEADER, FRAME_AMQP, code, list};
use iothub_emulator::amqp::types::Value;
use iothub_emulator_tests::TestHub;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

async fn connect(hub: &TestHub) -> TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::CertificateDer::from_pem_slice(hub.running.ca_pem.as_bytes()).unwrap();
    roots.add(ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(hub.running.amqp_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap()
}

/// Reads until one whole frame is buffered; returns its performative code and fields.
async fn read_frame(
    stream: &mut TlsStream<tokio::net::TcpStream>,
    buf: &mut Vec<u8>,
) -> (u64, frame::Fields) {
    loop {
        if let Some(f) = frame::parse_frame(buf, u32::MAX).unwrap() {
            if let Some(body) = f.body {
                return frame::described_list(&body).unwrap();
            }
            continue;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the hub closed the socket before a whole frame arrived");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn amqp_listener_speaks_amqp_over_tls_and_closes_on_shutdown() {
    let hub = TestHub::start().await.unwrap();
    let mut stream = connect(&hub).await;
    stream.write_all(&AMQP_HEADER).await.unwrap();
    let mut header = [0u8; 8];
    stream.read_exact(&mut header).await.unwrap();
    assert_eq!(header, AMQP_HEADER);
    let mut out = Vec::new();
    frame::write_frame(&mut out, FRAME_AMQP, 0, &list(code::OPEN, vec![Value::str("rust-test")]), &[]);
    stream.write_all(&out).await.unwrap();
    let mut buf = Vec::new();
    let (c, fields) = read_frame(&mut stream, &mut buf).await;
    assert_eq!(c, code::OPEN);
    assert_eq!(fields.str(1), Some("localhost"));

    let running = hub.running;
    let stopped = tokio::spawn(running.stop());
    let (c, fields) = read_frame(&mut stream, &mut buf).await;
    assert_eq!(c, code::CLOSE);
    let (_, error) = frame::described_list(fields.get(0)).unwrap();
    assert_eq!(error.str(0), Some("amqp:connection:forced"));
    stopped.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&hub.data_dir);
}
