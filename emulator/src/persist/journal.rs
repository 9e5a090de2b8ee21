//! The journal: records appended by hub operations, written to disk in groups by one committer
//! thread, and the durable position callers await before they answer success (group commit).
//!
//! Ownership: [`Journal`] owns the pending buffer (behind a `std::sync::Mutex`, held only to copy a
//! frame in or to swap the buffer out, never across an `.await`) and publishes the durable
//! position on a `tokio::sync::watch` channel. The committer thread ([`Journal::start`]) owns the
//! [`Sink`]: it takes the whole buffer, writes it in one call (and syncs it when asked), then
//! publishes the new position. Records that arrive while it writes form the next group, so groups
//! grow with the load and an idle journal costs nothing (the thread sleeps on a condition
//! variable).
//!
//! Positions are byte offsets in the journal's stream since it was opened: a [`Ticket`] is the end
//! of one appended frame, and it is durable once the committer has written past it. A failed write
//! fails the journal for good: every waiter and every later append gets [`JournalError::Failed`],
//! since the file may now hold a torn group and nothing after it may be answered as written.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tokio::sync::watch;

use super::codec::{Writer, frame};

/// Where the committer writes groups.
pub trait Sink: Send + 'static {
    /// Writes the whole group (one call: a crash leaves at most this group torn).
    fn write_group(&mut self, group: &[u8]) -> std::io::Result<()>;
    /// Makes what was written survive a power cut (`fdatasync`).
    fn sync(&mut self) -> std::io::Result<()>;
}

impl Sink for std::fs::File {
    fn write_group(&mut self, group: &[u8]) -> std::io::Result<()> {
        std::io::Write::write_all(self, group)
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.sync_data()
    }
}

/// Why a record cannot be made durable.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum JournalError {
    /// A write or sync failed (disk full, I/O error); the journal takes no more records.
    #[error("the state journal failed: {0}")]
    Failed(String),
    /// The journal was closed (the hub is shutting down) before the record was written.
    #[error("the state journal is closed")]
    Closed,
}

/// The end position of an appended record: durable once the committer wrote past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// When groups are synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Durable once written to the kernel: survives the hub being killed (kill -9), not a power
    /// cut. The default.
    Write,
    /// Durable once synced to the device (`fdatasync` per group): survives a power cut too.
    Sync,
}

/// The durable position, or why there will be none.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Durable {
    Upto(u64),
    Failed(String),
    Closed(u64),
}

#[derive(Debug, Default)]
struct Pending {
    buf: Vec<u8>,
    /// Stream position of `buf[0]`.
    base: u64,
    closed: bool,
    failed: Option<String>,
}

/// Tells journals apart in [`Journal::take_thread_ticket`].
static NEXT_JOURNAL_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The journal id and end position of the last record appended on this thread: a protocol
    /// driver handles its input synchronously (the hub appends under its locks), then takes this
    /// ticket before its first `.await` and awaits durability before it writes its answers.
    static LAST_APPENDED: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// See the module documentation.
#[derive(Debug)]
pub struct Journal {
    id: u64,
    pending: Mutex<Pending>,
    work: Condvar,
    durable: watch::Sender<Durable>,
}

/// The committer thread; [`CommitterHandle::close`] writes what is pending and stops it.
#[derive(Debug)]
pub struct CommitterHandle {
    journal: Arc<Journal>,
    thread: Option<JoinHandle<()>>,
}

impl Journal {
    /// A journal whose stream starts at `position` (the size of what is already on disk), with
    /// its committer thread writing to `sink`.
    pub fn start(sink: impl Sink, mode: SyncMode, position: u64) -> (Arc<Self>, CommitterHandle) {
        let journal = Arc::new(Self {
            id: NEXT_JOURNAL_ID.fetch_add(1, Ordering::Relaxed),
            pending: Mutex::new(Pending { base: position, ..Pending::default() }),
            work: Condvar::new(),
            durable: watch::Sender::new(Durable::Upto(position)),
        });
        let j = Arc::clone(&journal);
        let thread = std::thread::Builder::new()
            .name("state-journal".into())
            .spawn(move || j.commit_loop(sink, mode))
            .expect("the journal thread starts");
        (Arc::clone(&journal), CommitterHandle { journal, thread: Some(thread) })
    }

    /// Appends one record (written by `write`) and returns its ticket. Never blocks on I/O: call
    /// it under the lock that orders the change it records.
    pub fn append(&self, write: impl FnOnce(&mut Writer<'_>)) -> Result<Ticket, JournalError> {
        let mut p = self.pending.lock().expect("journal lock");
        if p.failed.is_some() || p.closed {
            // A ticket no write reaches: whoever takes this thread's ticket fails its wait too.
            LAST_APPENDED.with(|c| c.set((self.id, u64::MAX)));
        }
        if let Some(why) = &p.failed {
            return Err(JournalError::Failed(why.clone()));
        }
        if p.closed {
            return Err(JournalError::Closed);
        }
        let was_empty = p.buf.is_empty();
        frame(&mut p.buf, write);
        let end = p.base + p.buf.len() as u64;
        drop(p);
        if was_empty {
            self.work.notify_one();
        }
        LAST_APPENDED.with(|c| c.set((self.id, end)));
        Ok(Ticket(end))
    }

    /// The ticket of the last record this thread appended to this journal since the last take, if
    /// any (a record appended to another journal in between is not this journal's to wait for).
    /// Call it in the same synchronous stretch that appended: another task on this thread may
    /// append later, and its ticket is not yours to take (waiting for it too would be harmless).
    pub fn take_thread_ticket(&self) -> Option<Ticket> {
        let (id, end) = LAST_APPENDED.with(|c| c.replace((0, 0)));
        (id == self.id).then_some(Ticket(end))
    }

    /// The end of everything appended so far: durable once every record appended until now is.
    pub fn appended_position(&self) -> Ticket {
        let p = self.pending.lock().expect("journal lock");
        Ticket(p.base + p.buf.len() as u64)
    }

    /// Stops the journal as a kill -9 would: what is not written yet is dropped, never written,
    /// and every later append and wait fails. For crash tests.
    pub fn halt(&self) {
        let mut p = self.pending.lock().expect("journal lock");
        p.buf.clear();
        p.failed = Some("the journal was halted".into());
        self.durable.send_replace(Durable::Failed("the journal was halted".into()));
        drop(p);
        self.work.notify_one();
    }

    /// Waits until `ticket` is durable.
    pub async fn durable(&self, ticket: Ticket) -> Result<(), JournalError> {
        let mut rx = self.durable.subscribe();
        let state = rx
            .wait_for(|d| match d {
                Durable::Upto(p) => *p >= ticket.0,
                Durable::Failed(_) | Durable::Closed(_) => true,
            })
            .await
            .map_err(|_| JournalError::Closed)?
            .clone();
        match state {
            Durable::Upto(_) => Ok(()),
            Durable::Closed(p) if p >= ticket.0 => Ok(()),
            Durable::Closed(_) => Err(JournalError::Closed),
            Durable::Failed(why) => Err(JournalError::Failed(why)),
        }
    }

    /// The position written so far.
    pub fn durable_position(&self) -> u64 {
        match &*self.durable.borrow() {
            Durable::Upto(p) | Durable::Closed(p) => *p,
            Durable::Failed(_) => 0,
        }
    }

    fn commit_loop(&self, mut sink: impl Sink, mode: SyncMode) {
        let mut group = Vec::new();
        loop {
            let (end, closing) = {
                let mut p = self.pending.lock().expect("journal lock");
                while p.buf.is_empty() && !p.closed && p.failed.is_none() {
                    p = self.work.wait(p).expect("journal lock");
                }
                if p.failed.is_some() {
                    // Halted: nothing more is written.
                    return;
                }
                group.clear();
                std::mem::swap(&mut group, &mut p.buf);
                p.base += group.len() as u64;
                (p.base, p.closed)
            };
            if !group.is_empty() {
                let written = sink
                    .write_group(&group)
                    .and_then(|()| if mode == SyncMode::Sync { sink.sync() } else { Ok(()) });
                if let Err(e) = written {
                    let why = e.to_string();
                    tracing::error!(error = %why, "state journal write failed; the hub takes no more state changes");
                    self.pending.lock().expect("journal lock").failed = Some(why.clone());
                    self.durable.send_replace(Durable::Failed(why));
                    return;
                }
                let p = self.pending.lock().expect("journal lock");
                if p.failed.is_some() {
                    return;
                }
                // Published under the lock, so a halt cannot be overwritten.
                self.durable.send_replace(Durable::Upto(end));
            }
            // Keep a large group's buffer only while groups stay large.
            if group.capacity() > 4 << 20 {
                group = Vec::new();
            }
            if closing && self.pending.lock().expect("journal lock").buf.is_empty() {
                self.durable.send_replace(Durable::Closed(end));
                return;
            }
        }
    }
}

impl CommitterHandle {
    /// Stops taking records, writes what is pending, and waits for the thread.
    pub fn close(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.journal.pending.lock().expect("journal lock").closed = true;
        self.journal.work.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for CommitterHandle {
    fn drop(&mut self) {
        self.shut();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::codec::{Reader, ScanEnd, scan};

    /// A sink recording each group, optionally failing from the `fail_at`-th write on.
    #[derive(Clone, Default)]
    struct Memory {
        groups: Arc<Mutex<Vec<Vec<u8>>>>,
        syncs: Arc<Mutex<usize>>,
        fail_at: Option<usize>,
    }

    impl Sink for Memory {
        fn write_group(&mut self, group: &[u8]) -> std::io::Result<()> {
            let mut g = self.groups.lock().unwrap();
            if self.fail_at.is_some_and(|n| g.len() >= n) {
                return Err(std::io::Error::other("disk full"));
            }
            g.push(group.to_vec());
            Ok(())
        }
        fn sync(&mut self) -> std::io::Result<()> {
            *self.syncs.lock().unwrap() += 1;
            Ok(())
        }
    }

    fn values(groups: &[Vec<u8>]) -> Vec<u64> {
        let all = groups.concat();
        let mut out = Vec::new();
        let end = scan::<()>(&all, |_, p| {
            out.push(Reader::new(p).u64("v").unwrap());
            Ok(())
        })
        .unwrap();
        assert_eq!(end, ScanEnd::Clean);
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_answered_record_is_written_in_order_and_groups_form_under_load() {
        let sink = Memory::default();
        let (journal, committer) = Journal::start(sink.clone(), SyncMode::Sync, 0);
        let mut tasks = Vec::new();
        for t in 0..32u64 {
            let j = Arc::clone(&journal);
            tasks.push(tokio::spawn(async move {
                for k in 0..50u64 {
                    let ticket = j.append(|w| w.u64(t * 1000 + k)).unwrap();
                    j.durable(ticket).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        committer.close();
        let groups = sink.groups.lock().unwrap().clone();
        let mut got = values(&groups);
        // Each sender's records are in its own order; all 1,600 are there once.
        for t in 0..32u64 {
            let mine: Vec<u64> = got.iter().copied().filter(|v| v / 1000 == t).collect();
            assert_eq!(mine, (0..50).map(|k| t * 1000 + k).collect::<Vec<_>>());
        }
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len(), 1600);
        assert!(groups.len() < 1600, "concurrent records share groups: {} groups", groups.len());
        assert_eq!(*sink.syncs.lock().unwrap(), groups.len(), "one sync per group");
        assert_eq!(journal.durable_position(), groups.iter().map(|g| g.len() as u64).sum::<u64>());
    }

    #[tokio::test]
    async fn positions_continue_from_what_is_on_disk_and_write_mode_never_syncs() {
        let sink = Memory::default();
        let (journal, committer) = Journal::start(sink.clone(), SyncMode::Write, 1000);
        let t = journal.append(|w| w.u64(1)).unwrap();
        assert_eq!(t, Ticket(1000 + 8 + 8));
        journal.durable(t).await.unwrap();
        assert_eq!(journal.durable_position(), 1016);
        committer.close();
        assert_eq!(*sink.syncs.lock().unwrap(), 0);
    }

    #[tokio::test]
    async fn a_failed_write_fails_the_waiters_and_every_later_append() {
        let sink = Memory { fail_at: Some(1), ..Memory::default() };
        let (journal, _committer) = Journal::start(sink.clone(), SyncMode::Write, 0);
        let first = journal.append(|w| w.u64(1)).unwrap();
        journal.durable(first).await.unwrap();
        let second = journal.append(|w| w.u64(2)).unwrap();
        let err = journal.durable(second).await.unwrap_err();
        assert_eq!(err, JournalError::Failed("disk full".into()));
        assert!(matches!(journal.append(|w| w.u64(3)), Err(JournalError::Failed(_))));
        assert_eq!(values(&sink.groups.lock().unwrap()), vec![1]);
    }

    #[tokio::test]
    async fn close_writes_what_is_pending_then_refuses() {
        let sink = Memory::default();
        let (journal, committer) = Journal::start(sink.clone(), SyncMode::Write, 0);
        let tickets: Vec<Ticket> = (0..10).map(|v| journal.append(|w| w.u64(v)).unwrap()).collect();
        committer.close();
        for t in tickets {
            journal.durable(t).await.unwrap();
        }
        assert_eq!(values(&sink.groups.lock().unwrap()), (0..10).collect::<Vec<_>>());
        assert_eq!(journal.append(|w| w.u64(99)), Err(JournalError::Closed));
    }
}
