//! `testbench`: checks scenario files (and, as it lands, runs them).

use std::path::PathBuf;
use std::process::ExitCode;

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
}

fn main() -> ExitCode {
    let Command::Validate { files } = Args::parse().command;
    let mut failed = false;
    for file in &files {
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
