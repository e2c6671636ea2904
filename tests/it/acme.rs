//! ACME against a real CA: Debian's `pebble`, with `pebble-challtestsrv`
//! answering its DNS. Pebble validates HTTP-01 by connecting to the edge's
//! plain listener on loopback; every name resolves to 127.0.0.1 unless a
//! test points it elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use openssl::hash::MessageDigest;
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use openssl::x509::X509;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::certs::TestPki;
use support::client::{get, h1_plain, h1_tls, metric, read_response};
use support::{free_port, wait_listening, ChildGuard, EdgeProcess};

fn require(program: &str) -> &str {
    assert!(Path::new(program).exists(), "{program} is missing: scripts/install-deps installs Debian's pebble package");
    program
}

struct Pebble {
    _process: ChildGuard,
    directory: String,
    management: SocketAddr,
}

/// Pebble's own HTTPS uses a certificate from `pki` (its root is the
/// edge's `ca_file`); it validates HTTP-01 on `http_port`.
fn start_pebble(dir: &Path, pki: &TestPki, http_port: u16, dns: SocketAddr, port: u16) -> Pebble {
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let management = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let leaf = pki.issue(&["localhost", "127.0.0.1"]);
    std::fs::write(dir.join("pebble-cert.pem"), &leaf.fullchain_pem).unwrap();
    std::fs::write(dir.join("pebble-key.pem"), &leaf.key_pem).unwrap();
    let config = serde_json::json!({ "pebble": {
        "listenAddress": listen.to_string(),
        "managementListenAddress": management.to_string(),
        "certificate": dir.join("pebble-cert.pem"),
        "privateKey": dir.join("pebble-key.pem"),
        "httpPort": http_port,
        "tlsPort": free_port(),
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false,
    }});
    std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
    let log = std::fs::File::create(dir.join("pebble.log")).unwrap();
    let child = Command::new(require("/usr/bin/pebble"))
        .arg("-config")
        .arg(dir.join("pebble.json"))
        .arg("-dnsserver")
        .arg(dns.to_string())
        // No random validation delays; every order validated afresh (a
        // reused authorization would hide a failing challenge); no
        // artificial bad-nonce rejections.
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_AUTHZREUSE", "0")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let process = ChildGuard(child);
    wait_listening(listen, "pebble");
    wait_listening(management, "pebble management");
    Pebble { _process: process, directory: format!("https://localhost:{}/dir", listen.port()), management }
}

/// The fake DNS: every A query answers 127.0.0.1, no AAAA.
fn start_dns() -> (ChildGuard, SocketAddr, SocketAddr) {
    let dns = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let management = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let child = Command::new(require("/usr/bin/pebble-challtestsrv"))
        .args(["-http01", "", "-https01", "", "-tlsalpn01", "", "-defaultIPv6", "", "-defaultIPv4", "127.0.0.1"])
        .arg("-dns01")
        .arg(dns.to_string())
        .arg("-management")
        .arg(management.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let helper = ChildGuard(child);
    wait_listening(management, "pebble-challtestsrv");
    (helper, dns, management)
}

/// Pebble's root for the certificates it issues (new on every start).
fn pebble_root(pebble: &Pebble, pki: &TestPki) -> String {
    let host = format!("localhost:{}", pebble.management.port());
    let (response, _) = h1_tls(pebble.management, "localhost", &pki.root_pem, &get("/roots/0", &host));
    assert_eq!(response.status, 200);
    String::from_utf8(response.body).unwrap()
}

/// The certificate the edge presents for `sni`, without verifying it.
fn served_certificate(addr: SocketAddr, sni: &str) -> X509 {
    let mut builder = SslConnector::builder(SslMethod::tls()).unwrap();
    builder.set_verify(SslVerifyMode::NONE);
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let stream = builder.build().connect(sni, tcp).unwrap();
    stream.ssl().peer_certificate().unwrap()
}

/// Python's cryptography (the venv's, as Synapse uses it) with warnings as
/// errors: it warns of serials RFC 5280 forbids (not positive, over 20 octets).
fn strictly_parsed_serial(cert: &X509) {
    let mut python = Command::new(support::matrix::synapse_python())
        .args([
            "-W",
            "error",
            "-c",
            "import sys\nfrom cryptography import x509\n\
             c = x509.load_pem_x509_certificate(sys.stdin.buffer.read())\n\
             assert 0 < c.serial_number < 2 ** 159, c.serial_number\nprint(c.serial_number)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    python.stdin.take().unwrap().write_all(&cert.to_pem().unwrap()).unwrap();
    let output = python.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "cryptography refused the placeholder: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn fingerprint(cert: &X509) -> Vec<u8> {
    cert.digest(MessageDigest::sha256()).unwrap().to_vec()
}

fn common_name(cert: &X509) -> String {
    let entry = cert.subject_name().entries_by_nid(openssl::nid::Nid::COMMONNAME).next();
    entry.map(|e| String::from_utf8_lossy(e.data().as_slice()).into_owned()).unwrap_or_default()
}

/// A verified request for the client well-known over a new TLS connection:
/// the fingerprint of the certificate that answered, or why it failed.
fn verified_request(addr: SocketAddr, sni: &str, root_pem: &str) -> Result<Vec<u8>, String> {
    let mut builder = SslConnector::builder(SslMethod::tls()).unwrap();
    builder.set_verify(SslVerifyMode::PEER);
    builder.cert_store_mut().add_cert(X509::from_pem(root_pem.as_bytes()).unwrap()).unwrap();
    let tcp = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut stream = builder.build().connect(sni, tcp).map_err(|e| format!("handshake: {e}"))?;
    let served = fingerprint(&stream.ssl().peer_certificate().ok_or("no certificate")?);
    stream.write_all(&get("/.well-known/matrix/client", sni)).map_err(|e| format!("write: {e}"))?;
    let mut reader = BufReader::new(stream);
    match read_response(&mut reader, false) {
        Some(response) if response.status == 200 => Ok(served),
        Some(response) => Err(format!("status {}", response.status)),
        None => Err("no response".into()),
    }
}

fn wait_for(what: &str, edge: &EdgeProcess, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what} did not happen within {limit:?}; edge log:\n{}", edge.log_text());
}

fn renew(edge: &EdgeProcess, names: &[&str]) {
    let output = Command::new(support::binary())
        .arg("renew")
        .arg("-c")
        .arg(&edge.config)
        .arg("--pid-file")
        .arg(edge.path().join("edge.pid"))
        .args(names)
        .output()
        .unwrap();
    assert!(output.status.success(), "renew failed: {}", String::from_utf8_lossy(&output.stderr));
}

fn edge_config(tls: u16, plain: u16, metrics: u16, directory: &str) -> String {
    format!(
        r#"server_name: acme.test
listeners:
  - {{ address: "127.0.0.1:{tls}", tls: true, serves: [well_known, client, federation] }}
  - {{ address: "127.0.0.1:{plain}", serves: [acme, redirect] }}
tls:
  acme:
    contact: admin@acme.test
    directory: "{directory}"
    ca_file: certs/ca.pem
    state_dir: state
well_known:
  client: {{ homeserver: "https://matrix.acme.test" }}
synapse:
  main: "127.0.0.1:{unused}"
metrics: {{ address: "127.0.0.1:{metrics}" }}
"#,
        unused = free_port()
    )
}

#[test]
fn certificates_come_from_a_real_acme_server_and_renew_under_load() {
    let pki = TestPki::new(&[]);
    let (_dns, dns, dns_management) = start_dns();
    let (tls_port, plain_port, metrics_port) = (free_port(), free_port(), free_port());
    let public = SocketAddr::from(([127, 0, 0, 1], tls_port));
    let plain = SocketAddr::from(([127, 0, 0, 1], plain_port));
    let metrics = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    // Pebble's directory address is fixed before it runs, so the edge can
    // start first and show what it serves while the CA is unreachable.
    let work = tempfile::tempdir().unwrap();
    let pebble_port = free_port();
    let directory = format!("https://localhost:{pebble_port}/dir");
    let config = edge_config(tls_port, plain_port, metrics_port, &directory);
    let mut edge = EdgeProcess::start(&config, Some(&pki), &[public, plain]);

    // 1. The placeholder is served at once, and the failure is explained.
    let placeholder = served_certificate(public, "acme.test");
    assert_eq!(common_name(&placeholder), "matrix-edge placeholder for acme.test");
    strictly_parsed_serial(&placeholder);
    wait_for("the failed first order logged", &edge, Duration::from_secs(20), || {
        edge.log_text().contains("order for acme.test failed")
    });
    assert!(edge.log_text().contains("the placeholder keeps serving"), "{}", edge.log_text());
    // The plain listener: unknown tokens 404, everything else to https.
    let (challenge, _) = h1_plain(plain, &get("/.well-known/acme-challenge/nope", "acme.test"));
    assert_eq!(challenge.status, 404);
    let (redirect, _) = h1_plain(plain, &get("/_matrix/client/versions?a=1", "matrix.acme.test"));
    assert_eq!(redirect.status, 308);
    assert_eq!(
        redirect.header("location"),
        Some(format!("https://matrix.acme.test:{tls_port}/_matrix/client/versions?a=1").as_str())
    );

    // 2. First issuance by HTTP-01 once the CA is up (renew skips the backoff).
    let pebble = start_pebble(work.path(), &pki, plain_port, dns, pebble_port);
    assert_eq!(pebble.directory, directory);
    let root = pebble_root(&pebble, &pki);
    renew(&edge, &[]);
    for name in ["acme.test", "matrix.acme.test"] {
        wait_for(
            &format!("a certificate for {name} that verifies against Pebble's root"),
            &edge,
            Duration::from_secs(60),
            || verified_request(public, name, &root).is_ok(),
        );
    }
    let issued = served_certificate(public, "matrix.acme.test");
    let names: Vec<String> =
        issued.subject_alt_names().unwrap().iter().filter_map(|n| n.dnsname().map(str::to_string)).collect();
    assert_eq!(names, ["matrix.acme.test"]);
    let ok_orders = "matrix_edge_acme_orders_total{name=\"matrix.acme.test\",result=\"ok\"}";
    assert_eq!(metric(metrics, ok_orders), Some(1.0));
    assert!(metric(metrics, "matrix_edge_certificate_expiry_timestamp_seconds{certificate=\"matrix.acme.test\"}")
        .is_some_and(|expiry| expiry > 1e9));

    // 3. A restart serves the stored certificate at once and orders nothing.
    let first = fingerprint(&issued);
    edge.restart(&[public, plain]);
    assert_eq!(fingerprint(&served_certificate(public, "matrix.acme.test")), first);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(metric(metrics, ok_orders), None, "a restart ordered again:\n{}", edge.log_text());
    assert!(!edge.log_text().contains("new certificate"), "{}", edge.log_text());

    // 4. A renewal forced early, under steady load of new verified connections.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (stop, served, failures, seen, root) =
                (stop.clone(), served.clone(), failures.clone(), seen.clone(), root.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match verified_request(public, "matrix.acme.test", &root) {
                        Ok(print) => {
                            served.fetch_add(1, Ordering::Relaxed);
                            let mut seen = seen.lock().unwrap();
                            if !seen.contains(&print) {
                                seen.push(print);
                            }
                        }
                        Err(error) => failures.lock().unwrap().push(error),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    renew(&edge, &["matrix.acme.test"]);
    wait_for("the renewed certificate served", &edge, Duration::from_secs(60), || seen.lock().unwrap().len() >= 2);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for thread in load {
        thread.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "requests failed during the renewal: {failures:?}");
    let renewed = fingerprint(&served_certificate(public, "matrix.acme.test"));
    assert_ne!(renewed, first);
    assert!(served.load(Ordering::Relaxed) > 20, "too little load to prove anything");
    // The other name was not renewed.
    let mut other = fingerprint(&served_certificate(public, "acme.test"));

    // 5. A challenge that fails: the CA cannot reach the edge for acme.test.
    let add = serde_json::json!({ "host": "acme.test.", "addresses": ["127.0.0.2"] }).to_string();
    let request = format!(
        "POST /add-a HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{add}",
        add.len()
    );
    let (answer, _) = h1_plain(dns_management, request.as_bytes());
    assert_eq!(answer.status, 200);
    // Pebble 2.4 still reuses a valid authorization about once in a hundred
    // orders with PEBBLE_AUTHZREUSE=0 (it reuses unless `rand.Intn(100) >
    // percent`, and 0 > 0 is false); then the order succeeds without a
    // challenge, and the renewal is asked again.
    let issued_for = |log: &str| log.matches("new certificate for acme.test ").count();
    for attempt in 1..=3 {
        let issued_before = issued_for(&edge.log_text());
        renew(&edge, &["acme.test"]);
        wait_for("the renewal's outcome logged", &edge, Duration::from_secs(60), || {
            let log = edge.log_text();
            log.contains("order for acme.test failed") || issued_for(&log) > issued_before
        });
        if edge.log_text().contains("order for acme.test failed") {
            break;
        }
        assert!(attempt < 3, "pebble reused acme.test's authorization three times running");
        eprintln!("pebble reused acme.test's authorization: renewing again");
        other = fingerprint(&served_certificate(public, "acme.test"));
    }
    let log = edge.log_text();
    let line = log.lines().find(|l| l.contains("order for acme.test failed")).unwrap();
    assert!(line.contains("127.0.0.2"), "the CA's reason is not in the log: {line}");
    assert!(line.contains("the stored certificate keeps serving"), "{line}");
    assert_eq!(fingerprint(&served_certificate(public, "acme.test")), other);
    assert!(verified_request(public, "acme.test", &root).is_ok());
    assert_eq!(metric(metrics, "matrix_edge_acme_orders_total{name=\"acme.test\",result=\"error\"}"), Some(1.0));
}
