//! The server's listeners: health and CA on the plain port, TLS 1.2 and 1.3 on the HTTPS port,
//! and the same REST API without TLS on the plain port.

use std::sync::Arc;

use iothub_emulator_tests::TestHub;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn health_ca_and_plain_api() {
    let hub = TestHub::start().await.unwrap();
    let health = reqwest::get(format!("{}/health", hub.http_url())).await.unwrap();
    assert_eq!(health.status(), 200);
    let ca = reqwest::get(format!("{}/ca.pem", hub.http_url())).await.unwrap().text().await.unwrap();
    assert_eq!(ca, hub.running.ca_pem);
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
    let on_tls = hub.client.get(format!("{}/health", hub.https_url())).send().await.unwrap();
    assert_eq!(on_tls.status(), 404, "emulator endpoints live on the plain port only");
    let plain = reqwest::Client::new()
        .get(format!("{}/devices", hub.http_url()))
        .header("authorization", hub.owner_token())
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 200);
    let unauth = reqwest::get(format!("{}/devices", hub.http_url())).await.unwrap();
    assert_eq!(unauth.status(), 401);
    hub.stop().await.unwrap();
}

async fn handshake(
    hub: &TestHub,
    version: &'static rustls::SupportedProtocolVersion,
) -> rustls::ProtocolVersion {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut hub.running.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(hub.running.https_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let negotiated = tls.get_ref().1.protocol_version().unwrap();
    tls.write_all(b"GET /devices HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    tls.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    negotiated
}

#[tokio::test]
async fn tls_12_and_13_are_offered() {
    let hub = TestHub::start().await.unwrap();
    assert_eq!(handshake(&hub, &rustls::version::TLS12).await, rustls::ProtocolVersion::TLSv1_2);
    assert_eq!(handshake(&hub, &rustls::version::TLS13).await, rustls::ProtocolVersion::TLSv1_3);
    hub.stop().await.unwrap();
}
