//! Gives freed heap back to the kernel after bursts.
//!
//! glibc keeps what a burst freed: 2,000 simultaneous TLS connections leave
//! a fresh process (18 MiB) at about 128 MiB resident long after they are
//! gone, although nearly all of it is free inside the allocator (measured in
//! `bench/RESULTS.md`). `malloc_trim(0)` walks every arena and returns free
//! pages with `madvise`, which brought that process back to 34-39 MiB. It
//! runs from a background service, never on a thread serving requests.
//!
//! A trim locks each arena in turn while it walks it: measured 16-21 ms
//! right after such a burst and 1.1-2.3 ms every 5 s under steady load.
//! Gating it on glibc's own count of free heap (`mallinfo2`) was tried and
//! cost the same 1.1-1.3 ms per look (it walks the same free lists), so the
//! trim stays unconditional.

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::time::{Duration, Instant};

/// How often freed heap is handed back.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// Asks the C allocator to return the free pages it holds; whether any came back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_heap() -> bool {
    // SAFETY: malloc_trim takes no pointers and is MT-safe: it locks each
    // arena in turn while it walks it.
    unsafe { libc::malloc_trim(0) != 0 }
}

/// Other allocators (musl, jemalloc builds) have no such call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_heap() -> bool {
    false
}

/// Resident memory of this process in bytes, from /proc (0 where unreadable).
/// `VmRSS` is in KiB whatever the page size (statm counts pages, which are
/// not 4 KiB everywhere).
pub fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    kib * 1024
}

pub struct HeapTrimmer;

#[async_trait]
impl BackgroundService for HeapTrimmer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TRIM_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
            let before = resident_bytes();
            let started = Instant::now();
            if release_free_heap() {
                log::debug!(
                    "returned free heap to the kernel: resident {} -> {} KiB in {:?}",
                    before / 1024,
                    resident_bytes() / 1024,
                    started.elapsed()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_heap_goes_back_to_the_kernel() {
        // Many small blocks, as connections leave them: too small for glibc
        // to mmap each, so they stay on the heap once freed. Keeping every
        // eighth alive stops free() trimming the top by itself, and leaves
        // holes of whole pages between them, as a burst does.
        let blocks: Vec<Vec<u8>> = (0..40_000).map(|i| vec![i as u8; 2048]).collect();
        let (freed, kept): (Vec<_>, Vec<_>) = blocks.into_iter().enumerate().partition(|(i, _)| i % 8 != 0);
        let resident_full = resident_bytes();
        assert!(resident_full > 80 * 1024 * 1024, "resident {resident_full} bytes with 80 MB allocated");
        drop(freed);
        assert!(release_free_heap(), "malloc_trim found nothing to release after 70 MB were freed");
        let resident_trimmed = resident_bytes();
        assert!(
            resident_trimmed + 40 * 1024 * 1024 < resident_full,
            "resident {resident_full} -> {resident_trimmed} bytes: the freed 70 MB did not go back"
        );
        assert_eq!(kept.len(), 5_000);
    }
}
