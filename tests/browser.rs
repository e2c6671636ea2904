//! A real browser through the edge: headless Chromium loads a page from the
//! static site on one host which, as Element Web does, reads
//! `/.well-known/matrix/client` from the server name, calls
//! `/_matrix/client/versions` on the homeserver it names (another host, so
//! CORS for real, preflights included), and registers a user on the real
//! Synapse behind the edge, then reads the edge's JSON refusal of an admin
//! path (its CORS preflight answered 204, as browsers need). The page writes
//! its outcome into the DOM, which Chromium prints.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use support::certs::TestPki;
use support::synapse::Synapse;
use support::{free_port, EdgeProcess};

const SERVER_NAME: &str = "example.com";
const MATRIX_HOST: &str = "synapse.example.com";
const ELEMENT_HOST: &str = "element.example.com";

/// The page's script: Element Web's discovery, then registration with the
/// dummy flow, then a request with an access token (a preflighted request).
const PAGE: &str = r#"<!doctype html>
<html><head><title>discovery</title></head><body><pre id="result">pending</pre>
<script>
const SERVER = "https://__SERVER__";
async function json(response) { return { status: response.status, body: await response.json() }; }
async function run() {
  const out = { origin: location.origin };
  try {
    const wellKnown = await json(await fetch(SERVER + "/.well-known/matrix/client"));
    const base = wellKnown.body["m.homeserver"]["base_url"].replace(/\/$/, "");
    out.base_url = base;
    const versions = await json(await fetch(base + "/_matrix/client/versions"));
    out.versions = versions.body.versions;
    const post = (body) => fetch(base + "/_matrix/client/v3/register", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const first = await json(await post({ username: "browser", password: "correct horse battery" }));
    out.first_status = first.status;
    const second = await json(await post({ username: "browser", password: "correct horse battery",
      auth: { type: "m.login.dummy", session: first.body.session } }));
    out.user_id = second.body.user_id;
    const whoami = await json(await fetch(base + "/_matrix/client/v3/account/whoami",
      { headers: { Authorization: "Bearer " + second.body.access_token } }));
    out.whoami = whoami.body.user_id;
    // A path the edge refuses, called as admin tools do (a preflighted request):
    // the page must read the edge's JSON refusal, not "Failed to fetch".
    const admin = await json(await fetch(base + "/_synapse/admin/v1/server_version",
      { headers: { Authorization: "Bearer " + second.body.access_token } }));
    out.admin = [admin.status, admin.body.errcode];
  } catch (error) {
    out.error = String(error);
  }
  document.getElementById("result").textContent = "RESULT " + JSON.stringify(out) + " END";
}
run();
</script></body></html>
"#;

/// base64 of the SHA-256 of a certificate's public key, as Chromium's
/// `--ignore-certificate-errors-spki-list` takes it: only our certificates
/// are accepted, and TLS is still verified against them.
fn spki_hash(fullchain_pem: &str) -> String {
    let cert = openssl::x509::X509::from_pem(fullchain_pem.as_bytes()).unwrap();
    let spki = cert.public_key().unwrap().public_key_to_der().unwrap();
    let digest = openssl::sha::sha256(&spki);
    openssl::base64::encode_block(&digest)
}

#[test]
#[ignore = "needs Chromium and Synapse: run scripts/test"]
fn a_browser_discovers_the_homeserver_across_sites_and_registers() {
    let work = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&[&[MATRIX_HOST], &[SERVER_NAME], &[ELEMENT_HOST]]);
    let edge_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let port = edge_addr.port();
    let synapse_port = free_port();
    let base_url = format!("https://{MATRIX_HOST}:{port}");
    let _synapse = Synapse::start(&work.path().join("synapse"), synapse_port, SERVER_NAME, &format!("{base_url}/"));
    let www = work.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), PAGE.replace("__SERVER__", &format!("{SERVER_NAME}:{port}"))).unwrap();
    let config = format!(
        r#"server_name: {SERVER_NAME}
listeners:
  - {{ address: "{edge_addr}", tls: true, serves: [well_known, client, federation, sites] }}
tls:
  certificates:
    - {{ cert: certs/{MATRIX_HOST}/fullchain.pem, key: certs/{MATRIX_HOST}/privkey.pem }}
    - {{ cert: certs/{SERVER_NAME}/fullchain.pem, key: certs/{SERVER_NAME}/privkey.pem }}
    - {{ cert: certs/{ELEMENT_HOST}/fullchain.pem, key: certs/{ELEMENT_HOST}/privkey.pem }}
well_known:
  server: {MATRIX_HOST}:{port}
  client: {{ homeserver: "{base_url}" }}
synapse:
  main: 127.0.0.1:{synapse_port}
sites:
  - hosts: [{ELEMENT_HOST}]
    routes:
      - {{ prefix: /, static: {{ root: "{}", cache: [{{ pattern: '^/index\.html$', cache_control: no-cache }}] }} }}
process: {{ threads: 2 }}
"#,
        www.display()
    );
    let edge = EdgeProcess::start(&config, Some(&pki), &[edge_addr]);
    let spki: Vec<String> = pki.leaves.iter().map(|leaf| spki_hash(&leaf.fullchain_pem)).collect();
    let profile = work.path().join("chromium-profile");
    let started = Instant::now();
    let output = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        .args(["--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.display()))
        // Every name resolves to loopback: nothing leaves the machine.
        .arg("--host-resolver-rules=MAP * 127.0.0.1")
        .arg(format!("--ignore-certificate-errors-spki-list={}", spki.join(",")))
        .arg("--virtual-time-budget=60000")
        .arg("--timeout=90000")
        .arg("--dump-dom")
        .arg(format!("https://{ELEMENT_HOST}:{port}/"))
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&output.stdout);
    let Some(result) = dom.split("RESULT ").nth(1).and_then(|rest| rest.split(" END").next()) else {
        panic!(
            "no result in the page after {:?}: {dom}\nchromium stderr: {}\nedge log: {}",
            started.elapsed(),
            String::from_utf8_lossy(&output.stderr),
            edge.log_text()
        );
    };
    let result: serde_json::Value = serde_json::from_str(&result.replace("&quot;", "\"")).unwrap();
    assert!(result.get("error").is_none(), "{result}\nedge log: {}", edge.log_text());
    assert_eq!(result["origin"], format!("https://{ELEMENT_HOST}:{port}"));
    assert_eq!(result["base_url"], base_url);
    assert!(result["versions"].as_array().is_some_and(|v| v.iter().any(|v| v == "v1.11")), "{result}");
    assert_eq!(result["first_status"], 401);
    assert_eq!(result["user_id"], format!("@browser:{SERVER_NAME}"));
    assert_eq!(result["whoami"], format!("@browser:{SERVER_NAME}"));
    assert_eq!(result["admin"], serde_json::json!([403, "M_FORBIDDEN"]), "{result}");
    // The page came from the static site; the API calls reached Synapse
    // through the Matrix site, the preflights too.
    let log = edge.log_text();
    assert!(log.contains("\"GET / HTTP/1.1\" 200") || log.contains("\"GET / HTTP/2.0\" 200"), "{log}");
    assert!(log.contains("OPTIONS /_matrix/client/v3/register"), "no preflight seen: {log}");
    assert!(started.elapsed() < Duration::from_secs(120));
}
