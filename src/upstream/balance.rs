//! A pool's balancing policy, checked: how many requests a member takes at
//! once, where the rest wait, when a failing member is ejected and how a
//! returning one ramps up. Built from `BalancingConfig` with its defaults.

use crate::config::balancing::BalancingConfig;
use std::time::Duration;

/// How a pool without a sticky key chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The member with the fewest requests in flight for its weight (a
    /// stalled member's stuck requests make it the busy one, so nothing
    /// else goes there).
    LeastOutstanding,
    RoundRobin,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Balancing {
    pub choice: Choice,
    /// Requests in flight per member, long-polls and WebSockets apart.
    pub max_in_flight: Option<u32>,
    /// Requests that may wait for a slot (0: refused at once when all are full).
    pub queue_size: u32,
    pub queue_timeout: Duration,
    /// Consecutive failures that eject a member (0: never).
    pub eject_after: u32,
    pub eject_for: Duration,
    pub slow_start: Duration,
    /// Longest wait for a response header; `None`: the upstream's read timeout.
    pub response_timeout: Option<Duration>,
    pub long_poll_margin: Duration,
    /// Zero: no stall detection.
    pub stall_after: Duration,
}

impl Default for Balancing {
    fn default() -> Self {
        Balancing {
            choice: Choice::LeastOutstanding,
            max_in_flight: None,
            queue_size: 0,
            queue_timeout: Duration::ZERO,
            eject_after: 3,
            eject_for: Duration::from_secs(10),
            slow_start: Duration::from_secs(10),
            response_timeout: None,
            long_poll_margin: Duration::from_secs(30),
            stall_after: Duration::from_secs(2),
        }
    }
}

/// A refused setting: the key under the `balancing` section, and why.
pub type SettingError = (&'static str, String);

impl Balancing {
    pub fn from_config(config: &BalancingConfig, choice: Choice) -> Result<Balancing, SettingError> {
        let defaults = Balancing::default();
        if config.max_in_flight == Some(0) {
            return Err(("max_in_flight", "must be at least 1 (leave it out for no cap)".into()));
        }
        let (queue_size, queue_timeout) = match &config.queue {
            None => (0, Duration::ZERO),
            Some(_) if config.max_in_flight.is_none() => {
                return Err(("queue", "a queue needs max_in_flight: without a cap nothing ever waits".into()))
            }
            Some(queue) if queue.size == 0 => {
                return Err(("queue", "size must be at least 1 (leave the queue out to refuse at once)".into()))
            }
            Some(queue) if queue.timeout.0.is_zero() => return Err(("queue", "timeout must be longer than 0s".into())),
            Some(queue) => (queue.size, queue.timeout.0),
        };
        let (eject_after, eject_for) = match &config.eject {
            None => (defaults.eject_after, defaults.eject_for),
            Some(eject) if eject.after > 0 && eject.duration.0.is_zero() => {
                return Err(("eject", "`for` must be longer than 0s (or set `after: 0` never to eject)".into()))
            }
            Some(eject) => (eject.after, eject.duration.0),
        };
        if config.response_timeout.is_some_and(|t| t.0.is_zero()) {
            return Err(("response_timeout", "must be longer than 0s (leave it out for timeouts.read)".into()));
        }
        Ok(Balancing {
            choice,
            max_in_flight: config.max_in_flight,
            queue_size,
            queue_timeout,
            eject_after,
            eject_for,
            slow_start: config.slow_start.map_or(defaults.slow_start, |s| s.0),
            response_timeout: config.response_timeout.map(|t| t.0),
            long_poll_margin: config.long_poll_margin.map_or(defaults.long_poll_margin, |m| m.0),
            stall_after: config.stall_after.map_or(defaults.stall_after, |s| s.0),
        })
    }

    /// How long the `ejections`-th ejection in a row lasts: doubling, at most 16 times the first.
    pub fn ejection_length(&self, ejections: u32) -> Duration {
        self.eject_for * (1u32 << ejections.min(4))
    }

    /// One line for `routes`/`route`: what this pool does.
    pub fn describe(&self) -> String {
        let mut parts = vec![match self.choice {
            Choice::LeastOutstanding => "least outstanding".to_string(),
            Choice::RoundRobin => "round robin".to_string(),
        }];
        match self.max_in_flight {
            Some(cap) if self.queue_size > 0 => parts.push(format!(
                "at most {cap} in flight per member, {} waiting up to {}",
                self.queue_size,
                humantime::format_duration(self.queue_timeout)
            )),
            Some(cap) => parts.push(format!("at most {cap} in flight per member, no queue")),
            None => parts.push("no cap".to_string()),
        }
        if self.eject_after > 0 {
            parts.push(format!(
                "ejected after {} failures for {}",
                self.eject_after,
                humantime::format_duration(self.eject_for)
            ));
        }
        if !self.slow_start.is_zero() {
            parts.push(format!("slow start {}", humantime::format_duration(self.slow_start)));
        }
        if !self.stall_after.is_zero() {
            parts.push(format!("stall checked after {}", humantime::format_duration(self.stall_after)));
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::balancing::{EjectConfig, QueueConfig};
    use crate::config::values::Span;

    #[test]
    fn defaults_cap_nothing_and_eject_after_three() {
        let b = Balancing::from_config(&BalancingConfig::default(), Choice::LeastOutstanding).unwrap();
        assert_eq!(b, Balancing::default());
        assert_eq!(b.ejection_length(0), Duration::from_secs(10));
        assert_eq!(b.ejection_length(9), Duration::from_secs(160));
    }

    #[test]
    fn meaningless_settings_are_refused_by_key() {
        let queue = Some(QueueConfig { size: 8, timeout: Span(Duration::from_secs(1)) });
        let cases = [
            (BalancingConfig { max_in_flight: Some(0), ..Default::default() }, "max_in_flight"),
            (BalancingConfig { queue: queue.clone(), ..Default::default() }, "queue"),
            (
                BalancingConfig {
                    max_in_flight: Some(2),
                    queue: Some(QueueConfig { size: 0, timeout: Span(Duration::from_secs(1)) }),
                    ..Default::default()
                },
                "queue",
            ),
            (
                BalancingConfig {
                    eject: Some(EjectConfig { after: 2, duration: Span(Duration::ZERO) }),
                    ..Default::default()
                },
                "eject",
            ),
            (
                BalancingConfig { response_timeout: Some(Span(Duration::ZERO)), ..Default::default() },
                "response_timeout",
            ),
        ];
        for (config, key) in cases {
            assert_eq!(Balancing::from_config(&config, Choice::RoundRobin).unwrap_err().0, key, "{config:?}");
        }
        let capped = BalancingConfig { max_in_flight: Some(2), queue, ..Default::default() };
        let b = Balancing::from_config(&capped, Choice::RoundRobin).unwrap();
        assert_eq!((b.max_in_flight, b.queue_size, b.queue_timeout), (Some(2), 8, Duration::from_secs(1)));
    }
}
