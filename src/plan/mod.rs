//! What the edge does with a request, decided once before anything is
//! read, sent or answered: [`plan`] is a pure function of the snapshot and
//! a [`RequestView`], unit-tested on a table of requests without a socket.
//! A forwarded request is then carried out by an [`attempt::Attempt`].
//! The Pingora hooks (`server::proxy`) apply the plan and decide nothing.

pub mod attempt;

use crate::config::sites::Balance;
use crate::config::Role;
use crate::edge::Edge;
use crate::local::static_files::StaticRoot;
use crate::request::admission::{admit, check_caps, path_of, Admission, RequestFacts};
use crate::request::errors::MatrixError;
use crate::request::response::LocalResponse;
use crate::sites::{Action, RouteFacts, RouteRef, Target};
use crate::synapse::sticky::{self, KeySource};
use crate::synapse::table::Decision;
use crate::upstream::named::UpstreamId;
use crate::upstream::pool::Pool;
use pingora::http::RequestHeader;
use std::borrow::Cow;
use std::net::IpAddr;
use std::time::Duration;

/// What a plan reads of a request.
pub struct RequestView<'a> {
    pub method: &'a http::Method,
    /// The request target exactly as received.
    pub target: &'a [u8],
    /// The target's path (up to `?`).
    pub path: &'a [u8],
    /// `:authority` on HTTP/2, else `Host`.
    pub host: Option<&'a [u8]>,
    pub upgrade: Option<&'a [u8]>,
    pub authorization: Option<&'a [u8]>,
    pub content_length: Option<u64>,
    /// A body is announced (a length above zero, or chunked): an answer
    /// that leaves it unread closes the connection.
    pub has_body: bool,
    /// Total bytes of header names and values.
    pub header_bytes: u64,
    pub header_count: usize,
    /// The client: the peer, or who trusted proxies say it is.
    pub client: Option<IpAddr>,
}

impl<'a> RequestView<'a> {
    pub fn of(request: &'a RequestHeader, client: Option<IpAddr>) -> RequestView<'a> {
        let headers = &request.headers;
        let target = request.raw_path();
        let content_length = content_length(request);
        RequestView {
            method: &request.method,
            target,
            path: path_of(target),
            host: host(request),
            upgrade: headers.get(http::header::UPGRADE).map(|v| v.as_bytes()),
            authorization: headers.get(http::header::AUTHORIZATION).map(|v| v.as_bytes()),
            content_length,
            has_body: has_body(request, content_length),
            header_bytes: headers.iter().map(|(name, value)| (name.as_str().len() + value.len()) as u64).sum(),
            header_count: headers.len(),
            client,
        }
    }

    /// The query after `?`, if any.
    pub fn query(&self) -> Option<&'a [u8]> {
        self.target.get(self.path.len()..)?.strip_prefix(b"?")
    }
}

pub fn content_length(request: &RequestHeader) -> Option<u64> {
    let value = request.headers.get(http::header::CONTENT_LENGTH)?;
    value.to_str().ok()?.trim().parse().ok()
}

/// Whether a request announces a body (which a local answer leaves unread).
pub fn has_body(request: &RequestHeader, content_length: Option<u64>) -> bool {
    content_length.is_some_and(|n| n > 0) || request.headers.contains_key(http::header::TRANSFER_ENCODING)
}

/// The host a request names: `:authority` on HTTP/2, else `Host`.
pub fn host(request: &RequestHeader) -> Option<&[u8]> {
    if request.version == http::Version::HTTP_2 {
        if let Some(authority) = request.uri.authority() {
            return Some(authority.as_str().as_bytes());
        }
    }
    request.headers.get(http::header::HOST).map(|v| v.as_bytes())
}

/// What to do with a request.
pub enum Plan<'a> {
    /// The edge answers (well-known, preflight, redirect, plain-HTTP
    /// redirect); its `close` is set when a request body is left unread.
    Answer(LocalResponse),
    /// The edge refuses, in Matrix JSON.
    Refuse(MatrixError),
    /// A file (or the redirect to its directory) below a site's static root.
    Static {
        root: &'a StaticRoot,
        path: Cow<'a, [u8]>,
    },
    /// An ACME HTTP-01 token, answered from the runtime's challenges.
    AcmeChallenge(&'a [u8]),
    Forward(Forward),
}

impl std::fmt::Debug for Plan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Plan::Answer(response) => write!(f, "Answer({})", response.status),
            Plan::Refuse(error) => write!(f, "Refuse({error})"),
            Plan::Static { path, .. } => write!(f, "Static({})", String::from_utf8_lossy(path)),
            Plan::AcmeChallenge(token) => write!(f, "AcmeChallenge({})", String::from_utf8_lossy(token)),
            Plan::Forward(forward) => write!(f, "Forward({forward:?})"),
        }
    }
}

/// A forwarded request: where, and under which limits.
#[derive(Debug, Clone)]
pub struct Forward {
    pub destination: Destination,
    pub body_limit: u64,
    /// How long the client may pause while sending (through a WebSocket: at all).
    pub read_idle: Duration,
    /// A long-poll's own `timeout`: counted apart, and given that long plus
    /// a margin to answer.
    pub long_poll: Option<Duration>,
    /// What the pool hashes on to keep a user, room or server on one member.
    pub sticky_key: Option<StickyKey>,
    /// A signed federation endpoint with the gate on: judged before a
    /// worker is chosen.
    pub gate: bool,
    /// The configured request rates apply (after the gate, which names the origin).
    pub rate_limited: bool,
    /// Held while Synapse does not accept connections (`synapse.hold`).
    pub hold: Option<HoldPolicy>,
    /// The answer may be compressed for the client (JSON, long enough:
    /// judged again on the answer's header).
    pub compress: Option<crate::request::compress::Compression>,
    /// The request announces a body (read once, with the view).
    pub has_body: bool,
    /// A federation request's cost in its origin's share of Synapse
    /// (`federation.per_origin`); `None`: not counted there.
    pub turn_cost: Option<u32>,
    /// The media cache's key for this file; `None`: not cached.
    pub media_key: Option<String>,
}

/// How long a request may wait for its upstream to come back, and how
/// many may wait at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldPolicy {
    pub limit: Duration,
    pub most: usize,
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// The edge answers (a local responder or a refusal), or nothing is decided yet.
    Edge,
    /// A Synapse process, as the table's decision says.
    Synapse(Decision),
    /// A named upstream, for a site route.
    Named(RouteRef, UpstreamId),
}

impl Destination {
    /// The pool serving this destination, if any.
    pub fn pool(self, edge: &Edge) -> Option<&Pool> {
        match self {
            Destination::Named(_, id) => Some(&edge.upstreams.get(id).pool),
            Destination::Synapse(decision) => edge.pools.get(decision.group),
            Destination::Edge => None,
        }
    }
}

/// A sticky key, owned: the plan outlives the request header it came from.
/// Keys (a user's localpart, a room ID, a server name, an address) are
/// short, so they are kept inline and the request path allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StickyKey {
    Inline { bytes: [u8; INLINE_KEY], len: u8 },
    Heap(Box<[u8]>),
}

const INLINE_KEY: usize = 64;

impl StickyKey {
    pub fn new(key: &[u8]) -> StickyKey {
        match u8::try_from(key.len()) {
            Ok(len) if key.len() <= INLINE_KEY => {
                let mut bytes = [0u8; INLINE_KEY];
                bytes[..key.len()].copy_from_slice(key);
                StickyKey::Inline { bytes, len }
            }
            _ => StickyKey::Heap(key.into()),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            StickyKey::Inline { bytes, len } => &bytes[..usize::from(*len)],
            StickyKey::Heap(bytes) => bytes,
        }
    }
}

/// Decides what the edge does with a request on a listener with `roles`.
pub fn plan<'a>(edge: &'a Edge, roles: &[Role], view: &RequestView<'a>) -> Plan<'a> {
    let facts = RequestFacts {
        target: view.target,
        has_upgrade: view.upgrade.is_some(),
        admin_allowed: edge.admin_allowed(view.client),
        mas_api_allowed: edge.mas_api_allowed(view.client),
        is_options: *view.method == http::Method::OPTIONS,
        content_length: view.content_length,
        header_bytes: view.header_bytes,
        header_count: view.header_count,
    };
    let (_, target) = edge.sites.target(roles, view.host, view.path);
    if let Target::Matrix = target {
        return matrix(edge, admit(roles, &facts, &edge.policy.limits), view);
    }
    // Matrix admission checks the caps itself; every other target here.
    if let Err(error) = check_caps(&facts, &edge.policy.limits) {
        return Plan::Refuse(error);
    }
    match target {
        Target::Route(at, _) => route(edge, at, view),
        Target::AcmeChallenge(token) => Plan::AcmeChallenge(token),
        Target::ToHttps => {
            let mut response = crate::local::plain_http::to_https(view.host, edge.policy.https_port, view.target);
            response.close |= view.has_body;
            Plan::Answer(response)
        }
        Target::UnknownHost => Plan::Refuse(MatrixError::misdirected()),
        Target::Matrix | Target::NoRoute => Plan::Refuse(MatrixError::not_found("Nothing is served at this path")),
    }
}

/// Synapse's paths: a well-known document, a preflight, a refusal, or a
/// Synapse process by its routing table.
fn matrix<'a>(edge: &Edge, admission: Admission, view: &RequestView<'a>) -> Plan<'a> {
    let answer = |mut response: LocalResponse| {
        response.close = view.has_body;
        Plan::Answer(response)
    };
    match admission {
        Admission::Forward { body_limit } => {
            let decision = edge.router.route(view.method.as_str(), view.target);
            let sticky_key = edge.pools.get(decision.group).and_then(|_| {
                let source =
                    KeySource { target: view.target, authorization: view.authorization, client_ip: view.client };
                let key = sticky::key(decision.sticky, &source)?;
                Some(StickyKey::new(key.as_bytes()))
            });
            let policy = &edge.policy;
            Plan::Forward(Forward {
                destination: Destination::Synapse(decision),
                body_limit,
                read_idle: policy.connections.body_idle_timeout,
                long_poll: crate::synapse::long_poll::long_poll_timeout(view.target),
                sticky_key,
                gate: policy.federation_gate.is_some() && crate::federation::gate::is_signed_endpoint(view.path),
                rate_limited: !policy.rate_limits.is_empty(),
                hold: (!policy.hold.is_zero()).then_some(HoldPolicy { limit: policy.hold, most: policy.hold_limit }),
                compress: policy.compression.filter(|_| crate::request::compress::path_allows(view.path)),
                has_body: view.has_body,
                turn_cost: policy
                    .turns
                    .as_ref()
                    .filter(|_| crate::federation::gate::is_signed_endpoint(view.path))
                    .map(|turns| turns.weights.of(view.path)),
                media_key: policy
                    .media_cache
                    .and_then(|_| crate::request::media::key(view.method, view.path, query_of(view.target))),
            })
        }
        Admission::WellKnown(document) => answer(edge.well_known.respond(document, view.method)),
        Admission::Preflight(kind) => answer(crate::local::preflight::answer(kind)),
        Admission::Reject(error) => Plan::Refuse(error),
    }
}

/// A site route: admitted there, then its upstream or its local responder.
fn route<'a>(edge: &'a Edge, at: RouteRef, view: &RequestView<'a>) -> Plan<'a> {
    let facts = RouteFacts {
        target: view.target,
        upgrade: view.upgrade,
        client: view.client,
        content_length: view.content_length,
    };
    let body_limit = match edge.sites.admit_route(at, &facts, &edge.policy.limits) {
        Ok(limit) => limit,
        Err(error) => return Plan::Refuse(error),
    };
    let route = edge.sites.route(at);
    match &route.action {
        Action::Upstream(id) => Plan::Forward(Forward {
            destination: Destination::Named(at, *id),
            body_limit,
            read_idle: match route.websocket_idle {
                Some(idle) if view.upgrade.is_some() => idle,
                _ => edge.policy.connections.body_idle_timeout,
            },
            long_poll: None,
            sticky_key: client_ip_key(edge.upstreams.get(*id).balance, view.client),
            gate: false,
            rate_limited: false,
            hold: None,
            compress: None,
            has_body: view.has_body,
            turn_cost: None,
            media_key: None,
        }),
        Action::Redirect(redirect) => {
            let mut response = redirect.respond(view.target);
            response.close = view.has_body;
            Plan::Answer(response)
        }
        Action::Static(root) => {
            let path = route.rewritten_target(view.path).map_or(Cow::Borrowed(view.path), Cow::Owned);
            Plan::Static { root, path }
        }
    }
}

/// A named upstream balanced by client address hashes the address's own octets.
fn client_ip_key(balance: Balance, client: Option<IpAddr>) -> Option<StickyKey> {
    match (balance, client?) {
        (Balance::ClientIp, IpAddr::V4(ip)) => Some(StickyKey::new(&ip.octets())),
        (Balance::ClientIp, IpAddr::V6(ip)) => Some(StickyKey::new(&ip.octets())),
        _ => None,
    }
}

/// The target's query (after `?`), if any.
fn query_of(target: &[u8]) -> Option<&[u8]> {
    target.iter().position(|&b| b == b'?').map(|at| &target[at + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Source;
    use crate::synapse::table::Group;

    const CONFIG: &str = r#"
server_name: example.com
listeners: [{ address: "127.0.0.1:1", serves: [well_known, client, federation, sites] }]
well_known: { server: "example.com:443", client: { homeserver: "https://example.com" } }
synapse:
  main: 127.0.0.1:8008
  hold: 10s
  hold_limit: 5
  workers:
    synchrotron: [127.0.0.1:8083, 127.0.0.1:8084]
    federation_inbound: [127.0.0.1:8089]
  media_cache: { memory: 16M, max_object: 1M }
upstreams:
  app: { address: 127.0.0.1:8070, balance: client_ip }
  livekit: { address: 127.0.0.1:7880 }
rate_limits:
  login: { requests: 5, per: 1m }
sites:
  - hosts: [app.example.com]
    routes:
      - { prefix: /old/, redirect: { to: "https://new.example.com", status: 301 } }
      - { prefix: /rtc/, upstream: livekit, websocket: true, websocket_idle_timeout: 120s }
      - { prefix: /, upstream: app }
"#;

    fn edge() -> Edge {
        let source = Source { file: "plan-test.yaml".into(), text: CONFIG.into() };
        Edge::from_config(source.parse().unwrap(), &source).unwrap()
    }

    const ALL: [Role; 4] = [Role::WellKnown, Role::Client, Role::Federation, Role::Sites];

    fn request(method: &str, target: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut request = RequestHeader::build(method, target.as_bytes(), None).unwrap();
        for (name, value) in headers {
            request.insert_header(name.to_string(), *value).unwrap();
        }
        request
    }

    fn plan_of<'a>(edge: &'a Edge, request: &'a RequestHeader) -> Plan<'a> {
        let view = RequestView::of(request, Some(IpAddr::from([10, 0, 0, 7])));
        plan(edge, &ALL, &view)
    }

    fn forward(plan: Plan<'_>) -> Forward {
        match plan {
            Plan::Forward(forward) => forward,
            other => panic!("not forwarded: {other:?}"),
        }
    }

    fn group(forward: &Forward) -> Group {
        match forward.destination {
            Destination::Synapse(decision) => decision.group,
            other => panic!("not to Synapse: {other:?}"),
        }
    }

    const HOST: (&str, &str) = ("Host", "example.com");

    #[test]
    fn a_sync_goes_to_a_synchrotron_as_a_long_poll_sticky_by_user() {
        let edge = edge();
        let sync = request(
            "GET",
            "/_matrix/client/v3/sync?since=s1&timeout=30000",
            &[HOST, ("Authorization", "Bearer syt_alice_x_y")],
        );
        let forward = forward(plan_of(&edge, &sync));
        assert_eq!(group(&forward), Group::Synchrotron);
        assert_eq!(forward.long_poll, Some(Duration::from_secs(30)));
        assert_eq!(forward.sticky_key.as_ref().map(StickyKey::as_bytes), Some(&b"alice"[..]));
        assert!(!forward.gate, "client requests are not signed");
        assert!(forward.compress.is_some(), "sync answers are compressed");
        let login = request("POST", "/_matrix/client/v3/login", &[HOST]);
        assert!(forward_or_none(plan_of(&edge, &login)).is_some_and(|f| f.compress.is_none()), "login carries a token");
        assert_eq!(forward.hold, Some(HoldPolicy { limit: Duration::from_secs(10), most: 5 }));
        assert!(forward.rate_limited);
    }

    #[test]
    fn a_signed_federation_request_is_gated_and_sticky_by_origin() {
        let edge = edge();
        let auth = r#"X-Matrix origin="other.example",destination="example.com",key="ed25519:a",sig="x""#;
        let send = request("PUT", "/_matrix/federation/v1/send/1", &[HOST, ("Authorization", auth)]);
        let forward = forward(plan_of(&edge, &send));
        assert_eq!(group(&forward), Group::FederationInbound);
        assert!(forward.gate);
        assert_eq!(forward.sticky_key.as_ref().map(StickyKey::as_bytes), Some(&b"other.example"[..]));
        assert_eq!(forward.turn_cost, Some(1), "a transaction counts one unit of its origin's share");
        let backfill =
            request("GET", "/_matrix/federation/v1/backfill/!r:a?v=%24e&limit=100", &[HOST, ("Authorization", auth)]);
        assert_eq!(forward_or_none(plan_of(&edge, &backfill)).and_then(|f| f.turn_cost), Some(4));
        let keys = request("GET", "/_matrix/key/v2/server", &[HOST]);
        let keys = forward_or_none(plan_of(&edge, &keys));
        assert!(!keys.as_ref().is_some_and(|f| f.gate), "key requests are unsigned");
        assert!(keys.is_some_and(|f| f.turn_cost.is_none()), "nor counted in a share");
    }

    #[test]
    fn media_downloads_get_a_cache_key_and_nothing_else_does() {
        let edge = edge();
        let download =
            request("GET", "/_matrix/client/v1/media/thumbnail/a.org/x?height=8&width=8&timeout_ms=1", &[HOST]);
        assert_eq!(
            forward(plan_of(&edge, &download)).media_key.as_deref(),
            Some("/_matrix/client/v1/media/thumbnail/a.org/x&height=8&width=8")
        );
        let upload = request("POST", "/_matrix/media/v3/upload", &[HOST, ("Content-Length", "0")]);
        assert_eq!(forward(plan_of(&edge, &upload)).media_key, None);
        let sync = request("GET", "/_matrix/client/v3/sync", &[HOST]);
        assert_eq!(forward(plan_of(&edge, &sync)).media_key, None);
    }

    fn forward_or_none(plan: Plan<'_>) -> Option<Forward> {
        match plan {
            Plan::Forward(forward) => Some(forward),
            _ => None,
        }
    }

    #[test]
    fn well_known_is_answered_and_a_body_left_unread_closes() {
        let edge = edge();
        let plain = request("GET", "/.well-known/matrix/server", &[HOST]);
        let Plan::Answer(response) = plan_of(&edge, &plain) else { panic!("not answered") };
        assert_eq!((response.status, response.close), (200, false));
        assert!(String::from_utf8_lossy(&response.body).contains("example.com:443"));
        let with_body = request("POST", "/.well-known/matrix/server", &[HOST, ("Content-Length", "5")]);
        assert!(matches!(plan_of(&edge, &with_body), Plan::Answer(response) if response.close));
    }

    #[test]
    fn refusals_are_planned_not_sent() {
        let edge = edge();
        let unknown = request("GET", "/", &[("Host", "elsewhere.example")]);
        assert!(matches!(plan_of(&edge, &unknown), Plan::Refuse(error) if error.status == 421));
        let replication = request("POST", "/_synapse/replication/x", &[HOST]);
        assert!(matches!(plan_of(&edge, &replication), Plan::Refuse(error) if error.status == 404));
        let huge = request("GET", "/", &[("Host", "app.example.com"), ("X-Big", &"a".repeat(70_000))]);
        assert!(matches!(plan_of(&edge, &huge), Plan::Refuse(error) if error.status == 431));
    }

    #[test]
    fn site_routes_forward_redirect_and_keep_websockets_open_longer() {
        let edge = edge();
        let app = request("GET", "/x?y=1", &[("Host", "app.example.com")]);
        let forward = forward(plan_of(&edge, &app));
        assert!(matches!(forward.destination, Destination::Named(..)));
        assert_eq!(forward.sticky_key.as_ref().map(StickyKey::as_bytes), Some(&[10, 0, 0, 7][..]));
        assert!(!forward.gate && !forward.rate_limited && forward.hold.is_none());
        let old = request("GET", "/old/a", &[("Host", "app.example.com")]);
        assert!(matches!(plan_of(&edge, &old), Plan::Answer(response) if response.status == 301));
        let socket = request("GET", "/rtc/", &[("Host", "app.example.com"), ("Upgrade", "websocket")]);
        assert_eq!(forward_or_none(plan_of(&edge, &socket)).map(|f| f.read_idle), Some(Duration::from_secs(120)));
    }

    #[test]
    fn sticky_keys_are_kept_inline_unless_long() {
        assert!(matches!(StickyKey::new(b"alice"), StickyKey::Inline { .. }));
        assert_eq!(StickyKey::new(b"alice").as_bytes(), b"alice");
        let long = vec![b'x'; 300];
        assert!(matches!(StickyKey::new(&long), StickyKey::Heap(_)));
        assert_eq!(StickyKey::new(&long).as_bytes(), &long[..]);
    }

    #[test]
    fn the_view_splits_the_target_once() {
        let request = request("GET", "/a/b?c=d&e", &[HOST]);
        let view = RequestView::of(&request, None);
        assert_eq!((view.path, view.query()), (&b"/a/b"[..], Some(&b"c=d&e"[..])));
        let bare = RequestHeader::build("GET", b"/a", None).unwrap();
        assert_eq!(RequestView::of(&bare, None).query(), None);
    }
}
