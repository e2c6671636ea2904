//! The schema of virtual hosts (`sites`), their routes, and the named
//! upstreams (`upstreams`) those routes send to.

use super::values::{Cidr, HttpUrl, Span, UpstreamTarget};
use super::UpstreamTimeoutsConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A host a site answers: `element.example.com`, or `*.example.com` for
/// any one label in front of `example.com`. Stored lowercase.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostPattern(pub String);

impl HostPattern {
    pub fn wildcard_parent(&self) -> Option<&str> {
        self.0.strip_prefix("*.")
    }
}

impl TryFrom<String> for HostPattern {
    type Error = super::values::InvalidValue;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        let lowered = text.trim_end_matches('.').to_ascii_lowercase();
        let name = lowered.strip_prefix("*.").unwrap_or(&lowered);
        if super::values::is_dns_name(name) && name.contains('.') || name == "localhost" {
            Ok(HostPattern(lowered))
        } else {
            Err(super::values::InvalidValue {
                what: "host",
                text,
                expected: "expected a DNS name such as \"element.example.com\" or a wildcard such as \"*.example.com\" (no port, no scheme)".into(),
            })
        }
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        HostPattern::try_from(text).map_err(serde::de::Error::custom)
    }
}

/// The Matrix site (what `server_name`, `well_known` and `synapse` drive).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixSiteConfig {
    /// Hosts it answers once `sites` are configured. Default: `server_name`,
    /// the `m.server` host and the host of the client well-known's homeserver URL.
    #[serde(default)]
    pub hosts: Option<Vec<HostPattern>>,
    /// Routes for paths outside `/_matrix/`, `/_synapse/` and
    /// `/.well-known/matrix/` on the Matrix host (a landing page, MAS under `/auth`).
    #[serde(default)]
    pub routes: Vec<SiteRouteConfig>,
}

/// One virtual host beside the Matrix site.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub hosts: Vec<HostPattern>,
    pub routes: Vec<SiteRouteConfig>,
}

/// `{ prefix: /api/admin/, upstream: mas, allow: [10.0.0.0/8] }`: a path
/// (exact) or prefix, and one of `upstream`, `redirect`, `static`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteRouteConfig {
    /// Matches this path exactly (the query aside).
    #[serde(default)]
    pub path: Option<String>,
    /// Matches every path starting with this.
    #[serde(default)]
    pub prefix: Option<String>,
    /// A name under `upstreams`.
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default)]
    pub redirect: Option<RedirectConfig>,
    #[serde(default, rename = "static")]
    pub static_files: Option<StaticConfig>,
    /// Remove the matched prefix before forwarding (`/livekit/sfu/rtc` -> `/rtc`).
    #[serde(default)]
    pub strip_prefix: bool,
    /// Request headers set on the way upstream.
    #[serde(default)]
    pub set_headers: BTreeMap<String, String>,
    /// Request headers removed on the way upstream.
    #[serde(default)]
    pub remove_headers: Vec<String>,
    /// Only these networks may use the route (403 for others).
    #[serde(default)]
    pub allow: Option<Vec<Cidr>>,
    /// Let HTTP/1.1 WebSocket upgrades through (refused everywhere else).
    #[serde(default)]
    pub websocket: bool,
    /// A WebSocket with no traffic either way for this long is closed.
    #[serde(default = "default_websocket_idle_timeout")]
    pub websocket_idle_timeout: Span,
}

fn default_websocket_idle_timeout() -> Span {
    Span(std::time::Duration::from_secs(120))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    /// Where to: an absolute URL.
    pub to: HttpUrl,
    /// 301 (permanent, may become GET), 302, 307 or 308 (default: method kept).
    #[serde(default = "default_redirect_status")]
    pub status: u16,
    /// Append the request's path and query to `to`.
    #[serde(default)]
    pub keep_path: bool,
}

fn default_redirect_status() -> u16 {
    308
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticConfig {
    /// The folder served; nothing outside it ever is (symlinks included).
    /// Relative paths are taken from the config file's directory.
    pub root: PathBuf,
    /// Served for a directory's path ending in `/`.
    #[serde(default = "default_index")]
    pub index: String,
    /// A file (relative to root) answered with 200 for paths that match no
    /// file: single-page applications.
    #[serde(default)]
    pub fallback: Option<String>,
    /// Serve `file.br` / `file.gz` beside `file` when the client accepts them.
    #[serde(default = "default_true")]
    pub precompressed: bool,
    /// `Cache-Control` by path; the first matching pattern wins.
    #[serde(default)]
    pub cache: Vec<CacheRuleConfig>,
}

fn default_index() -> String {
    "index.html".into()
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRuleConfig {
    /// A regular expression on the path below the route, e.g. `^/bundles/`.
    pub pattern: String,
    pub cache_control: String,
}

/// A named upstream: `{ address: 127.0.0.1:8080 }` or `{ members: [...] }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedUpstreamConfig {
    #[serde(default)]
    pub address: Option<UpstreamTarget>,
    #[serde(default)]
    pub members: Vec<UpstreamTarget>,
    #[serde(default)]
    pub balance: Balance,
    /// Active checks; absent: members are only marked down by failed
    /// connections and retried at once.
    #[serde(default)]
    pub health_check: Option<NamedHealthCheckConfig>,
    #[serde(default)]
    pub timeouts: UpstreamTimeoutsConfig,
    /// Caps, queue, ejection and slow start, as `synapse.balancing`.
    #[serde(default)]
    pub balancing: crate::config::balancing::BalancingConfig,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// The member with the fewest requests in flight for its weight.
    #[default]
    LeastOutstanding,
    /// Each member in turn (caps and ejection still apply).
    RoundRobin,
    /// Consistent hashing on the client address: a client stays on its member.
    ClientIp,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedHealthCheckConfig {
    /// `GET` this path; 200 is healthy. Checks run every
    /// `synapse.health_check.interval`, with the workers' checks.
    pub path: String,
    #[serde(default = "default_timeout")]
    pub timeout: Span,
}

fn default_timeout() -> Span {
    Span(std::time::Duration::from_secs(2))
}

/// The named upstreams by name.
pub type UpstreamsConfig = BTreeMap<String, NamedUpstreamConfig>;
