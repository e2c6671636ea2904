//! Virtual hosts: which site a request is for (its Host, or `:authority` on
//! HTTP/2), then what that site's router decides: the Matrix paths (Synapse's
//! own table, in `synapse`), a named upstream, or a local responder.
//!
//! Choosing is one hash lookup on the host (exact, then `*.parent`) with no
//! allocation, and one scan of the site's few routes: exact paths first,
//! then the longest prefix, as nginx's `location =` and prefix locations.

mod build;

use crate::config::Role;
use crate::local::redirect::Redirect;
use crate::local::static_files::StaticRoot;
use crate::request::admission::{normalised_views, path_of, Limits};
use crate::request::errors::MatrixError;
use crate::upstream::named::UpstreamId;
use http::{HeaderName, HeaderValue};
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

/// The Matrix site is always the first.
pub const MATRIX_SITE: usize = 0;

pub struct Sites {
    sites: Vec<Site>,
    exact: HashMap<Box<str>, usize>,
    wildcard: HashMap<Box<str>, usize>,
    /// No `sites` configured: the Matrix site answers every host, as it did
    /// before there were sites.
    matrix_answers_every_host: bool,
}

pub struct Site {
    /// As configured (lowercase), for `routes` and errors.
    pub hosts: Vec<String>,
    pub routes: Vec<SiteRoute>,
}

pub struct SiteRoute {
    pub matcher: PathMatch,
    pub action: Action,
    /// Networks allowed to use the route; `None`: everyone.
    pub allow: Option<Vec<ipnet::IpNet>>,
    /// WebSocket upgrades allowed, closed after this long idle.
    pub websocket_idle: Option<Duration>,
    pub strip_prefix: bool,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    pub remove_headers: Vec<HeaderName>,
    /// Where it is in the file, for `route` explanations.
    pub position: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

impl PathMatch {
    fn matches(&self, path: &[u8]) -> bool {
        match self {
            PathMatch::Exact(exact) => path == exact.as_bytes(),
            PathMatch::Prefix(prefix) => path.starts_with(prefix.as_bytes()),
        }
    }
}

impl std::fmt::Display for PathMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathMatch::Exact(path) => write!(f, "path {path}"),
            PathMatch::Prefix(prefix) => write!(f, "prefix {prefix}"),
        }
    }
}

/// What a site route does with a request.
pub enum Action {
    Upstream(UpstreamId),
    Redirect(Redirect),
    Static(StaticRoot),
}

/// Where a request goes, before any Matrix-specific admission.
pub enum Target<'a> {
    /// Synapse's paths on the Matrix site: admission, well-known and the worker table.
    Matrix,
    /// A site route: a named upstream or a local responder.
    Route(RouteRef, &'a SiteRoute),
    /// A known site with no route for the path.
    NoRoute,
    /// No site here answers this host (on this listener).
    UnknownHost,
    /// An ACME HTTP-01 challenge token (`acme` listeners).
    AcmeChallenge(&'a [u8]),
    /// Anything else on a `redirect` listener: the same URL over https.
    ToHttps,
}

/// A route by position, for the request context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRef {
    pub site: usize,
    pub route: usize,
}

/// The paths Synapse and the well-known documents own on the Matrix site;
/// `matrix_site.routes` never see them.
const MATRIX_PREFIXES: [&[u8]; 3] = [b"/_matrix", b"/_synapse", b"/.well-known/matrix"];

pub fn is_matrix_path(path: &[u8]) -> bool {
    MATRIX_PREFIXES.iter().any(|prefix| {
        path.len() >= prefix.len()
            && path[..prefix.len()].eq_ignore_ascii_case(prefix)
            && matches!(path.get(prefix.len()), None | Some(b'/'))
    })
}

impl Sites {
    /// The site for a Host value (port, case and a trailing dot ignored).
    pub fn pick(&self, host: Option<&[u8]>) -> Option<usize> {
        if self.matrix_answers_every_host {
            return Some(MATRIX_SITE);
        }
        let Some(host) = host else {
            // HTTP/1.0 without Host: only the Matrix site can be meant.
            return Some(MATRIX_SITE);
        };
        let mut buffer = [0u8; 256];
        let name = normalise_host(host, &mut buffer)?;
        if let Some(&site) = self.exact.get(name) {
            return Some(site);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).copied()
    }

    /// The target of a request, all of it decided here.
    pub fn target<'p>(&'p self, roles: &[Role], host: Option<&[u8]>, path: &'p [u8]) -> (Option<usize>, Target<'p>) {
        if roles.contains(&Role::Acme) {
            if let Some(token) = path.strip_prefix(crate::local::plain_http::ACME_CHALLENGE_PREFIX) {
                return (None, Target::AcmeChallenge(token));
            }
        }
        let Some(site) = self.pick(host) else { return (None, Target::UnknownHost) };
        if roles.contains(&Role::Redirect) {
            return (Some(site), Target::ToHttps);
        }
        let matrix_listener = roles.iter().any(|r| matches!(r, Role::Client | Role::WellKnown | Role::Federation));
        if site == MATRIX_SITE {
            if !matrix_listener {
                return (Some(site), Target::UnknownHost);
            }
            // Federation-only listeners (8448) serve nothing but Matrix paths.
            let routes_served = roles.iter().any(|r| matches!(r, Role::Client | Role::WellKnown));
            if is_matrix_path(path) || !routes_served {
                return (Some(site), Target::Matrix);
            }
            return match self.sites[site].route(path) {
                Some(route) => (Some(site), Target::Route(RouteRef { site, route }, &self.sites[site].routes[route])),
                None => (Some(site), Target::Matrix),
            };
        }
        if !roles.contains(&Role::Sites) {
            return (Some(site), Target::UnknownHost);
        }
        match self.sites[site].route(path) {
            Some(route) => (Some(site), Target::Route(RouteRef { site, route }, &self.sites[site].routes[route])),
            None => (Some(site), Target::NoRoute),
        }
    }

    pub fn route(&self, at: RouteRef) -> &SiteRoute {
        &self.sites[at.site].routes[at.route]
    }

    /// Whether a site route admits a request, and the body limit if so.
    /// The allow-list holds for every reading of the path an upstream might
    /// take (decoded, `//` merged, dot segments resolved), so `/api/%61dmin/`
    /// cannot reach what `/api/admin/` may not.
    pub fn admit_route(&self, at: RouteRef, facts: &RouteFacts<'_>, limits: &Limits) -> Result<u64, MatrixError> {
        let route = self.route(at);
        let path = path_of(facts.target);
        let site = &self.sites[at.site];
        let refused = |route: &SiteRoute| !route.allows(facts.client);
        if refused(route)
            || normalised_views(path)
                .iter()
                .filter_map(|view| site.route(view.as_bytes()))
                .any(|other| refused(&site.routes[other]))
        {
            return Err(MatrixError::forbidden("This path is not available from this address"));
        }
        if let Some(upgrade) = facts.upgrade {
            if route.websocket_idle.is_none() {
                return Err(MatrixError::bad_request("Protocol upgrades are not allowed on this path"));
            }
            if !upgrade.trim_ascii().eq_ignore_ascii_case(b"websocket") {
                return Err(MatrixError::bad_request("Only WebSocket upgrades are allowed"));
            }
        }
        if facts.content_length.is_some_and(|length| length > limits.max_upload_size) {
            return Err(MatrixError::too_large(limits.max_upload_size));
        }
        Ok(limits.max_upload_size)
    }

    pub fn site(&self, index: usize) -> &Site {
        &self.sites[index]
    }

    pub fn all(&self) -> &[Site] {
        &self.sites
    }

    /// Whether the Matrix site answers every host (no `sites` configured).
    pub fn single_site(&self) -> bool {
        self.matrix_answers_every_host
    }
}

impl Site {
    /// Exact paths first, then the longest prefix (routes are stored in that order).
    pub fn route(&self, path: &[u8]) -> Option<usize> {
        self.routes.iter().position(|route| route.matcher.matches(path))
    }
}

/// What route admission looks at.
pub struct RouteFacts<'a> {
    pub target: &'a [u8],
    /// The `Upgrade` header's value, if any.
    pub upgrade: Option<&'a [u8]>,
    pub client: Option<IpAddr>,
    pub content_length: Option<u64>,
}

impl SiteRoute {
    pub fn allows(&self, client: Option<IpAddr>) -> bool {
        match &self.allow {
            None => true,
            Some(networks) => crate::request::forward::in_networks(networks, client),
        }
    }

    /// The path the upstream gets: the matched prefix removed when asked
    /// (never empty: `/` at least); otherwise `None`, the target untouched.
    pub fn rewritten_target(&self, target: &[u8]) -> Option<Vec<u8>> {
        let PathMatch::Prefix(prefix) = &self.matcher else { return None };
        if !self.strip_prefix {
            return None;
        }
        let rest = target.get(prefix.len()..).unwrap_or_default();
        let mut out = Vec::with_capacity(rest.len() + 1);
        if !rest.starts_with(b"/") {
            out.push(b'/');
        }
        out.extend_from_slice(rest);
        Some(out)
    }
}

/// The host name in `buffer`, lowercase, without port or trailing dot;
/// `None` when it cannot be a host name.
fn normalise_host<'b>(host: &[u8], buffer: &'b mut [u8; 256]) -> Option<&'b str> {
    let name = if host.first() == Some(&b'[') {
        // An IPv6 literal keeps its brackets; the port follows them.
        let end = host.iter().position(|&b| b == b']')?;
        &host[..=end]
    } else {
        match host.iter().rposition(|&b| b == b':') {
            Some(colon) => &host[..colon],
            None => host,
        }
    };
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > buffer.len() {
        return None;
    }
    let out = &mut buffer[..name.len()];
    for (slot, byte) in out.iter_mut().zip(name) {
        *slot = byte.to_ascii_lowercase();
    }
    std::str::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_compared_without_port_case_or_trailing_dot() {
        let mut buffer = [0u8; 256];
        assert_eq!(normalise_host(b"Element.Example.COM:443", &mut buffer), Some("element.example.com"));
        assert_eq!(normalise_host(b"example.com.", &mut buffer), Some("example.com"));
        assert_eq!(normalise_host(b"[::1]:8448", &mut buffer), Some("[::1]"));
        assert_eq!(normalise_host(b"", &mut buffer), None);
        assert_eq!(normalise_host(&[b'a'; 300], &mut buffer), None);
    }

    #[test]
    fn matrix_paths_are_recognised_in_any_case() {
        for path in
            ["/_matrix/client/versions", "/_synapse/admin", "/.well-known/matrix/server", "/_MATRIX/x", "/_matrix"]
        {
            assert!(is_matrix_path(path.as_bytes()), "{path}");
        }
        for path in ["/", "/_matrixx", "/auth/login", "/.well-known/openid-configuration"] {
            assert!(!is_matrix_path(path.as_bytes()), "{path}");
        }
    }

    #[test]
    fn prefix_stripping_keeps_a_leading_slash_and_the_query() {
        let route = |prefix: &str, strip| SiteRoute {
            matcher: PathMatch::Prefix(prefix.into()),
            action: Action::Upstream(UpstreamId(0)),
            allow: None,
            websocket_idle: None,
            strip_prefix: strip,
            set_headers: vec![],
            remove_headers: vec![],
            position: String::new(),
        };
        assert_eq!(route("/livekit/sfu", true).rewritten_target(b"/livekit/sfu/rtc?x=1"), Some(b"/rtc?x=1".to_vec()));
        assert_eq!(route("/livekit/jwt/", true).rewritten_target(b"/livekit/jwt/sfu/get"), Some(b"/sfu/get".to_vec()));
        assert_eq!(route("/livekit/jwt/", true).rewritten_target(b"/livekit/jwt/"), Some(b"/".to_vec()));
        assert_eq!(route("/x", false).rewritten_target(b"/x/y"), None);
    }
}
