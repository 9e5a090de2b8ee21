//! Storage candidates for the hub's durable state (issue 15), measured side by side on the hub's
//! write pattern: register N devices, then a C2D fan-out (one message per device, each durable
//! before the sender gets its answer, many senders at once, so commits group), then every message
//! completed, then a restart that loads everything back. Each candidate runs in two modes:
//!
//! - `crash`: an answer waits until the bytes are in the kernel (a `write`): survives kill -9 of
//!   the hub, which is the contract the issue asks for;
//! - `power`: an answer waits for `fdatasync` as well: survives a power cut too.
//!
//! Candidates: `log` (an append-only file of CRC-framed records, one group commit = one `write`
//! [+ `fdatasync`], recovery replays it), `redb` (one write transaction per group; redb commits
//! are always synced, `Durability::Immediate`, for `power`; `Durability::None` is not crash-safe,
//! so `crash` also uses Immediate) and `sqlite` (rusqlite, bundled SQLite, WAL journal, one
//! transaction per group, `synchronous=OFF` for `crash` and `FULL` for `power`).
//!
//! Bytes written are the process's `wchar` and `write_bytes` from `/proc/self/io`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// A registry record as the hub would store it.
struct Device {
    id: String,
    primary: String,
    secondary: String,
    etag: String,
    generation: String,
}

/// What a group commit carries.
enum Op {
    Send { device: u32, seq: u64, body: Vec<u8> },
    Complete { device: u32, seq: u64 },
}

fn device(i: u32) -> Device {
    Device {
        id: format!("device-{i:07}"),
        primary: format!("{:0>44}", format!("{i}primarykeyprimarykeyprimarykey=")),
        secondary: format!("{:0>44}", format!("{i}secondarykeysecondarykey=")),
        etag: format!("\"{i:08x}\""),
        generation: format!("6380{i:014}"),
    }
}

/// A C2D message record: message id, correlation id, expiry, ack mode, properties and a notice.
fn body(i: u32) -> Vec<u8> {
    format!(
        "{{\"messageId\":\"msg-{i:08}\",\"expiry\":1764000000000,\"ack\":\"full\",\"props\":{{\"type\":\"update\"}},\"body\":{{\"version\":\"2.0.0\",\"url\":\"ftp://hub/fw/app-2.0.0.tar.gz\",\"sha256\":\"0011223344556677889900112233445566778899001122334455667788990011\",\"size\":1048576}}}}"
    )
    .into_bytes()
}

trait Store: Send {
    fn put_devices(&mut self, devices: &[Device]) -> Result<()>;
    fn commit(&mut self, ops: &[Op]) -> Result<()>;
    /// Loads everything (as the hub's restart would, into memory): (devices, queued messages).
    fn load(path: &Path, mode: Mode) -> Result<(usize, usize)>
    where
        Self: Sized;
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Crash,
    Power,
}

// ---------------------------------------------------------------------------------------------
// The append-only log.

const K_DEVICE: u8 = 1;
const K_SEND: u8 = 2;
const K_COMPLETE: u8 = 3;

struct Log {
    file: File,
    buf: Vec<u8>,
    mode: Mode,
}

fn put_str(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
    buf.extend_from_slice(s);
}

fn frame(buf: &mut Vec<u8>, kind: u8, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 8]);
    buf.push(kind);
    payload(buf);
    let len = (buf.len() - start - 8) as u32;
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

impl Log {
    fn open(path: &Path, mode: Mode) -> Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path.join("state.log"))?;
        Ok(Self { file, buf: Vec::with_capacity(1 << 20), mode })
    }

    fn flush(&mut self) -> Result<()> {
        self.file.write_all(&self.buf)?;
        self.buf.clear();
        if self.mode == Mode::Power {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

impl Store for Log {
    fn put_devices(&mut self, devices: &[Device]) -> Result<()> {
        for d in devices {
            frame(&mut self.buf, K_DEVICE, |b| {
                for s in [&d.id, &d.primary, &d.secondary, &d.etag, &d.generation] {
                    put_str(b, s.as_bytes());
                }
            });
        }
        self.flush()
    }

    fn commit(&mut self, ops: &[Op]) -> Result<()> {
        for op in ops {
            match op {
                Op::Send { device, seq, body } => frame(&mut self.buf, K_SEND, |b| {
                    b.extend_from_slice(&device.to_le_bytes());
                    b.extend_from_slice(&seq.to_le_bytes());
                    put_str(b, body);
                }),
                Op::Complete { device, seq } => frame(&mut self.buf, K_COMPLETE, |b| {
                    b.extend_from_slice(&device.to_le_bytes());
                    b.extend_from_slice(&seq.to_le_bytes());
                }),
            }
        }
        self.flush()
    }

    fn load(path: &Path, _mode: Mode) -> Result<(usize, usize)> {
        let mut r = std::io::BufReader::with_capacity(1 << 20, File::open(path.join("state.log"))?);
        let mut devices: HashMap<String, Vec<u8>> = HashMap::new();
        let mut queued: HashMap<(u32, u64), Vec<u8>> = HashMap::new();
        let mut head = [0u8; 8];
        let mut rec = Vec::new();
        loop {
            if r.fill_buf()?.is_empty() {
                break;
            }
            if r.read_exact(&mut head).is_err() {
                break; // a torn tail: the last group commit did not finish
            }
            let len = u32::from_le_bytes(head[..4].try_into()?) as usize;
            let crc = u32::from_le_bytes(head[4..].try_into()?);
            if len > 1 << 20 {
                bail!("record too long");
            }
            rec.resize(len, 0);
            if r.read_exact(&mut rec).is_err() || crc32fast::hash(&rec) != crc {
                break;
            }
            let mut at = 1;
            let mut take = |n: usize| {
                let s = &rec[at..at + n];
                at += n;
                s.to_vec()
            };
            match rec[0] {
                K_DEVICE => {
                    // Like the other stores: the id as the key, the rest as one value.
                    let n = u32::from_le_bytes(take(4).try_into().unwrap()) as usize;
                    let id = String::from_utf8(take(n))?;
                    devices.insert(id, rec[at..].to_vec());
                }
                K_SEND => {
                    let d = u32::from_le_bytes(take(4).try_into().unwrap());
                    let s = u64::from_le_bytes(take(8).try_into().unwrap());
                    let n = u32::from_le_bytes(take(4).try_into().unwrap()) as usize;
                    queued.insert((d, s), take(n));
                }
                K_COMPLETE => {
                    let d = u32::from_le_bytes(take(4).try_into().unwrap());
                    let s = u64::from_le_bytes(take(8).try_into().unwrap());
                    queued.remove(&(d, s));
                }
                k => bail!("unknown record kind {k}"),
            }
        }
        Ok((devices.len(), queued.len()))
    }
}

// ---------------------------------------------------------------------------------------------
// redb.

const DEVICES: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("devices");
const C2D: redb::TableDefinition<(u32, u64), &[u8]> = redb::TableDefinition::new("c2d");

struct Redb {
    db: redb::Database,
}

fn device_bytes(d: &Device) -> Vec<u8> {
    let mut b = Vec::with_capacity(160);
    for s in [&d.primary, &d.secondary, &d.etag, &d.generation] {
        put_str(&mut b, s.as_bytes());
    }
    b
}

impl Redb {
    fn open(path: &Path) -> Result<Self> {
        Ok(Self { db: redb::Database::create(path.join("state.redb"))? })
    }
}

impl Store for Redb {
    fn put_devices(&mut self, devices: &[Device]) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(DEVICES)?;
            for d in devices {
                t.insert(d.id.as_str(), device_bytes(d).as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn commit(&mut self, ops: &[Op]) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(C2D)?;
            for op in ops {
                match op {
                    Op::Send { device, seq, body } => {
                        t.insert((*device, *seq), body.as_slice())?;
                    }
                    Op::Complete { device, seq } => {
                        t.remove((*device, *seq))?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn load(path: &Path, _mode: Mode) -> Result<(usize, usize)> {
        use redb::{ReadableDatabase, ReadableTable};
        let db = redb::Database::create(path.join("state.redb"))?;
        let tx = db.begin_read()?;
        let mut devices = HashMap::new();
        for row in tx.open_table(DEVICES)?.iter()? {
            let (k, v) = row?;
            devices.insert(k.value().to_string(), v.value().to_vec());
        }
        let mut queued = HashMap::new();
        if let Ok(t) = tx.open_table(C2D) {
            for row in t.iter()? {
                let (k, v) = row?;
                queued.insert(k.value(), v.value().to_vec());
            }
        }
        Ok((devices.len(), queued.len()))
    }
}

// ---------------------------------------------------------------------------------------------
// SQLite.

struct Sqlite {
    conn: rusqlite::Connection,
}

impl Sqlite {
    fn open(path: &Path, mode: Mode) -> Result<Self> {
        let conn = rusqlite::Connection::open(path.join("state.sqlite"))?;
        let sync = if mode == Mode::Power { "FULL" } else { "OFF" };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync};
             CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, v BLOB) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS c2d (device INTEGER, seq INTEGER, v BLOB, PRIMARY KEY (device, seq)) WITHOUT ROWID;"
        ))?;
        Ok(Self { conn })
    }
}

impl Store for Sqlite {
    fn put_devices(&mut self, devices: &[Device]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached("INSERT OR REPLACE INTO devices (id, v) VALUES (?1, ?2)")?;
            for d in devices {
                st.execute(rusqlite::params![d.id, device_bytes(d)])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn commit(&mut self, ops: &[Op]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut ins = tx.prepare_cached("INSERT INTO c2d (device, seq, v) VALUES (?1, ?2, ?3)")?;
            let mut del = tx.prepare_cached("DELETE FROM c2d WHERE device = ?1 AND seq = ?2")?;
            for op in ops {
                match op {
                    Op::Send { device, seq, body } => {
                        ins.execute(rusqlite::params![device, *seq as i64, body])?;
                    }
                    Op::Complete { device, seq } => {
                        del.execute(rusqlite::params![device, *seq as i64])?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn load(path: &Path, mode: Mode) -> Result<(usize, usize)> {
        let s = Sqlite::open(path, mode)?;
        let mut devices = HashMap::new();
        let mut st = s.conn.prepare("SELECT id, v FROM devices")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            devices.insert(r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?);
        }
        let mut queued = HashMap::new();
        let mut st = s.conn.prepare("SELECT device, seq, v FROM c2d")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            queued.insert((r.get::<_, u32>(0)?, r.get::<_, i64>(1)?), r.get::<_, Vec<u8>>(2)?);
        }
        Ok((devices.len(), queued.len()))
    }
}

// ---------------------------------------------------------------------------------------------
// Group commit, modelled: `senders` senders each have one op waiting while a commit runs, so each
// commit takes the `senders` ops that arrived meanwhile (the hub's committer would take whatever
// is queued). This measures the storage, not thread hand-offs.

/// Commits ops `0..n` (made by `make`) in groups of `senders`; returns (elapsed s, commits).
fn group_commit(store: &mut dyn Store, senders: u32, n: u32, make: &dyn Fn(u32) -> Op) -> Result<(f64, u64)> {
    let start = Instant::now();
    let mut commits = 0u64;
    let mut i = 0;
    while i < n {
        let end = (i + senders).min(n);
        let ops: Vec<Op> = (i..end).map(make).collect();
        store.commit(&ops)?;
        commits += 1;
        i = end;
    }
    Ok((start.elapsed().as_secs_f64(), commits))
}

/// `/proc/self/io`: (wchar, write_bytes).
fn io() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let get =
        |k: &str| s.lines().find_map(|l| l.strip_prefix(k).and_then(|v| v.trim().parse().ok())).unwrap_or(0);
    (get("wchar:"), get("write_bytes:"))
}

fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p).map_or(0, |d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
}

struct Args {
    devices: u32,
    senders: u32,
    root: PathBuf,
    only: Vec<String>,
    modes: Vec<Mode>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        devices: 100_000,
        senders: 64,
        root: std::env::temp_dir().join("storage-compare"),
        only: vec!["log".into(), "redb".into(), "sqlite".into()],
        modes: vec![Mode::Crash, Mode::Power],
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--devices" => a.devices = v()?.parse()?,
            "--senders" => a.senders = v()?.parse()?,
            "--dir" => a.root = v()?.into(),
            "--stores" => a.only = v()?.split(',').map(String::from).collect(),
            "--modes" => {
                a.modes = v()?
                    .split(',')
                    .map(|m| match m {
                        "crash" => Ok(Mode::Crash),
                        "power" => Ok(Mode::Power),
                        _ => bail!("--modes: crash, power"),
                    })
                    .collect::<Result<_>>()?
            }
            "--help" | "-h" => {
                println!(
                    "storage-compare [--devices N (100000)] [--senders N (64)] [--stores log,redb,sqlite] [--modes crash,power] [--dir DIR]"
                );
                std::process::exit(0);
            }
            _ => bail!("unknown argument {k} (--help)"),
        }
    }
    anyhow::ensure!(a.senders > 0 && a.devices > 0, "--devices and --senders: at least 1");
    Ok(a)
}

fn run<S: Store>(name: &str, mode: Mode, a: &Args, open: impl Fn(&Path) -> Result<S>) -> Result<()> {
    let dir = a.root.join(format!("{name}-{mode:?}").to_lowercase());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut store = open(&dir)?;
    let n = a.devices;

    let io0 = io();
    let t = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let devs: Vec<Device> = chunk.iter().map(|i| device(*i)).collect();
        store.put_devices(&devs)?;
    }
    let reg_s = t.elapsed().as_secs_f64();
    let io1 = io();

    let send = |i: u32| Op::Send { device: i, seq: 1, body: body(i) };
    let (send_s, send_commits) = group_commit(&mut store, a.senders, n, &send)?;
    let io2 = io();
    let size_queued = dir_bytes(&dir);
    drop(store);

    let t = Instant::now();
    let (d, q) = S::load(&dir, mode)?;
    let load_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(d == n as usize && q == n as usize, "{name}: loaded {d} devices, {q} messages");

    let mut store = open(&dir)?;
    let io3 = io();
    let complete = |i: u32| Op::Complete { device: i, seq: 1 };
    let (done_s, done_commits) = group_commit(&mut store, a.senders, n, &complete)?;
    let io4 = io();
    drop(store);
    let (_, q_after) = S::load(&dir, mode)?;
    anyhow::ensure!(q_after == 0, "{name}: {q_after} messages left after completing all");

    let per_msg =
        |a: (u64, u64), b: (u64, u64)| ((b.0 - a.0) as f64 / f64::from(n), (b.1 - a.1) as f64 / f64::from(n));
    let (sw, sd) = per_msg(io1, io2);
    let (cw, cd) = per_msg(io3, io4);
    println!(
        "{name:<7} {:<5} {:>9.0} {:>9.0} {:>8.0} {:>8.0} {:>7.0} {:>7.0} {:>9.0} {:>7.0} {:>8.2} {:>8.1}",
        format!("{mode:?}").to_lowercase(),
        f64::from(n) / reg_s,
        f64::from(n) / send_s,
        sw,
        sd,
        f64::from(n) / send_commits as f64,
        f64::from(n) / done_s,
        cw.max(cd),
        f64::from(n) / done_commits as f64,
        load_s,
        size_queued as f64 / 1_048_576.0,
    );
    let _ = (io0, std::fs::remove_dir_all(&dir));
    Ok(())
}

fn main() -> Result<()> {
    let a = args()?;
    println!(
        "{} devices, {} senders, dir {} ({})",
        a.devices,
        a.senders,
        a.root.display(),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    println!(
        "store   mode   reg dev/s   sends/s  B/send  B/send  ops/    done/s  B/done  ops/      load s  MiB with"
    );
    println!(
        "                                    wchar   disk    commit                   commit             queue"
    );
    for mode in a.modes.clone() {
        for s in &a.only {
            match s.as_str() {
                "log" => run("log", mode, &a, |d| Log::open(d, mode))?,
                "redb" => run("redb", mode, &a, Redb::open)?,
                "sqlite" => run("sqlite", mode, &a, |d| Sqlite::open(d, mode))?,
                other => bail!("unknown store {other}"),
            }
        }
    }
    Ok(())
}
