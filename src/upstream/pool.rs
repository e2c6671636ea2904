//! Worker pools: consistent hashing (Ketama) for sticky groups, least
//! outstanding requests (or round robin) for the rest; per-member caps with
//! a bounded FIFO queue, passive ejection, slow start and stall handling.
//! Choosing reads atomics only.

use crate::config::values::UpstreamAddr;
use crate::observe::metrics::METRICS;
use crate::synapse::table::Group;
use crate::upstream::balance::{Balancing, Choice};
use crate::upstream::peer::Upstream;
use crate::upstream::state::{now_ms, Admin, Connection, MemberState, OutReason, PoolShared};
use pingora_ketama::{Bucket, Continuum};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Member {
    pub upstream: Upstream,
    /// The address as logs and metrics show it, rendered once.
    pub label: String,
    /// Where `GET /health` goes (the worker's own address unless a health port is set).
    pub health: UpstreamAddr,
    pub weight: u32,
    /// Health, load and failures: outlives the snapshot (`Pool::adopt_state`).
    pub state: Arc<MemberState>,
    /// The member's identity on the hash ring.
    ring_id: SocketAddr,
}

impl Member {
    pub fn new(pool: &str, upstream: Upstream, health: UpstreamAddr, weight: u32) -> Member {
        let ring_id = ring_identity(&upstream.address);
        let label = upstream.address.to_string();
        let state = Arc::new(MemberState::new(pool, &label));
        Member { upstream, label, health, weight: weight.max(1), state, ring_id }
    }

    pub fn is_healthy(&self) -> bool {
        self.state.is_healthy()
    }

    /// Returns whether the state changed.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.state.set_healthy(healthy, now_ms())
    }
}

/// TCP workers are placed on the ring by address; Unix-socket workers by a
/// stable hash of their path, so the ring does not depend on config order.
fn ring_identity(address: &UpstreamAddr) -> SocketAddr {
    match address {
        UpstreamAddr::Tcp(addr) | UpstreamAddr::Tls(addr, _) => *addr,
        UpstreamAddr::Unix(path) => {
            let hash = crc32(path.as_os_str().as_encoded_bytes());
            SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, (hash >> 16) as u16, hash as u16)), 1)
        }
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// What a pool offers a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    Member(usize),
    /// Members are live but every one is at its cap.
    Full,
    /// No member may be used (down, ejected, or already tried).
    NoneLive,
}

/// Why a pool gave a request no member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NoneLive,
    /// Every member at its cap and no room to wait.
    QueueFull,
    /// Waited `queue.timeout` without a slot.
    QueueTimeout,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::NoneLive => "none_live",
            Refusal::QueueFull => "queue_full",
            Refusal::QueueTimeout => "queue_timeout",
        }
    }
}

/// A request's place on a member: counted in its load until dropped, which
/// frees the slot for the longest waiter.
pub struct Slot {
    pub member: usize,
    state: Arc<MemberState>,
    shared: Arc<PoolShared>,
    long_poll: bool,
    capped: bool,
    ticket: Option<u64>,
}

impl Slot {
    pub fn state(&self) -> &MemberState {
        &self.state
    }

    /// The request went out on `connection`: it is owed an answer, and may
    /// be cut and sent elsewhere (`rescue`) if the member stalls.
    pub fn sent(&mut self, long_poll: Option<Duration>, rescue: Option<Connection>) {
        self.settle();
        self.ticket = Some(self.state.sent(now_ms(), long_poll, rescue));
    }

    /// Its response header arrived (or it failed): nothing is owed any more.
    pub fn settle(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.state.settle(ticket);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.settle();
        self.state.give_back(self.long_poll);
        if self.capped && !self.long_poll {
            self.shared.slot_freed().notify_one();
        }
    }
}

pub struct Pool {
    /// The group or upstream name, as logs and metrics show it.
    pub label: String,
    pub members: Vec<Member>,
    pub balancing: Balancing,
    /// The queue and retry budget: outlive the snapshot like members' state.
    pub shared: Arc<PoolShared>,
    ring: Continuum,
    next: AtomicUsize,
}

impl Pool {
    pub fn new(label: impl Into<String>, members: Vec<Member>, balancing: Balancing) -> Pool {
        let label = label.into();
        let buckets: Vec<Bucket> = members.iter().map(|m| Bucket::new(m.ring_id, m.weight)).collect();
        let shared = Arc::new(PoolShared::new(&label));
        Pool { shared, label, ring: Continuum::new(&buckets), members, balancing, next: AtomicUsize::new(0) }
    }

    /// Whether `index` takes requests now (up, not ejected).
    pub fn is_usable(&self, index: usize) -> bool {
        self.usable(index, &[], now_ms())
    }

    fn usable(&self, index: usize, avoid: &[usize], now: u64) -> bool {
        self.members[index].state.is_usable(now) && !avoid.contains(&index)
    }

    fn has_room(&self, index: usize, long_poll: bool) -> bool {
        long_poll || self.balancing.max_in_flight.is_none_or(|cap| self.members[index].state.in_flight() < cap)
    }

    /// A live member for `key` ignoring caps (for `route` and tests); see `choose`.
    pub fn pick(&self, key: Option<&[u8]>, avoid: &[usize]) -> Option<usize> {
        match self.choose(key, avoid, true, now_ms()) {
            Pick::Member(index) => Some(index),
            _ => None,
        }
    }

    /// The member for a request: with a `key`, its place on the ring
    /// (consistent: a key stays on its member while that member is usable
    /// and has room, and moves back when it returns, gradually over the slow
    /// start); without, by the pool's choice. `avoid` lists members already
    /// tried.
    pub fn choose(&self, key: Option<&[u8]>, avoid: &[usize], long_poll: bool, now: u64) -> Pick {
        match key {
            Some(key) => self.choose_hashed(key, avoid, long_poll, now),
            None => match self.balancing.choice {
                Choice::LeastOutstanding => self.choose_least(avoid, long_poll, now),
                Choice::RoundRobin => self.choose_round_robin(avoid, long_poll, now),
            },
        }
    }

    fn choose_hashed(&self, key: &[u8], avoid: &[usize], long_poll: bool, now: u64) -> Pick {
        // Walking the ring visits every member after a bounded number of
        // points; stop once each has been seen.
        let mut seen = 0u64;
        let all = if self.members.len() >= 64 { u64::MAX } else { (1u64 << self.members.len()) - 1 };
        let key_permille = u64::from(crc32(key) % 1000);
        let (mut full, mut ramping) = (false, None);
        for ring_id in self.ring.node_iter(key).take(self.members.len() * 160 + 1) {
            let Some(index) = self.members.iter().position(|m| m.ring_id == *ring_id) else { break };
            let bit = if index < 64 { 1u64 << index } else { 0 };
            if seen & bit != 0 {
                continue;
            }
            seen |= bit;
            if self.usable(index, avoid, now) {
                if !self.has_room(index, long_poll) {
                    full = true;
                } else if self.members[index].state.ramp_permille(self.balancing.slow_start, now) <= key_permille {
                    // Ramping up: only a growing share of its keys come back yet.
                    ramping.get_or_insert(index);
                } else {
                    return Pick::Member(index);
                }
            }
            if seen == all {
                break;
            }
        }
        match (ramping, full) {
            (Some(index), _) => Pick::Member(index),
            (None, true) => Pick::Full,
            (None, false) => Pick::NoneLive,
        }
    }

    /// Members in turn from a rotating start (returned too) that are usable
    /// and have room; `full` is set when a usable one lacked room.
    fn in_turn<'a>(
        &'a self,
        avoid: &'a [usize],
        long_poll: bool,
        now: u64,
        full: &'a mut bool,
    ) -> (usize, impl Iterator<Item = usize> + 'a) {
        let count = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let members = (0..count).map(move |offset| (start + offset) % count).filter(move |&index| {
            if !self.usable(index, avoid, now) {
                return false;
            }
            let room = self.has_room(index, long_poll);
            *full |= !room;
            room
        });
        (start, members)
    }

    fn outcome(chosen: Option<usize>, full: bool) -> Pick {
        match (chosen, full) {
            (Some(index), _) => Pick::Member(index),
            (None, true) => Pick::Full,
            (None, false) => Pick::NoneLive,
        }
    }

    /// The fewest requests in flight for the member's weight (scaled down
    /// while it ramps up); ties go round, from a rotating start.
    fn choose_least(&self, avoid: &[usize], long_poll: bool, now: u64) -> Pick {
        let mut full = false;
        let (_, members) = self.in_turn(avoid, long_poll, now, &mut full);
        let score = |index: usize| {
            let member = &self.members[index];
            let weight = u64::from(member.weight) * member.state.ramp_permille(self.balancing.slow_start, now);
            (u64::from(member.state.in_flight()) + 1) * 1_000_000_000 / weight.max(1)
        };
        // `min_by_key` keeps the first of equals: the rotation breaks ties.
        let chosen = members.min_by_key(|&index| score(index));
        Self::outcome(chosen, full)
    }

    fn choose_round_robin(&self, avoid: &[usize], long_poll: bool, now: u64) -> Pick {
        let mut full = false;
        let mut ramping = None;
        let (start, mut members) = self.in_turn(avoid, long_poll, now, &mut full);
        // A ramping member takes its turn only that share of the time.
        let chosen = members.find(|&index| {
            let ramp = self.members[index].state.ramp_permille(self.balancing.slow_start, now);
            let skip = ramp < 1000 && (start as u64).wrapping_mul(7919) % 1000 >= ramp;
            if skip {
                ramping.get_or_insert(index);
            }
            !skip
        });
        drop(members);
        Self::outcome(chosen.or(ramping), full)
    }

    fn take(&self, index: usize, long_poll: bool) -> Option<Slot> {
        let capped = self.balancing.max_in_flight.is_some();
        self.members[index].state.try_take(long_poll, self.balancing.max_in_flight).then(|| Slot {
            member: index,
            state: Arc::clone(&self.members[index].state),
            shared: Arc::clone(&self.shared),
            long_poll,
            capped,
            ticket: None,
        })
    }

    /// A slot on a member for this request, waiting in the pool's queue
    /// (FIFO, bounded, up to `queue.timeout`) when every member is full.
    /// While anyone waits, a newcomer queues behind them.
    pub async fn acquire(&self, key: Option<&[u8]>, avoid: &[usize], long_poll: bool) -> Result<Slot, Refusal> {
        let queueing = self.balancing.max_in_flight.is_some() && !long_poll;
        if !queueing || self.shared.waiting() == 0 {
            match self.try_acquire(key, avoid, long_poll) {
                Ok(slot) => return Ok(slot),
                Err(Pick::NoneLive) => return Err(Refusal::NoneLive),
                Err(_) => {}
            }
        }
        if self.balancing.queue_size == 0 || !self.shared.enqueue(self.balancing.queue_size) {
            return Err(Refusal::QueueFull);
        }
        let queued = Instant::now();
        let deadline = tokio::time::Instant::now() + self.balancing.queue_timeout;
        let outcome = loop {
            let notified = self.shared.slot_freed().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_acquire(key, avoid, long_poll) {
                Ok(slot) => break Ok(slot),
                Err(Pick::NoneLive) => break Err(Refusal::NoneLive),
                Err(_) => {}
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break Err(Refusal::QueueTimeout);
            }
        };
        self.shared.dequeue();
        if outcome.is_ok() {
            METRICS.balancing.queue_wait.with_label_values(&[&self.label]).observe(queued.elapsed().as_secs_f64());
        } else if self.shared.waiting() > 0 {
            // This waiter may have been woken for a slot it leaves unused.
            self.shared.slot_freed().notify_one();
        }
        outcome
    }

    fn try_acquire(&self, key: Option<&[u8]>, avoid: &[usize], long_poll: bool) -> Result<Slot, Pick> {
        // Another request may take the last slot between the choice and the
        // take: choose again, a bounded number of times.
        for _ in 0..=self.members.len() {
            match self.choose(key, avoid, long_poll, now_ms()) {
                Pick::Member(index) => {
                    if let Some(slot) = self.take(index, long_poll) {
                        return Ok(slot);
                    }
                }
                other => return Err(other),
            }
        }
        Err(Pick::Full)
    }

    /// Records a health change; returns whether it was one.
    pub fn mark(&self, index: usize, healthy: bool) -> bool {
        let member = &self.members[index];
        let changed = member.set_healthy(healthy);
        if changed {
            let worker = member.upstream.address.to_string();
            METRICS.operations.worker_up.with_label_values(&[&self.label, &worker]).set(i64::from(healthy));
            let state = if healthy { "up" } else { "down" };
            log::warn!("worker {worker} ({}) is {state}", self.label);
            if healthy {
                // Waiters may use it now.
                self.shared.slot_freed().notify_waiters();
            }
        }
        changed
    }

    /// A connection to `index` failed: down until its health check passes.
    pub fn mark_unreachable(&self, index: usize) {
        if self.mark(index, false) {
            self.members[index].state.went_out(now_ms(), OutReason::ConnectFailed);
        }
    }

    pub fn live_count(&self) -> usize {
        self.members.iter().filter(|m| m.is_healthy()).count()
    }

    /// Members a request could be sent to now, other than `except`.
    fn usable_others(&self, except: usize, now: u64) -> usize {
        (0..self.members.len()).filter(|&i| i != except && self.usable(i, &[], now)).count()
    }

    /// A failure of `index` (refused or timed-out connection, response
    /// timeout, a 502/503/504): enough in a row eject it, unless it is the
    /// last member a request could use.
    pub fn failed(&self, index: usize) {
        let state = &self.members[index].state;
        let failures = state.failed();
        let now = now_ms();
        let eject_after = self.balancing.eject_after;
        if eject_after == 0 || failures < eject_after || state.is_ejected(now) || self.usable_others(index, now) == 0 {
            return;
        }
        let length = state.eject(now, OutReason::Failures, |n| self.balancing.ejection_length(n));
        let member = &self.members[index].label;
        METRICS.balancing.ejections.with_label_values(&[&self.label, member, "failures"]).inc();
        log::warn!("worker {member} ({}) ejected for {length:?} after {failures} failures in a row", self.label);
    }

    /// A good answer from `index`.
    pub fn succeeded(&self, index: usize) {
        self.members[index].state.succeeded(now_ms());
    }

    /// Members owing an answer that have kept silent past `stall_after`,
    /// with other members to take their requests.
    pub fn silent_members(&self) -> Vec<usize> {
        let stall_after = self.balancing.stall_after;
        if stall_after.is_zero() {
            return Vec::new();
        }
        let now = now_ms();
        (0..self.members.len())
            .filter(|&i| self.usable(i, &[], now) && self.usable_others(i, now) > 0)
            .filter(|&i| self.members[i].state.silence(now) >= stall_after)
            .collect()
    }

    /// `index` stalled (silent, and its health check failed): it is taken
    /// out as down (its active checks bring it back) or, without active
    /// checks, ejected; the requests it holds that may be sent elsewhere are
    /// cut so the proxy sends them again. Returns how many were.
    pub fn stalled(&self, index: usize, checked: bool) -> usize {
        let now = now_ms();
        if self.usable_others(index, now) == 0 {
            return 0;
        }
        let member = &self.members[index];
        if checked {
            self.mark(index, false);
            member.state.went_out(now, OutReason::Stalled);
        } else {
            member.state.eject(now, OutReason::Stalled, |n| self.balancing.ejection_length(n));
        }
        METRICS.balancing.ejections.with_label_values(&[&self.label, &member.label, "stall"]).inc();
        let cut = member.state.cut_rescuable();
        METRICS.balancing.rescued.with_label_values(&[&self.label]).inc_by(cut as u64);
        log::warn!("worker {} ({}) stalled: taken out, {cut} requests sent elsewhere", member.label, self.label);
        cut
    }

    /// Applies an operator's `drain`, `maintenance` or `ready` to the
    /// members at `label`; returns how many there were.
    pub fn set_admin(&self, label: &str, admin: Admin) -> usize {
        let mut count = 0;
        for member in self.members.iter().filter(|m| m.label == label) {
            member.state.set_admin(admin, now_ms());
            log::warn!("worker {label} ({}) set {admin:?} by the operator", self.label);
            count += 1;
        }
        if count > 0 && admin == Admin::Ready {
            self.shared.slot_freed().notify_waiters();
        }
        count
    }

    /// Takes over the long-lived state of the previous snapshot's pool of the
    /// same name: its queue, and each member's health, load and failures.
    pub fn adopt_state(&mut self, previous: &Pool) {
        self.shared = Arc::clone(&previous.shared);
        for member in &mut self.members {
            if let Some(same) = previous.members.iter().find(|m| m.label == member.label) {
                member.state = Arc::clone(&same.state);
            }
        }
    }
}

/// Every declared group's pool; groups without one go to main.
#[derive(Default)]
pub struct Pools {
    groups: Vec<Group>,
    pools: Vec<Pool>,
}

impl Pools {
    pub fn new(pools: Vec<(Group, Pool)>) -> Pools {
        let (groups, pools) = pools.into_iter().unzip();
        Pools { groups, pools }
    }

    pub fn get(&self, group: Group) -> Option<&Pool> {
        self.groups.iter().position(|g| *g == group).map(|index| &self.pools[index])
    }

    pub fn all(&self) -> &[Pool] {
        &self.pools
    }

    /// Carries each pool's long-lived state over from the previous
    /// snapshot: a reload neither sends traffic to a worker known to be down
    /// nor forgets the requests in flight on each.
    pub fn adopt_state(&mut self, old: &Pools) {
        for (group, pool) in self.groups.iter().zip(&mut self.pools) {
            if let Some(previous) = old.get(*group) {
                pool.adopt_state(previous);
            }
        }
    }

    pub fn declared(&self) -> Vec<Group> {
        self.groups.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamTimeoutsConfig;

    fn pool_with(ports: &[u16], balancing: Balancing) -> Pool {
        let members = ports
            .iter()
            .map(|port| {
                let address = UpstreamAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], *port)));
                let upstream = Upstream::new(&address, &UpstreamTimeoutsConfig::default()).unwrap();
                Member::new("test", upstream, address, 1)
            })
            .collect();
        Pool::new(Group::Synchrotron.name(), members, balancing)
    }

    fn pool(ports: &[u16]) -> Pool {
        pool_with(ports, Balancing { choice: Choice::RoundRobin, slow_start: Duration::ZERO, ..Balancing::default() })
    }

    fn keys() -> Vec<String> {
        (0..2000).map(|i| format!("user{i}")).collect()
    }

    fn placed(p: &Pool, keys: &[String], now: u64) -> Vec<usize> {
        keys.iter()
            .map(|k| match p.choose(Some(k.as_bytes()), &[], false, now) {
                Pick::Member(index) => index,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_dead_member_moves_only_its_own_keys() {
        let p = pool(&[8001, 8002, 8003, 8004]);
        let keys = keys();
        let before = placed(&p, &keys, now_ms());
        for member in 0..4 {
            assert!(before.contains(&member), "member {member} got no keys");
        }
        p.members[1].set_healthy(false);
        let after = placed(&p, &keys, now_ms());
        let moved_alive = before.iter().zip(&after).filter(|(b, a)| **b != 1 && a != b).count();
        assert_eq!(moved_alive, 0, "a live member's key moved");
        assert!(!after.contains(&1));
        p.members[1].set_healthy(true);
        assert!(placed(&p, &keys, now_ms()) == before, "keys did not come back");
    }

    #[test]
    fn a_returning_member_takes_its_keys_back_over_the_slow_start() {
        let slow = Balancing { slow_start: Duration::from_secs(10), ..Balancing::default() };
        let p = pool_with(&[8001, 8002, 8003, 8004], slow);
        let keys = keys();
        let before = placed(&p, &keys, 1);
        let own = before.iter().filter(|m| **m == 2).count();
        let t0 = 1_000_000;
        p.members[2].state.set_healthy(false, t0 - 5000);
        p.members[2].state.set_healthy(true, t0);
        let share = |now| {
            let now_placed = placed(&p, &keys, now);
            let stray = before.iter().zip(&now_placed).filter(|(b, a)| **a == 2 && **b != 2).count();
            assert_eq!(stray, 0, "another member's key went to the returning one");
            now_placed.iter().filter(|m| **m == 2).count() as f64 / own as f64
        };
        assert!(share(t0) < 0.1, "{}", share(t0));
        let half = share(t0 + 5000);
        assert!((0.35..0.65).contains(&half), "{half}");
        assert!((share(t0 + 10_000) - 1.0).abs() < f64::EPSILON);
    }

    #[test]
    fn least_outstanding_avoids_the_busy_member_and_takes_turns_at_equal_load() {
        let p = pool_with(&[8001, 8002, 8003], Balancing::default());
        let now = now_ms();
        // A stalled member's stuck requests make it the busy one.
        for _ in 0..3 {
            assert!(p.members[0].state.try_take(false, None));
        }
        let picks: Vec<Pick> = (0..6).map(|_| p.choose(None, &[], false, now)).collect();
        assert!(picks.iter().all(|pick| *pick != Pick::Member(0)), "{picks:?}");
        assert!(picks.contains(&Pick::Member(1)) && picks.contains(&Pick::Member(2)));
        // Equal load: each in turn.
        let idle = pool_with(&[8001, 8002, 8003], Balancing::default());
        let mut seen: Vec<Pick> = (0..3).map(|_| idle.choose(None, &[], false, now)).collect();
        seen.sort_by_key(|p| format!("{p:?}"));
        assert_eq!(seen, [Pick::Member(0), Pick::Member(1), Pick::Member(2)]);
    }

    #[test]
    fn round_robin_skips_dead_and_tried_members() {
        let p = pool(&[8001, 8002, 8003]);
        let picks: Vec<usize> = (0..6).map(|_| p.pick(None, &[]).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        p.members[0].set_healthy(false);
        assert!((0..6).all(|_| p.pick(None, &[]) != Some(0)));
        assert_eq!(p.pick(None, &[1, 2]), None);
        assert!(p.pick(Some(b"k"), &[1]).is_some_and(|m| m == 2));
    }

    #[test]
    fn a_fully_dead_pool_picks_nothing() {
        let p = pool(&[8001, 8002]);
        p.members.iter().for_each(|m| {
            m.set_healthy(false);
        });
        assert_eq!(p.pick(Some(b"k"), &[]), None);
        assert_eq!(p.pick(None, &[]), None);
        assert_eq!(p.live_count(), 0);
    }

    #[test]
    fn a_full_member_passes_its_keys_on_until_every_member_is_full() {
        let capped = Balancing { max_in_flight: Some(1), slow_start: Duration::ZERO, ..Balancing::default() };
        let p = pool_with(&[8001, 8002], capped);
        let now = now_ms();
        let Pick::Member(home) = p.choose(Some(b"@alice:x"), &[], false, now) else { panic!() };
        assert!(p.members[home].state.try_take(false, Some(1)));
        assert_eq!(p.choose(Some(b"@alice:x"), &[], false, now), Pick::Member(1 - home));
        // Long-polls are not capped.
        assert_eq!(p.choose(Some(b"@alice:x"), &[], true, now), Pick::Member(home));
        assert!(p.members[1 - home].state.try_take(false, Some(1)));
        assert_eq!(p.choose(Some(b"@alice:x"), &[], false, now), Pick::Full);
        assert_eq!(p.choose(None, &[], false, now), Pick::Full);
    }

    #[test]
    fn failures_in_a_row_eject_but_never_the_last_usable_member() {
        let p = pool_with(&[8001, 8002], Balancing::default());
        p.failed(0);
        p.failed(0);
        p.succeeded(0);
        p.failed(0);
        p.failed(0);
        assert!(p.is_usable(0), "failures not in a row ejected");
        p.failed(0);
        assert!(!p.is_usable(0));
        for _ in 0..5 {
            p.failed(1);
        }
        assert!(p.is_usable(1), "the last usable member was ejected");
    }

    #[tokio::test]
    async fn the_queue_serves_in_order_and_sheds_past_its_size_or_timeout() {
        let queued = Balancing {
            max_in_flight: Some(1),
            queue_size: 2,
            queue_timeout: Duration::from_millis(300),
            ..Balancing::default()
        };
        let p = Arc::new(pool_with(&[8001], queued));
        let first = p.acquire(None, &[], false).await.unwrap();
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let waiter = |name: &'static str| {
            let (p, order) = (Arc::clone(&p), Arc::clone(&order));
            tokio::spawn(async move {
                let slot = p.acquire(None, &[], false).await;
                order.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(20)).await;
                slot.map(|_| ())
            })
        };
        let a = waiter("a");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let b = waiter("b");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(p.acquire(None, &[], false).await.err(), Some(Refusal::QueueFull));
        drop(first);
        assert!(a.await.unwrap().is_ok() && b.await.unwrap().is_ok());
        assert_eq!(*order.lock().unwrap(), ["a", "b"]);
        let held = p.acquire(None, &[], false).await.unwrap();
        let started = Instant::now();
        assert_eq!(p.acquire(None, &[], false).await.err(), Some(Refusal::QueueTimeout));
        assert!(started.elapsed() >= Duration::from_millis(290));
        drop(held);
        assert_eq!(p.shared.waiting(), 0);
    }
}
