//! [`Changes`]: the hub's change notifier, woken when a C2D message or a feedback record is
//! queued, or a device connects or changes its subscriptions, for the few readers that wait on
//! the hub as a whole (AMQP feedback and device links, a direct method waiting for its device).
//!
//! Every C2D send notifies it, from every sender's worker. `tokio::sync::Notify::notify_waiters`
//! locks the notifier's waiter list on every call, waiters or not, so each send took a lock (and
//! its cache line) shared by all senders. Here a notification costs one atomic load while nobody
//! watches: a waiter *watches* ([`Changes::watch`]) before it enables its `Notified` and checks
//! the hub, and keeps the watch while it waits. Both sides order their step with a sequentially
//! consistent fence, so either the notifier sees the watch, or the waiter's check sees the change.

use std::sync::atomic::{AtomicUsize, Ordering, fence};

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

/// The hub's change notifier (see the module doc).
#[derive(Debug, Default)]
pub struct Changes {
    notify: Notify,
    /// Live [`Watching`] guards.
    watching: AtomicUsize,
}

impl Changes {
    /// Wakes every waiter (call it after the change is made).
    pub fn notify_waiters(&self) {
        fence(Ordering::SeqCst);
        if self.watching.load(Ordering::Relaxed) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// Starts watching: take it before [`Changes::notified`] is enabled and the hub checked, and
    /// hold it while waiting. To wait without missing a change: watch, create `notified()`, pin
    /// it, call `enable()`, check the hub, then await it.
    pub fn watch(&self) -> Watching<'_> {
        self.watching.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        Watching(self)
    }

    /// A future woken by the next notification (only while a watch is held).
    pub fn notified(&self) -> Notified<'_> {
        self.notify.notified()
    }
}

/// A watch on [`Changes`]; dropping it ends the watch.
#[derive(Debug)]
pub struct Watching<'a>(&'a Changes);

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        self.0.watching.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_watcher_is_woken_and_an_unwatched_notification_costs_nothing() {
        let changes = Changes::default();
        // Nobody watches: the notification is dropped (no permit is kept for later waiters).
        changes.notify_waiters();
        let watching = changes.watch();
        let notified = changes.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        changes.notify_waiters();
        tokio::time::timeout(std::time::Duration::from_secs(5), notified).await.expect("woken");
        drop(watching);
        assert_eq!(changes.watching.load(Ordering::Relaxed), 0);
    }

    /// Many rounds of a change made on one thread while another watches, checks and waits: the
    /// waiter never sleeps through a change (the test would hang, and time out, if it did).
    #[test]
    fn no_change_is_missed_across_threads() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicU64;
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let changes = Arc::new(Changes::default());
            let state = Arc::new(AtomicU64::new(0));
            const ROUNDS: u64 = 2_000;
            let waiter = {
                let (changes, state) = (changes.clone(), state.clone());
                tokio::spawn(async move {
                    let mut seen = 0;
                    while seen < ROUNDS {
                        let _watching = changes.watch();
                        let notified = changes.notified();
                        tokio::pin!(notified);
                        notified.as_mut().enable();
                        let now = state.load(Ordering::SeqCst);
                        if now > seen {
                            seen = now;
                            continue;
                        }
                        notified.await;
                    }
                })
            };
            for i in 1..=ROUNDS {
                state.store(i, Ordering::SeqCst);
                changes.notify_waiters();
                if i % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            tokio::time::timeout(std::time::Duration::from_secs(30), waiter)
                .await
                .expect("the waiter saw every change")
                .unwrap();
        });
    }
}
