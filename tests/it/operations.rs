//! Running it in production: reloads (SIGHUP) and certificate renewals on
//! disk under steady load, a binary upgrade with socket handoff, a broken
//! config refused while the old one keeps serving, and metrics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use std::io::{BufReader, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::certs::TestPki;
use support::client::{self, read_response, Response};
use support::upstream::RecordingUpstream;
use support::{free_port, EdgeProcess};

const SNI: &str = "synapse.example.com";

fn config(tls: SocketAddr, plain: SocketAddr, metrics: SocketAddr, main: SocketAddr, m_server: &str) -> String {
    format!(
        r#"server_name: example.com
listeners:
  - {{ address: "{tls}", tls: true, serves: [well_known, client, federation] }}
  - {{ address: "{plain}", serves: [well_known, client] }}
tls:
  certificates: [{{ cert: certs/{SNI}/fullchain.pem, key: certs/{SNI}/privkey.pem }}]
  watch_interval: 300ms
well_known:
  server: "{m_server}"
synapse:
  main: "{main}"
metrics: {{ address: "{metrics}" }}
process: {{ threads: 2, shutdown_drain: 5s }}
"#
    )
}

/// A keep-alive HTTP/1.1 client that, like browsers, resends an idempotent
/// request once on a fresh connection when a reused one turns out closed
/// before any response byte arrived.
struct KeepAlive {
    addr: SocketAddr,
    root: Option<String>,
    stream: Option<Box<dyn ReadWrite>>,
    pub stale_retries: usize,
}

trait ReadWrite: std::io::Read + std::io::Write + Send {}
impl<T: std::io::Read + std::io::Write + Send> ReadWrite for T {}

impl KeepAlive {
    fn connect(&self) -> Box<dyn ReadWrite> {
        match &self.root {
            Some(root) => Box::new(client::tls_connect(self.addr, SNI, root, &["http/1.1"])),
            None => {
                let tcp = std::net::TcpStream::connect(self.addr).unwrap();
                tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                Box::new(tcp)
            }
        }
    }

    fn get(&mut self, target: &str) -> Option<Response> {
        let request = format!("GET {target} HTTP/1.1\r\nHost: {SNI}\r\n\r\n");
        for attempt in 0..2 {
            let reused = self.stream.is_some();
            let mut stream = self.stream.take().unwrap_or_else(|| self.connect());
            if stream.write_all(request.as_bytes()).is_ok() {
                let mut reader = BufReader::new(&mut stream);
                if let Some(response) = read_response(&mut reader, false) {
                    let close = response.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
                    if !close {
                        self.stream = Some(stream);
                    }
                    return Some(response);
                }
            }
            if !reused || attempt == 1 {
                return None;
            }
            self.stale_retries += 1;
        }
        None
    }
}

struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(tls: SocketAddr, plain: SocketAddr, root: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        // h1 over TLS and plain, short requests; h1 long-polls; h2 requests.
        for (addr, root, target) in [
            (tls, Some(root.to_string()), "/_matrix/client/versions"),
            (plain, None, "/_matrix/client/v3/rooms/%21r%3Ab/state"),
            (tls, Some(root.to_string()), "/_matrix/client/v3/sync/slow-stream"),
        ] {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let target = target.to_string();
            threads.push(std::thread::spawn(move || {
                let mut client = KeepAlive { addr, root, stream: None, stale_retries: 0 };
                while !stop.load(Ordering::Relaxed) {
                    match client.get(&target) {
                        Some(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            failed.lock().unwrap().push(format!("{target}: {:?}", other.map(|r| r.status)));
                            0
                        }
                    };
                }
            }));
        }
        let root = root.to_string();
        let (stop2, ok2, failed2) = (stop.clone(), ok.clone(), failed.clone());
        threads.push(std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match client::h2_tls(tls, SNI, &root, "GET", "/_matrix/client/v3/joined_rooms", &[], None) {
                    Ok(r) if r.status == 200 => ok2.fetch_add(1, Ordering::Relaxed),
                    other => {
                        failed2.lock().unwrap().push(format!("h2: {:?}", other.map(|r| r.status)));
                        0
                    }
                };
            }
        }));
        Load { stop, ok, failed, threads }
    }

    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().unwrap();
        }
        (self.ok.load(Ordering::Relaxed), self.failed.lock().unwrap().clone())
    }
}

fn served_certificate(addr: SocketAddr, root: &str) -> Vec<u8> {
    let stream = client::tls_connect(addr, SNI, root, &["http/1.1"]);
    stream.ssl().peer_certificate().unwrap().to_der().unwrap()
}

fn m_server(addr: SocketAddr) -> String {
    let (response, _) = client::h1_plain(addr, &client::get("/.well-known/matrix/server", SNI));
    response.json()["m.server"].as_str().unwrap_or_default().to_string()
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn reloads_renewals_and_an_upgrade_under_load_lose_nothing() {
    let pki = TestPki::new(&[&[SNI]]);
    let (a, b) = (RecordingUpstream::start_named("a", 0), RecordingUpstream::start_named("b", 0));
    let tls: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let plain: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut edge =
        EdgeProcess::start(&config(tls, plain, metrics, a.addr, "v0.example.com:443"), Some(&pki), &[tls, plain]);
    let load = Load::start(tls, plain, &pki.root_pem);
    std::thread::sleep(Duration::from_millis(300));

    // Ten reloads, each changing the well-known document and where requests go.
    for round in 1..=10 {
        let main = if round % 2 == 1 { b.addr } else { a.addr };
        let value = format!("v{round}.example.com:443");
        std::fs::write(&edge.config, config(tls, plain, metrics, main, &value)).unwrap();
        EdgeProcess::signal(edge.pid(), "HUP");
        wait_until("the reloaded document", || m_server(plain) == value);
        let (response, _) = client::h1_plain(plain, &client::get("/_matrix/client/versions", SNI));
        assert_eq!(response.json()["upstream"], if round % 2 == 1 { "b" } else { "a" }, "round {round}");
    }

    // A renewal on disk is served without a signal.
    let before = served_certificate(tls, &pki.root_pem);
    let renewed = pki.issue(&[SNI]);
    let dir = edge.path().join("certs").join(SNI);
    std::fs::write(dir.join("privkey.pem.new"), &renewed.key_pem).unwrap();
    std::fs::write(dir.join("fullchain.pem.new"), &renewed.fullchain_pem).unwrap();
    std::fs::rename(dir.join("privkey.pem.new"), dir.join("privkey.pem")).unwrap();
    std::fs::rename(dir.join("fullchain.pem.new"), dir.join("fullchain.pem")).unwrap();
    wait_until("the renewed certificate", || served_certificate(tls, &pki.root_pem) != before);

    // A binary upgrade: the new process takes the sockets, the old drains.
    let old_pid = edge.pid();
    edge.upgrade();
    std::thread::sleep(Duration::from_secs(2));
    let (response, _) = client::h1_plain(plain, &client::get("/_matrix/client/versions", SNI));
    assert_eq!(response.status, 200);
    std::thread::sleep(Duration::from_secs(1));

    let (ok, failed) = load.finish();
    assert!(ok > 200, "too little load to judge: {ok}");
    assert!(failed.is_empty(), "{} of {} requests failed: {failed:?}", failed.len(), ok + failed.len());
    assert_ne!(edge.pid(), old_pid);
    assert_eq!(m_server(plain), "v10.example.com:443");
    let old_log = std::fs::read_to_string(edge.path().join("edge.log")).unwrap();
    assert!(old_log.contains("listener sockets sent"), "the old process did not hand over: {old_log}");
    assert!(edge.log_text().contains("listening on 2 addresses"), "{}", edge.log_text());
    wait_until("the old process to exit", || !std::path::Path::new(&format!("/proc/{old_pid}")).exists());
}

#[test]
fn a_broken_config_is_refused_and_the_old_one_keeps_serving() {
    let pki = TestPki::new(&[&[SNI]]);
    let upstream = RecordingUpstream::start();
    let tls: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let plain: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let edge = EdgeProcess::start(
        &config(tls, plain, metrics, upstream.addr, "good.example.com:443"),
        Some(&pki),
        &[tls, plain],
    );
    let good = std::fs::read_to_string(&edge.config).unwrap();
    std::fs::write(&edge.config, good.replace("good.example.com:443", "https://bad example")).unwrap();
    EdgeProcess::signal(edge.pid(), "HUP");
    wait_until("the refusal in the log", || edge.log_text().contains("reload (SIGHUP) refused"));
    let log = edge.log_text();
    assert!(log.contains("well_known.server: invalid server address \"https://bad example\""), "{log}");
    assert_eq!(m_server(plain), "good.example.com:443");
    let (response, _) = client::h1_tls(tls, SNI, &pki.root_pem, &client::get("/_matrix/client/versions", SNI));
    assert_eq!(response.status, 200);
    let scrape = scrape(metrics);
    assert!(scrape.contains("matrix_edge_config_reloads_total{result=\"error\"} 1"), "{scrape}");
}

fn scrape(metrics: SocketAddr) -> String {
    let (response, _) = client::h1_plain(metrics, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(response.status, 200);
    String::from_utf8(response.body).unwrap()
}

fn counter(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn metrics_move_as_requests_are_made() {
    let pki = TestPki::new(&[&[SNI]]);
    let upstream = RecordingUpstream::start();
    let tls: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let plain: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _edge = EdgeProcess::start(
        &config(tls, plain, metrics, upstream.addr, "a.example.com:443"),
        Some(&pki),
        &[tls, plain, metrics],
    );
    let before = scrape(metrics);
    let ok = r#"matrix_edge_requests_total{group="main",method="read",status="200",worker="main"}"#;
    let forbidden = r#"matrix_edge_requests_total{group="edge",method="read",status="403",worker="edge"}"#;
    let handshakes = r#"matrix_edge_tls_handshakes_total{certificate="synapse.example.com"}"#;
    for _ in 0..3 {
        client::h1_tls(tls, SNI, &pki.root_pem, &client::get("/_matrix/client/versions", SNI));
    }
    client::h1_tls(tls, SNI, &pki.root_pem, &client::get("/_synapse/admin/v1/users", SNI));
    // A client that distrusts the certificate abandons its handshake.
    let untrusting = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).unwrap().build();
    assert!(untrusting.connect(SNI, std::net::TcpStream::connect(tls).unwrap()).is_err());
    let started = r#"matrix_edge_tls_handshakes_started_total{certificate="synapse.example.com"}"#;
    let after = scrape(metrics);
    assert_eq!(counter(&after, started) - counter(&before, started), 5.0, "{after}");
    assert_eq!(counter(&after, ok) - counter(&before, ok), 3.0, "{after}");
    assert_eq!(counter(&after, forbidden) - counter(&before, forbidden), 1.0, "{after}");
    assert_eq!(counter(&after, handshakes) - counter(&before, handshakes), 4.0, "{after}");
    assert!(after.contains("matrix_edge_request_duration_seconds_bucket{group=\"main\""), "{after}");
    assert!(after.contains("matrix_edge_certificate_expiry_timestamp_seconds{certificate=\"synapse.example.com\"}"));
    assert!(after.contains("matrix_edge_config_loaded_timestamp_seconds"));
    // Never on a public listener.
    let (public, _) = client::h1_tls(tls, SNI, &pki.root_pem, &client::get("/metrics", SNI));
    assert_eq!(public.status, 404);
}

/// The login limit's counters outlive a SIGHUP and a certificate renewal
/// (both rebuild the snapshot); only a change of the limit's own settings
/// starts them afresh.
#[test]
fn rate_limit_counters_survive_reloads_and_renewals() {
    let pki = TestPki::new(&[&[SNI]]);
    let upstream = RecordingUpstream::start();
    let (tls, plain, metrics) = (
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
    );
    let limited = |requests: u32| {
        format!(
            "{}rate_limits: {{ login: {{ requests: {requests}, per: 60s }} }}\n",
            config(tls, plain, metrics, upstream.addr, "synapse.example.com:443")
        )
    };
    let edge = EdgeProcess::start(&limited(3), Some(&pki), &[tls, plain, metrics]);
    let login = || {
        let body = r#"{"type":"m.login.password"}"#;
        let raw = format!(
            "POST /_matrix/client/v3/login HTTP/1.1\r\nHost: {SNI}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        client::h1_plain(plain, raw.as_bytes()).0.status
    };
    let reloads_seen = |count: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while edge.log_text().matches("configuration reloaded").count() < count {
            assert!(Instant::now() < deadline, "no reload: {}", edge.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!([login(), login(), login()], [200, 200, 200]);
    assert_eq!(login(), 429);
    EdgeProcess::signal(edge.pid(), "HUP");
    reloads_seen(1);
    assert_eq!(login(), 429, "a SIGHUP gave the client a fresh budget");
    // A renewal on disk (same certificate rewritten) reloads too.
    let cert = edge.path().join(format!("certs/{SNI}/fullchain.pem"));
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&cert, std::fs::read(&cert).unwrap()).unwrap();
    reloads_seen(2);
    assert_eq!(login(), 429, "a certificate renewal gave the client a fresh budget");
    // New settings for the limit: new counters.
    std::fs::write(&edge.config, limited(5)).unwrap();
    EdgeProcess::signal(edge.pid(), "HUP");
    reloads_seen(3);
    assert_eq!(login(), 200);
    assert_eq!(upstream.records().len(), 4);
}
