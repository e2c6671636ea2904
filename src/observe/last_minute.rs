//! One member's last minute, as HAProxy's stats page shows each server:
//! requests per second, errors and the p99 latency. Sixty one-second
//! slots, each with a coarse latency histogram; a slot is reused when its
//! second comes round again.

use std::sync::Mutex;
use std::time::Duration;

const SECONDS: usize = 60;
/// Upper bounds (ms) of the latency buckets; a last one holds the rest.
const BOUNDS_MS: [u32; 14] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000];

#[derive(Clone, Copy, Default)]
struct Second {
    /// Which Unix second this slot holds.
    at: u64,
    requests: u32,
    errors: u32,
    latency: [u32; BOUNDS_MS.len() + 1],
}

pub struct LastMinute {
    seconds: Mutex<[Second; SECONDS]>,
}

impl Default for LastMinute {
    fn default() -> Self {
        LastMinute { seconds: Mutex::new([Second::default(); SECONDS]) }
    }
}

/// The last minute in three figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub per_second: f64,
    pub errors: u64,
    /// The bound of the bucket holding the 99th percentile, in ms; `None`
    /// without a timed request (long-polls are counted, not timed).
    pub p99_ms: Option<u32>,
}

impl LastMinute {
    /// A request answered at Unix second `now`: an error (5xx, or no
    /// answer) or not, and how long it took when that says something.
    pub fn record(&self, now: u64, error: bool, latency: Option<Duration>) {
        let mut seconds = self.seconds.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let slot = &mut seconds[(now % SECONDS as u64) as usize];
        if slot.at != now {
            *slot = Second { at: now, ..Second::default() };
        }
        slot.requests += 1;
        slot.errors += u32::from(error);
        if let Some(latency) = latency {
            let ms = u32::try_from(latency.as_millis()).unwrap_or(u32::MAX);
            let bucket = BOUNDS_MS.iter().position(|bound| ms <= *bound).unwrap_or(BOUNDS_MS.len());
            slot.latency[bucket] += 1;
        }
    }

    /// The 59 whole seconds before `now` (the current one, still filling,
    /// shares its slot with the one a minute ago).
    pub fn summary(&self, now: u64) -> Summary {
        const WHOLE: u64 = SECONDS as u64 - 1;
        let seconds = self.seconds.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (mut requests, mut errors, mut latency) = (0u64, 0u64, [0u64; BOUNDS_MS.len() + 1]);
        for slot in seconds.iter().filter(|slot| slot.at < now && slot.at + WHOLE >= now) {
            requests += u64::from(slot.requests);
            errors += u64::from(slot.errors);
            for (total, count) in latency.iter_mut().zip(slot.latency) {
                *total += u64::from(count);
            }
        }
        let timed: u64 = latency.iter().sum();
        let p99_ms = (timed > 0).then(|| {
            let rank = (timed * 99).div_ceil(100);
            let mut seen = 0;
            let bucket = latency.iter().position(|count| {
                seen += count;
                seen >= rank
            });
            bucket.and_then(|at| BOUNDS_MS.get(at).copied()).unwrap_or(u32::MAX)
        });
        Summary { per_second: requests as f64 / WHOLE as f64, errors, p99_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minute_of_requests_in_three_figures() {
        let minute = LastMinute::default();
        let start = 1_000_000;
        for second in 0..60 {
            for n in 0..10 {
                let latency = if n == 0 && second % 2 == 0 { 700 } else { 15 };
                minute.record(start + second, n == 9 && second < 6, Some(Duration::from_millis(latency)));
            }
        }
        // A long-poll counted, not timed; and the current second (which
        // takes the slot of the first) left out.
        minute.record(start + 59, false, None);
        minute.record(start + 60, true, Some(Duration::from_secs(40)));
        let summary = minute.summary(start + 60);
        assert!((summary.per_second - 591.0 / 59.0).abs() < 1e-9, "{summary:?}");
        assert_eq!(summary.errors, 5);
        // 29 of 590 took 700 ms (5 %): the p99 is in the 1 s bucket.
        assert_eq!(summary.p99_ms, Some(1_000));
    }

    #[test]
    fn old_seconds_fall_out_and_slots_are_reused() {
        let minute = LastMinute::default();
        minute.record(100, true, Some(Duration::from_millis(3)));
        assert_eq!(minute.summary(101).errors, 1);
        assert_eq!(minute.summary(160).errors, 0, "a minute ago");
        minute.record(160, false, Some(Duration::from_millis(3)));
        let summary = minute.summary(161);
        assert_eq!((summary.errors, summary.p99_ms), (0, Some(5)));
        assert_eq!(LastMinute::default().summary(5).p99_ms, None);
    }
}
