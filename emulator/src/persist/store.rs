//! The state directory (`<data-dir>/state/`): numbered log segments and snapshots, the sink the
//! committer writes to, recovery's reader and the snapshot writer.
//!
//! Files: `segment-N.log` (journal groups, appended) and `snapshot-N.snap` (every live entity as
//! records, written as `snapshot-N.tmp`, synced, then renamed). Snapshot `N` holds the state at or
//! after the moment segment `N` was started, so recovery reads the newest snapshot `N`, then every
//! segment numbered `N` or above, in order; older files are deleted once snapshot `N` is renamed.
//!
//! Ownership: the committer thread owns the [`Segments`] sink; a snapshot asks it to move to a new
//! segment through [`Rotation`] (taken at the next group it writes). Recovery runs before either
//! exists.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::codec::{DecodeError, FRAME_HEADER_BYTES, MAX_FRAME_BYTES, crc32, frame};
use super::journal::Sink;
use super::records::Record;

/// Why the state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A file could not be read, written or listed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A complete, checksummed record does not decode: written by another version, or damaged.
    #[error("{path} at byte {offset}: {source} (written by another version of the emulator?)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Offset of the record's frame.
        offset: u64,
        /// What is wrong.
        source: DecodeError,
    },
    /// Another process (or hub) holds the state directory.
    #[error("{0} is in use by another hub (one hub per state directory)")]
    Locked(PathBuf),
    /// A snapshot ends in a torn or damaged frame (snapshots are synced before they are named).
    #[error("snapshot {path} is damaged at byte {offset}; move it away to start from the log segments")]
    DamagedSnapshot {
        /// The file.
        path: PathBuf,
        /// Where the damage starts.
        offset: u64,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PersistError + 'a {
    move |source| PersistError::Io { what, path: path.to_path_buf(), source }
}

/// An exclusive lock on a state directory (`LOCK`, `flock`), released when dropped or when the
/// process dies (kill -9 included).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Locks `dir` (creating it), or fails with [`PersistError::Locked`] when another holds it.
    pub fn acquire(dir: &Path) -> Result<Self, PersistError> {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let path = dir.join("LOCK");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("opening", &path))?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: flock on a file descriptor this function owns for the call's duration.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    return Err(PersistError::Locked(dir.to_path_buf()));
                }
                return Err(PersistError::Io { what: "locking", path, source: e });
            }
        }
        Ok(Self { _file: file })
    }
}

/// The numbered files of a state directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// The newest complete snapshot's number.
    pub snapshot: Option<u64>,
    /// Segment numbers, ascending.
    pub segments: Vec<u64>,
}

/// `segment-N.log` in `dir`.
pub fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("segment-{n:010}.log"))
}

/// `snapshot-N.snap` in `dir`.
pub fn snapshot_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("snapshot-{n:010}.snap"))
}

fn numbered(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?.strip_suffix(suffix)?.parse().ok()
}

/// Lists `dir` (creating it), deleting unfinished snapshots (`.tmp`).
pub fn read_layout(dir: &Path) -> Result<Layout, PersistError> {
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let mut layout = Layout::default();
    for entry in std::fs::read_dir(dir).map_err(io("listing", dir))? {
        let entry = entry.map_err(io("listing", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = numbered(name, "segment-", ".log") {
            layout.segments.push(n);
        } else if let Some(n) = numbered(name, "snapshot-", ".snap") {
            layout.snapshot = layout.snapshot.max(Some(n));
        } else if name.starts_with("snapshot-") && name.ends_with(".tmp") {
            let p = entry.path();
            std::fs::remove_file(&p).map_err(io("removing", &p))?;
        }
    }
    layout.segments.sort_unstable();
    Ok(layout)
}

/// What recovery read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Records applied.
    pub records: u64,
    /// Bytes read (snapshot and segments).
    pub bytes: u64,
    /// Bytes of segments (what a new snapshot would save reading).
    pub log_bytes: u64,
    /// Bytes cut from a torn tail.
    pub torn_bytes: u64,
}

/// Reads the newest snapshot and the segments after it, handing every record to `apply` in
/// order. A torn tail of a segment (a crash in the middle of a write) is cut from the file.
/// Returns the layout read and the number the next segment must take.
pub fn replay(
    dir: &Path,
    mut apply: impl FnMut(Record<'_>),
) -> Result<(Layout, u64, Replayed), PersistError> {
    let layout = read_layout(dir)?;
    let mut stats = Replayed::default();
    let from = layout.snapshot.unwrap_or(0);
    if let Some(n) = layout.snapshot {
        let path = snapshot_path(dir, n);
        let (valid, len) = read_frames(&path, &mut apply, &mut stats)?;
        if valid != len {
            return Err(PersistError::DamagedSnapshot { path, offset: valid });
        }
    }
    let mut next = from;
    for &n in layout.segments.iter().filter(|&&n| n >= from) {
        let path = segment_path(dir, n);
        let (valid, len) = read_frames(&path, &mut apply, &mut stats)?;
        stats.log_bytes += valid;
        if valid < len {
            tracing::warn!(file = %path.display(), cut = len - valid, "cutting the torn tail of a state segment (a write the hub was killed in; never acknowledged)");
            stats.torn_bytes += len - valid;
            let f = OpenOptions::new().write(true).open(&path).map_err(io("opening", &path))?;
            f.set_len(valid).map_err(io("truncating", &path))?;
            f.sync_all().map_err(io("syncing", &path))?;
        }
        next = n + 1;
    }
    Ok((layout, next, stats))
}

/// Streams `path`'s frames into `apply`; returns the length of its valid prefix and the file's
/// length.
fn read_frames(
    path: &Path,
    apply: &mut impl FnMut(Record<'_>),
    stats: &mut Replayed,
) -> Result<(u64, u64), PersistError> {
    const CHUNK: usize = 8 << 20;
    let mut f = File::open(path).map_err(io("opening", path))?;
    let len = f.metadata().map_err(io("reading", path))?.len();
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
    let mut start = 0usize; // first unread byte of `buf`
    let mut offset = 0u64; // file offset of buf[start]
    let mut eof = false;
    loop {
        let avail = buf.len() - start;
        // Need more bytes for the next header or payload?
        let need = if avail < FRAME_HEADER_BYTES {
            FRAME_HEADER_BYTES
        } else {
            let n = u32::from_le_bytes(buf[start..start + 4].try_into().expect("4 bytes")) as usize;
            if n > MAX_FRAME_BYTES {
                return Ok((offset, len));
            }
            FRAME_HEADER_BYTES + n
        };
        if avail < need {
            if eof {
                return Ok((offset, len));
            }
            buf.drain(..start);
            start = 0;
            let have = buf.len();
            buf.resize(have + CHUNK.max(need), 0);
            let got = read_full(&mut f, &mut buf[have..]).map_err(io("reading", path))?;
            buf.truncate(have + got);
            eof = got == 0;
            continue;
        }
        let head = &buf[start..start + FRAME_HEADER_BYTES];
        let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
        let payload = &buf[start + FRAME_HEADER_BYTES..start + need];
        if crc32(payload) != crc {
            return Ok((offset, len));
        }
        let record = Record::decode(payload).map_err(|source| PersistError::Corrupt {
            path: path.to_path_buf(),
            offset,
            source,
        })?;
        apply(record);
        stats.records += 1;
        stats.bytes += need as u64;
        start += need;
        offset += need as u64;
    }
}

fn read_full(f: &mut File, mut buf: &mut [u8]) -> std::io::Result<usize> {
    let mut total = 0;
    while !buf.is_empty() {
        match f.read(buf) {
            Ok(0) => break,
            Ok(n) => {
                total += n;
                buf = &mut buf[n..];
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

/// Asks the committer's [`Segments`] to start segment `N` at its next write.
#[derive(Debug, Clone)]
pub struct Rotation(Arc<AtomicU64>);

impl Rotation {
    /// Asks for segment `n` (takes effect at the next group written).
    pub fn request(&self, n: u64) {
        self.0.fetch_max(n, Ordering::AcqRel);
    }
}

/// The committer's sink: appends to the current segment, moving to a new one when asked.
#[derive(Debug)]
pub struct Segments {
    dir: PathBuf,
    current: u64,
    file: File,
    wanted: Arc<AtomicU64>,
    sync_dir: bool,
}

impl Segments {
    /// Creates segment `n` in `dir`; `sync_dir` syncs the directory when a segment is created
    /// (`--persist-sync`: the new name must survive a power cut too).
    pub fn create(dir: &Path, n: u64, sync_dir: bool) -> Result<(Self, Rotation), PersistError> {
        let file = open_segment(dir, n, sync_dir)?;
        let wanted = Arc::new(AtomicU64::new(n));
        Ok((
            Self { dir: dir.to_path_buf(), current: n, file, wanted: Arc::clone(&wanted), sync_dir },
            Rotation(wanted),
        ))
    }
}

fn open_segment(dir: &Path, n: u64, sync_dir: bool) -> Result<File, PersistError> {
    let path = segment_path(dir, n);
    let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io("creating", &path))?;
    if sync_dir {
        sync_directory(dir)?;
    }
    Ok(file)
}

/// Syncs a directory's entries (new and renamed names).
pub fn sync_directory(dir: &Path) -> Result<(), PersistError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("syncing", dir))
}

impl Sink for Segments {
    fn write_group(&mut self, group: &[u8]) -> std::io::Result<()> {
        let wanted = self.wanted.load(Ordering::Acquire);
        if wanted > self.current {
            self.file = open_segment(&self.dir, wanted, self.sync_dir).map_err(std::io::Error::other)?;
            self.current = wanted;
        }
        self.file.write_all(group)
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// Writes `snapshot-N.tmp` frame by frame, then syncs and renames it.
#[derive(Debug)]
pub struct SnapshotWriter {
    dir: PathBuf,
    n: u64,
    tmp: PathBuf,
    out: std::io::BufWriter<File>,
    frame: Vec<u8>,
    /// Bytes written so far.
    pub bytes: u64,
    /// Records written so far.
    pub records: u64,
}

impl SnapshotWriter {
    /// Starts snapshot `n` in `dir`.
    pub fn create(dir: &Path, n: u64) -> Result<Self, PersistError> {
        let tmp = dir.join(format!("snapshot-{n:010}.tmp"));
        let f = File::create(&tmp).map_err(io("creating", &tmp))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            n,
            tmp,
            out: std::io::BufWriter::with_capacity(1 << 20, f),
            frame: Vec::new(),
            bytes: 0,
            records: 0,
        })
    }

    /// Adds one record.
    pub fn push(&mut self, record: &Record<'_>) -> Result<(), PersistError> {
        self.frame.clear();
        frame(&mut self.frame, |w| record.encode(w));
        self.out.write_all(&self.frame).map_err(io("writing", &self.tmp))?;
        self.bytes += self.frame.len() as u64;
        self.records += 1;
        Ok(())
    }

    /// Adds `records` records already framed in `bytes`.
    pub fn push_framed(&mut self, bytes: &[u8], records: u64) -> Result<(), PersistError> {
        self.out.write_all(bytes).map_err(io("writing", &self.tmp))?;
        self.bytes += bytes.len() as u64;
        self.records += records;
        Ok(())
    }

    /// Syncs and names the snapshot, then deletes the segments and snapshots it replaces.
    pub fn finish(self) -> Result<(), PersistError> {
        let Self { dir, n, tmp, out, .. } = self;
        let f = out.into_inner().map_err(|e| PersistError::Io {
            what: "writing",
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        f.sync_all().map_err(io("syncing", &tmp))?;
        let path = snapshot_path(&dir, n);
        std::fs::rename(&tmp, &path).map_err(io("renaming", &tmp))?;
        sync_directory(&dir)?;
        let layout = read_layout(&dir)?;
        for s in layout.segments.into_iter().filter(|&s| s < n) {
            let p = segment_path(&dir, s);
            std::fs::remove_file(&p).map_err(io("removing", &p))?;
        }
        for entry in std::fs::read_dir(&dir).map_err(io("listing", &dir))? {
            let entry = entry.map_err(io("listing", &dir))?;
            if let Some(old) = entry.file_name().to_str().and_then(|s| numbered(s, "snapshot-", ".snap"))
                && old < n
            {
                let p = entry.path();
                std::fs::remove_file(&p).map_err(io("removing", &p))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u64) -> Record<'static> {
        Record::FeedbackCut { next: n }
    }

    fn values(dir: &Path) -> (Vec<u64>, u64, Replayed) {
        let mut seen = Vec::new();
        let (_, next, stats) = replay(dir, |r| match r {
            Record::FeedbackCut { next } => seen.push(next),
            other => panic!("unexpected {other:?}"),
        })
        .unwrap();
        (seen, next, stats)
    }

    #[test]
    fn segments_snapshots_and_a_torn_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        assert_eq!(values(&dir), (vec![], 0, Replayed::default()));
        let (mut seg, rotation) = Segments::create(&dir, 0, false).unwrap();
        let mut group = Vec::new();
        for n in 1..=3 {
            frame(&mut group, |w| rec(n).encode(w));
        }
        seg.write_group(&group).unwrap();
        rotation.request(1);
        let mut g2 = Vec::new();
        frame(&mut g2, |w| rec(4).encode(w));
        seg.write_group(&g2).unwrap();
        assert_eq!(values(&dir).0, vec![1, 2, 3, 4]);
        // A snapshot at segment 1 holds 1..3; segment 0 goes.
        let mut snap = SnapshotWriter::create(&dir, 1).unwrap();
        for n in 1..=3 {
            snap.push(&rec(n)).unwrap();
        }
        snap.finish().unwrap();
        assert!(!segment_path(&dir, 0).exists());
        // A torn write at the end of segment 1 is cut.
        let mut torn = Vec::new();
        frame(&mut torn, |w| rec(5).encode(w));
        seg.write_group(&torn[..torn.len() - 2]).unwrap();
        let before = std::fs::metadata(segment_path(&dir, 1)).unwrap().len();
        let (seen, next, stats) = values(&dir);
        assert_eq!(seen, vec![1, 2, 3, 4]);
        assert_eq!(next, 2);
        assert_eq!(stats.torn_bytes, torn.len() as u64 - 2);
        assert_eq!(std::fs::metadata(segment_path(&dir, 1)).unwrap().len(), before - stats.torn_bytes);
    }

    #[test]
    fn large_files_stream_across_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let (mut seg, _) = Segments::create(&dir, 0, false).unwrap();
        let mut group = Vec::new();
        for n in 0..1_000_000u64 {
            frame(&mut group, |w| rec(n).encode(w));
        }
        seg.write_group(&group).unwrap();
        let (seen, _, stats) = values(&dir);
        assert_eq!(seen.len(), 1_000_000);
        assert!(seen.iter().enumerate().all(|(i, &v)| v == i as u64));
        assert_eq!(stats.bytes, group.len() as u64);
    }

    #[test]
    fn an_undecodable_record_stops_recovery_with_its_place() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let (mut seg, _) = Segments::create(&dir, 0, false).unwrap();
        let mut group = Vec::new();
        frame(&mut group, |w| rec(1).encode(w));
        frame(&mut group, |w| w.u8(250));
        seg.write_group(&group).unwrap();
        let e = replay(&dir, |_| ()).unwrap_err();
        assert!(matches!(e, PersistError::Corrupt { offset: 17, .. }), "{e}");
    }
}
