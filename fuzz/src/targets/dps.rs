//! The Device Provisioning Service's MQTT session (`iothub_emulator::dps::mqtt`): hostile packets
//! from a connected registration, read with the hub's `take_packet` and handled by a
//! `DpsSession` over one hub with a symmetric-key enrollment group. Every request PUBLISH must get
//! exactly one answer on `$dps/registrations/res/{status}/?$rid=…` with a JSON body.

use bytes::BytesMut;
use iothub_emulator::dps::derive_device_key;
use iothub_emulator::dps::mqtt::{self, DpsSession};
use iothub_emulator::hub::{Hub, HubConfig};
use iothub_emulator::mqtt::connection::take_packet;
use iothub_emulator::sas::make_token;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, Publish, Subscribe};
use serde_json::json;

use crate::alloc::untracked;
use crate::runner::{Check, Outcome, Target};

const GROUP_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const SCOPE: &str = "0ne0000FUZZ";
const REG: &str = "fz-1";

fn packet_bytes(p: &Packet) -> Vec<u8> {
    let mut buf = BytesMut::new();
    p.write(&mut buf, usize::MAX).expect("seed packets encode");
    buf.to_vec()
}

fn seeds() -> Vec<Vec<u8>> {
    let mut register = Publish::new(
        "$dps/registrations/PUT/iotdps-register/?$rid=1",
        QoS::AtLeastOnce,
        br#"{"registrationId":"fz-1","payload":{"modelId":"dtmi:com:example:T;1"}}"#.to_vec(),
    );
    register.pkid = 1;
    let poll = Publish::new(
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=1.0.x",
        QoS::AtMostOnce,
        b" ".to_vec(),
    );
    let mut sub = Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce);
    sub.pkid = 3;
    let packets = [
        Packet::Subscribe(sub),
        Packet::Publish(register),
        Packet::Publish(poll),
        Packet::PubAck(PubAck::new(1)),
        Packet::PingReq,
    ];
    let mut seeds: Vec<Vec<u8>> = packets.iter().map(packet_bytes).collect();
    seeds.push(seeds.concat());
    seeds
}

fn dictionary() -> Vec<Vec<u8>> {
    [
        &b"$dps/registrations/"[..],
        b"PUT/iotdps-register/?$rid=",
        b"GET/iotdps-get-operationstatus/?$rid=",
        b"&operationId=",
        b"\"payload\"",
        b"\"modelId\"",
        b"\"registrationId\"",
        &[0x30, 0x32, 0x82],
    ]
    .iter()
    .map(|s| s.to_vec())
    .collect()
}

fn check() -> Check {
    let (hub, session) = untracked(|| {
        let hub = Hub::new(HubConfig { dps_id_scope: SCOPE.into(), ..HubConfig::default() });
        let body = json!({"enrollmentGroupId": "g", "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": GROUP_KEY}}});
        hub.dps().put_enrollment(true, "g", &body, 0).expect("the group");
        let key = derive_device_key(GROUP_KEY, REG).expect("a key");
        let token =
            make_token(&format!("{SCOPE}/registrations/{REG}"), &key, None, 4_000_000_000).expect("token");
        let mut c = Connect::new(REG);
        c.set_login(format!("{SCOPE}/registrations/{REG}/api-version=2019-03-31"), token);
        let (session, _) = mqtt::accept(&hub, &c, REG, None).expect("the registration connects");
        // The first registration creates the device (its allocations are the hub's, not the case's).
        let mut warm: DpsSession = session.clone();
        let mut out = Vec::new();
        let p =
            Publish::new("$dps/registrations/PUT/iotdps-register/?$rid=0", QoS::AtMostOnce, b" ".to_vec());
        let _ = warm.handle_packet(&hub, Packet::Publish(p), &mut out);
        (hub, session)
    });
    Box::new(move |input| {
        let mut session = session.clone();
        let mut buf = BytesMut::from(input);
        let mut outcome = Outcome::Rejected;
        let mut out = Vec::new();
        while let Ok(Some(p)) = take_packet(&mut buf) {
            outcome = Outcome::Accepted;
            let request = match &p {
                Packet::Publish(p) if p.qos != QoS::ExactlyOnce => Some(p.qos),
                _ => None,
            };
            out.clear();
            if session.handle_packet(&hub, p, &mut out).is_err() {
                break;
            }
            let Some(qos) = request else { continue };
            let answers: Vec<&Publish> = out
                .iter()
                .filter_map(|p| match p {
                    Packet::Publish(p) => Some(p),
                    _ => None,
                })
                .collect();
            let acks = out.iter().filter(|p| matches!(p, Packet::PubAck(_))).count();
            if answers.len() != 1 || acks != usize::from(qos == QoS::AtLeastOnce) {
                return Err(format!("a request got {} answers and {acks} PUBACKs: {out:?}", answers.len()));
            }
            let a = answers[0];
            if !a.topic.starts_with("$dps/registrations/res/") || !a.topic.contains("/?$rid=") {
                return Err(format!("answer topic {}", a.topic));
            }
            if serde_json::from_slice::<serde_json::Value>(&a.payload).is_err() {
                return Err(format!("answer body is not JSON: {:?}", a.payload));
            }
        }
        Ok(outcome)
    })
}

/// `dps_mqtt`: a provisioning connection's packets after its CONNECT.
pub const DPS_MQTT: Target = Target {
    name: "dps_mqtt",
    about: "iothub_emulator::dps::mqtt::DpsSession::handle_packet (register, poll, subscribe) on take_packet's packets",
    seeds,
    dictionary,
    max_len: 64 * 1024,
    alloc_k: 16,
    alloc_c: 256 * 1024,
    make: check,
};
