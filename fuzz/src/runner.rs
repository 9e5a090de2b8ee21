//! Runs a [`Target`] for a case budget and checks the properties on every case: the call does not
//! panic, its peak heap growth stays within `alloc_k × input + alloc_c` bytes, and the target's own
//! checks (round trips, bounded output, the hub still serving) hold.
//!
//! Cases run on a thread of their own with a fixed stack ([`RunConfig::stack_bytes`], 256 KiB in
//! release builds, smaller than tokio's 2 MiB workers): unbounded recursion overflows it and aborts
//! the whole process, which cannot be caught, so the runner prints each case's hex only on failure
//! and relies on the abort being loud. `--seed` and the case number reproduce any case.

use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use crate::engine::{Mutator, hash, hex};

/// What a target did with an input that kept every property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The decoder accepted it (the input is kept as a seed for later mutations).
    Accepted,
    /// The decoder refused it with an error.
    Rejected,
}

/// One case's check: `Err` says which property failed.
pub type Check = Box<dyn FnMut(&[u8]) -> Result<Outcome, String>>;

/// One fuzz target: a decoder of the project and its properties.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Name on the command line and under `corpus/` and `regressions/`.
    pub name: &'static str,
    /// What it calls, one line.
    pub about: &'static str,
    /// Valid inputs to mutate, made with the project's own encoders.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Tokens the mutator inserts (format codes, keywords, field names).
    pub dictionary: fn() -> Vec<Vec<u8>>,
    /// Longest case generated.
    pub max_len: usize,
    /// Heap growth allowed per input byte during one call.
    pub alloc_k: usize,
    /// Heap growth allowed whatever the input's size, in bytes.
    pub alloc_c: usize,
    /// Makes the check (and any state it keeps across cases, e.g. one hub).
    pub make: fn() -> Check,
}

impl Target {
    /// The allocation limit for an input of `len` bytes.
    pub fn alloc_limit(&self, len: usize) -> usize {
        self.alloc_k * len + self.alloc_c
    }
}

/// Which property a case broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The call panicked.
    Panic,
    /// The call allocated more than the target's limit.
    Alloc,
    /// A target-specific property (round trip, output bound, hub serving) failed.
    Property,
}

/// One failing case.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Which property broke.
    pub kind: FailureKind,
    /// The panic message or the property's explanation.
    pub message: String,
    /// The input.
    pub input: Vec<u8>,
    /// Where the input was saved, if it was.
    pub saved: Option<PathBuf>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?}: {}\n  input ({} bytes): {}",
            self.kind,
            self.message,
            self.input.len(),
            hex(&self.input)
        )?;
        if let Some(p) = &self.saved {
            write!(f, "\n  saved as {}", p.display())?;
        }
        Ok(())
    }
}

/// How to run a target.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Seed of the case generator.
    pub seed: u64,
    /// Cases to run at most.
    pub cases: u64,
    /// Wall-clock budget; the run stops at whichever of `cases` and this comes first.
    pub time_limit: Option<Duration>,
    /// Where failing inputs are written (`<dir>/<target>/<hash>.bin`); `None` writes nothing.
    pub regressions_dir: Option<PathBuf>,
    /// Where file seeds are read from (`<dir>/<target>/*`), besides the generated ones.
    pub corpus_dir: Option<PathBuf>,
    /// Stack of the thread the cases run on.
    pub stack_bytes: usize,
    /// Stop after this many failures.
    pub max_failures: usize,
    /// Write every case to `<regressions_dir>/<target>/last-case.bin` before running it (slow):
    /// after an abort (a stack overflow cannot be caught) the file holds the input that caused it.
    pub save_each: bool,
}

/// The stack cases run on: 256 KiB in release builds. Debug builds use several times more stack
/// per frame, so they get 1 MiB (still half of a tokio worker's).
pub const DEFAULT_STACK_BYTES: usize = if cfg!(debug_assertions) { 1024 * 1024 } else { 256 * 1024 };

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            cases: 10_000,
            time_limit: None,
            regressions_dir: None,
            corpus_dir: None,
            stack_bytes: DEFAULT_STACK_BYTES,
            max_failures: 5,
            save_each: false,
        }
    }
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct Report {
    /// The target's name.
    pub target: &'static str,
    /// Cases run.
    pub cases: u64,
    /// Cases the target accepted.
    pub accepted: u64,
    /// Time taken.
    pub elapsed: Duration,
    /// Failing cases.
    pub failures: Vec<Failure>,
    /// The largest share of the allocation limit one case used (1.0 = exactly at the limit).
    pub peak_of_limit: f64,
    /// The largest heap growth of one case, in bytes.
    pub peak_bytes: usize,
    /// The largest heap growth per input byte, over cases of at least 64 bytes.
    pub peak_per_byte: f64,
}

impl Report {
    /// Cases per second.
    pub fn rate(&self) -> f64 {
        self.cases as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

thread_local! {
    static IN_CASE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static PANIC_MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs (once) a panic hook that records the message of a panic inside a case instead of
/// printing it, and defers to the previous hook otherwise.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_CASE.with(|c| c.get()) {
                let location = info.location().map(|l| format!(" at {l}")).unwrap_or_default();
                let payload = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(non-string panic)".into());
                PANIC_MESSAGE.with(|m| *m.borrow_mut() = Some(format!("panicked{location}: {payload}")));
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs one case: `Ok` with the outcome and the heap peak, or the failure (input not yet saved).
fn run_case(target: &Target, check: &mut Check, input: &[u8]) -> Result<(Outcome, usize), Failure> {
    IN_CASE.with(|c| c.set(true));
    let (result, peak) = crate::alloc::track(|| catch_unwind(AssertUnwindSafe(|| check(input))));
    IN_CASE.with(|c| c.set(false));
    let fail = |kind, message| Failure { kind, message, input: input.to_vec(), saved: None };
    match result {
        Err(_) => {
            let message = PANIC_MESSAGE.with(|m| m.borrow_mut().take()).unwrap_or_else(|| "panicked".into());
            Err(fail(FailureKind::Panic, message))
        }
        Ok(Err(message)) => Err(fail(FailureKind::Property, message)),
        Ok(Ok(outcome)) => {
            let limit = target.alloc_limit(input.len());
            if peak > limit {
                return Err(fail(
                    FailureKind::Alloc,
                    format!(
                        "allocated {peak} bytes for a {}-byte input; the limit is {} × {} + {} = {limit}",
                        input.len(),
                        target.alloc_k,
                        input.len(),
                        target.alloc_c
                    ),
                ));
            }
            Ok((outcome, peak))
        }
    }
}

/// The file `--save-each` writes each case to.
pub const LAST_CASE: &str = "last-case.bin";

/// Writes `input` to `<dir>/<target>/<hash>.bin` and returns the path.
pub fn save_regression(dir: &Path, target: &str, input: &[u8]) -> std::io::Result<PathBuf> {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{:016x}.bin", hash(input)));
    std::fs::write(&path, input)?;
    Ok(path)
}

/// Reads every regular file in `<dir>/<target>/` except `README*`, sorted by name.
pub fn read_inputs(dir: &Path, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir.join(target)) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("README")))
        .collect();
    paths.sort();
    paths.into_iter().filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b))).collect()
}

/// Runs `f` on a fresh thread with `stack_bytes` of stack and returns its result.
fn on_stack<R: Send + 'static>(name: &str, stack_bytes: usize, f: impl FnOnce() -> R + Send + 'static) -> R {
    std::thread::Builder::new()
        .name(format!("fuzz-{name}"))
        .stack_size(stack_bytes)
        .spawn(f)
        .expect("spawn the fuzz thread")
        .join()
        .expect("the fuzz thread does not panic outside a case")
}

/// Runs `target` under `config`.
pub fn run(target: &Target, config: &RunConfig) -> Report {
    install_panic_hook();
    let (target, config) = (*target, config.clone());
    on_stack(target.name, config.stack_bytes, move || run_here(&target, &config))
}

fn run_here(target: &Target, config: &RunConfig) -> Report {
    let mut seeds = (target.seeds)();
    if let Some(dir) = &config.corpus_dir {
        seeds.extend(read_inputs(dir, target.name).into_iter().map(|(_, b)| b));
    }
    let mut mutator = Mutator::new(config.seed, seeds, (target.dictionary)(), target.max_len);
    let mut check = (target.make)();
    let mut report = Report {
        target: target.name,
        cases: 0,
        accepted: 0,
        elapsed: Duration::ZERO,
        failures: Vec::new(),
        peak_of_limit: 0.0,
        peak_bytes: 0,
        peak_per_byte: 0.0,
    };
    let start = Instant::now();
    let mut input = Vec::new();
    while report.cases < config.cases {
        if report.cases.is_multiple_of(256) && config.time_limit.is_some_and(|t| start.elapsed() >= t) {
            break;
        }
        mutator.next_case(&mut input);
        report.cases += 1;
        if config.save_each
            && let Some(dir) = &config.regressions_dir
        {
            let dir = dir.join(target.name);
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(dir.join(LAST_CASE), &input);
        }
        match run_case(target, &mut check, &input) {
            Ok((outcome, peak)) => {
                report.peak_bytes = report.peak_bytes.max(peak);
                let share = peak as f64 / target.alloc_limit(input.len()) as f64;
                report.peak_of_limit = report.peak_of_limit.max(share);
                if input.len() >= 64 {
                    report.peak_per_byte = report.peak_per_byte.max(peak as f64 / input.len() as f64);
                }
                if outcome == Outcome::Accepted {
                    report.accepted += 1;
                    if mutator.wants_more() {
                        mutator.add(&input);
                    }
                }
            }
            Err(mut failure) => {
                if let Some(dir) = &config.regressions_dir {
                    failure.saved = save_regression(dir, target.name, &failure.input).ok();
                }
                report.failures.push(failure);
                // A panic may have left the target's state (a hub's locks) poisoned.
                check = (target.make)();
                if report.failures.len() >= config.max_failures {
                    break;
                }
            }
        }
    }
    report.elapsed = start.elapsed();
    report
}

/// Replays one input against a fresh instance of `target`, on the same kind of thread as a run.
pub fn replay(target: &Target, input: &[u8], stack_bytes: usize) -> Result<Outcome, Failure> {
    install_panic_hook();
    let (target, input) = (*target, input.to_vec());
    on_stack(target.name, stack_bytes, move || {
        let mut check = (target.make)();
        run_case(&target, &mut check, &input).map(|(o, _)| o)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panicky() -> Check {
        Box::new(|input: &[u8]| {
            if input.first() == Some(&0xff) {
                panic!("boom on 0xff");
            }
            if input.len() > 3 && input[1] == 0 {
                return Err("second byte zero".into());
            }
            Ok(Outcome::Rejected)
        })
    }

    const PANICKY: Target = Target {
        name: "selftest",
        about: "panics on a leading 0xff",
        seeds: || vec![b"abcd".to_vec()],
        dictionary: Vec::new,
        max_len: 64,
        alloc_k: 1,
        alloc_c: 1 << 20,
        make: panicky,
    };

    #[test]
    fn panics_and_property_failures_are_caught_reported_and_saved() {
        let dir = tempfile::tempdir().unwrap();
        let config = RunConfig {
            seed: 3,
            cases: 100_000,
            regressions_dir: Some(dir.path().to_path_buf()),
            max_failures: 50,
            ..Default::default()
        };
        let report = run(&PANICKY, &config);
        let panic = report.failures.iter().find(|f| f.kind == FailureKind::Panic).expect("a panic is found");
        assert!(panic.message.contains("boom on 0xff"), "{}", panic.message);
        assert!(report.failures.iter().any(|f| f.kind == FailureKind::Property));
        let saved = panic.saved.as_ref().expect("saved");
        assert_eq!(std::fs::read(saved).unwrap(), panic.input);
        assert_eq!(read_inputs(dir.path(), "selftest").len(), {
            let mut distinct: Vec<_> = report.failures.iter().map(|f| f.input.clone()).collect();
            distinct.sort();
            distinct.dedup();
            distinct.len()
        });
        let replayed = replay(&PANICKY, &panic.input, DEFAULT_STACK_BYTES).unwrap_err();
        assert_eq!(replayed.kind, FailureKind::Panic);
    }
}
