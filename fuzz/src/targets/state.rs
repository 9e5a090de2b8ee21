//! The durable hub's state files (`--persist`): a journal segment or snapshot image is scanned
//! frame by frame (CRC, torn tail), each record decoded and applied to a fresh hub as recovery
//! does. Every record that decodes must encode back to the same payload.

use iothub_emulator::Hub;
use iothub_emulator::persist::codec::{FRAME_HEADER_BYTES, frame, scan};
use iothub_emulator::persist::records::{
    C2dRec, ConfigurationRec, DeviceConfigsRec, DeviceRec, FeedbackRec, ModuleRec, Record, TwinRec,
};

use crate::alloc::untracked;
use crate::runner::{Check, Outcome, Target};

fn samples() -> Vec<Record<'static>> {
    vec![
        Record::Device(DeviceRec {
            id: "fridge-1",
            generation: 7,
            etag: 9,
            enabled: true,
            status_reason: Some("ok"),
            status_updated: 1_700_000_000_000,
            auth_type: 0,
            primary_key: Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            secondary_key: Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            has_thumbprints: false,
            primary_thumbprint: None,
            secondary_thumbprint: None,
            model_id: Some("dtmi:com:example:Fridge;1"),
            iot_edge: false,
            mqtt_session: 1,
        }),
        Record::Twin {
            id: "fridge-1",
            generation: 7,
            twin: TwinRec {
                tags: br#"{"site":{"floor":2}}"#,
                desired: br#"{"t":4}"#,
                reported: br#"{"t":5,"fw":"1.2"}"#,
                desired_version: 2,
                reported_version: 3,
                version: 4,
                desired_updated: 10,
                reported_updated: 11,
            },
        },
        Record::C2dAdded {
            id: "fridge-1",
            generation: 7,
            message: C2dRec {
                sequence: 1,
                enqueued_at: 100,
                expires_at: 4_000_000_000_000,
                delivery_count: 0,
                message_id: Some("m-1"),
                correlation_id: Some("c-1"),
                user_id: None,
                content_type: Some("application/json"),
                content_encoding: Some("utf-8"),
                ack: 3,
                expiry: None,
                properties: vec![("k", "v")],
                body: b"{\"cmd\":\"defrost\"}",
            },
        },
        Record::C2dAbandoned { id: "fridge-1", generation: 7, sequence: 1, delivery_count: 2 },
        Record::C2dSequence { id: "fridge-1", generation: 7, last: 3 },
        Record::C2dRemoved { id: "fridge-1", generation: 7, sequence: 1 },
        Record::FeedbackPushed(FeedbackRec {
            serial: 0,
            original_message_id: Some("m-1"),
            enqueued_at: 200,
            status: 0,
            device_id: "fridge-1",
            device_generation_id: "000000000000000007",
        }),
        Record::FeedbackCut { next: 1 },
        Record::C2dAdded {
            id: "",
            generation: 0,
            message: C2dRec {
                sequence: 1,
                enqueued_at: 300,
                expires_at: 4_000_000_000_000,
                delivery_count: 0,
                message_id: None,
                correlation_id: None,
                user_id: Some("localhost"),
                content_type: Some("application/vnd.microsoft.iothub.feedback.json"),
                content_encoding: None,
                ack: 0,
                expiry: None,
                properties: Vec::new(),
                body: b"[]",
            },
        },
        Record::DeviceRemoved { id: "fridge-1", generation: 7 },
        Record::Job {
            id: "job-1",
            state: br#"{"body":{"type":"scheduleUpdateTwin","queryCondition":"deviceId = 'fridge-1'","updateTwin":{"tags":{"a":1}}},"created":1,"started":2,"ended":3,"status":"completed","failureReason":null,"statusMessage":"1 of 1 devices succeeded, 0 failed","stats":[1,0,1,0,0],"seq":1}"#,
        },
        Record::Job { id: "job-2", state: b"{}" },
        Record::Device(DeviceRec {
            id: "edge-1",
            generation: 20,
            etag: 21,
            enabled: true,
            status_reason: None,
            status_updated: 0,
            auth_type: 0,
            primary_key: Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            secondary_key: None,
            has_thumbprints: false,
            primary_thumbprint: None,
            secondary_thumbprint: None,
            model_id: None,
            iot_edge: true,
            mqtt_session: 0,
        }),
        Record::Module(ModuleRec {
            device_id: "edge-1",
            device_generation: 20,
            id: "sensor",
            generation: 22,
            etag: 23,
            managed_by: Some("IotEdge"),
            auth_type: 0,
            primary_key: Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            secondary_key: Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            has_thumbprints: false,
            primary_thumbprint: None,
            secondary_thumbprint: None,
            model_id: Some("dtmi:com:example:Sensor;1"),
            mqtt_session: 3,
            twin: TwinRec {
                tags: br#"{"role":"probe"}"#,
                desired: br#"{"rate":5}"#,
                reported: br#"{"rate":5}"#,
                desired_version: 2,
                reported_version: 2,
                version: 3,
                desired_updated: 30,
                reported_updated: 31,
            },
        }),
        Record::Configuration(ConfigurationRec {
            id: "fw",
            seq: 1,
            etag: 24,
            created: 1_700_000_000_000,
            updated: 1_700_000_000_000,
            body: br#"{"id":"fw","schemaVersion":null,"labels":{"team":"ops"},"content":{"deviceContent":{"properties.desired.firmware":{"version":"2.0"}}},"contentType":"assignment","targetCondition":"tags.env = 'test'","priority":10,"metrics":{"queries":{"current":"SELECT deviceId FROM devices WHERE properties.reported.firmware = '2.0'"}}}"#,
        }),
        Record::DeviceConfigs(DeviceConfigsRec {
            id: "edge-1",
            generation: 20,
            module: None,
            statuses: vec![("fw", 1), ("gone", 0)],
            paths: vec!["firmware"],
        }),
        Record::DeviceConfigs(DeviceConfigsRec {
            id: "edge-1",
            generation: 20,
            module: Some(("sensor", 22)),
            statuses: vec![("mod-fw", 1)],
            paths: vec!["rate"],
        }),
        Record::ModuleRemoved { device_id: "edge-1", device_generation: 20, id: "sensor", generation: 22 },
        Record::ConfigurationRemoved { id: "fw" },
    ]
}

fn seeds() -> Vec<Vec<u8>> {
    let all = samples();
    let mut whole = Vec::new();
    for r in &all {
        frame(&mut whole, |w| r.encode(w));
    }
    let mut seeds = vec![whole];
    for r in &all {
        let mut one = Vec::new();
        frame(&mut one, |w| r.encode(w));
        seeds.push(one);
    }
    seeds
}

fn check() -> Check {
    Box::new(|input| {
        // Every decoded record encodes back to its payload.
        let round_trip = scan(input, |_, payload| {
            let Ok(record) = Record::decode(payload) else { return Ok(()) };
            let again = untracked(|| {
                let mut out = Vec::new();
                frame(&mut out, |w| record.encode(w));
                out
            });
            if again[FRAME_HEADER_BYTES..] != *payload {
                return Err(format!("{record:?} encodes to other bytes than it was decoded from"));
            }
            Ok(())
        });
        round_trip?;
        let hub = untracked(|| Hub::new(iothub_emulator::HubConfig::default()));
        let result = hub.replay_state_bytes(input);
        let outcome = match result {
            Ok((valid, records)) if records > 0 => {
                if valid > input.len() {
                    return Err(format!("valid prefix {valid} is longer than the input {}", input.len()));
                }
                Outcome::Accepted
            }
            _ => Outcome::Rejected,
        };
        untracked(|| drop(hub));
        Ok(outcome)
    })
}

/// `state_journal`: the durable hub's segment/snapshot files.
pub const STATE_JOURNAL: Target = Target {
    name: "state_journal",
    about: "persist::codec::scan + records::Record::decode (round-trips), applied by Hub::replay_state_bytes",
    seeds,
    dictionary: || {
        let mut words: Vec<Vec<u8>> = (1u8..=15).map(|t| vec![t]).collect();
        words.extend([vec![0xff; 4], vec![0; 8], b"{}".to_vec(), b"fridge-1".to_vec(), b"edge-1".to_vec()]);
        words
    },
    max_len: 16 * 1024,
    alloc_k: 96,
    alloc_c: 64 * 1024,
    make: check,
};
