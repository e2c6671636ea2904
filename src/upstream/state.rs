//! What the edge knows about each pool member beyond one snapshot: health,
//! requests in flight, failures and ejection, and the requests it has not
//! answered yet. A reload hands the same `MemberState` to the new snapshot's
//! member of the same pool and address (`Pool::adopt_state`), so counts stay
//! true across reloads while requests of the old snapshot finish.

use crate::observe::metrics::METRICS;
use once_cell::sync::Lazy;
use prometheus::IntGauge;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static STARTED: Lazy<Instant> = Lazy::new(Instant::now);

/// Milliseconds on a monotonic clock, never 0 (0 means "never" below).
pub fn now_ms() -> u64 {
    u64::try_from(STARTED.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The connection a request waits on, to cut it if its member stalls.
#[derive(Debug, Clone, Copy)]
pub struct Connection {
    pub fd: RawFd,
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// What an operator asked of a member (`matrix-edge workers …`); it
/// survives reloads, not restarts of the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Admin {
    Ready,
    /// No new requests; those in flight finish. Its sticky keys move to the
    /// others until it is ready again.
    Draining,
    /// As draining, and not health-checked either (stopped on purpose).
    Maintenance,
}

impl Admin {
    fn from_u8(value: u8) -> Admin {
        match value {
            1 => Admin::Draining,
            2 => Admin::Maintenance,
            _ => Admin::Ready,
        }
    }

    pub fn parse(word: &str) -> Option<Admin> {
        match word {
            "ready" => Some(Admin::Ready),
            "drain" | "draining" => Some(Admin::Draining),
            "maintenance" => Some(Admin::Maintenance),
            _ => None,
        }
    }
}

/// Why a member last went out of rotation, for the status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutReason {
    HealthCheck = 1,
    ConnectFailed = 2,
    Stalled = 3,
    Failures = 4,
}

impl OutReason {
    pub fn describe(code: u8) -> &'static str {
        match code {
            1 => "health check failed",
            2 => "connection failed",
            3 => "stalled: owed answers and its health check failed",
            4 => "failures in a row",
            _ => "",
        }
    }
}

/// A request sent to a member and not answered yet.
struct Outstanding {
    /// From when its silence counts: when it was sent, or for a long-poll
    /// when its own timeout runs out.
    due: u64,
    /// Repeatable elsewhere (idempotent, no body) and on a TCP connection.
    rescue: Option<Connection>,
}

pub struct MemberState {
    healthy: AtomicBool,
    in_flight: AtomicU32,
    long_polls: AtomicU32,
    /// Failures in a row since the last good answer.
    failures: AtomicU32,
    /// Ejections in a row, for the back-off.
    ejections: AtomicU32,
    ejected_until: AtomicU64,
    /// Where the slow start ramps from (0: it never left).
    ramp_from: AtomicU64,
    /// When it last sent a response header.
    last_answer: AtomicU64,
    /// A stall check is running.
    probing: AtomicBool,
    admin: std::sync::atomic::AtomicU8,
    /// When it last went down or was ejected (0: never), and why (`OutReason`).
    out_since: AtomicU64,
    out_reason: std::sync::atomic::AtomicU8,
    next_id: AtomicU64,
    /// By ticket: settling one is a removal, not a scan of every request
    /// the member owes (a synchrotron may owe hundreds of long-polls).
    outstanding: Mutex<HashMap<u64, Outstanding>>,
    in_flight_gauge: IntGauge,
    long_poll_gauge: IntGauge,
    /// Requests, errors and latency over the last minute, for the status page.
    pub last_minute: crate::observe::last_minute::LastMinute,
}

impl MemberState {
    pub fn new(pool: &str, member: &str) -> MemberState {
        MemberState {
            healthy: AtomicBool::new(true),
            in_flight: AtomicU32::new(0),
            long_polls: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ramp_from: AtomicU64::new(0),
            last_answer: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            admin: std::sync::atomic::AtomicU8::new(0),
            out_since: AtomicU64::new(0),
            out_reason: std::sync::atomic::AtomicU8::new(0),
            next_id: AtomicU64::new(1),
            outstanding: Mutex::new(HashMap::new()),
            in_flight_gauge: METRICS.balancing.in_flight.with_label_values(&[pool, member]),
            long_poll_gauge: METRICS.balancing.long_polls.with_label_values(&[pool, member]),
            last_minute: crate::observe::last_minute::LastMinute::default(),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Returns whether the state changed; coming back starts the slow start.
    pub fn set_healthy(&self, healthy: bool, now: u64) -> bool {
        let changed = self.healthy.swap(healthy, Ordering::Relaxed) != healthy;
        if changed && healthy {
            self.ramp_from.store(now, Ordering::Relaxed);
        }
        if changed && !healthy {
            self.went_out(now, OutReason::HealthCheck);
        }
        changed
    }

    /// Records when and why it left rotation (the first reason of a spell out stays).
    pub fn went_out(&self, now: u64, reason: OutReason) {
        self.out_since.store(now, Ordering::Relaxed);
        self.out_reason.store(reason as u8, Ordering::Relaxed);
    }

    /// When (monotonic ms) and why it last left rotation; `None` if never.
    pub fn last_out(&self) -> Option<(u64, &'static str)> {
        let since = self.out_since.load(Ordering::Relaxed);
        (since != 0).then(|| (since, OutReason::describe(self.out_reason.load(Ordering::Relaxed))))
    }

    pub fn admin(&self) -> Admin {
        Admin::from_u8(self.admin.load(Ordering::Relaxed))
    }

    /// Sets what the operator asked; back to ready starts the slow start.
    pub fn set_admin(&self, admin: Admin, now: u64) {
        let previous = Admin::from_u8(self.admin.swap(admin as u8, Ordering::Relaxed));
        if admin == Admin::Ready && previous != Admin::Ready {
            self.ramp_from.store(now, Ordering::Relaxed);
        }
    }

    /// Takes requests now: healthy, not ejected, not drained.
    pub fn is_usable(&self, now: u64) -> bool {
        self.is_healthy() && !self.is_ejected(now) && self.admin.load(Ordering::Relaxed) == Admin::Ready as u8
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    pub fn ejected_until(&self) -> u64 {
        self.ejected_until.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn long_polls(&self) -> u32 {
        self.long_polls.load(Ordering::Relaxed)
    }

    /// Its share of a full one, in thousandths, while it ramps up after
    /// coming back (never below 5 %, so it is tried at all).
    pub fn ramp_permille(&self, slow_start: Duration, now: u64) -> u64 {
        let from = self.ramp_from.load(Ordering::Relaxed);
        let span = millis(slow_start);
        if from == 0 || span == 0 || now >= from.saturating_add(span) {
            return 1000;
        }
        (now.saturating_sub(from) * 1000 / span).max(50)
    }

    /// Takes a slot: at most `cap` requests in flight (long-polls uncapped).
    pub fn try_take(&self, long_poll: bool, cap: Option<u32>) -> bool {
        if long_poll {
            self.long_polls.fetch_add(1, Ordering::Relaxed);
            self.long_poll_gauge.inc();
            return true;
        }
        let taken = match cap {
            None => {
                self.in_flight.fetch_add(1, Ordering::Relaxed);
                true
            }
            Some(cap) => {
                self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < cap).then_some(n + 1)).is_ok()
            }
        };
        if taken {
            self.in_flight_gauge.inc();
        }
        taken
    }

    pub fn give_back(&self, long_poll: bool) {
        if long_poll {
            self.long_polls.fetch_sub(1, Ordering::Relaxed);
            self.long_poll_gauge.dec();
        } else {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.in_flight_gauge.dec();
        }
    }

    /// A good answer: the failure streak and the ejection back-off end.
    /// (`answered` has already noted the answer itself.)
    pub fn succeeded(&self, now: u64) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 && !self.is_ejected(now) {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// An answer arrived (whatever its status): the member is not stalled.
    pub fn answered(&self, now: u64) {
        self.last_answer.store(now, Ordering::Relaxed);
    }

    /// One more failure in a row; returns how many.
    pub fn failed(&self) -> u32 {
        self.failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Takes the member out until `now + length(ejections in a row)`;
    /// it ramps up from then.
    pub fn eject(&self, now: u64, reason: OutReason, length: impl Fn(u32) -> Duration) -> Duration {
        self.went_out(now, reason);
        let ejections = self.ejections.fetch_add(1, Ordering::Relaxed);
        let length = length(ejections);
        let until = now.saturating_add(millis(length));
        self.ejected_until.store(until, Ordering::Relaxed);
        self.ramp_from.store(until, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        length
    }

    /// Records a request sent on `connection`; `rescue` when it may be sent
    /// again elsewhere. Returns the ticket that `settle` takes.
    pub fn sent(&self, now: u64, long_poll: Option<Duration>, connection: Option<Connection>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let due = now.saturating_add(long_poll.map_or(0, millis));
        if let Ok(mut outstanding) = self.outstanding.lock() {
            outstanding.insert(id, Outstanding { due, rescue: connection });
        }
        id
    }

    /// The request's answer came, or it ended.
    pub fn settle(&self, ticket: u64) {
        if let Ok(mut outstanding) = self.outstanding.lock() {
            outstanding.remove(&ticket);
        }
    }

    /// How long the member has kept silent while owing an answer: since the
    /// later of its last answer and its oldest due request. Zero when it owes nothing.
    pub fn silence(&self, now: u64) -> Duration {
        let Ok(outstanding) = self.outstanding.lock() else { return Duration::ZERO };
        let Some(oldest) = outstanding.values().map(|o| o.due).min() else { return Duration::ZERO };
        let since = oldest.max(self.last_answer.load(Ordering::Relaxed));
        Duration::from_millis(now.saturating_sub(since))
    }

    /// Starts a stall check unless one runs; `false` when one does.
    pub fn start_probe(&self) -> bool {
        !self.probing.swap(true, Ordering::AcqRel)
    }

    pub fn end_probe(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// Cuts the connections of requests waiting on this member that may be
    /// sent elsewhere: each fails as if the member had closed it, and the
    /// proxy sends it again. Returns how many. A connection is cut only if
    /// its descriptor still belongs to the same two addresses, so a
    /// descriptor number reused since is never touched.
    pub fn cut_rescuable(&self) -> usize {
        let Ok(mut outstanding) = self.outstanding.lock() else { return 0 };
        let mut cut = 0;
        outstanding.retain(|_, request| {
            let Some(connection) = request.rescue else { return true };
            if same_connection(&connection) {
                let _ = nix::sys::socket::shutdown(connection.fd, nix::sys::socket::Shutdown::Both);
                cut += 1;
            }
            false
        });
        cut
    }
}

fn same_connection(connection: &Connection) -> bool {
    use nix::sys::socket::{getpeername, getsockname, SockaddrStorage};
    let address = |storage: SockaddrStorage| -> Option<SocketAddr> {
        if let Some(v4) = storage.as_sockaddr_in() {
            return Some(SocketAddr::from(std::net::SocketAddrV4::from(*v4)));
        }
        storage.as_sockaddr_in6().map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
    };
    let local = getsockname::<SockaddrStorage>(connection.fd).ok().and_then(address);
    let peer = getpeername::<SockaddrStorage>(connection.fd).ok().and_then(address);
    local == Some(connection.local) && peer == Some(connection.peer)
}

/// A pool's queue and retry budget, shared across snapshots like its members.
pub struct PoolShared {
    /// Requests waiting for a slot.
    waiting: AtomicU32,
    /// Wakes the longest waiter when a slot frees (FIFO).
    slot_freed: tokio::sync::Notify,
    /// Retry tokens in tenths: each request adds 1, a retry takes 5 (a
    /// fifth of requests may be retried), capped so a burst after a quiet
    /// spell cannot spend more than 20 retries.
    retry_tokens: AtomicI64,
    pub queued_gauge: IntGauge,
}

const RETRY_COST: i64 = 5;
const RETRY_TOKENS_MAX: i64 = 100;

impl PoolShared {
    pub fn new(pool: &str) -> PoolShared {
        PoolShared {
            waiting: AtomicU32::new(0),
            slot_freed: tokio::sync::Notify::new(),
            retry_tokens: AtomicI64::new(RETRY_TOKENS_MAX),
            queued_gauge: METRICS.balancing.queued.with_label_values(&[pool]),
        }
    }

    pub fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Joins the queue unless `size` wait already.
    pub fn enqueue(&self, size: u32) -> bool {
        let joined =
            self.waiting.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < size).then_some(n + 1)).is_ok();
        if joined {
            self.queued_gauge.inc();
        }
        joined
    }

    pub fn dequeue(&self) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        self.queued_gauge.dec();
    }

    pub fn slot_freed(&self) -> &tokio::sync::Notify {
        &self.slot_freed
    }

    pub fn deposit_retry_token(&self) {
        if self.retry_tokens.load(Ordering::Relaxed) < RETRY_TOKENS_MAX {
            self.retry_tokens.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Spends a retry from the budget; `false` when it is empty.
    pub fn take_retry(&self) -> bool {
        self.retry_tokens
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n >= RETRY_COST).then_some(n - RETRY_COST))
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_holds_under_contention_and_long_polls_are_apart() {
        let member = std::sync::Arc::new(MemberState::new("test_cap", "m"));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let member = std::sync::Arc::clone(&member);
                std::thread::spawn(move || (0..1000).filter(|_| member.try_take(false, Some(5))).count())
            })
            .collect();
        let taken: usize = threads.into_iter().map(|t| t.join().unwrap_or_default()).sum();
        assert_eq!(taken, 5);
        assert_eq!(member.in_flight(), 5);
        assert!(member.try_take(true, Some(5)));
        assert_eq!((member.in_flight(), member.long_polls()), (5, 1));
        member.give_back(false);
        assert!(member.try_take(false, Some(5)));
    }

    #[test]
    fn ejections_grow_and_a_good_answer_after_one_resets_them() {
        let member = MemberState::new("test_eject", "m");
        let length = |n: u32| Duration::from_secs(10) * (1 << n.min(4));
        assert_eq!(member.failed(), 1);
        let failures = OutReason::Failures;
        assert_eq!(member.eject(1000, failures, length), Duration::from_secs(10));
        assert!(member.is_ejected(10_999) && !member.is_ejected(11_000));
        assert_eq!(member.eject(11_000, failures, length), Duration::from_secs(20));
        // Still out: a good answer (an old request finishing) keeps the back-off.
        member.succeeded(20_000);
        assert_eq!(member.eject(31_000, failures, length), Duration::from_secs(40));
        member.succeeded(80_000);
        assert_eq!(member.eject(80_000, failures, length), Duration::from_secs(10));
        assert_eq!(member.last_out(), Some((80_000, "failures in a row")));
    }

    #[test]
    fn slow_start_ramps_from_five_percent_to_all() {
        let member = MemberState::new("test_ramp", "m");
        let ten = Duration::from_secs(10);
        assert_eq!(member.ramp_permille(ten, 5000), 1000, "a member that never left is at full share");
        member.set_healthy(false, 1000);
        member.set_healthy(true, 2000);
        assert_eq!(member.ramp_permille(ten, 2000), 50);
        assert_eq!(member.ramp_permille(ten, 7000), 500);
        assert_eq!(member.ramp_permille(ten, 12_000), 1000);
        assert_eq!(member.ramp_permille(Duration::ZERO, 2001), 1000);
    }

    #[test]
    fn silence_counts_from_the_oldest_due_request_or_the_last_answer() {
        let member = MemberState::new("test_silence", "m");
        assert_eq!(member.silence(5000), Duration::ZERO);
        let a = member.sent(1000, None, None);
        let _poll = member.sent(1000, Some(Duration::from_secs(30)), None);
        assert_eq!(member.silence(4000), Duration::from_secs(3));
        member.answered(3500);
        assert_eq!(member.silence(4000), Duration::from_millis(500));
        member.settle(a);
        // Only the long-poll is left, not due before 31 s.
        assert_eq!(member.silence(4000), Duration::ZERO);
        assert_eq!(member.silence(33_000), Duration::from_secs(2));
    }

    #[test]
    fn the_retry_budget_allows_a_fifth_of_requests() {
        let pool = PoolShared::new("test_budget");
        let initial = (0..100).filter(|_| pool.take_retry()).count();
        assert_eq!(initial, 20);
        for _ in 0..50 {
            pool.deposit_retry_token();
        }
        assert_eq!((0..100).filter(|_| pool.take_retry()).count(), 10);
    }

    #[test]
    fn the_queue_is_bounded() {
        let pool = PoolShared::new("test_queue");
        assert!(pool.enqueue(2) && pool.enqueue(2));
        assert!(!pool.enqueue(2));
        pool.dequeue();
        assert!(pool.enqueue(2));
        assert_eq!(pool.waiting(), 2);
    }
}
