//! The real binary over real sockets: TLS (h1 and h2), well-known documents,
//! byte-exact forwarding, forbidden paths, limits and errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use support::certs::TestPki;
use support::client::{self, get, h1_plain, h1_tls, h2_tls, read_response};
use support::upstream::RecordingUpstream;
use support::{free_port, EdgeProcess};

struct Setup {
    pki: TestPki,
    upstream: RecordingUpstream,
    edge: EdgeProcess,
    /// TLS, serves well_known + client + federation (the "443").
    public: SocketAddr,
    /// TLS, federation only (the "8448").
    federation: SocketAddr,
    /// Plain HTTP, client only (behind a load balancer).
    plain: SocketAddr,
}

const SNI: &str = "synapse.example.com";

fn setup_with(extra: &str) -> Setup {
    let pki = TestPki::new(&[&["synapse.example.com"], &["example.com"], &["*.example.org"]]);
    let upstream = RecordingUpstream::start();
    let (public, federation, plain): (SocketAddr, SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
    );
    let config = format!(
        r#"server_name: example.com
listeners:
  - {{ address: "{public}", tls: true, serves: [well_known, client, federation] }}
  - {{ address: "{federation}", tls: true, serves: [federation] }}
  - {{ address: "{plain}", tls: false, serves: [client] }}
tls:
  certificates:
    - {{ cert: certs/synapse.example.com/fullchain.pem, key: certs/synapse.example.com/privkey.pem }}
    - {{ cert: certs/example.com/fullchain.pem, key: certs/example.com/privkey.pem }}
    - {{ cert: certs/example.org/fullchain.pem, key: certs/example.org/privkey.pem }}
synapse:
  main: "{}"
limits: {{ max_upload_size: 1M, federation_max_body: 3M }}
process: {{ threads: 2 }}
{extra}"#,
        upstream.addr
    );
    let edge = EdgeProcess::start(&config, Some(&pki), &[public, federation, plain]);
    Setup { pki, upstream, edge, public, federation, plain }
}

const WELL_KNOWN: &str = r#"well_known:
  server: synapse.example.com:443
  client:
    homeserver: https://synapse.example.com
    extra: { io.element.e2ee: { default: true } }
  support:
    contacts: [{ matrix_id: "@admin:example.com", role: m.role.admin }]
  max_age: 30m
"#;

fn setup() -> Setup {
    setup_with(WELL_KNOWN)
}

impl Setup {
    fn h1(&self, raw: &[u8]) -> (client::Response, bool) {
        h1_tls(self.public, SNI, &self.pki.root_pem, raw)
    }

    fn h2(&self, method: &str, target: &str) -> client::Response {
        h2_tls(self.public, SNI, &self.pki.root_pem, method, target, &[], None).unwrap()
    }
}

/// The subject CN and chain length a server presents for an SNI name.
/// Verification is off here on purpose: the default certificate does not
/// match unknown names; chains are verified separately.
fn presented_certificate(addr: SocketAddr, sni: Option<&str>) -> (String, usize) {
    let mut builder = SslConnector::builder(SslMethod::tls()).unwrap();
    builder.set_verify(SslVerifyMode::NONE);
    let connector = builder.build();
    let mut config = connector.configure().unwrap();
    config.set_verify_hostname(false);
    config.set_use_server_name_indication(sni.is_some());
    let tcp = TcpStream::connect(addr).unwrap();
    let stream = config.connect(sni.unwrap_or("ignored.invalid"), tcp).unwrap();
    let cert = stream.ssl().peer_certificate().unwrap();
    let cn = cert
        .subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()
        .map(|e| e.data().to_string().unwrap())
        .unwrap();
    let chain = stream.ssl().peer_cert_chain().map_or(0, |c| c.len());
    (cn, chain)
}

#[test]
fn sni_picks_exact_then_wildcard_then_first_and_serves_full_chain() {
    let s = setup();
    let root = &s.pki.root_pem;
    assert_eq!(presented_certificate(s.public, Some("synapse.example.com")), ("synapse.example.com".into(), 2));
    assert_eq!(presented_certificate(s.public, Some("example.com")), ("example.com".into(), 2));
    assert_eq!(presented_certificate(s.federation, Some("EXAMPLE.com")).0, "example.com");
    assert_eq!(presented_certificate(s.public, Some("chat.example.org")).0, "*.example.org");
    assert_eq!(presented_certificate(s.public, Some("unknown.test")).0, "synapse.example.com");
    assert_eq!(presented_certificate(s.public, None).0, "synapse.example.com");
    // A verifying client accepts each chain with only the root trusted.
    for name in ["synapse.example.com", "example.com", "chat.example.org"] {
        client::tls_connect(s.public, name, root, &["http/1.1"]);
    }
}

#[test]
fn alpn_offers_h2_and_http11_on_every_tls_listener() {
    let s = setup();
    for addr in [s.public, s.federation] {
        let h2 = client::tls_connect(addr, SNI, &s.pki.root_pem, &["h2", "http/1.1"]);
        assert_eq!(h2.ssl().selected_alpn_protocol(), Some(&b"h2"[..]));
        let h1 = client::tls_connect(addr, SNI, &s.pki.root_pem, &["http/1.1"]);
        assert_eq!(h1.ssl().selected_alpn_protocol(), Some(&b"http/1.1"[..]));
    }
}

#[test]
fn tls_below_1_2_is_refused() {
    let s = setup();
    let mut builder = SslConnector::builder(SslMethod::tls()).unwrap();
    builder.set_verify(SslVerifyMode::NONE);
    builder.set_max_proto_version(Some(openssl::ssl::SslVersion::TLS1_1)).unwrap();
    builder.set_security_level(0);
    let tcp = TcpStream::connect(s.public).unwrap();
    assert!(builder.build().connect(SNI, tcp).is_err());
}

#[test]
fn well_known_documents_over_h1_and_h2() {
    let s = setup();
    for response in
        [s.h1(&get("/.well-known/matrix/server", "example.com")).0, s.h2("GET", "/.well-known/matrix/server")]
    {
        assert_eq!(response.status, 200);
        assert_eq!(response.header("content-type"), Some("application/json"));
        assert_eq!(response.header("cache-control"), Some("public, max-age=1800"));
        assert_eq!(response.json(), serde_json::json!({"m.server": "synapse.example.com:443"}));
    }
    let client_doc = s.h2("GET", "/.well-known/matrix/client");
    assert_eq!(client_doc.status, 200);
    assert_eq!(client_doc.header_count("access-control-allow-origin"), 1);
    assert_eq!(client_doc.header("access-control-allow-origin"), Some("*"));
    assert_eq!(
        client_doc.json(),
        serde_json::json!({"m.homeserver": {"base_url": "https://synapse.example.com"}, "io.element.e2ee": {"default": true}})
    );
    let support = s.h1(&get("/.well-known/matrix/support?x=1", "example.com")).0;
    assert_eq!(support.status, 200);
    assert_eq!(support.header("access-control-allow-origin"), Some("*"));
    assert_eq!(support.json()["contacts"][0]["matrix_id"], "@admin:example.com");
    let head = s.h1(b"HEAD /.well-known/matrix/client HTTP/1.1\r\nHost: example.com\r\n\r\n").0;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    // None of it reached Synapse.
    assert!(s.upstream.records().is_empty());
}

#[test]
fn well_known_preflight_and_wrong_method() {
    let s = setup();
    let preflight = s.h1(
        b"OPTIONS /.well-known/matrix/client HTTP/1.1\r\nHost: example.com\r\nOrigin: https://app.element.io\r\nAccess-Control-Request-Method: GET\r\n\r\n",
    );
    assert_eq!(preflight.0.status, 204);
    assert_eq!(preflight.0.header("access-control-allow-methods"), Some("GET, POST, PUT, DELETE, OPTIONS"));
    assert_eq!(
        preflight.0.header("access-control-allow-headers"),
        Some("X-Requested-With, Content-Type, Authorization")
    );
    assert_eq!(s.h2("OPTIONS", "/.well-known/matrix/support").status, 204);
    let post = s.h1(b"POST /.well-known/matrix/server HTTP/1.1\r\nHost: example.com\r\nContent-Length: 2\r\n\r\n{}").0;
    post.assert_matrix_error(405, "M_UNRECOGNIZED");
    assert!(s.upstream.records().is_empty());
}

#[test]
fn unconfigured_well_known_is_404_json_with_cors() {
    let s = setup_with("");
    for document in ["server", "client", "support"] {
        let target = format!("/.well-known/matrix/{document}");
        s.h1(&get(&target, "example.com")).0.assert_matrix_error(404, "M_NOT_FOUND");
        s.h2("GET", &target).assert_matrix_error(404, "M_NOT_FOUND");
    }
    s.h1(&get("/.well-known/matrix/other", "example.com")).0.assert_matrix_error(404, "M_UNRECOGNIZED");
}

/// Targets Synapse must receive exactly as sent (federation signatures cover them).
const EXACT_TARGETS: &[&str] = &[
    "/_matrix/client/v3/rooms/%21abc%3Aexample.com/send/m.room.message/t%2F1",
    "/_matrix/client/v3/rooms/!abc:example.com/event/%24ev%2Fent%3Aexample.com",
    "/_matrix/federation/v1/event/%24abc%2Bdef%2F%3D",
    "/_matrix/client/v3/profile/%40alice%3Aexample.com/displayname",
    "/_matrix/client/v3/directory/room/%23room%3Aexample.com",
    "/_matrix/client/v3/rooms/%21a%3Ab/state/m.room.member/%40u%3Ab",
    "/_matrix/client/v3/sync?filter=%7B%22room%22%3A%7B%7D%7D&since=s1_2&timeout=30000",
    "/_matrix/media/v3/download/example.com/abc%25def",
    "/_matrix/client//v3//versions",
    "/_matrix/federation/v1/query/profile?user_id=%40a%3Ab&field=displayname&field=avatar_url",
    "/_matrix/client/v3/search?ver=1&ver=2&ver=1",
    "/_matrix/client/v3/user/%40a%3Ab/account_data/m.direct%23x",
    "/_matrix/client/v3/rooms/%21a%3Ab/messages?dir=b&from=t1-2_3&limit=10&filter=%7B%7D",
];

#[test]
fn request_targets_reach_synapse_byte_for_byte_over_h1() {
    let s = setup();
    for target in EXACT_TARGETS {
        let (response, _) = s.h1(&get(target, "synapse.example.com"));
        assert_eq!(response.status, 200, "{target}");
        assert_eq!(response.json()["upstream"], "recording");
    }
    let records = s.upstream.wait_for(EXACT_TARGETS.len());
    let got: Vec<&str> = records.iter().map(|r| r.target()).collect();
    assert_eq!(got, EXACT_TARGETS);
}

#[test]
fn request_targets_reach_synapse_byte_for_byte_over_h2() {
    let s = setup();
    for target in EXACT_TARGETS {
        assert_eq!(s.h2("GET", target).status, 200, "{target}");
    }
    let records = s.upstream.wait_for(EXACT_TARGETS.len());
    let got: Vec<&str> = records.iter().map(|r| r.target()).collect();
    assert_eq!(got, EXACT_TARGETS);
    assert!(records.iter().all(|r| r.request_line.ends_with(" HTTP/1.1")), "upstream must be HTTP/1.1");
}

#[test]
fn forwarding_headers_are_rewritten_and_host_kept() {
    let s = setup();
    let raw = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: synapse.example.com:8443\r\nX-Forwarded-For: 6.6.6.6, 7.7.7.7\r\nX-Forwarded-For: 8.8.8.8\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Proto: http\r\nProxy-Authorization: Basic eA==\r\nAuthorization: X-Matrix origin=\"a.example\",key=\"ed25519:1\",sig=\"abc/+=\"\r\n\r\n";
    assert_eq!(s.h1(raw).0.status, 200);
    let headers = [("x-forwarded-for", "9.9.9.9"), ("forwarded", "for=9.9.9.9"), ("x-real-ip", "9.9.9.9")];
    let h2 = h2_tls(s.public, SNI, &s.pki.root_pem, "GET", "/_matrix/client/versions", &headers, None).unwrap();
    assert_eq!(h2.status, 200);
    let (plain, _) = h1_plain(
        s.plain,
        b"GET /_matrix/client/versions HTTP/1.1\r\nHost: matrix.example.com\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
    );
    assert_eq!(plain.status, 200);
    let records = s.upstream.wait_for(3);
    assert_eq!(records.len(), 3);
    for record in &records {
        assert_eq!(record.header_values("X-Forwarded-For"), ["127.0.0.1"], "{record:?}");
        assert!(record.header_values("Forwarded").is_empty());
        assert!(record.header_values("X-Real-IP").is_empty());
        assert!(record.header_values("Proxy-Authorization").is_empty());
    }
    assert_eq!(records[0].header_values("Host"), ["synapse.example.com:8443"]);
    assert_eq!(records[0].header_values("X-Forwarded-Proto"), ["https"]);
    assert_eq!(
        records[0].header_values("Authorization"),
        ["X-Matrix origin=\"a.example\",key=\"ed25519:1\",sig=\"abc/+=\""]
    );
    assert_eq!(records[1].header_values("Host"), ["synapse.example.com"]);
    assert_eq!(records[1].header_values("X-Forwarded-Proto"), ["https"]);
    assert_eq!(records[2].header_values("X-Forwarded-Proto"), ["http"]);
    assert_eq!(records[2].header_values("Host"), ["matrix.example.com"]);
}

#[test]
fn federation_listener_accepts_only_federation_key_and_media() {
    let s = setup();
    let allowed = ["/_matrix/federation/v1/version", "/_matrix/key/v2/server", "/_matrix/media/v3/download/a/b"];
    for target in allowed {
        let (response, _) = h1_tls(s.federation, SNI, &s.pki.root_pem, &get(target, SNI));
        assert_eq!(response.status, 200, "{target}");
    }
    let refused = [
        "/_matrix/client/v3/login",
        "/_matrix/client/versions",
        "/_matrix/federation/../client/v3/login",
        "/_matrix/federation/%2e%2e/client/v3/login",
        "/_synapse/client/pick_idp",
        "/.well-known/matrix/server",
        "/",
    ];
    for target in refused {
        let (response, _) = h1_tls(s.federation, SNI, &s.pki.root_pem, &get(target, SNI));
        response.assert_matrix_error(404, "M_UNRECOGNIZED");
        let h2 = h2_tls(s.federation, SNI, &s.pki.root_pem, "GET", target, &[], None).unwrap();
        h2.assert_matrix_error(404, "M_UNRECOGNIZED");
    }
    let got: Vec<String> = s.upstream.wait_for(3).iter().map(|r| r.target().to_string()).collect();
    assert_eq!(got, allowed);
}

const ADMIN_VARIANTS: &[&str] = &[
    "/_synapse/admin/v1/users/@a:b",
    "/_synapse//admin/v1/users",
    "//_synapse/admin/v2/users",
    "/_synapse/%61dmin/v1/users",
    "/_synapse/%2561dmin/v1/users",
    "/_matrix/../_synapse/admin/v1/users",
    "/_matrix/%2e%2e/_synapse/admin/v1/users",
    "/_matrix/%252e%252e/_synapse/admin",
    "/_SYNAPSE/ADMIN/v1/users",
    "/_synapse/./admin/v1/users",
];

const NEVER_PUBLIC: &[&str] = &[
    "/_synapse/replication/send_event/x",
    "/_synapse//replication/x",
    "/_synapse/%72eplication/x",
    "/_synapse/metrics",
    "/_synapse/METRICS",
    "/_matrix/../_synapse/metrics",
];

#[test]
fn admin_api_is_refused_from_outside_the_allow_list_in_every_spelling() {
    let s = setup();
    for target in ADMIN_VARIANTS {
        s.h1(&get(target, SNI)).0.assert_matrix_error(403, "M_FORBIDDEN");
        s.h2("GET", target).assert_matrix_error(403, "M_FORBIDDEN");
        h1_plain(s.plain, &get(target, SNI)).0.assert_matrix_error(403, "M_FORBIDDEN");
    }
    for target in NEVER_PUBLIC {
        s.h1(&get(target, SNI)).0.assert_matrix_error(404, "M_UNRECOGNIZED");
        s.h2("GET", target).assert_matrix_error(404, "M_UNRECOGNIZED");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(s.upstream.heads().is_empty(), "{:?}", s.upstream.heads());
}

#[test]
fn admin_api_is_forwarded_from_allowed_networks_but_replication_never() {
    let s = setup_with("admin_api: { allow: [127.0.0.0/8] }\n");
    let (response, _) = s.h1(&get("/_synapse/admin/v1/users/@a:b", SNI));
    assert_eq!(response.status, 200);
    for target in NEVER_PUBLIC {
        s.h1(&get(target, SNI)).0.assert_matrix_error(404, "M_UNRECOGNIZED");
    }
    let got: Vec<String> = s.upstream.wait_for(1).iter().map(|r| r.target().to_string()).collect();
    assert_eq!(got, ["/_synapse/admin/v1/users/@a:b"]);
}

#[test]
fn absolute_form_targets_are_refused() {
    let s = setup();
    for raw in [
        &b"GET http://synapse.example.com/_matrix/client/versions HTTP/1.1\r\nHost: synapse.example.com\r\n\r\n"[..],
        b"GET matrix-federation://remote.example/_matrix/key/v2/server HTTP/1.1\r\nHost: remote.example\r\n\r\n",
        b"GET https://synapse.example.com/_synapse/admin/v1/users HTTP/1.1\r\nHost: synapse.example.com\r\n\r\n",
    ] {
        let (response, _) = s.h1(raw);
        response.assert_matrix_error(400, "M_UNRECOGNIZED");
    }
    // When Host disagrees with the target's authority, Pingora's parser
    // refuses the head before any hook runs: a bare 400, then close.
    let raw =
        b"GET matrix-federation://remote.example/_matrix/key/v2/server HTTP/1.1\r\nHost: synapse.example.com\r\n\r\n";
    let (response, closed) = s.h1(raw);
    assert_eq!(response.status, 400);
    assert!(closed);
    assert!(s.upstream.heads().is_empty());
}

#[test]
fn upgrade_on_matrix_routes_is_refused() {
    let s = setup();
    let raw = b"GET /_matrix/client/v3/sync HTTP/1.1\r\nHost: synapse.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let (response, _) = s.h1(raw);
    response.assert_matrix_error(400, "M_UNRECOGNIZED");
    assert!(s.upstream.heads().is_empty());
}

#[test]
fn paths_outside_matrix_are_404_json() {
    let s = setup();
    for target in ["/", "/index.html", "/_synapse/mas/x", "/health"] {
        s.h1(&get(target, SNI)).0.assert_matrix_error(404, "M_UNRECOGNIZED");
    }
    assert!(s.upstream.heads().is_empty());
}

#[test]
fn oversized_content_length_is_413_before_the_body_is_read() {
    let s = setup();
    // Only the head is sent: an answer proves the body was never awaited.
    let raw = b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: synapse.example.com\r\nContent-Type: image/png\r\nContent-Length: 1048577\r\n\r\n";
    let (response, closed) = s.h1(raw);
    response.assert_matrix_error(413, "M_TOO_LARGE");
    assert!(closed, "the connection must close: its body was never read");
    let h2 = h2_tls(
        s.public,
        SNI,
        &s.pki.root_pem,
        "POST",
        "/_matrix/media/v3/upload",
        &[("content-length", "2000000")],
        Some(vec![0u8; 2_000_000]),
    )
    .unwrap();
    h2.assert_matrix_error(413, "M_TOO_LARGE");
    assert!(s.upstream.heads().is_empty());
}

#[test]
fn chunked_body_over_the_limit_is_cut_and_answered_413() {
    let s = setup();
    let mut stream = client::tls_connect(s.public, SNI, &s.pki.root_pem, &["http/1.1"]);
    stream
        .write_all(b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: synapse.example.com\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let chunk = vec![b'z'; 65536];
    for _ in 0..24 {
        let mut piece = format!("{:x}\r\n", chunk.len()).into_bytes();
        piece.extend_from_slice(&chunk);
        piece.extend_from_slice(b"\r\n");
        if stream.write_all(&piece).is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    let mut reader = BufReader::new(stream);
    let response = read_response(&mut reader, false).expect("a response");
    response.assert_matrix_error(413, "M_TOO_LARGE");
    std::thread::sleep(Duration::from_millis(300));
    let records = s.upstream.records();
    assert!(records.iter().all(|r| !r.body_complete && r.body_len <= 1 << 20), "{records:?}");
}

#[test]
fn h2_body_without_length_over_the_limit_is_413() {
    let s = setup();
    let response =
        h2_tls(s.public, SNI, &s.pki.root_pem, "POST", "/_matrix/media/v3/upload", &[], Some(vec![1u8; 1_500_000]))
            .unwrap();
    response.assert_matrix_error(413, "M_TOO_LARGE");
}

#[test]
fn federation_transactions_get_the_larger_limit() {
    let s = setup();
    let body = vec![b'{'; 2 << 20];
    let response = h2_tls(
        s.federation,
        SNI,
        &s.pki.root_pem,
        "PUT",
        "/_matrix/federation/v1/send/txn1",
        &[("content-type", "application/json")],
        Some(body.clone()),
    )
    .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["body_len"], 2 << 20);
    let mut raw = format!(
        "PUT /_matrix/federation/v1/send/txn2 HTTP/1.1\r\nHost: {SNI}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(&body);
    assert_eq!(h1_tls(s.federation, SNI, &s.pki.root_pem, &raw).0.status, 200);
    let over = format!(
        "PUT /_matrix/federation/v1/send/txn3 HTTP/1.1\r\nHost: {SNI}\r\nContent-Length: {}\r\n\r\n",
        3 * (1 << 20) + 1
    );
    h1_tls(s.federation, SNI, &s.pki.root_pem, over.as_bytes()).0.assert_matrix_error(413, "M_TOO_LARGE");
    // A client upload of the same size is over the client limit.
    let client =
        format!("POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: {SNI}\r\nContent-Length: {}\r\n\r\n", body.len());
    s.h1(client.as_bytes()).0.assert_matrix_error(413, "M_TOO_LARGE");
}

#[test]
fn request_bodies_stream_to_synapse_before_they_end() {
    let s = setup();
    let mut stream = client::tls_connect(s.public, SNI, &s.pki.root_pem, &["http/1.1"]);
    let total = 600_000;
    let head = format!("PUT /_matrix/client/v3/rooms/%21a%3Ab/send/m.room.message/t1 HTTP/1.1\r\nHost: {SNI}\r\nContent-Length: {total}\r\n\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&vec![b'a'; total / 2]).unwrap();
    stream.flush().unwrap();
    // Synapse sees the request while half the body is still with the client.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.upstream.heads().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.upstream.heads().len(), 1, "the request head was held back until the body ended");
    assert!(s.upstream.records().is_empty());
    stream.write_all(&vec![b'b'; total / 2]).unwrap();
    let response = read_response(&mut BufReader::new(stream), false).unwrap();
    assert_eq!(response.json()["body_len"], total);
}

#[test]
fn response_bodies_stream_to_the_client_before_they_end() {
    let s = setup();
    let mut stream = client::tls_connect(s.public, SNI, &s.pki.root_pem, &["http/1.1"]);
    stream.write_all(&get("/_matrix/media/v3/download/x/slow-stream", SNI)).unwrap();
    let started = Instant::now();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    use std::io::{BufRead, Read};
    while reader.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
        line.clear();
    }
    let mut first = vec![0u8; 100_000];
    reader.read_exact(&mut first).unwrap();
    let first_half_after = started.elapsed();
    let mut rest = vec![0u8; 100_000];
    reader.read_exact(&mut rest).unwrap();
    assert!(first.iter().all(|b| *b == b'a') && rest.iter().all(|b| *b == b'b'));
    assert!(first_half_after < Duration::from_millis(1200), "first half arrived only after {first_half_after:?}");
    assert!(started.elapsed() >= Duration::from_millis(1400));
}

/// A Synapse that refuses connections: requests wait `synapse.hold`
/// for it to come back, then get 503 Matrix JSON with Retry-After; with no
/// hold, 502 at once.
#[test]
fn unreachable_synapse_is_held_then_503_or_502_at_once_without_hold() {
    let pki = TestPki::new(&[&["synapse.example.com"]]);
    let dead = free_port();
    for (hold, status) in [("1s", 503), ("0s", 502)] {
        let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = format!(
            "server_name: example.com\nlisteners: [{{ address: \"{public}\", tls: true, serves: [client] }}]\ntls: {{ certificates: [{{ cert: certs/synapse.example.com/fullchain.pem, key: certs/synapse.example.com/privkey.pem }}] }}\nsynapse: {{ main: \"127.0.0.1:{dead}\", hold: {hold} }}\n"
        );
        let _edge = EdgeProcess::start(&config, Some(&pki), &[public]);
        let started = Instant::now();
        let (response, _) = h1_tls(public, SNI, &pki.root_pem, &get("/_matrix/client/versions", SNI));
        let took = started.elapsed();
        response.assert_matrix_error(status, "M_UNKNOWN");
        if status == 503 {
            assert_eq!(response.header("retry-after"), Some("5"));
            assert!((Duration::from_millis(900)..Duration::from_secs(5)).contains(&took), "held {took:?}");
        } else {
            assert!(took < Duration::from_millis(900), "answered after {took:?}");
        }
        h2_tls(public, SNI, &pki.root_pem, "GET", "/_matrix/client/versions", &[], None)
            .unwrap()
            .assert_matrix_error(status, "M_UNKNOWN");
    }
}

#[test]
fn keep_alive_connections_serve_many_requests() {
    let s = setup();
    let mut stream = client::tls_connect(s.public, SNI, &s.pki.root_pem, &["http/1.1"]);
    for i in 0..5 {
        stream.write_all(&get(&format!("/_matrix/client/v3/rooms/%21r{i}%3Ab/state"), SNI)).unwrap();
        let mut reader = BufReader::new(&mut stream);
        let response = read_response(&mut reader, false).unwrap();
        assert_eq!(response.status, 200);
    }
    assert_eq!(s.upstream.wait_for(5).len(), 5);
    // The edge kept one pooled HTTP/1.1 connection to Synapse for all of them.
    for i in 0..5 {
        assert_eq!(s.h2("GET", &format!("/_matrix/client/v3/rooms/%21s{i}%3Ab/state")).status, 200);
    }
    assert_eq!(s.upstream.connection_count(), 1, "upstream connections were not reused");
}

#[test]
fn access_log_never_shows_access_tokens() {
    let s = setup();
    let token = "syt_YWxpY2U_secretsecret_0abc12";
    let target = format!("/_matrix/client/v3/sync?access_token={token}&timeout=0");
    assert_eq!(s.h1(&get(&target, SNI)).0.status, 200);
    let auth = format!("Bearer {token}");
    assert_eq!(
        h2_tls(s.public, SNI, &s.pki.root_pem, "GET", "/_matrix/client/v3/sync", &[("authorization", &auth)], None)
            .unwrap()
            .status,
        200
    );
    std::thread::sleep(Duration::from_millis(200));
    let log = s.edge.log_text();
    assert!(log.contains("access_token=<redacted>"), "{log}");
    assert!(!log.contains("secretsecret"), "{log}");
}

/// A client that writes its whole body before reading, as browsers and most
/// HTTP libraries do without `Expect: 100-continue`, still receives the
/// 413: the edge reads and discards the rest (bounded in time) instead of
/// closing with unread bytes, which the kernel answers with a reset that
/// destroys the response before the client reads it (Synapse #20022).
#[test]
fn an_oversized_upload_sent_in_full_still_gets_its_413() {
    let s = setup();
    let body = vec![b'x'; 4 << 20];
    let head = format!(
        "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: {SNI}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    // Plain HTTP/1.1.
    let mut plain = TcpStream::connect(s.plain).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    plain.write_all(head.as_bytes()).unwrap();
    if let Err(e) = plain.write_all(&body) {
        panic!("the edge stopped reading the body: {e}\n{}", s.edge.log_text());
    }
    let response = read_response(&mut BufReader::new(&plain), false).expect("no response after the body");
    response.assert_matrix_error(413, "M_TOO_LARGE");
    // HTTP/1.1 over TLS.
    let mut tls = client::tls_connect(s.public, SNI, &s.pki.root_pem, &["http/1.1"]);
    tls.write_all(head.as_bytes()).unwrap();
    if let Err(e) = tls.write_all(&body) {
        panic!("the edge stopped reading the body over TLS: {e}\n{}", s.edge.log_text());
    }
    let response = read_response(&mut BufReader::new(tls), false).expect("no response after the body over TLS");
    response.assert_matrix_error(413, "M_TOO_LARGE");
    // HTTP/2: the answer, then the stream reset with NO_ERROR.
    let length = body.len().to_string();
    let h2 = h2_tls(
        s.public,
        SNI,
        &s.pki.root_pem,
        "POST",
        "/_matrix/media/v3/upload",
        &[("content-length", &length)],
        Some(body.clone()),
    );
    h2.expect("no HTTP/2 response").assert_matrix_error(413, "M_TOO_LARGE");
    assert!(s.upstream.heads().is_empty());
}

/// HTTP/2 clients that send their whole body before reading the answer:
/// Debian 12's curl (7.88) drops an answer whose stream is reset after it,
/// even with NO_ERROR, so after an early 413 the edge keeps reading and
/// dropping DATA (giving the window back) until the client ends the stream.
#[test]
fn an_http2_early_answer_reaches_curl_and_nghttp() {
    let s = setup();
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("3MB");
    std::fs::write(&body, vec![b'x'; 3 << 20]).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &s.pki.root_pem).unwrap();
    let port = s.public.port();
    let curl_version = std::process::Command::new("curl").arg("--version").output().unwrap();
    let curl_version = String::from_utf8_lossy(&curl_version.stdout).lines().next().unwrap_or_default().to_string();
    let curl = std::process::Command::new("curl")
        .args(["--http2", "-sS", "-X", "POST", "--max-time", "60", "-w", "\n%{http_code} %{http_version}"])
        .arg("--cacert")
        .arg(&ca)
        .arg("--resolve")
        .arg(format!("{SNI}:{port}:127.0.0.1"))
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .arg(format!("https://{SNI}:{port}/_matrix/media/v3/upload"))
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&curl.stdout);
    assert!(
        curl.status.success(),
        "{curl_version}: exit {:?}, {}\n{shown}",
        curl.status.code(),
        String::from_utf8_lossy(&curl.stderr)
    );
    assert!(shown.contains("\"errcode\":\"M_TOO_LARGE\""), "{curl_version} showed: {shown}");
    assert!(shown.trim_end().ends_with("413 2"), "{curl_version} showed: {shown}");

    let nghttp = std::process::Command::new("nghttp")
        .arg("--data")
        .arg(&body)
        .arg("-H")
        .arg(format!(":authority: {SNI}"))
        .arg(format!("https://127.0.0.1:{port}/_matrix/media/v3/upload"))
        .output()
        .expect("nghttp (scripts/install-deps installs nghttp2-client)");
    let shown = String::from_utf8_lossy(&nghttp.stdout);
    assert!(shown.contains("\"errcode\":\"M_TOO_LARGE\""), "nghttp showed: {shown}");
    assert!(s.upstream.heads().is_empty());
}

/// A client that keeps sending after its 413 is read from only up to the
/// lingering cap (128 MiB): then its stream is reset, the edge's memory
/// has not grown with what it read, and the connection's other streams
/// are served throughout.
#[test]
fn an_http2_client_that_never_stops_sending_after_its_413_is_cut() {
    let s = setup();
    let before = support::rss_kib(s.edge.pid());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (status, sent, reset, other, elapsed) = runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(s.public).await.unwrap();
        // As curl and browsers do; with Nagle the last piece of each window
        // waits for a delayed ACK, 40 ms per 64 KiB.
        tcp.set_nodelay(true).unwrap();
        let ssl = client::connector(&s.pki.root_pem, &["h2"]).configure().unwrap().into_ssl(SNI).unwrap();
        let mut tls = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
        std::pin::Pin::new(&mut tls).connect().await.unwrap();
        let (client, connection) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut client = client.ready().await.unwrap();
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("https://{SNI}/_matrix/media/v3/upload"))
            .header("content-length", (1u64 << 40).to_string())
            .body(())
            .unwrap();
        let (response, mut send) = client.send_request(request, false).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), response).await.unwrap().unwrap();
        let status = response.status().as_u16();
        let started = Instant::now();
        // Another stream on the same connection while this one floods.
        let other_client = client.clone();
        let other = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let request =
                http::Request::builder().uri(format!("https://{SNI}/.well-known/matrix/client")).body(()).unwrap();
            let mut other_client = other_client.ready().await.unwrap();
            let (answer, _) = other_client.send_request(request, true).unwrap();
            answer.await.map(|a| a.status().as_u16()).unwrap_or(0)
        });
        // Whatever window the edge gives back is filled at once.
        let piece = bytes::Bytes::from(vec![b'y'; 1 << 20]);
        let mut sent = 0u64;
        let mut reset = None;
        while started.elapsed() < Duration::from_secs(40) {
            send.reserve_capacity(piece.len());
            let granted = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(granted)) => granted.min(piece.len()),
                _ => {
                    reset = std::future::poll_fn(|cx| send.poll_reset(cx)).await.ok();
                    break;
                }
            };
            if send.send_data(piece.slice(..granted), false).is_err() {
                reset = std::future::poll_fn(|cx| send.poll_reset(cx)).await.ok();
                break;
            }
            sent += granted as u64;
        }
        (status, sent, reset, other.await.unwrap(), started.elapsed())
    });
    assert_eq!(status, 413);
    assert_eq!(reset, Some(h2::Reason::NO_ERROR), "sent {sent} bytes in {elapsed:?}");
    eprintln!("reset after {sent} bytes, {elapsed:?}");
    assert!(sent >= 128 << 20, "reset after only {sent} bytes");
    assert!(sent < 160 << 20, "the edge kept reading: {sent} bytes");
    assert_eq!(other, 200, "the connection's other stream");
    let growth = support::rss_kib(s.edge.pid()).saturating_sub(before);
    assert!(growth < 32 << 10, "the edge grew by {growth} KiB while discarding {sent} bytes");
    assert!(s.upstream.heads().is_empty());
}
