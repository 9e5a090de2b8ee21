//! Regression tests for issue 11, each sending the exact bytes of a finding over a real socket:
//! the pre-auth AMQP inputs that killed the process, the MQTT PUBACK for a dropped message, the
//! connections that held resources forever, and the lax parsing. After each, the hub must still
//! answer and accept new connections.

use std::time::Duration;

use iothub_emulator::HubConfig;
use iothub_emulator::amqp::frame::{self, AMQP_HEADER, FRAME_AMQP, FRAME_SASL, SASL_HEADER, code, list};
use iothub_emulator::amqp::message::{Body, Message, Properties};
use iothub_emulator::amqp::types::Value;
use iothub_emulator::c2d::{C2dMessage, QueueConfig};
use iothub_emulator::limits::{D2C_MAX_MESSAGE_BYTES, Timeouts};
use iothub_emulator_tests::hostile::{self, DEADLINE};
use iothub_emulator_tests::{TestHub, unique};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, Publish, Subscribe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn hub_with(timeouts: Timeouts) -> TestHub {
    TestHub::start_with(HubConfig { timeouts, ..HubConfig::default() }).await.unwrap()
}

/// A hub whose plain MQTT port is served by a task per connection, or with `drivers` by the
/// task-less drivers (`--mqtt-plain-driver`).
async fn mqtt_hub(drivers: bool, config: HubConfig) -> TestHub {
    if drivers {
        TestHub::start_with_mqtt_drivers(config).await.unwrap()
    } else {
        TestHub::start_with_mqtt_tasks(config).await.unwrap()
    }
}

async fn assert_serving(hub: &TestHub) {
    hostile::assert_healthy(hub).await.unwrap();
    hostile::assert_amqp_opens(hub).await.unwrap();
}

#[tokio::test]
async fn amqp_crash_inputs_over_tls_close_only_their_connection() {
    let hub = TestHub::start().await.unwrap();
    for (what, input) in hostile::amqp_crash_inputs() {
        let got = hostile::amqp_tls_attack(&hub, &input).await.unwrap_or_else(|e| panic!("{what}: {e:#}"));
        if input.starts_with(&AMQP_HEADER) {
            // Past the bare header the connection is waiting for open: it is closed with an error.
            assert_eq!(hostile::close_condition(&got).as_deref(), Some("amqp:decode-error"), "{what}");
        }
        assert_serving(&hub).await;
    }
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn amqp_crash_inputs_over_websocket_on_both_http_ports_close_only_their_connection() {
    let hub = TestHub::start().await.unwrap();
    for https in [true, false] {
        for (what, input) in hostile::amqp_crash_inputs() {
            hostile::amqp_ws_attack(&hub, https, &input).await.unwrap_or_else(|e| panic!("{what}: {e:#}"));
            assert_serving(&hub).await;
        }
    }
    hub.stop().await.unwrap();
}

async fn an_oversize_qos1_publish_gets_no_puback_and_is_not_recorded(drivers: bool) {
    let hub = mqtt_hub(drivers, HubConfig::default()).await;
    let device = unique("big");
    let key = hub.create_device(&device).await.unwrap();
    let mut s = hostile::mqtt_connected(&hub, &device, &key, 60).await.unwrap();
    let mut publish = Publish::new(
        format!("devices/{device}/messages/events/"),
        QoS::AtLeastOnce,
        vec![7u8; D2C_MAX_MESSAGE_BYTES + 1],
    );
    publish.pkid = 1;
    let got =
        hostile::send_until_closed(&mut s, &hostile::packet_bytes(Packet::Publish(publish))).await.unwrap();
    assert!(got.is_empty(), "the hub answered a message it dropped: {:02x?}", &got[..got.len().min(16)]);
    assert!(hub.running.hub.read_telemetry(Some(&device), 0, 10).is_empty());
    // The limit itself is still accepted and acknowledged.
    let mut s = hostile::mqtt_connected(&hub, &device, &key, 60).await.unwrap();
    let mut publish = Publish::new(
        format!("devices/{device}/messages/events/"),
        QoS::AtLeastOnce,
        vec![7u8; D2C_MAX_MESSAGE_BYTES],
    );
    publish.pkid = 2;
    s.write_all(&hostile::packet_bytes(Packet::Publish(publish))).await.unwrap();
    let mut puback = [0u8; 4];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut puback)).await.unwrap().unwrap();
    assert_eq!(puback, [0x40, 0x02, 0x00, 0x02]);
    assert_eq!(hub.running.hub.read_telemetry(Some(&device), 0, 10).len(), 1);
    hub.stop().await.unwrap();
}

async fn a_connect_with_the_reserved_flag_is_closed_without_connack(drivers: bool) {
    let hub = mqtt_hub(drivers, HubConfig::default()).await;
    let device = unique("flag");
    let key = hub.create_device(&device).await.unwrap();
    let mut connect = hostile::mqtt_connect_bytes(&hub, &device, &key, 60);
    // Fixed header (1 byte + 1-2 length bytes), protocol name (6), level (1), then the flags.
    let flags_at = 1 + if connect[1] & 0x80 != 0 { 2 } else { 1 } + 6 + 1;
    connect[flags_at] |= 0x01;
    let mut s = tokio::net::TcpStream::connect(hub.running.mqtt_plain_addr.unwrap()).await.unwrap();
    let got = hostile::send_until_closed(&mut s, &connect).await.unwrap();
    assert!(got.is_empty(), "expected no CONNACK, got {got:02x?}");
    hub.stop().await.unwrap();
}

async fn malformed_packets_after_connect_close_the_connection_unanswered(drivers: bool) {
    let hub = mqtt_hub(drivers, HubConfig::default()).await;
    let device = unique("lax");
    let key = hub.create_device(&device).await.unwrap();
    let filter = format!("devices/{device}/messages/devicebound/#");
    let mut subscribe = hostile::packet_bytes(Packet::Subscribe(Subscribe::new(&filter, QoS::AtLeastOnce)));
    subscribe[0] = 0x80; // flags 0000 instead of 0010
    let mut nul_topic = Publish::new(format!("devices/{device}/messages/events/\0x"), QoS::AtLeastOnce, "n");
    nul_topic.pkid = 3;
    for (what, bytes) in [
        ("SUBSCRIBE with wrong fixed-header flags", subscribe),
        ("an empty UNSUBSCRIBE", vec![0xa2, 0x02, 0x00, 0x05]),
        ("an UNSUBSCRIBE shorter than its packet id", vec![0xa2, 0x01, 0x00]),
        ("a topic with U+0000", hostile::packet_bytes(Packet::Publish(nul_topic))),
        ("a CONNACK from the client", vec![0x20, 0x02, 0x00, 0x00]),
    ] {
        let mut s = hostile::mqtt_connected(&hub, &device, &key, 60).await.unwrap();
        let got = hostile::send_until_closed(&mut s, &bytes).await.unwrap();
        assert!(got.is_empty(), "{what}: expected no answer, got {got:02x?}");
    }
    assert!(hub.running.hub.read_telemetry(Some(&device), 0, 10).is_empty(), "the NUL topic was recorded");
    hostile::assert_healthy(&hub).await.unwrap();
    hub.stop().await.unwrap();
}

async fn a_device_that_stops_reading_is_disconnected_and_its_c2d_message_returns_to_the_queue(drivers: bool) {
    let hub = mqtt_hub(
        drivers,
        HubConfig {
            timeouts: Timeouts { write: Duration::from_millis(500), ..Timeouts::default() },
            ..HubConfig::default()
        },
    )
    .await;
    let device = unique("deaf");
    let key = hub.create_device(&device).await.unwrap();
    let state = || {
        let d = hub.running.hub.get_device(&device).unwrap();
        d["connectionState"].as_str().unwrap_or_default().to_owned()
    };
    // A small receive buffer so the hub's writes back up quickly; keep-alive far away (60 s).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(hub.running.mqtt_plain_addr.unwrap()).await.unwrap();
    s.write_all(&hostile::mqtt_connect_bytes(&hub, &device, &key, 60)).await.unwrap();
    let filters = [
        format!("devices/{device}/messages/devicebound/#"),
        "$iothub/twin/PATCH/properties/desired/#".to_owned(),
    ];
    let mut sub = Subscribe::new(&filters[0], QoS::AtLeastOnce);
    sub.add(filters[1].clone(), QoS::AtMostOnce);
    sub.pkid = 1;
    s.write_all(&hostile::packet_bytes(Packet::Subscribe(sub))).await.unwrap();
    let mut connack_suback = [0u8; 4 + 6];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut connack_suback)).await.unwrap().unwrap();
    hub.running.hub.send_c2d(&device, C2dMessage { body: "update".into(), ..C2dMessage::default() }).unwrap();
    // From here on the device reads nothing. Desired-property notifications pile up until the
    // hub's write stalls; the write deadline must then end the connection.
    let big = "x".repeat(16 * 1024);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut sent = 0;
    while state() == "Connected" {
        assert!(tokio::time::Instant::now() < deadline, "still Connected after {sent} notifications");
        if sent < 2_000 {
            hub.running.hub.notify_desired(&device, serde_json::json!({ "blob": big, "$version": sent }));
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The unacknowledged C2D message is back in the queue, not locked for a minute.
    let again = hub.running.hub.receive_c2d(&device, 1000).unwrap();
    assert!(again.is_some(), "the in-flight C2D message did not return to the queue");
    drop(s);
    hub.stop().await.unwrap();
}

/// A C2D message larger than what the socket takes: with the drivers, the sender's thread writes
/// part of it (direct delivery) and leaves the rest to the device's driver, whose write deadline
/// then ends the session of a device that reads nothing; with tasks, the connection's own write
/// does the same. Either way the message goes back to the queue, whole.
async fn a_c2d_message_the_socket_cannot_take_at_once_ends_a_deaf_session_and_returns_to_the_queue(
    drivers: bool,
) {
    // A message larger than any send buffer this kernel grows (tcp_wmem's top is 4 MiB): its write
    // is partial whatever the buffers, unlike eight of IoT Hub's 64 KiB ones.
    let hub = mqtt_hub(
        drivers,
        HubConfig {
            timeouts: Timeouts { write: Duration::from_millis(500), ..Timeouts::default() },
            c2d: QueueConfig { max_message_bytes: 8 << 20, ..QueueConfig::default() },
            ..HubConfig::default()
        },
    )
    .await;
    let device = unique("deaf-c2d");
    let key = hub.create_device(&device).await.unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(hub.running.mqtt_plain_addr.unwrap()).await.unwrap();
    s.write_all(&hostile::mqtt_connect_bytes(&hub, &device, &key, 60)).await.unwrap();
    let mut sub = Subscribe::new(format!("devices/{device}/messages/devicebound/#"), QoS::AtLeastOnce);
    sub.pkid = 1;
    s.write_all(&hostile::packet_bytes(Packet::Subscribe(sub))).await.unwrap();
    let mut connack_suback = [0u8; 4 + 5];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut connack_suback)).await.unwrap().unwrap();
    let body = vec![7u8; 6 << 20];
    let msg = C2dMessage { body: body.clone().into(), ..C2dMessage::default() };
    hub.running.hub.send_c2d(&device, msg).unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let d = hub.running.hub.get_device(&device).unwrap();
        if d["connectionState"] != "Connected" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "a device that reads nothing is still Connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = hub.running.hub.receive_c2d(&device, 1000).unwrap();
    let again = again.expect("the message did not return to the queue");
    assert_eq!(again.message.body.len(), body.len(), "the message came back cut");
    drop(s);
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn an_amqp_connection_that_never_opens_is_closed_at_the_open_deadline() {
    let hub = hub_with(Timeouts { amqp_open: Duration::from_millis(300), ..Timeouts::default() }).await;
    // Silent after TLS.
    let mut idle = hostile::tls(&hub, hub.running.amqp_addr).await.unwrap();
    assert!(hostile::read_until_closed(&mut idle).await.unwrap().is_empty());
    // Header sent, open never.
    let mut header_only = hostile::tls(&hub, hub.running.amqp_addr).await.unwrap();
    let got = hostile::send_until_closed(&mut header_only, &AMQP_HEADER).await.unwrap();
    assert_eq!(hostile::close_condition(&got).as_deref(), Some("amqp:resource-limit-exceeded"));
    assert_serving(&hub).await;
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn an_amqp_connection_silent_past_twice_the_announced_idle_time_out_is_closed() {
    let hub = hub_with(Timeouts { amqp_idle: Duration::from_millis(200), ..Timeouts::default() }).await;
    let mut s = hostile::tls(&hub, hub.running.amqp_addr).await.unwrap();
    let mut bytes = AMQP_HEADER.to_vec();
    frame::write_frame(&mut bytes, FRAME_AMQP, 0, &list(code::OPEN, vec![Value::str("quiet")]), &[]);
    let started = tokio::time::Instant::now();
    let got = hostile::send_until_closed(&mut s, &bytes).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(400), "closed after {:?}", started.elapsed());
    let mut frames = got[8..].to_vec();
    let open = frame::parse_frame(&mut frames, u32::MAX).unwrap().unwrap();
    let (c, fields) = frame::described_list(open.body.as_ref().unwrap()).unwrap();
    assert_eq!((c, fields.u32(4)), (code::OPEN, Some(200)), "the idle-time-out is announced");
    assert_eq!(hostile::close_condition(&got).as_deref(), Some("amqp:resource-limit-exceeded"));
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn a_negative_absolute_expiry_time_is_rejected_not_taken_as_no_expiry() {
    let hub = TestHub::start().await.unwrap();
    let device = unique("exp");
    hub.create_device(&device).await.unwrap();
    let mut s = hostile::tls(&hub, hub.running.amqp_addr).await.unwrap();
    // SASL PLAIN with the owner token as the password, then open, begin, a sender link.
    let mut out = SASL_HEADER.to_vec();
    let response = format!("\0iothubowner@sas.root.localhost\0{}", hub.owner_token()).into_bytes();
    frame::write_frame(
        &mut out,
        FRAME_SASL,
        0,
        &list(0x41, vec![Value::sym("PLAIN"), Value::Binary(response)]),
        &[],
    );
    out.extend_from_slice(&AMQP_HEADER);
    for body in [
        list(code::OPEN, vec![Value::str("exp")]),
        list(code::BEGIN, vec![Value::Null, Value::Uint(0), Value::Uint(100), Value::Uint(100)]),
        list(
            code::ATTACH,
            vec![
                Value::str("c2d"),
                Value::Uint(0),
                Value::Bool(false),
                Value::Ubyte(0),
                Value::Ubyte(0),
                list(code::SOURCE, vec![Value::str("client")]),
                list(code::TARGET, vec![Value::str("/messages/devicebound")]),
                Value::Null,
                Value::Null,
                Value::Uint(0),
            ],
        ),
    ] {
        frame::write_frame(&mut out, FRAME_AMQP, 0, &body, &[]);
    }
    let message = Message {
        properties: Properties {
            to: Some(format!("/devices/{device}/messages/devicebound")),
            absolute_expiry_time: Some(-5),
            ..Properties::default()
        },
        body: Body::Data(b"update".to_vec()),
        ..Message::default()
    };
    let transfer =
        list(code::TRANSFER, vec![Value::Uint(0), Value::Uint(0), Value::Binary(vec![0]), Value::Uint(0)]);
    frame::write_frame(&mut out, FRAME_AMQP, 0, &transfer, &message.encode());
    s.write_all(&out).await.unwrap();
    let mut buf = Vec::new();
    let disposition = tokio::time::timeout(DEADLINE, async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before the disposition");
            buf.extend_from_slice(&chunk[..n]);
            loop {
                // Protocol headers (SASL's, then AMQP's after the outcome) sit between frames.
                while buf.len() >= 8 && buf.starts_with(b"AMQP") {
                    buf.drain(..8);
                }
                let Some(f) = frame::parse_frame(&mut buf, u32::MAX).unwrap() else { break };
                let Some(body) = f.body else { continue };
                let (c, fields) = frame::described_list(&body).unwrap();
                if c == code::DISPOSITION {
                    return fields;
                }
            }
        }
    })
    .await
    .unwrap();
    let (state, outcome) = frame::described_list(disposition.get(4)).unwrap();
    assert_eq!(state, code::REJECTED);
    let (_, error) = frame::described_list(outcome.get(0)).unwrap();
    assert_eq!(error.str(0), Some("com.microsoft:argument-error"), "{error:?}");
    assert!(hub.running.hub.receive_c2d(&device, 1000).unwrap().is_none(), "the message was queued");
    hub.stop().await.unwrap();
}

/// Runs an MQTT test against each way of serving the plain MQTT port (see [`mqtt_hub`]).
macro_rules! both_ways {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn tasks() {
                super::$name(false).await
            }

            #[tokio::test]
            async fn drivers() {
                super::$name(true).await
            }
        }
    )*};
}

both_ways!(
    an_oversize_qos1_publish_gets_no_puback_and_is_not_recorded,
    a_connect_with_the_reserved_flag_is_closed_without_connack,
    malformed_packets_after_connect_close_the_connection_unanswered,
    a_device_that_stops_reading_is_disconnected_and_its_c2d_message_returns_to_the_queue,
    a_c2d_message_the_socket_cannot_take_at_once_ends_a_deaf_session_and_returns_to_the_queue,
);
