//! HTTP/2 abuse against the real binary over TLS, one attack connection at
//! a time, each bounded in size: rapid reset (CVE-2023-44487), CONTINUATION
//! flood (CVE-2024-27316), an HPACK bomb, SETTINGS and PING floods, a reader
//! that never opens its window, and more streams than allowed. During each,
//! an honest HTTP/2 client on another connection must be served promptly;
//! across all of them the edge's memory must stay bounded, and the attacks
//! may reach Synapse only as far as the limits allow.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::certs::TestPki;
use support::client::{self, h2_tls};
use support::h2frames::{frame, literal, preface};
use support::upstream::RecordingUpstream;
use support::{free_port, EdgeProcess};

const HOST: &str = "synapse.example.com";
const PATH: &str = "/_matrix/federation/v1/version";

struct Setup {
    pki: TestPki,
    upstream: RecordingUpstream,
    edge: EdgeProcess,
    public: SocketAddr,
}

fn setup() -> Setup {
    setup_with("")
}

/// The edge in front of a recording upstream, with `extra` YAML appended.
fn setup_with(extra: &str) -> Setup {
    let pki = TestPki::new(&[&[HOST]]);
    let upstream = RecordingUpstream::start();
    let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = format!(
        r#"server_name: example.com
listeners:
  - {{ address: "{public}", tls: true, serves: [client, federation] }}
tls:
  certificates: [{{ cert: certs/{HOST}/fullchain.pem, key: certs/{HOST}/privkey.pem }}]
synapse:
  main: "{}"
process: {{ threads: 2, access_log: off }}
{extra}"#,
        upstream.addr
    );
    let edge = EdgeProcess::start(&config, Some(&pki), &[public]);
    Setup { pki, upstream, edge, public }
}

/// A GET head for `PATH`: `:method GET`, `:scheme https`, `:authority`, `:path`.
fn get_head() -> Vec<u8> {
    let mut block = vec![0x82, 0x87];
    block.extend(literal(1, "", HOST));
    block.extend(literal(4, "", PATH));
    block
}

/// An attack connection: the bytes go out from one thread while another
/// reads and drops whatever the edge answers, and reports how it ended.
fn attack(s: &Setup, bytes: Vec<u8>, hold: Duration, read_back: bool) -> &'static str {
    let stream = client::tls_connect(s.public, HOST, &s.pki.root_pem, &["h2"]);
    // Reads wait briefly: the writer needs the same lock, and a reader
    // holding it 200 ms at a time let a loaded machine send too little of
    // the flood within the hold for the edge to see it.
    stream.get_ref().set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let stream = std::sync::Arc::new(std::sync::Mutex::new(stream));
    let writer = std::sync::Arc::clone(&stream);
    let sent = std::thread::spawn(move || {
        for chunk in bytes.chunks(16 << 10) {
            if writer.lock().unwrap().write_all(chunk).is_err() {
                return false;
            }
        }
        true
    });
    let deadline = Instant::now() + hold;
    let mut ended = "held open";
    let mut buffer = [0u8; 16 << 10];
    while Instant::now() < deadline {
        if !read_back {
            // This attacker never reads: what the edge sends piles up on its side.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        match stream.lock().unwrap().read(&mut buffer) {
            Ok(0) => {
                ended = "closed by the edge";
                break;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                ended = "reset by the edge";
                break;
            }
        }
    }
    let _ = sent.join();
    ended
}

/// Five honest requests on fresh HTTP/2 connections: all answered, each promptly.
fn honest_requests_served(s: &Setup, during: &str) {
    for _ in 0..5 {
        let started = Instant::now();
        let response = h2_tls(s.public, HOST, &s.pki.root_pem, "GET", PATH, &[], None)
            .unwrap_or_else(|e| panic!("an honest request failed during {during}: {e}"));
        assert_eq!(response.status, 200, "during {during}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "an honest request took {:?} during {during}",
            started.elapsed()
        );
    }
}

/// Runs an attack in the background while honest requests go on.
fn under_attack(s: &Setup, name: &str, bytes: Vec<u8>, hold: Duration, read_back: bool) -> &'static str {
    std::thread::scope(|scope| {
        let attacker = scope.spawn(|| attack(s, bytes, hold, read_back));
        std::thread::sleep(Duration::from_millis(200));
        honest_requests_served(s, name);
        attacker.join().unwrap()
    })
}

#[test]
fn h2_abuse_costs_bounded_memory_and_leaves_honest_clients_served() {
    let s = setup();
    honest_requests_served(&s, "warm-up");
    let before = support::rss_kib(s.edge.pid());
    let mut report = Vec::new();

    // Rapid reset: streams opened and cancelled at once, 5,000 of them.
    let mut bytes = preface();
    for n in 0..5000u32 {
        let id = 2 * n + 1;
        bytes.extend(frame(1, 0x5, id, &get_head()));
        bytes.extend(frame(3, 0, id, &8u32.to_be_bytes()));
    }
    s.upstream.clear();
    let ended = under_attack(&s, "rapid reset", bytes, Duration::from_secs(3), true);
    let reached = s.upstream.records().len();
    report.push(format!("rapid reset: {ended}, {reached} of 5000 requests reached the upstream"));
    assert!(reached < 5000, "every cancelled request still reached Synapse");

    // CONTINUATION flood: a header block that never ends, 100,000 frames.
    let mut bytes = preface();
    bytes.extend(frame(1, 0x1, 1, &get_head()));
    let piece = literal(0, "x-flood", "aaaaaaaaaaaaaaaa");
    for _ in 0..100_000 {
        bytes.extend(frame(9, 0, 1, &piece));
    }
    let ended = under_attack(&s, "CONTINUATION flood", bytes, Duration::from_secs(3), true);
    report.push(format!("CONTINUATION flood: {ended}"));
    assert_ne!(ended, "held open", "a header block that never ends was kept");

    // HPACK bomb: one 4,000-byte field into the dynamic table, then 20,000 references to it.
    let mut block = get_head();
    block.push(0x40);
    block.push(6);
    block.extend_from_slice(b"x-bomb");
    block.extend_from_slice(&[0x7f, 0x81, 0x1e]); // length 127 + 0x1e + 0x80 = 4000: HPACK integer
    block.extend(std::iter::repeat_n(b'b', 4000));
    block.extend(std::iter::repeat_n(0xbe, 20_000)); // index 62, the newest dynamic entry
    let mut bytes = preface();
    let mut chunks = block.chunks(16 << 10).peekable();
    let mut first = true;
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let flags = if last { 0x4 | 0x1 } else { 0x1 };
        bytes.extend(frame(if first { 1 } else { 9 }, if first { flags } else { flags & 0x4 }, 1, chunk));
        first = false;
    }
    s.upstream.clear();
    let ended = under_attack(&s, "HPACK bomb", bytes, Duration::from_secs(3), true);
    report.push(format!("HPACK bomb (80 MB decoded): {ended}"));
    let bombs = s.upstream.records().iter().filter(|r| !r.header_values("x-bomb").is_empty()).count();
    assert_eq!(bombs, 0, "the bomb's request reached Synapse");

    // SETTINGS and PING floods, 100,000 each.
    let mut bytes = preface();
    for _ in 0..100_000 {
        bytes.extend(frame(4, 0, 0, &[]));
    }
    let ended = under_attack(&s, "SETTINGS flood", bytes, Duration::from_secs(3), true);
    report.push(format!("SETTINGS flood: {ended}"));
    let mut bytes = preface();
    for n in 0..100_000u64 {
        bytes.extend(frame(6, 0, 0, &n.to_be_bytes()));
    }
    let ended = under_attack(&s, "PING flood", bytes, Duration::from_secs(3), true);
    report.push(format!("PING flood: {ended}"));

    // A reader with a zero window that never reads: 100 requests whose answers cannot be sent.
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(4, 0, 0, &[0, 4, 0, 0, 0, 0])); // SETTINGS_INITIAL_WINDOW_SIZE = 0
    for n in 0..100u32 {
        bytes.extend(frame(1, 0x5, 2 * n + 1, &get_head()));
    }
    let ended = under_attack(&s, "zero-window reader", bytes, Duration::from_secs(3), false);
    report.push(format!("zero-window reader: {ended}"));

    // More streams than allowed, all left open (no END_STREAM).
    let mut bytes = preface();
    for n in 0..2000u32 {
        bytes.extend(frame(1, 0x4, 2 * n + 1, &get_head()));
    }
    s.upstream.clear();
    let ended = under_attack(&s, "stream-count abuse", bytes, Duration::from_secs(3), true);
    let reached = s.upstream.heads().len();
    report.push(format!("2,000 open streams: {ended}, {reached} reached the upstream"));
    assert!(reached < 2000, "every stream of one connection reached Synapse");

    let after = support::rss_kib(s.edge.pid());
    report.push(format!("edge RSS {before} KiB before the attacks, {after} KiB after"));
    eprintln!("{}", report.join("\n"));
    assert!(after.saturating_sub(before) < 64 << 10, "RSS grew {} KiB: {}", after - before, report.join("; "));
    honest_requests_served(&s, "the aftermath");
}

/// Reads one frame: (type, flags, stream, payload); `None` at the end of the stream.
fn read_frame(stream: &mut impl Read) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).ok()?;
    let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload).ok()?;
    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Some((head[3], head[4], id, payload))
}

/// An HTTP/2 connection with no stream open for `keepalive_timeout` gets a
/// GOAWAY naming the last stream served and is closed, within the limit
/// plus a few seconds; a long-poll outlasting the limit on another HTTP/2
/// connection is not idle and is answered. HTTP/1.1 keeps the same limit.
#[test]
fn idle_connections_are_closed_after_keepalive_timeout() {
    let s = setup_with("limits: { keepalive_timeout: 5s }\n");
    let (public, root) = (s.public, s.pki.root_pem.clone());
    let long_poll = std::thread::spawn(move || {
        let started = Instant::now();
        let target = "/_matrix/client/v3/sync?timeout=10000&hold_ms=10000";
        (client::h2_tls(public, HOST, &root, "GET", target, &[], None), started.elapsed())
    });

    let mut tls = client::tls_connect(s.public, HOST, &s.pki.root_pem, &["h2"]);
    tls.get_ref().set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    tls.write_all(&[preface(), frame(1, 0x5, 1, &get_head())].concat()).unwrap();
    let (mut answered, mut goaways) = (None, Vec::new());
    while let Some((kind, flags, stream, payload)) = read_frame(&mut tls) {
        match kind {
            // SETTINGS and PING answered as any client does.
            4 if flags & 1 == 0 => tls.write_all(&frame(4, 1, 0, &[])).unwrap(),
            6 if flags & 1 == 0 => tls.write_all(&frame(6, 1, 0, &payload)).unwrap(),
            0 | 1 if stream == 1 && flags & 1 == 1 => answered = Some(Instant::now()),
            7 => {
                let last = u32::from_be_bytes(payload[0..4].try_into().unwrap()) & 0x7fff_ffff;
                let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                goaways.push((last, code, Instant::now()));
            }
            _ => {}
        }
    }
    let closed = Instant::now();
    let answered = answered.expect("the request on the idle connection was not answered");
    let idle = closed - answered;
    assert!(idle >= Duration::from_millis(4500), "closed after {idle:?}, before the idle limit");
    assert!(idle <= Duration::from_secs(8), "closed after {idle:?}, not within the limit plus a few seconds");
    let (last, code, _) = *goaways.last().expect("closed without a GOAWAY");
    assert_eq!((last, code), (1, 0), "the final GOAWAY names stream 1 as the last served, NO_ERROR");
    assert!(goaways.iter().all(|(_, _, at)| *at - answered >= Duration::from_millis(4500)), "early GOAWAY");

    let (answer, took) = long_poll.join().unwrap();
    assert_eq!(answer.unwrap().status, 200, "the long-poll outlasting the idle limit was cut");
    assert!(took >= Duration::from_secs(10), "answered after {took:?}: not held upstream");

    // HTTP/1.1 between requests: the same limit.
    let mut h1 = client::tls_connect(s.public, HOST, &s.pki.root_pem, &["http/1.1"]);
    h1.get_ref().set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reader = std::io::BufReader::new(&mut h1);
    reader.get_mut().write_all(&client::get(PATH, HOST)).unwrap();
    let response = client::read_response(&mut reader, false).unwrap();
    assert_eq!(response.status, 200);
    let answered = Instant::now();
    let mut byte = [0u8; 1];
    match reader.read(&mut byte) {
        Ok(0) => {}
        Err(e) if !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
        other => panic!("the idle HTTP/1.1 connection was not closed: {other:?}"),
    }
    let idle = answered.elapsed();
    assert!(idle >= Duration::from_millis(4500) && idle <= Duration::from_secs(8), "HTTP/1.1 closed after {idle:?}");
}
