//! The hub as a child process (the real `iothub-emulator` binary), for tests where the hub must
//! die for real: SIGKILL, then a restart on the same data directory (`--persist`, issue 15).
//!
//! [`hub_binary`] builds the binary (a no-op when it is fresh) into a target directory beside the
//! test's; [`HubProcess::start`] runs it on an SDK loopback address (`127.0.0.N`, the SDKs'
//! fixed ports 443, 8883 and 5671, like `TestHub::start_for_sdk`) and reads its startup lines.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a hub may take to print its startup lines (recovery included).
const START_WITHIN: Duration = Duration::from_secs(60);

/// Builds `iothub-emulator` (a no-op when it is fresh) into `<target>/hub-process/`, a target
/// directory of its own beside the one this test binary runs from, and returns its path. Its own
/// directory: cargo run from inside a test sees the test's environment, and sharing the test
/// build's directory made each build invalidate the other's artifacts.
pub fn hub_binary() -> Result<PathBuf> {
    // <target>/<profile>/deps/<test binary>
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).context("the test binary's directory")?;
    let target_dir = profile_dir.parent().context("the target directory")?.join("hub-process");
    let profile = profile_dir.file_name().and_then(|s| s.to_str()).unwrap_or("debug");
    let mut build = std::process::Command::new(env!("CARGO"));
    build
        .args(["build", "--quiet", "-p", "iothub-emulator", "--bin", "iothub-emulator", "--target-dir"])
        .arg(&target_dir)
        .current_dir(crate::repo_root());
    if profile == "release" {
        build.arg("--release");
    }
    let status = build.status().context("running cargo build for the hub binary")?;
    if !status.success() {
        bail!("cargo build -p iothub-emulator --bin iothub-emulator failed ({status})");
    }
    let bin = target_dir.join(profile).join(format!("iothub-emulator{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        bail!("{} is missing after the build", bin.display());
    }
    Ok(bin)
}

/// A running hub process and what its startup lines said.
pub struct HubProcess {
    child: Child,
    /// The address every listener is bound to (also the host name).
    pub ip: IpAddr,
    /// The `iothubowner` connection string.
    pub owner_connection_string: String,
    /// The CA certificate file clients must trust.
    pub ca_path: PathBuf,
    /// The plain HTTP base URL.
    pub http_url: String,
}

/// Why a start failed.
pub enum StartError {
    /// The SDK ports on this address are taken: try another.
    AddressInUse(String),
    /// Anything else.
    Other(anyhow::Error),
}

impl HubProcess {
    /// Starts `bin` on `ip` with `data_dir` and `extra` flags, and waits for its startup lines.
    pub async fn start(bin: &Path, ip: IpAddr, data_dir: &Path, extra: &[&str]) -> Result<Self, StartError> {
        let mut child = Command::new(bin)
            .arg("--bind")
            .arg(ip.to_string())
            .arg("--hostname")
            .arg(ip.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--http-port", "0", "--no-ftp"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| StartError::Other(anyhow::anyhow!("starting {}: {e}", bin.display())))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let (mut cs, mut ca, mut http) = (None, None, None);
        let read = async {
            while let Some(line) = lines.next_line().await? {
                if let Some(v) = line.strip_prefix("IOTHUB_CONNECTION_STRING=") {
                    cs = Some(v.to_string());
                    break;
                } else if let Some(v) = line.strip_prefix("CA certificate: ") {
                    ca = Some(PathBuf::from(v));
                } else if line.starts_with("http://") {
                    http = Some(line.clone());
                }
            }
            std::io::Result::Ok(())
        };
        let read = tokio::time::timeout(START_WITHIN, read).await;
        let (Ok(Ok(())), Some(owner_connection_string), Some(ca_path), Some(http_url)) = (read, cs, ca, http)
        else {
            let _ = child.start_kill();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = tokio::time::timeout(Duration::from_secs(5), e.read_to_string(&mut err)).await;
            }
            let _ = child.wait().await;
            if err.contains("cannot bind") && err.contains("in use") {
                return Err(StartError::AddressInUse(err));
            }
            return Err(StartError::Other(anyhow::anyhow!("the hub did not start on {ip}: {err}")));
        };
        // Keep draining stdout, and stderr into the test's output, so the hub never blocks on a pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    eprintln!("hub {ip}: {line}");
                }
            });
        }
        Ok(Self { child, ip, owner_connection_string, ca_path, http_url })
    }

    /// Kills the hub with SIGKILL (no shutdown, nothing flushed) and waits for it to be gone.
    pub async fn kill(mut self) -> Result<()> {
        self.child.start_kill()?;
        let status = self.child.wait().await?;
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            if status.signal() != Some(libc::SIGKILL) {
                bail!("the hub ended with {status}, not by SIGKILL");
            }
        }
        Ok(())
    }

    /// What the SDK scripts need to reach this hub.
    pub fn script_env(&self) -> Vec<(&'static str, String)> {
        let ca = self.ca_path.display().to_string();
        vec![
            ("IOTHUB_CONNECTION_STRING", self.owner_connection_string.clone()),
            ("IOTHUB_HOSTNAME", self.ip.to_string()),
            ("IOTHUB_HTTP_URL", self.http_url.clone()),
            ("IOTHUB_CA_FILE", ca.clone()),
            ("REQUESTS_CA_BUNDLE", ca.clone()),
            ("SSL_CERT_FILE", ca.clone()),
            ("NODE_EXTRA_CA_CERTS", ca),
        ]
    }
}
