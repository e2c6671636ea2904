//! `synapse.balancing` (with `groups:` overrides) and a named upstream's
//! `balancing`: how requests are spread over a pool's members, capped,
//! queued, and kept away from a member that fails or stalls. Every field is
//! optional; an override replaces only the fields it gives.

use crate::config::values::Span;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancingConfig {
    /// Requests in flight per member (long-polls and WebSockets apart);
    /// absent: no cap.
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    /// Where requests wait when every member is at its cap.
    #[serde(default)]
    pub queue: Option<QueueConfig>,
    /// Passive ejection after consecutive failures.
    #[serde(default)]
    pub eject: Option<EjectConfig>,
    /// How long a returning member takes to reach its full share; `0s`: at once.
    #[serde(default)]
    pub slow_start: Option<Span>,
    /// Longest wait for a response header (a long-poll waits its own
    /// `timeout` plus `long_poll_margin` instead); absent: `timeouts.read`.
    #[serde(default)]
    pub response_timeout: Option<Span>,
    #[serde(default)]
    pub long_poll_margin: Option<Span>,
    /// A member with requests outstanding that has answered nothing for
    /// this long is checked at once, and ejected if its check fails.
    #[serde(default)]
    pub stall_after: Option<Span>,
    /// Per-group overrides (`synapse.balancing` only), by group name.
    #[serde(default)]
    pub groups: BTreeMap<String, BalancingConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub size: u32,
    pub timeout: Span,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EjectConfig {
    /// Consecutive failures (refused or timed-out connections, response
    /// timeouts, 502/503/504 answers); `0` never ejects.
    pub after: u32,
    /// The first ejection's length; each one in a row doubles it, up to 16 times.
    #[serde(rename = "for")]
    pub duration: Span,
}

impl BalancingConfig {
    /// These settings with `over`'s given fields in their place.
    pub fn merged(&self, over: &BalancingConfig) -> BalancingConfig {
        BalancingConfig {
            max_in_flight: over.max_in_flight.or(self.max_in_flight),
            queue: over.queue.clone().or_else(|| self.queue.clone()),
            eject: over.eject.clone().or_else(|| self.eject.clone()),
            slow_start: over.slow_start.or(self.slow_start),
            response_timeout: over.response_timeout.or(self.response_timeout),
            long_poll_margin: over.long_poll_margin.or(self.long_poll_margin),
            stall_after: over.stall_after.or(self.stall_after),
            groups: BTreeMap::new(),
        }
    }
}
