//! `fleet`: the simulated device fleet's command line. `run` starts N agents (this process's
//! shard of the fleet), `release` is the pipeline step (publish a package, notify every device,
//! collect feedback, print a summary), `package` builds and publishes packages. Everything else
//! lives in the library.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use simulated_devices::package::{self, Manifest};

#[path = "fleet/run.rs"]
mod run;

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Tools for the simulated device fleet.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Application packages: build one from a folder, or publish one to the FTP packages directory.
    Package {
        #[command(subcommand)]
        command: PackageCommand,
    },
    /// Runs this process's shard of the fleet until Ctrl-C or SIGTERM.
    Run(run::RunArgs),
    /// Publishes a package, sends every (selected) device an update notice and prints a summary.
    Release(run::ReleaseArgs),
}

#[derive(Debug, Subcommand)]
enum PackageCommand {
    /// Builds `<name>-<version>.tar.gz` from a folder and prints its description (JSON).
    Build {
        #[command(flatten)]
        source: Source,
        /// Where the package is written.
        #[arg(long, env = "IOTHUB_EMULATOR_PACKAGE_OUT", default_value = ".")]
        out: PathBuf,
    },
    /// Builds a package into the hub's packages directory and points `latest.json` at it.
    Publish {
        #[command(flatten)]
        source: Source,
        /// The hub's FTP packages directory (the emulator's --packages-dir).
        #[arg(long, env = "IOTHUB_EMULATOR_PACKAGES_DIR", default_value = "./.iothub-emulator/packages")]
        packages_dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct Source {
    /// The folder holding the application's files (and, unless --name/--version are given, manifest.json).
    dir: PathBuf,
    /// Application name (overrides manifest.json; needs --version).
    #[arg(long, requires = "version")]
    name: Option<String>,
    /// Application version (overrides manifest.json; needs --name).
    #[arg(long, requires = "name")]
    version: Option<String>,
    /// Self-test command run in the unpacked release before it becomes current.
    #[arg(long, requires = "name")]
    self_test: Option<String>,
}

impl Source {
    pub fn manifest(&self) -> Option<Manifest> {
        Some(Manifest {
            name: self.name.clone()?,
            version: self.version.clone()?,
            self_test: self.self_test.clone(),
        })
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let command = match args.command {
        Command::Package { command } => command,
        Command::Run(a) => return runtime()?.block_on(run::run(a)),
        Command::Release(a) => return runtime()?.block_on(run::release(a)),
    };
    let release = match command {
        PackageCommand::Build { source, out } => {
            let (_, path, release) = package::build_package(&source.dir, source.manifest().as_ref(), &out)
                .with_context(|| format!("building a package from {}", source.dir.display()))?;
            eprintln!("wrote {}", path.display());
            release
        }
        PackageCommand::Publish { source, packages_dir } => {
            let release = package::publish(&source.dir, source.manifest().as_ref(), &packages_dir)
                .with_context(|| {
                    format!("publishing {} into {}", source.dir.display(), packages_dir.display())
                })?;
            eprintln!(
                "published {} and updated {}",
                release.file,
                packages_dir.join(package::LATEST_FILE).display()
            );
            release
        }
    };
    println!("{}", serde_json::to_string_pretty(&release)?);
    Ok(())
}
