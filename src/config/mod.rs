//! The YAML schema (`*Config` types) and loading with located errors.
//!
//! These types mirror the file one to one and stay stable for users; the
//! runtime shapes built from them live next to the code that uses them
//! (`Edge::from_config`). serde_yaml is only touched here, so replacing it
//! (it is unmaintained upstream) changes one file.

pub mod balancing;
mod locate;
pub mod sites;
pub mod values;

use crate::synapse::table::{Group, Section};
pub use locate::{locate, Seg};
use once_cell::sync::Lazy;
use serde::Deserialize;
pub use sites::*;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use values::*;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// The homeserver's `server_name`: the part after `:` in user IDs.
    pub server_name: ServerName,
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub well_known: WellKnownConfig,
    pub synapse: SynapseConfig,
    #[serde(default)]
    pub admin_api: AdminApiConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub rate_limits: RateLimitsConfig,
    #[serde(default)]
    pub process: ProcessConfig,
    /// Prometheus metrics on their own listener; absent: no metrics.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Upstreams that site routes name (MAS, LiveKit, anything HTTP).
    #[serde(default)]
    pub upstreams: UpstreamsConfig,
    /// Virtual hosts beside the Matrix site, chosen by Host (`:authority`).
    #[serde(default)]
    pub sites: Vec<SiteConfig>,
    /// The Matrix site's hosts and its routes outside the Matrix paths.
    #[serde(default)]
    pub matrix_site: MatrixSiteConfig,
    /// HTTP proxies in front whose `X-Forwarded-For` is believed: the
    /// client is the right-most address not in these networks.
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    /// The header that carries the edge's request ID to Synapse and the
    /// named upstreams (Synapse's listener option `request_id_header` reads
    /// it, so both access logs name the same request); `~` sends none.
    #[serde(default = "default_request_id_header")]
    pub request_id_header: Option<String>,
    /// The federation gate: X-Matrix signatures checked before Synapse,
    /// and the servers refused outright.
    #[serde(default)]
    pub federation: FederationConfig,
    /// Synapse's JSON answers compressed for clients that ask.
    #[serde(default)]
    pub compression: CompressionConfig,
    /// What several edges in front of one deployment share, through one Redis.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

/// `synapse.media_cache`: in memory (disk storage is not built yet).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediaCacheConfig {
    /// Memory for cached media; least recently used files go first. Set at
    /// start: a reload does not resize it.
    #[serde(default = "default_media_memory")]
    pub memory: ByteSize,
    /// Larger files stream through uncached.
    #[serde(default = "default_media_max_object")]
    pub max_object: ByteSize,
}

fn default_media_memory() -> ByteSize {
    ByteSize(256 * 1024 * 1024)
}

fn default_media_max_object() -> ByteSize {
    ByteSize(20 * 1024 * 1024)
}

/// `cluster:`: one Redis for everything edges share: operators' drains,
/// maintenance and ready, and the rate limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://[:password@]host:port/db` (or `redis+unix:///path`).
    pub redis: String,
    /// This edge, as the others and the status page name it; default: the host name.
    #[serde(default)]
    pub name: Option<String>,
    /// Prepended to every key, so several deployments can share a Redis.
    #[serde(default = "default_shared_prefix")]
    pub prefix: String,
    /// How long a request waits for Redis before counting its rate locally.
    #[serde(default = "default_shared_timeout")]
    pub timeout: Span,
}

/// `compression:`: levels per coding (0 turns one off), and the shortest
/// answer compressed. On by default: Synapse leaves compression to the proxy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_gzip_level")]
    pub gzip: u32,
    #[serde(default = "default_brotli_level")]
    pub brotli: u32,
    #[serde(default = "default_zstd_level")]
    pub zstd: u32,
    #[serde(default = "default_compress_min_length")]
    pub min_length: ByteSize,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            enabled: true,
            gzip: default_gzip_level(),
            brotli: default_brotli_level(),
            zstd: default_zstd_level(),
            min_length: default_compress_min_length(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// Levels measured on a sync-shaped answer (bench/RESULTS.md, "Response
/// compression"): past 3, each coding pays 1.5-2x the CPU for a point or two.
fn default_gzip_level() -> u32 {
    3
}

fn default_brotli_level() -> u32 {
    3
}

fn default_zstd_level() -> u32 {
    3
}

fn default_compress_min_length() -> ByteSize {
    ByteSize(1024)
}

/// `federation:`: the gate and the deny and allow lists.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    #[serde(default)]
    pub verify: FederationVerifyConfig,
    /// Server names and `*.name` globs refused (403), by verified origin.
    #[serde(default)]
    pub deny: Vec<String>,
    /// When given, only these servers (names and `*.name` globs) are let in.
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// Each origin's share of Synapse: a cap, a queue, turns.
    #[serde(default)]
    pub per_origin: PerOriginConfig,
}

/// `federation.per_origin`: how much of Synapse one origin may take, in
/// cost units (a small `/send` is 1; `weights` overrides the table's).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerOriginConfig {
    /// Default: on whenever the gate is (`verify.mode` not `off`).
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default = "default_origin_in_flight")]
    pub max_in_flight: u32,
    /// All origins together; 0: no total.
    #[serde(default = "default_origins_in_flight")]
    pub total_in_flight: u32,
    #[serde(default = "default_origin_queue")]
    pub queue: usize,
    #[serde(default = "default_origin_queue_timeout")]
    pub queue_timeout: Span,
    #[serde(default)]
    pub weights: std::collections::BTreeMap<String, u32>,
}

impl Default for PerOriginConfig {
    fn default() -> Self {
        PerOriginConfig {
            enabled: None,
            max_in_flight: default_origin_in_flight(),
            total_in_flight: default_origins_in_flight(),
            queue: default_origin_queue(),
            queue_timeout: default_origin_queue_timeout(),
            weights: std::collections::BTreeMap::new(),
        }
    }
}

/// Synapse's own `rc_federation.concurrent` is 3 requests per origin; 8
/// units lets a server's transactions through beside two backfills.
fn default_origin_in_flight() -> u32 {
    8
}

fn default_origins_in_flight() -> u32 {
    64
}

fn default_origin_queue() -> usize {
    100
}

/// Under Synapse's federation `client_timeout` (60 s), so a sender hears
/// the edge's 429 rather than its own timeout (both put us in its backoff).
fn default_origin_queue_timeout() -> Span {
    Span(std::time::Duration::from_secs(50))
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationVerifyConfig {
    /// `off`, `observe` (default: check, log and count, forward all) or `enforce`.
    #[serde(default)]
    pub mode: VerifyMode,
    /// A PEM CA that origins' certificates may chain to, besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `name:port:host:port` rules, as curl's `--connect-to` and `doctor`'s.
    #[serde(default)]
    pub connect_to: Vec<String>,
    /// DNS server (`IP:port`) for SRV lookups; default: the system's.
    #[serde(default)]
    pub dns: Option<std::net::SocketAddr>,
    /// Notaries asked when an origin cannot be reached, each with its pinned keys.
    #[serde(default)]
    pub trusted_key_servers: Vec<TrustedKeyServerConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyMode {
    Off,
    #[default]
    Observe,
    Enforce,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKeyServerConfig {
    pub server_name: String,
    /// Key id to unpadded base64 public key, as in Synapse's `trusted_key_servers`.
    pub verify_keys: std::collections::BTreeMap<String, String>,
}

fn default_hold() -> Span {
    Span(std::time::Duration::from_secs(15))
}

fn default_request_id_header() -> Option<String> {
    Some("X-Request-ID".into())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Keep it private: loopback or an internal network.
    pub address: ListenAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: ListenAddr,
    #[serde(default)]
    pub tls: bool,
    pub serves: Vec<Role>,
    /// Read a PROXY protocol (v1 or v2) header first on connections from
    /// these networks: an L4 load balancer in front.
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocolConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocolConfig {
    /// The load balancers' addresses. Their connections must start with a
    /// valid header (else they are closed); others are served as they are.
    pub from: Vec<Cidr>,
    /// How long the header may take to arrive.
    #[serde(default = "default_proxy_header_timeout")]
    pub timeout: Span,
}

fn default_proxy_header_timeout() -> Span {
    Span(std::time::Duration::from_secs(5))
}

/// What a listener answers. Paths outside its roles get a 404.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// `/.well-known/matrix/{server,client,support}`, answered by the edge.
    WellKnown,
    /// `/_matrix/*` and `/_synapse/client/*` (and `/_synapse/admin` from allowed networks).
    Client,
    /// `/_matrix/federation/*`, `/_matrix/key/*` and `/_matrix/media/*`.
    Federation,
    /// The virtual hosts under `sites` (and `matrix_site.routes`).
    Sites,
    /// `/.well-known/acme-challenge/<token>` for `tls.acme` (plain HTTP only).
    Acme,
    /// Everything else: a 308 to the same host and target over https (plain HTTP only).
    Redirect,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::WellKnown => "well_known",
            Role::Client => "client",
            Role::Federation => "federation",
            Role::Sites => "sites",
            Role::Acme => "acme",
            Role::Redirect => "redirect",
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM chain + key pairs; the names each serves come from its SANs.
    #[serde(default)]
    pub certificates: Vec<CertificateFiles>,
    /// How often certificate and key files are checked for changes (certbot
    /// renewals are picked up without a signal); `0s` turns it off.
    #[serde(default = "default_watch_interval")]
    pub watch_interval: Span,
    /// Certificates ordered and renewed by the edge itself (Let's Encrypt or
    /// any RFC 8555 CA), beside or instead of `certificates`.
    #[serde(default)]
    pub acme: Option<AcmeConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// Where the CA writes about expiring certificates and problems (an email address).
    pub contact: String,
    /// `letsencrypt` (the default), `letsencrypt-staging`, or the https URL
    /// of any RFC 8555 directory.
    #[serde(default = "default_acme_directory")]
    pub directory: String,
    /// A PEM root to trust for the directory's own HTTPS (a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// External Account Binding, for CAs that require one (ZeroSSL, Google, Sectigo).
    #[serde(default)]
    pub external_account: Option<ExternalAccountConfig>,
    /// The names to order; absent: every name the edge serves over TLS that
    /// no file in `certificates` covers.
    #[serde(default)]
    pub names: Option<Vec<String>>,
    /// Account and certificates, kept across restarts (systemd's `StateDirectory=`).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalAccountConfig {
    pub key_id: String,
    /// The MAC key as the CA hands it out: base64url.
    pub hmac_key: String,
}

fn default_acme_directory() -> String {
    "letsencrypt".into()
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/matrix-edge")
}

fn default_watch_interval() -> Span {
    Span(std::time::Duration::from_secs(60))
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig { certificates: Vec::new(), watch_interval: default_watch_interval(), acme: None }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// Leaf first, then intermediates (certbot's `fullchain.pem`).
    /// Relative paths are taken from the config file's directory.
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WellKnownConfig {
    /// `m.server` for `/.well-known/matrix/server`; absent means 404.
    #[serde(default)]
    pub server: Option<ServerAddress>,
    #[serde(default)]
    pub client: Option<ClientWellKnownConfig>,
    #[serde(default)]
    pub support: Option<SupportWellKnownConfig>,
    /// `Cache-Control: max-age` on every document.
    #[serde(default = "default_well_known_max_age")]
    pub max_age: Span,
}

impl Default for WellKnownConfig {
    fn default() -> Self {
        WellKnownConfig { server: None, client: None, support: None, max_age: default_well_known_max_age() }
    }
}

fn default_well_known_max_age() -> Span {
    Span(std::time::Duration::from_secs(3600))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientWellKnownConfig {
    /// `m.homeserver.base_url`.
    pub homeserver: HttpUrl,
    /// `m.identity_server.base_url`.
    #[serde(default)]
    pub identity_server: Option<HttpUrl>,
    /// Element Call's backends (MatrixRTC foci), published as
    /// `org.matrix.msc4143.rtc_foci`: `[{ type: livekit, livekit_service_url: https://... }]`.
    #[serde(default)]
    pub rtc_foci: Vec<RtcFocusConfig>,
    /// Further namespaced keys (`io.element.e2ee`, `org.matrix.msc2965.authentication`...).
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// One MatrixRTC focus: its `type` and that type's fields.
#[derive(Debug, Clone, Deserialize)]
pub struct RtcFocusConfig {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(flatten)]
    pub fields: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupportWellKnownConfig {
    #[serde(default)]
    pub contacts: Vec<SupportContactConfig>,
    #[serde(default)]
    pub support_page: Option<HttpUrl>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SupportContactConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matrix_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_address: Option<String>,
    pub role: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynapseConfig {
    /// The main process: `host:port`, `https://host:port` or `unix:/path`.
    pub main: UpstreamTarget,
    #[serde(default)]
    pub timeouts: UpstreamTimeoutsConfig,
    /// How long a request whose connection main refused (it reached
    /// nothing: a restart) waits for main to accept again before a 503;
    /// `0s` answers 502 at once.
    #[serde(default = "default_hold")]
    pub hold: Span,
    /// How many requests may wait for main at once (each holds a client
    /// connection and its body); past that, 503 with `Retry-After` at once.
    #[serde(default = "default_hold_limit")]
    pub hold_limit: usize,
    /// Worker processes by type (Synapse's `docs/workers.md`).
    #[serde(default)]
    pub workers: GroupLists<WorkerGroups>,
    #[serde(default)]
    pub stream_writers: GroupLists<StreamWriterGroups>,
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    /// Synapse's media kept by the edge, revalidated on every request.
    #[serde(default)]
    pub media_cache: Option<MediaCacheConfig>,
    /// Caps, queues, ejection and slow start for the worker groups.
    #[serde(default)]
    pub balancing: balancing::BalancingConfig,
    /// Extra rules evaluated before the built-in table.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// The Matrix Authentication Service: `/login`, `/logout` and `/refresh`
    /// (the compatibility layer) go to it instead of Synapse.
    #[serde(default)]
    pub mas: Option<WorkerList>,
    /// `open` (default), or `openid_only` for a homeserver that does not
    /// federate but lets lk-jwt-service check OpenID tokens.
    #[serde(default)]
    pub federation: FederationMode,
    /// How workers given as `{ discover: ... }` are looked up.
    #[serde(default)]
    pub discovery: DiscoveryConfig,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FederationMode {
    #[default]
    Open,
    /// Only `/_matrix/federation/v1/openid/userinfo` of the federation API.
    OpenidOnly,
}

impl SynapseConfig {
    /// Every worker list of the section: workers, stream writers, MAS.
    fn lists(&self) -> impl Iterator<Item = &WorkerList> {
        let workers = self.workers.lists.iter().map(|(_, list)| list);
        workers.chain(self.stream_writers.lists.iter().map(|(_, list)| list)).chain(self.mas.iter())
    }

    /// Every upstream the section names: main, workers, stream writers, MAS.
    pub fn targets(&self) -> Vec<&UpstreamTarget> {
        let mut targets = vec![&self.main];
        for list in self.lists() {
            targets.extend(list.entries().iter().filter_map(WorkerConfig::address));
        }
        targets
    }

    /// Every name a worker list asks to discover.
    pub fn discovered(&self) -> Vec<&DiscoverName> {
        let mut names = Vec::new();
        for list in self.lists() {
            for entry in list.entries() {
                if let WorkerConfig::Discovered(d) = entry {
                    if !names.contains(&&d.discover) {
                        names.push(&d.discover);
                    }
                }
            }
        }
        names
    }
}

/// One worker address, or several.
#[derive(Debug, Clone)]
pub enum WorkerList {
    One(WorkerConfig),
    Many(Vec<WorkerConfig>),
}

impl WorkerList {
    pub fn entries(&self) -> &[WorkerConfig] {
        match self {
            WorkerList::One(one) => std::slice::from_ref(one),
            WorkerList::Many(many) => many,
        }
    }
}

/// `127.0.0.1:8083`, or `{ address: 127.0.0.1:8083, health_port: 9083, weight: 2 }`.
#[derive(Debug, Clone)]
pub enum WorkerConfig {
    Address(UpstreamTarget),
    Detailed(DetailedWorkerConfig),
    /// Members found in DNS and followed while the edge runs.
    Discovered(DiscoveredWorkerConfig),
}

/// `{ discover: "_synapse-http._tcp.sync.example.org" }` (SRV: each
/// target and port) or `{ discover: "synchrotrons.example.org:8083" }` (every
/// A/AAAA record, on that port).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveredWorkerConfig {
    pub discover: DiscoverName,
    #[serde(default)]
    pub health_port: Option<u16>,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// How `synapse.discovery` looks names up.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// DNS servers (`IP:port`) to ask; default: the system's resolv.conf.
    #[serde(default)]
    pub servers: Vec<std::net::SocketAddr>,
    /// Longest time between lookups; a shorter record TTL wins. Default 30s.
    #[serde(default)]
    pub interval: Option<Span>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetailedWorkerConfig {
    pub address: UpstreamTarget,
    /// Where `GET /health` goes, when a separate listener answers it.
    #[serde(default)]
    pub health_port: Option<u16>,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

// By hand rather than `untagged` (which buffers the value and answers "data
// did not match any variant"), and straight on serde_yaml's deserializer
// rather than through a `Value`, so a mistake inside one worker is named
// with its own key path and line: `synapse.workers.synchrotron[1].weight`.
impl<'de> Deserialize<'de> for WorkerList {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Lists;
        impl<'de> serde::de::Visitor<'de> for Lists {
            type Value = WorkerList;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(WORKER_FORMS)?;
                f.write_str(", or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<WorkerList, E> {
                Workers.visit_str(text).map(WorkerList::One)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<WorkerList, A::Error> {
                Workers.visit_map(map).map(WorkerList::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<WorkerList, A::Error> {
                let mut workers = Vec::with_capacity(seq.size_hint().unwrap_or(1));
                while let Some(worker) = seq.next_element::<WorkerConfig>()? {
                    workers.push(worker);
                }
                Ok(WorkerList::Many(workers))
            }
        }
        deserializer.deserialize_any(Lists)
    }
}

const WORKER_FORMS: &str =
    "a worker: an address (127.0.0.1:8083), { address: ..., health_port: ..., weight: ... } or { discover: ... }";

/// One worker, as a string or a map.
struct Workers;

impl<'de> serde::de::Visitor<'de> for Workers {
    type Value = WorkerConfig;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(WORKER_FORMS)
    }
    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<WorkerConfig, E> {
        UpstreamTarget::try_from(text.to_string()).map(WorkerConfig::Address).map_err(E::custom)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<WorkerConfig, A::Error> {
        use serde::de::Error;
        let entry = WorkerEntry::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        match entry {
            WorkerEntry { address: Some(address), discover: None, health_port, weight } => {
                Ok(WorkerConfig::Detailed(DetailedWorkerConfig { address, health_port, weight: weight.0 }))
            }
            WorkerEntry { address: None, discover: Some(discover), health_port, weight } => {
                Ok(WorkerConfig::Discovered(DiscoveredWorkerConfig { discover, health_port, weight: weight.0 }))
            }
            WorkerEntry { address: Some(_), discover: Some(_), .. } => {
                Err(A::Error::custom("give a worker `address` or `discover`, not both"))
            }
            WorkerEntry { address: None, discover: None, .. } => Err(A::Error::missing_field("address")),
        }
    }
}

impl<'de> Deserialize<'de> for WorkerConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Workers)
    }
}

/// A worker written as a map, before it is known to be fixed or discovered.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerEntry {
    #[serde(default)]
    address: Option<UpstreamTarget>,
    #[serde(default)]
    discover: Option<DiscoverName>,
    #[serde(default)]
    health_port: Option<u16>,
    #[serde(default)]
    weight: Weight,
}

/// A worker's share of its group's requests: at least 1.
#[derive(Deserialize)]
#[serde(try_from = "u32")]
struct Weight(u32);

impl Default for Weight {
    fn default() -> Weight {
        Weight(default_weight())
    }
}

impl TryFrom<u32> for Weight {
    type Error = &'static str;
    fn try_from(weight: u32) -> Result<Weight, &'static str> {
        if weight == 0 {
            Err("a worker's weight must be at least 1")
        } else {
            Ok(Weight(weight))
        }
    }
}

impl WorkerConfig {
    /// The fixed address, when it is not discovered.
    pub fn address(&self) -> Option<&UpstreamTarget> {
        match self {
            WorkerConfig::Address(address) => Some(address),
            WorkerConfig::Detailed(detailed) => Some(&detailed.address),
            WorkerConfig::Discovered(_) => None,
        }
    }
}

/// The worker lists of one section (`synapse.workers` or
/// `synapse.stream_writers`), keyed by the group names of
/// `synapse::table::GROUPS`: a group added there is a key here.
#[derive(Debug, Clone)]
pub struct GroupLists<S> {
    pub lists: Vec<(Group, WorkerList)>,
    section: std::marker::PhantomData<S>,
}

impl<S> Default for GroupLists<S> {
    fn default() -> Self {
        GroupLists { lists: Vec::new(), section: std::marker::PhantomData }
    }
}

/// Which section a `GroupLists` reads.
pub trait GroupSection {
    const SECTION: Section;
    /// The keys it accepts, for the error on any other.
    fn names() -> &'static [&'static str];
}

#[derive(Debug, Clone)]
pub struct WorkerGroups;
#[derive(Debug, Clone)]
pub struct StreamWriterGroups;

static WORKER_GROUP_NAMES: Lazy<Vec<&'static str>> =
    Lazy::new(|| Group::in_section(Section::Workers).map(|spec| spec.name).collect());
static STREAM_WRITER_NAMES: Lazy<Vec<&'static str>> =
    Lazy::new(|| Group::in_section(Section::StreamWriters).map(|spec| spec.name).collect());

impl GroupSection for WorkerGroups {
    const SECTION: Section = Section::Workers;
    fn names() -> &'static [&'static str] {
        &WORKER_GROUP_NAMES
    }
}

impl GroupSection for StreamWriterGroups {
    const SECTION: Section = Section::StreamWriters;
    fn names() -> &'static [&'static str] {
        &STREAM_WRITER_NAMES
    }
}

impl<'de, S: GroupSection> Deserialize<'de> for GroupLists<S> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Lists<S>(std::marker::PhantomData<S>);
        impl<'de, S: GroupSection> serde::de::Visitor<'de> for Lists<S> {
            type Value = GroupLists<S>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "a map of group names ({}) to worker lists", S::names().join(", "))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                use serde::de::Error;
                let mut lists: Vec<(Group, WorkerList)> = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let Some(spec) = Group::in_section(S::SECTION).find(|spec| spec.name == key) else {
                        return Err(A::Error::unknown_field(&key, S::names()));
                    };
                    if lists.iter().any(|(group, _)| *group == spec.group) {
                        return Err(A::Error::custom(format!("duplicate field `{key}`")));
                    }
                    lists.push((spec.group, map.next_value::<WorkerList>()?));
                }
                Ok(GroupLists { lists, section: std::marker::PhantomData })
            }
        }
        deserializer.deserialize_map(Lists(std::marker::PhantomData))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "default_health_interval")]
    pub interval: Span,
    #[serde(default = "default_health_timeout")]
    pub timeout: Span,
    /// Check this port on every worker instead of its traffic port.
    #[serde(default)]
    pub port: Option<u16>,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            path: default_health_path(),
            interval: default_health_interval(),
            timeout: default_health_timeout(),
            port: None,
        }
    }
}

fn default_hold_limit() -> usize {
    1000
}

fn default_health_path() -> String {
    "/health".into()
}

fn default_health_interval() -> Span {
    Span(std::time::Duration::from_secs(5))
}

fn default_health_timeout() -> Span {
    Span(std::time::Duration::from_secs(2))
}

/// `{ path: "^/_matrix/client/v3/rooms/[^/]+/report", methods: [POST], to: main }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A regular expression on the raw path, without the query.
    pub path: String,
    /// Absent: every method.
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// `main` or a worker group or stream writer name.
    pub to: String,
    /// `user`, `room` or `origin`; absent: round robin.
    #[serde(default)]
    pub sticky: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTimeoutsConfig {
    pub connect: Span,
    /// Longest silence while waiting for Synapse: must outlast `/sync`
    /// long-polls (30 s) and slow initial syncs.
    pub read: Span,
    pub write: Span,
    /// How long an idle pooled connection is kept; below Synapse's ~60 s.
    pub keepalive_idle: Span,
}

impl Default for UpstreamTimeoutsConfig {
    fn default() -> Self {
        use std::time::Duration;
        UpstreamTimeoutsConfig {
            connect: Span(Duration::from_secs(5)),
            read: Span(Duration::from_secs(600)),
            write: Span(Duration::from_secs(120)),
            keepalive_idle: Span(Duration::from_secs(50)),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminApiConfig {
    /// Networks allowed to reach `/_synapse/admin`; empty (the default) means nobody.
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// Networks allowed to reach `/_synapse/mas/` (MAS's private API into
    /// Synapse, for a MAS that calls Synapse through the edge); default nobody.
    #[serde(default)]
    pub mas_allow: Vec<Cidr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body, as Synapse's own `max_upload_size`.
    #[serde(default = "default_max_upload_size")]
    pub max_upload_size: ByteSize,
    /// Largest request body under `/_matrix/federation/` (transactions can exceed 50 MB).
    #[serde(default = "default_federation_max_body")]
    pub federation_max_body: ByteSize,
    /// Longest request target (414 beyond). Synapse itself refuses request
    /// lines over 16 KiB, which still admits long `/sync?filter=` URIs.
    #[serde(default = "default_max_target_bytes")]
    pub max_target_bytes: ByteSize,
    /// Largest total of header names and values (431 beyond).
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: ByteSize,
    /// Most header lines in one request (431 beyond).
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Time from a connection's first byte (or a keep-alive request's first
    /// byte) to the end of its request head; clients trickling headers
    /// (slowloris) are cut off here.
    #[serde(default = "default_header_timeout")]
    pub header_timeout: Span,
    /// Longest pause while a request body is being received; slow but
    /// steady uploads are never cut off.
    #[serde(default = "default_body_idle_timeout")]
    pub body_idle_timeout: Span,
    /// Requests served on one keep-alive connection before it is closed.
    #[serde(default = "default_keepalive_requests")]
    pub keepalive_requests: u32,
    /// How long a client connection may stay open with no request in
    /// flight: HTTP/1.1 between requests, HTTP/2 with no stream open (then
    /// a GOAWAY). A long-poll or a WebSocket is a request in flight.
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout: Span,
    /// Open connections allowed from one client address; 0 turns the cap
    /// off (needed behind a load balancer, where every client shares its address).
    #[serde(default = "default_connections_per_ip")]
    pub connections_per_ip: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_upload_size: default_max_upload_size(),
            federation_max_body: default_federation_max_body(),
            max_target_bytes: default_max_target_bytes(),
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            header_timeout: default_header_timeout(),
            body_idle_timeout: default_body_idle_timeout(),
            keepalive_requests: default_keepalive_requests(),
            keepalive_timeout: default_keepalive_timeout(),
            connections_per_ip: default_connections_per_ip(),
        }
    }
}

fn default_max_target_bytes() -> ByteSize {
    ByteSize(16 << 10)
}

fn default_max_header_bytes() -> ByteSize {
    ByteSize(32 << 10)
}

fn default_max_headers() -> usize {
    100
}

fn default_header_timeout() -> Span {
    Span(std::time::Duration::from_secs(15))
}

fn default_body_idle_timeout() -> Span {
    Span(std::time::Duration::from_secs(60))
}

fn default_keepalive_requests() -> u32 {
    1000
}

fn default_keepalive_timeout() -> Span {
    Span(std::time::Duration::from_secs(60))
}

fn default_connections_per_ip() -> u32 {
    256
}

/// Request rates per client, answered with 429 `M_LIMIT_EXCEEDED` beyond.
/// Synapse has its own, finer limits; these keep floods off it entirely.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitsConfig {
    /// `POST` to `/login` and `/register`, per client address (IPv6 by /64).
    /// On by default; `login: null` turns it off.
    #[serde(default = "default_login_rate")]
    pub login: Option<RateConfig>,
    /// Every client API request, per client address. Off by default.
    #[serde(default)]
    pub client: Option<RateConfig>,
    /// Federation requests, per claimed origin server (from `X-Matrix`) and
    /// address, and per address. Off by default.
    #[serde(default)]
    pub federation: Option<RateConfig>,
    /// Count in Redis, shared by every edge pointed at it, instead of in
    /// this process alone. Unreachable Redis: each edge counts alone.
    #[serde(default)]
    pub shared: Option<SharedLimitsConfig>,
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        RateLimitsConfig { login: default_login_rate(), client: None, federation: None, shared: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedLimitsConfig {
    /// `redis://host:port/db` (or `redis+unix:///path`); the one Synapse's workers use will do.
    pub redis: String,
    /// Prepended to every key, so several deployments can share a Redis.
    #[serde(default = "default_shared_prefix")]
    pub prefix: String,
    /// How long a request waits for Redis before counting locally.
    #[serde(default = "default_shared_timeout")]
    pub timeout: Span,
}

fn default_shared_prefix() -> String {
    "matrix-edge".into()
}

fn default_shared_timeout() -> Span {
    Span(std::time::Duration::from_millis(50))
}

fn default_login_rate() -> Option<RateConfig> {
    Some(RateConfig { requests: 30, per: Span(std::time::Duration::from_secs(60)) })
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    /// Requests allowed per `per`, estimated over a sliding window.
    pub requests: u32,
    pub per: Span,
}

fn default_max_upload_size() -> ByteSize {
    ByteSize(50 << 20)
}

fn default_federation_max_body() -> ByteSize {
    ByteSize(200 << 20)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// Worker threads per listener; 0 means one per CPU.
    #[serde(default)]
    pub threads: usize,
    /// How long in-flight requests may finish after SIGTERM.
    #[serde(default = "default_drain")]
    pub shutdown_drain: Span,
    /// `error`, `warn`, `info`, `debug` or `trace`; `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub log_level: LogLevel,
    /// `combined` (default), `json` or `off`.
    #[serde(default)]
    pub access_log: crate::observe::access_log::AccessLogFormat,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        ProcessConfig {
            threads: 0,
            shutdown_drain: default_drain(),
            log_level: default_log_level(),
            access_log: Default::default(),
        }
    }
}

fn default_drain() -> Span {
    Span(std::time::Duration::from_secs(10))
}

fn default_log_level() -> LogLevel {
    LogLevel::Info
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// A configuration problem, with where it is when that is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted key path such as `tls.certificates[0].key`, when known.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, ":{line}:{column}")?;
        }
        match &self.key {
            Some(key) => write!(f, ": {key}: {}", self.message),
            None => write!(f, ": {}", self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The text of a config file and where it came from, for locating errors.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: PathBuf,
    pub text: String,
}

impl Source {
    pub fn read(file: &Path) -> Result<Source, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            file: file.to_path_buf(),
            line: None,
            column: None,
            key: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        Ok(Source { file: file.to_path_buf(), text })
    }

    pub fn parse(&self) -> Result<EdgeConfig, ConfigError> {
        serde_yaml::from_str(&self.text).map_err(|e| self.yaml_error(&e))
    }

    fn yaml_error(&self, e: &serde_yaml::Error) -> ConfigError {
        let location = e.location();
        // serde_yaml renders "path: message at line L column C"; keep the
        // message and path but report the position in our own format.
        let rendered = e.to_string();
        let without_position = match rendered.rfind(" at line ") {
            Some(at) => rendered[..at].to_string(),
            None => rendered,
        };
        let (key, message) = match without_position.split_once(": ") {
            Some((key, message)) if !key.contains(' ') => (Some(key.to_string()), message.to_string()),
            _ => (None, without_position),
        };
        ConfigError {
            file: self.file.clone(),
            line: location.as_ref().map(|l| l.line()),
            column: location.as_ref().map(|l| l.column()),
            key,
            message,
        }
    }

    /// An error about the value at `path`, located in the text.
    pub fn error_at(&self, path: &[Seg], message: impl std::fmt::Display) -> ConfigError {
        let position = locate(&self.text, path);
        ConfigError {
            file: self.file.clone(),
            line: position.map(|p| p.0),
            column: position.map(|p| p.1),
            key: (!path.is_empty()).then(|| render_path(path)),
            message: message.to_string(),
        }
    }
}

pub fn render_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Seg::Name(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<EdgeConfig, ConfigError> {
        Source { file: "test.yaml".into(), text: text.into() }.parse()
    }

    const MINIMAL: &str = "server_name: example.com\nlisteners:\n  - { address: \"127.0.0.1:8008\", serves: [client] }\nsynapse:\n  main: 127.0.0.1:8009\n";

    #[test]
    fn minimal_config_parses_with_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.limits.max_upload_size, ByteSize(50 << 20));
        assert_eq!(config.well_known.max_age.0.as_secs(), 3600);
        assert!(config.admin_api.allow.is_empty());
    }

    #[test]
    fn unknown_key_is_named_with_its_position() {
        let err = parse(&format!("{MINIMAL}limitz: {{}}\n")).unwrap_err();
        assert_eq!(err.line, Some(6));
        assert!(err.message.contains("unknown field `limitz`"), "{err}");
    }

    #[test]
    fn bad_address_names_key_and_position() {
        let err = parse(&MINIMAL.replace("127.0.0.1:8008", "127.0.0.1:80800")).unwrap_err();
        assert!(err.key.as_deref().is_some_and(|k| k.starts_with("listeners[0]")), "{err}");
        assert!(err.message.contains("invalid listen address"), "{err}");
        assert_eq!(err.line, Some(3));
        assert!(err.to_string().starts_with("test.yaml:3:"), "{err}");
    }

    #[test]
    fn upstream_names_are_not_looked_up_while_parsing() {
        let config = parse(&MINIMAL.replace("main: 127.0.0.1:8009", "main: synapse.invalid:8009")).unwrap();
        assert!(!config.synapse.main.is_literal());
        assert_eq!(config.synapse.targets().len(), 1);
    }

    #[test]
    fn unknown_role_is_rejected() {
        let err = parse(&MINIMAL.replace("[client]", "[clients]")).unwrap_err();
        assert!(err.message.contains("unknown variant `clients`"), "{err}");
    }
}
