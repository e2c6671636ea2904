//! Virtual hosts through the real binary over TLS: three sites and more on
//! one listener by Host and SNI, an Element-Web-like static tree, named
//! upstreams with prefix stripping, header changes and allow-lists, a
//! redirect, and a real WebSocket client and server through the edge.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::certs::TestPki;
use support::client::{self, h1_tls, h2_tls, read_response};
use support::upstream::RecordingUpstream;
use support::{free_port, EdgeProcess};

const BIG: usize = 50 << 20;

struct Setup {
    pki: TestPki,
    synapse: RecordingUpstream,
    mas: RecordingUpstream,
    jwt: RecordingUpstream,
    edge: EdgeProcess,
    public: SocketAddr,
    federation: SocketAddr,
    metrics: SocketAddr,
    livekit_port: u16,
    site_dir: tempfile::TempDir,
}

/// The static tree: what Element Web ships, plus a 50 MB file and a secret
/// outside the root with a symlink pointing at it.
fn static_tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir_all(www.join("bundles/5f3a9c")).unwrap();
    std::fs::write(www.join("index.html"), "<!doctype html><title>Element</title>").unwrap();
    std::fs::write(www.join("config.json"), r#"{"default_server_config":{}}"#).unwrap();
    std::fs::write(www.join("version"), "1.12.0\n").unwrap();
    std::fs::write(www.join("bundles/5f3a9c/bundle.js"), "console.log('element');".repeat(100)).unwrap();
    std::fs::write(www.join("bundles/5f3a9c/bundle.js.br"), "brotli bytes").unwrap();
    std::fs::write(www.join("bundles/5f3a9c/bundle.js.gz"), "gzip bytes").unwrap();
    let big: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
    std::fs::write(www.join("big.bin"), big).unwrap();
    std::fs::write(dir.path().join("secret.txt"), "TOP-SECRET").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret.txt"), www.join("leak.txt")).unwrap();
    dir
}

fn setup() -> Setup {
    let pki = TestPki::new(&[
        &["synapse.example.com"],
        &["example.com"],
        &["element.example.com"],
        &["auth.example.com"],
        &["rtc.example.com", "*.rtc.example.com"],
    ]);
    let (synapse, mas, jwt) = (RecordingUpstream::start(), RecordingUpstream::start(), RecordingUpstream::start());
    let site_dir = static_tree();
    let addr = || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
    let (public, federation, metrics) = (addr(), addr(), addr());
    let livekit_port = free_port();
    let www = site_dir.path().join("www");
    let config = format!(
        r#"server_name: example.com
listeners:
  - {{ address: "{public}", tls: true, serves: [well_known, client, federation, sites] }}
  - {{ address: "{federation}", tls: true, serves: [federation] }}
tls:
  certificates:
    - {{ cert: certs/synapse.example.com/fullchain.pem, key: certs/synapse.example.com/privkey.pem }}
    - {{ cert: certs/example.com/fullchain.pem, key: certs/example.com/privkey.pem }}
    - {{ cert: certs/element.example.com/fullchain.pem, key: certs/element.example.com/privkey.pem }}
    - {{ cert: certs/auth.example.com/fullchain.pem, key: certs/auth.example.com/privkey.pem }}
    - {{ cert: certs/rtc.example.com/fullchain.pem, key: certs/rtc.example.com/privkey.pem }}
well_known:
  server: synapse.example.com:443
  client: {{ homeserver: "https://synapse.example.com" }}
synapse:
  main: "{synapse}"
upstreams:
  mas: {{ address: "{mas}" }}
  jwt: {{ address: "{jwt}" }}
  livekit: {{ address: "127.0.0.1:{livekit_port}" }}
matrix_site:
  routes:
    - {{ path: /, redirect: {{ to: "https://element.example.com", status: 301 }} }}
    - {{ prefix: /auth/, upstream: mas }}
sites:
  - hosts: [element.example.com]
    routes:
      - prefix: /
        static:
          root: "{www}"
          cache:
            - {{ pattern: '^/(index\.html|version|config.*\.json)$', cache_control: no-cache }}
            - {{ pattern: '^/bundles/', cache_control: "public, max-age=31536000, immutable" }}
  - hosts: [auth.example.com]
    routes:
      - {{ prefix: /, upstream: mas }}
      - {{ prefix: /api/admin/, upstream: mas, allow: [10.9.9.0/24] }}
  - hosts: [rtc.example.com, "*.rtc.example.com"]
    routes:
      - {{ prefix: /livekit/jwt/, upstream: jwt, strip_prefix: true, set_headers: {{ X-Site: rtc }}, remove_headers: [X-Secret] }}
      - {{ prefix: /, upstream: livekit, websocket: true, websocket_idle_timeout: 2s }}
metrics: {{ address: "{metrics}" }}
process: {{ threads: 2 }}
"#,
        synapse = synapse.addr,
        mas = mas.addr,
        jwt = jwt.addr,
        www = www.display(),
    );
    let edge = EdgeProcess::start(&config, Some(&pki), &[public, federation, metrics]);
    Setup { pki, synapse, mas, jwt, edge, public, federation, metrics, livekit_port, site_dir }
}

impl Setup {
    /// One HTTP/1.1 request over TLS with `host` as both SNI and Host.
    fn get(&self, host: &str, target: &str, headers: &[(&str, &str)]) -> client::Response {
        self.request("GET", host, target, headers).0
    }

    fn request(&self, method: &str, host: &str, target: &str, headers: &[(&str, &str)]) -> (client::Response, bool) {
        let sni = host.split(':').next().unwrap().to_ascii_lowercase();
        self.request_with_sni(&sni, method, host, target, headers)
    }

    fn request_with_sni(
        &self,
        sni: &str,
        method: &str,
        host: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> (client::Response, bool) {
        let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\n");
        for (name, value) in headers {
            raw.push_str(&format!("{name}: {value}\r\n"));
        }
        raw.push_str("\r\n");
        h1_tls(self.public, sni, &self.pki.root_pem, raw.as_bytes())
    }
}

#[test]
fn three_sites_share_one_listener_by_host_and_sni() {
    let s = setup();
    // Each name gets its own certificate on the same port.
    for name in ["synapse.example.com", "element.example.com", "auth.example.com", "media.rtc.example.com"] {
        let tls = client::tls_connect(s.public, name, &s.pki.root_pem, &["http/1.1"]);
        assert!(tls.ssl().peer_certificate().is_some(), "{name}");
    }
    let versions = s.get("synapse.example.com", "/_matrix/client/versions", &[]);
    assert_eq!(versions.status, 200, "{versions:?}");
    assert_eq!(s.synapse.records().len(), 1);
    let element = s.get("element.example.com", "/config.json", &[]);
    assert_eq!((element.status, element.body.as_slice()), (200, &br#"{"default_server_config":{}}"#[..]));
    assert_eq!(element.header("content-type"), Some("application/json; charset=utf-8"));
    let mas = s.get("auth.example.com", "/.well-known/openid-configuration", &[]);
    assert_eq!(mas.status, 200);
    assert_eq!(s.mas.records()[0].target(), "/.well-known/openid-configuration");
    let mas_requests = s.mas.records().len();
    // Over HTTP/2 the site comes from :authority.
    let h2 = h2_tls(s.public, "element.example.com", &s.pki.root_pem, "GET", "/version", &[], None).unwrap();
    assert_eq!((h2.status, h2.body.as_slice()), (200, &b"1.12.0\n"[..]));
    // A Matrix path on another site is that site's business, never Synapse's.
    let not_synapse = s.get("element.example.com", "/_matrix/client/versions", &[]);
    assert_eq!(not_synapse.status, 404);
    assert_eq!(s.synapse.records().len(), 1);
    // Host with a port and in upper case picks the same site.
    let ported = s.get("ELEMENT.example.com:443", "/version", &[]);
    assert_eq!(ported.status, 200);
    // The Matrix site still answers well-known and federation on 8448.
    let well_known = s.get("example.com", "/.well-known/matrix/server", &[]);
    assert_eq!(well_known.json()["m.server"], "synapse.example.com:443");
    let raw = b"GET /_matrix/key/v2/server HTTP/1.1\r\nHost: example.com:8448\r\n\r\n";
    let (federation, _) = h1_tls(s.federation, "example.com", &s.pki.root_pem, raw);
    assert_eq!(federation.status, 200);
    // MAS mounted under /auth on the Matrix host: the prefix is kept.
    let auth = s.get("synapse.example.com", "/auth/login?next=%2Faccount", &[]);
    assert_eq!(auth.status, 200);
    assert_eq!(s.mas.records().len(), mas_requests + 1);
    assert_eq!(s.mas.records().last().unwrap().request_line, "GET /auth/login?next=%2Faccount HTTP/1.1");
    // ... and a landing redirect on its own root.
    let root = s.get("example.com", "/", &[]);
    assert_eq!((root.status, root.header("location")), (301, Some("https://element.example.com/")));
    // Other sites are not served on the federation-only listener.
    let raw = b"GET /version HTTP/1.1\r\nHost: element.example.com\r\n\r\n";
    let (on_8448, _) = h1_tls(s.federation, "element.example.com", &s.pki.root_pem, raw);
    on_8448.assert_matrix_error(421, "M_UNRECOGNIZED");
}

#[test]
fn an_unknown_host_gets_421_and_no_site_content() {
    let s = setup();
    for host in ["unknown.example.com", "a.b.rtc.example.com", "127.0.0.1"] {
        let (response, _) = s.request_with_sni("synapse.example.com", "GET", host, "/config.json", &[]);
        response.assert_matrix_error(421, "M_UNRECOGNIZED");
    }
    // SNI for one site, Host for an unknown one: the Host decides.
    let raw = b"GET /index.html HTTP/1.1\r\nHost: other.test\r\n\r\n";
    let (response, _) = h1_tls(s.public, "element.example.com", &s.pki.root_pem, raw);
    response.assert_matrix_error(421, "M_UNRECOGNIZED");
    assert!(s.synapse.records().is_empty() && s.mas.records().is_empty());
}

#[test]
fn static_files_as_element_web_needs_them() {
    let s = setup();
    let index = s.get("element.example.com", "/", &[]);
    assert_eq!(index.status, 200);
    assert_eq!(index.body, b"<!doctype html><title>Element</title>");
    assert_eq!(index.header("cache-control"), Some("no-cache"));
    assert_eq!(index.header("content-type"), Some("text/html; charset=utf-8"));
    let etag = index.header("etag").unwrap().to_string();
    let modified = index.header("last-modified").unwrap().to_string();
    // Revalidation.
    let again = s.get("element.example.com", "/index.html", &[("If-None-Match", &etag)]);
    assert_eq!((again.status, again.body.len()), (304, 0));
    assert_eq!(again.header("etag"), Some(etag.as_str()));
    let since = s.get("element.example.com", "/index.html", &[("If-Modified-Since", &modified)]);
    assert_eq!(since.status, 304);
    assert_eq!(s.get("element.example.com", "/config.json", &[]).header("cache-control"), Some("no-cache"));
    // Hashed bundles: immutable, precompressed variants by Accept-Encoding.
    let bundle = "/bundles/5f3a9c/bundle.js";
    let br = s.get("element.example.com", bundle, &[("Accept-Encoding", "gzip, deflate, br")]);
    assert_eq!((br.status, br.body.as_slice()), (200, &b"brotli bytes"[..]));
    assert_eq!(br.header("content-encoding"), Some("br"));
    assert_eq!(br.header("vary"), Some("Accept-Encoding"));
    assert_eq!(br.header("cache-control"), Some("public, max-age=31536000, immutable"));
    assert_eq!(br.header("content-type"), Some("text/javascript; charset=utf-8"));
    let gz = s.get("element.example.com", bundle, &[("Accept-Encoding", "gzip")]);
    assert_eq!((gz.header("content-encoding"), gz.body.as_slice()), (Some("gzip"), &b"gzip bytes"[..]));
    let plain = s.get("element.example.com", bundle, &[]);
    assert_eq!((plain.header("content-encoding"), plain.body.len()), (None, 2300));
    // HEAD: the head of GET, no body.
    let (head, _) = s.request("HEAD", "element.example.com", "/config.json", &[]);
    assert_eq!((head.status, head.header("content-length"), head.body.len()), (200, Some("28"), 0));
    // No directory listing, no writes.
    s.get("element.example.com", "/bundles/", &[]).assert_matrix_error(404, "M_NOT_FOUND");
    let dir = s.get("element.example.com", "/bundles?x=1", &[]);
    assert_eq!((dir.status, dir.header("location")), (301, Some("/bundles/?x=1")));
    let (post, _) = s.request("POST", "element.example.com", "/config.json", &[("Content-Length", "0")]);
    post.assert_matrix_error(405, "M_UNRECOGNIZED");
}

#[test]
fn a_50_mb_file_streams_with_ranges_and_flat_memory() {
    let s = setup();
    // A range in the middle: exactly those bytes.
    let part = s.get("element.example.com", "/big.bin", &[("Range", "bytes=10000000-10000099")]);
    assert_eq!(part.status, 206);
    assert_eq!(part.header("content-range"), Some(format!("bytes 10000000-10000099/{BIG}").as_str()));
    let expected: Vec<u8> = (10_000_000..10_000_100).map(|i| (i % 251) as u8).collect();
    assert_eq!(part.body, expected);
    let past = s.get("element.example.com", "/big.bin", &[("Range", "bytes=60000000-")]);
    assert_eq!((past.status, past.header("content-range")), (416, Some(format!("bytes */{BIG}").as_str())));
    // The whole file, read slowly, while the edge's memory is sampled.
    let pid = s.edge.pid();
    let before = support::rss_kib(pid);
    let mut stream = client::tls_connect(s.public, "element.example.com", &s.pki.root_pem, &["http/1.1"]);
    stream.write_all(b"GET /big.bin HTTP/1.1\r\nHost: element.example.com\r\n\r\n").unwrap();
    let mut reader = BufReader::with_capacity(1 << 16, stream);
    let mut line = String::new();
    let mut length = 0usize;
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    assert_eq!(length, BIG);
    let mut received = 0usize;
    let mut peak = before;
    let mut checksum_ok = true;
    let mut buffer = vec![0u8; 1 << 16];
    while received < BIG {
        let n = std::io::Read::read(&mut reader, &mut buffer).unwrap();
        assert!(n > 0, "connection closed after {received} bytes");
        checksum_ok &= buffer[..n].iter().enumerate().all(|(i, b)| *b == ((received + i) % 251) as u8);
        received += n;
        if received % (4 << 20) < n {
            peak = peak.max(support::rss_kib(pid));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(checksum_ok, "the file arrived altered");
    let growth = peak.saturating_sub(before);
    eprintln!("edge RSS {before} KiB before, peak {peak} KiB while streaming 50 MB");
    assert!(growth < 16 << 10, "RSS grew by {growth} KiB while streaming a 50 MB file");
}

#[test]
fn nothing_outside_the_static_root_is_ever_served() {
    let s = setup();
    let attempts = [
        "/../secret.txt",
        "/bundles/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/bundles/%2e%2e/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "/bundles%2f..%2f..%2fsecret.txt",
        "/..%5csecret.txt",
        "/%252e%252e/secret.txt",
        "/leak.txt",
    ];
    for target in attempts {
        let (response, _) = s.request("GET", "element.example.com", target, &[]);
        assert!(matches!(response.status, 400 | 404), "{target}: {response:?}");
        assert!(!String::from_utf8_lossy(&response.body).contains("TOP-SECRET"), "{target} leaked the file");
        assert_eq!(response.header("content-type"), Some("application/json"), "{target}");
    }
    let _ = &s.site_dir;
}

#[test]
fn named_upstreams_strip_prefixes_change_headers_and_allow_by_network() {
    let s = setup();
    // Prefix stripped, the rest of the target byte for byte.
    let target = "/livekit/jwt/sfu/get?room=%21abc%3Aexample.com&x=a%2Fb";
    let mut stream = client::tls_connect(s.public, "rtc.example.com", &s.pki.root_pem, &["http/1.1"]);
    let raw = format!("POST {target} HTTP/1.1\r\nHost: rtc.example.com\r\nContent-Length: 2\r\nX-Secret: s\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n{{}}");
    stream.write_all(raw.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let answer = read_response(&mut reader, false).unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    let records = s.jwt.records();
    let last = records.last().unwrap();
    assert_eq!(last.request_line, "POST /sfu/get?room=%21abc%3Aexample.com&x=a%2Fb HTTP/1.1");
    assert_eq!(last.header_values("x-site"), ["rtc"]);
    assert!(last.header_values("x-secret").is_empty());
    assert_eq!(last.header_values("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(last.header_values("host"), ["rtc.example.com"]);
    assert_eq!(last.body_len, 2);
    // The MAS admin API only from its network, however it is spelled.
    for target in ["/api/admin/v1/users", "/api/%61dmin/v1/users", "//api/admin/v1/users", "/x/../api/admin/v1/users"] {
        let (refused, _) = s.request("GET", "auth.example.com", target, &[]);
        refused.assert_matrix_error(403, "M_FORBIDDEN");
    }
    assert_eq!(s.get("auth.example.com", "/graphql", &[]).status, 200);
    assert!(s.mas.records().iter().all(|r| !r.target().contains("admin")));
    // WebSocket upgrades are refused where a route does not allow them, and on Matrix paths.
    let upgrade = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let (refused, closed) = s.request("GET", "auth.example.com", "/graphql", &upgrade);
    refused.assert_matrix_error(400, "M_UNRECOGNIZED");
    assert!(closed);
    let (refused, _) = s.request("GET", "synapse.example.com", "/_matrix/client/v3/sync", &upgrade);
    refused.assert_matrix_error(400, "M_UNRECOGNIZED");
    let (refused, _) = s.request("GET", "rtc.example.com", "/livekit/jwt/healthz", &upgrade);
    refused.assert_matrix_error(400, "M_UNRECOGNIZED");
    assert!(s
        .mas
        .records()
        .iter()
        .all(|r| r.target() == "/.well-known/openid-configuration" || r.target() == "/graphql"));
    assert!(s.synapse.records().is_empty());
}

fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let raw = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let (response, _) = client::h1_plain(addr, raw.as_bytes());
    String::from_utf8_lossy(&response.body)
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn python() -> PathBuf {
    support::matrix::synapse_python()
}

fn peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/py/websocket_peer.py")
}

#[test]
#[ignore = "needs Python's websockets (scripts/test installs it)"]
fn a_real_websocket_passes_through_over_tls_and_closes_when_idle() {
    let s = setup();
    let mut server = std::process::Command::new(python())
        .arg(peer_script())
        .args(["server", &s.livekit_port.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut server_out = BufReader::new(server.stdout.take().unwrap());
    // Killed however the test ends, so no reader of its output waits forever.
    let _server = support::ChildGuard(server);
    let mut line = String::new();
    server_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let ca = s.edge.path().join("certs/ca.pem");
    let started = Instant::now();
    let client = std::process::Command::new(python())
        .arg(peer_script())
        .args([
            "client",
            "wss://rtc.example.com/rtc?access_token=abc",
            &s.public.to_string(),
            ca.to_str().unwrap(),
            "10",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&client.stdout);
    assert!(client.status.success(), "client failed: {stdout} {}", String::from_utf8_lossy(&client.stderr));
    let outcome: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(outcome["echoes"][0], "echo:hello...(10)");
    assert_eq!(outcome["echoes"][1], "echo:xxxxxxxxxxxxxxx...(70005)");
    // Idle for the configured 2 s: the edge closes it (not the 10 s wait).
    let closed_after = outcome["closed_after"].as_f64().expect("the idle WebSocket was not closed");
    assert!((1.5..8.0).contains(&closed_after), "closed after {closed_after} s");
    assert!(started.elapsed() < Duration::from_secs(30));
    // The server saw the handshake as the client sent it, path and query intact.
    line.clear();
    server_out.read_line(&mut line).unwrap();
    let handshake: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(handshake["path"], "/rtc?access_token=abc");
    assert_eq!(handshake["headers"]["upgrade"], "websocket");
    assert_eq!(handshake["headers"]["x-forwarded-for"], "127.0.0.1");
    line.clear();
    server_out.read_line(&mut line).unwrap();
    assert!(line.starts_with("closed "), "{line}");
    assert_eq!(metric(s.metrics, "matrix_edge_websocket_upgrades_total{upstream=\"livekit\"}"), Some(1.0));
    assert_eq!(metric(s.metrics, "matrix_edge_websockets_open"), Some(0.0));

    // Bytes after the 101 are a stream, not a request body: 200 MiB each
    // way (four times max_upload_size) pass, and the client's close code
    // reaches the server.
    let bulk = std::process::Command::new(python())
        .arg(peer_script())
        .args(["bulk", "wss://rtc.example.com/rtc", &s.public.to_string(), ca.to_str().unwrap(), "200", "4000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&bulk.stdout);
    assert!(bulk.status.success(), "bulk client failed: {stdout} {}", String::from_utf8_lossy(&bulk.stderr));
    let outcome: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(outcome["sent"], 200 << 20, "{outcome}");
    assert_eq!(outcome["received"], 200 << 20, "{outcome}");
    assert_eq!(outcome["close_sent"], 4000, "{outcome}");
    assert_eq!(outcome["close_received"], 4000, "the server's answer to the close: {outcome}");
    eprintln!("200 MiB each way through the edge in {} s", outcome["seconds"]);
    line.clear();
    server_out.read_line(&mut line).unwrap(); // the handshake
    line.clear();
    server_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "closed 4000");
    assert_eq!(metric(s.metrics, "matrix_edge_websockets_open"), Some(0.0));
}
