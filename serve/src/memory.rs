//! Handing freed heap back to the kernel after a flood of connections.
//!
//! glibc's allocator keeps memory freed by a burst of connections in its
//! per-thread arenas: measured with `bench/rss_after_flood.sh`, a mirror
//! that served 5,000 slow downloads stayed at ~60 MB resident afterwards
//! (16 MB before), for good, while `malloc_trim(0)` brought it back to
//! ~24 MB. So once the open connections fall well below their recent peak,
//! the heap is trimmed once (`after_flood`, called once a second by the
//! watch task in [`crate::limits`]). A trim walks the arenas (a few ms),
//! which is why it waits for a flood to end rather than running on a
//! timer.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Places admitted and not yet given back, over every [`crate::limits::Admission`]
/// (connections, mostly; long-polls and patch turns too).
pub(crate) static OPEN: AtomicUsize = AtomicUsize::new(0);
/// The most [`OPEN`] reached since the last look (kept by every admission,
/// so a flood shorter than the watch task's second is still seen).
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// One more place admitted.
pub(crate) fn opened() {
    let n = OPEN.fetch_add(1, Ordering::Relaxed) + 1;
    PEAK.fetch_max(n, Ordering::Relaxed);
}

/// One place given back.
pub(crate) fn closed() {
    OPEN.fetch_sub(1, Ordering::Relaxed);
}

/// A flood is this many connections above where the count settles.
const FLOOD: usize = 1000;

/// Tracks the peak of open connections; trims once they fell to a quarter
/// of a peak at least [`FLOOD`] above them. `peak` is the caller's state.
pub(crate) fn after_flood(peak: &mut usize) {
    let open = OPEN.load(Ordering::Relaxed);
    *peak = (*peak).max(PEAK.swap(open, Ordering::Relaxed)).max(open);
    if *peak >= open + FLOOD && open <= *peak / 4 {
        let before = resident_kb();
        release_free_heap();
        tracing::debug!(
            peak = *peak,
            open,
            rss_kb_before = before,
            rss_kb_after = resident_kb(),
            "returned freed heap to the kernel after a flood of connections"
        );
        *peak = open;
    }
}

/// Resident set size in kB (0 if unknown).
pub fn resident_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Returns the allocator's free memory to the kernel (glibc's
/// `malloc_trim(0)`: every arena, not just the main heap's top). Also
/// called by the origin after a full scan, whose working set is freed
/// when its generation is published.
#[allow(unsafe_code)]
pub fn release_free_heap() {
    // SAFETY: malloc_trim takes no pointers and only rearranges the
    // allocator's own free lists; glibc documents it as thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
