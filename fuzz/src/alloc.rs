//! A counting allocator: wraps the system allocator and, on the thread that asks, measures the
//! peak of live heap bytes during one call ([`track`]). The runner and the tests install it with
//! `#[global_allocator] static A: CountingAlloc = CountingAlloc;`; without it [`track`] reports 0
//! and [`installed`] is false.
//!
//! Accounting is per thread (a `const` thread-local, no destructor, so it is safe inside the
//! allocator), so a target's peak is not disturbed by other threads. Bytes freed during the call
//! that were allocated before it lower the running count; the peak is measured from the count at
//! the start of the call, so it is the largest *growth* of the heap the call caused.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

/// The allocator to install as `#[global_allocator]`.
#[derive(Debug, Default, Clone, Copy)]
pub struct CountingAlloc;

static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn grow(bytes: usize) {
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            let live = LIVE.get() + bytes as isize;
            LIVE.set(live);
            if live > PEAK.get() {
                PEAK.set(live);
            }
        }
    });
}

fn shrink(bytes: usize) {
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            LIVE.set(LIVE.get() - bytes as isize);
        }
    });
}

// SAFETY: every call is forwarded to `System` unchanged; the bookkeeping only touches
// thread-local `Cell`s and never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !INSTALLED.load(Ordering::Relaxed) {
            INSTALLED.store(true, Ordering::Relaxed);
        }
        grow(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grow(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrink(layout.size());
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Counted as the net change in size: the block's size before and after.
        if new_size >= layout.size() {
            grow(new_size - layout.size());
        } else {
            shrink(layout.size() - new_size);
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Whether [`CountingAlloc`] is the global allocator (it has seen an allocation).
pub fn installed() -> bool {
    // Make sure at least one allocation went through whatever allocator is installed.
    drop(std::hint::black_box(Box::new(0u8)));
    INSTALLED.load(Ordering::Relaxed)
}

/// Runs `f` with tracking paused: for a target's own property checks (re-encoding, comparing) and
/// input conversions, which are not the decoder's allocations. Blocks allocated inside and freed
/// after count as freed memory the call did not allocate (they only lower the running count);
/// blocks allocated before and freed inside are not subtracted (so the peak stays conservative).
pub fn untracked<R>(f: impl FnOnce() -> R) -> R {
    let was = TRACKING.replace(false);
    let r = f();
    TRACKING.set(was);
    r
}

/// Runs `f` and returns its result with the peak heap growth, in bytes, on this thread during it.
/// Not reentrant: a nested `track` measures only its own call, and the outer one loses track.
pub fn track<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LIVE.set(0);
    PEAK.set(0);
    TRACKING.set(true);
    let r = f();
    TRACKING.set(false);
    (r, PEAK.get().max(0) as usize)
}
