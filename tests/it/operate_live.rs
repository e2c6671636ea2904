//! Operating the edge live, through the real binary: a worker drained and
//! made ready again from the CLI over the control socket while clients
//! sync, and the status page (JSON, and HTML that headless Chromium loads)
//! showing a live and a dead worker, a certificate and a failed reload.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::certs::TestPki;
use support::client::{h1_plain, read_response};
use support::upstream::RecordingUpstream;
use support::{free_port, workers_cli, EdgeProcess};

/// A worker answering `{"worker": name}` after `delay` ms (from the query),
/// counting the requests it took.
struct SlowWorker {
    addr: SocketAddr,
    served: Arc<AtomicUsize>,
}

impl SlowWorker {
    fn start(name: &'static str) -> SlowWorker {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let counter = served.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let counter = counter.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut writer = stream;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        loop {
                            let mut header = String::new();
                            if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim_end().is_empty() {
                                break;
                            }
                        }
                        if !line.starts_with("GET /health ") {
                            counter.fetch_add(1, Ordering::SeqCst);
                        }
                        let delay = line.split("delay=").nth(1).and_then(|d| d.split([' ', '&']).next());
                        if let Some(ms) = delay.and_then(|d| d.parse::<u64>().ok()) {
                            std::thread::sleep(Duration::from_millis(ms));
                        }
                        let body = format!("{{\"worker\":\"{name}\"}}");
                        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                        if writer.write_all(format!("{head}{body}").as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        SlowWorker { addr, served }
    }
}

fn token(user: usize) -> String {
    format!("syt_dXNlcn{user:03}_secret{user}_abc")
}

fn sync(stream: &mut TcpStream, user: usize, delay_ms: u64) -> (u16, String) {
    let request = format!(
        "GET /_matrix/client/v3/sync?since=s1&timeout=0&delay={delay_ms} HTTP/1.1\r\nHost: matrix.example.com\r\nAuthorization: Bearer {}\r\n\r\n",
        token(user)
    );
    stream.write_all(request.as_bytes()).unwrap();
    let response = read_response(&mut BufReader::new(stream), false).expect("a response");
    let worker = response.json()["worker"].as_str().unwrap_or("").to_string();
    (response.status, worker)
}

/// Where each of `users` syncs now.
fn placement(edge: SocketAddr, users: usize) -> BTreeMap<usize, String> {
    let mut stream = TcpStream::connect(edge).unwrap();
    (0..users).map(|user| (user, sync(&mut stream, user, 0).1)).collect()
}

#[test]
fn a_drained_worker_gets_nothing_new_finishes_its_requests_and_comes_back_when_ready() {
    const USERS: usize = 24;
    let main = RecordingUpstream::start_named("main", 0);
    let (first, second) = (SlowWorker::start("first"), SlowWorker::start("second"));
    let edge_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = format!(
        r#"server_name: example.com
listeners: [{{ address: "{edge_addr}", serves: [client] }}]
synapse:
  main: "{}"
  workers:
    synchrotron: ["{}", "{}"]
  balancing: {{ slow_start: 0s }}
process: {{ threads: 2 }}
"#,
        main.addr, first.addr, second.addr
    );
    let edge = EdgeProcess::start(&config, None, &[edge_addr]);
    let before = placement(edge_addr, USERS);
    assert!(before.values().any(|w| w == "first") && before.values().any(|w| w == "second"), "{before:?}");

    // Every user syncs in a loop; each sync takes 400 ms at the worker.
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..USERS)
        .map(|user| {
            let (stop, statuses) = (stop.clone(), statuses.clone());
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(edge_addr).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let (status, worker) = sync(&mut stream, user, 400);
                    statuses.lock().unwrap().push((status, worker));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let second_address = second.addr.to_string();
    let (code, out, err) = workers_cli(&edge, &["drain", &second_address, "--wait", "20s"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("draining") && out.contains("nothing in flight after"), "{out}");
    assert!(out.lines().any(|l| l.contains("requests in flight") && !l.contains(": 0 ")), "never saw it busy: {out}");
    // Drained: nothing new reaches it while the clients go on.
    let served_when_drained = second.served.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(second.served.load(Ordering::SeqCst), served_when_drained, "a drained worker got new requests");
    let (code, listed, _) = workers_cli(&edge, &["list"]);
    assert_eq!(code, 0);
    assert!(listed.lines().any(|l| l.contains(&second_address) && l.contains("draining")), "{listed}");
    let during = placement(edge_addr, USERS);
    assert!(during.values().all(|w| w == "first"), "{during:?}");

    // Ready again: its users come back.
    let (code, out, err) = workers_cli(&edge, &["ready", &second_address]);
    assert_eq!(code, 0, "{out}{err}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(placement(edge_addr, USERS), before, "the ready worker did not get its users back");
    stop.store(true, Ordering::Relaxed);
    clients.into_iter().for_each(|c| c.join().unwrap());
    let statuses = statuses.lock().unwrap();
    assert!(statuses.len() > USERS * 4, "too few syncs: {}", statuses.len());
    assert!(statuses.iter().all(|(status, _)| *status == 200), "a sync failed while draining");

    let (code, _, err) = workers_cli(&edge, &["drain", "127.0.0.1:1"]);
    assert_eq!(code, 1);
    assert!(err.contains("no worker or upstream member at 127.0.0.1:1"), "{err}");
    drop(edge);
    let (code, _, err) = Command::new(support::binary())
        .args(["workers", "--control-socket", "/nonexistent/control.sock", "list"])
        .output()
        .map(|o| (o.status.code().unwrap_or(-1), (), String::from_utf8_lossy(&o.stderr).into_owned()))
        .unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the running edge"), "{err}");
}

#[test]
fn the_status_page_shows_members_certificates_and_a_failed_reload() {
    let pki = TestPki::new(&[&["matrix.example.com"]]);
    let main = RecordingUpstream::start_named("main", 0);
    let live = RecordingUpstream::start_named("live", 0);
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (public, metrics) = (free_port(), free_port());
    let public: SocketAddr = format!("127.0.0.1:{public}").parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{metrics}").parse().unwrap();
    let config = format!(
        r#"server_name: example.com
listeners: [{{ address: "{public}", tls: true, serves: [client] }}]
tls:
  certificates: [{{ cert: certs/matrix.example.com/fullchain.pem, key: certs/matrix.example.com/privkey.pem }}]
synapse:
  main: "{}"
  workers:
    client_reader: ["{}", "{dead}"]
  health_check: {{ interval: 300ms, timeout: 250ms }}
metrics: {{ address: "{metrics}" }}
"#,
        main.addr, live.addr
    );
    let edge = EdgeProcess::start(&config, Some(&pki), &[public, metrics]);
    std::thread::sleep(Duration::from_secs(1));
    // A reload that fails its checks: the page says so, the old config serves.
    std::fs::write(&edge.config, config.replace("client_reader:", "client_raeder:")).unwrap();
    EdgeProcess::signal(edge.pid(), "HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !edge.log_text().contains("refused, still serving") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }

    let (response, _) = h1_plain(metrics, &support::client::get("/status.json", "localhost"));
    assert_eq!(response.status, 200);
    let status = response.json();
    let pool = status["pools"].as_array().unwrap().iter().find(|p| p["name"] == "client_reader").unwrap().clone();
    let state =
        |address: &str| pool["members"].as_array().unwrap().iter().find(|m| m["address"] == address).unwrap().clone();
    assert_eq!(state(&live.addr.to_string())["state"], "up", "{pool}");
    let down = state(&dead.to_string());
    assert_eq!(down["state"], "down", "{pool}");
    assert!(down["last_out"]["why"].as_str().unwrap().contains("failed"), "{down}");
    assert!(down["last_out"]["at"].as_i64().unwrap() > 1_700_000_000, "{down}");
    let certificate = &status["certificates"][0];
    assert_eq!(certificate["names"][0], "matrix.example.com");
    assert_eq!(certificate["source"], "file");
    assert!(certificate["days_left"].as_f64().unwrap() > 1.0, "{certificate}");
    assert!(!certificate["issuer"].as_str().unwrap().is_empty(), "{certificate}");
    let reload = &status["config"]["last_reload"];
    assert_eq!(reload["result"], "error", "{status}");
    assert!(reload["error"].as_str().unwrap().contains("client_raeder"), "{reload}");
    assert!(status["config"]["loaded_at"].as_i64().unwrap() > 1_700_000_000);
    assert_eq!(status["listeners"][0]["address"], public.to_string());
    assert_eq!(status["readiness"], "ready");
    // Nothing secret: no key material, no token.
    let text = serde_json::to_string(&status).unwrap();
    assert!(!text.contains("PRIVATE KEY") && !text.contains("privkey"), "{text}");

    // The HTML page in a real browser; it carries no script at all.
    let (page, _) = h1_plain(metrics, &support::client::get("/status", "localhost"));
    let html = String::from_utf8_lossy(&page.body).to_string();
    assert!(!html.contains("<script") && !html.contains("src=") && html.contains("http-equiv=\"refresh\""), "{html}");
    let (dom, stderr) = support::chromium_dump(&format!("http://{metrics}/status"));
    for expected in [
        live.addr.to_string().as_str(),
        dead.to_string().as_str(),
        "class=\"down\"",
        "class=\"up\"",
        "matrix.example.com",
        "client_raeder",
        "client_reader",
    ] {
        assert!(dom.contains(expected), "{expected} missing from the page: {dom}\n{stderr}");
    }
}
