//! The simulated device's side of MQTT: what an agent does with the bytes a hub sends it. The
//! stream is split into packets by the agent's own `take_packet` (the cap and the bounded
//! reservation for a partial packet), each packet goes through `DeviceMqtt::handle`, C2D commands
//! reach the real `AgentCore` (their bodies are JSON from the network too), and after every packet
//! the device's outgoing queue is drained the way the socket driver drains it. A hostile hub must
//! not make the device panic, buffer without bound or send a packet it cannot encode.

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::SubscribeReasonCode;
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck};
use simulated_devices::agent::core::{Action, AgentCore, InstallResult};
use simulated_devices::agent::mqtt_device::{
    DeviceMqtt, INFLIGHT, Incoming, OUTBOX_CAPACITY, encode, take_packet,
};
use simulated_devices::agent::transport::RESERVE_AHEAD_BYTES;
use simulated_devices::agent::{MAX_INCOMING_BYTES, SeenIds};

use crate::runner::{Check, Outcome, Target};

const DEVICE: &str = "dev1";
/// Largest packet the agent writes (its own cap, `MAX_OUTGOING_BYTES`).
const MAX_OUTGOING: usize = 256 * 1024;
/// Packets the device queues per packet it reads, at most: the SUBSCRIBE after a CONNACK, a
/// PUBACK, and the reports one command produces.
const MAX_QUEUED_PER_PACKET: usize = 8;

fn packet_bytes(p: &Packet) -> Vec<u8> {
    let mut buf = BytesMut::new();
    p.write(&mut buf, usize::MAX).expect("seed packets encode");
    buf.to_vec()
}

const NOTICE: &str = r#"{"version":"2.0.0","url":"ftp://127.0.0.1:2121/fw/app-2.0.0.tar.gz","sha256":"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff","size":1024,"name":"app"}"#;

/// What an IoT Hub sends a device: CONNACK, SUBACK, C2D deliveries (a notice, a check request,
/// the same message again), a twin response, PUBACK of a report, PINGRESP.
fn seeds() -> Vec<Vec<u8>> {
    let c2d = |pkid: u16, mid: &str, body: &str| {
        let mut p = Publish::new(
            format!(
                "devices/{DEVICE}/messages/devicebound/%24.mid={mid}&%24.to=%2Fdevices%2F{DEVICE}%2Fmessages%2Fdevicebound&iothub-ack=full"
            ),
            QoS::AtLeastOnce,
            body.as_bytes().to_vec(),
        );
        p.pkid = pkid;
        Packet::Publish(p)
    };
    let packets = vec![
        Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, true)),
        Packet::SubAck(SubAck::new(1, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)])),
        c2d(1, "m1", NOTICE),
        c2d(2, "m2", "check"),
        c2d(1, "m1", NOTICE),
        Packet::Publish(Publish::new("$iothub/twin/res/204/?$rid=1&$version=2", QoS::AtMostOnce, Vec::new())),
        Packet::PubAck(PubAck::new(2)),
        Packet::PingResp,
        Packet::ConnAck(ConnAck::new(ConnectReturnCode::NotAuthorized, false)),
    ];
    let mut seeds: Vec<Vec<u8>> = packets.iter().map(packet_bytes).collect();
    seeds.push(seeds[..8].concat());
    seeds
}

fn dictionary() -> Vec<Vec<u8>> {
    let mut d: Vec<Vec<u8>> = [0x20u8, 0x30, 0x32, 0x34, 0x40, 0x90, 0xd0].iter().map(|b| vec![*b]).collect();
    d.extend(
        [
            &b"devices/dev1/messages/devicebound/"[..],
            b"%24.mid=",
            b"&",
            b"$iothub/twin/res/",
            b"\xff\xff\xff\x7f",
            b"\"version\":",
            b"\"url\":\"ftp://",
            b"{}",
        ]
        .iter()
        .map(|s| s.to_vec()),
    );
    d
}

/// One device's state across the case, with the agent's answers to the core's actions.
struct Device {
    mqtt: DeviceMqtt,
    core: AgentCore,
    seen: SeenIds,
    now: u64,
}

impl Device {
    fn new() -> Self {
        Self {
            mqtt: DeviceMqtt::default(),
            core: AgentCore::new(DEVICE.to_string(), Some("1.0.0".into())),
            seen: SeenIds::default(),
            now: 1_700_000_000_000,
        }
    }

    /// Runs the core's actions the way the agent does, finishing fetches and installs at once.
    fn act(&mut self, mut actions: Vec<Action>) {
        // Each round answers a fetch or an install; the core asks for at most one more per answer.
        for _ in 0..8 {
            let mut next = Vec::new();
            for action in actions {
                match self.mqtt.take_publish(action) {
                    None => {}
                    Some(Action::FetchLatest) => {
                        next.extend(self.core.on_latest(Err("no server".into()), self.now))
                    }
                    Some(Action::Install(_)) => {
                        next.extend(self.core.on_install_done(InstallResult::Installed, self.now))
                    }
                    Some(Action::Publish { .. }) => unreachable!("take_publish queues publishes"),
                }
            }
            if next.is_empty() {
                return;
            }
            actions = next;
        }
    }

    fn handle(&mut self, packet: Packet) -> Result<(), String> {
        self.now += 1;
        match self.mqtt.handle(DEVICE, packet, &self.seen) {
            Incoming::Connected => {
                let actions = self.core.on_connected();
                self.act(actions);
            }
            Incoming::Refused(_) => self.mqtt.link_lost(),
            Incoming::Command(cmd) => {
                let actions = self.core.on_c2d(&cmd.payload, self.now);
                if let Some(id) = &cmd.message_id {
                    self.seen.insert(id);
                }
                self.act(actions);
                self.mqtt.ack(cmd.pkid);
            }
            Incoming::Desired(notice) => {
                let actions = self.core.on_desired(&notice, self.now);
                self.act(actions);
            }
            Incoming::Duplicate { .. } | Incoming::Nothing | Incoming::Pong => {}
        }
        if self.mqtt.inflight() > INFLIGHT {
            return Err(format!("{} publishes in flight, the window is {INFLIGHT}", self.mqtt.inflight()));
        }
        // Reports beyond the outbox are dropped; acknowledgements and pings add a few.
        if self.mqtt.waiting() > OUTBOX_CAPACITY + MAX_QUEUED_PER_PACKET {
            return Err(format!("{} packets waiting after one packet in", self.mqtt.waiting()));
        }
        // The driver writes what is ready; a packet the device made must encode.
        let mut out = BytesMut::new();
        let mut sent = 0;
        while let Some(p) = self.mqtt.poll_transmit() {
            encode(&p, &mut out, MAX_OUTGOING).map_err(|e| format!("the device cannot encode {p:?}: {e}"))?;
            out.clear();
            sent += 1;
            if sent > OUTBOX_CAPACITY + MAX_QUEUED_PER_PACKET {
                return Err("poll_transmit does not run dry".into());
            }
        }
        Ok(())
    }
}

fn check() -> Check {
    Box::new(|input| {
        let mut device = Device::new();
        let mut buf = BytesMut::from(input);
        let mut outcome = Outcome::Rejected;
        loop {
            let before = buf.len();
            match take_packet(&mut buf, MAX_INCOMING_BYTES, RESERVE_AHEAD_BYTES) {
                Ok(Some(p)) => {
                    if buf.len() >= before {
                        return Err("take_packet returned a packet without consuming input".into());
                    }
                    outcome = Outcome::Accepted;
                    device.handle(p)?;
                }
                // A partial packet (the agent reads more) or a malformed one (it drops the link).
                Ok(None) | Err(_) => break,
            }
        }
        // The link drops at the end of the input: what was in flight goes back to the outbox.
        device.mqtt.link_lost();
        if device.mqtt.inflight() != 0 {
            return Err("publishes still in flight after the link was lost".into());
        }
        Ok(outcome)
    })
}

/// `device_mqtt`: the simulated device's MQTT reader, protocol state and command handling.
pub const DEVICE_MQTT: Target = Target {
    name: "device_mqtt",
    about: "simulated_devices::agent::mqtt_device (take_packet, DeviceMqtt::handle, poll_transmit) + AgentCore::on_c2d on hub bytes",
    seeds,
    dictionary,
    max_len: 64 * 1024,
    alloc_k: 16,
    // The reservation ahead of a partial packet (16 KiB, BytesMut may double) and the reports.
    alloc_c: 96 * 1024,
    make: check,
};
