//! Synapse's worker routing table, as data.
//!
//! It follows `docs/workers.md` of Synapse v1.157.1 (unchanged up to the
//! newest commit read, a58ad44), plus what deployments route and workers.md
//! does not list, each checked against the servlets Synapse 1.163 registers
//! on workers (`synapse/rest/__init__.py`): Simplified Sliding Sync, MatrixRTC
//! transports, OAuth metadata, MSC4308, and the main-only rendezvous and
//! delayed-event paths. With the Matrix Authentication Service declared,
//! `/login`, `/logout` and `/refresh` go to it (Synapse registers none of
//! them then).
//!
//! Each rule is one line of Synapse's `docs/workers.md`: a regular expression
//! on the raw path (no query), the methods it covers, the groups that may
//! serve it in order of preference, and the sticky key its requests hash on.
//! The first rule whose pattern and method match decides; the first group of
//! its chain that the deployment declares serves it, and when none is
//! declared the main process does. Paths no rule claims go to main.
//!
//! All patterns are compiled into one `RegexSet`, so a request is matched in
//! a single pass; `Router::route_naive` keeps the plain first-match scan to
//! prove the two agree.

use regex::Regex;
use regex_automata::meta::Regex as PatternSetRegex;
use regex_automata::{Input, PatternSet};
use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;

/// A set of Synapse processes that serve the same paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Group {
    Main,
    Synchrotron,
    InitialSync,
    ClientReader,
    EventCreator,
    FederationReader,
    FederationInbound,
    MediaRepository,
    Sso,
    UserDirectory,
    Typing,
    ToDevice,
    AccountData,
    Presence,
    PushRules,
    Receipts,
    DeviceLists,
    QuarantinedMediaChanges,
    ThreadSubscriptions,
    /// The Matrix Authentication Service (`synapse.mas`), not a Synapse process.
    Mas,
}

/// Where a group is declared in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// `synapse.main`.
    Main,
    /// `synapse.workers.<name>`.
    Workers,
    /// `synapse.stream_writers.<name>`: Synapse's `stream_writers` of the same name.
    StreamWriters,
    /// `synapse.mas`.
    Mas,
}

impl Section {
    pub fn key(self) -> &'static str {
        match self {
            Section::Main => "main",
            Section::Workers => "workers",
            Section::StreamWriters => "stream_writers",
            Section::Mas => "mas",
        }
    }
}

/// What the edge knows of one group.
pub struct GroupSpec {
    pub group: Group,
    /// Its name: the config key, the metric label, Synapse's stream name.
    pub name: &'static str,
    pub section: Section,
    /// Synapse allows only one writer of this stream.
    pub single_writer: bool,
    /// Requests may go to main when every member is down.
    pub falls_back_to_main: bool,
    /// Fragments of `worker_name` by which `init --from-synapse` puts a
    /// generic worker in this group.
    pub worker_name_hints: &'static [&'static str],
}

const fn spec(group: Group, name: &'static str, section: Section, hints: &'static [&'static str]) -> GroupSpec {
    GroupSpec { group, name, section, single_writer: false, falls_back_to_main: true, worker_name_hints: hints }
}

const fn single(group: Group, name: &'static str) -> GroupSpec {
    GroupSpec { single_writer: true, ..spec(group, name, Section::StreamWriters, &[]) }
}

const fn no_fallback(spec: GroupSpec) -> GroupSpec {
    GroupSpec { falls_back_to_main: false, ..spec }
}

/// Every group, once, in declaration order: the enum's names, the config
/// keys, the metric labels, `init`'s and `check --synapse`'s knowledge of
/// Synapse's workers and stream writers all come from here. Media workers
/// own the media store (`enable_media_repo: false` on main), SSO sessions
/// live in one process, and with MAS on Synapse has no `/login`: none of
/// them falls back to main.
pub const GROUPS: [GroupSpec; 20] = [
    spec(Group::Main, "main", Section::Main, &[]),
    spec(Group::Synchrotron, "synchrotron", Section::Workers, &["synchrotron", "sync"]),
    spec(Group::InitialSync, "initial_sync", Section::Workers, &["initial_sync"]),
    spec(Group::ClientReader, "client_reader", Section::Workers, &["client_reader", "client"]),
    spec(Group::EventCreator, "event_creator", Section::Workers, &["event_creator"]),
    spec(Group::FederationReader, "federation_reader", Section::Workers, &["federation_reader", "federation_requests"]),
    spec(Group::FederationInbound, "federation_inbound", Section::Workers, &["federation_inbound", "inbound"]),
    no_fallback(spec(Group::MediaRepository, "media_repository", Section::Workers, &["media_repository", "media"])),
    no_fallback(spec(Group::Sso, "sso", Section::Workers, &["sso"])),
    spec(Group::UserDirectory, "user_directory", Section::Workers, &["user_directory", "user_dir"]),
    single(Group::Typing, "typing"),
    single(Group::ToDevice, "to_device"),
    single(Group::AccountData, "account_data"),
    single(Group::Presence, "presence"),
    single(Group::PushRules, "push_rules"),
    spec(Group::Receipts, "receipts", Section::StreamWriters, &[]),
    spec(Group::DeviceLists, "device_lists", Section::StreamWriters, &[]),
    spec(Group::QuarantinedMediaChanges, "quarantined_media_changes", Section::StreamWriters, &[]),
    spec(Group::ThreadSubscriptions, "thread_subscriptions", Section::StreamWriters, &[]),
    no_fallback(spec(Group::Mas, "mas", Section::Mas, &[])),
];

/// The Synapse release whose routing this table follows (shown by `routes`).
pub const SYNAPSE_VERSION: &str = "1.163 (workers.md of 1.157.1, servlets of 1.163.2)";

impl Group {
    pub const ALL: [Group; GROUPS.len()] = {
        let mut all = [Group::Main; GROUPS.len()];
        let mut at = 0;
        while at < GROUPS.len() {
            all[at] = GROUPS[at].group;
            at += 1;
        }
        all
    };

    /// Its entry in `GROUPS` (which lists the groups in declaration order, tested).
    pub fn spec(self) -> &'static GroupSpec {
        &GROUPS[self as usize]
    }

    /// The config key naming this group (`synapse.workers.*` or `synapse.stream_writers.*`).
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    pub fn from_name(name: &str) -> Option<Group> {
        GROUPS.iter().find(|spec| spec.name == name).map(|spec| spec.group)
    }

    /// The groups declared in one section, in table order.
    pub fn in_section(section: Section) -> impl Iterator<Item = &'static GroupSpec> {
        GROUPS.iter().filter(move |spec| spec.section == section)
    }

    /// Whether requests may go to the main process when every member is down.
    pub fn falls_back_to_main(self) -> bool {
        self.spec().falls_back_to_main
    }

    /// Stream writers Synapse allows only one of.
    pub fn single_writer(self) -> bool {
        self.spec().single_writer
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which methods a rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Methods {
    Any,
    /// GET (and HEAD, which Synapse serves as GET).
    Read,
    /// Anything but GET/HEAD.
    Write,
    /// An explicit set (user rules), as bits of `METHOD_BITS`.
    Only(u16),
}

/// Methods a user rule may name; anything else is refused by `check`.
pub const METHOD_BITS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"];

impl Methods {
    /// A set from method names, or the first unknown name.
    pub fn only<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Methods, &'a str> {
        let mut bits = 0u16;
        for name in names {
            let index = METHOD_BITS.iter().position(|m| m.eq_ignore_ascii_case(name)).ok_or(name)?;
            bits |= 1 << index;
        }
        Ok(Methods::Only(bits))
    }
}

impl Methods {
    pub fn allows(self, method: &str) -> bool {
        let read = method == "GET" || method == "HEAD";
        match self {
            Methods::Any => true,
            Methods::Read => read,
            Methods::Write => !read,
            Methods::Only(bits) => {
                METHOD_BITS.iter().position(|m| *m == method).is_some_and(|index| bits & (1 << index) != 0)
            }
        }
    }
}

impl fmt::Display for Methods {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Methods::Any => f.write_str("*"),
            Methods::Read => f.write_str("GET,HEAD"),
            Methods::Write => f.write_str("!GET"),
            Methods::Only(bits) => {
                let names: Vec<&str> =
                    METHOD_BITS.iter().enumerate().filter(|(i, _)| bits & (1 << i) != 0).map(|(_, m)| *m).collect();
                f.write_str(&names.join(","))
            }
        }
    }
}

/// What a group's requests are hashed on, so the same user, room or origin
/// keeps reaching the same worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sticky {
    /// Round robin.
    None,
    /// The user behind the access token (sync).
    User,
    /// The room ID in the path (event sending, pagination).
    Room,
    /// The `origin` of an `X-Matrix` authorization (federation transactions).
    Origin,
}

impl fmt::Display for Sticky {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Sticky::None => "-",
            Sticky::User => "user",
            Sticky::Room => "room",
            Sticky::Origin => "origin",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub pattern: Cow<'static, str>,
    pub methods: Methods,
    /// Groups in order of preference; the first one declared serves.
    pub chain: Cow<'static, [Group]>,
    pub sticky: Sticky,
    /// The rule applies only where a group of its chain is declared;
    /// elsewhere the rules after it decide (MAS's paths without MAS).
    pub only_if_declared: bool,
}

const fn rule(pattern: &'static str, methods: Methods, chain: &'static [Group], sticky: Sticky) -> Rule {
    Rule { pattern: Cow::Borrowed(pattern), methods, chain: Cow::Borrowed(chain), sticky, only_if_declared: false }
}

const fn rule_if_declared(pattern: &'static str, chain: &'static [Group]) -> Rule {
    Rule {
        pattern: Cow::Borrowed(pattern),
        methods: Methods::Any,
        chain: Cow::Borrowed(chain),
        sticky: Sticky::None,
        only_if_declared: true,
    }
}

use Group as G;
use Methods::{Any, Read, Write};
use Sticky::{None as Rr, Origin, Room, User};

/// The built-in table, in evaluation order: SSO and media (whole prefixes
/// owned by one kind of process), stream writers (they override the generic
/// lists), GET-only generic paths, then the generic groups.
pub const BUILTIN: &[Rule] = &[
    // The Matrix Authentication Service's compatibility layer, when declared
    // (MAS docs "homeserver.md"; ESS's Prefix paths). Not `v1/login/get_token`,
    // which stays Synapse's.
    rule_if_declared(r"^/_matrix/client/(api/v1|r0|v3|unstable)/(login|logout|refresh)(/.*)?$", &[G::Mas]),
    // Main process only: rendezvous sessions (QR login) live in one process;
    // delayed events' send and cancel are registered on main alone.
    rule(r"^/_matrix/client/unstable/org\.matrix\.msc4108/rendezvous$", Any, &[G::Main], Rr),
    rule(r"^/_matrix/client/unstable/io\.element\.msc4388/rendezvous(/[^/]+)?$", Any, &[G::Main], Rr),
    rule(r"^/_synapse/client/rendezvous", Any, &[G::Main], Rr),
    rule(r"^/_matrix/client/unstable/org\.matrix\.msc4140/delayed_events/[^/]+/(send|cancel)$", Any, &[G::Main], Rr),
    // SSO: every step of a login must reach the same single process.
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/login/sso/redirect", Any, &[G::Sso], Rr),
    rule(r"^/_synapse/client/pick_idp$", Any, &[G::Sso], Rr),
    rule(r"^/_synapse/client/pick_username", Any, &[G::Sso], Rr),
    rule(r"^/_synapse/client/new_user_consent$", Any, &[G::Sso], Rr),
    rule(r"^/_synapse/client/sso_register$", Any, &[G::Sso], Rr),
    rule(r"^/_synapse/client/oidc/callback$", Any, &[G::Sso], Rr),
    rule(r"^/_synapse/client/saml2/authn_response$", Any, &[G::Sso], Rr),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/login/cas/ticket$", Any, &[G::Sso], Rr),
    // Stream writers.
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/typing", Any, &[G::Typing], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/sendToDevice/", Any, &[G::ToDevice], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/rooms/.*/receipt", Any, &[G::Receipts], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/rooms/.*/read_markers", Any, &[G::Receipts], Rr),
    rule(r"^/_matrix/client/(r0|v3)/delete_devices$", Any, &[G::DeviceLists, G::ClientReader], Rr),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/devices(/|$)", Any, &[G::DeviceLists, G::ClientReader], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/keys/upload", Any, &[G::DeviceLists, G::ClientReader], Rr),
    rule(
        r"^/_matrix/client/(api/v1|r0|v3|unstable)/keys/device_signing/upload$",
        Any,
        &[G::DeviceLists, G::ClientReader],
        Rr,
    ),
    rule(
        r"^/_matrix/client/(api/v1|r0|v3|unstable)/keys/signatures/upload$",
        Any,
        &[G::DeviceLists, G::ClientReader],
        Rr,
    ),
    rule(r"^/_synapse/admin/v1/quarantine_media/.*$", Any, &[G::QuarantinedMediaChanges, G::MediaRepository], Rr),
    rule(r"^/_matrix/client/unstable/io.element.msc4306/.*", Any, &[G::ThreadSubscriptions], Rr),
    rule(r"^/_matrix/client/unstable/io\.element\.msc4308/thread_subscriptions$", Any, &[G::ThreadSubscriptions], Rr),
    // Readable by any generic worker, written only by the stream's writer.
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/pushrules/", Write, &[G::PushRules], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/.*/tags", Write, &[G::AccountData], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/.*/account_data", Write, &[G::AccountData], Rr),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/presence/", Write, &[G::Presence], Rr),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/pushrules/", Read, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/.*/tags", Read, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/.*/account_data", Read, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/presence/", Read, &[G::ClientReader], Rr),
    rule(r"^/_synapse/admin/v2/users/[^/]+$", Read, &[G::ClientReader], Rr),
    // Media repository, by prefix.
    rule(r"^/_matrix/media/", Any, &[G::MediaRepository], Rr),
    rule(r"^/_matrix/client/v1/media/", Any, &[G::MediaRepository], Rr),
    rule(r"^/_matrix/federation/v1/media/", Any, &[G::MediaRepository], Rr),
    rule(r"^/_synapse/admin/v1/purge_media_cache$", Any, &[G::MediaRepository], Rr),
    rule(r"^/_synapse/admin/v1/room/.*/media.*$", Any, &[G::MediaRepository], Rr),
    rule(r"^/_synapse/admin/v1/user/.*/media.*$", Any, &[G::MediaRepository], Rr),
    rule(r"^/_synapse/admin/v1/media/.*$", Any, &[G::MediaRepository], Rr),
    rule(r"^/_synapse/admin/v1/users/.*/media$", Any, &[G::MediaRepository], Rr),
    // Sync (initial syncs go to `initial_sync` when declared; see Router).
    rule(r"^/_matrix/client/(r0|v3)/sync$", Any, &[G::Synchrotron], User),
    rule(r"^/_matrix/client/(api/v1|r0|v3)/events$", Any, &[G::Synchrotron], User),
    rule(r"^/_matrix/client/(api/v1|r0|v3)/initialSync$", Any, &[G::Synchrotron], User),
    rule(r"^/_matrix/client/(api/v1|r0|v3)/rooms/[^/]+/initialSync$", Any, &[G::Synchrotron], User),
    // Simplified Sliding Sync (MSC4186), Element X's only sync: not in workers.md.
    rule(r"^/_matrix/client/unstable/org\.matrix\.simplified_msc3575/sync$", Any, &[G::Synchrotron], User),
    // Federation.
    rule(r"^/_matrix/federation/v1/send/", Any, &[G::FederationInbound, G::FederationReader], Origin),
    rule(r"^/_matrix/federation/v1/version$", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/v1/event/", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/v1/state/", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/v1/state_ids/", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/v1/backfill/", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/v1/get_missing_events/", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/v1/publicRooms", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/v1/query/", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/v1/make_join/", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/v1/make_leave/", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/(v1|v2)/send_join/", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/(v1|v2)/send_leave/", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/v1/make_knock/", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/v1/send_knock/", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/(v1|v2)/invite/", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/(v1|v2)/query_auth/", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/v1/event_auth/", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/v1/timestamp_to_event/", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/v1/exchange_third_party_invite/", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/v1/user/devices/", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/key/v2/query", Any, &[G::FederationReader], Rr),
    rule(r"^/_matrix/federation/v1/hierarchy/", Any, &[G::FederationReader], Rr),
    // Event sending: one room's events from one process.
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/createRoom$", Any, &[G::EventCreator], User),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/redact", Any, &[G::EventCreator], Room),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/send", Any, &[G::EventCreator], Room),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/state/", Any, &[G::EventCreator], Room),
    rule(
        r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/(join|invite|leave|ban|unban|kick)$",
        Any,
        &[G::EventCreator],
        Room,
    ),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/join/", Any, &[G::EventCreator], Room),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/knock/", Any, &[G::EventCreator], Room),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/profile/", Any, &[G::EventCreator], Rr),
    // Pagination: all requests for one room must reach the same instance.
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/messages$", Any, &[G::ClientReader], Room),
    // User directory, when a dedicated worker runs it.
    rule(r"^/_matrix/client/(r0|v3|unstable)/user_directory/search$", Any, &[G::UserDirectory, G::ClientReader], Rr),
    // Generic client reads and writes.
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/publicRooms$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/joined_members$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/context/.*$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/members$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/state$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/v1/rooms/.*/hierarchy$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(v1|unstable)/rooms/.*/relations/", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/v1/rooms/.*/threads$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/unstable/im.nheko.summary/summary/.*$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/v1/room_summary/.*$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/account/3pid$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/account/whoami$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/account/deactivate$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/versions$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/voip/turnServer$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/event/", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/joined_rooms$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/v1/rooms/.*/timestamp_to_event$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable/.*)/rooms/.*/aliases", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/search$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/user/.*/filter(/|$)", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/directory/room/.*$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/capabilities$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/notifications$", Any, &[G::ClientReader], Rr),
    rule(r"^/_synapse/admin/v1/rooms/[^/]+$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/keys/query$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/keys/changes$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/keys/claim$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/room_keys/", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(api/v1|r0|v3|unstable)/login$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/register$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/register/available$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/v1/register/m.login.registration_token/validity$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/password_policy$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/unstable/org.matrix.msc4140/delayed_events(/.*/restart)?$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(r0|v3|unstable)/auth/.*/fallback/web$", Any, &[G::ClientReader], Rr),
    // Not in workers.md, registered on every client worker.
    rule(r"^/_matrix/client/(v1|unstable/org\.matrix\.msc4143)/rtc/transports$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/(v1|unstable/org\.matrix\.msc2965)/auth_metadata$", Any, &[G::ClientReader], Rr),
    rule(r"^/_matrix/client/unstable/org\.matrix\.msc2965/auth_issuer$", Any, &[G::ClientReader], Rr),
];

/// Where one request goes, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The rule that matched, as an index into `Router::rules`; `None`: no rule, main.
    pub rule: Option<usize>,
    pub group: Group,
    pub sticky: Sticky,
}

/// The compiled table for one deployment: user rules first, then the built-in ones.
pub struct Router {
    rules: Vec<Rule>,
    /// Every pattern in one automaton (what `regex::RegexSet` wraps), used
    /// directly so the set of matches can be a reused buffer rather than a
    /// new allocation per request.
    set: PatternSetRegex,
    /// Each rule's pattern on its own, for the naive scan and for `routes`.
    singles: Vec<Regex>,
    declared: Vec<Group>,
    /// Per rule: whether it applies in this deployment (see `Rule::only_if_declared`).
    applies: Vec<bool>,
    /// Whether the pattern list is only the built-in table (for display).
    user_rules: usize,
}

impl Router {
    /// `declared`: groups with at least one process; `user_rules` go first.
    pub fn new(user_rules: Vec<Rule>, declared: &[Group]) -> Result<Router, regex::Error> {
        let count = user_rules.len();
        let mut rules = user_rules;
        rules.extend_from_slice(BUILTIN);
        // Each pattern alone first: regex's errors are the readable ones.
        let singles = rules.iter().map(|r| Regex::new(&r.pattern)).collect::<Result<Vec<_>, _>>()?;
        // Configured as regex::RegexSet configures it: every pattern that
        // matches is reported, not only the leftmost-first one.
        let set = regex_automata::meta::Builder::new()
            .configure(
                PatternSetRegex::config()
                    .match_kind(regex_automata::MatchKind::All)
                    .utf8_empty(true)
                    .which_captures(regex_automata::nfa::thompson::WhichCaptures::None),
            )
            .build_many(&rules.iter().map(|r| r.pattern.as_ref()).collect::<Vec<&str>>())
            .map_err(|e| regex::Error::Syntax(e.to_string()))?;
        let applies =
            rules.iter().map(|r| !r.only_if_declared || r.chain.iter().any(|g| declared.contains(g))).collect();
        Ok(Router { rules, set, singles, declared: declared.to_vec(), applies, user_rules: count })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn user_rule_count(&self) -> usize {
        self.user_rules
    }

    /// Whether a rule applies in this deployment.
    pub fn applies(&self, index: usize) -> bool {
        self.applies[index]
    }

    /// The group that serves a rule here: the first of its chain declared, else main.
    pub fn serving_group(&self, rule: &Rule) -> Group {
        rule.chain.iter().copied().find(|g| *g == Group::Main || self.declared.contains(g)).unwrap_or(Group::Main)
    }

    fn decide(&self, index: usize, query: &[u8]) -> Decision {
        let rule = &self.rules[index];
        let mut group = self.serving_group(rule);
        if group == Group::Synchrotron && self.declared.contains(&Group::InitialSync) && is_initial_sync(rule, query) {
            group = Group::InitialSync;
        }
        let sticky = if group == Group::Main { Sticky::None } else { rule.sticky };
        Decision { rule: Some(index), group, sticky }
    }

    /// The decision for a method and an origin-form target.
    pub fn route(&self, method: &str, target: &[u8]) -> Decision {
        let (path, query) = split_target(target);
        let Ok(path) = std::str::from_utf8(path) else { return MAIN };
        // One pass over the path finds every matching pattern; the first in
        // table order whose methods fit wins.
        MATCHES.with(|cell| {
            let mut matches = cell.borrow_mut();
            if matches.capacity() < self.rules.len() {
                *matches = PatternSet::new(self.rules.len());
            }
            matches.clear();
            self.set.which_overlapping_matches(&Input::new(path), &mut matches);
            matches
                .iter()
                .map(|id| id.as_usize())
                .find(|&index| self.applies[index] && self.rules[index].methods.allows(method))
                .map_or(MAIN, |index| self.decide(index, query))
        })
    }

    /// The same decision by trying each rule in turn (the specification the
    /// compiled set is tested against).
    pub fn route_naive(&self, method: &str, target: &[u8]) -> Decision {
        let (path, query) = split_target(target);
        let Ok(path) = std::str::from_utf8(path) else { return MAIN };
        for (index, (rule, regex)) in self.rules.iter().zip(&self.singles).enumerate() {
            if self.applies[index] && rule.methods.allows(method) && regex.is_match(path) {
                return self.decide(index, query);
            }
        }
        MAIN
    }
}

thread_local! {
    /// The matches of the last request routed on this thread, cleared and
    /// reused by the next.
    static MATCHES: RefCell<PatternSet> = RefCell::new(PatternSet::new(0));
}

const MAIN: Decision = Decision { rule: None, group: Group::Main, sticky: Sticky::None };

fn split_target(target: &[u8]) -> (&[u8], &[u8]) {
    match target.iter().position(|&b| b == b'?') {
        Some(at) => (&target[..at], &target[at + 1..]),
        None => (target, &[]),
    }
}

/// `/sync` with no or an empty `since`, or `full_state=true`; `initialSync` always.
fn is_initial_sync(rule: &Rule, query: &[u8]) -> bool {
    if rule.pattern.contains("initialSync") {
        return true;
    }
    // Only the classic `/sync`: sliding sync has no `since` (it uses `pos`).
    if !rule.pattern.ends_with("(r0|v3)/sync$") {
        return false;
    }
    let mut since = None;
    let mut full_state = false;
    for pair in query.split(|&b| b == b'&') {
        let (key, value) = match pair.iter().position(|&b| b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &b""[..]),
        };
        match key {
            b"since" => since = Some(value),
            b"full_state" => full_state = value == b"true",
            _ => {}
        }
    }
    full_state || since.is_none_or(|s| s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(declared: &[Group]) -> Router {
        Router::new(Vec::new(), declared).unwrap()
    }

    #[test]
    fn every_builtin_pattern_compiles_and_is_anchored() {
        let r = router(&Group::ALL);
        assert_eq!(r.rules().len(), BUILTIN.len());
        assert!(BUILTIN.iter().all(|rule| rule.pattern.starts_with('^')));
    }

    #[test]
    fn undeclared_groups_fall_to_main() {
        let r = router(&[]);
        assert_eq!(r.route("GET", b"/_matrix/client/v3/sync").group, Group::Main);
        assert_eq!(r.route("GET", b"/_matrix/client/v3/sync").sticky, Sticky::None);
    }

    #[test]
    fn initial_sync_is_split_off_only_when_declared() {
        let with = router(&[Group::Synchrotron, Group::InitialSync]);
        assert_eq!(with.route("GET", b"/_matrix/client/v3/sync").group, Group::InitialSync);
        assert_eq!(with.route("GET", b"/_matrix/client/v3/sync?since=").group, Group::InitialSync);
        assert_eq!(with.route("GET", b"/_matrix/client/v3/sync?since=s1&full_state=true").group, Group::InitialSync);
        assert_eq!(with.route("GET", b"/_matrix/client/v3/sync?since=s1_2&timeout=30000").group, Group::Synchrotron);
        assert_eq!(with.route("GET", b"/_matrix/client/v3/initialSync").group, Group::InitialSync);
        let without = router(&[Group::Synchrotron]);
        assert_eq!(without.route("GET", b"/_matrix/client/v3/sync").group, Group::Synchrotron);
    }

    #[test]
    fn writes_to_read_only_paths_go_to_the_writer_or_main() {
        let r = router(&[Group::ClientReader, Group::PushRules]);
        assert_eq!(r.route("GET", b"/_matrix/client/v3/pushrules/").group, Group::ClientReader);
        assert_eq!(r.route("PUT", b"/_matrix/client/v3/pushrules/global/override/x").group, Group::PushRules);
        assert_eq!(r.route("PUT", b"/_matrix/client/v3/user/@a:b/account_data/m.direct").group, Group::Main);
        assert_eq!(r.route("GET", b"/_matrix/client/v3/user/@a:b/account_data/m.direct").group, Group::ClientReader);
    }
}
