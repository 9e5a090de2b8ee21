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

/// One AMQP client connection of the tests below: writes performatives, reads frames back.
struct Client {
    stream: TlsStream<tokio::net::TcpStream>,
    buf: Vec<u8>,
}

impl Client {
    /// Bare header, open, begin on channel 0.
    async fn open(hub: &TestHub) -> Self {
        let mut stream = connect(hub).await;
        stream.write_all(&AMQP_HEADER).await.unwrap();
        let mut header = [0u8; 8];
        stream.read_exact(&mut header).await.unwrap();
        let mut c = Self { stream, buf: Vec::new() };
        c.send(list(code::OPEN, vec![Value::str("rust-test"), Value::str("localhost")]), &[]).await;
        assert_eq!(c.read().await.0, code::OPEN);
        let begin =
            list(code::BEGIN, vec![Value::Null, Value::Uint(0), Value::Uint(5000), Value::Uint(5000)]);
        c.send(begin, &[]).await;
        assert_eq!(c.read().await.0, code::BEGIN);
        c
    }

    async fn send(&mut self, body: Value, payload: &[u8]) {
        let mut out = Vec::new();
        frame::write_frame(&mut out, FRAME_AMQP, 0, &body, payload);
        self.stream.write_all(&out).await.unwrap();
    }

    /// The next frame, or panics after 10 s.
    async fn read(&mut self) -> (u64, frame::Fields, Vec<u8>) {
        let deadline = std::time::Duration::from_secs(10);
        tokio::time::timeout(deadline, async {
            loop {
                if let Some(f) = frame::parse_frame(&mut self.buf, u32::MAX).unwrap() {
                    if let Some(body) = f.body {
                        let (c, fields) = frame::described_list(&body).unwrap();
                        return (c, fields, f.payload);
                    }
                    continue;
                }
                let mut chunk = [0u8; 8192];
                let n = self.stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the hub closed the socket");
                self.buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("a frame within 10 s")
    }

    /// The next frame with performative `code`, skipping others (flows, dispositions).
    async fn read_until(&mut self, wanted: u64) -> (frame::Fields, Vec<u8>) {
        loop {
            let (c, fields, payload) = self.read().await;
            if c == wanted {
                return (fields, payload);
            }
        }
    }

    async fn attach(&mut self, handle: u32, peer_receives: bool, source: Value, target: Value) {
        let fields = vec![
            Value::str(&format!("link-{handle}")),
            Value::Uint(handle),
            Value::Bool(peer_receives),
            Value::Ubyte(0),
            Value::Ubyte(0),
            source,
            target,
            Value::Null,
            Value::Null,
            if peer_receives { Value::Null } else { Value::Uint(0) },
        ];
        self.send(list(code::ATTACH, fields), &[]).await;
    }

    async fn flow(&mut self, handle: u32, credit: u32) {
        let fields = [0, 5000, 0, 5000, handle, 0, credit].into_iter().map(Value::Uint).collect();
        self.send(list(code::FLOW, fields), &[]).await;
    }
}

/// An Event Hubs CBS token: `sr` the entity URI, signed with the key's text as the Event Hubs SDKs do.
fn event_hub_token(hub: &TestHub, audience: &str) -> String {
    let key =
        hub.running.hub.policies().iter().find(|p| p.name == "iothubowner").unwrap().primary_key.clone();
    let se = iothub_emulator_tests::now_secs() + 3600;
    let sr = iothub_emulator::sas::url_encode(audience);
    let sig = iothub_emulator::sas::sign(key.as_bytes(), &sr, se);
    format!(
        "SharedAccessSignature sr={sr}&sig={}&se={se}&skn=iothubowner",
        iothub_emulator::sas::url_encode(&sig)
    )
}

/// The Event Hub-compatible endpoint over a real socket: CBS with an entity token, a partition
/// receiver at `@latest` that is woken by the event log when a device's HTTP telemetry lands, and
/// the event as IoT Hub writes it.
#[tokio::test]
async fn a_partition_receiver_over_tls_is_woken_by_new_telemetry() {
    use iothub_emulator::amqp::message::{Body, Message, Properties};
    let hub = TestHub::start().await.unwrap();
    let device = iothub_emulator_tests::unique("eh");
    let key = hub.create_device(&device).await.unwrap();
    let entity = hub.running.hub.event_hub_name().to_string();
    let partition = iothub_emulator::hub::events::partition_for(&device, hub.running.hub.partition_count());

    let mut c = Client::open(&hub).await;
    c.attach(
        0,
        false,
        list(code::SOURCE, vec![Value::str("client")]),
        list(code::TARGET, vec![Value::str("$cbs")]),
    )
    .await;
    c.attach(
        1,
        true,
        list(code::SOURCE, vec![Value::str("$cbs")]),
        list(code::TARGET, vec![Value::str("client")]),
    )
    .await;
    c.flow(1, 10).await;
    let audience = format!("sb://localhost/{entity}");
    let put = Message {
        properties: Properties { message_id: Some(Value::Ulong(1)), ..Default::default() },
        application_properties: vec![
            ("operation".into(), Value::str("put-token")),
            ("type".into(), Value::str("servicebus.windows.net:sastoken")),
            ("name".into(), Value::str(&audience)),
        ],
        body: Body::Value(Value::str(&event_hub_token(&hub, &audience))),
        ..Default::default()
    };
    let transfer = list(
        code::TRANSFER,
        vec![Value::Uint(0), Value::Uint(0), Value::Binary(vec![0]), Value::Uint(0), Value::Bool(true)],
    );
    c.send(transfer, &put.encode()).await;
    let (_, payload) = c.read_until(code::TRANSFER).await;
    let reply = Message::decode(&payload).unwrap();
    assert_eq!(reply.application_properties[0], ("status-code".into(), Value::Int(202)));

    let filter = Value::Map(vec![(
        Value::sym("apache.org:selector-filter:string"),
        Value::Described(Box::new((
            Value::sym("apache.org:selector-filter:string"),
            Value::str("amqp.annotation.x-opt-offset > '@latest'"),
        ))),
    )]);
    let address = format!("{entity}/ConsumerGroups/$Default/Partitions/{partition}");
    let mut source = vec![Value::str(&address)];
    source.resize(7, Value::Null);
    source.push(filter);
    c.attach(2, true, list(code::SOURCE, source), list(code::TARGET, vec![Value::str("client")])).await;
    let (attach, _) = c.read_until(code::ATTACH).await;
    assert_eq!(attach.u32(1), Some(2));
    assert!(frame::terminus_address(attach.get(5)).is_some(), "attached, not refused");
    c.flow(2, 5).await;

    let resp = hub
        .client
        .post(format!("{}/devices/{device}/messages/events?api-version=2021-04-12", hub.https_url()))
        .header("authorization", hub.device_token(&device, &key))
        .header("iothub-messageid", "eh-1")
        .header("iothub-app-temp", "21")
        .body("{\"t\":21}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let (fields, payload) = c.read_until(code::TRANSFER).await;
    assert_eq!(fields.u32(0), Some(2));
    let event = Message::decode(&payload).unwrap();
    assert_eq!(event.body, Body::Data(b"{\"t\":21}".to_vec()));
    assert_eq!(event.properties.message_id, Some(Value::str("eh-1")));
    assert_eq!(event.application_properties, vec![("temp".into(), Value::str("21"))]);
    let annotation = |k: &str| {
        event.message_annotations.iter().find(|(key, _)| key == &Value::sym(k)).map(|(_, v)| v.clone())
    };
    assert_eq!(annotation("iothub-connection-device-id"), Some(Value::str(&device)));
    assert_eq!(annotation("x-opt-sequence-number"), Some(Value::Long(0)));
    hub.stop().await.unwrap();
}
