//! `testbench`: checks scenario files and runs them.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

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
    /// Runs a scenario with an embedded hub, FTP server and fleet; exits non-zero naming every
    /// unmet expectation.
    Run {
        /// The scenario file (TOML).
        file: PathBuf,
        /// Overrides `fleet.devices`; the device counts in `[expect]` scale with it (rounded).
        #[arg(long, env = "IOTHUB_EMULATOR_DEVICES")]
        devices: Option<u64>,
        /// Where `report.json` goes [default: ./testbench-report/<scenario>].
        #[arg(long, env = "IOTHUB_EMULATOR_OUT")]
        out: Option<PathBuf>,
    },
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

async fn run(file: PathBuf, devices: Option<u64>, out: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let mut plan = testbench::scenario::load(&file)?;
    if let Some(n) = devices {
        anyhow::ensure!(n > 0, "--devices: use at least 1");
        testbench::runner::scale_devices(&mut plan, n);
    }
    testbench::runner::check_supported(&plan)?;
    let out = out.unwrap_or_else(|| PathBuf::from("testbench-report").join(&plan.name));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let expect_name = plan.name.clone();
    println!("running {expect_name}: {} devices", plan.fleet.devices);
    let outcome = testbench::runner::run(plan, &out.join("work"), |line| println!("{line}")).await?;
    let report = outcome.observed.report_json(&outcome.unmet);
    let path = out.join("report.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let tty = std::io::stdout().is_terminal();
    for line in outcome.observed.summary_lines(&outcome.unmet) {
        if tty && line.starts_with("unmet:") { println!("\x1b[31m{line}\x1b[0m") } else { println!("{line}") }
    }
    println!("report: {}", path.display());
    Ok(if outcome.unmet.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn main() -> anyhow::Result<ExitCode> {
    match Args::parse().command {
        Command::Validate { files } => Ok(validate(&files)),
        Command::Run { file, devices, out } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(run(file, devices, out))
        }
    }
}
