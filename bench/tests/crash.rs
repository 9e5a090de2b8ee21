//! Crash consistency of C2D (issue 15): the real `iothub-emulator` binary as a child process with
//! `--persist` is killed with SIGKILL at seeded points during a fan-out, restarted on the same data
//! directory and ports, and every send the hub acknowledged (REST `204` for even seeds, the AMQP
//! disposition `accepted` for odd ones) is compared with what the devices finally receive: none
//! lost, and a message received twice only on two different connections of its device (delivered,
//! but its PUBACK not applied before the crash: IoT Hub's at-least-once), never twice on one
//! connection, and nothing received that was never sent.
//!
//! `CRASH_SEEDS` (default 48) and `CRASH_SEED_BASE` (default 1) choose the seeds; a failure names
//! its seed and the command that replays it alone. Needs the binary beside the test (built by
//! `cargo test --workspace`, or `cargo build -p iothub-emulator`) or at `IOTHUB_EMULATOR_BIN`.
//!
//! `cargo build -p iothub-emulator && cargo test -p testbench --test crash`

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use simulated_devices::amqp_client::{AmqpEndpoint, AmqpService, TOKEN_RENEWAL, TokenSource};
use simulated_devices::fleet;
use simulated_devices::service_client::{C2dSend, ServiceClient};
use testbench::child_hub::{ChildHub, ChildHubConfig, StopKind, find_binary};
use tokio::sync::watch;
use tokio::time::Instant;

const FLEET_KEY: &str = "Y3Jhc2gtY29uc2lzdGVuY3ktZmxlZXQta2V5LTAwMDA=";
/// Devices per seed.
const DEVICES: usize = 12;
/// Messages sent per seed, round-robin over the devices.
const MESSAGES: usize = 400;
/// Every this many devices one is offline during the fan-out (it connects afterwards).
const OFFLINE_EVERY: usize = 3;
/// Sends in flight at once.
const WINDOW: usize = 24;
/// Longest wait, after the last send, for every acknowledged message to arrive.
const DELIVERY_WAIT: Duration = Duration::from_secs(60);
/// How often the receipts are looked at while waiting.
const POLL: Duration = Duration::from_millis(20);

/// Receipts of one message: the device's connection number each time it arrived.
type Receipts = Arc<Mutex<HashMap<String, Vec<u32>>>>;

/// What one seed saw.
#[derive(Debug, Default)]
struct SeedOutcome {
    acked: usize,
    unacked: usize,
    kills: usize,
    lost: Vec<String>,
    allowed_duplicates: usize,
    bad_duplicates: Vec<String>,
    unknown: Vec<String>,
}

impl SeedOutcome {
    fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if !self.lost.is_empty() {
            f.push(format!(
                "{} acknowledged messages never arrived, e.g. {:?}",
                self.lost.len(),
                &self.lost[..self.lost.len().min(5)]
            ));
        }
        if !self.bad_duplicates.is_empty() {
            f.push(format!("received twice on one connection: {:?}", self.bad_duplicates));
        }
        if !self.unknown.is_empty() {
            f.push(format!("received but never sent: {:?}", self.unknown));
        }
        f
    }
}

fn device_ids(seed: u64) -> Vec<String> {
    (0..DEVICES).map(|i| format!("crash-{seed}-{i:02}")).collect()
}

/// Notes that the message with `body` arrived on connection `conn`.
fn record(receipts: &Receipts, body: &[u8], conn: u32) {
    receipts.lock().unwrap().entry(String::from_utf8_lossy(body).to_string()).or_default().push(conn);
}

/// One device over plain MQTT: subscribes after every CONNACK (a restarted hub has no sessions),
/// records each message body with its connection number, and reconnects on its own.
fn device(
    port: u16,
    id: String,
    receipts: Receipts,
    connected: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let key = fleet::device_key(FLEET_KEY, &id);
        let expiry =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
        let token =
            iothub_emulator::sas::make_token(&format!("localhost/devices/{id}"), &key, None, expiry).unwrap();
        let mut opts = MqttOptions::new(id.clone(), "127.0.0.1", port);
        opts.set_credentials(format!("localhost/{id}/?api-version=2021-04-12"), token);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(true);
        let (client, mut events) = AsyncClient::new(opts, 64);
        let filter = format!("devices/{id}/messages/devicebound/#");
        let mut conn = 0u32;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    conn += 1;
                    let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    connected.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => record(&receipts, &p.payload, conn),
                Ok(_) => {}
                Err(_) => {
                    // Packets read in the same read as the connection's end are still queued in
                    // rumqttc, which hands them out after the next CONNACK: they belong to this
                    // connection, not the next.
                    for ev in events.state.events.drain(..) {
                        if let Event::Incoming(Packet::Publish(p)) = ev {
                            record(&receipts, &p.payload, conn);
                        }
                    }
                    // The hub is down (killed): rumqttc dials again on the next poll; a short
                    // pause keeps the dialing from spinning while nothing listens.
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
            }
        }
    })
}

/// Waits (bounded) until `f` holds, polling.
async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() >= deadline {
            return Err(format!("{what}: not within {limit:?}"));
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// One seed: a fan-out of [`MESSAGES`] over [`DEVICES`] devices, the hub killed (SIGKILL) once or
/// twice after a seeded number of acknowledged sends, restarted each time; then the comparison.
async fn one_seed(seed: u64, persist: bool, delivery_wait: Duration) -> Result<SeedOutcome, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let kills = rng.random_range(1..=2usize);
    let mut kill_at: Vec<usize> = (0..kills).map(|_| rng.random_range(WINDOW..MESSAGES)).collect();
    kill_at.sort_unstable();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let binary = find_binary(None).map_err(|e| e.to_string())?;
    let mut hub = ChildHub::start(ChildHubConfig::new(binary, dir.path().join("hub"), persist))
        .await
        .map_err(|e| e.to_string())?;
    let s = hub.startup().clone();
    let ca = std::fs::read_to_string(&s.ca_path).map_err(|e| e.to_string())?;
    let svc =
        ServiceClient::new(&s.connection_string, &hub.http_url(), Some(&ca)).map_err(|e| e.to_string())?;
    let ids = device_ids(seed);
    fleet::seed(&svc, FLEET_KEY, &ids, 2).await.map_err(|e| e.to_string())?;
    let receipts: Receipts = Arc::default();
    let subscribed = Arc::new(AtomicUsize::new(0));
    // Every OFFLINE_EVERY-th device connects only after the fan-out: its messages wait in its queue
    // through the crashes.
    let (online, offline): (Vec<_>, Vec<_>) =
        ids.iter().enumerate().partition(|(i, _)| i % OFFLINE_EVERY != 0);
    let mut devices: Vec<_> = online
        .iter()
        .map(|(_, id)| device(s.ports.mqtt_plain, id.to_string(), receipts.clone(), subscribed.clone()))
        .collect();
    let n_online = online.len();
    until("every online device subscribed", Duration::from_secs(30), || {
        subscribed.load(Ordering::SeqCst) >= n_online
    })
    .await?;

    // The killer: SIGKILL once the acknowledged sends reach each kill point, then a restart on the
    // same data directory and ports; each restart bumps `up`.
    let acked_count = Arc::new(AtomicUsize::new(0));
    let (up_tx, up_rx) = watch::channel(0u32);
    let s_http = hub.http_url();
    let killer = {
        let acked_count = acked_count.clone();
        tokio::spawn(async move {
            for at in kill_at {
                while acked_count.load(Ordering::SeqCst) < at {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                hub.restart(StopKind::Crash).await.map_err(|e| e.to_string())?;
                up_tx.send_modify(|n| *n += 1);
            }
            Ok::<ChildHub, String>(hub)
        })
    };

    // The sender: windows of WINDOW sends; after a window with a failure (the hub was down), it
    // waits for the next restart before going on. A failed send is not retried (unacknowledged:
    // it may or may not arrive).
    let mut acked = HashSet::new();
    let mut sent = HashSet::new();
    let mut unacked = 0;
    let up = up_rx;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    let health = format!("{}/health", s_http);
    let all: Vec<(usize, String)> =
        (0..MESSAGES).map(|k| (k % DEVICES, format!("m-{seed}-{k:04}"))).collect();
    // Odd seeds send over AMQP (as the service SDKs do), even ones over REST.
    let amqp_endpoint = AmqpEndpoint {
        addr: SocketAddr::from(([127, 0, 0, 1], s.ports.amqp)),
        server_name: "localhost".into(),
        ca_pem: ca.clone(),
    };
    let token: TokenSource = {
        let svc = svc.clone();
        Arc::new(move || svc.token().map_err(|e| e.to_string()))
    };
    let mut amqp: Option<AmqpService> = None;
    for window in all.chunks(WINDOW) {
        let gen0 = *up.borrow();
        if seed % 2 == 1 && amqp.is_none() {
            // A failed connect (the hub is down) leaves the window's sends unacknowledged.
            amqp = AmqpService::connect_renewing(&amqp_endpoint, "localhost", token.clone(), TOKEN_RENEWAL)
                .await
                .ok();
        }
        let outcomes: Vec<(String, bool)> = futures_util::stream::iter(window.iter().cloned())
            .map(|(d, mid)| {
                let (svc, ids, amqp) = (&svc, &ids, &amqp);
                async move {
                    let msg = C2dSend {
                        body: mid.clone().into_bytes(),
                        message_id: mid.clone(),
                        ack: "none",
                        content_type: None,
                        expiry_ms: None,
                    };
                    let ok = match (seed % 2, amqp) {
                        (0, _) => svc.send_c2d(&ids[d], &msg).await.is_ok(),
                        (_, Some(a)) => a.send_c2d(&ids[d], &msg).await.is_ok(),
                        (_, None) => false,
                    };
                    (mid, ok)
                }
            })
            .buffer_unordered(WINDOW)
            .collect()
            .await;
        let failed = outcomes.iter().any(|(_, ok)| !ok);
        if failed {
            // The connection is gone with the hub: a new one after the restart.
            amqp = None;
        }
        for (mid, ok) in outcomes {
            sent.insert(mid.clone());
            if ok {
                acked.insert(mid);
                acked_count.fetch_add(1, Ordering::SeqCst);
            } else {
                unacked += 1;
            }
        }
        if failed {
            // The hub was down (killed) or refused (a hub without `--persist` forgot the device):
            // go on once it was restarted since the window began, or answers `/health` anyway.
            let deadline = Instant::now() + Duration::from_secs(90);
            while *up.borrow() == gen0 && !healthy(&http, &health).await {
                if Instant::now() >= deadline {
                    return Err(format!("seed {seed}: a send failed and the hub was not restarted"));
                }
                tokio::time::sleep(POLL).await;
            }
        }
    }
    // Kill points past the last acknowledged count never fire: release the killer.
    acked_count.fetch_add(MESSAGES, Ordering::SeqCst);
    let hub = killer.await.map_err(|e| e.to_string())??;
    devices.extend(
        offline
            .iter()
            .map(|(_, id)| device(s.ports.mqtt_plain, id.to_string(), receipts.clone(), subscribed.clone())),
    );
    let mut out = SeedOutcome { acked: acked.len(), unacked, kills, ..SeedOutcome::default() };
    let _ = until("every acknowledged message received", delivery_wait, || {
        let r = receipts.lock().unwrap();
        acked.iter().all(|m| r.contains_key(m))
    })
    .await;
    let r = receipts.lock().unwrap().clone();
    for d in devices {
        d.abort();
    }
    drop(hub);
    let mut lost: Vec<String> = acked.iter().filter(|m| !r.contains_key(*m)).cloned().collect();
    lost.sort();
    out.lost = lost;
    for (mid, conns) in &r {
        if !sent.contains(mid) {
            out.unknown.push(mid.clone());
        }
        if conns.len() > 1 {
            if conns.windows(2).all(|w| w[0] < w[1]) {
                out.allowed_duplicates += conns.len() - 1;
            } else {
                out.bad_duplicates.push(format!("{mid} on connections {conns:?}"));
            }
        }
    }
    Ok(out)
}

async fn healthy(http: &reqwest::Client, url: &str) -> bool {
    http.get(url).send().await.is_ok_and(|r| r.status().is_success())
}

fn seeds() -> Vec<u64> {
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (base, n) = (env("CRASH_SEED_BASE", 1), env("CRASH_SEEDS", 48));
    (base..base + n).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_fanout_loses_no_acknowledged_c2d_message() {
    let started = Instant::now();
    let mut failures = Vec::new();
    let (mut acked, mut unacked, mut dups, mut kills) = (0, 0, 0, 0);
    for seed in seeds() {
        match one_seed(seed, true, DELIVERY_WAIT).await {
            Ok(o) => {
                (acked, unacked, dups, kills) =
                    (acked + o.acked, unacked + o.unacked, dups + o.allowed_duplicates, kills + o.kills);
                for f in o.failures() {
                    failures.push(format!("seed {seed}: {f}"));
                }
            }
            Err(e) => failures.push(format!("seed {seed}: {e}")),
        }
    }
    eprintln!(
        "{} seeds in {:.1} s: {kills} kills, {acked} acknowledged sends, {unacked} unacknowledged, {dups} \
         redeliveries after a crash",
        seeds().len(),
        started.elapsed().as_secs_f64()
    );
    assert!(kills >= seeds().len() && acked > 0, "the seeds killed nothing or sent nothing");
    assert!(
        failures.is_empty(),
        "{}\nreplay one: CRASH_SEED_BASE=<seed> CRASH_SEEDS=1 cargo test -p testbench --test crash kill_9",
        failures.join("\n")
    );
}

/// The check can fail: a hub without `--persist` forgets the devices and their queues when it is
/// killed, and the comparison finds the acknowledged messages that never arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_persist_the_comparison_finds_lost_messages() {
    // Messages queued for the offline devices before the kill are forgotten; they can never
    // arrive (the devices are forgotten too), so a short wait shows it.
    let o = one_seed(3, false, Duration::from_secs(2)).await.expect("the seed runs");
    assert!(!o.lost.is_empty(), "an in-memory hub lost nothing? {o:?}");
}
