//! The federation gate against the real binary: origins sign requests with
//! ed25519 keys that an HTTPS key server (a stand-in for the origin's
//! Synapse, answering `/_matrix/key/v2/server` self-signed, as the spec
//! says) publishes; the edge in `enforce` mode must forward good ones
//! unchanged and refuse the rest before the recording upstream sees them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use matrix_edge::federation::signing::x_matrix;
use openssl::pkey::{PKey, Private};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::certs::TestPki;
use support::key_server::{weak_forgery, KeyServer};
use support::upstream::RecordingUpstream;
use support::{free_port, EdgeProcess};

const SERVER_NAME: &str = "edge.test";

/// A listener that accepts and never answers: a key server that hangs.
fn silent_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    address
}

fn config(
    listen: SocketAddr,
    main: SocketAddr,
    keys: SocketAddr,
    dead: SocketAddr,
    metrics: SocketAddr,
    mode: &str,
) -> String {
    format!(
        r#"server_name: {SERVER_NAME}
listeners:
  - {{ address: "{listen}", tls: false, serves: [federation] }}
synapse:
  main: "{main}"
federation:
  verify:
    mode: {mode}
    ca_file: certs/ca.pem
    connect_to:
      - "origin.test:8448:127.0.0.1:{keys_port}"
      - "other.test:8448:127.0.0.1:{keys_port}"
      - "x.denied.test:8448:127.0.0.1:{keys_port}"
      - "dead.test:8448:127.0.0.1:{dead_port}"
      - "weak.test:8448:127.0.0.1:{keys_port}"
  deny: ["*.denied.test"]
metrics: {{ address: "{metrics}" }}
process: {{ threads: 2 }}
"#,
        keys_port = keys.port(),
        dead_port = dead.port(),
    )
}

struct Sent {
    status: u16,
    body: Value,
    took: Duration,
}

/// One HTTP/1.1 request on a fresh connection.
fn send(edge: SocketAddr, method: &str, target: &str, authorization: &[String], body: &[u8]) -> Sent {
    let started = Instant::now();
    let mut stream = TcpStream::connect(edge).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {SERVER_NAME}\r\nConnection: close\r\n");
    for value in authorization {
        head.push_str(&format!("Authorization: {value}\r\n"));
    }
    if method == "PUT" || method == "POST" {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    // The edge may refuse before reading all of a large body.
    let _ = stream.write_all(body);
    let mut reader = BufReader::new(stream);
    let response = support::client::read_response(&mut reader, false).expect("an HTTP response");
    let body = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    Sent { status: response.status, body, took: started.elapsed() }
}

fn signed(origin: &str, key_id: &str, key: &PKey<Private>, method: &str, uri: &str, content: Option<&Value>) -> String {
    x_matrix(origin, SERVER_NAME, method, uri, content, key_id, key).unwrap()
}

/// A page of the private listener, head and body.
fn private_page(metrics: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(metrics).unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

fn metric(metrics: SocketAddr, line_start: &str) -> u64 {
    support::client::metric(metrics, line_start).map_or(0, |value| value as u64)
}

fn refused(metrics: SocketAddr, reason: &str) -> u64 {
    metric(metrics, &format!("matrix_edge_federation_requests_total{{outcome=\"refused\",reason=\"{reason}\"}}"))
}

/// A transaction of `pdus` events of about 1.5 KB each.
fn transaction(origin: &str, pdus: usize) -> Value {
    let pdus: Vec<Value> = (0..pdus)
        .map(|i| {
            json!({
                "type": "m.room.message", "room_id": "!room:origin.test", "sender": format!("@u{i}:{origin}"),
                "origin_server_ts": 1_700_000_000_000u64 + i as u64, "depth": i,
                "content": { "msgtype": "m.text", "body": format!("message {i} é \u{1} \"quoted\" {}", "x".repeat(1400)) },
                "hashes": { "sha256": "abc" }, "prev_events": [], "auth_events": [],
            })
        })
        .collect();
    json!({ "origin": origin, "origin_server_ts": 1_700_000_000_000u64, "pdus": pdus, "edus": [] })
}

#[test]
fn enforce_forwards_good_signatures_unchanged_and_refuses_the_rest_before_synapse() {
    let pki =
        TestPki::new(&[&["edge.test"], &["origin.test", "other.test", "x.denied.test", "dead.test", "weak.test"]]);
    let scratch = tempfile::tempdir().unwrap();
    let keys = KeyServer::start(scratch.path(), &pki.leaves[1]);
    let origin = "origin.test:8448";
    let key = keys.publish(origin, "ed25519:a1");
    keys.publish_weak("weak.test:8448");
    let denied_key = keys.publish("x.denied.test:8448", "ed25519:d");
    let upstream = RecordingUpstream::start();
    let (listen, metrics) =
        (SocketAddr::from(([127, 0, 0, 1], free_port())), SocketAddr::from(([127, 0, 0, 1], free_port())));
    let dead = silent_server();
    let edge = EdgeProcess::start(
        &config(listen, upstream.addr, keys.address, dead, metrics, "enforce"),
        Some(&pki),
        &[listen, metrics],
    );

    // Good: a GET whose target carries encoded sigils, exactly as signed.
    let target = "/_matrix/federation/v1/query/profile?user_id=%40alice%3Aedge.test&field=displayname";
    let sent = send(listen, "GET", target, &[signed(origin, "ed25519:a1", &key, "GET", target, None)], b"");
    assert_eq!(sent.status, 200, "{}", sent.body);
    let records = upstream.wait_for(1);
    assert_eq!(records[0].target(), target);
    assert_eq!(keys.fetches(), 1);

    // Good: a small and a large transaction (the large one is held until
    // judged), bodies byte for byte.
    for (txn, pdus) in [("t1", 3), ("t2", 80)] {
        let target = format!("/_matrix/federation/v1/send/{txn}");
        let content = transaction(origin, pdus);
        // Not canonical on the wire: order and spacing as a sender might write them.
        let body = serde_json::to_vec_pretty(&content).unwrap();
        let authorization = signed(origin, "ed25519:a1", &key, "PUT", &target, Some(&content));
        let sent = send(listen, "PUT", &target, &[authorization], &body);
        assert_eq!(sent.status, 200, "{txn}: {}", sent.body);
        let record = upstream.records().into_iter().find(|r| r.target() == target).expect("forwarded");
        assert_eq!(record.body_len, body.len() as u64, "{txn}");
        assert!(record.body_complete);
        assert_eq!(record.body_start, body[..body.len().min(65536)], "{txn}");
    }
    assert!(transaction(origin, 80).to_string().len() > 100_000);

    // Thirty more from the known origin: no new key fetch.
    for i in 0..30 {
        let target = format!("/_matrix/federation/v1/state_ids/!r:origin.test?event_id=%24e{i}");
        let sent = send(listen, "GET", &target, &[signed(origin, "ed25519:a1", &key, "GET", &target, None)], b"");
        assert_eq!(sent.status, 200);
    }
    assert_eq!(keys.fetches(), 1, "30 requests from a known origin fetched its keys again");
    upstream.clear();

    // Refused, each with nothing forwarded.
    let forger = PKey::generate_ed25519().unwrap();
    let send_target = "/_matrix/federation/v1/send/t3";
    let content = transaction(origin, 2);
    let body = serde_json::to_vec(&content).unwrap();
    let good =
        |method: &str, uri: &str, content: Option<&Value>| signed(origin, "ed25519:a1", &key, method, uri, content);
    let big_content = transaction(origin, 80);
    let big_body = serde_json::to_vec(&big_content).unwrap();
    let mut tampered_big = big_content.clone();
    tampered_big["pdus"][79]["content"]["body"] = json!("changed");
    // (what, target, Authorization headers, body, refusal reason)
    type Case<'a> = (&'a str, String, Vec<String>, Vec<u8>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "forged",
            send_target.into(),
            vec![signed(origin, "ed25519:a1", &forger, "PUT", send_target, Some(&content))],
            body.clone(),
            "bad_signature",
        ),
        (
            "tampered",
            send_target.into(),
            vec![good("PUT", send_target, Some(&json!({"pdus": []})))],
            body.clone(),
            "bad_signature",
        ),
        (
            "tampered, large",
            send_target.into(),
            vec![good("PUT", send_target, Some(&tampered_big))],
            big_body.clone(),
            "bad_signature",
        ),
        (
            "replayed to another target",
            "/_matrix/federation/v1/send/t4".into(),
            vec![good("PUT", send_target, Some(&content))],
            body.clone(),
            "bad_signature",
        ),
        (
            "another method",
            send_target.into(),
            vec![good("POST", send_target, Some(&content))],
            body.clone(),
            "bad_signature",
        ),
        (
            "misdirected",
            "/_matrix/federation/v1/version/x".into(),
            vec![x_matrix(
                origin,
                "elsewhere.test",
                "GET",
                "/_matrix/federation/v1/version/x",
                None,
                "ed25519:a1",
                &key,
            )
            .unwrap()],
            vec![],
            "misdirected",
        ),
        ("unsigned", "/_matrix/federation/v1/make_join/!r:o/@u:o".into(), vec![], vec![], "unsigned"),
        (
            "bearer only",
            "/_matrix/federation/v1/media/download/abc".into(),
            vec!["Bearer secret".into()],
            vec![],
            "unsigned",
        ),
        (
            "garbled header",
            "/_matrix/federation/v1/event/$e".into(),
            vec!["X-Matrix origin=\"origin.test:8448,key=k".into()],
            vec![],
            "bad_header",
        ),
        (
            "unknown key",
            "/_matrix/federation/v1/event/$e".into(),
            vec![signed(origin, "ed25519:zz", &key, "GET", "/_matrix/federation/v1/event/$e", None)],
            vec![],
            "unknown_key",
        ),
        ("not JSON", send_target.into(), vec![good("PUT", send_target, None)], b"{not json".to_vec(), "not_json"),
        (
            // OpenSSL verifies this forgery of any request; the weak key is refused.
            "weak key",
            "/_matrix/federation/v1/event/$w".into(),
            vec![format!(
                "X-Matrix origin=\"weak.test:8448\",destination=\"{SERVER_NAME}\",key=\"ed25519:w\",sig=\"{}\"",
                weak_forgery()
            )],
            vec![],
            "weak_key",
        ),
    ];
    for (what, target, authorization, body, reason) in &cases {
        let method = if body.is_empty() { "GET" } else { "PUT" };
        let before = refused(metrics, reason);
        let sent = send(listen, method, target, authorization, body);
        let expected = if *reason == "not_json" { (400, "M_NOT_JSON") } else { (401, "M_UNAUTHORIZED") };
        assert_eq!((sent.status, sent.body["errcode"].as_str().unwrap_or("")), expected, "{what}: {}", sent.body);
        assert!(sent.body["error"].as_str().unwrap_or("").contains("refused by the edge"), "{what}");
        assert_eq!(refused(metrics, reason), before + 1, "{what} not counted as {reason}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let complete: Vec<String> =
        upstream.records().iter().filter(|r| r.body_complete).map(|r| r.request_line.clone()).collect();
    assert!(complete.is_empty(), "refused requests reached the upstream: {complete:?}");
    // Only the large body's head may have gone out (its body was held); the rest sent nothing.
    assert!(upstream.heads().len() <= 1, "{:?}", upstream.heads());
    // The unknown key's origin at most once more, the weak key's origin once.
    assert!(keys.fetches() <= 3, "keys were asked for again: {} fetches", keys.fetches());

    // Endpoints without signatures pass.
    for target in [
        "/_matrix/federation/v1/version",
        "/_matrix/key/v2/server",
        "/_matrix/key/v2/query/origin.test",
        "/_matrix/federation/v1/openid/userinfo?access_token=abc",
    ] {
        assert_eq!(send(listen, "GET", target, &[], b"").status, 200, "{target}");
    }

    // A verified origin on the deny list: 403, nothing forwarded.
    upstream.clear();
    let target = "/_matrix/federation/v1/event/$e";
    let sent = send(
        listen,
        "GET",
        target,
        &[signed("x.denied.test:8448", "ed25519:d", &denied_key, "GET", target, None)],
        b"",
    );
    assert_eq!((sent.status, sent.body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{}", sent.body);
    assert!(upstream.heads().is_empty());

    // A float in the body: valid JSON Synapse reads, which a strict encoder
    // cannot vouch for: passed on unverified and counted.
    let content = json!({ "pdus": [], "edus": [{ "edu_type": "m.x", "content": { "ratio": 0.5 } }] });
    let body = serde_json::to_vec(&content).unwrap();
    let sent = send(
        listen,
        "PUT",
        "/_matrix/federation/v1/send/t5",
        &[good("PUT", "/_matrix/federation/v1/send/t5", None)],
        &body,
    );
    assert_eq!(sent.status, 200);
    assert_eq!(metric(metrics, "matrix_edge_federation_requests_total{outcome=\"unverifiable\",reason=\"float\"}"), 1);

    // A key server that never answers: ten requests at once are each
    // refused within 3 s and all within 10 s; it is not asked again.
    let dead_key = PKey::generate_ed25519().unwrap();
    let started = Instant::now();
    let threads: Vec<_> = (0..10)
        .map(|i| {
            let target = format!("/_matrix/federation/v1/event/$dead{i}");
            let authorization = signed("dead.test:8448", "ed25519:x", &dead_key, "GET", &target, None);
            std::thread::spawn(move || send(listen, "GET", &target, &[authorization], b""))
        })
        .collect();
    for thread in threads {
        let sent = thread.join().unwrap();
        assert_eq!(sent.status, 401, "{}", sent.body);
        assert!(sent.took < Duration::from_secs(3), "one refusal took {:?}", sent.took);
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    let fetches_before = metric(metrics, "matrix_edge_federation_key_fetches_total{result=\"failed\"}");
    let again = send(
        listen,
        "GET",
        "/_matrix/federation/v1/event/$dead",
        &[signed("dead.test:8448", "ed25519:x", &dead_key, "GET", "/_matrix/federation/v1/event/$dead", None)],
        b"",
    );
    assert_eq!(again.status, 401);
    assert!(again.took < Duration::from_millis(500), "the failure was not remembered: {:?}", again.took);
    assert_eq!(metric(metrics, "matrix_edge_federation_key_fetches_total{result=\"failed\"}"), fetches_before);
    assert_eq!(fetches_before, 1, "one fetch for ten requests");

    // Key rotation: the origin publishes a new key; once the unknown-key
    // back-off (10 s after the last fetch) has passed, it is fetched and used.
    let rotated = keys.publish(origin, "ed25519:a2");
    let target = "/_matrix/federation/v1/event/$rotated";
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        let sent = send(listen, "GET", target, &[signed(origin, "ed25519:a2", &rotated, "GET", target, None)], b"");
        if sent.status == 200 || Instant::now() > deadline {
            break sent.status;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(status, 200, "the rotated key was not picked up");
    let verified = metric(metrics, "matrix_edge_federation_requests_total{outcome=\"verified\",reason=\"\"}");
    assert!(verified >= 34, "verified: {verified}");

    let page = private_page(metrics, "/status.json");
    let status: Value = serde_json::from_str(page.split_once("\r\n\r\n").unwrap().1).unwrap();
    let latest = status["federation"]["latest_refusals"].as_array().unwrap().clone();
    assert!(!latest.is_empty() && latest.iter().all(|r| r["enforced"] == true), "{latest:?}");
    // Newest first: the rotated key's requests refused until it was
    // fetched, or (if the first passed) the dead key server's last one.
    let newest = (latest[0]["origin"].clone(), latest[0]["reason"].clone());
    assert!(
        newest == (json!(origin), json!("unknown_key"))
            || newest == (json!("dead.test:8448"), json!("key_unavailable")),
        "{latest:?}"
    );
    assert!(private_page(metrics, "/status").contains("401 at the door"));
    drop(edge);
}

#[test]
fn observe_forwards_everything_and_counts_what_it_would_refuse() {
    let pki = TestPki::new(&[&["edge.test"], &["origin.test", "other.test", "x.denied.test", "dead.test"]]);
    let scratch = tempfile::tempdir().unwrap();
    let keys = KeyServer::start(scratch.path(), &pki.leaves[1]);
    let origin = "other.test:8448";
    let key = keys.publish(origin, "ed25519:o");
    let upstream = RecordingUpstream::start();
    let (listen, metrics) =
        (SocketAddr::from(([127, 0, 0, 1], free_port())), SocketAddr::from(([127, 0, 0, 1], free_port())));
    let edge = EdgeProcess::start(
        &config(listen, upstream.addr, keys.address, silent_server(), metrics, "observe"),
        Some(&pki),
        &[listen, metrics],
    );
    let target = "/_matrix/federation/v1/event/$a";
    // The first request does not wait for the keys: it goes on, and they are fetched beside it.
    let sent = send(listen, "GET", target, &[signed(origin, "ed25519:o", &key, "GET", target, None)], b"");
    assert_eq!(sent.status, 200);
    assert!(sent.took < Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(5);
    while keys.fetches() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    let forger = PKey::generate_ed25519().unwrap();
    assert_eq!(
        send(listen, "GET", target, &[signed(origin, "ed25519:o", &forger, "GET", target, None)], b"").status,
        200
    );
    assert_eq!(send(listen, "GET", target, &[], b"").status, 200);
    assert_eq!(send(listen, "GET", target, &[signed(origin, "ed25519:o", &key, "GET", target, None)], b"").status, 200);
    let elsewhere =
        format!("X-Matrix origin=\"{origin}\",destination=\"elsewhere.test\",key=\"ed25519:o\",sig=\"AAAA\"");
    assert_eq!(send(listen, "GET", target, &[elsewhere], b"").status, 200);
    assert_eq!(upstream.wait_for(5).len(), 5);
    assert_eq!(refused(metrics, "bad_signature"), 1);
    assert_eq!(refused(metrics, "unsigned"), 1);
    assert_eq!(refused(metrics, "misdirected"), 1);
    assert_eq!(
        metric(metrics, "matrix_edge_federation_requests_total{outcome=\"unverifiable\",reason=\"keys_pending\"}"),
        1
    );
    assert_eq!(metric(metrics, "matrix_edge_federation_requests_total{outcome=\"verified\",reason=\"\"}"), 1);
    let log = edge.log_text();
    assert!(log.contains("would be refused (observe)"), "{log}");

    // The status page names who was turned away, newest first.
    let page = private_page(metrics, "/status.json");
    let status: Value = serde_json::from_str(page.split_once("\r\n\r\n").unwrap().1).unwrap();
    let federation = &status["federation"];
    assert_eq!(federation["mode"], "observe", "{federation}");
    assert_eq!(federation["requests"]["refused/bad_signature"], 1, "{federation}");
    assert_eq!(federation["requests"]["verified"], 1, "{federation}");
    assert_eq!(federation["servers_with_keys"], 1, "{federation}");
    let latest = federation["latest_refusals"].as_array().unwrap();
    assert_eq!(latest.len(), 3, "{federation}");
    assert_eq!((&latest[0]["reason"], &latest[0]["origin"]), (&json!("misdirected"), &json!(origin)));
    assert_eq!((&latest[1]["reason"], &latest[1]["origin"]), (&json!("unsigned"), &Value::Null));
    assert_eq!((&latest[2]["reason"], &latest[2]["origin"]), (&json!("bad_signature"), &json!(origin)));
    assert_eq!(latest[2]["enforced"], false);
    let html = private_page(metrics, "/status");
    assert!(html.contains("<td>other.test:8448</td>") && html.contains("forwarded (observe)"), "{html}");
}

/// A stand-in Synapse that works one request at a time, `work` each, and
/// records how many of each origin's requests it holds at once (the origin
/// read from the X-Matrix header the edge forwards unchanged).
struct SerialSynapse {
    address: SocketAddr,
    /// Origin to (held now, most held at once).
    held: Arc<Mutex<std::collections::HashMap<String, (usize, usize)>>>,
}

impl SerialSynapse {
    fn start(work: Duration) -> SerialSynapse {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let held: Arc<Mutex<std::collections::HashMap<String, (usize, usize)>>> = Arc::default();
        let worker = Arc::new(Mutex::new(()));
        let counts = Arc::clone(&held);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (counts, worker) = (Arc::clone(&counts), Arc::clone(&worker));
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream);
                    loop {
                        let (mut origin, mut length) = (String::from("-"), 0usize);
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        loop {
                            let mut header = String::new();
                            if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                                break;
                            }
                            let lower = header.to_ascii_lowercase();
                            if let Some(value) = lower.strip_prefix("content-length:") {
                                length = value.trim().parse().unwrap_or(0);
                            }
                            if let Some(at) = header.find("origin=\"") {
                                origin = header[at + 8..].split('"').next().unwrap_or("-").to_string();
                            }
                        }
                        let mut body = vec![0u8; length];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        {
                            let mut counts = counts.lock().unwrap();
                            let entry = counts.entry(origin.clone()).or_default();
                            entry.0 += 1;
                            entry.1 = entry.1.max(entry.0);
                        }
                        {
                            let _busy = worker.lock().unwrap();
                            std::thread::sleep(work);
                        }
                        counts.lock().unwrap().entry(origin).or_default().0 -= 1;
                        let answer = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
                        if reader.get_mut().write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        SerialSynapse { address, held }
    }

    fn most_held(&self, origin: &str) -> usize {
        self.held.lock().unwrap().get(origin).map_or(0, |(_, most)| *most)
    }
}

/// The flood of issue 36: noisy.test keeps 32 signed `/backfill` requests
/// going at a Synapse that works one request at a time (50 ms each), while
/// quiet.test sends its transactions one after another. Without shares,
/// quiet waited 1.66 s at p99 and Synapse held all 32 of noisy's.
#[test]
fn one_busy_origin_cannot_take_every_other_origins_turn() {
    let pki = TestPki::new(&[&["edge.test"], &["noisy.test", "quiet.test"]]);
    let scratch = tempfile::tempdir().unwrap();
    let keys = KeyServer::start(scratch.path(), &pki.leaves[1]);
    let (noisy, quiet) = ("noisy.test:8448", "quiet.test:8448");
    let noisy_key = keys.publish(noisy, "ed25519:n");
    let quiet_key = keys.publish(quiet, "ed25519:q");
    let synapse = SerialSynapse::start(Duration::from_millis(50));
    let (listen, metrics) =
        (SocketAddr::from(([127, 0, 0, 1], free_port())), SocketAddr::from(([127, 0, 0, 1], free_port())));
    let config = format!(
        r#"server_name: {SERVER_NAME}
listeners:
  - {{ address: "{listen}", tls: false, serves: [federation] }}
synapse:
  main: "{main}"
federation:
  verify:
    mode: enforce
    ca_file: certs/ca.pem
    connect_to:
      - "noisy.test:8448:127.0.0.1:{keys_port}"
      - "quiet.test:8448:127.0.0.1:{keys_port}"
  per_origin: {{ max_in_flight: 8, queue: 16, queue_timeout: 30s }}
metrics: {{ address: "{metrics}" }}
process: {{ threads: 2 }}
"#,
        main = synapse.address,
        keys_port = keys.address.port(),
    );
    let _edge = EdgeProcess::start(&config, Some(&pki), &[listen, metrics]);
    // Both origins' keys fetched before the clock starts.
    for (origin, key_id, key) in [(noisy, "ed25519:n", &noisy_key), (quiet, "ed25519:q", &quiet_key)] {
        let target = "/_matrix/federation/v1/query/profile?user_id=%40a%3Aedge.test";
        assert_eq!(send(listen, "GET", target, &[signed(origin, key_id, key, "GET", target, None)], b"").status, 200);
    }

    let flooding = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let statuses: Arc<Mutex<Vec<(u16, bool)>>> = Arc::default();
    let flood: Vec<_> = (0..32)
        .map(|i| {
            let (flooding, statuses, key) = (Arc::clone(&flooding), Arc::clone(&statuses), noisy_key.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while flooding.load(Ordering::SeqCst) {
                    n += 1;
                    let target = format!("/_matrix/federation/v1/backfill/!r:edge.test?v=%24e{i}x{n}&limit=100");
                    let authorization = signed(noisy, "ed25519:n", &key, "GET", &target, None);
                    let sent = send(listen, "GET", &target, &[authorization], b"");
                    let retry_after = sent.body["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0);
                    statuses.lock().unwrap().push((sent.status, retry_after));
                    if sent.status == 429 {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut waits = Vec::new();
    for n in 0..30 {
        let target = format!("/_matrix/federation/v1/send/q{n}");
        let content = transaction(quiet, 1);
        let body = serde_json::to_vec(&content).unwrap();
        let authorization = signed(quiet, "ed25519:q", &quiet_key, "PUT", &target, Some(&content));
        let sent = send(listen, "PUT", &target, &[authorization], &body);
        assert_eq!(sent.status, 200, "quiet's transaction {n} refused: {}", sent.body);
        waits.push(sent.took);
    }
    flooding.store(false, Ordering::SeqCst);
    for thread in flood {
        thread.join().unwrap();
    }
    waits.sort();
    let p99 = waits[waits.len() * 99 / 100];
    let statuses = statuses.lock().unwrap();
    let (served, limited) = (
        statuses.iter().filter(|(status, _)| *status == 200).count(),
        statuses.iter().filter(|(status, _)| *status == 429).count(),
    );
    eprintln!("quiet p99 {p99:?}, median {:?}; noisy served {served}, 429 {limited}", waits[waits.len() / 2]);
    assert!(p99 < Duration::from_millis(500), "quiet waited {p99:?} at p99 behind noisy's flood");
    assert!(statuses.iter().all(|(status, _)| matches!(status, 200 | 429)), "noisy got a 5xx: {statuses:?}");
    assert!(limited > 0 && served > 0, "noisy's excess was not refused: {served} served, {limited} refused");
    assert!(statuses.iter().filter(|(status, _)| *status == 429).all(|(_, retry)| *retry), "a 429 without retry_after");
    // backfill weighs 4 of noisy's 8: two at Synapse at once, never more.
    assert_eq!(synapse.most_held(noisy), 2, "Synapse held more of noisy's than its share");
    assert_eq!(synapse.most_held(quiet), 1);
    let refused = metric(metrics, "matrix_edge_refused_total{reason=\"origin_queue_full\"}");
    assert_eq!(refused as usize, limited);
    let page = private_page(metrics, "/status.json");
    let status: Value = serde_json::from_str(page.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let busiest = &status["federation"]["per_origin"]["busiest"][0];
    assert_eq!((&busiest["origin"], busiest["refused"].as_u64()), (&json!(noisy), Some(limited as u64)), "{page}");
}

/// Issue 35's shared keys: two enforcing edges of one cluster, one origin
/// sending through both; the origin's key server is asked once. A document
/// in Redis that does not verify is never used: the edge fetches its own.
#[test]
fn edges_of_a_cluster_fetch_an_origins_keys_once_between_them() {
    let pki = TestPki::new(&[&["edge.test"], &["origin.test"]]);
    let scratch = tempfile::tempdir().unwrap();
    let keys = KeyServer::start(scratch.path(), &pki.leaves[1]);
    let origin = "origin.test:8448";
    let key = keys.publish(origin, "ed25519:a1");
    let redis_port = free_port();
    let _redis = support::start_redis(scratch.path(), redis_port);
    let upstream = RecordingUpstream::start();
    let edges: Vec<(EdgeProcess, SocketAddr, SocketAddr)> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            let (listen, metrics) =
                (SocketAddr::from(([127, 0, 0, 1], free_port())), SocketAddr::from(([127, 0, 0, 1], free_port())));
            let mut config = config(listen, upstream.addr, keys.address, silent_server(), metrics, "enforce");
            config.push_str(&format!(
                "cluster: {{ redis: \"redis://127.0.0.1:{redis_port}/0\", name: edge-{name}, prefix: keys-test }}\n"
            ));
            (EdgeProcess::start(&config, Some(&pki), &[listen, metrics]), listen, metrics)
        })
        .collect();
    let target = "/_matrix/federation/v1/query/profile?user_id=%40a%3Aedge.test";
    let authorization = signed(origin, "ed25519:a1", &key, "GET", target, None);
    for (_, listen, _) in &edges[..2] {
        let sent = send(*listen, "GET", target, std::slice::from_ref(&authorization), b"");
        assert_eq!(sent.status, 200, "{}", sent.body);
    }
    assert_eq!(keys.fetches(), 1, "the second edge fetched the keys again");
    let fetches = |metrics: SocketAddr, result: &str| {
        metric(metrics, &format!("matrix_edge_federation_key_fetches_total{{result=\"{result}\"}}"))
    };
    assert_eq!((fetches(edges[0].2, "fetched"), fetches(edges[0].2, "shared")), (1, 0));
    assert_eq!((fetches(edges[1].2, "fetched"), fetches(edges[1].2, "shared")), (0, 1));

    // A forged document in Redis (another key, "signed" by it): the third
    // edge does not take it, fetches the origin's own and stores that.
    let forger = openssl::pkey::PKey::generate_ed25519().unwrap();
    let mut forged = serde_json::json!({
        "server_name": origin,
        "valid_until_ts": 4_000_000_000_000u64,
        "verify_keys": { "ed25519:a1": { "key": matrix_edge::federation::signing::encode_unpadded(&forger.raw_public_key().unwrap()) } },
        "old_verify_keys": {},
    });
    let message = matrix_edge::federation::signing::signed_bytes(&forged).unwrap();
    let forged_signature = matrix_edge::federation::signing::sign(&forger, &message).unwrap();
    forged["signatures"] = serde_json::json!({ origin: { "ed25519:b9": forged_signature } });
    let mut connection =
        redis::Client::open(format!("redis://127.0.0.1:{redis_port}/0")).unwrap().get_connection().unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("keys-test:keys:{origin}"))
        .arg(forged.to_string())
        .query(&mut connection)
        .unwrap();
    let sent = send(edges[2].1, "GET", target, std::slice::from_ref(&authorization), b"");
    assert_eq!(sent.status, 200, "the third edge took the forged keys: {}", sent.body);
    assert_eq!(keys.fetches(), 2);
    assert!(edges[2].0.log_text().contains("do not verify"), "{}", edges[2].0.log_text());
    // A request signed with the forger's key is refused.
    let forged_authorization = signed(origin, "ed25519:a1", &forger, "GET", target, None);
    let sent = send(edges[2].1, "GET", target, &[forged_authorization], b"");
    assert_eq!(sent.status, 401, "{}", sent.body);
}
