//! Request rate limits: per client address for logins and the client API,
//! per origin server and address (and per address) for federation.
//!
//! Counting uses pingora-limits' sliding-window estimator (a count-min sketch
//! per window): memory stays fixed however many addresses a flood comes
//! from, and counts are lock-free. IPv6 clients are counted per /64, since
//! one host usually owns the whole prefix.

use crate::config::RateConfig;
use pingora_limits::rate::{Rate, RateComponents};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// Sketch size: 4 rows of 16384 counters per window (1 MiB for both windows
/// of one limiter) keeps collisions between honest and flooding clients rare.
const HASHES: usize = 4;
const SLOTS: usize = 16384;

pub struct Limiter {
    pub config: RateConfig,
    rate: Rate,
}

impl Limiter {
    pub fn new(config: RateConfig) -> Limiter {
        Limiter { config, rate: Rate::new_with_estimator_config(config.per.0, HASHES, SLOTS) }
    }

    /// Counts one request for `key`, or returns how long to wait when the
    /// key is over its rate. Refused requests are not counted, so a client
    /// that waits as told gets through.
    pub fn admit(&self, key: &[u8]) -> Result<(), Duration> {
        self.admit_all(&[key])
    }

    /// Counts one request against every key, or none of them when any key
    /// is over its rate (the longest wait is returned).
    pub fn admit_all(&self, keys: &[&[u8]]) -> Result<(), Duration> {
        let wait = self.wait_for(keys);
        if !wait.is_zero() {
            return Err(wait);
        }
        self.observe_all(keys);
        Ok(())
    }

    /// Counts one request against every key without asking (the shared
    /// store already admitted it; this keeps the local fallback warm).
    pub fn observe_all(&self, keys: &[&[u8]]) {
        for key in keys {
            self.rate.observe(key, 1);
        }
    }

    fn wait_for(&self, keys: &[&[u8]]) -> Duration {
        let allowed = f64::from(self.config.requests);
        let wait = keys
            .iter()
            .map(|key| {
                self.rate.rate_with(key, |c: RateComponents| {
                    wait_time(c.prev_samples, c.curr_samples, c.current_interval_fraction, c.interval, allowed)
                })
            })
            .max()
            .unwrap_or_default();
        wait
    }
}

/// How long until the sliding estimate `prev * (1 - fraction) + curr` drops
/// below `allowed`; zero when it already is.
pub fn wait_time(prev: isize, curr: isize, fraction: f64, interval: Duration, allowed: f64) -> Duration {
    let prev = prev.max(0) as f64;
    let curr = curr.max(0) as f64;
    let fraction = fraction.clamp(0.0, 1.0);
    let interval = interval.as_secs_f64();
    let excess = prev * (1.0 - fraction) + curr - (allowed - 1.0);
    if excess <= 0.0 {
        return Duration::ZERO;
    }
    let remaining = (1.0 - fraction) * interval;
    // Within this window the estimate falls as the previous window's weight does.
    if prev > 0.0 && excess / prev * interval <= remaining {
        return Duration::from_secs_f64(excess / prev * interval);
    }
    // Otherwise wait for the window to end and for this window's count to
    // weigh little enough in the next one.
    let next_fraction = if curr > 0.0 { (1.0 - (allowed - 1.0) / curr).clamp(0.0, 1.0) } else { 0.0 };
    Duration::from_secs_f64(remaining + next_fraction * interval)
}

/// `rate_limited_total` by class, resolved once: refusals come in floods.
pub static RATE_LIMITED: once_cell::sync::Lazy<[prometheus::IntCounter; 3]> = once_cell::sync::Lazy::new(|| {
    let metrics = &crate::observe::metrics::METRICS;
    Class::ALL.map(|class| metrics.traffic.rate_limited.with_label_values(&[class.name()]))
});

/// What a request is limited as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `POST /_matrix/client/<version>/login` or `/register`.
    Login,
    Client,
    Federation,
}

impl Class {
    /// In declaration order, so `class as usize` indexes it.
    pub const ALL: [Class; 3] = [Class::Login, Class::Client, Class::Federation];
}

/// The limiters of one configuration; shared with the next configuration
/// when their settings are unchanged, so a reload does not reset counts.
#[derive(Default, Clone)]
pub struct RateLimits {
    pub login: Option<Arc<Limiter>>,
    pub client: Option<Arc<Limiter>>,
    pub federation: Option<Arc<Limiter>>,
}

/// The request facts limits depend on.
pub struct RateFacts<'a> {
    pub is_post: bool,
    /// The request target as received (Synapse matches its paths on the raw bytes).
    pub target: &'a [u8],
    pub client_ip: Option<IpAddr>,
    /// The `Authorization` header: federation is counted by its `X-Matrix` origin.
    pub authorization: Option<&'a [u8]>,
    /// The origin the federation gate verified, if it did.
    pub verified_origin: Option<&'a [u8]>,
}

impl RateLimits {
    pub fn from_config(config: &crate::config::RateLimitsConfig) -> RateLimits {
        let build = |c: &Option<RateConfig>| c.map(|c| Arc::new(Limiter::new(c)));
        RateLimits { login: build(&config.login), client: build(&config.client), federation: build(&config.federation) }
    }

    /// Keeps `old`'s counters for every limiter whose settings did not change.
    pub fn inherit(&mut self, old: &RateLimits) {
        let keep = |new: &mut Option<Arc<Limiter>>, old: &Option<Arc<Limiter>>| {
            if let (Some(n), Some(o)) = (new.as_ref(), old) {
                if n.config == o.config {
                    *new = Some(Arc::clone(o));
                }
            }
        };
        keep(&mut self.login, &old.login);
        keep(&mut self.client, &old.client);
        keep(&mut self.federation, &old.federation);
    }

    pub fn is_empty(&self) -> bool {
        self.login.is_none() && self.client.is_none() && self.federation.is_none()
    }

    /// Counts the request against every limit that applies; `Err` carries
    /// its class and the longest wait among the limits it is over.
    pub fn admit(&self, facts: &RateFacts<'_>) -> Result<(), (Class, Duration)> {
        let mut wait = Duration::ZERO;
        let class = self.each_check(facts, |_, limiter, keys| {
            if let Err(w) = limiter.admit_all(keys) {
                wait = wait.max(w);
            }
        });
        if wait.is_zero() {
            Ok(())
        } else {
            Err((class, wait))
        }
    }

    /// Calls `check` with each limit that applies to the request and the keys
    /// it counts under (the limit's name for shared counters, the limiter,
    /// the keys), and returns the request's class. Counting is the caller's.
    pub fn each_check(
        &self,
        facts: &RateFacts<'_>,
        mut check: impl FnMut(&'static str, &Arc<Limiter>, &[&[u8]]),
    ) -> Class {
        let address = facts.client_ip.map(address_key);
        let address = address.as_ref().map_or(&[][..], |a| a.as_slice());
        let class = classify(facts.is_post, facts.target);
        match class {
            Class::Federation => {
                // The origin a request claims is not verified here, so it is
                // counted together with the address it came from: a forged
                // origin from elsewhere costs the real server nothing. The
                // address alone is counted too, so inventing origins does not
                // multiply one address's budget.
                if let (Some(limiter), Some(verified)) = (&self.federation, facts.verified_origin) {
                    // A verified origin is the server itself, from whichever
                    // address it sends: its budget is its own.
                    let verified = &verified[..verified.len().min(MAX_ORIGIN)];
                    let mut key = [0u8; MAX_ORIGIN + 1];
                    key[0] = b'v';
                    key[1..=verified.len()].copy_from_slice(verified);
                    check("federation", limiter, &[&key[..=verified.len()]]);
                } else if let Some(limiter) = &self.federation {
                    let origin = crate::synapse::sticky::origin(facts.authorization).unwrap_or_default();
                    let origin = &origin[..origin.len().min(MAX_ORIGIN)];
                    let mut pair = [0u8; MAX_ORIGIN + 10];
                    pair[0] = b'o';
                    pair[1..=address.len()].copy_from_slice(address);
                    pair[1 + address.len()] = b'/';
                    let end = 2 + address.len() + origin.len();
                    pair[2 + address.len()..end].copy_from_slice(origin);
                    let mut alone = [0u8; 9];
                    alone[0] = b'a';
                    alone[1..=address.len()].copy_from_slice(address);
                    check("federation", limiter, &[&pair[..end], &alone[..=address.len()]]);
                }
            }
            Class::Login => {
                if let Some(limiter) = &self.login {
                    check("login", limiter, &[address]);
                }
                if let Some(limiter) = &self.client {
                    check("client", limiter, &[address]);
                }
            }
            Class::Client => {
                if let Some(limiter) = &self.client {
                    check("client", limiter, &[address]);
                }
            }
        }
        class
    }
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Login => "login",
            Class::Client => "client",
            Class::Federation => "federation",
        }
    }
}

/// Longest origin counted: a server name is at most 255 bytes.
const MAX_ORIGIN: usize = 255;

pub fn classify(is_post: bool, target: &[u8]) -> Class {
    let path = crate::request::admission::path_of(target);
    if path.starts_with(b"/_matrix/federation/") || path.starts_with(b"/_matrix/key/") {
        return Class::Federation;
    }
    if is_post {
        if let Some(rest) = path.strip_prefix(b"/_matrix/client/") {
            // `<version>/login` or `<version>/register`, where the version is
            // one segment (`v3`, `r0`, `unstable`) or `api/v1`.
            let rest = rest.strip_prefix(b"api/").unwrap_or(rest);
            if let Some(slash) = rest.iter().position(|&b| b == b'/') {
                let endpoint = &rest[slash + 1..];
                if endpoint == b"login" || endpoint == b"register" {
                    return Class::Login;
                }
            }
        }
    }
    Class::Client
}

/// The bytes an address is counted under: IPv4 whole, IPv6 by its /64.
fn address_key(ip: IpAddr) -> AddressKey {
    match ip.to_canonical() {
        IpAddr::V4(v4) => AddressKey { bytes: [0; 8], len: 4 }.with(&v4.octets()),
        IpAddr::V6(v6) => AddressKey { bytes: [0; 8], len: 8 }.with(&v6.octets()[..8]),
    }
}

struct AddressKey {
    bytes: [u8; 8],
    len: usize,
}

impl AddressKey {
    fn with(mut self, octets: &[u8]) -> AddressKey {
        self.bytes[..self.len].copy_from_slice(&octets[..self.len]);
        self
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::values::Span;

    #[test]
    fn classes_index_their_list() {
        for (at, class) in Class::ALL.into_iter().enumerate() {
            assert_eq!(class as usize, at);
        }
    }

    fn limiter(requests: u32, per: Duration) -> Arc<Limiter> {
        Arc::new(Limiter::new(RateConfig { requests, per: Span(per) }))
    }

    fn facts<'a>(is_post: bool, target: &'a [u8], ip: &str, authorization: Option<&'a [u8]>) -> RateFacts<'a> {
        RateFacts { is_post, target, client_ip: Some(ip.parse().unwrap()), authorization, verified_origin: None }
    }

    #[test]
    fn classes_follow_synapse_paths() {
        assert_eq!(classify(true, b"/_matrix/client/v3/login"), Class::Login);
        assert_eq!(classify(true, b"/_matrix/client/r0/register?kind=user"), Class::Login);
        assert_eq!(classify(true, b"/_matrix/client/api/v1/login"), Class::Login);
        assert_eq!(classify(false, b"/_matrix/client/v3/login"), Class::Client);
        assert_eq!(classify(true, b"/_matrix/client/v3/register/available"), Class::Client);
        assert_eq!(classify(true, b"/_matrix/client/v3/login/get_token"), Class::Client);
        assert_eq!(classify(true, b"/_matrix/federation/v1/send/1"), Class::Federation);
        assert_eq!(classify(false, b"/_matrix/key/v2/server"), Class::Federation);
        assert_eq!(classify(false, b"/_matrix/media/v3/download/a/b"), Class::Client);
    }

    #[test]
    fn login_limit_is_per_address_and_ipv6_per_prefix() {
        let limits = RateLimits { login: Some(limiter(3, Duration::from_secs(60))), ..Default::default() };
        let login = b"/_matrix/client/v3/login";
        for _ in 0..3 {
            assert!(limits.admit(&facts(true, login, "192.0.2.1", None)).is_ok());
        }
        let (class, wait) = limits.admit(&facts(true, login, "192.0.2.1", None)).unwrap_err();
        assert_eq!(class, Class::Login);
        assert!(wait > Duration::from_secs(1) && wait <= Duration::from_secs(120), "{wait:?}");
        assert!(limits.admit(&facts(true, login, "192.0.2.2", None)).is_ok());
        assert!(limits.admit(&facts(false, b"/_matrix/client/v3/sync", "192.0.2.1", None)).is_ok());
        for _ in 0..3 {
            assert!(limits.admit(&facts(true, login, "2001:db8:1:2::1", None)).is_ok());
        }
        assert!(limits.admit(&facts(true, login, "2001:db8:1:2::ffff", None)).is_err());
        assert!(limits.admit(&facts(true, login, "2001:db8:1:3::1", None)).is_ok());
    }

    #[test]
    fn federation_is_counted_per_origin_and_address_and_per_address() {
        let limits = RateLimits { federation: Some(limiter(2, Duration::from_secs(60))), ..Default::default() };
        let send = b"/_matrix/federation/v1/send/1";
        let real = Some(&b"X-Matrix origin=a.example,key=k,sig=s"[..]);
        // Someone claiming a.example from elsewhere spends only their own budget...
        assert!(limits.admit(&facts(true, send, "203.0.113.9", real)).is_ok());
        assert!(limits.admit(&facts(true, send, "203.0.113.9", real)).is_ok());
        assert!(limits.admit(&facts(true, send, "203.0.113.9", real)).is_err());
        // ... while the real a.example, from its own address, keeps its whole budget.
        assert!(limits.admit(&facts(true, send, "192.0.2.1", real)).is_ok());
        assert!(limits.admit(&facts(true, send, "192.0.2.1", real)).is_ok());
        assert!(limits.admit(&facts(true, send, "192.0.2.1", real)).is_err());
        // Inventing origins from one address does not escape the address's budget.
        let invented = |n: u32| format!("X-Matrix origin=fake{n}.example");
        let (one, two, three) = (invented(1), invented(2), invented(3));
        assert!(limits.admit(&facts(true, send, "198.51.100.7", Some(one.as_bytes()))).is_ok());
        assert!(limits.admit(&facts(true, send, "198.51.100.7", Some(two.as_bytes()))).is_ok());
        assert!(limits.admit(&facts(true, send, "198.51.100.7", Some(three.as_bytes()))).is_err());
        // A refused request counts nowhere: another origin from the real address is fine.
        let b = Some(&b"X-Matrix origin=b.example"[..]);
        assert!(limits.admit(&facts(true, send, "192.0.2.9", b)).is_ok());
    }

    #[test]
    fn wait_covers_the_sliding_window() {
        let at = |prev, curr, fraction| wait_time(prev, curr, fraction, Duration::from_secs(60), 10.0);
        assert_eq!(at(0, 9, 0.5), Duration::ZERO);
        // A full window just began: wait for it to end and to weigh 9/10 in the next.
        let wait = at(0, 10, 0.0);
        assert!(wait > Duration::from_millis(65_900) && wait < Duration::from_millis(66_100), "{wait:?}");
        // Previous window full, halfway through: the estimate is 5, fine.
        assert_eq!(at(10, 0, 0.5), Duration::ZERO);
        // Previous window full, start of this one: wait one tenth of it.
        assert_eq!(at(10, 0, 0.0), Duration::from_secs(6));
    }

    #[test]
    fn reload_keeps_counts_of_unchanged_limits() {
        let old = RateLimits { login: Some(limiter(1, Duration::from_secs(60))), ..Default::default() };
        assert!(old.login.as_ref().unwrap().admit(b"k").is_ok());
        let mut same = RateLimits { login: Some(limiter(1, Duration::from_secs(60))), ..Default::default() };
        same.inherit(&old);
        assert!(same.login.as_ref().unwrap().admit(b"k").is_err());
        let mut changed = RateLimits { login: Some(limiter(2, Duration::from_secs(60))), ..Default::default() };
        changed.inherit(&old);
        assert!(changed.login.as_ref().unwrap().admit(b"k").is_ok());
    }
}
