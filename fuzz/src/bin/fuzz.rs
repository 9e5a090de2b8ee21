//! `fuzz <target|all|list> [--cases N] [--seed S] [--seconds T] [--no-save]`: runs fuzz targets
//! and prints, per target, cases, cases/s, failures and the peak allocation against the limit.
//! Failing inputs are printed as hex and written to `fuzz/regressions/<target>/<hash>.bin`
//! (unless `--no-save`); `fuzz replay <target> <file>...` runs saved inputs once. Exits 1 on any
//! failure, 2 on bad arguments.

use std::process::ExitCode;
use std::time::Duration;

use iothub_fuzz::alloc::{CountingAlloc, installed};
use iothub_fuzz::runner::{self, RunConfig};
use iothub_fuzz::targets::{ALL, by_name};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const USAGE: &str =
    "usage: fuzz <target|all|list> [--cases N] [--seed S] [--seconds T] [--stack-kib K] [--no-save] [--save-each]
       fuzz replay <target> <file>...";

/// `fuzz replay <target> <file>...`: runs each file once and prints what happened.
fn replay(args: &[String]) -> ExitCode {
    let Some(target) = args.first().and_then(|n| by_name(n)) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let mut failed = false;
    for file in &args[1..] {
        match std::fs::read(file) {
            Err(e) => {
                eprintln!("{file}: {e}");
                failed = true;
            }
            Ok(input) => match runner::replay(target, &input, runner::DEFAULT_STACK_BYTES) {
                Ok(outcome) => println!("{file}: ok ({outcome:?})"),
                Err(f) => {
                    println!("{file}: FAILURE {f}");
                    failed = true;
                }
            },
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn parse(args: &[String]) -> Result<(String, RunConfig), String> {
    let mut config = RunConfig {
        cases: 100_000,
        regressions_dir: Some(iothub_fuzz::regressions_dir()),
        corpus_dir: Some(iothub_fuzz::corpus_dir()),
        ..Default::default()
    };
    let mut which = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--cases" => {
                config.cases =
                    value("--cases")?.replace('_', "").parse().map_err(|e| format!("--cases: {e}"))?
            }
            "--seed" => config.seed = value("--seed")?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--seconds" => {
                let s: f64 = value("--seconds")?.parse().map_err(|e| format!("--seconds: {e}"))?;
                config.time_limit = Some(Duration::from_secs_f64(s));
            }
            "--stack-kib" => {
                let k: usize = value("--stack-kib")?.parse().map_err(|e| format!("--stack-kib: {e}"))?;
                config.stack_bytes = k * 1024;
            }
            "--no-save" => config.regressions_dir = None,
            "--save-each" => config.save_each = true,
            "-h" | "--help" => return Err(String::new()),
            t if which.is_none() && !t.starts_with('-') => which = Some(t.to_owned()),
            other => return Err(format!("unexpected argument {other}")),
        }
    }
    Ok((which.ok_or("which target?")?, config))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "replay") {
        return replay(&args[1..]);
    }
    let (which, config) = match parse(&args) {
        Ok(v) => v,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("{e}");
            }
            eprintln!("{USAGE}\ntargets: {}", ALL.iter().map(|t| t.name).collect::<Vec<_>>().join(", "));
            return ExitCode::from(2);
        }
    };
    if which == "list" {
        for t in ALL {
            println!("{:<18} K={:<4} C={:<7} {}", t.name, t.alloc_k, t.alloc_c, t.about);
        }
        return ExitCode::SUCCESS;
    }
    let targets: Vec<_> = if which == "all" {
        ALL.iter().collect()
    } else {
        match by_name(&which) {
            Some(t) => vec![t],
            None => {
                eprintln!("no target {which}; `fuzz list` shows them");
                return ExitCode::from(2);
            }
        }
    };
    assert!(installed(), "the counting allocator is not installed");
    println!(
        "seed {}, at most {} cases{} per target, stack {} KiB",
        config.seed,
        config.cases,
        config.time_limit.map(|t| format!(" or {:.0} s", t.as_secs_f64())).unwrap_or_default(),
        config.stack_bytes / 1024
    );
    println!(
        "{:<18} {:>11} {:>10} {:>9} {:>8} {:>10} {:>9} {:>8}",
        "target", "cases", "cases/s", "accepted", "failures", "peak", "B/in-B", "of limit"
    );
    let mut failed = false;
    for t in targets {
        let r = runner::run(t, &config);
        println!(
            "{:<18} {:>11} {:>10.0} {:>8.1}% {:>8} {:>10} {:>9.1} {:>7.1}%",
            r.target,
            r.cases,
            r.rate(),
            100.0 * r.accepted as f64 / r.cases.max(1) as f64,
            r.failures.len(),
            r.peak_bytes,
            r.peak_per_byte,
            100.0 * r.peak_of_limit
        );
        for f in &r.failures {
            println!("  FAILURE in {}: {f}", r.target);
        }
        failed |= !r.failures.is_empty();
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
