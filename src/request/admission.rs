//! Which requests a listener accepts, before any routing.
//!
//! Policy is decided on normalised views of the path (percent-decoded up to
//! twice, `//` merged, dot segments resolved, lowercased) so that encoded,
//! doubled-slash or dot-segment variants cannot slip past a rule; the request
//! itself is always forwarded with its original bytes.

use crate::config::{FederationMode, Role};
use crate::request::errors::MatrixError;
use std::borrow::Cow;

/// A well-known document the edge answers itself (rendered in
/// `local::well_known`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Document {
    Server,
    Client,
    Support,
}

impl Document {
    /// The document a request path asks for, compared byte for byte.
    pub fn from_path(path: &[u8]) -> Option<Document> {
        match path.strip_prefix(b"/.well-known/matrix/")? {
            b"server" => Some(Document::Server),
            b"client" => Some(Document::Client),
            b"support" => Some(Document::Support),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Document::Server => "server",
            Document::Client => "client",
            Document::Support => "support",
        }
    }
}

/// What to do with a request, decided from its target and the listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Answer from the edge's own well-known documents.
    WellKnown(Document),
    /// A CORS preflight on a Matrix path, answered by the edge.
    Preflight(Preflight),
    /// Forward to Synapse, with the body limit for this path.
    Forward { body_limit: u64 },
    /// Answer with this error.
    Reject(MatrixError),
}

/// Which CORS preflight answer a Matrix path gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preflight {
    /// Synapse's own CORS headers. Answered by the edge for every Matrix
    /// path, refused ones included: a browser that gets a refusal to its
    /// preflight never sends the request, and reports "Failed to fetch"
    /// instead of the JSON refusal the request itself gets.
    Matrix,
    /// QR-code login's rendezvous: `If-Match`/`If-None-Match` allowed and
    /// `ETag` exposed, as those endpoints need.
    Rendezvous,
}

/// The request facts admission depends on.
pub struct RequestFacts<'a> {
    /// The request target exactly as received.
    pub target: &'a [u8],
    pub has_upgrade: bool,
    /// The client's address is in `admin_api.allow`.
    pub admin_allowed: bool,
    /// The client's address is in `admin_api.mas_allow`.
    pub mas_api_allowed: bool,
    pub is_options: bool,
    pub content_length: Option<u64>,
    /// Total bytes of header names and values.
    pub header_bytes: u64,
    pub header_count: usize,
}

pub struct Limits {
    pub max_upload_size: u64,
    pub federation_max_body: u64,
    pub max_target_bytes: u64,
    pub max_header_bytes: u64,
    pub max_headers: usize,
    pub federation: FederationMode,
}

impl Limits {
    pub fn from_config(limits: &crate::config::LimitsConfig) -> Limits {
        Limits {
            max_upload_size: limits.max_upload_size.0,
            federation_max_body: limits.federation_max_body.0,
            max_target_bytes: limits.max_target_bytes.0,
            max_header_bytes: limits.max_header_bytes.0,
            max_headers: limits.max_headers,
            federation: FederationMode::Open,
        }
    }
}

/// Paths no listener ever forwards: worker replication and metrics.
const NEVER_PUBLIC: [&str; 2] = ["/_synapse/replication", "/_synapse/metrics"];
const ADMIN: &str = "/_synapse/admin";
const CLIENT_PREFIXES: [&str; 2] = ["/_matrix/", "/_synapse/client/"];
const FEDERATION_PREFIXES: [&str; 3] = ["/_matrix/federation/", "/_matrix/key/", "/_matrix/media/"];
const FEDERATION_BODY_PREFIX: &str = "/_matrix/federation/";
/// MAS's private API into Synapse, authenticated by the shared secret alone.
const MAS_API: &str = "/_synapse/mas";
/// The one federation endpoint a non-federating homeserver still needs:
/// lk-jwt-service checks Element Call users' OpenID tokens there.
const OPENID_USERINFO: &str = "/_matrix/federation/v1/openid/userinfo";
const FEDERATION_API: [&str; 2] = ["/_matrix/federation/", "/_matrix/key/"];
/// Where browsers send CORS preflights the edge answers.
const MATRIX_PATHS: [&str; 2] = ["/_matrix/", "/_synapse/"];
/// QR-code login's rendezvous endpoints (MSC4108, MSC4388).
const RENDEZVOUS: [&str; 3] = [
    "/_matrix/client/unstable/org.matrix.msc4108/rendezvous",
    "/_matrix/client/unstable/io.element.msc4388/rendezvous",
    "/_synapse/client/rendezvous",
];

/// The size caps and the target form, which every request on every site meets.
pub fn check_caps(facts: &RequestFacts<'_>, limits: &Limits) -> Result<(), MatrixError> {
    if facts.target.len() as u64 > limits.max_target_bytes {
        return Err(MatrixError::target_too_long(limits.max_target_bytes));
    }
    if facts.header_bytes > limits.max_header_bytes || facts.header_count > limits.max_headers {
        return Err(MatrixError::headers_too_large(limits.max_header_bytes, limits.max_headers));
    }
    if facts.target.first() != Some(&b'/') {
        return Err(MatrixError::bad_request("Only origin-form request targets (starting with '/') are accepted"));
    }
    Ok(())
}

pub fn admit(roles: &[Role], facts: &RequestFacts<'_>, limits: &Limits) -> Admission {
    if let Err(error) = check_caps(facts, limits) {
        return Admission::Reject(error);
    }
    let path = path_of(facts.target);
    if roles.contains(&Role::WellKnown) {
        if let Some(document) = Document::from_path(path) {
            return Admission::WellKnown(document);
        }
    }
    let views = normalised_views(path);
    let any_view = |test: &dyn Fn(&str) -> bool| views.iter().any(|v| test(v));
    if facts.is_options && any_view(&|v| MATRIX_PATHS.iter().any(|p| v.starts_with(p))) {
        let rendezvous = views.iter().all(|v| RENDEZVOUS.iter().any(|p| v.starts_with(p)));
        return Admission::Preflight(if rendezvous { Preflight::Rendezvous } else { Preflight::Matrix });
    }
    if any_view(&|v| NEVER_PUBLIC.iter().any(|p| v.starts_with(p))) {
        return Admission::Reject(MatrixError::unrecognized());
    }
    let is_admin = any_view(&|v| v.starts_with(ADMIN));
    if is_admin && !facts.admin_allowed {
        return Admission::Reject(MatrixError::forbidden("The admin API is not available from this address"));
    }
    let is_mas_api =
        any_view(&|v| v.starts_with(MAS_API) && matches!(v.as_bytes().get(MAS_API.len()), None | Some(b'/')));
    if is_mas_api && !facts.mas_api_allowed {
        // Not public, like replication: to anyone else the path does not exist.
        return Admission::Reject(MatrixError::unrecognized());
    }
    if limits.federation == FederationMode::OpenidOnly
        && any_view(&|v| FEDERATION_API.iter().any(|p| v.starts_with(p)))
        && !views.iter().all(|v| v == OPENID_USERINFO)
    {
        return Admission::Reject(MatrixError::unrecognized());
    }
    let allowed_by = |v: &str| {
        roles.iter().any(|role| match role {
            Role::WellKnown | Role::Sites | Role::Acme | Role::Redirect => false,
            Role::Client => {
                CLIENT_PREFIXES.iter().any(|p| v.starts_with(p))
                    || (is_admin && v.starts_with(ADMIN))
                    || (is_mas_api && v.starts_with(MAS_API))
            }
            Role::Federation => FEDERATION_PREFIXES.iter().any(|p| v.starts_with(p)),
        })
    };
    if !views.iter().all(|v| allowed_by(v)) {
        return Admission::Reject(MatrixError::unrecognized());
    }
    if facts.has_upgrade {
        return Admission::Reject(MatrixError::bad_request("Protocol upgrades are not supported on Matrix endpoints"));
    }
    let federation = views.iter().all(|v| v.starts_with(FEDERATION_BODY_PREFIX));
    let body_limit = if federation { limits.federation_max_body } else { limits.max_upload_size };
    if facts.content_length.is_some_and(|length| length > body_limit) {
        return Admission::Reject(MatrixError::too_large(body_limit));
    }
    Admission::Forward { body_limit }
}

/// The path part of an origin-form target.
pub fn path_of(target: &[u8]) -> &[u8] {
    match target.iter().position(|&b| b == b'?') {
        Some(end) => &target[..end],
        None => target,
    }
}

/// The path as Synapse, a lenient server, or an attacker might read it.
/// Usually one view borrowed from the request; more only for unusual paths.
pub fn normalised_views(path: &[u8]) -> Vec<Cow<'_, str>> {
    let mut views: Vec<Cow<'_, str>> = vec![normalise(path)];
    let mut current = percent_decode(path);
    // Two rounds of decoding catch `%252e`-style double encoding.
    for _ in 0..2 {
        let Some(decoded) = current else { break };
        let normal = normalise(&decoded).into_owned();
        if !views.iter().any(|v| *v == normal) {
            views.push(Cow::Owned(normal));
        }
        current = percent_decode(&decoded);
    }
    views
}

fn needs_normalising(path: &[u8]) -> bool {
    path.iter().any(|b| b.is_ascii_uppercase() || !b.is_ascii_graphic() || *b == b'\\')
        || path.windows(2).any(|w| w == b"//" || w == b"/.")
}

fn normalise(path: &[u8]) -> Cow<'_, str> {
    if !needs_normalising(path) {
        if let Ok(text) = std::str::from_utf8(path) {
            return Cow::Borrowed(text);
        }
    }
    let lowered = String::from_utf8_lossy(path).to_ascii_lowercase().replace('\\', "/");
    let mut segments: Vec<&str> = Vec::new();
    for segment in lowered.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(lowered.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if lowered.ends_with('/') || lowered.ends_with("/.") || lowered.ends_with("/..") || out.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

/// One round of percent-decoding, or `None` when there is nothing to decode.
pub fn percent_decode(input: &[u8]) -> Option<Vec<u8>> {
    if !input.contains(&b'%') {
        return None;
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    let mut changed = false;
    while i < input.len() {
        if input[i] == b'%' && i + 2 < input.len() {
            if let (Some(hi), Some(lo)) = (hex(input[i + 1]), hex(input[i + 2])) {
                out.push(hi << 4 | lo);
                i += 3;
                changed = true;
                continue;
            }
        }
        out.push(input[i]);
        i += 1;
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_upload_size: 100,
        federation_max_body: 1000,
        max_target_bytes: 200,
        max_header_bytes: 300,
        max_headers: 5,
        federation: FederationMode::Open,
    };
    const CLIENT: &[Role] = &[Role::WellKnown, Role::Client, Role::Federation];
    const FEDERATION: &[Role] = &[Role::Federation];

    fn admit_target(roles: &[Role], target: &str, admin_allowed: bool) -> Admission {
        let facts = RequestFacts {
            target: target.as_bytes(),
            has_upgrade: false,
            admin_allowed,
            mas_api_allowed: false,
            is_options: false,
            content_length: None,
            header_bytes: 0,
            header_count: 0,
        };
        admit(roles, &facts, &LIMITS)
    }

    fn status(admission: &Admission) -> u16 {
        match admission {
            Admission::Reject(e) => e.status,
            _ => 200,
        }
    }

    #[test]
    fn views_decode_and_resolve() {
        let views = normalised_views(b"/_matrix/%2e%2e/_synapse/%2561dmin");
        assert!(views.iter().any(|v| v == "/_synapse/admin"), "{views:?}");
        assert_eq!(normalised_views(b"/_matrix/client/v3/sync"), vec!["/_matrix/client/v3/sync"]);
        assert_eq!(normalised_views(b"/a//b/./c/../d/"), vec!["/a/b/d/"]);
    }

    #[test]
    fn admin_variants_are_refused_without_allow_list() {
        for target in [
            "/_synapse/admin/v1/users",
            "/_synapse//admin/v1/users",
            "//_synapse/admin",
            "/_synapse/%61dmin/v1/users",
            "/_synapse/%2561dmin/v1/users",
            "/_matrix/../_synapse/admin/v1/users",
            "/_matrix/%2e%2e/_synapse/admin",
            "/_matrix/%252e%252e/_synapse/admin",
            "/_SYNAPSE/ADMIN/v1/users",
            "/_synapse/./admin",
            "/_synapse\\admin",
        ] {
            assert_eq!(status(&admit_target(CLIENT, target, false)), 403, "{target}");
        }
        assert!(matches!(admit_target(CLIENT, "/_synapse/admin/v1/users", true), Admission::Forward { .. }));
    }

    #[test]
    fn replication_and_metrics_are_never_forwarded() {
        for target in [
            "/_synapse/replication/x",
            "/_synapse/metrics",
            "/_synapse//metrics",
            "/_synapse/%72eplication/x",
            "/_matrix/../_synapse/metrics",
        ] {
            assert_eq!(status(&admit_target(CLIENT, target, true)), 404, "{target}");
        }
    }

    #[test]
    fn federation_listener_takes_only_federation_paths() {
        for ok in ["/_matrix/federation/v1/version", "/_matrix/key/v2/server", "/_matrix/media/v3/download/a/b"] {
            assert!(matches!(admit_target(FEDERATION, ok, false), Admission::Forward { .. }), "{ok}");
        }
        for refused in [
            "/_matrix/client/v3/login",
            "/_matrix/federation/../client/v3/login",
            "/_matrix/federation/%2e%2e/client/v3/login",
            "/.well-known/matrix/server",
            "/_synapse/client/pick_idp",
            "/",
        ] {
            assert_eq!(status(&admit_target(FEDERATION, refused, false)), 404, "{refused}");
        }
    }

    #[test]
    fn client_listener_forwards_matrix_and_synapse_client() {
        assert!(matches!(admit_target(CLIENT, "/_matrix/client/versions", false), Admission::Forward { .. }));
        assert!(matches!(admit_target(CLIENT, "/_synapse/client/pick_idp", false), Admission::Forward { .. }));
        assert_eq!(status(&admit_target(CLIENT, "/index.html", false)), 404);
        assert_eq!(admit_target(CLIENT, "/.well-known/matrix/client", false), Admission::WellKnown(Document::Client));
    }

    #[test]
    fn absolute_form_and_upgrade_are_refused() {
        assert_eq!(status(&admit_target(CLIENT, "http://evil/_matrix/client/versions", false)), 400);
        assert_eq!(status(&admit_target(CLIENT, "matrix-federation://x/_matrix/key/v2/server", false)), 400);
        assert_eq!(status(&admit_target(CLIENT, "*", false)), 400);
        let facts = RequestFacts {
            target: b"/_matrix/client/v3/sync",
            has_upgrade: true,
            admin_allowed: false,
            mas_api_allowed: false,
            is_options: false,
            content_length: None,
            header_bytes: 0,
            header_count: 0,
        };
        assert_eq!(status(&admit(CLIENT, &facts, &LIMITS)), 400);
    }

    #[test]
    fn body_limits_depend_on_path() {
        let with_length = |target: &'static str, length| RequestFacts {
            target: target.as_bytes(),
            has_upgrade: false,
            admin_allowed: false,
            mas_api_allowed: false,
            is_options: false,
            content_length: Some(length),
            header_bytes: 0,
            header_count: 0,
        };
        assert_eq!(status(&admit(CLIENT, &with_length("/_matrix/media/v3/upload", 101), &LIMITS)), 413);
        assert!(matches!(
            admit(CLIENT, &with_length("/_matrix/federation/v1/send/1", 999), &LIMITS),
            Admission::Forward { body_limit: 1000 }
        ));
        assert_eq!(status(&admit(CLIENT, &with_length("/_matrix/federation/v1/send/1", 1001), &LIMITS)), 413);
    }

    #[test]
    fn long_targets_and_big_heads_are_refused_with_their_own_status() {
        let long = format!("/_matrix/client/v3/sync?filter={}", "x".repeat(180));
        assert_eq!(status(&admit_target(CLIENT, &long[..200], false)), 200);
        assert_eq!(status(&admit_target(CLIENT, &long, false)), 414);
        let head = |bytes, count| RequestFacts {
            target: b"/_matrix/client/v3/sync",
            has_upgrade: false,
            admin_allowed: false,
            mas_api_allowed: false,
            is_options: false,
            content_length: None,
            header_bytes: bytes,
            header_count: count,
        };
        assert_eq!(status(&admit(CLIENT, &head(300, 5), &LIMITS)), 200);
        assert_eq!(status(&admit(CLIENT, &head(301, 5), &LIMITS)), 431);
        assert_eq!(status(&admit(CLIENT, &head(10, 6), &LIMITS)), 431);
    }

    fn facts<'a>(target: &'a str, mas_api_allowed: bool, is_options: bool) -> RequestFacts<'a> {
        RequestFacts {
            target: target.as_bytes(),
            has_upgrade: false,
            admin_allowed: false,
            mas_api_allowed,
            is_options,
            content_length: None,
            header_bytes: 0,
            header_count: 0,
        }
    }

    #[test]
    fn the_mas_api_is_for_listed_networks_only() {
        for target in [
            "/_synapse/mas/provision_user",
            "/_synapse/%6das/query_user?localpart=a",
            "/_synapse//mas/x",
            "/_SYNAPSE/MAS",
        ] {
            assert_eq!(status(&admit(CLIENT, &facts(target, false, false), &LIMITS)), 404, "{target}");
        }
        assert_eq!(
            admit(CLIENT, &facts("/_synapse/mas/provision_user", true, false), &LIMITS),
            Admission::Forward { body_limit: 100 }
        );
        // Not a prefix of other paths.
        assert_eq!(status(&admit(CLIENT, &facts("/_synapse/massive", true, false), &LIMITS)), 404);
    }

    #[test]
    fn rendezvous_preflights_are_answered_by_the_edge() {
        for target in [
            "/_matrix/client/unstable/org.matrix.msc4108/rendezvous",
            "/_matrix/client/unstable/io.element.msc4388/rendezvous/abc",
            "/_synapse/client/rendezvous/01HXYZ",
        ] {
            assert_eq!(
                admit(CLIENT, &facts(target, false, true), &LIMITS),
                Admission::Preflight(Preflight::Rendezvous),
                "{target}"
            );
            assert!(
                matches!(admit(CLIENT, &facts(target, false, false), &LIMITS), Admission::Forward { .. }),
                "{target}"
            );
        }
        // Every other Matrix path, refused or not, gets Synapse's preflight answer.
        for target in [
            "/_matrix/client/v3/sync",
            "/_synapse/admin/v1/server_version",
            "/_synapse/replication/x",
            "/_synapse/mas/x",
        ] {
            assert_eq!(
                admit(CLIENT, &facts(target, false, true), &LIMITS),
                Admission::Preflight(Preflight::Matrix),
                "{target}"
            );
        }
        assert_eq!(status(&admit(CLIENT, &facts("/other", false, true), &LIMITS)), 404);
    }

    #[test]
    fn openid_only_federation_keeps_userinfo_alone() {
        let limits = Limits { federation: FederationMode::OpenidOnly, ..LIMITS };
        let userinfo = "/_matrix/federation/v1/openid/userinfo?access_token=abc";
        assert!(matches!(admit(FEDERATION, &facts(userinfo, false, false), &limits), Admission::Forward { .. }));
        assert!(matches!(admit(CLIENT, &facts(userinfo, false, false), &limits), Admission::Forward { .. }));
        for target in [
            "/_matrix/federation/v1/send/txn1",
            "/_matrix/federation/v1/version",
            "/_matrix/key/v2/server",
            "/_matrix/federation/v1/openid/userinfo/../../send/x",
            "/_matrix/federation/v1/%6fpenid/userinfo/x",
        ] {
            assert_eq!(status(&admit(CLIENT, &facts(target, false, false), &limits)), 404, "{target}");
        }
        assert!(matches!(
            admit(CLIENT, &facts("/_matrix/client/v3/sync", false, false), &limits),
            Admission::Forward { .. }
        ));
    }
}
