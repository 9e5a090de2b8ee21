//! Bytes per in-process device, counted by the allocator: the hub core and N in-process devices
//! (`simulated_devices::inprocess`) in this process under a global allocator that keeps the live
//! heap. Snapshots: after registering the devices (registry, keys, twins), once every device is
//! connected and subscribed and has reported its version (the hub's session and link, the agent,
//! the first reported properties), and after each got one update notice, installed it and
//! reported the new version (queues emptied, reported properties rewritten). RSS is printed
//! beside the live heap; the hub keeps its default telemetry ring (10,000 messages) throughout.
//!
//! ```text
//! cargo run --release -p testbench --example inprocess_alloc -- 100000
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use iothub_emulator::Hub;
use iothub_emulator::c2d::{AckMode, C2dMessage};
use iothub_emulator::hub::{DeviceInput, HubConfig};
use serde_json::Value;
use simulated_devices::inprocess::{InProcessConfig, InProcessFleet, MemoryPackages};
use simulated_devices::notice::UpdateNotice;
use simulated_devices::package::{Manifest, build_package};

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const KEY: &str = "aW5wcm9jZXNzLWFsbG9jLWV4YW1wbGUta2V5";

fn rss_kib() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Snapshot {
    live: i64,
    rss_kib: i64,
}

impl Snapshot {
    fn now() -> Self {
        Self { live: LIVE.load(Ordering::Relaxed), rss_kib: rss_kib() }
    }

    fn report(&self, before: &Snapshot, what: &str, n: usize) {
        let per = |d: i64| d as f64 / n as f64;
        println!(
            "{what:<52} live heap {:+8.0} B/device   RSS {:+8.0} B/device",
            per(self.live - before.live),
            per((self.rss_kib - before.rss_kib) * 1024)
        );
    }
}

async fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn reporting(hub: &Hub, ids: &[String], version: &str) -> usize {
    ids.iter()
        .filter(|id| hub.reported_property(id, "appVersion") == Some(Value::String(version.into())))
        .count()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let n: usize = std::env::args().nth(1).map(|a| a.parse()).transpose().context("N")?.unwrap_or(100_000);
    let start = Snapshot::now();
    let hub = Hub::new(HubConfig::default());
    let ids: Arc<[String]> = (0..n).map(|i| format!("fridge-{i:07}")).collect();
    for id in ids.iter() {
        let key = simulated_devices::fleet::device_key(KEY, id);
        let input =
            DeviceInput { primary_key: Some(key.clone()), secondary_key: Some(key), ..Default::default() };
        hub.put_device(id, input, None).context("register")?;
    }
    let registered = Snapshot::now();
    registered.report(&start, "registered (registry, keys, twin, id list)", n);

    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("firmware.bin"), vec![7u8; 1024])?;
    let manifest = Manifest { name: "app".into(), version: "2.0.0".into(), self_test: None };
    let (_, path, release) = build_package(&src, Some(&manifest), &tmp.path().join("out"))?;
    let packages = MemoryPackages::new();
    packages.add(&release.file, std::fs::read(path)?)?;
    let notice = serde_json::to_vec(&UpdateNotice::for_release(&release, "in-process"))?;

    let cfg =
        InProcessConfig { initial_version: Some("1.0.0".into()), ..InProcessConfig::new(ids.clone(), KEY) };
    let fleet = InProcessFleet::start(hub.clone(), cfg, packages);
    until("every device connected", Duration::from_secs(600), || {
        fleet.connected() == n && fleet.unsettled() == 0
    })
    .await?;
    until("every twin reporting 1.0.0", Duration::from_secs(600), || reporting(&hub, &ids, "1.0.0") == n)
        .await?;
    let connected = Snapshot::now();
    connected.report(&registered, "connected, subscribed, v1 reported (session, agent)", n);

    for id in ids.iter() {
        let msg = C2dMessage {
            message_id: Some(format!("release-{id}")),
            ack: AckMode::Full,
            body: notice.clone().into(),
            ..C2dMessage::default()
        };
        hub.send_c2d(id, msg).context("send")?;
    }
    until("every twin reporting 2.0.0", Duration::from_secs(600), || reporting(&hub, &ids, "2.0.0") == n)
        .await?;
    let installed = Snapshot::now();
    installed.report(&connected, "one notice each, installed, v2 reported", n);
    installed.report(&start, "total", n);
    println!(
        "devices {n}; live heap {:.1} MiB, RSS {:.1} MiB at the end; installs {}",
        installed.live as f64 / 1048576.0,
        installed.rss_kib as f64 / 1024.0,
        (0..n).map(|i| fleet.installs(i) as u64).sum::<u64>()
    );
    fleet.stop().await;
    Ok(())
}
