//! Federation shared fairly: each origin's requests at Synapse are capped
//! (by cost, `synapse::federation_cost`), what is over waits in the
//! origin's own bounded FIFO queue, and when room frees the waiting
//! origins are served in turn (deficit round robin by cost), so one busy
//! server cannot take every other server's turn.
//!
//! Queueing comes before refusing: Synapse's federation client puts a
//! destination that answers 429 in backoff for ten minutes or more, so only
//! what overflows an origin's queue, or waits past its timeout, is refused.
//!
//! The state outlives reloads (it lives in the runtime); the settings come
//! with each request from its snapshot.

use crate::observe::metrics::METRICS;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// `federation.per_origin`, as a snapshot holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurnSettings {
    /// Cost units one origin may have at Synapse; a request larger than
    /// this still goes alone.
    pub max_in_flight: u32,
    /// Cost units all origins together may have at Synapse; 0: no total.
    pub total_in_flight: u32,
    /// Requests one origin may have waiting.
    pub queue: usize,
    pub queue_timeout: Duration,
    pub weights: crate::synapse::federation_cost::Weights,
}

/// Why a request got no turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnRefusal {
    /// The origin's queue was full.
    QueueFull,
    /// It waited the whole `queue_timeout`.
    QueueTimeout,
}

/// How many origins are kept when idle (for their refusal counts on the
/// status page) before idle ones are forgotten.
const KEPT_ORIGINS: usize = 4096;

#[derive(Default)]
pub struct Turns {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    origins: HashMap<Arc<str>, Origin>,
    /// Origins with someone waiting, in the order they are served.
    ring: VecDeque<Arc<str>>,
    total: u32,
    settings: Option<TurnSettings>,
    next_waiter: u64,
}

#[derive(Default)]
struct Origin {
    /// Cost units at Synapse.
    in_flight: u32,
    requests: u32,
    queue: VecDeque<Waiter>,
    deficit: u32,
    in_ring: bool,
    refused: u64,
}

impl Origin {
    fn charge(&mut self, cost: u32) {
        self.in_flight += cost;
        self.requests += 1;
    }
}

struct Waiter {
    id: u64,
    cost: u32,
    grant: oneshot::Sender<Turn>,
}

/// A request's place at Synapse; dropping it lets the next waiter in.
pub struct Turn {
    turns: Arc<Turns>,
    origin: Arc<str>,
    cost: u32,
    armed: bool,
}

impl std::fmt::Debug for Turn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Turn({} for {})", self.cost, self.origin)
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if self.armed {
            let mut state = self.turns.lock();
            state.release(&self.origin, self.cost);
            state.dispatch(&self.turns);
        }
    }
}

/// One origin's row on the status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginLoad {
    pub origin: String,
    pub in_flight: u32,
    pub queued: usize,
    pub refused: u64,
}

impl State {
    fn fits(&self, origin: &Origin, cost: u32, settings: &TurnSettings) -> bool {
        let per_origin = origin.in_flight == 0 || origin.in_flight + cost <= settings.max_in_flight;
        let total = settings.total_in_flight == 0 || self.total == 0 || self.total + cost <= settings.total_in_flight;
        per_origin && total
    }

    fn charge(&mut self, name: &Arc<str>, cost: u32) {
        self.total += cost;
        if let Some(origin) = self.origins.get_mut(name) {
            origin.charge(cost);
        }
    }

    fn release(&mut self, name: &str, cost: u32) {
        self.total = self.total.saturating_sub(cost);
        if let Some(origin) = self.origins.get_mut(name) {
            origin.in_flight = origin.in_flight.saturating_sub(cost);
            origin.requests = origin.requests.saturating_sub(1);
        }
    }

    /// Hands freed room to waiting origins in turn: each visit adds one
    /// unit to an origin's deficit, and its first waiter goes once the
    /// deficit covers its cost and the caps allow it; an origin served goes
    /// to the back of the ring, the others keep their places. Stops when no
    /// waiter fits the caps.
    fn dispatch(&mut self, turns: &Arc<Turns>) {
        let Some(settings) = self.settings else { return };
        loop {
            let mut moved = false;
            let (mut kept, mut served) = (VecDeque::new(), VecDeque::new());
            while let Some(name) = self.ring.pop_front() {
                let Some(mut origin) = self.origins.remove(&name) else { continue };
                origin.queue.retain(|waiter| !waiter.grant.is_closed());
                let mut granted = false;
                if let Some(cost) = origin.queue.front().map(|waiter| waiter.cost) {
                    if self.fits(&origin, cost, &settings) {
                        moved = true;
                        origin.deficit += 1;
                        if origin.deficit >= cost {
                            origin.deficit -= cost;
                            if let Some(waiter) = origin.queue.pop_front() {
                                self.grant(&mut origin, &name, waiter, turns);
                                granted = true;
                            }
                        }
                    }
                }
                origin.in_ring = !origin.queue.is_empty();
                match (origin.in_ring, granted) {
                    (true, true) => served.push_back(Arc::clone(&name)),
                    (true, false) => kept.push_back(Arc::clone(&name)),
                    (false, _) => origin.deficit = 0,
                }
                self.origins.insert(name, origin);
            }
            kept.append(&mut served);
            self.ring = kept;
            if !moved {
                break;
            }
        }
    }

    fn grant(&mut self, origin: &mut Origin, name: &Arc<str>, waiter: Waiter, turns: &Arc<Turns>) {
        let turn = Turn { turns: Arc::clone(turns), origin: Arc::clone(name), cost: waiter.cost, armed: true };
        match waiter.grant.send(turn) {
            Ok(()) => {
                self.total += waiter.cost;
                origin.charge(waiter.cost);
            }
            // The waiter left just now: the turn was never charged.
            Err(mut turn) => turn.armed = false,
        }
    }

    fn forget_idle(&mut self) {
        if self.origins.len() > KEPT_ORIGINS {
            self.origins.retain(|_, origin| origin.in_flight > 0 || !origin.queue.is_empty());
        }
    }
}

/// Whose share a request counts in: the verified origin; else (the gate
/// off, observing, or unable to verify) the origin it claims together with
/// the address it came from, so a forger spends only its own share.
pub fn share_of(verified: Option<&str>, authorization: Option<&[u8]>, client: Option<std::net::IpAddr>) -> String {
    if let Some(origin) = verified {
        return origin.to_string();
    }
    let claimed = authorization.and_then(|value| crate::federation::header::parse(value).ok()).map(|x| x.origin);
    let address = client.map(|ip| ip.to_string()).unwrap_or_default();
    format!("{} from {address}", claimed.as_deref().unwrap_or("(unsigned)"))
}

impl Turns {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A turn at Synapse for a request of `origin` costing `cost`, at once
    /// when the caps allow and nobody of that origin waits, else after the
    /// origin's earlier requests and in turn with other origins.
    pub async fn take(self: &Arc<Self>, origin: &str, cost: u32, settings: &TurnSettings) -> Result<Turn, TurnRefusal> {
        let cost = cost.max(1);
        let (id, mut granted) = {
            let mut state = self.lock();
            state.settings = Some(*settings);
            state.forget_idle();
            let name: Arc<str> = match state.origins.get_key_value(origin) {
                Some((name, _)) => Arc::clone(name),
                None => Arc::from(origin),
            };
            let entry = state.origins.entry(Arc::clone(&name)).or_default();
            entry.queue.retain(|waiter| !waiter.grant.is_closed());
            let waiting = entry.queue.len();
            let fits = waiting == 0 && {
                let entry = &state.origins[&name];
                state.fits(entry, cost, settings)
            };
            if fits {
                state.charge(&name, cost);
                return Ok(Turn { turns: Arc::clone(self), origin: name, cost, armed: true });
            }
            if waiting >= settings.queue {
                if let Some(entry) = state.origins.get_mut(&name) {
                    entry.refused += 1;
                }
                return Err(TurnRefusal::QueueFull);
            }
            let (grant, granted) = oneshot::channel();
            state.next_waiter += 1;
            let id = state.next_waiter;
            if let Some(entry) = state.origins.get_mut(&name) {
                entry.queue.push_back(Waiter { id, cost, grant });
                if !entry.in_ring {
                    entry.in_ring = true;
                    state.ring.push_back(Arc::clone(&name));
                }
            }
            (id, granted)
        };
        let waiting = crate::observe::metrics::GaugeGuard::new(&METRICS.federation.origin_queued);
        let queued = Instant::now();
        let outcome = match tokio::time::timeout(settings.queue_timeout, &mut granted).await {
            Ok(Ok(turn)) => Ok(turn),
            // The sender went with its origin's entry: wait no longer.
            Ok(Err(_)) => Err(TurnRefusal::QueueTimeout),
            Err(_) => {
                let mut state = self.lock();
                let left = state.origins.get_mut(origin).is_some_and(|entry| {
                    let before = entry.queue.len();
                    entry.queue.retain(|waiter| waiter.id != id);
                    let left = entry.queue.len() < before;
                    if left {
                        entry.refused += 1;
                    }
                    left
                });
                // A turn dropped below takes the lock to give itself back.
                drop(state);
                // Not in the queue any more: granted while the timer fired.
                match (left, granted.try_recv()) {
                    (false, Ok(turn)) => Ok(turn),
                    _ => Err(TurnRefusal::QueueTimeout),
                }
            }
        };
        drop(waiting);
        if outcome.is_ok() {
            METRICS.federation.origin_queue_wait.observe(queued.elapsed().as_secs_f64());
        }
        outcome
    }

    /// The `count` origins with the most at Synapse, then waiting, then refused.
    pub fn busiest(&self, count: usize) -> Vec<OriginLoad> {
        let state = self.lock();
        let mut loads: Vec<OriginLoad> = state
            .origins
            .iter()
            .filter(|(_, origin)| origin.requests > 0 || !origin.queue.is_empty() || origin.refused > 0)
            .map(|(name, origin)| OriginLoad {
                origin: name.to_string(),
                in_flight: origin.requests,
                queued: origin.queue.len(),
                refused: origin.refused,
            })
            .collect();
        loads.sort_by(|a, b| {
            (b.in_flight, b.queued, b.refused, &a.origin).cmp(&(a.in_flight, a.queued, a.refused, &b.origin))
        });
        loads.truncate(count);
        loads
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synapse::federation_cost::Weights;

    fn settings(max_in_flight: u32, total_in_flight: u32, queue: usize) -> TurnSettings {
        TurnSettings {
            max_in_flight,
            total_in_flight,
            queue,
            queue_timeout: Duration::from_secs(5),
            weights: Weights::default(),
        }
    }

    /// Starts a waiting `take` and returns its handle once it is queued.
    async fn queued(
        turns: &Arc<Turns>,
        origin: &'static str,
        cost: u32,
        settings: TurnSettings,
    ) -> tokio::task::JoinHandle<Result<Turn, TurnRefusal>> {
        let before = turns.busiest(100).iter().map(|load| load.queued).sum::<usize>();
        let handle = tokio::spawn({
            let turns = Arc::clone(turns);
            async move { turns.take(origin, cost, &settings).await }
        });
        while turns.busiest(100).iter().map(|load| load.queued).sum::<usize>() == before {
            tokio::task::yield_now().await;
        }
        handle
    }

    #[test]
    fn a_share_is_the_verified_origin_or_a_claim_with_its_address() {
        let ip = Some(std::net::IpAddr::from([192, 0, 2, 7]));
        let header = br#"X-Matrix origin="a.example",key="ed25519:k",sig="s""#;
        assert_eq!(share_of(Some("a.example"), Some(header), ip), "a.example");
        assert_eq!(share_of(None, Some(header), ip), "a.example from 192.0.2.7");
        assert_eq!(share_of(None, Some(b"Bearer x"), ip), "(unsigned) from 192.0.2.7");
        assert_eq!(share_of(None, None, None), "(unsigned) from ");
    }

    #[tokio::test]
    async fn an_origin_is_capped_and_its_waiters_go_in_order() {
        let turns = Arc::new(Turns::default());
        let s = settings(2, 0, 10);
        let first = turns.take("noisy", 1, &s).await.unwrap();
        let _second = turns.take("noisy", 1, &s).await.unwrap();
        let third = queued(&turns, "noisy", 1, s).await;
        let fourth = queued(&turns, "noisy", 1, s).await;
        // Another origin is not held up by noisy's cap.
        let quiet = turns.take("quiet", 1, &s).await.unwrap();
        assert_eq!(turns.busiest(1)[0], OriginLoad { origin: "noisy".into(), in_flight: 2, queued: 2, refused: 0 });
        drop(first);
        let third = third.await.unwrap().unwrap();
        assert!(!fourth.is_finished());
        drop(third);
        fourth.await.unwrap().unwrap();
        drop(quiet);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_counts() {
        let turns = Arc::new(Turns::default());
        let s = settings(1, 0, 1);
        let _held = turns.take("noisy", 1, &s).await.unwrap();
        let _waiting = queued(&turns, "noisy", 1, s).await;
        assert_eq!(turns.take("noisy", 1, &s).await.unwrap_err(), TurnRefusal::QueueFull);
        assert_eq!(turns.busiest(1)[0].refused, 1);
    }

    #[tokio::test]
    async fn a_waiter_past_its_timeout_is_refused_and_leaves_no_trace() {
        let turns = Arc::new(Turns::default());
        let s = TurnSettings { queue_timeout: Duration::from_millis(50), ..settings(1, 0, 4) };
        let held = turns.take("noisy", 1, &s).await.unwrap();
        assert_eq!(turns.take("noisy", 1, &s).await.unwrap_err(), TurnRefusal::QueueTimeout);
        assert_eq!(turns.busiest(1)[0].queued, 0);
        drop(held);
        // The timed-out waiter took nothing with it.
        let _again = turns.take("noisy", 1, &s).await.unwrap();
        assert_eq!(turns.busiest(1)[0].in_flight, 1);
    }

    #[tokio::test]
    async fn under_a_total_waiting_origins_are_served_in_turn() {
        let turns = Arc::new(Turns::default());
        let s = settings(10, 2, 10);
        let mut held = vec![turns.take("noisy", 1, &s).await.unwrap(), turns.take("noisy", 1, &s).await.unwrap()];
        let mut noisy = Vec::new();
        for _ in 0..4 {
            noisy.push(queued(&turns, "noisy", 1, s).await);
        }
        let quiet = queued(&turns, "quiet", 1, s).await;
        // noisy queued first, but the first freed room goes to each origin in turn.
        drop(held.remove(0));
        let first = noisy.remove(0).await.unwrap().unwrap();
        drop(held.remove(0));
        let quiet = quiet.await.unwrap().unwrap();
        assert!(noisy.iter().all(|waiter| !waiter.is_finished()));
        drop((first, quiet));
        for waiter in noisy {
            drop(waiter.await.unwrap().unwrap());
        }
        assert!(turns.busiest(1).is_empty(), "nothing left in flight or waiting");
    }

    #[tokio::test]
    async fn an_expensive_request_waits_for_its_deficit_while_cheap_ones_pass() {
        let turns = Arc::new(Turns::default());
        let s = settings(8, 4, 10);
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(turns.take("busy", 1, &s).await.unwrap());
        }
        let backfill = queued(&turns, "history", 4, s).await;
        let send = queued(&turns, "chatty", 1, s).await;
        let mut held = held.into_iter();
        drop(held.next());
        // One unit free: the small send goes, the backfill (4) cannot yet.
        let send = send.await.unwrap().unwrap();
        assert!(!backfill.is_finished());
        drop((send, held));
        let backfill = backfill.await.unwrap().unwrap();
        assert_eq!(backfill.cost, 4);
    }

    #[tokio::test]
    async fn a_request_above_the_cap_still_goes_alone() {
        let turns = Arc::new(Turns::default());
        let s = settings(2, 3, 10);
        let join = turns.take("joiner", 8, &s).await.unwrap();
        assert_eq!(turns.busiest(1)[0].in_flight, 1);
        let other = queued(&turns, "other", 1, s).await;
        drop(join);
        other.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_is_skipped() {
        let turns = Arc::new(Turns::default());
        let s = settings(1, 0, 10);
        let held = turns.take("noisy", 1, &s).await.unwrap();
        let gone = queued(&turns, "noisy", 1, s).await;
        let next = queued(&turns, "noisy", 1, s).await;
        gone.abort();
        let _ = gone.await;
        drop(held);
        let next = next.await.unwrap().unwrap();
        assert_eq!(turns.busiest(1)[0].in_flight, 1);
        drop(next);
        assert!(turns.busiest(1).is_empty(), "nothing left in flight or waiting");
    }
}
