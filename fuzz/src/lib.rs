//! A fuzzing harness for the emulator's decoders that runs on stable Rust (issue 11).
//!
//! [`engine`] generates cases from a seed (random bytes and structure-aware mutations of valid
//! traffic), [`alloc`] measures the heap each case takes, [`runner`] runs a [`runner::Target`]
//! for a case budget and checks its properties, and [`targets`] holds one target per decoder.
//! The `fuzz` binary runs them from the command line; `FUZZING.md` at the repository root says
//! how, and `docs/designs/2026-12-fuzzing.md` why the engine is a small in-repo one.

pub mod alloc;
pub mod engine;
pub mod runner;
pub mod targets;

/// The allocator the unit tests measure with (the binary and the integration tests install their
/// own).
#[cfg(test)]
#[global_allocator]
static ALLOC: alloc::CountingAlloc = alloc::CountingAlloc;

/// `fuzz/regressions/`: failing inputs, replayed by the tests.
pub fn regressions_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions")
}

/// `fuzz/corpus/`: file seeds, added to each target's generated ones.
pub fn corpus_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}
