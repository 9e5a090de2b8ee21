//! The Device Provisioning Service over real sockets (port 0): the enrollment service API and the
//! device API over HTTPS, and the `$dps/registrations/...` exchange over MQTT on TLS followed by
//! the provisioned device's own CONNECT to the hub with the derived key.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use iothub_emulator::dps::{SERVICE_POLICY, derive_device_key};
use iothub_emulator::sas::make_token;
use iothub_emulator_tests::{TestHub, now_secs};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish, Subscribe};
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const GROUP_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn service_token(hub: &TestHub) -> String {
    let dps = hub.running.hub.dps();
    make_token(&hub.hostname(), dps.service_key(), Some(SERVICE_POLICY), now_secs() + 3600).unwrap()
}

fn registration_token(hub: &TestHub, reg: &str, key: &str) -> String {
    let scope = hub.running.hub.dps().id_scope().to_string();
    make_token(&format!("{scope}/registrations/{reg}"), key, Some("registration"), now_secs() + 3600).unwrap()
}

async fn send(req: reqwest::RequestBuilder) -> Result<(u16, Value)> {
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text)? }))
}

async fn put_group(hub: &TestHub, id: &str, status: &str) -> Result<(u16, Value)> {
    let body = json!({
        "enrollmentGroupId": id,
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": GROUP_KEY}},
        "provisioningStatus": status,
        "initialTwin": {"tags": {"floor": 3}},
    });
    let url = format!("{}/enrollmentGroups/{id}?api-version=2021-10-01", hub.https_url());
    send(hub.client.put(url).header("authorization", service_token(hub)).json(&body)).await
}

#[tokio::test]
async fn enrollment_service_api_and_https_registration() -> Result<()> {
    let hub = TestHub::start().await?;
    let scope = hub.running.hub.dps().id_scope().to_string();
    // The service API wants the provisioningserviceowner token.
    let url = format!("{}/enrollmentGroups/g1?api-version=2021-10-01", hub.https_url());
    let (status, body) = send(hub.client.get(&url).header("authorization", hub.owner_token())).await?;
    assert_eq!((status, body["errorCode"].as_u64()), (401, Some(401002)), "{body}");
    let (status, body) = put_group(&hub, "g1", "enabled").await?;
    assert_eq!(status, 200, "{body}");
    let (status, body) = send(hub.client.get(&url).header("authorization", service_token(&hub))).await?;
    assert_eq!((status, body["enrollmentGroupId"].as_str()), (200, Some("g1")), "{body}");
    let query = format!("{}/enrollmentGroups/query?api-version=2021-10-01", hub.https_url());
    let (status, body) = send(
        hub.client.post(&query).header("authorization", service_token(&hub)).json(&json!({"query": "*"})),
    )
    .await?;
    assert_eq!((status, body.as_array().map(Vec::len)), (200, Some(1)), "{body}");

    // A device registers over HTTPS with its derived key, and polls its operation.
    let key = derive_device_key(GROUP_KEY, "h-1")?;
    let register = format!("{}/{scope}/registrations/h-1/register?api-version=2021-06-01", hub.https_url());
    let (status, body) = send(
        hub.client
            .put(&register)
            .header("authorization", registration_token(&hub, "h-1", &key))
            .json(&json!({"registrationId": "h-1"})),
    )
    .await?;
    assert_eq!((status, body["status"].as_str()), (200, Some("assigned")), "{body}");
    assert_eq!(body["registrationState"]["assignedHub"], hub.hostname());
    let op = body["operationId"].as_str().context("operationId")?;
    let poll =
        format!("{}/{scope}/registrations/h-1/operations/{op}?api-version=2021-06-01", hub.https_url());
    let (status, polled) =
        send(hub.client.get(&poll).header("authorization", registration_token(&hub, "h-1", &key))).await?;
    assert_eq!((status, &polled["registrationState"]["deviceId"]), (200, &json!("h-1")), "{polled}");
    let (_, twin) = send(
        hub.client
            .get(format!("{}/twins/h-1?api-version=2021-04-12", hub.https_url()))
            .header("authorization", hub.owner_token()),
    )
    .await?;
    assert_eq!(twin["tags"]["floor"], 3, "{twin}");

    // The group key itself, another scope, and a disabled group are refused in DPS terms.
    let (status, body) = send(
        hub.client
            .put(&register)
            .header("authorization", registration_token(&hub, "h-1", GROUP_KEY))
            .body("{}"),
    )
    .await?;
    assert_eq!((status, body["errorCode"].as_u64()), (401, Some(401002)), "{body}");
    let other = format!("{}/0neFFFFFFFF/registrations/h-1/register", hub.https_url());
    let (status, _) = send(
        hub.client.put(&other).header("authorization", registration_token(&hub, "h-1", &key)).body("{}"),
    )
    .await?;
    assert_eq!(status, 401);
    put_group(&hub, "g1", "disabled").await?;
    let (status, body) = send(
        hub.client.put(&register).header("authorization", registration_token(&hub, "h-1", &key)).body(""),
    )
    .await?;
    assert_eq!(status, 401, "{body}");
    assert!(body["message"].as_str().unwrap_or_default().contains("disabled"), "{body}");
    hub.stop().await
}

async fn read_packet<S: AsyncRead + Unpin>(s: &mut S, buf: &mut BytesMut) -> Result<Packet> {
    loop {
        match Packet::read(buf, 1 << 20) {
            Ok(p) => return Ok(p),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => bail!("{e}"),
        }
        if tokio::time::timeout(Duration::from_secs(10), s.read_buf(buf)).await?? == 0 {
            bail!("the hub closed the connection");
        }
    }
}

#[tokio::test]
async fn mqtt_registration_then_the_device_connects_to_the_hub() -> Result<()> {
    let hub = TestHub::start().await?;
    let (status, _) = put_group(&hub, "g1", "enabled").await?;
    assert_eq!(status, 200);
    let scope = hub.running.hub.dps().id_scope().to_string();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut hub.running.ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(config));
    let open = || async {
        let tcp = TcpStream::connect(hub.running.mqtt_addr).await?;
        anyhow::Ok(connector.connect(ServerName::try_from("localhost")?, tcp).await?)
    };
    let key = derive_device_key(GROUP_KEY, "m-1")?;
    let mut tls = open().await?;
    let mut buf = BytesMut::new();
    let mut c = Connect::new("m-1");
    c.set_login(
        format!("{scope}/registrations/m-1/api-version=2019-03-31"),
        registration_token(&hub, "m-1", &key),
    );
    let mut out = BytesMut::new();
    Packet::Connect(c).write(&mut out, usize::MAX).map_err(|e| anyhow::anyhow!("{e}"))?;
    Packet::Subscribe(Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce))
        .write(&mut out, usize::MAX)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut p = Publish::new(
        "$dps/registrations/PUT/iotdps-register/?$rid=42",
        QoS::AtLeastOnce,
        br#"{"registrationId":"m-1","payload":null}"#.to_vec(),
    );
    p.pkid = 2;
    Packet::Publish(p).write(&mut out, usize::MAX).map_err(|e| anyhow::anyhow!("{e}"))?;
    tls.write_all(&out).await?;
    assert!(
        matches!(read_packet(&mut tls, &mut buf).await?, Packet::ConnAck(a) if a.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success)
    );
    assert!(matches!(read_packet(&mut tls, &mut buf).await?, Packet::SubAck(_)));
    assert!(matches!(read_packet(&mut tls, &mut buf).await?, Packet::PubAck(a) if a.pkid == 2));
    let Packet::Publish(resp) = read_packet(&mut tls, &mut buf).await? else { bail!("no response") };
    assert_eq!(resp.topic, "$dps/registrations/res/200/?$rid=42");
    let body: Value = serde_json::from_slice(&resp.payload)?;
    assert_eq!(body["registrationState"]["deviceId"], "m-1", "{body}");

    // The provisioned device connects to the hub with the same derived key.
    let mut hub_conn = open().await?;
    let mut c = Connect::new("m-1");
    c.set_login("localhost/m-1/?api-version=2021-04-12", hub.device_token("m-1", &key));
    let mut out = BytesMut::new();
    Packet::Connect(c).write(&mut out, usize::MAX).map_err(|e| anyhow::anyhow!("{e}"))?;
    hub_conn.write_all(&out).await?;
    let mut buf = BytesMut::new();
    assert!(
        matches!(read_packet(&mut hub_conn, &mut buf).await?, Packet::ConnAck(a) if a.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success)
    );

    // A registration signed with the group key gets CONNACK 5.
    let mut bad = open().await?;
    let mut c = Connect::new("m-2");
    c.set_login(
        format!("{scope}/registrations/m-2/api-version=2019-03-31"),
        registration_token(&hub, "m-2", GROUP_KEY),
    );
    let mut out = BytesMut::new();
    Packet::Connect(c).write(&mut out, usize::MAX).map_err(|e| anyhow::anyhow!("{e}"))?;
    bad.write_all(&out).await?;
    let mut buf = BytesMut::new();
    assert!(
        matches!(read_packet(&mut bad, &mut buf).await?, Packet::ConnAck(a) if a.code == rumqttc::mqttbytes::v4::ConnectReturnCode::NotAuthorized)
    );
    hub.stop().await
}
