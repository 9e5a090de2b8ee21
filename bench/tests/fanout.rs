//! Smoke test of the C2D fan-out bench (`src/bin/fanout`), cheap enough for CI: 200 devices
//! against the hub (this build's own copy of the library, `--hub-bin self`) with each sender (its
//! REST send extension, and AMQP as the service SDKs send), and against
//! Mosquitto and rumqttd when they are installed or built. A peer that is missing is reported
//! SKIPPED, loudly, and never counted as passed; a peer that is there must pass like the hub.
//! The telemetry direction (`--telemetry`: MQTT QoS 1 in, the hub's Event Hub-compatible endpoint
//! out) gets the same at 200 devices, two rounds, against the hub and Mosquitto.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The whole bench run must finish within this.
const DEADLINE: Duration = Duration::from_secs(240);

/// Runs the bench with `args`; returns its exit status, stdout and stderr (killed after
/// [`DEADLINE`]).
fn run_bench(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the fanout bench");
    let pid = child.id();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut o, mut e) = (String::new(), String::new());
        let _ = out.read_to_string(&mut o);
        let _ = err.read_to_string(&mut e);
        let _ = tx.send((child.wait(), o, e));
    });
    let Ok((status, stdout, stderr)) = rx.recv_timeout(DEADLINE) else {
        // SAFETY: kills the bench process this test started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        panic!("the fanout bench did not finish within {DEADLINE:?}");
    };
    let status = status.expect("wait for the bench");
    println!("{stdout}");
    eprintln!("{stderr}");
    (status, stdout, stderr)
}

#[test]
fn telemetry_bench_reads_every_message_of_200_devices_out_of_the_event_hub_endpoint() {
    let (status, stdout, stderr) = run_bench(&[
        "--telemetry",
        "--devices",
        "200",
        "--rounds",
        "2",
        "--servers",
        "hub,mosquitto",
        "--hub-bin",
        "self",
        "--allow-missing-peers",
        "--timeout-secs",
        "60",
    ]);
    assert!(status.success(), "the bench failed ({status}):\n{stdout}\n{stderr}");
    let result = stdout.lines().find(|l| l.starts_with("result: ")).expect("a result line");
    assert!(result.contains("hub: ok"), "{result}");
    assert_eq!(
        stdout.matches("out 200/200").count(),
        2 * (1 + usize::from(result.contains("mosquitto: ok"))),
        "every round's 200 messages came out:\n{stdout}"
    );
    let hub_row = stdout.lines().find(|l| l.starts_with("hub MQTT→EH")).expect("the hub's row");
    let numbers: Vec<f64> = hub_row.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert!(numbers.len() >= 8 && numbers[1] > 0.0 && numbers[3] > 0.0, "rate and p99: {hub_row}");
    if result.contains("mosquitto: SKIPPED") {
        eprintln!("\n!!! telemetry smoke test: mosquitto was SKIPPED (not installed): NOT TESTED !!!\n");
    }
}

#[test]
fn fanout_bench_delivers_to_200_devices_and_prints_the_table() {
    let (status, stdout, stderr) = run_bench(&[
        "--devices",
        "200",
        "--hub-bin",
        "self",
        "--allow-missing-peers",
        "--timeout-secs",
        "60",
    ]);
    assert!(status.success(), "the bench failed ({status}):\n{stdout}\n{stderr}");
    let result = stdout.lines().find(|l| l.starts_with("result: ")).expect("a result line");
    assert!(result.contains("hub: ok"), "{result}");
    assert!(result.contains("hub-amqp: ok"), "{result}");
    for row in ["hub REST", "hub AMQP"] {
        let hub_row = stdout.lines().find(|l| l.starts_with(row)).expect("the hub's rows in the table");
        let numbers: Vec<f64> = hub_row.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        assert!(numbers.len() >= 8, "the hub's row has every column: {hub_row}");
        assert!(numbers[1] > 0.0, "a fan-out rate: {hub_row}");
    }
    for peer in ["mosquitto", "rumqttd"] {
        if result.contains(&format!("{peer}: SKIPPED")) {
            eprintln!(
                "\n!!! fanout smoke test: {peer} was SKIPPED (not installed or not built): NOT TESTED !!!\n"
            );
        } else {
            assert!(result.contains(&format!("{peer}: ok")), "{peer}: {result}");
            assert!(stdout.contains(&format!("hub/{peer}")), "a hub/{peer} ratio line");
            assert!(stdout.contains(&format!("hub-amqp/{peer}")), "a hub-amqp/{peer} ratio line");
        }
    }
}

/// The floor broker (`floor`, epoll, and `floor-uring`) delivers every message like a server and
/// gets its own rows and ratio lines: the hub against the floor, and the floor against the peers.
#[test]
fn floor_broker_delivers_to_200_devices_over_epoll_and_io_uring() {
    // io_uring can be switched off (`kernel.io_uring_disabled`); then only the epoll floor runs.
    let uring = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").is_ok_and(|v| v.trim() == "0");
    if !uring {
        eprintln!("\n!!! floor smoke test: io_uring is disabled here: floor-uring NOT TESTED !!!\n");
    }
    let servers = if uring { "hub-amqp,floor,floor-uring" } else { "hub-amqp,floor" };
    let (status, stdout, stderr) =
        run_bench(&["--devices", "200", "--servers", servers, "--hub-bin", "self", "--timeout-secs", "60"]);
    assert!(status.success(), "the bench failed ({status}):\n{stdout}\n{stderr}");
    let result = stdout.lines().find(|l| l.starts_with("result: ")).expect("a result line");
    let floors: &[&str] = if uring { &["floor", "floor-uring"] } else { &["floor"] };
    for floor in floors {
        assert!(result.contains(&format!("{floor}: ok")), "{floor}: {result}");
        assert!(stdout.contains(&format!("hub-amqp/{floor}")), "a hub-amqp/{floor} ratio line:\n{stdout}");
    }
    let row = stdout.lines().find(|l| l.starts_with("floor (epoll)")).expect("the floor's row");
    let numbers: Vec<f64> = row.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert!(numbers.len() >= 8 && numbers[1] > 0.0, "the floor's row has a fan-out rate: {row}");
}

/// `--persist` beside the in-memory hub: the iothub-emulator binary beside the test (built by
/// `cargo test --workspace`, or `cargo build -p iothub-emulator`); the persisted hub writes its
/// journal (bytes handed to `write` per message) on top of what the in-memory one writes.
#[test]
fn fanout_bench_measures_the_hub_with_and_without_persist_side_by_side() {
    let hub = testbench::child_hub::find_binary(None).expect("the iothub-emulator binary");
    let (status, stdout, stderr) = run_bench(&[
        "--devices",
        "200",
        "--servers",
        "hub-amqp,hub-amqp-persist",
        "--hub-bin",
        hub.to_str().unwrap(),
        "--timeout-secs",
        "60",
    ]);
    assert!(status.success(), "the bench failed ({status}):\n{stdout}\n{stderr}");
    let result = stdout.lines().find(|l| l.starts_with("result: ")).expect("a result line");
    assert!(result.contains("hub-amqp: ok") && result.contains("hub-amqp-persist: ok"), "{result}");
    // The wchar column (bytes handed to write per message; the disk column stays 0 on a tmpfs).
    let written = |row: &str| -> f64 {
        let line = stdout.lines().find(|l| l.starts_with(row)).unwrap_or_else(|| panic!("no {row} row"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols[cols.len() - 2].parse().expect("a wchar B/msg column")
    };
    // The persisted hub writes at least a C2D record per message into its journal.
    assert!(written("hub AMQP persist") > written("hub AMQP  ") + 50.0, "{stdout}");
    assert!(stdout.contains("hub-amqp-persist/hub-amqp"), "the ratio line:\n{stdout}");
}

/// The hub with its plain MQTT connections served by the task-less drivers
/// (`--mqtt-plain-driver`, the default) and with a task each (`--mqtt-plain-driver=false`)
/// delivers every message both ways, each with its own row and ratio line.
#[test]
fn fanout_bench_measures_the_hub_with_task_less_drivers_and_with_tasks() {
    let (status, stdout, stderr) = run_bench(&[
        "--devices",
        "200",
        "--servers",
        "hub-amqp-drivers,hub-amqp-tasks,floor",
        "--hub-bin",
        "self",
        "--timeout-secs",
        "60",
    ]);
    assert!(status.success(), "the bench failed ({status}):\n{stdout}\n{stderr}");
    let result = stdout.lines().find(|l| l.starts_with("result: ")).expect("a result line");
    for (kind, row) in [("hub-amqp-drivers", "hub AMQP drivers"), ("hub-amqp-tasks", "hub AMQP tasks")] {
        assert!(result.contains(&format!("{kind}: ok")), "{result}");
        assert!(stdout.lines().any(|l| l.starts_with(row)), "the row of {kind}:\n{stdout}");
        assert!(stdout.contains(&format!("{kind}/floor")), "a ratio line:\n{stdout}");
    }
}
