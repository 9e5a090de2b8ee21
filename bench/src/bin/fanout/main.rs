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
//!
//! With `--telemetry` the direction turns: the same devices publish QoS 1 telemetry instead of
//! subscribing, and one reader takes every message out ([`testbench::fanout::telemetry`]: from the
//! hub an Event Hubs receiver on every partition of its Event Hub-compatible endpoint, from a peer
//! an MQTT subscriber on every device's telemetry topic); the table's fan-out column is then
//! messages/s in→out (first send to last receipt) and the latencies are send→receive
//! (`bench/README.md`, "Telemetry in over MQTT, out through the Event Hub-compatible endpoint").

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
use servers::{Found, Kind, Server, hub_kinds};
use testbench::child_hub::write_counters;
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
    /// Servers to measure, in this order in the first repetition (each further one starts one
    /// server later, the first going last, so that no server always runs right after the same
    /// other): `hub` (sent to through its REST extension), `hub-amqp`
    /// (sent to over AMQP like the service SDKs), `hub-persist` and `hub-amqp-persist` (the same
    /// with `--persist`: compared with the in-memory hub in their own line), `hub-amqp-drivers`
    /// and `hub-amqp-tasks` (`hub-amqp` with `--mqtt-plain-driver` true or false: device
    /// connections served by the task-less drivers, the hub's default, or a task each), `mosquitto`,
    /// `rumqttd`, and `floor` / `floor-uring`: this binary's floor broker over epoll or io_uring,
    /// which forwards bytes and nothing else (what the kernel alone costs a message here).
    #[arg(long, value_delimiter = ',', default_value = "hub,hub-amqp,mosquitto,rumqttd")]
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
    /// Offered load: messages a second over all sender connections, evenly spaced (default: as
    /// fast as the window allows). At full speed a server that delivers faster than the device
    /// processes can read fills the 2 cores and their lag becomes its latency; latency compares
    /// servers at a rate each of them sustains. The fan-out/s column is then the rate, not a
    /// server's maximum. C2D fan-out only (`--telemetry` ignores it).
    #[arg(long, value_parser = positive_rate)]
    rate: Option<f64>,
    /// Messages per device, sent in rounds (one to every device per round); the table shows round
    /// 1 (each device's first message) and, when there are more, the last round.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=fanout::MAX_ROUNDS as i64))]
    rounds: u32,
    /// Payload bytes per message (at least 16: send time, device index and round).
    #[arg(long, default_value_t = 32)]
    payload_bytes: usize,
    /// Deadline for every device to receive its message, in seconds, per round (rumqttd 0.19 needs
    /// about a minute for the first message to 19,000 devices).
    #[arg(long, default_value_t = 180)]
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
    /// Samples a second per CPU for `--perf-dir` (a round at 19,000 devices lasts about 0.25 s:
    /// raise it to see functions under 1%, at the cost of a slower server while it samples).
    #[arg(long, default_value_t = 999)]
    perf_freq: u32,
    /// Count each server's system calls (by kind) and context switches during the fan-out with
    /// `perf stat`, printed per delivered message (tracepoints slow every system call a little:
    /// for investigation, not for the table's CPU numbers).
    #[arg(long)]
    syscalls: bool,
    /// Telemetry instead of C2D: every device publishes QoS 1 telemetry (each round one message
    /// a device, `--publish-in-flight` devices at once over all client processes) and one reader
    /// takes them all out: from the hub, an Event Hubs receiver on every partition of its Event
    /// Hub-compatible endpoint (AMQP); from an MQTT peer, a subscriber on
    /// `devices/+/messages/events/#`. Measures in→out messages/s and send→receive latency.
    #[arg(long)]
    telemetry: bool,
    /// With `--telemetry`: publishes waiting for their PUBACK at once, over all client processes.
    #[arg(long, default_value_t = 512)]
    publish_in_flight: usize,
    /// Print, for each client process and round, the slowest send→receive latency in each
    /// twentieth of its messages in arrival order: a backlog that grows through the round (the
    /// devices reading slower than the server writes) rises from part to part, a stall is one peak.
    #[arg(long)]
    latency_timeline: bool,
    /// Keep the work directory (server logs, configurations).
    #[arg(long)]
    keep_work: bool,
}

/// `--rate`: a finite number of messages a second above zero (0 would never send; leave the flag
/// out for full speed).
fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!("{s:?} is not a rate above 0 messages a second (leave --rate out for full speed)")),
    }
}

/// Parts [`timeline_maxima`] cuts a client's latencies into for `--latency-timeline`.
const TIMELINE_PARTS: usize = 20;

/// The largest of each of `parts` consecutive, (nearly) equal runs of `lat`, in order; fewer when
/// `lat` has fewer values than `parts`.
fn timeline_maxima(lat: &[u32], parts: usize) -> Vec<u32> {
    let per = lat.len().div_ceil(parts.max(1)).max(1);
    lat.chunks(per).filter_map(|c| c.iter().copied().max()).collect()
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
        /// Serve plain MQTT with the task-less drivers or a task per connection, as the hub's
        /// `--mqtt-plain-driver`.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        mqtt_plain_driver: bool,
    },
    /// (internal) The floor broker: the least an MQTT server can do for this bench
    /// (`testbench::fanout::floor`); serves until signalled.
    #[command(hide = true)]
    FloorServe {
        #[arg(long)]
        listen: SocketAddr,
        /// io_uring instead of epoll.
        #[arg(long)]
        uring: bool,
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
        Some(Internal::HubServe { data_dir, mqtt_plain_driver }) => {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .event_interval(iothub_emulator::server::RUNTIME_EVENT_INTERVAL)
                .build()?
                .block_on(hub_serve(&data_dir, mqtt_plain_driver))
        }
        Some(Internal::FloorServe { listen, uring }) => {
            let listener = std::net::TcpListener::bind(listen)?;
            if uring {
                fanout::floor::serve_uring(listener)?;
            } else {
                fanout::floor::serve_epoll(listener)?;
            }
            Ok(())
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

async fn hub_serve(data_dir: &Path, mqtt_plain_driver: bool) -> Result<()> {
    use iothub_emulator::server::{ListenConfig, RunningHub, shutdown_on_signal};
    let listen = ListenConfig {
        ftp_port: None,
        mqtt_plain_driver,
        ..ListenConfig::ephemeral(Ipv4Addr::LOCALHOST.into())
    };
    let running = RunningHub::start(iothub_emulator::HubConfig::default(), &listen, data_dir).await?;
    println!("http://{}", running.http_addr);
    println!("mqtt://{}", running.mqtt_plain_addr.context("plain MQTT listener")?);
    println!("amqp://{}", running.amqp_plain_addr.context("plain AMQP listener")?);
    tokio::spawn(shutdown_on_signal(running.shutdown_token()));
    running.wait().await?;
    Ok(())
}

/// One server's numbers from one run.
/// One round of the fan-out (one message to every device).
#[derive(Debug, Clone, Default)]
struct Round {
    fanout_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_msg: f64,
    client_cpu_us_per_msg: f64,
    /// The sender's (this process's) CPU while it sent the round.
    sender_cpu_us_per_msg: f64,
    /// Server RSS growth since before the connects, per device, after this round.
    kib_after: f64,
    /// Bytes the server handed to `write`-like calls during the round (sockets and files,
    /// `/proc/<pid>/io` `wchar`), per delivered message.
    wchar_per_msg: f64,
    /// Bytes the server caused to be written to storage during the round (`write_bytes`), per
    /// delivered message.
    disk_per_msg: f64,
}

/// One server's numbers from one run.
#[derive(Debug, Clone, Default)]
struct Measured {
    connect_per_s: f64,
    /// Server RSS growth per device once every device is connected and subscribed.
    kib_idle: f64,
    /// Round 1 (each device's first message), then any further rounds.
    rounds: Vec<Round>,
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

/// `perf record` of a server, sampling only between [`start_perf`] and [`stop_perf`].
struct Perf {
    child: Child,
    ctl: std::fs::File,
    ack: BufReader<tokio::fs::File>,
    out: PathBuf,
}

/// What `perf stat` counts with `--syscalls`.
const SYSCALL_EVENTS: &[&str] = &[
    "raw_syscalls:sys_enter",
    "syscalls:sys_enter_sendto",
    "syscalls:sys_enter_write",
    "syscalls:sys_enter_writev",
    "syscalls:sys_enter_sendmsg",
    "syscalls:sys_enter_recvfrom",
    "syscalls:sys_enter_read",
    "syscalls:sys_enter_recvmsg",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_futex",
    "syscalls:sys_enter_getrandom",
    "syscalls:sys_enter_epoll_ctl",
    "syscalls:sys_enter_sched_yield",
    "syscalls:sys_enter_madvise",
    "syscalls:sys_enter_mprotect",
    "context-switches",
    "page-faults",
];

/// Starts `perf record` on `pid` when asked, and returns once perf acknowledged that it samples
/// (perf starts disabled and is enabled over its control FIFO: attaching takes a while, and the
/// fan-out must not begin before it is recorded).
/// With `stat`, `perf stat` counts [`SYSCALL_EVENTS`] instead of sampling stacks.
async fn start_perf(dir: Option<&Path>, pid: u32, name: &str, stat: bool, freq: u32) -> Result<Option<Perf>> {
    let Some(dir) = dir else { return Ok(None) };
    std::fs::create_dir_all(dir)?;
    let name = if stat { format!("{name}.stat") } else { name.to_string() };
    let out = dir.join(if stat { format!("{name}.csv") } else { format!("{name}.perf.data") });
    let (ctl_path, ack_path) = (dir.join(format!("{name}.ctl")), dir.join(format!("{name}.ack")));
    for f in [&ctl_path, &ack_path] {
        let _ = std::fs::remove_file(f);
        let c = std::ffi::CString::new(f.as_os_str().as_encoded_bytes())?;
        // SAFETY: `c` is a valid NUL-terminated path.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            bail!("mkfifo {}: {}", f.display(), std::io::Error::last_os_error());
        }
    }
    let mut cmd = Command::new("perf");
    if stat {
        cmd.args(["stat", "-x", ",", "-D", "-1", "-e", &SYSCALL_EVENTS.join(",")]);
    } else {
        cmd.args([
            "record",
            "-q",
            "-D",
            "-1",
            "-e",
            "cpu-clock",
            "-F",
            &freq.to_string(),
            "--call-graph",
            "dwarf,16384",
        ]);
    }
    let child = cmd
        .arg(format!("--control=fifo:{},{}", ctl_path.display(), ack_path.display()))
        .arg("-o")
        .arg(&out)
        .args(["-p", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.perf.log")))?)
        .kill_on_drop(true)
        .spawn()
        .context("perf record (apt-get install -y linux-perf)")?;
    let opened = tokio::time::timeout(Duration::from_secs(30), async {
        // Opening a FIFO blocks until perf opens the other end.
        let ctl = tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(ctl_path));
        let ack = tokio::fs::File::open(ack_path);
        let (ctl, ack) = tokio::join!(ctl, ack);
        anyhow::Ok((ctl??, ack?))
    })
    .await
    .context("perf did not open its control FIFOs within 30 s")??;
    let mut perf = Perf { child, ctl: opened.0, ack: BufReader::new(opened.1), out };
    perf_control(&mut perf, "enable").await?;
    Ok(Some(perf))
}

async fn perf_control(perf: &mut Perf, cmd: &str) -> Result<()> {
    use std::io::Write;
    writeln!(perf.ctl, "{cmd}")?;
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(30), perf.ack.read_line(&mut line))
        .await
        .with_context(|| format!("perf did not acknowledge {cmd:?} within 30 s"))??;
    Ok(())
}

/// Stops perf; for `perf stat`, returns its counts by event.
async fn stop_perf(perf: Option<Perf>) -> BTreeMap<String, f64> {
    let mut counts = BTreeMap::new();
    if let Some(mut p) = perf {
        let _ = perf_control(&mut p, "disable").await;
        if let Some(pid) = p.child.id() {
            // SAFETY: signals the perf process this bench started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
        }
        if tokio::time::timeout(Duration::from_secs(60), p.child.wait()).await.is_err() {
            let _ = p.child.kill().await;
        }
        // `perf stat -x ,` lines: count,unit,event,...
        for line in std::fs::read_to_string(&p.out).unwrap_or_default().lines() {
            let f: Vec<&str> = line.split(',').collect();
            if let (Some(c), Some(e)) = (f.first().and_then(|c| c.parse::<f64>().ok()), f.get(2)) {
                counts.insert(e.to_string(), c);
            }
        }
    }
    counts
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
    let subscribed = if a.telemetry {
        Vec::new()
    } else {
        clients.command("subscribe", "subscribed", Duration::from_secs(300)).await?
    };
    if sum(&subscribed, "failed") > 0 {
        m.problems.push(format!(
            "{} subscribes failed (first: {})",
            sum(&subscribed, "failed"),
            first_error(&subscribed).unwrap_or_default()
        ));
    }
    settle(pid).await;
    let rss_idle = procfs::rss_kib(pid).context("server RSS")?;
    m.kib_idle = rss_idle.saturating_sub(rss_base) as f64 / n as f64;
    println!(
        "  connect {ok}/{n} in {connect_secs:.2} s ({:.0}/s); RSS {:.1} MiB before connects, +{:.1} MiB connected \
         and subscribed ({:.2} KiB/conn)",
        m.connect_per_s,
        rss_base as f64 / 1024.0,
        rss_idle.saturating_sub(rss_base) as f64 / 1024.0,
        m.kib_idle,
    );

    let mut received_all = 0;
    let mut reader = None;
    let result = async {
        if a.telemetry {
            let source = telemetry_source(server)?;
            reader = Some(
                tokio::time::timeout(Duration::from_secs(30), testbench::fanout::telemetry::open(&source))
                    .await
                    .context("the telemetry reader did not attach within 30 s")??,
            );
        }
        for round in 1..=a.rounds {
            let (r, received) = if let Some(reader) = &mut reader {
                telemetry_round(a, server, &mut clients, reader, round, rss_base, &mut m.problems).await?
            } else {
                fan_out(a, server, &mut clients, round, rep, rss_base, &mut m.problems).await?
            };
            received_all += received;
            m.rounds.push(r);
        }
        anyhow::Ok(())
    }
    .await;
    clients.stop().await?;
    if let Some(r) = reader {
        r.close();
    }
    result?;
    m.lost = (n * a.rounds as usize).saturating_sub(received_all);
    if m.lost > 0 {
        println!("  LOST {} of {} messages", m.lost, n * a.rounds as usize);
    }
    for p in &m.problems {
        println!("  PROBLEM: {p}");
    }
    Ok(m)
}

/// One round: one message to every device, interleaved over the client processes; returns the
/// round's numbers and how many messages arrived.
async fn fan_out(
    a: &RunArgs,
    server: &Server,
    clients: &mut Clients,
    round: u32,
    rep: usize,
    rss_base: u64,
    problems: &mut Vec<String>,
) -> Result<(Round, usize)> {
    let (n, pid) = (a.devices, server.pid);
    let via = match (server.kind, server.http, server.amqp) {
        (k, Some(http), _) if k.is_rest_hub() => Via::Rest { http, token: owner_token()? },
        (k, _, Some(addr)) if k.is_hub() && !k.is_rest_hub() => Via::Amqp { addr, token: owner_token()? },
        (k, ..) if k.is_hub() => bail!("the hub printed no address for its {} sender", k.name()),
        _ => Via::Mqtt { addr: server.mqtt },
    };
    let sender = Sender::open(via, a.send_conns, a.send_window, a.payload_bytes, a.rate).await?;
    settle(pid).await;
    let run_name = format!("{}-rep{rep}-round{round}", server.kind.name());
    let perf = start_perf(a.perf_dir.as_deref(), pid, &run_name, false, a.perf_freq).await?;
    let stat_dir =
        a.syscalls.then(|| a.perf_dir.clone().unwrap_or_else(|| std::env::temp_dir().join("fanout-perf")));
    let stat = start_perf(stat_dir.as_deref(), pid, &run_name, true, a.perf_freq).await?;
    let cpu0 = server_cpu_ns(pid)?;
    let io0 = write_counters(pid).context("server /proc/<pid>/io")?;
    let order: Vec<usize> = (0..n).collect();
    let own0 = procfs::cpu_us(std::process::id()).context("sender CPU")?;
    let sent: SendStats = sender.run(&order, round, Duration::from_secs(a.timeout_secs)).await;
    let own1 = procfs::cpu_us(std::process::id()).context("sender CPU")?;
    let collected = clients
        .command(
            &format!("collect {round} {}", a.timeout_secs * 1000),
            "collected",
            Duration::from_secs(a.timeout_secs + 30),
        )
        .await?;
    settle(pid).await;
    let cpu1 = server_cpu_ns(pid)?;
    let io1 = write_counters(pid).context("server /proc/<pid>/io")?;
    stop_perf(perf).await;
    let syscalls = stop_perf(stat).await;
    settle(pid).await;
    let rss_after = procfs::rss_kib(pid).context("server RSS")?;

    let received = sum(&collected, "received");
    let last_ns = collected.iter().map(|c| num(c, "last_ns") as u64).max().unwrap_or(0);
    if a.latency_timeline {
        for (i, c) in collected.iter().enumerate() {
            let l: Vec<u32> = c
                .get("lat_us")
                .map(|l| l.split(',').filter_map(|v| v.parse().ok()).collect())
                .unwrap_or_default();
            let maxes: Vec<String> = timeline_maxima(&l, TIMELINE_PARTS)
                .iter()
                .map(|us| format!("{:.1}", f64::from(*us) / 1000.0))
                .collect();
            eprintln!(
                "  client {i}: {} messages, the slowest of each {}th of them in arrival order (ms): {}",
                l.len(),
                TIMELINE_PARTS,
                maxes.join(" ")
            );
        }
    }
    let mut lat: Vec<u32> = collected
        .iter()
        .filter_map(|c| c.get("lat_us"))
        .flat_map(|l| l.split(',').filter_map(|v| v.parse().ok()))
        .collect();
    lat.sort_unstable();
    let secs = last_ns.saturating_sub(sent.first_ns) as f64 / 1e9;
    let r = Round {
        fanout_per_s: if secs > 0.0 { received as f64 / secs } else { 0.0 },
        p50_ms: fanout::quantile(&lat, 0.50).unwrap_or(0) as f64 / 1000.0,
        p99_ms: fanout::quantile(&lat, 0.99).unwrap_or(0) as f64 / 1000.0,
        cpu_us_per_msg: cpu_delta_ns(cpu0, cpu1) as f64 / 1000.0 / received.max(1) as f64,
        client_cpu_us_per_msg: sum(&collected, "cpu_us") as f64 / received.max(1) as f64,
        sender_cpu_us_per_msg: own1.saturating_sub(own0) as f64 / received.max(1) as f64,
        kib_after: rss_after.saturating_sub(rss_base) as f64 / n as f64,
        wchar_per_msg: io1.wchar.saturating_sub(io0.wchar) as f64 / received.max(1) as f64,
        disk_per_msg: io1.write_bytes.saturating_sub(io0.write_bytes) as f64 / received.max(1) as f64,
    };
    if sent.failed > 0 {
        problems.push(format!(
            "round {round}: {} sends failed (first: {})",
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
            problems.push(format!(
                "round {round}: {} {what} (first: {})",
                sum(&collected, k),
                first_error(&collected).unwrap_or_default()
            ));
        }
    }
    println!(
        "  round {round}: fan-out {received}/{n} in {secs:.3} s ({:.0} msg/s), p50 {:.2} ms, p99 {:.2} ms; \
         server CPU {:.3} s ({:.1} µs/msg); client CPU {:.1} µs/msg, sender {:.1}; RSS +{:.1} MiB after ({:.2} KiB/conn); \
         server writes {:.0} B/msg (wchar), {:.0} B/msg to storage",
        r.fanout_per_s,
        r.p50_ms,
        r.p99_ms,
        cpu_delta_ns(cpu0, cpu1) as f64 / 1e9,
        r.cpu_us_per_msg,
        r.client_cpu_us_per_msg,
        r.sender_cpu_us_per_msg,
        rss_after.saturating_sub(rss_base) as f64 / 1024.0,
        r.kib_after,
        r.wchar_per_msg,
        r.disk_per_msg,
    );
    if !syscalls.is_empty() {
        let per: Vec<String> = SYSCALL_EVENTS
            .iter()
            .filter_map(|e| {
                let c = syscalls.get(*e)?;
                let short = e.rsplit(':').next().unwrap_or(e).trim_start_matches("sys_enter_");
                Some(format!(
                    "{} {:.2}",
                    if short == "sys_enter" { "all" } else { short },
                    c / received.max(1) as f64
                ))
            })
            .collect();
        println!("  server system calls and context switches per delivered message: {}", per.join(", "));
    }
    Ok((r, received))
}

/// The server's CPU time in nanoseconds: the on-CPU time of its threads
/// (`/proc/<pid>/task/*/schedstat`, nanosecond resolution; a fan-out round is 0.2-0.5 s, where the
/// 10 ms ticks of `/proc/<pid>/stat` are 2-5%). A thread that exits during the round would take its
/// time with it, so when the tick count grew by more (by over a tick), that is used instead.
fn server_cpu_ns(pid: u32) -> Result<(u64, u64)> {
    let ticks_us = procfs::cpu_us(pid).context("server CPU")?;
    let run_ns = procfs::run_ns(pid).context("server CPU (schedstat)")?;
    Ok((run_ns, ticks_us))
}

/// CPU nanoseconds between two [`server_cpu_ns`] readings.
fn cpu_delta_ns(a: (u64, u64), b: (u64, u64)) -> u64 {
    let (run, ticks) = (b.0.saturating_sub(a.0), b.1.saturating_sub(a.1) * 1000);
    if ticks > run + 10_000_000 { ticks } else { run }
}

/// Where the telemetry reader reads `server`'s telemetry: the hub's Event Hub-compatible endpoint
/// (an entity token of its owner policy), or an MQTT peer's broker.
fn telemetry_source(server: &Server) -> Result<testbench::fanout::telemetry::Source> {
    use testbench::fanout::telemetry::Source;
    Ok(match (server.kind.is_hub(), server.amqp) {
        (true, Some(addr)) => {
            let host = fanout::HOSTNAME;
            let event_hub = iothub_emulator::hub::events::event_hub_name_for(host);
            let expiry =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 86_400;
            let token = iothub_emulator::sas::make_token(
                &format!("sb://{host}/{event_hub}"),
                iothub_emulator::hub::DEFAULT_OWNER_KEY,
                Some(iothub_emulator::sas::OWNER_POLICY),
                expiry,
            )?;
            Source::EventHub {
                addr,
                host: host.into(),
                event_hub,
                partitions: iothub_emulator::hub::events::DEFAULT_PARTITIONS as u32,
                token,
            }
        }
        (true, None) => bail!("the hub printed no AMQP address"),
        (false, _) => Source::Mqtt(server.mqtt),
    })
}

/// One telemetry round: every device publishes one QoS 1 message, one reader takes them all out
/// (see `--telemetry`); returns the round's numbers and how many messages the reader got.
async fn telemetry_round(
    a: &RunArgs,
    server: &Server,
    clients: &mut Clients,
    reader: &mut testbench::fanout::telemetry::Reader,
    round: u32,
    rss_base: u64,
    problems: &mut Vec<String>,
) -> Result<(Round, usize)> {
    let (n, pid) = (a.devices, server.pid);
    settle(pid).await;
    let cpu0 = procfs::cpu_us(pid).context("server CPU")?;
    let deadline = Instant::now() + Duration::from_secs(a.timeout_secs);
    let in_flight = (a.publish_in_flight / a.client_procs.max(1)).max(1);
    let cmd = format!("publish {round} {in_flight}");
    let (got, published) = tokio::join!(
        testbench::fanout::telemetry::read(reader, n, round, n, deadline),
        clients.command(&cmd, "published", Duration::from_secs(a.timeout_secs + 30),)
    );
    let published = published?;
    settle(pid).await;
    let cpu1 = procfs::cpu_us(pid).context("server CPU")?;
    let rss_after = procfs::rss_kib(pid).context("server RSS")?;
    let first_ns = published.iter().map(|c| num(c, "first_ns") as u64).filter(|&t| t > 0).min().unwrap_or(0);
    let mut lat = got.lat_us.clone();
    lat.sort_unstable();
    let secs = got.last_ns.saturating_sub(first_ns) as f64 / 1e9;
    let received = got.received;
    let r = Round {
        fanout_per_s: if secs > 0.0 { received as f64 / secs } else { 0.0 },
        p50_ms: fanout::quantile(&lat, 0.50).unwrap_or(0) as f64 / 1000.0,
        p99_ms: fanout::quantile(&lat, 0.99).unwrap_or(0) as f64 / 1000.0,
        cpu_us_per_msg: cpu1.saturating_sub(cpu0) as f64 / received.max(1) as f64,
        client_cpu_us_per_msg: sum(&published, "cpu_us") as f64 / received.max(1) as f64,
        kib_after: rss_after.saturating_sub(rss_base) as f64 / n as f64,
        // Not measured for telemetry (the table's write columns show 0).
        ..Round::default()
    };
    if sum(&published, "failed") > 0 {
        problems.push(format!(
            "round {round}: {} publishes failed (first: {})",
            sum(&published, "failed"),
            first_error(&published).unwrap_or_default()
        ));
    }
    if got.dups > 0 || got.bad > 0 || got.error.is_some() {
        problems.push(format!(
            "round {round}: reader: {} duplicates, {} foreign messages, {}",
            got.dups,
            got.bad,
            got.error.as_deref().unwrap_or("no error")
        ));
    }
    println!(
        "  round {round}: telemetry in {} PUBACKed, out {received}/{n} in {secs:.3} s ({:.0} msg/s), p50 {:.2} ms, \
         p99 {:.2} ms; server CPU {:.3} s ({:.1} µs/msg); RSS +{:.1} MiB after ({:.2} KiB/conn)",
        sum(&published, "ok"),
        r.fanout_per_s,
        r.p50_ms,
        r.p99_ms,
        cpu1.saturating_sub(cpu0) as f64 / 1e6,
        r.cpu_us_per_msg,
        rss_after.saturating_sub(rss_base) as f64 / 1024.0,
        r.kib_after,
    );
    Ok((r, received))
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The order the `count` servers run in repetition `rep` (from 1): the listed order rotated by
/// `rep - 1`. A server that follows another's 19,000 connections can measure differently from one
/// that starts on a quiet machine (bench/README.md), so each takes every place in turn.
fn rep_order(count: usize, rep: usize) -> impl Iterator<Item = usize> {
    let start = if count == 0 { 0 } else { (rep.max(1) - 1) % count };
    (0..count).map(move |k| (start + k) % count)
}

/// Medians over repetitions, per metric (and per round).
fn medians(runs: &[Measured]) -> Measured {
    let f = |g: &dyn Fn(&Measured) -> f64| median(runs.iter().map(g).collect());
    let rounds = runs.iter().map(|m| m.rounds.len()).min().unwrap_or(0);
    Measured {
        connect_per_s: f(&|m| m.connect_per_s),
        kib_idle: f(&|m| m.kib_idle),
        rounds: (0..rounds)
            .map(|i| Round {
                fanout_per_s: f(&|m| m.rounds[i].fanout_per_s),
                p50_ms: f(&|m| m.rounds[i].p50_ms),
                p99_ms: f(&|m| m.rounds[i].p99_ms),
                cpu_us_per_msg: f(&|m| m.rounds[i].cpu_us_per_msg),
                client_cpu_us_per_msg: f(&|m| m.rounds[i].client_cpu_us_per_msg),
                sender_cpu_us_per_msg: f(&|m| m.rounds[i].sender_cpu_us_per_msg),
                kib_after: f(&|m| m.rounds[i].kib_after),
                wchar_per_msg: f(&|m| m.rounds[i].wchar_per_msg),
                disk_per_msg: f(&|m| m.rounds[i].disk_per_msg),
            })
            .collect(),
        lost: runs.iter().map(|m| m.lost).max().unwrap_or(0),
        problems: runs.iter().flat_map(|m| m.problems.clone()).collect(),
    }
}

/// The table of round `round` (0-based) with the hub/peer ratios.
fn print_table(
    found: &[Found],
    skipped: &BTreeMap<usize, String>,
    table: &[(usize, Measured)],
    round: usize,
    title: &str,
) {
    let pick = |m: &Measured| m.rounds.get(round).cloned().unwrap_or_default();
    println!("{title}");
    println!(
        "{:<20} {:>10} {:>10} {:>8} {:>8} {:>11} {:>9} {:>9} {:>6} {:>9} {:>9}",
        "server",
        "connect/s",
        "fan-out/s",
        "p50 ms",
        "p99 ms",
        "CPU µs/msg",
        "KiB/conn",
        "KiB/conn",
        "lost",
        "wchar",
        "disk"
    );
    println!(
        "{:<20} {:>10} {:>10} {:>8} {:>8} {:>11} {:>9} {:>9} {:>6} {:>9} {:>9}",
        "", "", "", "", "", "", "idle", "after", "", "B/msg", "B/msg"
    );
    for (i, f) in found.iter().enumerate() {
        if let Some(why) = skipped.get(&i) {
            println!("{:<20} SKIPPED ({why})", f.label);
            continue;
        }
        match table.iter().find(|(j, _)| *j == i) {
            None => println!("{:<20} FAILED (no successful run)", f.label),
            Some((_, m)) => {
                let r = pick(m);
                println!(
                    "{:<20} {:>10.0} {:>10.0} {:>8.2} {:>8.2} {:>11.1} {:>9.2} {:>9.2} {:>6} {:>9.0} {:>9.0}",
                    f.label,
                    m.connect_per_s,
                    r.fanout_per_s,
                    r.p50_ms,
                    r.p99_ms,
                    r.cpu_us_per_msg,
                    m.kib_idle,
                    r.kib_after,
                    m.lost,
                    r.wchar_per_msg,
                    r.disk_per_msg
                )
            }
        }
    }
    let r = |x: f64, y: f64| if y > 0.0 { format!("{:.2}x", x / y) } else { "n/a".into() };
    // The hub with `--persist` against the same hub in memory, same run.
    for (pi, p) in table.iter() {
        let Some(twin) = found[*pi].kind.in_memory_twin() else { continue };
        let Some((mi, m)) = table.iter().find(|(i, _)| found[*i].kind == twin) else { continue };
        let (pr, mr) = (pick(p), pick(m));
        println!(
            "{:<20} fan-out {}  p50 {}  p99 {}  CPU/msg {}  wchar +{:.0} B/msg  disk +{:.0} B/msg",
            format!("{}/{}", found[*pi].kind.name(), found[*mi].kind.name()),
            r(pr.fanout_per_s, mr.fanout_per_s),
            r(pr.p50_ms, mr.p50_ms),
            r(pr.p99_ms, mr.p99_ms),
            r(pr.cpu_us_per_msg, mr.cpu_us_per_msg),
            pr.wchar_per_msg - mr.wchar_per_msg,
            pr.disk_per_msg - mr.disk_per_msg,
        );
    }
    // The hub against every peer (and the floor), and the floor against every peer.
    let compared = |k: Kind| (k.is_hub() && !k.persist()) || k.is_floor();
    for (hi, h) in table.iter().filter(|(i, _)| compared(found[*i].kind)) {
        let hr = pick(h);
        for (i, p) in table {
            let f = &found[*i];
            if f.kind.is_hub() || (f.kind.is_floor() && found[*hi].kind.is_floor()) {
                continue;
            }
            let pr = pick(p);
            println!(
                "{:<20} connect {}  fan-out {}  p50 {}  p99 {}  CPU/msg {}  mem idle {}  mem after {}",
                format!("{}/{}", found[*hi].kind.name(), f.kind.name()),
                r(h.connect_per_s, p.connect_per_s),
                r(hr.fanout_per_s, pr.fanout_per_s),
                r(hr.p50_ms, pr.p50_ms),
                r(hr.p99_ms, pr.p99_ms),
                r(hr.cpu_us_per_msg, pr.cpu_us_per_msg),
                r(h.kib_idle, p.kib_idle),
                r(hr.kib_after, pr.kib_after),
            );
        }
    }
    println!(
        "(ratios hub/peer: above 1 is better for the hub for connect and fan-out, worse for the rest; \
              floor: the least any server can do, see bench/README.md)"
    );
    let client: Vec<String> = table
        .iter()
        .map(|(i, m)| {
            let r = pick(m);
            format!(
                "{} {:.1} + {:.1}",
                found[*i].kind.name(),
                r.client_cpu_us_per_msg,
                r.sender_cpu_us_per_msg
            )
        })
        .collect();
    println!("client CPU µs/msg (device processes + sender): {}", client.join(", "));
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
    let mut kinds: Vec<Kind> = a.servers.iter().map(|s| Kind::parse(s)).collect::<Result<_>>()?;
    if a.telemetry {
        // `hub-amqp` names the C2D sender; telemetry has one path out of the hub (its Event
        // Hub-compatible endpoint), measured as `hub`.
        kinds.retain(|k| k.is_rest_hub() || !k.is_hub());
    }
    let mut found = Vec::new();
    for k in &kinds {
        let explicit = match k {
            hub_kinds!() => a.hub_bin.as_deref(),
            Kind::Mosquitto => a.mosquitto_bin.as_deref(),
            Kind::Rumqttd => a.rumqttd_bin.as_deref(),
            Kind::Floor | Kind::FloorUring => None,
        };
        let mut f = servers::find(*k, explicit).await;
        if a.telemetry && k.is_hub() {
            f.label = f.label.replace("hub REST", "hub MQTT→EH");
        }
        found.push(f);
    }
    let work = std::env::temp_dir().join(format!("fanout-bench-{}", std::process::id()));
    let load_before = procfs::loadavg();
    println!(
        "{} bench: {} devices, {} client processes, connect in flight {}, sender {} conns x {} in flight{}, \
         {}-byte payload, QoS 1, {} round(s), {} rep(s); {} cores; load average {load_before}",
        if a.telemetry { "telemetry" } else { "fan-out" },
        a.devices,
        a.client_procs,
        a.connect_in_flight,
        a.send_conns,
        a.send_window,
        a.rate.map_or(String::new(), |r| format!(" paced at {r} msg/s")),
        a.payload_bytes,
        a.rounds,
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
        for i in rep_order(found.len(), rep) {
            let f = &found[i];
            if let Err(why) = &f.program {
                if !f.kind.is_hub() && a.allow_missing_peers {
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
        "\n{}, {} devices, {} of {} rep(s) per server{}; load average {load_before} before, {} after",
        if a.telemetry {
            "Telemetry MQTT QoS 1 in, reader out (fan-out/s = in→out msg/s)"
        } else {
            "C2D fan-out"
        },
        a.devices,
        if a.reps > 1 { "medians" } else { "one" },
        a.reps.max(1),
        if a.reps > 1 { " (per metric)" } else { "" },
        procfs::loadavg()
    );
    print_table(&found, &skipped, &table, 0, "round 1: each device's first message");
    if a.rounds > 1 {
        println!();
        print_table(&found, &skipped, &table, a.rounds as usize - 1, &format!("round {}", a.rounds));
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

#[cfg(test)]
mod tests {
    use super::{positive_rate, rep_order, timeline_maxima};

    #[test]
    fn a_rate_is_a_finite_number_above_zero() {
        assert_eq!(positive_rate("20000"), Ok(20000.0));
        assert_eq!(positive_rate("0.5"), Ok(0.5));
        for bad in ["0", "-5", "NaN", "inf", "fast"] {
            assert!(positive_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_timeline_keeps_the_slowest_of_each_part_in_order() {
        assert_eq!(timeline_maxima(&[1, 5, 2, 2, 9, 3, 4], 3), [5, 9, 4]);
        assert_eq!(timeline_maxima(&[1, 2, 3, 4], 2), [2, 4]);
        assert_eq!(timeline_maxima(&[7, 3], 20), [7, 3]);
        assert!(timeline_maxima(&[], 20).is_empty());
    }

    #[test]
    fn each_repetition_starts_one_server_later_and_runs_every_server_once() {
        let orders: Vec<Vec<usize>> = (1..=4).map(|rep| rep_order(3, rep).collect()).collect();
        assert_eq!(orders, [vec![0, 1, 2], vec![1, 2, 0], vec![2, 0, 1], vec![0, 1, 2]]);
        assert_eq!(rep_order(1, 5).collect::<Vec<_>>(), [0]);
        assert_eq!(rep_order(0, 2).count(), 0);
    }
}
