//! A fleet spread over child processes (`fleet.shards > 1`): each child is this same binary's
//! hidden `testbench fleet-shard` subcommand running the agents of devices `k` with
//! `k % shards == i`, so a big fleet is not capped by one process's open files. The runner owns
//! the children ([`ShardedFleet`]); each child owns its agents. Power switches and update checks
//! travel as lines on the child's stdin (`off <index>`, `on <index>`, `check <index>`, global
//! device indices); a closed stdin stops the child. A child says `started <n>` on stdout once its agents are started (after its share of the
//! connect ramp), which is when the timeline may begin.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use simulated_devices::fleet::{Fleet, UpdateRetry};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::RunError;
use super::shared::ShardLink;

/// The hidden subcommand children run.
pub const SUBCOMMAND: &str = "fleet-shard";
/// How long a child may take to stop its agents once its stdin closes.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// What one shard process runs: flags of `testbench fleet-shard`.
#[derive(Debug, Clone, clap::Args)]
pub struct ShardArgs {
    /// This shard, `0..shards`.
    #[arg(long)]
    pub shard: u32,
    /// How many shards split the fleet.
    #[arg(long)]
    pub shards: u32,
    /// A file with the whole fleet's device ids, one per line, in index order.
    #[arg(long)]
    pub ids_file: PathBuf,
    /// The fleet secret device keys derive from.
    #[arg(long)]
    pub fleet_key: String,
    /// The hub's host name (SAS audience, MQTT username).
    #[arg(long)]
    pub hub_host: String,
    /// MQTT host.
    #[arg(long)]
    pub mqtt_host: String,
    /// MQTT port.
    #[arg(long)]
    pub mqtt_port: u16,
    /// MQTT over TLS trusting this CA (PEM file); plain MQTT without it.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// The FTP server, `host:port`.
    #[arg(long)]
    pub ftp_addr: String,
    /// Per-device data directories go under here.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Agents this shard starts per second (0: all at once).
    #[arg(long, default_value_t = 0)]
    pub ramp_per_sec: u32,
    /// The version agents start on.
    #[arg(long)]
    pub initial_version: String,
    /// After a failed install, agents check `latest.json` again on reconnect.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub retry_on_reconnect: bool,
}

/// The body of `testbench fleet-shard`: runs the shard's agents until stdin closes, following
/// `off <index>` / `on <index>` / `check <index>` lines.
pub async fn serve(a: ShardArgs) -> Result<(), String> {
    let text = std::fs::read_to_string(&a.ids_file).map_err(|e| format!("{}: {e}", a.ids_file.display()))?;
    // Global index of each local agent, and the reverse.
    let mine: Vec<(usize, String)> = text
        .lines()
        .enumerate()
        .filter(|(k, _)| *k as u64 % u64::from(a.shards) == u64::from(a.shard))
        .map(|(k, id)| (k, id.to_string()))
        .collect();
    let local: HashMap<usize, usize> = mine.iter().enumerate().map(|(j, (k, _))| (*k, j)).collect();
    let ca_pem = match &a.ca_file {
        Some(path) => Some(std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?),
        None => None,
    };
    let link = ShardLink {
        hub_host: a.hub_host,
        mqtt_host: a.mqtt_host,
        mqtt_port: a.mqtt_port,
        ca_pem,
        ftp_addr: a.ftp_addr,
    };
    let ids = mine.into_iter().map(|(_, id)| id).collect();
    let (mut cfg, backend) =
        link.fleet_config(ids, &a.fleet_key, a.data_dir, a.ramp_per_sec, &a.initial_version)?;
    cfg.update_retry = UpdateRetry { on_reconnect: a.retry_on_reconnect, check_every: None };
    let fleet = Fleet::start(cfg, Arc::new(backend)).await;
    println!("started {}", fleet.len());
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut words = line.split_whitespace();
        let verb = words.next();
        let Some(&j) = words.next().and_then(|k| k.parse().ok()).and_then(|k: usize| local.get(&k)) else {
            continue;
        };
        match verb {
            Some("on") => fleet.set_power(j, true),
            Some("off") => fleet.set_power(j, false),
            Some("check") => fleet.check_for_update(j),
            _ => {}
        }
    }
    fleet.stop().await;
    Ok(())
}

/// The runner's handle on its shard processes.
pub struct ShardedFleet {
    children: Vec<Child>,
    power: Vec<mpsc::UnboundedSender<String>>,
}

impl ShardedFleet {
    /// Starts `shards` children of this executable for `ids`, files under `work`, and waits until
    /// each reports its agents started.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        ids: &[String],
        shards: u32,
        link: &ShardLink,
        fleet_key: &str,
        work: &std::path::Path,
        ramp_per_sec: u32,
        initial_version: &str,
        retry_on_reconnect: bool,
    ) -> Result<Self, RunError> {
        let fail = |what: String| RunError::Setup(format!("fleet.shards: {what}"));
        let exe = std::env::current_exe().map_err(|e| fail(format!("cannot find this executable: {e}")))?;
        std::fs::create_dir_all(work).map_err(|e| fail(e.to_string()))?;
        let ids_file = work.join("ids.txt");
        std::fs::write(&ids_file, ids.join("\n")).map_err(|e| fail(e.to_string()))?;
        let ca_file = match &link.ca_pem {
            Some(pem) => {
                let path = work.join("ca.pem");
                std::fs::write(&path, pem).map_err(|e| fail(e.to_string()))?;
                Some(path)
            }
            None => None,
        };
        let per_shard_ramp = ramp_per_sec.div_ceil(shards);
        let mut children = Vec::new();
        let mut power = Vec::new();
        let mut ready = Vec::new();
        for i in 0..shards {
            let mut cmd = Command::new(&exe);
            cmd.arg(SUBCOMMAND)
                .args(["--shard", &i.to_string(), "--shards", &shards.to_string()])
                .arg("--ids-file")
                .arg(&ids_file)
                .args([
                    "--fleet-key",
                    fleet_key,
                    "--hub-host",
                    &link.hub_host,
                    "--mqtt-host",
                    &link.mqtt_host,
                ])
                .args(["--mqtt-port", &link.mqtt_port.to_string(), "--ftp-addr", &link.ftp_addr])
                .arg("--data-dir")
                .arg(work.join(format!("shard-{i}")))
                .args(["--ramp-per-sec", &per_shard_ramp.to_string(), "--initial-version", initial_version])
                .args(["--retry-on-reconnect", &retry_on_reconnect.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true);
            if let Some(ca) = &ca_file {
                cmd.arg("--ca-file").arg(ca);
            }
            let mut child = cmd.spawn().map_err(|e| fail(format!("starting {}: {e}", exe.display())))?;
            let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                return Err(fail("a shard has no stdin/stdout pipe".into()));
            };
            let (tx, mut rx) = mpsc::unbounded_channel::<String>();
            tokio::spawn(async move {
                while let Some(line) = rx.recv().await {
                    if stdin.write_all(line.as_bytes()).await.is_err() {
                        return;
                    }
                }
                // Dropping stdin tells the child to stop.
            });
            ready.push(BufReader::new(stdout).lines());
            children.push(child);
            power.push(tx);
        }
        for (i, lines) in ready.iter_mut().enumerate() {
            match lines.next_line().await {
                Ok(Some(l)) if l.starts_with("started") => {}
                other => return Err(fail(format!("shard {i} did not start its agents: {other:?}"))),
            }
        }
        Ok(Self { children, power })
    }

    /// Switches device `index` (global) off or on, in its shard.
    pub fn set_power(&self, index: usize, on: bool) {
        let shard = &self.power[index % self.power.len()];
        let _ = shard.send(format!("{} {index}\n", if on { "on" } else { "off" }));
    }

    /// Asks device `index` (global), in its shard, to check `latest.json` now.
    pub fn check_for_update(&self, index: usize) {
        let _ = self.power[index % self.power.len()].send(format!("check {index}\n"));
    }

    /// Closes every child's stdin and waits for it to stop its agents (killing it past a grace
    /// period).
    pub async fn stop(self) {
        drop(self.power);
        for mut c in self.children {
            if tokio::time::timeout(STOP_GRACE, c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
    }
}
