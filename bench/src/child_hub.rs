//! A hub the bench owns as a child process: the real `iothub-emulator` binary started on a data
//! directory (with `--persist` when asked), every listener on a free loopback port, its addresses
//! read from the startup lines it prints, and restarted on the same data directory and the same
//! ports after a crash (SIGKILL) or a graceful stop (SIGTERM). [`ChildHub`] owns the process and
//! its addresses; the hub owns its state (on disk with `--persist`).
//!
//! Readiness is polled, never slept for: [`ChildHub::start`] returns once `GET /health` answers
//! 200 (with `--persist` that is after the state was recovered).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Longest wait for the startup lines and then for `/health` (a debug build on a loaded machine,
/// or a big state to recover).
pub const START_WAIT: Duration = Duration::from_secs(60);
/// Longest wait for the process to exit after SIGTERM before it is killed.
pub const STOP_WAIT: Duration = Duration::from_secs(20);
/// How often `/health` is polled.
const HEALTH_POLL: Duration = Duration::from_millis(20);

/// Why the child hub could not be started, stopped or reached.
#[derive(Debug, thiserror::Error)]
pub enum ChildHubError {
    /// The binary was not found.
    #[error(
        "the iothub-emulator binary: {0}; build it (`cargo build -p iothub-emulator`), set \
         IOTHUB_EMULATOR_BIN or hub.binary"
    )]
    Binary(String),
    /// Spawning, signalling or waiting for the process failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The process did not come up (or exited), with what it said.
    #[error("the child hub did not start: {0}")]
    Start(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ChildHubError {
    let what = what.into();
    move |source| ChildHubError::Io { what, source }
}

/// How the hub is stopped by a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// SIGKILL: no shutdown code runs (kill -9, a container killed, a power cut for the process).
    Crash,
    /// SIGTERM: the hub's own shutdown runs, then the process exits.
    Graceful,
}

impl StopKind {
    /// The scenario file's name of the kind.
    pub fn name(self) -> &'static str {
        match self {
            Self::Crash => "crash",
            Self::Graceful => "graceful",
        }
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ChildHubConfig {
    /// The `iothub-emulator` binary.
    pub binary: PathBuf,
    /// `--data-dir` (state under `<data-dir>/state/` with `--persist`; the CA and packages too).
    pub data_dir: PathBuf,
    /// `--persist`.
    pub persist: bool,
    /// `--persist-sync`.
    pub persist_sync: bool,
    /// `--feedback-interval-ms`, if not the hub's default.
    pub feedback_interval_ms: Option<u64>,
    /// Any further flags, passed as given.
    pub extra_args: Vec<String>,
}

impl ChildHubConfig {
    /// A hub from `binary` on `data_dir`, in memory unless `persist`.
    pub fn new(binary: PathBuf, data_dir: PathBuf, persist: bool) -> Self {
        Self {
            binary,
            data_dir,
            persist,
            persist_sync: false,
            feedback_interval_ms: None,
            extra_args: Vec::new(),
        }
    }
}

/// Where the child's listeners are (loopback), as its startup lines said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ports {
    /// HTTPS (REST for services and devices).
    pub https: u16,
    /// Plain HTTP: `/health`, the admin endpoints, the same REST API.
    pub http: u16,
    /// MQTT over TLS.
    pub mqtt: u16,
    /// Plain MQTT (always on for a child hub: load tests on loopback).
    pub mqtt_plain: u16,
    /// AMQP over TLS.
    pub amqp: u16,
    /// FTP package server.
    pub ftp: u16,
}

/// What the startup lines say (every address is on 127.0.0.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Startup {
    /// The listeners.
    pub ports: Ports,
    /// The CA certificate file.
    pub ca_path: PathBuf,
    /// The owner's connection string.
    pub connection_string: String,
    /// The FTP packages directory.
    pub packages_dir: PathBuf,
}

/// Reads `port` out of `scheme://host:port` (the last `:`).
fn port_of(line: &str, scheme: &str) -> Option<u16> {
    line.strip_prefix(scheme)?.rsplit(':').next()?.parse().ok()
}

impl Startup {
    /// Reads the hub's startup lines (see `emulator/src/main.rs`); `None` until every line it
    /// needs is there (the connection string comes last).
    pub fn parse(lines: &[String]) -> Option<Self> {
        let mut s = Self::default();
        let mut seen = 0u8;
        for l in lines {
            let mut set = |slot: &mut u16, scheme: &str, bit: u8| {
                if let Some(p) = port_of(l, scheme) {
                    *slot = p;
                    seen |= bit;
                }
            };
            set(&mut s.ports.https, "https://", 1);
            set(&mut s.ports.http, "http://", 2);
            set(&mut s.ports.mqtt, "mqtts://", 4);
            set(&mut s.ports.mqtt_plain, "mqtt://", 8);
            set(&mut s.ports.amqp, "amqps://", 16);
            set(&mut s.ports.ftp, "ftp://", 32);
            if let Some(p) = l.strip_prefix("CA certificate: ") {
                s.ca_path = PathBuf::from(p);
                seen |= 64;
            }
            if let Some(p) = l.strip_prefix("FTP packages directory: ") {
                s.packages_dir = PathBuf::from(p);
            }
            if let Some(cs) = l.strip_prefix("IOTHUB_CONNECTION_STRING=") {
                s.connection_string = cs.to_string();
                seen |= 128;
            }
        }
        (seen == 255).then_some(s)
    }
}

/// The `iothub-emulator` binary: `explicit` if given, else `IOTHUB_EMULATOR_BIN`, else the one
/// beside this executable (a test's executable is one directory further down, in `deps/`).
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf, ChildHubError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(ChildHubError::Binary(format!("{} is not a file", p.display())))
        };
    }
    if let Some(p) = std::env::var_os("IOTHUB_EMULATOR_BIN") {
        return find_binary(Some(Path::new(&p)));
    }
    let exe = std::env::current_exe().map_err(|e| ChildHubError::Binary(e.to_string()))?;
    let dir = exe.parent().ok_or_else(|| ChildHubError::Binary("no executable directory".into()))?;
    let candidates = [dir.join("iothub-emulator"), dir.join("../iothub-emulator")];
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        ChildHubError::Binary(format!("not found beside {} (looked at {candidates:?})", exe.display()))
    })
}

/// Bytes a process handed to `write` and that reached the block device (`/proc/<pid>/io`:
/// `wchar`, `write_bytes`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteCounters {
    /// `wchar`: bytes passed to write-like system calls (sockets included).
    pub wchar: u64,
    /// `write_bytes`: bytes the process caused to be sent to storage.
    pub write_bytes: u64,
}

/// Reads `/proc/<pid>/io` (`None` when it cannot be read).
pub fn write_counters(pid: u32) -> Option<WriteCounters> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok());
    Some(WriteCounters { wchar: field("wchar:")?, write_bytes: field("write_bytes:")? })
}

/// The hub process and how to reach it.
pub struct ChildHub {
    config: ChildHubConfig,
    child: Child,
    startup: Startup,
    /// Starts so far (1 after [`ChildHub::start`]).
    starts: u32,
}

impl ChildHub {
    /// Starts the hub on free ports and waits until `/health` answers 200.
    pub async fn start(config: ChildHubConfig) -> Result<Self, ChildHubError> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(io(format!("creating {}", config.data_dir.display())))?;
        let (child, startup) = spawn(&config, None, 1).await?;
        let hub = Self { config, child, startup, starts: 1 };
        hub.wait_healthy().await?;
        Ok(hub)
    }

    /// What the startup lines said (the ports stay the same across restarts).
    pub fn startup(&self) -> &Startup {
        &self.startup
    }

    /// The plain HTTP base URL (`/health`, admin endpoints, REST).
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.startup.ports.http)
    }

    /// The process id (for `/proc/<pid>/io`); `None` once it exited.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Starts so far, the first included.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &ChildHubConfig {
        &self.config
    }

    /// Stops the process as `kind` says and waits for it to exit.
    pub async fn stop(&mut self, kind: StopKind) -> Result<(), ChildHubError> {
        match kind {
            StopKind::Crash => {
                self.child.start_kill().map_err(io("SIGKILL to the hub"))?;
                self.child.wait().await.map_err(io("waiting for the killed hub"))?;
            }
            StopKind::Graceful => {
                if let Some(pid) = self.child.id() {
                    // SAFETY: kill(2) with a pid this process spawned and still owns (not reaped).
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                }
                match tokio::time::timeout(STOP_WAIT, self.child.wait()).await {
                    Ok(r) => {
                        r.map_err(io("waiting for the hub to stop"))?;
                    }
                    Err(_) => {
                        let _ = self.child.start_kill();
                        let _ = self.child.wait().await;
                        return Err(ChildHubError::Start(format!(
                            "the hub did not exit within {STOP_WAIT:?} of SIGTERM (killed)"
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Stops the hub as `kind` says, starts it again on the same data directory and ports, and
    /// waits until `/health` answers 200.
    pub async fn restart(&mut self, kind: StopKind) -> Result<(), ChildHubError> {
        self.stop(kind).await?;
        self.starts += 1;
        let (child, startup) = spawn(&self.config, Some(&self.startup.ports), self.starts).await?;
        self.child = child;
        if startup.ports != self.startup.ports {
            return Err(ChildHubError::Start(format!(
                "restarted on other ports: {:?}, was {:?}",
                startup.ports, self.startup.ports
            )));
        }
        self.startup = startup;
        self.wait_healthy().await
    }

    /// Polls `GET /health` until it answers 200 (bounded by [`START_WAIT`]).
    pub async fn wait_healthy(&self) -> Result<(), ChildHubError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ChildHubError::Start(e.to_string()))?;
        let url = format!("{}/health", self.http_url());
        let deadline = Instant::now() + START_WAIT;
        loop {
            let last = match http.get(&url).send().await {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => format!("it answered {}", r.status()),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(ChildHubError::Start(format!(
                    "{url}: not healthy within {START_WAIT:?}: {last}"
                )));
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
    }
}

/// Spawns the binary (on `ports`, or free ones) and reads its startup lines. Its stderr goes to
/// `<data-dir>/hub-<start>.log`; stdout is drained after the startup lines.
async fn spawn(
    config: &ChildHubConfig,
    ports: Option<&Ports>,
    start: u32,
) -> Result<(Child, Startup), ChildHubError> {
    let log_path = config.data_dir.join(format!("hub-{start}.log"));
    let log = std::fs::File::create(&log_path).map_err(io(format!("creating {}", log_path.display())))?;
    let mut cmd = Command::new(&config.binary);
    // The child's settings are the flags below, not whatever IOTHUB_* the runner was started with.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("IOTHUB_") {
            cmd.env_remove(k);
        }
    }
    let p = ports.cloned().unwrap_or_default();
    cmd.arg("--data-dir").arg(&config.data_dir).args(["--bind", "127.0.0.1"]);
    for (flag, port) in [
        ("--https-port", p.https),
        ("--http-port", p.http),
        ("--mqtt-port", p.mqtt),
        ("--mqtt-plain-port", p.mqtt_plain),
        ("--amqp-port", p.amqp),
        ("--ftp-port", p.ftp),
    ] {
        cmd.arg(flag).arg(port.to_string());
    }
    if config.persist {
        cmd.arg("--persist");
    }
    if config.persist_sync {
        cmd.arg("--persist-sync");
    }
    if let Some(ms) = config.feedback_interval_ms {
        cmd.arg("--feedback-interval-ms").arg(ms.to_string());
    }
    cmd.args(&config.extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory: the hub dies
    // with the process that started it, even if that one is killed.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(io(format!("starting {}", config.binary.display())))?;
    let stdout = child.stdout.take().ok_or_else(|| ChildHubError::Start("no stdout".into()))?;
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    let deadline = Instant::now() + START_WAIT;
    let startup = loop {
        let next = tokio::time::timeout_at(deadline, lines.next_line()).await;
        match next {
            Ok(Ok(Some(line))) => {
                let last = line.starts_with("IOTHUB_CONNECTION_STRING=");
                seen.push(line);
                if last {
                    break Startup::parse(&seen).ok_or_else(|| {
                        ChildHubError::Start(format!("startup lines without every address: {seen:?}"))
                    })?;
                }
            }
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> =
                    log.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
                return Err(ChildHubError::Start(format!(
                    "it printed {seen:?} and no more (within {START_WAIT:?}); {}:\n{}",
                    log_path.display(),
                    tail.join("\n")
                )));
            }
        }
    };
    // Keep reading stdout so the hub never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, startup))
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_lines_give_every_port_and_need_the_connection_string() {
        let lines: Vec<String> = [
            "https://localhost:40001",
            "http://127.0.0.1:40002",
            "mqtts://localhost:40003",
            "mqtt://127.0.0.1:40004",
            "amqps://localhost:40005",
            "ftp://127.0.0.1:40006",
            "FTP packages directory: /d/packages",
            "CA certificate: /d/ca.pem",
            "EVENTHUB_CONNECTION_STRING=x",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(Startup::parse(&lines), None, "no connection string yet");
        let mut all = lines;
        all.push(
            "IOTHUB_CONNECTION_STRING=HostName=localhost;SharedAccessKeyName=o;SharedAccessKey=k".into(),
        );
        let s = Startup::parse(&all).unwrap();
        assert_eq!(
            s.ports,
            Ports { https: 40001, http: 40002, mqtt: 40003, mqtt_plain: 40004, amqp: 40005, ftp: 40006 }
        );
        assert_eq!(s.ca_path, PathBuf::from("/d/ca.pem"));
        assert_eq!(s.packages_dir, PathBuf::from("/d/packages"));
        assert!(s.connection_string.starts_with("HostName=localhost;"));
    }

    #[test]
    fn write_counters_of_this_process_are_read() {
        let before = write_counters(std::process::id()).expect("/proc/self/io readable");
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), vec![7u8; 10_000]).unwrap();
        let after = write_counters(std::process::id()).unwrap();
        assert!(after.wchar >= before.wchar + 10_000, "{before:?} -> {after:?}");
    }
}
