//! Criterion micro-benchmarks of the hub's hot paths, each beside a peer measured in the same run.
//!
//! A peer is the least the same job must cost (a bare `VecDeque`, the bare HMAC, an unescaped
//! `format!`, a byte copy, a `HashMap` insert), so `ours / peer` says how far a path is from its
//! floor. Groups: `c2d_queue` (the sans-IO [`DeviceQueue`]), `sas` (token parse + verify and the
//! hub's authentication), `mqtt_topic` (C2D topic encode, D2C topic parse), `amqp` (one C2D
//! transfer frame decoded and encoded), `hub` (`send_c2d` and a twin PATCH among 10,000 devices).
//!
//! `cargo bench -p testbench --bench hot_paths` (add `-- --quick` for a faster, rougher run, or
//! a group name such as `-- sas` to run one group). Results and what they mean: `bench/README.md`.

use std::collections::{HashMap, VecDeque};
use std::hint::black_box;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use hmac::{Hmac, Mac};
use iothub_emulator::amqp::frame::{self, FRAME_AMQP, code, list};
use iothub_emulator::amqp::message::{Body, Message, Properties};
use iothub_emulator::amqp::types::Value;
use iothub_emulator::amqp::{self, message};
use iothub_emulator::c2d::{AckMode, C2dMessage, DeviceQueue, LockToken, QueueConfig};
use iothub_emulator::hub::{DeviceInput, Hub, HubConfig};
use iothub_emulator::mqtt::topics::{self, DeviceTopic};
use iothub_emulator::sas::{self, Rights, SasToken};
use serde_json::json;
use sha2::Sha256;

/// A fixed "now" for the sans-IO queue (2026-01-01T00:00:00Z); the queue never reads a clock.
const NOW_MS: u64 = 1_767_225_600_000;
/// Devices registered in the hub group (the task's "one of 10,000").
const HUB_DEVICES: usize = 10_000;
/// IoT Hub's per-device C2D queue depth: the "full queue" drained by `c2d_queue/drain_50`.
const QUEUE_DEPTH: usize = 50;

/// A release notice as the fleet's releases send it: ids, content type, ack, two properties.
fn c2d_message() -> C2dMessage {
    C2dMessage {
        message_id: Some("release-2.0.0-fridge-00042".into()),
        correlation_id: Some("rollout-7".into()),
        content_type: Some("application/json".into()),
        content_encoding: Some("utf-8".into()),
        ack: AckMode::Full,
        expiry: Some(NOW_MS + 3_600_000),
        properties: vec![
            ("release".into(), "2.0.0".into()),
            ("url".into(), "ftp://localhost/fridge-2.0.0.tar.gz".into()),
        ],
        body: Bytes::from_static(br#"{"version":"2.0.0","url":"ftp://localhost/fridge-2.0.0.tar.gz"}"#),
        ..C2dMessage::default()
    }
}

fn device_id(i: usize) -> String {
    format!("fridge-{i:05}")
}

/// `c2d_queue`: one message through send → receive (lock) → complete, and a full queue of 50
/// sent then drained; the peer pushes and pops the same message struct in a bare `VecDeque`.
fn c2d_queue(c: &mut Criterion) {
    let cfg = QueueConfig::default();
    assert_eq!(cfg.max_depth, QUEUE_DEPTH, "drain_50 fills exactly one IoT Hub queue");
    let msg = c2d_message();
    let mut g = c.benchmark_group("c2d_queue");

    let mut queue = DeviceQueue::new();
    let mut outcomes = Vec::new();
    let mut token = 0u128;
    // The clones are made outside the timing (iter_batched): the hub receives an owned message.
    // Dropping it on completion is timed in both, so each side does the same allocator work.
    g.bench_function("send_receive_complete", |b| {
        b.iter_batched(
            || msg.clone(),
            |m| {
                token += 1;
                queue.send(m, NOW_MS, &cfg, &mut outcomes).expect("send");
                let d =
                    queue.receive(NOW_MS, 60_000, LockToken(token), &cfg, &mut outcomes).expect("message");
                queue.complete(d.lock_token, NOW_MS, &cfg, &mut outcomes).expect("complete");
                outcomes.clear();
                black_box(d.sequence_number);
            },
            BatchSize::SmallInput,
        )
    });
    assert!(queue.is_empty(), "every message was completed");

    let mut peer: VecDeque<C2dMessage> = VecDeque::new();
    g.bench_function("peer_vecdeque_push_pop", |b| {
        b.iter_batched(
            || msg.clone(),
            |m| {
                peer.push_back(m);
                drop(black_box(peer.pop_front().expect("a message")));
            },
            BatchSize::SmallInput,
        )
    });

    let full_queue = || vec![msg.clone(); QUEUE_DEPTH];
    g.bench_function("drain_50", |b| {
        b.iter_batched(
            full_queue,
            |batch| {
                for m in batch {
                    queue.send(m, NOW_MS, &cfg, &mut outcomes).expect("send");
                }
                for _ in 0..QUEUE_DEPTH {
                    token += 1;
                    let d = queue
                        .receive(NOW_MS, 60_000, LockToken(token), &cfg, &mut outcomes)
                        .expect("message");
                    queue.complete(d.lock_token, NOW_MS, &cfg, &mut outcomes).expect("complete");
                }
                outcomes.clear();
            },
            BatchSize::SmallInput,
        )
    });
    assert!(queue.is_empty(), "every message was completed");

    g.bench_function("peer_vecdeque_drain_50", |b| {
        b.iter_batched(
            full_queue,
            |batch| {
                peer.extend(batch);
                while let Some(m) = peer.pop_front() {
                    drop(black_box(m));
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// A hub with [`HUB_DEVICES`] registered devices (generated keys).
fn hub_with_devices() -> Hub {
    let hub = Hub::new(HubConfig::default());
    for i in 0..HUB_DEVICES {
        hub.put_device(&device_id(i), DeviceInput::default(), None).expect("register");
    }
    hub
}

/// `sas`: a device token parsed and verified against the device key, the same token through
/// `Hub::authenticate_device`, and a `service` policy token through `Hub::authenticate_service`;
/// the peer is the bare HMAC-SHA256 over the same string-to-sign with an already-decoded key.
fn sas_tokens(c: &mut Criterion, hub: &Hub) {
    let id = device_id(4242);
    let key_b64 = hub.device_primary_key(&id).expect("device").expect("a SAS key");
    let se = hub.now() / 1000 + 3600;
    let resource = format!("{}/devices/{id}", hub.hostname());
    let token = sas::make_token(&resource, &key_b64, None, se).expect("device token");
    let parsed = SasToken::parse(&token).expect("parse");
    assert!(parsed.verify(&key_b64), "the device token verifies");
    let policy = hub.policies().iter().find(|p| p.name == "service").expect("service policy");
    let policy_token =
        sas::make_token(hub.hostname(), &policy.primary_key, Some("service"), se).expect("token");
    hub.authenticate_service(&policy_token, Rights::SERVICE_CONNECT).expect("policy token accepted");

    let key = STANDARD.decode(&key_b64).expect("base64 key");
    let signature = STANDARD.decode(&parsed.signature).expect("base64 signature");
    let string_to_sign = format!("{}\n{}", parsed.resource_raw, parsed.expiry_secs);

    let mut g = c.benchmark_group("sas");
    g.bench_function("device_token_parse_verify", |b| {
        b.iter(|| {
            let t = SasToken::parse(black_box(&token)).expect("parse");
            assert!(t.verify(black_box(&key_b64)));
        })
    });
    g.bench_function("hub_authenticate_device", |b| {
        b.iter(|| black_box(hub.authenticate_device(black_box(&token), &id).expect("device token")))
    });
    g.bench_function("hub_authenticate_service_policy", |b| {
        b.iter(|| {
            black_box(
                hub.authenticate_service(black_box(&policy_token), Rights::SERVICE_CONNECT).expect("ok"),
            )
        })
    });
    g.bench_function("peer_hmac_sha256", |b| {
        b.iter(|| {
            let mut mac = Hmac::<Sha256>::new_from_slice(black_box(&key)).expect("any key length");
            mac.update(black_box(string_to_sign.as_bytes()));
            assert!(mac.verify_slice(&signature).is_ok());
        })
    });
    g.finish();
}

/// `mqtt_topic`: the C2D PUBLISH topic with IoT Hub's property bag (system properties, ack,
/// application properties, URL-encoded) and a D2C telemetry topic parsed into its bag; the peers
/// `format!` and `split` the same topics with nothing to escape or decode.
fn mqtt_topic(c: &mut Criterion) {
    let id = device_id(42);
    let cfg = QueueConfig::default();
    let mut queue = DeviceQueue::new();
    let mut out = Vec::new();
    queue.send(c2d_message(), NOW_MS, &cfg, &mut out).expect("send");
    let delivery = queue.receive(NOW_MS, 60_000, LockToken(1), &cfg, &mut out).expect("delivery");
    let m = &delivery.message;
    let exp = iothub_emulator::clock::iso8601(m.expiry.expect("expiry"));
    let (mid, cid) = (m.message_id.as_deref().unwrap_or(""), m.correlation_id.as_deref().unwrap_or(""));
    let (ct, ce) = (m.content_type.as_deref().unwrap_or(""), m.content_encoding.as_deref().unwrap_or(""));
    let props = &m.properties;
    let peer_topic = || {
        format!(
            "devices/{id}/messages/devicebound/$.mid={mid}&$.cid={cid}&$.to=/devices/{id}/messages/devicebound\
             &$.ct={ct}&$.ce={ce}&$.exp={exp}&iothub-ack={}&{}={}&{}={}",
            m.ack.as_str(),
            props[0].0,
            props[0].1,
            props[1].0,
            props[1].1
        )
    };
    let ours = topics::c2d_topic(&id, &delivery);
    let decoded: String = percent_encoding::percent_decode_str(&ours).decode_utf8().expect("utf-8").into();
    assert_eq!(decoded, peer_topic(), "the peer writes the same topic, unescaped");

    let escaped = format!(
        "devices/{id}/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8&%24.mid=t-1&temperature=21.5&unit=%C2%B0C&alert"
    );
    let plain = format!(
        "devices/{id}/messages/events/$.ct=application/json&$.ce=utf-8&$.mid=t-1&temperature=21.5&unit=°C&alert"
    );
    let peer_parse = |topic: &str| -> Option<Vec<(String, Option<String>)>> {
        let bag =
            topic.strip_prefix("devices/")?.strip_prefix(id.as_str())?.strip_prefix("/messages/events/")?;
        Some(
            bag.split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                    None => (kv.to_owned(), None),
                })
                .collect(),
        )
    };
    let DeviceTopic::Telemetry(bag) = topics::parse_publish_topic(&id, &escaped).expect("telemetry") else {
        panic!("a telemetry topic");
    };
    assert_eq!(Some(bag), peer_parse(&plain), "the peer splits the same bag, unescaped");

    let mut g = c.benchmark_group("mqtt_topic");
    g.bench_function("c2d_topic_encode", |b| {
        b.iter(|| topics::c2d_topic(black_box(&id), black_box(&delivery)))
    });
    g.bench_function("peer_c2d_topic_format", |b| b.iter(peer_topic));
    g.bench_function("d2c_topic_parse", |b| {
        b.iter(|| topics::parse_publish_topic(black_box(&id), black_box(&escaped)).expect("telemetry"))
    });
    g.bench_function("peer_d2c_topic_split", |b| {
        b.iter(|| peer_parse(black_box(&plain)).expect("telemetry"))
    });
    g.finish();
}

/// The transfer performative of delivery `id` on link handle 2 (settled = false).
fn transfer_performative(id: u32) -> Value {
    list(
        code::TRANSFER,
        vec![
            Value::Uint(2),
            Value::Uint(id),
            Value::Binary(id.to_be_bytes().to_vec()),
            Value::Uint(0),
            Value::Bool(false),
        ],
    )
}

/// `amqp`: one C2D transfer frame as a service SDK sends it (message id, `to`, `iothub-ack`,
/// one property, a data body) decoded (frame, performative, message sections) and encoded
/// (message sections, performative, frame); the peer copies the same bytes into a new `Vec`.
fn amqp_transfer(c: &mut Criterion) {
    let msg = Message {
        properties: Properties {
            message_id: Some(Value::str("release-2.0.0-fridge-00042")),
            to: Some(format!("/devices/{}/messages/devicebound", device_id(42))),
            content_type: Some("application/json".into()),
            ..Properties::default()
        },
        application_properties: vec![
            ("iothub-ack".into(), Value::str("full")),
            ("release".into(), Value::str("2.0.0")),
        ],
        body: Body::Data(br#"{"version":"2.0.0","url":"ftp://localhost/fridge-2.0.0.tar.gz"}"#.to_vec()),
        ..Message::default()
    };
    let encode = |m: &Message| {
        let mut out = Vec::new();
        frame::write_frame(&mut out, FRAME_AMQP, 0, &transfer_performative(7), &m.encode());
        out
    };
    let decode = |mut buf: Vec<u8>| {
        let f = frame::parse_frame(&mut buf, amqp::MAX_FRAME_BYTES).expect("frame").expect("a whole frame");
        let (perf, fields) = frame::described_list(f.body.as_ref().expect("performative")).expect("list");
        assert_eq!((perf, fields.u32(1)), (code::TRANSFER, Some(7)));
        Message::decode(&f.payload).expect("message")
    };
    let wire = encode(&msg);
    let back = decode(wire.clone());
    assert_eq!(back, msg, "the codec round-trips the transfer");
    let (device, c2d) = message::to_c2d(back.clone()).expect("a C2D message");
    assert_eq!((device.as_str(), c2d.ack), ("fridge-00042", AckMode::Full));

    let mut g = c.benchmark_group("amqp");
    g.bench_function("decode_transfer", |b| {
        b.iter_batched(|| wire.clone(), |buf| decode(black_box(buf)), BatchSize::SmallInput)
    });
    g.bench_function("encode_transfer", |b| b.iter(|| encode(black_box(&msg))));
    g.bench_function("peer_copy_frame_bytes", |b| {
        b.iter(|| {
            let mut v = Vec::with_capacity(wire.len());
            v.extend_from_slice(black_box(&wire));
            v
        })
    });
    g.finish();
}

/// Times `op(state, i, message)` for `iters` calls spread over the [`HUB_DEVICES`] devices (call
/// `i` goes to device `i % HUB_DEVICES`) with a clone of `msg` made before the clock starts, then
/// runs `reset(state)` untimed after each pass over every device so that no device's queue ever
/// reaches IoT Hub's depth of 50.
fn timed_passes<S>(
    iters: u64,
    msg: &C2dMessage,
    state: &mut S,
    mut op: impl FnMut(&mut S, usize, C2dMessage),
    mut reset: impl FnMut(&mut S),
) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let pass = left.min(HUB_DEVICES as u64) as usize;
        let batch = vec![msg.clone(); pass];
        let started = Instant::now();
        for (i, m) in batch.into_iter().enumerate() {
            op(state, i, m);
        }
        total += started.elapsed();
        reset(state);
        left -= pass as u64;
    }
    total
}

/// `hub`: `Hub::send_c2d` to one of 10,000 registered devices (ack `none`, so no feedback
/// records pile up), a service twin PATCH of one desired property and a device's reported patch
/// of one property; peers: a `HashMap<String, VecDeque<C2dMessage>>` push and a
/// `HashMap<String, Map>` insert.
fn hub_ops(c: &mut Criterion, hub: &Hub) {
    let ids: Vec<String> = (0..HUB_DEVICES).map(device_id).collect();
    let msg = C2dMessage { ack: AckMode::None, ..c2d_message() };
    let mut peer: HashMap<String, VecDeque<C2dMessage>> =
        ids.iter().map(|id| (id.clone(), VecDeque::new())).collect();

    let mut g = c.benchmark_group("hub");
    g.bench_function("send_c2d_10k_devices", |b| {
        b.iter_custom(|iters| {
            timed_passes(
                iters,
                &msg,
                &mut (),
                |_, i, m| {
                    black_box(hub.send_c2d(&ids[i], m).expect("queued"));
                },
                |_| {
                    for id in &ids {
                        hub.purge_c2d(id).expect("device");
                    }
                },
            )
        })
    });
    g.bench_function("peer_hashmap_vecdeque_push", |b| {
        b.iter_custom(|iters| {
            timed_passes(
                iters,
                &msg,
                &mut peer,
                |peer, i, m| peer.get_mut(ids[i].as_str()).expect("device").push_back(m),
                |peer| peer.values_mut().for_each(VecDeque::clear),
            )
        })
    });

    let patches = [
        json!({"properties": {"desired": {"firmware": "2.0.0"}}}),
        json!({"properties": {"desired": {"firmware": "2.0.1"}}}),
    ];
    let (_, notice) = hub.update_twin(&ids[0], &patches[1], None, false).expect("twin patch");
    assert!(notice.is_some(), "a desired change is announced to the device");
    let mut turn = 0usize;
    g.bench_function("twin_patch_desired_10k_devices", |b| {
        b.iter(|| {
            turn += 1;
            let id = &ids[turn % HUB_DEVICES];
            black_box(hub.update_twin(id, &patches[turn / HUB_DEVICES % 2], None, false).expect("patched"))
        })
    });
    // A device's reported patch (MQTT `$iothub/twin/PATCH/properties/reported`), as the fleet sends
    // while installing; same peer.
    let reported = [json!({"installState": "downloading"}), json!({"installState": "installed"})];
    g.bench_function("twin_patch_reported_10k_devices", |b| {
        b.iter(|| {
            turn += 1;
            let id = &ids[turn % HUB_DEVICES];
            black_box(hub.patch_reported(id, &reported[turn / HUB_DEVICES % 2]).expect("patched"))
        })
    });
    let values = patches.each_ref().map(|p| p["properties"]["desired"]["firmware"].clone());
    let mut desired: HashMap<String, serde_json::Map<String, serde_json::Value>> =
        ids.iter().map(|id| (id.clone(), serde_json::Map::new())).collect();
    g.bench_function("peer_hashmap_insert_property", |b| {
        b.iter(|| {
            turn += 1;
            let d = desired.get_mut(ids[turn % HUB_DEVICES].as_str()).expect("device");
            black_box(d.insert("firmware".into(), values[turn / HUB_DEVICES % 2].clone()))
        })
    });
    g.finish();
}

fn hub_paths(c: &mut Criterion) {
    let hub = hub_with_devices();
    sas_tokens(c, &hub);
    hub_ops(c, &hub);
}

criterion_group! {
    name = hot_paths;
    // Short windows keep a full run near two minutes on two shared cores; flags given after `--`
    // (`--measurement-time`, `--quick`, ...) override these.
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = c2d_queue, mqtt_topic, amqp_transfer, hub_paths
}
criterion_main!(hot_paths);
