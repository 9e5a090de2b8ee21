//! Every target for a fixed case budget (seed 1, a few seconds in a debug build), then every file
//! under `fuzz/regressions/<target>/` replayed. Failures are printed with the input's hex and fail
//! the test. Inputs of known, not yet fixed bugs are listed in [`KNOWN_FAILING`] and replayed by
//! their own `#[ignore]`d tests instead (run them with `cargo test -p iothub-fuzz -- --ignored`).

use iothub_fuzz::alloc::{CountingAlloc, installed};
use iothub_fuzz::runner::{self, DEFAULT_STACK_BYTES, RunConfig, Target, read_inputs};
use iothub_fuzz::targets::{ALL, by_name};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// `(target, file name)` of saved inputs that still fail; each has an ignored test below.
const KNOWN_FAILING: &[(&str, &str)] = &[];

fn replay_regressions(name: &str) -> usize {
    let target = by_name(name).expect("a target");
    let mut replayed = 0;
    for (path, input) in read_inputs(&iothub_fuzz::regressions_dir(), name) {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        if KNOWN_FAILING.contains(&(name, file.as_str())) {
            continue;
        }
        if let Err(f) = runner::replay(target, &input, DEFAULT_STACK_BYTES) {
            panic!("regression {} fails again: {f}", path.display());
        }
        replayed += 1;
    }
    replayed
}

fn fuzz(name: &str, cases: u64) {
    assert!(installed(), "the counting allocator is not installed");
    let target = by_name(name).expect("a target");
    let replayed = replay_regressions(name);
    let config =
        RunConfig { seed: 1, cases, corpus_dir: Some(iothub_fuzz::corpus_dir()), ..Default::default() };
    let report = runner::run(target, &config);
    let failures: Vec<String> = report.failures.iter().map(ToString::to_string).collect();
    assert!(failures.is_empty(), "{name}: {} failure(s):\n{}", failures.len(), failures.join("\n"));
    assert_eq!(report.cases, cases, "{name} stopped early");
    assert!(report.accepted > 0, "{name} accepted none of {cases} cases: the seeds do not reach the decoder");
    eprintln!("{name}: {cases} cases, {:.0}/s, {replayed} regressions replayed", report.rate());
}

macro_rules! targets {
    ($($test:ident => $name:literal, $cases:expr;)*) => {
        $(
            #[test]
            fn $test() {
                fuzz($name, $cases);
            }
        )*

        #[test]
        fn every_target_has_a_test() {
            let tested = [$($name),*];
            for t in ALL {
                assert!(tested.contains(&t.name), "target {} has no test in tests/targets.rs", t.name);
            }
        }
    };
}

targets! {
    amqp_value => "amqp_value", 20_000;
    amqp_frame => "amqp_frame", 20_000;
    amqp_message => "amqp_message", 20_000;
    amqp_connection => "amqp_connection", 3_000;
    amqp_client => "amqp_client", 5_000;
    mqtt_packet => "mqtt_packet", 20_000;
    mqtt_topic => "mqtt_topic", 20_000;
    device_mqtt => "device_mqtt", 10_000;
    dps_mqtt => "dps_mqtt", 5_000;
    sas_token => "sas_token", 20_000;
    connection_string => "connection_string", 20_000;
    query => "query", 10_000;
    twin_json => "twin_json", 10_000;
    scenario => "scenario", 3_000;
    ftp_path => "ftp_path", 2_000;
    x509_chain => "x509_chain", 5_000;
    state_journal => "state_journal", 10_000;
}

#[test]
fn every_regressions_dir_names_a_target() {
    let Ok(entries) = std::fs::read_dir(iothub_fuzz::regressions_dir()) else { return };
    for e in entries.flatten().filter(|e| e.path().is_dir()) {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(by_name(&name).is_some(), "fuzz/regressions/{name} is not a target");
    }
    for (target, file) in KNOWN_FAILING {
        assert!(
            iothub_fuzz::regressions_dir().join(target).join(file).is_file(),
            "{target}/{file} is missing"
        );
    }
}

/// Found by `mqtt_packet`: `take_packet` (emulator/src/mqtt/connection.rs) reserved the remaining
/// length a fixed header announces before the bytes arrived, so 4 bytes from an unauthenticated
/// peer (CONNECT, remaining length 278 000) made the hub reserve ~272 KiB. It now reserves at most
/// 16 KiB ahead of what arrived; this test holds the saved input to a small constant.
#[test]
fn mqtt_partial_header_reserves_at_most_64_kib() {
    let strict = Target { alloc_c: 64 * 1024, ..*by_name("mqtt_packet").expect("mqtt_packet") };
    let file = iothub_fuzz::regressions_dir().join("mqtt_packet/6d186d099bd7e456.bin");
    let input = std::fs::read(&file).expect("the saved input");
    if let Err(f) = runner::replay(&strict, &input, DEFAULT_STACK_BYTES) {
        panic!("{}: {f}", file.display());
    }
}
