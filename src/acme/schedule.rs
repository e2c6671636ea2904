//! When to renew and when to try again: pure functions of times and a
//! random draw, so the policy is tested without a clock or a CA.

use std::time::Duration;

/// A renewal window suggested by the CA (RFC 9773 ARI), in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: i64,
    pub end: i64,
}

/// When a certificate valid from `not_before` to `not_after` should be
/// renewed. Inside the CA's window when it offers one (a uniformly random
/// point, as RFC 9773 asks, so a fleet does not renew at one instant);
/// otherwise at two thirds of the lifetime, which for Let's Encrypt's
/// 90 days leaves 30 and for its 45-day certificates 15.
/// `random` is uniform in [0, 1).
pub fn renew_at(not_before: i64, not_after: i64, window: Option<Window>, random: f64) -> i64 {
    if let Some(window) = window.filter(|w| w.end >= w.start) {
        let span = (window.end - window.start) as f64;
        return window.start + (span * random.clamp(0.0, 1.0)) as i64;
    }
    let lifetime = (not_after - not_before).max(0);
    not_before + lifetime * 2 / 3
}

/// How long to wait after the `failures`-th failed order in a row: 10
/// minutes doubling to 12 hours, ±20 % jitter. Let's Encrypt allows 5
/// failed validations per name per hour; this makes at most 4 in the first
/// hour and fewer after.
pub fn retry_after(failures: u32, random: f64) -> Duration {
    let base = 600u64.saturating_mul(1u64 << failures.saturating_sub(1).min(16));
    let capped = base.min(12 * 3600) as f64;
    let jitter = 0.8 + 0.4 * random.clamp(0.0, 1.0);
    Duration::from_secs((capped * jitter) as u64)
}

/// A uniform draw in [0, 1) without a dependency: the standard library's
/// randomly keyed hasher over the current time.
pub fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    #[test]
    fn without_a_window_renewal_comes_at_two_thirds() {
        assert_eq!(renew_at(0, 90 * DAY, None, 0.5), 60 * DAY);
        assert_eq!(renew_at(1_000, 1_000 + 45 * DAY, None, 0.0), 1_000 + 30 * DAY);
        // A certificate that is already invalid is due at once, not in the future.
        assert_eq!(renew_at(100, 50, None, 0.3), 100);
    }

    #[test]
    fn the_ca_window_wins_and_is_sampled_inside() {
        let window = Window { start: 10 * DAY, end: 12 * DAY };
        assert_eq!(renew_at(0, 90 * DAY, Some(window), 0.0), 10 * DAY);
        assert_eq!(renew_at(0, 90 * DAY, Some(window), 0.5), 11 * DAY);
        let late = renew_at(0, 90 * DAY, Some(window), 0.999_999);
        assert!(late < 12 * DAY && late > 11 * DAY);
        // A window that ends before it starts is ignored.
        let broken = Window { start: 12 * DAY, end: 10 * DAY };
        assert_eq!(renew_at(0, 90 * DAY, Some(broken), 0.5), 60 * DAY);
    }

    #[test]
    fn retries_back_off_within_the_rate_limit() {
        let low = |n| retry_after(n, 0.0).as_secs();
        let high = |n| retry_after(n, 0.999).as_secs();
        assert_eq!(low(1), 480);
        assert!(high(1) < 720);
        assert_eq!(low(2), 960);
        assert_eq!(low(30), 12 * 3600 * 8 / 10);
        // The first failure and four waits at the shortest jitter span more
        // than an hour: at most 4 failed attempts in any first hour.
        let four_waits: u64 = (1..=4).map(low).sum();
        assert!(four_waits >= 3600, "{four_waits}");
    }

    #[test]
    fn random_draws_are_in_range_and_vary() {
        let draws: Vec<f64> = (0..32).map(|_| random_unit()).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        assert!(draws.windows(2).any(|w| w[0] != w[1]));
    }
}
