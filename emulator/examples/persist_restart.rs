//! Restart time of a durable hub (`--persist`, issue 15): fills a state directory with N
//! registered devices and one queued C2D message each, closes the hub, then times recovery twice:
//! from the log as written, and from a snapshot (what a hub that ran a while restarts from). Prints
//! fill rates, bytes on disk, recovery time and resident memory; checks that every device and
//! message is back.
//!
//! `cargo run --release -p iothub-emulator --example persist_restart -- 1000000 [--dir DIR] [--keep]`
//!
//! With `--keep` the directory stays (`DIR/state`), so the real binary's restart can be timed on
//! it: `iothub-emulator --persist --data-dir DIR ...` until `GET /health` answers 200.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use iothub_emulator::c2d::{AckMode, C2dMessage};
use iothub_emulator::clock::SystemClock;
use iothub_emulator::hub::{DeviceInput, Hub, HubConfig};
use iothub_emulator::persist::{PersistConfig, SyncMode};

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

fn open(persist: &PersistConfig) -> (Hub, iothub_emulator::hub::Recovered, f64) {
    let t = Instant::now();
    let (hub, recovered) =
        Hub::open_persistent(HubConfig::default(), Arc::new(SystemClock), persist).expect("the state opens");
    (hub, recovered, t.elapsed().as_secs_f64())
}

fn check(hub: &Hub, n: usize) {
    assert_eq!(hub.device_count(), n, "every device is back");
    for i in [0, n / 2, n - 1] {
        let d = hub.get_device(&format!("fridge-{i:07}")).expect("a recovered device");
        assert_eq!(d["cloudToDeviceMessageCount"], 1, "its message is back");
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut n = 100_000usize;
    let mut dir = None;
    let mut keep = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => dir = args.next().map(PathBuf::from),
            "--keep" => keep = true,
            other => n = other.replace('_', "").parse().expect("N devices"),
        }
    }
    let tmp = tempfile_dir(dir);
    let persist = PersistConfig { dir: tmp.join("state"), sync: SyncMode::Write };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");

    let (hub, _, _) = open(&persist);
    let t = Instant::now();
    for i in 0..n {
        hub.put_device(&format!("fridge-{i:07}"), DeviceInput::default(), None).expect("register");
    }
    let reg = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..n {
        let msg = C2dMessage {
            message_id: Some(format!("m-{i}")),
            ack: AckMode::Full,
            body: Bytes::from_static(b"{\"command\":\"defrost\",\"minutes\":20}"),
            ..Default::default()
        };
        hub.send_c2d(&format!("fridge-{i:07}"), msg).expect("send");
    }
    runtime.block_on(hub.durable_all()).expect("written");
    let send = t.elapsed().as_secs_f64();
    println!(
        "fill: {n} devices registered in {reg:.2} s ({:.0}/s), {n} C2D sent and written in {send:.2} s ({:.0}/s); log {:.1} MiB; rss {:.0} MiB",
        n as f64 / reg,
        n as f64 / send,
        dir_bytes(&persist.dir) as f64 / 1048576.0,
        rss_mib()
    );
    hub.close_persistence();
    drop(hub);

    let rss0 = rss_mib();
    let (hub, recovered, secs) = open(&persist);
    println!(
        "restart from the log:      {secs:.2} s  ({} records, {:.1} MiB read; rss {:.0} MiB, +{:.0} B/device)",
        recovered.replayed.records,
        recovered.replayed.bytes as f64 / 1048576.0,
        rss_mib(),
        (rss_mib() - rss0) * 1048576.0 / n as f64
    );
    check(&hub, n);
    let stats = hub.snapshot().expect("persistent").expect("snapshot written");
    println!(
        "snapshot:                  {:.2} s  ({} records, {:.1} MiB)",
        stats.elapsed.as_secs_f64(),
        stats.records,
        stats.bytes as f64 / 1048576.0
    );
    hub.close_persistence();
    drop(hub);

    let (hub, recovered, secs) = open(&persist);
    println!(
        "restart from the snapshot: {secs:.2} s  ({} records, {:.1} MiB read; rss {:.0} MiB)",
        recovered.replayed.records,
        recovered.replayed.bytes as f64 / 1048576.0,
        rss_mib()
    );
    check(&hub, n);
    hub.close_persistence();
    drop(hub);
    if keep {
        println!("state kept in {}", persist.dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&tmp);
    }
}

/// `dir`, or a new directory under the system's temporary directory.
fn tempfile_dir(dir: Option<PathBuf>) -> PathBuf {
    let dir =
        dir.unwrap_or_else(|| std::env::temp_dir().join(format!("persist-restart-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(dir.join("state"));
    std::fs::create_dir_all(&dir).expect("the directory");
    dir
}
