//! The servers under test, each started as its own process on free loopback ports and stopped
//! (SIGTERM, then SIGKILL after a deadline) when its run ends: the hub (`iothub-emulator` with
//! `--mqtt-plain-port 0 --amqp-plain-port 0`, or this binary's own `hub-serve`, the same library;
//! measured once per sender, REST and AMQP, in memory and, as `hub-persist` / `hub-amqp-persist`,
//! with `--persist`), Mosquitto from a
//! generated configuration (persistence off, no queue or in-flight limits, no connection logging)
//! and `rumqttd-peer` (rumqttd embedded, `bench/rumqttd-peer`). Readiness is awaited, never
//! slept for: the hub prints its bound addresses on stdout; the peers are polled with TCP
//! connects until they accept.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// How long a server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The pattern matching every [`Kind`] that is the hub: one list for the matches that find or
/// start it.
macro_rules! hub_kinds {
    () => {
        Kind::Hub
            | Kind::HubAmqp
            | Kind::HubPersist
            | Kind::HubAmqpPersist
            | Kind::HubAmqpDrivers
            | Kind::HubAmqpTasks
    };
}
pub(crate) use hub_kinds;

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The IoT Hub emulator, sent to through its REST send extension.
    Hub,
    /// The IoT Hub emulator, sent to over AMQP as the service SDKs do.
    HubAmqp,
    /// [`Kind::Hub`] with `--persist` (its state journaled under the data directory).
    HubPersist,
    /// [`Kind::HubAmqp`] with `--persist`.
    HubAmqpPersist,
    /// [`Kind::HubAmqp`] with `--mqtt-plain-driver`: the devices' connections served by the
    /// task-less drivers (the hub's default) whatever the default is.
    HubAmqpDrivers,
    /// [`Kind::HubAmqp`] with `--mqtt-plain-driver=false`: a task per device connection.
    HubAmqpTasks,
    /// Eclipse Mosquitto (Debian package).
    Mosquitto,
    /// rumqttd (crates.io), embedded in `rumqttd-peer`.
    Rumqttd,
    /// The floor broker (`testbench::fanout::floor`, this binary's `floor-serve`): forwards bytes
    /// and nothing else, to show what the kernel alone costs a message on this machine.
    Floor,
    /// [`Kind::Floor`] over io_uring (`floor-serve --uring`).
    FloorUring,
}

impl Kind {
    /// Parses a `--servers` entry.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "hub" => Ok(Self::Hub),
            "hub-amqp" => Ok(Self::HubAmqp),
            "hub-persist" => Ok(Self::HubPersist),
            "hub-amqp-persist" => Ok(Self::HubAmqpPersist),
            "hub-amqp-drivers" => Ok(Self::HubAmqpDrivers),
            "hub-amqp-tasks" => Ok(Self::HubAmqpTasks),
            "mosquitto" => Ok(Self::Mosquitto),
            "rumqttd" => Ok(Self::Rumqttd),
            "floor" => Ok(Self::Floor),
            "floor-uring" => Ok(Self::FloorUring),
            other => bail!(
                "unknown server {other:?}: use hub, hub-amqp, hub-persist, hub-amqp-persist, hub-amqp-drivers, \
                 hub-amqp-tasks, mosquitto, rumqttd, floor or floor-uring"
            ),
        }
    }

    /// Whether this is the hub (with either sender, in memory or with `--persist`).
    pub fn is_hub(self) -> bool {
        matches!(self, hub_kinds!())
    }

    /// For the hub, how its plain MQTT port is served when this kind says (`--mqtt-plain-driver`):
    /// `Some(true)` drivers, `Some(false)` a task per connection, `None` the hub's default.
    pub fn mqtt_plain_driver(self) -> Option<bool> {
        match self {
            Self::HubAmqpDrivers => Some(true),
            Self::HubAmqpTasks => Some(false),
            _ => None,
        }
    }

    /// Whether this is the floor broker (a lower bound, not a peer).
    pub fn is_floor(self) -> bool {
        matches!(self, Self::Floor | Self::FloorUring)
    }

    /// Whether this is the hub sent to through its REST extension.
    pub fn is_rest_hub(self) -> bool {
        matches!(self, Self::Hub | Self::HubPersist)
    }

    /// Whether this is the hub with `--persist`.
    pub fn persist(self) -> bool {
        matches!(self, Self::HubPersist | Self::HubAmqpPersist)
    }

    /// For a hub with `--persist`, the same hub in memory (its row to compare with).
    pub fn in_memory_twin(self) -> Option<Self> {
        match self {
            Self::HubPersist => Some(Self::Hub),
            Self::HubAmqpPersist => Some(Self::HubAmqp),
            _ => None,
        }
    }

    /// The short name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hub => "hub",
            Self::HubAmqp => "hub-amqp",
            Self::HubPersist => "hub-persist",
            Self::HubAmqpPersist => "hub-amqp-persist",
            Self::HubAmqpDrivers => "hub-amqp-drivers",
            Self::HubAmqpTasks => "hub-amqp-tasks",
            Self::Mosquitto => "mosquitto",
            Self::Rumqttd => "rumqttd",
            Self::Floor => "floor",
            Self::FloorUring => "floor-uring",
        }
    }
}

/// How to start the hub.
#[derive(Debug, Clone)]
pub enum HubBin {
    /// An `iothub-emulator` binary.
    Binary(PathBuf),
    /// This binary's `hub-serve` subcommand (the same library, built with the bench).
    SelfHosted,
}

/// A server binary found, or why not.
#[derive(Debug, Clone)]
pub struct Found {
    /// Which server.
    pub kind: Kind,
    /// The program to run.
    pub program: Result<PathBuf, String>,
    /// Its name and version for the table.
    pub label: String,
    /// For the hub: how it is started.
    pub hub: Option<HubBin>,
}

fn sibling(name: &str) -> Option<PathBuf> {
    let p = std::env::current_exe().ok()?.parent()?.join(name);
    p.is_file().then_some(p)
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Finds the program for `kind` (`explicit` overrides the search).
pub async fn find(kind: Kind, explicit: Option<&str>) -> Found {
    match kind {
        hub_kinds!() => {
            let sender = match (kind.is_rest_hub(), kind.persist()) {
                _ if kind == Kind::HubAmqpDrivers => "AMQP drivers",
                _ if kind == Kind::HubAmqpTasks => "AMQP tasks",
                (true, false) => "REST",
                (false, false) => "AMQP",
                (true, true) => "REST persist",
                (false, true) => "AMQP persist",
            };
            let hub = match explicit {
                Some("self") => HubBin::SelfHosted,
                Some(p) => HubBin::Binary(PathBuf::from(p)),
                None => sibling("iothub-emulator").map_or(HubBin::SelfHosted, HubBin::Binary),
            };
            let (program, label) = match &hub {
                HubBin::Binary(p) if !p.is_file() => {
                    (Err(format!("{} does not exist", p.display())), format!("hub {sender}"))
                }
                HubBin::Binary(p) => (Ok(p.clone()), format!("hub {sender}")),
                HubBin::SelfHosted => match std::env::current_exe() {
                    Ok(p) => (Ok(p), format!("hub {sender} (self)")),
                    Err(e) => (Err(e.to_string()), format!("hub {sender}")),
                },
            };
            Found { kind, program, label, hub: Some(hub) }
        }
        Kind::Mosquitto => {
            let program = explicit.map(PathBuf::from).or_else(|| on_path("mosquitto"));
            let Some(program) = program.filter(|p| p.is_file()) else {
                return Found {
                    kind,
                    program: Err("mosquitto is not installed (apt-get install -y mosquitto)".into()),
                    label: "mosquitto".into(),
                    hub: None,
                };
            };
            // `mosquitto -h` prints "mosquitto version 2.0.11" first (and exits 3).
            let version = Command::new(&program)
                .arg("-h")
                .output()
                .await
                .ok()
                .and_then(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .and_then(|l| l.strip_prefix("mosquitto version "))
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "?".into());
            Found { kind, program: Ok(program), label: format!("mosquitto {version}"), hub: None }
        }
        Kind::Rumqttd => {
            // Beside this binary, else in the release directory next to it (a debug build of the
            // bench, such as the smoke test's, finds what `bench/fanout.sh` built).
            let program = explicit.map(PathBuf::from).or_else(|| sibling("rumqttd-peer")).or_else(|| {
                let p = std::env::current_exe().ok()?.parent()?.parent()?.join("release/rumqttd-peer");
                p.is_file().then_some(p)
            });
            let Some(program) = program.filter(|p| p.is_file()) else {
                return Found {
                    kind,
                    program: Err("rumqttd-peer is not built (cargo build --release --manifest-path \
                                   bench/rumqttd-peer/Cargo.toml --target-dir target)"
                        .into()),
                    label: "rumqttd".into(),
                    hub: None,
                };
            };
            let version = Command::new(&program)
                .arg("--version")
                .output()
                .await
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "rumqttd ?".into());
            Found { kind, program: Ok(program), label: version, hub: None }
        }
        Kind::Floor | Kind::FloorUring => {
            let label = if kind == Kind::Floor { "floor (epoll)" } else { "floor (io_uring)" };
            Found {
                kind,
                program: std::env::current_exe().map_err(|e| e.to_string()),
                label: label.into(),
                hub: None,
            }
        }
    }
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    /// Which server.
    pub kind: Kind,
    /// Its process id (what `/proc` is read for).
    pub pid: u32,
    /// Its plain MQTT address.
    pub mqtt: SocketAddr,
    /// The hub's plain HTTP address.
    pub http: Option<SocketAddr>,
    /// The hub's plain AMQP address.
    pub amqp: Option<SocketAddr>,
    /// Where its logs go.
    pub log: PathBuf,
    child: Child,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

async fn accepts(child: &mut Child, addr: SocketAddr, log: &Path) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("exited with {status} before accepting on {addr}; log {}:\n{}", log.display(), tail(log));
        }
        if Instant::now() >= deadline {
            bail!("did not accept on {addr} within {START_TIMEOUT:?}; log {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The last lines of a log file, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl Server {
    /// Starts `found` with its files under `work`, ready for `devices` connections.
    pub async fn start(found: &Found, work: &Path, devices: usize) -> Result<Self> {
        let program = found.program.clone().map_err(|e| anyhow!(e))?;
        std::fs::create_dir_all(work)?;
        let log = work.join(format!("{}.log", found.kind.name()));
        let stderr = || -> Result<Stdio> { Ok(std::fs::File::create(&log)?.into()) };
        match found.kind {
            hub_kinds!() => {
                let mut cmd = Command::new(&program);
                let data = work.join("hub-data");
                match found.hub.as_ref().context("hub start mode")? {
                    HubBin::SelfHosted if found.kind.persist() => {
                        bail!(
                            "{} needs the iothub-emulator binary (--hub-bin): hub-serve has no --persist",
                            found.kind.name()
                        )
                    }
                    HubBin::SelfHosted => cmd.arg("hub-serve").arg("--data-dir").arg(&data),
                    HubBin::Binary(_) => cmd.arg("--data-dir").arg(&data).args([
                        "--https-port",
                        "0",
                        "--http-port",
                        "0",
                        "--mqtt-port",
                        "0",
                        "--amqp-port",
                        "0",
                        "--mqtt-plain-port",
                        "0",
                        "--amqp-plain-port",
                        "0",
                        "--no-ftp",
                    ]),
                };
                if found.kind.persist() {
                    cmd.arg("--persist");
                }
                if let Some(drivers) = found.kind.mqtt_plain_driver() {
                    cmd.arg(format!("--mqtt-plain-driver={drivers}"));
                }
                let mut child = cmd.stdout(Stdio::piped()).stderr(stderr()?).kill_on_drop(true).spawn()?;
                let pid = child.id().context("hub pid")?;
                let mut lines = BufReader::new(child.stdout.take().context("hub stdout")?).lines();
                let (mut http, mut mqtt, mut amqp) = (None, None, None);
                let deadline = Instant::now() + START_TIMEOUT;
                while http.is_none() || mqtt.is_none() || amqp.is_none() {
                    let line = tokio::time::timeout_at(deadline, lines.next_line())
                        .await
                        .map_err(|_| anyhow!("the hub printed no addresses within {START_TIMEOUT:?}"))??
                        .ok_or_else(|| {
                            anyhow!("the hub exited before printing its addresses:\n{}", tail(&log))
                        })?;
                    if let Some(a) = line.strip_prefix("http://") {
                        http = Some(a.parse::<SocketAddr>()?);
                    } else if let Some(a) = line.strip_prefix("mqtt://") {
                        mqtt = Some(a.parse::<SocketAddr>()?);
                    } else if let Some(a) = line.strip_prefix("amqp://") {
                        amqp = Some(a.parse::<SocketAddr>()?);
                    }
                }
                // Keep reading: the hub prints more lines, and a closed pipe would fail its writes.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                let mqtt = mqtt.context("mqtt address")?;
                Ok(Self { kind: found.kind, pid, mqtt, http, amqp, log, child })
            }
            Kind::Mosquitto => {
                let port = free_port()?;
                let conf = work.join("mosquitto.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "# generated by the fanout bench\n\
                         listener {port} 127.0.0.1\n\
                         max_connections -1\n\
                         allow_anonymous true\n\
                         persistence false\n\
                         max_queued_messages 0\n\
                         max_inflight_messages 0\n\
                         set_tcp_nodelay true\n\
                         sys_interval 0\n\
                         connection_messages false\n\
                         log_dest stderr\n\
                         log_type error\n\
                         log_type warning\n"
                    ),
                )?;
                let mut child = Command::new(&program)
                    .arg("-c")
                    .arg(&conf)
                    .stdout(Stdio::null())
                    .stderr(stderr()?)
                    .kill_on_drop(true)
                    .spawn()?;
                let pid = child.id().context("mosquitto pid")?;
                let mqtt = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                accepts(&mut child, mqtt, &log).await.context("mosquitto")?;
                Ok(Self { kind: found.kind, pid, mqtt, http: None, amqp: None, log, child })
            }
            Kind::Rumqttd => {
                let port = free_port()?;
                let mqtt = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                let mut child = Command::new(&program)
                    .arg("--listen")
                    .arg(mqtt.to_string())
                    .arg("--max-connections")
                    .arg((devices + 1000).to_string())
                    .stdout(Stdio::null())
                    .stderr(stderr()?)
                    .kill_on_drop(true)
                    .spawn()?;
                let pid = child.id().context("rumqttd pid")?;
                accepts(&mut child, mqtt, &log).await.context("rumqttd")?;
                Ok(Self { kind: found.kind, pid, mqtt, http: None, amqp: None, log, child })
            }
            Kind::Floor | Kind::FloorUring => {
                let mqtt = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
                let mut cmd = Command::new(&program);
                cmd.arg("floor-serve").arg("--listen").arg(mqtt.to_string());
                if found.kind == Kind::FloorUring {
                    cmd.arg("--uring");
                }
                let mut child = cmd.stdout(Stdio::null()).stderr(stderr()?).kill_on_drop(true).spawn()?;
                let pid = child.id().context("floor pid")?;
                accepts(&mut child, mqtt, &log).await.context("floor")?;
                Ok(Self { kind: found.kind, pid, mqtt, http: None, amqp: None, log, child })
            }
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL if it has not exited within the deadline.
    pub async fn stop(mut self) -> Result<()> {
        if !self.alive() {
            return Ok(());
        }
        // SAFETY: signals the process this bench started (its pid, still our unreaped child).
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        if tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await.is_err() {
            eprintln!("{} did not exit within {STOP_TIMEOUT:?} of SIGTERM; killing it", self.kind.name());
            self.child.kill().await?;
        }
        Ok(())
    }
}
