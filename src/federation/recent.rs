//! The gate's latest refusals, for the status page an admin opens while
//! federation misbehaves: which servers were turned away, when and why.
//! Counters say how many; this says who. Kept across reloads, lost on
//! restart, and bounded: only the newest [`KEPT`] stay. Under a flood it is
//! a sample: a refusal that finds the list busy is not noted.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// How many refusals the page lists.
pub const KEPT: usize = 20;

/// A peer writes these strings; the page shows no more of them than this.
const MAX_TEXT: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Unix seconds.
    pub at: i64,
    /// The origin the request claimed, when its header named one.
    pub origin: Option<String>,
    /// The metric's `reason` label.
    pub reason: &'static str,
    /// What was wrong, as the refusal's answer says it.
    pub detail: String,
    /// Answered 401 (enforce) rather than forwarded (observe).
    pub enforced: bool,
}

/// The list, held by the runtime (`runtime::Runtime`).
#[derive(Debug, Default)]
pub struct RecentRefusals {
    list: Mutex<VecDeque<Refused>>,
}

fn clipped(text: &str) -> String {
    match text.char_indices().nth(MAX_TEXT) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

impl RecentRefusals {
    /// Notes a refusal; the oldest one goes when [`KEPT`] are already noted.
    pub fn note(&self, origin: Option<&str>, reason: &'static str, detail: &str, enforced: bool) {
        let at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let refused = Refused { at, origin: origin.map(clipped), reason, detail: clipped(detail), enforced };
        // A refusal never waits for the list: when another thread holds it (a
        // flood of refusals), this one is left out and the list is a sample. A
        // poisoned lock only means a panic elsewhere mid-push; the list is whole.
        let mut recent = match self.list.try_lock() {
            Ok(recent) => recent,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        if recent.len() == KEPT {
            recent.pop_front();
        }
        recent.push_back(refused);
    }

    /// The noted refusals, newest first.
    pub fn latest(&self) -> Vec<Refused> {
        let recent = self.list.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        recent.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_and_clips_what_a_peer_wrote() {
        let long = "x".repeat(5000);
        let recent = RecentRefusals::default();
        for n in 0..KEPT + 5 {
            recent.note(Some(&format!("s{n}.example")), "bad_signature", &long, n % 2 == 0);
        }
        let latest = recent.latest();
        assert_eq!(latest.len(), KEPT);
        assert_eq!(latest[0].origin.as_deref(), Some(format!("s{}.example", KEPT + 4).as_str()));
        assert_eq!(latest[KEPT - 1].origin.as_deref(), Some("s5.example"));
        assert!(latest.iter().all(|r| r.detail.chars().count() == MAX_TEXT + 1));
    }
}
