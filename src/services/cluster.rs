//! Several edges as one: operators' drains, maintenance and ready, typed
//! on any edge, written to the Redis in `cluster` and read back by every
//! edge within a second (`upstream::shared_admin` has the records).
//!
//! Each edge asks Redis every 250 ms for a counter that every write bumps,
//! and reads the records again when it moved (and every 10 s regardless).
//! A counter read each tick rather than a notification: an edge that was
//! cut off from Redis would have missed notifications and must read the
//! records again anyway, and one small read per tick is cheap. An edge
//! started later reads the records at its first tick. While Redis cannot
//! be reached, every edge keeps what it last knew (a drain stays a drain),
//! says so (log line, `matrix_edge_cluster_redis_up`, status page) and
//! writes what was typed meanwhile once Redis is back.

use crate::edge::Edge;
use crate::observe::metrics::METRICS;
use crate::runtime::Runtime;
use crate::services::control::pools;
use crate::upstream::shared_admin::{decode_all, fleet, Beat, Record};
use crate::upstream::state::Admin;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

const TICK: Duration = Duration::from_millis(250);
/// Records read again even when the counter did not move.
const FULL_READ: Duration = Duration::from_secs(10);
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

pub struct ClusterService {
    pub edge: Arc<ArcSwap<Edge>>,
    pub runtime: Arc<Runtime>,
}

/// The keys of one cluster.
struct Keys {
    prefix: String,
    records: String,
    version: String,
    edges: String,
    hints: String,
    hints_version: String,
}

impl Keys {
    fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
            records: format!("{prefix}:admin"),
            version: format!("{prefix}:admin:version"),
            edges: format!("{prefix}:edges"),
            hints: format!("{prefix}:hints"),
            hints_version: format!("{prefix}:hints:version"),
        }
    }
}

/// A member seen failing by one edge: the others check it at once (each
/// still decides by its own probe).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Hint {
    edge: String,
    /// `down` (a failed check or connection) or `ejected` (failures, a stall).
    reason: String,
    /// Unix milliseconds.
    at: i64,
}

/// A hint older than this is not acted on (an edge starting reads old ones).
const HINT_FRESH_MS: i64 = 10_000;

/// What this edge knows of members' health, from one tick to the next.
#[derive(Default)]
struct Hints {
    /// Whether each member was usable (healthy, not ejected) last tick.
    usable: std::collections::HashMap<String, bool>,
    /// Members that went out here, to publish.
    outgoing: Vec<(String, &'static str)>,
    /// The newest hint acted on, by member.
    seen: std::collections::HashMap<String, i64>,
    version: Option<i64>,
}

impl Hints {
    /// Notes the members that stopped being usable since the last tick.
    fn observe(&mut self, edge: &Edge) {
        let now = crate::upstream::state::now_ms();
        for (_, pool) in pools(edge) {
            for member in &pool.members {
                let (healthy, ejected) = (member.state.is_healthy(), member.state.is_ejected(now));
                let usable = healthy && !ejected;
                let before = self.usable.insert(member.label.clone(), usable);
                if before == Some(true) && !usable {
                    let reason = if healthy { "ejected" } else { "down" };
                    self.outgoing.push((member.label.clone(), reason));
                }
            }
        }
    }
}

/// Publishes what went out here; reads what went out elsewhere, and wakes
/// the health checks when another edge saw a member fail that this edge
/// still uses.
async fn share_hints(
    link: &mut Link,
    keys: &Keys,
    name: &str,
    hints: &mut Hints,
    runtime: &Runtime,
) -> Result<(), String> {
    let mut connection = link.connection().await?;
    if !hints.outgoing.is_empty() {
        let mut write = redis::pipe();
        write.atomic();
        for (address, reason) in &hints.outgoing {
            let hint = Hint { edge: name.to_string(), reason: (*reason).to_string(), at: unix_now_ms() };
            write.hset(&keys.hints, address, serde_json::to_string(&hint).unwrap_or_default()).ignore();
        }
        write.incr(&keys.hints_version, 1).ignore();
        timed(write.query_async::<()>(&mut connection)).await?;
        hints.outgoing.clear();
    }
    let version: Option<i64> = timed(redis::cmd("GET").arg(&keys.hints_version).query_async(&mut connection)).await?;
    if version == hints.version {
        return Ok(());
    }
    let fields: BTreeMap<String, String> =
        timed(redis::cmd("HGETALL").arg(&keys.hints).query_async(&mut connection)).await?;
    hints.version = version;
    let now = unix_now_ms();
    let mut wake = false;
    for (address, text) in fields {
        let Ok(hint) = serde_json::from_str::<Hint>(&text) else { continue };
        if hint.edge == name || hints.seen.get(&address).is_some_and(|seen| *seen >= hint.at) {
            continue;
        }
        hints.seen.insert(address.clone(), hint.at);
        if now - hint.at <= HINT_FRESH_MS && hints.usable.get(&address) == Some(&true) {
            log::warn!("cluster: edge {} saw {address} {}; checking it now", hint.edge, hint.reason);
            wake = true;
        }
    }
    if wake {
        runtime.health_now.notify_one();
    }
    Ok(())
}

/// Heartbeats go out every this many ticks (a second).
const BEAT_EVERY: u64 = 4;

/// The first 12 hex digits of the SHA-256 of a config, without what each
/// edge may set for itself (its listeners, metrics address and cluster
/// name): equal on edges that route and limit alike, whatever their
/// comments, key order within a line or addresses.
pub fn config_digest(text: &str) -> String {
    let shared = match serde_yaml::from_str::<serde_yaml::Value>(text) {
        Ok(mut config) => {
            if let Some(map) = config.as_mapping_mut() {
                map.remove("listeners");
                map.remove("metrics");
                if let Some(cluster) = map.get_mut("cluster").and_then(serde_yaml::Value::as_mapping_mut) {
                    cluster.remove("name");
                }
            }
            serde_yaml::to_string(&config).unwrap_or_else(|_| text.to_string())
        }
        Err(_) => text.to_string(),
    };
    openssl::sha::sha256(shared.as_bytes()).iter().take(6).map(|byte| format!("{byte:02x}")).collect()
}

fn beat(edge: &Edge, runtime: &Runtime, name: &str, digest: &str, started: i64) -> Beat {
    let reload = runtime.last_reload();
    let mut members = Vec::new();
    let mut held = BTreeMap::new();
    for (_, pool) in pools(edge) {
        for member in &pool.members {
            members.push(member.label.clone());
            if member.state.admin() != Admin::Ready {
                *held.entry(member.label.clone()).or_insert(0) += member.state.in_flight() + member.state.long_polls();
            }
        }
    }
    Beat {
        name: name.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        config: digest.to_string(),
        listeners: edge.ops.listeners.iter().map(|listener| listener.address.to_string()).collect(),
        started,
        reloaded: reload.as_ref().map(|reload| reload.at),
        reload_error: reload.and_then(|reload| reload.error),
        at: unix_now_ms(),
        members,
        held,
    }
}

fn unix_now_ms() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Writes this edge's heartbeat and reads everyone's.
async fn heartbeat(link: &mut Link, keys: &Keys, beat: &Beat, runtime: &Runtime) -> Result<(), String> {
    let mut connection = link.connection().await?;
    let text = serde_json::to_string(beat).map_err(|e| e.to_string())?;
    timed(redis::cmd("HSET").arg(&keys.edges).arg(&beat.name).arg(text).query_async::<()>(&mut connection)).await?;
    let fields: BTreeMap<String, String> =
        timed(redis::cmd("HGETALL").arg(&keys.edges).query_async(&mut connection)).await?;
    let (rows, forget) = fleet(&fields, &beat.config, unix_now_ms());
    if !forget.is_empty() {
        timed(redis::cmd("HDEL").arg(&keys.edges).arg(&forget).query_async::<()>(&mut connection)).await?;
    }
    runtime.shared_admin.update_view(|view| view.fleet = rows);
    Ok(())
}

/// This edge's name in the cluster: the configured one, else the host name.
pub fn edge_name(configured: Option<&str>) -> String {
    configured.map(str::to_string).unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .ok()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "edge".into())
    })
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// One connection to the cluster's Redis, made again after a failure.
struct Link {
    url: String,
    connection: Option<redis::aio::MultiplexedConnection>,
    version: Option<i64>,
    read_at: Option<Instant>,
}

impl Link {
    async fn connection(&mut self) -> Result<redis::aio::MultiplexedConnection, String> {
        if let Some(connection) = &self.connection {
            return Ok(connection.clone());
        }
        let client = redis::Client::open(self.url.as_str()).map_err(|e| e.to_string())?;
        let connection = tokio::time::timeout(REDIS_TIMEOUT, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| format!("no connection within {REDIS_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        self.connection = Some(connection.clone());
        Ok(connection)
    }
}

async fn timed<T>(work: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, String> {
    match tokio::time::timeout(REDIS_TIMEOUT, work).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {REDIS_TIMEOUT:?}")),
    }
}

/// Writes this edge's pending changes, then reads the records if they
/// moved; returns the records read, if any.
async fn exchange(
    link: &mut Link,
    keys: &Keys,
    name: &str,
    runtime: &Runtime,
) -> Result<Option<BTreeMap<String, String>>, String> {
    let mut connection = link.connection().await?;
    let pending = runtime.shared_admin.take_pending();
    if !pending.is_empty() {
        let mut write = redis::pipe();
        write.atomic();
        for (address, admin) in &pending {
            match Record::new(*admin, name, unix_now()) {
                Some(record) => write.hset(&keys.records, address, record.encode()).ignore(),
                None => write.hdel(&keys.records, address).ignore(),
            };
        }
        write.incr(&keys.version, 1).ignore();
        if let Err(e) = timed(write.query_async::<()>(&mut connection)).await {
            runtime.shared_admin.requeue(pending);
            return Err(e);
        }
    }
    let version: Option<i64> = timed(redis::cmd("GET").arg(&keys.version).query_async(&mut connection)).await?;
    let stale = link.read_at.is_none_or(|at| at.elapsed() >= FULL_READ);
    if version == link.version && !stale {
        return Ok(None);
    }
    let records: BTreeMap<String, String> =
        timed(redis::cmd("HGETALL").arg(&keys.records).query_async(&mut connection)).await?;
    link.version = version;
    link.read_at = Some(Instant::now());
    Ok(Some(records))
}

/// Makes every member's operator state what the records say (absent:
/// ready), unless a change typed here is still waiting to be written.
fn apply(edge: &Edge, runtime: &Runtime, fields: &BTreeMap<String, String>) {
    let (records, skipped) = decode_all(fields);
    let mut known = std::collections::BTreeSet::new();
    let waiting = runtime.shared_admin.has_pending();
    for (_, pool) in pools(edge) {
        for member in &pool.members {
            known.insert(member.label.clone());
            if waiting {
                continue;
            }
            // An unreadable record (garbage, a newer state) leaves its member as it is.
            if skipped.iter().any(|(address, _)| *address == member.label) {
                continue;
            }
            let wanted = records.get(&member.label).map_or(Admin::Ready, |(admin, _)| *admin);
            if member.state.admin() != wanted {
                pool.set_admin(&member.label, wanted);
            }
        }
    }
    let skipped: Vec<String> = skipped.iter().map(|(address, why)| format!("{address}: {why}")).collect();
    let before = runtime.shared_admin.view();
    for reason in skipped.iter().filter(|reason| !before.skipped.contains(reason)) {
        log::warn!("cluster: a record in Redis was skipped: {reason}");
    }
    let (applied, unknown): (Vec<_>, Vec<_>) = records
        .into_iter()
        .map(|(address, (_, record))| (address, record))
        .partition(|(address, _)| known.contains(address));
    runtime.shared_admin.update_view(|view| {
        view.applied = applied;
        view.unknown = unknown;
        view.skipped = skipped;
    });
}

fn set_reachable(runtime: &Runtime, result: Result<(), String>) {
    let reachable = result.is_ok();
    let before = runtime.shared_admin.view();
    match (&result, before.reachable) {
        (Err(e), Some(true) | None) => {
            log::warn!("cluster: Redis unreachable ({e}); keeping the operator states last read, retrying")
        }
        (Ok(()), Some(false)) => log::warn!("cluster: Redis reachable again; operator states shared again"),
        _ => {}
    }
    METRICS.operations.cluster_redis_up.set(i64::from(reachable));
    runtime.shared_admin.update_view(|view| {
        view.reachable = Some(reachable);
        view.last_error = result.err();
    });
}

#[async_trait]
impl BackgroundService for ClusterService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut link: Option<(Link, Keys)> = None;
        let mut snapshot = 0usize;
        let mut identity = (String::new(), String::new());
        let started = unix_now();
        let mut tick = 0u64;
        let mut hints = Hints::default();
        loop {
            tick += 1;
            let edge = self.edge.load_full();
            if let Some(cluster) = &edge.ops.config.cluster {
                let same = link
                    .as_ref()
                    .is_some_and(|(link, keys)| link.url == cluster.redis && keys.prefix == cluster.prefix);
                if !same {
                    let fresh = Link { url: cluster.redis.clone(), connection: None, version: None, read_at: None };
                    link = Some((fresh, Keys::new(&cluster.prefix)));
                }
                if let Some((link, keys)) = link.as_mut() {
                    // A reload may have brought members the records name: read
                    // them again; and this edge's name and config digest may
                    // have changed (worked out once per snapshot, not per tick).
                    let current = Arc::as_ptr(&edge) as usize;
                    if current != snapshot {
                        link.read_at = None;
                        snapshot = current;
                        identity = (edge_name(cluster.name.as_deref()), config_digest(&edge.ops.source.text));
                    }
                    let (name, digest) = &identity;
                    let mut outcome = exchange(link, keys, name, &self.runtime).await;
                    if let Ok(Some(records)) = &outcome {
                        apply(&edge, &self.runtime, records);
                    }
                    hints.observe(&edge);
                    if outcome.is_ok() {
                        outcome = share_hints(link, keys, name, &mut hints, &self.runtime).await.map(|()| None);
                    }
                    if outcome.is_ok() && tick % BEAT_EVERY == 1 {
                        let beat = beat(&edge, &self.runtime, name, digest, started);
                        outcome = heartbeat(link, keys, &beat, &self.runtime).await.map(|()| None);
                    }
                    if outcome.is_err() {
                        link.connection = None;
                    }
                    set_reachable(&self.runtime, outcome.map(|_| ()));
                }
            } else {
                link = None;
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::config_digest;

    #[test]
    fn the_digest_ignores_what_each_edge_sets_for_itself() {
        let a = "server_name: x\nlisteners: [{ address: '10.0.0.1:443' }]\ncluster: { redis: r, name: a }\n";
        let b = "# edge b\nserver_name: x\nlisteners: [{ address: '10.0.0.2:443' }]\ncluster: { redis: r, name: b }\n";
        let c = "server_name: y\nlisteners: [{ address: '10.0.0.1:443' }]\ncluster: { redis: r, name: a }\n";
        assert_eq!(config_digest(a), config_digest(b));
        assert_ne!(config_digest(a), config_digest(c));
        assert_eq!(config_digest(a).len(), 12);
    }
}
