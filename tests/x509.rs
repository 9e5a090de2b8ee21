//! X.509 device authentication over real TLS sockets: a rustls client presenting a device
//! certificate (or none) to the hub's MQTT-over-TLS and HTTPS listeners (port 0), the registry's
//! thumbprint rules, and the trusted-CA admin route.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::BytesMut;
use iothub_emulator::x509::issue::{self, Issued};
use iothub_emulator_tests::TestHub;
use rumqttc::mqttbytes::v4::{Connect, Packet};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

fn tls_config(hub: &TestHub, cert: Option<&Issued>) -> Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut hub.running.ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(Arc::new(match cert {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let chain: Vec<CertificateDer<'static>> =
                rustls_pemfile::certs(&mut c.cert_pem.as_bytes()).collect::<Result<_, _>>()?;
            let key: PrivateKeyDer<'static> =
                rustls_pemfile::private_key(&mut c.key_pem.as_bytes())?.context("no key")?;
            builder.with_client_auth_cert(chain, key)?
        }
    }))
}

/// Opens MQTT over TLS with `cert`, sends a CONNECT for `device_id` with `password` (empty: none)
/// and returns the CONNACK's return code byte, or `None` when the TLS handshake or the connection
/// failed before a CONNACK.
async fn connack(
    hub: &TestHub,
    addr: SocketAddr,
    cert: Option<&Issued>,
    device_id: &str,
    password: &str,
) -> Result<Option<u8>> {
    let connector = TlsConnector::from(tls_config(hub, cert)?);
    let tcp = TcpStream::connect(addr).await?;
    let Ok(mut tls) = connector.connect(ServerName::try_from("localhost")?, tcp).await else {
        return Ok(None);
    };
    let mut c = Connect::new(device_id);
    c.set_login(
        format!(
            "localhost/{device_id}/?api-version=2021-04-12&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1"
        ),
        password,
    );
    let mut out = BytesMut::new();
    Packet::Connect(c).write(&mut out, usize::MAX).map_err(|e| anyhow::anyhow!("{e}"))?;
    if tls.write_all(&out).await.is_err() {
        return Ok(None);
    }
    let mut reply = [0u8; 4];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), tls.read_exact(&mut reply)).await?;
    Ok(read.ok().map(|_| {
        assert_eq!(&reply[..3], &[0x20, 2, 0], "a CONNACK");
        reply[3]
    }))
}

async fn put_device(hub: &TestHub, id: &str, body: Value) -> Result<(u16, Value)> {
    let resp = hub
        .client
        .put(format!("{}/devices/{id}?api-version=2021-04-12", hub.https_url()))
        .header("authorization", hub.owner_token())
        .json(&body)
        .send()
        .await?;
    Ok((resp.status().as_u16(), resp.json().await?))
}

async fn trust_ca(hub: &TestHub, pem: &str) -> Result<(u16, Value)> {
    let resp = reqwest::Client::new()
        .post(format!("{}/emulator/x509-cas", hub.http_url()))
        .body(pem.to_string())
        .send()
        .await?;
    Ok((resp.status().as_u16(), resp.json().await?))
}

#[tokio::test]
async fn mqtt_over_tls_authenticates_x509_devices_and_sas_devices_still_connect() -> Result<()> {
    let hub = TestHub::start().await?;
    let addr = hub.running.mqtt_addr;
    let own = issue::self_signed_device("ss-1", 30)?;
    let stranger = issue::self_signed_device("ss-1", 30)?;
    let thumb = own.thumbprints.sha1_hex().to_ascii_lowercase();
    let (status, body) = put_device(
        &hub,
        "ss-1",
        json!({"deviceId": "ss-1", "authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": thumb}}}),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["authentication"]["x509Thumbprint"]["primaryThumbprint"],
        json!(thumb),
        "stored as given"
    );
    assert_eq!(body["authentication"]["symmetricKey"]["primaryKey"], Value::Null);

    assert_eq!(connack(&hub, addr, Some(&own), "ss-1", "").await?, Some(0), "its own certificate");
    assert_eq!(connack(&hub, addr, Some(&stranger), "ss-1", "").await?, Some(5), "another certificate");
    assert_eq!(connack(&hub, addr, None, "ss-1", "").await?, Some(5), "no certificate, no password");

    // A SAS device next to them: a token still works, with or without a client certificate.
    let key = hub.create_device("sas-1").await?;
    let token = hub.device_token("sas-1", &key);
    assert_eq!(connack(&hub, addr, None, "sas-1", &token).await?, Some(0));
    assert_eq!(connack(&hub, addr, Some(&own), "sas-1", &token).await?, Some(0));
    assert_eq!(
        connack(&hub, addr, Some(&own), "sas-1", "").await?,
        Some(5),
        "a SAS device has no thumbprint"
    );

    // CA-signed: refused until the CA is trusted, then only with CN = device id.
    let ca = issue::test_ca("Integration CA", 30)?;
    let leaf = issue::ca_signed_device("ca-1", &ca.cert_pem, &ca.key_pem, 30)?;
    let misnamed = issue::ca_signed_device("someone-else", &ca.cert_pem, &ca.key_pem, 30)?;
    let (status, body) =
        put_device(&hub, "ca-1", json!({"authentication": {"type": "certificateAuthority"}})).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(connack(&hub, addr, Some(&leaf), "ca-1", "").await?, Some(5), "CA not trusted yet");
    let (status, added) = trust_ca(&hub, &ca.cert_pem).await?;
    assert_eq!(status, 201, "{added}");
    assert_eq!(added[0]["thumbprint"], json!(ca.thumbprints.sha1_hex()));
    assert_eq!(connack(&hub, addr, Some(&leaf), "ca-1", "").await?, Some(0));
    assert_eq!(connack(&hub, addr, Some(&misnamed), "ca-1", "").await?, Some(5), "CN is not the device id");

    // The model id from the last CONNECT's username is the twin's modelId.
    let twin: Value = hub
        .client
        .get(format!("{}/twins/ca-1?api-version=2021-04-12", hub.https_url()))
        .header("authorization", hub.owner_token())
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(twin["modelId"], json!("dtmi:com:example:Thermostat;1"));
    hub.stop().await
}

#[tokio::test]
async fn an_expired_certificate_fails_the_tls_handshake() -> Result<()> {
    let hub = TestHub::start().await?;
    // A self-signed leaf whose validity period ended yesterday: rcgen takes any dates.
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::new())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "old-1");
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(10);
    params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let cert = params.self_signed(&key)?;
    let expired = Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        thumbprints: iothub_emulator::x509::Thumbprints::of(cert.der()),
    };
    put_device(
        &hub,
        "old-1",
        json!({"authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": expired.thumbprints.sha256_hex()}}}),
    )
    .await?;
    assert_eq!(connack(&hub, hub.running.mqtt_addr, Some(&expired), "old-1", "").await?, None);
    hub.stop().await
}

#[tokio::test]
async fn https_device_requests_authenticate_with_the_client_certificate() -> Result<()> {
    let hub = TestHub::start().await?;
    let own = issue::self_signed_device("http-1", 30)?;
    let stranger = issue::self_signed_device("http-1", 30)?;
    put_device(
        &hub,
        "http-1",
        json!({"authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": own.thumbprints.sha256_hex()}}}),
    )
    .await?;
    let client = |cert: &Issued| -> Result<reqwest::Client> {
        Ok(reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(hub.running.ca_pem.as_bytes())?)
            .identity(reqwest::Identity::from_pem(format!("{}{}", cert.cert_pem, cert.key_pem).as_bytes())?)
            .build()?)
    };
    let url = format!("{}/devices/http-1/messages/events?api-version=2021-04-12", hub.https_url());
    let resp = client(&own)?.post(&url).body("from an X.509 device").send().await?;
    assert_eq!(resp.status(), 204);
    let seen = hub.running.hub.read_telemetry(Some("http-1"), 0, 10);
    assert_eq!(seen.len(), 1);

    let resp = client(&stranger)?.post(&url).body("forged").send().await?;
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["iothub-errorcode"], "IotHubUnauthorizedAccess");
    let body: Value = resp.json().await?;
    assert!(body["Message"].as_str().is_some_and(|m| m.contains("matches neither thumbprint")), "{body}");

    let receive = format!("{}/devices/http-1/messages/deviceBound?api-version=2021-04-12", hub.https_url());
    assert_eq!(client(&own)?.get(&receive).send().await?.status(), 204, "nothing queued");
    hub.stop().await
}

#[tokio::test]
async fn the_registry_checks_thumbprints_and_the_ca_route_takes_only_cas() -> Result<()> {
    let hub = TestHub::start().await?;
    let bad = [
        (json!({"authentication": {"type": "selfSigned"}}), "needs"),
        (
            json!({"authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "abc"}}}),
            "not valid",
        ),
        (
            json!({"authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "ab".repeat(20), "secondaryThumbprint": "ab".repeat(32)}}}),
            "both",
        ),
    ];
    for (body, says) in bad {
        let (status, resp) = put_device(&hub, "bad-thumb", body).await?;
        assert_eq!(status, 400, "{resp}");
        assert!(resp["Message"].as_str().is_some_and(|m| m.contains(says)), "{resp}");
    }
    // A thumbprint without a type is a selfSigned device (what Node's registry client sends).
    let colons = "AB:".repeat(19) + "AB";
    let (status, resp) = put_device(
        &hub,
        "inferred",
        json!({"authentication": {"x509Thumbprint": {"primaryThumbprint": colons}}}),
    )
    .await?;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["authentication"]["type"], "selfSigned");
    assert_eq!(resp["authentication"]["x509Thumbprint"]["primaryThumbprint"], json!(colons));

    let device_cert = issue::self_signed_device("x", 30)?;
    let (status, resp) = trust_ca(&hub, &device_cert.cert_pem).await?;
    assert_eq!(status, 400, "{resp}");
    let listed: Value = reqwest::get(format!("{}/emulator/x509-cas", hub.http_url())).await?.json().await?;
    assert_eq!(listed, json!([]));
    hub.stop().await
}
