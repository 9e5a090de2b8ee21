//! `testbench`: checks scenario files and runs them.

/// mimalloc, as the `iothub-emulator` binary: an embedded run holds the hub, the fleet and the
/// runner in this process, a million devices' worth of small allocations made on one thread and
/// freed on another (see `bench/README.md`, "A million in-process devices").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use testbench::runner::progress::Progress;
use testbench::scenario::TimeMode;

/// The IoT Hub emulator's test bench.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Parses and validates scenario files; prints each plan's summary or every error.
    Validate {
        /// Scenario files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Runs a scenario with an embedded hub, FTP server and fleet (or the iothub-emulator binary as a
    /// child process, or against an external hub and fleet); exits non-zero naming every unmet
    /// expectation.
    Run {
        /// The scenario file (TOML).
        file: PathBuf,
        /// Overrides `fleet.devices`; the device counts in `[expect]` scale with it (rounded).
        #[arg(long, env = "IOTHUB_EMULATOR_DEVICES")]
        devices: Option<u64>,
        /// Overrides the scenario's `time`: `real` plays it in wall-clock time, `compressed` skips
        /// the waits where nothing is in flight.
        #[arg(long, value_parser = ["real", "compressed"])]
        time: Option<String>,
        /// Overrides the scenario's `seed`.
        #[arg(long)]
        seed: Option<u64>,
        /// Where `report.json` and `report.html` go [default: ./testbench-report/<scenario>].
        #[arg(long, env = "IOTHUB_EMULATOR_OUT")]
        out: Option<PathBuf>,
        /// Also writes the verdict as JUnit XML to FILE (one test case per expectation; a run that
        /// cannot start or finish is one error case), for CI test-result publishers.
        #[arg(long, value_name = "FILE", env = "IOTHUB_EMULATOR_JUNIT")]
        junit: Option<PathBuf>,
        #[command(flatten)]
        external: ExternalArgs,
        #[command(flatten)]
        tier: testbench::runner::tier::TierArgs,
    },
    /// One shard of a fleet spread over processes (started by `run` for `fleet.shards > 1`).
    #[command(name = "fleet-shard", hide = true)]
    FleetShard(testbench::runner::shards::ShardArgs),
}

/// Pointing a run at a hub (and fleet) running elsewhere; each flag overrides the scenario.
#[derive(Debug, clap::Args)]
struct ExternalArgs {
    /// Drive an external hub with this `iothubowner` connection string (any scenario; replaces
    /// `[hub]`). MQTT, AMQP and FTP are dialed at its HostName.
    #[arg(long, env = "IOTHUB_EMULATOR_CONNECTION_STRING")]
    hub_connection_string: Option<String>,
    /// The external hub's CA certificate (PEM), trusted for MQTT, AMQP and REST.
    #[arg(long, env = "IOTHUB_EMULATOR_CA_FILE")]
    hub_ca: Option<String>,
    /// The external hub's plain HTTP base URL (REST API, /health, /emulator/telemetry).
    #[arg(long, env = "IOTHUB_EMULATOR_HTTP_URL")]
    hub_http_url: Option<String>,
    /// The external hub's FTP packages directory (the emulator's --packages-dir, shared).
    #[arg(long, env = "IOTHUB_EMULATOR_PACKAGES_DIR")]
    packages_dir: Option<String>,
    /// The external hub's AMQP (TLS) port [default: 5671].
    #[arg(long, env = "IOTHUB_EMULATOR_HUB_AMQP_PORT")]
    hub_amqp_port: Option<u16>,
    /// The external hub's MQTT (TLS) port [default: 8883].
    #[arg(long, env = "IOTHUB_EMULATOR_HUB_MQTT_PORT")]
    hub_mqtt_port: Option<u16>,
    /// The external hub's FTP port [default: 2121].
    #[arg(long, env = "IOTHUB_EMULATOR_HUB_FTP_PORT")]
    hub_ftp_port: Option<u16>,
    /// The devices are run by `fleet run --shard i/n` processes elsewhere: wait for them to
    /// connect instead of starting agents (as `fleet.mode = "external"`).
    #[arg(
        long,
        env = "IOTHUB_EMULATOR_FLEET_EXTERNAL",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    fleet_external: bool,
}

impl ExternalArgs {
    fn overrides(self) -> testbench::runner::external::HubOverrides {
        testbench::runner::external::HubOverrides {
            connection_string: self.hub_connection_string,
            ca_file: self.hub_ca,
            http_url: self.hub_http_url,
            packages_dir: self.packages_dir,
            amqp_port: self.hub_amqp_port,
            mqtt_port: self.hub_mqtt_port,
            ftp_port: self.hub_ftp_port,
            fleet_external: self.fleet_external,
        }
    }
}

fn validate(files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for file in files {
        match testbench::scenario::load(file) {
            Ok(plan) => println!(
                "{}: ok: {} devices, {} packages, {} events{}",
                file.display(),
                plan.fleet.devices,
                plan.packages.len(),
                plan.events.len(),
                if plan.rollout.is_some() { ", phased rollout" } else { "" }
            ),
            Err(e) => {
                eprintln!("{e}");
                failed = true;
            }
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// `testbench run`'s overrides of the scenario file.
struct Overrides {
    devices: Option<u64>,
    time: Option<String>,
    seed: Option<u64>,
}

async fn run(
    file: PathBuf,
    Overrides { devices, time, seed }: Overrides,
    out: Option<PathBuf>,
    external: ExternalArgs,
    tier: testbench::runner::tier::TierArgs,
) -> anyhow::Result<Finished> {
    let mut plan = testbench::scenario::load(&file)?;
    match time.as_deref() {
        Some("real") => plan.time = TimeMode::Real,
        Some("compressed") => plan.time = TimeMode::Compressed,
        _ => {}
    }
    if let Some(seed) = seed {
        plan.seed = seed;
    }
    if let Some(n) = devices {
        anyhow::ensure!(n > 0, "--devices: use at least 1");
        testbench::runner::scale_devices(&mut plan, n);
    }
    external.overrides().apply(&mut plan).map_err(anyhow::Error::msg)?;
    tier.apply(&mut plan).map_err(anyhow::Error::msg)?;
    let tier_inputs = testbench::runner::tier::TierInputs::from_plan(&plan);
    if time.is_none() && plan.time == TimeMode::Compressed && !testbench::runner::compressible(&plan) {
        // The flags made the run external or sharded: play the file's timeline on the wall clock
        // rather than refuse a shipped scenario (a file that asks for both is still refused).
        println!(
            "time: compressed time needs the embedded hub and an in-process fleet; playing in real time"
        );
        plan.time = TimeMode::Real;
    }
    testbench::runner::check_supported(&plan)?;
    let out = out.unwrap_or_else(|| PathBuf::from("testbench-report").join(&plan.name));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let expect_name = plan.name.clone();
    println!("running {expect_name}: {} devices, {} time", plan.fleet.devices, plan.time.as_str());
    let tty = std::io::stdout().is_terminal();
    let bar = tty.then(progress_bar);
    let log_bar = bar.clone();
    let log = move |line: String| match &log_bar {
        Some(b) => b.println(line),
        None => println!("{line}"),
    };
    let outcome =
        testbench::runner::run(plan, &out.join("work"), log, progress_renderer(bar.clone())).await?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    tracing::debug!("run done; writing reports");
    // Written as it is serialized: at a million devices the per-device parts are most of a
    // 600 MB file, never held whole (see `metrics::Report`).
    let mut report = testbench::runner::metrics::Report::new(&outcome.observed, &outcome.unmet);
    let projection = tier_inputs.project(&outcome.observed);
    if let Some(p) = &projection {
        report.push("tier", p.to_json());
    }
    let path = out.join("report.json");
    let write = |path: &std::path::Path| -> anyhow::Result<()> {
        let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
        serde_json::to_writer_pretty(&mut w, &report)?;
        std::io::Write::flush(&mut w)?;
        Ok(())
    };
    write(&path).with_context(|| format!("writing {}", path.display()))?;
    tracing::debug!("report.json written");
    let html = testbench::runner::html::render(&outcome.observed, &outcome.unmet)
        .context("rendering report.html")?;
    tracing::debug!("report.html rendered");
    let html_path = out.join("report.html");
    std::fs::write(&html_path, html).with_context(|| format!("writing {}", html_path.display()))?;
    for line in outcome.observed.summary_lines(&outcome.unmet) {
        if tty && line.starts_with("unmet:") { println!("\x1b[31m{line}\x1b[0m") } else { println!("{line}") }
    }
    for line in projection.iter().flat_map(|p| p.summary_lines()) {
        println!("{line}");
    }
    println!("report: {}", path.display());
    println!("report: {}", html_path.display());
    // The run's own memory line stops at the scenario's end; the process's peak includes writing
    // the reports (a million devices' report.json is 640 MB of text).
    if let Some(m) = testbench::memory::current() {
        println!("process peak RSS with the reports written: {:.1} MiB (VmHWM)", m.peak_kib as f64 / 1024.0);
    }
    let exit = if outcome.unmet.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    Ok(Finished { scenario: expect_name, verdicts: outcome.verdicts, exit })
}

/// A run that finished (its expectations met or not).
struct Finished {
    /// The scenario's name.
    scenario: String,
    /// Every expectation checked.
    verdicts: Vec<testbench::runner::metrics::Verdict>,
    exit: ExitCode,
}

/// How often a plain progress line is printed when stdout is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Before the first release: spinner, elapsed time and the message.
const IDLE_TEMPLATE: &str = "{spinner} [{elapsed_precise}] {wide_msg}";
/// Once notices went out: also installed / targeted.
const BAR_TEMPLATE: &str =
    "{spinner} [{elapsed_precise}] {bar:25.cyan/blue} {pos}/{len} installed · {wide_msg}";

fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).expect("a valid progress template").progress_chars("=> ")
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(bar_style(IDLE_TEMPLATE));
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Draws the runner's progress: on the bar when there is one, else a plain line every
/// [`PLAIN_PROGRESS_EVERY`].
fn progress_renderer(bar: Option<ProgressBar>) -> impl FnMut(&Progress) + Send + 'static {
    let mut next_line = PLAIN_PROGRESS_EVERY;
    move |p: &Progress| match &bar {
        Some(b) => {
            if p.targeted > 0 && b.length() == Some(0) {
                b.set_style(bar_style(BAR_TEMPLATE));
            }
            b.set_length(p.targeted as u64);
            b.set_position(p.installed as u64);
            b.set_message(format!("connected {}/{} · {}", p.connected, p.devices, p.phase));
        }
        None if p.elapsed >= next_line => {
            next_line = p.elapsed + PLAIN_PROGRESS_EVERY;
            println!(
                "[{:7.1}s] connected {}/{}; installed {}/{} targeted; {}",
                p.elapsed.as_secs_f64(),
                p.connected,
                p.devices,
                p.installed,
                p.targeted,
                p.phase
            );
        }
        None => {}
    }
}

fn main() -> anyhow::Result<ExitCode> {
    // Logs of the hub and the agents only when asked for (`RUST_LOG=debug`): the run's own output
    // is the timeline and the report.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    match Args::parse().command {
        Command::Validate { files } => Ok(validate(&files)),
        Command::Run { file, devices, time, seed, out, junit, external, tier } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let started = (SystemTime::now(), Instant::now());
            let name =
                file.file_stem().map_or_else(|| "scenario".into(), |s| s.to_string_lossy().into_owned());
            let result = rt.block_on(run(file, Overrides { devices, time, seed }, out, external, tier));
            if let Some(path) = junit {
                let xml = match &result {
                    Ok(done) => testbench::runner::junit::render(
                        &done.scenario,
                        &done.verdicts,
                        started.1.elapsed(),
                        started.0,
                    ),
                    Err(e) => testbench::runner::junit::render_error(
                        &name,
                        &format!("{e:#}"),
                        started.1.elapsed(),
                        started.0,
                    ),
                };
                std::fs::write(&path, xml).with_context(|| format!("writing {}", path.display()))?;
                println!("junit: {}", path.display());
            }
            result.map(|done| done.exit)
        }
        Command::FleetShard(a) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(testbench::runner::shards::serve(a)).map_err(anyhow::Error::msg)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
