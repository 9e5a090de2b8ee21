//! MQTT targets: the hub's own `take_packet` (the pre-codec checks, rumqttc's v4 reader and the
//! buffer reservation on a partial packet), and the hub's topic and subscription parsers.

use bytes::BytesMut;
use iothub_emulator::mqtt::connection::take_packet;
use iothub_emulator::mqtt::topics::{DeviceTopic, parse_publish_topic, parse_subscription};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, LastWill, Packet, PubAck, Publish, Subscribe, Unsubscribe};

use crate::alloc::untracked;
use crate::runner::{Check, Outcome, Target};

fn packet_bytes(p: &Packet) -> Vec<u8> {
    let mut buf = BytesMut::new();
    p.write(&mut buf, usize::MAX).expect("seed packets encode");
    buf.to_vec()
}

/// What an IoT Hub device sends: CONNECT (SAS login, a will), PUBLISH at QoS 0 and 1 to each
/// device topic, SUBSCRIBE, UNSUBSCRIBE, PUBACK, PINGREQ, DISCONNECT.
fn packet_seeds() -> Vec<Vec<u8>> {
    let mut connect = Connect::new("dev1");
    connect.set_login(
        "localhost/dev1/?api-version=2021-04-12",
        "SharedAccessSignature sr=localhost%2Fdevices%2Fdev1&sig=abc%3D&se=4000000000",
    );
    connect.keep_alive = 60;
    let mut with_will = Connect::new("dev1");
    with_will.last_will =
        Some(LastWill::new("devices/dev1/messages/events/", b"bye".to_vec(), QoS::AtLeastOnce, false));
    let mut telemetry = Publish::new(
        "devices/dev1/messages/events/a=b&%24.ct=application%2Fjson",
        QoS::AtLeastOnce,
        b"{\"t\":21.5}".to_vec(),
    );
    telemetry.pkid = 1;
    let mut subscribe = Subscribe::new("devices/dev1/messages/devicebound/#", QoS::AtLeastOnce);
    subscribe.pkid = 2;
    let mut twin_sub = Subscribe::new("$iothub/twin/res/#", QoS::AtMostOnce);
    twin_sub.pkid = 3;
    let mut unsubscribe = Unsubscribe::new("$iothub/methods/POST/#");
    unsubscribe.pkid = 4;
    let packets = vec![
        Packet::Connect(connect),
        Packet::Connect(with_will),
        Packet::Publish(telemetry),
        Packet::Publish(Publish::new(
            "$iothub/twin/PATCH/properties/reported/?$rid=1",
            QoS::AtMostOnce,
            b"{\"fw\":\"1.0\"}".to_vec(),
        )),
        Packet::Publish(Publish::new("$iothub/methods/res/200/?$rid=7", QoS::AtMostOnce, b"{}".to_vec())),
        Packet::Subscribe(subscribe),
        Packet::Subscribe(twin_sub),
        Packet::Unsubscribe(unsubscribe),
        Packet::PubAck(PubAck::new(1)),
        Packet::PingReq,
        Packet::Disconnect,
    ];
    let mut seeds: Vec<Vec<u8>> = packets.iter().map(packet_bytes).collect();
    seeds.push(seeds.concat());
    seeds
}

fn packet_dictionary() -> Vec<Vec<u8>> {
    let mut d: Vec<Vec<u8>> = [0x10u8, 0x20, 0x30, 0x32, 0x34, 0x40, 0x82, 0xa2, 0xc0, 0xe0, 0xf0]
        .iter()
        .map(|b| vec![*b])
        .collect();
    d.extend(
        [
            &b"\x00\x04MQTT\x04"[..],
            b"\xff\xff\xff\x7f",
            b"\x80\x80\x80\x80",
            b"\xff\xff",
            b"devices/dev1/",
            b"$iothub/",
        ]
        .iter()
        .map(|s| s.to_vec()),
    );
    d
}

/// A packet that was read writes back to bytes that read as the same packet.
fn rewrite_round_trip(p: &Packet) -> Result<(), String> {
    let mut written = BytesMut::new();
    if let Err(e) = p.write(&mut written, usize::MAX) {
        return Err(format!("a packet that was read cannot be written back: {e:?}\n  {p:?}"));
    }
    let again = Packet::read(&mut written, usize::MAX)
        .map_err(|e| format!("a re-written packet does not read: {e:?}\n  {p:?}"))?;
    if again != *p {
        return Err(format!("a re-written packet reads differently:\n  {p:?}\n  {again:?}"));
    }
    Ok(())
}

fn check_packet() -> Check {
    Box::new(|input| {
        let mut buf = BytesMut::from(input);
        let mut outcome = Outcome::Rejected;
        loop {
            let before = buf.len();
            match take_packet(&mut buf) {
                Ok(Some(p)) => {
                    if buf.len() >= before {
                        return Err("take_packet returned a packet without consuming input".into());
                    }
                    outcome = Outcome::Accepted;
                    untracked(|| rewrite_round_trip(&p))?;
                }
                // A partial packet (the hub reads more) or a refusal (the hub closes).
                Ok(None) | Err(_) => return Ok(outcome),
            }
        }
    })
}

/// Topic inputs are `device id \n topic`: the device id a connection authenticated as matters.
fn topic_seeds() -> Vec<Vec<u8>> {
    [
        "dev1\ndevices/dev1/messages/events/",
        "dev1\ndevices/dev1/messages/events/a=1&b&%24.mid=x&$.ct=application%2Fjson",
        "dev1\n$iothub/twin/GET/?$rid=42",
        "dev1\n$iothub/twin/PATCH/properties/reported/?$rid=1&$version=3",
        "dev1\n$iothub/methods/res/200/?$rid=abc",
        "dev1\ndevices/dev1/messages/devicebound/#",
        "dev1\n$iothub/twin/res/#",
        "dev1\n$iothub/twin/PATCH/properties/desired/#",
        "dev1\n$iothub/methods/POST/#",
        "d/e\ndevices/d/e/messages/events/%",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn topic_dictionary() -> Vec<Vec<u8>> {
    [
        "devices/",
        "/messages/events",
        "/messages/devicebound/#",
        "$iothub/",
        "twin/",
        "methods/res/",
        "?$rid=",
        "&",
        "=",
        "%",
        "%2F",
        "/",
        "#",
        "+",
        "\n",
        "\u{0}",
        "é",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn check_topic() -> Check {
    Box::new(|input| {
        let text = untracked(|| String::from_utf8_lossy(input));
        let (device, topic) = text.split_once('\n').unwrap_or(("dev1", &text));
        let publish = parse_publish_topic(device, topic);
        let subscription = parse_subscription(device, topic);
        if let Ok(DeviceTopic::Telemetry(bag)) = &publish
            && !topic.starts_with(&format!("devices/{device}/messages/events"))
        {
            return Err(format!("telemetry accepted on another device's topic: {bag:?}"));
        }
        Ok(if publish.is_ok() || subscription.is_some() { Outcome::Accepted } else { Outcome::Rejected })
    })
}

/// `mqtt_packet`: the hub's `take_packet`, as its read loop calls it.
pub const PACKET: Target = Target {
    name: "mqtt_packet",
    about: "mqtt::connection::take_packet (wire checks + rumqttc v4 reader); packets re-write identically",
    seeds: packet_seeds,
    dictionary: packet_dictionary,
    max_len: 64 * 1024,
    alloc_k: 8,
    // take_packet reserves at most 16 KiB ahead of the bytes it holds (BytesMut may double).
    alloc_c: 64 * 1024,
    make: check_packet,
};

/// `mqtt_topic`: the hub's topic and subscription parsers.
pub const TOPIC: Target = Target {
    name: "mqtt_topic",
    about: "mqtt::topics::parse_publish_topic and parse_subscription on `device\\ntopic` inputs",
    seeds: topic_seeds,
    dictionary: topic_dictionary,
    max_len: 4096,
    alloc_k: 32,
    alloc_c: 16 * 1024,
    make: check_topic,
};
