//! Benchmark: N simulated devices install one package at once from the hub's embedded FTP server,
//! everything in one process on loopback (hub on port 0). Prints one JSON line: wall time,
//! installs per second, aggregate MB/s, install latency percentiles and peak RSS.
//!
//! `cargo run --release -p iothub-emulator-tests --example ftp_install_bench -- [devices]
//! [package_kib] [max_sessions] [ftps]` (defaults 200 devices, 256 KiB, a session cap of
//! `devices`, plain FTP; a lower cap makes devices meet `421` and retry with backoff; `ftps`
//! upgrades every session with `AUTH TLS`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use iothub_emulator::ftp::FtpConfig;
use iothub_emulator::server::{ListenConfig, RunningHub};
use iothub_emulator::{HubConfig, hub::DeviceInput};
use iothub_emulator_tests::{incompressible, unique};
use simulated_devices::install::{
    Credentials, FtpSource, InstallState, Installer, RetryPolicy, tls_trusting,
};
use simulated_devices::package::{self, Manifest};

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let devices: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);
    let package_kib: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(256);
    let max_sessions: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(devices.max(1));
    let ftps = args.next().is_some_and(|a| a == "ftps");
    let dir = std::env::temp_dir().join(unique("ftp-bench"));
    let listen = ListenConfig {
        https_port: 0,
        http_port: 0,
        mqtt_port: 0,
        ftp_port: Some(0),
        ..ListenConfig::default()
    };
    let ftp = FtpConfig { max_sessions, ..FtpConfig::new(dir.join("packages")) };
    let hub = RunningHub::start_with_ftp(HubConfig::default(), &listen, &dir, ftp).await?;

    let src = dir.join("app");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("blob.bin"), incompressible(package_kib * 1024))?;
    let manifest = Manifest { name: "bench".into(), version: "1".into(), self_test: None };
    let release = package::publish(&src, Some(&manifest), &hub.packages_dir)?;

    let tls = ftps.then(|| tls_trusting(&hub.ca_pem)).transpose().map_err(anyhow::Error::msg)?;
    let ftp_addr = hub.ftp_addr.context("FTP is off")?.to_string();
    let mut installers = Vec::with_capacity(devices);
    for i in 0..devices {
        let id = format!("bench-{i:05}");
        hub.hub
            .put_device(&id, DeviceInput::default(), None)
            .map_err(|e| anyhow::anyhow!("creating {id}: {e}"))?;
        let key = hub.hub.device_primary_key(&id).map_err(|e| anyhow::anyhow!("{e}"))?.context("no key")?;
        let source = FtpSource {
            addr: ftp_addr.clone(),
            device_id: id.clone(),
            credentials: Credentials::Key { hostname: hub.hub.hostname().to_string(), key },
            step_timeout: Duration::from_secs(30),
            tls: tls.clone().map(|c| (c, hub.hub.hostname().to_string())),
        };
        let retry = RetryPolicy { max_attempts: 20, ..RetryPolicy::default() };
        installers.push(Installer::new(dir.join("devices").join(&id), source).with_retry(retry));
    }

    let started = Instant::now();
    let tasks: Vec<_> = installers
        .into_iter()
        .map(|inst| {
            let release = release.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let mut reasons = Vec::new();
                let out = inst.install(&release, |r| reasons.extend(r.reason)).await;
                (out, t.elapsed(), reasons)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(devices);
    let mut retries = 0;
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        let (out, took, why) = t.await?;
        for r in why {
            // Group retry reasons by their step (the text before the first ':' of the cause).
            let key = r.split_once('(').map_or(r.as_str(), |(_, c)| c).chars().take(60).collect();
            *reasons.entry(key).or_default() += 1;
        }
        if out.state != InstallState::Installed {
            bail!("an install ended {:?}: {:?}", out.state, out.reason);
        }
        retries += out.download_attempts - 1;
        latencies.push(took);
    }
    let wall = started.elapsed();
    latencies.sort();
    let pct =
        |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0;
    let bytes = release.size as f64 * devices as f64;
    println!(
        "{}",
        serde_json::json!({
            "devices": devices,
            "ftp_max_sessions": max_sessions,
            "ftps": ftps,
            "package_bytes": release.size,
            "wall_s": wall.as_secs_f64(),
            "installs_per_s": devices as f64 / wall.as_secs_f64(),
            "aggregate_mb_per_s": bytes / 1e6 / wall.as_secs_f64(),
            "install_ms_p50": pct(0.5),
            "install_ms_p99": pct(0.99),
            "install_ms_max": pct(1.0),
            "download_retries": retries,
            "retry_reasons": reasons,
            "peak_rss_mib": peak_rss_kib() as f64 / 1024.0,
        })
    );
    hub.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The process's peak resident set (VmHWM), in KiB; 0 where /proc is missing.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}
