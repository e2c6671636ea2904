//! Requests Synapse holds open until something happens or their `timeout`
//! (milliseconds, in the query) runs out: `/sync`, sliding sync and the
//! legacy `/events`. Balancing counts them apart from requests in flight (a
//! synchrotron holds thousands of idle ones), and they may wait their own
//! timeout for an answer.

use std::time::Duration;

/// Longest `timeout` honoured: Synapse clamps nothing, so a client could ask
/// for a day; past this the upstream's read timeout decides.
const LONGEST: Duration = Duration::from_secs(3600);

/// The `timeout` a long-poll asked for, or `None` when the request is not a
/// long-poll (another path, or `timeout` absent or 0: an immediate answer).
pub fn long_poll_timeout(target: &[u8]) -> Option<Duration> {
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(at) => (&target[..at], &target[at + 1..]),
        None => return None,
    };
    if !is_long_poll_path(path) {
        return None;
    }
    let millis = query.split(|&b| b == b'&').find_map(|pair| pair.strip_prefix(b"timeout="))?;
    if millis.is_empty() || millis.len() > 12 || !millis.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let millis = millis.iter().fold(0u64, |n, &digit| n * 10 + u64::from(digit - b'0'));
    (millis > 0).then(|| Duration::from_millis(millis).min(LONGEST))
}

fn is_long_poll_path(path: &[u8]) -> bool {
    let Some(rest) = path.strip_prefix(b"/_matrix/client/") else { return false };
    // `v3/sync`, `r0/sync`, `unstable/org.matrix.simplified_msc3575/sync`, …
    // and the legacy `v3/events`; never `rooms/{id}/events` or `rooms/{id}/messages`.
    let Some(version_end) = rest.iter().position(|&b| b == b'/') else { return false };
    let (version, endpoint) = (&rest[..version_end], &rest[version_end + 1..]);
    match version {
        b"v3" | b"r0" => endpoint == b"sync" || endpoint == b"events",
        b"unstable" => endpoint.ends_with(b"/sync") && endpoint.iter().filter(|&&b| b == b'/').count() == 1,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncs_with_a_timeout_are_long_polls() {
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(long_poll_timeout(b"/_matrix/client/v3/sync?since=s1&timeout=30000"), ms(30000));
        assert_eq!(long_poll_timeout(b"/_matrix/client/r0/sync?timeout=5"), ms(5));
        assert_eq!(long_poll_timeout(b"/_matrix/client/v3/events?from=x&timeout=20000"), ms(20000));
        assert_eq!(
            long_poll_timeout(b"/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?pos=1&timeout=10000"),
            ms(10000)
        );
        assert_eq!(long_poll_timeout(b"/_matrix/client/v3/sync?timeout=999999999"), Some(LONGEST));
    }

    #[test]
    fn immediate_answers_and_other_paths_are_not() {
        for target in [
            &b"/_matrix/client/v3/sync"[..],
            b"/_matrix/client/v3/sync?since=s1",
            b"/_matrix/client/v3/sync?timeout=0",
            b"/_matrix/client/v3/sync?timeout=",
            b"/_matrix/client/v3/sync?timeout=-1",
            b"/_matrix/client/v3/sync?xtimeout=100",
            b"/_matrix/client/v3/rooms/!r:x/messages?timeout=100",
            b"/_matrix/client/v3/rooms/!r:x/events?timeout=100",
            b"/_matrix/client/unstable/a/b/sync?timeout=100",
            b"/_matrix/federation/v1/sync?timeout=100",
        ] {
            assert_eq!(long_poll_timeout(target), None, "{}", String::from_utf8_lossy(target));
        }
    }
}
