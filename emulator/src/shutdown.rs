//! [`Shutdown`]: a server's shutdown as many connections wait for it, cheap to poll.
//!
//! Every device connection waits for the server's shutdown in the same `select!` as its socket
//! and its hub mailbox, so the wait is polled each time the connection wakes: twice or more per
//! C2D message. `CancellationToken::cancelled()` locks the token's mutex and its `Notify`'s on
//! every poll, and with every connection sharing one token those two locks moved between the
//! worker threads' caches on every message. Here a poll reads one atomic flag and, while the
//! connection's task waker is the one already registered, touches nothing shared; the registry
//! of wakers is locked only when a connection starts waiting, changes task, or stops, and once
//! at shutdown.
//!
//! Owns: the fired flag and the wakers of the connections waiting (one slot each, reused).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio_util::sync::CancellationToken;

/// A shutdown signal: fired once, waited for by any number of connections ([`Shutdown::wait`]).
/// Clones share the signal. The default one never fires (tests, and servers run without one).
#[derive(Debug, Clone, Default)]
pub struct Shutdown(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    fired: AtomicBool,
    waiters: Mutex<Slots>,
}

/// Registered wakers; `free` lists the empty slots.
#[derive(Debug, Default)]
struct Slots {
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl Shutdown {
    /// A signal that fires when [`Shutdown::fire`] is called.
    pub fn new() -> Self {
        Self::default()
    }

    /// A signal that fires when `token` is cancelled: a task waits on the token (one per call,
    /// so call it once per listener, not per connection). Needs a tokio runtime.
    pub fn on_cancel(token: &CancellationToken) -> Self {
        let signal = Self::new();
        let (token, fire) = (token.clone(), signal.clone());
        tokio::spawn(async move {
            token.cancelled().await;
            fire.fire();
        });
        signal
    }

    /// Fires the signal: every waiter, present and future, completes.
    pub fn fire(&self) {
        self.0.fired.store(true, Ordering::SeqCst);
        let wakers: Vec<Waker> = {
            let mut slots = self.0.waiters.lock().unwrap_or_else(|p| p.into_inner());
            slots.wakers.iter_mut().filter_map(Option::take).collect()
        };
        for w in wakers {
            w.wake();
        }
    }

    /// Whether the signal has fired.
    pub fn is_fired(&self) -> bool {
        self.0.fired.load(Ordering::SeqCst)
    }

    /// Completes once the signal fires. Keep one pinned for a connection's life rather than one
    /// per loop turn: registering is what costs.
    pub fn wait(&self) -> Wait<'_> {
        Wait { signal: self, slot: None }
    }
}

/// The future of [`Shutdown::wait`].
#[derive(Debug)]
pub struct Wait<'a> {
    signal: &'a Shutdown,
    /// The slot this waiter's waker is registered in, and that waker.
    slot: Option<(usize, Waker)>,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let inner = &this.signal.0;
        if inner.fired.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        if this.slot.as_ref().is_some_and(|(_, w)| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        {
            let mut slots = inner.waiters.lock().unwrap_or_else(|p| p.into_inner());
            let waker = cx.waker().clone();
            match &this.slot {
                Some((i, _)) => slots.wakers[*i] = Some(waker.clone()),
                None => {
                    let i = match slots.free.pop() {
                        Some(i) => {
                            slots.wakers[i] = Some(waker.clone());
                            i
                        }
                        None => {
                            slots.wakers.push(Some(waker.clone()));
                            slots.wakers.len() - 1
                        }
                    };
                    this.slot = Some((i, waker));
                    return recheck(inner);
                }
            }
            if let Some((_, w)) = &mut this.slot {
                *w = waker;
            }
        }
        // Fired between the check above and the registration: `fire` may have taken the wakers
        // before this one was put in.
        recheck(inner)
    }
}

fn recheck(inner: &Inner) -> Poll<()> {
    if inner.fired.load(Ordering::SeqCst) { Poll::Ready(()) } else { Poll::Pending }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if let Some((i, _)) = self.slot.take() {
            let mut slots = self.signal.0.waiters.lock().unwrap_or_else(|p| p.into_inner());
            slots.wakers[i] = None;
            slots.free.push(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    use super::*;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting_waker() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    /// A waiter registers once, is not re-registered while its waker stays the same, is woken
    /// when the signal fires, and completes; a waiter made after firing completes at once.
    #[test]
    fn waiters_are_woken_once_when_it_fires() {
        let s = Shutdown::new();
        let (count, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut a = Box::pin(s.wait());
        let mut b = Box::pin(s.wait());
        assert!(a.as_mut().poll(&mut cx).is_pending());
        assert!(b.as_mut().poll(&mut cx).is_pending());
        assert!(a.as_mut().poll(&mut cx).is_pending());
        assert_eq!(s.0.waiters.lock().unwrap().wakers.iter().flatten().count(), 2);
        drop(b);
        assert_eq!(s.0.waiters.lock().unwrap().free, [1], "a dropped waiter gives its slot back");
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        s.fire();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the one waiter left was woken");
        assert!(a.as_mut().poll(&mut cx).is_ready());
        assert!(Box::pin(s.wait()).as_mut().poll(&mut cx).is_ready());
        assert!(s.is_fired());
    }

    /// A waiter polled from another task registers that task's waker instead.
    #[test]
    fn a_new_task_waker_replaces_the_old_one() {
        let s = Shutdown::new();
        let (first, w1) = counting_waker();
        let (second, w2) = counting_waker();
        let mut a = Box::pin(s.wait());
        assert!(a.as_mut().poll(&mut Context::from_waker(&w1)).is_pending());
        assert!(a.as_mut().poll(&mut Context::from_waker(&w2)).is_pending());
        s.fire();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }

    /// `on_cancel` fires when its token is cancelled, and a task waiting on it finishes.
    #[tokio::test]
    async fn fires_when_the_token_is_cancelled() {
        let token = CancellationToken::new();
        let s = Shutdown::on_cancel(&token);
        let waiting = tokio::spawn({
            let s = s.clone();
            async move { s.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!s.is_fired());
        token.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the waiter finished within 5 s")
            .unwrap();
        assert!(s.is_fired());
    }
}
