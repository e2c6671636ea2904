//! What outlives a snapshot, made once at start and shared by every
//! service and listener: the federation key cache and its latest
//! refusals, each origin's turns at Synapse, the operator states shared
//! with other edges, the probes' readiness, the requests held, the last
//! reload's outcome. A reload
//! builds a new `Edge`; none of this is rebuilt or handed over.
//!
//! (Members' health and load, pool queues and rate limiters still travel
//! from snapshot to snapshot in `services::install`; they move here next.)

use crate::federation::keys::KeyCache;
use crate::federation::recent::RecentRefusals;
use crate::observe::probes::Probes;
use crate::request::hold::Held;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// The last reload's outcome, for the status page.
#[derive(Debug, Clone)]
pub struct ReloadOutcome {
    /// Unix seconds.
    pub at: i64,
    pub error: Option<String>,
}

#[derive(Default)]
pub struct Runtime {
    /// Origins' signing keys, fetched once per server.
    pub federation_keys: Arc<KeyCache>,
    /// The gate's latest refusals.
    pub federation_refusals: RecentRefusals,
    /// Listening, draining: what `/readyz` answers.
    pub probes: Probes,
    /// Requests waiting for their upstream to accept connections again.
    pub held: Arc<Held>,
    /// Each federation origin's requests at Synapse, and its queue.
    pub federation_turns: Arc<crate::federation::turns::Turns>,
    /// Operators' states shared with the other edges (`cluster`).
    pub shared_admin: crate::upstream::shared_admin::SharedAdmin,
    /// Wakes the health checks for a round now (another edge saw a member fail).
    pub health_now: tokio::sync::Notify,
    /// The media cache's storage, made by the first snapshot that asks for it.
    media_store: once_cell::sync::OnceCell<MediaStore>,
    last_reload: Mutex<Option<ReloadOutcome>>,
}

/// Where Pingora's cache keeps media: made once and never freed (Pingora
/// takes its storage, eviction and lock as `'static`).
#[derive(Clone, Copy)]
pub struct MediaStore {
    pub storage: &'static pingora_cache::MemCache,
    pub eviction: &'static pingora_cache::eviction::simple_lru::Manager,
    pub lock: &'static pingora_cache::lock::CacheKeyLockImpl,
}

impl Runtime {
    /// The media store, sized by the first snapshot with a media cache.
    pub fn media_store(&self, memory: usize) -> MediaStore {
        *self.media_store.get_or_init(|| MediaStore {
            storage: Box::leak(Box::new(pingora_cache::MemCache::new())),
            eviction: Box::leak(Box::new(pingora_cache::eviction::simple_lru::Manager::new(memory))),
            // Concurrent misses for one file: one fetch, the rest wait for it.
            lock: Box::leak(pingora_cache::lock::CacheLock::new_boxed(std::time::Duration::from_secs(10))),
        })
    }

    pub fn record_reload(&self, error: Option<String>) {
        let at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let mut last = self.last_reload.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *last = Some(ReloadOutcome { at, error });
    }

    pub fn last_reload(&self) -> Option<ReloadOutcome> {
        self.last_reload.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}
