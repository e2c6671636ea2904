//! Running behind an L4 load balancer: Debian's HAProxy in TCP mode in
//! front, sending PROXY v2 to a TLS and a plain listener, and a real Synapse
//! behind. Clients connect to HAProxy from different loopback addresses
//! (127.0.0.x), so every "real client" is distinct while HAProxy's own
//! connections to the edge all come from 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use openssl::ssl::SslStream;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::certs::TestPki;
use support::client::{connect_from, connector, read_response, Response};
use support::synapse::Synapse;
use support::{free_port, wait_listening, ChildGuard, EdgeProcess};

/// HAProxy in TCP mode: `front_tls` -> `edge_tls`, `front_plain` -> `edge_plain`,
/// both with `send-proxy-v2`.
fn start_haproxy(dir: &Path, routes: &[(SocketAddr, SocketAddr)]) -> ChildGuard {
    assert!(Path::new("/usr/sbin/haproxy").exists(), "haproxy is missing: scripts/install-deps installs it");
    let mut config = String::from(
        "global\n  maxconn 500\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n",
    );
    for (index, (front, back)) in routes.iter().enumerate() {
        config.push_str(&format!(
            "frontend in{index}\n  bind {front}\n  default_backend out{index}\nbackend out{index}\n  server edge {back} send-proxy-v2\n"
        ));
    }
    let file = dir.join("haproxy.cfg");
    std::fs::write(&file, config).unwrap();
    let check = Command::new("/usr/sbin/haproxy").arg("-c").arg("-f").arg(&file).output().unwrap();
    assert!(check.status.success(), "haproxy -c: {}", String::from_utf8_lossy(&check.stderr));
    let child = Command::new("/usr/sbin/haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("haproxy.log")).unwrap())
        .spawn()
        .unwrap();
    let helper = ChildGuard(child);
    for (front, _) in routes {
        wait_listening(*front, "haproxy");
    }
    helper
}

fn exchange<S: Read + Write>(mut stream: S, request: &str) -> Option<Response> {
    stream.write_all(request.as_bytes()).ok()?;
    let mut reader = BufReader::new(stream);
    read_response(&mut reader, false)
}

fn tls_from(source: &str, addr: SocketAddr, root: &str) -> SslStream<TcpStream> {
    let tcp = connect_from(source, addr);
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    connector(root, &["http/1.1"]).connect("matrix.example.com", tcp).unwrap()
}

fn request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: matrix.example.com\r\nConnection: close\r\n\r\n")
}

fn login() -> String {
    let body = r#"{"type":"m.login.password","identifier":{"type":"m.id.user","user":"nobody"},"password":"x"}"#;
    format!(
        "POST /_matrix/client/v3/login HTTP/1.1\r\nHost: matrix.example.com\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Whether the server closed without answering.
fn closed_without_answer(mut stream: impl Read + Write, request: &str) -> bool {
    let _ = stream.write_all(request.as_bytes());
    let mut buffer = [0u8; 64];
    matches!(stream.read(&mut buffer), Ok(0) | Err(_))
}

fn synapse_access_lines(synapse: &Synapse) -> Vec<String> {
    let log = std::fs::read_to_string(synapse.dir.join("homeserver.log")).unwrap_or_default();
    log.lines().filter(|l| l.contains("synapse.access.http")).map(str::to_string).collect()
}

#[test]
fn haproxy_in_front_with_proxy_v2_gives_the_edge_and_synapse_the_real_client() {
    let work = tempfile::tempdir().unwrap();
    let synapse_port = free_port();
    let synapse =
        Synapse::start(&work.path().join("synapse"), synapse_port, "example.com", "https://matrix.example.com/");
    let pki = TestPki::new(&[&["matrix.example.com"]]);
    let (edge_tls, edge_plain, metrics) = (free_port(), free_port(), free_port());
    let config = format!(
        r#"server_name: example.com
listeners:
  - address: "127.0.0.1:{edge_tls}"
    tls: true
    serves: [well_known, client, federation]
    proxy_protocol: {{ from: [127.0.0.1/32], timeout: 2s }}
  - address: "127.0.0.1:{edge_plain}"
    serves: [client]
    proxy_protocol: {{ from: [127.0.0.1/32], timeout: 2s }}
tls:
  certificates:
    - {{ cert: certs/matrix.example.com/fullchain.pem, key: certs/matrix.example.com/privkey.pem }}
synapse:
  main: "127.0.0.1:{synapse_port}"
admin_api:
  allow: [127.0.0.9/32]
limits:
  connections_per_ip: 2
rate_limits:
  login: {{ requests: 2, per: 60s }}
metrics: {{ address: "127.0.0.1:{metrics}" }}
"#
    );
    let edge_tls_addr: SocketAddr = format!("127.0.0.1:{edge_tls}").parse().unwrap();
    let edge_plain_addr: SocketAddr = format!("127.0.0.1:{edge_plain}").parse().unwrap();
    let edge = EdgeProcess::start(&config, Some(&pki), &[edge_tls_addr, edge_plain_addr]);
    let front_tls: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let front_plain: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _haproxy = start_haproxy(work.path(), &[(front_tls, edge_tls_addr), (front_plain, edge_plain_addr)]);
    let root = pki.root_pem.clone();

    // Synapse records the real client, over TLS and over plain HTTP.
    let over_tls = exchange(tls_from("127.0.0.2", front_tls, &root), &request("/_matrix/client/versions")).unwrap();
    assert_eq!(over_tls.status, 200);
    let over_plain = exchange(connect_from("127.0.0.3", front_plain), &request("/_matrix/client/versions")).unwrap();
    assert_eq!(over_plain.status, 200);
    std::thread::sleep(Duration::from_millis(500));
    let lines = synapse_access_lines(&synapse);
    assert!(lines.iter().any(|l| l.contains("127.0.0.2 ")), "Synapse did not see 127.0.0.2: {lines:#?}");
    assert!(lines.iter().any(|l| l.contains("127.0.0.3 ")), "Synapse did not see 127.0.0.3: {lines:#?}");
    let edge_log = edge.log_text();
    assert!(edge_log.contains("127.0.0.2") && edge_log.contains("127.0.0.3"), "{edge_log}");

    // The admin allow-list sees the real client too.
    let allowed = exchange(connect_from("127.0.0.9", front_plain), &request("/_synapse/admin/v1/server_version"));
    assert_eq!(allowed.unwrap().status, 200);
    let refused = exchange(connect_from("127.0.0.8", front_plain), &request("/_synapse/admin/v1/server_version"));
    refused.unwrap().assert_matrix_error(403, "M_FORBIDDEN");

    // Rate limits per real client: 127.0.0.4 spends its two logins, 127.0.0.5 still has its own.
    for _ in 0..2 {
        let answer = exchange(tls_from("127.0.0.4", front_tls, &root), &login()).unwrap();
        assert_ne!(answer.status, 429);
    }
    let limited = exchange(tls_from("127.0.0.4", front_tls, &root), &login()).unwrap();
    limited.assert_matrix_error(429, "M_LIMIT_EXCEEDED");
    let other = exchange(tls_from("127.0.0.5", front_tls, &root), &login()).unwrap();
    assert_ne!(other.status, 429, "another client was limited with 127.0.0.4");

    // Per-address connection caps per real client: two held from 127.0.0.6,
    // the third refused, while 127.0.0.7 is served.
    let held: Vec<TcpStream> = (0..2).map(|_| connect_from("127.0.0.6", front_plain)).collect();
    std::thread::sleep(Duration::from_millis(600));
    let third = connect_from("127.0.0.6", front_plain);
    third.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(closed_without_answer(third, &request("/_matrix/client/versions")), "the third connection was served");
    let neighbour = exchange(connect_from("127.0.0.7", front_plain), &request("/_matrix/client/versions"));
    assert_eq!(neighbour.unwrap().status, 200);
    drop(held);

    // A listed address that sends no header is closed, TLS or not.
    let direct = connect_from("127.0.0.1", edge_plain_addr);
    direct.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(closed_without_answer(direct, &request("/_matrix/client/versions")));
    let direct_tls = connect_from("127.0.0.1", edge_tls_addr);
    direct_tls.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(connector(&root, &["http/1.1"]).connect("matrix.example.com", direct_tls).is_err());
    // Silence from a listed address is cut at the header timeout (2 s), not held.
    let mut silent = connect_from("127.0.0.1", edge_plain_addr);
    silent.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let mut buffer = [0u8; 16];
    assert!(matches!(silent.read(&mut buffer), Ok(0) | Err(_)));
    assert!(started.elapsed() < Duration::from_secs(6), "held for {:?}", started.elapsed());

    // A header from an address not listed is not believed: plain is a 400,
    // TLS a failed handshake; Synapse never sees the claimed address.
    let forged = "PROXY TCP4 198.51.100.66 127.0.0.1 1234 443\r\n".to_string() + &request("/_matrix/client/versions");
    let answer = exchange(connect_from("127.0.0.2", edge_plain_addr), &forged).unwrap();
    assert_eq!(answer.status, 400);
    let mut forged_tls = connect_from("127.0.0.2", edge_tls_addr);
    forged_tls.write_all(b"PROXY TCP4 198.51.100.66 127.0.0.1 1234 443\r\n").unwrap();
    forged_tls.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(connector(&root, &["http/1.1"]).connect("matrix.example.com", forged_tls).is_err());
    std::thread::sleep(Duration::from_millis(300));
    assert!(synapse_access_lines(&synapse).iter().all(|l| !l.contains("198.51.100.66")));

    let refused_count =
        metric_value(format!("127.0.0.1:{metrics}").parse().unwrap(), "matrix_edge_proxy_protocol_refused_total")
            .unwrap();
    assert!(refused_count >= 3.0, "{refused_count}");
}

#[test]
fn behind_a_trusted_http_proxy_the_forwarded_client_counts() {
    let synapse = support::upstream::RecordingUpstream::start();
    let port = free_port();
    let config = format!(
        r#"server_name: example.com
listeners:
  - {{ address: "127.0.0.1:{port}", serves: [client] }}
synapse:
  main: "{}"
trusted_proxies: [127.0.0.1/32]
rate_limits:
  login: {{ requests: 1, per: 60s }}
"#,
        synapse.addr
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _edge = EdgeProcess::start(&config, None, &[addr]);
    let via = |source: &str, forwarded: &str, head: &str| {
        let request = head.replacen("\r\n", &format!("\r\nX-Forwarded-For: {forwarded}\r\n"), 1);
        exchange(connect_from(source, addr), &request).unwrap()
    };
    // From the trusted proxy: the right-most untrusted entry, the forged left part ignored.
    assert_eq!(via("127.0.0.1", "6.6.6.6, 203.0.113.9", &request("/_matrix/client/versions")).status, 200);
    // From anyone else: the header means nothing.
    assert_eq!(via("127.0.0.2", "203.0.113.10", &request("/_matrix/client/versions")).status, 200);
    let seen: Vec<String> = synapse.wait_for(2).iter().map(|r| r.header_values("x-forwarded-for").join("|")).collect();
    assert_eq!(seen, ["203.0.113.9", "127.0.0.2"]);
    // Rate limits per forwarded client: one login each, the second from the same client refused.
    assert_ne!(via("127.0.0.1", "203.0.113.20", &login()).status, 429);
    assert_ne!(via("127.0.0.1", "203.0.113.21", &login()).status, 429);
    via("127.0.0.1", "6.6.6.6, 203.0.113.20", &login()).assert_matrix_error(429, "M_LIMIT_EXCEEDED");
}

fn metric_value(metrics: SocketAddr, name: &str) -> Option<f64> {
    let (page, _) = support::client::h1_plain(metrics, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let text = String::from_utf8(page.body).unwrap();
    text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn two_edges_share_one_budget_through_redis_and_keep_serving_without_it() {
    let work = tempfile::tempdir().unwrap();
    let redis_port = free_port();
    let redis = support::start_redis(work.path(), redis_port);
    let synapse = support::upstream::RecordingUpstream::start();
    let edges: Vec<(EdgeProcess, SocketAddr, SocketAddr)> = (0..2)
        .map(|_| {
            let (port, metrics) = (free_port(), free_port());
            let config = format!(
                r#"server_name: example.com
listeners:
  - {{ address: "127.0.0.1:{port}", serves: [client] }}
synapse:
  main: "{}"
rate_limits:
  login: {{ requests: 4, per: 60s }}
  shared: {{ redis: "redis://127.0.0.1:{redis_port}/0", prefix: test, timeout: 200ms }}
metrics: {{ address: "127.0.0.1:{metrics}" }}
"#,
                synapse.addr
            );
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let edge = EdgeProcess::start(&config, None, &[addr]);
            (edge, addr, format!("127.0.0.1:{metrics}").parse().unwrap())
        })
        .collect();

    // One client alternating between the edges gets the configured 4, not 8.
    let mut admitted = 0;
    for round in 0..10 {
        let (_, addr, _) = &edges[round % 2];
        let answer = exchange(connect_from("127.0.0.2", *addr), &login()).unwrap();
        if answer.status == 429 {
            answer.assert_matrix_error(429, "M_LIMIT_EXCEEDED");
        } else {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 4, "the two edges did not share one budget");
    assert_eq!(metric_value(edges[0].2, "matrix_edge_rate_limit_fallbacks_total"), Some(0.0));

    // Redis stops mid-test: requests are still served, counted on each edge,
    // and the fallback is logged and counted.
    drop(redis);
    std::thread::sleep(Duration::from_millis(300));
    let (edge, addr, metrics) = &edges[0];
    let fresh = exchange(connect_from("127.0.0.3", *addr), &login()).unwrap();
    assert_ne!(fresh.status, 429);
    assert_ne!(fresh.status, 500);
    let plain = exchange(connect_from("127.0.0.3", *addr), &request("/_matrix/client/versions")).unwrap();
    assert_eq!(plain.status, 200);
    // Local limits still hold without Redis.
    let statuses: Vec<u16> =
        (0..6).map(|_| exchange(connect_from("127.0.0.4", *addr), &login()).unwrap().status).collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(metric_value(*metrics, "matrix_edge_rate_limit_fallbacks_total").is_some_and(|n| n >= 1.0));
    let log = edge.log_text();
    assert!(log.contains("shared rate limits: Redis"), "{log}");
}

/// Who answered: the recording upstream names itself in its JSON.
fn served_by(response: &Response) -> String {
    let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap_or_default();
    body["upstream"].as_str().unwrap_or("?").to_string()
}

fn sync_as(edge: SocketAddr, user: usize) -> Result<String, String> {
    let request = format!(
        "GET /_matrix/client/v3/sync?timeout=0 HTTP/1.1\r\nHost: matrix.example.com\r\nAuthorization: Bearer syt_user{user}_token\r\nConnection: close\r\n\r\n"
    );
    let stream = TcpStream::connect(edge).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match exchange(stream, &request) {
        Some(response) if response.status == 200 => Ok(served_by(&response)),
        Some(response) => Err(format!("status {}", response.status)),
        None => Err("no response".into()),
    }
}

fn placement(edge: SocketAddr, users: usize) -> Vec<String> {
    (0..users).map(|user| sync_as(edge, user).unwrap()).collect()
}

#[test]
fn workers_found_by_dns_come_and_go_while_traffic_flows() {
    let work = tempfile::tempdir().unwrap();
    let hosts = work.path().join("hosts");
    let sync_port = free_port();
    let fed_port = free_port();
    std::fs::write(&hosts, "127.0.0.2 sync.test\n127.0.0.3 sync.test\n127.0.0.5 fedhost.test\n").unwrap();
    let dns_port = free_port();
    let dnsmasq = ChildGuard(
        Command::new("/usr/sbin/dnsmasq")
            .arg("--keep-in-foreground")
            .arg(format!("--port={dns_port}"))
            .args(["--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts", "--user=root"])
            .args(["--pid-file=", "--local-ttl=1", "--conf-file=/dev/null"])
            .arg(format!("--addn-hosts={}", hosts.display()))
            .arg(format!("--srv-host=_synapse-http._tcp.fed.test,fedhost.test,{fed_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.path().join("dnsmasq.log")).unwrap())
            .spawn()
            .expect("dnsmasq (scripts/install-deps installs it)"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let main = support::upstream::RecordingUpstream::start_named("main", 0);
    let at = |ip: [u8; 4], port| SocketAddr::from((ip, port));
    let sync2 = support::upstream::RecordingUpstream::start_at("sync2", at([127, 0, 0, 2], sync_port));
    let sync3 = support::upstream::RecordingUpstream::start_at("sync3", at([127, 0, 0, 3], sync_port));
    let sync4 = support::upstream::RecordingUpstream::start_at("sync4", at([127, 0, 0, 4], sync_port));
    let _fed = support::upstream::RecordingUpstream::start_at("fed", at([127, 0, 0, 5], fed_port));
    let port = free_port();
    let config = format!(
        r#"server_name: example.com
listeners:
  - {{ address: "127.0.0.1:{port}", serves: [client, federation] }}
synapse:
  main: "{}"
  workers:
    synchrotron: [{{ discover: "sync.test:{sync_port}" }}]
    federation_reader: [{{ discover: "_synapse-http._tcp.fed.test" }}]
  discovery: {{ servers: ["127.0.0.1:{dns_port}"], interval: 1s }}
rate_limits:
  login: null
"#,
        main.addr
    );
    let edge_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let edge = EdgeProcess::start(&config, None, &[edge_addr]);
    let users = 24;
    // A placement is read request by request, so a swap can land in the
    // middle of one: settled means the same placement twice in a row.
    let settled = |want: &dyn Fn(&[String]) -> bool, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut previous = Vec::new();
        loop {
            let now = placement(edge_addr, users);
            if want(&now) && now == previous {
                return now;
            }
            previous = now.clone();
            assert!(Instant::now() < deadline, "{what}: {now:?}\n{}", edge.log_text());
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let before = settled(&|p| p.iter().all(|w| w == "sync2" || w == "sync3"), "the first answer in use");
    assert!(before.contains(&"sync2".to_string()) && before.contains(&"sync3".to_string()), "{before:?}");
    // Until the first answer the group's requests go to main; from now on never.
    let main_syncs = || main.records().iter().filter(|r| r.target().contains("/sync")).count();
    let main_syncs_before = main_syncs();
    // SRV: the federation reader's target and port.
    let federation = exchange(
        TcpStream::connect(edge_addr).unwrap(),
        "GET /_matrix/federation/v1/event/$x HTTP/1.1\r\nHost: matrix.example.com\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_eq!(served_by(&federation), "fed");

    // Traffic throughout the changes; none of it may fail.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let load = {
        let (stop, failures) = (stop.clone(), failures.clone());
        std::thread::spawn(move || {
            let mut user = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Err(error) = sync_as(edge_addr, 1000 + user % 50) {
                    failures.lock().unwrap().push(error);
                }
                user += 1;
            }
        })
    };

    // A new synchrotron: it receives requests; every other key stays where it was.
    std::fs::write(&hosts, "127.0.0.2 sync.test\n127.0.0.3 sync.test\n127.0.0.4 sync.test\n127.0.0.5 fedhost.test\n")
        .unwrap();
    EdgeProcess::signal(dnsmasq.0.id(), "HUP");
    let grown = settled(&|p| p.iter().any(|w| w == "sync4"), "the new synchrotron in use");
    for (old, new) in before.iter().zip(&grown) {
        assert!(new == old || new == "sync4", "a key moved between unchanged members: {before:?} -> {grown:?}");
    }
    assert!(!sync4.records().is_empty());

    // One removed: it stops receiving requests; keys on the others stay.
    std::fs::write(&hosts, "127.0.0.3 sync.test\n127.0.0.4 sync.test\n127.0.0.5 fedhost.test\n").unwrap();
    EdgeProcess::signal(dnsmasq.0.id(), "HUP");
    let shrunk = settled(&|p| p.iter().all(|w| w != "sync2"), "sync2 out of use");
    for (old, new) in grown.iter().zip(&shrunk) {
        if old != "sync2" {
            assert_eq!(old, new, "a key of a member that stayed moved: {grown:?} -> {shrunk:?}");
        }
    }
    let sync2_count = sync2.records().len();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(sync2.records().len(), sync2_count, "the removed synchrotron still receives requests");

    // DNS gone: the last answer stays in use.
    drop(dnsmasq);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !edge.log_text().contains("keeping the last answer (2 addresses)") {
        assert!(Instant::now() < deadline, "no failed lookup logged: {}", edge.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    let kept = placement(edge_addr, users);
    assert_eq!(kept, shrunk);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.join().unwrap();
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "requests failed while members changed: {failures:?}");
    assert_eq!(main_syncs(), main_syncs_before, "sync fell back to main while members changed");
    let _ = sync3;
}

/// An edge of a cluster sharing `redis`, with two client_reader workers.
fn cluster_edge(name: &str, redis_port: u16, main: SocketAddr, readers: [SocketAddr; 2]) -> Member {
    let (port, metrics) = (free_port(), free_port());
    let config = format!(
        r#"server_name: example.com
listeners:
  - {{ address: "127.0.0.1:{port}", serves: [client] }}
synapse:
  main: "{main}"
  workers:
    client_reader: ["{}", "{}"]
  health_check: {{ interval: 60s }}
cluster: {{ redis: "redis://127.0.0.1:{redis_port}/0", name: {name}, prefix: shared-test }}
metrics: {{ address: "127.0.0.1:{metrics}" }}
"#,
        readers[0], readers[1]
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let edge = EdgeProcess::start(&config, None, &[addr]);
    Member { edge, addr, metrics: format!("127.0.0.1:{metrics}").parse().unwrap() }
}

/// One edge of a cluster: the process, its client listener, its private one.
struct Member {
    edge: EdgeProcess,
    addr: SocketAddr,
    metrics: SocketAddr,
}

/// Which client_reader answered each of `count` requests through `member`.
fn readers_used(member: &Member, count: usize) -> Vec<String> {
    let addr = member.addr;
    (0..count)
        .map(|_| {
            let answer =
                exchange(TcpStream::connect(addr).unwrap(), &request("/_matrix/client/v3/publicRooms")).unwrap();
            assert_eq!(answer.status, 200);
            served_by(&answer)
        })
        .collect()
}

/// How long until `member`'s control socket shows `address` in `state`
/// (one word, or several as `a|b`).
fn time_until_state(member: &Member, address: &str, state: &str) -> Duration {
    let started = Instant::now();
    loop {
        let (_, listed, _) = support::workers_cli(&member.edge, &["list"]);
        let row = |line: &str| {
            let words: Vec<&str> = line.split_whitespace().collect();
            words.contains(&address) && state.split('|').any(|wanted| words.contains(&wanted))
        };
        if listed.lines().any(row) {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(15), "{address} never {state}:\n{listed}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cluster_status(metrics: SocketAddr) -> serde_json::Value {
    let (page, _) = support::client::h1_plain(metrics, b"GET /status.json HTTP/1.1\r\nHost: localhost\r\n\r\n");
    serde_json::from_slice::<serde_json::Value>(&page.body).unwrap()["cluster"].clone()
}

/// Issue 35's operator states: a drain typed on one edge reaches the
/// other within a second, ready on the other brings the worker back on
/// both, an edge started later learns the records, an outage of Redis
/// keeps what each knew and a drain typed meanwhile is shared once Redis
/// is back, and a record nobody can read is skipped.
#[test]
fn operator_states_are_shared_between_edges_through_redis() {
    let work = tempfile::tempdir().unwrap();
    let redis_port = free_port();
    let mut redis = support::start_redis(work.path(), redis_port);
    let main = support::upstream::RecordingUpstream::start_named("main", free_port());
    let first = support::upstream::RecordingUpstream::start_named("first", free_port());
    let second = support::upstream::RecordingUpstream::start_named("second", free_port());
    let readers = [first.addr, second.addr];
    let a = cluster_edge("edge-a", redis_port, main.addr, readers);
    let b = cluster_edge("edge-b", redis_port, main.addr, readers);
    let a_metrics = a.metrics;
    let second_address = second.addr.to_string();
    assert!(readers_used(&b, 10).contains(&"second".to_string()), "B does not use both readers to begin with");

    // Drained on A; B follows within a second and sends it nothing new.
    let (code, out, err) = support::workers_cli(&a.edge, &["drain", &second_address]);
    assert_eq!(code, 0, "{out}{err}");
    let took = time_until_state(&b, &second_address, "draining");
    eprintln!("a drain on A reached B after {took:?}");
    assert!(took < Duration::from_secs(3), "B took {took:?} to learn A's drain");
    assert!(readers_used(&b, 20).iter().all(|reader| reader == "first"), "B still sends to the drained reader");

    // Ready on B brings it back on A too.
    let (code, out, err) = support::workers_cli(&b.edge, &["ready", &second_address]);
    assert_eq!(code, 0, "{out}{err}");
    time_until_state(&a, &second_address, "up|slow_start");
    // Back gradually (slow start): it gets requests again within seconds.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !readers_used(&a, 10).contains(&"second".to_string()) {
        assert!(Instant::now() < deadline, "A does not send to the reader made ready on B");
    }

    // Maintenance on A; an edge started afterwards learns it at start.
    support::workers_cli(&a.edge, &["maintenance", &second_address]);
    time_until_state(&b, &second_address, "maintenance");
    let c = cluster_edge("edge-c", redis_port, main.addr, readers);
    let took = time_until_state(&c, &second_address, "maintenance");
    eprintln!("an edge started later learned the maintenance after {took:?}");

    // The fleet: every edge heard from, with its config digest (listeners,
    // metrics and name are each edge's own); A's config changes and is
    // reloaded, B's and C's do not.
    let config = std::fs::read_to_string(&a.edge.config).unwrap();
    std::fs::write(&a.edge.config, format!("{config}request_id_header: X-Edited-On-A\n")).unwrap();
    EdgeProcess::signal(a.edge.pid(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    let edges = loop {
        let edges = cluster_status(b.metrics)["edges"].clone();
        let drifted: Vec<&str> = edges
            .as_array()
            .unwrap()
            .iter()
            .filter(|edge| edge["config_drift"] == true)
            .filter_map(|edge| edge["name"].as_str())
            .collect();
        if edges.as_array().unwrap().len() == 3 && drifted == ["edge-a"] {
            break edges;
        }
        assert!(Instant::now() < deadline, "B never showed three edges with A's config drifted: {edges}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(edges.as_array().unwrap().iter().all(|edge| edge["silent"] == false), "{edges}");
    let (_, listed, _) = support::workers_cli(&b.edge, &["list"]);
    assert!(
        listed.lines().any(|l| l.starts_with("edge-a ") && l.contains("config differs from this edge's")),
        "{listed}"
    );
    assert!(listed.lines().any(|l| l.starts_with("edge-c ")), "{listed}");
    // C stops: after five silent seconds the others flag it.
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let edges = cluster_status(b.metrics)["edges"].clone();
        if edges.as_array().unwrap().iter().any(|edge| edge["name"] == "edge-c" && edge["silent"] == true) {
            break;
        }
        assert!(Instant::now() < deadline, "C was never flagged as not heard from: {edges}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // B's status page in a real browser shows the fleet and the shared states.
    let (dom, stderr) = support::chromium_dump(&format!("http://{}/status", b.metrics));
    for expected in [
        "<h2>Cluster</h2>",
        "edge-a",
        "differs from this edge's",
        "edge-c",
        "not heard from",
        "Operator states shared",
        second_address.as_str(),
        "maintenance",
        "req/s (1 min)",
    ] {
        assert!(dom.contains(expected), "{expected} missing from B's status page: {dom}\n{stderr}");
    }

    // Redis gone: each keeps what it knew and keeps serving.
    drop(redis);
    std::thread::sleep(Duration::from_millis(600));
    assert!(readers_used(&b, 10).iter().all(|reader| reader == "first"), "B forgot the maintenance without Redis");
    assert_eq!(metric_value(a_metrics, "matrix_edge_cluster_redis_up"), Some(0.0));
    assert_eq!(cluster_status(a_metrics)["redis_reachable"], false);
    assert!(a.edge.log_text().contains("cluster: Redis unreachable"), "{}", a.edge.log_text());
    // Typed while Redis is away: applied here, shared once it is back.
    let first_address = first.addr.to_string();
    let (code, out, err) = support::workers_cli(&a.edge, &["drain", &first_address]);
    assert_eq!(code, 0, "{out}{err}");
    redis = support::start_redis(work.path(), redis_port);
    time_until_state(&b, &first_address, "draining");
    let (_, listed, _) = support::workers_cli(&b.edge, &["list"]);
    assert!(listed.lines().any(|l| l.contains(&second_address) && l.contains("maintenance")), "{listed}");
    assert_eq!(metric_value(a_metrics, "matrix_edge_cluster_redis_up"), Some(1.0));

    // A record nobody can read, and one for a member these edges lack.
    let mut connection =
        redis::Client::open(format!("redis://127.0.0.1:{redis_port}/0")).unwrap().get_connection().unwrap();
    let _: () = redis::cmd("HSET")
        .arg("shared-test:admin")
        .arg(&second_address)
        .arg("\u{1}garbage")
        .query(&mut connection)
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg("shared-test:admin")
        .arg("127.0.0.1:1")
        .arg(r#"{"state":"drain","edge":"elsewhere","at":1}"#)
        .query(&mut connection)
        .unwrap();
    let _: () = redis::cmd("INCR").arg("shared-test:admin:version").query(&mut connection).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = cluster_status(a_metrics);
        if status["skipped"].as_array().is_some_and(|skipped| !skipped.is_empty()) {
            break status;
        }
        assert!(Instant::now() < deadline, "the garbage record was never reported: {status}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status["skipped"][0].as_str().unwrap().starts_with(&second_address), "{status}");
    assert_eq!(status["unknown_members"][0]["address"], "127.0.0.1:1", "{status}");
    assert_eq!(status["redis_reachable"], true);
    assert!(a.edge.log_text().contains("cluster: a record in Redis was skipped"), "{}", a.edge.log_text());
    // The unreadable record changes nothing: the reader it names stays as it was.
    let (_, listed, _) = support::workers_cli(&a.edge, &["list"]);
    assert!(listed.lines().any(|l| l.contains(&second_address) && l.contains("maintenance")), "{listed}");
    assert_eq!(readers_used(&a, 4).len(), 4, "A stopped serving");
    drop(redis);
}

/// Issue 35's health hints: a worker one edge finds dead is checked at once
/// by the others (each still decides by its own probe), long before their
/// own checks (every 60 s here) would have found it.
#[test]
fn a_worker_one_edge_finds_dead_is_checked_at_once_by_the_others() {
    let work = tempfile::tempdir().unwrap();
    let redis_port = free_port();
    let _redis = support::start_redis(work.path(), redis_port);
    let main = support::upstream::RecordingUpstream::start_named("main", free_port());
    let first = support::upstream::RecordingUpstream::start_named("first", free_port());
    let second = support::upstream::RecordingUpstream::start_named("second", free_port());
    let second_address = second.addr.to_string();
    let readers = [first.addr, second.addr];
    let a = cluster_edge("edge-a", redis_port, main.addr, readers);
    let b = cluster_edge("edge-b", redis_port, main.addr, readers);
    time_until_state(&a, &second_address, "up|slow_start");
    time_until_state(&b, &second_address, "up|slow_start");
    // Give both a tick to note the member usable before it dies.
    std::thread::sleep(Duration::from_millis(600));
    drop(second);
    // A meets the dead worker through its traffic (answered by the other
    // one); B has no traffic at all.
    assert!(readers_used(&a, 6).iter().all(|reader| reader == "first"));
    time_until_state(&a, &second_address, "down");
    let took = time_until_state(&b, &second_address, "down");
    eprintln!("B found the worker down {took:?} after A did");
    assert!(took < Duration::from_secs(5), "B took {took:?}: it waited for its own check");
    assert!(b.edge.log_text().contains("cluster: edge edge-a saw"), "{}", b.edge.log_text());
}

/// Who answered a request through `addr`.
fn answered_by(addr: SocketAddr, raw: &str) -> String {
    let answer = exchange(TcpStream::connect(addr).unwrap(), raw).unwrap();
    assert_eq!(answer.status, 200);
    served_by(&answer)
}

/// Sticky choices agree across edges without sharing anything: both hash
/// the same members the same way. 200 users' syncs and 200 rooms' sends
/// reach the same worker through either edge, and again after one
/// member went down and came back on both.
#[test]
fn sticky_choices_agree_across_edges() {
    let main = support::upstream::RecordingUpstream::start_named("main", free_port());
    let mut synchrotrons: Vec<_> =
        (0..3).map(|n| support::upstream::RecordingUpstream::start_named(&format!("sync{n}"), free_port())).collect();
    let mut creators: Vec<_> = (0..3)
        .map(|n| support::upstream::RecordingUpstream::start_named(&format!("creator{n}"), free_port()))
        .collect();
    let list = |members: &[support::upstream::RecordingUpstream]| {
        members.iter().map(|m| format!("\"{}\"", m.addr)).collect::<Vec<_>>().join(", ")
    };
    let edges: Vec<(EdgeProcess, SocketAddr)> = (0..2)
        .map(|n| {
            let port = free_port();
            // The members listed in another order on the second edge: the
            // ring does not depend on it.
            let (syncs, creates) = if n == 0 {
                (list(&synchrotrons), list(&creators))
            } else {
                let reversed = |members: &[support::upstream::RecordingUpstream]| {
                    members.iter().rev().map(|m| format!("\"{}\"", m.addr)).collect::<Vec<_>>().join(", ")
                };
                (reversed(&synchrotrons), reversed(&creators))
            };
            let config = format!(
                r#"server_name: example.com
listeners:
  - {{ address: "127.0.0.1:{port}", serves: [client] }}
synapse:
  main: "{}"
  workers:
    synchrotron: [{syncs}]
    event_creator: [{creates}]
  health_check: {{ interval: 1s }}
  balancing: {{ groups: {{ synchrotron: {{ slow_start: 0s }}, event_creator: {{ slow_start: 0s }} }} }}
"#,
                main.addr
            );
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            (EdgeProcess::start(&config, None, &[addr]), addr)
        })
        .collect();
    let sync = |user: usize| {
        format!(
            "GET /_matrix/client/v3/sync?timeout=0 HTTP/1.1\r\nHost: matrix.example.com\r\nAuthorization: Bearer syt_user{user}_token\r\nConnection: close\r\n\r\n"
        )
    };
    let send = |room: usize| {
        format!(
            "PUT /_matrix/client/v3/rooms/!room{room}:example.com/send/m.room.message/t{room} HTTP/1.1\r\nHost: matrix.example.com\r\nAuthorization: Bearer syt_u_token\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        )
    };
    let placements = |edge: SocketAddr| -> (Vec<String>, Vec<String>) {
        (
            (0..200).map(|user| answered_by(edge, &sync(user))).collect(),
            (0..200).map(|room| answered_by(edge, &send(room))).collect(),
        )
    };
    let before = placements(edges[0].1);
    assert_eq!(placements(edges[1].1), before, "the two edges placed users or rooms differently");
    for (name, spread) in [("sync", &before.0), ("creator", &before.1)] {
        let used: std::collections::BTreeSet<&String> = spread.iter().collect();
        assert_eq!(used.len(), 3, "{name}: 200 keys on fewer than three members: {used:?}");
    }
    // sync1 and creator1 down and back: each edge finds it down through its
    // traffic, then up again by its check; both place everyone as before.
    let (sync1, creator1) = (synchrotrons[1].addr, creators[1].addr);
    drop(synchrotrons.remove(1));
    drop(creators.remove(1));
    for (_, edge) in &edges {
        let during = placements(*edge);
        assert!(during.0.iter().all(|w| w != "sync1") && during.1.iter().all(|w| w != "creator1"));
    }
    let _sync1 = support::upstream::RecordingUpstream::start_at("sync1", sync1);
    let _creator1 = support::upstream::RecordingUpstream::start_at("creator1", creator1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now: Vec<_> = edges.iter().map(|(_, edge)| placements(*edge)).collect();
        if now.iter().all(|placed| *placed == before) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the keys did not come back to the member that returned: {:?}",
            edges.iter().map(|(edge, _)| support::workers_cli(edge, &["list"]).1).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The last minute per member, as `workers list` shows it: each
    // synchrotron answered about a third of the syncs, none failed.
    std::thread::sleep(Duration::from_millis(1100));
    let (_, listed, _) = support::workers_cli(&edges[0].0, &["list"]);
    let row = listed.lines().find(|l| l.contains(&synchrotrons[0].addr.to_string())).unwrap();
    let fields: Vec<&str> = row.split_whitespace().collect();
    let per_second: f64 = fields[6].parse().unwrap();
    assert!(per_second > 0.5, "{listed}");
    assert_eq!(fields[7], "0", "{listed}");
    assert!(fields[8].starts_with("<=") && fields[8].ends_with("ms"), "{listed}");
}
