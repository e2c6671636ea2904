//! Worker pools through the real binary: sticky placement, a worker killed
//! under steady load (nothing fails, only its keys move), its return, a whole
//! group falling back to main, and media waiting for its restarting worker,
//! then answering 503 rather than falling back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::client::{read_response, Response};
use support::upstream::RecordingUpstream;
use support::{free_port, EdgeProcess};

const USERS: usize = 60;

fn token(user: usize) -> String {
    format!("syt_dXNlcn{user:03}_secret{user}_abc")
}

/// One sync request per user over one keep-alive connection: user -> worker name.
fn placement(edge: SocketAddr) -> BTreeMap<usize, String> {
    let mut stream = TcpStream::connect(edge).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (0..USERS)
        .map(|user| {
            let response = sync(&mut stream, user);
            assert_eq!(response.status, 200, "{response:?}");
            (user, response.json()["upstream"].as_str().unwrap().to_string())
        })
        .collect()
}

fn sync(stream: &mut TcpStream, user: usize) -> Response {
    let request = format!(
        "GET /_matrix/client/v3/sync?since=s1&timeout=0 HTTP/1.1\r\nHost: matrix.example.com\r\nAuthorization: Bearer {}\r\n\r\n",
        token(user)
    );
    stream.write_all(request.as_bytes()).unwrap();
    read_response(&mut BufReader::new(stream), false).expect("a response")
}

fn get(edge: SocketAddr, target: &str) -> Response {
    let mut stream = TcpStream::connect(edge).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(format!("GET {target} HTTP/1.1\r\nHost: matrix.example.com\r\n\r\n").as_bytes()).unwrap();
    read_response(&mut BufReader::new(stream), false).expect("a response")
}

struct Outcome {
    at: Instant,
    status: u16,
}

/// Steady load from two connections until `stop`; every outcome is kept.
fn steady_load(
    edge: SocketAddr,
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..2)
        .map(|offset| {
            let (stop, outcomes) = (stop.clone(), outcomes.clone());
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(edge).unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut user = offset;
                while !stop.load(Ordering::Relaxed) {
                    let status =
                        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sync(&mut stream, user))) {
                            Ok(response) => {
                                // The edge closes a connection after
                                // keepalive_requests answers, and says so.
                                if response.header("Connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
                                    stream = TcpStream::connect(edge).unwrap();
                                    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                                }
                                response.status
                            }
                            Err(_) => {
                                stream = TcpStream::connect(edge).unwrap();
                                0
                            }
                        };
                    outcomes.lock().unwrap().push(Outcome { at: Instant::now(), status });
                    user = (user + 2) % USERS;
                }
            })
        })
        .collect()
}

#[test]
fn killing_a_worker_under_load_moves_only_its_keys_and_loses_nothing() {
    let main = RecordingUpstream::start_named("main", 0);
    let ports = [free_port(), free_port(), free_port()];
    let mut syncs: Vec<Option<RecordingUpstream>> =
        ports.iter().enumerate().map(|(i, p)| Some(RecordingUpstream::start_named(&format!("sync{i}"), *p))).collect();
    let media_port = free_port();
    let media = RecordingUpstream::start_named("media", media_port);
    let edge_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = format!(
        r#"server_name: example.com
listeners: [{{ address: "{edge_addr}", serves: [client, federation] }}]
synapse:
  main: "{}"
  workers:
    synchrotron: ["127.0.0.1:{}", "127.0.0.1:{}", "127.0.0.1:{}"]
    media_repository: ["{}"]
  health_check: {{ interval: 300ms, timeout: 250ms }}
  hold: 3s
  # A revived worker takes its users back over the slow start (10 s by default).
  balancing: {{ slow_start: 2s }}
process: {{ threads: 2 }}
"#,
        main.addr, ports[0], ports[1], ports[2], media.addr
    );
    let edge = EdgeProcess::start(&config, None, &[edge_addr]);

    // Sticky: every user lands on one synchrotron, the same each time, and all three get users.
    let before = placement(edge_addr);
    assert_eq!(placement(edge_addr), before);
    for i in 0..3 {
        assert!(before.values().any(|w| *w == format!("sync{i}")), "sync{i} got no users: {before:?}");
    }

    // Kill sync1 under steady load.
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let load = steady_load(edge_addr, stop.clone(), outcomes.clone());
    std::thread::sleep(Duration::from_millis(500));
    let killed_at = Instant::now();
    syncs[1] = None;
    std::thread::sleep(Duration::from_millis(1500));
    let during = placement(edge_addr);
    stop.store(true, Ordering::Relaxed);
    load.into_iter().for_each(|t| t.join().unwrap());
    let outcomes = outcomes.lock().unwrap();
    let after_kill = outcomes.iter().filter(|o| o.at > killed_at).count();
    let failed: Vec<u16> = outcomes.iter().filter(|o| o.status != 200).map(|o| o.status).collect();
    assert!(after_kill > 50, "too little load to judge: {after_kill}");
    assert!(failed.is_empty(), "{} of {} requests failed: {failed:?}", failed.len(), outcomes.len());
    for (user, worker) in &before {
        if worker == "sync1" {
            assert_ne!(during[user], "sync1", "user {user} still on the dead worker");
            assert!(during[user].starts_with("sync"), "user {user} left the group: {}", during[user]);
        } else {
            assert_eq!(&during[user], worker, "user {user} moved although its worker lived");
        }
    }

    // sync1 comes back: the health check returns its users to it.
    syncs[1] = Some(RecordingUpstream::start_named("sync1", ports[1]));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut back = placement(edge_addr);
    while back != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        back = placement(edge_addr);
    }
    assert_eq!(back, before, "traffic did not return to the revived worker");

    // The whole group dies: main serves sync.
    syncs.iter_mut().for_each(|s| *s = None);
    let fallback = placement(edge_addr);
    assert!(fallback.values().all(|w| w == "main"), "{fallback:?}");

    // Media never falls back to main. Its only worker restarting within
    // synapse.hold: the request waits for it and is answered by it.
    assert_eq!(get(edge_addr, "/_matrix/media/v3/download/example.com/abc").json()["upstream"], "media");
    drop(media);
    let restarted = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        RecordingUpstream::start_named("media", media_port)
    });
    let asked = Instant::now();
    let response = get(edge_addr, "/_matrix/media/v3/download/example.com/abc");
    assert_eq!((response.status, response.json()["upstream"].as_str()), (200, Some("media")), "{response:?}");
    assert!(asked.elapsed() >= Duration::from_millis(1400), "answered before the worker was back");
    let media = restarted.join().unwrap();
    // Gone for longer than the hold: 503 with Retry-After once it ran out.
    drop(media);
    let asked = Instant::now();
    let response = get(edge_addr, "/_matrix/media/v3/download/example.com/abc");
    let waited = asked.elapsed();
    assert!(waited >= Duration::from_millis(2900) && waited < Duration::from_secs(6), "{waited:?}");
    response.assert_matrix_error(503, "M_UNKNOWN");
    let message = response.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("No homeserver process is up"), "not told apart from a shed request: {message}");
    assert!(response.header("retry-after").is_some());
    assert!(main.records().iter().all(|r| !r.target().starts_with("/_matrix/media/")));
    let log = edge.log_with("edge_reason=no_usable_worker", Duration::from_secs(2));
    assert!(log.contains("is down"), "{log}");
    assert!(log.contains("edge_reason=no_usable_worker"), "{log}");
}
