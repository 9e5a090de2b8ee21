//! `fanout`: the hub's C2D fan-out side by side with Mosquitto and rumqttd, in one run.
//!
//! For each server in turn (its own process, free loopback ports): N devices connect over plain
//! MQTT 3.1.1 from several 127.x source addresses (split over client processes, each a copy of
//! this binary running `devices`), subscribe at QoS 1 to their C2D topic, then one message is
//! sent to each device (hub: its REST send extension; peers: a QoS 1 publisher on the same
//! topic) and each device PUBACKs it. Measured per server: connect rate, fan-out throughput,
//! send→receive latency, server CPU per delivered message and server RSS per connection before
//! and after the first message; then one table with the medians over `--reps` and the hub/peer
//! ratios. Exits non-zero when a server lost messages (or a send, connect or subscribe failed).
//! See `bench/README.md` ("C2D fan-out side by side") for what each number means.

mod sender;
mod servers;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::Instant;

use sender::{SendStats, Sender, Via};
use servers::{Found, Kind, Server};
use testbench::fanout::{self, procfs};

/// C2D fan-out: the hub against Mosquitto and rumqttd, same client, same packets, one table.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    #[command(subcommand)]
    command: Option<Internal>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Devices (connections), each sent one message.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Servers to measure, in this order.
    #[arg(long, value_delimiter = ',', default_value = "hub,mosquitto,rumqttd")]
    servers: Vec<String>,
    /// Repetitions; the table shows medians.
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Client processes the devices are split over.
    #[arg(long, default_value_t = 2)]
    client_procs: usize,
    /// Connects in flight at once, over all client processes.
    #[arg(long, default_value_t = 64)]
    connect_in_flight: usize,
    /// Devices per source address (127.x.y.z).
    #[arg(long, default_value_t = 2000)]
    per_source: usize,
    /// Sender connections (HTTP for the hub, MQTT publishers for the peers).
    #[arg(long, default_value_t = 4)]
    send_conns: usize,
    /// Requests in flight per sender connection.
    #[arg(long, default_value_t = 64)]
    send_window: usize,
    /// Payload bytes per message (at least 12: send time and device index).
    #[arg(long, default_value_t = 32)]
    payload_bytes: usize,
    /// Deadline for every device to receive its message, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// The hub: an `iothub-emulator` binary, or `self` for this binary's `hub-serve` (default: the
    /// `iothub-emulator` beside this binary if there is one, else `self`).
    #[arg(long)]
    hub_bin: Option<String>,
    /// The mosquitto binary (default: found on PATH or in /usr/sbin).
    #[arg(long)]
    mosquitto_bin: Option<String>,
    /// The rumqttd-peer binary (default: beside this binary).
    #[arg(long)]
    rumqttd_bin: Option<String>,
    /// Report a peer that is not installed as SKIPPED instead of failing.
    #[arg(long)]
    allow_missing_peers: bool,
    /// Record each server's fan-out phase with `perf record` into this directory.
    #[arg(long)]
    perf_dir: Option<PathBuf>,
    /// Keep the work directory (server logs, configurations).
    #[arg(long)]
    keep_work: bool,
}

#[derive(Debug, Subcommand)]
enum Internal {
    /// (internal) One client process of devices, steered over stdin.
    #[command(hide = true)]
    Devices {
        #[arg(long)]
        server: SocketAddr,
        /// Device indices: start, step and count.
        #[arg(long)]
        start: usize,
        #[arg(long)]
        step: usize,
        #[arg(long)]
        count: usize,
        #[arg(long, value_delimiter = ',')]
        sources: Vec<Ipv4Addr>,
        #[arg(long)]
        per_source: usize,
        #[arg(long)]
        connect_in_flight: usize,
        #[arg(long)]
        payload_bytes: usize,
    },
    /// (internal) Serves a hub from this binary's copy of the library (ports 0, plain MQTT on, no
    /// FTP) and prints its addresses like `iothub-emulator` does; stops on SIGTERM.
    #[command(hide = true)]
    HubServe {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.command {
        Some(Internal::Devices {
            server,
            start,
            step,
            count,
            sources,
            per_source,
            connect_in_flight,
            payload_bytes,
        }) => {
            let cfg = fanout::devices::DevicesConfig {
                server,
                indices: (0..count).map(|k| start + k * step).collect(),
                sources,
                per_source,
                connect_in_flight,
                payload_bytes,
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(fanout::devices::run(cfg, BufReader::new(tokio::io::stdin())))?;
            Ok(())
        }
        Some(Internal::HubServe { data_dir }) => {
            tokio::runtime::Runtime::new()?.block_on(hub_serve(&data_dir))
        }
        None => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let failed = rt.block_on(run(args.run))?;
            if failed {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

async fn hub_serve(data_dir: &Path) -> Result<()> {
    use iothub_emulator::server::{ListenConfig, RunningHub, shutdown_on_signal};
    let listen = ListenConfig { ftp_port: None, ..ListenConfig::ephemeral(Ipv4Addr::LOCALHOST.into()) };
    let running = RunningHub::start(iothub_emulator::HubConfig::default(), &listen, data_dir).await?;
    println!("http://{}", running.http_addr);
    println!("mqtt://{}", running.mqtt_plain_addr.context("plain MQTT listener")?);
    tokio::spawn(shutdown_on_signal(running.shutdown_token()));
    running.wait().await?;
    Ok(())
}

/// One server's numbers from one run.
#[derive(Debug, Clone, Default)]
struct Measured {
    connect_per_s: f64,
    fanout_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_msg: f64,
    kib_idle: f64,
    kib_after: f64,
    client_cpu_us_per_msg: f64,
    /// Messages that never arrived (devices that failed to connect or subscribe included).
    lost: usize,
    /// Everything else that went wrong.
    problems: Vec<String>,
}

/// The client processes of one run.
struct Clients {
    procs: Vec<(Child, ChildStdin, Lines<BufReader<ChildStdout>>)>,
}

impl Clients {
    async fn spawn(a: &RunArgs, server: SocketAddr, run_no: usize) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let p = a.client_procs.max(1);
        let mut procs = Vec::new();
        for c in 0..p {
            let count = (a.devices + p - 1 - c) / p;
            let ips = count.div_ceil(a.per_source).max(1);
            if ips > 254 {
                bail!("{count} devices at {} per source address need more than 254 addresses", a.per_source);
            }
            // Fresh addresses for every run and client process: 127.(1+c).(run).(1..).
            let sources: Vec<String> =
                (0..ips).map(|j| format!("127.{}.{}.{}", 1 + c, 1 + run_no % 250, 1 + j)).collect();
            let mut child = Command::new(&exe)
                .arg("devices")
                .arg("--server")
                .arg(server.to_string())
                .args(["--start", &c.to_string(), "--step", &p.to_string(), "--count", &count.to_string()])
                .arg("--sources")
                .arg(sources.join(","))
                .args(["--per-source", &a.per_source.to_string()])
                .args(["--connect-in-flight", &(a.connect_in_flight / p).max(1).to_string()])
                .args(["--payload-bytes", &a.payload_bytes.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()?;
            let stdin = child.stdin.take().context("client stdin")?;
            let lines = BufReader::new(child.stdout.take().context("client stdout")?).lines();
            procs.push((child, stdin, lines));
        }
        let mut clients = Self { procs };
        clients.expect_all("ready", Duration::from_secs(30)).await?;
        Ok(clients)
    }

    /// Sends `cmd` to every client process and returns each one's answer (key=value pairs).
    async fn command(
        &mut self,
        cmd: &str,
        answer: &str,
        timeout: Duration,
    ) -> Result<Vec<BTreeMap<String, String>>> {
        for (_, stdin, _) in &mut self.procs {
            stdin.write_all(format!("{cmd}\n").as_bytes()).await?;
            stdin.flush().await?;
        }
        self.expect_all(answer, timeout).await
    }

    async fn expect_all(&mut self, answer: &str, timeout: Duration) -> Result<Vec<BTreeMap<String, String>>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        for (_, _, lines) in &mut self.procs {
            let line = tokio::time::timeout_at(deadline, lines.next_line())
                .await
                .map_err(|_| anyhow!("a client process did not answer {answer:?} within {timeout:?}"))??
                .ok_or_else(|| anyhow!("a client process exited instead of answering {answer:?}"))?;
            let mut words = line.split(' ');
            if words.next() != Some(answer) {
                bail!("a client process answered {line:?} instead of {answer:?}");
            }
            out.push(
                words
                    .filter_map(|w| w.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
        }
        Ok(out)
    }

    async fn stop(mut self) -> Result<()> {
        let _ = self.command("stop", "stopped", Duration::from_secs(30)).await;
        for (mut child, stdin, _) in self.procs {
            drop(stdin);
            if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                child.kill().await?;
            }
        }
        Ok(())
    }
}

fn num(m: &BTreeMap<String, String>, k: &str) -> f64 {
    m.get(k).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

fn sum(ms: &[BTreeMap<String, String>], k: &str) -> usize {
    ms.iter().map(|m| num(m, k) as usize).sum()
}

fn first_error(ms: &[BTreeMap<String, String>]) -> Option<String> {
    ms.iter().filter_map(|m| m.get("error")).find(|e| e.as_str() != "-").cloned()
}

/// Waits for the server to go idle (at most 10 s), so CPU and RSS readings include all its work.
async fn settle(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    if !procfs::wait_idle(pid, Duration::from_millis(100), 2_000_000, deadline).await {
        eprintln!("  (the server did not go idle within 10 s; reading it anyway)");
    }
}

/// Registers the bench's devices in the hub (REST bulk import, 100 a request, keys given).
async fn register(http: SocketAddr, n: usize) -> Result<()> {
    let token = owner_token()?;
    let client = reqwest::Client::new();
    let url = format!("http://{http}/devices?api-version={}", fanout::API_VERSION);
    let chunks: Vec<Vec<usize>> = (0..n).collect::<Vec<_>>().chunks(100).map(<[usize]>::to_vec).collect();
    let results: Vec<Result<()>> = futures_util::stream::iter(chunks)
        .map(|chunk| {
            let body: Vec<serde_json::Value> = chunk
                .iter()
                .map(|&i| {
                    serde_json::json!({
                        "id": fanout::device_id(i),
                        "importMode": "create",
                        "authentication": {"type": "sas", "symmetricKey": {
                            "primaryKey": fanout::DEVICE_KEY, "secondaryKey": fanout::DEVICE_KEY}},
                    })
                })
                .collect();
            let req = client
                .post(&url)
                .header("authorization", &token)
                .json(&body)
                .timeout(Duration::from_secs(60));
            async move {
                let resp = req.send().await?;
                let status = resp.status();
                let v: serde_json::Value = resp.json().await?;
                if !status.is_success() || v.get("isSuccessful") != Some(&serde_json::Value::Bool(true)) {
                    bail!("bulk registration answered {status}: {v}");
                }
                Ok(())
            }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    results.into_iter().collect()
}

fn owner_token() -> Result<String> {
    let expiry = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 86_400;
    Ok(iothub_emulator::sas::make_token(
        fanout::HOSTNAME,
        iothub_emulator::hub::DEFAULT_OWNER_KEY,
        Some(iothub_emulator::sas::OWNER_POLICY),
        expiry,
    )?)
}

/// Starts `perf record` on `pid` when asked; stopped with SIGINT by [`stop_perf`].
fn start_perf(dir: Option<&Path>, pid: u32, name: &str) -> Result<Option<Child>> {
    let Some(dir) = dir else { return Ok(None) };
    std::fs::create_dir_all(dir)?;
    let out = dir.join(format!("{name}.perf.data"));
    let child = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "999", "--call-graph", "dwarf,16384", "-o"])
        .arg(&out)
        .args(["-p", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("perf record (apt-get install -y linux-perf)")?;
    Ok(Some(child))
}

async fn stop_perf(perf: Option<Child>) {
    if let Some(mut p) = perf {
        if let Some(pid) = p.id() {
            // SAFETY: signals the perf process this bench started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
        }
        if tokio::time::timeout(Duration::from_secs(60), p.wait()).await.is_err() {
            let _ = p.kill().await;
        }
    }
}

/// One server, one repetition.
async fn measure_one(a: &RunArgs, found: &Found, work: &Path, run_no: usize, rep: usize) -> Result<Measured> {
    let n = a.devices;
    let mut server = Server::start(found, &work.join(format!("{}-{rep}", found.kind.name())), n).await?;
    let result = measure_started(a, &mut server, run_no, rep).await;
    let log = server.log.clone();
    let alive = server.alive();
    server.stop().await?;
    match result {
        Err(e) => {
            Err(e.context(format!("{} (log {}):\n{}", found.label, log.display(), servers::tail(&log))))
        }
        Ok(mut m) => {
            if !alive {
                m.problems.push(format!("the server exited during the run; log {}", log.display()));
            }
            Ok(m)
        }
    }
}

async fn measure_started(a: &RunArgs, server: &mut Server, run_no: usize, rep: usize) -> Result<Measured> {
    let n = a.devices;
    let pid = server.pid;
    if let Some(http) = server.http {
        register(http, n).await.context("registering the devices")?;
    }
    settle(pid).await;
    let rss_base = procfs::rss_kib(pid).context("server RSS")?;
    let mut clients = Clients::spawn(a, server.mqtt, run_no).await?;
    let mut m = Measured::default();

    // Connect: every device, `connect_in_flight` at once over all client processes.
    let t0 = Instant::now();
    let connected = clients.command("connect", "connected", Duration::from_secs(300)).await?;
    let connect_secs = t0.elapsed().as_secs_f64();
    let ok = sum(&connected, "ok");
    m.connect_per_s = ok as f64 / connect_secs;
    if sum(&connected, "failed") > 0 {
        m.problems.push(format!(
            "{} connects failed (first: {})",
            sum(&connected, "failed"),
            first_error(&connected).unwrap_or_default()
        ));
    }
    let subscribed = clients.command("subscribe", "subscribed", Duration::from_secs(300)).await?;
    if sum(&subscribed, "failed") > 0 {
        m.problems.push(format!(
            "{} subscribes failed (first: {})",
            sum(&subscribed, "failed"),
            first_error(&subscribed).unwrap_or_default()
        ));
    }
    settle(pid).await;
    let rss_idle = procfs::rss_kib(pid).context("server RSS")?;

    // Fan-out: one message to every device, interleaved over the client processes.
    let via = match server.http {
        Some(http) => Via::Rest { http, token: owner_token()? },
        None => Via::Mqtt { addr: server.mqtt },
    };
    let sender = Sender::open(via, a.send_conns, a.send_window, a.payload_bytes).await?;
    settle(pid).await;
    let perf = start_perf(a.perf_dir.as_deref(), pid, &format!("{}-rep{rep}", server.kind.name()))?;
    let cpu0 = procfs::cpu_us(pid).context("server CPU")?;
    let order: Vec<usize> = (0..n).collect();
    let sent: SendStats = sender.run(&order).await;
    let collected = clients
        .command(
            &format!("collect {}", a.timeout_secs * 1000),
            "collected",
            Duration::from_secs(a.timeout_secs + 30),
        )
        .await?;
    settle(pid).await;
    let cpu1 = procfs::cpu_us(pid).context("server CPU")?;
    stop_perf(perf).await;
    settle(pid).await;
    let rss_after = procfs::rss_kib(pid).context("server RSS")?;
    clients.stop().await?;

    let received = sum(&collected, "received");
    let last_ns = collected.iter().map(|c| num(c, "last_ns") as u64).max().unwrap_or(0);
    let mut lat: Vec<u32> = collected
        .iter()
        .filter_map(|c| c.get("lat_us"))
        .flat_map(|l| l.split(',').filter_map(|v| v.parse().ok()))
        .collect();
    lat.sort_unstable();
    let secs = last_ns.saturating_sub(sent.first_ns) as f64 / 1e9;
    m.fanout_per_s = if secs > 0.0 { received as f64 / secs } else { 0.0 };
    m.p50_ms = fanout::quantile(&lat, 0.50).unwrap_or(0) as f64 / 1000.0;
    m.p99_ms = fanout::quantile(&lat, 0.99).unwrap_or(0) as f64 / 1000.0;
    m.cpu_us_per_msg = cpu1.saturating_sub(cpu0) as f64 / received.max(1) as f64;
    m.client_cpu_us_per_msg = sum(&collected, "cpu_us") as f64 / received.max(1) as f64;
    m.kib_idle = rss_idle.saturating_sub(rss_base) as f64 / n as f64;
    m.kib_after = rss_after.saturating_sub(rss_base) as f64 / n as f64;
    m.lost = n - received.min(n);
    if sent.failed > 0 {
        m.problems.push(format!(
            "{} sends failed (first: {})",
            sent.failed,
            sent.error.clone().unwrap_or_default()
        ));
    }
    for (k, what) in [
        ("dups", "duplicates"),
        ("bad", "unexpected packets"),
        ("closed", "connections closed by the server"),
    ] {
        if sum(&collected, k) > 0 {
            m.problems.push(format!(
                "{} {what} (first: {})",
                sum(&collected, k),
                first_error(&collected).unwrap_or_default()
            ));
        }
    }
    println!(
        "  connect {ok}/{n} in {connect_secs:.2} s ({:.0}/s); fan-out {received}/{n} in {secs:.3} s ({:.0} msg/s), \
         p50 {:.2} ms, p99 {:.2} ms; server CPU {:.3} s ({:.1} µs/msg); client CPU {:.1} µs/msg; \
         RSS {:.1} MiB before connects, +{:.1} MiB connected ({:.2} KiB/conn), +{:.1} MiB after ({:.2} KiB/conn)",
        m.connect_per_s,
        m.fanout_per_s,
        m.p50_ms,
        m.p99_ms,
        cpu1.saturating_sub(cpu0) as f64 / 1e6,
        m.cpu_us_per_msg,
        m.client_cpu_us_per_msg,
        rss_base as f64 / 1024.0,
        rss_idle.saturating_sub(rss_base) as f64 / 1024.0,
        m.kib_idle,
        rss_after.saturating_sub(rss_base) as f64 / 1024.0,
        m.kib_after,
    );
    if m.lost > 0 {
        println!("  LOST {} of {n} messages", m.lost);
    }
    for p in &m.problems {
        println!("  PROBLEM: {p}");
    }
    Ok(m)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Medians over repetitions, per metric.
fn medians(runs: &[Measured]) -> Measured {
    let f = |g: fn(&Measured) -> f64| median(runs.iter().map(g).collect());
    Measured {
        connect_per_s: f(|m| m.connect_per_s),
        fanout_per_s: f(|m| m.fanout_per_s),
        p50_ms: f(|m| m.p50_ms),
        p99_ms: f(|m| m.p99_ms),
        cpu_us_per_msg: f(|m| m.cpu_us_per_msg),
        kib_idle: f(|m| m.kib_idle),
        kib_after: f(|m| m.kib_after),
        client_cpu_us_per_msg: f(|m| m.client_cpu_us_per_msg),
        lost: runs.iter().map(|m| m.lost).max().unwrap_or(0),
        problems: runs.iter().flat_map(|m| m.problems.clone()).collect(),
    }
}

/// Runs everything; returns whether something failed.
async fn run(a: RunArgs) -> Result<bool> {
    if a.payload_bytes < fanout::MIN_PAYLOAD_BYTES {
        bail!("--payload-bytes must be at least {}", fanout::MIN_PAYLOAD_BYTES);
    }
    let nofile = fanout::raise_nofile_limit();
    let per_proc = a.devices.div_ceil(a.client_procs.max(1));
    if a.devices as u64 + 200 > nofile || per_proc as u64 + 200 > nofile {
        bail!(
            "{} devices need more open files than the limit of {nofile} per process allows (the server holds \
             every connection); use fewer devices",
            a.devices
        );
    }
    let kinds: Vec<Kind> = a.servers.iter().map(|s| Kind::parse(s)).collect::<Result<_>>()?;
    let mut found = Vec::new();
    for k in &kinds {
        let explicit = match k {
            Kind::Hub => a.hub_bin.as_deref(),
            Kind::Mosquitto => a.mosquitto_bin.as_deref(),
            Kind::Rumqttd => a.rumqttd_bin.as_deref(),
        };
        found.push(servers::find(*k, explicit).await);
    }
    let work = std::env::temp_dir().join(format!("fanout-bench-{}", std::process::id()));
    let load_before = procfs::loadavg();
    println!(
        "fan-out bench: {} devices, {} client processes, connect in flight {}, sender {} conns x {} in flight, \
         {}-byte payload, QoS 1, {} rep(s); {} cores; load average {load_before}",
        a.devices,
        a.client_procs,
        a.connect_in_flight,
        a.send_conns,
        a.send_window,
        a.payload_bytes,
        a.reps,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    for f in &found {
        match (&f.program, &f.hub) {
            (Ok(p), Some(servers::HubBin::SelfHosted)) => {
                println!("  {}: {} hub-serve", f.label, p.display())
            }
            (Ok(p), _) => println!("  {}: {}", f.label, p.display()),
            (Err(why), _) => println!("  {}: {why}", f.label),
        }
    }
    let mut results: BTreeMap<usize, Vec<Measured>> = BTreeMap::new();
    let mut skipped: BTreeMap<usize, String> = BTreeMap::new();
    let mut failed = false;
    let mut run_no = 0;
    for rep in 1..=a.reps.max(1) {
        for (i, f) in found.iter().enumerate() {
            if let Err(why) = &f.program {
                if f.kind != Kind::Hub && a.allow_missing_peers {
                    if rep == 1 {
                        eprintln!("\n!!! SKIPPED {}: {why} -- NOT MEASURED, NOT PASSED !!!\n", f.kind.name());
                    }
                    skipped.insert(i, why.clone());
                    continue;
                }
                bail!("{}: {why}", f.kind.name());
            }
            println!("[rep {rep}/{}] {}", a.reps.max(1), f.label);
            run_no += 1;
            match measure_one(&a, f, &work, run_no, rep).await {
                Ok(m) => {
                    failed |= m.lost > 0 || !m.problems.is_empty();
                    results.entry(i).or_default().push(m);
                }
                Err(e) => {
                    println!("  FAILED: {e:#}");
                    failed = true;
                }
            }
        }
    }
    if !a.keep_work {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        println!("work directory kept: {}", work.display());
    }

    let table: Vec<(usize, Measured)> = results.iter().map(|(i, runs)| (*i, medians(runs))).collect();
    println!(
        "\nC2D fan-out, {} devices, {} of {} rep(s) per server{}; load average {load_before} before, {} after",
        a.devices,
        if a.reps > 1 { "medians" } else { "one" },
        a.reps.max(1),
        if a.reps > 1 { " (per metric)" } else { "" },
        procfs::loadavg()
    );
    println!(
        "{:<34} {:>10} {:>12} {:>8} {:>8} {:>11} {:>10} {:>10} {:>6}",
        "server", "connect/s", "fan-out/s", "p50 ms", "p99 ms", "CPU µs/msg", "KiB/conn", "KiB/conn", "lost"
    );
    println!(
        "{:<34} {:>10} {:>12} {:>8} {:>8} {:>11} {:>10} {:>10} {:>6}",
        "", "", "", "", "", "", "idle", "after", ""
    );
    for (i, f) in found.iter().enumerate() {
        if let Some(why) = skipped.get(&i) {
            println!("{:<34} SKIPPED ({why})", f.label);
            continue;
        }
        match table.iter().find(|(j, _)| *j == i) {
            None => println!("{:<34} FAILED (no successful run)", f.label),
            Some((_, m)) => println!(
                "{:<34} {:>10.0} {:>12.0} {:>8.2} {:>8.2} {:>11.1} {:>10.2} {:>10.2} {:>6}",
                f.label,
                m.connect_per_s,
                m.fanout_per_s,
                m.p50_ms,
                m.p99_ms,
                m.cpu_us_per_msg,
                m.kib_idle,
                m.kib_after,
                m.lost
            ),
        }
    }
    let hub =
        found.iter().position(|f| f.kind == Kind::Hub).and_then(|i| table.iter().find(|(j, _)| *j == i));
    if let Some((_, h)) = hub {
        for (i, p) in &table {
            let f = &found[*i];
            if f.kind == Kind::Hub {
                continue;
            }
            let r = |x: f64, y: f64| if y > 0.0 { format!("{:.2}x", x / y) } else { "n/a".into() };
            println!(
                "hub/{:<10} connect {}  fan-out {}  p50 {}  p99 {}  CPU/msg {}  mem idle {}  mem after {}   \
                 (fan-out and connect: higher is better for the hub; the rest: lower)",
                f.kind.name(),
                r(h.connect_per_s, p.connect_per_s),
                r(h.fanout_per_s, p.fanout_per_s),
                r(h.p50_ms, p.p50_ms),
                r(h.p99_ms, p.p99_ms),
                r(h.cpu_us_per_msg, p.cpu_us_per_msg),
                r(h.kib_idle, p.kib_idle),
                r(h.kib_after, p.kib_after),
            );
        }
        let client: Vec<String> = table
            .iter()
            .map(|(i, m)| format!("{} {:.1}", found[*i].kind.name(), m.client_cpu_us_per_msg))
            .collect();
        println!("client CPU µs/msg (both client processes): {}", client.join(", "));
    }
    let mut verdict = Vec::new();
    for (i, f) in found.iter().enumerate() {
        let v = match (skipped.get(&i), results.get(&i)) {
            (Some(_), _) => "SKIPPED".to_string(),
            (None, Some(runs))
                if runs.len() == a.reps.max(1)
                    && runs.iter().all(|m| m.lost == 0 && m.problems.is_empty()) =>
            {
                "ok".to_string()
            }
            (None, Some(runs)) => {
                let lost: usize = runs.iter().map(|m| m.lost).sum();
                format!("FAILED (lost {lost} messages over {} run(s), or a run failed)", runs.len())
            }
            (None, None) => "FAILED".to_string(),
        };
        verdict.push(format!("{}: {v}", f.kind.name()));
    }
    println!("result: {}", verdict.join("; "));
    Ok(failed)
}
