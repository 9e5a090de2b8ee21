//! The hub's memory after a hostile-client run (issue 11): every crash input, over every transport,
//! many times, plus malformed MQTT and oversize publishes, must leave the hub serving with its
//! resident memory within 20% of what it was before. A test binary of its own, so the process's
//! RSS is the hub's (and this one client's), not that of a hundred tests running beside it.

use iothub_emulator::limits::D2C_MAX_MESSAGE_BYTES;
use iothub_emulator_tests::hostile;
use iothub_emulator_tests::{TestHub, unique};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, Publish};

/// Resident set size of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

async fn one_round(hub: &TestHub, device: &str, key: &str) {
    for (what, input) in hostile::amqp_crash_inputs() {
        hostile::amqp_tls_attack(hub, &input).await.unwrap_or_else(|e| panic!("{what}: {e:#}"));
        hostile::amqp_ws_attack(hub, true, &input).await.unwrap_or_else(|e| panic!("{what}: {e:#}"));
        hostile::amqp_ws_attack(hub, false, &input).await.unwrap_or_else(|e| panic!("{what}: {e:#}"));
    }
    let mut publish = Publish::new(
        format!("devices/{device}/messages/events/"),
        QoS::AtLeastOnce,
        vec![1u8; D2C_MAX_MESSAGE_BYTES + 1],
    );
    publish.pkid = 1;
    let oversize = hostile::packet_bytes(Packet::Publish(publish));
    for bytes in [oversize, vec![0xa2, 0x01, 0x00], vec![0x80, 0x02, 0x00, 0x01]] {
        let mut s = hostile::mqtt_connected(hub, device, key, 60).await.unwrap();
        assert!(hostile::send_until_closed(&mut s, &bytes).await.unwrap().is_empty());
    }
    hostile::assert_healthy(hub).await.unwrap();
    hostile::assert_amqp_opens(hub).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_keeps_serving_with_its_memory_within_20_percent_after_a_hostile_run() {
    let hub = TestHub::start().await.unwrap();
    let device = unique("rss");
    let key = hub.create_device(&device).await.unwrap();
    // Warm up: one legitimate exchange of each kind, so lazily built state (TLS session caches,
    // worker stacks, the allocator's arenas) is part of "before".
    hostile::assert_healthy(&hub).await.unwrap();
    hostile::assert_amqp_opens(&hub).await.unwrap();
    drop(hostile::mqtt_connected(&hub, &device, &key, 60).await.unwrap());
    one_round(&hub, &device, &key).await;
    let before = rss_kib();
    for _ in 0..10 {
        one_round(&hub, &device, &key).await;
    }
    let after = rss_kib();
    eprintln!("RSS before {before} KiB, after 10 hostile rounds {after} KiB");
    assert!(
        after * 100 <= before * 120,
        "RSS grew from {before} KiB to {after} KiB (more than 20%) over 10 hostile rounds"
    );
    assert!(hub.running.hub.read_telemetry(Some(&device), 0, 10).is_empty());
    hub.stop().await.unwrap();
}
