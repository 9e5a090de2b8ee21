//! Measures cases/s of the candidate engines on one decoder (`amqp::types::Value::decode`), for the
//! design note `docs/designs/2026-12-fuzzing.md`:
//!
//! - proptest: a `TestRunner` over random byte vectors, and over seed inputs with byte overwrites
//!   (proptest's closest thing to mutating valid traffic);
//! - this crate's engine: the bare `Mutator` + decode loop, and the full runner (per-case
//!   `catch_unwind`, allocation tracking, the round-trip property).
//!
//! `cargo run --release -p iothub-fuzz --example engine_compare [cases]`

use std::time::Instant;

use iothub_emulator::amqp::types::Value;
use iothub_fuzz::alloc::CountingAlloc;
use iothub_fuzz::engine::Mutator;
use iothub_fuzz::runner::{self, RunConfig};
use iothub_fuzz::targets::by_name;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn report(name: &str, cases: u64, start: Instant) {
    let secs = start.elapsed().as_secs_f64();
    println!("{name:<48} {cases:>9} cases {:>10.0} cases/s", cases as f64 / secs);
}

fn main() {
    let cases: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let target = by_name("amqp_value").expect("amqp_value");
    let seeds = (target.seeds)();

    let config = Config { cases, failure_persistence: None, ..Config::default() };
    let start = Instant::now();
    TestRunner::new(config.clone())
        .run(&proptest::collection::vec(any::<u8>(), 0..512), |bytes| {
            let _ = Value::decode(&mut &bytes[..]);
            Ok(())
        })
        .expect("no failure");
    report("proptest: random bytes", cases.into(), start);

    let mutated = (
        proptest::sample::select(seeds.clone()),
        proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    )
        .prop_map(|(mut seed, edits)| {
            for (at, b) in edits {
                if !seed.is_empty() {
                    let i = at % seed.len();
                    seed[i] = b;
                }
            }
            seed
        });
    let start = Instant::now();
    TestRunner::new(config)
        .run(&mutated, |bytes| {
            let _ = Value::decode(&mut &bytes[..]);
            Ok(())
        })
        .expect("no failure");
    report("proptest: seeds with byte overwrites", cases.into(), start);

    let mut m = Mutator::new(1, seeds, (target.dictionary)(), target.max_len);
    let mut input = Vec::new();
    let start = Instant::now();
    for _ in 0..cases {
        m.next_case(&mut input);
        let _ = Value::decode(&mut &input[..]);
    }
    report("in-repo engine: mutator + decode only", cases.into(), start);

    let start = Instant::now();
    let r = runner::run(target, &RunConfig { seed: 1, cases: cases.into(), ..Default::default() });
    assert!(r.failures.is_empty());
    report("in-repo engine: full runner (unwind, alloc, round trip)", r.cases, start);
}
