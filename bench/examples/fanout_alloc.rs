//! Where the hub's memory per device goes before and after its first C2D message, counted by
//! the allocator rather than guessed from RSS.
//!
//! The hub runs in this process (plain MQTT on 127.0.0.1, port 0) under a counting global
//! allocator that keeps the live count and bytes of every allocation size; N devices are
//! registered in-process, then connect and subscribe from client processes (copies of this
//! example running [`testbench::fanout::devices`], the fan-out bench's own client), and one
//! message is sent to each device in-process (`Hub::send_c2d`, no HTTP) and PUBACKed. The live
//! heap is snapshotted after registration, when every device is connected and subscribed, and
//! after the fan-out has settled; the output is the growth per device between snapshots, the
//! size classes that grew (count and bytes per device) and, with `--trace-size S`, the stacks of
//! allocations of S bytes made during the fan-out (or, with `--trace-connect`, during connect and
//! subscribe) that were still live at the end of that phase.
//!
//! ```text
//! cargo run --release -p testbench --example fanout_alloc -- 10000 [--trace-size 384]... [--trace-connect]
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::Cell;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use iothub_emulator::c2d::C2dMessage;
use iothub_emulator::hub::{DeviceInput, HubConfig};
use iothub_emulator::server::{ListenConfig, RunningHub};
use testbench::fanout::{self, procfs};

/// Sizes counted one by one; larger allocations share the last slot.
const EXACT: usize = 4096;
/// Stacks kept per traced size.
const TRACE_MAX: usize = 40;

struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static BY_SIZE_COUNT: [AtomicI64; EXACT + 1] = [const { AtomicI64::new(0) }; EXACT + 1];
static BY_SIZE_BYTES: [AtomicI64; EXACT + 1] = [const { AtomicI64::new(0) }; EXACT + 1];
/// Sizes whose allocations are traced (0 = none), while `TRACING` is on.
static TRACE_SIZES: [AtomicUsize; 4] = [const { AtomicUsize::new(0) }; 4];
static TRACING: AtomicBool = AtomicBool::new(false);
/// (address, size, stack, still live) of traced allocations.
static TRACED: Mutex<Vec<(usize, usize, Backtrace, bool)>> = Mutex::new(Vec::new());

thread_local! {
    /// Set while this thread is inside the tracer (its own allocations are not traced).
    static IN_TRACE: Cell<bool> = const { Cell::new(false) };
}

fn slot(size: usize) -> usize {
    size.min(EXACT)
}

fn traced_size(size: usize) -> bool {
    TRACE_SIZES.iter().any(|s| s.load(Ordering::Relaxed) == size)
}

fn on_alloc(ptr: *mut u8, size: usize) {
    LIVE_BYTES.fetch_add(size as i64, Ordering::Relaxed);
    BY_SIZE_COUNT[slot(size)].fetch_add(1, Ordering::Relaxed);
    BY_SIZE_BYTES[slot(size)].fetch_add(size as i64, Ordering::Relaxed);
    if TRACING.load(Ordering::Relaxed) && traced_size(size) {
        let _ = IN_TRACE.try_with(|t| {
            if t.get() {
                return;
            }
            t.set(true);
            if let Ok(mut v) = TRACED.try_lock()
                && v.len() < TRACE_MAX * 4
            {
                let per_size = v.iter().filter(|e| e.1 == size).count();
                if per_size < TRACE_MAX {
                    v.push((ptr as usize, size, Backtrace::force_capture(), true));
                }
            }
            t.set(false);
        });
    }
}

fn on_free(ptr: *mut u8, size: usize) {
    LIVE_BYTES.fetch_sub(size as i64, Ordering::Relaxed);
    BY_SIZE_COUNT[slot(size)].fetch_sub(1, Ordering::Relaxed);
    BY_SIZE_BYTES[slot(size)].fetch_sub(size as i64, Ordering::Relaxed);
    if traced_size(size) {
        let _ = IN_TRACE.try_with(|t| {
            if t.get() {
                return;
            }
            t.set(true);
            if let Ok(mut v) = TRACED.lock() {
                for e in v.iter_mut().filter(|e| e.0 == ptr as usize && e.3) {
                    e.3 = false;
                }
            }
            t.set(false);
        });
    }
}

// SAFETY: every call is forwarded to `System` unchanged; the bookkeeping touches atomics, a
// `const` thread-local and (only for traced sizes, guarded against re-entry) a mutex-held Vec.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            on_alloc(p, layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            on_alloc(p, layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        on_free(ptr, layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            on_free(ptr, layout.size());
            on_alloc(p, new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The live heap at one moment.
struct Snapshot {
    live: i64,
    count: Vec<i64>,
    bytes: Vec<i64>,
    rss_kib: u64,
}

fn snapshot() -> Snapshot {
    Snapshot {
        live: LIVE_BYTES.load(Ordering::Relaxed),
        count: BY_SIZE_COUNT.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
        bytes: BY_SIZE_BYTES.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
        rss_kib: procfs::rss_kib(std::process::id()).unwrap_or(0),
    }
}

fn report(title: &str, a: &Snapshot, b: &Snapshot, n: usize) {
    let per = |x: i64| x as f64 / n as f64;
    println!(
        "\n{title}: live heap {:+.0} B/device, RSS {:+.0} B/device",
        per(b.live - a.live),
        per((b.rss_kib as i64 - a.rss_kib as i64) * 1024)
    );
    let mut grew: Vec<(usize, i64, i64)> = (0..=EXACT)
        .map(|s| (s, b.count[s] - a.count[s], b.bytes[s] - a.bytes[s]))
        .filter(|x| x.2 != 0)
        .collect();
    grew.sort_by_key(|x| -x.2.abs());
    println!("  {:>9} {:>12} {:>12}", "size B", "allocs/dev", "B/device");
    for (size, count, bytes) in grew.into_iter().take(14) {
        let size = if size == EXACT { format!(">={EXACT}") } else { size.to_string() };
        println!("  {size:>9} {:>12.3} {:>12.1}", count as f64 / n as f64, per(bytes));
    }
}

type Proc = (Child, ChildStdin, std::io::Lines<BufReader<ChildStdout>>);

fn ask(procs: &mut [Proc], cmd: &str, answer: &str) -> Result<Vec<String>> {
    for (_, stdin, _) in procs.iter_mut() {
        writeln!(stdin, "{cmd}")?;
        stdin.flush()?;
    }
    let mut out = Vec::new();
    for (_, _, lines) in procs.iter_mut() {
        let line = lines.next().context("a client process exited")??;
        if !line.starts_with(answer) {
            bail!("client answered {line:?} to {cmd:?}");
        }
        out.push(line.chars().take(200).collect());
    }
    Ok(out)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--client") {
        let (start, step, count): (usize, usize, usize) =
            (args[3].parse()?, args[4].parse()?, args[5].parse()?);
        let cfg = fanout::devices::DevicesConfig {
            server: args[2].parse()?,
            indices: (0..count).map(|k| start + k * step).collect(),
            sources: args[6].split(',').map(str::parse).collect::<Result<_, _>>()?,
            per_source: 2000,
            connect_in_flight: 32,
            payload_bytes: 32,
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        return Ok(rt.block_on(fanout::devices::run(cfg, tokio::io::BufReader::new(tokio::io::stdin())))?);
    }
    let n: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(10_000);
    let mut trace = Vec::new();
    let mut trace_connect = false;
    let mut it = args.iter().skip(2);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--trace-size" => trace.push(it.next().context("--trace-size S")?.parse::<usize>()?),
            "--trace-connect" => trace_connect = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    for (slot, size) in TRACE_SIZES.iter().zip(&trace) {
        slot.store(*size, Ordering::Relaxed);
    }
    fanout::raise_nofile_limit();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(hub_side(n, trace_connect))
}

async fn settle() {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    procfs::wait_idle(std::process::id(), Duration::from_millis(100), 2_000_000, deadline).await;
}

async fn hub_side(n: usize, trace_connect: bool) -> Result<()> {
    let data_dir = std::env::temp_dir().join(format!("fanout-alloc-{}", std::process::id()));
    let listen = ListenConfig { ftp_port: None, ..ListenConfig::ephemeral(IpAddr::V4(Ipv4Addr::LOCALHOST)) };
    let running = RunningHub::start(HubConfig::default(), &listen, &data_dir).await?;
    let hub = running.hub.clone();
    for i in 0..n {
        let input = DeviceInput {
            primary_key: Some(fanout::DEVICE_KEY.into()),
            secondary_key: Some(fanout::DEVICE_KEY.into()),
            ..Default::default()
        };
        hub.put_device(&fanout::device_id(i), input, None)?;
    }
    let addr = running.mqtt_plain_addr.context("plain MQTT listener")?;
    settle().await;
    let registered = snapshot();

    let procs_n = 2;
    let mut procs: Vec<Proc> = Vec::new();
    for c in 0..procs_n {
        let count = (n + procs_n - 1 - c) / procs_n;
        let sources: Vec<String> =
            (0..count.div_ceil(2000)).map(|j| format!("127.{}.251.{}", 1 + c, 1 + j)).collect();
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--client", &addr.to_string(), &c.to_string(), &procs_n.to_string(), &count.to_string()])
            .arg(sources.join(","))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let ready = lines.next().context("client exited")??;
        if ready != "ready" {
            bail!("client: {ready}");
        }
        procs.push((child, stdin, lines));
    }
    TRACING.store(trace_connect, Ordering::Relaxed);
    let mut procs = tokio::task::spawn_blocking(move || -> Result<Vec<Proc>> {
        println!("{:?}", ask(&mut procs, "connect", "connected")?);
        println!("{:?}", ask(&mut procs, "subscribe", "subscribed")?);
        Ok(procs)
    })
    .await??;
    settle().await;
    let connected = snapshot();
    let traced_connect = std::mem::take(&mut *TRACED.lock().unwrap_or_else(|p| p.into_inner()));

    TRACING.store(!trace_connect, Ordering::Relaxed);
    for i in 0..n {
        let mut body = Vec::new();
        fanout::payload(&mut body, i, 1, fanout::mono_ns(), 32);
        hub.send_c2d(&fanout::device_id(i), C2dMessage { body: Bytes::from(body), ..Default::default() })?;
    }
    procs = tokio::task::spawn_blocking(move || -> Result<Vec<Proc>> {
        println!("{:?}", ask(&mut procs, "collect 1 60000", "collected")?);
        Ok(procs)
    })
    .await??;
    settle().await;
    TRACING.store(false, Ordering::Relaxed);
    let after = snapshot();

    println!("\n{n} devices; RSS {} KiB after registration", registered.rss_kib);
    report("connect + subscribe (registered -> connected)", &registered, &connected, n);
    report("first C2D message, delivered and PUBACKed (connected -> after)", &connected, &after, n);

    let (phase, traced) = if trace_connect {
        ("connect and subscribe", traced_connect)
    } else {
        ("the fan-out", std::mem::take(&mut *TRACED.lock().unwrap_or_else(|p| p.into_inner())))
    };
    for size in TRACE_SIZES.iter().map(|s| s.load(Ordering::Relaxed)).filter(|s| *s > 0) {
        let live: Vec<&(usize, usize, Backtrace, bool)> =
            traced.iter().filter(|e| e.1 == size && e.3).collect();
        let total = traced.iter().filter(|e| e.1 == size).count();
        println!(
            "\nallocations of {size} B traced during {phase}: {total}, still live after it: {}",
            live.len()
        );
        if let Some((_, _, bt, _)) = live.first() {
            let text = bt.to_string();
            let frames: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("at "))
                .filter(|l| {
                    !l.contains("fanout_alloc::")
                        && !l.contains("std::backtrace")
                        && !l.contains("alloc::alloc")
                })
                .take(18)
                .collect();
            println!("first live one was allocated at:\n{}", frames.join("\n"));
        }
    }

    tokio::task::spawn_blocking(move || {
        let _ = ask(&mut procs, "stop", "stopped");
        for (mut c, stdin, _) in procs {
            drop(stdin);
            let _ = c.wait();
        }
    })
    .await?;
    running.stop().await?;
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(())
}
