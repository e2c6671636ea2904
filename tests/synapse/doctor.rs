//! `matrix-edge doctor` against a real Synapse behind the real edge: a good
//! deployment passes, and each broken one built here is named.
//!
//! Names live under `doctor.test`; `--connect-to` sends them to the edge on
//! loopback and `--ca` trusts the test PKI, as an admin would test before
//! DNS points at a new host.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use support::certs::TestPki;
use support::synapse::Synapse;
use support::{free_port, ChildGuard, EdgeProcess};

const SERVER_NAME: &str = "doctor.test";
const HOMESERVER: &str = "matrix.doctor.test";

struct Outcome {
    code: i32,
    text: String,
}

impl Outcome {
    fn line(&self, start: &str) -> &str {
        self.text
            .lines()
            .find(|l| l.trim_start().starts_with(start))
            .unwrap_or_else(|| panic!("no line {start:?} in:\n{}", self.text))
    }
}

fn doctor(edge_port: u16, ca: &Path, signing_key: Option<&Path>, extra: &[&str]) -> Outcome {
    let mut command = Command::new(support::binary());
    command
        .args(["doctor", "--server-name", SERVER_NAME])
        .arg("--connect-to")
        .arg(format!("{SERVER_NAME}:443:127.0.0.1:{edge_port}"))
        .arg("--connect-to")
        .arg(format!("{HOMESERVER}:443:127.0.0.1:{edge_port}"))
        .arg("--ca")
        .arg(ca)
        .args(extra);
    if let Some(key) = signing_key {
        command.arg("--signing-key").arg(key);
    }
    let output = command.output().unwrap();
    Outcome {
        code: output.status.code().unwrap_or(-1),
        text: String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr),
    }
}

fn edge_config(port: u16, synapse: SocketAddr, m_server: &str, certs: &str, extra: &str) -> String {
    format!(
        r#"server_name: {SERVER_NAME}
listeners:
  - {{ address: "127.0.0.1:{port}", tls: true, serves: [well_known, client, federation, sites] }}
tls:
  certificates:
{certs}
well_known:
  server: "{m_server}"
  client: {{ homeserver: "https://{HOMESERVER}" }}
  max_age: 1h
synapse:
  main: "{synapse}"
{extra}"#
    )
}

const GOOD_CERTS: &str = "    - { cert: certs/doctor.test/fullchain.pem, key: certs/doctor.test/privkey.pem }\n    - { cert: certs/matrix.doctor.test/fullchain.pem, key: certs/matrix.doctor.test/privkey.pem }";

fn start(config: &str, pki: &TestPki, port: u16) -> EdgeProcess {
    EdgeProcess::start(config, Some(pki), &[SocketAddr::from(([127, 0, 0, 1], port))])
}

#[test]
fn doctor_passes_a_good_deployment_and_names_each_broken_one() {
    let work = tempfile::tempdir().unwrap();
    let synapse_port = free_port();
    let synapse =
        Synapse::start(&work.path().join("synapse"), synapse_port, SERVER_NAME, &format!("https://{HOMESERVER}/"));
    let synapse_addr = SocketAddr::from(([127, 0, 0, 1], synapse_port));
    let signing_key: PathBuf = synapse.dir.join("signing.key");
    assert!(signing_key.exists(), "no signing key at {}", signing_key.display());
    let pki = TestPki::new(&[&[SERVER_NAME], &[HOMESERVER]]);
    let ca = work.path().join("ca.pem");
    std::fs::write(&ca, &pki.root_pem).unwrap();
    let port = free_port();
    let m_server = format!("{HOMESERVER}:443");

    // A good deployment: every check passes, the signed request included.
    let edge = start(&edge_config(port, synapse_addr, &m_server, GOOD_CERTS, ""), &pki, port);
    let good = doctor(port, &ca, Some(&signing_key), &[]);
    assert_eq!(good.code, 0, "{}", good.text);
    for line in [
        "ok   .well-known/matrix/server: delegates to matrix.doctor.test:443",
        "ok   certificate of matrix.doctor.test:443",
        "ok   federation endpoint",
        "ok   signing keys: /_matrix/key/v2/server is self-signed by doctor.test (ed25519:",
        "ok   signed federation request: Synapse accepted",
        "ok   .well-known/matrix/client: m.homeserver is https://matrix.doctor.test, with CORS",
        "ok   client API",
        "ok   authenticated media: /_matrix/client/v1/media/config asks for an access token (401 M_MISSING_TOKEN)",
    ] {
        assert!(good.text.contains(line), "missing {line:?} in:\n{}", good.text);
    }
    assert!(!good.text.contains("FAIL"), "{}", good.text);
    // The same as JSON.
    let json = doctor(port, &ca, None, &["--json"]);
    let findings: serde_json::Value = serde_json::from_str(&json.text).unwrap();
    assert!(findings.as_array().unwrap().iter().all(|f| f["verdict"] != "fail"), "{findings}");
    // The gate observes by default: a forged request reaches Synapse.
    assert!(good.text.contains("ok   federation gate: not enforcing"), "{}", good.text);
    drop(edge);

    // The gate enforcing: the doctor's requests signed with Synapse's key
    // pass it (the edge fetches the keys through the delegation), a forged
    // one is refused at the door.
    let enforce = format!(
        "federation:\n  verify:\n    mode: enforce\n    ca_file: certs/ca.pem\n    connect_to: \
         [\"{SERVER_NAME}:443:127.0.0.1:{port}\", \"{HOMESERVER}:443:127.0.0.1:{port}\"]\n"
    );
    let edge = start(&edge_config(port, synapse_addr, &m_server, GOOD_CERTS, &enforce), &pki, port);
    let enforcing = doctor(port, &ca, Some(&signing_key), &[]);
    assert_eq!(enforcing.code, 0, "{}", enforcing.text);
    assert!(enforcing.text.contains("ok   signed federation request: Synapse accepted"), "{}", enforcing.text);
    assert!(enforcing.text.contains("ok   federation gate: enforcing"), "{}", enforcing.text);
    drop(edge);

    // nginx in front of the same Synapse, as Synapse's docs configure it
    // (proxy_pass without a URI part): doctor passes. With the classic
    // mistake (a URI part, so nginx decodes and re-encodes the path), the
    // signed requests with encoded IDs in the path fail and the query's pass.
    let leaf = pki.issue(&[SERVER_NAME, HOMESERVER]);
    let nginx_port = free_port();
    let nginx = Nginx::start(&work.path().join("nginx"), nginx_port, synapse_port, &leaf, "");
    let behind_nginx = doctor(nginx_port, &ca, Some(&signing_key), &[]);
    assert_eq!(behind_nginx.code, 0, "{}", behind_nginx.text);
    assert!(behind_nginx.text.contains("ok   signed federation request: Synapse accepted"), "{}", behind_nginx.text);
    drop(nginx);
    let nginx = Nginx::start(&work.path().join("nginx-uri"), nginx_port, synapse_port, &leaf, "/_matrix/");
    let rewritten = doctor(nginx_port, &ca, Some(&signing_key), &[]);
    assert_eq!(rewritten.code, 1, "{}", rewritten.text);
    let line = rewritten.line("FAIL signed federation request");
    assert!(line.contains("changed the request target's path ("), "{line}");
    assert!(line.contains("/_matrix/federation/v1/user/devices/%40doctor%3Adoctor.test (401"), "{line}");
    assert!(!line.contains("query"), "the query reaches Synapse unchanged through nginx: {line}");
    assert!(rewritten.text.contains("fix: forward the request target byte for byte"), "{}", rewritten.text);
    let failures: Vec<&str> = rewritten.text.lines().filter(|l| l.contains("FAIL")).collect();
    assert_eq!(failures.len(), 1, "only the signed request should fail: {failures:?}");
    drop(nginx);

    // A proxy that percent-decodes targets between the edge and Synapse: the
    // signature no longer matches what Synapse sees.
    let proxy_port = free_port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/py/canonicalising_proxy.py");
    let _proxy = ChildGuard(
        Command::new("python3")
            .arg(&script)
            .arg(proxy_port.to_string())
            .arg(synapse_port.to_string())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let proxy_addr = SocketAddr::from(([127, 0, 0, 1], proxy_port));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let edge = start(&edge_config(port, proxy_addr, &m_server, GOOD_CERTS, ""), &pki, port);
    let canonicalised = doctor(port, &ca, Some(&signing_key), &[]);
    assert_eq!(canonicalised.code, 1, "{}", canonicalised.text);
    let line = canonicalised.line("FAIL signed federation request");
    assert!(line.contains("changed the request target"), "{line}");
    assert!(canonicalised.text.contains("fix: forward the request target byte for byte"), "{}", canonicalised.text);
    drop(edge);

    // A certificate for the wrong name.
    let other = pki.issue(&["other.test"]);
    let dir = work.path().join("wrong");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("fullchain.pem"), &other.fullchain_pem).unwrap();
    std::fs::write(dir.join("privkey.pem"), &other.key_pem).unwrap();
    let wrong_certs = format!("    - {{ cert: {0}/fullchain.pem, key: {0}/privkey.pem }}", dir.display());
    let edge = start(&edge_config(port, synapse_addr, &m_server, &wrong_certs, ""), &pki, port);
    let wrong = doctor(port, &ca, None, &[]);
    assert_eq!(wrong.code, 1);
    let line = wrong.line("FAIL certificate of");
    assert!(line.contains("does not verify") && line.contains("mismatch"), "{line}");
    drop(edge);

    // An expired certificate for the homeserver.
    let expired = pki.issue_expired(&[HOMESERVER]);
    let dir = work.path().join("expired");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("fullchain.pem"), &expired.fullchain_pem).unwrap();
    std::fs::write(dir.join("privkey.pem"), &expired.key_pem).unwrap();
    let expired_certs = format!(
        "    - {{ cert: certs/doctor.test/fullchain.pem, key: certs/doctor.test/privkey.pem }}\n    - {{ cert: {0}/fullchain.pem, key: {0}/privkey.pem }}",
        dir.display()
    );
    let edge = start(&edge_config(port, synapse_addr, &m_server, &expired_certs, ""), &pki, port);
    let old = doctor(port, &ca, None, &[]);
    assert_eq!(old.code, 1);
    let line = old.line("FAIL certificate of matrix.doctor.test:443");
    assert!(line.contains("expired"), "{line}");
    drop(edge);

    // m.server on a port nobody serves.
    let nobody = free_port();
    let edge = start(&edge_config(port, synapse_addr, &format!("{HOMESERVER}:{nobody}"), GOOD_CERTS, ""), &pki, port);
    let rule = format!("{HOMESERVER}:{nobody}:127.0.0.1:{nobody}");
    let unserved = doctor(port, &ca, None, &["--connect-to", &rule]);
    assert_eq!(unserved.code, 1);
    let line = unserved.line("FAIL federation endpoint");
    assert!(line.contains(&format!("{HOMESERVER}:{nobody}")) && line.contains("refused"), "{line}");
    drop(edge);

    // A media worker that does not know authenticated media (as Synapse
    // before 1.107 answers): healthy, but the new paths are 404.
    let old_media = old_media_worker();
    let workers = format!("  workers:\n    media_repository: [\"{old_media}\"]\n");
    let edge = start(&edge_config(port, synapse_addr, &m_server, GOOD_CERTS, &workers), &pki, port);
    let no_media = doctor(port, &ca, None, &[]);
    assert_eq!(no_media.code, 1, "{}", no_media.text);
    let line = no_media.line("FAIL authenticated media");
    assert!(line.contains("404 M_UNRECOGNIZED"), "{line}");
    assert!(no_media.text.contains("fix: route /_matrix/client/v1/media/"), "{}", no_media.text);
    drop(edge);

    // The well-known documents served as static files by mistake: the
    // client one without CORS, then with invalid JSON.
    let root = work.path().join("static");
    std::fs::create_dir_all(root.join(".well-known/matrix")).unwrap();
    std::fs::write(root.join(".well-known/matrix/server"), format!("{{\"m.server\": \"{m_server}\"}}")).unwrap();
    std::fs::write(
        root.join(".well-known/matrix/client"),
        format!("{{\"m.homeserver\": {{\"base_url\": \"https://{HOMESERVER}\"}}}}"),
    )
    .unwrap();
    let sites = format!(
        "matrix_site:\n  hosts: [{HOMESERVER}]\nsites:\n  - hosts: [{SERVER_NAME}]\n    routes:\n      - {{ prefix: /, static: {{ root: \"{}\" }} }}\n",
        root.display()
    );
    let edge = start(&edge_config(port, synapse_addr, &m_server, GOOD_CERTS, &sites), &pki, port);
    let no_cors = doctor(port, &ca, None, &[]);
    assert_eq!(no_cors.code, 1, "{}", no_cors.text);
    let line = no_cors.line("FAIL .well-known/matrix/client");
    assert!(line.contains("Access-Control-Allow-Origin"), "{line}");
    std::fs::write(root.join(".well-known/matrix/client"), "{\"m.homeserver\": ").unwrap();
    let invalid = doctor(port, &ca, None, &[]);
    assert_eq!(invalid.code, 1);
    let line = invalid.line("FAIL .well-known/matrix/client");
    assert!(line.contains("invalid") && line.contains("not JSON"), "{line}");
    drop(edge);
}

/// Debian's nginx terminating TLS for both names in front of Synapse;
/// `uri_part` is what follows the address in `proxy_pass` ("" as Synapse's
/// docs write it).
struct Nginx(std::process::Child);

impl Nginx {
    fn start(dir: &Path, port: u16, synapse_port: u16, leaf: &support::certs::Leaf, uri_part: &str) -> Nginx {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).unwrap();
        // nginx's workers drop to an unprivileged user when started as root.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir.parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("fullchain.pem"), &leaf.fullchain_pem).unwrap();
        std::fs::write(dir.join("privkey.pem"), &leaf.key_pem).unwrap();
        let d = dir.display();
        let config = format!(
            r#"worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    server_name {SERVER_NAME} {HOMESERVER};
    ssl_certificate {d}/fullchain.pem; ssl_certificate_key {d}/privkey.pem;
    location = /.well-known/matrix/server {{
      default_type application/json; add_header Cache-Control "max-age=3600";
      return 200 '{{"m.server": "{HOMESERVER}:443"}}';
    }}
    location = /.well-known/matrix/client {{
      default_type application/json; add_header Access-Control-Allow-Origin "*" always;
      return 200 '{{"m.homeserver": {{"base_url": "https://{HOMESERVER}"}}}}';
    }}
    location /_matrix/ {{
      proxy_pass http://127.0.0.1:{synapse_port}{uri_part};
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header Host $host;
    }}
  }}
}}
"#
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, config).unwrap();
        let nginx = if Path::new("/usr/sbin/nginx").exists() { "/usr/sbin/nginx" } else { "nginx" };
        let child = Command::new(nginx)
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdout(Stdio::null())
            .spawn()
            .expect("nginx (scripts/install-deps installs it)");
        support::wait_listening(SocketAddr::from(([127, 0, 0, 1], port)), "nginx");
        Nginx(child)
    }
}

impl Drop for Nginx {
    /// SIGTERM, not SIGKILL: the master takes its workers with it.
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// Answers `/health` 200 and everything else as Synapse answers a path it
/// does not know: 404 `M_UNRECOGNIZED`.
fn old_media_worker() -> SocketAddr {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut header = String::new();
            while reader.read_line(&mut header).is_ok_and(|n| n > 0) && header != "\r\n" {
                header.clear();
            }
            let body = if request_line.starts_with("GET /health ") {
                ("200 OK", "OK".to_string())
            } else {
                ("404 Not Found", r#"{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}"#.to_string())
            };
            let answer = format!(
                "HTTP/1.1 {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                body.0,
                body.1.len(),
                body.1
            );
            let _ = reader.get_mut().write_all(answer.as_bytes());
        }
    });
    address
}

/// `matrix-edge init --from-synapse` with certificate files.
fn init(homeserver: &Path, cert: &Path, key: &Path) -> std::process::Output {
    let mut command = Command::new(support::binary());
    command.args(["init", "--from-synapse"]).arg(homeserver).arg("--cert").arg(cert).arg("--key").arg(key);
    command.output().unwrap()
}

/// `init` on a homeserver.yaml without delegation (`public_baseurl`'s host
/// is the server name) and on one with it: the edge started on what `init`
/// wrote, in front of a real Synapse, is reachable by federation as other
/// servers discover it. Port 8448 is mapped to a port where nothing
/// listens, so a config that leaves discovery to fall through to 8448 fails.
#[test]
fn init_writes_configs_other_servers_reach() {
    let work = tempfile::tempdir().unwrap();
    let synapse_port = free_port();
    let synapse =
        Synapse::start(&work.path().join("synapse"), synapse_port, SERVER_NAME, &format!("https://{HOMESERVER}/"));
    let pki = TestPki::new(&[&[SERVER_NAME]]);
    let ca = work.path().join("ca.pem");
    std::fs::write(&ca, &pki.root_pem).unwrap();
    let leaf = pki.issue(&[SERVER_NAME, HOMESERVER]);
    let (cert, key) = (work.path().join("fullchain.pem"), work.path().join("privkey.pem"));
    std::fs::write(&cert, &leaf.fullchain_pem).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    let homeserver = std::fs::read_to_string(synapse.dir.join("homeserver.yaml")).unwrap();
    assert!(homeserver.contains(&format!("https://{HOMESERVER}/")), "{homeserver}");

    for (case, public_host, m_server) in [
        ("not delegated", SERVER_NAME, format!("{SERVER_NAME}:443")),
        ("delegated", HOMESERVER, format!("{HOMESERVER}:443")),
    ] {
        let yaml = work.path().join(format!("{}.yaml", case.replace(' ', "-")));
        std::fs::write(
            &yaml,
            homeserver.replace(&format!("https://{HOMESERVER}/"), &format!("https://{public_host}/")),
        )
        .unwrap();
        let output = init(&yaml, &cert, &key);
        assert!(output.status.success(), "{case}: {}", String::from_utf8_lossy(&output.stderr));
        let written = String::from_utf8(output.stdout).unwrap();
        assert!(written.contains(&format!("\n  server: {m_server}\n")), "{case}:\n{written}");
        let port = free_port();
        let nothing_on_8448 = free_port();
        let config = written.replace("\"[::]:443\"", &format!("\"127.0.0.1:{port}\""));
        assert_ne!(config, written, "{case}: no listener on [::]:443 in:\n{written}");
        let edge = start(&config, &pki, port);
        let checked = Command::new(support::binary()).arg("check").arg("-c").arg(&edge.config).output().unwrap();
        assert!(checked.status.success());
        assert!(!String::from_utf8_lossy(&checked.stderr).contains("no listener serves federation"), "{case}");
        let found =
            doctor(port, &ca, None, &["--connect-to", &format!("{SERVER_NAME}:8448:127.0.0.1:{nothing_on_8448}")]);
        assert_eq!(found.code, 0, "{case}:\n{}", found.text);
        for line in [
            format!("ok   .well-known/matrix/server: delegates to {m_server}"),
            "ok   federation endpoint".to_string(),
            format!("ok   signing keys: /_matrix/key/v2/server is self-signed by {SERVER_NAME}"),
            format!("ok   .well-known/matrix/client: m.homeserver is https://{public_host}"),
        ] {
            assert!(found.text.contains(&line), "{case}: missing {line:?} in:\n{}", found.text);
        }
    }

    // What init wrote before: no m.server for the server without
    // delegation. Discovery falls through to 8448, check warns, doctor
    // fails and names the fix in the edge's config.
    let yaml = work.path().join("not-delegated.yaml");
    let output = init(&yaml, &cert, &key);
    let written = String::from_utf8(output.stdout).unwrap();
    let port = free_port();
    let config = written
        .replace("\"[::]:443\"", &format!("\"127.0.0.1:{port}\""))
        .replace(&format!("\n  server: {SERVER_NAME}:443\n"), "\n");
    let edge = start(&config, &pki, port);
    let checked = Command::new(support::binary()).arg("check").arg("-c").arg(&edge.config).output().unwrap();
    assert!(checked.status.success());
    let warning = String::from_utf8_lossy(&checked.stderr).into_owned();
    assert!(warning.contains("no listener serves federation on port 8448"), "{warning}");
    let nothing_on_8448 = free_port();
    let lost = doctor(port, &ca, None, &["--connect-to", &format!("{SERVER_NAME}:8448:127.0.0.1:{nothing_on_8448}")]);
    assert_eq!(lost.code, 1, "{}", lost.text);
    let line = lost.line("FAIL federation endpoint");
    assert!(line.contains(&format!("{SERVER_NAME}:8448")), "{line}");
    assert!(lost.text.contains(&format!("well_known.server: \"{SERVER_NAME}:443\"")), "{}", lost.text);
}
