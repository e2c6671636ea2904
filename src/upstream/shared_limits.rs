//! Rate-limit counters in Redis, so several edges behind one balancer share
//! one budget per client instead of each allowing the full rate.
//!
//! The same sliding-window estimate as the local limiter (two fixed windows
//! weighted by how far the current one has run), counted by a Lua script so
//! a check and its increment are one atomic step for every edge. When Redis
//! does not answer within the timeout, the edge counts on its own (fail
//! open, logged, counted in `matrix_edge_rate_limit_fallbacks_total`) and
//! leaves Redis alone for a second before trying again, so an outage costs
//! at most one timeout per second, not one per request.

use crate::config::{RateConfig, SharedLimitsConfig};
use crate::observe::metrics::METRICS;
use crate::request::ratelimit::{Class, Limiter, RateFacts, RateLimits};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// KEYS: pairs (current window, previous window) per counted key.
/// ARGV: allowed requests, window length (ms), time into the current window (ms).
/// Returns {admitted (0/1), previous count, current count} of the fullest key.
const SLIDING_WINDOW: &str = r"
local allowed = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local elapsed = tonumber(ARGV[3])
local worst, worst_prev, worst_curr = -1, 0, 0
for i = 1, #KEYS, 2 do
  local curr = tonumber(redis.call('GET', KEYS[i]) or '0')
  local prev = tonumber(redis.call('GET', KEYS[i + 1]) or '0')
  local estimate = prev * (interval - elapsed) / interval + curr
  if estimate > worst then
    worst, worst_prev, worst_curr = estimate, prev, curr
  end
end
if worst > allowed - 1 then
  return {0, worst_prev, worst_curr}
end
for i = 1, #KEYS, 2 do
  redis.call('INCR', KEYS[i])
  redis.call('PEXPIRE', KEYS[i], interval * 2)
end
return {1, worst_prev, worst_curr}
";

/// How long Redis is left alone after it failed.
const BACK_OFF: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Redis(String),
    #[error("Redis was unreachable moments ago; counting locally")]
    BackingOff,
}

pub struct SharedCounters {
    pub config: SharedLimitsConfig,
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    /// Milliseconds since the epoch before which Redis is not tried.
    resting_until: AtomicU64,
    script: redis::Script,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A Redis URL as it may be shown: a password in it (`redis://:secret@host`) left out.
fn without_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_string(),
    }
}

impl SharedCounters {
    /// Checks the URL; connects on first use, never here (so `check` and
    /// reloads do no network IO).
    pub fn new(config: &SharedLimitsConfig) -> Result<SharedCounters, crate::config::values::InvalidValue> {
        use crate::config::values::InvalidValue;
        let client = redis::Client::open(config.redis.as_str()).map_err(|e| InvalidValue {
            what: "Redis URL",
            text: without_password(&config.redis),
            expected: e.to_string(),
        })?;
        if config.timeout.0.is_zero() || config.timeout.0 > Duration::from_secs(5) {
            return Err(InvalidValue {
                what: "timeout",
                text: format!("{:?}", config.timeout.0),
                expected: "it must be between 1ms and 5s".into(),
            });
        }
        Ok(SharedCounters {
            config: config.clone(),
            client,
            connection: tokio::sync::Mutex::new(None),
            resting_until: AtomicU64::new(0),
            script: redis::Script::new(SLIDING_WINDOW),
        })
    }

    /// Counts one request under `keys` of the limit `name` in Redis:
    /// `Ok(Ok(()))` admitted, `Ok(Err(wait))` over the rate, `Err` when
    /// Redis could not decide (the caller counts locally then).
    pub async fn admit(
        &self,
        name: &str,
        rate: RateConfig,
        keys: &[&[u8]],
    ) -> Result<Result<(), Duration>, SharedError> {
        if now_ms() < self.resting_until.load(Ordering::Relaxed) {
            return Err(SharedError::BackingOff);
        }
        let timeout = self.config.timeout.0;
        let outcome = tokio::time::timeout(timeout, self.ask(name, rate, keys)).await;
        let result = match outcome {
            Ok(result) => result,
            Err(_) => Err(SharedError::Timeout(timeout)),
        };
        if result.is_err() {
            self.resting_until.store(now_ms() + BACK_OFF.as_millis() as u64, Ordering::Relaxed);
            // A broken connection is replaced at the next attempt.
            if let Ok(mut connection) = self.connection.try_lock() {
                *connection = None;
            }
        }
        result
    }

    async fn ask(&self, name: &str, rate: RateConfig, keys: &[&[u8]]) -> Result<Result<(), Duration>, SharedError> {
        let interval_ms = (rate.per.0.as_millis() as u64).max(1);
        let now = now_ms();
        let window = now / interval_ms;
        let elapsed = now % interval_ms;
        let mut invocation = self.script.prepare_invoke();
        for key in keys {
            let base = key_name(&self.config.prefix, name, key);
            invocation.key(format!("{base}:{window}"));
            invocation.key(format!("{base}:{}", window.wrapping_sub(1)));
        }
        invocation.arg(rate.requests).arg(interval_ms).arg(elapsed);
        let mut connection = self.connection().await?;
        let (admitted, prev, curr): (i64, i64, i64) =
            invocation.invoke_async(&mut connection).await.map_err(|e| SharedError::Redis(e.to_string()))?;
        if admitted == 1 {
            return Ok(Ok(()));
        }
        let fraction = elapsed as f64 / interval_ms as f64;
        let wait = crate::request::ratelimit::wait_time(
            prev as isize,
            curr as isize,
            fraction,
            rate.per.0,
            f64::from(rate.requests),
        );
        Ok(Err(wait.max(Duration::from_millis(1))))
    }

    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection, SharedError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let connection =
            self.client.get_multiplexed_async_connection().await.map_err(|e| SharedError::Redis(e.to_string()))?;
        *slot = Some(connection.clone());
        Ok(connection)
    }
}

/// One limit to count: its name, its limiter, its keys.
type OwnedCheck = (&'static str, Arc<Limiter>, Vec<Vec<u8>>);

/// The request's limits counted in Redis, each falling back to this edge's
/// own counters when Redis cannot decide. Local counters count admitted
/// requests too, so a fallback starts from this edge's share, not from zero.
pub async fn admit_shared(
    limits: &RateLimits,
    shared: &SharedCounters,
    facts: &RateFacts<'_>,
) -> Result<(), (Class, Duration)> {
    let mut checks: Vec<OwnedCheck> = Vec::new();
    let class = limits.each_check(facts, |name, limiter, keys| {
        checks.push((name, Arc::clone(limiter), keys.iter().map(|k| k.to_vec()).collect()));
    });
    let mut wait = Duration::ZERO;
    for (name, limiter, keys) in &checks {
        let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        match shared.admit(name, limiter.config, &keys).await {
            Ok(Ok(())) => limiter.observe_all(&keys),
            Ok(Err(w)) => wait = wait.max(w),
            Err(error) => {
                METRICS.operations.rate_limit_fallbacks.inc();
                if !matches!(error, SharedError::BackingOff) {
                    log::warn!("shared rate limits: {error}; counting on this edge alone for now");
                }
                if let Err(w) = limiter.admit_all(&keys) {
                    wait = wait.max(w);
                }
            }
        }
    }
    if wait.is_zero() {
        Ok(())
    } else {
        Err((class, wait))
    }
}

/// `prefix:limit:hex(key)`: readable in `redis-cli --scan`, and binary keys
/// (addresses, origins) cannot collide with the separators.
fn key_name(prefix: &str, name: &str, key: &[u8]) -> String {
    let mut text = String::with_capacity(prefix.len() + name.len() + 2 + key.len() * 2);
    text.push_str(prefix);
    text.push(':');
    text.push_str(name);
    text.push(':');
    for byte in key {
        text.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
        text.push(char::from(b"0123456789abcdef"[usize::from(byte & 15)]));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::values::Span;

    #[test]
    fn keys_are_prefixed_and_binary_safe() {
        assert_eq!(key_name("matrix-edge", "login", &[127, 0, 0, 1]), "matrix-edge:login:7f000001");
        assert_eq!(key_name("p", "federation", b"o\x0a:/x"), "p:federation:6f0a3a2f78");
    }

    #[test]
    fn bad_settings_are_refused_without_connecting() {
        let config = |redis: &str, timeout| SharedLimitsConfig {
            redis: redis.into(),
            prefix: "p".into(),
            timeout: Span(Duration::from_millis(timeout)),
        };
        assert!(SharedCounters::new(&config("redis://127.0.0.1:1/0", 50)).is_ok());
        assert!(SharedCounters::new(&config("http://nope", 50)).is_err());
        assert!(SharedCounters::new(&config("redis://127.0.0.1:1/0", 0)).is_err());
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_reported_then_left_alone() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = SharedLimitsConfig {
            redis: format!("redis://127.0.0.1:{port}/0"),
            prefix: "p".into(),
            timeout: Span(Duration::from_millis(200)),
        };
        let counters = SharedCounters::new(&config).unwrap();
        let rate = RateConfig { requests: 5, per: Span(Duration::from_secs(60)) };
        assert!(matches!(counters.admit("login", rate, &[b"k"]).await, Err(SharedError::Redis(_))));
        assert!(matches!(counters.admit("login", rate, &[b"k"]).await, Err(SharedError::BackingOff)));
    }
}
