//! Measures the hub's resident memory per idle MQTT connection.
//!
//! Starts a hub in-process with the plain MQTT listener on 127.0.0.1 (port 0), registers N devices,
//! then runs a copy of itself as a child process that opens N MQTT connections (CONNECT with a
//! `device` policy token, clean_session=0, keep-alive 1000 s) from several 127.0.0.x source
//! addresses and holds them idle. The hub side prints VmRSS before and after, and per connection.
//! Client and hub live in separate processes so each stays under the per-process descriptor limit.
//!
//! ```text
//! ulimit -n 20000
//! cargo run --release -p iothub-emulator --example mqtt_idle -- 10000           # drivers, the default
//! cargo run --release -p iothub-emulator --example mqtt_idle -- 10000 --tasks   # --mqtt-plain-driver=false
//! ```

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use iothub_emulator::hub::{DeviceInput, HubConfig};
use iothub_emulator::sas::make_token;
use iothub_emulator::server::{ListenConfig, RunningHub};
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Connections opened from one source address before moving to the next.
const PER_SOURCE_IP: usize = 2_000;
/// Connections being opened at once.
const PARALLEL: usize = 256;

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn device_id(i: usize) -> String {
    format!("idle-{i:06}")
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--client") {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        return rt.block_on(client(&args[2], args[3].parse()?, &args[4], &args[5]));
    }
    let n: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(10_000);
    let rt = tokio::runtime::Runtime::new()?;
    // `--tasks`: the plain port served by a task per connection (`--mqtt-plain-driver=false`)
    // instead of the task-less drivers.
    rt.block_on(hub_side(n, !args.iter().any(|a| a == "--tasks")))
}

async fn hub_side(n: usize, mqtt_plain_driver: bool) -> Result<()> {
    let data_dir = std::env::temp_dir().join(format!("mqtt-idle-{}", std::process::id()));
    let listen =
        ListenConfig { mqtt_plain_driver, ..ListenConfig::ephemeral(IpAddr::V4(Ipv4Addr::LOCALHOST)) };
    let running = RunningHub::start(HubConfig::default(), &listen, &data_dir).await?;
    let hub = running.hub.clone();
    for i in 0..n {
        hub.put_device(&device_id(i), DeviceInput::default(), None)?;
    }
    let policy = hub.policies().iter().find(|p| p.name == "device").context("device policy")?;
    let token = make_token(hub.hostname(), &policy.primary_key, Some("device"), 4_000_000_000)?;
    let addr = running.mqtt_plain_addr.context("plain MQTT listener")?;
    let before = vm_rss_kib();
    println!("devices registered: {n}; hub VmRSS before connections: {before} KiB");

    let started = Instant::now();
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--client", &addr.to_string(), &n.to_string(), hub.hostname(), &token])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("child stdout")?).lines();
    let line = tokio::task::spawn_blocking(move || lines.next()).await?.context("client exited")??;
    if line != "ready" {
        bail!("client: {line}");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while hub.statistics().connected < n {
        if Instant::now() > deadline {
            bail!("only {} of {n} devices connected", hub.statistics().connected);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let after = vm_rss_kib();
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    println!("connections: {n} (all CONNACKed and registered) in {connect_secs:.2} s");
    println!("hub VmRSS after: {after} KiB; delta {} KiB", after.saturating_sub(before));
    println!("per idle connection: {per:.0} bytes ({:.2} KiB)", per / 1024.0);
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"stop\n");
    }
    let _ = child.wait();
    running.stop().await?;
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(())
}

async fn open(addr: SocketAddr, i: usize, hostname: &str, token: &str) -> Result<TcpStream> {
    let source = Ipv4Addr::new(127, 0, 0, 2 + (i / PER_SOURCE_IP) as u8);
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let mut stream = socket.connect(addr).await?;
    let id = device_id(i);
    let mut c = Connect::new(id.clone());
    c.clean_session = false;
    c.keep_alive = 1000;
    c.set_login(format!("{hostname}/{id}/?api-version=2021-04-12"), token);
    let mut buf = BytesMut::new();
    Packet::Connect(c).write(&mut buf, usize::MAX).map_err(|e| anyhow::anyhow!("{e}"))?;
    stream.write_all(&buf).await?;
    let mut rbuf = BytesMut::with_capacity(16);
    loop {
        match Packet::read(&mut rbuf, 1024) {
            Ok(Packet::ConnAck(a)) if a.code == ConnectReturnCode::Success => return Ok(stream),
            Ok(other) => bail!("{id}: {other:?}"),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => bail!("{id}: {e}"),
        }
        if stream.read_buf(&mut rbuf).await? == 0 {
            bail!("{id}: closed before CONNACK");
        }
    }
}

async fn client(addr: &str, n: usize, hostname: &str, token: &str) -> Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let (hostname, token): (Arc<str>, Arc<str>) = (hostname.into(), token.into());
    let mut held = Vec::with_capacity(n);
    let mut next = 0;
    while next < n {
        let mut batch = tokio::task::JoinSet::new();
        for i in next..(next + PARALLEL).min(n) {
            let (hostname, token) = (hostname.clone(), token.clone());
            batch.spawn(async move { open(addr, i, &hostname, &token).await });
        }
        next = (next + PARALLEL).min(n);
        while let Some(r) = batch.join_next().await {
            held.push(r??);
        }
    }
    println!("ready");
    std::io::stdout().flush()?;
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(held);
    Ok(())
}
