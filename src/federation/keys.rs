//! Origins' signing keys: fetched from the origin (server discovery, then
//! `/_matrix/key/v2/server`, self-signed) or, if configured and the origin
//! cannot be reached, from a notary whose key is pinned; kept until the
//! lesser of `valid_until_ts` and seven days after the fetch.
//!
//! The cache outlives reloads; the way keys are fetched (CA, `connect_to`,
//! notaries) belongs to the running configuration and is passed in.
//!
//! What a flood of forged requests can make it do is bounded: one fetch in
//! flight per server; a failure is remembered and the server not asked
//! again for a back-off growing from one minute to an hour; a key id the
//! server did not list is not asked for again within ten seconds of the last
//! fetch; at most `MAX_FETCHES` fetches at once in all; at most
//! `MAX_SERVERS` servers remembered, those without keys dropped first.

use crate::federation::discover;
use crate::federation::fetch::Client;
use crate::federation::signing::{self, public_key, KeyRefusal, PublicKey, ServerKeys};
use crate::federation::{bad_answer, bad_keys, FederationError};
use crate::observe::metrics::METRICS;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A fetch (discovery and all) that takes longer is abandoned.
pub const FETCH_DEADLINE: Duration = Duration::from_millis(2500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_KEY_LIFETIME_MS: u64 = 7 * 24 * 3600 * 1000;
const FIRST_BACKOFF_MS: u64 = 60_000;
const LAST_BACKOFF_MS: u64 = 3_600_000;
const UNKNOWN_KEY_REFETCH_MS: u64 = 10_000;
const MAX_FETCHES: usize = 64;
const MAX_SERVERS: usize = 50_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A notary (`trusted_key_servers`) and its pinned keys.
pub struct Notary {
    pub server_name: String,
    pub keys: Vec<(String, PublicKey)>,
}

/// Key documents shared by the edges of a cluster (`cluster`), in its
/// Redis: the document as the origin signed it, kept until it expires, so
/// one edge's fetch serves them all. A reader checks the self-signature
/// itself, as for a document it fetched; one that does not verify (or a
/// Redis that does not answer within `SHARED_TIMEOUT`) means a fetch of
/// its own.
pub struct SharedKeys {
    client: redis::Client,
    prefix: String,
}

const SHARED_TIMEOUT: Duration = Duration::from_millis(300);

impl SharedKeys {
    pub fn new(url: &str, prefix: &str) -> Result<SharedKeys, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        Ok(SharedKeys { client, prefix: prefix.to_string() })
    }

    fn key(&self, server_name: &str) -> String {
        format!("{}:keys:{server_name}", self.prefix)
    }

    fn connection(&self) -> redis::RedisResult<redis::Connection> {
        let connection = self.client.get_connection_with_timeout(SHARED_TIMEOUT)?;
        connection.set_read_timeout(Some(SHARED_TIMEOUT))?;
        connection.set_write_timeout(Some(SHARED_TIMEOUT))?;
        Ok(connection)
    }

    /// Another edge's document for `server_name`, if one is stored and verifies.
    fn get(&self, server_name: &str, now: u64) -> Option<ServerKeys> {
        let text: Option<String> = self
            .connection()
            .and_then(|mut connection| redis::cmd("GET").arg(self.key(server_name)).query(&mut connection))
            .map_err(|e| log::debug!("federation gate: shared keys of {server_name} not read: {e}"))
            .ok()?;
        let document: serde_json::Value = serde_json::from_str(&text?).ok()?;
        match signing::verify_server_keys(&document, server_name) {
            Ok(keys) if keys.valid_until_ts > now => Some(keys),
            Ok(_) => None,
            Err(error) => {
                log::warn!("federation gate: the shared keys of {server_name} do not verify ({error}); fetching them");
                None
            }
        }
    }

    fn put(&self, server_name: &str, document: &serde_json::Value, valid_until_ts: u64, now: u64) {
        let lifetime = valid_until_ts.min(now + MAX_KEY_LIFETIME_MS).saturating_sub(now);
        if lifetime == 0 {
            return;
        }
        let stored = self.connection().and_then(|mut connection| {
            redis::cmd("SET")
                .arg(self.key(server_name))
                .arg(document.to_string())
                .arg("PX")
                .arg(lifetime)
                .query::<()>(&mut connection)
        });
        if let Err(e) = stored {
            log::debug!("federation gate: the keys of {server_name} not shared: {e}");
        }
    }
}

/// Keys as a fetch found them.
pub struct Fetched {
    pub keys: ServerKeys,
    /// Another edge of the cluster had fetched them.
    pub shared: bool,
}

/// How keys are fetched: part of the configuration snapshot.
pub struct KeyFetcher {
    client: Client,
    dns: Option<std::net::SocketAddr>,
    notaries: Vec<Notary>,
    shared: Option<SharedKeys>,
}

impl KeyFetcher {
    pub fn new(
        mut client: Client,
        dns: Option<std::net::SocketAddr>,
        notaries: Vec<Notary>,
        shared: Option<SharedKeys>,
    ) -> KeyFetcher {
        client.timeout = CONNECT_TIMEOUT;
        client.strict = true;
        KeyFetcher { client, dns, notaries, shared }
    }

    /// The server's current keys: from another edge of the cluster, from
    /// itself, else from a notary. Blocking.
    pub fn fetch(&self, server_name: &str) -> Result<Fetched, FederationError> {
        let now = now_ms();
        if let Some(keys) = self.shared.as_ref().and_then(|shared| shared.get(server_name, now)) {
            return Ok(Fetched { keys, shared: true });
        }
        let (keys, document) = self.fetch_own(server_name)?;
        if let Some(shared) = &self.shared {
            shared.put(server_name, &document, keys.valid_until_ts, now);
        }
        Ok(Fetched { keys, shared: false })
    }

    fn fetch_own(&self, server_name: &str) -> Result<(ServerKeys, serde_json::Value), FederationError> {
        let direct = self.fetch_direct(server_name);
        if direct.is_ok() || self.notaries.is_empty() {
            return direct;
        }
        let mut errors = vec![direct.err().map(|error| error.to_string()).unwrap_or_default()];
        for notary in &self.notaries {
            match self.fetch_from_notary(notary, server_name) {
                Ok(keys) => return Ok(keys),
                Err(error) => errors.push(format!("notary {}: {error}", notary.server_name)),
            }
        }
        Err(bad_keys(errors.join("; ")))
    }

    fn fetch_direct(&self, server_name: &str) -> Result<(ServerKeys, serde_json::Value), FederationError> {
        let located = discover::locate(&self.client, server_name, self.dns)?;
        let fetched = located.get(&self.client, "/_matrix/key/v2/server")?;
        if fetched.status != 200 {
            return Err(bad_answer(format!("/_matrix/key/v2/server answered {}", fetched.status)));
        }
        let document = fetched.json()?;
        Ok((signing::verify_server_keys(&document, server_name)?, document))
    }

    fn fetch_from_notary(
        &self,
        notary: &Notary,
        server_name: &str,
    ) -> Result<(ServerKeys, serde_json::Value), FederationError> {
        let located = discover::locate(&self.client, &notary.server_name, self.dns)?;
        let fetched = located.get(&self.client, &format!("/_matrix/key/v2/query/{server_name}"))?;
        if fetched.status != 200 {
            return Err(bad_answer(format!("the key query answered {}", fetched.status)));
        }
        let answer = fetched.json()?;
        let documents = answer["server_keys"].as_array().ok_or_else(|| bad_keys("no server_keys"))?;
        let mut last_error = format!("no keys for {server_name}");
        for document in documents.iter().filter(|d| d["server_name"] == server_name) {
            let countersigned = signing::signed_bytes(document).ok().is_some_and(|message| {
                notary.keys.iter().any(|(key_id, key)| {
                    document["signatures"][&notary.server_name][key_id]
                        .as_str()
                        .is_some_and(|signature| signing::verifies(key, signature, &message))
                })
            });
            if !countersigned {
                last_error = format!("the keys for {server_name} are not signed by the notary's pinned key");
                continue;
            }
            match signing::verify_server_keys(document, server_name) {
                Ok(keys) => return Ok((keys, document.clone())),
                Err(error) => last_error = error.to_string(),
            }
        }
        Err(bad_keys(last_error))
    }
}

/// Parses a pinned key given in the configuration; a weak or banned one is none.
pub fn pinned_key(text: &str) -> Option<PublicKey> {
    public_key(text)?.ok()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The server's keys could not be had (its key server is down or
    /// answers nonsense); the reason is the last fetch's.
    Unavailable(String),
    /// The server's keys are known and this key id is not among them.
    Unknown,
    /// The server lists this key, and it is one no signature by may count.
    Refused(KeyRefusal),
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::Unavailable(reason) => write!(f, "the origin's keys could not be fetched: {reason}"),
            KeyError::Unknown => f.write_str("the origin does not list that key"),
            KeyError::Refused(refusal) => write!(f, "{refusal}"),
        }
    }
}

/// The `result` label of the key fetch counter: success, then failure.
/// `fetched` by this edge, `failed`, or `shared` by another edge of the cluster.
pub const FETCH_RESULTS: [&str; 3] = ["fetched", "failed", "shared"];

#[derive(Default)]
struct Known {
    /// Key id, key, usable until (ms since the epoch).
    keys: Vec<(String, Result<PublicKey, KeyRefusal>, u64)>,
    fetched_at: u64,
    retry_at: u64,
    backoff: u64,
    error: String,
}

enum Lookup {
    Found(Result<PublicKey, KeyRefusal>),
    Failed(String),
    Unknown,
    Fetch,
}

impl Known {
    fn lookup(&self, key_id: &str, now: u64) -> Lookup {
        if let Some((_, key, _)) = self.keys.iter().find(|(id, _, until)| id == key_id && *until > now) {
            return Lookup::Found(key.clone());
        }
        if self.retry_at > now {
            return Lookup::Failed(self.error.clone());
        }
        if self.fetched_at > 0 && now < self.fetched_at + UNKNOWN_KEY_REFETCH_MS {
            return Lookup::Unknown;
        }
        Lookup::Fetch
    }

    fn record(&mut self, result: Result<ServerKeys, FederationError>, now: u64) {
        match result {
            Ok(fetched) => {
                let until = fetched.valid_until_ts.min(now + MAX_KEY_LIFETIME_MS);
                self.keys = fetched.keys.into_iter().map(|(id, key)| (id, key, until)).collect();
                self.fetched_at = now;
                self.retry_at = 0;
                self.backoff = 0;
                self.error.clear();
            }
            Err(error) => {
                self.backoff = (self.backoff * 2).clamp(FIRST_BACKOFF_MS, LAST_BACKOFF_MS);
                self.retry_at = now + self.backoff;
                self.error = error.to_string();
            }
        }
    }

    fn has_keys(&self, now: u64) -> bool {
        self.keys.iter().any(|(_, _, until)| *until > now)
    }
}

#[derive(Default)]
struct ServerEntry {
    known: Mutex<Known>,
    fetching: tokio::sync::Mutex<()>,
}

/// Keys by server name; lives as long as the process.
pub struct KeyCache {
    /// Read on every federation request, written only for a server not seen yet.
    servers: std::sync::RwLock<HashMap<String, Arc<ServerEntry>>>,
    fetches: tokio::sync::Semaphore,
}

impl Default for KeyCache {
    fn default() -> Self {
        KeyCache { servers: std::sync::RwLock::default(), fetches: tokio::sync::Semaphore::new(MAX_FETCHES) }
    }
}

impl KeyCache {
    fn entry(&self, server_name: &str) -> Arc<ServerEntry> {
        if let Some(entry) = self.servers.read().unwrap_or_else(|poisoned| poisoned.into_inner()).get(server_name) {
            return Arc::clone(entry);
        }
        let mut servers = self.servers.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if servers.len() >= MAX_SERVERS {
            let now = now_ms();
            servers.retain(|_, entry| entry.known.lock().is_ok_and(|known| known.has_keys(now)));
            if servers.len() >= MAX_SERVERS {
                servers.clear();
            }
        }
        Arc::clone(servers.entry(server_name.to_string()).or_default())
    }

    fn lookup(entry: &ServerEntry, key_id: &str) -> Lookup {
        entry.known.lock().map_or(Lookup::Fetch, |known| known.lookup(key_id, now_ms()))
    }

    /// The key `key_id` of `server_name`, fetching the server's keys if
    /// they are not known (or no longer valid) and may be asked for.
    pub async fn key(&self, server_name: &str, key_id: &str, fetcher: &Arc<KeyFetcher>) -> Result<PublicKey, KeyError> {
        let entry = self.entry(server_name);
        if let Some(answer) = Self::answer(Self::lookup(&entry, key_id)) {
            return answer;
        }
        let Ok(_fetching) = tokio::time::timeout(FETCH_DEADLINE, entry.fetching.lock()).await else {
            return Err(KeyError::Unavailable("another fetch of its keys is still waiting".into()));
        };
        // Whoever held the lock may have fetched them meanwhile.
        if let Some(answer) = Self::answer(Self::lookup(&entry, key_id)) {
            return answer;
        }
        let result = match tokio::time::timeout(FETCH_DEADLINE, self.fetches.acquire()).await {
            Ok(Ok(_permit)) => {
                let fetcher = Arc::clone(fetcher);
                let name = server_name.to_string();
                match tokio::time::timeout(FETCH_DEADLINE, tokio::task::spawn_blocking(move || fetcher.fetch(&name)))
                    .await
                {
                    Ok(Ok(result)) => result,
                    Ok(Err(join)) => Err(bad_keys(format!("the fetch failed: {join}"))),
                    Err(_) => Err(bad_keys(format!("no answer within {} ms", FETCH_DEADLINE.as_millis()))),
                }
            }
            _ => Err(bad_keys("too many key fetches at once")),
        };
        let outcome = match &result {
            Ok(Fetched { shared: false, .. }) => FETCH_RESULTS[0],
            Err(_) => FETCH_RESULTS[1],
            Ok(Fetched { shared: true, .. }) => FETCH_RESULTS[2],
        };
        METRICS.federation.key_fetches.with_label_values(&[outcome]).inc();
        let result = result.map(|fetched| fetched.keys);
        if let Err(error) = &result {
            log::info!("federation gate: cannot fetch the keys of {server_name}: {error}");
        }
        if let Ok(mut known) = entry.known.lock() {
            known.record(result, now_ms());
        }
        Self::answer(Self::lookup(&entry, key_id)).unwrap_or(Err(KeyError::Unknown))
    }

    /// The key if the cache can answer without fetching.
    pub fn cached(&self, server_name: &str, key_id: &str) -> Option<Result<PublicKey, KeyError>> {
        Self::answer(Self::lookup(&self.entry(server_name), key_id))
    }

    /// Fetches in the background what `cached` could not answer.
    pub fn prefetch(self: &Arc<Self>, server_name: &str, key_id: &str, fetcher: &Arc<KeyFetcher>) {
        let (cache, fetcher) = (Arc::clone(self), Arc::clone(fetcher));
        let (server_name, key_id) = (server_name.to_string(), key_id.to_string());
        tokio::spawn(async move {
            let _ = cache.key(&server_name, &key_id, &fetcher).await;
        });
    }

    fn answer(lookup: Lookup) -> Option<Result<PublicKey, KeyError>> {
        match lookup {
            Lookup::Found(key) => Some(key.map_err(KeyError::Refused)),
            Lookup::Failed(reason) => Some(Err(KeyError::Unavailable(reason))),
            Lookup::Unknown => Some(Err(KeyError::Unknown)),
            Lookup::Fetch => None,
        }
    }

    /// How many servers' keys are known and usable, for the status page.
    pub fn servers_known(&self) -> usize {
        let now = now_ms();
        let servers = self.servers.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        servers.values().filter(|entry| entry.known.lock().is_ok_and(|known| known.has_keys(now))).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(valid_until_ts: u64) -> ServerKeys {
        let key = openssl::pkey::PKey::generate_ed25519().expect("key");
        let public = signing::encode_unpadded(&key.raw_public_key().expect("raw"));
        ServerKeys { keys: vec![("ed25519:a".into(), public_key(&public).expect("a key"))], valid_until_ts }
    }

    #[test]
    fn keys_live_until_the_lesser_of_their_validity_and_a_week() {
        let mut known = Known::default();
        known.record(Ok(keys(u64::MAX)), 1000);
        assert!(matches!(known.lookup("ed25519:a", 1000 + MAX_KEY_LIFETIME_MS - 1), Lookup::Found(_)));
        assert!(matches!(known.lookup("ed25519:a", 1000 + MAX_KEY_LIFETIME_MS), Lookup::Fetch));
        known.record(Ok(keys(5000)), 1000);
        assert!(matches!(known.lookup("ed25519:a", 4999), Lookup::Found(_)));
        assert!(matches!(known.lookup("ed25519:a", 5000), Lookup::Unknown));
    }

    #[test]
    fn an_unknown_key_id_is_asked_for_once_in_ten_seconds() {
        let mut known = Known::default();
        assert!(matches!(known.lookup("ed25519:b", 0), Lookup::Fetch));
        known.record(Ok(keys(u64::MAX)), 1000);
        assert!(matches!(known.lookup("ed25519:b", 1000 + UNKNOWN_KEY_REFETCH_MS - 1), Lookup::Unknown));
        assert!(matches!(known.lookup("ed25519:b", 1000 + UNKNOWN_KEY_REFETCH_MS), Lookup::Fetch));
    }

    #[test]
    fn failures_back_off_from_a_minute_to_an_hour_and_keep_good_keys() {
        let mut known = Known::default();
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..8 {
            known.record(Err(bad_keys("down")), now);
            assert!(matches!(known.lookup("ed25519:a", now + 1), Lookup::Failed(ref e) if e == "down"));
            waits.push(known.retry_at - now);
            now = known.retry_at;
        }
        assert_eq!(waits, [60_000, 120_000, 240_000, 480_000, 960_000, 1_920_000, 3_600_000, 3_600_000]);
        known.record(Ok(keys(u64::MAX)), now);
        known.record(Err(bad_keys("down again")), now + 1);
        assert!(matches!(known.lookup("ed25519:a", now + 2), Lookup::Found(_)));
        assert_eq!(known.backoff, FIRST_BACKOFF_MS);
    }
}
