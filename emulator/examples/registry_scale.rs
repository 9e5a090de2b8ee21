//! Registry and C2D fan-out at scale, in-process: registers N devices, sends every device one C2D
//! message, counts them with a query, then sets a desired property on every device twice: once
//! with a `scheduleUpdateTwin` job (the jobs API's task, paging through the query engine) and once
//! with a plain loop of `Hub::update_twin` calls, the floor the job driver adds to. Prints the time
//! and resident memory per device for each step, beside a peer in the same run: the same ids and
//! keys in a bare `BTreeMap`, the least any registry must hold.
//!
//! `cargo run --release -p iothub-emulator --example registry_scale -- 1000000`

use std::time::{Duration, Instant};

use bytes::Bytes;
use iothub_emulator::c2d::{AckMode, C2dMessage};
use iothub_emulator::hub::{DeviceInput, Hub, HubConfig};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn report(step: &str, n: usize, started: Instant, rss_before: u64) {
    let secs = started.elapsed().as_secs_f64();
    let rss = rss_kib();
    let per = (rss.saturating_sub(rss_before) as f64 * 1024.0) / n as f64;
    println!(
        "{step:<34} {n:>9} in {secs:>7.2} s  {:>10.0}/s  rss {:>8.1} MiB  +{per:>6.0} B/device",
        n as f64 / secs,
        rss as f64 / 1024.0
    );
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let base = rss_kib();

    let t = Instant::now();
    let mut peer = std::collections::BTreeMap::new();
    for i in 0..n {
        peer.insert(
            format!("fridge-{i:07}"),
            (iothub_emulator::sas::generate_key(), iothub_emulator::sas::generate_key()),
        );
    }
    report("peer: BTreeMap<id, (key, key)>", n, t, base);
    drop(peer);

    let hub = Hub::new(HubConfig::default());
    let before = rss_kib();
    let t = Instant::now();
    for i in 0..n {
        let id = format!("fridge-{i:07}");
        hub.put_device(&id, DeviceInput::default(), None).expect("register");
    }
    report("hub: register devices", n, t, before);

    let before = rss_kib();
    let t = Instant::now();
    let body = Bytes::from_static(br#"{"version":"2.0.0","url":"ftp://localhost/app-2.0.0.tar.gz"}"#);
    for i in 0..n {
        let msg = C2dMessage {
            message_id: Some(format!("release-2-{i}")),
            ack: AckMode::Full,
            body: body.clone(),
            ..C2dMessage::default()
        };
        hub.send_c2d(&format!("fridge-{i:07}"), msg).expect("send");
    }
    report("hub: send one C2D to every device", n, t, before);

    let t = Instant::now();
    let page = hub
        .query("SELECT COUNT() AS n FROM devices WHERE cloudToDeviceMessageCount = 1", None, None)
        .unwrap();
    report("hub: COUNT query over all twins", n, t, rss_kib());
    println!("count result: {}", page.items[0]);

    // The same desired patch through a job, then through a loop of direct calls (the floor).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let before = rss_kib();
    let t = Instant::now();
    let job = runtime.block_on(async {
        let request = serde_json::json!({
            "type": "scheduleUpdateTwin",
            "updateTwin": { "etag": "*", "properties": { "desired": { "firmware": "2.0.0" } } },
            "queryCondition": "cloudToDeviceMessageCount = 1",
            "maxExecutionTimeInSeconds": 3600,
        });
        hub.create_job("set-firmware", &request).expect("create job");
        loop {
            let job = hub.get_job("set-firmware").expect("get job");
            if !matches!(job["status"].as_str(), Some("scheduled" | "queued" | "running")) {
                break job;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    report("hub: scheduleUpdateTwin job, all", n, t, before);
    println!("job result: status {} statistics {}", job["status"], job["deviceJobStatistics"]);

    let t = Instant::now();
    let patch = serde_json::json!({ "properties": { "desired": { "firmware": "2.0.1" } } });
    for i in 0..n {
        hub.update_twin(&format!("fridge-{i:07}"), &patch, None, false).expect("patch");
    }
    report("floor: update_twin loop, all", n, t, rss_kib());
}
