//! Benchmark: the release command's send phase, AMQP against REST. One hub on loopback (port 0),
//! N registered devices; for each protocol, `notify_devices` sends every device an update notice
//! with `iothub-ack: full` (feedback is not waited for). Prints one JSON line per protocol: the
//! time of one device query alone, the whole run (query, connect, every send settled) and
//! notices per second over the whole run.
//!
//! `cargo run --release -p iothub-emulator-tests --example release_bench -- [devices]
//! [in_flight]` (defaults 10,000 devices, 64 notices in flight).

use std::time::{Duration, Instant};

use anyhow::Result;
use iothub_emulator::server::{ListenConfig, RunningHub};
use iothub_emulator::{HubConfig, hub::DeviceInput};
use iothub_emulator_tests::unique;
use simulated_devices::amqp_client::AmqpEndpoint;
use simulated_devices::notice::UpdateNotice;
use simulated_devices::release::{ReleaseOptions, notify_devices};
use simulated_devices::service_client::ServiceClient;

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let devices: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(10_000);
    let in_flight: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
    let dir = std::env::temp_dir().join(unique("release-bench"));
    let listen = ListenConfig::ephemeral(std::net::IpAddr::from([127, 0, 0, 1]));
    let hub = RunningHub::start(HubConfig::default(), &listen, &dir).await?;
    for i in 0..devices {
        let id = format!("bench-{i:05}");
        hub.hub.put_device(&id, DeviceInput::default(), None).map_err(|e| anyhow::anyhow!("{id}: {e}"))?;
    }
    let https = format!("https://127.0.0.1:{}", hub.https_addr.port());
    let svc = ServiceClient::new(&hub.owner_connection_string(), &https, Some(&hub.ca_pem))?;
    let notice = UpdateNotice {
        version: "2.0.0".into(),
        url: "ftp://127.0.0.1:2121/app-2.0.0.tar.gz".into(),
        sha256: "00".repeat(32),
        size: 1,
        name: None,
    };
    let t = Instant::now();
    let listed = svc.device_ids(None).await?.len();
    let query_ms = t.elapsed().as_millis();
    let amqp = AmqpEndpoint {
        addr: hub.amqp_addr,
        server_name: hub.hub.hostname().to_string(),
        ca_pem: hub.ca_pem.clone(),
    };
    for (via, endpoint) in [("amqp", Some(amqp)), ("rest", None)] {
        let opts = ReleaseOptions {
            timeout: Duration::ZERO,
            send_concurrency: in_flight,
            amqp: endpoint,
            ..ReleaseOptions::default()
        };
        let t = Instant::now();
        let s = notify_devices(&svc, &notice, &opts).await?;
        let total_ms = t.elapsed().as_millis().max(1);
        println!(
            "{{\"via\":\"{via}\",\"devices\":{listed},\"in_flight\":{in_flight},\"sent\":{},\"send_failed\":{},\"query_ms\":{query_ms},\"total_ms\":{total_ms},\"notices_per_s\":{:.0}}}",
            s.sent,
            s.send_failed,
            s.sent as f64 * 1000.0 / total_ms as f64
        );
    }
    hub.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
