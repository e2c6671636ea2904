//! Requests held while their upstream does not accept connections (a
//! restarting Synapse): how many wait, across snapshots, and each one's
//! schedule of tries.

use crate::observe::metrics::METRICS;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How many requests are held now; one per process, in the runtime.
#[derive(Default)]
pub struct Held {
    count: AtomicUsize,
}

impl Held {
    /// A place among the held, or `None` when `limit` already wait. Taken
    /// with one compare-and-swap, so two requests arriving together never
    /// both take the last place.
    pub fn try_hold(self: &Arc<Self>, limit: usize) -> Option<Hold> {
        self.count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)).ok()?;
        METRICS.traffic.held.inc();
        Some(Hold { held: Arc::clone(self), since: Instant::now(), attempts: 0 })
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

/// One request's place among the held, given back when dropped.
pub struct Hold {
    held: Arc<Held>,
    since: Instant,
    attempts: u32,
}

impl Hold {
    /// How long to wait before the next try: 100 ms doubling to 1 s, never
    /// past `limit` since the first refusal; `None` once it is spent.
    pub fn next_wait(&mut self, limit: Duration) -> Option<Duration> {
        let left = limit.checked_sub(self.since.elapsed()).filter(|left| !left.is_zero())?;
        let wait = Duration::from_millis(100 << self.attempts.min(4)).min(Duration::from_secs(1));
        self.attempts += 1;
        Some(wait.min(left))
    }

    pub fn waited(&self) -> Duration {
        self.since.elapsed()
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.held.count.fetch_sub(1, Ordering::AcqRel);
        METRICS.traffic.held.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_and_given_back() {
        let held = Arc::new(Held::default());
        let first = held.try_hold(2);
        let second = held.try_hold(2);
        assert!(first.is_some() && second.is_some());
        assert!(held.try_hold(2).is_none(), "a third place past the limit");
        drop(first);
        assert_eq!(held.count(), 1);
        assert!(held.try_hold(2).is_some());
    }

    #[test]
    fn waits_double_to_a_second_and_stop_at_the_limit() {
        let held = Arc::new(Held::default());
        let mut hold = held.try_hold(1).unwrap();
        let waits: Vec<_> = (0..6).map_while(|_| hold.next_wait(Duration::from_secs(60))).collect();
        let millis: Vec<_> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(millis, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(hold.next_wait(Duration::ZERO), None);
    }

    #[test]
    fn many_threads_never_pass_the_limit() {
        let held = Arc::new(Held::default());
        let most = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (held, most) = (Arc::clone(&held), Arc::clone(&most));
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        if let Some(hold) = held.try_hold(3) {
                            most.fetch_max(held.count(), Ordering::AcqRel);
                            drop(hold);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert!(most.load(Ordering::Acquire) <= 3);
        assert_eq!(held.count(), 0);
    }
}
