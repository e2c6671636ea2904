//! The tries that carry a forwarded request out: which members it has
//! tried, whether it waits for its upstream to come back (held), and when a
//! failure sends it again. Decided here from plain facts, so each rule is
//! unit-tested without a Pingora session; the glue only reports what
//! happened and applies the answer.

use super::HoldPolicy;
use crate::observe::metrics::METRICS;
use crate::request::errors::Refused;
use crate::request::hold::{Held, Hold};
use crate::upstream::pool::{Pool, Slot};
use crate::upstream::state::Connection;
use pingora::upstreams::peer::HttpPeer;
use std::sync::Arc;
use std::time::Duration;

/// One forwarded request's tries.
pub struct Attempt {
    /// Synapse's main process is the upstream when no member serves a try;
    /// only it is held while refusing connections (a worker's refusal
    /// sends the request to another member at once).
    to_synapse: bool,
    /// A named upstream's members without active checks: nothing would
    /// bring one back, so a failed connection does not take it out.
    unchecked: bool,
    long_poll: Option<Duration>,
    hold_policy: Option<HoldPolicy>,
    /// The member serving the current try, if a pool's member does.
    member: Option<usize>,
    /// Its slot: counts the try in the member's load until dropped.
    slot: Option<Slot>,
    tried: Tried,
    held: Option<Hold>,
}

/// What the glue saw of a connection that was not made.
#[derive(Debug, Clone, Copy)]
pub struct ConnectFailure {
    /// Refused (nothing listens: a restart), not timed out or reset.
    pub refused: bool,
}

/// What the glue saw of a try that failed after connecting.
#[derive(Debug, Clone, Copy)]
pub struct ProxyFailure {
    /// Harmless to send again: idempotent, body still buffered, nothing
    /// answered to the client yet.
    pub repeatable: bool,
    /// The connection itself failed (closed, reset) before a response header.
    pub connection_failed: bool,
    /// No answer within the read timeout, and nothing sent to the client.
    pub timed_out: bool,
    /// The connection came from the idle pool.
    pub reused: bool,
}

impl Attempt {
    pub fn new(
        to_synapse: bool,
        unchecked: bool,
        long_poll: Option<Duration>,
        hold_policy: Option<HoldPolicy>,
    ) -> Attempt {
        Attempt {
            to_synapse,
            unchecked,
            long_poll,
            hold_policy,
            member: None,
            slot: None,
            tried: Tried::default(),
            held: None,
        }
    }

    pub fn member(&self) -> Option<usize> {
        self.member
    }

    pub fn tried(&self) -> &[usize] {
        self.tried.as_slice()
    }

    /// Before each try: the previous slot goes back before this one takes
    /// one, and a held request says how long to wait first.
    pub fn begin(&mut self) -> Result<Option<Duration>, Refused> {
        self.member = None;
        self.slot = None;
        let (Some(hold), Some(policy)) = (&mut self.held, self.hold_policy) else { return Ok(None) };
        match hold.next_wait(policy.limit) {
            Some(wait) => Ok(Some(wait)),
            None => Err(Refused::HoldExpired { waited_ms: hold.waited().as_millis() }),
        }
    }

    /// Sends this try to the slot's member, with the pool's time to answer:
    /// a long-poll its own timeout plus the margin, anything else the
    /// pool's `response_timeout` (else the upstream's read timeout).
    pub fn take(&mut self, pool: &Pool, slot: Slot) -> Box<HttpPeer> {
        let index = slot.member;
        if self.tried.as_slice().is_empty() {
            pool.shared.deposit_retry_token();
        }
        self.tried.push(index);
        self.member = Some(index);
        self.slot = Some(slot);
        let mut peer = pool.members[index].upstream.peer();
        let answer_within = match self.long_poll {
            Some(timeout) => Some(timeout + pool.balancing.long_poll_margin),
            None => pool.balancing.response_timeout,
        };
        if let Some(limit) = answer_within {
            peer.options.read_timeout = Some(peer.options.read_timeout.map_or(limit, |read| read.min(limit)));
        }
        peer
    }

    /// No member of a group without a fallback can take the request
    /// (restarting, drained): nothing was sent, so it waits for one as a
    /// request to a restarting main does, or is refused when it may not.
    pub fn wait_for_member(&mut self, held: &Arc<Held>, group: &str) -> Result<Duration, Refused> {
        let no_worker = || Refused::NoUsableWorker { group: group.to_string() };
        let policy = self.hold_policy.ok_or_else(no_worker)?;
        if self.held.is_none() {
            self.held = held.try_hold(policy.most);
        }
        let wait = self.held.as_mut().and_then(|hold| hold.next_wait(policy.limit)).ok_or_else(no_worker)?;
        // Members refused before reached nothing: they may take it once back.
        self.tried = Tried::default();
        Ok(wait)
    }

    /// The request was sent on the connection the slot's member accepted;
    /// only a request harmless to repeat hands over `rescue`, so a stall
    /// may cut it and send it elsewhere.
    pub fn sent(&mut self, rescue: Option<Connection>) {
        if let Some(slot) = &mut self.slot {
            slot.sent(self.long_poll, rescue);
        }
    }

    /// The upstream's response header arrived.
    pub fn answered(&mut self, pool: Option<&Pool>, status: u16) {
        if let Some(slot) = &mut self.slot {
            slot.settle();
            slot.state().answered(crate::upstream::state::now_ms());
        }
        if let (Some(pool), Some(member)) = (pool, self.member) {
            match status {
                502..=504 => pool.failed(member),
                _ => pool.succeeded(member),
            }
        }
    }

    /// A connection that was not made reached nothing, so any request may
    /// go again: to another member at once, or, for Synapse's main process
    /// refusing (a restart), after waiting in the hold. `Ok(true)` to try again.
    pub fn connect_failed(
        &mut self,
        failure: ConnectFailure,
        pool: Option<&Pool>,
        held: &Arc<Held>,
    ) -> Result<bool, Refused> {
        let mut again = false;
        if let (true, None, true, Some(policy)) = (self.to_synapse, self.member, failure.refused, self.hold_policy) {
            if self.held.is_none() {
                self.held = Some(held.try_hold(policy.most).ok_or(Refused::HoldFull)?);
            }
            again = true;
        }
        let (Some(member), Some(pool)) = (self.member, pool) else { return Ok(again) };
        log::debug!("connecting to member {member} of {} failed", pool.label);
        if !self.unchecked {
            pool.mark_unreachable(member);
        }
        pool.failed(member);
        if pool.shared.take_retry() {
            again = true;
        } else {
            METRICS.balancing.retries_denied.with_label_values(&[&pool.label]).inc();
        }
        Ok(again)
    }

    /// A try that failed once connected: whether to send the request again.
    pub fn proxy_failed(&mut self, failure: ProxyFailure, pool: Option<&Pool>) -> bool {
        if let Some(slot) = &mut self.slot {
            slot.settle();
        }
        if let (Some(pool), Some(member), true) = (pool, self.member, failure.timed_out) {
            pool.failed(member);
        }
        // Past a deliberate limit (a long-poll's own timeout plus the
        // margin, or the pool's response_timeout) the request may try
        // another member; past the general read timeout it is answered 504.
        let deliberate = self.long_poll.is_some() || pool.is_some_and(|p| p.balancing.response_timeout.is_some());
        let timed_out = failure.timed_out && deliberate;
        // A member taken out while this request waited on it (a stall):
        // its connection was cut on purpose, and the request goes elsewhere.
        let taken_out = match (pool, self.member) {
            (Some(pool), Some(member)) => !pool.is_usable(member),
            _ => false,
        };
        if !failure.repeatable {
            return false;
        }
        if (taken_out || timed_out) && self.member.is_some() {
            let budget = taken_out || pool.is_some_and(|pool| pool.shared.take_retry());
            if let (false, Some(pool)) = (budget, pool) {
                METRICS.balancing.retries_denied.with_label_values(&[&pool.label]).inc();
            }
            return budget;
        }
        if !failure.connection_failed {
            return false;
        }
        if failure.reused {
            // A pooled connection the upstream closed while idle (Twisted's
            // ~60 s race) says nothing about the member, which may be the
            // only one or the sticky one: it stays eligible.
            if let Some(member) = self.member {
                self.tried.forget(member);
            }
            return true;
        }
        // A fresh connection that failed: the worker itself is in trouble
        // (killed, restarting). Like nginx's default `proxy_next_upstream
        // error`, the request goes to another member (this one stays on the
        // tried list), or to main where the group falls back.
        self.member.is_some()
    }
}

/// Pool members tried by one request, kept inline: the request path
/// allocates nothing for it (retries past eight members may repeat one).
#[derive(Default, Clone, Copy)]
struct Tried {
    members: [usize; 8],
    len: usize,
}

impl Tried {
    fn push(&mut self, member: usize) {
        if self.len < self.members.len() {
            self.members[self.len] = member;
            self.len += 1;
        }
    }

    fn as_slice(&self) -> &[usize] {
        &self.members[..self.len]
    }

    /// Lets a member be picked again.
    fn forget(&mut self, member: usize) {
        if let Some(at) = self.as_slice().iter().position(|&m| m == member) {
            self.members.copy_within(at + 1..self.len, at);
            self.len -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::values::UpstreamAddr;
    use crate::config::UpstreamTimeoutsConfig;
    use crate::upstream::balance::{Balancing, Choice};
    use crate::upstream::peer::Upstream;
    use crate::upstream::pool::Member;

    fn pool(members: u16, balancing: Balancing) -> Pool {
        let members = (0..members)
            .map(|n| {
                let address = UpstreamAddr::Tcp(std::net::SocketAddr::from(([127, 0, 0, 1], 9000 + n)));
                let upstream = Upstream::new(&address, &UpstreamTimeoutsConfig::default()).unwrap();
                Member::new("test", upstream, address, 1)
            })
            .collect();
        Pool::new("test", members, Balancing { choice: Choice::RoundRobin, slow_start: Duration::ZERO, ..balancing })
    }

    fn hold() -> Option<HoldPolicy> {
        Some(HoldPolicy { limit: Duration::from_secs(30), most: 1 })
    }

    fn taken(attempt: &mut Attempt, pool: &Pool) -> usize {
        attempt.begin().unwrap();
        let slot = tokio_test::block_on(pool.acquire(None, attempt.tried(), false)).unwrap();
        attempt.take(pool, slot);
        attempt.member().unwrap()
    }

    const REFUSED: ConnectFailure = ConnectFailure { refused: true };
    const RESET: ProxyFailure =
        ProxyFailure { repeatable: true, connection_failed: true, timed_out: false, reused: false };

    #[test]
    fn main_refusing_holds_the_request_and_a_full_hold_refuses_the_next() {
        let held = Arc::new(Held::default());
        let mut first = Attempt::new(true, false, None, hold());
        assert_eq!(first.connect_failed(REFUSED, None, &held), Ok(true));
        assert!(matches!(first.begin(), Ok(Some(wait)) if wait == Duration::from_millis(100)));
        let mut second = Attempt::new(true, false, None, hold());
        assert_eq!(second.connect_failed(REFUSED, None, &held), Err(Refused::HoldFull));
        drop(first);
        assert_eq!(second.connect_failed(REFUSED, None, &held), Ok(true), "the place was given back");
    }

    #[test]
    fn without_a_hold_a_refusing_main_is_not_tried_again() {
        let held = Arc::new(Held::default());
        let mut attempt = Attempt::new(true, false, None, None);
        assert_eq!(attempt.connect_failed(REFUSED, None, &held), Ok(false));
        let mut named = Attempt::new(false, false, None, hold());
        assert_eq!(named.connect_failed(REFUSED, None, &held), Ok(false), "only Synapse's main is held");
    }

    #[test]
    fn an_expired_hold_is_refused_with_its_own_reason() {
        let held = Arc::new(Held::default());
        let policy = Some(HoldPolicy { limit: Duration::ZERO, most: 4 });
        let mut attempt = Attempt::new(true, false, None, policy);
        assert_eq!(attempt.connect_failed(REFUSED, None, &held), Ok(true));
        assert!(matches!(attempt.begin(), Err(Refused::HoldExpired { .. })));
    }

    #[test]
    fn a_member_refusing_is_taken_out_and_the_request_goes_to_another() {
        let held = Arc::new(Held::default());
        let pool = pool(2, Balancing::default());
        let mut attempt = Attempt::new(true, false, None, hold());
        let first = taken(&mut attempt, &pool);
        assert_eq!(attempt.connect_failed(REFUSED, Some(&pool), &held), Ok(true));
        assert!(!pool.is_usable(first));
        let second = taken(&mut attempt, &pool);
        assert_ne!(first, second);
        assert_eq!(held.count(), 0, "a worker's refusal holds nothing");
    }

    #[test]
    fn an_unchecked_member_stays_usable_after_a_refusal() {
        let held = Arc::new(Held::default());
        let pool = pool(2, Balancing::default());
        let mut attempt = Attempt::new(false, true, None, None);
        let first = taken(&mut attempt, &pool);
        assert_eq!(attempt.connect_failed(REFUSED, Some(&pool), &held), Ok(true));
        assert!(pool.is_usable(first));
    }

    #[test]
    fn a_reset_goes_elsewhere_only_when_repeatable_and_a_reused_connection_keeps_its_member() {
        let pool = pool(2, Balancing::default());
        let mut attempt = Attempt::new(true, false, None, None);
        let first = taken(&mut attempt, &pool);
        assert!(!attempt.proxy_failed(ProxyFailure { repeatable: false, ..RESET }, Some(&pool)));
        assert!(attempt.proxy_failed(RESET, Some(&pool)));
        assert_eq!(attempt.tried(), [first], "a fresh connection's member stays tried");
        assert!(attempt.proxy_failed(ProxyFailure { reused: true, ..RESET }, Some(&pool)));
        assert!(attempt.tried().is_empty(), "an idle connection's close says nothing of its member");
    }

    #[test]
    fn a_timeout_is_tried_elsewhere_only_past_a_deliberate_limit() {
        let timed_out = ProxyFailure { repeatable: true, connection_failed: false, timed_out: true, reused: false };
        let plain = pool(2, Balancing::default());
        let mut attempt = Attempt::new(true, false, None, None);
        taken(&mut attempt, &plain);
        assert!(!attempt.proxy_failed(timed_out, Some(&plain)), "the general read timeout answers 504");
        let mut long_poll = Attempt::new(true, false, Some(Duration::from_secs(30)), None);
        taken(&mut long_poll, &plain);
        assert!(long_poll.proxy_failed(timed_out, Some(&plain)));
    }

    #[test]
    fn retries_spend_the_pools_budget() {
        let timed_out = ProxyFailure { repeatable: true, connection_failed: false, timed_out: true, reused: false };
        let pool = pool(2, Balancing { response_timeout: Some(Duration::from_secs(1)), ..Balancing::default() });
        let mut granted = 0;
        for _ in 0..100 {
            let mut attempt = Attempt::new(true, false, None, None);
            taken(&mut attempt, &pool);
            granted += usize::from(attempt.proxy_failed(timed_out, Some(&pool)));
        }
        assert!(granted > 0 && granted < 100, "{granted} of 100 retried");
    }

    #[test]
    fn a_group_without_members_waits_while_holding_is_allowed() {
        let held = Arc::new(Held::default());
        let mut attempt = Attempt::new(true, false, None, hold());
        assert_eq!(attempt.wait_for_member(&held, "media"), Ok(Duration::from_millis(100)));
        let mut refused = Attempt::new(true, false, None, None);
        assert!(matches!(refused.wait_for_member(&held, "media"), Err(Refused::NoUsableWorker { .. })));
    }

    #[test]
    fn tried_members_are_forgotten_in_order() {
        let mut tried = Tried::default();
        for member in [3, 1, 4, 1, 5] {
            tried.push(member);
        }
        tried.forget(1);
        assert_eq!(tried.as_slice(), [3, 4, 1, 5]);
        for member in 0..10 {
            tried.push(member);
        }
        assert_eq!(tried.as_slice().len(), 8);
    }
}
