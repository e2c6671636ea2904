//! The gate's verdict counters, resolved once instead of by label lookup on
//! every federation request (a lookup hashes the labels and takes the
//! vector's lock, which every request thread would share), and all created
//! at 0 when the gate is built so dashboards see every series.

use crate::federation::gate::Refusal;
use crate::federation::keys::FETCH_RESULTS;
use crate::observe::metrics::METRICS;
use once_cell::sync::Lazy;
use prometheus::IntCounter;

/// Why a request passed unverified: a body canonical JSON cannot reproduce
/// (`NotCanonical`'s reasons, a lone surrogate), or keys still being
/// fetched while observing.
pub const UNVERIFIABLE_REASONS: [&str; 4] = ["float", "large_integer", "lone_surrogate", "keys_pending"];

struct Counters {
    verified: IntCounter,
    refused: Vec<IntCounter>,
    unverifiable: Vec<IntCounter>,
}

static COUNTERS: Lazy<Counters> = Lazy::new(|| {
    let requests = &METRICS.federation.requests;
    let by_reason = |outcome: &str, reasons: &[&str]| -> Vec<IntCounter> {
        reasons.iter().map(|reason| requests.with_label_values(&[outcome, reason])).collect()
    };
    Counters {
        verified: requests.with_label_values(&["verified", ""]),
        refused: by_reason("refused", &Refusal::REASONS),
        unverifiable: by_reason("unverifiable", &UNVERIFIABLE_REASONS),
    }
});

/// Creates every series of the gate's two counters at 0.
pub fn create_all() {
    Lazy::force(&COUNTERS);
    for result in FETCH_RESULTS {
        METRICS.federation.key_fetches.with_label_values(&[result]);
    }
}

pub fn verified() {
    COUNTERS.verified.inc();
}

pub fn refused(reason: &str) {
    count(&COUNTERS.refused, &Refusal::REASONS, "refused", reason);
}

pub fn unverifiable(reason: &str) {
    count(&COUNTERS.unverifiable, &UNVERIFIABLE_REASONS, "unverifiable", reason);
}

fn count(counters: &[IntCounter], reasons: &[&str], outcome: &str, reason: &str) {
    match reasons.iter().position(|known| *known == reason).and_then(|index| counters.get(index)) {
        Some(counter) => counter.inc(),
        // A reason missing from the lists above is still counted, by lookup.
        None => METRICS.federation.requests.with_label_values(&[outcome, reason]).inc(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::canonical::NotCanonical;

    #[test]
    fn every_reason_the_gate_gives_has_its_counter() {
        for not_canonical in [NotCanonical::Float, NotCanonical::LargeInteger] {
            assert!(UNVERIFIABLE_REASONS.contains(&not_canonical.reason()));
        }
        let at = Refusal::REASONS.iter().position(|reason| *reason == "weak_key").unwrap();
        let before = COUNTERS.refused[at].get();
        refused("weak_key");
        assert_eq!(COUNTERS.refused[at].get(), before + 1);
    }
}
