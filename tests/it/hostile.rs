//! Hostile traffic against the real binary over raw sockets, with a recording
//! upstream standing in for Synapse. Each case states the statuses the client
//! must get, whether the edge must close the connection, and exactly which
//! request lines reached the upstream (a smuggled request never may).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use support::certs::TestPki;
use support::client::{self, connect_from, read_response};
use support::h2frames::{frame, literal};
use support::upstream::RecordingUpstream;
use support::{free_port, EdgeProcess};

const HOST: &str = "synapse.example.com";
const T: &str = "/_matrix/client/v3/t";
const SMUGGLED: &str = "GET /_matrix/client/v3/smuggled HTTP/1.1\r\nHost: synapse.example.com\r\n\r\n";

struct Setup {
    pki: TestPki,
    upstream: RecordingUpstream,
    edge: EdgeProcess,
    /// Plain HTTP, client role.
    plain: SocketAddr,
    /// TLS, federation role only (the "8448").
    federation: SocketAddr,
    metrics: SocketAddr,
}

fn setup(extra: &str) -> Setup {
    setup_limits("max_upload_size: 1M", extra)
}

fn setup_limits(limits: &str, extra: &str) -> Setup {
    let pki = TestPki::new(&[&["synapse.example.com"]]);
    let upstream = RecordingUpstream::start();
    let plain: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let federation: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = format!(
        r#"server_name: example.com
listeners:
  - {{ address: "{plain}", tls: false, serves: [client] }}
  - {{ address: "{federation}", tls: true, serves: [federation] }}
tls:
  certificates:
    - {{ cert: certs/synapse.example.com/fullchain.pem, key: certs/synapse.example.com/privkey.pem }}
synapse:
  main: "{}"
admin_api: {{ allow: [127.0.0.3/32] }}
limits: {{ {limits} }}
process: {{ threads: 2 }}
metrics: {{ address: "{metrics}" }}
{extra}"#,
        upstream.addr
    );
    let edge = EdgeProcess::start(&config, Some(&pki), &[plain, federation]);
    Setup { pki, upstream, edge, plain, federation, metrics }
}

/// What one connection saw: the statuses in order and whether the edge closed it.
#[derive(Debug)]
struct Outcome {
    statuses: Vec<u16>,
    errcodes: Vec<String>,
    closed: bool,
}

trait Conn: Read + Write {}
impl<T: Read + Write> Conn for T {}

/// Writes `raw`, then reads responses until the edge closes the connection
/// or stays quiet for `quiet`.
fn exchange(stream: Box<dyn Conn>, set_timeout: &dyn Fn(Duration), raw: &[u8], quiet: Duration) -> Outcome {
    let mut reader = BufReader::new(stream);
    reader.get_mut().write_all(raw).unwrap();
    reader.get_mut().flush().unwrap();
    let head_only = raw.starts_with(b"HEAD ");
    let mut outcome = Outcome { statuses: Vec::new(), errcodes: Vec::new(), closed: false };
    loop {
        set_timeout(quiet);
        match reader.fill_buf() {
            Ok([]) => {
                outcome.closed = true;
                return outcome;
            }
            Ok(_) => {}
            // A reset after a refusal is a close too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                outcome.closed = true;
                return outcome;
            }
            Err(_) => return outcome,
        }
        set_timeout(Duration::from_secs(10));
        let Some(response) = read_response(&mut reader, head_only) else {
            outcome.closed = true;
            return outcome;
        };
        if response.header("content-type").is_some_and(|v| v.contains("json")) && response.status >= 400 {
            outcome.errcodes.push(response.json()["errcode"].as_str().unwrap_or("").to_string());
        }
        outcome.statuses.push(response.status);
    }
}

fn plain_exchange(addr: SocketAddr, raw: &[u8]) -> Outcome {
    let stream = TcpStream::connect(addr).unwrap();
    let handle = stream.try_clone().unwrap();
    exchange(Box::new(stream), &|t| handle.set_read_timeout(Some(t)).unwrap(), raw, Duration::from_millis(400))
}

fn tls_exchange(s: &Setup, addr: SocketAddr, raw: &[u8]) -> Outcome {
    let stream = client::tls_connect(addr, HOST, &s.pki.root_pem, &["http/1.1"]);
    let handle = stream.get_ref().try_clone().unwrap();
    exchange(Box::new(stream), &|t| handle.set_read_timeout(Some(t)).unwrap(), raw, Duration::from_millis(400))
}

/// The request lines that reached the upstream, after letting stragglers arrive.
fn upstream_lines(upstream: &RecordingUpstream) -> Vec<String> {
    std::thread::sleep(Duration::from_millis(150));
    upstream.heads()
}

#[derive(Clone, Copy)]
enum Port {
    Plain,
    Federation,
}

struct Case {
    name: &'static str,
    port: Port,
    raw: Vec<u8>,
    statuses: &'static [u16],
    /// `Some(true)`: the edge must close; `Some(false)`: it must keep the
    /// connection open; `None`: either is fine.
    closed: Option<bool>,
    /// Request lines the upstream must have received, in order.
    upstream: Vec<String>,
}

fn case(name: &'static str, raw: impl Into<Vec<u8>>, statuses: &'static [u16], closed: Option<bool>) -> Case {
    Case { name, port: Port::Plain, raw: raw.into(), statuses, closed, upstream: Vec::new() }
}

impl Case {
    fn upstream(mut self, lines: &[&str]) -> Case {
        self.upstream = lines.iter().map(|l| l.to_string()).collect();
        self
    }

    fn on(mut self, port: Port) -> Case {
        self.port = port;
        self
    }
}

/// `POST T` with extra header lines and then raw bytes after the head.
fn post(headers: &str, after: &str) -> String {
    format!("POST {T} HTTP/1.1\r\nHost: {HOST}\r\n{headers}\r\n{after}")
}

fn get_line(target: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
}

const CLOSED: Option<bool> = Some(true);
const OPEN: Option<bool> = Some(false);
const EITHER: Option<bool> = None;

fn framing_cases() -> Vec<Case> {
    let post_line = format!("POST {T} HTTP/1.1");
    let get_t = format!("GET {T} HTTP/1.1");
    vec![
        // Content-Length and Transfer-Encoding together (CL.TE / TE.CL).
        case(
            "cl_te",
            post("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", &format!("0\r\n\r\n{SMUGGLED}")),
            &[400],
            CLOSED,
        ),
        case(
            "te_cl",
            post("Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", &format!("0\r\n\r\n{SMUGGLED}")),
            &[400],
            CLOSED,
        ),
        case("cl_conflicting", post("Content-Length: 3\r\nContent-Length: 40\r\n", "abc"), &[400], CLOSED),
        case("cl_duplicate", post("Content-Length: 3\r\nContent-Length: 3\r\n", "abc"), &[400], CLOSED),
        case("cl_list", post("Content-Length: 3, 3\r\n", "abc"), &[400], CLOSED),
        case("cl_plus_sign", post("Content-Length: +3\r\n", "abc"), &[400], CLOSED),
        case("cl_negative", post("Content-Length: -3\r\n", "abc"), &[400], CLOSED),
        case("cl_hex", post("Content-Length: 0x3\r\n", "abc"), &[400], CLOSED),
        case("cl_overflow", post("Content-Length: 18446744073709551616\r\n", "abc"), &[400], CLOSED),
        case("cl_inner_space", post("Content-Length: 1 3\r\n", "abc"), &[400], CLOSED),
        case("cl_empty", post("Content-Length: \r\n", "abc"), &[400], CLOSED),
        // Transfer-Encoding obfuscations.
        case("te_identity", post("Transfer-Encoding: identity\r\n", &format!("3\r\nabc\r\n0\r\n\r\n{SMUGGLED}")), &[400], CLOSED),
        case("te_chunked_not_last", post("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"), &[400], CLOSED),
        case("te_xchunked", post("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"), &[400], CLOSED),
        case("te_space_before_colon", post("Transfer-Encoding : chunked\r\n", "0\r\n\r\n"), &[400], CLOSED),
        case("te_obs_fold", post("Transfer-Encoding: identity\r\n chunked\r\n", "0\r\n\r\n"), &[400], CLOSED),
        case(
            "te_twice",
            post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"),
            &[400],
            CLOSED,
        ),
        case("te_vertical_tab", post("Transfer-Encoding:\x0bchunked\r\n", "0\r\n\r\n"), &[400], CLOSED),
        case("te_quoted", post("Transfer-Encoding: \"chunked\"\r\n", "0\r\n\r\n"), &[400], CLOSED),
        // Line endings and bytes that parse differently elsewhere.
        case("bare_lf_everywhere", format!("GET {T} HTTP/1.1\nHost: {HOST}\n\n"), &[400], CLOSED),
        // Request lines RFC 9112 does not allow: never rewritten and forwarded.
        case("target_with_space", format!("GET {T} x HTTP/1.1\r\nHost: {HOST}\r\n\r\n"), &[400], CLOSED),
        case("target_with_tab", format!("GET {T}\tx HTTP/1.1\r\nHost: {HOST}\r\n\r\n"), &[400], CLOSED),
        case("target_with_control_byte", format!("GET {T}\x01 HTTP/1.1\r\nHost: {HOST}\r\n\r\n"), &[400], CLOSED),
        case("target_with_del", format!("GET {T}\x7f HTTP/1.1\r\nHost: {HOST}\r\n\r\n"), &[400], CLOSED),
        case("double_space_separator", format!("GET  {T} HTTP/1.1\r\nHost: {HOST}\r\n\r\n"), &[400], CLOSED),
        case("tab_separator", format!("GET\t{T} HTTP/1.1\r\nHost: {HOST}\r\n\r\n"), &[400], CLOSED),
        case("four_part_request_line", format!("GET {T} HTTP/1.1 x\r\nHost: {HOST}\r\n\r\n"), &[400], CLOSED),
        case("bare_lf_in_header", format!("GET {T} HTTP/1.1\r\nHost: {HOST}\nX-A: b\r\n\r\n"), &[400], CLOSED),
        case("bare_cr_in_header", format!("GET {T} HTTP/1.1\r\nX-A: a\rb\r\nHost: {HOST}\r\n\r\n"), &[400], CLOSED),
        case("nul_in_header", format!("GET {T} HTTP/1.1\r\nX-A: a\0b\r\nHost: {HOST}\r\n\r\n"), &[400], CLOSED),
        case("space_in_header_name", format!("GET {T} HTTP/1.1\r\nX A: b\r\nHost: {HOST}\r\n\r\n"), &[400], CLOSED),
        case("header_obs_fold", format!("GET {T} HTTP/1.1\r\nX-A: a\r\n b\r\nHost: {HOST}\r\n\r\n"), &[400], CLOSED),
        case("no_host", format!("GET {T} HTTP/1.1\r\n\r\n"), &[400], CLOSED),
        case("two_hosts", format!("GET {T} HTTP/1.1\r\nHost: {HOST}\r\nHost: evil.example\r\n\r\n"), &[400], CLOSED),
        // Chunk-size tricks: the head may reach Synapse, the rest never does.
        case("chunk_size_not_hex", post("Transfer-Encoding: chunked\r\n", &format!("zz\r\nabc\r\n0\r\n\r\n{SMUGGLED}")), &[400], CLOSED)
            .upstream(&[&post_line]),
        case("chunk_size_overflow", post("Transfer-Encoding: chunked\r\n", &format!("fffffffffffffffff1\r\nabc\r\n0\r\n\r\n{SMUGGLED}")), &[400], CLOSED)
            .upstream(&[&post_line]),
        case("chunk_size_0x", post("Transfer-Encoding: chunked\r\n", &format!("0x3\r\nabc\r\n0\r\n\r\n{SMUGGLED}")), &[400], CLOSED)
            .upstream(&[&post_line]),
        case("chunk_size_negative", post("Transfer-Encoding: chunked\r\n", &format!("-3\r\nabc\r\n0\r\n\r\n{SMUGGLED}")), &[400], CLOSED)
            .upstream(&[&post_line]),
        case("chunk_ext_bare_lf", post("Transfer-Encoding: chunked\r\n", &format!("3;x\nabc\r\n0\r\n\r\n{SMUGGLED}")), &[400], CLOSED)
            .upstream(&[&post_line]),
        case("chunk_data_overrun", post("Transfer-Encoding: chunked\r\n", &format!("3\r\nabcdef\r\n0\r\n\r\n{SMUGGLED}")), &[400], CLOSED)
            .upstream(&[&post_line]),
        case("chunk_missing_crlf", post("Transfer-Encoding: chunked\r\n", &format!("3\r\nabc0\r\n\r\n{SMUGGLED}")), &[400], CLOSED)
            .upstream(&[&post_line]),
        case("chunk_last_bare_lf", post("Transfer-Encoding: chunked\r\n", &format!("3\r\nabc\r\n0\n\n{SMUGGLED}")), &[400], CLOSED)
            .upstream(&[&post_line]),
        // HTTP/1.0 and protocol switches.
        case("http10_chunked", format!("POST {T} HTTP/1.0\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"), &[400], CLOSED),
        case("http10_content_length", format!("POST {T} HTTP/1.0\r\nHost: {HOST}\r\nContent-Length: 3\r\n\r\nabc{SMUGGLED}"), &[200], CLOSED)
            .upstream(&[&post_line]),
        case("http10_unframed_body", format!("POST {T} HTTP/1.0\r\nHost: {HOST}\r\n\r\nabc{SMUGGLED}"), &[200], CLOSED)
            .upstream(&[&post_line]),
        case(
            "upgrade_then_pipelined",
            format!("GET {T} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n{SMUGGLED}"),
            &[400],
            CLOSED,
        ),
        case(
            "upgrade_h2c",
            format!("GET {T} HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n{SMUGGLED}"),
            &[400],
            CLOSED,
        ),
        case("h2_preface_on_h1", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", &[400], CLOSED),
        case("version_1_2", format!("GET {T} HTTP/1.2\r\nHost: {HOST}\r\n\r\n"), &[400], CLOSED),
        case("version_2_in_h1", format!("GET {T} HTTP/2.0\r\nHost: {HOST}\r\n\r\n"), &[400], CLOSED),
        case("request_line_double_space", format!("GET  {T} HTTP/1.1\r\nHost: {HOST}\r\n\r\n"), &[400], CLOSED),
        case("asterisk_form", format!("OPTIONS * HTTP/1.1\r\nHost: {HOST}\r\n\r\n"), &[400], EITHER),
        case("connect_method", format!("CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n"), &[405], CLOSED),
        // Local answers leave the body unread, so the connection must close.
        case(
            "early_413_with_expect",
            format!("POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 2000000\r\nExpect: 100-continue\r\n\r\n"),
            &[413],
            CLOSED,
        ),
        case(
            "early_413_body_holds_request",
            format!("POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 2000000\r\n\r\n{SMUGGLED}"),
            &[413],
            CLOSED,
        ),
        case(
            "denied_with_body_holding_request",
            format!("POST /_synapse/admin/v1/x HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {}\r\n\r\n{SMUGGLED}", SMUGGLED.len()),
            &[403],
            CLOSED,
        ),
        case(
            "unknown_path_with_body_holding_request",
            format!("POST /nope HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {}\r\n\r\n{SMUGGLED}", SMUGGLED.len()),
            &[404],
            CLOSED,
        ),
        // Pipelined requests: the first is answered, then the connection
        // closes and the client retries the rest (RFC 9112 9.3.2); bytes
        // after a request never reach Synapse as a request of their own.
        case("pipelined_pair", format!("{}{}", get_line(T), get_line("/_matrix/client/v3/u")), &[200], CLOSED)
            .upstream(&[&get_t]),
        case("get_with_body_then_pipelined", format!("GET {T} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3\r\n\r\nabc{}", get_line(T)), &[200], CLOSED)
            .upstream(&[&get_t]),
        // Honest framing keeps working, byte for byte.
        case("get_with_body", format!("GET {T} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3\r\n\r\nabc"), &[200], OPEN)
            .upstream(&[&get_t]),
        case("chunked_with_trailer", post("Transfer-Encoding: chunked\r\n", "3\r\nabc\r\n0\r\nX-Trailer: y\r\n\r\n"), &[200], OPEN)
            .upstream(&[&post_line]),
        case("te_uppercase_chunked", post("Transfer-Encoding: CHUNKED\r\n", "3\r\nabc\r\n0\r\n\r\n"), &[200], OPEN)
            .upstream(&[&post_line]),
    ]
}

fn bypass_cases() -> Vec<Case> {
    let forbidden = |name, target: &str| case(name, get_line(target), &[403], EITHER);
    let unknown = |name, target: &str| case(name, get_line(target), &[404], EITHER);
    let send = "/_matrix/federation/v1/send/1%2F2?x=1&x=2";
    let messages = "/_matrix/client/v3/rooms/%21r%3Aexample.com/messages?dir=b&from=a%2Bb&from=c";
    vec![
        forbidden("admin_double_slash", "/_synapse//admin/v1/users"),
        forbidden("admin_encoded_letter", "/_synapse/%61dmin/v1/users"),
        forbidden("admin_dot_segment", "/_matrix/../_synapse/admin/v1/users"),
        forbidden("admin_encoded_dots", "/_matrix/%2e%2e/_synapse/admin/v1/users"),
        forbidden("admin_double_encoded_dots", "/_matrix/%252e%252e/_synapse/admin/v1/users"),
        forbidden("admin_mixed_case", "/_SYNAPSE/Admin/v1/users"),
        forbidden("admin_encoded_slash", "/_synapse/admin%2Fv1/users"),
        forbidden("admin_dot_prefix", "/./_synapse/admin/v1/users"),
        unknown("replication", "/_synapse/replication/get_repl_stream_updates/events"),
        unknown("replication_encoded", "/_synapse/%72eplication/x"),
        unknown("metrics_via_dots", "/_matrix/client/../../_synapse/metrics"),
        case(
            "admin_absolute_form",
            format!("GET http://{HOST}/_synapse/admin/v1/users HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
            &[400],
            EITHER,
        ),
        unknown("client_on_federation_port", "/_matrix/client/v3/sync").on(Port::Federation),
        unknown("client_via_federation_dots", "/_matrix/federation/../client/v3/sync").on(Port::Federation),
        unknown("client_via_federation_encoded_dots", "/_matrix/federation/%2e%2e/client/v3/sync").on(Port::Federation),
        unknown("client_via_federation_encoded_slash", "/_matrix/federation/..%2fclient/v3/sync").on(Port::Federation),
        unknown("client_mixed_case_on_federation_port", "/_matrix/CLIENT/v3/sync").on(Port::Federation),
        case("admin_on_federation_port", get_line("/_synapse/admin/v1/users"), &[403], EITHER).on(Port::Federation),
        case("federation_raw_bytes_kept", get_line(send), &[200], OPEN)
            .on(Port::Federation)
            .upstream(&[&format!("GET {send} HTTP/1.1")]),
        case("client_raw_bytes_kept", get_line(messages), &[200], OPEN)
            .upstream(&[&format!("GET {messages} HTTP/1.1")]),
    ]
}

fn limit_cases() -> Vec<Case> {
    let many_headers: String = (0..101).map(|i| format!("X-H{i}: v\r\n")).collect();
    let big_headers = format!("X-Big: {}\r\n", "a".repeat(33 << 10));
    let long_target = format!("/_matrix/client/v3/sync?filter={}", "a".repeat(17 << 10));
    let filter = format!(
        "/_matrix/client/v3/sync?filter={}&timeout=0",
        "%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A20%7D%7D%7D".repeat(180)
    );
    let huge_head = format!("X-Huge: {}\r\n", "a".repeat(1100 << 10));
    vec![
        case("too_many_headers", format!("GET {T} HTTP/1.1\r\nHost: {HOST}\r\n{many_headers}\r\n"), &[431], EITHER),
        case("header_bytes_over_cap", format!("GET {T} HTTP/1.1\r\nHost: {HOST}\r\n{big_headers}\r\n"), &[431], EITHER),
        case("target_over_cap", get_line(&long_target), &[414], EITHER),
        case("long_sync_filter_admitted", get_line(&filter), &[200], OPEN)
            .upstream(&[&format!("GET {filter} HTTP/1.1")]),
        case("head_over_a_mebibyte", format!("GET {T} HTTP/1.1\r\nHost: {HOST}\r\n{huge_head}\r\n"), &[400], CLOSED),
    ]
}

fn run_cases(s: &Setup, cases: Vec<Case>) -> usize {
    let mut failures = Vec::new();
    let count = cases.len();
    for case in cases {
        s.upstream.clear();
        let outcome = match case.port {
            Port::Plain => plain_exchange(s.plain, &case.raw),
            Port::Federation => tls_exchange(s, s.federation, &case.raw),
        };
        let lines = upstream_lines(&s.upstream);
        let mut problems = Vec::new();
        if outcome.statuses != case.statuses {
            problems.push(format!("statuses {:?}, want {:?}", outcome.statuses, case.statuses));
        }
        if outcome.statuses.iter().any(|&s| s >= 400) && outcome.errcodes.is_empty() {
            problems.push("error without Matrix JSON".to_string());
        }
        if let Some(closed) = case.closed {
            if outcome.closed != closed {
                problems.push(format!("closed {}, want {closed}", outcome.closed));
            }
        }
        if lines != case.upstream {
            problems.push(format!("upstream got {lines:?}, want {:?}", case.upstream));
        }
        if lines.iter().any(|l| l.contains("smuggled")) {
            problems.push("SMUGGLED REQUEST REACHED THE UPSTREAM".to_string());
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}", case.name, problems.join("; ")));
        }
    }
    assert!(failures.is_empty(), "{} of {count} cases failed:\n{}", failures.len(), failures.join("\n"));
    count
}

#[test]
fn request_framing_attacks() {
    let s = setup("");
    let count = run_cases(&s, framing_cases());
    assert!(count >= 50);
    drop(s.edge);
}

#[test]
fn routing_bypass_attempts() {
    let s = setup("");
    run_cases(&s, bypass_cases());
    // From an allowed address the admin API is forwarded with its bytes
    // intact; spellings Synapse itself would not route still are not.
    let from_admin_network = |target: &str| {
        s.upstream.clear();
        let mut stream = connect_from("127.0.0.3", s.plain);
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.write_all(get_line(target).as_bytes()).unwrap();
        let status = read_response(&mut BufReader::new(&stream), false)
            .unwrap_or_else(|| panic!("no answer to {target}"))
            .status;
        (status, upstream_lines(&s.upstream))
    };
    let user = "/_synapse/admin/v2/users/%40alice%3Aexample.com";
    assert_eq!(from_admin_network(user), (200, vec![format!("GET {user} HTTP/1.1")]));
    assert_eq!(from_admin_network("/_synapse/%61dmin/v1/server_version"), (404, vec![]));
    assert_eq!(from_admin_network("/_synapse/replication/x"), (404, vec![]));
}

#[test]
fn header_and_target_caps() {
    let s = setup("");
    run_cases(&s, limit_cases());
}

/// Opens a connection and sends `first`; returns it with a read timeout set.
fn open_with(addr: SocketAddr, first: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(first).unwrap();
    stream
}

/// Waits until the edge counts `count` client connections open.
fn wait_for_open(s: &Setup, count: u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while client::metric(s.metrics, "matrix_edge_connections_open ") != Some(f64::from(count)) {
        assert!(Instant::now() < deadline, "the edge never counted {count} connections open");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for the edge to close `stream`; returns how long that took and any bytes it sent.
fn wait_closed(stream: &mut TcpStream) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return (started.elapsed(), received),
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
}

const SLOW: &str = "max_upload_size: 1M, header_timeout: 1s, body_idle_timeout: 1s, keepalive_requests: 3";

#[test]
fn slow_heads_are_cut_off_and_idle_keepalive_is_not() {
    let s = setup_limits(SLOW, "");
    // A head that never completes.
    let mut partial = open_with(s.plain, format!("GET {T} HTTP/1.1\r\nHost: {HOST}\r\n").as_bytes());
    let (after, received) = wait_closed(&mut partial);
    assert!(received.is_empty(), "answered a head cut off: {:?}", String::from_utf8_lossy(&received));
    assert!(after >= Duration::from_millis(800) && after < Duration::from_secs(5), "closed after {after:?}");
    // A head trickled a byte at a time: every byte resets a per-read timeout,
    // but not the deadline for the whole head.
    let mut trickle = TcpStream::connect(s.plain).unwrap();
    let started = Instant::now();
    let head = get_line(T);
    let mut cut = false;
    for byte in head.as_bytes() {
        if trickle.write_all(&[*byte]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(150));
        if started.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    trickle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (_, received) = wait_closed(&mut trickle);
    assert!(cut || received.is_empty(), "trickled head was served: {:?}", String::from_utf8_lossy(&received));
    assert!(started.elapsed() < Duration::from_secs(6));
    // Connecting and sending nothing is cut off by the same deadline.
    let mut silent = open_with(s.plain, b"");
    let (after, _) = wait_closed(&mut silent);
    assert!(after < Duration::from_secs(5), "silent connection held for {after:?}");
    // An idle keep-alive connection waits longer than the head deadline:
    // its clock starts at the next request's first byte.
    let mut reader = BufReader::new(open_with(s.plain, get_line(T).as_bytes()));
    assert_eq!(read_response(&mut reader, false).unwrap().status, 200);
    std::thread::sleep(Duration::from_millis(1800));
    reader.get_mut().write_all(get_line(T).as_bytes()).unwrap();
    assert_eq!(read_response(&mut reader, false).unwrap().status, 200);
    assert_eq!(upstream_lines(&s.upstream).len(), 2, "only the two honest requests reach Synapse");
}

#[test]
fn stalled_bodies_get_408_but_slow_honest_transfers_finish() {
    let s = setup_limits(SLOW, "");
    // A body that stops halfway.
    let mut stalled = open_with(s.plain, post("Content-Length: 10\r\n", "12345").as_bytes());
    let (after, received) = wait_closed(&mut stalled);
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"errcode\":\"M_UNKNOWN\""), "{text}");
    assert!(after < Duration::from_secs(5));
    let records = s.upstream.wait_for(1);
    assert_eq!((records.len(), records[0].body_len, records[0].body_complete), (1, 5, false));
    s.upstream.clear();
    // An upload slower than the head deadline overall, with pauses under the idle timeout.
    let mut upload = open_with(s.plain, post("Content-Length: 12288\r\n", "").as_bytes());
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(400));
        upload.write_all(&[b'm'; 1024]).unwrap();
    }
    let response = read_response(&mut BufReader::new(&upload), false).unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["body_len"], 12288);
    // A response that pauses longer than both timeouts (as a long-poll does) is not cut.
    let mut reader = BufReader::new(open_with(s.plain, get_line("/_matrix/client/v3/slow-stream").as_bytes()));
    let response = read_response(&mut reader, false).unwrap();
    assert_eq!((response.status, response.body.len()), (200, 200_000));
}

#[test]
fn keepalive_request_limit_closes_after_the_last_request() {
    let s = setup_limits(SLOW, "");
    let mut reader = BufReader::new(open_with(s.plain, b""));
    for n in 1..=3 {
        reader.get_mut().write_all(get_line(T).as_bytes()).unwrap();
        let response = read_response(&mut reader, false).unwrap();
        assert_eq!(response.status, 200);
        let closing = response.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        assert_eq!(closing, n == 3, "request {n}: Connection {:?}", response.header("connection"));
    }
    reader.get_ref().set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert!(client::is_closed(&mut reader));
}

#[test]
fn connections_per_address_are_capped() {
    let s = setup_limits("connections_per_ip: 4, header_timeout: 10s", "");
    let held: Vec<TcpStream> = (0..4).map(|_| open_with(s.plain, b"GET ")).collect();
    // Counted once accepted: on a loaded machine that once took more than
    // the 2 s this test used to wait, and the fifth was let in.
    wait_for_open(&s, 4);
    let mut refused = open_with(s.plain, get_line(T).as_bytes());
    let (after, received) = wait_closed(&mut refused);
    assert!(received.is_empty() && after < Duration::from_secs(2), "fifth connection served: {received:?}");
    // Another address is unaffected.
    let mut other = connect_from("127.0.0.2", s.plain);
    other.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    other.write_all(get_line(T).as_bytes()).unwrap();
    assert_eq!(read_response(&mut BufReader::new(&other), false).unwrap().status, 200);
    // Closing them frees their places.
    drop((held, other));
    wait_for_open(&s, 0);
    let again = open_with(s.plain, get_line(T).as_bytes());
    assert_eq!(read_response(&mut BufReader::new(&again), false).unwrap().status, 200);
    // The refused connection's request never reached Synapse; the two served ones did.
    assert_eq!(upstream_lines(&s.upstream), vec![format!("GET {T} HTTP/1.1"); 2]);
}

#[test]
fn rate_limits_answer_429_with_retry_after() {
    let s = setup("rate_limits:\n  login: { requests: 3, per: 60s }\n  federation: { requests: 2, per: 60s }\n");
    let login = |source: &str, method: &str| {
        let mut stream = connect_from(source, s.plain);
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let body = r#"{"type":"m.login.password"}"#;
        let raw = format!(
            "{method} /_matrix/client/v3/login HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(raw.as_bytes()).unwrap();
        read_response(&mut BufReader::new(&stream), false).unwrap()
    };
    for _ in 0..3 {
        assert_eq!(login("127.0.0.1", "POST").status, 200);
    }
    let limited = login("127.0.0.1", "POST");
    limited.assert_matrix_error(429, "M_LIMIT_EXCEEDED");
    let wait = limited.json()["retry_after_ms"].as_u64().unwrap();
    assert!(wait > 1000 && wait <= 120_000, "retry_after_ms {wait}");
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(retry_after, wait.div_ceil(1000));
    assert_eq!(login("127.0.0.2", "POST").status, 200, "another address has its own count");
    assert_eq!(login("127.0.0.1", "GET").status, 200, "only POSTs count");
    assert_eq!(upstream_lines(&s.upstream).iter().filter(|l| l.starts_with("POST")).count(), 4);

    s.upstream.clear();
    let raw = |origin: &str| {
        format!(
            "PUT /_matrix/federation/v1/send/{origin}1 HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: X-Matrix origin=\"{origin}\",key=\"ed25519:a\",sig=\"s\"\r\nContent-Length: 2\r\n\r\n{{}}"
        )
    };
    let send = |origin: &str| tls_exchange(&s, s.federation, raw(origin).as_bytes());
    assert_eq!(send("a.example").statuses, [200]);
    assert_eq!(send("a.example").statuses, [200]);
    let limited = send("a.example");
    assert_eq!((limited.statuses, limited.errcodes), (vec![429], vec!["M_LIMIT_EXCEEDED".to_string()]));
    // The origin is not verified here: the same claim from another address
    // has its own budget, so a forger cannot spend a.example's...
    let mut forger = connect_from("127.0.0.3", s.plain);
    forger.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    forger.write_all(raw("a.example").as_bytes()).unwrap();
    assert_eq!(read_response(&mut BufReader::new(&forger), false).unwrap().status, 200);
    // ... and inventing origins does not escape an address's budget.
    let invented = send("b.example");
    assert_eq!(invented.statuses, [429], "another origin from a spent address");
    assert_eq!(upstream_lines(&s.upstream).len(), 3);
}

/// `count` honest requests on fresh connections, each timed to its full
/// response; sorted.
fn honest_latencies(addr: SocketAddr, count: usize) -> Vec<Duration> {
    let mut latencies: Vec<Duration> = (0..count)
        .map(|_| {
            let started = Instant::now();
            let stream = open_with(addr, get_line(T).as_bytes());
            let response = read_response(&mut BufReader::new(&stream), false).expect("honest request unanswered");
            assert_eq!(response.status, 200, "honest request refused");
            let took = started.elapsed();
            std::thread::sleep(Duration::from_millis(100));
            took
        })
        .collect();
    latencies.sort();
    latencies
}

#[test]
fn slowloris_leaves_honest_requests_served() {
    let s = setup_limits("header_timeout: 2s, connections_per_ip: 100", "");
    let quiet = honest_latencies(s.plain, 20);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // 4 attacker addresses x 75 connections, each trickling a header byte
    // every 200 ms and reconnecting when cut off, for 6 seconds.
    let attackers: Vec<_> = (1..=4)
        .map(|n| {
            let (stop, opened, addr) = (stop.clone(), opened.clone(), s.plain);
            std::thread::spawn(move || {
                let source = format!("127.0.1.{n}");
                let mut conns: Vec<Option<TcpStream>> = (0..75).map(|_| None).collect();
                let deadline = Instant::now() + Duration::from_secs(6);
                while Instant::now() < deadline && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for slot in conns.iter_mut() {
                        let alive = slot.as_mut().is_some_and(|c| c.write_all(b"X").is_ok());
                        if !alive {
                            let mut conn = connect_from(&source, addr);
                            conn.set_write_timeout(Some(Duration::from_millis(100))).unwrap();
                            let _ = conn.write_all(b"GET /_matrix/client/v3/sync HTTP/1.1\r\nX-Slow: ");
                            opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            *slot = Some(conn);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    let under_attack = honest_latencies(s.plain, 40);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for attacker in attackers {
        attacker.join().unwrap();
    }
    let opened = opened.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "slowloris: {opened} attacking connections; honest median {:?} (quiet: {:?}), max {:?}",
        under_attack[20], quiet[10], under_attack[39]
    );
    assert!(opened > 300, "cut-off connections are reopened, so more than 300 were opened: {opened}");
    // Liveness, not speed: every honest request is answered within a
    // second, and the typical one stays in the same range as without attack.
    assert!(under_attack[39] < Duration::from_secs(1), "honest max latency {:?}", under_attack[39]);
    let normal = (quiet[10] * 10).max(Duration::from_millis(50));
    assert!(under_attack[20] < normal, "median {:?} vs {:?} without attack", under_attack[20], quiet[10]);
    assert!(upstream_lines(&s.upstream).iter().all(|l| l == &format!("GET {T} HTTP/1.1")));
}

/// What a raw HTTP/2 exchange ended with.
#[derive(Debug, PartialEq)]
enum H2End {
    /// A response, by status when it was sent as a static-table index.
    Status(u16),
    Reset(u32),
    GoAway(u32),
    Closed,
}

/// A POST head: `:method POST`, `:scheme https`, `:authority`, then `:path`
/// (unless `None`) and `extra` fields, built byte by byte so that fields a
/// well-behaved HTTP/2 library refuses to send can be sent.
fn h2_head(path: Option<&str>, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut block = vec![0x83, 0x87];
    block.extend(literal(1, "", HOST));
    if let Some(path) = path {
        block.extend(literal(4, "", path));
    }
    for (name, value) in extra {
        block.extend(literal(0, name, value));
    }
    block
}

/// Sends one request on stream 1 as raw frames and reads until it ends.
fn h2_raw(s: &Setup, head: &[u8], data: Option<&[u8]>) -> H2End {
    let mut stream = client::tls_connect(s.federation, HOST, &s.pki.root_pem, &["h2"]);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    out.extend(frame(4, 1, 0, &[]));
    out.extend(frame(1, if data.is_none() { 0x5 } else { 0x4 }, 1, head));
    if let Some(data) = data {
        out.extend(frame(0, 0x1, 1, data));
    }
    stream.write_all(&out).unwrap();
    stream.get_ref().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    loop {
        let mut header = [0u8; 9];
        if stream.read_exact(&mut header).is_err() {
            return H2End::Closed;
        }
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; length];
        if stream.read_exact(&mut payload).is_err() {
            return H2End::Closed;
        }
        let stream_id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        let code = |at: usize| u32::from_be_bytes([payload[at], payload[at + 1], payload[at + 2], payload[at + 3]]);
        match (header[3], stream_id) {
            (1, 1) => {
                let statuses = [200, 204, 206, 304, 400, 404, 500];
                let index = payload.first().map_or(0, |b| b & 0x7f) as usize;
                return H2End::Status(if (8..=14).contains(&index) { statuses[index - 8] } else { 0 });
            }
            (3, 1) => return H2End::Reset(code(0)),
            (7, _) => return H2End::GoAway(code(4)),
            _ => {}
        }
    }
}

#[test]
fn h2_malformed_requests_never_reach_synapse_whole() {
    const PROTOCOL_ERROR: u32 = 1;
    let s = setup("");
    let send = "/_matrix/federation/v1/send/1";
    type RawRequest = (&'static str, Vec<u8>, Option<&'static [u8]>);
    let refused_outright: Vec<RawRequest> = vec![
        ("transfer_encoding", h2_head(Some(send), &[("transfer-encoding", "chunked")]), Some(b"0\r\n\r\n")),
        ("connection_header", h2_head(Some(send), &[("connection", "keep-alive")]), None),
        ("upgrade_header", h2_head(Some(send), &[("upgrade", "websocket")]), None),
        ("te_not_trailers", h2_head(Some(send), &[("te", "gzip")]), None),
        ("uppercase_name", h2_head(Some(send), &[("X-Upper", "a")]), None),
        ("crlf_in_value", h2_head(Some(send), &[("x-a", "a\r\nGET /smuggled HTTP/1.1")]), None),
        ("no_path", h2_head(None, &[]), None),
        ("two_paths", h2_head(Some(send), &[(":path", "/_matrix/federation/v1/version")]), None),
        ("absolute_path", h2_head(Some("http://x/_matrix/federation/v1/version"), &[]), None),
    ];
    for (name, head, data) in refused_outright {
        s.upstream.clear();
        let end = h2_raw(&s, &head, data);
        let refused = matches!(end, H2End::Reset(PROTOCOL_ERROR) | H2End::GoAway(PROTOCOL_ERROR) | H2End::Status(400));
        assert!(refused, "{name}: {end:?}");
        assert_eq!(upstream_lines(&s.upstream), Vec::<String>::new(), "{name}");
    }
    // Declared length and data disagree (the h2 -> h1 downgrade smuggling
    // shape): the stream is reset; Synapse, which got the head already (heads
    // are streamed), never gets a byte past the declared length, so neither
    // a longer body nor a request hidden in it.
    let mismatched: Vec<(&str, &str, &[u8])> = vec![
        ("length_short", "10", b"12345"),
        ("length_long", "3", b"1234567890"),
        ("length_zero_with_request", "0", SMUGGLED.as_bytes()),
    ];
    for (name, length, data) in mismatched {
        s.upstream.clear();
        let end = h2_raw(&s, &h2_head(Some(send), &[("content-length", length)]), Some(data));
        assert!(matches!(end, H2End::Reset(PROTOCOL_ERROR) | H2End::Status(400)), "{name}: {end:?}");
        std::thread::sleep(Duration::from_millis(150));
        let records = s.upstream.records();
        let declared: u64 = length.parse().unwrap();
        let within = |r: &support::upstream::Recorded| r.target() == send && r.body_len <= declared;
        assert!(records.len() <= 1 && records.iter().all(within), "{name}: {records:?}");
        if declared > data.len() as u64 {
            assert!(records.iter().all(|r| !r.body_complete), "{name}: a short body was completed: {records:?}");
        }
        assert!(upstream_lines(&s.upstream).iter().all(|l| !l.contains("smuggled")), "{name}");
    }
    // Routing rules hold over h2 as over HTTP/1.
    for (path, status) in [("/_matrix/client/v3/sync", 404), ("/_synapse/admin/v1/users", 0)] {
        s.upstream.clear();
        let end = h2_raw(&s, &h2_head(Some(path), &[]), None);
        // 403 is not in the static table; its literal form reads as 0.
        assert_eq!(end, H2End::Status(status), "{path}");
        assert_eq!(upstream_lines(&s.upstream), Vec::<String>::new(), "{path}");
    }
    // And a well-formed request passes, as the control.
    let end = h2_raw(&s, &h2_head(Some(send), &[("content-length", "2")]), Some(b"{}"));
    assert_eq!(end, H2End::Status(200));
    assert_eq!(upstream_lines(&s.upstream), [format!("POST {send} HTTP/1.1")]);
}
